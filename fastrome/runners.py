"""How the value optimisation evaluates the model: logits at the loss's read positions as a function
of the per-request vectors ``δ`` added to the edited MLP's output at each row's subject-last token.

Two runners with the same interface:

* :class:`FullRunner` runs the whole model at every step, ``δ`` injected by a forward hook. It works
  for every architecture the adapter knows.
* :class:`SuffixRunner` (the fast path, Llama-style decoders) uses that ``δ`` changes nothing before
  the subject's last token and nothing below the edited layer. One forward pass without gradients
  records, for every row, the hidden state after the edited layer and the attention keys/values of
  the tokens before the subject's last token in every later layer. Each step then runs only the
  layers above the edited one, only on the row's tokens from the subject's last token on (attending
  to the recorded prefix), and the head only at the read positions. The result equals the full
  model's up to floating-point rounding; it is checked against the full model the first time it
  is used on a model, and any mismatch falls back to :class:`FullRunner` with a warning.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fastrome.adapter import ModelAdapter
from fastrome.keys import input_device
from fastrome.tokens import right_pad

# Decoder families whose blocks take (hidden, attention_mask, position_ids, cache, position_embeddings)
# and whose embedding output is the first block's input unscaled (Gemma scales it, so it is absent).
SUFFIX_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "smollm3"})
SUPPORTED_ATTENTION = frozenset({"eager", "sdpa"})
# Largest |fast − full| / max|full| logit difference accepted by the first-use check (fp32 rounding
# differences of the reordered computation are ~1e-6; bf16 ones ~1e-2).
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
DEFAULT_TOLERANCE = 5e-2
# The decoder-layer keyword that carries the key/value cache, newest name first: transformers 5.24
# renamed ``past_key_values`` to ``cache`` (older releases used ``past_key_value``). A name the layer
# only swallows in ``**kwargs`` reaches no attention module, so only named parameters count.
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")

_CHECKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


@dataclass
class RowBatch:
    """The rows of one optimisation: token ids, subject-last column, owning request, read positions.

    ``reads`` are ``(row, column)`` pairs in the unpadded sequences; every read column of a row is at
    or after the row's ``subject_last``.
    """

    seqs: List[List[int]]
    subject_last: List[int]
    group: List[int]
    reads: List[Tuple[int, int]]
    n_groups: int

    def rows_of(self, groups: Sequence[int]) -> List[int]:
        keep = set(groups)
        return [r for r, g in enumerate(self.group) if g in keep]

    def subset(self, groups: Sequence[int]) -> "RowBatch":
        """The rows of ``groups`` only (group ids and read order kept, rows renumbered)."""
        rows = self.rows_of(groups)
        new_row = {r: i for i, r in enumerate(rows)}
        return RowBatch(
            [self.seqs[r] for r in rows], [self.subject_last[r] for r in rows], [self.group[r] for r in rows],
            [(new_row[r], c) for r, c in self.reads if r in new_row], self.n_groups,
        )


class FullRunner:
    """Whole-model forward at every step; ``δ`` added by a forward hook on the edited module."""

    name = "full"

    def __init__(self, adapter: ModelAdapter, layer: int, batch: RowBatch, pad: int):
        self.adapter, self.layer, self.batch, self.pad = adapter, layer, batch, pad
        device = input_device(adapter)
        self.ids, self.mask = right_pad(batch.seqs, pad, device)
        out_device = adapter.device(layer)
        self.rows = torch.arange(len(batch.seqs), device=out_device)
        self.cols = torch.tensor(batch.subject_last, device=out_device)
        self.group = torch.tensor(batch.group, device=out_device)

    @torch.no_grad()
    def start(self) -> Tensor:
        """v_init (n_groups, d_out) fp32: the edited module's output at each request's first row."""
        store: Dict[str, Tensor] = {}

        def grab(mod, args, output):
            store["v"] = output[self.rows, self.cols].float()

        handle = self.adapter.module(self.layer).register_forward_hook(grab)
        try:
            self._run()
        finally:
            handle.remove()
        return store["v"][_first_rows(self.batch)].clone()

    def logits(self, delta: Tensor) -> Tensor:
        """Logits (len(reads), vocab) fp32 with ``delta`` (n_groups, d_out) fp32 added."""

        def add(mod, args, output):
            shifted = (output[self.rows, self.cols].float() + delta[self.group]).to(output.dtype)
            return output.index_put((self.rows, self.cols), shifted)

        handle = self.adapter.module(self.layer).register_forward_hook(add)
        try:
            return self._run()
        finally:
            handle.remove()

    def _run(self) -> Tensor:
        return self.adapter.logits_at(self.ids, self.mask, self.batch.reads)

    def select(self, groups: Sequence[int]) -> "FullRunner":
        """A runner over the rows of ``groups`` only (requests that are done leave the batch)."""
        return FullRunner(self.adapter, self.layer, self.batch.subset(groups), self.pad)


class _RecordingCache:
    """Stands in for a key/value cache in a full pass: remembers each layer's keys and values."""

    def __init__(self) -> None:
        self.kv: Dict[int, Tuple[Tensor, Tensor]] = {}

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Tuple[Tensor, Tensor]:
        self.kv[layer_idx] = (key, value)
        return key, value


