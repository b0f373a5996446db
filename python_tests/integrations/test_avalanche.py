"""exml_fast.integrations.avalanche: the converters, Ex-Model Distillation as an Avalanche strategy, the
data-free replay plugin on three Avalanche strategies, bad input, the comparison bench's smoke run, and the same
numbers through both doors (deepinversion-cil and the plugin on Naive). Skipped without the extra."""

from __future__ import annotations

import dataclasses

import copy
import io
import json
import statistics

import pytest
import torch

pytest.importorskip("avalanche.training", reason="Avalanche is not installed: pip install exml_fast[avalanche]")

from _util import bench_module  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics  # noqa: E402
from avalanche.logging import TextLogger  # noqa: E402
from avalanche.training import EWC, LwF, Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402
from torch import nn  # noqa: E402

from exml_fast import data  # noqa: E402
from exml_fast.cl.scenarios import Experience, Scenario, make_scenario, train_experts  # noqa: E402
from exml_fast.cl.strategies import RealReplay  # noqa: E402
from exml_fast.integrations.avalanche import (DataFreeReplayPlugin, ExModelDistillationStrategy,  # noqa: E402
                                              to_avalanche_benchmark, to_exmodel_scenario, to_expert_stream)
from exml_fast.models import build_model  # noqa: E402
from exml_fast.synth import DataImpressions, DeepInversion, ModelInversion  # noqa: E402

needs_mnist = pytest.mark.skipif(data.find_data_root("mnist") is None,
                                 reason="MNIST files not found (set EXML_FAST_DATA)")
SHAPE, MEAN, STD = (1, 32, 32), (0.5,), (0.5,)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny sizes gain nothing from threads on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy():
    """4 classes in 2 experiences of random 1 x 32 x 32 images: plumbing, not accuracy."""
    g = torch.Generator().manual_seed(0)
    exps = [Experience(i, cls, None, torch.randn(24, *SHAPE, generator=g), torch.tensor(cls * 12),
                       torch.randn(8, *SHAPE, generator=g), torch.tensor(cls * 4))
            for i, cls in enumerate([(0, 2), (1, 3)])]
    return Scenario("toy", "toy", 4, SHAPE, MEAN, STD, False, 0, (0, 2, 1, 3), exps)


@pytest.fixture(scope="module")
def toy_stream(toy, tmp_path_factory):
    return train_experts(toy, tmp_path_factory.mktemp("stream"), arch="lenet5_bn", epochs=1, batch_size=8,
                         progress=False)


def learner(seed=0, num_classes=4):
    torch.manual_seed(seed)
    return build_model("lenet5_bn", num_classes=num_classes)


# --- converters ---------------------------------------------------------------------------------------------------

def test_benchmark_holds_the_scenarios_tensors(toy):
    bm = to_avalanche_benchmark(toy)
    for e, exp in zip(bm.train_stream, toy.experiences):
        assert list(e.classes_in_this_experience) == list(exp.classes)
        xs, ys = zip(*[e.dataset[i][:2] for i in range(len(e.dataset))])
        xs, ys = torch.stack(xs), torch.tensor(ys)
        for c in exp.classes:  # the same images of each class, in order (Avalanche groups them by class)
            assert torch.equal(xs[ys == c], exp.train_x[exp.train_y == c])
        assert len(ys) == len(exp.train_y)
    assert [len(e.dataset) for e in bm.test_stream] == [8, 8]


def test_converters_round_trip(toy, toy_stream, tmp_path):
    exs = to_exmodel_scenario(toy_stream, toy)
    exps = list(exs.expert_models_stream)
    assert [list(e.classes_in_this_experience) for e in exps] == [[0, 2], [1, 3]]
    for e, expert in zip(exps, toy_stream):
        assert all(torch.equal(a, b) for a, b in zip(e.expert_model.state_dict().values(),
                                                     expert.model.state_dict().values()))
    assert [len(e.dataset) for e in exs.original_benchmark.test_stream] == [8, 8]
    back = to_expert_stream(exs, tmp_path / "back", arch="lenet5_bn", input_shape=SHAPE, mean=MEAN, std=STD,
                            meta=toy_stream.meta)
    # The same weights, byte for byte (their checksums), the same classes and the stream's description.
    assert [e["sha256"] for e in back.entries] == [e["sha256"] for e in toy_stream.entries]
    assert [back.classes(i) for i in range(2)] == [toy_stream.classes(i) for i in range(2)]
    assert back.meta == toy_stream.meta and back[1].input_shape == SHAPE and back[0].meta["experience"] == 0


