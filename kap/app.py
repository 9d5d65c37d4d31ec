"""The nursery tree: every long-running part of kap, owned by one root nursery.

::

    App.run                         root nursery
    ├── App._signals                SIGTERM/SIGINT -> Proxy.stop_accepting(grace)
    ├── Relay.run                   the byte pump: one epoll set for every relayed socket
    ├── HealthServer.run            /healthz /readyz /upstreams /metrics (h11)
    ├── ProbeScheduler.run          probe nursery: one jittered /readyz loop per upstream
    ├── App._housekeeping           removal grace expiry, drain of dead upstreams
    ├── EndpointSliceWatcher.run    discovery: list + watch default/kubernetes slices through
    │                               an upstream the pool picks; the set -> App.on_discovered
    │                               -> pool (source discovery) and the fallback file
    └── Proxy.run                   accept loop + forwarding nursery:
                                    one task and cancel scope per client connection

Start order is the list's; kap accepts clients only once the pump, the health
server and the first probes are running. ``Proxy.run`` returning (after a
signal and the drain) ends everything else.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import time

import attrs
import trio
from loguru import logger

from kap import fallback
from kap.address import Address
from kap.build import build_info
from kap.config import Config
from kap.credentials import NO_CA, CredentialFiles
from kap.discovery import EndpointSliceWatcher
from kap.health import HealthServer
from kap.memory import TrimPolicy, release_free_memory
from kap.pool import SOURCE_DISCOVERY, SOURCE_FILE, SOURCE_FLAG, SOURCE_KUBECONFIG, Change, Pool
from kap.probe import Prober, ProbeScheduler
from kap.proxy import Proxy
from kap.relay import Relay
from kap.report import Counters, current_problems, metrics_registry, metrics_text, upstreams_json
from kap.sockets import TcpOptions

# How often housekeeping looks for expired removals and dead upstreams to drain.
HOUSEKEEPING_PERIOD = 1.0
# Closes of a drained upstream's connections are spread over this many
# seconds with jitter, so a node's watches do not all reconnect in one burst.
DRAIN_SPREAD = 3.0
MEMBERSHIP_KINDS = frozenset({"added", "removed"})


@attrs.define
class Bound:
    """Where kap listens, once it does (for tests and the start-up log)."""

    proxy: Address
    health: Address


@attrs.define
class App:
    config: Config
    rng: random.Random = attrs.field(factory=random.Random)
    pool: Pool = attrs.field(init=False)
    relay: Relay = attrs.field(init=False)
    proxy: Proxy = attrs.field(init=False)
    probes: ProbeScheduler = attrs.field(init=False)
    health: HealthServer = attrs.field(init=False)
    credentials: CredentialFiles = attrs.field(init=False)
    discovery: EndpointSliceWatcher | None = attrs.field(default=None, init=False)
    counters: Counters = attrs.field(init=False)
    problems: list[str] = attrs.field(factory=list, init=False)  # as last logged

    def __attrs_post_init__(self) -> None:
        c = self.config
        self.pool = Pool(removal_grace=c.removal_grace, default_service=c.default_service)
        self.relay = Relay()
        self.credentials = CredentialFiles(c.credentials)
        self.proxy = Proxy(
            host=c.listen_addr,
            port=c.listen_port,
            pool=self.pool,
            relay=self.relay,
            options=TcpOptions(c.keepalive_period, c.tcp_user_timeout),
            dial_timeout=c.dial_timeout,
            on_changes=self.on_changes,
            rng=self.rng,
        )
        self.probes = ProbeScheduler(
            pool=self.pool,
            prober=Prober(self.credentials, c.tls_server_name),
            interval=c.health_interval,
            timeout=c.health_timeout,
            jitter=c.health_jitter,
            on_changes=self.on_changes,
            rng=self.rng,
            readiness_interval=c.readiness_interval,
        )
        if c.discovery:
            self.discovery = EndpointSliceWatcher.from_config(
                c,
                pool=self.pool,
                credentials=self.credentials,
                on_update=self.on_discovered,
                rng=self.rng,
            )
        self.counters = counters = Counters(
            accepted_total=lambda: self.proxy.stats.accepted_total,
            no_upstream_total=lambda: self.proxy.stats.no_upstream_total,
            failovers_total=lambda: self.proxy.stats.failovers_total,
            passive_failures_total=lambda: self.proxy.stats.passive_failures_total,
            active_connections=lambda: self.proxy.active,
            bytes_up=lambda: self.relay.bytes_up,
            bytes_down=lambda: self.relay.bytes_down,
            discovery=lambda: None if self.discovery is None else self.discovery.status(),
            probe_protocol=self.probes.prober.protocol,
        )
        registry = metrics_registry(self.pool, counters)
        self.health = HealthServer(
            host=c.health_host,
            port=c.health_port,
            routes={
                "/healthz": lambda: ("text/plain", b"ok\n"),
                "/readyz": lambda: ("text/plain", b"ok\n"),
                "/upstreams": lambda: (
                    "application/json",
                    upstreams_json(self.pool, counters, trio.current_time()),
                ),
                "/metrics": lambda: (
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics_text(registry),
                ),
            },
        )

    # ---- membership and logging -------------------------------------------

    def on_changes(self, changes: list[Change]) -> None:
        """Log what changed about upstreams; follow membership changes with the probes.

        An upstream turning usable or unusable is passed on to discovery,
        which leaves the default Service, or an upstream no longer usable.
        """
        for ch in changes:
            log = logger.bind(upstream=str(ch.address), reason=ch.reason)
            if ch.kind == "healthy":
                log.info("upstream healthy")
            elif ch.kind == "unhealthy":
                log.warning("upstream unhealthy")
            elif ch.kind == "never-healthy":
                log.warning("upstream not healthy since it was added")
            elif ch.kind == "tier":
                log.info("upstream tier changed")
            elif ch.kind == "auth":
                log.warning("upstream refuses kap's credentials; counted as alive")
            elif ch.kind == "suspect":
                log.debug("upstream suspect until its next probe")
                self.probes.poke(ch.address)
            else:
                log.info(f"upstream {ch.kind}")
        if any(ch.kind in MEMBERSHIP_KINDS for ch in changes):
            self.probes.sync()
        if self.discovery is not None and any(
            ch.kind in ("healthy", "unhealthy", "removed") for ch in changes
        ):
            self.discovery.usable_changed()

    def set_source(self, source: str, addresses: list[Address]) -> None:
        self.on_changes(self.pool.set_source(source, addresses, now=trio.current_time()))

    def on_discovered(self, addresses: list[Address]) -> None:
        """Discovery's new set: into the pool, and into the fallback file (kap's memory).

        The file is rewritten in place (a hostPath mount cannot be renamed
        over), only when its content changes, never with an empty list; a
        write error is logged and discovery goes on. It is a small
        synchronous write: it happens only when the control plane changes.
        """
        self.set_source(SOURCE_DISCOVERY, addresses)
        path = self.config.fallback_file
        if path is None or not addresses:
            return
        log = logger.bind(path=path, upstreams=[str(a) for a in addresses])
        try:
            if fallback.write_in_place(path, addresses):
                log.info("fallback file updated with the discovered set")
        except OSError as e:
            log.bind(error=e.strerror or str(e)).error("cannot write the fallback file")

    def load_static_sources(self) -> None:
        c = self.config
        self.set_source(SOURCE_FLAG, list(c.fallback_upstreams))
        if c.kubeconfig_seed is not None:
            self.set_source(SOURCE_KUBECONFIG, [c.kubeconfig_seed])
        if c.fallback_file is not None:
            problem: str | None = None
            try:
                addresses, skipped = fallback.read(c.fallback_file)
            except fallback.FallbackFileError as e:
                problem = str(e)
            if problem is not None:
                log = logger.bind(path=c.fallback_file, error=problem)
                if _is_empty_file(c.fallback_file):
                    # A fresh node: the hostPath FileOrCreate mount made it empty.
                    log.info("the fallback file is empty; it is written once discovery succeeds")
                else:
                    log.error("ignoring the fallback file")
                return
            for why in skipped:
                logger.bind(path=c.fallback_file, error=why).warning("skipping a fallback entry")
            self.set_source(SOURCE_FILE, addresses)

    # ---- the tree ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        c = self.config
        for line in c.warnings:
            logger.warning(line)
        if not self.credentials.verifies:
            logger.warning(
                f"{NO_CA}: probes go unauthenticated "
                "(give --ca-file, --kubeconfig, or run in a pod with a ServiceAccount)"
            )
        async with trio.open_nursery() as root:
            root.start_soon(self._signals)
            await root.start(self.relay.run)
            health = await root.start(self.health.run)
            self.load_static_sources()
            if not self.pool and c.default_service is None:
                # Valid flags with nothing to balance: say what to give, keep serving.
                logger.error(
                    "kap has no upstream to start from: give --fallback-upstreams host:port,..., "
                    "a --fallback-file with entries, or --kubeconfig, or run in a pod "
                    "(KUBERNETES_SERVICE_HOST/PORT) with discovery; kap keeps running"
                )
            await root.start(self.probes.run)
            root.start_soon(self._housekeeping)
            if self.discovery is not None:
                await root.start(self.discovery.run)
            self._root = root
            proxy = await root.start(self._serve_clients)
            bound = Bound(proxy=proxy, health=health)
            # Everything imported and built so far lives as long as kap: move it
            # out of the cyclic collector's reach, so a full collection triggered
            # by connection churn scans only what connections allocate.
            gc.freeze()
            build = build_info()
            logger.bind(
                version=build.version,
                revision=build.revision,
                listen=str(proxy),
                health=str(health),
                upstreams=[str(a) for a in self.pool.addresses()],
                default_service=None if c.default_service is None else str(c.default_service),
                credentials=c.credentials.origin,
                kubeconfig_context=c.kubeconfig_context,
                tls_server_name=c.tls_server_name,
                health_interval=c.health_interval,
                health_timeout=c.health_timeout,
                dial_timeout=c.dial_timeout,
                discovery=self.discovery is not None,
            ).info("kap started")
            task_status.started(bound)
        logger.info("kap stopped")

    _root: trio.Nursery | None = attrs.field(default=None, init=False)

    async def _serve_clients(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The proxy; when it is done (stopped and drained), so is everything else."""
        try:
            await self.proxy.run(task_status=task_status)
        finally:
            if self._root is not None:
                self._root.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            grace = self.config.shutdown_grace
            async for signum in signals:
                logger.bind(signal=signal.Signals(signum).name, grace_s=grace).info(
                    "shutting down: no new connections; open ones may finish"
                )
                self.stop(grace)
                grace = 0.0  # a second signal cuts the drain short

    def stop(self, grace: float) -> None:
        """Stop accepting; give open connections ``grace`` seconds; then exit."""
        self.proxy.stop_accepting(grace)

    async def _housekeeping(self) -> None:
        draining: set[Address] = set()
        trim = TrimPolicy()
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(HOUSEKEEPING_PERIOD)
                now = trio.current_time()
                if trim.observe(self.proxy.active, self.proxy.stats.accepted_total):
                    release_free_memory()
                gone = self.pool.expire(now)
                for up in gone:
                    logger.bind(upstream=str(up.address)).info("upstream removed")
                    nursery.start_soon(self._drain, up.address, DRAIN_SPREAD, draining)
                if gone:
                    self.probes.sync()
                self._log_problems(current_problems(self.pool, self.counters, now, time.time()))
                # Drain only when there is somewhere better to go: with every
                # upstream down, the connections kap holds are the best it has.
                if self.config.drain_after > 0 and self.pool.usable():
                    for up in self.pool.unhealthy_for(now, self.config.drain_after):
                        if up.address not in draining:
                            logger.bind(upstream=str(up.address)).warning(
                                "closing the connections of an unhealthy upstream",
                                connections=up.active_connections,
                            )
                            nursery.start_soon(self._drain, up.address, DRAIN_SPREAD, draining)

    def _log_problems(self, problems: list[str]) -> None:
        """One warn line per change of ``/upstreams``' problems (none is a change too)."""
        if problems != self.problems:
            logger.bind(
                problems=problems,
                new=[p for p in problems if p not in self.problems],
                resolved=[p for p in self.problems if p not in problems],
            ).warning("problems changed")
            self.problems = problems

    async def _drain(self, address: Address, spread: float, draining: set[Address]) -> None:
        draining.add(address)
        try:
            await self.proxy.close_connections(address, spread=spread)
        finally:
            draining.discard(address)


def _is_empty_file(path: str) -> bool:
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return False
