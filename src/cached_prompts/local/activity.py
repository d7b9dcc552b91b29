"""What the local engine is doing now, in words ("the prefill of the prelude 'x' (92 tokens)").

In this process nobody listens and `note` costs a comparison. In the worker process
(worker_main.py) each change is sent to the parent, so that if llama.cpp kills the worker
the error says what it was doing.
"""

from __future__ import annotations

from collections.abc import Callable

_listener: list[Callable[[str], None]] = []
_last = [""]


def listen(callback: Callable[[str], None] | None) -> None:
    """Send every change of activity to `callback` (None: to nobody)."""
    _listener[:] = [callback] if callback is not None else []
    _last[0] = ""


def note(text: str) -> None:
    if _listener and text != _last[0]:
        _last[0] = text
        _listener[0](text)


def reset() -> None:
    """A new call begins: the next note is sent even if it repeats the last one."""
    _last[0] = ""
