"""The nursery tree: every long-running part of kap, owned by one root nursery.

::

    App.run                         root nursery
    ├── App._signals                SIGTERM/SIGINT -> Proxy.stop_accepting(grace)
    ├── Relay.run                   the byte pump: one epoll set for every relayed socket
    ├── HealthServer.run            /healthz /readyz /upstreams /metrics (h11)
    ├── Membership.run              starting upstreams, then discovery's sets (a channel)
    │                               -> pool; the fallback file (worker thread); removals
    ├── ProbeScheduler.run          probe nursery: one jittered /readyz loop per upstream
    ├── App._housekeeping           drains of dead and removed upstreams, memory trim,
    │                               the problems log line
    ├── Proxy.run                   accept loop + forwarding nursery:
    │                               one task and cancel scope per client connection
    └── EndpointSliceWatcher.run    discovery: list + watch default/kubernetes slices through
                                    one of the pool's best; each new set -> the channel

Start order is the list's; kap accepts clients only once the pump, the health
server and the first probes are running. Discovery starts right after the
listener, its stack (lightkube, httpx2: about 110 ms of imports) imported
then, and ``/metrics``' prometheus-client at the first scrape
(docs/performance.md "Start-up"). ``Proxy.run`` returning (after a signal
and the drain) ends everything else.

What the pool changes (``kap.events.Change``) is published on one
``ChangeFeed`` by whoever asked the pool (probes, client dials, membership);
the probe scheduler, discovery and the app subscribe to the kinds they act
on. The app's part is wiring and the log: every change is one log line.
"""

from __future__ import annotations

import gc
import random
import signal
import time
from typing import TYPE_CHECKING

import attrs
import trio
from loguru import logger

from kap.address import Address
from kap.build import build_info
from kap.config import Config
from kap.credentials import NO_CA, CredentialFiles
from kap.events import Change, ChangeFeed, ChangeKind
from kap.health import HealthServer
from kap.membership import Membership, open_sets_channel
from kap.memory import TrimPolicy, release_free_memory
from kap.pool import Pool
from kap.probe import Prober
from kap.probe_schedule import ProbeScheduler, open_budget
from kap.proxy import Proxy
from kap.relay import Relay
from kap.report import Counters, current_problems, upstreams_json
from kap.sockets import TcpOptions
from kap.upstream import TIER_THRESHOLDS

if TYPE_CHECKING:  # imported once the listener is up (the module docstring)
    from prometheus_client import CollectorRegistry

    from kap.discovery import EndpointSliceWatcher

# How often housekeeping looks for dead upstreams to drain.
HOUSEKEEPING_PERIOD = 1.0
# Closes of a drained upstream's connections are spread over this many
# seconds with jitter, so a node's watches do not all reconnect in one burst.
DRAIN_SPREAD = 3.0


@attrs.define
class Bound:
    """Where kap listens, once it does (for tests and the start-up log)."""

    proxy: Address
    health: Address


