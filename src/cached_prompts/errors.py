"""Exception hierarchy. Only the CLI and the REPL turn these into user messages.

Every message says what went wrong and how to fix it.
"""

from __future__ import annotations


class CachedPromptsError(Exception):
    """Base class of every error this package raises on purpose."""


class OptionsError(CachedPromptsError):
    """An option, flag, config key or request parameter is unknown or invalid."""


class ModelError(CachedPromptsError):
    """The model file is missing, unreadable, not GGUF, or failed to load."""


class EngineError(CachedPromptsError):
    """llama.cpp refused an operation (decode, state restore, ...)."""


class StateUnusableError(EngineError):
    """A loaded sequence state cannot be trimmed or copied as asked (a recurrent state, lost
    sliding-window cells); the caller drops it and recomputes."""


class UnsupportedByBackendError(CachedPromptsError):
    """The backend cannot do what was asked (servers do not return the log-probabilities of
    prompt tokens); the message names what can."""


class WorkerCrashError(EngineError):
    """The worker process running llama.cpp died during a call (a signal such as SIGSEGV, or an
    abort in C); a new worker was started, so later calls work again. `signal_name` is the
    signal's name (None if it exited otherwise), `doing` what it was doing."""

    def __init__(self, message: str, *, signal_name: str | None = None, doing: str = "") -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.doing = doing

    def __reduce__(self):  # pickled like any other error (keyword arguments included)
        return (_rebuild_crash, (str(self), self.signal_name, self.doing))


def _rebuild_crash(message: str, signal_name: str | None, doing: str) -> "WorkerCrashError":
    return WorkerCrashError(message, signal_name=signal_name, doing=doing)


class WorkerGaveUpError(EngineError):
    """The llama.cpp worker died again and again with no call answered in between: the local
    engine cannot be used any more in this process (the REPL ends, a command stops)."""


class ContextOverflowError(CachedPromptsError):
    """A prelude or prompt does not fit into the context."""


class InputFileError(CachedPromptsError):
    """A workspace input file is malformed (bad name, not UTF-8, empty, ...)."""


class ConstraintError(InputFileError):
    """A JSON schema or grammar that constrains outputs (a NAME.schema.json / NAME.gbnf
    sidecar, or a REPL request's json_schema / grammar) is invalid."""


class WorkspaceError(CachedPromptsError):
    """A workspace folder is missing or cannot be written."""


class CacheError(CachedPromptsError):
    """The prelude cache cannot be read or written."""


class CacheWriteError(CacheError):
    """A cache entry could not be written (full disk, quota, read-only folder...); nothing
    of it is left, and a run can go on without it."""


class ProtocolError(CachedPromptsError):
    """A JSON-protocol request is malformed."""


class ServerError(CachedPromptsError):
    """A server refused a request (its own message is in ours) or answered off its protocol."""


class ServerDownError(ServerError):
    """A server cannot be used now (refused connection, 5xx, timeout); another may take its work."""


class IncompleteOutputsError(ServerError):
    """Some outputs of a request could be made on no server (Backend.generate; each output's
    own result comes from Backend.generate_results)."""


class InputsChangedError(CachedPromptsError):
    """An input changed while its outputs were being made: they are abandoned (watch makes
    them again from the new text)."""
