"""benches/gpu_perf.py (`make gpu-perf`) as far as a machine without a GPU allows: the whole run against fake
steps (their order, the arguments each benchmark gets, the compile mode ResNet-18's record hands on), the
budget, the summary, --tar (also after an interruption), and the no-GPU exit. The benchmarks' own code is
tested on the CPU in test_bench_synthesis.py and test_benchlib.py; here, that the op rows gpu-perf runs on a
GPU move >= 100 MB and that bench_bn_stats (the BN term's share) records what the summary reads."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from _util import bench_module, num_threads

ROOT = Path(__file__).resolve().parents[1]
NO_GPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
ENV = {"device_name": "NVIDIA H100 80GB HBM3", "arch": "9.0", "memory_gib": 79.2, "torch": "2.11.0+cu130",
       "torch_cuda": "13.0", "python": "3.12.3", "nvcc": "13.0.88", "cores": 16, "commit": "abc123",
       "date": "2026-01-01T00:00:00+00:00", "device_count": 1, "probe_s": 1.0, "missing_modules": [],
       "nvidia_smi": {"gpus": [["NVIDIA H100 80GB HBM3", "580.65.06", "81559 MiB"]], "driver_cuda": "13.0"}}


@pytest.fixture(scope="module")
def gp():
    with bench_module("gpu_perf") as mod:
        yield mod


def _synthesis_record(net: str, mode: str) -> dict:
    peer = {"variant": "public frozen", "side": "public", "form": "fp32", "bn": True, "images_per_s": 1000.0,
            "speedup": 1.0}
    best = f"public frozen bf16+cl+compile({mode})"
    rows = [peer,
            {"variant": best, "side": "public", "form": "best", "bn": True, "best": True, "images_per_s": 3000.0,
             "speedup": 3.0, "peer": "public frozen", "speedup_vs_peer": 3.0, "speedup_vs_peer_min": 2.9,
             "speedup_vs_peer_max": 3.1},
            {"variant": "exml fp32", "side": "exml", "form": "fp32", "bn": True, "images_per_s": 1200.0,
             "speedup": 1.2, "peer": "public frozen", "speedup_vs_peer": 1.2, "speedup_vs_peer_min": 1.1,
             "speedup_vs_peer_max": 1.3},
            {"variant": "exml bf16+cl+graph", "side": "exml", "form": "best", "bn": True, "best": True,
             "images_per_s": 4500.0, "speedup": 4.5, "peer": best, "speedup_vs_peer": 1.5,
             "speedup_vs_peer_min": 1.4, "speedup_vs_peer_max": 1.6}]
    shares = [{"variant": "exml fp32", "share_pct": 20.0, "adds_pct": 25.0, "adds_pct_min": 20.0,
               "adds_pct_max": 30.0}] if net == "resnet18" else []
    return {"results": [{"net": net, "batch": 256, "timing": rows, "bn_share": shares, "best_peer_mode": mode}]}


def _ttq_record() -> dict:
    engine = [{"variant": "exml, cosine lr 0.1, one draw per batch", "reached": True, "steps": 600, "wall_s": 9.0,
               "speedup": 4.0, "probes": []}]
    best = {"peer": "public frozen bf16+cl+compile(reduce-overhead)", "peer_reach_step": 1900, "peer_reach_s": 12.0,
            "peer_points": [], "engine": [{**engine[0], "variant": engine[0]["variant"] + " [bf16+cl+graph]",
                                           "wall_s": 3.0, "speedup": 4.0}]}
    return {"results": [{"net": "resnet18", "batch": 256, "timing": [], "ttq": {
        "peer_steps": 2000, "peer_agreement": 1.0, "peer_reach_step": 1900, "peer_reach_s": 36.0, "engine": engine,
        "best": best}}]}


def _op_record() -> dict:
    return {"rows": [{"shape": [256, 3, 224, 224], "variant": v, "ms": ms, "MB": 462.4, "GB/s": 462.4 / ms,
                      "pct_copy_bw": 10.0, "speedup_vs_reference": 3.0 / ms}
                     for v, ms in (("reference", 3.0), ("exml_fast", 0.5), ("compile(reference)", 1.0))]}


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeRunning:
    """Stands for a step's process: writes its log and its record, takes `seconds` of the fake clock."""

    def __init__(self, gp, name, cmd, *, log, timeout_s, env=None, cwd=None, calls, clock, seconds, mode,
                 interrupt=None):
        calls.append((name, cmd, env, timeout_s))
        if name == interrupt:
            raise KeyboardInterrupt
        clock.now += seconds
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("BUILD_INFO " + json.dumps({"cuda": True, "cuda_version": "13.0", "cuda_archs": "9.0"})
                       if name == "build" else "ok\n")
        if "--out" in cmd:
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            if name.startswith("synthesis-"):
                net = name.removeprefix("synthesis-")
                rec, stem = _synthesis_record(net, mode), gp.synthesis_stem(net)
            elif name == "ttq-resnet18":
                rec, stem = _ttq_record(), gp.TTQ_STEM
            else:
                rec, stem = _op_record(), next(o[3] for o in gp.OPS if f"ops-{o[0]}" == name)
            (out / f"{stem}.json").write_text(json.dumps(rec))
            (out / f"{stem}.md").write_text("# record\n")
        self.result = gp.gc.StepResult(name, "pass", seconds=seconds, rc=0, timeout_s=timeout_s, log=str(log))

    def wait(self):
        return self.result


