// CPU kernels of diffkg_fast::csr_spmm and diffkg_fast::csr_propagate (schemas in ../spmm.cpp).
//
// One pass over the rows per layer. Rows are split into chunks of equal cost (nnz + 1 per row,
// so empty rows still count for writing their output), one contiguous range of chunks per
// thread (at::parallel_for): a power-law graph's long rows do not leave a thread idle. Each
// row accumulates into a d-long buffer that stays in L1; the loop over d is contiguous and
// unit-stride, with restrict pointers so that the compiler vectorizes it. On x86-64 with GCC the
// row kernel is compiled twice (AVX2+FMA and baseline) and picked at load time by CPU features
// (target_clones), so an ahead-of-time wheel built for baseline x86-64 still runs AVX2 code.
//
// csr_propagate fuses the LightGCN sum: layer l writes A cur into the next buffer and adds it
// into the output row while the row is hot, the first layer adds x itself (layer 0) and the last
// layer stores nothing but the output. L layers read A L times and write 2 (N, d) tables per
// layer instead of the 3 of "cur = A cur; out = out + cur".

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "../spmm_checks.h"
#include "row_chunks.h"
#include "simd.h"

namespace diffkg_fast {
namespace {

// What a layer writes per row r (acc = (A cur)[r]):
//   next[r] = acc               when next != nullptr
//   out[r]  = acc               when out != nullptr and base == nullptr
//   out[r] += acc               when base == out
//   out[r]  = base[r] + acc     otherwise (base = x: the first layer adds layer 0)
template <typename T>
struct Layer {
  const int64_t* rowptr;
  const int64_t* col;
  const T* val;
  const T* cur;   // (n_cols, d) input of this layer
  T* next;        // (n_rows, d) or nullptr
  T* out;         // (n_rows, d) or nullptr
  const T* base;  // (n_rows, d) added to out, or nullptr (out = acc)
  int64_t d;
};

constexpr int64_t kPrefetch = 16;  // nonzeros ahead; measured on the Gowalla shape, d = 64

// D > 0: the row width is a compile-time constant, so acc is a local array that the compiler keeps
// in vector registers for the whole row (d = 32 float: 4 AVX2 registers) instead of loading and
// storing it once per four nonzeros; D = 0: any d, acc in the caller's L1 buffer.
template <typename T, int D>
inline __attribute__((always_inline)) void rows_impl(const Layer<T>& L, int64_t r0, int64_t r1,
                                                    T* __restrict__ acc_buf) {
  const int64_t d = D > 0 ? D : L.d;
  T acc_local[D > 0 ? D : 1];
  T* __restrict__ acc = D > 0 ? acc_local : acc_buf;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < d; ++j) acc[j] = T(0);
    int64_t k = L.rowptr[r];
    const int64_t e = L.rowptr[r + 1];
    // Four nonzeros per sweep over d: one load and store of acc per four rows of cur. The rows
    // of cur are gathered at random (power-law columns), so the rows kPrefetch nonzeros ahead
    // are prefetched: the loop is bound by memory latency, not by the multiply-adds.
    for (; k + 4 <= e; k += 4) {
      if (k + kPrefetch + 4 <= e) {
        for (int p = 0; p < 4; ++p) prefetch_row(L.cur + L.col[k + kPrefetch + p] * d, d);
      }
      const T v0 = L.val[k], v1 = L.val[k + 1], v2 = L.val[k + 2], v3 = L.val[k + 3];
      const T* __restrict__ x0 = L.cur + L.col[k] * d;
      const T* __restrict__ x1 = L.cur + L.col[k + 1] * d;
      const T* __restrict__ x2 = L.cur + L.col[k + 2] * d;
      const T* __restrict__ x3 = L.cur + L.col[k + 3] * d;
      for (int64_t j = 0; j < d; ++j) acc[j] += (v0 * x0[j] + v1 * x1[j]) + (v2 * x2[j] + v3 * x3[j]);
    }
    for (; k < e; ++k) {
      const T v = L.val[k];
      const T* __restrict__ xr = L.cur + L.col[k] * d;
      for (int64_t j = 0; j < d; ++j) acc[j] += v * xr[j];
    }
    if (L.next != nullptr) {
      T* __restrict__ nr = L.next + r * d;
      for (int64_t j = 0; j < d; ++j) nr[j] = acc[j];
    }
    if (L.out != nullptr) {
      T* __restrict__ orow = L.out + r * d;
      if (L.base == L.out) {
        for (int64_t j = 0; j < d; ++j) orow[j] += acc[j];
      } else if (L.base != nullptr) {
        const T* __restrict__ br = L.base + r * d;
        for (int64_t j = 0; j < d; ++j) orow[j] = br[j] + acc[j];
      } else {
        for (int64_t j = 0; j < d; ++j) orow[j] = acc[j];
      }
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void rows_any(const Layer<T>& L, int64_t r0, int64_t r1,
                                                   T* acc) {
  switch (L.d) {
    case 16: rows_impl<T, 16>(L, r0, r1, acc); return;
    case 32: rows_impl<T, 32>(L, r0, r1, acc); return;
    case 64: rows_impl<T, 64>(L, r0, r1, acc); return;
    default: rows_impl<T, 0>(L, r0, r1, acc); return;
  }
}

// Non-template entry points: target_clones applies to plain functions.
DIFFKG_TARGET_CLONES void rows_f32(const Layer<float>& L, int64_t r0, int64_t r1, float* acc) {
  rows_any<float>(L, r0, r1, acc);
}
DIFFKG_TARGET_CLONES void rows_f64(const Layer<double>& L, int64_t r0, int64_t r1, double* acc) {
  rows_any<double>(L, r0, r1, acc);
}
inline void rows(const Layer<float>& L, int64_t r0, int64_t r1, float* acc) {
  rows_f32(L, r0, r1, acc);
}
inline void rows(const Layer<double>& L, int64_t r0, int64_t r1, double* acc) {
  rows_f64(L, r0, r1, acc);
}

template <typename T>
void run_layer(const Layer<T>& L, const std::vector<int64_t>& bounds) {
  const int64_t n_chunks = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> acc(static_cast<size_t>(std::max<int64_t>(L.d, 1)));
    for (int64_t c = c0; c < c1; ++c) rows(L, bounds[c], bounds[c + 1], acc.data());
  });
}

void check_inputs(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
                  const at::Tensor& val, const at::Tensor& x) {
  TORCH_CHECK(rowptr.device().is_cpu() && col.device().is_cpu() && val.device().is_cpu() &&
                  x.device().is_cpu(),
              op, ": rowptr, col, val and x must all be CPU tensors, got ", rowptr.device(), ", ",
              col.device(), ", ", val.device(), ", ", x.device());
  check_spmm_args(op, rowptr, col, val, x);
}

// rowptr non-decreasing within [0, nnz], every col in [0, n_cols): one pass over the indices,
// so a malformed CSR is an error rather than an out-of-bounds read.
void check_csr(const char* op, const int64_t* rowptr, const int64_t* col, int64_t n_rows,
               int64_t nnz, int64_t n_cols) {
  TORCH_CHECK(rowptr[0] >= 0 && rowptr[n_rows] <= nnz, op, ": rowptr must lie in [0, ", nnz,
              "] (the length of col), got rowptr[0] = ", rowptr[0], ", rowptr[-1] = ",
              rowptr[n_rows]);
  std::atomic<bool> bad_rowptr{false}, bad_col{false};
  at::parallel_for(0, n_rows, 1 << 14, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (rowptr[r + 1] < rowptr[r] || rowptr[r + 1] > nnz) { bad_rowptr = true; return; }
    }
    const int64_t k0 = rowptr[r0], k1 = rowptr[r1];
    bool bad = false;
    for (int64_t k = k0; k < k1; ++k) bad |= (col[k] < 0) | (col[k] >= n_cols);
    if (bad) bad_col = true;
  });
  TORCH_CHECK(!bad_rowptr, op, ": rowptr must be non-decreasing and at most ", nnz);
  TORCH_CHECK(!bad_col, op, ": col holds an index outside [0, ", n_cols, ") (x has ", n_cols,
              " rows)");
}

