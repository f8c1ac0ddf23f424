// CUDA kernels for segment reductions: segment_reduce (sum / mean / max / min over CSR
// segments along a dim; csr_sum, gather's backward, is its sum) and segment_arg_scatter
// (the max/min backward). Free of torch headers so that `nvcc -c` can check it without a
// CUDA torch; csrc/cuda/segment.cpp and csrc/cuda/gather.cpp hold the torch glue, and
// segment_launch.h declares the launchers below.
//
// Both kernels work on output rows of the folded view [outer, segments, inner]: a block is
// blockDim.x threads across a row (the contiguous inner dimension, in packs of VEC
// elements) times blockDim.y rows, and a grid-stride loop walks the rows, so any row count
// works with a capped grid. A thread reduces its VEC columns over the segment's members
// sequentially, in CSR order: deterministic, no atomics. All offsets are int64.
//
// Memory safety without checks (as the CPU kernel): segment r covers the entries
// [lo, hi) with lo = clamp(ptr[r], 0, size), hi = clamp(ptr[r+1], lo, size), and a perm
// entry outside [0, size) takes part in nothing (a mean divides by the members it folded
// in). A valid CSR reads exactly as before.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "numeric.cuh"
#include "row_launch.cuh"

#include "segment_launch.h"

namespace {

using fastcore_cuda::kThreads;
using fastcore_cuda::RowLaunch;
using fastcore_cuda::row_launch;

using fastcore_cuda::Acc;
using fastcore_cuda::Pack;

// Whether m names a source row of [0, size).
__device__ __forceinline__ bool in_rows(int64_t m, int64_t size) {
  return static_cast<uint64_t>(m) < static_cast<uint64_t>(size);
}

// ---------------------------------------------------------------------------
// segment_reduce: out[o, r, :] = reduce_{k in [ptr[r], ptr[r+1])} src[o, perm ? perm[k] : k, :]

template <typename scalar_t, int VEC, int R>
__global__ void __launch_bounds__(kThreads)
    segment_reduce_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ perm,
                          const int64_t* __restrict__ ptr, scalar_t* __restrict__ out,
                          int64_t* __restrict__ arg, int64_t outer, int64_t size,
                          int64_t segments, int64_t inner) {
  using A = Acc<scalar_t>;
  using acc_t = typename A::type;
  using pack_t = Pack<scalar_t, VEC>;
  using arg_pack_t = Pack<int64_t, VEC>;
  constexpr bool arg_reduce = R == FASTCORE_SEGMENT_MAX || R == FASTCORE_SEGMENT_MIN;
  const int64_t width = inner / VEC;  // packs per row; the launcher ensures inner % VEC == 0
  const int64_t rows = outer * segments;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += stride) {
    const int64_t o = outer == 1 ? 0 : row / segments;  // skip the int64 division when dim == 0
    const int64_t r = row - o * segments;
    const int64_t begin = min(max(ptr[r], int64_t(0)), size);
    const int64_t end = min(max(ptr[r + 1], begin), size);
    const pack_t* base = reinterpret_cast<const pack_t*>(src + o * size * inner);
    pack_t* dst = reinterpret_cast<pack_t*>(out + row * inner);
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
      acc_t acc[VEC];
      if constexpr (arg_reduce) {
        arg_pack_t idx;
        // The first member in range starts the row (0 and the position `size` when
        // there is none); a later one replaces it only when strictly better or NaN over
        // a non-NaN, so ties keep the first and the first NaN wins.
        int64_t k = begin;
        int64_t first = size;
        for (; k < end; ++k) {
          const int64_t m = perm ? perm[k] : k;
          if (in_rows(m, size)) {
            first = m;
            break;
          }
        }
        if (first == size) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            acc[i] = acc_t(0);
            idx.v[i] = size;
          }
        } else {
          const pack_t v0 = base[first * width + c];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            acc[i] = A::load(v0.v[i]);
            idx.v[i] = first;
          }
#pragma unroll 4
          for (++k; k < end; ++k) {
            const int64_t m = perm ? perm[k] : k;
            if (!in_rows(m, size)) continue;
            const pack_t v = base[m * width + c];
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              const acc_t x = A::load(v.v[i]);
              const bool better = (R == FASTCORE_SEGMENT_MAX ? x > acc[i] : x < acc[i]) ||
                                  (x != x && acc[i] == acc[i]);
              if (better) {
                acc[i] = x;
                idx.v[i] = m;
              }
            }
          }
        }
        reinterpret_cast<arg_pack_t*>(arg + row * inner)[c] = idx;
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
        // Sequential in k (deterministic); unrolling only lets the loads overlap.
        int64_t folded = 0;
