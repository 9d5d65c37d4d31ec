"""Discovery: follow the ``default/kubernetes`` EndpointSlices, through kap's own pool.

``EndpointSliceWatcher.run`` lists the slices labelled
``kubernetes.io/service-name=kubernetes`` in ``default``, watches from the
list's resourceVersion, and lists again at least every ``--discover-period``.
Each time the union of ready addresses changes it calls ``on_update`` (the
app sends the set on a channel to ``kap.membership``, which puts it into the
pool as source ``discovery`` and rewrites the fallback file).

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

Why lightkube, and how: the request side is lightkube 1.x's ``AsyncClient``
(``list`` and ``watch`` for the resource, the selector, resourceVersion
handling, ``ApiError`` for a ``Status``), one client per session with a
custom httpx2 transport (``_UpstreamTransport``) bound to the chosen upstream
that adds SNI and the current bearer token. The decoding side is not
lightkube's typed models: msgspec decodes strictly, so one bad item fails a
whole typed list. The resource type given to lightkube is ``RawEndpointSlice``,
which keeps each item's JSON as it came, and ``kap.slices`` parses it
tolerantly, skipping bad items with a log line. The lightkube 1.0.1 traps
under trio, and what this module does about each:

* a retrying ``on_error`` handler sleeps with ``asyncio.sleep``: kap uses the
  default (raise) and retries in its own trio loop, with backoff and jitter;
* connection errors escape even a retrying watch (the request is sent
  outside its ``try``): caught here like any other error;
* HTTP 410 on the watch request is a plain ``httpx2.HTTPStatusError`` (the
  watch does not translate it), and a 410 ERROR event is an ``ApiError``:
  both mean "re-list", and two watches in a row that end without an event
  wait for the next scheduled list instead of spinning;
* a watch has no read deadline: every watch lives inside the cancel scope
  that ends at the next list (one period), so a stalled watch costs at most
  one period; lists have their own deadline;
* a typed list fails whole on one bad item: see ``RawEndpointSlice`` above.

Error handling: every failure of a session (connect, TLS, HTTP status, bad
JSON, timeout) is counted, logged rate-limited, shown under ``"discovery"``
in /upstreams, and followed by a jittered exponential backoff; the next
session prefers another upstream. Nothing discovery does removes an
upstream on its own: an empty or failed result leaves the pool as it is.

Cancellation: ``run`` ends only when cancelled; clients are closed in a
shielded scope with a short deadline.
"""

from __future__ import annotations

import contextlib
import random
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import attrs
import httpx2
import msgspec
import trio
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.core.resource import ApiInfo, NamespacedResourceG, ResourceDef
from loguru import logger

from kap import slices
from kap.address import Address
from kap.config import Config
from kap.credentials import CredentialFiles
from kap.events import Change, ChangeFeed, ChangeKind
from kap.kubeconfig import KubeconfigCredentials
from kap.pool import Pool
from kap.probe import describe_error

NAMESPACE = "default"
SERVICE = "kubernetes"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
HTTP_GONE = 410
# client-go's reflector backs off from 800 ms, doubling (with jitter) up to
# 30 s; kap also never waits longer than one --discover-period, so an API
# that comes back is followed within about one period.
BACKOFF_INITIAL = 0.8
BACKOFF_CAP = 30.0
# A list slower than the period that repeats it is as good as failed; this
# floor keeps a sub-second --discover-period from failing every TLS handshake
# on a loaded node.
LIST_TIMEOUT_FLOOR = 1.0
# Errors are logged at most this often (the rest are counted in the next line
# and in kap_discovery_errors_total): thousands of nodes must not flood logs.
ERROR_LOG_INTERVAL = 30.0
# Closing a session's client is a TLS close_notify at most (as probe.py).
CLOSE_DEADLINE = 0.1
# A watch that ends without delivering an event this many times in a row (410s,
# servers closing it at once) is not reopened before the next list: no spinning.
QUIET_WATCHES_BEFORE_POLLING = 2


def backoff_delay(failures: int, *, initial: float, cap: float, u: float) -> float:
    """Seconds to wait after ``failures`` consecutive failures (1 = the first).

    Doubling from ``initial`` up to ``cap``, then "equal jitter": a uniform
    draw ``u`` in [0, 1) scales it into [half, all] of that, so nodes that
    failed together do not retry together, and the delay is never zero.
    """
    base = min(cap, initial * 2.0 ** min(max(failures, 1) - 1, 32))
    return base * (0.5 + 0.5 * u)


@attrs.frozen
class _Meta:
    resourceVersion: str | None  # the attribute lightkube's watch reads


