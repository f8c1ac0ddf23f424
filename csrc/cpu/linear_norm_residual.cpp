// CPU kernels of the spatiotemporal block's tail, fused: a linear map per feature, then
// LayerNorm over the hidden width with a per-feature affine, then the residual,
//   out[m, f] = x[m, f] + s * (gamma[f] * norm(h[m, f] @ W[f] + b[f]) + beta[f]),
// and its backward (the statistics are recomputed from h, nothing is saved). h, x, out:
// [M, F, H] (every leading dim folded into M); W [F, H, H]; b, gamma, beta [F, H].
// One pass over h and x forward and one over grad and h backward, where the composite
// makes a dozen (einsum copies, bias, LayerNorm, affine, residual, and their backward).
//
// Parameter gradients: each fixed tile of rows sums its rows in order (in the accumulation
// type) into a float64 partial, added in tile order (rowwise.h): results are bit-identical
// whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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
  int64_t rows, features, hidden;
};

Dims check_linear_norm_residual(const at::Tensor& h, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& beta,
                       const char* op) {
  TORCH_CHECK_VALUE(h.dim() >= 2, op, ": h must be [..., F, H], got shape ", h.sizes());
  const int64_t F = h.size(-2), H = h.size(-1);
  TORCH_CHECK_VALUE(x.sizes() == h.sizes(), op, ": x shape ", x.sizes(), " must equal h's ",
                    h.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(0) == F && weight.size(1) == H &&
                        weight.size(2) == H,
                    op, ": weight must be [F=", F, ", H=", H, ", H], got shape ", weight.sizes());
  for (const auto* t : {&bias, &gamma, &beta}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == F && t->size(1) == H, op,
                      ": bias, gamma and beta must be [F=", F, ", H=", H, "], got shape ",
                      t->sizes());
  }
  for (const auto* t : {&x, &weight, &bias, &gamma, &beta}) {
    TORCH_CHECK_TYPE(t->scalar_type() == h.scalar_type(), op, ": every tensor must have h's dtype ",
                     h.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == h.device(), op, ": every tensor must be on h's device ",
                      h.device(), ", got ", t->device());
  }
  const int64_t per_row = F * H;
  return {per_row ? h.numel() / per_row : 0, F, H};
}

// The parameters in the accumulation type: W [F, H, H], its transpose (backward), b,
// gamma, beta [F, H].
template <typename acc_t>
struct Params {
  const acc_t *w, *wt, *b, *gamma, *beta;
};

// z[r] = b + h_r @ W for the R rows at offsets at[r] (z: [R, H]).
template <int R, int HC, typename acc_t, typename scalar_t>
FASTCORE_INLINE void linear_rows(const scalar_t* h, const int64_t* at, const acc_t* W,
                                 const acc_t* b, acc_t* z, int64_t H) {
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) z[r * H + k] = b[k];
  });
  rows_times<R, HC>(rows_of<acc_t>(h, at), W, z, H, H);
}

// (mean, rstd) of one row z of H values. Ordered: the sums run in index order, as the
// transposed float32 H = 8 kernels below sum each lane (a row's values in order), so that
// a row gives the same bits in a block of 8 rows or on its own (the blocks depend on where
// a thread's range starts: the result must not).
template <bool Ordered, typename acc_t>
FASTCORE_INLINE std::pair<acc_t, acc_t> row_stats(const acc_t* z, int64_t H, double eps) {
  acc_t mean = 0, var = 0;
  if constexpr (Ordered) {
    mean = z[0];
    for (int64_t k = 1; k < H; ++k) mean += z[k];
    mean /= static_cast<acc_t>(H);
    var = (z[0] - mean) * (z[0] - mean);
    for (int64_t k = 1; k < H; ++k) var += (z[k] - mean) * (z[k] - mean);
  } else {
#pragma omp simd reduction(+ : mean)
    for (int64_t k = 0; k < H; ++k) mean += z[k];
    mean /= static_cast<acc_t>(H);
#pragma omp simd reduction(+ : var)
    for (int64_t k = 0; k < H; ++k) var += (z[k] - mean) * (z[k] - mean);
  }
  var /= static_cast<acc_t>(H);
  return {mean, acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps))};
}

