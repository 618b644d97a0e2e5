"""``fastrome edit`` and ``fastrome demo``: edit facts and show greedy completions before and after."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from fastrome.cli.common import (
    UsageError,
    add_edit_args,
    add_model_args,
    check_edit_flags,
    check_layer,
    echo,
    editor,
    load,
    read_text,
)

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


def _read_requests(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The requests of ``--requests`` (JSON, JSONL, or an object with a ``requests`` list) followed
    by the one of ``--prompt``/``--subject``/``--target``."""
    requests: List[Dict[str, Any]] = []
    if args.requests:
        path = Path(args.requests)
        if not path.is_file():
            raise UsageError(f"--requests: {args.requests!r} is not a file")
        text = read_text(path, "--requests")
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


def _completions(model: Any, tok: Any, prompts: Sequence[str], n: int) -> Dict[str, str]:
    from fastrome.models import greedy_complete

    return {p: greedy_complete(model, tok, p, n) for p in prompts}


def _show_before_after(before: Dict[str, str], after: Dict[str, str]) -> None:
    width = max(len(p) for p in before)
    echo(f"{'prompt'.ljust(width)}  | before → after")
    for p in before:
        b, a = before[p].strip().replace("\n", " "), after[p].strip().replace("\n", " ")
        mark = " " if a == b else "*"
        echo(f"{p.ljust(width)} {mark}| {b!r} → {a!r}")


def _run_edit(args: argparse.Namespace, requests: List[Dict[str, Any]], probes: Sequence[str]) -> int:
    """Edit ``requests`` and show the completions of their prompts and ``probes`` before and after;
    status 3 when the editor refused an edit."""
    from fastrome import EditRefused
    from fastrome.requests import parse_requests

    parsed = parse_requests([{k: v for k, v in r.items() if k != "probes"} for r in requests])
    check_layer(args)
    model, tok = load(args)
    prompts = list(dict.fromkeys([r.text for r in parsed] + list(probes)))
    before = _completions(model, tok, prompts, args.max_new_tokens)
    ed = editor(model, tok, args)
    try:
        report = ed.edit(parsed)
        status = 0
    except EditRefused as exc:
        report, status = exc.report, 3
        if not args.json:
            echo(f"refused: {exc}")
    after = _completions(model, tok, prompts, args.max_new_tokens)
    if args.output:
        ed.save_merged(args.output)
    if args.json:
        out = report.to_dict()
        out["completions"] = {p: {"before": before[p], "after": after[p]} for p in prompts}
        out["layer"], out["stats"] = ed.layer, ed.stats_source()
        echo(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        echo()
        _show_before_after(before, after)
        echo()
        echo(report.table())
        if args.output:
            echo(f"\nedited model written to {args.output}")
    return status


def cmd_edit(args: argparse.Namespace) -> int:
    check_edit_flags(args)
    return _run_edit(args, _read_requests(args), probes=args.probe or [])


def cmd_demo(args: argparse.Namespace) -> int:
    check_edit_flags(args)
    if not args.json:
        echo("fastrome demo: three well-known facts rewritten in SmolLM2-135M-Instruct.")
        echo("Rows marked * changed; the probes below each edited prompt check paraphrases and neighbours.\n")
    probes = [p for r in DEMO_REQUESTS for p in r["probes"]]
    return _run_edit(args, DEMO_REQUESTS, probes)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``edit`` and ``demo`` commands."""
    p = sub.add_parser("edit", help="edit facts in a model and show completions before and after")
    add_model_args(p)
    add_edit_args(p)
    p.add_argument("--requests", help="JSON/JSONL file with requests (CounterFact or flat form)")
    p.add_argument("--prompt", help="prompt, with {} for the subject or containing it literally")
    p.add_argument("--subject", help="subject of the fact")
    p.add_argument("--target", help="new target")
    p.add_argument("--probe", action="append", help="extra prompt to complete before and after (repeatable)")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("demo", help="edit three well-known facts in the default model")
    add_model_args(p)
    add_edit_args(p)
    p.set_defaults(func=cmd_demo)
