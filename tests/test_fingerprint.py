"""Fingerprints: large tensors are summarised by a strided sample plus fp64 sums taken a chunk at a
time; the digest follows the values, not their layout, and changes when any value does."""

from __future__ import annotations

import hashlib
import math
from types import SimpleNamespace

import pytest
import torch

import fastrome.fingerprint as fp


@pytest.fixture
def small_limits(monkeypatch):
    """Limits scaled down so a few thousand elements take the sampled, chunked path."""
    monkeypatch.setattr(fp, "FULL_HASH_MAX", 1000)
    monkeypatch.setattr(fp, "SAMPLE", 97)
    monkeypatch.setattr(fp, "SUM_CHUNK", 331)


@pytest.mark.parametrize("n, dtype", [(5003, torch.float32), (4096, torch.bfloat16), (2999, torch.int64)])
def test_chunked_sums_match_an_exact_sum(small_limits, n, dtype):
    g = torch.Generator().manual_seed(n)
    t = (torch.randn(n, generator=g) * 100).to(dtype)
    total, squares = fp._chunked_sums(t)
    values = t.double().tolist()
    assert math.isclose(total, math.fsum(values), rel_tol=1e-12, abs_tol=1e-9)
    assert math.isclose(squares, math.fsum(v * v for v in values), rel_tol=1e-12)


def digest(t):
    h = hashlib.sha256()
    fp.update_with_tensor(h, "w", t)
    return h.hexdigest()


@pytest.mark.parametrize("shape", [(71, 67), (13, 11)])  # sampled path, full-hash path
def test_the_digest_follows_the_values(small_limits, shape):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g)
    same = w.t().contiguous().t()  # the same values, stored transposed (not contiguous)
    assert not same.is_contiguous() and digest(same) == digest(w)
    for index in [(0, 1), (shape[0] - 1, shape[1] - 2)]:  # any one value changed by one ulp
        moved = w.clone()
        moved[index] = torch.nextafter(moved[index], torch.tensor(float("inf")))
        assert digest(moved) != digest(w)


def test_fingerprint_covers_config_and_names(small_limits):
    w = torch.ones(50, 50)
    assert fp.fingerprint(SimpleNamespace(a=1), [("w", w)]) != fp.fingerprint(SimpleNamespace(a=2), [("w", w)])
    assert fp.fingerprint(None, [("w", w)]) != fp.fingerprint(None, [("v", w)])
    assert len(fp.fingerprint(None, [("w", w)])) == 16


def test_the_digest_does_not_depend_on_the_thread_count():
    # torch's reductions split a 1M-element chunk by thread, which moved the sums' last bits: a cache
    # written by a run on two threads was then missed by one on one thread
    t = torch.randn(5_000_003, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        seen = set()
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            seen.add(digest(t))
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 1
