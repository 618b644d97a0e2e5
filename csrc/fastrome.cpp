// The fastrome_C op library: schemas of the compiled kernels and the C++ CPU kernels (cpu/), in the
// Python module fastrome._C. The CUDA kernels (cuda/) are a separate extension, fastrome._C_cuda,
// that registers its kernels under these names for CUDA tensors.
#include <torch/extension.h>

#include <string>

TORCH_LIBRARY(fastrome_C, m) {
  // acc += xᵀx over rows where mask is true; acc must be symmetric on entry and is on exit.
  m.def("second_moment_accumulate(Tensor(a!) acc, Tensor x, Tensor? mask) -> ()");
  // (u, uᵀk) with u = A k from the cached symmetric inverse A = (C + ridge·I)⁻¹, k of shape (d,) or (b, d).
  m.def("solve_keys(Tensor inverse, Tensor k) -> (Tensor, Tensor)");
  // Guarded weight += lam ⊗ u (through master when given); returns the applied flag.
  m.def(
      "rank_one_update(Tensor(a!) weight, Tensor u, Tensor lam, Tensor denom, Tensor min_denom, "
      "Tensor(b!)? master) -> Tensor");
  // Guarded Sherman–Morrison step inverse -= coef·u uᵀ, coef = beta / (1 + beta·denom) in fp64,
  // refused unless 1 + beta·denom > min_denom and u, beta·denom, coef are finite; returns the
  // applied flag. A symmetric inverse stays exactly symmetric.
  m.def("symmetric_rank_one_update(Tensor(a!) inverse, Tensor u, Tensor beta, Tensor denom, Tensor min_denom) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#if AT_PARALLEL_OPENMP
  info["cpu_parallel"] = std::string("openmp");
#else
  info["cpu_parallel"] = std::string("native");
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrome C++ CPU kernels and op schemas (torch.ops.fastrome_C)";
  m.def("build_info", &build_info, "What this extension was built with.");
}
