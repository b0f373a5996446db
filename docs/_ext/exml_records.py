"""Tables and record pages generated from ``benches/results/**/*.json`` when the docs are built.

``generate(repo, srcdir)`` writes ``<srcdir>/_generated/<name>.md`` (the tables the guides include) and
``<srcdir>/records/**`` (one page per recorded run, plus an index). Nothing it writes is committed: every figure
on the site is read from a record at build time. ``headline_rows(repo)`` gives the README's headline table,
which ``python_tests/test_docs.py`` checks against the README, row by row.

As a Sphinx extension (``extensions = ["exml_records"]``) it runs at ``config-inited``, before the sources are
read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path("benches") / "results"


# ---------------------------------------------------------------------------------------------------------------
# formatting


def _pct(x: float) -> str:
    return f"{x:.2f}"


def _pm(mean: float, std: float | None) -> str:
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return _pct(mean)
    return f"{mean:.2f} ± {std:.2f}"


def _ms(x: float) -> str:
    return f"{x:.3f} ms" if x < 0.1 else f"{x:.2f} ms"


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _load(repo: Path, rel: str) -> dict:
    return json.loads((repo / RESULTS / rel).read_text())


def record_link(rel: str, text: str | None = None, *, from_docs: bool = True) -> str:
    """A Markdown link to the record page of ``benches/results/<rel>`` (a .json or .md path)."""
    stem = rel.rsplit(".", 1)[0]
    target = f"records/{stem}.md" if from_docs else f"{RESULTS}/{stem}.md"
    return f"[{text or Path(stem).name}]({target})"


def _machine(d: dict) -> dict:
    """The machine a record ran on, whichever schema it has (``env``, ``meta.machine`` or ``machine``)."""
    for m in (d.get("machine"), (d.get("meta") or {}).get("machine"), d.get("env")):
        if isinstance(m, dict) and m:
            return m
    return {}


def machine_line(d: dict) -> str:
    m = _machine(d)
    if not m:
        return "machine not recorded"
    parts = [str(m.get("device", "?"))]
    if m.get("threads") is not None:
        parts.append(f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}")
    if m.get("torch"):
        parts.append(f"torch {m['torch']}")
    if m.get("commit"):
        parts.append(f"commit `{m['commit']}`")
    if m.get("date"):
        parts.append(str(m["date"])[:10])
    return ", ".join(parts)


def _command(d: dict) -> str | None:
    cmd = d.get("command") or (d.get("meta") or {}).get("command")
    if cmd:
        return cmd
    if isinstance(d.get("argv"), list):
        return " ".join(["(script)"] + [str(a) for a in d["argv"]])
    return None


# ---------------------------------------------------------------------------------------------------------------
# reproduction tables


def table2(d: dict) -> str:
    """ExML Table 2 (``exml_mnist*.json``): ours beside the paper's, per scenario and strategy."""
    rows = [[r["scenario"], f"`{r['strategy']}`", str(r["runs"]), _pm(r["mean"], r.get("std")),
             _pm(r["paper_mean"], r.get("paper_std")) if r.get("paper_mean") is not None else "—",
             "yes" if r.get("within_2_std") else "no"] for r in d["rows"]]
    return _table(["scenario", "strategy", "streams", "stream accuracy (%)", "paper (%)", "within 2 paper std"],
                  rows, ["---", "---", "---:", "---:", "---:", "---"])


def cil(d: dict) -> str:
    """Class-incremental table (``cil_*.json``): final and average incremental accuracy over seeds."""
    rows = []
    for r in d["rows"]:
        pub = r.get("published") or {}
        rows.append([f"`{r['strategy']}`", "yes" if r["keeps_data"] else "no", str(r["runs"]),
                     _pm(r["final"]["mean"], r["final"].get("std")),
                     _pm(r["average_incremental"]["mean"], r["average_incremental"].get("std")),
                     f"{r['seconds_per_run']:.0f}" if r.get("seconds_per_run") else "—",
                     pub.get("value") or "—"])
    return _table(["strategy", "keeps real data", "seeds", "final (%)", "average incremental (%)", "seconds / run",
                   "published (%)"], rows, ["---", "---", "---:", "---:", "---:", "---:", "---:"])


