"""Text corpora for the MLP-key statistics that ROME needs.

ROME's update uses ``C = E[k kᵀ]``, the second moment of a layer's MLP keys over natural text.
This module supplies that text: the bundled offline default (lead paragraphs of English Wikipedia
"vital articles", CC BY-SA 4.0, see ``fastrome/data/NOTICE``) or local files the user points at.

Two properties matter more than speed here, because the statistics are expensive and get cached:

* **Deterministic order.** Statistics are usually computed over a prefix of the corpus (a token
  budget), so the document order decides which text is used. The order depends only on the
  content and ``seed``, never on file-system listing order, mtimes or the process.
* **A content-derived id.** :attr:`Corpus.id` is meant to be part of cache keys. It changes when
  the text, the seed or the JSON field change, and it does not depend on where the files live, so a
  cache survives moving a checkout but not editing the corpus.

Only safe formats are read (plain text, JSON lines, gzip, xz); nothing is unpickled. Corpora are
read fully into memory: the ones this is meant for are a few MB, and the shuffle needs the list.

This module deliberately imports nothing heavy (no torch), so corpora can be inspected and
validated without the numerical stack.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import lzma
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Union

__all__ = ["BUNDLED_CORPUS_NAME", "SUPPORTED_SUFFIXES", "Corpus", "open_corpus"]

#: ``open_corpus`` source names that select the bundled corpus (as does ``None``).
BUNDLED_CORPUS_NAME = "bundled"
_BUNDLED_ALIASES = frozenset({BUNDLED_CORPUS_NAME, "default"})
_BUNDLED_RESOURCE = "wiki_vital_en.jsonl.xz"
_BUNDLED_STEM = "wiki_vital_en"

#: File name endings ``open_corpus`` accepts (matched case-insensitively).
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".txt",
    ".jsonl",
    ".txt.gz",
    ".jsonl.gz",
    ".txt.xz",
    ".jsonl.xz",
)

# Length of the hex digest kept in ids: 48 bits is plenty to tell corpus versions apart while
# keeping ids short enough to read in cache file names and logs.
_DIGEST_HEX = 12

# A paragraph break is a newline, then any run of whitespace-only lines, then a newline. Matching
# `\n\s*\n` greedily swallows several blank lines (and their stray spaces/tabs) in one split.
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")

_ACCEPTED = (
    f"None, {BUNDLED_CORPUS_NAME!r} or 'default' (the bundled corpus), a local file ending in "
    + ", ".join(SUPPORTED_SUFFIXES)
    + ", or a directory containing such files"
)

PathInput = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Corpus:
    """An in-memory corpus of documents in a fixed, reproducible order.

    Build instances with :func:`open_corpus`; the constructor is public only so that tests and
    callers with text already in memory can wrap it (they are then responsible for a meaningful
    ``id``).

    Attributes:
        id: Stable identity for cache keys, e.g. ``"bundled:wiki_vital_en@8bdb5189629f#seed=0"``.
            Changes whenever the text, seed or JSON text field changes; independent of the
            absolute path and of file modification times.
        description: Human-readable summary for logs and reports.
    """

    id: str
    description: str
    # The documents, already in their final (shuffled) order. A tuple keeps the frozen dataclass
    # honestly immutable; excluded from repr/eq/hash because `id` already identifies the content
    # and hashing megabytes of text on every dict lookup would be wasteful.
    _documents: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def documents(self) -> Iterator[str]:
        """Yield every document once, in the corpus order (a function of content and seed only)."""
        return iter(self._documents)

    def __len__(self) -> int:
        """Number of documents."""
        return len(self._documents)


def open_corpus(source: PathInput | None = None, *, seed: int | None = 0, text_field: str = "text") -> Corpus:
    """Open a corpus of natural text.

    Args:
        source: Where the text comes from:

            * ``None``, ``"bundled"`` or ``"default"``: the bundled Wikipedia corpus (offline).
              These names win over a local file of the same name; use ``"./bundled"`` for that.
            * a ``.txt`` file: documents are paragraphs separated by one or more blank lines,
              stripped; empty paragraphs are dropped.
            * a ``.jsonl`` file: one JSON object per line, document = ``obj[text_field]``. Blank
              lines are skipped; so are documents that are empty or whitespace only, since they
              carry no text to take statistics from.
            * ``.txt.gz``, ``.jsonl.gz``, ``.txt.xz``, ``.jsonl.xz``: the same, compressed.
            * a directory: every supported file below it, recursively, in order of relative
              path (POSIX form, so the order is the same on every platform), documents
              concatenated before shuffling. Files with other suffixes are ignored, as are
              hidden files and directories (names starting with ``.``), which are typically
              editor/notebook copies that would silently duplicate text.
        seed: Seed for ``random.Random(seed).shuffle`` over the document list; ``None`` keeps
            file order. Part of the id.
        text_field: JSON key holding the text in ``.jsonl`` files (the bundled corpus has
            ``"text"`` and ``"title"``). Part of the id when it is not ``"text"`` and the corpus
            contains JSON lines.

    Returns:
        The :class:`Corpus`.

    Raises:
        ValueError: ``source`` does not exist, has an unsupported suffix, or yields no
            documents; or a JSON line is invalid, is not an object, or lacks ``text_field`` as a
            string (the message names the file and 1-based line number); or a file is not valid
            UTF-8 or not a valid gzip/xz stream.
        TypeError: ``source``, ``seed`` or ``text_field`` has the wrong type.
        FileNotFoundError: the bundled corpus is missing from the installation.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        # random.Random accepts str/bytes/float seeds too, but the seed is baked into the id and
        # must print unambiguously, so only integers are allowed.
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}: {seed!r}")
    if not isinstance(text_field, str) or not text_field:
        raise TypeError(f"text_field must be a non-empty str, got {text_field!r}")

    if source is None or (isinstance(source, str) and source in _BUNDLED_ALIASES):
        return _open_bundled(seed=seed, text_field=text_field)

    try:
        path = Path(os.fspath(source))
    except TypeError:
        raise TypeError(
            f"source must be a str, os.PathLike or None, got {type(source).__name__}: {source!r}"
        ) from None
    if isinstance(source, str) and not source:
        # Path("") is the current directory, which would silently read whatever is there.
        raise ValueError(f"source={source!r} is empty; expected {_ACCEPTED}")

    if path.is_dir():
        files = _supported_files(path)
        if not files:
            raise ValueError(
                f"source={source!r} is a directory with no supported files; expected {_ACCEPTED}"
            )
        kind = "directory"
    elif path.is_file():
        if _suffix_of(path.name) is None:
            raise ValueError(f"source={source!r} has an unsupported file type; expected {_ACCEPTED}")
        # The single file's "relative path" is its name: the id must not depend on the directory.
        files = [(path.name, path)]
        kind = "file"
    else:
        raise ValueError(f"source={source!r} does not exist; expected {_ACCEPTED}")

    hasher = hashlib.sha256()
    docs: list[str] = []
    uses_json = False
    for rel, file_path in files:
        raw = file_path.read_bytes()
        # Hash exactly the bytes that are parsed (not a second read) so the id cannot disagree
        # with the text if the file changes meanwhile. Length prefixes make the concatenation
        # unambiguous: ("ab", b"c") and ("a", b"bc") must not collide.
        rel_bytes = rel.encode("utf-8")
        hasher.update(len(rel_bytes).to_bytes(8, "little"))
        hasher.update(rel_bytes)
        hasher.update(len(raw).to_bytes(8, "little"))
        hasher.update(raw)
        suffix = _suffix_of(rel)
        assert suffix is not None  # guaranteed by _supported_files / the check above
        uses_json = uses_json or suffix.startswith(".jsonl")
        docs.extend(_parse_file(raw, suffix, file_path, text_field))

    if not docs:
        raise ValueError(f"source={source!r} contains no documents (only empty text); expected {_ACCEPTED}")

    # abspath (not resolve) so "." or "data/.." get their real directory name, while a symlink
    # keeps the name the user gave it; only this last component enters the id, never the path.
    name = Path(os.path.abspath(path)).name or path.name
    corpus_id = f"file:{name}@{hasher.hexdigest()[:_DIGEST_HEX]}"
    # The field only changes the text when JSON lines are read, so a .txt corpus keeps one id
    # whatever text_field the caller happens to pass.
    if uses_json and text_field != "text":
        corpus_id += f"#field={text_field}"
    corpus_id += _seed_tag(seed)

    if kind == "directory":
        description = f"directory {name} ({len(files):,} files, {len(docs):,} documents)"
    else:
        description = f"file {name} ({len(docs):,} documents)"
    if text_field != "text" and uses_json:
        description += f", field {text_field!r}"
    return Corpus(id=corpus_id, description=description, _documents=_ordered(docs, seed))


