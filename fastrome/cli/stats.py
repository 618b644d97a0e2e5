"""``fastrome stats``: key statistics of several layers from one pass over a corpus, cached and
resumable; under torchrun every rank sums its share of the batches."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, List, Optional

from fastrome.cli.common import (
    UsageError,
    add_model_args,
    at_least,
    check_runtime,
    check_writable,
    echo,
    load,
    model_depth,
)


def parse_layers(spec: Optional[str], n_layers: int, default: int) -> List[int]:
    """``"3,5"``, ``"3-8"``, ``"all"`` or None (the default layer) → sorted layer indices."""
    if not spec:
        return [default]
    if spec.strip().lower() == "all":
        return list(range(n_layers))
    layers = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                layers.update(range(int(lo), int(hi) + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise UsageError(f"--layers: {spec!r} is not a list like '5', '3,5' or '3-8'") from None
    bad = sorted(x for x in layers if not 0 <= x < n_layers)
    if bad:
        raise UsageError(f"--layers: {bad} out of range in {spec!r}; the model has layers 0-{n_layers - 1}")
    return sorted(layers)


def _init_distributed(args: argparse.Namespace) -> int:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if str(args.device).startswith("cuda"):
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(args.device).startswith("cuda") else "gloo")
    return dist.get_rank()


def _check_stats_flags(args: argparse.Namespace) -> None:
    """The flags of ``stats``, its model's depth against ``--layers`` included."""
    at_least(args.tokens, "--tokens", 1)
    at_least(args.max_len, "--max-len", 2)
    at_least(args.batch_tokens, "--batch-tokens", 1)
    at_least(args.checkpoint_every, "--checkpoint-every", 1)
    check_runtime(args)
    if args.out:
        check_writable(args.out, "--out", folder=None)
    n_layers = model_depth(args.model, read_config=bool(args.layers))
    if args.layers and n_layers is not None:
        several = len(parse_layers(args.layers, n_layers, 0)) > 1
        if several and args.out and Path(args.out).is_file():
            raise UsageError(f"--out: {args.out!r} is an existing file; give a folder for the statistics of "
                             f"--layers {args.layers!r}")


def _open_corpus(args: argparse.Namespace) -> Any:
    from fastrome.corpus import open_corpus
    from fastrome.stats.source import corpus_source

    try:
        return open_corpus(corpus_source(args.corpus), seed=args.seed, text_field=args.text_field)
    except (ValueError, TypeError, ImportError) as exc:
        raise UsageError(f"--corpus: {exc}") from None


def cmd_stats(args: argparse.Namespace) -> int:
    import torch

    from fastrome.adapter import ModelAdapter
    from fastrome.cache import cache_dir
    from fastrome.config import EditConfig
    from fastrome.stats import default_token_budget, load_or_compute

    _check_stats_flags(args)
    rank = _init_distributed(args)
    corpus = _open_corpus(args)
    quiet = args.json or rank != 0
    model, tok = load(args) if not quiet else load(argparse.Namespace(**{**vars(args), "json": True}))
    adapter = ModelAdapter(model)
    layers = parse_layers(args.layers, adapter.n_layers, adapter.default_layer())
    budget = args.tokens if args.tokens is not None else default_token_budget(adapter.d_in)
    if not quiet:
        echo(f"corpus: {corpus.description} [{corpus.id}]")
        echo(f"layers {layers}: {budget:,} tokens, sequences of at most {args.max_len} ({args.packing}), "
             f"{args.accumulate} sums")
    t0 = time.perf_counter()
    found = load_or_compute(
        adapter, tok, layers, corpus=corpus, tokens=budget, max_len=args.max_len,
        dtype=getattr(torch, args.accumulate), batch_tokens=args.batch_tokens, packing=args.packing,
        cache_root=cache_dir(), progress=not quiet, checkpoint_every=args.checkpoint_every, resume=args.resume,
    )
    seconds = time.perf_counter() - t0
    ridge_rel = EditConfig().ridge
    rows = []
    for layer, sm in sorted(found.items()):
        path = sm.meta.get("path", "")
        if args.out and rank == 0:
            out = Path(args.out)
            target = out / f"stats_L{layer}.safetensors" if (out.is_dir() or len(found) > 1) else out
            path = str(sm.save(target))
        solver = sm.solver(ridge_rel)
        rows.append({"layer": layer, "tokens": sm.count, "tokens_requested": sm.meta.get("tokens_requested"),
                     "sequences": sm.meta.get("sequences"), "corpus": sm.meta.get("corpus"), "path": path,
                     "seconds": sm.meta.get("seconds"), "ridge": solver.ridge, "condition": solver.condition})
    if rank != 0:
        return 0
    if args.json:
        echo(json.dumps({"seconds": seconds, "layers": rows}, indent=2))
        return 0
    echo(f"\n{'layer':>5}  {'tokens':>12}  {'ridge':>9}  {'cond₁':>9}  file")
    for r in rows:
        echo(f"{r['layer']:>5}  {r['tokens']:>12,}  {r['ridge']:>9.2e}  {r['condition']:>9.2e}  {r['path']}")
    echo(f"done in {seconds:.1f} s")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``stats`` command."""
    p = sub.add_parser("stats", help="compute and cache key statistics (one pass for all layers, resumable)",
                       description="Second moments of the MLP keys at the given layers from one pass over a corpus; "
                       "cached, checkpointed and resumable. Under torchrun every rank sums its share of the batches.")
    add_model_args(p)
    p.add_argument("--layers", default=None, help="'5', '3,5', '3-8' or 'all' (default: the model's edited layer)")
    p.add_argument("--corpus", default=None,
                   help="a .txt/.jsonl/.parquet file, token ids (.npy/.safetensors), a folder of them, "
                   "hf:NAME[/CONFIG][:SPLIT], or 'bundled' (default)")
    p.add_argument("--seed", type=int, default=0, help="document-order seed (default 0)")
    p.add_argument("--text-field", default="text", help="text column of .jsonl/.parquet/hf corpora")
    p.add_argument("--tokens", type=int, default=None, help="token budget (default: max(100k, 20·d_ff))")
    p.add_argument("--max-len", type=int, default=1024, help="longest sequence in tokens (default 1024)")
    p.add_argument("--packing", choices=("truncate", "pack"), default="truncate",
                   help="truncate: one document per sequence (default); pack: documents concatenated into "
                   "full-length sequences")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward batch")
    p.add_argument("--accumulate", choices=("float64", "float32"), default="float64")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="tokens between checkpoints of the partial sums (default: a tenth of the budget)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue an interrupted pass from its checkpoint (default: yes)")
    p.add_argument("--out", default=None, help="also write the statistics to this file or folder")
    p.set_defaults(func=cmd_stats)
