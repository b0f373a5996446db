"""`exml-fast reproduce exml-mnist-ablation`: the ED ablation at the smoke budget, shared work, records."""

from __future__ import annotations

import json

import pytest

from exml_fast.cl.strategies import RUN_OPTIONS, strategy_names
from exml_fast.cli import main
from exml_fast.data import find_data_root
from exml_fast.experiments.ablation import PRESETS, VARIANTS, ablate_exml_mnist, select_variant
from exml_fast.models import ARCHS

STRATEGY_CHOICES = strategy_names()

needs_mnist = pytest.mark.skipif(find_data_root("mnist") is None or find_data_root("fashion-mnist") is None,
                                 reason="MNIST / Fashion-MNIST files not found")


def test_variants_and_presets_name_real_strategies_and_options():
    assert len({v.name for v in VARIANTS}) == len(VARIANTS)
    for v in VARIANTS:
        assert v.strategy in STRATEGY_CHOICES and v.arch in ARCHS and v.note
        assert set(v.options) <= set(RUN_OPTIONS), v.name
    for name, p in PRESETS.items():
        assert p["strategy"] in STRATEGY_CHOICES and p["arch"] in ARCHS and p["note"], name
        assert set(p["options"]) <= set(RUN_OPTIONS), name


def test_ablation_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="budget"):
        ablate_exml_mnist(budget="huge", out=tmp_path, results=None)
    with pytest.raises(ValueError, match="variants"):
        ablate_exml_mnist(variants=("nope",), out=tmp_path, results=None)
    with pytest.raises(ValueError, match="runs"):
        ablate_exml_mnist(runs=0, out=tmp_path, results=None)


