// Guarded in-place rank-one write on the GPU: weight += lam ⊗ u (through an fp32/fp64 master copy
// when given). Semantics are those of fastrome.reference.rank_one_update and csrc/cpu.
//
// No host synchronisation: the CPU kernel reads denom with .item(), which on a GPU would stall the
// host until all queued work is done. Here the decision stays on the device:
//   1. guard kernel (one block): applied = isfinite(denom) && denom > min_denom && every u and lam
//      element finite *in the compute dtype* (an fp64 1e300 is inf in fp32 arithmetic), written
//      into the returned 0-dim bool tensor, the only allocation of the call;
//   2. write kernel: every thread reads that flag first and returns at once when it is false, so a
//      refused write touches no byte of weight or master. Stream order makes the flag visible.
// The write walks the matrix in memory order (inner index over the dimension of smaller stride,
// so a GPT-2 Conv1D weight passed as w.t() is written along its rows too) and is bandwidth bound:
// 16-byte vector accesses when rows are contiguous and aligned, else a strided element path.
#include <ATen/Dispatch.h>

#include <cstdlib>

#include "../kernels.h"
#include "common.cuh"

namespace fastrome {
namespace cuda {
namespace {

constexpr int kGuardThreads = 1024;
constexpr int kWriteThreads = 256;

template <typename c_t>
__global__ void __launch_bounds__(kGuardThreads)
    rank_one_guard(bool* flag, VecIn u, int64_t n_u, VecIn lam, int64_t n_lam, VecIn denom, VecIn min_denom) {
  // Branch-free accumulation (no short-circuit): the loads of successive iterations do not wait
  // on each other's results, so they overlap instead of paying one memory latency each.
  int bad = 0;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < n_u; i += blockDim.x) {
    bad |= !isfinite(load_as<c_t>(u, i));
  }
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < n_lam; i += blockDim.x) {
    bad |= !isfinite(load_as<c_t>(lam, i));
  }
  const int all_ok = __syncthreads_and(bad == 0);  // block-wide AND; every thread reaches it
  if (threadIdx.x == 0) {
    // Compared in fp64 as the reference does; a NaN floor makes `>` false, so NaN refuses too.
    const double dn = load_as<double>(denom, 0);
    const double floor = load_as<double>(min_denom, 0);
    *flag = all_ok != 0 && isfinite(dn) && dn > floor;
  }
}

// Fast path: the inner dimension has stride 1 in weight (and master), rows start 16-byte aligned
// and hold a whole number of 16-byte weight chunks. Each thread owns one chunk of W = 16/sizeof(w_t)
// weight elements, so consecutive threads touch consecutive 16 bytes (coalesced). The element
// (a, b) gets va[a]·vb[b]: va/vb are lam/u or u/lam depending on which weight dimension is inner.
template <typename w_t, typename c_t, bool kMaster>
__global__ void __launch_bounds__(kWriteThreads)
    rank_one_write_vec(const bool* flag, w_t* __restrict__ w, int64_t wsa, c_t* __restrict__ m, int64_t msa,
                       VecIn va, VecIn vb, bool vb_packed, int64_t na, int64_t chunks_per_row) {
  if (!*flag) {
    return;  // refused: write nothing
  }
  constexpr int W = 16 / sizeof(w_t);
  const int64_t total = na * chunks_per_row;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < total;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t a = c / chunks_per_row;
    const int64_t b0 = (c - a * chunks_per_row) * W;
    const c_t s = load_as<c_t>(va, a);
    c_t x[W];
    if (vb_packed) {  // vb already in c_t, contiguous and aligned: one or more 16-byte loads
      load_vec<c_t, W>(static_cast<const c_t*>(vb.ptr) + b0, x);
    } else {
#pragma unroll
      for (int e = 0; e < W; ++e) {
        x[e] = load_as<c_t>(vb, b0 + e);
      }
    }
    w_t* wp = w + a * wsa + b0;
    c_t sum[W];
    if constexpr (kMaster) {
      load_vec<c_t, W>(m + a * msa + b0, sum);  // the master holds the sums; weight is only written
    } else {
      w_t old[W];
      load_vec<w_t, W>(wp, old);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        sum[e] = to_compute<c_t>(old[e]);
      }
    }
    w_t out[W];
#pragma unroll
    for (int e = 0; e < W; ++e) {
      sum[e] = sum[e] + s * x[e];
      out[e] = to_storage<w_t>(sum[e]);
    }
    if constexpr (kMaster) {
      store_vec<c_t, W>(m + a * msa + b0, sum);
    }
    store_vec<w_t, W>(wp, out);
  }
}

// Generic path: any strides (sliced views, odd sizes, misaligned storage), one element per thread
// in memory order of the inner dimension, so accesses with inner stride 1 are still coalesced.
template <typename w_t, typename c_t, bool kMaster>
__global__ void __launch_bounds__(kWriteThreads)
    rank_one_write_strided(const bool* flag, w_t* __restrict__ w, int64_t wsa, int64_t wsb, c_t* __restrict__ m,
                           int64_t msa, int64_t msb, VecIn va, VecIn vb, int64_t na, int64_t nb) {
  if (!*flag) {
    return;  // refused: write nothing
  }
  const int64_t total = na * nb;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t a = e / nb;
    const int64_t b = e - a * nb;
    const c_t s = load_as<c_t>(va, a);
    const c_t x = load_as<c_t>(vb, b);
    w_t* wp = w + a * wsa + b * wsb;
    if constexpr (kMaster) {
      c_t* mp = m + a * msa + b * msb;
      const c_t v = *mp + s * x;
      *mp = v;
      *wp = to_storage<w_t>(v);
    } else {
      *wp = to_storage<w_t>(to_compute<c_t>(*wp) + s * x);
    }
  }
}

