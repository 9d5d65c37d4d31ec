"""lightkube, adapted to kap: one client per upstream, tolerant items, errors in one line.

Why lightkube, and how: the request side is lightkube 1.x's ``AsyncClient``
(``list`` and ``watch`` for the resource, the selector, resourceVersion
handling, ``ApiError`` for a ``Status``), one client per discovery session
with a custom httpx2 transport (``UpstreamTransport``) bound to the chosen
upstream that adds SNI and the current bearer token. The decoding side is not
lightkube's typed models: msgspec decodes strictly, so one bad item fails a
whole typed list. The resource type given to lightkube is ``RawEndpointSlice``,
which keeps each item's JSON as it came, and ``kap.slices`` parses it
tolerantly, skipping bad items with a log line.

This module holds only the adapters and the requests; what to ask and when
is ``kap.discovery``'s. The lightkube 1.0.1 traps under trio, and what kap
does about each:

* a retrying ``on_error`` handler sleeps with ``asyncio.sleep``: kap uses the
  default (raise) and retries in its own trio loop, with backoff and jitter;
* connection errors escape even a retrying watch (the request is sent
  outside its ``try``), HTTP 410 on the watch request is a plain
  ``httpx2.HTTPStatusError`` (the watch does not translate it), a 410 ERROR
  event is an ``ApiError``, and a watch the server ends is reopened inside
  lightkube, unseen: kap sends each WATCH itself with lightkube's
  lower-level request (``watch_slices``), so it sees every one start and
  end, and both 410s become ``Gone`` ("re-list");
* a watch has no read deadline: the caller bounds every watch with a cancel
  scope, and lists with their own deadline;
* a typed list fails whole on one bad item: see ``RawEndpointSlice``.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

import attrs
import httpx2
import msgspec
import trio
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.core.generic_client import BasicRequest, GenericAsyncClient
from lightkube.core.resource import ApiInfo, NamespacedResourceG, ResourceDef
from lightkube.core.selector import build_selector

from kap import slices
from kap.address import Address
from kap.credentials import CredentialFiles
from kap.probe import describe_error

# Closing a session's client is a TLS close_notify at most (as probe.py).
CLOSE_DEADLINE = 0.1
HTTP_GONE = 410


class RequestError(Exception):
    """One failed list or watch, in one line."""


class Gone(Exception):
    """The watch's resourceVersion is too old (410, as an event or as HTTP): re-list."""


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


class UpstreamTransport(httpx2.AsyncBaseTransport):
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


@contextlib.asynccontextmanager
async def open_client(
    target: Address,
    credentials: CredentialFiles,
    server_name: str,
    namespace: str,
    *,
    close_deadline: float = CLOSE_DEADLINE,
) -> AsyncIterator[AsyncClient]:
    """A lightkube AsyncClient bound to ``target`` through ``UpstreamTransport``.

    Cancellation: the client is closed in a shielded scope that lasts at most
    ``close_deadline`` seconds.
    """
    try:
        client = _client(target, credentials, server_name, namespace)
    except (OSError, ssl.SSLError, ValueError, ConfigError) as e:
        # Nothing here should fail (kap's context is its last good one), but a
        # client that cannot be built is one failed session, never the end of kap.
        raise RequestError(f"cannot build the API client: {describe(e)}") from None
    try:
        yield client
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + close_deadline):
            await client.close()


def _client(
    target: Address, credentials: CredentialFiles, server_name: str, namespace: str
) -> AsyncClient:
    transport = UpstreamTransport(credentials.ssl_context(), server_name, credentials.headers)
    # lightkube builds a TLS context from the cluster entry even though the
    # transport (whose context, kap's own, verifying, is the one used) replaces
    # it. That unused context is built without verification on purpose: from
    # the CA file it would read the file again at every session (a CA file
    # missing for a moment during a rotation would end kap, not just the
    # session), and without it it would load the system trust store (25 ms of
    # CPU per session); unverified, it costs about 1 ms and reads nothing.
    cluster = Cluster(server=f"https://{target}", insecure=True)
    config = KubeConfig.from_one(cluster=cluster, user=User(), namespace=namespace)
    return AsyncClient(
        config=config,
        namespace=namespace,
        timeout=httpx2.Timeout(None),  # deadlines are the cancel scopes of the caller
        trust_env=False,
        transport=transport,
    )


def _request(
    client: AsyncClient, namespace: str, *, watch: bool, params: Mapping[str, str | None]
) -> BasicRequest:
    """lightkube's lower-level request for the slices: URL and selector built by lightkube.

    ``AsyncClient.list`` and ``watch`` take no ``resourceVersion`` for a list,
    no ``resourceVersionMatch`` and no ``allowWatchBookmarks``, so discovery
    goes one level down, to the generic client every ``AsyncClient`` wraps
    (lightkube 1.x, pinned in the lock), which takes any query parameter.
    """
    generic: GenericAsyncClient = client._client
    return generic.prepare_request(
        "list", res=RawEndpointSlice, namespace=namespace, watch=watch, params=dict(params)
    )


