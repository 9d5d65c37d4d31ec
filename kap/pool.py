"""The upstream pool: who is usable, in which tier, and who serves the next client.

Pure logic: no sockets, no clocks, no randomness of its own. Every method that
depends on time takes ``now``; probe results and dial failures come in as
calls, decisions go out as return values. The rules, which the tests hold it to:

* Score: clamped to [-3, +3], a new upstream starts at +1; a successful probe
  adds 1, a failed probe or a failed client dial subtracts 1.
* Usable: at least one successful probe since the upstream joined, a score
  >= 0, not *suspect* and not *held down*. (go-loadbalancer lets never-probed
  upstreams take traffic; kap does not, so a freshly discovered but dead
  address never gets a client.)
* Suspect: a failed client dial (or a passive failure: an upstream reset, or
  an upstream that closes a fresh connection without answering) makes the
  upstream suspect at once, so it gets no new client after its first failed
  dial; the next successful probe (the scheduler probes it right away) clears
  it, so one transient error costs milliseconds, not a score cycle.
* Damping: an upstream that turns unusable again soon after it last did is
  held down: its recovery waits ``hold`` seconds, doubling with each flap
  inside ``FLAP_WINDOW`` (``kap.upstream.hold_down``). A flapping apiserver
  makes a few transitions a minute, not sixty.
* Fast confirmation: a failed probe of an upstream still usable by its score
  is confirmed after a quarter interval (HAProxy's fastinter), so a hung
  apiserver leaves rotation in about one interval, not four.
* Tier: from the latency of the last successful probe, on decade thresholds
  100us, 1ms, 10ms, 100ms, 1s (tiers 0..5). Unlike go-loadbalancer, a tier
  only changes once the latency is clearly past a boundary (``HYSTERESIS``),
  so an upstream whose latency sits on a boundary does not flap between tiers.
  A failed probe keeps the tier.
* Pick: the lowest tier that has a usable upstream wins; inside it, the
  upstreams with the best score (the stable ones: a flapping upstream hovers
  below the maximum), round-robin with one cursor per tier. Reading state
  (``upstreams``, ``usable``, ``best``) never moves a cursor.
* Candidates for one client: the pick, then the other usable upstreams (best
  tier first), then the default Kubernetes Service, then every other upstream
  by score ("panic mode"): kap never refuses a client while something might
  answer.
* Membership is the union of named sources (flags, fallback file, discovery).
  An upstream that loses its last source is removed after a grace period, so
  an apiserver briefly missing from an EndpointSlice keeps its connections;
  an empty update from a source is ignored, so a bad discovery result never
  empties the pool.
* Drain: the clients of an upstream unreachable for ``--drain-after`` are
  closed, unless it answers (a /readyz 500 while it shuts down: it closes its
  own) or nothing else is usable (then they are the best kap has).

Changes come back as ``kap.events.Change``; counters live in ``kap.stats``.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from kap.address import Address
from kap.events import Change as Change  # re-exported: the proxy's import
from kap.events import ChangeKind
from kap.upstream import FLAP_WINDOW, TIER_THRESHOLDS, fast_delay, hold_down, next_tier
from kap.upstream import SCORE_MAX as SCORE_MAX  # re-exported, as the next two
from kap.upstream import SCORE_MIN as SCORE_MIN
from kap.upstream import Upstream as Upstream

# Source names, as /upstreams shows them.
SOURCE_FLAG = "flag"
SOURCE_FILE = "file"
SOURCE_DISCOVERY = "discovery"
SOURCE_KUBECONFIG = "kubeconfig"


@attrs.define
class Pool:
    """The upstream set and the selection among it."""

    removal_grace: float = 30.0
    default_service: Address | None = None
    tier_thresholds: tuple[float, ...] = TIER_THRESHOLDS
    _members: dict[Address, Upstream] = attrs.field(factory=dict, alias="_members")
    _cursors: dict[tuple[bool, int], int] = attrs.field(factory=dict, alias="_cursors")
    _next_order: int = attrs.field(default=0, alias="_next_order")

    # ---- reading (no side effects) ----------------------------------------

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return tuple(sorted(self._members.values(), key=lambda u: u.order))

    def get(self, address: Address) -> Upstream | None:
        return self._members.get(address)

    def __contains__(self, address: object) -> bool:
        return address in self._members

    def __len__(self) -> int:
        return len(self._members)

    def usable(self) -> list[Upstream]:
        """Usable upstreams, best tier first, in insertion order within a tier."""
        return sorted(
            (u for u in self._members.values() if u.usable),
            key=lambda u: (u.tier_key, u.order),
        )

    def best_tier(self) -> int | None:
        tiers = [u.tier for u in self._members.values() if u.usable and u.tier is not None]
        return min(tiers) if tiers else None

    # ---- selection ---------------------------------------------------------

    def best(self) -> list[Upstream]:
        """What ``pick`` chooses among: the lowest usable tier, best score in it.

        A query: no cursor moves, so a caller that is not a client (discovery
        choosing where to ask) leaves the clients' round-robin as it was.
        """
        usable = self.usable()
        if not usable:
            return []
        group = [u for u in usable if u.tier_key == usable[0].tier_key]
        top = max(u.score for u in group)
        return [u for u in group if u.score == top]

    def where_to_ask(self, avoid: Address | None, *, draw: float, turn: int) -> Address | None:
        """Where discovery asks: one of ``best``, else the other members in turn.

        A query (no cursor moves). ``avoid`` (the upstream that just failed)
        is passed over when there is another; ``draw`` in [0, 1) picks among
        the best (so nodes spread their watches), ``turn`` rotates through
        members when none is usable yet. The default Service only when the
        pool holds no upstream at all (reaching it may need kap itself).
        """
        best = [u.address for u in self.best()]
        if best:
            usable = [u.address for u in self.usable()]
            fresh = [a for a in best if a != avoid] or [a for a in usable if a != avoid] or best
            return fresh[min(int(draw * len(fresh)), len(fresh) - 1)]
        members = [u.address for u in self.upstreams]
        if not members:
            return self.default_service
        if len(members) > 1 and avoid in members:
            members.remove(avoid)
        return members[turn % len(members)]

    def pick(self) -> Upstream | None:
        """The next upstream for a client: lowest usable tier, round-robin inside it."""
        group = self.best()
        if not group:
            return None
        tier = group[0].tier_key
        cursor = self._cursors.get(tier, 0)
        self._cursors[tier] = cursor + 1
        return group[cursor % len(group)]

    def candidates(self) -> list[Address]:
        """Addresses to try for one client, in order (see the module docstring)."""
        first = self.pick()
        out: list[Address] = []
        if first is not None:
            out.append(first.address)
            out.extend(u.address for u in self.usable() if u is not first)
        if self.default_service is not None and self.default_service not in out:
            out.append(self.default_service)
        rest = sorted(
            (u for u in self._members.values() if not u.usable),
            key=lambda u: (-u.score, u.order),
        )
        out.extend(u.address for u in rest if u.address not in out)
        return out

    # ---- health ------------------------------------------------------------

    def record_probe(
        self,
        address: Address,
        *,
        ok: bool,
        now: float,
        latency: float | None = None,
        duration: float | None = None,
        error: str | None = None,
        auth_refused: bool = False,
        answered: bool = False,
    ) -> list[Change]:
        """Apply one probe result. ``latency`` (seconds) sets the tier on success.

        ``answered``: a failed probe got an HTTP answer (not a timeout or a
        connection error).
        """
        up = self._members.get(address)
        if up is None:  # removed while the probe was in flight
            return []
        was_usable, old_tier = up.usable, up.tier
        up.stats.probed(ok=ok, duration=duration)
        changes: list[Change] = []
        if ok:
            up.score = min(SCORE_MAX, up.score + 1)
            up.probed_ok = True
            up.suspect = False
            if up.held_until is not None and now >= up.held_until:
                up.held_until = None
            up.last_error = error if auth_refused else None
            if auth_refused and not up.auth_refused:
                changes.append(Change(address, ChangeKind.AUTH, error or "credentials refused"))
            up.auth_refused = auth_refused
            if latency is not None:
                up.latency = latency
                up.tier = next_tier(up.tier, latency, self.tier_thresholds)
        else:
            up.failing_answered = answered
            up.score = max(SCORE_MIN, up.score - 1)
            up.last_error = error or "probe failed"
        changes.extend(self._after(up, was_usable, old_tier, now, error or "probe failed"))
        return changes

    def record_dial_failure(self, address: Address, *, now: float, error: str) -> list[Change]:
        """Passive health: a client's dial to this upstream failed."""
        return self.record_passive_failure(
            address, now=now, error=f"dial failed: {error}", dial=True
        )

    def record_passive_failure(
        self, address: Address, *, now: float, error: str, dial: bool = False
    ) -> list[Change]:
        """A client connection showed the upstream broken (failed dial, reset, no answer).

        The upstream turns suspect (no new clients) until its next successful
        probe, and loses one point of score.
        """
        up = self._members.get(address)
        if up is None:
            return []
        was_usable, old_tier = up.usable, up.tier
        if dial:
            up.stats.dial_failures_total += 1
        up.failing_answered = False
        up.score = max(SCORE_MIN, up.score - 1)
        up.suspect = True
        up.last_error = error
        out = self._after(up, was_usable, old_tier, now, error)
        out.append(Change(address, ChangeKind.SUSPECT, error))
        return out

    def _after(
        self, up: Upstream, was_usable: bool, old_tier: int | None, now: float, why: str
    ) -> list[Change]:
        out: list[Change] = []
        if up.usable and not was_usable:
            up.unhealthy_since = None
            up.stats.transitions_total += 1
            out.append(Change(up.address, ChangeKind.HEALTHY, f"score {up.score}"))
        elif was_usable and not up.usable:
            up.unhealthy_since = now
            up.stats.transitions_total += 1
            up.falls = [t for t in up.falls if now - t < FLAP_WINDOW] + [now]
            hold = hold_down(len(up.falls))
            if hold > 0:
                up.held_until = now + hold
                why = f"{why}; fall {len(up.falls)} in {FLAP_WINDOW:g}s, held down {hold:g}s"
            out.append(Change(up.address, ChangeKind.UNHEALTHY, f"{why} (score {up.score})"))
        elif not up.usable and up.unhealthy_since is None:
            # A new upstream whose first probes fail: not a transition (it was
            # never healthy; apiservers and kap often start together). The
            # prober warns once if it stays so (NEVER_HEALTHY).
            up.unhealthy_since = now
        if old_tier is not None and up.tier != old_tier:
            out.append(
                Change(
                    up.address,
                    ChangeKind.TIER,
                    f"tier {old_tier} -> {up.tier} (latency {(up.latency or 0) * 1e3:.3f} ms)",
                )
            )
        return out

    def connection_opened(self, address: Address) -> None:
        up = self._members.get(address)
        if up is not None:
            up.active_connections += 1
            up.stats.connections_total += 1

    def connection_closed(self, address: Address) -> None:
        up = self._members.get(address)
        if up is not None and up.active_connections > 0:
            up.active_connections -= 1

    # ---- policies: pure, their thresholds come in as arguments -------------

    def to_drain(self, now: float, *, after: float) -> list[Upstream]:
        """Upstreams whose clients are to be closed now (Drain, above); ``after <= 0``: none."""
        if after <= 0 or not self.usable():
            return []
        return [
            u
            for u in self._members.values()
            if u.unhealthy_since is not None
            and not u.failing_answered
            and now - u.unhealthy_since >= after
            and u.active_connections > 0
        ]

    def confirm_delay(
        self,
        address: Address,
        *,
        failed: bool,
        waited: bool = False,
        inconclusive: bool = False,
        interval: float,
        timeout: float,
    ) -> float | None:
        """Seconds to the next probe when it comes early (Fast confirmation, above), else None.

        ``waited``: the failed probe's connection did not open in its budget
        (the next comes at once); ``inconclusive``: kap was too busy to tell.
        """
        if inconclusive:
            return fast_delay(interval, timeout)
        up = self._members.get(address)
        if not failed or up is None or not up.probed_ok or up.score < 0:
            return None
        return 0.0 if waited else fast_delay(interval, timeout)

    # ---- membership --------------------------------------------------------

    def set_source(
        self, source: str, addresses: Iterable[Address], *, now: float, allow_empty: bool = False
    ) -> list[Change]:
        """Make ``addresses`` the full set of ``source``; others lose that source.

        An empty set is ignored unless ``allow_empty`` (an empty discovery
        result is far more likely a fault than a control plane with no
        apiservers). Upstreams left with no source are removed after
        ``removal_grace``; see ``expire``.
        """
        wanted = list(dict.fromkeys(addresses))
        if not wanted and not allow_empty:
            why = f"empty {source} update ignored"
            return [
                Change(u.address, ChangeKind.KEPT, why)
                for u in self.upstreams
                if source in u.sources
            ]
        changes: list[Change] = []
        for addr in wanted:
            up = self._members.get(addr)
            if up is None:
                up = Upstream(addr, order=self._next_order)
                self._next_order += 1
                self._members[addr] = up
                changes.append(Change(addr, ChangeKind.ADDED, f"from {source}"))
            elif up.remove_at is not None:
                up.remove_at = None
                changes.append(
                    Change(addr, ChangeKind.KEPT, f"back in {source}, removal cancelled")
                )
            up.sources.add(source)
        keep = set(wanted)
        for up in self._members.values():
            if source in up.sources and up.address not in keep:
                up.sources.discard(source)
                if not up.sources and up.remove_at is None:
                    up.remove_at = now + self.removal_grace
                    why = (
                        f"gone from {source}; removed in {self.removal_grace:g}s unless it returns"
                    )
                    changes.append(Change(up.address, ChangeKind.REMOVING, why))
        return changes

    def expire(self, now: float) -> list[Change]:
        """Remove upstreams whose removal grace has passed (``REMOVED``: drain their clients)."""
        gone = [u for u in self._members.values() if u.remove_at is not None and u.remove_at <= now]
        for u in gone:
            del self._members[u.address]
        return [Change(u.address, ChangeKind.REMOVED, "removal grace over") for u in gone]

    def next_expiry(self) -> float | None:
        times = [u.remove_at for u in self._members.values() if u.remove_at is not None]
        return min(times) if times else None

    def addresses(self, source: str | None = None) -> list[Address]:
        return [u.address for u in self.upstreams if source is None or source in u.sources]
