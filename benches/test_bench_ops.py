"""The ops on every available backend, against torch's best equivalents and the device's
measured ceilings (a large GEMM, a large copy), all in the same run."""

from __future__ import annotations

import os

import pytest
import torch
from harness import DEVICE

from fastrome import ops

CPU = DEVICE == "cpu"
FAST_DTYPE = torch.float32 if CPU else torch.bfloat16  # the GEMM ceiling's dtype

# (n rows, d): CPU sizes stay in seconds; GPU sizes are Llama-2-7B's (d_ff 11008, hidden 4096).
# FASTROME_BENCH_SIZES=llama7b runs Llama-2-7B's sizes on the CPU too (fewer rows per batch).
LLAMA7B = not CPU or os.environ.get("FASTROME_BENCH_SIZES") == "llama7b"
ROWS = 512 if CPU else 8192
MOMENT_SHAPES = [(ROWS, 11008), (ROWS, 4096)] if LLAMA7B else [(4096, 1536), (2048, 4096)]
SOLVE_DIMS = [4096, 11008] if LLAMA7B else [1536, 4096]
WRITE_SHAPES = [(576, 1536), (4096, 11008)]


def backends(op: str):
    out = []
    for name in ops.preference(op, DEVICE):
        if ops._backend_serves(ops.BACKENDS[name], op, torch.device(DEVICE)) is None:
            out.append(name)
    return out


def gen():
    return torch.Generator(device=DEVICE).manual_seed(0)


# -- ceilings ------------------------------------------------------------------------------------
def test_ceiling_gemm(timed):
    n = 2048 if CPU else 8192
    a = torch.randn(n, n, device=DEVICE, dtype=FAST_DTYPE, generator=gen())
    b = torch.randn(n, n, device=DEVICE, dtype=FAST_DTYPE, generator=gen())
    timed(lambda: torch.mm(a, b), op="ceiling", impl=f"{str(FAST_DTYPE)[6:]} GEMM", shape=[n, n, n],
          flop=2 * n**3)