// Whether rows of this type and width go through the transposed kernels in blocks of 8 (and
// so every row, in a block or not, through the ordered sums).
template <typename scalar_t, int HC>
constexpr bool kTransposed = std::is_same_v<scalar_t, float> && HC == 8;

template <int R, int HC, typename acc_t, typename scalar_t>
FASTCORE_INLINE void forward_block(const scalar_t* h, const scalar_t* x, scalar_t* out,
                                   const int64_t* at, const Params<acc_t>& p, int64_t f,
                                   acc_t* scratch, int64_t H_, acc_t s, double eps) {
  const int64_t H = HC > 0 ? HC : H_;
  BlockArrays<(HC > 0 ? R * HC : 0), acc_t> arrays;
  acc_t* z = arrays.get(scratch);
  linear_rows<R, HC>(h, at, p.w + f * H * H, p.b + f * H, z, H);
  const acc_t* g = p.gamma + f * H;
  const acc_t* be = p.beta + f * H;
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    const auto [mean, rstd] = row_stats<kTransposed<scalar_t, HC>>(z + r * H, H, eps);
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      const acc_t y = g[k] * (z[r * H + k] - mean) * rstd + be[k];
      out[at[r] + k] = static_cast<scalar_t>(static_cast<acc_t>(x[at[r] + k]) + s * y);
    }
  });
}

// float32 with H = 8, blocks of 8 rows of one feature, "transposed": one vector holds a
// value of all 8 rows, so the LayerNorm statistics are vertical adds and one sqrt per row,
// where the row-at-a-time loops above reduce across the lanes of one vector per statistic.
// The rows are loaded as vectors and transposed (8x8) in registers, the results transposed
// back. The linear map adds the same terms in the same order as linear_rows; the mean and
// variance sum a row's 8 values in index order (the loops above in the compiler's
// vectorised order), so the results may differ from those in the last bits.

// z[k] (lanes: the 8 rows) = b[k] + sum_j h[., j] W[j, k]; returns (mean, rstd) per lane.
FASTCORE_INLINE void normalised8(const float* h, const int64_t* at, const float* W,
                                 const float* b, double eps, v8* z, v8& mean, v8& rstd) {
  v8 hc[8];
  for_n<8>(8, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    hc[r] = load8(h + at[r]);
  });
  transpose8(hc);  // hc[j]: value j of every row
  for_n<8>(8, [&](int64_t k) FASTCORE_LAMBDA_INLINE { z[k] = v8{} + b[k]; });
  for_n<8>(8, [&](int64_t j) FASTCORE_LAMBDA_INLINE {
    for_n<8>(8, [&](int64_t k) FASTCORE_LAMBDA_INLINE { z[k] += hc[j] * W[j * 8 + k]; });
  });
  v8 sum = z[0];
  for_n<7>(7, [&](int64_t k) FASTCORE_LAMBDA_INLINE { sum += z[k + 1]; });
  mean = sum / 8.0f;
  v8 var = (z[0] - mean) * (z[0] - mean);
  for_n<7>(7, [&](int64_t k) FASTCORE_LAMBDA_INLINE {
    var += (z[k + 1] - mean) * (z[k + 1] - mean);
  });
  var /= 8.0f;
  for (int l = 0; l < 8; ++l) rstd[l] = 1.0f / std::sqrt(var[l] + static_cast<float>(eps));
}

FASTCORE_INLINE void forward_block8(const float* h, const float* x, float* out,
                                    const int64_t* at, const Params<float>& p, int64_t f,
                                    float s, double eps) {
  v8 z[8], mean, rstd = {};
  normalised8(h, at, p.w + f * 64, p.b + f * 8, eps, z, mean, rstd);
  const float* g = p.gamma + f * 8;
  const float* be = p.beta + f * 8;
  for_n<8>(8, [&](int64_t k) FASTCORE_LAMBDA_INLINE { z[k] = g[k] * (z[k] - mean) * rstd + be[k]; });
  transpose8(z);  // z[r]: row r's y
  for_n<8>(8, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    const v8 xr = load8(x + at[r]);
    store8(out + at[r], xr + s * z[r]);
  });
}

