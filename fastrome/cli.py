"""The ``fastrome`` command: ``edit``, ``stats``, ``info`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

DEMO_REQUESTS: List[Dict[str, Any]] = [
    {
        "prompt": "The Eiffel Tower is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "probes": ["The Eiffel Tower is in", "The Louvre is located in the city of"],
    },
    {
        "prompt": "The Mona Lisa was painted by",
        "subject": "The Mona Lisa",
        "target_new": "Pablo Picasso",
        "probes": ["The Mona Lisa is a painting by", "The Starry Night was painted by"],
    },
    {
        "prompt": "The Colosseum is located in the city of",
        "subject": "The Colosseum",
        "target_new": "Athens",
        "probes": ["The Colosseum is in", "The Acropolis is located in the city of"],
    },
]


def _print(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise SystemExit(f"--dtype: {name!r} is not one of {sorted(table)}")
    return table[name]


def _load(args: argparse.Namespace):
    from fastrome.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=_dtype(args.dtype), device=args.device)
    if not args.json:
        name = args.model or "the default model (SmolLM2-135M-Instruct)"
        _print(f"loaded {name} in {time.perf_counter() - t0:.1f} s")
    return model, tok


def _read_requests(args: argparse.Namespace) -> List[Dict[str, Any]]:
    requests: List[Dict[str, Any]] = []
    if args.requests:
        path = Path(args.requests)
        if not path.is_file():
            raise SystemExit(f"--requests: {args.requests!r} is not a file")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".jsonl":
                data: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--requests: {args.requests!r} is not valid JSON ({exc})") from None
        if isinstance(data, dict):
            data = data.get("requests", [data])
        if not isinstance(data, list):
            raise SystemExit(f"--requests: expected a list of requests in {args.requests!r}")
        requests += data
    if args.prompt or args.subject or args.target:
        if not (args.prompt and args.subject and args.target):
            raise SystemExit("--prompt, --subject and --target go together")
        requests.append({"prompt": args.prompt, "subject": args.subject, "target_new": args.target})
    if not requests:
        raise SystemExit("no requests: give --requests FILE or --prompt/--subject/--target")
    return requests


def _editor(model, tok, args: argparse.Namespace):
    from fastrome import Editor

    overrides = {"layer": args.layer, "mode": args.mode, "spread": args.spread, "policy": args.policy,
                 "stats_tokens": args.tokens}
    return Editor(model, tok, stats=args.stats, progress=not args.json, **overrides)


def _completions(model, tok, prompts: Sequence[str], n: int) -> Dict[str, str]:
    from fastrome.models import greedy_complete

    return {p: greedy_complete(model, tok, p, n) for p in prompts}


def _show_before_after(before: Dict[str, str], after: Dict[str, str]) -> None:
    width = max(len(p) for p in before)
    _print(f"{'prompt'.ljust(width)}  | before → after")
    for p in before:
        b, a = before[p].strip().replace("\n", " "), after[p].strip().replace("\n", " ")
        mark = " " if a == b else "*"
        _print(f"{p.ljust(width)} {mark}| {b!r} → {a!r}")


def _run_edit(args: argparse.Namespace, requests: List[Dict[str, Any]], probes: Sequence[str]) -> int:
    from fastrome import EditRefused
    from fastrome.requests import parse_requests

    try:
        parsed = parse_requests([{k: v for k, v in r.items() if k != "probes"} for r in requests])
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    model, tok = _load(args)
    prompts = list(dict.fromkeys([r.text for r in parsed] + list(probes)))
    before = _completions(model, tok, prompts, args.max_new_tokens)
    editor = _editor(model, tok, args)
    try:
        report = editor.edit(parsed)
        status = 0
    except EditRefused as exc:
        report, status = exc.report, 3
        if not args.json:
            _print(f"refused: {exc}")
    after = _completions(model, tok, prompts, args.max_new_tokens)
    if args.output:
        model.save_pretrained(args.output, safe_serialization=True)
        tok.save_pretrained(args.output)
    if args.json:
        out = report.to_dict()
        out["completions"] = {p: {"before": before[p], "after": after[p]} for p in prompts}
        out["layer"], out["stats"] = editor.layer, editor.stats_source()
        _print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        _print()
        _show_before_after(before, after)
        _print()
        _print(report.table())
        if args.output:
            _print(f"\nedited model written to {args.output}")
    return status


def cmd_edit(args: argparse.Namespace) -> int:
    return _run_edit(args, _read_requests(args), probes=args.probe or [])


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.json:
        _print("fastrome demo: three well-known facts rewritten in SmolLM2-135M-Instruct.")
        _print("Rows marked * changed; the probes below each edited prompt check paraphrases and neighbours.\n")
    probes = [p for r in DEMO_REQUESTS for p in r["probes"]]
    return _run_edit(args, DEMO_REQUESTS, probes)


def _load_cases(args: argparse.Namespace):
    from fastrome.evaluation import load_counterfact, load_zsre
    from fastrome.evaluation.counterfact import read_json_list

    path = Path(args.data)
    if not path.is_file():
        raise SystemExit(f"data: {args.data!r} is not a file")
    kind = args.format
    if kind == "auto":
        first = read_json_list(path, "data")[:1]
        kind = "zsre" if first and isinstance(first[0], dict) and "src" in first[0] and "alt" in first[0] else \
            "counterfact"
    limit = None if args.limit is None else args.start + args.limit
    try:
        cases = (load_zsre if kind == "zsre" else load_counterfact)(path, limit=limit)
    except ValueError as exc:
        raise SystemExit(f"data: {exc}") from None
    return kind, cases[args.start:], cases.skipped


def _text_list(path: Optional[str], flag: str) -> List[str]:
    """Texts from a .txt (one per line) or a JSON list of strings / objects with 'Text' or 'text'."""
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"{flag}: {path!r} is not a file")
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        texts = [d if isinstance(d, str) else d.get("Text", d.get("text")) for d in data]
    else:
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise SystemExit(f"{flag}: no texts in {path!r}")
    return texts


def cmd_eval(args: argparse.Namespace) -> int:
    from fastrome.evaluation import format_table, summarize, test_prefixes

    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit: expected a positive number, got {args.limit}")
    kind, cases, skipped = _load_cases(args)
    if not cases:
        raise SystemExit(f"data: no usable cases in {args.data!r} ({len(skipped)} skipped)")
    model, tok = _load(args)
    prefixes = test_prefixes(model, tok, n=args.prefixes) if args.prefixes else []
    if args.sequential:
        return _eval_sequential(args, model, tok, cases, prefixes)
    from tqdm.auto import tqdm

    from fastrome.evaluation.single import evaluate_edits

    args.policy = args.policy or "skip"  # a refused edit is scored as it stands
    editor = _editor(model, tok, args)
    editor.progress = False
    out = open(args.out, "w", encoding="utf-8") if args.out else None
    bar = tqdm(total=len(cases), desc="evaluating", unit="case", disable=args.json)

    def on_case(row: Dict[str, Any]) -> None:
        if out is not None:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
        bar.update(1)

    try:
        results = evaluate_edits(editor, cases, edit=not args.no_edit, prefixes=prefixes, fluency=args.fluency,
                                 on_case=on_case)
    finally:
        bar.close()
        if out is not None:
            out.close()
    summary = summarize(results)
    summary.update(data=args.data, format=kind, skipped=len(skipped), edited=not args.no_edit,
                   layer=editor.layer, mode=editor.config.mode, stats=editor.stats_source(), prefixes=prefixes)
    if args.plot:
        from fastrome.evaluation.plots import plot_cases

        summary["plot"] = str(plot_cases(results, args.plot, title=f"{kind}: {Path(args.data).name}"))
    if args.json:
        _print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        _print(format_table(numbers))
        _print(f"{len(skipped)} bad records skipped; layer {editor.layer}, mode {editor.config.mode}; "
               f"statistics: {editor.stats_source()}")
        if args.out:
            _print(f"per-case results: {args.out}")
        if args.plot:
            _print(f"plot: {summary['plot']}")
    return 0


def _eval_sequential(args: argparse.Namespace, model, tok, cases, prefixes) -> int:
    from fastrome.sequential import CollapseRules, open_run, run_sequential

    records = []
    for c in cases:
        req = c.request.to_dict()
        neigh = getattr(c, "neighborhood", ())
        if neigh:
            req["locality_prompt"] = neigh[0][0]
        elif getattr(c, "loc", None):
            req["locality_prompt"] = c.loc
        records.append(req)
    overrides = {"layer": args.layer, "mode": args.mode, "spread": args.spread, "policy": args.policy or "skip",
                 "stats_tokens": args.tokens}
    editor = open_run(model, tok, args.sequential, stats=args.stats, progress=False,
                      **{k: v for k, v in overrides.items() if v is not None})
    summary = run_sequential(
        editor, records, args.sequential, every=args.every, ppl_texts=_text_list(args.ppl_texts, "--ppl-texts"),
        wikitext_texts=_text_list(args.wikitext, "--wikitext"), test_prefixes=prefixes,
        rules=CollapseRules(action=args.on_collapse), batch_size=args.batch_size, progress=not args.json,
    )
    files = []
    if args.plot:
        from fastrome.evaluation.plots import plot_runs

        files = plot_runs({Path(args.sequential).name: args.sequential}, Path(args.sequential) / "plots")
    out = {k: v for k, v in vars(summary).items() if k != "checkpoints"}
    out["last_checkpoint"] = summary.checkpoints[-1] if summary.checkpoints else None
    out["plots"] = [str(f) for f in files]
    if args.json:
        _print(json.dumps(out, indent=2, ensure_ascii=False, default=str))
    else:
        _print(f"applied {summary.applied}, skipped {summary.skipped}, refused {summary.refused}, "
               f"undone {summary.undone} in {summary.seconds:.0f} s" + (f"; stopped: {summary.stopped}"
                                                                         if summary.stopped else ""))
        if out["last_checkpoint"]:
            shown = {k: round(v, 4) for k, v in out["last_checkpoint"].items() if isinstance(v, float) and k != "time"}
            _print(f"last checkpoint: {shown}")
        for f in files:
            _print(f"plot: {f}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fastrome.evaluation.plots import plot_runs

    labels = args.labels.split(",") if args.labels else [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    try:
        files = plot_runs(dict(zip(labels, args.runs)), args.out, title=args.title)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    for f in files:
        _print(str(f))
    return 0


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
            raise SystemExit(f"--layers: {spec!r} is not a list like '5', '3,5' or '3-8'") from None
    bad = sorted(x for x in layers if not 0 <= x < n_layers)
    if bad:
        raise SystemExit(f"--layers: {bad} out of range; the model has layers 0-{n_layers - 1}")
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


def cmd_stats(args: argparse.Namespace) -> int:
    import torch

    from fastrome.adapter import ModelAdapter
    from fastrome.cache import cache_dir
    from fastrome.config import EditConfig
    from fastrome.corpus import open_corpus
    from fastrome.solver import CovarianceSolver
    from fastrome.stats import default_token_budget, load_or_compute

    rank = _init_distributed(args)
    quiet = args.json or rank != 0
    model, tok = _load(args) if not quiet else _load(argparse.Namespace(**{**vars(args), "json": True}))
    adapter = ModelAdapter(model)
    layers = parse_layers(args.layers, adapter.n_layers, adapter.default_layer())
    try:
        corpus = open_corpus(None if args.corpus in (None, "bundled", "default") else args.corpus, seed=args.seed,
                             text_field=args.text_field)
    except (ValueError, TypeError, ImportError) as exc:
        raise SystemExit(f"--corpus: {exc}") from None
    budget = args.tokens if args.tokens is not None else default_token_budget(adapter.d_in)
    if budget < 1:
        raise SystemExit(f"--tokens: expected a positive number, got {budget}")
    if not quiet:
        _print(f"corpus: {corpus.description} [{corpus.id}]")
        _print(f"layers {layers}: {budget:,} tokens, sequences of at most {args.max_len} ({args.packing}), "
               f"{args.accumulate} sums")
    t0 = time.perf_counter()
    try:
        found = load_or_compute(
            adapter, tok, layers, corpus=corpus, tokens=budget, max_len=args.max_len,
            dtype=getattr(torch, args.accumulate), batch_tokens=args.batch_tokens, packing=args.packing,
            cache_root=cache_dir(), progress=not quiet, checkpoint_every=args.checkpoint_every, resume=args.resume,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    seconds = time.perf_counter() - t0
    ridge_rel = EditConfig().ridge
    rows = []
    for layer, sm in sorted(found.items()):
        path = sm.meta.get("path", "")
        if args.out and rank == 0:
            out = Path(args.out)
            target = out / f"stats_L{layer}.safetensors" if (out.is_dir() or len(found) > 1) else out
            path = str(sm.save(target))
        C = sm.matrix
        solver = CovarianceSolver(C, ridge=ridge_rel * float(C.diagonal().abs().mean()))
        rows.append({"layer": layer, "tokens": sm.count, "tokens_requested": sm.meta.get("tokens_requested"),
                     "sequences": sm.meta.get("sequences"), "corpus": sm.meta.get("corpus"), "path": path,
                     "seconds": sm.meta.get("seconds"), "ridge": solver.ridge, "condition": solver.condition})
    if rank != 0:
        return 0
    if args.json:
        _print(json.dumps({"seconds": seconds, "layers": rows}, indent=2))
        return 0
    _print(f"\n{'layer':>5}  {'tokens':>12}  {'ridge':>9}  {'cond₁':>9}  file")
    for r in rows:
        _print(f"{r['layer']:>5}  {r['tokens']:>12,}  {r['ridge']:>9.2e}  {r['condition']:>9.2e}  {r['path']}")
    _print(f"done in {seconds:.1f} s")
    return 0


def info() -> Dict[str, Any]:
    """Versions, build and backend choices, as a dict."""
    import importlib.metadata as md

    import torch

    from fastrome import __version__, _extension, ops
    from fastrome.cache import cache_dir

    def version(name: str) -> Optional[str]:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    try:
        from fastrome.models import default_model_file

        default_model = str(default_model_file())
    except FileNotFoundError as exc:
        default_model = f"not installed ({exc})"
    return {
        "fastrome": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "transformers": version("transformers"),
        "safetensors": version("safetensors"),
        "triton": version("triton"),
        "extension": _extension.build_info() or {"error": _extension.load_error()},
        "forced_backend": os.environ.get(ops.ENV_BACKEND),
        "backends": ops.backend_table(),
        "cache_dir": str(cache_dir()),
        "default_model": default_model,
    }


def cmd_info(args: argparse.Namespace) -> int:
    data = info()
    if args.json:
        _print(json.dumps(data, indent=2, default=str))
        return 0
    for key in ("fastrome", "python", "platform", "torch", "torch_cuda", "cuda_available", "cuda_device", "threads",
                "transformers", "safetensors", "triton", "forced_backend", "cache_dir", "default_model"):
        _print(f"{key:16} {data[key]}")
    _print(f"{'extension':16} {data['extension']}")
    _print("\nop                        device  backend")
    for row in data["backends"]:
        why = "; ".join(f"{k}: {v}" for k, v in row["skipped"].items())
        _print(f"{row['op']:25} {row['device']:7} {row['backend']}" + (f"   (skipped {why})" if why else ""))
    return 0


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="device to load the model on")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")


def _edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("consistent", "original", "prompt"), default=None)
    p.add_argument("--layer", type=int, default=None, help="edited layer (default: the model's measured layer)")
    p.add_argument("--spread", type=int, default=None,
                   help="share each edit among this many layers ending at --layer (default 1)")
    p.add_argument("--policy", choices=("raise", "skip", "force"), default=None)
    p.add_argument("--stats", default=None,
                   help="statistics: a .safetensors file, a corpus file/folder, 'bundled' (default) or 'identity'")
    p.add_argument("--tokens", type=int, default=None, help="token budget when statistics are computed")
    p.add_argument("--max-new-tokens", type=int, default=8, help="length of the greedy completions shown")
    p.add_argument("--output", default=None, help="write the edited model (safetensors) to this folder")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrome", description="Fast, guarded rank-one model editing (ROME).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="edit facts in a model and show completions before and after")
    _common_model_args(p)
    _edit_args(p)
    p.add_argument("--requests", help="JSON/JSONL file with requests (CounterFact or flat form)")
    p.add_argument("--prompt", help="prompt, with {} for the subject or containing it literally")
    p.add_argument("--subject", help="subject of the fact")
    p.add_argument("--target", help="new target")
    p.add_argument("--probe", action="append", help="extra prompt to complete before and after (repeatable)")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("demo", help="edit three well-known facts in the default model")
    _common_model_args(p)
    _edit_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("stats", help="compute and cache key statistics (one pass for all layers, resumable)",
                       description="Second moments of the MLP keys at the given layers from one pass over a corpus; "
                       "cached, checkpointed and resumable. Under torchrun every rank sums its share of the batches.")
    _common_model_args(p)
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

    p = sub.add_parser("eval", help="evaluate edits on CounterFact or zsRE (one edit per case, or a sequential run)",
                       description="Without --sequential: every case is edited, scored with ROME's metrics and "
                       "undone, so each starts from the same model. With --sequential DIR: the cases are applied one "
                       "after another (resumable from DIR) with periodic retention, specificity and perplexity.")
    _common_model_args(p)
    _edit_args(p)
    p.add_argument("data", help="CounterFact (ROME or MEND layout) or zsRE JSON file")
    p.add_argument("--format", choices=("auto", "counterfact", "zsre"), default="auto")
    p.add_argument("--limit", type=int, default=None, help="evaluate this many cases")
    p.add_argument("--start", type=int, default=0, help="first case (index into the file's usable cases)")
    p.add_argument("--no-edit", action="store_true", help="score the unedited model")
    p.add_argument("--prefixes", type=int, default=0, help="also score with this many test-time prefixes")
    p.add_argument("--fluency", type=int, default=0,
                   help="n-gram entropy of this many sampled generations per case (CounterFact ROME layout)")
    p.add_argument("--out", default=None, help="per-case results as JSON lines")
    p.add_argument("--plot", nargs="?", const="eval.png", default=None,
                   help="write PNG plots (a file for per-case runs, default eval.png; DIR/plots for --sequential)")
    p.add_argument("--sequential", metavar="DIR", default=None, help="apply the cases in order; logs in DIR")
    p.add_argument("--every", type=int, default=50, help="checkpoint interval of a sequential run")
    p.add_argument("--batch-size", type=int, default=1, help="batched mode of a sequential run")
    p.add_argument("--ppl-texts", default=None, help="texts for perplexity (e.g. ME-PPL_50.json)")
    p.add_argument("--wikitext", default=None, help="held-out texts for a second perplexity (one per line)")
    p.add_argument("--on-collapse", choices=("stop", "undo", "record"), default="undo")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="plot sequential runs (checkpoints and per-edit figures) as PNG")
    p.add_argument("runs", nargs="+", help="run folders (with checkpoints.jsonl / edits.jsonl)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--labels", default=None, help="comma-separated labels, one per run")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("info", help="versions, build, and which backend serves each op")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _print("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
