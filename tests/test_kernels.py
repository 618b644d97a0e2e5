"""Numerical tests of the four kernel ops on every backend: the pure-torch reference, the C++ CPU
kernels (fastrome._C), the Triton kernels and the CUDA kernels (fastrome._C_cuda).

Each check is written once and parametrised over the backend (``backend`` fixture and the table in
tests/kernel_checks.py): every backend carries its device, whether it runs here (the skip reason
when not: no C++ extension, no Triton, no CUDA), the sizes each test runs at (the Triton
interpreter, used on a machine without CUDA, is slow: small row counts; CUDA gets big and odd
sizes) and its tolerances. Backend-specific checks are parametrised over that backend only.

Every numerical check compares against an independent float64 computation made here (never
against :mod:`fastrome.reference`), on inputs seeded per test, with tolerances derived from the
precision the op promises: fp32 arithmetic (fp64 for fp64 data) whatever the storage dtype.
Refused writes must leave every bit in place.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import zlib

import kernel_checks
import pytest
import torch
from kernel_checks import (
    ACC_DTYPES,
    ACCEPT_CASES,
    BACKENDS,
    F32_EPS,
    F64_EPS,
    GUARD_CASES,
    SYM_ACCEPT_CASES,
    SYM_GUARD_CASES,
    TRITON_ENV_AT_IMPORT,
    TRITON_INTERPRETED,
    apply_poison,
    cases,
    check_master_update,
    check_rounded_update,
    check_symmetric_update,
    force_backend,
    on,
    plant_in_u,
    poison_negative_zeros,
    random_symmetric_matrix,
    rank_one_bounds,
    same_bits,
    serving,
    sherman_morrison_coef,
    symmetric_update_bounds,
)

from fastrome import _extension, ops

# Guard tests feed NaN/Inf and fp32-overflowing values on purpose; numpy, which runs the
# interpreted Triton kernels, warns about them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FORMS = ["float", "f32", "f64"]


def backends(argnames: str, test: str):
    """Parametrise ``backend,<argnames>`` over every backend's sizes for ``test``."""
    return pytest.mark.parametrize(f"backend,{argnames}", cases(test), indirect=["backend"])


def only(*names: str):
    """Parametrise ``backend`` over the named backends (all when none is named)."""
    return pytest.mark.parametrize("backend", on(*names), indirect=True)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def backend(request, monkeypatch):
    """The backend under test (a ``kernel_checks.KernelBackend``), forced for the test."""
    yield from force_backend(request, monkeypatch)


@pytest.fixture
def g(request) -> torch.Generator:
    """A CPU generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@contextlib.contextmanager
def one_thread():
    """Run the test's own oracles single-threaded (also as a decorator): on a busy 2-core machine
    a threaded eigvalsh can spend seconds, and a small elementwise op tens of milliseconds, in
    OpenMP barriers. The ops under test keep their threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_symmetric(backend, d, dtype, g):
    a = backend.randn(d, d, g=g, dtype=dtype)
    return a + a.t()  # exactly symmetric: addition commutes


def plant_negative_zeros(m):
    """Symmetric -0.0 entries (off the diagonal and on it): a call that adds nothing keeps them."""
    d = m.shape[0]
    for i, j in [(0, d - 1), (d // 2, d // 3), (d - 1, d - 1)]:
        m[i, j] = -0.0
        m[j, i] = -0.0


def misaligned(t):
    """A contiguous copy of t whose data pointer is one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def check_flag(flag, t, applied=True):
    assert isinstance(flag, torch.Tensor)
    assert flag.dtype == torch.bool and flag.shape == () and flag.device == t.device
    assert bool(flag) is applied


# ----------------------------------------------------------------------------------------------
# second_moment_accumulate
# ----------------------------------------------------------------------------------------------


@one_thread()
def expected_moment(acc0, parts):
    """fp64 ``acc0 + Σ xᵀx`` over the masked rows of each (x, mask), the elementwise scale
    ``|acc0| + Σ |x|ᵀ|x|`` bounding the rounding error of any order of summation, and the row
    count (computed on the tensors' device)."""
    exp = acc0.double().clone()
    scale = acc0.double().abs()
    n = 0
    for x, mask in parts:
        r = x.double() if mask is None else x.double()[mask]
        exp += r.t() @ r
        scale += r.abs().t() @ r.abs()
        n += r.shape[0]
    return exp, scale, n


def moment_tol(scale, n, eps, per_row=0.0):
    # A blocked sum's error grows like sqrt(n) in practice (worst case n): 4·sqrt(n)+8 units of the
    # elementwise scale leave a 4x margin over what the backends show and stay 100x below one bf16
    # rounding (2^-8) of the diagonal even at n = 7000. ``per_row`` units more per row cover
    # tensor-core accumulation (CUDA: n/8, still ~50x below one bf16 rounding at n = 7000).
    return eps * (per_row * n + 4.0 * math.sqrt(max(n, 1)) + 8.0) * scale


@one_thread()
def moment_within_tol(acc, exp, scale, n, eps=F32_EPS, per_row=0.0):
    return (acc.double() - exp).abs() <= moment_tol(scale, n, eps, per_row)


@one_thread()
def check_moment(backend, acc, acc0, parts):
    exp, scale, n = expected_moment(acc0, parts)
    all_fp64 = acc.dtype == torch.float64 and all(x.dtype == torch.float64 for x, _ in parts)
    eps = F64_EPS if all_fp64 else F32_EPS  # fp64 only when acc and every x are fp64
    per_row = backend.tol.get("moment_per_row", 0.0)
    ok = moment_within_tol(acc, exp, scale, n, eps, per_row)
    assert torch.isfinite(acc).all()
    assert ok.all(), (
        f"{int((~ok).sum())}/{ok.numel()} elements off; max |err|/scale = "
        f"{((acc.double() - exp).abs() / scale.clamp_min(1e-300)).max().item():.3e} (eps {eps:.1e}, n {n})"
    )
    assert same_bits(acc, acc.t()), "acc is not exactly symmetric"


@backends("d,n,x_dtype,acc_dtype", "moment")
def test_second_moment_sizes(backend, g, d, n, x_dtype, acc_dtype):
    acc0 = random_symmetric(backend, d, acc_dtype, g)
    x = backend.randn(n, d, g=g, dtype=x_dtype)
    acc = acc0.clone()
    assert ops.second_moment_accumulate(acc, x) is acc
    check_moment(backend, acc, acc0, [(x, None)])


@backends("d,x_dtype,acc_dtype", "moment_no_rows")
def test_second_moment_no_rows(backend, g, d, x_dtype, acc_dtype):
    acc0 = random_symmetric(backend, d, acc_dtype, g)
    plant_negative_zeros(acc0)
    acc = acc0.clone()
    assert ops.second_moment_accumulate(acc, backend.randn(0, d, g=g, dtype=x_dtype)) is acc
    assert same_bits(acc, acc0)


@backends("x_dtype,acc_dtype", "moment_wide")
def test_second_moment_wide(backend, g, x_dtype, acc_dtype):
    """d = 1536 (SmolLM2's d_ff): many tiles, the last one partial at 128-wide tiles."""
    d, n = 1536, 9
    acc0 = random_symmetric(backend, d, acc_dtype, g)
    x = backend.randn(n, d, g=g, dtype=x_dtype)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x)
    check_moment(backend, acc, acc0, [(x, None)])


@backends("d,x_dtype,x_layout", "moment_noncontiguous")
def test_second_moment_noncontiguous_x(backend, g, d, x_dtype, x_layout):
    n = 45
    if x_layout == "column_slice":
        x = backend.randn(n, d + 9, g=g, dtype=x_dtype)[:, 4 : 4 + d]
    elif x_layout == "transposed":
        x = backend.randn(d, n, g=g, dtype=x_dtype).t()
    else:
        x = backend.randn(2 * n, d, g=g, dtype=x_dtype)[::2]
    assert not x.is_contiguous() and x.shape == (n, d)
    x_before = x.clone()
    acc0 = random_symmetric(backend, d, torch.float32, g)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x)
    check_moment(backend, acc, acc0, [(x, None)])
    assert same_bits(x, x_before)


@backends("d,which,acc_dtype", "moment_mask")
def test_second_moment_mask(backend, g, d, which, acc_dtype):
    n = 61
    x = backend.randn(n, d, g=g, dtype=torch.bfloat16)
    if which == "all":
        mask = torch.ones(n, dtype=torch.bool)
    elif which == "none":
        mask = torch.zeros(n, dtype=torch.bool)
    elif which == "one":
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n // 2] = True
    elif which == "some":
        mask = torch.rand(n, generator=g) < 0.4
    else:
        mask = (torch.rand(2 * n, generator=g) < 0.4).to(backend.device)[::2]
        assert not mask.is_contiguous()
    mask = mask.to(backend.device)
    assert 0 < int(mask.sum()) < n or which in ("all", "none")
    mask_before = mask.clone()
    acc0 = random_symmetric(backend, d, acc_dtype, g)
    plant_negative_zeros(acc0)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x, mask)
    if which == "none":
        assert same_bits(acc, acc0), "a mask selecting no row changed acc"
    check_moment(backend, acc, acc0, [(x, mask)])
    assert torch.equal(mask, mask_before)
    if which == "some":
        # Rows left out must not count: their contribution is far above the tolerance.
        exp_all, scale, _ = expected_moment(acc0, [(x, None)])
        assert not moment_within_tol(acc, exp_all, scale, n, per_row=backend.tol.get("moment_per_row", 0.0)).all()


