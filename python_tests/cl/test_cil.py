"""Class-incremental strategies that learn from data (finetune, joint, lwf): each one's update is the loss it
states, the previous model is frozen, no real past-task tensor outlives its task unless the strategy keeps
data, resume equals an uninterrupted run, and bad input is refused by name. Seconds in all (toy images)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from _util import band_images

from exml_fast.cl import strategies as S
from exml_fast.cl.engine import RunError, run_stream
from exml_fast.cl.exemplars import classifier_layer, penultimate_features
from exml_fast.cl.scenarios import Experience, Scenario
from exml_fast.cl.strategies.cil_base import TrainStep
from exml_fast.models import build_model
from exml_fast.reference.soft_target_losses import kd_loss as kd_reference

# The synthesising strategies run DeepInversion for 3 steps here: its low-agreement warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore::exml_fast.synth.LowAgreementWarning")

K = 6
SPLITS = [(0, 1), (2, 3), (4, 5)]


def _experience(i, classes, n=24, task_id=None):
    tx, ty = band_images(classes, n, seed=i)
    vx, vy = band_images(classes, 10, seed=100 + i)
    return Experience(i, classes, task_id, tx, ty, vx, vy)


def _scenario():
    exps = [_experience(i, cls) for i, cls in enumerate(SPLITS)]
    return Scenario("toy", "toy", K, (1, 32, 32), (0.5,), (0.5,), False, 0, tuple(range(K)), exps)


def _learner(seed=5):
    torch.manual_seed(seed)
    return build_model("lenet5", num_classes=K)


def _strategy(cls, **kw):
    opts = {"epochs": 2, "batch_size": 16, "lr": 0.05, "progress": False, **kw}
    return cls(_learner(), **opts)


def _one_step(strategy, exp, loss_fn):
    """The expected parameters after one full-batch SGD step (momentum's first step is plain SGD) on loss_fn,
    from the strategy's model as it is now."""
    m = copy.deepcopy(strategy.model).train()
    loss = loss_fn(m(exp.train_x))
    grads = torch.autograd.grad(loss, list(m.parameters()))
    with torch.no_grad():
        return [p - strategy.lr * (g + strategy.weight_decay * p) for p, g in zip(m.parameters(), grads)]


def _assert_params(model, expected):
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def _active(classes):
    return torch.tensor(sorted(classes))


def _pos(active):
    pos = torch.full((K,), -1, dtype=torch.int64)
    pos[active] = torch.arange(active.numel())
    return pos


# -- each strategy's update is its loss ---------------------------------------------------------------------------


def test_finetune_step_is_cross_entropy_over_the_classes_seen():
    s = _strategy(S.FineTune, epochs=1, batch_size=1000)
    s.train(_experience(0, SPLITS[0]))
    exp = _experience(1, SPLITS[1])
    active = _active(SPLITS[0] + SPLITS[1])
    expected = _one_step(s, exp, lambda out: F.cross_entropy(out[:, active], _pos(active)[exp.train_y]))
    s.train(exp)
    _assert_params(s.model, expected)


@pytest.mark.parametrize("by_task", [False, True])
def test_lwf_step_is_ce_plus_kd_of_the_frozen_previous_model(by_task):
    s = _strategy(S.LwF, epochs=1, batch_size=1000, distill_weight=0.7, temperature=3.0, by_task=by_task)
    s.train(_experience(0, SPLITS[0]))
    prev = copy.deepcopy(s.model).eval()
    exp = _experience(1, SPLITS[1])
    active, old = _active(SPLITS[0] + SPLITS[1]), _active(SPLITS[0])
    with torch.no_grad():
        teacher = prev(exp.train_x)[:, old]
    w_ce, w_kd = (0.5, 0.7 * 0.5) if by_task else (1.0, 0.7)

    def loss(out):
        return (w_ce * F.cross_entropy(out[:, active], _pos(active)[exp.train_y])
                + w_kd * kd_reference(out[:, old], teacher, temperature=3.0))

    expected = _one_step(s, exp, loss)
    s.train(exp)
    _assert_params(s.model, expected)
    assert s.prev is None  # the previous model is dropped after its task


def test_lwf_mc_step_is_bce_with_the_previous_sigmoids_on_old_units():
    s = _strategy(S.LwF, epochs=1, batch_size=1000, form="mc")
    s.train(_experience(0, SPLITS[0]))
    prev = copy.deepcopy(s.model).eval()
    exp = _experience(1, SPLITS[1])
    active = _active(SPLITS[0] + SPLITS[1])  # 0, 1 old; 2, 3 new
    with torch.no_grad():
        target = F.one_hot(_pos(active)[exp.train_y], 4).float()
        target[:, :2] = torch.sigmoid(prev(exp.train_x)[:, :2])
    # summed over the units, averaged over the batch (iCaRL's loss)
    expected = _one_step(s, exp, lambda out: F.binary_cross_entropy_with_logits(out[:, active], target,
                                                                                reduction="sum") / out.shape[0])
    s.train(exp)
    _assert_params(s.model, expected)


def test_lwf_teacher_is_a_frozen_copy_of_the_model_before_the_task(monkeypatch):
    s = _strategy(S.LwF, epochs=1)
    s.train(_experience(0, SPLITS[0]))
    before = copy.deepcopy(s.model.state_dict())
    seen = []
    loss = S.LwF.criterion

    def spy(self, logits, x, y, ctx):
        seen.append((self.prev.training, [p.requires_grad for p in self.prev.parameters()],
                     {k: v.clone() for k, v in self.prev.state_dict().items()}))
        return loss(self, logits, x, y, ctx)

    monkeypatch.setattr(S.LwF, "criterion", spy)
    s.train(_experience(1, SPLITS[1]))
    assert seen
    for training, grads, state in seen:
        assert not training and not any(grads)
        for k in before:  # the teacher never moves while the learner trains
            assert torch.equal(state[k], before[k])


def test_predictions_stay_among_the_classes_seen_and_joint_learns_the_union():
    s = _strategy(S.Joint, epochs=6)
    sc = _scenario()
    s.train(sc[0])
    x = torch.cat([e.test_x for e in sc])
    assert set(s.predict(x).argmax(1).tolist()) <= set(SPLITS[0])
    s.train(sc[1])
    s.train(sc[2])
    x, y = torch.cat([e.test_x for e in sc]), torch.cat([e.test_y for e in sc])
    assert (s.predict(x).argmax(1) == y).float().mean() > 0.9  # the toy bands are easy when all data is kept
    assert s.memory_x.shape[0] == sum(e.num_train for e in sc)


# -- memory ---------------------------------------------------------------------------------------------------------


def test_joint_keeps_the_data_and_says_so():
    s = _strategy(S.Joint, epochs=1)
    exp = _experience(0, SPLITS[0])
    s.train(exp)
    assert torch.equal(s.memory_x, exp.train_x) and s.keeps_data and s.config()["keeps_data"]


# -- the run loop: resume, results, refusals ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [S.FineTune, S.LwF, S.Joint])
def test_resumed_run_equals_an_uninterrupted_one(cls, tmp_path):
    sc = _scenario()
    whole = run_stream(_strategy(cls, seed=3), None, sc, out=tmp_path / "whole", plots=False, log=None)
    run_stream(_strategy(cls, seed=3), None, sc, out=tmp_path / "cut", stop_after=1, plots=False, log=None)
    fresh = _strategy(cls, seed=3)
    resumed = run_stream(fresh, None, sc, out=tmp_path / "cut", resume=True, plots=False, log=None)
    assert resumed.acc_matrix == whole.acc_matrix and resumed.per_class_accuracy == whole.per_class_accuracy
    assert resumed.meta["keeps_data"] == cls.keeps_data and resumed.meta["ex_model"] is False
    assert 0.0 <= resumed.average_incremental_accuracy <= 1.0
    with pytest.raises(RunError, match="different run"):
        run_stream(_strategy(cls, seed=4), None, sc, out=tmp_path / "cut", resume=True, plots=False, log=None)


def test_finetune_forgets_and_lwf_holds_the_old_outputs_on_new_data():
    """Class-incremental fine-tuning forgets the first task outright. LwF's distillation holds the old
    classes' softened outputs on the new task's data nearer the previous model's than fine-tuning does (what
    it optimises; on these toy bands the new data say nothing about the old classes' features, so no accuracy
    claim is made)."""
    sc = _scenario()
    ft_res = run_stream(_strategy(S.FineTune, epochs=4), None, sc, plots=False, log=None)
    assert ft_res.acc_matrix[0][0] > 0.9 and ft_res.acc_matrix[-1][-1] > 0.9  # each task learned ...
    assert ft_res.acc_matrix[-1][0] < 0.5  # ... and the first forgotten

    ft, lwf = _strategy(S.FineTune, epochs=4), _strategy(S.LwF, epochs=4)
    ft.train(sc[0])
    lwf.train(sc[0])
    for a, b in zip(ft.model.parameters(), lwf.model.parameters()):  # the first task is plain cross-entropy
        assert torch.equal(a, b)
    old, x = list(SPLITS[0]), sc[1].train_x
    with torch.no_grad():
        target = ft.model(x)[:, old]
    ft.train(sc[1])
    lwf.train(sc[1])

    def drift(s):
        with torch.no_grad():
            return float(kd_reference(s.model(x)[:, old], target, temperature=2.0))

    assert drift(lwf) < drift(ft)


def test_the_run_loop_refuses_the_wrong_kind_of_stream(tmp_path):
    sc = _scenario()
    with pytest.raises(ValueError, match="learns from the scenario's data"):
        run_stream(_strategy(S.FineTune), object(), sc, plots=False, log=None)
    ed = S.ParameterAverage(progress=False)
    with pytest.raises(ValueError, match="learns from experts"):
        run_stream(ed, None, sc, plots=False, log=None)


def test_bad_arguments_and_experiences_are_refused_by_name():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        S.FineTune("lenet")
    for kw, match in [({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(ValueError, match=match):
            S.FineTune(_learner(), **kw)
    with pytest.raises(ValueError, match="form must be one of"):
        S.LwF(_learner(), form="kd")
    with pytest.raises(ValueError, match="temperature"):
        S.LwF(_learner(), temperature=0.0)
    s = _strategy(S.FineTune)
    with pytest.raises(TypeError, match="Experience"):
        s.train(object())
    with pytest.raises(ValueError, match="task labels"):
        s.train(_experience(0, SPLITS[0], task_id=0))
    exp = _experience(0, SPLITS[0])
    with pytest.raises(ValueError, match="outside its classes"):
        s.train(Experience(0, (0,), None, exp.train_x, exp.train_y, exp.test_x, exp.test_y))
    with pytest.raises(ValueError, match="subset of"):
        s.train(Experience(0, (6, 7), None, exp.train_x, exp.train_y + 6, exp.test_x, exp.test_y))
    with pytest.raises(ValueError, match="train_x must be a floating"):
        s.train(Experience(0, SPLITS[0], None, exp.train_x.long(), exp.train_y, exp.test_x, exp.test_y))
    assert s.experiences_seen == 0  # nothing recorded by a refused experience


def test_icarl_refuses_a_task_missing_a_class_before_training_it():
    """Herding chooses a class's exemplars among its images: a task without any image of one of its classes
    is refused by name before its training (it failed in class_means after it); the synthetic exemplars need
    no image and learn such a task."""
    exp = _experience(0, SPLITS[0])
    only_0 = exp.train_y == 0
    lacking = Experience(0, SPLITS[0], None, exp.train_x[only_0], exp.train_y[only_0], exp.test_x, exp.test_y)
    s = _strategy(S.ICaRL, memory_size=8)
    before = [p.detach().clone() for p in s.model.parameters()]
    with pytest.raises(ValueError, match=r"ICaRL.train: experience 0 has no training sample of class\(es\) \[1\]"):
        s.train(lacking)
    assert s.experiences_seen == 0 and all(torch.equal(a, b) for a, b in zip(before, s.model.parameters()))
    assert S.SyntheticExemplars.exemplars_from_data is False
    for cls in (S.ICaRL, S.SyntheticExemplars):  # K // 10 classes = 0 exemplars a class: refused when built
        with pytest.raises(ValueError, match=rf"{cls.__name__}: memory_size must be at least num_classes \({K}\)"):
            cls(_learner(), memory_size=K - 1, **({} if cls is S.ICaRL else {"input_shape": (1, 32, 32)}))


def test_the_registry_builds_the_data_strategies_and_refuses_options_they_do_not_read():
    sc = _scenario()
    sc.dataset = "mnist"
    cpu = torch.device("cpu")
    s = S.build_strategy("lwf", None, sc, options={"epochs": 1, "distill_weight": 2.0, "lwf_form": "mc"}, seed=1,
                         device=cpu, progress=False)
    assert isinstance(s, S.LwF) and (s.epochs, s.distill_weight, s.form) == (1, 2.0, "mc")
    assert (s.lr, s.momentum, s.weight_decay, s.batch_size, s.augment) == (0.01, 0.9, 5e-4, 32, False)
    ft = S.build_strategy("finetune", None, sc, options={}, seed=1, device=cpu, progress=False)
    assert ft.epochs == 20  # the experts' epochs on a split MNIST scenario
    with pytest.raises(S.StrategyOptionError, match="does not use the option.*buffer_size"):
        S.build_strategy("lwf", None, sc, options={"buffer_size": 10}, seed=1, device=cpu, progress=False)
    with pytest.raises(S.StrategyOptionError, match="distill_weight"):
        S.build_strategy("finetune", None, sc, options={"distill_weight": 1.0}, seed=1, device=cpu, progress=False)
    with pytest.raises(S.StrategyOptionError, match="pass no expert stream"):
        S.build_strategy("lwf", object(), sc, options={}, seed=1, device=cpu, progress=False)
    with pytest.raises(S.StrategyOptionError, match="epochs"):
        S.build_strategy("param-avg", object(), sc, options={"epochs": 2}, seed=1, device=cpu, progress=False)
    icarl = S.build_strategy("icarl", None, sc, options={"memory_size": 100, "classifier": "cnn"}, seed=1,
                             device=cpu, progress=False)
    assert isinstance(icarl, S.ICaRL) and (icarl.memory.capacity, icarl.classifier, icarl.form) == (100, "cnn", "mc")
    with pytest.raises(S.StrategyOptionError, match="lwf_form"):
        S.build_strategy("icarl", None, sc, options={"lwf_form": "mc"}, seed=1, device=cpu, progress=False)
    assert S.STRATEGIES["joint"].keeps_data and S.STRATEGIES["icarl"].keeps_data
    assert not S.STRATEGIES["lwf"].keeps_data
    assert S.STRATEGIES["lwf"].data and not S.STRATEGIES["mi-ed"].data


# -- DeepInversion instead of old data ----------------------------------------------------------------------------

TINY_SYNTH = {"synth_iterations": 3, "synth_batch_size": 8, "input_shape": (1, 32, 32), "mean": (0.5,),
              "std": (0.5,)}


def _bn_strategy(cls, **kw):
    torch.manual_seed(5)
    opts = {"epochs": 2, "batch_size": 16, "lr": 0.05, "progress": False, **TINY_SYNTH, **kw}
    return cls(build_model("lenet5_bn", num_classes=K), **opts)


@pytest.mark.parametrize("ce_classes", ["seen", "new"])
def test_deepinversion_cil_step_is_equation_11(monkeypatch, ce_classes):
    """One full-batch step of task 2 with the synthetic set fixed: KL on the synthetic images against the
    previous model's old-class softmax padded with zeros, CE on the new data (over every class seen, or with
    ce_classes="new" over the task's own), KD of the old classes on it."""
    s = _bn_strategy(S.DeepInversionCIL, epochs=1, batch_size=1000, seed=4, ce_classes=ce_classes)
    s.train(_experience(0, SPLITS[0]))
    fake = torch.randn(10, 1, 32, 32, generator=torch.Generator().manual_seed(9))
    calls = []

    def synthesize(teacher, classes, per_class, tag, i):
        calls.append((classes, per_class, i, [p.requires_grad for p in teacher.parameters()]))
        return fake, torch.zeros(10, dtype=torch.int64)

    monkeypatch.setattr(s, "_synthesize", synthesize)
    prev = copy.deepcopy(s.model).eval()
    exp = _experience(1, SPLITS[1])
    n = exp.num_train
    gen = torch.Generator().manual_seed(S.derive_seed(4, "train", 2))
    torch.randperm(n, generator=gen)  # the epoch's order (the full-batch loss does not depend on it)
    xs = fake[torch.randint(0, 10, (n,), generator=gen)]
    active, old = _active(SPLITS[0] + SPLITS[1]), _active(SPLITS[0])
    both = torch.cat([exp.train_x, xs])
    with torch.no_grad():
        old_logits = prev(both)[:, old]

    def loss(out):
        logits = out[:, active]
        target = torch.zeros(n, 4)
        target[:, :2] = torch.softmax(old_logits[n:], 1)
        synth = -(target * torch.log_softmax(logits[n:], 1)).sum(1).mean()
        if ce_classes == "new":  # classes 2, 3: columns 2, 3 of the active four
            ce = F.cross_entropy(logits[:n, 2:], exp.train_y - 2)
        else:
            ce = F.cross_entropy(logits[:n], _pos(active)[exp.train_y])
        return synth + ce + kd_reference(logits[:n, :2], old_logits[:n], temperature=1.0)

    m = copy.deepcopy(s.model).train()
    grads = torch.autograd.grad(loss(m(both)), list(m.parameters()))
    with torch.no_grad():
        expected = [p - s.lr * (g + s.weight_decay * p) for p, g in zip(m.parameters(), grads)]
    s.train(exp)
    _assert_params(s.model, expected)
    assert calls == [([0, 1], 250, 2, [False] * len(calls[0][3]))]  # the frozen previous model, old classes
    assert s.prev is None and s._synth_x is None  # nothing of the task kept


def test_balanced_head_tunes_only_the_classifier_on_class_proportional_batches(monkeypatch):
    """head_epochs: after task 2's training, only the last nn.Linear moves (BN statistics included, the rest is
    frozen in eval mode), in ceil(N / 16) steps per epoch of 2 * 16 features, new and synthetic in proportion
    to their classes (2 new of 4 seen: 16 and 16)."""
    s = _bn_strategy(S.DeepInversionCIL, epochs=1, seed=4, head_epochs=1)
    s.train(_experience(0, SPLITS[0]))
    fake_x = torch.zeros(6, 1, 32, 32)  # every synthetic feature is the same row: counted in the batches
    fake_y = torch.tensor([0, 1, 0, 1, 0, 1])
    monkeypatch.setattr(s, "_synthesize", lambda teacher, classes, per_class, tag, i: (fake_x, fake_y))
    exp = _experience(1, SPLITS[1])
    s.before_experience(exp, 2)
    head = classifier_layer(s.model)
    before = copy.deepcopy(s.model.state_dict())
    synth_row = penultimate_features(s.model, fake_x, normalize=False)[0]
    batches = []

    def count(m, inp, out):  # the steps' minibatches (the feature passes run the whole network)
        if inp[0].shape[0] == 32:
            batches.append(int(torch.isclose(inp[0], synth_row, rtol=1e-4, atol=1e-5).all(1).sum()))

    head.register_forward_hook(count)
    s._balance_head(exp.train_x, exp.train_y, exp, 2)
    s.cleanup_experience()
    after = s.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    prefix = next(n for n, m in s.model.named_modules() if m is head)
    assert moved == {f"{prefix}.weight", f"{prefix}.bias"}
    assert batches == [16] * -(-exp.num_train // 16)  # 48 images: 3 steps of 16 new + 16 synthetic


def test_a_deepinversion_cil_run_from_before_its_options_resumes_as_eq_11(tmp_path):
    """Checkpoints written before ce_classes and head_epochs existed were Eq. 11 runs: they resume under the
    defaults and are refused under the balanced settings."""
    sc = _scenario()
    run_stream(_bn_strategy(S.DeepInversionCIL, epochs=1, synth_per_class=2, seed=1), None, sc, out=tmp_path,
               stop_after=1, plots=False, log=None)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del ckpt["job"]["strategy"]["ce_classes"], ckpt["job"]["strategy"]["head_epochs"]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(RunError, match="ce_classes"):
        run_stream(_bn_strategy(S.DeepInversionCIL, epochs=1, synth_per_class=2, seed=1, ce_classes="new"), None,
                   sc, out=tmp_path, resume=True, plots=False, log=None)
    resumed = run_stream(_bn_strategy(S.DeepInversionCIL, epochs=1, synth_per_class=2, seed=1), None, sc,
                         out=tmp_path, resume=True, plots=False, log=None)
    assert len(resumed.acc_matrix) == 3


def test_deepinversion_cil_balanced_is_registered_with_both_changes():
    sc = _scenario()
    s = S.build_strategy("deepinversion-cil-balanced", None, sc, options={}, seed=1, device=torch.device("cpu"),
                         progress=False)
    assert isinstance(s, S.DeepInversionCIL) and not s.keeps_data
    assert (s.ce_classes, s.head_epochs, s.name) == ("new", 1, "deepinversion-cil-balanced")
    assert s.config()["ce_classes"] == "new" and not S.STRATEGIES["deepinversion-cil-balanced"].keeps_data
    plain = S.build_strategy("deepinversion-cil", None, sc, options={}, seed=1, device=torch.device("cpu"),
                             progress=False)
    assert (plain.ce_classes, plain.head_epochs, plain.synth_rounds, plain.competition_weight) == ("seen", 0, 1, 0.0)
    adaptive = S.build_strategy("deepinversion-cil", None, sc, options={"synth_rounds": 4, "competition_weight": 0.5},
                                seed=1, device=torch.device("cpu"), progress=False)
    assert (adaptive.synth_rounds, adaptive.competition_weight) == (4, 0.5)
    with pytest.raises(S.StrategyOptionError, match="synth_rounds"):
        S.build_strategy("lwf", None, sc, options={"synth_rounds": 2}, seed=1, device=torch.device("cpu"),
                         progress=False)


def test_deepinversion_cil_synthesises_from_the_previous_model_and_resumes(tmp_path):
    sc = _scenario()
    mk = lambda: _bn_strategy(S.DeepInversionCIL, synth_per_class=3, seed=1)  # noqa: E731
    whole = run_stream(mk(), None, sc, out=tmp_path / "a", plots=False, log=None)
    run_stream(mk(), None, sc, out=tmp_path / "b", stop_after=2, plots=False, log=None)
    s = mk()
    resumed = run_stream(s, None, sc, out=tmp_path / "b", resume=True, plots=False, log=None)
    assert resumed.acc_matrix == whole.acc_matrix
    assert [st["images"] for st in s.synth_stats] == [3 * 4]  # after the resume: task 3, four old classes
    assert [h.get("synthesis", [{}])[0].get("images") for h in resumed.meta["history"]] == [None, 3 * 2, 3 * 4]
    assert resumed.meta["keeps_data"] is False and S.STRATEGIES["deepinversion-cil"].keeps_data is False


def test_adaptive_rounds_synthesise_against_the_learner_as_it_trains(monkeypatch):
    """synth_rounds 3 over 4 epochs, 5 images per class: rounds of 2, 2, 1 before the task and at the starts
    of epochs 1 and 2; the later rounds compete against a frozen copy of the learner as it is then, and the
    training set grows by each round."""
    s = _bn_strategy(S.DeepInversionCIL, epochs=4, seed=4, synth_per_class=5, synth_rounds=3,
                     competition_weight=0.5)
    s.train(_experience(0, SPLITS[0]))
    calls, epochs = [], []
    epoch_begin = s.before_epoch

    def record_epoch(epoch, exp, i):
        epochs.append(epoch)
        epoch_begin(epoch, exp, i)

    def synthesize(teacher, classes, per_class, tag, i, competitor=None, competition_weight=0.0, **stats):
        learner = [p.detach().clone() for p in s.model.parameters()]
        copied = competitor is not None and competitor is not s.model and all(
            torch.equal(a, b) for a, b in zip(competitor.parameters(), learner))
        frozen = competitor is not None and not any(p.requires_grad for p in competitor.parameters())
        calls.append({"classes": classes, "per_class": per_class, "tag": tag, "epoch": epochs[-1] if epochs else None,
                      "copied": copied, "frozen": frozen, "weight": competition_weight, "stats": stats,
                      "held": 0 if s._synth_x is None else s._synth_x.shape[0], "teacher": teacher is s.prev})
        n = per_class * len(classes)
        return torch.zeros(n, 1, 32, 32), torch.tensor(classes * per_class)

    monkeypatch.setattr(s, "before_epoch", record_epoch)
    monkeypatch.setattr(s, "_synthesize", synthesize)
    s.train(_experience(1, SPLITS[1]))
    assert [(c["per_class"], c["epoch"], c["held"]) for c in calls] == [(2, None, 0), (2, 1, 4), (1, 2, 8)]
    assert [c["tag"] for c in calls] == ["deepinversion-cil", "deepinversion-cil-r1", "deepinversion-cil-r2"]
    assert [c["stats"] for c in calls] == [{"round": 0}, {"round": 1}, {"round": 2}]
    assert all(c["classes"] == [0, 1] and c["teacher"] for c in calls)
    assert [(c["copied"], c["frozen"], c["weight"]) for c in calls[1:]] == [(True, True, 0.5)] * 2
    assert epochs == [0, 1, 2, 3] and s._synth_x is None  # nothing kept after the task


def test_adaptive_rounds_run_and_are_recorded():
    """A real run (3 DeepInversion steps a batch): each round is recorded with its images and the teacher's
    agreement; plain rounds (competition_weight 0) run too."""
    for weight in (0.0, 1.0):
        s = _bn_strategy(S.DeepInversionCIL, epochs=2, seed=2, synth_per_class=2, synth_rounds=2,
                         competition_weight=weight)
        for exp in (_experience(0, SPLITS[0]), _experience(1, SPLITS[1])):
            s.train(exp)
        assert [(st["experience"], st["round"], st["images"]) for st in s.synth_stats] == [(2, 0, 2), (2, 1, 2)]
        assert s.config()["synth_rounds"] == 2 and s.config()["competition_weight"] == weight


def test_synthetic_exemplars_keep_only_synthetic_images_within_k():
    sc = _scenario()
    s = _bn_strategy(S.SyntheticExemplars, memory_size=12)
    for i, exp in enumerate(sc):
        s.train(exp)
        seen = [c for e in SPLITS[: i + 1] for c in e]
        x, y = s.memory.tensors()
        assert len(s.memory) <= 12 and torch.bincount(y, minlength=K)[seen].tolist() == [12 // len(seen)] * len(seen)
    real = torch.cat([e.train_x for e in sc])
    assert not (x.flatten(1)[:, None] == real.flatten(1)[None]).all(-1).any()  # no exemplar is a real image
    assert not s.keeps_data and s.config()["classifier"] == "nme" and len(s.synth_stats) == 3
    assert set(s.predict(sc[0].test_x).argmax(1).tolist()) <= set(range(K))


@pytest.mark.parametrize("cls, make", [
    (S.FineTune, lambda: _strategy(S.FineTune, epochs=1)),
    (S.LwF, lambda: _strategy(S.LwF, epochs=1)),
    (S.DeepInversionCIL, lambda: _bn_strategy(S.DeepInversionCIL, epochs=1, synth_per_class=2)),
    (S.SyntheticExemplars, lambda: _bn_strategy(S.SyntheticExemplars, epochs=1, memory_size=6)),
    (S.SKDCIL, lambda: _skd(epochs=1)),
])
def test_no_real_past_task_tensor_outlives_its_task(cls, make):
    s = make()
    refs = []
    for i, classes in enumerate(SPLITS):
        exp = _experience(i, classes)
        refs.append((weakref.ref(exp.train_x), weakref.ref(exp.train_y)))
        s.train(exp)
        del exp
        gc.collect()
        assert all(r() is None for pair in refs for r in pair), f"{cls.name} holds task data after task {i}"
    assert not cls.keeps_data and cls.learns_from == "data" and not cls.ex_model


def test_synthesising_strategies_argument_errors():
    with pytest.raises(ValueError, match="input_shape"):
        S.DeepInversionCIL(_learner(), input_shape=None)
    with pytest.raises(ValueError, match="synth_per_class"):
        _bn_strategy(S.DeepInversionCIL, synth_per_class=0)
    with pytest.raises(ValueError, match="ce_classes must be one of seen, new"):
        _bn_strategy(S.DeepInversionCIL, ce_classes="old")
    with pytest.raises(ValueError, match="head_epochs"):
        _bn_strategy(S.DeepInversionCIL, head_epochs=-1)
    with pytest.raises(ValueError, match=r"synth_rounds must be at most epochs \(2\)"):
        _bn_strategy(S.DeepInversionCIL, synth_rounds=3)
    with pytest.raises(ValueError, match=r"synth_rounds must be at most .* synth_per_class \(1\)"):
        _bn_strategy(S.DeepInversionCIL, synth_rounds=2, synth_per_class=1)
    with pytest.raises(ValueError, match="synth_rounds must be an int >= 1"):
        _bn_strategy(S.DeepInversionCIL, synth_rounds=0)
    with pytest.raises(ValueError, match="competition_weight > 0 needs synth_rounds > 1"):
        _bn_strategy(S.DeepInversionCIL, competition_weight=0.5)
    with pytest.raises(ValueError, match="competition_weight must be a finite number >= 0"):
        _bn_strategy(S.DeepInversionCIL, synth_rounds=2, competition_weight=-1.0)
    with pytest.raises(ValueError, match="synth_iterations"):
        _bn_strategy(S.SyntheticExemplars, synth_iterations=0)


def _skd(**kw):
    torch.manual_seed(5)
    opts = {"epochs": 2, "batch_size": 16, "lr": 0.05, "progress": False, "input_shape": (1, 32, 32),
            "mean": (0.5,), "std": (0.5,), "num_tasks": len(SPLITS), "delegator_iterations": 2,
            "delegator_batch_size": 8, **kw}
    return S.SKDCIL(build_model("lenet5_bn", num_classes=K), **opts)


def test_skd_step_is_equation_11_on_real_and_delegator_samples():
    """Task 2's step: gamma_n * CE over the active classes of [new data; delegator samples labelled by the
    previous model's argmax over the old classes] + psi between the previous and the current model's features on
    the whole batch, gamma_n = beta / (N * classes seen) (Eq. 12)."""
    s = _skd(seed=3)
    s.train(_experience(0, SPLITS[0]))
    exp = _experience(1, SPLITS[1])
    s.before_experience(exp, 2)
    try:
        assert s._gamma == pytest.approx(5.0 / (3 * 4))
        xb, yb = exp.train_x[:10], exp.train_y[:10]
        active = torch.tensor([0, 1, 2, 3])
        pos = torch.full((K,), -1, dtype=torch.int64)
        pos[active] = torch.arange(4)
        step = TrainStep(active=active, pos=pos, experience=2, generator=torch.Generator().manual_seed(1),
                         forward=s.model)
        got = s.step_loss(xb, yb, step)
        with torch.no_grad():
            z = torch.randn(10, s._synth.latent_dim, generator=torch.Generator().manual_seed(1))
            xs = s.delegator.eval()(z)
            both = torch.cat([xb, xs])
            old_logits = s.prev(both)
            ys = old_logits[10:, :2].argmax(1)  # the old classes are 0 and 1
            t_feat = s.prev.features(both)
        s_feat = s.model.features(both)
        logits = s.model.classifier(s_feat)[:, :4]
        ce = F.cross_entropy(logits, torch.cat([yb, ys]))
        psi = (1 - F.cosine_similarity(t_feat, s_feat, dim=1)).mean()
        torch.testing.assert_close(got, 5.0 / 12 * ce + psi)
        assert not any(p.requires_grad for p in s.prev.parameters())
    finally:
        s.cleanup_experience()


def test_skd_fine_tunes_one_delegator_and_resumes(tmp_path):
    sc = _scenario()
    whole_s = _skd(seed=1)
    whole = run_stream(whole_s, None, sc, out=tmp_path / "a", plots=False, log=None)
    assert [st["experience"] for st in whole_s.delegator_stats] == [2, 3]
    run_stream(_skd(seed=1), None, sc, out=tmp_path / "b", stop_after=2, plots=False, log=None)
    s = _skd(seed=1)
    resumed = run_stream(s, None, sc, out=tmp_path / "b", resume=True, plots=False, log=None)
    assert resumed.acc_matrix == whole.acc_matrix
    for a, b in zip(whole_s.delegator.state_dict().values(), s.delegator.state_dict().values()):
        assert torch.equal(a, b)
    assert [h.get("delegator", [{}])[0].get("experience") for h in resumed.meta["history"]] == [None, 2, 3]
    assert resumed.meta["keeps_data"] is False and S.STRATEGIES["skd"].keeps_data is False


def test_skd_continues_the_previous_delegator(monkeypatch):
    s = _skd()
    s.train(_experience(0, SPLITS[0]))
    s.train(_experience(1, SPLITS[1]))
    first = s.delegator
    before = [p.detach().clone() for p in first.parameters()]
    seen = []
    real = S.SKDCIL._synthesizer

    def spy(self, teacher):
        synth = real(self, teacher)
        seen.append(synth.delegator)
        return synth

    monkeypatch.setattr(S.SKDCIL, "_synthesizer", spy)
    s.train(_experience(2, SPLITS[2]))
    assert seen[0] is first and s.delegator is first  # D_3 starts as D_2, trained in place
    assert any(not torch.equal(a, b) for a, b in zip(before, first.parameters()))


def test_skd_refuses_bad_arguments():
    with pytest.raises(ValueError, match="num_tasks must be an int >= 1"):
        _skd(num_tasks=0)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        _skd(beta=0)
    with pytest.raises(ValueError, match="input_shape"):
        _skd(input_shape=None)


def test_the_registry_builds_skd_with_the_delegator_network_asked_for():
    from exml_fast.models.generators import build_generator

    sc = _scenario()
    sc.dataset = "mnist"
    cpu = torch.device("cpu")
    default = S.build_strategy("skd", None, sc, options={}, seed=1, device=cpu, progress=False)
    assert default.delegator_options == {"generator_arch": "skd-small"}  # SKD's Table IV
    s = S.build_strategy("skd", None, sc, options={"gen_arch": "skd-narrow", "epochs": 1, "synth_iterations": 1,
                                                   "synth_batch_size": 4}, seed=1, device=cpu, progress=False)
    assert s.config()["delegator_options"] == {"generator_arch": "skd-narrow"}
    s.train(sc[0])
    s.train(sc[1])  # the first delegator is fitted before the second task
    narrow = build_generator("skd-narrow", sc.input_shape)
    assert [p.shape for p in s.delegator.parameters()] == [p.shape for p in narrow.parameters()]
    with pytest.raises(ValueError, match="skd: gen_arch must be one of .*; got 'wide'"):
        S.build_strategy("skd", None, sc, options={"gen_arch": "wide"}, seed=1, device=cpu, progress=False)
    with pytest.raises(S.StrategyOptionError, match="gen_arch"):
        S.build_strategy("lwf", None, sc, options={"gen_arch": "skd-narrow"}, seed=1, device=cpu, progress=False)


# -- the learner's lr schedule (SKD's: 160 epochs from 0.1, divided by 10 at 80 and 120) ----------------------

def test_lr_milestones_divide_the_lr_by_ten_at_each_milestone_of_every_task(monkeypatch):
    seen = []
    step = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    s = _strategy(S.FineTune, epochs=4, batch_size=1000, lr=0.1, lr_milestones=(1, 3))
    assert s.config()["lr_milestones"] == [1, 3]
    s.train(_experience(0, SPLITS[0]))  # one minibatch: one step an epoch
    s.train(_experience(1, SPLITS[1]))  # a fresh optimiser per task: the schedule starts again
    assert seen == pytest.approx([0.1, 0.01, 0.01, 0.001] * 2)
    seen.clear()
    plain = _strategy(S.FineTune, epochs=2, batch_size=1000, lr=0.1)
    assert plain.config()["lr_milestones"] == []
    plain.train(_experience(0, SPLITS[0]))
    assert seen == [0.1, 0.1]


@pytest.mark.parametrize("milestones", [(0,), (4,), (2, 1), (1, 1), (1.5,), (True,), "x"])
def test_lr_milestones_outside_the_epochs_are_refused_by_name(milestones):
    with pytest.raises(ValueError, match=r"lr_milestones must be increasing whole epochs in \[1, epochs=4\)"):
        S.FineTune(_learner(), epochs=4, lr_milestones=milestones)


def test_the_paper_budget_runs_skd_with_its_papers_schedule():
    from exml_fast.cl.strategies.registry import options_read_by
    from exml_fast.experiments.cil import CIL_BUDGETS

    sc = _scenario()
    sc.dataset = "mnist"
    spec = CIL_BUDGETS["paper"]
    options = options_read_by("skd", {**spec["run"], **spec["strategies"]["skd"]})
    s = S.build_strategy("skd", None, sc, options=options, seed=1, device=torch.device("cpu"), progress=False)
    cfg = s.config()
    assert (cfg["epochs"], cfg["lr"], cfg["lr_milestones"]) == (160, 0.1, [80, 120])
    assert s.delegator_batch_size == 1024
    # the other strategies keep the experts' recipe under the paper budget
    lwf = S.build_strategy("lwf", None, sc, options=options_read_by("lwf", spec["run"]), seed=1,
                           device=torch.device("cpu"), progress=False)
    assert (lwf.config()["epochs"], lwf.config()["lr"], lwf.config()["lr_milestones"]) == (20, 0.01, [])


@pytest.mark.parametrize("name", ["deepinversion-cil", "deepinversion-cil-balanced", "synthetic-exemplars"])
def test_a_bad_synth_lr_is_refused_under_its_own_name(name):
    """Found by python_tests/fuzz/test_fuzz_cli.py: --synth-lr 0 was refused as DeepInversion's "lr"."""
    with pytest.raises(ValueError, match=r"(deepinversion-cil|synthetic-exemplars): synth_lr must be a finite "
                                         r"number > 0; got 0"):
        S.build_strategy(name, None, _scenario(), options={"synth_lr": 0}, seed=0, device=torch.device("cpu"),
                         progress=False)
