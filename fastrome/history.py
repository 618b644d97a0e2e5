"""The editor's edit history in memory: what it takes to undo, replay and resume edits exactly.

The journal (:mod:`fastrome.journal`) keeps every applied edit as its rank-one factors; this module
keeps the rest of what the weights of a run depend on, and rebuilds them from the two:

- **base weights**: each written layer's weight from before its first edit (undo and replay start
  from it, and statistics are computed on it, see :meth:`EditHistory.unedited`);
- **masters**: the fp32 copies half-precision weights are written through (``M += Λuᵀ; W = round(M)``);
- **running totals**: each layer's summed ``‖ΔW‖/‖W‖``, which the guards cap;
- **checkpoints**: per layer, copies of its state after recent writes, so undoing the latest edits
  replays a few entries instead of the whole journal;
- **edit memory**: each layer's memory of solved keys is kept in step with the journal's edits,
  with the keys re-read from the model at each refresh point (:mod:`fastrome.refresh`).

Every rebuild is bit for bit the state of a run in which the removed edits were never made.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fastrome.adapter import ModelAdapter
from fastrome.config import EditConfig, settings_that_differ
from fastrome.journal import (
    Journal,
    JournalEntry,
    apply_factors,
    check_base,
    edit_groups,
    group_complete,
    part_record,
    weight_digest,
)
from fastrome.memory import EditMemory
from fastrome.pretrained import SavedEdits
from fastrome.projection import ProjectedSolver
from fastrome.refresh import KeyReader, refresh_point
from fastrome.solver import CovarianceSolver

_log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 64  # writes at a layer between copies of its weight kept for undo
INTERFERENCE_HISTORY = 10  # earlier edits at a layer before max_interference_spike applies


@dataclass
class LayerCheckpoint:
    """A layer's state right after journal entry ``last_id`` (-1: before any).

    Attributes:
        last_id: the journal entry the copy was taken after.
        weight: (d_out, d_in) copy of the weight, in its own dtype and device.
        master: (d_out, d_in) fp32 copy of its master (half-precision weights), else None.
        total: the layer's running update-ratio total then.
        since: writes at the layer after the copy.
    """

    last_id: int
    weight: Tensor
    master: Optional[Tensor]
    total: float
    since: int = 0


def edit_memory(solvers: Mapping[int, CovarianceSolver], layer: int) -> Optional[EditMemory]:
    """``layer``'s edit memory, behind a null-space projection or not; None when the memory is off
    (or the layer's solver is not built yet)."""
    solver = solvers.get(layer)
    solver = solver.inner if isinstance(solver, ProjectedSolver) else solver
    return solver if isinstance(solver, EditMemory) else None


class EditHistory:
    """Base weights, fp32 masters, running totals and checkpoints of the layers an editor writes,
    kept consistent with its journal.

    Args:
        adapter: the edited model's adapter (the weights read and restored).
        journal: the editor's journal; this history reads it and removes entries from it on undo.
        config: the editor's config (``memory_dual_keys`` and the lifelong settings a resumed run
            must keep), read when needed.
        solvers: the editor's per-layer solvers, filled by the editor; their edit memories are kept
            in step with the journal.
        checkpoint_every: writes at a layer between copies of its weight kept for undo (default
            :data:`CHECKPOINT_EVERY`, as it is when the history is made).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        journal: Journal,
        config: EditConfig,
        solvers: Mapping[int, CovarianceSolver],
        checkpoint_every: Optional[int] = None,
    ):
        self.adapter = adapter
        self.journal = journal
        self.config = config
        self.solvers = solvers
        self.checkpoint_every = CHECKPOINT_EVERY if checkpoint_every is None else checkpoint_every
        self.base: Dict[int, Tensor] = {}  # layer → its weight before its first edit (dtype and device of the weight)
        self.masters: Dict[int, Tensor] = {}  # layer → fp32 master of a half-precision weight
        self.total_ratio: Dict[int, float] = defaultdict(float)
        # per layer, copies of the weight after two recent edits, oldest first (see LayerCheckpoint):
        # undoing the latest edits restarts from one instead of replaying the whole journal
        self.checkpoints: Dict[int, List[LayerCheckpoint]] = {}
        # reads remembered edits' keys from the model (set by the editor, which has the tokenizer and
        # the templates); needed only with memory_refresh_every
        self.key_reader: Optional[KeyReader] = None
        # per layer, the interference ‖Λ‖²·uᵀCu of the journal's edits there, sorted (for its median)
        self.interferences: Dict[int, List[float]] = {}
        # the latest refresh's keys: (ids of the journal entries it covered, {edit_id: memory rows})
        self._refreshed: Tuple[Tuple[int, ...], Dict[int, List[Tensor]]] = ((), {})

    # -- base weights and masters -----------------------------------------------------------------
    def remember_base(self, layer: int) -> Tensor:
        """``layer``'s weight from before its first edit (kept, and its digest journaled, on the
        first call): undo and replay start from it."""
        if layer not in self.base:
            weight = self.adapter.weight(layer)
            self.base[layer] = weight.detach().clone()
            self.journal.note_base(layer, weight_digest(weight))
        return self.base[layer]

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """The base weights in place of the edited ones for the duration, then the edited ones back
        bit for bit. Statistics describe the unedited model: without this, a layer first needed
        after edits below it (a spread edit, or any run resumed from its journal, which replays
        the edits first) would get statistics of the edited model, so a resumed run would edit
        differently from one never interrupted."""
        edited = {layer: self.adapter.weight(layer).detach().clone() for layer in self.base}
        try:
            with torch.no_grad():
                for layer in edited:
                    self.adapter.weight(layer).copy_(self.base[layer])
            yield
        finally:
            with torch.no_grad():
                for layer, weight in edited.items():
                    self.adapter.weight(layer).copy_(weight)

    def weight32(self, layer: int) -> Tuple[Tensor, Optional[Tensor]]:
        """(fp32 (d_out, d_in) weight for the math, the fp32 master it is written through or None).

        An fp32/fp64 weight is its own (no master); a half-precision one is computed and written
        through a master, taken anew (with a warning) when the weight no longer rounds from it."""
        weight = self.adapter.weight(layer)
        if weight.dtype in (torch.float32, torch.float64):
            return weight.detach().float(), None
        master = self.masters.get(layer)
        if master is not None and not torch.equal(weight.detach(), master.to(weight.dtype)):
            warnings.warn(
                f"layer {layer}'s weight was changed outside this editor; taking a new fp32 master copy",
                stacklevel=3,
            )
            master = None
        if master is None:
            master = weight.detach().float()
            self.masters[layer] = master
        return master, master

    def drift(self) -> Dict[int, float]:
        """``{layer: ‖W − W₀‖_F / ‖W₀‖_F}`` in fp64 for every layer with a base weight."""
        out: Dict[int, float] = {}
        for layer, base in sorted(self.base.items()):
            b = base.double()
            out[layer] = float((self.adapter.weight(layer).detach().double() - b).norm() / b.norm())
        return out

    # -- edit memory ------------------------------------------------------------------------------
    def memory_rows(self, key: Tensor) -> List[Tensor]:
        """The rows of an edit's solved key (1 or 2, d_in) its layer's memory keeps: a dual edit's
        two keys (k̄, k_u), or only k_u with ``memory_dual_keys="prompt"``."""
        rows = list(key.reshape(-1, key.shape[-1]))
        return rows[-1:] if len(rows) == 2 and self.config.memory_dual_keys == "prompt" else rows

    def journal_keys(self, layer: int) -> List[Tensor]:
        """The solved keys of the journal's edits at ``layer``, in order (what its memory holds)."""
        keys = []
        for e in self.journal:
            if e.layer == layer:
                if e.key is None:
                    raise ValueError(f"config.memory_beta: edit {e.edit_id} in the journal has no key (written "
                                     "before keys were kept), so the edit memory cannot be rebuilt; resume it "
                                     "with memory_beta=0")
                keys.extend(self.memory_rows(e.key))
        return keys

    def memory_keys(self, layer: int) -> List[Tensor]:
        """The keys ``layer``'s memory holds after the journal's edits: each edit's solved key, or
        with ``memory_refresh_every`` the keys of the edits up to the latest refresh point read from
        the weights they left, then the later edits' solved keys (:mod:`fastrome.refresh`)."""
        keys = self.journal_keys(layer)  # also checks that every edit kept its key
        point = refresh_point(self.journal.edit_count, self.config.memory_refresh_every)
        if not point:
            return keys
        fresh = self.refreshed_rows(point)
        keys = []
        for e in self.journal:
            if e.layer == layer:
                keys.extend(fresh[e.edit_id] if e.edit_id in fresh else self.memory_rows(e.key))
        return keys

    def refreshed_rows(self, point: int) -> Dict[int, List[Tensor]]:
        """``{edit_id: memory rows}`` for the journal's first ``point`` edits, read from the weights
        those edits leave (kept until the journal's first ``point`` edits change)."""
        if self.key_reader is None:
            raise ValueError("config.memory_refresh_every: this history cannot read keys from the model "
                             "(no key reader was given)")
        groups = edit_groups(self.journal.entries)[:point]
        ids = tuple(e.edit_id for group in groups for e in group)
        if self._refreshed[0] != ids:
            with self.weights_after([e for group in groups for e in group]):
                self._refreshed = (ids, self.key_reader(groups))
        return self._refreshed[1]

    @contextmanager
    def weights_after(self, entries: Sequence[JournalEntry]) -> Iterator[None]:
        """Every edited layer at its base weight plus ``entries``' factors (a prefix of the journal,
        replayed bit for bit as the original writes) for the duration, then as it was, bit for bit.
        Nothing is copied when ``entries`` is the whole journal: the weights already are that."""
        if len(entries) == len(self.journal.entries):
            yield
            return
        edited = {layer: self.adapter.weight(layer).detach().clone() for layer in self.base}
        try:
            with torch.no_grad():
                for layer, base in self.base.items():
                    weight = self.adapter.weight(layer)
                    weight.copy_(base)
                    master = None if base.dtype in (torch.float32, torch.float64) else base.float()
                    for e in entries:
                        if e.layer == layer:
                            apply_factors(weight, e.u, e.lam, master)
            yield
        finally:
            with torch.no_grad():
                for layer, weight in edited.items():
                    self.adapter.weight(layer).copy_(weight)

    def refresh_memory(self) -> float:
        """After an edit is recorded: at a refresh point (every ``memory_refresh_every`` edits) each
        edit memory is rebuilt from its keys read from the model now; returns the seconds it took
        (0 elsewhere)."""
        every = self.config.memory_refresh_every
        memories = {layer: edit_memory(self.solvers, layer) for layer in list(self.solvers)}
        memories = {layer: m for layer, m in memories.items() if m is not None}
        if not every or not memories or self.journal.edit_count % every:
            return 0.0
        t0 = time.perf_counter()
        for layer, memory in sorted(memories.items()):
            memory.rebuild(self.memory_keys(layer))
        return time.perf_counter() - t0

    def typical_interference(self, layer: int) -> Optional[float]:
        """The median interference of the journal's edits at ``layer`` (None before
        :data:`INTERFERENCE_HISTORY` of them)."""
        held = self.interferences.get(layer, [])
        if len(held) < INTERFERENCE_HISTORY:
            return None
        mid = len(held) // 2
        return held[mid] if len(held) % 2 else 0.5 * (held[mid - 1] + held[mid])

    def _note_interference(self, entry: JournalEntry) -> None:
        value = part_record(entry).get("interference")
        if isinstance(value, (int, float)) and math.isfinite(value):
            bisect.insort(self.interferences.setdefault(entry.layer, []), float(value))

    def remember(self, layer: int, key: Tensor) -> float:
        """An applied edit's key joins its layer's edit memory (when the memory is on); returns the
        seconds it took (0 without a memory)."""
        memory = edit_memory(self.solvers, layer)
        if memory is None:
            return 0.0
        t0 = time.perf_counter()
        for row in self.memory_rows(key):
            memory.add(row)
        return time.perf_counter() - t0

    # -- recording --------------------------------------------------------------------------------
    def record(self, entry: JournalEntry, total: float) -> float:
        """After ``entry``'s write: its layer's running total becomes ``total``, the entry is
        journaled, checkpointed as due and its key remembered; returns the memory's seconds."""
        key = entry.key  # as solved: the journal keeps a CPU copy, the memory takes the original
        self.total_ratio[entry.layer] = total
        self.journal.append(entry)
        self._note_interference(entry)
        self.note_written(entry.layer)
        return self.remember(entry.layer, key)

    def note_written(self, layer: int) -> None:
        """After a write at ``layer`` is journaled: every ``checkpoint_every`` writes there, keep a copy."""
        kept = self.checkpoints.get(layer)
        if not kept or kept[-1].since + 1 >= self.checkpoint_every:
            self.checkpoint(layer, self.journal.entries[-1].edit_id)
        else:
            kept[-1].since += 1

    def checkpoint(self, layer: int, last_id: int) -> None:
        """Copy ``layer``'s state as it is right after entry ``last_id``; the two newest copies stay, so
        an undo of up to ``checkpoint_every`` writes there always finds one from before them."""
        master = self.masters.get(layer)
        ckpt = LayerCheckpoint(last_id, self.adapter.weight(layer).detach().clone(),
                               None if master is None else master.clone(), self.total_ratio[layer])
        self.checkpoints[layer] = self.checkpoints.get(layer, [])[-1:] + [ckpt]

    # -- rebuilding -------------------------------------------------------------------------------
    def rebuild(self, layers: Iterable[int], removed: Sequence[JournalEntry] = ()) -> None:
        """Set each layer to its base weight plus the journal's factors, in order (bit-identical to
        the original writes, through a fresh fp32 master for half-precision weights), and its edit
        memory to the journal's keys there.

        After an undo (``removed``: the entries just taken out of the journal), a layer whose removed
        entries all came after its checkpoint restarts from that copy and replays only the entries
        since, and its memory forgets just the removed keys when they were its latest: the same bits,
        in time that does not grow with the journal."""
        layers = sorted(set(layers))
        for layer in layers:
            gone = [e for e in removed if e.layer == layer]
            first_gone = min(e.edit_id for e in gone) if gone else None
            # the newest copy from before every removed entry; newer ones held removed writes
            usable = [c for c in self.checkpoints.get(layer, []) if gone and c.last_id < first_gone]
            ckpt = usable[-1] if usable else None
            fast = ckpt is not None
            weight, base = self.adapter.weight(layer), self.base[layer]
            with torch.no_grad():
                if fast:
                    weight.copy_(ckpt.weight)
                    master = None if ckpt.master is None else ckpt.master.clone()
                    total, since = ckpt.total, 0
                    entries = self.entries_after(ckpt.last_id)
                else:
                    weight.copy_(base)
                    master = None if base.dtype in (torch.float32, torch.float64) else base.float()
                    total, since = 0.0, 0
                    entries = self.journal.entries
                last_id = ckpt.last_id if fast else -1
                for e in entries:
                    if e.layer == layer:
                        apply_factors(weight, e.u, e.lam, master)
                        total += float(part_record(e).get("update_ratio") or 0.0)
                        last_id, since = e.edit_id, since + 1
            if master is not None:
                self.masters[layer] = master
            else:
                self.masters.pop(layer, None)
            self.total_ratio[layer] = total
            if fast:
                ckpt.since = since
                self.checkpoints[layer] = usable
            else:
                self.checkpoints[layer] = []
                self.checkpoint(layer, last_id)
        for layer in layers:
            self.interferences.pop(layer, None)
        rebuilt = set(layers)
        for e in self.journal:
            if e.layer in rebuilt:
                self._note_interference(e)
        # after every layer's weight: a refresh reads keys through all of them
        for layer in layers:
            memory = edit_memory(self.solvers, layer)
            if memory is None:
                continue
            gone = [e for e in removed if e.layer == layer]
            # with refreshes, an undo may move the latest refresh point: the keys are derived anew
            if (gone and not self.config.memory_refresh_every
                    and not any(e.layer == layer for e in self.entries_after(min(e.edit_id for e in gone)))):
                memory.forget_last(sum(len(self.memory_rows(e.key)) for e in gone))
            else:
                memory.rebuild(self.memory_keys(layer))

    def entries_after(self, edit_id: int) -> List[JournalEntry]:
        """The journal's entries with ids above ``edit_id``, in order (ids grow along the journal, so
        this reads only its tail)."""
        entries = self.journal.entries
        i = len(entries)
        while i > 0 and entries[i - 1].edit_id > edit_id:
            i -= 1
        return entries[i:]

    # -- resume and adopt -------------------------------------------------------------------------
    def resume(self) -> None:
        """Replay the journal's edits onto the (unedited) model after checking the weights and the
        settings they were made with."""
        # A spread edit is journaled part by part; a crash between its parts leaves a partial group,
        # which is dropped (the run redoes that request) rather than replayed half-applied.
        partial = [e.edit_id for group in edit_groups(self.journal.entries) if not group_complete(group)
                   for e in group]
        if partial:
            _log.warning("journal %s: dropping the incomplete parts %s of a spread edit interrupted while it was "
                         "being recorded", self.journal.path, partial)
            self.journal.remove(partial)
        self.check_settings()
        layers = sorted({e.layer for e in self.journal})
        for layer in layers:
            self.adapter.check_layer(layer, f"journal layer {layer}")
        check_base(self.adapter, self.journal.base_digests, f"journal {self.journal.path}")
        for layer in layers:
            self.base[layer] = self.adapter.weight(layer).detach().clone()
        self.rebuild(layers)

    def adopt(self, saved: SavedEdits, where: str) -> None:
        """Take ``saved``'s edits (and context templates) into this empty history's journal and
        replay them: checked first (layers, factor shapes, base weights, settings), nothing
        recorded or written unless all pass."""
        if len(self.journal):
            raise ValueError(f"journal: {self.journal.path} already holds edits; {where} needs a new journal")
        for e in saved.entries:
            self.adapter.check_layer(e.layer, f"{where}: edit {e.edit_id}'s layer")
            w = self.adapter.weight(e.layer)
            if e.u.shape != (w.shape[1],) or e.lam.shape != (w.shape[0],):
                raise ValueError(f"{where}: edit {e.edit_id} has factors {tuple(e.lam.shape)}×{tuple(e.u.shape)}, "
                                 f"layer {e.layer}'s weight is {tuple(w.shape)}")
        layers = sorted({e.layer for e in saved.entries})
        lacking = [layer for layer in layers if layer not in saved.base_digests]
        if lacking:
            raise ValueError(f"{where}: no base-weight digest for layer {lacking[0]} (the folder is damaged)")
        check_base(self.adapter, saved.base_digests, where)
        self.check_settings(saved.entries)  # before anything is recorded or written
        for layer in layers:
            self.base[layer] = self.adapter.weight(layer).detach().clone()
            self.journal.note_base(layer, saved.base_digests[layer])
        if saved.templates:
            self.journal.note_templates(saved.templates)
        for e in saved.entries:
            self.journal.append(e)
        self.rebuild(layers)

    def check_settings(self, entries: Optional[List[JournalEntry]] = None) -> None:
        """A resumed run keeps the settings its edits (``entries``, default the journal's) were made
        with (journals from before these settings were recorded carry none and are taken as they are)."""
        entries = self.journal.entries if entries is None else entries
        fork = self.journal.forked
        if fork and entries is self.journal.entries and self.journal.edit_count <= fork["edits"]:
            return  # at its fork point: the next edits may be made with other settings
        recorded = next((e.record.get("settings") for e in reversed(entries) if e.record.get("settings")), None)
        if not recorded:
            return
        differ = settings_that_differ(recorded, self.config.lifelong_settings())
        if differ:
            said = ", ".join(f"{k}={was!r} (this editor: {have!r})" for k, (was, have) in sorted(differ.items()))
            raise ValueError(f"journal {self.journal.path}: its edits were made with {said}; resume with the "
                             "same settings, or start a new journal")

    # -- undo -------------------------------------------------------------------------------------
    def undo(self, edit_ids: Union[int, Iterable[int]]) -> List[JournalEntry]:
        """Remove the edits with these ids (a spread edit as a whole, whichever of its parts' ids is
        named) and rebuild their layers; returns the removed entries.

        Raises:
            ValueError: an id that is not in the journal (nothing is changed then).
        """
        ids = [edit_ids] if isinstance(edit_ids, int) else [int(i) for i in edit_ids]
        known = {e.edit_id for e in self.journal}
        unknown = sorted(set(ids) - known)
        if unknown:
            raise ValueError(f"edit_ids: {unknown} not in the journal (ids {sorted(known)[:10]}...)")
        wanted = set(ids)
        return self.remove([e.edit_id for group in edit_groups(self.journal.entries)
                            if wanted & {x.edit_id for x in group} for e in group])

    def undo_last(self, n: int = 1) -> List[JournalEntry]:
        """Remove the last ``n`` edits (requests) and rebuild their layers; returns the removed entries."""
        count = self.journal.edit_count
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > count:
            raise ValueError(f"n: expected 0..{count} (edits in the journal), got {n!r}")
        # the last n edits are the journal's tail from the n-th last entry that starts an edit
        entries, i, started = self.journal.entries, len(self.journal.entries), 0
        while started < n:
            i -= 1
            started += entries[i].record.get("part") in (None, 0)
        return self.remove([e.edit_id for e in entries[i:]]) if n else []

    def remove(self, ids: List[int]) -> List[JournalEntry]:
        """Take the entries ``ids`` out of the journal and rebuild their layers without them."""
        removed = self.journal.remove(ids)
        self.rebuild((e.layer for e in removed), removed)
        return removed

    # -- the journal by edit ----------------------------------------------------------------------
    def edits(self) -> List[List[JournalEntry]]:
        """The journal's entries grouped by edit (request), in order: a spread edit's parts together."""
        return edit_groups(self.journal.entries)
