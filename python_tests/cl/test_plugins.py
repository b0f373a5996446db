"""Strategies from outside the package: options a strategy declares, the public hooks, discovery through the
``exml_fast.strategies`` entry-point group and ``package.module:name``, and ``build_strategy(..., model=)``."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from _util import band_images
from torch import nn

from exml_fast.cl import strategies as S
from exml_fast.cl.scenarios import Experience, Scenario
from exml_fast.cl.strategies import options as O
from exml_fast.cli import build_parser, main
from exml_fast.data import find_data_root
from exml_fast.models import build_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_strategy"
K = 4
SPLITS = [[0, 1], [2, 3]]
CPU = torch.device("cpu")


@pytest.fixture
def registry(monkeypatch):
    """The strategy and option tables as they are, restored after the test (its registrations dropped)."""
    monkeypatch.setattr(S.registry, "STRATEGIES", dict(S.STRATEGIES))
    monkeypatch.setattr(O, "DECLARED_OPTIONS", dict(O.DECLARED_OPTIONS))
    return S.registry.STRATEGIES


def _scenario():
    exps = []
    for i, cls in enumerate(SPLITS):
        tx, ty = band_images(cls, 24, seed=i)
        vx, vy = band_images(cls, 10, seed=100 + i)
        exps.append(Experience(i, tuple(cls), None, tx, ty, vx, vy))
    return Scenario("toy", "toy", K, (1, 32, 32), (0.5,), (0.5,), False, 0, tuple(range(K)), exps)


def _build_toy(ctx, opt):
    return S.FineTune(S.build_data_learner(ctx, opt), **S.data_strategy_kwargs(ctx, opt))


# -- options a strategy declares ------------------------------------------------------------------------------
def test_declared_options_become_run_options_and_flags_with_their_help(registry):
    weight = S.StrategyOption("toy_weight", float, 0.25, "toy: weight of the toy term (default: 0.25)")
    S.register_strategy("toy", keeps_data=False, data=True, options=["epochs", "lr", weight], help="a toy")(_build_toy)
    assert S.RUN_OPTIONS["toy_weight"] == (float, 0.25, "toy: weight of the toy term (default: 0.25)")
    assert registry["toy"].options == {"epochs", "lr", "toy_weight"}
    run = next(a for a in build_parser(["run"])._actions if a.dest == "command").choices["run"]
    text = " ".join(run.format_help().split())
    assert "--toy-weight TOY_WEIGHT toy: weight of the toy term (default: 0.25)" in text
    args = build_parser(["run"]).parse_args(["run", "--strategy", "toy", "--out", "x", "--toy-weight", "0.5"])
    assert args.strategy == "toy" and args.toy_weight == 0.5
    # the builder sees the default, a given value, and a run giving an option it does not read is refused
    s = S.build_strategy("toy", None, _scenario(), options={"epochs": 1}, seed=0, device=CPU, progress=False)
    assert isinstance(s, S.FineTune)
    with pytest.raises(S.StrategyOptionError, match="does not use the option"):
        S.build_strategy("toy", None, _scenario(), options={"memory_size": 9}, seed=0, device=CPU, progress=False)


def test_a_shared_option_redeclared_keeps_its_type_and_sets_this_strategys_default(registry):
    S.register_strategy("toy", keeps_data=False, data=True, help="a toy",
                        options=[S.StrategyOption("epochs", int, 3, "toy epochs")])(_build_toy)
    assert registry["toy"].defaults == {"epochs": 3} and S.RUN_OPTIONS["epochs"][1] is None  # the flag's own
    with pytest.raises(ValueError, match="'lr' is declared already with type float; declare it as float, not int"):
        S.register_strategy("toy2", keeps_data=False, help="x", options=[S.StrategyOption("lr", int, 1, "x")])
    with pytest.raises(ValueError, match="unknown: \\['nope'\\]"):
        S.register_strategy("toy2", keeps_data=False, help="x", options=["nope"])
    with pytest.raises(TypeError, match="options must be a list"):
        S.register_strategy("toy2", keeps_data=False, help="x", options="lr")
    assert "toy2" not in registry


@pytest.mark.parametrize("kw, match", [({"name": "My-Weight"}, "lower-case Python identifier"),
                                       ({"type": list}, "type must be one of int, float, str, bool, tuple"),
                                       ({"help": ""}, "help must be a non-empty string"),
                                       ({"name": "seed"}, "run argument of its own")])
def test_strategy_option_refuses_what_cannot_be_a_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        S.StrategyOption(**{"name": "my_weight", "type": float, "default": 1.0, "help": "h", **kw})


def test_run_options_table_is_derived_from_the_declarations():
    assert set(S.RUN_OPTIONS) == set(O.DECLARED_OPTIONS)
    assert S.RUN_OPTIONS["memory_size"] == (int, 2000, O.DECLARED_OPTIONS["memory_size"].help)  # icarl's own
    assert S.RUN_OPTIONS["distill_temperature"][:2] == (float, 2.0)  # lwf's own
    assert S.STRATEGIES["lwf"].options >= {"distill_temperature", "lwf_form", "epochs"}


# -- public hooks ------------------------------------------------------------------------------------------
def test_public_hooks_run_in_order_and_old_underscore_hooks_still_work():
    calls = []

    class Public(S.FineTune):
        def before_experience(self, exp, i):
            calls.append(("before", i))

        def before_epoch(self, epoch, exp, i):
            calls.append(("epoch", epoch))

        def criterion(self, logits, x, y, step):
            calls.append(("criterion", step.experience, tuple(step.active.tolist())))
            return super().criterion(logits, x, y, step)

        def cleanup_experience(self):
            calls.append(("cleanup",))

        def after_experience(self, exp, x, y):
            calls.append(("after", x.shape[0]))

    class Legacy(S.FineTune):  # written for the former names
        def _begin(self, exp, i):
            calls.append(("legacy-begin", i))

        def _loss(self, logits, x, y, ctx):
            calls.append(("legacy-loss", tuple(ctx["active"].tolist())))
            return super()._loss(logits, x, y, ctx)

    sc = _scenario()
    Public(build_model("lenet5", num_classes=K), epochs=1, batch_size=48, progress=False).train(sc[0])
    assert calls == [("before", 1), ("epoch", 0), ("criterion", 1, (0, 1)), ("cleanup",), ("after", 48)]
    calls.clear()
    Legacy(build_model("lenet5", num_classes=K), epochs=1, batch_size=48, progress=False).train(sc[0])
    assert calls == [("legacy-begin", 1), ("legacy-loss", (0, 1))]
    assert S.LwF._begin is S.LwF.before_experience and S.Strategy._logits is S.Strategy.logits
    # a hook from a mixin that is no Strategy answers under both names too
    assert S.SyntheticExemplars._record_info is S.SyntheticExemplars.history_info is not S.DataStrategy.history_info


# -- discovery ------------------------------------------------------------------------------------------------
PLUGIN = '''
from exml_fast.cl.strategies import (FineTune, StrategyOption, build_data_learner, data_strategy_kwargs,
                                     register_strategy)


@register_strategy("{name}", keeps_data=False, data=True, help="a plugin",
                   options=["epochs", StrategyOption("{option}", int, 7, "plugin: its option")])
def build(ctx, opt):
    return FineTune(build_data_learner(ctx, opt), **data_strategy_kwargs(ctx, opt))
'''


def _plugin(tmp_path, monkeypatch, module, name, option, entry=None):
    """A module ``module`` registering ``name`` on ``sys.path`` and, with ``entry``, a distribution declaring
    it in the exml_fast.strategies group (a dist-info folder beside it, as ``pip install --target`` writes)."""
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(name=name, option=option))
    if entry is not None:
        info = tmp_path / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[exml_fast.strategies]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)


def test_an_entry_point_strategy_is_found_by_name(registry, tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, "exml_toy_ep", "toy-ep", "toy_ep_option", entry="toy-ep = exml_toy_ep:build")
    assert "toy-ep" not in registry
    assert S.resolve_strategy("toy-ep") == "toy-ep" and registry["toy-ep"].options == {"epochs", "toy_ep_option"}
    s = S.build_strategy("toy-ep", None, _scenario(), options={"epochs": 1}, seed=0, device=CPU, progress=False)
    assert isinstance(s, S.FineTune)


def test_load_entry_points_registers_every_plugin_and_warns_about_a_broken_one(registry, tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, "exml_toy_ep2", "toy-ep2", "toy_ep2_option",
            entry="toy-ep2 = exml_toy_ep2:build\nbroken = exml_no_such_module:build")
    with pytest.warns(UserWarning, match="strategy plugin 'broken'.*not loaded"):
        assert S.load_entry_points() == ("toy-ep2",)
    assert "toy-ep2" in registry and "toy_ep2_option" in S.RUN_OPTIONS
    with pytest.raises(ValueError, match="broken: the plugin's entry point 'exml_no_such_module:build' .*failed to "
                                         "load: ModuleNotFoundError"):  # asked for by name: why, not a warning
        S.resolve_strategy("broken")
    with pytest.warns(UserWarning, match="'broken'") as caught:
        assert S.load_entry_points() == ()  # toy-ep2 is loaded once; the broken one is retried and warns again
    assert len(caught) == 1


def test_a_module_reference_is_found_and_a_bad_one_is_a_clear_error(registry, tmp_path, monkeypatch, capsys):
    _plugin(tmp_path, monkeypatch, "exml_toy_ref", "toy-ref", "toy_ref_option")
    assert S.resolve_strategy("exml_toy_ref:build") == "toy-ref"  # the decorated builder
    assert S.resolve_strategy("exml_toy_ref:toy-ref") == "toy-ref"  # the name it registers
    assert S.resolve_strategy("exml_fast.cl.strategies.lwf:LwF") == "lwf"  # a Strategy class of a registered name
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        S.resolve_strategy("no_such_pkg.mod:thing")
    with pytest.raises(ValueError, match="module 'exml_toy_ref' has no strategy 'nothing'.*it registers toy-ref"):
        S.resolve_strategy("exml_toy_ref:nothing")
    assert main(["run", "--strategy", "a.b:c", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "argument --strategy: a.b:c: cannot import module 'a.b'" in err and "Traceback" not in err


def test_a_config_file_may_name_a_module_reference_and_its_options(registry, tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, "exml_toy_cfg", "toy-cfg", "toy_cfg_option")
    cfg = tmp_path / "run.json"
    cfg.write_text('{"toy_cfg_option": 3, "strategy": "exml_toy_cfg:build", "epochs": 2}')
    assert S.load_config(cfg) == {"strategy": "toy-cfg", "toy_cfg_option": 3, "epochs": 2}
    cfg.write_text('{"strategy": "exml_toy_cfg:nothing"}')
    with pytest.raises(ValueError, match="strategy: .*has no strategy 'nothing'"):
        S.load_config(cfg)


def test_a_module_reference_on_the_command_line_declares_its_flags(registry, tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, "exml_toy_cli", "toy-cli", "toy_cli_option")
    argv = ["run", "--strategy", "exml_toy_cli:build", "--out", "x", "--toy-cli-option", "3"]
    args = build_parser(argv).parse_args(argv)
    assert args.strategy == "toy-cli" and args.toy_cli_option == 3


# -- model= ---------------------------------------------------------------------------------------------------
def test_build_strategy_trains_ones_own_model(registry):
    sc = _scenario()
    net = build_model("lenet5_bn", num_classes=K)
    s = S.build_strategy("lwf", None, sc, options={"epochs": 1}, seed=0, device=CPU, progress=False, model=net)
    assert s.model is net
    before = [p.detach().clone() for p in net.parameters()]
    s.train(sc[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert s.predict(sc[0].test_x).shape == (sc[0].test_x.shape[0], K)


@pytest.mark.parametrize("model, error, match", [
    ([nn.Linear(4, 4)], TypeError, "model must be a torch.nn.Module .*; got list"),
    (nn.Sequential(nn.Flatten(), nn.Linear(1024, 3)), ValueError,
     r"model must output \(B, 4\) logits, one per class of the scenario \(4 classes\), for \(B, 1, 32, 32\) inputs; "
     r"it gives \(2, 3\)"),
    (nn.Sequential(nn.Flatten(), nn.Linear(99, 4)), ValueError,
     r"model fails on the scenario's inputs, a \(2, 1, 32, 32\)"),
])
def test_build_strategy_checks_the_model(model, error, match):
    with pytest.raises(error, match=match):
        S.build_strategy("finetune", None, _scenario(), options={"epochs": 1}, seed=0, device=CPU, progress=False,
                         model=model)


def test_model_is_refused_with_arch_or_by_a_strategy_without_a_learner():
    net = build_model("lenet5", num_classes=K)
    with pytest.raises(S.StrategyOptionError, match="pass model= or the arch option, not both"):
        S.build_strategy("finetune", None, _scenario(), options={"arch": "lenet5"}, seed=0, device=CPU,
                         progress=False, model=net)
    with pytest.raises(ValueError, match="does not train the network passed as model="):
        S.build_strategy("param-avg", object(), _scenario(), options={}, seed=0, device=CPU, progress=False,
                         model=net)


# -- the example package, installed ------------------------------------------------------------------------------
def _run_cli(args, pythonpath, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "exml_fast", "run", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(find_data_root("mnist") is None, reason="MNIST files not found")
def test_the_example_plugin_installs_and_runs_by_entry_point_and_by_module_name(tmp_path):
    source, target = tmp_path / "src", tmp_path / "site"  # built from a copy: setuptools writes beside it
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "--target", str(target), str(source)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr
    assert (target / "l2_anchor.py").exists()
    tiny = ["--scenario", "split_mnist", "--n-experiences", "2", "--max-train", "100", "--epochs", "1",
            "--device", "cpu", "--no-plots", "--no-progress", "--seed", "0"]
    by_name = _run_cli(["--strategy", "l2-anchor", "--anchor-weight", "0.5", "--out", str(tmp_path / "a"), *tiny],
                       target, tmp_path)
    assert by_name.returncode == 0, by_name.stderr
    assert "[result] l2-anchor: final stream accuracy" in by_name.stdout
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert result["strategy"] == "l2-anchor" and len(result["acc_matrix"]) == 2
    assert result["meta"]["config"]["weight"] == 0.5 and 0.0 <= result["summary"]["final_stream_accuracy"] <= 1.0
    # not installed: the module on PYTHONPATH, named as module:attr
    by_module = _run_cli(["--strategy", "l2_anchor:build", "--out", str(tmp_path / "b"), *tiny], source, tmp_path)
    assert by_module.returncode == 0, by_module.stderr
    assert "[result] l2-anchor: final stream accuracy" in by_module.stdout
    assert json.loads((tmp_path / "b" / "result.json").read_text())["meta"]["config"]["weight"] == 1.0