def _fake_gpu(gp, monkeypatch, *, seconds=1.0, mode="reduce-overhead", interrupt=None):
    calls, clock = [], FakeClock()
    monkeypatch.setattr(gp.gc, "machine_facts", lambda python, budget_s: ({**ENV, "budget_s": budget_s}, None))
    monkeypatch.setattr(gp.gc, "start_step", lambda name, cmd, **kw: FakeRunning(
        gp, name, cmd, calls=calls, clock=clock, seconds=seconds, mode=mode, interrupt=interrupt, **kw))
    real_budget = gp.gc.Budget
    monkeypatch.setattr(gp.gc, "Budget", lambda seconds_: real_budget(seconds_, clock=clock))
    return calls


def _arg(cmd, flag, n=1):
    i = cmd.index(flag)
    return cmd[i + 1] if n == 1 else cmd[i + 1:i + 1 + n]


def test_main_runs_every_step_in_order_and_hands_on_the_winning_compile_mode(gp, monkeypatch, tmp_path):
    calls = _fake_gpu(gp, monkeypatch, mode="max-autotune")
    out = tmp_path / "perf"
    assert gp.main(["--out", str(out), "--python", "/usr/bin/python3"]) == 0
    assert [c[0] for c in calls] == list(gp.STEPS)
    by = {c[0]: c for c in calls}
    assert by["build"][2]["TORCH_CUDA_ARCH_LIST"] == "9.0" and by["build"][2]["EXML_FAST_FORCE_CUDA"] == "1"
    r18 = by["synthesis-resnet18"][1]
    assert r18[:3] == ["/usr/bin/python3", "benches/bench_synthesis.py", "--device"] and "--no-compile" not in r18
    assert _arg(r18, "--batch") == "256" and "--best" in r18 and "--bn-share" in r18 and "--rounds" in r18
    assert _arg(r18, "--compile-modes", 2) == ["max-autotune", "reduce-overhead"]
    # ResNet-34, -50 and the race run the public best form in the mode that won on ResNet-18
    for step in ("synthesis-resnet34", "synthesis-resnet50", "ttq-resnet18"):
        cmd = by[step][1]
        assert cmd[cmd.index("--compile-modes") + 1:cmd.index("--compile-modes") + 3][0] == "max-autotune"
        assert cmd[cmd.index("--compile-modes") + 2].startswith("--")
    assert _arg(by["synthesis-resnet50"][1], "--batch") == "64" and "--bn-share" not in by["synthesis-resnet34"][1]
    ttq = by["ttq-resnet18"][1]
    assert "--ttq-only" in ttq and _arg(ttq, "--ttq-steps") == "2000" and _arg(ttq, "--ttq-state") == str(
        out / "ttq_state")
    for name, *_ in gp.OPS:  # the op rows with torch.compile(reference), at their GPU sizes (no --quick)
        cmd = by[f"ops-{name}"][1]
        assert "--no-compile" not in cmd and "--quick" not in cmd and _arg(cmd, "--device") == "cuda"
    assert all(c[3] <= 530 for c in calls)

    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] and s["finished"] and s["command"].startswith("python3 benches/gpu_perf.py --out ")
    assert s["env"]["device_name"].startswith("NVIDIA H100") and s["env"]["commit"] == "abc123"
    figs = s["figures"]
    assert "resnet18 batch 256, exml bf16+cl+graph: 4500 images/s, x1.50 [1.40-1.60] vs public frozen " \
           "bf16+cl+compile(max-autotune)" in figs["synthesis-resnet18"]
    assert any("BN term is 20 % of exml fp32's step" in h for h in figs["synthesis-resnet18"])
    assert any(h.startswith("shape=[256, 3, 224, 224]: 462 MB, exml_fast 0.500 ms") and "(x6.00)" in h
               for h in figs["ops-image_priors"])
    assert any("time to quality: exml, cosine lr 0.1, one draw per batch [bf16+cl+graph] 600 steps, 3.0 s, x4.00"
               in h for h in figs["ttq-resnet18"])
    md = (out / "summary.md").read_text()
    assert md.startswith("# gpu-perf: PASS on NVIDIA H100 80GB HBM3")
    for text in ("driver 580.65.06", "torch 2.11.0+cu130 (CUDA 13.0)", "commit `abc123`", "- command: `python3",
                 "| synthesis-resnet18 | pass |", "exml fp32: 1200 images/s, x1.20", "## Figures",
                 "CUDA events", "- synthesis-resnet18: benches/synthesis_cuda_perf_resnet18.md"):
        assert text in md, text


