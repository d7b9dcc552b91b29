"""Durable file writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader sees either the old file or the whole new one, never a truncated file, even if
the process is killed or the machine loses power mid-write.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import CacheError, WorkspaceError

TEMP_PREFIX = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe_os_error(error: OSError, path: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"no space left on the disk while writing {path}; free some space and run again"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied; make the folder writable or choose another"
    return f"cannot write {path}: {error.strerror or error}"


def atomic_write(path: Path, chunks: Iterable[bytes | memoryview], *, for_cache: bool = False) -> None:
    """Write `chunks` to `path` atomically and durably.

    Raises CacheError (for_cache) or WorkspaceError with an actionable message; on any
    failure the temp file is removed and `path` keeps its old content.
    """
    error_type = CacheError if for_cache else WorkspaceError
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=folder)
    except OSError as error:
        raise error_type(_describe_os_error(error, path)) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise error_type(_describe_os_error(error, path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


def atomic_write_text(path: Path, text: str, *, for_cache: bool = False) -> None:
    atomic_write(path, [text.encode("utf-8")], for_cache=for_cache)
