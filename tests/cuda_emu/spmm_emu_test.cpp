// Runs the CUDA SpMM kernels of csrc/cuda/spmm_kernels.cuh on the CPU warp emulator
// (cuda_emu.h) and checks them against a dense float64 product. Built and run by
// tests/test_spmm_cuda_emu.py (g++ -std=c++20, AddressSanitizer + UBSan), twice: with the
// shipped long-row constants (kLongRow 256, kChunk 128) and with small ones
// (-DDIFFKG_FAST_LONG_ROW=40 -DDIFFKG_FAST_CHUNK=16) that put many chunk boundaries in small
// graphs.
//
// Every case: csr_spmm (launch_csr_spmm) and csr_propagate (launch_csr_propagate, layers 0..3,
// the running sum in place) for float and double, at widths d that select every VEC / COLS
// variant, with x 16-byte aligned and misaligned by one element; outputs and workspace start as
// NaN (an unwritten element fails); the workspace is exactly max_long_chunks(nnz) chunks (ASan
// catches an overrun); each result is recomputed with the warps in reverse and in shuffled
// order and must be bitwise equal. Prints one line per configuration; exit code 1 on a failure.
#include "cuda_emu.h"
// (cuda_emu.h first: it turns the kernels' launches into emulator calls)
#include "spmm_kernels.cuh"

#include <cinttypes>
#include <limits>
#include <map>
#include <set>
#include <utility>

namespace k = diffkg_fast::cuda;

namespace {

long g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok && g_failures++ < 20) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

struct Csr {
  int64_t n_rows = 0, n_cols = 0;
  std::vector<int64_t> rowptr, col;
  std::vector<double> val;
  int64_t nnz() const { return static_cast<int64_t>(col.size()); }
};

// Rows of the given lengths, random columns (with repeats: duplicate entries are legal CSR
// here and must each count), values in [-1, 1] / sqrt(len) so that powers of A stay O(1).
Csr make_csr(const std::vector<int64_t>& lengths, int64_t n_cols, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> pick(0, n_cols - 1);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  Csr a;
  a.n_rows = static_cast<int64_t>(lengths.size());
  a.n_cols = n_cols;
  a.rowptr.push_back(0);
  for (int64_t len : lengths) {
    const double scale = 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(len, 1)));
    for (int64_t i = 0; i < len; ++i) {
      a.col.push_back(pick(rng));
      a.val.push_back(uni(rng) * scale);
    }
    a.rowptr.push_back(static_cast<int64_t>(a.col.size()));
  }
  return a;
}

std::vector<double> dense_product(const Csr& a, const std::vector<double>& x, int64_t d) {
  std::vector<double> y(static_cast<size_t>(a.n_rows * d), 0.0);
  for (int64_t r = 0; r < a.n_rows; ++r)
    for (int64_t q = a.rowptr[r]; q < a.rowptr[r + 1]; ++q)
      for (int64_t j = 0; j < d; ++j) y[r * d + j] += a.val[q] * x[a.col[q] * d + j];
  return y;
}

// A dense buffer of n scalars whose first element sits `shift` elements past a 16-byte
// boundary (0: aligned; 1: misaligned, the scalar path).
template <typename T>
struct Buf {
  std::vector<T> store;
  T* ptr;
  Buf(size_t n, int shift) : store(n + 16 / sizeof(T) + 1) {
    auto p = reinterpret_cast<uintptr_t>(store.data());
    const uintptr_t aligned = (p + 15) & ~uintptr_t{15};
    ptr = reinterpret_cast<T*>(aligned) + shift;
    std::fill(store.begin(), store.end(), std::numeric_limits<T>::quiet_NaN());
  }
};

template <typename T>
struct Work {
  std::vector<unsigned long long> count{0};
  std::vector<int64_t> chunks;
  std::vector<T> partial;
  k::LongRowWork<T> view;
  Work(int64_t nnz, int64_t d) {
    view.max_chunks = k::max_long_chunks(nnz);
    if (view.max_chunks == 0) return;  // no pointers: an access would be a null dereference
    chunks.assign(static_cast<size_t>(2 * view.max_chunks), -1);
    partial.assign(static_cast<size_t>(view.max_chunks * d), std::numeric_limits<T>::quiet_NaN());
    view.count = count.data();
    view.chunks = chunks.data();
    view.partial = partial.data();
  }
};