@backends("x_dtype", "moment_masked_nan")
def test_second_moment_masked_rows_may_hold_nan_and_inf(backend, g, x_dtype):
    """Rows left out are replaced, not multiplied by 0: a NaN or Inf in them must not leak in."""
    n, d = 40, 300
    x = backend.randn(n, d, g=g, dtype=x_dtype)
    mask = (torch.rand(n, generator=g) < 0.5).to(backend.device)
    mask[0], mask[1], mask[2] = False, False, True
    x[0, 5] = math.nan
    x[1, :] = math.inf
    acc0 = random_symmetric(backend, d, torch.float32, g)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x, mask)
    check_moment(backend, acc, acc0, [(x, mask)])


@backends("d,acc_dtype", "moment_twice")
def test_second_moment_accumulates_twice(backend, g, d, acc_dtype):
    acc0 = random_symmetric(backend, d, acc_dtype, g)
    x1 = backend.randn(29, d, g=g, dtype=torch.float16)
    m1 = (torch.rand(29, generator=g) < 0.5).to(backend.device)
    x2 = backend.randn(17, d + 3, g=g, dtype=torch.float32)[:, 3:]
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x1, m1)
    ops.second_moment_accumulate(acc, x2)
    check_moment(backend, acc, acc0, [(x1, m1), (x2, None)])


@backends("x_dtype,acc_dtype,masked", "moment_row_chunks")
def test_second_moment_crosses_row_chunks(backend, g, x_dtype, acc_dtype, masked):
    """More rows than one C++ chunk (4096), also after masking, with d across two 256-tiles."""
    d = 300
    n = 7001 if masked else 4501
    x = backend.randn(n, d, g=g, dtype=x_dtype)
    mask = (torch.rand(n, generator=g) < 0.7).to(backend.device) if masked else None
    assert mask is None or int(mask.sum()) > 4096
    acc0 = random_symmetric(backend, d, acc_dtype, g)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x, mask)
    check_moment(backend, acc, acc0, [(x, mask)])


@backends("d,acc_dtype,x_dtype", "moment_strided_acc")
def test_second_moment_strided_acc(backend, g, d, acc_dtype, x_dtype):
    """acc may be a view into a larger buffer; nothing outside it is touched."""
    base = random_symmetric(backend, d + 5, acc_dtype, g)
    acc = base[2 : 2 + d, 2 : 2 + d]
    inside = torch.zeros(base.shape, dtype=torch.bool, device=backend.device)
    inside[2 : 2 + d, 2 : 2 + d] = True
    base0, acc0 = base.clone(), acc.clone()
    x = backend.randn(40, d, g=g, dtype=x_dtype)
    ops.second_moment_accumulate(acc, x)
    check_moment(backend, acc, acc0, [(x, None)])
    assert same_bits(base[~inside], base0[~inside])


@backends("d,acc_dtype,x_dtype", "moment_column_major")
def test_second_moment_column_major_acc(backend, g, d, acc_dtype, x_dtype):
    acc = random_symmetric(backend, d, acc_dtype, g).t().contiguous().t()
    assert acc.stride() == (1, d)
    acc0 = acc.clone()
    x = backend.randn(50, d, g=g, dtype=x_dtype)
    ops.second_moment_accumulate(acc, x)
    check_moment(backend, acc, acc0, [(x, None)])


@backends("d,n,x_dtype,acc_dtype", "moment_large")
def test_second_moment_large(backend, g, d, n, x_dtype, acc_dtype):
    """Model sizes: many 1024-row GEMM blocks and a large fold, against the fp64 product of the
    same bf16/fp16 inputs."""
    acc0 = random_symmetric(backend, d, acc_dtype, g)
    x = backend.randn(n, d, g=g, dtype=x_dtype)
    mask = (torch.rand(n, generator=g) < 0.8).to(backend.device)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x, mask)
    check_moment(backend, acc, acc0, [(x, mask)])


@contextlib.contextmanager
def tf32_matmuls():
    """Tell torch to allow TF32 for fp32 matmuls (the newer API when this torch has it)."""
    matmul = torch.backends.cuda.matmul
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    before = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


@only("cuda")
def test_second_moment_fp32_ignores_global_tf32(backend, g):
    """fp32 inputs are multiplied in fp32 even when torch is told to allow TF32 matmuls; TF32
    (10-bit mantissa) would miss the fp32 tolerance by orders of magnitude."""
    d, n = 1031, 256
    acc0 = random_symmetric(backend, d, torch.float32, g)
    x = backend.randn(n, d, g=g, dtype=torch.float32)
    with tf32_matmuls():
        acc = acc0.clone()
        ops.second_moment_accumulate(acc, x)
        plain = acc0 + x.t() @ x  # torch's own matmul under the same setting
    exp, scale, _ = expected_moment(acc0, [(x, None)])
    if moment_within_tol(plain, exp, scale, n, per_row=backend.tol["moment_per_row"]).all():
        pytest.skip("allowing TF32 did not change torch's fp32 matmul on this GPU: nothing to tell apart")
    check_moment(backend, acc, acc0, [(x, None)])


@only("triton")
def test_second_moment_fp64_acc_keeps_fp64_precision(backend, g):
    """An fp64 acc receives the fp32 row sums flush by flush, in fp64.

    The first flush period holds rows of ±4096 (their sums are exact in fp32, ~2^30); the rows after
    it are of order 1. A single fp32 running sum would lose them (half an fp32 ulp of 2^30 is 64);
    the fp64 acc must keep them to fp32 precision of *their own* size. An fp32 acc, run alike, fails
    the same check, so the check can tell the two apart.
    """
    flush = sys.modules["fastrome.kernels.second_moment"].flush_rows()
    d, n = 13, 2 * flush + 7
    signs = torch.randint(0, 2, (flush, d), generator=g).double() * 2 - 1
    big = (4096.0 * signs).to(torch.bfloat16)
    small = (torch.rand(n - flush, d, generator=g, dtype=torch.float64) + 0.5).to(torch.bfloat16)
    x = torch.cat([big, small]).to(backend.device)
    acc0 = torch.zeros(d, d, dtype=torch.float64, device=backend.device)
    exp, _, _ = expected_moment(acc0, [(x, None)])
    s = small.double().to(backend.device)
    tol = F32_EPS * (4.0 * math.sqrt(n) + 8.0) * (s.t() @ s) + 4.0 * F64_EPS * exp.abs()

    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x)
    err = (acc - exp).abs()
    assert (err <= tol).all(), f"max err {err.max().item():.3e}"
    assert same_bits(acc, acc.t())

    acc32 = acc0.float()
    ops.second_moment_accumulate(acc32, x)
    assert not ((acc32.double() - exp).abs() <= tol).all(), "the check cannot tell fp32 from fp64"


@only("triton")
def test_second_moment_fp64_x_goes_to_reference(backend, g):
    """fp64 x is not a Triton kernel case; the fp64 product it gets is exact to fp64."""
    d, n = 13, 20
    x = backend.randn(n, d, g=g, dtype=torch.float64)
    acc0 = random_symmetric(backend, d, torch.float64, g)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x)
    exp, scale, _ = expected_moment(acc0, [(x, None)])
    assert ((acc - exp).abs() <= 16 * n * F64_EPS * scale).all()
    assert same_bits(acc, acc.t())


