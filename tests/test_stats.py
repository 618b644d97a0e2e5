"""Key statistics: one pass for several layers against a per-document fp64 reference, the cache
key, corruption detection, and loading statistics into an Editor."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastrome import Editor, SecondMoment
from fastrome.adapter import ModelAdapter
from fastrome.corpus import open_corpus
from fastrome.stats import cache_file, compute, layer_fingerprint, load_or_compute
from fastrome.tokens import encode


@pytest.fixture
def small_corpus(tmp_path):
    docs = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris.\nIt was designed by Gustave Eiffel.",
        "Rome is the capital city of Italy.",
        "Photosynthesis converts light energy into chemical energy " * 6,
        "A short one.",
        "Mount Everest is Earth's highest mountain above sea level, in the Mahalangur Himal.",
    ] * 8
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"{i}: {d}" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def reference_sums(model, tok, layers, corpus, budget, max_len):
    """Each document alone (no padding), keys gathered by hooks, sums in fp64."""
    adapter = ModelAdapter(model)
    sums = {layer: torch.zeros(adapter.d_in, adapter.d_in, dtype=torch.float64) for layer in layers}
    keys = {}
    hooks = [
        adapter.module(layer).register_forward_hook(lambda m, a, o, layer=layer: keys.__setitem__(layer, a[0]))
        for layer in layers
    ]
    left, count = budget, 0
    try:
        with torch.no_grad():
            for text in corpus.documents():
                if left < 2:  # a single token left makes no sequence
                    break
                ids = encode(tok, text)[:max_len][:left]
                if len(ids) < 2:
                    continue
                left -= len(ids)
                count += len(ids)
                model(input_ids=torch.tensor([ids]))
                for layer in layers:
                    x = keys[layer][0].double()
                    sums[layer] += x.t() @ x
    finally:
        for h in hooks:
            h.remove()
    return sums, count


@pytest.mark.parametrize("kind", ["llama-bytelevel", "llama-sentencepiece", "gpt2-bytelevel"])
def test_one_pass_for_several_layers_equals_fp64_reference(make_tiny, small_corpus, kind):
    model, tok = make_tiny(kind)
    corpus = open_corpus(small_corpus, seed=3)
    adapter = ModelAdapter(model)
    deep = adapter.n_layers - 2
    layers, budget, max_len = [deep, 0], 700, 37
    # the pass must stop after the deepest requested layer
    calls = []
    late = adapter.module(adapter.n_layers - 1).register_forward_hook(lambda *a: calls.append(1))
    try:
        got = compute(adapter, tok, layers, corpus=corpus, tokens=budget, max_len=max_len, batch_tokens=160,
                      progress=False)
    finally:
        late.remove()
    assert calls == []
    ref, count = reference_sums(model, tok, [0, deep], corpus, budget, max_len)
    assert count == budget
    for layer in (0, deep):
        sm = got[layer]
        assert sm.count == budget and sm.meta["tokens"] == budget and sm.layer == layer
        assert sm.sum.dtype == torch.float64
        err = (sm.sum - ref[layer]).norm() / ref[layer].norm()
        assert err < 1e-6, float(err)
        assert torch.equal(sm.sum, sm.sum.t())
        torch.testing.assert_close(sm.matrix, ref[layer] / budget)


def test_corpus_running_out_is_reported(make_tiny, small_corpus):
    model, tok = make_tiny("llama-bytelevel")
    with pytest.warns(UserWarning, match="ran out"):
        sm = compute(ModelAdapter(model), tok, [1], corpus=open_corpus(small_corpus), tokens=10**7, progress=False)[1]
    assert 0 < sm.count < 10**7 and sm.meta["tokens_requested"] == 10**7


def test_cache_key_and_reuse(make_tiny, small_corpus, tmp_path, monkeypatch):
    model, tok = make_tiny("llama-bytelevel")
    adapter = ModelAdapter(model)
    corpus = open_corpus(small_corpus)
    kw = dict(corpus=corpus, tokens=600, max_len=64, cache_root=tmp_path, progress=False)
    first = load_or_compute(adapter, tok, [1, 2], **kw)
    files = sorted((tmp_path / "stats").glob("*.safetensors"))
    assert len(files) == 2

    import fastrome.stats.cache as stats_cache

    def no_compute(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(stats_cache, "compute", no_compute)
    again = load_or_compute(adapter, tok, [1, 2], **kw)
    for layer in (1, 2):
        assert torch.equal(again[layer].sum, first[layer].sum)
    monkeypatch.undo()

    fp = layer_fingerprint(adapter, 1)
    name = cache_file(tmp_path, fp, 1, corpus.id, 600, 64, "float64")
    assert name.is_file()
    # every ingredient of the key changes the file name
    assert cache_file(tmp_path, fp, 1, corpus.id, 601, 64, "float64") != name
    assert cache_file(tmp_path, fp, 1, corpus.id + "x", 600, 64, "float64") != name
    assert cache_file(tmp_path, fp, 1, corpus.id, 600, 65, "float64") != name
    assert cache_file(tmp_path, fp, 2, corpus.id, 600, 64, "float64") != name
    # editing the layer's own down projection keeps the fingerprint (stats stay valid while editing) ...
    with torch.no_grad():
        adapter.weight(1).add_(0.1)
    assert layer_fingerprint(adapter, 1) == fp
    # ... but any weight that feeds the keys changes it
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert layer_fingerprint(adapter, 1) != fp
    # so does another corpus
    other = small_corpus.parent / "other.txt"
    other.write_text(small_corpus.read_text() + "\n\nOne more paragraph.", encoding="utf-8")
    assert open_corpus(other).id != corpus.id


def test_a_second_process_waits_for_the_statistics_another_is_computing(make_tiny, small_corpus, tmp_path,
                                                                         monkeypatch):
    """Two runs started together used to compute the same layers side by side, each on half the
    CPU; the second now waits for the first and reads the file it wrote."""
    import shutil
    import subprocess
    import sys
    import textwrap

    import fastrome.stats.cache as stats_cache

    model, tok = make_tiny("llama-bytelevel")
    adapter = ModelAdapter(model)
    corpus = open_corpus(small_corpus)
    kw = dict(corpus=corpus, tokens=400, max_len=64, progress=False)
    first = load_or_compute(adapter, tok, [1], cache_root=tmp_path / "a", **kw)[1]
    (written,) = (tmp_path / "a" / "stats").glob("*.safetensors")
    shared = tmp_path / "b"
    target = shared / "stats" / written.name
    # the other process: holds the cache while it "computes", then writes the file and exits
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import shutil, sys
            from fastrome.locking import FolderLock
            lock = FolderLock({str(shared / "stats")!r}, "statistics cache")
            print("locked", flush=True)
            sys.stdin.read()
            shutil.copyfile({str(written)!r}, {str(target)!r})
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    waited = []

    def finish_the_other(holder_text):
        waited.append(holder_text)
        holder.stdin.close()

    def no_compute(*a, **k):
        raise AssertionError("computed although another process was writing these statistics")

    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(stats_cache, "_say_waiting", finish_the_other)
        monkeypatch.setattr(stats_cache, "compute", no_compute)
        got = load_or_compute(adapter, tok, [1], cache_root=shared, **kw)[1]
    finally:
        if not holder.stdin.closed:
            holder.stdin.close()
        holder.wait(timeout=60)
    assert waited == [f" (process {holder.pid})"]
    assert torch.equal(got.sum, first.sum) and got.meta["path"] == str(target)
    # a layer the other process did not write is computed once the cache is free
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "a")
    assert set(load_or_compute(adapter, tok, [1, 2], cache_root=shared, **kw)) == {1, 2}


def test_corrupted_cache_is_detected_and_recomputed(make_tiny, small_corpus, tmp_path, caplog):
    model, tok = make_tiny("gpt2-bytelevel")
    adapter = ModelAdapter(model)
    kw = dict(corpus=open_corpus(small_corpus), tokens=500, max_len=64, cache_root=tmp_path, progress=False)
    good = load_or_compute(adapter, tok, [1], **kw)[1]
    (path,) = (tmp_path / "stats").glob("*.safetensors")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        SecondMoment.load(path)
    with caplog.at_level("WARNING", logger="fastrome"):
        again = load_or_compute(adapter, tok, [1], **kw)[1]
    assert f"ignoring cached statistics {path}" in caplog.text
    assert torch.equal(again.sum, good.sum)
    assert SecondMoment.load(path).count == 500  # rewritten
    # a file whose metadata claims another model is rejected too
    sm = SecondMoment.load(path)
    sm.meta["model_fingerprint"] = "0" * 16
    sm.save(path)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastrome"):
        load_or_compute(adapter, tok, [1], **kw)
    assert "statistics were computed for model 0000000000000000" in caplog.text


def test_editor_takes_a_statistics_file_and_rejects_the_wrong_model(make_tiny, small_corpus, tmp_path):
    model, tok = make_tiny("llama-sentencepiece")
    adapter = ModelAdapter(model)
    sm = compute(adapter, tok, [1], corpus=open_corpus(small_corpus), tokens=900, max_len=64, progress=False)[1]
    path = sm.save(tmp_path / "s.safetensors")
    loaded = SecondMoment.load(path)
    assert torch.equal(loaded.sum, sm.sum) and loaded.count == 900 and loaded.meta["corpus"] == sm.meta["corpus"]
    ed = Editor(model, tok, stats=str(path), layer=1, cache_dir=False)
    assert not ed.solver(1).identity and "900 tokens" in ed.stats_source(1)
    with pytest.raises(ValueError, match="layer 1, but layer 2"):
        Editor(model, tok, stats=str(path), layer=2, cache_dir=False).solver(2)
    other, _ = make_tiny("llama-sentencepiece", seed=5)
    with pytest.raises(ValueError, match="computed for model"):
        Editor(other, tok, stats=str(path), layer=1, cache_dir=False).solver(1)


def test_editor_computes_default_statistics_from_a_corpus_path(make_tiny, small_corpus, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    ed = Editor(model, tok, corpus=str(small_corpus), layer=1, cache_dir=tmp_path, stats_tokens=400, stats_max_len=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here may warn: no identity fallback, no ridge escalation
        solver = ed.solver(1)
    assert solver.dim == ed.adapter.d_in and "400 tokens" in ed.stats_source(1)
    # the same pass served layer 0, which the default spread edit at layer 1 also writes
    assert sorted(f.name.split("_")[1] for f in (tmp_path / "stats").glob("*.safetensors")) == ["L0", "L1"]
