"""kap.files and the fallback file: a FIFO, directory or device is refused, never waited on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_membership import fed_after

from kap import fallback
from kap.address import Address
from kap.files import open_regular, read_regular

A = Address("10.0.0.1", 6443)


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_read_regular_refuses_what_is_not_a_regular_file(tmp_path: Path, fifo: Path) -> None:
    with pytest.raises(OSError, match=r"not a regular file \(a FIFO\)"):
        read_regular(str(fifo), 10)
    with pytest.raises(OSError, match=r"not a regular file \(a directory\)"):
        read_regular(str(tmp_path), 10)
    with pytest.raises(OSError, match=r"not a regular file \(a character device\)"):
        read_regular("/dev/zero", 10)
    (tmp_path / "f").write_bytes(b"x" * 100)
    (tmp_path / "link").symlink_to(tmp_path / "f")  # projected volumes are symlinks
    assert read_regular(str(tmp_path / "link"), 11) == b"x" * 11


def test_open_regular_creates_a_missing_file_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_regular(str(tmp_path / "new"))
    os.close(open_regular(str(tmp_path / "new"), os.O_RDWR | os.O_CREAT))
    assert (tmp_path / "new").exists()


def test_the_fallback_file_as_a_fifo_is_refused_both_ways(fifo: Path) -> None:
    # Old code: read() waits in open() for a writer, write_in_place() in read()
    # for data; the timer feeds the FIFO after a while, so that it fails, not hangs.
    with fed_after(fifo):
        with pytest.raises(fallback.FallbackFileError, match=r"not a regular file \(a FIFO\)"):
            fallback.read(str(fifo))
        with pytest.raises(OSError, match=r"not a regular file \(a FIFO\)"):
            fallback.write_in_place(str(fifo), [A])
