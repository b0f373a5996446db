"""Post-training int8 quantisation calibrated without data: :func:`quantize_without_data`.

PyTorch's deployment flow for int8 on x86 CPUs is PT2E (``prepare_pt2e`` / ``convert_pt2e`` with the
``X86InductorQuantizer``; in torch 2.14 it lives in torchao): the model is exported, observers are placed, the
calibration images run through it, and the converted graph holds int8 weights and quantize / dequantize steps
that ``torch.compile`` (Inductor, with ``freezing``) lowers to int8 kernels. The quantizer's choices are kept as
they are (per-channel symmetric int8 weights, per-tensor affine uint8 activations, conv + BN folded). Where
torchao is missing or the model cannot go through PT2E, ``flow="auto"`` falls back to ``torch.ao``'s FX flow
(``prepare_fx`` / ``convert_fx`` with the "x86" qconfig), whose result runs int8 kernels in eager mode.

One adaptation of the model's exported graph, no change of its numbers: the x86 quantizer groups ops by the module
that called them, so a module called twice (a ResNet block's one ``nn.ReLU`` after the convolution and after the
residual add) reads as one op with two outputs and stops it; each call of such a module gets a name of its own.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from exml_fast._utils.checks import check_choice, check_int
from exml_fast._utils.progress import Progress
from exml_fast.compress.calibration import check_classifier, check_images, synthetic_images
from exml_fast.compress.report import export_program
from exml_fast.synth.base import Synthesizer

__all__ = ["QUANTIZE_FLOWS", "QuantizeResult", "calibrate", "quantize_without_data"]

#: the values of ``flow``: "auto" (PT2E, else FX), "pt2e" (torchao's PT2E only), "fx" (torch.ao's FX flow)
QUANTIZE_FLOWS: tuple[str, ...] = ("auto", "pt2e", "fx")


@dataclasses.dataclass
class QuantizeResult:
    """What :func:`quantize_without_data` made.

    Attributes:
        model: the int8 model (a ``torch.fx.GraphModule``) on the CPU: (N, C, H, W) float inputs -> (N, K) float
            logits, any N. From PT2E, run it under ``torch.compile`` for int8 speed (eager mode runs the reference
            quantize / dequantize arithmetic); from FX it runs int8 kernels in eager mode.
        flow: "pt2e" or "fx", the flow that made it.
        method: where the calibration images came from ("real" for ``images=``, a method name, or the
            synthesizer's class name).
        n: how many calibration images.
        synthesis_s: seconds spent making the images (0 for ``images=``).
        calibrate_s: seconds spent exporting, calibrating and converting.
        fallback: why ``flow="auto"`` did not use PT2E (None when it did, or was not asked to).
        float_layers: the convolutions and linear layers the flow left in float, by module name (under PT2E,
            e.g. a ``ConvTranspose2d``, a ``Conv1d``, a convolution by a computed weight, or a linear layer whose
            input is not quantised); empty when every one is int8.
    """

    model: nn.Module
    flow: str
    method: str
    n: int
    synthesis_s: float
    calibrate_s: float
    fallback: str | None = None
    float_layers: tuple[str, ...] = ()


def _name_each_call(gm: torch.fx.GraphModule) -> None:
    """Gives each call of a module called more than once (one op a call, the calls unconnected) a module name of
    its own in the graph's ``nn_module_stack`` meta, which the x86 quantizer groups ops by."""
    groups: dict[str, list[torch.fx.Node]] = collections.defaultdict(list)
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            groups[next(reversed(stack.values()))[0]].append(node)
    for fqn, nodes in groups.items():
        if len(nodes) > 1 and not any(a in nodes for node in nodes for a in node.all_input_nodes):
            for k, node in enumerate(nodes):
                stack = dict(node.meta["nn_module_stack"])
                key = next(reversed(stack))
                stack[key] = (f"{fqn}#{k}", stack[key][1])
                node.meta["nn_module_stack"] = stack


def calibrate(model: nn.Module, images: torch.Tensor, *, batch_size: int = 64, progress: bool = False,
              desc: str = "calibrate") -> None:
    """Runs ``images`` through ``model`` (observers record their ranges), ``batch_size`` at a time, no grad."""
    bar = Progress(total=images.shape[0], desc=desc, enabled=progress)
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                model(images[start:start + batch_size])
                bar.update(min(batch_size, images.shape[0] - start))
    finally:
        bar.close()


def _pt2e(model: nn.Module, images: torch.Tensor, progress: bool) -> nn.Module:
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    gm = export_program(model, images).module()
    _name_each_call(gm)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(gm, quantizer)
    calibrate(prepared, images, progress=progress)
    converted = convert_pt2e(prepared)
    _drop_unused(converted)
    # .eval() / .train() on an exported graph raise unless allowed (it has no dropout or BN left to switch)
    allow_exported_model_train_eval(converted)
    return converted


def _drop_unused(gm: torch.fx.GraphModule) -> None:
    """Deletes the parameters and buffers no node reads: the float weights PT2E's conversion replaced by int8
    constants (and the BatchNorm layers folded into them), which would otherwise ship with the int8 model."""
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name in [k for k in gm.state_dict() if k not in used]:
        owner, _, attr = name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)


