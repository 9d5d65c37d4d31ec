"""The membership task: starting upstreams, discovery's sets off a channel, removals on time."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from loguru import logger

from kap import fallback
from kap.address import Address
from kap.events import Change, ChangeFeed, ChangeKind
from kap.membership import Membership, open_sets_channel
from kap.pool import SOURCE_DISCOVERY, SOURCE_FILE, SOURCE_FLAG, SOURCE_KUBECONFIG, Pool

A, B, C, D = (Address(f"10.0.0.{i}", 6443) for i in range(1, 5))


def membership(pool: Pool, feed: ChangeFeed, **kw: object) -> tuple[Membership, object]:
    send, receive = open_sets_channel()
    return Membership(pool=pool, changes=feed, sets=receive, **kw), send  # type: ignore[arg-type]


async def test_starting_upstreams_are_in_the_pool_when_it_reports_started(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fallback.json"
    path.write_text(json.dumps([str(C), "not an address"]))
    pool, feed, seen = Pool(), ChangeFeed(), list[Change]()
    m, _send = membership(pool, feed, flags=[A], kubeconfig_seed=B, fallback_file=str(path))
    with feed.subscribe(seen.append):
        async with trio.open_nursery() as nursery:
            await nursery.start(m.run)
            nursery.cancel_scope.cancel()
    assert [(u.address, u.sources) for u in pool.upstreams] == [
        (A, {SOURCE_FLAG}),
        (B, {SOURCE_KUBECONFIG}),
        (C, {SOURCE_FILE}),
    ]
    assert [(c.address, c.kind) for c in seen] == [(a, ChangeKind.ADDED) for a in (A, B, C)]


async def test_only_the_newest_of_queued_sets_is_applied(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    path = tmp_path / "fallback.json"
    pool, feed, seen = Pool(), ChangeFeed(), list[Change]()
    m, send = membership(pool, feed, fallback_file=str(path))
    with feed.subscribe(seen.append):
        async with trio.open_nursery() as nursery:
            await nursery.start(m.run)
            for s in ([A], [A, B], [C, D]):
                send.send_nowait(s)  # type: ignore[attr-defined]
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert pool.addresses(SOURCE_DISCOVERY) == [C, D]
    added, discovered = ChangeKind.ADDED, ChangeKind.DISCOVERED
    # A and B never joined; each member of the applied set is also DISCOVERED.
    assert [(c.address, c.kind) for c in seen] == [
        (C, added), (D, added), (C, discovered), (D, discovered)
    ]  # fmt: skip
    assert json.loads(path.read_text()) == [str(C), str(D)]


async def test_an_upstream_gone_from_discovery_is_removed_when_its_grace_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool, feed = Pool(removal_grace=5.0), ChangeFeed()
    removed: list[float] = []
    m, send = membership(pool, feed)
    with feed.subscribe(lambda c: removed.append(trio.current_time()), ChangeKind.REMOVED):
        async with trio.open_nursery() as nursery:
            await nursery.start(m.run)
            await send.send([A, B])  # type: ignore[attr-defined]
            await trio.sleep(1)
            await send.send([B])  # type: ignore[attr-defined]
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    assert removed == [6.0]
    assert pool.addresses() == [B]


async def test_without_discovery_it_keeps_running(autojump_clock: trio.testing.MockClock) -> None:
    pool, feed = Pool(), ChangeFeed()
    m, send = membership(pool, feed, flags=[A])
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        send.close()  # type: ignore[attr-defined]
        await trio.sleep(3600)
        assert pool.addresses() == [A]
        nursery.cancel_scope.cancel()


async def test_the_fallback_file_is_written_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that blocks (a disk that stalls its fsync) leaves the loop running."""
    path = tmp_path / "fallback.json"
    stalled, go_on = threading.Event(), threading.Event()
    write = fallback.write_in_place

    def stalling_write(p: str, addresses: list[Address]) -> bool:
        stalled.set()
        go_on.wait()
        return write(p, addresses)

    monkeypatch.setattr(fallback, "write_in_place", stalling_write)
    pool, feed = Pool(), ChangeFeed()
    m, send = membership(pool, feed, fallback_file=str(path))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(m.run)
            await send.send([A])  # type: ignore[attr-defined]
            while not stalled.is_set():  # the write is waiting in its thread
                await trio.sleep(0.01)
            assert A in pool
            # Every task is blocked, the writer's included: the loop itself is not.
            await trio.testing.wait_all_tasks_blocked()
            go_on.set()
            await send.send([A, B])  # type: ignore[attr-defined]
            while B not in pool or "10.0.0.2:6443" not in path.read_text():
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


@contextlib.contextmanager
def fed_after(fifo: Path, delay: float = 10.0) -> Iterator[None]:
    """After ``delay`` s, keep releasing whatever waits on ``fifo`` (a reader in open() or read()).

    Old code blocks on a FIFO; this makes its test fail instead of hang.
    """
    done = threading.Event()

    def feed() -> None:
        if done.wait(delay):
            return
        while not done.wait(0.1):
            with contextlib.suppress(OSError):
                fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
                os.write(fd, b"[]")
                os.close(fd)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


async def test_a_fallback_file_that_is_a_fifo_is_one_error_line_not_a_hang(
    tmp_path: Path,
) -> None:
    """Reading a FIFO waits for a writer, and writing one waits for a reader: kap does neither."""
    fifo = tmp_path / "fallback.json"
    os.mkfifo(fifo)
    lines: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: lines.append((m.record["message"], m.record["extra"].get("error", ""))),
        level="ERROR",
    )
    pool, feed = Pool(), ChangeFeed()
    m, send = membership(pool, feed, flags=[C], fallback_file=str(fifo))
    try:
        with fed_after(fifo), trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(m.run)
                await send.send([A])  # type: ignore[attr-defined]
                await send.send([B])  # type: ignore[attr-defined]
                while B not in pool:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    finally:
        logger.remove(sink)
    why = "not a regular file (a FIFO)"
    assert lines[0] == ("ignoring the fallback file", f"cannot read: {why}")
    assert ("cannot write the fallback file", why) in lines[1:]


async def test_an_upstream_that_is_kap_itself_is_left_out_from_every_source(
    tmp_path: Path,
) -> None:
    """kap given its own address (its clients' kubeconfig, once it points at kap) is no loop."""
    own = Address("127.0.0.1", 6445)
    path = tmp_path / "fallback.json"
    path.write_text(json.dumps([str(own), str(B)]))
    lines: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: lines.append((m.record["message"], m.record["extra"]["source"])), level="ERROR"
    )
    pool, feed = Pool(), ChangeFeed()
    m, send = membership(
        pool, feed, flags=[A, own], kubeconfig_seed=own, fallback_file=str(path),
        listen=("0.0.0.0", 6445), is_local=lambda ip: ip.startswith("127."),
    )  # fmt: skip
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(m.run)
                assert pool.addresses() == [A, B]
                for addresses in ([C, own], [C, own], [D]):
                    await send.send(addresses)  # type: ignore[attr-defined]
                    while addresses[0] not in pool:
                        await trio.sleep(0.01)
                while json.loads(path.read_text()) != [str(D)]:  # never kap itself
                    await trio.sleep(0.01)
                assert own not in pool
                nursery.cancel_scope.cancel()
    finally:
        logger.remove(sink)
    why = (
        "skipping an upstream that is kap itself: clients sent there would come back to kap, "
        "again and again"
    )
    assert lines == [(why, "flag"), (why, "kubeconfig"), (why, "file"), (why, "discovery")]
