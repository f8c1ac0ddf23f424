// CPU kernels for the fused KV-cache projection (fastcore::kv_project), its backward and
// the fused distillation loss (fastcore::kv_distill_loss). The contract is in
// csrc/fastcore.cpp and fastcore/reference/kv_project.py.
//
// Work item = (group g, batch b, tile of kTile student steps). Per item, in per-thread
// buffers of the accumulation type (float for half types and float, double for double):
//   xr[h]  = the resampled teacher rows of head h          [Ht, tile, Dt]
//   shared dim_proj:   Z[s] = sum_h M[s,h] xr[h]          [Hs, tile, Dt]
//                      out[s] = Z[s] @ P + bias[s]         (Ht/Hs fewer FLOPs than
//                                                            projecting every teacher head)
//   per-head dim_proj: Y[h] = xr[h] @ P_h                  [Ht, tile, Ds]
//                      out[s] = sum_h M[s,h] Y[h] + bias[s]
// Nothing of teacher or student size is written except the output (and, in the backward,
// the kv gradient with its one student-sized intermediate).
//
// Resampling rows: ptr [Ts+1] shared by the batch, or [B, Ts+1] per example (a batched
// Resample; its values index one concatenated idx/weight, idx local to the example), read
// from ptr + b * ptr_stride; the transpose likewise (t_ptr [Tt+1] or [B, Tt+1], t_col local
// rows, t_edge global entry ids). The loss's optional mask [B, Ts] (bool/uint8): a masked
// row is skipped everywhere (no teacher step read, no loss term, zero gradient rows), and
// each group's mean runs over the valid rows.
//
// Determinism: parameter gradients and losses are summed per fixed chunk of work items
// (the chunking depends on the shapes only, never on the thread count), then the chunks
// are added in order. The kv gradient is a gather over the transposed resampling rows.
// Results are bit-identical run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "../utils.h"
#include "simd.h"

namespace fastcore {
namespace {

constexpr int64_t kTile = 64;  // student steps per work item
constexpr double kCosineEps = 1e-8;

enum class Loss { kNone, kMse, kCosine };

Loss parse_loss(const std::string& loss, bool allow_none) {
  if (loss == "mse") return Loss::kMse;
  if (loss == "cosine") return Loss::kCosine;
  TORCH_CHECK_VALUE(allow_none && loss.empty(), "kv_distill_loss: loss must be 'mse' or 'cosine', got '",
                    loss, "'");
  return Loss::kNone;
}

struct Dims {
  int64_t G, B, Ht, Tt, Dt, Hs, Ts, Ds;
  int64_t ptr_stride;  // 0: rows shared by the batch; Ts + 1: per-example rows
  bool per_head;
  int64_t tiles() const { return (Ts + kTile - 1) / kTile; }
  int64_t items() const { return B * tiles(); }  // per group
};

Dims check_args(const char* op, at::TensorList kv, const at::Tensor& head_mix,
                const at::Tensor& dim_proj, const std::optional<at::Tensor>& bias,
                const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(!kv.empty(), op, ": kv must hold at least one group");
  const auto& first = kv[0];
  TORCH_CHECK_VALUE(first.dim() == 4, op, ": kv groups must be [B, Ht, Tt, Dt], got ", first.sizes());
  for (const auto& t : kv) {
    TORCH_CHECK_VALUE(t.sizes() == first.sizes(), op, ": every kv group must have shape ",
                      first.sizes(), ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), op, ": kv groups mix dtypes ",
                     first.scalar_type(), " and ", t.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), op, ": kv must be on the CPU here");
  }
  Dims d{};
  d.G = static_cast<int64_t>(kv.size());
  d.B = first.size(0);
  d.Ht = first.size(1);
  d.Tt = first.size(2);
  d.Dt = first.size(3);
  TORCH_CHECK_VALUE(head_mix.dim() == 3 && head_mix.size(0) == d.G && head_mix.size(2) == d.Ht, op,
                    ": head_mix must be [G=", d.G, ", Hs, Ht=", d.Ht, "], got ", head_mix.sizes());
  d.Hs = head_mix.size(1);
  d.per_head = dim_proj.dim() == 4;
  if (d.per_head) {
    TORCH_CHECK_VALUE(dim_proj.size(0) == d.G && dim_proj.size(1) == d.Ht && dim_proj.size(2) == d.Dt,
                      op, ": dim_proj must be [G, Dt, Ds] or [G, Ht, Dt, Ds], got ", dim_proj.sizes());
  } else {
    TORCH_CHECK_VALUE(dim_proj.dim() == 3 && dim_proj.size(0) == d.G && dim_proj.size(1) == d.Dt, op,
                      ": dim_proj must be [G, Dt, Ds] or [G, Ht, Dt, Ds], got ", dim_proj.sizes());
  }
  d.Ds = dim_proj.size(-1);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 3 && bias->size(0) == d.G && bias->size(1) == d.Hs &&
                          bias->size(2) == d.Ds,
                      op, ": bias must be [G, Hs, Ds], got ", bias->sizes());
  }
  TORCH_CHECK_VALUE((ptr.dim() == 1 || (ptr.dim() == 2 && ptr.size(0) == d.B)) && ptr.size(-1) >= 1 &&
                        ptr.scalar_type() == at::kLong,
                    op, ": ptr must be int64 [Ts+1] or [B=", d.B, ", Ts+1], got ", ptr.sizes());
  TORCH_CHECK_VALUE(idx.dim() == 1 && idx.scalar_type() == at::kLong && weight.dim() == 1 &&
                        weight.numel() == idx.numel(),
                    op, ": idx (int64) and weight must be 1-D of the same length");
  d.Ts = ptr.size(-1) - 1;
  d.ptr_stride = ptr.dim() == 2 ? d.Ts + 1 : 0;
  return d;
}

