// CSR x dense SpMM kernels for diffkg_fast (csr_spmm, csr_propagate), CUDA key.
//
// Plain CUDA C++, no torch headers: tests/test_spmm_cuda_compile.py compiles this header with
// nvcc -Xptxas -v on a machine without a GPU (the torch binding is csrc/cuda/spmm_cuda.cu).
//
// Math: y[r, :] = sum_{k in rowptr[r] .. rowptr[r+1]} val[k] * x[col[k], :]
//   with the optional fused epilogue of csr_propagate's running layer sum:
//   acc_out[r, :] = acc_in[r, :] + y[r, :]   (acc_in may alias acc_out: same thread, read first)
//
// Design (GE-SpMM, SC20: warp per row, coalesced row caching, several output columns per lane):
// - One warp per output row; 8 warps (256 threads) per block, so a block covers 8 rows. Rows are
//   independent, so no shared memory and no atomics: the result is deterministic.
// - The warp walks its row's nonzeros 32 at a time: lane i loads the pair (col[k+i], val[k+i])
//   (one coalesced 8-byte load per array for the warp), then the 32 pairs are broadcast with
//   __shfl_sync, so every x row index reaches all lanes without a shared-memory round trip.
// - The dense width d is split across lanes: lane `l` owns vectors l, l+32, ..., l+32*(COLS-1)
//   of the current column tile, each vector VEC scalars wide. VEC = 16 bytes / sizeof(T) (float4,
//   double2) when d % VEC == 0 and every dense pointer is 16-byte aligned, then 8 bytes (float2),
//   else scalar. Consecutive lanes read consecutive vectors of one x row: one x row is read by
//   the warp in full 32-byte sectors.
// - COLS (vectors per lane per tile, 1/2/4) is the smallest that covers d in one tile, capped at
//   4: d = 64 float -> float2 x 1, d = 128 -> float4 x 1, d = 512 -> float4 x 4. When d exceeds
//   one tile (> 512 floats / 256 doubles) the row's (col, val) pairs are re-read per tile (from
//   L1/L2). Accumulators live in registers: VEC * COLS <= 16 scalars per lane.
// - Accumulation in T (fp32 for float, fp64 for double), in nonzero order.
// - Offsets and indices are int64 throughout (nnz and n_rows * d may exceed 2^31).
// - Long rows (more than kLongRow = 1024 nonzeros) are skipped by the warp-per-row kernel and
//   taken by csr_spmm_long_row_kernel, one 512-thread block (16 warps) per row: each warp sums a
//   contiguous 1/16 of the row, the 16 partial tiles meet in shared memory and are added in warp
//   order, so the result stays deterministic (no atomics). Why: on the benchmark graphs the
//   longest row holds 13.7k (Gowalla), 39.9k (iFashion) and 24.9k (Last-FM) nonzeros, while an
//   H200's 132 x 64 resident warps share ~190 / ~420 / ~720 nonzeros each; one warp walking the
//   longest row alone would be ~95x the balanced time on iFashion, a block of 16 warps ~6x
//   (estimates from the degree counts, not measured: no GPU has run this yet). Splitting a row
//   over several blocks would balance fully, at the cost of a partial-sum buffer and a pass.
// Known limit: for d < 32 part of each warp idles (a sub-warp-per-row variant would fix that).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>
#include <limits>

namespace diffkg_fast {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // 256 threads: 8 rows per block, full occupancy on sm_80/90
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kLongRow = 1024;  // nonzeros above which a row gets a whole block
constexpr int kLongWarps = 16;      // warps of the long-row block
constexpr int kLongThreads = kWarp * kLongWarps;

// Vector type of VEC scalars of T; VEC * sizeof(T) is 4, 8 or 16 bytes.
template <typename T, int VEC>
struct Vec;
template <> struct Vec<float, 1> { using type = float; };
template <> struct Vec<float, 2> { using type = float2; };
template <> struct Vec<float, 4> { using type = float4; };
template <> struct Vec<double, 1> { using type = double; };
template <> struct Vec<double, 2> { using type = double2; };

// Component access of a vector as a plain array (float4 and double2 are standard-layout
// structs of VEC scalars; the cast keeps the accumulation code generic over VEC).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, T (&out)[VEC]) {
  using V = typename Vec<T, VEC>::type;
  const V v = __ldg(reinterpret_cast<const V*>(p));
  const T* s = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = s[i];
}

