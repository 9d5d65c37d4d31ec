"""Raw socket work for the data path: listeners, dials and per-socket options.

kap uses plain non-blocking stdlib sockets on the hot path, not trio's stream
wrappers: ``open_tcp_stream`` plus the wrappers measured about 1 ms of CPU per
connection. A dial is split in two: ``start_connect`` begins a
non-blocking connect, and the relay's pump waits for it to finish in its own
epoll set (kap/relay.py), so a connection's task sleeps once for dial and relay.

At start, ``bind_listener`` warns when another socket already listens on the
address and port (``already_listening``): SO_REUSEPORT, which makes restarts
hitless, would otherwise let a forgotten second kap share the clients silently.
"""

from __future__ import annotations

import errno
import functools
import os
import socket

import attrs
import trio
from loguru import logger

from kap.address import Address

# Backlog of the data listener: the kernel caps it at net.core.somaxconn
# (4096 on current kernels); a node's clients reconnecting at once after an
# apiserver restart must not see SYNs dropped.
LISTEN_BACKLOG = 4096


@attrs.frozen
class TcpOptions:
    """What kap sets on both sockets of a relayed connection."""

    keepalive_period: float = 1.0
    user_timeout: float = 5.0

    def apply(self, sock: socket.socket) -> None:
        """TCP_NODELAY, keepalive (idle = interval = period) and TCP_USER_TIMEOUT."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        period = max(1, round(self.keepalive_period))  # the kernel counts whole seconds
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, period)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, period)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(self.user_timeout * 1e3))
            )


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_listener(
    host: str, port: int, *, reuse_port: bool = True, options: TcpOptions | None = None
) -> socket.socket:
    """A non-blocking listening socket on ``host:port`` ('' = every address).

    SO_REUSEADDR so a restart binds at once; SO_REUSEPORT so a new kap can
    bind while the old one still drains (hitless restart). '::' and '' listen
    dual-stack (IPv4-mapped too), so 'localhost' resolving to ::1 or 127.0.0.1
    both reach kap (the trap of Talos #8112).

    ``options`` are set on the listener itself: Linux clones an accepted
    socket from its listener, so TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE,
    TCP_KEEPINTVL and TCP_USER_TIMEOUT arrive already set on every client
    socket (checked by tests/test_proxy.py), five setsockopt calls fewer per
    connection.
    """
    if host == "":
        host = "::" if socket.has_ipv6 and _ipv6_works() else "0.0.0.0"
    family = family_of(host)
    # Asked before binding (afterwards kap's own listener would answer); told
    # only once the bind worked (else the bind's own error says it all).
    shared = reuse_port and port != 0 and already_listening(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if options is not None:
            options.apply(sock)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {Address(host, port)}: {e.strerror}") from e
    except BaseException:
        sock.close()
        raise
    if shared:
        logger.bind(listen=str(Address(host, port))).warning(
            "another socket already listens on this address and port: expected while an "
            "earlier kap hands over during a restart; otherwise a second kap (or another "
            "program) shares it through SO_REUSEPORT and the kernel splits the clients "
            "between them"
        )
    return sock


def already_listening(host: str, port: int) -> bool:
    """Whether a socket already listens on ``host:port`` (or a wildcard covering it).

    kap binds with SO_REUSEPORT so a new kap can take over from the old one
    without refusing a client; the same option lets a stale, hand-run kap
    share the port with the static pod unnoticed, each taking part of the
    clients. A probe socket bound *without* SO_REUSEPORT tells them apart
    from a free port: Linux refuses it (EADDRINUSE) when a listener holds the
    address. SO_REUSEADDR is set on the probe so connections left in
    TIME_WAIT or still draining from an earlier kap do not count. The probe
    is never listened on; it is closed at once. Any other error (an address
    not on this host) is left for the real bind to report.
    """
    family = family_of(host)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def _ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def local_address(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return Address(host, port)


@functools.lru_cache(maxsize=1024)
def ip_target(address: Address) -> tuple[socket.AddressFamily, tuple[str, int]] | None:
    """Family and sockaddr of an IP address; None for a name. A pure memo:
    ``Address.is_ip`` parses the host with ipaddress, 2-3 us per dial."""
    if not address.is_ip:
        return None
    return family_of(address.host), (address.host, address.port)


# Errors of accept() that mean "out of something, try again later"; trio's
# serve_listeners survives the same set.
ACCEPT_CAPACITY_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class DialError(OSError):
    """A dial that failed; ``str()`` is one short line for logs and /upstreams."""


class LocalResourceError(OSError):
    """kap itself is out of fds or memory: not the upstream's fault, so not counted against it."""


Target = tuple[socket.AddressFamily, tuple[str, int]]


async def resolve(address: Address) -> Target:
    """Family and sockaddr of ``address``: at once for an IP, else getaddrinfo.

    Raises:
      DialError: the name did not resolve.
    """
    target = ip_target(address)
    if target is not None:
        await trio.lowlevel.checkpoint()
        return target
    try:
        infos = await trio.socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise DialError(f"cannot resolve {address.host}: {e.strerror or e}") from None
    if not infos:
        raise DialError(f"cannot resolve {address.host}")
    return infos[0][0], (str(infos[0][4][0]), int(infos[0][4][1]))


def start_connect(target: Target, options: TcpOptions) -> socket.socket:
    """A non-blocking socket with ``options`` whose connect() to ``target`` has begun.

    The connect is usually still in progress: the caller waits for the socket
    to turn writable and reads SO_ERROR (``Relay.relay(..., connect_by=...)``
    does both in the pump's epoll set), under its own deadline.

    Raises:
      DialError: the connect failed at once (refused, unreachable).
      LocalResourceError: kap is out of fds.
    """
    family, sockaddr = target
    # SOCK_NONBLOCK: non-blocking from socket() on, without a separate ioctl.
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as e:
        if e.errno in ACCEPT_CAPACITY_ERRORS:
            raise LocalResourceError(e.errno, e.strerror) from None
        raise
    try:
        options.apply(sock)
        err = sock.connect_ex(sockaddr)
        if err and err not in (errno.EINPROGRESS, errno.EAGAIN):
            raise DialError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


# Errors of accept() about one connection that died in the backlog.
ACCEPT_SKIP_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})


def is_local_ip(ip: str) -> bool:
    """Whether ``ip`` is one of this host's addresses: only those can be bound.

    (A ``net.ipv4.ip_nonlocal_bind=1`` host says yes to every address; kap
    then refuses upstreams on its own port that may not be itself, which its
    log line names.)
    """
    try:
        with socket.socket(family_of(ip), socket.SOCK_DGRAM) as sock:
            sock.bind((ip, 0))
    except OSError:
        return False
    return True
