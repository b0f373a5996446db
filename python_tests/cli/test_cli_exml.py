"""End to end: ``exml-fast train-experts / run / report`` on a 2-experience Split MNIST toy stream."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from exml_fast.cli import main
from exml_fast.data import find_data_root

pytestmark = pytest.mark.skipif(find_data_root("mnist") is None or find_data_root("fashion-mnist") is None,
                                reason="MNIST / Fashion-MNIST files not found")

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--buffer-size", "40", "--iterations", "20", "--synth-iterations", "4", "--synth-batch-size", "32",
        "--no-progress", "--seed", "0"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "experts"
    assert main(["train-experts", "--scenario", "split_mnist", "--n-experiences", "2", "--max-train", "200",
                 "--epochs", "1", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    return out


def _result(run):
    return json.loads((run / "result.json").read_text())


@pytest.mark.parametrize("strategy", ["mi-ed", "di-ed", "aux-ed", "replay-ed", "oracle", "ensemble-avg",
                                      "min-entropy", "param-avg"])
def test_run_every_strategy_then_report(experts, tmp_path, strategy, capsys):
    run = tmp_path / strategy
    assert main(["run", "--experts", str(experts), "--strategy", strategy, "--out", str(run), *TINY]) == 0
    res = _result(run)
    assert res["strategy"] == strategy and len(res["acc_matrix"]) == 2
    assert (run / "accuracy_matrix.png").exists() and (run / "checkpoint.pt").exists()
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(tmp_path / "report.md")]) == 0
    text = capsys.readouterr().out
    assert strategy in text and "Stream accuracy" in text
    assert (tmp_path / "report.md").read_text().startswith("## Stream accuracy")
    assert (tmp_path / "report.png").exists()


def test_gen_ed_runs_end_to_end_and_refuses_a_buffer(experts, tmp_path, capsys):
    run = tmp_path / "gen-ed"
    tiny = ["--iterations", "6", "--synth-iterations", "2", "--synth-batch-size", "8", "--gen-preset", "dafl",
            "--no-progress", "--seed", "0"]
    assert main(["run", "--experts", str(experts), "--strategy", "gen-ed", "--out", str(run), *tiny]) == 0
    res = _result(run)
    assert res["strategy"] == "gen-ed" and len(res["acc_matrix"]) == 2 and (run / "checkpoint.pt").exists()
    capsys.readouterr()
    assert main(["run", "--experts", str(experts), "--strategy", "gen-ed", "--out", str(tmp_path / "b"), *tiny,
                 "--buffer-size", "40"]) == 2
    assert "buffer_size" in capsys.readouterr().err


def test_yaml_config_and_flags_override_it(experts, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("strategy: replay-ed\nbuffer_size: 30\niterations: 7\nlr: 0.05\nseed: 3\n")
    run = tmp_path / "r"
    assert main(["run", "--experts", str(experts), "--config", str(cfg), "--iterations", "9", "--out", str(run),
                 "--no-progress", "--no-plots"]) == 0
    config = _result(run)["meta"]["config"]
    assert config["strategy"] == "replay-ed" and config["buffer_size"] == 30 and config["lr"] == 0.05
    assert config["iterations"] == 9 and config["seed"] == 3  # the flag wins over the file
    assert not (run / "accuracy_matrix.png").exists()


def test_bad_config_and_existing_run_are_refused(experts, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("strategy: replay-ed\nbuffer: 30\n")
    assert main(["run", "--experts", str(experts), "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    assert "unknown option 'buffer'" in capsys.readouterr().err
    for name, text, what in (("bad.yaml", "strategy: [replay-ed\nbuffer_size: 30\n", "not valid YAML (line"),
                             ("tabs.yaml", "strategy: replay-ed\n\tlr: 0.1\n", "not valid YAML"),
                             ("bad.json", '{"strategy": "replay-ed",}', "not valid JSON (line 1")):
        (tmp_path / name).write_text(text)
        assert main(["run", "--experts", str(experts), "--config", str(tmp_path / name), "--out",
                     str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert what in err and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("exml-fast run: error:")
    assert main(["run", "--experts", str(experts), "--out", str(tmp_path / "x")]) == 2
    assert "--strategy is required" in capsys.readouterr().err
    run = tmp_path / "y"
    args = ["run", "--experts", str(experts), "--strategy", "param-avg", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 1
    assert "--resume" in capsys.readouterr().err


def test_corrupt_expert_is_refused_with_its_file_named(experts, tmp_path, capsys):
    import shutil

    copy = tmp_path / "experts"
    shutil.copytree(experts, copy)
    weights = next((copy / "expert_001").glob("weights.*"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["run", "--experts", str(copy), "--strategy", "ensemble-avg", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "expert_001" in err and "weights" in err


def _cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "exml_fast", *args], env


def test_killed_run_resumes_to_the_same_result(experts, tmp_path):
    """SIGKILL a `run` during the second expert, rerun with --resume: same numbers as an uninterrupted run."""
    base = ["run", "--experts", str(experts), "--strategy", "replay-ed", "--buffer-size", "60",
            "--iterations", "600", "--no-progress", "--no-plots", "--seed", "1"]
    cmd, env = _cli(*base, "--out", str(tmp_path / "killed"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "experience 1/2" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert not (tmp_path / "killed" / "result.json").exists()
    cmd, env = _cli(*base, "--out", str(tmp_path / "killed"), "--resume")
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "[replay-ed] experience 1/2" not in resumed.stdout
    cmd, env = _cli(*base, "--out", str(tmp_path / "whole"))
    whole = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert whole.returncode == 0, whole.stderr
    a, b = _result(tmp_path / "killed"), _result(tmp_path / "whole")
    assert a["acc_matrix"] == b["acc_matrix"] and a["summary"] == b["summary"]
    assert a["per_class_accuracy"] == b["per_class_accuracy"]


def test_generator_options_and_beta_mixture_reach_the_synthesizer(experts, tmp_path):
    cfg = tmp_path / "di.yaml"
    cfg.write_text("strategy: di-ed\nbeta: [1.0, 0.1]\nblur_weight: 0.002\n")
    run = tmp_path / "di"
    assert main(["run", "--experts", str(experts), "--config", str(cfg), "--out", str(run), "--no-plots",
                 "--bn-weight", "3", "--first-bn-multiplier", "2", *TINY]) == 0
    gen = _result(run)["meta"]["config"]["source"]
    assert gen["method"] == "data-impressions"
    opts = gen["options"]
    assert opts["beta"] == [1.0, 0.1] and opts["blur_weight"] == 0.002
    assert opts["bn_weight"] == 3.0 and opts["first_bn_multiplier"] == 2.0
    run = tmp_path / "di10"
    assert main(["run", "--experts", str(experts), "--strategy", "di-ed", "--beta", "10", "--out", str(run),
                 "--no-plots", *TINY]) == 0
    assert _result(run)["meta"]["config"]["source"]["options"]["beta"] == 10.0


@pytest.mark.parametrize("bad, message", [("beta: [1.0, -2]\n", "beta must be a number or a list"),
                                          ("beta: fast\n", "beta must be a number or a list"),
                                          ("beta: [true]\n", "beta must be a number or a list")])
def test_bad_beta_is_refused(experts, tmp_path, capsys, bad, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("strategy: di-ed\n" + bad)
    # a bad value in --config is a usage error, as the same value given as a flag
    assert main(["run", "--experts", str(experts), "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert main(["run", "--experts", str(experts), "--strategy", "di-ed", "--beta", "0,1",
                 "--out", str(tmp_path / "y")]) == 2
    assert "comma-separated list" in capsys.readouterr().err


def test_preset_sets_strategy_and_options_under_the_flags(experts, tmp_path, capsys):
    from exml_fast.experiments.ablation import PRESETS

    run = tmp_path / "best"
    assert main(["run", "--experts", str(experts), "--preset", "ed-best", "--out", str(run), "--no-plots",
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert "[preset] ed-best" in out and "lenet5_bn experts; these are lenet5" in out
    config = _result(run)["meta"]["config"]
    preset = PRESETS["ed-best"]
    assert config["strategy"] == preset["strategy"]
    for key in ("target_mode", "normalize", "lambda_ce"):
        if key in preset["options"]:
            assert config[key] == preset["options"][key]
    assert config["source"]["options"]["iterations"] == 4  # the flag wins over the preset
    assert main(["run", "--experts", str(experts), "--preset", "nope", "--out", str(tmp_path / "z")]) == 2


def test_adaptive_deepinversion_competes_with_the_learner(experts, tmp_path, monkeypatch):
    from exml_fast.synth import ModelInversion

    seen = []
    original = ModelInversion.__init__

    def spy(self, teacher, **kw):
        seen.append((kw.get("competitor"), kw.get("competition_weight")))
        original(self, teacher, **kw)

    monkeypatch.setattr(ModelInversion, "__init__", spy)
    run = tmp_path / "adi"
    assert main(["run", "--experts", str(experts), "--strategy", "mi-ed", "--competition-weight", "2",
                 "--out", str(run), "--no-plots", *TINY]) == 0
    # The first expert has no learner to compete with; the second competes with the learner.
    assert seen[0] == (None, None)
    assert isinstance(seen[1][0], __import__("torch").nn.Module) and seen[1][1] == 2.0
    assert _result(run)["meta"]["config"]["source"]["options"]["competitor"] == "learner"


CIL = ["--scenario", "split_mnist", "--n-experiences", "2", "--max-train", "200", "--epochs", "1", "--no-progress",
       "--seed", "0"]


TINY_SYNTH = ["--synth-iterations", "3", "--synth-batch-size", "16"]
CIL_EXTRA = {"icarl": ["--memory-size", "40"], "deepinversion-cil": ["--synth-per-class", "4", *TINY_SYNTH],
             "deepinversion-cil-balanced": ["--synth-per-class", "4", *TINY_SYNTH],
             "synthetic-exemplars": ["--memory-size", "20", *TINY_SYNTH],
             "skd": ["--synth-iterations", "2", "--synth-batch-size", "8"]}


@pytest.mark.filterwarnings("ignore::exml_fast.synth.LowAgreementWarning")  # 3 synthesis steps
@pytest.mark.parametrize("strategy", ["finetune", "joint", "lwf", "icarl", "deepinversion-cil",
                                      "deepinversion-cil-balanced", "synthetic-exemplars", "skd"])
def test_class_incremental_run_from_a_scenario_then_report(tmp_path, strategy, capsys):
    run = tmp_path / strategy
    extra = CIL_EXTRA.get(strategy, [])
    assert main(["run", "--strategy", strategy, "--out", str(run), *CIL, *extra]) == 0
    res = _result(run)
    assert res["strategy"] == strategy and len(res["acc_matrix"]) == 2
    assert res["meta"]["keeps_data"] is (strategy in ("joint", "icarl")) and res["meta"]["ex_model"] is False
    assert res["meta"]["config"]["epochs"] == 1 and "average_incremental_accuracy" in res["summary"]
    assert "2 tasks of its data" in capsys.readouterr().out
    assert main(["report", str(run)]) == 0
    keeps = "yes" if strategy in ("joint", "icarl") else "no"
    assert f"| {strategy} | {keeps} | split_mnist |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--strategy", "lwf", "--experts", "x"], "pass --scenario, not --experts"),
    (["--strategy", "lwf"], "--scenario is required"),
    (["--strategy", "mi-ed", "--scenario", "split_mnist"], "--experts is required"),
    (["--strategy", "lwf", "--scenario", "split_mnist", "--buffer-size", "9"], "does not use the option"),
    (["--strategy", "lwf", "--scenario", "split_mnist_mt"], "without task labels"),
])
def test_class_incremental_run_refusals(tmp_path, capsys, args, message):
    assert main(["run", *args, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_reproduce_cil_smoke_writes_the_table_and_resumes(tmp_path, capsys):
    args = ["reproduce", "cil-mnist", "--runs", "1", "--budget", "smoke", "--strategies", "finetune,icarl",
            "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    assert main(args) == 0
    rec = json.loads((tmp_path / "res" / "cil_mnist_smoke.json").read_text())
    assert [r["strategy"] for r in rec["rows"]] == ["finetune", "icarl"]
    assert [r["keeps_data"] for r in rec["rows"]] == [False, True] and rec["meta"]["budget"] == "smoke"
    assert rec["rows"][0]["published"]["value"] == "19.94"  # van de Ven et al.'s "None"
    md = (tmp_path / "res" / "cil_mnist_smoke.md").read_text()
    assert "| icarl | yes | 1 |" in md and "pipeline check" in md
    capsys.readouterr()
    assert main(args) == 0  # a rerun reads the finished runs back
    assert "finetune" in capsys.readouterr().out
    assert main([*args[:2], "--budget", "paper-ish"]) == 2
    assert main([*args, "--strategies", "mi-ed"]) == 1


def test_reproduce_cil_seeds_fill_the_ledger_without_a_table(tmp_path, capsys):
    args = ["reproduce", "cil-mnist", "--seeds", "1", "--budget", "smoke", "--strategies", "finetune",
            "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    assert main(args) == 0
    assert "finetune s1" in json.loads((tmp_path / "res" / "cil_mnist_smoke_runs.json").read_text())["runs"]
    assert not (tmp_path / "res" / "cil_mnist_smoke.md").exists()
    capsys.readouterr()
    for bad in ("x", "1,1", "-1", ","):
        assert main([*args[:2], "--seeds", bad, *args[4:]]) == 2
        assert "--seeds: comma-separated distinct ints >= 0, at least one" in capsys.readouterr().err
    assert main(["reproduce", "exml-mnist", "--seeds", "1"]) == 2
    assert "--seeds is for cil-mnist and cil-fmnist" in capsys.readouterr().err
