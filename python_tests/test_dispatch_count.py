"""exml_fast._utils.dispatch_count: the op counts issue 41 measures a step's GPU cost with on the CPU. Exact counts
of small known sequences, views and markers apart, host syncs by kind and site, determinism, custom ops counted
once by the dispatch mode and into by the profiler, and clear errors on misuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import exml_fast
from exml_fast._utils.dispatch_count import DispatchCounter, LeafOpCounter, count_dispatch, count_leaf_ops


# A custom op implemented in Python with three ATen ops and one host read inside: what the dispatch mode must
# count once and the profiler must see into.
@torch.library.custom_op("dispatch_count_test::square_plus", mutates_args=())
def square_plus(x: torch.Tensor) -> torch.Tensor:
    y = x * x + x
    y.sum().item()  # a host sync inside the op's implementation
    return y


@square_plus.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tensors():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)


def test_counts_a_known_sequence_exactly():
    a, b = tensors()
    with DispatchCounter() as c:
        s = (a + b).mul(b).sum()
    assert dict(c.ops) == {"aten::add": 1, "aten::mul": 1, "aten::sum": 1}
    assert (c.total_ops, c.total_views, c.total_syncs) == (3, 0, 0)
    assert c.summary() == {"ops": 3, "views": 0, "markers": 0, "syncs": 0,
                           "by_op": {"aten::add": 1, "aten::mul": 1, "aten::sum": 1}, "views_by_op": {},
                           "markers_by_op": {}, "syncs_by_kind": {}, "sync_sites": {}}
    assert s.shape == ()


def test_backward_ops_are_counted():
    a, _ = tensors()
    w = a.clone().requires_grad_(True)
    with DispatchCounter() as forward_only:
        (w * 3).sum()
    with DispatchCounter() as both:
        (w * 3).sum().backward()
    assert forward_only.total_ops == 2
    # the backward: ones_like (the seed gradient), mul (MulBackward0), and the gradient's accumulation
    assert both.ops["aten::mul"] == 2 and both.ops["aten::ones_like"] == 1
    assert both.total_ops > forward_only.total_ops


def test_views_are_listed_apart_and_in_place_ops_are_ops():
    a, _ = tensors()
    with DispatchCounter() as c:
        a.t()
        a.view(12)
        a.unsqueeze(0).expand(2, 3, 4)
        a.detach()
        a.t().reshape(12)  # not viewable: a copy (clone) and an _unsafe_view of it
        a.clone().unsqueeze_(0)  # an in-place view: shape metadata only
        a.clone().add_(1)  # an in-place op writes data: an op
    assert dict(c.views) == {"aten::t": 2, "aten::view": 1, "aten::unsqueeze": 1, "aten::expand": 1,
                             "aten::detach": 1, "aten::_unsafe_view": 1, "aten::unsqueeze_": 1}
    assert dict(c.ops) == {"aten::clone": 3, "aten::add_": 1}


def test_host_syncs_are_counted_by_kind_and_site():
    a, _ = tensors()
    with DispatchCounter() as c:
        a.sum().item()
        bool(a.sum() > 0)
        float(a[0, 0])
        a.nonzero()
        a[a > 0]
        torch.equal(a, a)
        a.tolist()
        a.numpy()
    assert dict(c.syncs) == {"aten::_local_scalar_dense": 3, "aten::nonzero": 1, "aten::index (boolean mask)": 1,
                             "aten::equal": 1, "Tensor.tolist": 1, "Tensor.numpy": 1}
    # the ops among them are ops too; Python-level reads dispatch nothing on the CPU
    assert c.ops["aten::_local_scalar_dense"] == 3 and c.ops["aten::nonzero"] == 1
    assert "tolist" not in str(dict(c.ops))
    assert sum(c.sync_sites.values()) == c.total_syncs == 8
    assert all(site.split(":")[0].endswith("test_dispatch_count.py") for site in c.sync_sites)
    assert any("(test_host_syncs_are_counted_by_kind_and_site): Tensor.tolist" in s for s in c.sync_sites)


def test_an_index_without_a_mask_and_a_repeat_with_its_size_do_not_sync():
    a, _ = tensors()
    with DispatchCounter() as c:
        a[torch.tensor([0, 2])]
        torch.repeat_interleave(a.flatten(), torch.full((12,), 2), output_size=24)
    assert c.total_syncs == 0 and c.ops["aten::index"] == 1


def small_step(model: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()


@pytest.fixture
def model_and_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).eval()
    model.requires_grad_(False)
    return model, torch.randn(2, 1, 6, 6).requires_grad_(True)


def test_both_counts_are_the_same_over_two_runs(model_and_input):
    model, x = model_and_input
    small_step(model, x)  # warm-up
    first, second = count_dispatch(small_step, model, x), count_dispatch(small_step, model, x)
    assert first.summary() == second.summary()
    assert first.total_ops > 5 and first.ops["aten::convolution"] == 1
    leaves = [count_leaf_ops(small_step, model, x) for _ in range(2)]
    assert leaves[0].summary() == leaves[1].summary()
    assert leaves[0].total > 5


def test_a_custom_op_counts_once_in_the_dispatch_mode_and_is_seen_into_by_the_profiler():
    a, _ = tensors()
    square_plus(a)  # warm-up
    with DispatchCounter() as c:
        square_plus(a)
    # the op itself, none of the ops (or the sync) its implementation runs
    assert dict(c.ops) == {"dispatch_count_test::square_plus": 1}
    assert c.total_syncs == 0
    with LeafOpCounter() as p:
        square_plus(a)
    # the profiler sees the nested ops and the nested sync; the custom op itself is no leaf
    assert p.ops["aten::mul"] == 1 and p.ops["aten::add"] == 1 and p.ops["aten::_local_scalar_dense"] == 1
    assert "dispatch_count_test::square_plus" not in p.ops
    assert dict(p.syncs) == {"aten::_local_scalar_dense": 1}


@pytest.mark.skipif(not exml_fast.has_ops(), reason="needs the compiled exml_fast ops")
def test_an_exml_fast_op_and_its_backward_count_once_each():
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    gm, gv = torch.ones(3), torch.ones(3)

    def fwd_bwd():
        torch.autograd.grad(exml_fast.ops.bn_stats(x), x, (gm, gv))

    fwd_bwd()
    c = count_dispatch(fwd_bwd)
    assert c.ops["exml_fast::bn_stats"] == 1 and c.ops["exml_fast::_bn_stats_backward"] == 1
    assert c.total_ops == 2
    p = count_leaf_ops(fwd_bwd)
    assert p.ops["exml_fast::bn_stats"] == 1  # its kernel only allocates with at::empty: a leaf


def test_the_profiler_count_leaves_out_views_allocations_and_no_op_composites():
    a, b = tensors()
    with LeafOpCounter() as p:
        a.t()
        a.view(12)
        a.to(torch.float32)  # returns a itself
        a.contiguous()  # likewise
        torch.empty(3)
        torch.empty_like(a)
    assert p.total == 0 and not p.ops
    with LeafOpCounter() as p:
        a + b
        a.t().contiguous()  # a copy
        torch.zeros(3)  # an allocation and a fill
    assert p.total == 3
    assert p.ops["aten::add"] == 1 and p.ops["aten::copy_"] == 1


def test_the_profiler_counts_each_sync_once_at_its_innermost_op():
    a, _ = tensors()
    with LeafOpCounter() as p:
        bool(a.sum() > 0)  # aten::is_nonzero runs aten::item, which runs aten::_local_scalar_dense
        a.sum().item()
    assert dict(p.syncs) == {"aten::_local_scalar_dense": 2}


def test_the_profiler_count_sees_a_composite_s_parts():
    a, b = tensors()
    with DispatchCounter() as c:
        torch.nn.functional.linear(a, b)  # decomposed before the dispatch mode: t (a view) + mm
    with LeafOpCounter() as p:
        torch.nn.functional.linear(a, b)
    assert dict(c.ops) == {"aten::mm": 1}
    assert p.ops["aten::mm"] == 1 and "aten::linear" not in p.ops


def test_optimiser_markers_are_listed_apart():
    x = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1)
    x.grad = torch.ones(3)
    with DispatchCounter() as c:
        opt.step()
    assert c.markers and all(k.startswith("profiler::") for k in c.markers)
    assert not any(k.startswith("profiler::") for k in c.ops)


def test_the_tallies_accumulate_over_reentry_and_reset_clears_them():
    a, b = tensors()
    c = DispatchCounter()
    for _ in range(2):
        with c:
            a + b
    assert c.ops["aten::add"] == 2
    c.reset()
    assert c.total_ops == c.total_views == c.total_syncs == 0


def test_misuse_is_refused_with_the_owner_and_argument():
    c = DispatchCounter()
    with c:
        with pytest.raises(RuntimeError, match="DispatchCounter: this counter is already active"):
            c.__enter__()
    with pytest.raises(RuntimeError, match="DispatchCounter: __exit__ without a matching __enter__"):
        c.__exit__(None, None, None)
    p = LeafOpCounter()
    with p:
        with pytest.raises(RuntimeError, match="LeafOpCounter: this counter is already active"):
            p.__enter__()
    with pytest.raises(RuntimeError, match="LeafOpCounter: __exit__ without a matching __enter__"):
        p.__exit__(None, None, None)
    with pytest.raises(TypeError, match="count_dispatch: fn must be callable; got int"):
        count_dispatch(3)
    with pytest.raises(TypeError, match="count_leaf_ops: fn must be callable; got str"):
        count_leaf_ops("step")


def test_an_error_inside_the_block_stops_counting():
    a, b = tensors()
    c, p = DispatchCounter(), LeafOpCounter()
    with pytest.raises(ValueError, match="inside"):
        with c:
            a + b
            raise ValueError("inside")
    with pytest.raises(ValueError, match="inside"):
        with p:
            raise ValueError("inside")
    assert not c.active and not p.active
    a * b  # after the block: not counted
    assert dict(c.ops) == {"aten::add": 1}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_copies_to_the_host_sync_once():
    x = torch.randn(3, device="cuda")
    with DispatchCounter() as c:
        x.cpu()
        x.tolist()  # a copy to the host inside: the read's sync, not a second one
        x.sum().item()
    assert dict(c.syncs) == {"copy to host (aten::_to_copy)": 1, "Tensor.tolist": 1,
                             "aten::_local_scalar_dense": 1}
