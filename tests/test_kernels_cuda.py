"""GPU tests of the CUDA kernels (csrc/cuda) through the public API with the "cuda" backend.

They skip on a machine without a CUDA device, or when the CUDA extension fastrome._C_cuda is not
built. Every numerical check compares with an independent float64 computation on the same
(rounded) inputs, with tolerances derived from the precision the ops promise: fp32 arithmetic
(fp64 for fp64 data) whatever the storage dtype. Refused writes must leave every bit in place.
"""

from __future__ import annotations

import contextlib
import math
import re
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

from fastrome import _extension, ops


def as_scalar(value, form):
    return kernel_checks.as_scalar(value, form, device=DEV)


def _why_skip():
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if _extension.load_error() is not None:
        return f"the extension fastrome._C is not built: {_extension.load_error()}"
    if not _extension.built_with_cuda():
        return f"the CUDA extension fastrome._C_cuda is not loaded: {_extension.cuda_load_error()}"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]

DEV = torch.device("cuda")
X_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cuda_backend(monkeypatch):
    """Every test runs the CUDA kernels (dispatch is checked, not assumed)."""
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    with ops.use_backend("cuda"):
        for op in ops.OPS:
            assert ops.select_backend(op, "cuda") == "cuda"
        yield


@pytest.fixture
def g(request) -> torch.Generator:
    """A CPU generator seeded from the test's id: reproducible inputs, whatever the GPU."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(*shape, g, dtype=torch.float32, scale=1.0, device=DEV):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def random_symmetric(d, dtype, g):
    a = randn(d, d, g=g, dtype=dtype)
    return a + a.t()  # exactly symmetric: addition commutes


def misaligned(t):
    """A contiguous copy of t whose data pointer is one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ops.OPS)
def test_cuda_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastrome_C::{op}", "CUDA")


# ----------------------------------------------------------------------------------------------
# second_moment_accumulate
# ----------------------------------------------------------------------------------------------


def expected_moment(acc0, parts):
    """fp64 ``acc0 + Σ xᵀx`` over masked rows, the error scale ``|acc0| + Σ |x|ᵀ|x|``, and n."""
    exp = acc0.double().clone()
    scale = acc0.double().abs()
    n = 0
    for x, mask in parts:
        r = x.double() if mask is None else x.double()[mask]
        exp += r.t() @ r
        scale += r.abs().t() @ r.abs()
        n += r.shape[0]
    return exp, scale, n


def moment_tol(scale, n, eps):
    # 4·sqrt(n) + 8 units cover a rounded summation in any order (as in tests/test_ops.py); n/8
    # more cover tensor-core accumulation, which may truncate once per 16-product MMA step. Still
    # ~50x below one bf16 rounding (2^-8) at n = 7000.
    return eps * (n / 8.0 + 4.0 * math.sqrt(max(n, 1)) + 8.0) * scale


def check_moment(acc, acc0, parts):
    exp, scale, n = expected_moment(acc0, parts)
    all_fp64 = all(x.dtype == torch.float64 for x, _ in parts) and acc.dtype == torch.float64
    eps = F64_EPS if all_fp64 else F32_EPS
    err = (acc.double() - exp).abs()
    ok = err <= moment_tol(scale, n, eps)
    assert torch.isfinite(acc).all()
    assert ok.all(), (
        f"{int((~ok).sum())}/{ok.numel()} elements off; max |err|/scale = "
        f"{(err / scale.clamp_min(1e-300)).max().item():.3e} (eps {eps:.1e}, n {n})"
    )
    assert same_bits(acc, acc.t()), "acc is not exactly symmetric"


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 37, 300])
@pytest.mark.parametrize("d", [1, 2, 13, 257, 576, 1024, 1025, 1536, 2053])
def test_second_moment_sizes(g, d, n, x_dtype, acc_dtype):
    """Sizes around the 1024-row GEMM blocks (1024, 1025, 2053: a ragged last block) and the
    32-wide fold tiles (1, 2, 13, 257, 576)."""
    acc0 = random_symmetric(d, acc_dtype, g)
    x = randn(n, d, g=g, dtype=x_dtype)
    acc = acc0.clone()
    assert ops.second_moment_accumulate(acc, x) is acc
    check_moment(acc, acc0, [(x, None)])


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 13, 1031])
def test_second_moment_no_rows_changes_nothing(g, d, acc_dtype):
    acc0 = random_symmetric(d, acc_dtype, g)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, randn(0, d, g=g, dtype=torch.bfloat16))
    assert same_bits(acc, acc0)