def test_a_multi_task_stream_keeps_its_task_labels_both_ways(toy, tmp_path):
    mt = dataclasses.replace(toy, multi_task=True,
                             experiences=[dataclasses.replace(e, task_id=e.index) for e in toy.experiences])
    stream = train_experts(mt, tmp_path / "mt", arch="lenet5_bn", epochs=1, batch_size=8, progress=False)
    assert [e.task_id for e in stream] == [0, 1]
    exs = to_exmodel_scenario(stream, mt)
    assert [e.task_label for e in exs.original_benchmark.train_stream] == [0, 1]
    assert [e.task_label for e in exs.original_benchmark.test_stream] == [0, 1]
    back = to_expert_stream(exs, tmp_path / "back", arch="lenet5_bn", input_shape=SHAPE)
    assert [e["task_id"] for e in back.entries] == [0, 1]
    single = to_expert_stream(to_exmodel_scenario(stream, toy), tmp_path / "single", arch="lenet5_bn")
    assert [e["task_id"] for e in single.entries] == [None, None]
    # ED on the multi-task expert stream: trains, and Avalanche evaluates each task's test set under its label
    strategy = ExModelDistillationStrategy(model=learner(), input_shape=SHAPE, source_options={"iterations": 2},
                                           buffer_size=8, iterations=2, batch_size=4,
                                           evaluator=EvaluationPlugin(accuracy_metrics(experience=True)))
    for exp in exs.expert_models_stream:
        strategy.train(exp)
    metrics = strategy.eval(exs.original_benchmark.test_stream)
    assert {"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000",
            "Top1_Acc_Exp/eval_phase/test_stream/Task001/Exp001"} <= set(metrics)


# --- Ex-Model Distillation as an Avalanche strategy -----------------------------------------------------------------

class Calls(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.labels = []
        self.sizes = []
        self.loss_over_criterion = []

    def before_training_exp(self, strategy, **kwargs):
        self.calls.append("before_training_exp")

    def after_training_exp(self, strategy, **kwargs):
        self.calls.append("after_training_exp")

    def before_forward(self, strategy, **kwargs):
        self.labels.append((strategy.experience.current_experience, strategy.mb_y.tolist()))
        self.sizes.append(int(strategy.mb_x.shape[0]))

    def before_update(self, strategy, **kwargs):
        self.loss_over_criterion.append(float(strategy.loss.detach()) - float(strategy.criterion().detach()))


@pytest.mark.parametrize("source", ["deepinversion", "model-inversion", "data-impressions", "real-replay"])
def test_exml_strategy_trains_on_the_expert_stream_with_avalanche_metrics(toy, toy_stream, source):
    exs = to_exmodel_scenario(toy_stream, toy)
    kinds = {"deepinversion": (DeepInversion, {"iterations": 3}), "model-inversion": (ModelInversion,
             {"iterations": 3}), "data-impressions": (DataImpressions, {"iterations": 3}),
             "real-replay": (RealReplay(toy), None)}
    src, options = kinds[source]
    text, calls = io.StringIO(), Calls()
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loss_metrics(stream=True),
                                 loggers=[TextLogger(text)])
    model = learner()
    before = copy.deepcopy(model.state_dict())
    strategy = ExModelDistillationStrategy(model=model, input_shape=SHAPE, mean=MEAN, std=STD, source=src,
                                           source_options=options, buffer_size=16, iterations=3, batch_size=8,
                                           plugins=[calls], evaluator=evaluator)
    for exp in exs.expert_models_stream:
        strategy.train(exp)
        metrics = strategy.eval(exs.original_benchmark.test_stream)
    acc = metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert 0.0 <= acc <= 1.0 and "Loss_Stream/eval_phase/test_stream/Task000" in metrics
    assert "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001" in text.getvalue()
    assert calls.calls == ["before_training_exp", "after_training_exp"] * 2
    assert len(strategy.buffer) == 16 and sorted(strategy.buffer.y.unique().tolist()) == [0, 1, 2, 3]
    assert len(strategy.ed.history) == 2 and strategy.model is model
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert strategy.ed.ex_model == (source != "real-replay")


def test_exml_strategy_trains_the_whole_stream_in_one_call(toy, toy_stream):
    exs = to_exmodel_scenario(toy_stream, toy)
    strategy = ExModelDistillationStrategy(model=learner(), input_shape=SHAPE, source_options={"iterations": 2},
                                           buffer_size=8, iterations=2, batch_size=4, evaluator=None,
                                           eval_every=0)
    strategy.train(exs.expert_models_stream, eval_streams=[exs.original_benchmark.test_stream])
    assert strategy.ed.experiences_seen == 2


