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
- the synthesis iterations;
- Generative ED (``gen-ed``, in no paper): no buffer, one trained delegator fine-tuned on each expert and
  sampled fresh at every distillation step.

Selection protocol (no test data is looked at to choose):

1. every variant runs on ``runs`` expert streams (seeds 0 .. runs-1) whose experts
   train on the MNIST training set **minus** :data:`VALIDATION_SIZE` held-out images
   (:func:`exml_fast.cl.scenarios.validation_indices`), and is scored by the stream
   accuracy on those held-out images (``eval_split="validation"``);
2. the ExML variant with the best mean validation accuracy is selected (Replay ED,
   which keeps real data, is never a candidate);
3. only the selected variant is then run on fresh expert streams (``test_seeds``,
   default :data:`TEST_SEEDS`, never used for selection), trained the same way, and
   scored on the MNIST **test** set. That figure is the one to compare with the paper.

A preset (:data:`~exml_fast.experiments.presets.PRESETS`) is a strategy plus run options;
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

from exml_fast.cl.engine import RESULT
from exml_fast.cl.metrics import StreamResult, mean_std
from exml_fast.cl.scenarios import make_scenario, train_experts
from exml_fast.cl.strategies import run_named_strategy
from exml_fast.cl.strategies.registry import options_read_by
from exml_fast.experiments.budgets import BUDGETS, check_runs_and_budget
from exml_fast.experiments.presets import PRESETS
from exml_fast.experiments.records import machine, machine_line, run_seconds, write_records
from exml_fast.synth import DATA_IMPRESSIONS_BETA

__all__ = ["ABLATION_BASE", "PRESETS", "TEST_SEEDS", "VALIDATION_SIZE", "VARIANTS", "Variant", "ablate_exml_mnist",
           "select_variant", "variant_options"]

