"""What a compressed model is worth: accuracy, size on disk and latency on this CPU; and its file.

Quantised and pruned models are no longer the architecture their checkpoint names, so they are written as
``torch.export`` programs (``.pt2``, :func:`save_exported`; any batch size) and read back with
:func:`load_exported`. Latency compares like with like: both models under ``torch.compile`` (Inductor, with
``freezing``, which is how PT2E's int8 graph becomes int8 kernels), the median of ``rounds`` timed forwards.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
from torch import nn

from exml_fast._utils.io import atomic_write

__all__ = ["export_program", "file_size", "latency_ms", "load_exported", "save_exported"]


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` on the CPU with a dynamic batch (traced on two rows of ``example``, as a batch
    of one would be specialised)."""
    batch = torch.export.Dim("batch", min=1)
    example = example[:2] if example.shape[0] >= 2 else example.expand(2, *example.shape[1:])
    return torch.export.export(model, (example.cpu(),), dynamic_shapes=({0: batch},))


def save_exported(model: nn.Module, path: str | os.PathLike, example: torch.Tensor) -> None:
    """Writes ``model`` (CPU, eval) to ``path`` as a ``torch.export`` program with a dynamic batch, atomically."""
    program = export_program(model, example)
    atomic_write(path, lambda f: torch.export.save(program, f))


def load_exported(path: str | os.PathLike) -> nn.Module:
    """The module of a program :func:`save_exported` wrote (raises FileNotFoundError if ``path`` is missing);
    an int8 one needs torchao installed."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"exported model {os.fspath(path)!r} does not exist")
    try:  # an int8 program's quantize / dequantize ops are registered by torchao (torch 2.14 no longer has them)
        import torchao.quantization.pt2e  # noqa: F401
    except ImportError:
        pass
    module = torch.export.load(path).module()
    _allow_eval(module)
    return module


def _allow_eval(module: nn.Module) -> None:
    """Lets ``module.eval()`` (which an exported graph refuses) run, as evaluation code calls it."""
    try:
        from torchao.quantization.pt2e import allow_exported_model_train_eval
    except ImportError:
        return
    allow_exported_model_train_eval(module)


def file_size(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes of ``model`` written by :func:`save_exported` (what a user ships)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.pt2")
        save_exported(model, path, example)
        return os.path.getsize(path)


def latency_ms(model: nn.Module, example: torch.Tensor, *, rounds: int = 20, compile: bool = True) -> dict:
    """Median and range (ms) of ``rounds`` forwards of ``example`` after warm-up, under ``torch.compile`` with
    Inductor's ``freezing`` (``compile=False``: eager). Returns ``{"median", "min", "max", "rounds"}``."""
    import torch._inductor.config as inductor_config

    fn = model
    if compile:
        torch._dynamo.reset()
        fn = torch.compile(model)
    old = inductor_config.freezing
    inductor_config.freezing = True
    try:
        times = []
        with torch.no_grad():
            for _ in range(3):
                fn(example)
            for _ in range(rounds):
                t0 = time.perf_counter()
                fn(example)
                times.append(1e3 * (time.perf_counter() - t0))
    finally:
        inductor_config.freezing = old
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "rounds": rounds}
