// The one schema file: every fastcore operator is declared here, and only here.
// Kernels register their implementations per dispatch key in csrc/cpu/*.cpp and
// csrc/cuda/*.cpp; fake (meta) kernels and autograd formulas are registered from
// Python (fastcore/ops/*.py) with torch.library.register_fake / register_autograd.
//
// Conventions shared by all ops:
//   * `dim` is already normalised to 0 <= dim < src.dim() by the Python wrapper.
//   * `check` = true validates index values on the host before any kernel runs and
//     raises IndexError / ValueError naming the offending value. Callers that built
//     the indices themselves (a cached CSR, a validated Graph) pass false to avoid
//     a device synchronisation.
#include <torch/library.h>

#include <pybind11/pybind11.h>

TORCH_LIBRARY(fastcore, m) {
  // out = src.index_select(dim, index); index is 1-D int32/int64.
  m.def("gather(Tensor src, Tensor index, int dim, bool check) -> Tensor");
  // out = base + src.index_select(dim, index) in one pass (float dtypes; base has the
  // output's shape and src's dtype; half types add in float32, like torch.add).
  m.def("gather_add(Tensor src, Tensor index, Tensor base, int dim, bool check) -> Tensor");
  // Sum of rows within CSR segments along `dim`:
  //   out[..., r, ...] = sum_{k in [ptr[r], ptr[r+1])} src[..., perm[k] (or k), ...]
  // ptr: int64 [R+1], ptr[0] = 0, non-decreasing, ptr[R] = src.size(dim).
  // perm: optional int64 permutation of 0..src.size(dim)-1 (rows in segment order).
  // Half types accumulate in float32, float64 in float64.
  m.def("csr_sum(Tensor src, Tensor? perm, Tensor ptr, int dim, bool check) -> Tensor");
  // Reduction of rows within CSR segments along `dim` (same ptr/perm contract as csr_sum);
  // reduce is "sum", "mean", "max" or "min". Returns (out, arg):
  //   out: src's shape with size(dim) = R; an empty segment gives 0. Half types accumulate
  //        in float32. max/min propagate NaN; ties go to the first member in CSR order.
  //   arg: for max/min, int64 of out's shape holding the source row (a position along
  //        `dim` of src) each output element came from, or src.size(dim) for an empty
  //        segment; for sum/mean, an empty int64 tensor of shape [0].
  m.def(
      "segment_reduce(Tensor src, Tensor? perm, Tensor ptr, int dim, str reduce, bool check) "
      "-> (Tensor, Tensor)");
  // The backward of max/min: out = zeros of grad's shape with size(dim) = size, then
  // out[..., arg[..., r, ...], ...] = grad[..., r, ...] wherever arg < size. Segments are
  // disjoint, so no two elements land on the same place (no atomics, deterministic).
  m.def("segment_arg_scatter(Tensor grad, Tensor arg, int dim, int size) -> Tensor");
  // Sparse (graph) times dense along `dim`, over the edges grouped by destination (CSR):
  //   out[..., v, ...] = sum_{k in [ptr[v], ptr[v+1])} weight[k] * x[..., col[k], ...]
  // ptr: int64 [V+1] over the E entries; col: int64 [E], the source node of each entry;
  // weight: [E] in CSR order, x's dtype (absent: 1). out has V rows along `dim`.
  // t_ptr / t_col / t_edge: the same edges grouped by source (the transpose, which the
  // backward runs): t_ptr [x.size(dim)+1], t_col [E] the destination of each entry,
  // t_edge [E] the CSR position of each entry, t_pos [E] its inverse (the transposed
  // position of each CSR entry), so the transpose's own structure is
  // (t_ptr, t_col, ptr, col, t_pos, t_edge). residual: a square structure (V equal to
  // x.size(dim)) whose every row adds its own x[..., v, ...] after its entries, in the
  // accumulation type (x + A x in one pass). Sums run in CSR order (deterministic); half
  // types accumulate in float32.
  m.def(
      "spmm(Tensor x, Tensor? weight, Tensor ptr, Tensor col, Tensor t_ptr, Tensor t_col, "
      "Tensor t_edge, Tensor t_pos, int dim, bool residual, bool check) -> Tensor");
  // The edge-weight gradient of spmm (an SDDMM), in CSR order:
  //   out[k] = sum over every other index (..., j) of grad[..., v_k, ..., j] * x[..., col[k], ..., j]
  // with v_k the destination of entry k; x's dtype, accumulated in float64 over a fixed
  // order. The transpose arguments are those of spmm (its own backward needs them).
  m.def(
      "spmm_edge_grad(Tensor grad, Tensor x, Tensor ptr, Tensor col, Tensor t_ptr, Tensor t_col, "
      "Tensor t_edge, Tensor t_pos, int dim) -> Tensor");
  // Depthwise convolution along time (dim 1) with K taps per channel (the last dim C):
  //   out[b, t, ..., c] = bias[c] + sum_{k < K, 0 <= s < T} weight[k, c] * x[b, s, ..., c]
  // with s = t - k (causal) or, when reverse, s = t + k (its transpose: the input gradient
  // of the causal one). weight [K, C] and bias [C] (optional) in x's dtype; half types
  // accumulate in float32. Deterministic.
  m.def("time_conv(Tensor x, Tensor weight, Tensor? bias, bool reverse) -> Tensor");
  // Its weight gradient [K, C]: out[k, c] = sum over b, t and the middle dims of
  //   grad[b, t, ..., c] * x[b, s, ..., c], s = t - k (or t + k when reverse), 0 <= s < T,
  // summed in float64 in a fixed order (deterministic).
  m.def("time_conv_weight_grad(Tensor grad, Tensor x, int kernel_size, bool reverse) -> Tensor");
  // The spatiotemporal block's tail, fused: h, x [..., F, H]; weight [F, H, H]; bias,
  // gamma, beta [F, H]:
  //   out[..., f, :] = x[..., f, :] + res_scale * (gamma[f] * LN(h[..., f, :] @ weight[f]
  //                    + bias[f]) + beta[f])
  // with LN the normalisation over H (biased variance, eps). Half types compute in float32.
  m.def(
      "linear_norm_residual(Tensor h, Tensor x, Tensor weight, Tensor bias, Tensor gamma, "
      "Tensor beta, float res_scale, float eps) -> Tensor");
  // Its backward for h and the parameters (x's gradient is grad itself), the statistics
  // recomputed from h: (grad_h, grad_weight, grad_bias, grad_gamma, grad_beta), parameter
  // gradients summed in float64 over fixed tiles of rows, in order (deterministic).
  m.def(
      "linear_norm_residual_backward(Tensor grad, Tensor h, Tensor weight, Tensor bias, "
      "Tensor gamma, float res_scale, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The basin model's per-feature residual MLP, fused: h [..., F, H]; w1 [F, H, K];
  // b1 [F, K]; w2 [F, K, H]; b2 [F, H]:
  //   out[..., f, :] = h[..., f, :] + gelu(h[..., f, :] @ w1[f] + b1[f]) @ w2[f] + b2[f]
  // with the exact (erf) GELU. Half types compute in float32.
  m.def("feature_mlp(Tensor h, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
  // Its backward, the hidden layer recomputed from h: (grad_h (the residual's included),
  // grad_w1, grad_b1, grad_w2, grad_b2), parameter gradients summed in float64 over fixed
  // tiles of rows, in order (deterministic).
  m.def(
      "feature_mlp_backward(Tensor grad, Tensor h, Tensor w1, Tensor b1, Tensor w2) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Fused KV-cache projection over G groups (one per layer and K/V), see
  // fastcore/reference/kv_project.py for the contract: kv holds G tensors [B, Ht, Tt, Dt];
  // head_mix [G, Hs, Ht]; dim_proj [G, Dt, Ds] (shared) or [G, Ht, Dt, Ds] (per teacher
  // head); bias [G, Hs, Ds]; ptr [Ts+1] / idx [E] (int64) / weight [E] the resampling rows
  // over teacher time, t_ptr / t_col / t_edge the same rows grouped by teacher step (for the
  // backward; see kv_project_backward). Per-example rows (a batched Resample): ptr [B, Ts+1]
  // and t_ptr [B, Tt+1], their values indexing the concatenated entries, idx and t_col local
  // to the example. Returns [G, B, Hs, Ts, Ds] in kv's dtype, accumulated in float32
  // (float64 for float64), with no intermediate tensor of teacher or student size.
  m.def(
      "kv_project(Tensor[] kv, Tensor head_mix, Tensor dim_proj, Tensor? bias, Tensor ptr, "
      "Tensor idx, Tensor weight, Tensor t_ptr, Tensor t_col, Tensor t_edge) -> Tensor");
  // Per-group distillation losses [G] (float32; float64 for float64) between the projected
  // teacher groups and the student groups [B, Hs, Ts, Ds] (kv's dtype): loss "mse" (mean
  // squared error over every element) or "cosine" (mean of 1 - cos over Ds per row), the
  // projected cache never materialised. mask [B, Ts] (bool or uint8) or None: masked rows are
  // skipped (never read into the loss or a gradient) and the means run over the valid rows
  // (none valid: 0).
  m.def(
      "kv_distill_loss(Tensor[] kv, Tensor[] student, Tensor head_mix, Tensor dim_proj, "
      "Tensor? bias, Tensor ptr, Tensor idx, Tensor weight, Tensor t_ptr, Tensor t_col, "
      "Tensor t_edge, str loss, Tensor? mask=None) -> Tensor");
  // The backward of both: grad_out [G, B, Hs, Ts, Ds] for kv_project (loss ""), or the
  // student groups and loss_grad [G] for kv_distill_loss (loss "mse"/"cosine"; the output
  // gradient is recomputed tile by tile). t_ptr [Tt+1] / t_col / t_edge: the resampling
  // rows grouped by teacher step (t_edge: each entry's position in idx). Returns
  // (grad_kv: G tensors when need_kv else none, grad_head_mix, grad_dim_proj, grad_bias
  // ([0] without bias), grad_student: G tensors for the loss else none); parameter
  // gradients in float32 (float64 for float64). Deterministic. mask: the loss's, as above.
  m.def(
      "kv_project_backward(Tensor? grad_out, Tensor[] kv, Tensor head_mix, Tensor dim_proj, "
      "Tensor? bias, Tensor ptr, Tensor idx, Tensor weight, Tensor t_ptr, Tensor t_col, "
      "Tensor t_edge, Tensor[] student, Tensor? loss_grad, str loss, bool need_kv, "
      "Tensor? mask=None) -> (Tensor[], Tensor, Tensor, Tensor, Tensor[])");
}

namespace fastcore {
void register_cpu_cache(pybind11::module& m);  // csrc/cpu/cpu_cache.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcore's compiled operators (importing this module registers them)";
  fastcore::register_cpu_cache(m);
  m.def("build_info", [] {
    pybind11::dict info;
#ifdef FASTCORE_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  }, "What this build of fastcore._C contains.");
}