@pytest.mark.parametrize("x_layout", ["column_slice", "transposed", "row_strided"])
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("d", [13, 1031])
def test_second_moment_noncontiguous_x(g, d, x_dtype, x_layout):
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
@pytest.mark.parametrize("d", [7, 1031])
def test_second_moment_mask(g, d, which, acc_dtype):
    n = 61
    x = randn(n, d, g=g, dtype=torch.bfloat16)
    if which == "all":
        mask = torch.ones(n, dtype=torch.bool, device=DEV)
    elif which == "none":
        mask = torch.zeros(n, dtype=torch.bool, device=DEV)
    elif which == "one":
        mask = torch.zeros(n, dtype=torch.bool, device=DEV)
        mask[n // 2] = True
    elif which == "some":
        mask = (torch.rand(n, generator=g) < 0.4).to(DEV)
    else:
        mask = (torch.rand(2 * n, generator=g) < 0.4).to(DEV)[::2]
        assert not mask.is_contiguous()
    assert 0 < int(mask.sum()) < n or which in ("all", "none")
    mask_before = mask.clone()
    acc0 = random_symmetric(d, acc_dtype, g)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x, mask)
    if which == "none":
        assert same_bits(acc, acc0)  # masked rows add exact zeros
    check_moment(acc, acc0, [(x, mask)])
    assert torch.equal(mask, mask_before)
    if which == "some":
        exp_all, scale, _ = expected_moment(acc0, [(x, None)])
        assert not ((acc.double() - exp_all).abs() <= moment_tol(scale, n, F32_EPS)).all()


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_second_moment_masked_rows_may_hold_nan_and_inf(g, x_dtype):
    """Rows left out are replaced, not multiplied by 0: a NaN or Inf in them must not leak in."""
    n, d = 40, 300
    x = randn(n, d, g=g, dtype=x_dtype)
    mask = torch.rand(n, generator=g).to(DEV) < 0.5
    mask[0], mask[1], mask[2] = False, False, True
    x[0, 5] = math.nan
    x[1, :] = math.inf
    acc0 = random_symmetric(d, torch.float32, g)
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x, mask)
    check_moment(acc, acc0, [(x, mask)])


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [13, 1031])
def test_second_moment_accumulates_twice(g, d, acc_dtype):
    acc0 = random_symmetric(d, acc_dtype, g)
    x1 = randn(29, d, g=g, dtype=torch.float16)
    m1 = torch.rand(29, generator=g).to(DEV) < 0.5
    x2 = randn(17, d + 3, g=g, dtype=torch.float32)[:, 3:]
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x1, m1)
    ops.second_moment_accumulate(acc, x2)
    check_moment(acc, acc0, [(x1, m1), (x2, None)])


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
def test_second_moment_strided_acc(g, acc_dtype, x_dtype):
    """acc may be a view into a larger buffer; nothing outside it is touched."""
    d = 1100
    base = random_symmetric(d + 5, acc_dtype, g)
    acc = base[2 : 2 + d, 2 : 2 + d]
    inside = torch.zeros(base.shape, dtype=torch.bool, device=DEV)
    inside[2 : 2 + d, 2 : 2 + d] = True
    base0, acc0 = base.clone(), acc.clone()
    x = randn(40, d, g=g, dtype=x_dtype)
    ops.second_moment_accumulate(acc, x)
    check_moment(acc, acc0, [(x, None)])
    assert same_bits(base[~inside], base0[~inside])


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
def test_second_moment_column_major_acc(g, acc_dtype, x_dtype):
    d = 1031
    acc = random_symmetric(d, acc_dtype, g).t().contiguous().t()
    assert acc.stride() == (1, d)
    acc0 = acc.clone()
    x = randn(50, d, g=g, dtype=x_dtype)
    ops.second_moment_accumulate(acc, x)
    check_moment(acc, acc0, [(x, None)])


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


def test_second_moment_fp32_ignores_global_tf32(g):
    """fp32 inputs are multiplied in fp32 even when torch is told to allow TF32 matmuls; TF32
    (10-bit mantissa) would miss the fp32 tolerance by orders of magnitude."""
    d, n = 1031, 256
    acc0 = random_symmetric(d, torch.float32, g)
    x = randn(n, d, g=g, dtype=torch.float32)
    with tf32_matmuls():
        acc = acc0.clone()
        ops.second_moment_accumulate(acc, x)
        plain = acc0 + x.t() @ x  # torch's own matmul under the same setting
    exp, scale, _ = expected_moment(acc0, [(x, None)])
    if ((plain.double() - exp).abs() <= moment_tol(scale, n, F32_EPS)).all():
        pytest.skip("allowing TF32 did not change torch's fp32 matmul on this GPU: nothing to tell apart")
    check_moment(acc, acc0, [(x, None)])


@pytest.mark.parametrize(
    "d,n,x_dtype,acc_dtype",
    [
        (4096, 2048, torch.bfloat16, torch.float32),
        (4096, 1000, torch.bfloat16, torch.float64),
        (4096, 777, torch.float16, torch.float32),
        (11008, 256, torch.bfloat16, torch.float32),
    ],
    ids=str,
)
def test_second_moment_large(g, d, n, x_dtype, acc_dtype):
    """Model sizes: many 1024-row GEMM blocks and a large fold, against the fp64 product of the
    same bf16/fp16 inputs."""
    acc0 = random_symmetric(d, acc_dtype, g)
    x = randn(n, d, g=g, dtype=x_dtype)
    mask = torch.rand(n, generator=g).to(DEV) < 0.8
    acc = acc0.clone()
    ops.second_moment_accumulate(acc, x, mask)
    check_moment(acc, acc0, [(x, mask)])


def test_second_moment_tolerance_rejects_bf16_rounding(g):
    """The tolerance is tight enough that a single bf16 rounding of the product fails it."""
    d, n = 300, 256
    x = randn(n, d, g=g, dtype=torch.bfloat16)
    acc0 = random_symmetric(d, torch.float32, g)
    exp, scale, _ = expected_moment(acc0, [(x, None)])
    once = (x.double().t() @ x.double()).bfloat16().double()
    assert not ((acc0.double() + once - exp).abs() <= moment_tol(scale, n, F32_EPS)).all()


# ----------------------------------------------------------------------------------------------
# solve_keys
# ----------------------------------------------------------------------------------------------


