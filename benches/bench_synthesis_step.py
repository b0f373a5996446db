"""Synthesis benchmark 1 of 4: the cost of one DeepInversion step, exml_fast.synth.DeepInversion against
the public DeepInversion CIFAR-10 loop (the teachers and the objective: synthesislib.py).

Variants, each with its own deep copy of the teacher:
  public as shipped   exml_fast.reference.public.deepinversion.public_deepinversion
                      with the teacher's parameters still requiring grad (as the
                      public script leaves them): every backward also computes
                      the weight gradients. Kept for reference only: it is
                      avoidable waste, not the peer.
  public frozen       the same loop with one line added, the teacher frozen
                      (requires_grad_(False)): THE PEER every ratio is against.
  public frozen+compile  the frozen teacher wrapped in torch.compile, the next
                      peer a user reaches for.
  exml fp32           exml_fast.synth.DeepInversion at its defaults (on the CPU:
                      channels_last picked for the ResNets, fused frozen-BN
                      statistics, the input-gradient swap on 1-channel layers;
                      on a GPU: fused frozen-BN statistics, the step captured in
                      a CUDA graph).
  exml fp32 eager     on a GPU, listed: the same without the CUDA graph
                      (cuda_graph=False), what the graph brings.
  exml fp32 cl        on a GPU, listed: the defaults with channels_last=True,
                      to choose the GPU's default memory format by measurement.
The engine runs with the public loop's objective and optimiser (see
exml_runner), so only the implementation differs.

With --best (the default on a GPU) each side also runs in its best form, and the
comparisons pair precision with precision:
  public frozen bf16+cl+compile(<mode>)  the frozen peer as a careful GPU user
                      runs it: bf16 autocast (the loop's use_amp), the teacher's
                      weights in channels_last, and the teacher — its forward
                      with the public BN hooks, which dynamo inlines into one
                      graph — under torch.compile(mode=<mode>), for each of
                      --compile-modes (default max-autotune and reduce-overhead);
                      the faster is "the best peer".
  exml bf16+cl+graph  the engine with precision="bf16", channels_last=True and
                      cuda_graph=True (the whole step in one CUDA graph); with
                      --exml-compile also that with compile=True.
exml fp32 is compared with public frozen (fp32 eager), the engine's best form
with the best peer; public frozen at fp32 is every row's second ratio.
--bn-share adds each side's step without the BN term (the public loop with no BN
hooks; the engine at bn_weight 0): the term's share of a step.

How a step is timed (the honest per-iteration cost, set-up removed): each
variant runs a whole synthesis call through its public API for K1 and for K2
iterations from the same seed, and a step costs (t(K2) - t(K1)) / (K2 - K1).
Set-up that does not scale with the iterations cancels. On a GPU each call
is timed with CUDA events. Calls are timed round-robin with the order rotated each round, so the per-round ratios cancel
the drift of a shared machine; the speed-up printed is the median of the
per-round ratios against "public frozen" (min-max in brackets), and each
median is the true median (mean of the middle two for an even count). One call
of each variant warms up first (torch.compile compiles there).

Usage:
    python benches/bench_synthesis_step.py [--device cpu|cuda] [--quick] [--nets ...] [--best | --no-best]
        [--compile-modes ...] [--exml-compile] [--bn-share] [--batch N] [--k1 N] [--k2 N] [--rounds N]
        [--suffix S] [--out benches/results]   (recorded as synthesis_step_<device>)
"""

from __future__ import annotations

import copy
import time

import torch
from benchlib import environment, timed_call, true_median
from synthesislib import (NETS, NO_BN, PEER, SHAPES, Variant, calibrated_teacher, exml_best_forms, exml_runner,
                          header_markdown, net_title, parse, parser, public_best_label, public_runner, write)
from torch import nn


