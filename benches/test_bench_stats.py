"""Statistics pass throughput: fastrome's one pass for all layers against the published procedure
(one full forward per layer with a stop hook, fp32 matmul accumulation, no packing), same run.

CPU: SmolLM2-135M-Instruct (fp32) over the bundled corpus.
GPU: a Llama-2-7B-shaped random bf16 model over random token ids (throughput does not depend on
the text), plus the projected time for 44M tokens at layer 5.

    python -m pytest benches/test_bench_stats.py --benchmark-only --benchmark-json=benches/results/stats_<device>.json
    python benches/render.py benches/results/stats_<device>.json
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness import DEVICE

from fastrome.adapter import ModelAdapter
from fastrome.baselines.layer_stats import all_layers_reference
from fastrome.corpus import open_corpus
from fastrome.stats import compute

CPU = DEVICE == "cpu"
TOKENS = 6_000 if CPU else 262_144
MAX_LEN = 1024
LAYER_SETS = [(6,), (3, 4, 5, 6)] if CPU else [(5,), (3, 4, 5, 6, 7, 8)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, tokenizer, corpus, model name)."""
    if CPU:
        from fastrome.models import load_model

        try:
            model, tok = load_model()
        except FileNotFoundError as exc:
            pytest.skip(str(exc))
        return model, tok, open_corpus(), "SmolLM2-135M-Instruct fp32"
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    # random "documents" of 200–1500 tokens: the sequence mix a wiki corpus gives after truncation
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("ids")
    docs, total = [], 0
    while total < 2 * TOKENS:
        n = int(rng.integers(200, 1500))
        docs.append(rng.integers(3, 32000, size=n, dtype=np.int64))
        total += n
    for i, doc in enumerate(docs):
        np.save(folder / f"{i:05d}.npy", doc)
    return model, None, open_corpus(folder), "Llama-2-7B-shaped random bf16"


@pytest.mark.parametrize("layers", LAYER_SETS, ids=lambda ls: "L" + "-".join(map(str, ls)))
@pytest.mark.parametrize("impl", ["reference (published)", "fastrome", "fastrome packed"])
def test_stats_pass(timed, setup, impl, layers):
    model, tok, corpus, name = setup
    adapter = ModelAdapter(model)
    kw = dict(corpus=corpus, tokens=TOKENS, max_len=MAX_LEN)
    if impl.startswith("reference"):
        fn = lambda: all_layers_reference(model, tok, layers, **kw)  # noqa: E731
    else:
        packing = "pack" if impl.endswith("packed") else "truncate"
        fn = lambda: compute(adapter, tok, layers, packing=packing, progress=False, **kw)  # noqa: E731
    timed(fn, rounds=3 if CPU else 2, op="stats", impl=impl, model=name, layers=list(layers), tokens=TOKENS,
          shape=[TOKENS, len(layers)], dtype=str(adapter.weight(layers[0]).dtype).replace("torch.", ""))
