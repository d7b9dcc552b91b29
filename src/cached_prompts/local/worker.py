"""`WorkerBackend`: the local engine in a worker process of its own, behind the same `Backend`
interface as `LocalBackend` (which runs in this process, for library users and tests).

Every call is sent to the worker (worker_main.py) as its method name and arguments, so a
method added to LocalBackend later works through the worker unchanged (or, for one that
overrides a Backend default, with one `name = _remote("name")` line here). Callable arguments
(on_prefill, on_step, any other) become messages from the worker that call them here; the
worker's log records are re-emitted by this process's logging; the backend's counters are
added to `self.counters` after every call. The protocol: worker_protocol.py.

Why: a crash inside llama.cpp (SIGSEGV, an abort in C) kills the process it happens in. In
the worker it kills only the worker: the call raises `WorkerCrashError` naming the signal and
what was being done, and a new worker is started (the model loaded again; the preludes kept
with `keep_prelude` registered again; states come back from the disk cache). A worker that dies
MAX_DEATHS_IN_A_ROW times with no call answered in between raises `WorkerGaveUpError`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cached_prompts.backend.interface import (Backend, BackendKind, Counters, PreludeKind, SOURCES_KEPT)
from cached_prompts.errors import CachedPromptsError, EngineError, WorkerCrashError, WorkerGaveUpError
from cached_prompts.local.worker_protocol import (Abort, Activity, Call, Callback, CallbackSlot, Close, Failed, LogLine,
                                                  Ready, Returned, Start, StreamClosed, open_pipe_ends, read_message,
                                                  write_message)
from cached_prompts.options import EngineOptions

log = logging.getLogger(__name__)

MAX_DEATHS_IN_A_ROW = 3
# Tokens of recent texts, kept here: the REPL tokenizes a request's prelude again for every
# request, and each call to the worker is a round trip through two pipes.
TOKENS_KEPT = 64
# Kept preludes registered again in a new worker (the most recent ones; the others are found
# in the disk cache anyway, which is what list_preludes reads).
KEPT_REGISTERED_AGAIN = 256
TOKENS_KEPT_MAX_CHARS = 1 << 16
CLOSE_WAIT_SECONDS = 30.0
WORKER_MODULE = "cached_prompts.local.worker_main"


class WorkerDied(Exception):
    """The worker process ended while a call was in flight (internal to this module)."""

    def __init__(self, pid: int, returncode: int | None) -> None:
        super().__init__(pid, returncode)
        self.pid = pid
        self.signal_name = None
        if returncode is None:
            self.how = "closed its pipe and was stopped"
        elif returncode < 0:
            self.signal_name = _signal_name(-returncode)
            self.how = f"was killed by {self.signal_name} ({signal.strsignal(-returncode) or 'a signal'})"
        else:
            self.how = f"exited with status {returncode}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def add_counters(total: Counters, part: Counters) -> None:
    """`part` (what the worker counted during one call) added into `total`."""
    for name, value in vars(part).items():
        mine = getattr(total, name)
        if isinstance(value, list):
            mine.extend(value)
            del mine[:-SOURCES_KEPT]
        elif isinstance(value, (int, float)):
            setattr(total, name, mine + value)
        else:
            setattr(total, name, value)


class _Process:
    """One worker process and the two pipes to it; `call` is one exchange of the protocol."""

    def __init__(self, start: Start) -> None:
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        env = dict(os.environ)
        # The worker imports this very package, wherever it was imported from.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, str(child_read), str(child_write)],
                pass_fds=(child_read, child_write), stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(child_read)
            os.close(child_write)
        self.incoming, self.outgoing = open_pipe_ends(parent_read, parent_write)
        self.pid = self.popen.pid
        self.busy = False
        try:
            ready = self.exchange(start, {}, [""], Counters())
        except BaseException:  # the model did not load (the worker exits), or this process was interrupted
            self.kill()
            raise
        if not isinstance(ready, Ready):
            self.kill()
            raise EngineError(f"the llama.cpp worker answered its start with {type(ready).__name__}; "
                              "this is a bug, please report it")
        self.ready = ready

    def exchange(self, message: Any, callbacks: dict[str, Callable[..., Any]], doing: list[str],
                 counters: Counters) -> Any:
        """Send `message`, serve what comes back until the answer; its value (or its error,
        raised). WorkerDied if the worker ends meanwhile."""
        self.busy = True
        try:
            write_message(self.outgoing, message)
        except (BrokenPipeError, OSError):
            raise self._died() from None
        failed_here: Exception | None = None  # a callback's error: raised once the call has stopped
        while True:
            try:
                answer = read_message(self.incoming)
            except StreamClosed:
                raise self._died() from None
            if isinstance(answer, Activity):
                doing[0] = answer.text
            elif isinstance(answer, Callback):
                if failed_here is None:
                    try:
                        callbacks[answer.slot](*answer.args)
                    except Exception as error:  # noqa: BLE001 - the worker stops the call, then it is raised
                        failed_here = error
                        self._send_abort()
            elif isinstance(answer, LogLine):
                logging.getLogger(answer.logger).log(answer.level, "%s", answer.text)
            elif isinstance(answer, Returned):
                self.busy = False
                add_counters(counters, answer.counters)
                if failed_here is not None:  # it ended before it saw the Abort: read that here
                    raise failed_here
                return answer.value
            elif isinstance(answer, Failed):
                self.busy = False
                add_counters(counters, answer.counters)
                if failed_here is not None:
                    raise failed_here
                error = answer.error
                if not isinstance(error, CachedPromptsError):  # a bug: its trace is the worker's
                    error.add_note(f"in the llama.cpp worker (pid {self.pid}):\n{answer.trace.rstrip()}")
                raise error
            else:
                self.busy = False
                return answer  # Ready

    def _send_abort(self) -> None:
        try:
            write_message(self.outgoing, Abort())
        except OSError:
            pass  # it died: the read that follows says so

    def _died(self) -> WorkerDied:
        try:
            returncode = self.popen.wait(timeout=CLOSE_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            returncode = None
        self._close_pipes()
        return WorkerDied(self.pid, returncode)

    def close(self) -> None:
        if self.popen.poll() is None and not self.busy:
            with contextlib.suppress(OSError):
                write_message(self.outgoing, Close())
            try:
                self.popen.wait(timeout=CLOSE_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """Stop the worker at once (a call was interrupted: its stream is out of step)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for stream in (self.incoming, self.outgoing):
            with contextlib.suppress(OSError):
                stream.close()