def variants_for(teacher, name, args) -> dict[str, Variant]:
    b, d = args.batch_of[name], args.device
    v: dict[str, Variant] = {}

    def public(label, form, *, bn=True, config, **kw):
        v[label] = Variant(public_runner(teacher, b, d, name=name, bn=bn, **kw), "public", form, bn, config)

    def exml(label, form, *, bn=True, config, **options):
        if not bn:
            options["bn_weight"] = 0.0
        v[label] = Variant(exml_runner(teacher, b, d, name=name, **options), "exml", form, bn, config)

    if not args.best:
        public("public as shipped", "listed", frozen=False,
               config="fp32 eager, the teacher's parameters requiring grad as the public script leaves them")
    public(PEER, "fp32", config="fp32 eager, the teacher frozen")
    if args.bn_share:
        public(PEER + NO_BN, "fp32", bn=False, config="fp32 eager, the teacher frozen, no BN hooks")
    if not args.best and args.compile_modes:
        public("public frozen+compile", "listed", compile_mode=args.compile_modes[0],
               config=f"fp32, the frozen teacher under torch.compile(mode={args.compile_modes[0]})")
    if args.best:
        for mode in args.compile_modes or [None]:
            public(public_best_label(mode), "best", channels_last=True, use_amp=True, compile_mode=mode,
                   config="bf16 autocast, channels_last weights, the frozen teacher (with the BN hooks) "
                          + (f"under torch.compile(mode={mode})" if mode else "eager"))
    if args.port_only:
        return v
    exml("exml fp32", "fp32", precision="fp32", config="the engine's defaults, fp32")
    if d == "cuda":
        exml("exml fp32 eager", "listed", precision="fp32", cuda_graph=False,
             config="the engine's defaults, fp32, cuda_graph=False")
        exml("exml fp32 cl", "listed", precision="fp32", channels_last=True,
             config="the engine's defaults, fp32, channels_last=True (the default on CUDA is NCHW: unmeasured)")
    if args.bn_share:
        exml("exml fp32" + NO_BN, "fp32", bn=False, precision="fp32", config="fp32, bn_weight 0")
    if args.best:
        forms = exml_best_forms(d, with_compile=args.exml_compile)
        for label, options in forms:
            exml(label, "best", config=", ".join(f"{k}={v}" for k, v in options.items()), **options)
        if args.bn_share:
            label, options = forms[0]
            exml(label + NO_BN, "best", bn=False, config=", ".join(f"{k}={v}" for k, v in options.items())
                 + ", bn_weight 0", **options)
    return v


# -- timing -------------------------------------------------------------------------


def time_steps(variants: dict, args) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per iteration of each variant, one sample per round (see the module
    docstring), and the error of each variant that failed to run."""
    names = list(variants)
    failed = {}
    for n in names:  # warm-up: allocations, autotuning, compilation, graph capture
        try:
            t0 = time.perf_counter()
            timed_call(lambda: variants[n].run(args.k1, 0), args.device)
            print(f"  {n}: warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # a variant that cannot run is reported, not fatal
            failed[n] = f"{type(e).__name__}: {e}"
            print(f"  {n}: failed ({failed[n][:200]})", flush=True)
    names = [n for n in names if n not in failed]
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t1 = timed_call(lambda: variants[n].run(args.k1, 0), args.device)
            t2 = timed_call(lambda: variants[n].run(args.k2, 0), args.device)
            samples[n].append((t2 - t1) / (args.k2 - args.k1))  # <= 0: below the noise (see below)
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {samples[n][-1] * 1e3:.0f} ms/it" for n in names), flush=True)
    for n in failed:
        samples[n] = []
    return samples, failed


def conv_floor(name: str, batch: int, step_s: float) -> dict:
    """The floor of a step on ATen's kernels: every Conv2d and Linear layer of the network run alone, forward
    + input gradient (the weights frozen), on its own input shape, each in its fastest way — autograd in NCHW
    or channels_last, or, for stride-1 convolutions, the input gradient as a convolution with the flipped
    kernel (exml_fast's swap, exml_fast.synth.input_grad_conv) — timed and summed. No implementation of the
    step that calls these kernels goes under it; everything above it (BN, activations, pooling, the losses,
    the optimiser) is what a synthesis loop adds.

    Also: the FLOPs of those layers (FlopCounterMode, forward x 2) and the rate of a 2048-square fp32 matmul.
    The matmul is listed, not used: on the AMD CPUs here torch's sgemm ran below oneDNN's convolutions (both
    loops ran faster than the convolutions' FLOPs at the sgemm rate would allow), so it is no floor."""
    from torch.utils.flop_counter import FlopCounterMode

    from exml_fast.synth.input_grad_conv import conv2d_input_grad, flip_kernel

    model = NETS[name]().eval().requires_grad_(False)
    x = torch.randn(batch, *SHAPES[name])
    with FlopCounterMode(display=False) as fc:
        model(x)
    flops = 2 * fc.get_total_flops()
    seen: list[tuple[nn.Module, torch.Size]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0].shape)))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for layer, shape in seen:
        formats = (torch.contiguous_format, torch.channels_last) if len(shape) == 4 else (torch.contiguous_format,)
        best = float("inf")
        for fmt in formats:
            mod = copy.deepcopy(layer).to(memory_format=fmt) if len(shape) == 4 else layer
            xi = torch.randn(shape).to(memory_format=fmt).requires_grad_(True)
            with torch.no_grad():
                g = torch.randn_like(mod(xi))

            def call(mod=mod, xi=xi, g=g):
                torch.autograd.grad(mod(xi), xi, g)

            calls = [call]
            if (isinstance(layer, nn.Conv2d) and layer.stride == (1, 1) and layer.dilation == (1, 1)
                    and layer.groups == 1 and isinstance(layer.padding, tuple)):
                flipped = flip_kernel(mod.weight)
                xd = xi.detach()

                def swap(mod=mod, xd=xd, g=g, flipped=flipped):
                    mod(xd)
                    conv2d_input_grad(g, mod.weight, mod.padding, flipped)

                calls.append(swap)
            for fn in calls:
                fn()
                best = min(best, true_median([timed_call(fn, "cpu") for _ in range(5)]))
        total += best
    m = 2048
    a, bm = torch.randn(m, m), torch.randn(m, m)
    a @ bm
    t = true_median([timed_call(lambda: a @ bm, "cpu") for _ in range(5)])
    return {"gflop_per_step": flops / 1e9, "gflop_per_image": flops / 1e9 / batch, "layers": len(seen),
            "floor_s": total, "conv_gflops": flops / total / 1e9, "sgemm_gflops": 2 * m**3 / t / 1e9,
            "fraction_of_floor": total / step_s}


