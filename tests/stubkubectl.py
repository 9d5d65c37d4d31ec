"""A fake kubectl for hack/issue-client-cert.sh, and the cluster it pretends to reach.

The fake is a small program put first on PATH. It records every call (one JSON
array of arguments per line), keeps the CertificateSigningRequest it was given,
and answers like a cluster would; ``KAP_STUB_MODE`` says which cluster:

- ``approve``: the certificate appears once ``kubectl certificate approve`` ran;
- ``auto``: something else approves, the certificate appears at once;
- ``deny``: the request is denied;
- ``no-access``: the API cannot be reached;
- ``never``: the signer never issues;
- ``other-key``: issues a certificate for a key that is not the request's.

Certificates are really signed, by ``openssl x509 -req`` with the cluster's CA,
from the CSR the script submitted; their serials are 4242, 4243, ... in the
order they are issued, so a test can tell a renewed certificate by its serial.
Used by tests/test_hack_cert.py and tests/test_static_pod_rotation.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import attrs

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


def next_serial():
    # 4242 for the first certificate, one more for each after it, so that
    # renewals are told apart by serial.
    counter = state / "serial"
    serial = int(counter.read_text()) + 1 if counter.exists() else 4242
    counter.write_text(str(serial))
    return serial


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
                "-CAkey", os.environ["KAP_STUB_CA_KEY"], "-set_serial", str(next_serial()),
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
    """The fake cluster: a kubectl on PATH, its CA, and what it was asked.

    The script writes into ``out`` and copies ``ca_pem`` to its ``ca.crt`` (the
    CA that signs the client certificates stands in for the cluster CA too).
    """

    root: Path
    mode: str = "approve"
    days: int = 365
    out: Path = attrs.field()

    @out.default
    def _out(self) -> Path:
        return self.root / "out"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def ca_pem(self) -> Path:
        return self.root / "ca.pem"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.root / 'bin'}:{os.environ['PATH']}",
            "HOME": str(self.root),
            "TMPDIR": str(self.tmp),  # where the script keeps its key until it is signed
            "KAP_STUB_DIR": str(self.state),
            "KAP_STUB_MODE": self.mode,
            "KAP_STUB_DAYS": str(self.days),
            "KAP_STUB_CA_CERT": str(self.ca_pem),
            "KAP_STUB_CA_KEY": str(self.ca_key),
            "KAP_CSR_POLL_INTERVAL": "0.1",
        }

    def run(self, *args: str, timeout: float = 60) -> Run:
        done = subprocess.run(
            ["bash", str(SCRIPT), "--out-dir", str(self.out), "--ca-file", str(self.ca_pem), *args],
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
        for name in ("issued.pem", "approved", "calls.jsonl", "deleted"):  # not "serial"
            (self.state / name).unlink(missing_ok=True)


def make_cluster(root: Path, ca_cert: Path, ca_key: Path) -> Cluster:
    """A fake cluster under ``root`` whose signer (and cluster CA) is ``ca_cert``/``ca_key``."""
    (root / "bin").mkdir(parents=True)
    (root / "state").mkdir()
    (root / "tmp").mkdir()
    kubectl = root / "bin" / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("{python}", sys.executable))
    kubectl.chmod(0o755)
    cluster = Cluster(root)
    shutil.copyfile(ca_cert, cluster.ca_pem)
    shutil.copyfile(ca_key, cluster.ca_key)
    return cluster
