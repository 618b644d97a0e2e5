"""The ``fastrome`` command: ``edit``, ``demo``, ``eval``, ``stats``, ``plot`` and ``info``.

Bad input ends a command with one line on stderr, ``fastrome <cmd>: error: ...``, and exit status
2; the flags are checked before a model is loaded, so a typo costs no model load and no work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fastrome.config import MODES

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


class UsageError(SystemExit):
    """Bad command-line input; :func:`main` prints it as one line ``fastrome <cmd>: error: ...``.

    A :class:`SystemExit` with status 2, like argparse's own errors, so it ends the program
    without a traceback wherever it is raised; its text is the message, for callers of
    :func:`main` that catch it.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def _flag_error(flag: str, exc: Exception) -> UsageError:
    """``exc``'s message under ``flag``, without the library's own argument name in front of it
    (``"model: '/x' is ..."`` becomes ``"--model: '/x' is ..."``)."""
    text = str(exc)
    head, sep, rest = text.partition(": ")
    if sep and head.isidentifier():
        text = rest
    return UsageError(f"{flag}: {text}")


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


# -- checks of the command line, all made before a model is loaded ----------------------------------

def _at_least(value: Optional[int], flag: str, minimum: int) -> None:
    """Refuse an integer flag below ``minimum`` (None: not given, the default applies)."""
    if value is not None and value < minimum:
        want = "a positive number" if minimum == 1 else f"a number >= {minimum}"
        raise UsageError(f"{flag}: expected {want}, got {value}")


def _dtype(name: str):
    from fastrome.models import parse_dtype

    try:
        return parse_dtype(name)
    except ValueError as exc:  # "dtype: expected ..., got ..."
        raise UsageError(f"--{exc}") from None


