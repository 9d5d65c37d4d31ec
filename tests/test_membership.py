"""The membership task: starting upstreams, discovery's sets off a channel, removals on time."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import trio
import trio.testing

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


async def test_the_fallback_file_is_written_off_the_event_loop(tmp_path: Path) -> None:
    """A write that blocks (a FIFO nobody feeds: reading it waits) leaves the loop running."""
    fifo = tmp_path / "fallback.json"
    os.mkfifo(fifo)
    pool, feed = Pool(), ChangeFeed()
    m, send = membership(pool, feed)
    released, fired = threading.Event(), threading.Event()

    def watchdog() -> None:
        """Should the write block the loop itself, unblock it: the test then fails, not hangs."""
        if not released.wait(10):
            fired.set()
            with contextlib.suppress(OSError):
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.write(writer, b"[]")
                os.close(writer)

    threading.Thread(target=watchdog, daemon=True).start()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(m.run)
            m.fallback_file = str(fifo)  # after the start, which reads it
            await send.send([A])  # type: ignore[attr-defined]
            while A not in pool:  # the set is in the pool; the write is waiting in its thread
                await trio.sleep(0.01)
            # Every task is blocked, the writer's included: the loop itself is not.
            await trio.testing.wait_all_tasks_blocked()
            released.set()
            assert not fired.is_set(), "the write blocked the event loop"
            # Unblock the write (it then fails on the FIFO: logged, and membership goes on).
            # Opening for writing waits for the writer thread's open: no race with it.
            writer = await trio.to_thread.run_sync(os.open, fifo, os.O_WRONLY)
            os.write(writer, b"[]")
            os.close(writer)
            m.fallback_file = None  # the next set must not wait on the FIFO again
            await send.send([A, B])  # type: ignore[attr-defined]
            while B not in pool:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
