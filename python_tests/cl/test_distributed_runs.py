"""Runs under torch.distributed (gloo, 2 and 3 CPU processes): an ExML run (MI-ED) and a
class-incremental run (LwF) end where one process ends, up to the order of the floating-point sums;
rank 0 alone writes checkpoints; a run stopped under one number of processes resumes under another;
`exml-fast run` under torchrun does the same from the command line (a LeNet-5-BN learner: BatchNorm
statistics over the ranks).

What "up to reduction order" means here: DDP sums the ranks' gradients of their shares of a minibatch,
one process sums over the whole minibatch in one backward, so each step's gradient differs in its last
bits (float32: relative 1e-7). Thirty to a hundred SGD steps carry that to about 1e-6 in the weights
(measured: at most 7e-7 here); the tests allow 1e-4, far above that and far below what one step on
other rows or other augmentation draws gives (each step moves the weights by lr * gradient, 1e-3 and
more here; the runs move them by over 100 * 1e-4 in all, asserted). Accuracies are counts of argmax
hits: equal unless a test input sits on a decision boundary within 1e-4, which none of these does
(asserted exactly). One step in float64 shows the math itself is the same (1e-9).

Every process runs one thread: the kernels of one process and of a rank are then the same ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _util import band_images, num_threads, toy_expert_stream

from exml_fast._utils.dist import shard_rows
from exml_fast.cl import engine
from exml_fast.cl import strategies as S
from exml_fast.cl.engine import run_stream
from exml_fast.cl.experts import ExpertStream
from exml_fast.cl.parallel import ShardedSteps
from exml_fast.cl.scenarios import Experience, Scenario
from exml_fast.cli.common import end_without_teardown
from exml_fast.data import find_data_root
from exml_fast.models import build_model
from exml_fast.synth import ModelInversion

ROOT = Path(__file__).resolve().parents[2]
K = 6
SPLITS = [(0, 1), (2, 3), (4, 5)]
TOL = 1e-4  # weights, see the module's docstring

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch has no torch.distributed with gloo")


def _scenario() -> Scenario:
    exps = []
    for i, cls in enumerate(SPLITS):
        tx, ty = band_images(cls, 36, seed=i)  # 72 rows: minibatches of 10, the last of 2
        vx, vy = band_images(cls, 20 + 5 * i, seed=100 + i)
        exps.append(Experience(i, cls, None, tx, ty, vx, vy))
    return Scenario("toy", "toy", K, (1, 32, 32), (0.5,), (0.5,), False, 0, tuple(range(K)), exps)


def _strategy(kind: str):
    torch.manual_seed(11)
    model = build_model("lenet5", num_classes=K)
    if kind == "mi-ed":
        return S.ExModelDistillation(model, source=S.SynthesizerSource(ModelInversion, iterations=4, batch_size=5,
                                                                       warn_below=None),
                                     buffer_size=24, iterations=30, batch_size=8, lr=0.05, seed=3, progress=False)
    return S.LwF(model, epochs=2, batch_size=10, lr=0.05, augment=True, seed=3, progress=False)


def _run(kind: str, stream_dir: str, out: str, **kw):
    scenario = _scenario()
    stream = ExpertStream(stream_dir) if kind == "mi-ed" else None
    strategy = _strategy(kind)
    result = run_stream(strategy, stream, scenario, out=out, plots=False, log=None, **kw)
    return result, strategy


def _worker(rank: int, world: int, init: str, tmp: str, kind: str, stream_dir: str, out: str, kw: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        saves = []
        original = engine._save_checkpoint
        engine._save_checkpoint = lambda path, payload: (saves.append(str(path)), original(path, payload))
        result, strategy = _run(kind, stream_dir, out, **kw)
        torch.save({"acc": result.acc_matrix, "params": strategy.model.state_dict(), "saves": saves,
                    "losses": [h["final_loss"] for h in strategy.history]}, os.path.join(tmp, f"rank{rank}.pt"))
        dist.barrier()  # leave together, as the CLI does: gloo may abort a rank whose peer destroyed the group
    finally:
        dist.destroy_process_group()
    # Saved, and the group destroyed: skip the teardown, where a gloo rank may still abort under load (SIGABRT,
    # "terminate called without an active exception"; 1 in 3 runs beside a CPU hog), as the CLI does.
    end_without_teardown(0)


def _bn_step(seed_x: int, n: int):
    """A float64 LeNet-5-BN in training mode, and a minibatch of n rows for one cross-entropy step."""
    torch.manual_seed(0)
    model = build_model("lenet5_bn", num_classes=K).double().train()
    g = torch.Generator().manual_seed(seed_x)
    return model, torch.randn(n, 1, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, K, (n,), generator=g)


def _step_worker(rank: int, world: int, init: str, tmp: str, n: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, x, y = _bn_step(1, n)
        holder = types.SimpleNamespace(model=model, distributed=None)
        steps = ShardedSteps(holder)
        lo, hi, scale = steps.rows(n)
        steps.scaled(torch.nn.functional.cross_entropy(steps.forward(x[lo:hi]), y[lo:hi]), scale).backward()
        steps.finish()
        assert all(type(m).forward is m.forward.__func__ for m in model.modules() if hasattr(m, "forward")
                   and hasattr(m.forward, "__func__"))  # the BatchNorm patch is gone
        torch.save({"grads": {k: p.grad for k, p in model.named_parameters()}, "buffers": dict(model.named_buffers())},
                   os.path.join(tmp, f"rank{rank}.pt"))
        dist.barrier()  # leave together (as run_stream and the CLI do): gloo may abort a rank left behind
    finally:
        dist.destroy_process_group()
    end_without_teardown(0)  # as _worker


@pytest.mark.parametrize("world, n", [(2, 10), (3, 7), (3, 2)])
def test_a_sharded_step_with_batchnorm_is_the_whole_minibatch_step(world, n, tmp_path):
    # float64, so that the only difference is the order of the sums (1e-15 each); BatchNorm over 2 rows
    # divides by a small variance, which the 1e-9 bound leaves room for. (3, 2): rank 0 has no row.
    model, x, y = _bn_step(1, n)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    mp.spawn(_step_worker, args=(world, f"file://{tmp_path / 'pg'}", str(tmp_path), n), nprocs=world, join=True)
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for k, p in model.named_parameters():
            assert torch.allclose(got["grads"][k], p.grad, rtol=1e-9, atol=1e-9 * float(p.grad.abs().max())), k
        for k, b in model.named_buffers():  # running statistics from the whole minibatch, as one process
            assert torch.allclose(got["buffers"][k].double(), b.double(), rtol=1e-12, atol=1e-12), k


def _spawn(tmp: Path, world: int, kind: str, stream_dir, out: Path, **kw) -> list[dict]:
    for f in tmp.glob("rank*.pt"):
        f.unlink()
    rendezvous = tmp / f"pg{len(list(tmp.glob('pg*')))}"  # a fresh file per spawn
    init = f"file://{rendezvous}"
    mp.spawn(_worker, args=(world, init, str(tmp), kind, str(stream_dir), str(out), kw), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stream")
    toy_expert_stream(path, _scenario(), num_classes=K)
    return path


@pytest.fixture(scope="module")
def single(stream_dir, tmp_path_factory):
    """One process's run of each kind: (acc matrix, weights, losses)."""
    out = {}
    with num_threads(1):
        for kind in ("mi-ed", "lwf"):
            result, strategy = _run(kind, str(stream_dir), str(tmp_path_factory.mktemp(kind)))
            out[kind] = {"acc": result.acc_matrix, "params": strategy.model.state_dict(),
                         "losses": [h["final_loss"] for h in strategy.history]}
    return out