def test_ceiling_copy(timed):
    n = (64 if CPU else 1024) * 2**20
    src = torch.empty(n, device=DEVICE, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    timed(lambda: dst.copy_(src), op="ceiling", impl="copy", shape=[n], bytes=8 * n)


# -- second moment --------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d", MOMENT_SHAPES)
@pytest.mark.parametrize("impl", backends("second_moment_accumulate") + ["torch fp32 addmm_", "torch bf16 mm + add"])
def test_second_moment(timed, impl, n, d):
    x = torch.randn(n, d, device=DEVICE, generator=gen()).to(FAST_DTYPE)
    acc = torch.zeros(d, d, device=DEVICE, dtype=torch.float64 if impl in ops.BACKENDS else torch.float32)
    if impl == "torch fp32 addmm_":
        x32 = x.float()
        fn = lambda: acc.addmm_(x32.t(), x32)  # noqa: E731
    elif impl == "torch bf16 mm + add":
        xb = x.bfloat16()
        fn = lambda: acc.add_(torch.mm(xb.t(), xb))  # noqa: E731
    else:
        def fn():
            with ops.use_backend(impl):
                ops.second_moment_accumulate(acc, x)
    timed(fn, op="second_moment_accumulate", impl=impl, shape=[n, d], dtype=str(x.dtype), flop=2 * n * d * d,
          rounds=3 if CPU else 20)


# -- solve ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", SOLVE_DIMS)
@pytest.mark.parametrize("impl", backends("solve_keys") + ["torch cholesky_solve fp64", "torch inverse mv fp64"])
def test_solve(timed, impl, d):
    g = gen()
    # a well-conditioned SPD C; at Llama sizes on a CPU from fewer columns (a d×2d fp64 product there
    # takes minutes; the timed ops do not depend on C's spectrum)
    cols = 2 * d if (not CPU or d <= 4096) else 256
    a = torch.randn(d, cols, device=DEVICE, dtype=torch.float64, generator=g) / cols ** 0.5
    c = a @ a.t() + (1e-3 if cols >= d else 1.0) * torch.eye(d, device=DEVICE, dtype=torch.float64)
    L = torch.linalg.cholesky(c)
    inv = torch.cholesky_inverse(L)
    k = torch.randn(d, device=DEVICE, generator=g)
    if impl == "torch cholesky_solve fp64":
        fn = lambda: torch.cholesky_solve(k.double().unsqueeze(1), L)  # noqa: E731
    elif impl == "torch inverse mv fp64":
        fn = lambda: torch.mv(inv, k.double())  # noqa: E731
    else:
        def fn():
            with ops.use_backend(impl):
                ops.solve_keys(inv, k)
    timed(fn, op="solve_keys", impl=impl, shape=[d], dtype="float64", bytes=8 * d * d)


# -- rank-one write -------------------------------------------------------------------------------
@pytest.mark.parametrize("d_out,d_in", WRITE_SHAPES)
@pytest.mark.parametrize(
    "impl,wdtype",
    [(b, dt) for b in backends("rank_one_update") for dt in ("float32", "bfloat16")]
    + [("torch addr_", "float32"), ("torch addr_", "bfloat16")],
)
def test_rank_one_update(timed, impl, wdtype, d_out, d_in):
    g = gen()
    dtype = getattr(torch, wdtype)
    w = torch.randn(d_out, d_in, device=DEVICE, generator=g).to(dtype)
    u = torch.randn(d_in, device=DEVICE, generator=g) * 1e-3
    lam = torch.randn(d_out, device=DEVICE, generator=g) * 1e-3
    master = w.float() if (dtype != torch.float32 and impl in ops.BACKENDS) else None
    # bytes: read + write of the weight, plus read + write of an fp32 master when there is one
    nbytes = d_out * d_in * (2 * w.element_size() + (8 if master is not None else 0))
    denom, floor = torch.tensor(1.0, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    if impl == "torch addr_":
        fn = lambda: w.addr_(lam.to(dtype), u.to(dtype))  # noqa: E731
    else:
        def fn():
            with ops.use_backend(impl):
                ops.rank_one_update(w, u, lam, denom=denom, min_denom=floor, master=master)
    timed(fn, op="rank_one_update", impl=impl, shape=[d_out, d_in], dtype=wdtype, bytes=nbytes,
          master=master is not None)


# -- Sherman–Morrison step on the edit memory's inverse ------------------------------------------
SYM_DIMS = [1536, 11008]  # SmolLM2-135M's and Llama-7B's d_ff (the edited matrix's input size)


@pytest.mark.parametrize("d", SYM_DIMS)
@pytest.mark.parametrize(
    "impl,dtype",
    [(b, dt) for b in backends("symmetric_rank_one_update") for dt in ("float32", "float64")]
    + [("torch addr_", "float32"), ("torch addr_", "float64")],
)
def test_symmetric_rank_one_update(timed, impl, dtype, d):
    """One guarded step ``M -= coef·u uᵀ`` on a d×d inverse; ``torch addr_`` (one fused pass, not
    symmetric bit for bit, no guard) is the one-call baseline."""
    g = gen()
    m_dtype = getattr(torch, dtype)
    m = torch.randn(d, d, device=DEVICE, dtype=m_dtype, generator=g)
    m = m + m.t()
    u = torch.randn(d, device=DEVICE, generator=g) * 1e-3
    beta, denom = torch.tensor(0.5, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    if impl == "torch addr_":
        uc = u.to(m_dtype)
        fn = lambda: m.addr_(uc, uc, alpha=-0.5 / 1.5)  # noqa: E731
    else:
        def fn():
            with ops.use_backend(impl):
                ops.symmetric_rank_one_update(m, u, beta, denom)
    # bytes: one read and one write of the matrix
    timed(fn, op="symmetric_rank_one_update", impl=impl, shape=[d, d], dtype=dtype, bytes=2 * d * d * m.element_size())
