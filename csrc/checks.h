// Argument checks shared by the host code of every kernel family. Messages carry the values seen,
// and raise ValueError in Python (TORCH_CHECK_VALUE).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#define FASTROME_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace fastrome {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  FASTROME_CHECK(t.device() == device, name, ": expected a tensor on ", device, ", got one on ", t.device());
}

// Whether the address ranges the elements of a and b lie in intersect (the span from the first
// element to the last, whatever the strides). Conservative for interleaved strided views.
inline bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      a.storage().data() != b.storage().data()) {
    return false;
  }
  auto span = [](const at::Tensor& t) {
    int64_t extent = 1;
    for (int64_t i = 0; i < t.dim(); ++i) {
      extent += (t.size(i) - 1) * t.stride(i);
    }
    const auto start = reinterpret_cast<std::uintptr_t>(t.data_ptr());
    return std::make_pair(start, start + static_cast<std::uintptr_t>(extent * t.element_size()));
  };
  const auto sa = span(a);
  const auto sb = span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

}  // namespace fastrome
