"""Tests of the fastrome ops on every backend that runs on the CPU.

Every numerical check compares against an independent float64 computation done here (never
against :mod:`fastrome.reference`), with tolerances derived from the precision the op promises:
fp32 arithmetic (fp64 for fp64 data) whatever the storage dtype.
"""

from __future__ import annotations

import contextlib
import math
import re
import zlib

import pytest
import torch
from kernel_checks import (
    ACC_DTYPES,
    ACCEPT_CASES,
    F32_EPS,
    F64_EPS,
    GUARD_CASES,
    SYM_ACCEPT_CASES,
    SYM_GUARD_CASES,
    W_DTYPES,
    apply_poison,
    as_scalar,
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

from fastrome import _extension, ops, reference

CPU_BACKENDS = [
    "reference",
    pytest.param(
        "cpp",
        marks=pytest.mark.skipif(
            _extension.load_error() is not None,
            reason=f"C++ extension fastrome._C not built: {_extension.load_error()}",
        ),
    ),
]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def g(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch):
    """Force one backend for the test (and check that dispatch really picks it)."""
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    with ops.use_backend(request.param):
        for op in ops.OPS:
            assert ops.select_backend(op, "cpu") == request.param
        yield request.param


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def layout(kind: str, rows: int, cols: int):
    """``(base_shape, view_of)``: how to store a (rows, cols) matrix in one of several layouts."""
    return {
        "contiguous": ((rows, cols), lambda b: b),
        # GPT-2 Conv1D layout: stored (d_in, d_out), used through .t().
        "transposed": ((cols, rows), lambda b: b.t()),
        "sliced": ((rows + 3, 2 * cols + 1), lambda b: b[1 : 1 + rows, 1::2]),
    }[kind]


def base_and_view(kind: str, rows: int, cols: int, g, dtype, scale=1.0):
    """A (rows, cols) view of a freshly drawn base tensor in layout ``kind``.

    Returns ``(base, view, inside)`` where ``inside`` is a bool mask of the base elements the view
    covers, so tests can check that nothing outside the view was written.
    """
    shape, view_of = layout(kind, rows, cols)
    base = randn(*shape, g=g, dtype=dtype, scale=scale)
    inside = torch.zeros(shape, dtype=torch.bool)
    view_of(inside).fill_(True)
    view = view_of(base)
    assert view.shape == (rows, cols)
    return base, view, inside


@contextlib.contextmanager
def one_thread():
    """Run the test's own LAPACK oracles single-threaded: on a busy 2-core machine a threaded
    eigvalsh can spend seconds in OpenMP barriers (the ops under test keep their threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def dirty_heap(*numels):
    """Allocate and free NaN-filled blocks so that an op's fresh outputs likely start as NaN."""
    blocks = [torch.full((n,), math.nan, dtype=torch.float64) for n in numels]
    del blocks


def random_symmetric(d, dtype, g):
    a = randn(d, d, g=g, dtype=dtype)
    return a + a.t()  # a + aᵀ is exactly symmetric: addition commutes


# ----------------------------------------------------------------------------------------------
# second_moment_accumulate
# ----------------------------------------------------------------------------------------------


def moment_eps(acc_dtype, x_dtype):
    """Unit of the promised arithmetic: fp64 only when both acc and x are fp64, else fp32."""
    return F64_EPS if acc_dtype == x_dtype == torch.float64 else F32_EPS


def expected_moment(acc0, parts):
    """fp64 ``acc0 + Σ xᵀx`` over the masked rows of each (x, mask), and the error scale
    ``|acc0| + Σ |x|ᵀ|x|`` that bounds the rounding error of any summation order."""
    exp = acc0.double().clone()
    scale = acc0.double().abs()
    n = 0
    for x, mask in parts:
        r = x.double() if mask is None else x.double()[mask]
        exp += r.t() @ r
        scale += r.abs().t() @ r.abs()
        n += r.shape[0]
    return exp, scale, n


def moment_within_tol(acc, exp, scale, n, eps) -> torch.Tensor:
    # Blocked BLAS sums grow like sqrt(n) in practice (worst case n): 4·sqrt(n)+8 units of the
    # elementwise scale leaves a 4x margin over what the backends show, and stays 100x or more
    # below one bf16 rounding (2^-8) of the diagonal even at n = 7000.
    tol = eps * (4.0 * math.sqrt(max(n, 1)) + 8.0) * scale
    return (acc.double() - exp).abs() <= tol


def check_moment(acc, acc0, parts):
    exp, scale, n = expected_moment(acc0, parts)
    all_fp64 = all(x.dtype == torch.float64 for x, _ in parts)
    eps = moment_eps(acc.dtype, torch.float64 if all_fp64 else torch.float32)
    ok = moment_within_tol(acc, exp, scale, n, eps)
    assert torch.isfinite(acc).all()
    assert ok.all(), (
        f"{int((~ok).sum())}/{ok.numel()} elements off; max |err|/scale = "
        f"{((acc.double() - exp).abs() / scale.clamp_min(1e-300)).max().item():.3e} (eps {eps:.1e}, n {n})"
    )
    assert same_bits(acc, acc.t()), "acc is not exactly symmetric"


X_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize(
    "d,n",
    [(1, 1), (1, 37), (7, 1), (7, 50), (13, 3), (13, 101), (257, 33), (576, 19), (7, 0), (257, 0)],
)
def test_second_moment_sizes(backend, g, d, n, x_dtype, acc_dtype):
    acc0 = random_symmetric(d, acc_dtype, g)
    x = randn(n, d, g=g, dtype=x_dtype)
    acc = acc0.clone()
    out = ops.second_moment_accumulate(acc, x)
    assert out is acc
    if n == 0:
        assert same_bits(acc, acc0)
    check_moment(acc, acc0, [(x, None)])


@pytest.mark.parametrize(
    "x_dtype,acc_dtype",
    [(torch.float32, torch.float64), (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
     (torch.float64, torch.float64)],
    ids=str,
)
def test_second_moment_wide(backend, g, x_dtype, acc_dtype):
    """d = 1536 (six 256-tiles, 21 tile products): every x dtype once, the costly size kept few."""
    d, n = 1536, 9
    acc0 = random_symmetric(d, acc_dtype, g)
    x = randn(n, d, g=g, dtype=x_dtype)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x)
    check_moment(acc, acc0, [(x, None)])


@pytest.mark.parametrize("x_layout", ["column_slice", "transposed", "row_strided"])
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("d", [13, 257])
def test_second_moment_noncontiguous_x(backend, g, d, x_dtype, x_layout):
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


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("which", ["all", "none", "some", "one", "some_strided_mask"])
@pytest.mark.parametrize("d", [7, 257])
def test_second_moment_mask(backend, g, d, which, acc_dtype):
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
        assert not mask.is_contiguous()
    assert 0 < int(mask.sum()) < n or which in ("all", "none")
    mask_before = mask.clone()
    acc0 = random_symmetric(d, acc_dtype, g)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x, mask)
    if which == "none":
        assert same_bits(acc, acc0)
    check_moment(acc, acc0, [(x, mask)])
    assert torch.equal(mask, mask_before)
    if which == "some":
        # Rows left out must not count: their contribution is far above the tolerance.
        exp_all, scale, _ = expected_moment(acc0, [(x, None)])
        assert not moment_within_tol(acc, exp_all, scale, n, F32_EPS).all()


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [13, 576])
def test_second_moment_accumulates_twice(backend, g, d, acc_dtype):
    acc0 = random_symmetric(d, acc_dtype, g)
    x1 = randn(29, d, g=g, dtype=torch.float16)
    m1 = torch.rand(29, generator=g) < 0.5
    x2 = randn(17, d + 3, g=g, dtype=torch.float32)[:, 3:]
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x1, m1)
    ops.second_moment_accumulate(acc, x2)
    check_moment(acc, acc0, [(x1, m1), (x2, None)])