#: Training images held out of every expert's training data to select a variant on.
VALIDATION_SIZE = 10000
#: Seeds of the fresh expert streams on which the selected variant's test accuracy is reported.
TEST_SEEDS: tuple[int, ...] = (100, 101, 102, 103, 104)
#: Options every row runs with, pinned so that a change of the library's defaults (the paper budget's
#: distillation momentum, MI/DI's BN form) does not silently change the rows recorded before it.
ABLATION_BASE: dict[str, Any] = {"momentum": 0.9, "bn_form": "l2"}


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: a strategy, the experts' architecture, and run options over the budget's."""

    name: str
    strategy: str
    arch: str = "lenet5"
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def ex_model(self) -> bool:
        """Whether the variant respects the ExML constraints (Replay ED keeps real data: not a candidate)."""
        return self.strategy != "replay-ed"


#: The ablation's rows, in the table's order.
VARIANTS: tuple[Variant, ...] = (
    Variant("mi", "mi-ed", note="Model-Inversion ED as in the paper (LeNet-5: Tanh, AvgPool, no BN)"),
    Variant("mi-per-sample", "mi-ed", options={"target_mode": "per_sample"},
            note="the paper's per-sample targets (Eq. 8) instead of the reference code's slices"),
    Variant("di", "di-ed", note="Data-Impression ED as in the paper (β 10)"),
    Variant("di-beta-mix", "di-ed", options={"beta": DATA_IMPRESSIONS_BETA},
            note="DI with the DI paper's β mixture 1, 0.1"),
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
    Variant("mi-bn-no-augment-sq-std", "mi-ed", arch="lenet5_bn", options={"augment": False, "bn_form": "sq_std"},
            note="as mi-bn-no-augment with the ExML paper's BN term (squared gaps of mean and std) instead of "
                 "DeepInversion's (un-squared norms of the mean and variance gaps)"),
    Variant("mi-no-augment", "mi-ed", options={"augment": False},
            note="the paper's LeNet-5 experts without the per-sample augmentation"),
    Variant("mi-bn-no-augment-100it", "mi-ed", arch="lenet5_bn", options={"augment": False, "synth_iterations": 100},
            note="BN experts without augmentation, 100 synthesis steps (1/30 of the paper's)"),
    Variant("mi-bn-adi", "mi-ed", arch="lenet5_bn", options={"competition_weight": 1.0},
            note="BN experts + Adaptive DeepInversion against the learner (weight 1)"),
    Variant("mi-bn-100it", "mi-ed", arch="lenet5_bn", options={"synth_iterations": 100},
            note="BN experts, 100 synthesis steps (1/30 of the paper's 3000)"),
    Variant("di-bn", "di-ed", arch="lenet5_bn", note="Data Impressions of BN experts (β 10, BNS 1)"),
    Variant("gen-ed-bn", "gen-ed", arch="lenet5_bn", options={"augment": False},
            note="Generative ED (in no paper): BN experts, no buffer; one skd-narrow delegator fine-tuned on each "
                 "expert for the budget's synthesis steps (as explore steps, batch synth_batch_size), fresh samples "
                 "at every distillation step; no augmentation, as mi-bn-no-augment"),
    Variant("gen-ed-bn-50", "gen-ed", arch="lenet5_bn", options={"augment": False, "synth_iterations": 50},
            note="gen-ed-bn with 50 explore steps per expert (a sixth of the budget's), nearer mi-bn-no-augment's "
                 "synthesis time"),
    Variant("replay", "replay-ed", note="Replay ED on real data (breaks ExML: the upper bound)"),
)


def _variant_rows(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for v in VARIANTS:
        runs = results.get(v.name)
        if not runs:
            continue
        rows.append({"variant": v.name, "strategy": v.strategy, "arch": v.arch, "options": _plain(v.options),
                     "note": v.note, "ex_model": v.ex_model, **_stats(runs),
                     "synth_iterations": runs[0]["synth_iterations"],
                     "generate_s": sum(r["generate_s"] for r in runs) / len(runs),
                     "distill_s": sum(r["distill_s"] for r in runs) / len(runs)})
    return rows


def _stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [100.0 * r["acc"] for r in runs]
    mean, std = mean_std(accs, ddof=1)
    return {"runs": len(runs), "seeds": [r["seed"] for r in runs], "accs": accs, "mean": mean, "std": std}


def select_variant(rows: list[dict[str, Any]], runs: int) -> dict[str, Any] | None:
    """The ExML row with the best mean validation accuracy among those with ``runs`` finished runs (ties: the
    table's order); None when there is none."""
    done = [r for r in rows if r["ex_model"] and r["runs"] >= runs]
    return max(done, key=lambda r: r["mean"]) if done else None


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")


def _markdown(rows: list[dict[str, Any]], selected: dict[str, Any] | None, test: dict[str, Any] | None,
              meta: dict[str, Any]) -> str:
    m = meta["machine"]
    # ABLATION_BASE's options, less those the budget's run options already spell out with the same value
    extra = {k: v for k, v in meta["base"].items() if meta["budget_detail"]["run"].get(k, object()) != v}
    lines = [
        "# Ablation: Ex-Model Distillation on Split MNIST NC, selected on validation data",
        "",
        f"- command: `{meta['command']}`",
        f"- budget: **{meta['budget']}** — every row starts from {json.dumps(meta['budget_detail'])}"
        + (f" and {json.dumps(extra)}" if extra else ""),
        f"- protocol: experts train {meta['budget_detail']['expert_epochs']['split_mnist']} epochs on the MNIST "
        f"training set minus {meta['validation_size']} held-out images (the same images for every stream); every "
        f"row runs on {meta['runs']} expert streams (seeds 0..{meta['runs'] - 1}) and is scored by its stream "
        "accuracy on the held-out images (**validation**). The ExML row with the best validation mean is "
        f"selected and then run on fresh streams (seeds {', '.join(map(str, meta['test_seeds'])) or 'none'}), "
        "scored on the MNIST **test** set. No test figure was used to choose.",
        machine_line(m),
        f"- wall time of this invocation: {meta['wall_s']:.0f} s (runs already on disk are read back); the runs "
        f"took {meta['runs_s']:.0f} s when they ran (expert training not included)",
        "",
        "## Selected",
        "",
    ]
    if selected is None:
        lines.append(f"No ExML row has {meta['runs']} finished validation runs yet: nothing selected.")
    else:
        lines.append(f"**{selected['variant']}** (validation {_fmt(selected['mean'], selected['std'])} %).")
        if test:
            lines += ["", "| | stream accuracy on the test set (%) | runs | seeds |", "|---|---:|---:|---|",
                      f"| {selected['variant']} (ours, selected on validation) | {_fmt(test['mean'], test['std'])} | "
                      f"{test['runs']} | {', '.join(map(str, test['seeds']))} |",
                      "| paper's best row (Table 2, MI ED, 3000 synthesis steps) | 43.23 ± 3.00 | 5 | — |"]
        else:
            lines.append("Its test runs on fresh seeds have not run yet.")
    lines += [
        "",
        "## Validation",
        "",
        "| variant | strategy | experts | changes | synthesis steps | validation stream accuracy (%) | runs "
        "| synthesis s/run | distillation s/run |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        changes = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "—"
        name = f"**{r['variant']}**" if selected is not None and r["variant"] == selected["variant"] else r["variant"]
        lines.append(f"| {name} | {r['strategy']} | {r['arch']} | {changes} | {r['synth_iterations']} | "
                     f"{_fmt(r['mean'], r['std'])} | {r['runs']} | {r['generate_s']:.0f} | {r['distill_s']:.0f} |")
    lines += ["", "The seconds are each run's own record, taken under whatever load the machine had when it ran "
              "(runs may share the cores): compare the accuracies across rows, not the times.",
              "", "Rows:", ""] + [f"- **{r['variant']}**: {r['note']}" for r in rows]
    return "\n".join(lines) + "\n"


def ablate_exml_mnist(
    *,
    runs: int = 3,
    budget: str = "demo",
    variants: tuple[str, ...] | None = None,
    test_seeds: tuple[int, ...] | None = TEST_SEEDS,
    out: str | os.PathLike = "runs/reproduce/exml-mnist-ablation",
    results: str | os.PathLike | None = "benches/results",
    device: torch.device | str = "cpu",
    data_root: str | os.PathLike | None = None,
    progress: bool = False,
    command: str | None = None,
    log=None,
) -> dict[str, Any]:
    """Runs (or resumes) the ablation and its selection; writes ``exml_mnist_ablation.{json,md}``.

    Args:
        runs: independent expert streams per variant for the selection (seeds 0 .. runs-1), each scored on
            the held-out validation images.
        budget: a key of :data:`exml_fast.experiments.budgets.BUDGETS`: the expert epochs and the run options
            every variant starts from (with :data:`ABLATION_BASE`).
        variants: names of :data:`VARIANTS` to run (None: all). The table lists every variant with
            finished runs on disk, so two invocations with disjoint ``variants`` can share the work.
        test_seeds: the fresh streams on which the selected variant is run and scored on the test set, once
            every candidate of this invocation has ``runs`` validation runs (None or (): none are run; the
            record still reports those already on disk).
        out: expert streams and runs (resumable).
        results: folder for the records (the budget's name is appended unless it is "demo"); None: none.
        device, data_root, progress, command, log: as for :func:`exml_fast.experiments.table2.reproduce_exml_mnist`.

    Returns:
        ``{"rows": validation rows, "selected": the selected row or None, "test": its test summary or None}``.
    """
    check_runs_and_budget(runs, budget, "ablation")
    names = [v.name for v in VARIANTS]
    if variants is not None and not set(variants) <= set(names):
        raise ValueError(f"ablation: variants must be among {', '.join(names)}; got "
                         f"{sorted(set(variants) - set(names))}")
    test_seeds = tuple(test_seeds or ())
    if any(isinstance(s, bool) or not isinstance(s, int) or s < runs for s in test_seeds):
        raise ValueError(f"ablation: test_seeds must be ints >= runs ({runs}), never used for selection; got "
                         f"{test_seeds!r}")
    log = log or (lambda line: print(line, flush=True))
    device = torch.device(device)
    spec = BUDGETS[budget]
    out = pathlib.Path(out) / budget
    t_start = time.perf_counter()
    ctx = dict(spec=spec, out=out, device=device, data_root=data_root, progress=progress, log=log)
    found: dict[str, list[dict[str, Any]]] = {}
    for r in range(runs):
        cache: dict[str, Any] = {}  # the seed's scenario, and its experts trained or verified once per arch
        for v in VARIANTS:
            ran = variants is None or v.name in variants
            summary = _run_variant(v, r, "validation", cache, run=ran, **ctx)
            if summary is not None:
                found.setdefault(v.name, []).append(summary)
    rows = _variant_rows(found)
    selected = select_variant(rows, runs)
    test_runs: list[dict[str, Any]] = []
    if selected is not None:
        v = VARIANTS[names.index(selected["variant"])]
        complete = all(len(found.get(c.name, [])) >= runs for c in VARIANTS if c.ex_model
                       and (variants is None or c.name in variants))
        seeds = sorted({*test_seeds, *_finished_test_seeds(out, v)})
        for s in seeds:
            summary = _run_variant(v, s, "test", {}, run=complete and s in test_seeds, **ctx)
            if summary is not None:
                test_runs.append(summary)
    test = _stats(test_runs) if test_runs else None
    if results is not None:
        meta = {"experiment": "exml-mnist-ablation", "budget": budget, "budget_detail": spec, "runs": runs,
                "base": ABLATION_BASE, "validation_size": VALIDATION_SIZE,
                "test_seeds": [t["seed"] for t in test_runs] or list(test_seeds),
                "command": command or " ".join(["exml-fast", *sys.argv[1:]]), "machine": machine(device),
                "wall_s": time.perf_counter() - t_start,
                "runs_s": sum(x["run_s"] for runs_ in found.values() for x in runs_) + sum(x["run_s"]
                                                                                        for x in test_runs)}
        stem = "exml_mnist_ablation" if budget == "demo" else f"exml_mnist_ablation_{budget}"
        write_records(results, stem, meta, rows, _markdown(rows, selected, test, meta),
                      log=lambda m: log(f"[ablation] {m}"),
                      extra={"selected": selected and selected["variant"], "test": test})
    return {"rows": rows, "selected": selected, "test": test}


def variant_options(v: Variant, spec: dict[str, Any]) -> dict[str, Any]:
    """The run options of ``v`` under the budget ``spec``: the budget's and :data:`ABLATION_BASE`'s that its
    strategy reads (gen-ed has no buffer and no BN form, say), then the variant's own, all of them."""
    return {**options_read_by(v.strategy, {**spec["run"], **ABLATION_BASE}), **v.options}


def _finished_test_seeds(out: pathlib.Path, v: Variant) -> list[int]:
    folder = out / "test" / "split_mnist"
    prefix = f"{v.name}_s"
    return [int(p.name[len(prefix):]) for p in folder.glob(f"{prefix}*")
            if p.name[len(prefix):].isdigit() and (p / RESULT).exists()]


def _run_variant(v: Variant, seed: int, split: str, cache: dict[str, Any], *, run: bool, spec, out, device,
                 data_root, progress, log) -> dict[str, Any] | None:
    """One run of ``v`` on the expert stream of ``seed`` evaluated on ``split``; with ``run`` False only a
    finished run already on disk is read back. None: no result. ``cache`` keeps the scenario and the expert
    streams of ``seed`` between the variants that run on them."""
    run_dir = out / split / "split_mnist" / f"{v.name}_s{seed}"
    if not run:
        return _summary(StreamResult.load_json(run_dir / RESULT), seed) if (run_dir / RESULT).exists() else None
    if "scenario" not in cache:
        cache["scenario"] = make_scenario("split_mnist", seed=seed, root=data_root, validation_size=VALIDATION_SIZE,
                                          eval_split=split, **spec.get("scenario", {}))
    scenario = cache["scenario"]
    if v.arch not in cache:
        cache[v.arch] = train_experts(scenario, out / "experts" / f"split_mnist_{split}_{v.arch}_s{seed}",
                                      arch=v.arch, epochs=spec["expert_epochs"]["split_mnist"], seed=seed,
                                      device=device, progress=progress, weights_format="torch")
    t0 = time.perf_counter()
    result = run_named_strategy(v.strategy, cache[v.arch], scenario, options=variant_options(v, spec), seed=seed,
                                device=device, out=run_dir, progress=progress, data_root=data_root)
    log(f"[ablation] {split} seed {seed} {v.name}: {100 * result.final_stream_accuracy:.2f} % "
        f"({time.perf_counter() - t0:.0f} s)")
    return _summary(result, seed)


def _summary(result, seed: int) -> dict[str, Any]:
    meta = result.meta
    hist = meta.get("history") or []
    config = meta.get("config") or {}
    gen = config.get("source") or config.get("generator") or {}  # "generator" before the rename
    gen_options = gen.get("options") or {}
    return {"seed": seed, "acc": result.final_stream_accuracy, "run_s": run_seconds(result),
            # gen-ed's delegator: its explore steps per expert
            "synth_iterations": gen_options.get("iterations", gen_options.get("fit_iterations")),
            "generate_s": sum(h.get("generate_s", 0.0) for h in hist),
            "distill_s": sum(h.get("distill_s", 0.0) for h in hist)}
