"""Quality of exml_fast.synth at CI scale: does a data-free synthesizer invert a real MNIST teacher?

One LeNet-5-BN teacher is trained on a 20 000-image subset of MNIST for one
epoch (the Ex-Model CL expert recipe, ~97.5 % test accuracy). Then:

1. DeepInversion synthesises 200 digits (20 per class, two batches of 100,
   200 Adam steps, no flips). The teacher must label >= 95 % of them as their
   target class, and a fresh LeNet-5-BN trained ONLY on them — KD from the
   teacher's logits at τ 4 on augmented copies (pad-crop 4), 60 epochs, SGD lr
   0.05 with a cosine decay — must reach a clear margin above chance (10 %) on
   the real MNIST test set.
2. Data Impressions (Dirichlet soft targets, τ 20, no priors) for 200
   images, 200 steps: the teacher's argmax must agree with the argmax of the
   sample's soft target, and a student distilled the same way must beat chance
   by a wide margin.

Measured over seeds 0-4 (the seed drives the teacher, the synthesis and the
distillation; ``python python_tests/synth/test_synth_quality.py [threads] [seeds]``
prints these; the test runs seed 0, or $EXML_FAST_QUALITY_SEED):

    seed                              0      1      2      3      4    threshold
    teacher, MNIST test            97.45  97.92  97.85  98.04  97.76    >= 96
    DeepInversion: teacher = y     99.5  100.0   98.0  100.0  100.0     >= 95 (the issue's bar)
      student, MNIST test          87.50  88.76  79.71  91.31  85.84    >= 70
    Data Impressions: argmax
      teacher = argmax target      97.0   95.0   96.0   97.5   97.5     >= 90
      student, MNIST test          66.50  62.62  76.25  43.37  79.71    >= 30

(%; chance is 10 %). A student from 200 Data Impressions of this BN teacher
varies much more between seeds than one from DeepInversion images, whose BN
matching gives the student's own BN layers realistic statistics; with BN
matching added to Data Impressions (bn_weight 1) the student reached 93.6 %
(seed 0) but the τ-20 targets were no longer met, so the test keeps the
paper's form. On one loaded CPU thread: teacher 11-15 s, each synthesis +
distillation 40-65 s; the file takes about 2 minutes.
"""

from __future__ import annotations

import os

import pytest
import torch

from exml_fast import data
from exml_fast.data import DATASET_STATS
from exml_fast.models import LeNet5BN
from exml_fast.synth import DataImpressions, DeepInversion
from exml_fast.training import distill, evaluate, train_classifier

SEED = int(os.environ.get("EXML_FAST_QUALITY_SEED", "0"))
MEAN, STD = DATASET_STATS["mnist"]
BACKGROUND = -MEAN / STD  # a black pixel, normalised: what distillation pads with

TEACHER_SUBSET = 20000
N_IMAGES = 200
SYNTH_BATCH = 100
SYNTH_ITERATIONS = 200

# DeepInversion, the demo's MNIST settings (exml_fast/demo.py) in the engine's terms, over the "cifar" preset
# (the defaults they were measured with).
DEEPINVERSION = dict(preset="cifar", lr=0.1, schedule="cosine", warmup=0.0, bn_weight=1.0, first_bn_multiplier=10.0,
                     tv_l2_weight=0.05, l2_weight=0.0, l2_sq_weight=1e-3, jitter=2, flip=False)
# Data Impressions as in the paper (β mixture, τ 20, no priors, no BN matching), a larger
# step for 200 steps.
DATA_IMPRESSIONS = dict(lr=0.05, beta=(1.0, 0.1), temperature=20.0, bn_weight=0.0, jitter=2, flip=False)
# Zero-shot KD of the student.
DISTILL = dict(temperature=4.0, epochs=60, batch_size=64, lr=0.05, schedule="cosine", optimizer="sgd",
               augment=True, pad_crop=4, fill=BACKGROUND)

MIN_TEACHER_ACCURACY = 0.96
MIN_TARGET_ACCURACY = 0.95
MIN_STUDENT_ACCURACY_DEEPINVERSION = 0.70
MIN_TARGET_AGREEMENT_DATA_IMPRESSIONS = 0.90
MIN_STUDENT_ACCURACY_DATA_IMPRESSIONS = 0.30

pytestmark = pytest.mark.slow


