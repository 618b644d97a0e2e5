"""Edits exported as a PEFT LoRA adapter and loaded by the real ``peft`` package onto a fresh,
unedited base: the same logits as the edited model, the same weights once merged, and two adapters
switched on one base."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fastrome import Editor
from fastrome.adapter import ModelAdapter

peft = pytest.importorskip("peft")

REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "case_id": 1},
    {"prompt": "{} was painted by", "subject": "The Mona Lisa", "target_new": "Pablo Picasso", "case_id": 2},
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "chess", "case_id": 3},
]
FAST = dict(v_steps=3, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False)
PROBES = ["The Eiffel Tower is located in", "The Mona Lisa was painted by", "A quiet morning in the city of"]


def spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return (a @ a.T / a.shape[1] + 0.1 * torch.eye(d, dtype=torch.float64)).float()


def edited(make_tiny, requests, **kw):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    stats = {layer: spd(ModelAdapter(model).d_in, layer) for layer in range(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ed = Editor(model, tok, stats=stats, **{**FAST, **kw})
        ed.edit(requests)
    return ed, tok


def logits(model, tok, prompts=PROBES):
    with torch.no_grad():
        return torch.stack([model(**tok(p, return_tensors="pt")).logits[0, -1] for p in prompts])


@pytest.mark.parametrize("spread", [1, 2])
def test_the_adapter_gives_the_edited_model_on_a_fresh_base(make_tiny, tmp_path, spread):
    ed, tok = edited(make_tiny, REQS, layer=2, spread=spread, mode="dual", memory_beta=0.02)
    out = ed.save_peft(tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    modules = [ed.adapter.module_template.format(layer) for layer in range(3 - spread, 3)]
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(modules)
    assert config["rank_pattern"] == {m: 3 for m in modules} == config["alpha_pattern"]  # 3 edits, scale 1
    facts = json.loads((out / "fastrome_edits.json").read_text())["edits"]
    assert facts[0]["subject"] == "The Eiffel Tower" and facts[0]["target_new"] == "Rome"
    assert facts[0]["target_true"] == "Paris" and len(facts) == 3 * spread

    base, _ = make_tiny("llama-bytelevel", layers=3)  # the same seed: the unedited weights
    unedited = logits(base, tok)
    lora = peft.PeftModel.from_pretrained(base, str(out))
    want = logits(ed.model, tok)
    got = logits(lora, tok)
    assert (want - unedited).abs().max() > 1e-2  # the edits changed these logits
    assert (got - want).abs().max() <= 1e-4
    merged = lora.merge_and_unload()
    for layer in range(3 - spread, 3):
        name = ed.adapter.module_template.format(layer) + ".weight"
        torch.testing.assert_close(merged.get_parameter(name), ed.adapter.weight(layer).detach(),
                                   rtol=0, atol=1e-5)


def test_two_adapters_switch_on_one_base(make_tiny, tmp_path):
    first, tok = edited(make_tiny, REQS[:1], layer=1, spread=1)
    second, _ = edited(make_tiny, REQS[1:], layer=2, spread=1)
    first.save_peft(tmp_path / "a")
    second.save_peft(tmp_path / "b")
    base, _ = make_tiny("llama-bytelevel", layers=3)
    plain = logits(base, tok)
    lora = peft.PeftModel.from_pretrained(base, str(tmp_path / "a"), adapter_name="a")
    lora.load_adapter(str(tmp_path / "b"), adapter_name="b")
    lora.set_adapter("a")
    assert (logits(lora, tok) - logits(first.model, tok)).abs().max() <= 1e-4
    lora.set_adapter("b")
    assert (logits(lora, tok) - logits(second.model, tok)).abs().max() <= 1e-4
    with lora.disable_adapter():
        assert (logits(lora, tok) - plain).abs().max() <= 1e-5


def test_an_editor_without_edits_refuses_to_export(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = Editor(model, tok, stats={1: spd(ModelAdapter(model).d_in, 1)}, layer=1, spread=1, **FAST)
    with pytest.raises(ValueError, match="no applied edits"):
        ed.save_peft(tmp_path / "x")
    assert not (tmp_path / "x").exists()
