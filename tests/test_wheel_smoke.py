"""Smoke tests of an installed fastrome (run by scripts/wheel_smoke.sh against the wheel in a fresh
virtual environment; in the source tree they check the editable install the same way)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastrome


def test_imported_from_the_installation_under_test():
    source = os.environ.get("FASTROME_SOURCE")
    here = Path(fastrome.__file__).resolve()
    if source:  # the wheel run: the package must not come from the checkout
        assert not str(here).startswith(str(Path(source).resolve()) + os.sep), here
        assert "site-packages" in str(here)


def test_compiled_extension_and_package_data_are_installed():
    from fastrome import _extension
    from fastrome.corpus import open_corpus

    assert _extension.load_error() is None, _extension.load_error()
    assert _extension.build_info()
    docs = list(open_corpus(seed=None).documents())
    assert len(docs) > 1000 and all(isinstance(d, str) for d in docs[:10])
    assert (Path(fastrome.__file__).parent / "data" / "NOTICE").is_file()


def test_command_is_installed():
    exe = shutil.which("fastrome", path=str(Path(sys.executable).parent)) or shutil.which("fastrome")
    assert exe, "the fastrome command is not on PATH"
    out = subprocess.run([exe, "info", "--json"], capture_output=True, text=True, check=True).stdout
    assert '"rank_one_update"' in out


def _tiny():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fastrome.corpus import open_corpus

    texts = list(open_corpus(seed=None).documents())[:200]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=67, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def test_an_edit_end_to_end(tmp_path):
    model, tok = _tiny()
    req = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
    ed = fastrome.Editor(model, tok, layer=1, cache_dir=tmp_path, v_steps=4, stats_tokens=3000, stats_max_len=64,
                         template_lengths=((3, 2),), max_update_ratio=float("inf"), progress=False)
    before = ed.adapter.weight(1).detach().clone()
    report = ed.edit(req)
    assert report.records[0].applied and not torch.equal(ed.adapter.weight(1), before)
    ed.undo_last(1)
    assert torch.equal(ed.adapter.weight(1), before)


def test_native_backend_serves_the_cpu():
    from fastrome import ops

    # the compiled second-moment kernel is the measured CPU choice; without the extension it would
    # silently fall back to the reference
    assert ops.select_backend("second_moment_accumulate", torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("module", ["fastrome.evaluation.plots", "fastrome.evaluation.single",
                                    "fastrome.baselines.rome", "fastrome.baselines.layer_stats", "fastrome.runners",
                                    "fastrome.kernels"])
def test_every_subpackage_is_installed(module):
    import importlib

    assert importlib.import_module(module) is not None


@pytest.mark.skipif(os.environ.get("FASTROME_EXPECT_CUDA") != "1",
                    reason="not a CUDA build under test (scripts/wheel_smoke.sh sets FASTROME_EXPECT_CUDA=1 for one)")
def test_cuda_extension_is_installed_beside_the_cpu_kernels():
    from fastrome import _extension, ops

    assert _extension.cuda_load_error() is None, _extension.cuda_load_error()
    info = _extension.build_info()
    assert info["cuda"] is True and info["cuda_build"]["cuda_arch"], info
    for op in ops.OPS:  # one op per name with a kernel for CPU and CUDA tensors; both compiled kernel sets loaded
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"fastrome::{op}", "CUDA"), op
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"fastrome::{op}", "CPU"), op
        assert callable(getattr(_extension.cuda_kernels(), op)), op
        assert callable(getattr(_extension.cpu_kernels(), op)), op
    assert ops.select_backend("symmetric_rank_one_update", torch.device("cpu")) == "cpp"
    out = subprocess.run([sys.executable, "-m", "fastrome", "info"], capture_output=True, text=True, check=True).stdout
    assert "'cuda': True" in out, out
