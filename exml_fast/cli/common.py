"""What every ``exml-fast`` command shares: argument types, the device choice, the usage error (exit 2)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import torch

__all__ = ["PROG", "UsageError", "class_list", "device_arg", "end_without_teardown", "left_torchrun_group", "one_line",
           "positive_float", "positive_int", "resolve_device", "say", "torchrun_group"]

PROG = "exml-fast"

_left_group = False  # set by torchrun_group once this process has destroyed the group it joined


class UsageError(Exception):
    """A bad argument found after parsing (it needs the checkpoint or the device): exit status 2."""


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _number(text: str, ok, expected: str) -> float:
    """``text`` as a float when ``ok`` of it holds, else an argparse error naming what was ``expected``."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {v}")
    return v


def positive_float(text: str) -> float:
    return _number(text, lambda v: v > 0, "a positive number")


def nonnegative_float(text: str) -> float:
    return _number(text, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def angle(text: str) -> float:
    return _number(text, lambda v: 0 <= v <= 180, "an angle in [0, 180] degrees")


def zoom_range(text: str) -> float:
    return _number(text, lambda v: 0 <= v < 1, "a zoom range in [0, 1)")


def class_list(text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices like 0,1,2; got {text!r}") from None
    if not classes:
        raise argparse.ArgumentTypeError(f"expected at least one class index; got {text!r}")
    if any(c < 0 for c in classes):
        raise argparse.ArgumentTypeError(f"class indices must be >= 0; got {text!r}")
    if len(set(classes)) != len(classes):
        raise argparse.ArgumentTypeError(f"class indices must be distinct; got {text!r}")
    return classes


def device_arg(text: str) -> torch.device:
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N]; got {text!r}") from None
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N]; got {text!r}")
    return d


def resolve_device(d: torch.device | None) -> torch.device:
    if d is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    return d


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename is not None and not str(e).startswith("checkpoint"):
        text = f"{e.strerror or 'not found'}: {e.filename}"
    return text


def say(line: str) -> None:
    """Prints ``line`` in one write (text and newline together): under torchrun the ranks share stdout, and
    an unbuffered print writes the newline apart, so two ranks' lines could run into one."""
    print(line + "\n", end="", flush=True)


@contextlib.contextmanager
def torchrun_group(device: torch.device) -> Iterator[torch.device]:
    """Under torchrun (``WORLD_SIZE`` > 1) joins the process group it describes — gloo on the CPU, NCCL on
    ``cuda:LOCAL_RANK`` when ``device`` is CUDA without an index — and leaves it on exit; yields the device
    this process works on (``device`` itself outside torchrun)."""
    from exml_fast._utils import dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    joined = dist.init_from_env(device)
    try:
        yield device
        if joined:
            # The ranks leave together: gloo can abort a process whose group is destroyed while a peer
            # still works (seen as "terminate called without an active exception" at exit).
            dist.barrier()
    finally:
        if joined:
            torch.distributed.destroy_process_group()
            global _left_group
            _left_group = True


def left_torchrun_group() -> bool:
    """Whether this process joined a torchrun process group (:func:`torchrun_group`) and has left it.

    :func:`exml_fast.cli.main` then ends the process without the interpreter's teardown: there gloo can
    still abort a rank (SIGABRT, "terminate called without an active exception") after every rank has passed
    the barrier and destroyed its group, which torchrun reports as a failed run though all its work is written
    (seen under load on 2 CPU cores, in torch 2.14)."""
    return _left_group


def end_without_teardown(status: int) -> None:
    """Ends the process with ``status`` at once, after flushing the logs, stdout and stderr (``os._exit``
    flushes nothing): for a rank that has written its work and destroyed its process group, so that gloo cannot
    abort it in the interpreter's teardown (:func:`left_torchrun_group`)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
