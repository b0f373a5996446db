"""The ExML run loop: evaluation after each expert, checkpoints, resume, refusals."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _util import band_images, mount_namespace, num_threads, toy_expert_stream

from exml_fast.cl import strategies as S
from exml_fast.cl.engine import CHECKPOINT, RESULT, RunError, run_stream
from exml_fast.cl.experts import Expert, ExpertStream
from exml_fast.cl.metrics import StreamResult
from exml_fast.cl.scenarios import Experience, Scenario
from exml_fast.models import build_model
from exml_fast.synth import AuxiliaryData
from exml_fast.training import train_classifier

K = 6
SPLITS = [(0, 1), (2, 3), (4, 5)]


def _scenario(multi_task=False):
    exps = []
    for i, cls in enumerate(SPLITS):
        tx, ty = band_images(cls, 40, seed=i)
        vx, vy = band_images(cls, 20 + 5 * i, seed=100 + i)  # unequal test sizes
        exps.append(Experience(i, cls, i if multi_task else None, tx, ty, vx, vy))
    return Scenario("toy", "toy", K, (1, 32, 32), (0.5,), (0.5,), multi_task, 0, tuple(range(K)), exps)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    scenario = _scenario()
    return scenario, toy_expert_stream(tmp_path_factory.mktemp("stream"), scenario, num_classes=K)


def _replay(scenario, seed=0, iterations=30):
    torch.manual_seed(11)
    return S.ExModelDistillation(build_model("lenet5", num_classes=K), source=S.RealReplay(scenario),
                                 buffer_size=60, iterations=iterations, lr=0.05, seed=seed, progress=False)


def test_run_fills_the_accuracy_matrix_and_writes_result_and_plots(toy, tmp_path):
    scenario, stream = toy
    lines = []
    result = run_stream(_replay(scenario), stream, scenario, out=tmp_path, log=lines.append)
    assert len(result.acc_matrix) == 3 and all(len(r) == 3 for r in result.acc_matrix)
    assert result.test_sizes == [40, 50, 60]
    assert result.meta["complete"] and len(lines) == 3 and "experience 3/3" in lines[-1]
    assert 0.0 <= result.final_stream_accuracy <= 1.0
    # Eq. 2 over the union, weighted by the test sizes.
    r = result.acc_matrix[-1]
    assert result.final_stream_accuracy == pytest.approx((40 * r[0] + 50 * r[1] + 60 * r[2]) / 150)
    saved = StreamResult.load_json(tmp_path / RESULT)
    assert saved.acc_matrix == result.acc_matrix and saved.strategy == "replay-ed"
    for name in ("accuracy_matrix.png", "stream_accuracy.png", "buffer.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Per-class accuracy covers every class seen.
    assert all(0.0 <= a <= 1.0 for a in result.per_class_accuracy)


def test_killed_run_resumes_to_the_same_numbers(toy, tmp_path):
    scenario, stream = toy
    full = run_stream(_replay(scenario), stream, scenario, out=tmp_path / "a", plots=False, log=None)
    part = run_stream(_replay(scenario), stream, scenario, out=tmp_path / "b", stop_after=1, plots=False, log=None)
    assert not part.meta["complete"] and len(part.acc_matrix) == 1
    assert not (tmp_path / "b" / RESULT).exists() and (tmp_path / "b" / CHECKPOINT).exists()
    torch.manual_seed(999)  # a different global RNG state must not matter
    fresh = _replay(scenario)
    resumed = run_stream(fresh, stream, scenario, out=tmp_path / "b", resume=True, plots=False, log=None)
    assert resumed.acc_matrix == full.acc_matrix
    assert resumed.per_class_accuracy == full.per_class_accuracy
    a = json.loads((tmp_path / "a" / RESULT).read_text())
    b = json.loads((tmp_path / "b" / RESULT).read_text())
    assert a["summary"] == b["summary"]


def test_run_folder_refusals(toy, tmp_path):
    scenario, stream = toy
    run_stream(_replay(scenario), stream, scenario, out=tmp_path, stop_after=1, plots=False, log=None)
    with pytest.raises(RunError, match="resume"):
        run_stream(_replay(scenario), stream, scenario, out=tmp_path, plots=False, log=None)
    with pytest.raises(RunError, match="iterations"):
        run_stream(_replay(scenario, iterations=31), stream, scenario, out=tmp_path, resume=True, plots=False,
                   log=None)
    with pytest.raises(RunError, match="seed"):
        run_stream(_replay(scenario, seed=5), stream, scenario, out=tmp_path, resume=True, plots=False, log=None)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="not a readable run checkpoint"):
        run_stream(_replay(scenario), stream, scenario, out=tmp_path, resume=True, plots=False, log=None)


def test_run_refuses_a_stream_of_another_scenario(toy):
    scenario, stream = toy
    other = _scenario()
    other.experiences[0] = Experience(0, (0, 2), None, *[t for t in (other.experiences[0].train_x,
                                                                       other.experiences[0].train_y,
                                                                       other.experiences[0].test_x,
                                                                       other.experiences[0].test_y)])
    with pytest.raises(ValueError, match="another scenario"):
        run_stream(S.EnsembleAverage(progress=False), stream, other, log=None)
    short = _scenario()
    short.experiences = short.experiences[:2]
    with pytest.raises(ValueError, match="3 experts"):
        run_stream(S.EnsembleAverage(progress=False), stream, short, log=None)


def test_oracle_future_entries_are_nan_and_its_accuracy_is_high(toy, tmp_path):
    scenario, stream = toy
    result = run_stream(S.OracleEnsemble(progress=False), stream, scenario, out=tmp_path, plots=False, log=None)
    m = result.acc_matrix
    assert m[0][1] != m[0][1] and m[0][2] != m[0][2]  # nan: the oracle has no expert for a task not seen
    assert result.final_stream_accuracy > 0.9
    assert StreamResult.load_json(tmp_path / RESULT).final_stream_accuracy == result.final_stream_accuracy


def test_baselines_run_in_the_loop(toy):
    scenario, stream = toy
    for strategy in (S.EnsembleAverage(progress=False), S.MinEntropyEnsemble(progress=False),
                     S.ParameterAverage(progress=False)):
        result = run_stream(strategy, stream, scenario, log=None)
        assert result.meta["complete"] and len(result.acc_matrix) == 3


def test_multi_task_stream_uses_the_task_heads(tmp_path):
    """MT scenario: experts with task labels; ED and the oracle answer within each task's head."""
    scenario = _scenario(multi_task=True)
    stream = ExpertStream.create(tmp_path / "mt", meta={"scenario": {"name": "toy_mt"}})
    torch.manual_seed(4)
    for exp in scenario.experiences:
        m = build_model("lenet5", num_classes=K)
        train_classifier(m, exp.train_x, exp.train_y, epochs=2, batch_size=16, lr=0.05,
                         generator=torch.Generator().manual_seed(exp.index))
        stream.append(Expert(m, exp.classes, arch="lenet5", arch_kwargs={"num_classes": K, "in_channels": 1},
                             task_id=exp.task_id, meta={"input_shape": [1, 32, 32], "mean": [0.5], "std": [0.5],
                                                        "experience": exp.index}))
    ed = run_stream(_replay(scenario, iterations=60), stream, scenario, log=None)
    oracle = run_stream(S.OracleEnsemble(progress=False), stream, scenario, log=None)
    for result in (ed, oracle):
        m = result.acc_matrix
        assert m[0][1] != m[0][1]  # nan: task 1's head is unknown after the first expert
        assert result.final_stream_accuracy > 0.9  # two classes per head, easy bands


