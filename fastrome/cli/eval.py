"""``fastrome eval``: CounterFact or zsRE cases, each edited, scored and undone, or applied one after
another as a sequential run (:mod:`fastrome.sequential`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastrome.cli.common import (
    UsageError,
    add_edit_args,
    add_model_args,
    at_least,
    check_edit_flags,
    check_layer,
    check_writable,
    echo,
    editor,
    editor_settings,
    flag_error,
    load,
)


def _load_cases(args: argparse.Namespace) -> Tuple[str, List[Any], List[Tuple[int, str]]]:
    """(format, the cases from ``--start`` on, the skipped records) of ``--data``."""
    from fastrome.evaluation.data import load_cases

    if not Path(args.data).is_file():
        raise UsageError(f"data: {args.data!r} is not a file")
    try:
        kind, cases = load_cases(args.data, args.format,
                                 limit=None if args.limit is None else args.start + args.limit)
    except ValueError as exc:
        raise flag_error("data", exc) from None
    return kind, cases[args.start:], cases.skipped


def _text_list(path: Optional[str], flag: str) -> List[str]:
    """The texts of the file ``flag`` names (none when it names none)."""
    from fastrome.evaluation.data import read_texts

    if not path:
        return []
    try:
        return read_texts(path)
    except ValueError as exc:
        raise flag_error(flag, exc) from None


def _check_eval_flags(args: argparse.Namespace) -> None:
    """The flags of ``eval`` beyond the editing ones, and where it writes."""
    check_edit_flags(args)
    at_least(args.limit, "--limit", 1)
    at_least(args.start, "--start", 0)
    at_least(args.prefixes, "--prefixes", 0)
    at_least(args.fluency, "--fluency", 0)
    at_least(args.every, "--every", 1)
    at_least(args.batch_size, "--batch-size", 1)
    if args.out:
        check_writable(args.out, "--out", folder=False)
    if args.sequential:
        check_writable(args.sequential, "--sequential", folder=True)
    elif args.plot:  # with --sequential the plots go to DIR/plots
        check_writable(args.plot, "--plot", folder=False)


def cmd_eval(args: argparse.Namespace) -> int:
    from fastrome.evaluation import format_table, summarize, test_prefixes

    _check_eval_flags(args)
    kind, cases, skipped = _load_cases(args)
    if not cases:
        raise UsageError(f"data: no usable cases in {args.data!r} ({len(skipped)} skipped)")
    texts = {"ppl_texts": _text_list(args.ppl_texts, "--ppl-texts"),
             "wikitext_texts": _text_list(args.wikitext, "--wikitext")}
    check_layer(args)
    model, tok = load(args)
    prefixes = test_prefixes(model, tok, n=args.prefixes) if args.prefixes else []
    if args.sequential:
        return _eval_sequential(args, model, tok, cases, prefixes, **texts)
    from tqdm.auto import tqdm

    from fastrome.evaluation.single import evaluate_edits

    args.policy = args.policy or "skip"  # a refused edit is scored as it stands
    ed = editor(model, tok, args)
    ed.progress = False
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
        results = evaluate_edits(ed, cases, edit=not args.no_edit, prefixes=prefixes, fluency=args.fluency,
                                 on_case=on_case)
    finally:
        bar.close()
        if out is not None:
            out.close()
    summary = summarize(results)
    summary.update(data=args.data, format=kind, skipped=len(skipped), edited=not args.no_edit,
                   layer=ed.layer, mode=ed.config.mode, stats=ed.stats_source(), prefixes=prefixes)
    if args.plot:
        from fastrome.evaluation.plots import plot_cases

        summary["plot"] = str(plot_cases(results, args.plot, title=f"{kind}: {Path(args.data).name}"))
    if args.json:
        echo(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        echo(format_table(numbers))
        echo(f"{len(skipped)} bad records skipped; layer {ed.layer}, mode {ed.config.mode}; "
             f"statistics: {ed.stats_source()}")
        if args.out:
            echo(f"per-case results: {args.out}")
        if args.plot:
            echo(f"plot: {summary['plot']}")
    return 0


def _eval_sequential(args: argparse.Namespace, model: Any, tok: Any, cases: Sequence[Any], prefixes: List[str], *,
                     ppl_texts: List[str], wikitext_texts: List[str]) -> int:
    from fastrome.sequential import CollapseRules, open_run, records_from_cases, run_sequential

    records = records_from_cases(cases)
    overrides = {"policy": "skip", **editor_settings(args)}
    ed = open_run(model, tok, args.sequential, stats=args.stats, corpus=args.corpus, progress=False,
                  **{k: v for k, v in overrides.items() if v is not None})
    summary = run_sequential(
        ed, records, args.sequential, every=args.every, ppl_texts=ppl_texts,
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
        echo(json.dumps(out, indent=2, ensure_ascii=False, default=str))
    else:
        echo(f"applied {summary.applied}, skipped {summary.skipped}, refused {summary.refused}, "
             f"undone {summary.undone} in {summary.seconds:.0f} s" + (f"; stopped: {summary.stopped}"
                                                                      if summary.stopped else ""))
        if out["last_checkpoint"]:
            shown = {k: round(v, 4) for k, v in out["last_checkpoint"].items() if isinstance(v, float) and k != "time"}
            echo(f"last checkpoint: {shown}")
        for f in files:
            echo(f"plot: {f}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``eval`` command."""
    p = sub.add_parser("eval", help="evaluate edits on CounterFact or zsRE (one edit per case, or a sequential run)",
                       description="Without --sequential: every case is edited, scored with ROME's metrics and "
                       "undone, so each starts from the same model. With --sequential DIR: the cases are applied one "
                       "after another (resumable from DIR) with periodic retention, specificity and perplexity.")
    add_model_args(p)
    add_edit_args(p)
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
