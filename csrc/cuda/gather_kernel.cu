// CUDA kernels for the gather family: gather (index_select) and csr_sum (its
// deterministic transpose). Free of torch headers so that `nvcc -c` can check it
// without a CUDA torch; csrc/cuda/gather.cpp holds the torch glue.
//
// Both kernels work on rows of the folded view [outer, size, inner]: a block is
// blockDim.x threads across a row (the contiguous inner dimension, in vector
// units) times blockDim.y rows, and a grid-stride loop walks the rows, so any
// row count works with a capped grid. All offsets are int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;          // threads per block
constexpr int64_t kMaxBlocks = 65536;  // grid cap; the grid-stride loops cover the rest

struct RowLaunch {
  dim3 grid;
  dim3 block;
};

// blockDim.x: the smallest power of two >= width (vectors per row), at most
// kThreads; the rest of the block's threads take further rows (blockDim.y).
// Requires rows > 0 and width > 0.
RowLaunch row_launch(int64_t rows, int64_t width) {
  unsigned tx = 1;
  while (tx < width && tx < kThreads) tx *= 2;
  const unsigned ty = kThreads / tx;
  const int64_t needed = (rows + ty - 1) / ty;
  const int64_t blocks = needed < kMaxBlocks ? needed : kMaxBlocks;
  return {dim3(static_cast<unsigned>(blocks)), dim3(tx, ty)};
}

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
    const vec_t* s = src + (o * N + static_cast<int64_t>(index[m])) * width;
    vec_t* d = out + row * width;
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

// ---------------------------------------------------------------------------
// csr_sum: out[o, r, :] = sum_{k in [ptr[r], ptr[r+1])} src[o, perm ? perm[k] : k, :]

// Accumulator type and explicit conversions (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__).
template <typename T>
struct Acc {
  using type = T;
  static __device__ __forceinline__ T load(T x) { return x; }
  static __device__ __forceinline__ T store(T x) { return x; }
};
template <>
struct Acc<__half> {
  using type = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// VEC consecutive elements moved as one aligned load/store (up to 16 bytes).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    csr_sum_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ perm,
                   const int64_t* __restrict__ ptr, scalar_t* __restrict__ out, int64_t outer,
                   int64_t M, int64_t R, int64_t inner) {
  using A = Acc<scalar_t>;
  using acc_t = typename A::type;
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t width = inner / VEC;  // packs per row; the launcher ensures inner % VEC == 0
  const int64_t rows = outer * R;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += stride) {
    const int64_t o = outer == 1 ? 0 : row / R;  // skip the int64 division when dim == 0
    const int64_t r = row - o * R;
    const int64_t begin = ptr[r];
    const int64_t end = ptr[r + 1];
    const pack_t* base = reinterpret_cast<const pack_t*>(src + o * M * inner);
    pack_t* dst = reinterpret_cast<pack_t*>(out + row * inner);
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
      acc_t acc[VEC] = {};
      // Sequential in k (deterministic); unrolling only lets the loads overlap.
#pragma unroll 4
      for (int64_t k = begin; k < end; ++k) {
        const int64_t s = perm ? perm[k] : k;
        const pack_t v = base[s * width + c];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += A::load(v.v[i]);
      }
      pack_t res;
#pragma unroll
      for (int i = 0; i < VEC; ++i) res.v[i] = A::store(acc[i]);
      dst[c] = res;
    }
  }
}

// Starts at the widest 16-byte pack and halves VEC until inner and both base
// addresses are multiples of the pack (then so is every row start).
template <typename scalar_t, int VEC>
cudaError_t launch_csr_sum(const void* src, const int64_t* perm, const int64_t* ptr, void* out,
                           int64_t outer, int64_t M, int64_t R, int64_t inner,
                           cudaStream_t stream) {
  if constexpr (VEC > 1) {
    constexpr uintptr_t bytes = sizeof(scalar_t) * VEC;
    const uintptr_t bits = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(out);
    if (inner % VEC != 0 || bits % bytes != 0) {
      return launch_csr_sum<scalar_t, VEC / 2>(src, perm, ptr, out, outer, M, R, inner, stream);
    }
  }
  const RowLaunch l = row_launch(outer * R, inner / VEC);
  csr_sum_kernel<scalar_t, VEC><<<l.grid, l.block, 0, stream>>>(
      static_cast<const scalar_t*>(src), perm, ptr, static_cast<scalar_t*>(out), outer, M, R,
      inner);
  return cudaGetLastError();
}

// M == 0 still launches: every segment is then empty and its output row is 0.
template <typename scalar_t>
cudaError_t csr_sum(const void* src, const int64_t* perm, const int64_t* ptr, void* out,
                    int64_t outer, int64_t M, int64_t R, int64_t inner, cudaStream_t stream) {
  if (outer <= 0 || R <= 0 || inner <= 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(scalar_t);
  return launch_csr_sum<scalar_t, kVec>(src, perm, ptr, out, outer, M, R, inner, stream);
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

extern "C" cudaError_t fastcore_csr_sum_cuda_f32(const void* src, const int64_t* perm,
                                                 const int64_t* ptr, void* out, int64_t outer,
                                                 int64_t M, int64_t R, int64_t inner,
                                                 cudaStream_t stream) {
  return csr_sum<float>(src, perm, ptr, out, outer, M, R, inner, stream);
}

extern "C" cudaError_t fastcore_csr_sum_cuda_f64(const void* src, const int64_t* perm,
                                                 const int64_t* ptr, void* out, int64_t outer,
                                                 int64_t M, int64_t R, int64_t inner,
                                                 cudaStream_t stream) {
  return csr_sum<double>(src, perm, ptr, out, outer, M, R, inner, stream);
}

extern "C" cudaError_t fastcore_csr_sum_cuda_f16(const void* src, const int64_t* perm,
                                                 const int64_t* ptr, void* out, int64_t outer,
                                                 int64_t M, int64_t R, int64_t inner,
                                                 cudaStream_t stream) {
  return csr_sum<__half>(src, perm, ptr, out, outer, M, R, inner, stream);
}

extern "C" cudaError_t fastcore_csr_sum_cuda_bf16(const void* src, const int64_t* perm,
                                                  const int64_t* ptr, void* out, int64_t outer,
                                                  int64_t M, int64_t R, int64_t inner,
                                                  cudaStream_t stream) {
  return csr_sum<__nv_bfloat16>(src, perm, ptr, out, outer, M, R, inner, stream);
}
