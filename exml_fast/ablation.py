"""Ablation of Ex-Model Distillation on Split MNIST, and the named presets it selects.

``exml-fast reproduce exml-mnist-ablation --runs 3 --budget demo`` runs each
variant of :data:`VARIANTS` over ``runs`` independent expert streams (seeds
0, 1, ...) of Split MNIST NC and writes
``<results>/exml_mnist_ablation.{json,md}``: the mean ± std of the final
stream accuracy, the synthesis steps each variant spends, and its time.

Every variant keeps the ExML constraints — no data of the experiences, one
learner, a buffer of ``buffer_size`` samples, no expert kept after its
experience — except the "replay" row, Replay ED on real data, which is the
upper bound the synthetic generators are measured against.

Variants change one thing (or a few, named) relative to the paper's
Model-Inversion ED at the budget's settings:

- experts with BatchNorm (``lenet5_bn``), which give model inversion the
  statistics of the experts' training data to match (the paper's LeNet-5 has
  none, so its "BNS 1.0" does nothing);
- the BN term's weight (1, the paper's; 10 with the first layer ×10,
  DeepInversion's);
- Adaptive DeepInversion against the learner;
- the ED target (``slice``, the reference code; ``per_sample``, the
  paper's Eq. 8) and the logit normalisation;
- Data Impressions' β (10, the ExML paper; the mixture 1, 0.1 of the DI paper);
- the synthesis iterations.

A preset (:data:`PRESETS`) is a strategy plus run options;
``exml-fast run --preset NAME`` applies it under ``--config`` and the flags.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from exml_fast.metrics import _mean_std

__all__ = ["PRESETS", "VARIANTS", "Variant", "ablate_exml_mnist"]


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: a strategy, the experts' architecture, and run options over the budget's."""

    name: str
    strategy: str
    arch: str = "lenet5"
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


#: Named presets of ``exml-fast run --preset``: strategy, run options, and the expert architecture they
#: were chosen with (a preset runs on any experts; the BN terms need experts with BatchNorm).
PRESETS: dict[str, dict[str, Any]] = {
    "ed-best": {
        "strategy": "mi-ed",
        "arch": "lenet5_bn",
        "options": {"bn_weight": 1.0, "augment": False, "synth_iterations": 300, "synth_lr": 0.05},
        "note": "the best Split MNIST variant of benches/results/exml_mnist_ablation.md (mi-bn-no-augment): "
                "model inversion of BatchNorm experts matching their BN statistics (weight 1), distillation "
                "minibatches not augmented, 300 synthesis steps (a tenth of the paper's) at Adam lr 0.05",
    },
}

#: The ablation's rows, in the table's order.
VARIANTS: tuple[Variant, ...] = (
    Variant("mi", "mi-ed", note="Model-Inversion ED as in the paper (LeNet-5: Tanh, AvgPool, no BN)"),
    Variant("mi-per-sample", "mi-ed", options={"target_mode": "per_sample"},
            note="the paper's per-sample targets (Eq. 8) instead of the reference code's slices"),
    Variant("di", "di-ed", note="Data-Impression ED as in the paper (β 10)"),
    Variant("di-beta-mix", "di-ed", options={"beta": (1.0, 0.1)}, note="DI with the DI paper's β mixture 1, 0.1"),
    Variant("mi-bn", "mi-ed", arch="lenet5_bn",
            note="experts with BatchNorm (LeNet-5-BN: ReLU, MaxPool, BN): the paper's BNS weight 1 now matches "
                 "the statistics of the experts' training data"),
    Variant("mi-bn10", "mi-ed", arch="lenet5_bn", options={"bn_weight": 10.0, "first_bn_multiplier": 10.0},
            note="BN experts, DeepInversion's BN weights (10, first layer x10)"),
    Variant("mi-bn-per-sample", "mi-ed", arch="lenet5_bn", options={"target_mode": "per_sample"},
            note="BN experts + per-sample targets"),
    Variant("mi-bn-standardize", "mi-ed", arch="lenet5_bn", options={"normalize": "standardize"},
            note="BN experts + z-scored instead of centred logits"),
    Variant("mi-bn-no-augment", "mi-ed", arch="lenet5_bn", options={"augment": False},
            note="BN experts without the per-sample pad-crop augmentation of distillation minibatches"),
    Variant("mi-no-augment", "mi-ed", options={"augment": False},
            note="the paper's LeNet-5 experts without the per-sample augmentation"),
    Variant("mi-bn-no-augment-100it", "mi-ed", arch="lenet5_bn", options={"augment": False, "synth_iterations": 100},
            note="BN experts without augmentation, 100 synthesis steps (1/30 of the paper's)"),
    Variant("mi-bn-adi", "mi-ed", arch="lenet5_bn", options={"competition_weight": 1.0},
            note="BN experts + Adaptive DeepInversion against the learner (weight 1)"),
    Variant("mi-bn-100it", "mi-ed", arch="lenet5_bn", options={"synth_iterations": 100},
            note="BN experts, 100 synthesis steps (1/30 of the paper's 3000)"),
    Variant("di-bn", "di-ed", arch="lenet5_bn", note="Data Impressions of BN experts (β 10, BNS 1)"),
    Variant("replay", "replay-ed", note="Replay ED on real data (breaks ExML: the upper bound)"),
)


