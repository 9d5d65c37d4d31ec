"""Promise 10: a new kap takes over the port while the old one drains; no client is refused."""

from __future__ import annotations

import signal

import trio
from fakeapi import PkiFiles
from kaptest import StartFake, kap_args, kap_process, who

from kap.address import Address


async def test_restart_without_a_gap(
    start_fake: StartFake, pki: PkiFiles, free_port: int, figure: object
) -> None:
    a = await start_fake("a")
    args = kap_args(
        f"127.0.0.1:{a.address[1]}",
        pki,
        port=free_port,
        shutdown_grace="5s",
        health_interval="200ms",
    )
    target = Address("127.0.0.1", free_port)
    ok, failed = 0, 0
    stop = trio.Event()
    errors: list[str] = []
    finished: list[int] = []
    t_term = float("inf")

    async def client() -> None:
        nonlocal ok, failed, t_term
        while not stop.is_set():
            try:
                await who(target, timeout=5)
                ok += 1
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as e:
                failed += 1
                errors.append(f"{trio.current_time() - t_term:.3f} {e!r}")
            await trio.sleep(0.002)
        finished.append(1)

    async with kap_process(*args) as old:
        with trio.fail_after(10):
            while not old.find("upstream healthy"):
                await trio.sleep(0.05)
        async with trio.open_nursery() as clients:
            for _ in range(4):
                clients.start_soon(client)
            await trio.sleep(1.0)
            async with kap_process(*args) as new:
                with trio.fail_after(10):
                    while not new.find("upstream healthy"):
                        await trio.sleep(0.05)
                before = ok
                t_term = trio.current_time()
                old.process.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    assert await old.process.wait() == 0
                await trio.sleep(1.0)
                stop.set()
                with trio.fail_after(10):
                    while len(finished) < 4:  # every client done before the new kap stops
                        await trio.sleep(0.01)
                served_during = ok - before
            new_log = new.lines
    figure("10 restart", "client connections during the hand-over", served_during)
    figure("10 restart", "refused or failed client connections", failed)
    assert ok > 100
    interesting = [ln for ln in old.lines + new.lines if ln.get("error") or ln["level"] != "debug"]
    assert failed == 0, (errors, interesting)
    assert any(line["msg"] == "kap started" for line in new_log)
