// Argument checks shared by the CPU and CUDA kernels of csr_spmm / csr_propagate: one wording,
// naming the argument, for both devices. Device placement is checked by each kernel itself.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace diffkg_fast {

inline void check_spmm_args(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
                            const at::Tensor& val, const at::Tensor& x) {
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && rowptr.dim() == 1 && rowptr.numel() >= 1,
              op, ": rowptr must be a 1-D int64 tensor of n_rows + 1 offsets, got ",
              rowptr.scalar_type(), " of shape ", rowptr.sizes());
  TORCH_CHECK(col.scalar_type() == at::kLong && col.dim() == 1, op,
              ": col must be a 1-D int64 tensor, got ", col.scalar_type(), " of shape ",
              col.sizes());
  TORCH_CHECK(val.dim() == 1 && val.numel() == col.numel(), op,
              ": val must be 1-D with one value per entry of col (", col.numel(), "), got shape ",
              val.sizes());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (n_cols, d), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(val.scalar_type() == x.scalar_type(), op, ": val (", val.scalar_type(),
              ") and x (", x.scalar_type(), ") must have the same dtype");
}

}  // namespace diffkg_fast
