// Launch geometry shared by the row kernels of csrc/cuda/*.cu (torch-free).
//
// A block is blockDim.x threads across a row (the contiguous inner dimension, in vector
// units) times blockDim.y rows; a grid-stride loop walks the rows, so any row count works
// with a capped grid.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastcore_cuda {

constexpr int kThreads = 256;          // threads per block
constexpr int64_t kMaxBlocks = 65536;  // grid cap; the grid-stride loops cover the rest

struct RowLaunch {
  dim3 grid;
  dim3 block;
};

// blockDim.x: the smallest power of two >= width (vectors per row), at most kThreads;
// the rest of the block's threads take further rows (blockDim.y).
// Requires rows > 0 and width > 0.
inline RowLaunch row_launch(int64_t rows, int64_t width) {
  unsigned tx = 1;
  while (tx < width && tx < kThreads) tx *= 2;
  const unsigned ty = kThreads / tx;
  const int64_t needed = (rows + ty - 1) / ty;
  const int64_t blocks = needed < kMaxBlocks ? needed : kMaxBlocks;
  return {dim3(static_cast<unsigned>(blocks)), dim3(tx, ty)};
}

}  // namespace fastcore_cuda
