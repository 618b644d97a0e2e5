"""Key statistics: the uncentered second moment ``C = E[kkᵀ]`` of down-projection inputs.

One forward pass over a text corpus feeds every requested layer: hooks hand each layer's keys
(every non-pad token) to :func:`fastrome.ops.second_moment_accumulate`, and the pass stops after
the deepest requested layer. Documents are tokenised, capped at ``max_len`` tokens, and batched
up to ``batch_tokens`` padded tokens; the total stops exactly at the token budget.

Results are :class:`SecondMoment` objects (the fp64 sum and the token count) saved as safetensors
with JSON metadata: model fingerprint, layer, corpus id, token budget, tokens used, max length,
dtype. The cache file name is derived from all of these, and a file is validated when loaded:
statistics are never silently used for a different model, layer or corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from safetensors import safe_open
from torch import Tensor

from fastrome import ops
from fastrome.adapter import ModelAdapter
from fastrome.cache import write_safetensors
from fastrome.corpus import Corpus, open_corpus
from fastrome.fingerprint import fingerprint
from fastrome.keys import StopForward, input_device
from fastrome.tokens import encode, pad_id, right_pad

FORMAT = "fastrome.second_moment.v1"
MIN_TOKENS = 100_000
TOKENS_PER_DIM = 20


def default_token_budget(d_in: int) -> int:
    """Default number of tokens: at least ``20·d_in`` (a full d×d estimate needs ≥ 10·d) and 100k."""
    return max(MIN_TOKENS, TOKENS_PER_DIM * int(d_in))


def layer_fingerprint(adapter: ModelAdapter, layer: int) -> str:
    """Fingerprint of everything that determines the keys at ``layer`` (not its down projection,
    so statistics stay valid while that layer is edited)."""
    return fingerprint(adapter.config, adapter.layer_parameters(layer), extra=adapter.module_template)


@dataclass
class SecondMoment:
    """Sum of ``k kᵀ`` over ``count`` keys at one layer, with where it came from.

    Attributes:
        layer: layer index.
        sum: (d, d) float64 (or float32) symmetric sum.
        count: number of keys (tokens) summed.
        meta: provenance (model fingerprint, corpus id, budget, max length, dtype, ...).
    """

    layer: int
    sum: Tensor
    count: int
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    @property
    def matrix(self) -> Tensor:
        """``C = sum / count`` in the sum's dtype."""
        if self.count <= 0:
            raise ValueError("statistics hold no tokens")
        return self.sum / self.count

    def to_device(self, device: Union[str, torch.device]) -> "SecondMoment":
        return SecondMoment(layer=self.layer, sum=self.sum.to(device), count=self.count, meta=dict(self.meta))

    def describe(self) -> str:
        corpus = self.meta.get("corpus", "?")
        return f"layer {self.layer}: {self.count:,} tokens of {corpus}"

    def save(self, path: Union[str, os.PathLike]) -> Path:
        meta = {k: json.dumps(v) for k, v in self.meta.items()}
        meta.update(format=FORMAT, layer=str(self.layer), count=str(self.count))
        return write_safetensors(path, {"sum": self.sum}, meta)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SecondMoment":
        """Read a file written by :meth:`save` (safetensors only, nothing is unpickled)."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if "sum" not in f.keys():
                    raise ValueError("no 'sum' tensor")
                total = f.get_tensor("sum")
        except Exception as exc:  # safetensors raises several types for damaged files
            raise ValueError(f"stats: {str(path)!r} is not a readable fastrome statistics file ({exc})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"stats: {str(path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
        try:
            layer, count = int(meta.pop("layer")), int(meta.pop("count"))
            meta.pop("format")
            info = {k: json.loads(v) for k, v in meta.items()}
        except (KeyError, ValueError) as exc:
            raise ValueError(f"stats: {str(path)!r} has damaged metadata ({exc})") from None
        if total.dim() != 2 or total.shape[0] != total.shape[1] or count <= 0:
            raise ValueError(f"stats: {str(path)!r} holds a {tuple(total.shape)} sum over {count} tokens")
        if not torch.isfinite(total).all():
            raise ValueError(f"stats: {str(path)!r} contains NaN or Inf")
        return cls(layer=layer, sum=total, count=count, meta=info)

    def check(self, *, layer: int, dim: int, model_fingerprint: Optional[str], source: str = "stats") -> None:
        """Raise ``ValueError`` if these statistics do not belong to (model, layer)."""
        if self.layer != layer:
            raise ValueError(f"{source}: statistics are for layer {self.layer}, but layer {layer} is edited")
        if self.dim != dim:
            raise ValueError(f"{source}: statistics have dimension {self.dim}, the layer's keys have {dim}")
        theirs = self.meta.get("model_fingerprint")
        if model_fingerprint is not None and theirs is not None and theirs != model_fingerprint:
            raise ValueError(
                f"{source}: statistics were computed for model {theirs}, not this model ({model_fingerprint}); "
                "recompute them (fastrome stats) or load the matching model"
            )


def _batches(
    tokenizer: Any, documents: Iterable[str], budget: int, max_len: int, batch_tokens: int
) -> Iterator[List[List[int]]]:
    """Token-id lists, capped at ``max_len`` and grouped so a padded batch has ≤ batch_tokens tokens;
    the last document is cut so the total is exactly ``budget`` (unless the corpus runs out)."""
    left = budget
    batch: List[List[int]] = []
    width = 0
    for text in documents:
        if left <= 0:
            break
        ids = encode(tokenizer, text)[:max_len][:left]
        if len(ids) < 2:
            continue
        left -= len(ids)
        if batch and (len(batch) + 1) * max(width, len(ids)) > batch_tokens:
            yield batch
            batch, width = [], 0
        batch.append(ids)
        width = max(width, len(ids))
    if batch:
        yield batch


def compute(
    adapter: ModelAdapter,
    tokenizer: Any,
    layers: Sequence[int],
    *,
    corpus: Union[Corpus, str, os.PathLike, None] = None,
    tokens: Optional[int] = None,
    max_len: int = 1024,
    dtype: torch.dtype = torch.float64,
    batch_tokens: int = 8192,
    progress: Optional[bool] = None,
) -> Dict[int, SecondMoment]:
    """Second moments of the keys at ``layers`` from one pass over ``corpus``.

    Args:
        layers: layer indices (any order, no duplicates needed).
        corpus: a :class:`~fastrome.corpus.Corpus`, a path, or None for the bundled corpus.
        tokens: token budget (default :func:`default_token_budget`).
        max_len: cap on each document's length in tokens.
        dtype: accumulator dtype (float64 or float32).
        batch_tokens: padded tokens per forward batch.
        progress: show a progress bar (default: when stderr is a terminal).
    """
    layers = sorted({adapter.check_layer(int(layer), "layers") for layer in layers})
    if not layers:
        raise ValueError("layers: empty")
    if not isinstance(corpus, Corpus):
        corpus = open_corpus(corpus)
    budget = int(tokens) if tokens is not None else default_token_budget(adapter.d_in)
    if budget < 1:
        raise ValueError(f"tokens: expected a positive budget, got {tokens!r}")
    model = adapter.model
    accs = {
        layer: torch.zeros(adapter.d_in, adapter.d_in, dtype=dtype, device=adapter.device(layer)) for layer in layers
    }
    deepest = layers[-1]
    current_mask: Dict[str, Tensor] = {}

    def make_hook(layer: int):
        def hook(module, args, output):
            x = args[0]
            x = x.reshape(-1, x.shape[-1])
            ops.second_moment_accumulate(accs[layer], x, current_mask["flat"].to(x.device))
            if layer == deepest:
                raise StopForward
        return hook

    from tqdm.auto import tqdm

    show = progress if progress is not None else _stderr_is_tty()
    bar = tqdm(total=budget, unit="tok", unit_scale=True, desc=f"statistics (layers {layers})", disable=not show)
    handles = [adapter.module(layer).register_forward_hook(make_hook(layer)) for layer in layers]
    count = 0
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _batches(tokenizer, corpus.documents(), budget, max_len, batch_tokens):
                ids, mask = right_pad(batch, pad_id(tokenizer), input_device(adapter))
                current_mask["flat"] = mask.reshape(-1).bool()
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                except StopForward:
                    pass
                n = int(mask.sum())
                count += n
                bar.update(n)
    finally:
        for h in handles:
            h.remove()
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - t0
    if count < budget:
        warnings.warn(
            f"corpus {corpus.id} ran out after {count:,} of the {budget:,} tokens requested", stacklevel=2
        )
    if count < adapter.d_in:
        warnings.warn(
            f"only {count:,} tokens for a {adapter.d_in}-dimensional second moment: C is singular and "
            "only the ridge keeps the solve defined; use a larger corpus or budget",
            stacklevel=2,
        )
    out = {}
    for layer in layers:
        meta = {
            "model_fingerprint": layer_fingerprint(adapter, layer),
            "model_type": adapter.model_type,
            "module": adapter.module_name(layer),
            "corpus": corpus.id,
            "corpus_description": corpus.description,
            "tokens_requested": budget,
            "tokens": count,
            "max_len": max_len,
            "dtype": str(dtype).replace("torch.", ""),
            "seconds": round(seconds, 3),
        }
        out[layer] = SecondMoment(layer=layer, sum=accs[layer], count=count, meta=meta)
    return out


def _stderr_is_tty() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def cache_file(root: Path, model_fp: str, layer: int, corpus_id: str, tokens: int, max_len: int, dtype: str) -> Path:
    key = hashlib.sha256(f"{model_fp}|{layer}|{corpus_id}|{tokens}|{max_len}|{dtype}".encode()).hexdigest()[:16]
    return Path(root) / "stats" / f"{model_fp}_L{layer}_{key}.safetensors"


def load_or_compute(
    adapter: ModelAdapter,
    tokenizer: Any,
    layers: Sequence[int],
    *,
    corpus: Union[Corpus, str, os.PathLike, None] = None,
    tokens: Optional[int] = None,
    max_len: int = 1024,
    dtype: torch.dtype = torch.float64,
    batch_tokens: int = 8192,
    cache_root: Optional[Path] = None,
    progress: Optional[bool] = None,
) -> Dict[int, SecondMoment]:
    """Cached statistics for ``layers``: loaded when a valid cache file exists, else computed (all
    missing layers in one pass) and saved. A damaged or mismatching cache file is recomputed."""
    if not isinstance(corpus, Corpus):
        corpus = open_corpus(corpus)
    budget = int(tokens) if tokens is not None else default_token_budget(adapter.d_in)
    dname = str(dtype).replace("torch.", "")
    found: Dict[int, SecondMoment] = {}
    missing: List[int] = []
    paths: Dict[int, Path] = {}
    for layer in sorted(set(layers)):
        fp = layer_fingerprint(adapter, layer)
        if cache_root is None:
            missing.append(layer)
            continue
        path = cache_file(cache_root, fp, layer, corpus.id, budget, max_len, dname)
        paths[layer] = path
        if path.is_file():
            try:
                sm = SecondMoment.load(path)
                sm.check(layer=layer, dim=adapter.d_in, model_fingerprint=fp, source=str(path))
                if sm.meta.get("corpus") != corpus.id or sm.meta.get("tokens_requested") != budget:
                    raise ValueError("corpus or budget differ from the file name's")
                found[layer] = sm.to_device(adapter.device(layer))
                continue
            except ValueError as exc:
                warnings.warn(f"ignoring cached statistics {path}: {exc}; recomputing", stacklevel=2)
        missing.append(layer)
    if missing:
        computed = compute(
            adapter, tokenizer, missing, corpus=corpus, tokens=budget, max_len=max_len, dtype=dtype,
            batch_tokens=batch_tokens, progress=progress,
        )
        for layer, sm in computed.items():
            if layer in paths:
                sm.save(paths[layer])
                sm.meta["path"] = str(paths[layer])
            found[layer] = sm
    return found
