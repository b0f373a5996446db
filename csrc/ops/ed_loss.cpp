// Schemas of the Ex-Model Distillation loss (ExML paper, Eq. 6-10). Kernels
// live in cpu/ed_loss_kernel.cpp and cuda/ed_loss_kernel.cu; the Python
// wrapper exml_fast.ops.ed_loss documents the semantics and builds
// `class_table` (see csrc/include/exml_fast/ed_loss_common.h for its layout).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // logits (B, C) float; labels (B,) int64; expert_logits (B, |Y^i|) or (B, C);
  // prev_logits (B, |Y^prev|) or (B, C) or None; class_table int32 (2 + 7C,);
  // task_ids (B,) int64 and task_heads (T, C) bool, both or neither;
  // target_mode "slice" | "per_sample"; normalize "none" | "center" | "standardize".
  // Returns the loss (0-dim, fp32; fp64 for fp64 logits) and, when need_grad, the
  // gradient of the loss w.r.t. logits ((B, C), logits' dtype; else a (0,) tensor).
  m.def(
      "ed_loss(Tensor logits, Tensor labels, Tensor expert_logits, Tensor? prev_logits, "
      "Tensor class_table, Tensor? task_ids, Tensor? task_heads, str target_mode, "
      "str normalize, float lambda_ce, bool need_grad) -> (Tensor loss, Tensor grad_logits)");
  // grad_logits * grad (grad: the upstream 0-dim gradient of the loss).
  m.def("_ed_loss_backward(Tensor grad, Tensor grad_logits) -> Tensor");
}
