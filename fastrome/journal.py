"""The journal: every applied edit as its rank-one factors, so nothing is ever lost.

An edit changes one weight by ``Λuᵀ``. Keeping ``(u, Λ)`` per edit (kilobytes) plus a copy of each
edited layer's weight from before its first edit is enough to undo any edit, to replay a run onto a
fresh copy of the base model, and to resume a killed run: replaying the factors in order with the
same write kernel reproduces the edited weights bit for bit.

On disk a journal is a folder::

    journal.json          format, the digest of each edited layer's base weight, the context templates
                          (and, for a forked journal, where it came from)
    edits.jsonl           one JSON line per applied edit (id, layer, request, metrics, factor file)
    factors/000042.safetensors   u (d_in,), lam (d_out,) and the solved key (d_in,) in fp32

An edit is recorded like a database's write-ahead log: the factor file is written under a temporary
name, fsynced and renamed (and the folder fsynced); only then is its line appended and fsynced, and
the line carries the factors' sha256. A crash or power loss leaves either a complete entry or a torn
last line, which is dropped on open; a factor file that does not match its line's digest, or holds
non-finite values, is refused by name before anything is written. One writer at a time holds the
folder (:class:`~fastrome.locking.FolderLock`); :meth:`Journal.read` opens one to look at.
:func:`save_edits` / :func:`read_edits` keep the same content in one safetensors file (the edits file of
:meth:`fastrome.Editor.save_pretrained`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from safetensors import safe_open
from torch import Tensor

from fastrome import ops
from fastrome.adapter import ModelAdapter
from fastrome.cache import fsync_dir, write_json, write_safetensors, write_text
from fastrome.locking import FolderLock

_log = logging.getLogger(__name__)

FORMAT = "fastrome.journal.v1"
EDITS_FORMAT = "fastrome.edits.v1"
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class JournalEntry:
    """One applied edit.

    Attributes:
        edit_id: position in the sequence of edits ever applied by the editor (not reused).
        layer: edited layer.
        u: (d_in,) float32 left vector, on the CPU.
        lam: (d_out,) float32 right vector Λ, on the CPU.
        key: (d_in,) float32 key the edit was solved for (k̄ in the consistent mode; (2, d_in), k̄ and
            k_u, in the dual mode), on the CPU:
            the edit memory is rebuilt from these on resume and undo. None in journals written
            before keys were kept.
        request: the request as a dict (``EditRequest.to_dict()``).
        record: the edit's metrics (``EditRecord.to_dict()``).
    """

    edit_id: int
    layer: int
    u: Tensor
    lam: Tensor
    request: Dict[str, Any] = field(default_factory=dict)
    record: Dict[str, Any] = field(default_factory=dict)
    digest: Optional[str] = None  # factor_digest(u, lam, key), computed once
    key: Optional[Tensor] = None

    def tensors(self) -> Dict[str, Tensor]:
        out = {"u": self.u, "lam": self.lam}
        if self.key is not None:
            out["key"] = self.key
        return out

    def header(self) -> Dict[str, Any]:
        if self.digest is None:
            self.digest = factor_digest(self.u, self.lam, self.key)
        return {"edit_id": self.edit_id, "layer": self.layer, "request": self.request, "record": self.record,
                "factors_sha256": self.digest}

    def verify(self, digest: Optional[str], where: str) -> None:
        """Raise ``ValueError`` naming ``where`` unless the factors are finite and match ``digest``
        (None: written before digests were kept; only finiteness is checked)."""
        if digest is not None:
            if factor_digest(self.u, self.lam, self.key) != digest:
                raise ValueError(f"{where}: edit {self.edit_id}'s factors do not match their recorded sha256 "
                                 "(the file is damaged); refusing to replay them")
            self.digest = digest
        if not all(bool(torch.isfinite(t).all()) for t in self.tensors().values()):
            raise ValueError(f"{where}: edit {self.edit_id}'s factors are not finite (the file is damaged); "
                             "refusing to replay them")


def factor_digest(u: Tensor, lam: Tensor, key: Optional[Tensor] = None) -> str:
    """sha256 of an edit's factors as stored (fp32 ``u``, ``lam`` and, when kept, ``key``; exact bytes)."""
    h = hashlib.sha256()
    for t in (u, lam) if key is None else (u, lam, key):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weight_digest(weight: Tensor) -> str:
    """sha256 (16 hex) of a weight's exact bytes, to tell whether a base model is the right one."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def apply_factors(weight: Tensor, u: Tensor, lam: Tensor, master: Optional[Tensor]) -> None:
    """``weight += lam ⊗ u`` (through ``master``) with the same kernel an edit writes with, so a
    replay is bit-identical to the original sequence of writes."""
    applied = ops.rank_one_update(
        weight, u.to(weight.device, torch.float32), lam.to(weight.device, torch.float32),
        denom=1.0, min_denom=0.0, master=master,
    )
    if not bool(applied):
        raise ValueError("journal: a stored factor is not finite; the journal is damaged")


class Journal:
    """The applied edits, in order, kept in memory and (with ``path``) in a folder on disk.

    Args:
        path: folder of an on-disk journal (created if missing; an existing one is read). The
            journal holds the folder's lock until :meth:`close` (or until it is dropped): a second
            writer gets :class:`~fastrome.locking.FolderBusy` naming the folder.
        readonly: read the folder without taking its lock; nothing can be recorded then.
    """

    def __init__(self, path: Optional[PathLike] = None, *, readonly: bool = False):
        self.path = Path(path) if path is not None else None
        self.entries: List[JournalEntry] = []
        self.base_digests: Dict[int, str] = {}
        self._next_id = 0  # ids of undone edits are never handed out again
        self._requests = 0  # entries that start an edit (a spread edit's parts count once)
        self._ends: List[int] = []  # byte offset in edits.jsonl where each entry's line ends
        self.templates: Optional[List[str]] = None  # the context templates of the run
        # {"from": folder, "edits": n} when this journal was forked from another's first n edits: the
        # edits after them may be made with other settings (see :meth:`note_fork`)
        self.forked: Optional[Dict[str, Any]] = None
        self.readonly = readonly
        self.dropped_torn_line = False  # set when open dropped a line cut short by a crash
        self._lock: Optional[FolderLock] = None
        if self.path is not None:
            if readonly and not (self.path / "journal.json").is_file():
                raise ValueError(f"journal: {str(self.path)!r} holds no journal")
            if not readonly:
                self._lock = FolderLock(self.path, "journal")
            try:
                self._open()
            except BaseException:
                self.close()
                raise

    @classmethod
    def read(cls, path: PathLike) -> "Journal":
        """The journal in ``path``, to look at (no lock taken; recording refused)."""
        return cls(path, readonly=True)

    def close(self) -> None:
        """Release the folder's lock; the journal cannot record after this."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self.path is not None:
            self.readonly = True

    def _writable(self) -> None:
        if self.path is not None and self.readonly:
            raise ValueError(f"journal: {str(self.path)!r} is open read-only (or closed); nothing can be recorded")

    # -- disk ------------------------------------------------------------------------------------
    def _open(self) -> None:
        assert self.path is not None
        head = self.path / "journal.json"
        if not head.is_file():
            (self.path / "factors").mkdir(parents=True, exist_ok=True)
            self._write_head()
            return
        try:
            meta = json.loads(head.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"journal: {head} is not valid JSON ({exc})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"journal: {head} has format {meta.get('format')!r}, expected {FORMAT!r}")
        self.base_digests = {int(k): str(v) for k, v in meta.get("base_digests", {}).items()}
        self._next_id = int(meta.get("next_id", 0))
        self.templates = meta.get("templates")
        self.forked = meta.get("forked")
        lines_path = self.path / "edits.jsonl"
        text = lines_path.read_text(encoding="utf-8") if lines_path.is_file() else ""
        # Every record ends with a newline; a trailing piece without one is a write cut short.
        *complete, torn = text.split("\n")
        end = 0
        for n, line in enumerate(complete, start=1):
            end += len(line.encode("utf-8")) + 1
            if not line.strip():
                continue
            try:
                entry = self._read_entry(json.loads(line))
                self.entries.append(entry)
                self._ends.append(end)
                self._requests += _starts_edit(entry)
                self._next_id = max(self._next_id, entry.edit_id + 1)
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"journal: {lines_path} line {n} is damaged ({exc})") from None
        if torn:
            _log.warning("journal: dropping the unfinished last line of %s", lines_path)
            self.dropped_torn_line = True
            if not self.readonly:
                self._rewrite_lines()  # leave a clean file to append to

    def _factor_file(self, edit_id: int) -> Path:
        assert self.path is not None
        return self.path / "factors" / f"{edit_id:06d}.safetensors"

    def _read_entry(self, head: Dict[str, Any]) -> JournalEntry:
        edit_id = int(head["edit_id"])
        path = self._factor_file(edit_id)
        try:
            with safe_open(str(path), framework="pt") as f:
                u, lam = f.get_tensor("u"), f.get_tensor("lam")
                key = f.get_tensor("key") if "key" in f.keys() else None
        except Exception as exc:
            raise ValueError(f"journal: edit {edit_id}'s factors {path} cannot be read ({exc})") from None
        entry = JournalEntry(edit_id, int(head["layer"]), u, lam, head.get("request", {}), head.get("record", {}),
                             key=key)
        entry.verify(head.get("factors_sha256"), f"journal: {path}")
        return entry

    def _write_head(self) -> None:
        assert self.path is not None
        self._writable()
        write_json(self.path / "journal.json", {
            "format": FORMAT, "base_digests": {str(k): v for k, v in sorted(self.base_digests.items())},
            "next_id": self.next_id,
            "templates": self.templates,
            **({"forked": self.forked} if self.forked else {}),
        })

    def _rewrite_lines(self) -> None:
        assert self.path is not None
        self._writable()
        lines = [json.dumps(e.header(), sort_keys=True) + "\n" for e in self.entries]
        write_text(self.path / "edits.jsonl", "".join(lines))
        self._ends = list(itertools.accumulate(len(line.encode("utf-8")) for line in lines))

    # -- recording -------------------------------------------------------------------------------
    def note_base(self, layer: int, digest: str) -> None:
        """Record the digest of ``layer``'s weight before its first edit."""
        if self.base_digests.get(layer) == digest:
            return
        self.base_digests[layer] = digest
        if self.path is not None:
            self._write_head()

    def note_templates(self, templates: List[str]) -> None:
        """Record the run's context templates, so a resumed run edits with the same ones."""
        if self.templates == list(templates):
            return
        self.templates = list(templates)
        if self.path is not None:
            self._write_head()

    def note_fork(self, source: str, edits: int) -> None:
        """Record that this journal holds the first ``edits`` edits of the journal in ``source``, and
        that the edits after them may be made with other settings (a study that changes one setting
        from a point of a long run on, without redoing the edits before it)."""
        self.forked = {"from": str(source), "edits": int(edits)}
        if self.path is not None:
            self._write_head()

    def append(self, entry: JournalEntry) -> None:
        """Record ``entry``: its factor file durable first, then its line (see the module docstring)."""
        entry.u = entry.u.detach().to("cpu", torch.float32).contiguous()
        entry.lam = entry.lam.detach().to("cpu", torch.float32).contiguous()
        if entry.key is not None:
            entry.key = entry.key.detach().to("cpu", torch.float32).contiguous()
        if self.path is not None:
            self._writable()
            write_safetensors(self._factor_file(entry.edit_id), entry.tensors(), {})
            lines = self.path / "edits.jsonl"
            new = not lines.exists()
            with open(lines, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry.header(), sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
                self._ends.append(os.fstat(f.fileno()).st_size)
            if new:
                fsync_dir(self.path)
        self.entries.append(entry)
        self._requests += _starts_edit(entry)
        self._next_id = max(self._next_id, entry.edit_id + 1)

    def remove(self, edit_ids: Iterable[int]) -> List[JournalEntry]:
        """Drop entries (their factor files too); returns the removed entries.

        The last entries (an undo of the latest edits) go in time independent of the journal's
        length: the log is cut back to where their lines began. Any other set rewrites the log."""
        ids = set(edit_ids)
        if self.path is not None:
            self._writable()
        cut = len(self.entries)
        while cut > 0 and self.entries[cut - 1].edit_id in ids:
            cut -= 1
        tail = len(self.entries) - cut == len(ids)
        if tail:
            removed, self.entries = self.entries[cut:], self.entries[:cut]
        else:
            removed = [e for e in self.entries if e.edit_id in ids]
            self.entries = [e for e in self.entries if e.edit_id not in ids]
        self._requests -= sum(_starts_edit(e) for e in removed)
        if self.path is not None:
            self._write_head()  # keeps next_id past the removed ids
            if tail:
                self._truncate_lines(cut)
            else:
                self._rewrite_lines()
            for e in removed:
                self._factor_file(e.edit_id).unlink(missing_ok=True)
        return removed

    def _truncate_lines(self, keep: int) -> None:
        """Cut edits.jsonl back to its first ``keep`` entries' lines (durable before returning)."""
        assert self.path is not None
        size = self._ends[keep - 1] if keep else 0
        with open(self.path / "edits.jsonl", "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
        del self._ends[keep:]

    @property
    def next_id(self) -> int:
        return self._next_id  # kept past every id recorded or loaded: O(1) per edit in long runs

    @property
    def edit_count(self) -> int:
        """Edits (requests) in the journal, a spread edit's layers counting once: O(1), for the
        bookkeeping of long runs (``len(journal)`` counts entries, one per layer written)."""
        return self._requests

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)


def check_base(adapter: ModelAdapter, base_digests: Dict[int, str], where: str) -> None:
    """Raise unless every recorded layer of ``adapter``'s model still has its base weight."""
    for layer, digest in sorted(base_digests.items()):
        have = weight_digest(adapter.weight(layer))
        if have != digest:
            raise ValueError(
                f"{where}: layer {layer}'s weight is not the base weight the edits were made on "
                f"(digest {have}, expected {digest}); load the unedited base model"
            )


def save_edits(entries: Iterable[JournalEntry], base_digests: Dict[int, str], path: PathLike,
               model_type: str = "") -> Path:
    """Write the factors of ``entries`` to one safetensors file with their JSON metadata."""
    entries = list(entries)
    tensors: Dict[str, Tensor] = {}
    for e in entries:
        for name, t in e.tensors().items():
            tensors[f"{e.edit_id}.{name}"] = t
    meta = {
        "format": EDITS_FORMAT,
        "model_type": model_type,
        "base_digests": json.dumps({str(k): v for k, v in sorted(base_digests.items())}),
        "edits": json.dumps([e.header() for e in entries]),
    }
    return write_safetensors(path, tensors, meta)


def read_edits(path: PathLike) -> tuple[List[JournalEntry], Dict[int, str]]:
    """Entries and base digests from a file written by :func:`save_edits`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != EDITS_FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {EDITS_FORMAT!r}")
            heads = json.loads(meta["edits"])
            names = set(f.keys())
            entries = [
                JournalEntry(int(h["edit_id"]), int(h["layer"]), f.get_tensor(f"{h['edit_id']}.u"),
                             f.get_tensor(f"{h['edit_id']}.lam"), h.get("request", {}), h.get("record", {}),
                             key=f.get_tensor(f"{h['edit_id']}.key") if f"{h['edit_id']}.key" in names else None)
                for h in heads
            ]
            digests = {int(k): str(v) for k, v in json.loads(meta["base_digests"]).items()}
            for h, e in zip(heads, entries):
                e.verify(h.get("factors_sha256"), f"edits file {str(path)!r}")
    except ValueError as exc:
        if str(exc).startswith("edits file"):
            raise

        raise ValueError(f"edits: {str(path)!r} is not a fastrome edits file ({exc})") from None
    except Exception as exc:  # safetensors and json raise several types for damaged files
        raise ValueError(f"edits: {str(path)!r} cannot be read ({exc})") from None
    return entries, digests


def part_record(entry: JournalEntry) -> Dict[str, Any]:
    """The record of ``entry``'s own layer: a spread edit's part, else the edit's record."""
    part = entry.record.get("part")
    return entry.record["parts"][part] if part is not None else entry.record


def edit_groups(entries: List[JournalEntry]) -> List[List[JournalEntry]]:
    """Journal entries by edit: a spread edit's parts (consecutive, ``part`` 0, 1, ...) together."""
    out: List[List[JournalEntry]] = []
    for e in entries:
        part = e.record.get("part")
        if part is not None and part > 0 and out and out[-1][0].record.get("edit_id") == e.record.get("edit_id"):
            out[-1].append(e)
        else:
            out.append([e])
    return out


def group_complete(group: List[JournalEntry]) -> bool:
    """Whether an edit's entries (one group of :func:`edit_groups`) hold all its parts: a crash while
    a spread edit was being journaled leaves only its first ones."""
    parts = group[0].record.get("parts") or []
    return group[0].record.get("part") is None or (group[0].record.get("part") == 0 and len(group) == len(parts))


def _starts_edit(entry: JournalEntry) -> int:
    """1 for an entry that starts an edit: a one-layer edit, or part 0 of a spread edit."""
    return int(entry.record.get("part") in (None, 0))