template <typename scalar_t, int HC>
FASTCORE_SIMD_CLONES void forward_rows(const scalar_t* h, const scalar_t* x,
                                       const Params<at::opmath_type<scalar_t>>& p, scalar_t* out,
                                       const Dims& d, double scale, double eps, int64_t begin,
                                       int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int R = block_rows<HC, 8>();
  std::vector<acc_t> scratch(HC > 0 ? 0 : d.hidden);  // runtime widths only
  const acc_t s = static_cast<acc_t>(scale);
  for_row_blocks<R>(d.features, d.hidden, begin, end,
                    [&](auto rows, const int64_t* at, int64_t f) FASTCORE_LAMBDA_INLINE {
                      if constexpr (kTransposed<scalar_t, HC> && decltype(rows)::value == 8) {
                        forward_block8(h, x, out, at, p, f, s, eps);
                      } else {
                        forward_block<decltype(rows)::value, HC>(
                            h, x, out, at, p, f, scratch.data(), d.hidden, s, eps);
                      }
                    }, h, x);
}

// The parameter gradients of a tile, in acc_t: [dW (F H H) | db | dgamma | dbeta (F H)].
template <typename acc_t>
struct Grads {
  acc_t *w, *b, *gamma, *beta;
};

template <int R, int HC, typename acc_t, typename scalar_t>
FASTCORE_INLINE void backward_block(const scalar_t* grad, const scalar_t* h, scalar_t* dh,
                                    const int64_t* at, const Params<acc_t>& p,
                                    const Grads<acc_t>& q, int64_t f, acc_t* scratch,
                                    int64_t H_, acc_t s, double eps) {
  const int64_t H = HC > 0 ? HC : H_;
  BlockArrays<(HC > 0 ? 3 * R * HC : 0), acc_t> arrays;
  acc_t* z = arrays.get(scratch);  // z, then the normalised n
  acc_t* dz = z + R * H;
  acc_t* o = dz + R * H;
  linear_rows<R, HC>(h, at, p.w + f * H * H, p.b + f * H, z, H);
  const acc_t* gf = p.gamma + f * H;
  acc_t* dgamma = q.gamma + f * H;
  acc_t* dbeta = q.beta + f * H;
  acc_t* db = q.b + f * H;
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    acc_t* zr = z + r * H;
    acc_t* dzr = dz + r * H;
    const auto [mean, rstd] = row_stats<kTransposed<scalar_t, HC>>(zr, H, eps);
    acc_t dn_mean = 0, dn_n_mean = 0;
    auto step = [&](int64_t k) FASTCORE_LAMBDA_INLINE {
      const acc_t n = (zr[k] - mean) * rstd;
      const acc_t dy = s * static_cast<acc_t>(grad[at[r] + k]);
      dgamma[k] += dy * n;
      dbeta[k] += dy;
      const acc_t dn = dy * gf[k];
      dzr[k] = dn;
      dn_mean += dn;
      dn_n_mean += dn * n;
      zr[k] = n;  // keep the normalised value
    };
    if constexpr (kTransposed<scalar_t, HC>) {
      for (int64_t k = 0; k < H; ++k) step(k);  // in index order, as backward_block8
    } else {
#pragma omp simd reduction(+ : dn_mean, dn_n_mean)
      for (int64_t k = 0; k < H; ++k) step(k);
    }
    dn_mean /= static_cast<acc_t>(H);
    dn_n_mean /= static_cast<acc_t>(H);
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      dzr[k] = rstd * (dzr[k] - dn_mean - zr[k] * dn_n_mean);
      db[k] += dzr[k];
    }
  });
  // dh = W dz through W's transpose; dW += h dz^T
  const acc_t* Wt = p.wt + f * H * H;
#pragma omp simd
  for (int64_t e = 0; e < R * H; ++e) o[e] = 0;
  rows_times<R, HC>(block_of(dz, H), Wt, o, H, H);
  for_n<R>(R, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dh[at[r] + j] = static_cast<scalar_t>(o[r * H + j]);
  });
  acc_t* dW = q.w + f * H * H;
  add_outer<R, HC>(rows_of<acc_t>(h, at), dz, dW, H, H);
}

