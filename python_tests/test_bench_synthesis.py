"""benches/bench_synthesis.py's search and floor, which its recorded figures rest on: the time-to-quality
search finds the fewest steps for every position of the answer, at a cost of a few times the answer, and
the floor times the network's own layers. Nothing here times anything that is asserted.

bench_synthesis.py runs four benchmarks, each a script of its own (bench_synthesis_{step,loss,ttq,generator}.py,
sharing synthesislib.py); it re-exports their names, which these tests reach through it, and patches go to the
module that reads the name."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
from _util import bench_module


@pytest.fixture(scope="module")
def bench():
    with bench_module("bench_synthesis") as mod:
        yield mod


@pytest.mark.parametrize("n", [1, 2, 7, 40, 120])
def test_smallest_steps_finds_the_first_grid_point_that_meets_the_bar(bench, n):
    grid = [50 * (i + 1) for i in range(n)]
    for answer in [*range(n), None]:  # the index of the first step count that meets the bar; None: none does
        bar = grid[answer] if answer is not None else float("inf")
        calls = []

        def measure(steps):
            calls.append(steps)
            return {"steps": steps, "wall_s": 0.01 * steps, "agreement": 1.0, "bn": 0.0, "meets": steps >= bar}

        steps, wall, probes = bench.smallest_steps(measure, grid)
        assert [p["steps"] for p in probes] == calls
        if answer is None:
            assert (steps, wall) == (None, None)
            assert calls[-1] == grid[-1]
        else:
            assert steps == grid[answer]
            assert wall == pytest.approx(0.01 * grid[answer])
            # galloping then bisection: about 2 log2 probes, none longer than twice the answer (plus one grid
            # step), so the search costs a few times the answer whatever the grid's end
            assert len(calls) <= 2 * (answer + 1).bit_length() + 1
            assert max(calls) <= 2 * grid[answer] + grid[0]


@pytest.mark.parametrize("rel_tol", [0.1, 0.25])
def test_smallest_steps_with_a_tolerance_answers_a_call_that_meets_the_bar_within_it(bench, rel_tol):
    grid = [50 * (i + 1) for i in range(40)]
    for true in grid:
        calls = []

        def measure(steps, true=true):
            calls.append(steps)
            return {"steps": steps, "wall_s": 0.01 * steps, "agreement": 1.0, "bn": 0.0, "meets": steps >= true}

        steps, _, _ = bench.smallest_steps(measure, grid, rel_tol=rel_tol)
        assert steps >= true and steps - true <= rel_tol * steps
        exact = []
        bench.smallest_steps(lambda k, exact=exact, true=true: exact.append(k) or
                             {"steps": k, "wall_s": 0.0, "agreement": 1.0, "bn": 0.0, "meets": k >= true}, grid)
        assert len(calls) <= len(exact)


def test_conv_floor_times_every_conv_and_linear_layer(bench):
    floor = bench.conv_floor("lenet5_bn", 4, step_s=1.0)
    assert floor["layers"] == 5  # LeNet-5-BN: two convolutions, three linear layers
    assert floor["floor_s"] > 0 and floor["fraction_of_floor"] == pytest.approx(floor["floor_s"])
    assert floor["gflop_per_step"] == pytest.approx(4 * floor["gflop_per_image"])
    assert floor["conv_gflops"] > 0 and floor["sgemm_gflops"] > 0


def test_peer_trajectory_measures_what_shorter_calls_return(bench):
    # The peer's time to quality is read off one run: each point must be the quality of a call of that length.
    from exml_fast.models import LeNet5BN
    from exml_fast.reference.public.deepinversion import public_deepinversion

    torch.manual_seed(0)
    teacher = LeNet5BN(10).eval()
    y = bench.targets_for(8, "cpu")
    points = bench.peer_trajectory(teacher, "lenet5_bn", y, 5, 2, 7, "cpu")
    assert [p["steps"] for p in points] == [2, 4, 5]
    assert all(p["wall_s"] > 0 for p in points) and points[0]["wall_s"] < points[-1]["wall_s"]
    for p in points:
        x = public_deepinversion(teacher, y, iterations=p["steps"], lr=bench.LR, bn_reg_scale=bench.BN_WEIGHT,
                                 tv_l2_scale=bench.TV_L2_WEIGHT, l2_scale=bench.L2_WEIGHT, jitter=bench.JITTER,
                                 flip=bench.FLIP, generator=7, input_shape=(1, 32, 32), all_bn=True)[0]
        assert (p["agreement"], p["bn"]) == bench.clean_quality(teacher, x, y)


def test_race_log_resumes_the_same_race_and_sets_another_aside(bench, tmp_path):
    path = tmp_path / "race.json"
    log = bench.RaceLog(path, {"net": "resnet18", "steps": 2000})
    log.put("peer", {"points": [1, 2]})
    log.put("exml | 50", {"wall_s": 3.0})
    again = bench.RaceLog(path, {"net": "resnet18", "steps": 2000})
    assert again.get("peer")["points"] == [1, 2] and again.get("exml | 50")["wall_s"] == 3.0
    assert "commit" in again.get("peer") and again.get("exml | 100") is None
    other = bench.RaceLog(path, {"net": "resnet18", "steps": 1000})  # other settings: never mixed in
    assert other.get("peer") is None
    assert (tmp_path / "race.stale.json").exists() and not path.exists()
    other.put("peer", {"points": []})
    assert bench.RaceLog(path, {"net": "resnet18", "steps": 1000}).get("peer")["points"] == []


def test_the_lenet_teacher_of_the_race_is_kept_and_read_back(bench, tmp_path, monkeypatch):
    # A GPU trains it afresh, not bit-identically, on every run: its hash (in the race's key) then changed and
    # a rerun started over. The first run's weights are kept and a rerun races the same teacher.
    import exml_fast.data.datasets as datasets
    from exml_fast.models import LeNet5BN
    monkeypatch.setattr(datasets, "find_data_root", lambda name: tmp_path if name == "mnist" else None)
    first = LeNet5BN(num_classes=10, in_channels=1)
    model, info = bench.ttq_teacher("lenet5_bn", "cpu", tmp_path, first)
    assert model is first and info["teacher"] == "trained one epoch on MNIST"
    assert (tmp_path / "teacher_lenet5_bn_mnist_s0.pt").exists()
    torch.manual_seed(1)
    retrained = LeNet5BN(num_classes=10, in_channels=1)  # another run's (different) weights
    model, _ = bench.ttq_teacher("lenet5_bn", "cpu", tmp_path, retrained)
    for a, b in zip(model.state_dict().values(), first.state_dict().values()):
        assert torch.equal(a, b)
    # read into a copy: the caller's teacher, which serves the run's other benchmarks, is left as it was
    assert model is not retrained and not torch.equal(retrained.state_dict()["features.0.weight"],
                                                      first.state_dict()["features.0.weight"])
    assert not model.training


# -- the GPU method on the CPU: precision-paired variants, the BN term's share, the best forms' race ----------


def _rows(bench, spec):
    """timing_rows' input from {name: (side, form, bn, per-round seconds)}."""
    variants = {n: bench.Variant(None, side, form, bn) for n, (side, form, bn, _) in spec.items()}
    samples = {n: s for n, (*_, s) in spec.items()}
    return variants, samples


