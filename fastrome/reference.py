"""Pure-PyTorch versions of every fastrome op.

These are the oracles the kernels are tested against and the fallback that always works, on any
device and dtype. They favour clarity over speed and may synchronise with the host.
Argument checking lives in :mod:`fastrome.ops`; these functions assume valid inputs.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fastrome does arithmetic in for data stored as ``dtype``: fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def second_moment_accumulate(acc: Tensor, x: Tensor, mask: Optional[Tensor] = None) -> None:
    """``acc += xᵀx`` over the rows of ``x`` where ``mask`` is true.

    acc: (d, d) fp32/fp64, updated in place. x: (n, d) any float dtype. mask: (n,) bool or None.
    The product is formed in ``acc``'s dtype, so an fp64 accumulator gets an fp64 product.
    """
    rows = x if mask is None else x[mask]
    if rows.shape[0] == 0:
        return
    rows = rows.to(acc.dtype)
    acc.addmm_(rows.t(), rows)
    # A GEMM need not round (i, j) and (j, i) alike: mirror the upper triangle so acc stays exactly
    # symmetric.
    acc.copy_(acc.triu() + acc.triu(1).t())


def solve_keys(inverse: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
    """``u = A k`` for one key (d,) or a batch (b, d), with ``A = (C + ridge·I)⁻¹`` cached (symmetric).

    Returns ``(u, denom)`` with ``denom = uᵀk`` per key. The product is formed in ``A``'s dtype;
    ``u`` and ``denom`` come back in ``promote(k.dtype, fp32)``, and ``denom`` is formed in fp64
    from the *rounded* ``u`` so that it is exactly the denominator of the update ``u`` will write.
    """
    out_dtype = torch.promote_types(k.dtype, torch.float32)
    u = (k.to(inverse.dtype) @ inverse).to(out_dtype)  # A is symmetric: k A = (A k)ᵀ
    denom = (u.to(torch.float64) * k.to(torch.float64)).sum(-1).to(out_dtype)
    return u, denom


def update_allowed(u: Tensor, lam: Tensor, denom: Tensor, min_denom: Union[float, Tensor]) -> Tensor:
    """The write guard: ``denom``, ``u`` and ``lam`` finite and ``denom > min_denom`` (0-dim bool)."""
    denom = denom.to(torch.float64)
    min_denom_t = torch.as_tensor(min_denom, dtype=torch.float64, device=denom.device)
    ok = torch.isfinite(denom) & (denom > min_denom_t)
    ok = ok & torch.isfinite(u).all().to(ok.device) & torch.isfinite(lam).all().to(ok.device)
    return ok.reshape(())


def rank_one_update(
    weight: Tensor,
    u: Tensor,
    lam: Tensor,
    *,
    denom: Tensor,
    min_denom: Union[float, Tensor],
    master: Optional[Tensor] = None,
) -> Tensor:
    """Guarded in-place ``weight += lam ⊗ u`` (through ``master`` when given).

    weight: (d_out, d_in), any float dtype, any strides (a transposed view writes a Conv1D layout).
    u: (d_in,), lam: (d_out,), denom: 0-dim. master: (d_out, d_in) fp32/fp64 or None.
    With a master, ``master += lam ⊗ u`` then ``weight = round(master)``; without one the sum is
    formed in fp32 (fp64 for fp64 weights) and rounded once. Returns the applied flag (0-dim bool,
    on the weight's device); when it is false nothing has been written.
    """
    cd = master.dtype if master is not None else compute_dtype(weight.dtype)
    # Guard the vectors in the dtype they are written in: finite fp64 values can overflow fp32.
    u, lam = u.to(cd), lam.to(cd)
    ok = update_allowed(u, lam, denom, min_denom).to(weight.device)
    if not bool(ok):
        return ok
    if master is not None:
        master.addr_(lam, u)
        weight.copy_(master)
    elif weight.dtype == cd:
        weight.addr_(lam, u)
    else:
        weight.copy_(torch.addr(weight.to(cd), lam, u))
    return ok


def sherman_morrison_coefficient(
    u: Tensor, beta: Tensor, denom: Tensor, min_denom: Union[float, Tensor], dtype: torch.dtype
) -> Tuple[Tensor, Tensor]:
    """The guard and the coefficient of :func:`symmetric_rank_one_update`.

    ``s = 1 + β·denom`` and ``coef = β / s`` are formed in fp64 (each step rounded once, in this
    order: every backend computes them alike). The update is allowed when ``β·denom`` is finite,
    ``s > min_denom`` (a NaN anywhere compares false), ``coef`` rounded to ``dtype`` is finite and
    every element of ``u`` (already in ``dtype``) is finite. Returns ``(applied, coef)``: a 0-dim
    bool and the 0-dim coefficient in ``dtype``, both on u's device.
    """
    b = beta.to(device=u.device, dtype=torch.float64).reshape(())
    dn = denom.to(device=u.device, dtype=torch.float64).reshape(())
    floor = torch.as_tensor(min_denom, dtype=torch.float64, device=u.device).reshape(())
    bd = b * dn
    s = 1.0 + bd
    coef = (b / s).to(dtype)
    ok = torch.isfinite(bd) & (s > floor) & torch.isfinite(coef) & torch.isfinite(u).all()
    return ok, coef


def symmetric_rank_one_update(
    inverse: Tensor, u: Tensor, beta: Tensor, denom: Tensor, min_denom: Union[float, Tensor]
) -> Tensor:
    """Guarded in-place Sherman–Morrison step ``inverse -= coef · u uᵀ``, ``coef = β / (1 + β·denom)``.

    inverse: (d, d) fp32/fp64, exactly symmetric, any strides; the arithmetic is in its dtype.
    u: (d,) any float dtype (``A⁻¹k``), rounded once to inverse's dtype. beta, denom (``uᵀk``):
    0-dim float tensors. See :func:`sherman_morrison_coefficient` for the guard. Returns the applied
    flag (0-dim bool on inverse's device); when it is false nothing has been written. β = 0 is
    applied and writes nothing.

    Each element is ``m - coef·(u_i·u_j)``: the product ``u_i·u_j`` comes first and IEEE
    multiplication commutes, so (i, j) and (j, i) get the same bits and a symmetric matrix stays
    exactly symmetric. (``torch.addr`` forms ``(α·u_i)·u_j``, which does not commute.)
    """
    cd = inverse.dtype
    u = u.to(cd)
    ok, coef = sherman_morrison_coefficient(u, beta, denom, min_denom, cd)
    ok = ok.to(inverse.device)
    if not bool(ok) or not bool(coef != 0):
        return ok
    inverse.sub_(torch.outer(u, u).mul_(coef.to(inverse.device)))
    return ok
