"""When an output must be made again: like make (missing, or older than one of its inputs),
plus the model (an output whose record says another model made it). The commands decide
with it what to regenerate, and the report shows the same judgement with its reason."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from cached_prompts.workspace.records import OutputRecord, read_record
from cached_prompts.workspace.layout import stale


class StaleReason(str, enum.Enum):
    OLDER = "older"  # missing, or older than an input (a link in its place counts too)
    OTHER_MODEL = "other-model"  # its record names another model


@dataclass(frozen=True)
class Staleness:
    reason: StaleReason
    newer_inputs: tuple[str, ...] = ()  # OLDER: the inputs changed since the output was made
    record: OutputRecord | None = None  # OTHER_MODEL: the record naming the other model

    def describe(self) -> str:
        if self.reason is StaleReason.OTHER_MODEL and self.record is not None:
            return f"made by another model ({self.record.model})"
        return "older than " + (" and ".join(self.newer_inputs) if self.newer_inputs else "its inputs")


def judge(output: Path, inputs: list[Path], model_id: str | None, *,
          record: OutputRecord | None = None) -> Staleness | None:
    """Why `output` is stale, or None if it is up to date. `model_id` None: the model is not
    judged; `record`: the output's record if the caller has read it already. Raises
    InputFileError where no output can be written (a folder in its place, see workspace.stale)."""
    if stale(output, inputs):
        return Staleness(StaleReason.OLDER, _newer_inputs(output, inputs))
    if model_id is None:
        return None
    record = record or read_record(output)
    if record is not None and record.model_id != model_id:
        return Staleness(StaleReason.OTHER_MODEL, record=record)
    return None


def _newer_inputs(output: Path, inputs: list[Path]) -> tuple[str, ...]:
    try:
        made = output.stat().st_mtime_ns
        return tuple(p.name for p in inputs if p.stat().st_mtime_ns > made)
    except OSError:  # missing output, or an input vanished meanwhile
        return ()