def _remote(name: str) -> Callable[..., Any]:
    """A Backend method that runs in the worker."""
    def method(self: "WorkerBackend", *args: Any, **kwargs: Any) -> Any:
        return self._call(name, args, kwargs)

    method.__name__ = name
    method.__doc__ = f"`{name}` of the LocalBackend in the worker process."
    return method


def _mirrored(name: str) -> property:
    """A Backend property, read from the worker once when it started."""
    return property(lambda self: self._process_ready().properties[name], doc=f"`{name}` of the worker's backend.")


# What the worker was doing, from the call itself; the worker's Activity messages say more.
_DOING: dict[str, Callable[[dict[str, Any]], str]] = {
    "tokenize": lambda a: f"the tokenization of a text of {len(a['text'])} characters",
    "prepare_prelude": lambda a: f"the preparation of the prelude '{a['label']}' ({len(a['tokens'])} tokens)",
    "generate": lambda a: f"the generation of outputs for '{a['request'].label}'",
    "keep_prelude": lambda a: f"storing the prelude '{a['label']}'",
    "check_grammar": lambda a: f"the parsing of the grammar of {a['source']}",
    "token_logprobs": lambda a: f"scoring the prelude '{a['label']}' ({len(a['tokens'])} tokens)",
}


def describe_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    generic = f"the call {name}()"
    if name not in _DOING:
        return generic
    try:
        bound = inspect.signature(getattr(Backend, name)).bind(None, *args, **kwargs).arguments
        return _DOING[name](bound)
    except (TypeError, KeyError, AttributeError):
        return generic


