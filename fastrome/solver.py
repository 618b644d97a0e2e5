"""``u = (C + ridge·I)⁻¹ k`` and ``uᵀk`` from a factorisation of the key second moment, cached.

The Cholesky factor is computed once in fp64 on the device where the keys live, and every solve
goes through :func:`fastrome.ops.solve_keys`. fp64 because ``C`` of real models spans many orders
of magnitude (condition numbers of 10⁶–10⁹ are common) and ``u`` is dominated by its small
eigen-directions.
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
        device: where the factor lives (default: C's device).

    Attributes:
        factor: (d, d) fp64 lower Cholesky factor of ``C + ridge·I``.
        ridge: ridge actually used.
        condition_estimate: ``(max Lᵢᵢ / min Lᵢᵢ)²``, a cheap lower bound on cond(C + ridge·I).
        identity: True when built by :meth:`identity` (no statistics).
    """

    def __init__(self, C: Tensor, ridge: float = 0.0, *, device: Optional[Union[str, torch.device]] = None):
        if not isinstance(C, Tensor) or C.dim() != 2 or C.shape[0] != C.shape[1] or not C.is_floating_point():
            shape = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
            raise ValueError(f"C: expected a square floating-point matrix, got {shape}")
        if not (isinstance(ridge, (int, float)) and ridge >= 0 and math.isfinite(ridge)):
            raise ValueError(f"ridge: expected a finite number >= 0, got {ridge!r}")
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
        self.factor = factor
        self.ridge = used
        diag = factor.diagonal()
        self.condition_estimate = float((diag.max() / diag.min()) ** 2)
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
        return self.factor.device

    def solve(self, k: Tensor) -> Tuple[Tensor, Tensor]:
        """``(u, uᵀk)`` for one key (d,) or a batch (b, d); dtype ``promote(k.dtype, fp32)``."""
        if not isinstance(k, Tensor) or k.shape[-1:] != (self.dim,) or k.dim() not in (1, 2):
            shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
            raise ValueError(f"k: expected shape ({self.dim},) or (b, {self.dim}), got {shape}")
        return ops.solve_keys(self.factor, k.to(self.device))

    def __repr__(self) -> str:
        kind = "identity" if self.identity else f"ridge={self.ridge:.3g}, cond≳{self.condition_estimate:.3g}"
        return f"CovarianceSolver(d={self.dim}, {kind}, device={self.device})"
