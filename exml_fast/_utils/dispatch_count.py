"""Counting the ops a piece of code dispatches: its GPU cost measured on a CPU-only machine.

On a GPU a small step is bound by its launches, one (or a few) per op, and by its host syncs, not by its
arithmetic; both show on the CPU as the ops the code dispatches. Two counts, both deterministic for fixed code,
model and input shapes:

:class:`DispatchCounter` (a ``TorchDispatchMode``)
    Every op call that reaches the dispatcher's Python key while the counter is active, forward and backward
    (the autograd engine's calls are seen), by op name (``func._schema.name``, e.g. ``aten::add`` or
    ``exml_fast::bn_stats``; overloads pooled), in four tallies:

    - ``ops``: every op that is neither a view nor a marker (below), pure allocations (``empty``) included;
      ``total_ops`` is their sum, the launch proxy;
    - ``views``: ops whose schema returns an alias of an input without writing it (``view``, ``t``,
      ``transpose``, ``permute``, ``expand``, ``select``, ``slice``, ``unsqueeze``, ``squeeze``, ``split``,
      ``detach``, ``alias``, ``lift_fresh`` ...: ``OpOverload.is_view``), plus ``aten::_unsafe_view``, a view
      whose schema does not say so, and ops tagged ``inplace_view`` (``as_strided_``, ``unsqueeze_``). Listed
      apart, not in ``ops``: they launch nothing. In-place ops (``add_``) return a *written* alias and are ops;
    - ``markers``: profiler range markers dispatched as ops (the ``profiler`` namespace: torch.optim wraps
      ``step()`` and ``zero_grad()`` in ``record_function``), listed apart: host bookkeeping;
    - ``syncs``: host syncs, a subset of ``ops`` plus the Python-level reads below: ``_local_scalar_dense``
      (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``), ops whose output size depends on the data
      (``nonzero``, ``masked_select``, ``unique`` and its variants, ``bincount``, ``repeat_interleave`` without
      ``output_size``, and ``index`` / ``index_put_`` with a boolean mask), ops that return a Python value
      (``equal``, ``allclose``, ``is_nonzero``), copies to the CPU from another device (``.cpu()``,
      ``.to("cpu")``), and ``Tensor.tolist()`` / ``Tensor.numpy()`` / ``numpy.asarray(t)`` (seen through a
      ``TorchFunctionMode``: on a CPU tensor they dispatch no op at all). On the CPU every tensor is on the
      host, so a sync is recognised by the op, not by the device: an ``.item()`` counts whether or not the
      tensor would live on the GPU (an optimiser's step counter stays on the CPU there, and reading it costs
      the GPU nothing). ``sync_sites`` says where each came from (the innermost Python frame outside torch).

    What it does not see: the ops an op runs *inside* its kernel. The mode is popped while a dispatched call
    runs, so the ``at::`` calls made by a C++ kernel (a custom op's, or a composite such as
    ``aten::convolution``'s choice of backend) and the calls of a Python custom-op implementation are not
    counted: a custom op counts once, however many ops it runs. ``CompositeImplicitAutograd`` ops
    (``cross_entropy``, ``linear``, ``reshape``, ``item``) are decomposed before the Python key, so their
    parts are counted instead of them.

:class:`LeafOpCounter` (``torch.profiler``, CPU activity)
    Every op event the profiler records, nested ones included, reduced to the *working leaves*: op events
    (``aten::``, ``exml_fast::`` and any other registered namespace) none of whose descendants is a working
    op, that are not views (by name: every functional overload returns an alias, e.g. ``aten::to`` or
    ``aten::contiguous`` when they return their input; a copy they make shows as its own leaf), not pure
    allocations or metadata changes (``empty``, ``empty_like``, ``empty_strided``, ``new_empty``,
    ``new_empty_strided``, ``empty_permuted``, ``resize_``, ``resize_as_``, ``set_``) and not
    ``CompositeImplicitAutograd`` ops (which do no work of their own: everything they do is in other ops). A
    custom op whose kernel only allocates its outputs with ``at::empty`` is a leaf; an op whose kernel calls a
    working op counts as that op instead of itself (on the CPU an ``aten::mul`` by a Python scalar shows as the
    ``aten::copy_`` that converts the scalar, an ``aten::sum`` as the ``aten::fill_`` that zeroes its output, a
    kernel that makes its input contiguous as that ``aten::copy_``). It is a proxy for the kernel launches that
    sees into composites and custom ops: the total, not the names, is what it measures. Apart, ``syncs``
    tallies the innermost events of :data:`SYNC_OPS` at any depth: the host syncs made inside kernels too,
    which the dispatch mode cannot see (they are among the leaves as well). Python-level events (autograd nodes,
    optimiser ranges, ``record_function``) are not ops and only group their children.

Use::

    with DispatchCounter() as c:
        step()
    c.total_ops, c.total_views, c.total_syncs, c.ops.most_common(10), c.sync_sites

    with LeafOpCounter() as p:
        step()
    p.total, p.ops.most_common(10)

A counter may be entered again after it exited (the tallies accumulate; ``reset()`` clears them); entering it
while it is active is an error. Count one run with each rather than nesting them: under the dispatch mode
the profiler would also record the mode's own Python calls.
"""

