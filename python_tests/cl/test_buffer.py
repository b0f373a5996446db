"""exml_fast.cl.buffer: the ExML sample buffer (Algorithm 1) and class-balanced subsampling."""

from __future__ import annotations

import os

import pytest
import torch

from exml_fast.cl.buffer import SyntheticBuffer, class_balanced_indices


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int, classes, *, start: float = 0.0, shape=(1, 4, 4), soft_k: int | None = None):
    """n samples cycling over ``classes``; x[i] is constant start + i (so rows are traceable)."""
    classes = list(classes)
    y = torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.int64)
    x = (start + torch.arange(n, dtype=torch.float32)).view(n, 1, 1, 1).expand(n, *shape).clone()
    soft = None if soft_k is None else torch.softmax(torch.randn(n, soft_k, generator=_gen(n)), 1)
    return x, y, soft


# ------------------------------------------------------------------ class_balanced_indices

def test_balanced_indices_even_split_and_sorted():
    y = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    idx = class_balanced_indices(y, 9, generator=_gen())
    assert idx.dtype == torch.int64 and idx.shape == (9,)
    assert torch.equal(idx, torch.sort(idx).values) and idx.unique().numel() == 9
    assert torch.bincount(y[idx]).tolist() == [3, 3, 3]


def test_balanced_indices_remainder_goes_to_random_classes():
    y = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    seen = set()
    for seed in range(20):
        counts = torch.bincount(y[class_balanced_indices(y, 10, generator=_gen(seed))], minlength=3)
        assert sorted(counts.tolist()) == [3, 3, 4]
        seen.add(int(counts.argmax()))
    assert len(seen) > 1  # the +1 is not always given to the same class


def test_balanced_indices_small_classes_keep_all_and_rest_is_redistributed():
    # Class 5 has 2 samples, class 7 has 3: shares of 4 (k = 16, 4 classes) are
    # too many for them; the 3 left over go to the two large classes.
    y = torch.tensor([5] * 2 + [7] * 3 + [1] * 20 + [2] * 30)
    idx = class_balanced_indices(y, 16, generator=_gen())
    assert idx.shape == (16,)
    counts = {c: int((y[idx] == c).sum()) for c in (1, 2, 5, 7)}
    assert counts[5] == 2 and counts[7] == 3
    assert sorted([counts[1], counts[2]]) == [5, 6]


def test_balanced_indices_k_at_least_len_returns_all_and_k_zero_none():
    y = torch.tensor([3, 1, 3])
    assert class_balanced_indices(y, 3).tolist() == [0, 1, 2]
    assert class_balanced_indices(y, 10).tolist() == [0, 1, 2]
    assert class_balanced_indices(y, 0).numel() == 0
    assert class_balanced_indices(torch.empty(0, dtype=torch.int64), 4).numel() == 0


