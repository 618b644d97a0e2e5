"""Collecting key statistics: one forward pass over a text corpus feeds every requested layer.

Hooks hand each layer's keys (every non-pad token) to :func:`fastrome.ops.second_moment_accumulate`,
and the pass stops after the deepest requested layer. Documents are tokenised, capped at
``max_len`` tokens, and batched up to ``batch_tokens`` padded tokens; the total stops at the token
budget (one token short of it when a single token is left, since one token is no sequence). A
long pass checkpoints its sums and resumes from them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fastrome import ops
from fastrome.adapter import ModelAdapter
from fastrome.cache import write_safetensors
from fastrome.corpus import Corpus, open_corpus
from fastrome.keys import StopForward, input_device
from fastrome.progress import show_progress
from fastrome.stats.moment import (
    SecondMoment,
    check_sum,
    default_token_budget,
    layer_fingerprint,
    read_safetensors,
    verify_digest,
    with_digest,
)
from fastrome.tokens import encode, pad_id, right_pad

_log = logging.getLogger(__name__)

# Shortest sequence a pass reads: one token has no context, nothing a prompt would look like.
MIN_SEQUENCE_TOKENS = 2
PACKING = ("truncate", "pack")
SORT_WINDOW = 256  # sequences sorted by length together before batching
CHECKPOINT_FORMAT = "fastrome.stats_checkpoint.v1"


def token_sequences(corpus: Corpus, tokenizer: Any, budget: int, max_len: int, packing: str) -> Iterator[List[int]]:
    """The token sequences one pass reads, in a fixed order: ``budget`` tokens in total, or
    ``budget - 1`` when the one token left could only form a sequence of its own; fewer only when
    the corpus runs out. Every sequence has ``MIN_SEQUENCE_TOKENS`` to ``max_len`` tokens.

    ``truncate`` (the published setup): every document is its own sequence, cut at ``max_len``.
    ``pack``: documents are concatenated, each followed by the tokenizer's EOS when it has one, and
    cut into ``max_len`` windows, so no token is dropped and batches carry no padding.

    Documents are tokenised lazily and none after the budget is spent: once fewer than
    ``MIN_SEQUENCE_TOKENS`` are left, no further document could contribute a token.
    """
    docs = corpus.token_ids(lambda text: encode(tokenizer, text))
    if packing == "truncate":
        yield from _truncated(docs, budget, max_len)
    else:
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        yield from _packed(docs, budget, max_len, eos if isinstance(eos, int) else None)


def _truncated(docs: Iterator[List[int]], budget: int, max_len: int) -> Iterator[List[int]]:
    """One sequence per document, cut at ``max_len`` and at what is left of ``budget``."""
    left = budget
    if left < MIN_SEQUENCE_TOKENS:
        return
    for ids in docs:
        ids = ids[: min(max_len, left)]
        if len(ids) < MIN_SEQUENCE_TOKENS:  # a one-token document: no context to take keys in
            continue
        left -= len(ids)
        yield ids
        if left < MIN_SEQUENCE_TOKENS:
            return  # checked before the next document is read: it would only be tokenised and dropped


def _packed(docs: Iterator[List[int]], budget: int, max_len: int, eos: Optional[int]) -> Iterator[List[int]]:
    """The documents' tokens (each followed by ``eos`` unless None) cut into ``max_len`` windows."""
    left = budget
    if left < MIN_SEQUENCE_TOKENS:
        return
    buf: List[int] = []
    for ids in docs:
        buf.extend(ids)
        if eos is not None:
            buf.append(eos)
        while len(buf) >= max_len and left >= MIN_SEQUENCE_TOKENS:
            take = min(max_len, left)
            chunk, buf = buf[:take], buf[max_len:]
            left -= take
            yield chunk
        if left < MIN_SEQUENCE_TOKENS:
            return
    if len(buf) >= MIN_SEQUENCE_TOKENS:  # the corpus ended inside a window: its rest, within budget
        yield buf[:left]


