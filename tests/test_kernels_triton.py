"""Tests of the Triton kernels (``fastrome.kernels``) through the public ops.

With a CUDA device they run compiled on CUDA tensors. Without one they run on CPU tensors under
Triton's interpreter. Triton fixes interpretation when it decorates a function, its own library
(``tl.zeros``, ``tl.sum``, ...) included, so this module imports Triton and the kernel modules
with ``TRITON_INTERPRET=1`` set for the import only, and sets it again for each test
(``fastrome.ops`` serves CPU tensors with Triton only while it is set; ``tests/test_ops.py`` checks
the refusal without it). If something imported Triton uninterpreted before this module was
collected, the module is skipped: run it on its own.

Every numerical check compares against an independent float64 computation made here (never
against :mod:`fastrome.reference`), on fresh inputs seeded per test. The interpreter is slow, so
row counts stay small.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import zlib

import kernel_checks
import pytest
import torch
from kernel_checks import (
    ACC_DTYPES,
    ACCEPT_CASES,
    F32_EPS,
    F64_EPS,
    GUARD_CASES,
    SCALAR_FORMS,
    SYM_ACCEPT_CASES,
    SYM_GUARD_CASES,
    W_DTYPES,
    apply_poison,
    check_master_update,
    check_rounded_update,
    check_symmetric_update,
    plant_in_u,
    poison_negative_zeros,
    random_symmetric_matrix,
    rank_one_bounds,
    same_bits,
    symmetric_update_bounds,
)

from fastrome import ops


def as_scalar(value, form):
    return kernel_checks.as_scalar(value, form, device=DEVICE)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"
KERNEL_MODULES = (
    "fastrome.kernels.rank_one_update",
    "fastrome.kernels.second_moment",
    "fastrome.kernels.solve_keys",
    "fastrome.kernels.symmetric_rank_one_update",
)
ENV_AT_IMPORT = os.environ.get("TRITON_INTERPRET")


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def _import_kernels():
    if not INTERPRETED:
        pytest.importorskip("triton")
        return [importlib.import_module(name) for name in KERNEL_MODULES]
    imported = sys.modules.get("triton")
    if imported is not None and not _interpreted(imported.language.zeros):
        pytest.skip(
            "Triton was imported without TRITON_INTERPRET=1 before this module, so its CPU interpreter "
            "cannot run here; run tests/test_kernels_triton.py on its own",
            allow_module_level=True,
        )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        pytest.importorskip("triton")
        modules = [importlib.import_module(name) for name in KERNEL_MODULES]
    kernels = [v for m in modules for k, v in vars(m).items() if k.endswith("_kernel")]
    if not all(_interpreted(k) for k in kernels):
        pytest.skip("the kernel modules were imported uninterpreted before this module", allow_module_level=True)
    return modules


KERNELS = _import_kernels()


# Guard tests feed NaN/Inf and fp32-overflowing values on purpose; numpy, which runs the
# interpreted kernels, warns about them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def triton_env(monkeypatch):
    """The Triton kernels servable for DEVICE (interpreted on the CPU), not forced."""
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        for mod in KERNELS:
            monkeypatch.setitem(sys.modules, mod.__name__, mod)
    yield DEVICE


@pytest.fixture
def device(triton_env):
    """Force the Triton backend for the test; yields the device its tensors go to."""
    with ops.use_backend("triton"):
        for op in ops.OPS:
            assert ops.select_backend(op, DEVICE) == "triton"
        yield DEVICE


@pytest.fixture
def g(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def kernel_module(short: str):
    """The kernel module the ops dispatch to."""
    return sys.modules[f"fastrome.kernels.{short}"]


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    """Normal draws made on the CPU (reproducible) and moved to DEVICE."""
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def random_symmetric(d, dtype, g):
    a = randn(d, d, g=g, dtype=dtype)
    return a + a.t()  # exactly symmetric: addition commutes


@contextlib.contextmanager
def one_thread():
    """Run the test's own LAPACK oracles single-threaded (a threaded eigvalsh can stall for
    seconds in OpenMP barriers on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# second_moment_accumulate
# ----------------------------------------------------------------------------------------------


def expected_moment(acc0, parts):
    """fp64 ``acc0 + Σ xᵀx`` over the masked rows of each (x, mask), the elementwise scale
    ``|acc0| + Σ |x|ᵀ|x|`` bounding the rounding error of any order of summation, and the row count."""
    exp = acc0.double().cpu().clone()
    scale = exp.abs()
    n = 0
    for x, mask in parts:
        r = x.double().cpu()
        if mask is not None:
            r = r[mask.cpu()]
        exp += r.t() @ r
        scale += r.abs().t() @ r.abs()
        n += r.shape[0]
    return exp, scale, n


def moment_within_tol(acc, exp, scale, n) -> torch.Tensor:
    # fp32 arithmetic on the rounded inputs: a blocked sum's error grows like sqrt(n) in practice.
    # 4·sqrt(n)+8 units of the elementwise scale stays 100x below one bf16 rounding at these n
    # (see test_moment_tolerance_rejects_bf16_accumulation).
    tol = F32_EPS * (4.0 * math.sqrt(max(n, 1)) + 8.0) * scale
    return (acc.double().cpu() - exp).abs() <= tol


