// The Python module fastrome._C: the C++ CPU kernels (cpu/) as plain functions. fastrome/ops.py
// declares the ops (torch.ops.fastrome) and calls these for CPU tensors.
#include <torch/extension.h>

#include <string>

#include "bind.h"

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
  m.doc() = "fastrome C++ CPU kernels (served through torch.ops.fastrome)";
  m.def("build_info", &build_info, "What this extension was built with.");
  fastrome::bind_kernels(m, &fastrome::second_moment_accumulate_cpu, &fastrome::solve_keys_cpu,
                         &fastrome::rank_one_update_cpu, &fastrome::symmetric_rank_one_update_cpu);
}
