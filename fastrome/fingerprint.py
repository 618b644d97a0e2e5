"""Fingerprints of models, so cached results are never reused for the wrong weights.

A fingerprint hashes the model's configuration and the bytes of the given parameters. Tensors of
up to 4M elements are hashed in full; larger ones (embeddings, 7B-scale matrices) through an
evenly strided sample of 1M elements plus their fp64 sum and sum of squares, which still changes
with any realistic change of the weights at a small fraction of the cost. The sums are taken 1M
elements at a time, so a fingerprint never holds more than a chunk's fp64 copy (8 MB) beside the
weights: a whole-tensor copy would cost 16 bytes per element (+2 GB for a 32k×4096 embedding).

:func:`content_digest` is the exact counterpart for files fastrome writes and reads back (key
statistics and their checkpoints): it hashes every byte, so a damaged file is recognised.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Tuple

import numpy as np
import torch
from torch import Tensor

FULL_HASH_MAX = 1 << 22
SAMPLE = 1 << 20
SUM_CHUNK = 1 << 20  # elements per fp64 chunk of the sums over a large tensor
# where a dequantised copy of a GGUF model records the GGUF loader's quantization_config (gguf_cache)
GGUF_SOURCE_KEY = "fastrome_gguf_source"
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path")


def config_digest(config: Any) -> str:
    if config is None:
        return "no-config"
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    if GGUF_SOURCE_KEY in raw:  # a dequantised copy: the digest of the GGUF-loaded model it copies
        raw["quantization_config"] = raw.pop(GGUF_SOURCE_KEY)
    clean = {k: v for k, v in raw.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_attn")}
    return json.dumps(clean, sort_keys=True, default=str)


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _hash_exact(h: "hashlib._Hash", t: Tensor) -> None:
    """Feed every byte of ``t`` to ``h`` (through a buffer view: no copy of a CPU tensor)."""
    h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def update_with_tensor(h: "hashlib._Hash", name: str, t: Tensor) -> None:
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    flat = t.detach().reshape(-1)
    if flat.numel() <= FULL_HASH_MAX:
        _hash_exact(h, flat)
        return
    # Integer arithmetic: a float linspace rounds past the last index for large tensors.
    idx = torch.arange(SAMPLE, dtype=torch.int64, device=flat.device) * (flat.numel() - 1) // (SAMPLE - 1)
    h.update(_tensor_bytes(flat[idx]))
    h.update(repr(_chunked_sums(flat)).encode())


def _chunked_sums(flat: Tensor) -> Tuple[float, float]:
    """fp64 sum and sum of squares of a 1-D tensor, :data:`SUM_CHUNK` elements at a time (the chunks'
    sums added in order, so the result depends only on the values and the chunk size).

    Each chunk is summed by numpy (pairwise, on one thread): torch's reductions split the work by
    the thread count, and a sum that changed its last bit with ``torch.set_num_threads`` would give
    the same weights another fingerprint, so a statistics cache written by a run on two threads
    would be recomputed by one on one thread."""
    total = squares = 0.0
    for start in range(0, flat.numel(), SUM_CHUNK):
        chunk = flat[start : start + SUM_CHUNK].detach().to("cpu", torch.float64).numpy()
        total += float(chunk.sum())
        squares += float(np.square(chunk).sum())
    return total, squares


def fingerprint(config: Any, named_tensors: Iterable[Tuple[str, Tensor]], extra: str = "") -> str:
    """Hex digest (16 chars) of a config and named tensors."""
    h = hashlib.sha256()
    h.update(config_digest(config).encode())
    h.update(extra.encode())
    with torch.no_grad():
        for name, t in named_tensors:
            update_with_tensor(h, name, t)
    return h.hexdigest()[:16]


def content_digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 (64 hex chars) of a safetensors file's whole content, as it is written and read back.

    Covers every metadata entry (sorted by key) and every tensor (sorted by name): its name, dtype,
    shape and exact bytes, never a sample, so any change of a stored number, however small, and any
    edit of the metadata give another digest. Independent of the device the tensors are on.

    Args:
        tensors: name -> tensor of any dtype and shape.
        metadata: name -> string, the file's metadata without the digest itself.
    """
    h = hashlib.sha256()
    h.update(json.dumps(sorted(metadata.items())).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        _hash_exact(h, t)
    return h.hexdigest()