from __future__ import annotations

import collections
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ALLOCATION_OPS", "DispatchCounter", "LeafOpCounter", "SYNC_OPS", "count_dispatch", "count_leaf_ops"]

#: Ops that always sync the host with the device: a Python value, or an output whose size depends on the data.
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::allclose",
    "aten::nonzero", "aten::masked_select", "aten::bincount",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
})
#: Ops that only allocate (no kernel runs on a GPU); the profiler count leaves them out.
ALLOCATION_OPS = frozenset({
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::empty_permuted", "aten::resize_", "aten::resize_as_", "aten::set_",
})
# Views whose schema carries no alias annotation.
_UNANNOTATED_VIEWS = frozenset({"aten::_unsafe_view"})
# Ops that sync only with a boolean mask among their indices (it is turned into indices by nonzero).
_MASK_INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
# Ops that only mark a profiler range (torch.optim wraps step() and zero_grad() in one each).
_MARKER_NAMESPACE = "profiler::"
# Python-level reads of a tensor's values into host memory (they dispatch nothing for a CPU tensor).
_HOST_READ_METHODS = frozenset({"tolist", "numpy", "__array__"})
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)


def _check_callable(fn: Any, owner: str) -> None:
    if not callable(fn):
        raise TypeError(f"{owner}: fn must be callable; got {type(fn).__name__}")