// The loss's row mask [B, Ts] (bool or uint8, contiguous) or null; n_valid its true rows.
const uint8_t* row_mask(const char* op, const Dims& d, const std::optional<at::Tensor>& mask,
                        std::vector<at::Tensor>& keep, int64_t& n_valid) {
  n_valid = d.B * d.Ts;
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == d.B && mask->size(1) == d.Ts, op,
                    ": mask must be [B=", d.B, ", Ts=", d.Ts, "], got ", mask->sizes());
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte, op,
                   ": mask must be bool or uint8, got ", mask->scalar_type());
  TORCH_CHECK(mask->device().is_cpu(), op, ": mask must be on the CPU here");
  keep.push_back(mask->contiguous());
  const auto* m = static_cast<const uint8_t*>(keep.back().const_data_ptr());
  n_valid = 0;
  for (int64_t i = 0; i < d.B * d.Ts; ++i) n_valid += m[i] != 0;
  return m;
}

// Chunks of work items per group: enough units for every thread on small problems, a fixed
// function of the shapes (so the summation order never depends on the thread count).
int64_t chunks_per_group(const Dims& d) {
  const int64_t items = d.items();
  if (items == 0) return 1;
  const int64_t wanted = std::max<int64_t>(1, (32 + d.G - 1) / d.G);
  return std::min(items, wanted);
}

