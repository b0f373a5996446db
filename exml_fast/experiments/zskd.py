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
from torch import nn

from exml_fast._utils.checks import check_choice, check_int
from exml_fast._utils.io import atomic_write
from exml_fast.checkpoint import load_model, save_model
from exml_fast.cl.scenarios import validation_indices
from exml_fast.data import DATASET_STATS, mnist_tensors
from exml_fast.experiments.budgets import ZSKD_BUDGETS
from exml_fast.experiments.records import machine, machine_line, seconds_or_lower_bound
from exml_fast.models import build_model
from exml_fast.synth import DATA_IMPRESSIONS_BETA, DataImpressions
from exml_fast.synth.base import teacher_fingerprint
from exml_fast.training import distill, evaluate, train_classifier

__all__ = ["PAPER_ZSKD", "ZSKD_NETWORKS", "lenet5_teacher", "read_teachers_run", "real_data_control", "reproduce_zskd",
           "zskd_teacher"]

#: Zero-shot KD with Data Impressions (Nayak et al., Table 1-2): dataset, DIs, paper teacher / student accuracy (%).
PAPER_ZSKD: dict[str, dict[str, Any]] = {
    "zskd-mnist": {"dataset": "mnist", "n": 24000, "teacher": 99.34, "student": 98.77},
    "zskd-fmnist": {"dataset": "fashion-mnist", "n": 48000, "teacher": 90.84, "student": 79.62},
}


#: The KD's weight decay of every record made before the networks could set it (and of the controls' file names).
_KD_WEIGHT_DECAY = 5e-4

