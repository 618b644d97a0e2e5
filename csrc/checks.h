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

// The shapes and dtypes of rank_one_update's arguments, the same for every device.
inline void check_rank_one_update_args(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& lam,
                                       const at::Tensor& denom, const at::Tensor& min_denom) {
  FASTROME_CHECK(weight.dim() == 2 && is_float_type(weight.scalar_type()),
                 "weight: expected a 2-D floating-point tensor, got ", weight.scalar_type(), " ", weight.sizes());
  const int64_t d_out = weight.size(0);
  const int64_t d_in = weight.size(1);
  FASTROME_CHECK(u.dim() == 1 && u.size(0) == d_in && is_float_type(u.scalar_type()), "u: expected (", d_in,
                 ",) floating point, got ", u.scalar_type(), " ", u.sizes());
  FASTROME_CHECK(lam.dim() == 1 && lam.size(0) == d_out && is_float_type(lam.scalar_type()), "lam: expected (",
                 d_out, ",) floating point, got ", lam.scalar_type(), " ", lam.sizes());
  FASTROME_CHECK(denom.numel() == 1 && min_denom.numel() == 1, "denom and min_denom: expected scalars, got ",
                 denom.sizes(), " and ", min_denom.sizes());
  FASTROME_CHECK(is_float_type(denom.scalar_type()) && is_float_type(min_denom.scalar_type()),
                 "denom and min_denom: expected floating-point scalars, got ", denom.scalar_type(), " and ",
                 min_denom.scalar_type());
}

// The shapes and dtypes of symmetric_rank_one_update's arguments, the same for every device.
inline void check_symmetric_update_args(const at::Tensor& inverse, const at::Tensor& u, const at::Tensor& beta,
                                        const at::Tensor& denom, const at::Tensor& min_denom) {
  FASTROME_CHECK(inverse.dim() == 2 && inverse.size(0) == inverse.size(1) &&
                     (inverse.scalar_type() == at::kFloat || inverse.scalar_type() == at::kDouble),
                 "inverse: expected a square float32/float64 matrix, got ", inverse.scalar_type(), " ",
                 inverse.sizes());
  const int64_t d = inverse.size(0);
  FASTROME_CHECK(u.dim() == 1 && u.size(0) == d && is_float_type(u.scalar_type()), "u: expected (", d,
                 ",) floating point, got ", u.scalar_type(), " ", u.sizes());
  FASTROME_CHECK(beta.numel() == 1 && denom.numel() == 1 && min_denom.numel() == 1,
                 "beta, denom and min_denom: expected scalars, got ", beta.sizes(), ", ", denom.sizes(), " and ",
                 min_denom.sizes());
  FASTROME_CHECK(is_float_type(beta.scalar_type()) && is_float_type(denom.scalar_type()) &&
                     is_float_type(min_denom.scalar_type()),
                 "beta, denom and min_denom: expected floating-point scalars, got ", beta.scalar_type(), ", ",
                 denom.scalar_type(), " and ", min_denom.scalar_type());
}

}  // namespace fastrome
