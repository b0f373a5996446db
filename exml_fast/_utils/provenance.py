"""Small helpers shared across the package: derived seeds, config differences, machine facts."""

from __future__ import annotations

import hashlib
import pathlib
import platform
import subprocess
from collections.abc import Mapping
from typing import Any

#: Seeds are 63-bit, so that they fit torch.Generator.manual_seed and JSON integers alike.
SEED_MAX = 2**63 - 1

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def derive_seed(namespace: str, *parts: Any) -> int:
    """A 63-bit seed from ``namespace`` and ``parts`` (e.g. ``("exml_fast.synth", seed, batch)``).

    sha256 of ``"namespace:part:part..."``: independent, reproducible streams per use,
    whatever the global RNG holds.
    """
    digest = hashlib.sha256(":".join([namespace, *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & SEED_MAX


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_diff(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """'key: stored vs given' for each dotted key whose value differs (missing on one side: <absent>)."""
    a, b = _flatten(dict(stored)), _flatten(dict(given))
    absent = object()

    def short(v: Any) -> str:
        text = "<absent>" if v is absent else repr(v)
        return text if len(text) <= 80 else text[:77] + "..."

    return [f"{k}: {short(a.get(k, absent))} vs {short(b.get(k, absent))}" for k in sorted(set(a) | set(b))
            if a.get(k, absent) != b.get(k, absent)]


def device_name(device) -> str:
    """The GPU's name for a CUDA device ("cuda", "cuda:1" or a torch.device), else the CPU model
    from /proc/cpuinfo (or platform's guess)."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit() -> str:
    """The checkout's short HEAD, "+dirty" when tracked code (not benches/results) is modified; or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        # Recorded results are outputs, not code: they do not make the commit dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!benches/results"],
                               cwd=_REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
