// Host-side pieces shared by the CPU and CUDA kernels of exml_fast::ed_loss:
// the class-table layout, the mode enums and the argument checks (on top of
// checks.h).
//
// class_table (int32, length 2 + 7C), built once per class-set pair by
// exml_fast.ops.ed_loss.ed_class_table:
//   [0] ne = |Y^i|, [1] np = |Y^prev| (0 without a previous model), then 7 rows of C:
//   kind      0 none, 1 expert only, 2 prev only, 3 both
//   ecol_c    column of unit c in compact expert logits (a member's column for
//             non-members, so a weight-0 read stays finite)
//   pcol_c    same for compact prev logits
//   ecol_f    column of unit c in full-width expert logits (c for members)
//   pcol_f    same for full-width prev logits
//   eunits    the units of Y^i in compact-column order, padded to C
//   punits    the units of Y^prev in compact-column order, padded to C
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "exml_fast/checks.h"

namespace exml_fast {

enum class EdTarget : int { kSlice = 0, kPerSample = 1 };
enum class EdNorm : int { kNone = 0, kCenter = 1, kStandardize = 2 };

// Biased-variance floor of normalize="standardize": (z - mean) / sqrt(var + eps).
constexpr double kEdStandardizeEps = 1e-5;

// Pointers into the table, the columns picked for the logits' widths.
struct EdTable {
  int32_t ne = 0, np = 0;
  const int32_t* kind = nullptr;
  const int32_t* ecol = nullptr;    // per unit: column in expert_logits
  const int32_t* pcol = nullptr;    // per unit: column in prev_logits
  const int32_t* eunits = nullptr;  // block member j -> unit
  const int32_t* punits = nullptr;
  bool efull = false, pfull = false;  // teacher logits are (B, C) full width
  // First unit of a set whose units are consecutive ascending (lo, lo + 1, ...),
  // else -1: a full-width block is then read contiguously (set by the CPU host code).
  int32_t elo = -1, plo = -1;
};

// lo when units[0..n) == lo, lo + 1, ..., lo + n - 1; else -1.
inline int32_t consecutive_start(const int32_t* units, int32_t n) {
  for (int32_t j = 1; j < n; ++j) {
    if (units[j] != units[0] + j) return -1;
  }
  return n > 0 ? units[0] : -1;
}

// The one decoder of the table layout above, for the CPU and the CUDA kernels.
C10_HOST_DEVICE inline EdTable ed_table_view(const int32_t* t, int64_t c, bool efull, bool pfull) {
  EdTable v;
  v.ne = t[0];
  v.np = t[1];
  const int32_t* rows = t + 2;
  v.kind = rows;
  v.ecol = efull ? rows + 3 * c : rows + c;
  v.pcol = pfull ? rows + 4 * c : rows + 2 * c;
  v.eunits = rows + 5 * c;
  v.punits = rows + 6 * c;
  v.efull = efull;
  v.pfull = pfull;
  return v;
}

inline EdTarget parse_ed_target(const std::string& s) {
  if (s == "slice") return EdTarget::kSlice;
  TORCH_CHECK(s == "per_sample", "exml_fast::ed_loss: target_mode must be 'slice' or "
              "'per_sample'; got '", s, "'");
  return EdTarget::kPerSample;
}

inline EdNorm parse_ed_norm(const std::string& s) {
  if (s == "none") return EdNorm::kNone;
  if (s == "center") return EdNorm::kCenter;
  TORCH_CHECK(s == "standardize", "exml_fast::ed_loss: normalize must be 'none', 'center' or "
              "'standardize'; got '", s, "'");
  return EdNorm::kStandardize;
}

// Shape, dtype and device checks (values are checked by the kernels / wrapper).
inline void check_ed_args(const at::Tensor& logits, const at::Tensor& labels,
                          const at::Tensor& expert, const c10::optional<at::Tensor>& prev,
                          const at::Tensor& table, const c10::optional<at::Tensor>& task_ids,
                          const c10::optional<at::Tensor>& task_heads) {
  constexpr const char* op = "exml_fast::ed_loss";
  check_logits_matrix(logits, op, "logits", "(B, C)");
  const int64_t b = logits.size(0), c = logits.size(1);
  TORCH_CHECK(b > 0, op, ": logits must have at least one row; got sizes ", logits.sizes());
  TORCH_CHECK(c < (int64_t{1} << 30), op, ": too many classes (", c, ")");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == b && labels.scalar_type() == at::kLong,
              op, ": labels must be an int64 tensor of shape (", b, ",); got ",
              labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(table.dim() == 1 && table.size(0) == 2 + 7 * c && table.scalar_type() == at::kInt,
              op, ": class_table must be an int32 tensor of shape (", 2 + 7 * c,
              ",) (build it with exml_fast.ops.ed_loss.ed_class_table); got ",
              table.scalar_type(), " ", table.sizes());
  TORCH_CHECK(expert.dim() == 2 && expert.size(0) == b && expert.size(1) > 0 &&
                  is_float_dtype(expert),
              op, ": expert_logits must be a floating (", b, ", |Y^i|) or (", b, ", ", c,
              ") tensor; got ", expert.scalar_type(), " ", expert.sizes());
  if (prev.has_value()) {
    TORCH_CHECK(prev->dim() == 2 && prev->size(0) == b && prev->size(1) > 0 &&
                    is_float_dtype(*prev),
                op, ": prev_logits must be a floating (", b, ", |Y^prev|) or (", b, ", ", c,
                ") tensor; got ", prev->scalar_type(), " ", prev->sizes());
  }
  TORCH_CHECK(task_ids.has_value() == task_heads.has_value(), op,
              ": task_ids and task_heads must be given together");
  if (task_ids.has_value()) {
    TORCH_CHECK(task_ids->dim() == 1 && task_ids->size(0) == b &&
                    task_ids->scalar_type() == at::kLong,
                op, ": task_ids must be an int64 tensor of shape (", b, ",); got ",
                task_ids->scalar_type(), " ", task_ids->sizes());
    TORCH_CHECK(task_heads->dim() == 2 && task_heads->size(1) == c && task_heads->size(0) > 0 &&
                    task_heads->scalar_type() == at::kBool,
                op, ": task_heads must be a bool tensor of shape (T, ", c, "); got ",
                task_heads->scalar_type(), " ", task_heads->sizes());
  }
  check_same_device(labels, logits, op, "labels", "logits");
  check_same_device(expert, logits, op, "expert_logits", "logits");
  if (prev.has_value()) check_same_device(*prev, logits, op, "prev_logits", "logits");
  check_same_device(table, logits, op, "class_table", "logits");
  if (task_ids.has_value()) {
    check_same_device(*task_ids, logits, op, "task_ids", "logits");
    check_same_device(*task_heads, logits, op, "task_heads", "logits");
  }
}

// The checks of _ed_loss_backward's arguments common to its kernels.
inline void check_ed_backward_args(const at::Tensor& grad, const at::Tensor& grad_logits) {
  constexpr const char* op = "exml_fast::_ed_loss_backward";
  TORCH_CHECK(grad.numel() == 1, op, ": grad must be a scalar; got ", grad.sizes());
  TORCH_CHECK(grad_logits.dim() == 2 && is_float_dtype(grad_logits), op,
              ": grad_logits must be a floating (B, C) tensor; got ", grad_logits.scalar_type(),
              " ", grad_logits.sizes());
}

}  // namespace exml_fast