def test_moment_tolerance_rejects_bf16_accumulation(g):
    """The moment tolerance (with and without CUDA's per-row slack) is tight enough that a bf16
    running sum fails it, and so does a single bf16 rounding of an exact product."""
    cpu = BACKENDS["reference"]
    for d, n, per_row in [(13, 64, 0.0), (300, 256, BACKENDS["cuda"].tol["moment_per_row"])]:
        x = cpu.randn(n, d, g=g, dtype=torch.bfloat16)
        acc0 = random_symmetric(cpu, d, torch.float32, g)
        exp, scale, _ = expected_moment(acc0, [(x, None)])
        once = (x.double().t() @ x.double()).bfloat16().float()
        assert not moment_within_tol(acc0 + once, exp, scale, n, per_row=per_row).all()
        if per_row == 0.0:
            s = torch.zeros(d, d, dtype=torch.bfloat16)
            for row in x.float():
                s = (s.float() + torch.outer(row, row)).bfloat16()
            assert not moment_within_tol(acc0 + s.float(), exp, scale, n).all()


# ----------------------------------------------------------------------------------------------
# solve_keys
# ----------------------------------------------------------------------------------------------


def make_spd(d, g, ridge=0.1):
    """C = A Aᵀ + ridge·I (fp64, CPU) and its condition number."""
    a = torch.randn(d, 2 * d + 1, generator=g, dtype=torch.float64) / math.sqrt(2 * d + 1)
    c = a @ a.t() + ridge * torch.eye(d, dtype=torch.float64)
    return c, condition_number(c)


def condition_number(c):
    with one_thread():
        ev = torch.linalg.eigvalsh(c)
    return (ev[-1] / ev[0]).item()


def inverse_of(c):
    with one_thread():
        inv = torch.cholesky_inverse(torch.linalg.cholesky(c))
    return 0.5 * (inv + inv.t())


@one_thread()
def check_solve(backend, u, denom, inverse, c, cond, k):
    """u solves C u = k as accurately as C's condition allows, u is A·k formed in A's dtype and
    rounded once, and denom = Σ u_i k_i from that rounded u, in fp64, rounded once."""
    d = c.shape[0]
    out_dtype = torch.promote_types(k.dtype, torch.float32)
    assert u.dtype == out_dtype and denom.dtype == out_dtype
    assert u.shape == k.shape and denom.shape == k.shape[:-1]
    assert u.device == k.device and denom.device == k.device
    assert torch.isfinite(u).all() and torch.isfinite(denom).all()

    k64, u64 = k.double().cpu(), u.double().cpu()
    with one_thread():
        want = torch.linalg.solve(c, k64.reshape(-1, d).t()).t().reshape(k.shape)
    # An inverse rounded and accumulated at eps_a perturbs u by up to ~cond·sqrt(d)·eps_a
    # relatively; rounding u to the output dtype adds eps_out.
    eps_a = torch.finfo(inverse.dtype).eps
    eps_out = torch.finfo(out_dtype).eps
    tol = 4.0 * cond * (math.sqrt(d) + 1.0) * eps_a + 2.0 * eps_out
    err = (u64 - want).norm(dim=-1) / want.norm(dim=-1)
    assert (err <= tol).all(), f"relative error {err.max().item():.3e} > {tol:.3e} (cond {cond:.1f})"

    # The product itself: a sum of d terms in any order (CUDA: lane-wise), plus the output rounding.
    a64 = inverse.double().cpu()
    k_a = k.to(inverse.dtype).double().cpu()  # the key as the product sees it
    exact = k_a @ a64  # A is symmetric: k A = (A k)ᵀ
    terms = backend.tol.get("solve_terms", lambda n: n + 8.0)(d)
    ptol = terms * eps_a * (k_a.abs() @ a64.abs()) + eps_out * exact.abs()
    perr = (u64 - exact).abs()
    assert (perr <= ptol).all(), f"max err {perr.max().item():.3e}"

    prods = u64 * k64
    want_denom = prods.sum(-1)
    dtol = eps_out * want_denom.abs() + 4.0 * d * F64_EPS * prods.abs().sum(-1)
    assert ((denom.double().cpu() - want_denom).abs() <= dtol).all()
    assert (denom > 0).all()  # kᵀC⁻¹k of an SPD C and a nonzero key


@backends("d,inverse_dtype,k_dtype,batch", "solve")
def test_solve_keys(backend, g, d, inverse_dtype, k_dtype, batch):
    c, cond = make_spd(d, g)
    inverse = inverse_of(c).to(inverse_dtype).to(backend.device)
    k = backend.randn(*(() if batch is None else (batch,)), d, g=g, dtype=k_dtype)
    inverse0, k0 = inverse.clone(), k.clone()
    # Allocate and free NaN-filled blocks so that fresh outputs likely start as NaN.
    blocks = [torch.full((n,), math.nan, dtype=torch.float64, device=backend.device) for n in (k.numel(), d)]
    del blocks
    u, denom = ops.solve_keys(inverse, k)
    check_solve(backend, u, denom, inverse, c, cond, k)
    assert same_bits(inverse, inverse0) and same_bits(k, k0)


@backends("d,inverse_layout,k_layout", "solve_layouts")
def test_solve_keys_noncontiguous(backend, g, d, inverse_layout, k_layout):
    b = 4
    c, cond = make_spd(d, g)
    inverse = inverse_of(c).to(backend.device)
    if inverse_layout == "column_major":
        inverse = inverse.t().contiguous().t()
        assert not inverse.is_contiguous()
    elif inverse_layout == "sliced":
        big = torch.full((d + 3, d + 5), math.nan, dtype=torch.float64, device=backend.device)
        big[2 : 2 + d, 1 : 1 + d] = inverse
        inverse = big[2 : 2 + d, 1 : 1 + d]
        assert not inverse.is_contiguous() and not inverse.t().is_contiguous()
    elif inverse_layout == "misaligned":
        inverse = misaligned(inverse)
    if k_layout == "strided_1d":
        k = backend.randn(3 * d, g=g)[::3]
    elif k_layout == "transposed_2d":
        k = backend.randn(d, b, g=g, dtype=torch.bfloat16).t()
    elif k_layout == "column_slice_2d":
        k = backend.randn(b, d + 6, g=g)[:, 2 : 2 + d]
    else:
        k = backend.randn(2 * b, d, g=g, dtype=torch.float64)[::2]
    assert not k.is_contiguous() and k.shape[-1] == d
    u, denom = ops.solve_keys(inverse, k)
    check_solve(backend, u, denom, inverse, c, cond, k)


