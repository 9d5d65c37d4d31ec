"""Reading the files kap follows (credentials, kubeconfig, fallback file) without ever blocking.

kap reads its token and certificates on the event loop (a ``stat`` and a
small read, microseconds), and its fallback file in a worker thread. A
plain ``open()`` of a FIFO waits for a writer, and a read from one waits
for data: a token file, CA or fallback file replaced by a FIFO (by mistake,
or ``--token-file /dev/stdin``) would stop kap's whole loop, data path
included, or its membership task, for good. So every such file is opened
non-blocking and must be a regular file (a symlink to one is fine, as
Kubernetes' projected volumes use); anything else is an ``OSError`` whose
``strerror`` says what the file is instead, and the callers' usual
"cannot read" handling takes over.
"""

from __future__ import annotations

import errno
import os
import stat

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(mode: int, path: str) -> OSError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a plain file")
    return OSError(errno.EINVAL, f"not a regular file ({kind})", path)


def require_regular(path: str) -> None:
    """Raise OSError unless ``path`` is (a symlink to) a regular file; never blocks."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(mode, path)


def open_regular(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """``os.open`` that never waits: O_NONBLOCK, and the file must be a regular one.

    Returns the file descriptor (the caller closes it). O_NONBLOCK has no
    effect on a regular file's reads and writes.

    Raises:
      OSError: cannot be opened, or is not a regular file.
    """
    # Asked first as well: opening some devices does something by itself.
    try:
        require_regular(path)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise _not_regular(st_mode, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``path`` (``limit + 1`` tells "too large").

    Raises:
      OSError: cannot be opened or read, or is not a regular file.
    """
    fd = open_regular(path)
    try:
        chunks: list[bytes] = []
        left = limit
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
