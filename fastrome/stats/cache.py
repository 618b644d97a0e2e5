"""The statistics cache: one file per (model, layer, corpus, budget, length, dtype, packing), named
after all of them, loaded when valid and computed otherwise (all missing layers in one pass).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from fastrome.adapter import ModelAdapter
from fastrome.corpus import Corpus, open_corpus
from fastrome.locking import FolderLock
from fastrome.stats.collect import compute, dist_info, run_key
from fastrome.stats.moment import SecondMoment, default_token_budget, layer_fingerprint

_log = logging.getLogger(__name__)


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


def _read_cached(
    adapter: ModelAdapter, layers: Sequence[int], cache_root: Optional[Path], corpus_id: str, budget: int,
    max_len: int, dname: str, packing: str,
) -> Tuple[Dict[int, SecondMoment], List[int], Dict[int, Path]]:
    """(statistics read from valid cache files, the layers still missing, each layer's cache path)."""
    found: Dict[int, SecondMoment] = {}
    missing: List[int] = []
    paths: Dict[int, Path] = {}
    for layer in sorted(set(layers)):
        fp = layer_fingerprint(adapter, layer)
        if cache_root is None:
            missing.append(layer)
            continue
        path = cache_file(cache_root, fp, layer, corpus_id, budget, max_len, dname, packing)
        paths[layer] = path
        if path.is_file():
            try:
                sm = SecondMoment.load(path)
                sm.check(layer=layer, dim=adapter.d_in, model_fingerprint=fp, source=str(path))
                if sm.meta.get("corpus") != corpus_id or sm.meta.get("tokens_requested") != budget:
                    raise ValueError("corpus or budget differ from the file name's")
                sm.meta["path"] = str(path)  # before the copy to the device, so the result carries it
                found[layer] = sm.to_device(adapter.device(layer))
                continue
            except ValueError as exc:
                _log.warning("ignoring cached statistics %s: %s; recomputing", path, exc)
        missing.append(layer)
    return found, missing, paths


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
    rank 0 decides what is missing and writes the files; every rank returns the statistics. A process
    that finds layers missing while another process computes statistics into the same cache waits for
    it, then reads what it wrote and computes only what is still missing.
    """
    if not isinstance(corpus, Corpus):
        corpus = open_corpus(corpus)
    budget = int(tokens) if tokens is not None else default_token_budget(adapter.d_in)
    dname = str(dtype).replace("torch.", "")
    rank, _, dist = dist_info()
    found, missing, paths = _read_cached(adapter, layers, cache_root, corpus.id, budget, max_len, dname, packing)
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
    lock = None
    if missing and cache_root is not None and dist is None:
        # One pass per cache at a time: a second process that needs statistics waits for the first
        # and then reads what it wrote, instead of computing the same layers beside it.
        try:
            lock = FolderLock(Path(cache_root) / "stats", "statistics cache", wait=True, on_wait=_say_waiting)
        except OSError as exc:  # a read-only cache: compute without waiting for anyone
            _log.warning("statistics cache: cannot lock %s (%s); computing without waiting for other processes",
                         Path(cache_root) / "stats", exc)
        else:
            more, missing, _ = _read_cached(adapter, missing, cache_root, corpus.id, budget, max_len, dname,
                                            packing)
            found.update(more)
    try:
        found.update(_compute_missing(
            adapter, tokenizer, missing, paths, corpus=corpus, budget=budget, max_len=max_len, dtype=dtype,
            dname=dname, batch_tokens=batch_tokens, packing=packing, cache_root=cache_root, progress=progress,
            checkpoint_every=checkpoint_every, resume=resume,
        ))
    finally:
        if lock is not None:
            lock.release()
    return found


def _say_waiting(holder: str) -> None:
    _log.warning("statistics cache: another process%s is computing statistics; waiting for it, then "
                 "reading what it wrote", holder)


def _compute_missing(
    adapter: ModelAdapter, tokenizer: Any, missing: List[int], paths: Dict[int, Path], *, corpus: Corpus,
    budget: int, max_len: int, dtype: torch.dtype, dname: str, batch_tokens: int, packing: str,
    cache_root: Optional[Path], progress: Optional[bool], checkpoint_every: Optional[int], resume: bool,
) -> Dict[int, SecondMoment]:
    """Compute ``missing`` layers in one pass, saved to their ``paths`` (rank 0 writes)."""
    rank, world, dist = dist_info()
    found: Dict[int, SecondMoment] = {}
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
                    sm.save(paths[layer])  # replaces a damaged or mismatching file of that name
                sm.meta["path"] = sm.source = str(paths[layer])
            found[layer] = sm
        if ckpt is not None:
            if dist is not None:
                dist.barrier()  # the results are on disk before any rank drops its checkpoint
            part = ckpt if world == 1 else ckpt.with_name(f"{ckpt.name}.rank{rank}of{world}")
            part.unlink(missing_ok=True)
    return found


def compute_stats(
    model: Any,
    tokenizer: Any,
    layers: Union[int, Sequence[int]],
    *,
    corpus: Union[Corpus, str, os.PathLike, None] = None,
    tokens: Optional[int] = None,
    max_len: int = 1024,
    module_template: Optional[str] = None,
    cache: Union[bool, str, os.PathLike] = True,
    progress: Optional[bool] = None,
) -> Dict[int, SecondMoment]:
    """``{layer: SecondMoment}``: the key second moments of ``model``'s edited modules at ``layers``,
    from one pass over ``corpus`` (None: the bundled Wikipedia text), pass them to ``Editor(stats=)``.

    Args:
        layers: one layer index or several.
        tokens: token budget (default: ``default_token_budget(d_in)``).
        module_template: the edited modules' dotted path with ``{}`` (default: found in the model).
        cache: True for fastrome's cache folder, a folder, or False to compute without caching.
    """
    from fastrome.cache import cache_dir

    adapter = ModelAdapter(model, module_template)
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
    for layer in layers:
        adapter.check_layer(layer, "layers")
    if cache is False:
        return compute(adapter, tokenizer, layers, corpus=corpus, tokens=tokens, max_len=max_len, progress=progress)
    root = cache_dir(None if cache is True else cache)
    return load_or_compute(adapter, tokenizer, layers, corpus=corpus, tokens=tokens, max_len=max_len,
                           cache_root=root, progress=progress)