def check_solve(u, denom, inverse, k):
    """u is A·k formed in A's dtype (k converted to it) and rounded once; denom = Σ u_i k_i in fp64
    from that rounded u."""
    d = inverse.shape[0]
    out_dtype = torch.promote_types(k.dtype, torch.float32)
    assert u.dtype == out_dtype and denom.dtype == out_dtype
    assert u.shape == k.shape and denom.shape == k.shape[:-1]
    assert u.device == k.device and denom.device == k.device
    assert torch.isfinite(u).all() and torch.isfinite(denom).all()

    a64 = inverse.double()
    k_a = k.to(inverse.dtype).double()  # the key as the product sees it
    exact = k_a @ a64  # A is symmetric: k A = (A k)ᵀ
    magnitude = k_a.abs() @ a64.abs()
    # Worst case of a lane-wise sum of d/32 terms and a 5-level butterfly, plus the output rounding.
    eps_a = torch.finfo(inverse.dtype).eps
    eps_out = torch.finfo(out_dtype).eps
    tol = (d / 32.0 + 8.0) * eps_a * magnitude + eps_out * exact.abs()
    err = (u.double() - exact).abs()
    assert (err <= tol).all(), f"max err {err.max().item():.3e}, max tol {tol.max().item():.3e}"

    prods = u.double() * k.double()
    want = prods.sum(-1)
    dtol = eps_out * want.abs() + 4.0 * d * F64_EPS * prods.abs().sum(-1)
    assert ((denom.double() - want).abs() <= dtol).all()


@pytest.mark.parametrize("batch", [None, 1, 4, 5, 9], ids=lambda b: "single" if b is None else f"b{b}")
@pytest.mark.parametrize("k_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("inverse_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("d", [1, 2, 13, 257, 576, 1536])
def test_solve_keys(g, d, inverse_dtype, k_dtype, batch):
    """d = 576, 1536 take the 16-byte vector path, the others the element path; batches of 4
    and more tile the keys (5, 9: a partial last tile)."""
    inverse = random_symmetric(d, inverse_dtype, g)
    k = randn(*(() if batch is None else (batch,)), d, g=g, dtype=k_dtype)
    inverse0, k0 = inverse.clone(), k.clone()
    u, denom = ops.solve_keys(inverse, k)
    check_solve(u, denom, inverse, k)
    assert same_bits(inverse, inverse0) and same_bits(k, k0)


@pytest.mark.parametrize("k_layout", ["strided_1d", "transposed_2d", "column_slice_2d", "row_strided_2d"])
@pytest.mark.parametrize("inverse_layout", ["contiguous", "column_major", "sliced", "misaligned"])
@pytest.mark.parametrize("d", [37, 576])
def test_solve_keys_layouts(g, d, k_layout, inverse_layout):
    b = 4
    inverse = random_symmetric(d, torch.float64, g)
    if inverse_layout == "column_major":
        inverse = inverse.t().contiguous().t()
        assert not inverse.is_contiguous()
    elif inverse_layout == "sliced":
        big = torch.full((d + 3, d + 5), math.nan, dtype=torch.float64, device=DEV)
        big[2 : 2 + d, 1 : 1 + d] = inverse
        inverse = big[2 : 2 + d, 1 : 1 + d]
        assert not inverse.is_contiguous() and not inverse.t().is_contiguous()
    elif inverse_layout == "misaligned":
        inverse = misaligned(inverse)
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
    check_solve(u, denom, inverse, k)


def test_solve_keys_exact_small_case():
    """By hand: rows against columns, and the fused denominator."""
    a = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 3.0, 0.25], [0.5, 0.25, 1.0]], dtype=torch.float64, device=DEV)
    k = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64, device=DEV)
    want = torch.tensor([6.0, -6.0, 4.0], dtype=torch.float64, device=DEV)
    u, denom = ops.solve_keys(a, k)
    torch.testing.assert_close(u, want, rtol=0, atol=0)
    torch.testing.assert_close(denom, (want * k).sum(), rtol=0, atol=0)


def test_solve_keys_is_deterministic(g):
    d = 1536
    inverse = random_symmetric(d, torch.float32, g)
    k = randn(6, d, g=g)
    u1, d1 = ops.solve_keys(inverse, k)
    u2, d2 = ops.solve_keys(inverse, k)
    assert same_bits(u1, u2) and same_bits(d1, d2)


def test_solve_keys_empty_batch(g):
    inverse = random_symmetric(8, torch.float64, g)
    u, denom = ops.solve_keys(inverse, torch.empty(0, 8, device=DEV))
    assert u.shape == (0, 8) and denom.shape == (0,) and u.dtype == torch.float32


@pytest.mark.parametrize(
    "d,inverse_dtype,batch", [(4096, torch.float64, None), (4096, torch.float64, 3), (11008, torch.float32, 2)], ids=str
)
def test_solve_keys_large(g, d, inverse_dtype, batch):
    inverse = random_symmetric(d, inverse_dtype, g)
    k = randn(*(() if batch is None else (batch,)), d, g=g)
    u, denom = ops.solve_keys(inverse, k)
    check_solve(u, denom, inverse, k)


def test_solve_keys_spd_solve(g):
    """With a real inverse, u solves C u = k to the accuracy the condition number allows."""
    d = 257
    a = randn(d, 2 * d + 1, g=g, dtype=torch.float64) / math.sqrt(2 * d + 1)
    c = a @ a.t() + 0.1 * torch.eye(d, dtype=torch.float64, device=DEV)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(c))
    inverse = 0.5 * (inverse + inverse.t())
    ev = torch.linalg.eigvalsh(c)
    cond = (ev[-1] / ev[0]).item()
    k = randn(3, d, g=g, dtype=torch.float64)
    u, denom = ops.solve_keys(inverse, k)
    want = torch.linalg.solve(c, k.t()).t()
    err = (u - want).norm(dim=-1) / want.norm(dim=-1)
    assert (err <= 4.0 * cond * (math.sqrt(d) + 1.0) * F64_EPS).all()
    assert (denom > 0).all()


