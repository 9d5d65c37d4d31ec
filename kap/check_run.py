"""``kap check`` over the network: every upstream at once, then discovery through one.

One nursery holds a task per upstream (each: TCP connect, TLS handshake,
``GET /readyz``, as kap's probe does them) and the discovery task, which
lists the ``default/kubernetes`` EndpointSlices through the first upstream
that answers 200 (or, when none does, the first that completed TLS; through
the ``kubernetes`` Service only when kap would have nothing else to start
from) and starts a task for each address found that is not checked yet.

Every wait is under a cancel scope where it happens: the connect under
``--dial-timeout``, the handshake and the request under the request
deadline, everything under the caller's overall deadline; a task cut short
by the overall deadline is reported as "ran out of time".
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import attrs
import h11
import trio

from kap import slices
from kap.address import Address
from kap.check_report import DiscoveryFacts, UpstreamFacts
from kap.credentials import CredentialFiles
from kap.discovery import NAMESPACE, SERVICE
from kap.pool import SOURCE_DISCOVERY
from kap.probe import PROBE_ERRORS, READYZ_PATH, describe_error
from kap.probe_connection import Http11Connection
from kap.reflector import SERVICE_NAME_LABEL
from kap.status import _why as connect_error

# An EndpointSlice list of a control plane is a few KiB; 16 MiB is not one.
MAX_LIST_BYTES = 16 * 1024 * 1024
SLICES_PATH = (
    f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"
    f"?labelSelector={quote(f'{SERVICE_NAME_LABEL}={SERVICE}')}"
)
LIST_ERRORS = (*PROBE_ERRORS, h11.ProtocolError, ValueError)
SERVICE_SOURCE = "service"


@attrs.frozen
class Reach:
    """How kap reaches an apiserver: its credentials and deadlines."""

    files: CredentialFiles
    server_name: str
    dial_timeout: float
    request_deadline: float


@attrs.define
class Findings:
    """What the run found; anything not reached in time stays absent."""

    upstreams: dict[Address, UpstreamFacts] = attrs.field(factory=dict)
    sources: dict[Address, list[str]] = attrs.field(factory=dict)  # in the order checked
    service: UpstreamFacts | None = None
    discovery: DiscoveryFacts | None = None


async def check_all(
    starting: dict[Address, list[str]],
    *,
    reach: Reach,
    discover: bool,
    service: Address | None,
    deadline: float,
) -> Findings:
    """Check ``starting`` (address -> its sources) and, when ``discover``, discovery.

    Returns within ``deadline`` seconds whatever happens; what did not finish
    is absent from the findings (the caller reports it as out of time).
    """
    found = Findings(sources={a: list(s) for a, s in starting.items()})
    decided = trio.Event()  # discovery may pick its upstream
    pending = len(starting)

    async def one(address: Address) -> None:
        nonlocal pending
        facts = await probe(address, tuple(found.sources[address]), reach)
        found.upstreams[address] = facts
        pending -= 1
        if facts.status == 200 or pending <= 0:
            decided.set()

    async def discovery(nursery: trio.Nursery) -> None:
        if starting:
            await decided.wait()
            found.discovery = await _list_through_upstreams(found, reach)
        elif service is not None:
            found.discovery = await _list_through_service(found, service, reach)
        else:
            return
        for address in _note_discovered(found, found.discovery):
            nursery.start_soon(one_more, address)

    async def one_more(address: Address) -> None:
        found.upstreams[address] = await probe(address, tuple(found.sources[address]), reach)

    with trio.move_on_after(deadline):
        async with trio.open_nursery() as nursery:
            for address in starting:
                nursery.start_soon(one, address)
            if discover:
                nursery.start_soon(discovery, nursery)
    return found


async def _list_through_upstreams(found: Findings, reach: Reach) -> DiscoveryFacts:
    """List the slices through the upstream ``_via`` picks, once the starting ones are checked."""
    via = _via(found)
    if via is None:
        return DiscoveryFacts(error="no upstream answered to list through")
    return await list_slices(via, reach)


async def _list_through_service(found: Findings, service: Address, reach: Reach) -> DiscoveryFacts:
    """No starting upstream: check the default Service (into ``found``), then list through it."""
    found.service = await probe(service, (SERVICE_SOURCE,), reach)
    if found.service.tls_ms is None:
        return DiscoveryFacts(
            via=str(service), via_service=True, error="the Service did not answer TLS"
        )
    result = await list_slices(service, reach)
    return attrs.evolve(result, via_service=True)


def _note_discovered(found: Findings, discovery: DiscoveryFacts) -> list[Address]:
    """Add discovery to each listed address's sources; return those not checked yet."""
    new = []
    for text in discovery.addresses:
        address = Address.parse(text)
        if address in found.sources:
            found.sources[address].append(SOURCE_DISCOVERY)
        else:
            found.sources[address] = [SOURCE_DISCOVERY]
            new.append(address)
    return new


