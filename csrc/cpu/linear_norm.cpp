// CPU kernels of the spatiotemporal block's tail, fused: a linear map per feature, then
// LayerNorm over the hidden width with a per-feature affine, then the residual,
//   out[m, f] = x[m, f] + s * (gamma[f] * norm(h[m, f] @ W[f] + b[f]) + beta[f]),
// and its backward (the statistics are recomputed from h, nothing is saved). h, x, out:
// [M, F, H] (every leading dim folded into M); W [F, H, H]; b, gamma, beta [F, H].
// One pass over h and x forward and one over grad and h backward, where the composite
// makes a dozen (einsum copies, bias, LayerNorm, affine, residual, and their backward).
//
// Parameter gradients: each fixed tile of rows sums its rows in order (in the accumulation
// type) into a float64 partial, and the partials are added in tile order: results are
// bit-identical whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace fastcore {
namespace {

constexpr int64_t kTileRows = 256;  // rows per backward partial (fixed: deterministic)

struct Dims {
  int64_t rows, features, hidden;
};

Dims check_linear_norm(const at::Tensor& h, const at::Tensor& x, const at::Tensor& weight,
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

// z[k] = b[k] + sum_j hr[j] W[j, k]; returns (mean, rstd) of z over H.
template <typename acc_t, typename scalar_t>
inline std::pair<acc_t, acc_t> linear_stats(const scalar_t* hr, const scalar_t* W,
                                            const scalar_t* b, acc_t* z, int64_t H, double eps) {
  for (int64_t k = 0; k < H; ++k) z[k] = static_cast<acc_t>(b[k]);
  for (int64_t j = 0; j < H; ++j) {
    const acc_t hj = static_cast<acc_t>(hr[j]);
    const scalar_t* Wj = W + j * H;
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) z[k] += hj * static_cast<acc_t>(Wj[k]);
  }
  acc_t mean = 0;
  for (int64_t k = 0; k < H; ++k) mean += z[k];
  mean /= static_cast<acc_t>(H);
  acc_t var = 0;
  for (int64_t k = 0; k < H; ++k) var += (z[k] - mean) * (z[k] - mean);
  var /= static_cast<acc_t>(H);
  return {mean, acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps))};
}

template <typename scalar_t, int HC>
FASTCORE_SIMD_CLONES void forward_rows(const scalar_t* h, const scalar_t* x, const scalar_t* W,
                                       const scalar_t* b, const scalar_t* gamma,
                                       const scalar_t* beta, scalar_t* out, const Dims& d,
                                       double scale, double eps, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t F = d.features, H = HC > 0 ? HC : d.hidden;  // HC: H known at compile time
  // H fixed at compile time: the per-row vectors live on the stack
  std::vector<acc_t> heap(HC > 0 ? 0 : H);
  acc_t stack[HC > 0 ? HC : 1];
  acc_t* z = HC > 0 ? stack : heap.data();
  const acc_t s = static_cast<acc_t>(scale);
  for (int64_t m = begin; m < end; ++m) {
    for (int64_t f = 0; f < F; ++f) {
      const int64_t at = (m * F + f) * H;
      const auto [mean, rstd] =
          linear_stats(h + at, W + f * H * H, b + f * H, z, H, eps);
      const scalar_t* g = gamma + f * H;
      const scalar_t* be = beta + f * H;
      for (int64_t k = 0; k < H; ++k) {
        const acc_t y = static_cast<acc_t>(g[k]) * (z[k] - mean) * rstd + static_cast<acc_t>(be[k]);
        out[at + k] = static_cast<scalar_t>(static_cast<acc_t>(x[at + k]) + s * y);
      }
    }
  }
}

// Rows [begin, end): dh, and the parameter gradients added into part (float64):
// [dW (F H H) | db (F H) | dgamma (F H) | dbeta (F H)].
template <typename scalar_t, int HC>
FASTCORE_SIMD_CLONES void backward_rows(const scalar_t* grad, const scalar_t* h, const scalar_t* W,
                                        const scalar_t* b, const scalar_t* gamma, scalar_t* dh,
                                        double* part, const Dims& d, double scale, double eps,
                                        int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t F = d.features, H = HC > 0 ? HC : d.hidden;  // HC: H known at compile time
  // the tile's parameter gradients in acc_t, added into the float64 partial at the end
  std::vector<acc_t> local(F * H * H + 3 * F * H, acc_t(0));
  acc_t* dW = local.data();
  acc_t* db = dW + F * H * H;
  acc_t* dgamma = db + F * H;
  acc_t* dbeta = dgamma + F * H;
  std::vector<acc_t> heap(HC > 0 ? 0 : 2 * H);
  acc_t stack[HC > 0 ? 2 * HC : 1];
  acc_t* z = HC > 0 ? stack : heap.data();
  acc_t* dz = z + H;
  const acc_t s = static_cast<acc_t>(scale);
  for (int64_t m = begin; m < end; ++m) {
    for (int64_t f = 0; f < F; ++f) {
      const int64_t at = (m * F + f) * H;
      const scalar_t* Wf = W + f * H * H;
      const auto [mean, rstd] = linear_stats(h + at, Wf, b + f * H, z, H, eps);
      const scalar_t* gf = gamma + f * H;
      acc_t dn_mean = 0, dn_n_mean = 0;
      for (int64_t k = 0; k < H; ++k) {
        const acc_t n = (z[k] - mean) * rstd;
        const acc_t dy = s * static_cast<acc_t>(grad[at + k]);
        dgamma[f * H + k] += dy * n;
        dbeta[f * H + k] += dy;
        const acc_t dn = dy * static_cast<acc_t>(gf[k]);
        dz[k] = dn;
        dn_mean += dn;
        dn_n_mean += dn * n;
        z[k] = n;  // keep the normalised value
      }
      dn_mean /= static_cast<acc_t>(H);
      dn_n_mean /= static_cast<acc_t>(H);
      for (int64_t k = 0; k < H; ++k) {
        dz[k] = rstd * (dz[k] - dn_mean - z[k] * dn_n_mean);
        db[f * H + k] += dz[k];
      }
      for (int64_t j = 0; j < H; ++j) {
        const acc_t hj = static_cast<acc_t>(h[at + j]);
        const scalar_t* Wj = Wf + j * H;
        acc_t* dWj = dW + (f * H + j) * H;
        acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < H; ++k) {
          acc += dz[k] * static_cast<acc_t>(Wj[k]);
          dWj[k] += hj * dz[k];
        }
        dh[at + j] = static_cast<scalar_t>(acc);
      }
    }
  }
  for (size_t j = 0; j < local.size(); ++j) part[j] += static_cast<double>(local[j]);
}

