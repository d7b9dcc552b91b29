"""Batching in `stdio-json-repl`.

A `single_prompt` request is planned (`PromptPlan`: its prelude, one job per prompt, its
sampling) before anything is decoded. A request with `prompts: [...]` is one plan with
several jobs, decoded together as `outputs-test-prompts` decodes the prompts of one prelude.

With `--batch-waiting`, consecutive `single_prompt` lines that are already waiting on stdin
when the service is ready for the next request, and that use the same prelude (id and text)
and the same sampling options, become one generation request: each still gets its own
response line, in order. Their sampled outputs then depend on what was decoded together
(llama.cpp's sums depend on the batch), so a client opts in. Any other command ends a run of
batched lines first, so its effects happen in request order.
"""

from __future__ import annotations

import functools
import os
import select
from collections.abc import Iterator
from typing import Any, BinaryIO

from cached_prompts.errors import WorkerCrashError, WorkerGaveUpError
from cached_prompts.repl import protocol
from cached_prompts.repl.session import PromptPlan, Session

READ_CHUNK = 1 << 16
MAX_BATCHED_LINES = 64  # waiting lines taken at once (each at most MAX_LINE_BYTES)
SINGLE_PROMPT = "single_prompt"


class LineReader:
    """Lines from a file descriptor, like `BufferedReader.readline(limit)`, that can also
    tell whether a whole line is already waiting (without blocking)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._eof = False

    def readline(self, limit: int = -1) -> bytes:
        while True:
            newline = self._buffer.find(b"\n", 0, limit if limit >= 0 else len(self._buffer))
            if newline >= 0:
                return self._take(newline + 1)
            if 0 <= limit <= len(self._buffer) or self._eof:
                return self._take(len(self._buffer) if limit < 0 else min(limit, len(self._buffer)))
            self._fill()

    def line_waiting(self) -> bool:
        """True if the next readline returns at once with a whole line (or the last bytes
        before EOF); reads what is already there, never waits for more."""
        while b"\n" not in self._buffer and not self._eof:
            if len(self._buffer) > protocol.MAX_LINE_BYTES:
                return False  # an oversized line: read (and skipped) the ordinary way
            ready, _, _ = select.select([self._fd], [], [], 0)
            if not ready:
                return False
            self._fill()
        return bool(self._buffer)

    def _fill(self) -> None:
        chunk = os.read(self._fd, READ_CHUNK)
        if chunk:
            self._buffer += chunk
        else:
            self._eof = True

    def _take(self, size: int) -> bytes:
        line = bytes(self._buffer[:size])
        del self._buffer[:size]
        return line


def run_batching_loop(session: Session, reader: LineReader, lines: Iterator[bytes | int], stdout: BinaryIO) -> int:
    """Answer every line until EOF or `shutdown`, batching waiting single_prompt lines; the
    session's exit status."""
    batcher = _Batcher(session, stdout)
    try:
        for first in lines:
            batch = [first]
            while len(batch) < MAX_BATCHED_LINES and reader.line_waiting():
                batch.append(next(lines))
            for line in batch:
                batcher.take(line)
                if session.finished:
                    break
            batcher.flush()
            if session.finished:
                break
    except BrokenPipeError:
        return 0
    return session.exit_status


class _Batcher:
    """Responses in request order; planned single_prompt requests wait in `pending` until a
    line that is not one (or the end of the waiting lines) flushes them."""

    def __init__(self, session: Session, stdout: BinaryIO) -> None:
        self.session = session
        self.stdout = stdout
        self.pending: list[dict[str, Any]] = []  # Ok responses whose value is a PromptPlan

    def take(self, line: bytes | int) -> None:
        if isinstance(line, int):
            response = protocol.oversized_line(line)
        else:
            response = self.session.respond(line, self._act)
            if response["status"] == "Ok" and isinstance(response["value"], PromptPlan):
                self.pending.append(response)
                return
        self.flush()
        self._write(response)

    def _act(self, command: str, arguments: Any) -> Any:
        if command == SINGLE_PROMPT:
            return self.session.plan_single_prompt(arguments)
        self.flush()  # the requests before this one happen before it
        return self.session.handle_parsed(command, arguments)

    def flush(self) -> None:
        groups: list[list[dict[str, Any]]] = []
        for response in self.pending:
            if groups and groups[-1][0]["value"].joins(response["value"]):
                groups[-1].append(response)
            else:
                groups.append([response])
        self.pending = []
        for group in groups:
            self._decode(group)
            for response in group:
                self._write(response)

    def _decode(self, group: list[dict[str, Any]]) -> None:
        """Fill in each response's value (or failure) from one generation request."""
        plans: list[PromptPlan] = [response["value"] for response in group]
        try:
            completions = self.session.backend.generate(plans[0].request([j for p in plans for j in p.jobs]))
        except (WorkerCrashError, WorkerGaveUpError) as error:
            if len(group) == 1 or isinstance(error, WorkerGaveUpError):  # not tried again: it may crash again
                for response in group:
                    self._settle(response, functools.partial(_raise, error))
                return
            for response in group:  # each alone: the one that crashes the engine gets the error
                self._decode([response])
            return
        except Exception:  # noqa: BLE001 - each request then gets its own answer or error below
            if len(group) == 1:
                self._settle(group[0], lambda: self.session.backend.generate(plans[0].request()))
                return
            for response in group:  # each alone, so that each gets its own error
                self._decode([response])
            return
        if len(group) > 1:
            self.session.requests_batched += len(group)
        start = 0
        for response, plan in zip(group, plans):
            mine = completions[start:start + len(plan.jobs)]
            start += len(plan.jobs)
            self._settle(response, lambda mine=mine: mine)

    def _settle(self, response: dict[str, Any], completions: Any) -> None:
        plan: PromptPlan = response["value"]
        request_id = response.get("id", protocol.NO_ID)
        response.update(self.session.respond_with(lambda: self.session.answer(plan, completions()),
                                                  lambda: request_id))

    def _write(self, response: dict[str, Any]) -> None:
        self.stdout.write(protocol.encode_response(response))
        self.stdout.flush()


def _raise(error: Exception) -> Any:
    raise error