#: The networks a zero-shot KD reproduction uses, with their inputs and the teacher's recipe.
#: "paper": the Data Impressions paper's (§4.1.2.1): :class:`~exml_fast.models.LeNet5ZSKD` → :class:`~exml_fast.models.
#: LeNet5HalfZSKD` (61 706 → 35 820 parameters), MNIST resized to 32x32 with pixels in [0, 1]; the teacher is
#: trained on the training split minus ``validation_size`` held-out images, SGD lr 0.05 (momentum 0.9, weight decay
#: 5e-4) with a cosine decay and per-sample pad-crop 2 (our recipe: the paper gives none; it reaches the paper's
#: 99.3 % on MNIST). "exml": the records made before (the ExML paper's Tanh / average-pool LeNet-5 → the ExML
#: LeNet-5 with every layer halved, 61 706 → 15 738), MNIST padded to 32 and normalised, the teacher trained on
#: the whole training split with the ExML expert recipe (SGD lr 0.01 constant, no augmentation).
ZSKD_NETWORKS: dict[str, dict[str, Any]] = {
    "paper": {"teacher": "lenet5_zskd", "student": "lenet5_half_zskd", "resize": True, "normalize": False,
              "teacher_lr": 0.05, "teacher_schedule": "cosine", "teacher_pad_crop": 2, "validation_size": 5000,
              "synth_lr": 0.01, "synth_space": "dataset", "synth_tau": {"mnist": 5.0, "fashion-mnist": 3.0},
              "synth_iterations": 1500, "synth_tv_l2": {"mnist": 1e-4, "fashion-mnist": 0.0},
              "synth_beta": {"mnist": (10.0, 1.0), "fashion-mnist": DATA_IMPRESSIONS_BETA}, "kd_lr": 0.01,
              "kd_warmup": 500, "kd_mixup": 0.0, "kd_epochs": 200,
              "kd_rotate": {"mnist": 15.0, "fashion-mnist": 0.0}, "kd_scale": {"mnist": 0.1, "fashion-mnist": 0.0},
              "kd_weight_decay": _KD_WEIGHT_DECAY, "teacher_epochs": 20},
    "exml": {"teacher": "lenet5", "student": "lenet5_half", "resize": False, "normalize": True,
             "teacher_lr": 0.01, "teacher_schedule": "constant", "teacher_pad_crop": 0, "validation_size": None,
             "synth_lr": None, "synth_space": "input", "synth_tau": 20.0, "synth_iterations": None, "synth_tv_l2": 0.0,
             "synth_beta": DATA_IMPRESSIONS_BETA,
             "kd_lr": 0.05, "kd_warmup": 0, "kd_mixup": 0.0, "kd_epochs": None, "kd_rotate": 0.0, "kd_scale": 0.0,
             "kd_weight_decay": _KD_WEIGHT_DECAY, "teacher_epochs": None},
}
#: The rest of a "paper" networks' recipe, chosen on the validation split at 2400 DIs
#: (benches/results/zskd_di_study_cpu.md): the DIs are optimised in the dataset's normalised coordinates
#: (``synth_space="dataset"``: they start as N(0, 1) there, i.e. pixels of MNIST's mean and spread, and the
#: teacher sees them as pixels), Adam at lr 0.01 whatever the budget says (0.05 saturates most pixels at 0 or 1
#: against these ReLU networks), and the KD at SGD lr 0.01 (at 0.05 the ReLU student dies in its first steps
#: on DIs) warmed up linearly over its first ``kd_warmup`` steps (without it the student died at lr 0.01 too, for
#: one KD seed in three). ``synth_tau``: the temperature of the DIs' targets (the KD stays at τ 20): the paper's
#: τ 20 asks this teacher (its largest logit on real images: about 13) for logit gaps of about 74 to reach a
#: Dirichlet draw of max 0.8, so the DIs saturate and miss their targets; at τ 5 the same draw asks for about 18
#: and the student gains 10 points at 2400 DIs; Fashion-MNIST's teacher has smaller logits (about 9) and its
#: validation split picks τ 3 (by 2.6 points over τ 5, within the KD's noise: benches/results/
#: zskd_di_study_fmnist_cpu.md). A number or one per dataset. ``synth_iterations``: the DIs' steps whatever the
#: budget but "smoke" (the τ 5 recipe was chosen at the paper's 1500). ``teacher_epochs``: the teacher's epochs
#: whatever the budget but "smoke" (20: the teacher at the paper's accuracy, about 3 min on 2 cores).
#: ``kd_epochs``: the KD's epochs whatever the budget but "smoke"; ``kd_mixup``: ``distill``'s mixup α (0: none),
#: for the student on DIs and its real-data control alike. The paper networks' 200 epochs were chosen at the
#: paper's 24000 DIs over three KD seeds on the validation split (benches/results/zskd_di_study_cpu_n24000.md):
#: 98.19 % against 97.86 % for 100; mixup α 1 added 0.12 points there, within the seeds' spread, and cost 1.3
#: points at 2400 DIs (zskd_di_study_cpu.md), so it stays off. None: the budget's. ``kd_weight_decay``: the KD's
#: weight decay, for the student on DIs and its control alike (a number or one per dataset): 5e-4. 1e-4 lifted every
#: KD seed on Fashion-MNIST's 9600 DIs (mean +2.8 points on validation: zskd_di_study_fmnist_cpu_n9600.md, note 1)
#: but not MNIST's 24000 (-0.5: zskd_di_study_cpu_n24000.md, note 4); Fashion-MNIST's record is made at 48000 DIs,
#: where 1e-4 is not measured yet. ``synth_tv_l2``: the weight of an l2 total-variation prior on the DIs (the paper
#: has none; a number or one per dataset). On MNIST 1e-4 was chosen before any KD, by screening 800 DIs a weight
#: for the one that makes them as smooth as the validation images (their mean squared neighbour-pixel difference:
#: 0.040 at 1e-4, against 0.22 without the prior), then confirmed over four KD seeds at 24000 DIs on the validation
#: split: 98.45 % against 98.18 % without it, every seed level or higher (benches/results/
#: zskd_di_study_cpu_n24000.md, note 13). Fashion-MNIST keeps 0: at 2400 DIs its weights were within one KD seed's
#: noise of each other (zskd_di_study_fmnist_cpu.md, note 3). The paper record (``--kd-seeds 4``) confirms it on its own
#: teacher: 98.30 % on validation against 97.71 % for the same four KD seeds on prior-free DIs (zskd_mnist_tv0.md).
#: ``kd_rotate``, ``kd_scale``: each DI (and control image) of the KD also rotated by up to this many degrees and
#: zoomed by a factor in [1 - scale, 1 + scale] (``distill``'s ``rotate`` and ``scale``; a number or one per
#: dataset), the paper's rotation and scaling. On MNIST 15 and 0.1, chosen on the validation split at 24000 DIs, on
#: two teachers and their DIs: 98.44 % against 98.36 % for the same four KD seeds with the prior
#: (benches/results/zskd_di_study_cpu_n24000_tv.md, note 1), and 98.27 % (three KD seeds) against 98.19 % (five)
#: without it (zskd_di_study_cpu_n24000.md, note 8): a lead within the seeds' spread both times, for the paper's own
#: augmentation; mixup on the prior's DIs: 98.24 %. At 2400 DIs they were level (zskd_di_study_cpu.md).
#: Fashion-MNIST's are not measured at its budget: 0. ``synth_beta``: the β of the Dirichlet mixture the DIs'
#: targets are drawn from (the paper's: (1.0, 0.1); a pair or one per dataset). On MNIST (10, 1), targets nearer
#: each class's similarity row, chosen on the validation split at 24000 DIs on two teachers and their DIs: 98.52 %
#: against 98.44 % for the same four KD seeds with the prior and the rotation and zoom
#: (benches/results/zskd_di_study_cpu_n24000_tv.md, note 2), 98.31 % (four KD seeds) against 98.19 % (five)
#: without them (zskd_di_study_cpu_n24000.md): a lead within the seeds' spread both times. Fashion-MNIST's is not
#: measured at its budget: the paper's.