class RawEndpointSlice(NamespacedResourceG):
    """An EndpointSlice as lightkube hands it over: the JSON value, untouched.

    lightkube decodes the items of a list and the objects of watch events by
    calling the resource type with the decoded JSON when the type is not a
    msgspec struct, so this type makes its list and watch tolerant of any
    item, including ones that are not objects. ``metadata.resourceVersion``
    is what lightkube's watch reads from each object.
    """

    _api_info = ApiInfo(
        resource=ResourceDef("discovery.k8s.io", "v1", "EndpointSlice"),
        plural="endpointslices",
        verbs=["list", "watch"],
    )

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    @property
    def metadata(self) -> _Meta:
        return _Meta(slices.resource_version(self.raw))


class _UpstreamTransport(httpx2.AsyncBaseTransport):
    """httpx2 transport to one upstream: SNI and the current token on every request.

    lightkube ignores ``tls-server-name`` and reads token files only on a 401,
    so both are set here, per request: the TLS server name (what the
    certificate is verified against, as in ``kap.probe``) and the bearer
    token, re-read by ``CredentialFiles`` whenever its file changes.
    """

    def __init__(
        self, ctx: ssl.SSLContext, server_name: str, headers: Callable[[], dict[str, str]]
    ) -> None:
        self._inner = httpx2.AsyncHTTPTransport(
            verify=ctx,
            trust_env=False,
            http2=False,
            limits=httpx2.Limits(max_connections=2, max_keepalive_connections=1),
        )
        self._server_name = server_name
        self._headers = headers

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._server_name:
            request.extensions = {**request.extensions, "sni_hostname": self._server_name}
        for name, value in self._headers().items():
            request.headers[name] = value
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class DiscoveryError(Exception):
    """One failed list or watch, in one line."""


class _Gone(Exception):
    """The watch's resourceVersion is too old (410, as an event or as HTTP): re-list."""


