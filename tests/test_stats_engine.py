"""The statistics engine beyond one pass: packing, checkpoints and resume (in process and after a
SIGKILL), two gloo processes against one, pre-tokenized corpora, ROME .npz import, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fastrome.ops as ops_mod
from fastrome import Editor
from fastrome.adapter import ModelAdapter
from fastrome.cli import main, parse_layers
from fastrome.corpus import Corpus, open_corpus
from fastrome.stats import compute, load_or_compute
from fastrome.stats.collect import length_batches, run_key, token_sequences
from fastrome.stats.npz import layer_from_name, load_rome_npz
from fastrome.tokens import encode


@pytest.fixture
def corpus_file(tmp_path):
    docs = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, designed by Gustave Eiffel.",
        "Rome is the capital city of Italy and of the Lazio region.",
        "Photosynthesis converts light energy into chemical energy in plants. " * 5,
        "A short one.",
        "Mount Everest is Earth's highest mountain above sea level.",
        "The Danube flows through ten countries before it reaches the Black Sea.",
    ] * 6
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"{i}. {d}" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def keys_reference(model, layers, sequences):
    """fp64 sums of every token's keys, each sequence run alone (no padding, no batching)."""
    adapter = ModelAdapter(model)
    sums = {layer: torch.zeros(adapter.d_in, adapter.d_in, dtype=torch.float64) for layer in layers}
    seen = {}
    hooks = [adapter.module(layer).register_forward_hook(lambda m, a, o, layer=layer: seen.__setitem__(layer, a[0]))
             for layer in layers]
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
                for layer in layers:
                    x = seen[layer][0].double()
                    sums[layer] += x.t() @ x
    finally:
        for h in hooks:
            h.remove()
    return sums


# -- sequences and packing ------------------------------------------------------------------------

@pytest.mark.parametrize("packing", ["truncate", "pack"])
def test_sequences_hit_the_budget_exactly_and_packing_keeps_every_token(bytelevel_tokenizer, corpus_file, packing):
    tok = bytelevel_tokenizer
    corpus = open_corpus(corpus_file, seed=1)
    seqs = list(token_sequences(corpus, tok, 613, 29, packing))
    assert sum(map(len, seqs)) == 613
    assert all(2 <= len(s) <= 29 for s in seqs)
    docs = [encode(tok, d) for d in corpus.documents()]
    if packing == "pack":
        stream = [t for ids in docs for t in ids + [tok.eos_token_id]]
        assert [t for s in seqs for t in s] == stream[:613]
        assert all(len(s) == 29 for s in seqs[:-1])
    else:
        assert seqs[0] == docs[0][:29]
    in_order = list(length_batches(iter(seqs), 100, sort_window=1))
    assert [s for b in in_order for s in b] == seqs
    for batches in (in_order, list(length_batches(iter(seqs), 100, sort_window=7))):
        assert all(len(b) * max(map(len, b)) <= 100 or len(b) == 1 for b in batches)
    # sorted within windows of 7: the same sequences, each window longest first
    flat = [s for b in list(length_batches(iter(seqs), 100, sort_window=7)) for s in b]
    for start in range(0, len(seqs), 7):
        assert flat[start:start + 7] == sorted(seqs[start:start + 7], key=len, reverse=True)


class WordTokenizer:
    """One token per word (its length as the id), recording every text it is asked to tokenise."""

    eos_token_id = None

    def __init__(self):
        self.texts = []

    def __call__(self, text, add_special_tokens=True):
        self.texts.append(text)
        return {"input_ids": [len(w) for w in text.split()]}


def word_corpus(n_docs: int) -> Corpus:
    """Documents of three words (three tokens for WordTokenizer), each text distinct."""
    return Corpus(id=f"test:words{n_docs}", description="", _documents=tuple(f"doc{i} a b" for i in range(n_docs)))


def tokenised(tok: WordTokenizer, corpus: Corpus) -> list:
    docs = set(corpus.documents())
    return [t for t in tok.texts if t in docs]  # without the tokenizer probes of fastrome.tokens


