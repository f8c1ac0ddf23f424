// Vector-width helpers for the CPU kernels.
#pragma once

#include <cstdint>
#include <utility>

// Hot loops marked FASTCORE_SIMD_CLONES are compiled twice on x86-64, for x86-64-v3
// (AVX2 and FMA: the build contracts a * b + c into one fused multiply-add,
// -ffp-contract=fast) and for the baseline ISA, and the loader picks one for the CPU at
// hand (GCC/Clang function multiversioning): twice the vector width and half the
// multiply-add instructions without building the extension for one CPU.
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTCORE_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTCORE_SIMD_CLONES
#endif

// Helpers called from a FASTCORE_SIMD_CLONES loop: always inlined, so that they are
// compiled for the clone's ISA (an out-of-line copy is baseline code).
#if defined(__GNUC__)
#define FASTCORE_INLINE inline __attribute__((always_inline))
#define FASTCORE_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FASTCORE_INLINE inline
#define FASTCORE_LAMBDA_INLINE
#endif

namespace fastcore {

// fn(i) for i < n: unrolled into straight-line code when N > 0 (n == N), a loop
// otherwise. The kernels' per-block arrays then have constant indices only, and the
// compiler keeps them in registers.
template <int N, typename Fn>
FASTCORE_INLINE void for_n(int64_t n, Fn&& fn) {
  if constexpr (N > 0) {
    [&]<int... I>(std::integer_sequence<int, I...>) FASTCORE_LAMBDA_INLINE {
      (fn(int64_t{I}), ...);
    }(std::make_integer_sequence<int, N>{});
  } else {
    for (int64_t i = 0; i < n; ++i) fn(i);
  }
}

// Software prefetch of one row (`bytes` from p, at most 1 KiB: 16 cache lines) for reading.
// The gathers (pooling, unpooling, spmm) read rows in an order no hardware prefetcher can
// guess; once the rows no longer fit the caches every read waits for DRAM. Asking for the
// rows a few members ahead keeps several misses in flight. A prefetch never faults, but the
// callers still only prefetch rows in range.
FASTCORE_INLINE void prefetch_row(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  const int64_t stop = bytes < 1024 ? bytes : 1024;
  for (int64_t b = 0; b < stop; b += 64) __builtin_prefetch(c + b, 0, 3);
#else
  (void)p;
  (void)bytes;
#endif
}

// How many members ahead the gathers prefetch.
constexpr int64_t kPrefetchAhead = 8;

}  // namespace fastcore
