"""LICENSE: the Apache License 2.0, as README, pyproject and the image label say."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# SHA-256 of https://www.apache.org/licenses/LICENSE-2.0.txt (11358 bytes), the
# same file Debian ships as /usr/share/common-licenses/Apache-2.0 and trio and
# sniffio ship as LICENSE.APACHE2: the text unchanged, appendix included.
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_file_is_the_apache_2_0_text_unchanged() -> None:
    text = (REPO / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_0_SHA256
    assert b"Apache License\n                           Version 2.0, January 2004" in text


def test_license_file_matches_what_the_package_declares() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
