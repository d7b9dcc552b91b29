"""Advisory file locks between processes sharing a cache folder (`fcntl.flock`).

The kernel drops a flock when its holder dies, so a killed process never leaves a lock
that blocks anyone. A lock file may be removed by its holder; whoever then gets the lock
on the removed file notices that the path no longer names it and tries again.

Lock files are opened without following links: a link planted where a lock file should be
would otherwise make us create or lock a file anywhere. Such a link (or FIFO, device, ...)
is removed with a warning and a regular lock file made in its place.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cached_prompts.errors import CacheError
from cached_prompts.fs.regular import NotRegularFileError, open_regular

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: out of scope, but say so clearly
    fcntl = None  # type: ignore[assignment]


def _require_fcntl() -> None:
    if fcntl is None:
        raise CacheError("the prelude cache needs POSIX file locking (fcntl), which this platform "
                         "lacks; run cached-prompts on Linux or macOS (or under WSL)")


def lock_fd(fd: int, *, blocking: bool = True) -> bool:
    """Lock an open file exclusively; False if `blocking` is off and someone else holds it."""
    _require_fcntl()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def names_same_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the open file `fd` (it may have been removed or replaced)."""
    try:
        on_disk = os.lstat(path)  # a link to the file does not count
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_ino, on_disk.st_dev) == (opened.st_ino, opened.st_dev)


def acquire(path: Path, *, blocking: bool = True) -> int | None:
    """An open, exclusively locked descriptor of the lock file `path` (created if needed),
    or None if `blocking` is off and the lock is held elsewhere."""
    _require_fcntl()
    while True:
        fd = _open_lock_file(path)
        if fd is None:
            continue
        try:
            if not lock_fd(fd, blocking=blocking):
                os.close(fd)
                return None
            if names_same_file(path, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed the file while we waited; lock the new one


def _open_lock_file(path: Path) -> int | None:
    """The lock file's descriptor, or None after removing something that is not a lock file."""

    try:
        return open_regular(path, os.O_RDWR | os.O_CREAT)
    except NotRegularFileError as error:
        log.warning("the lock file %s %s; replacing it", path, error.strerror)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):  # not one another process just made
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError as unlink_error:
            raise CacheError(f"the lock file {path} {error.strerror} and cannot be removed "
                             f"({unlink_error.strerror or unlink_error}); remove it") from None
        return None
    except OSError as error:
        raise CacheError(f"cannot create the lock file {path}: {error.strerror or error}; "
                         "make the cache folder writable") from None


def release(fd: int, path: Path | None = None) -> None:
    """Unlock; with `path`, remove the lock file first (only its holder may do that)."""
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass  # a leftover empty lock file is harmless
    os.close(fd)


@contextmanager
def held(path: Path, *, blocking: bool = True, remove: bool = False) -> Iterator[bool]:
    """Hold the lock `path` inside the block; yields False (and holds nothing) if
    `blocking` is off and it is taken. `remove` deletes the lock file on release."""
    fd = acquire(path, blocking=blocking)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            release(fd, path if remove else None)
