// The compiled kernels of the four ops, one function per op and device. The extension modules bind
// them as plain functions (fastrome._C: cpu, fastrome._C_cuda: cuda); the one op namespace,
// torch.ops.fastrome, is declared in Python (fastrome/ops.py), whose one kernel per op calls these for
// the backend it picks. Argument errors raise ValueError in Python (checks.h).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fastrome {

// acc += xᵀx over rows where mask is true; acc must be symmetric on entry and is on exit.
void second_moment_accumulate_cpu(at::Tensor acc, const at::Tensor& x, const c10::optional<at::Tensor>& mask);
// (u, uᵀk) with u = A k from the cached symmetric inverse A, k of shape (d,) or (b, d).
std::tuple<at::Tensor, at::Tensor> solve_keys_cpu(const at::Tensor& inverse, const at::Tensor& k);
// Guarded weight += lam ⊗ u (through master when given); returns the applied flag.
at::Tensor rank_one_update_cpu(at::Tensor weight, const at::Tensor& u, const at::Tensor& lam, const at::Tensor& denom,
                               const at::Tensor& min_denom, const c10::optional<at::Tensor>& master);
// Guarded Sherman–Morrison step inverse -= coef·u uᵀ, coef = beta / (1 + beta·denom) in fp64, refused
// unless 1 + beta·denom > min_denom and u, beta·denom, coef are finite; returns the applied flag.
at::Tensor symmetric_rank_one_update_cpu(at::Tensor inverse, const at::Tensor& u, const at::Tensor& beta,
                                         const at::Tensor& denom, const at::Tensor& min_denom);

namespace cuda {

void second_moment_accumulate_cuda(at::Tensor acc, const at::Tensor& x, const c10::optional<at::Tensor>& mask);
std::tuple<at::Tensor, at::Tensor> solve_keys_cuda(const at::Tensor& inverse, const at::Tensor& k);
at::Tensor rank_one_update_cuda(at::Tensor weight, const at::Tensor& u, const at::Tensor& lam, const at::Tensor& denom,
                                const at::Tensor& min_denom, const c10::optional<at::Tensor>& master);
at::Tensor symmetric_rank_one_update_cuda(at::Tensor inverse, const at::Tensor& u, const at::Tensor& beta,
                                          const at::Tensor& denom, const at::Tensor& min_denom);

}  // namespace cuda

}  // namespace fastrome
