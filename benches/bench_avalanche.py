"""Data-free replay inside Avalanche against Avalanche's own replay, on Split MNIST and Split Fashion-MNIST.

Every row learns the same 5 tasks of 2 classes from the same tensors (exml_fast's scenario, converted for
Avalanche by ``exml_fast.integrations.avalanche.to_avalanche_benchmark``), from the same initial LeNet-5-BN for a
given seed, with the same SGD (lr 0.01, momentum 0.9, weight decay 5e-4, batch 32, 1 epoch a task; Avalanche's
rows drop a task's last incomplete minibatch, as a one-image minibatch stops BatchNorm in training mode); the
synthetic images and the VAE's are as many per minibatch as its real images:

- ``deepinversion-cil``: exml_fast's strategy run by ``run_stream`` (the door ``exml-fast run`` opens);
- ``naive+dfr-distill``: Avalanche's ``Naive`` with ``DataFreeReplayPlugin(distill=True)`` (Eq. 11: the other
  door to the same method);
- ``naive+dfr``, ``lwf+dfr``: ``Naive`` and ``LwF`` (alpha 1, temperature 2) with the plugin, synthetic
  images learnt from their labels;
- ``generative-replay``: Avalanche's ``GenerativeReplay``, its default MLP VAE (latent 2, Adam lr 0.01) trained
  on the real data of each task (on pixels in [0, 1]: the wrapper de-normalises);
- ``replay``: Avalanche's ``Replay`` with 200 real exemplars (keeps real data: a reference, not data-free);
- ``naive``: ``Naive`` alone (the lower bound).

Synthesis ("demo" budget): DeepInversion (preset auto) from the model just trained, 50 images per class seen,
300 steps per batch of 256. Records the final accuracy on all classes (mean ± std over the seeds, and per
seed) and the wall time of each run (training and synthesis; evaluation excluded), one record per dataset:
``benches/results/avalanche_mnist`` and ``avalanche_fmnist`` (``_smoke`` for the pipeline check, seconds).

Usage:
    python benches/bench_avalanche.py [--datasets split_mnist split_fashion_mnist] [--seeds 0 1 2 3 4]
        [--budget demo|smoke] [--rows NAME ...] [--threads N] [--out benches/results] [--runs FILE]

Each finished run is appended to ``--runs`` (default ``runs/bench_avalanche/<budget>.jsonl``); a rerun of the same
command skips the runs it holds (same dataset, row, seed and budget) and records them with the new ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
from benchlib import RESULTS, env_markdown, environment, record
from torch import nn

from exml_fast.cl.engine import evaluate_strategy
from exml_fast.cl.scenarios import make_scenario
from exml_fast.cl.strategies import build_strategy
from exml_fast.integrations.avalanche import DataFreeReplayPlugin, to_avalanche_benchmark
from exml_fast.models import build_model

#: dataset (scenario name) -> the record's stem
DATASETS = {"split_mnist": "avalanche_mnist", "split_fashion_mnist": "avalanche_fmnist"}
#: budget -> scenario caps, training and synthesis settings
BUDGETS = {
    "demo": {"scenario": {}, "epochs": 1, "per_class": 50, "synth_iterations": 300, "synth_batch_size": 256},
    "smoke": {"scenario": {"max_train_per_experience": 300, "max_test_per_experience": 200}, "epochs": 1,
              "per_class": 4, "synth_iterations": 3, "synth_batch_size": 32},
}
SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
BATCH = 32
MEM_SIZE = 200
ROWS = ("deepinversion-cil", "naive+dfr-distill", "naive+dfr", "lwf+dfr", "generative-replay", "replay", "naive")
#: what each row keeps of past tasks' real data (the others: nothing)
KEEPS = {"generative-replay": "a VAE trained on it", "replay": f"{MEM_SIZE} exemplars"}


class PixelVAE(nn.Module):
    """Avalanche's default generator (``MlpVAE``, latent 2) for inputs normalised with the scenario's statistics:
    its decoder ends in MNIST's normalisation (0.1307, 0.3081), so it is trained on the inputs moved to that
    normalisation and its samples are moved back (the identity on MNIST; a fair VAE on Fashion-MNIST)."""

    AVALANCHE_STATS = (0.1307, 0.3081)

    def __init__(self, shape, mean, std, device):
        from avalanche.models.generator import MlpVAE

        super().__init__()
        self.vae = MlpVAE(tuple(shape), nhid=2, device=device)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.device = torch.device(device)

    def to_vae(self, x):
        m, s = self.AVALANCHE_STATS
        return (x * self.std + self.mean - m) / s

    def forward(self, x):
        return self.vae(self.to_vae(x))

    @torch.no_grad()
    def generate(self, batch_size=None):
        m, s = self.AVALANCHE_STATS
        return (self.vae.generate(batch_size) * s + m - self.mean) / self.std


def _vae_strategy(shape, mean, std, epochs, device):
    """Avalanche's default generator strategy of GenerativeReplay (VAETraining, Adam lr 0.01, weight decay 1e-4,
    VAE_loss, its GenerativeReplayPlugin) on :class:`PixelVAE`."""
    from avalanche.models.generator import VAE_loss
    from avalanche.training import VAETraining
    from avalanche.training.plugins import GenerativeReplayPlugin

    class DropLastVAETraining(VAETraining):
        # GenerativeReplay trains its generator on each experience without the train() kwargs: a task's last
        # one-image minibatch would stop the VAE's BatchNorm as it stops the classifier's (see run_row)
        def make_train_dataloader(self, **kwargs):
            super().make_train_dataloader(**{**kwargs, "drop_last": True})

    vae = PixelVAE(shape, mean, std, device)
    opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=0.01, weight_decay=1e-4)
    return DropLastVAETraining(model=vae, optimizer=opt, criterion=lambda x, out: VAE_loss(vae.to_vae(x), out),
                       train_mb_size=BATCH, train_epochs=epochs, device=device, plugins=[GenerativeReplayPlugin()],
                       evaluator=None)


def _avalanche_strategy(row, model, sc, budget, seed, device):
    from avalanche.training import LwF, Naive, Replay
    from avalanche.training.supervised import GenerativeReplay

    common = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), **SGD),
              "criterion": nn.CrossEntropyLoss(), "train_mb_size": BATCH, "train_epochs": budget["epochs"],
              "eval_mb_size": 256, "device": device, "evaluator": None}
    plugins = []
    if "dfr" in row:
        plugins.append(DataFreeReplayPlugin(per_class=budget["per_class"], synth_iterations=budget["synth_iterations"],
                                            synth_batch_size=budget["synth_batch_size"], mean=sc.mean, std=sc.std,
                                            distill=row.endswith("distill"), seed=seed))
    if row.startswith("lwf"):
        return LwF(alpha=1.0, temperature=2.0, plugins=plugins, **common), plugins
    if row == "generative-replay":
        gen = _vae_strategy(sc.input_shape, sc.mean, sc.std, budget["epochs"], device)
        return GenerativeReplay(generator_strategy=gen, **common), plugins
    if row == "replay":
        return Replay(mem_size=MEM_SIZE, **common), plugins
    return Naive(plugins=plugins, **common), plugins


@torch.no_grad()
def _accuracy(model, sc) -> float:
    x, y, _ = sc.test_set()
    model.eval()
    correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(y), 1000))
    return 100.0 * correct / len(y)


def run_row(row: str, sc, budget: dict, seed: int, device: str = "cpu") -> dict:
    """One run of ``row`` on scenario ``sc``: its final accuracy on all classes (%) and wall time (s)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    init = build_model("lenet5_bn", num_classes=sc.num_classes)
    model = copy.deepcopy(init)
    t0 = time.perf_counter()
    if row == "deepinversion-cil":
        options = {"epochs": budget["epochs"], "batch_size": BATCH, **SGD, "synth_per_class": budget["per_class"],
                   "synth_iterations": budget["synth_iterations"], "synth_batch_size": budget["synth_batch_size"]}
        strategy = build_strategy("deepinversion-cil", None, sc, options=options, seed=seed, device=device,
                                  progress=False, model=model)
        for exp in sc.experiences:
            strategy.train(exp)
        wall = time.perf_counter() - t0
        acc, _, _ = evaluate_strategy(strategy, sc)
        sizes = [e.num_test for e in sc.experiences]
        return {"final": 100 * sum(a * n for a, n in zip(acc, sizes)) / sum(sizes), "wall_s": wall}
    bm = to_avalanche_benchmark(sc)
    strategy, _ = _avalanche_strategy(row, model, sc, budget, seed, device)
    torch.manual_seed(seed)  # Avalanche's minibatch order comes from the global generator
    for exp in bm.train_stream:
        # drop_last: a last minibatch of one image stops a BN model in training mode (exml_fast's loops fold it
        # into the one before; Avalanche's keeps it); at most 31 of a task's ~12000 images are left out
        strategy.train(exp, drop_last=True)
    wall = time.perf_counter() - t0
    return {"final": _accuracy(model, sc), "wall_s": wall}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="demo")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS), help="directory for the records ('' to not record)")
    p.add_argument("--runs", default=None, help="the finished runs, one JSON line each (resume)")
    args = p.parse_args(argv)
    runs_path = args.runs or os.path.join("runs", "bench_avalanche", f"{args.budget}.jsonl")
    done = {}
    if os.path.exists(runs_path):
        with open(runs_path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[(r["dataset"], r["row"], r["seed"])] = r
    os.makedirs(os.path.dirname(os.path.abspath(runs_path)), exist_ok=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    argv_list = sys.argv[1:] if argv is None else list(argv)
    for dataset in args.datasets:
        t0 = time.perf_counter()
        env = environment("cpu", "Avalanche data-free replay")
        rows = []
        for row in [r for r in ROWS if r in args.rows]:
            runs = []
            for seed in args.seeds:
                if (dataset, row, seed) in done:
                    runs.append(done[(dataset, row, seed)])
                    continue
                sc = make_scenario(dataset, n_experiences=5, seed=seed, **budget["scenario"])
                runs.append({"dataset": dataset, "row": row, "seed": seed, **run_row(row, sc, budget, seed)})
                with open(runs_path, "a") as f:  # one line a run: a kill loses at most the run under way
                    f.write(json.dumps(runs[-1]) + "\n")
                print(f"  {dataset} {row}, seed {seed}: final {runs[-1]['final']:.2f} %, "
                      f"{runs[-1]['wall_s']:.1f} s", flush=True)
            finals = [r["final"] for r in runs]
            walls = [r["wall_s"] for r in runs]
            rows.append({"row": row, "keeps": KEEPS.get(row, "nothing"), "finals": finals, "walls_s": walls,
                         "from_log": sum(1 for r in runs if r.get("from_log")),
                         "final_mean": statistics.mean(finals),
                         "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                         "wall_s_median": statistics.median(walls)})
        env["wall_s"] = time.perf_counter() - t0
        rec = {"env": env, "argv": argv_list, "dataset": dataset, "budget": args.budget, "budget_detail": budget,
               "seeds": args.seeds, "sgd": {**SGD, "batch_size": BATCH}, "mem_size": MEM_SIZE, "rows": rows}
        stem = DATASETS[dataset] + ("" if args.budget == "demo" else f"_{args.budget}")
        lines = env_markdown(env, f"Avalanche data-free replay, {dataset}",
                             "python benches/bench_avalanche.py " + " ".join(argv_list))
        lines += [f"{dataset}, 5 tasks of 2 classes (class order from each seed), LeNet-5-BN from the same "
                  f"initialisation per seed, SGD lr {SGD['lr']} momentum {SGD['momentum']} weight decay "
                  f"{SGD['weight_decay']}, batch {BATCH}, {budget['epochs']} epoch(s) a task; budget "
                  f"**{args.budget}** ({budget}); seeds {args.seeds}. Final accuracy on all classes, % (mean ± "
                  "std over the seeds), and the median wall time of a run (training and synthesis).", "",
                  "| row | keeps of past data | final, mean ± std | final (per seed) | wall, median (s) |",
                  "|---|---|---:|---|---:|"]
        logged = sum(r["from_log"] for r in rows)
        if logged:
            lines[-2:-2] = [f"{logged} of the runs were read back from the printed log of an earlier run of the "
                            "same code (final to 0.01 %, wall to 0.1 s), which stopped on a later row.", ""]
        for r in rows:
            lines.append(f"| {r['row']} | {r['keeps']} | {r['final_mean']:.2f} ± "
                         f"{r['final_std']:.2f} | {', '.join(f'{v:.2f}' for v in r['finals'])} | "
                         f"{r['wall_s_median']:.1f} |")
        if args.out:
            record(args.out, stem, rec, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
