"""Build of fastrome's two compiled extensions.

- ``fastrome._C``: the C++ CPU kernels, as plain functions (the ops, ``torch.ops.fastrome``, are
  declared in ``fastrome/ops.py``, which calls them for CPU tensors). Built whenever
  torch is importable at build time (install with ``pip install --no-build-isolation``, so the
  build sees the torch you already have instead of downloading another one).
- ``fastrome._C_cuda``: the CUDA kernels, likewise (called by the ops for CUDA tensors).
  Built when a CUDA toolkit and a CUDA build of torch are both present. It is a separate
  extension so that a failed CUDA compile never takes the CPU kernels with it.

Environment switches:

- ``FASTROME_BUILD_EXT=0``: skip both extensions (pure-Python install, reference ops).
- ``FASTROME_BUILD_CUDA=auto|1|0``: the CUDA extension when possible (default), always (an error
  if it cannot be built, and its compile errors fail the build), never.
- ``FASTROME_REQUIRE_EXT=1``: any failed compile fails the install (otherwise it warns and the
  package serves those ops from another backend).
- ``FASTROME_CUDA_ARCH``: passed to ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0a``).
- ``CUDA_HOME``: the toolkit root; when unset and ``nvcc`` is on ``PATH``, the root is found from
  nvcc's real location (a ``/usr/local/bin/nvcc`` link would otherwise make torch look for the
  headers under ``/usr/local``).
- ``MAX_JOBS``: parallel compile jobs (ninja).

The C++ standard is left to torch's build helper, which picks the one its headers need (C++17 up
to torch 2.13, C++20 from 2.14).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _warn(msg: str) -> None:
    sys.stderr.write(f"\n[fastrome setup] {msg}\n\n")


def _rel(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _true(name: str, default: str = "0") -> bool:
    return _env(name, default) in ("1", "true", "yes")


def _find_cuda_home() -> None:
    """Set ``CUDA_HOME`` to the toolkit root when it is unset and the toolkit's headers are not beside
    the nvcc found on ``PATH`` (torch would look for them there): nvcc may be a link or a wrapper
    script, so the root is the one nvcc itself reports (``TOP=`` of a dry run)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    candidates = [os.path.dirname(os.path.dirname(nvcc))]
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60).stderr
        tops = [line.split("TOP=", 1)[1].strip() for line in out.splitlines() if "TOP=" in line]
        candidates += [os.path.normpath(top) for top in tops]
    except (OSError, subprocess.SubprocessError):
        pass
    for candidate in candidates:
        if os.path.exists(os.path.join(candidate, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = candidate
            return


def _extensions():
    """(ext_modules, cmdclass) for the compiled part, or ([], {}) when it cannot or should not build."""
    if _env("FASTROME_BUILD_EXT", "1") in ("0", "false", "no"):
        _warn("FASTROME_BUILD_EXT=0: building without the compiled extensions (reference ops only).")
        return [], {}
    _find_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn(
            "torch is not importable in the build environment, so the C++ extensions are skipped. "
            "Install torch first and use `pip install --no-build-isolation .` to build them."
        )
        return [], {}

    # -fopenmp-simd honours the kernels' `omp simd` loops without linking an OpenMP runtime.
    cxx_flags = ["-O3", "-fopenmp-simd"]
    extensions = [
        cpp_extension.CppExtension("fastrome._C", _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp"),
                                   extra_compile_args=cxx_flags)
    ]

    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    want_cuda = _env("FASTROME_BUILD_CUDA", "auto")
    insist = want_cuda in ("1", "true", "yes")
    cuda_home = cpp_extension.CUDA_HOME
    headers = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h"))
    can_cuda = torch.version.cuda is not None and headers
    if insist and not can_cuda:
        raise RuntimeError(
            "FASTROME_BUILD_CUDA=1 but CUDA cannot be built here: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r}"
            + ("" if headers or cuda_home is None
               else " (no include/cuda_runtime.h there; set CUDA_HOME to the toolkit root)")
        )
    if cuda_sources and can_cuda and want_cuda not in ("0", "false", "no"):
        # Hopper (sm_90a) first, Ampere (sm_80) too; scripts/check_cuda_build.sh uses the same list.
        arch = os.environ.get("FASTROME_CUDA_ARCH", "8.0;9.0a")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", arch)
        # No --use_fast_math: its flush-to-zero would zero denormal weights and vector entries that
        # the reference keeps. -lineinfo maps profiler samples to source lines at no runtime cost.
        extensions.append(cpp_extension.CUDAExtension(
            "fastrome._C_cuda",
            cuda_sources,
            define_macros=[("FASTROME_CUDA_ARCH_LIST", '"' + os.environ["TORCH_CUDA_ARCH_LIST"] + '"')],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        ))

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        """Builds each extension on its own: a failed compile is a warning (that extension is left
        out, the other stays) unless FASTROME_REQUIRE_EXT=1, or FASTROME_BUILD_CUDA=1 for the CUDA one."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compile errors surface as various distutils errors
                if _true("FASTROME_REQUIRE_EXT") or (insist and ext.name == "fastrome._C_cuda"):
                    raise
                _warn(f"building {ext.name} failed ({exc}); installing without it "
                      "(its ops are served by another backend).")
                # rebinding (not mutating) leaves the loop over the old list alone; outputs and the
                # in-place copy of an editable install then skip the extension that is not there
                self.extensions = [e for e in self.extensions if e is not ext]

    return extensions, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    # every sub-package of fastrome/ (tests/test_wheel_smoke.py imports each from the installed wheel)
    packages=["fastrome", "fastrome.data"]
    + ["fastrome." + p for p in find_packages("fastrome") if p != "data"],
    package_dir={"fastrome": "fastrome"},
    package_data={"fastrome.data": ["*.xz", "NOTICE"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
