// CUDA kernels for graph convolution: spmm (sparse adjacency, edges grouped by destination
// in a CSR, times dense features along a dim) and spmm_edge_grad (its edge-weight gradient,
// an SDDMM). Free of torch headers so that `nvcc -c` can check it without a CUDA torch;
// csrc/cuda/spmm.cpp holds the torch glue, and spmm_launch.h declares the launchers below.
// spmm's x-gradient is spmm over the transpose (the Python side calls it): no kernel here.
//
// The dense tensors are viewed as [outer, nodes, inner]. Every output element sums its
// terms in one fixed order, whatever the launch geometry: results are bit-identical run to
// run, with no atomics. All offsets are int64.
//
// * spmm: one thread per (output row, pack of VEC columns), as segment_kernel.cu's reduce:
//   a block is blockDim.x threads across a row times blockDim.y rows, a grid-stride loop
//   walks the outer * V rows, and each thread sums its columns over the row's CSR entries
//   sequentially, in CSR order.
// * spmm_edge_grad: one warp per CSR entry k. A block takes a (destination row v, chunk of
//   outer) task in a grid-stride loop and its warps take v's entries in turn, so the
//   destination of every entry is known without a search. A warp's lanes cover a fixed
//   (o, j) pattern of the chunk (fixed by the shape), each accumulating its products in
//   float64, then a fixed shuffle tree adds the 32 lanes. A shape with too few entries to
//   fill the GPU splits outer into ascending chunks: float64 partial sums per (chunk, k) in
//   a workspace, added in ascending chunk order by a second kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "numeric.cuh"
#include "row_launch.cuh"

#include "spmm_launch.h"

namespace {

using fastcore_cuda::kMaxBlocks;
using fastcore_cuda::kThreads;
using fastcore_cuda::RowLaunch;
using fastcore_cuda::row_launch;

constexpr int kWarp = 32;

using fastcore_cuda::Acc;
using fastcore_cuda::Pack;
using fastcore_cuda::to_double;

// ---------------------------------------------------------------------------
// spmm: out[o, v, :] = sum_{k in [ptr[v], ptr[v+1])} weight[k] * x[o, col[k], :]
//                      (+ x[o, v, :] after the sum when residual)

template <typename scalar_t, int VEC, bool WEIGHTED>
__global__ void __launch_bounds__(kThreads)
    spmm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                const int64_t* __restrict__ ptr, const int64_t* __restrict__ col,
                scalar_t* __restrict__ out, int64_t outer, int64_t n_src, int64_t segments,
                int64_t inner, bool residual) {
  using A = Acc<scalar_t>;
  using acc_t = typename A::type;
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t width = inner / VEC;  // packs per row; the launcher ensures inner % VEC == 0
  const int64_t rows = outer * segments;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += stride) {
    const int64_t o = outer == 1 ? 0 : row / segments;  // skip the int64 division when dim == 0
    const int64_t v = row - o * segments;
    const int64_t begin = ptr[v];
    const int64_t end = ptr[v + 1];
    const pack_t* base = reinterpret_cast<const pack_t*>(x + o * n_src * inner);
    pack_t* dst = reinterpret_cast<pack_t*>(out + row * inner);
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
      acc_t acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
      // Sequential in k (deterministic); unrolling only lets the loads overlap.
#pragma unroll 4
      for (int64_t k = begin; k < end; ++k) {
        const pack_t p = base[col[k] * width + c];
        if constexpr (WEIGHTED) {
          const acc_t w = A::load(weight[k]);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += w * A::load(p.v[i]);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += A::load(p.v[i]);
        }
      }
      if (residual) {  // the row's own input, added last (square graphs: n_src == segments)
        const pack_t p = base[v * width + c];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += A::load(p.v[i]);
      }
      pack_t res;
#pragma unroll
      for (int i = 0; i < VEC; ++i) res.v[i] = A::store(acc[i]);
      dst[c] = res;
    }
  }
}