#pragma unroll 4
        for (int64_t k = begin; k < end; ++k) {
          const int64_t m = perm ? perm[k] : k;
          if (!in_rows(m, size)) continue;
          const pack_t v = base[m * width + c];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += A::load(v.v[i]);
          ++folded;
        }
        if (R == FASTCORE_SEGMENT_MEAN && folded > 0) {
          const acc_t count = static_cast<acc_t>(folded);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] = acc[i] / count;
        }
      }
      pack_t res;
#pragma unroll
      for (int i = 0; i < VEC; ++i) res.v[i] = A::store(acc[i]);
      dst[c] = res;
    }
  }
}

// Starts at the widest 16-byte pack and halves VEC until inner and the base addresses
// (src, out, and arg for max/min, whose packs are VEC int64) are multiples of the pack
// (then so is every row start).
template <typename scalar_t, int VEC, int R>
cudaError_t launch_segment_reduce(const void* src, const int64_t* perm, const int64_t* ptr,
                                  void* out, int64_t* arg, int64_t outer, int64_t size,
                                  int64_t segments, int64_t inner, cudaStream_t stream) {
  if constexpr (VEC > 1) {
    constexpr uintptr_t bytes = sizeof(scalar_t) * VEC;
    constexpr uintptr_t arg_bytes = sizeof(int64_t) * VEC;
    const uintptr_t bits = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(out);
    const bool arg_misaligned = (R == FASTCORE_SEGMENT_MAX || R == FASTCORE_SEGMENT_MIN) &&
                                reinterpret_cast<uintptr_t>(arg) % arg_bytes != 0;
    if (inner % VEC != 0 || bits % bytes != 0 || arg_misaligned) {
      return launch_segment_reduce<scalar_t, VEC / 2, R>(src, perm, ptr, out, arg, outer, size,
                                                         segments, inner, stream);
    }
  }
  const RowLaunch l = row_launch(outer * segments, inner / VEC);
  segment_reduce_kernel<scalar_t, VEC, R><<<l.grid, l.block, 0, stream>>>(
      static_cast<const scalar_t*>(src), perm, ptr, static_cast<scalar_t*>(out), arg, outer, size,
      segments, inner);
  return cudaGetLastError();
}

