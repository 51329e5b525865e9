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
  // One block per kRowWarps<T> (2 or 8) rows: the grid's x-dimension limit is 2^31 - 1 blocks.
  const int64_t n_rows = rowptr.numel() - 1;
  TORCH_CHECK(n_rows / cuda::kRowWarps<float> < std::numeric_limits<int32_t>::max(), op,
              ": too many rows for one launch: ", n_rows);
  // Not checked here (each would cost a device-to-host sync per call): rowptr non-decreasing
  // within [0, nnz] and 0 <= col < x.size(0), which the CPU kernel checks. On CUDA they are the
  // caller's contract (diffkg_fast.ops.spmm builds the CSR from a torch sparse tensor).
}

// Workspace of the long rows (spmm_kernels.cuh): one int64 buffer holding the chunk counter
// (zeroed here, a one-element fill) and the chunk list, and the partial products. Empty when no
// row can be long (nnz <= kLongRow). Its size is a bound known from nnz, so nothing here waits
// for the device.
struct Workspace {
  at::Tensor list, partial;
};

template <typename T>
cuda::LongRowWork<T> long_row_work(Workspace& ws, const at::Tensor& x, int64_t nnz) {
  cuda::LongRowWork<T> work;
  work.max_chunks = cuda::max_long_chunks(nnz);
  if (work.max_chunks == 0) return work;
  ws.list = at::empty({1 + 2 * work.max_chunks}, x.options().dtype(at::kLong));
  ws.list.narrow(0, 0, 1).zero_();
  ws.partial = at::empty({work.max_chunks, x.size(1)}, x.options());
  work.count = reinterpret_cast<unsigned long long*>(ws.list.data_ptr<int64_t>());
  work.chunks = ws.list.data_ptr<int64_t>() + 1;
  work.partial = ws.partial.data_ptr<T>();
  return work;
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
    Workspace ws;
    const auto work = long_row_work<scalar_t>(ws, x, col.numel());
    cuda::launch_csr_spmm<scalar_t>(rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                                    val.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                    out.data_ptr<scalar_t>(), n_rows, x.size(1), work, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// out = sum_{l=0..layers} A^l x (launch_csr_propagate: the running sum in the kernels'
// epilogue, the products in min(layers - 1, 2) ping-pong buffers of x's size).
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
    Workspace ws;
    const auto work = long_row_work<scalar_t>(ws, x, col.numel());
    scalar_t* buf0 = bufs[0].defined() ? bufs[0].data_ptr<scalar_t>() : nullptr;
    scalar_t* buf1 = bufs[1].defined() ? bufs[1].data_ptr<scalar_t>() : nullptr;
    cuda::launch_csr_propagate<scalar_t>(rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                                         val.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                         out.data_ptr<scalar_t>(), buf0, buf1, rowptr.numel() - 1,
                                         x.size(1), layers, work, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkg_fast, CUDA, m) {
  m.impl("csr_spmm", &csr_spmm_cuda);
  m.impl("csr_propagate", &csr_propagate_cuda);
}

}  // namespace diffkg_fast