def _check_device(name: str) -> None:
    """``name`` must parse as a torch device, and a GPU one must exist here."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device: {name!r} is not a device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device: {name!r}, but CUDA is not available here (use --device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device: {name!r}, but this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device: {name!r}, but MPS is not available here (use --device cpu)")


def _check_runtime(args: argparse.Namespace) -> None:
    _dtype(args.dtype)
    _check_device(args.device)


def _check_stats(stats: Optional[str], corpus: Optional[str]) -> None:
    """``--stats`` names statistics that exist and ``--corpus`` text that exists (a typo would
    otherwise surface only when the statistics are first needed, after the model has loaded and
    completions have run)."""
    from fastrome.stats.source import check_sources

    try:
        check_sources(stats, corpus)
    except ValueError as exc:  # its messages start with the argument's name, "stats: ..." or "corpus: ..."
        raise UsageError(f"--{exc}") from None


def _check_writable(path: str, flag: str, *, folder: Optional[bool]) -> None:
    """``path`` can be written: it exists, is a folder (``folder=True``) or a file (``folder=False``)
    as asked, and is writable; or it does not exist yet and the nearest folder above it that does
    is writable (the folders in between are created). Checked up front because results are
    written only at the end of the work."""
    p = Path(path)
    if p.exists():
        if folder is True and not p.is_dir():
            raise UsageError(f"{flag}: {path!r} is an existing file; give a folder to write to (a new one or an "
                             "existing folder)")
        if folder is False and p.is_dir():
            raise UsageError(f"{flag}: {path!r} is a folder; give a file name")
        if not os.access(p, os.W_OK):
            raise UsageError(f"{flag}: {path!r} is not writable")
        return
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag}: cannot create {path!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot create {path!r}: the folder {str(parent)!r} is not writable")


def _check_edit_flags(args: argparse.Namespace) -> None:
    """The flags of ``edit``, ``demo`` and ``eval`` that need no file read and no model."""
    _at_least(args.layer, "--layer", 0)
    _at_least(args.spread, "--spread", 1)
    _at_least(args.tokens, "--tokens", 1)
    _at_least(args.max_new_tokens, "--max-new-tokens", 0)
    if args.layer is not None and args.spread is not None and args.spread > args.layer + 1:
        raise UsageError(f"--spread: {args.spread} layers ending at --layer {args.layer} would start below layer 0 "
                         f"(at most {args.layer + 1} there)")
    _check_runtime(args)
    _check_stats(args.stats, args.corpus)
    _settings(args)
    if args.output:
        _check_writable(args.output, "--output", folder=True)


def _model_depth(model: Optional[str], *, read_config: bool) -> Optional[int]:
    """Check that ``--model`` names a model that can be loaded, without loading it; with
    ``read_config``, its number of layers from its configuration (config.json or the GGUF header,
    not the weights); None when not read or not stated there."""
    from fastrome.adapter import _n_layers
    from fastrome.models import _resolve

    try:
        where, kwargs, _ = _resolve(model)
    except (ValueError, FileNotFoundError) as exc:
        raise _flag_error("--model", exc) from None
    if not read_config:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(where, local_files_only=True,
                                            **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model: cannot read the configuration of {model or where!r} ({exc})") from None
    return _n_layers(config)


def _check_layer(args: argparse.Namespace) -> None:
    """``--model`` can be loaded and ``--layer`` is one of its layers (the last check before loading)."""
    n_layers = _model_depth(args.model, read_config=args.layer is not None)
    if args.layer is not None and n_layers is not None and args.layer >= n_layers:
        raise UsageError(f"--layer: {args.layer} is not a layer of this model (it has layers 0-{n_layers - 1})")


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{flag}: {str(path)!r} is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {str(path)!r} ({exc.strerror or exc})") from None


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
            raise UsageError(f"--requests: {args.requests!r} is not a file")
        text = _read_text(path, "--requests")
        try:
            if path.suffix == ".jsonl":
                data: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--requests: {args.requests!r} is not valid JSON ({exc})") from None
        if isinstance(data, dict):
            data = data.get("requests", [data])
        if not isinstance(data, list):
            raise UsageError(f"--requests: expected a list of requests in {args.requests!r}")
        requests += data
    if args.prompt or args.subject or args.target:
        if not (args.prompt and args.subject and args.target):
            raise UsageError("--prompt, --subject and --target go together")
        requests.append({"prompt": args.prompt, "subject": args.subject, "target_new": args.target})
    if not requests:
        raise UsageError("no requests: give --requests FILE or --prompt/--subject/--target")
    return requests


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    """``--set FIELD=VALUE`` pairs as EditConfig overrides (values read as JSON, else as text),
    checked by the config's own validation before any model is loaded."""
    from fastrome.config import make_config

    out: Dict[str, Any] = {}
    for item in getattr(args, "settings", None) or []:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise UsageError(f"--set: expected FIELD=VALUE, got {item!r}")
        try:
            out[name] = json.loads(text)
        except ValueError:
            out[name] = text
    try:
        make_config(**out)
    except ValueError as exc:
        raise UsageError(f"--set: {exc}") from None
    return out


def _classic(args: argparse.Namespace) -> Dict[str, Any]:
    """The classic-ROME settings when ``--classic`` is given (the base that --mode and --set refine)."""
    from fastrome.config import CLASSIC

    return dict(CLASSIC) if getattr(args, "classic", False) else {}


def _editor(model, tok, args: argparse.Namespace):
    from fastrome import Editor

    flags = {"layer": args.layer, "mode": args.mode, "spread": args.spread, "policy": args.policy,
             "stats_tokens": args.tokens}
    overrides = {**_classic(args), **_settings(args), **{k: v for k, v in flags.items() if v is not None}}
    return Editor(model, tok, stats=args.stats, corpus=args.corpus, progress=not args.json, **overrides)


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

    parsed = parse_requests([{k: v for k, v in r.items() if k != "probes"} for r in requests])
    _check_layer(args)
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
        editor.save_merged(args.output)
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
    _check_edit_flags(args)
    return _run_edit(args, _read_requests(args), probes=args.probe or [])


def cmd_demo(args: argparse.Namespace) -> int:
    _check_edit_flags(args)
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
        raise UsageError(f"data: {args.data!r} is not a file")
    kind = args.format
    limit = None if args.limit is None else args.start + args.limit
    try:
        if kind == "auto":
            first = read_json_list(path, "data")[:1]
            kind = "zsre" if first and isinstance(first[0], dict) and "src" in first[0] and "alt" in first[0] else \
                "counterfact"
        cases = (load_zsre if kind == "zsre" else load_counterfact)(path, limit=limit)
    except ValueError as exc:
        raise _flag_error("data", exc) from None
    return kind, cases[args.start:], cases.skipped


