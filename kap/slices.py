"""EndpointSlice JSON -> upstream addresses: the tolerant, pure parser discovery relies on.

Pure logic: dicts in, addresses and reasons out; no I/O, no clock. It parses
the JSON kube-apiserver sends for ``default/kubernetes`` (as a list item or
as a watch event's object) and it never raises: anything malformed is
skipped, and the reason comes back as a one-line string for the log. That is
the point of having it at all: lightkube's typed decoding (msgspec, strict)
fails a whole list for one bad item, and one bad item must never cost kap
the good ones around it.

The rules, which the tests hold it to:

* Port: the slice's port named ``https``, else its first port, else 6443
  (kube-apiserver's default ``--secure-port``). A chosen port that is not an
  integer in 1..65535 skips the slice: guessing another port would send
  clients somewhere the apiserver does not listen.
* ``addressType`` ``IPv4`` or ``IPv6``: every address must be an IP of that
  family. ``FQDN`` slices (and unknown types) are skipped: the
  ``default/kubernetes`` slices carry IPs, and kap dials addresses, it does
  not resolve names on the data path.
* Endpoints whose ``conditions.ready`` is ``false`` are left out (a missing
  or null ``ready`` counts as ready, as the EndpointSlice API says consumers
  should read it); they are counted, not reported as malformed.
* The upstream set is the union over every slice, deduplicated and sorted.
* Bounded: a slice with more than ``MAX_ENDPOINTS`` endpoints or an endpoint
  with more than ``MAX_ADDRESSES`` addresses is skipped whole (the API
  rejects such objects, so one is garbage), and at most ``MAX_SLICES``
  slices are read from one list. The set handed out has at most
  ``MAX_UPSTREAMS`` addresses: those of the ``default/kubernetes`` slice
  first, then those already handed out, then the rest in order (one reason
  logged while the cap applies).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from kap.address import Address

# kube-apiserver's default --secure-port, used when a slice lists no port.
DEFAULT_PORT = 6443
PORT_NAME = "https"
# EndpointSlice validation limits (k8s.io/kubernetes pkg/apis/discovery/validation:
# maxEndpoints = 1000, maxAddresses = 100, maxPorts = 100): anything larger
# cannot have come from a real apiserver.
MAX_ENDPOINTS = 1000
MAX_ADDRESSES = 100
MAX_PORTS = 100
# The default/kubernetes service has one slice per address family; a list of
# more than this many is skipped past this count (and the rest logged as one).
MAX_SLICES = 1000
# The upstreams discovery hands out at most. A control plane has a handful
# of apiservers (the default/kubernetes Service lists each one); kap probes
# every upstream every --health-interval, and 1,000 dead ones cost it about
# 40 % of a core and 3,000 log lines (measured: 1,000 refused addresses in
# one slice, 1 s interval), while the EndpointSlice limits alone allow
# MAX_SLICES x MAX_ENDPOINTS = 1,000,000 of them.
MAX_UPSTREAMS = 100
# The slice kube-apiserver's own endpoint reconciler writes: its addresses
# are kept first when the set is capped.
APISERVER_SLICE = "default/kubernetes"
# Reasons are log lines: values quoted in them are cut to this many characters.
MAX_QUOTE = 60

ADDRESS_TYPES = {"IPv4": 4, "IPv6": 6}


@attrs.frozen
class ParsedSlice:
    """What one EndpointSlice contributes: its key, its ready addresses."""

    key: str  # "namespace/name", how watch events find it again
    addresses: tuple[Address, ...]
    not_ready: int = 0


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_QUOTE else text[: MAX_QUOTE - 3] + "..."


def slice_key(obj: Any) -> str | None:
    """``namespace/name`` of an object, or None when it has no usable name."""
    if not isinstance(obj, dict):
        return None
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return None
    name = meta.get("name")
    namespace = meta.get("namespace", "default")
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    return f"{namespace or 'default'}/{name}"


def resource_version(obj: Any) -> str | None:
    """``metadata.resourceVersion`` when it is a non-empty string."""
    if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
        rv = obj["metadata"].get("resourceVersion")
        if isinstance(rv, str) and rv:
            return rv
    return None


def choose_port(ports: Any) -> tuple[int | None, str | None]:
    """The slice's upstream port, or (None, reason) when the port list is malformed."""
    if ports is None:
        return DEFAULT_PORT, None
    if not isinstance(ports, list):
        return None, f"ports is not a list: {_quote(ports)}"
    if not ports:
        return DEFAULT_PORT, None
    if len(ports) > MAX_PORTS:
        return None, f"{len(ports)} ports (more than {MAX_PORTS})"
    chosen = next(
        (p for p in ports if isinstance(p, dict) and p.get("name") == PORT_NAME), ports[0]
    )
    if not isinstance(chosen, dict):
        return None, f"port entry is not an object: {_quote(chosen)}"
    port = chosen.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return None, f"port {_quote(port)} is not a number in 1..65535"
    return port, None


