// CPU kernels of the per-feature residual MLP of the basin model, fused:
//   out[m, f] = h[m, f] + gelu(h[m, f] @ W1[f] + b1[f]) @ W2[f] + b2[f]
// with the exact (erf) GELU, and its backward (the hidden activations are recomputed from
// h, nothing is saved). h, out: [M, F, H] (every leading dim folded into M); W1 [F, H, K];
// b1 [F, K]; W2 [F, K, H]; b2 [F, H]. Each (row, feature) goes through both layers in
// registers: one pass over h forward and one over grad and h backward, where the composite
// makes two batched matmuls with layout copies of h and of the hidden activation, the GELU,
// two bias adds and the residual, and autograd as many again backward.
//
// Parameter gradients: each fixed tile of rows sums its rows in order (in the accumulation
// type) into a float64 partial, added in tile order (rowwise.h): results are
// bit-identical whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "rowwise.h"
#include "../utils.h"
#include "simd.h"

namespace fastcore {
namespace {

struct Dims {
  int64_t rows, features, hidden, inner;  // M, F, H, K
};

// b2: null for the backward (which does not read it).
Dims check_feature_mlp(const at::Tensor& h, const at::Tensor& w1, const at::Tensor& b1,
                       const at::Tensor& w2, const at::Tensor* b2, const char* op) {
  TORCH_CHECK_VALUE(h.dim() >= 2, op, ": h must be [..., F, H], got shape ", h.sizes());
  const int64_t F = h.size(-2), H = h.size(-1);
  TORCH_CHECK_VALUE(w1.dim() == 3 && w1.size(0) == F && w1.size(1) == H, op,
                    ": w1 must be [F=", F, ", H=", H, ", K], got shape ", w1.sizes());
  const int64_t K = w1.size(2);
  TORCH_CHECK_VALUE(b1.dim() == 2 && b1.size(0) == F && b1.size(1) == K, op, ": b1 must be [F=",
                    F, ", K=", K, "], got shape ", b1.sizes());
  TORCH_CHECK_VALUE(w2.dim() == 3 && w2.size(0) == F && w2.size(1) == K && w2.size(2) == H, op,
                    ": w2 must be [F=", F, ", K=", K, ", H=", H, "], got shape ", w2.sizes());
  TORCH_CHECK_VALUE(!b2 || (b2->dim() == 2 && b2->size(0) == F && b2->size(1) == H), op,
                    ": b2 must be [F=", F, ", H=", H, "], got shape ", b2 ? b2->sizes() : h.sizes());
  for (const auto* t : {&w1, &b1, &w2, b2 ? b2 : &w2}) {
    TORCH_CHECK_TYPE(t->scalar_type() == h.scalar_type(), op, ": every tensor must have h's dtype ",
                     h.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == h.device(), op, ": every tensor must be on h's device ",
                      h.device(), ", got ", t->device());
  }
  const int64_t per_row = F * H;
  return {per_row ? h.numel() / per_row : 0, F, H, K};
}

// exp(x) for x <= 0 without branches or calls, so that loops over it vectorise (Cephes'
// range reduction and polynomial; relative error ~2e-7). Arguments below -87 give exp(-87)
// ~ 1.6e-38 (the GELU multiplies it by at most |z| / 2.5 next to terms of order 1).
// exp_scaled holds the arithmetic, written once for a float and for eight (v8): x already
// clamped to >= -87, it returns p and n with exp(x) = p * 2^n.
template <typename T>
FASTCORE_INLINE T exp_scaled(T x, T& n) {
  n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const T r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

FASTCORE_INLINE float exp_nonpositive(float x) {
  // x = max(x, -87) through an integer mask: GCC leaves a float select or std::max
  // here as a branch (trapping compares) and the loop unvectorised
  const int32_t keep = -static_cast<int32_t>(x >= -87.0f);
  x = std::bit_cast<float>((std::bit_cast<int32_t>(x) & keep) |
                           (std::bit_cast<int32_t>(-87.0f) & ~keep));
  float n;
  const float p = exp_scaled(x, n);
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

template <int L>
FASTCORE_INLINE vec<L> exp_nonpositive_lanes(vec<L> x) {
  using vi = typename Lanes<L>::i;
  const vi keep = x >= -87.0f;  // lanes: -1 where x >= -87
  x = reinterpret_cast<vec<L>>((reinterpret_cast<vi>(x) & keep) |
                               (std::bit_cast<int32_t>(-87.0f) & ~keep));
  vec<L> n;
  const vec<L> p = exp_scaled(x, n);
  return p * reinterpret_cast<vec<L>>((__builtin_convertvector(n, vi) + 127) << 23);
}

// The exact GELU and its derivative: gelu(z) = z Phi(z), gelu'(z) = Phi(z) + z phi(z).
// float: erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, the formula of
// PyTorch's own vectorised CPU erf) on the exp above, both vectorisable; double: libm.
// erf_abs_of is |erf(a)| given t = 1 / (1 + p |a|) and e = exp(-a^2), for a float or a v8.
template <typename T>
FASTCORE_INLINE T erf_abs_of(T t, T e) {
  T q = T{} + 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  return 1.0f - q * t * e;
}

FASTCORE_INLINE void gelu_and_slope(float z, float& value, float& slope) {
  const float a = z * 0.70710678118654752f;
  const float e = exp_nonpositive(-a * a);  // exp(-z^2 / 2)
  const float t = 1.0f / (1.0f + 0.3275911f * std::fabs(a));
  const float cdf = 0.5f + 0.5f * std::copysign(erf_abs_of(t, e), a);
  value = z * cdf;
  slope = cdf + z * 0.39894228040143268f * e;
}

FASTCORE_INLINE void gelu_and_slope(double z, double& value, double& slope) {
  const double cdf = 0.5 * (1.0 + std::erf(z * 0.70710678118654752));
  value = z * cdf;
  slope = cdf + z * 0.39894228040143268 * std::exp(-0.5 * z * z);
}

// The float GELU on L values at once, operation for operation (the float kernels'
// loops above are the scalar one, vectorised by the compiler): the same bits.
template <bool SLOPE, int L>
FASTCORE_INLINE void gelu_and_slope_lanes(vec<L> z, vec<L>& value, vec<L>& slope) {
  using v = vec<L>;
  using vi = typename Lanes<L>::i;
  constexpr int32_t kSign = std::bit_cast<int32_t>(-0.0f);
  const v a = z * 0.70710678118654752f;
  const v e = exp_nonpositive_lanes<L>(-a * a);
  const v abs_a = reinterpret_cast<v>(reinterpret_cast<vi>(a) & ~kSign);
  const v t = 1.0f / (1.0f + 0.3275911f * abs_a);
  const v erf_abs = erf_abs_of(t, e);
  const v erf = reinterpret_cast<v>((reinterpret_cast<vi>(erf_abs) & ~kSign) |
                                    (reinterpret_cast<vi>(a) & kSign));  // copysign
  const v cdf = 0.5f + 0.5f * erf;
  value = z * cdf;
  if constexpr (SLOPE) slope = cdf + z * 0.39894228040143268f * e;
}

template <typename acc_t>
struct Weights {
  const acc_t *w1, *b1, *w2, *b2;  // [F, H, K], [F, K], [F, K, H], [F, H]
  const acc_t *w1t, *w2t;          // [F, K, H], [F, H, K] (backward only)
};

// u = gelu(b1 + h_r @ W1) for the R rows at offsets at[r] (u: [R, K]), and with SLOPE
// slope = gelu'(.) next to it.
template <int R, int HC, int KC, bool SLOPE, typename acc_t, typename scalar_t>
FASTCORE_INLINE void hidden_layer(const scalar_t* h, const int64_t* at, const acc_t* W1,
                                  const acc_t* b1, acc_t* u, acc_t* slope, int64_t H,
                                  int64_t K) {
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) u[r * K + k] = b1[k];
  });
  rows_times<R, HC>(rows_of<acc_t>(h, at), W1, u, H, K);
#pragma omp simd
  for (int64_t e = 0; e < R * K; ++e) {
    acc_t v, s;
    gelu_and_slope(u[e], v, s);
    u[e] = v;
    if constexpr (SLOPE) slope[e] = s;
  }
}

// Which kernels take the vector path below.
template <typename scalar_t, int HC, int KC>
constexpr bool kVectors8 = std::is_same_v<scalar_t, float> && HC == 8 && KC > 0 && KC % 8 == 0;

// The vector kernels with 16 lanes along K (AVX-512 registers): K a multiple of 16, on a CPU
// with x86-64-v4 (simd.h, cpu_has_v4). Half the multiply-add and GELU instructions
// of the first layer and of the backward's K-wide terms; the same bits as the 8-lane ones
// (each lane does the same arithmetic). A 2-core Xeon VM, fine level B16 T21 N215 F5 H8
// K16: docs/benchmarks.md, "feature_mlp on AVX-512".
template <typename scalar_t, int HC, int KC>
constexpr bool kWide = kVectors8<scalar_t, HC, KC> && KC % 16 == 0;

// float32 with H = 8 and K = L KV: a block's values held as vectors in registers (one row
// of H, or L of a row's K), the matmuls as broadcast-times-row multiply-adds. Every
// value is the same sum, in the same order, as in the general loops below (which spill
// their block arrays to the stack between multiply-adds).
// acc[r][v] += sum_j t[at[r] + j] M[j, Lv:Lv+L] over the 8 values j of each row, in order
// (M: [8, L KV]): the first layer (h times W1) and the backward's W2 g.
template <int R, int KV, int L>
FASTCORE_INLINE void add_rows_times8(const float* t, const int64_t* at, const float* M,
                                     vec<L> (&acc)[R][KV]) {
  for_n<8>(8, [&](int64_t j) FASTCORE_LAMBDA_INLINE {
    vec<L> m[KV];
    for_n<KV>(KV, [&](int64_t v) FASTCORE_LAMBDA_INLINE {
      m[v] = load_lanes<L>(M + (j * KV + v) * L);
    });
    for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
      const float x = t[at[r] + j];
      for_n<KV>(KV, [&](int64_t v) FASTCORE_LAMBDA_INLINE { acc[r][v] += x * m[v]; });
    });
  });
}

