"""Text corpora for the MLP-key statistics that ROME needs.

ROME's update uses ``C = E[k kᵀ]``, the second moment of a layer's MLP keys over natural text.
This module supplies that text: the bundled offline default (lead paragraphs of English Wikipedia
"vital articles", CC BY-SA 4.0, see ``fastrome/data/NOTICE``), local files the user points at, or
a Hugging Face dataset (``"hf:NAME/CONFIG:SPLIT"``).

A corpus holds one of two kinds of documents:

* **text** (``.txt``, ``.jsonl``, their gzip/xz variants, ``.parquet``, Hugging Face datasets),
  which the statistics code tokenizes with the model's tokenizer; or
* **token ids** (``.npy``, ``.safetensors``): a *pre-tokenized* corpus, for text that was
  tokenized elsewhere. Its ids must belong to the model's vocabulary; :attr:`Corpus.max_token_id`
  lets callers check that before running a model.

:meth:`Corpus.token_ids` yields token ids for either kind, so consumers need not tell them apart.

Two properties matter more than speed here, because the statistics are expensive and get cached:

* **Deterministic order.** Statistics are usually computed over a prefix of the corpus (a token
  budget), so the document order decides which text is used. The order depends only on the
  content and ``seed``, never on file-system listing order, mtimes or the process.
* **A content-derived id.** :attr:`Corpus.id` is meant to be part of cache keys. It changes when
  the text (or token ids), the seed or the text field change, and it does not depend on where the
  files live, so a cache survives moving a checkout but not editing the corpus.

Only safe formats are read (plain text, JSON lines, gzip, xz, Parquet, ``.npy`` without pickles,
safetensors); nothing is unpickled. Corpora are read fully into memory, since the shuffle needs the
whole list: fine for the few-MB corpora this is mostly meant for; a large Hugging Face dataset is
better sliced (``"hf:NAME/CONFIG:train[:20000]"``).

This module deliberately imports nothing heavy (no torch), so corpora can be inspected and
validated without the numerical stack. numpy (token ids), pyarrow (Parquet) and ``datasets``
(Hugging Face) are imported only when a corpus needs them; the latter two are optional.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "BUNDLED_CORPUS_NAME",
    "HF_PREFIX",
    "SUPPORTED_SUFFIXES",
    "TEXT_SUFFIXES",
    "TOKEN_SUFFIXES",
    "Corpus",
    "open_corpus",
]

#: ``open_corpus`` source names that select the bundled corpus (as does ``None``).
BUNDLED_CORPUS_NAME = "bundled"
_BUNDLED_ALIASES = frozenset({BUNDLED_CORPUS_NAME, "default"})
_BUNDLED_RESOURCE = "wiki_vital_en.jsonl.xz"
_BUNDLED_STEM = "wiki_vital_en"

#: An ``open_corpus`` source (a str) starting with this prefix names a Hugging Face dataset.
HF_PREFIX = "hf:"
_HF_DEFAULT_SPLIT = "train"

#: File name endings of text files (matched case-insensitively).
TEXT_SUFFIXES: tuple[str, ...] = (
    ".txt",
    ".jsonl",
    ".txt.gz",
    ".jsonl.gz",
    ".txt.xz",
    ".jsonl.xz",
    ".parquet",
)

#: File name endings of pre-tokenized files: integer token-id arrays (matched case-insensitively).
TOKEN_SUFFIXES: tuple[str, ...] = (".npy", ".safetensors")

#: Every file name ending ``open_corpus`` accepts (matched case-insensitively).
SUPPORTED_SUFFIXES: tuple[str, ...] = TEXT_SUFFIXES + TOKEN_SUFFIXES

# Suffixes whose documents come from a named field (JSON key, Parquet column), so `text_field`
# changes the text read.
_FIELD_SUFFIXES = frozenset({".jsonl", ".jsonl.gz", ".jsonl.xz", ".parquet"})

# Length of the hex digest kept in ids: 48 bits is plenty to tell corpus versions apart while
# keeping ids short enough to read in cache file names and logs.
_DIGEST_HEX = 12

# A paragraph break is a newline, then any run of whitespace-only lines, then a newline. Matching
# `\n\s*\n` greedily swallows several blank lines (and their stray spaces/tabs) in one split.
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")

_ACCEPTED = (
    f"None, {BUNDLED_CORPUS_NAME!r} or 'default' (the bundled corpus), "
    f"'{HF_PREFIX}NAME[/CONFIG][:SPLIT]' (a Hugging Face dataset), a local text file ending in "
    + ", ".join(TEXT_SUFFIXES)
    + ", a token-id file ending in "
    + ", ".join(TOKEN_SUFFIXES)
    + ", or a directory containing such files (all text or all token ids)"
)

PathInput = Union[str, "os.PathLike[str]"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class Corpus:
    """An in-memory corpus of documents in a fixed, reproducible order.

    Build instances with :func:`open_corpus`; the constructor is public only so that tests and
    callers with text already in memory can wrap it (they are then responsible for a meaningful
    ``id``).

    A corpus is either *text* (``_documents``) or *pre-tokenized* (``_token_documents``: 1-D,
    non-negative integer numpy arrays), never both. :meth:`token_ids` serves both kinds;
    :meth:`documents` only text.

    Attributes:
        id: Stable identity for cache keys, e.g. ``"bundled:wiki_vital_en@8bdb5189629f#seed=0"``.
            Changes whenever the text (or token ids), seed or text field changes; independent of
            the absolute path and of file modification times.
        description: Human-readable summary for logs and reports.
    """

    id: str
    description: str
    # The documents, already in their final (shuffled) order. A tuple keeps the frozen dataclass
    # honestly immutable; excluded from repr/eq/hash because `id` already identifies the content
    # and hashing megabytes of text on every dict lookup would be wasteful.
    _documents: tuple[str, ...] = field(default=(), repr=False, compare=False)
    # Token-id documents of a pre-tokenized corpus, in final order. numpy arrays (read-only, in the
    # file's integer dtype; rows of a 2-D file are views of one buffer) instead of lists of ints:
    # a Python int costs 28+8 bytes, a token 2-8, and these corpora can hold many millions.
    _token_documents: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._documents and self._token_documents:
            raise ValueError(
                f"Corpus {self.id!r}: has both text and token-id documents; a corpus holds one kind"
            )

    @property
    def pretokenized(self) -> bool:
        """True when the documents are token ids (``.npy``/``.safetensors``), not text."""
        return bool(self._token_documents)

    def documents(self) -> Iterator[str]:
        """Yield every document once, in the corpus order (a function of content and seed only).

        Raises:
            ValueError: the corpus is pre-tokenized (it has no text); use :meth:`token_ids`.
        """
        # Raised here, not on the first next(): a regular function fails at the call site.
        if self.pretokenized:
            raise ValueError(
                f"corpus {self.id} holds token ids, not text; use Corpus.token_ids() to read it"
            )
        return iter(self._documents)

    def token_ids(self, encode: Callable[[str], list[int]]) -> Iterator[list[int]]:
        """Yield every document's token ids once, in the corpus order.

        Args:
            encode: Tokenizer function for text corpora: ``encode(document)`` is yielded for each
                document, called lazily one document at a time. Unused (never called) for a
                pre-tokenized corpus, whose stored ids are yielded as plain ``list[int]``.

        Raises:
            TypeError: the corpus is text and ``encode`` is not callable.
        """
        if self.pretokenized:
            return (doc.tolist() for doc in self._token_documents)
        if not callable(encode):
            raise TypeError(f"encode must be callable, got {type(encode).__name__}: {encode!r}")
        return (encode(doc) for doc in self._documents)

    @functools.cached_property
    def max_token_id(self) -> int | None:
        """Largest token id of a pre-tokenized corpus (``None`` for text).

        Callers compare it with the model's vocabulary size before a pass: an id out of range
        would otherwise surface as an index error (or a CUDA assert) deep inside the model.
        Computed once, on first access. (cached_property writes the instance ``__dict__``
        directly, so it works on this frozen dataclass.)
        """
        if not self.pretokenized:
            return None
        return max((int(doc.max()) for doc in self._token_documents if doc.size), default=None)

    def __len__(self) -> int:
        """Number of documents (texts or token-id sequences)."""
        return len(self._token_documents) if self.pretokenized else len(self._documents)


def open_corpus(source: PathInput | None = None, *, seed: int | None = 0, text_field: str = "text") -> Corpus:
    """Open a corpus of natural text, or of token ids that were tokenized elsewhere.

    Args:
        source: Where the documents come from:

            * ``None``, ``"bundled"`` or ``"default"``: the bundled Wikipedia corpus (offline).
              These names win over a local file of the same name; use ``"./bundled"`` for that.
            * ``"hf:NAME"``, ``"hf:NAME/CONFIG"``, optionally followed by ``":SPLIT"`` (default
              ``"train"``; slices such as ``"train[:1000]"`` work): a Hugging Face dataset, e.g.
              ``"hf:wikitext/wikitext-103-raw-v1:train"``. Needs the ``datasets`` package (and
              usually network or its cache). Documents = the ``text_field`` column; empty,
              whitespace-only and null values are dropped. With one ``/`` the second part is the
              config; a namespaced dataset is written ``"hf:OWNER/NAME/CONFIG"``, or
              ``"hf:OWNER/NAME/"`` for its default config. A local path starting with ``hf:`` is
              read as ``"./hf:..."``.
            * a ``.txt`` file: documents are paragraphs separated by one or more blank lines,
              stripped; empty paragraphs are dropped.
            * a ``.jsonl`` file: one JSON object per line, document = ``obj[text_field]``. Blank
              lines are skipped; so are documents that are empty or whitespace only, since they
              carry no text to take statistics from.
            * ``.txt.gz``, ``.jsonl.gz``, ``.txt.xz``, ``.jsonl.xz``: the same, compressed.
            * a ``.parquet`` file (needs ``pyarrow``): document = the ``text_field`` column, in
              row order. It must be a string column; null, empty and whitespace-only values are
              dropped (a null is a missing text, not an error, as is common in exported tables).
            * a ``.npy`` file (read with ``allow_pickle=False``) or a ``.safetensors`` file (every
              tensor, in sorted key order; read through numpy, never torch): **token ids**, making
              the corpus *pre-tokenized*. Arrays must have an integer dtype and no negative
              values. A 1-D array is one document; a 2-D array is one document per row, taken
              whole (strip padding before saving; variable-length documents go in separate 1-D
              tensors of a ``.safetensors`` file). Zero-length documents are dropped.
            * a directory: every supported file below it, recursively, in order of relative
              path (POSIX form, so the order is the same on every platform), documents
              concatenated before shuffling. Files with other suffixes are ignored, as are
              hidden files and directories (names starting with ``.``), which are typically
              editor/notebook copies that would silently duplicate text. The files must be all
              text or all token ids.
        seed: Seed for ``random.Random(seed).shuffle`` over the document list (text or token
            ids); ``None`` keeps file order. Part of the id.
        text_field: JSON key (``.jsonl``) or column (``.parquet``, Hugging Face) holding the
            text (the bundled corpus has ``"text"`` and ``"title"``). Part of the id when it is
            not ``"text"`` and the corpus reads such a field.

    Returns:
        The :class:`Corpus`. Ids look like ``file:<name>@<digest>#seed=0`` (text files),
        ``file:<name>@<digest>#tokens#seed=0`` (token ids), ``hf:NAME/CONFIG:SPLIT@<digest>#seed=0``
        or ``bundled:wiki_vital_en@<digest>#seed=0``, with ``#field=<text_field>`` before the
        seed when the field matters. File digests cover the bytes and relative paths of the
        files read; the Hugging Face digest covers the documents' text.

    Raises:
        ValueError: ``source`` does not exist, has an unsupported suffix, mixes text and
            token-id files, or yields no documents; or a JSON line is invalid, is not an
            object, or lacks ``text_field`` as a string (the message names the file and 1-based
            line number); or a Parquet file lacks ``text_field`` as a string column (the message
            lists the columns); or a token-id array is not integer, has negative ids or is not
            1-D/2-D (the message names the file and tensor); or a file is not valid UTF-8, gzip,
            xz, Parquet, ``.npy`` or safetensors; or a Hugging Face dataset cannot be loaded.
        TypeError: ``source``, ``seed`` or ``text_field`` has the wrong type.
        ImportError: a ``.parquet`` file is read without ``pyarrow`` installed, or an ``hf:``
            source is opened without ``datasets``.
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
    # Only a str selects a dataset: a PathLike is always a local path.
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        return _open_hf(source, seed=seed, text_field=text_field)

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

    # Decided from the names before reading anything, so a mixed directory fails fast. Mixing is
    # refused because the two kinds cannot share one document stream: text still has to go
    # through a tokenizer, token ids must not, and which tokenizer made the ids is unknown here.
    token_files = [rel for rel, _ in files if _suffix_of(rel) in TOKEN_SUFFIXES]
    text_files = [rel for rel, _ in files if _suffix_of(rel) not in TOKEN_SUFFIXES]
    if token_files and text_files:
        raise ValueError(
            f"source={source!r} mixes text files (e.g. {text_files[0]!r}) and token-id files "
            f"(e.g. {token_files[0]!r}); a corpus must be all text or all token ids"
        )
    pretokenized = bool(token_files)

    hasher = hashlib.sha256()
    docs: list[str] = []
    token_docs: list[np.ndarray] = []
    uses_field = False
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
        if pretokenized:
            token_docs.extend(_parse_token_file(raw, suffix, file_path))
        else:
            uses_field = uses_field or suffix in _FIELD_SUFFIXES
            docs.extend(_parse_file(raw, suffix, file_path, text_field))

    n_docs = len(token_docs) if pretokenized else len(docs)
    if not n_docs:
        what = "only empty token arrays" if pretokenized else "only empty text"
        raise ValueError(f"source={source!r} contains no documents ({what}); expected {_ACCEPTED}")

    # abspath (not resolve) so "." or "data/.." get their real directory name, while a symlink
    # keeps the name the user gave it; only this last component enters the id, never the path.
    name = Path(os.path.abspath(path)).name or path.name
    corpus_id = f"file:{name}@{hasher.hexdigest()[:_DIGEST_HEX]}"
    if pretokenized:
        # The digest alone already differs from any text corpus (other bytes, other names), but
        # the tag makes the kind visible in cache names and guarantees the two never collide.
        corpus_id += "#tokens"
    # The field only changes the text when JSON lines or Parquet are read, so a .txt corpus keeps
    # one id whatever text_field the caller happens to pass.
    elif uses_field and text_field != "text":
        corpus_id += f"#field={text_field}"
    corpus_id += _seed_tag(seed)

    if kind == "directory":
        description = f"directory {name} ({len(files):,} files, {n_docs:,} documents"
    else:
        description = f"file {name} ({n_docs:,} documents"
    if pretokenized:
        description += f", {sum(int(d.size) for d in token_docs):,} tokens, pre-tokenized)"
        return Corpus(id=corpus_id, description=description, _token_documents=_ordered(token_docs, seed))
    description += ")"
    if text_field != "text" and uses_field:
        description += f", field {text_field!r}"
    return Corpus(id=corpus_id, description=description, _documents=_ordered(docs, seed))


