"""The key-space analysis of a lifelong run (benches/edit_capacity.py) against figures computed
directly: one edit's energy is its own, orthogonal edits add like a random walk, and a memory that
holds a key takes (almost) all of that key's solve."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

spec = importlib.util.spec_from_file_location(
    "edit_capacity", Path(__file__).resolve().parents[1] / "benches" / "edit_capacity.py")
edit_capacity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(edit_capacity)


def entry(u, lam, key):
    return SimpleNamespace(u=u.float(), lam=lam.float(), key=key.float())


def test_energy_coherence_and_the_free_share_of_the_next_key():
    d, d_out = 13, 7
    g = torch.Generator().manual_seed(3)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    C = a @ a.T / a.shape[1]
    W0 = torch.randn(d_out, d, generator=g, dtype=torch.float64)
    keys = torch.randn(3, 2, d, generator=g, dtype=torch.float64)
    lam = torch.randn(3, d_out, generator=g, dtype=torch.float64)
    basis = torch.eye(d, dtype=torch.float64)
    # C-orthogonal left vectors: u_i = C^{-1/2} e_i, so tr(ΔW C ΔWᵀ) is the sum of the edits' energies
    evals, evecs = torch.linalg.eigh(C)
    root_inv = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    us = [root_inv @ basis[i] for i in range(3)]
    entries = [entry(us[i], lam[i], keys[i]) for i in range(3)]
    rows = edit_capacity.analyse_layer(entries, C, W0, every=1, beta=1e6, keys="prompt")
    out = float(torch.einsum("oi,ij,oj->", W0, C, W0))
    first = rows[0]
    own0 = float(lam[0].square().sum() * (us[0] @ C @ us[0])) / out
    assert abs(first["energy"] - own0) < 1e-5 * own0 and abs(first["coherence"] - 1) < 1e-5
    assert abs(rows[2]["coherence"] - 1) < 1e-4  # orthogonal in C: a random walk exactly
    assert [r["memory_keys"] for r in rows] == [1, 2, 3]
    # the memory holds k_u of edit 0 with a huge β: of the next key k, only its part C⁻¹-orthogonal
    # to that key stays free
    ridge = 1e-6 * float(C.diagonal().mean())
    Ci = torch.linalg.inv(C + ridge * torch.eye(d, dtype=torch.float64))
    k0 = keys[0, 1]
    expect = [1 - float(k0 @ Ci @ k) ** 2 / (float(k0 @ Ci @ k0) * float(k @ Ci @ k)) for k in keys[1:, 1]]
    assert abs(first["free"] - sum(expect) / 2) < 1e-4  # the median of two: their mean
    assert "free" not in rows[2]  # no next edit
    both = edit_capacity.analyse_layer(entries, C, W0, every=1, beta=1e6, keys="both")
    assert [r["memory_keys"] for r in both] == [2, 4, 6]
