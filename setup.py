"""Build of fastrome's compiled extension ``fastrome._C``.

The C++ CPU kernels always build when torch is importable at build time (install with
``pip install --no-build-isolation``, so the build sees the torch you already have instead of
downloading another one). CUDA sources join only when a CUDA toolkit and a CUDA build of torch are
both present. Environment switches:

- ``FASTROME_BUILD_EXT=0``: skip the extension entirely (pure-Python install, reference ops).
- ``FASTROME_BUILD_CUDA=auto|1|0``: CUDA sources when possible (default), always (error if
  impossible), never.
- ``FASTROME_REQUIRE_EXT=1``: a failed compile fails the install (otherwise it warns and the
  package falls back to the reference ops).
- ``FASTROME_CUDA_ARCH``: passed to ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0a``).
- ``MAX_JOBS``: parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _warn(msg: str) -> None:
    sys.stderr.write(f"\n[fastrome setup] {msg}\n\n")


def _rel(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extensions():
    """(ext_modules, cmdclass) for the compiled part, or ([], {}) when it cannot or should not build."""
    if _env("FASTROME_BUILD_EXT", "1") in ("0", "false", "no"):
        _warn("FASTROME_BUILD_EXT=0: building without the compiled extension (reference ops only).")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn(
            "torch is not importable in the build environment, so the C++ extension is skipped. "
            "Install torch first and use `pip install --no-build-isolation .` to build it."
        )
        return [], {}

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    want_cuda = _env("FASTROME_BUILD_CUDA", "auto")
    can_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda in ("1", "true", "yes") and not can_cuda:
        raise RuntimeError(
            "FASTROME_BUILD_CUDA=1 but CUDA cannot be built here: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}"
        )
    with_cuda = bool(cuda_sources) and can_cuda and want_cuda not in ("0", "false", "no")

    # -fopenmp-simd honours the kernels' `omp simd` loops without linking an OpenMP runtime.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp-simd"]
    macros = []
    if with_cuda:
        # Hopper (sm_90a) first, Ampere (sm_80) too; scripts/check_cuda_build.sh uses the same list.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("FASTROME_CUDA_ARCH", "8.0;9.0a"))
        macros.append(("FASTROME_WITH_CUDA", "1"))
        # No --use_fast_math: its flush-to-zero would zero denormal weights and vector entries that
        # the reference keeps. -lineinfo maps profiler samples to source lines at no runtime cost.
        nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            "fastrome._C",
            sources + cuda_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        ext = cpp_extension.CppExtension("fastrome._C", sources, define_macros=macros, extra_compile_args=cxx_flags)

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        """Turns a failed compile into a warning unless FASTROME_REQUIRE_EXT=1."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compile errors surface as various distutils errors
                if _env("FASTROME_REQUIRE_EXT", "0") in ("1", "true", "yes"):
                    raise
                _warn(f"building fastrome._C failed ({exc}); installing without it (reference ops only).")

    return [ext], {"build_ext": BuildExtension}


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
