// acc += xᵀx over masked rows on the GPU (semantics: fastrome.reference.second_moment_accumulate).
//
// Design:
// * Only the upper triangle is multiplied. acc is split into row blocks of kTile rows; row block
//   [r0, r0+h) needs the product of x[:, r0:r0+h]ᵀ with x[:, r0:d], one (h × (d-r0)) GEMM. Summed
//   over blocks that is d²/2 + d·kTile/2 products instead of d² (55% of a full GEMM at d=11008).
//   One GEMM per row block (11 at d=11008) rather than one per tile pair keeps every GEMM large
//   enough to fill the GPU except the last one or two, without a batched call for ragged tiles.
// * The GEMMs run on tensor cores through ATen's matmul (at::mm_out, its out_dtype overload for
//   bf16/fp16 inputs with fp32 output), i.e. cuBLAS with CUBLAS_COMPUTE_32F on the current
//   stream with torch's own handle and workspace: the same kernels as torch's bf16 GEMM, and no
//   cuBLAS headers needed here (see common.cuh). fp32 inputs run under at::NoTF32Guard so the
//   promised fp32 arithmetic is not silently TF32. fp64 data (acc and x both fp64) uses DGEMM.
// * When inputs, products and acc share a dtype (fp32 x into fp32 acc, fp64 into fp64) the GEMM
//   adds straight into acc's row block (beta = 1). Otherwise (bf16/fp16 x, whose fp32-output
//   GEMM cannot accumulate into an fp32 C through ATen, or an fp64 acc fed fp32 products) it
//   writes an fp32 scratch block from the caching allocator, reused by every row block (stream
//   order makes that safe), and fold_upper adds it into acc.
// * fold_upper then makes acc exactly symmetric: for each upper element (i ≤ j) of the row block
//   it forms the final value once (adding the scratch product if any), stores it at (i, j) and
//   the same value at (j, i). The lower half of the diagonal tile, which the GEMM also formed but
//   need not round like the upper half, is overwritten by the mirror.
// * Mask: rows with mask false are replaced by exact zeros (at::where) instead of being gathered
//   with index_select. Gathering needs nonzero(), whose output size the host must know: a device
//   sync per call, stalling the caller's pipeline of forward passes. Zero rows cost GEMM FLOPs in
//   proportion to the masked fraction (typically the padding of a batch), but add exactly nothing
//   and are made by one elementwise pass (where, not a multiply, so NaN/Inf in a masked row do
//   not leak in as 0·Inf).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdlib>

#include "../kernels.h"
#include "common.cuh"