def test_rows_pair_precision_with_precision_and_pick_each_sides_fastest_best_form(bench):
    import types

    variants, samples = _rows(bench, {
        bench.PEER: ("public", "fp32", True, [10.0, 12.0, 10.0, 12.0]),
        "public frozen bf16+cl+compile(max-autotune)": ("public", "best", True, [4.0, 4.0, 4.0, 4.0]),
        "public frozen bf16+cl+compile(reduce-overhead)": ("public", "best", True, [5.0, 5.0, 5.0, 5.0]),
        "exml fp32": ("exml", "fp32", True, [5.0, 6.0, 4.0, 4.0]),
        "exml bf16+cl+graph": ("exml", "best", True, [2.0, 1.0, 2.0, 1.0]),
        "exml fp32, no BN term": ("exml", "fp32", False, [4.0, 4.0, 4.0, 4.0]),
    })
    rows = {r["variant"]: r for r in bench.timing_rows(variants, samples, {}, 8, types.SimpleNamespace(k1=1, k2=2))}
    # true medians: of 4, 4, 5, 6, and of the per-round ratios 10/5, 12/6, 10/4, 12/4 = 2, 2, 2.5, 3 (the lower
    # middle values, torch.median's, would say 4 and 2)
    assert rows["exml fp32"]["s_per_iter"] == 4.5
    assert rows["exml fp32"]["peer"] == bench.PEER and rows["exml fp32"]["speedup_vs_peer"] == pytest.approx(2.25)
    best = rows["exml bf16+cl+graph"]
    assert best["best"] and best["peer"] == "public frozen bf16+cl+compile(max-autotune)"
    assert best["speedup_vs_peer"] == pytest.approx(3.0) and (best["speedup_vs_peer_min"],
                                                               best["speedup_vs_peer_max"]) == (2.0, 4.0)
    assert rows["public frozen bf16+cl+compile(max-autotune)"]["best"]
    assert "best" not in rows["public frozen bf16+cl+compile(reduce-overhead)"]
    assert rows["public frozen bf16+cl+compile(max-autotune)"]["peer"] == bench.PEER  # what the user's best buys
    assert "peer" not in rows["exml fp32, no BN term"] and "peer" not in rows[bench.PEER]
    assert bench.best_peer_mode(list(rows.values())) == "max-autotune"
    (share,) = bench.bn_shares(list(rows.values()), samples)
    # with / without the BN term per round: 1.25, 1.5, 1, 1; without / with: 0.8, 2/3, 1, 1
    assert share["variant"] == "exml fp32" and share["adds_pct"] == pytest.approx(12.5)
    assert share["share_pct"] == pytest.approx(10.0) and share["adds_pct_max"] == pytest.approx(50.0)


