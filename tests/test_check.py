"""``kap check``: the verdicts (tables), and the command against fake apiservers with real TLS."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio
import trustme
import yaml
from click.testing import CliRunner
from fakeapi import FakeApiServer, PkiFiles, SliceStore, endpoint_slice
from kaptest import StartFake

from kap import check
from kap.cli import main
from kap.config import OPTIONS

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "KUBECONFIG"))}


# ---- the verdicts (pure) -----------------------------------------------------------


def test_check_help_lists_every_flag_of_kap() -> None:
    result = CliRunner().invoke(main, ["check", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for opt in OPTIONS:
        assert opt.flags[0] in result.output and opt.env in result.output, opt.name
    command = main.commands["check"]  # type: ignore[attr-defined]
    kap_flags = {p.name: p.opts for p in main.params if p.name != "version"}
    assert {p.name: p.opts for p in command.params if p.name in kap_flags} == kap_flags


# ---- against fake apiservers -------------------------------------------------------


def flags(pki: PkiFiles, *upstreams: FakeApiServer | str, **more: str) -> dict[str, str | None]:
    addresses = [u if isinstance(u, str) else _hostport(u) for u in upstreams]
    values: dict[str, str | None] = {
        "fallback_upstreams": ",".join(addresses),
        "ca_file": str(pki.ca_file),
        "token_file": str(pki.token_file),
        "dial_timeout": "1s",
        "health_timeout": "500ms",
    }
    values.update(more)
    return values


def _hostport(fake: FakeApiServer) -> str:
    assert fake.address is not None
    return f"{fake.address[0]}:{fake.address[1]}"


async def run_check(values: dict[str, str | None], **kwargs: Any) -> tuple[int, str, str]:
    kwargs.setdefault("flags_given", True)
    kwargs.setdefault("environ", {})
    with trio.fail_after(40):  # a bound on the test; the command bounds itself
        return await trio.to_thread.run_sync(lambda: check.check(values, **kwargs))


def failing(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("fix ")]


async def test_all_good_with_discovery_exits_0_and_checks_the_discovered_apiservers(
    start_fake: StartFake, pki: PkiFiles, slice_store: SliceStore, free_port: int
) -> None:
    a = await start_fake("a", host="127.0.0.2", port=free_port, require_token=pki.token)
    await start_fake("b", host="127.0.0.3", port=free_port, require_token=pki.token)
    slice_store.put(endpoint_slice("k", [("127.0.0.2", True), ("127.0.0.3", True)],
                                   ports=[("https", free_port)]))  # fmt: skip
    code, out, err = await run_check(flags(pki, a))
    assert (code, err, failing(out)) == (0, "", []), out
    assert f"upstream        127.0.0.3:{free_port}" in out  # found by discovery, checked too
    assert "credentials: flags" in out.splitlines()[0]
    assert out.rstrip().endswith("checks passed")


async def test_with_nothing_to_start_from_discovery_bootstraps_through_the_service(
    start_fake: StartFake, pki: PkiFiles, slice_store: SliceStore, free_port: int
) -> None:
    """No flag, file or kubeconfig upstream: kap asks the kubernetes Service, so does the check."""
    await start_fake("service", host="127.0.0.2", port=free_port, require_token=pki.token)
    await start_fake("b", host="127.0.0.3", port=free_port, require_token=pki.token)
    slice_store.put(endpoint_slice("k", [("127.0.0.3", True)], ports=[("https", free_port)]))
    service = {"KUBERNETES_SERVICE_HOST": "127.0.0.2", "KUBERNETES_SERVICE_PORT": str(free_port)}
    code, out, _ = await run_check(flags(pki), environ=service, output="json")
    doc = json.loads(out)
    assert (code, doc["ok"]) == (0, True), out
    rows = [(c["check"], c["target"], c["ok"]) for c in doc["checks"][:3]]
    assert rows == [
        ("service", f"127.0.0.2:{free_port}", True),
        ("upstream", f"127.0.0.3:{free_port}", True),
        ("discovery", f"via 127.0.0.2:{free_port} (Service)", True),
    ]


async def test_the_fallback_files_entries_are_checked_and_a_broken_file_fails(
    start_fake: StartFake, pki: PkiFiles, tmp_path: Path
) -> None:
    a = await start_fake("a", require_token=pki.token)
    path = tmp_path / "fallback.json"
    path.write_text(json.dumps([_hostport(a)]))
    values = flags(pki, discovery="false", fallback_file=str(path))
    code, out, _ = await run_check(values, output="wide")
    assert code == 0, out
    assert re.search(rf"^upstream +{_hostport(a)} +ok +file +/readyz 200", out, re.M), out
    assert "1 entries; readable and writable" in out
    path.write_text('["half')
    code, out, _ = await run_check(values)
    assert code == 1
    assert [f.split(": ")[0] for f in failing(out)] == [
        "fix upstream <none>",  # nothing else to start from
        f"fix fallback-file {path}",
    ]


async def test_an_apiserver_down_exits_1_naming_it(start_fake: StartFake, pki: PkiFiles) -> None:
    a = await start_fake("a", require_token=pki.token)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{s.getsockname()[1]}"
    code, out, _ = await run_check(flags(pki, a, down, discovery="false"))
    assert code == 1
    (fix,) = failing(out)
    assert fix.startswith(f"fix upstream {down}: is the apiserver running and reachable")
    assert "Connection refused" in out


async def test_a_wrong_token_is_credentials_refused(
    start_fake: StartFake, pki: PkiFiles, tmp_path: Path
) -> None:
    a = await start_fake("a", require_token="the-right-one")
    code, out, _ = await run_check(flags(pki, a, discovery="false"))
    assert code == 1
    assert "credentials refused: /readyz 401" in out
    (fix,) = failing(out)
    assert "refuses kap's token (credentials: flags)" in fix


async def test_readyz_500_is_not_ready(start_fake: StartFake, pki: PkiFiles) -> None:
    a = await start_fake("a", readyz="500")
    code, out, _ = await run_check(flags(pki, a, discovery="false"))
    assert code == 1 and "not ready (etcd failed" in out, out


async def test_a_certificate_from_another_ca_does_not_verify(
    start_fake: StartFake, pki: PkiFiles, tmp_path: Path
) -> None:
    a = await start_fake("a")
    other = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other))
    code, out, _ = await run_check(flags(pki, a, discovery="false", ca_file=str(other)))
    assert code == 1 and "certificate verify failed" in out, out
    (fix,) = failing(out)
    assert (
        "does not verify this apiserver's certificate for the name 'kubernetes.default.svc'" in fix
    )


async def test_discovery_forbidden_by_rbac_exits_1(
    start_fake: StartFake, pki: PkiFiles, slice_store: SliceStore
) -> None:
    a = await start_fake("a", require_token=pki.token)
    slice_store.list_error = 403
    code, out, _ = await run_check(flags(pki, a))
    assert code == 1
    (fix,) = failing(out)
    assert fix.startswith(f"fix discovery via {_hostport(a)}: kap's user may not list")
    assert "get, list and watch on endpointslices.discovery.k8s.io" in fix


async def test_discovery_off_on_purpose_is_fine(start_fake: StartFake, pki: PkiFiles) -> None:
    a = await start_fake("a", require_token=pki.token)
    code, out, _ = await run_check(flags(pki, a), no_discovery=True)
    assert code == 0, out
    assert "off on purpose (--discovery=false)" in out


async def test_json_output_parses(start_fake: StartFake, pki: PkiFiles) -> None:
    a = await start_fake("a", require_token=pki.token)
    code, out, _ = await run_check(flags(pki, a, discovery="false"), output="json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True
    assert (doc["settings"], doc["credentials"]) == (check.OWN, "flags")
    (up,) = [c for c in doc["checks"] if c["check"] == "upstream"]
    assert (up["target"], up["status"], up["result"]) == (_hostport(a), 200, "ok")
    assert up["tls_server_name"] == "kubernetes.default.svc"


async def test_the_client_certificates_subject_and_days_are_shown(
    start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a", require_client_cert=True)
    values = flags(pki, a, discovery="false", cert_file=str(pki.client_cert_file),
                   key_file=str(pki.client_key_file), token_file=None)  # fmt: skip
    code, out, _ = await run_check(values, output="wide")
    assert code == 0, out
    assert "subject CN=system:kap," in out and "O=kap:nodes, expires in" in out


# ---- the command: bad flags, PID 1's settings, black holes ----------------------------


async def kap_check(
    *args: str, env: dict[str, str] | None = None, before: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = await trio.run_process(
        [sys.executable, "-m", "kap", *(before or []), "check", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**CLEAN_ENV, **(env or {})},
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


async def test_a_bad_flag_exits_2_with_one_line() -> None:
    out = await kap_check("--dial-timeout", "soon", "--fallback-upstreams", "127.0.0.1:1")
    assert (out.returncode, out.stdout) == (2, "")
    (line,) = out.stderr.splitlines()
    assert line.startswith("kap check: invalid --dial-timeout (env DIAL_TIMEOUT): 'soon'")


async def test_kaps_flags_before_the_subcommand_count_too(pki: PkiFiles) -> None:
    """``kap --discovery=false check ...``: the group parsed that flag, check uses it."""
    args = ["--fallback-upstreams", "127.0.0.1:1", "--ca-file", str(pki.ca_file)]
    out = await kap_check(*args, before=["--discovery=false"])
    assert out.returncode == 1 and "off on purpose (--discovery=false)" in out.stdout, out
    assert out.stderr == ""  # no log lines: the rows say it all


def fake_proc(root: Path, argv: list[str], environ: dict[str, str]) -> Path:
    (root / "1").mkdir(parents=True)
    (root / "1" / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (root / "1" / "environ").write_bytes(
        b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items())
    )
    return root


async def test_given_no_flag_it_checks_pid1s_settings_not_the_operators_shell(
    start_fake: StartFake, pki: PkiFiles, tmp_path: Path
) -> None:
    """The operator's KUBECONFIG holds the right token; the running kap's a wrong one."""
    a = await start_fake("a", require_token=pki.token)
    wrong = tmp_path / "kap-token"
    wrong.write_text("not-the-token\n")
    admin = tmp_path / "admin.conf"
    admin.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "admin",
        "clusters": [{"name": "c", "cluster": {"server": a.url,
                                                "certificate-authority": str(pki.ca_file)}}],
        "users": [{"name": "admin", "user": {"token": pki.token}}],
        "contexts": [{"name": "admin", "context": {"cluster": "c", "user": "admin"}}],
    }))  # fmt: skip
    argv = ["/opt/kap/bin/python", "/opt/kap/bin/kap", "--fallback-upstreams", _hostport(a),
            "--ca-file", str(pki.ca_file), "--no-discovery"]  # fmt: skip
    proc = fake_proc(tmp_path / "proc", argv, {"TOKEN_FILE": str(wrong)})
    operator = {"KUBECONFIG": str(admin)}
    code, out, _ = await run_check({}, flags_given=False, environ=operator, proc=proc)
    assert code == 1 and "credentials refused" in out, out
    assert out.startswith(f"settings: {check.PID1}; credentials: flags")
    # The same shell, outside a kap container (PID 1 is not kap): the operator's settings.
    (tmp_path / "proc" / "1" / "cmdline").write_bytes(b"/sbin/init\0")
    code, out, _ = await run_check({}, flags_given=False, environ=operator, proc=proc)
    assert out.startswith(f"settings: {check.OWN}; credentials: kubeconfig"), out


@contextmanager
def black_hole() -> Iterator[str]:
    """A port whose accept queue is full: the kernel drops further SYNs, connects hang."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        held = []
        try:
            for _ in range(2):  # backlog 0 queues one; the next may be half-open
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(address)
                held.append(s)
            yield f"127.0.0.1:{address[1]}"
        finally:
            for s in held:
                s.close()