// size == 0 still launches: every segment is then empty and its output row is 0.
template <typename scalar_t>
cudaError_t segment_reduce(const void* src, const int64_t* perm, const int64_t* ptr, void* out,
                           int64_t* arg, int64_t outer, int64_t size, int64_t segments,
                           int64_t inner, int reduce, cudaStream_t stream) {
  if (outer <= 0 || segments <= 0 || inner <= 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(scalar_t);
  switch (reduce) {
    case FASTCORE_SEGMENT_SUM:
      return launch_segment_reduce<scalar_t, kVec, FASTCORE_SEGMENT_SUM>(
          src, perm, ptr, out, arg, outer, size, segments, inner, stream);
    case FASTCORE_SEGMENT_MEAN:
      return launch_segment_reduce<scalar_t, kVec, FASTCORE_SEGMENT_MEAN>(
          src, perm, ptr, out, arg, outer, size, segments, inner, stream);
    case FASTCORE_SEGMENT_MAX:
      if (arg == nullptr) return cudaErrorInvalidValue;
      return launch_segment_reduce<scalar_t, kVec, FASTCORE_SEGMENT_MAX>(
          src, perm, ptr, out, arg, outer, size, segments, inner, stream);
    case FASTCORE_SEGMENT_MIN:
      if (arg == nullptr) return cudaErrorInvalidValue;
      return launch_segment_reduce<scalar_t, kVec, FASTCORE_SEGMENT_MIN>(
          src, perm, ptr, out, arg, outer, size, segments, inner, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------------------
// segment_arg_scatter: out[o, arg[o, r, j], j] = grad[o, r, j] where arg[o, r, j] < size.
// Moves the elements' bits (bits_t of the element's width): no arithmetic.

template <typename bits_t>
__global__ void __launch_bounds__(kThreads)
    segment_arg_scatter_kernel(const bits_t* __restrict__ grad, const int64_t* __restrict__ arg,
                               bits_t* __restrict__ out, int64_t outer, int64_t segments,
                               int64_t size, int64_t inner) {
  const int64_t rows = outer * segments;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += stride) {
    const int64_t o = outer == 1 ? 0 : row / segments;  // skip the int64 division when dim == 0
    const bits_t* g = grad + row * inner;
    const int64_t* a = arg + row * inner;
    bits_t* slab = out + o * size * inner;
    for (int64_t j = threadIdx.x; j < inner; j += blockDim.x) {
      const int64_t m = a[j];
      if (in_rows(m, size)) slab[m * inner + j] = g[j];
    }
  }
}

template <typename bits_t>
cudaError_t segment_arg_scatter(const void* grad, const int64_t* arg, void* out, int64_t outer,
                                int64_t segments, int64_t size, int64_t inner,
                                cudaStream_t stream) {
  if (outer <= 0 || segments <= 0 || size <= 0 || inner <= 0) return cudaSuccess;
  const RowLaunch l = row_launch(outer * segments, inner);
  segment_arg_scatter_kernel<bits_t><<<l.grid, l.block, 0, stream>>>(
      static_cast<const bits_t*>(grad), arg, static_cast<bits_t*>(out), outer, segments, size,
      inner);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

cudaError_t fastcore_segment_reduce_cuda_f32(const void* src, const int64_t* perm,
                                             const int64_t* ptr, void* out, int64_t* arg,
                                             int64_t outer, int64_t size, int64_t segments,
                                             int64_t inner, int reduce, cudaStream_t stream) {
  return segment_reduce<float>(src, perm, ptr, out, arg, outer, size, segments, inner, reduce,
                               stream);
}

cudaError_t fastcore_segment_reduce_cuda_f64(const void* src, const int64_t* perm,
                                             const int64_t* ptr, void* out, int64_t* arg,
                                             int64_t outer, int64_t size, int64_t segments,
                                             int64_t inner, int reduce, cudaStream_t stream) {
  return segment_reduce<double>(src, perm, ptr, out, arg, outer, size, segments, inner, reduce,
                                stream);
}

cudaError_t fastcore_segment_reduce_cuda_f16(const void* src, const int64_t* perm,
                                             const int64_t* ptr, void* out, int64_t* arg,
                                             int64_t outer, int64_t size, int64_t segments,
                                             int64_t inner, int reduce, cudaStream_t stream) {
  return segment_reduce<__half>(src, perm, ptr, out, arg, outer, size, segments, inner, reduce,
                                stream);
}

cudaError_t fastcore_segment_reduce_cuda_bf16(const void* src, const int64_t* perm,
                                              const int64_t* ptr, void* out, int64_t* arg,
                                              int64_t outer, int64_t size, int64_t segments,
                                              int64_t inner, int reduce, cudaStream_t stream) {
  return segment_reduce<__nv_bfloat16>(src, perm, ptr, out, arg, outer, size, segments, inner,
                                       reduce, stream);
}

cudaError_t fastcore_segment_arg_scatter_cuda_f32(const void* grad, const int64_t* arg, void* out,
                                                  int64_t outer, int64_t segments, int64_t size,
                                                  int64_t inner, cudaStream_t stream) {
  return segment_arg_scatter<uint32_t>(grad, arg, out, outer, segments, size, inner, stream);
}

cudaError_t fastcore_segment_arg_scatter_cuda_f64(const void* grad, const int64_t* arg, void* out,
                                                  int64_t outer, int64_t segments, int64_t size,
                                                  int64_t inner, cudaStream_t stream) {
  return segment_arg_scatter<uint64_t>(grad, arg, out, outer, segments, size, inner, stream);
}

cudaError_t fastcore_segment_arg_scatter_cuda_f16(const void* grad, const int64_t* arg, void* out,
                                                  int64_t outer, int64_t segments, int64_t size,
                                                  int64_t inner, cudaStream_t stream) {
  return segment_arg_scatter<uint16_t>(grad, arg, out, outer, segments, size, inner, stream);
}

cudaError_t fastcore_segment_arg_scatter_cuda_bf16(const void* grad, const int64_t* arg,
                                                   void* out, int64_t outer, int64_t segments,
                                                   int64_t size, int64_t inner,
                                                   cudaStream_t stream) {
  return segment_arg_scatter<uint16_t>(grad, arg, out, outer, segments, size, inner, stream);
}

}  // extern "C"
