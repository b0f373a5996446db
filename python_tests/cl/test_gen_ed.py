"""Generative ED (``gen-ed``): one delegator fine-tuned on each expert, fresh samples at every distillation step."""

from __future__ import annotations

import pytest
import torch
from _util import band_images

from exml_fast.cl import strategies as S
from exml_fast.cl.experts import Expert
from exml_fast.models import build_model
from exml_fast.training import train_classifier

K = 4
META = {"input_shape": [1, 32, 32], "mean": [0.5], "std": [0.5]}


@pytest.fixture(scope="module")
def experts():
    out = []
    for i, cls in enumerate([(0, 1), (2, 3)]):
        torch.manual_seed(100)
        m = build_model("lenet5", num_classes=K, in_channels=1)
        x, y = band_images(cls, 40, seed=i)
        train_classifier(m, x, y, epochs=2, batch_size=20, lr=0.05, generator=torch.Generator().manual_seed(i))
        out.append(Expert(m, cls, arch="lenet5", arch_kwargs={"num_classes": K, "in_channels": 1},
                          meta={**META, "experience": i}))
    return out


def make(**kw):
    torch.manual_seed(7)
    learner = build_model("lenet5", num_classes=K, in_channels=1)
    kw = {"fit_iterations": 2, "fit_batch_size": 8, "iterations": 3, "batch_size": 8, "progress": False, **kw}
    return S.GenerativeED(learner, **kw)


def test_one_delegator_is_fine_tuned_across_experts_and_fresh_samples_feed_every_step(experts, monkeypatch):
    ed = make()
    ed.train(experts[0])
    first = ed.delegator
    before = {k: v.clone() for k, v in first.state_dict().items()}
    drawn = []
    real = S.GenerativeED._minibatch

    def spy(self, gen, expert_model, expert_classes, **kw):
        x, y, e = real(self, gen, expert_model, expert_classes, **kw)
        drawn.append(x.clone())
        assert set(y.tolist()) <= set(experts[1].classes) and torch.equal(e, torch.ones(8, dtype=torch.int64))
        return x, y, e

    monkeypatch.setattr(S.GenerativeED, "_minibatch", spy)
    ed.train(experts[1])
    assert ed.delegator is first  # fine-tuned in place (D_n from D_{n-1}), not re-created
    assert any(not torch.equal(before[k], v) for k, v in first.state_dict().items())
    assert len(drawn) == 3 and not torch.equal(drawn[0], drawn[1])  # fresh samples at each step
    assert ed.name == "gen-ed" and ed.ex_model and not ed.keeps_data
    assert [h["experience"] for h in ed.history] == [0, 1] and ed.history[1]["generate_s"] > 0
    assert ed.predict(torch.zeros(2, 1, 32, 32)).shape == (2, K)


def test_state_dict_round_trip_keeps_the_delegator_and_the_learner(experts):
    ed = make()
    ed.train(experts[0])
    state = ed.state_dict()
    assert "buffer" not in state and state["delegator_input_shape"] == (1, 32, 32)
    other = make()
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ed.delegator.state_dict().values(),
                                                 other.delegator.state_dict().values()))
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(ed.predict(x), other.predict(x)) and other.experiences_seen == 1
    # A run resumed after the first expert equals an uninterrupted one.
    ed.train(experts[1])
    other.train(experts[1])
    assert torch.equal(ed.predict(x), other.predict(x))


def test_seeds_reproduce(experts):
    a, b = make(seed=3), make(seed=3)
    for e in experts:
        a.train(e)
        b.train(e)
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(a.predict(x), b.predict(x))


@pytest.mark.parametrize("kw,exc,match", [
    ({"preset": "gan"}, ValueError, "preset must be one of"),
    ({"generator_arch": "dcgan"}, ValueError, "generator_arch must be one of"),
    ({"fit_iterations": 0}, ValueError, "fit_iterations"),
    ({"buffer_size": 10}, TypeError, "buffer_size is not an option"),
    ({"synth_options": {"preset": "dafl"}}, TypeError, "may not set"),
    ({"synth_options": [1]}, TypeError, "synth_options must be a dict"),
])
def test_bad_arguments_are_refused(kw, exc, match):
    with pytest.raises(exc, match=match):
        make(**kw)


def test_task_labelled_experts_are_refused(experts):
    e = experts[0]
    tagged = Expert(e.model, e.classes, arch="lenet5", arch_kwargs={"num_classes": K, "in_channels": 1}, task_id=0,
                    meta={**META, "experience": 0})
    with pytest.raises(ValueError, match="single-head"):
        make().train(tagged)


def test_gen_ed_options_are_its_own():
    spec = S.STRATEGIES["gen-ed"]
    assert not spec.keeps_data and {"gen_preset", "gen_arch", "synth_iterations"} <= spec.options
    assert "buffer_size" not in spec.options and "gen_preset" not in S.STRATEGIES["mi-ed"].options
