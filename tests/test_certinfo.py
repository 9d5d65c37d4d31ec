"""Certificate expiry read from PEM files written in tmp_path (trustme)."""

from __future__ import annotations

import datetime
from pathlib import Path

import trustme
from test_monitoring import promtool  # noqa: F401  -- the fixture

from kap.certinfo import earliest_not_after, leaf_not_after


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
