"""Durable file writes (atomic_write) and the clean-up of temp files a killed writer left.

Writes: temp file in the same folder, fsync, rename, fsync the folder. A reader sees either
the old file or the whole new one, never a truncated file, even if the process is killed or
the machine loses power mid-write. The writer holds a flock on its temp file until the
rename, so `remove_stale_temp_files` can tell the leftovers of a killed writer from a write
in progress in another process.

"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cached_prompts.errors import CacheWriteError, WorkspaceError
from cached_prompts.fs.locks import lock_fd, names_same_file
from cached_prompts.fs.regular import NotRegularFileError, open_regular

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".part"
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp alone gives 0600


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


def describe_os_error(error: OSError, path: Path, *, for_cache: bool = False) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        also = " or lower --cache-max-size" if for_cache else ""
        return f"no space left on the disk while writing {path}; free some space{also} and run again"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied; make the folder writable or choose another"
    return f"cannot write {path}: {error.strerror or error}"


def _locked_temp_file(folder: Path) -> tuple[int, Path]:
    """A new temp file in `folder`, flocked, that a cleaner has not removed meanwhile."""
    while True:
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
        tmp = Path(name)
        try:
            lock_fd(fd)
            if names_same_file(tmp, fd):
                return fd, tmp
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)  # removed between mkstemp and flock: take another


def atomic_write(path: Path, chunks: Iterable[bytes | memoryview], *, for_cache: bool = False) -> None:
    """Write `chunks` to `path` atomically and durably.

    Raises CacheWriteError (for_cache) or WorkspaceError with an actionable message; on any
    failure the temp file is removed and `path` keeps its old content.
    """
    error_type = CacheWriteError if for_cache else WorkspaceError
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = _locked_temp_file(folder)
    except OSError as error:
        raise error_type(describe_os_error(error, path, for_cache=for_cache)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, FILE_MODE)
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp, path)  # before closing: the temp file stays locked until renamed
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise error_type(describe_os_error(error, path, for_cache=for_cache)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


def atomic_write_text(path: Path, text: str, *, for_cache: bool = False) -> None:
    atomic_write(path, [text.encode("utf-8")], for_cache=for_cache)


def temp_files(folder: Path) -> list[Path]:
    """Names of temp files in `folder`, whatever they are (a link or FIFO planted under such
    a name is no writer's and is removed like a leftover)."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                found.append(path)
        except FileNotFoundError:
            pass
    return sorted(found)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove temp files of `folder` left by killed writers; a write in progress (its temp
    file is locked) is left alone. Returns the removed files."""
    removed = []
    for tmp in temp_files(folder):
        try:
            if _remove_if_stale(tmp):
                removed.append(tmp)
        except OSError as error:
            log.warning("cannot remove the leftover temp file %s: %s", tmp, error.strerror or error)
    if removed:
        log.info("removed %d temp file(s) left by an interrupted run in %s", len(removed), folder)
    return removed


def _remove_if_stale(tmp: Path) -> bool:
    try:
        fd = open_regular(tmp)
    except FileNotFoundError:
        return False  # renamed or removed meanwhile
    except NotRegularFileError:
        tmp.unlink()  # removes the link or FIFO itself, never what a link points to
        return True
    try:
        if lock_fd(fd, blocking=False) and names_same_file(tmp, fd):
            tmp.unlink()
            return True
        return False
    finally:
        os.close(fd)
