"""Evaluation data files: CounterFact or zsRE records told apart by their fields, and lists of
texts (perplexity and WikiText paragraphs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

from fastrome.evaluation.counterfact import load_counterfact, read_json_list
from fastrome.evaluation.zsre import load_zsre

FORMATS = ("auto", "counterfact", "zsre")


def data_format(path: Union[str, "os.PathLike[str]"]) -> str:
    """``"zsre"`` when the file's first record has ``src`` and ``alt`` (zsRE's fields), else
    ``"counterfact"``; ``ValueError`` when the file is not a JSON list."""
    first = read_json_list(path, "data")[:1]
    return "zsre" if first and isinstance(first[0], dict) and "src" in first[0] and "alt" in first[0] else "counterfact"


def load_cases(path: Union[str, "os.PathLike[str]"], format: str = "auto",
               limit: Optional[int] = None) -> Tuple[str, Any]:
    """(format, cases) of a CounterFact or zsRE file: :func:`load_counterfact` or :func:`load_zsre`
    (their ``skipped`` attribute lists the records left out); ``format="auto"`` decides by
    :func:`data_format`. ``ValueError`` names the argument at fault."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    kind = data_format(path) if format == "auto" else format
    return kind, (load_zsre if kind == "zsre" else load_counterfact)(path, limit=limit)


def read_texts(path: Union[str, "os.PathLike[str]"]) -> List[str]:
    """The non-blank texts of a ``.txt`` file (one per line) or a ``.json`` list of strings or of
    objects with ``Text`` / ``text``. ``ValueError`` (``"path: ..."``) when there is none or the
    file cannot be read as such."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path: {str(path)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"path: {str(p)!r} is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise ValueError(f"path: cannot read {str(p)!r} ({exc.strerror or exc})") from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"path: {str(path)!r} is not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise ValueError(f"path: {str(path)!r} holds a {type(data).__name__}, expected a JSON list of texts")
        texts = [d.get("Text", d.get("text")) if isinstance(d, dict) else d for d in data]
    else:
        texts = [line.strip() for line in text.splitlines()]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"path: no texts in {str(path)!r}")
    return texts
