"""The statistics cache: one file per (model, layer, corpus, budget, length, dtype, packing), named
after all of them, loaded when valid and computed otherwise (all missing layers in one pass).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from fastrome.adapter import ModelAdapter
from fastrome.corpus import Corpus, open_corpus
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
    rank, world, dist = dist_info()
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
                sm.meta["path"] = str(path)  # before the copy to the device, so the result carries it
                found[layer] = sm.to_device(adapter.device(layer))
                continue
            except ValueError as exc:
                _log.warning("ignoring cached statistics %s: %s; recomputing", path, exc)
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