def check_moment(acc, acc0, parts):
    exp, scale, n = expected_moment(acc0, parts)
    ok = moment_within_tol(acc, exp, scale, n)
    assert torch.isfinite(acc).all()
    assert ok.all(), (
        f"{int((~ok).sum())}/{ok.numel()} elements off; max |err|/scale = "
        f"{((acc.double().cpu() - exp).abs() / scale.clamp_min(1e-300)).max().item():.3e} (n {n})"
    )
    assert same_bits(acc, acc.t()), "acc is not exactly symmetric"


X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = {1: 5, 7: 70, 13: 33, 67: 70, 131: 41, 576: 19}


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("d", sorted(ROWS))
def test_second_moment_sizes(device, g, d, x_dtype, acc_dtype):
    n = ROWS[d]
    acc0 = random_symmetric(d, acc_dtype, g)
    x = randn(n, d, g=g, dtype=x_dtype)
    acc = acc0.clone()
    assert ops.second_moment_accumulate(acc, x) is acc
    check_moment(acc, acc0, [(x, None)])


@pytest.mark.parametrize("x_dtype,acc_dtype", [(torch.bfloat16, torch.float64), (torch.float32, torch.float32)],
                         ids=str)
def test_second_moment_wide(device, g, x_dtype, acc_dtype):
    """d = 1536: many tiles, the last one partial at 128-wide tiles."""
    d, n = 1536, 9
    acc0 = random_symmetric(d, acc_dtype, g)
    x = randn(n, d, g=g, dtype=x_dtype)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x)
    check_moment(acc, acc0, [(x, None)])


@pytest.mark.parametrize("x_layout", ["column_slice", "transposed", "row_strided"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [67, 131])
def test_second_moment_noncontiguous_x(device, g, d, x_dtype, x_layout):
    n = 45
    if x_layout == "column_slice":
        x = randn(n, d + 9, g=g, dtype=x_dtype)[:, 4 : 4 + d]
    elif x_layout == "transposed":
        x = randn(d, n, g=g, dtype=x_dtype).t()
    else:
        x = randn(2 * n, d, g=g, dtype=x_dtype)[::2]
    assert not x.is_contiguous() and x.shape == (n, d)
    x_before = x.clone()
    acc0 = random_symmetric(d, torch.float32, g)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x)
    check_moment(acc, acc0, [(x, None)])
    assert same_bits(x, x_before)


def plant_negative_zeros(acc):
    """Symmetric -0.0 entries (off the diagonal and on it): a call that adds nothing keeps them."""
    d = acc.shape[0]
    for i, j in [(0, d - 1), (d // 2, d // 3), (d - 1, d - 1)]:
        acc[i, j] = -0.0
        acc[j, i] = -0.0


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("which", ["all", "none", "some", "one", "some_strided_mask"])
@pytest.mark.parametrize("d", [7, 131])
def test_second_moment_mask(device, g, d, which, acc_dtype):
    n = 61
    x = randn(n, d, g=g, dtype=torch.bfloat16)
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
        mask = (torch.rand(2 * n, generator=g) < 0.4)[::2]
    mask = mask.to(DEVICE)
    assert 0 < int(mask.sum()) < n or which in ("all", "none")
    mask_before = mask.clone()
    acc0 = random_symmetric(d, acc_dtype, g)
    plant_negative_zeros(acc0)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x, mask)
    if which == "none":
        assert same_bits(acc, acc0), "a mask selecting no row changed acc"
    check_moment(acc, acc0, [(x, mask)])
    assert torch.equal(mask, mask_before)
    if which == "some":
        # Rows left out must not count: their contribution is far above the tolerance.
        exp_all, scale, _ = expected_moment(acc0, [(x, None)])
        assert not moment_within_tol(acc, exp_all, scale, n).all()


def test_second_moment_no_rows(device, g):
    acc0 = random_symmetric(13, torch.float64, g)
    plant_negative_zeros(acc0)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, randn(0, 13, g=g, dtype=torch.bfloat16))
    assert same_bits(acc, acc0)


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [13, 576])
def test_second_moment_accumulates_twice(device, g, d, acc_dtype):
    acc0 = random_symmetric(d, acc_dtype, g)
    x1 = randn(29, d, g=g, dtype=torch.float16)
    m1 = (torch.rand(29, generator=g) < 0.5).to(DEVICE)
    x2 = randn(17, d + 3, g=g, dtype=torch.float32)[:, 3:]
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x1, m1)
    ops.second_moment_accumulate(acc, x2)
    check_moment(acc, acc0, [(x1, m1), (x2, None)])


