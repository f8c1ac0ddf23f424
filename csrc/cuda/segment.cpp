// CUDA registrations for the segment reductions: segment_reduce, its max/min backward
// segment_arg_scatter, and csr_sum (gather's backward, the segment sum). Checks, layout and dispatch on the host; the kernels themselves
// live in segment_kernel.cu (torch-free, behind the extern "C" launchers of
// segment_launch.h). Mirrors csrc/cpu/segment.cpp, with the same validation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

#include "../cpu/segment.h"
#include "../utils.h"
#include "segment_launch.h"

namespace fastcore {
namespace {

// `t` (named `name`) must live on `ref`'s (named `ref_name`) CUDA device; the message is
// csrc/cpu/segment.cpp's. Checked before the device guard: the CUDA kernel is also chosen
// when only an index is on the GPU.
void check_same_cuda_device(const at::Tensor& ref, const at::Tensor& t, const char* op,
                            const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(ref.is_cuda() && t.device() == ref.device(), op, ": ", name, " is on ",
                    t.device(), " but ", ref_name, " is on ", ref.device());
}

void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

int reduce_code(Reduce r) {
  switch (r) {
    case Reduce::Sum:
      return FASTCORE_SEGMENT_SUM;
    case Reduce::Mean:
      return FASTCORE_SEGMENT_MEAN;
    case Reduce::Max:
      return FASTCORE_SEGMENT_MAX;
    case Reduce::Min:
      return FASTCORE_SEGMENT_MIN;
  }
  return FASTCORE_SEGMENT_SUM;
}

std::tuple<at::Tensor, at::Tensor> segment_reduce_cuda_impl(const at::Tensor& src,
                                                            const std::optional<at::Tensor>& perm,
                                                            const at::Tensor& ptr, int64_t dim,
                                                            Reduce r, bool check, const char* op) {
  check_index_tensor(ptr, op, "ptr");
  check_same_cuda_device(src, ptr, op, "ptr", "src");
  if (perm.has_value()) {
    check_index_tensor(*perm, op, "perm");
    check_same_cuda_device(src, *perm, op, "perm", "src");
  }
  check_float_dtype(src, op, "src");
  const c10::cuda::CUDAGuard guard(src.device());
  const Fold f = fold_at(src, dim);
  check_csr_shapes(ptr, perm, f.size, op);
  if (check) check_csr(ptr, perm, f.size, op, dim);

  const int64_t segments = ptr.numel() - 1;
  const bool arg_reduce = r == Reduce::Max || r == Reduce::Min;
  auto out = at::empty(shape_with(src, dim, segments), src.options());
  auto arg = arg_reduce ? at::empty(out.sizes(), src.options().dtype(at::kLong))
                        : at::empty({0}, src.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, arg};

  const auto src_c = src.contiguous();
  const auto ptr_c = ptr.to(at::kLong).contiguous();
  std::optional<at::Tensor> perm_c;
  if (perm.has_value()) perm_c = perm->to(at::kLong).contiguous();

  const auto dtype = src.scalar_type();
  const auto launch = dtype == at::kFloat    ? &fastcore_segment_reduce_cuda_f32
                      : dtype == at::kDouble ? &fastcore_segment_reduce_cuda_f64
                      : dtype == at::kHalf   ? &fastcore_segment_reduce_cuda_f16
                                             : &fastcore_segment_reduce_cuda_bf16;
  const cudaError_t err =
      launch(src_c.const_data_ptr(), perm_c ? perm_c->const_data_ptr<int64_t>() : nullptr,
             ptr_c.const_data_ptr<int64_t>(), out.mutable_data_ptr(),
             arg_reduce ? arg.mutable_data_ptr<int64_t>() : nullptr, f.outer, f.size, segments,
             f.inner, reduce_code(r), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {out, arg};
}

std::tuple<at::Tensor, at::Tensor> segment_reduce_cuda(const at::Tensor& src,
                                                       const std::optional<at::Tensor>& perm,
                                                       const at::Tensor& ptr, int64_t dim,
                                                       c10::string_view reduce, bool check) {
  const Reduce r = parse_reduce(std::string_view(reduce.data(), reduce.size()), "segment_reduce");
  return segment_reduce_cuda_impl(src, perm, ptr, dim, r, check, "segment_reduce");
}

// gather's backward: the segment sum.
at::Tensor csr_sum_cuda(const at::Tensor& src, const std::optional<at::Tensor>& perm,
                        const at::Tensor& ptr, int64_t dim, bool check) {
  return std::get<0>(segment_reduce_cuda_impl(src, perm, ptr, dim, Reduce::Sum, check, "csr_sum"));
}

at::Tensor segment_arg_scatter_cuda(const at::Tensor& grad, const at::Tensor& arg, int64_t dim,
                                    int64_t size) {
  constexpr const char* op = "segment_arg_scatter";
  TORCH_CHECK_TYPE(arg.scalar_type() == at::kLong, op, ": arg must be int64, got ",
                   arg.scalar_type());
  TORCH_CHECK_VALUE(arg.sizes() == grad.sizes(), op, ": arg shape ", arg.sizes(),
                    " must equal grad shape ", grad.sizes());
  TORCH_CHECK_VALUE(size >= 0, op, ": size must be >= 0, got ", size);
  check_same_cuda_device(grad, arg, op, "arg", "grad");
  check_float_dtype(grad, op, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const Fold f = fold_at(grad, dim);

  auto out = at::zeros(shape_with(grad, dim, size), grad.options());
  if (grad.numel() == 0 || out.numel() == 0) return out;

  const auto grad_c = grad.contiguous();
  const auto arg_c = arg.contiguous();
  const auto dtype = grad.scalar_type();
  const auto launch = dtype == at::kFloat    ? &fastcore_segment_arg_scatter_cuda_f32
                      : dtype == at::kDouble ? &fastcore_segment_arg_scatter_cuda_f64
                      : dtype == at::kHalf   ? &fastcore_segment_arg_scatter_cuda_f16
                                             : &fastcore_segment_arg_scatter_cuda_bf16;
  const cudaError_t err =
      launch(grad_c.const_data_ptr(), arg_c.const_data_ptr<int64_t>(), out.mutable_data_ptr(),
             f.outer, f.size, size, f.inner, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CUDA, m) {
  m.impl("segment_reduce", &segment_reduce_cuda);
  m.impl("csr_sum", &csr_sum_cuda);
  m.impl("segment_arg_scatter", &segment_arg_scatter_cuda);
}

}  // namespace fastcore
