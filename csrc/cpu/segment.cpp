// CPU kernels for segment reductions: segment_reduce (sum / mean / max / min over CSR
// segments along a dim), its max/min backward segment_arg_scatter, and csr_sum (gather's
// backward, the segment sum). The tensor is viewed as [outer, size, inner]: the
// inner (feature) dimension is contiguous and vectorised by the compiler, and
// at::parallel_for splits output rows or whole slabs across threads.
//
// Every reduction runs its segment's members in one fixed order, so results are
// bit-identical run to run and across thread counts; nothing uses atomics.
#include "segment.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../utils.h"
#include "simd.h"

namespace fastcore {

Reduce parse_reduce(std::string_view name, const char* op) {
  if (name == "sum") return Reduce::Sum;
  if (name == "mean") return Reduce::Mean;
  if (name == "max") return Reduce::Max;
  if (name == "min") return Reduce::Min;
  TORCH_CHECK_VALUE(false, op, ": reduce must be one of sum, mean, max, min; got '", std::string(name),
                    "'");
  return Reduce::Sum;
}

namespace {

// acc[0:n] += row[0:n] in the accumulation type: plain loops the compiler vectorises
// for the build's target (ATen's generic at::vec::Vectorized, used when an extension is
// not compiled per CPU capability, goes through a memcpy per vector).
template <typename acc_t, typename scalar_t>
inline void add_row(acc_t* __restrict__ acc, const scalar_t* __restrict__ row, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<acc_t>(row[j]);
}

// Max/min step: take row[j] (source row m) where it beats acc[j]: strictly greater
// (max) / smaller (min), or NaN where acc[j] is not (NaN propagates, the first NaN wins).
// Equal values keep the earlier element, so ties go to the first member. Positions are
// pos_t (int32 while the rows fit) so that values and positions share a vector lane width.
template <Reduce R, typename acc_t, typename scalar_t, typename pos_t>
inline void arg_row(acc_t* __restrict__ acc, pos_t* __restrict__ arg,
                    const scalar_t* __restrict__ row, pos_t m, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    const acc_t a = acc[j];
    // Bitwise, not short-circuit, operators: no control flow, so the loop vectorises.
    const bool better = (R == Reduce::Max ? v > a : v < a) | ((v != v) & (a == a));
    acc[j] = better ? v : a;
    arg[j] = better ? m : arg[j];
  }
}

template <typename pos_t>
inline void store_arg(int64_t* __restrict__ dst, const pos_t* __restrict__ pos, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<int64_t>(pos[j]);
}

// Whether m names a row of [0, size): members outside it (a perm entry out of range,
// possible only with check=False) take part in nothing.
inline bool in_rows(int64_t m, int64_t size) {
  return static_cast<uint64_t>(m) < static_cast<uint64_t>(size);
}

// By slab: fold source rows 0 .. count-1 into accumulator rows segment[i] (every row in
// range: the by-slab order checks that first). `prefetch_acc`: prefetch the accumulator
// rows (worth it only once they no longer fit the core's own caches).
template <typename acc_t, typename scalar_t>
FASTCORE_SIMD_CLONES void add_rows(acc_t* acc, const scalar_t* base, const int64_t* segment,
                                   int64_t count, int64_t inner, bool prefetch_acc) {
  for (int64_t i = 0; i < count; ++i) {
    if (prefetch_acc && i + kPrefetchAhead < count) {
      // The source streams; the accumulator rows are the scattered accesses.
      prefetch_row_for_write(acc + segment[i + kPrefetchAhead] * inner,
                             inner * static_cast<int64_t>(sizeof(acc_t)));
    }
    add_row(acc + segment[i] * inner, base + i * inner, inner);
  }
}

// By segment: acc[0:inner] = the sum of source rows m = rows ? rows[i] : first + i
// (i < count; those outside [0, size) are skipped); returns how many it summed. `ahead`:
// how many entries after rows[count - 1] may be read to prefetch (the members of the next
// segments: rows is a window of one perm).
// Columns are summed kFoldBlock (simd.h) at a time in a local block the compiler keeps in
// registers (a loop over the members per block; the prefetch, whole rows, in the first), the
// rest (inner not a multiple, or narrower) in memory. Each output element adds the same terms
// in the same order from 0 either way: the same bits.
template <typename acc_t, typename scalar_t>
FASTCORE_INLINE int64_t sum_rows(acc_t* acc, const scalar_t* base, const int64_t* rows,
                                 int64_t first, int64_t count, int64_t inner, int64_t size,
                                 int64_t ahead) {
  constexpr int64_t kBlock = kFoldBlock<acc_t>;
  const int64_t row_bytes = inner * static_cast<int64_t>(sizeof(scalar_t));
  int64_t added = 0;
  // One pass over the members, skipping those out of range; the first also prefetches and
  // counts them. `fold` takes each member's row from column c0 on.
  auto pass = [&](bool first_pass, int64_t c0, auto&& fold) FASTCORE_LAMBDA_INLINE {
    for (int64_t i = 0; i < count; ++i) {
      if (first_pass && rows && i + kPrefetchAhead < count + ahead) {
        const int64_t next = rows[i + kPrefetchAhead];
        if (in_rows(next, size)) prefetch_row(base + next * inner, row_bytes);
      }
      const int64_t m = rows ? rows[i] : first + i;
      if (!in_rows(m, size)) continue;
      fold(base + m * inner + c0);
      if (first_pass) ++added;
    }
  };
  int64_t c0 = 0;
  for (; c0 + kBlock <= inner; c0 += kBlock) {
    alignas(64) acc_t block[kBlock] = {};
    pass(c0 == 0, c0, [&](const scalar_t* __restrict__ row) FASTCORE_LAMBDA_INLINE {
#pragma omp simd
      for (int64_t j = 0; j < kBlock; ++j) block[j] += static_cast<acc_t>(row[j]);
    });
    for (int64_t j = 0; j < kBlock; ++j) acc[c0 + j] = block[j];
  }
  if (c0 < inner) {
    std::fill(acc + c0, acc + inner, acc_t(0));
    pass(c0 == 0, c0, [&](const scalar_t* row) FASTCORE_LAMBDA_INLINE {
      add_row(acc + c0, row, inner - c0);
    });
  }
  return added;
}

// Segment r's entries [segment_begin, segment_end) of perm: ptr clamped into [0, size] (the
// length of perm), so an invalid ptr (check=False) never reads outside it.
inline int64_t segment_begin(const int64_t* ptr, int64_t r, int64_t size) {
  return std::clamp<int64_t>(ptr[r], 0, size);
}
inline int64_t segment_end(const int64_t* ptr, int64_t r, int64_t size) {
  return std::clamp<int64_t>(ptr[r + 1], segment_begin(ptr, r, size), size);
}

// dst = acc / divisor (mean) or acc, converted to the output type; dst may alias acc.
template <typename acc_t, typename scalar_t>
inline void store_row(scalar_t* dst, const acc_t* acc, int64_t n, acc_t divisor) {
  if (divisor == acc_t(1)) {
    if (static_cast<const void*>(dst) == static_cast<const void*>(acc)) return;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(acc[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(acc[j] / divisor);
  }
}

// By segment, sum or mean: output rows [begin, end) of the flattened [outer, segments] view,
// in one function compiled per CPU like the row loops (simd.h), so that a segment costs
// little besides its members' rows. Once the rows come from DRAM, the loop waits on its
// prefetches (sampled with perf, 82% of the old kernel's samples fell on the instruction
// after one), and the fewer uops each member costs the more of them are in flight. The old
// loop kept the accumulator in memory (a load and a store per vector and member) and paid a
// call, a division and a fill per segment: pooling sum at (2, 1M), rows of 64 float32, on
// the Intel VM took 38.0 ms where a fixed-width register loop took 30.2 ms in the same
// process; this one takes 33.9 ms where that loop took 30.3 ms (medians of interleaved
// rounds; docs/benchmarks.md). `stream`: each finished row goes out with streaming stores
// (through `buffer`, and `staged` in the output type when that is narrower).
template <bool Mean, typename acc_t, typename scalar_t>
FASTCORE_SIMD_CLONES void sum_segments(const scalar_t* src, const int64_t* perm,
                                       const int64_t* ptr, scalar_t* out, int64_t begin,
                                       int64_t end, int64_t segments, int64_t inner,
                                       int64_t size, bool stream, acc_t* buffer,
                                       scalar_t* staged) {
  constexpr bool widen = !std::is_same_v<acc_t, scalar_t>;
  const int64_t out_row_bytes = inner * static_cast<int64_t>(sizeof(scalar_t));
  int64_t o = begin / segments;
  int64_t r = begin - o * segments;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* base = src + o * size * inner;
    scalar_t* dst = out + row * inner;
    acc_t* acc = widen || stream ? buffer : reinterpret_cast<acc_t*>(dst);
    const int64_t lo = segment_begin(ptr, r, size);
    const int64_t hi = segment_end(ptr, r, size);
    // Prefetch up to the end of perm (its length is size): the next segments'.
    const int64_t folded = sum_rows(acc, base, perm ? perm + lo : nullptr, lo, hi - lo, inner,
                                    size, perm ? std::min(kPrefetchAhead, size - hi) : 0);
    const acc_t divisor = Mean && folded > 0 ? static_cast<acc_t>(folded) : acc_t(1);
    if (stream) {
      // the finished row in the output type, then one streaming write
      scalar_t* row_out = widen ? staged : reinterpret_cast<scalar_t*>(acc);
      store_row(row_out, acc, inner, divisor);
      stream_row(dst, row_out, out_row_bytes);
    } else if (widen || Mean) {
      store_row(dst, acc, inner, divisor);
    }
    if (++r == segments) {
      r = 0;
      ++o;
    }
  }
  if (stream) stream_fence();
}

// The same for max/min, tracking positions.
template <Reduce R, typename acc_t, typename scalar_t, typename pos_t>
FASTCORE_SIMD_CLONES void arg_rows(acc_t* acc, pos_t* pos, const scalar_t* base,
                                   const int64_t* rows, const int64_t* segment, int64_t first,
                                   int64_t count, int64_t inner, int64_t size) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t m = rows ? rows[i] : first + i;
    if (!in_rows(m, size)) continue;
    const int64_t offset = segment ? segment[i] * inner : 0;
    arg_row<R>(acc + offset, pos + offset, base + m * inner, static_cast<pos_t>(m), inner);
  }
}