def ablation(d: dict) -> str:
    """The ED ablation (``exml_mnist_ablation.json``): validation accuracy per variant, the selected row's test."""
    rows = []
    for r in d["rows"]:
        opts = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items()) or "—"
        name = f"`{r['variant']}`" + (" (selected)" if r["variant"] == d.get("selected") else "")
        secs = f"{r.get('generate_s', 0):.0f} + {r.get('distill_s', 0):.0f}"
        rows.append([name, f"`{r['strategy']}`", opts, _pm(r["mean"], r.get("std")), secs])
    out = _table(["variant", "strategy", "options", "validation stream accuracy (%)", "synthesis + distillation s/run"],
                 rows, ["---", "---", "---", "---:", "---:"])
    t = d.get("test")
    if t:
        seeds = ", ".join(str(s) for s in t["seeds"])
        out += (f"\nThe selected row on the test set, {t['runs']} fresh streams (seeds {seeds}): "
                f"**{_pm(t['mean'], t.get('std'))} %**.\n")
    return out


def _zskd_test(d: dict) -> str:
    """A zero-shot KD record's test figure: the mean ± std of its KD seeds where it has several, else its one."""
    runs = d.get("kd_seeds", [])
    if len(runs) > 1:
        return f"{_pm(d['student_mean']['test'], d['student_std']['test'])} % ({len(runs)} KD seeds)"
    return f"{_pct(d['student']['test'])} %"


def zskd(d: dict) -> str:
    """Zero-shot KD from Data Impressions (``zskd_*.json``): teacher, student on DIs, real-data control."""
    paper = d.get("paper") or {}
    n = d.get("n_dis")
    rows = []
    if isinstance(d.get("teacher"), dict):
        rows.append(["teacher", _pct(d["teacher"]["validation"]), _pct(d["teacher"]["test"]),
                     _pct(paper["teacher"]) if paper.get("teacher") else ""])
        runs = d.get("kd_seeds", [])
        rows.append([f"student on {n} DIs only" + (", KD seed 0" if len(runs) > 1 else ""),
                     _pct(d["student"]["validation"]), _pct(d["student"]["test"]),
                     _pct(paper["student"]) if paper.get("student") else ""])
        if len(runs) > 1:
            mean, std = d["student_mean"], d["student_std"]
            rows.append([f"student on {n} DIs only, mean ± std of KD seeds 0-{len(runs) - 1}",
                         _pm(mean["validation"], std["validation"]), _pm(mean["test"], std["test"]), ""])
    else:
        rows.append(["teacher", "", _pct(d["teacher_acc"]), _pct(paper["teacher"]) if paper.get("teacher") else ""])
        rows.append([f"student on {n} DIs only", "", _pct(d["student_acc"]),
                     _pct(paper["student"]) if paper.get("student") else ""])
    c = d.get("control")
    if c:
        rows.append([f"control: the student on {c['n']} real images", _pct(c["student"]["validation"]),
                     _pct(c["student"]["test"]), ""])
    return _table(["", "validation (%)", "test (%)", f"paper (%, {paper.get('n', '?')} DIs)"], rows,
                  ["---", "---:", "---:", "---:"])


_METHOD = {"data-impressions": "Data Impressions", "dafl": "DAFL", "dfad": "DFAD", "skd": "SKD"}


def _control_row(label: str, c: dict) -> list[str]:
    """A dfkd table's real-data control row: ``label: n real images`` and the student's two scores."""
    return [f"{label}: {c['n']} real images", "", "",
            f"{_pct(c['student']['validation'])} / {_pct(c['student']['test'])}"]


