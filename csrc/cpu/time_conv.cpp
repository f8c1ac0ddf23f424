// CPU kernels of the depthwise convolution along time: time_conv (forward, and with
// reverse = true the transpose its input gradient needs) and time_conv_weight_grad.
// x is viewed as [outer, T, R] (contiguous), R = rows x C with the channel of element r
// being r % C (the last dim); weight is [K, C]. A task owns one (outer, block of rows)
// tile and walks its T steps, so every output element is written once from the inputs
// that are still in cache: one pass over x and one over the output, where the composite
// (K shifted multiply-adds) makes K.
//
// Every sum runs in a fixed order whatever the thread count (the weight gradient adds
// per-tile float64 partials in tile order): results are bit-identical run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "../utils.h"
#include "simd.h"

namespace fastcore {
namespace {

constexpr int64_t kTileBytes = 4 * 1024;  // one time step of a tile (x T steps stays in L2)

struct TimeView {
  int64_t outer, steps, rows, channels;  // x as [outer, steps, rows * channels]
};

TimeView view_of(const at::Tensor& x) {
  TimeView v{x.size(0), x.size(1), 1, x.size(-1)};
  for (int64_t d = 2; d < x.dim() - 1; ++d) v.rows *= x.size(d);
  return v;
}

TimeView check_time_conv(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK_VALUE(x.dim() >= 3, op, ": x must be [B, T, ..., C] (at least 3 dims), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [K, C], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, op, ": weight must have K >= 1 taps, got ",
                    weight.size(0));
  TORCH_CHECK_VALUE(weight.size(1) == x.size(-1), op, ": weight has ", weight.size(1),
                    " channels but x's last dim is ", x.size(-1));
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ",
                   weight.scalar_type(), " must equal x's dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight is on ", weight.device(),
                    " but x is on ", x.device());
  return view_of(x);
}

int64_t tile_rows(const TimeView& v, int64_t elem) {
  return std::max<int64_t>(1, std::min(v.rows, kTileBytes / std::max<int64_t>(1, v.channels * elem)));
}

// float32: each output vector of 8 channels sums its taps in a register and is written
// once, where the loop below adds every tap into the output row in memory (a load and a
// store per tap and vector: 2x slower at the basin model's C = 40). The same terms in the
// same order (the bias, then k = 0, 1, ...): the same bits. Channels past the last multiple
// of 8 sum in a scalar.
FASTCORE_INLINE void conv_tile_float(const float* x, const float* w, const float* bias,
                                     float* out, const TimeView& v, int64_t taps, bool reverse,
                                     int64_t o, int64_t r0, int64_t r1) {
  const int64_t C = v.channels, stride = v.rows * C;
  const int64_t step = reverse ? stride : -stride;  // x[t -+ k] = x[t] + k * step
  const float* xo = x + o * v.steps * stride + r0 * C;
  float* oo = out + o * v.steps * stride + r0 * C;
  for (int64_t t = 0; t < v.steps; ++t) {
    const int64_t kk = std::min(taps, reverse ? v.steps - t : t + 1);  // taps inside [0, T)
    const float* xt = xo + t * stride;
    float* dst = oo + t * stride;
    for (int64_t j = 0; j < (r1 - r0) * C; j += C) {  // j: the row's first element
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) {
        v8 acc = bias ? load8(bias + c) : v8{};
        for (int64_t k = 0; k < kk; ++k) acc += load8(w + k * C + c) * load8(xt + k * step + j + c);
        store8(dst + j + c, acc);
      }
      for (; c < C; ++c) {
        float acc = bias ? bias[c] : 0.0f;
        for (int64_t k = 0; k < kk; ++k) acc += w[k * C + c] * xt[k * step + j + c];
        dst[j + c] = acc;
      }
    }
  }
}