@needs_mnist
def test_smoke_ablation_selects_on_validation_and_tests_on_fresh_seeds(tmp_path, capsys):
    base = ["reproduce", "exml-mnist-ablation", "--runs", "1", "--budget", "smoke", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res"), "--device", "cpu"]
    assert main([*base, "--variants", "mi,mi-bn-adi", "--test-seeds", "none"]) == 0
    assert main([*base, "--variants", "replay", "--test-seeds", "7"]) == 0  # reads the other two back
    rec = json.loads((tmp_path / "res" / "exml_mnist_ablation_smoke.json").read_text())
    rows = {r["variant"]: r for r in rec["rows"]}
    assert list(rows) == ["mi", "mi-bn-adi", "replay"]  # the table's order
    assert rows["mi-bn-adi"]["arch"] == "lenet5_bn" and rows["mi-bn-adi"]["options"]["competition_weight"] == 1.0
    assert rows["mi"]["synth_iterations"] == 5 and rows["replay"]["synth_iterations"] is None
    assert all(0 <= r["mean"] <= 100 and r["runs"] == 1 and r["seeds"] == [0] for r in rows.values())
    assert rec["meta"]["runs_s"] > 0 and rec["meta"]["budget"] == "smoke"
    # selection: the best ExML row by validation accuracy (replay keeps real data and is never selected)
    best = max(("mi", "mi-bn-adi"), key=lambda n: rows[n]["mean"])
    assert rec["selected"] == best and not rows["replay"]["ex_model"]
    assert rec["test"]["seeds"] == [7] and rec["meta"]["test_seeds"] == [7]
    runs = tmp_path / "runs" / "smoke"
    assert (runs / "validation" / "split_mnist" / "mi_s0" / "result.json").exists()
    assert (runs / "test" / "split_mnist" / f"{best}_s7" / "result.json").exists()
    assert not list((runs / "test" / "split_mnist").glob("mi-bn-adi_s0*"))  # selection seeds never tested
    kw = json.loads((runs / "experts" / "split_mnist_validation_lenet5_s0" / "stream.json").read_text())
    assert kw["meta"]["scenario"]["kwargs"]["eval_split"] == "validation"
    assert kw["meta"]["scenario"]["kwargs"]["validation_size"] == 10000
    md = (tmp_path / "res" / "exml_mnist_ablation_smoke.md").read_text()
    # The selected row is bold; which of the two smoke rows wins depends on a 5-step run's accuracies.
    row = f"| **{best}** |" if best == "mi-bn-adi" else "| mi-bn-adi |"
    assert f"{row} mi-ed | lenet5_bn | " in md and "budget: **smoke**" in md and "validation" in md
    assert f"**{best}** (validation" in md
    capsys.readouterr()
    assert main([*base, "--variants", "mi", "--strategies", "mi-ed"]) == 2
    assert "takes --variants" in capsys.readouterr().err
    assert main(["reproduce", "zskd-mnist", "--variants", "mi"]) == 2
    assert "are for exml-mnist-ablation" in capsys.readouterr().err
    assert main([*base, "--test-seeds", "a,b"]) == 2


def test_test_seeds_must_be_fresh(tmp_path):
    with pytest.raises(ValueError, match="test_seeds"):
        ablate_exml_mnist(runs=3, test_seeds=(2, 100), out=tmp_path, results=None)


def test_select_variant_ignores_replay_and_unfinished_rows():
    rows = [{"variant": "a", "ex_model": True, "runs": 3, "mean": 50.0},
            {"variant": "b", "ex_model": True, "runs": 2, "mean": 90.0},
            {"variant": "replay", "ex_model": False, "runs": 3, "mean": 95.0},
            {"variant": "c", "ex_model": True, "runs": 3, "mean": 60.0}]
    assert select_variant(rows, 3)["variant"] == "c"
    assert select_variant(rows[1:3], 3) is None


def test_the_best_preset_is_the_variant_the_recorded_ablation_selected_on_validation():
    import pathlib

    from exml_fast.experiments.ablation import variant_options
    from exml_fast.experiments.budgets import BUDGETS

    record = json.loads((pathlib.Path(__file__).resolve().parents[2] / "benches" / "results"
                         / "exml_mnist_ablation.json").read_text())
    assert record["meta"]["validation_size"] > 0 and record["test"]["runs"] >= 5
    assert not set(record["test"]["seeds"]) & {s for r in record["rows"] for s in r["seeds"]}  # fresh test seeds
    preset = PRESETS["ed-best"]
    variant = next(v for v in VARIANTS if v.name == record["selected"])
    ran = variant_options(variant, BUDGETS["demo"])
    assert preset["strategy"] == variant.strategy and preset["arch"] == variant.arch
    assert {k: ran.get(k, RUN_OPTIONS[k][1]) for k in preset["options"]} == preset["options"]


def test_every_variant_gets_only_options_its_strategy_reads():
    from exml_fast.cl.strategies.registry import STRATEGIES
    from exml_fast.experiments.ablation import variant_options
    from exml_fast.experiments.budgets import BUDGETS

    for budget in ("demo", "paper", "smoke"):
        for v in VARIANTS:
            opts = variant_options(v, BUDGETS[budget])
            assert set(opts) <= STRATEGIES[v.strategy].options, (budget, v.name)
            assert all(opts[k] == x for k, x in v.options.items())  # the variant's own always win
    gen = next(v for v in VARIANTS if v.name == "gen-ed-bn")
    assert "buffer_size" not in variant_options(gen, BUDGETS["demo"])  # gen-ed keeps no buffer
    assert variant_options(gen, BUDGETS["demo"])["synth_iterations"] == BUDGETS["demo"]["run"]["synth_iterations"]


@needs_mnist
def test_gen_ed_runs_in_the_ablation(tmp_path):
    rec = ablate_exml_mnist(runs=1, budget="smoke", variants=("gen-ed-bn",), test_seeds=None, out=tmp_path / "runs",
                            results=None, device="cpu")
    (row,) = rec["rows"]
    assert row["variant"] == "gen-ed-bn" and row["strategy"] == "gen-ed" and 0 <= row["mean"] <= 100
    assert rec["selected"]["variant"] == "gen-ed-bn"  # an ExML row: a candidate like the others
    assert row["synth_iterations"] == 5  # the smoke budget's synthesis steps, as the delegator's explore steps