def dfkd(d: dict) -> str:
    """Data-free KD from trained generators (``dfkd_*.json``): synthesis time and the student per method."""
    rows = []
    for r in d["rows"]:
        name = _METHOD.get(r["method"], r["method"]) + (" (selected)" if r["method"] == d.get("selected") else "")
        fit = r.get("fit_s") or (r.get("fit") or {}).get("seconds")
        s = r.get("student") or {}
        rows.append([name, f"{r['synthesis_s']:.0f}" if r.get("synthesis_s") is not None else "—",
                     f"{fit:.0f}" if fit else "", f"{_pct(s['validation'])} / {_pct(s['test'])}" if s else "—"])
    if d.get("control"):
        rows.append(_control_row("control", d["control"]))
    for r in d["rows"]:  # the public recipe's: a control per method, its student trained as that method's
        if r.get("control"):
            rows.append(_control_row(f"control of {_METHOD.get(r['method'], r['method'])}", r["control"]))
    out = _table(["method", "synthesis (s)", "of which generator fit (s)", "student validation / test (%)"], rows,
                 ["---", "---:", "---:", "---:"])
    t = d.get("teacher_acc")
    if isinstance(t, dict):
        out += f"\nThe teacher scores {_pct(t['test'])} % on the test set ({_pct(t['validation'])} % validation).\n"
    own = [r for r in d["rows"] if isinstance(r.get("teacher_acc"), dict)]  # each method's own teacher
    if own:
        out += "\n" + "; ".join(f"{_METHOD.get(r['method'], r['method'])}'s teacher scores "
                                f"{_pct(r['teacher_acc']['test'])} % on the test set "
                                f"({_pct(r['teacher_acc']['validation'])} % validation)" for r in own) + ".\n"
    best = [r for r in d["rows"] if r.get("student_best")]
    if best:
        out += "\nThe best-validation student of the public code's epochs: " + "; ".join(
            f"{_METHOD.get(r['method'], r['method'])} step {r['student_best']['step']}, "
            f"{_pct(r['student_best']['validation'])} / {_pct(r['student_best']['test'])} %" for r in best) + ".\n"
    return out


def validation(d: dict) -> str:
    """Settings scored on the held-out split (``cil_*_validation.json``): final accuracy per seed and the mean."""
    seeds = d.get("seeds") or []
    best = max(r["final_mean"] for r in d["rows"])
    rows = []
    for r in d["rows"]:
        mean = _pct(r["final_mean"])
        rows.append([r["setting"], " / ".join(_pct(f) for f in r["finals"]),
                     f"**{mean}**" if r["final_mean"] == best else mean, _pct(r["aia_mean"])])
    return _table(["setting", f"final, seed {' / seed '.join(str(s) for s in seeds)} (%)", "final, mean (%)",
                   "average incremental, mean (%)"], rows, ["---", "---", "---:", "---:"])


def skd_transfer(d: dict) -> str:
    """SKD's sanity figure (``skd_transfer_*.json``): the teacher and its classifier on the delegator's student."""
    names = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
    rows = [[names.get(r["dataset"], r["dataset"]), f"{100 * r['teacher_test_acc']:.2f} %",
             f"{100 * r['student_test_acc']:.2f} %", f"{100 * r['gap']:.2f}"] for r in d["rows"]]
    return _table(["dataset", "T_0", "S_0 (T_0's head)", "gap (points)"], rows, ["---", "---:", "---:", "---:"])


def avalanche(d: dict) -> str:
    """Avalanche replay rows (``avalanche_*.json``): final accuracy over the seeds and the median wall time."""
    rows = [[f"`{r['row']}`", r["keeps"], _pm(r["final_mean"], r["final_std"]), f"{r['wall_s_median']:.0f}"]
            for r in d["rows"]]
    return _table(["row", "keeps of past data", f"final accuracy, {len(d['seeds'])} seeds (%)",
                   "wall, median (s)"], rows, ["---", "---", "---:", "---:"])


def compress_quantize(d: dict) -> str:
    """int8 calibration sources (``compress_quantize_*.json``): test accuracy of each int8 model, latency."""
    rows = []
    for m in d["models"]:
        acc = {r["source"]: r for r in m["rows"]}
        lf, li = m["latency_float_ms"], m["latency_int8_ms"]
        rows.append([m["name"], _pct(m["float_accuracy"])]
                    + [_pct(acc[s]["accuracy"]) for s in ("real", "noise", "zeroq", "deepinversion")]
                    + [f"{acc['deepinversion']['synthesis_s']:.0f}", f"{_ms(lf['median'])} → {_ms(li['median'])}"])
    return _table(["model", "float", "int8, real images", "int8, noise", "int8, ZeroQ", "int8, DeepInversion",
                   "DI synthesis (s)", "latency float → int8"], rows,
                  ["---"] + ["---:"] * 6 + ["---"])