template <typename T>
bool close(T got, double want, double scale) {
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  return std::isfinite(static_cast<double>(got)) &&
         std::fabs(static_cast<double>(got) - want) <= tol * (scale + std::fabs(want));
}

std::set<std::pair<int, int>> g_variants[2];  // (VEC, COLS) seen, per dtype (0 float, 1 double)

template <typename T>
std::vector<T> run_spmm(const Csr& a, const std::vector<T>& val, const std::vector<T>& x,
                        int64_t d, int shift) {
  Buf<T> xb(x.size(), shift), yb(static_cast<size_t>(a.n_rows * d), shift);
  std::copy(x.begin(), x.end(), xb.ptr);
  Work<T> w(a.nnz(), d);
  k::launch_csr_spmm<T>(a.rowptr.data(), a.col.data(), val.data(), xb.ptr, yb.ptr, a.n_rows, d,
                        w.view, nullptr);
  return std::vector<T>(yb.ptr, yb.ptr + a.n_rows * d);
}

template <typename T>
std::vector<T> run_propagate(const Csr& a, const std::vector<T>& val, const std::vector<T>& x,
                             int64_t d, int64_t layers, int shift) {
  const size_t n = static_cast<size_t>(a.n_rows * d);
  Buf<T> xb(n, shift), out(n, shift), b0(n, shift), b1(n, shift);
  std::copy(x.begin(), x.end(), xb.ptr);
  Work<T> w(a.nnz(), d);
  if (layers == 0) {
    std::copy(x.begin(), x.end(), out.ptr);  // the binding copies; no launch
  } else {
    k::launch_csr_propagate<T>(a.rowptr.data(), a.col.data(), val.data(), xb.ptr, out.ptr,
                               layers >= 2 ? b0.ptr : nullptr, layers >= 3 ? b1.ptr : nullptr,
                               a.n_rows, d, layers, w.view, nullptr);
  }
  return std::vector<T>(out.ptr, out.ptr + n);
}

template <typename T>
void compare(const std::vector<T>& got, const std::vector<double>& want, const std::string& what) {
  double scale = 0;
  for (double v : want) scale = std::max(scale, std::fabs(v));
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < want.size(); ++i)
    if (!close(got[i], want[i], scale) && bad++ == 0) first = i;
  check(bad == 0, what + ": " + std::to_string(bad) + " of " + std::to_string(want.size()) +
                      " wrong, first at " + std::to_string(first) + " (got " +
                      std::to_string(static_cast<double>(got.empty() ? 0 : got[first])) +
                      ", want " + std::to_string(want.empty() ? 0 : want[first]) + ")");
}

template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <typename T>
void run_case(const std::string& name, const Csr& a, const std::vector<int64_t>& widths,
              bool square, unsigned seed) {
  constexpr int dt = std::is_same_v<T, float> ? 0 : 1;
  const char* tname = dt == 0 ? "float" : "double";
  std::vector<T> val(a.val.begin(), a.val.end());
  std::vector<double> vald(val.begin(), val.end());
  Csr ad = a;
  ad.val = vald;  // the reference multiplies the values the kernel sees
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  for (int64_t d : widths) {
    std::vector<T> x(static_cast<size_t>(a.n_cols * d));
    for (auto& v : x) v = static_cast<T>(normal(rng));
    const std::vector<double> xd(x.begin(), x.end());
    const std::vector<double> ref = dense_product(ad, xd, d);
    for (int shift : {0, 1}) {
      const std::string tag = name + " " + tname + " d=" + std::to_string(d) +
                              (shift ? " misaligned" : " aligned");
      {
        T* probe = reinterpret_cast<T*>(uintptr_t{64}) + shift;  // alignment of the buffers
        const void* ptrs[1] = {probe};
        const int vec = k::pick_vec<T>(d, ptrs, 1);
        g_variants[dt].insert({vec, k::pick_cols(d / vec)});
      }
      emu::set_order(emu::Order::forward);
      const auto y = run_spmm<T>(a, val, x, d, shift);
      compare(y, ref, "spmm " + tag);
      emu::set_order(emu::Order::reverse);
      check(bitwise_equal(y, run_spmm<T>(a, val, x, d, shift)),
            "spmm " + tag + ": reverse warp order changed the result");
      emu::set_order(emu::Order::shuffled, seed + static_cast<unsigned>(d));
      check(bitwise_equal(y, run_spmm<T>(a, val, x, d, shift)),
            "spmm " + tag + ": shuffled warp order changed the result");
      if (!square) continue;
      std::vector<double> total = xd, power = xd;
      for (int64_t layers = 0; layers <= 3; ++layers) {
        if (layers > 0) {
          power = dense_product(ad, power, d);
          for (size_t i = 0; i < total.size(); ++i) total[i] += power[i];
        }
        emu::set_order(emu::Order::forward);
        const auto out = run_propagate<T>(a, val, x, d, layers, shift);
        compare(out, total, "propagate layers=" + std::to_string(layers) + " " + tag);
        emu::set_order(emu::Order::shuffled, seed + 7 * static_cast<unsigned>(d));
        check(bitwise_equal(out, run_propagate<T>(a, val, x, d, layers, shift)),
              "propagate " + tag + ": shuffled warp order changed the result");
      }
    }
  }
}

}  // namespace

