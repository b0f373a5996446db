// Schemas of the window-pooling ops: max or average pooling over non-overlapping
// kh x kw windows (stride = kernel, no padding, floor mode), the layers of
// LeNet-class networks. Kernels live in cpu/window_pool_kernel.cpp and
// cuda/window_pool_kernel.cu; the math is in include/exml_fast/window_pool_common.h.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // x: (N, C, H, W) floating, NCHW or channels_last (other strides are copied
  // to NCHW); H >= kh, W >= kw. Returns (N, C, H / kh, W / kw) in x's dtype and
  // memory format. is_max: max pooling (NaN propagates; ties take the first
  // element in row-major window order), else the window mean.
  m.def("window_pool(Tensor x, int kh, int kw, bool is_max) -> Tensor");
  // dx of sum(grad * window_pool(x)): for max, grad at each window's argmax
  // (recomputed from x, the forward's rule) and 0 elsewhere; for the mean,
  // grad / (kh * kw) over the window. Rows and columns past the last whole
  // window get 0. Returns x's shape, dtype and memory format.
  m.def("_window_pool_backward(Tensor grad, Tensor x, int kh, int kw, bool is_max) -> Tensor");
}
