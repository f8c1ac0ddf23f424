// CPU kernels for the gather family: gather (index_select) and csr_sum (its
// deterministic transpose). Rows of the folded view [outer, size, inner] are the
// unit of work: at::parallel_for splits them across threads, and the feature
// (inner) dimension is contiguous and vectorised.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
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

// acc[0:n] += row[0:n], vectorised.
template <typename acc_t>
inline void add_row(acc_t* acc, const acc_t* row, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    (Vec::loadu(acc + j) + Vec::loadu(row + j)).store(acc + j);
  }
  for (; j < n; ++j) acc[j] += row[j];
}

// acc[0:n] += float(row[0:n]) for half types, vectorised through float.
template <typename scalar_t>
inline void add_row_widened(float* acc, const scalar_t* row, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using FVec = at::vec::Vectorized<float>;
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(row + j));
    (FVec::loadu(acc + j) + lo).store(acc + j);
    (FVec::loadu(acc + j + FVec::size()) + hi).store(acc + j + FVec::size());
  }
  for (; j < n; ++j) acc[j] += static_cast<float>(row[j]);
}

template <typename scalar_t>
void csr_sum_rows(const scalar_t* src, const int64_t* perm, const int64_t* ptr, scalar_t* out,
                  const Fold& f, int64_t segments) {
  const int64_t inner = f.inner;
  const int64_t total = f.outer * segments;
  constexpr bool widen = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
  at::parallel_for(
      0, total, row_grain(total, inner * static_cast<int64_t>(sizeof(scalar_t))),
      [&](int64_t begin, int64_t end) {
        std::vector<float> acc(widen ? inner : 0);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t o = row / segments;
          const int64_t r = row - o * segments;
          const scalar_t* base = src + o * f.size * inner;
          scalar_t* dst = out + row * inner;
          if constexpr (widen) {
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) {
              add_row_widened(acc.data(), base + (perm ? perm[k] : k) * inner, inner);
            }
            at::vec::convert(acc.data(), dst, inner);
          } else {
            std::fill(dst, dst + inner, scalar_t(0));
            for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) {
              add_row(dst, base + (perm ? perm[k] : k) * inner, inner);
            }
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