template <typename acc_t>
inline void axpy(acc_t* __restrict__ y, acc_t a, const acc_t* __restrict__ x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename acc_t>
inline acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The accumulation-type views of one call's inputs.
template <typename scalar_t>
struct Inputs {
  using acc_t = at::opmath_type<scalar_t>;
  Dims d;
  std::vector<const scalar_t*> kv;  // per group, [B, Ht, Tt, Dt]
  const acc_t* M;                   // [G, Hs, Ht]
  at::Tensor P;                     // [G, (Ht,) Dt, Ds], acc dtype, contiguous
  const acc_t* bias;                // [G, Hs, Ds] or null
  const int64_t* ptr;
  const int64_t* idx;
  const acc_t* w;
  const uint8_t* live = nullptr;  // the loss's row mask [B, Ts], or null (every row)

  const scalar_t* x(int64_t g, int64_t b) const { return kv[g] + b * d.Ht * d.Tt * d.Dt; }
  const int64_t* rows(int64_t b) const { return ptr + b * d.ptr_stride; }  // example b's ptr
  const uint8_t* live_rows(int64_t b, int64_t t0) const {
    return live ? live + b * d.Ts + t0 : nullptr;
  }
  at::Tensor proj(int64_t g) const { return P[g]; }  // [Dt, Ds] or [Ht, Dt, Ds]
};

// Per-thread buffers of one work item.
template <typename acc_t>
struct Buffers {
  at::Tensor xr, mid, tile;  // [Ht, kTile, Dt]; [Hs, kTile, Dt] or [Ht, kTile, Ds]; [Hs, kTile, Ds]
  explicit Buffers(const Dims& d, const at::TensorOptions& acc) {
    xr = empty_output({d.Ht, kTile, d.Dt}, acc);
    mid = d.per_head ? empty_output({d.Ht, kTile, d.Ds}, acc) : empty_output({d.Hs, kTile, d.Dt}, acc);
    tile = empty_output({d.Hs, kTile, d.Ds}, acc);
  }
};

// xr[h, i, :] = sum_k w[k] * x[h, idx[k], :] over the row of student step t0 + i (zeros
// for a masked row: its teacher steps are never read).
template <typename scalar_t, typename acc_t>
FASTCORE_SIMD_CLONES void resample_tile(const Inputs<scalar_t>& in, int64_t g, int64_t b,
                                        int64_t t0, int64_t tn, acc_t* xr) {
  const Dims& d = in.d;
  const scalar_t* x = in.x(g, b);
  const int64_t* ptr = in.rows(b);
  const uint8_t* live = in.live_rows(b, t0);
  std::fill(xr, xr + d.Ht * kTile * d.Dt, acc_t(0));
  for (int64_t i = 0; i < tn; ++i) {
    if (live && !live[i]) continue;
    for (int64_t k = ptr[t0 + i]; k < ptr[t0 + i + 1]; ++k) {
      const acc_t wk = in.w[k];
      const int64_t j = in.idx[k];
      for (int64_t h = 0; h < d.Ht; ++h) {
        const scalar_t* src = x + (h * d.Tt + j) * d.Dt;
        acc_t* dst = xr + (h * kTile + i) * d.Dt;
#pragma omp simd
        for (int64_t c = 0; c < d.Dt; ++c) dst[c] += wk * static_cast<acc_t>(src[c]);
      }
    }
  }
}

// The projected tile, out[s, i, :] for the first tn steps, in the accumulation type (the
// tile buffer). Leaves Z (shared) or Y (per head) in buf.mid for the backward.
template <typename scalar_t, typename acc_t>
void project_tile(const Inputs<scalar_t>& in, Buffers<acc_t>& buf, int64_t g, int64_t tn) {
  const Dims& d = in.d;
  const acc_t* M = in.M + g * d.Hs * d.Ht;
  const acc_t* xr = buf.xr.template data_ptr<acc_t>();
  acc_t* mid = buf.mid.template data_ptr<acc_t>();
  acc_t* out = buf.tile.template data_ptr<acc_t>();
  const auto P = in.proj(g);
  if (!d.per_head) {
    std::fill(mid, mid + d.Hs * kTile * d.Dt, acc_t(0));
    for (int64_t s = 0; s < d.Hs; ++s)
      for (int64_t h = 0; h < d.Ht; ++h)
        axpy(mid + s * kTile * d.Dt, M[s * d.Ht + h], xr + h * kTile * d.Dt, tn * d.Dt);
    for (int64_t s = 0; s < d.Hs; ++s) {
      auto o = buf.tile[s].narrow(0, 0, tn);
      at::mm_out(o, buf.mid[s].narrow(0, 0, tn), P);
    }
  } else {
    for (int64_t h = 0; h < d.Ht; ++h) {
      auto y = buf.mid[h].narrow(0, 0, tn);
      at::mm_out(y, buf.xr[h].narrow(0, 0, tn), P[h]);
    }
    std::fill(out, out + d.Hs * kTile * d.Ds, acc_t(0));
    for (int64_t s = 0; s < d.Hs; ++s)
      for (int64_t h = 0; h < d.Ht; ++h)
        axpy(out + s * kTile * d.Ds, M[s * d.Ht + h], mid + h * kTile * d.Ds, tn * d.Ds);
  }
  if (in.bias) {
    for (int64_t s = 0; s < d.Hs; ++s) {
      const acc_t* bs = in.bias + (g * d.Hs + s) * d.Ds;
      for (int64_t i = 0; i < tn; ++i) axpy(out + (s * kTile + i) * d.Ds, acc_t(1), bs, d.Ds);
    }
  }
}

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const Dims& d, std::vector<at::Tensor>& keep, at::TensorList kv,
                             const at::Tensor& head_mix, const at::Tensor& dim_proj,
                             const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                             const at::Tensor& idx, const at::Tensor& weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  Inputs<scalar_t> in;
  in.d = d;
  for (const auto& t : kv) {
    keep.push_back(t.contiguous());
    in.kv.push_back(keep.back().template const_data_ptr<scalar_t>());
  }
  keep.push_back(head_mix.to(acc).contiguous());
  in.M = keep.back().template const_data_ptr<acc_t>();
  in.P = dim_proj.detach().to(acc).contiguous();
  in.bias = nullptr;
  if (bias.has_value()) {
    keep.push_back(bias->to(acc).contiguous());
    in.bias = keep.back().template const_data_ptr<acc_t>();
  }
  keep.push_back(ptr.contiguous());
  in.ptr = keep.back().template const_data_ptr<int64_t>();
  keep.push_back(idx.contiguous());
  in.idx = keep.back().template const_data_ptr<int64_t>();
  keep.push_back(weight.to(acc).contiguous());
  in.w = keep.back().template const_data_ptr<acc_t>();
  return in;
}

