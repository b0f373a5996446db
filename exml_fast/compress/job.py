"""``exml-fast compress quantize|prune|distill`` on a saved model: :func:`compress_file`.

A job reads an exml_fast checkpoint (:func:`exml_fast.checkpoint.load_model`; its input shape and normalisation
come from it), makes its images once into ``<out>.work/`` (DeepInversion's batches as resumable shards, the other
methods' images as one file, each written atomically, so a rerun of the same command after an interruption
continues from what is there), compresses, writes the result atomically to ``out`` and a report beside it
(``<out>.report.json``): accuracy before and after on a labelled test set if one is named, size on disk, latency
on this CPU (both models under ``torch.compile``), synthesis and compression time, and FLOPs for pruning.

Outputs: ``quantize`` and ``prune`` write a ``torch.export`` program (``.pt2``; read it with
:func:`exml_fast.compress.load_exported`), ``distill`` an exml_fast checkpoint of the student's architecture.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from exml_fast._utils.checks import check_choice
from exml_fast._utils.io import atomic_write, load_torch_file
from exml_fast.checkpoint import load_model, save_model
from exml_fast.compress.calibration import synthetic_images
from exml_fast.compress.distill import distill_without_data
from exml_fast.compress.prune import prune_without_data
from exml_fast.compress.quantize import quantize_without_data
from exml_fast.compress.report import file_size, latency_ms, save_exported
from exml_fast.data import mnist_tensors
from exml_fast.models import build_model
from exml_fast.training import evaluate

__all__ = ["ACTIONS", "TEST_SETS", "compress_file"]

ACTIONS: tuple[str, ...] = ("quantize", "prune", "distill")
#: the labelled test sets a report can measure accuracy on
TEST_SETS: tuple[str, ...] = ("mnist", "fashion-mnist")


def _images(model, info, work: str, *, method: str, n: int, seed: int, iterations: int | None,
            progress: bool) -> torch.Tensor:
    """The job's images, made once: a finished file is read back; DeepInversion resumes from its shards."""
    tag = f"{method}_n{n}_seed{seed}" + ("" if iterations is None else f"_it{iterations}")
    path = os.path.join(work, f"images_{tag}.pt")
    if os.path.exists(path):
        return load_torch_file(path, what="cached images")
    images = synthetic_images(model, info.input_shape, mean=info.mean, std=info.std, method=method, n=n, seed=seed,
                              iterations=iterations, progress=progress,
                              save_to=os.path.join(work, f"shards_{tag}"))
    atomic_write(path, lambda f: torch.save(images.cpu(), f))
    return images


def _test_set(name: str | None, info, limit: int | None):
    if name is None:
        return None
    check_choice(name, "test", "compress", TEST_SETS)
    x, y = mnist_tensors("test", dataset=name, pad_to=info.input_shape[-1], normalize=False)
    mean = torch.tensor(info.mean or (0.0,) * info.in_channels).view(1, -1, 1, 1)
    std = torch.tensor(info.std or (1.0,) * info.in_channels).view(1, -1, 1, 1)
    x = (x - mean) / std
    return (x[:limit], y[:limit]) if limit else (x, y)


