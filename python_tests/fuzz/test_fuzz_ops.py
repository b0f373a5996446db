"""Fuzzing the fused ops (python_tests/fuzz/_fuzz.py has the rule): each case builds a valid call from
random sizes, then, most of the time, spoils one argument — another shape, dtype or rank, NaN or Inf
values, a zero or negative size, a value of the wrong type — and calls the op on the CPU."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from _fuzz import check_error, count
from hypothesis import given, settings
from hypothesis import strategies as st

from exml_fast import ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]


def _tensor(seed: int, shape, dtype=torch.float32, fill="normal") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    if fill == "positive":
        x = x.abs() + 0.1
    elif fill == "nan" and x.numel():
        x.view(-1)[0] = math.nan
    elif fill == "inf" and x.numel():
        x.view(-1)[-1] = -math.inf
    elif fill == "zeros":
        x = torch.zeros_like(x)
    return x.to(dtype) if dtype != torch.bool else x > 0


def _probs(seed: int, b: int, k: int) -> torch.Tensor:
    return torch.softmax(_tensor(seed, (b, k)), 1)


# -- valid calls, from sizes ----------------------------------------------------------------------------


def _valid(op: str, s: int, b: int, c: int, h: int, w: int, k: int):
    img = _tensor(s, (b, c, h, w))
    if op == "augment":
        return (img,), {"max_shift": h // 2, "flip": True, "pad_crop": 1}
    if op == "augment_with_params":
        params = ops.draw_augment_params(b, max_shift=1, flip=True, pad_crop=1,
                                         generator=torch.Generator().manual_seed(s))
        return (img, params), {"pad_crop": 1}
    if op == "draw_augment_params":
        return (b,), {"max_shift": 1, "flip": True, "pad_crop": 2}
    if op == "bn_stats":
        return (img,), {}
    if op == "bn_stats_loss":
        return (img, _tensor(s + 1, (c,)), _tensor(s + 2, (c,), fill="positive")), {"form": "l2", "eps": 1e-5}
    if op == "class_similarity":
        return (_tensor(s, (k, c * 3)),), {"floor": 1e-4}
    if op == "dirichlet_targets":
        return (_tensor(s, (b, k), fill="positive"),), {"generator": torch.Generator().manual_seed(s)}
    if op == "ed_class_table":
        return (torch.tensor([0]), torch.tensor([1]) if k > 1 else None, k), {}
    if op == "ed_loss":
        labels = torch.zeros(b, dtype=torch.int64)
        return (_tensor(s, (b, k)), labels), {"expert_logits": _tensor(s + 1, (b, k)),
                                              "expert_classes": torch.tensor([0])}
    if op == "frozen_bn_stats":
        return (img, _tensor(s + 1, (c,)), _tensor(s + 2, (c,))), {}
    if op == "image_priors":
        return (img,), {"blur_kernel_size": 3, "per_sample": bool(s % 2)}
    if op == "js_divergence":
        return (_tensor(s, (b, k)), _tensor(s + 1, (b, k))), {"temperature": 2.0}
    if op == "kd_loss":
        return (_tensor(s, (b, k)), _tensor(s + 1, (b, k))), {"temperature": 2.0}
    if op == "soft_target_cross_entropy":
        return (_tensor(s, (b, k)), _probs(s + 1, b, k)), {"temperature": 1.0}
    if op == "tanh":
        return (img,), {}
    if op == "window_pool":
        return (img,), {"kernel_size": 2, "mode": "max"}
    raise AssertionError(op)


OPS = ["augment", "augment_with_params", "draw_augment_params", "bn_stats", "bn_stats_loss", "class_similarity",
       "dirichlet_targets", "ed_class_table", "ed_loss", "frozen_bn_stats", "image_priors", "js_divergence",
       "kd_loss", "soft_target_cross_entropy", "tanh", "window_pool"]

BAD_SCALARS = [0, -1, -0.5, math.nan, math.inf, "x", None, True, 1000, (1, 2, 3)]  # 1000: large, not huge


@st.composite
def _case(draw, op: str):
    s = draw(st.integers(0, 10_000))
    b, c, h, w, k = (draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(2, 8)),
                     draw(st.integers(2, 8)), draw(st.integers(1, 7)))
    args, kwargs = _valid(op, s, b, c, h, w, k)
    args, kwargs = list(args), dict(kwargs)
    spoil = draw(st.sampled_from(["none", "shape", "dtype", "nan", "inf", "empty", "scalar", "scalar", "type"]))
    slots = [("a", i) for i, v in enumerate(args)] + [("k", n) for n in kwargs]
    if spoil != "none" and slots:
        kind, key = draw(st.sampled_from(slots))
        old = args[key] if kind == "a" else kwargs[key]
        if isinstance(old, torch.Tensor) and spoil in ("shape", "dtype", "nan", "inf", "empty"):
            if spoil == "shape":
                new = _tensor(s, draw(st.lists(st.integers(0, 4), max_size=5)), old.dtype)
            elif spoil == "dtype":
                new = old.to(draw(st.sampled_from(DTYPES)))
            elif spoil == "empty":
                new = old[:0]
            else:
                new = _tensor(s, old.shape, old.dtype if old.is_floating_point() else torch.float32, fill=spoil)
        elif spoil == "type":
            new = draw(st.sampled_from([[1.0, 2.0], "tensor", 3, None]))
        else:
            new = draw(st.sampled_from(BAD_SCALARS))
        if kind == "a":
            args[key] = new
        else:
            kwargs[key] = new
    return args, kwargs


def _finite_inputs(args, kwargs) -> bool:
    for v in [*args, *kwargs.values()]:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
    return True


def _outputs(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=120)
@given(data=st.data())
def test_every_op_returns_finite_or_refuses_by_name(op, data):
    fn = getattr(ops, op)
    count(f"ops.{op}")
    args, kwargs = data.draw(_case(op))
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the rule decides
        check_error(e, [op, *inspect.signature(fn).parameters])
        return
    if _finite_inputs(args, kwargs):
        for t in _outputs(out):
            if t.is_floating_point():
                assert bool(torch.isfinite(t).all()), f"{op}: finite inputs gave a non-finite result"
