"""kap through its real entry point: flags, env, exit codes, logs and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import trio
from fakeapi import PkiFiles
from kaptest import StartFake, kap_args, kap_process, split_hostport

from kap.config import OPTIONS

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}


def run_kap(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kap", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**CLEAN_ENV, **(env or {})},
        check=False,
    )


def test_help_lists_every_flag_with_its_env_var_and_default() -> None:
    out = run_kap("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for opt in OPTIONS:
        for flag in opt.flags:
            assert flag in text
        assert f"env {opt.env}" in text
        if opt.default:
            assert f"default {opt.default}" in text


BAD = [
    (["--dial-timeout", "5"], "--dial-timeout", "DIAL_TIMEOUT"),
    (["--listen-port", "99999"], "--listen-port", "LISTEN_PORT"),
    (["--health-jitter", "2"], "--health-jitter", "HEALTH_JITTER"),
    (["--ca-file", "/does/not/exist"], "--ca-file", "CA_FILE"),
    (["--fallback-upstreams", "10.0.0.1"], "--fallback-upstreams", "FALLBACK_UPSTREAMS"),
    (["--listen-addr", "not-an-ip"], "--listen-addr", "LISTEN_ADDRESS"),
    (["--log-level", "chatty"], "--log-level", "LOG_LEVEL"),
]


@pytest.mark.parametrize(("args", "flag", "env"), BAD)
def test_bad_flag_exits_2_with_one_line(args: list[str], flag: str, env: str) -> None:
    out = run_kap(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert flag in lines[0] and env in lines[0]


def test_bad_env_var_is_reported_the_same_way() -> None:
    out = run_kap(env={"HEALTH_TIMEOUT": "fast", "LISTEN_PORT": "port"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2
    assert any("HEALTH_TIMEOUT" in line for line in lines)
    assert any("LISTEN_PORT" in line for line in lines)


def test_flag_beats_env(tmp_path: object) -> None:
    # The env value is bad, the flag good: the flag wins, so no error about it.
    out = run_kap("--dial-timeout", "5x", env={"DIAL_TIMEOUT": "1s"})
    assert out.returncode == 2 and "DIAL_TIMEOUT" in out.stderr
    out = run_kap("--dial-timeout", "1s", "--listen-port", "x", env={"DIAL_TIMEOUT": "5x"})
    assert "DIAL_TIMEOUT" not in out.stderr and "LISTEN_PORT" in out.stderr


def test_unknown_flag_exits_2() -> None:
    out = run_kap("--frobnicate")
    assert out.returncode == 2


def test_port_in_use_is_one_clear_error(pki: PkiFiles) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        # SO_REUSEPORT lets two kaps share a port, but not a plain listener's.
        out = run_kap("--listen-addr", "127.0.0.1", "--listen-port", str(port),
                      "--health-listen", "127.0.0.1:0", "--no-discovery")  # fmt: skip
    assert out.returncode == 1
    last = json.loads(out.stderr.strip().splitlines()[-1])
    assert last["level"] == "error" and "in use" in last["error"].lower()


async def test_logs_are_json_lines_and_sigterm_drains_then_exits_0(
    start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a")
    args = kap_args(f"127.0.0.1:{a.address[1]}", pki, shutdown_grace="3s", health_interval="200ms")
    async with kap_process(*args) as kap:
        host, port = split_hostport(kap.listen or "")
        with trio.fail_after(10):
            while not kap.find("upstream healthy"):
                await trio.sleep(0.05)
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"hello")
            assert await stream.receive_some(5) == b"hello"
            kap.process.send_signal(signal.SIGTERM)
            while not kap.find("stopped accepting"):
                await trio.sleep(0.02)
            # New clients are refused at once ...
            with pytest.raises(OSError):
                await trio.open_tcp_stream(host, port)
            # ... while the open connection keeps working during the grace.
            await stream.send_all(b"still")
            assert await stream.receive_some(5) == b"still"
            await stream.aclose()
            assert await kap.process.wait() == 0
    started = kap.find("kap started")[0]
    for key in ("ts", "level", "msg", "listen", "upstreams", "credentials"):
        assert key in started
    assert started["ts"].endswith("Z")
    assert kap.find("upstream healthy")[0]["upstream"] == f"127.0.0.1:{a.address[1]}"
    assert all(line["msg"] != "<not json>" for line in kap.lines)


async def test_sigterm_cuts_connections_after_the_grace(start_fake: StartFake) -> None:
    a = await start_fake("a")
    args = kap_args(f"127.0.0.1:{a.address[1]}", shutdown_grace="500ms")
    async with kap_process(*args) as kap:
        host, port = split_hostport(kap.listen or "")
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"hi")
            assert await stream.receive_some(2) == b"hi"
            t0 = trio.current_time()
            kap.process.send_signal(signal.SIGTERM)
            assert await stream.receive_some(10) == b""  # closed by kap at the deadline
            assert trio.current_time() - t0 >= 0.4
            assert await kap.process.wait() == 0


def test_subcommands_are_listed_and_bare_flags_still_run_the_balancer() -> None:
    out = run_kap("--help")
    assert "Commands:" in out.stdout and "status" in out.stdout.split("Commands:", 1)[1]
    out = run_kap("status", "--help")
    assert out.returncode == 0 and "--output" in out.stdout
    # Flags before a subcommand are still the balancer's, checked only when it runs.
    out = run_kap("--listen-port", "99999", "status", "--address", "127.0.0.1:1")
    assert out.returncode == 2 and "LISTEN_PORT" not in out.stderr
    assert out.stderr.startswith("kap status: nothing answers at 127.0.0.1:1")
