"""The whole configuration: flags, env and files into one Config (no I/O)."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import attrs
import click
import pytest
from click.testing import CliRunner
from test_sources import KC, kubeconfig_of

from kap.address import Address
from kap.cli import config_from_flags, with_kap_options
from kap.config import Config, ConfigError, Credentials, parse_config, parse_option
from kap.kinds import Disk
from kap.options import OPTION_BY_NAME, OPTIONS, STATIC_POD_DIR

ROOT = Path(__file__).resolve().parent.parent


def readable_all(path: str) -> str | None:
    return None


def readable_none(path: str) -> str | None:
    return "no such file"


def parse(environ: dict[str, str] | None = None, readable=readable_none, **values: str):  # type: ignore[no-untyped-def]
    return parse_config(values, environ=environ or {}, readable=readable)


# ---- the whole configuration ----------------------------------------------------


def test_defaults_match_the_seed() -> None:
    c = parse()
    assert (c.listen_addr, c.listen_port, c.health_host, c.health_port) == (
        "0.0.0.0",
        7443,
        "",
        8080,
    )
    assert (c.dial_timeout, c.keepalive_period, c.tcp_user_timeout) == (5.0, 1.0, 5.0)
    assert (c.health_interval, c.health_timeout, c.health_jitter) == (1.0, 0.1, 0.2)
    assert (c.log_level, c.tls_server_name, c.shutdown_grace) == (
        "info",
        "kubernetes.default.svc",
        10,
    )
    assert (c.discover_period, c.removal_grace, c.drain_after) == (5.0, 30.0, 10.0)
    assert c.fallback_upstreams == ()
    assert c.credentials == Credentials()  # no ServiceAccount files here
    assert c.default_service is None
    assert c.discovery is True and c.as_static_pod is False


@pytest.mark.parametrize(
    ("values", "flag", "env"),
    [
        ({"listen_addr": "localhost"}, "--listen-addr", "LISTEN_ADDRESS"),
        ({"listen_port": "70000"}, "--listen-port", "LISTEN_PORT"),
        ({"listen_port": "-1"}, "--listen-port", "LISTEN_PORT"),
        ({"health_listen": "8080"}, "--health-listen", "HEALTH_LISTEN"),
        ({"health_listen": "nohost:80"}, "--health-listen", "HEALTH_LISTEN"),
        ({"log_level": "verbose"}, "--log-level", "LOG_LEVEL"),
        ({"dial_timeout": "5"}, "--dial-timeout", "DIAL_TIMEOUT"),
        ({"dial_timeout": "0s"}, "--dial-timeout", "DIAL_TIMEOUT"),
        ({"keepalive_period": "soon"}, "--keepalive-period", "KEEPALIVE_PERIOD"),
        ({"tcp_user_timeout": "-5s"}, "--tcp-user-timeout", "TCP_USER_TIMEOUT"),
        ({"health_interval": "1"}, "--health-interval", "HEALTH_INTERVAL"),
        ({"health_timeout": "1x"}, "--health-timeout", "HEALTH_TIMEOUT"),
        ({"health_jitter": "1.5"}, "--health-jitter", "HEALTH_JITTER"),
        ({"health_jitter": "-0.1"}, "--health-jitter", "HEALTH_JITTER"),
        ({"health_jitter": "lots"}, "--health-jitter", "HEALTH_JITTER"),
        ({"fallback_upstreams": "10.0.0.1"}, "--fallback-upstreams", "FALLBACK_UPSTREAMS"),
        ({"fallback_upstreams": "fd00::1:6443"}, "--fallback-upstreams", "FALLBACK_UPSTREAMS"),
        ({"ca_file": "/nonexistent/ca.crt"}, "--ca-file", "CA_FILE"),
        ({"token_file": "/nonexistent/token"}, "--token-file", "TOKEN_FILE"),
        ({"cert_file": "/nonexistent/c"}, "--cert-file", "CERT_FILE"),
        ({"shutdown_grace": "forever"}, "--shutdown-grace", "SHUTDOWN_GRACE"),
        ({"as_static_pod": "maybe"}, "--as-static-pod", "AS_STATIC_POD"),
        ({"discover_period": "0"}, "--discover-period", "DISCOVER_PERIOD"),
        ({"drain_after": "10"}, "--drain-after", "DRAIN_AFTER"),
    ],
)
def test_each_bad_value_gives_one_line_naming_flag_and_env(
    values: dict[str, str], flag: str, env: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse(**values)
    lines = [p for p in err.value.problems if p.startswith(f"invalid {flag} ")]
    assert lines, err.value.problems
    assert all(env in line and "\n" not in line for line in lines)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse(listen_port="0x", dial_timeout="x", health_jitter="2", log_level="loud")
    assert len(err.value.problems) == 4


def test_cert_without_key_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse(readable=readable_all, cert_file="/c.crt")
    assert any("--key-file" in p for p in err.value.problems)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [(":8080", "", 8080), ("127.0.0.1:9", "127.0.0.1", 9), ("[::1]:80", "::1", 80), (":0", "", 0)],
)
def test_health_listen_forms(text: str, host: str, port: int) -> None:
    c = parse(health_listen=text)
    assert (c.health_host, c.health_port) == (host, port)


def test_ipv6_listen_and_dual_stack() -> None:
    assert parse(listen_addr="::").listen_addr == "::"
    assert parse(listen_addr="::1", listen_port="0").listen_port == 0


def test_bool_forms() -> None:
    for text, want in [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False)]:
        assert parse(as_static_pod=text).as_static_pod is want


def test_log_level_warning_is_warn() -> None:
    assert parse(log_level="WARNING").log_level == "warn"


def test_default_service_comes_from_the_environment() -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert parse(env).default_service == Address("10.96.0.1", 443)
    env6 = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    assert str(parse(env6).default_service) == "[fd00::1]:443"
    bad = parse({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "x"})
    assert bad.default_service is None and bad.warnings


def test_serviceaccount_files_are_the_default_credentials_when_present() -> None:
    c = parse(readable=readable_all)
    assert c.credentials.origin == "serviceaccount"
    assert c.credentials.ca_file == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert c.credentials.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert c.credentials.cert_file is None


def test_explicit_files_beat_the_defaults() -> None:
    c = parse(readable=readable_all, ca_file="/my/ca", token_file="/my/token")
    assert (c.credentials.ca_file, c.credentials.token_file) == ("/my/ca", "/my/token")


def test_static_pod_mode_reads_the_static_pod_dir() -> None:
    c = parse(
        readable=lambda p: None if p.startswith("/srv/kap/") else "no such file",
        as_static_pod="true",
        static_pod_dir="/srv/kap/",
    )
    assert c.credentials == Credentials(
        ca_file="/srv/kap/ca.crt",
        cert_file="/srv/kap/cl.crt",
        key_file="/srv/kap/cl.key",
        token_file=None,
        origin="static-pod",
    )


def test_static_pod_mode_keeps_a_missing_client_certificate_for_when_it_appears() -> None:
    # The CA is not there: going without it is a warning. The client
    # certificate is not there yet: kap keeps its paths (CredentialFiles says
    # so once, and uses the files once they load).
    c = parse(as_static_pod="true")
    assert c.credentials == Credentials(
        cert_file=f"{STATIC_POD_DIR}/cl.crt",
        key_file=f"{STATIC_POD_DIR}/cl.key",
        origin="static-pod",
    )
    assert len(c.warnings) == 1 and "ca.crt" in c.warnings[0]


# ---- credentials in the configuration: the kubeconfig's seed, relative paths ----


def test_the_kubeconfig_gives_its_seed_and_tls_server_name_unless_the_flag_is_given() -> None:
    load = kubeconfig_of(KC, seed=Address("10.0.0.9", 6443), tls_server_name="api.internal")
    c = parse_config(
        {"kubeconfig": "/a:/b"}, environ={}, readable=readable_all, load_kubeconfig=load
    )
    assert c.kubeconfig_seed == Address("10.0.0.9", 6443)
    assert c.tls_server_name == "api.internal"
    assert load.loaded == [["/a", "/b"]]  # type: ignore[attr-defined]
    c = parse_config(
        {"kubeconfig": "/a", "tls_server_name": "mine"},
        environ={},
        readable=readable_all,
        load_kubeconfig=load,
    )
    assert c.tls_server_name == "mine"


def test_relative_paths_are_taken_against_the_working_directory() -> None:
    load = kubeconfig_of(Credentials(origin="kubeconfig"))
    c = parse_config(
        {
            "ca_file": "pki/ca.crt",
            "token_file": "./tok",
            "kubeconfig": "kc.yaml:../other.yaml",
            "fallback_file": "state/fallback.json",
            "as_static_pod": "true",
            "static_pod_dir": "sp",
        },
        environ={},
        readable=lambda p: None if p.startswith("/home/op/work/") else "no such file",
        load_kubeconfig=load,
        cwd="/home/op/work",
        is_dir=lambda p: p == "/home/op/work/state",
    )
    assert c.credentials.ca_file == "/home/op/work/pki/ca.crt"
    assert c.credentials.token_file == "/home/op/work/tok"
    assert c.credentials.cert_file == "/home/op/work/sp/cl.crt"
    assert c.static_pod_dir == "/home/op/work/sp"
    assert c.fallback_file == "/home/op/work/state/fallback.json"
    assert load.loaded == [["/home/op/work/kc.yaml", "/home/op/other.yaml"]]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("values", "flag", "why"),
    [
        (
            {"fallback_file": "/no/such/dir/fallback.json"},
            "--fallback-file",
            "directory /no/such/dir",
        ),
        (
            {"fallback_upstreams": "https://10.0.0.1:6443"},
            "--fallback-upstreams",
            "without a scheme",
        ),
        (
            {"fallback_upstreams": "10.0.0.2:1,tcp://h:1"},
            "--fallback-upstreams",
            "without a scheme",
        ),
    ],
)
def test_fallback_mistakes_say_what_to_give(values: dict[str, str], flag: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(values, environ={}, readable=readable_all, is_dir=lambda p: p == "/")
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"invalid {flag} ") and why in err.value.problems[0]
    assert "IPv6" not in err.value.problems[0]


def test_timeout_longer_than_interval_is_a_warning() -> None:
    c = parse(health_interval="100ms", health_timeout="1s")
    assert any("--health-timeout" in w for w in c.warnings)


# ---- the option table is the one source --------------------------------------


def fits(value: object, annotation: Any) -> bool:
    """Whether ``value`` is of the type ``annotation`` (the few forms Config uses)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return any(fits(value, a) for a in args)
    if annotation is None or annotation is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args, strict=True))
    if annotation is float:
        return isinstance(value, float)
    return isinstance(value, annotation)


