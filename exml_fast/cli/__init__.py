"""The ``exml-fast`` command line (also ``python -m exml_fast``).

Argument parsing only, one module per command group: :mod:`.synth` (train-teacher, synthesize), :mod:`.exml`
(train-experts, run, report, demo), :mod:`.reproduce` (reproduce), :mod:`.compress` (compress); the work is
done by the library below.

Exit status: 0 done; 2 bad arguments (usage message); 1 a runtime failure,
reported on one line (missing or corrupt checkpoint, missing data, a folder
holding another job, ...); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from exml_fast.checkpoint import CheckpointError
from exml_fast.cli import compress, exml, reproduce, synth
from exml_fast.cli.common import PROG, UsageError, end_without_teardown, left_torchrun_group, one_line

__all__ = ["build_parser", "main"]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``exml-fast`` argument parser (train-teacher, synthesize, train-experts, run, report, demo, reproduce).
    ``argv``: the command line it will parse, whose ``run --strategy package.module:name`` declares flags."""
    p = argparse.ArgumentParser(
        prog=PROG, description="Learning from trained models instead of data: data-free synthesis and "
                               "Ex-Model Continual Learning (exml_fast).",
        epilog="Run 'exml-fast <command> --help' for a command's options.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="<command>")
    synth.add_commands(sub)
    exml.add_commands(sub, argv)
    reproduce.add_commands(sub)
    compress.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``exml-fast`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status (0, 1, 2 or 130)."""
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), message already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    status = _dispatch(args)
    if left_torchrun_group():
        # A torchrun rank whose work is written and whose group is destroyed: end here, without the teardown
        # in which gloo may still abort it (left_torchrun_group).
        end_without_teardown(status)
    return status


def _dispatch(args: argparse.Namespace) -> int:
    """Runs the parsed command; returns the exit status."""
    try:
        return args.func(args)
    except UsageError as e:
        args.subparser.print_usage(sys.stderr)
        print(f"{args.subparser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    except (OSError, ValueError, CheckpointError, ImportError) as e:
        # User errors (missing files, bad checkpoints, a folder of another job): one line, no traceback.
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1