class _PrefixCache:
    """Stands in for a key/value cache in a suffix pass: prepends the recorded prefix of each layer."""

    def __init__(self, prefix: Dict[int, Tuple[Tensor, Tensor]]) -> None:
        self.prefix = prefix

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Tuple[Tensor, Tensor]:
        pk, pv = self.prefix[layer_idx]
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)


def _first_rows(batch: RowBatch) -> List[int]:
    """Each request's first row (its unprefixed prompt, where v_init is read)."""
    return [batch.group.index(g) for g in range(batch.n_groups)]


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, 1, q, k) additive mask from a boolean one: 0 where allowed, the dtype's minimum elsewhere
    (not −inf, so fully masked padding queries stay finite)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


def suffix_support(adapter: ModelAdapter) -> Optional[str]:
    """None when :class:`SuffixRunner` can run on this model, else why not."""
    if adapter.model_type not in SUFFIX_MODEL_TYPES:
        return f"model type {adapter.model_type!r} is not one of {sorted(SUFFIX_MODEL_TYPES)}"
    if not adapter.plain_head:
        return "the model's logits are not a plain linear head of the final hidden state"
    base = adapter.base_model()
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, name):
            return f"the base model has no {name!r}"
    if adapter.module_template != f"{_layers_path(adapter)}.{{}}.mlp.down_proj":
        return f"the edited module {adapter.module_template!r} is not the blocks' mlp.down_proj"
    impl = getattr(adapter.config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        return f"attention implementation {impl!r} takes no explicit mask (supported: {sorted(SUPPORTED_ATTENTION)})"
    if cache_keyword(base.layers[0]) is None:
        return f"the decoder layer's forward takes none of the cache keywords {list(CACHE_KEYWORDS)}"
    return None


def cache_keyword(block: nn.Module) -> Optional[str]:
    """The keyword under which ``block.forward`` takes its key/value cache, or None."""
    try:
        params = inspect.signature(block.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_KEYWORDS if name in params), None)


def _layers_path(adapter: ModelAdapter) -> str:
    for name, mod in adapter.model.named_modules():
        if mod is adapter.base_model().layers:
            return name
    return ""