template <typename acc_t, typename scalar_t>
inline void load_row(acc_t* __restrict__ acc, const scalar_t* __restrict__ row, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] = static_cast<acc_t>(row[j]);
}

// Two loop orders with a fixed order within each segment:
//  * by segment: each output row (o, r) walks its members perm[ptr[r]] .. perm[ptr[r+1]-1];
//    parallel over output rows; works for any shape.
//  * by slab: for one outer index o, stream the source rows m = 0 .. size-1 in order and
//    fold each into its segment's accumulator row, which stays in cache; parallel over
//    outer. The reads stream (the hardware prefetcher follows them) where the by-segment
//    order reads rows scattered over the slab, which costs DRAM latency once a slab no
//    longer fits the caches: at N = 100k (16 slabs of 25.6 MB) on the 2-core CPU, pooling
//    reached 66% of copy bandwidth this way and 42% by segment (bench/scaling.py).
//    Chosen when there are enough slabs for every thread, the accumulators of the slabs in
//    flight fit kSlabBudget (a share of the last-level cache; at least kSlabBytes each),
//    every source row belongs to exactly one segment and every segment lists its members
//    ascending (as the stable sort behind every fastcore CSR does). Its order within a
//    segment, ascending source row, is then exactly the by-segment order: both give the
//    same bits, so the choice (shape, thread count) never shows in the result.
//
// Memory safety without checks: segment r covers the entries [lo, hi) with
// lo = clamp(ptr[r], 0, size), hi = clamp(ptr[r+1], lo, size), and a perm entry outside
// [0, size) is skipped (a mean divides by the members it did fold in). A valid CSR reads
// exactly as before; an invalid one never reads or writes outside the tensors.
constexpr int64_t kSlabBytes = 512 * 1024;
constexpr int64_t kSlabBudget = 16 << 20;