@only()
def test_solve_keys_ill_conditioned(backend, g):
    """A nearly singular C (cond ~1e6) still gets an accurate solve from an fp64 inverse."""
    d = 257
    a = torch.randn(d, d // 2, generator=g, dtype=torch.float64)
    c = a @ a.t() / d + 1e-6 * torch.eye(d, dtype=torch.float64)
    cond = condition_number(c)
    assert cond > 1e5
    k = backend.randn(3, d, g=g, dtype=torch.float64)
    inverse = inverse_of(c).to(backend.device)
    u, denom = ops.solve_keys(inverse, k)
    check_solve(backend, u, denom, inverse, c, cond, k)


@only()
def test_solve_keys_exact_small_case(backend):
    """A tiny case by hand (rows against columns, and the fused denominator)."""
    f64 = torch.float64
    a = backend.tensor([[2.0, -1.0, 0.5], [-1.0, 3.0, 0.25], [0.5, 0.25, 1.0]], f64)
    k = backend.tensor([1.0, -2.0, 4.0], f64)
    want = backend.tensor([2.0 + 2.0 + 2.0, -1.0 - 6.0 + 1.0, 0.5 - 0.5 + 4.0], f64)
    u, denom = ops.solve_keys(a, k)
    torch.testing.assert_close(u, want, rtol=0, atol=0)
    torch.testing.assert_close(denom, (want * k).sum(), rtol=0, atol=0)


@backends("d", "solve_small")
def test_solve_keys_denominator_from_rounded_u(backend, g, d):
    """fp64 inverse, fp32 key: u is rounded to fp32 and denom is Σ u_rounded·k in fp64, rounded once."""
    c, _ = make_spd(d, g)
    inverse = inverse_of(c).to(backend.device)
    k = backend.randn(2, d, g=g)
    u, denom = ops.solve_keys(inverse, k)
    a, k64 = inverse.cpu(), k.double().cpu()
    u_exact = k64 @ a
    # An fp64 product (error d·eps64 of |A||k|), rounded once to fp32.
    u_tol = F32_EPS / 2 * u_exact.abs() + d * F64_EPS * (k64.abs() @ a.abs())
    assert ((u.double().cpu() - u_exact).abs() <= u_tol).all()
    prods = u.double().cpu() * k64
    want = prods.sum(-1)
    # A fixed-order fp64 sum of d terms, then one fp32 rounding.
    assert ((denom.double().cpu() - want).abs() <= F32_EPS / 2 * want.abs() + d * F64_EPS * prods.abs().sum(-1)).all()

    # By hand: u = (1/3, -1/3 - 2⁻⁴⁰) rounds to (r, -r) in fp32, so the denominator of the rounded
    # u is exactly 0, where the unrounded one would give -2⁻⁴⁰.
    a = backend.tensor([[1 / 3, 0.0], [0.0, -1 / 3 - 2.0**-40]], torch.float64)
    u, denom = ops.solve_keys(a, backend.tensor([1.0, 1.0]))
    r = torch.tensor(1 / 3, dtype=torch.float32)
    assert torch.equal(u.cpu(), torch.stack([r, -r])) and denom.item() == 0.0


@backends("d", "solve_small")
def test_solve_keys_is_deterministic(backend, g, d):
    inverse = random_symmetric(backend, d, torch.float32, g)
    k = backend.randn(6, d, g=g)
    u1, d1 = ops.solve_keys(inverse, k)
    u2, d2 = ops.solve_keys(inverse, k)
    assert same_bits(u1, u2) and same_bits(d1, d2)


@only()
def test_solve_keys_empty_batch(backend, g):
    inverse = random_symmetric(backend, 8, torch.float64, g)
    u, denom = ops.solve_keys(inverse, torch.empty(0, 8, device=backend.device))
    assert u.shape == (0, 8) and denom.shape == (0,) and u.dtype == torch.float32


@backends("d,inverse_dtype,batch", "solve_large")
def test_solve_keys_large(backend, g, d, inverse_dtype, batch):
    """Model sizes, against A·k in fp64 on the device (no SPD oracle at this size)."""
    inverse = random_symmetric(backend, d, inverse_dtype, g)
    k = backend.randn(*(() if batch is None else (batch,)), d, g=g)
    u, denom = ops.solve_keys(inverse, k)
    exact = k.double() @ inverse.double()
    tol = backend.tol["solve_terms"](d) * torch.finfo(inverse_dtype).eps * (k.double().abs() @ inverse.double().abs())
    assert ((u.double() - exact).abs() <= tol + F32_EPS * exact.abs()).all()
    prods = u.double() * k.double()
    want = prods.sum(-1)
    assert ((denom.double() - want).abs() <= F32_EPS * want.abs() + 4.0 * d * F64_EPS * prods.abs().sum(-1)).all()


# ----------------------------------------------------------------------------------------------
# rank_one_update
# ----------------------------------------------------------------------------------------------


def layout(kind: str, rows: int, cols: int):
    """``(base_shape, view_of)``: how a (rows, cols) matrix is stored in layout ``kind``."""
    return {
        "contiguous": ((rows, cols), lambda b: b),
        "transposed": ((cols, rows), lambda b: b.t()),  # GPT-2 Conv1D: stored (d_in, d_out)
        "sliced": ((rows + 3, 2 * cols + 1), lambda b: b[1 : 1 + rows, 1::2]),
        # contiguous, one element past a 16-byte boundary: the element path of the CUDA kernels
        "misaligned": ((rows * cols + 1,), lambda b: b[1:].view(rows, cols)),
    }[kind]


@one_thread()
def check_master(w, master, master0, lam, u):
    check_master_update(w, master, master0, lam, u)


@one_thread()
def check_plain_update(w, w0, lam, u):
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    exact, bound = rank_one_bounds(w0, lam, u, compute)
    check_rounded_update(w, exact, bound)


@backends("w_dtype,shape,kind,use_master", "r1u")
def test_rank_one_update(backend, g, w_dtype, shape, kind, use_master):
    d_out, d_in = shape
    base_shape, view_of = layout(kind, d_out, d_in)
    inside = torch.zeros(base_shape, dtype=torch.bool, device=backend.device)
    view_of(inside).fill_(True)
    u = backend.randn(d_in, g=g, scale=0.1)
    lam = backend.randn(d_out, g=g)
    if use_master:
        m_base = backend.randn(*base_shape, g=g, scale=0.5)
        poison_negative_zeros(m_base)
        master = view_of(m_base)
        # The weight starts as NaN: every element must be written from the master.
        w_base = torch.full(base_shape, math.nan, dtype=w_dtype, device=backend.device)
        m_base0, master0 = m_base.clone(), master.clone()
    else:
        w_base = backend.randn(*base_shape, g=g, dtype=w_dtype, scale=0.5)
        poison_negative_zeros(w_base)
        master = None
    w = view_of(w_base)
    assert kind != "misaligned" or w.data_ptr() % 16 != 0
    w_base0, w0 = w_base.clone(), w.clone()
    u0, lam0 = u.clone(), lam.clone()

    flag = ops.rank_one_update(w, u, lam, denom=1.0, min_denom=1e-6, master=master)

    check_flag(flag, w, True)
    if use_master:
        check_master(w, master, master0, lam, u)
        assert same_bits(m_base[~inside], m_base0[~inside]), "wrote the master outside the view"
    else:
        check_plain_update(w, w0, lam, u)
    assert same_bits(w_base[~inside], w_base0[~inside]), "wrote outside the view"
    assert same_bits(u, u0) and same_bits(lam, lam0)


@backends("shape,w_dtype,master_dtype", "r1u_master_dtypes")
def test_rank_one_update_master_dtypes(backend, g, shape, w_dtype, master_dtype):
    """Any fp32/fp64 master with any weight dtype; the master's dtype sets the arithmetic."""
    d_out, d_in = shape
    master = backend.randn(d_out, d_in, g=g, dtype=master_dtype)
    w = torch.full((d_out, d_in), math.nan, dtype=w_dtype, device=backend.device)
    master0 = master.clone()
    u, lam = backend.randn(d_in, g=g, scale=0.1), backend.randn(d_out, g=g)
    check_flag(ops.rank_one_update(w, u, lam, denom=2.0, min_denom=0.0, master=master), w, True)
    check_master(w, master, master0, lam, u)


@only()
def test_rank_one_update_master_in_another_layout(backend, g):
    """A Conv1D (transposed) weight with a row-major master: read and written with both strides."""
    d_out, d_in = 48, 80
    master = backend.randn(d_out, d_in, g=g)
    w = master.t().contiguous().to(torch.bfloat16).t()
    assert w.stride() == (1, d_out)
    master0 = master.clone()
    u, lam = backend.randn(d_in, g=g, scale=0.1), backend.randn(d_out, g=g)
    check_flag(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0, master=master), w, True)
    check_master(w, master, master0, lam, u)


@pytest.mark.parametrize("w_dtype,mantissa_bits", [(torch.bfloat16, 8), (torch.float16, 11)], ids=str)
@only()
def test_rank_one_update_rounds_fp64_master_like_torch(backend, g, w_dtype, mantissa_bits):
    """An fp64 master is rounded to bf16/fp16 as ``master.to(dtype)`` rounds it: through fp32.

    The master holds values just above a midpoint of the weight dtype, by less than half an fp32
    step: rounded directly they go up, through fp32 they land on the midpoint and go to even. A zero
    u makes the update add nothing, so the weight is the rounded master.
    """
    n = 512
    b = backend.randn(n, g=g).to(w_dtype).double()
    b = torch.where(b == 0, torch.ones_like(b), b)
    ulp = torch.ldexp(torch.ones_like(b), torch.frexp(b.abs()).exponent - mantissa_bits)
    master = (b + ulp / 2 + ulp * 2.0**-20).reshape(16, 32)
    through_fp32 = master.cpu().to(w_dtype)  # torch on the CPU
    directly = (b + ulp * torch.sign(b)).cpu().to(w_dtype).reshape(16, 32)  # what one rounding would give
    assert (through_fp32 != directly).sum() > n // 8, "the inputs do not tell the roundings apart"
    w = torch.full((16, 32), math.nan, dtype=w_dtype, device=backend.device)
    u, lam = torch.zeros(32, device=backend.device), backend.randn(16, g=g)
    check_flag(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0, master=master), w, True)
    assert same_bits(w.cpu(), through_fp32)


@backends("shape,w_dtype,vector_dtypes,strided", "r1u_vectors")
def test_rank_one_update_mixed_and_strided_vectors(backend, g, shape, w_dtype, vector_dtypes, strided):
    d_out, d_in = shape
    u_dtype, lam_dtype = vector_dtypes
    w = backend.randn(d_out, d_in, g=g, dtype=w_dtype)
    if strided:
        u = backend.randn(3 * d_in, g=g, dtype=u_dtype, scale=0.1)[::3]
        lam = backend.randn(2 * d_out, g=g, dtype=lam_dtype)[1::2]
    else:
        u = backend.randn(d_in, g=g, dtype=u_dtype, scale=0.1)
        lam = backend.randn(d_out, g=g, dtype=lam_dtype)
    w0 = w.clone()
    check_flag(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0), w, True)
    check_plain_update(w, w0, lam, u)