def _fx(model: nn.Module, images: torch.Tensor, progress: bool) -> nn.Module:
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao: the fallback is chosen knowingly
        warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"(?s).*quant_min and quant_max")
        warnings.filterwarnings("ignore", message=r"(?s).*quantized tensor creation functions")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (images[:2],))
        calibrate(prepared, images, progress=progress)
        return convert_fx(prepared)


def _count_int8_weights(model: nn.Module) -> int:
    """How many int8 weight tensors (PT2E's frozen constants, FX's packed conv / linear modules) ``model`` has."""
    count = sum(1 for t in list(model.buffers()) + list(model.parameters()) if t.dtype == torch.int8)
    count += sum(1 for v in vars(model).values() if isinstance(v, torch.Tensor) and v.dtype == torch.int8)
    count += sum(1 for m in model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized"))
    return count


#: the float layers a flow may leave unquantised: PT2E graph ops, and FX's float modules
_WEIGHTED_OPS = ("conv", "linear")
_WEIGHTED_MODULES = (nn.modules.conv._ConvNd, nn.Linear)


def _float_layers(qmodel: nn.Module, flow: str) -> tuple[str, ...]:
    """The convolutions and linear layers of the quantised ``qmodel`` whose weight is not int8, by module name
    (PT2E: a conv / linear op whose weight is not dequantized from int8; FX: a float ``Conv*d`` / ``Linear`` module
    left in the graph module, or a float functional conv / linear op, which FX's tracing makes of a module it
    steps into, e.g. a subclass of ``nn.Linear``). An op is named by the module that called it, else by its
    node."""
    names: list[str] = []
    if flow == "fx":
        names = [name for name, m in qmodel.named_modules()
                 if isinstance(m, _WEIGHTED_MODULES) and not type(m).__module__.startswith("torch.ao.nn.quantized")]
    for node in qmodel.graph.nodes:
        target = str(node.target)
        if node.op != "call_function" or not any(op in target for op in _WEIGHTED_OPS) or "quantized" in target:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(weight, torch.fx.Node) and "dequantize" in str(weight.target):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        fqn = next(reversed(stack.values()))[0] if stack else ""
        names.append(fqn.split("#")[0] or node.name)
    return tuple(dict.fromkeys(names))


def quantize_without_data(model: nn.Module, input_shape: Sequence[int], mean=None, std=None, *,
                          method: str | Synthesizer = "deepinversion", n: int = 256,
                          images: torch.Tensor | None = None, seed: int = 0, iterations: int | None = None,
                          batch_size: int | None = None, flow: str = "auto", progress: bool = True) -> QuantizeResult:
    """int8 post-training quantisation of ``model`` for x86 CPUs, calibrated on images made from the model itself.

    Example::

        from exml_fast.compress import quantize_without_data

        result = quantize_without_data(model, (1, 32, 32), mean=0.1307, std=0.3081)   # DeepInversion, 256 images
        int8 = torch.compile(result.model)                                          # PT2E: Inductor's int8 kernels

    Args:
        model: a float classifier, (N, C, H, W) -> (N, K) logits (left unchanged; a CPU copy is quantised).
        input_shape: (C, H, W) of one input.
        mean, std: the input normalisation the model was trained with (a float or one per channel), used by the
            synthesizers.
        method: where the calibration images come from (:func:`~exml_fast.compress.synthetic_images`):
            "deepinversion" (default), "zeroq" (ZeroQ's distilled data), "noise" (Gaussian, the floor), or a
            :class:`~exml_fast.synth.Synthesizer` (e.g. a trained generator). Ignored when ``images`` is given.
        n: how many calibration images to make, >= 1.
        images: real (or any) calibration images, (N, C, H, W) normalised like the model's inputs, instead of
            synthetic ones (the ceiling synthetic calibration is read against).
        seed: the synthesis seed.
        iterations, batch_size: synthesis steps per batch and its batch (None: the method's own).
        flow: "auto" (PT2E, falling back to FX with a warning when torchao is missing or PT2E fails), "pt2e" or
            "fx".
        progress: show progress bars.

    Returns:
        A :class:`QuantizeResult` (its ``model`` is the int8 model).

    Raises:
        TypeError / ValueError: ``model`` is not a classifier of ``input_shape`` inputs; a BN-matching method on a
            model without BatchNorm (see :func:`~exml_fast.compress.synthetic_images`); ``images`` of the wrong
            shape or dtype; a bad ``flow``; a model in which the flow finds nothing to quantise (no convolution or
            linear layer it can take: the message names the flow).
        ImportError: ``flow="pt2e"`` without torchao (``pip install exml_fast[compress]``).
        RuntimeError: ``flow="pt2e"`` or ``"fx"`` cannot export or trace the model (the message says which).

    Warns:
        RuntimeWarning: the flow left some convolution or linear layers in float (named; also in
        ``float_layers``), or ``flow="auto"`` fell back to FX (why).
    """
    owner = "quantize_without_data"
    shape, _ = check_classifier(model, input_shape, owner)
    check_choice(flow, "flow", owner, QUANTIZE_FLOWS)
    n = check_int(n, "n", owner, low=1)
    t0 = time.perf_counter()
    if images is not None:
        calib, label = check_images(images, shape, owner).detach(), "real"
    else:
        calib = synthetic_images(model, shape, mean=mean, std=std, method=method, n=n, seed=seed,
                                 iterations=iterations, batch_size=batch_size, progress=progress)
        label = method if isinstance(method, str) else type(method).__name__
    synthesis_s = 0.0 if images is not None else time.perf_counter() - t0
    calib = calib.to("cpu", torch.float32).contiguous()
    float_model = copy.deepcopy(model).to("cpu").eval()
    t1 = time.perf_counter()
    fallback = None
    used = "fx" if flow == "fx" else "pt2e"
    if used == "pt2e":
        try:
            import torchao.quantization.pt2e  # noqa: F401
        except ImportError as exc:
            if flow == "pt2e":
                raise ImportError(f"{owner}: flow='pt2e' needs torchao (pip install exml_fast[compress] or "
                                  "pip install torchao==0.18.0)") from exc
            used, fallback = "fx", "torchao is not installed"
    if used == "pt2e":
        try:
            qmodel = _pt2e(float_model, calib, progress)
        except Exception as exc:  # export or the quantizer refused the model
            if flow == "pt2e":
                raise RuntimeError(f"{owner}: PT2E could not quantise {type(model).__name__}: "
                                   f"{type(exc).__name__}: {exc}") from exc
            used, fallback = "fx", f"PT2E failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    if used == "fx":
        if fallback is not None:
            warnings.warn(f"{owner}: {fallback}; using torch.ao's FX flow instead", RuntimeWarning, stacklevel=2)
        try:
            qmodel = _fx(float_model, calib, progress)
        except Exception as exc:
            raise RuntimeError(f"{owner}: the FX flow could not trace {type(model).__name__} (torch.fx symbolic "
                               f"tracing): {type(exc).__name__}: {exc}") from exc
    if _count_int8_weights(qmodel) == 0:
        raise ValueError(f"{owner}: the {used} flow found nothing to quantise in {type(model).__name__}: no "
                         "convolution or linear layer it can take (custom layers stay in float)")
    qmodel.eval()  # (an exported graph's allowed eval() returns None, not the module)
    left = _float_layers(qmodel, used)
    if left:
        warnings.warn(f"{owner}: the {used} flow left {len(left)} layer(s) of {type(model).__name__} in float: "
                      f"{', '.join(left)} (the x86 quantizer takes only the layers it has int8 kernels and "
                      "quantised inputs for)", RuntimeWarning, stacklevel=2)
    return QuantizeResult(model=qmodel, flow=used, method=label,
                          n=int(calib.shape[0]), synthesis_s=synthesis_s, calibrate_s=time.perf_counter() - t1,
                          fallback=fallback, float_layers=left)
