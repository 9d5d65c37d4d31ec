"""Client certificates with a chosen expiry, issued by a test PKI's own CA.

trustme issues a leaf with ``not_after`` but cannot adopt the CA a
``PkiFiles`` directory already holds (the fakes trust that one), so the
certificate is made here with ``cryptography`` from ``ca.crt`` and ``ca.key``.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fakeapi import CA_KEY_FILE, PkiFiles


def issue_client_cert(pki: PkiFiles, cert_file: Path, key_file: Path, *, days: float) -> float:
    """Write a client certificate (CN ``system:kap``) expiring in ``days``; return when (Unix)."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key((pki.dir / CA_KEY_FILE).read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_after = now + datetime.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kap:nodes"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "system:kap"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(not_after)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp_key, tmp_cert = key_file.with_suffix(".tmp-key"), cert_file.with_suffix(".tmp-crt")
    tmp_key.write_bytes(key_pem)
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp_key.replace(key_file)  # the key first: a reload between the two sees a mismatch
    tmp_cert.replace(cert_file)  # and keeps the last good context (kap.credentials)
    return not_after.timestamp()