def _via(found: Findings) -> Address | None:
    """The upstream discovery lists through: the first that answered 200, else that spoke TLS."""
    for ok in (lambda f: f.status == 200, lambda f: f.tls_ms is not None):
        for address, facts in found.upstreams.items():
            if ok(facts):
                return address
    return None


async def probe(address: Address, sources: tuple[str, ...], reach: Reach) -> UpstreamFacts:
    """TCP connect, TLS handshake, ``GET /readyz``, as kap's probe does them."""
    name = reach.server_name or address.host
    facts: dict[str, Any] = {"address": str(address), "sources": sources, "tls_name": name}
    start = trio.current_time()
    tcp = None
    with trio.move_on_after(reach.dial_timeout):
        try:
            tcp = await trio.open_tcp_stream(address.host, address.port)
        except OSError as e:
            return UpstreamFacts(**facts, connect_error=connect_error(e))
    if tcp is None:
        why = f"no connection within --dial-timeout {reach.dial_timeout:g}s (black-holed?)"
        return UpstreamFacts(**facts, connect_error=why)
    facts["connect_ms"] = (trio.current_time() - start) * 1e3
    tls = trio.SSLStream(
        tcp, reach.files.ssl_context(), server_hostname=name, https_compatible=True
    )
    try:
        with trio.move_on_after(reach.request_deadline):
            start = trio.current_time()
            try:
                await tls.do_handshake()
            except PROBE_ERRORS as e:
                return UpstreamFacts(**facts, tls_error=describe_error(e))
            facts["tls_ms"] = (trio.current_time() - start) * 1e3
            conn = Http11Connection(tls, host=reach.server_name or str(address), generation=0)
            try:
                answer = await conn.get(READYZ_PATH, list(reach.files.headers().items()))
            except PROBE_ERRORS as e:
                return UpstreamFacts(**facts, request_error=describe_error(e))
            return UpstreamFacts(
                **facts,
                status=answer.status,
                latency_ms=answer.latency * 1e3,
                body=answer.body.decode(errors="replace"),
            )
        step = "request_error" if "tls_ms" in facts else "tls_error"
        facts[step] = f"no answer within {reach.request_deadline:g}s"
        return UpstreamFacts(**facts)
    finally:
        await trio.aclose_forcefully(tls)


async def list_slices(address: Address, reach: Reach) -> DiscoveryFacts:
    """One list of the ``default/kubernetes`` EndpointSlices, with kap's credentials."""
    name = reach.server_name or address.host
    via = str(address)
    with trio.move_on_after(reach.dial_timeout + reach.request_deadline):
        try:
            tcp = await trio.open_tcp_stream(address.host, address.port)
            tls = trio.SSLStream(
                tcp, reach.files.ssl_context(), server_hostname=name, https_compatible=True
            )
            try:
                host = reach.server_name or via
                status, body = await _get(tls, host, SLICES_PATH, reach.files.headers())
            finally:
                await trio.aclose_forcefully(tls)
        except LIST_ERRORS as e:
            return DiscoveryFacts(via=via, error=describe_error(e))
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return DiscoveryFacts(via=via, error=f"HTTP {status}, not a JSON object")
        if status != 200:
            message = " ".join(str(doc.get("message") or "").split())[:200]
            return DiscoveryFacts(via=via, status=status, message=message)
        parsed, skipped = slices.parse_items(doc.get("items"))
        addresses = tuple(str(a) for a in slices.union(parsed.values()))
        return DiscoveryFacts(via=via, status=status, addresses=addresses, skipped=tuple(skipped))
    return DiscoveryFacts(via=via, error="no answer in time")


async def _get(
    stream: trio.SSLStream[trio.SocketStream], host: str, target: str, headers: dict[str, str]
) -> tuple[int, bytes]:
    """One GET on ``stream``, the whole body (up to MAX_LIST_BYTES); the caller bounds it."""
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=target,
        headers=[
            ("Host", host),
            ("Accept", "application/json"),
            ("Connection", "close"),
            *headers.items(),
        ],
    )
    await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
    status, body = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_LIST_BYTES:
                raise ValueError(f"answer larger than {MAX_LIST_BYTES} bytes")
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return status, bytes(body)
