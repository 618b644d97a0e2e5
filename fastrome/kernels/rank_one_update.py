"""Guarded in-place ``weight += lam ⊗ u`` in Triton (the ``rank_one_update`` op).

Two launches and no host synchronisation: a one-program guard kernel reads the denominator, its
floor and both vectors (converted to the compute dtype) and writes the applied flag; the write
kernel then sweeps the weight in 2-D tiles, loads that flag first and masks every load and store
with it, so a refused write leaves every byte as it was (``-0.0`` included). The compute dtype is
the master's when there is one, else fp64 for fp64 weights and fp32 otherwise, as in
:func:`fastrome.reference.rank_one_update`.

This module also holds the float conversions the other kernels use (:func:`convert`,
:func:`narrow`). bf16 goes through integer bit operations: Triton's interpreter (``TRITON_INTERPRET=1``)
rounds fp32 to bf16 by truncation, misreads bf16 subnormals, and converts bf16 to anything but fp32
as raw 16-bit integers; the bit operations give the same bits compiled and interpreted, and the
same bits as torch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def convert(x, DTYPE: tl.constexpr):
    """``x`` (any float block) in the fp32/fp64 ``DTYPE``: exact when wider, else nearest-even."""
    if x.dtype == tl.bfloat16:
        # bf16 is the top half of an fp32: shifting the bits is exact for every value.
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def narrow(x, DTYPE: tl.constexpr):
    """``x`` (fp32 or fp64 block) rounded to nearest-even in ``DTYPE``, bit for bit as torch does."""
    if DTYPE == tl.bfloat16 or DTYPE == tl.float16:
        # torch converts fp64 to the half types through fp32 (two roundings); so do we, so that a
        # weight written from an fp64 master equals ``master.to(weight.dtype)`` exactly.
        x = x.to(tl.float32)
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def _finite(x):
    """Elementwise isfinite of an fp32/fp64 block, from the exponent bits (no fast-math folding)."""
    if x.dtype == tl.float64:
        finite = (x.to(tl.int64, bitcast=True) & 0x7FF0000000000000) != 0x7FF0000000000000
    else:
        finite = (x.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000
    return finite


@triton.jit
def tile(active, n_a, n_b, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's 2-D tile: int64 offsets along both dimensions and their in-bounds masks, all
    false unless ``active`` (so an inactive write reads and writes nothing)."""
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    # tl.where, not `&`: the interpreter mistypes a scalar comparison broadcast into a block.
    in_a = tl.where(active, offs_a < n_a, False)
    in_b = tl.where(active, offs_b < n_b, False)
    return offs_a.to(tl.int64), offs_b.to(tl.int64), in_a, in_b


