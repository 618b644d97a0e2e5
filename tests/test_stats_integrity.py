"""Statistics that must not be trusted: files whose bytes changed after they were written (content
digest), a C that only a ridge of its own size would make positive definite, non-finite C, and
the file mode of statistics cache files."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastrome import CovarianceSolver, Editor, SecondMoment
from fastrome.adapter import ModelAdapter
from fastrome.corpus import open_corpus
from fastrome.solver import MAX_RIDGE_ESCALATION
from fastrome.stats import compute, load_or_compute
from fastrome.stats.collect import _load_checkpoint, _Progress, _save_checkpoint
from fastrome.stats.moment import DIGEST_KEY

TEXT = "\n\n".join(
    f"{i}. " + d
    for i, d in enumerate(
        [
            "The Eiffel Tower is a wrought-iron lattice tower in Paris, designed by Gustave Eiffel.",
            "Rome is the capital city of Italy and of the Lazio region.",
            "Photosynthesis converts light energy into chemical energy in plants. " * 4,
            "Mount Everest is Earth's highest mountain above sea level.",
            "The Danube flows through ten countries before it reaches the Black Sea.",
        ]
        * 8
    )
)


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def synthetic_moment(d: int = 11, n: int = 300, seed: int = 0) -> SecondMoment:
    """A (d, d) fp64 sum of k kᵀ over n random keys."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    return SecondMoment(layer=3, sum=keys.t() @ keys, count=n, meta={"corpus": "test:random", "tokens": n})


def read_file(path: Path) -> Tuple[Dict[str, str], torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), f.get_tensor("sum")


def rewrite_sum(path: Path, change) -> None:
    """Replace the stored sum by ``change(sum)``, keeping every metadata entry (the digest too)."""
    meta, total = read_file(path)
    save_file({"sum": change(total).contiguous()}, str(path), metadata=meta)