// The kernels with H fixed at compile time for the common widths (unrolled, vectorised).
template <typename scalar_t, typename Fn>
void with_hidden(int64_t hidden, Fn&& fn) {
  switch (hidden) {
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    default: fn(std::integral_constant<int, 0>{});
  }
}

at::Tensor linear_norm_residual_cpu(const at::Tensor& h, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& bias,
                                    const at::Tensor& gamma, const at::Tensor& beta,
                                    double res_scale, double eps) {
  const Dims d = check_linear_norm(h, x, weight, bias, gamma, beta, "linear_norm_residual");
  auto out = at::empty(h.sizes(), h.options());
  if (out.numel() == 0) return out;
  const auto h_c = h.contiguous(), x_c = x.contiguous(), w_c = weight.contiguous();
  const auto b_c = bias.contiguous(), g_c = gamma.contiguous(), be_c = beta.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "linear_norm", [&] {
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, d.features * d.hidden));
    with_hidden<scalar_t>(d.hidden, [&](auto hc) {
      at::parallel_for(0, d.rows, grain, [&](int64_t begin, int64_t end) {
        forward_rows<scalar_t, decltype(hc)::value>(
            h_c.const_data_ptr<scalar_t>(), x_c.const_data_ptr<scalar_t>(),
            w_c.const_data_ptr<scalar_t>(), b_c.const_data_ptr<scalar_t>(),
            g_c.const_data_ptr<scalar_t>(), be_c.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), d, res_scale, eps, begin, end);
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
  const Dims d = check_linear_norm(h, grad, weight, bias, gamma, gamma, op);
  const int64_t F = d.features, H = d.hidden;
  auto dh = at::empty(h.sizes(), h.options());
  auto dW = at::zeros({F, H, H}, h.options());
  auto db = at::zeros({F, H}, h.options());
  auto dgamma = at::zeros({F, H}, h.options());
  auto dbeta = at::zeros({F, H}, h.options());
  if (d.rows == 0 || F * H == 0) return {dh, dW, db, dgamma, dbeta};
  const auto g_c = grad.contiguous(), h_c = h.contiguous(), w_c = weight.contiguous();
  const auto b_c = bias.contiguous(), ga_c = gamma.contiguous();
  const int64_t tiles = (d.rows + kTileRows - 1) / kTileRows;
  const int64_t size = F * H * H + 3 * F * H;
  std::vector<double> parts(tiles * size, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), op, [&] {
    with_hidden<scalar_t>(d.hidden, [&](auto hc) {
      at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          backward_rows<scalar_t, decltype(hc)::value>(
              g_c.const_data_ptr<scalar_t>(), h_c.const_data_ptr<scalar_t>(),
              w_c.const_data_ptr<scalar_t>(), b_c.const_data_ptr<scalar_t>(),
              ga_c.const_data_ptr<scalar_t>(), dh.mutable_data_ptr<scalar_t>(),
              parts.data() + i * size, d, res_scale, eps, i * kTileRows,
              std::min(d.rows, (i + 1) * kTileRows));
        }
      });
    });
    std::vector<double> total(size, 0.0);
    for (int64_t i = 0; i < tiles; ++i)
      for (int64_t j = 0; j < size; ++j) total[j] += parts[i * size + j];
    scalar_t* outs[] = {dW.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<scalar_t>(),
                        dgamma.mutable_data_ptr<scalar_t>(), dbeta.mutable_data_ptr<scalar_t>()};
    const int64_t sizes[] = {F * H * H, F * H, F * H, F * H};
    int64_t at = 0;
    for (int q = 0; q < 4; ++q)
      for (int64_t j = 0; j < sizes[q]; ++j) outs[q][j] = static_cast<scalar_t>(total[at++]);
  });
  return {dh, dW, db, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CPU, m) {
  m.impl("linear_norm_residual", &linear_norm_residual_cpu);
  m.impl("linear_norm_residual_backward", &linear_norm_residual_backward_cpu);
}

}  // namespace fastcore
