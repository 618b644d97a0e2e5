// Helpers shared by the CUDA kernels in csrc/cuda: host-side argument checks, dtype codes, and
// device-side vector loads/stores and conversions.
//
// Only c10/cuda headers are used (stream, guard, launch check), not ATen/cuda/CUDAContext.h: that
// one pulls in cuBLAS, cuSPARSE and cuSOLVER headers, which a bare CUDA toolkit (nvcc and the
// runtime only, as on the CPU build machines) does not ship, and none of these kernels needs them
// (second_moment.cu reaches cuBLAS through ATen's matmul, which uses the same handle and stream).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../checks.h"

namespace fastrome {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

// Every tensor of a call lives on `device` (the first tensor's, a CUDA device).
inline void check_on(const at::Tensor& t, const char* name, const at::Device& device) {
  FASTROME_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  check_device(t, name, device);
}

// A tensor that is written must not have two elements at one address (an expanded view): the
// kernels write each element from one thread and would race, and ATen refuses such writes too.
inline void check_no_overlap(const at::Tensor& t, const char* name) {
  FASTROME_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                 ": elements overlap in memory (sizes ", t.sizes(), ", strides ", t.strides(),
                 "); pass a tensor that owns its elements");
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size of a grid-stride kernel: one thread per work item, capped so that a huge tensor still
// launches (the loop covers the rest); 2^20 blocks of 256 threads is far beyond any real matrix.
inline unsigned int grid_for(int64_t items, int threads) {
  const int64_t blocks = ceil_div(items, threads);
  return static_cast<unsigned int>(blocks < (int64_t{1} << 20) ? (blocks > 0 ? blocks : 1) : (int64_t{1} << 20));
}

// Storage dtype of a vector read on the fly by a kernel (rank_one_update's u, lam and scalars):
// a runtime code, so one kernel instantiation serves every combination of vector dtypes.
enum class Dt : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

inline Dt dt_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Dt::f32;
    case at::kDouble:
      return Dt::f64;
    case at::kHalf:
      return Dt::f16;
    case at::kBFloat16:
      return Dt::bf16;
    default:
      FASTROME_CHECK(false, "expected a floating-point dtype, got ", t);
  }
  return Dt::f32;  // unreachable
}

// A strided vector in any float dtype, read element by element by the kernels.
struct VecIn {
  const void* ptr;
  int64_t stride;  // in elements; 0 for a scalar
  Dt dt;
};

inline VecIn vec_in(const at::Tensor& t) {
  return VecIn{t.data_ptr(), t.dim() == 0 ? 0 : t.stride(0), dt_of(t.scalar_type())};
}

template <typename T>
constexpr Dt dt_code() {
  return std::is_same<T, double>::value ? Dt::f64 : Dt::f32;
}

// ------------------------------------------------------------------------------------------------
// Device side
// ------------------------------------------------------------------------------------------------

template <typename T>
struct is_16bit : std::integral_constant<bool, std::is_same<T, c10::Half>::value ||
                                                   std::is_same<T, c10::BFloat16>::value> {};

// Storage -> arithmetic: 16-bit floats widen through float (exact); float/double convert directly.
template <typename To, typename From>
__device__ __forceinline__ To to_compute(From v) {
  if constexpr (is_16bit<From>::value) {
    return static_cast<To>(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

// Arithmetic -> storage, rounding as torch's own copy_ does: a double bound for bf16/fp16 goes
// through float (torch converts double -> Half/BFloat16 by way of their float constructor), so
// weight == master.to(weight.dtype) holds bit for bit.
template <typename To, typename From>
__device__ __forceinline__ To to_storage(From v) {
  if constexpr (is_16bit<To>::value) {
    return To(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

// Element i of a VecIn, converted to c_t. The switch is uniform across a warp (one dtype per
// vector), so it costs a predictable branch, not divergence.
template <typename c_t>
__device__ __forceinline__ c_t load_as(const VecIn& v, int64_t i) {
  const int64_t o = i * v.stride;
  switch (v.dt) {
    case Dt::f64:
      return static_cast<c_t>(static_cast<const double*>(v.ptr)[o]);
    case Dt::f32:
      return static_cast<c_t>(static_cast<const float*>(v.ptr)[o]);
    case Dt::f16:
      return static_cast<c_t>(static_cast<float>(static_cast<const c10::Half*>(v.ptr)[o]));
    default:
      return static_cast<c_t>(static_cast<float>(static_cast<const c10::BFloat16*>(v.ptr)[o]));
  }
}

// N elements of T moved as one access. Never more than 16 bytes: that is the widest global load
// of sm_80/sm_90, and a wider alignas would promise an alignment the caller does not check.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  static_assert(sizeof(T) * N <= 16, "Pack is at most 16 bytes");
  T v[N];
};

// Loads N consecutive elements with 16-byte accesses (or one 8-byte access when N·sizeof(T) is
// 8). Requires p aligned to min(16, N·sizeof(T)) bytes; the host checks that before choosing a
// vectorised kernel.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[N]) {
  constexpr int kPer = (N * sizeof(T) >= 16) ? static_cast<int>(16 / sizeof(T)) : N;
  static_assert(N % kPer == 0, "whole accesses only");
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    const Pack<T, kPer> q = *reinterpret_cast<const Pack<T, kPer>*>(p + c * kPer);
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      out[c * kPer + e] = q.v[e];
    }
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[N]) {
  constexpr int kPer = (N * sizeof(T) >= 16) ? static_cast<int>(16 / sizeof(T)) : N;
  static_assert(N % kPer == 0, "whole accesses only");
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    Pack<T, kPer> q;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      q.v[e] = in[c * kPer + e];
    }
    *reinterpret_cast<Pack<T, kPer>*>(p + c * kPer) = q;
  }
}

// Sum over the 32 lanes of a warp with a fixed butterfly: every lane ends with the same value, and
// the order of additions never depends on timing (deterministic results).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  return v;
}

}  // namespace cuda
}  // namespace fastrome
