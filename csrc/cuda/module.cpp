// The Python module fastrome._C_cuda: the CUDA kernels of cuda/*.cu as plain functions. fastrome/ops.py
// declares the ops (torch.ops.fastrome) and calls these for CUDA tensors.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <string>

#include "../bind.h"

#ifndef FASTROME_CUDA_ARCH_LIST
#define FASTROME_CUDA_ARCH_LIST "unknown"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_runtime"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_arch"] = std::string(FASTROME_CUDA_ARCH_LIST);
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrome CUDA kernels (served through torch.ops.fastrome)";
  m.def("build_info", &build_info, "What this extension was built with.");
  fastrome::bind_kernels(m, &fastrome::cuda::second_moment_accumulate_cuda, &fastrome::cuda::solve_keys_cuda,
                         &fastrome::cuda::rank_one_update_cuda, &fastrome::cuda::symmetric_rank_one_update_cuda);
}
