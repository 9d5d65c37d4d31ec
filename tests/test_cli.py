"""kap through its real entry point: flags, env, exit codes, logs and SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from fakeapi import PkiFiles
from kaptest import KapProcess, StartFake, get_json, kap_args, kap_process, split_hostport

from kap.config import OPTIONS
from kap.credentials import NO_CA

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


async def test_sighup_and_sigusr_are_logged_and_ignored_not_an_end(
    start_fake: StartFake,
) -> None:
    """Their default action would end kap without a word; an operator's HUP expects a reload."""
    a = await start_fake("a")
    async with kap_process(*kap_args(f"127.0.0.1:{a.address[1]}")) as kap:
        host, port = split_hostport(kap.listen or "")
        with trio.fail_after(10):
            for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                kap.process.send_signal(sig)
            while len(kap.find("signal ignored: kap re-reads its credential files by itself; "
                               "SIGTERM stops it")) < 3:  # fmt: skip
                await trio.sleep(0.02)
            assert kap.process.poll() is None
            stream = await trio.open_tcp_stream(host, port)  # still serving
            await stream.send_all(b"hi")
            assert await stream.receive_some(2) == b"hi"
            await stream.aclose()


def test_subcommands_are_listed_and_bare_flags_still_run_the_balancer() -> None:
    out = run_kap("--help")
    assert "Commands:" in out.stdout and "status" in out.stdout.split("Commands:", 1)[1]
    out = run_kap("status", "--help")
    assert out.returncode == 0 and "--output" in out.stdout
    # Flags before a subcommand are still the balancer's, checked only when it runs.
    out = run_kap("--listen-port", "99999", "status", "--address", "127.0.0.1:1")
    assert out.returncode == 2 and "LISTEN_PORT" not in out.stderr
    assert out.stderr.startswith("kap status: nothing answers at 127.0.0.1:1")


# ---- bad input: one line, exit 2, never a traceback -----------------------------


def run_kap_in(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "kap", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**CLEAN_ENV, **(env or {})},
        cwd=cwd,
        check=False,
    )


def kubeconfig_doc(
    server: str | None = None, ca: str | None = None, token_file: str | None = None
) -> dict[str, Any]:
    """A kubeconfig; each argument, when given, adds the entry it belongs to."""
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "Config"}
    if server is not None:
        cluster: dict[str, str] = {"server": server}
        if ca is not None:
            cluster["certificate-authority"] = ca
        doc["clusters"] = [{"name": "c", "cluster": cluster}]
    if token_file is not None:
        doc["users"] = [{"name": "u", "user": {"tokenFile": token_file}}]
        doc["contexts"] = [{"name": "x", "context": {"cluster": "c", "user": "u"}}]
        doc["current-context"] = "x"
    return doc


@pytest.fixture
def workdir(tmp_path: Path, pki: PkiFiles) -> Path:
    """A working directory with ``pki/`` (good files) and a few bad ones."""
    shutil.copytree(pki.dir, tmp_path / "pki")
    (tmp_path / "garbage.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    (tmp_path / "two-words").write_text("a token\n")
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "bad.yaml").write_text("clusters: [ {name: c, cluster: {server: 'https://x'\n")
    (tmp_path / "kc-bad-ca.yaml").write_text(
        json.dumps(kubeconfig_doc("https://127.0.0.1:1", "garbage.crt", "pki/token"))
    )
    return tmp_path


# args, env, the flag the line names (with its env var), and what else it says
BAD_INPUT = [
    (["--ca-file", "garbage.crt"], {}, "--ca-file", "garbage.crt"),
    ([], {"CA_FILE": "./garbage.crt"}, "--ca-file", "garbage.crt"),
    (["--ca-file", "pki/ca.crt", "--token-file", "a-dir"], {}, "--token-file", "a-dir"),
    (["--token-file", "two-words"], {}, "--token-file", "not a single token"),
    (["--token-file", "pki/missing"], {}, "--token-file", "pki/missing"),
    (["--cert-file", "pki/cl.crt"], {}, "--key-file", "--cert-file"),
    (["--cert-file", "pki/cl.crt", "--key-file", "pki/nokey"], {}, "--key-file", "nokey"),
    (["--cert-file", "pki/cl.crt", "--key-file", "pki/ca.crt"], {}, "--cert-file", "its key"),
    (["--kubeconfig", "bad.yaml"], {}, "--kubeconfig", "not YAML"),
    ([], {"KUBECONFIG": "missing-a.yaml:missing-b.yaml"}, "--kubeconfig", "none of"),
    ([], {"KUBECONFIG": "kc-bad-ca.yaml"}, "--kubeconfig", "garbage.crt"),
    (["--fallback-file", "no/such/dir/f.json"], {}, "--fallback-file", "no/such"),
    (
        ["--fallback-upstreams", "https://10.0.0.1:6"],
        {},
        "--fallback-upstreams",
        "without a scheme",
    ),
]
ENV_OF = {opt.flags[0]: opt.env for opt in OPTIONS}


