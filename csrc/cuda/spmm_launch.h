// Launchers of the graph-convolution kernels (csrc/cuda/spmm_kernel.cu), used by their torch
// glue csrc/cuda/spmm.cpp (spmm, spmm_edge_grad). Torch-free, like the kernels.
//
// Tensors are raw pointers to contiguous data on the current device: x viewed as
// [outer, n_src, inner], spmm's out and spmm_edge_grad's grad as [outer, segments, inner]
// (segments = V, the number of destination rows), ptr int64 [segments + 1] and col int64
// [edges] a CSR over the edges grouped by destination, weight [edges] in CSR order (x's
// dtype). Every offset is int64. Each launcher enqueues its kernels on `stream` and returns
// the launch error (cudaGetLastError); empty shapes launch nothing and return cudaSuccess.
// The index values are trusted (the glue validates them when asked to).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

extern "C" {

// out[o, v, j] = sum_{k in [ptr[v], ptr[v+1])} weight[k] * x[o, col[k], j], summed in CSR
// order (deterministic, no atomics); weight may be nullptr (every weight 1). With residual
// non-zero (a square structure: n_src == segments, else cudaErrorInvalidValue) each row
// then adds its own x[o, v, j], in the accumulation type. Half types accumulate in
// float32, float64 in float64. An empty row gives 0 (x[o, v, j] with residual). The
// x-gradient of spmm is this product over the transpose (t_ptr, t_col, weight permuted by
// t_edge), with the same residual.
cudaError_t fastcore_spmm_cuda_f32(const void* x, const void* weight, const int64_t* ptr,
                                   const int64_t* col, void* out, int64_t outer, int64_t n_src,
                                   int64_t segments, int64_t inner, int residual,
                                   cudaStream_t stream);
cudaError_t fastcore_spmm_cuda_f64(const void* x, const void* weight, const int64_t* ptr,
                                   const int64_t* col, void* out, int64_t outer, int64_t n_src,
                                   int64_t segments, int64_t inner, int residual,
                                   cudaStream_t stream);
cudaError_t fastcore_spmm_cuda_f16(const void* x, const void* weight, const int64_t* ptr,
                                   const int64_t* col, void* out, int64_t outer, int64_t n_src,
                                   int64_t segments, int64_t inner, int residual,
                                   cudaStream_t stream);
cudaError_t fastcore_spmm_cuda_bf16(const void* x, const void* weight, const int64_t* ptr,
                                    const int64_t* col, void* out, int64_t outer, int64_t n_src,
                                    int64_t segments, int64_t inner, int residual,
                                   cudaStream_t stream);

// The number of float64 elements of scratch memory fastcore_spmm_edge_grad_cuda_* needs for
// this shape (0: none, workspace may be nullptr). A function of the shape only.
int64_t fastcore_spmm_edge_grad_cuda_workspace(int64_t outer, int64_t segments, int64_t edges,
                                               int64_t inner);

// out[k] (k in [0, edges), edges = ptr[segments]) = sum over o and j of
// grad[o, v_k, j] * x[o, col[k], j], with v_k the row whose entries hold k: products and sum
// in float64 over an order fixed by the shape alone (deterministic, no atomics), rounded
// once to x's dtype. outer == 0 or inner == 0 gives zeros. When the workspace size above is
// non-zero, the sum over o is split into ascending chunks whose float64 partial sums go
// through `workspace` (device memory of that many doubles on the current device) and are
// added in ascending order; a missing workspace then returns cudaErrorInvalidValue.
cudaError_t fastcore_spmm_edge_grad_cuda_f32(const void* grad, const void* x, const int64_t* ptr,
                                             const int64_t* col, void* out, double* workspace,
                                             int64_t outer, int64_t n_src, int64_t segments,
                                             int64_t edges, int64_t inner, cudaStream_t stream);
cudaError_t fastcore_spmm_edge_grad_cuda_f64(const void* grad, const void* x, const int64_t* ptr,
                                             const int64_t* col, void* out, double* workspace,
                                             int64_t outer, int64_t n_src, int64_t segments,
                                             int64_t edges, int64_t inner, cudaStream_t stream);
cudaError_t fastcore_spmm_edge_grad_cuda_f16(const void* grad, const void* x, const int64_t* ptr,
                                             const int64_t* col, void* out, double* workspace,
                                             int64_t outer, int64_t n_src, int64_t segments,
                                             int64_t edges, int64_t inner, cudaStream_t stream);
cudaError_t fastcore_spmm_edge_grad_cuda_bf16(const void* grad, const void* x,
                                              const int64_t* ptr, const int64_t* col, void* out,
                                              double* workspace, int64_t outer, int64_t n_src,
                                              int64_t segments, int64_t edges, int64_t inner,
                                              cudaStream_t stream);

}  // extern "C"