def test_rank_one_update_tolerance_rejects_bf16_arithmetic(g):
    """check_rounded_update fails an update whose product is rounded to bf16 before the addition."""
    cpu = BACKENDS["reference"]
    w0 = cpu.randn(64, 96, g=g, dtype=torch.bfloat16, scale=0.5)
    u, lam = cpu.randn(96, g=g, scale=0.1), cpu.randn(64, g=g)
    exact, bound = rank_one_bounds(w0, lam, u, torch.float32)
    sloppy = (w0.float() + torch.outer(lam, u).bfloat16().float()).bfloat16()
    with pytest.raises(AssertionError):
        check_rounded_update(sloppy, exact, bound)


@backends("w_dtype,kind,use_master", "r1u_large")
def test_rank_one_update_large(backend, g, w_dtype, kind, use_master):
    """4096 × 11008 (a Llama-7B MLP matrix), checked in row blocks to keep fp64 temporaries small."""
    d_out, d_in = 4096, 11008
    u = backend.randn(d_in, g=g, scale=0.02)
    lam = backend.randn(d_out, g=g)
    shape, view_of = layout(kind, d_out, d_in)
    m_dtype = torch.float64 if w_dtype == torch.float64 else torch.float32
    start = view_of(torch.empty(shape, dtype=m_dtype).uniform_(-0.5, 0.5, generator=g).to(backend.device))
    if use_master:
        master = start
        w = view_of(torch.full(shape, math.nan, dtype=w_dtype, device=backend.device))
        before = start.clone()
    else:
        master = None
        w = start.to(w_dtype)  # keeps the layout's strides
        before = w.clone()
    denom, min_denom = backend.tensor(3.0), backend.tensor(1e-8)
    check_flag(ops.rank_one_update(w, u, lam, denom=denom, min_denom=min_denom, master=master), w, True)
    step = 512  # check in row blocks to keep the fp64 temporaries small
    for r in range(0, d_out, step):
        rows = slice(r, r + step)
        if use_master:
            check_master(w[rows], master[rows], before[rows], lam[rows], u)
        else:
            check_plain_update(w[rows], before[rows], lam[rows], u)


@pytest.mark.parametrize("use_master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("case", list(GUARD_CASES))
@backends("shape,combos", "r1u_refused")
def test_rank_one_update_refused(backend, g, shape, combos, case, use_master):
    """A refused write returns False and leaves weight and master bit for bit as they were, for
    every weight dtype and scalar form of the backend's table (on CUDA on both the element path,
    (9, 14), and the vector path, (64, 2056))."""
    denom, min_denom, poison = GUARD_CASES[case]
    d_out, d_in = shape
    for w_dtype, form, master_dtype in combos:
        w = backend.randn(d_out, d_in, g=g, dtype=w_dtype)
        poison_negative_zeros(w)
        master = None
        if use_master:
            master = backend.randn(d_out, d_in, g=g, dtype=master_dtype)
            poison_negative_zeros(master)
        u, lam = backend.randn(d_in, g=g), backend.randn(d_out, g=g)
        apply_poison(u, lam, poison)
        w0 = w.clone()
        m0 = None if master is None else master.clone()
        flag = ops.rank_one_update(
            w, u, lam, denom=backend.scalar(denom, form), min_denom=backend.scalar(min_denom, form), master=master
        )
        where = f"weight {w_dtype}, scalars as {form}"
        check_flag(flag, w, False)
        assert same_bits(w, w0), f"a refused write changed the weight ({where})"
        if master is not None:
            assert same_bits(master, m0), f"a refused write changed the master ({where})"


@only("cuda")
def test_rank_one_update_refused_large(backend, g):
    """One NaN in u: a 4096 × 11008 bf16 weight and its master stay bit-identical."""
    d_out, d_in = 4096, 11008
    master = torch.empty(d_out, d_in, device=backend.device).uniform_(-0.5, 0.5)
    w = master.to(torch.bfloat16)
    u, lam = backend.randn(d_in, g=g), backend.randn(d_out, g=g)
    u[d_in - 3] = math.nan
    w0, m0 = w.clone(), master.clone()
    check_flag(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0, master=master), w, False)
    assert same_bits(w, w0) and same_bits(master, m0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", list(ACCEPT_CASES))
@only()
def test_rank_one_update_accepted_boundaries(backend, g, case, form):
    denom, min_denom = ACCEPT_CASES[case]
    w = backend.randn(6, 5, g=g)
    u, lam = backend.randn(5, g=g), backend.randn(6, g=g)
    w0 = w.clone()
    flag = ops.rank_one_update(w, u, lam, denom=backend.scalar(denom, form), min_denom=backend.scalar(min_denom, form))
    check_flag(flag, w, True)
    check_plain_update(w, w0, lam, u)


@only()
def test_rank_one_update_scalars_in_16bit_dtypes(backend, g):
    w = backend.randn(4, 8, g=g)
    w0 = w.clone()
    u, lam = backend.randn(8, g=g), backend.randn(4, g=g)
    denom, min_denom = backend.tensor(2.0, torch.bfloat16), backend.tensor(1.0, torch.float16)
    check_flag(ops.rank_one_update(w, u, lam, denom=denom, min_denom=min_denom), w, True)
    check_plain_update(w, w0, lam, u)


@pytest.mark.parametrize("which", ["u", "lam"])
@pytest.mark.parametrize("use_master", [False, True], ids=["plain", "master"])
@only()
def test_rank_one_update_refuses_vectors_that_overflow_the_compute_dtype(backend, g, which, use_master):
    """A vector finite in fp64 but not in the fp32 arithmetic of an fp32 weight (or fp32 master):
    nothing is written."""
    w = backend.randn(4, 3, g=g, dtype=torch.bfloat16 if use_master else torch.float32)
    master = backend.randn(4, 3, g=g) if use_master else None
    u, lam = backend.randn(3, g=g, dtype=torch.float64), backend.randn(4, g=g, dtype=torch.float64)
    {"u": u, "lam": lam}[which][1] = 1e300
    w0 = w.clone()
    m0 = None if master is None else master.clone()
    check_flag(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0, master=master), w, False)
    assert same_bits(w, w0)
    if master is not None:
        assert same_bits(master, m0)


@only()
def test_rank_one_update_fp64_compute_accepts_what_fp32_cannot_hold(backend, g):
    """The guard converts the vectors to the compute dtype: fp64 for an fp64 master, so 1e300 is
    finite there and the write happens (the fp32 weight then holds the rounded master, ±inf)."""
    master = backend.randn(4, 3, g=g, dtype=torch.float64)
    w = torch.full((4, 3), math.nan, dtype=torch.float32, device=backend.device)
    u = backend.tensor([1.0, 1e300, 2.0], torch.float64)
    lam = backend.randn(4, g=g, dtype=torch.float64)
    check_flag(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0, master=master), w, True)
    assert same_bits(w, master.to(torch.float32))
    assert torch.isinf(w[:, 1]).all() and torch.isfinite(w[:, [0, 2]]).all()


@only()
def test_rank_one_update_empty_weight(backend):
    w = torch.zeros(0, 5, device=backend.device)
    flag = ops.rank_one_update(w, backend.tensor([1.0] * 5), backend.tensor([]), denom=1.0, min_denom=0.0)
    check_flag(flag, w, True)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
@only()
def test_rank_one_update_keeps_denormals(backend, w_dtype):
    """No flush-to-zero: denormal weights and products are kept as IEEE arithmetic gives them."""
    tiny = 1e-39  # below fp32's smallest normal (1.18e-38), representable in fp32 and bf16
    w = torch.full((4, 8), tiny, device=backend.device).to(w_dtype)
    u = torch.full((8,), tiny, device=backend.device)
    lam = torch.ones(4, device=backend.device)
    w0_cpu = w.cpu().clone()
    check_flag(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0), w, True)
    want = (w0_cpu.float() + torch.tensor(tiny, dtype=torch.float32)).to(w_dtype)  # IEEE, on the CPU
    assert (w.cpu().float() > 0).all()
    assert same_bits(w.cpu(), want)


# ----------------------------------------------------------------------------------------------
# symmetric_rank_one_update
# ----------------------------------------------------------------------------------------------