def compress_prune(d: dict) -> str:
    """Channel pruning to half the MACs (``compress_prune_*.json``): test accuracy of each row."""
    names = [r["row"] for r in d["models"][0]["rows"]]
    rows = []
    for m in d["models"]:
        acc = {r["row"]: r for r in m["rows"]}
        rows.append([m["name"], _pct(m["float_accuracy"])] + [_pct(acc[n]["accuracy"]) for n in names]
                    + [f"{100 * acc[names[1]]['flops_reduction']:.1f} %"])
    return _table(["model", "float"] + names + ["MACs removed"], rows, ["---"] + ["---:"] * (len(names) + 2))


def compress_prune_budget(d: dict) -> str:
    """Pruning against the number of images (``compress_prune_budget_*.json``): DI vs real at each n."""
    rows = []
    for m in d["models"]:
        for n in m["budget_n"]:
            acc = {r["row"]: r for r in m["rows"] if r["n"] == n}
            di, real = acc["taylor, DI"], acc["taylor, real (ceiling)"]
            rows.append([m["name"], _pct(m["float_accuracy"]), str(n), str(di["recover_epochs"]),
                         f"{_pct(di['accuracy'])} ({-di['drop_vs_float']:+.2f})",
                         f"{_pct(real['accuracy'])} ({-real['drop_vs_float']:+.2f})"])
    return _table(["model", "float", "images", "epochs", "taylor, DI", "taylor, real (ceiling)"], rows,
                  ["---"] + ["---:"] * 5)


def compress_prune_study(d: dict) -> str:
    """Where the pruning loses its points (``compress_prune_study_*.json``): one change at a time, validation %."""
    rows = []
    for m in d["models"]:
        base = m["rows"][0]["accuracy"]
        for r in m["rows"]:
            rows.append([m["name"], r["row"], r["scores"], r["recovery"], str(r["steps"]),
                         f"{_pct(r['accuracy'])} ({-r['drop_vs_float']:+.2f})", f"{r['accuracy'] - base:+.2f}"])
    return _table(["model", "variant", "scores on", "recovery on", "steps", "validation % (vs float)",
                   "vs recipe"], rows, ["---", "---", "---", "---", "---:", "---:", "---:"])


_NETS = {"lenet5_bn": "LeNet-5-BN (MNIST)", "resnet18": "ResNet-18 (CIFAR shapes)",
         "resnet34": "ResNet-34 (CIFAR shapes)", "resnet50": "ResNet-50"}


def _floor(floor: dict) -> str:
    if not floor.get("floor_s"):
        return "—"
    ms = 1000 * floor["floor_s"]
    value = f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"
    return f"{value} ms ({100 * floor['fraction_of_floor']:.0f} %)"


def synthesis_step(d: dict) -> str:
    """One DeepInversion step (``synthesis_*.json``): the public loop, its compiled form and the engine.

    "vs peer" is the record's own speed-up of the engine over the frozen public loop (paired rounds); "vs compiled
    peer" the ratio of the two medians; the floor is the network's convolutions alone and its share of the step.
    """
    rows = []
    for r in d["results"]:
        t = {x["variant"]: x for x in r["timing"]}
        if "exml fp32" not in t:
            continue
        ms = {k: f"{1000 * v['s_per_iter']:.0f} ms" for k, v in t.items()}
        exml = t["exml fp32"]
        comp = t.get("public frozen+compile")
        floor = r.get("floor") or {}
        rows.append([f"{_NETS.get(r['net'], r['net'])}, {r['batch']}", ms.get("public as shipped", "—"),
                     ms.get("public frozen", "—"), ms.get("public frozen+compile", "—"), ms["exml fp32"],
                     f"**{exml['speedup']:.2f}×**",
                     f"{comp['s_per_iter'] / exml['s_per_iter']:.2f}×" if comp else "—",
                     _floor(floor)])
    return _table(["teacher, batch", "public as shipped", "public frozen (peer)", "frozen + `torch.compile`",
                   "`DeepInversion` fp32", "vs peer", "vs compiled peer", "floor (share of the engine's step)"],
                  rows, ["---"] + ["---:"] * 7)


def distributed(d: dict) -> str:
    rows = [[f"{r['procs']} × {r['threads_per_proc']}", f"{r['images_per_s']:.1f}", f"×{r['speedup']:.2f}",
             str(r.get("same_bits", ""))] for r in d["rows"]]
    return _table(["processes × threads", "images/s", "speed-up", "same bits as one process"], rows,
                  ["---", "---:", "---:", "---"])


