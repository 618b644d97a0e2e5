"""The command as a package: what callers import from ``fastrome.cli``, and the evaluation logic it
hands to the library."""

from __future__ import annotations

import subprocess
import sys

from fastrome.evaluation import CounterFactCase, ZsreCase
from fastrome.requests import parse_requests
from fastrome.sequential import records_from_cases


def test_names_callers_import_stay_on_the_package():
    import fastrome.cli as cli

    assert callable(cli.main) and callable(cli.build_parser) and callable(cli.info) and callable(cli._show_log)
    assert cli.parse_layers("3-5", 8, 0) == [3, 4, 5]
    assert issubclass(cli.UsageError, SystemExit) and cli.UsageError("x").code == 2


def test_every_command_is_registered_in_order():
    from fastrome.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == ["edit", "demo", "stats", "eval", "plot", "info"]


def test_python_dash_m_fastrome_cli_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "fastrome.cli", "plot", "--labels", "a"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "the following arguments are required" in proc.stderr


def test_records_from_cases_carry_the_locality_prompt():
    (cf_req, zsre_req) = parse_requests([
        {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"},
        {"prompt": "{} plays", "subject": "LeBron James", "target_new": "chess"},
    ])
    cf = CounterFactCase(case_id=1, request=cf_req, target_true="Paris", paraphrase_prompts=(),
                         neighborhood=(("The Louvre is in", "Paris"), ("Notre-Dame is in", "Paris")))
    zsre = ZsreCase(case_id=0, request=zsre_req, src="{} plays", rephrase="LeBron James is a player of",
                    loc="Who wrote Hamlet?", loc_ans="Shakespeare")
    bare = CounterFactCase(case_id=2, request=cf_req, target_true="Paris", paraphrase_prompts=(), neighborhood=())
    records = records_from_cases([cf, zsre, bare])
    assert [r.get("locality_prompt") for r in records] == ["The Louvre is in", "Who wrote Hamlet?", None]
    assert records[0] == {**cf_req.to_dict(), "locality_prompt": "The Louvre is in"}
