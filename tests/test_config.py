"""Flags, durations and addresses: tables of good and bad input (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kap.address import Address, AddressError, parse_list
from kap.config import OPTIONS, ConfigError, Credentials, parse_config
from kap.durations import DurationError, format_duration, parse_duration


def readable_all(path: str) -> str | None:
    return None


def readable_none(path: str) -> str | None:
    return "no such file"


def parse(environ: dict[str, str] | None = None, readable=readable_none, **values: str):  # type: ignore[no-untyped-def]
    return parse_config(values, environ=environ or {}, readable=readable)


# ---- durations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("100ms", 0.1),
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("250us", 250e-6),
        ("250µs", 250e-6),
        ("10ns", 10e-9),
        ("2h45m", 9900.0),
        ("+3s", 3.0),
        (".5s", 0.5),
    ],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5x", "-1s", "1s 2s", "1.2.3s", "ms", "1m30"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


@given(st.floats(1e-6, 1e6))
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-5)


# ---- addresses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "rendered"),
    [
        ("10.0.0.1:6443", "10.0.0.1", 6443, "10.0.0.1:6443"),
        (" 10.0.0.1:6443 ", "10.0.0.1", 6443, "10.0.0.1:6443"),
        ("[fd00::1]:6443", "fd00::1", 6443, "[fd00::1]:6443"),
        ("[FD00:0::1]:443", "fd00::1", 443, "[fd00::1]:443"),
        ("api.example.com:443", "api.example.com", 443, "api.example.com:443"),
        ("API.Example.COM.:443", "api.example.com", 443, "api.example.com:443"),
        ("localhost:1", "localhost", 1, "localhost:1"),
    ],
)
def test_addresses_parse_and_render(text: str, host: str, port: int, rendered: str) -> None:
    a = Address.parse(text)
    assert (a.host, a.port, str(a)) == (host, port, rendered)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10.0.0.1",
        "10.0.0.1:",
        ":6443",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:http",
        "fd00::1:6443",
        "[fd00::1]",
        "[10.0.0.1]:6443",
        "[nothex]:1",
        "bad_host:1",
        "-bad.host:1",
        "300.1.1.1:6443",
    ],
)
def test_bad_addresses_are_rejected_with_a_reason(text: str) -> None:
    with pytest.raises(AddressError) as err:
        Address.parse(text)
    assert str(err.value)
    assert "\n" not in str(err.value)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_ip_addresses_round_trip(ip: object, port: int) -> None:
    a = Address.from_ip(str(ip), port)
    assert Address.parse(str(a)) == a


def test_address_lists_skip_blanks_and_duplicates() -> None:
    assert parse_list(" 10.0.0.1:1, ,10.0.0.2:2,10.0.0.1:1,") == [
        Address("10.0.0.1", 1),
        Address("10.0.0.2", 2),
    ]


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


def test_every_option_has_a_flag_an_env_var_and_help() -> None:
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names))
    for o in OPTIONS:
        assert o.flags[0].startswith("--") and o.env.isupper() and o.help


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
    c = parse(readable=readable_all, as_static_pod="true", static_pod_dir="/srv/kap/")
    assert c.credentials == Credentials(
        ca_file="/srv/kap/ca.crt",
        cert_file="/srv/kap/cl.crt",
        key_file="/srv/kap/cl.key",
        token_file=None,
        origin="static-pod",
    )


def test_static_pod_mode_with_missing_files_warns_and_goes_on() -> None:
    c = parse(as_static_pod="true")
    assert c.credentials.origin == "none"
    assert len(c.warnings) == 3


def test_timeout_longer_than_interval_is_a_warning() -> None:
    c = parse(health_interval="100ms", health_timeout="1s")
    assert any("--health-timeout" in w for w in c.warnings)