@attrs.define
class EndpointSliceWatcher:
    """Lists and watches the control plane's EndpointSlices; reports the ready set.

    Args:
      pool: where the upstream to ask is chosen.
      credentials: how discovery authenticates (``origin`` says which mode).
      server_name: verified name and SNI; empty = the dialed address.
      period: re-list at least this often (``--discover-period``).
      on_update: called with the new set whenever the union of ready
        addresses changes (also when it becomes empty: the pool ignores that).
      seed: the kubeconfig's server, for the app to add to the pool.
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
    backoff_initial: float = BACKOFF_INITIAL
    namespace: str = NAMESPACE
    service: str = SERVICE
    changes: ChangeFeed = attrs.field(factory=ChangeFeed)
    # -- state, shown by status() --
    mode: str = "starting"
    last_success_unix: float | None = None
    last_error: str | None = None
    # Wall time of the first failure since the last success; None while it works.
    failing_since_unix: float | None = None
    errors_total: int = 0
    source_upstream: Address | None = None
    resource_version: str | None = None
    lists_total: int = 0
    _slices: dict[str, slices.ParsedSlice] = attrs.field(factory=dict, alias="_slices")
    _reported: list[Address] | None = attrs.field(default=None, alias="_reported")
    _failures: int = attrs.field(default=0, alias="_failures")
    _attempts: int = attrs.field(default=0, alias="_attempts")
    _last_skipped: frozenset[str] = attrs.field(default=frozenset(), alias="_last_skipped")
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

    # ---- reporting -----------------------------------------------------------

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
            "slices": len(self._slices),
            "addresses": [str(a) for a in self._reported or ()],
            "source_upstream": None if self.source_upstream is None else str(self.source_upstream),
            "resource_version": self.resource_version,
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
                    "no CA to verify the apiservers (credentials go only to a verified apiserver)",
                    "--ca-file, a kubeconfig with a certificate authority, --as-static-pod "
                    "or a ServiceAccount",
                )
            )
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Discover until cancelled. Returns at once when it cannot (``off_reasons``)."""
        off = self.off_reasons()
        if off:
            self.mode = "off"
            self.last_error = "; ".join(why for why, _ in off)
            give = "; ".join(what for _, what in off)
            logger.bind(credentials=self.credentials.files.origin).error(
                f"discovery is off: {self.last_error}. Give {give}. "
                "kap balances the starting upstreams only"
            )
            task_status.started()
            return
        task_status.started()
        avoid: Address | None = None
        while True:
            target = self._choose(avoid)
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
            self.mode = "backoff"
            cap = max(self.backoff_initial, min(BACKOFF_CAP, self.period))
            await trio.sleep(
                backoff_delay(
                    self._failures, initial=self.backoff_initial, cap=cap, u=self.rng.random()
                )
            )

    def _choose(self, avoid: Address | None) -> Address | None:
        """The upstream to ask: one of the pool's best, else the other members in turn.

        After a failure, another upstream than ``avoid`` is preferred when
        there is one. The default Service only when the pool holds no
        upstream at all (it may need kap itself); None without one. Only
        queries the pool: the clients' round-robin does not move.
        """
        best = [u.address for u in self.pool.best()]
        if best:
            usable = [u.address for u in self.pool.usable()]
            fresh = [a for a in best if a != avoid] or [a for a in usable if a != avoid] or best
            return self.rng.choice(fresh)
        members = [u.address for u in self.pool.upstreams]
        if not members:
            return self.pool.default_service
        if len(members) > 1 and avoid in members:
            members.remove(avoid)
        self._attempts += 1
        return members[self._attempts % len(members)]

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
        upstream is, or when the TLS credentials were rotated. A target that
        is not a pool member is the default Service: left as soon as any
        upstream is usable, not only after the next list.

        Raises:
          DiscoveryError: the list or the watch failed.
        """
        async with self._client(target) as client:
            if target in self.pool:
                await self._follow(client, target)
                return
            failed: DiscoveryError | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._leave_when_usable, target, nursery.cancel_scope)
                try:
                    await self._follow(client, target)
                except DiscoveryError as e:
                    failed = e  # raised below, not as an ExceptionGroup
                nursery.cancel_scope.cancel()
            if failed is not None:
                raise failed

    async def _leave_when_usable(self, service: Address, session: trio.CancelScope) -> None:
        """Ends a stay on the default Service as soon as an upstream turns usable.

        Woken by the pool's ``HEALTHY`` changes, not at the next list.
        """
        while not self.pool.usable():
            healthy = trio.Event()
            with self.changes.subscribe(_setter(healthy), ChangeKind.HEALTHY):
                await healthy.wait()
        logger.bind(service=str(service)).info(
            "discovery leaves the kubernetes Service: a discovered apiserver is usable"
        )
        session.cancel()

    async def _follow(self, client: AsyncClient, target: Address) -> None:
        """The body of ``_session``: list, watch until the period ends, list again."""
        generation = self.credentials.generation
        quiet = 0
        while True:
            deadline = trio.current_time() + self.period
            self.mode = "list"
            rv = await self._list(client, target)
            self.credentials.ssl_context()  # a stat per file: notices rotated certificates
            if self.credentials.generation != generation or self._should_leave(target):
                return
            while trio.current_time() < deadline:
                self.mode = "watch"
                events = 0
                gone = False
                with trio.move_on_at(deadline) as period:
                    try:
                        rv, events = await self._watch(client, target, rv)
                    except _Gone:
                        gone = True
                if period.cancelled_caught:
                    quiet = 0  # a watch that lasted the period: time to list
                    break
                quiet = 0 if events else quiet + 1
                if quiet >= QUIET_WATCHES_BEFORE_POLLING and trio.current_time() < deadline:
                    # Watches end as soon as they open (410 after 410, or a
                    # server closing them): wait for the next list.
                    self.mode = "poll"
                    await trio.sleep_until(deadline)
                if gone:
                    logger.bind(upstream=str(target)).debug("watch expired (410); re-listing")
                    break

    def _should_leave(self, target: Address) -> bool:
        up = self.pool.get(target)
        return (up is None or not up.usable) and bool(self.pool.usable())

    @contextlib.asynccontextmanager
    async def _client(self, target: Address) -> AsyncIterator[AsyncClient]:
        """A lightkube AsyncClient bound to ``target`` through ``_UpstreamTransport``."""
        transport = _UpstreamTransport(
            self.credentials.ssl_context(), self.server_name, self.credentials.headers
        )
        # lightkube builds a TLS context from the cluster entry even though the
        # transport (whose context is the one used) replaces it. Describing
        # kap's own CA keeps that unused context cheap: with no CA at all it
        # would load the system trust store, 25 ms of CPU per session.
        ca_file = self.credentials.files.ca_file
        cluster = Cluster(
            server=f"https://{target}", certificate_auth=ca_file, insecure=ca_file is None
        )
        config = KubeConfig.from_one(cluster=cluster, user=User(), namespace=self.namespace)
        client = AsyncClient(
            config=config,
            namespace=self.namespace,
            timeout=httpx2.Timeout(None),  # deadlines are the cancel scopes here
            trust_env=False,
            transport=transport,
        )
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_DEADLINE):
                await client.close()

    async def _list(self, client: AsyncClient, target: Address) -> str:
        """One list; applies it and returns its resourceVersion.

        Raises:
          DiscoveryError: failed, timed out, or not a list.
        """
        timeout = max(LIST_TIMEOUT_FLOOR, self.period)
        items: list[Any] = []
        try:
            with trio.fail_after(timeout):
                listing = client.list(
                    RawEndpointSlice,
                    namespace=self.namespace,
                    labels={SERVICE_NAME_LABEL: self.service},
                )
                async for item in listing:
                    items.append(item.raw)
                rv = listing.resourceVersion
        except trio.TooSlowError:
            raise DiscoveryError(f"list timed out after {timeout:g}s") from None
        except Exception as e:
            raise DiscoveryError(f"list failed: {_describe(e)}") from e
        self.lists_total += 1
        parsed, skipped = slices.parse_items(items, previous=self._slices)
        self._log_skipped(skipped, target)
        self._slices = parsed
        self.resource_version = rv
        self._succeeded(target)
        self._report(target)
        return rv

    async def _watch(self, client: AsyncClient, target: Address, rv: str) -> tuple[str, int]:
        """Follow changes from ``rv`` until the server ends the watch.

        Returns the last resourceVersion seen and how many events came.

        Raises:
          _Gone: 410, as an HTTP status or as an ERROR event.
          DiscoveryError: anything else.
        """
        events = 0
        stream: AsyncGenerator[tuple[str, RawEndpointSlice]] = client.watch(  # type: ignore[assignment]
            RawEndpointSlice,
            namespace=self.namespace,
            labels={SERVICE_NAME_LABEL: self.service},
            resource_version=rv,
        )
        try:
            async with contextlib.aclosing(stream):
                async for kind, obj in stream:
                    events += 1
                    rv = obj.metadata.resourceVersion or rv
                    self.resource_version = rv
                    self._apply(kind, obj.raw, target)
        except ApiError as e:  # an ERROR event, or a Status from the server
            if e.status.code == HTTP_GONE:
                raise _Gone from None
            raise DiscoveryError(f"watch failed: {_describe(e)}") from e
        except httpx2.HTTPStatusError as e:  # lightkube's watch does not translate these
            if e.response.status_code == HTTP_GONE:
                raise _Gone from None
            raise DiscoveryError(f"watch failed: HTTP {e.response.status_code}") from e
        except Exception as e:
            raise DiscoveryError(f"watch failed: {_describe(e)}") from e
        return rv, events

    def _apply(self, kind: str, obj: Any, target: Address) -> None:
        """One watch event into the slice map."""
        if kind == "BOOKMARK":
            return
        key = slices.slice_key(obj)
        log = logger.bind(upstream=str(target), event=kind)
        if kind == "DELETED":
            if key is not None:
                self._slices.pop(key, None)
        elif kind in ("ADDED", "MODIFIED"):
            parsed, skipped = slices.parse_slice(obj)
            self._log_skipped(skipped, target, replace=False)
            if parsed is not None:
                self._slices[parsed.key] = parsed
        else:
            log.warning("skipping a watch event of unknown type")
            return
        self._report(target)

    # ---- bookkeeping ---------------------------------------------------------

    def _report(self, target: Address) -> None:
        current = slices.union(self._slices.values())
        if current == self._reported:
            return
        previous, self._reported = self._reported, current
        log = logger.bind(
            upstream=str(target),
            addresses=[str(a) for a in current],
            slices=len(self._slices),
        )
        if current:
            log.info("discovered apiservers")
        elif previous:
            log.warning("discovery found no ready apiserver; keeping the last set")
        self.on_update(list(current))

    def _log_skipped(self, reasons: list[str], target: Address, *, replace: bool = True) -> None:
        """Log each reason once while it keeps coming back (lists repeat every period).

        ``replace``: these are all the reasons of a whole list (else of one
        watch event, added to the list's).
        """
        for why in reasons:
            if why not in self._last_skipped:
                logger.bind(upstream=str(target), reason=why).warning(
                    "skipping part of an EndpointSlice"
                )
        self._last_skipped = (
            frozenset(reasons) if replace else self._last_skipped | frozenset(reasons)
        )

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
        if self._error_logged_at is None or now - self._error_logged_at >= ERROR_LOG_INTERVAL:
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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        status = exc.status
        return f"HTTP {status.code}: {' '.join(str(status.message or '').split())[:160]}"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, msgspec.MsgspecError):
        return f"bad response: {' '.join(str(exc).split())[:160]}"
    return describe_error(exc)


def _setter(event: trio.Event) -> Callable[[Change], None]:
    return lambda _: event.set()


__all__ = ["DiscoveryError", "EndpointSliceWatcher", "RawEndpointSlice", "backoff_delay"]