# ---------------------------------------------------------------------------------------------------------------
# op benchmarks: rows that differ only in their variant become one row with a column per variant

_MEASURES = {"variant", "ms", "speedup_vs_reference", "exml_fast_speedup", "GB/s", "pct_copy_bw", "rounds",
             "rows_per_s", "gammas_per_s", "ms_min", "ms_max", "samples_ms", "elements_per_s",
             # benchlib's timing columns (Timing.fields) and the paired ratios' range
             "inner", "timer", "speedup_min", "speedup_max"}


def _case(r: dict) -> str:
    parts = []
    for k, v in r.items():
        if k in _MEASURES or isinstance(v, dict):
            continue
        if isinstance(v, list):
            v = "(" + ", ".join(str(x) for x in v) + ")"
        parts.append(f"{k} {v}")
    return ", ".join(parts)


def _speedup(by: dict[str, dict], variant: str) -> float:
    """The record's own speed-up of ``variant`` over the reference where it has one (a ratio of paired rounds,
    not of the two medians), else the ratio of the medians."""
    if "speedup_vs_reference" in by[variant]:
        return by[variant]["speedup_vs_reference"]
    if variant == "exml_fast" and "exml_fast_speedup" in by["reference"]:
        return by["reference"]["exml_fast_speedup"]
    return by["reference"]["ms"] / by[variant]["ms"]


def op_bench(rows: list[dict]) -> str:
    """One row per case, one ms column per variant, and the speed-up of every variant over ``reference``."""
    cases: dict[str, dict[str, dict]] = {}
    variants: list[str] = []
    for r in rows:
        if "variant" not in r or "ms" not in r:
            continue
        cases.setdefault(_case(r), {})[r["variant"]] = r
        if r["variant"] not in variants:
            variants.append(r["variant"])
    fast = [v for v in variants if v.startswith("exml")]
    header = ["case"] + variants + [f"{v} vs reference" for v in fast if "reference" in variants]
    out_rows = []
    for case, by in cases.items():
        row = [case] + [_ms(by[v]["ms"]) if v in by else "—" for v in variants]
        if "reference" in variants:
            row += [f"{_speedup(by, v):.1f}×" if v in by and "reference" in by else "—" for v in fast]
        out_rows.append(row)
    return _table(header, out_rows, ["---"] + ["---:"] * (len(header) - 1))


def op_benchmarks(repo: Path) -> str:
    """Every recorded CPU op benchmark, one table per record and list."""
    out = []
    for rel in ["image_priors_cpu.json", "soft_target_losses_cpu.json", "soft_target_losses_cpu_avx2.json",
                "dirichlet_cpu.json", "augment_cpu_float32.json", "bn_stats_cpu.json", "window_pool_cpu.json",
                "tanh_cpu.json", "upsample_conv_cpu.json", "upsample_conv_cpu_bf16.json"]:
        if not (repo / RESULTS / rel).exists():
            continue
        d = _load(repo, rel)
        for key, rows in d.items():
            if not (isinstance(rows, list) and rows and isinstance(rows[0], dict) and "variant" in rows[0]
                    and "ms" in rows[0]):
                continue
            part = "" if key in ("rows", "results") else f": `{key}`"
            out.append(f"### {rel[:-5]}{part}\n\n{machine_line(d)}; {record_link(rel, 'the record')}.\n\n"
                       + op_bench(rows))
    return "\n".join(out)


def gpu_runs(repo: Path) -> str:
    """One row per ``make gpu-check`` / ``gpu_perf`` summary under ``benches/results/gpu``."""
    rows = []
    for path in sorted((repo / RESULTS / "gpu").rglob("summary*.json")):
        d = json.loads(path.read_text())
        env, totals = d.get("env") or {}, d.get("totals") or {}
        gpu = next((s.get("summary") for s in d.get("steps", []) if s["name"] == "gpu"), None) or "?"
        py, ct = totals.get("pytest"), totals.get("ctest")
        tests = f"{py['passed']} passed, {py['failed']} failed" if py else "—"
        ctest = f"{ct['passed']}/{ct['passed'] + ct['failed']}" if ct else "—"
        steps = d.get("steps", [])
        passed = sum(s["status"] == "pass" for s in steps)
        failed = ", ".join(s["name"] for s in steps if s["status"] not in ("pass",)) or "none"
        rel = path.relative_to(repo / RESULTS).as_posix()
        rows.append([record_link(rel, rel), gpu.split(",")[0], str(env.get("date", "?"))[:10],
                     f"`{str(env.get('commit', '?'))[:7]}`", str(env.get("torch", "?")), tests, ctest,
                     f"{passed}/{len(steps)}", failed])
    return _table(["summary", "GPU", "date", "commit", "torch", "CUDA tests", "ctest", "steps passed",
                   "steps failed or not run"], rows)