# ----------------------------------------------------------------------------------------------
# rank_one_update
# ----------------------------------------------------------------------------------------------


def layout(kind, rows, cols):
    """``(base_shape, view_of)``: how a (rows, cols) matrix is stored in layout ``kind``."""
    return {
        "contiguous": ((rows, cols), lambda b: b),
        "transposed": ((cols, rows), lambda b: b.t()),  # GPT-2 Conv1D: stored (d_in, d_out)
        "sliced": ((rows + 3, 2 * cols + 1), lambda b: b[1 : 1 + rows, 1::2]),
    }[kind]


def base_and_view(kind, rows, cols, g, dtype, scale=1.0):
    """A (rows, cols) view of a fresh base tensor, and a mask of the base elements it covers."""
    shape, view_of = layout(kind, rows, cols)
    base = randn(*shape, g=g, dtype=dtype, scale=scale)
    inside = torch.zeros(shape, dtype=torch.bool, device=DEV)
    view_of(inside).fill_(True)
    return base, view_of(base), inside


def check_plain_update(w, w0, lam, u):
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    exact, bound = rank_one_bounds(w0, lam, u, compute)
    check_rounded_update(w, exact, bound)


def check_flag(flag, w, applied):
    assert isinstance(flag, torch.Tensor)
    assert flag.dtype == torch.bool and flag.shape == () and flag.device == w.device
    assert bool(flag) is applied


@pytest.mark.parametrize("use_master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("kind", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (13, 7), (8, 16), (576, 1536)], ids=str)
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
def test_rank_one_update(g, w_dtype, shape, kind, use_master):
    d_out, d_in = shape
    u = randn(d_in, g=g, scale=0.1)
    lam = randn(d_out, g=g)
    if use_master:
        m_base, master, inside = base_and_view(kind, d_out, d_in, g, torch.float32, scale=0.5)
        poison_negative_zeros(m_base)
        w_base = m_base.to(w_dtype)
        w = layout(kind, d_out, d_in)[1](w_base)
        m_base0, master0 = m_base.clone(), master.clone()
    else:
        w_base, w, inside = base_and_view(kind, d_out, d_in, g, w_dtype, scale=0.5)
        poison_negative_zeros(w_base)
        master = None
    w_base0, w0 = w_base.clone(), w.clone()
    u0, lam0 = u.clone(), lam.clone()

    flag = ops.rank_one_update(w, u, lam, denom=1.0, min_denom=1e-6, master=master)

    check_flag(flag, w, True)
    if use_master:
        check_master_update(w, master, master0, lam, u)
        assert same_bits(m_base[~inside], m_base0[~inside])
    else:
        check_plain_update(w, w0, lam, u)
    assert same_bits(w_base[~inside], w_base0[~inside]), "wrote outside the view"
    assert same_bits(u, u0) and same_bits(lam, lam0)


@pytest.mark.parametrize("master_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(19, 23), (64, 256)], ids=str)
def test_rank_one_update_master_dtypes(g, shape, w_dtype, master_dtype):
    """Any fp32/fp64 master with any weight dtype; the master's dtype sets the arithmetic."""
    d_out, d_in = shape
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
@pytest.mark.parametrize("shape", [(11, 17), (32, 64)], ids=str)
def test_rank_one_update_mixed_vector_dtypes(g, shape, w_dtype, u_dtype, lam_dtype):
    d_out, d_in = shape
    w = randn(d_out, d_in, g=g, dtype=w_dtype)
    u, lam = randn(d_in, g=g, dtype=u_dtype, scale=0.1), randn(d_out, g=g, dtype=lam_dtype)
    w0 = w.clone()
    assert bool(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0))
    check_plain_update(w, w0, lam, u)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rank_one_update_strided_vectors(g, w_dtype):
    d_out, d_in = 64, 96
    w = randn(d_out, d_in, g=g, dtype=w_dtype)
    u = randn(3 * d_in, g=g, scale=0.1)[::3]
    lam = randn(2 * d_out, g=g)[1::2]
    w0 = w.clone()
    assert bool(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0))
    check_plain_update(w, w0, lam, u)


@pytest.mark.parametrize("use_master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
def test_rank_one_update_misaligned_storage(g, w_dtype, use_master):
    """Storage that starts off a 16-byte boundary takes the element path, with the same results."""
    d_out, d_in = 32, 64
    u, lam = randn(d_in, g=g, scale=0.1), randn(d_out, g=g)
    if use_master:
        master = misaligned(randn(d_out, d_in, g=g))
        w = master.to(w_dtype)
        master0 = master.clone()
        assert bool(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0, master=master))
        check_master_update(w, master, master0, lam, u)
    else:
        w = misaligned(randn(d_out, d_in, g=g, dtype=w_dtype))
        w0 = w.clone()
        assert bool(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0))
        check_plain_update(w, w0, lam, u)


def test_rank_one_update_master_in_another_layout(g):
    """A Conv1D (transposed) weight with a row-major master: read and written with both strides."""
    d_out, d_in = 48, 80
    master = randn(d_out, d_in, g=g)
    w = master.t().contiguous().to(torch.bfloat16).t()
    assert w.stride() == (1, d_out)
    master0 = master.clone()
    u, lam = randn(d_in, g=g, scale=0.1), randn(d_out, g=g)
    assert bool(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0, master=master))
    check_master_update(w, master, master0, lam, u)


