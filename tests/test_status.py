"""``kap status``: where it asks, what it prints, its exit status, against a real kap."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from fakeapi import PkiFiles
from kaptest import StartFake, kap_args, kap_process, make_config, start_kap, wait_until
from test_invocation import fake_proc

from kap import status
from kap.invocation import Invocation, running_kap
from kap.status import Target, render, target

ROOT = Path(__file__).resolve().parent.parent
CLEAN_ENV = {
    k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_") and k != "HEALTH_LISTEN"
}
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def upstream(address: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "address": address,
        "sources": ["discovery", "flag"],
        "healthy": True,
        "probed": True,
        "score": 3,
        "tier": 2,
        "latency_ms": 1.834,
        "last_error": None,
        "auth_refused": False,
        "suspect": False,
        "active_connections": 4,
        "connections_total": 120,
        "dial_failures_total": 0,
        "probes_total": 360,
        "probe_failures_total": 1,
        "transitions_total": 1,
        "unhealthy_for_s": None,
        "held_down_for_s": None,
        "removal_in_s": None,
    }
    return base | fields


DISCOVERY = {
    "mode": "watch",
    "credentials": "serviceaccount",
    "last_success_unix": NOW - 12,
    "last_error": None,
    "failing_since_unix": None,
    "errors_total": 0,
    "lists_total": 42,
    "slices": 1,
    "addresses": ["10.0.0.11:6443", "10.0.0.12:6443"],
    "source_upstream": "10.0.0.12:6443",
    "resource_version": "48213",
}

DOC: dict[str, Any] = {
    "problems": [],
    "upstreams": [
        upstream("10.0.0.11:6443"),
        upstream(
            "10.0.0.12:6443",
            sources=["discovery"],
            healthy=False,
            score=-2,
            tier=None,
            latency_ms=None,
            last_error="connect: connection refused " + "x" * 60,
            active_connections=0,
            connections_total=7,
            suspect=True,
            unhealthy_for_s=75.5,
            held_down_for_s=10.0,
        ),
    ],
    "fallback_service": "10.96.0.1:443",
    "best_tier": 2,
    "discovery": DISCOVERY,
}


# ---- formatting ------------------------------------------------------------------


def test_table_lists_every_upstream_then_discovery_then_problems() -> None:
    assert render(DOC, "table", NOW).splitlines() == [
        "ADDRESS          HEALTHY   SCORE   TIER     LATENCY   ACTIVE   TOTAL   SOURCES"
        "          LAST ERROR",
        "10.0.0.11:6443   true      3       2        1.8ms     4        120     discovery,flag"
        "   <none>",
        "10.0.0.12:6443   false     -2      <none>   <none>    0        7       discovery"
        "        connect: connection refused " + "x" * 29 + "...",
        "discovery: watch via 10.0.0.12:6443, 2 addresses, last success 12s ago",
        "problems: none",
    ]


def test_wide_adds_every_field_and_the_whole_error() -> None:
    lines = render(DOC, "wide", NOW).splitlines()
    header = lines[0].split("   ")
    assert [h.strip() for h in header if h.strip()] == [
        "ADDRESS", "HEALTHY", "SCORE", "TIER", "LATENCY", "ACTIVE", "TOTAL", "SOURCES",
        "PROBED", "SUSPECT", "AUTH REFUSED", "PROBES", "PROBE FAILURES", "DIAL FAILURES",
        "TRANSITIONS", "UNHEALTHY FOR", "HELD DOWN", "REMOVAL IN", "LAST ERROR",
    ]  # fmt: skip
    assert lines[2].endswith("connect: connection refused " + "x" * 60)
    assert " 1m15s " in lines[2] and " 10s " in lines[2] and " true " in lines[2]


def test_json_is_the_document() -> None:
    assert json.loads(render(DOC, "json", NOW)) == DOC


@pytest.mark.parametrize(
    ("discovery", "line"),
    [
        (None, "discovery: off (--discovery=false)"),
        ({"mode": "off", "last_error": "no CA"}, "discovery: off: no CA"),
        (
            DISCOVERY | {"last_success_unix": None, "source_upstream": None, "addresses": []},
            "discovery: watch, 0 addresses, no success yet",
        ),
        (
            DISCOVERY
            | {
                "mode": "backoff",
                "last_success_unix": NOW - 3700,
                "failing_since_unix": NOW - 3650,
                "errors_total": 9,
                "last_error": "HTTP 403: forbidden",
            },
            "discovery: backoff via 10.0.0.12:6443, 2 addresses, last success 1h1m ago, "
            "failing since 2027-01-15T06:59:10Z (9 errors in all): HTTP 403: forbidden",
        ),
    ],
)
def test_discovery_line(discovery: dict[str, Any] | None, line: str) -> None:
    assert status.discovery_line(discovery, NOW) == line


def test_one_line_per_problem_and_no_upstreams() -> None:
    doc = {"upstreams": [], "problems": ["no upstream usable: kap knows no upstream", "b"]}
    assert render(doc, "table", NOW).splitlines() == [
        "No upstreams.",
        "discovery: off (--discovery=false)",
        "problem: no upstream usable: kap knows no upstream",
        "problem: b",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (60, "1m"), (200, "3m20s"), (3600, "1h"), (7500, "2h5m"),
     (86400 * 3 + 3600 * 4 + 5, "3d4h")],
)  # fmt: skip
def test_age(seconds: float, text: str) -> None:
    assert status.age(seconds) == text


@pytest.mark.parametrize(
    ("ms", "text"), [(None, "<none>"), (0.25, "250us"), (1.834, "1.8ms"), (1500, "1.50s")]
)
def test_latency(ms: float | None, text: str) -> None:
    assert status.latency(ms) == text


# ---- where to ask ----------------------------------------------------------------

PID1_6480 = Invocation(("--listen-addr=127.0.0.1", "--health-listen=:6480"), {})


def no_pid1() -> Invocation | None:
    return None


@pytest.mark.parametrize(
    ("address", "health_listen", "pid1", "expected"),
    [
        ("10.0.0.5:6480", ":1", PID1_6480, Target("10.0.0.5", 6480, "--address")),
        ("[::1]:6480", None, None, Target("::1", 6480, "--address")),
        ("localhost:6480", None, None, Target("localhost", 6480, "--address")),
        (None, ":6480", PID1_6480, Target("127.0.0.1", 6480, "--health-listen")),
        (None, "0.0.0.0:9", None, Target("127.0.0.1", 9, "--health-listen")),
        (None, "[::]:9", None, Target("::1", 9, "--health-listen")),
        (None, "10.1.2.3:9", None, Target("10.1.2.3", 9, "--health-listen")),
        (None, None, PID1_6480, Target("127.0.0.1", 6480, "PID 1's --health-listen")),
        (None, None, Invocation((), {"HEALTH_LISTEN": ":7"}),
         Target("127.0.0.1", 7, "PID 1's --health-listen")),
        (None, None, Invocation((), {}), Target("127.0.0.1", 8080, "PID 1's default")),
        (None, None, None, Target("127.0.0.1", 8080, "the default")),
    ],
)  # fmt: skip
def test_where_to_ask(
    address: str | None, health_listen: str | None, pid1: Invocation | None, expected: Target
) -> None:
    assert target(address, health_listen, lambda: pid1) == expected


@pytest.mark.parametrize("bad", ["x", "host", ":80", "h:0", "h:99999", "[::1]80"])
def test_a_bad_address_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="expected host:port"):
        target(bad, None, no_pid1)


def manifest_container(name: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all((ROOT / "deploy" / name).read_text()):
        spec = doc["spec"]
        spec = spec["template"]["spec"] if "template" in spec else spec
        (container,) = spec["containers"]
        return container  # type: ignore[no-any-return]
    raise AssertionError(name)


@pytest.mark.parametrize("manifest", ["daemonset.yaml", "static-pod.yaml"])
def test_inside_each_shipped_manifest_status_asks_the_health_port(
    tmp_path: Path, manifest: str
) -> None:
    """``kubectl exec <kap pod> -- kap status``: PID 1 runs the image's entry point with
    the manifest's args; the probes' port is where ``kap status`` asks."""
    container = manifest_container(manifest)
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    argv = ["/opt/kap/bin/python", "/opt/kap/bin/kap", *container["args"]]
    proc = fake_proc(tmp_path, argv, env)
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "health"]
    probe = container["livenessProbe"]["httpGet"]["port"]
    assert probe in ("health", port)
    found = target(None, None, lambda: running_kap(proc))
    assert (found.host, found.port) == ("127.0.0.1", port)


# ---- against a real kap -------------------------------------------------------------


async def kap_status(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = await trio.run_process(
        [sys.executable, "-m", "kap", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**CLEAN_ENV, **(env or {})},
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


async def wait_for_log(kap: Any, msg: str) -> dict[str, Any]:
    with trio.fail_after(15):
        while not kap.find(msg):
            await trio.sleep(0.02)
    return kap.find(msg)[0]  # type: ignore[no-any-return]


async def test_a_kap_without_problems_exits_0(start_fake: StartFake) -> None:
    a = await start_fake("a")
    up = f"127.0.0.1:{a.address[1]}"
    async with kap_process(*kap_args(up, health_interval="100ms")) as kap:
        await wait_for_log(kap, "upstream healthy")
        out = await kap_status("status", "--address", kap.health or "")
        assert (out.returncode, out.stderr) == (0, ""), out
        lines = out.stdout.splitlines()
        assert lines[0].split()[:3] == ["ADDRESS", "HEALTHY", "SCORE"]
        assert lines[1].split()[:2] == [up, "true"]
        assert lines[-2:] == ["discovery: off (--discovery=false)", "problems: none"]

        out = await kap_status("status", "-o", "json", env={"HEALTH_LISTEN": kap.health or ""})
        assert out.returncode == 0, out
        doc = json.loads(out.stdout)
        assert doc["problems"] == [] and doc["upstreams"][0]["address"] == up

        out = await kap_status("--health-listen", kap.health or "", "status", "-o", "wide")
        assert out.returncode == 0, out
        assert "PROBE FAILURES" in out.stdout.splitlines()[0]


async def test_a_kap_with_problems_exits_1_and_logged_them(start_fake: StartFake) -> None:
    with socket.socket() as s:  # a port where nothing listens: every probe is refused
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    async with kap_process(*kap_args(dead, health_interval="100ms")) as kap:
        logged = await wait_for_log(kap, "problems changed")
        assert logged["level"] == "warn"
        assert logged["problems"] == logged["new"] == ["no upstream usable (0 of 1)"]
        out = await kap_status("status", "--address", kap.health or "")
        assert out.returncode == 1, out
        assert out.stdout.splitlines()[-1] == "problem: no upstream usable (0 of 1)"
        assert dead in out.stdout


async def test_the_problem_log_line_says_when_they_are_resolved(start_fake: StartFake) -> None:
    a = await start_fake("a", readyz="500")
    async with kap_process(*kap_args(f"127.0.0.1:{a.address[1]}", health_interval="100ms")) as kap:
        await wait_for_log(kap, "problems changed")
        a.readyz = "200"
        with trio.fail_after(15):
            while len(kap.find("problems changed")) < 2:
                await trio.sleep(0.02)
        resolved = kap.find("problems changed")[1]
        assert resolved["problems"] == [] and resolved["resolved"] == [
            "no upstream usable (0 of 1)"
        ]
        assert (await kap_status("status", "--address", kap.health or "")).returncode == 0


async def test_refused_credentials_and_failing_discovery_are_problems_until_mended(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    """The silent failure: the apiserver answers every probe (401 proves it alive), so
    it is healthy, while kap's token is refused and discovery fails."""
    a = await start_fake("a", require_token="not-kaps-token")
    up = f"127.0.0.1:{a.address[1]}"
    config = make_config(
        pki,
        fallback_upstreams=up,
        discovery="true",
        discover_period="1s",
        token_file=str(pki.token_file),
    )
    app, bound = await start_kap(nursery, config)
    await wait_until(lambda: len(app.problems) == 2)
    refused, failing = app.problems
    assert refused == "credentials refused by 1 of 1 upstreams"
    assert failing.startswith("discovery failing since 20")
    out = await kap_status("status", "--address", str(bound.health))
    assert out.returncode == 1, out
    assert out.stdout.splitlines()[-2:] == [f"problem: {refused}", f"problem: {failing}"]
    assert out.stdout.splitlines()[1].split()[:2] == [up, "true"]

    a.require_token = pki.token
    await wait_until(lambda: app.problems == [])
    out = await kap_status("status", "--address", str(bound.health), "-o", "json")
    assert out.returncode == 0, out
    doc = json.loads(out.stdout)
    assert doc["problems"] == [] and doc["discovery"]["failing_since_unix"] is None
    assert doc["discovery"]["last_error"] is not None  # kept for the record