def test_without_resnet18_in_this_call_its_earlier_record_gives_the_mode(gp, monkeypatch, tmp_path):
    out = tmp_path / "perf"
    (out / "benches").mkdir(parents=True)
    (out / "benches" / "synthesis_cuda_perf_resnet18.json").write_text(json.dumps(
        _synthesis_record("resnet18", "max-autotune")))
    calls = _fake_gpu(gp, monkeypatch)
    assert gp.main(["--out", str(out), "--steps", "synthesis-resnet34,ttq-resnet18"]) == 0
    assert [c[0] for c in calls] == ["synthesis-resnet34", "ttq-resnet18"]
    assert all(_arg(c[1], "--compile-modes") == "max-autotune" for c in calls)
    (out / "benches" / "synthesis_cuda_perf_resnet18.json").unlink()  # no record: the cheaper mode
    assert gp.peer_modes("resnet34", gp.parse_args(["--out", str(out)])) == ["reduce-overhead"]
    assert gp.peer_modes("resnet34", gp.parse_args(["--out", str(out), "--compile-modes", "default"])) == ["default"]


def test_the_budget_cuts_timeouts_and_leaves_out_what_it_cannot_start(gp, monkeypatch, tmp_path):
    calls = _fake_gpu(gp, monkeypatch, seconds=100.0)
    out = tmp_path / "perf"
    assert gp.main(["--out", str(out)]) == gp.gc.EXIT_FAILED
    ran = {c[0]: c[3] for c in calls}
    # 100 s a step on the fake clock: build at 530 s left, ResNet-18 at 430, ResNet-34 at 330, ResNet-50 at 230,
    # bn_stats at 130, image_priors at 30 (its timeout cut to that); then nothing is left
    assert list(ran) == ["build", "synthesis-resnet18", "synthesis-resnet34", "synthesis-resnet50", "ops-bn_stats",
                         "ops-image_priors"]
    assert ran["synthesis-resnet18"] == 270 and ran["synthesis-resnet50"] == 210 and ran["ops-bn_stats"] == 120
    assert ran["ops-image_priors"] == 30
    s = json.loads((out / "summary.json").read_text())
    steps = {st["name"]: st for st in s["steps"]}
    assert steps["ttq-resnet18"]["status"] == "not run" and "needs 150 s" in steps["ttq-resnet18"]["notes"][0]
    assert steps["ops-upsample_conv"]["status"] == "not run" and not s["ok"]


