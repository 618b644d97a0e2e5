// Guarded in-place Sherman–Morrison step on the GPU: inverse -= coef · u uᵀ with
// coef = β / (1 + β·denom). Semantics are those of fastrome.reference.symmetric_rank_one_update
// and csrc/cpu/symmetric_rank_one_update.cpp.
//
// No host synchronisation (the CPU kernel reads the scalars with .item(); here that would stall
// the host until all queued work is done):
//   1. guard kernel (one block): applied = β·denom finite, 1 + β·denom > min_denom, coef finite in
//      the matrix's dtype and every u element finite in it, written into the returned 0-dim bool
//      tensor, the only allocation of the call;
//   2. write kernel: every thread reads that flag first and returns at once when it is false, so a
//      refused update touches no byte. It recomputes coef from the same scalars with the same
//      correctly rounded fp64 operations as the guard (bit-identical, and identical to the CPU's),
//      and returns at once for coef = 0 (β = 0: nothing to write).
// The write is bandwidth bound: one read and one write of each element, 16-byte vector accesses
// when rows are contiguous and aligned, else a strided element path.
//
// Symmetry: element (a, b) becomes m - coef·(u[a]·u[b]), each operation correctly rounded and
// never contracted into an FMA (the _rn intrinsics), on both paths. IEEE multiplication commutes,
// so (a, b) and (b, a) get the same bits and an exactly symmetric matrix stays exactly symmetric;
// the results also equal the reference's bit for bit (and the CPU kernel's as setup.py builds it).
#include <ATen/Dispatch.h>

#include <cstdlib>

#include "../kernels.h"
#include "common.cuh"

namespace fastrome {
namespace cuda {
namespace {

constexpr int kGuardThreads = 1024;
constexpr int kWriteThreads = 256;

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// 1 + β·denom and coef = β / (1 + β·denom) in fp64, each rounded once, in the reference's order.
__device__ __forceinline__ double sherman_morrison_coef(const VecIn& beta, const VecIn& denom, double* bd,
                                                        double* s) {
  const double b = load_as<double>(beta, 0);
  *bd = __dmul_rn(b, load_as<double>(denom, 0));
  *s = __dadd_rn(1.0, *bd);
  return __ddiv_rn(b, *s);
}

template <typename c_t>
__global__ void __launch_bounds__(kGuardThreads)
    sym_guard(bool* flag, VecIn u, int64_t n, VecIn beta, VecIn denom, VecIn min_denom) {
  // Branch-free accumulation: successive loads do not wait on each other's results.
  int bad = 0;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    bad |= !isfinite(load_as<c_t>(u, i));
  }
  const int all_ok = __syncthreads_and(bad == 0);  // block-wide AND; every thread reaches it
  if (threadIdx.x == 0) {
    double bd, s;
    const double coef = sherman_morrison_coef(beta, denom, &bd, &s);
    const double floor = load_as<double>(min_denom, 0);
    // A NaN anywhere makes a comparison false: refused. coef is checked in the dtype it is used in.
    *flag = all_ok != 0 && isfinite(bd) && s > floor && isfinite(static_cast<c_t>(coef));
  }
}

// The coefficient the write uses, or 0 when there is nothing to write (refused, or β = 0).
template <typename c_t>
__device__ __forceinline__ c_t write_coef(const bool* flag, const VecIn& beta, const VecIn& denom) {
  if (!*flag) {
    return c_t(0);
  }
  double bd, s;
  return static_cast<c_t>(sherman_morrison_coef(beta, denom, &bd, &s));
}

// Fast path: rows contiguous, 16-byte aligned, a whole number of W = 16/sizeof(c_t) elements long.
// Each thread owns one 16-byte chunk of a row, so consecutive threads touch consecutive bytes.
template <typename c_t>
__global__ void __launch_bounds__(kWriteThreads)
    sym_write_vec(const bool* flag, c_t* __restrict__ m, int64_t sa, VecIn u, bool u_packed, int64_t d,
                  int64_t chunks_per_row, VecIn beta, VecIn denom) {
  const c_t coef = write_coef<c_t>(flag, beta, denom);
  if (coef == c_t(0)) {
    return;  // refused, or nothing to add: write nothing
  }
  constexpr int W = 16 / sizeof(c_t);
  const int64_t total = d * chunks_per_row;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < total;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t a = c / chunks_per_row;
    const int64_t b0 = (c - a * chunks_per_row) * W;
    const c_t ua = load_as<c_t>(u, a);
    c_t ub[W];
    if (u_packed) {  // u already in c_t, contiguous and aligned: one 16-byte load
      load_vec<c_t, W>(static_cast<const c_t*>(u.ptr) + b0, ub);
    } else {
#pragma unroll
      for (int e = 0; e < W; ++e) {
        ub[e] = load_as<c_t>(u, b0 + e);
      }
    }
    c_t* mp = m + a * sa + b0;
    c_t v[W];
    load_vec<c_t, W>(mp, v);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      v[e] = sub_rn(v[e], mul_rn(coef, mul_rn(ua, ub[e])));
    }
    store_vec<c_t, W>(mp, v);
  }
}