async def test_black_holed_upstreams_end_within_the_budget(
    start_fake: StartFake, pki: PkiFiles
) -> None:
    """One upstream that never answers TCP, one that never answers TLS: both fail on
    their deadlines, the good one is still checked, and the command ends."""
    a = await start_fake("a", require_token=pki.token)
    with socket.socket() as mute, black_hole() as dropped:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)  # the kernel completes the connect; nobody speaks TLS
        silent = f"127.0.0.1:{mute.getsockname()[1]}"
        with trio.fail_after(20):  # a bound on the test, not a measurement
            out = await kap_check(*_args(pki, a, silent, dropped))
    assert out.returncode == 1, out
    fixes = failing(out.stdout)
    assert [f.split(": ")[0] for f in fixes] == [
        f"fix upstream {silent}",
        f"fix upstream {dropped}",
    ]
    assert "TLS handshake failed: no answer within 1s" in out.stdout
    assert "no connection within --dial-timeout 1s (black-holed?)" in out.stdout


def _args(pki: PkiFiles, *upstreams: FakeApiServer | str) -> list[str]:
    values = flags(pki, *upstreams, discovery="false")
    return [f"--{name.replace('_', '-')}={value}" for name, value in values.items()]


async def test_kaps_own_listen_address_among_the_upstreams_fails_as_a_loop(
    start_fake: StartFake, pki: PkiFiles, free_port: int
) -> None:
    """kap would leave it out (kap.membership); the check says why, and names the source."""
    a = await start_fake("a")  # no token required: credentials are not the point here
    own = f"127.0.0.1:{free_port}"
    values = flags(pki, a, own, discovery="false", listen_addr="0.0.0.0",
                   listen_port=str(free_port), token_file=None)  # fmt: skip
    code, out, _ = await run_check(values)
    assert code == 1
    fix = f"fix upstream {own}: remove {own} from flag: it is kap, not an apiserver"
    assert failing(out) == [fix]
    # With a CA and no credentials, the apiserver is still verified (and said so).
    assert re.search(rf"^upstream +{_hostport(a)} +ok +.*TLS verified as", out, re.M), out