def test_balanced_indices_deterministic_from_generator():
    y = torch.randint(0, 7, (200,), generator=_gen(1))
    a = class_balanced_indices(y, 50, generator=_gen(3))
    b = class_balanced_indices(y, 50, generator=_gen(3))
    c = class_balanced_indices(y, 50, generator=_gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_balanced_indices_random_property():
    g = _gen(11)
    for _ in range(200):
        n = int(torch.randint(0, 60, (1,), generator=g))
        n_cls = int(torch.randint(1, 8, (1,), generator=g))
        y = torch.randint(0, n_cls, (n,), generator=g) * 3  # sparse class ids
        k = int(torch.randint(0, 70, (1,), generator=g))
        idx = class_balanced_indices(y, k, generator=g)
        assert idx.shape == (min(k, n),) and idx.unique().numel() == idx.numel()
        if n == 0:
            continue
        classes, avail = torch.unique(y, return_counts=True)
        got = torch.tensor([int((y[idx] == c).sum()) for c in classes])
        # Water filling: no class gets more than one sample above any class
        # that was cut short (a cut class could otherwise have taken one more).
        cut = got < avail
        if bool(cut.any()):
            assert int(got.max()) <= int(got[cut].min()) + 1, (k, avail.tolist(), got.tolist())


@pytest.mark.parametrize(
    "y, k, match",
    [
        (torch.tensor([0.0, 1.0]), 1, "integer"),
        (torch.tensor([[0, 1]]), 1, "1-D"),
        (torch.tensor([0, -1]), 1, ">= 0"),
        (torch.tensor([0, 1]), -1, "k must be an int >= 0"),
        (torch.tensor([0, 1]), 1.5, "k must be an int"),
    ],
)
def test_balanced_indices_errors(y, k, match):
    with pytest.raises(ValueError, match=match):
        class_balanced_indices(y, k)


def test_balanced_indices_rejects_non_generator():
    with pytest.raises(TypeError, match="generator"):
        class_balanced_indices(torch.tensor([0, 1]), 1, generator=3)


# ------------------------------------------------------------------ SyntheticBuffer

def test_empty_buffer_and_quota():
    buf = SyntheticBuffer(10)
    assert buf.capacity == 10 and len(buf) == 0 and buf.x is None and buf.soft_targets is None
    assert buf.y.dtype == torch.int64 and buf.experience.dtype == torch.int64
    assert [buf.quota(i) for i in (1, 2, 3, 4, 11, 100)] == [10, 5, 3, 2, 1, 1]
    assert buf.class_counts() == {}
    with pytest.raises(ValueError, match="i must be an int >= 1"):
        buf.quota(0)
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        SyntheticBuffer(0)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4, generator=_gen())


def test_algorithm1_sizes_and_balance():
    n_cap = 100
    buf = SyntheticBuffer(n_cap)
    g = _gen(5)
    for i in range(1, 6):  # 5 experiences of 2 classes, like Split MNIST
        q = buf.quota(i)
        x, y, _ = _batch(q, [2 * (i - 1), 2 * (i - 1) + 1], start=1000.0 * i)
        buf.update(x, y, experience=i - 1, generator=g)
        assert len(buf) == min(n_cap, sum(buf.quota(j) for j in range(1, i + 1))) or len(buf) == n_cap
        assert len(buf) <= n_cap
        # The newest experience holds exactly N // i, appended last and intact.
        assert int((buf.experience == i - 1).sum()) == q == n_cap // i
        assert torch.equal(buf.x[-q:], x) and torch.equal(buf.y[-q:], y)
        # The old part is class-balanced (every old class had enough samples).
        old = buf.y[: len(buf) - q]
        if old.numel():
            counts = torch.unique(old, return_counts=True)[1]
            assert int(counts.max() - counts.min()) <= 1
    counts = buf.class_counts()
    assert sorted(counts) == list(range(10)) and sum(counts.values()) == n_cap
    assert max(counts.values()) - min(counts.values()) <= 1
    # The rows kept are the rows given (x[i] = start + i encodes the sample).
    for e in range(5):
        rows = buf.x[buf.experience == e][:, 0, 0, 0]
        assert bool(((rows >= 1000.0 * (e + 1)) & (rows < 1000.0 * (e + 1) + n_cap)).all())


def test_property_len_never_exceeds_capacity():
    g = _gen(7)
    for trial in range(60):
        cap = int(torch.randint(1, 23, (1,), generator=g))
        buf = SyntheticBuffer(cap)
        for i in range(1, int(torch.randint(1, 9, (1,), generator=g)) + 1):
            m = int(torch.randint(0, cap + 1, (1,), generator=g)) if trial % 2 else buf.quota(i)
            n_cls = int(torch.randint(1, 5, (1,), generator=g))
            y = torch.randint(0, n_cls, (m,), generator=g) + 10 * i
            before = len(buf)
            buf.update(torch.randn(m, 1, 2, 2, generator=g), y, experience=i, generator=g)
            assert len(buf) == min(cap, before + m)
            assert buf.x.shape[0] == buf.y.shape[0] == buf.experience.shape[0] == len(buf)
            assert int((buf.experience == i).sum()) == m


