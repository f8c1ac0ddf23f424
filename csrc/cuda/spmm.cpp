// CUDA registrations for graph convolution: spmm and its edge-weight gradient
// spmm_edge_grad. Checks, layout and dispatch on the host; the kernels themselves live in
// spmm_kernel.cu (torch-free, behind the extern "C" launchers of spmm_launch.h). Mirrors
// csrc/cpu/spmm.cpp, with the same validation (csrc/spmm_checks.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../spmm_checks.h"
#include "../utils.h"
#include "spmm_launch.h"

namespace fastcore {
namespace {

// The dispatcher picks these kernels when any argument is on a CUDA device; once the layout
// checks have put every argument on x's device, x is that CUDA tensor. Checked anyway,
// before the device guard.
void check_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor here, got x on ", x.device());
}

at::Tensor spmm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const at::Tensor& ptr, const at::Tensor& col, const at::Tensor& t_ptr,
                     const at::Tensor& t_col, const at::Tensor& t_edge, const at::Tensor& t_pos,
                     int64_t dim, bool residual, bool check) {
  constexpr const char* op = "spmm";
  check_spmm_layout(x, weight, ptr, col, t_ptr, t_col, t_edge, t_pos, dim, residual, op);
  check_cuda(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  if (check) check_spmm_values(x, ptr, col, t_ptr, t_col, t_edge, t_pos, dim, op);

  const Fold f = fold_at(x, dim);
  const int64_t segments = ptr.numel() - 1;
  auto out = at::empty(shape_with(x, dim, segments), x.options());
  if (out.numel() == 0) return out;

  const auto x_c = x.contiguous();
  const auto ptr_c = ptr.to(at::kLong).contiguous();
  const auto col_c = col.to(at::kLong).contiguous();
  std::optional<at::Tensor> w_c;
  if (weight.has_value()) w_c = weight->contiguous();

  const auto dtype = x.scalar_type();
  const auto launch = dtype == at::kFloat    ? &fastcore_spmm_cuda_f32
                      : dtype == at::kDouble ? &fastcore_spmm_cuda_f64
                      : dtype == at::kHalf   ? &fastcore_spmm_cuda_f16
                                             : &fastcore_spmm_cuda_bf16;
  const cudaError_t err =
      launch(x_c.const_data_ptr(), w_c ? w_c->const_data_ptr() : nullptr,
             ptr_c.const_data_ptr<int64_t>(), col_c.const_data_ptr<int64_t>(),
             out.mutable_data_ptr(), f.outer, f.size, segments, f.inner, residual ? 1 : 0,
             c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor spmm_edge_grad_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& ptr,
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
  // The CPU kernel never sees a grad on another device (the dispatcher would pick this one).
  TORCH_CHECK_VALUE(grad.device() == x.device(), op, ": grad is on ", grad.device(),
                    " but x is on ", x.device());
  check_cuda(x, op);
  const c10::cuda::CUDAGuard guard(x.device());

  const Fold f = fold_at(x, dim);
  const int64_t segments = ptr.numel() - 1;
  const int64_t edges = col.numel();
  auto out = at::empty({edges}, x.options());
  if (out.numel() == 0) return out;
  if (f.outer == 0 || f.inner == 0) return out.zero_();

  const auto grad_c = grad.contiguous();
  const auto x_c = x.contiguous();
  const auto ptr_c = ptr.to(at::kLong).contiguous();
  const auto col_c = col.to(at::kLong).contiguous();
  // Float64 partial sums over chunks of outer, when the shape has too few entries to fill
  // the GPU (the launcher's plan; a function of the shape only).
  const int64_t workspace_size =
      fastcore_spmm_edge_grad_cuda_workspace(f.outer, segments, edges, f.inner);
  const auto workspace = workspace_size > 0
                             ? at::empty({workspace_size}, x.options().dtype(at::kDouble))
                             : at::Tensor();

  const auto dtype = x.scalar_type();
  const auto launch = dtype == at::kFloat    ? &fastcore_spmm_edge_grad_cuda_f32
                      : dtype == at::kDouble ? &fastcore_spmm_edge_grad_cuda_f64
                      : dtype == at::kHalf   ? &fastcore_spmm_edge_grad_cuda_f16
                                             : &fastcore_spmm_edge_grad_cuda_bf16;
  const cudaError_t err =
      launch(grad_c.const_data_ptr(), x_c.const_data_ptr(), ptr_c.const_data_ptr<int64_t>(),
             col_c.const_data_ptr<int64_t>(), out.mutable_data_ptr(),
             workspace.defined() ? workspace.mutable_data_ptr<double>() : nullptr, f.outer,
             f.size, segments, edges, f.inner, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CUDA, m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("spmm_edge_grad", &spmm_edge_grad_cuda);
}

}  // namespace fastcore