// Run fn(g, b, t0, tn, buffers) over every work item of chunk (g, c).
template <typename acc_t, typename Fn>
void for_each_chunk(const Dims& d, int64_t chunks, const at::TensorOptions& acc, const Fn& fn) {
  const int64_t items = d.items();
  const int64_t tiles = d.tiles();
  at::parallel_for(0, d.G * chunks, 1, [&](int64_t begin, int64_t end) {
    Buffers<acc_t> buf(d, acc);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t g = unit / chunks, c = unit % chunks;
      const int64_t lo = items * c / chunks, hi = items * (c + 1) / chunks;
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t b = item / tiles;
        const int64_t t0 = (item % tiles) * kTile;
        fn(g, c, b, t0, std::min(kTile, d.Ts - t0), buf);
      }
    }
  });
}

at::Tensor kv_project_cpu(at::TensorList kv, const at::Tensor& head_mix, const at::Tensor& dim_proj,
                          const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                          const at::Tensor& idx, const at::Tensor& weight, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&) {
  at::AutoDispatchBelowADInplaceOrView guard;  // the kernel's own matmuls are not recorded
  const Dims d = check_args("kv_project", kv, head_mix, dim_proj, bias, ptr, idx, weight);
  auto out = empty_output({d.G, d.B, d.Hs, d.Ts, d.Ds}, kv[0].options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kv[0].scalar_type(), "kv_project", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    const auto in = make_inputs<scalar_t>(d, keep, kv, head_mix, dim_proj, bias, ptr, idx, weight);
    const auto acc = in.P.options();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_each_chunk<acc_t>(d, chunks_per_group(d), acc,
                          [&](int64_t g, int64_t, int64_t b, int64_t t0, int64_t tn, Buffers<acc_t>& buf) {
      resample_tile(in, g, b, t0, tn, buf.xr.template data_ptr<acc_t>());
      project_tile(in, buf, g, tn);
      const acc_t* tile = buf.tile.template const_data_ptr<acc_t>();
      for (int64_t s = 0; s < d.Hs; ++s) {
        scalar_t* dst = o + (((g * d.B + b) * d.Hs + s) * d.Ts + t0) * d.Ds;
        const acc_t* src = tile + s * kTile * d.Ds;
        for (int64_t e = 0; e < tn * d.Ds; ++e) dst[e] = static_cast<scalar_t>(src[e]);
      }
    });
  });
  return out;
}

// Per-row distillation terms on a projected tile o and the student tile st, both
// [tn, Ds] with row stride ds_stride: the loss contribution, and optionally the gradients
// (scaled by `scale`) written over o (d/do) and into d_st (d/dst). A row that `live`
// (null: all) marks 0 is skipped: no term, zero gradients, its values never read.
template <typename acc_t>
double distill_rows(Loss loss, acc_t* o, const acc_t* st, int64_t tn, int64_t Ds, bool grad,
                    acc_t scale, acc_t* d_st, const uint8_t* live) {
  double total = 0;
  for (int64_t i = 0; i < tn; ++i) {
    acc_t* oi = o + i * Ds;
    const acc_t* si = st + i * Ds;
    acc_t* dsi = d_st ? d_st + i * Ds : nullptr;
    if (live && !live[i]) {
      if (grad) {
        std::fill(oi, oi + Ds, acc_t(0));
        if (dsi) std::fill(dsi, dsi + Ds, acc_t(0));
      }
      continue;
    }
    if (loss == Loss::kMse) {
      double row = 0;
      for (int64_t c = 0; c < Ds; ++c) {
        const acc_t diff = oi[c] - si[c];
        row += static_cast<double>(diff) * diff;
        if (grad) {
          const acc_t gval = 2 * scale * diff;
          if (dsi) dsi[c] = -gval;
          oi[c] = gval;
        }
      }
      total += row;
    } else {
      const acc_t dp = dot(oi, si, Ds);
      const acc_t on = std::sqrt(dot(oi, oi, Ds));
      const acc_t sn = std::sqrt(dot(si, si, Ds));
      const acc_t eps = static_cast<acc_t>(kCosineEps);
      const acc_t no = std::max(on, eps), ns = std::max(sn, eps);
      const acc_t cosv = dp / (no * ns);
      total += 1.0 - static_cast<double>(cosv);
      if (grad) {
        // L = 1 - <o,s> / (max(|o|,eps) max(|s|,eps)); a clamped norm is constant.
        const acc_t co = on > eps ? cosv / (no * no) : acc_t(0);
        const acc_t cs = sn > eps ? cosv / (ns * ns) : acc_t(0);
        const acc_t inv = acc_t(1) / (no * ns);
        for (int64_t c = 0; c < Ds; ++c) {
          const acc_t go = -scale * (si[c] * inv - co * oi[c]);
          if (dsi) dsi[c] = -scale * (oi[c] * inv - cs * si[c]);
          oi[c] = go;
        }
      }
    }
  }
  return total;
}

template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* src, int64_t n, acc_t* dst) {
  for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<acc_t>(src[e]);
}