// out[o, t, r] = bias[c] + sum_{k < K, 0 <= t -+ k < T} w[k, c] x[o, t -+ k, r] over the
// rows [r0, r1) of one outer index.
template <typename scalar_t>
FASTCORE_SIMD_CLONES void conv_tile(const scalar_t* x, const scalar_t* w, const scalar_t* bias,
                                    scalar_t* out, const TimeView& v, int64_t taps, bool reverse,
                                    int64_t o, int64_t r0, int64_t r1) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    conv_tile_float(x, w, bias, out, v, taps, reverse, o, r0, r1);
    return;
  }
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool widen = !std::is_same_v<acc_t, scalar_t>;
  const int64_t C = v.channels, width = (r1 - r0) * C, stride = v.rows * C;
  std::vector<acc_t> buffer(widen ? width : 0);
  const scalar_t* xo = x + o * v.steps * stride + r0 * C;
  scalar_t* oo = out + o * v.steps * stride + r0 * C;
  for (int64_t t = 0; t < v.steps; ++t) {
    scalar_t* dst = oo + t * stride;
    // float/double accumulate in the output row itself; half types in a float32 buffer
    acc_t* acc = widen ? buffer.data() : reinterpret_cast<acc_t*>(dst);
    for (int64_t r = 0; r < r1 - r0; ++r) {
      acc_t* a = acc + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) a[c] = bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
    }
    for (int64_t k = 0; k < taps; ++k) {
      const int64_t s = reverse ? t + k : t - k;
      if (s < 0 || s >= v.steps) break;
      const scalar_t* xs = xo + s * stride;
      const scalar_t* wk = w + k * C;
      for (int64_t r = 0; r < r1 - r0; ++r) {
        acc_t* a = acc + r * C;
        const scalar_t* xr = xs + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          a[c] += static_cast<acc_t>(wk[c]) * static_cast<acc_t>(xr[c]);
      }
    }
    if constexpr (widen) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<scalar_t>(acc[j]);
    }
  }
}

// float32, M taps k0 .. k0 + M - 1 of one time step t and the 8 channels from c: each tap's
// sum over the tile's rows runs in its own register, row after row, and the M sums advance
// together (the loop below runs one tap at a time, its sum a chain of loads, adds and
// stores through memory, one row's add waiting for the last: ~4x slower at the basin
// model's C = 40, K = 7). Each sum has the same terms in the same order: the same bits.
template <int M>
FASTCORE_INLINE void weight_grad_taps8(const float* gt, const float* xt, int64_t step,
                                       int64_t k0, int64_t end, int64_t C, double* part) {
  v8 acc[M] = {};
  for (int64_t j = 0; j < end; j += C) {  // j: the row's first element (plus c)
    const v8 g = load8(gt + j);
    for_n<M>(M, [&](int64_t m) FASTCORE_LAMBDA_INLINE {
      acc[m] += g * load8(xt + (k0 + m) * step + j);
    });
  }
  for_n<M>(M, [&](int64_t m) FASTCORE_LAMBDA_INLINE {
    for (int l = 0; l < 8; ++l) part[(k0 + m) * C + l] += static_cast<double>(acc[m][l]);
  });
}

// The float32 tile of weight_grad_tile: per time step, the taps in groups of up to 8 over
// vectors of 8 channels (channels past the last multiple of 8 as the loop below does them).
// part[k, c] gains its sums in ascending t for every k, as there.
FASTCORE_INLINE void weight_grad_tile_float(const float* grad, const float* x, double* part,
                                            const TimeView& v, int64_t taps, bool reverse,
                                            int64_t o, int64_t r0, int64_t r1) {
  const int64_t C = v.channels, stride = v.rows * C, end = (r1 - r0) * C;
  const int64_t step = reverse ? stride : -stride;  // x[t -+ k] = x[t] + k * step
  const float* go = grad + o * v.steps * stride + r0 * C;
  const float* xo = x + o * v.steps * stride + r0 * C;
  for (int64_t t = 0; t < v.steps; ++t) {
    const int64_t kk = std::min(taps, reverse ? v.steps - t : t + 1);  // taps inside [0, T)
    const float* gt = go + t * stride;
    const float* xt = xo + t * stride;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
      for (int64_t k0 = 0; k0 < kk; k0 += 8) {
        const float* g = gt + c;
        const float* xc = xt + c;
        double* pc = part + c;
        switch (std::min<int64_t>(8, kk - k0)) {
          case 1: weight_grad_taps8<1>(g, xc, step, k0, end, C, pc); break;
          case 2: weight_grad_taps8<2>(g, xc, step, k0, end, C, pc); break;
          case 3: weight_grad_taps8<3>(g, xc, step, k0, end, C, pc); break;
          case 4: weight_grad_taps8<4>(g, xc, step, k0, end, C, pc); break;
          case 5: weight_grad_taps8<5>(g, xc, step, k0, end, C, pc); break;
          case 6: weight_grad_taps8<6>(g, xc, step, k0, end, C, pc); break;
          case 7: weight_grad_taps8<7>(g, xc, step, k0, end, C, pc); break;
          default: weight_grad_taps8<8>(g, xc, step, k0, end, C, pc); break;
        }
      }
    }
    for (; c < C; ++c) {
      for (int64_t k = 0; k < kk; ++k) {
        float acc = 0.0f;
        for (int64_t j = c; j < end; j += C) acc += gt[j] * xt[k * step + j];
        part[k * C + c] += static_cast<double>(acc);
      }
    }
  }
}

