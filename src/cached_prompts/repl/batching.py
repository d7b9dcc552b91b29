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

Each waiting request is a `PendingRequest` that carries its own outcome. When the joined
generation fails, each request is decoded alone, so that each gets its own answer or error
(the one that crashes the engine gets the crash); when the engine has given up, all get that.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from cached_prompts.backend.interface import Completion
from cached_prompts.errors import WorkerGaveUpError
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


@dataclass
class PendingRequest:
    """A planned single_prompt request waiting to be decoded with those it joins, then its
    outcome: the completions of its own jobs, or the error its decoding met (one of the two)."""

    plan: PromptPlan
    request_id: Any  # protocol.NO_ID when the request had none
    completions: list[list[Completion]] | None = None
    error: Exception | None = None

    def value(self, session: Session) -> list[str] | list[list[str]]:
        """The response's value; raises the request's error, as answering it alone would."""
        if self.error is not None:
            raise self.error
        if self.completions is None:
            raise RuntimeError("a batched request was answered before it was decoded; this is a bug")
        return session.answer(self.plan, self.completions)


class _Batcher:
    """Responses in request order; planned single_prompt requests wait in `pending` until a
    line that is not one (or the end of the waiting lines) flushes them."""

    def __init__(self, session: Session, stdout: BinaryIO) -> None:
        self.session = session
        self.stdout = stdout
        self.pending: list[PendingRequest] = []

    def take(self, line: bytes | int) -> None:
        if isinstance(line, int):
            response = protocol.oversized_line(line)
        else:
            response = self.session.respond(line, self._act)
            if response["status"] == "Ok" and isinstance(response["value"], PromptPlan):
                self.pending.append(PendingRequest(response["value"], response.get("id", protocol.NO_ID)))
                return
        self.flush()
        self._write(response)

    def _act(self, command: str, arguments: Any) -> Any:
        if command == SINGLE_PROMPT:
            return self.session.plan_single_prompt(arguments)  # decoded at the flush
        self.flush()  # the requests before this one happen before it
        return self.session.handle_parsed(command, arguments)

    def flush(self) -> None:
        groups: list[list[PendingRequest]] = []
        for request in self.pending:
            if groups and groups[-1][0].plan.joins(request.plan):
                groups[-1].append(request)
            else:
                groups.append([request])
        self.pending = []
        for group in groups:
            self._decode(group)
            for response in [self._respond(request) for request in group]:  # all answered, then written
                self._write(response)

    def _respond(self, request: PendingRequest) -> dict[str, Any]:
        return self.session.respond_with(lambda: request.value(self.session), lambda: request.request_id)

    def _decode(self, group: list[PendingRequest]) -> None:
        """Each request's outcome, from one generation request for the whole group."""
        jobs = [job for request in group for job in request.plan.jobs]
        try:
            completions = self.session.backend.generate(group[0].plan.request(jobs))
        except WorkerGaveUpError as error:  # the engine is gone for good: not tried again
            for request in group:
                request.error = error
            return
        except Exception as error:  # noqa: BLE001 - carried to the request's own response
            if len(group) == 1:
                group[0].error = error
                return
            # Each alone, so that each gets its own outcome: the one that crashes the engine
            # (WorkerCrashError; a new worker is running) gets the crash, the others their answers.
            for request in group:
                self._decode([request])
            return
        if len(group) > 1:
            self.session.requests_batched += len(group)
        start = 0
        for request in group:
            request.completions = completions[start:start + len(request.plan.jobs)]
            start += len(request.plan.jobs)

    def _write(self, response: dict[str, Any]) -> None:
        self.stdout.write(protocol.encode_response(response))
        self.stdout.flush()
