"""The fallback file: tolerant parsing (a table), reading and rewriting in place in tmp_path."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from kap import fallback
from kap.address import Address
from kap.fallback import FallbackFileError

A, B = Address("10.0.0.1", 6443), Address("10.0.0.2", 6443)


@pytest.mark.parametrize(
    ("text", "addresses", "skipped"),
    [
        ("[]", [], []),
        ('["10.0.0.1:6443"]', [A], []),
        ('["10.0.0.2:6443", "10.0.0.1:6443", "10.0.0.2:6443"]', [B, A], []),  # once each
        ('["10.0.0.1:6443", 7, "nope", null]', [A], ["item 1", "item 2", "item 3"]),
        ('  ["10.0.0.1:6443"]\n', [A], []),
    ],
)
def test_bad_items_are_skipped_one_line_each(
    text: str, addresses: list[Address], skipped: list[str]
) -> None:
    got, why = fallback.parse(text)
    assert got == addresses
    assert [w.split(":")[0] for w in why] == skipped
    assert all("\n" not in w for w in why)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty file"),
        ("  \n", "empty file"),
        ('["10.0.0.1:64', "not valid JSON"),  # half-written
        ('{"a": 1}', "got dict"),
        ('"10.0.0.1:6443"', "got str"),
    ],
)
def test_a_file_that_is_not_an_array_is_an_error_not_a_crash(text: str, says: str) -> None:
    with pytest.raises(FallbackFileError, match=says):
        fallback.parse(text)


@given(st.lists(st.ip_addresses(), max_size=8), st.integers(1, 65535))
def test_render_then_parse_gives_the_addresses_back_sorted(ips: list[object], port: int) -> None:
    addresses = list(dict.fromkeys(Address.from_ip(str(ip), port) for ip in ips))
    got, skipped = fallback.parse(fallback.render(addresses))
    assert skipped == [] and sorted(map(str, got)) == sorted(map(str, addresses))


def test_a_missing_file_is_an_empty_list(tmp_path: Path) -> None:
    assert fallback.read(str(tmp_path / "missing.json")) == ([], [])


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\xff\xfe[]", "not UTF-8"),
        (b" " * (fallback.MAX_FILE_BYTES + 1), "larger than"),
        (b"", "empty file"),
    ],
)
def test_a_broken_file_is_one_error(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "fallback.json"
    path.write_bytes(content)
    with pytest.raises(FallbackFileError, match=says):
        fallback.read(str(path))


def test_a_directory_is_a_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(FallbackFileError, match="cannot read"):
        fallback.read(str(tmp_path))


def test_the_file_is_rewritten_in_place_and_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "fallback.json"
    path.write_text(json.dumps(["10.0.0.9:6443"] * 50))  # longer than what replaces it
    inode = path.stat().st_ino
    assert fallback.write_in_place(str(path), [B, A]) is True
    assert path.read_text() == '["10.0.0.1:6443", "10.0.0.2:6443"]\n'  # truncated, sorted
    assert path.stat().st_ino == inode  # the same file: a bind mount keeps seeing it
    mtime = path.stat().st_mtime_ns
    assert fallback.write_in_place(str(path), [A, B]) is False  # unchanged: not written
    assert path.stat().st_mtime_ns == mtime
    assert fallback.read(str(path)) == ([A, B], [])


def test_an_empty_set_is_never_written(tmp_path: Path) -> None:
    path = tmp_path / "fallback.json"
    assert fallback.write_in_place(str(path), []) is False
    assert not path.exists()
    path.write_text('["10.0.0.1:6443"]\n')
    assert fallback.write_in_place(str(path), []) is False
    assert fallback.read(str(path)) == ([A], [])


def test_a_file_that_cannot_be_opened_raises_for_the_caller_to_log(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        fallback.write_in_place(str(tmp_path / "no" / "dir.json"), [A])


async def test_save_writes_in_a_worker_thread_so_a_blocked_write_leaves_the_loop_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that blocks (a disk that stalls its fsync) leaves the loop running.

    (A FIFO in the file's place is refused at once: tests/test_files.py.)
    """
    path = tmp_path / "fallback.json"
    stalled, go_on = threading.Event(), threading.Event()
    write = fallback.write_in_place

    def stalling_write(p: str, addresses: list[Address]) -> bool:
        stalled.set()
        if not go_on.wait(10):  # the loop itself was blocked: fail, do not hang
            raise AssertionError("the write blocked the event loop")
        return write(p, addresses)

    monkeypatch.setattr(fallback, "write_in_place", stalling_write)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fallback.save, str(path), [A])
            while not stalled.is_set():
                await trio.sleep(0.01)
            # Every task, the saver included, is blocked: the loop itself is not.
            await trio.testing.wait_all_tasks_blocked()
            go_on.set()
    assert json.loads(path.read_text()) == [str(A)]
