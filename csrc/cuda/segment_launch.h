// Launchers of the segment kernels (csrc/cuda/segment_kernel.cu), shared by their torch
// glue: csrc/cuda/segment.cpp (segment_reduce, segment_arg_scatter) and csrc/cuda/gather.cpp
// (csr_sum, which is segment_reduce with reduce = sum). Torch-free, like the kernels.
//
// Tensors are raw pointers to contiguous data on the current device, viewed as
// [outer, size, inner] (src, arg_scatter's out) and [outer, segments, inner] (reduce's out
// and arg, arg_scatter's grad and arg). Every offset is int64. Each launcher enqueues its
// kernel on `stream` and returns the launch error (cudaGetLastError); empty shapes launch
// nothing and return cudaSuccess.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

extern "C" {

// The `reduce` codes of fastcore_segment_reduce_cuda_*.
enum FastcoreSegmentReduce {
  FASTCORE_SEGMENT_SUM = 0,
  FASTCORE_SEGMENT_MEAN = 1,
  FASTCORE_SEGMENT_MAX = 2,
  FASTCORE_SEGMENT_MIN = 3,
};

// out[o, r, j] reduces src[o, perm ? perm[k] : k, j] for k in [ptr[r], ptr[r+1]), in that
// order (deterministic, no atomics). Half types accumulate in float32, float64 in float64.
//   sum: the sum; mean: the sum / count (0 for an empty segment);
//   max/min: the first member, replaced by a strictly greater / smaller value or by a NaN
//            where the current value is not NaN (NaN propagates, the first NaN wins);
//            arg[o, r, j] = the source row (perm[k] or k) of the chosen value.
// An empty segment gives out = 0 and, for max/min, arg = size. `arg` is written only for
// max/min (it may be nullptr for sum/mean); perm may be nullptr (identity). size == 0 is
// valid (every segment is then empty). An unknown `reduce` returns cudaErrorInvalidValue.
cudaError_t fastcore_segment_reduce_cuda_f32(const void* src, const int64_t* perm,
                                             const int64_t* ptr, void* out, int64_t* arg,
                                             int64_t outer, int64_t size, int64_t segments,
                                             int64_t inner, int reduce, cudaStream_t stream);
cudaError_t fastcore_segment_reduce_cuda_f64(const void* src, const int64_t* perm,
                                             const int64_t* ptr, void* out, int64_t* arg,
                                             int64_t outer, int64_t size, int64_t segments,
                                             int64_t inner, int reduce, cudaStream_t stream);
cudaError_t fastcore_segment_reduce_cuda_f16(const void* src, const int64_t* perm,
                                             const int64_t* ptr, void* out, int64_t* arg,
                                             int64_t outer, int64_t size, int64_t segments,
                                             int64_t inner, int reduce, cudaStream_t stream);
cudaError_t fastcore_segment_reduce_cuda_bf16(const void* src, const int64_t* perm,
                                              const int64_t* ptr, void* out, int64_t* arg,
                                              int64_t outer, int64_t size, int64_t segments,
                                              int64_t inner, int reduce, cudaStream_t stream);

// The backward of max/min: for each (o, r, j) with 0 <= a = arg[o, r, j] < size,
// out[o, a, j] = grad[o, r, j] (bits copied). `out` ([outer, size, inner]) must already be
// zero-filled; segments are disjoint, so no two elements land on the same place.
cudaError_t fastcore_segment_arg_scatter_cuda_f32(const void* grad, const int64_t* arg, void* out,
                                                  int64_t outer, int64_t segments, int64_t size,
                                                  int64_t inner, cudaStream_t stream);
cudaError_t fastcore_segment_arg_scatter_cuda_f64(const void* grad, const int64_t* arg, void* out,
                                                  int64_t outer, int64_t segments, int64_t size,
                                                  int64_t inner, cudaStream_t stream);
cudaError_t fastcore_segment_arg_scatter_cuda_f16(const void* grad, const int64_t* arg, void* out,
                                                  int64_t outer, int64_t segments, int64_t size,
                                                  int64_t inner, cudaStream_t stream);
cudaError_t fastcore_segment_arg_scatter_cuda_bf16(const void* grad, const int64_t* arg,
                                                   void* out, int64_t outer, int64_t segments,
                                                   int64_t size, int64_t inner,
                                                   cudaStream_t stream);

}  // extern "C"
