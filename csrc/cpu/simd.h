// Vector-width helpers for the CPU kernels.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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
// The rows to be read are asked into L2 (locality 2: prefetcht1 on x86), not L1: a prefetch
// into L1 holds one of the core's few L1 fill buffers until its line arrives, so at most
// about that many misses are in flight, while L2's own queue is deeper. On the Intel Xeon
// VM (2 cores), reading 2M random 256-byte rows of a 512 MB tensor took 35 ms with
// prefetcht0 and 25 ms with prefetcht1 (a standalone loop, best of 8), and pooling sum at
// (2, 1M) 46.8 -> 39.5 ms (medians, builds switched within one process; the figures and
// the other ops in docs/benchmarks.md). The demand load then finds the row in L2.
// Write: 0 for a row about to be read, 1 for one about to be read and written (an
// accumulator row; a write prefetch goes to L1).
// prefetch_span: every cache line of [p, p + bytes) (no cap), e.g. the next time step of a
// tile; prefetch_lines: the first 1 KiB of it at most (one row of a gather).
template <int Write, int Locality = 3>
FASTCORE_INLINE void prefetch_span(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, Write, Locality);
#else
  (void)p;
  (void)bytes;
#endif
}

template <int Write, int Locality = 3>
FASTCORE_INLINE void prefetch_lines(const void* p, int64_t bytes) {
  prefetch_span<Write, Locality>(p, bytes < 1024 ? bytes : 1024);
}

FASTCORE_INLINE void prefetch_row(const void* p, int64_t bytes) {
  prefetch_lines<0, 2>(p, bytes);
}

FASTCORE_INLINE void prefetch_row_for_write(void* p, int64_t bytes) {
  prefetch_lines<1>(p, bytes);
}

// Outputs at least this large are written with non-temporal (streaming) stores where a
// kernel writes each output row once: they do not fit the caches, so an ordinary store
// first reads every line it fills (twice the traffic) and evicts the rows the next reads
// need. Unpooling at (16, 100k) rows of 256 B on the 2-core CPU: 25.6 ms -> 18-20 ms.
// Smaller outputs stay in cache for the op that reads them next.
constexpr int64_t kStreamBytes = 32 << 20;

// Whether rows of `row_bytes` at `out` can be streamed (16-byte stores, aligned).
inline bool can_stream(const void* out, int64_t row_bytes, int64_t total_bytes) {
#if defined(__x86_64__)
  return total_bytes >= kStreamBytes && row_bytes % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out) % 16 == 0;
#else
  (void)out;
  (void)row_bytes;
  (void)total_bytes;
  return false;
#endif
}

// dst[0:bytes] = src[0:bytes] (or zeros when src is null) with streaming stores (SSE2, every
// x86-64 CPU); dst 16-byte aligned, bytes a multiple of 16. Callers check can_stream.
FASTCORE_INLINE void stream_row(void* dst, const void* src, int64_t bytes) {
#if defined(__x86_64__)
  auto* d = static_cast<__m128i*>(dst);
  const auto* s = static_cast<const __m128i*>(src);
  for (int64_t v = 0; v < bytes / 16; ++v)
    _mm_stream_si128(d + v, s ? _mm_loadu_si128(s + v) : _mm_setzero_si128());
#else
  if (src) std::memcpy(dst, src, bytes); else std::memset(dst, 0, bytes);
#endif
}

// Orders the streaming stores before what follows: called once at the end of every task
// that streamed, so the rows are visible to every thread once the parallel region joins.
FASTCORE_INLINE void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// How many columns the row sums (segment.cpp's sum_rows, spmm.cpp's spmm_rows) keep in
// registers at a time: 256 bytes of accumulators, 8 AVX registers (64 float32, 32 float64).
template <typename acc_t>
inline constexpr int64_t kFoldBlock = 256 / static_cast<int64_t>(sizeof(acc_t));

// How many members ahead the gathers prefetch. With the prefetches into L2, 32 rows ahead
// beat 16 at N = 1M on the Intel VM (pooling sum 41.7 -> 39.5 ms, spmm forward+backward
// 266 -> 252 ms, medians within one process) and changed nothing measurable at 1k-100k;
// with prefetches into L1, unpooling at 1M had taken 39 ms with 16 and 48-60 ms with 8.
constexpr int64_t kPrefetchAhead = 32;

// Eight floats as one value (GCC/Clang vector extensions): AVX registers in the x86-64-v3
// clones, two SSE registers in the baseline ones.
using v8 = float __attribute__((vector_size(32)));
using v8i = int __attribute__((vector_size(32)));
using v8u = float __attribute__((vector_size(32), aligned(4), may_alias));  // unaligned

