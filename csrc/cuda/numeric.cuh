// Element types for the CUDA kernels (torch-free): the accumulation type of each storage
// type with explicit conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__), and aligned packs for vector loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastcore_cuda {

template <typename T>
struct Acc {
  using type = T;
  static __device__ __forceinline__ T load(T x) { return x; }
  static __device__ __forceinline__ T store(T x) { return x; }
  static __device__ __forceinline__ T from_double(double x) { return static_cast<T>(x); }
};
template <>
struct Acc<__half> {
  using type = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ __half from_double(double x) { return __double2half(x); }
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_double(double x) {
    return __double2bfloat16(x);
  }
};

template <typename T>
__device__ __forceinline__ double to_double(T x) {
  return static_cast<double>(Acc<T>::load(x));
}

// VEC consecutive elements moved as one aligned access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

}  // namespace fastcore_cuda