// z[r][v] = b1[Lv:Lv+L] + sum_j h[r, j] W1[j, Lv:Lv+L], j in order.
template <int R, int KV, int L>
FASTCORE_INLINE void hidden8(const float* h, const int64_t* at, const float* W1, const float* b1,
                             vec<L> (&z)[R][KV]) {
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    for_n<KV>(KV, [&](int64_t v) FASTCORE_LAMBDA_INLINE { z[r][v] = load_lanes<L>(b1 + L * v); });
  });
  add_rows_times8<R, KV, L>(h, at, W1, z);
}

template <int R, int KV, int L>
FASTCORE_INLINE void forward_block8(const float* h, float* out, const int64_t* at,
                                    const Weights<float>& w, int64_t f) {
  constexpr int K = L * KV;
  vec<L> z[R][KV];
  hidden8<R, KV, L>(h, at, w.w1 + f * 8 * K, w.b1 + f * K, z);
  alignas(64) float u[R][K];  // read back one value at a time (broadcasts)
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    for_n<KV>(KV, [&](int64_t v) FASTCORE_LAMBDA_INLINE {
      vec<L> value, unused;
      gelu_and_slope_lanes<false, L>(z[r][v], value, unused);
      store_lanes<L>(u[r] + L * v, value);
    });
  });
  read_back_from_memory(u);
  const float* W2 = w.w2 + f * K * 8;
  const v8 b2 = load8(w.b2 + f * 8);
  v8 o[R];
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE { o[r] = load8(h + at[r]) + b2; });
  for_n<K>(K, [&](int64_t k) FASTCORE_LAMBDA_INLINE {
    const v8 row = load8(W2 + k * 8);
    for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE { o[r] += u[r][k] * row; });
  });
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE { store8(out + at[r], o[r]); });
}

