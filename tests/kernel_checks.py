"""What the kernel tests of every backend share: bit-level comparison, the fp64 bound of one guarded
rank-one write, and the guard's refuse/accept cases. Device-agnostic: values are checked on the
device the tensors live on."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
F32_EPS = torch.finfo(torch.float32).eps
F64_EPS = torch.finfo(torch.float64).eps
ACC_DTYPES = [torch.float32, torch.float64]
W_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` (tells -0.0 from +0.0 and NaN payloads apart)."""
    return t.detach().contiguous().view(INT_OF_SIZE[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def poison_negative_zeros(t: torch.Tensor) -> None:
    """Write -0.0 into every 7th element, so a kernel that rewrites untouched elements shows."""
    flat = t.view(-1)
    flat[::7] = -0.0
    assert (bits(flat[::7]) != bits(torch.zeros_like(flat[::7]))).all()


def rank_one_bounds(w0: torch.Tensor, lam: torch.Tensor, u: torch.Tensor, dtype: torch.dtype):
    """fp64 exact ``w0 + lam ⊗ u`` and the bound of one product and one addition in the compute
    dtype the write promises for ``dtype`` (fp64 for fp64, fp32 otherwise)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    lam64, u64 = lam.double(), u.double()
    exact = torch.addr(w0.double(), lam64, u64)
    bound = torch.addr(w0.abs().double(), lam64.abs(), u64.abs(), alpha=2).mul_(torch.finfo(compute).eps)
    return exact, bound


def check_rounded_update(w: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    """``w`` is ``exact`` computed in the promised precision and rounded once to w's dtype."""
    assert torch.isfinite(w).all()
    err = w.to(torch.float64, copy=True).sub_(exact).abs_()  # a copy even for fp64 weights
    if w.dtype in (torch.float32, torch.float64):
        ok = err <= bound
    else:
        # Rounding the fp32 result lands at most one step further from exact than rounding exact
        # itself, and only when the fp32 error crosses a midpoint: err <= err(round(exact)) + 2·bound.
        err_round = exact.to(w.dtype).double().sub_(exact).abs_()
        ok = err <= err_round.add_(bound, alpha=2)
    assert ok.all(), f"{int((~ok).sum())}/{ok.numel()} elements off, max err {err.max().item():.3e}"


def check_master_update(w, master, master0, lam, u) -> None:
    exact, bound = rank_one_bounds(master0, lam, u, master.dtype)
    assert (master.to(torch.float64, copy=True).sub_(exact).abs_() <= bound).all()
    assert same_bits(w, master.to(w.dtype)), "weight is not exactly the rounded master"


# name: (denom, min_denom, poison) with poison = (vector, value[, index]) or None
GUARD_CASES = {
    "denom_eq_min": (2.0**-10, 2.0**-10, None),
    "denom_below_min": (2.0**-11, 2.0**-10, None),
    "denom_tiny_eq_min": (1e-30, 1e-30, None),
    "denom_tiny_below_min": (1e-31, 1e-30, None),
    "denom_negative": (-1.0, 0.0, None),
    "denom_zero": (0.0, 0.0, None),
    "denom_neg_zero": (-0.0, 0.0, None),
    "denom_zero_tiny_floor": (0.0, 1e-12, None),
    "denom_nan": (math.nan, 0.0, None),
    "denom_pos_inf": (math.inf, 0.0, None),
    "denom_neg_inf": (-math.inf, -1e300, None),
    "min_denom_nan": (1.0, math.nan, None),
    "u_nan": (1.0, 0.0, ("u", math.nan)),
    "u_pos_inf": (1.0, 0.0, ("u", math.inf)),
    "u_neg_inf": (1.0, 0.0, ("u", -math.inf)),
    "lam_nan": (1.0, 0.0, ("lam", math.nan)),
    "lam_pos_inf": (1.0, 0.0, ("lam", math.inf)),
    "lam_neg_inf": (1.0, 0.0, ("lam", -math.inf)),
    "u_last_nan": (1.0, 0.0, ("u", math.nan, -1)),  # the guard's loops reach the last element
    "lam_first_inf": (1.0, 0.0, ("lam", math.inf, 0)),
}

ACCEPT_CASES = {
    "just_above_floor": (2.0**-10 * (1 + 2.0**-20), 2.0**-10),
    "large_denom": (1e30, 0.0),
    "negative_with_neg_inf_floor": (-5.0, -math.inf),
}

SCALAR_FORMS = {"float": None, "f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}


def apply_poison(u: torch.Tensor, lam: torch.Tensor, poison: Optional[tuple]) -> None:
    """Plant a guard case's non-finite value in ``u`` or ``lam`` (in the middle unless indexed)."""
    if poison is None:
        return
    vec = {"u": u, "lam": lam}[poison[0]]
    at = poison[2] if len(poison) > 2 else len(vec) // 2
    vec[at] = poison[1]


def as_scalar(value: float, form: str, device: Union[str, torch.device] = "cpu"):
    """``value`` as a Python float (``form="float"``) or a 0-dim tensor of the form's dtype."""
    dtype = SCALAR_FORMS[form]
    return value if dtype is None else torch.tensor(value, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# symmetric_rank_one_update
# ----------------------------------------------------------------------------------------------


def sherman_morrison_coef(beta: float, denom: float) -> float:
    """``β / (1 + β·denom)`` in fp64, rounded in the op's order."""
    return beta / (1.0 + beta * denom)


def symmetric_update_bounds(m0: torch.Tensor, u: torch.Tensor, beta: float, denom: float):
    """fp64 ``m0 - coef·u uᵀ`` on u rounded to m0's dtype (the op's first step), and the bound of
    rounding coef, the two products and the subtraction in m0's dtype: ``eps·(|m0| + 2|coef||u||u|ᵀ)``
    with eps the dtype's machine epsilon (two units of the 0.5-ulp rounding), so an FMA passes too."""
    u64 = u.to(m0.dtype).double()
    coef = sherman_morrison_coef(beta, denom)
    exact = m0.double() - coef * torch.outer(u64, u64)
    bound = (m0.double().abs() + 2.0 * abs(coef) * torch.outer(u64.abs(), u64.abs())) * torch.finfo(m0.dtype).eps
    return exact, bound


def check_symmetric_update(m: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    """``m`` is within ``bound`` of ``exact`` everywhere and exactly symmetric."""
    assert torch.isfinite(m).all()
    err = m.to(torch.float64, copy=True).sub_(exact).abs_()
    ok = err <= bound
    assert ok.all(), f"{int((~ok).sum())}/{ok.numel()} elements off, max err {err.max().item():.3e}"
    assert same_bits(m, m.t()), "the updated inverse is not exactly symmetric"


def random_symmetric_matrix(d: int, dtype: torch.dtype, g: torch.Generator, device="cpu") -> torch.Tensor:
    """An exactly symmetric (d, d) matrix (a + aᵀ: addition commutes) with -0.0 planted in mirrored
    pairs, so a refused or empty update that rewrites elements shows."""
    a = torch.randn(d, d, generator=g, dtype=torch.float64).to(dtype)
    s = a + a.t()
    for i, j in [(0, d - 1), (d // 2, d // 3), (d - 1, d - 1)]:
        s[i, j] = -0.0
        s[j, i] = -0.0
    return s.to(device)


# name: (beta, denom, min_denom, poison) with poison = (value, index) planted in u, or None.
# s = 1 + β·denom is what the floor applies to.
SYM_GUARD_CASES = {
    "s_eq_floor": (1.0, -(1.0 - 2.0**-10), 2.0**-10, None),
    "s_below_floor": (1.0, -(1.0 - 2.0**-11), 2.0**-10, None),
    "s_zero": (1.0, -1.0, 1e-12, None),
    "s_zero_negative_floor": (1.0, -1.0, -1.0, None),  # s > floor, but coef = 1/0 is infinite
    "s_negative": (1.0, -2.0, 1e-12, None),
    "removal_s_zero": (-1.0, 1.0, 1e-12, None),
    "removal_s_negative": (-0.5, 3.0, 1e-12, None),
    "beta_nan": (math.nan, 1.0, 1e-12, None),
    "beta_inf": (math.inf, 1.0, 1e-12, None),
    "beta_neg_inf": (-math.inf, 1.0, 1e-12, None),
    "beta_inf_denom_zero": (math.inf, 0.0, 1e-12, None),
    "denom_nan": (1.0, math.nan, 1e-12, None),
    "denom_inf": (1.0, math.inf, 1e-12, None),
    "beta_denom_product_overflows": (1e200, 1e200, 1e-12, None),
    "min_denom_nan": (1.0, 1.0, math.nan, None),
    "u_nan": (1.0, 1.0, 1e-12, (math.nan, None)),
    "u_pos_inf": (1.0, 1.0, 1e-12, (math.inf, None)),
    "u_neg_inf": (1.0, 1.0, 1e-12, (-math.inf, None)),
    "u_first_nan": (1.0, 1.0, 1e-12, (math.nan, 0)),
    "u_last_inf": (1.0, 1.0, 1e-12, (math.inf, -1)),  # the guard's loop reaches the last element
}

# name: (beta, denom, min_denom): accepted, with the coefficient they give.
SYM_ACCEPT_CASES = {
    "addition": (0.75, 2.5, 1e-12),
    "removal": (-0.5, 1.5, 1e-12),  # s = 0.25
    "just_above_floor": (1.0, -(1.0 - 2.0**-10 - 2.0**-20), 2.0**-10),  # s = 2⁻¹⁰ + 2⁻²⁰, exact in fp32
    "negative_denom_small_beta": (0.5, -1.0, 1e-12),  # s = 0.5
    "floor_neg_inf": (1.0, -3.0, -math.inf),  # s = -2 accepted when the caller allows anything
}


def plant_in_u(u: torch.Tensor, poison) -> None:
    """Put a guard case's non-finite value into u (in the middle unless indexed)."""
    if poison is None:
        return
    value, at = poison
    u[len(u) // 2 if at is None else at] = value
