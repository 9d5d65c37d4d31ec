"""Membership: which addresses are upstreams, from every source, applied to the pool.

``Membership.run`` loads the starting upstreams (flags, the kubeconfig's
server, the fallback file) before it reports started, then receives
discovery's sets on a memory channel. Each set goes into the pool (source
``discovery``) and into the fallback file, kap's memory across restarts; the
file is written in a worker thread (``kap.fallback.save``), so its fsync
never stalls the loop. It also removes upstreams whose removal grace has
passed, at the moment it passes. Every change it makes is published on the
change feed (``ADDED``, ``REMOVING``, ``KEPT``, ``REMOVED``, and
``DISCOVERED`` for each member of a discovered set): the probe scheduler
follows them, the app logs them and drains removed upstreams.

Each set is discovery's whole current view, so only the latest one matters:
sets that queued up while a write was in progress are skipped to the newest.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Sequence

import attrs
import trio
from loguru import logger

from kap import fallback
from kap.address import Address, loops_back
from kap.events import Change, ChangeFeed, ChangeKind
from kap.pool import SOURCE_DISCOVERY, SOURCE_FILE, SOURCE_FLAG, SOURCE_KUBECONFIG, Pool
from kap.sockets import is_local_ip


def open_sets_channel() -> tuple[
    trio.MemorySendChannel[list[Address]], trio.MemoryReceiveChannel[list[Address]]
]:
    """The channel from discovery to membership.

    Unbounded, because the sender (discovery's bookkeeping) must not block and
    sends only when the set of ready apiservers changes; the receiver skips
    to the newest set, so what waits in it is a few lists of a few addresses.
    """
    return trio.open_memory_channel[list[Address]](math.inf)


@attrs.define
class Membership:
    """Applies the sources' address sets to the pool; see the module docstring.

    Args:
      pool: where the sets go.
      changes: where what changed is published.
      sets: discovery's sets (the channel's receive side).
      flags: ``--fallback-upstreams``.
      kubeconfig_seed: the kubeconfig's server, if any.
      fallback_file: read at start, rewritten with each discovered set.
      listen: kap's own listen address and port; an upstream that is kap
        itself (``kap.address.loops_back``) is left out with an error line,
        from every source: it would loop clients through kap until it ran
        out of file descriptors.
      is_local: whether an IP is this host's (for a wildcard ``listen``).
    """

    pool: Pool
    changes: ChangeFeed
    sets: trio.MemoryReceiveChannel[list[Address]]
    flags: Sequence[Address] = ()
    kubeconfig_seed: Address | None = None
    fallback_file: str | None = None
    listen: tuple[str, int] | None = None
    is_local: Callable[[str], bool] = is_local_ip
    # The loops already logged, by source: each set repeats them, the log must not.
    _loops: dict[str, set[Address]] = attrs.field(factory=dict, alias="_loops")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the starting upstreams, report started, then follow discovery until cancelled."""
        self.load_starting()
        task_status.started()
        receiving = True
        while True:
            addresses: list[Address] | None = None
            expiry = self.pool.next_expiry()
            with trio.move_on_at(math.inf if expiry is None else expiry):
                if receiving:
                    try:
                        addresses = self._newest(await self.sets.receive())
                    except trio.EndOfChannel:  # no discovery: only expiries are left
                        receiving = False
                else:
                    await trio.sleep_forever()
            if addresses is not None:
                await self.discovered(addresses)
            self.changes.publish(self.pool.expire(trio.current_time()))

    def _newest(self, addresses: list[Address]) -> list[Address]:
        """``addresses``, or the last of the sets queued behind it."""
        while True:
            try:
                addresses = self.sets.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return addresses

    def set_source(self, source: str, addresses: Sequence[Address]) -> None:
        self._apply(source, self._without_loops(source, addresses))

    def _apply(self, source: str, addresses: Sequence[Address]) -> None:
        self.changes.publish(self.pool.set_source(source, addresses, now=trio.current_time()))

    def _without_loops(self, source: str, addresses: Sequence[Address]) -> list[Address]:
        """``addresses`` but kap's own listen address, logged once while it keeps coming."""
        if self.listen is None:
            return list(addresses)
        host, port = self.listen
        loops = {a for a in addresses if loops_back(a, host, port, self.is_local)}
        for a in sorted(loops - self._loops.get(source, set())):
            logger.bind(upstream=str(a), source=source, listen=f"{host}:{port}").error(
                "skipping an upstream that is kap itself: clients sent there would come back "
                "to kap, again and again"
            )
        self._loops[source] = loops
        return [a for a in addresses if a not in loops]

    async def discovered(self, addresses: list[Address]) -> None:
        """Discovery's new set: into the pool (each member ``DISCOVERED``), and the fallback file.

        The file is rewritten in place (a hostPath mount cannot be renamed
        over), only when its content changes, never with an empty list; a
        write error is logged and membership goes on.
        """
        addresses = self._without_loops(SOURCE_DISCOVERY, addresses)  # nor in the file
        self._apply(SOURCE_DISCOVERY, addresses)
        # A changed slice says something moved in the control plane: every
        # upstream in it gets a /readyz now, not a PING at its next tick.
        why = "in discovery's new set"
        self.changes.publish([Change(a, ChangeKind.DISCOVERED, why) for a in addresses])
        path = self.fallback_file
        if path is None or not addresses:
            return
        log = logger.bind(path=path, upstreams=[str(a) for a in addresses])
        try:
            if await fallback.save(path, addresses):
                log.info("fallback file updated with the discovered set")
        except OSError as e:
            log.bind(error=e.strerror or str(e)).error("cannot write the fallback file")

    def load_starting(self) -> None:
        """The starting upstreams: flags, the kubeconfig's server, the fallback file.

        A broken fallback file is one logged line and is otherwise ignored; an
        empty one is normal on a fresh node.
        """
        self.set_source(SOURCE_FLAG, self.flags)
        if self.kubeconfig_seed is not None:
            self.set_source(SOURCE_KUBECONFIG, [self.kubeconfig_seed])
        path = self.fallback_file
        if path is None:
            return
        problem: str | None = None
        try:
            addresses, skipped = fallback.read(path)
        except fallback.FallbackFileError as e:
            problem = str(e)
        if problem is not None:
            log = logger.bind(path=path, error=problem)
            if _is_empty_file(path):
                # A fresh node: the hostPath FileOrCreate mount made it empty.
                log.info("the fallback file is empty; it is written once discovery succeeds")
            else:
                log.error("ignoring the fallback file")
            return
        for why in skipped:
            logger.bind(path=path, error=why).warning("skipping a fallback entry")
        self.set_source(SOURCE_FILE, addresses)


def _is_empty_file(path: str) -> bool:
    """An empty regular file (a FIFO or device has size 0 too, and is no fresh node's file)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0