@attrs.define
class App:
    """Builds every part from the config and runs them in one nursery (the module docstring).

    Args:
      config: the parsed configuration.
      rng: the one random source (jitter, discovery's choice, drain spread).
      tier_thresholds: the pool's latency tiers (tests put every latency in one tier).
    """

    config: Config
    rng: random.Random = attrs.field(factory=random.Random)
    tier_thresholds: tuple[float, ...] = TIER_THRESHOLDS
    changes: ChangeFeed = attrs.field(factory=ChangeFeed, init=False)
    pool: Pool = attrs.field(init=False)
    membership: Membership = attrs.field(init=False)
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
        self.pool = Pool(
            removal_grace=c.removal_grace,
            default_service=c.default_service,
            tier_thresholds=self.tier_thresholds,
        )
        discovered, sets = open_sets_channel()
        self.membership = Membership(
            pool=self.pool,
            changes=self.changes,
            sets=sets,
            flags=list(c.fallback_upstreams),
            kubeconfig_seed=c.kubeconfig_seed,
            fallback_file=c.fallback_file,
            listen=(c.listen_addr, c.listen_port),  # an upstream that is kap itself is a loop
        )
        # The passive first-byte check allows a client's upstream what a probe
        # allows its own connection to open (an apiserver answers a ClientHello at once).
        self.relay = Relay(answer_budget=open_budget(c.health_interval, c.health_timeout))
        self.credentials = CredentialFiles(c.credentials)
        self.proxy = Proxy(
            host=c.listen_addr,
            port=c.listen_port,
            pool=self.pool,
            relay=self.relay,
            options=TcpOptions(c.keepalive_period, c.tcp_user_timeout),
            dial_timeout=c.dial_timeout,
            on_changes=self.changes.publish,
            rng=self.rng,
        )
        self.probes = ProbeScheduler(
            pool=self.pool,
            prober=Prober(self.credentials, c.tls_server_name),
            interval=c.health_interval,
            timeout=c.health_timeout,
            jitter=c.health_jitter,
            changes=self.changes,
            rng=self.rng,
            readiness_interval=c.readiness_interval,
        )
        if c.discovery:
            self._discovered = discovered  # to the watcher, built in _start_discovery
        else:
            discovered.close()  # membership then only expires removals
        self.counters = self._counters()
        self.health = self._health_server(self.counters)

    def _counters(self) -> Counters:
        """What /upstreams and /metrics read outside the pool, each a read of its part."""
        return Counters(
            accepted_total=lambda: self.proxy.stats.accepted_total,
            no_upstream_total=lambda: self.proxy.stats.no_upstream_total,
            failovers_total=lambda: self.proxy.stats.failovers_total,
            passive_failures_total=lambda: self.proxy.stats.passive_failures_total,
            active_connections=lambda: self.proxy.active,
            bytes_up=lambda: self.relay.bytes_up,
            bytes_down=lambda: self.relay.bytes_down,
            discovery=lambda: None if self.discovery is None else self.discovery.status(),
            client_cert_expiry_unix=lambda: self.credentials.client_cert_not_after,
            ca_cert_expiry_unix=lambda: self.credentials.ca_not_after,
            unauthenticated=lambda: not self.credentials.authenticated,
            probe_protocol=self.probes.prober.protocol,
            health_connection_errors_total=lambda: self.health.connection_errors_total,
        )

    def _health_server(self, counters: Counters) -> HealthServer:
        """The health endpoints, each a read of the pool and the counters."""
        c = self.config
        registry: list[CollectorRegistry] = []  # built at the first scrape

        def metrics() -> bytes:
            # kap.metrics (and prometheus-client, 36 ms) at the first scrape, not at start.
            from kap.metrics import metrics_registry, metrics_text

            if not registry:
                registry.append(metrics_registry(self.pool, counters))
            return metrics_text(registry[0])

        return HealthServer(
            host=c.health_host,
            port=c.health_port,
            routes={
                "/healthz": lambda: ("text/plain", b"ok\n"),
                "/readyz": lambda: ("text/plain", b"ok\n"),
                "/upstreams": lambda: (
                    "application/json",
                    upstreams_json(self.pool, counters, trio.current_time()),
                ),
                "/metrics": lambda: ("text/plain; version=0.0.4; charset=utf-8", metrics()),
            },
        )

    # ---- the log sink -----------------------------------------------------

    def log_change(self, change: Change) -> None:
        """One log line per change about an upstream (subscribed to every kind)."""
        log = logger.bind(upstream=str(change.address), reason=change.reason)
        kind = change.kind
        if kind is ChangeKind.UNHEALTHY:
            log.warning("upstream unhealthy")
        elif kind is ChangeKind.NEVER_HEALTHY:
            log.warning("upstream not healthy since it was added")
        elif kind is ChangeKind.TIER:
            log.info("upstream tier changed")
        elif kind is ChangeKind.AUTH:
            log.warning("upstream refuses kap's credentials; counted as alive")
        elif kind is ChangeKind.SUSPECT:
            log.debug("upstream suspect until its next probe")
        elif kind is ChangeKind.DISCOVERED:
            log.debug("upstream in discovery's new set; probed now")
        else:
            log.info(f"upstream {kind.value}")

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
        with self.changes.subscribe(self.log_change):
            await self._run_tree(task_status)
        logger.info("kap stopped")

    async def _run_tree(self, task_status: trio.TaskStatus[Bound]) -> None:
        c = self.config
        async with trio.open_nursery() as root:
            root.start_soon(self._signals)
            await root.start(self.relay.run)
            health = await root.start(self.health.run)
            await root.start(self.membership.run)
            if not self.pool and c.default_service is None:
                # Valid flags with nothing to balance: say what to give, keep serving.
                logger.error(
                    "kap has no upstream to start from: give --fallback-upstreams host:port,..., "
                    "a --fallback-file with entries, or --kubeconfig, or run in a pod "
                    "(KUBERNETES_SERVICE_HOST/PORT) with discovery; kap keeps running"
                )
            await root.start(self.probes.run)
            await root.start(self._housekeeping)
            self._root = root
            proxy = await root.start(self._serve_clients)
            if self._discovered is not None:
                await self._start_discovery(root, self._discovered)
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
            self.started = True
            task_status.started(bound)

    _root: trio.Nursery | None = attrs.field(default=None, init=False)
    # Set once kap serves: an error after it is a failure, not "cannot start".
    started: bool = attrs.field(default=False, init=False)
    _discovered: trio.MemorySendChannel[list[Address]] | None = attrs.field(
        default=None, init=False
    )

    async def _start_discovery(
        self, root: trio.Nursery, discovered: trio.MemorySendChannel[list[Address]]
    ) -> None:
        """Import the discovery stack, now that clients can connect; start discovery.

        On the event loop: the clients that connect meanwhile wait in the
        listen backlog, not refused. In a worker thread instead, the import
        cost 0.8 MiB more idle RSS (a malloc arena of the thread's own) for
        no start-up gain beyond the noise (docs/performance.md "Start-up").
        """
        from kap.discovery import EndpointSliceWatcher

        watcher = EndpointSliceWatcher.from_config(
            self.config,
            pool=self.pool,
            credentials=self.credentials,
            on_update=discovered.send_nowait,
            changes=self.changes,
            rng=self.rng,
        )
        self.discovery = watcher
        await root.start(watcher.run)

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
        """SIGTERM/SIGINT drain and stop; SIGHUP/SIGUSR1/SIGUSR2 are logged and ignored.

        Their default action would end kap at once, without a log line or a
        drain, and operators send SIGHUP expecting a reload: kap re-reads its
        credential files by itself, so there is nothing to reload.
        """
        ignored = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, *ignored) as signals:
            grace = self.config.shutdown_grace
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum in ignored:
                    logger.bind(signal=name).warning(
                        "signal ignored: kap re-reads its credential files by itself; "
                        "SIGTERM stops it"
                    )
                    continue
                logger.bind(signal=name, grace_s=grace).info(
                    "shutting down: no new connections; open ones may finish"
                )
                self.stop(grace)
                grace = 0.0  # a second signal cuts the drain short

    def stop(self, grace: float) -> None:
        """Stop accepting; give open connections ``grace`` seconds; then exit."""
        self.proxy.stop_accepting(grace)

    async def _housekeeping(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Drains (removed upstreams at once, dead ones as the pool says), trims, problems."""
        draining: set[Address] = set()
        trim = TrimPolicy()

        def drain_removed(change: Change) -> None:
            nursery.start_soon(self._drain, change.address, DRAIN_SPREAD, draining)

        async with trio.open_nursery() as nursery:
            with self.changes.subscribe(drain_removed, ChangeKind.REMOVED):
                task_status.started()
                while True:
                    await trio.sleep(HOUSEKEEPING_PERIOD)
                    now = trio.current_time()
                    if trim.observe(self.proxy.active, self.proxy.stats.accepted_total):
                        release_free_memory()
                    self._log_problems(current_problems(self.pool, self.counters, now, time.time()))
                    for up in self.pool.to_drain(now, after=self.config.drain_after):
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
