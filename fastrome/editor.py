"""The editing engine: :class:`Editor` keeps templates, statistics, solvers and master copies across
calls, so sequential edits share them; :func:`edit` is the one-call form.

This module orchestrates an edit (requests → keys → values → write); the parts it drives live
beside it: one layer's guarded write in :mod:`fastrome.writer`, the edit shared among several
layers in :mod:`fastrome.spread`, and base weights, masters, checkpoints, undo and resume in
:mod:`fastrome.history` (over the on-disk :mod:`fastrome.journal`).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from fastrome import guards
from fastrome.adapter import ModelAdapter
from fastrome.cache import cache_dir as resolve_cache_dir
from fastrome.config import EditConfig, make_config
from fastrome.fingerprint import fingerprint
from fastrome.guards import EditRefused
from fastrome.history import EditHistory, edit_memory
from fastrome.journal import Journal, JournalEntry
from fastrome.keys import capture_at, capture_residual
from fastrome.memory import EditMemory, base_precision
from fastrome.peft_adapter import save_peft_adapter
from fastrome.pretrained import read_pretrained, write_pretrained
from fastrome.progress import show_progress
from fastrome.projection import AlphaEditSolver, ProjectedSolver, null_space_projector
from fastrome.prompts import edit_prompts, subject_prompt
from fastrome.refresh import read_memory_rows
from fastrome.report import EditRecord, EditReport
from fastrome.requests import EditRequest, RequestError, RequestLike, parse_requests
from fastrome.solver import CovarianceSolver
from fastrome.spread import apply_spread, spread_layers
from fastrome.stats import SecondMoment, layer_fingerprint, load_or_compute
from fastrome.stats.npz import load_rome_npz
from fastrome.stats.source import CorpusLike, StatsLike, check_sources, corpus_source, is_identity, statistics_file_kind
from fastrome.templates import load_or_generate
from fastrome.tokens import pad_id, target_ids
from fastrome.values import ValueResult, check_request, frozen, optimize_values
from fastrome.writer import LayerWriter

MERGED_EDITS = "fastrome_edits"  # the subfolder of a save_merged folder that holds its edits


@dataclass
class EditArtifacts:
    """The vectors of one edit (fp32), kept for inspection: ``W' = W + lam uᵀ`` when applied."""

    layer: int
    mode: str
    k_mean: Tensor  # (d_in,) mean key over the context templates (k̄)
    k_plain: Tensor  # (d_in,) key of the unprefixed prompt (k_u)
    v_init: Tensor  # (d_out,)
    v_star: Tensor  # (d_out,)
    u: Tensor  # (d_in,)
    lam: Tensor  # (d_out,)
    denom: float
    applied: bool


def _now() -> float:
    return time.perf_counter()


