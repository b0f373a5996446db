"""Synthesis sharded over torch.distributed ranks (gloo, 2 CPU processes): the union equals the
single-process job bit for bit, rank 0 alone marks it complete, an error of rank 0's reaches every
rank, a rank that dies leaves an unfinished job that a rerun completes, and `exml-fast synthesize`
under torchrun does the same from the command line.

Every process runs one thread (torchrun's default for its workers, and set here for the others):
the same kernels in the same order, so equal seeds give equal bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _util import num_threads

from exml_fast.checkpoint import save_model
from exml_fast.models import build_model
from exml_fast.synth import DeepInversion, SyntheticBatch, load_synthetic

ROOT = Path(__file__).resolve().parents[2]
N, BATCH, ITERS, SEED = 10, 3, 3, 11  # 4 batches: rank 0 owns 0 and 2, rank 1 owns 1 and 3

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch has no torch.distributed with gloo")


def _teacher() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model("lenet5bn").eval()


def _synth(teacher=None) -> DeepInversion:
    return DeepInversion(teacher if teacher is not None else _teacher(), input_shape=(1, 32, 32), mean=0.13,
                         std=0.31, iterations=ITERS, batch_size=BATCH, warn_below=None)  # 3 steps: no agreement


def _assert_same(a: SyntheticBatch, b: SyntheticBatch) -> None:
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.losses.keys() == b.losses.keys()
    for k in a.losses:
        assert torch.equal(a.losses[k], b.losses[k]), k


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> SyntheticBatch:
    with num_threads(1):
        return _synth().synthesize(N, generator=SEED, progress=False,
                                   save_to=tmp_path_factory.mktemp("single") / "job")


def _worker(rank: int, world: int, init: str, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        synth = _synth()
        job = os.path.join(out, "job")
        if mode == "union":
            own = [b.x.clone() for b in synth.synthesize_iter(N, generator=SEED, progress=False, save_to=job)]
            assert len(own) == 2  # batches rank and rank + 2 of 4
            batch = synth.synthesize(N, generator=SEED, progress=False, save_to=job)  # resumes: reads all back
            torch.save({"x": batch.x, "y": batch.y, "losses": batch.losses, "own": own},
                       os.path.join(out, f"rank{rank}.pt"))
        elif mode == "other-job":
            try:
                synth.synthesize(N, generator=SEED, progress=False, save_to=job, iterations=ITERS + 1)
            except ValueError as e:
                Path(out, f"rank{rank}.err").write_text(str(e))
        elif mode == "rank1-dies":
            if rank == 1:
                original = synth._synthesize_batch

                def dies_on_the_second(labels, *, offset, **kw):
                    if offset >= 3 * BATCH:  # batch 3, rank 1's second
                        raise RuntimeError("rank 1 dies")
                    return original(labels, offset=offset, **kw)

                synth._synthesize_batch = dies_on_the_second
            synth.synthesize(N, generator=SEED, progress=False, save_to=job)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, mode: str) -> None:
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path), mode), nprocs=2, join=True)


def test_two_ranks_give_the_single_process_job_and_every_rank_returns_it_all(tmp_path, single):
    _spawn(tmp_path, "union")
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["job"]["seed"] == SEED
    _assert_same(load_synthetic(tmp_path / "job"), single)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        _assert_same(SyntheticBatch(got["x"], got["y"], losses=got["losses"]), single)
        own = got["own"]  # the batches this rank synthesised: b = rank, rank + 2
        assert torch.equal(own[0], single.x[rank * BATCH:(rank + 1) * BATCH])
        assert torch.equal(own[1], single.x[(rank + 2) * BATCH:(rank + 3) * BATCH])


def test_an_error_of_rank_0_reaches_every_rank(tmp_path):
    _synth().synthesize(N, generator=SEED, progress=False, save_to=tmp_path / "job", iterations=1)
    _spawn(tmp_path, "other-job")
    for rank in (0, 1):
        assert "holds a different synthesis job (iterations was 1, now 4)" in (tmp_path / f"rank{rank}.err").read_text()


def test_a_rank_that_dies_leaves_an_unfinished_job_that_a_rerun_completes(tmp_path, single):
    # spawn reports whichever process failed first: rank 1 itself, or rank 0, whose barrier gloo ends
    # with an error when rank 1's connection goes (it does not hang; gloo's words vary: closed, reset).
    with pytest.raises(mp.ProcessRaisedException, match=r"rank 1 dies|in barrier\n"):
        _spawn(tmp_path, "rank1-dies")
    job = tmp_path / "job"
    assert not json.loads((job / "manifest.json").read_text())["complete"]
    with pytest.raises(ValueError, match="not finished"):
        load_synthetic(job)
    assert not (job / "shard_00003.pt").exists()
    with num_threads(1):  # the rerun (one process here) keeps the shards on disk and makes the rest
        again = _synth().synthesize(N, generator=SEED, progress=False, save_to=job)
    _assert_same(again, single)
    assert json.loads((job / "manifest.json").read_text())["complete"]


def test_distributed_argument_errors(tmp_path):
    synth = _synth()
    with pytest.raises(ValueError, match="distributed=True needs an initialised torch.distributed"):
        synth.synthesize(2, progress=False, save_to=tmp_path / "j", distributed=True)
    with pytest.raises(TypeError, match="distributed must be None, True or False"):
        synth.synthesize(2, progress=False, distributed="yes")
    # No group: None and False are the single-process job.
    a = synth.synthesize(4, generator=1, progress=False, distributed=False, iterations=1)
    b = synth.synthesize(4, generator=1, progress=False, iterations=1)
    _assert_same(a, b)


def test_synthesize_command_under_torchrun(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    save_model(_teacher(), ckpt, arch="lenet5bn", num_classes=10, in_channels=1, input_shape=(1, 32, 32),
               mean=0.13, std=0.31)
    args = ["synthesize", "--teacher", str(ckpt), "--method", "deepinversion", "-n", str(N), "--batch-size",
            str(BATCH), "--iterations", str(ITERS), "--seed", str(SEED), "--device", "cpu", "--no-progress",
            "--no-grid"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "exml_fast", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "exml_fast", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "sharded over 2 ranks" in two.stdout
    assert "[synthesize rank 0/2] 6 images of this rank's batches" in two.stdout
    assert "[synthesize rank 1/2] 4 images of this rank's batches" in two.stdout
    assert "all 2 ranks done: the job's 10 images are complete" in two.stdout
    _assert_same(load_synthetic(tmp_path / "two"), load_synthetic(tmp_path / "one"))
    # A rerun under torchrun finds every shard on disk and does no new work.
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "exml_fast", *args, "--out", str(tmp_path / "two")],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("0 made by this run") == 2