// N of a group's mean: every element (mse) or every row (cosine) of the valid rows
// (n_valid of B * Ts).
double distill_denominator(const Dims& d, Loss loss, int64_t n_valid) {
  const double rows = n_valid == d.B * d.Ts ? static_cast<double>(d.B) * d.Hs * d.Ts
                                            : static_cast<double>(n_valid) * d.Hs;
  return loss == Loss::kMse ? rows * d.Ds : rows;
}

at::Tensor kv_distill_loss_cpu(at::TensorList kv, at::TensorList student, const at::Tensor& head_mix,
                               const at::Tensor& dim_proj, const std::optional<at::Tensor>& bias,
                               const at::Tensor& ptr, const at::Tensor& idx,
                               const at::Tensor& weight, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const std::string& loss_name,
                               const std::optional<at::Tensor>& mask) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const Dims d = check_args("kv_distill_loss", kv, head_mix, dim_proj, bias, ptr, idx, weight);
  const Loss loss = parse_loss(loss_name, false);
  TORCH_CHECK_VALUE(static_cast<int64_t>(student.size()) == d.G, "kv_distill_loss: ", student.size(),
                    " student groups for ", d.G, " teacher groups");
  for (const auto& s : student) {
    TORCH_CHECK_VALUE(s.sizes() == at::IntArrayRef({d.B, d.Hs, d.Ts, d.Ds}),
                      "kv_distill_loss: student groups must be [B, Hs, Ts, Ds] = [", d.B, ", ", d.Hs,
                      ", ", d.Ts, ", ", d.Ds, "], got ", s.sizes());
    TORCH_CHECK_TYPE(s.scalar_type() == kv[0].scalar_type(), "kv_distill_loss: student dtype ",
                     s.scalar_type(), " must equal the teacher's ", kv[0].scalar_type());
  }
  const auto out_type = kv[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = zeros_output({d.G}, kv[0].options().dtype(out_type));
  std::vector<at::Tensor> keep;
  int64_t n_valid = 0;
  const uint8_t* live = row_mask("kv_distill_loss", d, mask, keep, n_valid);
  if (d.items() == 0 || n_valid == 0) return out;
  const double denom = distill_denominator(d, loss, n_valid);
  const int64_t chunks = chunks_per_group(d);
  std::vector<double> partial(d.G * chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kv[0].scalar_type(), "kv_distill_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto in = make_inputs<scalar_t>(d, keep, kv, head_mix, dim_proj, bias, ptr, idx, weight);
    in.live = live;
    std::vector<const scalar_t*> st;
    for (const auto& s : student) {
      keep.push_back(s.contiguous());
      st.push_back(keep.back().template const_data_ptr<scalar_t>());
    }
    for_each_chunk<acc_t>(d, chunks, in.P.options(),
                          [&](int64_t g, int64_t c, int64_t b, int64_t t0, int64_t tn, Buffers<acc_t>& buf) {
      resample_tile(in, g, b, t0, tn, buf.xr.template data_ptr<acc_t>());
      project_tile(in, buf, g, tn);
      acc_t* tile = buf.tile.template data_ptr<acc_t>();
      std::vector<acc_t> srow(tn * d.Ds);
      double sum = 0;
      for (int64_t s = 0; s < d.Hs; ++s) {
        load_rows(st[g] + ((b * d.Hs + s) * d.Ts + t0) * d.Ds, tn * d.Ds, srow.data());
        sum += distill_rows<acc_t>(loss, tile + s * kTile * d.Ds, srow.data(), tn, d.Ds, false, 0, nullptr,
                                   in.live_rows(b, t0));
      }
      partial[g * chunks + c] += sum;
    });
  });
  auto out_cpu = empty_output({d.G}, at::kDouble);
  double* op = out_cpu.data_ptr<double>();
  for (int64_t g = 0; g < d.G; ++g) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[g * chunks + c];
    op[g] = s / denom;
  }
  return out_cpu.to(out.options());
}