@pytest.mark.parametrize(("args", "env", "flag", "says"), BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_no_traceback(
    workdir: Path, args: list[str], env: dict[str, str], flag: str, says: str
) -> None:
    out = run_kap_in(workdir, *args, "--health-listen", "127.0.0.1:0", env=env)
    assert "Traceback" not in out.stderr
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"kap: invalid {flag} (env {ENV_OF[flag]}): ")
    assert says in lines[0]


async def wait_for_discovery(kap: KapProcess) -> None:
    """Until discovery has tried once (the relative-path crash came at its first session)."""
    with trio.fail_after(15):
        while not kap.find("discovery failed; keeping the current upstreams"):
            assert kap.process.poll() is None, kap.lines
            await trio.sleep(0.02)
    assert kap.process.poll() is None
    assert all(line["msg"] != "<not json>" for line in kap.lines), kap.lines


LOCAL = ("--listen-addr", "127.0.0.1", "--listen-port", "0", "--health-listen", "127.0.0.1:0",
         "--fallback-upstreams", "127.0.0.1:1", "--discover-period", "200ms")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--ca-file", "pki/ca.crt", "--token-file", "pki/token"], {}),
        ([], {"CA_FILE": "./pki/ca.crt", "TOKEN_FILE": "pki/../pki/token"}),
        (["--as-static-pod", "--static-pod-dir", "pki"], {}),
    ],
)
async def test_relative_paths_work_with_discovery_on(
    workdir: Path, args: list[str], env: dict[str, str]
) -> None:
    async with kap_process(*LOCAL, *args, env=env, cwd=workdir) as kap:
        await wait_for_discovery(kap)
    started = kap.find("kap started")[0]
    assert started["credentials"] in ("flags", "static-pod")


async def test_a_kubeconfig_list_is_merged_first_wins_with_paths_relative_to_each_file(
    workdir: Path,
) -> None:
    # a.yaml: the user and context, its token relative to a.yaml's directory;
    # b.yaml (elsewhere): the cluster, its CA relative to b.yaml's directory.
    (workdir / "b").mkdir()
    shutil.copy(workdir / "pki" / "ca.crt", workdir / "b" / "ca.crt")
    a = kubeconfig_doc(token_file="pki/token")
    (workdir / "a.yaml").write_text(json.dumps(a))
    b = kubeconfig_doc("https://127.0.0.2:6443", "ca.crt")
    b["current-context"] = "ignored: a.yaml's wins"
    (workdir / "b" / "b.yaml").write_text(json.dumps(b))
    env = {"KUBECONFIG": "a.yaml:missing.yaml:b/b.yaml"}
    async with kap_process(*LOCAL, env=env, cwd=workdir) as kap:
        await wait_for_discovery(kap)
    started = kap.find("kap started")[0]
    assert started["credentials"] == "kubeconfig" and started["kubeconfig_context"] == "x"
    assert "127.0.0.2:6443" in started["upstreams"]  # the merged server, one more seed


async def test_without_a_ca_file_kap_never_sends_the_token(
    start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a", require_token=pki.token)
    args = ("--listen-addr", "127.0.0.1", "--listen-port", "0", "--health-listen", "127.0.0.1:0",
            "--fallback-upstreams", f"127.0.0.1:{a.address[1]}", "--health-interval", "100ms",
            "--token-file", str(pki.token_file))  # fmt: skip
    async with kap_process(*args) as kap:
        with trio.fail_after(10):
            while a.probe_count() < 5:
                await trio.sleep(0.02)
        doc = await get_json(kap.health, "/upstreams")
    counts = {"handshakes": a.tls_handshakes, "requests": len(a.requests)}
    counts["with_token"] = a.bearer_requests
    print("kap process, no CA file:", counts)
    assert counts["handshakes"] >= 1 and counts["requests"] >= 5 and counts["with_token"] == 0
    assert doc["discovery"]["mode"] == "off"
    assert doc["discovery"]["last_error"] == NO_CA  # /upstreams says why
    errors = [r for r in kap.lines if r["level"] == "error"]
    assert [r["error"] for r in errors] == [NO_CA]
    assert len(errors) == 1 and errors[0]["msg"].startswith(f"discovery is off: {NO_CA}. Give ")


FAIL_AFTER_START = """
import trio
import kap.app

async def _housekeeping(self, *, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    await trio.sleep(0.3)
    raise OSError(24, "Too many open files")

kap.app.App._housekeeping = _housekeeping
"""


def test_an_error_after_the_start_is_not_called_a_failure_to_start(tmp_path: Path) -> None:
    """One line, exit 1, and words that say kap ran: "stopped on an error", not "cannot start"."""
    (tmp_path / "sitecustomize.py").write_text(FAIL_AFTER_START)  # loaded by the interpreter
    out = run_kap(*kap_args("127.0.0.1:9"), env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert "kap started" in [line["msg"] for line in lines]
    errors = [(line["msg"], line["error"]) for line in lines if line["level"] == "error"]
    assert errors == [("kap stopped on an error", "Too many open files")]
    assert "Traceback" not in out.stderr
