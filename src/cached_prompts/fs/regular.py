"""Opens and bounded reads of files that must be regular.

The cache folder and the workspace are
untrusted, so a file is opened without following a symlink and without blocking (a FIFO),
must be a regular file, and is read no further than its caller's bound (a device or a
huge file would otherwise be read until memory runs out).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

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