def compress_file(action: str, model_path: str, out: str, *, method: str = "deepinversion", n: int | None = None,
                  seed: int = 0, iterations: int | None = None, test: str | None = None, test_n: int | None = None,
                  latency: bool = True, student: str | None = None, epochs: int = 100, flops_ratio: float = 0.5,
                  importance: str = "taylor", recover_epochs: int = 100,
                  recover_steps: int | None = None, feature_weight: float = 10.0, rotate: float = 0.0,
                  scale: float = 0.0, device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Runs one compression job on the checkpoint ``model_path``; writes ``out`` and ``<out>.report.json``.

    Args:
        action: "quantize", "prune" or "distill".
        model_path: an exml_fast checkpoint (:func:`~exml_fast.checkpoint.save_model`).
        out: the output file (``.pt2`` for quantize / prune, a checkpoint for distill).
        method: where the images come from (:data:`~exml_fast.compress.CALIBRATION_METHODS`).
        n: how many images (None: 256 to calibrate or prune, 2048 to distil).
        seed, iterations: the synthesis seed and steps per batch (None: the method's own).
        test: "mnist" or "fashion-mnist": measure accuracy before and after on its test split (or None).
        test_n: only the first ``test_n`` test images (None: all).
        latency: time both models on this CPU (adds two ``torch.compile`` runs).
        student: distill's student architecture (a key of :data:`exml_fast.models.ARCHS`).
        epochs: distill's passes over the images.
        flops_ratio, importance, recover_epochs, recover_steps, feature_weight, rotate, scale: prune's target,
            channel importance, recovery length (epochs, or steps in their place when given), the weight of the
            recovery's BatchNorm-output term and its random rotation (degrees) and zoom
            (:func:`~exml_fast.compress.prune_without_data`).
        device: where the synthesis, the pruning and the distillation run (quantisation is for x86 CPUs); the
            results are written, measured and timed on the CPU.
        progress: show progress bars.

    Returns:
        The report (also written as JSON beside ``out``).
    """
    check_choice(action, "action", "compress", ACTIONS)
    if action == "distill" and student is None:
        raise ValueError("compress distill: student (an architecture name) is required")
    t0 = time.perf_counter()
    model, info = load_model(model_path, map_location=device)
    n = n if n is not None else (2048 if action == "distill" else 256)
    data = _test_set(test, info, test_n)
    work = f"{out}.work"
    os.makedirs(work, exist_ok=True)
    images = _images(model, info, work, method=method, n=n, seed=seed, iterations=iterations, progress=progress)
    synthesis_s = time.perf_counter() - t0
    example = images[:64].cpu()
    report: dict[str, Any] = {"action": action, "model": os.fspath(model_path), "out": os.fspath(out),
                              "method": method, "n": n, "seed": seed, "iterations": iterations,
                              "synthesis_s": synthesis_s, "device": str(torch.device(device))}
    t1 = time.perf_counter()
    if action == "quantize":
        result = quantize_without_data(model, info.input_shape, info.mean, info.std, images=images, progress=progress)
        new, report["flow"] = result.model, result.flow
        report["float_layers"] = list(result.float_layers)
        save_exported(new, out, example)
    elif action == "prune":
        result = prune_without_data(model, info.input_shape, info.mean, info.std, images=images,
                                    flops_ratio=flops_ratio, importance=importance, recover_epochs=recover_epochs,
                                    recover_steps=recover_steps, feature_weight=feature_weight, rotate=rotate,
                                    scale=scale, seed=seed, progress=progress)
        new = result.model
        report.update(importance=importance, flops_ratio=flops_ratio, recover_epochs=recover_epochs,
                      recover_steps=recover_steps, feature_weight=feature_weight, rotate=rotate, scale=scale,
                      macs_before=result.macs_before, macs_after=result.macs_after,
                      params_before=result.params_before, params_after=result.params_after)
        save_exported(new, out, example)
    else:
        new = build_model(student, num_classes=info.num_classes, in_channels=info.in_channels).to(device)
        distill_without_data(model, new, info.input_shape, info.mean, info.std, images=images, epochs=epochs,
                             seed=seed, progress=progress)
        report.update(student=student, epochs=epochs)
        save_model(new, out, arch=student, num_classes=info.num_classes, in_channels=info.in_channels,
                   input_shape=info.input_shape, mean=info.mean, std=info.std, classes=info.classes,
                   metadata={"distilled_from": os.fspath(model_path), "method": method, "n": n, "epochs": epochs})
    report["compress_s"] = time.perf_counter() - t1
    model, new = model.cpu(), new.cpu()
    report["size_before"] = file_size(model, example)
    report["size_after"] = file_size(new, example) if action != "distill" else os.path.getsize(out)
    if data is not None:
        report["test"] = test
        report["accuracy_before"] = evaluate(model, *data)
        report["accuracy_after"] = evaluate(new, *data)
    if latency:
        report["latency_ms_before"] = latency_ms(model, example)
        report["latency_ms_after"] = latency_ms(new, example)
        report["latency_batch"] = int(example.shape[0])
    atomic_write(f"{out}.report.json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    return report
