"""exml_fast.synth: every synthesizer on a tiny BN CNN and on a BN-less LeNet,
seeding, hook hygiene, every allowed option combination on CPU, the optimiser
and best-batch bookkeeping, resumable shards, and argument errors."""

from __future__ import annotations

import itertools
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from _util import calibrated_bn, no_warnings, requires_ops
from torch import nn

from exml_fast.models import resnet18_cifar
from exml_fast.synth import (DATA_IMPRESSIONS_BETA, AuxiliaryData, DataImpressions, DeepInversion, ModelInversion,
                             SyntheticBatch, load_synthetic, lr_table)
from exml_fast.synth.base import batch_seed
from exml_fast.synth.batch import shard_seconds

CUDA = torch.cuda.is_available()
SHAPE_BN = (3, 16, 16)
SHAPE_LENET = (1, 32, 32)
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _hook_count(model: nn.Module) -> int:
    """Hooks, and forwards replaced for a job (the fused BN matcher, the input-gradient swap), left on the model."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + ("forward" in m.__dict__) for m in model.modules())


def _make(cls, teacher, shape, **kw):
    if cls is AuxiliaryData:
        data = torch.randn((40, *shape), generator=torch.Generator().manual_seed(3))
        return AuxiliaryData(teacher, data, mean=MEAN[: shape[0]], std=STD[: shape[0]], **kw)
    kw.setdefault("iterations", 4)
    kw.setdefault("batch_size", 8)
    kw.setdefault("warn_below", None)  # a few steps on an untrained teacher: the agreement is low by design
    return cls(teacher, input_shape=shape, mean=MEAN[: shape[0]], std=STD[: shape[0]], **kw)


METHODS = [ModelInversion, DeepInversion, DataImpressions, AuxiliaryData]


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("model", ["bn_cnn", "lenet"])
def test_each_synthesizer_on_bn_and_bn_free_teachers(cls, model, request):
    teacher = request.getfixturevalue(model)
    shape = SHAPE_BN if model == "bn_cnn" else SHAPE_LENET
    # The defaults pick the BN weight from the teacher: 0, and no warning, without BatchNorm.
    with no_warnings():
        synth = _make(cls, teacher, shape)
    batch = synth.synthesize(11, generator=0, progress=False)
    assert isinstance(batch, SyntheticBatch)
    assert batch.x.shape == (11, *shape) and batch.x.dtype == torch.float32
    assert torch.isfinite(batch.x).all()
    assert batch.y.dtype == torch.int64 and batch.y.shape == (11,)
    if cls is AuxiliaryData:
        with torch.no_grad():
            assert torch.equal(batch.y, teacher(batch.x).argmax(1))
        assert torch.allclose(batch.soft_targets.sum(1), torch.ones(11), atol=1e-5)
        assert set(batch.losses) == {"confidence"}
    else:
        assert batch.y.tolist() == [i % 10 for i in range(11)]
        names = set(batch.losses)
        assert {"total", "main", "teacher_acc"} <= names
        assert ("bn" in names) == (model == "bn_cnn" and cls is not DataImpressions)
        for v in batch.losses.values():
            assert v.shape == (2,) and torch.isfinite(v).all()  # one entry per batch (8 + 3)
        lo = (0 - torch.tensor(MEAN[: shape[0]])) / torch.tensor(STD[: shape[0]])
        hi = (1 - torch.tensor(MEAN[: shape[0]])) / torch.tensor(STD[: shape[0]])
        assert (batch.x >= lo.view(1, -1, 1, 1) - 1e-6).all() and (batch.x <= hi.view(1, -1, 1, 1) + 1e-6).all()
    if cls is DataImpressions:
        assert batch.soft_targets.shape == (11, 10)
        assert torch.allclose(batch.soft_targets.sum(1), torch.ones(11), atol=1e-5)
    elif cls is not AuxiliaryData:
        assert batch.soft_targets is None
    assert batch.mean == MEAN[: shape[0]] and batch.std == STD[: shape[0]]
    assert _hook_count(teacher) == 0
    assert all(p.requires_grad for p in teacher.parameters()) and not teacher.training



@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_seeds_give_identical_outputs(cls, bn_cnn):
    synth = _make(cls, bn_cnn, SHAPE_BN)
    a = synth.synthesize(10, generator=7, progress=False)
    b = synth.synthesize(10, generator=torch.Generator().manual_seed(123), progress=False)
    c = synth.synthesize(10, generator=7, progress=False)
    assert torch.equal(a.x, c.x) and torch.equal(a.y, c.y)
    if a.soft_targets is not None:
        assert torch.equal(a.soft_targets, c.soft_targets)
    assert not torch.equal(a.x, b.x)
    # A Generator in the same state gives the same job as well.
    d = synth.synthesize(10, generator=torch.Generator().manual_seed(123), progress=False)
    assert torch.equal(b.x, d.x)


def test_teacher_state_restored_and_hooks_removed_after_an_exception(bn_cnn):
    class Exploding(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 4:
                raise RuntimeError("boom")
            return self.inner(x)

    teacher = Exploding(bn_cnn)  # a training-mode wrapper around an eval-mode network: mixed modes
    assert teacher.training and not bn_cnn.training
    synth = DeepInversion(teacher, input_shape=SHAPE_BN, mean=MEAN, std=STD, iterations=5, batch_size=4,
                          num_classes=10, channels_last=True)
    with pytest.raises(RuntimeError, match="boom"):
        synth.synthesize(4, generator=0, progress=False)
    assert _hook_count(teacher) == 0
    assert teacher.training and not any(m.training for m in bn_cnn.modules())  # each module's own mode
    assert all(p.requires_grad for p in teacher.parameters())
    assert all(p.is_contiguous() for p in teacher.parameters())


def test_abandoned_iterator_leaves_no_hooks(bn_cnn):
    synth = _make(DeepInversion, bn_cnn, SHAPE_BN)
    it = synth.synthesize_iter(24, generator=0, progress=False)
    first = next(it)
    assert len(first) == 8
    assert _hook_count(bn_cnn) == 0  # nothing stays attached while a batch is out
    it.close()
    assert _hook_count(bn_cnn) == 0


def test_one_batch_of_activations_at_a_time(bn_cnn):
    seen = []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            seen.append(x.shape[0])
            return self.inner(x)

    synth = DeepInversion(Spy(bn_cnn), input_shape=SHAPE_BN, iterations=2, batch_size=5, num_classes=10,
                          warn_below=None)
    seen.clear()  # the auto preset's probe: one forward of 16 noise images when the synthesizer is built
    out = synth.synthesize(12, generator=0, progress=False)
    assert len(out) == 12
    assert max(seen) == 5 and sorted(set(seen)) == [2, 5]


OPTION_GRID = list(itertools.product(
    ["fp32", "bf16", "fp16"],       # precision
    [False, True],                  # channels_last
    [None, (0.5, 0.5)],             # multi_resolution
    [False, True],                  # competitor (Adaptive DeepInversion)
    [False, True],                  # keep_best
))


@pytest.mark.parametrize("precision,channels_last,multi_resolution,adi,keep_best", OPTION_GRID)
def test_every_option_combination_runs_on_cpu(bn_cnn, precision, channels_last, multi_resolution, adi,
                                              keep_best):
    student = calibrated_bn(resnet18_cifar(num_classes=10, width=4), SHAPE_BN, seed=9) if adi else None
    synth = DeepInversion(bn_cnn, input_shape=SHAPE_BN, mean=MEAN, std=STD, iterations=4, batch_size=4,
                          precision=precision, channels_last=channels_last, multi_resolution=multi_resolution,
                          competitor=student, keep_best=keep_best, pad_crop=1, tv_l1_weight=1e-3,
                          blur_weight=1e-3, l2_weight=3e-8, l2_sq_weight=1e-4)
    batch = synth.synthesize(6, generator=1, progress=False)
    assert batch.x.shape == (6, *SHAPE_BN) and torch.isfinite(batch.x).all()
    assert batch.x.is_contiguous()
    expected = {"total", "main", "bn", "tv_l1", "tv_l2", "blur", "l2", "l2_sq", "teacher_acc"}
    assert set(batch.losses) == expected | ({"competition"} if adi else set())
    assert all(torch.isfinite(v).all() for v in batch.losses.values())
    assert _hook_count(bn_cnn) == 0
    assert all(p.is_contiguous() and p.requires_grad for p in bn_cnn.parameters())
    if student is not None:
        assert _hook_count(student) == 0 and all(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_step_matches_eager(bn_cnn, precision, channels_last):
    kw = dict(input_shape=SHAPE_BN, mean=MEAN, std=STD, iterations=3, batch_size=4, precision=precision,
              channels_last=channels_last)
    eager = DeepInversion(bn_cnn, **kw).synthesize(4, generator=2, progress=False)
    compiled = DeepInversion(bn_cnn, compile={"backend": "aot_eager"}, **kw).synthesize(
        4, generator=2, progress=False)
    tol = 1e-4 if precision == "fp32" else 2e-2
    torch.testing.assert_close(compiled.x, eager.x, atol=tol, rtol=tol)
    assert _hook_count(bn_cnn) == 0


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager(bn_cnn):
    kw = dict(input_shape=SHAPE_BN, mean=MEAN, std=STD, iterations=3, batch_size=4)
    eager = DeepInversion(bn_cnn, **kw).synthesize(4, generator=2, progress=False)
    compiled = DeepInversion(bn_cnn, compile=True, **kw).synthesize(4, generator=2, progress=False)
    torch.testing.assert_close(compiled.x, eager.x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled.losses["total"], eager.losses["total"], atol=1e-3, rtol=1e-4)


def test_cuda_only_options_raise_on_cpu(bn_cnn):
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        DeepInversion(bn_cnn, input_shape=SHAPE_BN, cuda_graph=True)


def test_cuda_graph_default_is_off_on_the_cpu(bn_cnn):
    assert DeepInversion(bn_cnn, input_shape=SHAPE_BN).cuda_graph is False
    assert DeepInversion(bn_cnn, input_shape=SHAPE_BN, cuda_graph=None).cuda_graph is False


def test_multi_resolution_needs_a_teacher_that_takes_small_inputs(lenet):
    synth = DeepInversion(lenet, input_shape=SHAPE_LENET, bn_weight=0.0, multi_resolution=(0.5, 0.5),
                          iterations=2, batch_size=2)
    with pytest.raises(ValueError, match="multi_resolution"):
        synth.synthesize(2, generator=0, progress=False)
    assert _hook_count(lenet) == 0


def test_multi_resolution_spends_the_fraction_at_low_resolution(bn_cnn):
    sizes = []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            sizes.append(x.shape[-1])
            return self.inner(x)

    synth = DeepInversion(Spy(bn_cnn), input_shape=SHAPE_BN, iterations=9, batch_size=2, num_classes=10,
                          multi_resolution=(0.5, 2 / 3), warn_below=None)
    sizes.clear()  # the auto preset's probe: one forward at full resolution when the synthesizer is built
    synth.synthesize(2, generator=0, progress=False)
    steps = [s for s in sizes]
    # one dry forward checks the low resolution, then 6 steps at 8 px and 3 at 16 px
    assert steps == [8] + [8] * 6 + [16] * 3


def test_adam_steps_match_torch_adam(bn_cnn):
    """With no augmentation, priors or clip, every step's gradient is the cross-entropy's at the synthesizer's
    current inputs, and its update is torch.optim.Adam's given that gradient.

    The two are checked separately, on the same gradients: comparing whole trajectories lets Adam's division
    by sqrt(v) amplify a last-bit difference of a tiny gradient component (another convolution kernel, another
    reduction order, e.g. on an AVX2-only CPU) past any fixed tolerance after a few steps.
    """
    kw = dict(input_shape=SHAPE_BN, iterations=5, batch_size=4, lr=0.05, bn_weight=0.0, blur_weight=0.0,
              l2_sq_weight=0.0, jitter=0, flip=False, keep_best=False, temperature=1.0, schedule="constant")
    synth = ModelInversion(bn_cnn, **kw)
    seen = []
    update = synth._update

    def spy(st, g, *args):
        seen.append((st.x.detach().clone(), g.detach().clone()))
        update(st, g, *args)

    synth._update = spy
    out = synth.synthesize(4, generator=11, progress=False)
    assert len(seen) == 5
    g0 = torch.Generator().manual_seed(batch_seed(11, 0))
    assert torch.equal(seen[0][0], torch.randn((4, *SHAPE_BN), generator=g0))
    y = torch.arange(4)
    x = seen[0][0].clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for i, (x_i, g_i) in enumerate(seen):
        xi = x_i.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(F.cross_entropy(bn_cnn(xi), y), xi)
        # fp32 gradients of the same function by possibly different kernels: rounding relative to the
        # gradient's scale (a few hundred products summed per element), far below 1e-5 of its largest entry.
        torch.testing.assert_close(g_i, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
        x.grad = g_i.clone()
        opt.step()
        # Same gradient, same Adam: only the order of a few fp32 operations differs (ulps of x).
        after = seen[i + 1][0] if i + 1 < len(seen) else out.x
        torch.testing.assert_close(after, x.detach(), atol=1e-6, rtol=1e-6)


def test_best_batch_is_a_copy_of_the_lowest_loss_input(bn_cnn):
    kw = dict(input_shape=SHAPE_BN, mean=MEAN, std=STD, iterations=12, batch_size=4, lr=0.5, jitter=0,
              flip=False)
    best = DeepInversion(bn_cnn, keep_best=True, **kw).synthesize(4, generator=4, progress=False)
    last = DeepInversion(bn_cnn, keep_best=False, **kw).synthesize(4, generator=4, progress=False)
    # The reported terms belong to the returned batch: recompute them.
    synth = DeepInversion(bn_cnn, **kw)
    with synth._session():
        total, terms = synth._loss(best.x.clone().requires_grad_(True), None, best.y, None)
    assert total.item() == pytest.approx(best.losses["total"].item(), rel=1e-4)
    assert not torch.equal(best.x, last.x)  # lr 0.5 overshoots: the best batch is an earlier one
    assert _hook_count(bn_cnn) == 0


def test_lr_table_warmup_then_cosine():
    t = lr_table(0.1, 100, schedule="cosine", warmup=0.1)
    assert t[0].item() == pytest.approx(0.01) and t[9].item() == pytest.approx(0.1)
    assert t[10].item() == pytest.approx(0.1)
    assert t[55].item() == pytest.approx(0.05, rel=1e-6)
    assert (t[10:].diff() <= 0).all() and t[-1] < 0.001
    c = lr_table(0.1, 10, schedule="constant", warmup=0.0)
    assert torch.equal(c, torch.full((10,), 0.1, dtype=torch.float64))


def test_data_impressions_targets(bn_cnn):
    synth = DataImpressions(bn_cnn, input_shape=SHAPE_BN, beta=(1.0, 0.1), iterations=1, batch_size=40)
    batch = synth.synthesize(40, classes=[2, 5], generator=0, progress=False)
    assert batch.y.tolist() == [2, 5] * 20
    t = batch.soft_targets
    # class 2's samples alternate β = 1.0, 0.1 (positions 0, 2 → β 1.0; 4, 6 → 0.1 ...)
    peaky = t.max(1).values
    assert peaky[2::4].mean() > peaky[0::4].mean()  # β = 0.1 gives peakier targets than β = 1.0
    assert torch.allclose(t.sum(1), torch.ones(40), atol=1e-5)
    sim = synth.similarity
    # The mean target of a class follows its similarity row.
    mean2 = t[batch.y == 2].mean(0)
    assert mean2.argmax().item() == sim[2].argmax().item()


def test_data_impressions_needs_a_linear_layer():
    conv_only = nn.Sequential(nn.Conv2d(1, 10, 32), nn.Flatten())
    with pytest.raises(ValueError, match="classifier_weight"):
        DataImpressions(conv_only, input_shape=(1, 32, 32))
    w = torch.randn(10, 4)
    synth = DataImpressions(conv_only, input_shape=(1, 32, 32), classifier_weight=w, iterations=2, batch_size=4)
    assert len(synth.synthesize(4, generator=0, progress=False)) == 4
    # the default β is the paper's mixture (§4.1.2), the one constant the reproductions name
    assert synth.beta == DATA_IMPRESSIONS_BETA == (1.0, 0.1) and synth.config()["beta"] == [1.0, 0.1]


def test_auxiliary_data_from_a_dataset_with_classes(bn_cnn):
    data = torch.randn((30, *SHAPE_BN), generator=torch.Generator().manual_seed(0))
    ds = torch.utils.data.TensorDataset(data, torch.zeros(30))
    synth = AuxiliaryData(bn_cnn, ds, batch_size=7)
    batch = synth.synthesize(30, classes=[1, 4, 7], generator=0, progress=False)
    assert set(batch.y.tolist()) <= {1, 4, 7}
    with torch.no_grad():
        logits = bn_cnn(batch.x)
    cls = torch.tensor([1, 4, 7])
    assert torch.equal(batch.y, cls[logits[:, cls].argmax(1)])
    # without replacement: every item exactly once
    assert sorted(batch.x[:, 0, 0, 0].tolist()) == sorted(data[:, 0, 0, 0].tolist())
    with pytest.raises(ValueError, match="without replacement"):
        synth.synthesize(31, progress=False)
    with pytest.raises(ValueError, match="iterations must be None"):
        synth.synthesize(3, iterations=5, progress=False)


def test_save_to_resumes_to_the_uninterrupted_result(bn_cnn, tmp_path):
    synth = _make(DeepInversion, bn_cnn, SHAPE_BN, batch_size=4)
    ref = synth.synthesize(10, generator=5, progress=False)
    it = synth.synthesize_iter(10, generator=5, progress=False, save_to=tmp_path)
    first = next(it)
    it.close()  # interrupted after the first shard
    assert ref.seconds > 0 and first.seconds > 0
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "shard_00000.pt"]
    assert shard_seconds(tmp_path) == first.seconds and shard_seconds(tmp_path / "nothing") == 0.0
    assert not json.loads((tmp_path / "manifest.json").read_text())["complete"]
    with pytest.raises(ValueError, match="not finished"):
        load_synthetic(tmp_path)
    assert len(load_synthetic(tmp_path, allow_partial=True)) == 4
    # A damaged shard is redone, not trusted.
    (tmp_path / "shard_00001.pt").write_bytes(b"half a shard")
    assert shard_seconds(tmp_path) == first.seconds  # a damaged shard holds no time
    calls = []
    orig = synth._synthesize_batch
    synth._synthesize_batch = lambda *a, **k: calls.append(k["offset"]) or orig(*a, **k)
    # generator=None resumes with the seed recorded in the folder
    done = synth.synthesize(10, progress=False, save_to=tmp_path)
    assert calls == [4, 8]
    assert torch.equal(done.x, ref.x) and torch.equal(done.y, ref.y)
    # The time of the job is every batch's, the one read back included (it keeps the first call's time).
    again = list(synth.synthesize_iter(10, progress=False, save_to=tmp_path))
    assert again[0].seconds == first.seconds and done.seconds == sum(b.seconds for b in again)
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"]
    back = load_synthetic(tmp_path)
    assert torch.equal(back.x, ref.x) and back.mean == ref.mean
    assert torch.equal(back.losses["total"], ref.losses["total"]) and back.seconds == done.seconds
    assert shard_seconds(tmp_path) == done.seconds
    shard = tmp_path / "shard_00002.pt"
    kept = shard.read_bytes()
    legacy = torch.load(shard, weights_only=False)
    del legacy["seconds"]  # a shard written before the time was recorded
    torch.save(legacy, shard)
    assert shard_seconds(tmp_path) is None
    shard.write_bytes(kept)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    with pytest.raises(ValueError, match="different synthesis job"):
        synth.synthesize(10, generator=5, iterations=5, progress=False, save_to=tmp_path)
    with pytest.raises(ValueError, match="different synthesis job"):
        synth.synthesize(10, generator=6, progress=False, save_to=tmp_path)


def test_progress_bar_shows_terms_and_accuracy(bn_cnn, capsys):
    synth = _make(DeepInversion, bn_cnn, SHAPE_BN, log_every=1)
    synth.synthesize(4, generator=0, progress=True)
    err = capsys.readouterr().err
    assert "deepinversion" in err and "teacher_acc=" in err and "bn=" in err and "4/4" in err


def test_synthetic_batch_helpers():
    a = SyntheticBatch(torch.zeros(3, 1, 2, 2), torch.arange(3), None, {"total": torch.ones(1)}, (0.5,), (0.2,))
    b = SyntheticBatch(torch.ones(2, 1, 2, 2), torch.arange(2), None, {"total": torch.zeros(1)}, (0.5,), (0.2,))
    c = SyntheticBatch.cat([a, b])
    assert len(c) == 5 and c.losses["total"].tolist() == [1.0, 0.0] and c.mean == (0.5,)
    assert c.seconds is None  # neither batch's time is known
    a.seconds, b.seconds = 1.5, 2.0
    c = SyntheticBatch.cat([a, b])
    assert c.seconds == 3.5 and c.to(torch.float64).seconds == 3.5 and c[1:3].seconds is None
    assert SyntheticBatch.from_state(c.state()).seconds == 3.5
    legacy = c.state()
    del legacy["seconds"]  # a shard written before the time was recorded
    assert SyntheticBatch.from_state(legacy).seconds is None
    assert len(c[1:3]) == 2 and len(c[torch.tensor([0, 4])]) == 2 and len(c[-1]) == 1
    assert c.to(torch.float64).x.dtype == torch.float64 and c.to(torch.float64).y.dtype == torch.int64
    with pytest.raises(ValueError, match="y must be"):
        SyntheticBatch(torch.zeros(3, 1, 2, 2), torch.arange(2))
    with pytest.raises(ValueError, match="different mean/std"):
        SyntheticBatch.cat([a, SyntheticBatch(b.x, b.y)])


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_shape=(3, 16)), "input_shape"),
    (dict(lr=0.0), "lr"),
    (dict(iterations=0), "iterations"),
    (dict(batch_size=0), "batch_size"),
    (dict(precision="fp8"), "precision"),
    (dict(schedule="step"), "schedule"),
    (dict(warmup=1.5), "warmup"),
    (dict(jitter=-1), "jitter"),
    (dict(tv_l2_weight=-1.0), "tv_l2_weight"),
    (dict(bn_form="l1"), "bn_form"),
    (dict(blur_kernel_size=5), "blur_kernel_size"),
    (dict(mean=(0.1, 0.2), std=(0.1, 0.2)), "mean"),
    (dict(mean=0.5), "both mean and std"),
    (dict(std=(0.1, 0.0, 0.1), mean=0.5), "std must be > 0"),
    (dict(multi_resolution=(2.0, 0.5)), "multi_resolution"),
    (dict(competition_clamp=(0.5, 0.1)), "competition_clamp"),
    (dict(compile="yes"), "compile"),
    (dict(competition_weight=1.0, competitor="student"), "competitor"),
    (dict(device="meta"), r"device is meta but the teacher's parameters are on cpu; move the teacher"),
])
def test_bad_arguments_name_themselves(bn_cnn, kwargs, match):
    kw = dict(input_shape=SHAPE_BN)
    kw.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        DeepInversion(bn_cnn, **kw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must be"),
    (dict(n=4, classes=[]), "classes must not be empty"),
    (dict(n=4, classes=[10]), r"classes must be in \[0, 10\)"),
    (dict(n=4, classes=[1, 1]), "duplicates"),
    (dict(n=4, generator="seed"), "generator"),
    (dict(n=4, generator=-1), "generator"),
    (dict(n=4, iterations=0), "iterations"),
])
def test_bad_synthesize_arguments(bn_cnn, kwargs, match):
    synth = _make(DeepInversion, bn_cnn, SHAPE_BN)
    n = kwargs.pop("n")
    with pytest.raises((ValueError, TypeError), match=match):
        synth.synthesize_iter(n, progress=False, **kwargs)  # checked at the call, before any batch


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@requires_ops
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_matches_eager_on_cuda(precision):
    torch.manual_seed(0)
    teacher = calibrated_bn(resnet18_cifar(num_classes=10, width=8), SHAPE_BN).cuda()
    kw = dict(input_shape=SHAPE_BN, mean=MEAN, std=STD, iterations=8, batch_size=16, precision=precision,
              channels_last=True)
    eager = DeepInversion(teacher, cuda_graph=False, **kw).synthesize(16, generator=3, progress=False)
    graph = DeepInversion(teacher, cuda_graph=True, **kw).synthesize(16, generator=3, progress=False)
    tol = 1e-4 if precision == "fp32" else 5e-2
    torch.testing.assert_close(graph.x, eager.x, atol=tol, rtol=tol)
    torch.testing.assert_close(graph.losses["total"], eager.losses["total"], atol=tol * 100, rtol=tol)
    assert _hook_count(teacher) == 0


class _SyncingTeacher(nn.Module):
    """A teacher whose forward reads a value on the host: its step cannot be captured in a CUDA graph."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        scale = float(x.abs().amax()) > -1.0  # a host sync
        return self.net(x) * scale


