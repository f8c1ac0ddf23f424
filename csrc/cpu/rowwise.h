// Helpers of the fused per-feature row kernels (feature_mlp, linear_norm_residual): tensors
// [M, F, H] whose every (row, feature) vector of H values goes through small per-feature
// matmuls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace fastcore {

// Rows of one feature are processed in blocks of R: one row's matmuls are chains of
// dependent multiply-adds on one or two vectors, and the core would wait on each; R
// independent chains keep it busy. R = vectors * 8 / width (1 to 8): the block's widest
// array fills about `vectors` AVX registers; 1 when the width is not compile-time.
template <int Width, int Vectors>
constexpr int block_rows() {
  return Width > 0 ? std::clamp(Vectors * 8 / Width, 1, 8) : 1;
}

// A block's arrays: N values on the stack (in registers, once for_n has unrolled every
// loop over them) when N > 0 is known at compile time, else the caller's scratch.
template <int N, typename acc_t>
struct BlockArrays {
  acc_t local[N > 0 ? N : 1];
  acc_t* get(acc_t* scratch) { return N > 0 ? local : scratch; }
};

// block(rows, at, f) over rows [begin, end) of [M, F, H]: blocks of R rows of one feature
// (rows an integral_constant, at[r] the offset of row r), then the remainder one row at a
// time. The rows of `inputs` (tensors laid out as [M, F, H]) about kRowsAheadBytes ahead
// are prefetched: the kernels do enough work per row that the hardware prefetchers fall
// behind, and every block then waits on memory (the loads of the rows were the hot spots).
constexpr int64_t kRowsAheadBytes = 4096;

template <int R, typename Block, typename... Inputs>
FASTCORE_INLINE void for_row_blocks(int64_t features, int64_t width, int64_t begin,
                                    int64_t end, Block&& block, const Inputs*... inputs) {
  const int64_t row = features * width;  // elements
  auto prefetch = [&](int64_t m) FASTCORE_LAMBDA_INLINE {
    (
        [&](const auto* t) FASTCORE_LAMBDA_INLINE {
          const int64_t bytes = static_cast<int64_t>(sizeof(*t)) * row;
          const int64_t ahead = std::max<int64_t>(R, kRowsAheadBytes / std::max<int64_t>(bytes, 1));
          const int64_t first = std::min(m + ahead, end), last = std::min(first + R, end);
          prefetch_span<0>(t + first * row, (last - first) * bytes);
        }(inputs),
        ...);
  };
  int64_t m = begin;
  for (; m + R <= end; m += R) {
    prefetch(m);
    for (int64_t f = 0; f < features; ++f) {
      int64_t at[R];
      for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE { at[r] = ((m + r) * features + f) * width; });
      block(std::integral_constant<int, R>{}, at, f);
    }
  }
  for (; m < end; ++m) {
    for (int64_t f = 0; f < features; ++f) {
      const int64_t at = (m * features + f) * width;
      block(std::integral_constant<int, 1>{}, &at, f);
    }
  }
}

// The two small matmuls of a block of R rows, every loop unrolled when its trip count is
// compile-time (JC, R) and the inner one vectorised over n:
//   rows_times: y[r, :n] += sum_j a(r, j) * M[j, :n]   (R rows times a [J, n] matrix)
//   add_outer:  G[j, :n] += sum_r a(r, j) * b[r, :n]   (a parameter gradient's outer products)
// a(r, j) reads the block's left operand (a row of h in memory, or an array in registers).
template <int R, int JC, typename acc_t, typename A>
FASTCORE_INLINE void rows_times(A&& a, const acc_t* M, acc_t* y, int64_t J, int64_t n) {
  for_n<JC>(J, [&](int64_t j) FASTCORE_LAMBDA_INLINE {
    for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
      const acc_t s = a(r, j);
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) y[r * n + c] += s * M[j * n + c];
    });
  });
}

template <int R, int JC, typename acc_t, typename A>
FASTCORE_INLINE void add_outer(A&& a, const acc_t* b, acc_t* G, int64_t J, int64_t n) {
  for_n<JC>(J, [&](int64_t j) FASTCORE_LAMBDA_INLINE {
    for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
      const acc_t s = a(r, j);
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) G[j * n + c] += s * b[r * n + c];
    });
  });
}

// The left operands a(r, j) of rows_times and add_outer: a block array [R, n], or the rows
// of a tensor at the offsets at[r].
template <typename acc_t>
FASTCORE_INLINE auto block_of(const acc_t* a, int64_t n) {
  return [a, n](int64_t r, int64_t j) FASTCORE_LAMBDA_INLINE { return a[r * n + j]; };
}

template <typename acc_t, typename scalar_t>
FASTCORE_INLINE auto rows_of(const scalar_t* t, const int64_t* at) {
  return [t, at](int64_t r, int64_t j) FASTCORE_LAMBDA_INLINE {
    return static_cast<acc_t>(t[at[r] + j]);
  };
}

// A weight tensor's values in the accumulation type, and [F, R, C] -> [F, C, R] of such.
template <typename acc_t, typename scalar_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const auto c = t.contiguous();
  const scalar_t* p = c.const_data_ptr<scalar_t>();
  return std::vector<acc_t>(p, p + c.numel());
}

template <typename acc_t>
std::vector<acc_t> transposed(const std::vector<acc_t>& w, int64_t F, int64_t R, int64_t C) {
  std::vector<acc_t> out(w.size());
  for (int64_t f = 0; f < F; ++f)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) out[(f * C + c) * R + r] = w[(f * R + r) * C + c];
  return out;
}

// Deterministic parameter gradients: the rows are cut into fixed tiles (they depend on the
// shape alone, never on the thread count), each tile sums its rows in order into its own
// float64 partial, and the partials are added in tile order. The result is bit-identical
// whatever the thread count.

class TilePartials {
 public:
  // Tiles of 256 rows, or more so that there are at most 64 partials of `size` doubles.
  TilePartials(int64_t rows, int64_t size)
      : rows_(rows),
        tile_rows_(std::max<int64_t>(256, (rows + 63) / 64)),
        tiles_((rows + tile_rows_ - 1) / tile_rows_),
        size_(size),
        parts_(tiles_ * size, 0.0) {}

  // fn(begin, end, partial) for every tile, the tiles spread over the threads.
  template <typename Fn>
  void run(Fn&& fn) {
    at::parallel_for(0, tiles_, 1, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i)
        fn(i * tile_rows_, std::min(rows_, (i + 1) * tile_rows_), parts_.data() + i * size_);
    });
  }

  // The partials summed in tile order, written in turn into the (contiguous) outputs,
  // whose sizes add up to `size`.
  template <typename scalar_t>
  void write(std::initializer_list<at::Tensor*> outs) const {
    std::vector<double> total(size_, 0.0);
    for (int64_t i = 0; i < tiles_; ++i)
      for (int64_t j = 0; j < size_; ++j) total[j] += parts_[i * size_ + j];
    int64_t at = 0;
    for (at::Tensor* out : outs) {
      scalar_t* p = out->mutable_data_ptr<scalar_t>();
      for (int64_t j = 0; j < out->numel(); ++j) p[j] = static_cast<scalar_t>(total[at++]);
    }
    TORCH_INTERNAL_ASSERT(at == size_, "TilePartials: outputs of ", at, " values for ", size_);
  }

 private:
  int64_t rows_, tile_rows_, tiles_, size_;
  std::vector<double> parts_;
};

}  // namespace fastcore
