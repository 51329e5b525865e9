// CPU kernels of diffkg_fast::rgat_forward and diffkg_fast::rgat_backward (schemas and math in
// ../attention.cpp). Float32 accumulates in float, float64 in double.
//
// Forward: one pass over head rows, split into chunks of equal cost (nnz + 1 per row) run by
// at::parallel_for. Per row: the logits into a per-thread buffer (one sweep over each gathered
// E[col] row), the max-shifted softmax, then the weighted sum of the same rows (still in L1/L2),
// four edges per sweep over d. Gathered rows are prefetched kPrefetch edges ahead in the chunk's
// edge order, across row boundaries (the KG's mean degree is ~6).
//
// Backward, two passes, no (nnz x d) temporary:
//   1. over head rows: G[h] into an (n, d) buffer; s, a recomputed from lse; ds_e; dE[h] = G[h] +
//      sum ds_e P1[rel_e]; dP1 / dP2 into per-thread (R, d) buffers, summed in thread order at
//      the end; (head, rel, a_e, ds_e) of each edge into an nnz-long record array;
//   2. over tails through the transposed CSR (t_rowptr, t_edge): dE[t] += a_e G[head] +
//      ds_e P2[rel], one record per incoming edge (records and G rows prefetched ahead).
// Every output element is summed in a fixed order: results are deterministic for a fixed thread
// count (dP1 / dP2 depend on it through the per-thread partial sums).
//
// Loops over d are unit-stride with restrict pointers; dot products use explicit 32-byte vectors
// (simd.h).
// On x86-64 with GCC each row kernel is compiled twice (x86-64-v3 = AVX2 + FMA, and baseline)
// and picked at load time by CPU features (target_clones).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "row_chunks.h"
#include "simd.h"