template <typename w_t, typename c_t, bool kMaster>
void launch_write(cudaStream_t stream, const bool* flag, at::Tensor& weight, c_t* m, int64_t ms0, int64_t ms1,
                  const VecIn& vu, const VecIn& vl) {
  const int64_t d_out = weight.size(0);
  const int64_t d_in = weight.size(1);
  // Inner loop over the dimension of smaller stride (weight's; a master in another layout is then
  // read with its own strides on the generic path).
  const bool rows_inner = std::llabs(weight.stride(1)) <= std::llabs(weight.stride(0));
  const int64_t na = rows_inner ? d_out : d_in;
  const int64_t nb = rows_inner ? d_in : d_out;
  const int64_t wsa = rows_inner ? weight.stride(0) : weight.stride(1);
  const int64_t wsb = rows_inner ? weight.stride(1) : weight.stride(0);
  const int64_t msa = rows_inner ? ms0 : ms1;
  const int64_t msb = rows_inner ? ms1 : ms0;
  const VecIn& va = rows_inner ? vl : vu;
  const VecIn& vb = rows_inner ? vu : vl;
  w_t* w = weight.data_ptr<w_t>();

  constexpr int W = 16 / sizeof(w_t);
  // Alignment a W-element chunk of c_t needs (8 bytes for an fp64 weight with an fp32 master).
  constexpr int64_t kCAlign = (W * sizeof(c_t) < 16) ? W * sizeof(c_t) : 16;
  const bool weight_ok = wsb == 1 && nb % W == 0 && aligned16(w) && (wsa * int64_t{sizeof(w_t)}) % 16 == 0;
  const bool master_ok = !kMaster || (msb == 1 && reinterpret_cast<std::uintptr_t>(m) % kCAlign == 0 &&
                                      (msa * int64_t{sizeof(c_t)}) % kCAlign == 0);
  if (weight_ok && master_ok) {
    const bool vb_packed = vb.dt == dt_code<c_t>() && vb.stride == 1 &&
                           reinterpret_cast<std::uintptr_t>(vb.ptr) % kCAlign == 0;
    const int64_t chunks_per_row = nb / W;
    rank_one_write_vec<w_t, c_t, kMaster><<<grid_for(na * chunks_per_row, kWriteThreads), kWriteThreads, 0, stream>>>(
        flag, w, wsa, m, msa, va, vb, vb_packed, na, chunks_per_row);
  } else {
    rank_one_write_strided<w_t, c_t, kMaster><<<grid_for(na * nb, kWriteThreads), kWriteThreads, 0, stream>>>(
        flag, w, wsa, wsb, m, msa, msb, va, vb, na, nb);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Declared in kernels.h; bound by the extension module.
at::Tensor rank_one_update_cuda(at::Tensor weight, const at::Tensor& u, const at::Tensor& lam, const at::Tensor& denom,
                                const at::Tensor& min_denom, const c10::optional<at::Tensor>& master) {
  check_rank_one_update_args(weight, u, lam, denom, min_denom);
  const int64_t d_out = weight.size(0);
  const int64_t d_in = weight.size(1);
  const at::Device device = weight.device();
  check_on(weight, "weight", device);
  check_on(u, "u", device);
  check_on(lam, "lam", device);
  check_on(denom, "denom", device);
  check_on(min_denom, "min_denom", device);
  check_no_overlap(weight, "weight");
  const bool has_master = master.has_value();
  if (has_master) {
    FASTROME_CHECK(master->sizes() == weight.sizes() &&
                       (master->scalar_type() == at::kFloat || master->scalar_type() == at::kDouble),
                   "master: expected float32/float64 of sizes ", weight.sizes(), ", got ", master->scalar_type(),
                   " ", master->sizes());
    check_on(*master, "master", device);
    check_no_overlap(*master, "master");
  }

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor flag = at::empty({}, weight.options().dtype(at::kBool));  // the call's only allocation

  // The master's dtype when there is one (it holds the sums), else fp32 (fp64 for fp64 weights).
  const auto compute =
      has_master ? master->scalar_type() : (weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const VecIn vu = vec_in(u);
  const VecIn vl = vec_in(lam);
  const VecIn vd{denom.data_ptr(), 0, dt_of(denom.scalar_type())};
  const VecIn vm{min_denom.data_ptr(), 0, dt_of(min_denom.scalar_type())};

  AT_DISPATCH_FLOATING_TYPES(compute, "rank_one_update_cuda", [&] {
    using c_t = scalar_t;
    rank_one_guard<c_t><<<1, kGuardThreads, 0, stream>>>(flag.data_ptr<bool>(), vu, d_in, vl, d_out, vd, vm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (weight.numel() == 0) {
      return;
    }
    c_t* m = has_master ? master->data_ptr<c_t>() : nullptr;
    const int64_t ms0 = has_master ? master->stride(0) : 0;
    const int64_t ms1 = has_master ? master->stride(1) : 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "rank_one_update_cuda_w", [&] {
      using w_t = scalar_t;
      if (has_master) {
        launch_write<w_t, c_t, true>(stream, flag.data_ptr<bool>(), weight, m, ms0, ms1, vu, vl);
      } else {
        launch_write<w_t, c_t, false>(stream, flag.data_ptr<bool>(), weight, m, ms0, ms1, vu, vl);
      }
    });
  });
  return flag;
}

}  // namespace cuda

}  // namespace fastrome