@pytest.mark.parametrize(
    "x_dtype,acc_dtype,masked",
    [
        (torch.bfloat16, torch.float32, False),
        (torch.float32, torch.float64, True),
        (torch.float64, torch.float64, False),
    ],
    ids=str,
)
def test_second_moment_crosses_row_chunks(backend, g, x_dtype, acc_dtype, masked):
    """More rows than one C++ chunk (4096), also after masking, with d across two 256-tiles."""
    d = 300
    n = 7001 if masked else 4501
    x = randn(n, d, g=g, dtype=x_dtype)
    mask = (torch.rand(n, generator=g) < 0.7) if masked else None
    assert mask is None or int(mask.sum()) > 4096
    acc0 = random_symmetric(d, acc_dtype, g)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x, mask)
    check_moment(acc, acc0, [(x, mask)])


def test_second_moment_strided_acc(backend, g):
    """acc may be a view into a larger buffer; nothing outside it is touched."""
    d = 270
    base = random_symmetric(d + 5, torch.float32, g)
    acc = base[2 : 2 + d, 2 : 2 + d]
    inside = torch.zeros(base.shape, dtype=torch.bool)
    inside[2 : 2 + d, 2 : 2 + d] = True
    base0, acc0 = base.clone(), acc.clone()
    x = randn(40, d, g=g, dtype=torch.bfloat16)
    ops.second_moment_accumulate(acc, x)
    check_moment(acc, acc0, [(x, None)])
    assert same_bits(base[~inside], base0[~inside])


def test_second_moment_tolerance_rejects_bf16_accumulation(g):
    """The tolerance of check_moment is tight enough that a bf16 running sum fails it."""
    d, n = 13, 64
    x = randn(n, d, g=g, dtype=torch.bfloat16)
    acc0 = random_symmetric(d, torch.float32, g)
    s = torch.zeros(d, d, dtype=torch.bfloat16)
    for row in x.float():
        s = (s.float() + torch.outer(row, row)).bfloat16()
    exp, scale, _ = expected_moment(acc0, [(x, None)])
    assert not moment_within_tol(acc0 + s.float(), exp, scale, n, F32_EPS).all()
    # ... and even a single bf16 rounding of an exact fp32 product fails it.
    once = (x.float().t() @ x.float()).bfloat16().float()
    assert not moment_within_tol(acc0 + once, exp, scale, n, F32_EPS).all()


# ----------------------------------------------------------------------------------------------
# solve_keys
# ----------------------------------------------------------------------------------------------


def make_spd(d, g, ridge=0.1):
    """C = A Aᵀ + ridge·I (fp64) and its condition number."""
    a = randn(d, 2 * d + 1, g=g, dtype=torch.float64) / math.sqrt(2 * d + 1)
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


def check_solve(u, denom, inverse, c, cond, k):
    d = c.shape[0]
    out_dtype = torch.promote_types(k.dtype, torch.float32)
    assert u.dtype == out_dtype and denom.dtype == out_dtype
    assert u.shape == k.shape and denom.shape == k.shape[:-1]
    assert u.device == k.device and denom.device == k.device
    assert torch.isfinite(u).all() and torch.isfinite(denom).all()

    k64 = k.double()
    with one_thread():
        want = torch.linalg.solve(c, k64.reshape(-1, d).t()).t().reshape(k.shape)
    # Perturbation bound: an inverse rounded (and accumulated) at eps_a gives a relative error up to
    # ~cond·sqrt(d)·eps_a; the output rounding adds eps_out.
    eps_a = torch.finfo(inverse.dtype).eps
    eps_out = torch.finfo(out_dtype).eps
    tol = 4.0 * cond * (math.sqrt(d) + 1.0) * eps_a + 2.0 * eps_out
    err = (u.double() - want).norm(dim=-1) / want.norm(dim=-1)
    assert (err <= tol).all(), f"relative error {err.max().item():.3e} > {tol:.3e} (cond {cond:.1f})"

    # denom is defined from the returned, rounded u.
    prods = u.double() * k64
    want_denom = prods.sum(-1)
    dtol = eps_out * want_denom.abs() + 4.0 * d * F64_EPS * prods.abs().sum(-1)
    assert ((denom.double() - want_denom).abs() <= dtol).all()
    assert (denom > 0).all()  # kᵀC⁻¹k of an SPD C and a nonzero key


