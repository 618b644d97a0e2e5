#!/usr/bin/env python3
"""Regenerate ``fastrome/data/wiki_vital_en.jsonl.xz``, the bundled offline default corpus.

Input: a JSON-lines file of English Wikipedia "vital article" lead paragraphs, one object per line
with at least the keys ``title`` and ``text`` (the source extract also has ``topic``, which is
dropped because nothing reads it). Output: the same lines, in the same order, reduced to
``{"title": ..., "text": ...}`` and compressed with xz.

The result is byte-identical on every rerun with the same input: the JSON serialisation is fixed
(key order, separators, ``ensure_ascii=False``) and liblzma output depends only on the input bytes
and the filter settings, which are pinned here. The corpus id in ``fastrome.corpus`` is derived
from the sha256 of this file, so an unintended change of bytes would silently invalidate every
cached statistic; the printed sha256 makes such a change visible in review.

Usage::

    python scripts/make_bundled_corpus.py /path/to/wiki_vital_en_extracts.jsonl
    python scripts/make_bundled_corpus.py IN.jsonl -o fastrome/data/wiki_vital_en.jsonl.xz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "fastrome" / "data" / "wiki_vital_en.jsonl.xz"
KEPT_FIELDS = ("title", "text")
# Pinned so that a change of liblzma defaults cannot change the bytes. CHECK_CRC64 is the xz
# default and what `xz` itself writes.
XZ_PRESET = 9 | lzma.PRESET_EXTREME
XZ_CHECK = lzma.CHECK_CRC64


def build_payload(src: Path) -> bytes:
    """Return the uncompressed JSON-lines payload: ``title`` and ``text`` of every input line."""
    out: list[str] = []
    with src.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{src}:{lineno}: invalid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise SystemExit(f"{src}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for key in KEPT_FIELDS:
                if not isinstance(obj.get(key), str):
                    raise SystemExit(f"{src}:{lineno}: field {key!r} missing or not a string")
            # ensure_ascii=False keeps non-Latin text as UTF-8 rather than \\uXXXX escapes, which
            # compresses better and keeps the decompressed file readable.
            out.append(json.dumps({k: obj[k] for k in KEPT_FIELDS}, ensure_ascii=False) + "\n")
    if not out:
        raise SystemExit(f"{src}: no records")
    return "".join(out).encode("utf-8")


def compress(payload: bytes) -> bytes:
    """Compress with the pinned xz settings (deterministic for a given payload)."""
    return lzma.compress(payload, format=lzma.FORMAT_XZ, check=XZ_CHECK, preset=XZ_PRESET)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="source JSON-lines file (keys: title, text[, topic])")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"output .xz file (default: {DEFAULT_OUTPUT})",
    )
    args = parser.parse_args(argv)

    payload = build_payload(args.input)
    data = compress(payload)
    # Round-trip check: the package reads this file at runtime, so a corrupt write must fail here.
    if lzma.decompress(data) != payload:
        raise SystemExit("internal error: xz round trip mismatch")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file and rename so an interrupted run never leaves a truncated corpus.
    fd, tmp = tempfile.mkstemp(dir=args.output.parent, prefix=args.output.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, args.output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # mkstemp creates 0600; package data should be world-readable like any other source file.
    os.chmod(args.output, 0o644)

    n_lines = payload.count(b"\n")
    print(
        f"wrote {args.output} ({len(data):,} bytes, {n_lines:,} documents, "
        f"{len(payload):,} bytes uncompressed)"
    )
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
