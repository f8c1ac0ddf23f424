// Argument checks of spmm / spmm_edge_grad, shared by the CPU kernels (csrc/cpu/spmm.cpp)
// and the CUDA glue (csrc/cuda/spmm.cpp), so that both raise the same errors with the same
// messages. Host-side only; the value checks read the indices (synchronising on CUDA).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "utils.h"

namespace fastcore {

// One index tensor of the graph structure: 1-D int32/int64 on x's device, `expected`
// entries (or any number when expected < 0).
inline void check_structure(const at::Tensor& t, const at::Tensor& x, int64_t expected,
                            const char* op, const char* name) {
  check_index_tensor(t, op, name);
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(expected < 0 || t.numel() == expected, op, ": ", name, " must have ",
                    expected, " entries, got ", t.numel());
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

// Shapes, dtypes and devices of spmm's arguments (free: reads no values).
inline void check_spmm_layout(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              const at::Tensor& ptr, const at::Tensor& col,
                              const at::Tensor& t_ptr, const at::Tensor& t_col,
                              const at::Tensor& t_edge, const at::Tensor& t_pos, int64_t dim,
                              bool residual, const char* op) {
  check_float(x, op, "x");
  const int64_t edges = col.numel();
  check_structure(ptr, x, -1, op, "ptr");
  check_structure(col, x, -1, op, "col");
  check_structure(t_ptr, x, x.size(dim) + 1, op, "t_ptr");
  check_structure(t_col, x, edges, op, "t_col");
  check_structure(t_edge, x, edges, op, "t_edge");
  check_structure(t_pos, x, edges, op, "t_pos");
  TORCH_CHECK_VALUE(!residual || ptr.numel() - 1 == x.size(dim), op,
                    ": residual needs a square structure, but it has ", ptr.numel() - 1,
                    " rows for ", x.size(dim), " inputs along dimension ", dim);
  if (weight.has_value()) {
    TORCH_CHECK_TYPE(weight->scalar_type() == x.scalar_type(), op, ": weight dtype ",
                     weight->scalar_type(), " must equal x's dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->numel() == edges, op,
                      ": weight must be 1-D with one entry per edge (", edges, "), got shape ",
                      weight->sizes());
    TORCH_CHECK_VALUE(weight->device() == x.device(), op, ": weight is on ", weight->device(),
                      " but x is on ", x.device());
  }
}

// The values of spmm's graph structure: both pointers valid CSRs over the E entries,
// t_edge a permutation and t_pos its inverse, every node index in range.
inline void check_spmm_values(const at::Tensor& x, const at::Tensor& ptr, const at::Tensor& col,
                              const at::Tensor& t_ptr, const at::Tensor& t_col,
                              const at::Tensor& t_edge, const at::Tensor& t_pos, int64_t dim,
                              const char* op) {
  const int64_t edges = col.numel();
  check_csr(ptr, std::nullopt, edges, op, dim);
  check_index_range(col, x.size(dim), op, "col", dim);
  check_csr(t_ptr, t_edge, edges, op, dim);
  check_index_range(t_col, ptr.numel() - 1, op, "t_col", dim);
  check_index_range(t_pos, edges, op, "t_pos", dim);
  if (edges > 0) {
    const auto t_edge_l = t_edge.to(at::kLong);
    const auto round_trip = t_pos.to(at::kLong).index_select(0, t_edge_l);
    const auto expected = at::arange(edges, t_edge_l.options());
    TORCH_CHECK_VALUE(at::equal(round_trip, expected), op,
                      ": t_pos must be the inverse permutation of t_edge");
  }
}

// Shapes, dtypes and devices of spmm's arguments; with `check`, also the values.
inline void check_spmm_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const at::Tensor& ptr, const at::Tensor& col, const at::Tensor& t_ptr,
                            const at::Tensor& t_col, const at::Tensor& t_edge,
                            const at::Tensor& t_pos, int64_t dim, bool residual, bool check,
                            const char* op) {
  check_spmm_layout(x, weight, ptr, col, t_ptr, t_col, t_edge, t_pos, dim, residual, op);
  if (!check) return;
  check_spmm_values(x, ptr, col, t_ptr, t_col, t_edge, t_pos, dim, op);
}

}  // namespace fastcore
