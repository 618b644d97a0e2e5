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
from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

from fastrome import ops

# The largest ridge an automatic escalation may reach, as a fraction of C's scale (mean |diag C|).
# A sum of k kᵀ is positive semi-definite; rounding can push its smallest eigenvalues below zero by
# a few ulps of ‖C‖ only (about 1e-16·‖C‖ for fp64 sums, 1e-7·‖C‖ for fp32 ones such as ROME's), and
# escalation exists to step over that. Damage (a negated sum, flipped bytes) needs a ridge of
# the order of the scale itself or more. 1e-3 lies between the two and is also where a ridge
# stops being a regulariser: the SmolLM2 statistics in benches/solve_options.py have condition
# numbers up to 6.9e3, i.e. smallest eigenvalues down to ~1.4e-4 of the scale, which a larger ridge
# would outweigh, turning the solve into one against ≈ ridge·I.
MAX_RIDGE_ESCALATION = 1e-3
# First escalated ridge, as a fraction of the scale: the rounding of an fp64 sum.
_FIRST_ESCALATION = 1e-12
# Rows per block of the row-wise passes over C (finiteness, 1-norms): their temporaries stay a few
# MB. Larger blocks of tens of MB are kept by the C allocator after they are freed and add up to a
# sizeable share of a d×d buffer in resident memory.
ROW_BLOCK = 128
# Bytes to which the buffer LAPACK factorises in is aligned. MKL's blocked Cholesky rounds
# differently in a buffer that is not 64-byte aligned (measured on AVX-512: an 8-byte offset moves
# the inverse by 1e-6 relative), and a tensor read from a file sits wherever the reader put it (a
# statistics file's header length varies with its metadata). torch's own allocations are aligned.
ALIGN_BYTES = 64


