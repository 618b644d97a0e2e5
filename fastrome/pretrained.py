"""Edits as a Hugging Face-style artifact: a folder that names its base model and replays onto it.

``Editor.save_pretrained(folder)`` writes::

    edits.safetensors   every applied edit: factors u, Λ and the solved keys (fp32), with the
                        requests, records and sha256 of each (:func:`fastrome.journal.save_edits`)
    fastrome.json       the base weights' digests, the editor's config, the statistics each edited
                        layer was solved with, the context templates, the fastrome version
    README.md           a model card listing every edited fact (subject, prompt, old → new)

``Editor.from_pretrained(model, tokenizer, folder)`` checks the base weights against the digests,
replays the factors in order (the edited weights bit for bit) and returns an editor that can undo
any of them and keep editing with the same settings and templates.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from fastrome.cache import write_json, write_text
from fastrome.config import EditConfig
from fastrome.journal import JournalEntry, read_edits, save_edits

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = "fastrome.pretrained.v1"
EDITS = "edits.safetensors"
META = "fastrome.json"


@dataclass
class SavedEdits:
    """What :func:`read_pretrained` found in a folder."""

    entries: List[JournalEntry]
    base_digests: Dict[int, str]
    config: EditConfig
    module_template: str
    templates: Optional[List[str]]
    meta: Dict[str, Any]


def write_pretrained(
    path: PathLike,
    entries: List[JournalEntry],
    base_digests: Dict[int, str],
    *,
    config: EditConfig,
    module_template: str,
    model_type: str,
    base_model: Optional[str],
    templates: Optional[List[str]],
    stats: Dict[int, str],
    requests: List[Dict[str, Any]],
    version: str,
) -> Path:
    """Write the folder described in the module docstring; ``requests`` are the edits' requests,
    one per edit (a spread edit's parts share one)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path: {str(path)!r} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    save_edits(entries, base_digests, path / EDITS, model_type)
    write_json(path / META, {
        "format": FORMAT,
        "fastrome": version,
        "base_model": base_model,
        "model_type": model_type,
        "module_template": module_template,
        "base_digests": {str(k): v for k, v in sorted(base_digests.items())},
        "config": config.to_dict(),
        "stats": {str(k): v for k, v in sorted(stats.items())},
        "templates": templates,
        "edits": len(requests),
    })
    write_text(path / "README.md", model_card(requests, config, base_model, sorted(base_digests), version))
    return path


def read_pretrained(path: PathLike) -> SavedEdits:
    """Read a folder written by :func:`write_pretrained` (every factor verified by its sha256)."""
    path = Path(path)
    if not (path / META).is_file() or not (path / EDITS).is_file():
        raise ValueError(f"path: {str(path)!r} is not a saved-edits folder (it needs {META} and {EDITS}; "
                         "Editor.save_pretrained writes them)")
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"path: {str(path / META)!r} cannot be read ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {str(path / META)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    entries, digests = read_edits(path / EDITS)
    names = {f.name for f in fields(EditConfig)}
    saved = meta.get("config") or {}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise ValueError(f"path: {str(path / META)!r} has config fields this fastrome does not know ({unknown}); "
                         f"it was written by fastrome {meta.get('fastrome')}")
    config = EditConfig(**saved).validate()
    return SavedEdits(entries, digests, config, str(meta["module_template"]), meta.get("templates"), meta)


def model_card(requests: List[Dict[str, Any]], config: EditConfig, base_model: Optional[str],
               layers: List[int], version: str) -> str:
    """A README.md for the folder: what was edited, on which base, how."""
    base = base_model or "the base model"
    settings = ", ".join(f"{k}={v!r}" for k, v in config.lifelong_settings().items())
    lines = [
        "---",
        "library_name: fastrome",
        *([f"base_model: {base_model}"] if base_model else []),
        "tags: [model-editing, rome, fastrome]",
        "---",
        "",
        f"# {len(requests)} edited fact{'s' if len(requests) != 1 else ''} for {base}",
        "",
        f"Rank-one edits of the down projections of layers {', '.join(map(str, layers))}, made with fastrome "
        f"{version} ({settings}). Load them onto the unedited base model with",
        "",
        "```python",
        "editor = fastrome.Editor.from_pretrained(model, tokenizer, \"<this folder>\")",
        "```",
        "",
        "| # | subject | prompt | old → new |",
        "|---|---|---|---|",
    ]
    for i, req in enumerate(requests):
        subject, prompt = str(req.get("subject", "")), str(req.get("prompt", ""))
        old, new = _text(req.get("target_true")), _text(req.get("target_new"))
        cells = [subject, prompt.replace("{}", subject), f"{old or '?'} → {new}"]
        lines.append(f"| {i} | " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _text(target: Any) -> str:
    return str(target.get("str", "")) if isinstance(target, dict) else ("" if target is None else str(target))
