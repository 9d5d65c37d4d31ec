"""kap's demo: three fake kube-apiservers on loopback, kap in front, one of them killed.

Run with ``nox -s demo`` (or ``python hack/demo.py`` where kap and the test
extras are installed). It stops by itself in well under a minute:

1. makes a throw-away CA and certificates (trustme),
2. starts three fake apiservers as processes on 127.0.0.2-4, one shared port,
   answering HTTPS /readyz and, for raw TCP, "who are you",
3. starts kap (``python -m kap``) in front of them, with real probes,
4. shows /upstreams and how new connections spread,
5. kills one apiserver (SIGKILL) while a client keeps connecting, and shows
   that no client connection failed and what kap logged,
6. stops everything it started.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from fakeapi import create_pki, fake_api_process  # noqa: E402

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


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


def table(doc: dict[str, Any]) -> None:
    say(
        f"  {'upstream':<18} {'healthy':<8} {'score':>5} {'tier':>4} {'latency':>9} "
        f"{'conns':>5}  last error"
    )
    for u in doc["upstreams"]:
        lat = "-" if u["latency_ms"] is None else f"{u['latency_ms']:.2f}ms"
        tier = "-" if u["tier"] is None else u["tier"]
        say(
            f"  {u['address']:<18} {u['healthy']!s:<8} {u['score']:>5} {tier:>4} {lat:>9} "
            f"{u['connections_total']:>5}  {u['last_error'] or ''}"
        )


async def main() -> int:
    port, listen, health = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="kap-demo-") as tmp:
        pki = create_pki(Path(tmp))
        say("== starting three fake kube-apiservers (HTTPS /readyz, raw TCP 'WHO')")
        async with (
            fake_api_process("apiserver-a", pki, host=HOSTS[0], port=port) as a,
            fake_api_process("apiserver-b", pki, host=HOSTS[1], port=port),
            fake_api_process("apiserver-c", pki, host=HOSTS[2], port=port),
        ):
            for h in HOSTS:
                say(f"   {h}:{port}")
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
                ",".join(f"{h}:{port}" for h in HOSTS),
                "--ca-file",
                str(pki.ca_file),
                "--no-discovery",
                "--health-interval",
                "500ms",
                "--health-timeout",
                "200ms",
            ]
            say(f"== starting kap: {' '.join(args[1:])}")
            log_path = Path(tmp) / "kap.log"
            with open(log_path, "wb") as log:
                env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
                kap = subprocess.Popen(args, stderr=log, env=env)
                try:
                    return await scenario(kap, listen, health, a, log_path)
                finally:
                    kap.terminate()
                    try:
                        kap.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        kap.kill()
                    say(f"== kap exited with status {kap.wait()}")


async def scenario(
    kap: subprocess.Popen[bytes], listen: int, health: int, victim: Any, log_path: Path
) -> int:
    with trio.fail_after(20):
        while True:
            try:
                doc = await upstreams(health)
                if sum(u["healthy"] for u in doc["upstreams"]) == 3:
                    break
            except httpx2.HTTPError:
                pass
            await trio.sleep(0.1)
    say("== kap is up; every apiserver passed its /readyz probe:")
    table(doc)

    seen = Counter([await who(listen) for _ in range(30)])
    say(f"== 30 connections through 127.0.0.1:{listen} went to: {dict(sorted(seen.items()))}")
    say("   (lowest latency tier wins, round-robin inside it)")

    say(
        f"== killing {victim.name} ({victim.host}:{victim.port}) with SIGKILL, "
        "while a client keeps connecting for 4 s"
    )
    victim.kill()
    failures, served = 0, Counter[str]()
    deadline = trio.current_time() + 4
    while trio.current_time() < deadline:
        try:
            served[await who(listen)] += 1
        except (OSError, ConnectionError, trio.TooSlowError):
            failures += 1
        await trio.sleep(0.02)
    say(
        f"   {sum(served.values())} connections, {failures} failed; served by "
        f"{dict(sorted(served.items()))}"
    )
    doc = await upstreams(health)
    say("== /upstreams now:")
    table(doc)

    say("== what kap logged about upstream state (JSON lines, abridged):")
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        if rec["msg"].startswith("upstream") and rec["msg"] != "upstream added":
            extra = {k: rec[k] for k in ("upstream", "reason") if k in rec}
            say(f"   {rec['level']:<5} {rec['msg']}: {extra}")
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