# --- the data-free replay plugin on three Avalanche strategies ------------------------------------------------------

STRATEGIES = {"Naive": (Naive, {}), "LwF": (LwF, {"alpha": 1.0, "temperature": 2.0}),
              "EWC": (EWC, {"ewc_lambda": 1.0})}


@pytest.mark.parametrize(("name", "distill"), [("Naive", False), ("Naive", True), ("LwF", False), ("EWC", True)])
def test_plugin_mixes_synthetic_images_into_the_next_experiences_minibatches(toy, name, distill):
    bm = to_avalanche_benchmark(toy)
    cls, kwargs = STRATEGIES[name]
    model, calls = learner(), Calls()
    plugin = DataFreeReplayPlugin(per_class=3, synth_iterations=2, mean=MEAN, std=STD, distill=distill)
    strategy = cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), criterion=nn.CrossEntropyLoss(),
                   train_mb_size=8, train_epochs=1, plugins=[plugin, calls], evaluator=None, **kwargs)
    for exp in bm.train_stream:
        strategy.train(exp)
    strategy.eval(bm.test_stream)
    # No replay in the first experience; in the second, each minibatch of 8 real images (classes 1 and 3) gets 8
    # synthetic ones of the classes seen before (0 and 2), labelled with them.
    first = [labels for i, labels in calls.labels if i == 0]
    second = [labels for i, labels in calls.labels if i == 1]
    assert all(set(y) <= {0, 2} for y in first) and calls.sizes[: len(first)] == [8] * len(first)
    assert all(set(y[:8]) <= {1, 3} and set(y[8:]) <= {0, 2} and len(y) == 16 for y in second)
    assert plugin.replayed == 8 * len(second) == int(plugin.replayed_per_class.sum())
    assert plugin.replayed_per_class[[1, 3]].sum() == 0 and plugin.replayed_per_class[[0, 2]].min() > 0
    assert [(s["experience"], s["images"], s["classes"]) for s in plugin.synthesis] == [(2, 6, [0, 2])]
    assert plugin.input_shape == SHAPE
    # distill adds Eq. 11's distillation terms (both >= 0) to the strategy's loss in the second experience.
    extra = calls.loss_over_criterion[len(first):]
    if distill:
        assert all(v > 0 for v in extra)
    elif name == "Naive":
        assert all(abs(v) < 1e-6 for v in extra)


def test_plugin_reads_the_classes_off_the_labels_without_a_classes_timeline(toy):
    bm = to_avalanche_benchmark(toy)
    model = learner()
    plugin = DataFreeReplayPlugin(per_class=2, synth_iterations=2, distill=True)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=8, plugins=[plugin], evaluator=None)
    for exp in bm.train_stream:
        bare = copy.copy(exp)
        bare.classes_in_this_experience = None  # an experience without a classes timeline
        strategy.train(bare)
    assert plugin.synthesis[0]["classes"] == [0, 2] and plugin.classes_seen == {0, 1, 2, 3}
    assert plugin.replayed > 0


# --- bad input ------------------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument(toy, toy_stream, tmp_path):
    bm = to_avalanche_benchmark(toy)
    exs = to_exmodel_scenario(toy_stream, toy)
    with pytest.raises(ValueError, match="input_shape must be"):
        ExModelDistillationStrategy(model=learner(), input_shape=(32, 32))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ExModelDistillationStrategy(model="lenet", input_shape=SHAPE)
    strategy = ExModelDistillationStrategy(model=learner(), input_shape=SHAPE, iterations=2, evaluator=None)
    with pytest.raises(TypeError, match="experience must be an ExModelExperience with an nn.Module expert_model"):
        strategy.train(bm.train_stream[0])  # a data experience, not an expert
    wide = ExModelDistillationStrategy(model=learner(num_classes=6), input_shape=SHAPE, iterations=2, evaluator=None)
    with pytest.raises(ValueError, match=r"expert_model answers 4 logits but the learner \(model\) 6"):
        wide.train(list(exs.expert_models_stream)[0])
    with pytest.raises(ValueError, match="per_class must be"):
        DataFreeReplayPlugin(per_class=0)
    with pytest.raises(TypeError, match="synthesizer must be a Synthesizer class"):
        DataFreeReplayPlugin(synthesizer="deepinversion")
    with pytest.raises(ValueError, match="input_shape must be None or"):
        DataFreeReplayPlugin(input_shape=(1, 32))
    narrow = learner(num_classes=2)  # classes 2 and 3 have no output
    plugin = DataFreeReplayPlugin(per_class=2, synth_iterations=2)
    naive = Naive(model=narrow, optimizer=torch.optim.SGD(narrow.parameters(), lr=0.01),
                  criterion=nn.CrossEntropyLoss(), train_mb_size=8, plugins=[plugin], evaluator=None)
    plugin._current, plugin.input_shape = {0, 2}, SHAPE
    plugin.after_training_exp(naive)
    with pytest.raises(ValueError, match="model answers 2 logits but the experiences hold class 2"):
        plugin.before_training_exp(naive)
    with pytest.raises(TypeError, match="scenario must be an Avalanche ExModelCLScenario"):
        to_expert_stream(bm, tmp_path / "s", arch="lenet5_bn")
    with pytest.raises(TypeError, match="scenario must be an exml_fast Scenario"):
        to_avalanche_benchmark(bm)
    swapped = Scenario("toy", "toy", 4, SHAPE, MEAN, STD, False, 0, (1, 3, 0, 2),
                       [Experience(i, e.classes, None, e.train_x, e.train_y, e.test_x, e.test_y)
                        for i, e in enumerate(reversed(toy.experiences))])
    with pytest.raises(ValueError, match="scenario must be the one the stream was trained on"):
        to_exmodel_scenario(toy_stream, swapped)
    with pytest.raises(TypeError, match="stream must be an exml_fast ExpertStream"):
        to_exmodel_scenario(exs)