def _initial() -> dict:
    torch.manual_seed(11)
    return build_model("lenet5", num_classes=K).state_dict()


def _assert_as_one_process(ranks: list[dict], one: dict) -> None:
    assert _max_diff(one["params"], _initial()) > 100 * TOL  # the tolerance is far below what a run moves
    for r in ranks[1:]:  # every rank ends with the same model and result
        assert r["acc"] == ranks[0]["acc"] and _max_diff(r["params"], ranks[0]["params"]) == 0.0
    diff = _max_diff(ranks[0]["params"], one["params"])
    assert diff <= TOL, diff
    assert ranks[0]["acc"] == one["acc"]
    assert ranks[0]["losses"] == pytest.approx(one["losses"], rel=1e-4)


@pytest.mark.parametrize("kind", ["mi-ed", "lwf"])
def test_two_processes_end_where_one_does_and_rank_0_alone_checkpoints(kind, stream_dir, single, tmp_path):
    ranks = _spawn(tmp_path, 2, kind, stream_dir, tmp_path / "run")
    _assert_as_one_process(ranks, single[kind])
    assert ranks[0]["saves"] == [str(tmp_path / "run" / "checkpoint.pt")] * 3 and ranks[1]["saves"] == []
    assert (tmp_path / "run" / "result.json").exists()


