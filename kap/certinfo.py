"""What a PEM certificate file says: subject, issuer, expiry.

The standard library's ``ssl`` loads certificates into a context but parses
none of a file's fields, so ``kap check`` reads them with ``cryptography``:
the operator wants to see which identity kap presents (its subject, which
RBAC binds) and how long it has left, before pointing the kubelet at kap.

A running kap reads the same files when it loads them into its TLS context
(``kap.credentials``), for ``kap_client_certificate_expiry_timestamp_seconds``,
``kap_ca_certificate_expiry_timestamp_seconds`` and ``/upstreams``' problems:
a static pod's client certificate lasts a year, and once it has expired the
apiservers refuse it and discovery stops without a sound. There an unreadable
or unparsable file is an unknown expiry (None), never a failure: kap's TLS
loading decides whether a file is usable.

``cryptography`` is imported on the first parse (39 ms of imports,
``python -X importtime -c 'import cryptography.x509'``, kept out of start-up;
kap builds its TLS context at the first probe).
"""

from __future__ import annotations

import attrs

from kap.files import read_regular

# A certificate file is a few KiB; a CA bundle a few hundred KiB at most.
MAX_FILE_BYTES = 4 * 1024 * 1024


class CertificateError(ValueError):
    """The file holds no PEM certificate, or is larger than any certificate file."""


@attrs.frozen
class CertInfo:
    """The first certificate of a PEM file (the leaf of a chain, or a bundle's first CA)."""

    subject: str  # RFC 4514, e.g. "O=kap:nodes,CN=system:kap"
    issuer: str
    not_after_unix: float
    count: int  # certificates in the file
    earliest_not_after_unix: float  # of any certificate in the file (a CA bundle's first to expire)

    def days_left(self, now_unix: float) -> float:
        return (self.not_after_unix - now_unix) / 86400.0


def read_certificate(path: str) -> CertInfo:
    """Parse ``path``.

    Raises:
      OSError: unreadable. CertificateError: no PEM certificate in it.
    """
    return parse_certificate(read_pem(path))


def read_pem(path: str) -> bytes:
    """The bytes of a certificate file, to parse now or later (``parse_certificate``).

    Raises:
      OSError: unreadable. CertificateError: larger than any certificate file.
    """
    data = read_regular(path, MAX_FILE_BYTES + 1)  # never waits on a FIFO
    if len(data) > MAX_FILE_BYTES:
        raise CertificateError(f"larger than {MAX_FILE_BYTES} bytes")
    return data


def parse_certificate(data: bytes) -> CertInfo:
    """Parse the PEM ``data`` of a certificate file.

    Raises:
      CertificateError: no PEM certificate in it.
    """
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateError(f"no PEM certificate: {' '.join(str(e).split())}") from None
    first = certs[0]
    return CertInfo(
        subject=first.subject.rfc4514_string(),
        issuer=first.issuer.rfc4514_string(),
        not_after_unix=first.not_valid_after_utc.timestamp(),
        count=len(certs),
        earliest_not_after_unix=min(c.not_valid_after_utc.timestamp() for c in certs),
    )


def pem_not_after(data: bytes | None, *, earliest: bool) -> float | None:
    """``leaf_not_after`` (or ``earliest_not_after``) of bytes ``read_pem`` returned."""
    if data is None:
        return None
    try:
        info = parse_certificate(data)
    except CertificateError:
        return None
    return info.earliest_not_after_unix if earliest else info.not_after_unix


def leaf_not_after(path: str) -> float | None:
    """When the first certificate in ``path`` (the one presented) expires; None if unknown."""
    try:
        return read_certificate(path).not_after_unix
    except (OSError, CertificateError):
        return None


def earliest_not_after(path: str) -> float | None:
    """When the first certificate of the bundle in ``path`` to expire does; None if unknown."""
    try:
        return read_certificate(path).earliest_not_after_unix
    except (OSError, CertificateError):
        return None