def _for_dataset(value: Any, dataset: str) -> Any:
    """A :data:`ZSKD_NETWORKS` setting that is one value, or one per dataset (a dict keyed by dataset)."""
    return value[dataset] if isinstance(value, dict) else value


def _beta_text(beta: tuple[float, ...]) -> str:
    """A β mixture as the records write it: "1.0, 0.1" (the paper's), "10, 1"."""
    return "1.0, 0.1" if tuple(beta) == DATA_IMPRESSIONS_BETA else ", ".join(f"{b:g}" for b in beta)


def _decay(value: float) -> str:
    """A weight decay as the records write it: 5e-4, 1e-4, 0."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


class _FromNormalised(nn.Module):
    """``model`` taking pixels, seen from normalised coordinates: ``model(z * std + mean)``; its classifier is
    ``model``'s (Data Impressions read their class similarities from it)."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, mean, std
        self.classifier = model.classifier

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z * self.std + self.mean)


def zskd_teacher(path: pathlib.Path, x: torch.Tensor, y: torch.Tensor, *, arch: str, seed: int, epochs: int,
                 dataset: str, mean: float, std: float, device: torch.device, log, lr: float = 0.01,
                 schedule: str = "constant", pad_crop: int = 0, metadata: dict[str, Any] | None = None,
                 batch_size: int = 64, weight_decay: float = 5e-4, optimizer: str = "sgd"):
    """A zero-shot KD teacher (``arch``, 10 classes, one channel) in eval mode on ``device``: read back from
    ``path``, or initialised from ``seed``, trained on (x, y) and saved there with ``metadata``.

    The recipe: ``optimizer`` (``"sgd"`` with momentum 0.9, or ``"adam"``) at ``lr`` with ``schedule``, weight
    decay ``weight_decay``, batches of ``batch_size``, for ``epochs``; the defaults are our recipe, and another
    code's can be given (DAFL's and DFAD's teachers). ``pad_crop`` > 0 adds per-sample pad-and-crop by that many
    pixels (the background value is ``-mean/std``).
    """
    if path.exists():
        teacher, _ = load_model(path, map_location=device)
        return teacher.to(device).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = build_model(arch, num_classes=10, in_channels=1)
    teacher = teacher.to(device)
    t0 = time.perf_counter()
    if pad_crop:
        distill(teacher, x, labels=y, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                weight_decay=weight_decay, schedule=schedule, augment=True, pad_crop=pad_crop, max_shift=0,
                flip=False, fill=-mean / std, generator=seed)
    else:
        train_classifier(teacher, x, y, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,
                         weight_decay=weight_decay, optimizer=optimizer, generator=torch.Generator().manual_seed(seed))
    log(f"teacher {arch} trained on {y.shape[0]} images ({time.perf_counter() - t0:.0f} s)")
    save_model(teacher, path, arch=arch, num_classes=10, in_channels=1, input_shape=(1, 32, 32), mean=(mean,),
               std=(std,), metadata={"dataset": dataset, "epochs": epochs, "seed": seed, "lr": lr,
                                     "schedule": schedule, "pad_crop": pad_crop, "batch_size": batch_size,
                                     "weight_decay": weight_decay, "optimizer": optimizer, **(metadata or {})})
    return teacher.eval()


def lenet5_teacher(path: pathlib.Path, x: torch.Tensor, y: torch.Tensor, *, seed: int, epochs: int, dataset: str,
                   mean: float, std: float, device: torch.device, log, metadata: dict[str, Any] | None = None):
    """The ExML LeNet-5 teacher (:class:`~exml_fast.models.LeNet5`, the ExML expert recipe: SGD lr 0.01,
    momentum 0.9, weight decay 5e-4, batch 64): :func:`zskd_teacher` with ``arch="lenet5"``."""
    return zskd_teacher(path, x, y, arch="lenet5", seed=seed, epochs=epochs, dataset=dataset, mean=mean, std=std,
                        device=device, log=log, metadata=metadata)


def read_teachers_run(path: pathlib.Path, teacher: str | None, what: str, log) -> dict[str, Any] | None:
    """A student's run kept at ``path`` by an earlier invocation, or None where there is none to read back: no
    file, or (``teacher``: the fingerprint of the teacher in use, :func:`~exml_fast.synth.base.teacher_fingerprint`)
    one distilled from another teacher (a retrained or replaced teacher file) or before runs named theirs, which
    is then ``log``-ged and trained again rather than reported beside this teacher."""
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    if teacher is not None and run.get("teacher") != teacher:
        made = f"teacher {run['teacher'][:12]}" if run.get("teacher") else "a teacher it does not name"
        log(f"{what} at {path} was distilled from {made}, not this one ({teacher[:12]}): trained again")
        return None
    log(f"{what} read back from {path}")
    return run