namespace diffkg_fast {
namespace {

constexpr double kNegSlope = 0.2;
constexpr double kNormEps = 1e-12;
constexpr int64_t kPrefetch = 8;  // edges ahead

template <typename T>
DIFFKG_INLINE T leaky(T s) { return s > T(0) ? s : T(kNegSlope) * s; }

template <typename T>
struct Graph {
  const T *E, *P1, *P2;
  const int64_t *rowptr, *col, *rel;
  const T* mask;  // (n, d) or nullptr
  int64_t d;
  bool normalize;
};

// What pass 1 of the backward leaves per edge for pass 2 (in edge order, read through t_edge).
template <typename T>
struct EdgeRec {
  int64_t head, rel;
  T a, ds;
};

template <typename T>
struct Fwd {
  Graph<T> g;
  T *y, *lse, *norm;
};

template <typename T>
DIFFKG_INLINE void forward_impl(const Fwd<T>& F, int64_t r0, int64_t r1, T* __restrict__ zb,
                                T* __restrict__ acc) {
  const Graph<T>& g = F.g;
  const int64_t d = g.d;
  const int64_t kend = g.rowptr[r1];
  for (int64_t h = r0; h < r1; ++h) {
    const int64_t k0 = g.rowptr[h], k1 = g.rowptr[h + 1];
    const T* __restrict__ xh = g.E + h * d;
    for (int64_t j = 0; j < d; ++j) acc[j] = xh[j];
    if (k0 == k1) {
      F.lse[h] = -std::numeric_limits<T>::infinity();
    } else {
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t k = k0; k < k1; ++k) {
        if (k + kPrefetch < kend) prefetch_row(g.E + g.col[k + kPrefetch] * d, d);
        const int64_t r = g.rel[k];
        const T s = dot(xh, g.P1 + r * d, d) + dot(g.E + g.col[k] * d, g.P2 + r * d, d);
        const T z = leaky(s);
        zb[k - k0] = z;
        m = std::max(m, z);
      }
      T sum = T(0);
      for (int64_t i = 0; i < k1 - k0; ++i) sum += (zb[i] = std::exp(zb[i] - m));
      F.lse[h] = m + std::log(sum);
      for (int64_t i = 0; i < k1 - k0; ++i) zb[i] /= sum;  // a_e
      int64_t k = k0;
      for (; k + 4 <= k1; k += 4) {
        const T a0 = zb[k - k0], a1 = zb[k + 1 - k0], a2 = zb[k + 2 - k0], a3 = zb[k + 3 - k0];
        const T* __restrict__ x0 = g.E + g.col[k] * d;
        const T* __restrict__ x1 = g.E + g.col[k + 1] * d;
        const T* __restrict__ x2 = g.E + g.col[k + 2] * d;
        const T* __restrict__ x3 = g.E + g.col[k + 3] * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += (a0 * x0[j] + a1 * x1[j]) + (a2 * x2[j] + a3 * x3[j]);
      }
      for (; k < k1; ++k) {
        const T a = zb[k - k0];
        const T* __restrict__ xr = g.E + g.col[k] * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += a * xr[j];
      }
    }
    if (g.mask != nullptr) {
      const T* __restrict__ mh = g.mask + h * d;
      for (int64_t j = 0; j < d; ++j) acc[j] *= mh[j];
    }
    const T nrm = std::sqrt(dot(acc, acc, d));
    F.norm[h] = nrm;
    T* __restrict__ yh = F.y + h * d;
    if (g.normalize) {
      const T den = std::max(nrm, T(kNormEps));
      for (int64_t j = 0; j < d; ++j) yh[j] = acc[j] / den;
    } else {
      for (int64_t j = 0; j < d; ++j) yh[j] = acc[j];
    }
  }
}

template <typename T>
struct Bwd {
  Graph<T> g;
  const T *gy, *y, *lse, *norm;
  const int64_t *t_rowptr, *t_edge;
  T* G;             // (n, d) gradient w.r.t. the aggregate
  T* dE;            // (n, d)
  T* dP;            // (threads, 2, R, d) per-thread partial dP1 | dP2
  EdgeRec<T>* rec;  // (nnz)
  int64_t R;
};

template <typename T>
DIFFKG_INLINE void backward1_impl(const Bwd<T>& B, int64_t r0, int64_t r1, T* __restrict__ sb,
                                  T* __restrict__ gb, T* __restrict__ dP1, T* __restrict__ dP2) {
  const Graph<T>& g = B.g;
  const int64_t d = g.d;
  const int64_t kend = g.rowptr[r1];
  for (int64_t h = r0; h < r1; ++h) {
    const T* __restrict__ gyh = B.gy + h * d;
    T* __restrict__ Gh = B.G + h * d;
    if (g.normalize) {
      const T nrm = B.norm[h];
      if (nrm > T(kNormEps)) {
        const T* __restrict__ yh = B.y + h * d;
        const T c = dot(yh, gyh, d);
        for (int64_t j = 0; j < d; ++j) Gh[j] = (gyh[j] - yh[j] * c) / nrm;
      } else {
        for (int64_t j = 0; j < d; ++j) Gh[j] = gyh[j] / T(kNormEps);
      }
    } else {
      for (int64_t j = 0; j < d; ++j) Gh[j] = gyh[j];
    }
    if (g.mask != nullptr) {
      const T* __restrict__ mh = g.mask + h * d;
      for (int64_t j = 0; j < d; ++j) Gh[j] *= mh[j];
    }
    T* __restrict__ dEh = B.dE + h * d;
    for (int64_t j = 0; j < d; ++j) dEh[j] = Gh[j];
    const int64_t k0 = g.rowptr[h], k1 = g.rowptr[h + 1];
    if (k0 == k1) continue;
    const T* __restrict__ xh = g.E + h * d;
    const T lse = B.lse[h];
    T D = T(0), S = T(0);
    for (int64_t k = k0; k < k1; ++k) {
      if (k + kPrefetch < kend) prefetch_row(g.E + g.col[k + kPrefetch] * d, d);
      const int64_t r = g.rel[k];
      T xp, xg;
      dot2(g.E + g.col[k] * d, g.P2 + r * d, static_cast<const T*>(Gh), d, xp, xg);
      const T s = dot(xh, g.P1 + r * d, d) + xp;
      const T a = std::exp(leaky(s) - lse);
      sb[k - k0] = s;
      gb[k - k0] = a;
      S += a;
      B.rec[k].ds = xg;  // g_e, turned into ds_e below
    }
    // sum_e a_e = 1 up to the rounding of lse (~ulp(lse), a common factor of the row); dividing
    // it out keeps ds_e = a_e (g_e - D_h) accurate where g_e - D_h cancels (a one-edge row
    // gets a = 1 and ds = 0 exactly).
    if (!(S > T(0))) S = T(1);
    for (int64_t k = k0; k < k1; ++k) {
      gb[k - k0] /= S;
      D += gb[k - k0] * B.rec[k].ds;
    }
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r = g.rel[k];
      const T a = gb[k - k0];
      const T ds = a * (B.rec[k].ds - D) * (sb[k - k0] > T(0) ? T(1) : T(kNegSlope));
      B.rec[k] = EdgeRec<T>{h, r, a, ds};
      const T* __restrict__ p1 = g.P1 + r * d;
      const T* __restrict__ xc = g.E + g.col[k] * d;
      T* __restrict__ q1 = dP1 + r * d;
      T* __restrict__ q2 = dP2 + r * d;
      for (int64_t j = 0; j < d; ++j) {
        dEh[j] += ds * p1[j];
        q1[j] += ds * xh[j];
        q2[j] += ds * xc[j];
      }
    }
  }
}