// c[i] = (a then b)[I_i]: __builtin_shufflevector (Clang; GCC from 12), else GCC's
// __builtin_shuffle. Always inlined into the kernels' per-ISA clones, so the note GCC makes
// about passing a 32-byte vector without AVX (-Wpsabi) concerns no real call.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
template <int... I>
FASTCORE_INLINE v8 shuffle8(v8 a, v8 b) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  return __builtin_shufflevector(a, b, I...);
#else
  return __builtin_shuffle(a, b, v8i{I...});
#endif
}

FASTCORE_INLINE void transpose8(v8* r) {
  v8 t[8], u[8];
  for_n<4>(4, [&](int64_t i) FASTCORE_LAMBDA_INLINE {  // rows 2i, 2i+1 interleaved
    t[2 * i] = shuffle8<0, 8, 1, 9, 4, 12, 5, 13>(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = shuffle8<2, 10, 3, 11, 6, 14, 7, 15>(r[2 * i], r[2 * i + 1]);
  });
  for_n<2>(2, [&](int64_t i) FASTCORE_LAMBDA_INLINE {  // pairs of pairs
    const int64_t a = 4 * i;
    u[a] = shuffle8<0, 1, 8, 9, 4, 5, 12, 13>(t[a], t[a + 2]);
    u[a + 1] = shuffle8<2, 3, 10, 11, 6, 7, 14, 15>(t[a], t[a + 2]);
    u[a + 2] = shuffle8<0, 1, 8, 9, 4, 5, 12, 13>(t[a + 1], t[a + 3]);
    u[a + 3] = shuffle8<2, 3, 10, 11, 6, 7, 14, 15>(t[a + 1], t[a + 3]);
  });
  for_n<4>(4, [&](int64_t j) FASTCORE_LAMBDA_INLINE {  // 128-bit halves
    r[j] = shuffle8<0, 1, 2, 3, 8, 9, 10, 11>(u[j], u[j + 4]);
    r[j + 4] = shuffle8<4, 5, 6, 7, 12, 13, 14, 15>(u[j], u[j + 4]);
  });
}

FASTCORE_INLINE v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
FASTCORE_INLINE void store8(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }

// Vectors of L floats: 8 (AVX registers; two SSE ones in the baseline clones) or 16 (AVX-512
// registers, in the x86-64-v4 kernels only). A kernel written for vec<L> runs the same
// operations in the same order in every lane at either width: the same bits.
using v16 = float __attribute__((vector_size(64)));
using v16i = int __attribute__((vector_size(64)));
using v16u = float __attribute__((vector_size(64), aligned(4), may_alias));  // unaligned
template <int L>
struct Lanes;
template <>
struct Lanes<8> {
  using f = v8;
  using i = v8i;
  using u = v8u;
};
template <>
struct Lanes<16> {
  using f = v16;
  using i = v16i;
  using u = v16u;
};
template <int L>
using vec = typename Lanes<L>::f;
template <int L>
FASTCORE_INLINE vec<L> load_lanes(const float* p) {
  return *reinterpret_cast<const typename Lanes<L>::u*>(p);
}
template <int L>
FASTCORE_INLINE void store_lanes(float* p, vec<L> v) {
  *reinterpret_cast<typename Lanes<L>::u*>(p) = v;
}

// The values of `a` are read back one at a time (as broadcasts) from memory: without this
// the compiler keeps a small array in vector registers and takes each value out with a
// shuffle (AVX-512: an index broadcast and a permute per value, both on the one shuffle
// port), where a broadcast from memory is a plain load.
template <typename T>
FASTCORE_INLINE void read_back_from_memory(T& a) {
#if defined(__GNUC__)
  asm("" : "+m"(a));
#else
  (void)a;
#endif
}

// Kernels for CPUs with x86-64-v4 (AVX-512 F, BW, CD, DQ, VL), next to the target_clones
// above: a function marked FASTCORE_TARGET_V4, called where cpu_has_v4(). FASTCORE_AVX512=0
// in the environment (read once) keeps them off: the other kernels then run everywhere
// (the tests compare the two).
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTCORE_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
inline bool cpu_has_v4() {
  static const bool v4 = [] {
    const char* env = std::getenv("FASTCORE_AVX512");
    if (env && std::string_view(env) == "0") return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return v4;
}
#else  // elsewhere the x86-64-v4 kernels are built for the target and never chosen
#define FASTCORE_TARGET_V4
inline bool cpu_has_v4() { return false; }
#endif

}  // namespace fastcore