// Starts at the widest 16-byte pack and halves VEC until inner and both base addresses
// (x, out) are multiples of the pack (then so is every row start). The pack width changes
// only how the columns are loaded, never the order of any sum.
template <typename scalar_t, int VEC, bool WEIGHTED>
cudaError_t launch_spmm(const void* x, const void* weight, const int64_t* ptr, const int64_t* col,
                        void* out, int64_t outer, int64_t n_src, int64_t segments, int64_t inner,
                        bool residual, cudaStream_t stream) {
  if constexpr (VEC > 1) {
    constexpr uintptr_t bytes = sizeof(scalar_t) * VEC;
    const uintptr_t bits = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out);
    if (inner % VEC != 0 || bits % bytes != 0) {
      return launch_spmm<scalar_t, VEC / 2, WEIGHTED>(x, weight, ptr, col, out, outer, n_src,
                                                      segments, inner, residual, stream);
    }
  }
  const RowLaunch l = row_launch(outer * segments, inner / VEC);
  spmm_kernel<scalar_t, VEC, WEIGHTED><<<l.grid, l.block, 0, stream>>>(
      static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(weight), ptr, col,
      static_cast<scalar_t*>(out), outer, n_src, segments, inner, residual);
  return cudaGetLastError();
}

// n_src == 0 still launches: every row is then empty (a valid CSR has no entries) and 0.
template <typename scalar_t>
cudaError_t spmm(const void* x, const void* weight, const int64_t* ptr, const int64_t* col,
                 void* out, int64_t outer, int64_t n_src, int64_t segments, int64_t inner,
                 int residual, cudaStream_t stream) {
  if (outer <= 0 || segments <= 0 || inner <= 0) return cudaSuccess;
  if (residual && n_src != segments) return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (weight != nullptr) {
    return launch_spmm<scalar_t, kVec, true>(x, weight, ptr, col, out, outer, n_src, segments,
                                             inner, residual != 0, stream);
  }
  return launch_spmm<scalar_t, kVec, false>(x, weight, ptr, col, out, outer, n_src, segments,
                                            inner, residual != 0, stream);
}

// ---------------------------------------------------------------------------
// spmm_edge_grad: out[k] = sum_{o, j} grad[o, v_k, j] * x[o, col[k], j]

// Launch plan, a function of the shape alone (so is every summation order).
constexpr int64_t kEdgeTargetWarps = 16384;  // warps wanted in flight (a few per SM slot)
constexpr int64_t kEdgeMinWork = 4096;        // elements per warp and chunk, at least
constexpr int64_t kEdgeMaxWorkspace = int64_t(1) << 22;  // doubles (32 MiB)