def timing_rows(variants: dict[str, Variant], samples: dict[str, list[float]], failed: dict[str, str], batch: int,
                args) -> list[dict]:
    """One row per variant: its step's true median and range, images/s, and the median [min-max] of the
    per-round ratios against the fp32 peer ("speedup") and against its peer of the same precision
    (pair_with_peers)."""
    rows = []
    base = samples.get(PEER, [])
    for n, s in samples.items():
        v = variants[n]
        role = {"variant": n, "side": v.side, "form": v.form, "bn": v.bn, "config": v.config}
        if not s:
            rows.append({**role, "failed": failed[n]})
            continue
        if min(s) <= 0:  # the longer call was not slower: no figure, rather than a clamped absurd one
            rows.append({**role, "samples_s": s, "failed": (
                f"t(K2 = {args.k2}) <= t(K1 = {args.k1}) in {sum(x <= 0 for x in s)} of {len(s)} rounds: "
                f"{args.k2 - args.k1} iterations are below the timing noise; raise --k2")})
            print(f"  {n:>24}: no figure ({rows[-1]['failed']})", flush=True)
            continue
        # No ratio against a peer without a figure of its own (failed, or below the noise).
        ratios = [b / x for b, x in zip(base, s)] if base and min(base) > 0 else [float("nan")]
        step = true_median(s)
        rows.append({**role, "s_per_iter": step, "s_min": min(s), "s_max": max(s), "rounds": len(s),
                     "images_per_s": batch / step, "speedup": true_median(ratios), "speedup_min": min(ratios),
                     "speedup_max": max(ratios), "samples_s": s})
        print(f"  {n:>24}: {step * 1e3:8.1f} ms/it [{min(s) * 1e3:.1f}-{max(s) * 1e3:.1f}]  "
              f"{batch / step:8.1f} img/s  x{true_median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] "
              f"vs {PEER}", flush=True)
    pair_with_peers(rows, samples)
    return rows


