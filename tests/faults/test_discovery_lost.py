"""Promise 8: discovery lost. Failing lists, stalled watches, 410s, garbage and oversized slices.

Through all of it the pool keeps the last good set, bad items are skipped
with a log line, and clients keep being served.
"""

from __future__ import annotations

import trio
from fakeapi import PkiFiles, SliceStore, endpoint_slice, garbage_slices
from kaptest import StartFake, make_config, start_kap, wait_until, who

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


async def test_the_pool_keeps_the_last_good_set_whatever_discovery_sees(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    figure: object,
) -> None:
    fakes = [await start_fake(h, host=h, port=free_port, require_token=pki.token) for h in HOSTS]
    good = endpoint_slice("kubernetes", [(h, True) for h in HOSTS], ports=(("https", free_port),))
    slice_store.put(good)
    cfg = make_config(
        pki,
        discovery="true",
        discover_period="300ms",
        removal_grace="500ms",
        token_file=str(pki.token_file),
        fallback_upstreams=f"{HOSTS[0]}:{free_port}",
    )
    app, bound = await start_kap(nursery, cfg)
    want = {f"{h}:{free_port}" for h in HOSTS}

    def pool() -> set[str]:
        return {str(u.address) for u in app.pool.upstreams if u.remove_at is None}

    await wait_until(lambda: pool() == want)
    w = app.discovery
    assert w is not None
    served = 0

    async def faults() -> None:
        # Each fault lasts several discovery periods (300 ms) and removal graces (500 ms).
        slice_store.list_error = 500  # the API fails every list
        for f in fakes:
            f.drop_connections()  # and drops the watches: kap must list again
        await trio.sleep(1.5)
        slice_store.list_error = None
        slice_store.stall_watches = True  # watches go silent
        await trio.sleep(1.5)
        slice_store.stall_watches = False
        for f in fakes:
            f.drop_connections()  # the stalled watch breaks (kap's own stall limit is 150 s)
        for _ in range(5):  # 410s, again and again
            slice_store.watch_410_event()
            slice_store.compact()
            await trio.sleep(0.2)
        for i, g in enumerate(garbage_slices()):  # garbage and a 20,000-endpoint slice
            slice_store.put_raw(f"garbage-{i}", g)
        await trio.sleep(1.0)
        slice_store.put(endpoint_slice("kubernetes", [], ports=(("https", free_port),)))
        await trio.sleep(1.0)  # an empty slice: nothing is removed either

    kept = True
    async with trio.open_nursery() as n:
        n.start_soon(faults)
        end = trio.current_time() + 6.5
        while trio.current_time() < end:
            kept = kept and pool() == want
            assert await who(bound.proxy) in HOSTS
            served += 1
            await trio.sleep(0.05)
    figure(
        "8 discovery lost",
        "upstreams kept through 6 s of failing discovery",
        f"{len(pool())}/{len(want)}",
    )
    figure("8 discovery lost", "discovery errors counted", w.errors_total)
    figure("8 discovery lost", "clients served meanwhile, none failed", served)
    assert kept
    assert w.errors_total >= 2
