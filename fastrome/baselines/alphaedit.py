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

:class:`fastrome.projection.AlphaEditSolver` puts the same formula (:func:`~fastrome.projection.left_vector`)
behind the editor's solver interface (``EditConfig(update_form="alphaedit")``), so the baseline runs
through the journal, the guards and the long-run harness like any other setting.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from fastrome.projection import left_vector, null_space_projector


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
