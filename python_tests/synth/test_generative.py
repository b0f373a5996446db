"""GenerativeSynthesizer (SKD / DAFL / DFAD): loss terms, the generator networks, the imitate & explore loop,
sampling, files, seeds, resume and argument errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _util import calibrated_bn
from torch import nn

from exml_fast.models import FeatureTap, LeNet5BN, SKDGenerator, build_generator
from exml_fast.synth import DelegatorError, GenerativeSynthesizer
from exml_fast.ops.upsample_conv import upsample2x_conv3x3
from exml_fast.synth.base import eval_mode
from exml_fast.synth.generative import _FitState
from exml_fast.synth.generative_losses import (activation_loss, category_loss, diversity_loss,
                                               feature_cosine_discrepancy, logit_l1)

SHAPE = (1, 16, 16)


class TinyBN(nn.Module):
    """conv → BN → ReLU → pool → fc → BN → ReLU → classifier, for (N, 1, 16, 16) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(4),
                                      nn.Flatten(), nn.Linear(64, 12), nn.BatchNorm1d(12), nn.ReLU())
        self.classifier = nn.Linear(12, 5)

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return calibrated_bn(TinyBN(), SHAPE)


def make(teacher, **kw) -> GenerativeSynthesizer:
    kw.setdefault("batch_size", 16)
    return GenerativeSynthesizer(teacher, input_shape=SHAPE, mean=(0.5,), std=(0.25,), **kw)


def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------ loss terms
def _rows(seed: int, n: int = 7, k: int = 5, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=dtype).requires_grad_(True)


def test_feature_cosine_discrepancy_matches_the_formula():
    a, b = _rows(0), _rows(1)
    want = sum(1 - torch.dot(a[i], b[i]) / (a[i].norm() * b[i].norm()) for i in range(a.shape[0])) / a.shape[0]
    got = feature_cosine_discrepancy(a, b)
    torch.testing.assert_close(got, want)
    ga = torch.autograd.grad(got, (a, b))
    wa = torch.autograd.grad(want, (a, b))
    torch.testing.assert_close(ga, wa)
    assert torch.autograd.gradcheck(feature_cosine_discrepancy, (a, b))
    a = a.detach()
    assert float(feature_cosine_discrepancy(a, 3 * a)) == pytest.approx(0.0, abs=1e-12)
    assert float(feature_cosine_discrepancy(a, -a)) == pytest.approx(2.0)


def test_category_and_diversity_and_activation_and_l1_match_the_formulas():
    z = _rows(2)
    pred = z.detach().argmax(1)
    want_cat = -torch.stack([torch.log_softmax(z[i], 0)[pred[i]] for i in range(z.shape[0])]).mean()
    w = torch.softmax(z, 1).mean(0)
    want_div = sum(w[k] * torch.log(w[k]) for k in range(z.shape[1]))
    for got, want in ((category_loss(z), want_cat), (diversity_loss(z), want_div),
                      (activation_loss(z), -z.abs().sum() / z.numel())):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0])
    t, s = _rows(3), _rows(4)
    torch.testing.assert_close(logit_l1(t, s), (t - s).abs().sum() / t.numel())
    assert torch.autograd.gradcheck(diversity_loss, (z,))
    # uniform classes: the diversity term is at its minimum, -log K
    assert float(diversity_loss(torch.zeros(4, 5))) == pytest.approx(-math.log(5))


