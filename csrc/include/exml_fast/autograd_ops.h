// Helpers of the ops whose autograd is registered in C++ (an Autograd-key
// kernel in csrc/ops/<op>.cpp): typed handles to ops found by name, and the
// error every backward op raises when asked for a second derivative.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

namespace exml_fast {

// The typed handle of exml_fast::<name> (looked up once per call site: keep it
// in a function-local static).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The autograd of an op's `_<op>_backward`: first derivatives only. The message
// is the one exml_fast._utils.checks.refuse_double_backward gives in Python.
[[noreturn]] inline void refuse_double_backward(const char* op, const char* reference) {
  TORCH_CHECK(false, "exml_fast.ops.", op,
              " supports first derivatives only: the gradient of its gradient (double backward) is "
              "not implemented. Use exml_fast.reference.",
              reference, " for higher-order derivatives.");
}

}  // namespace exml_fast
