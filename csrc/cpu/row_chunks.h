// Row chunks of equal cost for at::parallel_for, shared by the CPU kernels (spmm_cpu.cpp,
// attention_cpu.cpp): a power-law graph's long rows do not leave a thread idle.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace diffkg_fast {

// Chunk c covers rows [bounds[c], bounds[c+1]) with about equal sum of (row nnz + 1).
inline std::vector<int64_t> row_chunks(const int64_t* rowptr, int64_t n_rows, int64_t d) {
  const int64_t cost = rowptr[n_rows] - rowptr[0] + n_rows;
  // Below ~64k multiply-adds a parallel region costs more than it saves.
  const int64_t threads = at::get_num_threads();
  const int64_t n_chunks =
      (cost * std::max<int64_t>(d, 1) < (int64_t(1) << 16) || threads <= 1)
          ? 1
          : std::min<int64_t>(std::max<int64_t>(n_rows, 1), threads * 4);
  std::vector<int64_t> bounds(n_chunks + 1);
  bounds[0] = 0;
  bounds[n_chunks] = n_rows;
  for (int64_t c = 1; c < n_chunks; ++c) {
    // First row r whose cumulative cost rowptr[r] - rowptr[0] + r reaches c * cost / n_chunks
    // (strictly increasing in r, so a binary search).
    const int64_t target = c * cost / n_chunks;
    int64_t lo = bounds[c - 1], hi = n_rows;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (rowptr[mid] - rowptr[0] + mid < target) lo = mid + 1; else hi = mid;
    }
    bounds[c] = lo;
  }
  return bounds;
}

}  // namespace diffkg_fast
