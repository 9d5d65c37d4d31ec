"""The nursery tree: what is running once ``App.run`` reports started, how it stops, its log.

In-process kap (``start_kap``) in front of fake apiservers on loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from fakeapi import PkiFiles
from kaptest import StartFake, get_json, make_config, start_kap, wait_until, who
from loguru import logger

from kap.address import Address
from kap.app import App
from kap.events import Change, ChangeKind


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every loguru record emitted during the test."""
    records: list[dict[str, Any]] = []
    sink = logger.add(lambda m: records.append(m.record), level="DEBUG")
    yield records
    logger.remove(sink)


async def test_when_run_reports_started_every_part_is_serving(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, logs: list[dict[str, Any]]
) -> None:
    a = await start_fake("a")
    config = make_config(pki, fallback_upstreams=f"127.0.0.1:{a.address[1]}")  # type: ignore[index]
    with trio.fail_after(10):
        app, bound = await start_kap(nursery, config)
        messages = [r["message"] for r in logs]
        # Membership ran before the proxy: the starting upstream is in the pool, logged
        # before "kap started", and the probes have it.
        assert messages.index("upstream added") < messages.index("kap started")
        assert app.pool.addresses() == [Address("127.0.0.1", a.address[1])]  # type: ignore[index]
        doc = await get_json(bound.health, "/upstreams")
        assert [u["address"] for u in doc["upstreams"]] == [str(app.pool.addresses()[0])]
        await wait_until(app.pool.usable)  # the first probe, then a client is relayed
        assert await who(bound.proxy) == "a"
    assert app.discovery is None  # discovery off in the test config: not in the tree
    nursery.cancel_scope.cancel()


async def test_stop_closes_the_listener_at_once_and_run_returns_when_the_clients_are_done(
    start_fake: StartFake, pki: PkiFiles, logs: list[dict[str, Any]]
) -> None:
    a = await start_fake("a")
    config = make_config(pki, fallback_upstreams=f"127.0.0.1:{a.address[1]}")  # type: ignore[index]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app, bound = await start_kap(nursery, config)
            await wait_until(app.pool.usable)
            stream = await trio.open_tcp_stream(bound.proxy.host, bound.proxy.port)
            await stream.send_all(b"hi")
            assert await stream.receive_some(2) == b"hi"
            app.stop(grace=60.0)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(OSError):
                await trio.open_tcp_stream(bound.proxy.host, bound.proxy.port)
            await stream.send_all(b"still")  # the open connection goes on during the grace
            assert await stream.receive_some(5) == b"still"
            await stream.send_eof()  # the client is done: the drain ends, and so does kap
            assert await stream.receive_some(5) == b""
            await stream.aclose()
        # The nursery is closed without a cancel: App.run returned by itself.
    assert [r["message"] for r in logs][-1] == "kap stopped"


@pytest.mark.parametrize(
    ("kind", "level", "message"),
    [
        (ChangeKind.ADDED, "INFO", "upstream added"),
        (ChangeKind.REMOVING, "INFO", "upstream removing"),
        (ChangeKind.KEPT, "INFO", "upstream kept"),
        (ChangeKind.REMOVED, "INFO", "upstream removed"),
        (ChangeKind.HEALTHY, "INFO", "upstream healthy"),
        (ChangeKind.UNHEALTHY, "WARNING", "upstream unhealthy"),
        (ChangeKind.NEVER_HEALTHY, "WARNING", "upstream not healthy since it was added"),
        (ChangeKind.TIER, "INFO", "upstream tier changed"),
        (ChangeKind.AUTH, "WARNING", "upstream refuses kap's credentials; counted as alive"),
        (ChangeKind.SUSPECT, "DEBUG", "upstream suspect until its next probe"),
    ],
)
def test_every_change_is_one_log_line_naming_the_upstream_and_why(
    logs: list[dict[str, Any]], kind: ChangeKind, level: str, message: str
) -> None:
    app = App(make_config(None))
    app.log_change(Change(Address("10.0.0.1", 6443), kind, "because"))
    (record,) = logs
    assert (record["level"].name, record["message"]) == (level, message)
    assert record["extra"] == {"upstream": "10.0.0.1:6443", "reason": "because"}


def test_problems_are_logged_once_per_change_resolved_ones_included(
    logs: list[dict[str, Any]],
) -> None:
    app = App(make_config(None))
    for problems in (["x"], ["x"], ["x", "y"], ["y"], [], []):
        app._log_problems(problems)
    assert [(r["extra"]["new"], r["extra"]["resolved"]) for r in logs] == [
        (["x"], []),
        (["y"], []),
        ([], ["x"]),
        ([], ["y"]),
    ]