def count_nonfinite(t: Tensor) -> int:
    """How many entries of ``t`` (any shape, float) are NaN or ±Inf, :data:`ROW_BLOCK` rows at a time.

    ``isfinite`` of a whole float matrix forms ``abs`` of it (a full-size copy) and two full-size
    masks; by blocks their size is a few MB whatever ``t``'s."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    return sum(int(rows[i : i + ROW_BLOCK].isfinite().logical_not_().sum()) for i in range(0, rows.shape[0], ROW_BLOCK))


def _check_finite(C: Tensor, where: str) -> None:
    """Refuse a matrix with NaN or Inf entries, counting them (no ridge means anything then)."""
    bad = count_nonfinite(C)
    if bad:
        raise ValueError(
            f"{where}the statistics matrix C has {bad:,} non-finite entries (NaN or Inf) of "
            f"{C.numel():,}; the statistics are corrupted or the keys overflowed while they were summed"
        )


def _scale(C64: Tensor) -> float:
    """Mean |diag C|, the magnitude every ridge is measured against (1 for a zero diagonal)."""
    return float(C64.diagonal().abs().mean()) or 1.0


def _ridge_ladder(ridge: float, scale: float, cap: float) -> Iterator[float]:
    """``ridge`` first, then ×10 steps from the rounding level up to ``cap``, then ``cap`` itself."""
    yield ridge
    step = max(ridge * 10.0, _FIRST_ESCALATION * scale)
    while step < cap:
        yield step
        step *= 10.0
    if cap > ridge:
        yield cap


def _not_positive_definite(C64: Tensor, scale: float, cap: float, ridge: float, where: str) -> ValueError:
    """The error for a C no admissible ridge makes positive definite, with the ridge it would need."""
    try:
        lowest = float(torch.linalg.eigvalsh(C64)[0])
    except RuntimeError:  # the eigensolver did not converge: report the bound only
        lowest = float("nan")
    if lowest < -cap:
        need = f"its smallest eigenvalue is {lowest:.3e}, so it needs a ridge of at least {-lowest:.3e}"
        need += f" ({-lowest / scale:.2g} of its scale)"
    else:
        need = f"it needs a ridge of more than {cap:.3e}"
    limit = (f"the ridge of {ridge:.3e} given" if cap > MAX_RIDGE_ESCALATION * scale
             else f"the {MAX_RIDGE_ESCALATION:g} of its scale ({cap:.3e}) a ridge is raised to at most")
    return ValueError(
        f"{where}C is not positive definite at a scale (mean |diag C|) of {scale:.3e}: {need}, more than "
        f"{limit}. A sum of k kᵀ is positive semi-definite, so these statistics are corrupted; recompute them"
    )


def aligned(A: Tensor) -> Tensor:
    """``A`` itself when its data start on an :data:`ALIGN_BYTES` boundary, else an aligned
    contiguous copy (a tensor read from a file can start anywhere)."""
    return A if A.data_ptr() % ALIGN_BYTES == 0 else A.clone(memory_format=torch.contiguous_format)


def _column_major_alias(A: Tensor) -> Tensor:
    """``A``'s storage read column-major (so ``Aᵀ``, which is ``A`` for a symmetric ``A``), as a
    tensor of its own rather than a view of ``A``: LAPACK's Cholesky factorisation and inverse then
    run in place in it (given a view, or a row-major tensor, torch copies it to a d×d temporary)."""
    d = A.shape[0]
    return torch.empty(0, dtype=A.dtype, device=A.device).set_(A.untyped_storage(), A.storage_offset(), (d, d), (1, d))


def _upper_rows(A: Tensor) -> List[Tensor]:
    """Copies of ``A[i:i+ROW_BLOCK, i:]`` for each block of rows: the upper triangle and a little more,
    about half of a d×d buffer, from which :func:`_restore` rebuilds a symmetric ``A`` exactly.

    The copies are views into one allocation: hundreds of separate blocks of a few MB each would
    come from the C allocator's heap, which keeps much of them resident after they are freed."""
    d = A.shape[0]
    starts = range(0, d, ROW_BLOCK)
    store = torch.empty(sum(min(ROW_BLOCK, d - i) * (d - i) for i in starts), dtype=A.dtype, device=A.device)
    rows, at = [], 0
    for i in starts:
        block = A[i : i + ROW_BLOCK, i:]
        rows.append(store[at : at + block.numel()].view(block.shape).copy_(block))
        at += block.numel()
    return rows


def _restore(A: Tensor, rows: List[Tensor]) -> None:
    """Rebuild the exactly symmetric ``A`` whose :func:`_upper_rows` are ``rows``."""
    for i, block in zip(range(0, A.shape[0], ROW_BLOCK), rows):
        A[i : i + ROW_BLOCK, i:] = block
    for i in range(0, A.shape[0], ROW_BLOCK):
        A[i + ROW_BLOCK :, i : i + ROW_BLOCK] = A[i : i + ROW_BLOCK, i + ROW_BLOCK :].t()


_warned_in_place = False


def _in_place(op, A: Tensor, out) -> int:
    """``op(A, out=out)`` with ``out`` aliasing ``A`` (returns the info code of a Cholesky, else 0).

    A backend that refuses an output aliasing its input gets the same call through a temporary,
    with one warning: the result is the same, only a d×d buffer larger at the peak."""
    global _warned_in_place
    try:
        op(A, out=out)
    except RuntimeError as exc:
        if not _warned_in_place:
            _warned_in_place = True
            warnings.warn(f"{op.__name__} on {A.device.type} refused to work in place ({exc}); the solver "
                          "factorises through a temporary d×d buffer instead", stacklevel=3)
        result = op(A)
        pairs = zip(out, result) if isinstance(out, tuple) else [(out, result)]
        for dst, src in pairs:
            dst.copy_(src)
    return int(out[1]) if isinstance(out, tuple) else 0