def test_replay_ed_is_not_ex_model_and_says_so(toy, tmp_path):
    scenario, stream = toy
    replay = _replay(scenario)
    assert replay.ex_model is False and replay.config()["ex_model"] is False
    synthetic = S.ExModelDistillation(build_model("lenet5", num_classes=K), source=S.SynthesizerSource(
        AuxiliaryData, data=torch.zeros(4, 1, 32, 32)), progress=False)
    assert synthetic.ex_model is True and synthetic.config()["ex_model"] is True
    assert S.OracleEnsemble().config()["ex_model"] is False and S.ParameterAverage().config()["ex_model"] is True
    result = run_stream(replay, stream, scenario, out=tmp_path / "r", stop_after=1, plots=False, log=None)
    assert result.meta["ex_model"] is False and result.meta["config"]["ex_model"] is False
    assert "- ex-model (no data of the experiences, no past expert kept): no" in result.to_markdown()


def test_checkpoint_written_before_ex_model_was_recorded_resumes(toy, tmp_path):
    scenario, stream = toy
    run_stream(_replay(scenario), stream, scenario, out=tmp_path, stop_after=1, plots=False, log=None)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    del ckpt["job"]["strategy"]["ex_model"]
    torch.save(ckpt, tmp_path / CHECKPOINT)
    resumed = run_stream(_replay(scenario), stream, scenario, out=tmp_path, resume=True, plots=False, log=None)
    assert resumed.meta["complete"] and resumed.meta["ex_model"] is False