template <Reduce R, typename scalar_t, typename pos_t>
void segment_rows(const scalar_t* src, const int64_t* perm, const int64_t* ptr, scalar_t* out,
                  int64_t* arg, const Fold& f, int64_t segments) {
  using acc_t = at::opmath_type<scalar_t>;  // float for half types, else scalar_t
  constexpr bool widen = !std::is_same_v<acc_t, scalar_t>;
  constexpr bool arg_reduce = R == Reduce::Max || R == Reduce::Min;
  const int64_t inner = f.inner;
  const int64_t size = f.size;
  const int64_t slab = segments * inner;
  const int64_t slab_bytes =
      slab * static_cast<int64_t>(sizeof(acc_t) + (arg_reduce ? sizeof(pos_t) : 0));
  auto lo = [&](int64_t r) { return segment_begin(ptr, r, size); };
  auto hi = [&](int64_t r) { return segment_end(ptr, r, size); };
  auto member = [&](int64_t k) { return perm ? perm[k] : k; };
  auto divisor = [](int64_t members) {
    return R == Reduce::Mean && members > 0 ? static_cast<acc_t>(members) : acc_t(1);
  };
  // Max/min: start a segment's accumulator row from its first member in range and return
  // the entry after it (or fill 0 and the position `size` when there is none).
  auto start_arg_row = [&](acc_t* a, pos_t* g, const scalar_t* base, int64_t r) {
    const int64_t end = hi(r);
    for (int64_t k = lo(r); k < end; ++k) {
      const int64_t m = member(k);
      if (!in_rows(m, size)) continue;
      load_row(a, base + m * inner, inner);
      std::fill(g, g + inner, static_cast<pos_t>(m));
      return k + 1;
    }
    std::fill(a, a + inner, acc_t(0));
    std::fill(g, g + inner, static_cast<pos_t>(size));
    return end;
  };

  const int64_t threads = at::get_num_threads();
  if (f.outer >= 2 * threads && slab_bytes <= std::max(kSlabBytes, kSlabBudget / threads)) {
    std::vector<int64_t> segment_of(size, -1);  // source row -> its segment
    std::vector<int64_t> members(segments);
    int64_t assigned = 0;
    bool exact = true;  // every source row in exactly one segment, each segment ascending
    for (int64_t r = 0; r < segments && exact; ++r) {
      const int64_t end = hi(r);
      members[r] = end - lo(r);
      int64_t previous = -1;
      for (int64_t k = lo(r); k < end; ++k) {
        const int64_t m = member(k);
        // Out of range, in a second segment, or not ascending: the by-segment order.
        if (!in_rows(m, size) || segment_of[m] >= 0 || m <= previous) {
          exact = false;
          break;
        }
        segment_of[m] = r;
        previous = m;
        ++assigned;
      }
    }
    if (exact && assigned == size) {
      at::parallel_for(0, f.outer, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buffer(widen ? slab : 0);
        std::vector<pos_t> positions(arg_reduce ? slab : 0);
        for (int64_t o = begin; o < end; ++o) {
          scalar_t* out_slab = out + o * slab;
          acc_t* acc = widen ? buffer.data() : reinterpret_cast<acc_t*>(out_slab);
          const scalar_t* base = src + o * size * inner;
          if constexpr (arg_reduce) {
            pos_t* pos = positions.data();
            for (int64_t r = 0; r < segments; ++r) {
              start_arg_row(acc + r * inner, pos + r * inner, base, r);
            }
            arg_rows<R>(acc, pos, base, nullptr, segment_of.data(), 0, size, inner, size);
            store_arg(arg + o * slab, pos, slab);
          } else {
            std::fill(acc, acc + slab, acc_t(0));
            add_rows(acc, base, segment_of.data(), size, inner, slab_bytes > kSlabBytes);
          }
          if (widen || R == Reduce::Mean) {
            for (int64_t r = 0; r < segments; ++r) {
              store_row(out_slab + r * inner, acc + r * inner, inner, divisor(members[r]));
            }
          }
        }
      });
      return;
    }
  }

  const int64_t total = f.outer * segments;
  const int64_t out_row_bytes = inner * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t grain = row_grain(total, out_row_bytes);
  if constexpr (arg_reduce) {
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffer(widen ? inner : 0);
      std::vector<pos_t> positions(inner);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t o = row / segments;
        const int64_t r = row - o * segments;
        const scalar_t* base = src + o * size * inner;
        scalar_t* dst = out + row * inner;
        acc_t* acc = widen ? buffer.data() : reinterpret_cast<acc_t*>(dst);
        pos_t* pos = positions.data();
        const int64_t k = start_arg_row(acc, pos, base, r);
        arg_rows<R>(acc, pos, base, perm ? perm + k : nullptr, nullptr, k, hi(r) - k, inner,
                    size);
        store_arg(arg + row * inner, pos, inner);
        if (widen) store_row(dst, acc, inner, acc_t(1));
      }
    });
  } else {
    // A large output is accumulated row by row in a buffer and streamed out (simd.h).
    const bool stream = can_stream(out, out_row_bytes, total * out_row_bytes);
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffer(widen || stream ? inner : 0);
      std::vector<scalar_t> staged(stream && widen ? inner : 0);
      sum_segments<R == Reduce::Mean>(src, perm, ptr, out, begin, end, segments, inner, size,
                                      stream, buffer.data(), staged.data());
    });
  }
}