def length_batches(
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
    """Write the partial sums and progress, with a content digest (a damaged checkpoint would
    otherwise be resumed into statistics that then get a valid digest of their own)."""
    tensors = {f"sum.{layer}": acc.detach().contiguous().cpu() for layer, acc in accs.items()}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "key": key,
        "next_batch": str(state.next_batch),
        "count": str(state.count),
        "seen": str(state.seen),
        "seconds": repr(state.seconds),
    }
    write_safetensors(path, tensors, with_digest(tensors, meta))


def _load_checkpoint(path: Path, key: str, accs: Dict[int, Tensor]) -> Optional[_Progress]:
    """Restore ``accs`` from ``path`` if it is a valid checkpoint of this pass; None otherwise
    (with a warning when a file was there but could not be used)."""
    if not path.is_file():
        return None
    try:
        meta, tensors = read_safetensors(path, "it")
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("key") != key:
            raise ValueError("it belongs to a different pass (model, layers, corpus or settings differ)")
        # required: restarting costs only time, resuming from damaged sums would corrupt the result
        verify_digest(tensors, meta, "it", required=True)
        loaded = {}
        for layer, acc in accs.items():
            t = tensors[f"sum.{layer}"]
            if t.shape != acc.shape or t.dtype != acc.dtype:
                raise ValueError(f"layer {layer} sum is {tuple(t.shape)} {t.dtype}")
            check_sum(t, f"layer {layer}")
            loaded[layer] = t
        state = _Progress(int(meta["next_batch"]), int(meta["count"]), int(meta["seen"]), float(meta["seconds"]))
    except Exception as exc:  # a damaged file raises several types; none of them may stop the run
        _log.warning("statistics: not resuming from %s: %s; starting over", path, exc)
        return None
    for layer, acc in accs.items():
        acc.copy_(loaded[layer])
    return state


def dist_info() -> Tuple[int, int, Any]:
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
        tokens: token budget, at least ``MIN_SEQUENCE_TOKENS`` (default :func:`default_token_budget`).
            The pass stops once fewer than ``MIN_SEQUENCE_TOKENS`` are left, so it may use one
            token less; it warns when the corpus ran out before that.
        max_len: longest sequence in tokens, whatever the model's context size.
        dtype: running-sum dtype, float64 (default) or float32.
        batch_tokens: padded tokens per forward batch.
        packing: ``"truncate"`` (each document its own sequence) or ``"pack"`` (see :func:`token_sequences`).
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
    if budget < MIN_SEQUENCE_TOKENS:
        raise ValueError(f"tokens: expected a budget of at least {MIN_SEQUENCE_TOKENS} tokens, got {tokens!r}")
    if corpus.pretokenized:
        vocab, top = _vocab_size(adapter), corpus.max_token_id
        if vocab is not None and top is not None and top >= vocab:
            raise ValueError(f"corpus: {corpus.id} holds token id {top}, but the model's vocabulary has {vocab} ids")
    elif tokenizer is None:
        raise ValueError(f"tokenizer: required to read the text corpus {corpus.id}")
    every = int(checkpoint_every) if checkpoint_every is not None else max(1, budget // 10)
    if every < 1:
        raise ValueError(f"checkpoint_every: expected a positive number of tokens, got {checkpoint_every!r}")
    rank, world, dist = dist_info()
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

    show = show_progress(progress) and rank == 0
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
            for index, batch in enumerate(length_batches(token_sequences(corpus, tokenizer, budget, max_len, packing),
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
    for layer in layers:
        check_sum(accs[layer], f"statistics of layer {layer} over {corpus.id}")  # NaN/Inf keys: refuse, never cache
    _log.info("statistics of layers %s: %s tokens of %s in %.1f s", sorted(layers), f"{count:,}", corpus.id, seconds)
    # One token short is the budget met (a single token makes no sequence); two or more short can
    # only mean the documents ended first.
    if count <= budget - MIN_SEQUENCE_TOKENS:
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