def test_unwritable_out_fails_before_any_training(toy, tmp_path):
    scenario, stream = toy
    (tmp_path / "file").write_text("not a folder")
    strategy = _replay(scenario)
    strategy.train = lambda experience: pytest.fail("trained although the out folder cannot take the checkpoint")
    with pytest.raises(OSError, match=r"run_stream: out: cannot write into .*file/run") as info:
        run_stream(strategy, stream, scenario, out=tmp_path / "file" / "run", plots=False, log=None)
    assert info.value.errno in (errno.ENOTDIR, errno.EEXIST)
    assert os.listdir(tmp_path) == ["file"]


# The child of the real full-disk test, in its own mount namespace: a run into a tmpfs that has room for the
# first checkpoint but not for the second beside it (an atomic write holds both), then room again, then the
# tmpfs remounted read-only.
MOUNTED_RUN = r"""
import json, os, subprocess, sys
import torch
torch.set_num_threads(1)
sys.path[:0] = [sys.argv[3], os.path.join(sys.argv[3], "cl")]
from test_engine import _replay, _scenario
from exml_fast._utils.io import temporary_files_of
from exml_fast.cl.engine import CHECKPOINT, RESULT, run_stream
from exml_fast.cl.experts import ExpertStream

mnt, stream = sys.argv[1], ExpertStream(sys.argv[2])
scenario = _scenario()
run = os.path.join(mnt, "run")

def sh(*args):
    subprocess.run(args, check=True)

def attempt(folder, resume):
    strategy = _replay(scenario)
    trained = []
    train = strategy.train
    strategy.train = lambda experience: (trained.append(1), train(experience))[1]
    try:
        return run_stream(strategy, stream, scenario, out=folder, resume=resume, plots=False, log=None), None
    except OSError as e:
        return None, {"errno": e.errno, "message": str(e), "trained": len(trained)}

sh("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mnt)
run_stream(_replay(scenario), stream, scenario, out=run, stop_after=1, plots=False, log=None)
ckpt = os.path.join(run, CHECKPOINT)
pages = -(-os.path.getsize(ckpt) // 4096)
sh("mount", "-o", f"remount,size={(pages + 1) * 4096}", mnt)
out = {}
_, out["full"] = attempt(run, True)
out["after_full"] = {"files": sorted(os.listdir(run)), "temporary": temporary_files_of(run),
                     "rows": len(torch.load(ckpt, weights_only=False)["rows"])}
sh("mount", "-o", "remount,size=64m", mnt)
done, err = attempt(run, True)
out["resumed"] = None if done is None else done.acc_matrix
sh("mount", "-o", "remount,ro", mnt)
_, out["read_only"] = attempt(os.path.join(mnt, "run2"), False)
out["kept"] = json.loads(open(os.path.join(run, RESULT)).read())["summary"]
print("RESULT " + json.dumps(out))
"""


def test_real_full_disk_and_read_only_mount(toy, tmp_path):
    """On a real tmpfs (not an injected error): the checkpoint write that fills the disk fails with ENOSPC
    naming checkpoint.pt, the previous checkpoint stays whole, the run resumes to the uninterrupted numbers
    once there is room, and a read-only folder fails by name with earlier results intact."""
    prefix = mount_namespace()
    if prefix is None:
        pytest.skip("no private mount namespace with tmpfs here (unshare -Urm / unshare -m refused)")
    scenario, stream = toy
    with num_threads(1):
        full = run_stream(_replay(scenario), stream, scenario, out=tmp_path / "a", plots=False, log=None)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tests.parent)}
    r = subprocess.run([*prefix, sys.executable, "-c", MOUNTED_RUN, str(mnt), str(stream.path), str(tests)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])

    assert out["full"] is not None, "the second checkpoint fitted on the small tmpfs: nothing was tested"
    assert out["full"]["errno"] == errno.ENOSPC and CHECKPOINT in out["full"]["message"], out["full"]
    assert "any earlier version of it is intact" in out["full"]["message"]
    assert out["after_full"] == {"files": [CHECKPOINT], "temporary": [], "rows": 1}, out["after_full"]
    assert out["resumed"] == full.acc_matrix
    assert out["read_only"] is not None and out["read_only"]["errno"] == errno.EROFS, out["read_only"]
    assert "run_stream: out: cannot write into" in out["read_only"]["message"], out["read_only"]
    assert "run2" in out["read_only"]["message"] and out["read_only"]["trained"] == 0, out["read_only"]
    assert out["kept"] == json.loads((tmp_path / "a" / RESULT).read_text())["summary"]
    assert not any(mnt.iterdir()), "the tmpfs leaked out of its mount namespace"
