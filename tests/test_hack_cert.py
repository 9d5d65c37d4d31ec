"""hack/issue-client-cert.sh against a fake kubectl.

The fake is a small program put first on PATH. It records every call (one JSON
array of arguments per line), keeps the CertificateSigningRequest it was given,
and answers like a cluster would; ``KAP_STUB_MODE`` says which cluster:

- ``approve``: the certificate appears once ``kubectl certificate approve`` ran;
- ``auto``: something else approves, the certificate appears at once;
- ``deny``: the request is denied;
- ``no-access``: the API cannot be reached;
- ``never``: the signer never issues;
- ``other-key``: issues a certificate for a key that is not the request's.

Certificates are really signed, by ``openssl x509 -req`` with a trustme CA,
from the CSR the script submitted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import kubernetes_validate
import pytest
import trustme

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "hack" / "issue-client-cert.sh"

FAKE_KUBECTL = r"""#!{python}
import base64, json, os, subprocess, sys
from pathlib import Path

import yaml

state = Path(os.environ["KAP_STUB_DIR"])
mode = os.environ.get("KAP_STUB_MODE", "approve")
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")

args = []
rest = iter(sys.argv[1:])
for a in rest:
    if a == "--kubeconfig":
        next(rest)
    elif not a.startswith("--request-timeout") and not a.startswith("--kubeconfig="):
        args.append(a)


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def openssl(*argv):
    subprocess.run(["openssl", *argv], check=True, capture_output=True)


def issue():
    cert = state / "issued.pem"
    if not cert.exists():
        csr = state / "request.pem"
        if mode == "other-key":
            csr = state / "other.csr"
            openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(state / "other.key"),
                    "-subj", "/O=system:kubernetes-api-proxies/CN=system:kubernetes-api-proxy",
                    "-out", str(csr))
        (state / "ext.cnf").write_text("extendedKeyUsage=clientAuth\n")
        openssl("x509", "-req", "-in", str(csr), "-CA", os.environ["KAP_STUB_CA_CERT"],
                "-CAkey", os.environ["KAP_STUB_CA_KEY"], "-set_serial", "4242",
                "-days", os.environ.get("KAP_STUB_DAYS", "365"),
                "-extfile", str(state / "ext.cnf"), "-out", str(cert))
    return base64.b64encode(cert.read_bytes()).decode()


approved = (state / "approved").exists()
if args[:2] == ["auth", "can-i"]:
    if mode == "no-access":
        fail("The connection to the server 10.0.0.1:6443 was refused")
    print("yes")
elif args[:2] == ["create", "-f"]:
    obj = yaml.safe_load(sys.stdin)
    (state / "csr.json").write_text(json.dumps(obj))
    (state / "request.pem").write_bytes(base64.b64decode(obj["spec"]["request"]))
    print("certificatesigningrequest.certificates.k8s.io/%s created" % obj["metadata"]["name"])
elif args[:2] == ["certificate", "approve"]:
    (state / "approved").touch()
    print("certificatesigningrequest.certificates.k8s.io/%s approved" % args[2])
elif args[:1] == ["get"] and args[1] in ("csr", "certificatesigningrequest"):
    jsonpath = next(a for a in args if a.startswith("jsonpath="))
    issued = mode in ("auto", "other-key") or (mode == "approve" and approved)
    if "conditions[*].type" in jsonpath:
        print("Denied" if mode == "deny" else "Approved" if issued else "", end="")
    elif "conditions[*].message" in jsonpath:
        print("CN system:kubernetes-api-proxy is not allowed here", end="")
    elif "status.certificate" in jsonpath:
        print(issue() if issued else "", end="")
    else:
        fail("fake kubectl: unknown jsonpath " + jsonpath)
elif args[:1] == ["delete"]:
    (state / "deleted").touch()
else:
    fail("fake kubectl: unexpected call %r" % (args,))
