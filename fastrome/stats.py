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
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

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


def is_statistics_file(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` is a safetensors file written by :meth:`SecondMoment.save`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # unreadable or not safetensors at all
        return False


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


PACKING = ("truncate", "pack")
SORT_WINDOW = 256  # sequences sorted by length together before batching
CHECKPOINT_FORMAT = "fastrome.stats_checkpoint.v1"


def _sequences(corpus: Corpus, tokenizer: Any, budget: int, max_len: int, packing: str) -> Iterator[List[int]]:
    """The token sequences one pass reads, in a fixed order, exactly ``budget`` tokens in total
    (fewer only when the corpus runs out).

    ``truncate`` (the published setup): every document is its own sequence, cut at ``max_len``.
    ``pack``: documents are concatenated, each followed by the tokenizer's EOS when it has one, and
    cut into ``max_len`` windows, so no token is dropped and batches carry no padding.
    """
    docs = corpus.token_ids(lambda text: encode(tokenizer, text))
    left = budget
    if packing == "truncate":
        for ids in docs:
            if left <= 0:
                return
            ids = ids[:max_len][:left]
            if len(ids) < 2:  # one token has no context: nothing a prompt would look like
                continue
            left -= len(ids)
            yield ids
        return
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    buf: List[int] = []
    for ids in docs:
        buf.extend(ids)
        if isinstance(eos, int):
            buf.append(eos)
        while len(buf) >= max_len and left > 0:
            chunk, buf = buf[: min(max_len, left)], buf[max_len:]
            left -= len(chunk)
            if len(chunk) >= 2:
                yield chunk
        if left <= 0:
            return
    if left > 0 and len(buf) >= 2:
        yield buf[:left]


def _batches(
    sequences: Iterable[List[int]], batch_tokens: int, sort_window: int = SORT_WINDOW
) -> Iterator[List[List[int]]]:
    """Group sequences so a right-padded batch holds at most ``batch_tokens`` tokens (a longer
    sequence travels alone). Within each window of ``sort_window`` sequences, longest first, so
    sequences of similar length share a batch and little compute goes to padding; the order is
    still a fixed function of the corpus."""

    def group(items: List[List[int]]) -> Iterator[List[List[int]]]:
        batch: List[List[int]] = []
        width = 0
        for ids in items:
            if batch and (len(batch) + 1) * max(width, len(ids)) > batch_tokens:
                yield batch
                batch, width = [], 0
            batch.append(ids)
            width = max(width, len(ids))
        if batch:
            yield batch

    window: List[List[int]] = []
    for ids in sequences:
        window.append(ids)
        if len(window) >= max(1, sort_window):
            yield from group(sorted(window, key=len, reverse=True) if sort_window > 1 else window)
            window = []
    if window:
        yield from group(sorted(window, key=len, reverse=True) if sort_window > 1 else window)


def run_key(
    adapter: ModelAdapter,
    layers: Sequence[int],
    corpus_id: str,
    budget: int,
    max_len: int,
    dtype: str,
    packing: str,
    batch_tokens: int,
) -> str:
    """Identity of one statistics pass: a checkpoint is resumed only by the pass that wrote it."""
    parts = [layer_fingerprint(adapter, layer) + f"@{layer}" for layer in sorted(layers)]
    parts += [corpus_id, str(budget), str(max_len), dtype, packing, str(batch_tokens)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@dataclass
class _Progress:
    """Where a pass stands: the next global batch, and tokens summed by this process so far."""

    next_batch: int = 0
    count: int = 0
    seen: int = 0  # tokens of all batches passed, whichever process summed them (for the bar)
    seconds: float = 0.0


def _save_checkpoint(path: Path, key: str, accs: Dict[int, Tensor], state: _Progress) -> None:
    meta = {
        "format": CHECKPOINT_FORMAT,
        "key": key,
        "next_batch": str(state.next_batch),
        "count": str(state.count),
        "seen": str(state.seen),
        "seconds": repr(state.seconds),
    }
    write_safetensors(path, {f"sum.{layer}": acc for layer, acc in accs.items()}, meta)


def _load_checkpoint(path: Path, key: str, accs: Dict[int, Tensor]) -> Optional[_Progress]:
    """Restore ``accs`` from ``path`` if it is a valid checkpoint of this pass; None otherwise
    (with a warning when a file was there but could not be used)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != CHECKPOINT_FORMAT or meta.get("key") != key:
                raise ValueError("it belongs to a different pass (model, layers, corpus or settings differ)")
            loaded = {}
            for layer, acc in accs.items():
                t = f.get_tensor(f"sum.{layer}")
                if t.shape != acc.shape or t.dtype != acc.dtype:
                    raise ValueError(f"layer {layer} sum is {tuple(t.shape)} {t.dtype}")
                if not torch.isfinite(t).all():
                    raise ValueError(f"layer {layer} sum contains NaN or Inf")
                loaded[layer] = t
            state = _Progress(int(meta["next_batch"]), int(meta["count"]), int(meta["seen"]), float(meta["seconds"]))
    except Exception as exc:  # a damaged file raises several types; none of them may stop the run
        warnings.warn(f"not resuming from {path}: {exc}; starting over", stacklevel=3)
        return None
    for layer, acc in accs.items():
        acc.copy_(loaded[layer])
    return state


def _dist() -> Tuple[int, int, Any]:
    """(rank, world size, torch.distributed or None) of the running process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


def _vocab_size(adapter: ModelAdapter) -> Optional[int]:
    emb = adapter.model.get_input_embeddings()
    return int(emb.weight.shape[0]) if emb is not None else None


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
    packing: str = "truncate",
    progress: Optional[bool] = None,
    checkpoint: Union[str, os.PathLike, None] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = True,
    remove_checkpoint: bool = True,
) -> Dict[int, SecondMoment]:
    """Second moments of the keys at ``layers`` from one pass over ``corpus``.

    The forward pass stops after the deepest requested layer; each layer's keys go straight to
    :func:`fastrome.ops.second_moment_accumulate` (fp32 tiles, ``dtype`` running sum), so memory
    is bounded by one batch's activations. The model runs in its own dtype (bf16 models forward
    in bf16).

    Under ``torch.distributed`` (e.g. launched by ``torchrun``) global batch ``i`` is computed by
    rank ``i mod world_size``, the partial sums and counts are all-reduced at the end, and every
    rank returns the same result, equal to a single process's up to summation order.

    Args:
        layers: layer indices (any order; duplicates are merged).
        corpus: a :class:`~fastrome.corpus.Corpus`, a source for :func:`~fastrome.corpus.open_corpus`,
            or None for the bundled corpus. Pre-tokenized corpora are read as token ids.
        tokens: token budget (default :func:`default_token_budget`).
        max_len: longest sequence in tokens, whatever the model's context size.
        dtype: running-sum dtype, float64 (default) or float32.
        batch_tokens: padded tokens per forward batch.
        packing: ``"truncate"`` (each document its own sequence) or ``"pack"`` (see :func:`_sequences`).
        progress: progress bar with tokens/s and ETA (default: when stderr is a terminal; rank 0 only).
        checkpoint: file for partial sums (a ``.rankR`` suffix is added per process when distributed).
            None: no checkpoints.
        checkpoint_every: tokens between checkpoints (default: a tenth of the budget).
        resume: continue from ``checkpoint`` when it holds a valid checkpoint of this same pass; the
            result is then bit-for-bit the one an uninterrupted pass gives.
        remove_checkpoint: delete the checkpoint once the pass is complete.

    Returns:
        ``{layer: SecondMoment}`` with ``meta`` recording the model fingerprint, corpus, tokens
        requested and used, sequences, packing, max length, dtype, seconds and world size.
    """
    layers = sorted({adapter.check_layer(int(layer), "layers") for layer in layers})
    if not layers:
        raise ValueError("layers: empty")
    if packing not in PACKING:
        raise ValueError(f"packing: expected one of {PACKING}, got {packing!r}")
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len: expected an int >= 2, got {max_len!r}")
    if not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens: expected a positive int, got {batch_tokens!r}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype: expected torch.float64 or torch.float32, got {dtype!r}")
    if not isinstance(corpus, Corpus):
        corpus = open_corpus(corpus)
    budget = int(tokens) if tokens is not None else default_token_budget(adapter.d_in)
    if budget < 1:
        raise ValueError(f"tokens: expected a positive budget, got {tokens!r}")
    if corpus.pretokenized:
        vocab, top = _vocab_size(adapter), corpus.max_token_id
        if vocab is not None and top is not None and top >= vocab:
            raise ValueError(f"corpus: {corpus.id} holds token id {top}, but the model's vocabulary has {vocab} ids")
    elif tokenizer is None:
        raise ValueError(f"tokenizer: required to read the text corpus {corpus.id}")
    every = int(checkpoint_every) if checkpoint_every is not None else max(1, budget // 10)
    if every < 1:
        raise ValueError(f"checkpoint_every: expected a positive number of tokens, got {checkpoint_every!r}")
    rank, world, dist = _dist()
    dname = str(dtype).replace("torch.", "")
    key = run_key(adapter, layers, corpus.id, budget, max_len, dname, packing, batch_tokens)
    ckpt: Optional[Path] = None
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if world > 1:
            ckpt = ckpt.with_name(f"{ckpt.name}.rank{rank}of{world}")
    model = adapter.model
    accs = {
        layer: torch.zeros(adapter.d_in, adapter.d_in, dtype=dtype, device=adapter.device(layer)) for layer in layers
    }
    state = (_load_checkpoint(ckpt, key, accs) if (ckpt is not None and resume) else None) or _Progress()
    resumed_from = state.seen
    deepest = layers[-1]
    current: Dict[str, Optional[Tensor]] = {}

    def make_hook(layer: int):
        def hook(module, args, output):
            x = args[0]
            x = x.reshape(-1, x.shape[-1])
            rows = current["rows"]
            if rows is not None:  # padding: sum only the real tokens' rows rather than zeroed ones
                x = x.index_select(0, rows.to(x.device, non_blocking=True))
            ops.second_moment_accumulate(accs[layer], x)
            if layer == deepest:
                raise StopForward  # nothing after the deepest edited layer is needed
        return hook

    from tqdm.auto import tqdm

    show = (progress if progress is not None else _stderr_is_tty()) and rank == 0
    desc = f"statistics L{','.join(map(str, layers))}" + (f" ×{world} ranks" if world > 1 else "")
    bar = tqdm(total=budget, initial=state.seen, unit="tok", unit_scale=True, desc=desc, disable=not show,
               dynamic_ncols=True)
    handles = [adapter.module(layer).register_forward_hook(make_hook(layer)) for layer in layers]
    pad = pad_id(tokenizer) if tokenizer is not None else 0
    device = input_device(adapter)
    sequences = 0
    last_saved = state.seen
    t0 = time.perf_counter() - state.seconds
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(_batches(_sequences(corpus, tokenizer, budget, max_len, packing),
                                                   batch_tokens)):
                n = sum(len(s) for s in batch)
                sequences += len(batch)
                if index < state.next_batch:
                    continue  # summed before the checkpoint
                if index % world == rank:
                    ids, mask = right_pad(batch, pad, "cpu")
                    flat = mask.reshape(-1).bool()
                    # indices built on the host: no device synchronisation to find the real rows
                    current["rows"] = None if bool(flat.all()) else flat.nonzero().squeeze(1)
                    ids, mask = ids.to(device), mask.to(device)
                    try:
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
                    except StopForward:
                        pass
                    state.count += n
                state.seen += n
                state.next_batch = index + 1
                bar.update(n)
                if ckpt is not None and state.seen - last_saved >= every and state.seen < budget:
                    state.seconds = time.perf_counter() - t0
                    _save_checkpoint(ckpt, key, accs, state)
                    last_saved = state.seen
    finally:
        for h in handles:
            h.remove()
        bar.close()
        model.train(was_training)
    count = state.count
    if dist is not None:
        for layer in layers:
            dist.all_reduce(accs[layer])
        total = torch.tensor([count], dtype=torch.int64, device=accs[deepest].device)
        dist.all_reduce(total)
        count = int(total.item())
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
            "sequences": sequences,
            "packing": packing,
            "max_len": max_len,
            "dtype": dname,
            "model_dtype": str(adapter.weight(layer).dtype).replace("torch.", ""),
            "seconds": round(seconds, 3),
            "world_size": world,
        }
        if resumed_from:
            meta["resumed_at_tokens"] = resumed_from
        out[layer] = SecondMoment(layer=layer, sum=accs[layer], count=count, meta=meta)
    if ckpt is not None and remove_checkpoint:
        ckpt.unlink(missing_ok=True)
    return out


def _stderr_is_tty() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def cache_file(
    root: Path, model_fp: str, layer: int, corpus_id: str, tokens: int, max_len: int, dtype: str,
    packing: str = "truncate",
) -> Path:
    """Cache path of one layer's statistics; every input that changes the result is in the name."""
    fields = f"{model_fp}|{layer}|{corpus_id}|{tokens}|{max_len}|{dtype}"
    if packing != "truncate":
        fields += f"|{packing}"
    key = hashlib.sha256(fields.encode()).hexdigest()[:16]
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
    packing: str = "truncate",
    cache_root: Optional[Path] = None,
    progress: Optional[bool] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = True,
) -> Dict[int, SecondMoment]:
    """Cached statistics for ``layers``: loaded when a valid cache file exists, else computed (all
    missing layers in one pass) and saved. A damaged or mismatching cache file is recomputed.

    With a ``cache_root`` the pass checkpoints its partial sums under ``<cache_root>/stats/partial``
    and, with ``resume``, an interrupted pass continues where it stopped. Under torch.distributed,
    rank 0 decides what is missing and writes the files; every rank returns the statistics.
    """
    if not isinstance(corpus, Corpus):
        corpus = open_corpus(corpus)
    budget = int(tokens) if tokens is not None else default_token_budget(adapter.d_in)
    dname = str(dtype).replace("torch.", "")
    rank, world, dist = _dist()
    found: Dict[int, SecondMoment] = {}
    missing: List[int] = []
    paths: Dict[int, Path] = {}
    for layer in sorted(set(layers)):
        fp = layer_fingerprint(adapter, layer)
        if cache_root is None:
            missing.append(layer)
            continue
        path = cache_file(cache_root, fp, layer, corpus.id, budget, max_len, dname, packing)
        paths[layer] = path
        if path.is_file():
            try:
                sm = SecondMoment.load(path)
                sm.check(layer=layer, dim=adapter.d_in, model_fingerprint=fp, source=str(path))
                if sm.meta.get("corpus") != corpus.id or sm.meta.get("tokens_requested") != budget:
                    raise ValueError("corpus or budget differ from the file name's")
                found[layer] = sm.to_device(adapter.device(layer))
                sm.meta["path"] = str(path)
                continue
            except ValueError as exc:
                warnings.warn(f"ignoring cached statistics {path}: {exc}; recomputing", stacklevel=2)
        missing.append(layer)
    if dist is not None:
        # Every rank must enter the same pass (its all-reduce would otherwise wait forever), even
        # when the ranks do not share a file system: rank 0's view decides.
        decision = [missing]
        dist.broadcast_object_list(decision, src=0)
        unreadable = sorted(set(missing) - set(decision[0]))
        if unreadable:
            raise RuntimeError(
                f"rank {rank} cannot read the cached statistics of layers {unreadable} that rank 0 found; "
                "point every rank at a shared cache directory (FASTROME_CACHE)"
            )
        missing = decision[0]
        for layer in missing:
            found.pop(layer, None)
    if missing:
        ckpt = None
        if cache_root is not None:
            key = run_key(adapter, missing, corpus.id, budget, max_len, dname, packing, batch_tokens)
            ckpt = Path(cache_root) / "stats" / "partial" / f"{key}.safetensors"
        computed = compute(
            adapter, tokenizer, missing, corpus=corpus, tokens=budget, max_len=max_len, dtype=dtype,
            batch_tokens=batch_tokens, packing=packing, progress=progress, checkpoint=ckpt,
            checkpoint_every=checkpoint_every, resume=resume, remove_checkpoint=False,
        )
        for layer, sm in computed.items():
            if layer in paths:
                if rank == 0:
                    sm.save(paths[layer])
                sm.meta["path"] = str(paths[layer])
            found[layer] = sm
        if ckpt is not None:
            if dist is not None:
                dist.barrier()  # the results are on disk before any rank drops its checkpoint
            part = ckpt if world == 1 else ckpt.with_name(f"{ckpt.name}.rank{rank}of{world}")
            part.unlink(missing_ok=True)
    return found
