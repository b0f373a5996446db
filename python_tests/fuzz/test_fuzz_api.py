"""Fuzzing the synthesizers, the strategies' options, the run-config files and the command line
(python_tests/fuzz/_fuzz.py has the rule). Synthesizer cases that are valid run one step on a tiny
batch and must return finite images of the asked classes; a teacher with NaN or Inf weights must be
refused, not inverted into NaN images."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from _fuzz import check_error, count
from hypothesis import given, settings
from hypothesis import strategies as st

from exml_fast.cl.scenarios import Experience, Scenario
from exml_fast.cl.strategies import RUN_OPTIONS, build_strategy
from exml_fast.cl.strategies.registry import STRATEGIES, load_config
from exml_fast.cli import build_parser
from exml_fast.models import build_model
from exml_fast.synth import DataImpressions, DeepInversion, ModelInversion

K = 4
ODD = [0, -1, -2.5, 1e-12, 10**4, math.nan, math.inf, -math.inf, "x", "", None, True, [], [1, 2], {"a": 1}]


def _teacher(poison: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model("lenet5bn", num_classes=K).eval()
    if poison:
        with torch.no_grad():
            next(m.parameters()).view(-1)[0] = math.nan if poison == "nan" else math.inf
    return m


TEACHER = _teacher()
SYNTHS = {"model-inversion": ModelInversion, "deepinversion": DeepInversion, "data-impressions": DataImpressions}
KNOBS = {
    "model-inversion": ["iterations", "batch_size", "lr", "temperature", "bn_weight", "blur_weight", "mean", "std",
                        "input_shape"],
    "deepinversion": ["iterations", "batch_size", "lr", "competition_weight", "preset", "mean", "std",
                      "input_shape", "tv_l2_weight"],
    "data-impressions": ["iterations", "batch_size", "lr", "temperature", "beta", "mean", "std", "input_shape"],
}


@settings(max_examples=150)
@given(data=st.data())
def test_synthesizers_make_finite_images_or_refuse_by_name(data):
    method = data.draw(st.sampled_from(sorted(SYNTHS)))
    count(f"synth.{method}")
    kw = {"input_shape": (1, 32, 32), "mean": 0.5, "std": 0.5, "iterations": 1, "batch_size": 3, "warn_below": None}
    knob = data.draw(st.sampled_from(KNOBS[method] + ["none"]))
    if knob != "none":
        kw[knob] = data.draw(st.sampled_from(ODD + [(1, 32), (3, 32, 32), (1, 0, 32), 2, 0.3]))
    teacher = data.draw(st.sampled_from([None, None, None, "nan", "inf"]))
    n = data.draw(st.sampled_from([1, 4, 0, -1, 2.5, "3"]))
    classes = data.draw(st.sampled_from([None, [0, 1], [], [K], [-1], [1, 1], "0", torch.tensor([2])]))
    names = [type_.__name__ for type_ in SYNTHS.values()] + [*kw, "n", "classes", "teacher", "iterations"]
    try:
        synth = SYNTHS[method](_teacher(teacher) if teacher else TEACHER, **kw)
        batch = synth.synthesize(n, classes=classes, generator=0, progress=False)
    except Exception as e:  # noqa: BLE001 - the rule decides
        check_error(e, names)
        return
    assert teacher is None, "a teacher with non-finite weights was inverted"
    assert batch.x.shape == (n, 1, 32, 32) and bool(torch.isfinite(batch.x).all())
    allowed = set(range(K)) if classes is None else {int(c) for c in torch.as_tensor(classes).reshape(-1)}
    assert set(batch.y.tolist()) <= allowed


def _scenario() -> Scenario:
    exps = [Experience(i, (2 * i, 2 * i + 1), None, torch.randn(4, 1, 32, 32),
                       torch.tensor([2 * i] * 2 + [2 * i + 1] * 2), torch.randn(2, 1, 32, 32),
                       torch.tensor([2 * i, 2 * i + 1])) for i in range(2)]
    return Scenario("toy", "mnist", K, (1, 32, 32), (0.5,), (0.5,), False, 0, tuple(range(K)), exps)


SCENARIO = _scenario()
DATA_STRATEGIES = sorted(n for n, spec in STRATEGIES.items() if spec.data)


@settings(max_examples=150)
@given(data=st.data())
def test_strategy_options_build_or_refuse_by_name(data):
    name = data.draw(st.sampled_from(DATA_STRATEGIES))
    count("strategies")
    keys = data.draw(st.lists(st.sampled_from(sorted(RUN_OPTIONS)), max_size=3, unique=True))
    options = {k: data.draw(st.sampled_from(ODD + [1, 0.5, "softmax", (1.0,)])) for k in keys}
    try:
        build_strategy(name, None, SCENARIO, options=options, seed=0, device=torch.device("cpu"), progress=False)
    except Exception as e:  # noqa: BLE001 - the rule decides
        check_error(e, [name, *keys, *(k.replace("_", "-") for k in keys), *STRATEGIES[name].options])


@settings(max_examples=150)
@given(data=st.data())
def test_run_config_files_load_or_refuse_by_name(tmp_path_factory, data):
    count("config")
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    kind = data.draw(st.sampled_from(["mapping", "text", "bytes"]))
    if kind == "mapping":
        keys = data.draw(st.lists(st.sampled_from([*RUN_OPTIONS, "strategy", "seed", "nope", "buffer-size"]),
                                  max_size=4, unique=True))
        body = {k: data.draw(st.sampled_from(ODD + ["lwf", "mi-ed", 3, 0.1, [0.5, 2]])) for k in keys}
        path.write_text(yaml.safe_dump(body))
    elif kind == "text":
        path.write_text(data.draw(st.text(max_size=60)))
    else:
        path.write_bytes(data.draw(st.binary(max_size=60)))
    try:
        load_config(path)
    except Exception as e:  # noqa: BLE001 - the rule decides
        check_error(e, ["--config", str(path)])


PARSER = build_parser()
WORDS = ["run", "synthesize", "train-experts", "report", "demo", "reproduce", "--strategy", "lwf", "--out", "x",
         "--iterations", "-3", "0", "abc", "--device", "tpu", "cuda:x", "--classes", "1,1", "-1,2", "--seed", "--lr",
         "nan", "--beta", "0,1", "--scenario", "nope", "-n", "--help-me", "--resume", "--no-plots", "--config"]


@settings(max_examples=200)
@given(argv=st.lists(st.sampled_from(WORDS), max_size=8))
def test_command_line_parsing_exits_2_or_parses(argv):
    count("cli")
    try:
        PARSER.parse_args(argv)
    except SystemExit as e:
        assert e.code in (0, 2)


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_teacher_with_non_finite_weights_is_refused_by_every_synthesizer(poison):
    for cls in SYNTHS.values():
        with pytest.raises(ValueError, match="teacher"):
            cls(_teacher(poison), input_shape=(1, 32, 32), iterations=1, batch_size=2)
