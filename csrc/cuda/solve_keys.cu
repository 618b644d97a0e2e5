// u = A k and denom = uᵀk on the GPU, from the symmetric inverse A = (C + ridge·I)⁻¹ cached by the
// solver (semantics: fastrome.reference.solve_keys).
//
// A memory-bound GEMV fused with the denominator:
// * One warp per row i of A: lanes stream the row with 16-byte loads (when rows are aligned),
//   multiply by k and reduce with a fixed warp-shuffle butterfly. Because A is symmetric, row i
//   dotted with k is u_i, so a row-major A (or the transpose of a column-major one) is read in
//   memory order without a copy.
// * Accumulation is in A's dtype (fp64 for an fp64 inverse, fp32 for fp32, as the reference's
//   k.to(A.dtype) @ A); k enters converted to that dtype. u is rounded once to the output dtype
//   promote(k.dtype, fp32).
// * denom is formed from the *rounded* u, in fp64: lane 0 of each warp forms u_i·k_i; each block
//   adds its warps' terms in warp order into one partial per (key, block), and a second tiny
//   kernel sums the partials of a key in a fixed order. No atomics, so the result is the same bit
//   for bit on every run.
// * Several keys (b > 1) are tiled kKeys at a time: a warp keeps kKeys accumulators and reads its
//   row of A once per tile instead of once per key, since A (d² elements) is by far the largest
//   stream; k (b·d elements, shared by all rows) is re-read from L1/L2. A single key uses a
//   one-key instantiation with no idle accumulators.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <tuple>

#include "../kernels.h"
#include "common.cuh"

namespace fastrome {
namespace cuda {
namespace {

constexpr int kWarps = 8;  // rows (warps) per block of the GEMV
constexpr int kThreads = kWarps * 32;
constexpr int kKeys = 4;  // keys per tile when b > 1
constexpr int kReduceThreads = 256;

// Block (x, y): rows [8x, 8x+8) of A, keys [y·KB, y·KB+KB) of this launch's chunk of b keys.
// K and U are (b, d) row-major in o_t; partial is (b, gridDim.x) fp64.
template <typename a_t, typename o_t, int KB, bool kVec>
__global__ void __launch_bounds__(kThreads)
    solve_rows(const a_t* __restrict__ A, int64_t d, const o_t* __restrict__ K, int64_t b, o_t* __restrict__ U,
               double* __restrict__ partial) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t{blockIdx.x} * kWarps + warp;
  const int64_t key0 = int64_t{blockIdx.y} * KB;
  __shared__ double terms[KB][kWarps];

