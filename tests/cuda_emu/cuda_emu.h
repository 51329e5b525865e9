// A CPU emulator of the CUDA subset used by csrc/cuda/spmm_kernels.cuh, so that the kernels
// themselves (not a Python model of them) run and are checked on a machine without a GPU.
//
// Include this header before the kernels; it defines DIFFKG_FAST_CUDA_EMU, which makes
// launch_kernel() call emu::launch() instead of <<<...>>>.
//
// Model: a launch runs its blocks one after another and, inside a block, its warps one after
// another (the kernels emulated here share nothing between warps but global atomics, so any
// warp order is a legal schedule; emu::set_order() picks forward, reverse or a seeded shuffle,
// which the tests use to show that results do not depend on it). The 32 lanes of a warp are
// fibers on one OS thread (a 20-instruction stack switch on x86-64, ucontext elsewhere: glibc's
// swapcontext makes a signal-mask syscall per switch, ~50x slower), run in lockstep rounds: __shfl_sync is an exchange in two
// rounds (every lane writes its value, then every lane reads its source lane's). Checked, and
// counted in emu::errors(): a __shfl_sync whose mask is not full, one reached while a lane of
// the warp has already returned, lanes of a warp in different __shfl_sync calls (divergence),
// a launch with an invalid grid or block. Memory errors are left to AddressSanitizer, which
// knows about the fiber switches (the __sanitizer_*_switch_fiber annotations below).
// Not modelled: shared memory, __syncthreads, warp-level memory ordering, timing.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#define DIFFKG_FAST_CUDA_EMU 1

#if defined(__x86_64__) && !defined(DIFFKG_EMU_UCONTEXT)
#define DIFFKG_EMU_FAST_SWITCH 1
// emu_switch(save, to): pushes the callee-saved registers (System V: rbx, rbp, r12-r15) and the
// SSE / x87 control words on the current stack, stores the stack pointer in *save, loads `to`
// and pops the same from there. A fresh fiber's stack is laid out as if it had switched away
// at its entry function (see Fiber::start).
extern "C" void emu_switch(void** save, void* to);
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

#if defined(__SANITIZE_ADDRESS__)
#define DIFFKG_EMU_ASAN 1
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     size_t* size_old);
}
#endif

using cudaStream_t = void*;
struct EmuDim3 {
  unsigned x = 0, y = 1, z = 1;
};
// One OS thread runs every lane: plain globals, set by the scheduler before it resumes a lane.
inline EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
using std::fma;

inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;  // one OS thread: nothing runs between the two lines
  *p = old + v;
  return old;
}