template <Reduce R, typename scalar_t>
void segment_dispatch(const scalar_t* src, const int64_t* perm, const int64_t* ptr, scalar_t* out,
                      int64_t* arg, const Fold& f, int64_t segments) {
  // Positions up to `size` (the empty-segment marker) must fit the position type.
  if (f.size < std::numeric_limits<int32_t>::max()) {
    segment_rows<R, scalar_t, int32_t>(src, perm, ptr, out, arg, f, segments);
  } else {
    segment_rows<R, scalar_t, int64_t>(src, perm, ptr, out, arg, f, segments);
  }
}

void check_csr_tensors(const at::Tensor& src, const std::optional<at::Tensor>& perm,
                       const at::Tensor& ptr, int64_t rows, const char* op) {
  check_index_tensor(ptr, op, "ptr");
  check_csr_shapes(ptr, perm, rows, op);
  TORCH_CHECK_VALUE(ptr.device() == src.device(), op, ": ptr is on ", ptr.device(),
                    " but src is on ", src.device());
  if (perm.has_value()) {
    check_index_tensor(*perm, op, "perm");
    TORCH_CHECK_VALUE(perm->device() == src.device(), op, ": perm is on ", perm->device(),
                      " but src is on ", src.device());
  }
  const auto dtype = src.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": src must be float32, float64, float16 or bfloat16, got ", dtype);
}