def test_second_moment_strided_acc(device, g):
    """acc may be a view into a larger buffer; nothing outside it is touched."""
    d = 131
    base = random_symmetric(d + 5, torch.float32, g)
    acc = base[2 : 2 + d, 2 : 2 + d]
    inside = torch.zeros(base.shape, dtype=torch.bool, device=DEVICE)
    inside[2 : 2 + d, 2 : 2 + d] = True
    base0, acc0 = base.clone(), acc.clone()
    x = randn(40, d, g=g, dtype=torch.bfloat16)
    ops.second_moment_accumulate(acc, x)
    check_moment(acc, acc0, [(x, None)])
    assert same_bits(base[~inside], base0[~inside])


def test_second_moment_fp64_acc_keeps_fp64_precision(device, g):
    """An fp64 acc receives the fp32 row sums flush by flush, in fp64.

    The first flush period holds rows of ±4096 (their sums are exact in fp32, ~2^30); the rows after
    it are of order 1. A single fp32 running sum would lose them (half an fp32 ulp of 2^30 is 64);
    the fp64 acc must keep them to fp32 precision of *their own* size. An fp32 acc, run alike, fails
    the same check, so the check can tell the two apart.
    """
    flush = kernel_module("second_moment").flush_rows()
    d, n = 13, 2 * flush + 7
    signs = torch.randint(0, 2, (flush, d), generator=g).double() * 2 - 1
    big = (4096.0 * signs).to(torch.bfloat16)
    small = (torch.rand(n - flush, d, generator=g, dtype=torch.float64) + 0.5).to(torch.bfloat16)
    x = torch.cat([big, small]).to(DEVICE)
    acc0 = torch.zeros(d, d, dtype=torch.float64, device=DEVICE)
    exp, _, _ = expected_moment(acc0, [(x, None)])
    s = small.double()
    tol = F32_EPS * (4.0 * math.sqrt(n) + 8.0) * (s.t() @ s) + 4.0 * F64_EPS * exp.abs()

    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x)
    err = (acc.cpu() - exp).abs()
    assert (err <= tol).all(), f"max err {err.max().item():.3e}"
    assert same_bits(acc, acc.t())

    acc32 = acc0.float()
    ops.second_moment_accumulate(acc32, x)
    assert not ((acc32.double().cpu() - exp).abs() <= tol).all(), "the check cannot tell fp32 from fp64"


def test_second_moment_fp64_x_goes_to_reference(device, g):
    """fp64 x is not a kernel case; the fp64 product it gets is exact to fp64."""
    d, n = 13, 20
    x = randn(n, d, g=g, dtype=torch.float64)
    acc0 = random_symmetric(d, torch.float64, g)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x)
    exp, scale, _ = expected_moment(acc0, [(x, None)])
    assert ((acc.cpu() - exp).abs() <= 16 * n * F64_EPS * scale).all()
    assert same_bits(acc, acc.t())


def test_moment_tolerance_rejects_bf16_accumulation(g):
    """The tolerance of check_moment is tight enough that a bf16 running sum fails it, and so does a
    single bf16 rounding of an exact fp32 product."""
    d, n = 13, 64
    x = randn(n, d, g=g, dtype=torch.bfloat16).cpu()
    acc0 = random_symmetric(d, torch.float32, g).cpu()
    s = torch.zeros(d, d, dtype=torch.bfloat16)
    for row in x.float():
        s = (s.float() + torch.outer(row, row)).bfloat16()
    exp, scale, _ = expected_moment(acc0, [(x, None)])
    assert not moment_within_tol(acc0 + s.float(), exp, scale, n).all()
    once = (x.float().t() @ x.float()).bfloat16().float()
    assert not moment_within_tol(acc0 + once, exp, scale, n).all()


# ----------------------------------------------------------------------------------------------
# solve_keys
# ----------------------------------------------------------------------------------------------


def make_spd(d, g, ridge=0.1):
    """C = A Aᵀ + ridge·I (fp64, CPU) and its condition number."""
    a = torch.randn(d, 2 * d + 1, generator=g, dtype=torch.float64) / math.sqrt(2 * d + 1)
    c = a @ a.t() + ridge * torch.eye(d, dtype=torch.float64)
    with one_thread():
        ev = torch.linalg.eigvalsh(c)
    return c, (ev[-1] / ev[0]).item()


def inverse_of(c):
    with one_thread():
        inv = torch.cholesky_inverse(torch.linalg.cholesky(c))
    return 0.5 * (inv + inv.t())