def pair_with_peers(rows: list[dict], samples: dict[str, list[float]]) -> None:
    """Marks each side's fastest best form ("best": True) and gives every timed row with the BN term (but the
    fp32 peer) its peer of the same precision and the median [min-max] of the per-round ratios against it:
    an fp32 row against the fp32 peer; the engine's best forms against the best peer; the public best forms
    against the fp32 peer (what the careful user's configuration buys)."""
    timed = [r for r in rows if "s_per_iter" in r]
    for side in ("public", "exml"):
        best = [r for r in timed if r["side"] == side and r["form"] == "best" and r["bn"]]
        if best:
            min(best, key=lambda r: r["s_per_iter"])["best"] = True
    fp32_peer = next((r for r in timed if r["variant"] == PEER), None)
    best_peer = next((r for r in timed if r.get("best") and r["side"] == "public"), None)
    for r in timed:
        if not r["bn"] or r is fp32_peer or r["form"] == "listed":
            continue
        peer = best_peer if (r["side"], r["form"]) == ("exml", "best") else fp32_peer
        if peer is None:
            continue
        ratios = [a / b for a, b in zip(samples[peer["variant"]], samples[r["variant"]])]
        r.update(peer=peer["variant"], speedup_vs_peer=true_median(ratios), speedup_vs_peer_min=min(ratios),
                 speedup_vs_peer_max=max(ratios))


def bn_shares(rows: list[dict], samples: dict[str, list[float]]) -> list[dict]:
    """The BN term's cost in each loop timed with and without it (same-round pairs): what it adds (median
    [min-max] of with / without - 1) and its share of the step with it (1 - median of without / with)."""
    out = []
    timed = {r["variant"]: r for r in rows if "s_per_iter" in r}
    for name, r in timed.items():
        if r["bn"] or name.removesuffix(NO_BN) not in timed:
            continue
        with_bn = name.removesuffix(NO_BN)
        ratios = [w / wo for w, wo in zip(samples[with_bn], samples[name])]
        out.append({"variant": with_bn, "with_ms": timed[with_bn]["s_per_iter"] * 1e3,
                    "without_ms": r["s_per_iter"] * 1e3, "adds_pct": 100 * (true_median(ratios) - 1),
                    "adds_pct_min": 100 * (min(ratios) - 1), "adds_pct_max": 100 * (max(ratios) - 1),
                    "share_pct": 100 * (1 - true_median([1 / x for x in ratios])), "rounds": len(ratios)})
        print(f"  the BN term in {with_bn}: adds {out[-1]['adds_pct']:.1f} % [{out[-1]['adds_pct_min']:.1f}-"
              f"{out[-1]['adds_pct_max']:.1f}], {out[-1]['share_pct']:.1f} % of its step", flush=True)
    return out


def best_peer_mode(rows: list[dict]) -> str | None:
    """The compile mode of the fastest public best form in ``rows`` (None: none timed, or eager)."""
    r = next((r for r in rows if r.get("best") and r["side"] == "public"), None)
    if r is None or "+compile(" not in r["variant"]:
        return None
    return r["variant"].split("+compile(", 1)[1].rstrip(")")




def step_timing(name: str, variants: dict[str, Variant], args) -> tuple[dict, dict[str, str]]:
    """The timing of one net's variants: its rows, the BN term's shares, the fastest public best form's compile
    mode (kept in ``args.best_mode_of`` for the race) and, on the CPU, the convolutions' floor; and the
    variants that failed to run."""
    samples, failed = time_steps(variants, args)
    rows = timing_rows(variants, samples, failed, args.batch_of[name], args)
    shares = bn_shares(rows, samples)
    mode = best_peer_mode(rows)
    if mode is not None:
        args.best_mode_of[name] = mode
    step_s = {r["variant"]: r["s_per_iter"] for r in rows if "s_per_iter" in r}
    floor = (conv_floor(name, args.batch_of[name], step_s["exml fp32"])
             if "exml fp32" in step_s and args.device == "cpu" else None)
    if floor:
        print(f"  floor: the {floor['layers']} conv/linear layers alone (forward + input gradient) "
              f"{floor['floor_s'] * 1e3:.1f} ms/step = {floor['conv_gflops']:.0f} GFLOP/s "
              f"(sgemm {floor['sgemm_gflops']:.0f} GFLOP/s): {floor['fraction_of_floor']:.0%} of exml's step",
              flush=True)
    return {"timing": rows, "bn_share": shares, "best_peer_mode": mode, "floor": floor}, failed