template <typename T>
DIFFKG_INLINE void backward2_impl(const Bwd<T>& B, int64_t t0, int64_t t1) {
  const int64_t d = B.g.d;
  const int64_t* __restrict__ te = B.t_edge;
  const int64_t kend = B.t_rowptr[t1];
  for (int64_t t = t0; t < t1; ++t) {
    T* __restrict__ dEt = B.dE + t * d;
    const int64_t k1 = B.t_rowptr[t + 1];
    for (int64_t k = B.t_rowptr[t]; k < k1; ++k) {
      if (k + 2 * kPrefetch < kend) __builtin_prefetch(B.rec + te[k + 2 * kPrefetch], 0, 3);
      if (k + kPrefetch < kend) prefetch_row(B.G + B.rec[te[k + kPrefetch]].head * d, d);
      const EdgeRec<T> e = B.rec[te[k]];
      const T* __restrict__ gh = B.G + e.head * d;
      const T* __restrict__ p2 = B.g.P2 + e.rel * d;
      for (int64_t j = 0; j < d; ++j) dEt[j] += e.a * gh[j] + e.ds * p2[j];
    }
  }
}

// Non-template entry points (target_clones applies to plain functions), overloaded by dtype.
#define DIFFKG_RGAT_ENTRY(T, S)                                                                 \
  DIFFKG_TARGET_CLONES void fwd_##S(const Fwd<T>& F, int64_t a, int64_t b, T* z, T* acc) {     \
    forward_impl<T>(F, a, b, z, acc);                                                           \
  }                                                                                             \
  DIFFKG_TARGET_CLONES void bwd1_##S(const Bwd<T>& B, int64_t a, int64_t b, T* s, T* g, T* p) { \
    backward1_impl<T>(B, a, b, s, g, p, p + B.R * B.g.d);                                       \
  }                                                                                             \
  DIFFKG_TARGET_CLONES void bwd2_##S(const Bwd<T>& B, int64_t a, int64_t b) {                  \
    backward2_impl<T>(B, a, b);                                                                 \
  }                                                                                             \
  inline void forward_rows(const Fwd<T>& F, int64_t a, int64_t b, T* z, T* acc) {              \
    fwd_##S(F, a, b, z, acc);                                                                   \
  }                                                                                             \
  inline void backward1_rows(const Bwd<T>& B, int64_t a, int64_t b, T* s, T* g, T* p) {        \
    bwd1_##S(B, a, b, s, g, p);                                                                 \
  }                                                                                             \
  inline void backward2_rows(const Bwd<T>& B, int64_t a, int64_t b) { bwd2_##S(B, a, b); }
DIFFKG_RGAT_ENTRY(float, f32)
DIFFKG_RGAT_ENTRY(double, f64)
#undef DIFFKG_RGAT_ENTRY

// Largest row length of rows [r0, r1).
int64_t max_degree(const int64_t* rowptr, int64_t r0, int64_t r1) {
  int64_t m = 0;
  for (int64_t r = r0; r < r1; ++r) m = std::max(m, rowptr[r + 1] - rowptr[r]);
  return m;
}

void check_index(const char* op, const char* name, const at::Tensor& t, int64_t numel,
                 const char* what) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.numel() == numel, op, ": ", name,
              " must be a 1-D int64 tensor of ", numel, " ", what, ", got ", t.scalar_type(),
              " of shape ", t.sizes());
}

