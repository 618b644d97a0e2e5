"""The public API is exactly what README.md's "Python API" section documents."""

from __future__ import annotations

import re
from pathlib import Path

import fastrome

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Python API")
    return text[start:text.index("\n## ", start + 1)]


def test_all_is_exactly_the_documented_surface():
    documented = set(re.findall(r"`fastrome\.([A-Za-z_]\w*)(?![\w.])", _api_section()))
    documented |= set(re.findall(r"`fastrome\.([A-Za-z_]\w*)\.[a-z_]+\(", _api_section()))  # fastrome.X.method(
    documented -= {"json", "__all__"}  # the saved folder's fastrome.json; the list itself
    assert documented - set(fastrome.__all__) == set(), "documented but not exported"
    assert set(fastrome.__all__) - documented == set(), "exported but not documented"


def test_every_public_name_resolves_and_says_what_it_is():
    for name in fastrome.__all__:
        obj = getattr(fastrome, name)
        if name != "CLASSIC":
            assert (getattr(obj, "__doc__", None) or "").strip(), f"fastrome.{name} has no docstring"


def test_the_editor_methods_a_user_calls_are_documented():
    section = _api_section()
    public = {n for n in vars(fastrome.Editor) if not n.startswith("_") and callable(getattr(fastrome.Editor, n))}
    missing = {n for n in public if f".{n}(" not in section}
    # inspection helpers shown in reports rather than in the table
    assert missing <= {"close", "solver", "stats_source", "templates", "done_case_ids", "applied_records",
                       "drift"}, missing
