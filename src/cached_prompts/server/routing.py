"""Which server does a prelude's work: rendezvous hashing, slots in flight, down-marking.

Each prelude ranks the servers by a hash of (server URL, the digest of its tokens), highest
first (rendezvous, or highest-random-weight, hashing). Its requests go to the first server of
its ranking that is up, so its KV stays hot in one server's cache; adding or removing a
server moves only the preludes whose first choice it is. A server takes no more outputs at a
time than its slots. A server that fails (refused, reset, 5xx, timeout) is marked down for a
back-off that doubles with each failure in a row (BACKOFF_START .. BACKOFF_MAX); meanwhile
each prelude's work goes to the next server of its own ranking, and after the back-off the
server is tried again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cached_prompts.server.api import ServerApi, ServerInfo
from cached_prompts.server.http import HttpConnection

log = logging.getLogger(__name__)

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0


@dataclass(eq=False)
class ServerState:
    """One server as the pool sees it."""

    http: HttpConnection
    api: ServerApi | None = None  # its protocol's client; None until it answered a probe
    capacity: int = 1  # outputs (llama-server slots) it decodes at once
    in_flight: int = 0
    down_until: float = 0.0
    failures: int = 0  # in a row
    last_error: str = ""

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def info(self) -> ServerInfo | None:
        return self.api.info if self.api is not None else None


def rank_servers(servers: list[ServerState], digest: str) -> list[ServerState]:
    """The servers in the order a prelude with this token digest prefers them."""
    def weight(state: ServerState) -> bytes:
        return hashlib.sha256(f"{state.url}\n{digest}".encode("utf-8")).digest()
    return sorted(servers, key=weight, reverse=True)


class ServerPool:
    """The servers, their free slots and which are down; safe to use from many threads."""

    def __init__(self, servers: list[ServerState], *, clock: Callable[[], float] = time.monotonic,
                 backoff_start: float = BACKOFF_START, backoff_max: float = BACKOFF_MAX) -> None:
        self.servers = servers
        self._clock = clock
        self._backoff = (backoff_start, backoff_max)
        self._changed = threading.Condition()

    def ranking(self, digest: str) -> list[ServerState]:
        return rank_servers(self.servers, digest)

    def is_up(self, state: ServerState) -> bool:
        return state.down_until <= self._clock()

    def acquire(self, ranking: list[ServerState], wanted: int) -> tuple[ServerState, int] | None:
        """Reserve up to `wanted` outputs on the first server of `ranking` that is up, waiting
        for its slots to free up (not for another server: the prelude's KV lives on this one).
        Returns (server, outputs granted), or None if every server of the ranking is down."""
        with self._changed:
            while True:
                now = self._clock()
                up = [state for state in ranking if state.down_until <= now]
                if not up:
                    return None
                state = up[0]
                granted = max(1, min(wanted, state.capacity))
                if state.in_flight + granted <= state.capacity:
                    state.in_flight += granted
                    return state, granted
                # Also wake up when a down server's back-off ends: it may come first again.
                self._changed.wait(timeout=self._seconds_to_next_retry(ranking, now, default=1.0))

    def release(self, state: ServerState, granted: int) -> None:
        with self._changed:
            state.in_flight -= granted
            self._changed.notify_all()

    def seconds_to_retry(self, ranking: list[ServerState]) -> float:
        """How long until the first server of `ranking` is tried again (0: one is up)."""
        with self._changed:
            return self._seconds_to_next_retry(ranking, self._clock(), default=0.0)

    def _seconds_to_next_retry(self, ranking: list[ServerState], now: float, *, default: float) -> float:
        waits = [state.down_until - now for state in ranking if state.down_until > now]
        return min(waits) if waits else default

    def mark_down(self, state: ServerState, error: Exception) -> None:
        """The server failed a request: skip it for a back-off. Failures of requests that
        were in flight when it went down count once."""
        with self._changed:
            now = self._clock()
            if state.down_until > now:
                return
            state.failures += 1
            start, most = self._backoff
            backoff = min(most, start * 2 ** (state.failures - 1))
            state.down_until = now + backoff
            state.last_error = str(error)
            # The error names the server; the server's own words may end without a full stop.
            told = str(error).rstrip()
            log.warning("%s%s Its work moves to the next server; it is tried again in %.0f s.", told,
                        "" if told.endswith((".", "!", "?")) else ".", backoff)
            self._changed.notify_all()

    def mark_up(self, state: ServerState) -> None:
        with self._changed:
            if state.failures:
                log.info("server %s answers again", state.url)
            state.failures = 0
            state.last_error = ""