async def test_pid1s_health_port_is_asked_when_no_address_is_given(
    start_fake: StartFake, tmp_path: Path
) -> None:
    a = await start_fake("a")
    async with kap_process(*kap_args(f"127.0.0.1:{a.address[1]}")) as kap:
        await wait_for_log(kap, "upstream healthy")
        argv = ["/opt/kap/bin/python", "/opt/kap/bin/kap", "--health-listen", kap.health or ""]
        proc = fake_proc(tmp_path, argv, {})
        code = await trio.to_thread.run_sync(
            lambda: status.status(None, None, "json", "3s", proc=proc, now=lambda: NOW)
        )
        assert code == 0


async def test_nothing_listening_exits_2_with_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    out = await kap_status("status", "--address", address)
    assert (out.returncode, out.stdout) == (2, "")
    (line,) = out.stderr.splitlines()
    assert line == f"kap status: nothing answers at {address}: Connection refused " + (
        "(address from --address)"
    )


async def test_a_health_port_that_never_answers_ends_at_the_deadline() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # the kernel accepts; nobody reads or answers
        address = f"127.0.0.1:{s.getsockname()[1]}"
        with trio.fail_after(20):  # a bound on the test, not a measurement
            out = await kap_status("status", "--address", address, "--timeout", "500ms")
    assert (out.returncode, out.stdout) == (2, "")
    (line,) = out.stderr.splitlines()
    assert f"no answer from {address} within 0.5s" in line


