"""DFAD's public recipe on two teachers of the same network: the student's validation accuracy along the fit.

The control behind issue 42's DFAD finding (`benches/results/dfad_teacher_control_cpu.md`): the same DFAD loop
(`GenerativeSynthesizer(preset="dfad")`, DFAD's generator, 5 L1 student steps of 512 per generator step, the
public student and seed), with

- ``zskd``: the teacher `reproduce dfkd-mnist --recipe public` used until 2026-11-30 (the zskd paper networks'
  recipe: SGD 0.05 cosine, pad-crop 2, 20 epochs), read from ``--zskd-teacher`` (a saved exml_fast model), or
- ``dfad-code``: a teacher trained here as DFAD's run_mnist.sh trains it (SGD 0.01, momentum 0.9, weight decay
  1e-4, batch 256, 10 epochs, no augmentation), from seed 0.

Both learn from the training split less the 5000 validation images (the record's split); the student is
scored on those every ``--every`` steps. One teacher per process:

    PYTHONPATH=. python benches/dfad_teacher_control.py dfad-code --steps 120 --threads 1
    PYTHONPATH=. python benches/dfad_teacher_control.py zskd --zskd-teacher PATH --steps 120 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from exml_fast.checkpoint import load_model
from exml_fast.cl.scenarios import validation_indices
from exml_fast.data import DATASET_STATS, mnist_tensors
from exml_fast.experiments.dfkd import _public_student
from exml_fast.models import build_model
from exml_fast.synth import GenerativeSynthesizer
from exml_fast.training import evaluate, train_classifier


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher", choices=("zskd", "dfad-code"))
    ap.add_argument("--zskd-teacher", help="the saved zskd-recipe teacher (teacher 'zskd')")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.teacher == "zskd" and not args.zskd_teacher:
        ap.error("teacher 'zskd' needs --zskd-teacher PATH")
    torch.set_num_threads(args.threads)
    mean, std = DATASET_STATS["mnist"]
    x, y = mnist_tensors("train", dataset="mnist", pad_to=32, resize=True)
    held = torch.zeros(y.shape[0], dtype=torch.bool)
    held[validation_indices(y.shape[0], 5000)] = True
    xv, yv, x, y = x[held], y[held], x[~held], y[~held]
    if args.teacher == "zskd":
        teacher, _ = load_model(args.zskd_teacher)
    else:
        torch.manual_seed(0)
        teacher = build_model("lenet5_dafl", num_classes=10, in_channels=1)
        t = time.time()
        train_classifier(teacher, x, y, epochs=10, batch_size=256, lr=0.01, weight_decay=1e-4,
                         generator=torch.Generator().manual_seed(0))
        print(f"teacher trained {time.time() - t:.0f} s", flush=True)
    teacher.eval()
    with torch.no_grad():
        logits = teacher(xv)
    print(f"{args.teacher}: teacher val {100 * evaluate(teacher, xv, yv):.2f} %, mean|logit| "
          f"{logits.abs().mean():.2f}, mean max logit {logits.amax(1).mean():.2f}, logit std {logits.std():.2f}",
          flush=True)
    synth = GenerativeSynthesizer(teacher, input_shape=(1, 32, 32), mean=(mean,), std=(std,), preset="dfad",
                                  student=_public_student(0, "cpu"), device="cpu")
    t0 = time.time()

    def score(done, student):
        print(f"{args.teacher} step {done}: val {100 * evaluate(student, xv, yv):.2f} %, {time.time() - t0:.0f} s",
              flush=True)

    synth.fit(args.steps, batch_size=args.batch_size, generator=0, progress=False, callback=score,
              callback_every=args.every)


if __name__ == "__main__":
    main()
