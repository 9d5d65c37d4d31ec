"""Discovery: follow the ``default/kubernetes`` EndpointSlices, through kap's own pool.

``EndpointSliceWatcher.run`` follows the slices labelled
``kubernetes.io/service-name=kubernetes`` in ``default`` the way client-go's
reflector does (``kap.reflector``: lists from the watch cache, one
long-lived watch with bookmarks, ``--discover-period`` as the poll interval
only when no watch can be kept). Each time the union of ready addresses
changes it calls ``on_update`` (the app sends the set on a channel to
``kap.membership``, which puts it into the pool as source ``discovery`` and
rewrites the fallback file).

The rooms: ``kap.apiclient`` adapts lightkube (client, requests, tolerant
resource type, one-line errors); ``kap.reflector`` lists and watches;
``kap.slices.SliceSet`` keeps the slices and says when the ready set
changed; ``Pool.where_to_ask`` chooses the upstream to ask. This module is
the session loop, its state and its log lines.

How it reaches the API: through an upstream of the pool's best group
(``Pool.best``, what client traffic is picked from, chosen at random so the
nodes spread their watches; a query, so the clients' round-robin does not
move); when nothing is usable yet, the pool's other members in turn. Only
when the pool holds no upstream at all (a kap started without starting
upstreams) does it ask the ``kubernetes`` Service's ClusterIP
(``KUBERNETES_SERVICE_HOST:PORT``): a last resort, since reaching it needs
the node's Service routing, which may itself need kap. The Service is never
an upstream (never in the pool, never probed), and discovery leaves it as
soon as a discovered apiserver is usable. So discovery fails over like
client traffic does. The apiserver certificate is verified against
``--tls-server-name`` (sent as SNI; empty = the dialed address) and proxies
from the environment are ignored (``trust_env=False``).

Discovery sends credentials, so it runs only with a CA that verifies the
apiservers: without one it is off (one error line; ``status`` says why).

The lightkube traps under trio are listed, with what kap does about each,
in ``kap.apiclient``.

Error handling: every failure of a session (connect, TLS, HTTP status, bad
JSON, timeout) is counted, logged rate-limited, shown under ``"discovery"``
in /upstreams, and followed by a full-jitter exponential backoff; the next
session prefers another upstream. Nothing discovery does removes an
upstream on its own: an empty or failed result leaves the pool as it is.

Cancellation: ``run`` ends only when cancelled; clients are closed in a
shielded scope with a short deadline.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio
from loguru import logger

from kap import apiclient
from kap.address import Address
from kap.apiclient import RawEndpointSlice
from kap.config import Config
from kap.credentials import NO_CA, CredentialFiles
from kap.events import Change, ChangeFeed, ChangeKind
from kap.kubeconfig import KubeconfigCredentials
from kap.pool import Pool
from kap.reflector import (
    BACKOFF_CAP,
    BACKOFF_INITIAL,
    LIST_TIMEOUT_FLOOR,
    QUIET_WATCHES_BEFORE_POLLING,
    STALL_LIMIT,
    WATCH_TIMEOUT,
    Reflector,
    backoff_delay,
)

NAMESPACE = "default"
SERVICE = "kubernetes"
# Errors are logged at most this often (the rest are counted in the next line
# and in kap_discovery_errors_total): thousands of nodes must not flood logs.
ERROR_LOG_INTERVAL = 30.0


DiscoveryError = apiclient.RequestError


@attrs.define
class EndpointSliceWatcher:
    """Lists and watches the control plane's EndpointSlices; reports the ready set.

    Args:
      pool: where the upstream to ask is chosen.
      credentials: how discovery authenticates (``origin`` says which mode).
      server_name: verified name and SNI; empty = the dialed address.
      period: ``--discover-period``: the poll interval when no watch can be kept.
      on_update: called with the new set whenever the union of ready
        addresses changes (also when it becomes empty: the pool ignores that).
      seed: the kubeconfig's server, for the app to add to the pool.
      error_log_interval: see the constant above; watch_timeout, stall_limit,
        backoff_initial, backoff_cap, list_timeout_floor,
        quiet_watches_before_polling: see ``kap.reflector``.
      changes: the pool's change feed (a usable upstream ends a stay on the Service).
    """

    pool: Pool
    credentials: CredentialFiles
    server_name: str
    period: float
    on_update: Callable[[list[Address]], None]
    rng: random.Random = attrs.field(factory=random.Random)
    seed: Address | None = None
    # Holds the kubeconfig's inline-data files open as long as discovery runs.
    kubeconfig: KubeconfigCredentials | None = None
    watch_timeout: float = WATCH_TIMEOUT
    stall_limit: float = STALL_LIMIT
    backoff_initial: float = BACKOFF_INITIAL
    backoff_cap: float = BACKOFF_CAP
    list_timeout_floor: float = LIST_TIMEOUT_FLOOR
    error_log_interval: float = ERROR_LOG_INTERVAL
    quiet_watches_before_polling: int = QUIET_WATCHES_BEFORE_POLLING
    namespace: str = NAMESPACE
    service: str = SERVICE
    changes: ChangeFeed = attrs.field(factory=ChangeFeed)
    # -- state, shown by status() --
    last_success_unix: float | None = None
    last_error: str | None = None
    # Wall time of the first failure since the last success; None while it works.
    failing_since_unix: float | None = None
    errors_total: int = 0
    source_upstream: Address | None = None
    reflector: Reflector = attrs.field(init=False)
    _generation: int = attrs.field(default=0, alias="_generation")
    _failures: int = attrs.field(default=0, alias="_failures")
    _turn: int = attrs.field(default=0, alias="_turn")
    _error_logged_at: float | None = attrs.field(default=None, alias="_error_logged_at")
    _errors_unlogged: int = attrs.field(default=0, alias="_errors_unlogged")
    _asking_service: bool = attrs.field(default=False, alias="_asking_service")

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        pool: Pool,
        credentials: CredentialFiles,
        on_update: Callable[[list[Address]], None],
        changes: ChangeFeed,
        rng: random.Random,
    ) -> EndpointSliceWatcher:
        """The watcher for ``config``, with the credentials the probes use too.

        Which files they are (flags, kubeconfig, static-pod, ServiceAccount)
        and the kubeconfig's seed and tls-server-name are resolved at start,
        in ``kap.config``.
        """
        return cls(
            pool=pool,
            credentials=credentials,
            server_name=config.tls_server_name,
            period=config.discover_period,
            on_update=on_update,
            rng=rng,
            seed=config.kubeconfig_seed,
            changes=changes,
        )

    def __attrs_post_init__(self) -> None:
        self.reflector = Reflector(
            self.namespace,
            self.service,
            self.period,
            self.on_update,
            rng=self.rng,
            watch_timeout=self.watch_timeout,
            stall_limit=self.stall_limit,
            backoff_initial=self.backoff_initial,
            backoff_cap=self.backoff_cap,
            list_timeout_floor=self.list_timeout_floor,
            quiet_watches_before_polling=self.quiet_watches_before_polling,
        )

    # ---- reporting -----------------------------------------------------------

    @property
    def mode(self) -> str:
        """starting, off, list, watch, poll or backoff."""
        return self.reflector.mode

    @property
    def lists_total(self) -> int:
        return self.reflector.lists_total

    def status(self) -> dict[str, Any]:
        """What /upstreams shows under "discovery" (and /metrics reads)."""
        return {
            "mode": self.mode,
            "credentials": self.credentials.files.origin,
            "last_success_unix": self.last_success_unix,
            "last_error": self.last_error,
            "failing_since_unix": self.failing_since_unix,
            "errors_total": self.errors_total,
            "lists_total": self.lists_total,
            "slices": len(self.reflector.slices),
            "addresses": [str(a) for a in self.reflector.slices.ready or ()],
            "source_upstream": None if self.source_upstream is None else str(self.source_upstream),
            "resource_version": self.reflector.resource_version,
        }

    @property
    def has_credentials(self) -> bool:
        """kap presents credentials (only ever to apiservers verified against a CA)."""
        return self.credentials.authenticated

    # ---- the loop ----------------------------------------------------------

    def off_reasons(self) -> list[tuple[str, str]]:
        """Why discovery cannot run, each with what to give; empty when it can.

        No credentials: nothing to authenticate with. No CA: kap presents
        credentials only to an apiserver whose certificate it verified, so
        discovery would have nothing to authenticate with either.
        """
        out = []
        f = self.credentials.files
        if f.token_file is None and (f.cert_file is None or f.key_file is None):
            out.append(
                (
                    "no credentials",
                    "--kubeconfig, --token-file, --cert-file/--key-file, --as-static-pod "
                    "or a ServiceAccount",
                )
            )
        if not self.credentials.verifies:
            out.append(
                (
                    NO_CA,
                    "--ca-file, a kubeconfig with a certificate authority, --as-static-pod "
                    "or a ServiceAccount",
                )
            )
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Discover until cancelled. Returns at once when it cannot (``off_reasons``)."""
        off = self.off_reasons()
        if off:
            self.reflector.mode = "off"
            self.last_error = "; ".join(why for why, _ in off)
            give = "; ".join(what for _, what in off)
            logger.bind(credentials=self.credentials.files.origin, error=self.last_error).error(
                f"discovery is off: {self.last_error}. Give {give}. "
                "kap balances the starting upstreams only"
            )
            task_status.started()
            return
        task_status.started()
        avoid: Address | None = None
        while True:
            self._turn += 1
            target = self.pool.where_to_ask(avoid, draw=self.rng.random(), turn=self._turn)
            if target is None:
                self._failed(
                    None,
                    "no upstream to ask: the pool is empty and there is no kubernetes Service "
                    "(KUBERNETES_SERVICE_HOST)",
                )
            else:
                self._note_service(target)
                try:
                    await self._session(target)
                    avoid = None
                    continue  # the session ended to switch upstreams: no backoff
                except DiscoveryError as e:
                    self._failed(target, str(e))
                    avoid = target
            self.reflector.mode = "backoff"
            await trio.sleep(self.reflector.backoff(self._failures))

    def _note_service(self, target: Address) -> None:
        """Log (once per stay) that discovery asks the Service, the last resort."""
        service = target not in self.pool
        if service and not self._asking_service:
            logger.bind(service=str(target)).info(
                "discovery asks the kubernetes Service: the pool has no upstream yet "
                "(a last resort; it moves to a discovered apiserver once one is usable)"
            )
        self._asking_service = service

    async def _session(self, target: Address) -> None:
        """List and watch through ``target`` until it fails or should be left.

        Returns (no error) when the target is no longer usable while another
        upstream is, or when the TLS credentials were rotated. Being left is
        noticed when the pool's usable set changes, not only when a watch
        ends (a watch lasts minutes). A target that is not a pool member is
        the default Service: left as soon as any upstream is usable.

        Raises:
          DiscoveryError: the list or the watch failed.
        """
        async with apiclient.open_client(
            target, self.credentials, self.server_name, self.namespace
        ) as client:
            self._generation = self.credentials.generation
            failed: DiscoveryError | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._leave_when_asked, target, nursery.cancel_scope)
                try:
                    await self.reflector.follow(client, target, lambda: self._leave(target))
                except DiscoveryError as e:
                    failed = e  # raised below, not as an ExceptionGroup
                nursery.cancel_scope.cancel()
            if failed is not None:
                raise failed

    async def _leave_when_asked(self, target: Address, session: trio.CancelScope) -> None:
        """Ends a stay on the default Service, or on an upstream no longer usable, at once.

        Woken by the pool's ``HEALTHY``, ``UNHEALTHY`` and ``REMOVED`` changes,
        not when the watch ends.
        """
        service = target not in self.pool
        kinds = (ChangeKind.HEALTHY, ChangeKind.UNHEALTHY, ChangeKind.REMOVED)
        while not (self.pool.usable() if service else self._should_leave(target)):
            changed = trio.Event()
            with self.changes.subscribe(_setter(changed), *kinds):
                await changed.wait()
        if service:
            logger.bind(service=str(target)).info(
                "discovery leaves the kubernetes Service: a discovered apiserver is usable"
            )
        else:
            logger.bind(upstream=str(target)).info(
                "discovery moves off an upstream that is no longer usable"
            )
        session.cancel()

    def _leave(self, target: Address) -> bool:
        """After each list and each watch that ended well: True to end the session.

        It ends to switch upstreams (``target`` no longer usable while another
        is) or because the TLS credentials were rotated.
        """
        self._succeeded(target)
        self.credentials.ssl_context()  # a stat per file: notices rotated certificates
        return self.credentials.generation != self._generation or self._should_leave(target)

    def _should_leave(self, target: Address) -> bool:
        up = self.pool.get(target)
        return (up is None or not up.usable) and bool(self.pool.usable())

    # ---- bookkeeping ---------------------------------------------------------

    def _succeeded(self, target: Address) -> None:
        if self._failures:
            logger.bind(upstream=str(target), after_failures=self._failures).info(
                "discovery recovered"
            )
        self._failures = 0
        self._errors_unlogged = 0
        self._error_logged_at = None
        self.source_upstream = target
        self.last_success_unix = time.time()
        self.failing_since_unix = None

    def _failed(self, target: Address | None, error: str) -> None:
        self._failures += 1
        self.errors_total += 1
        self.last_error = error
        if self.failing_since_unix is None:
            self.failing_since_unix = time.time()
        now = trio.current_time()
        if self._error_logged_at is None or now - self._error_logged_at >= self.error_log_interval:
            logger.bind(
                upstream=None if target is None else str(target),
                error=error,
                failures=self._failures,
                not_logged=self._errors_unlogged,
            ).error("discovery failed; keeping the current upstreams")
            self._error_logged_at = now
            self._errors_unlogged = 0
        else:
            self._errors_unlogged += 1


def _setter(event: trio.Event) -> Callable[[Change], None]:
    return lambda _: event.set()


__all__ = ["DiscoveryError", "EndpointSliceWatcher", "RawEndpointSlice", "backoff_delay"]