@pytest.mark.parametrize("batch", [None, 5], ids=["single", "batch5"])
@pytest.mark.parametrize("k_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inverse_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("d", [1, 2, 13, 257, 576])
def test_solve_keys(backend, g, d, inverse_dtype, k_dtype, batch):
    c, cond = make_spd(d, g)
    inverse = inverse_of(c).to(inverse_dtype)
    k = randn(*(() if batch is None else (batch,)), d, g=g, dtype=k_dtype)
    inverse0, k0 = inverse.clone(), k.clone()
    dirty_heap(k.numel(), k.numel() // d)
    u, denom = ops.solve_keys(inverse, k)
    check_solve(u, denom, inverse, c, cond, k)
    assert same_bits(inverse, inverse0) and same_bits(k, k0)


@pytest.mark.parametrize(
    "k_layout", ["strided_1d", "transposed_2d", "column_slice_2d", "row_strided_2d"]
)
@pytest.mark.parametrize("inverse_layout", ["contiguous", "column_major", "sliced"])
def test_solve_keys_noncontiguous(backend, g, k_layout, inverse_layout):
    d, b = 37, 4
    c, cond = make_spd(d, g)
    if inverse_layout == "contiguous":
        inverse = inverse_of(c)
    elif inverse_layout == "column_major":
        inverse = inverse_of(c).t().contiguous().t()
        assert not inverse.is_contiguous()
    else:
        big = torch.full((d + 3, d + 5), float("nan"), dtype=torch.float64)
        big[2 : 2 + d, 1 : 1 + d] = inverse_of(c)
        inverse = big[2 : 2 + d, 1 : 1 + d]
        assert not inverse.is_contiguous() and not inverse.t().is_contiguous()
    if k_layout == "strided_1d":
        k = randn(3 * d, g=g)[::3]
    elif k_layout == "transposed_2d":
        k = randn(d, b, g=g).t()
    elif k_layout == "column_slice_2d":
        k = randn(b, d + 6, g=g)[:, 2 : 2 + d]
    else:
        k = randn(2 * b, d, g=g)[::2]
    assert not k.is_contiguous() and k.shape[-1] == d
    u, denom = ops.solve_keys(inverse, k)
    check_solve(u, denom, inverse, c, cond, k)


def test_solve_keys_ill_conditioned(backend, g):
    """A nearly singular C (cond ~1e6) still gets an accurate solve from an fp64 inverse."""
    d = 257
    a = randn(d, d // 2, g=g, dtype=torch.float64)
    c = a @ a.t() / d + 1e-6 * torch.eye(d, dtype=torch.float64)
    cond = condition_number(c)
    assert cond > 1e5
    k = randn(3, d, g=g, dtype=torch.float64)
    inverse = inverse_of(c)
    u, denom = ops.solve_keys(inverse, k)
    check_solve(u, denom, inverse, c, cond, k)


def test_solve_keys_exact_small_case(backend):
    """A tiny case by hand (checks rows against columns and the fused denominator)."""
    a = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 3.0, 0.25], [0.5, 0.25, 1.0]], dtype=torch.float64)
    k = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    want = torch.tensor([2.0 + 2.0 + 2.0, -1.0 - 6.0 + 1.0, 0.5 - 0.5 + 4.0], dtype=torch.float64)
    u, denom = ops.solve_keys(a, k)
    torch.testing.assert_close(u, want, rtol=0, atol=0)
    torch.testing.assert_close(denom, (want * k).sum(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# rank_one_update
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("kind", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (13, 7), (576, 1536)], ids=str)
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
def test_rank_one_update(backend, g, w_dtype, shape, kind, use_master):
    d_out, d_in = shape
    u = randn(d_in, g=g, scale=0.1)
    lam = randn(d_out, g=g)
    if use_master:
        m_base, master, inside = base_and_view(kind, d_out, d_in, g, torch.float32, scale=0.5)
        poison_negative_zeros(m_base)
        w_base = m_base.to(w_dtype)
        w = layout(kind, d_out, d_in)[1](w_base)  # the same layout as the master
        m_base0, master0 = m_base.clone(), master.clone()
    else:
        w_base, w, inside = base_and_view(kind, d_out, d_in, g, w_dtype, scale=0.5)
        poison_negative_zeros(w_base)
        master = None
    w_base0, w0 = w_base.clone(), w.clone()
    u0, lam0 = u.clone(), lam.clone()

    flag = ops.rank_one_update(w, u, lam, denom=1.0, min_denom=1e-6, master=master)

    assert flag.dtype == torch.bool and flag.shape == () and flag.device == w.device
    assert bool(flag) is True
    if use_master:
        check_master_update(w, master, master0, lam, u)
        assert same_bits(m_base[~inside], m_base0[~inside])
    else:
        exact, bound = rank_one_bounds(w0, lam, u, w_dtype)
        check_rounded_update(w, exact, bound)
    assert same_bits(w_base[~inside], w_base0[~inside]), "wrote outside the view"
    assert same_bits(u, u0) and same_bits(lam, lam0)


@pytest.mark.parametrize("master_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
def test_rank_one_update_master_dtypes(backend, g, w_dtype, master_dtype):
    """Any fp32/fp64 master works with any weight dtype; the master's dtype sets the arithmetic."""
    d_out, d_in = 19, 23
    master = randn(d_out, d_in, g=g, dtype=master_dtype)
    w = master.to(w_dtype)
    master0 = master.clone()
    u, lam = randn(d_in, g=g, scale=0.1), randn(d_out, g=g)
    assert bool(ops.rank_one_update(w, u, lam, denom=2.0, min_denom=0.0, master=master))
    check_master_update(w, master, master0, lam, u)


@pytest.mark.parametrize(
    "u_dtype,lam_dtype",
    [(torch.bfloat16, torch.float64), (torch.float64, torch.float16), (torch.float16, torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_rank_one_update_mixed_vector_dtypes(backend, g, w_dtype, u_dtype, lam_dtype):
    w = randn(11, 17, g=g, dtype=w_dtype)
    u, lam = randn(17, g=g, dtype=u_dtype, scale=0.1), randn(11, g=g, dtype=lam_dtype)
    w0 = w.clone()
    assert bool(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0))
    exact, bound = rank_one_bounds(w0, lam, u, w_dtype)
    check_rounded_update(w, exact, bound)


def test_rank_one_update_tolerance_rejects_bf16_arithmetic(g):
    """check_rounded_update fails an update whose product is rounded to bf16 before the add."""
    w0 = randn(64, 96, g=g, dtype=torch.bfloat16, scale=0.5)
    u, lam = randn(96, g=g, scale=0.1), randn(64, g=g)
    exact, bound = rank_one_bounds(w0, lam, u, torch.bfloat16)
    sloppy = (w0.float() + torch.outer(lam, u).bfloat16().float()).bfloat16()
    with pytest.raises(AssertionError):
        check_rounded_update(sloppy, exact, bound)


@pytest.mark.parametrize("w_dtype,use_master", [(torch.float32, False), (torch.bfloat16, True)], ids=str)
def test_rank_one_update_large(backend, g, w_dtype, use_master):
    d_out, d_in = 4096, 11008
    u = randn(d_in, g=g, scale=0.02)
    lam = randn(d_out, g=g)
    if use_master:
        master = torch.empty(d_out, d_in).uniform_(-0.5, 0.5, generator=g)
        w = master.to(w_dtype)
        before = master.clone()
    else:
        master = None
        w = torch.empty(d_out, d_in).uniform_(-0.5, 0.5, generator=g).to(w_dtype)
        before = w.clone()
    denom, min_denom = torch.tensor(3.0), torch.tensor(1e-8)
    flag = ops.rank_one_update(w, u, lam, denom=denom, min_denom=min_denom, master=master)
    assert bool(flag) is True
    step = 512  # check in row blocks to keep the fp64 temporaries small
    for r in range(0, d_out, step):
        rows = slice(r, r + step)
        if use_master:
            check_master_update(w[rows], master[rows], before[rows], lam[rows], u)
        else:
            exact, bound = rank_one_bounds(before[rows], lam[rows], u, w_dtype)
            check_rounded_update(w[rows], exact, bound)


@pytest.mark.parametrize("use_master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("case", list(GUARD_CASES))
def test_rank_one_update_refused(backend, g, case, use_master):
    denom, min_denom, poison = GUARD_CASES[case]
    d_out, d_in = 9, 14
    for w_dtype in W_DTYPES:
        for form in ("float", "f32", "f64"):
            w = randn(d_out, d_in, g=g, dtype=w_dtype)
            poison_negative_zeros(w)
            master = None
            if use_master:
                master = randn(d_out, d_in, g=g, dtype=torch.float32)
                poison_negative_zeros(master)
            u, lam = randn(d_in, g=g), randn(d_out, g=g)
            apply_poison(u, lam, poison)
            w0 = w.clone()
            m0 = None if master is None else master.clone()
            flag = ops.rank_one_update(
                w, u, lam, denom=as_scalar(denom, form), min_denom=as_scalar(min_denom, form), master=master
            )
            where = f"weight {w_dtype}, scalars as {form}"
            assert flag.dtype == torch.bool and flag.shape == () and flag.device == w.device, where
            assert bool(flag) is False, where
            assert same_bits(w, w0), f"a refused write changed the weight ({where})"
            if master is not None:
                assert same_bits(master, m0), f"a refused write changed the master ({where})"


@pytest.mark.parametrize("form", ["float", "f32", "f64"])
@pytest.mark.parametrize("case", list(ACCEPT_CASES))
def test_rank_one_update_accepted_boundaries(backend, g, case, form):
    denom, min_denom = ACCEPT_CASES[case]
    w = randn(6, 5, g=g)
    u, lam = randn(5, g=g), randn(6, g=g)
    w0 = w.clone()
    flag = ops.rank_one_update(w, u, lam, denom=as_scalar(denom, form), min_denom=as_scalar(min_denom, form))
    assert bool(flag) is True
    exact, bound = rank_one_bounds(w0, lam, u, w.dtype)
    check_rounded_update(w, exact, bound)


def test_rank_one_update_refuses_vectors_that_overflow_the_compute_dtype(backend, g):
    """u is finite in fp64 but not in the fp32 arithmetic of an fp32 weight: nothing is written."""
    w = randn(4, 3, g=g)
    w0 = w.clone()
    u = torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64)
    assert bool(ops.rank_one_update(w, u, randn(4, g=g), denom=1.0, min_denom=0.0)) is False
    assert same_bits(w, w0)


# ----------------------------------------------------------------------------------------------
# symmetric_rank_one_update
# ----------------------------------------------------------------------------------------------

SYM_SIZES = [1, 7, 97, 576, 1536]
SYM_U_DTYPES = [torch.float32, torch.bfloat16, torch.float64]
SYM_FORMS = ["float", "f32", "f64"]


def draw_beta_denom(g):
    """β in [0.1, 2) and uᵀk in [0.1, 5): an addition with a well-separated denominator."""
    beta, denom = torch.rand(2, generator=g, dtype=torch.float64).tolist()
    return 0.1 + 1.9 * beta, 0.1 + 4.9 * denom


def check_applied(flag, m, applied=True):
    assert flag.dtype == torch.bool and flag.shape == () and flag.device == m.device
    assert bool(flag) is applied


@pytest.mark.parametrize("u_dtype", SYM_U_DTYPES, ids=str)
@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("d", SYM_SIZES)
def test_symmetric_rank_one_update(backend, g, d, m_dtype, u_dtype):
    m = random_symmetric_matrix(d, m_dtype, g)
    u = randn(d, g=g, dtype=u_dtype)
    beta, denom = draw_beta_denom(g)
    m0, u0 = m.clone(), u.clone()
    check_applied(ops.symmetric_rank_one_update(m, u, beta, denom), m)
    exact, bound = symmetric_update_bounds(m0, u, beta, denom)
    check_symmetric_update(m, exact, bound)
    assert same_bits(u, u0)


def sym_view(kind: str, d: int, dtype, g):
    """``(base, view, inside)``: an exactly symmetric (d, d) view in layout ``kind`` of a base
    tensor, and the mask of the base elements the view covers."""
    sym = random_symmetric_matrix(d, dtype, g)
    if kind == "sliced":  # a window with a row offset and a column stride of 2
        base = randn(d + 3, 2 * d + 1, g=g, dtype=dtype)
        view = base[1 : 1 + d, 1::2]
        view.copy_(sym)
        inside = torch.zeros(base.shape, dtype=torch.bool)
        inside[1 : 1 + d, 1::2] = True
        return base, view, inside
    base = sym if kind == "contiguous" else sym.t().contiguous()  # "transposed": column-major
    view = base if kind == "contiguous" else base.t()
    return base, view, torch.ones(base.shape, dtype=torch.bool)


def sym_vector(kind: str, d: int, dtype, g):
    if kind == "contiguous":
        return randn(d, g=g, dtype=dtype)
    if kind == "strided":
        return randn(3 * d, g=g, dtype=dtype)[1::3]
    return randn(d + 5, g=g, dtype=dtype)[3 : 3 + d]  # contiguous, off any alignment boundary


@pytest.mark.parametrize("u_kind", ["contiguous", "strided", "offset"])
@pytest.mark.parametrize("m_kind", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [8, 37])
def test_symmetric_rank_one_update_layouts(backend, g, d, m_dtype, m_kind, u_kind):
    base, m, inside = sym_view(m_kind, d, m_dtype, g)
    u = sym_vector(u_kind, d, torch.bfloat16 if u_kind == "strided" else torch.float32, g)
    assert m_kind == "contiguous" or not m.is_contiguous()
    assert u_kind != "strided" or not u.is_contiguous()
    base0, m0, u0 = base.clone(), m.clone(), u.clone()
    beta, denom = draw_beta_denom(g)
    check_applied(ops.symmetric_rank_one_update(m, u, beta, denom), m)
    exact, bound = symmetric_update_bounds(m0, u, beta, denom)
    check_symmetric_update(m, exact, bound)
    assert same_bits(base[~inside], base0[~inside]), "wrote outside the view"
    assert same_bits(u, u0)


@pytest.mark.parametrize("case", list(SYM_GUARD_CASES))
def test_symmetric_rank_one_update_refused(backend, g, case):
    beta, denom, floor, poison = SYM_GUARD_CASES[case]
    d = 13
    for m_dtype in ACC_DTYPES:
        for form in SYM_FORMS:
            m = random_symmetric_matrix(d, m_dtype, g)
            u = randn(d, g=g, dtype=m_dtype)
            plant_in_u(u, poison)
            m0 = m.clone()
            flag = ops.symmetric_rank_one_update(
                m, u, as_scalar(beta, form), as_scalar(denom, form), min_denom=as_scalar(floor, form)
            )
            where = f"inverse {m_dtype}, scalars as {form}"
            check_applied(flag, m, False)
            assert same_bits(m, m0), f"a refused update changed the inverse ({where})"


@pytest.mark.parametrize("form", SYM_FORMS)
@pytest.mark.parametrize("case", list(SYM_ACCEPT_CASES))
def test_symmetric_rank_one_update_accepted_boundaries(backend, g, case, form):
    beta, denom, floor = SYM_ACCEPT_CASES[case]
    for m_dtype in ACC_DTYPES:
        m = random_symmetric_matrix(9, m_dtype, g)
        u = randn(9, g=g)
        m0 = m.clone()
        flag = ops.symmetric_rank_one_update(
            m, u, as_scalar(beta, form), as_scalar(denom, form), min_denom=as_scalar(floor, form)
        )
        check_applied(flag, m)
        exact, bound = symmetric_update_bounds(m0, u, beta, denom)
        check_symmetric_update(m, exact, bound)


@pytest.mark.parametrize("form", SYM_FORMS)
def test_symmetric_rank_one_update_zero_beta_writes_nothing(backend, g, form):
    """β = 0 is a valid update that changes nothing: applied, and every bit (-0.0 too) in place."""
    for m_dtype in ACC_DTYPES:
        m = random_symmetric_matrix(11, m_dtype, g)
        m0 = m.clone()
        check_applied(ops.symmetric_rank_one_update(m, randn(11, g=g), as_scalar(0.0, form), 3.0), m)
        assert same_bits(m, m0)


def test_symmetric_rank_one_update_guards_in_the_matrix_dtype(backend, g):
    """u and coef finite in fp64 but not in fp32: refused for an fp32 inverse, applied for fp64."""
    u = torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64)
    m = random_symmetric_matrix(3, torch.float32, g)
    m0 = m.clone()
    check_applied(ops.symmetric_rank_one_update(m, u, 0.5, 1.0), m, False)
    assert same_bits(m, m0)

    beta = 1e39  # coef = β when denom = 0: above fp32's largest finite value
    u = randn(5, g=g, dtype=torch.float64, scale=1e-20)
    for m_dtype, applied in [(torch.float32, False), (torch.float64, True)]:
        m = random_symmetric_matrix(5, m_dtype, g)
        m0 = m.clone()
        check_applied(ops.symmetric_rank_one_update(m, u, beta, 0.0), m, applied)
        if applied:
            exact, bound = symmetric_update_bounds(m0, u, beta, 0.0)
            check_symmetric_update(m, exact, bound)
        else:
            assert same_bits(m, m0)


def test_symmetric_rank_one_update_empty(backend):
    m = torch.zeros(0, 0, dtype=torch.float64)
    check_applied(ops.symmetric_rank_one_update(m, torch.ones(0), 1.0, 1.0), m)


def relative_error(m, want):
    return ((m.double() - want).norm() / want.norm()).item()


def inverse_unit(cond, d, dtype):
    """The error scale of an inverse solved against and updated at ``dtype``'s eps: as in
    check_solve, a perturbed inverse moves a solve by up to ~cond·sqrt(d)·eps."""
    return cond * (math.sqrt(d) + 1.0) * torch.finfo(dtype).eps


# An addition is within 2 units (measured: at most 0.2). A removal is a downdate: 1 - β·uᵀk of the
# new inverse is 1 / (1 + β·uᵀk) of the old one, so its rounding errors grow by that amplification
# (hence the periodic refactorisation of the edit memory); within 4 units per amplification
# (measured: at most 0.6).
ADD_UNITS, REMOVE_UNITS = 2.0, 4.0


@pytest.mark.parametrize("strength", ["moderate", "strong"])
@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [7, 97, 576])
def test_symmetric_rank_one_update_adds_and_removes_a_key(backend, g, d, m_dtype, strength):
    """From A⁻¹ of a random SPD A: the update for key k gives (A + βkkᵀ)⁻¹, and the removal (-β,
    with u and uᵀk of the new inverse) gives A⁻¹ back. β·uᵀk is 1 ("moderate") or ~d ("strong",
    β = 2 with keys of A's scale, as real keys are against C)."""
    c, cond = make_spd(d, g)
    k = randn(d, g=g, dtype=torch.float64)
    m = inverse_of(c).to(m_dtype)
    unit = inverse_unit(cond, d, m_dtype)

    u, denom = ops.solve_keys(m, k)
    beta = 1.0 / float(denom) if strength == "moderate" else 2.0
    amplification = 1.0 + beta * float(denom)
    check_applied(ops.symmetric_rank_one_update(m, u, beta, denom), m)
    want = inverse_of(c + beta * torch.outer(k, k))
    assert same_bits(m, m.t())
    err = relative_error(m, want)
    assert err <= ADD_UNITS * unit, f"addition: relative error {err:.3e} > {ADD_UNITS * unit:.3e}"
    # The tolerance tells an applied update from none at all.
    assert relative_error(inverse_of(c), want) > 10 * ADD_UNITS * unit

    u, denom = ops.solve_keys(m, k)
    check_applied(ops.symmetric_rank_one_update(m, u, -beta, denom), m)
    assert same_bits(m, m.t())
    err, tol = relative_error(m, inverse_of(c)), REMOVE_UNITS * unit * amplification
    assert err <= tol, f"removal: relative error {err:.3e} > {tol:.3e} (amplification {amplification:.1f})"
    if strength == "moderate":
        assert relative_error(want, inverse_of(c)) > 10 * tol


@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
def test_symmetric_rank_one_update_keeps_an_edit_memory(backend, g, m_dtype):
    """Five keys added one after another give (C + β Σ k kᵀ)⁻¹; removing them in another order
    gives C⁻¹ back."""
    d, n, beta = 61, 5, 0.5
    c, cond = make_spd(d, g)
    keys = [randn(d, g=g, dtype=torch.float64) for _ in range(n)]
    memory = c + beta * sum(torch.outer(k, k) for k in keys)
    unit = inverse_unit(cond, d, m_dtype)
    m = inverse_of(c).to(m_dtype)
    amplification = 0.0
    for k in keys:
        u, denom = ops.solve_keys(m, k)
        amplification += 1.0 + beta * float(denom)
        check_applied(ops.symmetric_rank_one_update(m, u, beta, denom), m)
    assert same_bits(m, m.t())
    assert relative_error(m, inverse_of(memory)) <= ADD_UNITS * unit * n
    for i in (2, 0, 4, 1, 3):
        u, denom = ops.solve_keys(m, keys[i])
        check_applied(ops.symmetric_rank_one_update(m, u, -beta, denom), m)
    assert same_bits(m, m.t())
    assert relative_error(m, inverse_of(c)) <= REMOVE_UNITS * unit * amplification


def test_symmetric_rank_one_update_refuses_removing_an_absent_key(backend, g):
    """Removing a key A does not hold drives 1 - β·uᵀk to or below 0 once β·uᵀk >= 1: refused."""
    d = 9
    m = torch.eye(d, dtype=torch.float64)  # A = I: u = k, uᵀk = |k|²
    k = torch.zeros(d, dtype=torch.float64)
    k[0] = 2.0  # uᵀk = 4
    m0 = m.clone()
    check_applied(ops.symmetric_rank_one_update(m, k.clone(), -0.25, 4.0), m, False)  # 1 - 1 = 0
    check_applied(ops.symmetric_rank_one_update(m, k.clone(), -0.5, 4.0), m, False)  # 1 - 2 < 0
    assert same_bits(m, m0)


def test_symmetric_rank_one_update_exact_small_case(backend):
    """By hand: A = I (2×2), k = (1, 1), β = 1: (I + kkᵀ)⁻¹ = I - kkᵀ/3."""
    m = torch.eye(2, dtype=torch.float64)
    k = torch.ones(2, dtype=torch.float64)
    check_applied(ops.symmetric_rank_one_update(m, k.clone(), 1.0, 2.0), m)
    want = torch.tensor([[1 - 1 / 3, -1 / 3], [-1 / 3, 1 - 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(m, want, rtol=0, atol=2 * F64_EPS)


# ----------------------------------------------------------------------------------------------
# Argument checking of the public wrappers
# ----------------------------------------------------------------------------------------------

META = torch.device("meta")


def _sma(acc=None, x=None, mask="absent", d=4, n=3):
    acc = torch.eye(d) if acc is None else acc
    x = torch.ones(n, d) if x is None else x
    if isinstance(mask, str) and mask == "absent":
        return ops.second_moment_accumulate, (acc, x), {}
    return ops.second_moment_accumulate, (acc, x, mask), {}


def _solve(inverse=None, k=None, d=4):
    inverse = torch.eye(d, dtype=torch.float64) if inverse is None else inverse
    k = torch.ones(d) if k is None else k
    return ops.solve_keys, (inverse, k), {}


def _r1u(weight=None, u=None, lam=None, denom=1.0, min_denom=0.0, master=None):
    weight = torch.zeros(3, 5) if weight is None else weight
    u = torch.ones(5) if u is None else u
    lam = torch.ones(3) if lam is None else lam
    return ops.rank_one_update, (weight, u, lam), {"denom": denom, "min_denom": min_denom, "master": master}


def _sru(inverse=None, u=None, beta=0.5, denom=1.0, min_denom=1e-12, d=4):
    inverse = torch.eye(d) if inverse is None else inverse
    u = torch.ones(d) if u is None else u
    return ops.symmetric_rank_one_update, (inverse, u, beta, denom), {"min_denom": min_denom}


def _sru_u_view_of_inverse(view):
    inverse = torch.eye(4)
    return _sru(inverse=inverse, u=view(inverse))


BAD_ARGS = {
    # second_moment_accumulate
    "sma_acc_not_tensor": (lambda: _sma(acc=[[1.0]]), TypeError, "acc:"),
    "sma_x_not_tensor": (lambda: _sma(x=[[1.0] * 4]), TypeError, "x:"),
    "sma_acc_1d": (lambda: _sma(acc=torch.ones(4)), ValueError, "acc:"),
    "sma_acc_not_square": (lambda: _sma(acc=torch.zeros(4, 5)), ValueError, "acc:"),
    "sma_acc_bf16": (lambda: _sma(acc=torch.zeros(4, 4, dtype=torch.bfloat16)), ValueError, "acc:"),
    "sma_acc_int": (lambda: _sma(acc=torch.zeros(4, 4, dtype=torch.int32)), ValueError, "acc:"),
    "sma_x_wrong_d": (lambda: _sma(x=torch.ones(3, 5)), ValueError, "x:"),
    "sma_x_1d": (lambda: _sma(x=torch.ones(4)), ValueError, "x:"),
    "sma_x_3d": (lambda: _sma(x=torch.ones(2, 3, 4)), ValueError, "x:"),
    "sma_x_int": (lambda: _sma(x=torch.ones(3, 4, dtype=torch.int64)), ValueError, "x:"),
    "sma_mask_not_tensor": (lambda: _sma(mask=[True, False, True]), TypeError, "mask:"),
    "sma_mask_float": (lambda: _sma(mask=torch.ones(3)), ValueError, "mask:"),
    "sma_mask_uint8": (lambda: _sma(mask=torch.ones(3, dtype=torch.uint8)), ValueError, "mask:"),
    "sma_mask_wrong_len": (lambda: _sma(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask:"),
    "sma_mask_2d": (lambda: _sma(mask=torch.ones(3, 1, dtype=torch.bool)), ValueError, "mask:"),
    "sma_x_other_device": (lambda: _sma(x=torch.ones(3, 4, device=META)), ValueError, "x on meta"),
    "sma_acc_other_device": (lambda: _sma(acc=torch.eye(4, device=META)), ValueError, "acc on meta"),
    "sma_mask_other_device": (
        lambda: _sma(mask=torch.ones(3, dtype=torch.bool, device=META)),
        ValueError,
        "mask on meta",
    ),
    # solve_keys
    "solve_inverse_not_tensor": (lambda: _solve(inverse=1.0), TypeError, "inverse:"),
    "solve_k_not_tensor": (lambda: _solve(k=[1.0] * 4), TypeError, "k:"),
    "solve_inverse_not_square": (lambda: _solve(inverse=torch.zeros(4, 3)), ValueError, "inverse:"),
    "solve_inverse_3d": (lambda: _solve(inverse=torch.zeros(1, 4, 4)), ValueError, "inverse:"),
    "solve_inverse_fp16": (lambda: _solve(inverse=torch.eye(4, dtype=torch.float16)), ValueError, "inverse:"),
    "solve_k_wrong_d": (lambda: _solve(k=torch.ones(5)), ValueError, "k:"),
    "solve_k_0d": (lambda: _solve(k=torch.tensor(1.0)), ValueError, "k:"),
    "solve_k_3d": (lambda: _solve(k=torch.ones(2, 2, 4)), ValueError, "k:"),
    "solve_k_int": (lambda: _solve(k=torch.ones(4, dtype=torch.int32)), ValueError, "k:"),
    "solve_k_other_device": (lambda: _solve(k=torch.ones(4, device=META)), ValueError, "k on meta"),
    "solve_inverse_other_device": (
        lambda: _solve(inverse=torch.eye(4, dtype=torch.float64, device=META)),
        ValueError,
        "inverse on meta",
    ),
    # rank_one_update
    "r1u_weight_not_tensor": (lambda: _r1u(weight=[[0.0] * 5] * 3), TypeError, "weight:"),
    "r1u_u_not_tensor": (lambda: _r1u(u=(1.0,) * 5), TypeError, "u:"),
    "r1u_lam_not_tensor": (lambda: _r1u(lam=3), TypeError, "lam:"),
    "r1u_weight_1d": (lambda: _r1u(weight=torch.zeros(5)), ValueError, "weight:"),
    "r1u_weight_int": (lambda: _r1u(weight=torch.zeros(3, 5, dtype=torch.int32)), ValueError, "weight:"),
    "r1u_u_wrong_len": (lambda: _r1u(u=torch.ones(3)), ValueError, "u:"),
    "r1u_u_2d": (lambda: _r1u(u=torch.ones(1, 5)), ValueError, "u:"),
    "r1u_u_int": (lambda: _r1u(u=torch.ones(5, dtype=torch.int64)), ValueError, "u:"),
    "r1u_lam_wrong_len": (lambda: _r1u(lam=torch.ones(5)), ValueError, "lam:"),
    "r1u_lam_bool": (lambda: _r1u(lam=torch.ones(3, dtype=torch.bool)), ValueError, "lam:"),
    "r1u_master_not_tensor": (lambda: _r1u(master=1.0), TypeError, "master:"),
    "r1u_master_wrong_shape": (lambda: _r1u(master=torch.zeros(5, 3)), ValueError, "master:"),
    "r1u_master_bf16": (lambda: _r1u(master=torch.zeros(3, 5, dtype=torch.bfloat16)), ValueError, "master:"),
    "r1u_weight_other_device": (
        lambda: _r1u(weight=torch.zeros(3, 5, device=META)),
        ValueError,
        "weight on meta",
    ),
    "r1u_u_other_device": (lambda: _r1u(u=torch.ones(5, device=META)), ValueError, "u on meta"),
    "r1u_lam_other_device": (lambda: _r1u(lam=torch.ones(3, device=META)), ValueError, "lam on meta"),
    "r1u_master_other_device": (
        lambda: _r1u(master=torch.zeros(3, 5, device=META)),
        ValueError,
        "master on meta",
    ),
    "r1u_denom_str": (lambda: _r1u(denom="1.0"), TypeError, "denom:"),
    "r1u_denom_bool": (lambda: _r1u(denom=True), TypeError, "denom:"),
    "r1u_denom_none": (lambda: _r1u(denom=None), TypeError, "denom:"),
    "r1u_denom_two_elements": (lambda: _r1u(denom=torch.ones(2)), ValueError, "denom:"),
    "r1u_denom_int_tensor": (lambda: _r1u(denom=torch.tensor(1)), ValueError, "denom:"),
    "r1u_denom_other_device": (lambda: _r1u(denom=torch.tensor(1.0, device=META)), ValueError, "denom:"),
    "r1u_min_denom_none": (lambda: _r1u(min_denom=None), TypeError, "min_denom:"),
    "r1u_min_denom_int_tensor": (lambda: _r1u(min_denom=torch.tensor(0)), ValueError, "min_denom:"),
    "r1u_min_denom_other_device": (
        lambda: _r1u(min_denom=torch.tensor(0.0, device=META)),
        ValueError,
        "min_denom:",
    ),
    # symmetric_rank_one_update
    "sru_inverse_not_tensor": (lambda: _sru(inverse=[[1.0] * 4] * 4), TypeError, "inverse:"),
    "sru_u_not_tensor": (lambda: _sru(u=[1.0] * 4), TypeError, "u:"),
    "sru_inverse_1d": (lambda: _sru(inverse=torch.ones(4)), ValueError, "inverse:"),
    "sru_inverse_not_square": (lambda: _sru(inverse=torch.zeros(4, 5)), ValueError, "inverse:"),
    "sru_inverse_3d": (lambda: _sru(inverse=torch.zeros(1, 4, 4)), ValueError, "inverse:"),
    "sru_inverse_bf16": (lambda: _sru(inverse=torch.eye(4, dtype=torch.bfloat16)), ValueError, "inverse:"),
    "sru_inverse_int": (lambda: _sru(inverse=torch.zeros(4, 4, dtype=torch.int64)), ValueError, "inverse:"),
    "sru_inverse_expanded": (
        lambda: _sru(inverse=torch.ones(1, 4).expand(4, 4)),
        ValueError,
        "inverse: elements overlap in memory (strides (0, 1))",
    ),
    "sru_u_wrong_len": (lambda: _sru(u=torch.ones(5)), ValueError, "u: expected a (4,) floating-point"),
    "sru_u_2d": (lambda: _sru(u=torch.ones(1, 4)), ValueError, "u:"),
    "sru_u_int": (lambda: _sru(u=torch.ones(4, dtype=torch.int32)), ValueError, "u:"),
    "sru_u_row_of_inverse": (lambda: _sru_u_view_of_inverse(lambda m: m[1]), ValueError, "u: shares memory"),
    "sru_u_diagonal_of_inverse": (
        lambda: _sru_u_view_of_inverse(torch.diagonal),
        ValueError,
        "u: shares memory",
    ),
    "sru_u_other_device": (lambda: _sru(u=torch.ones(4, device=META)), ValueError, "u on meta"),
    "sru_inverse_other_device": (lambda: _sru(inverse=torch.eye(4, device=META)), ValueError, "inverse on meta"),
    "sru_beta_str": (lambda: _sru(beta="0.5"), TypeError, "beta:"),
    "sru_beta_none": (lambda: _sru(beta=None), TypeError, "beta:"),
    "sru_beta_bool": (lambda: _sru(beta=True), TypeError, "beta:"),
    "sru_beta_two_elements": (lambda: _sru(beta=torch.ones(2)), ValueError, "beta:"),
    "sru_beta_int_tensor": (lambda: _sru(beta=torch.tensor(1)), ValueError, "beta:"),
    "sru_beta_other_device": (lambda: _sru(beta=torch.tensor(0.5, device=META)), ValueError, "beta:"),
    "sru_denom_none": (lambda: _sru(denom=None), TypeError, "denom:"),
    "sru_denom_int_tensor": (lambda: _sru(denom=torch.tensor(2)), ValueError, "denom:"),
    "sru_min_denom_str": (lambda: _sru(min_denom="0"), TypeError, "min_denom:"),
    "sru_min_denom_two_elements": (lambda: _sru(min_denom=torch.zeros(3)), ValueError, "min_denom:"),
}


def _tensors_in(args, kwargs):
    return [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_raise_and_touch_nothing(backend, case):
    make, exc, needle = BAD_ARGS[case]
    fn, args, kwargs = make()
    cpu_tensors = [t for t in _tensors_in(args, kwargs) if t.device.type == "cpu"]
    before = [t.clone() for t in cpu_tensors]
    with pytest.raises(exc, match=re.escape(needle)):
        fn(*args, **kwargs)
    for t, t0 in zip(cpu_tensors, before):
        assert same_bits(t, t0), f"{case}: an argument was modified although the call raised"


def test_valid_scalar_forms_accepted(backend):
    """Python ints/floats, 0-dim and 1-element tensors of any float dtype work as denom/min_denom."""
    for denom, min_denom in [
        (2, 1),
        (2.0, torch.tensor(1.0, dtype=torch.bfloat16)),
        (torch.tensor([2.0]), torch.tensor([[1.0]], dtype=torch.float16)),
    ]:
        w = torch.zeros(2, 3)
        assert bool(ops.rank_one_update(w, torch.ones(3), torch.ones(2), denom=denom, min_denom=min_denom))
        assert torch.equal(w, torch.ones(2, 3))


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def reference_spies(monkeypatch):
    """Count calls into the reference implementations (looked up at call time by ops)."""
    calls = {op: 0 for op in ops.OPS}
    for op in ops.OPS:
        real = getattr(reference, op)

        def spy(*args, _real=real, _op=op, **kwargs):
            calls[_op] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(reference, op, spy)
    return calls


def _run_all_ops():
    ops.second_moment_accumulate(torch.eye(3), torch.ones(2, 3))
    ops.solve_keys(torch.eye(3, dtype=torch.float64), torch.ones(3))
    ops.rank_one_update(torch.zeros(2, 3), torch.ones(3), torch.ones(2), denom=1.0, min_denom=0.0)
    ops.symmetric_rank_one_update(torch.eye(3), torch.ones(3), 0.5, 3.0)


@pytest.mark.skipif(_extension.load_error() is not None, reason="C++ extension fastrome._C not built")
def test_select_backend_follows_the_benchmarked_preference_on_cpu(monkeypatch, reference_spies):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    first = {op: ops.preference(op, "cpu")[0] for op in ops.OPS}
    assert first["second_moment_accumulate"] == "cpp"  # 4x the reference in benches/
    for op in ops.OPS:
        assert ops.select_backend(op, "cpu") == first[op]
        assert ops.select_backend(op, torch.device("cpu")) == first[op]
    _run_all_ops()
    assert reference_spies == {op: int(first[op] == "reference") for op in ops.OPS}


def test_select_backend_without_extension_falls_back(monkeypatch, reference_spies):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    monkeypatch.setattr(_extension, "load_error", lambda: "ImportError: pretend it is not built")
    for op in ops.OPS:
        assert ops.select_backend(op, "cpu") == "reference"
    _run_all_ops()
    assert reference_spies == {op: 1 for op in ops.OPS}
    with ops.use_backend("cpp"), pytest.raises(RuntimeError, match="not built"):
        ops.select_backend("solve_keys", "cpu")


def test_other_devices_use_reference(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    for op in ops.OPS:
        assert ops.select_backend(op, "meta") == "reference"


def test_use_backend_forces_reference(monkeypatch, reference_spies):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    with ops.use_backend("reference"):
        for op in ops.OPS:
            assert ops.select_backend(op, "cpu") == "reference"
        _run_all_ops()
        with ops.use_backend(None):  # nested: automatic choice again
            assert ops.forced_backend() is None
        assert ops.forced_backend() == "reference"
    assert ops.forced_backend() is None
    assert reference_spies == {op: 1 for op in ops.OPS}


def test_use_backend_forces_only_its_own_thread(monkeypatch):
    import threading

    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    inside, release, seen = threading.Event(), threading.Event(), {}

    def forcing():
        with ops.use_backend("reference"):
            seen["forcing"] = ops.forced_backend()
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=forcing)
    worker.start()
    assert inside.wait(10)
    seen["other"] = ops.forced_backend()  # this thread, while the other is inside its block
    release.set()
    worker.join(10)
    assert seen == {"forcing": "reference", "other": None}


def test_use_backend_restores_after_exception(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    with pytest.raises(KeyError):
        with ops.use_backend("reference"):
            raise KeyError("boom")
    assert ops.forced_backend() is None


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="bogus"):
        with ops.use_backend("bogus"):
            pass


def test_env_var_forces_reference(monkeypatch, reference_spies):
    monkeypatch.setenv(ops.ENV_BACKEND, "reference")
    for op in ops.OPS:
        assert ops.select_backend(op, "cpu") == "reference"
    _run_all_ops()
    assert reference_spies == {op: 1 for op in ops.OPS}


def test_env_var_bogus_raises(monkeypatch):
    monkeypatch.setenv(ops.ENV_BACKEND, "bogus")
    with pytest.raises(ValueError, match="FASTROME_BACKEND") as info:
        ops.select_backend("solve_keys", "cpu")
    assert "bogus" in str(info.value)
    acc = torch.eye(3)
    with pytest.raises(ValueError, match="FASTROME_BACKEND"):
        ops.second_moment_accumulate(acc, torch.ones(2, 3))
    assert torch.equal(acc, torch.eye(3))


@pytest.mark.parametrize("name,why", [("cuda", "CUDA|fastrome._C is not built"), ("triton", "Triton")])
def test_forcing_gpu_backend_on_cpu_raises(monkeypatch, name, why):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    for how in ("context", "env"):
        ctx = ops.use_backend(name) if how == "context" else ops.use_backend(None)
        if how == "env":
            monkeypatch.setenv(ops.ENV_BACKEND, name)
        with ctx:
            for op in ops.OPS:
                with pytest.raises(RuntimeError) as info:
                    ops.select_backend(op, "cpu")
                msg = str(info.value)
                assert repr(name) in msg and op in msg and "cpu" in msg and re.search(why, msg), msg
            acc = torch.eye(3)
            with pytest.raises(RuntimeError, match=why):
                ops.second_moment_accumulate(acc, torch.ones(2, 3))
            assert torch.equal(acc, torch.eye(3))
            w = torch.zeros(2, 3)
            with pytest.raises(RuntimeError, match=why):
                ops.rank_one_update(w, torch.ones(3), torch.ones(2), denom=1.0, min_denom=0.0)
            assert torch.equal(w, torch.zeros(2, 3))


def test_backend_table_lists_every_op(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    rows = ops.backend_table(("cpu",))
    assert sorted(r["op"] for r in rows) == sorted(ops.OPS)
    built = _extension.load_error() is None
    for r in rows:
        first = ops.preference(r["op"], "cpu")[0]
        assert r["backend"] == (first if built else "reference"), r
        if r["backend"] == "reference" and first == "cpp":
            assert "not built" in r["skipped"]["cpp"]


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


def test_ops_registered_with_mutation_schema():
    mutated = {
        "second_moment_accumulate": {"acc"},
        "solve_keys": set(),
        "rank_one_update": {"weight", "master"},
        "symmetric_rank_one_update": {"inverse"},
    }
    for op, want in mutated.items():
        packet = getattr(torch.ops.fastrome, op)
        schema = packet.default._schema
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert written == want, (op, written)


def test_fake_tensors_on_meta_device():
    """The fake implementations give the shapes/dtypes of the real ones (meta tensors use them)."""
    u, denom = ops.solve_keys(torch.eye(4, device=META), torch.ones(3, 4, dtype=torch.bfloat16, device=META))
    assert (u.shape, u.dtype, u.device) == ((3, 4), torch.float32, META)
    assert (denom.shape, denom.dtype) == ((3,), torch.float32)
    u, denom = ops.solve_keys(torch.eye(4, device=META), torch.ones(4, dtype=torch.float64, device=META))
    assert (u.shape, u.dtype, denom.shape, denom.dtype) == ((4,), torch.float64, (), torch.float64)
    w, u, lam = torch.zeros(2, 4, device=META), torch.ones(4, device=META), torch.ones(2, device=META)
    flag = ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0)
    assert (flag.shape, flag.dtype, flag.device) == ((), torch.bool, META)
    inverse = torch.eye(4, dtype=torch.float64, device=META)
    flag = ops.symmetric_rank_one_update(inverse, torch.ones(4, dtype=torch.bfloat16, device=META), 0.5, 2.0)
    assert (flag.shape, flag.dtype, flag.device) == ((), torch.bool, META)


def _opcheck_cases(g):
    d = 6
    c, _ = make_spd(d, g)
    inv64 = inverse_of(c)
    mask = torch.tensor([True, False, True, True, False])
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    one64, zero64 = one.double(), zero.double()
    w32, w16 = randn(4, d, g=g), randn(4, d, g=g, dtype=torch.bfloat16)
    return {
        "second_moment_accumulate": [
            (random_symmetric(d, torch.float32, g), randn(5, d, g=g), None),
            (random_symmetric(d, torch.float64, g), randn(5, d, g=g, dtype=torch.bfloat16), mask),
        ],
        "solve_keys": [
            (inv64, randn(d, g=g)),
            (inv64.float(), randn(3, d, g=g, dtype=torch.bfloat16)),
        ],
        "rank_one_update": [
            (w32, randn(d, g=g), randn(4, g=g), one, zero, None),
            (w16, randn(d, g=g), randn(4, g=g), one64, zero64, randn(4, d, g=g)),
            (w32.clone(), randn(d, g=g), randn(4, g=g), -one, zero, None),  # a refused write
        ],
        "symmetric_rank_one_update": [
            (random_symmetric(d, torch.float32, g), randn(d, g=g), one * 0.5, one * 2.0, zero),
            (inv64.clone(), randn(d, g=g, dtype=torch.bfloat16), -one64 * 0.25, one, zero64),
            (inv64.clone(), randn(d, g=g), one, -one, zero),  # 1 + β·uᵀk = 0: refused
        ],
    }


@pytest.mark.parametrize("op", ops.OPS)
def test_opcheck(backend, g, op):
    for args in _opcheck_cases(g)[op]:
        result = torch.library.opcheck(getattr(torch.ops.fastrome, op).default, args)
        assert result and all(v == "SUCCESS" for v in result.values()), result
