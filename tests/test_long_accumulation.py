"""Ten million rows through second_moment_accumulate: an fp64 accumulator keeps fp64-level
precision across thousands of calls, which an fp32 running sum cannot."""

from __future__ import annotations

import pytest
import torch

from fastrome import _extension, ops

ROWS_PER_CALL = 4096
CALLS = 2442  # ≈ 1.0e7 rows


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_ten_million_rows(backend):
    if backend == "cpp" and _extension.load_error() is not None:
        pytest.skip(f"C++ extension not built: {_extension.load_error()}")
    g = torch.Generator().manual_seed(7)
    d = 9
    # a positive mean makes every element of the sum grow, where fp32 rounding hurts most
    x = (1.0 + 0.1 * torch.randn(ROWS_PER_CALL, d, generator=g)).float()
    one = x.double().t() @ x.double()
    exact = CALLS * one

    def rel(a, b):
        return float(((a.double() - b).abs() / b.abs()).max())

    acc64 = torch.zeros(d, d, dtype=torch.float64)
    acc32 = torch.zeros(d, d, dtype=torch.float32)
    with ops.use_backend(backend):
        first = torch.zeros(d, d, dtype=torch.float64)
        ops.second_moment_accumulate(first, x)
        for _ in range(CALLS):
            ops.second_moment_accumulate(acc64, x)
            ops.second_moment_accumulate(acc32, x)
    err_one, err64, err32 = rel(first, one), rel(acc64, exact), rel(acc32, exact)
    # one call's product is formed in fp32 (cpp) or fp64 (reference): at most fp32-level error
    assert err_one < 1e-5, err_one
    # the fp64 running sum adds nothing to it over 2442 calls ...
    assert err64 <= 1.01 * err_one + 1e-10, (err64, err_one)
    # ... while an fp32 running sum drifts by orders of magnitude (measured: 5e-3 relative)
    assert err32 > 100 * max(err64, 1e-7), (err32, err64)
    assert torch.equal(acc64, acc64.t())