def test_update_deterministic_from_generator():
    def run(seed):
        buf = SyntheticBuffer(17)
        g = _gen(seed)
        for i in range(1, 5):
            x, y, _ = _batch(buf.quota(i), range(3 * i, 3 * i + 3), start=100.0 * i)
            buf.update(x, y, experience=i, generator=g)
        return buf.x.clone(), buf.sample(5, generator=g)

    (xa, ia), (xb, ib), (xc, _) = run(1), run(1), run(2)
    assert torch.equal(xa, xb) and torch.equal(ia, ib)
    assert not torch.equal(xa, xc)


def test_soft_targets_kept_with_their_rows_and_mixing_is_an_error():
    buf = SyntheticBuffer(8)
    x, y, s = _batch(6, [0, 1], soft_k=4)
    buf.update(x, y, experience=0, soft_targets=s, generator=_gen())
    x2, y2, s2 = _batch(4, [2, 3], start=50.0, soft_k=4)
    buf.update(x2, y2, experience=1, soft_targets=s2, generator=_gen())
    assert buf.soft_targets.shape == (8, 4) and buf.soft_targets.dtype == torch.float32
    for row in range(8):  # each soft target row still belongs to its x row
        v = int(buf.x[row, 0, 0, 0])
        expected = s2[v - 50] if v >= 50 else s[v]
        assert torch.equal(buf.soft_targets[row], expected)
    with pytest.raises(ValueError, match="soft_targets"):
        buf.update(x2, y2, experience=2)
    with pytest.raises(ValueError, match="columns"):
        buf.update(x2, y2, experience=2, soft_targets=torch.rand(4, 5))
    plain = SyntheticBuffer(8)
    plain.update(x2, y2, experience=0)
    with pytest.raises(ValueError, match="soft_targets"):
        plain.update(x2, y2, experience=1, soft_targets=s2)
    assert len(plain) == 4  # a refused update changes nothing


def test_update_stores_cpu_float32_detached():
    buf = SyntheticBuffer(4)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    buf.update(x, torch.tensor([0, 1, 2], dtype=torch.int32), experience=0)
    assert buf.x.dtype == torch.float32 and not buf.x.requires_grad and buf.x.device.type == "cpu"
    assert buf.y.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(5, 1, 2, 2), y=torch.zeros(5, dtype=torch.int64)), "do not fit a buffer of capacity 4"),
        (dict(x=torch.randn(2, 1, 3, 3), y=torch.zeros(2, dtype=torch.int64)), r"shape \(1, 3, 3\)"),
        (dict(x=torch.randn(2, 4), y=torch.zeros(2, dtype=torch.int64)), r"\(m, C, H, W\)"),
        (dict(x=torch.randn(2, 1, 2, 2), y=torch.zeros(3, dtype=torch.int64)), "one label per sample"),
        (dict(x=torch.randn(2, 1, 2, 2), y=torch.zeros(2)), "integer"),
        (dict(x=torch.full((2, 1, 2, 2), float("nan")), y=torch.zeros(2, dtype=torch.int64)), "non-finite"),
        (dict(x=torch.randn(2, 1, 2, 2), y=torch.zeros(2, dtype=torch.int64), experience=-1), "experience"),
        (dict(x=torch.randn(2, 1, 2, 2), y=torch.zeros(2, dtype=torch.int64), soft_targets=torch.rand(3, 2)),
         r"soft_targets must be a float tensor of shape \(2, K\)"),
    ],
)
def test_update_errors(kwargs, match):
    buf = SyntheticBuffer(4)
    buf.update(torch.randn(1, 1, 2, 2), torch.tensor([0]), experience=0)
    kwargs.setdefault("experience", 1)
    with pytest.raises(ValueError, match=match):
        buf.update(**kwargs)
    assert len(buf) == 1


