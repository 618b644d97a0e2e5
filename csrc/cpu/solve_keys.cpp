// u = (L Lᵀ)⁻¹ k and uᵀk on the CPU, from the lower Cholesky factor L cached by the solver.
// Forward substitution by rows and back substitution by columns both walk rows of L, so every
// inner loop is a contiguous dot product or axpy; the denominator is summed from the rounded u as
// each entry is finalised, so it is exactly the denominator of the update that u will write.
// Arithmetic is fp64 whatever the factor's dtype; keys of a batch are solved in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"

namespace fastrome {
namespace {

template <typename f_t>
double dot4(const f_t* a, const double* b, int64_t n) {
  // Four partial sums: keeps the loop vectorisable without reassociating a single chain.
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += static_cast<double>(a[j]) * b[j];
    s1 += static_cast<double>(a[j + 1]) * b[j + 1];
    s2 += static_cast<double>(a[j + 2]) * b[j + 2];
    s3 += static_cast<double>(a[j + 3]) * b[j + 3];
  }
  for (; j < n; ++j) {
    s0 += static_cast<double>(a[j]) * b[j];
  }
  return (s0 + s1) + (s2 + s3);
}

template <typename f_t, typename o_t>
void solve_one(const f_t* L, int64_t d, const double* k, o_t* u_out, o_t* denom_out) {
  std::vector<double> y(k, k + d);
  for (int64_t i = 0; i < d; ++i) {  // L y = k
    const f_t* row = L + i * d;
    y[i] = (y[i] - dot4(row, y.data(), i)) / static_cast<double>(row[i]);
  }
  double denom = 0.0;
  for (int64_t i = d - 1; i >= 0; --i) {  // Lᵀ u = y, column i of Lᵀ is row i of L
    const f_t* row = L + i * d;
    const double ui = y[i] / static_cast<double>(row[i]);
    const o_t rounded = static_cast<o_t>(ui);
    u_out[i] = rounded;
    denom += static_cast<double>(rounded) * k[i];
    for (int64_t j = 0; j < i; ++j) {
      y[j] -= static_cast<double>(row[j]) * ui;
    }
  }
  *denom_out = static_cast<o_t>(denom);
}

std::tuple<at::Tensor, at::Tensor> solve_keys_cpu(const at::Tensor& factor, const at::Tensor& k) {
  const at::Device cpu(at::kCPU);
  FASTROME_CHECK(factor.dim() == 2 && factor.size(0) == factor.size(1) &&
                     (factor.scalar_type() == at::kFloat || factor.scalar_type() == at::kDouble),
                 "factor: expected a square float32/float64 matrix, got ", factor.scalar_type(), " ",
                 factor.sizes());
  const int64_t d = factor.size(0);
  FASTROME_CHECK((k.dim() == 1 || k.dim() == 2) && k.size(-1) == d && is_float_type(k.scalar_type()),
                 "k: expected (", d, ",) or (b, ", d, ") floating point, got ", k.scalar_type(), " ", k.sizes());
  check_device(factor, "factor", cpu);
  check_device(k, "k", cpu);

  const auto out_t = at::promote_types(k.scalar_type(), at::kFloat);
  const at::Tensor L = factor.contiguous();
  const at::Tensor K = (k.dim() == 1 ? k.unsqueeze(0) : k).to(at::kDouble).contiguous();
  const int64_t b = K.size(0);
  at::Tensor U = at::empty({b, d}, k.options().dtype(out_t));
  at::Tensor D = at::empty({b}, k.options().dtype(out_t));

  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "solve_keys_factor", [&] {
    using f_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(out_t, "solve_keys_out", [&] {
      using o_t = scalar_t;
      const f_t* pl = L.data_ptr<f_t>();
      const double* pk = K.data_ptr<double>();
      o_t* pu = U.data_ptr<o_t>();
      o_t* pd = D.data_ptr<o_t>();
      at::parallel_for(0, b, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t r = b0; r < b1; ++r) {
          solve_one<f_t, o_t>(pl, d, pk + r * d, pu + r * d, pd + r);
        }
      });
    });
  });
  if (k.dim() == 1) {
    return {U.squeeze(0), D.squeeze(0)};
  }
  return {U, D};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrome_C, CPU, m) {
  m.impl("solve_keys", &solve_keys_cpu);
}

}  // namespace fastrome