def test_variants_of_the_gpu_method(bench):
    import types

    from exml_fast.models import LeNet5BN

    args = types.SimpleNamespace(batch_of={"lenet5_bn": 4}, device="cpu", best=True, bn_share=True,
                                 compile_modes=["max-autotune", "reduce-overhead"], port_only=False,
                                 exml_compile=True)
    v = bench.variants_for(LeNet5BN(10).eval(), "lenet5_bn", args)
    assert list(v) == [bench.PEER, bench.PEER + bench.NO_BN, "public frozen bf16+cl+compile(max-autotune)",
                       "public frozen bf16+cl+compile(reduce-overhead)", "exml fp32", "exml fp32" + bench.NO_BN,
                       "exml bf16+cl", "exml bf16+cl+compile", "exml bf16+cl" + bench.NO_BN]
    assert [v[n].form for n in v].count("best") == 5 and not v["exml bf16+cl" + bench.NO_BN].bn
    assert "torch.compile(mode=max-autotune)" in v["public frozen bf16+cl+compile(max-autotune)"].config
    assert bench.exml_best_forms("cuda")[0] == ("exml bf16+cl+graph", {"precision": "bf16", "channels_last": True,
                                                                       "cuda_graph": True})
    args.best, args.bn_share, args.compile_modes = False, False, ["default"]  # the CPU records' set
    assert list(bench.variants_for(LeNet5BN(10).eval(), "lenet5_bn", args)) == [
        "public as shipped", bench.PEER, "public frozen+compile", "exml fp32"]