def _factorise_in_place(C64: Tensor, ridge: float, where: str) -> Tuple[Tensor, float]:
    """Cholesky factor of ``C64 + r·I``, formed in ``C64``'s own storage, and the ridge ``r`` used:
    ``ridge``, or the smallest step of :func:`_ridge_ladder` that factorises (with a warning), or a
    ``ValueError`` (``C64`` then restored as it was).

    ``C64``: (d, d) fp64, contiguous and exactly symmetric; its content is lost on success. The
    factor is returned as :func:`_column_major_alias` of it (lower-triangular, zeros above), ready for
    an in-place inverse. Half a d×d buffer is copied aside while the attempts run, since a failed
    attempt overwrites ``C64``; the ridge goes on the diagonal in place (no identity is formed)."""
    scale = _scale(C64)
    cap = max(ridge, MAX_RIDGE_ESCALATION * scale)
    diagonal = C64.diagonal()
    saved = diagonal.clone()
    kept = _upper_rows(C64)
    factor = _column_major_alias(C64)
    info = torch.empty((), dtype=torch.int32, device=C64.device)
    for attempt, used in enumerate(_ridge_ladder(ridge, scale, cap)):
        if attempt:
            _restore(C64, kept)  # the failed attempt overwrote it
        torch.add(saved, used, out=diagonal)
        if _in_place(torch.linalg.cholesky_ex, factor, (factor, info)) == 0:
            break
    else:
        _restore(C64, kept)
        raise _not_positive_definite(C64, scale, cap, ridge, where)
    if used != ridge:
        warnings.warn(
            f"{where}C is not positive definite with ridge={ridge:g}; factorised with ridge={used:.3e} "
            f"({used / scale:.1e} of its scale) instead",
            stacklevel=3,
        )
    return factor, used


def _symmetrise_(A: Tensor, block: int = 256) -> Tensor:
    """``A ← (A + Aᵀ)/2`` in place, block by block (one block of scratch, not a d×d copy); the result
    is exactly symmetric and equal, bit for bit, to ``0.5 * (A + A.t())``."""
    d = A.shape[0]
    for i in range(0, d, block):
        for j in range(i, d, block):
            mean = 0.5 * (A[i : i + block, j : j + block] + A[j : j + block, i : i + block].t())
            A[i : i + block, j : j + block] = mean
            A[j : j + block, i : i + block] = mean.t()
    return A


def _abs_column_sums(A: Tensor, diagonal: Optional[Tensor] = None, block: int = ROW_BLOCK) -> Tensor:
    """Column sums of ``|A|`` (d,), a block of rows at a time; with ``diagonal`` given, ``|diagonal|``
    counts in place of ``A``'s own diagonal (zeros: the off-diagonal sums)."""
    d = A.shape[0]
    sums = torch.zeros(d, dtype=A.dtype, device=A.device)
    for i in range(0, d, block):
        rows = A[i : i + block].abs()
        if diagonal is not None:
            idx = torch.arange(rows.shape[0], device=A.device)
            rows[idx, idx + i] = diagonal[i : i + block].abs()
        sums += rows.sum(0)
    return sums


def _norm1(A: Tensor) -> float:
    """``‖A‖₁``, the largest column sum of |entries|."""
    return float(_abs_column_sums(A).max())