def _endpoint_problem(ep: Any, where: str) -> str | None:
    """Why an endpoint is skipped whole (its shape is wrong), or None."""
    if not isinstance(ep, dict):
        return f"{where} is not an object: {_quote(ep)}"
    conditions = ep.get("conditions")
    if conditions is not None and not isinstance(conditions, dict):
        return f"{where}: conditions is not an object: {_quote(conditions)}"
    ready = (conditions or {}).get("ready")
    if ready is not None and not isinstance(ready, bool):
        return f"{where}: conditions.ready is not a boolean: {_quote(ready)}"
    addresses = ep.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        return f"{where}: addresses is not a non-empty list: {_quote(addresses)}"
    if len(addresses) > MAX_ADDRESSES:
        return f"{where}: {len(addresses)} addresses (more than {MAX_ADDRESSES})"
    return None


def parse_slice(obj: Any) -> tuple[ParsedSlice | None, list[str]]:
    """One EndpointSlice dict -> (its ready addresses, or None if skipped whole; reasons).

    Never raises. Reasons name the slice when it has a name.
    """
    key = slice_key(obj)
    label = key or "unnamed slice"
    if not isinstance(obj, dict):
        return None, [f"item is not an object: {_quote(obj)}"]
    if key is None:
        return None, [f"{label}: no metadata.name"]
    address_type = obj.get("addressType")
    if not isinstance(address_type, str) or address_type not in ADDRESS_TYPES:
        if address_type == "FQDN":
            return None, [f"{label}: FQDN slices are not used (kap dials IP addresses)"]
        return None, [f"{label}: addressType {_quote(address_type)} is not IPv4 or IPv6"]
    family = ADDRESS_TYPES[address_type]
    port, why = choose_port(obj.get("ports"))
    if port is None:
        return None, [f"{label}: {why}"]
    endpoints = obj.get("endpoints")
    if endpoints is None:
        return ParsedSlice(key, ()), []
    if not isinstance(endpoints, list):
        return None, [f"{label}: endpoints is not a list: {_quote(endpoints)}"]
    if len(endpoints) > MAX_ENDPOINTS:
        return None, [f"{label}: {len(endpoints)} endpoints (more than {MAX_ENDPOINTS})"]
    out: list[Address] = []
    reasons: list[str] = []
    not_ready = 0
    for i, ep in enumerate(endpoints):
        where = f"{label}: endpoint {i}"
        problem = _endpoint_problem(ep, where)
        if problem is not None:
            reasons.append(problem)
            continue
        if (ep.get("conditions") or {}).get("ready") is False:
            not_ready += 1
            continue
        for text in ep["addresses"]:
            addr, why = _address(text, family, port)
            if addr is None:
                reasons.append(f"{where}: {why}")
            elif addr not in out:
                out.append(addr)
    return ParsedSlice(key, tuple(out), not_ready), reasons


def _address(text: Any, family: int, port: int) -> tuple[Address | None, str | None]:
    if not isinstance(text, str):
        return None, f"address {_quote(text)} is not a string"
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None, f"address {_quote(text)} is not an IP address"
    if ip.version != family:
        return None, f"address {_quote(text)} is not IPv{family}"
    return Address(ip.compressed, port), None