def draw_beta_denom(g):
    """β in [0.1, 2) and uᵀk in [0.1, 5): an addition with a well-separated denominator."""
    beta, denom = torch.rand(2, generator=g, dtype=torch.float64).tolist()
    return 0.1 + 1.9 * beta, 0.1 + 4.9 * denom


def sym_matrix(backend, d, dtype, g):
    return random_symmetric_matrix(d, dtype, g, device=backend.device)


@one_thread()
def check_sym_update(m, m0, u, beta, denom):
    exact, bound = symmetric_update_bounds(m0, u, beta, denom)
    check_symmetric_update(m, exact, bound)


@backends("d,m_dtype,u_dtype", "sym")
def test_symmetric_rank_one_update(backend, g, d, m_dtype, u_dtype):
    m = sym_matrix(backend, d, m_dtype, g)
    u = backend.randn(d, g=g, dtype=u_dtype)
    beta, denom = draw_beta_denom(g)
    m0, u0 = m.clone(), u.clone()
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    check_sym_update(m, m0, u, beta, denom)
    assert same_bits(u, u0)


@backends("d,m_dtype,m_kind,u_kind", "sym_layouts")
def test_symmetric_rank_one_update_layouts(backend, g, d, m_dtype, m_kind, u_kind):
    """Every layout of the matrix and of u; nothing outside a view is written."""
    sym = sym_matrix(backend, d, m_dtype, g)
    if m_kind == "sliced":  # a window with a row offset and a column stride of 2
        base = backend.randn(d + 3, 2 * d + 1, g=g, dtype=m_dtype)
        m = base[1 : 1 + d, 1::2]
        m.copy_(sym)
        inside = torch.zeros(base.shape, dtype=torch.bool, device=backend.device)
        inside[1 : 1 + d, 1::2] = True
    else:
        base = {"contiguous": sym, "transposed": sym.t().contiguous(), "misaligned": misaligned(sym)}[m_kind]
        m = base.t() if m_kind == "transposed" else base
        inside = torch.ones(base.shape, dtype=torch.bool, device=backend.device)
    if u_kind == "strided":
        u = backend.randn(3 * d, g=g, dtype=torch.bfloat16)[1::3]
        assert not u.is_contiguous()
    elif u_kind == "offset":  # contiguous, off any alignment boundary
        u = backend.randn(d + 5, g=g)[3 : 3 + d]
    else:
        u = backend.randn(d, g=g, dtype=m_dtype)
        u = misaligned(u) if u_kind == "misaligned" else u
    assert m_kind in ("contiguous", "misaligned") or not m.is_contiguous()
    base0, m0, u0 = base.clone(), m.clone(), u.clone()
    beta, denom = draw_beta_denom(g)
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    check_sym_update(m, m0, u, beta, denom)
    assert same_bits(base[~inside], base0[~inside]), "wrote outside the view"
    assert same_bits(u, u0)


@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
@only("cuda")
def test_symmetric_rank_one_update_large(backend, g, m_dtype):
    """11008 × 11008 (Llama-7B's d_ff), checked in row blocks to keep fp64 temporaries small."""
    d = 11008
    m = torch.empty(d, d, dtype=m_dtype, device=backend.device).uniform_(-0.5, 0.5)
    m = m + m.t()  # exactly symmetric
    u = backend.randn(d, g=g, scale=0.1)
    beta, denom = draw_beta_denom(g)
    m0 = m.clone()
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    coef = sherman_morrison_coef(beta, denom)
    u64 = u.to(m_dtype).double()
    eps = torch.finfo(m_dtype).eps
    for r in range(0, d, 1024):
        rows = slice(r, r + 1024)
        outer = torch.outer(u64[rows], u64)
        exact = m0[rows].double() - coef * outer
        bound = (m0[rows].double().abs() + 2.0 * abs(coef) * outer.abs()) * eps
        assert ((m[rows].double() - exact).abs() <= bound).all(), f"rows {r}..{r + 1024}"
    assert same_bits(m, m.t())


@pytest.mark.parametrize("case", list(SYM_GUARD_CASES))
@backends("d,combos", "sym_refused")
def test_symmetric_rank_one_update_refused(backend, g, d, combos, case):
    """A refused update returns False and leaves the matrix bit for bit as it was (on CUDA on the
    element path, 13, and the vector path, 64)."""
    beta, denom, floor, poison = SYM_GUARD_CASES[case]
    for m_dtype, form in combos:
        m = sym_matrix(backend, d, m_dtype, g)
        u = backend.randn(d, g=g, dtype=m_dtype)
        plant_in_u(u, poison)
        m0 = m.clone()
        s = backend.scalar
        flag = ops.symmetric_rank_one_update(m, u, s(beta, form), s(denom, form), min_denom=s(floor, form))
        check_flag(flag, m, False)
        assert same_bits(m, m0), f"a refused update changed the inverse (inverse {m_dtype}, scalars as {form})"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", list(SYM_ACCEPT_CASES))
@backends("d", "sym_small")
def test_symmetric_rank_one_update_accepted_boundaries(backend, g, d, case, form):
    beta, denom, floor = SYM_ACCEPT_CASES[case]
    for m_dtype in ACC_DTYPES:
        m = sym_matrix(backend, d, m_dtype, g)
        u = backend.randn(d, g=g)
        m0 = m.clone()
        s = backend.scalar
        flag = ops.symmetric_rank_one_update(m, u, s(beta, form), s(denom, form), min_denom=s(floor, form))
        check_flag(flag, m, True)
        check_sym_update(m, m0, u, beta, denom)


@pytest.mark.parametrize("form", FORMS)
@backends("d", "sym_small")
def test_symmetric_rank_one_update_zero_beta_writes_nothing(backend, g, d, form):
    """β = 0 is a valid update that changes nothing: applied, and every bit (-0.0 too) in place."""
    for m_dtype in ACC_DTYPES:
        m = sym_matrix(backend, d, m_dtype, g)
        m0 = m.clone()
        check_flag(ops.symmetric_rank_one_update(m, backend.randn(d, g=g), backend.scalar(0.0, form), 3.0), m)
        assert same_bits(m, m0)


@only()
def test_symmetric_rank_one_update_guards_in_the_matrix_dtype(backend, g):
    """u and coef finite in fp64 but not in fp32: refused for an fp32 inverse, applied for fp64."""
    u = backend.tensor([1.0, 1e300, 2.0, 0.5], torch.float64)
    m = sym_matrix(backend, 4, torch.float32, g)
    m0 = m.clone()
    check_flag(ops.symmetric_rank_one_update(m, u, 0.5, 1.0), m, False)
    assert same_bits(m, m0)

    beta = 1e39  # coef = β when denom = 0: above fp32's largest finite value
    u = backend.randn(8, g=g, dtype=torch.float64, scale=1e-20)
    for m_dtype, applied in [(torch.float32, False), (torch.float64, True)]:
        m = sym_matrix(backend, 8, m_dtype, g)
        m0 = m.clone()
        check_flag(ops.symmetric_rank_one_update(m, u, beta, 0.0), m, applied)
        if applied:
            check_sym_update(m, m0, u, beta, 0.0)
        else:
            assert same_bits(m, m0)


@only("cuda")
def test_symmetric_rank_one_update_is_correctly_rounded(backend, g):
    """Every operation correctly rounded and none contracted into an FMA, in the documented order:
    coef = β / (1 + β·denom) in fp64 rounded to the matrix dtype, then m - coef·(u_i·u_j). The result
    equals that computation done here on the CPU bit for bit, on both write paths."""
    for d, m_dtype in [(97, torch.float32), (64, torch.float32), (576, torch.float64), (37, torch.float64)]:
        m = sym_matrix(backend, d, m_dtype, g)
        u = backend.randn(d, g=g, dtype=torch.bfloat16)
        beta, denom = draw_beta_denom(g)
        coef = torch.tensor(beta / (1.0 + beta * denom), dtype=torch.float64).to(m_dtype)
        uc = u.cpu().to(m_dtype)
        want = m.cpu() - coef * (uc[:, None] * uc[None, :])
        check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
        assert same_bits(m.cpu(), want), f"d {d}, {m_dtype}"


@only()
def test_symmetric_rank_one_update_empty(backend):
    for dtype in ACC_DTYPES:
        m = torch.zeros(0, 0, dtype=dtype, device=backend.device)
        check_flag(ops.symmetric_rank_one_update(m, backend.tensor([]), 1.0, 1.0), m, True)