# --------------------------------------------------------------------------------------------
# internals


def _seed_tag(seed: int | None) -> str:
    return "#seed=none" if seed is None else f"#seed={seed}"


def _ordered(docs: Sequence[str], seed: int | None) -> tuple[str, ...]:
    """Apply the seeded shuffle.

    A private ``random.Random`` instance leaves the global RNG untouched, and CPython's Mersenne
    Twister seeding and ``shuffle`` algorithm have been stable across 3.x releases, so the order
    is reproducible across processes and Python versions.
    """
    if seed is None:
        return tuple(docs)
    shuffled = list(docs)
    random.Random(seed).shuffle(shuffled)
    return tuple(shuffled)


def _suffix_of(name: str) -> str | None:
    """Return the supported suffix ``name`` ends with (lower-cased), or None."""
    lower = name.lower()
    # Longest first, so "x.jsonl.xz" is not mistaken for an unsupported ".xz" file, and the
    # compressed variants are recognised before their plain counterparts.
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return suffix
    return None


def _supported_files(root: Path) -> list[tuple[str, Path]]:
    """All supported, non-hidden files below ``root`` as ``(relative POSIX path, path)``, sorted."""
    found: list[tuple[str, Path]] = []
    # os.walk without followlinks: a symlinked directory could otherwise loop or pull in text
    # from outside the corpus. Symlinked *files* are read (is_file follows them).
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or _suffix_of(name) is None:
                continue
            full = Path(dirpath, name)
            if not full.is_file():
                continue
            found.append((full.relative_to(root).as_posix(), full))
    # Sort on the POSIX relative path, not os.walk order (which is file-system dependent).
    found.sort(key=lambda item: item[0])
    return found


