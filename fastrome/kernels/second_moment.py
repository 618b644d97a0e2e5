"""``acc += xᵀx`` over masked rows in Triton (the ``second_moment_accumulate`` op).

Only the upper-triangle tiles (ti ≤ tj) of the d×d result are formed, one program each: it streams
the rows of its two column blocks of ``x`` (rows left out by the mask load as zeros), multiplies
them with ``tl.dot`` into an fp32 tile (tensor cores for bf16/fp16; IEEE fp32 for fp32 data, no
TF32 rounding), and adds the tile into ``acc``, writing its mirror from the same registers so that
``acc`` stays exactly symmetric. With an fp64 ``acc`` the fp32 tile is flushed into an fp64 tile
every :func:`flush_rows` rows, so a call over millions of rows keeps the fp64 accumulator's precision
(error of an fp32 sum over 4096 rows, not over all of them).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrome import reference


@triton.jit
def _second_moment_kernel(
    acc_ptr,
    x_ptr,
    mask_ptr,  # uint8 view of the bool mask (unused without HAS_MASK)
    n,
    d,
    flush_rows,
    stride_acc0,
    stride_acc1,
    stride_xn,
    stride_xd,
    stride_mask,
    HAS_MASK: tl.constexpr,
    ACC64: tl.constexpr,
    IEEE: tl.constexpr,
    WIDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program p -> upper-triangle tile (ti, tj), column by column: p = tj(tj+1)/2 + ti, 0 ≤ ti ≤ tj.
    # Neighbouring programs share the column block tj. The fp64 square root is exact enough for
    # the floor; the two integer checks make it right even for an approximate one.
    p = tl.program_id(0)
    tj = ((tl.sqrt((8 * p + 1).to(tl.float64)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > p, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= p, tj + 1, tj)
    ti = p - tj * (tj + 1) // 2

    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    in_i = offs_i < d
    in_j = offs_j < d
    col_i = offs_i.to(tl.int64) * stride_xd
    col_j = offs_j.to(tl.int64) * stride_xd

    part = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    if ACC64:
        total = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
    seen = tl.zeros((BLOCK_K,), dtype=tl.int32)  # any row selected, per lane
    for r0 in range(0, n, flush_rows):
        for k0 in range(r0, tl.minimum(r0 + flush_rows, n), BLOCK_K):
            rows = k0 + tl.arange(0, BLOCK_K)
            use = rows < n
            if HAS_MASK:
                use = use & (tl.load(mask_ptr + rows.to(tl.int64) * stride_mask, mask=use, other=0) != 0)
                seen = tl.maximum(seen, use.to(tl.int32))
            row_off = rows.to(tl.int64) * stride_xn
            a = tl.load(x_ptr + row_off[:, None] + col_i[None, :], mask=use[:, None] & in_i[None, :], other=0.0)
            b = tl.load(x_ptr + row_off[:, None] + col_j[None, :], mask=use[:, None] & in_j[None, :], other=0.0)
            if WIDEN:
                # The interpreter would multiply bf16 blocks as their raw bits: widen them exactly
                # first (inline: a helper call costs a millisecond per call there).
                a = (a.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
                b = (b.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
            if IEEE:
                part = tl.dot(tl.trans(a), b, part, input_precision="ieee")
            else:
                part = tl.dot(tl.trans(a), b, part)
        if ACC64:
            total += part.to(tl.float64)
            part = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)

    r = offs_i[:, None]
    c = offs_j[None, :]
    # Upper elements (r ≤ c; all of an off-diagonal tile) are written in place and, from the same
    # registers, to their mirror (c, r): acc == acc.T bit for bit, whatever the dot's rounding.
    keep = in_i[:, None] & in_j[None, :] & (r <= c)
    if HAS_MASK:
        # Nothing selected: write nothing, so even -0.0 + 0.0 cannot change a bit. (tl.where, not
        # `&`: the interpreter mistypes a scalar comparison broadcast into a block.)
        keep = tl.where(tl.max(seen, axis=0) > 0, keep, False)
    r64 = r.to(tl.int64)
    c64 = c.to(tl.int64)
    upper = acc_ptr + r64 * stride_acc0 + c64 * stride_acc1
    old = tl.load(upper, mask=keep, other=0.0)
    if ACC64:
        new = old + total
    else:
        new = old + part
    tl.store(upper, new, mask=keep)
    tl.store(acc_ptr + c64 * stride_acc0 + r64 * stride_acc1, new, mask=keep & (r < c))


_INTERPRETED = type(_second_moment_kernel).__name__ == "InterpretedFunction"
"""Whether Triton decorated this kernel for its CPU interpreter (``TRITON_INTERPRET=1``)."""


def flush_rows() -> int:
    """Rows summed in fp32 between flushes into an fp64 ``acc`` (a multiple of every BLOCK_K).

    4096 compiled; 64 under the interpreter, so that small test inputs cross a flush.
    """
    return 64 if _INTERPRETED else 4096


def _config(d: int, x_dtype: torch.dtype, acc64: bool):
    """``(BLOCK, BLOCK_K, num_warps, num_stages)`` for the tensors at hand."""
    if _INTERPRETED:
        # 64-wide tiles still give the prime test sizes several tiles (67 → 2, 131 → 3); every
        # block op is one numpy call and every program costs milliseconds, so not smaller.
        return 64, 32, 4, 1
    # Not yet timed on hardware; chosen for an H100 from ptxas resource counts (sm_90, no spills).
    # 128×128 tiles halve the re-reads of x against 64-wide ones (200 registers at 8 warps with an
    # fp32 acc), but only with enough tiles for 132 SMs (d = 576 would give 15 programs) and not
    # with an fp64 acc, whose extra 128×128 fp64 tile spills at 8 warps; 64×64 with 4 warps keeps
    # both tiles in registers (162). IEEE fp32 dots run on the FMA units: 64-wide, 32-row steps.
    if x_dtype == torch.float32:
        return 64, 32, 4, 2
    if d >= 2048 and not acc64:
        return 128, 64, 8, 3
    return 64, 64, 4, 3


def second_moment_accumulate(acc: Tensor, x: Tensor, mask: Optional[Tensor]) -> None:
    """``acc += xᵀx`` over the rows of ``x`` where ``mask`` is true, in place.

    Args:
        acc: (d, d) fp32/fp64, symmetric on entry, any strides; holds the exactly symmetric sum
            afterwards.
        x: (n, d) bf16/fp16/fp32, any strides (read in place, never copied). fp64 ``x`` is not a
            kernel case: it goes to :func:`fastrome.reference.second_moment_accumulate`, whose
            fp64 product it needs.
        mask: (n,) bool or None.
    """
    if x.dtype == torch.float64:
        reference.second_moment_accumulate(acc, x, mask)
        return
    n, d = x.shape
    if n == 0 or d == 0:
        return
    acc64 = acc.dtype == torch.float64
    block, block_k, warps, stages = _config(d, x.dtype, acc64)
    # An fp32 acc takes the fp32 sum as it is: one pass over the rows, no flush.
    flush = flush_rows() if acc64 else triton.cdiv(n, block_k) * block_k
    tiles = triton.cdiv(d, block)
    grid = (tiles * (tiles + 1) // 2,)
    has_mask = mask is not None
    mask_arg = mask.view(torch.uint8) if has_mask else x
    _second_moment_kernel[grid](
        acc, x, mask_arg, n, d, flush,
        acc.stride(0), acc.stride(1), x.stride(0), x.stride(1), mask.stride(0) if has_mask else 0,
        HAS_MASK=has_mask, ACC64=acc64, IEEE=x.dtype == torch.float32,
        WIDEN=_INTERPRETED and x.dtype == torch.bfloat16, BLOCK=block, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages,
    )