@one_thread()
def relative_error(m, want):
    return ((m.double().cpu() - want).norm() / want.norm()).item()


def inverse_unit(cond, d, dtype):
    """The error scale of an inverse solved against and updated at ``dtype``'s eps: as in
    check_solve, a perturbed inverse moves a solve by up to ~cond·sqrt(d)·eps."""
    return cond * (math.sqrt(d) + 1.0) * torch.finfo(dtype).eps


# An addition is within 2 units (measured: at most 0.2). A removal is a downdate: 1 - β·uᵀk of the
# new inverse is 1 / (1 + β·uᵀk) of the old one, so its rounding errors grow by that amplification
# (hence the periodic refactorisation of the edit memory); within 4 units per amplification
# (measured: at most 0.6).
ADD_UNITS, REMOVE_UNITS = 2.0, 4.0


@backends("d,m_dtype,strength", "sym_key")
def test_symmetric_rank_one_update_adds_and_removes_a_key(backend, g, d, m_dtype, strength):
    """From A⁻¹ of a random SPD A: the update for key k gives (A + βkkᵀ)⁻¹, and the removal (-β,
    with u and uᵀk of the new inverse) gives A⁻¹ back. β·uᵀk is 1 ("moderate") or ~d ("strong",
    β = 2 with keys of A's scale, as real keys are against C)."""
    c, cond = make_spd(d, g)
    k = backend.randn(d, g=g, dtype=torch.float64)
    m = inverse_of(c).to(m_dtype).to(backend.device)
    unit = inverse_unit(cond, d, m_dtype)

    u, denom = ops.solve_keys(m, k)
    beta = 1.0 / float(denom) if strength == "moderate" else 2.0
    amplification = 1.0 + beta * float(denom)
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    want = inverse_of(c + beta * torch.outer(k.cpu(), k.cpu()))
    assert same_bits(m, m.t())
    err = relative_error(m, want)
    assert err <= ADD_UNITS * unit, f"addition: relative error {err:.3e} > {ADD_UNITS * unit:.3e}"
    # The tolerance tells an applied update from none at all.
    assert relative_error(inverse_of(c), want) > 10 * ADD_UNITS * unit

    u, denom = ops.solve_keys(m, k)
    check_flag(ops.symmetric_rank_one_update(m, u, -beta, denom), m, True)
    assert same_bits(m, m.t())
    err, tol = relative_error(m, inverse_of(c)), REMOVE_UNITS * unit * amplification
    assert err <= tol, f"removal: relative error {err:.3e} > {tol:.3e} (amplification {amplification:.1f})"
    if strength == "moderate":
        assert relative_error(want, inverse_of(c)) > 10 * tol


@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
@only()
def test_symmetric_rank_one_update_keeps_an_edit_memory(backend, g, m_dtype):
    """Five keys added one after another give (C + β Σ k kᵀ)⁻¹; removing them in another order
    gives C⁻¹ back."""
    d, n, beta = 61, 5, 0.5
    c, cond = make_spd(d, g)
    keys = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(n)]
    memory = c + beta * sum(torch.outer(k, k) for k in keys)
    unit = inverse_unit(cond, d, m_dtype)
    m = inverse_of(c).to(m_dtype).to(backend.device)
    amplification = 0.0
    for k in keys:
        u, denom = ops.solve_keys(m, k.to(backend.device))
        amplification += 1.0 + beta * float(denom)
        check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    assert same_bits(m, m.t())
    assert relative_error(m, inverse_of(memory)) <= ADD_UNITS * unit * n
    for i in (2, 0, 4, 1, 3):
        u, denom = ops.solve_keys(m, keys[i].to(backend.device))
        check_flag(ops.symmetric_rank_one_update(m, u, -beta, denom), m, True)
    assert same_bits(m, m.t())
    assert relative_error(m, inverse_of(c)) <= REMOVE_UNITS * unit * amplification


@only()
def test_symmetric_rank_one_update_refuses_removing_an_absent_key(backend):
    """Removing a key A does not hold drives 1 - β·uᵀk to or below 0 once β·uᵀk >= 1: refused."""
    d = 9
    m = torch.eye(d, dtype=torch.float64, device=backend.device)  # A = I: u = k, uᵀk = |k|²
    k = torch.zeros(d, dtype=torch.float64, device=backend.device)
    k[0] = 2.0  # uᵀk = 4
    m0 = m.clone()
    check_flag(ops.symmetric_rank_one_update(m, k.clone(), -0.25, 4.0), m, False)  # 1 - 1 = 0
    check_flag(ops.symmetric_rank_one_update(m, k.clone(), -0.5, 4.0), m, False)  # 1 - 2 < 0
    assert same_bits(m, m0)


@only()
def test_symmetric_rank_one_update_exact_small_case(backend):
    """By hand: A = I (2×2), k = (1, 1), β = 1: (I + kkᵀ)⁻¹ = I - kkᵀ/3."""
    m = torch.eye(2, dtype=torch.float64, device=backend.device)
    k = torch.ones(2, dtype=torch.float64, device=backend.device)
    check_flag(ops.symmetric_rank_one_update(m, k.clone(), 1.0, 2.0), m, True)
    want = backend.tensor([[1 - 1 / 3, -1 / 3], [-1 / 3, 1 - 1 / 3]], torch.float64)
    torch.testing.assert_close(m, want, rtol=0, atol=2 * F64_EPS)


# ----------------------------------------------------------------------------------------------
# torch.library checks, no host synchronisation, raw CUDA ops
# ----------------------------------------------------------------------------------------------


def _opcheck_cases(backend, g):
    d = 6
    c, _ = make_spd(d, g)
    inv64 = inverse_of(c).to(backend.device)
    mask = backend.tensor([True, False, True, True, False], torch.bool)
    one, zero = backend.tensor(1.0), backend.tensor(0.0)
    one64, zero64 = one.double(), zero.double()
    w32, w16 = backend.randn(4, d, g=g), backend.randn(4, d, g=g, dtype=torch.bfloat16)
    r = backend.randn
    return {
        "second_moment_accumulate": [
            (random_symmetric(backend, d, torch.float32, g), r(5, d, g=g), None),
            (random_symmetric(backend, d, torch.float64, g), r(5, d, g=g, dtype=torch.bfloat16), mask),
        ],
        "solve_keys": [(inv64, r(d, g=g)), (inv64.float(), r(3, d, g=g, dtype=torch.bfloat16))],
        "rank_one_update": [
            (w32, r(d, g=g), r(4, g=g), one, zero, None),
            (w16, r(d, g=g), r(4, g=g), one64, zero64, r(4, d, g=g)),
            (w32.clone(), r(d, g=g), r(4, g=g), -one, zero, None),  # a refused write
        ],
        "symmetric_rank_one_update": [
            (random_symmetric(backend, d, torch.float32, g), r(d, g=g), one * 0.5, one * 2.0, zero),
            (inv64.clone(), r(d, g=g, dtype=torch.bfloat16), -one64 * 0.25, one, zero64),
            (inv64.clone(), r(d, g=g), one, -one, zero),  # 1 + β·uᵀk = 0: refused
        ],
    }


@pytest.mark.parametrize("op", ops.OPS)
@only("reference", "cpp", "cuda")
def test_opcheck(backend, g, op):
    for args in _opcheck_cases(backend, g)[op]:
        result = torch.library.opcheck(getattr(torch.ops.fastrome, op).default, args)
        assert result and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("op", ops.OPS)
@only("cuda")
def test_cuda_kernel_registered(backend, op):
    """One op namespace: torch.ops.fastrome has a kernel for CUDA tensors, which serves the compiled CUDA kernel."""
    assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"fastrome::{op}", "CUDA")
    assert callable(getattr(_extension.cuda_kernels(), op))
    assert ops.select_backend(op, backend.device) == "cuda"


