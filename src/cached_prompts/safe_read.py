"""Bounded reads of regular files from the (untrusted) workspace.

A workspace file may be a FIFO that would block, a device that never ends, a huge file or a
symlink pointing anywhere; readers that only display or describe files use this instead of
`Path.read_bytes()`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_CHUNK = 1 << 16


def read_regular_file(path: Path, limit: int, *, follow_symlinks: bool) -> tuple[bytes, bool]:
    """At most `limit` bytes of `path` and whether the file is longer.

    Raises OSError if it is missing, unreadable, not a regular file, or (without
    `follow_symlinks`) a symlink.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # O_NONBLOCK: a FIFO never blocks
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return data[:limit], len(data) > limit
