// CPU kernels for graph convolution: spmm (sparse adjacency times dense features along
// a dim, over the edges grouped by destination) and spmm_edge_grad (its edge-weight
// gradient, an SDDMM). The dense tensors are viewed as [outer, nodes, inner]: outer is
// every leading dim (batch, time), inner the row width (features x hidden), contiguous
// and vectorised.
//
// Every output element sums its terms in one fixed order (CSR order; over outer in
// ascending order for the edge gradient), whatever the thread count: results are
// bit-identical run to run, with no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "../spmm_checks.h"
#include "../utils.h"
#include "simd.h"

namespace fastcore {
namespace {

// acc[0:n] += w * row[0:n] in the accumulation type.
template <typename acc_t, typename scalar_t>
inline void axpy_row(acc_t* __restrict__ acc, acc_t w, const scalar_t* __restrict__ row,
                     int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += w * static_cast<acc_t>(row[j]);
}

// Output rows [begin, end) of the flattened [outer, V] view; with residual (V == n_src) each
// row then adds its own input row. Columns are summed kFoldBlock (simd.h) at a time in a local
// block the compiler keeps in registers (the loop over the row's edges once per block, the
// prefetch in the first), the rest (inner not a multiple, or narrower) in memory: each element
// adds the same terms in the same order from 0 either way, so the same bits. `stream`: each
// finished row goes out with streaming stores (through `buffer`, and `staged` in the output
// type when that is narrower), so a large output is not read before it is written. Once the
// rows come from beyond L2, the loop waits on its prefetches, and the fewer uops an edge costs
// the more of them are in flight; the output's write-allocate reads were a third of the memory
// traffic. spmm forward at (16, 100k), rows of 64 float32, on the Intel VM: 59.3 ms with the
// accumulator in memory, 59.0 ms with the block and 49.1 ms with the block and streamed rows;
// at (2, 1M) 113.0, 109.4 and 105.9 ms (medians, the kernels switched within one process;
// docs/benchmarks.md).
template <typename scalar_t>
FASTCORE_SIMD_CLONES void spmm_rows(const scalar_t* x, const scalar_t* weight, const int64_t* ptr,
                                    const int64_t* col, scalar_t* out, int64_t n_src,
                                    int64_t segments, int64_t inner, bool residual, int64_t begin,
                                    int64_t end, bool stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool widen = !std::is_same_v<acc_t, scalar_t>;
  constexpr int64_t kBlock = kFoldBlock<acc_t>;
  std::vector<acc_t> buffer(widen || stream ? inner : 0);
  std::vector<scalar_t> staged(widen && stream ? inner : 0);
  const int64_t last = ptr[segments];  // edges in CSR order: one slab's
  const int64_t row_bytes = inner * static_cast<int64_t>(sizeof(scalar_t));
  int64_t o = begin / segments;
  int64_t v = begin - o * segments;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* base = x + o * n_src * inner;
    scalar_t* dst = out + row * inner;
    acc_t* acc = widen || stream ? buffer.data() : reinterpret_cast<acc_t*>(dst);
    const int64_t k_begin = ptr[v];
    const int64_t k_end = ptr[v + 1];
    auto prefetch = [&](int64_t k) FASTCORE_LAMBDA_INLINE {
      if (k + kPrefetchAhead < last) {  // the edges of later rows of this slab too
        const int64_t ahead = col[k + kPrefetchAhead];
        if (static_cast<uint64_t>(ahead) < static_cast<uint64_t>(n_src))
          prefetch_row(base + ahead * inner, row_bytes);
      }
    };
    int64_t c0 = 0;
    for (; c0 + kBlock <= inner; c0 += kBlock) {
      alignas(64) acc_t block[kBlock] = {};
      for (int64_t k = k_begin; k < k_end; ++k) {
        if (c0 == 0) prefetch(k);
        const acc_t w = weight ? static_cast<acc_t>(weight[k]) : acc_t(1);
        const scalar_t* __restrict__ src = base + col[k] * inner + c0;
#pragma omp simd
        for (int64_t j = 0; j < kBlock; ++j) block[j] += w * static_cast<acc_t>(src[j]);
      }
      if (residual) {
        const scalar_t* __restrict__ own = base + v * inner + c0;
#pragma omp simd
        for (int64_t j = 0; j < kBlock; ++j) {
          block[j] += acc_t(1) * static_cast<acc_t>(own[j]);
        }
      }
      for (int64_t j = 0; j < kBlock; ++j) acc[c0 + j] = block[j];
    }
    if (c0 < inner) {
      std::fill(acc + c0, acc + inner, acc_t(0));
      for (int64_t k = k_begin; k < k_end; ++k) {
        if (c0 == 0) prefetch(k);
        const acc_t w = weight ? static_cast<acc_t>(weight[k]) : acc_t(1);
        axpy_row(acc + c0, w, base + col[k] * inner + c0, inner - c0);
      }
      if (residual) axpy_row(acc + c0, acc_t(1), base + v * inner + c0, inner - c0);
    }
    scalar_t* row_out = stream && widen ? staged.data() : dst;
    if constexpr (widen) {
      for (int64_t j = 0; j < inner; ++j) row_out[j] = static_cast<scalar_t>(acc[j]);
    }
    if (stream) stream_row(dst, widen ? row_out : reinterpret_cast<scalar_t*>(acc), row_bytes);
    if (++v == segments) {
      v = 0;
      ++o;
    }
  }
  if (stream) stream_fence();
}

// Weighted float32 rows of exactly 8 values (the causal graph of a basin model with hidden
// 8): each output row sums its edges in one vector register and is written once, where
// the loop above pays its per-edge loop overhead for a single vector multiply-add. GCC's
// vector extension keeps the loop as written (the vectoriser, given the loop above with a
// width of 8 fixed, unrolls and jams it into scalar code). The same terms in the same
// order: the same bits.
using f32x8 = float __attribute__((vector_size(32), aligned(4), may_alias));

FASTCORE_SIMD_CLONES void spmm_rows_8(const float* x, const float* weight, const int64_t* ptr,
                                      const int64_t* col, float* out, int64_t n_src,
                                      int64_t segments, bool residual, int64_t begin,
                                      int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t o = row / segments;
    const int64_t v = row - o * segments;
    const float* base = x + o * n_src * 8;
    f32x8 acc = {};
    for (int64_t k = ptr[v]; k < ptr[v + 1]; ++k)
      acc += weight[k] * *reinterpret_cast<const f32x8*>(base + col[k] * 8);
    if (residual) acc += *reinterpret_cast<const f32x8*>(base + v * 8);
    *reinterpret_cast<f32x8*>(out + row * 8) = acc;
  }
}