def test_graph_probe_counts_only_syncs_and_drops_the_mode_notice(monkeypatch):
    """The warm-up probe counts torch's "called a synchronizing CUDA operation" warnings only: the notice torch
    gives the first time a process sets the sync debug mode is not a sync (on an H100 it made the first
    synthesizer of a process run eagerly, and cuda_graph=True raise), and the step's other warnings pass on.
    Runs on the CPU: the CUDA mode calls are stood in for."""
    from exml_fast.synth import inversion

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)

    def set_mode(mode):
        modes.append(mode)
        if mode == "warn":
            warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                          "synchronizing operations (Triggered internally at Module.cpp:1003.)", UserWarning,
                          stacklevel=2)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    probe = object.__new__(inversion._GraphStep)
    probe.st = None

    def quiet(st, params, scalars):
        warnings.warn("a warning of the step's own", UserWarning, stacklevel=2)
        return "terms"

    probe.step = quiet
    with pytest.warns(UserWarning, match="of the step's own") as seen:
        out, syncs = probe._probed(None, None)
    assert (out, syncs, modes) == ("terms", [], ["warn", 0])
    assert not any("prototype" in str(w.message) for w in seen)

    def syncing(st, params, scalars):
        warnings.warn("called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:1)",
                      UserWarning, stacklevel=2)
        return "terms"

    probe.step = syncing
    out, syncs = probe._probed(None, None)
    assert syncs == ["called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:1)"]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@requires_ops