def real_data_control(path: pathlib.Path, x: torch.Tensor, *, n: int, seed: int, kd, log,
                      teacher: str | None = None) -> dict[str, Any]:
    """The real-data control row of a zero-shot KD table, the ceiling its synthetic rows are read against.

    ``kd(inputs)`` trains the table's student (same initialisation and KD recipe as its synthetic rows) on
    ``inputs`` and returns ``(scores, seconds)``; it is called on ``min(n, len(x))`` images of ``x`` (a draw
    seeded by ``seed``; labels are never used). The result, ``{"n", "student": scores, "kd_s"}`` (and
    ``"teacher"``), is kept at ``path`` and read back from there by a rerun; ``teacher``, the fingerprint of the
    teacher ``kd`` distils (:func:`~exml_fast.synth.base.teacher_fingerprint`), is checked on that read: a
    control of another teacher is trained again (:func:`read_teachers_run`)."""
    if (control := read_teachers_run(path, teacher, "real-data control", log)) is not None:
        return control
    m = min(n, x.shape[0])
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:m]
    scores, seconds = kd(x[idx])
    control = {"n": m, "student": scores, "kd_s": seconds, **({"teacher": teacher} if teacher else {})}
    atomic_write(path, lambda f: f.write(json.dumps(control, indent=1).encode()))
    log("real-data control " + ", ".join(f"{k} {v:.2f} %" for k, v in scores.items()))
    return control


def _student(arch: str, seed: int, device: torch.device):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return build_model(arch, num_classes=10, in_channels=1).to(device)


