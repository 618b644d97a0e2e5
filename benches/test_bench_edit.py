"""Per-edit time: fastrome against the in-repo reference ROME (fastrome.baselines.rome), same run.

CPU: SmolLM2-135M-Instruct (fp32), layer 6, the first CounterFact dev records; every implementation
edits the same records from the same starting weights with the same templates and statistics.
GPU: a Llama-2-7B-shaped random bf16 model (layer 5; the reference runs an fp32 copy, as the
original code does). A random model never reaches the early-stop loss, so every edit there runs the
full step budget in both implementations.

    python -m pytest benches/test_bench_edit.py --benchmark-only --benchmark-json=benches/results/edit_<device>.json
    python benches/render.py benches/results/edit_<device>.json

Recorded per implementation: seconds per edit (the median round over ``EDITS`` edits, divided by
``EDITS``), seconds per phase, optimisation steps, and peak GPU memory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from harness import DEVICE, sync

from fastrome import CLASSIC, Editor
from fastrome.adapter import ModelAdapter
from fastrome.baselines.rome import ReferenceRome
from fastrome.config import DEFAULT_SPREAD
from fastrome.requests import parse_requests

CPU = DEVICE == "cpu"
EDITS = 4 if CPU else 8
DATA = Path(os.environ.get("FASTROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def setup():
    """(model, tokenizer, layer, requests, second moment, templates, model name)."""
    path = DATA / "counterfact" / "counterfact_dev.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    records = json.loads(path.read_text())[: 2 * EDITS]
    if CPU:
        from fastrome.models import load_model

        try:
            model, tok = load_model()
        except FileNotFoundError as exc:
            pytest.skip(str(exc))
        name, layer, stats = "SmolLM2-135M-Instruct fp32", 6, None
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from fastrome.models import load_model

        _, tok = load_model()  # any offline tokenizer: the random model only needs ids below its vocabulary
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=len(tok), max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        name, layer = "Llama-2-7B-shaped random bf16", 5
        d = cfg.intermediate_size
        g = torch.Generator(device=DEVICE).manual_seed(0)
        x = torch.randn(4 * d, d, device=DEVICE, generator=g)
        moment = x.T @ x / x.shape[0]
        stats = {at: moment for at in range(layer - DEFAULT_SPREAD + 1, layer + 1)}
    if stats is None:  # the edited layer and the ones below it that a default (spread) edit also writes
        from fastrome.stats import load_or_compute

        found = load_or_compute(ModelAdapter(model), tok, list(range(layer - DEFAULT_SPREAD + 1, layer + 1)),
                                progress=False)
        stats = {at: sm.matrix for at, sm in found.items()}
    templates = Editor(model, tok, stats=stats, layer=layer, progress=False).templates()
    return model, tok, layer, parse_requests(records)[:EDITS], stats, templates, name


def _reset(adapter, bases):
    with torch.no_grad():
        for layer, base in bases.items():
            adapter.weight(layer).copy_(base)


IMPLS = ["reference (original)", "reference (consistent)", "fastrome classic", "fastrome classic, whole-model steps",
         "fastrome classic batched", "fastrome default"]
# classic one-edit ROME (the reference's algorithm) and the default (dual keys, spread, edit memory,
# early stopping; the memory's update is its own phase)
SETTINGS = {impl: CLASSIC for impl in IMPLS if impl.startswith("fastrome classic")}


@pytest.mark.parametrize("impl", IMPLS)
def test_edit(timed, benchmark, setup, impl):
    model, tok, layer, reqs, stats, templates, name = setup
    C = stats[layer]
    adapter = ModelAdapter(model)
    bases = {at: adapter.weight(at).detach().clone() for at in stats}
    base = bases[layer]
    info = {"phases": {}, "steps": []}
    if impl.startswith("reference"):
        mode = "original" if "original" in impl else "consistent"
        ref_model = model if CPU else _fp32_copy(model)
        rome = ReferenceRome(ref_model, tok, layer, C, templates, mode=mode)
        ref_adapter = ModelAdapter(ref_model)
        ref_base = ref_adapter.weight(layer).detach().clone()

        def fn():
            _reset(ref_adapter, {layer: ref_base})
            for r in reqs:
                res = rome.edit(r)
                info["steps"].append(res.steps)
                for k, v in res.seconds.items():
                    info["phases"][k] = info["phases"].get(k, 0.0) + v
    else:
        batch = len(reqs) if impl.endswith("batched") else 1
        ed = Editor(model, tok, stats=stats, layer=layer, policy="force", progress=False,
                    v_fast=not impl.endswith("whole-model steps"), cache_dir=False, **SETTINGS.get(impl, {}))
        ed.use_templates(templates)
        ed.solver(layer)

        def fn():
            _reset(adapter, bases)
            report = ed.edit(reqs, batch_size=batch)
            for rec in report.records:
                info["steps"].append(rec.steps)
                for k, v in rec.seconds.items():
                    info["phases"][k] = info["phases"].get(k, 0.0) + v

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    timed(fn, rounds=1 if CPU else 3, op="edit", impl=impl, model=name, layer=layer, edits=len(reqs),
          shape=[len(reqs)], dtype=str(base.dtype).replace("torch.", ""))
    sync()
    rounds = 2 if CPU else 4  # warm-up round + measured rounds
    info["phases"] = {k: v / (rounds * len(reqs)) for k, v in info["phases"].items()}
    info["steps_per_edit"] = sum(info["steps"]) / max(1, len(info["steps"]))
    info["wall_total"] = time.perf_counter() - t0
    if DEVICE == "cuda":
        info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        info["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    _reset(adapter, bases)
    benchmark.extra_info.update(info)


def _fp32_copy(model):
    import copy

    return copy.deepcopy(model).float()
