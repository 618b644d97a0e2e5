"""CovarianceSolver's construction, which keeps at most two d×d fp64 buffers (C64 and the factor,
the inverse written over the factor): the same inverse, bit for bit, as the textbook construction
with a materialised identity, and the caller's C left as it was."""

from __future__ import annotations

import pytest
import torch

from fastrome.solver import CovarianceSolver, _check_finite, count_nonfinite


def _textbook(C: torch.Tensor, relative_ridge: float):
    C64 = C.detach().to(torch.float64)
    C64 = 0.5 * (C64 + C64.t())
    ridge = relative_ridge * float(C64.diagonal().abs().mean())
    shifted = C64 + ridge * torch.eye(C64.shape[0], dtype=torch.float64)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(shifted))
    inverse = 0.5 * (inverse + inverse.t())
    norm = float(shifted.abs().sum(0).max()) * float(inverse.abs().sum(0).max())
    return inverse, ridge, norm


def _moment(d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * d + 3, d, generator=g, dtype=torch.float64)
    return (X.t() @ X / X.shape[0]).to(dtype)


@pytest.mark.parametrize("d", [7, 37, 257, 1031])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_inverse_is_the_textbook_one_bit_for_bit(d, dtype, layout):
    C = _moment(d, dtype, seed=d)
    if layout == "transposed":  # a non-contiguous view of the same (symmetric up to rounding) matrix
        C = C.t()
    before = C.clone()
    solver = CovarianceSolver(C, relative_ridge=1e-6)
    inverse, ridge, norm = _textbook(C, 1e-6)
    assert torch.equal(solver.inverse, inverse)
    assert torch.equal(solver.inverse, solver.inverse.t())
    assert solver.ridge == ridge
    assert solver.condition == pytest.approx(norm, rel=1e-12)
    assert torch.equal(C, before)  # the caller's C, fp64 or not, is never altered


def test_float32_precision_rounds_the_same_inverse():
    C = _moment(61, torch.float32, seed=1)
    assert torch.equal(CovarianceSolver(C, relative_ridge=1e-6, precision="float32").inverse,
                       _textbook(C, 1e-6)[0].float())


@pytest.mark.parametrize("d", [5, 300])
def test_non_finite_entries_are_counted_block_by_block(d):
    C = _moment(d, torch.float64, seed=2)
    C[0, 1], C[d - 1, d - 2], C[d // 2, 0] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(ValueError, match=r"has 3 non-finite entries"):
        _check_finite(C, "")


@pytest.mark.parametrize("shape", [(5, 7), (300, 300), (1000,), (3, 130, 4)])
def test_count_nonfinite_counts_every_nan_and_inf(shape):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    flat = t.view(-1)
    picks = torch.randperm(flat.numel(), generator=g)[:4]
    flat[picks[0]], flat[picks[1]], flat[picks[2]] = float("nan"), float("inf"), float("-inf")
    assert count_nonfinite(t) == 3 and count_nonfinite(t.float()) == 3
    assert count_nonfinite(t.transpose(0, -1)) == 3  # non-contiguous
    flat[picks[:3]] = 0.0
    assert count_nonfinite(t) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_statistics_consumed_by_their_solver_give_the_same_inverse(dtype):
    from fastrome.stats import SecondMoment

    g = torch.Generator().manual_seed(5)
    X = torch.randn(400, 131, generator=g, dtype=torch.float64).to(dtype)
    kept = SecondMoment(layer=2, sum=X.t() @ X, count=400)
    owned = SecondMoment(layer=2, sum=kept.sum.clone(), count=400)
    sum_before = kept.sum.clone()
    a = kept.solver(1e-6)
    b = owned.solver(1e-6, consume=True)
    assert torch.equal(a.inverse, b.inverse) and a.ridge == b.ridge and a.condition == b.condition
    assert torch.equal(kept.sum, sum_before)  # not consumed: the statistics are as they were
    assert owned.sum.numel() == 0  # consumed: nothing is left to be used by mistake


def test_overwrite_c_gives_the_same_solver():
    C = _moment(97, torch.float64, seed=9)
    a = CovarianceSolver(C.clone(), relative_ridge=1e-6)
    b = CovarianceSolver(C.clone(), relative_ridge=1e-6, overwrite_c=True)
    assert torch.equal(a.inverse, b.inverse) and a.condition == b.condition


def _symmetric_with_lowest(d: int, lowest: float, seed: int) -> torch.Tensor:
    C = _moment(d, torch.float64, seed=seed)
    vals, vecs = torch.linalg.eigh(C)
    vals[0] = lowest * float(C.diagonal().abs().mean())
    C = (vecs * vals) @ vecs.t()
    return 0.5 * (C + C.t())  # exactly symmetric, as the solver makes it


# sizes below, across and well past the blocks of rows copied aside during the attempts
@pytest.mark.parametrize("d", [5, 130, 300])
def test_a_failed_attempt_is_undone_exactly_before_the_next_ridge(d):
    """The factorisation runs in C's own buffer; after a failed attempt C is rebuilt from the copy
    kept aside, so the escalated solve is the textbook one at the ridge it settled on, bit for bit."""
    C = _symmetric_with_lowest(d, -1e-9, seed=d)
    with pytest.warns(UserWarning, match="not positive definite with ridge"):
        solver = CovarianceSolver(C.clone(), ridge=0.0, overwrite_c=True)
    assert solver.ridge > 0
    shifted = C + solver.ridge * torch.eye(d, dtype=torch.float64)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(shifted))
    assert torch.equal(solver.inverse, 0.5 * (inverse + inverse.t()))


