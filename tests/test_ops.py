"""Op-level tests of the fastrome ops that are not numerics: argument checks of the public
wrappers (bad arguments raise and touch nothing), the scalar forms they take, backend selection
and forcing (with spies on the reference implementations), the torch.library registration and the
fake (meta) implementations.

The numerical checks of every backend are in tests/test_kernels.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from kernel_checks import force_backend, on, same_bits

from fastrome import _extension, ops, reference

CPU_BACKENDS = pytest.mark.parametrize("backend", on("reference", "cpp"), indirect=True)


@pytest.fixture
def backend(request, monkeypatch):
    yield from force_backend(request, monkeypatch)


# ----------------------------------------------------------------------------------------------
# Argument checking of the public wrappers
# ----------------------------------------------------------------------------------------------

META = torch.device("meta")


def _sma(acc=None, x=None, mask="absent", d=4, n=3):
    acc = torch.eye(d) if acc is None else acc
    x = torch.ones(n, d) if x is None else x
    if isinstance(mask, str) and mask == "absent":
        return ops.second_moment_accumulate, (acc, x), {}
    return ops.second_moment_accumulate, (acc, x, mask), {}


def _solve(inverse=None, k=None, d=4):
    inverse = torch.eye(d, dtype=torch.float64) if inverse is None else inverse
    k = torch.ones(d) if k is None else k
    return ops.solve_keys, (inverse, k), {}


def _r1u(weight=None, u=None, lam=None, denom=1.0, min_denom=0.0, master=None):
    weight = torch.zeros(3, 5) if weight is None else weight
    u = torch.ones(5) if u is None else u
    lam = torch.ones(3) if lam is None else lam
    return ops.rank_one_update, (weight, u, lam), {"denom": denom, "min_denom": min_denom, "master": master}


def _sru(inverse=None, u=None, beta=0.5, denom=1.0, min_denom=1e-12, d=4):
    inverse = torch.eye(d) if inverse is None else inverse
    u = torch.ones(d) if u is None else u
    return ops.symmetric_rank_one_update, (inverse, u, beta, denom), {"min_denom": min_denom}


def _sru_u_view_of_inverse(view):
    inverse = torch.eye(4)
    return _sru(inverse=inverse, u=view(inverse))


BAD_ARGS = {
    # second_moment_accumulate
    "sma_acc_not_tensor": (lambda: _sma(acc=[[1.0]]), TypeError, "acc:"),
    "sma_x_not_tensor": (lambda: _sma(x=[[1.0] * 4]), TypeError, "x:"),
    "sma_acc_1d": (lambda: _sma(acc=torch.ones(4)), ValueError, "acc:"),
    "sma_acc_not_square": (lambda: _sma(acc=torch.zeros(4, 5)), ValueError, "acc:"),
    "sma_acc_bf16": (lambda: _sma(acc=torch.zeros(4, 4, dtype=torch.bfloat16)), ValueError, "acc:"),
    "sma_acc_int": (lambda: _sma(acc=torch.zeros(4, 4, dtype=torch.int32)), ValueError, "acc:"),
    "sma_x_wrong_d": (lambda: _sma(x=torch.ones(3, 5)), ValueError, "x:"),
    "sma_x_1d": (lambda: _sma(x=torch.ones(4)), ValueError, "x:"),
    "sma_x_3d": (lambda: _sma(x=torch.ones(2, 3, 4)), ValueError, "x:"),
    "sma_x_int": (lambda: _sma(x=torch.ones(3, 4, dtype=torch.int64)), ValueError, "x:"),
    "sma_mask_not_tensor": (lambda: _sma(mask=[True, False, True]), TypeError, "mask:"),
    "sma_mask_float": (lambda: _sma(mask=torch.ones(3)), ValueError, "mask:"),
    "sma_mask_uint8": (lambda: _sma(mask=torch.ones(3, dtype=torch.uint8)), ValueError, "mask:"),
    "sma_mask_wrong_len": (lambda: _sma(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask:"),
    "sma_mask_2d": (lambda: _sma(mask=torch.ones(3, 1, dtype=torch.bool)), ValueError, "mask:"),
    "sma_x_other_device": (lambda: _sma(x=torch.ones(3, 4, device=META)), ValueError, "x on meta"),
    "sma_acc_other_device": (lambda: _sma(acc=torch.eye(4, device=META)), ValueError, "acc on meta"),
    "sma_mask_other_device": (
        lambda: _sma(mask=torch.ones(3, dtype=torch.bool, device=META)),
        ValueError,
        "mask on meta",
    ),
    # solve_keys
    "solve_inverse_not_tensor": (lambda: _solve(inverse=1.0), TypeError, "inverse:"),
    "solve_k_not_tensor": (lambda: _solve(k=[1.0] * 4), TypeError, "k:"),
    "solve_inverse_not_square": (lambda: _solve(inverse=torch.zeros(4, 3)), ValueError, "inverse:"),
    "solve_inverse_3d": (lambda: _solve(inverse=torch.zeros(1, 4, 4)), ValueError, "inverse:"),
    "solve_inverse_fp16": (lambda: _solve(inverse=torch.eye(4, dtype=torch.float16)), ValueError, "inverse:"),
    "solve_k_wrong_d": (lambda: _solve(k=torch.ones(5)), ValueError, "k:"),
    "solve_k_0d": (lambda: _solve(k=torch.tensor(1.0)), ValueError, "k:"),
    "solve_k_3d": (lambda: _solve(k=torch.ones(2, 2, 4)), ValueError, "k:"),
    "solve_k_int": (lambda: _solve(k=torch.ones(4, dtype=torch.int32)), ValueError, "k:"),
    "solve_k_other_device": (lambda: _solve(k=torch.ones(4, device=META)), ValueError, "k on meta"),
    "solve_inverse_other_device": (
        lambda: _solve(inverse=torch.eye(4, dtype=torch.float64, device=META)),
        ValueError,
        "inverse on meta",
    ),
    # rank_one_update
    "r1u_weight_not_tensor": (lambda: _r1u(weight=[[0.0] * 5] * 3), TypeError, "weight:"),
    "r1u_u_not_tensor": (lambda: _r1u(u=(1.0,) * 5), TypeError, "u:"),
    "r1u_lam_not_tensor": (lambda: _r1u(lam=3), TypeError, "lam:"),
    "r1u_weight_1d": (lambda: _r1u(weight=torch.zeros(5)), ValueError, "weight:"),
    "r1u_weight_int": (lambda: _r1u(weight=torch.zeros(3, 5, dtype=torch.int32)), ValueError, "weight:"),
    "r1u_u_wrong_len": (lambda: _r1u(u=torch.ones(3)), ValueError, "u:"),
    "r1u_u_2d": (lambda: _r1u(u=torch.ones(1, 5)), ValueError, "u:"),
    "r1u_u_int": (lambda: _r1u(u=torch.ones(5, dtype=torch.int64)), ValueError, "u:"),
    "r1u_lam_wrong_len": (lambda: _r1u(lam=torch.ones(5)), ValueError, "lam:"),
    "r1u_lam_bool": (lambda: _r1u(lam=torch.ones(3, dtype=torch.bool)), ValueError, "lam:"),
    "r1u_master_not_tensor": (lambda: _r1u(master=1.0), TypeError, "master:"),
    "r1u_master_wrong_shape": (lambda: _r1u(master=torch.zeros(5, 3)), ValueError, "master:"),
    "r1u_master_bf16": (lambda: _r1u(master=torch.zeros(3, 5, dtype=torch.bfloat16)), ValueError, "master:"),
    "r1u_weight_other_device": (
        lambda: _r1u(weight=torch.zeros(3, 5, device=META)),
        ValueError,
        "weight on meta",
    ),
    "r1u_u_other_device": (lambda: _r1u(u=torch.ones(5, device=META)), ValueError, "u on meta"),
    "r1u_lam_other_device": (lambda: _r1u(lam=torch.ones(3, device=META)), ValueError, "lam on meta"),
    "r1u_master_other_device": (
        lambda: _r1u(master=torch.zeros(3, 5, device=META)),
        ValueError,
        "master on meta",
    ),
    "r1u_denom_str": (lambda: _r1u(denom="1.0"), TypeError, "denom:"),
    "r1u_denom_bool": (lambda: _r1u(denom=True), TypeError, "denom:"),
    "r1u_denom_none": (lambda: _r1u(denom=None), TypeError, "denom:"),
    "r1u_denom_two_elements": (lambda: _r1u(denom=torch.ones(2)), ValueError, "denom:"),
    "r1u_denom_int_tensor": (lambda: _r1u(denom=torch.tensor(1)), ValueError, "denom:"),
    "r1u_denom_other_device": (lambda: _r1u(denom=torch.tensor(1.0, device=META)), ValueError, "denom:"),
    "r1u_min_denom_none": (lambda: _r1u(min_denom=None), TypeError, "min_denom:"),
    "r1u_min_denom_int_tensor": (lambda: _r1u(min_denom=torch.tensor(0)), ValueError, "min_denom:"),
    "r1u_min_denom_other_device": (
        lambda: _r1u(min_denom=torch.tensor(0.0, device=META)),
        ValueError,
        "min_denom:",
    ),
    # symmetric_rank_one_update
    "sru_inverse_not_tensor": (lambda: _sru(inverse=[[1.0] * 4] * 4), TypeError, "inverse:"),
    "sru_u_not_tensor": (lambda: _sru(u=[1.0] * 4), TypeError, "u:"),
    "sru_inverse_1d": (lambda: _sru(inverse=torch.ones(4)), ValueError, "inverse:"),
    "sru_inverse_not_square": (lambda: _sru(inverse=torch.zeros(4, 5)), ValueError, "inverse:"),
    "sru_inverse_3d": (lambda: _sru(inverse=torch.zeros(1, 4, 4)), ValueError, "inverse:"),
    "sru_inverse_bf16": (lambda: _sru(inverse=torch.eye(4, dtype=torch.bfloat16)), ValueError, "inverse:"),
    "sru_inverse_int": (lambda: _sru(inverse=torch.zeros(4, 4, dtype=torch.int64)), ValueError, "inverse:"),
    "sru_inverse_expanded": (
        lambda: _sru(inverse=torch.ones(1, 4).expand(4, 4)),
        ValueError,
        "inverse: elements overlap in memory (strides (0, 1))",
    ),
    "sru_u_wrong_len": (lambda: _sru(u=torch.ones(5)), ValueError, "u: expected a (4,) floating-point"),
    "sru_u_2d": (lambda: _sru(u=torch.ones(1, 4)), ValueError, "u:"),
    "sru_u_int": (lambda: _sru(u=torch.ones(4, dtype=torch.int32)), ValueError, "u:"),
    "sru_u_row_of_inverse": (lambda: _sru_u_view_of_inverse(lambda m: m[1]), ValueError, "u: shares memory"),
    "sru_u_diagonal_of_inverse": (
        lambda: _sru_u_view_of_inverse(torch.diagonal),
        ValueError,
        "u: shares memory",
    ),
    "sru_u_other_device": (lambda: _sru(u=torch.ones(4, device=META)), ValueError, "u on meta"),
    "sru_inverse_other_device": (lambda: _sru(inverse=torch.eye(4, device=META)), ValueError, "inverse on meta"),
    "sru_beta_str": (lambda: _sru(beta="0.5"), TypeError, "beta:"),
    "sru_beta_none": (lambda: _sru(beta=None), TypeError, "beta:"),
    "sru_beta_bool": (lambda: _sru(beta=True), TypeError, "beta:"),
    "sru_beta_two_elements": (lambda: _sru(beta=torch.ones(2)), ValueError, "beta:"),
    "sru_beta_int_tensor": (lambda: _sru(beta=torch.tensor(1)), ValueError, "beta:"),
    "sru_beta_other_device": (lambda: _sru(beta=torch.tensor(0.5, device=META)), ValueError, "beta:"),
    "sru_denom_none": (lambda: _sru(denom=None), TypeError, "denom:"),
    "sru_denom_int_tensor": (lambda: _sru(denom=torch.tensor(2)), ValueError, "denom:"),
    "sru_min_denom_str": (lambda: _sru(min_denom="0"), TypeError, "min_denom:"),
    "sru_min_denom_two_elements": (lambda: _sru(min_denom=torch.zeros(3)), ValueError, "min_denom:"),
}


def _tensors_in(args, kwargs):
    return [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("case", list(BAD_ARGS))
@CPU_BACKENDS
def test_bad_arguments_raise_and_touch_nothing(backend, case):
    make, exc, needle = BAD_ARGS[case]
    fn, args, kwargs = make()
    cpu_tensors = [t for t in _tensors_in(args, kwargs) if t.device.type == "cpu"]
    before = [t.clone() for t in cpu_tensors]
    with pytest.raises(exc, match=re.escape(needle)):
        fn(*args, **kwargs)
    for t, t0 in zip(cpu_tensors, before):
        assert same_bits(t, t0), f"{case}: an argument was modified although the call raised"


@CPU_BACKENDS
def test_valid_scalar_forms_accepted(backend):
    """Python ints/floats, 0-dim and 1-element tensors of any float dtype work as denom/min_denom."""
    for denom, min_denom in [
        (2, 1),
        (2.0, torch.tensor(1.0, dtype=torch.bfloat16)),
        (torch.tensor([2.0]), torch.tensor([[1.0]], dtype=torch.float16)),
    ]:
        w = torch.zeros(2, 3)
        assert bool(ops.rank_one_update(w, torch.ones(3), torch.ones(2), denom=denom, min_denom=min_denom))
        assert torch.equal(w, torch.ones(2, 3))


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def reference_spies(monkeypatch):
    """Count calls into the reference implementations (looked up at call time by ops)."""
    calls = {op: 0 for op in ops.OPS}
    for op in ops.OPS:
        real = getattr(reference, op)

        def spy(*args, _real=real, _op=op, **kwargs):
            calls[_op] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(reference, op, spy)
    return calls


def _run_all_ops():
    ops.second_moment_accumulate(torch.eye(3), torch.ones(2, 3))
    ops.solve_keys(torch.eye(3, dtype=torch.float64), torch.ones(3))
    ops.rank_one_update(torch.zeros(2, 3), torch.ones(3), torch.ones(2), denom=1.0, min_denom=0.0)
    ops.symmetric_rank_one_update(torch.eye(3), torch.ones(3), 0.5, 3.0)


@pytest.mark.skipif(_extension.load_error() is not None, reason="C++ extension fastrome._C not built")
def test_select_backend_follows_the_benchmarked_preference_on_cpu(monkeypatch, reference_spies):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    first = {op: ops.preference(op, "cpu")[0] for op in ops.OPS}
    assert first["second_moment_accumulate"] == "cpp"  # 4x the reference in benches/
    for op in ops.OPS:
        assert ops.select_backend(op, "cpu") == first[op]
        assert ops.select_backend(op, torch.device("cpu")) == first[op]
    _run_all_ops()
    assert reference_spies == {op: int(first[op] == "reference") for op in ops.OPS}


def test_select_backend_without_extension_falls_back(monkeypatch, reference_spies):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    monkeypatch.setattr(_extension, "load_error", lambda: "ImportError: pretend it is not built")
    for op in ops.OPS:
        assert ops.select_backend(op, "cpu") == "reference"
    _run_all_ops()
    assert reference_spies == {op: 1 for op in ops.OPS}
    with ops.use_backend("cpp"), pytest.raises(RuntimeError, match="not built"):
        ops.select_backend("solve_keys", "cpu")


def test_other_devices_use_reference(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    for op in ops.OPS:
        assert ops.select_backend(op, "meta") == "reference"


def test_use_backend_forces_reference(monkeypatch, reference_spies):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    with ops.use_backend("reference"):
        for op in ops.OPS:
            assert ops.select_backend(op, "cpu") == "reference"
        _run_all_ops()
        with ops.use_backend(None):  # nested: automatic choice again
            assert ops.forced_backend() is None
        assert ops.forced_backend() == "reference"
    assert ops.forced_backend() is None
    assert reference_spies == {op: 1 for op in ops.OPS}


def test_use_backend_forces_only_its_own_thread(monkeypatch):
    import threading

    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    inside, release, seen = threading.Event(), threading.Event(), {}

    def forcing():
        with ops.use_backend("reference"):
            seen["forcing"] = ops.forced_backend()
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=forcing)
    worker.start()
    assert inside.wait(10)
    seen["other"] = ops.forced_backend()  # this thread, while the other is inside its block
    release.set()
    worker.join(10)
    assert seen == {"forcing": "reference", "other": None}


def test_use_backend_restores_after_exception(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    with pytest.raises(KeyError):
        with ops.use_backend("reference"):
            raise KeyError("boom")
    assert ops.forced_backend() is None


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="bogus"):
        with ops.use_backend("bogus"):
            pass


def test_env_var_forces_reference(monkeypatch, reference_spies):
    monkeypatch.setenv(ops.ENV_BACKEND, "reference")
    for op in ops.OPS:
        assert ops.select_backend(op, "cpu") == "reference"
    _run_all_ops()
    assert reference_spies == {op: 1 for op in ops.OPS}


def test_env_var_bogus_raises(monkeypatch):
    monkeypatch.setenv(ops.ENV_BACKEND, "bogus")
    with pytest.raises(ValueError, match="FASTROME_BACKEND") as info:
        ops.select_backend("solve_keys", "cpu")
    assert "bogus" in str(info.value)
    acc = torch.eye(3)
    with pytest.raises(ValueError, match="FASTROME_BACKEND"):
        ops.second_moment_accumulate(acc, torch.ones(2, 3))
    assert torch.equal(acc, torch.eye(3))


@pytest.mark.parametrize("name,why", [("cuda", "CUDA|fastrome._C is not built"), ("triton", "Triton")])
def test_forcing_gpu_backend_on_cpu_raises(monkeypatch, name, why):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    for how in ("context", "env"):
        ctx = ops.use_backend(name) if how == "context" else ops.use_backend(None)
        if how == "env":
            monkeypatch.setenv(ops.ENV_BACKEND, name)
        with ctx:
            for op in ops.OPS:
                with pytest.raises(RuntimeError) as info:
                    ops.select_backend(op, "cpu")
                msg = str(info.value)
                assert repr(name) in msg and op in msg and "cpu" in msg and re.search(why, msg), msg
            acc = torch.eye(3)
            with pytest.raises(RuntimeError, match=why):
                ops.second_moment_accumulate(acc, torch.ones(2, 3))
            assert torch.equal(acc, torch.eye(3))
            w = torch.zeros(2, 3)
            with pytest.raises(RuntimeError, match=why):
                ops.rank_one_update(w, torch.ones(3), torch.ones(2), denom=1.0, min_denom=0.0)
            assert torch.equal(w, torch.zeros(2, 3))


def test_backend_table_lists_every_op(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    rows = ops.backend_table(("cpu",))
    assert sorted(r["op"] for r in rows) == sorted(ops.OPS)
    built = _extension.load_error() is None
    for r in rows:
        first = ops.preference(r["op"], "cpu")[0]
        assert r["backend"] == (first if built else "reference"), r
        if r["backend"] == "reference" and first == "cpp":
            assert "not built" in r["skipped"]["cpp"]


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


def test_ops_registered_with_mutation_schema():
    mutated = {
        "second_moment_accumulate": {"acc"},
        "solve_keys": set(),
        "rank_one_update": {"weight", "master"},
        "symmetric_rank_one_update": {"inverse"},
    }
    for op, want in mutated.items():
        packet = getattr(torch.ops.fastrome, op)
        schema = packet.default._schema
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert written == want, (op, written)


def test_one_op_namespace_with_a_kernel_for_each_device():
    """Each op is declared once, under torch.ops.fastrome, and the dispatcher has a kernel for it on
    the CPU, on CUDA and on Meta; the compiled kernels are plain functions of the extension modules,
    not ops of another namespace."""
    for op in ops.OPS:
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"fastrome::{op}", key), (op, key)
        with pytest.raises(RuntimeError):
            torch._C._dispatch_find_schema_or_throw(f"fastrome_C::{op}", "")
        if _extension.cpu_kernels() is not None:
            assert callable(getattr(_extension.cpu_kernels(), op)), op


@pytest.mark.skipif(_extension.cpu_kernels() is None, reason="the C++ extension fastrome._C is not built")
def test_cpu_kernels_check_the_shared_arguments_before_writing():
    """The C++ guarded writes refuse what the CUDA ones refuse (csrc/checks.h), leaving the matrix as it was."""
    cpp = _extension.cpu_kernels()
    w, u, lam = torch.zeros(3, 4), torch.ones(4), torch.ones(3)
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    with pytest.raises(ValueError, match="denom and min_denom: expected floating-point scalars"):
        cpp.rank_one_update(w, u, lam, torch.tensor(1), zero, None)
    with pytest.raises(ValueError, match=re.escape("lam: expected (3,) floating point")):
        cpp.rank_one_update(w, u, torch.ones(4), one, zero, None)
    inverse = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="beta, denom and min_denom: expected floating-point scalars"):
        cpp.symmetric_rank_one_update(inverse, u, torch.tensor(1), one, zero)
    with pytest.raises(ValueError, match=re.escape("u: expected (4,) floating point")):
        cpp.symmetric_rank_one_update(inverse, torch.ones(5), one, one, zero)
    assert torch.equal(w, torch.zeros(3, 4)) and torch.equal(inverse, torch.eye(4, dtype=torch.float64))


def test_fake_tensors_on_meta_device():
    """The fake implementations give the shapes/dtypes of the real ones (meta tensors use them)."""
    u, denom = ops.solve_keys(torch.eye(4, device=META), torch.ones(3, 4, dtype=torch.bfloat16, device=META))
    assert (u.shape, u.dtype, u.device) == ((3, 4), torch.float32, META)
    assert (denom.shape, denom.dtype) == ((3,), torch.float32)
    u, denom = ops.solve_keys(torch.eye(4, device=META), torch.ones(4, dtype=torch.float64, device=META))
    assert (u.shape, u.dtype, denom.shape, denom.dtype) == ((4,), torch.float64, (), torch.float64)
    w, u, lam = torch.zeros(2, 4, device=META), torch.ones(4, device=META), torch.ones(2, device=META)
    flag = ops.rank_one_update(w, u, lam, denom=1.0, min_denom=0.0)
    assert (flag.shape, flag.dtype, flag.device) == ((), torch.bool, META)
    inverse = torch.eye(4, dtype=torch.float64, device=META)
    flag = ops.symmetric_rank_one_update(inverse, torch.ones(4, dtype=torch.bfloat16, device=META), 0.5, 2.0)
    assert (flag.shape, flag.dtype, flag.device) == ((), torch.bool, META)
