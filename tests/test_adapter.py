"""Layer discovery and one full edit on each supported architecture family (tiny random configs)."""

from __future__ import annotations

import pytest
import torch

from fastrome import Editor
from fastrome.adapter import ModelAdapter

REQ = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}


def build(kind: str, vocab: int):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=53, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None)), "model.layers.{}.mlp.down_proj"
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)), "model.layers.{}.mlp.down_proj"
    if kind == "gptj":
        cfg = tf.GPTJConfig(vocab_size=vocab, n_embd=32, n_inner=53, n_layer=3, n_head=4, rotary_dim=4, n_positions=256)
        return tf.GPTJForCausalLM(cfg), "transformer.h.{}.mlp.fc_out"
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_inner=53, n_layer=3, n_head=4, n_positions=256)
        return tf.GPT2LMHeadModel(cfg), "transformer.h.{}.mlp.c_proj"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gptj", "gpt2"])
def test_discovery_and_edit(kind, bytelevel_tokenizer):
    model, template = build(kind, len(bytelevel_tokenizer))
    model.eval()
    adapter = ModelAdapter(model)
    assert adapter.module_template == template and adapter.n_layers == 3
    assert (adapter.d_out, adapter.d_in) == (32, 53)
    assert adapter.is_conv1d == (kind == "gpt2")
    assert (adapter.bias(1) is not None) == (kind in ("gpt2", "gptj"))
    expected_family = "llama" if kind in ("mistral", "qwen2") else "gpt"
    assert adapter.family == expected_family
    before = adapter.weight(1).detach().clone()
    ed = Editor(model, bytelevel_tokenizer, stats="identity", layer=1, cache_dir=False, v_steps=3,
                template_lengths=((3, 2),), max_update_ratio=float("inf"), spread=1)
    with pytest.warns(UserWarning, match="statistics switched off"):
        rec = ed.edit(REQ)[0]
    assert rec.status == "applied"
    art = ed.last
    delta = adapter.weight(1).detach() - before
    torch.testing.assert_close(delta, torch.outer(art.lam, art.u), rtol=1e-5, atol=1e-6)
    b = adapter.bias(1)
    # the default (dual) write: v* exactly at the unprefixed key, the same change Λ at the prefixed mean
    out = adapter.weight(1).detach() @ art.k_plain + (b.detach() if b is not None else 0)
    torch.testing.assert_close(out, art.v_star, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(delta @ art.k_mean, art.lam, rtol=1e-4, atol=1e-4)


def test_module_template_override_and_errors(bytelevel_tokenizer):
    model, _ = build("qwen2", len(bytelevel_tokenizer))
    adapter = ModelAdapter(model, module_template="model.layers.{}.mlp.up_proj")
    assert adapter.d_in == 32 and adapter.d_out == 53
    with pytest.raises(ValueError, match="module_template"):
        ModelAdapter(model, module_template="model.blocks.{}.mlp.down_proj")
    with pytest.raises(ValueError, match="module_template"):
        ModelAdapter(model, module_template="model.layers.{}.mlp")  # not a Linear
    with pytest.raises(ValueError, match="layer: 3 is not a layer"):
        ModelAdapter(model).check_layer(3)
    with pytest.raises(ValueError, match="model:"):
        ModelAdapter(torch.nn.Sequential(torch.nn.Linear(2, 2)))
