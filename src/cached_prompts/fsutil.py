"""Durable file writes and bounded reads of files that must be regular.

Writes: temp file in the same folder, fsync, rename, fsync the folder. A reader sees either
the old file or the whole new one, never a truncated file, even if the process is killed or
the machine loses power mid-write. The writer holds a flock on its temp file until the
rename, so `remove_stale_temp_files` can tell the leftovers of a killed writer from a write
in progress in another process.

Reads and opens (`open_regular`, `read_regular`): the cache folder and the workspace are
untrusted, so a file is opened without following a symlink and without blocking (a FIFO),
must be a regular file, and is read no further than its caller's bound (a device or a
huge file would otherwise be read until memory runs out).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import CacheWriteError, WorkspaceError
from .locks import lock_fd, names_same_file

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".part"
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp alone gives 0600


class NotRegularFileError(OSError):
    """A path that must be a regular file is a link, folder, FIFO, device or socket, or is
    larger than its reader accepts. An OSError, so callers that handle unreadable files
    handle it too."""


_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o666, *,
                 follow_symlinks: bool = False) -> int:
    """An open descriptor of the regular file `path` (`flags` as for os.open, e.g. with
    O_CREAT). Never follows a symlink (unless `follow_symlinks`, for reading a user's input
    file: then the target must be a regular file), never blocks on a FIFO; raises
    NotRegularFileError if `path` is anything but a regular file, other OSErrors as os.open does."""
    open_flags = _OPEN_FLAGS & ~os.O_NOFOLLOW if follow_symlinks else _OPEN_FLAGS
    try:
        fd = os.open(path, flags | open_flags, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotRegularFileError(errno.ELOOP, "is a symbolic link, not a regular file", str(path)) from None
        if error.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise NotRegularFileError(errno.ENXIO, "is a FIFO, not a regular file", str(path)) from None
        raise
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            raise NotRegularFileError(errno.EINVAL, f"is {kind_of(kind)}, not a regular file", str(path))
        os.set_blocking(fd, True)  # O_NONBLOCK was only for opening
    except BaseException:
        os.close(fd)
        raise
    return fd


def kind_of(mode: int) -> str:
    """What a non-regular file is, for messages: 'a folder', 'a FIFO', ..."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def read_regular(path: Path, max_bytes: int, *, follow_symlinks: bool = False) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file `path` and its stat (from the same open file).

    Raises NotRegularFileError if it is not a regular file or holds more than `max_bytes`
    (checked before reading, and again while reading in case it grows), other OSErrors
    (FileNotFoundError, ...) as reading does.
    """
    fd = open_regular(path, follow_symlinks=follow_symlinks)
    try:
        info = os.fstat(fd)
        if info.st_size > max_bytes:
            raise _too_large(path, max_bytes)
        # A read of the size it has (+1 to see growth) is the fast path: one syscall, no
        # zeroed buffer, no copy; more reads only if the kernel returns it in parts.
        chunks = [os.read(fd, info.st_size + 1)]
        total = len(chunks[0])
        while chunks[-1] and total <= max_bytes:
            chunks.append(os.read(fd, max_bytes + 1 - total))
            total += len(chunks[-1])
    finally:
        os.close(fd)
    if total > max_bytes:
        raise _too_large(path, max_bytes)
    return (chunks[0] if total == len(chunks[0]) else b"".join(chunks)), info


def _too_large(path: Path, max_bytes: int) -> NotRegularFileError:
    return NotRegularFileError(errno.EFBIG, f"is larger than the {max_bytes} bytes expected", str(path))


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