def _variant_rows(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for v in VARIANTS:
        runs = results.get(v.name)
        if not runs:
            continue
        accs = [100.0 * r["acc"] for r in runs]
        mean, std = _mean_std(accs, ddof=1)
        rows.append({"variant": v.name, "strategy": v.strategy, "arch": v.arch, "options": _plain(v.options),
                     "note": v.note, "runs": len(runs), "accs": accs, "mean": mean, "std": std,
                     "synth_iterations": runs[0]["synth_iterations"],
                     "generate_s": sum(r["generate_s"] for r in runs) / len(runs),
                     "distill_s": sum(r["distill_s"] for r in runs) / len(runs)})
    return rows


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        "# Ablation: Ex-Model Distillation on Split MNIST NC",
        "",
        f"- command: `{meta['command']}`",
        f"- budget: **{meta['budget']}** — every row starts from {json.dumps(meta['budget_detail'])}",
        f"- runs: {meta['runs']} independent expert streams per row (seeds 0..{meta['runs'] - 1}); experts "
        f"train {meta['budget_detail']['expert_epochs']['split_mnist']} epochs",
        f"- machine: {m['device']} ({m['device_kind']}, {m['threads']} threads), torch {m['torch']}, "
        f"Python {m['python']}, commit `{m['commit']}`, {m['date']}",
        f"- wall time of this invocation: {meta['wall_s']:.0f} s (runs already on disk are read back); the runs "
        f"took {meta['runs_s']:.0f} s when they ran (expert training not included)",
        "- paper (Table 2, Split MNIST NC, 3000 synthesis steps): best 43.23 ± 3.00 (MI ED)",
        "",
        "| variant | strategy | experts | changes | synthesis steps | stream accuracy (%) | synthesis s/run "
        "| distillation s/run |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = f"{r['mean']:.2f}" + ("" if math.isnan(r["std"]) else f" ± {r['std']:.2f}")
        changes = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "—"
        lines.append(f"| {r['variant']} | {r['strategy']} | {r['arch']} | {changes} | {r['synth_iterations']} | "
                     f"{acc} | {r['generate_s']:.0f} | {r['distill_s']:.0f} |")
    lines += ["", "The seconds are each run's own record, taken under whatever load the machine had when it ran "
              "(runs may share the cores): compare the accuracies across rows, not the times.",
              "", "Rows:", ""] + [f"- **{r['variant']}**: {r['note']}" for r in rows]
    return "\n".join(lines) + "\n"


def ablate_exml_mnist(
    *,
    runs: int = 3,
    budget: str = "demo",
    variants: tuple[str, ...] | None = None,
    out: str | os.PathLike = "runs/reproduce/exml-mnist-ablation",
    results: str | os.PathLike | None = "benches/results",
    device: torch.device | str = "cpu",
    data_root: str | os.PathLike | None = None,
    progress: bool = False,
    command: str | None = None,
    log=None,
) -> list[dict[str, Any]]:
    """Runs (or resumes) the ablation; returns its rows and writes ``exml_mnist_ablation.{json,md}``.

    Args:
        runs: independent expert streams per variant (seeds 0 .. runs-1).
        budget: a key of :data:`exml_fast.reproduce.BUDGETS`: the expert epochs and the run options
            every variant starts from.
        variants: names of :data:`VARIANTS` to run (None: all). The table lists every variant with
            finished runs on disk, so two invocations with disjoint ``variants`` can share the work.
        out: expert streams and runs (resumable).
        results: folder for the records (the budget's name is appended unless it is "demo"); None: none.
        device, data_root, progress, command, log: as for :func:`exml_fast.reproduce.reproduce_exml_mnist`.
    """
    from exml_fast.cli_exml import run_named_strategy
    from exml_fast.engine import RESULT
    from exml_fast.metrics import StreamResult
    from exml_fast.reproduce import BUDGETS, _machine, check_runs_and_budget, write_records
    from exml_fast.scenarios import make_scenario, train_experts

    check_runs_and_budget(runs, budget, "ablation")
    names = [v.name for v in VARIANTS]
    if variants is not None and not set(variants) <= set(names):
        raise ValueError(f"ablation: variants must be among {', '.join(names)}; got "
                         f"{sorted(set(variants) - set(names))}")
    log = log or (lambda line: print(line, flush=True))
    device = torch.device(device)
    spec = BUDGETS[budget]
    out = pathlib.Path(out) / budget
    t_start = time.perf_counter()
    found: dict[str, list[dict[str, Any]]] = {}
    for r in range(runs):
        scenario, streams = None, {}  # built (and the experts trained or verified) once per seed and arch
        for v in VARIANTS:
            run_dir = out / "split_mnist" / f"{v.name}_s{r}"
            if variants is not None and v.name not in variants:
                if (run_dir / RESULT).exists():  # another invocation's finished run
                    found.setdefault(v.name, []).append(_summary(StreamResult.load_json(run_dir / RESULT)))
                continue
            if scenario is None:
                scenario = make_scenario("split_mnist", seed=r, root=data_root, **spec.get("scenario", {}))
            if v.arch not in streams:
                streams[v.arch] = train_experts(scenario, out / "experts" / f"split_mnist_{v.arch}_s{r}", arch=v.arch,
                                                epochs=spec["expert_epochs"]["split_mnist"], seed=r, device=device,
                                                progress=progress, weights_format="torch")
            stream = streams[v.arch]
            t0 = time.perf_counter()
            result = run_named_strategy(v.strategy, stream, scenario, options={**spec["run"], **v.options}, seed=r,
                                        device=device, out=run_dir, progress=progress, data_root=data_root)
            found.setdefault(v.name, []).append(_summary(result))
            log(f"[ablation] run {r + 1}/{runs} {v.name}: {100 * result.final_stream_accuracy:.2f} % "
                f"({time.perf_counter() - t0:.0f} s)")
    rows = _variant_rows(found)
    if results is not None:
        meta = {"experiment": "exml-mnist-ablation", "budget": budget, "budget_detail": spec, "runs": runs,
                "command": command or " ".join(["exml-fast", *sys.argv[1:]]), "machine": _machine(device),
                "wall_s": time.perf_counter() - t_start,
                "runs_s": sum(r["run_s"] for runs_ in found.values() for r in runs_)}
        stem = "exml_mnist_ablation" if budget == "demo" else f"exml_mnist_ablation_{budget}"
        write_records(results, stem, meta, rows, _markdown(rows, meta), log=lambda m: log(f"[ablation] {m}"))
    return rows


def _summary(result) -> dict[str, Any]:
    meta = result.meta
    hist = meta.get("history") or []
    gen = (meta.get("config") or {}).get("generator") or {}
    from exml_fast.reproduce import run_seconds

    return {"acc": result.final_stream_accuracy, "run_s": run_seconds(result),
            "synth_iterations": (gen.get("options") or {}).get("iterations"),
            "generate_s": sum(h.get("generate_s", 0.0) for h in hist),
            "distill_s": sum(h.get("distill_s", 0.0) for h in hist)}
