"""Certificate expiry read from PEM files written in tmp_path (trustme)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import trustme

from kap.certinfo import (
    MAX_FILE_BYTES,
    CertificateError,
    earliest_not_after,
    leaf_not_after,
    read_certificate,
)


def _at(days: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)


def test_expiry_of_a_leaf_and_of_a_bundle_and_garbage_is_unknown(tmp_path: Path) -> None:
    ca = trustme.CA()
    soon = ca.issue_cert("a.test", not_after=_at(0.5))
    leaf = tmp_path / "leaf.pem"
    soon.cert_chain_pems[0].write_to_path(str(leaf))
    only = leaf_not_after(str(leaf))
    assert only is not None and abs(only - _at(0.5).timestamp()) < 5
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.cert_pem.bytes() + b"# comment\n" + leaf.read_bytes())
    assert earliest_not_after(str(bundle)) == only
    assert leaf_not_after(str(bundle)) != only  # the CA comes first, and lasts longer
    broken = tmp_path / "broken.pem"
    broken.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert leaf_not_after(str(broken)) is None
    assert leaf_not_after(str(tmp_path / "missing.pem")) is None


def test_the_first_certificate_is_described_and_the_bundle_counted(tmp_path: Path) -> None:
    ca = trustme.CA(organization_name="kap-ca")
    leaf = ca.issue_cert("a.test", not_after=_at(3))
    path = tmp_path / "chain.pem"
    path.write_bytes(leaf.cert_chain_pems[0].bytes() + ca.cert_pem.bytes())  # leaf, then CA
    info = read_certificate(str(path))
    assert info.count == 2
    assert "O=kap-ca" in info.issuer and "O=kap-ca" not in info.subject
    assert info.earliest_not_after_unix == info.not_after_unix
    assert round(info.days_left(_at(0).timestamp())) == 3


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "no PEM certificate"),
        (b"not pem at all\n", "no PEM certificate"),
        (b"#" * (MAX_FILE_BYTES + 1), "larger than"),
    ],
)
def test_a_file_without_a_certificate_is_one_line(
    tmp_path: Path, content: bytes, says: str
) -> None:
    path = tmp_path / "x.pem"
    path.write_bytes(content)
    with pytest.raises(CertificateError, match=says) as raised:
        read_certificate(str(path))
    assert "\n" not in str(raised.value)
    assert leaf_not_after(str(path)) is None and earliest_not_after(str(path)) is None