struct EdgePlan {
  int64_t splits;    // chunks of outer (1: no workspace)
  int64_t chunk;     // outer indices per chunk
  unsigned warps;    // warps per block (one entry each at a time)
  int lane_cols;     // log2 of the lanes along j; the other lanes step through o
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Requires outer, segments, edges, inner > 0.
inline EdgePlan edge_plan(int64_t outer, int64_t segments, int64_t edges, int64_t inner) {
  EdgePlan p{1, outer, 1, 0};
  // Warps per block: about the mean number of entries per destination row.
  const int64_t mean_degree = ceil_div(edges, segments);
  while (p.warps < static_cast<unsigned>(kThreads / kWarp) && p.warps < mean_degree) p.warps *= 2;
  // Lanes along j: the smallest power of two >= inner, at most a warp.
  while ((int64_t(1) << p.lane_cols) < inner && (1 << p.lane_cols) < kWarp) ++p.lane_cols;
  // Too few entries to keep the GPU busy: split outer.
  const int64_t busy = edges < segments * p.warps ? edges : segments * p.warps;
  if (outer > 1 && busy < kEdgeTargetWarps) {
    int64_t s = ceil_div(kEdgeTargetWarps, busy);
    const int64_t by_work = ceil_div(outer * inner, kEdgeMinWork);
    const int64_t by_memory = kEdgeMaxWorkspace / edges > 1 ? kEdgeMaxWorkspace / edges : 1;
    if (s > by_work) s = by_work;
    if (s > by_memory) s = by_memory;
    if (s > outer) s = outer;
    if (s > 1) {
      p.chunk = ceil_div(outer, s);
      p.splits = ceil_div(outer, p.chunk);  // no empty chunk
    }
  }
  return p;
}

// Task t = s * segments + v: the entries of row v over outer indices
// [s * chunk, min(outer, (s + 1) * chunk)). Lane (ol, jl) of a warp adds
// grad[o, v, j] * x[o, col[k], j] for o = o_begin + ol + G * n and j = jl + P * m
// (P = 2^lane_cols lanes along j, G = 32 / P along o), o outer and j inner, in float64;
// then a fixed shuffle tree sums the lanes. PARTIAL: the sum goes to
// partial[s * edges + k], otherwise (splits == 1) straight to out[k].
template <typename scalar_t, bool PARTIAL>
__global__ void __launch_bounds__(kThreads)
    spmm_edge_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                          const int64_t* __restrict__ ptr, const int64_t* __restrict__ col,
                          scalar_t* __restrict__ out, double* __restrict__ partial,
                          int64_t outer, int64_t n_src, int64_t segments, int64_t edges,
                          int64_t inner, int64_t splits, int64_t chunk, int lane_cols) {
  const int lane = static_cast<int>(threadIdx.x);
  const int64_t jl = lane & ((1 << lane_cols) - 1);
  const int64_t ol = lane >> lane_cols;
  const int64_t lanes_j = int64_t(1) << lane_cols;
  const int64_t lanes_o = kWarp >> lane_cols;
  const int64_t tasks = splits * segments;
  for (int64_t t = blockIdx.x; t < tasks; t += gridDim.x) {
    const int64_t s = splits == 1 ? 0 : t / segments;
    const int64_t v = t - s * segments;
    const int64_t o_begin = s * chunk;
    const int64_t o_end = o_begin + chunk < outer ? o_begin + chunk : outer;
    const int64_t end = ptr[v + 1];
    // Warp-uniform loop: every lane of a warp takes the same k.
    for (int64_t k = ptr[v] + threadIdx.y; k < end; k += blockDim.y) {
      const int64_t c = col[k];
      double acc = 0.0;
      for (int64_t o = o_begin + ol; o < o_end; o += lanes_o) {
        const scalar_t* g = grad + (o * segments + v) * inner;
        const scalar_t* xr = x + (o * n_src + c) * inner;
        // Sequential in j (deterministic); unrolling only lets the loads overlap.
#pragma unroll 4
        for (int64_t j = jl; j < inner; j += lanes_j) acc += to_double(g[j]) * to_double(xr[j]);
      }
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        acc += __shfl_down_sync(0xffffffffu, acc, offset);
      }
      if (lane == 0) {
        if constexpr (PARTIAL) {
          partial[s * edges + k] = acc;
        } else {
          out[k] = Acc<scalar_t>::from_double(acc);
        }
      }
    }
  }
}

// out[k] = sum over s ascending of partial[s * edges + k], rounded once.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    spmm_edge_grad_sum_kernel(const double* __restrict__ partial, scalar_t* __restrict__ out,
                              int64_t edges, int64_t splits) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < edges;
       k += stride) {
    double acc = 0.0;
    for (int64_t s = 0; s < splits; ++s) acc += partial[s * edges + k];
    out[k] = Acc<scalar_t>::from_double(acc);
  }
}

int64_t edge_grad_workspace(int64_t outer, int64_t segments, int64_t edges, int64_t inner) {
  if (outer <= 0 || segments <= 0 || edges <= 0 || inner <= 0) return 0;
  const EdgePlan p = edge_plan(outer, segments, edges, inner);
  return p.splits > 1 ? p.splits * edges : 0;
}

