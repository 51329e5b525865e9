// CSR x dense SpMM kernels for diffkg_fast (csr_spmm, csr_propagate), CUDA key.
//
// Plain CUDA C++, no torch headers: tests/test_spmm_cuda_compile.py compiles this header with
// nvcc -Xptxas -v on a machine without a GPU (the torch binding is csrc/cuda/spmm_cuda.cu), and
// tests/test_spmm_cuda_emu.py runs it on the CPU with the warp emulator of tests/cuda_emu/
// (DIFFKG_FAST_CUDA_EMU: every lane a fiber, __shfl_sync a lockstep exchange).
//
// Math: y[r, :] = sum_{k in rowptr[r] .. rowptr[r+1]} val[k] * x[col[k], :]
//   with the optional fused epilogue of csr_propagate's running layer sum:
//   acc_out[r, :] = acc_in[r, :] + y[r, :]   (acc_in may alias acc_out: same thread, read first)
//
// Design (GE-SpMM, SC20: warp per row, coalesced row caching, several output columns per lane):
// - One warp per output row; 2 warps per block for float, 8 for double (kRowWarps). Rows are
//   independent, so no shared memory and no atomics on the data: the result is deterministic.
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
//
// Long rows (nnz-balanced): a row of more than kLongRow = 256 nonzeros is cut into chunks of
// kChunk = 128 nonzeros, and every chunk is one warp's work, like a short row. Why: on the
// benchmark graphs the longest row holds 13.7k (Gowalla), 39.9k (iFashion) and 24.9k (Last-FM)
// nonzeros, while an H200's 132 x 48 resident warps share ~260 / ~560 / ~960 nonzeros each; the
// rows past 256 nonzeros number 573 / 1,286 / 3,301 and hold 27% / 32% / 43% of all nonzeros
// (3,792 / 9,646 / 22,381 chunks). The constants come from a load-balance model
// (bench/spmm_balance_model.py: a model, not a measurement; no GPU has run this yet), in
// multiples of the balanced time: one warp per row 26-72x, the earlier one 16-warp block per row
// past 1,024 nonzeros 6.0-10.4x, chunks 512 / 256 3.2-6.1x, 256 / 128 2.7-4.5x (8-row blocks;
// 2.2-3.4x with the float kernel's 2-row blocks). Launches, in stream order, with no host sync
// and no data-dependent allocation:
//   0. csr_list_long_rows_kernel (once per op call): each long row reserves ceil(len / kChunk)
//      consecutive slots of the chunk list (one atomicAdd on a counter) and writes each chunk's
//      (row, first nonzero) there. Slot order across rows depends on scheduling; the chunks of
//      one row are consecutive and in order.
//   1. csr_spmm_warp_row_kernel: the short rows, a warp each; it skips the long ones.
//   2. csr_spmm_chunk_kernel: one warp per listed chunk writes the chunk's partial product, a
//      d-wide row of `partial` (grid-stride over the list, at most kMaxChunkBlocks blocks).
//   3. csr_spmm_chunk_sum_kernel: the warp holding a row's first chunk adds the row's partials
//      in chunk order and applies the epilogue. Fixed order: the result does not depend on
//      scheduling (bitwise repeatable), with no atomics on the data.
// The chunk list and `partial` are workspace from the caller (LongRowWork, sized by
// max_long_chunks(nnz) = nnz / kChunk + nnz / (kLongRow + 1) chunks: a bound, since each long
// row adds at most one partly filled chunk and there are at most nnz / (kLongRow + 1) long
// rows). csr_propagate lists the chunks once, in its first layer, and reuses them.
// Known limit: for d < 32 part of each warp idles (a sub-warp-per-row variant would fix that).
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>
#ifndef DIFFKG_FAST_CUDA_EMU
#include <cuda_runtime.h>
#endif