class CovarianceSolver:
    """Solves against a fixed symmetric positive-definite second moment ``C``.

    Args:
        C: (d, d) symmetric matrix (any float dtype), the uncentered key second moment E[kkᵀ]. NaN or
            Inf entries are refused before anything else.
        ridge: added to the diagonal before factorising (absolute, ≥ 0; default 0). If the
            factorisation fails, the ridge is raised step by step with a warning, up to
            :data:`MAX_RIDGE_ESCALATION` of mean |diag C|; a C that needs more is refused with a
            ``ValueError``. :attr:`ridge` holds the value used.
        relative_ridge: the ridge as a fraction of mean |diag C| instead (≥ 0), computed after C has
            been checked; give ``ridge`` or ``relative_ridge``, not both.
        device: where the inverse lives (default: C's device).
        precision: dtype of the cached inverse, ``"float64"`` (default) or ``"float32"``.
        source: where C came from (a file, a layer), named in errors and warnings.
        overwrite_c: C is not needed afterwards: when it is already fp64 on ``device``, it is the
            factorisation's scratch (its content is lost; an fp64 inverse ends up in its storage),
            one d×d buffer less at the peak. A C that is refused is left as it was, symmetrised.

    Attributes:
        inverse: (d, d) symmetric ``(C + ridge·I)⁻¹`` in ``precision``.
        ridge: ridge actually used.
        condition: 1-norm condition number ``‖C + ridge·I‖₁·‖(C + ridge·I)⁻¹‖₁``.
        identity: True when built by :meth:`identity` (no statistics).
    """

    def __init__(
        self,
        C: Tensor,
        ridge: Optional[float] = None,
        *,
        relative_ridge: Optional[float] = None,
        device: Optional[Union[str, torch.device]] = None,
        precision: str = "float64",
        source: Optional[str] = None,
        overwrite_c: bool = False,
    ):
        where = f"statistics {source}: " if source else ""
        if not isinstance(C, Tensor) or C.dim() != 2 or C.shape[0] != C.shape[1] or not C.is_floating_point():
            shape = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
            raise ValueError(f"{where}C: expected a square floating-point matrix, got {shape}")
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision: expected 'float64' or 'float32', got {precision!r}")
        # Memory: one d×d fp64 buffer, C64, is factorised and inverted in place, with half of one
        # copied aside while the factorisation is attempted (a failed attempt overwrites C64); an
        # fp32 inverse adds half a buffer for the conversion (benches/solver_memory.py measures it).
        C64 = C.detach().to(device=device or C.device, dtype=torch.float64)
        if C64.data_ptr() == C.data_ptr() and not overwrite_c:  # never alter the caller's C unless allowed
            C64 = C64.clone()
        C64 = aligned(C64.contiguous())  # the same C gives the same solver wherever it was read into
        _check_finite(C64, where)  # before any ridge arithmetic: a NaN scale makes a NaN ridge
        _symmetrise_(C64)  # exact symmetry, whatever rounding the accumulation left
        used = _absolute_ridge(ridge, relative_ridge, _scale(C64))
        off_diagonal = _abs_column_sums(C64, torch.zeros(C64.shape[0], dtype=C64.dtype, device=C64.device))
        diagonal = C64.diagonal().clone()
        factor, used = _factorise_in_place(C64, used, where)
        norm1 = float((off_diagonal + (diagonal + used).abs()).max())  # ‖C + ridge·I‖₁
        del off_diagonal, diagonal
        _in_place(torch.cholesky_inverse, factor, factor)  # LAPACK's potri overwrites the factor
        del factor
        inverse = _symmetrise_(C64)  # the same storage, read row-major; the solve kernels read rows as columns
        self.condition = norm1 * _norm1(inverse)
        self.inverse = inverse.to(getattr(torch, precision))
        self.ridge = used
        self.identity = False
        self.dim = int(inverse.shape[0])
        self.source = source

    @classmethod
    def identity(cls, dim: int, device: Optional[Union[str, torch.device]] = None) -> "CovarianceSolver":
        """A solver for ``C = I`` (statistics switched off): ``u = k``, with no factorisation."""
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        solver = cls.__new__(cls)
        solver.inverse = torch.eye(dim, dtype=torch.float64, device=device)
        solver.condition = 1.0
        solver.ridge = 0.0
        solver.identity = True
        solver.dim = dim
        solver.source = None
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


def _absolute_ridge(ridge: Optional[float], relative: Optional[float], scale: float) -> float:
    """The absolute ridge from ``ridge`` or ``relative·scale`` (validated: finite, ≥ 0, not both)."""
    if ridge is not None and relative is not None:
        raise ValueError(f"ridge: give ridge={ridge!r} or relative_ridge={relative!r}, not both")
    for name, value in (("ridge", ridge), ("relative_ridge", relative)):
        ok = value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0)
        if not ok:
            raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    if relative is not None:
        return float(relative) * scale
    return float(ridge or 0.0)