# ---------------------------------------------------------------------------------------------------------------
# headline figures (the README's table)


def _synthesis_speedup(d: dict, net: str) -> float:
    r = next(r for r in d["results"] if r["net"] == net)
    return next(t["speedup"] for t in r["timing"] if t["variant"] == "exml fp32")


def _gpu_synthesis(d: dict, net: str) -> str:
    """'a× / b× faster': exml fp32 vs the public loop in fp32; the engine's best form vs the public loop's."""
    timing = next(r for r in d["results"] if r["net"] == net)["timing"]
    fp32 = next(t["speedup"] for t in timing if t["variant"] == "exml fp32")
    best = next(t["speedup_vs_peer"] for t in timing if t.get("best") and t["side"] == "exml")
    return f"{fp32:.2f}× / {best:.2f}× faster"


def _ttq_speedup(d: dict) -> float:
    return max(e["speedup"] for e in d["results"][0]["ttq"]["engine"] if e.get("speedup"))


def _cil_row(d: dict, strategy: str) -> dict:
    return next(r for r in d["rows"] if r["strategy"] == strategy)


def _cil_final(d: dict, strategy: str) -> str:
    final = _cil_row(d, strategy)["final"]
    return f"{_pm(final['mean'], final['std'])} %"


def _op_speedup(d: dict, key: str, match: dict, variant: str) -> float:
    rows = [r for r in d[key] if all(r.get(k) == v for k, v in match.items())]
    ms = {r["variant"]: r["ms"] for r in rows}
    return ms["reference"] / ms[variant]


def _public_best(d: dict, method: str) -> str:
    """'a % / b %': a public-recipe row's best-validation student and its real-data control, on the test set."""
    r = next(r for r in d["rows"] if r["method"] == method)
    return f"{r['student_best']['test']:.2f} % / {r['control']['student']['test']:.2f} %"


def _dist_speedup(d: dict) -> float:
    return max(r["speedup"] for r in d["rows"] if r["threads_per_proc"] == 1)


# (what, record, figure from the record; or a tuple of records, whose figure gets their dicts in a list)
HEADLINES: list[tuple[str, str | tuple[str, ...], Callable[[Any], str]]] = [
    ("DeepInversion step vs the public loop (teacher frozen), LeNet-5-BN, batch 256, 1 CPU thread",
     "synthesis_cpu.json", lambda d: f"{_synthesis_speedup(d, 'lenet5_bn'):.2f}× faster"),
    ("DeepInversion step on an H100, CIFAR ResNet-18, batch 256: fp32 vs the public loop in fp32 / bf16 + "
     "channels_last + CUDA graph vs the public loop's bf16 + channels_last + torch.compile",
     "gpu/h100_2026-11-27/perf/benches/synthesis_cuda_perf_resnet18.json", lambda d: _gpu_synthesis(d, "resnet18")),
    ("DeepInversion time to the public loop's quality, LeNet-5-BN, 1 CPU thread",
     "synthesis_cpu_ttq.json", lambda d: f"{_ttq_speedup(d):.2f}× faster"),
    ("BN-statistic matching over a CIFAR ResNet-18's 20 BN inputs, batch 256, channels_last",
     "bn_stats_cpu.json",
     lambda d: f"{_op_speedup(d, 'op_level', {'batch': 256, 'layout': 'channels_last'}, 'exml_fast'):.1f}× "
               "the reference"),
    ("ExML on Split MNIST, the ablation's selected row (`--preset ed-best`) at the demo budget, test "
     "(paper's best row, at its full budget: 43.23 ± 3.00 %)",
     "exml_mnist_ablation.json", lambda d: f"{_pm(d['test']['mean'], d['test']['std'])} %"),
    ("ExML Table 2, Oracle at the paper's budget, 5 streams (paper: 99.42 ± 0.19 %)",
     "exml_mnist.json", lambda d: f"{_pm(d['rows'][0]['mean'], d['rows'][0]['std'])} %"),
    ("Class-incremental Split MNIST, final accuracy, 5 seeds: no real image kept (`synthetic-exemplars`) / "
     "iCaRL with 2000 real exemplars",
     "cil_mnist.json", lambda d: " / ".join(_cil_final(d, s) for s in ("synthetic-exemplars", "icarl"))),
    ("Zero-shot KD from Data Impressions, LeNet-5-Half test: MNIST from 24000 / Fashion-MNIST from 48000 "
     "(paper: 98.77 / 79.62 %)",
     ("zskd_mnist.json", "zskd_fmnist.json"), lambda ds: " / ".join(_zskd_test(d) for d in ds)),
    ("Data-free KD, DFAD as its public code runs it (2000 generator steps of 512, 2 CPU threads), LeNet-5-Half "
     "test: the best-validation student (paper: 98.30 %) / the same student on real images",
     "dfkd_mnist_public_dfad.json", lambda d: _public_best(d, "dfad")),
    ("Synthesis sharded over 2 processes under `torchrun` vs 1 (bit-identical)",
     "distributed_cpu.json", lambda d: f"{_dist_speedup(d):.2f}× images/s"),
]