@only("cuda")
def test_no_host_sync(backend, g):
    """torch's sync debug mode raises on any synchronising CUDA call inside the ops (an .item(),
    a nonzero() for the mask, a copy to the host)."""
    d, r = 64, backend.randn
    acc = random_symmetric(backend, d, torch.float32, g)
    x = r(20, d, g=g, dtype=torch.bfloat16)
    mask = (torch.rand(20, generator=g) < 0.5).to(backend.device)
    inverse = random_symmetric(backend, d, torch.float64, g)
    k = r(3, d, g=g)
    w, master = r(32, d, g=g, dtype=torch.bfloat16), r(32, d, g=g)
    u, lam = r(d, g=g), r(32, g=g)
    denom, min_denom = backend.tensor(1.0), backend.tensor(0.0)
    beta = backend.tensor(0.5, torch.float64)
    ops.solve_keys(inverse, k)  # warm up lazy initialisation (cuBLAS handles, ...) outside the check
    ops.second_moment_accumulate(acc.clone(), x, mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.second_moment_accumulate(acc, x, mask)
        ops.solve_keys(inverse, k)
        flag = ops.rank_one_update(w, u, lam, denom=denom, min_denom=min_denom, master=master)
        sym_flag = ops.symmetric_rank_one_update(inverse, u, beta, denom, min_denom=min_denom)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(flag) and bool(sym_flag)


def _raw_cases(dev):
    raw, cpu = _extension.cuda_kernels(), torch.device("cpu")
    acc, x = torch.eye(4, device=dev), torch.ones(3, 4, device=dev)
    inv, k = torch.eye(4, dtype=torch.float64, device=dev), torch.ones(4, device=dev)
    w, u, lam = torch.zeros(3, 4, device=dev), torch.ones(4, device=dev), torch.ones(3, device=dev)
    one, zero = torch.tensor(1.0, device=dev), torch.tensor(0.0, device=dev)
    sma, solve = raw.second_moment_accumulate, raw.solve_keys
    r1u, sru = raw.rank_one_update, raw.symmetric_rank_one_update
    expanded = torch.zeros(1, 4, device=dev).expand
    return {
        "sma_x_on_cpu": (lambda: sma(acc, x.to(cpu), None), "x: expected a CUDA tensor"),
        "sma_mask_on_cpu": (lambda: sma(acc, x, torch.ones(3, dtype=torch.bool)), "mask: expected a CUDA tensor"),
        "sma_acc_bf16": (lambda: sma(acc.bfloat16(), x, None), "acc: expected float32 or float64, got BFloat16"),
        "sma_x_wrong_d": (lambda: sma(acc, torch.ones(3, 5, device=dev), None), "x: expected shape (n, 4), got [3, 5]"),
        "sma_acc_expanded": (lambda: sma(expanded(4, 4), x, None), "acc: elements overlap"),
        "solve_k_on_cpu": (lambda: solve(inv, k.to(cpu)), "k: expected a CUDA tensor"),
        "solve_k_wrong_d": (
            lambda: solve(inv, torch.ones(5, device=dev)),
            "k: expected (4,) or (b, 4) floating point, got Float [5]",
        ),
        "solve_inverse_fp16": (
            lambda: solve(inv.half(), k),
            "inverse: expected a square float32/float64 matrix, got Half",
        ),
        "r1u_u_on_cpu": (lambda: r1u(w, u.to(cpu), lam, one, zero, None), "u: expected a CUDA tensor"),
        "r1u_denom_on_cpu": (lambda: r1u(w, u, lam, one.to(cpu), zero, None), "denom: expected a CUDA tensor"),
        "r1u_master_wrong_shape": (
            lambda: r1u(w, u, lam, one, zero, torch.zeros(4, 3, device=dev)),
            "master: expected float32/float64 of sizes [3, 4], got Float [4, 3]",
        ),
        "r1u_u_wrong_len": (
            lambda: r1u(w, torch.ones(5, device=dev), lam, one, zero, None),
            "u: expected (4,) floating point, got Float [5]",
        ),
        "r1u_denom_int": (
            lambda: r1u(w, u, lam, torch.tensor(1, device=dev), zero, None),
            "denom and min_denom: expected floating-point scalars, got Long and Float",
        ),
        "r1u_weight_expanded": (lambda: r1u(expanded(3, 4), u, lam, one, zero, None), "weight: elements overlap"),
        "sru_u_on_cpu": (lambda: sru(inv.clone(), k.to(cpu), one, one, zero), "u: expected a CUDA tensor"),
        "sru_beta_on_cpu": (lambda: sru(inv.clone(), k, one.to(cpu), one, zero), "beta: expected a CUDA tensor"),
        "sru_inverse_bf16": (
            lambda: sru(inv.bfloat16(), k, one, one, zero),
            "inverse: expected a square float32/float64 matrix, got BFloat16",
        ),
        "sru_u_wrong_len": (
            lambda: sru(inv.clone(), torch.ones(5, device=dev), one, one, zero),
            "u: expected (4,) floating point, got Float [5]",
        ),
        "sru_scalar_int": (
            lambda: sru(inv.clone(), k, torch.tensor(1, device=dev), one, zero),
            "beta, denom and min_denom: expected floating-point scalars, got Long, Float and Float",
        ),
        "sru_inverse_expanded": (lambda: sru(expanded(4, 4), k, one, one, zero), "inverse: elements overlap"),
        "sru_u_row_of_inverse": (
            lambda: (lambda m: sru(m, m[1], one, one, zero))(inv.clone()),
            "u: shares memory with inverse",
        ),
    }


RAW_CASES = [
    "sma_x_on_cpu", "sma_mask_on_cpu", "sma_acc_bf16", "sma_x_wrong_d", "sma_acc_expanded",
    "solve_k_on_cpu", "solve_k_wrong_d", "solve_inverse_fp16",
    "r1u_u_on_cpu", "r1u_denom_on_cpu", "r1u_master_wrong_shape", "r1u_u_wrong_len", "r1u_denom_int",
    "r1u_weight_expanded",
    "sru_u_on_cpu", "sru_beta_on_cpu", "sru_inverse_bf16", "sru_u_wrong_len", "sru_scalar_int",
    "sru_inverse_expanded", "sru_u_row_of_inverse",
]  # fmt: skip


@pytest.mark.parametrize("case", RAW_CASES)
@only("cuda")
def test_raw_op_argument_checks(backend, case):
    """The CUDA kernels check their own arguments (messages carry the values) and raise
    ValueError before touching anything."""
    call, needle = _raw_cases(backend.device)[case]
    with pytest.raises(ValueError, match=re.escape(needle)):
        call()


# ----------------------------------------------------------------------------------------------
# Triton backend selection, environment
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def triton_servable(monkeypatch):
    """The Triton kernels servable for their device (interpreted on the CPU), not forced."""
    kb = BACKENDS["triton"]
    if kb.why_not is not None:
        pytest.skip(f"triton: {kb.why_not}")
    with serving(kb, monkeypatch):
        pass  # checks that it is servable; the environment stays set until the test's teardown
    yield kb


@pytest.mark.skipif("triton" not in kernel_checks.SELECTED, reason="triton not selected")
def test_select_backend_serves_triton_device(triton_servable):
    """Automatic choice never picks Triton for CPU tensors (not in the CPU preference), but forcing it
    there works under the interpreter; the functions dispatched to are the ones loaded here."""
    dev = triton_servable.device
    for op in ops.OPS:
        assert ops.select_backend(op, "cuda") in ("cuda", "triton")
        with ops.use_backend("triton"):
            assert ops.select_backend(op, dev) == "triton"
            assert ops.BACKENDS["triton"].impls()[op].__module__.startswith("fastrome.kernels.")
    if TRITON_INTERPRETED:
        assert ops.select_backend("solve_keys", "cpu") != "triton"
        assert "cpu" in ops.BACKENDS["triton"].device_types()


@pytest.mark.skipif("triton" not in kernel_checks.SELECTED, reason="triton not selected")
def test_backend_table_lists_triton(triton_servable, monkeypatch):
    rows = ops.backend_table(("cpu", "cuda"))
    cuda_available = ops.BACKENDS["cuda"].available()
    for row in rows:
        if row["device"] == "cuda":
            assert row["backend"] == ("cuda" if cuda_available else "triton"), row
            assert "triton" not in row["skipped"]
    with ops.use_backend("triton"):
        rows = ops.backend_table((triton_servable.device.type,))
        assert all(r["backend"] == "triton" for r in rows), rows

    # Without Triton it is listed as unavailable, with the reason and how to get it.
    monkeypatch.setitem(sys.modules, "triton", None)
    assert "pip install triton" in ops.BACKENDS["triton"].unavailable()
    rows = ops.backend_table(("cuda",))
    for row in rows:
        assert row["backend"] == ("cuda" if cuda_available else "reference"), row
        if not cuda_available:
            assert "Triton is not installed" in row["skipped"]["triton"]
    with ops.use_backend("triton"):
        assert all(r["backend"].startswith("error:") and "Triton" in r["backend"] for r in ops.backend_table(("cuda",)))


def test_environment_left_as_found():
    """No test leaves TRITON_INTERPRET or a forced backend behind."""
    assert os.environ.get("TRITON_INTERPRET") == TRITON_ENV_AT_IMPORT
    assert ops.forced_backend() is None