void check_float(const char* op, const char* name, const at::Tensor& t, const at::Tensor& E,
                 at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == E.scalar_type(), op, ": ", name, " (", t.scalar_type(),
              ") must have the dtype of E (", E.scalar_type(), ")");
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

// rowptr: non-decreasing from 0 to nnz; idx (CSR order) in [0, hi); idx2 (if given) in [0, hi2).
// One parallel pass, so a malformed graph is an error rather than an out-of-bounds read.
void check_csr(const char* op, const char* rp_name, const int64_t* rowptr, int64_t n_rows,
               int64_t nnz, const char* name, const int64_t* idx, int64_t hi, const char* name2,
               const int64_t* idx2, int64_t hi2) {
  TORCH_CHECK(rowptr[0] == 0 && rowptr[n_rows] == nnz, op, ": ", rp_name,
              " must run from 0 to the number of edges (", nnz, "), got ", rp_name, "[0] = ",
              rowptr[0], ", ", rp_name, "[-1] = ", rowptr[n_rows]);
  std::atomic<bool> bad_rp{false}, bad1{false}, bad2{false};
  at::parallel_for(0, n_rows, 1 << 14, [&](int64_t r0, int64_t r1) {
    if (rowptr[r0] < 0) { bad_rp = true; return; }
    for (int64_t r = r0; r < r1; ++r) {
      if (rowptr[r + 1] < rowptr[r] || rowptr[r + 1] > nnz) { bad_rp = true; return; }
    }
    bool b1 = false, b2 = false;
    for (int64_t k = rowptr[r0]; k < rowptr[r1]; ++k) {
      b1 |= (idx[k] < 0) | (idx[k] >= hi);
      if (idx2 != nullptr) b2 |= (idx2[k] < 0) | (idx2[k] >= hi2);
    }
    if (b1) bad1 = true;
    if (b2) bad2 = true;
  });
  TORCH_CHECK(!bad_rp, op, ": ", rp_name, " must be non-decreasing");
  TORCH_CHECK(!bad1, op, ": ", name, " holds an index outside [0, ", hi, ")");
  TORCH_CHECK(!bad2, op, ": ", name2, " holds an index outside [0, ", hi2, ")");
}

