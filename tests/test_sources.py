"""Where credentials come from: each field from the first source that has it.

Through ``parse_config`` (flags, a kubeconfig, static-pod and ServiceAccount
files, files that do not load) and through ``resolve`` itself (no I/O).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest

from kap.config import ConfigError, Credentials, parse_config
from kap.kubeconfig import KubeconfigCredentials
from kap.options import STATIC_POD_DIR
from kap.sources import (
    describe,
    load_kubeconfig_option,
    resolve,
    serviceaccount_files,
    static_pod_files,
)


def readable_all(path: str) -> str | None:
    return None


SA = "/var/run/secrets/kubernetes.io/serviceaccount"
KC = Credentials(
    ca_file="/kc/ca",
    cert_file="/kc/crt",
    key_file="/kc/key",
    token_file="/kc/tok",
    origin="kubeconfig",
)


def kubeconfig_of(
    creds: Credentials, **more: object
) -> Callable[[list[str]], KubeconfigCredentials]:
    def load(paths: list[str]) -> KubeconfigCredentials:
        loaded.append(paths)
        fields: dict[str, object] = {"seed": None, "tls_server_name": None, "context": "ctx"}
        fields.update(more)
        return KubeconfigCredentials(credentials=creds, **fields)  # type: ignore[arg-type]

    loaded: list[list[str]] = []
    load.loaded = loaded  # type: ignore[attr-defined]
    return load


@pytest.mark.parametrize(
    ("values", "kubeconfig", "want", "origin"),
    [
        # flags > kubeconfig, per field
        (
            {"ca_file": "/f/ca", "token_file": "/f/tok"},
            KC,
            ("/f/ca", "/kc/crt", "/kc/key", "/f/tok"),
            "ca=flags,cert=kubeconfig,token=flags",
        ),
        ({}, KC, ("/kc/ca", "/kc/crt", "/kc/key", "/kc/tok"), "kubeconfig"),
        # kubeconfig > static-pod > ServiceAccount
        (
            {"as_static_pod": "true", "static_pod_dir": "/sp"},
            Credentials(token_file="/kc/tok", origin="kubeconfig"),
            ("/sp/ca.crt", "/sp/cl.crt", "/sp/cl.key", "/kc/tok"),
            "ca=static-pod,cert=static-pod,token=kubeconfig",
        ),
        (
            {"as_static_pod": "true", "static_pod_dir": "/sp"},
            None,
            ("/sp/ca.crt", "/sp/cl.crt", "/sp/cl.key", f"{SA}/token"),
            "ca=static-pod,cert=static-pod,token=serviceaccount",
        ),
        ({}, None, (f"{SA}/ca.crt", None, None, f"{SA}/token"), "serviceaccount"),
        (
            {"cert_file": "/f/crt", "key_file": "/f/key"},
            None,
            (f"{SA}/ca.crt", "/f/crt", "/f/key", f"{SA}/token"),
            "ca=serviceaccount,cert=flags,token=serviceaccount",
        ),
    ],
)
def test_each_credential_field_comes_from_the_first_source_that_has_it(
    values: dict[str, str],
    kubeconfig: Credentials | None,
    want: tuple[str | None, ...],
    origin: str,
) -> None:
    if kubeconfig is not None:
        values = {**values, "kubeconfig": "/kc/config"}
    c = parse_config(
        values,
        environ={},
        readable=readable_all,
        load_kubeconfig=None if kubeconfig is None else kubeconfig_of(kubeconfig),
    )
    got = c.credentials
    assert (got.ca_file, got.cert_file, got.key_file, got.token_file) == want
    assert got.origin == origin


def check_only(**problems: str) -> Callable[[Credentials], dict[str, str]]:
    """A credential checker that finds ``problems`` (field -> why) whatever the files."""
    return lambda creds: {k: v for k, v in problems.items() if getattr(creds, k) is not None}


@pytest.mark.parametrize(
    ("values", "problems", "flag", "env"),
    [
        ({"ca_file": "/ca"}, {"ca_file": "not a PEM CA bundle"}, "--ca-file", "CA_FILE"),
        ({"token_file": "/t"}, {"token_file": "empty"}, "--token-file", "TOKEN_FILE"),
        (
            {"cert_file": "/c", "key_file": "/k"},
            {"cert_file": "not a PEM certificate"},
            "--cert-file",
            "CERT_FILE",
        ),
        ({"kubeconfig": "/kc"}, {"ca_file": "not a PEM CA bundle"}, "--kubeconfig", "KUBECONFIG"),
        ({"kubeconfig": "/kc"}, {"cert_file": "no key"}, "--kubeconfig", "KUBECONFIG"),
    ],
)
def test_an_explicit_credential_file_that_does_not_load_is_one_line(
    values: dict[str, str], problems: dict[str, str], flag: str, env: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            values,
            environ={},
            readable=readable_all,
            check=check_only(**problems),
            load_kubeconfig=kubeconfig_of(KC),
        )
    assert len(err.value.problems) == 1, err.value.problems
    line = err.value.problems[0]
    assert line.startswith(f"invalid {flag} (env {env}): '/")  # the file, as given
    assert next(iter(problems.values())) in line


def test_default_files_that_do_not_load_are_dropped_with_a_warning() -> None:
    c = parse_config({}, environ={}, readable=readable_all, check=check_only(ca_file="garbage"))
    assert c.credentials == Credentials(token_file=f"{SA}/token", origin="serviceaccount")
    assert len(c.warnings) == 1 and "ServiceAccount" in c.warnings[0]
    # A static pod's client certificate that does not load yet is kept, silently:
    # CredentialFiles logs it once and uses it once it loads.
    c = parse_config(
        {"as_static_pod": "true"},
        environ={},
        readable=lambda p: None if p.startswith(STATIC_POD_DIR) else "no",
        check=check_only(cert_file="no such file"),
    )
    assert c.credentials.cert_file == f"{STATIC_POD_DIR}/cl.crt" and not c.warnings


# ---- resolve: the precedence itself, without a configuration ------------------

FLAG_CA = Credentials(ca_file="/f/ca", origin="flags")
HALF_PAIR = Credentials(cert_file="/f/crt", origin="flags")  # a certificate without its key
STATIC = static_pod_files("/sp")
ACCOUNT = serviceaccount_files("/sa")


@pytest.mark.parametrize(
    ("layers", "want", "sources"),
    [
        ([], Credentials(), {}),
        ([ACCOUNT], ACCOUNT, {"ca": "serviceaccount", "token": "serviceaccount"}),
        (
            [FLAG_CA, STATIC, ACCOUNT],
            Credentials("/f/ca", "/sp/cl.crt", "/sp/cl.key", "/sa/token"),
            {"ca": "flags", "cert": "static-pod", "token": "serviceaccount"},
        ),
        # the certificate and its key come from one source, or not at all
        (
            [HALF_PAIR, STATIC],
            Credentials("/sp/ca.crt", "/sp/cl.crt", "/sp/cl.key"),
            {"ca": "static-pod", "cert": "static-pod"},
        ),
        ([HALF_PAIR], Credentials(), {}),
    ],
)
def test_resolve_takes_each_field_from_the_first_layer_that_has_it_whole(
    layers: list[Credentials], want: Credentials, sources: dict[str, str]
) -> None:
    got, got_sources = resolve(layers)
    assert attrs.evolve(got, origin="") == attrs.evolve(want, origin="")
    assert got_sources == sources
    assert got.origin == describe(sources)


@pytest.mark.parametrize(
    ("sources", "origin"),
    [
        ({}, "none"),
        ({"ca": "kubeconfig", "token": "kubeconfig"}, "kubeconfig"),
        ({"ca": "flags", "token": "serviceaccount"}, "ca=flags,token=serviceaccount"),
    ],
)
def test_the_origin_names_one_source_or_each_fields(sources: dict[str, str], origin: str) -> None:
    assert describe(sources) == origin


def test_a_kubeconfig_that_does_not_load_is_reported_once_and_gives_nothing() -> None:
    from kap.kubeconfig import KubeconfigError

    def broken(paths: list[str]) -> KubeconfigCredentials:
        raise KubeconfigError(f"{paths[0]}: not YAML")

    problems: list[tuple[str, str]] = []
    got = load_kubeconfig_option(
        "kc", lambda p: f"/w/{p}", broken, lambda name, why: problems.append((name, why))
    )
    assert got is None and problems == [("kubeconfig", "/w/kc: not YAML")]
    assert load_kubeconfig_option(" ", str, broken, lambda *a: None) is None  # blank: none given
