"""The worker process: a LocalBackend serving the calls of a WorkerBackend (worker.py) over
two pipes (the protocol: worker_protocol.py). Started by the parent as

    python -m cached_prompts.local.worker_main READ_FD WRITE_FD

It is a process of its own so that a crash inside llama.cpp (a signal, an abort in C) ends
only it: the parent reports the crash and starts another.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO

from cached_prompts.backend.interface import Backend, Counters
from cached_prompts.errors import EngineError
from cached_prompts.local import activity
from cached_prompts.local.worker_protocol import (Abort, Activity, Call, CallAborted, Callback, CallbackSlot, Close,
                                                  Failed, LogLine,
                                                  Ready, Returned, Start, StreamClosed, open_pipe_ends, read_message,
                                                  write_message)

class _ForwardLogs(logging.Handler):
    """Each record as a LogLine to the parent, whose logging formats and filters it."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            self._send(LogLine(record.name, record.levelno, text))
        except (OSError, ValueError):  # the parent is gone: nothing to tell
            pass


def _die_with_parent(interval: float = 1.0) -> None:
    """End this process soon after the parent is gone, even in the middle of a computation
    (its pipe's end is noticed only between calls). Not PR_SET_PDEATHSIG: that fires when the
    parent's *thread* that started the worker ends, and a worker may be restarted by any thread."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def take_counters(counters: Counters) -> Counters:
    """A copy of what was counted since the last call, the counters reset in place (the
    backend's parts hold references to that object)."""
    taken = copy.deepcopy(counters)
    for item in dataclasses.fields(counters):
        value = getattr(counters, item.name)
        if isinstance(value, list):
            value.clear()
        elif isinstance(value, (int, float)):
            setattr(counters, item.name, type(value)())
    return taken


def public_methods(backend: Backend) -> list[str]:
    return sorted(name for name, _ in inspect.getmembers(type(backend), callable) if not name.startswith("_"))


def fixed_properties(backend: Backend) -> dict[str, Any]:
    """The values of the Backend's properties (n_ctx, model_name, ...), fixed for a backend."""
    names = [name for name, value in inspect.getmembers(Backend) if isinstance(value, property)]
    return {name: getattr(backend, name) for name in names} | {"kind": backend.kind}


def sendable(error: BaseException) -> BaseException:
    """`error` if it survives pickling, else an EngineError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to pickle means: send a plain copy
        return EngineError(f"{type(error).__name__}: {error}")


class Worker:
    def __init__(self, incoming: BinaryIO, outgoing: BinaryIO) -> None:
        self.incoming, self.outgoing = incoming, outgoing
        self.backend: Backend | None = None

    def send(self, message: Any) -> None:
        write_message(self.outgoing, message)

    def start(self) -> bool:
        start: Start = read_message(self.incoming)
        logging.getLogger().setLevel(start.log_level)
        from cached_prompts.local.backend import LocalBackend

        extra = {} if start.n_parallel is None else {"n_parallel": start.n_parallel}
        try:
            self.backend = LocalBackend(start.options, start.cache_dir, verbose=start.verbose, **extra)
        except Exception as error:  # noqa: BLE001 - the parent raises it as if it had happened there
            self.send(Failed(sendable(error), traceback.format_exc()))
            return False
        take_counters(self.backend.counters)
        self.send(Ready(os.getpid(), fixed_properties(self.backend), public_methods(self.backend)))
        return True

    def serve(self) -> None:
        while True:
            message = read_message(self.incoming)
            if isinstance(message, Close):
                return
            if isinstance(message, Abort):
                continue  # for a call that had ended before the Abort came
            self.answer(message)

    def answer(self, call: Call) -> None:
        activity.reset()
        try:
            method = getattr(self.backend, call.method)
            args = tuple(self._resolve(value) for value in call.args)
            kwargs = {key: self._resolve(value) for key, value in call.kwargs.items()}
            value = method(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - every failure goes back to the caller
            self.send(Failed(sendable(error), traceback.format_exc(), take_counters(self.backend.counters)))
            return
        self.send(Returned(value, take_counters(self.backend.counters)))

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, CallbackSlot):
            slot = value.name

            def stub(*args: Any) -> None:
                self.send(Callback(slot, args))
                self._abort_if_asked()
            return stub
        return value

    def _abort_if_asked(self) -> None:
        """CallAborted if the parent sent Abort (nothing else comes while a call is in flight)."""
        if select.select([self.incoming], [], [], 0)[0]:
            message = read_message(self.incoming)
            if isinstance(message, Abort):
                raise CallAborted("the caller's callback failed")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    os.dup2(2, 1)  # a stray printf of C code goes to stderr, never into anything else
    incoming, outgoing = open_pipe_ends(int(argv[0]), int(argv[1]))
    worker = Worker(incoming, outgoing)
    root = logging.getLogger()
    root.handlers[:] = [_ForwardLogs(worker.send)]
    activity.listen(lambda text: worker.send(Activity(text)))
    try:
        if worker.start():
            worker.serve()
    except (StreamClosed, BrokenPipeError):
        return 0  # the parent is gone
    finally:
        if worker.backend is not None:
            worker.backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