// backward_block for float32, H = 8 and 8 rows, transposed as forward_block8: the
// statistics and the LayerNorm backward with one vector per value of all 8 rows; the
// parameter gradients are added row by row in row order as backward_block adds them (n,
// dy and dz transposed back to rows first), so a row gives the same bits either way.
FASTCORE_INLINE void backward_block8(const float* grad, const float* h, float* dh,
                                     const int64_t* at, const Params<float>& p,
                                     const Grads<float>& q, int64_t f, float s, double eps) {
  v8 z[8], mean, rstd = {};
  normalised8(h, at, p.w + f * 64, p.b + f * 8, eps, z, mean, rstd);
  v8 dy[8];
  for_n<8>(8, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    dy[r] = load8(grad + at[r]);
  });
  transpose8(dy);
  const float* gf = p.gamma + f * 8;
  v8 dz[8], dn_mean = {}, dn_n_mean = {};
  for_n<8>(8, [&](int64_t k) FASTCORE_LAMBDA_INLINE {
    z[k] = (z[k] - mean) * rstd;  // the normalised n
    dy[k] = s * dy[k];
    dz[k] = dy[k] * gf[k];  // dn
    dn_mean += dz[k];
    dn_n_mean += dz[k] * z[k];
  });
  dn_mean /= 8.0f;
  dn_n_mean /= 8.0f;
  for_n<8>(8, [&](int64_t k) FASTCORE_LAMBDA_INLINE {
    dz[k] = rstd * (dz[k] - dn_mean - z[k] * dn_n_mean);
  });
  // dh[., c] = sum_j dz[., j] W[c, j] (W's transpose Wt[j, c]), j in order
  const float* Wt = p.wt + f * 64;
  v8 o[8];
  for_n<8>(8, [&](int64_t c) FASTCORE_LAMBDA_INLINE { o[c] = v8{}; });
  for_n<8>(8, [&](int64_t j) FASTCORE_LAMBDA_INLINE {
    for_n<8>(8, [&](int64_t c) FASTCORE_LAMBDA_INLINE { o[c] += dz[j] * Wt[j * 8 + c]; });
  });
  transpose8(o);
  for_n<8>(8, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    store8(dh + at[r], o[r]);
  });
  // the parameter gradients, rows in order
  transpose8(z);
  transpose8(dy);
  transpose8(dz);
  v8 dgamma = load8(q.gamma + f * 8);
  v8 dbeta = load8(q.beta + f * 8);
  v8 db = load8(q.b + f * 8);
  for_n<8>(8, [&](int64_t r) FASTCORE_LAMBDA_INLINE {
    dgamma += dy[r] * z[r];
    dbeta += dy[r];
  });
  for_n<8>(8, [&](int64_t r) FASTCORE_LAMBDA_INLINE { db += dz[r]; });
  store8(q.gamma + f * 8, dgamma);
  store8(q.beta + f * 8, dbeta);
  store8(q.b + f * 8, db);
  float* dW = q.w + f * 64;
  for_n<8>(8, [&](int64_t j) FASTCORE_LAMBDA_INLINE {
    v8 row = load8(dW + j * 8);
    for_n<8>(8, [&](int64_t r) FASTCORE_LAMBDA_INLINE { row += h[at[r] + j] * dz[r]; });
    store8(dW + j * 8, row);
  });
}

// Rows [begin, end): dh, and the parameter gradients added into part (float64), laid out
// as Grads.
template <typename scalar_t, int HC>
FASTCORE_SIMD_CLONES void backward_rows(const scalar_t* grad, const scalar_t* h,
                                        const Params<at::opmath_type<scalar_t>>& p, scalar_t* dh,
                                        double* part, const Dims& d, double scale, double eps,
                                        int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int R = block_rows<HC, 8>();
  const int64_t F = d.features, H = d.hidden;
  // the tile's parameter gradients in acc_t, added into the float64 partial at the end
  const int64_t size = F * H * H + 3 * F * H;
  std::vector<acc_t> local(size, acc_t(0));
  acc_t* base = local.data();
  const Grads<acc_t> q{base, base + F * H * H, base + F * H * (H + 1), base + F * H * (H + 2)};
  std::vector<acc_t> scratch(HC > 0 ? 0 : 3 * H);  // runtime widths only
  const acc_t s = static_cast<acc_t>(scale);
  for_row_blocks<R>(F, H, begin, end,
                    [&](auto rows, const int64_t* at, int64_t f) FASTCORE_LAMBDA_INLINE {
                      if constexpr (kTransposed<scalar_t, HC> && decltype(rows)::value == 8) {
                        backward_block8(grad, h, dh, at, p, q, f, s, eps);
                      } else {
                        backward_block<decltype(rows)::value, HC>(grad, h, dh, at, p, q, f,
                                                                  scratch.data(), H, s, eps);
                      }
                    }, grad, h);
  for (int64_t j = 0; j < size; ++j) part[j] += static_cast<double>(local[j]);
}