def test_the_public_loop_without_its_bn_hooks_has_no_bn_term(bench):
    from exml_fast.models import LeNet5BN

    torch.manual_seed(0)
    teacher = LeNet5BN(10).eval()
    with_bn, without = {}, {}
    bench.public_runner(teacher, 4, "cpu", name="lenet5_bn", history=with_bn)(2, 0)
    bench.public_runner(teacher, 4, "cpu", name="lenet5_bn", bn=False, history=without)(2, 0)
    assert float(with_bn["bn"].min()) > 0 and float(without["bn"].abs().max()) == 0
    # and the hooks are back afterwards
    again = {}
    bench.public_runner(teacher, 4, "cpu", name="lenet5_bn", history=again)(2, 0)
    assert torch.equal(again["bn"], with_bn["bn"])


@pytest.mark.slow  # a torch.compile of LeNet-5-BN: about 40 s on 2 cores
def test_the_compiled_public_teacher_keeps_its_bn_hooks_across_calls(bench):
    # Each call of the public loop registers new BN hooks on the compiled teacher; the compiled forward must
    # see them (dynamo inlines them), call after call: the BN terms equal the eager loop's.
    from exml_fast.models import LeNet5BN

    torch.manual_seed(0)
    teacher = LeNet5BN(10).eval()
    eager = [{}, {}]
    compiled = [{}, {}]
    run_e = bench.public_runner(teacher, 4, "cpu", name="lenet5_bn", history=eager[0])
    run_c = bench.public_runner(teacher, 4, "cpu", name="lenet5_bn", compile_mode="default", history=compiled[0])
    for seed in (0, 1):
        run_e(3, seed)
        run_c(3, seed)
        eager[1][seed] = eager[0]["bn"].clone()
        compiled[1][seed] = compiled[0]["bn"].clone()
    for seed in (0, 1):
        torch.testing.assert_close(compiled[1][seed], eager[1][seed], rtol=1e-4, atol=1e-5)


@pytest.fixture
def no_data(bench, monkeypatch):
    """No MNIST / Fashion-MNIST: random calibrated teachers (nothing trained)."""
    import exml_fast.data.datasets as datasets

    monkeypatch.setattr(datasets, "find_data_root", lambda name: None)
    monkeypatch.setattr(sys.modules["synthesislib"], "_mnist_lenet", lambda model, device, g: None)


@pytest.fixture
def step_clock(bench, monkeypatch):
    """Every synthesis step "takes" 1 ms: a timed call returns the steps its loops ran, so a test of what the
    bench records reads no wall clock for them (at 2 steps a sample, a loaded machine's noise left rows without a
    figure, and their pairs unmade). The loops themselves still run."""
    step = sys.modules["bench_synthesis_step"]
    ran: list[int] = []
    real = step.variants_for

    def counted(teacher, name, args):
        variants = real(teacher, name, args)
        for v in variants.values():
            v.run = lambda k, seed, run=v.run: (ran.append(k), run(k, seed))[1]
        return variants

    def steps_clock(fn, device):  # other calls (the convolutions' floor) keep the host clock
        ran.clear()
        t0 = time.perf_counter()
        fn()
        return 1e-3 * sum(ran) if ran else time.perf_counter() - t0

    monkeypatch.setattr(step, "variants_for", counted)
    monkeypatch.setattr(bench, "variants_for", counted)
    monkeypatch.setattr(step, "timed_call", steps_clock)


def test_gpu_method_smoke_on_the_cpu_records_pairs_shares_and_the_command(bench, tmp_path, no_data, step_clock):
    import json

    argv = ["--device", "cpu", "--nets", "lenet5_bn", "--batch", "4", "--k1", "1", "--k2", "3", "--rounds", "5",
            "--check-iterations", "0", "--ttq-steps", "0", "--best", "--bn-share", "--no-compile", "--threads", "1",
            "--out", str(tmp_path), "--suffix", "_smoke"]
    bench.main(argv)
    rec = json.loads((tmp_path / "synthesis_cpu_smoke.json").read_text())
    assert rec["command"] == "python benches/bench_synthesis.py " + " ".join(argv)
    (net,) = rec["results"]
    rows = {r["variant"]: r for r in net["timing"]}
    assert rows["exml fp32"]["peer"] == bench.PEER and rows["exml bf16+cl"]["peer"] == "public frozen bf16+cl"
    assert all(r["rounds"] == 5 and r["s_min"] <= r["s_per_iter"] <= r["s_max"] for r in rows.values())
    assert {b["variant"] for b in net["bn_share"]} == {bench.PEER, "exml fp32", "exml bf16+cl"}
    md = (tmp_path / "synthesis_cpu_smoke.md").read_text()
    assert "Precision with precision: **exml fp32** vs public frozen" in md
    assert "**exml bf16+cl** vs public frozen bf16+cl" in md and "its share of the step" in md