namespace diffkg_fast {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // the list and chunk kernels: 256 threads
constexpr int kThreads = kWarp * kWarpsPerBlock;
// Rows (warps) per block of the warp-per-row kernel: 2 for float, 8 for double. A block keeps
// its registers until its slowest warp is done, so rows of unequal length in one block idle the
// others' share; with 8 rows a block, the sum of the blocks' longest rows is 2.3-2.4x the sum
// of their means on the benchmark graphs. 2-warp blocks still fill an SM (32 resident blocks x
// 2 warps >= the 48-50 warps that 32-40 registers allow), and bench/spmm_balance_model.py puts
// the kernel at 2.5 / 2.0 / 1.2x the balanced time (Gowalla / iFashion / Last-FM) against
// 3.6 / 3.1 / 1.8x with 8-warp blocks (a model: not measured). Double keeps 8: with 2 or 4,
// ptxas spilled 8-16 bytes in 2 of its 6 variants (sm_80 VEC 1 COLS 1, sm_90 VEC 1 COLS 4).
template <typename T>
constexpr int kRowWarps = sizeof(T) == 4 ? 2 : 8;
constexpr unsigned kFullMask = 0xffffffffu;
#ifndef DIFFKG_FAST_LONG_ROW  // overridable only so the CPU emulation test can use small graphs
constexpr int64_t kLongRow = 256;  // nonzeros above which a row is cut into chunks
constexpr int64_t kChunk = 128;    // nonzeros per chunk (the last chunk of a row: 1..kChunk)
#else
constexpr int64_t kLongRow = DIFFKG_FAST_LONG_ROW;
constexpr int64_t kChunk = DIFFKG_FAST_CHUNK;
#endif
static_assert(kChunk > 0 && kLongRow >= kChunk, "a long row has at least one full chunk");
// Grid cap of the chunk kernels (they grid-stride over the list): 1024 blocks of 8 warps, about
// two waves at the chunk kernel's ~4 blocks per SM on an H200 (bench/spmm_balance_model.py
// models a cap of 528, one wave, as no different).
constexpr int64_t kMaxChunkBlocks = 1024;

// Upper bound on the chunks of all long rows of a CSR with nnz nonzeros (0: no row can be long).
inline int64_t max_long_chunks(int64_t nnz) {
  return nnz > kLongRow ? nnz / kChunk + nnz / (kLongRow + 1) : 0;
}

// Workspace of the long rows, from the caller (the torch binding allocates it per op call).
//   count:   1 counter, zero before the layer that lists the chunks;
//   chunks:  2 * max_chunks int64, (row, first nonzero) per listed chunk;
//   partial: max_chunks x d scalars, each listed chunk's partial product.
// max_chunks == 0 (nnz <= kLongRow): no row is long, one launch per layer and no workspace.
template <typename T>
struct LongRowWork {
  unsigned long long* count = nullptr;
  int64_t* chunks = nullptr;
  T* partial = nullptr;
  int64_t max_chunks = 0;
};

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

template <typename T, int VEC, int COLS>
__device__ __forceinline__ void zero_tile(T (&acc)[COLS][VEC]) {
#pragma unroll
  for (int c = 0; c < COLS; ++c)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[c][i] = T(0);
}

// acc += v * row[the tile's vectors of this lane], one fma (one rounding) per scalar.
template <typename T, int VEC, int COLS>
__device__ __forceinline__ void fma_tile(const T* __restrict__ row, T v, int64_t nvec,
                                         int64_t tile, int lane, T (&acc)[COLS][VEC]) {
#pragma unroll
  for (int cc = 0; cc < COLS; ++cc) {
    const int64_t vi = tile + cc * kWarp + lane;
    if (vi < nvec) {
      T xv[VEC];
      load_vec<T, VEC>(row + vi * VEC, xv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[cc][i] = fma(v, xv[i], acc[cc][i]);
    }
  }
}

// acc = sum_{k in [k0, k1)} val[k] * x[col[k], the tile's vectors of this lane]. The warp
// walks the nonzeros 32 at a time; every lane of the warp must call it with the same k0, k1.
template <typename T, int VEC, int COLS>
__device__ __forceinline__ void sum_range(const int64_t* __restrict__ col,
                                          const T* __restrict__ val, const T* __restrict__ x,
                                          int64_t d, int64_t nvec, int64_t tile, int lane,
                                          int64_t k0, int64_t k1, T (&acc)[COLS][VEC]) {
  zero_tile<T, VEC, COLS>(acc);
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
      fma_tile<T, VEC, COLS>(x + c * d, v, nvec, tile, lane, acc);
    }
  }
}