@pytest.mark.parametrize(
    "w_dtype,kind,use_master",
    [
        (torch.float32, "contiguous", False),
        (torch.bfloat16, "contiguous", True),
        (torch.bfloat16, "transposed", False),
        (torch.float16, "contiguous", False),
        (torch.float64, "transposed", True),
    ],
    ids=str,
)
def test_rank_one_update_large(g, w_dtype, kind, use_master):
    """4096 × 11008 (a Llama-7B MLP matrix), checked in row blocks to keep fp64 temporaries small."""
    d_out, d_in = 4096, 11008
    u = randn(d_in, g=g, scale=0.02)
    lam = randn(d_out, g=g)
    shape, view_of = layout(kind, d_out, d_in)
    if use_master:
        m_dtype = torch.float64 if w_dtype == torch.float64 else torch.float32
        master = view_of(torch.empty(shape, dtype=m_dtype, device=DEV).uniform_(-0.5, 0.5))
        w = view_of(torch.empty(shape, dtype=w_dtype, device=DEV))
        w.copy_(master)
        before = master.clone()
    else:
        master = None
        w = view_of(torch.empty(shape, device=DEV).uniform_(-0.5, 0.5).to(w_dtype))
        before = w.clone()
    denom, min_denom = torch.tensor(3.0, device=DEV), torch.tensor(1e-8, device=DEV)
    flag = ops.rank_one_update(w, u, lam, denom=denom, min_denom=min_denom, master=master)
    check_flag(flag, w, True)
    for r in range(0, d_out, 512):
        rows = slice(r, r + 512)
        if use_master:
            check_master_update(w[rows], master[rows], before[rows], lam[rows], u)
        else:
            check_plain_update(w[rows], before[rows], lam[rows], u)


@pytest.mark.parametrize("use_master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("shape", [(9, 14), (64, 2056)], ids=str)
@pytest.mark.parametrize("case", list(GUARD_CASES))
def test_rank_one_update_refused(g, case, shape, use_master):
    """A refused write returns False and leaves weight and master bit for bit as they were (on
    both the vector path, (64, 2056), and the element path, (9, 14))."""
    denom, min_denom, poison = GUARD_CASES[case]
    d_out, d_in = shape
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
            check_flag(flag, w, False)
            assert same_bits(w, w0), f"a refused write changed the weight ({where})"
            if master is not None:
                assert same_bits(master, m0), f"a refused write changed the master ({where})"


def test_rank_one_update_refused_large(g):
    """One NaN in u: a 4096 × 11008 bf16 weight and its master stay bit-identical."""
    d_out, d_in = 4096, 11008
    master = torch.empty(d_out, d_in, device=DEV).uniform_(-0.5, 0.5)
    w = master.to(torch.bfloat16)
    u, lam = randn(d_in, g=g), randn(d_out, g=g)
    u[d_in - 3] = math.nan
    w0, m0 = w.clone(), master.clone()
    flag = ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0, master=master)
    check_flag(flag, w, False)
    assert same_bits(w, w0) and same_bits(master, m0)


@pytest.mark.parametrize("form", ["float", "f32", "f64"])
@pytest.mark.parametrize("case", list(ACCEPT_CASES))
def test_rank_one_update_accepted_boundaries(g, case, form):
    denom, min_denom = ACCEPT_CASES[case]
    w = randn(6, 5, g=g)
    u, lam = randn(5, g=g), randn(6, g=g)
    w0 = w.clone()
    flag = ops.rank_one_update(w, u, lam, denom=as_scalar(denom, form), min_denom=as_scalar(min_denom, form))
    check_flag(flag, w, True)
    check_plain_update(w, w0, lam, u)


def test_rank_one_update_scalars_in_16bit_dtypes(g):
    w = randn(4, 8, g=g)
    w0 = w.clone()
    u, lam = randn(8, g=g), randn(4, g=g)
    denom = torch.tensor(2.0, dtype=torch.bfloat16, device=DEV)
    min_denom = torch.tensor(1.0, dtype=torch.float16, device=DEV)
    assert bool(ops.rank_one_update(w, u, lam, denom=denom, min_denom=min_denom))
    check_plain_update(w, w0, lam, u)


def test_rank_one_update_refuses_vectors_that_overflow_the_compute_dtype(g):
    """u is finite in fp64 but not in the fp32 arithmetic of an fp32 weight: nothing is written."""
    w = randn(4, 3, g=g)
    w0 = w.clone()
    u = torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64, device=DEV)
    assert bool(ops.rank_one_update(w, u, randn(4, g=g), denom=1.0, min_denom=0.0)) is False
    assert same_bits(w, w0)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rank_one_update_keeps_denormals(w_dtype):
    """No flush-to-zero: denormal weights and products are kept as IEEE arithmetic gives them."""
    tiny = 1e-39  # below fp32's smallest normal (1.18e-38), representable in fp32 and bf16
    w = torch.full((4, 8), tiny, device=DEV).to(w_dtype)
    u = torch.full((8,), tiny, device=DEV)
    lam = torch.ones(4, device=DEV)
    w0_cpu = w.cpu().clone()
    assert bool(ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0))
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


def sym_matrix(d, dtype, g):
    return random_symmetric_matrix(d, dtype, g, device=DEV)


def check_sym_update(m, m0, u, beta, denom):
    exact, bound = symmetric_update_bounds(m0, u, beta, denom)
    check_symmetric_update(m, exact, bound)


SYM_U_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


