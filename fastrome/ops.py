"""The numerical ops of fastrome: one entry per op, registered with ``torch.library``.

Every op has a pure-PyTorch reference (:mod:`fastrome.reference`) and, where built or installed,
kernels: ``cpp`` (C++ CPU, ``csrc/cpu``), ``cuda`` (``csrc/cuda``) and ``triton``
(``fastrome/kernels/``, also on CPU tensors under ``TRITON_INTERPRET=1``). Dispatch picks, per call, the
first backend in :data:`PREFERENCE` for the op and the tensors' device that is available; the
order per op comes from the benchmarks in ``benches/`` (``fastrome info`` shows the choice).

``FASTROME_BACKEND=<name>`` forces one backend for every op; asking for a backend that is missing,
or that cannot serve the tensors given, raises an error that says why and how to get it.

The public functions below check their arguments (names and values in every message) and then
call the registered ``torch.ops.fastrome.*`` op, so the same code runs eagerly and under
``torch.compile``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fastrome import _extension, reference

OPS = ("second_moment_accumulate", "solve_keys", "rank_one_update", "symmetric_rank_one_update")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACC_DTYPES = (torch.float32, torch.float64)
ENV_BACKEND = "FASTROME_BACKEND"


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One implementation family of the ops."""

    name: str
    device_types: Callable[[], Tuple[str, ...]]
    impls: Callable[[], Dict[str, Callable]]
    unavailable: Callable[[], Optional[str]]
    """Returns None when usable, else a sentence saying why not and how to get it."""
    device_note: str = ""
    """Said when the backend cannot take the tensors' device: how to make it able to."""

    def available(self) -> bool:
        return self.unavailable() is None


def _reference_impls() -> Dict[str, Callable]:
    return {
        "second_moment_accumulate": reference.second_moment_accumulate,
        "solve_keys": reference.solve_keys,
        "rank_one_update": _reference_rank_one_update,
        "symmetric_rank_one_update": _reference_symmetric_rank_one_update,
    }


def _reference_symmetric_rank_one_update(inverse, u, beta, denom, min_denom):
    # Looked up at call time, so that tests can observe the calls.
    return reference.symmetric_rank_one_update(inverse, u, beta, denom, min_denom)


def _reference_rank_one_update(weight, u, lam, denom, min_denom, master):
    return reference.rank_one_update(weight, u, lam, denom=denom, min_denom=min_denom, master=master)


def _compiled_impls(module: Callable[[], object]) -> Callable[[], Dict[str, Callable]]:
    """The four kernels of a compiled extension module (plain functions, not ops of their own: the
    one op namespace is ``torch.ops.fastrome``, declared below)."""

    def impls() -> Dict[str, Callable]:
        loaded = module()
        return {op: getattr(loaded, op) for op in OPS} if loaded is not None else {}

    return impls


def _cpp_unavailable() -> Optional[str]:
    err = _extension.load_error()
    if err is not None:
        return (
            f"the C++ extension fastrome._C is not built ({err}); reinstall with "
            "`pip install --no-build-isolation -e .` and a C++ compiler"
        )
    return None


def _cuda_unavailable() -> Optional[str]:
    err = _extension.cuda_load_error()
    if err is not None:
        return (
            f"the CUDA extension fastrome._C_cuda is not loaded ({err}); build it on a machine with a "
            "CUDA toolkit and a CUDA build of torch (FASTROME_BUILD_CUDA=1 to insist)"
        )
    return None


def triton_interpreted() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_unavailable() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (`pip install triton`)"
    try:
        from fastrome import kernels

        kernels.load()
    except Exception as exc:  # a kernel module that fails to import is reported, not fatal
        return f"the Triton kernels failed to load ({type(exc).__name__}: {exc})"
    return None


def _triton_impls() -> Dict[str, Callable]:
    from fastrome import kernels

    return kernels.load()


def _triton_devices() -> Tuple[str, ...]:
    # Triton fixes interpretation when a kernel is first imported, so both must hold: the
    # variable is set and the loaded kernels really are interpreted.
    if triton_interpreted() and _triton_unavailable() is None:
        from fastrome import kernels

        if kernels.interpreted():
            return ("cuda", "cpu")
    return ("cuda",)


