// CPU kernels for the gather family: gather (index_select) and csr_sum (its
// deterministic transpose, the segment sum of csrc/cpu/segment.cpp). Rows of the folded
// view [outer, size, inner] are the unit of work: at::parallel_for splits them across
// threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../utils.h"
#include "segment.h"

namespace fastcore {
namespace {

template <typename index_t>
void gather_rows(const char* src, const index_t* index, char* out, const Fold& f, int64_t rows_out,
                 int64_t row_bytes) {
  const int64_t total = f.outer * rows_out;
  at::parallel_for(0, total, row_grain(total, row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row / rows_out;
      const int64_t m = row - o * rows_out;
      const int64_t src_row = o * f.size + static_cast<int64_t>(index[m]);
      std::memcpy(out + row * row_bytes, src + src_row * row_bytes, row_bytes);
    }
  });
}

at::Tensor gather_cpu(const at::Tensor& src, const at::Tensor& index, int64_t dim, bool check) {
  check_index_tensor(index, "gather", "index");
  TORCH_CHECK_VALUE(index.device().is_cpu(), "gather: index must be on the CPU like src, got ",
                    index.device());
  const Fold f = fold_at(src, dim);
  if (check) check_index_range(index, f.size, "gather", "index", dim);

  const int64_t rows_out = index.numel();
  auto out = at::empty(shape_with(src, dim, rows_out), src.options());
  if (out.numel() == 0) return out;

  const auto src_c = src.contiguous();
  const auto index_c = index.contiguous();
  const int64_t row_bytes = f.inner * static_cast<int64_t>(src.element_size());
  const char* src_ptr = static_cast<const char*>(src_c.const_data_ptr());
  char* out_ptr = static_cast<char*>(out.mutable_data_ptr());
  if (index_c.scalar_type() == at::kLong) {
    gather_rows(src_ptr, index_c.const_data_ptr<int64_t>(), out_ptr, f, rows_out, row_bytes);
  } else {
    gather_rows(src_ptr, index_c.const_data_ptr<int32_t>(), out_ptr, f, rows_out, row_bytes);
  }
  return out;
}

at::Tensor csr_sum_cpu(const at::Tensor& src, const c10::optional<at::Tensor>& perm,
                       const at::Tensor& ptr, int64_t dim, bool check) {
  return std::get<0>(segment_reduce_cpu_impl(src, perm, ptr, dim, Reduce::Sum, check, "csr_sum"));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CPU, m) {
  m.impl("gather", &gather_cpu);
  m.impl("csr_sum", &csr_sum_cpu);
}

}  // namespace fastcore