// The tile's vectors of one output row: y = acc when y is non-null; acc_out = acc_in + acc when
// acc_out is non-null. `off_row` is the row's first scalar (row * d).
template <typename T, int VEC, int COLS>
__device__ __forceinline__ void store_tile(T* __restrict__ y, const T* acc_in, T* acc_out,
                                           int64_t off_row, int64_t nvec, int64_t tile,
                                           int lane, const T (&acc)[COLS][VEC]) {
#pragma unroll
  for (int cc = 0; cc < COLS; ++cc) {
    const int64_t vi = tile + cc * kWarp + lane;
    if (vi < nvec) {
      const int64_t off = off_row + vi * VEC;
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

// Lists the long rows' chunks: one thread per row; a row of len > kLongRow nonzeros reserves
// ceil(len / kChunk) consecutive slots with one atomicAdd on *count (zero before the launch) and
// writes chunk c as (row, s + c * kChunk). A kernel of its own, not a branch of the warp-per-row
// kernel: with the branch, ptxas spilled 4-8 bytes in 3 of the 15 variants of that kernel
// (sm_90, nvcc 13.0), and without it the kernel keeps the registers it had (32-74, no spill).
__global__ void __launch_bounds__(kThreads)
csr_list_long_rows_kernel(const int64_t* __restrict__ rowptr, int64_t n_rows,
                          unsigned long long* count, int64_t* __restrict__ chunks) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= n_rows) return;
  const int64_t s = rowptr[row];
  const int64_t len = rowptr[row + 1] - s;
  if (len <= kLongRow) return;
  const int64_t n = (len + kChunk - 1) / kChunk;
  const int64_t base = static_cast<int64_t>(atomicAdd(count, static_cast<unsigned long long>(n)));
  for (int64_t c = 0; c < n; ++c) {
    chunks[2 * (base + c)] = row;
    chunks[2 * (base + c) + 1] = s + c * kChunk;
  }
}

// Warp-per-row CSR SpMM with the optional fused running-sum epilogue.
//   y       (n_rows, d) or nullptr: the product is written here when non-null.
//   acc_in  (n_rows, d) or nullptr; acc_out (n_rows, d) or nullptr: when acc_out is non-null,
//           acc_out = acc_in + product (acc_in must then be non-null; it may equal acc_out).
//   max_nnz: rows with more nonzeros are long, left to the chunk kernels.
// Requirements (checked by the launcher's caller): d % VEC == 0, x / y / acc pointers aligned to
// VEC * sizeof(T), 0 <= col[k] < rows of x, rowptr non-decreasing.
template <typename T, int VEC, int COLS>
__global__ void __launch_bounds__(kWarp * kRowWarps<T>)
csr_spmm_warp_row_kernel(const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                         const T* __restrict__ val, const T* __restrict__ x, T* __restrict__ y,
                         const T* acc_in, T* acc_out, int64_t n_rows, int64_t d,
                         int64_t max_nnz) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps<T> + (threadIdx.x >> 5);
  if (row >= n_rows) return;  // warp-uniform: a whole warp leaves together

  const int64_t row_start = rowptr[row];
  const int64_t row_end = rowptr[row + 1];
  if (row_end - row_start > max_nnz) return;  // warp-uniform: a long row, the chunks' work
  const int64_t nvec = d / VEC;  // vectors per dense row
  for (int64_t tile = 0; tile < nvec; tile += static_cast<int64_t>(kWarp) * COLS) {
    T acc[COLS][VEC];
    sum_range<T, VEC, COLS>(col, val, x, d, nvec, tile, lane, row_start, row_end, acc);
    store_tile<T, VEC, COLS>(y, acc_in, acc_out, row * d, nvec, tile, lane, acc);
  }
}