def _text_list(path: Optional[str], flag: str) -> List[str]:
    """Texts from a .txt (one per line) or a JSON list of strings / objects with 'Text' or 'text'."""
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag}: {path!r} is not a file")
    text = _read_text(p, flag)
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{flag}: {path!r} is not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise UsageError(f"{flag}: {path!r} holds a {type(data).__name__}, expected a JSON list of texts")
        texts = [d.get("Text", d.get("text")) if isinstance(d, dict) else d for d in data]
    else:
        texts = [line.strip() for line in text.splitlines()]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise UsageError(f"{flag}: no texts in {path!r}")
    return texts


def _check_eval_flags(args: argparse.Namespace) -> None:
    """The flags of ``eval`` beyond the editing ones, and where it writes."""
    _check_edit_flags(args)
    _at_least(args.limit, "--limit", 1)
    _at_least(args.start, "--start", 0)
    _at_least(args.prefixes, "--prefixes", 0)
    _at_least(args.fluency, "--fluency", 0)
    _at_least(args.every, "--every", 1)
    _at_least(args.batch_size, "--batch-size", 1)
    if args.out:
        _check_writable(args.out, "--out", folder=False)
    if args.sequential:
        _check_writable(args.sequential, "--sequential", folder=True)
    elif args.plot:  # with --sequential the plots go to DIR/plots
        _check_writable(args.plot, "--plot", folder=False)


def cmd_eval(args: argparse.Namespace) -> int:
    from fastrome.evaluation import format_table, summarize, test_prefixes

    _check_eval_flags(args)
    kind, cases, skipped = _load_cases(args)
    if not cases:
        raise UsageError(f"data: no usable cases in {args.data!r} ({len(skipped)} skipped)")
    texts = {"ppl_texts": _text_list(args.ppl_texts, "--ppl-texts"),
             "wikitext_texts": _text_list(args.wikitext, "--wikitext")}
    _check_layer(args)
    model, tok = _load(args)
    prefixes = test_prefixes(model, tok, n=args.prefixes) if args.prefixes else []
    if args.sequential:
        return _eval_sequential(args, model, tok, cases, prefixes, **texts)
    from tqdm.auto import tqdm

    from fastrome.evaluation.single import evaluate_edits

    args.policy = args.policy or "skip"  # a refused edit is scored as it stands
    editor = _editor(model, tok, args)
    editor.progress = False
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
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


