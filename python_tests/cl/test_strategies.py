"""ExML strategies: Ex-Model Distillation with every data source, the baselines, memory bounds."""

from __future__ import annotations

import gc
import math
import types
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from _util import band_images

from exml_fast.cl import strategies as S
from exml_fast.cl.experts import Expert
from exml_fast.models import build_model
from exml_fast.synth import AuxiliaryData, DataImpressions, ModelInversion
from exml_fast.training import train_classifier

K = 6  # output units of the toy stream
META = {"input_shape": [1, 32, 32], "mean": [0.5], "std": [0.5]}


def _expert(i, classes, *, task=None, seed=None, arch="lenet5"):
    if seed is not None:
        torch.manual_seed(seed)
    m = build_model(arch, num_classes=K, in_channels=1)
    return Expert(m, classes, arch=arch, arch_kwargs={"num_classes": K, "in_channels": 1}, task_id=task,
                  meta={**META, "experience": i})


@pytest.fixture(scope="module")
def trained_experts():
    """Three experts, each trained on its own two classes only (full K outputs, CE over all)."""
    out = []
    for i, cls in enumerate([(0, 1), (2, 3), (4, 5)]):
        torch.manual_seed(100)  # shared initialisation
        m = build_model("lenet5", num_classes=K, in_channels=1)
        x, y = band_images(cls, 60, seed=i)
        train_classifier(m, x, y, epochs=3, batch_size=32, lr=0.05, generator=torch.Generator().manual_seed(i))
        out.append((m.state_dict(), cls))
    return out


def _load(trained, i, task=None):
    sd, cls = trained[i]
    e = _expert(i, cls, task=task)
    e.model.load_state_dict(sd)
    return e


def _replay_source(expert):
    return band_images(expert.classes, 40, seed=50 + expert.meta["experience"])


def _ed(source, options=None, **kw):
    kw = {"buffer_size": 24, "iterations": 6, "progress": False, **kw}
    torch.manual_seed(7)
    return S.ExModelDistillation(build_model("lenet5", num_classes=K), source=source, source_options=options, **kw)