def _call_site() -> str:
    """``path:line (function)`` of the innermost Python frame outside torch and this module; '?' if none."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_TORCH_DIR) and path != _THIS_FILE:
            return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


def _is_view(overload) -> bool:
    """Whether an op overload only makes or changes a view: it returns an alias of an input without writing
    its data (``view``, ``t``, ``detach``...), is tagged ``inplace_view`` (``as_strided_``, ``t_``,
    ``unsqueeze_``: they change a tensor's shape in place), or is ``aten::_unsafe_view``."""
    return (overload.is_view or torch.Tag.inplace_view in overload.tags
            or overload._schema.name in _UNANNOTATED_VIEWS)


def _on_other_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta")


def _is_mask(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _sync_kind(name: str, args: tuple, kwargs: dict) -> str | None:
    """The name a sync of this call is tallied under, or None when the call does not sync."""
    if name in SYNC_OPS:
        return name
    if name in _MASK_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return f"{name} (boolean mask)" if any(_is_mask(i) for i in indices or ()) else None
    if name == "aten::repeat_interleave":
        return name if kwargs.get("output_size") is None else None
    if name == "aten::_to_copy":
        device = kwargs.get("device")
        to_host = device is not None and torch.device(device).type == "cpu"
        return "copy to host (aten::_to_copy)" if to_host and _on_other_device(args[0]) else None
    if name == "aten::copy_":
        to_host = isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"
        return "copy to host (aten::copy_)" if to_host and _on_other_device(args[1]) else None
    return None


class _CountingMode(TorchDispatchMode):
    """The dispatch mode of a DispatchCounter: tallies each call, then runs it."""

    def __init__(self, counter: DispatchCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        name = func._schema.name
        if _is_view(func):
            c.views[name] += 1
        elif name.startswith(_MARKER_NAMESPACE):
            c.markers[name] += 1
        else:
            c.ops[name] += 1
            kind = _sync_kind(name, args, kwargs)
            # A copy made by Tensor.tolist() / .numpy() is that read's sync, already counted.
            if kind is not None and not (c._host_read_depth and kind.startswith("copy to host")):
                c._sync(kind)
        return func(*args, **kwargs)


class _HostReadMode(TorchFunctionMode):
    """The function mode of a DispatchCounter: tallies Tensor.tolist() / .numpy() (no op on the CPU)."""

    def __init__(self, counter: DispatchCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _HOST_READ_METHODS or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        c = self.counter
        c._sync(f"Tensor.{name}")
        c._host_read_depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            c._host_read_depth -= 1


class DispatchCounter:
    """Counts the ops dispatched while it is active (a context manager); see the module docstring.

    Attributes (``collections.Counter`` by op name, e.g. ``"aten::mul"``):
        ops: the ops dispatched that are neither views nor markers, syncing ones included.
        views: view ops dispatched (not in ``ops``).
        markers: profiler range markers dispatched as ops (``profiler::_record_function_enter_new`` /
            ``_record_function_exit``: torch.optim wraps ``step()`` and ``zero_grad()`` in one each); not in
            ``ops``: host bookkeeping, no launch.
        syncs: host syncs by kind: an op name from ``ops``, ``"<op> (boolean mask)"``,
            ``"copy to host (aten::_to_copy)"`` / ``"(aten::copy_)"``, or ``"Tensor.tolist"`` /
            ``"Tensor.numpy"`` / ``"Tensor.__array__"`` (Python-level reads, which are not in ``ops``).
        sync_sites: ``"path:line (function): kind"`` of each sync, the innermost Python frame outside torch
            (a sync in a C++ autograd function shows the Python line that ran the backward).

    Not seen: the ops a dispatched op runs inside its own kernel (a custom op's C++ or Python implementation,
    a composite kernel's backend calls); :class:`LeafOpCounter` sees those.
    """

    def __init__(self) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.views: collections.Counter[str] = collections.Counter()
        self.markers: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.sync_sites: collections.Counter[str] = collections.Counter()
        self._host_read_depth = 0
        self._modes: tuple[_HostReadMode, _CountingMode] | None = None

    @property
    def active(self) -> bool:
        """Whether the counter is counting."""
        return self._modes is not None

    @property
    def total_ops(self) -> int:
        """The ops dispatched that are neither views nor markers (the launch proxy)."""
        return sum(self.ops.values())

    @property
    def total_views(self) -> int:
        return sum(self.views.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def _sync(self, kind: str) -> None:
        self.syncs[kind] += 1
        self.sync_sites[f"{_call_site()}: {kind}"] += 1

    def __enter__(self) -> DispatchCounter:
        if self._modes is not None:
            raise RuntimeError("DispatchCounter: this counter is already active; a counter does not nest in "
                               "itself (use a second DispatchCounter)")
        modes = (_HostReadMode(self), _CountingMode(self))
        modes[0].__enter__()
        try:
            modes[1].__enter__()
        except BaseException:
            modes[0].__exit__(*sys.exc_info())
            raise
        self._modes = modes
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._modes is None:
            raise RuntimeError("DispatchCounter: __exit__ without a matching __enter__")
        modes, self._modes = self._modes, None
        try:
            modes[1].__exit__(exc_type, exc, tb)
        finally:
            modes[0].__exit__(exc_type, exc, tb)
        return False

    def reset(self) -> None:
        """Clears the tallies (also while active)."""
        for tally in (self.ops, self.views, self.markers, self.syncs, self.sync_sites):
            tally.clear()

    def summary(self) -> dict[str, Any]:
        """The counts as plain data: ``{"ops", "views", "markers", "syncs"}`` totals, and ``"by_op"``,
        ``"views_by_op"``, ``"markers_by_op"``, ``"syncs_by_kind"``, ``"sync_sites"`` dicts, most frequent first
        (ties by name)."""
        return {"ops": self.total_ops, "views": self.total_views, "markers": sum(self.markers.values()),
                "syncs": self.total_syncs, "by_op": _sorted(self.ops), "views_by_op": _sorted(self.views),
                "markers_by_op": _sorted(self.markers),
                "syncs_by_kind": _sorted(self.syncs), "sync_sites": _sorted(self.sync_sites)}


def _sorted(tally: collections.Counter) -> dict[str, int]:
    return dict(sorted(tally.items(), key=lambda kv: (-kv[1], kv[0])))


# -- the profiler's count -------------------------------------------------------------------------------------


def _functional_overloads(name: str) -> list | None:
    """The overloads of the op ``name`` (``ns::op``) that take or return a tensor and are not out= forms (not
    ``aten::slice.str``, a TorchScript string op); None when there is no such op."""
    ns, sep, op = name.partition("::")
    if not sep or not op.isidentifier() or not ns.isidentifier():
        return None
    try:
        packet = getattr(getattr(torch.ops, ns), op)
    except (AttributeError, RuntimeError):
        return None
    if not hasattr(packet, "overloads"):
        return None
    overloads = []
    for o in packet.overloads():
        try:
            overload = getattr(packet, o)
        except (AttributeError, RuntimeError):  # TorchScript-only overloads (aten::to.prim_Device)
            continue
        schema = overload._schema
        if not any(a.is_out for a in schema.arguments) and any(
                "Tensor" in str(v.type) for v in (*schema.arguments, *schema.returns)):
            overloads.append(overload)
    return overloads or None


def _composite_implicit(overload) -> bool:
    try:
        return overload.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd)
    except RuntimeError:
        return False


@functools.cache
def _event_kind(name: str) -> str | None:
    """How a profiler event named ``name`` counts: None (not an op), "view", "alloc", "composite" or "op"."""
    overloads = _functional_overloads(name)
    if overloads is None:
        return None
    if name in _UNANNOTATED_VIEWS or all(_is_view(o) for o in overloads):
        return "view"
    if name in ALLOCATION_OPS:
        return "alloc"
    if all(_composite_implicit(o) for o in overloads):
        return "composite"
    return "op"


class LeafOpCounter:
    """Counts, with ``torch.profiler`` (CPU activity), the working leaf ops run while it is active (a context
    manager); see the module docstring for what counts.

    Attributes:
        ops: ``collections.Counter`` of the working leaf ops by name (``"aten::copy_"``, ``"exml_fast::tanh"``),
            filled when the block exits.
        total: their sum.
        syncs: ``collections.Counter`` of the events of :data:`SYNC_OPS` at any depth with none below them, by
            name: the host syncs made inside kernels too (a C++ kernel's ``.item()``), which
            :class:`DispatchCounter` cannot see. Boolean-mask indexing and copies between devices are not told
            apart here (the former shows as its ``aten::nonzero``).
    """

    def __init__(self) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self._profile = None

    @property
    def active(self) -> bool:
        return self._profile is not None

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __enter__(self) -> LeafOpCounter:
        if self._profile is not None:
            raise RuntimeError("LeafOpCounter: this counter is already active; a counter does not nest in "
                               "itself (use a second LeafOpCounter)")
        profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        profile.__enter__()
        self._profile = profile
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._profile is None:
            raise RuntimeError("LeafOpCounter: __exit__ without a matching __enter__")
        profile, self._profile = self._profile, None
        profile.__exit__(exc_type, exc, tb)
        if exc_type is None:
            for event in profile.events():
                if event.cpu_parent is None:
                    self._tally(event)
        return False

    def _tally(self, event) -> tuple[bool, bool]:
        """Counts the working leaves and the syncs under ``event`` (itself included); whether there was a
        working op, and whether there was a sync (a sync op counts once: ``aten::is_nonzero`` runs
        ``aten::_local_scalar_dense`` inside, and only that one is tallied)."""
        working = synced = False
        for child in event.cpu_children:
            w, s = self._tally(child)
            working, synced = working or w, synced or s
        if event.name in SYNC_OPS and not synced:
            self.syncs[event.name] += 1
            synced = True
        if not working and _event_kind(event.name) == "op":
            self.ops[event.name] += 1
            working = True
        return working, synced

    def reset(self) -> None:
        self.ops.clear()
        self.syncs.clear()

    def summary(self) -> dict[str, Any]:
        """``{"leaf_ops": total, "by_op": {name: count}, "syncs": total, "syncs_by_op": {name: count}}``, most
        frequent first (ties by name)."""
        return {"leaf_ops": self.total, "by_op": _sorted(self.ops), "syncs": sum(self.syncs.values()),
                "syncs_by_op": _sorted(self.syncs)}


def count_dispatch(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> DispatchCounter:
    """``fn(*args, **kwargs)`` run once under a fresh :class:`DispatchCounter`, which is returned."""
    _check_callable(fn, "count_dispatch")
    with DispatchCounter() as counter:
        fn(*args, **kwargs)
    return counter


def count_leaf_ops(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> LeafOpCounter:
    """``fn(*args, **kwargs)`` run once under a fresh :class:`LeafOpCounter`, which is returned."""
    _check_callable(fn, "count_leaf_ops")
    with LeafOpCounter() as counter:
        fn(*args, **kwargs)
    return counter