def check_solve(u, denom, inverse, c, cond, k):
    d = c.shape[0]
    out_dtype = torch.promote_types(k.dtype, torch.float32)
    assert u.dtype == out_dtype and denom.dtype == out_dtype
    assert u.shape == k.shape and denom.shape == k.shape[:-1]
    assert u.device == k.device and denom.device == k.device
    assert torch.isfinite(u).all() and torch.isfinite(denom).all()

    k64 = k.double().cpu()
    u64 = u.double().cpu()
    with one_thread():
        want = torch.linalg.solve(c, k64.reshape(-1, d).t()).t().reshape(k.shape)
    # An inverse rounded and accumulated at eps_a perturbs u by up to ~cond·sqrt(d)·eps_a
    # relatively; rounding u to the output dtype adds eps_out.
    eps_a = torch.finfo(inverse.dtype).eps
    eps_out = torch.finfo(out_dtype).eps
    tol = 4.0 * cond * (math.sqrt(d) + 1.0) * eps_a + 2.0 * eps_out
    err = (u64 - want).norm(dim=-1) / want.norm(dim=-1)
    assert (err <= tol).all(), f"relative error {err.max().item():.3e} > {tol:.3e} (cond {cond:.1f})"

    # denom is Σ u·k from the returned, rounded u, summed in fp64 and rounded once.
    prods = u64 * k64
    want_denom = prods.sum(-1)
    dtol = eps_out * want_denom.abs() + 4.0 * d * F64_EPS * prods.abs().sum(-1)
    assert ((denom.double().cpu() - want_denom).abs() <= dtol).all()
    assert (denom > 0).all()  # kᵀC⁻¹k of an SPD C and a nonzero key


@pytest.mark.parametrize("batch", [None, 3], ids=["single", "batch3"])
@pytest.mark.parametrize("k_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("inverse_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("d", [1, 13, 67, 576])
def test_solve_keys(device, g, d, inverse_dtype, k_dtype, batch):
    c, cond = make_spd(d, g)
    inverse = inverse_of(c).to(inverse_dtype).to(DEVICE)
    k = randn(*(() if batch is None else (batch,)), d, g=g, dtype=k_dtype)
    inverse0, k0 = inverse.clone(), k.clone()
    u, denom = ops.solve_keys(inverse, k)
    check_solve(u, denom, inverse, c, cond, k)
    assert same_bits(inverse, inverse0) and same_bits(k, k0)


@pytest.mark.parametrize("k_layout", ["strided_1d", "transposed_2d", "column_slice_2d", "row_strided_2d"])
@pytest.mark.parametrize("inverse_layout", ["column_major", "sliced"])
def test_solve_keys_noncontiguous(device, g, k_layout, inverse_layout):
    d, b = 67, 4
    c, cond = make_spd(d, g)
    if inverse_layout == "column_major":
        inverse = inverse_of(c).t().contiguous().t().to(DEVICE)
        assert not inverse.is_contiguous()
    else:
        big = torch.full((d + 3, d + 5), float("nan"), dtype=torch.float64)
        big[2 : 2 + d, 1 : 1 + d] = inverse_of(c)
        inverse = big.to(DEVICE)[2 : 2 + d, 1 : 1 + d]
        assert not inverse.is_contiguous() and not inverse.t().is_contiguous()
    if k_layout == "strided_1d":
        k = randn(3 * d, g=g)[::3]
    elif k_layout == "transposed_2d":
        k = randn(d, b, g=g, dtype=torch.bfloat16).t()
    elif k_layout == "column_slice_2d":
        k = randn(b, d + 6, g=g)[:, 2 : 2 + d]
    else:
        k = randn(2 * b, d, g=g, dtype=torch.float64)[::2]
    assert not k.is_contiguous() and k.shape[-1] == d
    u, denom = ops.solve_keys(inverse, k)
    check_solve(u, denom, inverse, c, cond, k)


def test_solve_keys_exact_small_case(device):
    """A tiny case by hand (rows against columns, and the fused denominator)."""
    a = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 3.0, 0.25], [0.5, 0.25, 1.0]], dtype=torch.float64, device=DEVICE)
    k = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64, device=DEVICE)
    want = torch.tensor([2.0 + 2.0 + 2.0, -1.0 - 6.0 + 1.0, 0.5 - 0.5 + 4.0], dtype=torch.float64, device=DEVICE)
    u, denom = ops.solve_keys(a, k)
    torch.testing.assert_close(u, want, rtol=0, atol=0)
    torch.testing.assert_close(denom, (want * k).sum(), rtol=0, atol=0)


def test_solve_keys_denominator_from_rounded_u(device, g):
    """fp64 inverse, fp32 key: u is rounded to fp32 and denom is Σ u_rounded·k in fp64, rounded once."""
    d = 131
    c, _ = make_spd(d, g)
    inverse = inverse_of(c).to(DEVICE)
    k = randn(2, d, g=g)
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
    a = torch.tensor([[1 / 3, 0.0], [0.0, -1 / 3 - 2.0**-40]], dtype=torch.float64, device=DEVICE)
    u, denom = ops.solve_keys(a, torch.ones(2, device=DEVICE))
    r = torch.tensor(1 / 3, dtype=torch.float32)
    assert torch.equal(u.cpu(), torch.stack([r, -r])) and denom.item() == 0.0


# ----------------------------------------------------------------------------------------------
# rank_one_update
# ----------------------------------------------------------------------------------------------


def layout(kind: str, rows: int, cols: int):
    """``(base_shape, view_of)``: how a (rows, cols) matrix is stored in layout ``kind``."""
    return {
        "contiguous": ((rows, cols), lambda b: b),
        "transposed": ((cols, rows), lambda b: b.t()),  # GPT-2 Conv1D: stored (d_in, d_out)
        "sliced": ((rows + 3, 2 * cols + 1), lambda b: b[1 : 1 + rows, 1::2]),
    }[kind]