def headline_rows(repo: Path) -> list[tuple[str, str, str | tuple[str, ...]]]:
    """(what, figure, record path or paths) for each headline, read from the records (a figure read from several
    records gets their dicts in a list)."""
    return [(what, fig([_load(repo, r) for r in rel] if isinstance(rel, tuple) else _load(repo, rel)), rel)
            for what, rel, fig in HEADLINES]


def headline_links(rel: str | tuple[str, ...], *, from_docs: bool) -> str:
    """The record column of a headline: a link to each of its records, named by the file."""
    rels = rel if isinstance(rel, tuple) else (rel,)
    return ", ".join(record_link(r, Path(r).stem, from_docs=from_docs) for r in rels)


def headline_table(repo: Path, *, from_docs: bool) -> str:
    rows = [[what, fig, headline_links(rel, from_docs=from_docs)] for what, fig, rel in headline_rows(repo)]
    return _table(["what", "figure", "record"], rows, ["---", "---:", "---"])


# ---------------------------------------------------------------------------------------------------------------
# record pages

_LINK = re.compile(r"\[([^\]]*)\]\((?!https?:)([^)]*)\)")


def _demote(md: str) -> str:
    """The record's own Markdown under the page's title: headings one level down, local links as text."""
    out, fence = [], False
    for line in md.splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence:
            if re.match(r"^#{1,5} ", line):
                line = "#" + line
                line = "#" * max(3, len(line.split(" ", 1)[0])) + " " + line.split(" ", 1)[1]
            line = _LINK.sub(lambda m: f"{m.group(1)} (`{m.group(2)}`)", line)
        out.append(line)
    return "\n".join(out)


def _record_page(repo: Path, json_path: Path) -> str:
    rel = json_path.relative_to(repo / RESULTS)
    d = json.loads(json_path.read_text())
    title = str(rel.with_suffix(""))
    lines = [f"# {title}", "", f"- file: `benches/results/{rel}`", f"- machine: {machine_line(d)}"]
    cmd = _command(d)
    if cmd:
        lines.append(f"- command: `{cmd}`")
    lines.append("")
    md = json_path.with_suffix(".md")
    if md.exists():
        lines += ["## The record", "", "As its script wrote it, from the same run:", "", _demote(md.read_text())]
    else:
        lines += ["## Contents", "", "```json", json.dumps(d, indent=1)[:20000], "```"]
    return "\n".join(lines).rstrip() + "\n"


def _records_index(repo: Path, pages: list[Path]) -> str:
    rows = []
    for p in pages:
        rel = p.relative_to(repo / RESULTS)
        d = json.loads(p.read_text())
        rows.append([f"[{rel.with_suffix('')}]({rel.with_suffix('.md')})", machine_line(d)])
    return ("# Recorded runs\n\nEvery run recorded under `benches/results/` (the ledgers `*_runs.json` aside), "
            "as its script wrote it. `benches/results/README.md` says which command writes which file.\n\n"
            "```{toctree}\n:hidden:\n:glob:\n\n*\ngpu/*\ngpu/*/*\ngpu/*/*/*\ngpu/*/*/*/*\n```\n\n"
            + _table(["record", "machine"], rows))