async def test_something_else_on_the_port_exits_2(start_fake: StartFake) -> None:
    a = await start_fake("a")
    async with kap_process(*kap_args(f"127.0.0.1:{a.address[1]}")) as kap:
        listen = kap.listen or ""  # the data port relays TCP: not an HTTP /upstreams
        health = (kap.health or "").rpartition(":")[0]
        out = await kap_status("status", "--address", listen)
        assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out
        out = await kap_status("status", "--address", f"{health}:1", "--timeout", "1x")
        assert out.returncode == 2 and out.stderr.startswith("kap status: '1x'"), out


async def test_json_that_is_not_kaps_exits_2(nursery: trio.Nursery) -> None:
    """Another server's JSON with an ``upstreams`` list: one line, no traceback."""
    from kap.health import HealthServer

    server = HealthServer(
        "127.0.0.1", 0, {"/upstreams": lambda: ("application/json", b'{"upstreams": [{}]}')}
    )
    bound = await nursery.start(server.run)
    out = await kap_status("status", "--address", str(bound))
    assert (out.returncode, out.stdout) == (2, ""), out
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"kap status: {bound} answered /upstreams without 'address'")


@pytest.mark.parametrize("args", [["-o", "yaml"], ["--address", "nope"], ["--frobnicate"]])
async def test_bad_flags_exit_2(args: list[str]) -> None:
    out = await kap_status("status", *args)
    assert out.returncode == 2 and out.stdout == "", out
