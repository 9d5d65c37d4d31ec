"""Who PID 1 is and how it was started, read from a /proc laid out in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from kap import status
from kap.invocation import Invocation, kap_args, running_kap
from kap.options import OPTION_BY_NAME


def fake_proc(root: Path, argv: list[str], environ: dict[str, str] | None) -> Path:
    """A directory that looks like /proc for PID 1."""
    (root / "1").mkdir(parents=True)
    (root / "1" / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    if environ is not None:
        env = b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items())
        (root / "1" / "environ").write_bytes(env)
    return root


@pytest.mark.parametrize(
    ("argv", "environ", "health_listen"),
    [
        # The image: ENTRYPOINT ["kap"], a console script run by the venv's python.
        (["/opt/kap/bin/python", "/opt/kap/bin/kap", "--health-listen=:6480"], {}, ":6480"),
        (["kap", "--health-listen", "127.0.0.1:1", "--health-listen", ":2"], {}, ":2"),
        (["python3", "-m", "kap", "--log-level=debug"], {"HEALTH_LISTEN": ":3"}, ":3"),
        (["kap", "--health-listen=:4"], {"HEALTH_LISTEN": ":3"}, ":4"),  # flag beats env
        (["kap"], None, None),  # environ unreadable: the arguments still count
        (["kap", "--", "--health-listen=:5"], {}, None),
    ],
)
def test_pid1_that_is_kap(
    tmp_path: Path, argv: list[str], environ: dict[str, str] | None, health_listen: str | None
) -> None:
    found = running_kap(fake_proc(tmp_path, argv, environ))
    assert found is not None
    assert found.setting(status.HEALTH_LISTEN) == health_listen


@pytest.mark.parametrize(
    "argv", [["/sbin/init"], ["/usr/lib/systemd/systemd", "--system"], ["sh", "-c", "x kap"]]
)
def test_pid1_that_is_not_kap(tmp_path: Path, argv: list[str]) -> None:
    assert running_kap(fake_proc(tmp_path, argv, {"HEALTH_LISTEN": ":1"})) is None


def test_no_proc_is_no_kap(tmp_path: Path) -> None:
    assert running_kap(tmp_path) is None


@pytest.mark.parametrize(
    ("argv", "args"),
    [
        (["kap", "--x"], ("--x",)),
        (["/opt/kap/bin/kap"], ()),
        (["/usr/bin/python3", "/opt/kap/bin/kap", "check"], ("check",)),
        (["python3", "-m", "kap", "status"], ("status",)),
        (["python3", "-I", "-m", "kap", "status"], ("status",)),  # -m third, kap fourth
        (["python3", "-m", "kapx"], None),
        (["sh", "-c", "x kap"], None),
        (["a", "b", "c", "kap"], None),  # kap's name only among the first three
        ([], None),
    ],
)
def test_kap_args_are_what_follows_kaps_name(argv: list[str], args: tuple[str, ...] | None) -> None:
    assert kap_args(argv) == args


def test_a_switch_given_alone_is_true_and_a_value_after_double_dash_is_not_a_flag() -> None:
    discovery = OPTION_BY_NAME["discovery"]
    assert Invocation(("--discovery",), {}).setting(discovery) == "true"
    assert Invocation(("--discovery=false",), {"DISCOVERY": "true"}).setting(discovery) == "false"
    assert Invocation(("--", "--discovery"), {}).setting(discovery) is None
    assert Invocation((), {"DISCOVERY": "off"}).setting(discovery) == "off"
