"""Data-free compression records: int8 calibration on synthetic images against real images and noise.

Models trained here (once, kept in ``--models`` as exml_fast checkpoints; SGD momentum 0.9, weight decay 5e-4,
cosine lr from 0.05, batches of 64, 32 x 32 normalised inputs, the whole train split):

- ``lenet5_bn-mnist`` / ``lenet5_bn-fmnist``: LeNet-5-BN, 2 epochs;
- ``resnet18_slim-mnist`` / ``resnet18_slim-fmnist``: the slim CIFAR ResNet-18 (width 20, 1.1 M parameters,
  20 BN layers) with one input channel, 1 epoch;
- ``mobilenet_v2-fmnist``: MobileNetV2 with one input channel, 2 epochs.

``--part quantize``: for each model, int8 PT2E (x86 Inductor quantizer) calibrated on ``--n`` images of each
source: ``real`` (random training images: the ceiling), ``noise`` (standard normal after normalisation: the
floor), ``zeroq`` (ZeroQ's distilled data, its recipe: Adam lr 0.5, 500 steps, batches of 32) and
``deepinversion`` (preset auto, ``--di-iterations`` steps in batches of ``--n``). Records the test accuracy of the
float model and of each int8 model, the drop against the float model and against real calibration, the synthesis
time, and the latency of the float and the int8 model (batch 64, both under ``torch.compile`` with freezing).

``--part prune``: for each model, 50 % of the MACs removed by channel pruning (``prune_without_data``), recovered by
``--recover-epochs`` of distillation from the unpruned model on the same ``--prune-n`` images: Taylor scores on
DeepInversion images (and the same before recovery), BN-scale scores on them (the baseline), and Taylor scores on
real training images (the ceiling). Records the test accuracy, the drop against the float model, the MACs and
parameters before and after, the synthesis and recovery time. By default on all five models. A model's results
are kept in ``--prune-dir``, as for ``prune-budget``. ``--feature-weight`` is ``prune_without_data``'s (the
recovery also matches the BatchNorm outputs of the kept channels; 10 as in the library, 0 for the logits-only
recovery of the earlier record ``compress_prune_logits_cpu``); ``--rotate`` and ``--scale`` its recovery's random
rotation and zoom (0: none, the earlier records).

``--part prune-budget``: how many images the pruning needs. Taylor pruning (50 % of the MACs) recovered on the
first n of one draw of DeepInversion images, and of real training images, for each n of ``--budget-n``, every n
with the same ``--recover-steps`` of distillation. A model's results are kept in ``--budget-dir``: models can run
in parallel processes (``--models X --out ''``), and the invocation naming them all reads them back and records.

``--part prune-study``: where the pruning loses its points on the Fashion-MNIST models, each on a *validation*
model (the same recipe trained on all but the last ``--holdout`` training images, which are the validation set;
nothing here looks at the test split). The prune record's recipe (Taylor scores and 800 recovery steps on
``--prune-n`` DeepInversion images) against real images for the scores, for the recovery, or both, and against one
change at a time to the recovery (its length, temperature, loss, lr, augmentation) or to its images (more synthesis
steps, ZeroQ's distilled data, Data Impressions, DeepInversion plus ZeroQ or plus a second draw, and DeepInversion
§4.3's competition round: plus Adaptive DeepInversion against the recipe's pruned network), and the recovery
matching the unpruned network's BatchNorm outputs on the kept channels beside the logits (``feature_weight``). The
record recipe runs with three recovery seeds (its spread). ``--study-rows`` runs some of the rows (indices into
``STUDY``; the first, the recipe, always among them); by default the ResNets and MobileNetV2, where a row takes
minutes, run those of ``STUDY_QUICK``.

Usage:
    python benches/bench_compress.py [--part quantize|prune|prune-budget|prune-study] [--models NAME ...] [--n 128]
        [--di-iterations 200] [--prune-n 512] [--recover-epochs 100] [--feature-weight 10] [--rotate 0]
        [--scale 0] [--threads N]
        [--out benches/results]
        [--model-dir runs/compress/models] [--budget-n 512 4096 16384] [--recover-steps 6400]
        [--budget-dir runs/compress/budget] [--prune-dir runs/compress/prune] [--holdout 5000]
        [--study-dir runs/compress/study] [--study-rows 0 3 ...] [--note TEXT] [--record NAME]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import sys
import time
import warnings

import torch
from benchlib import RESULTS, env_markdown, environment, record

from exml_fast._utils.io import atomic_write
from exml_fast.checkpoint import load_model, save_model
from exml_fast.cli.common import angle, zoom_range
from exml_fast.compress import (batchnorm_features, latency_ms, prune_without_data, quantize_without_data,
                                synthetic_images)
from exml_fast.compress.calibration import background
from exml_fast.data import DATASET_STATS, mnist_tensors
from exml_fast.models import build_model
from exml_fast.training import distill, evaluate, train_classifier

#: name -> (arch, dataset, epochs)
MODELS = {
    "lenet5_bn-mnist": ("lenet5_bn", "mnist", 2),
    "resnet18_slim-mnist": ("resnet18_cifar_slim", "mnist", 1),
    "lenet5_bn-fmnist": ("lenet5_bn", "fashion-mnist", 2),
    "resnet18_slim-fmnist": ("resnet18_cifar_slim", "fashion-mnist", 1),
    "mobilenet_v2-fmnist": ("mobilenet_v2", "fashion-mnist", 2),
}
TRAIN = {"batch_size": 64, "lr": 0.05, "schedule": "cosine"}
SOURCES = ("real", "noise", "zeroq", "deepinversion")
#: prune rows: (name, importance, images, recover)
PRUNE_ROWS = (("taylor, DI, no recovery", "taylor", "deepinversion", False),
              ("taylor, DI", "taylor", "deepinversion", True),
              ("bn_scale, DI", "bn_scale", "deepinversion", True),
              ("taylor, real (ceiling)", "taylor", "real", True))
SHAPE = (1, 32, 32)


def trained_model(name: str, folder: str, holdout: int = 0):
    """The model ``name``, trained once and kept in ``folder``; returns (model, mean, std, train seconds). With
    ``holdout`` > 0, trained on all but the last ``holdout`` training images (a validation model, kept apart)."""
    arch, dataset, epochs = MODELS[name]
    mean, std = DATASET_STATS[dataset]
    path = os.path.join(folder, f"{name}-holdout{holdout}.pt" if holdout else f"{name}.pt")
    if os.path.exists(path):
        model, info = load_model(path)
        return model, mean, std, info.metadata.get("train_s", float("nan"))
    x, y = mnist_tensors("train", dataset=dataset)
    if holdout:
        x, y = x[:-holdout], y[:-holdout]
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=1)
    t0 = time.perf_counter()
    train_classifier(model, x, y, epochs=epochs, generator=torch.Generator().manual_seed(0), **TRAIN)
    train_s = time.perf_counter() - t0
    save_model(model, path, arch=arch, num_classes=10, in_channels=1, input_shape=SHAPE, mean=mean, std=std,
               metadata={"dataset": dataset, "epochs": epochs, **TRAIN, "train_s": train_s, "holdout": holdout})
    return model.eval(), mean, std, train_s


def _model_and_data(name: str, args):
    """The trained model ``name`` and what its rows need: (model, mean, std, train s, dataset, test images and
    labels, train images, float test accuracy %)."""
    model, mean, std, train_s = trained_model(name, args.model_dir)
    dataset = MODELS[name][1]
    x_test, y_test = mnist_tensors("test", dataset=dataset)
    x_train, _ = mnist_tensors("train", dataset=dataset)
    return model, mean, std, train_s, dataset, x_test, y_test, x_train, 100 * evaluate(model, x_test, y_test)


def quantize_rows(name: str, args) -> dict:
    model, mean, std, train_s, dataset, x_test, y_test, x_train, float_acc = _model_and_data(name, args)
    rows = []
    for source in SOURCES:
        t0 = time.perf_counter()
        if source == "real":
            idx = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(0))[: args.n]
            images = x_train[idx]
        else:
            images = synthetic_images(model, SHAPE, mean=mean, std=std, method=source, n=args.n, seed=0,
                                      iterations=args.di_iterations if source == "deepinversion" else None,
                                      batch_size=args.n if source == "deepinversion" else None, progress=False)
        synthesis_s = time.perf_counter() - t0 if source != "real" else 0.0
        result = quantize_without_data(model, SHAPE, mean, std, images=images, flow="pt2e", progress=False)
        acc = 100 * evaluate(result.model, x_test, y_test)
        rows.append({"source": source, "accuracy": acc, "synthesis_s": synthesis_s,
                     "calibrate_s": result.calibrate_s, "model": result.model})
        print(f"  {name} {source}: {acc:.2f} % (float {float_acc:.2f} %), synthesis {synthesis_s:.1f} s",
              flush=True)
    example = x_test[:64]
    real = rows[0]
    lat_float = latency_ms(model, example, rounds=args.rounds)
    lat_int8 = latency_ms(real.pop("model"), example, rounds=args.rounds)
    for r in rows:
        r.pop("model", None)
        r["drop_vs_float"] = float_acc - r["accuracy"]
        r["vs_real"] = r["accuracy"] - real["accuracy"]
    return {"name": name, "arch": MODELS[name][0], "dataset": dataset, "epochs": MODELS[name][2],
            "train_s": train_s, "float_accuracy": float_acc, "rows": rows, "latency_float_ms": lat_float,
            "latency_int8_ms": lat_int8}


def quantize_markdown(models: list[dict], args, env, command) -> str:
    lines = env_markdown(env, "int8 calibration without data", command)
    lines += [f"int8 PT2E (torchao 0.18, X86InductorQuantizer defaults: per-channel symmetric int8 weights, "
              f"per-tensor affine uint8 activations, BN folded) calibrated on {args.n} images of each source; "
              f"DeepInversion: preset auto, {args.di_iterations} steps on batches of {args.n}; ZeroQ: its "
              "recipe (Adam lr 0.5, 500 steps, batches of 32). Accuracy on the whole test split, %. "
              "Latency: batch 64, both models under torch.compile (Inductor, freezing), median of "
              f"{args.rounds} rounds (range), {env.get('threads', '')} thread(s).", "",
              "| model | float | real (ceiling) | noise (floor) | zeroq | deepinversion | synthetic − real "
              "(zeroq / DI) | synthesis s (zeroq / DI) | latency float → int8, ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in models:
        r = {row["source"]: row for row in m["rows"]}
        lf, li = m["latency_float_ms"], m["latency_int8_ms"]
        lines.append(
            f"| {m['name']} | {m['float_accuracy']:.2f} | {r['real']['accuracy']:.2f} | "
            f"{r['noise']['accuracy']:.2f} | {r['zeroq']['accuracy']:.2f} | {r['deepinversion']['accuracy']:.2f} | "
            f"{r['zeroq']['vs_real']:+.2f} / {r['deepinversion']['vs_real']:+.2f} | "
            f"{r['zeroq']['synthesis_s']:.0f} / {r['deepinversion']['synthesis_s']:.0f} | "
            f"{lf['median']:.2f} ({lf['min']:.2f}–{lf['max']:.2f}) → {li['median']:.2f} "
            f"({li['min']:.2f}–{li['max']:.2f}) |")
    def worst(source):
        return max(-next(r["vs_real"] for r in m["rows"] if r["source"] == source) for m in models)

    lines += ["", "Goal: int8 calibrated on synthetic images within 0.5 points of real-data calibration on every "
                  f"model. Largest shortfall against real calibration over the models: zeroq {worst('zeroq'):.2f}, "
                  f"deepinversion {worst('deepinversion'):.2f}, noise {worst('noise'):.2f} points (negative: "
                  "above real calibration on every model)."]
    return "\n".join(lines) + "\n"


#: settings added after results were kept, with the value those results ran with (what a missing key means)
_LATER_SETTINGS = {"rotate": 0.0, "scale": 0.0}


def _kept(folder: str, name: str, settings: dict, run) -> dict:
    """Model ``name``'s results: read back from ``folder/name.json`` when an earlier invocation wrote them with the
    same ``settings`` (then marked ``read_back``), else ``run()`` and kept there (written whole or not at all). So
    models can run in parallel processes (``--models X --out ''``), or one at a time, and the invocation naming
    them all records them."""
    path = os.path.join(folder, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
        if all(done.get(k, _LATER_SETTINGS.get(k)) == v for k, v in settings.items()):
            print(f"  {name}: read back from {path}", flush=True)
            return {**done, "read_back": True}
    done = {**run(), **settings}
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(done, indent=1).encode()))
    return done


def _read_back_line(models: list[dict], folder: str) -> list[str]:
    read_back = [m["name"] for m in models if m.get("read_back")]
    if not read_back:
        return []
    return ["", f"Computed by earlier invocations and read back from `{folder}/`: " + ", ".join(read_back)
            + " (the machine line above is this invocation's)."]


def prune_rows(name: str, args) -> dict:
    """The rows of :data:`PRUNE_ROWS` for model ``name``; kept in ``--prune-dir`` once done (:func:`_kept`)."""
    settings = {"prune_n": args.prune_n, "recover_epochs": args.recover_epochs, "di_iterations": args.di_iterations,
                "feature_weight": args.feature_weight, "rotate": args.rotate, "scale": args.scale}
    return _kept(args.prune_dir, name, settings, lambda: _prune_run(name, args))


def _prune_run(name: str, args) -> dict:
    model, mean, std, train_s, dataset, x_test, y_test, x_train, float_acc = _model_and_data(name, args)
    t0 = time.perf_counter()
    images = {"deepinversion": synthetic_images(model, SHAPE, mean=mean, std=std, n=args.prune_n, seed=0,
                                                iterations=args.di_iterations, batch_size=256, progress=False)}
    synthesis_s = time.perf_counter() - t0
    idx = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(0))[: args.prune_n]
    images["real"] = x_train[idx]
    rows = []
    for label, importance, source, recover in PRUNE_ROWS:
        r = prune_without_data(model, SHAPE, mean, std, images=images[source], importance=importance,
                               flops_ratio=0.5, recover_epochs=args.recover_epochs if recover else 0, seed=0,
                               feature_weight=args.feature_weight, rotate=args.rotate, scale=args.scale,
                               progress=False)
        acc = 100 * evaluate(r.model, x_test, y_test)
        rows.append({"row": label, "importance": importance, "images": source, "recover": recover,
                     "accuracy": acc, "drop_vs_float": float_acc - acc, "macs_before": r.macs_before,
                     "macs_after": r.macs_after, "params_before": r.params_before, "params_after": r.params_after,
                     "flops_reduction": r.flops_reduction, "recover_s": r.recover_s})
        print(f"  {name} {label}: {acc:.2f} % (float {float_acc:.2f} %), MACs -{100 * r.flops_reduction:.1f} %, "
              f"recovery {r.recover_s:.0f} s", flush=True)
    return {"name": name, "arch": MODELS[name][0], "dataset": dataset, "train_s": train_s,
            "float_accuracy": float_acc, "synthesis_s": synthesis_s, "rows": rows}


def prune_markdown(models: list[dict], args, env, command) -> str:
    lines = env_markdown(env, "channel pruning without data", command)
    lines += [f"50 % of the MACs removed by channel pruning (Torch-Pruning's dependency graph, local pruning in "
              f"steps until at least half the MACs are gone), scored on {args.prune_n} images; recovery: "
              f"{args.recover_epochs} epochs of KD (τ 4, SGD 0.01 cosine, batches of 64, "
              + (f"random rotation up to {args.rotate:g}° and zoom by up to {args.scale:g}, then "
                 if args.rotate or args.scale else "")
              + "pad-crop 4) from the "
              "unpruned model on the same images"
              + (f", plus {args.feature_weight:g} x the mean squared difference of the BatchNorm outputs on the "
                 "kept channels (feature_weight)" if args.feature_weight else "")
              + f". DeepInversion: preset auto, {args.di_iterations} steps on "
              "batches of 256. Accuracy on the whole test split, %.", "",
              "| model | float | " + " | ".join(r[0] for r in PRUNE_ROWS) + " | MACs before → after | "
              "params before → after | DI synthesis s | recovery s (taylor, DI) |",
              "|---|---:|" + "---:|" * len(PRUNE_ROWS) + "---|---|---:|---:|"]
    for m in models:
        rows = {r["row"]: r for r in m["rows"]}
        ref = rows["taylor, DI"]
        lines.append(f"| {m['name']} | {m['float_accuracy']:.2f} | "
                     + " | ".join(f"{rows[r[0]]['accuracy']:.2f} ({-rows[r[0]]['drop_vs_float']:+.2f})"
                                  for r in PRUNE_ROWS)
                     + f" | {ref['macs_before']:,} → {ref['macs_after']:,} (−{100 * ref['flops_reduction']:.1f} %)"
                     f" | {ref['params_before']:,} → {ref['params_after']:,} | {m['synthesis_s']:.0f} | "
                     f"{ref['recover_s']:.0f} |")
    worst = max(next(r["drop_vs_float"] for r in m["rows"] if r["row"] == "taylor, DI") for m in models)
    lines += ["", "In brackets: the change against the float model, points. Goal: 50 % of the FLOPs pruned with at "
                  "most 2 points lost on MNIST-scale models using synthetic images alone. Largest loss of "
                  f"\"taylor, DI\" over the models: {worst:.2f} points."]
    lines += _read_back_line(models, args.prune_dir)
    if args.note:
        lines += ["", f"Note: {args.note}"]
    return "\n".join(lines) + "\n"


def prune_budget_rows(name: str, args) -> dict:
    """Taylor pruning recovered on the first n of one draw of DeepInversion (and of real) images, for each n of
    ``--budget-n``, every n with the same ``--recover-steps`` of distillation (epochs = steps x 64 / n). Kept in
    ``--budget-dir`` once a model is done, so a rerun (or the invocation that writes the record after models run
    in parallel processes) reads it back."""
    return _kept(args.budget_dir, name, {"budget_n": args.budget_n, "recover_steps": args.recover_steps},
                 lambda: _prune_budget_run(name, args))


def _prune_budget_run(name: str, args) -> dict:
    """One model's budget rows (its settings, ``budget_n`` and ``recover_steps``, are added by :func:`_kept`)."""
    model, mean, std, train_s, dataset, x_test, y_test, x_train, float_acc = _model_and_data(name, args)
    largest = max(args.budget_n)
    t0 = time.perf_counter()
    di = synthetic_images(model, SHAPE, mean=mean, std=std, n=largest, seed=0, iterations=args.di_iterations,
                          batch_size=256, progress=False)
    synthesis_s = time.perf_counter() - t0
    real = x_train[torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(0))[:largest]]
    rows = []
    for n in args.budget_n:
        epochs = args.recover_steps * 64 // n
        for label, images in (("taylor, DI", di), ("taylor, real (ceiling)", real)):
            r = prune_without_data(model, SHAPE, mean, std, images=images[:n], importance="taylor", feature_weight=0.0,
                                   flops_ratio=0.5, recover_epochs=epochs, seed=0, progress=False)
            acc = 100 * evaluate(r.model, x_test, y_test)
            rows.append({"row": label, "n": n, "recover_epochs": epochs, "accuracy": acc,
                         "drop_vs_float": float_acc - acc, "macs_before": r.macs_before, "macs_after": r.macs_after,
                         "flops_reduction": r.flops_reduction, "recover_s": r.recover_s})
            print(f"  {name} n={n} {label}: {acc:.2f} % (float {float_acc:.2f} %), {epochs} epochs, "
                  f"recovery {r.recover_s:.0f} s", flush=True)
    return {"name": name, "arch": MODELS[name][0], "dataset": dataset, "train_s": train_s,
            "float_accuracy": float_acc, "synthesis_s": synthesis_s, "synthesis_n": largest, "rows": rows}