def test_cuda_graph_is_the_default_on_cuda_and_falls_back_to_eager():
    """On CUDA the step is captured by default (and then equals the eager run); a teacher that syncs in its
    forward runs eagerly with a RuntimeWarning, with the same result as cuda_graph=False; cuda_graph=True
    raises instead, naming the way out."""
    torch.manual_seed(0)
    net = calibrated_bn(resnet18_cifar(num_classes=10, width=8), SHAPE_BN).cuda()
    kw = dict(input_shape=SHAPE_BN, mean=MEAN, std=STD, iterations=8, batch_size=8, warn_below=None)
    auto = DeepInversion(net, **kw)
    assert auto.cuda_graph is True
    assert DeepInversion(net, compile=True, **kw).cuda_graph is False
    eager = DeepInversion(net, cuda_graph=False, **kw).synthesize(8, generator=3, progress=False)
    with no_warnings():  # no sync inside the engine's step: it is captured, with no fallback warning
        graph = auto.synthesize(8, generator=3, progress=False)
    torch.testing.assert_close(graph.x, eager.x, atol=1e-4, rtol=1e-4)
    syncing = _SyncingTeacher(net)
    with pytest.warns(RuntimeWarning, match="synchronises with the host.*runs eagerly"):
        fallback = DeepInversion(syncing, **kw).synthesize(8, generator=3, progress=False)
    plain = DeepInversion(syncing, cuda_graph=False, **kw).synthesize(8, generator=3, progress=False)
    torch.testing.assert_close(fallback.x, plain.x, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph; pass cuda_graph=False"):
        DeepInversion(syncing, cuda_graph=True, **kw).synthesize(8, generator=3, progress=False)
    assert _hook_count(net) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@requires_ops
def test_cuda_matches_cpu_start_and_runs_every_option():
    torch.manual_seed(0)
    teacher = calibrated_bn(resnet18_cifar(num_classes=10, width=8), SHAPE_BN)
    student = calibrated_bn(resnet18_cifar(num_classes=10, width=8), SHAPE_BN, seed=2)
    kw = dict(input_shape=SHAPE_BN, mean=MEAN, std=STD, iterations=1, batch_size=8, lr=1e-6, keep_best=False)
    cpu = DeepInversion(teacher, **kw).synthesize(8, generator=3, progress=False)
    gpu = DeepInversion(teacher.cuda(), **kw).synthesize(8, generator=3, progress=False)
    torch.testing.assert_close(gpu.x.cpu(), cpu.x, atol=1e-4, rtol=1e-4)  # same start on both devices
    for precision, cl, graph, mr in itertools.product(["fp32", "bf16", "fp16"], [False, True], [False, True],
                                                      [None, (0.5, 0.5)]):
        s = DeepInversion(teacher, input_shape=SHAPE_BN, mean=MEAN, std=STD, iterations=6, batch_size=8,
                          precision=precision, channels_last=cl, cuda_graph=graph, multi_resolution=mr,
                          competitor=student.cuda())
        b = s.synthesize(8, generator=1, progress=False)
        assert torch.isfinite(b.x).all() and b.x.is_cuda


def test_deepinversion_cifar_and_imagenet_presets(bn_cnn):
    from exml_fast.synth import DEEPINVERSION_PRESETS

    cfg = DeepInversion(bn_cnn, input_shape=SHAPE_BN, num_classes=10, preset="cifar").config()
    # The paper's CIFAR-10 setting as the public CIFAR-10 script runs it: Adam lr 0.05 at a constant rate,
    # α_f 10 with no first-layer multiplier, α_tv 2.5e-5, α_l2 0 (the defaults before the "auto" preset).
    assert cfg["lr"] == 0.05 and cfg["schedule"] == "constant" and cfg["warmup"] == 0.0
    assert cfg["betas"] == [0.9, 0.999] and cfg["bn_weight"] == 10.0 and cfg["first_bn_multiplier"] == 1.0
    assert cfg["priors"]["tv_l2"] == 2.5e-5 and cfg["priors"]["l2"] == 0.0 and cfg["flip"]
    assert DeepInversion.preset("cifar10", bn_cnn, input_shape=SHAPE_BN, num_classes=10).config() == cfg

    imagenet = DEEPINVERSION_PRESETS["imagenet"]
    synth = DeepInversion.imagenet(bn_cnn, num_classes=10)
    cfg = synth.config()
    assert cfg["input_shape"] == [3, 224, 224] and synth.mean == imagenet["mean"] and synth.jitter == 30
    assert cfg["lr"] == 0.25 and cfg["betas"] == [0.5, 0.9] and cfg["schedule"] == "cosine"
    assert cfg["warmup"] == 0.05 and cfg["first_bn_multiplier"] == 10.0 and cfg["bn_weight"] == 0.01
    assert cfg["priors"]["tv_l2"] == 1e-4 and cfg["priors"]["l2"] == 1e-5
    assert cfg["multi_resolution"] == [0.5, 2 / 3] and synth.iterations == 3000 and synth.batch_size == 84
    # Arguments override the preset.
    small = DeepInversion.imagenet(bn_cnn, input_shape=SHAPE_BN, lr=0.1, num_classes=10)
    assert small.input_shape == SHAPE_BN and small.lr == 0.1 and small.betas == (0.5, 0.9)
    with pytest.raises(ValueError, match="DeepInversion.preset: name must be one of auto, cifar, cifar10, "
                                         "imagenet, digits; got 'mnist'"):
        DeepInversion.preset("mnist", bn_cnn, input_shape=SHAPE_BN)


@pytest.mark.parametrize("form", ["js", "public"])
def test_competition_form_reaches_the_adaptive_deepinversion_term(bn_cnn, form):
    from exml_fast.ops import js_divergence

    student = calibrated_bn(resnet18_cifar(num_classes=10, width=4), SHAPE_BN, seed=9)
    synth = DeepInversion(bn_cnn, input_shape=SHAPE_BN, iterations=1, batch_size=6, num_classes=10, jitter=0,
                          flip=False, competitor=student, competition_form=form)
    assert synth.config()["competition_form"] == form
    batch = synth.synthesize(6, generator=0, progress=False)  # one step: the kept batch is the start
    with torch.no_grad():
        t, s = bn_cnn(batch.x), student(batch.x)
    want = {f: 1 - js_divergence(t, s, temperature=3.0, clamp=(0.01, 0.99), form=f).clamp(0, 1)
            for f in ("js", "public")}
    torch.testing.assert_close(batch.losses["competition"][0], want[form], rtol=1e-5, atol=1e-6)
    assert abs(float(want["js"] - want["public"])) > 1e-4
    with pytest.raises(ValueError, match="competition_form must be one of js, public; got"):
        DeepInversion(bn_cnn, input_shape=SHAPE_BN, competitor=student, competition_form="kl")
