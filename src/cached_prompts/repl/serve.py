"""`stdio-json-repl`: serve requests on stdin, one response line per request line on stdout.

`serve` is only the loop around `Session.handle_request` (session.py); with --batch-waiting the
loop of batching.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO

from cached_prompts.commands.choose_backend import open_backend
from cached_prompts.options import EngineOptions, SamplingOptions
from cached_prompts.repl import protocol
from cached_prompts.repl.batching import LineReader, run_batching_loop
from cached_prompts.repl.protocol import MAX_LINE_BYTES
from cached_prompts.repl.session import Session
from cached_prompts.workspace.layout import Workspace

log = logging.getLogger(__name__)

SKIP_CHUNK = 1 << 16

# ----- the loop ----------------------------------------------------------------------------------


def read_lines(stream: BinaryIO) -> Iterator[bytes | int]:
    """Request lines as bytes; a line over MAX_LINE_BYTES is skipped and yielded as its size."""
    while True:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = stream.readline(SKIP_CHUNK)
            if not line:
                break
            size += len(line)
        yield size


@contextlib.contextmanager
def response_channel() -> Iterator[BinaryIO]:
    """The process's real stdout, for responses only. Meanwhile file descriptor 1 and
    sys.stdout point to stderr, so a stray print or a C library's printf cannot corrupt
    the protocol."""
    sys.stdout.flush()
    saved_stdout = sys.stdout
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield channel
    finally:
        with contextlib.suppress(OSError):  # the client may have closed the pipe
            channel.flush()
        os.dup2(channel.fileno(), 1)
        with contextlib.suppress(OSError):
            channel.close()
        sys.stdout = saved_stdout


def run_loop(session: Session, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Answer every line until EOF or `shutdown` (0), or until the engine is gone for good (1)."""
    for line in read_lines(stdin):
        response = protocol.oversized_line(line) if isinstance(line, int) else session.handle_request(line)
        try:
            stdout.write(protocol.encode_response(response))
            stdout.flush()
        except BrokenPipeError:
            log.warning("the client closed stdout; stopping")
            return 0
        if session.finished:
            break
    return session.exit_status


def serve(engine_options: EngineOptions, sampling: SamplingOptions, workspace: Workspace, *,
          verbose: bool = False, server_options: Any = None, batch_waiting: bool = False) -> int:
    """Run the JSON service on the process's stdin and stdout; the exit status. With
    `batch_waiting`, single_prompt lines already waiting on stdin are decoded together."""
    with contextlib.suppress(AttributeError, ValueError):
        sys.stderr.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    with response_channel() as channel:
        with open_backend(engine_options, workspace, verbose=verbose, server_options=server_options) as backend:
            log.info("stdio-json-repl ready: one JSON5 request per line on stdin")
            session = Session(backend, sampling)
            if batch_waiting:
                reader = LineReader(sys.stdin.buffer.fileno())
                return run_batching_loop(session, reader, read_lines(reader), channel)
            return run_loop(session, sys.stdin.buffer, channel)
