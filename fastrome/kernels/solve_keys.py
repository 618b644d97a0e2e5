"""``u = A k`` and ``uᵀk`` in one pass over the symmetric inverse ``A``, in Triton (``solve_keys``).

A grid of (key, row block): each program forms its ``BLOCK_M`` rows of ``u`` in the inverse's dtype
(columns in ``BLOCK_N`` chunks, elementwise products summed once at the end), rounds them to the
output dtype, stores them, and adds its share of the denominator in fp64 from the *rounded* values
into a (b, row blocks) fp64 buffer. The denominators are that buffer summed along its rows, the
same order on every call, so results do not depend on scheduling.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrome.kernels.rank_one_update import convert


@triton.jit
def _solve_keys_kernel(
    a_ptr,
    k_ptr,
    u_ptr,  # (b, d) contiguous, output dtype
    part_ptr,  # (b, row blocks) fp64 partial denominators
    d,
    n_blocks,
    stride_ar,
    stride_ac,
    stride_kb,
    stride_kd,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Keys vary fastest across programs, so the keys of a batch read the same rows of A while
    # they are in L2: A streams from memory about once per batch, not once per key.
    key = tl.program_id(0)
    blk = tl.program_id(1)
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < d
    row_off = rows.to(tl.int64) * stride_ar
    k_row = k_ptr + key.to(tl.int64) * stride_kb
    a_dtype = a_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=a_dtype)
    for c0 in range(0, d, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        in_cols = cols < d
        cols64 = cols.to(tl.int64)
        a = tl.load(a_ptr + row_off[:, None] + cols64[None, :] * stride_ac, mask=in_rows[:, None] & in_cols[None, :],
                    other=0.0)
        kc = convert(tl.load(k_row + cols64 * stride_kd, mask=in_cols, other=0.0), a_dtype)
        acc += a * kc[None, :]
    u = tl.sum(acc, axis=1).to(u_ptr.dtype.element_ty)
    tl.store(u_ptr + key.to(tl.int64) * d + rows, u, mask=in_rows)

    k_rows = convert(tl.load(k_row + rows.to(tl.int64) * stride_kd, mask=in_rows, other=0.0), tl.float64)
    part = tl.sum(u.to(tl.float64) * k_rows, axis=0)  # masked rows hold u = 0 and k = 0
    tl.store(part_ptr + key.to(tl.int64) * n_blocks + blk, part)


_INTERPRETED = type(_solve_keys_kernel).__name__ == "InterpretedFunction"
"""Whether Triton decorated this kernel for its CPU interpreter (``TRITON_INTERPRET=1``)."""


def _config():
    """``(BLOCK_M, BLOCK_N, num_warps)``."""
    if _INTERPRETED:
        # Each block op is one numpy call: blocks large enough to be cheap, small enough that the
        # test sizes span several row blocks and column chunks (576 → 9 and 5).
        return 64, 128, 4
    # Not yet timed on hardware (chosen for an H100): a bandwidth-bound matrix-vector product wants
    # many programs in flight (d = 4096, one key: 256 of them for 132 SMs) and long contiguous
    # row segments (16 × 256 fp64 = 32 KiB per step; 128 registers, no spills on sm_90).
    return 16, 256, 4


def solve_keys(inverse: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
    """``u = inverse @ k`` per key and ``denom = Σ u·k`` from the rounded ``u``.

    Args:
        inverse: (d, d) symmetric fp32/fp64, any strides; the product is accumulated in its dtype.
        k: (d,) or (b, d), any float dtype, any strides.

    Returns:
        ``(u, denom)`` in ``promote(k.dtype, fp32)``: u of k's shape, denom of shape () or (b,),
        summed in fp64 from the rounded u.
    """
    out_dtype = torch.promote_types(k.dtype, torch.float32)
    d = inverse.shape[0]
    keys = k.unsqueeze(0) if k.dim() == 1 else k
    b = keys.shape[0]
    u = torch.empty((b, d), dtype=out_dtype, device=k.device)
    block_m, block_n, warps = _config()
    n_blocks = triton.cdiv(d, block_m)
    if b == 0 or d == 0:
        u.zero_()  # the empty sum
        return u.reshape(k.shape), torch.zeros(k.shape[:-1], dtype=out_dtype, device=k.device)
    partial = torch.empty((b, n_blocks), dtype=torch.float64, device=k.device)
    # A is symmetric: read it along whichever dimension is contiguous (A.t() of a column-major A).
    s_r, s_c = inverse.stride()
    if abs(s_r) < abs(s_c):
        s_r, s_c = s_c, s_r
    _solve_keys_kernel[(b, n_blocks)](
        inverse, keys, u, partial, d, n_blocks, s_r, s_c, keys.stride(0), keys.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    denom = partial.sum(dim=1).to(out_dtype)
    return u.reshape(k.shape), denom.reshape(k.shape[:-1])