std::tuple<at::Tensor, at::Tensor> segment_reduce_cpu(const at::Tensor& src,
                                                      const std::optional<at::Tensor>& perm,
                                                      const at::Tensor& ptr, int64_t dim,
                                                      c10::string_view reduce, bool check) {
  const Reduce r = parse_reduce(std::string_view(reduce.data(), reduce.size()), "segment_reduce");
  return segment_reduce_cpu_impl(src, perm, ptr, dim, r, check, "segment_reduce");
}

at::Tensor segment_arg_scatter_cpu(const at::Tensor& grad, const at::Tensor& arg, int64_t dim,
                                   int64_t size) {
  TORCH_CHECK_TYPE(arg.scalar_type() == at::kLong,
                   "segment_arg_scatter: arg must be int64, got ", arg.scalar_type());
  TORCH_CHECK_VALUE(arg.sizes() == grad.sizes(), "segment_arg_scatter: arg shape ", arg.sizes(),
                    " must equal grad shape ", grad.sizes());
  TORCH_CHECK_VALUE(size >= 0, "segment_arg_scatter: size must be >= 0, got ", size);
  const Fold f = fold_at(grad, dim);
  auto out = zeros_output(shape_with(grad, dim, size), grad.options());
  if (grad.numel() == 0 || out.numel() == 0) return out;
  const auto grad_c = grad.contiguous();
  const auto arg_c = arg.contiguous();
  const int64_t segments = f.size;
  const int64_t inner = f.inner;
  const int64_t total = f.outer * segments;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "segment_arg_scatter_cpu", [&] {
    const scalar_t* g = grad_c.const_data_ptr<scalar_t>();
    const int64_t* a = arg_c.const_data_ptr<int64_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, total, row_grain(total, inner * 8), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        scalar_t* slab = o + (row / segments) * size * inner;
        for (int64_t j = 0; j < inner; ++j) {
          const int64_t m = a[row * inner + j];
          if (in_rows(m, size)) slab[m * inner + j] = g[row * inner + j];
        }
      }
    });
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> segment_reduce_cpu_impl(const at::Tensor& src,
                                                           const std::optional<at::Tensor>& perm,
                                                           const at::Tensor& ptr, int64_t dim,
                                                           Reduce reduce, bool check,
                                                           const char* op) {
  const Fold f = fold_at(src, dim);
  check_csr_tensors(src, perm, ptr, f.size, op);
  if (check) check_csr(ptr, perm, f.size, op, dim);

  const int64_t segments = ptr.numel() - 1;
  const bool arg_reduce = reduce == Reduce::Max || reduce == Reduce::Min;
  auto out = empty_output(shape_with(src, dim, segments), src.options());
  auto arg = arg_reduce ? empty_output(out.sizes(), src.options().dtype(at::kLong))
                        : empty_output({0}, src.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, arg};

  const auto src_c = src.contiguous();
  const auto ptr_c = ptr.to(at::kLong).contiguous();
  std::optional<at::Tensor> perm_c;
  if (perm.has_value()) perm_c = perm->to(at::kLong).contiguous();
  const int64_t* perm_ptr = perm_c ? perm_c->const_data_ptr<int64_t>() : nullptr;
  int64_t* arg_ptr = arg_reduce ? arg.mutable_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "segment_cpu", [&] {
    const scalar_t* s = src_c.const_data_ptr<scalar_t>();
    const int64_t* p = ptr_c.const_data_ptr<int64_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    switch (reduce) {
      case Reduce::Sum:
        segment_dispatch<Reduce::Sum>(s, perm_ptr, p, o, arg_ptr, f, segments);
        break;
      case Reduce::Mean:
        segment_dispatch<Reduce::Mean>(s, perm_ptr, p, o, arg_ptr, f, segments);
        break;
      case Reduce::Max:
        segment_dispatch<Reduce::Max>(s, perm_ptr, p, o, arg_ptr, f, segments);
        break;
      case Reduce::Min:
        segment_dispatch<Reduce::Min>(s, perm_ptr, p, o, arg_ptr, f, segments);
        break;
    }
  });
  return {out, arg};
}

namespace {

// gather's backward: the segment sum.
at::Tensor csr_sum_cpu(const at::Tensor& src, const std::optional<at::Tensor>& perm,
                       const at::Tensor& ptr, int64_t dim, bool check) {
  return std::get<0>(segment_reduce_cpu_impl(src, perm, ptr, dim, Reduce::Sum, check, "csr_sum"));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore, CPU, m) {
  m.impl("segment_reduce", &segment_reduce_cpu);
  m.impl("csr_sum", &csr_sum_cpu);
  m.impl("segment_arg_scatter", &segment_arg_scatter_cpu);
}

}  // namespace fastcore