template <int R, int HC, int KC, bool Wide, typename acc_t, typename scalar_t>
FASTCORE_INLINE void forward_block(const scalar_t* h, scalar_t* out, const int64_t* at,
                                   const Weights<acc_t>& w, int64_t f, acc_t* scratch,
                                   int64_t H_, int64_t K_) {
  if constexpr (kVectors8<scalar_t, HC, KC>) {
    constexpr int L = Wide ? 16 : 8;  // lanes along K
    forward_block8<R, KC / L, L>(h, out, at, w, f);
    return;
  }
  const int64_t H = HC > 0 ? HC : H_, K = KC > 0 ? KC : K_;
  BlockArrays<(HC > 0 ? R * (KC + HC) : 0), acc_t> arrays;
  acc_t* u = arrays.get(scratch);
  acc_t* o = u + R * K;
  hidden_layer<R, HC, KC, false>(h, at, w.w1 + f * H * K, w.b1 + f * K, u, u, H, K);
  const acc_t* W2 = w.w2 + f * K * H;
  const acc_t* b2 = w.b2 + f * H;
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) o[r * H + i] = static_cast<acc_t>(h[at[r] + i]) + b2[i];
  });
  rows_times<R, KC>(block_of(u, K), W2, o, K, H);
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) out[at[r] + i] = static_cast<scalar_t>(o[r * H + i]);
  });
}