# --------------------------------------------------------------------------------------------
# internals


def _seed_tag(seed: int | None) -> str:
    return "#seed=none" if seed is None else f"#seed={seed}"


def _ordered(docs: Sequence[_T], seed: int | None) -> tuple[_T, ...]:
    """Apply the seeded shuffle (to text or token-id documents alike).

    A private ``random.Random`` instance leaves the global RNG untouched, and CPython's Mersenne
    Twister seeding and ``shuffle`` algorithm have been stable across 3.x releases, so the order
    is reproducible across processes and Python versions.
    """
    if seed is None:
        return tuple(docs)
    shuffled = list(docs)
    random.Random(seed).shuffle(shuffled)
    return tuple(shuffled)


_SUFFIXES_LONGEST_FIRST = tuple(sorted(SUPPORTED_SUFFIXES, key=len, reverse=True))


def _suffix_of(name: str) -> str | None:
    """Return the supported suffix ``name`` ends with (lower-cased), or None."""
    lower = name.lower()
    # Longest first, so "x.jsonl.xz" is not mistaken for an unsupported ".xz" file, and the
    # compressed variants are recognised before their plain counterparts.
    for suffix in _SUFFIXES_LONGEST_FIRST:
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
    if suffix == ".parquet":
        return _parse_parquet(raw, file_path, text_field)
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


