"""Credentials that never leak: presented only to verified apiservers, never weakened.

The fake apiserver counts, server side, the TLS handshakes it completed, the
requests it answered, and how many of them carried an Authorization header
or came on a connection with a client certificate.
"""

from __future__ import annotations

import os
import shutil
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from fakeapi import FakeApiServer, PkiFiles, create_pki
from kaptest import (
    FAST,
    StartFake,
    get_json,
    kap_args,
    kap_process,
    make_config,
    start_kap,
    upstream,
    wait_until,
)
from loguru import logger

from kap.cli import readable
from kap.config import Credentials, parse_config
from kap.credentials import NO_CA, CredentialFiles, check_files

# ---- CredentialFiles, no network ------------------------------------------------


def copy_pki(pki: PkiFiles, to: Path, *names: str) -> Path:
    to.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(pki.dir / name, to / name)
    return to


def test_without_a_ca_nothing_is_presented(pki: PkiFiles) -> None:
    creds = CredentialFiles(
        Credentials(
            cert_file=str(pki.client_cert_file),
            key_file=str(pki.client_key_file),
            token_file=str(pki.token_file),
        )
    )
    assert creds.headers() == {}
    assert not creds.authenticated and creds.unverified_reason == NO_CA
    assert creds.ssl_context().verify_mode == ssl.CERT_NONE


