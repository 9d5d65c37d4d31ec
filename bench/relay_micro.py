"""A small, bounded micro-benchmark of kap.relay.Relay on loopback.

Not the side-by-side suite of issue 4 (that one drives the real entry point with
a compiled load generator); this compares designs of the pump itself. The relay
runs in this process behind a minimal accept-and-dial loop; the load generator
runs in a child process (this file with ``--role gen``), so the CPU time this
process reports is the relay's own (pump, the per-connection tasks, trio).

Figures:
  bulk   one connection, client -> upstream (and back with --both), Gbit/s and
         relay CPU seconds per GB.
  rr     50 connections doing 64-byte request/response; req/s is capped by the
         Python load generator, so read the relay CPU us per request.
  lat    one quiet connection doing 64-byte ping-pong with pauses: added
         round-trip time over a direct connection (p50, p99).
  wake   in-process: CPU per wake-up of a sleeping task, the two ways to do it.
  idle   N idle connections after one 64-byte exchange: fds per connection and
         bytes of Python memory allocated by kap/relay/ per connection.

Usage: python bench/relay_micro.py [--quick] [--only bulk,rr,idle] [--no-splice]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from typing import Any

import outcome
import trio

from kap.relay import Relay

MiB = 1024 * 1024


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- the load generator (child process, plain blocking/epoll Python) ------------


def gen_main(args: argparse.Namespace) -> None:
    upstream = socket.create_server(("127.0.0.1", 0), backlog=4096)
    print(upstream.getsockname()[1], flush=True)
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
    relay = Relay(splice=not args.no_splice)
    front = socket.create_server(("127.0.0.1", 0), backlog=4096)
    front.setblocking(False)
    cmd = [sys.executable, __file__, "--role", "gen", "--mode", mode]
    cmd += ["--front", str(front.getsockname()[1]), "--size", str(args.size)]
    cmd += ["--seconds", str(args.seconds), "--conns", str(args.conns_for(mode))]
    if args.both:
        cmd.append("--both")
    proc = spawn(cmd)
    assert proc.stdout is not None
    assert proc.stdin is not None
    lines = proc.stdout
    out: dict[str, Any] = {"mode": mode}
    try:
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                await nursery.start(relay.run)
                up_port = int(await trio.to_thread.run_sync(lines.readline))

                async def connection(csock: socket.socket) -> None:
                    usock = socket.create_connection(("127.0.0.1", up_port))
                    usock.setblocking(False)
                    for s in (csock, usock):
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    try:
                        await relay.relay(csock, usock)
                    finally:
                        csock.close()
                        usock.close()

                async def accept() -> None:
                    while True:
                        await trio.lowlevel.wait_readable(front)
                        while True:
                            try:
                                csock, _ = front.accept()
                            except BlockingIOError:
                                break
                            csock.setblocking(False)
                            nursery.start_soon(connection, csock)

                nursery.start_soon(accept)
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
                    tracemalloc.stop()
                    out["fds_per_conn"] = (len(os.listdir("/proc/self/fd")) - fds0) / conns
                    out["relay_bytes_per_conn"] = round(grown / conns)
                    out["pipes_in_use"] = relay.pipes.in_use
                    proc.stdin.write("\n")
                    proc.stdin.flush()
                out["spliced_share"] = round(
                    relay.bytes_spliced / max(1, relay.bytes_up + relay.bytes_down), 3
                )
                nursery.cancel_scope.cancel()
    finally:
        front.close()
        proc.kill()
        proc.wait(timeout=10)
    if mode == "bulk":
        gb = out["bytes"] / 1e9
        out["gbit_s"] = round(out["bytes"] * 8 / out["seconds"] / 1e9, 2)
        out["relay_cpu_s_per_gb"] = round(out["relay_cpu_s"] / gb, 3)
    elif mode == "lat":
        out["relay_cpu_us_per_req"] = round(out["relay_cpu_s"] / out["requests"] * 1e6, 1)
    elif mode == "rr":
        out["req_s"] = round(out["requests"] / out["seconds"])
        out["relay_cpu_us_per_req"] = round(out["relay_cpu_s"] / out["requests"] * 1e6, 1)
    return out


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
    ap.add_argument("--only", default="bulk,rr,lat,idle,wake")
    ap.add_argument("--both", action="store_true", help="bulk both ways at once")
    ap.add_argument("--no-splice", action="store_true")
    ap.add_argument("--size", type=int, default=0, help="bulk bytes per direction")
    ap.add_argument("--seconds", type=float, default=0)
    ap.add_argument("--conns", type=int, default=0)
    args = ap.parse_args()
    if args.role == "gen":
        gen_main(args)
        return
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
        }[mode]

    args.conns_for = conns_for
    for mode in args.only.split(","):
        if mode == "wake":
            print(json.dumps(trio.run(wake_cost, 20_000 if args.quick else 100_000)), flush=True)
            continue
        print(json.dumps(trio.run(run_case, mode, args)), flush=True)


if __name__ == "__main__":
    main()
