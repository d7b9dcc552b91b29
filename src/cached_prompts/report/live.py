"""The live report's state: what `watch` is making, and the news for the pages that follow it.

`LiveReport` is the watcher's listener (commands/watch.py). It is called from the watcher's
threads and hands each piece of news to the server's event loop (`attach`), which sends it to
every page on the live channel (live_server.py) as a server-sent event:
  - `refresh`: files changed; the page fetches itself again and changes what differs. The
    one that ends a round carries the round's check (`{"check": check --json's object}`, null
    where no input has expectations): the page it fetches has the same pass marks;
  - `started` / `text` / `ended`: outputs being made, their text as it comes (grouped every
    TEXT_EVERY_SECONDS, with tokens and tokens/s), and their end (written or not);
  - `status`: the status line (what is being made, tokens/s, ETA; or what the last round did).
The page itself is built by the report's one page builder (page.build_report, live=True).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cached_prompts.commands.check import CheckReport, to_json
from cached_prompts.commands.watch import RoundKind, RoundResult, WatchListener
from cached_prompts.report.page import TokenSource, build_report
from cached_prompts.options import SamplingOptions
from cached_prompts.workspace.layout import Workspace

TEXT_EVERY_SECONDS = 0.1  # text and status go out at most this often
CLIENT_QUEUE = 1000  # events a page may fall behind by before it is dropped (it reconnects)
MAX_COUNTS_KEPT = 20_000


class TokenCounts:
    """Token counts for the live page. Only the thread that owns the backend (the watcher's)
    may count; pages built on the server's threads look counts up and get None for a text not
    counted yet, which the owner counts at its next chance (`fill`)."""

    def __init__(self, backend: TokenSource) -> None:
        self._backend = backend
        self._owner = threading.get_ident()
        self._lock = threading.Lock()
        self._counts: dict[tuple[bytes, bool], int] = {}
        self._wanted: dict[tuple[bytes, bool], str] = {}

    def __call__(self, text: str, at_start: bool) -> int | None:
        key = (hashlib.sha256(text.encode("utf-8")).digest(), at_start)
        with self._lock:
            if key in self._counts:
                return self._counts[key]
            if threading.get_ident() != self._owner:
                self._wanted[key] = text
                return None
        return self._count(key, text)

    def fill(self) -> bool:
        """Count what pages asked for (on the owner's thread); True if there was anything."""
        with self._lock:
            wanted, self._wanted = self._wanted, {}
        for key, text in wanted.items():
            self._count(key, text)
        return bool(wanted)

    def _count(self, key: tuple[bytes, bool], text: str) -> int:
        count = self._backend.count_tokens(text, at_start=key[1])
        with self._lock:
            if len(self._counts) >= MAX_COUNTS_KEPT:
                self._counts.clear()
            self._counts[key] = count
        return count


@dataclass
class _Making:
    """An output being made."""

    name: str
    text: str = ""
    pieces: int = 0  # one per decoded token that added text
    first_at: float = 0.0  # when the first piece came (the rate leaves the prompt's prefill out)

    def add(self, piece: str) -> None:
        if not self.pieces:
            self.first_at = time.monotonic()
        self.text += piece
        self.pieces += 1

    def entry(self, new: str) -> dict[str, Any]:
        seconds = time.monotonic() - self.first_at
        rate = (self.pieces - 1) / seconds if self.pieces > 1 and seconds > 0 else 0.0
        return {"output": self.name, "text": new, "tokens": self.pieces, "rate": rate}


@dataclass
class _Round:
    """The outputs a round makes, for the status line's ETA."""

    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Batch:
    """The outputs being made together, for the status line."""

    what: str
    budget: int  # tokens, if every output runs to --max-tokens
    outputs: int
    round: _Round | None = None
    started: float = field(default_factory=time.monotonic)
    tokens: int = 0

    def status(self) -> str:
        seconds = max(time.monotonic() - self.started, 1e-3)
        rate = self.tokens / seconds
        text = f"making {self.what} · {self.tokens:,} tokens · {rate:.1f} tok/s"
        if self.round is not None and self.round.total > self.outputs:
            text += f" · {self.round.done} of {self.round.total} outputs of this round made"
        if rate > 0:
            text += f" · ETA {_seconds(self._eta(rate))} at most"
        return text

    def _eta(self, rate: float) -> float:
        """These outputs if they all run to --max-tokens, then the rest of the round at the
        pace of the outputs made so far (or at these outputs' budget per output)."""
        left = (self.budget - self.tokens) / rate
        if self.round is None:
            return left
        rest = max(0, self.round.total - self.round.done - self.outputs)
        if self.round.done:
            per_output = (time.monotonic() - self.round.started) / self.round.done
        else:
            per_output = self.budget / max(self.outputs, 1) / rate
        return left + rest * per_output


def _checks_said(report: CheckReport) -> str:
    """The check in the status line: how many inputs reach their threshold, which do not."""
    items, failing = [*report.prompts, *report.drafts], report.failing
    text = (f"checks: {len(items) - len(failing)} of {len(items)} input{'s' if len(items) != 1 else ''} "
            "reach their threshold")
    if failing:
        names = [Path(item.input).name for item in failing]
        text += f" (under the threshold: {', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
    if report.skipped:
        text += f", {len(report.skipped)} not checked"
    return text


def _seconds(value: float) -> str:
    value = max(0.0, value)
    return f"{value:.0f} s" if value < 90 else f"{value / 60:.1f} min"


class LiveReport(WatchListener):
    """The watcher's listener that feeds the live page; thread-safe."""

    def __init__(self, workspace: Workspace, backend: TokenSource, sampling: SamplingOptions | None = None) -> None:
        self.workspace = workspace
        self.sampling = sampling  # the watcher's options: outputs made with others are stale
        self.counts = TokenCounts(backend)
        self._n_ctx, self._model_id, self._draft = backend.n_ctx, backend.model_id, backend.draft
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: set[asyncio.Queue[tuple[str, str] | None]] = set()
        self._making: dict[str, _Making] = {}
        self._pending: dict[str, str] = {}  # output -> text not sent yet
        self._batch: _Batch | None = None
        self._round: _Round | None = None
        self._status: dict[str, Any] = {"text": "starting: judging which outputs are stale", "problem": False}
        self._skipped: list[tuple[Path, str]] = []
        self._flush_due = False
        self._closed = False

    # ----- the page -------------------------------------------------------------------------------

    def page(self) -> str:
        with self._lock:
            skipped = list(self._skipped)
        return build_report(self.workspace, count_tokens=self.counts, n_ctx=self._n_ctx, model_id=self._model_id,
                            sampling=self.sampling, skipped=skipped, live=True, draft=self._draft)

    # ----- the watcher's news (WatchListener) -----------------------------------------------------

    def changed(self, paths: list[Path]) -> None:
        self._publish("refresh", {"files": [p.name for p in paths]})

    def round_started(self, stale: list[tuple[Path, str]]) -> None:
        self.counts.fill()
        with self._lock:
            self._round = _Round(len(stale))
        self._set_status(f"{len(stale)} output{'s' if len(stale) != 1 else ''} to make" if stale
                         else "checking the inputs")

    def round_finished(self, result: RoundResult) -> None:
        with self._lock:
            self._skipped = list(result.skipped)
            self._batch = None
            self._round = None
        self.counts.fill()
        checks = f" · {_checks_said(result.check)}" if result.check is not None else ""
        if result.problem:
            self._set_status(f"the last round stopped: {result.problem}{checks} · watching for changes",
                             problem=True)
        elif result.kind is RoundKind.CHECK:
            self._set_status(f"expectations changed: outputs checked again, none made{checks} · watching for changes")
        else:
            parts = [f"{len(result.written)} output{'s' if len(result.written) != 1 else ''} written "
                     f"in {_seconds(result.seconds)}"]
            if result.skipped:
                parts.append(f"{len(result.skipped)} input{'s' if len(result.skipped) != 1 else ''} skipped "
                             "(see Skipped inputs)")
            self._set_status(f"up to date · last round: {', '.join(parts)}{checks} · watching for changes",
                             problem=bool(result.skipped))
        self._publish("refresh", {"check": to_json(result.check) if result.check is not None else None})

    def idle(self) -> None:
        if self.counts.fill():  # a page asked for counts it did not have: show them
            self._publish("refresh", {})

    def generating(self, outputs: list[Path], what: str, budget: int) -> None:
        names = [p.name for p in outputs]
        with self._lock:
            self._batch = _Batch(what, budget, len(names), self._round)
            for name in names:
                self._making[name] = _Making(name)
        self._publish("started", {"outputs": names})
        self._set_status(self._batch.status())

    def step(self, new_tokens: int) -> None:
        with self._lock:
            if self._batch is not None:
                self._batch.tokens += new_tokens
        self._schedule_flush()

    def text(self, output: Path, piece: str) -> None:
        with self._lock:
            making = self._making.get(output.name)
            if making is None:
                return
            making.add(piece)
            self._pending[output.name] = self._pending.get(output.name, "") + piece
        self._schedule_flush()

    def written(self, outputs: list[Path]) -> None:
        with self._lock:
            if self._round is not None:
                self._round.done += len(outputs)
        self._end(outputs)
        self.counts.fill()

    def not_written(self, outputs: list[Path], why: str) -> None:
        self._end(outputs)

    def _end(self, outputs: list[Path]) -> None:
        self._flush()
        names = [p.name for p in outputs]
        with self._lock:
            for name in names:
                self._making.pop(name, None)
        self._publish("ended", {"outputs": names})

    def _set_status(self, text: str, *, problem: bool = False) -> None:
        with self._lock:
            self._status = {"text": text, "problem": problem}
        self._publish("status", self._status)

    # ----- the live channel -----------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The server's event loop, on which the news is handed to the pages."""
        self._loop = loop

    def subscribe(self) -> "asyncio.Queue[tuple[str, str] | None]":
        """A new page's queue (on the server's loop), starting with what it needs to catch up."""
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(CLIENT_QUEUE)
        with self._lock:
            queue.put_nowait(("status", _json(self._status)))
            making = list(self._making.values())
            if making:
                queue.put_nowait(("started", _json({"outputs": [m.name for m in making]})))
                queue.put_nowait(("text", _json({"outputs": [m.entry(m.text) for m in making]})))
            if self._closed:
                queue.put_nowait(None)
            self._clients.add(queue)
        return queue

    def unsubscribe(self, queue: "asyncio.Queue[tuple[str, str] | None]") -> None:
        with self._lock:
            self._clients.discard(queue)

    def close(self) -> None:
        """End every page's live channel (the server is stopping)."""
        with self._lock:
            self._closed = True
        self._call_in_loop(self._deliver, None)

    def _publish(self, event: str, data: dict[str, Any]) -> None:
        self._call_in_loop(self._deliver, (event, _json(data)))

    def _call_in_loop(self, function: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop stopped meanwhile
            pass

    def _deliver(self, message: tuple[str, str] | None) -> None:
        """On the server's loop: hand one event to every page; one that fell too far behind is
        dropped (its EventSource reconnects and catches up)."""
        with self._lock:
            clients = list(self._clients)
        for queue in clients:
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self.unsubscribe(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    def _schedule_flush(self) -> None:
        with self._lock:
            if self._flush_due:
                return
            self._flush_due = True
        self._call_in_loop(self._flush_later)

    def _flush_later(self) -> None:
        if self._loop is not None:
            self._loop.call_later(TEXT_EVERY_SECONDS, self._flush)

    def _flush(self) -> None:
        with self._lock:
            self._flush_due = False
            pending, self._pending = self._pending, {}
            entries = [self._making[name].entry(text) for name, text in pending.items() if name in self._making]
            status = self._batch.status() if self._batch is not None else None
        if entries:
            self._publish("text", {"outputs": entries})
        if status is not None:
            self._set_status(status)


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