# d % 4 == 0 takes the vector path for fp32 and fp64 (d % 2 == 0); odd sizes the element path.
@pytest.mark.parametrize("u_dtype", SYM_U_DTYPES, ids=str)
@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 2, 7, 8, 97, 576, 1536, 2053])
def test_symmetric_rank_one_update(g, d, m_dtype, u_dtype):
    m = sym_matrix(d, m_dtype, g)
    u = randn(d, g=g, dtype=u_dtype)
    beta, denom = draw_beta_denom(g)
    m0, u0 = m.clone(), u.clone()
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    check_sym_update(m, m0, u, beta, denom)
    assert same_bits(u, u0)


@pytest.mark.parametrize("u_kind", ["contiguous", "strided", "misaligned"])
@pytest.mark.parametrize("m_kind", ["contiguous", "transposed", "sliced", "misaligned"])
@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [37, 64])
def test_symmetric_rank_one_update_layouts(g, d, m_dtype, m_kind, u_kind):
    """Every layout of the matrix and of u, on both write paths; nothing outside a view is written."""
    sym = sym_matrix(d, m_dtype, g)
    if m_kind == "sliced":
        base = randn(d + 3, 2 * d + 1, g=g, dtype=m_dtype)
        m = base[1 : 1 + d, 1::2]
        m.copy_(sym)
        inside = torch.zeros(base.shape, dtype=torch.bool, device=DEV)
        inside[1 : 1 + d, 1::2] = True
    else:
        base = {"contiguous": sym, "transposed": sym.t().contiguous(), "misaligned": misaligned(sym)}[m_kind]
        m = base.t() if m_kind == "transposed" else base
        inside = torch.ones(base.shape, dtype=torch.bool, device=DEV)
    u = randn(d, g=g, dtype=m_dtype)
    if u_kind == "strided":
        u = randn(3 * d, g=g, dtype=torch.bfloat16)[1::3]
    elif u_kind == "misaligned":
        u = misaligned(u)
    base0, m0, u0 = base.clone(), m.clone(), u.clone()
    beta, denom = draw_beta_denom(g)
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    check_sym_update(m, m0, u, beta, denom)
    assert same_bits(base[~inside], base0[~inside]), "wrote outside the view"
    assert same_bits(u, u0)


@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
def test_symmetric_rank_one_update_large(g, m_dtype):
    """11008 × 11008 (Llama-7B's d_ff), checked in row blocks to keep fp64 temporaries small."""
    d = 11008
    m = torch.empty(d, d, dtype=m_dtype, device=DEV).uniform_(-0.5, 0.5)
    m = m + m.t()  # exactly symmetric
    u = randn(d, g=g, scale=0.1)
    beta, denom = draw_beta_denom(g)
    m0 = m.clone()
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    coef = kernel_checks.sherman_morrison_coef(beta, denom)
    u64 = u.to(m_dtype).double()
    eps = torch.finfo(m_dtype).eps
    for r in range(0, d, 1024):
        rows = slice(r, r + 1024)
        outer = torch.outer(u64[rows], u64)
        exact = m0[rows].double() - coef * outer
        bound = (m0[rows].double().abs() + 2.0 * abs(coef) * outer.abs()) * eps
        assert ((m[rows].double() - exact).abs() <= bound).all(), f"rows {r}..{r + 1024}"
    assert same_bits(m, m.t())


@pytest.mark.parametrize("d", [13, 64])
@pytest.mark.parametrize("case", list(SYM_GUARD_CASES))
def test_symmetric_rank_one_update_refused(g, case, d):
    """A refused update returns False and leaves the matrix bit for bit as it was, on the element
    path (13) and the vector path (64)."""
    beta, denom, floor, poison = SYM_GUARD_CASES[case]
    for m_dtype in ACC_DTYPES:
        for form in ("float", "f32", "f64"):
            m = sym_matrix(d, m_dtype, g)
            u = randn(d, g=g, dtype=m_dtype)
            plant_in_u(u, poison)
            m0 = m.clone()
            flag = ops.symmetric_rank_one_update(
                m, u, as_scalar(beta, form), as_scalar(denom, form), min_denom=as_scalar(floor, form)
            )
            check_flag(flag, m, False)
            assert same_bits(m, m0), f"a refused update changed the inverse ({m_dtype}, scalars as {form})"


@pytest.mark.parametrize("form", ["float", "f32", "f64"])
@pytest.mark.parametrize("case", list(SYM_ACCEPT_CASES))
def test_symmetric_rank_one_update_accepted_boundaries(g, case, form):
    beta, denom, floor = SYM_ACCEPT_CASES[case]
    for m_dtype in ACC_DTYPES:
        m = sym_matrix(8, m_dtype, g)
        u = randn(8, g=g)
        m0 = m.clone()
        flag = ops.symmetric_rank_one_update(
            m, u, as_scalar(beta, form), as_scalar(denom, form), min_denom=as_scalar(floor, form)
        )
        check_flag(flag, m, True)
        check_sym_update(m, m0, u, beta, denom)


@pytest.mark.parametrize("d", [13, 64])
def test_symmetric_rank_one_update_zero_beta_writes_nothing(g, d):
    for m_dtype in ACC_DTYPES:
        m = sym_matrix(d, m_dtype, g)
        m0 = m.clone()
        check_flag(ops.symmetric_rank_one_update(m, randn(d, g=g), 0.0, 3.0), m, True)
        assert same_bits(m, m0)


