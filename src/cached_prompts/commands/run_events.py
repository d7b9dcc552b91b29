"""What a run of the output commands tells whoever watches it besides the log: which outputs
are being made, their text as it is decoded, and which were written or not. `watch` passes an
observer to the commands and shows all of it on its live page.

Every method is called on the thread that runs the command, between or during backend calls,
so an observer must be quick (it may hand the news to another thread) and must not raise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cached_prompts.errors import InputsChangedError

CHANGE_CHECK_SECONDS = 0.25  # how often outputs being made look at their inputs (a few stat calls)


class RunObserver:
    """Hears a run; this base class ignores everything."""

    # True: outputs whose input changes while they are made are abandoned at once (the run
    # stops with InputsChangedError) instead of being finished and not written.
    abandon_when_inputs_change = False

    def generating(self, outputs: list[Path], what: str, budget: int) -> None:
        """`outputs` are being made now (`what` says which, for a status line); together they
        take at most `budget` tokens."""

    def step(self, new_tokens: int) -> None:
        """`new_tokens` more tokens were generated for the outputs being made."""

    def text(self, output: Path, piece: str) -> None:
        """More text of `output` (the pieces add up to its text)."""

    def written(self, outputs: list[Path]) -> None:
        """`outputs` were written."""

    def not_written(self, outputs: list[Path], why: str) -> None:
        """`outputs` were being made but are not written (an error, or their input changed)."""


QUIET = RunObserver()



@dataclass(frozen=True)
class InputStamp:
    """Size and modification time of inputs (through links, as inputs are read), taken before
    they are read and compared before their outputs are written: outputs of a text that
    changed meanwhile must not be written as if they answered the new one."""

    paths: tuple[Path, ...] = ()
    marks: tuple[tuple[int, int] | None, ...] = ()

    @classmethod
    def take(cls, paths: list[Path]) -> "InputStamp":
        return cls(tuple(paths), tuple(_mark(path) for path in paths))

    def __add__(self, other: "InputStamp") -> "InputStamp":
        return InputStamp(self.paths + other.paths, self.marks + other.marks)

    def changed(self) -> bool:
        return bool(self.changed_paths())

    def changed_paths(self) -> list[Path]:
        now = InputStamp.take(list(self.paths)).marks
        return [path for path, before, after in zip(self.paths, self.marks, now) if before != after]


def _mark(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


class ChangeCheck:
    """Called after each decode step: raises InputsChangedError once an input of the outputs
    being made has changed since it was read (looked at every CHANGE_CHECK_SECONDS)."""

    def __init__(self, stamps: list[InputStamp]) -> None:
        self._stamps = stamps
        self._next = 0.0  # the first step looks at once

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + CHANGE_CHECK_SECONDS
        changed = sorted({path.name for stamp in self._stamps for path in stamp.changed_paths()})
        if changed:
            raise InputsChangedError(f"{', '.join(changed)} changed while {'its' if len(changed) == 1 else 'their'} "
                                     "outputs were made")
