"""Upstream addresses: parsing and rendering of ``host:port``.

Pure logic, no I/O. An address is what the pool keys upstreams by, what the
flags, the fallback file and the EndpointSlices all produce, and what
``/upstreams`` prints, so there is exactly one way to parse and render it:
IPv6 literals in brackets (``[fd00::1]:6443``), everything else ``host:port``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

import attrs

# RFC 1123 host names (what Kubernetes allows for a DNS name); labels of
# letters, digits and hyphens, not starting or ending with a hyphen.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")


class AddressError(ValueError):
    """An address that cannot be used; the message says why, in one line."""


@attrs.frozen(order=True)
class Address:
    """A TCP endpoint. ``host`` is an IP literal (no brackets) or a DNS name."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        if self.is_ipv6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``host:port`` or ``[v6]:port``; raise AddressError saying why not."""
        raw = text.strip()
        if not raw:
            raise AddressError("empty address")
        if "://" in raw:
            raise AddressError(f"{text!r}: expected host:port, without a scheme")
        if raw.startswith("["):
            end = raw.find("]")
            if end < 0 or not raw[end + 1 :].startswith(":"):
                raise AddressError(f"{text!r}: expected [IPv6]:port")
            host, port_text = raw[1:end], raw[end + 2 :]
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                raise AddressError(f"{text!r}: {host!r} is not an IPv6 address") from None
            if ip.version != 6:
                raise AddressError(f"{text!r}: brackets are for IPv6 addresses only")
            host = ip.compressed
        else:
            host, sep, port_text = raw.rpartition(":")
            if not sep or not host:
                raise AddressError(f"{text!r}: expected host:port")
            if ":" in host:
                raise AddressError(f"{text!r}: write IPv6 addresses as [addr]:port")
            try:
                host = ipaddress.ip_address(host).compressed
            except ValueError:
                if not _HOSTNAME.match(host) or host.replace(".", "").isdigit():
                    raise AddressError(
                        f"{text!r}: {host!r} is not an IP address or host name"
                    ) from None
                host = host.rstrip(".").lower()
        return cls(host, parse_port(port_text, what=repr(text)))

    @classmethod
    def from_ip(cls, ip: str, port: int) -> Address:
        """An address from a bare IP literal (as EndpointSlices list them)."""
        try:
            host = ipaddress.ip_address(ip.strip()).compressed
        except ValueError:
            raise AddressError(f"{ip!r} is not an IP address") from None
        if not 1 <= port <= 65535:
            raise AddressError(f"port {port} out of range 1..65535")
        return cls(host, port)


def parse_port(text: str, *, what: str = "port") -> int:
    """A TCP port 1..65535 from its decimal text."""
    if not text.isdigit():
        raise AddressError(f"{what}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise AddressError(f"{what}: port {port} out of range 1..65535")
    return port


def parse_list(text: str) -> list[Address]:
    """Comma-separated addresses; empty items are ignored, duplicates dropped in order."""
    out: list[Address] = []
    for item in text.split(","):
        if item.strip():
            addr = Address.parse(item)
            if addr not in out:
                out.append(addr)
    return out


# Listen addresses that accept on every local address of their family.
_WILDCARDS = {"0.0.0.0": 4, "::": 6, "": 6}


def loops_back(
    addr: Address, listen_host: str, listen_port: int, is_local: Callable[[str], bool]
) -> bool:
    """Whether dialing ``addr`` reaches kap's own listener on ``listen_host:listen_port``.

    Such an upstream is a loop: each client connection kap sends there comes
    back as a new client, which kap sends there again, until it runs out of
    file descriptors (with the real apiservers down, in a fraction of a
    second). It happens when kap is given the kubeconfig its clients use,
    once their ``server`` points at kap, or its own port by mistake. Port 0
    (kernel-chosen) cannot be named beforehand; names are not resolved.
    ``is_local(ip)``: whether the IP is one of this host's addresses (only
    asked for a wildcard listen address). An IPv4-mapped IPv6 address is its
    IPv4 address (a dual-stack listener gets both).
    """
    if listen_port == 0 or addr.port != listen_port or not addr.is_ip:
        return False
    ip = ipaddress.ip_address(addr.host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = _WILDCARDS.get(listen_host)
    if family is not None:
        # '::' is dual-stack (kap.sockets.bind_listener): it accepts IPv4 too.
        return (family == 6 or ip.version == 4) and is_local(str(ip))
    try:
        listen = ipaddress.ip_address(listen_host)
    except ValueError:
        return False
    if isinstance(listen, ipaddress.IPv6Address) and listen.ipv4_mapped is not None:
        listen = listen.ipv4_mapped
    return ip == listen