  a_t sum[KB];
#pragma unroll
  for (int q = 0; q < KB; ++q) {
    sum[q] = a_t(0);
  }
  if (i < d) {
    const a_t* row = A + i * d;
    if constexpr (kVec) {
      // d is a multiple of V and A, K are 16-byte aligned, so every row starts aligned.
      constexpr int V = 16 / sizeof(a_t);
#pragma unroll 4
      for (int64_t j = int64_t{lane} * V; j < d; j += 32 * V) {
        a_t av[V];
        load_vec<a_t, V>(row + j, av);
#pragma unroll
        for (int q = 0; q < KB; ++q) {
          if (key0 + q < b) {  // uniform across the block
            o_t kv[V];
            load_vec<o_t, V>(K + (key0 + q) * d + j, kv);
#pragma unroll
            for (int e = 0; e < V; ++e) {
              sum[q] += av[e] * static_cast<a_t>(kv[e]);
            }
          }
        }
      }
    } else {
      for (int64_t j = lane; j < d; j += 32) {
        const a_t av = row[j];
#pragma unroll
        for (int q = 0; q < KB; ++q) {
          if (key0 + q < b) {
            sum[q] += av * static_cast<a_t>(K[(key0 + q) * d + j]);
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < KB; ++q) {
      sum[q] = warp_sum(sum[q]);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < KB; ++q) {
      double term = 0.0;
      if (i < d && key0 + q < b) {
        const o_t u = static_cast<o_t>(sum[q]);  // the one rounding of u
        U[(key0 + q) * d + i] = u;
        term = static_cast<double>(u) * static_cast<double>(K[(key0 + q) * d + i]);
      }
      terms[q][warp] = term;
    }
  }
  __syncthreads();
  if (threadIdx.x < KB && key0 + threadIdx.x < b) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      s += terms[threadIdx.x][w];
    }
    partial[(key0 + threadIdx.x) * int64_t{gridDim.x} + blockIdx.x] = s;
  }
}

// One block per key: fixed strided sums, then a fixed tree; denom = Σ partials, rounded once.
template <typename o_t>
__global__ void __launch_bounds__(kReduceThreads)
    solve_denoms(const double* __restrict__ partial, int64_t nblk, o_t* __restrict__ D) {
  const int64_t r = blockIdx.x;
  double s = 0.0;
  for (int64_t t = threadIdx.x; t < nblk; t += kReduceThreads) {
    s += partial[r * nblk + t];
  }
  __shared__ double sh[kReduceThreads];
  sh[threadIdx.x] = s;
  __syncthreads();
#pragma unroll
  for (int off = kReduceThreads / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) {
      sh[threadIdx.x] += sh[threadIdx.x + off];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    D[r] = static_cast<o_t>(sh[0]);
  }
}

template <typename a_t, typename o_t, int KB>
void launch_rows(cudaStream_t stream, const a_t* A, int64_t d, const o_t* K, int64_t b, o_t* U, double* partial,
                 int64_t nblk, bool vec) {
  // grid.y is limited to 65535 tiles of keys: larger batches run in chunks.
  constexpr int64_t kMaxTiles = 65535;
  for (int64_t k0 = 0; k0 < b; k0 += kMaxTiles * KB) {
    const int64_t bc = std::min(b - k0, kMaxTiles * KB);
    const dim3 grid(static_cast<unsigned int>(nblk), static_cast<unsigned int>(ceil_div(bc, KB)));
    if (vec) {
      solve_rows<a_t, o_t, KB, true><<<grid, kThreads, 0, stream>>>(A, d, K + k0 * d, bc, U + k0 * d,
                                                                     partial + k0 * nblk);
    } else {
      solve_rows<a_t, o_t, KB, false><<<grid, kThreads, 0, stream>>>(A, d, K + k0 * d, bc, U + k0 * d,
                                                                      partial + k0 * nblk);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

// Declared in kernels.h; bound by the extension module.
std::tuple<at::Tensor, at::Tensor> solve_keys_cuda(const at::Tensor& inverse, const at::Tensor& k) {
  FASTROME_CHECK(inverse.dim() == 2 && inverse.size(0) == inverse.size(1) &&
                     (inverse.scalar_type() == at::kFloat || inverse.scalar_type() == at::kDouble),
                 "inverse: expected a square float32/float64 matrix, got ", inverse.scalar_type(), " ",
                 inverse.sizes());
  const int64_t d = inverse.size(0);
  FASTROME_CHECK((k.dim() == 1 || k.dim() == 2) && k.size(-1) == d && is_float_type(k.scalar_type()),
                 "k: expected (", d, ",) or (b, ", d, ") floating point, got ", k.scalar_type(), " ", k.sizes());
  const at::Device device = inverse.device();
  check_on(inverse, "inverse", device);
  check_on(k, "k", device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const auto out_t = at::promote_types(k.scalar_type(), at::kFloat);
  // A is symmetric, so a column-major A is read by rows through its transpose without a copy.
  const at::Tensor A = inverse.is_contiguous() ? inverse
                       : inverse.t().is_contiguous() ? inverse.t()
                                                     : inverse.contiguous();
  // k in the output dtype is an exact copy of k (bf16/fp16/fp32 widen to fp32, fp64 stays), so
  // the denominator sees k itself; (b, d) row-major, a no-op for a contiguous fp32/fp64 k.
  const at::Tensor K = (k.dim() == 1 ? k.unsqueeze(0) : k).to(out_t).contiguous();
  const int64_t b = K.size(0);
  at::Tensor U = at::empty({b, d}, K.options());
  at::Tensor D = at::empty({b}, K.options());

  if (b > 0 && d == 0) {
    D.zero_();  // empty sums
  } else if (b > 0) {
    const int64_t nblk = ceil_div(d, kWarps);
    at::Tensor partial = at::empty({b, nblk}, K.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "solve_keys_cuda", [&] {
      using a_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(out_t, "solve_keys_cuda_out", [&] {
        using o_t = scalar_t;
        const a_t* pa = A.data_ptr<a_t>();
        const o_t* pk = K.data_ptr<o_t>();
        constexpr int V = 16 / sizeof(a_t);
        const bool vec = d % V == 0 && aligned16(pa) && aligned16(pk);
        if (b == 1) {
          launch_rows<a_t, o_t, 1>(stream, pa, d, pk, b, U.data_ptr<o_t>(), partial.data_ptr<double>(), nblk, vec);
        } else {
          launch_rows<a_t, o_t, kKeys>(stream, pa, d, pk, b, U.data_ptr<o_t>(), partial.data_ptr<double>(), nblk,
                                       vec);
        }
        solve_denoms<o_t><<<static_cast<unsigned int>(b), kReduceThreads, 0, stream>>>(partial.data_ptr<double>(),
                                                                                        nblk, D.data_ptr<o_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (k.dim() == 1) {
    return {U.squeeze(0), D.squeeze(0)};
  }
  return {U, D};
}

}  // namespace cuda

}  // namespace fastrome
