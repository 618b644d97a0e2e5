"""The key-drift analysis of a lifelong run (benches/key_drift.py) against figures computed
directly: a key that has not moved fires fully and sees only what the later edits write at it; a
moved key is measured in C⁻¹, and the later edits are read at the key the subject has now."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

spec = importlib.util.spec_from_file_location(
    "key_drift", Path(__file__).resolve().parents[1] / "benches" / "key_drift.py")
key_drift = importlib.util.module_from_spec(spec)
spec.loader.exec_module(key_drift)


def entry(u, lam, keys):
    return SimpleNamespace(u=u.float(), lam=lam.float(), key=keys.float())


def test_the_figures_for_one_earlier_edit_match_a_direct_computation():
    d, d_out, n = 11, 5, 4
    g = torch.Generator().manual_seed(7)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    C = a @ a.T / a.shape[1]
    us = torch.randn(n, d, generator=g, dtype=torch.float64)
    lams = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    keys = torch.randn(n, 2, d, generator=g, dtype=torch.float64)  # dual: (k̄, k_u); k_u is the prompt key
    rows = [entry(us[i], lams[i], keys[i]) for i in range(n)]
    chol = torch.linalg.cholesky(C)
    k_u = keys[1, 1].float().double()  # as stored: fp32
    k_now = k_u + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)

    got = key_drift.drift_rows(rows, torch.stack([k_u, k_now]), chol, upto=3, sample=[1, 1])
    # the two samples are edit 1 before and after its key moved: the medians are their means
    Ci = torch.linalg.inv(C)

    def c_norm(x):
        return float(x @ Ci @ x) ** 0.5

    u1, lam1 = us[1].float().double(), lams[1].float().double()
    own = float(lam1.norm()) * abs(float(u1 @ k_u))
    later = [(lams[2].float().double(), us[2].float().double())]  # upto=3: edit 2 only, not edit 3

    def later_at(k):
        return float(sum(lam * float(u @ k) for lam, u in later).norm()) / own

    assert abs(got["moved"] - c_norm(k_now - k_u) / c_norm(k_u) / 2) < 1e-5
    assert abs(got["fires"] - (1 + float(u1 @ k_now) / float(u1 @ k_u)) / 2) < 1e-5
    assert abs(got["later_at_stored"] - later_at(k_u)) < 1e-5
    assert abs(got["later_at_now"] - (later_at(k_u) + later_at(k_now)) / 2) < 1e-5
    assert got["edits"] == 3 and got["sampled"] == 2


def test_the_latest_edit_has_no_later_edits_and_its_key_has_not_moved():
    d, d_out = 6, 4
    g = torch.Generator().manual_seed(1)
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    C = a @ a.T / a.shape[1]
    e = entry(torch.randn(d, generator=g), torch.randn(d_out, generator=g), torch.randn(d, generator=g))
    got = key_drift.drift_rows([e], e.key.double()[None], torch.linalg.cholesky(C), upto=1, sample=[0])
    assert got["moved"] == 0 and abs(got["fires"] - 1) < 1e-12
    assert got["later_at_stored"] == 0 and got["later_at_now"] == 0