class SuffixRunner:
    """The fast path: see the module docstring. Build with :func:`make_runner`."""

    name = "suffix"

    def __init__(self, adapter: ModelAdapter, layer: int, batch: RowBatch, pad: int):
        self.adapter, self.layer, self.batch = adapter, layer, batch
        base = adapter.base_model()
        self.blocks = base.layers
        self.norm, self.rotary, self.embed = base.norm, base.rotary_emb, base.embed_tokens
        self.head = adapter.output_embeddings()
        self.cache_kw = cache_keyword(self.blocks[0])
        self.pad = pad

    def _block(self, j: int, h: Tensor, mask: Tensor, pos: Tensor, cache: Any, pe: Tuple[Tensor, Tensor]) -> Tensor:
        out = self.blocks[j](
            h, attention_mask=mask, position_ids=pos, position_embeddings=pe, **{self.cache_kw: cache}
        )
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def start(self) -> Tensor:
        """One full pass without gradients; keeps what every later step needs. Returns v_init
        (n_groups, d_out) fp32."""
        b = self.batch
        device = self.embed.weight.device
        ids, real = right_pad(b.seqs, self.pad, device)
        n, t = ids.shape
        lengths = real.sum(1)
        pos = torch.arange(t, device=device).expand(n, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        h = self.embed(ids)
        allowed = causal[None] & real.bool()[:, None, :]
        mask = _additive(allowed[:, None], h.dtype)
        pe = self.rotary(h, pos)
        rec = _RecordingCache()
        rows = torch.arange(n, device=device)
        c = torch.tensor(b.subject_last, device=device)
        store: Dict[str, Tensor] = {}

        def grab(mod, args, output):
            store["v"] = output[rows.to(output.device), c.to(output.device)].float()

        handle = self.adapter.module(self.layer).register_forward_hook(grab)
        try:
            for j in range(len(self.blocks)):
                h = self._block(j, h.to(self._device(j)), mask.to(self._device(j)), pos.to(self._device(j)), rec,
                                tuple(x.to(self._device(j)) for x in pe))
                if j == self.layer:
                    h_layer = h
        finally:
            handle.remove()
        self.full_hidden = h  # kept for the first-use check only

        # Suffix layout: row r's tokens c_r .. e_r (e_r its last read) at columns 0 .. e_r − c_r.
        last_read = [0] * n
        for r, col in b.reads:
            last_read[r] = max(last_read[r], col)
        s_len = torch.tensor([e - s + 1 for e, s in zip(last_read, b.subject_last)], device=device)
        s_max = int(s_len.max())
        p_max = int(c.max())
        sfx = torch.arange(s_max, device=device)
        src = (c[:, None] + sfx[None]).clamp(max=(lengths - 1)[:, None])
        h_dev = h_layer.device
        self.h_suffix = h_layer.gather(1, src.to(h_dev)[..., None].expand(-1, -1, h_layer.shape[-1])).detach()
        self.pos = (c[:, None] + sfx[None])
        # Prefix: row r's tokens 0 .. c_r − 1 left-padded into columns p_max − c_r .. p_max − 1.
        pcol = torch.arange(p_max, device=device)
        prefix_src = (pcol[None] - (p_max - c)[:, None]).clamp(min=0)
        prefix_real = pcol[None] >= (p_max - c)[:, None]
        self.prefix: Dict[int, Tuple[Tensor, Tensor]] = {}
        wanted = [self.blocks[j].self_attn.layer_idx for j in range(self.layer + 1, len(self.blocks))]
        missing = [i for i in wanted if i not in rec.kv]
        if missing:
            raise RuntimeError(
                f"the decoder layers took the cache as {self.cache_kw!r} but layers {missing} never wrote to it"
            )
        for j in range(self.layer + 1, len(self.blocks)):
            k, v = rec.kv[self.blocks[j].self_attn.layer_idx]
            idx = prefix_src.to(k.device)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            self.prefix[self.blocks[j].self_attn.layer_idx] = (k.gather(2, idx), v.gather(2, idx))
        suffix_ok = sfx[None, :] < s_len[:, None]
        allowed = torch.cat(
            [prefix_real[:, None, :].expand(n, s_max, p_max),
             torch.ones(s_max, s_max, dtype=torch.bool, device=device).tril()[None] & suffix_ok[:, None, :]],
            dim=2,
        )
        self.mask = _additive(allowed[:, None], h_layer.dtype)
        self.read_rows = torch.tensor([r for r, _ in b.reads], device=device)
        self.read_cols = torch.tensor([col - b.subject_last[r] for r, col in b.reads], device=device)
        self.group = torch.tensor(b.group, device=h_dev)
        self.full_reads = (torch.tensor([r for r, _ in b.reads], device=device),
                           torch.tensor([col for _, col in b.reads], device=device))
        self.ids, self.real = ids, real
        return store["v"][_first_rows(b)].clone()

    def _device(self, j: int) -> torch.device:
        return self.blocks[j].input_layernorm.weight.device if hasattr(self.blocks[j], "input_layernorm") else \
            next(self.blocks[j].parameters()).device

    def _head(self, hidden: Tensor) -> Tensor:
        hidden = self.norm(hidden.to(self.norm.weight.device))
        return self.head(hidden.to(self.head.weight.device, self.head.weight.dtype)).float()

    def logits(self, delta: Tensor) -> Tensor:
        """Logits (len(reads), vocab) fp32 with ``delta`` (n_groups, d_out) fp32 added."""
        h = self.h_suffix
        first = (h[:, 0].float() + delta.to(h.device)[self.group]).to(h.dtype)
        h = torch.cat([first[:, None], h[:, 1:]], dim=1)
        cache = _PrefixCache(self.prefix)
        pe = None
        for j in range(self.layer + 1, len(self.blocks)):
            dev = self._device(j)
            h, pos = h.to(dev), self.pos.to(dev)
            if pe is None or pe[0].device != dev:
                pe = tuple(x.to(dev) for x in self.rotary(h, pos))
            h = self._block(j, h, self.mask.to(dev), pos, cache, pe)
        picked = h[self.read_rows.to(h.device), self.read_cols.to(h.device)]
        return self._head(picked)

    def select(self, groups: Sequence[int]) -> "SuffixRunner":
        """A runner over the rows of ``groups`` only, sharing what :meth:`start` recorded."""
        rows = self.batch.rows_of(groups)
        new = object.__new__(SuffixRunner)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k != "full_hidden"})
        new.batch = self.batch.subset(groups)
        idx = torch.tensor(rows, device=self.h_suffix.device)
        new.h_suffix, new.pos, new.mask = self.h_suffix[idx], self.pos[idx.to(self.pos.device)], \
            self.mask[idx.to(self.mask.device)]
        new.prefix = {j: (k[idx.to(k.device)], v[idx.to(v.device)]) for j, (k, v) in self.prefix.items()}
        new.group = self.group[idx.to(self.group.device)]
        device = self.read_rows.device
        new.read_rows = torch.tensor([r for r, _ in new.batch.reads], device=device)
        new.read_cols = torch.tensor([c - new.batch.subject_last[r] for r, c in new.batch.reads], device=device)
        return new

    @torch.no_grad()
    def check(self) -> Optional[str]:
        """Compare the suffix pass at δ = 0 (and the manual full pass) with the model's own forward
        at the read positions; None when they agree, else the discrepancy."""
        zero = torch.zeros(self.batch.n_groups, self.adapter.d_out, dtype=torch.float32)
        fast = self.logits(zero)
        manual = self._head(self.full_hidden[self.full_reads[0].to(self.full_hidden.device),
                                             self.full_reads[1].to(self.full_hidden.device)])
        ref = self.adapter.logits_at(self.ids.to(input_device(self.adapter)), self.real.to(input_device(self.adapter)),
                                     self.batch.reads)
        tol = CHECK_TOLERANCE.get(self.h_suffix.dtype, DEFAULT_TOLERANCE)
        scale = float(ref.abs().max()) or 1.0
        for name, got in (("suffix pass", fast), ("layer-by-layer pass", manual)):
            err = float((got - ref).abs().max()) / scale
            if not math.isfinite(err) or err > tol:
                return f"the {name} differs from the model's forward by {err:.2e} (relative; tolerance {tol:g})"
        return None


