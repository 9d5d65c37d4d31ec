"""The named states of a relayed direction, and the rules they keep.

A direction (kap/relay/direction.py) has three named values instead of a row
of flags:

- ``phase``: DIALING (its source is an upstream still connecting; the down
  direction only) -> OPEN (reading) -> EOF (its source gave EOF: the
  destination is shut down once the held bytes are out) -> DONE (the
  destination is shut down for writing).
- ``edge``: what edge-triggered epoll last said of the source. READABLE is set
  by an event and cleared (IDLE) only by EAGAIN or by a short read (a TCP
  receive queue that gave less than asked is empty, and any byte or FIN that
  arrives later raises a new edge). HANGUP is READABLE after a FIN/HUP/ERR
  edge: read until 0 or an error, a short read proves nothing. (EAGAIN clears
  HANGUP too: past a FIN a read gives 0, never EAGAIN, and any later event on
  that socket carries the hang-up bits again, as epoll reports the whole
  current state with each edge.)
- ``mode``: COPY (``recv_into`` the shared buffer, then ``send``) or SPLICE
  (through a pipe of the pool), switched by how full the reads are.

The pump (kap/relay/pump.py) sets ``phase`` to OPEN when a dial connects and
``edge`` from each event; the direction moves everything else.
"""

from __future__ import annotations

import enum
from typing import Final


class Phase(enum.Enum):
    DIALING = "dialing"
    OPEN = "open"
    EOF = "eof"
    DONE = "done"


class Edge(enum.Enum):
    IDLE = "idle"
    READABLE = "readable"
    HANGUP = "hangup"


class Mode(enum.Enum):
    COPY = "copy"
    SPLICE = "splice"


# Module-level names: the per-message path reads these, not Enum attributes.
DIALING: Final = Phase.DIALING
OPEN: Final = Phase.OPEN
EOF: Final = Phase.EOF
DONE: Final = Phase.DONE
IDLE: Final = Edge.IDLE
READABLE: Final = Edge.READABLE
HANGUP: Final = Edge.HANGUP
COPY: Final = Mode.COPY
SPLICE: Final = Mode.SPLICE