def test_the_race_needs_150_s_to_start(gp, monkeypatch, tmp_path):
    calls = _fake_gpu(gp, monkeypatch)
    assert gp.main(["--out", str(tmp_path / "p"), "--steps", "ttq-resnet18", "--budget-s", "140"]) == 1
    assert calls == []
    monkeypatch.undo()
    calls = _fake_gpu(gp, monkeypatch)
    assert gp.main(["--out", str(tmp_path / "p"), "--steps", "ttq-resnet18", "--budget-s", "160"]) == 0
    assert [c[3] for c in calls] == [160]


def test_tar_packs_the_output_also_after_an_interruption(gp, monkeypatch, tmp_path):
    _fake_gpu(gp, monkeypatch, interrupt="synthesis-resnet34")
    out, tar = tmp_path / "perf", tmp_path / "ret" / "perf.tgz"
    assert gp.main(["--out", str(out), "--tar", str(tar)]) == 130
    with tarfile.open(tar) as tf:
        names = tf.getnames()
    assert {"perf/summary.md", "perf/summary.json", "perf/logs/build.log",
            "perf/benches/synthesis_cuda_perf_resnet18.json"} <= set(names)
    s = json.loads((out / "summary.json").read_text())
    assert [st["name"] for st in s["steps"]][-1] == "interrupted"


def test_tar_inside_the_output_folder_leaves_itself_out(gp, monkeypatch, tmp_path):
    _fake_gpu(gp, monkeypatch)
    out = tmp_path / "perf"
    assert gp.main(["--out", str(out), "--steps", "ops-tanh", "--tar", str(out / "perf.tgz")]) == 0
    with tarfile.open(out / "perf.tgz") as tf:
        names = tf.getnames()
    assert "perf/benches/tanh_cuda.json" in names and not any(n.endswith(".tgz") or n.endswith(".tmp")
                                                              for n in names)


def test_arguments_are_checked(gp, capsys):
    for bad, why in ((["--steps", "pytest"], "unknown pytest"), (["--rounds", "3"], "at least 5"),
                     (["--k1", "5", "--k2", "5"], "1 <= k1 < k2")):
        with pytest.raises(SystemExit):
            gp.parse_args(bad)
        assert why in capsys.readouterr().err


def test_main_without_gpu_builds_and_writes_nothing(gp, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gp.gc, "machine_facts", lambda python, budget_s: ({}, "torch 2.11.0 sees no CUDA device"))
    monkeypatch.setattr(gp.gc, "start_step", lambda *a, **k: pytest.fail("a step started without a GPU"))
    assert gp.main(["--out", str(tmp_path / "out"), "--tar", str(tmp_path / "x.tgz")]) == gp.gc.EXIT_NO_GPU
    err = capsys.readouterr().err
    assert "gpu-perf: no usable CUDA GPU on this machine" in err and "Nothing was built" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.tgz").exists()


