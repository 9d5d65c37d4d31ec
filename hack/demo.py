"""kap's demo: fake kube-apiservers on loopback, kap in front, found by discovery, one killed.

Run with ``nox -s demo`` (or ``python -m hack.demo`` from the repository's root
where kap and the test extras are installed: the fake apiserver is the package
``tests.fakeapi``). It stops by itself in well under a minute:

1. makes a throw-away CA and certificates (trustme),
2. starts three fake apiservers as processes on 127.0.0.2-4, one shared port,
   answering HTTPS /readyz, raw TCP "who are you", and the
   ``default/kubernetes`` EndpointSlice (from a shared ``--slices-file``, as
   apiservers share etcd),
3. starts kap (``python -m kap``) in front of them knowing ONE seed address;
   discovery finds the other two, real probes check them,
4. shows ``kap status`` and how new connections spread,
5. adds a fourth apiserver (127.0.0.5) to the slice, then removes it again:
   kap follows, and removes it after ``--removal-grace``,
6. kills one apiserver (SIGKILL) while a client keeps connecting, and shows
   that no client connection failed, what kap logged, and the fallback file
   kap keeps as its memory of the control plane,
7. stops everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx2
import trio

from tests.fakeapi import (
    PkiFiles,
    create_pki,
    endpoint_slice,
    fake_api_process,
    write_slices_file,
)

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
EXTRA = "127.0.0.5"  # the apiserver the demo adds and removes
REMOVAL_GRACE = 2.0


def say(text: str = "") -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


async def who(port: int) -> str:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"WHO\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(64)
                if not chunk:
                    raise ConnectionError("closed before answering")
                data += chunk
    return data.decode().strip()


async def upstreams(health_port: int) -> dict[str, Any]:
    async with httpx2.AsyncClient(trust_env=False) as client:
        r = await client.get(f"http://127.0.0.1:{health_port}/upstreams")
        return r.json()  # type: ignore[no-any-return]


async def status(health_port: int) -> None:
    """What an operator on the node would run: ``kap status --address ...``."""
    command = ["kap", "status", "--address", f"127.0.0.1:{health_port}"]
    say(f"   $ {' '.join(command)}")
    done = await trio.run_process(
        [sys.executable, "-m", *command], capture_stdout=True, stderr=subprocess.STDOUT, check=False
    )
    for line in done.stdout.decode().splitlines():
        say(f"   {line}")
    say(f"   (exit status {done.returncode})")


def publish(path: Path, port: int, hosts: Iterable[str]) -> None:
    """The control plane's EndpointSlice, as every fake apiserver will serve it."""
    ready = [(h, True) for h in hosts]
    write_slices_file(path, [endpoint_slice("kubernetes", ready, ports=[("https", port)])])


async def main() -> int:
    port, listen, health = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="kap-demo-") as tmp:
        pki = create_pki(Path(tmp))
        slices = Path(tmp) / "slices.json"
        publish(slices, port, HOSTS)
        fallback = Path(tmp) / "fallback.json"
        extra = ["--slices-file", str(slices)]
        say(
            "== starting three fake kube-apiservers (HTTPS /readyz + EndpointSlices, raw TCP 'WHO')"
        )
        async with (
            fake_api_process("apiserver-a", pki, host=HOSTS[0], port=port, extra_args=extra) as a,
            fake_api_process("apiserver-b", pki, host=HOSTS[1], port=port, extra_args=extra),
            fake_api_process("apiserver-c", pki, host=HOSTS[2], port=port, extra_args=extra),
        ):
            for h in HOSTS:
                say(f"   {h}:{port}")
            say(f"   the default/kubernetes EndpointSlice lists all three ({slices.name})")
            args = [
                sys.executable,
                "-m",
                "kap",
                "--listen-addr",
                "127.0.0.1",
                "--listen-port",
                str(listen),
                "--health-listen",
                f"127.0.0.1:{health}",
                "--fallback-upstreams",
                f"{HOSTS[0]}:{port}",
                "--fallback-file",
                str(fallback),
                "--ca-file",
                str(pki.ca_file),
                "--token-file",
                str(pki.token_file),
                "--discover-period",
                "1s",
                "--removal-grace",
                f"{REMOVAL_GRACE:g}s",
                "--health-interval",
                "500ms",
                "--health-timeout",
                "200ms",
            ]
            say(f"== starting kap with ONE seed: {' '.join(args[1:])}")
            log_path = Path(tmp) / "kap.log"
            with open(log_path, "wb") as log:
                env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
                kap = subprocess.Popen(args, stderr=log, env=env)
                try:
                    plane = ControlPlane(pki, port, slices, extra)
                    try:
                        return await scenario(kap, listen, health, a, log_path, plane, fallback)
                    finally:
                        await plane.aclose()
                finally:
                    kap.terminate()
                    try:
                        kap.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        kap.kill()
                    say(f"== kap exited with status {kap.wait()}")