"""


@attrs.frozen
class Run:
    returncode: int
    stdout: str
    stderr: str


@attrs.define
class Cluster:
    """The fake cluster: a kubectl on PATH, its CA, and what it was asked."""

    root: Path
    ca: trustme.CA
    mode: str = "approve"
    days: int = 365

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def ca_pem(self) -> Path:
        return self.root / "ca.pem"

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.root / 'bin'}:{os.environ['PATH']}",
            "HOME": str(self.root),
            "KAP_STUB_DIR": str(self.state),
            "KAP_STUB_MODE": self.mode,
            "KAP_STUB_DAYS": str(self.days),
            "KAP_STUB_CA_CERT": str(self.ca_pem),
            "KAP_STUB_CA_KEY": str(self.root / "ca.key"),
            "KAP_CSR_POLL_INTERVAL": "0.1",
        }

    def run(self, *args: str, timeout: float = 60) -> Run:
        done = subprocess.run(
            ["bash", str(SCRIPT), "--out-dir", str(self.out), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Run(done.returncode, done.stdout, done.stderr)

    def calls(self) -> list[list[str]]:
        path = self.state / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def verbs(self) -> list[str]:
        """Each call as its first two words, kubectl's global flags left out."""
        verbs = []
        for call in self.calls():
            words = [w for w in call if not w.startswith("--request-timeout")]
            if words[:1] == ["--kubeconfig"]:
                words = words[2:]
            verbs.append(" ".join(words[:2]))
        return verbs

    def new_csr(self) -> None:
        """Forget the last request, as a fresh CSR object on the cluster would."""
        for name in ("issued.pem", "approved", "calls.jsonl", "deleted"):
            (self.state / name).unlink(missing_ok=True)


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    (tmp_path / "bin").mkdir()
    (tmp_path / "state").mkdir()
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("{python}", sys.executable))
    kubectl.chmod(0o755)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.private_key_pem.write_to_path(str(tmp_path / "ca.key"))
    return Cluster(tmp_path, ca)


def openssl(*args: str) -> str:
    return subprocess.run(
        ["openssl", *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def subject(cert: Path) -> str:
    return openssl("x509", "-in", str(cert), "-noout", "-subject", "-nameopt", "RFC2253")


def assert_no_key_without_certificate(out: Path, expected: Sequence[str] = ()) -> None:
    """The output directory holds exactly ``expected``: no stray key, no temp files."""
    present = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert present == sorted(expected)


# --- the happy paths ----------------------------------------------------------


def test_issues_an_approved_client_certificate(cluster: Cluster) -> None:
    done = cluster.run()
    assert done.returncode == 0, done.stderr
    crt, key = cluster.out / "apl.crt", cluster.out / "apl.key"
    assert_no_key_without_certificate(cluster.out, ["apl.crt", "apl.key"])
    for path in (crt, key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
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
    crt = cluster.out / "apl.crt"
    before = (crt.read_bytes(), crt.stat().st_ino, (cluster.out / "apl.key").read_bytes())
    cluster.new_csr()

    done = cluster.run()

    assert done.returncode == 0, done.stderr
    assert "nothing to do" in done.stderr
    assert cluster.calls() == [], "a valid certificate needs no cluster access"
    after = (crt.read_bytes(), crt.stat().st_ino, (cluster.out / "apl.key").read_bytes())
    assert after == before


def test_certificate_near_expiry_is_renewed(cluster: Cluster) -> None:
    cluster.days = 10
    assert cluster.run().returncode == 0
    old = (cluster.out / "apl.crt").read_bytes()
    cluster.new_csr()
    # Ten days left is more than a five-day threshold: nothing to do.
    assert cluster.run("--renew-before", "5").returncode == 0
    assert cluster.calls() == []

    cluster.days = 365
    done = cluster.run()  # default threshold: 30 days

    assert done.returncode == 0, done.stderr
    assert (cluster.out / "apl.crt").read_bytes() != old
    assert "restart kap" in done.stderr
    assert_no_key_without_certificate(cluster.out, ["apl.crt", "apl.key"])


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
    old = {p.name: p.read_bytes() for p in cluster.out.iterdir()}
    cluster.new_csr()
    cluster.mode = "deny"

    assert cluster.run().returncode == 1

    assert {p.name: p.read_bytes() for p in cluster.out.iterdir()} == old


def test_killed_while_waiting_leaves_no_key(cluster: Cluster) -> None:
    cluster.mode = "never"
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--out-dir", str(cluster.out), "--timeout", "60"],
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