def prune_budget_markdown(models: list[dict], args, env, command) -> str:
    lines = env_markdown(env, "channel pruning without data: the images budget", command)
    lines += [f"How many images the data-free pruning needs: 50 % of the MACs removed by Taylor scores on the first "
              f"n images of one draw of {max(args.budget_n)} DeepInversion images (preset auto, {args.di_iterations} "
              f"steps on batches of 256), then recovered by KD from the unpruned model on the same n images, every n "
              f"with the same {args.recover_steps} SGD steps (τ 4, lr 0.01 cosine, batches of 64, pad-crop 4; "
              "epochs = steps × 64 / n); the ceiling prunes and recovers on the first n of one random draw of real "
              "training images. Accuracy on the whole test split, %; in brackets the change against the float "
              "model, points. Nothing here was chosen on the test split: every budget run is shown.", "",
              "| model | float | n | epochs | taylor, DI | taylor, real (ceiling) | DI − real | recovery s (DI) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        for n in m["budget_n"]:
            di = next(r for r in m["rows"] if r["n"] == n and r["row"] == "taylor, DI")
            real = next(r for r in m["rows"] if r["n"] == n and r["row"] == "taylor, real (ceiling)")
            lines.append(f"| {m['name']} | {m['float_accuracy']:.2f} | {n} | {di['recover_epochs']} | "
                         f"{di['accuracy']:.2f} ({-di['drop_vs_float']:+.2f}) | "
                         f"{real['accuracy']:.2f} ({-real['drop_vs_float']:+.2f}) | "
                         f"{di['accuracy'] - real['accuracy']:+.2f} | {di['recover_s']:.0f} |")
    lines += ["", "DeepInversion synthesis: " + ", ".join(
        f"{m['name']} {m['synthesis_n']} images in {m['synthesis_s']:.0f} s" for m in models) + "."]
    lines += _read_back_line(models, args.budget_dir)
    if args.note:
        lines += ["", f"Note: {args.note}"]
    return "\n".join(lines) + "\n"

#: prune-study: the DeepInversion draws' images, the n-th of seed n - 1
DRAW_SOURCES = ("di", "di2", "di3", "di4")
#: prune-study: their union (4n images)
ALL_DRAWS = "+".join(DRAW_SOURCES)
#: prune-study variants: (label, score images, recovery images, recovery changes). Images: "di" (the record's
#: DeepInversion draw), "di2", "di3", "di4" (the second to fourth draws: seeds 1 to 3), "adi" (Adaptive
#: DeepInversion, DeepInversion §4.3's competition round: a draw against the first row's pruned and recovered
#: network, competition weight 10), "real", "zeroq", "data-impressions", joined by "+" for a union; a
#: DeepInversion draw with "@K" (e.g. "di@1000", "di2@2000") is that draw at K synthesis steps (records made
#: before 2026-11-28 name "di@1000" "di1000"). Changes: distill's keywords, plus "steps_x" (times the record's
#: steps), "seed", and "features": the weight of the feature term on the kept channels' BatchNorm outputs
#: (prune_without_data's feature_weight).
STUDY = (
    ("the prune record's recipe", "di", "di", {}),
    ("the same, recovery seed 1", "di", "di", {"seed": 1}),
    ("the same, recovery seed 2", "di", "di", {"seed": 2}),
    ("DI scores, real recovery", "di", "real", {}),
    ("real scores, DI recovery", "real", "di", {}),
    ("real scores, real recovery (ceiling)", "real", "real", {}),
    ("4x the recovery steps", "di", "di", {"steps_x": 4}),
    ("4x the recovery steps, real (ceiling)", "real", "real", {"steps_x": 4}),
    ("τ 1", "di", "di", {"temperature": 1.0}),
    ("τ 20", "di", "di", {"temperature": 20.0}),
    ("L1 on logits", "di", "di", {"loss": "l1"}),
    ("lr 0.05", "di", "di", {"lr": 0.05}),
    ("mixup α 0.2", "di", "di", {"mixup": 0.2}),
    ("rotate 15°, scale 0.15", "di", "di", {"rotate": 15.0, "scale": 0.15}),
    ("horizontal flips", "di", "di", {"flip": True}),
    ("DI of 1000 synthesis steps", "di@1000", "di@1000", {}),
    ("ZeroQ's distilled data for recovery", "di", "zeroq", {}),
    ("Data Impressions for recovery", "di", "data-impressions", {}),
    ("DI + ZeroQ for recovery (2n images)", "di", "di+zeroq", {}),
    ("DI + a second DI draw (2n images)", "di", "di+di2", {}),
    ("DI + Adaptive DI against the recipe's student (2n images)", "di", "di+adi", {}),
    ("BN outputs of the kept channels matched too (β 10)", "di", "di", {"features": 10.0}),
    ("the same, 4x the recovery steps", "di", "di", {"features": 10.0, "steps_x": 4}),
    ("the same, DI of 1000 synthesis steps", "di@1000", "di@1000", {"features": 10.0}),
    ("the same, real recovery", "di", "real", {"features": 10.0}),
    ("the same, real scores", "real", "di", {"features": 10.0}),
    ("a second DI draw", "di2", "di2", {}),
    ("a third DI draw", "di3", "di3", {}),
    ("a fourth DI draw", "di4", "di4", {}),
    ("β 10, a second DI draw", "di2", "di2", {"features": 10.0}),
    ("β 10, a third DI draw", "di3", "di3", {"features": 10.0}),
    ("β 10, a fourth DI draw", "di4", "di4", {"features": 10.0}),
    ("β 10, the four DI draws together (4n images)", ALL_DRAWS, ALL_DRAWS, {"features": 10.0}),
    ("β 10, the four draws together, 4x the recovery steps", ALL_DRAWS, ALL_DRAWS,
     {"features": 10.0, "steps_x": 4}),
    ("β 10, DI of 2000 synthesis steps (prune_without_data's default)", "di@2000", "di@2000", {"features": 10.0}),
    ("β 10, DI of 2000 steps, a second draw", "di2@2000", "di2@2000", {"features": 10.0}),
    ("β 10, DI of 2000 steps, a third draw", "di3@2000", "di3@2000", {"features": 10.0}),
    ("β 10, DI of 2000 steps, a fourth draw", "di4@2000", "di4@2000", {"features": 10.0}),
    ("β 10, DI of 2000 steps, 4x the recovery steps", "di@2000", "di@2000", {"features": 10.0, "steps_x": 4}),
    *((f"β 10, DI of 2000 steps{which}, rotate 15° and scale 0.15", f"{d}@2000", f"{d}@2000",
       {"features": 10.0, "rotate": 15.0, "scale": 0.15})
      for d, which in zip(DRAW_SOURCES, ("", ", a second draw", ", a third draw", ", a fourth draw"))),
)
#: prune-study: the labels of the rows that score and recover on one draw and change nothing else: logits only,
#: with the feature term, with it on DeepInversion of 2000 steps, and there with the recovery's rotation and zoom
DRAWS = {kind: tuple(label for label, score, recover, changes in STUDY
                     if score == recover and score in [d + at for d in DRAW_SOURCES] and changes == only)
         for kind, only, at in (("logits only", {}, ""), ("β 10", {"features": 10.0}, ""),
                                ("β 10 on DI of 2000 steps", {"features": 10.0}, "@2000"),
                                ("β 10 on DI of 2000 steps with rotate 15° and scale 0.15",
                                 {"features": 10.0, "rotate": 15.0, "scale": 0.15}, "@2000"))}


def prune_study_rows(name: str, args) -> dict:
    """The :data:`STUDY` rows for model ``name``, on its validation model; kept in ``--study-dir`` (:func:`_kept`)."""
    settings = {"prune_n": args.prune_n, "recover_epochs": args.recover_epochs, "di_iterations": args.di_iterations,
                "holdout": args.holdout, "variants": [STUDY[i][0] for i in _study_rows(name, args)]}
    return _kept(args.study_dir, name, settings, lambda: _prune_study_run(name, args))


#: prune-study: the rows run by default on the deeper models (all of STUDY on the LeNets), where a row takes
#: minutes on the CPU (2 threads: DeepInversion's 512 images 6 min at 200 steps on the slim ResNet-18, 9 min at
#: 1000 on MobileNetV2; a recovery 3 min): the recipe, the feature term, and on the ResNets the real-recovery
#: control, on MobileNetV2 the feature term on DeepInversion of 1000 steps
STUDY_QUICK = {"resnet18_slim-mnist": (0, 3, 21), "resnet18_slim-fmnist": (0, 3, 21),
               "mobilenet_v2-fmnist": (0, 21, 23)}


def _study_rows(name: str, args) -> list[int]:
    """The indices into :data:`STUDY` run on model ``name``: ``--study-rows``, else :data:`STUDY_QUICK`'s, else
    all."""
    if args.study_rows is not None:
        return list(args.study_rows)
    return list(STUDY_QUICK.get(name, range(len(STUDY))))


def _prune_study_run(name: str, args) -> dict:
    dataset = MODELS[name][1]
    model, mean, std, train_s = trained_model(name, args.model_dir, holdout=args.holdout)
    x_train, y_train = mnist_tensors("train", dataset=dataset)
    x_val, y_val = x_train[-args.holdout:], y_train[-args.holdout:]
    x_fit = x_train[: -args.holdout]
    n = args.prune_n
    synthesis_s = {}

    def make(source: str) -> torch.Tensor:
        t0 = time.perf_counter()
        if source == "real":
            return x_fit[torch.randperm(x_fit.shape[0], generator=torch.Generator().manual_seed(0))[:n]]
        base, _, steps = source.partition("@")
        if base in (*DRAW_SOURCES, "adi"):
            if base == "adi" and not first_pruned:
                raise ValueError("prune-study: an 'adi' row needs the recipe row (the first) run before it")
            options = {"competitor": first_pruned[0], "competition_weight": 10.0} if base == "adi" else None
            seed = DRAW_SOURCES.index(base) if base in DRAW_SOURCES else int(base == "adi")
            x = synthetic_images(model, SHAPE, mean=mean, std=std, n=n, seed=seed,
                                 batch_size=256, progress=False, options=options,
                                 iterations=int(steps) if steps else args.di_iterations)
        else:  # seed 1: a draw of its own, not the DeepInversion draw's seed
            x = synthetic_images(model, SHAPE, mean=mean, std=std, method=source, n=n, seed=1, progress=False)
        synthesis_s[source] = time.perf_counter() - t0
        return x

    cache, first_pruned, unrecovered = {}, [], {}

    def images(spec: str) -> torch.Tensor:
        for part in spec.split("+"):
            if part not in cache:
                cache[part] = make(part)
        return torch.cat([cache[p] for p in spec.split("+")])

    float_acc = 100 * evaluate(model, x_val, y_val)
    rows = []
    for label, score, recover, changes in (STUDY[i] for i in _study_rows(name, args)):
        changes = dict(changes)
        seed = changes.pop("seed", 0)
        feature_weight = changes.pop("features", 0.0)
        x_rec = images(recover)
        # prune_without_data's recovery (recover_epochs passes) on images of the variant's choice; a union of 2n
        # images gets half the passes, so every row but "steps_x" takes the record's number of steps
        steps = args.recover_epochs * -(-n // 64) * changes.pop("steps_x", 1)
        epochs = max(1, round(steps / -(-x_rec.shape[0] // 64)))
        kw = {"temperature": 4.0, "lr": 0.01, **changes}
        if score not in unrecovered:  # the pruning depends on the score images only: once per source
            unrecovered[score] = prune_without_data(model, SHAPE, mean, std, images=images(score),
                                                    importance="taylor", flops_ratio=0.5, recover_epochs=0, seed=0,
                                                    progress=False)
        r = unrecovered[score]
        r = dataclasses.replace(r, model=copy.deepcopy(r.model))
        if feature_weight:
            kw.update(features=batchnorm_features(r.model, model, r.channels), feature_weight=feature_weight)
        t0 = time.perf_counter()
        distill(r.model, x_rec, teacher=model, epochs=epochs, batch_size=64, schedule="cosine", generator=seed,
                fill=background(mean, std), **kw)
        recover_s = time.perf_counter() - t0
        acc = 100 * evaluate(r.model.eval(), x_val, y_val)
        first_pruned[:] = first_pruned or [r.model]
        if feature_weight:
            changes["features"] = feature_weight
        rows.append({"row": label, "scores": score, "recovery": recover, "changes": dict(changes, seed=seed),
                     "steps": epochs * -(-x_rec.shape[0] // 64), "accuracy": acc, "drop_vs_float": float_acc - acc,
                     "flops_reduction": r.flops_reduction, "recover_s": recover_s})
        print(f"  {name} {label}: {acc:.2f} % (float {float_acc:.2f} %), recovery {recover_s:.0f} s", flush=True)
    return {"name": name, "arch": MODELS[name][0], "dataset": dataset, "train_s": train_s, "holdout": args.holdout,
            "float_accuracy": float_acc, "synthesis_s": synthesis_s, "rows": rows}


def prune_study_markdown(models: list[dict], args, env, command) -> str:
    lines = env_markdown(env, "channel pruning without data: where the points go", command)
    lines += [f"A validation model for each: the bench's recipe trained on all but the last {args.holdout} training "
              f"images, which are the validation set (never scored or recovered on; the test split is not used). "
              f"50 % of the MACs removed by Taylor scores on {args.prune_n} images, then recovered by KD from the "
              "unpruned model; the prune record's recipe is DeepInversion images (preset auto, "
              f"{args.di_iterations} steps on batches of 256) for both, {args.recover_epochs} epochs "
              f"({args.recover_epochs * -(-args.prune_n // 64)} SGD steps) at τ 4, lr 0.01 cosine, batches of 64, "
              "pad-crop 4. Each other row changes one thing. Real images: a random draw of the training images "
              "the model was trained on. ZeroQ and Data Impressions: their presets, a draw of their own. "
              "Validation accuracy, %; in brackets the change against the record's recipe (seed 0), points.", ""]
    for m in models:
        rows = m["rows"]
        base = rows[0]["accuracy"]
        seeds = [r["accuracy"] for r in rows if r["row"].startswith(("the prune record", "the same, recovery seed"))]
        spread = (f"over {len(seeds)} recovery seeds {min(seeds):.2f}–{max(seeds):.2f} %" if len(seeds) > 1
                  else f"(one recovery seed) {seeds[0]:.2f} %")
        acc = {r["row"]: r["accuracy"] for r in rows}
        draws = []
        for kind, labels in DRAWS.items():
            if all(lb in acc for lb in labels):
                a = [acc[lb] for lb in labels]
                draws.append(f"{kind} {min(a):.2f}–{max(a):.2f} % (mean {sum(a) / len(a):.2f})")
        draws_line = f"; over {len(DRAWS['β 10'])} DeepInversion draws: " + ", ".join(draws) if draws else ""
        lines += [f"**{m['name']}**: float {m['float_accuracy']:.2f} % on validation; the record's recipe "
                  f"{spread}{draws_line}.", "",
                  "| variant | scores on | recovery on | steps | validation % | vs recipe | recovery s |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['row']} | {r['scores']} | {r['recovery']} | {r['steps']} | {r['accuracy']:.2f} "
                         f"({-r['drop_vs_float']:+.2f} vs float) | {r['accuracy'] - base:+.2f} | "
                         f"{r['recover_s']:.0f} |")
        lines += ["", "Synthesis: " + ", ".join(f"{k} {v:.0f} s" for k, v in m["synthesis_s"].items())
                  + f" ({args.prune_n} images each).", ""]
    lines += _read_back_line(models, args.study_dir)
    if args.note:
        lines += ["", f"Note: {args.note}"]
    return "\n".join(lines) + "\n"


#: --part -> (one model's results, the record's Markdown, the models run by default)
PARTS = {"quantize": (quantize_rows, quantize_markdown, tuple(MODELS)),
         "prune": (prune_rows, prune_markdown, tuple(MODELS)),
         "prune-budget": (prune_budget_rows, prune_budget_markdown, ("lenet5_bn-mnist", "lenet5_bn-fmnist")),
         "prune-study": (prune_study_rows, prune_study_markdown,
                         ("lenet5_bn-fmnist", "resnet18_slim-fmnist", "mobilenet_v2-fmnist"))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=tuple(PARTS), default="quantize")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                   help="default: all five (quantize, prune), the two LeNets (prune-budget), the three "
                        "Fashion-MNIST models (prune-study)")
    p.add_argument("--prune-n", type=int, default=512, help="images pruning scores and recovers on")
    p.add_argument("--feature-weight", type=float, default=10.0,
                   help="prune: prune_without_data's feature_weight (the recovery's BatchNorm-output term); "
                        "default 10, the library's; 0 is the logits-only recipe of compress_prune_logits_cpu")
    p.add_argument("--rotate", type=angle, default=0.0,
                   help="prune: prune_without_data's rotate, the recovery's random rotation in degrees (default 0)")
    p.add_argument("--scale", type=zoom_range, default=0.0,
                   help="prune: prune_without_data's scale, the recovery's random zoom range (default 0)")
    p.add_argument("--recover-epochs", type=int, default=100)
    p.add_argument("--budget-n", type=int, nargs="+", default=[512, 4096, 16384],
                   help="prune-budget: the image counts (each divides --recover-steps x 64)")
    p.add_argument("--recover-steps", type=int, default=6400, help="prune-budget: SGD steps of every recovery")
    p.add_argument("--budget-dir", default="runs/compress/budget", help="prune-budget: finished models' results")
    p.add_argument("--prune-dir", default="runs/compress/prune", help="prune: finished models' results")
    p.add_argument("--holdout", type=int, default=5000,
                   help="prune-study: the last training images kept out of its model, its validation set")
    p.add_argument("--study-dir", default="runs/compress/study", help="prune-study: finished models' results")
    p.add_argument("--study-rows", type=int, nargs="+", default=None,
                   help="prune-study: the rows to run, indices into STUDY starting with 0 (the recipe); default all "
                        "(STUDY_QUICK's on the ResNets and MobileNetV2)")
    p.add_argument("--n", type=int, default=128, help="calibration images of each source")
    p.add_argument("--di-iterations", type=int, default=200)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model-dir", default="runs/compress/models")
    p.add_argument("--note", default="", help="a line on how the record was made, kept in it")
    p.add_argument("--out", default=str(RESULTS), help="directory for the records ('' to not record)")
    p.add_argument("--record", default=None,
                   help="the record's name, without extension (default compress_<part>_cpu); another name keeps a "
                        "variant, e.g. one model at other settings, beside the part's record")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.makedirs(args.model_dir, exist_ok=True)
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    env = environment("cpu", "data-free compression")
    if args.part == "prune-budget":
        bad = [n for n in args.budget_n if n < 1 or (args.recover_steps * 64) % n]
        if bad:
            p.error(f"--budget-n: every n must divide --recover-steps x 64 = {args.recover_steps * 64}; got {bad}")
    if args.part == "prune-study" and args.study_rows is not None and (
            args.study_rows[0] != 0 or len(set(args.study_rows)) != len(args.study_rows)
            or not all(0 <= i < len(STUDY) for i in args.study_rows)):
        p.error(f"--study-rows: distinct indices into the {len(STUDY)} rows of STUDY (0 to {len(STUDY) - 1}), the "
                f"first 0 (the recipe, which the others are read against); got {args.study_rows}")
    if not (args.feature_weight >= 0 and args.feature_weight < float("inf")):
        p.error(f"--feature-weight: a finite weight >= 0 (0: logits only); got {args.feature_weight}")
    if args.record is not None and not re.fullmatch(r"[a-z0-9_]+", args.record):
        p.error(f"--record: a name of lower-case letters, digits and '_' (no extension); got {args.record!r}")
    if args.part == "prune-study" and args.holdout < 1:
        p.error(f"--holdout: prune-study validates on the last --holdout training images, so it must be >= 1; "
                f"got {args.holdout}")
    rows, markdown, default_models = PARTS[args.part]
    models = [rows(name, args) for name in args.models or default_models]
    env["wall_s"] = time.perf_counter() - t0
    argv_list = sys.argv[1:] if argv is None else list(argv)
    command = "python benches/bench_compress.py " + " ".join(argv_list)
    rec = {"env": env, "argv": argv_list, "part": args.part, "n": args.n, "di_iterations": args.di_iterations,
           "prune_n": args.prune_n, "recover_epochs": args.recover_epochs, "train": TRAIN, "models": models}
    if args.part == "prune":
        rec.update(feature_weight=args.feature_weight, rotate=args.rotate, scale=args.scale)
    if args.part == "prune-study":
        rec["holdout"] = args.holdout
    if args.part == "prune-budget":
        rec.update(budget_n=args.budget_n, recover_steps=args.recover_steps)
    if args.note:
        rec["note"] = args.note
    if args.out:
        name = args.record or f"compress_{args.part.replace('-', '_')}_cpu"
        record(args.out, name, rec, markdown(models, args, env, command))


if __name__ == "__main__":
    main()
