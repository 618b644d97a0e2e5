// The Python module fastrome._C_cuda: loading it registers the CUDA kernels of cuda/*.cu under the
// fastrome_C op names (fastrome._C defines the schemas and is loaded first).
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <string>

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
  m.doc() = "fastrome CUDA kernels (registered for CUDA tensors under torch.ops.fastrome_C)";
  m.def("build_info", &build_info, "What this extension was built with.");
}
