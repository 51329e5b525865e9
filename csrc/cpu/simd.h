// CPU helpers shared by the kernels of spmm_cpu.cpp and attention_cpu.cpp: the x86-64-v3 clone
// attribute, software prefetch of a gathered row, and explicit 32-byte vectors (dot products).
#pragma once

#include <cstdint>

namespace diffkg_fast {
namespace {

// "arch=x86-64-v3" (AVX2 + FMA), dispatched on CPU features; "arch=haswell" is dispatched on the
// CPU *model* (__builtin_cpu_is) and so never picked on AMD CPUs. GCC < 12: AVX2 without FMA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#if __GNUC__ >= 12
#define DIFFKG_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DIFFKG_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#else
#define DIFFKG_TARGET_CLONES
#endif
#define DIFFKG_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__)
// The 32-byte vector helpers below are always inlined: no AVX value crosses a call boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

template <typename T>
DIFFKG_INLINE void prefetch_row(const T* p, int64_t d) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 3);
}

// 32-byte vectors (GCC / Clang vector extensions): one AVX2 register in the x86-64-v3 clone, two
// SSE registers in the baseline one. Explicit vectors rather than auto-vectorized reductions:
// without -ffast-math GCC turns a dot product's partial-sum array into shuffles and spills.
template <typename T> struct Simd;
template <> struct Simd<float> { typedef float V __attribute__((vector_size(32))); };
template <> struct Simd<double> { typedef double V __attribute__((vector_size(32))); };

template <typename T>
DIFFKG_INLINE typename Simd<T>::V vload(const T* p) {  // unaligned load
  typename Simd<T>::V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
DIFFKG_INLINE T hsum(typename Simd<T>::V v) {
  constexpr int W = 32 / sizeof(T);
  T t[W];
  __builtin_memcpy(t, &v, sizeof(v));
  for (int w = W / 2; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) t[k] += t[k + w];
  return t[0];
}

// <a, b>: two vector accumulators (2W = 16 floats / 8 doubles per step), then a fixed-order tree
// and the scalar tail.
template <typename T>
DIFFKG_INLINE T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t d) {
  constexpr int W = 32 / sizeof(T);
  typename Simd<T>::V s0 = {}, s1 = {};
  int64_t j = 0;
  for (; j + 2 * W <= d; j += 2 * W) {
    s0 += vload(a + j) * vload(b + j);
    s1 += vload(a + j + W) * vload(b + j + W);
  }
  T r = hsum<T>(s0 + s1);
  for (; j < d; ++j) r += a[j] * b[j];
  return r;
}

// <x, p> and <x, g> in one sweep over x; <x, p> is bitwise dot(x, p) (same operations in the same
// order), so the backward recomputes exactly the forward's logits.
template <typename T>
DIFFKG_INLINE void dot2(const T* __restrict__ x, const T* __restrict__ p, const T* __restrict__ g,
                        int64_t d, T& xp, T& xg) {
  constexpr int W = 32 / sizeof(T);
  typename Simd<T>::V s0 = {}, s1 = {}, t0 = {}, t1 = {};
  int64_t j = 0;
  for (; j + 2 * W <= d; j += 2 * W) {
    const auto x0 = vload(x + j), x1 = vload(x + j + W);
    s0 += x0 * vload(p + j);
    s1 += x1 * vload(p + j + W);
    t0 += x0 * vload(g + j);
    t1 += x1 * vload(g + j + W);
  }
  xp = hsum<T>(s0 + s1);
  xg = hsum<T>(t0 + t1);
  for (; j < d; ++j) { xp += x[j] * p[j]; xg += x[j] * g[j]; }
}

}  // namespace
}  // namespace diffkg_fast
