"""AlphaEdit's closed form for one layer and one key per edit (arXiv 2410.02355), the reference
baseline of the lifelong-editing ablation.

With ``P`` the projector onto the null space of the preserved keys' second moment (the eigenvectors
of ``C`` with small eigenvalues), ``K_p`` the keys of the earlier edits and ``k`` the new key, the
published update is

    ΔW = R kᵀ P (K_p K_pᵀ P + k kᵀ P + I)⁻¹,       R = v* − W k,

a rank-one ``Λuᵀ`` with ``Λ = R`` and ``u = (S P + kkᵀP + I)⁻ᵀ P k`` (``S = K_pK_pᵀ``). The ``+I``
term regularises it, so unlike fastrome's consistent update it is not exact at ``k``:
``ΔW k = R·(uᵀk)`` with ``0 < uᵀk < 1``. The threshold is taken relative to the mean eigenvalue, as
in :mod:`fastrome.projection` (the published code uses an absolute 1e-2 on the unnormalised sum).
Everything is fp64; no guards: the baseline returns whatever it computes.

:class:`AlphaEditSolver` puts the same formula behind the editor's solver interface
(``EditConfig(update_form="alphaedit")``), so the baseline runs through the journal, the guards and
the long-run harness like any other setting.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from fastrome.projection import ProjectedSolver, null_space_projector


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


class ReferenceAlphaEdit:
    """Sequential AlphaEdit updates at one layer.

    Args:
        C: (d_in, d_in) key second moment of the preserved (ordinary) text.
        threshold: eigenvalues at most this times the mean eigenvalue span the null space.
    """

    def __init__(self, C: Tensor, threshold: float):
        self.P, self.rank = null_space_projector(C, threshold)
        d = self.P.shape[0]
        self.S = torch.zeros(d, d, dtype=torch.float64, device=self.P.device)  # Σ k_p k_pᵀ of earlier edits
        self.edits = 0

    def factors(self, weight: Tensor, key: Tensor, v_star: Tensor) -> Tuple[Tensor, Tensor]:
        """``(u, lam)`` (fp64, (d_in,) and (d_out,)) of the update ``W += lam uᵀ`` for ``key``
        (d_in,) and target value ``v_star`` (d_out,) against ``weight`` (d_out, d_in)."""
        u = left_vector(self.S, self.P, key)
        k = key.to(self.P.device, torch.float64)
        lam = v_star.to(torch.float64) - weight.to(torch.float64) @ k.to(weight.device)
        return u, lam.to(u.device)

    def remember(self, key: Tensor) -> None:
        """The edit of ``key`` was applied: later edits keep it (``K_p`` grows)."""
        k = key.to(self.S.device, torch.float64)
        self.S.add_(torch.outer(k, k))
        self.edits += 1

    def edit(self, weight: Tensor, key: Tensor, v_star: Tensor) -> Tuple[Tensor, Tensor]:
        """Compute, apply in place (``weight += lam uᵀ``, rounded once to its dtype) and remember one
        edit; returns its factors."""
        u, lam = self.factors(weight, key, v_star)
        with torch.no_grad():
            weight.copy_((weight.to(torch.float64) + torch.outer(lam, u.to(lam.device))).to(weight.dtype))
        self.remember(key)
        return u, lam
