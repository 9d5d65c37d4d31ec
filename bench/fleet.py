"""``nox -s fleet``: many real kaps against three fake apiservers, and what they cost.

What runs (issue 11 section 4), for each setting (``default``: kap's default
flags; ``fleet``: ``--readiness-interval=30s``):

1. three fake apiservers (``tests/fakeapi/``, in this process, sharing one
   store of EndpointSlices as apiservers share etcd) on 127.0.0.2-4 with one
   kernel-chosen port, serving the ``default/kubernetes`` slice that lists
   all three;
2. ``--kaps`` real kap processes (``python -m kap``), each with its own health
   port and its own client certificate (CN ``kap-NNN``), so every request the
   fakes see is attributed to one node;
3. once every kap has all three upstreams healthy and its watch open, a
   steady window of ``--seconds``: requests per kind, per node and per
   apiserver (probe, PING, LIST from cache, LIST consistent, WATCH start);
4. one fake (the one holding the most watches) is restarted; for
   ``--herd-seconds`` the first LIST or WATCH of each kap is timed from the
   restart: the herd's spread;
5. every kap is stopped by its PID (SIGTERM, then SIGKILL after a bound).

The projection to 5,000 nodes x 3 apiservers and the budget checks are in
``bench/fleet_model.py``. The JSON result goes to ``bench/results/`` (or
``--out``); the table on stdout is what docs/cost.md quotes. Loopback only;
every wait is bounded; no rate is asserted anywhere else.

Usage: python bench/fleet.py [--kaps N] [--seconds S] [--herd-seconds H]
       [--settings default,fleet] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import trio
import trustme

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import fleet_model as model  # noqa: E402
from fakeapi import FakeApiServer, PkiFiles, SliceStore, endpoint_slice  # noqa: E402
from fakeapi.pki import CA_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE, SERVER_NAMES  # noqa: E402
from fleet_report import table  # noqa: E402

RESULTS = HERE / "results"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
SETTINGS = {"default": [], "fleet": ["--readiness-interval=30s"]}
SETTLE = 5.0  # seconds after every kap is ready before counting: first probes done
DOWNTIME = 1.0  # seconds the restarted fake is away (its port refuses meanwhile)
START_STAGGER = 0.1  # seconds between two kap starts, so 2 cores are not flooded
READY_TIMEOUT_BASE = 30.0  # plus READY_TIMEOUT_PER_KAP each: kaps start one by one
READY_TIMEOUT_PER_KAP = 2.0
STOP_TIMEOUT = 15.0  # SIGTERM to SIGKILL; kap's --shutdown-grace is 10 s
POLL = 0.2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_name(i: int) -> str:
    return f"kap-{i:03d}"


def write_pki(directory: Path, kaps: int) -> PkiFiles:
    """A CA, the apiserver certificate and one client certificate per kap."""
    ca = trustme.CA(organization_name="kap fleet CA")
    ca.cert_pem.write_to_path(str(directory / CA_FILE))
    server = ca.issue_cert(*SERVER_NAMES, common_name="kube-apiserver")
    server.cert_chain_pems[0].write_to_path(str(directory / SERVER_CERT_FILE))
    server.private_key_pem.write_to_path(str(directory / SERVER_KEY_FILE))
    for i in range(kaps):
        cert = ca.issue_cert("kap.test", common_name=node_name(i), organization_name="kap:nodes")
        cert.cert_chain_pems[0].write_to_path(str(directory / f"{node_name(i)}.crt"))
        cert.private_key_pem.write_to_path(str(directory / f"{node_name(i)}.key"))
    return PkiFiles(directory)


# ---- the fake control plane -------------------------------------------------------


class ControlPlane:
    """Three fakes sharing one store; a fake can be restarted on its address."""

    def __init__(self, pki: PkiFiles, nursery: trio.Nursery) -> None:
        self.pki, self.nursery = pki, nursery
        self.store = SliceStore()
        self.port = 0
        self.fakes: dict[str, FakeApiServer] = {}
        self.generations: list[FakeApiServer] = []  # every fake ever started
        self._done: dict[str, trio.Event] = {}

    async def start(self, host: str) -> None:
        fake = FakeApiServer(name=host, pki=self.pki, host=host, port=self.port, store=self.store)
        done = trio.Event()

        async def serve(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
            try:
                await fake.run(task_status=task_status)
            finally:
                done.set()

        _, self.port = await self.nursery.start(serve)
        self.fakes[host], self._done[host] = fake, done
        self.generations.append(fake)

    async def start_all(self) -> None:
        for host in HOSTS:
            await self.start(host)
        ready = [(h, True) for h in HOSTS]
        self.store.put(endpoint_slice("kubernetes", ready, ports=[("https", self.port)]))

    async def restart(self, host: str) -> float:
        """Stop the fake on ``host``, wait ``DOWNTIME``, start a new one; the stop time."""
        stopped = trio.current_time()
        self.fakes[host].stop()
        with trio.fail_after(10):
            await self._done[host].wait()
        await trio.sleep(DOWNTIME)
        await self.start(host)
        return stopped

    def records(self) -> Iterator[tuple[FakeApiServer, float, str, str]]:
        """``(fake, time, node, kind)`` for every request any fake has seen."""
        for fake in self.generations:
            for r in fake.requests:
                yield fake, r.at, r.user or "?", model.classify(r.method, r.target)

    def pings(self) -> dict[str, int]:
        """PINGs acked per host so far (0 while the fakes speak no HTTP/2)."""
        out: Counter[str] = Counter()
        for fake in self.generations:
            out[fake.host] += int(getattr(fake, "pings", 0))
        return dict(out)


# ---- the kaps ---------------------------------------------------------------------


class Kap:
    """One kap process with its own health port and client certificate."""

    def __init__(self, index: int, pki: PkiFiles, port: int, flags: list[str], logs: Path) -> None:
        self.name = node_name(index)
        self.health = free_port()
        self.log_path = logs / f"{self.name}.log"
        seeds = ",".join(f"{h}:{port}" for h in HOSTS)
        self.argv = [
            sys.executable,
            "-m",
            "kap",
            *("--listen-addr", "127.0.0.1", "--listen-port", "0"),
            *("--health-listen", f"127.0.0.1:{self.health}"),
            *("--fallback-upstreams", seeds),
            *("--ca-file", str(pki.ca_file)),
            *("--cert-file", str(pki.dir / f"{self.name}.crt")),
            *("--key-file", str(pki.dir / f"{self.name}.key")),
            *("--log-level", "warn"),
            *flags,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("KUBERNETES_") and k != "KUBECONFIG"
        }
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env=env,
            )
        return self.process.pid

    async def ready(self, client: httpx2.AsyncClient) -> bool:
        """All three upstreams healthy and discovery watching."""
        try:
            doc = (await client.get(f"http://127.0.0.1:{self.health}/upstreams")).json()
        except (httpx2.HTTPError, ValueError):
            return False
        healthy = sum(1 for u in doc.get("upstreams", []) if u.get("healthy"))
        return healthy == len(HOSTS) and doc.get("discovery", {}).get("mode") == "watch"

    async def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL after ``STOP_TIMEOUT``; always reaped."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            while p.poll() is None:
                await trio.sleep(POLL)
        if p.poll() is None:
            p.kill()
            p.wait()


@contextlib.asynccontextmanager
async def fleet(kaps: list[Kap]) -> AsyncIterator[list[int]]:
    """Start every kap (staggered); stop every one by its PID on the way out."""
    pids: list[int] = []
    try:
        for kap in kaps:
            pids.append(kap.start())
            await trio.sleep(START_STAGGER)
        yield pids
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for kap in kaps:
                    nursery.start_soon(kap.stop)


async def wait_ready(kaps: list[Kap]) -> float:
    """Seconds until every kap is ready; raises TooSlowError after a bound."""
    started = trio.current_time()
    waiting = list(kaps)
    async with httpx2.AsyncClient(trust_env=False, timeout=2.0) as client:
        with trio.fail_after(READY_TIMEOUT_BASE + READY_TIMEOUT_PER_KAP * len(kaps)):
            while waiting:
                for kap in list(waiting):
                    if kap.process is not None and kap.process.poll() is not None:
                        tail = kap.log_path.read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"{kap.name} exited: {tail}")
                    if await kap.ready(client):
                        waiting.remove(kap)
                await trio.sleep(POLL)
    return trio.current_time() - started


# ---- one setting ------------------------------------------------------------------


def steady(
    plane: ControlPlane, nodes: list[str], t0: float, t1: float, pings: dict[str, int]
) -> dict[str, Any]:
    """Rates per node and per apiserver in ``[t0, t1)``; ``pings`` = PINGs in it per host."""
    seconds = t1 - t0
    inside = [(f, node, kind) for f, at, node, kind in plane.records() if t0 <= at < t1]
    by_node = model.per_node(((n, k) for _, n, k in inside), nodes, seconds)
    spread_pings = sum(pings.values()) / len(nodes) / seconds
    for rates in by_node.values():
        rates[model.PING] = spread_pings  # frames are not attributed to a node
    by_host: dict[str, Counter[str]] = {h: Counter() for h in HOSTS}
    for fake, _, kind in inside:
        by_host[fake.host][kind] += 1
    for host, n in pings.items():
        by_host[host][model.PING] += n
    summary = model.node_summary(by_node)
    return {
        "seconds": seconds,
        "per_node": summary,
        "per_apiserver": {h: model.rates(c, seconds) for h, c in by_host.items()},
        "by_node": by_node,
    }


def busiest(plane: ControlPlane) -> str:
    """The host where the most kaps have their latest WATCH."""
    last: dict[str, tuple[float, str]] = {}
    for fake, at, node, kind in plane.records():
        if kind == model.WATCH and at >= last.get(node, (-1.0, ""))[0]:
            last[node] = (at, fake.host)
    counts = Counter(host for _, host in last.values())
    return counts.most_common(1)[0][0] if counts else HOSTS[0]


async def run_setting(
    name: str, args: argparse.Namespace, pki: PkiFiles, logs: Path
) -> dict[str, Any]:
    flags = SETTINGS[name]
    async with trio.open_nursery() as nursery:
        plane = ControlPlane(pki, nursery)
        await plane.start_all()
        kaps = [Kap(i, pki, plane.port, flags, logs) for i in range(args.kaps)]
        nodes = [k.name for k in kaps]
        async with fleet(kaps) as pids:
            log(f"{name}: {len(kaps)} kaps started ({' '.join(flags) or 'default flags'})")
            startup = await wait_ready(kaps)
            log(f"{name}: all ready after {startup:.1f} s; settling {SETTLE:g} s")
            await trio.sleep(SETTLE)
            t0, pings0 = trio.current_time(), plane.pings()
            log(f"{name}: counting for {args.seconds:g} s")
            await trio.sleep(args.seconds)
            t1, pings1 = trio.current_time(), plane.pings()
            pings = {h: pings1.get(h, 0) - pings0.get(h, 0) for h in HOSTS}
            result = steady(plane, nodes, t0, t1, pings)
            victim = busiest(plane)
            log(f"{name}: restarting {victim}; timing the herd for {args.herd_seconds:g} s")
            stopped = await plane.restart(victim)
            await trio.sleep(max(0.0, args.herd_seconds - DOWNTIME))
            herd_records = [(at, n, k) for _, at, n, k in plane.records()]
            herd = model.herd(herd_records, stopped, stopped + args.herd_seconds)
        nursery.cancel_scope.cancel()
    mean = result["per_node"]["mean"]
    return {
        "status": "ran",
        "flags": flags,
        "kaps": len(kaps),
        "pids": pids,
        "startup_s": startup,
        **result,
        "victim": victim,
        "herd": herd,
        "projection": model.project(mean),
        "budget": model.budget(name, mean),
    }


async def main(args: argparse.Namespace) -> int:
    chosen = [s for s in args.settings.split(",") if s]
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown or not chosen:
        print(
            f"fleet: --settings takes {','.join(SETTINGS)}, not {args.settings!r}", file=sys.stderr
        )
        return 2
    result: dict[str, Any] = {
        "kaps": args.kaps,
        "seconds": args.seconds,
        "herd_seconds": args.herd_seconds,
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "settings": {},
        "original_model": model.project(model.ORIGINAL),
    }
    with tempfile.TemporaryDirectory(prefix="kap-fleet-") as tmp:
        pki = write_pki(Path(tmp), args.kaps)
        for name in chosen:
            result["settings"][name] = await run_setting(name, args, pki, Path(tmp))
    result["loadavg_after"] = os.getloadavg()
    text = table(result)
    result["table"] = text
    out = Path(args.out) if args.out else RESULTS / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    log(f"wrote {out}")
    return 0 if all(s["budget"]["holds"] for s in result["settings"].values()) else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/fleet.py", description=__doc__.split("\n")[0])
    parser.add_argument("--kaps", type=int, default=24, help="kap processes (default 24)")
    parser.add_argument("--seconds", type=float, default=60.0, help="steady window per setting")
    parser.add_argument("--herd-seconds", type=float, default=30.0, help="window after the restart")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    parser.add_argument("--out", default=None, help="JSON result (default bench/results/)")
    args = parser.parse_args(argv)
    if not 1 <= args.kaps <= 200 or args.seconds <= 0 or args.herd_seconds <= DOWNTIME:
        parser.error(f"--kaps 1..200, --seconds > 0, --herd-seconds > {DOWNTIME:g}")
    return args


if __name__ == "__main__":
    sys.exit(trio.run(main, parse()))
