"""Evaluation data files: format detection, loading, text lists."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fastrome.evaluation import load_cases, read_texts

DATA = Path(os.environ.get("FASTROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
COUNTERFACT = DATA / "counterfact" / "counterfact_dev.json"
ZSRE = DATA / "zsre" / "zsre_mend_train-1k.json"


def test_load_cases_tells_the_formats_apart():
    kind, cases = load_cases(COUNTERFACT, limit=3)
    assert kind == "counterfact" and len(cases) == 3
    kind, cases = load_cases(ZSRE, limit=4)
    assert kind == "zsre" and len(cases) == 4
    # a format named wins over the detection: zsRE records read as CounterFact are all skipped
    kind, cases = load_cases(ZSRE, "counterfact", limit=4)
    assert kind == "counterfact" and len(cases) == 0 and len(cases.skipped) == 4


def test_load_cases_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="^format: .*'csv'"):
        load_cases(COUNTERFACT, "csv")
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="holds a dict"):
        load_cases(bad)


def test_read_texts(tmp_path):
    lines = tmp_path / "t.txt"
    lines.write_text("first\n\n  second  \n", encoding="utf-8")
    assert read_texts(lines) == ["first", "second"]
    listed = tmp_path / "t.json"
    listed.write_text(json.dumps(["a", {"Text": "b"}, {"text": "c"}, {"other": "d"}, 3, " "]), encoding="utf-8")
    assert read_texts(listed) == ["a", "b", "c"]
    for name, content, message in [("none.txt", "\n \n", "no texts"), ("bad.json", "[", "not valid JSON"),
                                   ("dict.json", "{}", "holds a dict")]:
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=f"^path: .*{message}"):
            read_texts(tmp_path / name)
    with pytest.raises(ValueError, match="is not a file"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_texts(tmp_path / "latin.txt")