BACKENDS: Dict[str, Backend] = {
    "reference": Backend("reference", lambda: ("*",), _reference_impls, lambda: None),
    "cpp": Backend("cpp", lambda: ("cpu",), _compiled_impls(_extension.cpu_kernels), _cpp_unavailable),
    "cuda": Backend("cuda", lambda: ("cuda",), _compiled_impls(_extension.cuda_kernels), _cuda_unavailable),
    "triton": Backend(
        "triton", _triton_devices, _triton_impls, _triton_unavailable,
        device_note="Triton kernels run on CUDA tensors, and on CPU tensors only in Triton's interpreter "
        "(TRITON_INTERPRET=1 set before the kernels are first imported)",
    ),
}

# Preference per (device type, op), fastest first, from the benchmarks in benches/ (results in
# benches/results/ops_cpu.json, README "Kernel benchmarks"); the first available backend that can
# take the tensors is used. CPU, 2 threads, at the larger benchmarked shapes: the C++ second moment
# is 4.1x the reference (it skips the lower triangle); for the memory-bound solve and write, the
# reference's ATen/MKL kernels (AVX-dispatched at run time) beat the generically compiled C++ loops
# (C++ at 0.53x and 0.56x), so the reference serves them and the C++ kernels stay one
# FASTROME_BACKEND=cpp away. The Sherman–Morrison step is the other way round: the reference forms
# u uᵀ as a d×d temporary and makes three passes, the C++ kernel one (8x at d = 11008, fp32 and fp64).
PREFERENCE: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "cpu": {
        "second_moment_accumulate": ("cpp", "reference"),
        "solve_keys": ("reference", "cpp"),
        "rank_one_update": ("reference", "cpp"),
        "symmetric_rank_one_update": ("cpp", "reference"),
    },
    "cuda": {op: ("cuda", "triton", "reference") for op in OPS},
}


def preference(op: str, device_type: str) -> Tuple[str, ...]:
    return PREFERENCE.get(device_type, {}).get(op, ("reference",))


# a ContextVar, not a module global: a block in one thread or asyncio task forces nothing in another
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastrome_forced_backend", default=None)


