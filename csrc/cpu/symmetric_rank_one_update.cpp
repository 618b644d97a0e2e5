// Guarded in-place Sherman–Morrison step on the CPU: inverse -= coef · u uᵀ with
// coef = β / (1 + β·denom), one pass over the d×d matrix in its memory order, nothing allocated
// on the matrix's scale. The guard (finite β·denom and coef, 1 + β·denom above its floor, finite u
// in the matrix's dtype) is decided before anything is written, so a refused update leaves every
// byte as it was. Semantics are those of fastrome.reference.symmetric_rank_one_update.
//
// Symmetry: element (a, b) becomes m - coef·(u[a]·u[b]) with the product of the two u's rounded
// first. IEEE multiplication commutes, so (a, b) and (b, a) get the same bits whichever index is
// the outer one, and an exactly symmetric matrix stays exactly symmetric. setup.py's flags target
// baseline x86-64/aarch64 code without FMA contraction, so the results also equal the reference's
// bit for bit; a build that contracts m - coef·p into an FMA still treats every element alike and
// stays symmetric.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "../checks.h"
#include "../kernels.h"

namespace fastrome {
namespace {

// The update's coefficient and whether it may be applied, from the fp64 scalars; each step is
// rounded once, in the order of the reference (1 + β·denom, then β / that).
struct Coefficient {
  double coef;
  bool ok;
};

Coefficient sherman_morrison(double beta, double denom, double floor) {
  const double bd = beta * denom;
  const double s = 1.0 + bd;
  const double coef = beta / s;
  return {coef, std::isfinite(bd) && s > floor};  // a NaN floor or s compares false: refused
}

template <typename c_t>
bool all_finite(const c_t* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(v[i])) {
      return false;
    }
  }
  return true;
}

// Walks the matrix as (outer a, inner b), the inner dimension the one of smaller stride.
template <typename c_t>
void write(c_t* m, int64_t sa, int64_t sb, const c_t* __restrict__ u, int64_t d, c_t coef) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, d, grain, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      const c_t ua = u[a];
      c_t* __restrict__ row = m + a * sa;
      if (sb == 1) {
#pragma omp simd
        for (int64_t b = 0; b < d; ++b) {
          const c_t p = ua * u[b];
          row[b] = row[b] - coef * p;
        }
      } else {
        for (int64_t b = 0; b < d; ++b) {
          const c_t p = ua * u[b];
          row[b * sb] = row[b * sb] - coef * p;
        }
      }
    }
  });
}

}  // namespace

// Declared in kernels.h; bound by the extension module.
at::Tensor symmetric_rank_one_update_cpu(at::Tensor inverse, const at::Tensor& u, const at::Tensor& beta,
                                         const at::Tensor& denom, const at::Tensor& min_denom) {
  const at::Device cpu(at::kCPU);
  check_symmetric_update_args(inverse, u, beta, denom, min_denom);
  const int64_t d = inverse.size(0);
  check_device(inverse, "inverse", cpu);
  check_device(u, "u", cpu);
  check_device(beta, "beta", cpu);
  check_device(denom, "denom", cpu);
  check_device(min_denom, "min_denom", cpu);
  FASTROME_CHECK(at::has_internal_overlap(inverse) != at::MemOverlap::Yes,
                 "inverse: elements overlap in memory (sizes ", inverse.sizes(), ", strides ", inverse.strides(),
                 "); pass a tensor that owns its elements");
  // u is read while the matrix is written: a view of it would change under the loop.
  FASTROME_CHECK(!shares_memory(inverse, u), "u: shares memory with inverse; pass a copy");
  auto flag = [](bool v) { return at::scalar_tensor(v, at::TensorOptions().dtype(at::kBool)); };

  const Coefficient c = sherman_morrison(beta.to(at::kDouble).item<double>(), denom.to(at::kDouble).item<double>(),
                                         min_denom.to(at::kDouble).item<double>());
  if (!c.ok) {
    return flag(false);
  }
  const auto compute = inverse.scalar_type();
  const at::Tensor uc = u.to(compute).contiguous();
  // Inner loop over the dimension with the smaller stride (a transposed view is walked by rows
  // of its storage; the update is symmetric, so the roles of the indices do not matter).
  const bool rows_outer = std::llabs(inverse.stride(1)) <= std::llabs(inverse.stride(0));
  const int64_t sa = rows_outer ? inverse.stride(0) : inverse.stride(1);
  const int64_t sb = rows_outer ? inverse.stride(1) : inverse.stride(0);

  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(compute, "symmetric_rank_one_update_cpu", [&] {
    // Guarded in the dtype of the arithmetic: a finite fp64 coef or u can overflow fp32.
    const scalar_t coef = static_cast<scalar_t>(c.coef);
    const scalar_t* uv = uc.data_ptr<scalar_t>();
    ok = std::isfinite(coef) && all_finite(uv, d);
    if (ok && coef != scalar_t(0)) {  // β = 0: applied, and nothing to write
      write<scalar_t>(inverse.data_ptr<scalar_t>(), sa, sb, uv, d, coef);
    }
  });
  return flag(ok);
}

}  // namespace fastrome
