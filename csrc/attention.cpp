// Op schemas of the fused relation-aware graph attention (RGAT) layer, added to the
// diffkg_fast namespace that spmm.cpp opens (TORCH_LIBRARY_FRAGMENT). Kernels: CPU in
// cpu/attention_cpu.cpp; the GPU kernels (Triton) and the autograd / fake registrations live in
// Python (diffkg_fast/ops/attention.py is the plain-PyTorch reference of the math).
//
// E (n, d) float32 / float64; P1, P2 (R, d) same dtype (P1 = Rel W[:d]^T, P2 = Rel W[d:]^T);
// the KG as a head-sorted CSR: rowptr (n+1), col (nnz) tail, rel (nnz) relation id, int64.
// Per head h, over its edges e = rowptr[h] .. rowptr[h+1]-1 (A = accumulation type = E's dtype):
//
//   s_e   = <E[h], P1[rel_e]> + <E[col_e], P2[rel_e]>
//   z_e   = LeakyReLU_0.2(s_e)
//   lse_h = log sum_e exp(z_e)            (max-shifted; -inf for a head without edges)
//   a_e   = exp(z_e - lse_h)
//   out_h = (E[h] + sum_e a_e E[col_e]) * mask[h]        (mask: optional (n, d) dropout factor)
//   nrm_h = ||out_h||_2                   (raw, not clamped)
//   y[h]  = out_h / max(nrm_h, 1e-12) if normalize else out_h
//
// rgat_forward returns (y (n, d), lse (n,), norm (n,)); lse and norm are saved for the backward
// (no per-edge state is saved: the backward recomputes s, z and a from lse).
//
// rgat_backward(grad_y, ..., y, lse, norm, mask, normalize) returns (dE, dP1, dP2):
//
//   go    = (gy - y <y, gy>) / nrm_h if nrm_h > 1e-12 else gy / 1e-12    (normalize), else gy
//   G[h]  = go * mask[h]                                   (gradient w.r.t. the aggregate)
//   g_e   = <G[h], E[col_e]>,  D_h = sum_e a_e g_e,  ds_e = a_e (g_e - D_h) * (s_e > 0 ? 1 : 0.2)
//   dE[h]      += G[h] + sum_e ds_e P1[rel_e]
//   dE[col_e]  += a_e G[h] + ds_e P2[rel_e]
//   dP1[rel_e] += ds_e E[h],   dP2[rel_e] += ds_e E[col_e]
//
// Auxiliary graph tensors, built once per graph by the caller: row (nnz) head of each edge;
// t_rowptr (n+1), t_edge (nnz) the transposed CSR (edge ids stably sorted by tail); r_rowptr
// (R+1), r_edge (nnz) edge ids grouped by relation. The forward uses none of them; each device
// kernel uses whichever it needs (the CPU backward: t_rowptr and t_edge).

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(diffkg_fast, m) {
  m.def(
      "rgat_forward(Tensor E, Tensor P1, Tensor P2, Tensor rowptr, Tensor col, Tensor rel, "
      "Tensor t_rowptr, Tensor t_edge, Tensor row, Tensor r_rowptr, Tensor r_edge, Tensor? mask, "
      "bool normalize) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rgat_backward(Tensor grad_y, Tensor E, Tensor P1, Tensor P2, Tensor rowptr, Tensor col, "
      "Tensor rel, Tensor t_rowptr, Tensor t_edge, Tensor row, Tensor r_rowptr, Tensor r_edge, "
      "Tensor y, Tensor lse, Tensor norm, Tensor? mask, bool normalize) -> (Tensor, Tensor, "
      "Tensor)");
}