def flip_byte(path: Path, offset_in_data: int) -> None:
    """Flip one bit of the tensor data, leaving the header (and so the metadata) as it was."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    raw[8 + header_len + offset_in_data] ^= 0x40
    path.write_bytes(bytes(raw))


def nudged(total: torch.Tensor) -> torch.Tensor:
    """One entry changed in its last few bits: invisible to every check but the digest."""
    total = total.clone()
    total[0, 0] *= 1 + 1e-12
    return total


def edit_metadata(path: Path) -> None:
    meta, total = read_file(path)
    save_file({"sum": total}, str(path), metadata={**meta, "corpus": json.dumps("another corpus")})


TAMPERING = {
    "negated": lambda p: rewrite_sum(p, lambda s: -s),
    "scaled": lambda p: rewrite_sum(p, lambda s: s * 1000.0),
    "nudged": lambda p: rewrite_sum(p, nudged),
    "flipped bits": lambda p: flip_byte(p, 8 * 5 + 7),  # the sign/exponent byte of an fp64 entry
    "metadata edited": edit_metadata,
}


# -- content digest -------------------------------------------------------------------------------

def test_saved_statistics_carry_a_digest_and_load_silently(tmp_path):
    sm = synthetic_moment()
    path = sm.save(tmp_path / "s.safetensors")
    meta, _ = read_file(path)
    assert len(meta[DIGEST_KEY]) == 64 and int(meta[DIGEST_KEY], 16) >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = SecondMoment.load(path)
    assert torch.equal(loaded.sum, sm.sum) and loaded.count == sm.count and DIGEST_KEY not in loaded.meta
    assert loaded.source == str(path)
    # saving the loaded statistics again gives the same file content
    again = loaded.save(tmp_path / "t.safetensors")
    assert read_file(again)[0][DIGEST_KEY] == meta[DIGEST_KEY]


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_statistics_file_changed_after_writing_is_refused_naming_it(tmp_path, how):
    path = synthetic_moment().save(tmp_path / f"stats {how}.safetensors")
    TAMPERING[how](path)
    with pytest.raises(ValueError, match="corrupted") as info:
        SecondMoment.load(path)
    assert str(path) in str(info.value)


def test_file_from_before_digests_loads_with_a_warning_unless_visibly_damaged(tmp_path):
    sm = synthetic_moment()
    path = sm.save(tmp_path / "old.safetensors")
    meta, total = read_file(path)
    del meta[DIGEST_KEY]
    save_file({"sum": total}, str(path), metadata=meta)
    with pytest.warns(UserWarning, match="no content digest"):
        loaded = SecondMoment.load(path)
    assert torch.equal(loaded.sum, sm.sum)
    # without a digest, a negated sum is still recognised: its diagonal (sums of squares) is negative
    save_file({"sum": -total}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="diagonal entries of the sum are negative") as info, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SecondMoment.load(path)
    assert str(path) in str(info.value)


def test_corrupted_cache_entry_is_recomputed_and_overwritten(make_tiny, corpus_file, tmp_path, caplog):
    model, tok = make_tiny("llama-bytelevel")
    adapter = ModelAdapter(model)
    kw = dict(corpus=open_corpus(corpus_file), tokens=500, max_len=64, cache_root=tmp_path, progress=False)
    good = load_or_compute(adapter, tok, [1], **kw)[1]
    (path,) = (tmp_path / "stats").glob("*.safetensors")
    assert good.meta["path"] == str(path)
    rewrite_sum(path, lambda s: -s)  # valid metadata, wrong numbers
    with caplog.at_level("WARNING", logger="fastrome"):
        again = load_or_compute(adapter, tok, [1], **kw)[1]
    assert any(str(path) in r.getMessage() and "corrupted" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    assert torch.equal(again.sum, good.sum)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(SecondMoment.load(path).sum, good.sum)  # overwritten with a valid file
        cached = load_or_compute(adapter, tok, [1], **kw)[1]  # and found again, silently
    assert cached.meta["path"] == str(path) and torch.equal(cached.sum, good.sum)


def test_editor_refuses_a_corrupted_statistics_file_naming_it(make_tiny, corpus_file, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    sm = compute(ModelAdapter(model), tok, [1], corpus=open_corpus(corpus_file), tokens=500, max_len=64,
                 progress=False)[1]
    path = sm.save(tmp_path / "mine.safetensors")
    flip_byte(path, 8 * 40 + 6)
    with pytest.raises(ValueError, match="corrupted") as info:
        Editor(model, tok, stats=str(path), layer=1, cache_dir=False).solver(1)
    assert str(path) in str(info.value)


def test_damaged_checkpoint_is_not_resumed(tmp_path, caplog):
    accs = {1: synthetic_moment(seed=1).sum, 4: synthetic_moment(seed=2).sum}
    path = tmp_path / "partial.safetensors"
    _save_checkpoint(path, "k", accs, _Progress(next_batch=3, count=300, seen=300, seconds=1.5))
    fresh = {layer: torch.zeros_like(acc) for layer, acc in accs.items()}
    state = _load_checkpoint(path, "k", fresh)
    assert state is not None and state.count == 300 and all(torch.equal(fresh[k], accs[k]) for k in accs)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, "sum.4": tensors["sum.4"] * 2}, str(path), metadata=meta)
    with caplog.at_level("WARNING", logger="fastrome"):
        assert _load_checkpoint(path, "k", fresh) is None
    assert re.search("not resuming.*corrupted", caplog.text)
    caplog.clear()
    del meta[DIGEST_KEY]  # a checkpoint cannot be verified without one: starting over is the safe choice
    save_file(tensors, str(path), metadata=meta)
    with caplog.at_level("WARNING", logger="fastrome"):
        assert _load_checkpoint(path, "k", fresh) is None
    assert re.search("not resuming.*no content digest", caplog.text)


# -- C that no admissible ridge makes positive definite -----------------------------------------

def spd(d: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    return keys.t() @ keys / (4 * d)


def with_lowest_eigenvalue(C: torch.Tensor, value: float) -> torch.Tensor:
    """``C`` with its smallest eigenvalue replaced by ``value``."""
    vals, vecs = torch.linalg.eigh(C)
    vals[0] = value
    return (vecs * vals) @ vecs.t()


def test_negated_statistics_are_refused_not_solved_with_a_huge_ridge():
    C = -spd()
    scale = float(C.diagonal().abs().mean())
    with pytest.raises(ValueError, match="not positive definite"):
        CovarianceSolver(C, ridge=1e-6 * scale)
    with pytest.raises(ValueError, match="not positive definite") as info:
        CovarianceSolver(C, relative_ridge=1e-6, source="'layer3.safetensors'")
    msg = str(info.value)
    assert "'layer3.safetensors'" in msg and f"{scale:.3e}" in msg and "needs a ridge of at least" in msg
    lowest = float(torch.linalg.eigvalsh(C)[0])
    assert f"{-lowest:.3e}" in msg


def test_ridge_escalation_stops_at_a_small_fraction_of_the_scale():
    C = spd()
    scale = float(C.diagonal().abs().mean())
    # rounding-sized indefiniteness: stepped over with a warning
    slightly = with_lowest_eigenvalue(C, -1e-7 * scale)
    with pytest.warns(UserWarning, match="not positive definite with ridge"):
        solver = CovarianceSolver(slightly, ridge=0.0)
    assert 1e-7 * scale < solver.ridge <= MAX_RIDGE_ESCALATION * scale
    # beyond the cap: an error, however many steps it would take
    with pytest.raises(ValueError, match="not positive definite"):
        CovarianceSolver(with_lowest_eigenvalue(C, -2 * MAX_RIDGE_ESCALATION * scale), ridge=0.0)
    # a rank-deficient but genuine second moment (fewer keys than dimensions) still factorises
    keys = torch.randn(4, 9, dtype=torch.float64)
    assert CovarianceSolver(keys.t() @ keys / 4, relative_ridge=1e-6).ridge > 0


def test_second_moment_solver_uses_a_relative_ridge_and_names_its_file(tmp_path):
    sm = synthetic_moment()
    C = sm.matrix
    solver = sm.solver(1e-6)
    assert math.isclose(solver.ridge, 1e-6 * float(C.diagonal().abs().mean()), rel_tol=1e-12)
    assert math.isclose(CovarianceSolver(C, relative_ridge=1e-6).ridge, solver.ridge, rel_tol=0)
    with pytest.raises(ValueError, match="not both"):
        CovarianceSolver(C, ridge=1.0, relative_ridge=1e-6)
    path = tmp_path / "neg.safetensors"
    bad = SecondMoment(layer=3, sum=-sm.sum, count=sm.count, source=str(path))  # as if loading skipped its checks
    with pytest.raises(ValueError, match="not positive definite") as info:
        bad.solver(1e-6)
    assert str(path) in str(info.value)


# -- non-finite C ----------------------------------------------------------------------------------

def test_non_finite_C_is_refused_before_any_ridge_arithmetic():
    C = spd()
    C[0, 1] = C[1, 0] = float("nan")
    C[4, 4] = float("inf")
    ridge = 1e-6 * float(C.diagonal().abs().mean())  # what a caller computing the ridge itself gets: inf
    for kw in ({"ridge": ridge}, {"ridge": float("nan")}, {"relative_ridge": 1e-6}):
        with pytest.raises(ValueError, match="statistics matrix C has 3 non-finite entries"):
            CovarianceSolver(C, **kw)


def test_editor_refuses_a_nan_matrix_as_non_finite_statistics(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    d = ModelAdapter(model).d_in
    C = torch.eye(d, dtype=torch.float64)
    C[2, 2] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite entries"):
        Editor(model, tok, stats={1: C}, layer=1, cache_dir=False).solver(1)


def test_statistics_file_with_nan_is_refused_counting_the_entries(tmp_path):
    sm = synthetic_moment()
    sm.sum[0, :2] = float("nan")
    path = sm.save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="2 non-finite entries") as info:
        SecondMoment.load(path)
    assert str(path) in str(info.value)


# -- file mode -------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_statistics_cache_files_get_the_mode_the_umask_gives(make_tiny, corpus_file, tmp_path, umask, mode):
    model, tok = make_tiny("gpt2-bytelevel")
    previous = os.umask(umask)
    try:
        load_or_compute(ModelAdapter(model), tok, [0], corpus=open_corpus(corpus_file), tokens=300, max_len=48,
                        cache_root=tmp_path, progress=False)
    finally:
        os.umask(previous)
    (path,) = (tmp_path / "stats").glob("*.safetensors")
    assert path.stat().st_mode & 0o777 == mode
