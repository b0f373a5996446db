"""benches/bench_compress.py --part prune-budget: every n prunes and recovers on the first n of one draw, with
the same number of KD steps; a finished model is read back instead of run again, and the record says so.
--part prune-study: its recipe row is prune_without_data's, on a model that never saw its validation images."""

from __future__ import annotations

import json

import pytest
import torch
from _util import bench_module

from exml_fast.models import LeNet5BN

pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def bench():
    with bench_module("bench_compress") as mod:
        yield mod


def _tiny_model_and_data(calls):
    def fake(name, args):  # a random LeNet-5-BN and random images instead of a trained model and MNIST
        calls.append(name)
        torch.manual_seed(0)
        x = torch.randn(40, 1, 32, 32)
        return (LeNet5BN().eval(), 0.5, 0.25, 0.0, "mnist", x, torch.randint(0, 10, (40,)), x, 10.0)
    return fake


def test_prune_budget_runs_every_n_with_the_same_steps_and_reads_models_back(bench, tmp_path, monkeypatch):
    calls, synthesised = [], []
    monkeypatch.setattr(bench, "_model_and_data", _tiny_model_and_data(calls))
    real_synth = bench.synthetic_images

    def spy(*args, **kwargs):
        synthesised.append(kwargs["n"])
        return real_synth(*args, **kwargs)

    monkeypatch.setattr(bench, "synthetic_images", spy)
    argv = ["--part", "prune-budget", "--models", "lenet5_bn-mnist", "--budget-n", "16", "32", "--recover-steps",
            "2", "--di-iterations", "1", "--budget-dir", str(tmp_path / "budget"), "--threads", "1"]
    bench.main([*argv, "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "compress_prune_budget_cpu.json").read_text())
    assert rec["budget_n"] == [16, 32] and rec["recover_steps"] == 2
    (m,) = rec["models"]
    assert synthesised == [32]  # one draw of the largest n; the smaller budgets take its first images
    assert [(r["n"], r["row"], r["recover_epochs"]) for r in m["rows"]] == [
        (16, "taylor, DI", 8), (16, "taylor, real (ceiling)", 8), (32, "taylor, DI", 4),
        (32, "taylor, real (ceiling)", 4)]  # epochs x n / 64 = 2 steps each
    assert all(r["flops_reduction"] >= 0.5 for r in m["rows"])
    assert "read back" not in (tmp_path / "compress_prune_budget_cpu.md").read_text()

    # The same budget again: read back, not run; the record names it and keeps the note.
    bench.main([*argv, "--out", str(tmp_path), "--note", "ran in a test"])
    assert calls == ["lenet5_bn-mnist"] and synthesised == [32]
    md = (tmp_path / "compress_prune_budget_cpu.md").read_text()
    assert "read back from" in md and "lenet5_bn-mnist" in md and "Note: ran in a test" in md
    assert json.loads((tmp_path / "compress_prune_budget_cpu.json").read_text())["note"] == "ran in a test"


def test_prune_budget_refuses_a_budget_that_does_not_divide_the_steps(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--part", "prune-budget", "--budget-n", "500", "--out", ""])
    assert "every n must divide --recover-steps x 64 = 409600; got [500]" in capsys.readouterr().err


def test_prune_part_keeps_each_model_and_reads_it_back_only_with_the_same_settings(bench, tmp_path, monkeypatch,
                                                                                     capsys):
    calls = []
    monkeypatch.setattr(bench, "_model_and_data", _tiny_model_and_data(calls))
    argv = ["--part", "prune", "--models", "lenet5_bn-mnist", "--prune-n", "16", "--recover-epochs", "1",
            "--di-iterations", "1", "--prune-dir", str(tmp_path / "prune"), "--threads", "1", "--out", str(tmp_path)]
    bench.main(argv)
    kept = json.loads((tmp_path / "prune" / "lenet5_bn-mnist.json").read_text())
    assert (kept["prune_n"], kept["recover_epochs"], kept["di_iterations"]) == (16, 1, 1)
    assert [r["row"] for r in kept["rows"]] == [r[0] for r in bench.PRUNE_ROWS]
    assert "read back" not in (tmp_path / "compress_prune_cpu.md").read_text()

    bench.main([*argv, "--note", "ran in a test"])  # the same settings: read back, not run again
    assert calls == ["lenet5_bn-mnist"]
    md = (tmp_path / "compress_prune_cpu.md").read_text()
    assert "read back from" in md and "Note: ran in a test" in md
    assert json.loads((tmp_path / "compress_prune_cpu.json").read_text())["models"][0]["rows"] == kept["rows"]

    bench.main([*argv[:-2], "--recover-epochs", "2", "--out", str(tmp_path)])  # other settings: run again
    assert calls == ["lenet5_bn-mnist"] * 2
    assert json.loads((tmp_path / "prune" / "lenet5_bn-mnist.json").read_text())["recover_epochs"] == 2

    # the feature term is a setting too (the library's 10 by default), passed to every row and named in the record
    assert json.loads((tmp_path / "compress_prune_cpu.json").read_text())["feature_weight"] == 10.0
    assert "plus 10 x the mean squared difference of the BatchNorm outputs on the kept channels" in md
    weights = []
    real_prune = bench.prune_without_data

    def spy(*args, **kwargs):
        weights.append(kwargs["feature_weight"])
        return real_prune(*args, **kwargs)
    monkeypatch.setattr(bench, "prune_without_data", spy)
    bench.main([*argv[:-2], "--feature-weight", "0", "--out", str(tmp_path)])  # logits only: run again
    assert calls == ["lenet5_bn-mnist"] * 3 and weights == [0.0] * len(bench.PRUNE_ROWS)
    assert json.loads((tmp_path / "compress_prune_cpu.json").read_text())["feature_weight"] == 0.0
    assert "mean squared difference" not in (tmp_path / "compress_prune_cpu.md").read_text()
    with pytest.raises(SystemExit):
        bench.main([*argv[:-2], "--feature-weight", "-1", "--out", ""])
    for bad, expected in ((["--rotate", "181"], "an angle in [0, 180] degrees, got 181.0"),
                          (["--scale", "1"], "a zoom range in [0, 1), got 1.0")):
        with pytest.raises(SystemExit):
            bench.main([*argv[:-2], *bad, "--out", ""])
        assert expected in capsys.readouterr().err

    # the recovery's rotation and zoom are settings too: results kept before they were (no such keys) ran with none
    kept_path = tmp_path / "prune" / "lenet5_bn-mnist.json"
    kept = json.loads(kept_path.read_text())
    assert (kept.pop("rotate"), kept.pop("scale")) == (0.0, 0.0)
    kept_path.write_text(json.dumps(kept))
    augment = []
    monkeypatch.setattr(bench, "prune_without_data",
                        lambda *a, **kw: augment.append((kw["rotate"], kw["scale"])) or real_prune(*a, **kw))
    bench.main([*argv[:-2], "--feature-weight", "0", "--rotate", "0", "--scale", "0", "--out", ""])
    assert calls == ["lenet5_bn-mnist"] * 3 and augment == []  # read back
    bench.main([*argv[:-2], "--feature-weight", "0", "--rotate", "15", "--scale", "0.15", "--out", str(tmp_path)])
    assert calls == ["lenet5_bn-mnist"] * 4 and augment == [(15.0, 0.15)] * len(bench.PRUNE_ROWS)
    rec = json.loads((tmp_path / "compress_prune_cpu.json").read_text())
    assert (rec["rotate"], rec["scale"]) == (15.0, 0.15)
    assert "random rotation up to 15° and zoom by up to 0.15, then pad-crop 4" in (
        tmp_path / "compress_prune_cpu.md").read_text()

    # --record names a variant kept beside the part's record, which it leaves alone
    before = (tmp_path / "compress_prune_cpu.json").read_text()
    bench.main([*argv[:-2], "--recover-epochs", "3", "--out", str(tmp_path), "--record", "compress_prune_variant_cpu"])
    assert json.loads((tmp_path / "compress_prune_variant_cpu.json").read_text())["recover_epochs"] == 3
    assert (tmp_path / "compress_prune_variant_cpu.md").exists()
    assert (tmp_path / "compress_prune_cpu.json").read_text() == before
    with pytest.raises(SystemExit):
        bench.main([*argv[:-2], "--out", "", "--record", "x.json"])


def _tiny_validation_model(holdouts):
    def fake(name, folder, holdout=0):  # a random LeNet-5-BN instead of one trained on all but the holdout
        holdouts.append(holdout)
        torch.manual_seed(0)
        return LeNet5BN().eval(), 0.5, 0.25, 0.0
    return fake


def _tiny_mnist(split, dataset):
    g = torch.Generator().manual_seed(1)
    return torch.randn(60, 1, 32, 32, generator=g), torch.randint(0, 10, (60,), generator=g)


def test_prune_study_recipe_row_is_prune_without_data_and_validates_on_the_holdout(bench, tmp_path, monkeypatch):
    holdouts, synthesised = [], []
    monkeypatch.setattr(bench, "trained_model", _tiny_validation_model(holdouts))
    monkeypatch.setattr(bench, "mnist_tensors", _tiny_mnist)
    monkeypatch.setattr(bench, "STUDY", (bench.STUDY[0], bench.STUDY[3], bench.STUDY[6],
                                         ("DI + real (2n images)", "di", "di+real", {"mixup": 0.2}),
                                         bench.STUDY[20], bench.STUDY[21]))
    assert bench.STUDY[4][2] == "di+adi" and bench.STUDY[5][0].startswith("BN outputs")
    real_synth, competitors = bench.synthetic_images, []

    def spy(*args, **kwargs):
        competitors.append((kwargs["seed"], (kwargs.get("options") or {}).get("competitor")))
        synthesised.append(real_synth(*args, **kwargs))
        return synthesised[-1]
    monkeypatch.setattr(bench, "synthetic_images", spy)
    argv = ["--part", "prune-study", "--models", "lenet5_bn-fmnist", "--prune-n", "16", "--recover-epochs", "2",
            "--di-iterations", "1", "--holdout", "20", "--study-dir", str(tmp_path / "study"), "--threads", "1",
            "--out", str(tmp_path)]
    bench.main(argv)
    # one DeepInversion draw, shared by the rows that use it, and the competition round's draw
    assert holdouts == [20] and len(synthesised) == 2
    assert competitors[0] == (0, None) and competitors[1][0] == 1
    assert isinstance(competitors[1][1], torch.nn.Module)  # the recipe row's pruned network
    assert sum(p.numel() for p in competitors[1][1].parameters()) < sum(p.numel() for p in LeNet5BN().parameters())
    rec = json.loads((tmp_path / "compress_prune_study_cpu.json").read_text())
    rows = rec["models"][0]["rows"]
    assert [(r["scores"], r["recovery"], r["steps"]) for r in rows] == [
        ("di", "di", 2), ("di", "real", 2), ("di", "di", 8), ("di", "di+real", 2), ("di", "di+adi", 2),
        ("di", "di", 2)]
    assert rows[5]["changes"] == {"features": 10.0, "seed": 0}

    # the recipe row is exactly what prune_without_data does with the same images, validated on the last 20
    x, y = _tiny_mnist("train", "fashion-mnist")
    model = _tiny_validation_model([])("lenet5_bn-fmnist", "")[0]
    r = bench.prune_without_data(model, bench.SHAPE, 0.5, 0.25, images=synthesised[0], recover_epochs=2, seed=0,
                                 feature_weight=0.0, progress=False)
    assert rows[0]["accuracy"] == 100 * bench.evaluate(r.model, x[-20:], y[-20:])
    # and the feature row is prune_without_data's feature_weight
    r = bench.prune_without_data(model, bench.SHAPE, 0.5, 0.25, images=synthesised[0], recover_epochs=2, seed=0,
                                 feature_weight=10.0, progress=False)
    assert rows[5]["accuracy"] == 100 * bench.evaluate(r.model, x[-20:], y[-20:])
    assert rec["models"][0]["float_accuracy"] == 100 * bench.evaluate(model, x[-20:], y[-20:])
    md = (tmp_path / "compress_prune_study_cpu.md").read_text()
    assert "| DI scores, real recovery | di | real | 2 |" in md and "all but the last 20 training images" in md

    bench.main(argv)  # the same settings: read back, not run again
    assert holdouts == [20]


def test_prune_study_draw_rows_use_four_seeds_and_report_their_spread(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "trained_model", _tiny_validation_model([]))
    monkeypatch.setattr(bench, "mnist_tensors", _tiny_mnist)
    by_label = {row[0]: row for row in bench.STUDY}
    monkeypatch.setattr(bench, "STUDY", tuple(by_label[lb] for kind in ("logits only", "β 10")
                                              for lb in bench.DRAWS[kind]))
    real_synth, seeds = bench.synthetic_images, []

    def spy(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return real_synth(*args, **kwargs)
    monkeypatch.setattr(bench, "synthetic_images", spy)
    bench.main(["--part", "prune-study", "--models", "lenet5_bn-fmnist", "--prune-n", "16", "--recover-epochs", "1",
                "--di-iterations", "1", "--holdout", "20", "--study-dir", str(tmp_path / "study"), "--threads", "1",
                "--out", str(tmp_path)])
    assert seeds == [0, 1, 2, 3]  # one draw per seed, shared by the logits-only and the feature row
    rows = json.loads((tmp_path / "compress_prune_study_cpu.json").read_text())["models"][0]["rows"]
    acc = [r["accuracy"] for r in rows]
    md = (tmp_path / "compress_prune_study_cpu.md").read_text()
    assert (f"over 4 DeepInversion draws: logits only {min(acc[:4]):.2f}–{max(acc[:4]):.2f} % "
            f"(mean {sum(acc[:4]) / 4:.2f}), β 10 {min(acc[4:]):.2f}–{max(acc[4:]):.2f} % "
            f"(mean {sum(acc[4:]) / 4:.2f})") in md


def test_prune_study_draw_at_k_steps_is_that_draw_synthesised_for_k_steps(bench, tmp_path, monkeypatch):
    # "di2@3": the second draw (seed 1) at 3 synthesis steps, shared by the rows that name it; plain "di2" keeps
    # --di-iterations
    study = bench.STUDY
    monkeypatch.setattr(bench, "trained_model", _tiny_validation_model([]))
    monkeypatch.setattr(bench, "mnist_tensors", _tiny_mnist)
    monkeypatch.setattr(bench, "STUDY", (bench.STUDY[0], ("a", "di2@3", "di2@3", {}),
                                         ("b", "di2@3", "di2", {"features": 10.0})))
    real_synth, calls = bench.synthetic_images, []

    def spy(*args, **kwargs):
        calls.append((kwargs["seed"], kwargs["iterations"]))
        return real_synth(*args, **kwargs)
    monkeypatch.setattr(bench, "synthetic_images", spy)
    bench.main(["--part", "prune-study", "--models", "lenet5_bn-fmnist", "--prune-n", "16", "--recover-epochs", "1",
                "--di-iterations", "1", "--holdout", "20", "--study-dir", str(tmp_path / "study"), "--threads", "1",
                "--out", str(tmp_path)])
    assert calls == [(0, 1), (1, 3), (1, 1)]
    rows = json.loads((tmp_path / "compress_prune_study_cpu.json").read_text())["models"][0]["rows"]
    assert [(r["scores"], r["recovery"]) for r in rows][1:] == [("di2@3", "di2@3"), ("di2@3", "di2")]
    # the library-default draws: one row per seed at 2000 steps with the feature term, summarised like the others
    kind = bench.DRAWS["β 10 on DI of 2000 steps"]
    by_label = {row[0]: row for row in study}
    assert [by_label[lb][1:] for lb in kind] == [(f"{d}@2000", f"{d}@2000", {"features": 10.0})
                                                 for d in bench.DRAW_SOURCES]
    # and the same draws recovered with prune_without_data's rotate 15 and scale 0.15 (the test record's)
    kind = bench.DRAWS["β 10 on DI of 2000 steps with rotate 15° and scale 0.15"]
    assert [by_label[lb][1:] for lb in kind] == [
        (f"{d}@2000", f"{d}@2000", {"features": 10.0, "rotate": 15.0, "scale": 0.15}) for d in bench.DRAW_SOURCES]


def test_prune_study_refuses_no_holdout(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--part", "prune-study", "--holdout", "0", "--out", ""])
    assert "--holdout: prune-study validates on the last --holdout training images, so it must be >= 1; got 0" \
        in capsys.readouterr().err


def test_prune_study_rows_default_to_all_on_the_lenets_and_are_checked(bench, tmp_path, monkeypatch, capsys):
    args = bench.argparse.Namespace(study_rows=None)
    assert bench._study_rows("lenet5_bn-fmnist", args) == list(range(len(bench.STUDY)))
    for name, labels in (("resnet18_slim-fmnist", ["DI scores, real recovery", "BN outputs of the kept channels "
                                                   "matched too (β 10)"]),
                         ("mobilenet_v2-fmnist", ["BN outputs of the kept channels matched too (β 10)",
                                                  "the same, DI of 1000 synthesis steps"])):
        quick = bench._study_rows(name, args)
        assert quick[0] == 0 and [bench.STUDY[i][0] for i in quick][1:] == labels
    assert bench._study_rows("mobilenet_v2-fmnist", bench.argparse.Namespace(study_rows=[0, 3])) == [0, 3]
    for bad in (["3", "0"], ["0", "0"], ["0", str(len(bench.STUDY))]):
        with pytest.raises(SystemExit):
            bench.main(["--part", "prune-study", "--study-rows", *bad, "--out", ""])
        assert "--study-rows: distinct indices into the" in capsys.readouterr().err
    # a subset runs only its rows, and the record says the recipe ran on one seed
    monkeypatch.setattr(bench, "trained_model", _tiny_validation_model([]))
    monkeypatch.setattr(bench, "mnist_tensors", _tiny_mnist)
    bench.main(["--part", "prune-study", "--models", "lenet5_bn-fmnist", "--prune-n", "16", "--recover-epochs", "1",
                "--di-iterations", "1", "--holdout", "20", "--study-dir", str(tmp_path / "study"), "--threads", "1",
                "--study-rows", "0", "3", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "compress_prune_study_cpu.json").read_text())["models"][0]["rows"]
    assert [r["row"] for r in rows] == [bench.STUDY[0][0], bench.STUDY[3][0]]
    assert "the record's recipe (one recovery seed)" in (tmp_path / "compress_prune_study_cpu.md").read_text()
