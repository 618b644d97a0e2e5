// u = A k and uᵀk on the CPU, from the symmetric inverse A = (C + ridge·I)⁻¹ cached by the solver.
// One pass over A per key: rows are split into blocks solved in parallel, each row a contiguous,
// vectorised dot product accumulated in fp64; every block also sums its share of uᵀk from the *rounded* u,
// and the block partials are added in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../kernels.h"

namespace fastrome {
namespace {

constexpr int64_t kRowsPerBlock = 64;

template <typename a_t>
double dot(const a_t* __restrict__ a, const double* __restrict__ b, int64_t n) {
  // An explicit SIMD reduction: the order of the partial sums is the compiler's, fixed per build,
  // so results stay deterministic for a given binary.
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    s += static_cast<double>(a[j]) * b[j];
  }
  return s;
}

template <typename a_t, typename o_t>
void solve_one(const a_t* A, int64_t d, const double* k, o_t* u_out, o_t* denom_out) {
  const int64_t blocks = (d + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      double acc = 0.0;
      const int64_t end = std::min(d, (blk + 1) * kRowsPerBlock);
      for (int64_t i = blk * kRowsPerBlock; i < end; ++i) {
        const o_t rounded = static_cast<o_t>(dot(A + i * d, k, d));
        u_out[i] = rounded;
        acc += static_cast<double>(rounded) * k[i];
      }
      partial[blk] = acc;
    }
  });
  double denom = 0.0;
  for (double p : partial) {
    denom += p;
  }
  *denom_out = static_cast<o_t>(denom);
}

}  // namespace

// Declared in kernels.h; bound by the extension module.
std::tuple<at::Tensor, at::Tensor> solve_keys_cpu(const at::Tensor& inverse, const at::Tensor& k) {
  const at::Device cpu(at::kCPU);
  FASTROME_CHECK(inverse.dim() == 2 && inverse.size(0) == inverse.size(1) &&
                     (inverse.scalar_type() == at::kFloat || inverse.scalar_type() == at::kDouble),
                 "inverse: expected a square float32/float64 matrix, got ", inverse.scalar_type(), " ",
                 inverse.sizes());
  const int64_t d = inverse.size(0);
  FASTROME_CHECK((k.dim() == 1 || k.dim() == 2) && k.size(-1) == d && is_float_type(k.scalar_type()),
                 "k: expected (", d, ",) or (b, ", d, ") floating point, got ", k.scalar_type(), " ", k.sizes());
  check_device(inverse, "inverse", cpu);
  check_device(k, "k", cpu);

  const auto out_t = at::promote_types(k.scalar_type(), at::kFloat);
  // A is symmetric, so a column-major A can be read by rows through its transpose without a copy.
  const at::Tensor A = inverse.is_contiguous() ? inverse
                       : inverse.t().is_contiguous() ? inverse.t()
                                                     : inverse.contiguous();
  const at::Tensor K = (k.dim() == 1 ? k.unsqueeze(0) : k).to(at::kDouble).contiguous();
  const int64_t b = K.size(0);
  at::Tensor U = at::empty({b, d}, k.options().dtype(out_t));
  at::Tensor D = at::empty({b}, k.options().dtype(out_t));

  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "solve_keys_inverse", [&] {
    using a_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(out_t, "solve_keys_out", [&] {
      using o_t = scalar_t;
      for (int64_t r = 0; r < b; ++r) {
        solve_one<a_t, o_t>(A.data_ptr<a_t>(), d, K.data_ptr<double>() + r * d, U.data_ptr<o_t>() + r * d,
                            D.data_ptr<o_t>() + r);
      }
    });
  });
  if (k.dim() == 1) {
    return {U.squeeze(0), D.squeeze(0)};
  }
  return {U, D};
}

}  // namespace fastrome