def test_one_token_of_budget_left_ends_the_truncated_pass_without_reading_on():
    tok, corpus = WordTokenizer(), word_corpus(12)
    seqs = list(token_sequences(corpus, tok, 3 * 3 + 1, 64, "truncate"))
    assert [len(s) for s in seqs] == [3, 3, 3]
    assert tokenised(tok, corpus) == list(corpus.documents())[:3]  # not the nine documents after them


def test_one_token_of_budget_left_ends_the_packed_pass_and_makes_no_one_token_sequence():
    tok, corpus = WordTokenizer(), word_corpus(12)
    seqs = list(token_sequences(corpus, tok, 11, 5, "pack"))
    assert [len(s) for s in seqs] == [5, 5]
    assert len(tokenised(tok, corpus)) == 4  # the documents the two windows took, no more
    # the corpus ending inside a window with one token of budget left: that token is no sequence
    seqs = list(token_sequences(word_corpus(4), WordTokenizer(), 11, 5, "pack"))
    assert [len(s) for s in seqs] == [5, 5]
    one_token = [list(token_sequences(corpus, tok, 1, 5, packing)) for packing in ("pack", "truncate")]
    assert one_token == [[], []]


def test_pass_with_one_token_of_budget_left_does_not_report_the_corpus_running_out(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    rows = [np.arange(10 + i, 60 + i, dtype=np.int64) for i in range(10)]
    for row in rows:
        row.setflags(write=False)
    corpus = Corpus(id="test:ids", description="", _token_documents=tuple(rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "ran out" nor anything else
        sm = compute(ModelAdapter(model), tok, [1], corpus=corpus, tokens=4 * 50 + 1, max_len=64, progress=False)[1]
    assert sm.count == sm.meta["tokens"] == 200 and sm.meta["sequences"] == 4 and sm.meta["tokens_requested"] == 201
    with pytest.warns(UserWarning, match="ran out after 500 of the 502"):
        compute(ModelAdapter(model), tok, [1], corpus=corpus, tokens=502, max_len=64, progress=False)


def test_packed_pass_equals_fp64_reference_of_the_same_sequences(make_tiny, corpus_file):
    model, tok = make_tiny("llama-sentencepiece")
    corpus = open_corpus(corpus_file, seed=2)
    got = compute(ModelAdapter(model), tok, [2, 0], corpus=corpus, tokens=500, max_len=41, packing="pack",
                  batch_tokens=130, progress=False)
    ref = keys_reference(model, [0, 2], token_sequences(corpus, tok, 500, 41, "pack"))
    for layer in (0, 2):
        assert got[layer].count == 500 and got[layer].meta["packing"] == "pack"
        err = (got[layer].sum - ref[layer]).norm() / ref[layer].norm()
        assert err < 1e-6, float(err)


def test_bad_arguments_are_refused_before_any_work(make_tiny, corpus_file):
    model, tok = make_tiny()
    adapter = ModelAdapter(model)
    bad = [({"packing": "zip"}, "packing"), ({"max_len": 1}, "max_len"), ({"batch_tokens": 0}, "batch_tokens"),
           ({"dtype": torch.float16}, "dtype"), ({"tokens": 0}, "tokens"), ({"tokens": 1}, "tokens"),
           ({"checkpoint_every": 0}, "checkpoint_every")]
    for kw, word in bad:
        with pytest.raises(ValueError, match=word):
            compute(adapter, tok, [1], corpus=open_corpus(corpus_file), progress=False, **kw)
    with pytest.raises(ValueError, match="layers"):
        compute(adapter, tok, [99], corpus=open_corpus(corpus_file), progress=False)


# -- checkpoints and resume -----------------------------------------------------------------------

class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, calls: int):
    """Make the accumulation op raise on its ``calls``-th call (a crash in the middle of a pass)."""
    real = ops_mod.second_moment_accumulate
    state = {"n": 0}

    def op(*a, **k):
        state["n"] += 1
        if state["n"] == calls:
            raise Interrupt
        return real(*a, **k)

    monkeypatch.setattr(ops_mod, "second_moment_accumulate", op)


@pytest.mark.parametrize("crash_at", [1, 6, 13, 21])
def test_interrupted_pass_resumes_to_the_bit_identical_result(make_tiny, corpus_file, tmp_path, monkeypatch, crash_at):
    model, tok = make_tiny("llama-bytelevel")
    adapter = ModelAdapter(model)
    kw = dict(corpus=open_corpus(corpus_file), tokens=900, max_len=48, batch_tokens=100, progress=False)
    whole = compute(adapter, tok, [1, 2], **kw)
    ckpt = tmp_path / "partial.safetensors"
    # two layers: op calls alternate L1, L2 per batch; crash_at picks a batch and a layer within it
    interrupt_after(monkeypatch, crash_at)
    with pytest.raises(Interrupt):
        compute(adapter, tok, [1, 2], checkpoint=ckpt, checkpoint_every=150, **kw)
    monkeypatch.undo()
    had_checkpoint = ckpt.is_file()
    if crash_at == 1:
        assert not had_checkpoint  # crashed in the first batch
    if crash_at == 21:
        assert had_checkpoint  # ten batches in: several checkpoints of >= 150 tokens
    resumed = compute(adapter, tok, [1, 2], checkpoint=ckpt, checkpoint_every=150, **kw)
    for layer in (1, 2):
        assert torch.equal(resumed[layer].sum, whole[layer].sum)
        assert resumed[layer].count == whole[layer].count == 900
    assert (resumed[1].meta.get("resumed_at_tokens", 0) >= 150) == had_checkpoint
    assert not ckpt.exists()  # removed once complete


def test_checkpoint_of_another_pass_is_not_resumed(make_tiny, corpus_file, tmp_path, monkeypatch, caplog):
    model, tok = make_tiny("llama-bytelevel")
    adapter = ModelAdapter(model)
    corpus = open_corpus(corpus_file)
    ckpt = tmp_path / "partial.safetensors"
    n_batches = len(list(length_batches(token_sequences(corpus, tok, 800, 48, "truncate"), 100)))
    assert n_batches > 4
    interrupt_after(monkeypatch, n_batches // 2 + 1)
    with pytest.raises(Interrupt):
        compute(adapter, tok, [1], corpus=corpus, tokens=800, max_len=48, batch_tokens=100, checkpoint=ckpt,
                checkpoint_every=100, progress=False)
    monkeypatch.undo()
    assert ckpt.is_file()
    whole = compute(adapter, tok, [1], corpus=corpus, tokens=801, max_len=48, batch_tokens=100, progress=False)
    with caplog.at_level("WARNING", logger="fastrome"):
        other = compute(adapter, tok, [1], corpus=corpus, tokens=801, max_len=48, batch_tokens=100, checkpoint=ckpt,
                        progress=False)
    assert "different pass" in caplog.text
    caplog.clear()
    assert torch.equal(other[1].sum, whole[1].sum) and "resumed_at_tokens" not in other[1].meta
    # a damaged checkpoint of the right pass is reported and the pass starts over
    ckpt.write_bytes(b"\x00" * 64)
    with caplog.at_level("WARNING", logger="fastrome"):
        again = compute(adapter, tok, [1], corpus=corpus, tokens=801, max_len=48, batch_tokens=100, checkpoint=ckpt,
                        progress=False)
    assert "not resuming" in caplog.text
    assert torch.equal(again[1].sum, whole[1].sum)


def test_load_or_compute_resumes_from_its_cache_checkpoint(make_tiny, corpus_file, tmp_path, monkeypatch):
    model, tok = make_tiny("gpt2-bytelevel")
    adapter = ModelAdapter(model)
    kw = dict(corpus=open_corpus(corpus_file), tokens=700, max_len=40, batch_tokens=90, progress=False,
              checkpoint_every=100)
    whole = compute(adapter, tok, [0, 1], **{k: v for k, v in kw.items() if k != "checkpoint_every"})
    interrupt_after(monkeypatch, 15)
    with pytest.raises(Interrupt):
        load_or_compute(adapter, tok, [0, 1], cache_root=tmp_path, **kw)
    monkeypatch.undo()
    partial = list((tmp_path / "stats" / "partial").glob("*.safetensors"))
    assert len(partial) == 1
    got = load_or_compute(adapter, tok, [0, 1], cache_root=tmp_path, **kw)
    for layer in (0, 1):
        assert torch.equal(got[layer].sum, whole[layer].sum)
    assert not list((tmp_path / "stats" / "partial").glob("*.safetensors"))
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 2


@pytest.fixture
def saved_model(saved_tiny_llama):
    return saved_tiny_llama


def _python(script: str, *args: str, env=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=full_env,
                          capture_output=True, text=True, timeout=600)


KILLED_RUN = """
    import os, signal, sys
    import fastrome.ops as ops
    from fastrome.adapter import ModelAdapter
    from fastrome.corpus import open_corpus
    from fastrome.models import load_model
    from fastrome.stats import compute

    model_dir, corpus, ckpt, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model, tok = load_model(model_dir)
    real, n = ops.second_moment_accumulate, [0]
    def op(*a, **k):
        n[0] += 1
        if n[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally blocks: a real crash
        return real(*a, **k)
    ops.second_moment_accumulate = op
    compute(ModelAdapter(model), tok, [0, 2], corpus=open_corpus(corpus), tokens=900, max_len=48,
            batch_tokens=100, checkpoint=ckpt, checkpoint_every=120, progress=False)
"""


def test_sigkilled_process_resumes_to_the_uninterrupted_result(saved_model, corpus_file, tmp_path):
    from fastrome.models import load_model

    ckpt = tmp_path / "killed.safetensors"
    proc = _python(KILLED_RUN, str(saved_model), str(corpus_file), str(ckpt), "17")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert ckpt.is_file()
    model, tok = load_model(saved_model)
    adapter = ModelAdapter(model)
    kw = dict(corpus=open_corpus(corpus_file), tokens=900, max_len=48, batch_tokens=100, progress=False)
    whole = compute(adapter, tok, [0, 2], **kw)
    resumed = compute(adapter, tok, [0, 2], checkpoint=ckpt, checkpoint_every=120, **kw)
    for layer in (0, 2):
        assert resumed[layer].meta.get("resumed_at_tokens", 0) >= 120
        assert resumed[layer].count == 900
        # another process may run the forward with another thread schedule: fp64 rounding only
        torch.testing.assert_close(resumed[layer].sum, whole[layer].sum, rtol=1e-12, atol=1e-12)


# -- data parallel --------------------------------------------------------------------------------

GLOO_RANK = """
    import sys, torch, torch.distributed as dist
    from fastrome.adapter import ModelAdapter
    from fastrome.corpus import open_corpus
    from fastrome.models import load_model
    from fastrome.stats import compute

    model_dir, corpus, init, out, rank = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model, tok = load_model(model_dir)
    res = compute(ModelAdapter(model), tok, [1, 3], corpus=open_corpus(corpus, seed=4), tokens=1000, max_len=50,
                  batch_tokens=120, progress=False)
    torch.save({layer: (sm.sum, sm.count, sm.meta["world_size"]) for layer, sm in res.items()}, out)
    dist.destroy_process_group()
"""


def test_two_gloo_processes_equal_one_process(saved_model, corpus_file, tmp_path):
    from fastrome.models import load_model

    init = f"file://{tmp_path / 'pg'}"
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(GLOO_RANK), str(saved_model), str(corpus_file), init,
                          str(outs[r]), str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    model, tok = load_model(saved_model)
    single = compute(ModelAdapter(model), tok, [1, 3], corpus=open_corpus(corpus_file, seed=4), tokens=1000,
                     max_len=50, batch_tokens=120, progress=False)
    got = [torch.load(o) for o in outs]
    for layer in (1, 3):
        s0, c0, w0 = got[0][layer]
        s1, c1, w1 = got[1][layer]
        assert w0 == w1 == 2 and c0 == c1 == single[layer].count == 1000
        assert torch.equal(s0, s1)  # every rank returns the same reduced sums
        torch.testing.assert_close(s0, single[layer].sum, rtol=1e-12, atol=1e-12)


# -- pre-tokenized corpora ------------------------------------------------------------------------

def test_pretokenized_corpus_gives_the_same_statistics_as_its_text(make_tiny, corpus_file, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    adapter = ModelAdapter(model)
    text = open_corpus(corpus_file, seed=None)
    rows = [np.asarray(encode(tok, d), dtype=np.int32) for d in text.documents()]
    folder = tmp_path / "ids"
    folder.mkdir()
    for i, row in enumerate(rows):
        np.save(folder / f"{i:03d}.npy", row)
    ids = open_corpus(folder, seed=None)
    assert ids.pretokenized and ids.id != text.id
    a = compute(adapter, tok, [1], corpus=text, tokens=640, max_len=45, progress=False)[1]
    b = compute(adapter, tok, [1], corpus=ids, tokens=640, max_len=45, progress=False)[1]
    assert torch.equal(a.sum, b.sum) and a.count == b.count == 640
    np.save(folder / "999.npy", np.asarray([0, len(tok) + 5], dtype=np.int64))
    with pytest.raises(ValueError, match="vocabulary"):
        compute(adapter, tok, [1], corpus=open_corpus(folder), tokens=640, progress=False)


# -- ROME / EasyEdit .npz -------------------------------------------------------------------------

def _rome_file(path: Path, mom2: np.ndarray, count: int, prefixed: bool = False) -> Path:
    """A file laid out as the ROME code saves its running second moment (plus an object array that
    must never be unpickled)."""
    p = "mom2." if prefixed else ""
    np.savez(path, **{f"{p}mom2": mom2, f"{p}count": np.asarray(count), f"{p}constructor":
                      np.asarray("util.runningstats.SecondMoment()"), "data_shape": np.asarray([None], dtype=object)})
    return path


@pytest.mark.parametrize("prefixed", [False, True])
def test_rome_npz_import_matches_and_drives_an_editor(make_tiny, corpus_file, tmp_path, prefixed):
    model, tok = make_tiny("llama-bytelevel")
    adapter = ModelAdapter(model)
    sm = compute(adapter, tok, [2], corpus=open_corpus(corpus_file), tokens=900, max_len=48, progress=False)[2]
    path = _rome_file(tmp_path / "model.layers.2.mlp.down_proj_float32_mom2_900.npz",
                      sm.sum.float().numpy(), sm.count, prefixed)
    with pytest.warns(UserWarning, match="cannot check"):
        got = load_rome_npz(path)
    assert got.layer == 2 and got.count == 900 and got.sum.dtype == torch.float64
    torch.testing.assert_close(got.sum, sm.sum, rtol=1e-6, atol=1e-6)
    assert got.meta["model_verified"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ed = Editor(model, tok, stats=str(path), layer=2, cache_dir=False)
        assert "unverified" in ed.stats_source(2) and "cond" in ed.stats_source(2)
        assert ed.solver(2).dim == adapter.d_in
        with pytest.raises(ValueError, match="holds layer 2"):
            Editor(model, tok, stats=str(path), layer=1, cache_dir=False).solver(1)


def test_rome_npz_bad_files(tmp_path):
    assert layer_from_name("transformer.h.17.mlp.c_proj_float32_mom2_100000.npz") == 17
    assert layer_from_name("model.layers.5.mlp.down_proj_float64_mom2_44000000.npz") == 5
    assert layer_from_name("stats.npz") is None
    good = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="pass layer="):
        load_rome_npz(_rome_file(tmp_path / "stats.npz", good, 10))
    with pytest.raises(ValueError, match="count is 0"):
        load_rome_npz(_rome_file(tmp_path / "a.npz", good, 0), layer=1)
    with pytest.raises(ValueError, match="square"):
        load_rome_npz(_rome_file(tmp_path / "b.npz", np.ones((3, 4), np.float32), 5), layer=1)
    with pytest.raises(ValueError, match="NaN"):
        load_rome_npz(_rome_file(tmp_path / "c.npz", np.full((4, 4), np.nan, np.float32), 5), layer=1)
    np.savez(tmp_path / "d.npz", other=good)
    with pytest.raises(ValueError, match="'mom2' and 'count'"):
        load_rome_npz(tmp_path / "d.npz", layer=1)
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="e.npz"):
        load_rome_npz(tmp_path / "e.npz", layer=1)
    # an object-array mom2 needs pickle: refused, never unpickled
    np.savez(tmp_path / "f.npz", mom2=np.asarray([good], dtype=object), count=np.asarray(3))
    with pytest.raises(ValueError, match="f.npz"):
        load_rome_npz(tmp_path / "f.npz", layer=1)


# -- the command ----------------------------------------------------------------------------------

def test_parse_layers():
    assert parse_layers(None, 8, 3) == [3]
    assert parse_layers("5", 8, 3) == [5]
    assert parse_layers("1,4-6", 8, 3) == [1, 4, 5, 6]
    assert parse_layers("all", 3, 0) == [0, 1, 2]
    with pytest.raises(SystemExit, match="out of range"):
        parse_layers("2,9", 8, 3)
    with pytest.raises(SystemExit, match="--layers"):
        parse_layers("x", 8, 3)


def test_stats_command_computes_resumes_and_reports(saved_model, corpus_file, tmp_path, capsys):
    argv = ["stats", "--model", str(saved_model), "--device", "cpu", "--layers", "0-1", "--corpus", str(corpus_file),
            "--tokens", "600", "--max-len", "40", "--packing", "pack", "--json"]
    assert main(argv + ["--out", str(tmp_path / "out")]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["layer"]: r for r in data["layers"]}
    assert set(rows) == {0, 1}
    for r in rows.values():
        assert r["tokens"] == 600 and r["condition"] > 1 and r["ridge"] > 0
        assert Path(r["path"]).is_file()
    # the second run finds the cache
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["tokens"] for r in again["layers"]] == [600, 600]
    with pytest.raises(SystemExit, match="--corpus"):
        main(["stats", "--model", str(saved_model), "--device", "cpu", "--corpus", str(tmp_path / "missing.txt")])


def test_run_key_separates_passes(make_tiny):
    model, _ = make_tiny()
    adapter = ModelAdapter(model)
    args = [[1, 2], "c", 100, 64, "float64", "truncate", 512]
    base = run_key(adapter, *args)
    assert base == run_key(adapter, [2, 1], *args[1:])
    for index, value in enumerate([[1], "d", 101, 65, "float32", "pack", 256]):
        changed = list(args)
        changed[index] = value
        assert run_key(adapter, *changed) != base, index


def test_published_baseline_computes_the_same_second_moment(make_tiny, corpus_file):
    from fastrome.baselines.layer_stats import all_layers_reference

    model, tok = make_tiny("gpt2-bytelevel")
    corpus = open_corpus(corpus_file, seed=5)
    ours = compute(ModelAdapter(model), tok, [0, 2], corpus=corpus, tokens=700, max_len=50, progress=False)
    ref = all_layers_reference(model, tok, [0, 2], corpus=corpus, tokens=700, max_len=50)
    for layer in (0, 2):
        mom2, count = ref[layer]
        assert count == ours[layer].count == 700 and mom2.dtype == torch.float32
        err = (mom2.double() - ours[layer].sum).norm() / ours[layer].sum.norm()
        assert err < 1e-5, float(err)