def test_script_without_gpu_exits_2_quickly(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_perf.py"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=NO_GPU_ENV, cwd=ROOT, timeout=120, check=False)
    assert r.returncode == 2, r.stderr
    assert "no usable CUDA GPU" in r.stderr and not (tmp_path / "out").exists()
    assert time.monotonic() - t0 < 60


def test_make_gpu_perf_without_gpu_fails(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make")
    r = subprocess.run(["make", "-s", "gpu-perf", f"PYTHON={sys.executable}", f"GPU_PERF_OUT={tmp_path / 'out'}",
                        f"GPU_TAR={tmp_path / 'p.tgz'}"], capture_output=True, text=True, env=NO_GPU_ENV, cwd=ROOT,
                       timeout=120, check=False)
    assert r.returncode != 0 and "gpu-perf: no usable CUDA GPU" in r.stderr
    assert not (tmp_path / "out").exists()


# -- what the steps measure -------------------------------------------------------------------------


def _mb(shape, *, factor, bytes_per=4):
    return factor * math.prod(shape) * bytes_per / 1e6


def test_each_op_bench_has_a_gpu_row_that_moves_at_least_100_mb():
    sizes = {}
    for name in ("bench_image_priors", "bench_soft_target_losses", "bench_dirichlet", "bench_augment",
                 "bench_window_pool", "bench_tanh"):
        with bench_module(name) as mod:
            sizes[name] = mod
    assert max(_mb(s, factor=3) for s in sizes["bench_image_priors"].GPU_SHAPES) >= 100
    assert max(_mb(s, factor=5) for s in sizes["bench_soft_target_losses"].GPU_SIZES) >= 100  # KD: 2 reads x 2 + 1
    assert max(_mb(s[:2], factor=2) for s in sizes["bench_dirichlet"].GPU_DIRICHLET_SHAPES) >= 100
    assert max(_mb(s[0], factor=4) for s in sizes["bench_augment"].GPU_SIZES) >= 100
    assert max(_mb(s, factor=2.5) for s in sizes["bench_window_pool"].GPU_SHAPES) >= 100
    assert max(_mb(s, factor=2) for s in sizes["bench_tanh"].GPU_SHAPES) >= 100


def test_bn_stats_records_the_bn_terms_share_and_the_op_rows_timing(tmp_path):
    with bench_module("bench_bn_stats") as mod, num_threads(1):
        argv = ["--device", "cpu", "--batches", "2", "--step-batch", "2", "--min-run-time", "0.01",
                "--step-run-time", "0.05", "--no-compile", "--out", str(tmp_path)]
        assert mod.main(argv) == 0
    rec = json.loads((tmp_path / "bn_stats_cpu.json").read_text())
    assert rec["command"] == "python benches/bench_bn_stats.py " + " ".join(argv)
    for r in rec["op_level"]:
        assert r["rounds"] >= 5 and r["inner"] >= 1 and r["ms_min"] <= r["ms"] <= r["ms_max"] and r["MB"] > 0
    share = {r["variant"]: r for r in rec["step_level"]}
    assert share["no BN loss"]["bn_share_pct"] == 0
    assert all(r["rounds"] >= 5 and "overhead_pct_min" in r for r in share.values())
    with bench_module("gpu_check") as gc:
        heads = gc.bench_headlines(rec)
    assert any(h.startswith("step_level: the BN loss adds") and "of the step" in h for h in heads)
    md = (tmp_path / "bn_stats_cpu.md").read_text()
    assert "share of the step" in md and "rounds × calls" in md


def test_bench_synthesis_takes_the_arguments_gpu_perf_gives_it(gp, tmp_path, monkeypatch):
    # Each synthesis step's and the race's arguments, parsed by bench_synthesis itself (on the CPU, the nets not
    # run): the settings the GPU run will have.
    args = gp.parse_args(["--out", str(tmp_path)])
    seen = []
    with bench_module("bench_synthesis") as bs:
        monkeypatch.setattr(bs, "environment", lambda device, title: {"device_kind": device})
        monkeypatch.setattr(bs, "record", lambda *a, **k: None)
        monkeypatch.setattr(bs, "to_markdown", lambda rec: "")
        monkeypatch.setattr(bs, "bench_net", lambda name, a: seen.append((name, a)))
        for net in gp.NETS:
            bs.main(["--device", "cpu", *gp.synthesis_args(net, args), "--out", str(tmp_path)])
        bs.main(["--device", "cpu", *gp.ttq_args(args), "--out", str(tmp_path)])
    (_, r18), (_, r34), (_, r50), (net, ttq) = seen
    assert r18.best and r18.bn_share and r18.compile_modes == ["max-autotune", "reduce-overhead"]
    assert (r18.k1, r18.k2, r18.rounds, r18.check_iterations, r18.ttq_steps) == (5, 45, 5, 0, 0)
    assert r18.batch_of["resnet18"] == 256 and r50.batch_of["resnet50"] == 64 and not r50.bn_share
    assert r34.compile_modes == r50.compile_modes == ["reduce-overhead"]  # no ResNet-18 record here: the fallback
    assert net == "resnet18" and ttq.ttq_only and ttq.ttq_best and ttq.ttq_steps == 2000 and ttq.ttq_variants == 1
    assert ttq.ttq_rel_tol == 0.1 and ttq.ttq_state == str(tmp_path / "ttq_state") and ttq.batch_of["resnet18"] == 256