def check_flag(flag, w, applied):
    assert flag.dtype == torch.bool and flag.shape == () and flag.device == w.device
    assert bool(flag) is applied


@pytest.mark.parametrize("use_master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("kind", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (13, 7), (576, 1536)], ids=str)
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
def test_rank_one_update(device, g, w_dtype, shape, kind, use_master):
    d_out, d_in = shape
    base_shape, view_of = layout(kind, d_out, d_in)
    inside = torch.zeros(base_shape, dtype=torch.bool, device=DEVICE)
    view_of(inside).fill_(True)
    u = randn(d_in, g=g, scale=0.1)
    lam = randn(d_out, g=g)
    if use_master:
        m_base = randn(*base_shape, g=g, scale=0.5)
        poison_negative_zeros(m_base)
        master = view_of(m_base)
        # The weight starts as NaN: every element must be written from the master.
        w_base = torch.full(base_shape, math.nan, dtype=w_dtype, device=DEVICE)
        m_base0, master0 = m_base.clone(), master.clone()
    else:
        w_base = randn(*base_shape, g=g, dtype=w_dtype, scale=0.5)
        poison_negative_zeros(w_base)
        master = None
    w = view_of(w_base)
    w_base0, w0 = w_base.clone(), w.clone()
    u0, lam0 = u.clone(), lam.clone()

    flag = ops.rank_one_update(w, u, lam, denom=1.0, min_denom=1e-6, master=master)

    check_flag(flag, w, True)
    if use_master:
        check_master_update(w, master, master0, lam, u)
        assert same_bits(m_base[~inside], m_base0[~inside]), "wrote the master outside the view"
    else:
        exact, bound = rank_one_bounds(w0, lam, u, torch.float64 if w_dtype == torch.float64 else torch.float32)
        check_rounded_update(w, exact, bound)
    assert same_bits(w_base[~inside], w_base0[~inside]), "wrote outside the view"
    assert same_bits(u, u0) and same_bits(lam, lam0)


@pytest.mark.parametrize("master_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
def test_rank_one_update_master_dtypes(device, g, w_dtype, master_dtype):
    """Any fp32/fp64 master with any weight dtype; the master's dtype sets the arithmetic."""
    d_out, d_in = 19, 23
    master = randn(d_out, d_in, g=g, dtype=master_dtype)
    w = torch.full((d_out, d_in), math.nan, dtype=w_dtype, device=DEVICE)
    master0 = master.clone()
    u, lam = randn(d_in, g=g, scale=0.1), randn(d_out, g=g)
    check_flag(ops.rank_one_update(w, u, lam, denom=2.0, min_denom=0.0, master=master), w, True)
    check_master_update(w, master, master0, lam, u)


@pytest.mark.parametrize("w_dtype,mantissa_bits", [(torch.bfloat16, 8), (torch.float16, 11)], ids=str)
def test_rank_one_update_rounds_fp64_master_like_torch(device, g, w_dtype, mantissa_bits):
    """An fp64 master is rounded to bf16/fp16 as ``master.to(dtype)`` rounds it: through fp32.

    The master holds values just above a midpoint of the weight dtype, by less than half an fp32
    step: rounded directly they go up, through fp32 they land on the midpoint and go to even. A zero
    u makes the update add nothing, so the weight is the rounded master.
    """
    n = 512
    b = randn(n, g=g).to(w_dtype).double()
    b = torch.where(b == 0, torch.ones_like(b), b)
    ulp = torch.ldexp(torch.ones_like(b), torch.frexp(b.abs()).exponent - mantissa_bits)
    master = (b + ulp / 2 + ulp * 2.0**-20).reshape(16, 32)
    through_fp32 = master.to(w_dtype)
    directly = (b + ulp * torch.sign(b)).to(w_dtype).reshape(16, 32)  # what one rounding would give
    assert (through_fp32 != directly).sum() > n // 8, "the inputs do not tell the roundings apart"
    w = torch.full((16, 32), math.nan, dtype=w_dtype, device=DEVICE)
    u, lam = torch.zeros(32, device=DEVICE), randn(16, g=g)
    check_flag(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0, master=master), w, True)
    assert same_bits(w, through_fp32)


@pytest.mark.parametrize(
    "u_dtype,lam_dtype",
    [(torch.bfloat16, torch.float64), (torch.float64, torch.float16), (torch.float16, torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_rank_one_update_mixed_and_strided_vectors(device, g, w_dtype, u_dtype, lam_dtype):
    w = randn(11, 17, g=g, dtype=w_dtype)
    u = randn(3 * 17, g=g, dtype=u_dtype, scale=0.1)[::3]
    lam = randn(2 * 11, g=g, dtype=lam_dtype)[1::2]
    w0 = w.clone()
    check_flag(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0), w, True)
    exact, bound = rank_one_bounds(w0, lam, u, torch.float64 if w_dtype == torch.float64 else torch.float32)
    check_rounded_update(w, exact, bound)


def test_rank_one_update_tolerance_rejects_bf16_arithmetic(g):
    """check_rounded_update fails an update whose product is rounded to bf16 before the addition."""
    w0 = randn(64, 96, g=g, dtype=torch.bfloat16, scale=0.5).cpu()
    u, lam = randn(96, g=g, scale=0.1).cpu(), randn(64, g=g).cpu()
    exact, bound = rank_one_bounds(w0, lam, u, torch.float32)
    sloppy = (w0.float() + torch.outer(lam, u).bfloat16().float()).bfloat16()
    with pytest.raises(AssertionError):
        check_rounded_update(sloppy, exact, bound)


@pytest.mark.parametrize("w_dtype,use_master", [(torch.float32, False), (torch.bfloat16, True)], ids=str)
def test_rank_one_update_large(device, g, w_dtype, use_master):
    """A Llama-7B MLP-sized write (4096×11008)."""
    d_out, d_in = 4096, 11008
    u = randn(d_in, g=g, scale=0.02)
    lam = randn(d_out, g=g)
    start = torch.empty(d_out, d_in).uniform_(-0.5, 0.5, generator=g).to(DEVICE)
    if use_master:
        master = start
        w = torch.full((d_out, d_in), math.nan, dtype=w_dtype, device=DEVICE)
    else:
        master = None
        w = start.to(w_dtype)
    before = start.clone()
    flag = ops.rank_one_update(w, u, lam, denom=torch.tensor(3.0), min_denom=torch.tensor(1e-8), master=master)
    check_flag(flag, w, True)
    step = 512  # check in row blocks to keep the fp64 temporaries small
    for r in range(0, d_out, step):
        rows = slice(r, r + step)
        if use_master:
            check_master_update(w[rows], master[rows], before[rows], lam[rows], u)
        else:
            exact, bound = rank_one_bounds(before[rows], lam[rows], u, torch.float32)
            check_rounded_update(w[rows], exact, bound)


@pytest.mark.parametrize("use_master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("case", list(GUARD_CASES))
def test_rank_one_update_refused(device, g, case, use_master):
    denom, min_denom, poison = GUARD_CASES[case]
    d_out, d_in = 9, 14
    # Every weight dtype once, each with a different form of the scalars (all forms are covered
    # across the dtypes; the refused tensors and flags are checked bit for bit each time).
    for w_dtype, form in zip(W_DTYPES, SCALAR_FORMS):
        w = randn(d_out, d_in, g=g, dtype=w_dtype)
        poison_negative_zeros(w)
        master = None
        if use_master:
            master = randn(d_out, d_in, g=g, dtype=torch.float64 if w_dtype == torch.float16 else torch.float32)
            poison_negative_zeros(master)
        u, lam = randn(d_in, g=g), randn(d_out, g=g)
        apply_poison(u, lam, poison)
        w0 = w.clone()
        m0 = None if master is None else master.clone()
        flag = ops.rank_one_update(
            w, u, lam, denom=as_scalar(denom, form), min_denom=as_scalar(min_denom, form), master=master
        )
        where = f"weight {w_dtype}, scalars as {form}"
        check_flag(flag, w, False)
        assert same_bits(w, w0), f"a refused write changed the weight ({where})"
        if master is not None:
            assert same_bits(master, m0), f"a refused write changed the master ({where})"


@pytest.mark.parametrize("form", ["float", "f32", "f64"])
@pytest.mark.parametrize("case", list(ACCEPT_CASES))
def test_rank_one_update_accepted_boundaries(device, g, case, form):
    denom, min_denom = ACCEPT_CASES[case]
    w = randn(6, 5, g=g)
    u, lam = randn(5, g=g), randn(6, g=g)
    w0 = w.clone()
    flag = ops.rank_one_update(w, u, lam, denom=as_scalar(denom, form), min_denom=as_scalar(min_denom, form))
    check_flag(flag, w, True)
    exact, bound = rank_one_bounds(w0, lam, u, torch.float32)
    check_rounded_update(w, exact, bound)


@pytest.mark.parametrize("which", ["u", "lam"])
@pytest.mark.parametrize("use_master", [False, True], ids=["plain", "master"])
def test_rank_one_update_refuses_vectors_that_overflow_the_compute_dtype(device, g, which, use_master):
    """A vector finite in fp64 but not in the fp32 arithmetic of an fp32 weight (or fp32 master):
    nothing is written."""
    w = randn(4, 3, g=g, dtype=torch.bfloat16 if use_master else torch.float32)
    master = randn(4, 3, g=g) if use_master else None
    u, lam = randn(3, g=g, dtype=torch.float64), randn(4, g=g, dtype=torch.float64)
    {"u": u, "lam": lam}[which][1] = 1e300
    w0 = w.clone()
    m0 = None if master is None else master.clone()
    check_flag(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0, master=master), w, False)
    assert same_bits(w, w0)
    if master is not None:
        assert same_bits(master, m0)


def test_rank_one_update_fp64_compute_accepts_what_fp32_cannot_hold(device, g):
    """The guard converts the vectors to the compute dtype: fp64 for an fp64 master, so 1e300 is
    finite there and the write happens (the fp32 weight then holds the rounded master, ±inf)."""
    master = randn(4, 3, g=g, dtype=torch.float64)
    w = torch.full((4, 3), math.nan, dtype=torch.float32, device=DEVICE)
    u = torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64, device=DEVICE)
    lam = randn(4, g=g, dtype=torch.float64)
    check_flag(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0, master=master), w, True)
    assert same_bits(w, master.to(torch.float32))
    assert torch.isinf(w[:, 1]).all() and torch.isfinite(w[:, [0, 2]]).all()


def test_rank_one_update_empty_weight(device):
    w = torch.zeros(0, 5, device=DEVICE)
    flag = ops.rank_one_update(w, torch.ones(5, device=DEVICE), torch.ones(0, device=DEVICE), denom=1.0, min_denom=0.0)
    check_flag(flag, w, True)


# ----------------------------------------------------------------------------------------------
# symmetric_rank_one_update
# ----------------------------------------------------------------------------------------------


def draw_beta_denom(g):
    """β in [0.1, 2) and uᵀk in [0.1, 5): an addition with a well-separated denominator."""
    beta, denom = torch.rand(2, generator=g, dtype=torch.float64).tolist()
    return 0.1 + 1.9 * beta, 0.1 + 4.9 * denom


def sym_matrix(d, dtype, g):
    return random_symmetric_matrix(d, dtype, g, device=DEVICE)


@pytest.mark.parametrize(
    "m_dtype,u_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float64),
     (torch.float64, torch.float64), (torch.float64, torch.bfloat16), (torch.float64, torch.float32)],
    ids=str,
)
@pytest.mark.parametrize("d", [1, 7, 97, 576])
def test_symmetric_rank_one_update(device, g, d, m_dtype, u_dtype):
    m = sym_matrix(d, m_dtype, g)
    u = randn(d, g=g, dtype=u_dtype)
    beta, denom = draw_beta_denom(g)
    m0, u0 = m.clone(), u.clone()
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    exact, bound = symmetric_update_bounds(m0, u, beta, denom)
    check_symmetric_update(m, exact, bound)
    assert same_bits(u, u0)