// acc_in / acc_out are not __restrict__: csr_propagate passes the same buffer for both.
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[VEC]) {
  using V = typename Vec<T, VEC>::type;
  V v;
  T* s = reinterpret_cast<T*>(&v);
#pragma unroll
  for (int i = 0; i < VEC; ++i) s[i] = in[i];
  *reinterpret_cast<V*>(p) = v;
}

template <typename T, int VEC>
__device__ __forceinline__ void load_vec_plain(const T* p, T (&out)[VEC]) {
  using V = typename Vec<T, VEC>::type;
  const V v = *reinterpret_cast<const V*>(p);
  const T* s = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = s[i];
}

// acc = sum_{k in [k0, k1)} val[k] * x[col[k], the tile's vectors of this lane]. The warp
// walks the nonzeros 32 at a time; every lane of the warp must call it with the same k0, k1.
template <typename T, int VEC, int COLS>
__device__ __forceinline__ void sum_range(const int64_t* __restrict__ col,
                                          const T* __restrict__ val, const T* __restrict__ x,
                                          int64_t d, int64_t nvec, int64_t tile, int lane,
                                          int64_t k0, int64_t k1, T (&acc)[COLS][VEC]) {
#pragma unroll
  for (int c = 0; c < COLS; ++c)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[c][i] = T(0);
  for (int64_t base = k0; base < k1; base += kWarp) {
    // Cooperative, coalesced load of up to 32 (col, val) pairs of this row.
    const int64_t k = base + lane;
    int64_t my_col = 0;
    T my_val = T(0);
    if (k < k1) {
      my_col = __ldg(col + k);
      my_val = __ldg(val + k);
    }
    const int64_t left = k1 - base;
    const int n = left < kWarp ? static_cast<int>(left) : kWarp;  // warp-uniform
    // Unrolled x4 (x2 for the 16-accumulator variants, where x4 spills on sm_80): several
    // independent x-row loads in flight per lane hide the gather latency.
#pragma unroll(VEC * COLS >= 16 ? 2 : 4)
    for (int j = 0; j < n; ++j) {
      const int64_t c = __shfl_sync(kFullMask, my_col, j);
      const T v = __shfl_sync(kFullMask, my_val, j);
      const T* xrow = x + c * d;
#pragma unroll
      for (int cc = 0; cc < COLS; ++cc) {
        const int64_t vi = tile + cc * kWarp + lane;
        if (vi < nvec) {
          T xv[VEC];
          load_vec<T, VEC>(xrow + vi * VEC, xv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[cc][i] = fma(v, xv[i], acc[cc][i]);
        }
      }
    }
  }
}

// Warp-per-row CSR SpMM with the optional fused running-sum epilogue.
//   y       (n_rows, d) or nullptr: the product is written here when non-null.
//   acc_in  (n_rows, d) or nullptr; acc_out (n_rows, d) or nullptr: when acc_out is non-null,
//           acc_out = acc_in + product (acc_in must then be non-null; it may equal acc_out).
//   max_nnz: rows with more nonzeros are left to csr_spmm_long_row_kernel.
// Requirements (checked by the launcher's caller): d % VEC == 0, x / y / acc pointers aligned to
// VEC * sizeof(T), 0 <= col[k] < rows of x, rowptr non-decreasing.
template <typename T, int VEC, int COLS>
__global__ void __launch_bounds__(kThreads)
csr_spmm_warp_row_kernel(const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                         const T* __restrict__ val, const T* __restrict__ x, T* __restrict__ y,
                         const T* acc_in, T* acc_out, int64_t n_rows, int64_t d,
                         int64_t max_nnz) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= n_rows) return;  // warp-uniform: a whole warp leaves together

  const int64_t row_start = rowptr[row];
  const int64_t row_end = rowptr[row + 1];
  if (row_end - row_start > max_nnz) return;  // warp-uniform: a long row, another kernel's
  const int64_t nvec = d / VEC;  // vectors per dense row

  for (int64_t tile = 0; tile < nvec; tile += static_cast<int64_t>(kWarp) * COLS) {
    T acc[COLS][VEC];
    sum_range<T, VEC, COLS>(col, val, x, d, nvec, tile, lane, row_start, row_end, acc);

    const int64_t out_row = row * d;
#pragma unroll
    for (int cc = 0; cc < COLS; ++cc) {
      const int64_t vi = tile + cc * kWarp + lane;
      if (vi < nvec) {
        const int64_t off = out_row + vi * VEC;
        if (y != nullptr) store_vec<T, VEC>(y + off, acc[cc]);
        if (acc_out != nullptr) {
          T prev[VEC];
          load_vec_plain<T, VEC>(acc_in + off, prev);
#pragma unroll
          for (int i = 0; i < VEC; ++i) prev[i] += acc[cc][i];
          store_vec<T, VEC>(acc_out + off, prev);
        }
      }
    }
  }
}