def test_every_default_parses_with_its_own_kind_into_its_config_field() -> None:
    hints = typing.get_type_hints(Config)
    for option in OPTIONS:
        value = parse_option(option, None, Disk())
        assert option.name in hints, f"{option.name}: no Config field of that name"
        assert fits(value, hints[option.name]), (option.name, value, hints[option.name])


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("dial_timeout", "1m30s", 90.0),
        ("listen_port", " 0 ", 0),
        ("health_listen", "[::1]:80", ("::1", 80)),
        ("fallback_upstreams", "10.0.0.1:1", (Address("10.0.0.1", 1),)),
        ("static_pod_dir", " ", STATIC_POD_DIR),  # blank: the default
        ("ca_file", "", None),
        ("ca_file", "pki/ca.crt", "/work/pki/ca.crt"),
        ("kubeconfig", "a:b", "a:b"),
        ("discovery", "off", False),
        ("health_jitter", "1", 1.0),
    ],
)
def test_given_values_parse_into_their_config_field_type(
    name: str, text: str, value: object
) -> None:
    option = OPTION_BY_NAME[name]
    got = parse_option(option, text, Disk(cwd="/work"))
    assert got == value
    assert fits(got, typing.get_type_hints(Config)[name])


def test_config_writes_no_default_of_its_own_for_an_option() -> None:
    names = {o.name for o in OPTIONS}
    own = [
        f.name for f in attrs.fields(Config) if f.name in names and f.default is not attrs.NOTHING
    ]
    assert own == []
    # ... so the defaults are the table's, but for the one that follows another option:
    derived = {"readiness_interval": "health_interval"}
    c = parse()
    for option in OPTIONS:
        if option.name in derived:
            assert option.default is None
            assert getattr(c, option.name) == getattr(c, derived[option.name]), option.name
        else:
            assert getattr(c, option.name) == parse_option(option, None, Disk()), option.name


def test_with_kap_options_takes_every_flag_its_env_var_and_no_discovery() -> None:
    @click.command()
    @with_kap_options
    def command(**values: Any) -> None:
        config = config_from_flags(values)
        click.echo(f"{config.as_static_pod} {config.discovery} {config.dial_timeout}")

    runner = CliRunner()
    assert runner.invoke(command, ["--as-static-pod"], env={}).output.split()[:2] == [
        "True",
        "True",
    ]
    out = runner.invoke(command, ["--discovery=false", "--dial-timeout", "2s"], env={})
    assert out.output.split() == ["False", "False", "2.0"]
    assert runner.invoke(command, ["--no-discovery"], env={}).output.split()[1] == "False"
    out = runner.invoke(command, [], env={"DIAL_TIMEOUT": "3s"})
    assert out.output.split()[2] == "3.0"
    out = runner.invoke(command, ["--dial-timeout", "3"], env={})
    assert out.exit_code == 2
    assert "invalid --dial-timeout (env DIAL_TIMEOUT): " in out.output