@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
def test_symmetric_rank_one_update_wide(device, g, m_dtype):
    """d = 1536 (SmolLM2's d_ff): several tiles in both directions, the last ones partial."""
    d = 1536
    m = sym_matrix(d, m_dtype, g)
    u = randn(d, g=g, dtype=torch.bfloat16)
    beta, denom = draw_beta_denom(g)
    m0 = m.clone()
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    exact, bound = symmetric_update_bounds(m0, u, beta, denom)
    check_symmetric_update(m, exact, bound)


@pytest.mark.parametrize("u_kind", ["strided", "offset"])
@pytest.mark.parametrize("m_kind", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
def test_symmetric_rank_one_update_layouts(device, g, m_dtype, m_kind, u_kind):
    d = 37
    sym = sym_matrix(d, m_dtype, g)
    if m_kind == "sliced":
        base = randn(d + 3, 2 * d + 1, g=g, dtype=m_dtype)
        m = base[1 : 1 + d, 1::2]
        m.copy_(sym)
        inside = torch.zeros(base.shape, dtype=torch.bool, device=DEVICE)
        inside[1 : 1 + d, 1::2] = True
    else:
        base = sym if m_kind == "contiguous" else sym.t().contiguous()
        m = base if m_kind == "contiguous" else base.t()
        inside = torch.ones(base.shape, dtype=torch.bool, device=DEVICE)
    u = randn(3 * d, g=g, dtype=torch.bfloat16)[1::3] if u_kind == "strided" else randn(d + 5, g=g)[3 : 3 + d]
    base0, m0, u0 = base.clone(), m.clone(), u.clone()
    beta, denom = draw_beta_denom(g)
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    exact, bound = symmetric_update_bounds(m0, u, beta, denom)
    check_symmetric_update(m, exact, bound)
    assert same_bits(base[~inside], base0[~inside]), "wrote outside the view"
    assert same_bits(u, u0)


@pytest.mark.parametrize("case", list(SYM_GUARD_CASES))
def test_symmetric_rank_one_update_refused(device, g, case):
    beta, denom, floor, poison = SYM_GUARD_CASES[case]
    d = 13
    # Both matrix dtypes, each scalar form at least once (checked bit for bit each time).
    for m_dtype, form in [(torch.float32, "float"), (torch.float64, "f32"), (torch.float32, "f64")]:
        m = sym_matrix(d, m_dtype, g)
        u = randn(d, g=g, dtype=m_dtype)
        plant_in_u(u, poison)
        m0 = m.clone()
        flag = ops.symmetric_rank_one_update(
            m, u, as_scalar(beta, form), as_scalar(denom, form), min_denom=as_scalar(floor, form)
        )
        check_flag(flag, m, False)
        assert same_bits(m, m0), f"a refused update changed the inverse (inverse {m_dtype}, scalars as {form})"


@pytest.mark.parametrize("form", ["float", "f32", "f64"])
@pytest.mark.parametrize("case", list(SYM_ACCEPT_CASES))
def test_symmetric_rank_one_update_accepted_boundaries(device, g, case, form):
    beta, denom, floor = SYM_ACCEPT_CASES[case]
    m = sym_matrix(9, torch.float64, g)
    u = randn(9, g=g)
    m0 = m.clone()
    flag = ops.symmetric_rank_one_update(
        m, u, as_scalar(beta, form), as_scalar(denom, form), min_denom=as_scalar(floor, form)
    )
    check_flag(flag, m, True)
    exact, bound = symmetric_update_bounds(m0, u, beta, denom)
    check_symmetric_update(m, exact, bound)


@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
def test_symmetric_rank_one_update_zero_beta_writes_nothing(device, g, m_dtype):
    m = sym_matrix(11, m_dtype, g)
    m0 = m.clone()
    check_flag(ops.symmetric_rank_one_update(m, randn(11, g=g), as_scalar(0.0, "f32"), 3.0), m, True)
    assert same_bits(m, m0)


def test_symmetric_rank_one_update_guards_in_the_matrix_dtype(device, g):
    """u and coef finite in fp64 but not in fp32: refused for an fp32 inverse, applied for fp64."""
    u = torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64, device=DEVICE)
    m = sym_matrix(3, torch.float32, g)
    m0 = m.clone()
    check_flag(ops.symmetric_rank_one_update(m, u, 0.5, 1.0), m, False)
    assert same_bits(m, m0)
    u = randn(5, g=g, dtype=torch.float64, scale=1e-20)
    for m_dtype, applied in [(torch.float32, False), (torch.float64, True)]:
        m = sym_matrix(5, m_dtype, g)
        m0 = m.clone()
        check_flag(ops.symmetric_rank_one_update(m, u, 1e39, 0.0), m, applied)
        if applied:
            exact, bound = symmetric_update_bounds(m0, u, 1e39, 0.0)
            check_symmetric_update(m, exact, bound)
        else:
            assert same_bits(m, m0)


