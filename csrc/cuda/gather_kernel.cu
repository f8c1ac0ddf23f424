// CUDA kernel for gather (index_select). Free of torch headers so that `nvcc -c` can
// check it without a CUDA torch; csrc/cuda/gather.cpp holds the torch glue. csr_sum, its
// deterministic transpose, is the sum of segment_reduce (csrc/cuda/segment_kernel.cu).
//
// The kernel works on rows of the folded view [outer, size, inner]: a block is
// blockDim.x threads across a row (the contiguous inner dimension, in vector
// units) times blockDim.y rows, and a grid-stride loop walks the rows, so any
// row count works with a capped grid. All offsets are int64. An index outside [0, N)
// (possible only with check=False) writes a zero row: nothing outside the tensors is read.
#include <cuda_runtime.h>

#include <cstdint>

#include "row_launch.cuh"

namespace {

using fastcore_cuda::kThreads;
using fastcore_cuda::RowLaunch;
using fastcore_cuda::row_launch;

// ---------------------------------------------------------------------------
// gather: out[o, m, :] = src[o, index[m], :], copied as `width` vec_t per row.

template <typename index_t, typename vec_t>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const vec_t* __restrict__ src, const index_t* __restrict__ index,
                  vec_t* __restrict__ out, int64_t outer, int64_t N, int64_t M, int64_t width) {
  const int64_t rows = outer * M;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += stride) {
    const int64_t o = outer == 1 ? 0 : row / M;  // skip the int64 division when dim == 0
    const int64_t m = row - o * M;
    const int64_t i = static_cast<int64_t>(index[m]);
    vec_t* d = out + row * width;
    if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(N)) {
      for (int64_t c = threadIdx.x; c < width; c += blockDim.x) d[c] = vec_t{};
      continue;
    }
    const vec_t* s = src + (o * N + i) * width;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) d[c] = s[c];
  }
}

// The unsigned type of each vector width.
template <int BYTES> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<2> { using type = uint16_t; };
template <> struct VecOf<1> { using type = uint8_t; };

// Starts at 16-byte vectors and halves BYTES until it divides row_bytes and both
// base addresses (then every row start in src and out is aligned to it too).
template <typename index_t, int BYTES>
cudaError_t launch_gather(const void* src, const void* index, void* out, int64_t outer, int64_t N,
                          int64_t M, int64_t row_bytes, cudaStream_t stream) {
  if constexpr (BYTES > 1) {
    const uintptr_t bits = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(out) |
                           static_cast<uintptr_t>(row_bytes);
    if (bits % BYTES != 0) {
      return launch_gather<index_t, BYTES / 2>(src, index, out, outer, N, M, row_bytes, stream);
    }
  }
  using vec_t = typename VecOf<BYTES>::type;
  const int64_t width = row_bytes / BYTES;
  const RowLaunch l = row_launch(outer * M, width);
  gather_kernel<index_t, vec_t><<<l.grid, l.block, 0, stream>>>(
      static_cast<const vec_t*>(src), static_cast<const index_t*>(index),
      static_cast<vec_t*>(out), outer, N, M, width);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t fastcore_gather_cuda(const void* src, const void* index, int index_is_int64,
                                            void* out, int64_t outer, int64_t N, int64_t M,
                                            int64_t row_bytes, cudaStream_t stream) {
  if (outer <= 0 || N <= 0 || M <= 0 || row_bytes <= 0) return cudaSuccess;
  return index_is_int64
             ? launch_gather<int64_t, 16>(src, index, out, outer, N, M, row_bytes, stream)
             : launch_gather<int32_t, 16>(src, index, out, outer, N, M, row_bytes, stream);
}
