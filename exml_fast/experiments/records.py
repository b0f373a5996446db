"""Records of experiments in ``benches/results``: the machine and versions they ran on, the seconds their runs
took, and the atomic JSON + Markdown writer."""

from __future__ import annotations

import datetime as dt
import json
import math
import pathlib
import platform
import time
from typing import Any

import torch

from exml_fast._utils.io import atomic_write
from exml_fast._utils.provenance import device_name, git_commit

__all__ = ["machine", "machine_line", "run_seconds", "seconds_or_lower_bound", "write_records"]


def machine(device: torch.device) -> dict[str, Any]:
    """Where a record was made: device name and kind, threads, torch / CUDA / Python versions, commit, UTC date."""
    return {"device": device_name(device), "device_kind": device.type, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def machine_line(m: dict[str, Any]) -> str:
    """The Markdown "- machine: ..." line of a record, from :func:`machine`'s dict."""
    return (f"- machine: {m['device']} ({m['device_kind']}, {m['threads']} threads), torch {m['torch']}, "
            f"CUDA {m['cuda']}, Python {m['python']}, commit `{m['commit']}`, {m['date']}")


def run_seconds(result) -> float:
    """Seconds a finished run spent training and evaluating, from the timings its run loop recorded."""
    return float(sum(t.get("train_s", 0.0) + t.get("eval_s", 0.0) for t in result.meta.get("timings") or []))


def seconds_or_lower_bound(seconds: float | None, t0: float) -> tuple[float, bool]:
    """The time of a job that may have resumed earlier calls' work, and whether it is only a lower bound.

    ``seconds`` is the whole job's time when its saved state recorded it (a fit's ``FitResult.seconds``, a
    synthesis's ``SyntheticBatch.seconds``), None when some of that state predates the record. Then the time
    since ``t0`` (a ``time.perf_counter()`` reading taken when this call started the job) stands in for it:
    this call's share only, so ``(that, True)``; otherwise ``(seconds, False)``.
    """
    if seconds is not None:
        return seconds, False
    return time.perf_counter() - t0, True


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def write_records(folder, stem: str, meta: dict[str, Any], rows: list[dict[str, Any]], markdown: str, *,
                  log, extra: dict[str, Any] | None = None) -> None:
    """Writes ``<folder>/<stem>.json`` ({"meta", **extra, "rows"}, strict: nan as null) and ``<stem>.md``,
    atomically."""
    folder = pathlib.Path(folder)
    text = json.dumps(_nan_to_none({"meta": meta, **(extra or {}), "rows": rows}), indent=1, allow_nan=False)
    atomic_write(folder / f"{stem}.json", lambda f: f.write(text.encode()))
    atomic_write(folder / f"{stem}.md", lambda f: f.write(markdown.encode()))
    log(f"wrote {folder / (stem + '.json')} and {folder / (stem + '.md')}")