def test_symmetric_rank_one_update_empty(device):
    m = torch.zeros(0, 0, device=DEVICE)
    check_flag(ops.symmetric_rank_one_update(m, torch.ones(0, device=DEVICE), 1.0, 1.0), m, True)


@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [7, 97])
def test_symmetric_rank_one_update_adds_and_removes_a_key(device, g, d, m_dtype):
    """From A⁻¹ of a random SPD A: adding key k gives (A + βkkᵀ)⁻¹, removing it (-β, with u and uᵀk
    of the new inverse) gives A⁻¹ back (tolerances as in tests/test_ops.py: the removal's errors
    grow with its amplification 1 + β·uᵀk)."""
    c, cond = make_spd(d, g)
    k = torch.randn(d, generator=g, dtype=torch.float64)
    unit = cond * (math.sqrt(d) + 1.0) * torch.finfo(m_dtype).eps
    m = inverse_of(c).to(m_dtype).to(DEVICE)
    u, denom = ops.solve_keys(m, k.to(DEVICE))
    beta = 2.0
    amplification = 1.0 + beta * float(denom)
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    want = inverse_of(c + beta * torch.outer(k, k))
    assert same_bits(m, m.t())
    assert ((m.double().cpu() - want).norm() / want.norm()).item() <= 2.0 * unit
    u, denom = ops.solve_keys(m, k.to(DEVICE))
    check_flag(ops.symmetric_rank_one_update(m, u, -beta, denom), m, True)
    assert same_bits(m, m.t())
    start = inverse_of(c)
    assert ((m.double().cpu() - start).norm() / start.norm()).item() <= 4.0 * unit * amplification


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------


