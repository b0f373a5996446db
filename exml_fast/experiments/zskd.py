"""Zero-shot knowledge distillation from Data Impressions (Nayak et al., Tables 1-2):
``exml-fast reproduce zskd-mnist`` / ``zskd-fmnist``."""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any

import torch

from exml_fast._utils.checks import check_choice
from exml_fast._utils.io import atomic_write
from exml_fast.checkpoint import load_model, save_model
from exml_fast.data import DATASET_STATS, mnist_tensors
from exml_fast.experiments.budgets import ZSKD_BUDGETS
from exml_fast.experiments.records import machine, machine_line, seconds_or_lower_bound
from exml_fast.models import LeNet5, LeNet5Half
from exml_fast.synth import DataImpressions
from exml_fast.training import distill, evaluate, train_classifier

__all__ = ["PAPER_ZSKD", "lenet5_teacher", "reproduce_zskd"]

#: Zero-shot KD with Data Impressions (Nayak et al., Table 1-2): dataset, DIs, paper teacher / student accuracy (%).
PAPER_ZSKD: dict[str, dict[str, Any]] = {
    "zskd-mnist": {"dataset": "mnist", "n": 24000, "teacher": 99.34, "student": 98.77},
    "zskd-fmnist": {"dataset": "fashion-mnist", "n": 48000, "teacher": 90.84, "student": 79.62},
}


def lenet5_teacher(path: pathlib.Path, x: torch.Tensor, y: torch.Tensor, *, seed: int, epochs: int, dataset: str,
                   mean: float, std: float, device: torch.device, log, metadata: dict[str, Any] | None = None):
    """The LeNet-5 teacher of the zero-shot KD reproductions, in eval mode on ``device``: read back from
    ``path``, or initialised from ``seed``, trained on (x, y) with the ExML expert recipe (SGD lr 0.01,
    momentum 0.9, weight decay 5e-4, batch 64) for ``epochs`` and saved there with ``metadata``."""
    if path.exists():
        teacher, _ = load_model(path, map_location=device)
        return teacher.to(device).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = LeNet5(num_classes=10, in_channels=1)
    teacher = teacher.to(device)
    t0 = time.perf_counter()
    train_classifier(teacher, x, y, epochs=epochs, batch_size=64, lr=0.01,
                     generator=torch.Generator().manual_seed(seed))
    log(f"teacher trained on {y.shape[0]} images ({time.perf_counter() - t0:.0f} s)")
    save_model(teacher, path, arch="lenet5", num_classes=10, in_channels=1, input_shape=(1, 32, 32), mean=(mean,),
               std=(std,), metadata={"dataset": dataset, "epochs": epochs, "seed": seed, **(metadata or {})})
    return teacher.eval()


