"""Progress of long work on stderr (through logging, so -q silences it).

Reports which file is being worked on, prefill and generation progress with tokens/s,
and an ETA for the whole run; status lines are throttled to one every few seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from cached_prompts.workspace.layout import printable

log = logging.getLogger("cached_prompts.commands.progress")

STATUS_EVERY_SECONDS = 2.0


def _seconds(value: float) -> str:
    value = max(0.0, value)
    return f"{value:.0f}s" if value < 90 else f"{value / 60:.1f}min"


@dataclass
class Progress:
    """Progress of a run over `total` items (files)."""

    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    status_every: float = STATUS_EVERY_SECONDS  # seconds between two status lines of an item
    _item: str = ""
    _item_started: float = 0.0
    _tokens: int = 0
    _last_status: float = 0.0

    def start_item(self, name: str, what: str) -> None:
        self._item, self._item_started, self._tokens = printable(name), time.monotonic(), 0
        self._last_status = self._item_started
        log.info("[%d/%d] %s: %s%s", self.done + 1, self.total, self._item, what, self._eta())

    def finish_item(self) -> None:
        self.done += 1

    def prefill(self, done: int, total: int) -> None:
        if done < total and not self._due():
            return
        rate = done / max(time.monotonic() - self._item_started, 1e-6)
        log.info("    %s: prelude %d/%d tokens, %.0f tok/s, ETA %s",
                 self._item, done, total, rate, _seconds((total - done) / max(rate, 1e-6)))

    def generated(self, new_tokens: int, outputs: str, budget: int, *, drafted: int = 0, accepted: int = 0) -> None:
        """`drafted`/`accepted`: n-gram draft tokens verified and kept for this item so far."""
        self._tokens += new_tokens
        if not self._due():
            return
        rate = self._tokens / max(time.monotonic() - self._item_started, 1e-6)
        drafts = f", {accepted} of {drafted} draft tokens accepted" if drafted else ""
        log.info("    %s: %s, %d tokens so far (at most %d), %.0f tok/s%s",
                 self._item, outputs, self._tokens, budget, rate, drafts)

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self._last_status < self.status_every:
            return False
        self._last_status = now
        return True

    def _eta(self) -> str:
        if self.done == 0:
            return ""
        per_item = (time.monotonic() - self.started) / self.done
        return f" (run ETA {_seconds(per_item * (self.total - self.done))})"