def test_with_a_ca_the_token_is_presented(pki: PkiFiles) -> None:
    creds = CredentialFiles(Credentials(ca_file=str(pki.ca_file), token_file=str(pki.token_file)))
    assert creds.headers() == {"Authorization": f"Bearer {pki.token}"}
    assert creds.authenticated and creds.unverified_reason is None
    ctx = creds.ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_files_that_turn_bad_keep_the_last_good_context_and_token(
    pki: PkiFiles, tmp_path: Path
) -> None:
    d = copy_pki(pki, tmp_path / "k", "ca.crt", "cl.crt", "cl.key", "token")
    creds = CredentialFiles(
        Credentials(
            ca_file=str(d / "ca.crt"),
            cert_file=str(d / "cl.crt"),
            key_file=str(d / "cl.key"),
            token_file=str(d / "token"),
        )
    )
    ctx, generation = creds.ssl_context(), creds.generation
    headers = creds.headers()
    (d / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nhalf a rotation")
    (d / "cl.key").write_text("garbage")
    (d / "token").write_text("two words\n")
    assert creds.ssl_context() is ctx and creds.generation == generation
    assert creds.headers() == headers
    (d / "ca.crt").unlink()
    assert creds.ssl_context() is ctx
    # A good rotation is taken.
    copy_pki(pki, d, "ca.crt", "cl.key")
    assert creds.ssl_context() is not ctx and creds.generation == generation + 1


def test_a_ca_that_never_loaded_trusts_nothing(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate")
    creds = CredentialFiles(Credentials(ca_file=str(ca), token_file="/nonexistent"))
    ctx = creds.ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.get_ca_certs() == []  # every handshake fails: never a context that verifies nothing


@pytest.mark.parametrize(
    ("files", "field", "why"),
    [
        ({"ca_file": "garbage"}, "ca_file", "not a PEM CA bundle"),
        ({"ca_file": "missing"}, "ca_file", "No such file"),
        ({"cert_file": "cl.crt", "key_file": "ca.crt"}, "cert_file", "not a PEM certificate"),
        ({"cert_file": "cl.crt", "key_file": "missing"}, "cert_file", "No such file"),
        ({"token_file": "empty"}, "token_file", "empty"),
        ({"token_file": "binary"}, "token_file", "not ASCII"),
        ({"token_file": "garbage"}, "token_file", "not a single token"),
    ],
)
def test_check_files_says_why_a_file_does_not_load(
    pki: PkiFiles, tmp_path: Path, files: dict[str, str], field: str, why: str
) -> None:
    d = copy_pki(pki, tmp_path / "k", "ca.crt", "cl.crt")
    (d / "garbage").write_text("some garbage\n")
    (d / "empty").write_text("\n")
    (d / "binary").write_bytes(b"\xff\xfe")
    problems = check_files(Credentials(**{k: str(d / v) for k, v in files.items()}))
    assert list(problems) == [field] and why in problems[field]
    assert (
        check_files(
            Credentials(
                ca_file=str(pki.ca_file),
                cert_file=str(pki.client_cert_file),
                key_file=str(pki.client_key_file),
                token_file=str(pki.token_file),
            )
        )
        == {}
    )


# ---- against a fake apiserver: counted from the server side -----------------------


def seen(fake: FakeApiServer) -> dict[str, int]:
    return {
        "connections": fake.connections_total,
        "handshakes": fake.tls_handshakes,
        "requests": len(fake.requests),
        "with_token": fake.bearer_requests,
        "with_client_cert": fake.client_cert_requests,
    }


async def test_no_ca_file_probes_go_unauthenticated_and_discovery_is_off(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a", require_token=pki.token)
    config = make_config(
        None,
        fallback_upstreams=f"127.0.0.1:{a.address[1]}",
        token_file=str(pki.token_file),
        cert_file=str(pki.client_cert_file),
        key_file=str(pki.client_key_file),
        discovery="true",
        discover_period="200ms",
    )
    app, _ = await start_kap(nursery, config)
    # A 401 still means alive.
    await wait_until(lambda: upstream(app, a).usable and a.probe_count() >= 5)
    counts = seen(a)
    print("no CA file:", counts)
    assert counts["handshakes"] >= 1 and counts["requests"] >= 5
    assert counts["with_token"] == 0 and counts["with_client_cert"] == 0
    assert app.discovery is not None and app.discovery.status()["mode"] == "off"


async def test_an_apiserver_from_another_ca_gets_no_credentials(
    nursery: trio.Nursery, pki: PkiFiles, tmp_path: Path
) -> None:
    other = FakeApiServer(name="other", pki=create_pki(tmp_path), require_token=pki.token)
    await nursery.start(other.run)
    assert other.address is not None
    config = make_config(
        pki,
        fallback_upstreams=f"127.0.0.1:{other.address[1]}",
        token_file=str(pki.token_file),
        cert_file=str(pki.client_cert_file),
        key_file=str(pki.client_key_file),
    )
    app, _ = await start_kap(nursery, config)
    await wait_until(lambda: other.connections_total >= 3 and other.connection_errors >= 3)
    assert not upstream(app, other).usable
    counts = seen(other)
    print("another CA:", counts)
    assert counts["handshakes"] == 0 and counts["requests"] == 0 and counts["with_token"] == 0


async def test_a_ca_file_that_never_loads_sends_nothing(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, tmp_path: Path
) -> None:
    # At start the CLI refuses a garbage --ca-file (exit 2, see test_cli); a
    # file that is garbage by its first use (replaced between the check and the
    # first probe) must not fall back to a context that verifies nothing.
    a = await start_fake("a", require_token=pki.token)
    garbage = tmp_path / "ca.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
    config = make_config(
        None,
        fallback_upstreams=f"127.0.0.1:{a.address[1]}",
        ca_file=str(garbage),
        token_file=str(pki.token_file),
        cert_file=str(pki.client_cert_file),
        key_file=str(pki.client_key_file),
    )
    app, _ = await start_kap(nursery, config)
    await wait_until(lambda: a.connections_total >= 3 and a.connection_errors >= 3)
    assert not upstream(app, a).usable
    counts = seen(a)
    print("garbage CA file:", counts)
    assert counts["handshakes"] == 0 and counts["requests"] == 0 and counts["with_token"] == 0


async def test_a_rotation_to_garbage_keeps_the_old_credentials(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, tmp_path: Path
) -> None:
    d = copy_pki(pki, tmp_path / "k", "ca.crt", "cl.crt", "cl.key")
    a = await start_fake("a", require_client_cert=True)
    config = make_config(
        None,
        fallback_upstreams=f"127.0.0.1:{a.address[1]}",
        ca_file=str(d / "ca.crt"),
        cert_file=str(d / "cl.crt"),
        key_file=str(d / "cl.key"),
    )
    app, _ = await start_kap(nursery, config)
    await wait_until(lambda: any(r.user == "system:kap" for r in a.requests))
    generation = app.credentials.generation
    (d / "ca.crt").write_text("garbage")
    (d / "cl.crt").write_text("garbage")
    before = len(a.requests)
    a.drop_connections()  # kap must open new connections, with whatever it now holds
    await wait_until(lambda: a.tls_handshakes >= 2 and len(a.requests) >= before + 3)
    assert all(r.user == "system:kap" for r in a.requests[before:])
    assert app.credentials.generation == generation
    assert upstream(app, a).usable


@pytest.fixture
def errors() -> Iterator[list[str]]:
    """The messages of every error logged during the test."""
    records: list[str] = []
    sink = logger.add(lambda m: records.append(m.record["message"]), level="ERROR")
    yield records
    logger.remove(sink)


async def test_static_pod_client_certificate_is_used_once_it_appears(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, tmp_path: Path, errors: list[str]
) -> None:
    d = copy_pki(pki, tmp_path / "kap", "ca.crt")  # cl.crt and cl.key not there yet
    a = await start_fake("a", require_client_cert=True)
    raw = {
        **FAST,
        "fallback_upstreams": f"127.0.0.1:{a.address[1]}",
        "as_static_pod": "true",
        "static_pod_dir": str(d),
    }
    config = parse_config(raw, environ={}, readable=readable, check=check_files)
    assert config.credentials.cert_file == str(d / "cl.crt")
    app, _ = await start_kap(nursery, config)
    # Anonymous is refused (403), but alive.
    await wait_until(lambda: upstream(app, a).usable and a.probe_count() >= 2)
    assert a.client_cert_requests == 0
    assert errors == [
        "cannot load the client certificate; kap goes without it until it loads"
    ]  # one line
    copy_pki(pki, d, "cl.key", "cl.crt")
    await wait_until(lambda: any(r.user == "system:kap" for r in a.requests))
    assert upstream(app, a).usable


# ---- files that are not regular files: never block the loop -----------------------


def released(fifo: Path) -> None:
    """Let go of anything blocked opening or reading ``fifo`` (old code hangs there)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader waiting in open()
        fd = os.open(fifo, os.O_RDWR)
    os.close(fd)


def in_a_thread(fn: Callable[[], object], fifo: Path) -> object:
    """``fn()``, failing (not hanging) the test when it blocks on ``fifo``."""
    box: list[object] = []
    thread = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    thread.start()
    thread.join(HANG_GUARD)
    if thread.is_alive():
        released(fifo)
        thread.join()
        pytest.fail(f"blocked on the FIFO {fifo}")
    return box[0]


HANG_GUARD = 10.0  # seconds: the calls below take microseconds unless they block


def test_files_replaced_by_a_fifo_keep_the_last_good_ones_without_blocking(
    pki: PkiFiles, tmp_path: Path, errors: list[str]
) -> None:
    d = copy_pki(pki, tmp_path / "k", "ca.crt", "cl.crt", "cl.key", "token")
    creds = CredentialFiles(
        Credentials(
            ca_file=str(d / "ca.crt"),
            cert_file=str(d / "cl.crt"),
            key_file=str(d / "cl.key"),
            token_file=str(d / "token"),
        )
    )
    ctx, headers = creds.ssl_context(), creds.headers()
    for name in ("token", "cl.key", "ca.crt"):
        (d / name).unlink()
        os.mkfifo(d / name)
        assert in_a_thread(creds.headers, d / name) == headers
        assert in_a_thread(creds.ssl_context, d / name) is ctx
    assert errors == [  # one line per change
        "cannot read token file; keeping the last one",
        "cannot load TLS credentials; keeping the previous ones",
        "cannot load TLS credentials; keeping the previous ones",
    ]


@pytest.mark.parametrize("field", ["ca_file", "cert_file", "token_file"])
def test_check_files_refuses_a_fifo_without_blocking(
    pki: PkiFiles, tmp_path: Path, field: str
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    files = {"ca_file": str(pki.ca_file), field: str(fifo)}
    if field == "cert_file":
        files["key_file"] = str(pki.client_key_file)
    problems = in_a_thread(lambda: check_files(Credentials(**files)), fifo)
    assert problems == {field: "not a regular file (a FIFO)"}


async def test_a_token_file_replaced_by_a_fifo_does_not_stop_kap(
    start_fake: StartFake, pki: PkiFiles, tmp_path: Path
) -> None:
    """The real process: its loop (data path, health server) keeps running."""
    a = await start_fake("a", require_token=pki.token)
    d = copy_pki(pki, tmp_path / "k", "token")
    args = kap_args(f"127.0.0.1:{a.address[1]}", pki, token_file=str(d / "token"),
                    health_interval="100ms")  # fmt: skip
    async with kap_process(*args) as kap:
        await wait_until(lambda: a.bearer_requests >= 1)
        (d / "token").unlink()
        os.mkfifo(d / "token")
        try:
            probes = a.probe_count()
            with trio.fail_after(HANG_GUARD):
                while a.probe_count() < probes + 5 or not kap.find(
                    "cannot read token file; keeping the last one"
                ):
                    await trio.sleep(0.05)
                assert (await get_json(kap.health, "/upstreams"))["upstreams"][0]["healthy"]
        finally:
            released(d / "token")  # old code: kap is blocked in open() on it
