// Argument checks shared by the host code of every kernel family. Messages carry the values seen,
// and raise ValueError in Python (TORCH_CHECK_VALUE).
#pragma once

#include <ATen/ATen.h>

#define FASTROME_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace fastrome {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  FASTROME_CHECK(t.device() == device, name, ": expected a tensor on ", device, ", got one on ", t.device());
}

}  // namespace fastrome
