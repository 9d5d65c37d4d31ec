"""``kap check``'s gathering of facts: real sockets, and its deadline on trio's virtual clock."""

from __future__ import annotations

import socket
from typing import Any

import trio
from fakeapi import PkiFiles, SliceStore, endpoint_slice
from kaptest import StartFake, make_config
from test_check import black_hole

from kap import check
from kap.address import Address
from kap.check_run import Reach, check_all
from kap.credentials import CredentialFiles
from kap.pool import SOURCE_DISCOVERY
from kap.sources import Credentials as Files


async def test_the_overall_deadline_cuts_every_row_short(autojump_clock: Any) -> None:
    """With a --dial-timeout beyond the overall deadline, the deadline ends the run, and
    what did not finish is reported as out of time (trio's virtual clock)."""
    with black_hole() as dropped:
        address = Address.parse(dropped)
        reach = Reach(CredentialFiles(Files()), "", dial_timeout=100.0, request_deadline=1.0)
        found = await check_all(
            {address: ["flag"]}, reach=reach, discover=False, service=None, deadline=3.0
        )
    assert trio.current_time() == 3.0
    assert found.upstreams == {} and found.sources == {address: ["flag"]}
    config = make_config(None, fallback_upstreams=dropped)
    files = CredentialFiles(config.credentials)
    rows = check.rows_for(config, found, check.credentials_of(files), ())
    assert (rows[0].target, rows[0].ok) == (dropped, False)
    assert rows[0].detail == f"TCP connect failed: {check.OUT_OF_TIME}"


def reach_of(pki: PkiFiles) -> Reach:
    files = Files(ca_file=str(pki.ca_file), token_file=str(pki.token_file), origin="flags")
    return Reach(CredentialFiles(files), "kubernetes.default.svc", 1.0, 1.0)


async def test_a_good_upstream_gives_every_step_and_discovery_lists_through_it(
    start_fake: StartFake, pki: PkiFiles, slice_store: SliceStore, free_port: int
) -> None:
    a = await start_fake("a", host="127.0.0.2", port=free_port, require_token=pki.token)
    slice_store.put(endpoint_slice("k", [("127.0.0.2", True)], ports=[("https", free_port)]))
    assert a.address is not None
    address = Address(*a.address)
    found = await check_all(
        {address: ["flag"]}, reach=reach_of(pki), discover=True, service=None, deadline=10.0
    )
    facts = found.upstreams[address]
    assert (facts.status, facts.connect_error, facts.tls_error) == (200, None, None)
    assert facts.connect_ms is not None and facts.tls_ms is not None
    assert found.discovery is not None
    assert (found.discovery.via, found.discovery.status) == (str(address), 200)
    assert found.discovery.addresses == (str(address),)
    assert found.sources == {address: ["flag", SOURCE_DISCOVERY]}


async def test_a_refused_port_is_a_connect_error_and_discovery_has_nothing_to_list_through(
    pki: PkiFiles,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = Address("127.0.0.1", s.getsockname()[1])
    found = await check_all(
        {down: ["flag"]}, reach=reach_of(pki), discover=True, service=None, deadline=10.0
    )
    facts = found.upstreams[down]
    assert facts.connect_error is not None and facts.tls_ms is None and facts.status is None
    assert found.discovery is not None
    assert found.discovery.error == "no upstream answered to list through"