def test_symmetric_rank_one_update_guards_in_the_matrix_dtype(g):
    """u and coef finite in fp64 but not in fp32: refused for an fp32 inverse, applied for fp64."""
    u = torch.tensor([1.0, 1e300, 2.0, 0.5], dtype=torch.float64, device=DEV)
    m = sym_matrix(4, torch.float32, g)
    m0 = m.clone()
    check_flag(ops.symmetric_rank_one_update(m, u, 0.5, 1.0), m, False)
    assert same_bits(m, m0)
    u = randn(8, g=g, dtype=torch.float64, scale=1e-20)
    for m_dtype, applied in [(torch.float32, False), (torch.float64, True)]:
        m = sym_matrix(8, m_dtype, g)
        m0 = m.clone()
        check_flag(ops.symmetric_rank_one_update(m, u, 1e39, 0.0), m, applied)
        if applied:
            check_sym_update(m, m0, u, 1e39, 0.0)
        else:
            assert same_bits(m, m0)


def test_symmetric_rank_one_update_is_correctly_rounded(g):
    """Every operation correctly rounded and none contracted into an FMA, in the documented order:
    coef = β / (1 + β·denom) in fp64 rounded to the matrix dtype, then m - coef·(u_i·u_j). The result
    equals that computation done here on the CPU bit for bit, on both write paths."""
    for d, m_dtype in [(97, torch.float32), (64, torch.float32), (576, torch.float64), (37, torch.float64)]:
        m = sym_matrix(d, m_dtype, g)
        u = randn(d, g=g, dtype=torch.bfloat16)
        beta, denom = draw_beta_denom(g)
        coef = torch.tensor(beta / (1.0 + beta * denom), dtype=torch.float64).to(m_dtype)
        uc = u.cpu().to(m_dtype)
        want = m.cpu() - coef * (uc[:, None] * uc[None, :])
        check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
        assert same_bits(m.cpu(), want), f"d {d}, {m_dtype}"


