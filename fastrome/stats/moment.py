"""The key statistics themselves: :class:`SecondMoment` (the fp64 sum of ``k kᵀ`` and the token
count) and its file format.

A statistics file is safetensors with JSON metadata: model fingerprint, layer, corpus id, token
budget, tokens used, max length, dtype, and a sha256 content digest of the whole file. A file is
validated when loaded: statistics are never silently used for a different model, layer or
corpus, nor after their bytes changed on disk.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from safetensors import safe_open
from torch import Tensor

from fastrome.adapter import ModelAdapter
from fastrome.cache import write_safetensors
from fastrome.fingerprint import content_digest, fingerprint
from fastrome.solver import CovarianceSolver, aligned, count_nonfinite

FORMAT = "fastrome.second_moment.v1"
MIN_TOKENS = 100_000
TOKENS_PER_DIM = 20
# Metadata entry holding the sha256 of everything else in the file (see fingerprint.content_digest).
DIGEST_KEY = "content_sha256"


def default_token_budget(d_in: int) -> int:
    """Default number of tokens: at least ``20·d_in`` (a full d×d estimate needs ≥ 10·d) and 100k."""
    return max(MIN_TOKENS, TOKENS_PER_DIM * int(d_in))


def is_statistics_file(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` is a safetensors file written by :meth:`SecondMoment.save`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # unreadable or not safetensors at all
        return False


def layer_fingerprint(adapter: ModelAdapter, layer: int) -> str:
    """Fingerprint of everything that determines the keys at ``layer`` (not its down projection,
    so statistics stay valid while that layer is edited)."""
    return fingerprint(adapter.config, adapter.layer_parameters(layer), extra=adapter.module_template)


def check_sum(total: Tensor, where: str) -> None:
    """Raise ``ValueError`` unless ``total`` can be a sum of ``k kᵀ``: finite, with a diagonal of
    sums of squares (≥ 0). Catches NaN/Inf keys and damage a digest cannot, in files without one.

    Args:
        total: (d, d) float sum.
        where: prefix of the message, naming the file or layer.
    """
    bad = count_nonfinite(total)  # by blocks of rows: a whole-matrix isfinite costs two d×d copies
    if bad:
        raise ValueError(f"{where}: the sum has {bad:,} non-finite entries (NaN or Inf) of {total.numel():,}")
    negative = int((total.diagonal() < 0).sum())
    if negative:
        raise ValueError(
            f"{where}: {negative:,} diagonal entries of the sum are negative, which a sum of k kᵀ never has; "
            "the statistics are corrupted"
        )


def with_digest(tensors: Dict[str, Tensor], meta: Dict[str, str]) -> Dict[str, str]:
    """``meta`` plus the content digest of (``tensors``, ``meta``), as it is written."""
    return {**meta, DIGEST_KEY: content_digest(tensors, meta)}


def verify_digest(tensors: Dict[str, Tensor], meta: Dict[str, str], where: str, *, required: bool) -> None:
    """Check the digest in ``meta`` (removed from it) against the content read.

    Raises ``ValueError`` on a mismatch, or when ``required`` and there is none; a file from before
    digests existed otherwise loads, with a warning that it cannot be verified.
    """
    recorded = meta.pop(DIGEST_KEY, None)
    if recorded is None:
        if required:
            raise ValueError(f"{where} has no content digest")
        warnings.warn(
            f"{where} has no content digest (written by an older fastrome), so damage to its numbers cannot "
            "be detected; save it again or recompute it to add one",
            stacklevel=3,
        )
        return
    actual = content_digest(tensors, meta)
    if actual != recorded:
        raise ValueError(
            f"{where} is corrupted: its contents hash to sha256 {actual[:16]}…, not the {recorded[:16]}… recorded "
            "when it was written (the file was damaged or altered since); recompute it"
        )


def read_safetensors(path: Path, where: str) -> Tuple[Dict[str, str], Dict[str, Tensor]]:
    """(metadata, every tensor) of a safetensors file; ``ValueError`` when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ValueError(f"{where} is not a readable fastrome statistics file ({exc})") from None