@pytest.mark.parametrize("d", [5, 300])
def test_a_refused_C_given_as_scratch_is_left_as_it_was(d):
    C = -_symmetric_with_lowest(d, 0.5, seed=d)
    scratch = C.clone()
    with pytest.raises(ValueError, match="not positive definite"):
        CovarianceSolver(scratch, relative_ridge=1e-6, overwrite_c=True)
    assert torch.equal(scratch, C)


def test_a_backend_refusing_to_work_in_place_gets_the_same_solver(monkeypatch):
    """Factorising and inverting in C's own buffer relies on ``out=`` aliasing the input; where that
    is refused, the same calls go through a temporary, with one warning, and give the same solver."""
    import fastrome.solver as solver_module

    C = _moment(130, torch.float64, seed=4)
    want = CovarianceSolver(C.clone(), relative_ridge=1e-6)
    cholesky_ex, cholesky_inverse = torch.linalg.cholesky_ex, torch.cholesky_inverse

    def refusing(op):
        def call(A, *, out=None):
            if out is not None:
                raise RuntimeError("unsupported operation: out aliases the input")
            return op(A)
        call.__name__ = op.__name__
        return call

    monkeypatch.setattr(torch.linalg, "cholesky_ex", refusing(cholesky_ex))
    monkeypatch.setattr(torch, "cholesky_inverse", refusing(cholesky_inverse))
    monkeypatch.setattr(solver_module, "_warned_in_place", False)
    with pytest.warns(UserWarning, match="refused to work in place") as seen:
        got = CovarianceSolver(C.clone(), relative_ridge=1e-6)
    assert len([w for w in seen if "in place" in str(w.message)]) == 1
    assert torch.equal(got.inverse, want.inverse) and got.ridge == want.ridge


def _at_offset(C: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """A contiguous copy of ``C`` whose data start ``offset_bytes`` past a 64-byte boundary, as a
    tensor read from a file can."""
    store = torch.empty(C.numel() + 64 // C.element_size(), dtype=C.dtype)
    start = next(i for i in range(64) if (store.data_ptr() + i * C.element_size()) % 64 == offset_bytes)
    out = store[start:start + C.numel()].view(C.shape)
    out.copy_(C)
    assert out.data_ptr() % 64 == offset_bytes
    return out


@pytest.mark.parametrize("d", [389, 1536])
@pytest.mark.parametrize("offset", [8, 16, 40])
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_solver_does_not_depend_on_where_c_lies_in_memory(d, offset, overwrite):
    # Statistics read from a file lie at an address set by the file's header; the blocked
    # factorisation must give the same bits there as in a fresh (aligned) buffer, or a run resumed
    # from cached statistics would edit differently from the run that computed them.
    C = _moment(d, torch.float64, seed=d + offset)
    a = CovarianceSolver(C.clone(), relative_ridge=1e-6, overwrite_c=overwrite)
    b = CovarianceSolver(_at_offset(C, offset), relative_ridge=1e-6, overwrite_c=overwrite)
    assert torch.equal(a.inverse, b.inverse) and a.ridge == b.ridge and a.condition == b.condition


def test_statistics_read_off_alignment_and_consumed_give_the_same_inverse():
    from fastrome.stats import SecondMoment

    g = torch.Generator().manual_seed(8)
    X = torch.randn(700, 389, generator=g, dtype=torch.float64)
    kept = SecondMoment(layer=2, sum=X.t() @ X, count=700)
    off = SecondMoment(layer=2, sum=_at_offset(kept.sum, 8), count=700)
    a, b = kept.solver(1e-6), off.solver(1e-6, consume=True)
    assert torch.equal(a.inverse, b.inverse) and a.ridge == b.ridge and a.condition == b.condition
    assert off.sum.numel() == 0
