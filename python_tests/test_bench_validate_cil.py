"""benches/validate_cil.py: a smoke run of each family records one row per setting, evaluated on the held-out
training images (never the test set), under the family's record name."""

from __future__ import annotations

import json

import pytest
from _util import bench_module

from exml_fast import data


@pytest.fixture(scope="module")
def bench():
    with bench_module("validate_cil") as mod:
        yield mod


@pytest.mark.skipif(data.find_data_root("mnist") is None, reason="MNIST files not found (set EXML_FAST_DATA)")
def test_the_skd_family_runs_its_settings_on_the_validation_split(bench, tmp_path, monkeypatch):
    evaluated = []
    real = bench.make_scenario

    def spy(*args, **kwargs):
        sc = real(*args, **kwargs)
        evaluated.append((kwargs.get("eval_split"), sum(len(e.test_y) for e in sc)))
        return sc

    monkeypatch.setattr(bench, "make_scenario", spy)
    bench.main(["--family", "skd", "--budget", "smoke", "--seeds", "1", "--validation-size", "500", "--threads",
                "1", "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "cil_skd_validation_smoke.json").read_text())
    assert rec["family"] == "skd" and [r["strategy"] for r in rec["rows"]] == ["skd"] * 3
    assert [r["options"].get("gen_arch") for r in rec["rows"]] == [None, "skd-narrow", "skd-narrow"]
    assert all(len(r["finals"]) == 1 and 0 <= r["finals"][0] <= 100 for r in rec["rows"])
    # Every run is scored on the held-out training images: 500 of them over the 5 tasks, not the test set.
    assert evaluated and all(split == "validation" and n <= 500 for split, n in evaluated)
    assert "skd-small (SKD's Table IV)" in (tmp_path / "cil_skd_validation_smoke.md").read_text()


def test_each_family_names_its_record(bench):
    assert {f: name for f, (_, name) in bench.FAMILIES.items()} == \
        {"deepinversion-cil": "cil_dicil_validation", "skd": "cil_skd_validation"}
    with pytest.raises(SystemExit):
        bench.main(["--family", "lwf"])


@pytest.mark.skipif(data.find_data_root("mnist") is None, reason="MNIST files not found (set EXML_FAST_DATA)")
def test_settings_runs_only_those_rows_under_its_own_record_name(bench, tmp_path):
    bench.main(["--family", "skd", "--budget", "smoke", "--seeds", "1", "--validation-size", "500", "--threads",
                "1", "--settings", "3", "2", "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "cil_skd_validation_settings-2-3_smoke.json").read_text())
    assert [r["setting"] for r in rec["rows"]] == [label for label, _, _ in bench.SKD_SETTINGS[1:]]
    assert not (tmp_path / "cil_skd_validation_smoke.json").exists()  # the whole family's record is left alone
    for bad in (["4"], ["0"], ["2", "2"]):
        with pytest.raises(SystemExit):
            bench.main(["--family", "skd", "--settings", *bad, "--out", ""])