namespace fastrome {
namespace cuda {
namespace {

constexpr int64_t kTile = 1024;  // rows per GEMM row block
constexpr int kSub = 32;         // fold_upper works on 32×32 sub-tiles ...
constexpr int kSubRows = 8;      // ... with 32×8 threads, 4 rows per thread

// Row block [r0, r0+h) × columns [r0, r0+w) of acc (logical indices; strides s0, s1 in elements).
// Block (bx, by) owns sub-tile rows [r0+32·by, +32) × columns [r0+32·bx, +32). Sub-tiles wholly
// below the diagonal (bx < by) exit: their elements are written as mirrors by block (by, bx).
// Phase 1 (i ≤ j): v = acc[i,j], or with kAdd v = acc[i,j] + prod[i,j] stored back at (i, j);
// keep v in shared memory.
// Phase 2 (i < j): acc[j,i] = v, read transposed from shared memory so that both the reads of
// phase 1 and the writes of phase 2 run along a row of acc (coalesced when s1 == 1).
// No races: phase 1 touches only elements with row ≤ column, phase 2 only row > column, and each
// element of either set belongs to exactly one sub-tile, hence one block and one thread; the
// mirror of a diagonal sub-tile is written by the same block that formed it.
template <typename acc_t, typename prod_t, bool kAdd>
__global__ void __launch_bounds__(kSub* kSubRows)
    fold_upper(acc_t* __restrict__ acc, int64_t s0, int64_t s1, const prod_t* __restrict__ prod, int64_t r0,
               int64_t h, int64_t w) {
  const int bx = blockIdx.x;
  const int by = blockIdx.y;
  if (bx < by) {
    return;  // whole block exits before the barrier: no divergence at __syncthreads
  }
  __shared__ acc_t tile[kSub][kSub + 1];  // +1: transposed reads hit distinct banks
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
#pragma unroll
  for (int k = 0; k < kSub; k += kSubRows) {
    const int64_t li = int64_t{by} * kSub + ty + k;  // row within the row block
    const int64_t lj = int64_t{bx} * kSub + tx;      // column, counted from r0
    if (li < h && lj < w && lj >= li) {
      acc_t* p = acc + (r0 + li) * s0 + (r0 + lj) * s1;
      acc_t v = *p;
      if constexpr (kAdd) {
        v += static_cast<acc_t>(prod[li * w + lj]);
        *p = v;  // without kAdd the GEMM already wrote v here
      }
      tile[ty + k][tx] = v;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kSub; k += kSubRows) {
    const int64_t lj = int64_t{bx} * kSub + ty + k;
    const int64_t li = int64_t{by} * kSub + tx;
    if (li < h && lj < w && lj > li) {
      acc[(r0 + lj) * s0 + (r0 + li) * s1] = tile[tx][ty + k];  // = value stored at (li, lj) above
    }
  }
}

template <typename acc_t, typename prod_t, bool kAdd>
void launch_fold(cudaStream_t stream, acc_t* acc, int64_t s0, int64_t s1, const prod_t* prod, int64_t r0, int64_t h,
                 int64_t w) {
  const dim3 grid(static_cast<unsigned int>(ceil_div(w, kSub)), static_cast<unsigned int>(ceil_div(h, kSub)));
  const dim3 block(kSub, kSubRows);
  fold_upper<acc_t, prod_t, kAdd><<<grid, block, 0, stream>>>(acc, s0, s1, prod, r0, h, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// cuBLAS reads a matrix in place when one stride is 1 and the other at least the extent it spans;
// anything else would be copied by at::mm on every row block, so make it contiguous once.
bool blas_ready(const at::Tensor& t) {
  const int64_t n = t.size(0), d = t.size(1);
  return (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(d, 1)) ||
         (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(n, 1));
}

}  // namespace

// Declared in kernels.h; bound by the extension module.
void second_moment_accumulate_cuda(at::Tensor acc, const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  FASTROME_CHECK(acc.dim() == 2 && acc.size(0) == acc.size(1), "acc: expected a square matrix, got sizes ",
                 acc.sizes());
  FASTROME_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
                 "acc: expected float32 or float64, got ", acc.scalar_type());
  FASTROME_CHECK(x.dim() == 2 && x.size(1) == acc.size(0), "x: expected shape (n, ", acc.size(0), "), got ",
                 x.sizes());
  FASTROME_CHECK(is_float_type(x.scalar_type()), "x: expected a floating-point dtype, got ", x.scalar_type());
  const at::Device device = acc.device();
  check_on(acc, "acc", device);
  check_on(x, "x", device);
  check_no_overlap(acc, "acc");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    FASTROME_CHECK(m.scalar_type() == at::kBool && m.dim() == 1 && m.size(0) == x.size(0),
                   "mask: expected a (", x.size(0), ",) bool tensor, got ", m.scalar_type(), " ", m.sizes());
    check_on(m, "mask", device);
  }
  const int64_t n = x.size(0);
  const int64_t d = acc.size(0);
  if (n == 0 || d == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  // Arithmetic: fp64 only when acc and x are both fp64 (as the C++ CPU kernel); otherwise fp32
  // products, with bf16/fp16 inputs fed to the tensor cores as they are.
  const bool fp64 = acc.scalar_type() == at::kDouble && x.scalar_type() == at::kDouble;
  const auto prod_t = fp64 ? at::kDouble : at::kFloat;
  const bool half_in = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const auto gemm_in = half_in ? x.scalar_type() : prod_t;
  at::Tensor rows = x.scalar_type() == gemm_in ? x : x.to(gemm_in);
  if (mask.has_value()) {
    rows = at::where(mask->unsqueeze(1), rows, 0);  // exact zeros for rows left out; no sync
  }
  if (!blas_ready(rows)) {
    rows = rows.contiguous();
  }

  // acc is symmetric, so a column-major acc is handled as its transpose (the same values): the
  // fold then reads and writes along memory rows.
  at::Tensor a = std::llabs(acc.stride(1)) > std::llabs(acc.stride(0)) ? acc.t() : acc;
  // The GEMM can add into acc itself when inputs, product and acc share one dtype (addmm needs
  // that); bf16/fp16 inputs, or fp32 products for an fp64 acc, go through an fp32 scratch block.
  const bool direct = !half_in && acc.scalar_type() == prod_t;
  at::Tensor scratch;
  if (!direct) {
    scratch = at::empty({std::min(kTile, d) * d}, acc.options().dtype(prod_t));
  }

  const at::NoTF32Guard no_tf32;  // fp32 means fp32, whatever torch.backends.cuda.matmul says
  for (int64_t r0 = 0; r0 < d; r0 += kTile) {
    const int64_t h = std::min(kTile, d - r0);
    const int64_t w = d - r0;
    const at::Tensor lhs = rows.narrow(1, r0, h).t();  // (h, n)
    const at::Tensor rhs = rows.narrow(1, r0, w);      // (n, w)
    if (direct) {
      at::Tensor block = a.narrow(0, r0, h).narrow(1, r0, w);
      at::addmm_out(block, block, lhs, rhs);  // acc block += lhs·rhs (beta = 1), in place
      AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "second_moment_mirror", [&] {
        launch_fold<scalar_t, scalar_t, false>(stream, a.data_ptr<scalar_t>(), a.stride(0), a.stride(1), nullptr, r0,
                                               h, w);
      });
    } else {
      at::Tensor prod = scratch.narrow(0, 0, h * w).view({h, w});
      if (half_in) {
        at::mm_out(prod, lhs, rhs, prod_t);  // bf16/fp16 in, fp32 out, fp32 accumulation
      } else {
        at::mm_out(prod, lhs, rhs);
      }
      // Products here are always fp32 (fp64 products only arise with acc fp64 too: direct);
      // an fp64 acc widens them exactly and adds in fp64.
      AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "second_moment_fold", [&] {
        launch_fold<scalar_t, float, true>(stream, a.data_ptr<scalar_t>(), a.stride(0), a.stride(1),
                                           prod.data_ptr<float>(), r0, h, w);
      });
    }
  }
}

}  // namespace cuda

}  // namespace fastrome
