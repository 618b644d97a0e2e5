"""load_model: local folders, model ids from the local Hugging Face cache (offline), dtype names and
"auto", device_map, and one clear line for every input it cannot take."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama


def _hub_snapshot(root, model_id, model, tok, revision="0123456789abcdef0123456789abcdef01234567"):
    """``model`` saved where huggingface_hub keeps ``model_id`` after a download: the cache layout
    ``models--org--name/snapshots/<commit>/`` with ``refs/main`` naming the commit."""
    repo = root / ("models--" + model_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_model_id_from_the_local_hub_cache(hub_cache, bytelevel_tokenizer):
    from fastrome.models import load_model

    model = tiny_llama(bytelevel_tokenizer, seed=3)
    _hub_snapshot(hub_cache, "acme/tiny-llama", model, bytelevel_tokenizer)
    loaded, tok = load_model("acme/tiny-llama")
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    assert tok("Paris").input_ids == bytelevel_tokenizer("Paris").input_ids
    assert not loaded.training and loaded.dtype == torch.float32


def test_an_id_not_in_the_cache_names_the_cache(hub_cache):
    from fastrome.models import load_model

    with pytest.raises(ValueError) as err:
        load_model("acme/not-downloaded")
    msg = str(err.value)
    assert msg.startswith("model: 'acme/not-downloaded' is neither") and str(hub_cache) in msg
    assert "never downloaded" in msg and "\n" not in msg


@pytest.mark.parametrize("dtype,want", [("auto", torch.bfloat16), ("float32", torch.float32),
                                        ("bf16", torch.bfloat16), (torch.float16, torch.float16)])
def test_dtype_names_and_auto(tmp_path, bytelevel_tokenizer, dtype, want):
    from fastrome.models import load_model

    model = tiny_llama(bytelevel_tokenizer, seed=4).to(torch.bfloat16)  # "auto" reads the checkpoint's dtype
    model.save_pretrained(tmp_path)
    bytelevel_tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path, dtype=dtype)
    assert loaded.dtype == want
    w = model.model.layers[1].mlp.down_proj.weight
    got = loaded.model.layers[1].mlp.down_proj.weight
    if want in (torch.bfloat16, torch.float32):  # exact: bf16 values are fp32 values
        assert torch.equal(got.to(torch.bfloat16), w)
    else:
        torch.testing.assert_close(got.float(), w.float(), rtol=4e-3, atol=1e-5)


def test_device_map_is_given_to_transformers_and_kept(tmp_path, bytelevel_tokenizer, monkeypatch):
    pytest.importorskip("accelerate")
    import transformers

    from fastrome.models import load_model

    tiny_llama(bytelevel_tokenizer, seed=5).save_pretrained(tmp_path)
    bytelevel_tokenizer.save_pretrained(tmp_path)
    seen, moved = [], []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        model = real(*args, **kwargs)
        monkeypatch.setattr(model, "to", lambda *a, **k: moved.append(a) or model)
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    loaded, _ = load_model(tmp_path, device_map={"": "cpu"})
    assert seen == [{"": "cpu"}] and moved == []  # placed by transformers, never moved afterwards
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    load_model(tmp_path)
    assert seen[-1] is None and moved == [("cpu",)]  # without a device_map: loaded, then moved to the CPU


@pytest.mark.parametrize("kwargs,start", [
    ({"dtype": "float8"}, "dtype: expected a torch dtype or one of"),
    ({"dtype": 3}, "dtype: expected a torch dtype or one of"),
    ({"device": "cpu", "device_map": "auto"}, "device: give device ('cpu') or device_map ('auto'), not both"),
    ({"device_map": 7}, "device_map: expected a string or a {module: device} dict, got 7"),
])
def test_bad_arguments_are_refused_before_loading(tmp_path, kwargs, start):
    from fastrome.models import load_model

    with pytest.raises(ValueError) as err:
        load_model(tmp_path / "nothing-here", **kwargs)  # the path is never looked at
    assert str(err.value).startswith(start)