@pytest.mark.parametrize("m_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [7, 576])
def test_symmetric_rank_one_update_adds_and_removes_a_key(g, d, m_dtype):
    """From A⁻¹ of a random SPD A: adding key k gives (A + βkkᵀ)⁻¹, removing it (-β, with u and uᵀk
    of the new inverse) gives A⁻¹ back (tolerances as in tests/test_ops.py: the removal's errors
    grow with its amplification 1 + β·uᵀk)."""
    a = torch.randn(d, 2 * d + 1, generator=g, dtype=torch.float64) / math.sqrt(2 * d + 1)
    c = a @ a.t() + 0.1 * torch.eye(d, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(c)
    unit = (ev[-1] / ev[0]).item() * (math.sqrt(d) + 1.0) * torch.finfo(m_dtype).eps
    k = torch.randn(d, generator=g, dtype=torch.float64)
    start = torch.cholesky_inverse(torch.linalg.cholesky(c))
    start = 0.5 * (start + start.t())
    m = start.to(m_dtype).to(DEV)
    u, denom = ops.solve_keys(m, k.to(DEV))
    beta = 2.0
    amplification = 1.0 + beta * float(denom)
    check_flag(ops.symmetric_rank_one_update(m, u, beta, denom), m, True)
    want = torch.linalg.inv(c + beta * torch.outer(k, k))
    assert same_bits(m, m.t())
    assert ((m.double().cpu() - want).norm() / want.norm()).item() <= 2.0 * unit
    u, denom = ops.solve_keys(m, k.to(DEV))
    check_flag(ops.symmetric_rank_one_update(m, u, -beta, denom), m, True)
    assert same_bits(m, m.t())
    assert ((m.double().cpu() - start).norm() / start.norm()).item() <= 4.0 * unit * amplification


# ----------------------------------------------------------------------------------------------
# No host synchronisation, argument checks of the raw ops, torch.library checks
# ----------------------------------------------------------------------------------------------


def test_no_host_sync(g):
    """torch's sync debug mode raises on any synchronising CUDA call inside the ops (an .item(),
    a nonzero() for the mask, a copy to the host)."""
    d = 64
    acc = random_symmetric(d, torch.float32, g)
    x = randn(20, d, g=g, dtype=torch.bfloat16)
    mask = torch.rand(20, generator=g).to(DEV) < 0.5
    inverse = random_symmetric(d, torch.float64, g)
    k = randn(3, d, g=g)
    w, master = randn(32, d, g=g, dtype=torch.bfloat16), randn(32, d, g=g)
    u, lam = randn(d, g=g), randn(32, g=g)
    denom, min_denom = torch.tensor(1.0, device=DEV), torch.tensor(0.0, device=DEV)
    beta = torch.tensor(0.5, dtype=torch.float64, device=DEV)
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


RAW = torch.ops.fastrome_C


def _raw_cases():
    cpu = torch.device("cpu")
    acc, x = torch.eye(4, device=DEV), torch.ones(3, 4, device=DEV)
    inv, k = torch.eye(4, dtype=torch.float64, device=DEV), torch.ones(4, device=DEV)
    w, u, lam = torch.zeros(3, 4, device=DEV), torch.ones(4, device=DEV), torch.ones(3, device=DEV)
    one, zero = torch.tensor(1.0, device=DEV), torch.tensor(0.0, device=DEV)
    return {
        "sma_x_on_cpu": (lambda: RAW.second_moment_accumulate(acc, x.to(cpu), None), "x: expected a CUDA tensor"),
        "sma_mask_on_cpu": (
            lambda: RAW.second_moment_accumulate(acc, x, torch.ones(3, dtype=torch.bool)),
            "mask: expected a CUDA tensor",
        ),
        "sma_acc_bf16": (
            lambda: RAW.second_moment_accumulate(acc.bfloat16(), x, None),
            "acc: expected float32 or float64, got BFloat16",
        ),
        "sma_x_wrong_d": (
            lambda: RAW.second_moment_accumulate(acc, torch.ones(3, 5, device=DEV), None),
            "x: expected shape (n, 4), got [3, 5]",
        ),
        "sma_acc_expanded": (
            lambda: RAW.second_moment_accumulate(torch.zeros(1, 4, device=DEV).expand(4, 4), x, None),
            "acc: elements overlap",
        ),
        "solve_k_on_cpu": (lambda: RAW.solve_keys(inv, k.to(cpu)), "k: expected a CUDA tensor"),
        "solve_k_wrong_d": (
            lambda: RAW.solve_keys(inv, torch.ones(5, device=DEV)),
            "k: expected (4,) or (b, 4) floating point, got Float [5]",
        ),
        "solve_inverse_fp16": (
            lambda: RAW.solve_keys(inv.half(), k),
            "inverse: expected a square float32/float64 matrix, got Half",
        ),
        "r1u_u_on_cpu": (lambda: RAW.rank_one_update(w, u.to(cpu), lam, one, zero, None), "u: expected a CUDA tensor"),
        "r1u_denom_on_cpu": (
            lambda: RAW.rank_one_update(w, u, lam, one.to(cpu), zero, None),
            "denom: expected a CUDA tensor",
        ),
        "r1u_master_wrong_shape": (
            lambda: RAW.rank_one_update(w, u, lam, one, zero, torch.zeros(4, 3, device=DEV)),
            "master: expected float32/float64 of sizes [3, 4], got Float [4, 3]",
        ),
        "r1u_u_wrong_len": (
            lambda: RAW.rank_one_update(w, torch.ones(5, device=DEV), lam, one, zero, None),
            "u: expected (4,) floating point, got Float [5]",
        ),
        "r1u_denom_int": (
            lambda: RAW.rank_one_update(w, u, lam, torch.tensor(1, device=DEV), zero, None),
            "denom and min_denom: expected floating-point scalars, got Long and Float",
        ),
        "r1u_weight_expanded": (
            lambda: RAW.rank_one_update(torch.zeros(1, 4, device=DEV).expand(3, 4), u, lam, one, zero, None),
            "weight: elements overlap",
        ),
        "sru_u_on_cpu": (
            lambda: RAW.symmetric_rank_one_update(inv.clone(), k.to(cpu), one, one, zero),
            "u: expected a CUDA tensor",
        ),
        "sru_beta_on_cpu": (
            lambda: RAW.symmetric_rank_one_update(inv.clone(), k, one.to(cpu), one, zero),
            "beta: expected a CUDA tensor",
        ),
        "sru_inverse_bf16": (
            lambda: RAW.symmetric_rank_one_update(inv.bfloat16(), k, one, one, zero),
            "inverse: expected a square float32/float64 matrix, got BFloat16",
        ),
        "sru_u_wrong_len": (
            lambda: RAW.symmetric_rank_one_update(inv.clone(), torch.ones(5, device=DEV), one, one, zero),
            "u: expected (4,) floating point, got Float [5]",
        ),
        "sru_scalar_int": (
            lambda: RAW.symmetric_rank_one_update(inv.clone(), k, torch.tensor(1, device=DEV), one, zero),
            "beta, denom and min_denom: expected floating-point scalars, got Long, Float and Float",
        ),
        "sru_inverse_expanded": (
            lambda: RAW.symmetric_rank_one_update(torch.zeros(1, 4, device=DEV).expand(4, 4), k, one, one, zero),
            "inverse: elements overlap",
        ),
        "sru_u_row_of_inverse": (
            lambda: (lambda m: RAW.symmetric_rank_one_update(m, m[1], one, one, zero))(inv.clone()),
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
def test_raw_op_argument_checks(case):
    """The CUDA kernels check their own arguments (messages carry the values) and raise
    ValueError before touching anything."""
    call, needle = _raw_cases()[case]
    with pytest.raises(ValueError, match=re.escape(needle)):
        call()


def _opcheck_cases(g):
    d = 6
    mask = torch.tensor([True, False, True, True, False], device=DEV)
    one, zero = torch.tensor(1.0, device=DEV), torch.tensor(0.0, device=DEV)
    inv = random_symmetric(d, torch.float64, g)
    return {
        "second_moment_accumulate": [
            (random_symmetric(d, torch.float32, g), randn(5, d, g=g), None),
            (random_symmetric(d, torch.float64, g), randn(5, d, g=g, dtype=torch.bfloat16), mask),
        ],
        "solve_keys": [(inv, randn(d, g=g)), (inv.float(), randn(3, d, g=g, dtype=torch.bfloat16))],
        "rank_one_update": [
            (randn(4, d, g=g), randn(d, g=g), randn(4, g=g), one, zero, None),
            (randn(4, d, g=g, dtype=torch.bfloat16), randn(d, g=g), randn(4, g=g), one.double(), zero.double(),
             randn(4, d, g=g)),
            (randn(4, d, g=g), randn(d, g=g), randn(4, g=g), -one, zero, None),  # a refused write
        ],
        "symmetric_rank_one_update": [
            (random_symmetric(d, torch.float32, g), randn(d, g=g), one * 0.5, one * 2.0, zero),
            (inv.clone(), randn(d, g=g, dtype=torch.bfloat16), -one.double() * 0.25, one, zero.double()),
            (inv.clone(), randn(d, g=g), one, -one, zero),  # 1 + β·uᵀk = 0: refused
        ],
    }


@pytest.mark.parametrize("op", ops.OPS)
def test_opcheck(g, op):
    for args in _opcheck_cases(g)[op]:
        result = torch.library.opcheck(getattr(torch.ops.fastrome, op).default, args)
        assert result and all(v == "SUCCESS" for v in result.values()), result
