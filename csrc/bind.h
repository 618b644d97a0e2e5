// The module functions of one device's kernels (fastrome._C, fastrome._C_cuda).
#pragma once

#include <torch/extension.h>

#include "kernels.h"

namespace fastrome {

// Binds the four kernels of one device as module functions, the GIL released while they run.
template <typename M, typename Sma, typename Solve, typename R1u, typename Sru>
void bind_kernels(M& m, Sma sma, Solve solve, R1u r1u, Sru sru) {
  namespace py = pybind11;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("second_moment_accumulate", sma, "acc += xᵀx over the rows where mask is true", py::arg("acc"), py::arg("x"),
        py::arg("mask"), nogil);
  m.def("solve_keys", solve, "(u, uᵀk) with u = inverse @ k", py::arg("inverse"), py::arg("k"), nogil);
  m.def("rank_one_update", r1u, "guarded weight += lam ⊗ u; returns whether it was written", py::arg("weight"),
        py::arg("u"), py::arg("lam"), py::arg("denom"), py::arg("min_denom"), py::arg("master"), nogil);
  m.def("symmetric_rank_one_update", sru, "guarded inverse -= β/(1 + β·denom)·u uᵀ; returns whether it was applied",
        py::arg("inverse"), py::arg("u"), py::arg("beta"), py::arg("denom"), py::arg("min_denom"), nogil);
}

}  // namespace fastrome
