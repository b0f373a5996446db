"""Data-Impression soft targets (Nayak et al. 2019): `dirichlet_targets`, one Dirichlet sample per row.

Typical use (REFERENCE.md §2): `c = class_similarity(fc.weight)` (:mod:`exml_fast.ops.class_similarity`), then
`y = dirichlet_targets(beta * c[labels], generator=g)`.
"""

from __future__ import annotations

import torch

from exml_fast import _ext
from exml_fast._utils.checks import check_float_dtype
from exml_fast.reference import dirichlet as _ref


def _check_generator(concentration: torch.Tensor, generator: torch.Generator | None) -> None:
    """`generator` is None, a CPU generator, or one on concentration's device."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"dirichlet_targets: generator must be a torch.Generator or None; got {type(generator).__name__}"
        )
    gdev, dev = generator.device, concentration.device
    same = gdev.type == dev.type and (gdev.index is None or dev.index is None or gdev.index == dev.index)
    if not same and gdev.type != "cpu":
        raise ValueError(
            f"dirichlet_targets: generator is on {gdev} but concentration is on {dev}; pass a "
            f"generator on {dev}, a CPU generator, or None"
        )


def dirichlet_targets(
    concentration: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One sample of Dir(concentration[b]) per row b.

    Gamma draws by Marsaglia-Tsang (alpha >= 1) and, for alpha < 1, the boost
    G(alpha) = G(alpha + 1) U^(1/alpha) taken in log space; each row is
    normalised with a max-subtracted log-sum-exp, so tiny concentrations
    (alpha = 1e-3) give peaky rows, never 0/0. Random numbers come from a
    counter-based Philox4x32-10 keyed by one 64-bit key drawn from `generator`
    and indexed by (row, column, attempt): the result depends only on the key
    and the input (not on the thread count), and CPU and CUDA agree up to libm
    rounding. The draws differ from torch.distributions.Dirichlet's (same law,
    other random stream).

    The key is drawn inside the op, in C++: from a CPU generator on the host
    (the value `torch.randint(-2**63, 2**63 - 1, (1,), generator=g)` would
    give, so a CPU-seeded CUDA call gives the CPU samples), and from a CUDA
    generator inside the kernel, from the generator's Philox (seed, offset)
    it is launched with: one launch a call, no host sync, no host-to-device
    copy, and safe under CUDA graph capture (a CPU generator's key would be
    frozen into a captured graph: capture with a CUDA generator or None).
    Every call advances the generator once, whatever B.

    Args:
        concentration: (B, K) positive, finite concentrations, K >= 1; float32,
            float64, float16 or bfloat16 (used in fp32). On CPU an entry <= 0,
            NaN or inf (as fp32) raises; on CUDA (where checking would cost a
            host sync) its row comes out NaN.
        generator: the key's source. None: torch's default generator of
            concentration's device. A CPU generator is accepted for CUDA input
            (its key is passed to the kernel by value: no copy, no sync); a
            generator on another accelerator raises ValueError. torch.compile
            cannot trace a Generator object (a graph break): under
            fullgraph=True pass None.

    Returns:
        (B, K) float32, rows summing to 1 within fp32 rounding. Not
        differentiable: the output never has a grad_fn, even for input that
        requires grad.
    """
    if not isinstance(concentration, torch.Tensor):
        raise TypeError(
            f"dirichlet_targets: concentration must be a torch.Tensor; got {type(concentration).__name__}"
        )
    if concentration.dim() != 2:
        raise ValueError(
            "dirichlet_targets: concentration must be a 2-D (B, K) matrix; got shape "
            f"{tuple(concentration.shape)}"
        )
    check_float_dtype(concentration, "concentration", "dirichlet_targets")
    if concentration.shape[1] < 1:
        raise ValueError(
            "dirichlet_targets: concentration must have at least one column (K >= 1); got shape "
            f"{tuple(concentration.shape)}"
        )
    conc = concentration.detach()
    _check_generator(conc, generator)
    if _ext.use_compiled(conc):
        return torch.ops.exml_fast.dirichlet_sample(conc, None, generator)
    if conc.device.type == "cpu":
        bad = ~(torch.isfinite(conc.float()) & (conc.float() > 0))
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0, 0])
            raise RuntimeError(
                "dirichlet_targets: every concentration must be finite and > 0 (as fp32); row "
                f"{row} is {conc[row].float()}"
            )
    return _ref.dirichlet_targets(conc, generator=generator)


def _register() -> None:
    """Fake kernels for the compiled ops (only when _C loaded; they are not differentiable)."""

    @torch.library.register_fake("exml_fast::dirichlet_sample")
    def _dirichlet_sample_fake(concentration, key=None, generator=None):
        return concentration.new_empty(concentration.shape, dtype=torch.float32)

    @torch.library.register_fake("exml_fast::_philox4x32_10")
    def _philox_fake(counters, key):
        return torch.empty_like(counters)


if _ext.has_ops():
    _register()
