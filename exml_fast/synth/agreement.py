"""The warning a synthesizer gives when the teacher does not label its images as their targets."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

__all__ = ["LowAgreementWarning", "agreement_message", "dominant_term", "stacklevel_outside_synth"]

_SYNTH_DIR = os.path.dirname(os.path.abspath(__file__))


class LowAgreementWarning(UserWarning):
    """A synthesized batch whose images the teacher labels as their target class too rarely.

    Given once per synthesizer, after the first batch whose agreement is below the synthesizer's
    ``warn_below``; its message has the agreement, each weighted loss term and a hint naming the term that
    dominated the loss. ``warnings.simplefilter("error", LowAgreementWarning)`` turns it into an error.
    """


def dominant_term(weighted: Mapping[str, float]) -> tuple[str, float]:
    """The name of the largest of the weighted loss terms and its share of their sum (0 to 1)."""
    total = sum(abs(v) for v in weighted.values())
    name = max(weighted, key=lambda k: abs(weighted[k]))
    return name, (abs(weighted[name]) / total if total > 0 else 0.0)


def agreement_message(owner: str, *, agreement: float, threshold: float, weighted: Mapping[str, float],
                      hints: Mapping[str, str], what: str = "its target class") -> str:
    """The text of a :class:`LowAgreementWarning`.

    Args:
        owner: the synthesizer's class name.
        agreement: fraction of the batch the teacher labels as ``what``, 0 to 1.
        threshold: the synthesizer's ``warn_below``.
        weighted: each loss term times its weight, in the order the terms are listed (``main`` first).
        hints: advice by term name (the dominant term's is shown; ``"*"`` is appended whatever dominates).
    """
    name, share = dominant_term(weighted)
    terms = ", ".join(f"{k} {v:.4g}" for k, v in weighted.items())
    label = {"main": "the main (cross-entropy) term", "bn": "the BN term"}.get(name, f"the {name} term")
    hint = f"{label} is {share:.0%} of the loss: {hints.get(name, f'lower its weight ({name})')}"
    if hints.get("*"):
        hint += f"; {hints['*']}"
    return (f"{owner}: the teacher labels only {agreement:.0%} of a batch as {what} (warn_below={threshold:g}); "
            f"weighted loss terms: {terms}. Hint: {hint}. (Shown once per synthesizer; warn_below=None silences "
            "it.)")


def stacklevel_outside_synth() -> int:
    """The ``stacklevel`` of ``warnings.warn``, called by this function's caller, that names the first frame
    outside ``exml_fast/synth`` (the user's ``synthesize`` call, or the loop over ``synthesize_iter``)."""
    frame = sys._getframe(1)  # the caller of warnings.warn: stacklevel 1
    level = 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _SYNTH_DIR:
        frame = frame.f_back
        level += 1
    return level