def test_three_processes_with_an_empty_share_of_the_last_minibatch(stream_dir, single, tmp_path):
    # LwF's last minibatch of each epoch holds 2 rows: rank 0 of 3 has none, runs row 0 at weight 0.
    assert [shard_rows(2, r, 3) for r in range(3)] == [(0, 0), (0, 1), (1, 2)]
    ranks = _spawn(tmp_path, 3, "lwf", stream_dir, tmp_path / "run")
    _assert_as_one_process(ranks, single["lwf"])


@pytest.mark.parametrize("kind, first, then", [("mi-ed", 2, 1), ("lwf", 1, 2)])
def test_a_run_stopped_under_k_processes_resumes_under_another_number(kind, first, then, stream_dir, single,
                                                                     tmp_path):
    out = tmp_path / "run"
    if first == 1:
        with num_threads(1):
            _run(kind, str(stream_dir), str(out), stop_after=1)
    else:
        _spawn(tmp_path, first, kind, stream_dir, out, stop_after=1)
    if then == 1:
        with num_threads(1):
            result, strategy = _run(kind, str(stream_dir), str(out), resume=True)
        ranks = [{"acc": result.acc_matrix, "params": strategy.model.state_dict(),
                  "losses": [h["final_loss"] for h in strategy.history]}]
    else:
        ranks = _spawn(tmp_path, then, kind, stream_dir, out, resume=True)
    _assert_as_one_process(ranks, single[kind])


@pytest.mark.skipif(find_data_root("mnist") is None, reason="MNIST files not found (set EXML_FAST_DATA)")
def test_run_command_under_torchrun_and_resumed_by_one_process(tmp_path):
    args = ["run", "--strategy", "lwf", "--scenario", "split_mnist", "--n-experiences", "2", "--max-train", "120",
            "--epochs", "1", "--batch-size", "16", "--augment", "--seed", "2", "--device", "cpu", "--no-progress",
            "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)

    def cli(*extra, procs=1):
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
        done = subprocess.run([sys.executable, *launch, "-m", "exml_fast", *args, *extra], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    cli("--out", str(tmp_path / "one"))
    two = cli("--out", str(tmp_path / "two"), procs=2)
    assert "sharded over 2 processes (torch.distributed, gloo)" in two
    assert two.count("[run] lwf on split_mnist") == 1 and two.count("[result] lwf") == 1  # rank 0 prints
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    got = json.loads((tmp_path / "two" / "result.json").read_text())
    assert got["acc_matrix"] == one["acc_matrix"]
    # Stopped after the first task under torchrun, finished by one process: the same numbers again.
    cli("--out", str(tmp_path / "mixed"), "--stop-after", "1", procs=2)
    assert "resuming" in cli("--out", str(tmp_path / "mixed"), "--resume")
    assert json.loads((tmp_path / "mixed" / "result.json").read_text())["acc_matrix"] == one["acc_matrix"]
