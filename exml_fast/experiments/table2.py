"""The Ex-Model CL paper's Table 2, MNIST columns: ``exml-fast reproduce exml-mnist``.

For each of ``runs`` independent expert streams (seed r = 0, 1, ...) and each scenario
(Split MNIST NC, Joint MNIST), train the experts (Appendix A), run every
strategy of the table with the Appendix B hyperparameters, and write
``<results>/exml_mnist.{json,md}``: our mean ± std of the final stream accuracy
beside the paper's, whether each lies within two of the paper's standard
deviations, and the machine, versions, commit, budget and wall time.

Everything is resumable: expert streams and strategy runs live under ``out``
with their checkpoints, and a rerun of the same command continues where it
stopped (a finished run is read back, not redone). ``budget`` scales the
work (:mod:`exml_fast.experiments.budgets`); it is recorded with the results,
so a reduced run is never mistaken for the paper's.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import torch

from exml_fast.cl.metrics import mean_std
from exml_fast.cl.scenarios import make_scenario, train_experts
from exml_fast.cl.strategies import run_named_strategy
from exml_fast.experiments.budgets import BUDGETS, check_runs_and_budget
from exml_fast.experiments.records import machine, machine_line, run_seconds, write_records

__all__ = ["PAPER_TABLE2", "TABLE2_STRATEGIES", "reproduce_exml_mnist", "summarize"]

#: Table 2, MNIST columns: (scenario, strategy) -> (mean, std) of the final stream accuracy, %.
PAPER_TABLE2: dict[tuple[str, str], tuple[float, float]] = {
    ("joint_mnist", "oracle"): (93.71, 0.28),
    ("joint_mnist", "mi-ed"): (93.09, 1.43),
    ("joint_mnist", "di-ed"): (92.12, 0.88),
    ("joint_mnist", "aux-ed"): (89.35, 0.18),
    ("split_mnist", "oracle"): (99.42, 0.19),
    ("split_mnist", "ensemble-avg"): (33.40, 4.74),
    ("split_mnist", "min-entropy"): (39.41, 5.27),
    ("split_mnist", "param-avg"): (20.11, 0.97),
    ("split_mnist", "mi-ed"): (43.23, 3.00),
    ("split_mnist", "di-ed"): (36.05, 6.74),
    ("split_mnist", "aux-ed"): (35.48, 6.35),
}
#: The strategies of Table 2 per scenario, in the table's order (ensembles are "–" for joint).
TABLE2_STRATEGIES = {
    "split_mnist": ("oracle", "ensemble-avg", "min-entropy", "param-avg", "mi-ed", "di-ed", "aux-ed"),
    "joint_mnist": ("oracle", "mi-ed", "di-ed", "aux-ed"),
}


def summarize(results: dict[tuple[str, str], list[float]]) -> list[dict[str, Any]]:
    """Rows of (scenario, strategy): our runs' mean ± std (%, sample std), the paper's, within 2 paper stds."""
    rows = []
    for scenario, strategies in TABLE2_STRATEGIES.items():
        for strategy in strategies:
            accs = results.get((scenario, strategy))
            if not accs:
                continue
            mean, std = mean_std([100.0 * a for a in accs], ddof=1)
            pm, ps = PAPER_TABLE2[(scenario, strategy)]
            rows.append({"scenario": scenario, "strategy": strategy, "runs": len(accs), "mean": mean, "std": std,
                         "accs": [100.0 * a for a in accs], "paper_mean": pm, "paper_std": ps,
                         "within_2_std": abs(mean - pm) <= 2 * ps})
    return rows


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        "# Reproduction: Ex-Model CL paper, Table 2 (MNIST columns)",
        "",
        f"- command: `{meta['command']}`",
        f"- budget: **{meta['budget']}** — {json.dumps(meta['budget_detail'])}",
        f"- runs (independent expert streams, seeds 0..{meta['runs'] - 1}): {meta['runs']}",
        machine_line(m),
        f"- wall time of this invocation: {meta['wall_s']:.0f} s (runs already on disk are read back, not redone); "
        f"the strategy runs took {meta['runs_s']:.0f} s when they ran (their recorded training and evaluation "
        "times; expert training not included)",
        "",
        "| scenario | strategy | runs | ours: stream accuracy (%) | paper (%) | within 2 paper std |",
        "|---|---|---:|---:|---:|:---:|",
    ]
    for r in rows:
        ours = f"{r['mean']:.2f}" + ("" if math.isnan(r["std"]) else f" ± {r['std']:.2f}")
        lines.append(f"| {r['scenario']} | {r['strategy']} | {r['runs']} | {ours} | {r['paper_mean']:.2f} ± "
                     f"{r['paper_std']:.2f} | {'yes' if r['within_2_std'] else 'no'} |")
    if meta["budget"] != "paper":
        lines += ["", f"Budget `{meta['budget']}` is not the paper's: these numbers do not test the reproduction."]
    return "\n".join(lines) + "\n"


def reproduce_exml_mnist(
    *,
    runs: int = 5,
    budget: str = "paper",
    scenarios: tuple[str, ...] = ("split_mnist", "joint_mnist"),
    strategies: tuple[str, ...] | None = None,
    out: str | os.PathLike = "runs/reproduce/exml-mnist",
    results: str | os.PathLike | None = "benches/results",
    device: torch.device | str = "cpu",
    data_root: str | os.PathLike | None = None,
    progress: bool = False,
    command: str | None = None,
    log=None,
) -> list[dict[str, Any]]:
    """Runs (or resumes) the Table 2 MNIST reproduction; returns the summary rows and writes the results.

    Args:
        runs: independent expert streams (seeds 0 .. runs-1).
        budget: a key of :data:`BUDGETS` ("paper": Appendix A-B as published).
        scenarios: of "split_mnist", "joint_mnist".
        strategies: a subset of Table 2's (None: all of each scenario's row set).
        out: where expert streams and runs (with checkpoints) are kept.
        results: folder for ``exml_mnist.json`` / ``exml_mnist.md`` (the budget's name is appended
            unless it is "paper"); None: write nothing.
        device, data_root, progress: as for ``exml-fast run``.
        command: the command line to record (default: ``sys.argv``).
        log: called with one line per finished run (None: print, flushed).
    """
    check_runs_and_budget(runs, budget, "reproduce")
    for s in scenarios:
        if s not in TABLE2_STRATEGIES:
            raise ValueError(f"reproduce: scenarios must be among {', '.join(TABLE2_STRATEGIES)}; got {s!r}")
    known = {s for v in TABLE2_STRATEGIES.values() for s in v}
    if strategies is not None and not set(strategies) <= known:
        raise ValueError(f"reproduce: strategies must be among {', '.join(sorted(known))}; got "
                         f"{sorted(set(strategies) - known)}")
    log = log or (lambda line: print(line, flush=True))
    device = torch.device(device)
    spec = BUDGETS[budget]
    out = pathlib.Path(out) / budget
    t_start = time.perf_counter()
    accs: dict[tuple[str, str], list[float]] = {}
    runs_s = 0.0
    for r in range(runs):
        for name in scenarios:
            scenario = make_scenario(name, seed=r, root=data_root, **spec.get("scenario", {}))
            stream = train_experts(scenario, out / "experts" / f"{name}_s{r}", arch="lenet5",
                                   epochs=spec["expert_epochs"][name], seed=r, device=device, progress=progress,
                                   weights_format="torch")
            for strat in TABLE2_STRATEGIES[name]:
                if strategies is not None and strat not in strategies:
                    continue
                run_dir = out / name / f"{strat}_s{r}"
                t0 = time.perf_counter()
                result = run_named_strategy(strat, stream, scenario, options=spec["run"], seed=r, device=device,
                                            out=run_dir, progress=progress, data_root=data_root)
                accs.setdefault((name, strat), []).append(result.final_stream_accuracy)
                runs_s += run_seconds(result)
                log(f"[reproduce] run {r + 1}/{runs} {name} {strat}: {100 * result.final_stream_accuracy:.2f} % "
                    f"({time.perf_counter() - t0:.0f} s)")
    rows = summarize(accs)
    if results is not None:
        meta = {"experiment": "exml-mnist", "budget": budget, "budget_detail": spec, "runs": runs,
                "scenarios": list(scenarios), "command": command or " ".join(["exml-fast", *sys.argv[1:]]),
                "machine": machine(device), "wall_s": time.perf_counter() - t_start, "runs_s": runs_s}
        stem = "exml_mnist" if budget == "paper" else f"exml_mnist_{budget}"
        write_records(results, stem, meta, rows, _markdown(rows, meta), log=lambda m: log(f"[reproduce] {m}"))
    return rows