int main() {
  const int64_t L = k::kLongRow, C = k::kChunk;
  const bool small = L < 100;  // the small-constant build: more cases fit in the time
  std::printf("kLongRow %" PRId64 ", kChunk %" PRId64 "\n", L, C);

  // A square graph: empty rows, length 1, the longest short row (L), the shortest long row
  // (L + 1), whole numbers of chunks (C * m) and one more (C * m + 1), a row of 2.5 L, short
  // random rows around them, and long rows next to each other (the list's slot order then
  // depends on the warp order).
  std::vector<int64_t> lengths = {0, 1, L, L + 1, 0, 3, 2 * C, 2 * C + 1, L + 1, 5, (5 * L) / 2};
  if (small) {
    for (int m = 3; m <= 7; ++m) lengths.push_back(C * m + (m % 2));
  }
  std::mt19937_64 rng(11);
  while (lengths.size() < (small ? 120u : 72u)) lengths.push_back(static_cast<int64_t>(rng() % 9));
  lengths.push_back(L + 2);  // a long last row
  const int64_t n = static_cast<int64_t>(lengths.size());
  const Csr sq = make_csr(lengths, n, 3);
  // Widths selecting every variant: float VEC 4 (d % 4 == 0, d >= 128), VEC 2 (d % 2, >= 64),
  // VEC 1; COLS 1 / 2 / 4 by vectors per lane; 600 floats spans two tiles.
  const std::vector<int64_t> widths_f = small ? std::vector<int64_t>{1, 7, 64, 130, 128, 256,
                                                                     512, 600, 258, 200, 100}
                                              : std::vector<int64_t>{3, 64, 256};
  const std::vector<int64_t> widths_d = small ? std::vector<int64_t>{1, 64, 128, 256, 66, 130,
                                                                     260, 33}
                                              : std::vector<int64_t>{5, 128};
  run_case<float>("square", sq, widths_f, true, 21);
  run_case<double>("square", sq, widths_d, true, 22);

  // A rectangular graph (more columns than rows) and one with nnz <= kLongRow (no long-row
  // workspace, one launch per layer); both have an odd number of rows ending in a short one,
  // so the last block of the warp kernel is part empty (float: 2 rows a block, double: 8).
  run_case<float>("wide", make_csr({L + 3, 0, 2, L + 1, 1}, 3 * L, 5), {32}, false, 23);
  run_case<float>("tiny", make_csr({2, 0, 1, 4, 3}, 5, 6), {2, 64}, true, 24);
  run_case<double>("tiny", make_csr({2, 0, 1, 4, 3}, 5, 6), {2, 64}, true, 25);

  // The launches must cover every kernel variant in the small build (the shipped-constant
  // build runs fewer widths to keep its time down).
  std::set<std::pair<int, int>> want_f, want_d;
  for (int v : {1, 2, 4})
    for (int c : {1, 2, 4}) want_f.insert({v, c});
  for (int v : {1, 2})
    for (int c : {1, 2, 4}) want_d.insert({v, c});
  if (small) {
    check(g_variants[0] == want_f, "float variants not all exercised");
    check(g_variants[1] == want_d, "double variants not all exercised");
  }
  std::printf("variants: float %zu, double %zu; launches %ld; emulator errors %ld; failures %ld\n",
              g_variants[0].size(), g_variants[1].size(), emu::launches(), emu::errors(),
              g_failures);
  return g_failures == 0 && emu::errors() == 0 ? 0 : 1;
}