template <typename scalar_t, int HC, int KC, bool Wide>
FASTCORE_INLINE void forward_rows_of(const scalar_t* h,
                                     const Weights<at::opmath_type<scalar_t>>& w, scalar_t* out,
                                     const Dims& d, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int R = block_rows<KC, Wide ? 16 : 8>();
  std::vector<acc_t> scratch(HC > 0 ? 0 : d.inner + d.hidden);  // runtime widths only
  for_row_blocks<R>(d.features, d.hidden, begin, end,
                    [&](auto rows, const int64_t* at, int64_t f) FASTCORE_LAMBDA_INLINE {
                      forward_block<decltype(rows)::value, HC, KC, Wide>(
                          h, out, at, w, f, scratch.data(), d.hidden, d.inner);
                    }, h);
}

template <typename scalar_t, int HC, int KC>
FASTCORE_SIMD_CLONES void forward_rows(const scalar_t* h, const Weights<at::opmath_type<scalar_t>>& w,
                                       scalar_t* out, const Dims& d, int64_t begin, int64_t end) {
  forward_rows_of<scalar_t, HC, KC, false>(h, w, out, d, begin, end);
}

template <typename scalar_t, int HC, int KC>
FASTCORE_TARGET_V4 void forward_rows_wide(const scalar_t* h,
                                          const Weights<at::opmath_type<scalar_t>>& w,
                                          scalar_t* out, const Dims& d, int64_t begin,
                                          int64_t end) {
  forward_rows_of<scalar_t, HC, KC, true>(h, w, out, d, begin, end);
}

// The parameter gradients of a tile, in acc_t: [dW1 (F H K) | db1 (F K) | dW2 (F K H) |
// db2 (F H)].
template <typename acc_t>
struct Grads {
  acc_t *w1, *b1, *w2, *b2;
};