def _decompress(raw: bytes, suffix: str, file_path: Path) -> bytes:
    try:
        if suffix.endswith(".gz"):
            return gzip.decompress(raw)
        if suffix.endswith(".xz"):
            return lzma.decompress(raw)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise ValueError(f"{file_path}: cannot decompress ({suffix}): {exc}") from None
    return raw


def _decode(data: bytes, file_path: Path) -> str:
    try:
        # utf-8-sig: tolerate the byte-order mark some Windows editors write; it would otherwise
        # end up glued to the first document (or break the first JSON line).
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file_path}: not valid UTF-8 text: {exc}") from None


def _parse_file(raw: bytes, suffix: str, file_path: Path, text_field: str) -> list[str]:
    text = _decode(_decompress(raw, suffix, file_path), file_path)
    if suffix.startswith(".jsonl"):
        return _parse_jsonl(text, file_path, text_field)
    return _split_paragraphs(text)


def _split_paragraphs(text: str) -> list[str]:
    """Split plain text into paragraphs at blank lines; strip each, drop empty ones."""
    # Normalise line endings first so a CRLF file splits like an LF one.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _parse_jsonl(text: str, file_path: Path, text_field: str) -> list[str]:
    """Documents from JSON lines: ``obj[text_field]`` of each non-blank line."""
    docs: list[str] = []
    # split("\n") rather than splitlines(): JSON strings may legitimately contain U+2028 and
    # other characters that splitlines() treats as line breaks, which would corrupt the record
    # and the reported line numbers.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{file_path}: line {lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        # ValueError, not TypeError, for wrong JSON types: the fault is in the file's data, not
        # in how the function was called, and callers handle all corpus problems as ValueError.
        if not isinstance(obj, dict):
            raise ValueError(  # noqa: TRY004
                f"{file_path}: line {lineno}: expected a JSON object, got {type(obj).__name__}"
            )
        if text_field not in obj:
            raise ValueError(
                f"{file_path}: line {lineno}: missing field {text_field!r} "
                f"(keys: {', '.join(map(repr, sorted(obj)[:10]))})"
            )
        value = obj[text_field]
        if not isinstance(value, str):
            raise ValueError(  # noqa: TRY004
                f"{file_path}: line {lineno}: field {text_field!r} is {type(value).__name__}, not a string"
            )
        if value.strip():
            docs.append(value)
    return docs


@functools.lru_cache(maxsize=4)
def _bundled_raw_documents(text_field: str) -> tuple[str, tuple[str, ...]]:
    """Digest and file-order documents of the bundled corpus.

    Cached because decompressing and parsing ~5 MB of JSON takes a noticeable fraction of a
    second and callers (tests, CLI runs over several layers) open the default corpus repeatedly;
    the package data cannot change while the process runs.
    """
    resource = resources.files("fastrome").joinpath("data").joinpath(_BUNDLED_RESOURCE)
    try:
        raw = resource.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the bundled corpus fastrome/data/{_BUNDLED_RESOURCE} is missing from this installation "
            "(package data not installed?); reinstall fastrome or pass a local corpus as source"
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    docs = _parse_file(raw, ".jsonl.xz", Path(f"<bundled {_BUNDLED_RESOURCE}>"), text_field)
    return digest, tuple(docs)


def _open_bundled(*, seed: int | None, text_field: str) -> Corpus:
    digest, docs = _bundled_raw_documents(text_field)
    corpus_id = f"bundled:{_BUNDLED_STEM}@{digest[:_DIGEST_HEX]}"
    # The bundled file also has "title"; selecting it is unusual but must not share a cache key.
    if text_field != "text":
        corpus_id += f"#field={text_field}"
    corpus_id += _seed_tag(seed)
    description = f"bundled Wikipedia vital-article leads ({len(docs):,} documents, CC BY-SA 4.0)"
    if text_field != "text":
        description += f", field {text_field!r}"
    return Corpus(id=corpus_id, description=description, _documents=_ordered(docs, seed))