def _backend_serves(backend: Backend, op: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    why = backend.unavailable()
    if why is not None:
        return why
    types = backend.device_types()
    if "*" not in types and device.type not in types:
        note = f" ({backend.device_note})" if backend.device_note else ""
        return f"it runs on {', '.join(types)} tensors, not {device.type}{note}"
    if op not in backend.impls():
        return f"it does not implement {op}"
    return None


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` or ``FASTROME_BACKEND``, if any."""
    name = _forced.get() or os.environ.get(ENV_BACKEND) or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={name!r} is not a backend; choose one of {sorted(BACKENDS)}")
    return name


def select_backend(op: str, device: Union[torch.device, str]) -> str:
    """Name of the backend that serves ``op`` for tensors on ``device``."""
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        why = _backend_serves(BACKENDS[forced], op, device)
        if why is not None:
            raise RuntimeError(f"backend {forced!r} was requested for {op} on {device.type}, but {why}")
        return forced
    for name in preference(op, device.type):
        if _backend_serves(BACKENDS[name], op, device) is None:
            return name
    return "reference"


def _impl(op: str, device: torch.device) -> Callable:
    return BACKENDS[select_backend(op, device)].impls()[op]


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force ``name`` for every op inside the block (``None`` restores automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend: {name!r} is not one of {sorted(BACKENDS)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def backend_table(devices: Optional[Sequence[str]] = None) -> List[Dict[str, str]]:
    """One row per (op, device): the backend that serves it now, and why others do not.

    ``devices`` defaults to the CPU and, when one is present, CUDA.
    """
    if devices is None:
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    rows = []
    for op in OPS:
        for dev in devices:
            try:
                chosen = select_backend(op, dev)
            except RuntimeError as exc:
                chosen = f"error: {exc}"
            skipped = {}
            for name in preference(op, dev):
                if name == chosen:
                    break
                skipped[name] = _backend_serves(BACKENDS[name], op, torch.device(dev)) or ""
            rows.append({"op": op, "device": dev, "backend": chosen, "skipped": skipped})
    return rows


# ----------------------------------------------------------------------------------------------
# torch.library registration: one namespace, each op declared once
# ----------------------------------------------------------------------------------------------
#
# Each declaration's body is the op's one kernel, for every device: it runs the backend that the
# tensors' device's preference picks (or the forced one), calling the compiled kernels as plain
# functions of fastrome._C / fastrome._C_cuda.


@torch.library.custom_op("fastrome::second_moment_accumulate", mutates_args=("acc",))
def _second_moment_accumulate_op(acc: Tensor, x: Tensor, mask: Optional[Tensor]) -> None:
    _impl("second_moment_accumulate", acc.device)(acc, x, mask)


@_second_moment_accumulate_op.register_fake
def _(acc, x, mask):
    return None


@torch.library.custom_op("fastrome::solve_keys", mutates_args=())
def _solve_keys_op(inverse: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
    return _impl("solve_keys", inverse.device)(inverse, k)


@_solve_keys_op.register_fake
def _(inverse, k):
    out_dtype = torch.promote_types(k.dtype, torch.float32)
    return k.new_empty(k.shape, dtype=out_dtype), k.new_empty(k.shape[:-1], dtype=out_dtype)


@torch.library.custom_op("fastrome::rank_one_update", mutates_args=("weight", "master"))
def _rank_one_update_op(
    weight: Tensor, u: Tensor, lam: Tensor, denom: Tensor, min_denom: Tensor, master: Optional[Tensor]
) -> Tensor:
    return _impl("rank_one_update", weight.device)(weight, u, lam, denom, min_denom, master)


@_rank_one_update_op.register_fake
def _(weight, u, lam, denom, min_denom, master):
    return weight.new_empty((), dtype=torch.bool)


@torch.library.custom_op("fastrome::symmetric_rank_one_update", mutates_args=("inverse",))
def _symmetric_rank_one_update_op(
    inverse: Tensor, u: Tensor, beta: Tensor, denom: Tensor, min_denom: Tensor
) -> Tensor:
    return _impl("symmetric_rank_one_update", inverse.device)(inverse, u, beta, denom, min_denom)


@_symmetric_rank_one_update_op.register_fake
def _(inverse, u, beta, denom, min_denom):
    return inverse.new_empty((), dtype=torch.bool)


# ----------------------------------------------------------------------------------------------
# Public entry points (checked)
# ----------------------------------------------------------------------------------------------


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"
    return f"{type(t).__name__} {t!r}"


def _require_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(t)}")
    return t


def _require_same_device(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors))
        raise ValueError(f"all tensors must be on one device, got {listing}")


def second_moment_accumulate(acc: Tensor, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Add the second moment of the rows of ``x`` into ``acc``: ``acc += xᵀx`` over masked rows.

    Args:
        acc: (d, d) float32 or float64 accumulator, updated in place; it holds the full symmetric
            sum afterwards.
        x: (n, d) rows in any float dtype (bf16/fp16/fp32/fp64), any strides.
        mask: optional (n,) bool; only rows where it is true are added.

    Returns:
        ``acc`` (the same tensor).
    """
    _require_tensor("acc", acc)
    _require_tensor("x", x)
    if acc.dim() != 2 or acc.shape[0] != acc.shape[1] or acc.dtype not in ACC_DTYPES:
        raise ValueError(f"acc: expected a square (d, d) float32/float64 tensor, got {_describe(acc)}")
    if x.dim() != 2 or x.shape[1] != acc.shape[0] or x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"x: expected an (n, {acc.shape[0]}) floating-point tensor to match acc, got {_describe(x)}"
        )
    tensors, names = [acc, x], ["acc", "x"]
    if mask is not None:
        _require_tensor("mask", mask)
        if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != x.shape[0]:
            raise ValueError(f"mask: expected a ({x.shape[0]},) bool tensor, got {_describe(mask)}")
        tensors.append(mask)
        names.append("mask")
    _require_same_device(names, tensors)
    with torch.no_grad():
        torch.ops.fastrome.second_moment_accumulate(acc, x, mask)
    return acc


def solve_keys(inverse: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
    """``u = A k`` and ``denom = uᵀk`` in one pass, from the cached inverse ``A = (C + ridge·I)⁻¹``.

    Args:
        inverse: (d, d) symmetric float32/float64 matrix (:class:`fastrome.CovarianceSolver` keeps
            it); the product is formed in its dtype.
        k: (d,) one key or (b, d) a batch of keys, any float dtype.

    Returns:
        ``(u, denom)``: u with k's shape, denom of shape () or (b,), both in
        ``promote(k.dtype, float32)``; denom is computed from the returned (rounded) ``u``.
    """
    _require_tensor("inverse", inverse)
    _require_tensor("k", k)
    if inverse.dim() != 2 or inverse.shape[0] != inverse.shape[1] or inverse.dtype not in ACC_DTYPES:
        raise ValueError(f"inverse: expected a square float32/float64 matrix, got {_describe(inverse)}")
    if k.dim() not in (1, 2) or k.shape[-1] != inverse.shape[0] or k.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"k: expected shape ({inverse.shape[0]},) or (b, {inverse.shape[0]}) floating point, "
            f"got {_describe(k)}"
        )
    _require_same_device(["inverse", "k"], [inverse, k])
    with torch.no_grad():
        return torch.ops.fastrome.solve_keys(inverse, k)


def _as_scalar_tensor(name: str, value: Union[float, Tensor], device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1 or not (value.is_floating_point()):
            raise ValueError(f"{name}: expected a floating-point scalar tensor, got {_describe(value)}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name}: expected a scalar on {device} or the CPU, got {_describe(value)}")
        return value.reshape(()).to(device=device)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64, device=device)
    raise TypeError(f"{name}: expected a float or a scalar tensor, got {_describe(value)}")


def rank_one_update(
    weight: Tensor,
    u: Tensor,
    lam: Tensor,
    *,
    denom: Union[float, Tensor],
    min_denom: Union[float, Tensor],
    master: Optional[Tensor] = None,
) -> Tensor:
    """Guarded, in-place rank-one write ``weight += lam ⊗ u``.

    The write happens only if ``denom``, ``u`` and ``lam`` are all finite and
    ``denom > min_denom``; otherwise nothing is touched (bit for bit). The arithmetic is fp32
    (fp64 for fp64 data) whatever the weight dtype.

    Args:
        weight: (d_out, d_in) weight in nn.Linear orientation, any float dtype; a transposed view
            (``conv1d.weight.t()``) writes a Conv1D layout in place.
        u: (d_in,) left vector (e.g. ``C⁻¹k``).
        lam: (d_out,) right vector Λ.
        denom: the update's denominator ``uᵀk`` (float or 0-dim tensor), checked on the device.
        min_denom: the smallest denominator accepted (exclusive).
        master: optional (d_out, d_in) fp32/fp64 master copy: ``master += lam ⊗ u`` and then
            ``weight = round(master)``, so repeated writes to bf16/fp16 weights do not drift.

    Returns:
        0-dim bool tensor on ``weight.device``: whether the write happened.
    """
    _require_tensor("weight", weight)
    _require_tensor("u", u)
    _require_tensor("lam", lam)
    if weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight: expected a 2-D floating-point tensor, got {_describe(weight)}")
    d_out, d_in = weight.shape
    if u.dim() != 1 or u.shape[0] != d_in or u.dtype not in FLOAT_DTYPES:
        raise ValueError(f"u: expected a ({d_in},) floating-point vector to match weight, got {_describe(u)}")
    if lam.dim() != 1 or lam.shape[0] != d_out or lam.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"lam: expected a ({d_out},) floating-point vector to match weight, got {_describe(lam)}"
        )
    tensors, names = [weight, u, lam], ["weight", "u", "lam"]
    if master is not None:
        _require_tensor("master", master)
        if master.shape != weight.shape or master.dtype not in ACC_DTYPES:
            raise ValueError(
                f"master: expected a float32/float64 tensor of shape {tuple(weight.shape)}, "
                f"got {_describe(master)}"
            )
        tensors.append(master)
        names.append("master")
    _require_same_device(names, tensors)
    denom_t = _as_scalar_tensor("denom", denom, weight.device)
    min_denom_t = _as_scalar_tensor("min_denom", min_denom, weight.device)
    with torch.no_grad():
        return torch.ops.fastrome.rank_one_update(weight, u, lam, denom_t, min_denom_t, master)


def _require_writable_square(name: str, m: Tensor) -> None:
    """A (d, d) fp32/fp64 matrix whose elements each own their memory (no expanded view)."""
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.dtype not in ACC_DTYPES:
        raise ValueError(f"{name}: expected a square (d, d) float32/float64 matrix, got {_describe(m)}")
    if any(size > 1 and stride == 0 for size, stride in zip(m.shape, m.stride())):
        # Every kernel writes each element once from one thread: shared elements would race.
        raise ValueError(
            f"{name}: elements overlap in memory (strides {tuple(m.stride())}); pass a tensor that owns "
            "its elements"
        )


def _byte_span(t: Tensor) -> Tuple[int, int]:
    """The half-open range of addresses ``t``'s elements lie in (non-negative strides)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + extent * t.element_size()


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether the address ranges of ``a`` and ``b`` intersect (meta tensors have no memory)."""
    if a.device.type == "meta" or b.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


def symmetric_rank_one_update(
    inverse: Tensor,
    u: Tensor,
    beta: Union[float, Tensor],
    denom: Union[float, Tensor],
    *,
    min_denom: Union[float, Tensor] = 1e-12,
) -> Tensor:
    """Guarded in-place Sherman–Morrison step on a symmetric inverse: ``inverse -= coef · u uᵀ``.

    Keeps ``inverse = A⁻¹`` of the edit memory ``A = C + β Σ k kᵀ`` current: adding a key k gives
    ``(A + β k kᵀ)⁻¹ = A⁻¹ − β u uᵀ / (1 + β uᵀk)`` with ``u = A⁻¹k``, so
    ``coef = β / (1 + β·denom)``. Removing a key is the same call with ``-β`` and the ``u``,
    ``denom`` of the current A (which contains k).

    ``coef`` is computed in fp64 inside the op (on the device, no host synchronisation on GPUs).
    The update is refused, and nothing is written (bit for bit), when ``u`` (in inverse's dtype),
    ``β·denom`` or ``coef`` (in inverse's dtype) is not finite, or when ``1 + β·denom <= min_denom``:
    a vanishing or negative denominator means the result would not be the inverse of a positive
    definite matrix. β = 0 is applied and writes nothing.

    The arithmetic is in inverse's dtype (fp32 or fp64). Each element becomes
    ``m_ij - coef·(u_i·u_j)`` with the product of the two u's formed first; IEEE multiplication
    commutes, so an exactly symmetric ``inverse`` stays exactly symmetric.

    Args:
        inverse: (d, d) float32/float64, exactly symmetric, updated in place; any strides.
        u: (d,) any float dtype, any stride (``A⁻¹k`` from :func:`solve_keys`); it must not share
            memory with ``inverse``.
        beta: the memory weight β (float or 0-dim tensor); negative to remove a key.
        denom: ``uᵀk`` (float or 0-dim tensor).
        min_denom: the smallest ``1 + β·denom`` accepted (exclusive).

    Returns:
        0-dim bool tensor on ``inverse.device``: whether the update was applied.
    """
    _require_tensor("inverse", inverse)
    _require_tensor("u", u)
    _require_writable_square("inverse", inverse)
    d = inverse.shape[0]
    if u.dim() != 1 or u.shape[0] != d or u.dtype not in FLOAT_DTYPES:
        raise ValueError(f"u: expected a ({d},) floating-point vector to match inverse, got {_describe(u)}")
    _require_same_device(["inverse", "u"], [inverse, u])
    if _shares_memory(inverse, u):
        raise ValueError(
            "u: shares memory with inverse (a view of the matrix being updated would be read while it "
            "is written); pass a copy"
        )
    beta_t = _as_scalar_tensor("beta", beta, inverse.device)
    denom_t = _as_scalar_tensor("denom", denom, inverse.device)
    min_denom_t = _as_scalar_tensor("min_denom", min_denom, inverse.device)
    with torch.no_grad():
        return torch.ops.fastrome.symmetric_rank_one_update(inverse, u, beta_t, denom_t, min_denom_t)