// Shapes, dtypes and devices shared by both ops; returns nnz.
int64_t check_args(const char* op, const at::Tensor& E, const at::Tensor& P1, const at::Tensor& P2,
                   const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& rel,
                   const at::Tensor& t_rowptr, const at::Tensor& t_edge, const at::Tensor& row,
                   const at::Tensor& r_rowptr, const at::Tensor& r_edge,
                   const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(E.device().is_cpu(), op, ": E must be a CPU tensor, got ", E.device());
  TORCH_CHECK(E.dim() == 2, op, ": E must be 2-D (n, d), got shape ", E.sizes());
  TORCH_CHECK(E.scalar_type() == at::kFloat || E.scalar_type() == at::kDouble, op,
              ": E must be float32 or float64, got ", E.scalar_type());
  const int64_t n = E.size(0), d = E.size(1);
  TORCH_CHECK(P1.dim() == 2 && P1.size(1) == d, op, ": P1 must be (R, ", d, "), got shape ",
              P1.sizes());
  const int64_t R = P1.size(0);
  check_float(op, "P1", P1, E, {R, d});
  check_float(op, "P2", P2, E, {R, d});
  check_index(op, "rowptr", rowptr, n + 1, "offsets (n + 1, n = E.size(0))");
  const int64_t nnz = rowptr.numel() > 0 ? rowptr.contiguous().data_ptr<int64_t>()[n] : 0;
  TORCH_CHECK(nnz >= 0, op, ": rowptr[-1] (the number of edges) must be >= 0, got ", nnz);
  check_index(op, "col", col, nnz, "tails (nnz = rowptr[-1])");
  check_index(op, "rel", rel, nnz, "relation ids (nnz = rowptr[-1])");
  check_index(op, "t_rowptr", t_rowptr, n + 1, "offsets (n + 1)");
  check_index(op, "t_edge", t_edge, nnz, "edge ids (nnz = rowptr[-1])");
  check_index(op, "row", row, nnz, "heads (nnz = rowptr[-1])");
  check_index(op, "r_rowptr", r_rowptr, R + 1, "offsets (R + 1, R = P1.size(0))");
  check_index(op, "r_edge", r_edge, nnz, "edge ids (nnz = rowptr[-1])");
  if (mask.has_value()) check_float(op, "mask", *mask, E, {n, d});
  return nnz;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rgat_forward_cpu(
    const at::Tensor& E_, const at::Tensor& P1_, const at::Tensor& P2_, const at::Tensor& rowptr_,
    const at::Tensor& col_, const at::Tensor& rel_, const at::Tensor& t_rowptr,
    const at::Tensor& t_edge, const at::Tensor& row, const at::Tensor& r_rowptr,
    const at::Tensor& r_edge, const c10::optional<at::Tensor>& mask_, bool normalize) {
  const char* op = "rgat_forward";
  const int64_t nnz = check_args(op, E_, P1_, P2_, rowptr_, col_, rel_, t_rowptr, t_edge, row,
                                 r_rowptr, r_edge, mask_);
  const at::Tensor E = E_.contiguous(), P1 = P1_.contiguous(), P2 = P2_.contiguous();
  const at::Tensor rowptr = rowptr_.contiguous(), col = col_.contiguous(), rel = rel_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const int64_t n = E.size(0), d = E.size(1), R = P1.size(0);
  check_csr(op, "rowptr", rowptr.data_ptr<int64_t>(), n, nnz, "col", col.data_ptr<int64_t>(), n,
            "rel", rel.data_ptr<int64_t>(), R);
  at::Tensor y = at::empty({n, d}, E.options());
  at::Tensor lse = at::empty({n}, E.options());
  at::Tensor norm = at::empty({n}, E.options());
  if (n == 0) return {y, lse, norm};
  const auto bounds = row_chunks(rowptr.data_ptr<int64_t>(), n, d);
  AT_DISPATCH_FLOATING_TYPES(E.scalar_type(), "rgat_forward", [&] {
    using T = scalar_t;
    const Fwd<T> F{{E.data_ptr<T>(), P1.data_ptr<T>(), P2.data_ptr<T>(),
                    rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), rel.data_ptr<int64_t>(),
                    mask.defined() ? mask.data_ptr<T>() : nullptr, d, normalize},
                   y.data_ptr<T>(), lse.data_ptr<T>(), norm.data_ptr<T>()};
    at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t c0, int64_t c1) {
      std::vector<T> zb(std::max<int64_t>(max_degree(F.g.rowptr, bounds[c0], bounds[c1]), 1));
      std::vector<T> acc(std::max<int64_t>(d, 1));
      for (int64_t c = c0; c < c1; ++c)
        forward_rows(F, bounds[c], bounds[c + 1], zb.data(), acc.data());
    });
  });
  return {y, lse, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rgat_backward_cpu(
    const at::Tensor& gy_, const at::Tensor& E_, const at::Tensor& P1_, const at::Tensor& P2_,
    const at::Tensor& rowptr_, const at::Tensor& col_, const at::Tensor& rel_,
    const at::Tensor& t_rowptr_, const at::Tensor& t_edge_, const at::Tensor& row,
    const at::Tensor& r_rowptr, const at::Tensor& r_edge, const at::Tensor& y_,
    const at::Tensor& lse_, const at::Tensor& norm_, const c10::optional<at::Tensor>& mask_,
    bool normalize) {
  const char* op = "rgat_backward";
  const int64_t nnz = check_args(op, E_, P1_, P2_, rowptr_, col_, rel_, t_rowptr_, t_edge_, row,
                                 r_rowptr, r_edge, mask_);
  const int64_t n = E_.size(0), d = E_.size(1), R = P1_.size(0);
  check_float(op, "grad_y", gy_, E_, {n, d});
  check_float(op, "y", y_, E_, {n, d});
  check_float(op, "lse", lse_, E_, {n});
  check_float(op, "norm", norm_, E_, {n});
  const at::Tensor E = E_.contiguous(), P1 = P1_.contiguous(), P2 = P2_.contiguous(),
                   rowptr = rowptr_.contiguous(), col = col_.contiguous(), rel = rel_.contiguous(),
                   t_rowptr = t_rowptr_.contiguous(), t_edge = t_edge_.contiguous(),
                   gy = gy_.contiguous(), y = y_.contiguous(), lse = lse_.contiguous(),
                   norm = norm_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  check_csr(op, "rowptr", rowptr.data_ptr<int64_t>(), n, nnz, "col", col.data_ptr<int64_t>(), n,
            "rel", rel.data_ptr<int64_t>(), R);
  check_csr(op, "t_rowptr", t_rowptr.data_ptr<int64_t>(), n, nnz, "t_edge",
            t_edge.data_ptr<int64_t>(), nnz, nullptr, nullptr, 0);
  at::Tensor dE = at::empty({n, d}, E.options());
  at::Tensor dP1 = at::empty({R, d}, E.options());
  at::Tensor dP2 = at::empty({R, d}, E.options());
  if (n == 0 || d == 0) return {dE.zero_(), dP1.zero_(), dP2.zero_()};
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  at::Tensor G = at::empty({n, d}, E.options());
  at::Tensor dP = at::zeros({threads, 2, R, d}, E.options());
  AT_DISPATCH_FLOATING_TYPES(E.scalar_type(), "rgat_backward", [&] {
    using T = scalar_t;
    // Uninitialised (pass 1 writes every record): no memset of nnz * 24 bytes.
    at::Tensor rec_buf = at::empty({nnz * static_cast<int64_t>(sizeof(EdgeRec<T>))},
                                   E.options().dtype(at::kByte));
    EdgeRec<T>* rec = reinterpret_cast<EdgeRec<T>*>(rec_buf.data_ptr());
    const Bwd<T> B{{E.data_ptr<T>(), P1.data_ptr<T>(), P2.data_ptr<T>(),
                    rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), rel.data_ptr<int64_t>(),
                    mask.defined() ? mask.data_ptr<T>() : nullptr, d, normalize},
                   gy.data_ptr<T>(), y.data_ptr<T>(), lse.data_ptr<T>(), norm.data_ptr<T>(),
                   t_rowptr.data_ptr<int64_t>(), t_edge.data_ptr<int64_t>(), G.data_ptr<T>(),
                   dE.data_ptr<T>(), dP.data_ptr<T>(), rec, R};
    const auto hb = row_chunks(B.g.rowptr, n, d);
    std::atomic<bool> bad_tid{false};
    at::parallel_for(0, static_cast<int64_t>(hb.size()) - 1, 1, [&](int64_t c0, int64_t c1) {
      const int64_t tid = at::get_thread_num();
      if (tid < 0 || tid >= threads) { bad_tid = true; return; }
      const int64_t md = std::max<int64_t>(max_degree(B.g.rowptr, hb[c0], hb[c1]), 1);
      std::vector<T> sb(md), gb(md);
      T* part = B.dP + tid * 2 * R * d;  // this thread's dP1 | dP2
      for (int64_t c = c0; c < c1; ++c)
        backward1_rows(B, hb[c], hb[c + 1], sb.data(), gb.data(), part);
    });
    TORCH_CHECK(!bad_tid, op, ": a worker thread id exceeded at::get_num_threads()");
    const auto tb = row_chunks(B.t_rowptr, n, d);
    at::parallel_for(0, static_cast<int64_t>(tb.size()) - 1, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) backward2_rows(B, tb[c], tb[c + 1]);
    });
    // dP1 | dP2 = sum over threads of the partial sums, in thread order.
    T *o1 = dP1.data_ptr<T>(), *o2 = dP2.data_ptr<T>();
    const T* part = B.dP;
    const int64_t RD = R * d;
    at::parallel_for(0, 2 * RD, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T s = part[i];
        for (int64_t t = 1; t < threads; ++t) s += part[t * 2 * RD + i];
        (i < RD ? o1[i] : o2[i - RD]) = s;
      }
    });
  });
  return {dE, dP1, dP2};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkg_fast, CPU, m) {
  m.impl("rgat_forward", &rgat_forward_cpu);
  m.impl("rgat_backward", &rgat_backward_cpu);
}

}  // namespace diffkg_fast