// The backward of forward_block8, with the parameter gradients added into p row by row in
// order, as backward_block does.
template <int R, int KV, int L>
FASTCORE_INLINE void backward_block8(const float* grad, const float* h, float* dh,
                                     const int64_t* at, const Weights<float>& w,
                                     const Grads<float>& p, int64_t f) {
  constexpr int K = L * KV;
  vec<L> z[R][KV];
  hidden8<R, KV, L>(h, at, w.w1 + f * 8 * K, w.b1 + f * K, z);
  alignas(64) float u[R][K];  // gelu(z), read back one value at a time (dW2)
  vec<L> slope[R][KV];
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    for_n<KV>(KV, [&](int64_t v) FASTCORE_LAMBDA_INLINE {
      vec<L> value;
      gelu_and_slope_lanes<true, L>(z[r][v], value, slope[r][v]);
      store_lanes<L>(u[r] + L * v, value);
    });
  });
  v8 g[R];
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE { g[r] = load8(grad + at[r]); });
  // dz = (W2 g) * gelu'(z), through W2's transpose [8, K], i in order
  const float* W2t = w.w2t + f * 8 * K;
  vec<L> dz[R][KV];
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    for_n<KV>(KV, [&](int64_t v) FASTCORE_LAMBDA_INLINE { dz[r][v] = vec<L>{}; });
  });
  add_rows_times8<R, KV, L>(grad, at, W2t, dz);
  alignas(64) float dzs[R][K];  // dz, read back one value at a time (dh)
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    for_n<KV>(KV, [&](int64_t v) FASTCORE_LAMBDA_INLINE {
      dz[r][v] *= slope[r][v];
      store_lanes<L>(dzs[r] + L * v, dz[r][v]);
    });
  });
  read_back_from_memory(u);
  read_back_from_memory(dzs);
  // dh = g + W1 dz through W1's transpose [K, 8], k in order; dW2[k] += u[., k] g, rows in order
  const float* W1t = w.w1t + f * K * 8;
  float* dW2 = p.w2 + f * K * 8;
  v8 o[R];
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE { o[r] = g[r]; });
  for_n<K>(K, [&](int64_t k) FASTCORE_LAMBDA_INLINE {
    const v8 row = load8(W1t + k * 8);
    v8 acc = load8(dW2 + k * 8);
    for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
      o[r] += dzs[r][k] * row;
      acc += u[r][k] * g[r];
    });
    store8(dW2 + k * 8, acc);
  });
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE { store8(dh + at[r], o[r]); });
  // dW1[j] += h[., j] dz, db1 += dz, db2 += g, rows in order
  float* dW1 = p.w1 + f * 8 * K;
  for_n<8>(8, [&](int64_t j) FASTCORE_LAMBDA_INLINE {
    for_n<KV>(KV, [&](int64_t v) FASTCORE_LAMBDA_INLINE {
      vec<L> acc = load_lanes<L>(dW1 + j * K + L * v);
      for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE { acc += h[at[r] + j] * dz[r][v]; });
      store_lanes<L>(dW1 + j * K + L * v, acc);
    });
  });
  vec<L> db1[KV];
  v8 db2 = load8(p.b2 + f * 8);
  for_n<KV>(KV, [&](int64_t v) FASTCORE_LAMBDA_INLINE {
    db1[v] = load_lanes<L>(p.b1 + f * K + L * v);
  });
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    for_n<KV>(KV, [&](int64_t v) FASTCORE_LAMBDA_INLINE { db1[v] += dz[r][v]; });
    db2 += g[r];
  });
  for_n<KV>(KV, [&](int64_t v) FASTCORE_LAMBDA_INLINE {
    store_lanes<L>(p.b1 + f * K + L * v, db1[v]);
  });
  store8(p.b2 + f * 8, db2);
}

template <int R, int HC, int KC, bool Wide, typename acc_t, typename scalar_t>
FASTCORE_INLINE void backward_block(const scalar_t* grad, const scalar_t* h, scalar_t* dh,
                                    const int64_t* at, const Weights<acc_t>& w,
                                    const Grads<acc_t>& p, int64_t f, acc_t* scratch,
                                    int64_t H_, int64_t K_) {
  if constexpr (kVectors8<scalar_t, HC, KC>) {
    constexpr int L = Wide ? 16 : 8;  // lanes along K
    backward_block8<R, KC / L, L>(grad, h, dh, at, w, p, f);
    return;
  }
  const int64_t H = HC > 0 ? HC : H_, K = KC > 0 ? KC : K_;
  BlockArrays<(HC > 0 ? R * (3 * KC + 2 * HC) : 0), acc_t> arrays;
  acc_t* u = arrays.get(scratch);
  acc_t* slope = u + R * K;
  acc_t* dz = slope + R * K;
  acc_t* g = dz + R * K;
  acc_t* o = g + R * H;
  hidden_layer<R, HC, KC, true>(h, at, w.w1 + f * H * K, w.b1 + f * K, u, slope, H, K);
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) g[r * H + i] = static_cast<acc_t>(grad[at[r] + i]);
  });
  // dz = (W2 g) * gelu'(z), through W2's transpose [H, K]
  const acc_t* W2t = w.w2t + f * H * K;
#pragma omp simd
  for (int64_t e = 0; e < R * K; ++e) dz[e] = 0;
  rows_times<R, HC>(block_of(g, H), W2t, dz, H, K);
#pragma omp simd
  for (int64_t e = 0; e < R * K; ++e) dz[e] *= slope[e];
  // dh = g + W1 dz through W1's transpose [K, H]; dW2 += u g^T
  const acc_t* W1t = w.w1t + f * K * H;
  acc_t* dW2 = p.w2 + f * K * H;