// One warp per listed chunk (grid-stride over the *count chunks): partial[j, :] = the product
// of chunk j's nonzeros [k0, min(k0 + kChunk, end of its row)).
// __launch_bounds__(kThreads, 2): with kThreads alone ptxas spilled 8-32 bytes in 6 of the 15
// variants (sm_80 / sm_90, nvcc 13.0); with the hint, none (38-124 registers).
template <typename T, int VEC, int COLS>
__global__ void __launch_bounds__(kThreads, 2)
csr_spmm_chunk_kernel(const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                      const T* __restrict__ val, const T* __restrict__ x, int64_t d,
                      const unsigned long long* count, const int64_t* __restrict__ chunks,
                      T* __restrict__ partial) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t n_chunks = static_cast<int64_t>(*count);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t nvec = d / VEC;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
       j < n_chunks; j += stride) {  // warp-uniform bounds
    const int64_t row = chunks[2 * j];
    const int64_t k0 = chunks[2 * j + 1];
    const int64_t end = rowptr[row + 1];
    const int64_t k1 = end - k0 < kChunk ? end : k0 + kChunk;
    for (int64_t tile = 0; tile < nvec; tile += static_cast<int64_t>(kWarp) * COLS) {
      T acc[COLS][VEC];
      sum_range<T, VEC, COLS>(col, val, x, d, nvec, tile, lane, k0, k1, acc);
      store_tile<T, VEC, COLS>(partial, nullptr, nullptr, j * d, nvec, tile, lane, acc);
    }
  }
}

// The warp holding a long row's first chunk sums the row's ceil(len / kChunk) partials in chunk
// order (they are consecutive in the list) and writes the row: y and / or acc_out = acc_in + sum,
// as the warp-per-row kernel does for a short row. The other chunks' warps do nothing.
template <typename T, int VEC, int COLS>
__global__ void __launch_bounds__(kThreads)
csr_spmm_chunk_sum_kernel(const int64_t* __restrict__ rowptr, int64_t d,
                          const unsigned long long* count, const int64_t* __restrict__ chunks,
                          const T* __restrict__ partial, T* __restrict__ y, const T* acc_in,
                          T* acc_out) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t n_chunks = static_cast<int64_t>(*count);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t nvec = d / VEC;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
       j < n_chunks; j += stride) {
    const int64_t row = chunks[2 * j];
    const int64_t s = rowptr[row];
    if (chunks[2 * j + 1] != s) continue;  // not the row's first chunk (warp-uniform)
    const int64_t n = (rowptr[row + 1] - s + kChunk - 1) / kChunk;
    for (int64_t tile = 0; tile < nvec; tile += static_cast<int64_t>(kWarp) * COLS) {
      T acc[COLS][VEC];
      zero_tile<T, VEC, COLS>(acc);
      // fma(1, p, acc) rounds once, as acc + p does.
      for (int64_t c = 0; c < n; ++c)
        fma_tile<T, VEC, COLS>(partial + (j + c) * d, T(1), nvec, tile, lane, acc);
      store_tile<T, VEC, COLS>(y, acc_in, acc_out, row * d, nvec, tile, lane, acc);
    }
  }
}

// Launch `kernel` (a __global__ function) on `stream`; under DIFFKG_FAST_CUDA_EMU, on the CPU
// warp emulator instead. Launching through the function's address is plain CUDA.
template <typename... P, typename... A>
inline void launch_kernel(void (*kernel)(P...), int64_t blocks, int threads,
                          cudaStream_t stream, A... args) {
#ifdef DIFFKG_FAST_CUDA_EMU
  (void)stream;
  emu::launch(blocks, threads, [=] { kernel(static_cast<P>(args)...); });
#else
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(static_cast<P>(args)...);
#endif
}

