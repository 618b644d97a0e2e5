"""Null-space projection (AlphaEdit): the left vector ``u`` is restricted to the low-energy
eigenspace of the key statistics ``C``, so keys of ordinary text (which live in its high-energy
directions) are barely moved by the write.

``P`` projects onto the eigenvectors of ``C`` whose eigenvalue is at most ``threshold`` times the
mean eigenvalue ``tr(C)/d``: a threshold relative to the spectrum, so it means the same on every
model (an absolute one, such as AlphaEdit's 2e-2, keeps about 70% of the directions on one model
and a different share on the next). The solve becomes ``u = P·s(k)`` with ``s`` the plain or
memory solve; ``P`` and ``C⁻¹`` share eigenvectors, so ``uᵀk = (Pk)ᵀC⁻¹(Pk) > 0`` whenever ``Pk ≠ 0``,
and the edit stays exact at its key.

:class:`AlphaEditSolver` is AlphaEdit's own closed form behind the same interface
(``EditConfig(update_form="alphaedit")``), the reference baseline of the lifelong ablation: not
exact at its key (see :mod:`fastrome.baselines.alphaedit`).
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import torch
from torch import Tensor


def null_space_projector(C: Tensor, threshold: float) -> Tuple[Tensor, int]:
    """``(P, rank)``: the (d, d) fp64 orthogonal projector onto the eigenvectors of ``C`` (d, d,
    symmetric) with eigenvalue ≤ ``threshold``·tr(C)/d, and how many there are."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold: expected a finite number > 0, got {threshold!r}")
    C64 = C.detach().to(torch.float64)
    values, vectors = torch.linalg.eigh(0.5 * (C64 + C64.T))
    mean = float(values.mean())
    keep = values <= threshold * mean
    if not bool(keep.any()):
        # no direction to write in: every edit would have uᵀk = 0 and be refused, after its value
        # optimisation; say so once, before any of that work
        raise ValueError(
            f"threshold: {threshold:g} keeps none of the {values.numel()} eigenvectors of C, whose smallest "
            f"eigenvalue is {float(values[0]) / mean:.3g} of the mean; a threshold above that keeps some"
        )
    basis = vectors[:, keep]
    P = basis @ basis.T
    return 0.5 * (P + P.T), int(keep.sum())


class ProjectedSolver:
    """``solve(k) = (P·u, (P·u)ᵀk)`` with ``u`` from ``inner`` (a solver or an edit memory).

    Attributes other than :meth:`solve` (``dim``, ``ridge``, ``keys``, ``add``, ...) are the inner
    solver's, so the memory behind a projection still learns every key.
    """

    def __init__(self, inner: Any, projector: Tensor, rank: int, threshold: float):
        if projector.shape != (inner.dim, inner.dim):
            raise ValueError(f"projector: expected ({inner.dim}, {inner.dim}), got {tuple(projector.shape)}")
        self.inner, self.threshold, self.rank = inner, threshold, rank
        self.projector = projector.to(inner.device, torch.float64)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def solve(self, k: Tensor) -> Tuple[Tensor, Tensor]:
        u, _ = self.inner.solve(k)
        dtype = u.dtype
        pu = (u.to(torch.float64) @ self.projector)  # P is symmetric: u P = (P u)ᵀ
        denom = (pu * k.to(pu.device, torch.float64)).sum(-1)
        return pu.to(dtype), denom.to(dtype)

    def __repr__(self) -> str:
        return f"ProjectedSolver({self.inner!r}, rank {self.rank} of {self.dim}, threshold {self.threshold:g})"


def left_vector(S: Tensor, P: Tensor, k: Tensor) -> Tensor:
    """``u = (S P + k kᵀ P + I)⁻ᵀ P k`` (fp64, (d,)) for the earlier keys' ``S = Σ k_p k_pᵀ`` (d, d),
    the null-space projector ``P`` (d, d) and the new key ``k`` (d,)."""
    k = k.to(P.device, torch.float64)
    X = (S + torch.outer(k, k)) @ P
    X.diagonal().add_(1.0)
    return torch.linalg.solve(X.T, P @ k)


class AlphaEditSolver(ProjectedSolver):
    """AlphaEdit's closed form behind the solver interface: ``solve(k) = (u, 1)`` with ``u`` from
    :func:`left_vector`, so the editor's ``Λ = change / 1`` is the published ``R``.

    Args:
        inner: the layer's edit memory; its keys (in step with the journal through undo and resume)
            are AlphaEdit's earlier keys ``K_p``. Every other attribute (``dim``, ``add``, ...) is its.
        projector: (d, d) null-space projector of the layer's ``C``; ``rank`` its rank and
            ``threshold`` the setting that chose it (reported).
    """

    def solve(self, k: Tensor) -> Tuple[Tensor, Tensor]:
        """``(u, ones)`` for one key (d,) or a batch (b, d), u in the key's float dtype (at least fp32)."""
        P = self.projector
        keys = self.inner.keys
        K = torch.stack(keys).to(P.device, torch.float64) if keys else torch.zeros(0, self.dim, dtype=torch.float64,
                                                                                     device=P.device)
        S = K.T @ K
        rows = k.reshape(-1, self.dim)
        u = torch.stack([left_vector(S, P, row) for row in rows])
        dtype = torch.promote_types(k.dtype, torch.float32)
        ones = torch.ones(rows.shape[0], dtype=dtype, device=u.device)
        return (u[0].to(dtype), ones[0]) if k.dim() == 1 else (u.to(dtype), ones)

    def __repr__(self) -> str:
        return f"AlphaEditSolver({self.inner!r}, rank {self.rank} of {self.dim}, threshold {self.threshold:g})"
