"""The public DeepInversion CIFAR-10 synthesis loop, ported faithfully to plain PyTorch.

It is the baseline `exml_fast.synth.DeepInversion` is benchmarked against
(benches/bench_synthesis.py). It reproduces what the NVlabs DeepInversion
CIFAR-10 script does per iteration, costs included:

- one random roll in [-jitter, jitter]² and one flip decision for the whole batch;
- `optimizer.zero_grad(); teacher.zero_grad()` and a teacher in eval mode whose
  parameters still require grad, so every backward also computes (and then
  discards) the weight gradients;
- the BatchNorm feature loss from forward hooks on every `nn.BatchNorm2d`, each
  taking the input's mean and a permute-contiguous copy for the variance
  (`exml_fast.reference.public.bn_hooks.DeepInversionFeatureHook`), summed un-weighted
  (the CIFAR script has no first-layer multiplier);
- the l2 TV prior as four separate shifted differences and their norms, and
  `||inputs_jit||_2`;
- Adaptive DeepInversion's competition term when `competition_scale > 0`:
  1 - JS(student, teacher) at T = 3 with probabilities clamped to [0.01, 0.99];
- a `loss.item()` host sync every iteration to track the best batch.

Deliberate deviations from the public script (none changes the cost of a step
in fp32):

1. The best batch is stored as a clone. The script kept `inputs.data`, an alias
   of the live tensor that the next `optimizer.step()` overwrites, so it
   returned the last batch, not the best one.
2. The hooks are removed when the loop ends, also after an exception (the
   script never removed them; they piled up across calls).
3. Randomness comes from `generator` (init, jitter and flip) instead of the
   global torch and Python RNGs, so a seed reproduces a run.
4. `use_amp` runs the forward and the losses under `torch.autocast` (bfloat16);
   the script's apex AMP path no longer runs on current PyTorch. As in the
   script, the BN statistics are then taken in the low precision.
5. The teacher's (and competitor's) train/eval mode is restored on exit, and
   the input shape is an argument (the script hard-coded 3x32x32); `all_bn`
   extends the BN hooks to BatchNorm1d/3d layers for nets that have them.
6. The per-iteration loss terms are kept (detached, no extra host sync) and
   returned as a history, with the teacher's agreement with the targets
   ("teacher_acc", the fraction of the batch it labels as its target).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from exml_fast.reference.image_priors import tv_l2  # the script's TV: Frobenius norms of the four shifts
from exml_fast.reference.public.bn_hooks import deepinversion_bn_loss_hooks

__all__ = ["public_deepinversion"]


def _competition(outputs: torch.Tensor, student_outputs: torch.Tensor) -> torch.Tensor:
    """1 - clamp(JS, 0, 1) of the student's and teacher's softmax at T = 3 (the ADI term), the script's way:
    its "JS" is 0.5 KL(M || P) + 0.5 KL(M || Q), not the Jensen-Shannon divergence's KL(P || M) order
    (``exml_fast.ops.js_divergence(..., form="public")``)."""
    t = 3.0
    p = F.softmax(student_outputs / t, dim=1)
    q = F.softmax(outputs / t, dim=1)
    m = 0.5 * (p + q)
    p = p.clamp(0.01, 0.99)
    q = q.clamp(0.01, 0.99)
    m = m.clamp(0.01, 0.99)
    # KLDivLoss(batchmean)(log a, b) = sum b * (log b - log a) / N
    js = 0.5 * F.kl_div(torch.log(p), m, reduction="batchmean") + 0.5 * F.kl_div(
        torch.log(q), m, reduction="batchmean")
    return 1.0 - torch.clamp(js, 0.0, 1.0)


def _generators(generator, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(device generator for the init, CPU generator for the jitter/flip draws)."""
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    elif isinstance(generator, int) and not isinstance(generator, bool):
        seed = generator
    elif isinstance(generator, torch.Generator):
        init_gen = generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                 device=generator.device).item())
        return init_gen, torch.Generator().manual_seed(seed)
    else:
        raise TypeError("public_deepinversion: generator must be None, an int seed or a "
                        f"torch.Generator; got {type(generator).__name__}")
    init_gen = torch.Generator(device=device).manual_seed(seed)
    return init_gen, torch.Generator().manual_seed(seed + 1)


