"""Where a class-incremental step's time goes: the losses, herding and the nearest-mean classifier.

For LwF, LwF.MC, iCaRL and DeepInversion-CIL (its synthesis replaced by stored random images, so only the
training step is measured) this trains the second task of a Split-MNIST-shaped stream (LeNet-5-BN, batch
32, toy images of the real shape and sizes) under torch.profiler and reports the top operators by self CPU
time and the share of the loss operators (cross-entropy, BCE, kd_loss, soft_target_cross_entropy and
their backward). Then it times iCaRL's herding (one class of 6000 MNIST-sized feature rows, m = 1000) and
the nearest-mean classifier on 10 000 test images against the per-class loop it replaces. Records
benches/results/cil_profile_<device>.{json,md}.

Usage:
    python benches/profile_cil.py [--device cpu] [--threads 1] [--quick] [--out benches/results]
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import env_markdown, environment, op_parser, record, timed_call, true_median  # noqa: E402

from exml_fast.cl import strategies as S  # noqa: E402
from exml_fast.cl.exemplars import herding, nearest_mean_logits  # noqa: E402
from exml_fast.cl.scenarios import Experience  # noqa: E402
from exml_fast.models import build_model  # noqa: E402

LOSS_OPS = ("cross_entropy", "nll_loss", "log_softmax", "binary_cross_entropy", "kd_loss", "soft_target",
            "sigmoid")


def _experience(i: int, classes, n: int) -> Experience:
    g = torch.Generator().manual_seed(i)
    y = torch.tensor(classes).repeat_interleave(n // len(classes))
    x = torch.randn(len(y), 1, 32, 32, generator=g)
    return Experience(i, tuple(classes), None, x, y, x[:10], y[:10])


def _strategies(device: str):
    common = {"epochs": 1, "progress": False, "device": device}
    shape = {"input_shape": (1, 32, 32), "mean": (0.1307,), "std": (0.3081,)}
    return {
        "lwf": lambda m: S.LwF(m, **common),
        "lwf (LwF.MC)": lambda m: S.LwF(m, form="mc", **common),
        "icarl": lambda m: S.ICaRL(m, **common),
        "deepinversion-cil (training step)": lambda m: S.DeepInversionCIL(m, **shape, **common),
    }


def profile_step(name: str, make, n: int, device: str) -> dict:
    torch.manual_seed(0)
    s = make(build_model("lenet5_bn", num_classes=10))
    if isinstance(s, S.DeepInversionCIL):
        fake = torch.randn(500, 1, 32, 32)
        s._synthesize = lambda teacher, classes, per_class, tag, i: (fake, torch.zeros(500, dtype=torch.int64))
    s.train(_experience(0, (0, 1), n))
    exp = _experience(1, (2, 3), n)
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        s.train(exp)
    wall = time.perf_counter() - t0
    steps = -(-exp.num_train // s.batch_size) + (len(s.memory) // s.batch_size if hasattr(s, "memory") else 0)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    loss = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in LOSS_OPS))
    return {"strategy": name, "wall_s": wall, "steps": steps, "ms_per_step": 1e3 * wall / max(1, steps),
            "loss_share": loss / total if total else 0.0,
            "top": [{"op": e.key, "share": e.self_cpu_time_total / total} for e in top]}


def time_herding_and_nme(device: str, quick: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    n, d, m = (1500, 84, 250) if quick else (6000, 84, 1000)
    f = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    herding(f, 10)
    t_herd = true_median([timed_call(lambda: herding(f, m), device) for _ in range(3)])
    x = torch.nn.functional.normalize(torch.randn(10000, d, generator=g), dim=1).to(device)
    means = torch.nn.functional.normalize(torch.randn(10, d, generator=g), dim=1).to(device)

    def loop():
        return torch.stack([((x - mu) ** 2).sum(1) for mu in means], 1).argmin(1)

    assert torch.equal(loop(), nearest_mean_logits(x, means).argmax(1))
    t_nme = true_median([timed_call(lambda: nearest_mean_logits(x, means).argmax(1), device) for _ in range(20)])
    t_loop = true_median([timed_call(loop, device) for _ in range(20)])
    return {"herding": {"n": n, "d": d, "m": m, "seconds": t_herd},
            "nme": {"images": 10000, "classes": 10, "ms": 1e3 * t_nme, "per_class_loop_ms": 1e3 * t_loop}}


def to_markdown(rec: dict) -> str:
    lines = env_markdown(rec["env"], "class-incremental step profile", "python benches/profile_cil.py "
                         + " ".join(rec["argv"]))
    lines += ["The second task of a Split-MNIST-shaped stream (LeNet-5-BN, batch 32, "
              f"{rec['n']} images per task; iCaRL adds its 2000 exemplars), trained once under torch.profiler "
              "(profiling overhead included in the wall time). Loss operators: cross-entropy, NLL, log-softmax, "
              "BCE, sigmoid, kd_loss, soft_target_cross_entropy and their backward.", "",
              "| strategy | ms per step | loss operators' share | top operators (self CPU share) |",
              "|---|---:|---:|---|"]
    for r in rec["steps"]:
        tops = ", ".join(f"{t['op']} {100 * t['share']:.0f} %" for t in r["top"][:5])
        lines.append(f"| {r['strategy']} | {r['ms_per_step']:.2f} | {100 * r['loss_share']:.1f} % | {tops} |")
    h, nme = rec["herding"]["herding"], rec["herding"]["nme"]
    lines += ["", f"- herding: {h['m']} of {h['n']} rows of {h['d']} features in {h['seconds']:.2f} s "
                  "(one vectorised step per exemplar)",
              f"- nearest mean of exemplars: {nme['images']} images, {nme['classes']} classes: {nme['ms']:.2f} ms "
              f"(one matrix product) vs {nme['per_class_loop_ms']:.2f} ms for a loop over the classes", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = op_parser(__doc__, quick_help="3000 images per task, smaller herding")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n = 3000 if args.quick else 12000
    env = environment(args.device, "class-incremental step profile")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = [profile_step(name, make, n, args.device) for name, make in _strategies(args.device).items()]
    for r in steps:
        print(f"{r['strategy']:>34}: {r['ms_per_step']:.2f} ms/step, loss ops {100 * r['loss_share']:.1f} %; top: "
              + ", ".join(f"{t['op']} {100 * t['share']:.0f}%" for t in r["top"][:4]), flush=True)
    hn = time_herding_and_nme(args.device, args.quick)
    print(f"herding {hn['herding']['seconds']:.2f} s; NME {hn['nme']['ms']:.2f} ms vs loop "
          f"{hn['nme']['per_class_loop_ms']:.2f} ms", flush=True)
    env["wall_s"] = time.perf_counter() - t0
    rec = {"env": env, "argv": sys.argv[1:] if argv is None else list(argv), "n": n, "steps": steps, "herding": hn}
    record(args.out, f"cil_profile_{args.device}" + ("_quick" if args.quick else ""), rec, to_markdown(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
