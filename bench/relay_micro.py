"""A small, bounded micro-benchmark of kap.relay.Relay on loopback.

Not the side-by-side suite of bench/run.py (that one drives the real entry
point with a compiled load generator); this compares designs of the pump
itself. The relay runs in this process behind kap's own Proxy (accept, pick,
dial through the pump, one task and cancel scope per connection), with no
probes; the load generator runs in a child process (this file with
``--role gen``), so the CPU time this process reports is the data path's own.

Figures:
  bulk   one connection, client -> upstream (and back with --both), Gbit/s and
         relay CPU seconds per GB.
  rr     50 connections doing 64-byte request/response; req/s is capped by the
         Python load generator, so read the relay CPU us per request.
  lat    one quiet connection doing 64-byte ping-pong with pauses: added
         round-trip time over a direct connection (p50, p99).
  wake   in-process: CPU per wake-up of a sleeping task, the two ways to do it.
  churn  16 workers doing connect, 64-byte echo, close: relay CPU us per
         connection (conn/s is capped by the Python load generator).
  idle   N idle connections after one 64-byte exchange: fds per connection and
         bytes of Python memory allocated by kap/relay/ per connection.

Usage: python bench/relay_micro.py [--quick] [--only bulk,rr,idle] [--no-splice]
       [--compare ROUNDS --trees A,B]

``--compare ROUNDS --trees A,B`` runs each figure against two source trees of
kap (e.g. a ``git worktree`` of main and this one; each case in a child
process with ``PYTHONPATH=<tree>``) in interleaved rounds (A B, B A, ...)
and prints medians with the min-max spread: how a change to the data path is
measured on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from typing import Any

import outcome
import trio
from loguru import logger

from kap.address import Address
from kap.pool import Pool
from kap.proxy import Proxy
from kap.relay import Relay
from kap.sockets import TcpOptions

MiB = 1024 * 1024


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- the load generator (child process, plain blocking/epoll Python) ------------


def gen_main(args: argparse.Namespace) -> None:
    upstream = socket.create_server(("127.0.0.1", 0), backlog=4096)
    print(upstream.getsockname()[1], flush=True)
    sys.stdin.readline()  # the relay side routes to this upstream first
    front = ("127.0.0.1", args.front)
    deadline = time.monotonic() + 60  # nothing here may outlive a minute
    if args.mode == "bulk":
        gen_bulk(upstream, front, args)
    elif args.mode == "rr":
        gen_rr(upstream, front, args, deadline)
    elif args.mode == "idle":
        gen_idle(upstream, front, args)
    elif args.mode == "lat":
        gen_lat(upstream, front, args)
    elif args.mode == "churn":
        gen_churn(upstream, front, args, deadline)


def report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def gen_bulk(upstream: socket.socket, front: tuple[str, int], args: argparse.Namespace) -> None:
    client = socket.create_connection(front)
    server, _ = upstream.accept()
    size = args.size
    got: dict[str, int] = {}

    def send(sock: socket.socket) -> None:
        block = memoryview(bytes(MiB))
        for _ in range(size // MiB):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)

    def drain(sock: socket.socket, name: str) -> None:
        buf = bytearray(MiB)
        total = 0
        while n := sock.recv_into(buf):
            total += n
        got[name] = total

    threads = [
        threading.Thread(target=send, args=(client,)),
        threading.Thread(target=drain, args=(server, "up")),
    ]
    if args.both:
        threads += [
            threading.Thread(target=send, args=(server,)),
            threading.Thread(target=drain, args=(client, "down")),
        ]
    else:
        server.shutdown(socket.SHUT_WR)
    report(event="start")
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - t0
    if not args.both:
        client.recv(1)
    report(event="done", seconds=elapsed, bytes=sum(got.values()))


def gen_rr(
    upstream: socket.socket, front: tuple[str, int], args: argparse.Namespace, deadline: float
) -> None:
    ep = select.epoll()
    clients = {}
    servers = {}
    for _ in range(args.conns):
        c = socket.create_connection(front)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s, _ = upstream.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.setblocking(False)
        s.setblocking(False)
        clients[c.fileno()] = c
        servers[s.fileno()] = s
        ep.register(c.fileno(), select.EPOLLIN)
        ep.register(s.fileno(), select.EPOLLIN)
    msg = b"x" * 64
    report(event="start")
    t0 = time.monotonic()
    end = t0 + args.seconds
    for c in clients.values():
        c.send(msg)
    done = 0
    while (now := time.monotonic()) < end and now < deadline:
        for fd, _ in ep.poll(0.5):
            if fd in servers:
                s = servers[fd]
                data = s.recv(65536)
                if data:
                    s.send(data)
            else:
                c = clients[fd]
                if c.recv(65536):
                    done += 1
                    c.send(msg)
    elapsed = time.monotonic() - t0
    report(event="done", seconds=elapsed, requests=done)


def gen_lat(upstream: socket.socket, front: tuple[str, int], args: argparse.Namespace) -> None:
    def rtts(client: socket.socket, server: socket.socket, rounds: int) -> list[float]:
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"x" * 64
        out = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            client.sendall(msg)
            server.recv(64)
            server.sendall(msg)
            client.recv(64)
            out.append(time.perf_counter() - t0)
            time.sleep(0.0005)  # a quiet connection: the relay goes idle between messages
        return sorted(out)

    rounds = args.conns
    direct = rtts(socket.create_connection(upstream.getsockname()), upstream.accept()[0], rounds)
    report(event="start")
    relayed = rtts(socket.create_connection(front), upstream.accept()[0], rounds)

    def us(xs: list[float], q: float) -> float:
        return round(xs[int(q * (len(xs) - 1))] * 1e6, 1)

    report(
        event="done",
        requests=rounds,
        direct_p50_us=us(direct, 0.5),
        relayed_p50_us=us(relayed, 0.5),
        added_p50_us=round(us(relayed, 0.5) - us(direct, 0.5), 1),
        added_p99_us=round(us(relayed, 0.99) - us(direct, 0.99), 1),
    )


def gen_churn(
    upstream: socket.socket, front: tuple[str, int], args: argparse.Namespace, deadline: float
) -> None:
    """Workers in threads (blocking, the GIL is released in every call); an
    echo server in one more thread."""
    stop = threading.Event()

    def echo() -> None:
        upstream.settimeout(0.2)
        while not stop.is_set():
            try:
                s, _ = upstream.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo_one, args=(s,), daemon=True).start()

    def echo_one(s: socket.socket) -> None:
        with s:
            while data := s.recv(65536):
                s.sendall(data)

    counts: list[int] = []

    def worker(end: float) -> None:
        n = 0
        msg = b"x" * 64
        while time.monotonic() < end:
            with socket.create_connection(front) as c:
                c.sendall(msg)
                got = 0
                while got < 64 and (chunk := c.recv(64)):
                    got += len(chunk)
            n += 1
        counts.append(n)

    threading.Thread(target=echo, daemon=True).start()
    report(event="start")
    t0 = time.monotonic()
    end = min(t0 + args.seconds, deadline)
    workers = [threading.Thread(target=worker, args=(end,)) for _ in range(args.conns)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    elapsed = time.monotonic() - t0
    stop.set()
    report(event="done", seconds=elapsed, requests=sum(counts))


def gen_idle(upstream: socket.socket, front: tuple[str, int], args: argparse.Namespace) -> None:
    held = []
    for _ in range(args.conns):
        c = socket.create_connection(front)
        s, _ = upstream.accept()
        c.sendall(b"x" * 64)
        s.recv(64)
        s.sendall(b"y" * 64)
        c.recv(64)
        held += [c, s]
    report(event="start")
    report(event="done", conns=args.conns)
    sys.stdin.readline()  # hold them until the relay side has measured


# -- the relay side (this process) ----------------------------------------------


def spawn(cmd: list[str]) -> subprocess.Popen[str]:
    """The load generator: it only prints a port and JSON lines, so this never blocks."""
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


async def run_case(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    try:
        # The first-byte check as kap runs it with default flags (open_budget(1 s,
        # 100 ms)); a tree from before the check has no such argument.
        relay = Relay(splice=not args.no_splice, answer_budget=0.2)
    except TypeError:
        relay = Relay(splice=not args.no_splice)
    pool = Pool()
    proxy = Proxy(
        "127.0.0.1", 0, pool, relay, TcpOptions(), dial_timeout=5.0, on_changes=lambda _: None
    )
    out: dict[str, Any] = {"mode": mode}
    proc: subprocess.Popen[str] | None = None
    try:
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                await nursery.start(relay.run)
                front = await nursery.start(proxy.run)
                cmd = [sys.executable, __file__, "--role", "gen", "--mode", mode]
                cmd += ["--front", str(front.port), "--size", str(args.size)]
                cmd += ["--seconds", str(args.seconds), "--conns", str(args.conns_for(mode))]
                if args.both:
                    cmd.append("--both")
                proc = spawn(cmd)
                assert proc.stdout is not None
                assert proc.stdin is not None
                lines = proc.stdout
                up_port = int(await trio.to_thread.run_sync(lines.readline))
                upstream = Address("127.0.0.1", up_port)
                pool.set_source("flag", [upstream], now=trio.current_time())
                pool.record_probe(upstream, ok=True, latency=1e-4, now=trio.current_time())
                proc.stdin.write("\n")
                proc.stdin.flush()
                if mode == "idle":
                    tracemalloc.start()
                    fds0 = len(os.listdir("/proc/self/fd"))
                    snap0 = tracemalloc.take_snapshot()
                start = json.loads(await trio.to_thread.run_sync(lines.readline))
                assert start["event"] == "start"
                cpu0 = cpu_seconds()
                done = json.loads(await trio.to_thread.run_sync(lines.readline))
                cpu = cpu_seconds() - cpu0
                out.update(done)
                out["relay_cpu_s"] = round(cpu, 3)
                if mode == "idle":
                    await trio.sleep(0.2)
                    conns = done["conns"]
                    snap1 = tracemalloc.take_snapshot()
                    filt = [tracemalloc.Filter(True, "*kap/relay/*")]
                    stats = snap1.filter_traces(filt).compare_to(
                        snap0.filter_traces(filt), "filename"
                    )
                    grown = sum(s.size_diff for s in stats)
                    total = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
                    tracemalloc.stop()
                    out["fds_per_conn"] = (len(os.listdir("/proc/self/fd")) - fds0) / conns
                    out["relay_bytes_per_conn"] = round(grown / conns)
                    out["python_bytes_per_conn"] = round(total / conns)
                    out["pipes_in_use"] = relay.pipes.in_use
                    proc.stdin.write("\n")
                    proc.stdin.flush()
                out["spliced_share"] = round(
                    relay.bytes_spliced / max(1, relay.bytes_up + relay.bytes_down), 3
                )
                nursery.cancel_scope.cancel()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
    if mode == "bulk":
        gb = out["bytes"] / 1e9
        out["gbit_s"] = round(out["bytes"] * 8 / out["seconds"] / 1e9, 2)
        out["relay_cpu_s_per_gb"] = round(out["relay_cpu_s"] / gb, 3)
    elif mode in ("rr", "lat", "churn"):
        if "seconds" in out:
            out["req_s"] = round(out["requests"] / out["seconds"])
        out["relay_cpu_us_per_req"] = round(out["relay_cpu_s"] / out["requests"] * 1e6, 1)
    return out


# What --compare reports per mode: (field, unit, lower is better).
COMPARED = {
    "bulk": [("gbit_s", "Gbit/s", False), ("relay_cpu_s_per_gb", "CPU s/GB", True)],
    "rr": [("req_s", "req/s", False), ("relay_cpu_us_per_req", "CPU us/req", True)],
    "lat": [("added_p50_us", "added p50 us", True), ("added_p99_us", "added p99 us", True)],
    "churn": [("req_s", "conn/s", False), ("relay_cpu_us_per_req", "CPU us/conn", True)],
    "idle": [("python_bytes_per_conn", "Python bytes/conn", True), ("fds_per_conn", "fds", True)],
}


def compare(args: argparse.Namespace, rounds: int, trees: list[str]) -> None:
    """Each figure against each tree in interleaved rounds; medians and min-max."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    modes = [m for m in args.only.split(",") if m in COMPARED]
    for r in range(rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        for mode in modes:
            for tree in order:
                cmd = [sys.executable, __file__, "--only", mode]
                cmd += ["--quick"] if args.quick else []
                cmd += ["--no-splice"] if args.no_splice else []
                env = {**os.environ, "PYTHONPATH": tree}
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps({"tree": tree, **res}), file=sys.stderr, flush=True)
                results.setdefault((mode, tree), []).append(res)
    names = " | ".join(trees)
    print(f"| figure ({rounds} rounds, median [min-max]) | {names} | ratio |")
    print("|---|" + "---|" * len(trees) + "---|")
    for mode in modes:
        for field, unit, _lower in COMPARED[mode]:
            cells = []
            medians = []
            for tree in trees:
                xs = sorted(float(x[field]) for x in results[(mode, tree)])
                medians.append(statistics.median(xs))
                cells.append(f"{medians[-1]:g} [{xs[0]:g}-{xs[-1]:g}]")
            ratio = f"{medians[-1] / medians[0]:.2f}x" if medians[0] else "-"
            print(f"| {mode} {unit} | {' | '.join(cells)} | {ratio} |", flush=True)