def reproduce_zskd(
    experiment: str,
    *,
    budget: str = "paper",
    seed: int = 0,
    out: str | os.PathLike | None = None,
    results: str | os.PathLike | None = "benches/results",
    device: torch.device | str = "cpu",
    data_root: str | os.PathLike | None = None,
    progress: bool = False,
    command: str | None = None,
    log=None,
) -> dict[str, Any]:
    """Zero-shot KD with Data Impressions: LeNet-5 teacher → LeNet-5-Half student trained only on DIs.

    1. The teacher (:class:`~exml_fast.models.LeNet5`, the ExML expert recipe: SGD lr 0.01, momentum
       0.9, weight decay 5e-4, batch 64) is trained on the dataset's training split, or read back.
    2. ``n`` Data Impressions (β mixture (1.0, 0.1), τ 20, per-sample 2 px jitter) are synthesised
       into resumable shards under ``out``.
    3. A LeNet-5-Half student learns only from them with the KD loss at τ 20 (SGD lr 0.05, cosine,
       per-sample pad-crop 4 and ±1 px roll with black padding) and is tested on the test split.

    Writes ``<results>/<experiment>.{json,md}`` (``_<budget>`` appended unless "paper") with the
    paper's numbers beside ours. Returns the record.
    """

    check_choice(experiment, "experiment", "reproduce", PAPER_ZSKD)
    check_choice(budget, "budget", "reproduce", ZSKD_BUDGETS)
    log = log or (lambda line: print(line, flush=True))
    paper, spec = PAPER_ZSKD[experiment], ZSKD_BUDGETS[budget]
    dataset, n = paper["dataset"], spec["n"] or paper["n"]
    device = torch.device(device)
    out = pathlib.Path(out if out is not None else f"runs/reproduce/{experiment}") / budget
    t_start = time.perf_counter()
    mean, std = DATASET_STATS[dataset]
    x, y = mnist_tensors("train", dataset=dataset, pad_to=32, root=data_root)
    if spec.get("max_train"):
        x, y = x[: spec["max_train"]], y[: spec["max_train"]]
    xt, yt = mnist_tensors("test", dataset=dataset, pad_to=32, root=data_root)

    teacher = lenet5_teacher(out / f"teacher_lenet5_seed{seed}_ep{spec['teacher_epochs']}.pt", x, y, seed=seed,
                             epochs=spec["teacher_epochs"], dataset=dataset, mean=mean, std=std, device=device,
                             log=lambda line: log(f"[reproduce] {experiment}: {line}"))
    teacher_acc = evaluate(teacher, xt, yt)
    log(f"[reproduce] {experiment}: teacher test accuracy {100 * teacher_acc:.2f} %")

    synth = DataImpressions(teacher, input_shape=(1, 32, 32), mean=mean, std=std, beta=(1.0, 0.1), temperature=20.0,
                            lr=spec["synth_lr"], jitter=2, flip=False, device=device)
    t0 = time.perf_counter()
    dis = synth.synthesize(n, iterations=spec["synth_iterations"], batch_size=spec["synth_batch_size"],
                           generator=seed, progress=progress, save_to=out / f"dis_seed{seed}_n{n}")
    # every batch's time, whichever invocation made it (shards read back carry theirs); unknown for shards of
    # an older version, written without it: then this invocation's time, a lower bound
    t_synth, synth_incomplete = seconds_or_lower_bound(dis.seconds, t0)
    at_least = "≥ " if synth_incomplete else ""
    log(f"[reproduce] {experiment}: {n} Data Impressions ({at_least}{t_synth:.0f} s)")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        student = LeNet5Half(num_classes=10, in_channels=1)
    student = student.to(device)
    t0 = time.perf_counter()
    distill(student, dis.x, teacher=teacher, temperature=20.0, epochs=spec["kd_epochs"], batch_size=64, lr=0.05,
            schedule="cosine", augment=True, pad_crop=4, max_shift=1, flip=False, fill=-mean / std,
            generator=seed)
    t_kd = time.perf_counter() - t0
    student_acc = evaluate(student, xt, yt)
    log(f"[reproduce] {experiment}: student test accuracy {100 * student_acc:.2f} % (paper {paper['student']:.2f} %)")
    record = {"experiment": experiment, "budget": budget, "budget_detail": spec, "seed": seed, "n_dis": n,
              "teacher_acc": 100 * teacher_acc, "student_acc": 100 * student_acc, "paper": paper,
              "synthesis_s": t_synth, "synthesis_s_incomplete": synth_incomplete,
              "kd_s": t_kd, "wall_s": time.perf_counter() - t_start,
              "command": command or " ".join(["exml-fast", *sys.argv[1:]]), "machine": machine(device)}
    if results is not None:
        stem = experiment.replace("-", "_") + ("" if budget == "paper" else f"_{budget}")
        folder = pathlib.Path(results)
        m = record["machine"]
        md = "\n".join([
            f"# Reproduction: zero-shot KD with Data Impressions ({dataset})",
            "",
            f"- command: `{record['command']}`",
            f"- budget: **{budget}** — {json.dumps(spec)}",
            machine_line(m),
            f"- wall time of this invocation: {record['wall_s']:.0f} s (KD {t_kd:.0f} s; work already on disk is "
            f"read back); synthesis of the DIs: {at_least}{t_synth:.0f} s, summed over the invocations that made them",
            "",
            "| | ours | paper |",
            "|---|---:|---:|",
            f"| teacher LeNet-5, test accuracy (%) | {record['teacher_acc']:.2f} | {paper['teacher']:.2f} |",
            f"| student LeNet-5-Half on {n} DIs only (%) | {record['student_acc']:.2f} | {paper['student']:.2f} |",
        ] + ([] if budget == "paper" else ["", f"Budget `{budget}` is not the paper's."])) + "\n"
        atomic_write(folder / f"{stem}.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
        atomic_write(folder / f"{stem}.md", lambda f: f.write(md.encode()))
        log(f"[reproduce] wrote {folder / (stem + '.json')} and {folder / (stem + '.md')}")
    return record
