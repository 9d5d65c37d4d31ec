"""Running kap in a test: in-process (``start_kap``) or as a real process (``KapProcess``)."""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx2
import trio
from fakeapi import FakeApiServer, PkiFiles

from kap.app import App, Bound
from kap.config import SERVICEACCOUNT_DIR, Config, parse_config
from kap.upstream import TIER_THRESHOLDS

FAST = {
    "listen_addr": "127.0.0.1",
    "listen_port": "0",
    "health_listen": "127.0.0.1:0",
    "health_interval": "100ms",
    "health_timeout": "500ms",
    "health_jitter": "0.1",
    "dial_timeout": "1s",
    "discovery": "false",
    "shutdown_grace": "1s",
    "log_level": "debug",
}


def make_config(
    pki: PkiFiles | None, environ: dict[str, str] | None = None, **values: str
) -> Config:
    raw: dict[str, str | None] = {**FAST}
    if pki is not None:
        raw["ca_file"] = str(pki.ca_file)
    raw.update(values)

    # No ServiceAccount here: its default files are not readable, every other path is.
    def readable(path: str) -> str | None:
        return "no such file" if path.startswith(SERVICEACCOUNT_DIR) else None

    return parse_config(raw, environ=environ or {}, readable=readable)


# Tier thresholds that put every latency in tier 0, so round-robin order is
# exact whatever loopback does: ``start_kap(..., tier_thresholds=ONE_TIER)``.
ONE_TIER = (1e3, 1e4, 1e5, 1e6, 1e7)


async def start_kap(
    nursery: trio.Nursery,
    config: Config,
    *,
    seed: int = 1,
    tier_thresholds: tuple[float, ...] = TIER_THRESHOLDS,
) -> tuple[App, Bound]:
    app = App(config, rng=random.Random(seed), tier_thresholds=tier_thresholds)
    bound = await nursery.start(app.run)
    return app, bound


async def who(address: Any, timeout: float = 5.0) -> str:
    """Connect (through kap), ask the fake apiserver's raw mode who it is."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(address.host, address.port)
        async with stream:
            await stream.send_all(b"WHO\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(100)
                if not chunk:
                    raise ConnectionError(f"closed after {data!r}")
                data += chunk
            return data.decode().strip()


async def get_json(address: Any, path: str) -> Any:
    async with httpx2.AsyncClient(trust_env=False) as client:
        r = await client.get(f"http://{address}{path}")
        r.raise_for_status()
        return r.json()


async def wait_until(predicate: Any, *, timeout: float = 10.0, step: float = 0.02) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


def settled(app: App) -> bool:
    """Every upstream usable at full score: round-robin then spreads over all of them.

    (Within a tier kap prefers the best score, so right after start, when one
    upstream has passed one probe more than another, it gets every client.)
    """
    from kap.pool import SCORE_MAX

    return all(u.usable and u.score == SCORE_MAX for u in app.pool.upstreams)


def upstream(app: App, fake: Any) -> Any:
    from kap.address import Address

    host, port = fake.address
    return app.pool.get(Address(host, port))


@attrs.define
class KapProcess:
    """kap through its real entry point, with its JSON log lines collected."""

    process: trio.Process
    lines: list[dict[str, Any]] = attrs.field(factory=list)
    listen: str | None = None
    health: str | None = None

    def find(self, msg: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("msg") == msg]


@asynccontextmanager
async def kap_process(
    *args: str,
    env: dict[str, str] | None = None,
    nofile: int | None = None,
    cwd: Any = None,
    wrap: tuple[str, ...] = (),
) -> AsyncIterator[KapProcess]:
    """Start ``python -m kap ARGS``; wait for "kap started"; kill it on exit if still running.

    ``nofile`` sets the process's RLIMIT_NOFILE (soft and hard); ``cwd`` its
    working directory. ``wrap`` is a command that ends by exec-ing its
    arguments (so the PID stays kap's), e.g. one that sets up a mount
    namespace first.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    full_env.update(env or {})

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    process = await trio.lowlevel.open_process(
        [*wrap, sys.executable, "-m", "kap", *args],
        stderr=subprocess.PIPE,
        env=full_env,
        preexec_fn=limit,
        cwd=cwd,
    )
    kp = KapProcess(process)
    started = trio.Event()

    async def read_logs() -> None:
        assert process.stderr is not None
        buf = b""
        async for chunk in process.stderr:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = {"msg": "<not json>", "raw": line.decode(errors="replace")}
                kp.lines.append(rec)
                if rec.get("msg") == "kap started":
                    kp.listen, kp.health = rec["listen"], rec["health"]
                    started.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_logs)
        try:
            with trio.fail_after(20):
                while not started.is_set():
                    if process.poll() is not None:
                        raise RuntimeError(f"kap exited early: {kp.lines}")
                    await trio.sleep(0.02)
            yield kp
        finally:
            with trio.CancelScope(shield=True):
                if process.poll() is None:
                    process.kill()
                await process.wait()
            nursery.cancel_scope.cancel()


def kap_args(
    upstreams: str, pki: PkiFiles | None = None, *, port: int = 0, **flags: str
) -> tuple[str, ...]:
    """Flags for a test kap on 127.0.0.1 (kernel-chosen ports unless ``port``), no discovery.

    ``flags``: more flags, ``shutdown_grace="1s"`` -> ``--shutdown-grace 1s``.
    """
    args = ["--listen-addr", "127.0.0.1", "--listen-port", str(port), "--health-listen",
            "127.0.0.1:0", "--fallback-upstreams", upstreams, "--no-discovery"]  # fmt: skip
    if pki is not None:
        args += ["--ca-file", str(pki.ca_file)]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", value]
    return tuple(args)


def split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def connect(text: str) -> socket.socket:
    return socket.create_connection(split_hostport(text), timeout=5)


StartFake = Callable[..., Awaitable[FakeApiServer]]


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_nofile(want: int) -> int:
    """Raise this process's soft fd limit towards ``want``; return what it got."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return max(new, soft)