def test_select_backend_serves_device(triton_env):
    """Automatic choice never picks Triton for CPU tensors (not in the CPU preference), but forcing it
    there works under the interpreter; the functions dispatched to are the ones loaded here."""
    for op in ops.OPS:
        assert ops.select_backend(op, "cuda") in ("cuda", "triton")
        with ops.use_backend("triton"):
            assert ops.select_backend(op, DEVICE) == "triton"
            assert ops.BACKENDS["triton"].impls()[op].__module__.startswith("fastrome.kernels.")
    if INTERPRETED:
        assert ops.select_backend("solve_keys", "cpu") != "triton"
        assert "cpu" in ops.BACKENDS["triton"].device_types()


def test_backend_table_lists_triton(triton_env, monkeypatch):
    rows = ops.backend_table(("cpu", "cuda"))
    cuda_available = ops.BACKENDS["cuda"].available()
    for row in rows:
        if row["device"] == "cuda":
            assert row["backend"] == ("cuda" if cuda_available else "triton"), row
            assert "triton" not in row["skipped"]
    with ops.use_backend("triton"):
        rows = ops.backend_table((DEVICE.type,))
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
    """No test of this module leaves TRITON_INTERPRET behind."""
    assert os.environ.get("TRITON_INTERPRET") == ENV_AT_IMPORT