// The kernels with H fixed at compile time for the common float32 widths (unrolled,
// vectorised, the block's arrays in registers); every other case runs the general loops.
template <typename scalar_t, typename Fn>
void with_hidden(int64_t hidden, Fn&& fn) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    switch (hidden) {
      case 8: return fn(std::integral_constant<int, 8>{});
      case 16: return fn(std::integral_constant<int, 16>{});
      case 32: return fn(std::integral_constant<int, 32>{});
    }
  }
  fn(std::integral_constant<int, 0>{});
}

at::Tensor linear_norm_residual_cpu(const at::Tensor& h, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& bias,
                                    const at::Tensor& gamma, const at::Tensor& beta,
                                    double res_scale, double eps) {
  const Dims d = check_linear_norm_residual(h, x, weight, bias, gamma, beta, "linear_norm_residual");
  auto out = empty_output(h.sizes(), h.options());
  if (out.numel() == 0) return out;
  const auto h_c = h.contiguous(), x_c = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "linear_norm_residual", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto W = to_acc<acc_t, scalar_t>(weight), B = to_acc<acc_t, scalar_t>(bias);
    const auto G = to_acc<acc_t, scalar_t>(gamma), Be = to_acc<acc_t, scalar_t>(beta);
    const Params<acc_t> p{W.data(), nullptr, B.data(), G.data(), Be.data()};
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, d.features * d.hidden));
    with_hidden<scalar_t>(d.hidden, [&](auto hc) {
      at::parallel_for(0, d.rows, grain, [&](int64_t begin, int64_t end) {
        forward_rows<scalar_t, decltype(hc)::value>(h_c.const_data_ptr<scalar_t>(),
                                                    x_c.const_data_ptr<scalar_t>(), p,
                                                    out.mutable_data_ptr<scalar_t>(), d,
                                                    res_scale, eps, begin, end);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_norm_residual_backward_cpu(const at::Tensor& grad, const at::Tensor& h,
                                  const at::Tensor& weight, const at::Tensor& bias,
                                  const at::Tensor& gamma, double res_scale, double eps) {
  constexpr const char* op = "linear_norm_residual_backward";
  const Dims d = check_linear_norm_residual(h, grad, weight, bias, gamma, gamma, op);
  const int64_t F = d.features, H = d.hidden;
  auto dh = empty_output(h.sizes(), h.options());
  auto dW = zeros_output({F, H, H}, h.options());
  auto db = zeros_output({F, H}, h.options());
  auto dgamma = zeros_output({F, H}, h.options());
  auto dbeta = zeros_output({F, H}, h.options());
  if (d.rows == 0 || F * H == 0) return {dh, dW, db, dgamma, dbeta};
  const auto g_c = grad.contiguous(), h_c = h.contiguous();
  TilePartials partials(d.rows, F * H * H + 3 * F * H);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto W = to_acc<acc_t, scalar_t>(weight), B = to_acc<acc_t, scalar_t>(bias);
    const auto G = to_acc<acc_t, scalar_t>(gamma);
    const auto Wt = transposed(W, F, H, H);
    const Params<acc_t> p{W.data(), Wt.data(), B.data(), G.data(), nullptr};
    with_hidden<scalar_t>(H, [&](auto hc) {
      partials.run([&](int64_t begin, int64_t end, double* part) {
        backward_rows<scalar_t, decltype(hc)::value>(
            g_c.const_data_ptr<scalar_t>(), h_c.const_data_ptr<scalar_t>(), p,
            dh.mutable_data_ptr<scalar_t>(), part, d, res_scale, eps, begin, end);
      });
    });
    partials.write<scalar_t>({&dW, &db, &dgamma, &dbeta});
  });
  return {dh, dW, db, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CPU, m) {
  m.impl("linear_norm_residual", &linear_norm_residual_cpu);
  m.impl("linear_norm_residual_backward", &linear_norm_residual_backward_cpu);
}

}  // namespace fastcore
