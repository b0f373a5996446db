"""iCaRL's pieces and the strategy: herding against a plain loop over candidates, NME against brute force,
the penultimate features, the exemplar memory's budget and balance, and ICaRL in the run loop."""

from __future__ import annotations

import pytest
import torch
from _util import band_images

from exml_fast.cl import strategies as S
from exml_fast.cl.engine import run_stream
from exml_fast.cl.exemplars import (ExemplarMemory, class_means, herding, nearest_mean_logits,
                                    penultimate_features)
from exml_fast.cl.scenarios import Experience, Scenario
from exml_fast.models import build_model

K = 6
SPLITS = [(0, 1), (2, 3), (4, 5)]


def herding_reference(features: torch.Tensor, m: int) -> list[int]:
    """iCaRL's herding written plainly: for k = 1..m, try every candidate not chosen yet, keep the one whose
    addition brings the mean of the chosen set closest to the class mean."""
    f = features.double()
    mu = f.mean(0)
    chosen: list[int] = []
    for k in range(1, min(m, f.shape[0]) + 1):
        best, best_d = None, None
        for i in range(f.shape[0]):
            if i in chosen:
                continue
            mean = (f[chosen].sum(0) + f[i]) / k
            d = float(((mu - mean) ** 2).sum())
            if best_d is None or d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("n, d, m", [(30, 5, 10), (50, 16, 50), (7, 3, 20), (1, 4, 1), (12, 2, 0)])
def test_herding_is_the_greedy_mean_matching_order(n, d, m):
    f = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(n + d)), dim=1)
    got = herding(f, m)
    assert got.dtype == torch.int64 and got.tolist() == herding_reference(f, m)
    assert len(set(got.tolist())) == got.numel() == min(m, n)  # no sample twice
    if m > 2:
        assert herding(f, m - 2).tolist() == got[: min(m - 2, n)].tolist()  # a prefix for a smaller budget


def test_herding_argument_errors():
    with pytest.raises(ValueError, match=r"features must be \(N, D\)"):
        herding(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="m must be an int"):
        herding(torch.zeros(3, 2), -1)


def test_nearest_mean_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 8, generator=g)
    means = torch.randn(5, 8, generator=g)
    scores = nearest_mean_logits(f, means)
    brute = torch.stack([torch.stack([-((fi - mu) ** 2).sum() for mu in means]) for fi in f])
    torch.testing.assert_close(scores, brute, rtol=1e-4, atol=1e-4)
    assert torch.equal(scores.argmax(1), torch.cdist(f, means).argmin(1))
    with pytest.raises(ValueError, match="must share D"):
        nearest_mean_logits(f, means[:, :3])


def test_class_means_are_normalised_means_of_each_class():
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 4])
    torch.testing.assert_close(class_means(f, y, [4, 0]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="no sample of class 2"):
        class_means(f, y, [2])


@pytest.mark.parametrize("arch", ["lenet5", "lenet5_bn", "resnet32"])
def test_penultimate_features_are_the_classifier_input(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=K, in_channels=1 if arch.startswith("lenet") else 3).train()
    x = torch.randn(5, 1 if arch.startswith("lenet") else 3, 32, 32)
    grabbed = []
    model.classifier.register_forward_hook(lambda m, i, o: grabbed.append(i[0]))
    raw = penultimate_features(model, x, batch_size=2, normalize=False)
    with torch.no_grad():
        model.eval()
        model(x)
    torch.testing.assert_close(raw, grabbed[-1].flatten(1))
    normed = penultimate_features(model, x)
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(5))
    assert model.training is False  # restored to the mode it had (eval, set above)
    with pytest.raises(ValueError, match="no nn.Linear"):
        penultimate_features(torch.nn.Conv2d(1, 2, 3), x[:, :1])


def test_exemplar_memory_budget_balance_and_state():
    mem = ExemplarMemory(10)
    assert mem.per_class(3) == 3 and mem.per_class(0) == 10
    mem.add(4, torch.arange(5.0).view(5, 1, 1, 1))
    mem.add(1, torch.arange(5.0, 10.0).view(5, 1, 1, 1))
    mem.reduce(mem.per_class(3))
    x, y = mem.tensors()
    assert y.tolist() == [1, 1, 1, 4, 4, 4] and x.flatten().tolist() == [5, 6, 7, 0, 1, 2]  # herding prefixes
    with pytest.raises(ValueError, match="stored already"):
        mem.add(4, x)
    other = ExemplarMemory(10)
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.tensors()[0], x) and other.classes == [1, 4]
    with pytest.raises(ValueError, match="capacity"):
        ExemplarMemory(5).load_state_dict(mem.state_dict())
    with pytest.raises(ValueError, match="capacity"):
        ExemplarMemory(0)


