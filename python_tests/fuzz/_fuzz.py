"""What every fuzz test shares: the hypothesis settings, the count of generated cases, and the rule a
public entry point must follow on any input.

The rule: a call either returns, or raises ValueError / TypeError / RuntimeError (and their subclasses:
FileNotFoundError, the CLI's exit status 2...) whose message names the entry point or the argument at
fault. Anything else — IndexError, KeyError, ZeroDivisionError, AttributeError, a bare message from deep
inside torch — fails the test, and so does a crash of the process (a segfault ends the run) or a result
with NaN/Inf from finite inputs.

Settings: ``derandomize=True``, so CI runs the same cases every time (a failure reproduces); no deadline
(the first call of an op may compile or load kernels); the example counts are in each test, and
:data:`CASES` counts what ran, for the summary line pytest prints (python_tests/conftest.py).
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, settings

#: generated cases run in this session, by test (conftest prints the total)
CASES: dict[str, int] = {}

settings.register_profile("exml_fast", derandomize=True, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
settings.load_profile("exml_fast")

ALLOWED = (ValueError, TypeError, RuntimeError)


def count(name: str) -> None:
    CASES[name] = CASES.get(name, 0) + 1


def check_error(e: BaseException, names: list[str]) -> None:
    """``e`` must be an allowed type and its message must name one of ``names`` (the entry point, its
    arguments, or words a caller can act on)."""
    if not isinstance(e, ALLOWED):
        raise AssertionError(f"{type(e).__name__} is not a clear error: {e}") from e
    text = str(e)
    if not any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text) for n in names):
        raise AssertionError(f"the message names none of {names}: {type(e).__name__}: {text}") from e
