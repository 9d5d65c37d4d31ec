"""The fallback file: a JSON array of ``"host:port"`` strings kap reads at start and keeps current.

It is kap's memory across restarts: a node that reboots while the API is
unreachable still knows every apiserver. The seed's static pod mounts the file
itself as a hostPath (``FileOrCreate``), so it cannot be replaced by rename
(EBUSY on a bind-mounted file): kap rewrites it in place (truncate, write,
fsync), in a worker thread (``save``). A reader can therefore see an empty
or half-written file (and an operator can break it by hand): parsing is
tolerant, bad items are skipped and a broken file is logged and ignored,
never fatal.
"""

from __future__ import annotations

import json
import os

import trio

from kap.address import Address, AddressError
from kap.files import open_regular, read_regular

# A fallback file lists a handful of apiservers; anything larger is not one.
MAX_FILE_BYTES = 1024 * 1024


class FallbackFileError(ValueError):
    pass


def parse(text: str) -> tuple[list[Address], list[str]]:
    """Addresses from the file's text, and one line per skipped item.

    Raises:
      FallbackFileError: the text is not a JSON array at all (empty, truncated,
        corrupt); the caller logs it and goes on without the file.
    """
    if not text.strip():
        raise FallbackFileError("empty file")
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise FallbackFileError(f"not valid JSON: {e}") from None
    if not isinstance(doc, list):
        raise FallbackFileError(f'expected a JSON array of "host:port", got {type(doc).__name__}')
    out: list[Address] = []
    skipped: list[str] = []
    for i, item in enumerate(doc):
        if not isinstance(item, str):
            skipped.append(f"item {i}: not a string")
            continue
        try:
            addr = Address.parse(item)
        except AddressError as e:
            skipped.append(f"item {i}: {e}")
            continue
        if addr not in out:
            out.append(addr)
    return out, skipped


def render(addresses: list[Address]) -> str:
    return json.dumps(sorted(str(a) for a in addresses)) + "\n"


def read(path: str) -> tuple[list[Address], list[str]]:
    """Read and parse the file; a missing file is an empty list, not an error.

    Raises:
      FallbackFileError: unreadable, too large, or not a JSON array.
    """
    try:
        data = read_regular(path, MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return [], []
    except OSError as e:
        raise FallbackFileError(f"cannot read: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise FallbackFileError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FallbackFileError("not UTF-8 text") from None
    return parse(text)


def write_in_place(path: str, addresses: list[Address]) -> bool:
    """Rewrite the file in place with ``addresses``; False (nothing written) when unchanged.

    Never writes an empty list: an empty set is never better memory than the
    last good one.

    Raises:
      OSError: the file cannot be opened or written, or is not a regular
        file (a FIFO would hold the writing thread, and membership, for
        good); the caller logs it.
    """
    if not addresses:
        return False
    content = render(addresses).encode()
    fd = open_regular(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        old = os.read(fd, MAX_FILE_BYTES + 1)
        if old == content:
            return False
        os.lseek(fd, 0, os.SEEK_SET)
        view = memoryview(content)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.ftruncate(fd, len(content))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


async def save(path: str, addresses: list[Address]) -> bool:
    """``write_in_place`` in a worker thread: the fsync of a busy disk must not stall the loop.

    Cancellation: not abandoned; a write that has begun finishes (a
    half-written file is what ``read`` tolerates, but no reason to make one).
    """
    return await trio.to_thread.run_sync(write_in_place, path, addresses)
