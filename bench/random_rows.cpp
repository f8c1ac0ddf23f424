// The machine's ceiling for the gathers: how fast two threads read rows of 256 bytes (64
// float32, the scaling benchmark's H = 64) in random order from a tensor far larger than the
// caches, as pooling at (2, 1M) does, with software prefetch into L1 (prefetcht0 on x86),
// into L2 (prefetcht1) or none, at a few distances. No torch: the loop alone.
//
//     g++ -O3 -march=native -fopenmp bench/random_rows.cpp -o /tmp/random_rows && /tmp/random_rows
//
// Every variant runs once per round, the rounds interleaved (a shared VM drifts over
// seconds); printed: the median and the best round, and what pooling's minimal traffic at
// (2, 1M) (512 MB read, 102 MB written) would be as a share of the copy bandwidth measured
// (memcpy) in the same rounds, had pooling taken only the time of its reads.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

constexpr int64_t kRows = 1000000, kWidth = 64, kSlabs = 2;

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Sum the rows of each slab in the order `order` (one slab per thread), prefetching the row
// `distance` places ahead with the given locality (3: L1, 2: L2; distance 0: no prefetch).
template <int Locality>
float read_rows(const float* x, const std::vector<int64_t>& order, int64_t distance) {
  float total = 0;
#pragma omp parallel num_threads(kSlabs) reduction(+ : total)
  {
    const float* base = x + omp_get_thread_num() * kRows * kWidth;
    float acc[kWidth] = {};
    for (int64_t i = 0; i < kRows; ++i) {
      if (distance > 0 && i + distance < kRows) {
        const char* p = reinterpret_cast<const char*>(base + order[i + distance] * kWidth);
        for (int64_t b = 0; b < kWidth * 4; b += 64) __builtin_prefetch(p + b, 0, Locality);
      }
      const float* row = base + order[i] * kWidth;
#pragma omp simd
      for (int64_t j = 0; j < kWidth; ++j) acc[j] += row[j];
    }
    for (int64_t j = 0; j < kWidth; ++j) total += acc[j];
  }
  return total;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main() {
  const int64_t elements = kSlabs * kRows * kWidth;
  auto* x = static_cast<float*>(std::aligned_alloc(4096, elements * 4));
  auto* dst = static_cast<float*>(std::aligned_alloc(4096, elements * 4));
  for (int64_t i = 0; i < elements; ++i) x[i] = static_cast<float>(i % 7);
  std::memset(dst, 0, elements * 4);
  std::vector<int64_t> order(kRows);
  for (int64_t i = 0; i < kRows; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(1));

  struct Variant {
    const char* name;
    int locality;
    int64_t distance;
  };
  const Variant variants[] = {{"no prefetch", 3, 0},       {"into L1, 16 ahead", 3, 16},
                              {"into L1, 32 ahead", 3, 32}, {"into L2, 16 ahead", 2, 16},
                              {"into L2, 32 ahead", 2, 32}};
  const int n = sizeof(variants) / sizeof(variants[0]);
  std::vector<std::vector<double>> times(n);
  std::vector<double> copies;
  float sink = 0;
  for (int round = 0; round < 9; ++round) {
    for (int v = 0; v < n; ++v) {
      const double t = now_ms();
      sink += variants[v].locality == 2 ? read_rows<2>(x, order, variants[v].distance)
                                        : read_rows<3>(x, order, variants[v].distance);
      times[v].push_back(now_ms() - t);
    }
    const double t = now_ms();
#pragma omp parallel for num_threads(kSlabs)
    for (int64_t c = 0; c < 16; ++c) {
      std::memcpy(dst + c * (elements / 16), x + c * (elements / 16), elements / 16 * 4);
    }
    copies.push_back(now_ms() - t);
  }
  const double copy_gbps = 2.0 * elements * 4 / median(copies) / 1e6;
  const double traffic = elements * 4.0 + kSlabs * kRows / 5 * kWidth * 4.0 + 8.0 * kRows;
  std::printf("%lld threads, %lld x %lld random rows of %lld B; memcpy %.1f GB/s (median of 9)\n",
              static_cast<long long>(kSlabs), static_cast<long long>(kSlabs),
              static_cast<long long>(kRows), static_cast<long long>(kWidth * 4), copy_gbps);
  for (int v = 0; v < n; ++v) {
    const double m = median(times[v]);
    std::printf("  %-18s median %6.1f ms  best %6.1f ms  -> pooling's traffic at %5.1f%% of memcpy\n",
                variants[v].name, m, *std::min_element(times[v].begin(), times[v].end()),
                100.0 * traffic / m / 1e6 / copy_gbps);
  }
  if (sink == 0.5f) std::puts("");  // keeps the sums alive (never true)
  return 0;
}