def train_teacher(seed: int, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    """LeNet5BN, one epoch of SGD over a seeded TEACHER_SUBSET of (x, y)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=g)[:TEACHER_SUBSET]
    torch.manual_seed(seed)
    model = LeNet5BN(num_classes=10, in_channels=1)
    return train_classifier(model, x[idx], y[idx], epochs=1, batch_size=64, lr=0.01, generator=g)


def student_accuracy(seed: int, teacher, batch, x_test, y_test) -> float:
    torch.manual_seed(seed + 1000)
    student = LeNet5BN(num_classes=10, in_channels=1)
    distill(student, batch.x, teacher=teacher, generator=seed, **DISTILL)
    return evaluate(student, x_test, y_test)


def deepinversion_figures(seed: int, teacher, x_test, y_test) -> dict[str, float]:
    synth = DeepInversion(teacher, input_shape=(1, 32, 32), mean=MEAN, std=STD, **DEEPINVERSION)
    batch = synth.synthesize(N_IMAGES, iterations=SYNTH_ITERATIONS, batch_size=SYNTH_BATCH, generator=seed,
                             progress=False)
    assert batch.x.shape == (N_IMAGES, 1, 32, 32) and torch.equal(batch.y.bincount(), torch.full((10,), 20))
    with torch.no_grad():
        target_acc = (teacher(batch.x).argmax(1) == batch.y).float().mean().item()
    return {"target_acc": target_acc, "student_acc": student_accuracy(seed, teacher, batch, x_test, y_test)}


def data_impressions_figures(seed: int, teacher, x_test, y_test) -> dict[str, float]:
    synth = DataImpressions(teacher, input_shape=(1, 32, 32), mean=MEAN, std=STD, **DATA_IMPRESSIONS)
    batch = synth.synthesize(N_IMAGES, iterations=SYNTH_ITERATIONS, batch_size=SYNTH_BATCH, generator=seed,
                             progress=False)
    assert batch.soft_targets is not None and batch.soft_targets.shape == (N_IMAGES, 10)
    with torch.no_grad():
        agree = (teacher(batch.x).argmax(1) == batch.soft_targets.argmax(1)).float().mean().item()
    return {"target_agreement": agree, "student_acc": student_accuracy(seed, teacher, batch, x_test, y_test)}


@pytest.fixture(scope="module")
def mnist():
    if data.find_data_root("mnist") is None:
        pytest.skip("MNIST files not found (set EXML_FAST_DATA)")
    return data.mnist_tensors("train"), data.mnist_tensors("test")


@pytest.fixture(scope="module")
def teacher(mnist):
    (x, y), (x_test, y_test) = mnist
    model = train_teacher(SEED, x, y)
    acc = evaluate(model, x_test, y_test)
    assert acc >= MIN_TEACHER_ACCURACY, f"the teacher reached only {acc:.4f} on MNIST test"
    return model


def test_deepinversion_images_are_their_class_and_teach_a_student(teacher, mnist):
    _, (x_test, y_test) = mnist
    fig = deepinversion_figures(SEED, teacher, x_test, y_test)
    assert fig["target_acc"] >= MIN_TARGET_ACCURACY, fig
    assert fig["student_acc"] >= MIN_STUDENT_ACCURACY_DEEPINVERSION, fig


def test_data_impressions_match_their_targets_and_teach_a_student(teacher, mnist):
    _, (x_test, y_test) = mnist
    fig = data_impressions_figures(SEED, teacher, x_test, y_test)
    assert fig["target_agreement"] >= MIN_TARGET_AGREEMENT_DATA_IMPRESSIONS, fig
    assert fig["student_acc"] >= MIN_STUDENT_ACCURACY_DATA_IMPRESSIONS, fig


def measure(seeds=range(5)) -> None:
    """Prints every figure the tests check for each seed (the table in the module docstring)."""
    import time

    (x, y), (x_test, y_test) = data.mnist_tensors("train"), data.mnist_tensors("test")
    for seed in seeds:
        t0 = time.perf_counter()
        model = train_teacher(seed, x, y)
        t1 = time.perf_counter()
        row = {"teacher_acc": evaluate(model, x_test, y_test)}
        di = deepinversion_figures(seed, model, x_test, y_test)
        t2 = time.perf_counter()
        dimp = data_impressions_figures(seed, model, x_test, y_test)
        t3 = time.perf_counter()
        row.update({f"deepinversion_{k}": v for k, v in di.items()})
        row.update({f"data_impressions_{k}": v for k, v in dimp.items()})
        row["seconds"] = (round(t1 - t0, 1), round(t2 - t1, 1), round(t3 - t2, 1))
        print(seed, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)


if __name__ == "__main__":
    import sys

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    measure(range(int(sys.argv[2])) if len(sys.argv) > 2 else range(5))
