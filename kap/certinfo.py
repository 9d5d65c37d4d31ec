"""When the certificates kap loads expire: the client certificate and the CA bundle.

A static pod's client certificate lasts a year; once it has expired the
apiservers refuse it and discovery stops without a sound. ``/metrics``
(``kap_client_certificate_expiry_timestamp_seconds``,
``kap_ca_certificate_expiry_timestamp_seconds``) and ``/upstreams``'
problems show the expiry ahead of time, read from the same files at the
moment kap loads them into its TLS context (``kap.credentials``), so they
describe what kap presents, not what lies on disk.

The standard library's ``ssl`` parses only a peer's certificate, never a
file's, hence ``cryptography``; it is imported on the first call (39 ms of
imports, ``python -X importtime -c 'import cryptography.x509'``, kept out of
kap's start-up; the context is loaded at the first probe anyway).

A file that does not parse gives None (unknown): kap's TLS loading, not this,
decides whether a file is usable, and an expiry is never worth a failure.
"""

from __future__ import annotations

import re

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def pem_not_afters(data: bytes) -> list[float]:
    """The notAfter (Unix time) of each PEM certificate in ``data``, in order.

    Blocks that do not parse are skipped; anything around the blocks (keys,
    comments) is ignored.
    """
    from cryptography import x509

    out = []
    for block in _PEM_CERT.findall(data):
        try:
            cert = x509.load_pem_x509_certificate(block)
        except ValueError:
            continue
        out.append(cert.not_valid_after_utc.timestamp())
    return out


def leaf_not_after(path: str) -> float | None:
    """When the first certificate in ``path`` (the one presented) expires; None if unknown."""
    found = _read(path)
    return found[0] if found else None


def earliest_not_after(path: str) -> float | None:
    """When the first certificate of the bundle in ``path`` to expire does; None if unknown."""
    found = _read(path)
    return min(found) if found else None


def _read(path: str) -> list[float]:
    try:
        with open(path, "rb") as fh:
            return pem_not_afters(fh.read())
    except OSError:
        return []