def test_the_best_forms_race_to_the_fp32_peers_bar(bench, tmp_path, no_data, monkeypatch):
    import json

    # a random teacher's few steps: the BN bar alone
    monkeypatch.setattr(sys.modules["bench_synthesis_ttq"], "AGREEMENT", 0.0)
    argv = ["--device", "cpu", "--nets", "lenet5_bn", "--batch", "4", "--ttq-only", "--ttq-steps", "8",
            "--ttq-variants", "1", "--ttq-cap", "2", "--best", "--no-compile", "--threads", "1",
            "--ttq-state", str(tmp_path / "state"), "--out", str(tmp_path), "--suffix", "_race"]
    bench.main(argv)
    q = json.loads((tmp_path / "synthesis_cpu_race.json").read_text())["results"][0]["ttq"]
    assert q["peer_reach_step"] is not None and len(q["engine"]) == 1
    best = q["best"]
    assert best["peer"] == "public frozen bf16+cl" and [p["steps"] for p in best["peer_points"]] == list(range(1, 9))
    (row,) = best["engine"]
    assert row["variant"] == "exml (peer's optimiser) [bf16+cl]" and row["options"]["precision"] == "bf16"
    log = json.loads(next((tmp_path / "state").glob("ttq_cpu_lenet5_bn_*.json")).read_text())
    assert "peer best | public frozen bf16+cl" in log["entries"]  # resumable, as the fp32 race
    assert "The best forms, to the same bar" in (tmp_path / "synthesis_cpu_race.md").read_text()


def test_the_local_resnet50_is_torchvisions(bench):
    # A GPU machine without torchvision builds the same network: the same parameter and buffer shapes, in order.
    pytest.importorskip("torchvision")
    tv, local = bench.resnet50_imagenet(), sys.modules["synthesislib"]._resnet50_local()
    assert [tuple(t.shape) for t in tv.state_dict().values()] == [tuple(t.shape) for t in local.state_dict().values()]
    assert bench.SHAPES["resnet50"] == (3, 224, 224) and bench.GPU_BATCH["resnet50"] == 64
    with torch.no_grad():
        assert local.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_each_benchmark_is_a_script_of_its_own(bench, tmp_path, no_data):
    """The step and loss benchmarks run alone and record under their own names; the markdown of the combined
    run is its parts' (the recorded synthesis_<device> files keep their form)."""
    common = ["--device", "cpu", "--nets", "lenet5_bn", "--batch", "4", "--no-compile", "--threads", "1",
              "--out", str(tmp_path)]
    step, loss = sys.modules["bench_synthesis_step"], sys.modules["bench_synthesis_loss"]
    step.main([*common, "--k1", "1", "--k2", "2", "--rounds", "1"])
    rec = json.loads((tmp_path / "synthesis_step_cpu.json").read_text())
    assert rec["command"].startswith("python benches/bench_synthesis_step.py ")
    (net,) = rec["results"]
    assert {r["variant"] for r in net["timing"]} >= {bench.PEER, "exml fp32"} and "check" not in net
    loss.main([*common, "--check-iterations", "2"])
    (net,) = json.loads((tmp_path / "synthesis_loss_cpu.json").read_text())["results"]
    assert [c["variant"] for c in net["check"]][0] == bench.PEER and "timing" not in net
    assert "Final loss after 2 iterations" in (tmp_path / "synthesis_loss_cpu.md").read_text()
    with pytest.raises(SystemExit):
        loss.main([*common, "--check-iterations", "0"])
