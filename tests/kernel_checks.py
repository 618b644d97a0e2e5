"""What the kernel tests of every backend share: bit-level comparison, the fp64 bound of one guarded
rank-one write, the guard's refuse/accept cases, and the table of the backends under test (their
device, availability, sizes and tolerances). Device-agnostic: values are checked on the device the
tensors live on."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import pytest
import torch

from fastrome import _extension, ops

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


# ----------------------------------------------------------------------------------------------
# The backends under test (tests/test_kernels.py runs every numeric check on each of them)
# ----------------------------------------------------------------------------------------------
#
# Triton fixes interpretation when it decorates a function, its own library (``tl.zeros``,
# ``tl.sum``, ...) included. Without a CUDA device the Triton kernels run on CPU tensors in its
# interpreter, so Triton and the kernel modules are imported here, when the test modules are
# collected, with ``TRITON_INTERPRET=1`` set for the import only; the backend fixture sets it
# again for each test (``fastrome.ops`` serves CPU tensors with Triton only while it is set). If
# something imported Triton uninterpreted before, the Triton backend is skipped with that reason:
# run tests/test_kernels.py on its own.

HAVE_CUDA = torch.cuda.is_available()
TRITON_ENV_AT_IMPORT = os.environ.get("TRITON_INTERPRET")
TRITON_KERNEL_MODULES = (
    "fastrome.kernels.rank_one_update",
    "fastrome.kernels.second_moment",
    "fastrome.kernels.solve_keys",
    "fastrome.kernels.symmetric_rank_one_update",
)


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def _import_triton() -> Tuple[Optional[str], tuple]:
    """``(why_not, kernel_modules)``: the Triton kernel modules, interpreted without CUDA."""
    try:
        return _import_triton_kernels()
    except Exception as exc:  # a kernel module that fails to import skips the backend, with why
        return f"the Triton kernels failed to import ({type(exc).__name__}: {exc})", ()


def _import_triton_kernels() -> Tuple[Optional[str], tuple]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (`pip install triton`)", ()
    if HAVE_CUDA:
        return None, tuple(importlib.import_module(name) for name in TRITON_KERNEL_MODULES)
    imported = sys.modules.get("triton")
    if imported is not None and not _interpreted(imported.language.zeros):
        return (
            "Triton was imported without TRITON_INTERPRET=1 before the kernel tests, so its CPU "
            "interpreter cannot run here; run tests/test_kernels.py on its own"
        ), ()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        modules = tuple(importlib.import_module(name) for name in TRITON_KERNEL_MODULES)
    kernels = [v for m in modules for k, v in vars(m).items() if k.endswith("_kernel")]
    if not all(_interpreted(k) for k in kernels):
        return "the Triton kernel modules were imported uninterpreted before the kernel tests", ()
    return _interpreter_why_not(), modules


def _interpreter_why_not() -> Optional[str]:
    """Runs a loop bounded by a kernel argument, as the kernels do, in the interpreter. Triton's
    interpreter up to 3.5 turns a one-element array into a loop bound in a way NumPy 2.4 refuses,
    so with that pair every Triton case would fail for a reason outside fastrome."""
    import numpy
    import triton
    import triton.language as tl

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")

        @triton.jit
        def probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                tl.store(x_ptr + offs, offs.to(tl.float32), mask=offs < n)

        x = torch.zeros(5)
        try:
            probe_kernel[(1,)](x, 5, BLOCK=4)
        except Exception as exc:  # any failure of the interpreter itself
            return (
                f"the interpreter of Triton {triton.__version__} fails with NumPy {numpy.__version__} "
                f"({type(exc).__name__}: {exc}); this Triton's interpreter needs numpy<2.4"
            )
    if not torch.equal(x, torch.arange(5.0)):
        return f"the interpreter of Triton {triton.__version__} computed {x.tolist()} for [0, 1, 2, 3, 4]"
    return None


def _cpp_why_not() -> Optional[str]:
    err = _extension.load_error()
    return None if err is None else f"C++ extension fastrome._C not built: {err}"


def _cuda_why_not() -> Optional[str]:
    if not HAVE_CUDA:
        return "no CUDA device (torch.cuda.is_available() is False)"
    if _extension.load_error() is not None:
        return f"the extension fastrome._C is not built: {_extension.load_error()}"
    if not _extension.built_with_cuda():
        return f"the CUDA extension fastrome._C_cuda is not loaded: {_extension.cuda_load_error()}"
    return None


TRITON_WHY_NOT, TRITON_MODULES = _import_triton()
TRITON_INTERPRETED = not HAVE_CUDA

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
ALL_X = [F32, BF16, F16, F64]
FORMS3 = ["float", "f32", "f64"]


def _p(*axes) -> List[tuple]:
    return list(itertools.product(*axes))


@dataclass(frozen=True)
class KernelBackend:
    """One backend under test: where its tensors live, whether it runs here (``why_not`` is the
    skip reason when it does not), the sizes each test runs at on it (``sizes[test] -> list of
    parameter tuples``; a test absent from the table does not run there) and its tolerances."""

    name: str
    device: torch.device
    why_not: Optional[str]
    sizes: Dict[str, List[Any]]
    tol: Dict[str, Any] = field(default_factory=dict)

    @property
    def marks(self) -> tuple:
        marks = [pytest.mark.gpu] if self.device.type == "cuda" else []
        if self.why_not is not None:
            marks.append(pytest.mark.skip(reason=f"{self.name}: {self.why_not}"))
        return tuple(marks)

    def randn(self, *shape, g, dtype=torch.float32, scale=1.0) -> torch.Tensor:
        """Normal draws made on the CPU in fp64 (reproducible), rounded, moved to the device."""
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(self.device)

    def tensor(self, data, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def scalar(self, value: float, form: str):
        return as_scalar(value, form, device=self.device)


# Sizes shared by the backends that run on the CPU without an interpreter.
_CPU_SIZES: Dict[str, List[Any]] = {
    "moment": [
        (d, n, x, a)
        for d, n in [(1, 1), (1, 37), (7, 1), (7, 50), (13, 3), (13, 101), (257, 33), (576, 19)]
        for x in ALL_X
        for a in ACC_DTYPES
    ],
    "moment_no_rows": _p([7, 257], ALL_X, ACC_DTYPES),
    "moment_wide": [(F32, F64), (BF16, F32), (F16, F64), (F64, F64)],
    "moment_noncontiguous": _p([13, 257], ALL_X, ["column_slice", "transposed", "row_strided"]),
    "moment_mask": _p([7, 257], ["all", "none", "some", "one", "some_strided_mask"], ACC_DTYPES),
    "moment_masked_nan": [(BF16,), (F32,)],
    "moment_twice": _p([13, 576], ACC_DTYPES),
    "moment_row_chunks": [(BF16, F32, False), (F32, F64, True), (F64, F64, False)],
    "moment_strided_acc": [(270, F32, BF16)],
    "moment_column_major": [(257, F32, BF16), (257, F64, F32)],
    "solve": _p([1, 2, 13, 257, 576], [F64, F32], [F32, F64, BF16], [None, 5]),
    "solve_layouts": _p(
        [37],
        ["contiguous", "column_major", "sliced"],
        ["strided_1d", "transposed_2d", "column_slice_2d", "row_strided_2d"],
    ),
    "solve_small": [(257,)],
    "r1u": _p(W_DTYPES, [(1, 1), (7, 13), (13, 7), (576, 1536)], ["contiguous", "transposed", "sliced"], [False, True]),
    "r1u_master_dtypes": _p([(19, 23)], W_DTYPES, [F32, F64]),
    "r1u_vectors": _p([(11, 17)], [F32, BF16, F64], [(BF16, F64), (F64, F16), (F16, BF16)], [False, True]),
    "r1u_large": [(F32, "contiguous", False), (BF16, "contiguous", True)],
    "r1u_refused": [((9, 14), [(w, f, F32) for w, f in _p(W_DTYPES, FORMS3)])],
    "sym": _p([1, 7, 97, 576, 1536], ACC_DTYPES, [F32, BF16, F64]),
    "sym_layouts": _p([8, 37], ACC_DTYPES, ["contiguous", "transposed", "sliced"], ["contiguous", "strided", "offset"]),
    "sym_refused": [(13, _p(ACC_DTYPES, FORMS3))],
    "sym_small": [(9,)],
    "sym_key": _p([7, 97, 576], ACC_DTYPES, ["moderate", "strong"]),
}

BACKENDS: Dict[str, KernelBackend] = {
    "reference": KernelBackend("reference", torch.device("cpu"), None, _CPU_SIZES),
    "cpp": KernelBackend("cpp", torch.device("cpu"), _cpp_why_not(), _CPU_SIZES),
    # The interpreter is slow: few rows, and sizes that still cross the 64/128-wide tiles.
    "triton": KernelBackend(
        "triton",
        torch.device("cuda" if HAVE_CUDA else "cpu"),
        TRITON_WHY_NOT,
        {
            "moment": [
                (d, n, x, a)
                for d, n in [(1, 5), (7, 70), (13, 33), (67, 70), (131, 41), (576, 19)]
                for x in [F32, BF16, F16]
                for a in ACC_DTYPES
            ],
            "moment_no_rows": [(13, BF16, F64)],
            "moment_wide": [(BF16, F64), (F32, F32)],
            "moment_noncontiguous": _p([67, 131], [BF16, F32], ["column_slice", "transposed", "row_strided"]),
            "moment_mask": _p([7, 131], ["all", "none", "some", "one", "some_strided_mask"], ACC_DTYPES),
            "moment_twice": _p([13, 576], ACC_DTYPES),
            "moment_strided_acc": [(131, F32, BF16)],
            "moment_column_major": [(67, F32, BF16)],
            "solve": _p([1, 13, 67, 576], [F64, F32], [F32, BF16, F64], [None, 3]),
            "solve_layouts": _p(
                [67], ["column_major", "sliced"], ["strided_1d", "transposed_2d", "column_slice_2d", "row_strided_2d"]
            ),
            "solve_small": [(131,)],
            "r1u": _CPU_SIZES["r1u"],
            "r1u_master_dtypes": _CPU_SIZES["r1u_master_dtypes"],
            "r1u_vectors": _p([(11, 17)], [F32, BF16, F64], [(BF16, F64), (F64, F16), (F16, BF16)], [True]),
            "r1u_large": _CPU_SIZES["r1u_large"],
            # each weight dtype once, all scalar forms (bf16 too) across them
            "r1u_refused": [((9, 14), list(zip(W_DTYPES, SCALAR_FORMS, [F32, F32, F64, F32])))],
            "sym": _p([1, 7, 97, 576], ACC_DTYPES, [F32, BF16, F64]) + _p([1536], ACC_DTYPES, [BF16]),
            "sym_layouts": _p([37], ACC_DTYPES, ["contiguous", "transposed", "sliced"], ["strided", "offset"]),
            "sym_refused": [(13, [(F32, "float"), (F64, "f32"), (F32, "f64")])],
            "sym_small": [(9,)],
            "sym_key": _p([7, 97], ACC_DTYPES, ["strong"]),
        },
    ),
    # Big and odd sizes: around the 1024-row GEMM blocks (1024, 1025, 2053: a ragged last block),
    # the 32-wide fold tiles, and the 16-byte vector paths (d % 4 == 0) against the element paths.
    "cuda": KernelBackend(
        "cuda",
        torch.device("cuda"),
        _cuda_why_not(),
        {
            "moment": _p([1, 2, 13, 257, 576, 1024, 1025, 1536, 2053], [1, 37, 300], [BF16, F16, F32, F64], ACC_DTYPES),
            "moment_no_rows": _p([1, 13, 1031], [BF16], ACC_DTYPES),
            "moment_noncontiguous": _p(
                [13, 1031], [BF16, F16, F32, F64], ["column_slice", "transposed", "row_strided"]
            ),
            "moment_mask": _p([7, 1031], ["all", "none", "some", "one", "some_strided_mask"], ACC_DTYPES),
            "moment_masked_nan": [(BF16,), (F32,)],
            "moment_twice": _p([13, 1031], ACC_DTYPES),
            "moment_strided_acc": _p([1100], ACC_DTYPES, [BF16, F32, F64]),
            "moment_column_major": _p([1031], ACC_DTYPES, [BF16, F32]),
            "moment_large": [
                (4096, 2048, BF16, F32),
                (4096, 1000, BF16, F64),
                (4096, 777, F16, F32),
                (11008, 256, BF16, F32),
            ],
            "solve": _p([1, 2, 13, 257, 576, 1536], [F64, F32], [F32, F64, BF16, F16], [None, 1, 4, 5, 9]),
            "solve_layouts": _p(
                [37, 576],
                ["contiguous", "column_major", "sliced", "misaligned"],
                ["strided_1d", "transposed_2d", "column_slice_2d", "row_strided_2d"],
            ),
            "solve_small": [(1536,)],
            "solve_large": [(4096, F64, None), (4096, F64, 3), (11008, F32, 2)],
            "r1u": _p(
                W_DTYPES,
                [(1, 1), (7, 13), (13, 7), (8, 16), (576, 1536)],
                ["contiguous", "transposed", "sliced", "misaligned"],
                [False, True],
            ),
            "r1u_master_dtypes": _p([(19, 23), (64, 256)], W_DTYPES, [F32, F64]),
            "r1u_vectors": _p(
                [(11, 17), (32, 64), (64, 96)], [F32, BF16, F64], [(BF16, F64), (F64, F16), (F16, BF16)], [False, True]
            ),
            "r1u_large": [
                (F32, "contiguous", False),
                (BF16, "contiguous", True),
                (BF16, "transposed", False),
                (F16, "contiguous", False),
                (F64, "transposed", True),
            ],
            "r1u_refused": [(s, [(w, f, F32) for w, f in _p(W_DTYPES, FORMS3)]) for s in [(9, 14), (64, 2056)]],
            "sym": _p([1, 2, 7, 8, 97, 576, 1536, 2053], ACC_DTYPES, [F32, BF16, F64]),
            "sym_layouts": _p(
                [37, 64],
                ACC_DTYPES,
                ["contiguous", "transposed", "sliced", "misaligned"],
                ["contiguous", "strided", "misaligned"],
            ),
            "sym_refused": [(d, _p(ACC_DTYPES, FORMS3)) for d in [13, 64]],
            "sym_small": [(8,), (13,), (64,)],  # the vector path (d % 4 == 0) and the element path
            "sym_key": _p([7, 576], ACC_DTYPES, ["moderate", "strong"]),
        },
        # Tensor-core accumulation may truncate once per 16-product MMA step: n/8 more units in the
        # moment tolerance; the solve sums lane-wise, d/32 terms and a 5-level butterfly.
        tol={"moment_per_row": 1 / 8, "solve_terms": lambda d: d / 32.0 + 8.0},
    ),
}

# FASTROME_TEST_BACKENDS=cuda,triton runs those backends only (scripts/wheel_smoke.sh: only CUDA).
SELECTED = [b for b in os.environ.get("FASTROME_TEST_BACKENDS", ",".join(BACKENDS)).split(",") if b]


def _id(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (list, tuple)):
        return "x".join(_id(x) for x in v) if all(isinstance(x, int) for x in v) else f"{len(v)}combos"
    return str(v)


def on(*names: str) -> list:
    """Parameters for the named backends (all when none is named), for an indirect ``backend``."""
    return [pytest.param(n, marks=BACKENDS[n].marks, id=n) for n in (names or BACKENDS) if n in SELECTED]


def cases(test: str) -> list:
    """``(backend, *sizes)`` parameters: each backend's ``sizes[test]`` rows."""
    out = []
    for name in SELECTED:
        kb = BACKENDS[name]
        for row in kb.sizes.get(test, ()):
            row = row if isinstance(row, tuple) else (row,)
            out.append(pytest.param(name, *row, marks=kb.marks, id="-".join([name] + [_id(v) for v in row])))
    return out


@contextlib.contextmanager
def serving(kb: KernelBackend, monkeypatch):
    """Make ``kb`` servable for its device (Triton interpreted on the CPU) and force it."""
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    if kb.name == "triton" and TRITON_INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        for mod in TRITON_MODULES:
            monkeypatch.setitem(sys.modules, mod.__name__, mod)
    with ops.use_backend(kb.name):
        for op in ops.OPS:
            assert ops.select_backend(op, kb.device) == kb.name, (op, kb.name)
        yield kb


def force_backend(request, monkeypatch):
    """The body of the test modules' ``backend`` fixture: the backend of the test's (indirect)
    parameter, forced for the test (dispatch is checked, not assumed)."""
    kb = BACKENDS[request.param]
    if kb.why_not is not None:
        pytest.skip(f"{kb.name}: {kb.why_not}")
    with serving(kb, monkeypatch):
        yield kb
