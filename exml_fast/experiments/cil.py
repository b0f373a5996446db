"""Class-incremental learning on Split MNIST and Split Fashion-MNIST: ``exml-fast reproduce cil-mnist`` /
``cil-fmnist``.

For each of ``runs`` seeds (the class order, the learner's initialisation and every draw) and each
strategy, run the strategy over the scenario's five tasks of two classes (one head, no task label) with the
run loop's checkpoints, and write ``<results>/cil_{mnist,fmnist}.{json,md}``: mean ± std over the seeds of
the final accuracy on all classes and of the average incremental accuracy, whether each strategy keeps real
data of past tasks, the compute each run took, the machine, versions and commit, and the published figures
beside ours (Split Fashion-MNIST has none for these methods).

No hyperparameter is tuned here: every strategy runs at its defaults (the experts' training recipe,
:data:`~exml_fast.cl.strategies.cil.CIL_DEFAULTS`) under the budget's options, and the test sets are only
evaluated. Everything is resumable: a rerun reads finished runs back and continues a killed one.

Each finished run is also kept in a ledger beside the table, ``<results>/cil_{mnist,fmnist}[_<budget>]_runs.json``
(its accuracy matrix, timings, strategy configuration, machine and commit, written atomically after every run),
and a rerun whose run folder is gone takes a run from it when the strategy's configuration is unchanged. The
paper budget is hours per seed on 2 CPU cores and run folders do not outlive a machine: the ledger, committed
with the table, lets the seeds be run on different days and machines and still make one table, each run's
commit and machine on record. ``seeds`` runs some seeds into the ledger only (no table), so that processes
can share a table's seeds at once: the ledger re-reads its file under a lock before each write.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from exml_fast._utils.checks import check_choice, check_int
from exml_fast._utils.io import atomic_write, locked
from exml_fast._utils.provenance import git_commit
from exml_fast.cl.engine import CHECKPOINT
from exml_fast.cl.metrics import StreamResult, mean_std
from exml_fast.cl.scenarios import make_scenario
from exml_fast.cl.strategies import STRATEGIES, run_named_strategy
from exml_fast.cl.strategies.registry import build_strategy, options_read_by
from exml_fast.experiments.records import machine, machine_line, run_seconds, write_records

__all__ = ["CIL_BUDGETS", "CIL_EXPERIMENTS", "CIL_STRATEGIES", "DEMO_CIL_STRATEGIES", "PUBLISHED_SPLIT_MNIST",
           "PUBLISHED_SPLIT_MNIST_OTHERS", "reproduce_cil"]

#: The experiments: name -> (scenario, results stem).
CIL_EXPERIMENTS = {"cil-mnist": ("split_mnist", "cil_mnist"), "cil-fmnist": ("split_fashion_mnist", "cil_fmnist")}

#: Every class-incremental strategy, in the table's order.
CIL_STRATEGIES = ("finetune", "lwf", "deepinversion-cil", "deepinversion-cil-balanced", "synthetic-exemplars", "skd",
                  "icarl", "joint")
#: The ones ``exml-fast demo`` runs: all but skd, whose delegator (SKD's Table IV network, chosen on the validation
#: split: benches/results/cil_skd_validation.md) takes about 40 min a run at the demo budget on one CPU core.
DEMO_CIL_STRATEGIES = tuple(s for s in CIL_STRATEGIES if s != "skd")

#: One core's seconds for one ``skd`` task of 20 epochs (the Split MNIST rows of docs/cil.md, delegator batch 64),
#: and the tasks of a five-task split that draw from the delegator (all but the first).
_SKD_CPU_TASK_S_20EP, _SKD_DELEGATOR_TASKS = 690.0, 4


def _skd_cpu_hours(epochs: int) -> float:
    """A lower bound on one ``skd`` seed's CPU hours at ``epochs`` a task: the 20-epoch runs' time, scaled."""
    return _SKD_CPU_TASK_S_20EP * epochs / 20 * _SKD_DELEGATOR_TASKS / 3600


#: Work per budget (run options over each strategy's defaults; ``strategies``: options of one strategy over
#: those). "paper": the defaults (the experts' recipe, 20 epochs per task; DeepInversion at its own defaults,
#: 250 images per old class; iCaRL's K = 2000), and SKD's own schedule (its Implementation Details: the
#: incremental model trains 160 epochs by SGD from lr 0.1, divided by 10 at epochs 80 and 120; the delegator's
#: pseudo-data batch 1024). The skd rows recorded before this schedule was set (benches/results/cil_mnist.md at
#: 2026-11-25: 20 epochs at a constant 0.01, delegator batch 64) stay in their ledger under that config.
#: "demo": ``exml-fast demo``'s reduced budget. "smoke": seconds, to check the pipeline runs.
CIL_BUDGETS: dict[str, dict[str, Any]] = {
    "paper": {"run": {}, "strategies": {"skd": {"epochs": 160, "lr": 0.1, "lr_milestones": (80, 120),
                                                "synth_batch_size": 1024}}},
    "demo": {"run": {"epochs": 2, "synth_iterations": 300, "synth_per_class": 50}},
    "smoke": {"scenario": {"max_train_per_experience": 300, "max_test_per_experience": 200},
              "run": {"epochs": 1, "synth_iterations": 3, "synth_per_class": 4, "synth_batch_size": 32,
                      "memory_size": 40}},
}

#: Published class-incremental Split MNIST figures (5 tasks of 2 classes, one head), each with its source and
#: protocol. Strategy names map ours to theirs; None: no figure for that strategy.
PUBLISHED_SPLIT_MNIST: dict[str, dict[str, Any]] = {
    "finetune": {"value": "19.94", "source": "van de Ven et al.'s code (GMvandeVen/continual-learning, issue "
                                             "#2, its summary output): \"None\"; an MLP, Adam, one seed"},
    "lwf": {"value": "24.00", "source": "the same output: \"LwF\"; ContinualAI/continual-learning-baselines "
                                       "(Avalanche, README's batch table, class-incremental Split MNIST) reports "
                                       "ACC 0.23"},
    "joint": {"value": "97.59", "source": "the same output: \"Offline\" (all data at once)"},
    "icarl": {"value": "≈ 94", "source": "van de Ven & Tolias 2019 (\"Three scenarios for continual learning\"), "
                                       "iCaRL with 2000 exemplars, as quoted in the same issue (the code then had a "
                                       "bug that gave 72.83, since fixed); not checked against the paper here"},
}

#: Published class-incremental Split MNIST figures of methods this table does not run, for scale: generative
#: replay, whose generator learns each task's real images (ours synthesise from the classifier alone).
PUBLISHED_SPLIT_MNIST_OTHERS: tuple[tuple[str, str, str], ...] = (
    ("deep generative replay (DGR)", "91.69", "van de Ven et al.'s code, the same summary output: \"DGR\" "
                                              "(\"DGR+distil\" 90.42)"),
    ("generative replay (GR)", "75", "ContinualAI/continual-learning-baselines (Avalanche, README's batch "
                                     "table): ACC 0.75, after Shin et al. 2017"),
)


LEDGER_FORMAT = "exml_fast.cil_runs"


class RunLedger:
    """The finished runs of one table (experiment and budget), by strategy and seed, in a JSON file rewritten
    atomically after each run. An entry is a :class:`StreamResult` dict (its per-step history left out) with
    the machine, versions and commit that recorded it (for a run finished before its folder was read into the
    ledger, those of the reading); :meth:`get` returns it only while the strategy's configuration is the
    same."""

    def __init__(self, path: str | os.PathLike, experiment: str, budget: str):
        self.path = pathlib.Path(path)
        self.head = {"format": LEDGER_FORMAT, "experiment": experiment, "budget": budget}
        self.runs: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        """The runs in the file (none if there is no file yet)."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"reproduce_cil: {self.path}: not a run ledger (invalid JSON: {e}); move it "
                             "away to start a new one") from None
        if not isinstance(data, dict) or any(data.get(k) != v for k, v in self.head.items()) \
                or not isinstance(data.get("runs"), dict):
            raise ValueError(f"reproduce_cil: {self.path} is not the run ledger of {self.head['experiment']} at "
                             f"budget {self.head['budget']!r}; move it away to start a new one")
        return data["runs"]

    @staticmethod
    def key(strategy: str, seed: int) -> str:
        return f"{strategy} s{seed}"

    def has(self, strategy: str, seed: int) -> bool:
        return self.key(strategy, seed) in self.runs

    def get(self, strategy: str, seed: int, config: dict[str, Any],
            added: dict[str, Any] | None = None) -> StreamResult | None:
        """The run, if its configuration is ``config``; ``added``: options that were added to the strategy after
        the run, at the values it ran with (the strategy's ``config_added``)."""
        entry = self.runs.get(self.key(strategy, seed))
        stored = None if entry is None else entry.get("meta", {}).get("config")
        if not isinstance(stored, dict) or {**(added or {}), **stored} != json.loads(json.dumps(config)):
            return None
        return StreamResult.from_dict({k: v for k, v in entry.items() if k != "machine"})

    def machine_of(self, strategy: str, seed: int) -> dict[str, Any] | None:
        entry = self.runs.get(self.key(strategy, seed))
        return None if entry is None else entry.get("machine")

    def put(self, strategy: str, seed: int, result: StreamResult, where: dict[str, Any]) -> None:
        d = result.to_dict()
        d["meta"] = {k: v for k, v in d["meta"].items() if k != "history"}
        # Read again under the lock: another process (other seeds, say) may have added runs since this one read
        # the file, and writing back only what this process knows would silently drop them.
        with locked(self.path.with_name(f".{self.path.name}.lock")):
            self.runs = {**self._read(), self.key(strategy, seed): {**d, "machine": where}}
            text = json.dumps({**self.head, "runs": self.runs}, indent=1, allow_nan=False)
            atomic_write(self.path, lambda f: f.write(text.encode()))