@triton.jit
def count_nonfinite(ptr, n, stride, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """How many of the ``n`` strided elements at ``ptr`` are not finite once converted to COMPUTE."""
    bad = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n
        v = convert(tl.load(ptr + offs.to(tl.int64) * stride, mask=inside, other=0.0), COMPUTE)
        bad += (inside & ~_finite(v)).to(tl.int32)
    return tl.sum(bad, axis=0)


@triton.jit
def _guard_kernel(
    flag_ptr,  # uint8 view of the returned 0-dim bool
    u_ptr,
    lam_ptr,
    denom_ptr,
    min_denom_ptr,
    n_u,
    n_lam,
    stride_u,
    stride_lam,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    denom = convert(tl.load(denom_ptr), tl.float64)
    floor = convert(tl.load(min_denom_ptr), tl.float64)
    ok = _finite(denom) & (denom > floor)  # a NaN floor compares false: refused
    bad = count_nonfinite(u_ptr, n_u, stride_u, COMPUTE, BLOCK)
    bad += count_nonfinite(lam_ptr, n_lam, stride_lam, COMPUTE, BLOCK)
    tl.store(flag_ptr, (ok & (bad == 0)).to(tl.uint8))


@triton.jit
def _write_kernel(
    flag_ptr,
    w_ptr,
    m_ptr,
    va_ptr,  # vector along the outer dimension (lam, or u for a transposed weight)
    vb_ptr,  # vector along the inner dimension
    n_a,
    n_b,
    stride_wa,
    stride_wb,
    stride_ma,
    stride_mb,
    stride_va,
    stride_vb,
    HAS_MASTER: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # Every load is masked with the flag too: a refused write reads nothing and computes on zeros.
    a64, b64, in_a, in_b = tile(tl.load(flag_ptr) != 0, n_a, n_b, BLOCK_A, BLOCK_B)
    va = convert(tl.load(va_ptr + a64 * stride_va, mask=in_a, other=0.0), COMPUTE)
    vb = convert(tl.load(vb_ptr + b64 * stride_vb, mask=in_b, other=0.0), COMPUTE)
    inside = in_a[:, None] & in_b[None, :]
    w_ptrs = w_ptr + a64[:, None] * stride_wa + b64[None, :] * stride_wb
    if HAS_MASTER:
        m_ptrs = m_ptr + a64[:, None] * stride_ma + b64[None, :] * stride_mb
        total = tl.load(m_ptrs, mask=inside, other=0.0) + va[:, None] * vb[None, :]
        tl.store(m_ptrs, total, mask=inside)
    else:
        w = convert(tl.load(w_ptrs, mask=inside, other=0.0), COMPUTE)
        total = w + va[:, None] * vb[None, :]
    tl.store(w_ptrs, narrow(total, w_ptr.dtype.element_ty), mask=inside)


_INTERPRETED = type(_write_kernel).__name__ == "InterpretedFunction"
"""Whether Triton decorated these kernels for its CPU interpreter (``TRITON_INTERPRET=1``)."""

# GPU (not yet timed on hardware): 32×256 tiles, vector accesses along the contiguous dimension,
# 5.5k programs for a 4096×11008 weight; 8 warps keep an fp64 master's tile in registers (ptxas,
# sm_90: at most 180, where 4 warps spill). Interpreter: every block op is one numpy call, so blocks
# as large as the matrix (capped) run fastest.
_GPU_BLOCKS = (32, 256, 8)
_INTERPRETER_BLOCKS = (128, 2048)
_GUARD_BLOCK = 1024


def _blocks(n_a: int, n_b: int):
    if _INTERPRETED:
        cap_a, cap_b = _INTERPRETER_BLOCKS
        return min(cap_a, triton.next_power_of_2(max(n_a, 1))), min(cap_b, triton.next_power_of_2(max(n_b, 1))), 4
    return _GPU_BLOCKS


def rank_one_update(
    weight: Tensor, u: Tensor, lam: Tensor, denom: Tensor, min_denom: Tensor, master: Optional[Tensor]
) -> Tensor:
    """Guarded ``weight += lam ⊗ u`` (through ``master`` when given), in place, without syncing.

    Args:
        weight: (d_out, d_in) bf16/fp16/fp32/fp64, any strides (a transposed view writes a Conv1D
            layout in place).
        u: (d_in,) any float dtype, any stride. lam: (d_out,) likewise.
        denom, min_denom: 0-dim float tensors on the weight's device.
        master: None or an fp32/fp64 tensor of the weight's shape, any strides.

    Returns:
        0-dim bool tensor on the weight's device, true when the write happened; when false nothing
        was written.
    """
    if master is not None:
        compute = master.dtype
    else:
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    compute_tl = tl.float64 if compute == torch.float64 else tl.float32
    flag = torch.empty((), dtype=torch.bool, device=weight.device)
    _guard_kernel[(1,)](
        flag.view(torch.uint8), u, lam, denom, min_denom, u.shape[0], lam.shape[0], u.stride(0), lam.stride(0),
        COMPUTE=compute_tl, BLOCK=_GUARD_BLOCK,
    )
    if weight.numel() == 0:
        return flag

    # Sweep the matrix with its smaller stride innermost (a Conv1D weight arrives transposed).
    w_strides = weight.stride()
    m_strides = master.stride() if master is not None else (0, 0)
    if abs(w_strides[1]) <= abs(w_strides[0]):
        va, vb, (n_a, n_b), (swa, swb), (sma, smb) = lam, u, weight.shape, w_strides, m_strides
    else:
        va, vb, (n_b, n_a), (swb, swa), (smb, sma) = u, lam, weight.shape, w_strides, m_strides
    block_a, block_b, warps = _blocks(n_a, n_b)
    grid = (triton.cdiv(n_a, block_a), triton.cdiv(n_b, block_b))
    _write_kernel[grid](
        flag.view(torch.uint8), weight, master if master is not None else weight, va, vb, n_a, n_b,
        swa, swb, sma, smb, va.stride(0), vb.stride(0),
        HAS_MASTER=master is not None, COMPUTE=compute_tl, BLOCK_A=block_a, BLOCK_B=block_b, num_warps=warps,
    )
    return flag