def parse_items(
    items: Any, previous: Mapping[str, ParsedSlice] | None = None
) -> tuple[dict[str, ParsedSlice], list[str]]:
    """A list's ``items`` -> {key: slice} for the slices kept, and the reasons for the rest.

    A slice that is skipped whole but has a name keeps its version from
    ``previous`` (the last good list): a slice garbled in one list does not
    take its apiservers out of the set. A later item with the key of an
    earlier one replaces it (a list never has two, so this is garbage
    either way).
    """
    if not isinstance(items, list):
        return {}, [f"items is not a list: {_quote(items)}"]
    out: dict[str, ParsedSlice] = {}
    reasons: list[str] = []
    for obj in items[:MAX_SLICES]:
        parsed, why = parse_slice(obj)
        reasons.extend(why)
        if parsed is not None:
            out[parsed.key] = parsed
        elif previous and (key := slice_key(obj)) is not None and key in previous:
            out[key] = previous[key]
    if len(items) > MAX_SLICES:
        reasons.append(f"{len(items) - MAX_SLICES} items past the first {MAX_SLICES} ignored")
    return out, reasons


def union(slices: Iterable[ParsedSlice]) -> list[Address]:
    """Every address of every slice, once each, sorted (so equal sets compare equal)."""
    return sorted({a for s in slices for a in s.addresses})


@attrs.frozen
class Applied:
    """What one list or watch event did to a ``SliceSet``.

    ``ready``: the new union of ready addresses, or None when it is unchanged.
    ``new_reasons``: why parts were skipped, only the reasons not already
    given since they last stopped coming back (lists repeat every item, and a
    log must not repeat itself with them).
    """

    ready: list[Address] | None
    new_reasons: list[str] = attrs.field(factory=list)
    before: list[Address] | None = None  # the set handed out before this one


@attrs.define
class SliceSet:
    """Discovery's slices by key, and the ready set last handed out. Pure.

    The rules: a list replaces the map (a slice garbled in it keeps its last
    good version, see ``parse_items``); a watch event adds, replaces or
    deletes one slice; BOOKMARK and unknown events change nothing. The ready
    set is handed out the first time and then whenever it changes, also when
    it becomes empty (the pool ignores an empty set).
    """

    _slices: dict[str, ParsedSlice] = attrs.field(factory=dict, alias="_slices")
    ready: list[Address] | None = None
    _skipped: frozenset[str] = attrs.field(default=frozenset(), alias="_skipped")
    _cap_reason: str | None = attrs.field(default=None, alias="_cap_reason")

    def __len__(self) -> int:
        return len(self._slices)

    def replace(self, items: Any) -> Applied:
        """A whole list's ``items``: the map becomes what it holds."""
        parsed, reasons = parse_items(items, previous=self._slices)
        self._slices = parsed
        return self._result(self._note_skipped(reasons, replace=True))

    def apply(self, kind: str, obj: Any) -> Applied:
        """One watch event (``ADDED``, ``MODIFIED``, ``DELETED``; others change nothing)."""
        if kind == "DELETED":
            key = slice_key(obj)
            if key is not None:
                self._slices.pop(key, None)
            return self._result([])
        if kind not in ("ADDED", "MODIFIED"):
            return Applied(None)
        parsed, reasons = parse_slice(obj)
        new = self._note_skipped(reasons, replace=False)
        if parsed is not None:
            self._slices[parsed.key] = parsed
        return self._result(new)

    def _result(self, new_reasons: list[str]) -> Applied:
        current = union(self._slices.values())
        if len(current) > MAX_UPSTREAMS:
            why = f"{len(current)} addresses, more than a control plane has: {MAX_UPSTREAMS} used"
            current = self._capped(current)
            if why != self._cap_reason:
                new_reasons = [*new_reasons, why]
            self._cap_reason = why
        else:
            self._cap_reason = None
        if current == self.ready:
            return Applied(None, new_reasons, self.ready)
        before, self.ready = self.ready, current
        return Applied(list(current), new_reasons, before)

    def _capped(self, current: list[Address]) -> list[Address]:
        """``MAX_UPSTREAMS`` of ``current``: the apiservers' own slice, the kept ones, the rest."""
        own = self._slices.get(APISERVER_SLICE)
        first = [] if own is None else sorted(own.addresses)
        kept = [a for a in self.ready or () if a in set(current)]
        chosen: dict[Address, None] = dict.fromkeys([*first, *kept, *current])
        return sorted(list(chosen)[:MAX_UPSTREAMS])

    def _note_skipped(self, reasons: list[str], *, replace: bool) -> list[str]:
        """Reasons not given last time; ``replace``: these are all of a list's."""
        new = [why for why in reasons if why not in self._skipped]
        self._skipped = frozenset(reasons) if replace else self._skipped | frozenset(reasons)
        return new