#pragma omp simd
  for (int64_t e = 0; e < R * H; ++e) o[e] = g[e];
  rows_times<R, KC>(block_of(dz, K), W1t, o, K, H);
  add_outer<R, KC>(block_of(u, K), g, dW2, K, H);
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) dh[at[r] + i] = static_cast<scalar_t>(o[r * H + i]);
  });
  // dW1 += h dz^T, db1 += dz, db2 += g
  acc_t* dW1 = p.w1 + f * H * K;
  add_outer<R, HC>(rows_of<acc_t>(h, at), dz, dW1, H, K);
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) p.b1[f * K + k] += dz[r * K + k];
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) p.b2[f * H + i] += g[r * H + i];
  });
}

// Rows [begin, end): dh (the residual's grad included), and the parameter gradients added
// into part (float64), laid out as Grads.
template <typename scalar_t, int HC, int KC, bool Wide>
FASTCORE_INLINE void backward_rows_of(const scalar_t* grad, const scalar_t* h,
                                      const Weights<at::opmath_type<scalar_t>>& w, scalar_t* dh,
                                      double* part, const Dims& d, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  // the vector kernels keep fewer rows in flight: at 4 rows of K = 16 their arrays spill
  // (AVX-512's 32 registers hold more: the wide kernels take 6 at K = 16, 3 at K = 32)
  constexpr int R = kVectors8<scalar_t, HC, KC> ? block_rows<KC, Wide ? 12 : 4>()
                                                : block_rows<KC, 8>();
  const int64_t F = d.features, H = d.hidden, K = d.inner;
  // the tile's parameter gradients in acc_t, added into the float64 partial at the end
  const int64_t size = F * (2 * H * K + K + H);
  std::vector<acc_t> local(size, acc_t(0));
  acc_t* base = local.data();
  const Grads<acc_t> p{base, base + F * H * K, base + F * (H * K + K), base + F * (2 * H * K + K)};
  std::vector<acc_t> scratch(HC > 0 ? 0 : 3 * K + 2 * H);  // runtime widths only
  for_row_blocks<R>(F, H, begin, end,
                    [&](auto rows, const int64_t* at, int64_t f) FASTCORE_LAMBDA_INLINE {
                      backward_block<decltype(rows)::value, HC, KC, Wide>(
                          grad, h, dh, at, w, p, f, scratch.data(), H, K);
                    }, grad, h);
  for (int64_t j = 0; j < size; ++j) part[j] += static_cast<double>(local[j]);
}

template <typename scalar_t, int HC, int KC>
FASTCORE_SIMD_CLONES void backward_rows(const scalar_t* grad, const scalar_t* h,
                                        const Weights<at::opmath_type<scalar_t>>& w,
                                        scalar_t* dh, double* part, const Dims& d, int64_t begin,
                                        int64_t end) {
  backward_rows_of<scalar_t, HC, KC, false>(grad, h, w, dh, part, d, begin, end);
}

template <typename scalar_t, int HC, int KC>
FASTCORE_TARGET_V4 void backward_rows_wide(const scalar_t* grad, const scalar_t* h,
                                           const Weights<at::opmath_type<scalar_t>>& w,
                                           scalar_t* dh, double* part, const Dims& d,
                                           int64_t begin, int64_t end) {
  backward_rows_of<scalar_t, HC, KC, true>(grad, h, w, dh, part, d, begin, end);
}

// The kernels with H and K fixed at compile time for the common float32 widths (K = 2H or
// 4H; unrolled, vectorised); every other case (and dtype) runs the general loops.
template <typename scalar_t, typename Fn>
void with_widths(int64_t H, int64_t K, Fn&& fn) {
  using C = std::integral_constant<int, 0>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    auto pick = [&](auto hc) {
      constexpr int h = decltype(hc)::value;
      if (H != h) return false;
      if (K == 2 * h) fn(hc, std::integral_constant<int, 2 * h>{});
      else if (K == 4 * h) fn(hc, std::integral_constant<int, 4 * h>{});
      else fn(C{}, C{});
      return true;
    };
    if (pick(std::integral_constant<int, 8>{}) || pick(std::integral_constant<int, 16>{})) return;
  }
  fn(C{}, C{});
}