// The rows with more than kLongRow nonzeros, one block of kLongWarps warps per row. Block b
// looks at rows [b * kLongThreads, (b + 1) * kLongThreads): each thread tests one row's length,
// the long ones are listed in shared memory, and the block takes them one after the other.
// Warp w sums nonzeros [s + len * w / 16, s + len * (w + 1) / 16) of a row into registers (the
// same per-lane tile layout as the warp-per-row kernel); the 16 partial tiles are stored in
// shared memory and each output scalar is the sum of its 16 partials in warp order (fixed, so
// the result does not depend on scheduling). Same arguments and requirements as above.
// __launch_bounds__(512, 1): with the minimum-blocks hint left out, ptxas held these variants
// at 32-64 registers and spilled 4-40 bytes (sm_80 and sm_90, nvcc 13.0); with it, 56-64
// registers and no spill (tests/test_spmm_cuda_compile.py checks every variant).
template <typename T, int VEC, int COLS>
__global__ void __launch_bounds__(kLongThreads, 1)
csr_spmm_long_row_kernel(const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                         const T* __restrict__ val, const T* __restrict__ x, T* __restrict__ y,
                         const T* acc_in, T* acc_out, int64_t n_rows, int64_t d) {
  constexpr int kTile = kWarp * COLS * VEC;  // scalars of one column tile
  __shared__ int64_t long_rows[kLongThreads];
  __shared__ int n_long;
  __shared__ T part[kLongWarps][kTile];  // <= 16 x 512 floats or 16 x 256 doubles: 32 KB
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & (kWarp - 1);

  if (threadIdx.x == 0) n_long = 0;
  __syncthreads();
  const int64_t mine = static_cast<int64_t>(blockIdx.x) * kLongThreads + threadIdx.x;
  if (mine < n_rows && rowptr[mine + 1] - rowptr[mine] > kLongRow)
    long_rows[atomicAdd(&n_long, 1)] = mine;  // list order is irrelevant: rows are independent
  __syncthreads();

  const int64_t nvec = d / VEC;
  for (int r = 0; r < n_long; ++r) {  // block-uniform bounds: the barriers below are safe
    const int64_t row = long_rows[r];
    const int64_t s = rowptr[row];
    const int64_t len = rowptr[row + 1] - s;
    const int64_t k0 = s + len * warp / kLongWarps;
    const int64_t k1 = s + len * (warp + 1) / kLongWarps;
    for (int64_t tile = 0; tile < nvec; tile += static_cast<int64_t>(kWarp) * COLS) {
      T acc[COLS][VEC];
      sum_range<T, VEC, COLS>(col, val, x, d, nvec, tile, lane, k0, k1, acc);
      __syncthreads();  // the previous tile's partials have been read
#pragma unroll
      for (int cc = 0; cc < COLS; ++cc)
#pragma unroll
        for (int i = 0; i < VEC; ++i) part[warp][(cc * kWarp + lane) * VEC + i] = acc[cc][i];
      __syncthreads();
      // Scalar q of the tile is component q % VEC of vector tile + q / VEC: consecutive threads
      // write consecutive addresses of the output row.
      const int64_t tile_end = (nvec - tile) * VEC;  // scalars of this tile inside the row
      for (int q = threadIdx.x; q < kTile; q += kLongThreads) {
        if (q < tile_end) {
          T sum = part[0][q];
#pragma unroll
          for (int w = 1; w < kLongWarps; ++w) sum += part[w][q];
          const int64_t off = row * d + tile * VEC + q;
          if (y != nullptr) y[off] = sum;
          if (acc_out != nullptr) acc_out[off] = acc_in[off] + sum;
        }
      }
    }
  }
}

