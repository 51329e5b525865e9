// CUDA-key implementations of diffkg_fast::csr_spmm and diffkg_fast::csr_propagate (schemas in
// csrc/spmm.cpp). The kernels are in spmm_kernels.cuh (no torch headers there).
//
// Headers: c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h. The stream function is the
// same (at::cuda::getCurrentCUDAStream is c10::cuda::getCurrentCUDAStream re-exported), but
// CUDAContext.h pulls in cuBLAS / cuSPARSE / cuSOLVER headers this file does not need, and that
// the CPU CI machine's CUDA toolkit lacks: without them tests/test_spmm_cuda_compile.py can
// compile this file with nvcc against the CPU torch wheel's headers.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../spmm_checks.h"
#include "spmm_kernels.cuh"

namespace diffkg_fast {
namespace {

void check_csr(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& val,
               const at::Tensor& x, const char* op) {
  TORCH_CHECK(rowptr.is_cuda(), op, ": rowptr must be a CUDA tensor, got ", rowptr.device());
  TORCH_CHECK(col.device() == rowptr.device(), op, ": col must be on ", rowptr.device(),
              " like rowptr, got ", col.device());
  TORCH_CHECK(val.device() == rowptr.device(), op, ": val must be on ", rowptr.device(),
              " like rowptr, got ", val.device());
  TORCH_CHECK(x.device() == rowptr.device(), op, ": x must be on ", rowptr.device(),
              " like rowptr, got ", x.device());
  check_spmm_args(op, rowptr, col, val, x);  // shared with the CPU kernel
  // One block per 8 rows: the grid's x-dimension limit is 2^31 - 1 blocks.
  const int64_t n_rows = rowptr.numel() - 1;
  TORCH_CHECK(n_rows / cuda::kWarpsPerBlock < std::numeric_limits<int32_t>::max(), op,
              ": too many rows for one launch: ", n_rows);
  // Not checked here (each would cost a device-to-host sync per call): rowptr non-decreasing
  // within [0, nnz] and 0 <= col < x.size(0), which the CPU kernel checks. On CUDA they are the
  // caller's contract (diffkg_fast.ops.spmm builds the CSR from a torch sparse tensor).
}

template <typename T>
void launch(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& val,
            const at::Tensor& x, T* y, const T* acc_in, T* acc_out, cudaStream_t stream) {
  cuda::launch_csr_spmm<T>(rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                           val.data_ptr<T>(), x.data_ptr<T>(), y, acc_in, acc_out,
                           rowptr.numel() - 1, x.size(1), col.numel(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor csr_spmm_cuda(const at::Tensor& rowptr_in, const at::Tensor& col_in,
                         const at::Tensor& val_in, const at::Tensor& x_in) {
  check_csr(rowptr_in, col_in, val_in, x_in, "csr_spmm");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor rowptr = rowptr_in.contiguous();
  const at::Tensor col = col_in.contiguous();
  const at::Tensor val = val_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const int64_t n_rows = rowptr.numel() - 1;
  at::Tensor out = at::empty({n_rows, x.size(1)}, x.options());
  if (n_rows == 0 || x.size(1) == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_spmm_cuda", [&] {
    launch<scalar_t>(rowptr, col, val, x, out.data_ptr<scalar_t>(), nullptr, nullptr, stream);
  });
  return out;
}

// out = sum_{l=0..layers} A^l x. Layer l reads the previous product (x for l = 1) and, in the
// kernel's epilogue, adds its product into `out` (out = x + A x at l = 1, so no copy of x). The
// product itself is stored only when a later layer reads it, in two ping-pong buffers: the
// temporaries are min(layers - 1, 2) buffers of x's size.
at::Tensor csr_propagate_cuda(const at::Tensor& rowptr_in, const at::Tensor& col_in,
                              const at::Tensor& val_in, const at::Tensor& x_in, int64_t layers) {
  check_csr(rowptr_in, col_in, val_in, x_in, "csr_propagate");
  TORCH_CHECK(layers >= 0, "csr_propagate: layers must be >= 0, got ", layers);
  TORCH_CHECK(rowptr_in.numel() - 1 == x_in.size(0),
              "csr_propagate: A must be square with one row per row of x: rowptr describes ",
              rowptr_in.numel() - 1, " rows, x has ", x_in.size(0));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor rowptr = rowptr_in.contiguous();
  const at::Tensor col = col_in.contiguous();
  const at::Tensor val = val_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (layers == 0 || x.numel() == 0) {
    out.copy_(x);
    return out;
  }
  at::Tensor bufs[2];
  for (int i = 0; i < 2 && i < layers - 1; ++i)
    bufs[i] = at::empty_like(x, at::MemoryFormat::Contiguous);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_propagate_cuda", [&] {
    const scalar_t* cur = x.data_ptr<scalar_t>();
    scalar_t* acc = out.data_ptr<scalar_t>();
    for (int64_t l = 1; l <= layers; ++l) {
      scalar_t* next = l == layers ? nullptr : bufs[(l - 1) % 2].data_ptr<scalar_t>();
      const scalar_t* acc_in = l == 1 ? x.data_ptr<scalar_t>() : acc;
      // cur is a separate tensor from next (ping-pong), acc_in == acc is the in-place sum.
      cuda::launch_csr_spmm<scalar_t>(rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                                      val.data_ptr<scalar_t>(), cur, next, acc_in, acc,
                                      rowptr.numel() - 1, x.size(1), col.numel(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cur = next;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkg_fast, CUDA, m) {
  m.impl("csr_spmm", &csr_spmm_cuda);
  m.impl("csr_propagate", &csr_propagate_cuda);
}

}  // namespace diffkg_fast