class Editor:
    """Edits facts in ``model`` in place with rank-one updates of one MLP down projection.

    Args:
        model: a Hugging Face causal LM (Llama, Mistral, Qwen2, GPT-2, GPT-J, ...).
        tokenizer: its tokenizer.
        stats: key statistics for the solve ``u = C⁻¹k``:
            ``None`` (default): computed from ``corpus`` and cached on disk;
            a ``.safetensors`` file written by ``fastrome stats``; a ROME / EasyEdit ``.npz``
            second moment (``mom2`` and ``count``; the model cannot be verified); a :class:`SecondMoment`;
            a (d, d) tensor ``C``; a :class:`CovarianceSolver`; ``"identity"`` to opt out
            (``C = I``, warned about and recorded in every report); or a ``{layer: ...}`` mapping
            of those (a ``None`` entry is computed).
        corpus: the text statistics are computed from when ``stats`` leaves them to compute:
            ``None`` / ``"bundled"`` (the bundled Wikipedia text), a ``.txt``/``.jsonl``/``.parquet``
            file, token ids, a folder of them or ``hf:NAME`` (see :func:`fastrome.open_corpus`).
        config: an :class:`EditConfig`; keyword ``overrides`` (``layer=``, ``mode=``, ``policy=``,
            ...) replace its fields.
        module_template: path of the edited module with ``{}`` for the layer (discovered if None).
        cache_dir: cache root (default ``$FASTROME_CACHE`` or ``~/.cache/fastrome``); False: no disk cache.
        progress: progress bars (default: when stderr is a terminal).
        journal: folder of an on-disk :class:`~fastrome.journal.Journal`. Every applied edit is
            recorded there as it happens; if the folder already holds edits (a run that was
            interrupted), they are replayed onto ``model`` — which must be the unedited base model —
            bit for bit, and editing continues after them. Without it the journal is kept in memory.
            The editor is the folder's only writer until :meth:`close` (or the end of a ``with``
            block); another one gets :class:`~fastrome.locking.FolderBusy` naming the folder.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        stats: StatsLike = None,
        corpus: CorpusLike = None,
        config: Optional[EditConfig] = None,
        module_template: Optional[str] = None,
        cache_dir: Union[str, "os.PathLike[str]", None, bool] = None,
        progress: Optional[bool] = None,
        journal: Union[str, "os.PathLike[str]", None] = None,
        **overrides: Any,
    ):
        self.adapter = ModelAdapter(model, module_template)
        if tokenizer is None or not callable(tokenizer):
            raise ValueError(f"tokenizer: expected a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        cfg = make_config(config, **overrides).resolve(self.adapter.family)
        if cfg.layer is None:
            cfg.layer = self.adapter.default_layer()
        self.adapter.check_layer(cfg.layer, "config.layer" if "layer" not in overrides else "layer")
        cfg.spread = cfg.spread_at(cfg.layer)  # fixed here, so the records and the journal say how many
        self.config = cfg
        self.cache_root: Optional[Path] = None if cache_dir is False else resolve_cache_dir(
            None if cache_dir is True else cache_dir
        )
        self.progress = progress
        check_sources(stats, corpus)
        self._stats_arg = stats
        self._corpus = corpus_source(corpus)
        self._solvers: Dict[int, CovarianceSolver] = {}
        self._projectors: Dict[int, Tuple[Tensor, int]] = {}  # null-space projectors until their solver is built
        self._stats_source: Dict[int, str] = {}
        self._templates: Optional[List[str]] = None
        self.history: List[EditRecord] = []
        self.last: Optional[EditArtifacts] = None
        self.journal = Journal(journal)
        # what undo, replay and resume need beside the journal (``self.history`` is this session's records)
        self._past = EditHistory(self.adapter, self.journal, cfg, self._solvers)
        self._past.key_reader = self._read_memory_rows
        self._writer = LayerWriter(self.adapter, cfg, self._solvers, self._past)
        try:
            if len(self.journal):
                self._past.resume()
        except BaseException:
            self.journal.close()
            raise

    def close(self) -> None:
        """Release the journal's folder (another editor may then open it); no more edits after this."""
        self.journal.close()

    def __enter__(self) -> "Editor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- shared state ---------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    @property
    def layer(self) -> int:
        return int(self.config.layer)

    def templates(self) -> List[str]:
        """The context templates (sampled from the model on first use, then cached)."""
        if self._templates is None and self.journal.templates is not None:
            # a resumed run keeps the templates it started with (sampled from the unedited model)
            self._templates = list(self.journal.templates)
        if self._templates is None:
            model_fp = fingerprint(self.adapter.config, self.model.named_parameters())
            self._templates = load_or_generate(
                self.model, self.tokenizer, model_fp, self.config.template_lengths,
                self.config.template_seed, self.cache_root,
            )
            self.journal.note_templates(self._templates)
        return self._templates

    def _read_memory_rows(self, groups: List[List[JournalEntry]]) -> Dict[int, List[Tensor]]:
        """The memory rows of these journal edits read from the model now (:mod:`fastrome.refresh`)."""
        return read_memory_rows(self.adapter, self.tokenizer, self.templates(), self.config.mode,
                                self.config.memory_dual_keys, groups)

    def use_templates(self, templates: Sequence[str]) -> None:
        """Edit with these context templates instead of ones sampled from the model.

        Args:
            templates: strings with one ``{}`` slot each for the prompt (``"{}"`` alone is the bare
                prompt). Refused while the journal holds edits made with other templates.
        """
        items = None if isinstance(templates, str) else list(templates)
        if not items or any(not isinstance(t, str) or t.count("{}") != 1 for t in items):
            raise ValueError(f"templates: expected a non-empty sequence of strings with one '{{}}' slot each, "
                             f"got {templates!r}")
        if len(self.journal) and self.journal.templates is not None and list(self.journal.templates) != items:
            raise ValueError(f"templates: the journal holds {len(self.journal)} edits made with other templates "
                             f"({len(self.journal.templates)} of them); undo them or use a new journal first")
        self._templates = items
        self.journal.note_templates(items)

    def solver(self, layer: Optional[int] = None) -> CovarianceSolver:
        """The solver of ``layer`` (built from the statistics on first use)."""
        layer = self.layer if layer is None else self.adapter.check_layer(layer)
        self._ensure_solvers([layer])
        return self._solvers[layer]

    def stats_source(self, layer: Optional[int] = None) -> str:
        layer = self.layer if layer is None else layer
        self._ensure_solvers([layer])
        solver = self._solvers[layer]
        held = edit_memory(self._solvers, layer)
        memory = f"; edit memory β {held.beta:g}" if held is not None else ""
        if held is not None and held.base.inverse.dtype == torch.float32:
            memory += " (statistics' inverse kept in fp32)"
        if solver.identity:
            return self._stats_source[layer] + memory
        return f"{self._stats_source[layer]}; ridge {solver.ridge:.3g}, cond₁ {solver.condition:.3g}{memory}"

    def _ensure_solvers(self, layers: Iterable[int]) -> None:
        missing = sorted({int(layer) for layer in layers} - set(self._solvers))
        if not missing:
            return
        arg = self._stats_arg
        per_layer: Dict[int, Any] = {}
        for layer in missing:
            if isinstance(arg, Mapping):
                if layer not in arg:
                    spread = self.config.spread
                    why = (f"; an edit is shared among {spread} layers ending at its own (config.spread = {spread}), "
                           "so each of them needs statistics: give them, or spread=1 for one-layer edits"
                           if spread > 1 else "")
                    raise ValueError(f"stats: no entry for layer {layer} (entries for {sorted(arg)}){why}")
                per_layer[layer] = arg[layer]
            else:
                per_layer[layer] = arg
        to_compute = [layer for layer, spec in per_layer.items() if spec is None]
        if to_compute and not isinstance(arg, Mapping):
            # One pass over the corpus serves any number of layers: the editor's own spread group joins
            # it, or asking for the edit layer's solver alone (stats_source()) costs a second pass at
            # the first spread edit.
            group = [layer for layer in spread_layers(self.layer, self.config.spread)
                     if layer >= 0 and layer not in self._solvers and layer not in per_layer]
            to_compute += group
            missing = sorted(set(missing) | set(group))
        for layer, spec in per_layer.items():
            if spec is not None:
                # a statistics file is checked against the unedited model it was computed on
                with self._past.unedited():
                    self._solvers[layer], self._stats_source[layer] = self._solver_from(layer, spec)
        cfg = self.config
        if to_compute:  # computed together, in one pass over the corpus
            with self._past.unedited():
                found = load_or_compute(
                    self.adapter, self.tokenizer, to_compute, corpus=self._corpus, tokens=cfg.stats_tokens,
                    max_len=cfg.stats_max_len, dtype=getattr(torch, cfg.stats_dtype),
                    batch_tokens=cfg.stats_batch_tokens, packing=cfg.stats_packing, cache_root=self.cache_root,
                    progress=self.progress,
                )
            for layer in sorted(found):
                sm = found.pop(layer)  # each layer's sum is freed once its solver is built
                self._stats_source[layer] = sm.describe()
                self._solvers[layer] = self._solver_from_moment(layer, sm, consume=True)
                del sm
        try:
            self._wrap_solvers(missing)
        except BaseException:
            for layer in missing:  # all or none: a later call builds them again, not half-wrapped
                self._solvers.pop(layer, None)
                self._projectors.pop(layer, None)
            raise

    def _wrap_solvers(self, layers: List[int]) -> None:
        """Put the edit memory and the null-space projection (as configured) around new solvers."""
        cfg = self.config
        if cfg.null_space > 0:
            lacking = [layer for layer in layers if layer not in self._projectors]
            if lacking:
                raise ValueError(f"config.null_space: the projection needs the statistics matrix C of layer "
                                 f"{lacking[0]}, and stats gave {self._stats_source[lacking[0]]!r}")
        for layer in layers:
            if cfg.memory_beta > 0:
                memory = EditMemory(self._solvers[layer], cfg.memory_beta, cfg.memory_refactor_every)
                memory.rebuild(self._past.memory_keys(layer))
                self._solvers[layer] = memory
            if cfg.null_space > 0:
                projector, rank = self._projectors.pop(layer)
                alpha = cfg.update_form == "alphaedit"
                form = AlphaEditSolver if alpha else ProjectedSolver
                self._solvers[layer] = form(self._solvers[layer], projector, rank, cfg.null_space)
                self._stats_source[layer] += (f"; null-space projection rank {rank} of {projector.shape[0]}"
                                              + (" (AlphaEdit's closed form)" if alpha else ""))

    def _solver_from_moment(self, layer: int, sm: SecondMoment, consume: bool = False) -> CovarianceSolver:
        """``consume``: ``sm`` is this editor's own (computed or read here), so its sum may become the
        solver's scratch."""
        if self.config.null_space > 0:  # C = sum / count is a d×d tensor of its own: only when needed
            self._note_projector(layer, sm.matrix)
        return sm.solver(self.config.ridge + self.config.norm_alpha, device=self.adapter.device(layer),
                         precision=self._base_precision(sm.dim), consume=consume)

    def _base_precision(self, dim: int) -> str:
        """Under an edit memory the statistics' inverse only restarts it: at large d it is kept in fp32."""
        return base_precision(dim) if self.config.memory_beta > 0 else "float64"

    def _note_projector(self, layer: int, C: Tensor) -> None:
        """With null-space projection on, its projector from ``C`` (kept until the solver is wrapped)."""
        if self.config.null_space > 0:
            try:
                self._projectors[layer] = null_space_projector(C, self.config.null_space)
            except ValueError as exc:
                why = str(exc).removeprefix("threshold: ")
                raise ValueError(f"config.null_space at layer {layer}: {why}") from None

    def _solver_from(self, layer: int, spec: Any) -> Tuple[CovarianceSolver, str]:
        d, device = self.adapter.d_in, self.adapter.device(layer)
        if is_identity(spec):
            warnings.warn(
                f"statistics switched off at layer {layer} (stats={spec!r}): edits use C = I, which ignores "
                "the key distribution and damages unrelated facts more; every report records this",
                stacklevel=4,
            )
            return CovarianceSolver.identity(d, device=device), "identity (statistics switched off)"
        if isinstance(spec, CovarianceSolver):
            if spec.dim != d:
                raise ValueError(f"stats: solver has dimension {spec.dim}, layer {layer} keys have {d}")
            return spec, repr(spec)
        if isinstance(spec, Tensor):
            if spec.shape != (d, d):
                raise ValueError(f"stats: expected a ({d}, {d}) matrix C for layer {layer}, got {tuple(spec.shape)}")
            self._note_projector(layer, spec)
            return CovarianceSolver(spec, relative_ridge=self.config.ridge + self.config.norm_alpha, device=device,
                                    precision=self._base_precision(d), source=f"stats[{layer}] (user-supplied C)"), \
                "user-supplied C"
        if isinstance(spec, (str, os.PathLike)) and statistics_file_kind(spec) == "rome-npz":
            sm = load_rome_npz(spec, layer=layer)
            sm.check(layer=layer, dim=d, model_fingerprint=None, source=str(spec))
            return (self._solver_from_moment(layer, sm.to_device(device), consume=True),
                    f"{sm.describe()} ({spec}, unverified model)")
        if isinstance(spec, (str, os.PathLike)):
            sm = SecondMoment.load(spec)
            sm.check(layer=layer, dim=d, model_fingerprint=layer_fingerprint(self.adapter, layer), source=str(spec))
            return self._solver_from_moment(layer, sm.to_device(device), consume=True), f"{sm.describe()} ({spec})"
        if isinstance(spec, SecondMoment):
            spec.check(layer=layer, dim=d, model_fingerprint=layer_fingerprint(self.adapter, layer))
            return self._solver_from_moment(layer, spec.to_device(device)), spec.describe()
        raise ValueError(f"stats: unsupported value {type(spec).__name__} for layer {layer}")

    # -- editing --------------------------------------------------------------------------------
    def _prepare(self, reqs: List[EditRequest]) -> List[int]:
        """Per-request layer, after checking every request tokenises and every layer it would write
        holds finite weights; raises before any change."""
        layers = []
        for i, req in enumerate(reqs):
            try:
                layer = self.layer if req.layer is None else self.adapter.check_layer(req.layer,
                                                                                      f"requests[{i}].layer")
            except ValueError as exc:
                raise RequestError(str(exc)) from None
            if layer - self.config.spread + 1 < 0:
                raise RequestError(
                    f"config.spread: {self.config.spread} layers ending at layer {layer} (requests[{i}]) would "
                    "start below layer 0"
                )
            try:
                subject_prompt(self.tokenizer, req.prompt, req.subject)
                if not target_ids(self.tokenizer, req.text, req.target_text()):
                    raise ValueError("target tokenises to nothing")
            except ValueError as exc:
                raise RequestError(f"requests[{i}]: {exc}") from None
            layers.append(layer)
        written = {part for at in layers for part in spread_layers(at, self.config.spread)}
        for part in sorted(written - set(self._past.base)):
            self._check_finite(part)
        return layers

    def _check_finite(self, layer: int) -> None:
        """Refuse a layer whose weight already holds NaN or ±inf: every edit of it would fail late
        (or crash template sampling), and nothing written on top of it could be trusted. Layers
        this editor has written are guarded by every write, so each is checked once."""
        weight = self.adapter.weight(layer)
        bad = int((~torch.isfinite(weight.detach())).sum())
        if bad:
            name = self.adapter.module_template.format(layer) + ".weight"
            raise ValueError(
                f"model: {name} holds {bad} non-finite entries (NaN or inf) of {weight.numel()}; "
                "refusing to edit a damaged layer (reload the model)"
            )

    def _check_rows(self, reqs: List[EditRequest], templates: List[str]) -> None:
        """Every request under every context template tokenises: checked for the whole call before
        the first write, so a bad request late in a call cannot leave earlier ones half-done."""
        for i, req in enumerate(reqs):
            try:
                check_request(self.tokenizer, req, templates)
            except ValueError as exc:
                raise RequestError(f"requests[{i}]: {exc}") from None

    def edit(
        self, requests: Union[RequestLike, Iterable[RequestLike]], *, batch_size: int = 1
    ) -> EditReport:
        """Apply ``requests`` one after another; returns their report.

        ``batch_size > 1`` is the batched mode: the values of up to that many consecutive requests
        (at the same layer) are optimised together against the current weights, then their rank-one
        updates are applied one after another, each numerator recomputed against the weights as the
        earlier updates left them. Strict sequential editing (``batch_size=1``) optimises every value
        against the weights after all earlier edits.

        Under ``policy='raise'`` a refused edit raises :class:`EditRefused` (its ``report`` holds the
        edits of this call so far); the refused edit has written nothing, earlier ones stay applied.

        Raises:
            RequestError: a request cannot be edited (checked for every request of the call, under
                every context template, before the first write: nothing has been written).
            ValueError: other bad input (statistics, a damaged layer), also before any write.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise RequestError(f"batch_size: expected a positive int, got {batch_size!r}")
        reqs = parse_requests(requests)
        layers = self._prepare(reqs)
        report = EditReport()
        t0 = _now()
        self._ensure_solvers(part for layer in layers for part in spread_layers(layer, self.config.spread))
        stats_seconds = _now() - t0
        t0 = _now()
        templates = self.templates()
        template_seconds = _now() - t0
        self._check_rows(reqs, templates)

        from tqdm.auto import tqdm

        show = show_progress(self.progress)
        bar = tqdm(total=len(reqs), desc="editing", unit="edit", disable=not show)
        try:
            for chunk in _chunks(layers, batch_size):
                recs = []
                for i in chunk:
                    req, layer = reqs[i], layers[i]
                    rec = EditRecord(
                        index=len(self.history) + len(recs), case_id=req.case_id, prompt=req.text,
                        subject=req.subject, target_new=req.target_new, layer=layer, mode=self.config.mode,
                        stats="; ".join(self.stats_source(part) for part in spread_layers(layer, self.config.spread)),
                        settings=self.config.lifelong_settings(),
                    )
                    if i == 0:
                        rec.seconds["stats"] = stats_seconds
                        rec.seconds["templates"] = template_seconds
                    recs.append(rec)
                found = self._keys_and_values([reqs[i] for i in chunk], layers[chunk[0]], templates, recs, bar)
                for i, rec, (keys, vr, residual) in zip(chunk, recs, found):
                    if residual is None:
                        self._apply(reqs[i], layers[i], keys, vr, rec)
                    else:
                        self._apply_spread(reqs[i], layers[i], templates, vr, residual, rec)
                    if rec.applied:
                        refreshed = self._past.refresh_memory()
                        if refreshed:
                            rec.seconds["refresh"] = refreshed
                    report.records.append(rec)
                    self.history.append(rec)
                    bar.update(1)
                    bar.set_postfix(status=rec.status, loss=f"{rec.losses[-1]:.3f}" if rec.losses else "-")
                    if rec.status == "refused" and self.config.policy == "raise":
                        raise EditRefused(
                            f"edit of {reqs[i].subject!r} → {reqs[i].target_new!r} refused: "
                            f"{'; '.join(rec.reasons)} (weights unchanged; policy='skip' goes on, "
                            "policy='force' overrides)",
                            report,
                        )
        finally:
            bar.close()
        return report

    def _keys_and_values(
        self, reqs: List[EditRequest], layer: int, templates: List[str], recs: List[EditRecord], bar: Any
    ) -> List[Tuple[Optional[Tensor], ValueResult, Optional[Tensor]]]:
        """Keys of every request and their values, optimised together; time is shared equally.
        A spread edit also gets the residual stream after ``layer`` at its prompts (its target
        is that plus δ), read before any of these requests is written."""
        cfg, adapter = self.config, self.adapter
        with frozen(self.model):
            t0 = _now()
            # A spread edit reads its keys layer by layer when it is applied; it needs the stream instead.
            keys, residuals = [], []
            for req in reqs:
                prompts = edit_prompts(self.tokenizer, templates, req)
                if cfg.spread > 1:
                    keys.append(None)
                    residuals.append(capture_residual(adapter, layer, prompts, pad_id(self.tokenizer)))
                else:
                    keys.append(capture_at(adapter, layer, prompts, pad_id(self.tokenizer))[0])
                    residuals.append(None)
            key_seconds = (_now() - t0) / len(reqs)
            t0 = _now()
            label = reqs[0].subject[:20] if len(reqs) == 1 else f"{len(reqs)} requests"
            vrs = optimize_values(
                adapter, self.tokenizer, layer, reqs, templates, cfg,
                on_step=lambda it, loss: bar.set_postfix(subject=label, step=it, loss=f"{loss:.3f}"),
                fast=cfg.v_fast,
            )
            value_seconds = (_now() - t0) / len(reqs)
        for rec, vr in zip(recs, vrs):
            rec.seconds["keys"], rec.seconds["values"] = key_seconds, value_seconds
            rec.losses, rec.steps, rec.early_stopped = list(vr.losses), vr.steps, vr.early_stopped
            rec.stop_reason = vr.stop_reason
            rec.delta_norm, rec.v_init_norm = float(vr.delta.norm()), float(vr.v_init.norm())
            rec.target_prob = vr.final_target_prob
            rec.batch = len(reqs)
        return list(zip(keys, vrs, residuals))

    def _controlled_value(self, layer: int, keys: Tensor, vr: ValueResult, rec: EditRecord) -> Tuple[Tensor, str]:
        """``v*`` after value-norm control, and why the edit is refused ("" when it is not).

        The reference is the unedited layer's output at the edit's key, ``‖W₀k̄ + b‖``: for a
        one-layer edit the keys come from the layers below, which are unedited, so this is the
        original model's own value at the subject. Anchoring to it keeps the written values from
        growing edit after edit (the norm feedback of long runs)."""
        cfg, v_star = self.config, vr.v_star
        rec.v_star_norm = float(v_star.norm())
        if cfg.value_norm == "off":
            return v_star, ""
        base = self._past.remember_base(layer).to(torch.float32)
        key = keys.mean(0) if cfg.mode == "consistent" else keys[0]
        ref = torch.mv(base, key.to(base.device, torch.float32))
        bias = self.adapter.bias(layer)
        if bias is not None:
            ref = ref + bias.detach().to(ref.device, torch.float32)
        rec.value_norm_ref = float(ref.norm())
        limit, norm = cfg.value_norm_factor * rec.value_norm_ref, rec.v_star_norm
        if cfg.value_norm == "refuse":
            return v_star, (f"‖v*‖ = {norm:.4g} > {cfg.value_norm_factor:g} × the unedited value's norm "
                            f"{rec.value_norm_ref:.4g}" if norm > limit else "")
        if cfg.value_norm == "anchor" or norm > limit:
            rec.value_scale = limit / norm if norm > 0 else 1.0
            v_star = v_star * rec.value_scale
            rec.v_star_norm = float(v_star.norm())
        return v_star, ""

    def _apply(self, req: EditRequest, layer: int, keys: Tensor, vr: ValueResult, rec: EditRecord) -> None:
        """Solve against the current weights, check the guards, write, journal."""
        cfg = self.config
        t0 = _now()
        v_star, too_large = self._controlled_value(layer, keys, vr, rec)
        plan, total, verdict = self._writer.check(layer, keys, vr, v_star=v_star)
        if too_large:
            verdict = guards.Verdict(False, verdict.reasons + [too_large], verdict.floor)
        rec.denominator, rec.denominator_rel, rec.denominator_floor = plan.denom, plan.denom_rel, verdict.floor
        rec.update_norm, rec.update_ratio = plan.update_norm, plan.update_ratio
        rec.interference = plan.interference
        rec.total_update_ratio = total
        rec.reasons = list(verdict.reasons)
        rec.seconds["solve"] = _now() - t0

        t0 = _now()
        if verdict.ok or cfg.policy == "force":
            if self._writer.write(layer, plan, verdict):
                rec.status = "applied" if verdict.ok else "forced"
            else:
                rec.status = "refused"
                rec.reasons = rec.reasons or ["the write refused non-finite values"]
        else:
            rec.status = "refused"
        rec.seconds["write"] = _now() - t0
        if rec.applied:
            rec.edit_id = self.journal.next_id
            rec.seconds["memory"] = self._past.record(
                JournalEntry(rec.edit_id, layer, plan.u, plan.lam, req.to_dict(), rec.to_dict(), key=plan.solved_key),
                total,
            )
        self.last = EditArtifacts(
            layer=layer, mode=cfg.mode, k_mean=keys.mean(0), k_plain=keys[0], v_init=vr.v_init, v_star=v_star,
            u=plan.u, lam=plan.lam, denom=plan.denom, applied=rec.applied,
        )

    def _apply_spread(self, req: EditRequest, layer: int, templates: List[str], vr: ValueResult, residual: Tensor,
                      rec: EditRecord) -> None:
        """A spread edit (:func:`fastrome.spread.apply_spread`), kept as ``self.last``."""
        part_layer, keys, plan = apply_spread(self._writer, self._past, req, layer,
                                              edit_prompts(self.tokenizer, templates, req), pad_id(self.tokenizer),
                                              vr, residual, rec)
        self.last = EditArtifacts(
            layer=part_layer, mode=self.config.mode, k_mean=keys.mean(0), k_plain=keys[0], v_init=vr.v_init,
            v_star=vr.v_star, u=plan.u, lam=plan.lam, denom=plan.denom, applied=rec.applied,
        )

    # -- journal, undo, export ------------------------------------------------------------------
    def done_case_ids(self) -> List[Any]:
        """``case_id`` of every edit in the journal, in order (to skip them when resuming a run)."""
        return [group[0].request.get("case_id") for group in self._past.edits()]

    def applied_records(self) -> List[Dict[str, Any]]:
        """The record (``EditRecord.to_dict()``) of every edit in the journal, in order; one per
        request, also for spread edits that wrote several layers."""
        return [group[0].record for group in self._past.edits()]

    def drift(self) -> Dict[int, float]:
        """``{layer: ‖W − W₀‖_F / ‖W₀‖_F}`` for every layer this editor has written (W₀ its weight
        before the first edit, computed in fp64): how far all edits so far, taken together, have
        moved each matrix. Independent rank-one edits add up roughly like a random walk, so this
        grows like √n times a single edit's ‖ΔW‖/‖W‖ rather than like their sum."""
        return self._past.drift()

    def undo(self, edit_ids: Union[int, Iterable[int]]) -> List[JournalEntry]:
        """Remove edits by id: each touched layer is rebuilt from its base weight and the remaining
        edits, so the weights equal those of a run in which these edits' factors were never added.

        Raises:
            ValueError: an id that is not in the journal (nothing is changed then).
        """
        return self._undone(self._past.undo(edit_ids))

    def undo_last(self, n: int = 1) -> List[JournalEntry]:
        """Undo the last ``n`` edits (requests); the weights are bit-for-bit those from before them."""
        return self._undone(self._past.undo_last(n))

    def _undone(self, removed: List[JournalEntry]) -> List[JournalEntry]:
        """Mark this session's records of the ``removed`` entries undone; returns them."""
        gone = {e.edit_id for e in removed}
        for rec in self.history:
            if rec.edit_id in gone:
                rec.status = "undone"
        return removed

    def save_pretrained(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """Write the applied edits as a folder (``edits.safetensors``, ``fastrome.json`` with the base
        weights' digests, config, statistics provenance and templates, and a README.md model card
        listing every edited fact); :meth:`from_pretrained` replays it onto the base model."""
        from fastrome import __version__

        layers = sorted({e.layer for e in self.journal})
        return write_pretrained(
            path, self.journal.entries, self.journal.base_digests, config=self.config,
            module_template=self.adapter.module_template, model_type=self.adapter.model_type,
            base_model=getattr(getattr(self.model, "config", None), "_name_or_path", None) or None,
            templates=self._templates or self.journal.templates,
            stats={layer: self._stats_source.get(layer, "not loaded in this session") for layer in layers},
            requests=[group[0].request for group in self._past.edits()], version=__version__,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        tokenizer: Any,
        path: Union[str, "os.PathLike[str]"],
        *,
        stats: StatsLike = None,
        corpus: CorpusLike = None,
        journal: Union[str, "os.PathLike[str]", None] = None,
        cache_dir: Union[str, "os.PathLike[str]", None, bool] = None,
        progress: Optional[bool] = None,
        **overrides: Any,
    ) -> "Editor":
        """An editor holding the edits saved by :meth:`save_pretrained` in ``path``, replayed onto
        ``model`` (the unedited base: its weights are checked against the saved digests before
        anything is written; the edited weights come back bit for bit). The editor keeps the saved
        config and context templates, can undo any of the edits and keeps editing; ``journal`` (a
        new folder) records them and what follows on disk. ``overrides`` change non-lifelong fields
        (a lifelong setting that differs from the saved edits' is refused)."""
        saved = read_pretrained(path)
        editor = cls(model, tokenizer, stats=stats, corpus=corpus, config=saved.config,
                     module_template=saved.module_template, journal=journal, cache_dir=cache_dir, progress=progress,
                     **overrides)
        try:
            editor._past.adopt(saved, f"from_pretrained {str(path)!r}")
            if saved.templates:
                editor._templates = list(saved.templates)
        except BaseException:
            editor.journal.close()
            raise
        return editor

    def save_peft(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """Write the applied edits as a PEFT LoRA adapter folder (``adapter_config.json``,
        ``adapter_model.safetensors``; rank = edits per module, scale 1) for the unedited base
        model: ``peft.PeftModel.from_pretrained(base, path)`` gives this editor's model. See
        :mod:`fastrome.peft_adapter` for what is lost."""
        name = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        return save_peft_adapter(self.journal.entries, self.adapter.module_template, path,
                                 base_model_name_or_path=name, base_digests=self.journal.base_digests)

    def save_merged(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """Write the edited model itself as a plain transformers folder (``save_pretrained``,
        safetensors) with its tokenizer, loadable without fastrome; the edits that made it go
        beside, in ``path/fastrome_edits`` (the :meth:`save_pretrained` folder: which facts, on
        which base)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(path)
        self.save_pretrained(path / MERGED_EDITS)
        return path


def _chunks(layers: List[int], size: int) -> List[List[int]]:
    """Indices of consecutive requests, at most ``size`` per chunk and one layer per chunk."""
    out: List[List[int]] = []
    for i, layer in enumerate(layers):
        if out and len(out[-1]) < size and layers[out[-1][0]] == layer:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def edit(
    model: nn.Module,
    requests: Union[RequestLike, Iterable[RequestLike]],
    *,
    tokenizer: Any = None,
    stats: StatsLike = None,
    corpus: CorpusLike = None,
    config: Optional[EditConfig] = None,
    **overrides: Any,
) -> EditReport:
    """Edit ``model`` in place so each request's prompt continues with its new target.

    Args:
        model: a Hugging Face causal LM.
        requests: one request or a list (CounterFact dicts, flat dicts or :class:`EditRequest`).
        tokenizer: the model's tokenizer (inferred for models loaded by :func:`fastrome.load_model`).
        stats: key statistics, see :class:`Editor`.
        corpus: text to compute them from when ``stats`` is None, see :class:`Editor`.
        config: an :class:`EditConfig`; ``overrides`` replace its fields (``layer=5, mode="original"``).

    Returns:
        An :class:`EditReport` with one record per request.
    """
    from fastrome.models import infer_tokenizer

    if tokenizer is None:
        tokenizer = infer_tokenizer(model)
    return Editor(model, tokenizer, stats=stats, corpus=corpus, config=config, **overrides).edit(requests)