at::Tensor spmm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const at::Tensor& ptr, const at::Tensor& col, const at::Tensor& t_ptr,
                    const at::Tensor& t_col, const at::Tensor& t_edge, const at::Tensor& t_pos,
                    int64_t dim, bool residual, bool check) {
  check_spmm_args(x, weight, ptr, col, t_ptr, t_col, t_edge, t_pos, dim, residual, check, "spmm");
  const Fold f = fold_at(x, dim);
  const int64_t segments = ptr.numel() - 1;
  auto out = empty_output(shape_with(x, dim, segments), x.options());
  if (out.numel() == 0) return out;
  const auto x_c = x.contiguous();
  const auto ptr_c = ptr.to(at::kLong).contiguous();
  const auto col_c = col.to(at::kLong).contiguous();
  std::optional<at::Tensor> w_c;
  if (weight.has_value()) w_c = weight->contiguous();
  const int64_t rows = f.outer * segments;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spmm_cpu", [&] {
    const scalar_t* xp = x_c.const_data_ptr<scalar_t>();
    const scalar_t* wp = w_c ? w_c->const_data_ptr<scalar_t>() : nullptr;
    const int64_t* p = ptr_c.const_data_ptr<int64_t>();
    const int64_t* c = col_c.const_data_ptr<int64_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // Contiguous row ranges: a thread works through whole (batch, time) slabs in turn.
    const int64_t grain = row_grain(rows, f.inner * 8);
    if (std::is_same_v<scalar_t, float> && wp && f.inner == 8) {
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        spmm_rows_8(reinterpret_cast<const float*>(xp), reinterpret_cast<const float*>(wp), p,
                    c, reinterpret_cast<float*>(o), f.size, segments, residual, begin, end);
      });
      return;
    }
    const int64_t row_bytes = f.inner * static_cast<int64_t>(sizeof(scalar_t));
    const bool stream = can_stream(o, row_bytes, rows * row_bytes);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      spmm_rows(xp, wp, p, c, o, f.size, segments, f.inner, residual, begin, end, stream);
    });
  });
  return out;
}

