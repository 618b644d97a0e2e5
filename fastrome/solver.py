"""``u = (C + ridge·I)⁻¹ k`` and ``uᵀk`` from the key second moment, with the inverse cached.

Construction factorises ``C + ridge·I`` once (fp64 Cholesky, on the device where the keys live) and
keeps its inverse; every solve is then one pass over that inverse through
:func:`fastrome.ops.solve_keys`, a matrix-vector product fused with the denominator.

Why an inverse rather than triangular solves (measured in ``benches/solve_options.py`` on the
statistics of SmolLM2 layers 3–10, condition numbers 1.5e2–6.9e3 with the default ridge):
an fp64 inverse gives ``u`` to 1e-14 relative error against an fp64 LU solve, as good as the fp64
Cholesky solve and far below the fp32 rounding of ``u`` itself (6e-8), while the product is a
single bandwidth-bound pass that parallelises over rows on any device. Triangular solves are
sequential: on the CPU the fused substitution took 6.6 ms per key at d = 1536 and 109 ms at
d = 4096, against 0.54 ms and 5.6 ms for the fp64 product; on a GPU a triangular solve is
latency-bound while the product runs at memory bandwidth. ``precision="float32"`` keeps an fp32
inverse (half the memory and bytes read; 1e-6 relative error on ``u``, still at the fp32 level of
the weights it is written into).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from fastrome import ops


class CovarianceSolver:
    """Solves against a fixed symmetric positive-definite second moment ``C``.

    Args:
        C: (d, d) symmetric matrix (any float dtype), the uncentered key second moment E[kkᵀ].
        ridge: added to the diagonal before factorising (absolute, ≥ 0). If the factorisation fails,
            the ridge is raised step by step with a warning; :attr:`ridge` holds the value used.
        device: where the inverse lives (default: C's device).
        precision: dtype of the cached inverse, ``"float64"`` (default) or ``"float32"``.

    Attributes:
        inverse: (d, d) symmetric ``(C + ridge·I)⁻¹`` in ``precision``.
        ridge: ridge actually used.
        condition: 1-norm condition number ``‖C + ridge·I‖₁·‖(C + ridge·I)⁻¹‖₁``.
        identity: True when built by :meth:`identity` (no statistics).
    """

    def __init__(
        self,
        C: Tensor,
        ridge: float = 0.0,
        *,
        device: Optional[Union[str, torch.device]] = None,
        precision: str = "float64",
    ):
        if not isinstance(C, Tensor) or C.dim() != 2 or C.shape[0] != C.shape[1] or not C.is_floating_point():
            shape = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
            raise ValueError(f"C: expected a square floating-point matrix, got {shape}")
        if not (isinstance(ridge, (int, float)) and ridge >= 0 and math.isfinite(ridge)):
            raise ValueError(f"ridge: expected a finite number >= 0, got {ridge!r}")
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision: expected 'float64' or 'float32', got {precision!r}")
        C64 = C.detach().to(device=device or C.device, dtype=torch.float64)
        if not torch.isfinite(C64).all():
            raise ValueError("C: contains NaN or Inf")
        C64 = 0.5 * (C64 + C64.t())  # exact symmetry, whatever rounding the accumulation left
        scale = float(C64.diagonal().abs().mean()) or 1.0
        eye = torch.eye(C64.shape[0], dtype=torch.float64, device=C64.device)
        used = float(ridge)
        for attempt in range(12):
            factor, info = torch.linalg.cholesky_ex(C64 + used * eye)
            if int(info) == 0:
                break
            used = max(used * 10.0, scale * 1e-12 * 10.0**attempt)
        else:
            raise ValueError(
                f"C: not positive definite even with a ridge of {used:.3e}; the statistics are "
                "probably computed from too few tokens or are corrupted"
            )
        if used != ridge:
            warnings.warn(
                f"C is not positive definite with ridge={ridge:g}; factorised with ridge={used:.3e} instead",
                stacklevel=2,
            )
        inverse = torch.cholesky_inverse(factor)
        inverse = 0.5 * (inverse + inverse.t())  # the solve kernels read rows as columns
        norm1 = float((C64 + used * eye).abs().sum(0).max())
        self.condition = norm1 * float(inverse.abs().sum(0).max())
        self.inverse = inverse.to(getattr(torch, precision))
        self.ridge = used
        self.identity = False
        self.dim = int(C64.shape[0])

    @classmethod
    def identity(cls, dim: int, device: Optional[Union[str, torch.device]] = None) -> "CovarianceSolver":
        """A solver for ``C = I`` (statistics switched off): ``u = k``."""
        solver = cls(torch.eye(dim, dtype=torch.float64, device=device))
        solver.identity = True
        return solver

    @property
    def device(self) -> torch.device:
        return self.inverse.device

    def solve(self, k: Tensor) -> Tuple[Tensor, Tensor]:
        """``(u, uᵀk)`` for one key (d,) or a batch (b, d); dtype ``promote(k.dtype, fp32)``."""
        if not isinstance(k, Tensor) or k.shape[-1:] != (self.dim,) or k.dim() not in (1, 2):
            shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
            raise ValueError(f"k: expected shape ({self.dim},) or (b, {self.dim}), got {shape}")
        return ops.solve_keys(self.inverse, k.to(self.device))

    def __repr__(self) -> str:
        kind = "identity" if self.identity else f"ridge={self.ridge:.3g}, cond₁={self.condition:.3g}"
        return f"CovarianceSolver(d={self.dim}, {kind}, {self.inverse.dtype}, device={self.device})"