@pytest.mark.parametrize("fn", [category_loss, diversity_loss, activation_loss])
def test_loss_terms_reject_bad_input(fn):
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fn([[1.0]])
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        fn(torch.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        fn(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="one shape"):
        logit_l1(torch.zeros(2, 3), torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("large,shape", [(False, (1, 32, 32)), (False, (3, 16, 16)), (True, (3, 32, 32))])
def test_skd_generator_shapes_and_helper_bn(large, shape):
    torch.manual_seed(0)
    net = SKDGenerator(shape, latent_dim=8, large=large)
    assert net(torch.randn(3, 8)).shape == (3, *shape)
    assert isinstance(net.helper_bn, nn.BatchNorm2d) and net.helper_bn.num_features == shape[0]
    assert net.helper_bn.affine and all(p.requires_grad for p in net.helper_bn.parameters())
    assert isinstance(net.body[-1], nn.Tanh)
    assert (sum(isinstance(m, nn.ConvTranspose2d) for m in net.modules()) == 4) == large
    assert isinstance(SKDGenerator(shape, large=large, helper_bn=False).helper_bn, nn.Identity)


def test_generator_arguments_are_checked():
    with pytest.raises(ValueError, match="divisible by 4"):
        SKDGenerator((1, 30, 32))
    with pytest.raises(ValueError, match="divisible by 16"):
        SKDGenerator((1, 24, 24), large=True)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_generator("dcgan", (1, 32, 32))
    for bad in (0, -1.0, True, "half"):
        with pytest.raises(ValueError, match="width must be a number > 0"):
            SKDGenerator((1, 32, 32), width=bad)


def test_dafl_and_dfad_generators_are_their_public_codes_networks():
    # DFAD's GeneratorA (network/gan.py, ngf 64) and DAFL's Generator (models.py) at 32x32, one channel: Table IV's
    # layers, an output BN without affine parameters, and DAFL's eps 0.8 on the two hidden BNs.
    expected = (100 * 128 * 8 * 8 + 128 * 8 * 8) + 2 * 128 + (128 * 128 * 9 + 128) + 2 * 128 \
        + (128 * 64 * 9 + 64) + 2 * 64 + (64 * 9 + 1)
    for arch, eps in (("dafl", 0.8), ("dfad", 1e-5)):
        net = build_generator(arch, (1, 32, 32))
        assert sum(p.numel() for p in net.parameters()) == expected == 1_049_985
        assert not net.helper_bn.affine and net.helper_bn.num_features == 1
        bns = [m for m in net.body if isinstance(m, nn.BatchNorm2d)]
        assert [m.eps for m in bns] == [1e-5, eps, eps]
        assert net(torch.randn(4, 100)).shape == (4, 1, 32, 32)
    assert build_generator("skd-small", (1, 32, 32)).helper_bn.affine  # SKD's helper BN is trained
    with pytest.raises(ValueError, match="bn_eps must be a number > 0"):
        SKDGenerator((1, 32, 32), bn_eps=0)


def test_narrow_generator_is_table_iv_at_a_quarter_of_the_channels():
    torch.manual_seed(0)
    full, narrow = build_generator("skd-small", (1, 32, 32)), build_generator("skd-narrow", (1, 32, 32))
    convs = [m.out_channels for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 16, 1] == [max(1, c // 4) for c in
                                    [m.out_channels for m in full.modules() if isinstance(m, nn.Conv2d)][:2]] + [1]
    assert narrow.body[0].num_features == 32 and narrow.project.out_features == 32 * 8 * 8
    assert narrow(torch.randn(3, 100)).shape == (3, 1, 32, 32)
    assert isinstance(narrow.helper_bn, nn.BatchNorm2d)


def test_feature_tap_records_the_classifier_input_with_its_graph(teacher):
    x = torch.randn(4, *SHAPE, requires_grad=True)
    with FeatureTap(teacher) as tap:
        out = teacher(x)
        f = tap.features
    assert f.shape == (4, 12) and f.requires_grad
    torch.testing.assert_close(teacher.classifier(f), out)
    assert not teacher.classifier._forward_pre_hooks


def test_feature_tap_records_a_named_layers_output_and_names_the_argument_on_a_bad_name(teacher):
    x = torch.randn(4, *SHAPE, requires_grad=True)
    with FeatureTap(teacher, layer="features.5") as tap:  # the Linear(64, 12), before its BN and ReLU
        teacher(x)
        f = tap.features
    assert f.shape == (4, 12) and f.requires_grad
    torch.testing.assert_close(f, teacher.features[:6](x))
    assert not teacher.features[5]._forward_hooks
    with FeatureTap(teacher, layer="features.3") as tap:  # a (4, 4, 4, 4) map, flattened
        teacher(x)
        assert tap.features.shape == (4, 64)
    with pytest.raises(ValueError, match=r"FeatureTap: layer 'features\.9' is not a submodule of TinyBN; its "
                                         r"submodules: features, features\.0, "):
        FeatureTap(teacher, layer="features.9")
    with pytest.raises(TypeError, match="FeatureTap: layer must be a submodule's name"):
        FeatureTap(teacher, layer=3)
    with FeatureTap(teacher, layer="features.2") as tap, pytest.raises(RuntimeError, match="layer 'features.2'"):
        tap.features  # noqa: B018


def test_feature_layer_moves_the_activation_term_and_keys_the_checkpoint(teacher, tmp_path):
    """DAFL's activation term on a named layer's output (DAFL's code reads LeNet-5's 120 after conv5, not the
    classifier's input); a fit checkpoint of the other features is refused, not resumed."""
    with pytest.raises(ValueError, match="GenerativeSynthesizer: feature_layer 'conv5' is not a submodule"):
        make(teacher, preset="dafl", feature_layer="conv5")
    seen = {}
    for layer, upto in ((None, 8), ("features.5", 6)):  # the classifier's input, or the Linear's output
        synth = make(teacher, preset="dafl", generator_arch="skd-narrow", feature_layer=layer)
        state, session = _session(synth)
        with session:
            rng = state.z_gen.get_state()
            synth.delegator.train()
            with torch.no_grad():
                want = 0.1 * activation_loss(teacher.features[:upto](synth.delegator(synth._latent(state, 8))))
            state.z_gen.set_state(rng)  # the explore step draws the same latents
            seen[layer] = synth._explore(state, 8)["activation"]
        assert seen[layer] == pytest.approx(float(want), rel=1e-5)
    assert seen[None] != pytest.approx(seen["features.5"], rel=1e-3)
    ck = tmp_path / "fit.pt"
    make(teacher, preset="dafl", generator_arch="skd-narrow").fit(2, batch_size=8, generator=0, progress=False,
                                                                  checkpoint=ck)
    assert "feature_layer" not in torch.load(ck, weights_only=False)["job"]  # older checkpoints still resume
    with pytest.raises(DelegatorError, match=r"other settings \(differing: \['feature_layer'\]\)"):
        make(teacher, preset="dafl", generator_arch="skd-narrow", feature_layer="features.5").fit(
            2, batch_size=8, generator=0, progress=False, checkpoint=ck)


# ------------------------------------------------------------------------------------------------ the loop
def _session(synth, seed=0):
    state = _FitState.start(synth, seed, {}, None, None)
    return state, synth._fit_session(state)


def test_imitate_steps_update_only_the_student_and_explore_steps_the_delegator(teacher):
    t_before = params(teacher)
    synth = make(teacher, student_explore="none")
    state, session = _session(synth)
    with session:
        d0, s0 = params(synth.delegator), params(state.student)
        synth._imitate(state, 8)
        d1, s1 = params(synth.delegator), params(state.student)
        assert same(d0, d1) and not same(s0, s1)
        synth._explore(state, 8)
        d2, s2 = params(synth.delegator), params(state.student)
        assert not same(d1, d2) and same(s1, s2)
    assert same(params(teacher), t_before)
    assert all(p.requires_grad for p in teacher.parameters())  # flags restored


def test_explore_updates_the_student_too_with_algorithm_1_as_written(teacher):
    synth = make(teacher)  # preset skd: student_explore="explore"
    assert synth.student_explore == "explore"
    state, session = _session(synth)
    with session:
        s0, bn0 = params(state.student), synth.delegator.helper_bn.weight.detach().clone()
        synth._explore(state, 8)
        assert not same(s0, params(state.student))
        assert not torch.equal(bn0, synth.delegator.helper_bn.weight)  # the helper BN is trained


def test_the_student_is_a_reinitialised_clone_of_the_teacher(teacher):
    synth = make(teacher)
    state, _ = _session(synth)
    s = state.student
    assert type(s) is type(teacher) and s is not teacher
    assert [p.shape for p in s.parameters()] == [p.shape for p in teacher.parameters()]
    assert not torch.equal(s.classifier.weight, teacher.classifier.weight)
    assert torch.equal(s.features[1].running_var, torch.ones(4))  # statistics reset too


def test_dafl_has_no_student_and_dfad_trains_on_the_logit_l1(teacher):
    dafl = make(teacher, preset="dafl")
    result = dafl.fit(2, batch_size=8, generator=0, progress=False, log_every=1)
    assert result.student is None and "imitate" not in result.history
    assert set(result.history) >= {"category", "activation", "diversity", "explore"}
    dfad = make(teacher, preset="dfad")
    assert dfad.student_explore == "none"  # DFAD's student only imitates: an explore step would ascend the L1
    result = dfad.fit(2, batch_size=8, generator=0, progress=False, log_every=1)
    assert result.student is not None and set(result.history) >= {"imitate", "discrepancy"}
    assert make(teacher, preset="dfad", student_explore="explore").student_explore == "explore"
    assert "bn" not in result.history and "category" not in result.history


def test_dafl_and_dfad_presets_carry_their_public_codes_recipes(teacher):
    dafl, dfad, skd = make(teacher, preset="dafl"), make(teacher, preset="dfad"), make(teacher)
    assert (dafl.lr_generator, dafl.generator_betas, dafl.generator_arch) == (0.2, (0.9, 0.999), "dafl")
    assert (dafl.student_optimizer, dafl.lr_student, dafl.student_weight_decay, dafl.student_kd) == \
        ("adam", 2e-3, 0.0, 1.0)
    # DAFL's information entropy is in log10 at weight 5: 5 / ln 10 on the natural-log term
    assert dafl.weights["diversity"] == pytest.approx(5 / math.log(10)) and dafl.weights["activation"] == 0.1
    assert (dfad.lr_generator, dfad.generator_betas, dfad.generator_arch) == (1e-3, (0.9, 0.999), "dfad")
    assert (dfad.student_optimizer, dfad.lr_student, dfad.student_weight_decay, dfad.student_kd) == \
        ("sgd", 0.01, 1e-4, 0.0)
    assert (skd.lr_generator, skd.generator_betas, skd.generator_arch, skd.lr_student) == \
        (1e-3, (0.5, 0.999), "skd-small", 0.1)
    over = make(teacher, preset="dafl", lr_generator=1e-3, generator_betas=(0.5, 0.9), student_optimizer="sgd",
                lr_student=0.05, student_weight_decay=5e-4, generator_arch="skd-narrow", student_kd=0)
    assert (over.lr_generator, over.generator_betas, over.student_optimizer, over.lr_student,
            over.student_weight_decay, over.generator_arch, over.student_kd) == \
        (1e-3, (0.5, 0.9), "sgd", 0.05, 5e-4, "skd-narrow", 0.0)


def _tiny_student() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 5))


def test_dafl_distils_a_given_student_beside_the_generator(teacher, tmp_path):
    student = _tiny_student()
    before = params(student)
    synth = make(teacher, preset="dafl", generator_arch="skd-narrow", student=student)
    result = synth.fit(3, batch_size=8, generator=0, progress=False, log_every=1, checkpoint=tmp_path / "c.pt")
    assert result.student is student and not same(before, params(student))
    assert len(result.history["kd"]) == 3 and "imitate" not in result.history and "discrepancy" not in result.history
    # its optimiser is the preset's (Adam 2e-3, no weight decay), kept in the checkpoint with the recipe
    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    assert ckpt["opt_s"]["param_groups"][0]["lr"] == 2e-3 and "exp_avg" in ckpt["opt_s"]["state"][0]
    assert ckpt["job"]["student_kd"] == 1.0 and ckpt["job"]["generator_betas"] == [0.9, 0.999]
    # the KD step reads the samples detached: the delegator's step is the same with or without the student
    alone = make(teacher, preset="dafl", generator_arch="skd-narrow")
    alone.fit(3, batch_size=8, generator=0, progress=False)
    assert same(params(alone.delegator), params(synth.delegator))
    # student_kd=0: the student is left alone (DAFL's generator only)
    idle = _tiny_student()
    before = params(idle)
    off = make(teacher, preset="dafl", generator_arch="skd-narrow", student=idle, student_kd=0)
    assert off.fit(2, batch_size=8, generator=0, progress=False).student is None and same(before, params(idle))


def test_dfad_steps_its_student_with_the_public_codes_sgd(teacher, tmp_path):
    synth = make(teacher, preset="dfad", generator_arch="skd-narrow")
    synth.fit(1, batch_size=8, generator=0, progress=False, checkpoint=tmp_path / "c.pt")
    group = torch.load(tmp_path / "c.pt", weights_only=False)["opt_s"]["param_groups"][0]
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.01, 1e-4, 0.9)