def _config_of(strat: str, scenario, options: dict[str, Any], seed: int, device: torch.device,
               data_root) -> tuple[dict[str, Any], dict[str, Any]]:
    """The configuration the strategy would run with, and its ``config_added`` (built, not run: a model's
    initialisation, under a forked random state)."""
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        strategy = build_strategy(strat, None, scenario, options=options, seed=seed, device=device, progress=False,
                                  data_root=data_root)
    return strategy.config(), dict(getattr(strategy, "config_added", {}))


def _stats(values: list[float]) -> dict[str, float]:
    mean, std = mean_std([100.0 * v for v in values], ddof=1)
    return {"mean": mean, "std": std}


def _cell(s: dict[str, float]) -> str:
    return f"{s['mean']:.2f}" + ("" if math.isnan(s["std"]) else f" ± {s['std']:.2f}")


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    name = "Split MNIST" if meta["scenario"] == "split_mnist" else "Split Fashion-MNIST"
    lines = [
        f"# Class-incremental learning: {name}, 5 tasks of 2 classes, one head",
        "",
        f"- command: `{meta['command']}`",
        f"- budget: **{meta['budget']}** — {meta['budget_detail']}",
        f"- seeds 0..{meta['runs'] - 1} (class order, initialisation, every draw): {meta['runs']} runs per strategy",
        machine_line(meta["machine"]),
        f"- wall time of this invocation: {meta['wall_s']:.0f} s (finished runs are read back, not redone)",
        *(["- the runs were made at commit(s) " + ", ".join(f"`{c}`" for c in meta["commits"])
           + f" (the line above is this invocation's); {meta.get('from_ledger', 0)} of {meta['runs'] * len(rows)} "
           f"read back from the ledger `{meta['ledger']}`, the others from their run folders or run now"]
          if meta.get("commits") else []),
        "- every strategy at its defaults (no tuning; the test sets are only evaluated)",
        "",
        "| strategy | keeps real data | runs | final accuracy, all classes (%) | average incremental (%) | "
        "seconds per run | published (%) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        pub = r.get("published")
        lines.append(f"| {r['strategy']} | {'yes' if r['keeps_data'] else 'no'} | {r['runs']} | "
                     f"{_cell(r['final'])} | {_cell(r['average_incremental'])} | {r['seconds_per_run']:.0f} | "
                     + (pub["value"] if pub else "—") + " |")
    published = [r for r in rows if r.get("published")]
    if meta["scenario"] == "split_mnist" and published:
        lines += ["", "Published figures (their protocols differ from ours: an MLP and Adam there, LeNet-5-BN and "
                      "the experts' SGD recipe here):", ""]
        lines += [f"- {r['strategy']}: {r['published']['value']} — {r['published']['source']}" for r in published]
        lines += ["", "Generative replay, not in this table, for scale: a generator of images trained on each "
                      "task's real images while the task is present (the rows here that keep no real data "
                      "synthesise from the trained classifier alone):", ""]
        lines += [f"- {name}: {value} — {source}" for name, value, source in PUBLISHED_SPLIT_MNIST_OTHERS]
    elif meta["scenario"] != "split_mnist":
        lines += ["", "Split Fashion-MNIST has no published figure for these methods: these are the first."]
    if meta["budget"] != "paper":
        lines += ["", f"Budget `{meta['budget']}` is reduced: these numbers are a pipeline check, not results."]
    return "\n".join(lines) + "\n"


def reproduce_cil(
    experiment: str = "cil-mnist",
    *,
    runs: int = 5,
    seeds: Sequence[int] | None = None,
    budget: str = "paper",
    strategies: tuple[str, ...] | None = None,
    out: str | os.PathLike = "runs/reproduce/cil",
    results: str | os.PathLike | None = "benches/results",
    device: torch.device | str = "cpu",
    data_root: str | os.PathLike | None = None,
    progress: bool = False,
    command: str | None = None,
    log=None,
) -> list[dict[str, Any]]:
    """Runs (or resumes) the class-incremental table of ``experiment`` ("cil-mnist" or "cil-fmnist"); returns
    its rows and writes ``<results>/cil_{mnist,fmnist}[_<budget>].{json,md}`` (None: nothing written).

    Args:
        runs: seeds 0 .. runs-1.
        seeds: instead of ``runs``, only these seeds, and no table: their runs go into the ledger (and ``out``)
            alone. For sharing one table's seeds among processes or machines at once (the ledger takes their
            runs under a lock); a later call with ``runs`` makes the table from the ledger.
        budget: a key of :data:`CIL_BUDGETS`.
        strategies: a subset of :data:`CIL_STRATEGIES` (None: all).
        out: where the runs (with their checkpoints) live.
        device, data_root, progress: as for ``exml-fast run``.
        command: the command line to record (default: ``sys.argv``).
        log: called with one line per finished run (None: print, flushed).
    """
    check_choice(experiment, "experiment", "reproduce_cil", CIL_EXPERIMENTS)
    check_int(runs, "runs", "reproduce_cil", low=1)
    if seeds is not None:
        seeds = [check_int(r, "seeds", "reproduce_cil", low=0) for r in seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"reproduce_cil: seeds must be distinct seeds (ints >= 0), at least one; got {seeds}")
    check_choice(budget, "budget", "reproduce_cil", CIL_BUDGETS)
    chosen = tuple(strategies) if strategies is not None else CIL_STRATEGIES
    unknown = sorted(set(chosen) - set(CIL_STRATEGIES))
    if unknown or not chosen:
        raise ValueError(f"reproduce_cil: strategies must be a non-empty subset of {', '.join(CIL_STRATEGIES)}; "
                         f"got {list(chosen)}")
    log = log or (lambda line: print(line, flush=True))
    device = torch.device(device)
    scenario_name, stem = CIL_EXPERIMENTS[experiment]
    spec = CIL_BUDGETS[budget]
    out = pathlib.Path(out) / experiment / budget
    table = stem if budget == "paper" else f"{stem}_{budget}"
    ledger = RunLedger(pathlib.Path(results) / f"{table}_runs.json", experiment, budget) \
        if results is not None else None
    if device.type == "cpu" and "skd" in chosen and budget == "paper":
        # SKD's schedule has no CPU record: scaled from the 20-epoch runs (docs/cil.md). Said before the first
        # run, not after hours of it.
        epochs = spec["strategies"]["skd"]["epochs"]
        log(f"[reproduce] warning: skd at the paper budget trains {epochs} epochs a task (SKD's schedule), at "
            f"least {_skd_cpu_hours(epochs):.0f} h a seed on a CPU core, for each seed the ledger does not already "
            "hold at this schedule; it is a GPU run (--device cuda, or `make gpu-repro METHOD=skd-cil`); --budget "
            "demo checks the pipeline")
    t_start = time.perf_counter()
    # The code this process runs is the tree as it is now: a commit made while the runs go on (they take
    # hours) must not be stamped on them. Each run's date is still taken when it finishes.
    code = git_commit()
    per: dict[str, dict[str, list[float]]] = {s: {"final": [], "aia": [], "seconds": []} for s in chosen}
    commits, from_ledger = set(), 0
    for r in range(runs) if seeds is None else seeds:
        scenario = make_scenario(scenario_name, seed=r, root=data_root, **spec.get("scenario", {}))
        for strat in chosen:
            options = options_read_by(strat, {**spec["run"], **spec.get("strategies", {}).get(strat, {})})
            folder = out / f"{strat}_s{r}"
            t0 = time.perf_counter()
            result = None
            if ledger is not None and ledger.has(strat, r) and not (folder / CHECKPOINT).exists():
                result = ledger.get(strat, r, *_config_of(strat, scenario, options, r, device, data_root))
            if result is not None:
                from_ledger += 1
                how = f"from the ledger, run at commit {(ledger.machine_of(strat, r) or {}).get('commit', '?')}"
            else:
                result = run_named_strategy(strat, None, scenario, options=options, seed=r, device=device,
                                            out=folder, progress=progress, data_root=data_root)
                if ledger is not None and ledger.get(strat, r, result.meta["config"]) is None:
                    ledger.put(strat, r, result, {**machine(device), "commit": code})  # this machine's, at its end
                how = f"{time.perf_counter() - t0:.0f} s"
            if ledger is not None:
                commits.add((ledger.machine_of(strat, r) or {}).get("commit", "?"))
            per[strat]["final"].append(result.final_stream_accuracy)
            per[strat]["aia"].append(result.average_incremental_accuracy)
            per[strat]["seconds"].append(run_seconds(result))
            log(f"[reproduce] {experiment} seed {r} {strat}: final {100 * result.final_stream_accuracy:.2f} %, "
                f"average incremental {100 * result.average_incremental_accuracy:.2f} % ({how})")
    rows = []
    for strat in chosen:
        p = per[strat]
        row = {"strategy": strat, "keeps_data": STRATEGIES[strat].keeps_data, "runs": len(p["final"]),
               "final": _stats(p["final"]), "average_incremental": _stats(p["aia"]),
               "finals": [100.0 * v for v in p["final"]], "seconds_per_run": sum(p["seconds"]) / len(p["seconds"])}
        if scenario_name == "split_mnist" and strat in PUBLISHED_SPLIT_MNIST:
            row["published"] = PUBLISHED_SPLIT_MNIST[strat]
        rows.append(row)
    if seeds is not None:
        log(f"[reproduce] seed(s) {', '.join(map(str, seeds))} done"
            + ("" if ledger is None else f", in {ledger.path}; --runs K makes the table of seeds 0..K-1 from it"))
    elif results is not None:
        meta = {"experiment": experiment, "scenario": scenario_name, "budget": budget, "budget_detail": spec,
                "runs": runs, "command": command or " ".join(["exml-fast", *sys.argv[1:]]),
                "machine": machine(device), "wall_s": time.perf_counter() - t_start,
                "ledger": ledger.path.name, "from_ledger": from_ledger, "commits": sorted(commits)}
        write_records(results, table, meta, rows, _markdown(rows, meta), log=lambda m: log(f"[reproduce] {m}"))
    return rows
