// CPU kernels of gather (index_select) and gather_add (gather plus a tensor of the
// output's shape: unpooling fused with its skip connection). Rows of the folded view
// [outer, size, inner] are the unit of work: at::parallel_for splits them across threads.
// Their backward, csr_sum, is registered with the segment reductions (csrc/cpu/segment.cpp).
// An index outside [0, size) (possible only with check=False) reads a zero row: gather
// writes zeros there and gather_add copies base; nothing outside the tensors is touched.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "../utils.h"
#include "simd.h"

namespace fastcore {
namespace {

// Output rows [begin, end) of the flattened [outer, rows_out] view; with `stream` written
// with streaming stores (simd.h, can_stream: the output is larger than the caches).
template <typename index_t>
void gather_range(const char* src, const index_t* index, char* out, const Fold& f,
                  int64_t rows_out, int64_t row_bytes, bool stream, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t o = row / rows_out;
    const int64_t m = row - o * rows_out;
    const int64_t i = static_cast<int64_t>(index[m]);
    if (m + kPrefetchAhead < rows_out) {
      const int64_t ahead = static_cast<int64_t>(index[m + kPrefetchAhead]);
      if (static_cast<uint64_t>(ahead) < static_cast<uint64_t>(f.size))
        prefetch_row(src + (o * f.size + ahead) * row_bytes, row_bytes);
    }
    const char* from = static_cast<uint64_t>(i) < static_cast<uint64_t>(f.size)
                           ? src + (o * f.size + i) * row_bytes
                           : nullptr;
    char* to = out + row * row_bytes;
    if (stream) {
      stream_row(to, from, row_bytes);
    } else if (from) {
      std::memcpy(to, from, row_bytes);
    } else {
      std::memset(to, 0, row_bytes);
    }
  }
  if (stream) stream_fence();
}

template <typename index_t>
void gather_rows(const char* src, const index_t* index, char* out, const Fold& f, int64_t rows_out,
                 int64_t row_bytes) {
  const int64_t total = f.outer * rows_out;
  const bool stream = can_stream(out, row_bytes, total * row_bytes);
  at::parallel_for(0, total, row_grain(total, row_bytes), [&](int64_t begin, int64_t end) {
    gather_range(src, index, out, f, rows_out, row_bytes, stream, begin, end);
  });
}

at::Tensor gather_cpu(const at::Tensor& src, const at::Tensor& index, int64_t dim, bool check) {
  check_index_tensor(index, "gather", "index");
  TORCH_CHECK_VALUE(index.device().is_cpu(), "gather: index must be on the CPU like src, got ",
                    index.device());
  const Fold f = fold_at(src, dim);
  if (check) check_index_range(index, f.size, "gather", "index", dim);

  const int64_t rows_out = index.numel();
  auto out = empty_output(shape_with(src, dim, rows_out), src.options());
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

// out[o, m, :] = base[o, m, :] + src[o, index[m], :]: unpooling fused with a skip
// connection (one pass over the output instead of a copy and an add).
template <typename scalar_t, typename index_t>
FASTCORE_SIMD_CLONES void gather_add_rows(const scalar_t* src, const index_t* index,
                                          const scalar_t* base, scalar_t* out, int64_t size,
                                          int64_t rows_out, int64_t inner, int64_t begin,
                                          int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t o = row / rows_out;
    const int64_t m = row - o * rows_out;
    const int64_t i = static_cast<int64_t>(index[m]);
    const scalar_t* b = base + row * inner;
    scalar_t* d = out + row * inner;
    if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(size)) {
      std::memcpy(d, b, inner * sizeof(scalar_t));
      continue;
    }
    const scalar_t* s = src + (o * size + i) * inner;
#pragma omp simd
    for (int64_t j = 0; j < inner; ++j) {
      d[j] = static_cast<scalar_t>(static_cast<acc_t>(b[j]) + static_cast<acc_t>(s[j]));
    }
  }
}

at::Tensor gather_add_cpu(const at::Tensor& src, const at::Tensor& index, const at::Tensor& base,
                          int64_t dim, bool check) {
  check_index_tensor(index, "gather_add", "index");
  TORCH_CHECK_VALUE(index.device().is_cpu() && base.device().is_cpu(),
                    "gather_add: index and base must be on the CPU like src, got ",
                    index.device(), " and ", base.device());
  const auto dtype = src.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "gather_add: src must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_TYPE(base.scalar_type() == dtype, "gather_add: base dtype ", base.scalar_type(),
                   " must equal src's dtype ", dtype);
  const Fold f = fold_at(src, dim);
  const int64_t rows_out = index.numel();
  const auto shape = shape_with(src, dim, rows_out);
  TORCH_CHECK_VALUE(base.sizes() == at::IntArrayRef(shape), "gather_add: base shape ",
                    base.sizes(), " must be ", at::IntArrayRef(shape));
  if (check) check_index_range(index, f.size, "gather_add", "index", dim);

  auto out = empty_output(shape, src.options());
  if (out.numel() == 0) return out;
  const auto src_c = src.contiguous();
  const auto base_c = base.contiguous();
  const auto index_c = index.contiguous();
  const int64_t total = f.outer * rows_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gather_add_cpu", [&] {
    const scalar_t* s = src_c.const_data_ptr<scalar_t>();
    const scalar_t* b = base_c.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = row_grain(total, f.inner * static_cast<int64_t>(sizeof(scalar_t)));
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      if (index_c.scalar_type() == at::kLong) {
        gather_add_rows(s, index_c.const_data_ptr<int64_t>(), b, o, f.size, rows_out, f.inner,
                        begin, end);
      } else {
        gather_add_rows(s, index_c.const_data_ptr<int32_t>(), b, o, f.size, rows_out, f.inner,
                        begin, end);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CPU, m) {
  m.impl("gather", &gather_cpu);
  m.impl("gather_add", &gather_add_cpu);
}

}  // namespace fastcore
