// CUDA registration of gather: checks, layout and dispatch on the host; the kernel is
// torch-free in gather_kernel.cu, behind the extern "C" launcher declared below. Its
// backward, csr_sum, is registered with the segment reductions (csrc/cuda/segment.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>

#include "../utils.h"

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

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CUDA, m) {
  m.impl("gather", &gather_cuda);
}

}  // namespace fastcore
