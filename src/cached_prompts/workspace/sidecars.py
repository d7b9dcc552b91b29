"""The schema or grammar sidecar of a draft or test prompt: `NAME.schema.json` (a JSON schema)
or `NAME.gbnf` (a GBNF grammar) next to `NAME.txt`.

Here only where a sidecar is and its bytes (an input of the outputs, and part of their recipe);
what a schema or grammar means is method/constraints.py's. Sidecars come from the untrusted
workspace: a link, folder or other non-file is refused, reads are bounded.
"""

from __future__ import annotations

import enum
import hashlib
import os
import stat
from pathlib import Path

from cached_prompts.errors import ConstraintError
from cached_prompts.fs.regular import kind_of, read_regular

MAX_SIDECAR_BYTES = 256 * 1024


class ConstraintKind(str, enum.Enum):
    SCHEMA = ".schema.json"
    GRAMMAR = ".gbnf"


def shown(path: Path) -> str:
    """A workspace file as messages name it: `test_prompts/A---x.schema.json`."""
    return f"{path.parent.name}/{path.name}"


def sidecar_of(input_path: Path) -> Path | None:
    """The schema or grammar sidecar of a draft or test prompt, if it has one. Raises
    ConstraintError if it has both, or if one is a link, folder or other non-file."""
    found = [input_path.with_name(input_path.stem + kind.value) for kind in ConstraintKind]
    found = [path for path in found if os.path.lexists(path)]
    if len(found) > 1:
        raise ConstraintError(f"{shown(input_path)} has both {found[0].name} and {found[1].name}; "
                              "keep one of them")
    if not found:
        return None
    mode = os.lstat(found[0]).st_mode
    if not stat.S_ISREG(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else kind_of(mode)
        raise ConstraintError(f"{shown(found[0])} is {what}, not a file; put the schema or grammar itself there")
    return found[0]


def read_sidecar(sidecar: Path) -> bytes:
    """A sidecar's bytes (a regular file, at most MAX_SIDECAR_BYTES); ConstraintError otherwise."""
    try:
        data, _ = read_regular(sidecar, MAX_SIDECAR_BYTES)
    except OSError as error:
        raise ConstraintError(f"cannot read {shown(sidecar)}: {error.strerror or error}") from None
    return data


def sidecar_sha256(sidecar: Path) -> str:
    return hashlib.sha256(read_sidecar(sidecar)).hexdigest()
