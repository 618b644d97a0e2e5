// acc += xᵀx over masked rows, CPU. Only the upper-triangle tiles are multiplied (about half the
// FLOPs of a full product); the lower triangle is mirrored from them at the end of the call.
// Rows are consumed in chunks whose products are formed in fp32 (fp64 for fp64 data) and then
// added into the accumulator, so an fp64 accumulator keeps a long running sum exact to fp64 while
// the heavy work stays in the BLAS.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../kernels.h"

namespace fastrome {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kChunkRows = 4096;

}  // namespace

// Declared in kernels.h; bound by the extension module.
void second_moment_accumulate_cpu(at::Tensor acc, const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  FASTROME_CHECK(acc.dim() == 2 && acc.size(0) == acc.size(1), "acc: expected a square matrix, got sizes ",
                 acc.sizes());
  FASTROME_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
                 "acc: expected float32 or float64, got ", acc.scalar_type());
  FASTROME_CHECK(x.dim() == 2 && x.size(1) == acc.size(0), "x: expected shape (n, ", acc.size(0), "), got ",
                 x.sizes());
  FASTROME_CHECK(is_float_type(x.scalar_type()), "x: expected a floating-point dtype, got ", x.scalar_type());
  check_device(acc, "acc", at::Device(at::kCPU));
  check_device(x, "x", at::Device(at::kCPU));

  at::Tensor rows = x;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    FASTROME_CHECK(m.scalar_type() == at::kBool && m.dim() == 1 && m.size(0) == x.size(0),
                   "mask: expected a (", x.size(0), ",) bool tensor, got ", m.scalar_type(), " ", m.sizes());
    check_device(m, "mask", at::Device(at::kCPU));
    rows = x.index_select(0, m.nonzero().squeeze(1));
  }
  const int64_t n = rows.size(0);
  const int64_t d = acc.size(0);
  if (n == 0 || d == 0) {
    return;
  }
  const bool fp64 = acc.scalar_type() == at::kDouble && x.scalar_type() == at::kDouble;
  const auto compute = fp64 ? at::kDouble : at::kFloat;
  const bool direct = acc.scalar_type() == compute;  // add the tile product straight into acc

  const int64_t tiles = (d + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> upper;
  for (int64_t i = 0; i < tiles; ++i) {
    for (int64_t j = i; j < tiles; ++j) {
      upper.emplace_back(i, j);
    }
  }
  auto span = [d](int64_t t) { return std::make_pair(t * kTile, std::min(kTile, d - t * kTile)); };

  for (int64_t r0 = 0; r0 < n; r0 += kChunkRows) {
    const at::Tensor chunk = rows.narrow(0, r0, std::min(kChunkRows, n - r0)).to(compute).contiguous();
    at::parallel_for(0, static_cast<int64_t>(upper.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const auto [i0, li] = span(upper[p].first);
        const auto [j0, lj] = span(upper[p].second);
        const at::Tensor xi = chunk.narrow(1, i0, li);
        const at::Tensor xj = chunk.narrow(1, j0, lj);
        at::Tensor dst = acc.narrow(0, i0, li).narrow(1, j0, lj);
        if (direct) {
          dst.addmm_(xi.t(), xj);
        } else {
          dst.add_(at::mm(xi.t(), xj));
        }
      }
    });
  }
  // Copy each strictly-upper tile into its mirror. Diagonal tiles were formed in full, but a GEMM
  // need not round (i, j) and (j, i) alike, so their upper triangles are mirrored as well.
  at::parallel_for(0, static_cast<int64_t>(upper.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const auto [i0, li] = span(upper[p].first);
      const auto [j0, lj] = span(upper[p].second);
      if (upper[p].first == upper[p].second) {
        at::Tensor tile = acc.narrow(0, i0, li).narrow(1, i0, li);
        tile.copy_(tile.triu().add_(tile.t().tril(-1)));
        continue;
      }
      acc.narrow(0, j0, lj).narrow(1, i0, li).copy_(acc.narrow(0, i0, li).narrow(1, j0, lj).t());
    }
  });
}

}  // namespace fastrome
