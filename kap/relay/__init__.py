"""The relay: one shared pump moves the bytes of every proxied connection.

Rooms: ``pump`` (the epoll loop and its budget), ``sessions`` (the pump's
book of sessions: registering, forgetting, which socket is whose),
``direction`` (a session and how its bytes move one way), ``states`` (a
direction's named states), ``pipes`` (the pool of splice pipes), ``dials``
(the heaps of dial and answer deadlines) and ``outcome`` (what a call of
:meth:`Relay.relay` returns). Imports go one way: pump -> sessions -> dials
-> direction -> states, pipes, outcome.
"""

from kap.relay.direction import BUFFER_SIZE
from kap.relay.outcome import (
    DialFailed,
    DialFailure,
    Ending,
    Outcome,
    Relayed,
    RelayNotRunningError,
    RelayResult,
    Side,
    Unanswered,
)
from kap.relay.pipes import PIPE_POOL_MAX
from kap.relay.pump import Relay

__all__ = [
    "BUFFER_SIZE",
    "PIPE_POOL_MAX",
    "DialFailed",
    "DialFailure",
    "Ending",
    "Outcome",
    "Relay",
    "RelayNotRunningError",
    "RelayResult",
    "Relayed",
    "Side",
    "Unanswered",
]
