// Guarded in-place rank-one write on the CPU: weight += lam ⊗ u (through an fp32/fp64 master copy
// when given), one pass over the matrix in its memory order, nothing allocated on the matrix's
// scale. The guard (finite denominator above its floor, finite vectors) is read before anything
// is written, so a refused write leaves every byte as it was.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>

#include "../checks.h"
#include "../kernels.h"

namespace fastrome {
namespace {

template <typename c_t>
bool all_finite(const c_t* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(v[i])) {
      return false;
    }
  }
  return true;
}

// Walks the matrix as (outer a, inner b) with the inner dimension the one of smaller stride; the
// update of element (a, b) is va[a] * vb[b] whichever of lam/u plays which role.
template <typename w_t, typename c_t>
void write(w_t* w, int64_t wsa, int64_t wsb, c_t* m, int64_t msa, int64_t msb, const c_t* va, const c_t* vb,
           int64_t na, int64_t nb) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(nb, 1));
  at::parallel_for(0, na, grain, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      const c_t s = va[a];
      w_t* wr = w + a * wsa;
      if (m != nullptr) {
        c_t* mr = m + a * msa;
        if (wsb == 1 && msb == 1) {
          for (int64_t b = 0; b < nb; ++b) {
            const c_t v = mr[b] + s * vb[b];
            mr[b] = v;
            wr[b] = static_cast<w_t>(v);
          }
        } else {
          for (int64_t b = 0; b < nb; ++b) {
            const c_t v = mr[b * msb] + s * vb[b];
            mr[b * msb] = v;
            wr[b * wsb] = static_cast<w_t>(v);
          }
        }
      } else if (wsb == 1) {
        for (int64_t b = 0; b < nb; ++b) {
          wr[b] = static_cast<w_t>(static_cast<c_t>(wr[b]) + s * vb[b]);
        }
      } else {
        for (int64_t b = 0; b < nb; ++b) {
          wr[b * wsb] = static_cast<w_t>(static_cast<c_t>(wr[b * wsb]) + s * vb[b]);
        }
      }
    }
  });
}

}  // namespace

// Declared in kernels.h; bound by the extension module.
at::Tensor rank_one_update_cpu(at::Tensor weight, const at::Tensor& u, const at::Tensor& lam, const at::Tensor& denom,
                               const at::Tensor& min_denom, const c10::optional<at::Tensor>& master) {
  const at::Device cpu(at::kCPU);
  check_rank_one_update_args(weight, u, lam, denom, min_denom);
  const int64_t d_out = weight.size(0);
  const int64_t d_in = weight.size(1);
  check_device(weight, "weight", cpu);
  check_device(u, "u", cpu);
  check_device(lam, "lam", cpu);
  check_device(denom, "denom", cpu);
  check_device(min_denom, "min_denom", cpu);
  const bool has_master = master.has_value();
  if (has_master) {
    FASTROME_CHECK(master->sizes() == weight.sizes() &&
                       (master->scalar_type() == at::kFloat || master->scalar_type() == at::kDouble),
                   "master: expected float32/float64 of sizes ", weight.sizes(), ", got ", master->scalar_type(),
                   " ", master->sizes());
    check_device(*master, "master", cpu);
  }
  auto flag = [](bool v) { return at::scalar_tensor(v, at::TensorOptions().dtype(at::kBool)); };

  const double dn = denom.to(at::kDouble).item<double>();
  const double floor = min_denom.to(at::kDouble).item<double>();
  if (!(std::isfinite(dn) && dn > floor)) {
    return flag(false);
  }
  // The master's dtype when there is one (it holds the sums), else fp32 (fp64 for fp64 weights).
  const auto compute =
      has_master ? master->scalar_type() : (weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const at::Tensor uc = u.to(compute).contiguous();
  const at::Tensor lc = lam.to(compute).contiguous();

  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(compute, "rank_one_update_guard", [&] {
    ok = all_finite(uc.data_ptr<scalar_t>(), d_in) && all_finite(lc.data_ptr<scalar_t>(), d_out);
  });
  if (!ok) {
    return flag(false);
  }

  // Inner loop over the dimension with the smaller stride (a Conv1D weight arrives transposed).
  const bool rows_outer = std::llabs(weight.stride(1)) <= std::llabs(weight.stride(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "rank_one_update_write", [&] {
    using w_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(compute, "rank_one_update_compute", [&] {
      using c_t = scalar_t;
      c_t* m = has_master ? master->data_ptr<c_t>() : nullptr;
      const int64_t ms0 = has_master ? master->stride(0) : 0;
      const int64_t ms1 = has_master ? master->stride(1) : 0;
      const c_t* vl = lc.data_ptr<c_t>();
      const c_t* vu = uc.data_ptr<c_t>();
      if (rows_outer) {
        write<w_t, c_t>(weight.data_ptr<w_t>(), weight.stride(0), weight.stride(1), m, ms0, ms1, vl, vu, d_out, d_in);
      } else {
        write<w_t, c_t>(weight.data_ptr<w_t>(), weight.stride(1), weight.stride(0), m, ms1, ms0, vu, vl, d_in, d_out);
      }
    });
  });
  return flag(true);
}

}  // namespace fastrome