def _scores(model, evaluation: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    return {name: 100 * evaluate(model, xs, ys) for name, (xs, ys) in evaluation.items()}


def reproduce_zskd(
    experiment: str,
    *,
    budget: str = "paper",
    seed: int = 0,
    kd_seeds: int = 1,
    networks: str = "paper",
    synth_tv_l2: float | None = None,
    out: str | os.PathLike | None = None,
    results: str | os.PathLike | None = "benches/results",
    device: torch.device | str = "cpu",
    data_root: str | os.PathLike | None = None,
    progress: bool = False,
    command: str | None = None,
    log=None,
) -> dict[str, Any]:
    """Zero-shot KD with Data Impressions: a LeNet-5 teacher → a LeNet-5-Half student trained only on DIs.

    1. The teacher (``networks``: :data:`ZSKD_NETWORKS`; "paper" is the Data Impressions paper's pair) is
       trained on the training split (minus the held-out validation images, if the networks hold some out), or
       read back from ``out``.
    2. ``n`` Data Impressions (the networks' β mixture and synthesis τ for the dataset, the budget's
       synthesis settings unless the networks set their own) are synthesised into resumable shards under ``out``.
    3. The student learns only from them with the KD loss at τ 20 (SGD, cosine, the networks' ``kd_lr``;
       per-sample pad-crop 4 and ±1 px roll with a black background, and the networks' rotation and zoom where
       they set them) and is scored on the validation and test
       splits, once for each of ``kd_seeds`` KD seeds (KD seed k: the student initialised from seed + 1 + k, its
       batches and augmentation drawn from seed + k; k = 0 is the single run of ``kd_seeds=1``). Each KD seed's
       scores are kept under ``out`` and read back by a rerun; with several, the record adds their mean and
       standard deviation, the figure to read (on MNIST's paper record, KD seeds of the same DIs lie up to 0.66
       points apart on validation without the prior, 0.32 with it).
    4. The **real-data control**: the same student (same initialisation) and KD recipe on ``n`` real training
       images — the ceiling the DI row is read against. Kept under ``out`` once done.

    ``synth_tv_l2``: the weight of the DIs' l2 total-variation prior in place of the networks' (None: theirs), e.g.
    0 for the paper's prior-free DIs; their DIs and students are kept apart, and their record is named for it.

    Writes ``<results>/<experiment>.{json,md}`` (``_<budget>`` appended unless "paper", then ``_exml_nets`` for
    ``networks="exml"``, then ``_tv<weight>`` for a ``synth_tv_l2`` other than the networks') with the paper's
    numbers beside ours. Returns the record.
    """

    check_choice(experiment, "experiment", "reproduce", PAPER_ZSKD)
    check_choice(budget, "budget", "reproduce", ZSKD_BUDGETS)
    check_choice(networks, "networks", "reproduce", ZSKD_NETWORKS)
    check_int(kd_seeds, "kd_seeds", "reproduce", low=1)
    if synth_tv_l2 is not None and (isinstance(synth_tv_l2, bool) or not isinstance(synth_tv_l2, (int, float))
                                    or not synth_tv_l2 >= 0 or synth_tv_l2 == float("inf")):
        raise ValueError(f"reproduce: synth_tv_l2 must be a finite number >= 0 or None; got {synth_tv_l2!r}")
    log = log or (lambda line: print(line, flush=True))
    paper, spec, nets = PAPER_ZSKD[experiment], ZSKD_BUDGETS[budget], ZSKD_NETWORKS[networks]
    dataset, n = paper["dataset"], spec["n"] or paper["n"]
    device = torch.device(device)
    out = pathlib.Path(out if out is not None else f"runs/reproduce/{experiment}") / budget
    if networks != "exml":
        out = out / networks
    t_start = time.perf_counter()
    where = machine(device)  # the commit the work starts from
    mean, std = DATASET_STATS[dataset] if nets["normalize"] else (0.0, 1.0)
    x, y = mnist_tensors("train", dataset=dataset, pad_to=32, normalize=nets["normalize"], resize=nets["resize"],
                         root=data_root)
    if spec.get("max_train"):
        x, y = x[: spec["max_train"]], y[: spec["max_train"]]
    xt, yt = mnist_tensors("test", dataset=dataset, pad_to=32, normalize=nets["normalize"], resize=nets["resize"],
                           root=data_root)
    evaluation = {"test": (xt, yt)}
    validation_size = nets["validation_size"] and spec.get("validation_size", nets["validation_size"])
    if validation_size:
        held = torch.zeros(y.shape[0], dtype=torch.bool)
        held[validation_indices(y.shape[0], validation_size)] = True
        evaluation = {"validation": (x[held], y[held]), "test": (xt, yt)}
        x, y = x[~held], y[~held]
    say = lambda line: log(f"[reproduce] {experiment}: {line}")  # noqa: E731

    # the networks' own teacher epochs and DI steps, where they set them, at every budget but "smoke"
    own = lambda key: nets[key] if nets[key] and budget != "smoke" else spec[key]  # noqa: E731
    teacher_epochs = own("teacher_epochs")
    teacher = zskd_teacher(out / f"teacher_{nets['teacher']}_seed{seed}_ep{teacher_epochs}.pt", x, y,
                           arch=nets["teacher"], seed=seed, epochs=teacher_epochs, dataset=dataset,
                           mean=mean, std=std, device=device, log=say, lr=nets["teacher_lr"],
                           schedule=nets["teacher_schedule"], pad_crop=nets["teacher_pad_crop"],
                           metadata={"validation_size": validation_size})
    teacher_acc = _scores(teacher, evaluation)
    say("teacher " + ", ".join(f"{k} {v:.2f} %" for k, v in teacher_acc.items()))

    synth_lr = nets["synth_lr"] or spec["synth_lr"]
    synth_tau = _for_dataset(nets["synth_tau"], dataset)
    synth_iterations = own("synth_iterations")
    if nets["synth_space"] == "dataset":  # optimise normalised images of the dataset's statistics, see pixels
        s_mean, s_std = DATASET_STATS[dataset]
        synth_teacher = _FromNormalised(teacher, s_mean, s_std).eval()
    else:
        s_mean, s_std, synth_teacher = mean, std, teacher
    own_tv = _for_dataset(nets["synth_tv_l2"], dataset)
    synth_tv = own_tv if synth_tv_l2 is None else float(synth_tv_l2)
    synth_beta = tuple(float(b) for b in _for_dataset(nets["synth_beta"], dataset))
    synth = DataImpressions(synth_teacher, input_shape=(1, 32, 32), mean=s_mean, std=s_std, beta=synth_beta,
                            temperature=synth_tau, lr=synth_lr, jitter=2, flip=False, tv_l2_weight=synth_tv,
                            device=device)
    t0 = time.perf_counter()
    # DIs at τ 20 of the paper's β without a prior keep their folder; another τ, prior weight or β gets its own
    tag = (("" if synth_tau == 20.0 else f"_tau{synth_tau:g}") + (f"_tv{_decay(synth_tv)}" if synth_tv else "")
           + ("" if synth_beta == DATA_IMPRESSIONS_BETA else "_beta" + "_".join(f"{b:g}" for b in synth_beta)))
    dis = synth.synthesize(n, iterations=synth_iterations, batch_size=spec["synth_batch_size"],
                           generator=seed, progress=progress, save_to=out / f"dis_seed{seed}_n{n}{tag}")
    # every batch's time, whichever invocation made it (shards read back carry theirs); unknown for shards of
    # an older version, written without it: then this invocation's time, a lower bound
    t_synth, synth_incomplete = seconds_or_lower_bound(dis.seconds, t0)
    at_least = "≥ " if synth_incomplete else ""
    say(f"{n} Data Impressions ({at_least}{t_synth:.0f} s)")
    dis_x = dis.x if synth_teacher is teacher else (dis.x * s_std + s_mean).clamp_(0.0, 1.0)

    kd_epochs = own("kd_epochs")
    kd_wd = _for_dataset(nets["kd_weight_decay"], dataset)
    kd_rotate, kd_scale = _for_dataset(nets["kd_rotate"], dataset), _for_dataset(nets["kd_scale"], dataset)

    def kd(inputs: torch.Tensor, k: int = 0) -> tuple[dict[str, float], float]:
        """The student of KD seed ``k`` distilled on ``inputs``: its scores and seconds."""
        student = _student(nets["student"], seed + k, device)
        t = time.perf_counter()
        distill(student, inputs, teacher=teacher, temperature=20.0, epochs=kd_epochs, batch_size=64,
                lr=nets["kd_lr"], weight_decay=kd_wd, schedule="cosine", warmup=nets["kd_warmup"], augment=True,
                pad_crop=4, max_shift=1, flip=False, fill=-mean / std, mixup=nets["kd_mixup"], rotate=kd_rotate,
                scale=kd_scale, generator=seed + k)
        return _scores(student, evaluation), time.perf_counter() - t

    student_params = sum(p.numel() for p in _student(nets["student"], seed, device).parameters())
    recipe = (f"_warmup{nets['kd_warmup']}" if nets["kd_warmup"] else "") + (
        f"_mixup{nets['kd_mixup']:g}" if nets["kd_mixup"] else "") + (
        f"_rot{kd_rotate:g}_zoom{kd_scale:g}" if kd_rotate or kd_scale else "") + (
        f"_wd{_decay(kd_wd)}" if kd_wd != _KD_WEIGHT_DECAY else "")
    fingerprint = teacher_fingerprint(teacher)  # a student kept on disk belongs to the teacher it was distilled from
    runs = []  # one per KD seed, each kept on disk once done
    for k in range(kd_seeds):
        path = out / f"student_seed{seed}_kdseed{k}_n{n}{tag}_ep{kd_epochs}{recipe}.json"
        run = read_teachers_run(path, fingerprint, f"student on DIs, KD seed {k}", say)
        if run is None:
            scores, seconds = kd(dis_x, k)
            run = {"kd_seed": k, "student": scores, "kd_s": seconds, "teacher": fingerprint}
            atomic_write(path, lambda f, run=run: f.write(json.dumps(run, indent=1).encode()))
        runs.append(run)
        say(f"student on DIs, KD seed {k}: " + ", ".join(f"{s} {v:.2f} %" for s, v in run["student"].items())
            + f" (paper {paper['student']:.2f} %)")
    student_acc, t_kd = runs[0]["student"], sum(r["kd_s"] for r in runs)
    spread = {}
    if kd_seeds > 1:
        per_split = {s: torch.tensor([r["student"][s] for r in runs], dtype=torch.float64) for s in student_acc}
        spread = {"student_mean": {s: v.mean().item() for s, v in per_split.items()},
                  "student_std": {s: v.std().item() for s, v in per_split.items()}}
        say(f"student on DIs, mean of {kd_seeds} KD seeds: " + ", ".join(
            f"{s} {spread['student_mean'][s]:.2f} ± {spread['student_std'][s]:.2f} %" for s in student_acc))
    # a control of the KD recipe in use (KD seed 0)
    control = real_data_control(out / f"control_seed{seed}_n{n}_ep{kd_epochs}{recipe}.json", x, n=n,
                                seed=seed, kd=kd, log=say, teacher=fingerprint)

    teacher_params = sum(p.numel() for p in teacher.parameters())
    record = {"experiment": experiment, "budget": budget, "budget_detail": spec, "networks": networks,
              "networks_detail": {**nets, "teacher_params": teacher_params, "student_params": student_params,
                                  "teacher_epochs": teacher_epochs, "kd_epochs": kd_epochs,
                                  "kd_weight_decay": kd_wd, "kd_rotate": kd_rotate, "kd_scale": kd_scale},
              "seed": seed, "n_dis": n, "synth_lr": synth_lr, "synth_iterations": synth_iterations,
              "synth_tau": synth_tau, "synth_tv_l2": synth_tv, "synth_beta": list(synth_beta),
              "teacher_acc": teacher_acc["test"], "student_acc": student_acc["test"],
              "teacher": teacher_acc, "student": student_acc, "kd_seeds": runs, **spread, "control": control,
              "paper": paper,
              "synthesis_s": t_synth, "synthesis_s_incomplete": synth_incomplete,
              "kd_s": t_kd, "wall_s": time.perf_counter() - t_start,
              "command": command or " ".join(["exml-fast", *sys.argv[1:]]), "machine": where}
    if results is not None:
        stem = (experiment.replace("-", "_") + ("" if budget == "paper" else f"_{budget}")
                + ("" if networks == "paper" else f"_{networks}_nets")
                + ("" if synth_tv == own_tv else f"_tv{_decay(synth_tv)}"))
        folder = pathlib.Path(results)
        atomic_write(folder / f"{stem}.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
        atomic_write(folder / f"{stem}.md", lambda f: f.write(_markdown(record, at_least).encode()))
        log(f"[reproduce] wrote {folder / (stem + '.json')} and {folder / (stem + '.md')}")
    return record


#: What chose each dataset's synthesis τ, for the records' notes.
_TAU_EVIDENCE = {"mnist": "on MNIST's validation split, +10.6 points over τ 20 at 2400 DIs",
                 "fashion-mnist": "on Fashion-MNIST's validation split, +5.2 points over τ 20 at 2400 DIs, within "
                                  "the KD's noise: benches/results/zskd_di_study_fmnist_cpu.md"}


def _record_tau(record: dict[str, Any]) -> float:
    """The record's synthesis τ: its own, else (records made before it was kept) its networks', else 20."""
    tau = record.get("synth_tau", record["networks_detail"].get("synth_tau", 20.0))
    return _for_dataset(tau, record["paper"]["dataset"])


def _networks_not_budget(record: dict[str, Any], spec: dict[str, Any]) -> str:
    """" (the networks' lr and steps, not the budget's)", naming the synthesis settings the networks override."""
    own = [what for what, key in (("lr", "synth_lr"), ("steps", "synth_iterations"))
           if record.get(key, spec[key]) != spec[key]]
    return f" (the networks' {' and '.join(own)}, not the budget's)" if own else ""


def _markdown(record: dict[str, Any], at_least: str) -> str:
    paper, spec, nets = record["paper"], record["budget_detail"], record["networks_detail"]
    tau = _record_tau(record)
    tv = record.get("synth_tv_l2", 0.0)  # records made before the prior: none
    beta = tuple(record.get("synth_beta", DATA_IMPRESSIONS_BETA))  # records made before the option: the paper's
    splits = list(record["teacher"])
    head = " | ".join(f"{s} (%)" for s in splits)
    cells = lambda acc: " | ".join(f"{acc[s]:.2f}" for s in splits)  # noqa: E731
    inputs = "resized to 32x32, pixels in [0, 1]" if nets["resize"] else "padded to 32x32, normalised"
    # records made before the networks could set them: the budget's epochs, no mixup
    kd_epochs, mixup = nets.get("kd_epochs") or spec["kd_epochs"], nets.get("kd_mixup", 0.0)
    kd_wd = nets.get("kd_weight_decay", _KD_WEIGHT_DECAY)
    rotate, scale = nets.get("kd_rotate", 0.0), nets.get("kd_scale", 0.0)  # records made before: neither
    runs = record.get("kd_seeds", [])  # records made before: one KD seed, not kept apart
    lines = [
        f"# Reproduction: zero-shot KD with Data Impressions ({paper['dataset']})",
        "",
        f"- command: `{record['command']}`",
        f"- budget: **{record['budget']}** — {json.dumps(spec)}",
        f"- networks: **{record['networks']}** — teacher `{nets['teacher']}` ({nets['teacher_params']} parameters), "
        f"student `{nets['student']}` ({nets['student_params']} parameters); inputs {inputs}",
        f"- teacher recipe: SGD lr {nets['teacher_lr']} ({nets['teacher_schedule']}), momentum 0.9, weight decay "
        f"5e-4, batch 64, {nets['teacher_epochs']} epochs"
        + ("" if nets["teacher_epochs"] == spec["teacher_epochs"] else " (the networks' setting, not the budget's)")
        + (f", pad-crop {nets['teacher_pad_crop']}" if nets["teacher_pad_crop"] else ", no augmentation")
        + (f"; trained without the {nets['validation_size']} held-out validation images" if "validation" in
           record["teacher"] else "; trained on the whole training split"),
        f"- DIs: β ({_beta_text(beta)}), τ {tau:g}, Adam lr {record['synth_lr']} for "
        f"{record.get('synth_iterations', spec['synth_iterations'])} steps, 2 px jitter"
        + (f", l2 total-variation prior of weight {_decay(tv)}" if tv else "")
        + (", optimised in the dataset's normalised coordinates" if nets["synth_space"] == "dataset" else "")
        + _networks_not_budget(record, spec),
        f"- KD (every student row): τ 20, SGD lr {nets['kd_lr']} cosine"
        + (f" after a {nets['kd_warmup']}-step linear warm-up" if nets.get("kd_warmup") else "")
        + f", momentum 0.9, weight decay {_decay(kd_wd)}, batch 64, "
        f"{kd_epochs} epochs" + ("" if kd_epochs == spec["kd_epochs"] else " (the networks' setting, not the budget's)")
        + ", per-sample pad-crop 4 and ±1 px roll"
        + (f", rotation by up to {rotate:g} degrees and zoom by {1 - scale:g}-{1 + scale:g}" if rotate or scale else "")
        + (f", each augmented input mixed with another of its minibatch by a weight from Beta({mixup:g}, {mixup:g}) "
           "(mixup), the teacher labelling the mix" if mixup else "")
        + "; the final model is scored",
        machine_line(record["machine"]),
        f"- wall time of this invocation: {record['wall_s']:.0f} s (work already on disk is read back); synthesis "
        f"of the DIs: {at_least}{record['synthesis_s']:.0f} s, KD of the students on them: {record['kd_s']:.0f} s"
        + (f" ({len(runs)} KD seeds)" if len(runs) > 1 else "") + ", summed over the invocations that made them",
        "",
        f"| | {head} | paper (%) |",
        "|---|" + "---:|" * (len(splits) + 1),
        f"| teacher | {cells(record['teacher'])} | {paper['teacher']:.2f} |",
        f"| student on {record['n_dis']} DIs only{', KD seed 0' if len(runs) > 1 else ''} | "
        f"{cells(record['student'])} | {paper['student']:.2f} |",
        f"| control: the same student and KD on {record['control']['n']} real training images "
        f"| {cells(record['control']['student'])} | |",
    ]
    if len(runs) > 1:
        mean, std = record["student_mean"], record["student_std"]
        lines[-1:-1] = [f"| student on {record['n_dis']} DIs only, mean ± std of KD seeds 0-{len(runs) - 1} | "
                        + " | ".join(f"**{mean[s]:.2f}** ± {std[s]:.2f}" for s in splits) + " | |"]
        lines += ["", f"KD seed k initialises the student from seed {record['seed']} + 1 + k and draws its batches "
                  f"and augmentation from seed {record['seed']} + k (the same DIs and teacher for each; the control "
                  "is KD seed 0's). Per KD seed: "
                  + "; ".join(f"{r['kd_seed']}: " + ", ".join(f"{s} {r['student'][s]:.2f} %" for s in splits)
                              for r in runs) + "."]
    if record["networks"] == "paper":
        lines += ["", "Differences from the paper: its networks' layers follow its reference [9]'s public code "
                  "(ReLU, max-pooling; the parameter counts are the paper's); the paper gives no training recipe "
                  "for the teacher or the student beyond augmenting the DIs by scaling, translation, rotation and "
                  + ("flipping (we translate, rotate and zoom, and do not flip digits"
                     if rotate or scale else
                     "flipping (we translate only: rotation and zoom did not help on the validation split")
                  + (", and mix pairs of augmented DIs (mixup), which the paper does not" if mixup else "")
                  + "), and our DI and KD settings were chosen on MNIST's validation split "
                  "(benches/results/zskd_di_study_cpu.md"
                  + (", zskd_di_study_cpu_n24000.md" if mixup or nets.get("kd_epochs") else "")
                  + (", zskd_di_study_cpu_n24000_tv.md" if rotate or scale else "") + "); "
                  + (f"the DIs' targets are drawn at τ {tau:g}, not the paper's 20: at τ 20 they "
                     "ask this teacher for logit gaps far beyond its logits on real images, and the DIs saturate and "
                     f"miss them ({_TAU_EVIDENCE.get(paper['dataset'], 'see the study')}); "
                     if tau != 20.0 else "")
                  + (f"the DIs carry an l2 total-variation prior of weight {_decay(tv)}, which the paper's do not: "
                     "without it they are far rougher than digits (mean squared neighbour-pixel difference 0.22 "
                     "against the validation images' 0.040), and with it four KD seeds of the student gain 0.59 points "
                     "on validation over the same seeds on prior-free DIs of the same teacher, both before the KD's "
                     "rotation and zoom (benches/results/zskd_mnist_tv0.md against zskd_mnist_no_affine.md), 0.27 on "
                     "the study's teacher (zskd_di_study_cpu_n24000.md, note 13); "
                     if tv else "")
                  + (f"the DIs' Dirichlet targets are drawn with β ({_beta_text(beta)}), not the paper's (1.0, 0.1)"
                     + (": on the validation split the students of four KD seeds gained 0.08 points with it on the "
                        "prior's DIs (zskd_di_study_cpu_n24000_tv.md, note 2) and 0.12 on prior-free DIs of another "
                        "teacher (zskd_di_study_cpu_n24000.md), within the seeds' spread both times"
                        if beta == (10.0, 1.0) else "") + "; "
                     if beta != DATA_IMPRESSIONS_BETA else "")
                  + "its public code (CIFAR-10 only) trains the student with Adam on the DIs' stored soft labels "
                  "and reports the best epoch's test accuracy, we "
                  "report the final student's."]
    if record["budget"] != "paper":
        lines += ["", f"Budget `{record['budget']}` is not the paper's."]
    return "\n".join(lines) + "\n"
