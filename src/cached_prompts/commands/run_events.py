"""What a run of the output commands tells whoever watches it besides the log: which outputs
are being made, their text as it is decoded, and which were written or not. `watch` passes an
observer to the commands and shows all of it on its live page.

Every method is called on the thread that runs the command, between or during backend calls,
so an observer must be quick (it may hand the news to another thread) and must not raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class RunObserver:
    """Hears a run; this base class ignores everything."""

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
        return InputStamp.take(list(self.paths)).marks != self.marks


def _mark(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns
