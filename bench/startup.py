"""kap's start-up: exec to the first relayed byte, CPU spent by then, idle RSS after.

What one run measures (the same kap command line as ``bench/run.py``'s start
test: three fallback upstreams, verified HTTPS probes, ``--no-discovery``):

* **first byte**: wall time from just before ``Popen`` until a raw echo
  through kap's listen port comes back (a client connects in a loop, 2 ms
  apart, each attempt bounded). kap accepts only once the pump, the health
  server and the first probes run, so this is the whole start.
* **CPU**: the kap process's utime + stime at that moment (``/proc/<pid>/stat``,
  10 ms ticks), which a loaded machine inflates far less than wall time.
* **RSS**: ``VmRSS`` after ``--settle`` seconds more (what kap imports once
  it serves, such as cryptography for the certificates' expiry, is in by
  then), and again after one ``/metrics`` scrape (prometheus-client too).

With ``--baseline DIR`` (a tree holding another ``kap/``, e.g. a ``git
worktree`` of main), the two trees run in interleaved rounds, in a shuffled
order each round, so machine load falls on both alike. ``--importtime``
instead runs each tree once under ``python -X importtime`` and prints the
imports done before the first relayed byte, largest cumulative first.

The upstream is ``bench/run.py``'s Python one (HTTPS ``/readyz`` and raw echo
on three loopback ports): no Go needed. Every child is stopped by PID.

Usage: python bench/startup.py [--runs N] [--baseline DIR] [--settle S] [--discovery] [--importtime]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import Kap, PyUpstream, cpu_seconds, create_pki, echo_once, rss_bytes, stop  # noqa: E402

MiB = 1024 * 1024
# Bounds every wait: kap starts in well under a second on an idle machine.
START_LIMIT = 15.0


def start_kap(
    kap: Kap,
    tree: Path,
    stderr: list[tuple[float, str]],
    extra: list[str] | None = None,
    *,
    discovery: bool = False,
) -> tuple[subprocess.Popen[Any], float, float]:
    """Start kap from ``tree``; (process, seconds to the first echo, CPU seconds by then).

    A thread reads kap's stderr into ``stderr`` as (monotonic time, line) from
    the start, so a chatty kap (``-X importtime``) never blocks on a full pipe.
    """
    kap.port = free_port()
    kap.health_port = free_port()
    cmd = kap.command()
    if discovery:
        cmd.remove("--no-discovery")  # imported and started; off for want of credentials
    cmd[1:1] = extra or []
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr.append((time.monotonic(), line))

    threading.Thread(target=read, daemon=True).start()
    while time.monotonic() - t0 < START_LIMIT:
        if proc.poll() is not None:
            raise RuntimeError(f"kap from {tree} exited with {proc.returncode}")
        if echo_once(kap.port, timeout=0.2):
            took = time.monotonic() - t0
            return proc, took, cpu_seconds(proc.pid)
        time.sleep(0.002)
    stop(proc)
    raise RuntimeError(f"kap from {tree} served nothing within {START_LIMIT:g} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run(kap: Kap, tree: Path, settle: float, discovery: bool) -> dict[str, float]:
    """One start: first byte, CPU by then, RSS when settled and after a /metrics scrape."""
    proc, took, cpu = start_kap(kap, tree, [], discovery=discovery)
    try:
        time.sleep(settle)
        rss = rss_bytes(proc.pid)
        url = f"http://127.0.0.1:{kap.health_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            answer.read()
        scraped = rss_bytes(proc.pid)
    finally:
        stop(proc)
    return {
        "first_byte_ms": took * 1e3,
        "cpu_ms": cpu * 1e3,
        "rss_mib": rss / MiB,
        "rss_scraped_mib": scraped / MiB,
    }


def importtime(kap: Kap, tree: Path, top: int) -> None:
    """One start under ``-X importtime``: the imports done before the first byte."""
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    proc, took, _ = start_kap(kap, tree, lines, ["-X", "importtime"])
    time.sleep(1.0)
    stop(proc)
    before = [ln for t, ln in lines if t <= t0 + took]
    after = [ln for t, ln in lines if t > t0 + took]
    rows: list[tuple[int, int, str]] = []
    for ln in before:
        if not ln.startswith("import time:") or "cumulative" in ln:
            continue
        _, own, cumulative, name = (
            part.strip() for part in ln.replace("import time:", "|").split("|")
        )
        rows.append((int(cumulative), int(own), name))
    total = sum(own for _, own, _ in rows)
    print(
        f"{tree}: first byte after {took * 1e3:.0f} ms; {len(rows)} imports before it, "
        f"{total / 1e3:.0f} ms self time in all; {len(after)} import lines after"
    )
    for cum, self_us, name in sorted(rows, reverse=True)[:top]:
        print(f"  {cum / 1e3:7.1f} ms cumulative {self_us / 1e3:6.1f} ms self  {name}")


def summary(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return (
        f"median {statistics.median(values):6.1f}  IQR {q[0]:6.1f}-{q[2]:6.1f}  "
        f"min {min(values):6.1f}  max {max(values):6.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=20, help="starts per tree (default 20)")
    ap.add_argument(
        "--settle", type=float, default=2.0, help="seconds from serving to the RSS read"
    )
    ap.add_argument("--baseline", type=Path, help="another tree holding kap/, run interleaved")
    ap.add_argument(
        "--importtime", action="store_true", help="one start per tree under -X importtime"
    )
    ap.add_argument(
        "--discovery",
        action="store_true",
        help="without --no-discovery: the discovery stack is imported (it then finds "
        "no credentials and stays off)",
    )
    ap.add_argument("--top", type=int, default=40, help="rows of --importtime (default 40)")
    args = ap.parse_args()
    trees = {"this": HERE.parent}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    with tempfile.TemporaryDirectory(prefix="kap-startup-") as tmp:
        work = Path(tmp)
        create_pki(work)
        upstream = PyUpstream(work)
        upstream.start()
        kap = Kap(upstream.ports, work)
        try:
            if args.importtime:
                for tree in trees.values():
                    importtime(kap, tree, args.top)
                return
            results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            loads = []
            for _ in range(args.runs):
                order = list(trees)
                random.shuffle(order)
                for name in order:
                    results[name].append(one_run(kap, trees[name], args.settle, args.discovery))
                loads.append(os.getloadavg()[0])
        finally:
            upstream.close()
    print(
        f"{args.runs} runs per tree, interleaved; load average (1 min) during the runs: "
        f"median {statistics.median(loads):.2f}, max {max(loads):.2f}, {os.cpu_count()} CPUs"
    )
    for name, rows in results.items():
        print(f"{name} ({trees[name]}):")
        for key, unit in (
            ("first_byte_ms", "ms"),
            ("cpu_ms", "ms"),
            ("rss_mib", "MiB"),
            ("rss_scraped_mib", "MiB"),
        ):
            print(f"  {key:14s} {summary([r[key] for r in rows])} {unit}")


if __name__ == "__main__":
    main()
