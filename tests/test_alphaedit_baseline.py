"""The AlphaEdit reference: its rank-one factors against the published matrix formula in fp64, and
what the formula promises (null-space directions of ordinary text and earlier edits' keys left
nearly alone)."""

from __future__ import annotations

import torch

from fastrome.baselines.alphaedit import ReferenceAlphaEdit


def setup(d=31, d_out=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    values = torch.logspace(-3, 2, d, dtype=torch.float64)
    C = (q * values) @ q.T
    W = torch.randn(d_out, d, generator=g, dtype=torch.float64)
    return C, q, values, W, g


def test_factors_equal_the_published_formula():
    C, q, values, W, g = setup()
    ref = ReferenceAlphaEdit(C, threshold=0.05)
    keys = [torch.randn(31, generator=g, dtype=torch.float64) * 3 for _ in range(4)]
    targets = [torch.randn(13, generator=g, dtype=torch.float64) for _ in range(4)]
    w = W.clone()
    for i, (k, v) in enumerate(zip(keys, targets)):
        Kp = torch.stack(keys[:i], 1) if i else torch.zeros(31, 0, dtype=torch.float64)
        K1 = k[:, None]
        R = v[:, None] - w @ K1
        P = ref.P
        want = R @ K1.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K1 @ K1.T @ P + torch.eye(31, dtype=torch.float64))
        w_before = w.clone()
        u, lam = ref.edit(w, k, v)
        torch.testing.assert_close(torch.outer(lam, u), want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(w - w_before, want, rtol=1e-9, atol=1e-10)
    assert ref.edits == 4


def test_high_energy_directions_and_earlier_keys_are_nearly_kept():
    C, q, values, W, g = setup(seed=1)
    ref = ReferenceAlphaEdit(C, threshold=0.05)
    high = q[:, values > 0.05 * values.mean()]
    first = ref.P @ torch.randn(31, generator=g, dtype=torch.float64) * 30
    w = W.clone()
    ref.edit(w, first, torch.randn(13, generator=g, dtype=torch.float64))
    out_first = w @ first
    before = w.clone()
    second = ref.P @ torch.randn(31, generator=g, dtype=torch.float64) * 30
    ref.edit(w, second, torch.randn(13, generator=g, dtype=torch.float64))
    delta = w - before
    assert float((delta @ high).norm()) < 1e-9 * float(delta.norm())
    assert float((w @ first - out_first).norm()) < 0.05 * float(delta.norm() * first.norm())
