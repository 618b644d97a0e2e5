"""Guarded in-place Sherman–Morrison step ``inverse -= coef · u uᵀ`` in Triton (the
``symmetric_rank_one_update`` op), with ``coef = β / (1 + β·denom)``.

Two launches and no host synchronisation: a one-program guard kernel reads β, the denominator,
its floor and u (converted to the matrix's dtype) and writes the applied flag; the write kernel
sweeps the matrix in 2-D tiles, loads that flag first, recomputes ``coef`` in fp64 from the same
scalars in the same order, and masks every load and store with ``flag and coef != 0``, so a
refused update (or β = 0) leaves every byte as it was (``-0.0`` included). Semantics are those of
:func:`fastrome.reference.symmetric_rank_one_update`.

Symmetry: element (i, j) is ``m - coef·(u_i·u_j)`` with the product of the two u's formed first,
by the same instructions in every tile. IEEE multiplication commutes, so (i, j) and (j, i) get
the same bits whether or not the compiler fuses the last multiply and subtract, and an exactly
symmetric matrix stays exactly symmetric.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrome.kernels.rank_one_update import _finite, convert, count_nonfinite, tile


@triton.jit
def _coefficient(beta_ptr, denom_ptr):
    """``(β·denom, 1 + β·denom, β / (1 + β·denom))`` in fp64, each rounded once."""
    beta = convert(tl.load(beta_ptr), tl.float64)
    bd = beta * convert(tl.load(denom_ptr), tl.float64)
    s = 1.0 + bd
    return bd, s, beta / s


@triton.jit
def _guard_kernel(
    flag_ptr,  # uint8 view of the returned 0-dim bool
    u_ptr,
    beta_ptr,
    denom_ptr,
    min_denom_ptr,
    n,
    stride_u,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    bd, s, coef = _coefficient(beta_ptr, denom_ptr)
    floor = convert(tl.load(min_denom_ptr), tl.float64)
    # A NaN anywhere compares false: refused. coef is checked in the dtype it is used in.
    ok = _finite(bd) & (s > floor) & _finite(coef.to(COMPUTE))
    tl.store(flag_ptr, (ok & (count_nonfinite(u_ptr, n, stride_u, COMPUTE, BLOCK) == 0)).to(tl.uint8))


@triton.jit
def _write_kernel(
    flag_ptr,
    m_ptr,
    u_ptr,
    beta_ptr,
    denom_ptr,
    n,
    stride_ma,
    stride_mb,
    stride_u,
    COMPUTE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    _, _, coef64 = _coefficient(beta_ptr, denom_ptr)
    coef = coef64.to(COMPUTE)
    # Refused, or β = 0: nothing is read or written (the loads are masked too).
    a64, b64, in_a, in_b = tile((tl.load(flag_ptr) != 0) & (coef != 0), n, n, BLOCK_A, BLOCK_B)
    ua = convert(tl.load(u_ptr + a64 * stride_u, mask=in_a, other=0.0), COMPUTE)
    ub = convert(tl.load(u_ptr + b64 * stride_u, mask=in_b, other=0.0), COMPUTE)
    inside = in_a[:, None] & in_b[None, :]
    m_ptrs = m_ptr + a64[:, None] * stride_ma + b64[None, :] * stride_mb
    m = tl.load(m_ptrs, mask=inside, other=0.0)
    p = ua[:, None] * ub[None, :]
    tl.store(m_ptrs, m - coef * p, mask=inside)


_INTERPRETED = type(_write_kernel).__name__ == "InterpretedFunction"
"""Whether Triton decorated these kernels for its CPU interpreter (``TRITON_INTERPRET=1``)."""

# GPU (not yet timed on hardware): 32×256 tiles along the contiguous dimension, as the weight
# write, 8 warps (an fp64 tile is 32 registers per thread). Interpreter: every block op is one
# numpy call, so blocks as large as the matrix (capped) run fastest.
_GPU_BLOCKS = (32, 256, 8)
_INTERPRETER_BLOCKS = (128, 2048)
_GUARD_BLOCK = 1024


def _blocks(n: int):
    if _INTERPRETED:
        cap_a, cap_b = _INTERPRETER_BLOCKS
        size = triton.next_power_of_2(max(n, 1))
        return min(cap_a, size), min(cap_b, size), 4
    return _GPU_BLOCKS


def symmetric_rank_one_update(inverse: Tensor, u: Tensor, beta: Tensor, denom: Tensor, min_denom: Tensor) -> Tensor:
    """Guarded ``inverse -= coef · u uᵀ``, ``coef = β / (1 + β·denom)``, in place, without syncing.

    Args:
        inverse: (d, d) fp32/fp64, exactly symmetric, any strides; the arithmetic is in its dtype.
        u: (d,) any float dtype, any stride, not sharing memory with inverse.
        beta, denom, min_denom: 0-dim float tensors on inverse's device.

    Returns:
        0-dim bool tensor on inverse's device, true when the update was applied; when false nothing
        was written.
    """
    compute_tl = tl.float64 if inverse.dtype == torch.float64 else tl.float32
    n = inverse.shape[0]
    flag = torch.empty((), dtype=torch.bool, device=inverse.device)
    _guard_kernel[(1,)](
        flag.view(torch.uint8), u, beta, denom, min_denom, n, u.stride(0), COMPUTE=compute_tl, BLOCK=_GUARD_BLOCK,
    )
    if inverse.numel() == 0:
        return flag
    # Sweep with the smaller stride innermost; the update is symmetric in the two indices.
    s0, s1 = inverse.stride()
    sa, sb = (s0, s1) if abs(s1) <= abs(s0) else (s1, s0)
    block_a, block_b, warps = _blocks(n)
    grid = (triton.cdiv(n, block_a), triton.cdiv(n, block_b))
    _write_kernel[grid](
        flag.view(torch.uint8), inverse, u, beta, denom, n, sa, sb, u.stride(0),
        COMPUTE=compute_tl, BLOCK_A=block_a, BLOCK_B=block_b, num_warps=warps,
    )
    return flag
