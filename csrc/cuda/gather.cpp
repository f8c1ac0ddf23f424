// CUDA registrations for the gather family: checks, layout and dispatch on the
// host; the kernels themselves are torch-free, behind extern "C" launchers: gather's in
// gather_kernel.cu (declared below), and csr_sum runs segment_reduce's sum
// (segment_kernel.cu, declared in segment_launch.h). Mirrors csrc/cpu/gather.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>

#include "../utils.h"
#include "segment_launch.h"

extern "C" cudaError_t fastcore_gather_cuda(const void* src, const void* index,
                                            int index_is_int64, void* out, int64_t outer,
                                            int64_t N, int64_t M, int64_t row_bytes,
                                            cudaStream_t stream);

namespace fastcore {
namespace {

// `t` (named `name`) must live on src's CUDA device. Checked before the device
// guard: the CUDA kernel is also chosen when only the index is on the GPU.
void check_same_cuda_device(const at::Tensor& src, const at::Tensor& t, const char* op,
                            const char* name) {
  TORCH_CHECK_VALUE(src.is_cuda() && t.device() == src.device(), op, ": ", name,
                    " must be on the same CUDA device as src, got ", name, " on ", t.device(),
                    " and src on ", src.device());
}

at::Tensor gather_cuda(const at::Tensor& src, const at::Tensor& index, int64_t dim, bool check) {
  check_index_tensor(index, "gather", "index");
  check_same_cuda_device(src, index, "gather", "index");
  const c10::cuda::CUDAGuard guard(src.device());
  const Fold f = fold_at(src, dim);
  if (check) check_index_range(index, f.size, "gather", "index", dim);

  const int64_t rows_out = index.numel();
  auto out = at::empty(shape_with(src, dim, rows_out), src.options());
  if (out.numel() == 0) return out;

  const auto src_c = src.contiguous();
  const auto index_c = index.contiguous();
  const cudaError_t err = fastcore_gather_cuda(
      src_c.const_data_ptr(), index_c.const_data_ptr(), index_c.scalar_type() == at::kLong,
      out.mutable_data_ptr(), f.outer, f.size, rows_out,
      f.inner * static_cast<int64_t>(src.element_size()),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "gather: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor csr_sum_cuda(const at::Tensor& src, const c10::optional<at::Tensor>& perm,
                        const at::Tensor& ptr, int64_t dim, bool check) {
  check_index_tensor(ptr, "csr_sum", "ptr");
  check_same_cuda_device(src, ptr, "csr_sum", "ptr");
  if (perm.has_value()) {
    check_index_tensor(*perm, "csr_sum", "perm");
    check_same_cuda_device(src, *perm, "csr_sum", "perm");
  }
  const auto dtype = src.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "csr_sum: src must be float32, float64, float16 or bfloat16, got ", dtype);
  const c10::cuda::CUDAGuard guard(src.device());
  const Fold f = fold_at(src, dim);
  if (check) check_csr(ptr, perm, f.size, "csr_sum", dim);

  const int64_t segments = ptr.numel() - 1;
  auto out = at::empty(shape_with(src, dim, segments), src.options());
  if (out.numel() == 0) return out;

  const auto src_c = src.contiguous();
  const auto ptr_c = ptr.to(at::kLong).contiguous();
  c10::optional<at::Tensor> perm_c;
  if (perm.has_value()) perm_c = perm->to(at::kLong).contiguous();

  const auto launch = dtype == at::kFloat    ? &fastcore_segment_reduce_cuda_f32
                      : dtype == at::kDouble ? &fastcore_segment_reduce_cuda_f64
                      : dtype == at::kHalf   ? &fastcore_segment_reduce_cuda_f16
                                             : &fastcore_segment_reduce_cuda_bf16;
  const cudaError_t err =
      launch(src_c.const_data_ptr(), perm_c ? perm_c->const_data_ptr<int64_t>() : nullptr,
             ptr_c.const_data_ptr<int64_t>(), out.mutable_data_ptr(), /*arg=*/nullptr, f.outer,
             f.size, segments, f.inner, FASTCORE_SEGMENT_SUM,
             c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "csr_sum: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CUDA, m) {
  m.impl("gather", &gather_cuda);
  m.impl("csr_sum", &csr_sum_cuda);
}

}  // namespace fastcore