# --- the comparison bench and the two doors -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    with bench_module("bench_avalanche") as mod:
        yield mod


@needs_mnist
def test_bench_smoke_run_writes_its_record(bench, tmp_path):
    rows = ["deepinversion-cil", "naive+dfr-distill", "generative-replay", "replay"]
    args = ["--budget", "smoke", "--seeds", "0", "--datasets", "split_mnist", "--threads", "1", "--out",
            str(tmp_path), "--runs", str(tmp_path / "runs.jsonl")]
    bench.main(args + ["--rows", *rows[:2]])
    bench.main(args + ["--rows", *rows])  # resumes: the first two rows' runs are read back, not run again
    lines = [json.loads(ln) for ln in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["row"] for r in lines] == rows
    rec = json.loads((tmp_path / "avalanche_mnist_smoke.json").read_text())
    assert [r["row"] for r in rec["rows"]] == rows and rec["dataset"] == "split_mnist"
    assert all(len(r["finals"]) == 1 and 0 <= r["finals"][0] <= 100 and r["walls_s"][0] > 0 for r in rec["rows"])
    assert rec["rows"][0]["finals"] == [lines[0]["final"]]
    assert [r["keeps"] for r in rec["rows"]] == ["nothing", "nothing", "a VAE trained on it", "200 exemplars"]
    text = (tmp_path / "avalanche_mnist_smoke.md").read_text()
    assert "python benches/bench_avalanche.py --budget smoke" in text and "| replay | 200 exemplars |" in text


@needs_mnist
@pytest.mark.slow  # 12 s of CPU, 35 s of wall time on 2 busy cores
def test_deepinversion_cil_and_the_plugin_on_naive_agree(bench):
    """The same method through both doors: exml_fast's deepinversion-cil and Avalanche's Naive with
    DataFreeReplayPlugin(distill=True), on the same tensors (Split MNIST, 2 tasks of 5 classes, 300 training
    images a task), from the same initial weights per seed, with the same SGD, epochs, batch and synthesis budget.

    Tolerance: 18 points between the means over 3 seeds. At this size one run's final accuracy varies by 6
    (deepinversion-cil) and 8.5 (plugin on Naive) points from seed to seed (measured over seeds 0-4: 52.6 ± 5.8
    against 48.8 ± 8.5), so the difference of two 3-seed means has a standard deviation of about 6 points; 18 is
    three of them. The runs differ in what seeds cannot make equal: minibatch order (Avalanche's DataLoader
    against exml_fast's generator), hence the teacher and its images, and the cross-entropy's classes (Naive:
    all ten outputs; deepinversion-cil: the classes seen)."""
    budget = {"scenario": {}, "epochs": 1, "per_class": 10, "synth_iterations": 100, "synth_batch_size": 256}
    finals = {"deepinversion-cil": [], "naive+dfr-distill": []}
    for seed in (0, 1, 2):
        sc = make_scenario("split_mnist", n_experiences=2, seed=seed, max_train_per_experience=300,
                           max_test_per_experience=200)
        for row, values in finals.items():
            values.append(bench.run_row(row, sc, budget, seed)["final"])
    gap = statistics.mean(finals["deepinversion-cil"]) - statistics.mean(finals["naive+dfr-distill"])
    assert abs(gap) <= 18.0, finals
