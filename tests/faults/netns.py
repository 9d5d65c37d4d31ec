"""A network namespace with one veth link, for faults that need a real network path.

Addresses come from 198.18.0.0/15, the range RFC 2544 sets aside for network
benchmarks: they exist only between the host and the namespace this test makes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

import attrs


class NetnsUnavailable(Exception):
    """This machine cannot make network namespaces (not root, no iproute2, no iptables)."""


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=10)


@attrs.define
class Netns:
    name: str
    host_if: str
    host_ip: str
    ns_ip: str

    @classmethod
    def create(cls) -> Netns:
        if os.geteuid() != 0:
            raise NetnsUnavailable("needs root to create network namespaces")
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                raise NetnsUnavailable(f"{tool} is not installed (.ci/run installs it)")
        tag = secrets.token_hex(3)
        octet = int(tag[:2], 16) % 64 * 4  # a /30 inside 198.18.0.0/24
        ns = cls(f"kapf-{tag}", f"kvh{tag}", f"198.18.0.{octet + 1}", f"198.18.0.{octet + 2}")
        peer = f"kvn{tag}"
        try:
            _run("ip", "netns", "add", ns.name)
            _run("ip", "link", "add", ns.host_if, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", peer, "netns", ns.name)
            _run("ip", "addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if)
            _run("ip", "link", "set", ns.host_if, "up")
            _run("ip", "-n", ns.name, "addr", "add", f"{ns.ns_ip}/30", "dev", peer)
            _run("ip", "-n", ns.name, "link", "set", peer, "up")
            _run("ip", "-n", ns.name, "link", "set", "lo", "up")
        except (subprocess.CalledProcessError, OSError) as e:
            ns.delete()
            detail = getattr(e, "stderr", b"") or b""
            why = detail.decode().strip() or str(e)
            raise NetnsUnavailable(f"cannot set up a namespace: {why}") from e
        return ns

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def blackhole(self) -> None:
        """Drop every packet in and out of the namespace: no RST, no ICMP, nothing."""
        _run(*self.exec_prefix, "iptables", "-I", "INPUT", "-j", "DROP")
        _run(*self.exec_prefix, "iptables", "-I", "OUTPUT", "-j", "DROP")

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
