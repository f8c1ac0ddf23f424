// Shared host-side helpers for fastcore's C++ operators (CPU and CUDA glue).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include <cstdint>
#include <string>

namespace fastcore {

// A tensor viewed as [outer, size(dim), inner] (row-major, contiguous).
struct Fold {
  int64_t outer;
  int64_t size;
  int64_t inner;
};

inline Fold fold_at(const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_INDEX(dim >= 0 && dim < t.dim(), "dim ", dim, " is out of range for a tensor of ",
                    t.dim(), " dimensions");
  Fold f{1, t.size(dim), 1};
  for (int64_t d = 0; d < dim; ++d) f.outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) f.inner *= t.size(d);
  return f;
}

// The caching CPU allocator (csrc/cpu/cpu_cache.cpp) while fastcore's operators keep the
// freed blocks of their outputs for reuse (on by default; fastcore.ops.memory), else nullptr.
c10::Allocator* output_allocator();

// at::empty / at::zeros for an operator's output or workspace: on the CPU, from the block
// cache while it is on, so a block of 256 KiB or more that an earlier call's output freed
// is reused (its pages already mapped: no page fault per 4 KiB on the first write) in any
// process, with or without the training layer's allocator setting. Contents of empty_output
// are uninitialised, as at::empty's.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  c10::Allocator* cache = options.device().is_cpu() ? output_allocator() : nullptr;
  if (cache == nullptr) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

inline at::Tensor zeros_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, options).zero_();
}

// Rows per CPU task: enough bytes per task (~32 KiB) to amortise scheduling, but never
// so many that a small problem leaves a core idle.
inline int64_t row_grain(int64_t rows, int64_t row_bytes) {
  const int64_t target = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(row_bytes, 1));
  const int64_t per_thread = std::max<int64_t>(1, rows / std::max(1, at::get_num_threads()));
  return std::min(target, per_thread);
}

// Shape of `t` with size(dim) replaced by `n`.
inline std::vector<int64_t> shape_with(const at::Tensor& t, int64_t dim, int64_t n) {
  auto shape = t.sizes().vec();
  shape[dim] = n;
  return shape;
}

inline void check_index_tensor(const at::Tensor& index, const char* op, const char* name) {
  TORCH_CHECK_VALUE(index.dim() == 1, op, ": ", name, " must be 1-D, got shape ", index.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, op, ": ",
                   name, " must be int32 or int64, got ", index.scalar_type());
}

// Host-side range check of an index tensor on any device (synchronises on CUDA).
// Raises IndexError naming the first offending value class (negative or too large).
inline void check_index_range(const at::Tensor& index, int64_t bound, const char* op,
                              const char* name, int64_t dim) {
  if (index.numel() == 0) return;
  auto [lo, hi] = at::aminmax(index);
  const int64_t min_value = lo.item<int64_t>();
  const int64_t max_value = hi.item<int64_t>();
  TORCH_CHECK_INDEX(min_value >= 0, op, ": ", name, " contains the negative value ", min_value,
                    "; expected values in [0, ", bound, ") for dimension ", dim);
  TORCH_CHECK_INDEX(max_value < bound, op, ": ", name, " value ", max_value,
                    " is out of range for dimension ", dim, " of size ", bound);
}

// The CSR checks that read no values, run with check=False too: with them the kernels,
// which clamp ptr and skip perm entries out of range, stay inside the tensors.
inline void check_csr_shapes(const at::Tensor& ptr, const c10::optional<at::Tensor>& perm,
                             int64_t rows, const char* op) {
  TORCH_CHECK_VALUE(ptr.dim() == 1 && ptr.numel() >= 1, op,
                    ": ptr must be 1-D with at least one entry, got shape ", ptr.sizes());
  if (perm.has_value()) {
    TORCH_CHECK_VALUE(perm->dim() == 1 && perm->numel() == rows, op,
                      ": perm must be 1-D of length ", rows, ", got shape ", perm->sizes());
  }
}

// Validates a CSR pointer (and optional permutation) for `rows` source rows on any
// device (synchronises on CUDA). Raises ValueError / IndexError naming the value.
inline void check_csr(const at::Tensor& ptr, const c10::optional<at::Tensor>& perm, int64_t rows,
                      const char* op, int64_t dim) {
  TORCH_CHECK_VALUE(ptr.dim() == 1 && ptr.numel() >= 1, op,
                    ": ptr must be 1-D with at least one entry, got shape ", ptr.sizes());
  auto ptr_cpu = ptr.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = ptr_cpu.data_ptr<int64_t>();
  const int64_t segments = ptr_cpu.numel() - 1;
  TORCH_CHECK_VALUE(p[0] == 0, op, ": ptr[0] must be 0, got ", p[0]);
  for (int64_t r = 0; r < segments; ++r) {
    TORCH_CHECK_VALUE(p[r] <= p[r + 1], op, ": ptr must be non-decreasing, got ptr[", r,
                      "]=", p[r], " > ptr[", r + 1, "]=", p[r + 1]);
  }
  TORCH_CHECK_VALUE(p[segments] == rows, op, ": ptr[-1] must equal the size ", rows,
                    " of dimension ", dim, ", got ", p[segments]);
  if (perm.has_value()) {
    const auto& q = *perm;
    TORCH_CHECK_VALUE(q.dim() == 1 && q.numel() == rows, op, ": perm must be 1-D of length ",
                      rows, ", got shape ", q.sizes());
    check_index_range(q, rows, op, "perm", dim);
    auto counts = at::bincount(q.to(at::kLong), {}, rows);
    if (rows > 0) {
      const int64_t max_count = counts.max().item<int64_t>();
      TORCH_CHECK_VALUE(max_count == 1, op, ": perm must be a permutation of 0..", rows - 1,
                        ", but a value repeats ", max_count, " times");
    }
  }
}

}  // namespace fastcore