# -- the strategy -----------------------------------------------------------------------------------------------


def _scenario(n=20):
    exps = []
    for i, cls in enumerate(SPLITS):
        tx, ty = band_images(cls, n, seed=i)
        vx, vy = band_images(cls, 10, seed=100 + i)
        exps.append(Experience(i, cls, None, tx, ty, vx, vy))
    return Scenario("toy", "toy", K, (1, 32, 32), (0.5,), (0.5,), False, 0, tuple(range(K)), exps)


def _icarl(**kw):
    torch.manual_seed(5)
    opts = {"epochs": 3, "batch_size": 16, "lr": 0.05, "memory_size": 12, "progress": False, **kw}
    return S.ICaRL(build_model("lenet5", num_classes=K), **opts)


def test_icarl_memory_stays_within_k_class_balanced_and_herded():
    sc = _scenario()
    s = _icarl()
    for i, exp in enumerate(sc):
        s.train(exp)
        seen = [c for e in SPLITS[: i + 1] for c in e]
        x, y = s.memory.tensors()
        assert len(s.memory) <= 12 and s.memory.classes == sorted(seen)
        assert torch.bincount(y, minlength=K)[seen].tolist() == [12 // len(seen)] * len(seen)
    # the last task's exemplars are the herding choice over its features under the final model
    exp = sc[2]
    feats = penultimate_features(s.model, exp.train_x)
    for c in SPLITS[2]:
        idx = (exp.train_y == c).nonzero().flatten()
        expected = exp.train_x[idx[herding(feats[idx], 2)]]
        assert torch.equal(s.memory.tensors()[0][s.memory.tensors()[1] == c], expected)


def test_icarl_trains_on_new_data_and_exemplars():
    sc = _scenario()
    s = _icarl()
    s.train(sc[0])
    x, y = s.train_set(sc[1])
    assert x.shape[0] == sc[1].num_train + 12 and set(y.tolist()) == set(SPLITS[0] + SPLITS[1])


def test_icarl_nme_predictions_are_the_nearest_class_mean():
    sc = _scenario()
    s = _icarl()
    s.train(sc[0])
    s.train(sc[1])
    x = torch.cat([e.test_x for e in sc])
    f = penultimate_features(s.model, x)
    mx, my = s.memory.tensors()
    means = class_means(penultimate_features(s.model, mx), my, [0, 1, 2, 3])
    brute = torch.tensor([0, 1, 2, 3])[torch.cdist(f, means).argmin(1)]
    assert torch.equal(s.predict(x).argmax(1), brute)
    assert torch.isinf(s.predict(x)[:, 4:]).all()  # unseen classes never answered
    cnn = _icarl(classifier="cnn")
    cnn.train(sc[0])
    assert set(cnn.predict(x).argmax(1).tolist()) <= {0, 1}


def test_icarl_remembers_through_its_exemplars():
    res = run_stream(_icarl(epochs=4), None, _scenario(), plots=False, log=None)
    assert res.acc_matrix[-1][0] > 0.8 and res.final_stream_accuracy > 0.8  # the toy bands, exemplars kept
    assert res.meta["keeps_data"] is True


def test_icarl_resume_equals_an_uninterrupted_run(tmp_path):
    sc = _scenario()
    whole = run_stream(_icarl(seed=2), None, sc, out=tmp_path / "a", plots=False, log=None)
    run_stream(_icarl(seed=2), None, sc, out=tmp_path / "b", stop_after=2, plots=False, log=None)
    resumed = run_stream(_icarl(seed=2), None, sc, out=tmp_path / "b", resume=True, plots=False, log=None)
    assert resumed.acc_matrix == whole.acc_matrix


def test_icarl_argument_errors():
    with pytest.raises(ValueError, match="memory_size"):
        _icarl(memory_size=0)
    with pytest.raises(ValueError, match="classifier must be one of"):
        _icarl(classifier="svm")
    with pytest.raises(ValueError, match="form is always 'mc'"):
        _icarl(form="softmax")