// Generic path: any strides, odd sizes, misaligned storage; one element per thread in memory
// order of the inner dimension, so accesses with inner stride 1 are still coalesced.
template <typename c_t>
__global__ void __launch_bounds__(kWriteThreads)
    sym_write_strided(const bool* flag, c_t* __restrict__ m, int64_t sa, int64_t sb, VecIn u, int64_t d, VecIn beta,
                      VecIn denom) {
  const c_t coef = write_coef<c_t>(flag, beta, denom);
  if (coef == c_t(0)) {
    return;  // refused, or nothing to add: write nothing
  }
  const int64_t total = d * d;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t a = e / d;
    const int64_t b = e - a * d;
    c_t* mp = m + a * sa + b * sb;
    *mp = sub_rn(*mp, mul_rn(coef, mul_rn(load_as<c_t>(u, a), load_as<c_t>(u, b))));
  }
}

template <typename c_t>
void launch_write(cudaStream_t stream, const bool* flag, at::Tensor& inverse, const VecIn& vu, const VecIn& vb,
                  const VecIn& vd) {
  const int64_t d = inverse.size(0);
  // Inner loop over the dimension of smaller stride; the update is symmetric in the two indices.
  const bool rows_inner = std::llabs(inverse.stride(1)) <= std::llabs(inverse.stride(0));
  const int64_t sa = rows_inner ? inverse.stride(0) : inverse.stride(1);
  const int64_t sb = rows_inner ? inverse.stride(1) : inverse.stride(0);
  c_t* m = inverse.data_ptr<c_t>();
  constexpr int W = 16 / sizeof(c_t);
  if (sb == 1 && d % W == 0 && aligned16(m) && (sa * int64_t{sizeof(c_t)}) % 16 == 0) {
    const bool u_packed = vu.dt == dt_code<c_t>() && vu.stride == 1 && aligned16(vu.ptr);
    const int64_t chunks_per_row = d / W;
    sym_write_vec<c_t><<<grid_for(d * chunks_per_row, kWriteThreads), kWriteThreads, 0, stream>>>(
        flag, m, sa, vu, u_packed, d, chunks_per_row, vb, vd);
  } else {
    sym_write_strided<c_t><<<grid_for(d * d, kWriteThreads), kWriteThreads, 0, stream>>>(flag, m, sa, sb, vu, d, vb,
                                                                                         vd);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Declared in kernels.h; bound by the extension module.
at::Tensor symmetric_rank_one_update_cuda(at::Tensor inverse, const at::Tensor& u, const at::Tensor& beta,
                                          const at::Tensor& denom, const at::Tensor& min_denom) {
  check_symmetric_update_args(inverse, u, beta, denom, min_denom);
  const int64_t d = inverse.size(0);
  const at::Device device = inverse.device();
  check_on(inverse, "inverse", device);
  check_on(u, "u", device);
  check_on(beta, "beta", device);
  check_on(denom, "denom", device);
  check_on(min_denom, "min_denom", device);
  check_no_overlap(inverse, "inverse");
  // u is read while the matrix is written: a view of it would change under the kernel.
  FASTROME_CHECK(!shares_memory(inverse, u), "u: shares memory with inverse; pass a copy");

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor flag = at::empty({}, inverse.options().dtype(at::kBool));  // the call's only allocation
  const VecIn vu = vec_in(u);
  const VecIn vb{beta.data_ptr(), 0, dt_of(beta.scalar_type())};
  const VecIn vd{denom.data_ptr(), 0, dt_of(denom.scalar_type())};
  const VecIn vm{min_denom.data_ptr(), 0, dt_of(min_denom.scalar_type())};

  AT_DISPATCH_FLOATING_TYPES(inverse.scalar_type(), "symmetric_rank_one_update_cuda", [&] {
    using c_t = scalar_t;
    sym_guard<c_t><<<1, kGuardThreads, 0, stream>>>(flag.data_ptr<bool>(), vu, d, vb, vd, vm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (inverse.numel() > 0) {
      launch_write<c_t>(stream, flag.data_ptr<bool>(), inverse, vu, vb, vd);
    }
  });
  return flag;
}

}  // namespace cuda

}  // namespace fastrome
