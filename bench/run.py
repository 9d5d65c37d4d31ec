"""``nox -s bench``: kap side by side with no proxy and haproxy, on loopback, in one run.

What runs (issue 4 section 1):

* **upstream**: ``bench/loadgen`` (Go, standard library only, built here into
  ``bench/bin/``) listening on three loopback ports. It sniffs each
  connection's first byte: ``0x16`` is a TLS ClientHello and is served as HTTPS
  ``/readyz`` with a certificate from a CA this script creates (so kap runs
  through its real entry point with real, verified health checks, and every
  probe's arrival is reported on the upstream's stdout, which is how probe drift
  is measured without touching kap); any other first byte is a raw echo, sink
  or source stream. One process for data and probes, so the upstream stays as
  fast as Go's and the probes hit exactly the sockets the data goes to.
* **load generator**: the same Go binary (``bulk``, ``rps``, ``churn``, ``lat``,
  ``hold``, ``busy``), so Python is never the client-side bottleneck.
* **proxies**: ``none`` (the client talks to the upstream), ``kap`` (``python -m
  kap`` with three fallback upstreams, probes every second, jitter 0) and
  ``haproxy`` (tcp mode, ``nbthread 1``, three servers checked over HTTPS every
  second) when the binary is installed.

Traffic tests run in interleaved rounds, the proxies in a shuffled order each
time; the table shows medians. Proxy CPU is read from ``/proc/<pid>/stat``,
RSS from ``/proc/<pid>/status``, fds from ``/proc/<pid>/fd``. The JSON of
every round goes to ``bench/results/``, with a chart of it beside
(bench/chart.py). Every child is
started here and stopped here, by PID, in ``finally`` blocks; every loop and
wait is bounded.

Usage: python bench/run.py [--quick] [--rounds N] [--only bulk,rps,churn,lat,mem,idle,start,task]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = HERE / "bin" / "kapbench"
RESULTS = HERE / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024
HEALTH_INTERVAL = 1.0  # kap --health-interval and haproxy "inter": 3 upstreams probed every second
TESTS = ("start", "idle", "task", "bulk", "rps", "churn", "lat", "mem")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- processes -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stop(proc: subprocess.Popen[Any] | None, *, sig: int = signal.SIGTERM, wait: float = 5) -> None:
    """Stop one child by its PID: ``sig``, then SIGKILL after ``wait`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_once(port: int, timeout: float = 0.5) -> bool:
    """One raw echo through ``port``: True when 64 bytes came back."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"E" + b"x" * 64)
            got = b""
            while len(got) < 64:
                chunk = s.recv(64 - len(got))
                if not chunk:
                    return False
                got += chunk
            return True
    except OSError:
        return False


def wait_serving(
    port: int, proc: subprocess.Popen[Any], start: float, limit: float = 10.0
) -> float:
    """Seconds from ``start`` until an echo through ``port`` works (bounded by ``limit``)."""
    while time.monotonic() - start < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        if echo_once(port, timeout=0.2):
            return time.monotonic() - start
        time.sleep(0.002)
    raise RuntimeError(f"nothing served on port {port} within {limit:g} s")


def gen(*args: str, timeout: float = 120) -> dict[str, Any]:
    """Run one load generator subcommand; its JSON result."""
    out = subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"kapbench {' '.join(args)} failed: {out.stderr.strip()}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def busy_cores(seconds: float) -> Iterator[None]:
    """Keep both cores busy at nice 19 so wake-ups from idle do not dominate latency."""
    proc = subprocess.Popen(
        ["nice", "-n", "19", str(BIN), "busy", "-seconds", str(seconds)],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.2)
        yield
    finally:
        stop(proc, sig=signal.SIGKILL)


# ---- the upstream ----------------------------------------------------------------


class Upstream:
    """The Go upstream (3 ports); collects probe arrivals from its stdout."""

    def __init__(self, pki: Path) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.ports: list[int] = []
        self.probes: list[tuple[int, float, str]] = []  # (port, unix s, path)
        self.pki = pki
        self._lock = threading.Lock()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                str(BIN),
                "upstream",
                "-ports",
                "3",
                "-cert",
                str(self.pki / "server.pem"),
                "-key",
                str(self.pki / "server.key"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ports":
            raise RuntimeError(f"upstream did not start: {line}")
        self.ports = [int(p) for p in line[1:]]
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 4 and parts[0] == "probe":
                with self._lock:
                    self.probes.append((int(parts[1]), int(parts[2]) / 1e9, parts[3]))

    def probe_times(self, path: str) -> dict[int, list[float]]:
        with self._lock:
            out: dict[int, list[float]] = {}
            for port, t, p in self.probes:
                if p == path:
                    out.setdefault(port, []).append(t)
            return out

    def close(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the upstream exits when stdin closes
        stop(self.proc)


class PyUpstream:
    """Fallback upstream without Go: HTTPS /readyz and raw echo, a thread per connection.

    Enough for the start, idle and probe figures; the traffic tests need Go.
    """

    def __init__(self, pki: Path) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
        self.socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
        self.ports = [int(s.getsockname()[1]) for s in self.socks]
        self.probes: list[tuple[int, float, str]] = []
        self._stop = False

    def start(self) -> None:
        for s in self.socks:
            s.settimeout(0.5)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while not self._stop:
            try:
                c, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c, ls), daemon=True).start()

    def _serve(self, c: socket.socket, ls: socket.socket) -> None:
        c.settimeout(30)
        with contextlib.suppress(OSError), c:
            first = c.recv(1, socket.MSG_PEEK)
            if first == b"\x16":
                with self.ctx.wrap_socket(c, server_side=True) as t:
                    while True:
                        req = b""
                        while b"\r\n\r\n" not in req:
                            chunk = t.recv(4096)
                            if not chunk:
                                return
                            req += chunk
                        path = req.split(b" ", 2)[1].decode()
                        self.probes.append((int(ls.getsockname()[1]), time.time(), path))
                        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            c.recv(1)
            while data := c.recv(4096):
                c.sendall(data)

    def probe_times(self, path: str) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for port, t, p in list(self.probes):
            if p == path:
                out.setdefault(port, []).append(t)
        return out

    def close(self) -> None:
        self._stop = True
        for s in self.socks:
            s.close()


def create_pki(directory: Path) -> None:
    import trustme

    ca = trustme.CA(organization_name="kap bench CA")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server = ca.issue_cert("kubernetes.default.svc", "127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    server.private_key_pem.write_to_path(str(directory / "server.key"))


# ---- the proxies -----------------------------------------------------------------


class Proxy:
    """One proxy under test: where clients connect and which PID to measure."""

    name = "none"

    def __init__(self, upstream_ports: list[int], work: Path) -> None:
        self.upstream_ports = upstream_ports
        self.work = work
        self.proc: subprocess.Popen[Any] | None = None
        self.port = upstream_ports[0]

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> float:
        return 0.0

    def close(self) -> None:
        stop(self.proc)
        self.proc = None


class Kap(Proxy):
    name = "kap"

    def command(self) -> list[str]:
        ups = ",".join(f"127.0.0.1:{p}" for p in self.upstream_ports)
        return [
            sys.executable,
            "-m",
            "kap",
            "--no-discovery",
            "--listen-addr=127.0.0.1",
            f"--listen-port={self.port}",
            f"--health-listen=127.0.0.1:{self.health_port}",
            f"--fallback-upstreams={ups}",
            f"--ca-file={self.work / 'ca.pem'}",
            f"--health-interval={HEALTH_INTERVAL:g}s",
            "--health-jitter=0",
            "--shutdown-grace=1s",
            "--log-level=warn",
        ]

    def start(self) -> float:
        self.port = free_port()
        self.health_port = free_port()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL)
        return wait_serving(self.port, self.proc, t0)


class KapBase(Kap):
    """kap from another source tree (``KAP_BASELINE=<dir holding kap/>``): same-run A/B."""

    name = "kapbase"

    def start(self) -> float:
        src = os.environ["KAP_BASELINE"]
        self.port = free_port()
        self.health_port = free_port()
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONPATH": src}
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, cwd=src, env=env)
        return wait_serving(self.port, self.proc, t0)


class Haproxy(Proxy):
    name = "haproxy"

    def start(self) -> float:
        self.port = free_port()
        cfg = self.work / "haproxy.cfg"
        servers = "\n".join(
            f"    server s{i} 127.0.0.1:{p} check check-ssl verify none inter {HEALTH_INTERVAL:g}s"
            for i, p in enumerate(self.upstream_ports)
        )
        cfg.write_text(
            f"""global
    nbthread 1
    maxconn 9800
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen kap_bench
    bind 127.0.0.1:{self.port}
    balance leastconn
    option httpchk GET /livez
{servers}
"""
        )
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [shutil.which("haproxy") or "haproxy", "-db", "-q", "-f", str(cfg)],
            stdout=subprocess.DEVNULL,
        )
        return wait_serving(self.port, self.proc, t0)


# ---- the tests -------------------------------------------------------------------


class Measure:
    """CPU seconds a proxy spent between ``__enter__`` and ``__exit__``."""

    def __init__(self, proxy: Proxy) -> None:
        self.pid = proxy.pid
        self.cpu = 0.0

    def __enter__(self) -> Measure:
        self.t0 = time.time()
        self.c0 = cpu_seconds(self.pid) if self.pid else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.t1 = time.time()
        self.cpu = (cpu_seconds(self.pid) - self.c0) if self.pid else 0.0


def test_bulk(p: Proxy, cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for direction in ("up", "down"):
        with Measure(p) as m:
            r = gen(
                "bulk",
                "-addr",
                f"127.0.0.1:{p.port}",
                "-dir",
                direction,
                "-bytes",
                str(cfg.bulk_bytes),
            )
        out[f"{direction}_gbps"] = r["gbps"]
        out[f"{direction}_cpu_s_per_gb"] = m.cpu / (r["bytes"] / 1e9) if p.pid else None
        out.setdefault("windows", []).append((m.t0, m.t1))
    return out


def test_rps(p: Proxy, cfg: Config) -> dict[str, Any]:
    with Measure(p) as m:
        r = gen("rps", "-addr", f"127.0.0.1:{p.port}", "-conns", "50", "-seconds", str(cfg.seconds))
    return {
        "rps": r["rps"],
        "p50_us": r["p50_us"],
        "p99_us": r["p99_us"],
        "cpu_us_per_req": m.cpu / r["requests"] * 1e6 if p.pid else None,
        "errors": r["errors"],
    }


def test_churn(p: Proxy, cfg: Config) -> dict[str, Any]:
    with Measure(p) as m:
        r = gen(
            "churn", "-addr", f"127.0.0.1:{p.port}", "-workers", "32", "-seconds", str(cfg.seconds)
        )
    return {
        "conn_per_s": r["conn_per_s"],
        "p50_us": r["p50_us"],
        "p99_us": r["p99_us"],
        "cpu_us_per_conn": m.cpu / r["connections"] * 1e6 if p.pid else None,
        "errors": r["errors"],
    }


def test_lat(p: Proxy, cfg: Config) -> dict[str, Any]:
    with busy_cores(cfg.lat_count * 0.002 + 20):
        r = gen("lat", "-addr", f"127.0.0.1:{p.port}", "-count", str(cfg.lat_count), "-gap", "1ms")
    return {"p50_us": r["p50_us"], "p99_us": r["p99_us"]}


def test_mem(p: Proxy, cfg: Config) -> dict[str, Any]:
    """RSS and fds with 1,000 then 9,000 idle connections held through the proxy."""
    assert p.pid is not None
    out: dict[str, Any] = {"rss_0": rss_bytes(p.pid), "fds_0": fd_count(p.pid)}
    holders: list[subprocess.Popen[str]] = []
    try:
        for n, total in ((1000, 1000), (8000, 9000)):
            h = subprocess.Popen(
                [
                    str(BIN),
                    "hold",
                    "-addr",
                    f"127.0.0.1:{p.port}",
                    "-conns",
                    str(n),
                    "-seconds",
                    "120",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            holders.append(h)
            assert h.stdout is not None
            line = h.stdout.readline()  # bounded: the holder fails after 60 s
            if '"held"' not in line:
                raise RuntimeError(f"holder failed: {line!r}")
            time.sleep(1.0)
            out[f"rss_{total}"] = rss_bytes(p.pid)
            out[f"fds_{total}"] = fd_count(p.pid)
    finally:
        for h in holders:
            if h.stdin is not None:
                with contextlib.suppress(OSError):
                    h.stdin.close()
        for h in holders:
            stop(h)
    out["bytes_per_conn"] = (out["rss_9000"] - out["rss_1000"]) / 8000
    out["fds_per_conn"] = (out["fds_9000"] - out["fds_1000"]) / 8000
    time.sleep(1.0)
    out["rss_after"] = rss_bytes(p.pid)
    return out


def measure_idle(proxies: list[Proxy], seconds: float) -> dict[str, dict[str, float]]:
    """Idle CPU (% of a core) over ``seconds``, all proxies at once (they are idle)."""
    live = [p for p in proxies if p.pid]
    c0 = {p.name: cpu_seconds(p.pid) for p in live if p.pid}
    t0 = time.monotonic()
    time.sleep(seconds)
    el = time.monotonic() - t0
    return {
        p.name: {
            "idle_cpu_pct": (cpu_seconds(p.pid) - c0[p.name]) / el * 100,
            "idle_rss": rss_bytes(p.pid),
            "idle_fds": fd_count(p.pid),
        }
        for p in live
        if p.pid
    }


TASK_COST = r"""
import gc, json, resource, sys, time, tracemalloc
import trio

N = int(sys.argv[1])

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

async def main():
    out = {}
    waiting = []
    def abort(_):
        return trio.lowlevel.Abort.SUCCEEDED
    async def conn(scopes):
        # The shape of Proxy._serve: a task, its cancel scope, asleep until woken.
        with trio.CancelScope() as scope:
            scopes.append(scope)
            waiting.append(trio.lowlevel.current_task())
            await trio.lowlevel.wait_task_rescheduled(abort)
    async def plain(scopes):
        waiting.append(trio.lowlevel.current_task())
        await trio.lowlevel.wait_task_rescheduled(abort)
    async def run(fn, traced):
        scopes = []
        waiting.clear()
        gc.collect()
        if traced:
            tracemalloc.start()
        t0 = cpu()
        async with trio.open_nursery() as nursery:
            for _ in range(N):
                nursery.start_soon(fn, scopes)
            while len(waiting) < N:
                await trio.sleep(0)
            size = tracemalloc.get_traced_memory()[0] if traced else 0
            for task in waiting:
                trio.lowlevel.reschedule(task)
        t1 = cpu()
        tracemalloc.stop()
        return size / N, (t1 - t0) / N * 1e6
    for name, fn in (("task_and_scope", conn), ("task_only", plain)):
        await run(fn, False)  # warms allocator pools
        cpus = sorted([(await run(fn, False))[1] for _ in range(3)])
        size = (await run(fn, True))[0]  # tracemalloc slows every allocation: a pass of its own
        out[name] = {"bytes": size, "cpu_us": cpus[1]}
    print(json.dumps(out))

trio.run(main)
"""


def measure_task_cost(n: int) -> dict[str, Any]:
    """What a sleeping per-connection task plus its cancel scope costs, CPU and bytes."""
    out = subprocess.run(
        [sys.executable, "-c", TASK_COST, str(n)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def probe_drift(up: Upstream | PyUpstream, windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Largest gap between two kap probes of one upstream that overlaps a bulk transfer."""
    times = up.probe_times("/readyz")
    gaps_in: list[float] = []
    gaps_all: list[float] = []
    for ts in times.values():
        ts.sort()
        for a, b in itertools.pairwise(ts):
            gaps_all.append(b - a)
            if any(b >= w0 and a <= w1 for w0, w1 in windows):
                gaps_in.append(b - a)
    return {
        "interval_s": HEALTH_INTERVAL,
        "probes": sum(len(t) for t in times.values()),
        "max_gap_during_bulk_s": max(gaps_in, default=None),
        "gaps_during_bulk": len(gaps_in),
        "max_gap_overall_s": max(gaps_all, default=None),
        "median_gap_s": statistics.median(gaps_all) if gaps_all else None,
    }


# ---- the run -------------------------------------------------------------------


class Config:
    def __init__(self, quick: bool, rounds: int | None) -> None:
        self.quick = quick
        self.rounds = rounds or (2 if quick else 5)
        self.bulk_bytes = (512 if quick else 2048) * MiB
        self.seconds = 1.5 if quick else 3.0
        self.lat_count = 500 if quick else 2000
        self.idle_seconds = 5.0 if quick else 20.0
        self.starts = 1 if quick else 3
        self.task_n = 20000


def med(values: list[Any]) -> Any:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 20000 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < 19000:
        log(f"RLIMIT_NOFILE is {soft}: the 9,000-connection figure needs about 19,000 fds")


def build_loadgen() -> str | None:
    """Build bench/bin/kapbench; None when it is ready, else why not."""
    go = shutil.which("go")
    if go is None:
        return "go not found (Debian: apt-get install golang-go)"
    BIN.parent.mkdir(exist_ok=True)
    env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(HERE / "bin" / ".gocache"))
    r = subprocess.run(
        [go, "build", "-o", str(BIN), "."],
        cwd=HERE / "loadgen",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if r.returncode != 0:
        return f"go build failed: {r.stderr.strip()}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter rounds (< 2 minutes)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--only", default=",".join(TESTS), help="comma-separated subset of " + ",".join(TESTS)
    )
    ap.add_argument("--proxies", default="none,kap,haproxy")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    cfg = Config(args.quick, args.rounds)
    only = set(args.only.split(","))
    rng = random.Random(args.seed)
    raise_fd_limit()
    started = time.monotonic()

    missing: list[str] = []
    why = build_loadgen()
    have_go = why is None
    if why:
        missing.append(why + ": traffic and memory tests skipped")
    have_haproxy = shutil.which("haproxy") is not None
    if not have_haproxy:
        missing.append("haproxy not found (Debian: apt-get install haproxy): no haproxy column")
    for m in missing:
        log("MISSING: " + m)

    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
        "missing": missing,
        "rounds": {},
    }
    work = Path(tempfile.mkdtemp(prefix="kap-bench-"))
    upstream: Upstream | PyUpstream | None = None
    proxies: list[Proxy] = []
    try:
        create_pki(work)
        upstream = Upstream(work) if have_go else PyUpstream(work)
        upstream.start()
        names = [n for n in args.proxies.split(",") if n != "haproxy" or have_haproxy]
        classes: dict[str, type[Proxy]] = {
            "none": Proxy,
            "kap": Kap,
            "kapbase": KapBase,
            "haproxy": Haproxy,
        }
        proxies = [classes[n](upstream.ports, work) for n in names]

        # Start-up: time to the first echo served through the proxy.
        starts: dict[str, list[float]] = {}
        for p in proxies:
            if p.name == "none":
                continue
            for i in range(cfg.starts if "start" in only else 1):
                t = p.start()
                starts.setdefault(p.name, []).append(t)
                if i < cfg.starts - 1 and "start" in only:
                    p.close()
            log(f"{p.name}: serving after {med(starts[p.name]) * 1e3:.0f} ms (pid {p.pid})")
        results["start_s"] = starts

        if "task" in only:
            results["task_cost"] = measure_task_cost(cfg.task_n)
            log(f"task cost: {results['task_cost']}")
        if "idle" in only:
            time.sleep(2.0)  # first probes done, TLS sessions set up
            results["idle"] = measure_idle(proxies, cfg.idle_seconds)
            log(f"idle: {results['idle']}")

        tests: dict[str, Callable[[Proxy, Config], dict[str, Any]]] = {}
        if have_go:
            for name, fn in (
                ("bulk", test_bulk),
                ("rps", test_rps),
                ("churn", test_churn),
                ("lat", test_lat),
            ):
                if name in only:
                    tests[name] = fn
        for r in range(cfg.rounds if tests else 0):
            log(f"round {r + 1}/{cfg.rounds}")
            for name, fn in tests.items():
                order = proxies[:]
                rng.shuffle(order)
                for p in order:
                    res = fn(p, cfg)
                    results["rounds"].setdefault(name, {}).setdefault(p.name, []).append(res)
                    shown = {k: round(v, 2) for k, v in res.items() if isinstance(v, float)}
                    log(f"  {name:5} {p.name:8} {shown}")
            if time.monotonic() - started > (100 if cfg.quick else 540):
                log("time budget spent: no more rounds")
                break

        if "bulk" in tests:
            kap_windows = [
                w for res in results["rounds"]["bulk"].get("kap", []) for w in res["windows"]
            ]
            results["probe_drift"] = probe_drift(upstream, kap_windows)
            log(f"probe drift: {results['probe_drift']}")

        if have_go and "mem" in only:
            for p in proxies:
                if p.pid:
                    results.setdefault("mem", {})[p.name] = test_mem(p, cfg)
                    log(f"mem {p.name}: {results['mem'][p.name]}")
        if "idle" in only:
            after = measure_idle(proxies, min(cfg.idle_seconds, 5.0))
            for name, v in after.items():
                results["idle"][name]["rss_after_load"] = v["idle_rss"]
    finally:
        for p in proxies:
            p.close()
        if upstream is not None:
            upstream.close()
        shutil.rmtree(work, ignore_errors=True)

    results["elapsed_s"] = time.monotonic() - started
    table = summarize(results, [p.name for p in proxies])
    results["table"] = table
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if cfg.quick else ''}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(render(table, [p.name for p in proxies], results, cfg))
    print(f"\nJSON: {path}  ({results['elapsed_s']:.0f} s)")
    print(draw_chart(results, path.with_suffix(".png")))
    for m in missing:
        print("MISSING: " + m)


def draw_chart(results: dict[str, Any], path: Path) -> str:
    """The side-by-side chart next to the JSON (bench/chart.py); a line saying where."""
    import chart  # bench/chart.py: this script's directory is first on sys.path

    try:
        chart.draw(results, path)
    except ImportError:
        return "chart: skipped, matplotlib is missing (nox -s bench installs the bench extra)"
    except ValueError as e:
        return f"chart: skipped, {e}"
    return f"chart: {path}"


# ---- the table -----------------------------------------------------------------

# (label, test, key, scale, format, better): medians over rounds.
ROWS: list[tuple[str, str, str, float, str, str]] = [
    ("bulk up, Gbit/s", "bulk", "up_gbps", 1, "{:.2f}", "high"),
    ("bulk down, Gbit/s", "bulk", "down_gbps", 1, "{:.2f}", "high"),
    ("bulk up, proxy CPU s/GB", "bulk", "up_cpu_s_per_gb", 1, "{:.3f}", "low"),
    ("bulk down, proxy CPU s/GB", "bulk", "down_cpu_s_per_gb", 1, "{:.3f}", "low"),
    ("rps, 50 conns, req/s", "rps", "rps", 1e-3, "{:.1f}k", "high"),
    ("rps p50, us", "rps", "p50_us", 1, "{:.0f}", "low"),
    ("rps p99, us", "rps", "p99_us", 1, "{:.0f}", "low"),
    ("rps proxy CPU us/req", "rps", "cpu_us_per_req", 1, "{:.1f}", "low"),
    ("churn, conn/s", "churn", "conn_per_s", 1, "{:.0f}", "high"),
    ("churn p50, us", "churn", "p50_us", 1, "{:.0f}", "low"),
    ("churn p99, us", "churn", "p99_us", 1, "{:.0f}", "low"),
    ("churn proxy CPU us/conn", "churn", "cpu_us_per_conn", 1, "{:.0f}", "low"),
    ("quiet conn RTT p50, us", "lat", "p50_us", 1, "{:.0f}", "low"),
    ("quiet conn RTT p99, us", "lat", "p99_us", 1, "{:.0f}", "low"),
]


def summarize(results: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    rounds = results["rounds"]
    for label, test, key, _, _, _ in ROWS:
        if test not in rounds:
            continue
        table[label] = {n: med([r.get(key) for r in rounds[test].get(n, [])]) for n in names}
    if "lat" in rounds and "none" in names:
        for q in ("p50", "p99"):
            base = rounds["lat"]["none"]
            row: dict[str, Any] = {"none": 0.0}
            for n in names:
                if n == "none":
                    continue
                # Added latency per round: the proxy's minus no proxy's, same round.
                added = [
                    a[f"{q}_us"] - b[f"{q}_us"]
                    for a, b in zip(rounds["lat"][n], base, strict=False)
                ]
                row[n] = med(added)
            table[f"added latency {q}, us"] = row
    for n, m in results.get("mem", {}).items():
        for label, key, scale in (
            ("RSS, 1,000 idle conns, MiB", "rss_1000", 1 / MiB),
            ("RSS, 9,000 idle conns, MiB", "rss_9000", 1 / MiB),
            ("user-space bytes per idle conn", "bytes_per_conn", 1),
            ("fds per idle conn", "fds_per_conn", 1),
        ):
            table.setdefault(label, {"none": None})[n] = m[key] * scale
    for n, v in results.get("idle", {}).items():
        table.setdefault("idle RSS at start, MiB", {"none": None})[n] = v["idle_rss"] / MiB
        if "rss_after_load" in v:
            table.setdefault("idle RSS after all tests, MiB", {"none": None})[n] = (
                v["rss_after_load"] / MiB
            )
        table.setdefault("idle CPU, % of a core (3 upstreams, 1 s probes)", {"none": None})[n] = v[
            "idle_cpu_pct"
        ]
    for n, v in results.get("start_s", {}).items():
        table.setdefault("start to serving, ms", {"none": None})[n] = med(v) * 1e3
    return table


def render(
    table: dict[str, dict[str, Any]], names: list[str], results: dict[str, Any], cfg: Config
) -> str:
    def fmt(v: Any, spec: str = "{:.1f}") -> str:
        return "-" if v is None else spec.format(v)

    specs = {label: (scale, spec) for label, _, _, scale, spec, _ in ROWS}
    cols = [*names]
    ratio_cols = []
    if "kap" in names and "haproxy" in names:
        ratio_cols.append(("kap/haproxy", "haproxy"))
    if "kap" in names and "none" in names:
        ratio_cols.append(("kap/none", "none"))
    head = ["figure (median)", *cols, *(c for c, _ in ratio_cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in table.items():
        scale, spec = specs.get(label, (1, "{:.1f}"))
        cells = [label] + [fmt(None if row.get(n) is None else row[n] * scale, spec) for n in cols]
        for _, base in ratio_cols:
            a, b = row.get("kap"), row.get(base)
            cells.append(f"{a / b:.2f}x" if a is not None and b else "-")
        lines.append("| " + " | ".join(cells) + " |")
    extra = []
    if "probe_drift" in results:
        d = results["probe_drift"]
        extra.append(
            f"probe drift: max gap between two probes of one upstream during kap bulk tests "
            f"{fmt(d['max_gap_during_bulk_s'], '{:.3f}')} s over {d['gaps_during_bulk']} gaps "
            f"(interval {d['interval_s']:g} s, jitter 0; "
            f"max overall {fmt(d['max_gap_overall_s'], '{:.3f}')} s)"
        )
    if "task_cost" in results:
        t = results["task_cost"]
        extra.append(
            "per-connection task + cancel scope (in-process micro-measure): "
            f"{t['task_and_scope']['bytes']:.0f} B asleep, "
            f"{t['task_and_scope']['cpu_us']:.1f} us CPU per start+wake+exit "
            f"(task without the scope: {t['task_only']['bytes']:.0f} B, "
            f"{t['task_only']['cpu_us']:.1f} us)"
        )
    mode = "quick" if cfg.quick else "full"
    hdr = (
        f"kap bench ({mode}, {cfg.rounds} rounds, interleaved and shuffled, medians; "
        f"loopback, {os.cpu_count()} cores)"
    )
    return "\n".join([hdr, "", *lines, "", *extra])


if __name__ == "__main__":
    main()
