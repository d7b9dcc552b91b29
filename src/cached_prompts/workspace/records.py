"""What made each output: a JSON sidecar next to it (`NAME.output-K.json` beside
`NAME.output-K.txt`).

Outputs stay exactly the answer text; everything about how it was made (model, backend,
sampling options, seed, time, speed, token counts) lives in the sidecar, which is not an
input (inputs are `*.txt`). A sidecar also keeps the SHA-256 of the output it describes, so
a sidecar left over from an older text of the output (an interrupted run, a hand edit) is
not shown as if it described the new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cached_prompts.backend.interface import StopReason
from cached_prompts.fs.files import atomic_write_text

from cached_prompts.fs.regular import read_regular

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
RECORD_FORMAT = 1
MAX_RECORD_BYTES = 64 * 1024
MAX_HASHED_OUTPUT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutputRecord:
    model: str              # model file name, or the server's model id
    model_id: str           # identity used for freshness: local file SHA-256, or the server model id
    backend: str            # "local", "llama-server" or "openai"
    sampling: dict          # SamplingOptions.model_dump() of the options used (greedy: temperature 0)
    seed: int | None        # None for the greedy (deterministic) output
    created: str            # ISO 8601 UTC
    run_id: str             # one id per CLI run (new_run_id())
    generated_tokens: int
    seconds: float          # wall time of the generation call that made it
    prelude_tokens: int
    prompt_tokens: int
    n_ctx: int
    output_sha256: str = ""  # of the output's bytes; filled by write_records
    stop_reason: StopReason | None = None  # how the answer ended; None: not known (older records)
    # Recipe.to_json() (recipe.py): what freshness compares. Records written before it was
    # kept have none; their outputs are judged by time and model only (outputs.py).
    recipe: dict | None = None
    drafted_tokens: int = 0  # n-gram draft tokens verified while it was decoded (--draft auto)
    accepted_tokens: int = 0  # of those, the ones kept (part of generated_tokens)

    @property
    def tokens_per_second(self) -> float | None:
        return self.generated_tokens / self.seconds if self.seconds > 0 else None


# The JSON type each field must have; bool is refused where an int is expected.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "model_id": (str,), "backend": (str,), "sampling": (dict,),
    "seed": (int, type(None)), "created": (str,), "run_id": (str,), "generated_tokens": (int,),
    "seconds": (int, float), "prelude_tokens": (int,), "prompt_tokens": (int,), "n_ctx": (int,),
    "output_sha256": (str,), "stop_reason": (str, type(None)), "recipe": (dict, type(None)),
    "drafted_tokens": (int,), "accepted_tokens": (int,),
}
_OPTIONAL = {field.name for field in dataclasses.fields(OutputRecord)
             if field.default is not dataclasses.MISSING}


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    """Sortable by time, unique across processes: `20261125T201305Z-3f9a1c`."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def record_path(output: Path) -> Path:
    """`NAME.output-K.txt` -> `NAME.output-K.json` in the same folder."""
    return output.with_suffix(RECORD_SUFFIX)


def _output_sha256(output: Path) -> str:
    try:
        data, _ = read_regular(output, MAX_HASHED_OUTPUT_BYTES)
    except OSError:
        return ""
    return hashlib.sha256(data).hexdigest()


def write_records(pairs: Iterable[tuple[Path, OutputRecord]]) -> None:
    """Write the sidecar of each (output, record); call it after the outputs are written.

    Each sidecar is written atomically (temp file and rename: a symlink in its place is
    replaced, never followed). Raises WorkspaceError if it cannot be written.
    """
    for output, record in pairs:
        if not record.output_sha256:
            record = dataclasses.replace(record, output_sha256=_output_sha256(output))
        data = {"format": RECORD_FORMAT, **dataclasses.asdict(record)}
        atomic_write_text(record_path(output), json.dumps(data, ensure_ascii=False, indent=1, allow_nan=False) + "\n")


def read_record(output: Path) -> OutputRecord | None:
    """The record of `output`, or None if there is none, it is unreadable or malformed, or it
    describes another text than the output's current one."""
    path = record_path(output)
    try:
        data, _ = read_regular(path, MAX_RECORD_BYTES)  # no link, no FIFO, bounded
    except OSError:
        return None
    record = parse_record(data)
    if record is None:
        log.debug("%s: not a valid output record; ignored", path)
        return None
    if record.output_sha256 and record.output_sha256 != _output_sha256(output):
        log.debug("%s: describes an older text of %s; ignored", path, output.name)
        return None
    return record


def parse_record(data: bytes) -> OutputRecord | None:
    """An OutputRecord from a sidecar's bytes, or None if they are not one."""
    try:
        values = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(values, dict) or values.get("format") != RECORD_FORMAT:
        return None
    fields: dict[str, Any] = {}
    for name, types in _FIELD_TYPES.items():
        if name not in values:
            if name in _OPTIONAL:
                continue
            return None
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, types):
            return None
        fields[name] = value
    if not math.isfinite(fields["seconds"]) or fields["seconds"] < 0 or fields["generated_tokens"] < 0:
        return None
    if fields.get("stop_reason") is not None:
        try:
            fields["stop_reason"] = StopReason(fields["stop_reason"])
        except ValueError:
            return None
    if not 0 <= fields.get("accepted_tokens", 0) <= fields.get("drafted_tokens", 0):
        return None
    return OutputRecord(**fields)