class WorkerBackend(Backend):
    """A LocalBackend in a worker process; a crash of llama.cpp is an error, not the end."""

    kind = BackendKind.LOCAL

    def __init__(self, options: EngineOptions, cache_dir: Path | None, *, verbose: bool = False,
                 n_parallel: int | None = None) -> None:
        self._start = Start(options, cache_dir, verbose, n_parallel, logging.getLogger().getEffectiveLevel())
        self.counters = Counters()
        self.restarts = 0
        self._deaths_in_row = 0
        self._kept: dict[tuple[str, PreludeKind], list[int]] = {}  # replayed into a new worker
        self._tokens: OrderedDict[tuple[str, bool], tuple[int, ...]] = OrderedDict()
        self._process: _Process | None = None
        self._gave_up: WorkerGaveUpError | None = None  # raised by every later call
        self._restart()  # the first start: a worker that dies while loading is started again, too
        self.restarts = 0

    # ----- the Backend interface, run in the worker ---------------------------------------------

    n_ctx = _mirrored("n_ctx")
    model_name = _mirrored("model_name")
    model_id = _mirrored("model_id")
    draft = _mirrored("draft")
    context_hint = _mirrored("context_hint")
    prepare_prelude = _remote("prepare_prelude")
    generate = _remote("generate")
    kept_preludes = _remote("kept_preludes")
    check_grammar = _remote("check_grammar")
    token_pieces = _remote("token_pieces")
    token_logprobs = _remote("token_logprobs")

    def tokenize(self, text: str, *, at_start: bool) -> list[int]:
        key = (text, at_start)
        known = self._tokens.get(key)
        if known is not None:
            self._tokens.move_to_end(key)
            return list(known)
        tokens = self._call("tokenize", (text,), {"at_start": at_start})
        if len(text) <= TOKENS_KEPT_MAX_CHARS:
            self._tokens[key] = tuple(tokens)
            if len(self._tokens) > TOKENS_KEPT:
                self._tokens.popitem(last=False)
        return tokens

    def describe(self) -> dict[str, Any]:
        described = self._call("describe", (), {})
        return {**described, "worker_pid": self._process_ready().pid, "worker_restarts": self.restarts}

    def keep_prelude(self, label: str, tokens: list[int], kind: PreludeKind) -> None:
        self._call("keep_prelude", (label, tokens, kind), {})
        self._kept.pop((label, kind), None)  # the most recently kept last
        self._kept[(label, kind)] = list(tokens)
        if len(self._kept) > KEPT_REGISTERED_AGAIN:
            del self._kept[next(iter(self._kept))]

    def drop_prelude(self, label: str, kind: PreludeKind) -> int:
        self._kept.pop((label, kind), None)
        return self._call("drop_prelude", (label, kind), {})

    def __getattr__(self, name: str) -> Any:
        """Any other public method of the worker's backend (LocalBackend.unload, ...)."""
        ready = self.__dict__.get("_ready")
        if ready is not None and name in ready.methods:
            return lambda *args, **kwargs: self._call(name, args, kwargs)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def worker_pid(self) -> int:
        return self._process_ready().pid

    def close(self) -> None:
        if self._process is not None:
            self._process.close()
            self._process = None

    # ----- calls, crashes and restarts ------------------------------------------------------------

    def _process_ready(self) -> Ready:
        """What the latest worker said when it started (its properties stay the same in the next)."""
        return self._ready

    def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._gave_up is not None:
            raise self._gave_up
        if self._process is None:
            self._restart()  # the last one was stopped in the middle of a call
        process = self._process
        callbacks: dict[str, Callable[..., Any]] = {}

        def placed(key: str, value: Any) -> Any:
            if callable(value) and not isinstance(value, type):
                callbacks[key] = value
                return CallbackSlot(key)
            return value

        call = Call(name, tuple(placed(f"#{i}", value) for i, value in enumerate(args)),
                    {key: placed(key, value) for key, value in kwargs.items()})
        doing = [describe_call(name, args, kwargs)]
        try:
            value = process.exchange(call, callbacks, doing, self.counters)
        except WorkerDied as died:
            self._process = None
            raise self._crashed(died, doing[0]) from None
        except BaseException:
            if process.busy:  # interrupted here (Ctrl-C, a callback's error): the stream is out of step
                process.kill()
                self._process = None
            else:
                self._deaths_in_row = 0  # the worker answered, with an error
            raise
        self._deaths_in_row = 0
        return value

    def _crashed(self, died: WorkerDied, doing: str) -> CachedPromptsError:
        what = f"the llama.cpp worker (pid {died.pid}) {died.how} during {doing}"
        self._deaths_in_row += 1
        log.debug("%s", what)
        if self._deaths_in_row >= MAX_DEATHS_IN_A_ROW:
            return self._give_up(what)
        try:
            self._restart()
        except WorkerGaveUpError as error:
            return error
        return WorkerCrashError(f"{what}; a new worker (pid {self._process.pid}) has loaded the model again",
                                signal_name=died.signal_name, doing=doing)

    def _give_up(self, what: str) -> WorkerGaveUpError:
        self._gave_up = WorkerGaveUpError(
            f"{what}; it died {self._deaths_in_row} times in a row, so no new one is started. If it is a "
            "crash inside llama.cpp, try another model, --lp-repack off, or fewer --lp-n-gpu-layers; "
            "run with -v to see llama.cpp's log")
        return self._gave_up

    def _restart(self) -> None:
        """A new worker, with the kept preludes registered again; raises WorkerGaveUpError when
        it dies MAX_DEATHS_IN_A_ROW times in a row."""
        while True:
            try:
                self._process = _Process(self._start)
                self._ready = self._process.ready
                self.restarts += 1
                self._register_kept()
                return
            except WorkerDied as died:
                self._process = None
                self._deaths_in_row += 1
                what = f"the llama.cpp worker (pid {died.pid}) {died.how} while loading the model"
                if self._deaths_in_row >= MAX_DEATHS_IN_A_ROW:
                    raise self._give_up(what) from None
                log.warning("%s; trying again", what)

    def _register_kept(self) -> None:
        for (label, kind), tokens in list(self._kept.items()):
            call = Call("keep_prelude", (label, tokens, kind), {})
            try:
                self._process.exchange(call, {}, [""], self.counters)
            except CachedPromptsError as error:
                log.warning("the prelude '%s' is no longer kept: %s", label, error)
                del self._kept[(label, kind)]
