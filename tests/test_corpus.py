"""Tests for fastrome.corpus: bundled corpus, local formats, determinism, ids and errors.

Pure Python (no torch) and offline; the whole file runs in well under a second after the first
decompression of the bundled corpus. Parquet tests need pyarrow (the ``test`` extra); Hugging Face
sources are tested with a fake ``datasets`` module, so neither the package nor network is needed.
"""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

import fastrome
from fastrome.corpus import (
    BUNDLED_CORPUS_NAME,
    SUPPORTED_SUFFIXES,
    TEXT_SUFFIXES,
    TOKEN_SUFFIXES,
    Corpus,
    open_corpus,
)

DATA_DIR = Path(fastrome.__file__).resolve().parent / "data"
BUNDLED_DOCS = 10_033


def _write_jsonl(path: Path, records: list, **dumps_kwargs) -> Path:
    path.write_text("".join(json.dumps(r, **dumps_kwargs) + "\n" for r in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ bundled


def test_bundled_loads_offline() -> None:
    corpus = open_corpus()
    assert isinstance(corpus, Corpus)
    assert len(corpus) == BUNDLED_DOCS
    docs = list(corpus.documents())
    assert len(docs) == BUNDLED_DOCS
    assert all(isinstance(d, str) and d.strip() for d in docs[:50])
    assert corpus.id.startswith("bundled:wiki_vital_en@")
    assert corpus.id.endswith("#seed=0")
    assert "10,033 documents" in corpus.description
    assert "CC BY-SA 4.0" in corpus.description


def test_bundled_aliases_and_stable_id() -> None:
    a = open_corpus(None)
    b = open_corpus(BUNDLED_CORPUS_NAME)
    c = open_corpus("default")
    assert a.id == b.id == c.id
    assert list(a.documents()) == list(b.documents()) == list(c.documents())
    # The id names the compressed file's digest, not anything process-dependent.
    assert a.id == open_corpus().id
    assert a == b  # equality is by id/description, not by comparing megabytes of text


def test_bundled_id_matches_file_digest() -> None:
    import hashlib

    digest = hashlib.sha256((DATA_DIR / "wiki_vital_en.jsonl.xz").read_bytes()).hexdigest()
    assert open_corpus().id == f"bundled:wiki_vital_en@{digest[:12]}#seed=0"


def test_bundled_id_stable_in_fresh_process() -> None:
    # Guards against anything process-dependent (hash randomisation, global RNG) leaking into
    # the order or the id.
    code = (
        "from fastrome.corpus import open_corpus; c = open_corpus(seed=3); "
        "print(c.id); print(next(c.documents())[:60])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = open_corpus(seed=3)
    assert out.splitlines() == [here.id, next(here.documents())[:60]]


def test_bundled_seed_and_text_field_change_order_and_id() -> None:
    s0, s0b, s1, plain = open_corpus(seed=0), open_corpus(seed=0), open_corpus(seed=1), open_corpus(seed=None)
    assert list(s0.documents()) == list(s0b.documents())
    assert list(s0.documents()) != list(s1.documents())
    assert sorted(s0.documents()) == sorted(s1.documents())  # same content, other order
    assert len({s0.id, s1.id, plain.id}) == 3
    assert plain.id.endswith("#seed=none")
    # seed=None is file order: the first line of the bundled file is this article.
    assert next(plain.documents()).startswith("20th-century classical music")

    titles = open_corpus(seed=None, text_field="title")
    assert len(titles) == BUNDLED_DOCS
    assert next(titles.documents()) == "20th-century classical music"
    assert titles.id != plain.id and "field=title" in titles.id


def test_bundled_file_has_only_title_and_text() -> None:
    payload = lzma.decompress((DATA_DIR / "wiki_vital_en.jsonl.xz").read_bytes()).decode("utf-8")
    lines = payload.splitlines()
    assert len(lines) == BUNDLED_DOCS
    assert set(json.loads(lines[0])) == {"title", "text"}


def test_notice_mentions_licence() -> None:
    notice = (DATA_DIR / "NOTICE").read_text(encoding="utf-8")
    assert "CC BY-SA 4.0" in notice
    assert "https://creativecommons.org/licenses/by-sa/4.0/" in notice
    assert "Wikipedia contributors" in notice


def test_make_bundled_corpus_script_is_deterministic(tmp_path: Path) -> None:
    # A small input keeps this fast; the point is byte-identical output across runs and that the
    # script keeps exactly title/text in order.
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_bundled_corpus.py"
    src = _write_jsonl(
        tmp_path / "in.jsonl",
        [{"title": f"T{i}", "topic": "X", "text": f"Text number {i} \u00e9\u4e2d"} for i in range(50)],
        ensure_ascii=False,
    )
    outs = []
    for name in ("a.xz", "b.xz"):
        res = subprocess.run(
            [sys.executable, str(script), str(src), "-o", str(tmp_path / name)],
            capture_output=True,
            text=True,
            check=True,
        )
        outs.append((tmp_path / name).read_bytes())
        assert "sha256 " in res.stdout
    assert outs[0] == outs[1]
    lines = lzma.decompress(outs[0]).decode("utf-8").splitlines()
    assert [json.loads(x) for x in lines][:2] == [
        {"title": "T0", "text": "Text number 0 \u00e9\u4e2d"},
        {"title": "T1", "text": "Text number 1 \u00e9\u4e2d"},
    ]


# ------------------------------------------------------------------------------ local formats


TXT = "First paragraph\nstill first.\n\n\n  Second paragraph.  \n \t\nThird.\n\n\n\n"


def test_txt_paragraph_splitting(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text(TXT, encoding="utf-8")
    corpus = open_corpus(p, seed=None)
    assert list(corpus.documents()) == ["First paragraph\nstill first.", "Second paragraph.", "Third."]
    assert len(corpus) == 3
    assert corpus.id.startswith("file:notes.txt@") and corpus.id.endswith("#seed=none")
    # str and PathLike give the same corpus.
    assert open_corpus(str(p), seed=None).id == corpus.id


def test_txt_crlf_and_bom(tmp_path: Path) -> None:
    p = tmp_path / "win.txt"
    p.write_bytes("\ufeffOne\r\n\r\nTwo\r\n".encode("utf-8"))
    assert list(open_corpus(p, seed=None).documents()) == ["One", "Two"]


def test_jsonl_custom_text_field(tmp_path: Path) -> None:
    p = _write_jsonl(
        tmp_path / "docs.jsonl",
        [{"body": "alpha", "text": 1}, {"body": "beta"}, {"body": "   "}, {"body": "gamma"}],
    )
    # Blank lines between records are skipped and do not disturb line numbering.
    p.write_text(p.read_text() + "\n   \n", encoding="utf-8")
    corpus = open_corpus(p, seed=None, text_field="body")
    assert list(corpus.documents()) == ["alpha", "beta", "gamma"]  # whitespace-only dropped
    assert "#field=body" in corpus.id

    # The default field is "text"; line 1 has it as an int, which is an error naming the line.
    with pytest.raises(ValueError, match=r"line 1.*'text'.*not a string"):
        open_corpus(p)
    with pytest.raises(ValueError, match=r"docs\.jsonl.*line 2.*missing field 'text'"):
        open_corpus(_write_jsonl(tmp_path / "docs.jsonl", [{"text": "a"}, {"body": "b"}]))


def test_jsonl_unicode_line_separator_inside_string(tmp_path: Path) -> None:
    # U+2028 is a line break for str.splitlines() but valid unescaped inside a JSON string.
    p = _write_jsonl(tmp_path / "u.jsonl", [{"text": "a\u2028b"}, {"text": "c"}], ensure_ascii=False)
    assert list(open_corpus(p, seed=None).documents()) == ["a\u2028b", "c"]


@pytest.mark.parametrize("compression", ["gz", "xz"])
@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_compressed_variants(tmp_path: Path, kind: str, compression: str) -> None:
    if kind == "txt":
        payload = b"Para one.\n\nPara two.\n"
    else:
        payload = b'{"text": "Para one."}\n{"text": "Para two."}\n'
    plain = tmp_path / f"c.{kind}"
    plain.write_bytes(payload)
    packed = tmp_path / f"c.{kind}.{compression}"
    packed.write_bytes(gzip.compress(payload, mtime=0) if compression == "gz" else lzma.compress(payload))
    corpus = open_corpus(packed, seed=None)
    assert list(corpus.documents()) == ["Para one.", "Para two."]
    assert list(corpus.documents()) == list(open_corpus(plain, seed=None).documents())
    assert corpus.id.startswith(f"file:c.{kind}.{compression}@")


def test_uppercase_suffix_accepted(tmp_path: Path) -> None:
    p = tmp_path / "UP.TXT"
    p.write_text("x\n\ny\n", encoding="utf-8")
    assert len(open_corpus(p)) == 2


def test_corrupt_compressed_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.txt.gz"
    p.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot decompress"):
        open_corpus(p)


def test_directory(tmp_path: Path) -> None:
    root = tmp_path / "mycorpus"
    (root / "b_sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("A1\n\nA2\n", encoding="utf-8")
    _write_jsonl(root / "b_sub" / "x.jsonl", [{"text": "B1"}])
    (root / "c.txt.gz").write_bytes(gzip.compress(b"C1\n", mtime=0))
    (root / "README.md").write_text("ignored: unsupported suffix\n", encoding="utf-8")
    (root / ".hidden" / "dup.txt").write_text("ignored: hidden\n", encoding="utf-8")
    (root / ".swap.txt").write_text("ignored: hidden\n", encoding="utf-8")

    corpus = open_corpus(root, seed=None)
    # Sorted by relative path: a.txt < b_sub/x.jsonl < c.txt.gz.
    assert list(corpus.documents()) == ["A1", "A2", "B1", "C1"]
    assert corpus.id.startswith("file:mycorpus@")
    assert "3 files" in corpus.description

    shuffled = open_corpus(root, seed=0)
    assert sorted(shuffled.documents()) == ["A1", "A2", "B1", "C1"]
    assert shuffled.id != corpus.id

    # A bad line inside a directory names the offending file.
    (root / "b_sub" / "x.jsonl").write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.jsonl: line 2: invalid JSON"):
        open_corpus(root)


# ------------------------------------------------------------------------------- determinism


def test_same_seed_same_order_different_seed_different_order(tmp_path: Path) -> None:
    p = tmp_path / "many.txt"
    p.write_text("\n\n".join(f"doc {i}" for i in range(200)), encoding="utf-8")
    a, b, c = open_corpus(p, seed=7), open_corpus(p, seed=7), open_corpus(p, seed=8)
    assert list(a.documents()) == list(b.documents())
    assert list(a.documents()) != list(c.documents())
    assert list(open_corpus(p, seed=None).documents()) == [f"doc {i}" for i in range(200)]
    assert a.id == b.id != c.id
    # documents() restarts each call.
    assert list(a.documents()) == list(a.documents())


# ----------------------------------------------------------------------------------------- ids


def test_id_changes_with_content_not_location(tmp_path: Path) -> None:
    d1, d2 = tmp_path / "one", tmp_path / "two" / "deeper"
    d1.mkdir()
    d2.mkdir(parents=True)
    f1 = d1 / "corpus.txt"
    f1.write_text("Hello.\n\nWorld.\n", encoding="utf-8")
    id_before = open_corpus(f1).id

    # Same name and bytes elsewhere: same id (no absolute paths, no mtimes).
    f2 = d2 / "corpus.txt"
    shutil.copyfile(f1, f2)
    assert open_corpus(f2).id == id_before
    # Same for a whole directory copied under another parent with the same name.
    (tmp_path / "copy").mkdir()
    shutil.copytree(d1, tmp_path / "copy" / "one")
    assert open_corpus(d1).id == open_corpus(tmp_path / "copy" / "one").id

    # Rewriting identical bytes (new mtime) keeps the id; changing a byte changes it.
    f1.write_text("Hello.\n\nWorld.\n", encoding="utf-8")
    assert open_corpus(f1).id == id_before
    f1.write_text("Hello.\n\nWorld!\n", encoding="utf-8")
    assert open_corpus(f1).id != id_before

    # Renaming a file inside a directory changes the directory's id (paths are hashed).
    dir_id = open_corpus(d1).id
    f1.rename(d1 / "renamed.txt")
    assert open_corpus(d1).id != dir_id


def test_text_field_only_in_id_for_jsonl(tmp_path: Path) -> None:
    t = tmp_path / "p.txt"
    t.write_text("a\n\nb\n", encoding="utf-8")
    assert open_corpus(t, text_field="body").id == open_corpus(t).id
    j = _write_jsonl(tmp_path / "p.jsonl", [{"text": "a", "body": "b"}])
    assert open_corpus(j, text_field="body").id != open_corpus(j).id


# -------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=r"source=.*nope\.txt.*does not exist"):
        open_corpus(missing)
    with pytest.raises(ValueError, match="source="):
        open_corpus("no-such-corpus-name")


def test_bad_json_line_reports_line_number(tmp_path: Path) -> None:
    p = tmp_path / "broken.jsonl"
    p.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 4: invalid JSON") as info:
        open_corpus(p)
    assert "line 4" in str(info.value)

    q = tmp_path / "list.jsonl"
    q.write_text('["a list"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object"):
        open_corpus(q)


def test_unsupported_suffix(tmp_path: Path) -> None:
    p = tmp_path / "data.csv"
    p.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"source=.*data\.csv.*unsupported.*\.jsonl"):
        open_corpus(p)


def test_empty_file_and_empty_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"source=.*empty\.txt.*no documents"):
        open_corpus(empty)
    empty_jsonl = _write_jsonl(tmp_path / "e.jsonl", [{"text": ""}])
    with pytest.raises(ValueError, match="no documents"):
        open_corpus(empty_jsonl)
    d = tmp_path / "d"
    d.mkdir()
    (d / "readme.md").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"source=.*no supported files"):
        open_corpus(d)
    with pytest.raises(ValueError, match="source=''"):
        open_corpus("")


def test_invalid_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        open_corpus(p)


def test_bad_argument_types(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="source"):
        open_corpus(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        open_corpus(seed="0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text_field"):
        open_corpus(text_field="")


# ------------------------------------------------------------------------------------ parquet


def _write_parquet(path: Path, columns: dict) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_round_trip(tmp_path: Path) -> None:
    # Null, empty and whitespace-only values are dropped (a null is a missing text, not an error).
    p = _write_parquet(
        tmp_path / "t.parquet",
        {"text": ["alpha", "", None, " \n ", "beta\n\ngamma"], "title": ["A", "B", "C", "D", "E"]},
    )
    corpus = open_corpus(p, seed=None)
    assert list(corpus.documents()) == ["alpha", "beta\n\ngamma"]  # a cell is one document, never split
    assert len(corpus) == 2 and not corpus.pretokenized and corpus.max_token_id is None
    assert corpus.id.startswith("file:t.parquet@") and corpus.id.endswith("#seed=none")
    assert "#field" not in corpus.id and "#tokens" not in corpus.id

    titles = open_corpus(p, seed=None, text_field="title")
    assert list(titles.documents()) == ["A", "B", "C", "D", "E"]
    assert "#field=title" in titles.id and titles.id != corpus.id

    # Same bytes elsewhere: same id; other content: other id.
    shutil.copyfile(p, tmp_path / "copy.parquet")
    (tmp_path / "sub").mkdir()
    shutil.copyfile(p, tmp_path / "sub" / "t.parquet")
    assert open_corpus(tmp_path / "sub" / "t.parquet", seed=None).id == corpus.id
    _write_parquet(p, {"text": ["alpha", "beta!"]})
    assert open_corpus(p, seed=None).id != corpus.id


def test_parquet_column_errors(tmp_path: Path) -> None:
    p = _write_parquet(tmp_path / "cols.parquet", {"body": ["x"], "n": [1]})
    with pytest.raises(ValueError, match=r"cols\.parquet: no column 'text' \(columns: 'body', 'n'\)"):
        open_corpus(p)
    with pytest.raises(ValueError, match=r"cols\.parquet: column 'n' has type int64, not string.*'body': string"):
        open_corpus(p, text_field="n")
    assert list(open_corpus(p, text_field="body").documents()) == ["x"]

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 but not really a parquet file")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a valid Parquet file"):
        open_corpus(bad)


def test_parquet_in_directory_with_other_text(tmp_path: Path) -> None:
    root = tmp_path / "mixed_text"
    root.mkdir()
    (root / "a.txt").write_text("A1\n\nA2\n", encoding="utf-8")
    _write_parquet(root / "b.parquet", {"text": ["B1", "B2"]})
    _write_jsonl(root / "c.jsonl", [{"text": "C1"}])
    corpus = open_corpus(root, seed=None)
    assert list(corpus.documents()) == ["A1", "A2", "B1", "B2", "C1"]
    assert "3 files" in corpus.description


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write_parquet(tmp_path / "t.parquet", {"text": ["x"]})
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"t\.parquet.*pip install pyarrow"):
        open_corpus(p)
    # Other formats do not need it.
    (tmp_path / "x.txt").write_text("fine\n", encoding="utf-8")
    assert len(open_corpus(tmp_path / "x.txt")) == 1


# ------------------------------------------------------------------------------ token ids


def _ids(corpus: Corpus) -> list:
    return list(corpus.token_ids(_never_called))


def _never_called(text: str) -> list:
    raise AssertionError(f"encode must not be called on a pre-tokenized corpus (got {text!r})")


def test_suffix_tuples() -> None:
    assert SUPPORTED_SUFFIXES == TEXT_SUFFIXES + TOKEN_SUFFIXES
    assert ".parquet" in TEXT_SUFFIXES and set(TOKEN_SUFFIXES) == {".npy", ".safetensors"}


def test_npy_one_and_two_dimensional(tmp_path: Path) -> None:
    one = tmp_path / "one.npy"
    np.save(one, np.array([5, 3, 9, 1], dtype=np.int32))
    corpus = open_corpus(one, seed=None)
    assert corpus.pretokenized and len(corpus) == 1
    docs = _ids(corpus)
    assert docs == [[5, 3, 9, 1]]
    # Plain Python ints, not numpy scalars (callers build tensors and JSON from them).
    assert all(type(t) is int for t in docs[0]) and type(docs[0]) is list
    assert corpus.max_token_id == 9 and type(corpus.max_token_id) is int
    assert corpus.id.startswith("file:one.npy@") and corpus.id.endswith("#tokens#seed=none")
    assert "4 tokens" in corpus.description and "pre-tokenized" in corpus.description

    two = tmp_path / "two.npy"
    np.save(two, np.array([[1, 2, 3], [4, 5, 6], [7, 8, 65535]], dtype=np.uint16))
    corpus2 = open_corpus(two, seed=None)
    assert len(corpus2) == 3
    assert _ids(corpus2) == [[1, 2, 3], [4, 5, 6], [7, 8, 65535]]
    assert corpus2.max_token_id == 65535
    # token_ids restarts on each call, like documents().
    assert _ids(corpus2) == _ids(corpus2)


def test_safetensors_tensors_in_sorted_key_order(tmp_path: Path) -> None:
    p = tmp_path / "toks.safetensors"
    # Written in non-sorted order; "b" is 2-D (one document per row).
    tensors = {
        "c": np.array([30, 31], dtype=np.int64),
        "a": np.array([10], dtype=np.int64),
        "b": np.array([[20, 21, 22], [23, 24, 25]], dtype=np.int32),
    }
    p.write_bytes(save_safetensors(tensors))
    corpus = open_corpus(p, seed=None)
    assert _ids(corpus) == [[10], [20, 21, 22], [23, 24, 25], [30, 31]]
    assert len(corpus) == 4 and corpus.max_token_id == 31
    assert corpus.id.startswith("file:toks.safetensors@") and "#tokens" in corpus.id


def test_token_corpus_seeded_order(tmp_path: Path) -> None:
    p = tmp_path / "many.npy"
    np.save(p, np.arange(400, dtype=np.int64).reshape(200, 2))
    a, b, c = open_corpus(p, seed=7), open_corpus(p, seed=7), open_corpus(p, seed=8)
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(c)
    assert sorted(_ids(a)) == sorted(_ids(c)) == [[2 * i, 2 * i + 1] for i in range(200)]
    assert _ids(open_corpus(p, seed=None)) == [[2 * i, 2 * i + 1] for i in range(200)]
    assert a.id == b.id != c.id


def test_token_ids_differ_from_text_and_follow_content(tmp_path: Path) -> None:
    text = tmp_path / "c.txt"
    text.write_text("1 2 3\n", encoding="utf-8")
    toks = tmp_path / "c.npy"
    np.save(toks, np.array([1, 2, 3]))
    text_id, tok_id = open_corpus(text).id, open_corpus(toks).id
    assert text_id != tok_id and "#tokens" in tok_id and "#tokens" not in text_id
    # text_field does not apply to token ids and stays out of the id.
    assert open_corpus(toks, text_field="body").id == tok_id

    np.save(toks, np.array([1, 2, 4]))  # one token changed
    assert open_corpus(toks).id != tok_id
    np.save(toks, np.array([1, 2, 3]))
    assert open_corpus(toks).id == tok_id


def test_token_corpus_documents_raises(tmp_path: Path) -> None:
    p = tmp_path / "t.npy"
    np.save(p, np.array([1, 2]))
    corpus = open_corpus(p)
    with pytest.raises(ValueError, match="holds token ids, not text.*token_ids"):
        corpus.documents()


def test_token_arrays_are_read_only(tmp_path: Path) -> None:
    p = tmp_path / "t.npy"
    np.save(p, np.array([[1, 2], [3, 4]]))
    corpus = open_corpus(p, seed=None)
    with pytest.raises(ValueError, match="read-only"):
        corpus._token_documents[0][0] = 99
    # The lists handed out are fresh copies: changing one does not change the corpus.
    first = _ids(corpus)
    first[0][0] = 99
    assert _ids(corpus)[0] == [1, 2]


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array([1.0, 2.0]), r"dtype float64 is not an integer type"),
        (np.array([True, False]), r"dtype bool is not an integer type"),
        (np.array([3, -1, 2], dtype=np.int16), r"negative token id -1"),
        (np.array(5), r"0-D array"),
        (np.zeros((2, 2, 2), dtype=np.int64), r"3-D array of shape \(2, 2, 2\)"),
    ],
)
def test_bad_token_arrays_npy(tmp_path: Path, array: np.ndarray, message: str) -> None:
    p = tmp_path / "bad.npy"
    np.save(p, array)
    with pytest.raises(ValueError, match=r"bad\.npy: " + message):
        open_corpus(p)