class ControlPlane:
    """What the demo changes while kap runs: the slice, and one extra apiserver."""

    def __init__(self, pki: PkiFiles, port: int, slices: Path, extra: list[str]) -> None:
        self.pki, self.port, self.slices, self.extra = pki, port, slices, extra
        self.stack = contextlib.AsyncExitStack()

    async def add(self, host: str) -> None:
        await self.stack.enter_async_context(
            fake_api_process(
                "apiserver-d", self.pki, host=host, port=self.port, extra_args=self.extra
            )
        )
        publish(self.slices, self.port, (*HOSTS, host))

    def remove(self, host: str) -> None:
        publish(self.slices, self.port, HOSTS)

    async def aclose(self) -> None:
        await self.stack.aclose()


async def wait_for(health: int, predicate: Any, timeout: float = 15) -> dict[str, Any]:
    """Poll /upstreams until ``predicate(doc)``; the doc that satisfied it."""
    with trio.fail_after(timeout):
        while True:
            try:
                doc = await upstreams(health)
                if predicate(doc):
                    return doc
            except httpx2.HTTPError:
                pass
            await trio.sleep(0.1)


def healthy(doc: dict[str, Any]) -> set[str]:
    return {u["address"] for u in doc["upstreams"] if u["healthy"]}


async def scenario(
    kap: subprocess.Popen[bytes],
    listen: int,
    health: int,
    victim: Any,
    log_path: Path,
    plane: ControlPlane,
    fallback: Path,
) -> int:
    port = plane.port
    three = {f"{h}:{port}" for h in HOSTS}
    doc = await wait_for(health, lambda d: healthy(d) == three, timeout=20)
    found = doc["discovery"]
    say(
        f"== kap is up; discovery found {len(found['addresses'])} apiservers through "
        f"{found['source_upstream']} (slices: {found['slices']});"
        " each passed its /readyz probe:"
    )
    await status(health)

    seen = Counter([await who(listen) for _ in range(30)])
    say(f"== 30 connections through 127.0.0.1:{listen} went to: {dict(sorted(seen.items()))}")
    say("   (lowest latency tier wins, round-robin inside it)")

    extra = f"{EXTRA}:{port}"
    say(f"== adding apiserver-d ({extra}) to the EndpointSlice")
    await plane.add(EXTRA)
    doc = await wait_for(health, lambda d: extra in healthy(d))
    say("   kap followed:")
    await status(health)
    say(f"== removing apiserver-d from the EndpointSlice (--removal-grace {REMOVAL_GRACE:g}s)")
    plane.remove(EXTRA)
    doc = await wait_for(
        health,
        lambda d: any(
            u["address"] == extra and u["removal_in_s"] is not None for u in d["upstreams"]
        ),
    )
    say("   kap keeps it for the grace period (its open connections too):")
    await status(health)
    doc = await wait_for(health, lambda d: extra not in {u["address"] for u in d["upstreams"]})
    say(f"   ...and then removes it: {sorted(u['address'] for u in doc['upstreams'])}")

    say(
        f"== killing {victim.name} ({victim.host}:{victim.port}) with SIGKILL, "
        "while a client keeps connecting for 4 s"
    )
    victim.kill()
    # Once it is reaped its port refuses. (A connection relayed in the instant
    # between the signal and the process's death would be reset, as it would
    # be without kap: kap does not terminate TCP.)
    await victim.process.wait()
    failures, served = 0, Counter[str]()
    deadline = trio.current_time() + 4
    while trio.current_time() < deadline:
        try:
            served[await who(listen)] += 1
        except (OSError, ConnectionError, trio.TooSlowError, trio.BrokenResourceError):
            failures += 1
        await trio.sleep(0.02)
    say(
        f"   {sum(served.values())} connections, {failures} failed; served by "
        f"{dict(sorted(served.items()))}"
    )
    doc = await upstreams(health)
    say("== kap status now:")
    await status(health)

    say("== what kap logged about discovery and upstream state (JSON lines, abridged):")
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        if rec["msg"].startswith(("upstream", "discover", "fallback file", "problems")):
            if rec["msg"] in ("upstream tier changed",):
                continue
            fields = {k: rec[k] for k in ("upstream", "reason", "addresses", "error") if k in rec}
            say(f"   {rec['level']:<5} {rec['msg']}: {fields}")
    say(f"== the fallback file kap keeps for its next start: {fallback.read_text().strip()}")
    dead = next(u for u in doc["upstreams"] if u["address"] == f"{victim.host}:{victim.port}")
    ok = failures == 0 and not dead["healthy"] and victim.name not in served
    say(
        "== result: "
        + (
            "OK: no client saw an error, the dead apiserver left rotation"
            if ok
            else "UNEXPECTED: see above"
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