template <typename acc_t, typename scalar_t>
inline acc_t dot_row(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += static_cast<acc_t>(a[j]) * static_cast<acc_t>(b[j]);
  return s;
}

// Edge gradients of the CSR entries of destination rows [v_begin, v_end): for each outer
// index o in ascending order, add <grad[o, v], x[o, col[k]]> into the entry's float64 sum.
template <typename scalar_t>
FASTCORE_SIMD_CLONES void edge_grad_rows(const scalar_t* grad, const scalar_t* x,
                                         const int64_t* ptr, const int64_t* col, scalar_t* out,
                                         int64_t outer, int64_t n_src, int64_t segments,
                                         int64_t inner, int64_t v_begin, int64_t v_end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t first = ptr[v_begin];
  std::vector<double> sums(ptr[v_end] - first, 0.0);
  const int64_t row_bytes = inner * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t o = 0; o < outer; ++o) {
    const scalar_t* x_slab = x + o * n_src * inner;
    // the rows this slab reads, one slab on: in column order they come from memory one at a
    // time, each a wait the hardware prefetchers cannot foresee
    const bool ahead = o + 1 < outer;
    for (int64_t v = v_begin; v < v_end; ++v) {
      const scalar_t* g = grad + (o * segments + v) * inner;
      if (ahead) prefetch_row(g + segments * inner, row_bytes);
      for (int64_t k = ptr[v]; k < ptr[v + 1]; ++k) {
        if (ahead && static_cast<uint64_t>(col[k]) < static_cast<uint64_t>(n_src))
          prefetch_row(x_slab + (n_src + col[k]) * inner, row_bytes);
        sums[k - first] += static_cast<double>(dot_row<acc_t>(g, x_slab + col[k] * inner, inner));
      }
    }
  }
  for (int64_t k = first; k < ptr[v_end]; ++k) out[k] = static_cast<scalar_t>(sums[k - first]);
}

at::Tensor spmm_edge_grad_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& ptr,
                              const at::Tensor& col, const at::Tensor& t_ptr,
                              const at::Tensor& t_col, const at::Tensor& t_edge,
                              const at::Tensor& t_pos, int64_t dim) {
  constexpr const char* op = "spmm_edge_grad";
  check_spmm_args(x, std::nullopt, ptr, col, t_ptr, t_col, t_edge, t_pos, dim, false, false, op);
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
                   " must equal x's dtype ", x.scalar_type());
  const auto expected = shape_with(x, dim, ptr.numel() - 1);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(expected), op, ": grad shape ", grad.sizes(),
                    " must be ", at::IntArrayRef(expected));
  const Fold f = fold_at(x, dim);
  const int64_t segments = ptr.numel() - 1;
  auto out = empty_output({col.numel()}, x.options());
  if (out.numel() == 0) return out;
  if (f.outer == 0 || f.inner == 0) return out.zero_();
  const auto grad_c = grad.contiguous();
  const auto x_c = x.contiguous();
  const auto ptr_c = ptr.to(at::kLong).contiguous();
  const auto col_c = col.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spmm_edge_grad", [&] {
    const scalar_t* g = grad_c.const_data_ptr<scalar_t>();
    const scalar_t* xp = x_c.const_data_ptr<scalar_t>();
    const int64_t* p = ptr_c.const_data_ptr<int64_t>();
    const int64_t* c = col_c.const_data_ptr<int64_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, segments / std::max(1, at::get_num_threads()));
    at::parallel_for(0, segments, grain, [&](int64_t begin, int64_t end) {
      edge_grad_rows(g, xp, p, c, o, f.outer, f.size, segments, f.inner, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CPU, m) {
  m.impl("spmm", &spmm_cpu);
  m.impl("spmm_edge_grad", &spmm_edge_grad_cpu);
}

}  // namespace fastcore