def _eval_sequential(args: argparse.Namespace, model, tok, cases, prefixes, *, ppl_texts: List[str],
                     wikitext_texts: List[str]) -> int:
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
    flags = {"layer": args.layer, "mode": args.mode, "spread": args.spread, "policy": args.policy,
             "stats_tokens": args.tokens}
    overrides = {"policy": "skip", **_classic(args), **_settings(args),
                 **{k: v for k, v in flags.items() if v is not None}}
    editor = open_run(model, tok, args.sequential, stats=args.stats, corpus=args.corpus, progress=False,
                      **{k: v for k, v in overrides.items() if v is not None})
    summary = run_sequential(
        editor, records, args.sequential, every=args.every, ppl_texts=ppl_texts,
        wikitext_texts=wikitext_texts, test_prefixes=prefixes,
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
        raise UsageError(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    for run in args.runs:
        if not Path(run).is_dir():
            raise UsageError(f"runs: {run!r} is not a folder")
    _check_writable(args.out, "--out", folder=True)
    files = plot_runs(dict(zip(labels, args.runs)), args.out, title=args.title)
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
    _at_least(args.tokens, "--tokens", 1)
    _at_least(args.max_len, "--max-len", 2)
    _at_least(args.batch_tokens, "--batch-tokens", 1)
    _at_least(args.checkpoint_every, "--checkpoint-every", 1)
    _check_runtime(args)
    if args.out:
        _check_writable(args.out, "--out", folder=None)
    n_layers = _model_depth(args.model, read_config=bool(args.layers))
    if args.layers and n_layers is not None:
        several = len(parse_layers(args.layers, n_layers, 0)) > 1
        if several and args.out and Path(args.out).is_file():
            raise UsageError(f"--out: {args.out!r} is an existing file; give a folder for the statistics of "
                             f"--layers {args.layers!r}")


def _open_corpus(args: argparse.Namespace):
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
    model, tok = _load(args) if not quiet else _load(argparse.Namespace(**{**vars(args), "json": True}))
    adapter = ModelAdapter(model)
    layers = parse_layers(args.layers, adapter.n_layers, adapter.default_layer())
    budget = args.tokens if args.tokens is not None else default_token_budget(adapter.d_in)
    if not quiet:
        _print(f"corpus: {corpus.description} [{corpus.id}]")
        _print(f"layers {layers}: {budget:,} tokens, sequences of at most {args.max_len} ({args.packing}), "
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
    p.add_argument("--model", default=None,
                   help="local model folder, .gguf file or model id in the local Hugging Face cache "
                        "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32",
                   help="float32 (default), bfloat16, float16 or auto (the checkpoint's own)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="device to load the model on")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")


def _edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classic", action="store_true",
                   help="classic one-edit ROME: consistent keys, no edit memory, no early stopping "
                        "(the default's lifelong settings off; --mode and --set still apply on top)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="keys of the update (default dual: exact at the prefixed mean and the unprefixed key)")
    p.add_argument("--layer", type=int, default=None, help="edited layer (default: the model's measured layer)")
    p.add_argument("--spread", type=int, default=None,
                   help="share each edit among this many layers ending at --layer (default 4, fewer below "
                        "layer 3; 1 with --classic)")
    p.add_argument("--policy", choices=("raise", "skip", "force"), default=None)
    p.add_argument("--stats", default=None,
                   help="statistics: a file written by `fastrome stats`, a ROME .npz, or 'identity' (default: "
                        "computed from --corpus and cached)")
    p.add_argument("--corpus", default=None,
                   help="text the statistics are computed from: a file, a folder, hf:NAME or 'bundled' (default)")
    p.add_argument("--tokens", type=int, default=None, help="token budget when statistics are computed")
    p.add_argument("--max-new-tokens", type=int, default=8, help="length of the greedy completions shown")
    p.add_argument("--output", default=None,
                   help="write the edited model (safetensors) with its tokenizer to this folder, and the edits in "
                        "its fastrome_edits/ subfolder")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                   help="any EditConfig field, e.g. memory_beta=0.02 or mpes_checks=2 (repeatable; values "
                        "read as JSON)")


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


DEBUG_ENV = "FASTROME_DEBUG"  # =1: unexpected errors propagate with their traceback


def _report_error(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: error: {_one_line(message)}\n")
    sys.stderr.flush()


def _show_log() -> None:
    """The library's operational messages on stderr, one line each, unless logging is configured
    already (an application calling main() keeps its own setup)."""
    import logging

    log = logging.getLogger("fastrome")
    if logging.getLogger().handlers or any(not isinstance(h, logging.NullHandler) for h in log.handlers):
        return
    class Stderr(logging.StreamHandler):
        """Writes to whatever sys.stderr is when a message comes (it may be replaced after main starts)."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value):
            pass

    handler = Stderr()
    handler.setFormatter(logging.Formatter("[fastrome] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command in ``argv``; returns its exit status. Bad input, whether found on the
    command line or by the library while the command runs (a ``ValueError``), is printed as one
    line and raises :class:`UsageError` (status 2), as argparse does for the flags it checks. Any
    other error is printed as one line too and the status is 1; ``FASTROME_DEBUG=1`` lets it
    propagate with its traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    _show_log()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _print("interrupted")
        return 130
    except UsageError as exc:
        _report_error(prog, str(exc))
        raise
    except ValueError as exc:
        _report_error(prog, str(exc))
        raise UsageError(str(exc)) from exc
    except Exception as exc:  # anything else (a file that cannot be written, a bug): one line, status 1
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        _report_error(prog, f"{type(exc).__name__}: {exc} ({DEBUG_ENV}=1 shows where it happened)")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