// part[k, c] = sum over t and the tile's rows of grad[o, t, r] x[o, t -+ k, r], in float64.
template <typename scalar_t>
FASTCORE_SIMD_CLONES void weight_grad_tile(const scalar_t* grad, const scalar_t* x, double* part,
                                           const TimeView& v, int64_t taps, bool reverse, int64_t o,
                                           int64_t r0, int64_t r1) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    weight_grad_tile_float(grad, x, part, v, taps, reverse, o, r0, r1);
    return;
  }
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = v.channels, stride = v.rows * C;
  const scalar_t* go = grad + o * v.steps * stride + r0 * C;
  const scalar_t* xo = x + o * v.steps * stride + r0 * C;
  std::vector<acc_t> acc(C);
  for (int64_t k = 0; k < taps && k < v.steps; ++k) {
    for (int64_t t = 0; t < v.steps; ++t) {
      const int64_t s = reverse ? t + k : t - k;
      if (s < 0 || s >= v.steps) continue;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const scalar_t* gt = go + t * stride;
      const scalar_t* xs = xo + s * stride;
      for (int64_t r = 0; r < r1 - r0; ++r) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          acc[c] += static_cast<acc_t>(gt[r * C + c]) * static_cast<acc_t>(xs[r * C + c]);
      }
      for (int64_t c = 0; c < C; ++c) part[k * C + c] += static_cast<double>(acc[c]);
    }
  }
}

at::Tensor time_conv_cpu(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool reverse) {
  const TimeView v = check_time_conv(x, weight, "time_conv");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == v.channels,
                      "time_conv: bias must be [C=", v.channels, "], got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "time_conv: bias dtype ",
                     bias->scalar_type(), " must equal x's dtype ", x.scalar_type());
  }
  auto out = empty_output(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const auto x_c = x.contiguous();
  const auto w_c = weight.contiguous();
  std::optional<at::Tensor> b_c;
  if (bias.has_value()) b_c = bias->contiguous();
  const int64_t taps = weight.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "time_conv", [&] {
    const int64_t per = tile_rows(v, sizeof(scalar_t));
    const int64_t tiles = (v.rows + per - 1) / per;
    const scalar_t* xp = x_c.const_data_ptr<scalar_t>();
    const scalar_t* wp = w_c.const_data_ptr<scalar_t>();
    const scalar_t* bp = b_c ? b_c->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, v.outer * tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t o = i / tiles, r0 = (i % tiles) * per;
        conv_tile(xp, wp, bp, op, v, taps, reverse, o, r0, std::min(v.rows, r0 + per));
      }
    });
  });
  return out;
}

at::Tensor time_conv_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& x,
                                     int64_t kernel_size, bool reverse) {
  constexpr const char* op = "time_conv_weight_grad";
  TORCH_CHECK_VALUE(kernel_size >= 1, op, ": kernel_size must be >= 1, got ", kernel_size);
  TORCH_CHECK_VALUE(x.dim() >= 3, op, ": x must be [B, T, ..., C], got shape ", x.sizes());
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), op, ": grad shape ", grad.sizes(),
                    " must equal x's shape ", x.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
                   " must equal x's dtype ", x.scalar_type());
  const TimeView v = view_of(x);
  auto out = zeros_output({kernel_size, v.channels}, x.options());
  if (x.numel() == 0) return out;
  const auto g_c = grad.contiguous();
  const auto x_c = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    const int64_t per = tile_rows(v, sizeof(scalar_t));
    const int64_t tiles = (v.rows + per - 1) / per;
    const int64_t count = v.outer * tiles, size = kernel_size * v.channels;
    std::vector<double> parts(count * size, 0.0);  // one partial per tile: a fixed order
    const scalar_t* gp = g_c.const_data_ptr<scalar_t>();
    const scalar_t* xp = x_c.const_data_ptr<scalar_t>();
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t o = i / tiles, r0 = (i % tiles) * per;
        weight_grad_tile(gp, xp, parts.data() + i * size, v, kernel_size, reverse, o, r0,
                         std::min(v.rows, r0 + per));
      }
    });
    std::vector<double> total(size, 0.0);
    for (int64_t i = 0; i < count; ++i)
      for (int64_t j = 0; j < size; ++j) total[j] += parts[i * size + j];
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (int64_t j = 0; j < size; ++j) dst[j] = static_cast<scalar_t>(total[j]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CPU, m) {
  m.impl("time_conv", &time_conv_cpu);
  m.impl("time_conv_weight_grad", &time_conv_weight_grad_cpu);
}

}  // namespace fastcore