def _keep_text(values: Iterable[Any], where: str, text_field: str) -> list[str]:
    """The non-blank strings of a column; null values are skipped, other types are an error."""
    docs: list[str] = []
    for row, value in enumerate(values):
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(  # noqa: TRY004  (bad data, not a bad call; see _parse_jsonl)
                f"{where}: row {row}: field {text_field!r} is {type(value).__name__}, not a string"
            )
        if value.strip():
            docs.append(value)
    return docs


def _parse_parquet(raw: bytes, file_path: Path, text_field: str) -> list[str]:
    """Documents from the ``text_field`` string column of a Parquet file, in row order."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(
            f"{file_path}: reading .parquet corpora needs pyarrow: pip install pyarrow ({exc})"
        ) from exc

    try:
        # From the bytes already hashed (not the path), for the same reason as the text formats.
        parquet = pq.ParquetFile(io.BytesIO(raw))
        columns = parquet.schema_arrow.names
        # Only the one column is read: the others may be large (token lists, embeddings, ...).
        column = parquet.read(columns=[text_field]).column(text_field) if text_field in columns else None
    except (pa.ArrowException, OSError) as exc:
        # ArrowInvalid is also a ValueError, but its message does not say which file it was.
        raise ValueError(f"{file_path}: not a valid Parquet file: {exc}") from None
    if column is None:
        raise ValueError(
            f"{file_path}: no column {text_field!r} (columns: {', '.join(map(repr, columns))}); "
            "pass text_field= to choose one"
        )

    kind = column.type
    if pa.types.is_dictionary(kind):  # pandas "category" columns round-trip as dictionaries
        kind = kind.value_type
    is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    # string_view exists only in newer pyarrow releases.
    is_text = is_text or getattr(pa.types, "is_string_view", lambda _t: False)(kind)
    if not is_text:
        raise ValueError(
            f"{file_path}: column {text_field!r} has type {column.type}, not string "
            f"(columns: {', '.join(f'{f.name!r}: {f.type}' for f in parquet.schema_arrow)})"
        )
    return _keep_text(column.to_pylist(), str(file_path), text_field)


def _parse_token_file(raw: bytes, suffix: str, file_path: Path) -> list[np.ndarray]:
    """Token-id documents of a ``.npy`` or ``.safetensors`` file (see :func:`open_corpus`)."""
    import numpy as np

    if suffix == ".npy":
        try:
            # allow_pickle=False: an object array would run arbitrary code on load.
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{file_path}: not a valid .npy file (or holds Python objects): {exc}") from None
        if not isinstance(array, np.ndarray):
            # np.load sniffs the content, so an .npz archive renamed to .npy arrives here.
            array.close()
            raise ValueError(f"{file_path}: holds an .npz archive, not a single .npy array")
        return _token_rows(array, str(file_path))

    # safetensors.numpy, never safetensors.torch: this module must not need torch.
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_safetensors

    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError, TypeError, KeyError) as exc:
        # KeyError/TypeError: a dtype numpy has no type for (e.g. bfloat16), which is no token id.
        raise ValueError(f"{file_path}: not a readable safetensors file: {type(exc).__name__}: {exc}") from None
    docs: list[np.ndarray] = []
    # Sorted keys: the header's order is an accident of how the file was written.
    for key in sorted(tensors):
        docs.extend(_token_rows(tensors[key], f"{file_path}: tensor {key!r}"))
    return docs


def _token_rows(array: np.ndarray, where: str) -> list[np.ndarray]:
    """Validate one token-id array and split it into documents (1-D: one, 2-D: one per row)."""
    import numpy as np

    # np.integer excludes bool, floats (a float "id" is almost surely the wrong array) and
    # complex; both signed and unsigned widths are fine.
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where}: dtype {array.dtype} is not an integer type; token ids must be integers")
    if array.ndim not in (1, 2):
        raise ValueError(
            f"{where}: {array.ndim}-D array of shape {tuple(array.shape)}; expected 1-D (one document) "
            "or 2-D (one document per row)"
        )
    if array.size and np.issubdtype(array.dtype, np.signedinteger):
        lowest = int(array.min())
        if lowest < 0:
            raise ValueError(f"{where}: negative token id {lowest}; token ids must be >= 0")
    # Read-only, so the frozen Corpus cannot be changed through the arrays it hands out.
    array.setflags(write=False)
    if array.ndim == 1:
        return [array] if array.size else []
    # Row views share the file's buffer: no copy of the whole corpus.
    return list(array) if array.shape[1] else []


def _parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """Split ``"hf:NAME[/CONFIG][:SPLIT]"`` into ``(name, config, split)``."""
    spec = source[len(HF_PREFIX) :]
    # The first ":" starts the split; names and configs have none, but split slices do
    # ("train[:1000]"), so partition rather than rsplit.
    path_part, colon, split = spec.partition(":")
    if colon and not split:
        raise ValueError(f"source={source!r} has an empty split after ':'; expected {_ACCEPTED}")
    parts = path_part.split("/")
    if len(parts) == 1:
        name, config = parts[0], None
    elif len(parts) == 2:
        name, config = parts[0], parts[1]
    elif len(parts) == 3:
        name, config = f"{parts[0]}/{parts[1]}", parts[2] or None
    else:
        raise ValueError(f"source={source!r} has too many '/' for a dataset; expected {_ACCEPTED}")
    if not all(name.split("/")) or config == "":
        raise ValueError(f"source={source!r} has an empty dataset name or config; expected {_ACCEPTED}")
    return name, config, split or _HF_DEFAULT_SPLIT


def _open_hf(source: str, *, seed: int | None, text_field: str) -> Corpus:
    name, config, split = _parse_hf_source(source)
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"source={source!r}: Hugging Face dataset corpora need the datasets package: "
            f"pip install datasets ({exc})"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001
        # datasets fails in many ways (no network, unknown name or config, bad split, missing
        # extras); they all mean "this source cannot be opened", which corpus callers handle as
        # ValueError. The cause stays chained for debugging.
        raise ValueError(
            f"source={source!r}: cannot load Hugging Face dataset {name!r} (config {config!r}, split "
            f"{split!r}): {type(exc).__name__}: {exc}"
        ) from exc

    columns = list(getattr(dataset, "column_names", None) or [])
    if text_field not in columns:
        raise ValueError(
            f"source={source!r}: no column {text_field!r} (columns: {', '.join(map(repr, columns))}); "
            "pass text_field= to choose one"
        )
    docs = _keep_text(dataset[text_field], f"source={source!r}", text_field)
    if not docs:
        raise ValueError(f"source={source!r} contains no documents (only empty text); expected {_ACCEPTED}")

    # Datasets carry no byte file to hash here (they may be streamed from a cache or rebuilt), so
    # the digest covers the text actually read, length-prefixed like the file hashing: a changed
    # dataset revision changes the id, a re-download of the same text does not.
    hasher = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)
    # A namespaced name keeps its trailing "/" when there is no config, so the id reads back as
    # the same dataset ("hf:owner/name/" is not "hf:owner/name", which means name=owner).
    spec = f"{name}/{config or ''}" if "/" in name else (f"{name}/{config}" if config else name)
    return _text_corpus(f"hf:{spec}:{split}@{hasher.hexdigest()[:_DIGEST_HEX]}",
                        f"Hugging Face dataset {spec}:{split} ({len(docs):,} documents)", docs,
                        text_field=text_field, seed=seed)


def _text_corpus(base_id: str, description: str, docs: Sequence[str], *, text_field: str, seed: int | None) -> Corpus:
    """A text corpus whose id and description name a non-default text field and the seed."""
    if text_field != "text":
        base_id += f"#field={text_field}"
        description += f", field {text_field!r}"
    return Corpus(id=base_id + _seed_tag(seed), description=description, _documents=_ordered(docs, seed))


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
    # The bundled file also has "title"; selecting it is unusual but must not share a cache key.
    return _text_corpus(f"bundled:{_BUNDLED_STEM}@{digest[:_DIGEST_HEX]}",
                        f"bundled Wikipedia vital-article leads ({len(docs):,} documents, CC BY-SA 4.0)", docs,
                        text_field=text_field, seed=seed)