// outer == 0 or inner == 0: zeros (the plan then never splits and every sum is empty).
template <typename scalar_t>
cudaError_t spmm_edge_grad(const void* grad, const void* x, const int64_t* ptr,
                           const int64_t* col, void* out, double* workspace, int64_t outer,
                           int64_t n_src, int64_t segments, int64_t edges, int64_t inner,
                           cudaStream_t stream) {
  if (segments <= 0 || edges <= 0) return cudaSuccess;
  if (outer < 0 || inner < 0) return cudaErrorInvalidValue;
  // No (o, j) at all: every sum is empty, and the kernel, run over no o, writes 0 to each
  // entry (grad and x are never read).
  if (inner == 0) outer = 0;
  const EdgePlan p = outer == 0 ? EdgePlan{1, 0, 1, 0} : edge_plan(outer, segments, edges, inner);
  if (p.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t tasks = p.splits * segments;
  const dim3 block(kWarp, p.warps);
  const dim3 grid(static_cast<unsigned>(tasks < kMaxBlocks ? tasks : kMaxBlocks));
  const auto* g = static_cast<const scalar_t*>(grad);
  const auto* xs = static_cast<const scalar_t*>(x);
  auto* o = static_cast<scalar_t*>(out);
  if (p.splits == 1) {
    spmm_edge_grad_kernel<scalar_t, false><<<grid, block, 0, stream>>>(
        g, xs, ptr, col, o, nullptr, outer, n_src, segments, edges, inner, 1, p.chunk,
        p.lane_cols);
    return cudaGetLastError();
  }
  spmm_edge_grad_kernel<scalar_t, true><<<grid, block, 0, stream>>>(
      g, xs, ptr, col, o, workspace, outer, n_src, segments, edges, inner, p.splits, p.chunk,
      p.lane_cols);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t blocks = ceil_div(edges, kThreads);
  spmm_edge_grad_sum_kernel<scalar_t>
      <<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, 0, stream>>>(
          workspace, o, edges, p.splits);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

cudaError_t fastcore_spmm_cuda_f32(const void* x, const void* weight, const int64_t* ptr,
                                   const int64_t* col, void* out, int64_t outer, int64_t n_src,
                                   int64_t segments, int64_t inner, int residual,
                                   cudaStream_t stream) {
  return spmm<float>(x, weight, ptr, col, out, outer, n_src, segments, inner, residual, stream);
}

cudaError_t fastcore_spmm_cuda_f64(const void* x, const void* weight, const int64_t* ptr,
                                   const int64_t* col, void* out, int64_t outer, int64_t n_src,
                                   int64_t segments, int64_t inner, int residual,
                                   cudaStream_t stream) {
  return spmm<double>(x, weight, ptr, col, out, outer, n_src, segments, inner, residual, stream);
}

cudaError_t fastcore_spmm_cuda_f16(const void* x, const void* weight, const int64_t* ptr,
                                   const int64_t* col, void* out, int64_t outer, int64_t n_src,
                                   int64_t segments, int64_t inner, int residual,
                                   cudaStream_t stream) {
  return spmm<__half>(x, weight, ptr, col, out, outer, n_src, segments, inner, residual, stream);
}

cudaError_t fastcore_spmm_cuda_bf16(const void* x, const void* weight, const int64_t* ptr,
                                    const int64_t* col, void* out, int64_t outer, int64_t n_src,
                                    int64_t segments, int64_t inner, int residual,
                                   cudaStream_t stream) {
  return spmm<__nv_bfloat16>(x, weight, ptr, col, out, outer, n_src, segments, inner, residual, stream);
}

int64_t fastcore_spmm_edge_grad_cuda_workspace(int64_t outer, int64_t segments, int64_t edges,
                                               int64_t inner) {
  return edge_grad_workspace(outer, segments, edges, inner);
}

cudaError_t fastcore_spmm_edge_grad_cuda_f32(const void* grad, const void* x, const int64_t* ptr,
                                             const int64_t* col, void* out, double* workspace,
                                             int64_t outer, int64_t n_src, int64_t segments,
                                             int64_t edges, int64_t inner, cudaStream_t stream) {
  return spmm_edge_grad<float>(grad, x, ptr, col, out, workspace, outer, n_src, segments, edges,
                               inner, stream);
}

cudaError_t fastcore_spmm_edge_grad_cuda_f64(const void* grad, const void* x, const int64_t* ptr,
                                             const int64_t* col, void* out, double* workspace,
                                             int64_t outer, int64_t n_src, int64_t segments,
                                             int64_t edges, int64_t inner, cudaStream_t stream) {
  return spmm_edge_grad<double>(grad, x, ptr, col, out, workspace, outer, n_src, segments, edges,
                                inner, stream);
}

cudaError_t fastcore_spmm_edge_grad_cuda_f16(const void* grad, const void* x, const int64_t* ptr,
                                             const int64_t* col, void* out, double* workspace,
                                             int64_t outer, int64_t n_src, int64_t segments,
                                             int64_t edges, int64_t inner, cudaStream_t stream) {
  return spmm_edge_grad<__half>(grad, x, ptr, col, out, workspace, outer, n_src, segments, edges,
                                inner, stream);
}

cudaError_t fastcore_spmm_edge_grad_cuda_bf16(const void* grad, const void* x,
                                              const int64_t* ptr, const int64_t* col, void* out,
                                              double* workspace, int64_t outer, int64_t n_src,
                                              int64_t segments, int64_t edges, int64_t inner,
                                              cudaStream_t stream) {
  return spmm_edge_grad<__nv_bfloat16>(grad, x, ptr, col, out, workspace, outer, n_src, segments,
                                       edges, inner, stream);
}

}  // extern "C"