namespace emu {

constexpr int kLanes = 32;
constexpr size_t kStack = 256 * 1024;  // per lane; AddressSanitizer's frames are large

enum class Order { forward, reverse, shuffled };

struct State {
  long errors = 0;
  long launches = 0;
  long shuffles = 0;
  Order order = Order::forward;
  unsigned seed = 0;
};
inline State& state() {
  static State s;
  return s;
}
inline long errors() { return state().errors; }
inline long launches() { return state().launches; }
inline void set_order(Order o, unsigned seed = 0) {
  state().order = o;
  state().seed = seed;
}

inline void fail(const std::string& what) {
  if (state().errors++ < 20) std::fprintf(stderr, "cuda_emu: %s\n", what.c_str());
}

// A suspended fiber: its stack pointer (fast switch) or its ucontext.
struct Ctx {
#ifdef DIFFKG_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Suspends the running fiber into `from` and resumes `to`, whose stack is [bottom, +size)
// (AddressSanitizer is told; *fake keeps the leaving fiber's fake frames, nullptr: it ends).
inline void switch_fiber(Ctx& from, Ctx& to, void** fake, const void* bottom, size_t size) {
#ifdef DIFFKG_EMU_ASAN
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
#ifdef DIFFKG_EMU_FAST_SWITCH
  emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
#ifdef DIFFKG_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake ? *fake : nullptr, nullptr, nullptr);
#endif
}

struct Lane {
  Ctx ctx;
  bool done = false;
  long step = 0;  // 2 per __shfl_sync: the lockstep position of the lane
  void* fake_stack = nullptr;  // AddressSanitizer's fake frames of the suspended lane
};

struct Warp {
  Ctx sched;
  Lane lanes[kLanes];
  // Allocated once (a launch that built its own 8 MB spent most of its time in mmap / munmap).
  std::unique_ptr<char[]> stacks{new char[kLanes * kStack]};
  alignas(16) unsigned char slot[kLanes][16];
  int cur = 0;
  const std::function<void()>* body = nullptr;
  const void* sched_bottom = nullptr;  // the scheduler's stack (ASan: learnt on a lane's
  size_t sched_size = 0;               // first entry)
};

inline Warp*& current() {
  static Warp* w = nullptr;
  return w;
}

// Lane -> scheduler (at a __shfl_sync round); returns when the scheduler resumes the lane.
inline void yield() {
  Warp& w = *current();
  Lane& lane = w.lanes[w.cur];
  switch_fiber(lane.ctx, w.sched, &lane.fake_stack, w.sched_bottom, w.sched_size);
}

inline void trampoline() {
  Warp& w = *current();
#ifdef DIFFKG_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w.sched_bottom, &w.sched_size);
#endif
  (*w.body)();
  w.lanes[w.cur].done = true;
#ifdef DIFFKG_EMU_FAST_SWITCH
  // Never resumed: the warp's fibers are rebuilt for the next warp.
  switch_fiber(w.lanes[w.cur].ctx, w.sched, nullptr, w.sched_bottom, w.sched_size);
  __builtin_trap();
#elif defined(DIFFKG_EMU_ASAN)
  __sanitizer_start_switch_fiber(nullptr, w.sched_bottom, w.sched_size);  // this fiber ends
#endif
  // (ucontext) returning resumes uc_link: the scheduler
}

// Runs one warp (lanes threadIdx.x = first .. first + 31) to completion in lockstep rounds.
inline void run_warp(Warp& w, unsigned first) {
  for (int l = 0; l < kLanes; ++l) {
    Lane& lane = w.lanes[l];
    lane.done = false;
    lane.step = 0;
#ifdef DIFFKG_EMU_FAST_SWITCH
    // The stack as emu_switch leaves it: control words (MXCSR default 0x1f80, x87 0x037f),
    // six zeroed callee-saved registers, then the "return address" trampoline. The slot above
    // stays free so that trampoline starts with rsp = 8 (mod 16), as after a call.
    char* top = w.stacks.get() + (l + 1) * kStack;
    top -= reinterpret_cast<uintptr_t>(top) % 16;
    auto* sp = reinterpret_cast<uint64_t*>(top) - 9;
    const uint32_t mxcsr = 0x1f80, fpcw = 0x037f;
    std::memcpy(sp, &mxcsr, 4);
    std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, 4);
    for (int i = 1; i <= 6; ++i) sp[i] = 0;
    sp[7] = reinterpret_cast<uint64_t>(&trampoline);
    sp[8] = 0;
    lane.ctx.sp = sp;
#else
    getcontext(&lane.ctx.uc);
    lane.ctx.uc.uc_stack.ss_sp = w.stacks.get() + l * kStack;
    lane.ctx.uc.uc_stack.ss_size = kStack;
    lane.ctx.uc.uc_link = &w.sched.uc;
    makecontext(&lane.ctx.uc, trampoline, 0);
#endif
  }
  for (;;) {
    bool any = false;
    for (int l = 0; l < kLanes; ++l) {
      Lane& lane = w.lanes[l];
      if (lane.done) continue;
      any = true;
      w.cur = l;
      threadIdx.x = first + l;
      void* fake = nullptr;
      switch_fiber(w.sched, lane.ctx, &fake, w.stacks.get() + l * kStack, kStack);
    }
    if (!any) return;
    // After a round every live lane waits in the same __shfl_sync, at the same step.
    long step = -1;
    int done = 0;
    for (const Lane& lane : w.lanes) {
      if (lane.done) {
        ++done;
      } else if (step < 0) {
        step = lane.step;
      } else if (lane.step != step) {
        fail("lanes of a warp in different __shfl_sync calls (divergent shuffle), block " +
             std::to_string(blockIdx.x) + " thread " + std::to_string(first));
        return;  // the other fibers are abandoned: the error is counted
      }
    }
    if (done > 0 && step >= 0) {
      fail("__shfl_sync with a full mask after " + std::to_string(done) +
           " lane(s) of the warp returned, block " + std::to_string(blockIdx.x) +
           " thread " + std::to_string(first));
      return;
    }
  }
}

template <typename F>
void launch(int64_t blocks, int threads, F body) {
  State& s = state();
  ++s.launches;
  if (blocks <= 0 || blocks > 0x7fffffffLL || threads <= 0 || threads > 1024 ||
      threads % kLanes != 0) {
    fail("invalid launch: grid " + std::to_string(blocks) + ", block " +
         std::to_string(threads));
    return;
  }
  const std::function<void()> fn = body;
  static Warp w;  // one OS thread runs every launch: one set of lane stacks
  w.body = &fn;
  current() = &w;
  gridDim.x = static_cast<unsigned>(blocks);
  blockDim.x = static_cast<unsigned>(threads);
  const int64_t per_block = threads / kLanes;
  std::vector<int64_t> order(static_cast<size_t>(blocks * per_block));
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  if (s.order == Order::reverse) std::reverse(order.begin(), order.end());
  if (s.order == Order::shuffled) {
    std::mt19937 rng(s.seed + static_cast<unsigned>(s.launches));
    std::shuffle(order.begin(), order.end(), rng);
  }
  for (const int64_t g : order) {
    blockIdx.x = static_cast<unsigned>(g / per_block);
    run_warp(w, static_cast<unsigned>((g % per_block) * kLanes));
  }
  current() = nullptr;
}

}  // namespace emu

template <typename V>
V __shfl_sync(unsigned mask, V v, int src) {
  static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= 16, "shuffle of a register");
  emu::Warp& w = *emu::current();
  const int lane = w.cur;
  if (mask != 0xffffffffu) emu::fail("__shfl_sync with a partial mask (not emulated)");
  std::memcpy(w.slot[lane], &v, sizeof(V));
  ++w.lanes[lane].step;
  emu::yield();  // round 1: every lane has written
  V out;
  std::memcpy(&out, w.slot[src & (emu::kLanes - 1)], sizeof(V));  // srcLane mod warp size
  ++w.lanes[lane].step;
  emu::yield();  // round 2: every lane has read
  return out;
}