@pytest.mark.parametrize("preset", ["skd", "dafl", "dfad"])
def test_a_bf16_fit_runs_the_networks_under_autocast_and_keeps_float32_state(teacher, tmp_path, monkeypatch, preset):
    """precision="bf16": the generator's, teacher's and student's forwards under CPU autocast (the fused
    generator's layers and the teacher's convolutions see bfloat16), every loss term and all state in float32;
    the checkpoint is keyed by it, and an fp32 fit of the same job refuses it."""
    import exml_fast.models.generators as generators
    seen = []

    def spy(x, weight, bias=None):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return upsample2x_conv3x3(x, weight, bias)
    monkeypatch.setattr(generators, "upsample2x_conv3x3", spy)
    student = _tiny_student() if preset == "dafl" else None
    synth = make(teacher, preset=preset, generator_arch="skd-narrow", student=student, precision="bf16")
    ck = tmp_path / "fit.pt"
    result = synth.fit(3, batch_size=8, generator=0, progress=False, log_every=1, checkpoint=ck)
    # the delegator's two fused layers: first the build's float32 shape check, then every step's under autocast
    assert seen[:2] == [(torch.float32, False)] * 2 and len(seen) > 2
    assert all(entry == (torch.bfloat16, True) for entry in seen[2:])
    for name, values in result.history.items():
        assert len(values) == 3 and all(math.isfinite(v) for v in values), name
    nets = [synth.delegator] + ([result.student] if result.student is not None else [])
    assert all(p.dtype == torch.float32 for net in nets for p in net.parameters())
    job = torch.load(ck, weights_only=False)["job"]
    assert job["precision"] == "bf16"
    with pytest.raises(DelegatorError, match=r"differing: \['precision'\]"):
        make(teacher, preset=preset, generator_arch="skd-narrow", student=student).fit(
            3, batch_size=8, generator=0, progress=False, checkpoint=ck)
    seen.clear()
    x = synth.sample(4, generator=0)  # sampling stays float32, outside autocast
    assert x.dtype == torch.float32 and seen and not any(on for _, on in seen)


