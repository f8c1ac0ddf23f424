// CPU kernels for the gather family: gather (index_select) and csr_sum (its
// deterministic transpose). Rows of the folded view [outer, size, inner] are the
// unit of work: at::parallel_for splits them across threads, and the feature
// (inner) dimension is contiguous and vectorised by the compiler.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../utils.h"

namespace fastcore {
namespace {

// Rows per task: enough bytes per task (~32 KiB) to amortise scheduling, but
// never so many that a small problem leaves a core idle.
int64_t row_grain(int64_t rows, int64_t row_bytes) {
  const int64_t target = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(row_bytes, 1));
  const int64_t per_thread = std::max<int64_t>(1, rows / std::max(1, at::get_num_threads()));
  return std::min(target, per_thread);
}

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

// acc[0:n] += row[0:n] in the accumulation type. Plain loops that the compiler
// vectorises for the build's target: ATen's generic at::vec::Vectorized (used when the
// extension is not compiled per CPU capability) goes through memcpy calls per vector.
template <typename acc_t, typename scalar_t>
inline void add_row(acc_t* __restrict__ acc, const scalar_t* __restrict__ row, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<acc_t>(row[j]);
}

// Two loop orders, both with a fixed summation order (deterministic):
//  * by segment: each output row gathers its source rows, perm[ptr[r]] .. perm[ptr[r+1]-1];
//    parallel over (outer, segment) rows: works for any shape.
//  * by slab: for each outer index, stream the source rows in order and add each into its
//    segment's output row, which stays in cache; parallel over outer. Chosen when there
//    are enough slabs for every thread and a slab's accumulators fit in L2. Within a
//    segment it adds rows in ascending source order, which is the by-segment order when
//    perm lists each segment's rows ascending (as a stable sort of an index does).
constexpr int64_t kSlabBytes = 512 * 1024;

template <typename scalar_t>
void csr_sum_rows(const scalar_t* src, const int64_t* perm, const int64_t* ptr, scalar_t* out,
                  const Fold& f, int64_t segments) {
  using acc_t = at::opmath_type<scalar_t>;  // float for half types, else scalar_t
  constexpr bool widen = !std::is_same_v<acc_t, scalar_t>;
  const int64_t inner = f.inner;
  const int64_t total = f.outer * segments;
  const int64_t slab = segments * inner;
  const bool by_slab = f.outer >= 2 * at::get_num_threads() &&
                       slab * static_cast<int64_t>(sizeof(acc_t)) <= kSlabBytes;
  if (by_slab) {
    std::vector<int64_t> segment_of(f.size);  // source row -> its segment
    for (int64_t r = 0; r < segments; ++r) {
      for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) segment_of[perm ? perm[k] : k] = r;
    }
    at::parallel_for(0, f.outer, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffer(widen ? slab : 0);
      for (int64_t o = begin; o < end; ++o) {
        acc_t* acc = widen ? buffer.data() : reinterpret_cast<acc_t*>(out + o * slab);
        std::fill(acc, acc + slab, acc_t(0));
        const scalar_t* base = src + o * f.size * inner;
        for (int64_t m = 0; m < f.size; ++m) {
          add_row(acc + segment_of[m] * inner, base + m * inner, inner);
        }
        if constexpr (widen) {
          for (int64_t j = 0; j < slab; ++j) out[o * slab + j] = static_cast<scalar_t>(acc[j]);
        }
      }
    });
    return;
  }
  at::parallel_for(
      0, total, row_grain(total, inner * static_cast<int64_t>(sizeof(scalar_t))),
      [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buffer(widen ? inner : 0);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t o = row / segments;
          const int64_t r = row - o * segments;
          const scalar_t* base = src + o * f.size * inner;
          scalar_t* dst = out + row * inner;
          acc_t* acc = widen ? buffer.data() : reinterpret_cast<acc_t*>(dst);
          std::fill(acc, acc + inner, acc_t(0));
          for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) {
            add_row(acc, base + (perm ? perm[k] : k) * inner, inner);
          }
          if constexpr (widen) {
            for (int64_t j = 0; j < inner; ++j) dst[j] = static_cast<scalar_t>(acc[j]);
          }
        }
      });
}

at::Tensor csr_sum_cpu(const at::Tensor& src, const c10::optional<at::Tensor>& perm,
                       const at::Tensor& ptr, int64_t dim, bool check) {
  check_index_tensor(ptr, "csr_sum", "ptr");
  TORCH_CHECK_VALUE(ptr.device().is_cpu(), "csr_sum: ptr must be on the CPU like src, got ",
                    ptr.device());
  if (perm.has_value()) {
    check_index_tensor(*perm, "csr_sum", "perm");
    TORCH_CHECK_VALUE(perm->device().is_cpu(), "csr_sum: perm must be on the CPU like src, got ",
                      perm->device());
  }
  const auto dtype = src.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "csr_sum: src must be float32, float64, float16 or bfloat16, got ", dtype);
  const Fold f = fold_at(src, dim);
  if (check) check_csr(ptr, perm, f.size, "csr_sum", dim);

  const int64_t segments = ptr.numel() - 1;
  auto out = at::empty(shape_with(src, dim, segments), src.options());
  if (out.numel() == 0) return out;

  const auto src_c = src.contiguous();
  const auto ptr_c = ptr.to(at::kLong).contiguous();
  c10::optional<at::Tensor> perm_c;
  if (perm.has_value()) perm_c = perm->to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "csr_sum_cpu", [&] {
    csr_sum_rows<scalar_t>(src_c.const_data_ptr<scalar_t>(),
                           perm_c ? perm_c->const_data_ptr<int64_t>() : nullptr,
                           ptr_c.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), f,
                           segments);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CPU, m) {
  m.impl("gather", &gather_cpu);
  m.impl("csr_sum", &csr_sum_cpu);
}

}  // namespace fastcore
