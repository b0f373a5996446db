"""A smaller student from a teacher's synthetic images: :func:`distill_without_data`.

The zero-shot knowledge distillation of :func:`exml_fast.training.distill` (the KD loss at temperature τ between
the student's and the frozen teacher's logits on every augmented minibatch) behind one call that makes the images
too, with the synthesizer chosen by name. Its defaults are the recipe ``exml-fast reproduce zskd-mnist`` and
``dfkd-mnist`` record on MNIST-scale models (τ 20, SGD lr 0.05 with momentum 0.9 on a cosine schedule, batches of
64, pad-crop 4 and a 1-pixel roll); the number of images and epochs set the cost.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
from torch import nn

from exml_fast._utils.checks import check_int
from exml_fast.compress.calibration import background, check_classifier, check_images, synthetic_images
from exml_fast.synth.base import Synthesizer
from exml_fast.synth.generative import GenerativeSynthesizer
from exml_fast.training import distill

__all__ = ["DISTILL_DEFAULTS", "DistillResult", "distill_without_data"]

#: the KD recipe :func:`distill_without_data` passes to :func:`exml_fast.training.distill` unless overridden
DISTILL_DEFAULTS = {"temperature": 20.0, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                    "schedule": "cosine", "pad_crop": 4, "max_shift": 1}


@dataclasses.dataclass
class DistillResult:
    """What :func:`distill_without_data` made: the trained ``student`` (eval mode), where its images came from
    (``method``: "real" for ``images=``, a method name or a synthesizer's class name), how many (``n``; for a
    generator, the samples drawn in all), and the seconds of synthesis and of distillation."""

    student: nn.Module
    method: str
    n: int
    synthesis_s: float
    distill_s: float


def distill_without_data(teacher: nn.Module, student: nn.Module, input_shape: Sequence[int], mean=None, std=None,
                         *, method: str | Synthesizer = "deepinversion", n: int = 2048,
                         images: torch.Tensor | None = None, epochs: int = 100, seed: int = 0,
                         iterations: int | None = None, batch_size: int | None = None, progress: bool = True,
                         **kd) -> DistillResult:
    """Trains ``student`` to imitate ``teacher`` on images made from the teacher alone.

    Example::

        from exml_fast.compress import distill_without_data
        from exml_fast.models import build_model

        student = build_model("lenet5_half", num_classes=10)
        result = distill_without_data(teacher, student, (1, 32, 32), mean=0.1307, std=0.3081, n=2400)

    Args:
        teacher: the trained classifier, (N, C, H, W) -> (N, K) logits (frozen, left unchanged).
        student: the model to train, on its own device, in place; same inputs, K outputs.
        input_shape: (C, H, W) of one input.
        mean, std: the input normalisation (a float or one per channel); the augmentation pads with the
            background ``-mean / std``.
        method: the synthesizer by name (:data:`~exml_fast.compress.CALIBRATION_METHODS`: "deepinversion",
            "zeroq", "data-impressions", "model-inversion", "noise") or a :class:`~exml_fast.synth.Synthesizer`.
            A trained :class:`~exml_fast.synth.GenerativeSynthesizer` (DAFL, DFAD) is sampled afresh at every
            step, as those methods train their students; any other makes a fixed set of ``n`` images.
        n: how many images to make, >= 1 (unused for a generator).
        images: (N, C, H, W) inputs to distil on instead (real ones: the ceiling of the synthetic run).
        epochs: passes over the images, >= 1 (for a generator, ``epochs * n / batch_size`` steps).
        seed: the seed of the synthesis and of the training's draws.
        iterations, batch_size: synthesis steps per batch and its batch (None: the method's own).
        progress: show progress bars.
        **kd: any keyword of :func:`exml_fast.training.distill` (``temperature``, ``lr``, ``schedule``,
            ``batch_size`` of training as ``kd_batch_size`` ...), overriding :data:`DISTILL_DEFAULTS`.

    Returns:
        A :class:`DistillResult`.

    Raises:
        TypeError / ValueError: ``teacher`` or ``student`` is not a classifier of ``input_shape`` inputs, they
            disagree on the number of classes, or a bad ``method`` / ``images`` / ``epochs``.
    """
    owner = "distill_without_data"
    shape, k_teacher = check_classifier(teacher, input_shape, owner)
    try:
        _, k_student = check_classifier(student, shape, owner)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace(f"{owner}: model", f"{owner}: student", 1)) from exc
    if k_student != k_teacher:
        raise ValueError(f"{owner}: student has {k_student} outputs but teacher has {k_teacher}; they must agree")
    epochs = check_int(epochs, "epochs", owner, low=1)
    n = check_int(n, "n", owner, low=1)
    recipe = {**DISTILL_DEFAULTS, **kd}
    if "kd_batch_size" in recipe:
        recipe["batch_size"] = recipe.pop("kd_batch_size")
    if mean is not None and "fill" not in kd:
        recipe["fill"] = background(mean, std)
    t0 = time.perf_counter()
    if images is not None:
        x, label, drawn = check_images(images, shape, owner).detach(), "real", int(images.shape[0])
        steps = None
    elif isinstance(method, GenerativeSynthesizer):
        x, label = method.sample, type(method).__name__
        steps = max(1, epochs * n // recipe["batch_size"])
        drawn = steps * recipe["batch_size"]
    else:
        x = synthetic_images(teacher, shape, mean=mean, std=std, method=method, n=n, seed=seed,
                             iterations=iterations, batch_size=batch_size, progress=progress)
        label, drawn, steps = (method if isinstance(method, str) else type(method).__name__), n, None
    synthesis_s = 0.0 if images is not None or steps is not None else time.perf_counter() - t0
    t1 = time.perf_counter()
    length = {"iterations": steps} if steps is not None else {"epochs": epochs}
    distill(student, x, teacher=teacher, generator=seed, log_every=0, **length, **recipe)
    return DistillResult(student=student, method=label, n=drawn, synthesis_s=synthesis_s,
                         distill_s=time.perf_counter() - t1)