def test_a_bf16_fit_step_is_the_fp32_one_up_to_bf16_rounding(teacher):
    """The first step of the same DAFL job in both precisions (same delegator, latents and teacher): the loss
    terms differ only by the bfloat16 forwards' rounding (8 significant bits; DAFL's generator lr of 0.2 then
    lets the trajectories part, so later steps are not compared)."""
    terms = {}
    for precision in ("fp32", "bf16"):
        synth = make(teacher, preset="dafl", generator_arch="skd-narrow", precision=precision)
        terms[precision] = synth.fit(1, batch_size=16, generator=0, progress=False, log_every=1).history
    for term in ("category", "diversity", "activation", "explore", "teacher_confidence"):
        assert terms["bf16"][term][0] == pytest.approx(terms["fp32"][term][0], rel=2e-2, abs=1e-3), term


def test_seeds_reproduce_and_differ(teacher):
    a, b, c = make(teacher, balance=False), make(teacher, balance=False), make(teacher, balance=False)
    for synth, seed in ((a, 3), (b, 3), (c, 4)):
        synth.fit(2, batch_size=8, generator=seed, progress=False)
    assert same(params(a.delegator), params(b.delegator))
    assert not same(params(a.delegator), params(c.delegator))
    xa = a.synthesize(10, generator=7, progress=False)
    xb = b.synthesize(10, generator=7, progress=False)
    assert torch.equal(xa.x, xb.x) and torch.equal(xa.y, xb.y)


