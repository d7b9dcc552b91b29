"""Checking answers against expectations (expectations.py), and pass rates with their
uncertainty.

An answer passes when every check passes. A regular expression gets REGEX_SECONDS per
match (the `regex` package's timeout): a pattern that backtracks for ever fails its check
instead of hanging the run. `tokens` and `finished` need what the output's record says
(generated tokens, stop reason); an output without that fails them, saying why.

The pass rate k/n comes with its 95% Wilson score interval, which stays inside [0, 1] and is
honest for small n (5 outputs that all pass: [0.57, 1.0], not "100%").
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cached_prompts.backend.interface import StopReason
from cached_prompts.method.expectations import Check, CheckKind, Expectations

REGEX_SECONDS = 1.0
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
_ITEM = re.compile(r"\s*(?:\d+[.)]|[-*+•])\s+\S")


@dataclass(frozen=True)
class Answer:
    """What is checked: the output's text and, where known, what its record says."""

    text: str
    tokens: int | None = None  # generated tokens
    stop_reason: StopReason | None = None


@dataclass(frozen=True)
class Failure:
    name: str  # the check's name
    why: str  # what the answer did instead, e.g. "4 items"


def failures(expectations: Expectations, answer: Answer) -> list[Failure]:
    """The checks `answer` fails, in the expectations' order (empty: it passes)."""
    found = []
    for check in expectations.checks:
        why = _why_failed(check, answer)
        if why is not None:
            found.append(Failure(check.name, why))
    return found


def _why_failed(check: Check, answer: Answer) -> str | None:
    """None if the check passes, else a short reason."""
    text, kind, value = answer.text, check.kind, check.value
    if kind is CheckKind.EQUALS:
        return None if text == value else "different text"
    if kind is CheckKind.STARTS_WITH:
        return None if text.startswith(value) else "starts otherwise"
    if kind is CheckKind.CONTAINS:
        return _absent(value, text)
    if kind is CheckKind.ICONTAINS:
        return _absent(tuple(v.casefold() for v in value), text.casefold())
    if kind is CheckKind.CONTAINS_ANY:
        return None if any(v in text for v in value) else "none of them"
    if kind is CheckKind.NOT_CONTAINS:
        present = [v for v in value if v in text]
        return f"contains {present[0]!r}" if present else None
    if kind in (CheckKind.REGEX, CheckKind.NOT_REGEX):
        return _pattern(value, text, want=kind is CheckKind.REGEX)
    if kind is CheckKind.LINES:
        return _count(sum(1 for line in text.splitlines() if line.strip()), value, "non-empty lines")
    if kind is CheckKind.ITEMS:
        return _count(sum(1 for line in text.splitlines() if _ITEM.match(line)), value, "items")
    if kind is CheckKind.TOKENS:
        if answer.tokens is None:
            return "no record of its token count"
        return _count(answer.tokens, value, "tokens")
    if kind is CheckKind.FINISHED:
        if answer.stop_reason is None:
            return "no record of how it ended"
        return None if answer.stop_reason.finished == value else f"ended by {answer.stop_reason.value}"
    if kind is CheckKind.IS_JSON:
        parsed = _json(text)
        return None if (parsed is not _NOT_JSON) == value else ("not JSON" if value else "is JSON")
    return _schema(value, text)


def _absent(wanted: Sequence[str], text: str) -> str | None:
    missing = [v for v in wanted if v not in text]
    return f"lacks {missing[0]!r}" if missing else None


def _pattern(pattern: object, text: str, *, want: bool) -> str | None:
    try:
        found = pattern.search(text, timeout=REGEX_SECONDS) is not None  # type: ignore[attr-defined]
    except TimeoutError:
        return f"the match took over {REGEX_SECONDS:g} s"
    if found == want:
        return None
    return "no match" if want else "matches"


def _count(count: int, bounds: tuple[int, int], what: str) -> str | None:
    low, high = bounds
    return None if low <= count <= high else f"{count} {what}"


_NOT_JSON = object()


def _json(text: str) -> object:
    try:
        return json.loads(text.strip())
    except (ValueError, RecursionError):
        return _NOT_JSON


def _schema(validator: object, text: str) -> str | None:
    value = _json(text)
    if value is _NOT_JSON:
        return "not JSON"
    try:
        error = next(validator.iter_errors(value), None)  # type: ignore[attr-defined]
    except Exception as problem:  # an unresolvable local $ref, a regex the validator cannot run
        return f"the schema could not be applied ({type(problem).__name__})"
    return None if error is None else error.message[:200]


# ----- pass rates -----------------------------------------------------------------------------


def wilson_interval(passed: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a pass rate passed/total ([0, 1] when total is 0)."""
    if total <= 0:
        return 0.0, 1.0
    rate = passed / total
    z2 = z * z
    centre = (rate + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(rate * (1 - rate) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """k of n passed."""

    passed: int
    total: int

    @property
    def rate(self) -> float | None:
        return self.passed / self.total if self.total else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.passed, self.total)

    def reaches(self, threshold: float) -> bool:
        return self.total > 0 and self.passed >= threshold * self.total - 1e-9

    def overlaps(self, other: "Rate") -> bool:
        low, high = self.interval
        other_low, other_high = other.interval
        return low <= other_high and other_low <= high