// One product (one LightGCN layer): the warp-per-row kernel, then, when the CSR can hold long
// rows, the chunk kernel and the chunk sum (after the chunk listing, when `list`). `list`: this launch lists the long rows' chunks
// (work.count must be zero); otherwise work.chunks holds them from an earlier launch on the
// same CSR.
template <typename T, int VEC, int COLS>
inline void launch_product(const int64_t* rowptr, const int64_t* col, const T* val, const T* x,
                           T* y, const T* acc_in, T* acc_out, int64_t n_rows, int64_t d,
                           const LongRowWork<T>& work, bool list, cudaStream_t stream) {
  const bool split = work.max_chunks > 0;
  if (split && list)
    launch_kernel(&csr_list_long_rows_kernel, (n_rows + kThreads - 1) / kThreads, kThreads,
                  stream, rowptr, n_rows, work.count, work.chunks);
  const int64_t blocks = (n_rows + kRowWarps<T> - 1) / kRowWarps<T>;
  launch_kernel(&csr_spmm_warp_row_kernel<T, VEC, COLS>, blocks, kWarp * kRowWarps<T>, stream,
                rowptr, col,
                val, x, y, acc_in, acc_out, n_rows, d,
                split ? kLongRow : std::numeric_limits<int64_t>::max());
  if (!split) return;
  int64_t chunk_blocks = (work.max_chunks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (chunk_blocks > kMaxChunkBlocks) chunk_blocks = kMaxChunkBlocks;
  launch_kernel(&csr_spmm_chunk_kernel<T, VEC, COLS>, chunk_blocks, kThreads, stream, rowptr,
                col, val, x, d, work.count, work.chunks, work.partial);
  launch_kernel(&csr_spmm_chunk_sum_kernel<T, VEC, COLS>, chunk_blocks, kThreads, stream,
                rowptr, d, work.count, work.chunks, work.partial, y, acc_in, acc_out);
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

// Calls f(std::integral_constant<int, VEC>, std::integral_constant<int, COLS>) for the variant
// that d and the pointers allow (float: VEC 1/2/4, double: VEC 1/2; COLS 1/2/4).
template <typename T, typename F>
inline void with_variant(int64_t d, const void* const* ptrs, int n_ptrs, F&& f) {
  using std::integral_constant;
  const int vec = pick_vec<T>(d, ptrs, n_ptrs);
  const int cols = pick_cols(d / vec);
  auto by_cols = [&](auto v) {
    if (cols == 1) f(v, integral_constant<int, 1>{});
    else if (cols == 2) f(v, integral_constant<int, 2>{});
    else f(v, integral_constant<int, 4>{});
  };
  if constexpr (sizeof(T) == 4) {
    if (vec == 4) return by_cols(integral_constant<int, 4>{});
  }
  if (vec == 2) by_cols(integral_constant<int, 2>{});
  else by_cols(integral_constant<int, 1>{});
}

// Host launcher of csr_spmm: y = A x (n_rows x d). nnz = col's length (bounds every row's
// length); `work` sized for max_long_chunks(nnz), its counter zero. Does nothing for an empty
// output. The caller checks the launches (C10_CUDA_KERNEL_LAUNCH_CHECK in spmm_cuda.cu). Grid:
// one block per kRowWarps<T> rows, so n_rows < 2 * (2^31 - 1) (gridDim.x limit); the caller
// checks it.
template <typename T>
inline void launch_csr_spmm(const int64_t* rowptr, const int64_t* col, const T* val, const T* x,
                            T* y, int64_t n_rows, int64_t d, const LongRowWork<T>& work,
                            cudaStream_t stream) {
  if (n_rows <= 0 || d <= 0) return;
  const void* ptrs[3] = {x, y, work.partial};
  with_variant<T>(d, ptrs, 3, [&](auto vec, auto cols) {
    launch_product<T, decltype(vec)::value, decltype(cols)::value>(
        rowptr, col, val, x, y, nullptr, nullptr, n_rows, d, work, true, stream);
  });
}

// Host launcher of csr_propagate: out = sum_{l=0..layers} A^l x for a square A (layers >= 1).
// Layer l reads the previous product (x for l = 1) and, in the epilogue, adds its product into
// `out` (out = x + A x at l = 1, so no copy of x). The product itself is stored only when a later
// layer reads it, in the ping-pong buffers buf0 / buf1 (n_rows x d; buf0 needed when layers >= 2,
// buf1 when layers >= 3). The first layer lists the long rows' chunks, the others reuse them.
template <typename T>
inline void launch_csr_propagate(const int64_t* rowptr, const int64_t* col, const T* val,
                                 const T* x, T* out, T* buf0, T* buf1, int64_t n_rows,
                                 int64_t d, int64_t layers, const LongRowWork<T>& work,
                                 cudaStream_t stream) {
  if (n_rows <= 0 || d <= 0) return;
  const void* ptrs[5] = {x, out, buf0, buf1, work.partial};
  with_variant<T>(d, ptrs, 5, [&](auto vec, auto cols) {
    const T* cur = x;
    for (int64_t l = 1; l <= layers; ++l) {
      T* next = l == layers ? nullptr : ((l - 1) % 2 == 0 ? buf0 : buf1);
      const T* acc_in = l == 1 ? x : out;  // acc_in == out from layer 2: the in-place sum
      launch_product<T, decltype(vec)::value, decltype(cols)::value>(
          rowptr, col, val, cur, next, acc_in, out, n_rows, d, work, l == 1, stream);
      cur = next;
    }
  });
}

}  // namespace cuda
}  // namespace diffkg_fast