at::Tensor feature_mlp_cpu(const at::Tensor& h, const at::Tensor& w1, const at::Tensor& b1,
                           const at::Tensor& w2, const at::Tensor& b2) {
  const Dims d = check_feature_mlp(h, w1, b1, w2, &b2, "feature_mlp");
  auto out = empty_output(h.sizes(), h.options());
  if (out.numel() == 0) return out;
  const auto h_c = h.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "feature_mlp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto W1 = to_acc<acc_t, scalar_t>(w1);
    const auto B1 = to_acc<acc_t, scalar_t>(b1);
    const auto W2 = to_acc<acc_t, scalar_t>(w2);
    const auto B2 = to_acc<acc_t, scalar_t>(b2);
    const Weights<acc_t> w{W1.data(), B1.data(), W2.data(), B2.data(), nullptr, nullptr};
    const int64_t work = std::max<int64_t>(1, d.features * d.hidden * d.inner);
    const int64_t grain = std::max<int64_t>(1, 32768 / work);
    with_widths<scalar_t>(d.hidden, d.inner, [&](auto hc, auto kc) {
      constexpr int HC = decltype(hc)::value, KC = decltype(kc)::value;
      const scalar_t* hp = h_c.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, d.rows, grain, [&](int64_t begin, int64_t end) {
        if constexpr (kWide<scalar_t, HC, KC>) {
          if (cpu_has_v4()) return forward_rows_wide<scalar_t, HC, KC>(hp, w, op, d, begin, end);
        }
        forward_rows<scalar_t, HC, KC>(hp, w, op, d, begin, end);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_mlp_backward_cpu(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2) {
  constexpr const char* op = "feature_mlp_backward";
  const Dims d = check_feature_mlp(h, w1, b1, w2, nullptr, op);
  TORCH_CHECK_VALUE(grad.sizes() == h.sizes(), op, ": grad shape ", grad.sizes(),
                    " must equal h's ", h.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == h.scalar_type(), op, ": grad dtype ",
                   grad.scalar_type(), " must equal h's ", h.scalar_type());
  const int64_t F = d.features, H = d.hidden, K = d.inner;
  auto dh = empty_output(h.sizes(), h.options());
  auto dw1 = zeros_output(w1.sizes(), h.options());
  auto db1 = zeros_output(b1.sizes(), h.options());
  auto dw2 = zeros_output(w2.sizes(), h.options());
  auto db2 = zeros_output({F, H}, h.options());
  if (d.rows == 0 || F * H == 0) return {dh, dw1, db1, dw2, db2};
  const auto g_c = grad.contiguous(), h_c = h.contiguous();
  TilePartials partials(d.rows, F * (2 * H * K + K + H));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto W1 = to_acc<acc_t, scalar_t>(w1);
    const auto B1 = to_acc<acc_t, scalar_t>(b1);
    const auto W2 = to_acc<acc_t, scalar_t>(w2);
    const auto W1t = transposed(W1, F, H, K);
    const auto W2t = transposed(W2, F, K, H);
    const Weights<acc_t> w{W1.data(), B1.data(), W2.data(), nullptr, W1t.data(), W2t.data()};
    with_widths<scalar_t>(H, K, [&](auto hc, auto kc) {
      constexpr int HC = decltype(hc)::value, KC = decltype(kc)::value;
      const scalar_t* gp = g_c.const_data_ptr<scalar_t>();
      const scalar_t* hp = h_c.const_data_ptr<scalar_t>();
      scalar_t* dp = dh.mutable_data_ptr<scalar_t>();
      partials.run([&](int64_t begin, int64_t end, double* part) {
        if constexpr (kWide<scalar_t, HC, KC>) {
          if (cpu_has_v4())
            return backward_rows_wide<scalar_t, HC, KC>(gp, hp, w, dp, part, d, begin, end);
        }
        backward_rows<scalar_t, HC, KC>(gp, hp, w, dp, part, d, begin, end);
      });
    });
    partials.write<scalar_t>({&dw1, &db1, &dw2, &db2});
  });
  return {dh, dw1, db1, dw2, db2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CPU, m) {
  m.impl("feature_mlp", &feature_mlp_cpu);
  m.impl("feature_mlp_backward", &feature_mlp_backward_cpu);
}

}  // namespace fastcore
