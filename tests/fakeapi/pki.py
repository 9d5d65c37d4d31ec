"""The fake control plane's PKI: a trustme CA, server and client certificates, a token.

Tests share one PKI per session (``conftest.pki``); a fake started as a process
reads the same directory (``--ca-dir``), so the file names below are the
contract between the two.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import attrs

# File names inside a PKI directory (what conftest writes and --ca-dir reads).
CA_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"  # lets a test issue more certificates (expired, rotated)
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
CLIENT_CERT_FILE = "cl.crt"
CLIENT_KEY_FILE = "cl.key"
TOKEN_FILE = "token"


@attrs.frozen
class PkiFiles:
    """The certificate files of a test control plane, all in one directory.

    The server certificate is valid for ``kubernetes.default.svc``,
    ``kubernetes``, ``localhost``, 127.0.0.1..127.0.0.9 and ::1; the client
    certificate (CN ``system:kap``, O ``kap:nodes``) is issued by the same CA.
    """

    dir: Path

    @property
    def ca_file(self) -> Path:
        return self.dir / CA_FILE

    @property
    def server_cert_file(self) -> Path:
        return self.dir / SERVER_CERT_FILE

    @property
    def server_key_file(self) -> Path:
        return self.dir / SERVER_KEY_FILE

    @property
    def client_cert_file(self) -> Path:
        return self.dir / CLIENT_CERT_FILE

    @property
    def client_key_file(self) -> Path:
        return self.dir / CLIENT_KEY_FILE

    @property
    def token_file(self) -> Path:
        return self.dir / TOKEN_FILE

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def server_ssl_context(self) -> ssl.SSLContext:
        """TLS as kube-apiserver does it: client certificates asked for, not required.

        Whether a request without one is refused is decided per request (403),
        not at the handshake, so kap can tell "alive but refused" from "dead".
        """
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_file))
        ctx.load_cert_chain(self.server_cert_file, self.server_key_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def client_ssl_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        """A client context trusting the test CA, optionally presenting ``cl.crt``."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert:
            ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
        return ctx


# What a kubeadm apiserver certificate carries, plus the loopback addresses
# tests run fake apiservers on (127.0.0.1..9 share one port, as slices do).
SERVER_NAMES = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "localhost",
    *(f"127.0.0.{i}" for i in range(1, 10)),
    "::1",
)


def create_pki(directory: Path) -> PkiFiles:
    """Write a trustme CA, a server and a client certificate and a token into ``directory``.

    The client certificate has CN ``system:kap`` and O ``kap:nodes``, as a
    node's static pod would hold.
    """
    import secrets

    import trustme

    ca = trustme.CA(organization_name="kap test CA")
    ca.cert_pem.write_to_path(str(directory / CA_FILE))
    ca.private_key_pem.write_to_path(str(directory / CA_KEY_FILE))
    server = ca.issue_cert(*SERVER_NAMES, common_name="kube-apiserver")
    server.cert_chain_pems[0].write_to_path(str(directory / SERVER_CERT_FILE))
    server.private_key_pem.write_to_path(str(directory / SERVER_KEY_FILE))
    client = ca.issue_cert("kap.test", common_name="system:kap", organization_name="kap:nodes")
    client.cert_chain_pems[0].write_to_path(str(directory / CLIENT_CERT_FILE))
    client.private_key_pem.write_to_path(str(directory / CLIENT_KEY_FILE))
    (directory / TOKEN_FILE).write_text(f"kap-test-{secrets.token_hex(16)}\n")
    return PkiFiles(directory)