// Backward of kv_project (grad_out given) or of kv_distill_loss (student + loss_grad).
// Returns (grad_kv: G tensors or none, grad_head_mix [G, Hs, Ht], grad_dim_proj (its
// shape), grad_bias [G, Hs, Ds] (empty [0] without bias), grad_student: G tensors or none);
// parameter gradients in the accumulation type.
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>
kv_project_backward_cpu(const std::optional<at::Tensor>& grad_out, at::TensorList kv,
                        const at::Tensor& head_mix, const at::Tensor& dim_proj,
                        const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                        const at::Tensor& idx, const at::Tensor& weight, const at::Tensor& t_ptr,
                        const at::Tensor& t_col, const at::Tensor& t_edge, at::TensorList student,
                        const std::optional<at::Tensor>& loss_grad, const std::string& loss_name,
                        bool need_kv, const std::optional<at::Tensor>& mask) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const Dims d = check_args("kv_project_backward", kv, head_mix, dim_proj, bias, ptr, idx, weight);
  const Loss loss = parse_loss(loss_name, true);
  const bool distill = loss != Loss::kNone;
  TORCH_CHECK_VALUE(distill != grad_out.has_value(),
                    "kv_project_backward: pass grad_out (kv_project) or a loss (kv_distill_loss)");
  if (distill) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(student.size()) == d.G && loss_grad.has_value() &&
                          loss_grad->numel() == d.G,
                      "kv_project_backward: the distillation backward needs G student groups and "
                      "loss_grad [G]");
  } else {
    TORCH_CHECK_VALUE(grad_out->sizes() == at::IntArrayRef({d.G, d.B, d.Hs, d.Ts, d.Ds}),
                      "kv_project_backward: grad_out must be [G, B, Hs, Ts, Ds], got ",
                      grad_out->sizes());
  }
  for (const auto* t : {&t_col, &t_edge})
    TORCH_CHECK_VALUE(t->dim() == 1 && t->scalar_type() == at::kLong,
                      "kv_project_backward: t_col and t_edge must be 1-D int64");
  TORCH_CHECK_VALUE(t_ptr.scalar_type() == at::kLong && t_ptr.dim() == ptr.dim() &&
                        (t_ptr.dim() == 1 || t_ptr.size(0) == d.B) && t_ptr.size(-1) == d.Tt + 1 &&
                        t_col.numel() == idx.numel() && t_edge.numel() == idx.numel(),
                    "kv_project_backward: the transposed rows must be t_ptr [Tt+1] (or [B, Tt+1] "
                    "with per-example rows), t_col and t_edge [E]");
  TORCH_CHECK_VALUE(distill || !mask.has_value(),
                    "kv_project_backward: a mask is for the distillation loss only");
  std::vector<at::Tensor> keep_mask;
  int64_t n_valid = 0;
  const uint8_t* live = row_mask("kv_project_backward", d, mask, keep_mask, n_valid);
  const int64_t t_stride = t_ptr.dim() == 2 ? d.Tt + 1 : 0;
  const auto kv_type = kv[0].scalar_type();
  const auto acc_type = kv_type == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = kv[0].options().dtype(acc_type);
  const int64_t chunks = chunks_per_group(d);
  const int64_t p_size = (d.per_head ? d.Ht : 1) * d.Dt * d.Ds;
  auto gM_part = zeros_output({d.G, chunks, d.Hs, d.Ht}, acc_opts);
  auto gP_part = zeros_output({d.G, chunks, p_size}, acc_opts);
  auto gb_part = zeros_output({d.G, chunks, d.Hs, d.Ds}, acc_opts);
  // The student-sized intermediate the kv gradient gathers from: dZ (shared) or dY.
  at::Tensor dmid;
  if (need_kv) {
    dmid = d.per_head ? empty_output({d.G, d.B, d.Ht, d.Ts, d.Ds}, acc_opts)
                      : empty_output({d.G, d.B, d.Hs, d.Ts, d.Dt}, acc_opts);
  }
  std::vector<at::Tensor> grad_student;
  if (distill) {
    for (int64_t g = 0; g < d.G; ++g) grad_student.push_back(empty_output({d.B, d.Hs, d.Ts, d.Ds}, kv[0].options()));
  }
  std::vector<at::Tensor> grad_kv;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kv_type, "kv_project_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    auto in = make_inputs<scalar_t>(d, keep, kv, head_mix, dim_proj, bias, ptr, idx, weight);
    in.live = live;
    const scalar_t* go = nullptr;
    if (grad_out.has_value()) {
      keep.push_back(grad_out->contiguous());
      go = keep.back().template const_data_ptr<scalar_t>();
    }
    std::vector<const scalar_t*> st;
    std::vector<scalar_t*> gst;
    for (int64_t g = 0; distill && g < d.G; ++g) {
      keep.push_back(student[g].contiguous());
      st.push_back(keep.back().template const_data_ptr<scalar_t>());
      gst.push_back(grad_student[g].template mutable_data_ptr<scalar_t>());
    }
    std::vector<acc_t> lg(d.G, acc_t(0));
    if (distill) {
      const auto lgc = loss_grad->to(at::kDouble).cpu().contiguous();
      const double denom = distill_denominator(d, loss, n_valid);
      for (int64_t g = 0; n_valid > 0 && g < d.G; ++g)
        lg[g] = static_cast<acc_t>(lgc.const_data_ptr<double>()[g] / denom);
    }
    const int64_t mid_rows = d.per_head ? d.Ht : d.Hs;
    const int64_t mid_width = d.per_head ? d.Ds : d.Dt;

    for_each_chunk<acc_t>(d, chunks, in.P.options(),
                          [&](int64_t g, int64_t c, int64_t b, int64_t t0, int64_t tn, Buffers<acc_t>& buf) {
      acc_t* xr = buf.xr.template data_ptr<acc_t>();
      resample_tile(in, g, b, t0, tn, xr);
      // G tile (the gradient w.r.t. this output tile) in buf.tile.
      acc_t* G = buf.tile.template data_ptr<acc_t>();
      if (distill) {
        project_tile(in, buf, g, tn);
        std::vector<acc_t> srow(tn * d.Ds), dsrow(tn * d.Ds);
        for (int64_t s = 0; s < d.Hs; ++s) {
          const int64_t off = ((b * d.Hs + s) * d.Ts + t0) * d.Ds;
          load_rows(st[g] + off, tn * d.Ds, srow.data());
          distill_rows<acc_t>(loss, G + s * kTile * d.Ds, srow.data(), tn, d.Ds, true, lg[g], dsrow.data(),
                              in.live_rows(b, t0));
          for (int64_t e = 0; e < tn * d.Ds; ++e) gst[g][off + e] = static_cast<scalar_t>(dsrow[e]);
        }
      } else {
        if (d.per_head) project_tile(in, buf, g, tn);  // Y (buf.mid), for grad_head_mix
        for (int64_t s = 0; s < d.Hs; ++s)
          load_rows(go + (((g * d.B + b) * d.Hs + s) * d.Ts + t0) * d.Ds, tn * d.Ds, G + s * kTile * d.Ds);
      }
      acc_t* gM = gM_part[g][c].template data_ptr<acc_t>();
      acc_t* gb = gb_part[g][c].template data_ptr<acc_t>();
      auto gP = gP_part[g][c];
      if (bias.has_value()) {
        for (int64_t s = 0; s < d.Hs; ++s)
          for (int64_t i = 0; i < tn; ++i) axpy(gb + s * d.Ds, acc_t(1), G + (s * kTile + i) * d.Ds, d.Ds);
      }
      const acc_t* M = in.M + g * d.Hs * d.Ht;
      const auto P = in.proj(g);
      if (!d.per_head) {
        // Z (mixed rows) for grad_dim_proj; dZ = G @ P^T overwrites it afterwards.
        if (!distill) {
          acc_t* Z = buf.mid.template data_ptr<acc_t>();
          std::fill(Z, Z + d.Hs * kTile * d.Dt, acc_t(0));
          for (int64_t s = 0; s < d.Hs; ++s)
            for (int64_t h = 0; h < d.Ht; ++h)
              axpy(Z + s * kTile * d.Dt, M[s * d.Ht + h], xr + h * kTile * d.Dt, tn * d.Dt);
        }
        auto gP2 = gP.view({d.Dt, d.Ds});
        for (int64_t s = 0; s < d.Hs; ++s)
          gP2.addmm_(buf.mid[s].narrow(0, 0, tn).t(), buf.tile[s].narrow(0, 0, tn));
        for (int64_t s = 0; s < d.Hs; ++s) {
          auto dz = buf.mid[s].narrow(0, 0, tn);
          at::mm_out(dz, buf.tile[s].narrow(0, 0, tn), P.t());
        }
        const acc_t* dZ = buf.mid.template const_data_ptr<acc_t>();
        for (int64_t s = 0; s < d.Hs; ++s)
          for (int64_t h = 0; h < d.Ht; ++h)
            gM[s * d.Ht + h] += dot(dZ + s * kTile * d.Dt, xr + h * kTile * d.Dt, tn * d.Dt);
      } else {
        const acc_t* Y = buf.mid.template const_data_ptr<acc_t>();
        for (int64_t s = 0; s < d.Hs; ++s)
          for (int64_t h = 0; h < d.Ht; ++h)
            gM[s * d.Ht + h] += dot(G + s * kTile * d.Ds, Y + h * kTile * d.Ds, tn * d.Ds);
        // dY[h] = sum_s M[s,h] G[s] (overwrites Y), then grad P_h += xr[h]^T dY[h].
        acc_t* dY = buf.mid.template data_ptr<acc_t>();
        std::fill(dY, dY + d.Ht * kTile * d.Ds, acc_t(0));
        for (int64_t h = 0; h < d.Ht; ++h)
          for (int64_t s = 0; s < d.Hs; ++s)
            axpy(dY + h * kTile * d.Ds, M[s * d.Ht + h], G + s * kTile * d.Ds, tn * d.Ds);
        auto gP3 = gP.view({d.Ht, d.Dt, d.Ds});
        for (int64_t h = 0; h < d.Ht; ++h)
          gP3[h].addmm_(buf.xr[h].narrow(0, 0, tn).t(), buf.mid[h].narrow(0, 0, tn));
      }
      if (need_kv) {
        const acc_t* src = buf.mid.template const_data_ptr<acc_t>();
        acc_t* dst = dmid.template data_ptr<acc_t>();
        for (int64_t r = 0; r < mid_rows; ++r)
          std::copy(src + r * kTile * mid_width, src + (r * kTile + tn) * mid_width,
                    dst + (((g * d.B + b) * mid_rows + r) * d.Ts + t0) * mid_width);
      }
    });

    if (need_kv) {
      // grad_kv[g][b, h, j] = sum over the entries k of source step j of
      //   w_k * sum_s M[s,h] dZ[s, t_k]      (shared)
      //   (w_k * dY[h, t_k]) @ P_h^T          (per head)
      const auto t_ptr_c = t_ptr.contiguous(), t_col_c = t_col.contiguous(), t_edge_c = t_edge.contiguous();
      const int64_t* tp = t_ptr_c.const_data_ptr<int64_t>();
      const int64_t* tc = t_col_c.const_data_ptr<int64_t>();
      const int64_t* te = t_edge_c.const_data_ptr<int64_t>();
      for (int64_t g = 0; g < d.G; ++g) grad_kv.push_back(empty_output({d.B, d.Ht, d.Tt, d.Dt}, kv[0].options()));
      const int64_t j_tiles = (d.Tt + kTile - 1) / kTile;
      const acc_t* dm = dmid.template const_data_ptr<acc_t>();
      const auto opts = in.P.options();
      at::parallel_for(0, d.G * d.B * j_tiles, 1, [&](int64_t begin, int64_t end) {
        auto gather = empty_output({d.per_head ? d.Ht : d.Hs, kTile, mid_width}, opts);
        auto rows = empty_output({kTile, d.Dt}, opts);
        acc_t* ga = gather.template data_ptr<acc_t>();
        for (int64_t unit = begin; unit < end; ++unit) {
          const int64_t g = unit / (d.B * j_tiles), rest = unit % (d.B * j_tiles);
          const int64_t b = rest / j_tiles, j0 = (rest % j_tiles) * kTile;
          const int64_t jn = std::min(kTile, d.Tt - j0);
          const acc_t* base = dm + (g * d.B + b) * mid_rows * d.Ts * mid_width;
          const int64_t* tpb = tp + b * t_stride;
          std::fill(ga, ga + mid_rows * kTile * mid_width, acc_t(0));
          for (int64_t i = 0; i < jn; ++i)
            for (int64_t k = tpb[j0 + i]; k < tpb[j0 + i + 1]; ++k) {
              const acc_t wk = in.w[te[k]];
              for (int64_t r = 0; r < mid_rows; ++r)
                axpy(ga + (r * kTile + i) * mid_width, wk, base + (r * d.Ts + tc[k]) * mid_width, mid_width);
            }
          scalar_t* out = grad_kv[g].template mutable_data_ptr<scalar_t>() + b * d.Ht * d.Tt * d.Dt;
          const acc_t* M = in.M + g * d.Hs * d.Ht;
          acc_t* rw = rows.template data_ptr<acc_t>();
          for (int64_t h = 0; h < d.Ht; ++h) {
            if (d.per_head) {
              auto r = rows.narrow(0, 0, jn);
              at::mm_out(r, gather[h].narrow(0, 0, jn), in.P[g][h].t());
            } else {
              std::fill(rw, rw + jn * d.Dt, acc_t(0));
              for (int64_t s = 0; s < d.Hs; ++s) axpy(rw, M[s * d.Ht + h], ga + s * kTile * d.Dt, jn * d.Dt);
            }
            scalar_t* dst = out + (h * d.Tt + j0) * d.Dt;
            for (int64_t e = 0; e < jn * d.Dt; ++e) dst[e] = static_cast<scalar_t>(rw[e]);
          }
        }
      });
    }
  });
  // Chunks added in order (deterministic).
  auto reduce = [&](const at::Tensor& part) {
    auto total = part.select(1, 0).clone();
    for (int64_t c = 1; c < chunks; ++c) total.add_(part.select(1, c));
    return total;
  };
  auto grad_M = reduce(gM_part);
  auto grad_P = reduce(gP_part).view(dim_proj.sizes());
  auto grad_b = bias.has_value() ? reduce(gb_part) : empty_output({0}, acc_opts);
  return {grad_kv, grad_M, grad_P, grad_b, grad_student};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CPU, m) {
  m.impl("kv_project", &kv_project_cpu);
  m.impl("kv_distill_loss", &kv_distill_loss_cpu);
  m.impl("kv_project_backward", &kv_project_backward_cpu);
}

}  // namespace fastcore
