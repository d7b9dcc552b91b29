"""The protocol between `WorkerBackend` (worker.py, in the parent) and the worker process
(worker_main.py) that runs llama.cpp: the message types and how they are framed.

Each message is one frame: an 8-byte big-endian length, then the message pickled. The two
pipes are private to the two processes (created by the parent, handed to the child it starts
itself), so pickle only ever reads what this package wrote.

A conversation:

    parent                                  child
    Start(options, ...)            ->
                                   <-       Ready(pid, properties, methods)   (or Failed: the model
                                                                               did not load; it exits)
    Call(method, args, kwargs)     ->
                                   <-       Activity / Callback / LogLine ... (any number, any order)
    Abort()                        ->       (only if a callback raised here: the call stops at its
                                             next callback, with Failed(CallAborted))
                                   <-       Returned(value, counters) or Failed(error, counters)
    ... more calls, one at a time ...
    Close()                        ->       (the child frees the model and exits 0)

The child dying at any point (a signal, an abort in C) shows as the end of its pipe; the
parent then reads its exit status and says which signal it was and what was being done.
"""

from __future__ import annotations

import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cached_prompts.backend.interface import Counters
from cached_prompts.options import EngineOptions

HEADER = struct.Struct(">Q")
MAX_FRAME_BYTES = 1 << 34  # a frame claiming more is a broken stream, not a message


class StreamClosed(Exception):
    """The other side's end of the pipe is closed (it exited or died)."""


# ----- parent -> child -----------------------------------------------------------------------


@dataclass
class Start:
    """How to build the child's LocalBackend; the first frame."""

    options: EngineOptions
    cache_dir: Path | None
    verbose: bool
    n_parallel: int | None  # None: LocalBackend's default
    log_level: int  # records below it are not sent (the parent would drop them)


@dataclass(frozen=True)
class CallbackSlot:
    """Stands for a callable argument of a Call: the child calls a stub that sends a Callback
    message with this slot's name (the callable itself cannot cross the pipe)."""

    name: str


@dataclass
class Call:
    """Call `method` of the child's backend. Callable arguments are CallbackSlots."""

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Abort:
    """A callback of the call in flight raised in the parent: stop the call at its next callback
    (the engine unwinds as from any error, and the worker stays ready for the next call)."""


class CallAborted(Exception):
    """Raised in the worker by a callback stub when an Abort came."""


@dataclass
class Close:
    """Free the model and exit."""


# ----- child -> parent -----------------------------------------------------------------------


@dataclass
class Ready:
    """The backend is built: its fixed properties and the public methods it serves."""

    pid: int
    properties: dict[str, Any]
    methods: list[str]


@dataclass
class Activity:
    """What the engine is doing now ("the prefill of the prelude 'x' (92 tokens)"): said in
    the error if the child dies before the call returns."""

    text: str


@dataclass
class Callback:
    """The call's callable argument `slot` was called with `args` (its return value is not
    sent back: callbacks report progress, they do not steer)."""

    slot: str
    args: tuple[Any, ...]


@dataclass
class LogLine:
    """A log record of the child, re-emitted by the parent's logging (its handlers and level)."""

    logger: str
    level: int
    text: str


@dataclass
class Returned:
    """The call's value, and what the backend counted during it (added to the parent's)."""

    value: Any
    counters: Counters


@dataclass
class Failed:
    """The call (or the start) raised `error`; `trace` is the child's traceback, for bugs."""

    error: BaseException
    trace: str
    counters: Counters = field(default_factory=Counters)


# ----- frames --------------------------------------------------------------------------------


def write_message(stream: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def read_message(stream: BinaryIO) -> Any:
    """The next message; StreamClosed at the end of the stream (also mid-frame)."""
    size = HEADER.unpack(_read_exactly(stream, HEADER.size))[0]
    if size > MAX_FRAME_BYTES:
        raise StreamClosed(f"a frame of {size} bytes: the stream is broken")
    return pickle.loads(_read_exactly(stream, size))


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) < size:
        raise StreamClosed("end of stream")
    return data


def open_pipe_ends(read_fd: int, write_fd: int) -> tuple[BinaryIO, BinaryIO]:
    """Buffered binary files over the two pipe ends."""
    return os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")