GENERATORS = {
    "model-inversion": (ModelInversion, {"iterations": 3, "batch_size": 16}),
    "data-impressions": (DataImpressions, {"iterations": 3, "batch_size": 16}),
    "auxiliary": (AuxiliaryData, {"data": torch.randn(200, 1, 32, 32)}),
    "real-replay": (S.RealReplay(_replay_source), None),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_ed_every_source_keeps_buffer_bounded_and_drops_experts(name):
    gen, opts = GENERATORS[name]
    ed = _ed(gen, opts)
    refs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LeNet-5 has no BatchNorm: the synthesizers warn
        for i, cls in enumerate([(0, 1), (2, 3), (4, 5)]):
            e = _expert(i, cls, seed=i)
            refs.append((weakref.ref(e), weakref.ref(e.model)))
            ed.train(e)
            del e
            assert len(ed.buffer) <= ed.buffer.capacity
            gc.collect()
            assert all(r() is None for pair in refs for r in pair), "an expert outlived its experience"
    # N // i rule: the newest experience holds N // 3 samples, the others share the rest.
    counts = torch.bincount(ed.buffer.experience, minlength=3).tolist()
    assert counts[2] == 24 // 3 and sum(counts) == 24
    if name != "auxiliary":  # auxiliary labels are the expert's argmax: balance is not guaranteed
        assert set(ed.buffer.class_counts()) == set(range(6))
    assert ed.experiences_seen == 3 and ed.classes_seen == list(range(6))
    assert math.isfinite(ed.history[-1]["final_loss"])
    assert ed.predict(torch.randn(5, 1, 32, 32)).shape == (5, K)


def test_ed_data_impressions_labels_are_argmax_within_the_expert_classes():
    ed = _ed(DataImpressions, {"iterations": 2, "batch_size": 8}, buffer_size=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ed.train(_expert(0, (1, 4), seed=0))
    soft = ed.buffer.soft_targets
    assert soft is not None and soft.shape == (12, K)
    cls = torch.tensor([1, 4])
    assert torch.equal(ed.buffer.y, cls[soft[:, cls].argmax(1)])


def test_ed_learns_the_union_from_real_replay(trained_experts):
    """Replay ED on the toy bands: the learner answers both experiences' classes, single head."""
    ed = _ed(S.RealReplay(_replay_source), buffer_size=120, iterations=300, lr=0.05, augment=False)
    for i in range(3):
        ed.train(_load(trained_experts, i))
    correct = 0
    for i, cls in enumerate([(0, 1), (2, 3), (4, 5)]):
        x, y = band_images(cls, 30, seed=900 + i)
        correct += int((ed.predict(x).argmax(1) == y).sum())
    assert correct / 180 > 0.9


def test_ed_same_seed_same_model_and_resume_equals_uninterrupted(trained_experts):
    def run(seed, split):
        ed = _ed(S.RealReplay(_replay_source), seed=seed, iterations=10)
        ed.train(_load(trained_experts, 0))
        if split:  # checkpoint after the first experience, continue in a fresh object
            state = ed.state_dict()
            ed = _ed(S.RealReplay(_replay_source), seed=seed, iterations=10)
            torch.manual_seed(12345)  # the global RNG must not matter
            ed.load_state_dict(state)
        ed.train(_load(trained_experts, 1))
        return ed.model.state_dict(), ed.buffer.x

    a, bx = run(0, False)
    b, bx2 = run(0, True)
    c, _ = run(1, False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(bx, bx2)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("target_mode", ["slice", "per_sample"])
@pytest.mark.parametrize("normalize", ["none", "center", "standardize"])
def test_ed_one_step_is_sgd_on_the_ed_loss(trained_experts, target_mode, normalize):
    """One distillation step equals a hand-made SGD step on reference.ed_loss (no augmentation)."""
    from exml_fast.reference import ed_loss as ref_ed_loss

    ed = _ed(S.RealReplay(_replay_source), buffer_size=8, iterations=1, batch_size=8, augment=False,
             momentum=0.0, lr=0.1, target_mode=target_mode, normalize=normalize)
    ed.train(_load(trained_experts, 0))
    before = {k: v.clone() for k, v in ed.model.state_dict().items()}
    prev = build_model("lenet5", num_classes=K)
    prev.load_state_dict(before)
    e1 = _load(trained_experts, 1)
    ed.train(e1)
    # Redo the step by hand: all 8 buffer samples form the one minibatch (order does not change the mean).
    x, y = ed.buffer.x, ed.buffer.y
    model = build_model("lenet5", num_classes=K)
    model.load_state_dict(before)
    loss = ref_ed_loss(model(x), y, expert_logits=e1.model(x).detach(), expert_classes=torch.tensor([2, 3]),
                       prev_logits=prev(x).detach(), prev_classes=torch.tensor([0, 1]), target_mode=target_mode,
                       normalize=normalize, lambda_ce=1.0)
    loss.backward()
    with torch.no_grad():
        for n, p in model.named_parameters():
            torch.testing.assert_close(before[n] - 0.1 * p.grad, ed.model.state_dict()[n], rtol=1e-4, atol=1e-5)


def test_ed_multi_task_restricts_predictions_to_the_task_head():
    ed = _ed(ModelInversion, {"iterations": 2, "batch_size": 8}, buffer_size=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, cls in enumerate([(0, 1), (2, 3)]):
            ed.train(_expert(i, cls, task=i, seed=i))
    out = ed.predict(torch.randn(4, 1, 32, 32), task_ids=torch.tensor([0, 1, 1, 0]))
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()
    assert torch.isinf(out[1, :2]).all() and torch.isfinite(out[1, 2:4]).all()
    with pytest.raises(ValueError, match="task_ids"):
        ed.predict(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="task labels"):
        ed.train(_expert(2, (4, 5), seed=3))  # no task label in a multi-task stream


def test_oracle_uses_the_task_label_expert_on_its_classes(trained_experts):
    s = S.OracleEnsemble(progress=False)
    experts = [_load(trained_experts, i) for i in range(3)]
    for e in experts:
        s.train(e)
    x = torch.randn(6, 1, 32, 32)
    t = torch.tensor([0, 1, 2, 2, 1, 0])
    out = s.predict(x, task_ids=t)
    for r in range(6):
        cls = list(experts[t[r]].classes)
        torch.testing.assert_close(out[r, cls], experts[t[r]].model(x[r : r + 1])[0, cls].detach())
        others = [c for c in range(K) if c not in cls]
        assert torch.isinf(out[r, others]).all()
    with pytest.raises(ValueError, match="task_ids"):
        s.predict(x)
    assert not s.ex_model


def test_ensemble_average_and_min_entropy_match_their_definitions(trained_experts):
    experts = [_load(trained_experts, i) for i in range(3)]
    x = torch.randn(7, 1, 32, 32)
    logits = torch.stack([e.model(x).detach() for e in experts])
    avg, ment = S.EnsembleAverage(progress=False), S.MinEntropyEnsemble(progress=False)
    for e in experts:
        avg.train(e)
        ment.train(e)
    torch.testing.assert_close(avg.predict(x).exp(), F.softmax(logits, -1).mean(0))
    p = F.softmax(logits, -1)
    best = (-(p * p.log()).sum(-1)).argmin(0)
    torch.testing.assert_close(ment.predict(x), logits[best, torch.arange(7)])


def test_parameter_average_is_the_mean_and_refuses_other_architectures(trained_experts):
    experts = [_load(trained_experts, i) for i in range(3)]
    s = S.ParameterAverage(progress=False)
    for e in experts:
        s.train(e)
    for k, v in s.model.state_dict().items():
        mean = torch.stack([e.model.state_dict()[k].float() for e in experts]).mean(0)
        torch.testing.assert_close(v, mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="architecture"):
        s.train(_expert(3, (0,), arch="lenet5_bn"))


@pytest.mark.parametrize("cls", [S.OracleEnsemble, S.EnsembleAverage, S.MinEntropyEnsemble, S.ParameterAverage])
def test_baseline_state_dict_round_trip(trained_experts, cls):
    s = cls(progress=False)
    for i in range(2):
        s.train(_load(trained_experts, i))
    s2 = cls(progress=False)
    s2.load_state_dict(s.state_dict())
    x, t = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(s.predict(x, task_ids=t), s2.predict(x, task_ids=t))
    with pytest.raises(ValueError, match="strategy"):
        S.ExModelDistillation(build_model("lenet5", num_classes=K), source=S.RealReplay(_replay_source),
                              progress=False).load_state_dict(s.state_dict())


def test_strategy_argument_errors():
    m = build_model("lenet5", num_classes=K)
    with pytest.raises(TypeError, match="source"):
        S.ExModelDistillation(m, source=object())
    with pytest.raises(TypeError, match="source is required"):
        S.ExModelDistillation(m)
    with pytest.raises(ValueError, match="buffer_size"):
        S.ExModelDistillation(m, source=ModelInversion, buffer_size=0)
    with pytest.raises(ValueError, match="target_mode"):
        S.ExModelDistillation(m, source=ModelInversion, target_mode="paper")
    with pytest.raises(ValueError, match="normalize"):
        S.ExModelDistillation(m, source=ModelInversion, normalize="zscore")
    with pytest.raises(ValueError, match="data="):
        S.SynthesizerSource(AuxiliaryData)
    with pytest.raises(ValueError, match="source_options"):
        S.ExModelDistillation(m, source=S.RealReplay(_replay_source), source_options={"iterations": 3})
    s = S.EnsembleAverage(progress=False)
    with pytest.raises(RuntimeError, match="train"):
        s.predict(torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError, match="Expert"):
        s.train(build_model("lenet5", num_classes=K))
    s.train(_expert(0, (0, 1)))
    bad = build_model("lenet5", num_classes=3)
    with pytest.raises(ValueError, match="outputs"):
        s.train(Expert(bad, (0,), arch="lenet5", arch_kwargs={"num_classes": 3, "in_channels": 1}, meta=META))


def _reachable_tensor_bytes(root) -> int:
    """Bytes of every distinct tensor storage reachable from ``root`` through its objects' references.

    Classes, modules and functions are not followed (they lead to the globals of
    the whole program, not to what the object holds).
    """
    skip = (type, str, bytes, int, float, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
            types.MethodType)
    seen, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            continue
        stack.extend(gc.get_referents(obj))
    return sum(storages.values())


def test_ed_memory_does_not_grow_with_the_number_of_experts():
    """A 20-expert stream: after the buffer is full, the strategy holds the same bytes at every step."""
    ed = _ed(S.RealReplay(lambda e: band_images(e.classes, 8, seed=e.meta["experience"])), buffer_size=16,
             iterations=2)
    sizes, refs = [], []
    for i in range(20):
        e = _expert(i, (i % K,), seed=i)
        refs.append(weakref.ref(e.model))
        ed.train(e)
        del e
        gc.collect()
        sizes.append(_reachable_tensor_bytes(ed))
    assert all(r() is None for r in refs)
    assert len(set(sizes[1:])) == 1, f"strategy memory changed along the stream: {sizes}"
    assert len(ed.buffer) == 16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_ed_and_baselines_on_cuda_match_the_cpu_run(trained_experts):
    """The same seeded Replay-ED run on CUDA and on the CPU: same buffer, close models and predictions."""
    def run(device):
        torch.manual_seed(7)
        ed = S.ExModelDistillation(build_model("lenet5", num_classes=K), source=S.RealReplay(_replay_source),
                                   buffer_size=24, iterations=20, seed=3, device=device, progress=False)
        for i in range(2):
            ed.train(_load(trained_experts, i))
        return ed

    cpu, gpu = run("cpu"), run("cuda")
    assert next(gpu.model.parameters()).is_cuda
    assert torch.equal(cpu.buffer.x, gpu.buffer.x) and torch.equal(cpu.buffer.y, gpu.buffer.y)
    x = torch.randn(8, 1, 32, 32)
    # cuDNN convolutions use TF32 by default: 40 SGD steps apart, logits agree to about 1e-2.
    torch.testing.assert_close(gpu.predict(x).cpu(), cpu.predict(x), rtol=2e-2, atol=2e-2)
    for cls in (S.OracleEnsemble, S.EnsembleAverage, S.MinEntropyEnsemble, S.ParameterAverage):
        s = cls(device="cuda", progress=False)
        for i in range(2):
            s.train(_load(trained_experts, i))
        out = s.predict(x, task_ids=torch.tensor([0, 1] * 4))
        assert out.is_cuda and out.shape == (8, K)


def test_ed_refuses_generated_labels_outside_the_expert_classes():
    ed = _ed(S.RealReplay(lambda e: band_images((0, 5), 10, seed=0)))
    with pytest.raises(ValueError, match=r"classes \[5\] outside expert"):
        ed.train(_expert(0, (0, 1), seed=0))


def test_the_old_generator_names_still_work_with_a_deprecation_warning():
    m = build_model("lenet5", num_classes=K)
    with pytest.warns(DeprecationWarning, match="renamed source="):
        ed = S.ExModelDistillation(m, generator=ModelInversion, generator_options={"iterations": 3}, progress=False)
    assert isinstance(ed.source, S.SynthesizerSource) and ed.source.options["iterations"] == 3
    assert ed.config()["source"]["method"] == "model-inversion"
    with pytest.warns(DeprecationWarning, match="renamed .source"):
        assert ed.generator is ed.source
    with pytest.warns(DeprecationWarning, match="SynthesizerSource"):
        old = S.SynthesizerGenerator(ModelInversion, iterations=2)
    assert isinstance(old, S.SynthesizerSource) and S.Generator is S.DataSource
    with pytest.raises(TypeError, match="not also the deprecated generator="):
        S.ExModelDistillation(m, source=ModelInversion, generator=ModelInversion)


def test_the_registry_names_every_strategy_and_refuses_a_second_registration():
    assert S.strategy_names() == ("mi-ed", "di-ed", "aux-ed", "replay-ed", "gen-ed", "oracle", "ensemble-avg",
                                  "min-entropy", "param-avg", "finetune", "joint", "lwf", "icarl", "deepinversion-cil",
                                  "deepinversion-cil-balanced", "synthetic-exemplars", "skd")
    assert S.STRATEGIES["replay-ed"].keeps_data and not S.STRATEGIES["mi-ed"].keeps_data
    with pytest.raises(ValueError, match="registered already"):
        S.register_strategy("mi-ed", keeps_data=False, help="again")(lambda ctx, opt: None)
    with pytest.raises(ValueError, match="--strategy must be one of"):
        S.build_strategy("nope", None, None, options={}, seed=0, device=torch.device("cpu"), progress=False)


def test_a_registered_strategy_is_built_by_name_without_touching_the_command_line(monkeypatch):
    monkeypatch.setattr(S.registry, "STRATEGIES", dict(S.STRATEGIES))
    seen = {}

    @S.register_strategy("test-avg", keeps_data=False, help="a test registration")
    def _build(ctx, opt):
        seen.update(seed=ctx.seed, lr=opt["lr"])
        return S.ParameterAverage(device=ctx.device, seed=ctx.seed, progress=False)

    scenario = type("Sc", (), {"dataset": "mnist"})()
    s = S.registry.build_strategy("test-avg", object(), scenario, options={"lr": 0.5}, seed=3,
                                  device=torch.device("cpu"), progress=False)
    assert isinstance(s, S.ParameterAverage) and seen == {"seed": 3, "lr": 0.5}
    assert "test-avg" in S.registry.strategy_names()
