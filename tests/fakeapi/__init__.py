"""A fake kube-apiserver: the upstream every kap test talks to.

kap sees an apiserver three ways, and the fake serves all three on one port:

* as a TCP peer for client traffic: a connection whose first byte is not a TLS
  ClientHello (0x16) is in *raw mode*: ``WHO\\n`` answers the fake's name, and
  everything else is echoed back, half-close included, so a data-path test sees
  which upstream served it and that FIN travels both ways;
* as an HTTPS ``/readyz`` (``/livez``, ``/healthz``) for kap's probes, whose
  behaviour tests switch at run time (``200``, ``500``, ``slow``, ``hang``,
  ``close``) and whose arrivals are timed so probe spacing can be checked;
* as the API that serves ``discovery.k8s.io/v1`` EndpointSlices, listed and
  watched the way kube-apiserver does it, with the faults discovery must
  survive (410 as an event and as an HTTP status, compaction, server-side
  watch timeouts, stalled watches, garbage and failing lists).

Several fakes may share one :class:`SliceStore`, as the apiservers of one
control plane share etcd, and may listen on ``127.0.0.2:P``, ``127.0.0.3:P``...
with one port ``P``, as the addresses of an EndpointSlice do.

The fake runs in-process (``await nursery.start(fake.run)``) or as a process
(``python -m tests.fakeapi --help``) that tests can SIGKILL or SIGSTOP; a
stopped process is the "hung apiserver whose kernel still accepts TCP".

Its rooms, and the tests that hold each to its word:

* ``pki``: the test CA, certificates and token, as files (trustme);
* ``objects``: what it serves (EndpointSlices, Status, bookmarks, discovery);
* ``selection``: label and field selectors, pure;
* ``store``: the shared EndpointSlices, resourceVersions, compaction and the
  watches' fan-out, without I/O (these three: ``test_fakeapi_store.py``);
* ``server``: listener, connections, TLS, raw mode, authentication, readyz
  modes and the counters tests read (``test_fakeapi_server.py``);
* ``listwatch``: the HTTP handlers for LIST and WATCH, bookmarks, 410
  (``test_fakeapi_listwatch.py``), with ``wire``: h11 response helpers;
* ``http2``: a connection that picked ``h2`` over ALPN (``test_probe_h2.py``);
* ``cli`` and ``process``: the fake as a process, and starting one
  (``test_fakeapi_process.py``).

Tests import it as ``fakeapi`` (pytest puts ``tests/`` on ``sys.path``); from
the repository root it is ``tests.fakeapi`` (the demo). Its modules import
each other relatively, so either name works.
"""

from __future__ import annotations

from .cli import write_slices_file
from .objects import endpoint_slice, garbage_slices
from .pki import CA_KEY_FILE, PkiFiles, create_pki
from .process import fake_api_process
from .selection import parse_label_selector
from .server import FakeApiServer
from .store import SliceStore

__all__ = [
    "CA_KEY_FILE",
    "FakeApiServer",
    "PkiFiles",
    "SliceStore",
    "create_pki",
    "endpoint_slice",
    "fake_api_process",
    "garbage_slices",
    "parse_label_selector",
    "write_slices_file",
]