at::Tensor csr_spmm_cpu(const at::Tensor& rowptr_, const at::Tensor& col_,
                        const at::Tensor& val_, const at::Tensor& x_) {
  check_inputs("csr_spmm", rowptr_, col_, val_, x_);
  const at::Tensor rowptr = rowptr_.contiguous(), col = col_.contiguous();
  const at::Tensor val = val_.contiguous(), x = x_.contiguous();
  const int64_t n_rows = rowptr.numel() - 1, d = x.size(1);
  check_csr("csr_spmm", rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), n_rows,
            col.numel(), x.size(0));
  at::Tensor out = at::empty({n_rows, d}, x.options());
  if (n_rows == 0 || d == 0) return out;
  const auto bounds = row_chunks(rowptr.data_ptr<int64_t>(), n_rows, d);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_spmm", [&] {
    Layer<scalar_t> L{rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                      val.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), nullptr,
                      out.data_ptr<scalar_t>(), nullptr, d};
    run_layer(L, bounds);
  });
  return out;
}

at::Tensor csr_propagate_cpu(const at::Tensor& rowptr_, const at::Tensor& col_,
                             const at::Tensor& val_, const at::Tensor& x_, int64_t layers) {
  check_inputs("csr_propagate", rowptr_, col_, val_, x_);
  TORCH_CHECK(layers >= 0, "csr_propagate: layers must be >= 0, got ", layers);
  const int64_t n_rows = rowptr_.numel() - 1;
  TORCH_CHECK(n_rows == x_.size(0), "csr_propagate: A must be square with one row per row of x: "
              "rowptr describes ", n_rows, " rows, x has ", x_.size(0));
  const at::Tensor rowptr = rowptr_.contiguous(), col = col_.contiguous();
  const at::Tensor val = val_.contiguous(), x = x_.contiguous();
  const int64_t d = x.size(1);
  check_csr("csr_propagate", rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), n_rows,
            col.numel(), n_rows);
  if (layers == 0 || n_rows == 0 || d == 0) return x.clone(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({n_rows, d}, x.options());
  // Ping-pong buffers for A^l x, l = 1 .. layers-1 (the last layer only adds into out).
  at::Tensor buf0, buf1;
  if (layers > 1) buf0 = at::empty({n_rows, d}, x.options());
  if (layers > 2) buf1 = at::empty({n_rows, d}, x.options());
  const auto bounds = row_chunks(rowptr.data_ptr<int64_t>(), n_rows, d);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_propagate", [&] {
    const scalar_t* cur = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t l = 1; l <= layers; ++l) {
      scalar_t* next = nullptr;
      if (l < layers) next = ((l % 2) ? buf0 : buf1).data_ptr<scalar_t>();
      Layer<scalar_t> L{rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                        val.data_ptr<scalar_t>(), cur, next, o,
                        l == 1 ? x.data_ptr<scalar_t>() : o, d};
      run_layer(L, bounds);
      cur = next;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkg_fast, CPU, m) {
  m.impl("csr_spmm", &csr_spmm_cpu);
  m.impl("csr_propagate", &csr_propagate_cpu);
}

}  // namespace diffkg_fast
