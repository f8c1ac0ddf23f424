// The one schema file: every fastcore operator is declared here, and only here.
// Kernels register their implementations per dispatch key in csrc/cpu/*.cpp and
// csrc/cuda/*.cpp; fake (meta) kernels and autograd formulas are registered from
// Python (fastcore/ops/*.py) with torch.library.register_fake / register_autograd.
//
// Conventions shared by all ops:
//   * `dim` is already normalised to 0 <= dim < src.dim() by the Python wrapper.
//   * `check` = true validates index values on the host before any kernel runs and
//     raises IndexError / ValueError naming the offending value. Callers that built
//     the indices themselves (a cached CSR, a validated Graph) pass false to avoid
//     a device synchronisation.
#include <torch/library.h>

#include <pybind11/pybind11.h>

TORCH_LIBRARY(fastcore, m) {
  // out = src.index_select(dim, index); index is 1-D int32/int64.
  m.def("gather(Tensor src, Tensor index, int dim, bool check) -> Tensor");
  // Sum of rows within CSR segments along `dim`:
  //   out[..., r, ...] = sum_{k in [ptr[r], ptr[r+1])} src[..., perm[k] (or k), ...]
  // ptr: int64 [R+1], ptr[0] = 0, non-decreasing, ptr[R] = src.size(dim).
  // perm: optional int64 permutation of 0..src.size(dim)-1 (rows in segment order).
  // Half types accumulate in float32, float64 in float64.
  m.def("csr_sum(Tensor src, Tensor? perm, Tensor ptr, int dim, bool check) -> Tensor");
  // Reduction of rows within CSR segments along `dim` (same ptr/perm contract as csr_sum);
  // reduce is "sum", "mean", "max" or "min". Returns (out, arg):
  //   out: src's shape with size(dim) = R; an empty segment gives 0. Half types accumulate
  //        in float32. max/min propagate NaN; ties go to the first member in CSR order.
  //   arg: for max/min, int64 of out's shape holding the source row (a position along
  //        `dim` of src) each output element came from, or src.size(dim) for an empty
  //        segment; for sum/mean, an empty int64 tensor of shape [0].
  m.def(
      "segment_reduce(Tensor src, Tensor? perm, Tensor ptr, int dim, str reduce, bool check) "
      "-> (Tensor, Tensor)");
  // The backward of max/min: out = zeros of grad's shape with size(dim) = size, then
  // out[..., arg[..., r, ...], ...] = grad[..., r, ...] wherever arg < size. Segments are
  // disjoint, so no two elements land on the same place (no atomics, deterministic).
  m.def("segment_arg_scatter(Tensor grad, Tensor arg, int dim, int size) -> Tensor");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcore's compiled operators (importing this module registers them)";
  m.def("build_info", [] {
    pybind11::dict info;
#ifdef FASTCORE_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  }, "What this build of fastcore._C contains.");
}