def make_runner(
    adapter: ModelAdapter, layer: int, batch: RowBatch, pad: int, fast: bool = True
) -> Tuple[Any, Tensor]:
    """The runner for this optimisation, started: ``(runner, v_init)``.

    ``fast=True`` uses :class:`SuffixRunner` where :func:`suffix_support` allows it. Its first use
    on a model is checked against the model's own forward; a mismatch, or any exception on the way
    (the fast path leans on decoder-layer internals that a library release can change), warns once
    and falls back to :class:`FullRunner` for that model from then on.
    """
    reason = suffix_support(adapter) if fast else "disabled"
    model = adapter.model
    if reason is None and _CHECKED.get(model, True):
        if model in _CHECKED:
            runner = SuffixRunner(adapter, layer, batch, pad)
            return runner, runner.start()
        try:
            runner = SuffixRunner(adapter, layer, batch, pad)
            v_init = runner.start()
            problem = runner.check()
        except Exception as exc:  # noqa: BLE001 - whatever broke, the whole-model path still works
            problem = f"it raised {type(exc).__name__}: {exc}"
        _CHECKED[model] = problem is None
        if problem is None:
            del runner.full_hidden
            return runner, v_init
        warnings.warn(
            f"fast value optimisation disabled for this {type(model).__name__}: {problem}; using whole-model passes",
            stacklevel=3,
        )
    runner = FullRunner(adapter, layer, batch, pad)
    return runner, runner.start()


def forget_checks(model: Optional[nn.Module] = None) -> None:
    """Forget first-use check results (for one model, or all)."""
    if model is None:
        _CHECKED.clear()
    else:
        _CHECKED.pop(model, None)


def row_batch(groups: Sequence[Tuple[Sequence[Sequence[int]], Sequence[int], Sequence[Sequence[int]]]]) -> RowBatch:
    """Assemble a :class:`RowBatch` from per-request ``(seqs, subject_last, reads_per_row)``."""
    seqs: List[List[int]] = []
    last: List[int] = []
    group: List[int] = []
    reads: List[Tuple[int, int]] = []
    for g, (g_seqs, g_last, g_reads) in enumerate(groups):
        for s, c, cols in zip(g_seqs, g_last, g_reads):
            r = len(seqs)
            seqs.append(list(s))
            last.append(int(c))
            group.append(g)
            for col in cols:
                if not c <= col < len(s):
                    raise ValueError(f"read column {col} of row {r} is outside [{c}, {len(s)})")
                reads.append((r, int(col)))
    return RowBatch(seqs, last, group, reads, len(groups))