def _write(path: Path, text: str) -> None:
    """Write only when the text changes, so Sphinx re-reads only what changed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


GENERATED_TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "exml_mnist_demo": ("exml_mnist_demo.json", table2),
    "exml_mnist": ("exml_mnist.json", table2),
    "exml_mnist_ablation": ("exml_mnist_ablation.json", ablation),
    "cil_mnist": ("cil_mnist.json", cil),
    "cil_fmnist": ("cil_fmnist.json", cil),
    "zskd_mnist": ("zskd_mnist.json", zskd),
    "zskd_mnist_demo": ("zskd_mnist_demo.json", zskd),
    "zskd_fmnist_demo": ("zskd_fmnist_demo.json", zskd),
    "zskd_fmnist": ("zskd_fmnist.json", zskd),
    "dfkd_mnist_demo": ("dfkd_mnist_demo.json", dfkd),
    "dfkd_mnist_demo_fresh": ("dfkd_mnist_demo_fresh.json", dfkd),
    "dfkd_mnist_demo_public": ("dfkd_mnist_demo_public.json", dfkd),
    "dfkd_mnist_public_dfad": ("dfkd_mnist_public_dfad.json", dfkd),
    "dfkd_mnist": ("dfkd_mnist.json", dfkd),
    "distributed_cpu": ("distributed_cpu.json", distributed),
    "cil_dicil_validation": ("cil_dicil_validation.json", validation),
    "synthesis_cpu": ("synthesis_cpu.json", synthesis_step),
    "cil_skd_validation": ("cil_skd_validation.json", validation),
    "skd_transfer_cpu_skd-narrow": ("skd_transfer_cpu_skd-narrow.json", skd_transfer),
    "avalanche_mnist": ("avalanche_mnist.json", avalanche),
    "avalanche_fmnist": ("avalanche_fmnist.json", avalanche),
    "compress_quantize_cpu": ("compress_quantize_cpu.json", compress_quantize),
    "compress_prune_cpu": ("compress_prune_cpu.json", compress_prune),
    "compress_prune_logits_cpu": ("compress_prune_logits_cpu.json", compress_prune),
    "compress_prune_mbv2_di1000_cpu": ("compress_prune_mbv2_di1000_cpu.json", compress_prune),
    "compress_prune_lenet_fmnist_di2000_cpu": ("compress_prune_lenet_fmnist_di2000_cpu.json", compress_prune),
    "compress_prune_lenet_fmnist_aug_cpu": ("compress_prune_lenet_fmnist_aug_cpu.json", compress_prune),
    "compress_prune_budget_cpu": ("compress_prune_budget_cpu.json", compress_prune_budget),
    "compress_prune_study_cpu": ("compress_prune_study_cpu.json", compress_prune_study),
    "compress_prune_study_di2000_cpu": ("compress_prune_study_di2000_cpu.json", compress_prune_study),
}


def generate(repo: Path, srcdir: Path) -> None:
    gen = srcdir / "_generated"
    for name, (rel, fn) in GENERATED_TABLES.items():
        d = _load(repo, rel)
        _write(gen / f"{name}.md", fn(d) + f"\n{machine_line(d)}; {record_link(rel, 'the record')}.\n")
    _write(gen / "headlines.md", headline_table(repo, from_docs=True))
    _write(gen / "op_benchmarks.md", op_benchmarks(repo))
    _write(gen / "gpu_runs.md", gpu_runs(repo))
    pages = sorted(p for p in (repo / RESULTS).rglob("*.json")
                   if not p.name.endswith("_runs.json") and "logs" not in p.parts)
    for p in pages:
        _write(srcdir / "records" / p.relative_to(repo / RESULTS).with_suffix(".md"), _record_page(repo, p))
    _write(srcdir / "records" / "index.md", _records_index(repo, pages))


def _on_config_inited(app, config) -> None:
    srcdir = Path(app.srcdir)
    generate(srcdir.parent, srcdir)


def setup(app):
    app.connect("config-inited", _on_config_inited)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