def test_sample_permutation_per_pass():
    buf = SyntheticBuffer(10)
    x, y, _ = _batch(10, range(5))
    buf.update(x, y, experience=0)
    g = _gen(2)
    draws = torch.cat([buf.sample(4, generator=g) for _ in range(5)])  # 20 = two passes
    assert draws.dtype == torch.int64 and draws.shape == (20,)
    assert sorted(draws[:10].tolist()) == list(range(10))
    assert sorted(draws[10:].tolist()) == list(range(10))
    big = buf.sample(25, generator=g)  # larger than the buffer: spans passes
    assert big.shape == (25,) and int(big.max()) < 10
    # update() restarts the pass; a tiny buffer still gives full batches.
    one = SyntheticBuffer(1)
    one.update(x[:1], y[:1], experience=0)
    assert one.sample(3, generator=g).tolist() == [0, 0, 0]


def test_state_dict_round_trip_continues_sampling(tmp_path):
    buf = SyntheticBuffer(12)
    g = _gen(9)
    for i in range(1, 4):
        x, y, s = _batch(buf.quota(i), [i, i + 10], start=100.0 * i, soft_k=3)
        buf.update(x, y, experience=i, soft_targets=s, generator=g)
    buf.sample(5, generator=g)
    path = tmp_path / "b" / "buffer.pt"
    buf.save(path)
    assert os.listdir(tmp_path / "b") == ["buffer.pt"]
    back = SyntheticBuffer.load(path)
    assert back.capacity == 12 and len(back) == len(buf)
    for name in ("x", "y", "experience", "soft_targets"):
        assert torch.equal(getattr(back, name), getattr(buf, name)), name
    g1, g2 = _gen(4), _gen(4)
    assert torch.equal(buf.sample(9, generator=g1), back.sample(9, generator=g2))
    other = SyntheticBuffer(12)
    other.load_state_dict(buf.state_dict())
    assert other.class_counts() == buf.class_counts()


def test_empty_buffer_round_trip(tmp_path):
    SyntheticBuffer(3).save(tmp_path / "e.pt")
    back = SyntheticBuffer.load(tmp_path / "e.pt")
    assert back.capacity == 3 and len(back) == 0 and back.x is None


def test_load_state_dict_validation():
    buf = SyntheticBuffer(4)
    x, y, _ = _batch(3, [0, 1])
    buf.update(x, y, experience=0)
    good = buf.state_dict()

    def bad(**changes):
        s = dict(good)
        s.update(changes)
        return s

    cases = [
        (bad(capacity=5), "capacity 5"),
        (bad(format="other"), "not a SyntheticBuffer state"),
        (bad(version=99), "version"),
        (bad(y=torch.zeros(2, dtype=torch.int64)), "experience has 3 entries for 2 labels"),
        (bad(x=torch.zeros(2, 1, 4, 4)), "x has 2 samples for 3 labels"),
        (bad(y=torch.zeros(3)), "y must be a 1-D torch.int64"),
        (bad(soft_targets=torch.zeros(2, 3)), "soft_targets has 2 rows"),
        (bad(perm=torch.tensor([0, 0, 1])), "permutation"),
        (bad(pos=7), "pos"),
    ]
    for state, match in cases:
        with pytest.raises(ValueError, match=match):
            SyntheticBuffer(4).load_state_dict(state)
    over = SyntheticBuffer(2)
    s = dict(good, capacity=2)
    with pytest.raises(ValueError, match="more than its capacity 2"):
        over.load_state_dict(s)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        SyntheticBuffer.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="junk.pt"):
        SyntheticBuffer.load(junk)
    other = tmp_path / "other.pt"
    torch.save({"something": 1}, other)
    with pytest.raises(ValueError, match="other.pt"):
        SyntheticBuffer.load(other)
    buf = SyntheticBuffer(4)
    buf.update(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), experience=0)
    state = buf.state_dict()
    state["x"] = torch.zeros(3, 1, 2, 2)
    lying = tmp_path / "lying.pt"
    torch.save(state, lying)
    with pytest.raises(ValueError, match="lying.pt.*x has 3 samples"):
        SyntheticBuffer.load(lying)