@dataclass
class SecondMoment:
    """Sum of ``k kᵀ`` over ``count`` keys at one layer, with where it came from.

    Attributes:
        layer: layer index.
        sum: (d, d) float64 (or float32) symmetric sum.
        count: number of keys (tokens) summed.
        meta: provenance (model fingerprint, corpus id, budget, max length, dtype, ...).
        source: the file these statistics were read from or saved to, if any (named in errors).
    """

    layer: int
    sum: Tensor
    count: int
    meta: Dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    @property
    def matrix(self) -> Tensor:
        """``C = sum / count`` in the sum's dtype."""
        if self.count <= 0:
            raise ValueError("statistics hold no tokens")
        return self.sum / self.count

    def to_device(self, device: Union[str, torch.device]) -> "SecondMoment":
        return SecondMoment(layer=self.layer, sum=self.sum.to(device), count=self.count, meta=dict(self.meta),
                            source=self.source)

    def describe(self) -> str:
        corpus = self.meta.get("corpus", "?")
        return f"layer {self.layer}: {self.count:,} tokens of {corpus}"

    def solver(
        self,
        relative_ridge: float,
        *,
        device: Optional[Union[str, torch.device]] = None,
        precision: str = "float64",
        consume: bool = False,
    ) -> CovarianceSolver:
        """A :class:`~fastrome.solver.CovarianceSolver` of ``C`` (:attr:`matrix`, (d, d)) with a ridge
        of ``relative_ridge`` · mean |diag C|; its errors name these statistics' file (or layer).

        ``consume``: these statistics are not needed afterwards; ``C`` is formed in the sum's own
        buffer and is the factorisation's scratch, so the solve adds one d×d buffer, not three, and
        this object holds no sum afterwards. The solver is the same, bit for bit."""
        corpus = self.meta.get("corpus", "?")
        where = repr(self.source) if self.source else f"of layer {self.layer} ({self.count:,} tokens of {corpus})"
        if consume and self.count > 0:
            # The solver factorises in an aligned buffer; a sum read from a file may not be one. It is
            # made one here, where the sum is dropped at once, so one d×d buffer is held, not two.
            C, self.sum = aligned(self.sum), self.sum.new_empty((0, 0))
            C.div_(self.count)  # in place, the same rounding as sum / count
        else:
            C = self.matrix  # a new tensor (or the "no tokens" error): the solver may use it as scratch
        return CovarianceSolver(C, relative_ridge=relative_ridge, device=device, precision=precision,
                                source=where, overwrite_c=True)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write a safetensors file: the sum, and metadata with a content digest of it all."""
        total = self.sum.detach().contiguous().cpu()
        meta = {k: json.dumps(v) for k, v in self.meta.items()}
        meta.update(format=FORMAT, layer=str(self.layer), count=str(self.count))
        written = write_safetensors(path, {"sum": total}, with_digest({"sum": total}, meta))
        self.source = str(written)
        return written

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SecondMoment":
        """Read a file written by :meth:`save` (safetensors only, nothing is unpickled).

        Raises:
            ValueError: naming the file, when it is unreadable, of another format, has damaged
                metadata, does not match its content digest, or holds a sum that is not square,
                not finite or has negative diagonal entries. A file written before digests existed
                loads, with a warning.
        """
        path = Path(path)
        where = f"stats: {str(path)!r}"
        meta, tensors = read_safetensors(path, where)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{where} has format {meta.get('format')!r}, expected {FORMAT!r}")
        if "sum" not in tensors:
            raise ValueError(f"{where} is not a readable fastrome statistics file (no 'sum' tensor)")
        verify_digest(tensors, meta, where, required=False)
        total = tensors["sum"]
        try:
            layer, count = int(meta.pop("layer")), int(meta.pop("count"))
            meta.pop("format")
            info = {k: json.loads(v) for k, v in meta.items()}
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{where} has damaged metadata ({exc})") from None
        if total.dim() != 2 or total.shape[0] != total.shape[1] or count <= 0:
            raise ValueError(f"{where} holds a {tuple(total.shape)} sum over {count} tokens")
        check_sum(total, where)
        return cls(layer=layer, sum=total, count=count, meta=info, source=str(path))

    def check(self, *, layer: int, dim: int, model_fingerprint: Optional[str], source: str = "stats") -> None:
        """Raise ``ValueError`` if these statistics do not belong to (model, layer)."""
        if self.layer != layer:
            raise ValueError(f"{source}: statistics are for layer {self.layer}, but layer {layer} is edited")
        if self.dim != dim:
            raise ValueError(f"{source}: statistics have dimension {self.dim}, the layer's keys have {dim}")
        theirs = self.meta.get("model_fingerprint")
        if model_fingerprint is not None and theirs is not None and theirs != model_fingerprint:
            raise ValueError(
                f"{source}: statistics were computed for model {theirs}, not this model ({model_fingerprint}); "
                "recompute them (fastrome stats) or load the matching model"
            )