async def wake_cost(rounds: int) -> dict[str, Any]:
    """CPU per wake of a sleeping relay() caller: wait_task_rescheduled vs Event."""
    out: dict[str, Any] = {"mode": "wake"}

    async def lowlevel_waiter(box: list[Any]) -> None:
        for _ in range(rounds):
            box.append(trio.lowlevel.current_task())
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    async def lowlevel_waker(box: list[Any]) -> None:
        for _ in range(rounds):
            while not box:
                await trio.lowlevel.checkpoint()
            trio.lowlevel.reschedule(box.pop(), outcome.Value(None))
            await trio.lowlevel.checkpoint()

    async def event_waiter(box: list[Any]) -> None:
        for _ in range(rounds):
            ev = trio.Event()
            box.append(ev)
            await ev.wait()

    async def event_waker(box: list[Any]) -> None:
        for _ in range(rounds):
            while not box:
                await trio.lowlevel.checkpoint()
            box.pop().set()
            await trio.lowlevel.checkpoint()

    for name, waiter, waker in [
        ("wait_task_rescheduled", lowlevel_waiter, lowlevel_waker),
        ("event", event_waiter, event_waker),
    ]:
        box: list[Any] = []
        t0 = time.process_time()
        async with trio.open_nursery() as n:
            n.start_soon(waiter, box)
            n.start_soon(waker, box)
        out[f"{name}_us"] = round((time.process_time() - t0) / rounds * 1e6, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="relay", choices=["relay", "gen"])
    ap.add_argument("--mode", default="bulk")
    ap.add_argument("--front", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="about 5 s in all")
    ap.add_argument("--only", default="bulk,rr,lat,churn,idle,wake")
    ap.add_argument("--both", action="store_true", help="bulk both ways at once")
    ap.add_argument("--no-splice", action="store_true")
    ap.add_argument("--compare", type=int, default=0, metavar="ROUNDS")
    ap.add_argument("--trees", default="", help="with --compare: two kap source trees, A,B")
    ap.add_argument("--size", type=int, default=0, help="bulk bytes per direction")
    ap.add_argument("--seconds", type=float, default=0)
    ap.add_argument("--conns", type=int, default=0)
    args = ap.parse_args()
    if args.role == "gen":
        gen_main(args)
        return
    logger.remove()  # kap logs at warn in production; a debug line per connection costs
    logger.add(sys.stderr, level="WARNING")
    args.size = args.size or (1024 if args.quick else 4096) * MiB
    args.seconds = args.seconds or (1.5 if args.quick else 5)

    def conns_for(mode: str) -> int:
        if args.conns:
            return int(args.conns)
        quick = args.quick
        return {
            "bulk": 1,
            "rr": 50,
            "lat": 1000 if quick else 5000,
            "idle": 1000 if quick else 5000,
            "churn": 16,
        }[mode]

    args.conns_for = conns_for
    if args.compare:
        trees = [os.path.abspath(t) for t in args.trees.split(",") if t]
        if len(trees) < 2:
            ap.error("--compare needs --trees A,B")
        compare(args, args.compare, trees)
        return
    for mode in args.only.split(","):
        if mode == "wake":
            print(json.dumps(trio.run(wake_cost, 20_000 if args.quick else 100_000)), flush=True)
            continue
        print(json.dumps(trio.run(run_case, mode, args)), flush=True)


if __name__ == "__main__":
    main()