def public_deepinversion(
    teacher: nn.Module,
    targets: torch.Tensor,
    *,
    iterations: int,
    lr: float = 0.05,
    bn_reg_scale: float,
    tv_l2_scale: float,
    l2_scale: float,
    jitter: int = 2,
    flip: bool = True,
    competitor: nn.Module | None = None,
    competition_scale: float = 0.0,
    generator: int | torch.Generator | None = None,
    use_amp: bool = False,
    callback: Callable[[int, float], None] | None = None,
    best_callback: Callable[[int, torch.Tensor], None] | None = None,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    all_bn: bool = False,
) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """Optimise a batch of random inputs so that `teacher` labels them `targets`.

    Each iteration: roll the batch by one random (off1, off2) in [-jitter, jitter],
    flip it (dims=(3,)) with probability 1/2, and minimise
    `CE(teacher(x_jit), targets) + bn_reg_scale * sum_l r_l + tv_l2_scale * TV_l2(x_jit)
    + l2_scale * ||x_jit||_2 (+ competition_scale * (1 - JS))` with Adam.

    Args:
        teacher: the classifier; put in eval mode for the loop (restored after).
            Its parameters keep requires_grad as the caller left them.
        targets: (N,) int64 class indices on the teacher's device.
        iterations: number of Adam steps, >= 1.
        lr: Adam's learning rate (default betas).
        bn_reg_scale, tv_l2_scale, l2_scale: weights of the BN feature loss, the
            l2 total variation and the input norm.
        jitter: maximum roll in pixels, >= 0.
        flip: random horizontal flip of the whole batch.
        competitor: the student of Adaptive DeepInversion (used when
            `competition_scale > 0`; put in eval mode, restored after).
        competition_scale: weight of 1 - JS(student, teacher).
        generator: None (global RNG), an int seed, or a torch.Generator on the
            teacher's device; drives the init and the augmentation draws.
        use_amp: forward and losses under torch.autocast(bfloat16).
        callback: called as `callback(iteration, loss)` after every step
            (`loss` the float total loss of that iteration, before the step).
        best_callback: called as `best_callback(iteration, best_inputs)` after
            every step with the lowest-loss batch so far: the batch a call of
            `iteration + 1` iterations returns (same seed). Not a copy: read it,
            do not change it. For following a run's quality step by step
            without paying for one call per step count (benches/bench_synthesis.py).
        input_shape: (C, H, W) of one input.
        all_bn: hook every BatchNorm1d/2d/3d, not only BatchNorm2d (the
            script's CIFAR nets have 2-D ones only; a LeNet-5-BN has 1-D ones
            too, which exml_fast's matcher counts).

    Returns:
        `(best_inputs, best_cost, losses)`: the (N, C, H, W) float32 batch with the
        lowest total loss (a copy, taken before that iteration's step), that loss,
        and a dict of 1-D float32 CPU tensors of length `iterations`, one value per
        iteration: "total", "main" (CE), "bn", "tv_l2", "l2", "teacher_acc" and,
        with a competitor, "competition".
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"public_deepinversion: iterations must be an int >= 1; got {iterations!r}")
    if not isinstance(jitter, int) or jitter < 0:
        raise ValueError(f"public_deepinversion: jitter must be an int >= 0; got {jitter!r}")
    if targets.dim() != 1 or targets.dtype != torch.int64:
        raise ValueError("public_deepinversion: targets must be a 1-D int64 tensor; got "
                         f"shape {tuple(targets.shape)} dtype {targets.dtype}")
    if len(input_shape) != 3:
        raise ValueError(f"public_deepinversion: input_shape must be (C, H, W); got {input_shape!r}")
    use_competition = competition_scale > 0.0
    if use_competition and competitor is None:
        raise ValueError("public_deepinversion: competition_scale > 0 needs a competitor")

    device = targets.device
    init_gen, aug_gen = _generators(generator, device)
    bs = targets.shape[0]
    inputs = torch.randn((bs, *input_shape), generator=init_gen, device=device,
                         dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([inputs], lr=lr)

    teacher_mode = teacher.training
    comp_mode = competitor.training if competitor is not None else None
    teacher.eval()
    if competitor is not None:
        competitor.eval()
    hooks = deepinversion_bn_loss_hooks(teacher, all_bn=all_bn)
    best_cost = 1e6
    best_inputs = inputs.detach().clone()
    history: dict[str, list[torch.Tensor]] = {k: [] for k in ("main", "bn", "tv_l2", "l2", "teacher_acc")}
    if use_competition:
        history["competition"] = []
    totals: list[float] = []
    try:
        for it in range(iterations):
            off1, off2 = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,),
                                                        generator=aug_gen))
            do_flip = flip and float(torch.rand((), generator=aug_gen)) > 0.5
            optimizer.zero_grad()
            teacher.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                inputs_jit = torch.roll(inputs, shifts=(off1, off2), dims=(2, 3))
                if do_flip:
                    inputs_jit = torch.flip(inputs_jit, dims=(3,))
                outputs = teacher(inputs_jit)
                loss_main = F.cross_entropy(outputs, targets)
                loss = loss_main
                if use_competition:
                    competitor.zero_grad()
                    loss_comp = _competition(outputs, competitor(inputs_jit))
                    loss = loss + competition_scale * loss_comp
                loss_var = tv_l2(inputs_jit)
                loss = loss + tv_l2_scale * loss_var
                loss_bn = sum(h.r_feature for h in hooks)
                loss = loss + bn_reg_scale * loss_bn
                loss_l2 = torch.norm(inputs_jit, 2)
                loss = loss + l2_scale * loss_l2

            cost = loss.item()
            if best_cost > cost:
                best_cost = cost
                # The public script stored `inputs.data` (an alias the step below
                # overwrites); a clone keeps the batch that had this loss.
                best_inputs = inputs.detach().clone()
            totals.append(cost)
            history["main"].append(loss_main.detach())
            history["bn"].append(torch.as_tensor(loss_bn).detach())
            history["tv_l2"].append(loss_var.detach())
            history["l2"].append(loss_l2.detach())
            history["teacher_acc"].append((outputs.detach().argmax(1) == targets).float().mean())
            if use_competition:
                history["competition"].append(loss_comp.detach())

            loss.backward()
            optimizer.step()
            if callback is not None:
                callback(it, cost)
            if best_callback is not None:
                best_callback(it, best_inputs)
    finally:
        for h in hooks:
            h.remove()
        teacher.train(teacher_mode)
        if competitor is not None:
            competitor.train(comp_mode)

    losses = {"total": torch.tensor(totals, dtype=torch.float32)}
    for k, v in history.items():
        losses[k] = torch.stack([t.float() for t in v]).cpu()
    return best_inputs, best_cost, losses