async def list_slices(
    client: AsyncClient,
    namespace: str,
    labels: Mapping[str, str],
    resource_version: str | None,
    match: str | None = None,
) -> tuple[list[Any], str]:
    """One list: every item's JSON as it came, and the list's resourceVersion.

    ``resource_version`` ``"0"`` (any version, from the apiserver's watch
    cache), a version with ``match`` ``"NotOlderThan"`` (from the cache, at
    least that new), or None (a consistent read: etcd's quorum).

    Raises:
      RequestError: the request failed or the answer is not a list. The
        caller's cancel scope is the deadline.
    """
    params = {
        "labelSelector": build_selector(dict(labels)),
        "resourceVersion": resource_version,
        "resourceVersionMatch": match,
    }
    items: list[Any] = []
    try:
        generic: GenericAsyncClient = client._client
        listing = generic.list(_request(client, namespace, watch=False, params=params))
        async for item in listing:
            items.append(item.raw)
        return items, listing.resourceVersion
    except Exception as e:
        raise RequestError(f"list failed: {describe(e)}") from e


async def watch_slices(
    client: AsyncClient,
    namespace: str,
    labels: Mapping[str, str],
    resource_version: str,
    timeout_seconds: int,
) -> AsyncGenerator[tuple[str, Any, str | None]]:
    """One WATCH request from ``resource_version``, with bookmarks.

    Yields (type, the object's JSON, its resourceVersion) per line, BOOKMARK
    included. Ends when the server ends the watch (after ``timeout_seconds``
    or earlier); unlike lightkube's ``watch`` it does not reconnect, so the
    caller sees every WATCH it starts. Without a deadline of its own: the
    caller's cancel scope bounds it.

    Raises:
      Gone: 410, as an HTTP status or as an ERROR event.
      RequestError: anything else.
    """
    params = {
        "labelSelector": build_selector(dict(labels)),
        "resourceVersion": resource_version,
        "timeoutSeconds": str(timeout_seconds),
        "allowWatchBookmarks": "true",
    }
    generic: GenericAsyncClient = client._client
    try:
        request = generic.build_adapter_request(
            _request(client, namespace, watch=True, params=params)
        )
        response = await generic.send(request, stream=True)  # type: ignore[no-untyped-call]
    except Exception as e:
        raise RequestError(f"watch failed: {describe(e)}") from e
    try:
        if response.status_code == HTTP_GONE:
            raise Gone
        if response.status_code >= 300:
            await response.aread()
            raise RequestError(f"watch failed: {_status_line(response)}")
        async for line in response.aiter_lines():
            if line.strip():
                yield _event(line)
    except (Gone, RequestError):
        raise
    except Exception as e:
        raise RequestError(f"watch failed: {describe(e)}") from e
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_DEADLINE):
            await response.aclose()


def _event(line: str) -> tuple[str, Any, str | None]:
    """One line of a watch: (type, object, resourceVersion); an ERROR becomes an exception."""
    try:
        event = msgspec.json.decode(line)
    except msgspec.DecodeError as e:
        raise RequestError(f"watch failed: {describe(e)}") from e
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise RequestError("watch failed: bad response: not a watch event")
    obj = event.get("object")
    if event["type"] == "ERROR":
        code = obj.get("code") if isinstance(obj, dict) else None
        if code == HTTP_GONE:
            raise Gone
        message = obj.get("message") if isinstance(obj, dict) else obj
        raise RequestError(f"watch failed: HTTP {code}: {' '.join(str(message).split())[:160]}")
    return event["type"], obj, slices.resource_version(obj)


def _status_line(response: httpx2.Response) -> str:
    """``HTTP <code>: <the Status message>`` (the message when the body is a Status)."""
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    if not message:
        return f"HTTP {response.status_code}"
    return f"HTTP {response.status_code}: {' '.join(str(message).split())[:160]}"


def describe(exc: BaseException) -> str:
    """One line for a failed request: the HTTP status and message, else the error."""
    if isinstance(exc, ApiError):
        status = exc.status
        return f"HTTP {status.code}: {' '.join(str(status.message or '').split())[:160]}"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, msgspec.MsgspecError):
        return f"bad response: {' '.join(str(exc).split())[:160]}"
    return describe_error(exc)


__all__ = [
    "Gone",
    "RawEndpointSlice",
    "RequestError",
    "UpstreamTransport",
    "describe",
    "list_slices",
    "open_client",
    "watch_slices",
]
