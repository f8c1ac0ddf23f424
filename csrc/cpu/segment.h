// Segment reductions on the host side: the reduce names shared by the CPU and CUDA glue,
// and the CPU implementation behind segment_reduce and csr_sum (csrc/cpu/segment.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

namespace fastcore {

enum class Reduce { Sum, Mean, Max, Min };

// "sum" | "mean" | "max" | "min"; anything else is a ValueError naming the value.
Reduce parse_reduce(std::string_view name, const char* op);

// Validates (ptr/perm types and devices; their values too when `check`) and reduces the
// rows of `src` within each CSR segment along `dim`. Returns (out, arg) as documented
// for fastcore::segment_reduce in csrc/fastcore.cpp.
std::tuple<at::Tensor, at::Tensor> segment_reduce_cpu_impl(const at::Tensor& src,
                                                           const std::optional<at::Tensor>& perm,
                                                           const at::Tensor& ptr, int64_t dim,
                                                           Reduce reduce, bool check,
                                                           const char* op);

}  // namespace fastcore