def timing_markdown(net: dict) -> list[str]:
    """The timing table, the headline ratios, the BN term's share and the floor of one net's record."""
    lines = []
    if net["timing"]:
        lines += [f"| variant | ms / iteration | images / s | speed-up vs {PEER} | min–max ms | form | "
                  "speed-up vs its peer (same precision) |", "|---|---:|---:|---:|---|---|---|"]
    for r in net["timing"]:
        if "failed" in r:
            lines.append(f"| {r['variant']} | failed: {r['failed'][:80]} | | | | | |")
            continue
        form = r.get("form", "") + (" (fastest)" if r.get("best") else "")
        vs_peer = (f"{r['speedup_vs_peer']:.2f}x [{r['speedup_vs_peer_min']:.2f}-{r['speedup_vs_peer_max']:.2f}] "
                   f"vs {r['peer']}" if r.get("peer") else "—")
        lines.append(f"| {r['variant']} | {r['s_per_iter'] * 1e3:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x [{r['speedup_min']:.2f}-{r['speedup_max']:.2f}] | "
                     f"{r['s_min'] * 1e3:.1f}–{r['s_max'] * 1e3:.1f} | {form} | {vs_peer} |")
    lines += _pairs_text(net)
    f = net.get("floor")
    if f:
        lines += ["", f"Floor: the network's {f['layers']} convolution and linear layers run alone, forward + "
                  "input gradient, each on its own input shape in its fastest way (NCHW or channels_last "
                  "autograd, or the input gradient as a flipped-kernel convolution): "
                  f"{f['floor_s'] * 1e3:.1f} ms per step ({f['gflop_per_image']:.3g} GFLOP per image, "
                  f"{f['conv_gflops']:.0f} GFLOP/s): {f['fraction_of_floor']:.0%} of exml fp32's step. "
                  f"A 2048-square fp32 matmul runs at {f['sgemm_gflops']:.0f} GFLOP/s here"
                  + (", below the convolutions' rate, so the FLOPs at the GEMM rate would be no floor."
                     if f["sgemm_gflops"] < f["conv_gflops"] else ".")]
    return lines


def _pairs_text(net: dict) -> list[str]:
    """The headline ratios (precision with precision), what each variant runs, and the BN term's share."""
    timed = [r for r in net["timing"] if "s_per_iter" in r]
    lines = []
    heads = [f"**{r['variant']}** vs {r['peer']}: **{r['speedup_vs_peer']:.2f}x** [{r['speedup_vs_peer_min']:.2f}–"
             f"{r['speedup_vs_peer_max']:.2f}]" for r in timed
             if r.get("peer") and r["side"] == "exml" and (r["form"] == "fp32" or r.get("best"))]
    if heads:
        lines += ["", "Precision with precision: " + "; ".join(heads) + "."]
    if any(r.get("config") for r in timed):
        lines += ["", "What each variant runs:", ""]
        lines += [f"- {r['variant']}: {r['config']}" for r in timed if r.get("config")]
    if net.get("bn_share"):
        lines += ["", "The BN term's cost (each loop with and without it, same-round pairs):", "",
                  "| loop | ms / iteration with it | without | it adds [min–max] | its share of the step |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {b['variant']} | {b['with_ms']:.2f} | {b['without_ms']:.2f} | {b['adds_pct']:.1f} % "
                  f"[{b['adds_pct_min']:.1f}–{b['adds_pct_max']:.1f}] | {b['share_pct']:.1f} % |"
                  for b in net["bn_share"]]
    return lines



SCRIPT = "bench_synthesis_step.py"


def to_markdown(rec: dict) -> str:
    lines = header_markdown(rec, SCRIPT)
    for net in rec["results"]:
        lines += [f"## {net['net']}, batch {net['batch']}", "", *timing_markdown(net), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse(parser(__doc__), argv)
    t0 = time.perf_counter()
    env = environment(args.device, "synthesis (DeepInversion): step cost")
    results = []
    for name in args.nets:
        net_title(name, args, f"timing (K1={args.k1}, K2={args.k2}, {args.rounds} rounds)")
        torch._dynamo.reset()  # each net's compiled peers start from an empty cache (ResNet-18 and -34 share code)
        teacher = calibrated_teacher(name, args.device)
        timing, _ = step_timing(name, variants_for(teacher, name, args), args)
        results.append({"net": name, "batch": args.batch_of[name], **timing})
        print(flush=True)
    env["wall_s"] = time.perf_counter() - t0
    write(args, argv, SCRIPT, "synthesis_step", results, to_markdown, env)


if __name__ == "__main__":
    main()