// Widest vector (in scalars) usable for a dense width d and the given pointers: 16 bytes, then
// 8, then scalar, requiring d % VEC == 0, every non-null pointer aligned, and at least 32 vectors
// per row when VEC > 1 (a wider vector with fewer vectors than lanes idles more of the warp).
template <typename T>
inline int pick_vec(int64_t d, const void* const* ptrs, int n_ptrs) {
  for (int vec = static_cast<int>(16 / sizeof(T)); vec > 1; vec /= 2) {
    if (d % vec != 0 || d / vec < kWarp) continue;
    bool aligned = true;
    for (int i = 0; i < n_ptrs; ++i)
      if (ptrs[i] != nullptr &&
          reinterpret_cast<uintptr_t>(ptrs[i]) % (static_cast<uintptr_t>(vec) * sizeof(T)) != 0)
        aligned = false;
    if (aligned) return vec;
  }
  return 1;
}

// Vectors per lane per tile: the smallest of 1, 2, 4 that covers the row in one tile.
inline int pick_cols(int64_t nvec) {
  if (nvec <= kWarp) return 1;
  if (nvec <= 2 * kWarp) return 2;
  return 4;
}

template <typename T, int VEC, int COLS>
inline void launch_variant(const int64_t* rowptr, const int64_t* col, const T* val, const T* x,
                           T* y, const T* acc_in, T* acc_out, int64_t n_rows, int64_t d,
                           int64_t nnz, cudaStream_t stream) {
  // With nnz <= kLongRow no row can be long: one kernel, no second launch.
  const bool split = nnz > kLongRow;
  const int64_t blocks = (n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  csr_spmm_warp_row_kernel<T, VEC, COLS><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      rowptr, col, val, x, y, acc_in, acc_out, n_rows, d,
      split ? kLongRow : std::numeric_limits<int64_t>::max());
  if (split) {
    const int64_t long_blocks = (n_rows + kLongThreads - 1) / kLongThreads;
    csr_spmm_long_row_kernel<T, VEC, COLS>
        <<<static_cast<unsigned>(long_blocks), kLongThreads, 0, stream>>>(
            rowptr, col, val, x, y, acc_in, acc_out, n_rows, d);
  }
}

template <typename T, int VEC>
inline void launch_cols(int cols, const int64_t* rowptr, const int64_t* col, const T* val,
                        const T* x, T* y, const T* acc_in, T* acc_out, int64_t n_rows,
                        int64_t d, int64_t nnz, cudaStream_t stream) {
  switch (cols) {
    case 1:
      launch_variant<T, VEC, 1>(rowptr, col, val, x, y, acc_in, acc_out, n_rows, d, nnz,
                                stream);
      break;
    case 2:
      launch_variant<T, VEC, 2>(rowptr, col, val, x, y, acc_in, acc_out, n_rows, d, nnz,
                                stream);
      break;
    default:
      launch_variant<T, VEC, 4>(rowptr, col, val, x, y, acc_in, acc_out, n_rows, d, nnz,
                                stream);
      break;
  }
}

// Host launcher: picks VEC and COLS and launches on `stream`. Does nothing for an empty output.
// nnz = col's length (a bound on any row's length: at most kLongRow means no long-row launch).
// The caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK in spmm_cuda.cu). Grid: one block
// per 8 rows, so n_rows < 8 * (2^31 - 1) (gridDim.x limit); the caller checks it.
template <typename T>
inline void launch_csr_spmm(const int64_t* rowptr, const int64_t* col, const T* val, const T* x,
                            T* y, const T* acc_in, T* acc_out, int64_t n_rows, int64_t d,
                            int64_t nnz, cudaStream_t stream) {
  if (n_rows <= 0 || d <= 0) return;
  const void* ptrs[4] = {x, y, acc_in, acc_out};
  const int vec = pick_vec<T>(d, ptrs, 4);
  const int cols = pick_cols(d / vec);
  if constexpr (sizeof(T) == 4) {
    if (vec == 4) {
      launch_cols<T, 4>(cols, rowptr, col, val, x, y, acc_in, acc_out, n_rows, d, nnz, stream);
      return;
    }
  }
  if (vec == 2) {
    launch_cols<T, 2>(cols, rowptr, col, val, x, y, acc_in, acc_out, n_rows, d, nnz, stream);
  } else {
    launch_cols<T, 1>(cols, rowptr, col, val, x, y, acc_in, acc_out, n_rows, d, nnz, stream);
  }
}

}  // namespace cuda
}  // namespace diffkg_fast