def test_bad_token_arrays_safetensors_name_the_tensor(tmp_path: Path) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(save_safetensors({"good": np.array([1, 2]), "weights": np.array([0.5], dtype=np.float32)}))
    with pytest.raises(ValueError, match=r"bad\.safetensors: tensor 'weights': dtype float32 is not an integer"):
        open_corpus(p)
    p.write_bytes(save_safetensors({"neg": np.array([[1, -7]], dtype=np.int32)}))
    with pytest.raises(ValueError, match=r"tensor 'neg': negative token id -7"):
        open_corpus(p)
    p.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"bad\.safetensors: not a readable safetensors file"):
        open_corpus(p)


def test_npy_refuses_pickles(tmp_path: Path) -> None:
    p = tmp_path / "obj.npy"
    np.save(p, np.array([1, "two"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj\.npy: not a valid \.npy file"):
        open_corpus(p)


def test_empty_token_documents_dropped(tmp_path: Path) -> None:
    p = tmp_path / "t.safetensors"
    p.write_bytes(save_safetensors({"a": np.array([], dtype=np.int64), "b": np.array([4, 2], dtype=np.int64)}))
    assert _ids(open_corpus(p, seed=None)) == [[4, 2]]
    q = tmp_path / "empty.npy"
    np.save(q, np.zeros((3, 0), dtype=np.int32))
    with pytest.raises(ValueError, match=r"empty\.npy.*no documents \(only empty token arrays\)"):
        open_corpus(q)


def test_token_directory_and_mixing(tmp_path: Path) -> None:
    root = tmp_path / "toks"
    (root / "sub").mkdir(parents=True)
    np.save(root / "a.npy", np.array([1, 2, 3]))
    (root / "sub" / "b.safetensors").write_bytes(save_safetensors({"x": np.array([[4, 5], [6, 7]])}))
    corpus = open_corpus(root, seed=None)
    assert _ids(corpus) == [[1, 2, 3], [4, 5], [6, 7]]
    assert corpus.pretokenized and corpus.id.startswith("file:toks@") and "#tokens" in corpus.id
    assert "2 files" in corpus.description

    (root / "notes.txt").write_text("some text\n", encoding="utf-8")
    mixed = r"mixes text files \(e\.g\. 'notes\.txt'\) and token-id files \(e\.g\. 'a\.npy'\).*all text or all"
    with pytest.raises(ValueError, match=mixed):
        open_corpus(root)


def test_token_ids_of_text_corpus_calls_encode_in_order(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_text("\n\n".join(f"doc {i}" for i in range(20)), encoding="utf-8")
    corpus = open_corpus(p, seed=3)
    calls: list = []

    def encode(text: str) -> list:
        calls.append(text)
        return [len(calls), int(text.split()[1])]

    stream = corpus.token_ids(encode)
    assert calls == []  # lazy: nothing is tokenized before it is asked for
    assert next(stream) == [1, int(next(corpus.documents()).split()[1])]
    rest = list(stream)
    assert calls == list(corpus.documents())  # once per document, in corpus (shuffled) order
    assert calls != sorted(calls, key=lambda t: int(t.split()[1]))  # seed 3 really shuffled
    assert [ids[0] for ids in rest] == list(range(2, 21))
    assert corpus.max_token_id is None and not corpus.pretokenized
    with pytest.raises(TypeError, match="encode must be callable"):
        corpus.token_ids(None)  # type: ignore[arg-type]


def test_corpus_constructor_kinds() -> None:
    text = Corpus(id="t", description="t", _documents=("a", "b"))
    assert len(text) == 2 and not text.pretokenized
    toks = Corpus(id="k", description="k", _token_documents=(np.array([3, 1]), np.array([2])))
    assert len(toks) == 2 and toks.pretokenized and toks.max_token_id == 3
    assert list(toks.token_ids(_never_called)) == [[3, 1], [2]]
    with pytest.raises(ValueError, match="one kind"):
        Corpus(id="both", description="", _documents=("a",), _token_documents=(np.array([1]),))


# --------------------------------------------------------------------------- Hugging Face


class _FakeDataset:
    """The part of ``datasets.Dataset`` that open_corpus uses: column_names and column access."""

    def __init__(self, rows: list) -> None:
        self._rows = rows
        self.column_names = list(rows[0]) if rows else []

    def __getitem__(self, key: str) -> list:
        if not isinstance(key, str) or key not in self.column_names:
            raise KeyError(key)
        return [row[key] for row in self._rows]

    def __len__(self) -> int:
        return len(self._rows)


@pytest.fixture()
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Install a fake ``datasets`` module; ``state.rows`` is what the next load returns."""
    state = types.SimpleNamespace(
        calls=[],
        rows=[{"text": "first", "id": 1}, {"text": "", "id": 2}, {"text": None, "id": 3}, {"text": "second", "id": 4}],
        error=None,
    )

    def load_dataset(path: str, name: object = None, *, split: object = None) -> _FakeDataset:
        state.calls.append((path, name, split))
        if state.error is not None:
            raise state.error
        return _FakeDataset(state.rows)

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return state


def test_hf_dataset(fake_datasets: types.SimpleNamespace) -> None:
    corpus = open_corpus("hf:wikitext/wikitext-103-raw-v1:train", seed=None)
    assert fake_datasets.calls == [("wikitext", "wikitext-103-raw-v1", "train")]
    assert list(corpus.documents()) == ["first", "second"]  # empty and null rows dropped
    assert corpus.id.startswith("hf:wikitext/wikitext-103-raw-v1:train@") and corpus.id.endswith("#seed=none")
    assert not corpus.pretokenized and len(corpus) == 2

    # The digest is over the text read: same text, same id; changed text, changed id.
    assert open_corpus("hf:wikitext/wikitext-103-raw-v1:train", seed=None).id == corpus.id
    fake_datasets.rows = [{"text": "first", "id": 1}, {"text": "second!", "id": 4}]
    assert open_corpus("hf:wikitext/wikitext-103-raw-v1:train", seed=None).id != corpus.id
    # Seeds shuffle and enter the id.
    fake_datasets.rows = [{"text": f"doc {i}", "id": i} for i in range(50)]
    s1, s1b, s2 = (open_corpus("hf:wikitext", seed=s) for s in (1, 1, 2))
    assert list(s1.documents()) == list(s1b.documents()) != list(s2.documents())
    assert s1.id.endswith("#seed=1") and s2.id.endswith("#seed=2")


@pytest.mark.parametrize(
    ("source", "call", "id_prefix"),
    [
        ("hf:wikitext", ("wikitext", None, "train"), "hf:wikitext:train@"),
        ("hf:wikitext/raw", ("wikitext", "raw", "train"), "hf:wikitext/raw:train@"),
        ("hf:wikitext:validation", ("wikitext", None, "validation"), "hf:wikitext:validation@"),
        ("hf:owner/name/cfg:test", ("owner/name", "cfg", "test"), "hf:owner/name/cfg:test@"),
        ("hf:owner/name/", ("owner/name", None, "train"), "hf:owner/name/:train@"),
        ("hf:wikitext/raw:train[:10]", ("wikitext", "raw", "train[:10]"), "hf:wikitext/raw:train[:10]@"),
    ],
)
def test_hf_source_syntax(fake_datasets: types.SimpleNamespace, source: str, call: tuple, id_prefix: str) -> None:
    corpus = open_corpus(source)
    assert fake_datasets.calls == [call]
    assert corpus.id.startswith(id_prefix)


@pytest.mark.parametrize("source", ["hf:", "hf:name:", "hf:a/b/c/d", "hf:/cfg", "hf:name/"])
def test_hf_bad_source_syntax(fake_datasets: types.SimpleNamespace, source: str) -> None:
    with pytest.raises(ValueError, match="source="):
        open_corpus(source)
    assert fake_datasets.calls == []


def test_hf_text_field_and_column_errors(fake_datasets: types.SimpleNamespace) -> None:
    fake_datasets.rows = [{"body": "b1", "text": "t1", "n": 1}, {"body": "b2", "text": "t2", "n": 2}]
    plain, body = open_corpus("hf:x", seed=None), open_corpus("hf:x", seed=None, text_field="body")
    assert list(body.documents()) == ["b1", "b2"]
    assert "#field=body" in body.id and body.id != plain.id
    with pytest.raises(ValueError, match=r"source='hf:x': no column 'title' \(columns: 'body', 'text', 'n'\)"):
        open_corpus("hf:x", text_field="title")
    with pytest.raises(ValueError, match=r"row 0: field 'n' is int, not a string"):
        open_corpus("hf:x", text_field="n")
    fake_datasets.rows = [{"text": " "}]
    with pytest.raises(ValueError, match="no documents"):
        open_corpus("hf:x")


def test_hf_load_failure(fake_datasets: types.SimpleNamespace) -> None:
    fake_datasets.error = ConnectionError("Couldn't reach the Hub")
    expected = r"source='hf:wikitext/raw:train'.*ConnectionError: Couldn't reach the Hub"
    with pytest.raises(ValueError, match=expected) as info:
        open_corpus("hf:wikitext/raw:train")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"source='hf:wikitext'.*pip install datasets"):
        open_corpus("hf:wikitext")


def test_hf_prefix_only_for_str(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A PathLike is always a local path, even when its name starts with "hf:".
    monkeypatch.setitem(sys.modules, "datasets", None)
    p = tmp_path / "hf:local.txt"
    p.write_text("local\n", encoding="utf-8")
    assert list(open_corpus(p).documents()) == ["local"]
