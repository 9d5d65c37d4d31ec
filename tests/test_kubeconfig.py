"""Kubeconfig lists merged as kubectl merges them, paths relative to each file."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from kap import kubeconfig
from kap.address import Address


def named(section: str, name: str, **fields: Any) -> dict[str, Any]:
    inner = {"clusters": "cluster", "users": "user", "contexts": "context"}[section]
    return {"name": name, inner: fields}


@pytest.mark.parametrize(
    ("docs", "want"),
    [
        # the first current-context wins; an empty one does not count
        ([{"current-context": ""}, {"current-context": "b"}, {"current-context": "c"}],
         {"current-context": "b"}),
        # named entries: the first of each name wins, others are added in order
        (
            [
                {"clusters": [named("clusters", "x", server="https://a")]},
                {"clusters": [named("clusters", "x", server="https://b"),
                              named("clusters", "y", server="https://y")]},
            ],
            {"clusters": [named("clusters", "x", server="https://a"),
                          named("clusters", "y", server="https://y")]},
        ),
        # a key only a later file has is taken from it
        ([{"kind": "Config"}, {"users": [named("users", "u", token="t")]}],
         {"kind": "Config", "users": [named("users", "u", token="t")]}),
    ],
)  # fmt: skip
def test_merge_first_file_wins(docs: list[dict[str, Any]], want: dict[str, Any]) -> None:
    assert kubeconfig.merge(docs) == want


def test_split_paths_skips_empty_items() -> None:
    assert kubeconfig.split_paths("a.yaml::/b.yaml:") == ["a.yaml", "/b.yaml"]


def write(path: Path, doc: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return str(path)


def test_a_list_merges_with_each_files_paths_relative_to_its_own_directory(tmp_path: Path) -> None:
    a = write(
        tmp_path / "one" / "a.yaml",
        {
            "current-context": "x",
            "contexts": [named("contexts", "x", cluster="c", user="u")],
            "users": [named("users", "u", tokenFile="tok")],
        },
    )
    b = write(
        tmp_path / "two" / "b.yaml",
        {
            "current-context": "ignored",
            "clusters": [
                named("clusters", "c", server="https://10.0.0.1:6443", **{
                    "certificate-authority": "ca.crt", "tls-server-name": "api.internal"})
            ],
            "users": [named("users", "u", token="not-this-one")],
        },
    )  # fmt: skip
    kc = kubeconfig.load_paths([a, str(tmp_path / "missing.yaml"), b])
    assert kc.context == "x"
    assert kc.credentials.token_file == str(tmp_path / "one" / "tok")
    assert kc.credentials.ca_file == str(tmp_path / "two" / "ca.crt")
    assert kc.seed == Address("10.0.0.1", 6443)
    assert kc.tls_server_name == "api.internal"


def test_a_list_of_missing_files_is_an_error_and_one_missing_file_too(tmp_path: Path) -> None:
    with pytest.raises(kubeconfig.KubeconfigError, match="none of the files exists"):
        kubeconfig.load_paths([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(kubeconfig.KubeconfigError, match="cannot read"):
        kubeconfig.load_paths([str(tmp_path / "a")])


def test_absolute_paths_stay_as_they_are(tmp_path: Path) -> None:
    doc = {
        "clusters": [
            named("clusters", "c", server="https://h", **{"certificate-authority": "/ca"})
        ],
        "users": [named("users", "u", **{"client-certificate": "/c", "client-key": "k"})],
        "contexts": [named("contexts", "x", cluster="c", user="u")],
    }
    kc = kubeconfig.load(write(tmp_path / "k.yaml", doc))
    assert (kc.credentials.ca_file, kc.credentials.cert_file) == ("/ca", "/c")
    assert kc.credentials.key_file == str(tmp_path / "k")


def test_a_kubeconfig_that_is_a_fifo_is_an_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "config"
    os.mkfifo(fifo)
    box: list[BaseException] = []

    def load() -> None:
        try:
            kubeconfig.load_paths([str(fifo)])
        except kubeconfig.KubeconfigError as e:
            box.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10.0)  # a guard against the hang of old code, not a timing
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked open go
        thread.join()
        pytest.fail("blocked opening the FIFO")
    assert "not a regular file (a FIFO)" in str(box[0])