def test_fit_callback_sees_the_student_every_k_steps_and_changes_nothing(teacher, tmp_path):
    """callback(done, student) after every callback_every-th step and the last, the student back in training mode;
    scoring it (in eval mode) leaves the fit's numbers as without a callback, and a resumed fit calls it for its own
    steps only."""
    plain = make(teacher, preset="dfad")
    ref = plain.fit(5, batch_size=8, generator=3, progress=False)
    seen = []

    def score(done, student):
        assert student.training  # the fit's student, as the step left it
        student.eval()
        with torch.no_grad():
            student(torch.zeros(2, *SHAPE))
        seen.append((done, [p.detach().clone() for p in student.parameters()]))

    watched = make(teacher, preset="dfad")
    got = watched.fit(5, batch_size=8, generator=3, progress=False, callback=score, callback_every=2)
    assert [d for d, _ in seen] == [2, 4, 5]  # every second step and the last
    assert got.student.training is False and same(params(got.student), params(ref.student))
    assert same(seen[-1][1], params(got.student)) and same(params(watched.delegator), params(plain.delegator))
    assert got.history == ref.history
    # callback_every defaults to log_every; a preset without a student gets None
    seen.clear()
    make(teacher, preset="dfad").fit(4, batch_size=8, generator=3, progress=False, log_every=3, callback=score)
    assert [d for d, _ in seen] == [3, 4]
    nostudent = []  # DAFL's preset given no student trains none
    make(teacher, preset="dafl").fit(1, batch_size=8, generator=3, progress=False,
                                     callback=lambda d, s: nostudent.append((d, s)))
    assert nostudent == [(1, None)]
    # resumed: the callback runs for the steps this call does
    ck2 = tmp_path / "fit4.pt"
    stop = {"at": 2}

    def dies(done, student):
        score(done, student)
        if done == stop["at"]:
            raise KeyboardInterrupt("killed")

    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        make(teacher, preset="dfad").fit(4, batch_size=8, generator=3, progress=False, checkpoint=ck2,
                                         checkpoint_every=1, callback=dies, callback_every=1)
    assert [d for d, _ in seen] == [1, 2] and torch.load(ck2, weights_only=False)["done"] == 1  # killed before 2's
    seen.clear()
    make(teacher, preset="dfad").fit(4, batch_size=8, generator=3, progress=False, checkpoint=ck2,
                                     checkpoint_every=1, callback=score, callback_every=1)
    assert [d for d, _ in seen] == [2, 3, 4]  # step 2 redone from the checkpoint of step 1
    seen.clear()
    make(teacher, preset="dfad").fit(4, batch_size=8, generator=3, progress=False, checkpoint=ck2,
                                     callback=score, callback_every=1)
    assert seen == []  # finished: no step, no call
    # a checkpoint follows every callback, whatever checkpoint_every says: what the callback keeps is never more
    # than one call ahead of the checkpoint a resume starts from
    ck3, at = tmp_path / "fit5.pt", []
    make(teacher, preset="dfad").fit(5, batch_size=8, generator=3, progress=False, checkpoint=ck3,
                                     checkpoint_every=100, callback=lambda d, s: at.append(
                                         (d, torch.load(ck3, weights_only=False)["done"] if ck3.exists() else None)),
                                     callback_every=3)
    assert at == [(3, None), (5, 3)] and torch.load(ck3, weights_only=False)["done"] == 5
    with pytest.raises(TypeError, match="callback must be callable"):
        make(teacher, preset="dfad").fit(1, progress=False, callback=3)
    with pytest.raises(ValueError, match="callback_every"):
        make(teacher, preset="dfad").fit(1, progress=False, callback=score, callback_every=0)


