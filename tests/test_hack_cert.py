"""hack/issue-client-cert.sh against a fake kubectl (tests/stubkubectl.py).

The fake kubectl answers like a cluster would (approving, denying, never
issuing, unreachable...) and really signs the script's CSR. These tests hold
the script to what the static pod needs: the three files kap reads in one
directory, switched all at once, no stray key, and a renewal that needs no
restart of kap (tests/test_static_pod_rotation.py checks that end to end).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import kubernetes_validate
import pytest
import trustme
from stubkubectl import SCRIPT, Cluster, make_cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.private_key_pem.write_to_path(str(tmp_path / "ca.key"))
    return make_cluster(tmp_path / "cluster", tmp_path / "ca.pem", tmp_path / "ca.key")


def openssl(*args: str) -> str:
    return subprocess.run(
        ["openssl", *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def subject(cert: Path) -> str:
    return openssl("x509", "-in", str(cert), "-noout", "-subject", "-nameopt", "RFC2253")


FILES = ("ca.crt", "cl.crt", "cl.key")  # what kap reads in --static-pod-dir


def assert_no_key_without_certificate(out: Path, expected: Sequence[str] = ()) -> None:
    """The output directory holds exactly ``expected``: no stray key, no temp files.

    Nothing is left next to it either (a half-built first directory), nor in
    TMPDIR (the key waiting for its certificate).
    """
    present = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert present == sorted(expected)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)) == (
        [out.name] if out.exists() else []
    )
    assert list((out.parent / "tmp").iterdir()) == []


def assert_published(out: Path) -> Path:
    """The layout the static pod mounts: ca.crt, cl.crt, cl.key as links through ..data.

    ``..data`` is a link to the one version directory that holds the three
    files, so switching it switches all three at once. Nothing else is left
    behind (no temp file, no earlier version). Returns the version directory.
    """
    (version,) = [p for p in out.iterdir() if p.name.startswith("..") and p.name != "..data"]
    assert_no_key_without_certificate(out, ["..data", version.name, *FILES])
    assert os.readlink(out / "..data") == version.name
    for name in FILES:
        assert os.readlink(out / name) == f"..data/{name}"
    assert sorted(p.name for p in version.iterdir()) == sorted(FILES)
    assert (out / "ca.crt").read_bytes() != b""
    return version


def serial(cert: Path) -> int:
    return int(openssl("x509", "-in", str(cert), "-noout", "-serial").partition("=")[2], 16)


# --- the happy paths ----------------------------------------------------------


def test_issues_an_approved_client_certificate(cluster: Cluster) -> None:
    done = cluster.run()
    assert done.returncode == 0, done.stderr
    crt, key = cluster.out / "cl.crt", cluster.out / "cl.key"
    assert_published(cluster.out)
    for path in (crt, key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The cluster CA, copied next to them under the name kap reads.
    assert (cluster.out / "ca.crt").read_bytes() == cluster.ca_pem.read_bytes()
    # Signed by the cluster's CA, for the user and group rbac.yaml binds, and
    # for the key next to it.
    openssl("verify", "-CAfile", str(cluster.ca_pem), str(crt))
    assert subject(crt) == "subject=CN=system:kubernetes-api-proxy,O=system:kubernetes-api-proxies"
    assert openssl("x509", "-in", str(crt), "-noout", "-pubkey") == openssl(
        "pkey", "-in", str(key), "-pubout"
    )
    assert cluster.verbs() == [
        "auth can-i",
        "create -f",
        "certificate approve",
        "get certificatesigningrequest",
        "get certificatesigningrequest",
    ]
    csr = json.loads((cluster.state / "csr.json").read_text())
    kubernetes_validate.validate(csr, kubernetes_validate.utils.latest_version(), strict=True)
    assert csr["apiVersion"] == "certificates.k8s.io/v1"
    assert csr["kind"] == "CertificateSigningRequest"
    assert csr["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client"
    assert "client auth" in csr["spec"]["usages"]
    assert csr["metadata"]["name"].startswith("kap-")
    assert "expirationSeconds" not in csr["spec"]
    assert not (cluster.state / "deleted").exists()


def test_second_run_with_a_valid_certificate_does_nothing(cluster: Cluster) -> None:
    assert cluster.run().returncode == 0
    crt = cluster.out / "cl.crt"
    before = (crt.read_bytes(), crt.stat().st_ino, (cluster.out / "cl.key").read_bytes())
    cluster.new_csr()

    done = cluster.run()

    assert done.returncode == 0, done.stderr
    assert "nothing to do" in done.stderr
    assert cluster.calls() == [], "a valid certificate needs no cluster access"
    after = (crt.read_bytes(), crt.stat().st_ino, (cluster.out / "cl.key").read_bytes())
    assert after == before


def test_quiet_prints_nothing_on_success(cluster: Cluster) -> None:
    done = cluster.run("--quiet")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    cluster.new_csr()
    done = cluster.run("-q")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert cluster.calls() == []


def test_quiet_still_reports_failures(cluster: Cluster) -> None:
    cluster.mode = "deny"
    done = cluster.run("--quiet")
    assert done.returncode == 1
    assert "was Denied" in done.stderr


def test_certificate_near_expiry_is_renewed(cluster: Cluster) -> None:
    cluster.days = 10
    assert cluster.run().returncode == 0
    crt = cluster.out / "cl.crt"
    old, old_version = crt.read_bytes(), assert_published(cluster.out)
    cluster.new_csr()
    # Ten days left is more than a five-day threshold: nothing to do.
    assert cluster.run("--renew-before", "5").returncode == 0
    assert cluster.calls() == []

    cluster.days = 365
    done = cluster.run()  # default threshold: 30 days

    assert done.returncode == 0, done.stderr
    assert crt.read_bytes() != old
    assert serial(crt) == 4243, "the second certificate the cluster issued"
    # A new version directory replaced the old one: kap's directory mount sees
    # new inodes behind the same names, so nobody has to restart it.
    assert assert_published(cluster.out) != old_version
    assert "restart" not in done.stderr
    assert "next connection" in done.stderr


def test_a_renewal_switches_certificate_and_key_in_one_rename(cluster: Cluster) -> None:
    """Every name kap reads goes through ..data: one rename, never a mixed pair."""
    cluster.days = 10
    assert cluster.run().returncode == 0
    cluster.new_csr()
    cluster.days = 365
    assert cluster.run().returncode == 0
    version = assert_published(cluster.out)
    for name in FILES:
        assert (cluster.out / name).resolve() == (version / name).resolve()
    crt, key = cluster.out / "cl.crt", cluster.out / "cl.key"
    assert openssl("x509", "-in", str(crt), "-noout", "-pubkey") == openssl(
        "pkey", "-in", str(key), "-pubout"
    )


def test_a_changed_cluster_ca_is_copied_without_a_new_certificate(cluster: Cluster) -> None:
    assert cluster.run().returncode == 0
    crt_before = (cluster.out / "cl.crt").read_bytes()
    cluster.new_csr()
    rotated = trustme.CA().cert_pem.bytes()
    cluster.ca_pem.write_bytes(rotated)

    done = cluster.run()

    assert done.returncode == 0, done.stderr
    assert cluster.calls() == [], "the certificate is still good: no request"
    assert "updated" in done.stderr
    assert (cluster.out / "ca.crt").read_bytes() == rotated
    assert (cluster.out / "cl.crt").read_bytes() == crt_before
    assert_published(cluster.out)


def test_a_pair_from_an_earlier_version_is_adopted(cluster: Cluster) -> None:
    """Versions before the directory mount wrote apl.crt and apl.key."""
    assert cluster.run().returncode == 0
    legacy = cluster.root / "legacy"
    legacy.mkdir()
    for old, new in (("cl.crt", "apl.crt"), ("cl.key", "apl.key")):
        shutil.copyfile(cluster.out / old, legacy / new)
    cluster.new_csr()

    done = cluster.run("--out-dir", str(legacy))

    assert done.returncode == 0, done.stderr
    assert cluster.calls() == [], "a valid pair needs no new certificate"
    assert (legacy / "cl.crt").read_bytes() == (legacy / "apl.crt").read_bytes()
    assert (legacy / "cl.key").read_bytes() == (legacy / "apl.key").read_bytes()
    assert "delete the apl.* files" in done.stderr


def test_a_pair_made_elsewhere_is_installed_without_cluster_access(cluster: Cluster) -> None:
    """Nodes without an admin kubeconfig: issue elsewhere, copy, install with --from."""
    assert cluster.run().returncode == 0
    copied = cluster.root / "copied"
    copied.mkdir()
    for name in ("cl.crt", "cl.key"):  # what scp or cp -L leave: plain files
        shutil.copyfile(cluster.out / name, copied / name)
    node = cluster.root / "node"
    cluster.new_csr()

    done = cluster.run("--out-dir", str(node), "--from", str(copied))

    assert done.returncode == 0, done.stderr
    assert cluster.calls() == []
    assert_published(node)
    for name in ("cl.crt", "cl.key"):
        assert (node / name).read_bytes() == (copied / name).read_bytes()
    assert (node / "ca.crt").read_bytes() == cluster.ca_pem.read_bytes()
    again = cluster.run("--out-dir", str(node), "--from", str(copied))
    assert "nothing to do" in again.stderr


def test_from_refuses_a_mismatched_pair(cluster: Cluster) -> None:
    assert cluster.run().returncode == 0
    copied = cluster.root / "copied"
    copied.mkdir()
    shutil.copyfile(cluster.out / "cl.crt", copied / "cl.crt")
    (copied / "cl.key").write_text(trustme.CA().issue_cert("x").private_key_pem.bytes().decode())
    node = cluster.root / "node"

    done = cluster.run("--out-dir", str(node), "--from", str(copied))

    assert done.returncode == 1
    assert "not a matching, unexpired pair" in done.stderr
    assert_no_key_without_certificate(node)


def test_a_missing_cluster_ca_fails_before_any_request(cluster: Cluster) -> None:
    done = cluster.run("--ca-file", str(cluster.root / "no-such-ca.crt"))
    assert done.returncode == 1
    assert "cannot read the cluster CA certificate" in done.stderr
    assert "--ca-file" in done.stderr
    assert cluster.calls() == []
    assert not cluster.out.exists()


def test_out_dir_with_a_trailing_slash(cluster: Cluster) -> None:
    done = cluster.run("--out-dir", f"{cluster.out}/")
    assert done.returncode == 0, done.stderr
    assert_published(cluster.out)


def test_no_approve_waits_for_someone_else_to_approve(cluster: Cluster) -> None:
    cluster.mode = "auto"
    done = cluster.run("--no-approve")
    assert done.returncode == 0, done.stderr
    assert "certificate approve" not in cluster.verbs()


def test_options_reach_kubectl_and_the_request(cluster: Cluster) -> None:
    done = cluster.run(
        "--kubeconfig=/etc/kubernetes/admin.conf",
        "--name",
        "kap-node-1",
        "--expiration-seconds",
        "86400",
        "--cn",
        "system:kap",
        "--group",
        "system:kaps",
        "--kubectl",
        str(cluster.root / "bin" / "kubectl"),
    )
    assert done.returncode == 0, done.stderr
    for call in cluster.calls():
        assert call[call.index("--kubeconfig") + 1] == "/etc/kubernetes/admin.conf"
    csr = json.loads((cluster.state / "csr.json").read_text())
    assert csr["metadata"]["name"] == "kap-node-1"
    assert csr["spec"]["expirationSeconds"] == 86400
    request = str(cluster.state / "request.pem")
    assert openssl("req", "-in", request, "-noout", "-subject", "-nameopt", "RFC2253") == (
        "subject=CN=system:kap,O=system:kaps"
    )


# --- bad input: non-zero, a message that says what to do, no lone key ----------


def test_no_cluster_access_fails_before_making_anything(cluster: Cluster) -> None:
    cluster.mode = "no-access"
    done = cluster.run()
    assert done.returncode == 1
    assert "cannot create CertificateSigningRequests" in done.stderr
    assert "10.0.0.1:6443 was refused" in done.stderr
    assert "--kubeconfig" in done.stderr  # the hint
    assert cluster.verbs() == ["auth can-i"]
    assert_no_key_without_certificate(cluster.out)


def test_denied_request_fails_and_leaves_no_key(cluster: Cluster) -> None:
    cluster.mode = "deny"
    done = cluster.run()
    assert done.returncode == 1
    assert "was Denied" in done.stderr
    assert "is not allowed here" in done.stderr  # the denial's own message
    assert "hint:" in done.stderr
    assert_no_key_without_certificate(cluster.out)
    assert (cluster.state / "deleted").exists(), "the useless request is cleaned up"


def test_timeout_fails_and_leaves_no_key(cluster: Cluster) -> None:
    cluster.mode = "never"
    started = time.monotonic()
    done = cluster.run("--timeout", "2")
    assert done.returncode == 1
    assert time.monotonic() - started < 15
    assert "no certificate" in done.stderr
    assert "after 2s" in done.stderr
    assert "kube-controller-manager" in done.stderr
    assert_no_key_without_certificate(cluster.out)


def test_timeout_with_no_approve_says_to_approve(cluster: Cluster) -> None:
    done = cluster.run("--no-approve", "--timeout", "1")
    assert done.returncode == 1
    assert "kubectl certificate approve" in done.stderr
    assert_no_key_without_certificate(cluster.out)


def test_certificate_for_another_key_is_refused(cluster: Cluster) -> None:
    cluster.mode = "other-key"
    done = cluster.run()
    assert done.returncode == 1
    assert "does not match" in done.stderr
    assert_no_key_without_certificate(cluster.out)


def test_failed_renewal_keeps_the_old_pair(cluster: Cluster) -> None:
    cluster.days = 10
    assert cluster.run().returncode == 0
    old = {p.name: p.read_bytes() for p in cluster.out.iterdir() if p.is_file()}
    old_version = assert_published(cluster.out)
    cluster.new_csr()
    cluster.mode = "deny"

    assert cluster.run().returncode == 1

    assert {p.name: p.read_bytes() for p in cluster.out.iterdir() if p.is_file()} == old
    assert assert_published(cluster.out) == old_version


def test_killed_while_waiting_leaves_no_key(cluster: Cluster) -> None:
    cluster.mode = "never"
    proc = subprocess.Popen(
        [
            "bash",
            str(SCRIPT),
            "--out-dir",
            str(cluster.out),
            "--ca-file",
            str(cluster.ca_pem),
            "--timeout",
            "60",
        ],
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while "get certificatesigningrequest" not in cluster.verbs():
            assert time.monotonic() < deadline, "the script never started waiting"
            time.sleep(0.05)
        # The static pod waits for the directory: it must not appear empty.
        assert not cluster.out.exists()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143
    assert_no_key_without_certificate(cluster.out)


def test_missing_kubectl_says_so(cluster: Cluster) -> None:
    done = cluster.run("--kubectl", str(cluster.root / "no-such-kubectl"))
    assert done.returncode == 1
    assert "kubectl not found" in done.stderr
    assert_no_key_without_certificate(cluster.out)


@pytest.mark.parametrize(
    "args",
    [
        ["--timeout", "soon"],
        ["--timeout"],
        ["--renew-before", "-1"],
        ["--expiration-seconds", "60"],
        ["--cn", "a/CN=root"],
        ["--name", "Not_A_Name"],
        ["--frobnicate"],
    ],
)
def test_bad_usage_exits_2_before_touching_anything(cluster: Cluster, args: list[str]) -> None:
    done = cluster.run(*args)
    assert done.returncode == 2
    assert "see --help" in done.stderr
    assert cluster.calls() == []
    assert not cluster.out.exists()


def test_help_lists_every_option() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for option in (
        "--out-dir",
        "--ca-file",
        "--quiet",
        "--from",
        "--cn",
        "--group",
        "--kubectl",
        "--kubeconfig",
        "--no-approve",
        "--timeout",
        "--renew-before",
        "--expiration-seconds",
        "--name",
    ):
        assert option in done.stdout


def test_script_is_strict_bash() -> None:
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(SCRIPT, os.X_OK), "hack/issue-client-cert.sh is not executable"


def test_shellcheck_is_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(
        [shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout
