"""Loading of the compiled library exml_fast._C.

Importing exml_fast never fails because of it: when `_C` cannot be loaded,
every op falls back to its pure-PyTorch reference (exml_fast.reference) and a
single warning says why. `EXML_FAST_DISABLE_EXT=1` forces that fallback, which
is how the tests exercise it.
"""

from __future__ import annotations

import os
import warnings

import torch

REBUILD_HINT = (
    "rebuild exml_fast from its source tree with a CUDA build of torch and a CUDA "
    "toolkit (CUDA_HOME) visible: `EXML_FAST_FORCE_CUDA=1 pip install "
    "--no-build-isolation -e .`"
)

_C = None
_load_error: str | None = None
_warned = False

if os.environ.get("EXML_FAST_DISABLE_EXT", "").strip() not in ("", "0"):
    _load_error = "EXML_FAST_DISABLE_EXT is set"
else:
    try:
        from exml_fast import _C  # noqa: F811  (registers the ops with the dispatcher)
    except ImportError as e:  # missing or ABI-incompatible build
        _C = None
        _load_error = f"{type(e).__name__}: {e}"

# Read once: op wrappers consult it on every call, also while torch.compile traces.
_HAS_CUDA_KERNELS = bool(_C is not None and _C.build_info()["cuda"])


def has_ops() -> bool:
    """True when the compiled library loaded and its ops are in `torch.ops.exml_fast`."""
    return _C is not None


def build_info() -> dict:
    """Facts about the compiled library.

    Returns a dict with `torch_version` (the torch it was compiled against),
    `cuda` (whether CUDA kernels are present), `cuda_version`, `cuda_archs`,
    `compiler` and `cxx_standard`; or `{"loaded": False, "error": ...}` when
    the library is not loaded.
    """
    if _C is None:
        return {"loaded": False, "error": _load_error}
    info = dict(_C.build_info())
    info["loaded"] = True
    return info


def warn_fallback_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"exml_fast: compiled ops unavailable ({_load_error}); falling back to the "
            "pure-PyTorch reference implementations, which are slower. Build with "
            "`pip install --no-build-isolation -e .` to get the fused kernels.",
            RuntimeWarning,
            stacklevel=3,
        )


def use_compiled(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors runs the compiled kernel (else the reference).

    Raises when a CUDA tensor meets a build that has no CUDA kernels.
    """
    if _C is None:
        warn_fallback_once()
        return False
    if not _HAS_CUDA_KERNELS and any(t.is_cuda for t in tensors):
        raise RuntimeError(
            "exml_fast was built without CUDA kernels, so it cannot run on CUDA tensors; "
            + REBUILD_HINT
        )
    return True