def test_fit_resumes_after_an_interruption_with_the_numbers_of_an_uninterrupted_run(teacher, tmp_path, monkeypatch):
    whole = make(teacher)
    whole.fit(4, batch_size=8, generator=1, progress=False)
    ck = tmp_path / "fit.pt"
    broken = make(teacher)
    calls = {"n": 0}
    real = GenerativeSynthesizer._iteration

    def dies_at_the_third(self, state, bs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, state, bs)

    monkeypatch.setattr(GenerativeSynthesizer, "_iteration", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        broken.fit(4, batch_size=8, generator=1, progress=False, checkpoint=ck, checkpoint_every=1)
    monkeypatch.setattr(GenerativeSynthesizer, "_iteration", real)
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written file left
    before = torch.load(ck, weights_only=False)["seconds"]  # the two steps the killed call finished
    assert before > 0
    resumed = make(teacher)
    result = resumed.fit(4, batch_size=8, generator=1, progress=False, checkpoint=ck, checkpoint_every=1)
    assert result.iterations == 4
    assert same(params(resumed.delegator), params(whole.delegator))
    # its time is the killed call's steps plus its own, not its own alone
    assert result.seconds > before and torch.load(ck, weights_only=False)["seconds"] == result.seconds
    # ... and each call's share is kept with the threads it ran on: the killed call's two saved steps, then two
    threads = torch.get_num_threads()
    assert [(seg["steps"], seg["threads"], seg["device"]) for seg in result.segments] == [(2, threads, "cpu")] * 2
    assert sum(seg["seconds"] for seg in result.segments) == pytest.approx(result.seconds)
    assert torch.load(ck, weights_only=False)["segments"] == result.segments
    # a finished fit called again does no step and adds no segment
    assert make(teacher).fit(4, batch_size=8, generator=1, progress=False, checkpoint=ck).segments == result.segments
    # a checkpoint written before fits were timed still resumes; its time is then unknown, not understated
    legacy = torch.load(ck, weights_only=False)
    del legacy["seconds"], legacy["segments"]
    legacy["done"] = 3
    torch.save(legacy, ck)
    old = make(teacher).fit(4, batch_size=8, generator=1, progress=False, checkpoint=ck)
    assert old.seconds is None
    # its steps are one segment whose threads are unknown, then this call's
    assert [(seg["steps"], seg["threads"]) for seg in old.segments] == [(3, None), (1, threads)]
    assert old.segments[0]["seconds"] is None
    # without a seed, a rerun takes the checkpoint's (a fresh random one would be "other settings")
    unseeded = tmp_path / "unseeded.pt"
    make(teacher).fit(2, batch_size=8, progress=False, checkpoint=unseeded)
    assert make(teacher).fit(2, batch_size=8, progress=False, checkpoint=unseeded).iterations == 2
    # a checkpoint of other settings is refused, not silently mixed in
    with pytest.raises(DelegatorError, match="other settings.*batch_size"):
        make(teacher).fit(4, batch_size=4, generator=1, progress=False, checkpoint=ck)
    # a damaged record of the calls is refused with the file's name, not a TypeError from deep inside
    for damaged in ("two calls", [{"steps": 1}], [{"steps": "4"}], [None]):
        bad = torch.load(ck, weights_only=False)
        bad["segments"] = damaged
        torch.save(bad, tmp_path / "damaged.pt")
        with pytest.raises(DelegatorError, match=r"damaged.pt: its 'segments' are not"):
            make(teacher).fit(4, batch_size=8, generator=1, progress=False, checkpoint=tmp_path / "damaged.pt")


def test_one_delegator_is_fine_tuned_across_tasks(teacher):
    first = make(teacher)
    first.fit(2, batch_size=8, generator=0, progress=False)
    trained = params(first.delegator)
    torch.manual_seed(5)
    teacher2 = calibrated_bn(TinyBN(), SHAPE, seed=5)
    second = make(teacher2, delegator=first.delegator)
    assert second.delegator is first.delegator and same(params(second.delegator), trained)
    second.fit(2, batch_size=8, generator=0, progress=False)
    assert not same(params(second.delegator), trained)
    # a fresh synthesizer with the same seed starts elsewhere: the second one did not re-create its delegator
    fresh = make(teacher2)
    fresh.fit(2, batch_size=8, generator=0, progress=False)
    assert not same(params(fresh.delegator), params(second.delegator))


# ------------------------------------------------------------------------------------------------ sampling
def test_synthesize_balances_the_requested_classes_as_the_teacher_labels_them(teacher):
    synth = make(teacher)
    synth.fit(1, batch_size=8, generator=0, progress=False)
    with torch.no_grad(), eval_mode(synth.delegator):
        counts = torch.bincount(synth._draw(512, torch.Generator().manual_seed(0))[1].argmax(1), minlength=5)
    common = counts.argsort(descending=True)[:2].tolist()
    batch = synth.synthesize(6, classes=common, generator=2, progress=False)
    assert batch.y.tolist() == [common[i % 2] for i in range(6)]
    with torch.no_grad():
        assert torch.equal(teacher(batch.x).argmax(1), batch.y)
    assert batch.mean == (0.5,) and 0 < float(batch.losses["acceptance"]) <= 1


def test_sample_draws_fresh_unlabelled_inputs_from_the_delegator_in_eval_mode(teacher):
    synth = make(teacher)
    synth.fit(1, batch_size=8, generator=0, progress=False)
    synth.delegator.train()
    x = synth.sample(5, 3)
    assert x.shape == (5, *SHAPE) and x.dtype == torch.float32 and not x.requires_grad
    assert synth.delegator.training, "sample restores the delegator's mode"
    # an int seed and a Generator seeded with it are the same draw; a Generator advances between calls
    assert torch.equal(synth.sample(5, torch.Generator().manual_seed(3)), x)
    gen = torch.Generator().manual_seed(3)
    first, second = synth.sample(5, gen), synth.sample(5, gen)
    assert torch.equal(first, x) and not torch.equal(second, x)
    with torch.no_grad(), eval_mode(synth.delegator):
        expect = synth.delegator(torch.randn(5, synth.latent_dim, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(x, expect, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sample: n must be an int >= 1"):
        synth.sample(0)
    with pytest.raises(TypeError, match="sample: generator must be None, an int seed or a torch.Generator; got str"):
        synth.sample(2, "3")


def test_unbalanced_sampling_keeps_every_draw_with_the_teachers_label_among_the_classes(teacher):
    synth = make(teacher, balance=False)
    synth.fit(1, batch_size=8, generator=0, progress=False)
    batch = synth.synthesize(20, classes=[1, 3], generator=2, progress=False)
    assert set(batch.y.tolist()) <= {1, 3}
    with torch.no_grad():
        logits = teacher(batch.x)
    torch.testing.assert_close(batch.y, torch.tensor([1, 3])[logits[:, [1, 3]].argmax(1)])


def test_a_class_the_teacher_never_predicts_is_an_error_naming_it(teacher):
    never = copy.deepcopy(teacher)
    with torch.no_grad():
        never.classifier.bias[0] = 1e4  # every input is class 0
    synth = make(never, max_draw_factor=2)
    synth.fit(1, batch_size=8, generator=0, progress=False)
    with pytest.raises(RuntimeError, match=r"class\(es\) \[4\].*balance=False"):
        synth.synthesize(5, classes=[0, 4], generator=0, progress=False)


# ------------------------------------------------------------------------------------------------ files
def test_save_and_load_are_bit_exact_and_checked(teacher, tmp_path):
    synth = make(teacher, balance=False)
    synth.fit(2, batch_size=8, generator=0, progress=False)
    path = tmp_path / "d.pt"
    synth.save(path)
    back = GenerativeSynthesizer.load(path, teacher, batch_size=16, balance=False)
    assert back.input_shape == SHAPE and back.mean == (0.5,) and back.latent_dim == synth.latent_dim
    for k, v in synth.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    a = synth.synthesize(8, generator=3, progress=False)
    b = back.synthesize(8, generator=3, progress=False)
    assert torch.equal(a.x, b.x)
    # a flipped byte inside the weights is caught by the checksum (or the zip's own CRC)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(DelegatorError):
        GenerativeSynthesizer.load(bad, teacher)
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    with pytest.raises(DelegatorError, match="not an exml_fast delegator"):
        GenerativeSynthesizer.load(other, teacher)
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(DelegatorError, match="corrupt or truncated"):
        GenerativeSynthesizer.load(tmp_path / "trunc.pt", teacher)
    with pytest.raises(FileNotFoundError):
        GenerativeSynthesizer.load(tmp_path / "none.pt", teacher)


def test_saved_jobs_record_the_delegator(teacher, tmp_path):
    synth = make(teacher, balance=False)
    synth.fit(1, batch_size=8, generator=0, progress=False)
    first = synth.synthesize(8, generator=1, progress=False, save_to=tmp_path / "job")
    again = synth.synthesize(8, generator=1, progress=False, save_to=tmp_path / "job")
    assert torch.equal(first.x, again.x)
    synth.fit(1, batch_size=8, generator=1, progress=False)  # a changed delegator is another job
    with pytest.raises(ValueError):
        synth.synthesize(8, generator=1, progress=False, save_to=tmp_path / "job")


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,err,match", [
    ({"preset": "gan"}, ValueError, "preset must be one of"),
    ({"weights": {"bogus": 1.0}}, ValueError, "unknown terms"),
    ({"weights": {"imitation": 0, "category": 0, "diversity": 0, "bn": 0}}, ValueError, "every term weight is 0"),
    ({"weights": {"bn": -1.0}}, ValueError, r"weights\['bn'\]"),
    ({"generator_arch": "dcgan"}, ValueError, "generator_arch must be one of"),
    ({"generator_arch": 3}, TypeError, "generator_arch must be a name or a callable"),
    ({"student_explore": "both"}, ValueError, "student_explore must be one of"),
    ({"imitate_steps": 0, "student_explore": "none"}, ValueError, "need a student that learns"),
    ({"balance": 1}, TypeError, "balance must be a bool"),
    ({"latent_dim": 0}, ValueError, "latent_dim must be an int >= 1"),
    ({"delegator": "net"}, TypeError, "delegator must be an nn.Module"),
    ({"lr_generator": 0}, ValueError, "lr_generator"),
    ({"generator_betas": (1.0, 0.9)}, ValueError, r"generator_betas must be two numbers in \[0, 1\)"),
    ({"generator_betas": 0.9}, ValueError, "generator_betas must be two numbers"),
    ({"student_optimizer": "rmsprop"}, ValueError, "student_optimizer must be one of"),
    ({"lr_student": -1}, ValueError, "lr_student"),
    ({"student_weight_decay": -1e-4}, ValueError, "student_weight_decay must be a finite number >= 0"),
    ({"preset": "dafl", "student_kd": -1.0}, ValueError, "student_kd must be a finite number >= 0"),
    ({"preset": "dfad", "student_kd": 1.0}, ValueError, "the imitation/adversarial terms already train one"),
    ({"device": "meta"}, ValueError, r"device is meta but the teacher's parameters are on cpu"),
    ({"precision": "fp16"}, ValueError, "precision must be one of fp32, bf16; got 'fp16'"),
])
def test_bad_arguments_get_clear_errors(teacher, kw, err, match):
    with pytest.raises(err, match=match):
        make(teacher, **kw)


def test_bad_use_gets_clear_errors(teacher):
    synth = make(teacher)
    with pytest.raises(RuntimeError, match="no delegator yet"):
        synth.synthesize(4, progress=False)
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        synth.fit(0, progress=False)
    with pytest.raises(ValueError, match="batch_size must be an int >= 2"):
        synth.fit(1, batch_size=1, progress=False)
    with pytest.raises(ValueError, match="iterations must be None"):
        synth.synthesize(4, iterations=3, progress=False)
    bad_arch = make(teacher, generator_arch=lambda shape, latent_dim: nn.Linear(latent_dim, 3))
    with pytest.raises(ValueError, match="not \\(2, \\*input_shape\\)"):
        bad_arch.fit(1, batch_size=2, progress=False)


def test_a_custom_architecture_trains_and_must_be_named_again_to_load(teacher, tmp_path):
    def arch(shape, latent_dim):
        return nn.Sequential(nn.Linear(latent_dim, math.prod(shape)), nn.Tanh(), nn.Unflatten(1, shape))

    synth = make(teacher, generator_arch=arch, latent_dim=6)
    synth.fit(1, batch_size=4, generator=0, progress=False)
    synth.save(tmp_path / "c.pt")
    with pytest.raises(DelegatorError, match="custom generator_arch"):
        GenerativeSynthesizer.load(tmp_path / "c.pt", teacher)
    back = GenerativeSynthesizer.load(tmp_path / "c.pt", teacher, generator_arch=arch)
    assert back.latent_dim == 6


def test_lenet5_bn_teacher_runs_end_to_end_at_32px():
    torch.manual_seed(0)
    t = calibrated_bn(LeNet5BN(10), (1, 32, 32))
    synth = GenerativeSynthesizer(t, input_shape=(1, 32, 32), batch_size=8)
    result = synth.fit(1, batch_size=4, generator=0, progress=False)
    assert result.iterations == 1 and result.history["bn"][0] > 0
    batch = GenerativeSynthesizer(t, input_shape=(1, 32, 32), delegator=synth.delegator, balance=False).synthesize(
        3, generator=0, progress=False)
    assert batch.x.shape == (3, 1, 32, 32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("preset", ["skd", "dafl", "dfad"])
def test_a_bf16_fit_on_cuda(preset):
    """precision="bf16" on a GPU (the generators' unfused layers, the teacher's BN term on the fused
    autocast path): finite terms, float32 state, and a first step near the fp32 one's."""
    torch.manual_seed(0)
    t = calibrated_bn(LeNet5BN(10), (1, 32, 32)).cuda()
    student = LeNet5BN(10) if preset == "dafl" else None
    first = {}
    for precision in ("fp32", "bf16"):
        synth = GenerativeSynthesizer(t, input_shape=(1, 32, 32), preset=preset, device="cuda",
                                      student=copy.deepcopy(student), precision=precision)
        result = synth.fit(2, batch_size=16, generator=0, progress=False, log_every=1)
        for name, values in result.history.items():
            assert all(math.isfinite(v) for v in values), (precision, name)
        assert all(p.dtype == torch.float32 for p in synth.delegator.parameters())
        first[precision] = {k: v[0] for k, v in result.history.items()}
    for term, value in first["fp32"].items():
        assert first["bf16"][term] == pytest.approx(value, rel=5e-2, abs=1e-2), term
