"""
The mDNS responder (RFC 6762) with DNS-SD (RFC 6763), pure and clock-driven.

Two classes:

- :class:`Responder` owns the names: the host name and one service instance
  name per advertised service.  Each name is a :class:`Claim` that goes
  ``probing`` (three probes 250 ms apart after a random 0-250 ms wait) ->
  ``announcing`` (``announcements`` unsolicited responses, 1 s then doubling
  apart) -> ``claimed``.  A conflict while probing renames the claim
  (``piccolo`` -> ``piccolo-2`` for the host, ``piccolo`` -> ``piccolo (2)``
  for service instances) and probes again; a conflict after claiming puts it
  back to probing (RFC 6762 §9), so a name still held by someone else is
  then renamed.  It answers queries and watches responses for conflicts.
- :class:`MdnsProtocol` is the ``DatagramProtocol`` of one interface: it
  bounds, rate-limits and strictly decodes packets, hands them to the
  responder, and keeps the per-interface state that RFC 6762 makes
  per-interface (when a record was last multicast, the aggregation queue,
  counters).

Neither touches sockets or the reactor beyond ``transport.write`` and the
injected clock; :mod:`piccolod.mdns.service` binds the sockets.

Our own multicast comes back to us (loopback mode is on so that other
responders on this host hear us); every packet we multicast is remembered for
a few seconds and an identical packet received is dropped, so a responder
never answers itself nor sees itself as a conflict, even on ``lo`` where every
participant's source address is 127.0.0.1.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.names import dns

from piccolod.events import HealthLevel
from piccolod.kernel.aio import provides
from piccolod.mdns.codec import (
    MAX_PACKET,
    MIN_PACKET,
    MalformedPacket,
    decode,
    encode_query,
    encode_responses,
)
from piccolod.mdns.ratelimit import RateLimiter
from piccolod.mdns.records import (
    ANY_CLASS,
    CLASS_IN,
    MDNS_GROUP,
    MDNS_PORT,
    QU_BIT,
    Record,
    ServiceSpec,
    Zone,
    canonical_rdata,
    host_fqdn,
    host_records,
    instance_fqdn,
    next_host_label,
    next_instance_label,
    rr_ident,
    service_records,
)

__all__ = [
    "Claim",
    "ClaimState",
    "MdnsProtocol",
    "NameCallback",
    "Responder",
]

Ident = tuple[bytes, int, bytes]
Address = tuple[str, int]

#: ``(kind, requested, claimed, reason)``: a name was claimed or renamed
#: (``claimed`` is ``""`` when a service was withdrawn).
NameCallback = Callable[[str, str, str, str], None]

PROBE_COUNT = 3
PROBE_INTERVAL = 0.250
PROBE_JITTER = 0.250
#: RFC 6762 §8.2: the loser of a simultaneous probe waits one second.
TIEBREAK_DELAY = 1.0
#: RFC 6762 §8.1: after 15 conflicts within 10 s, wait 5 s between attempts.
CONFLICT_WINDOW = 10.0
CONFLICT_LIMIT = 15
CONFLICT_BACKOFF = 5.0
#: RFC 6762 §6: shared-record answers are delayed 20-120 ms (400-500 ms when
#: the query's known-answer list continues in more packets).
AGGREGATE_DELAY = (0.020, 0.120)
TRUNCATED_DELAY = (0.400, 0.500)
#: RFC 6762 §6: a record is multicast at most once a second per interface,
#: or every 250 ms when defending against a probe.
MIN_MULTICAST_INTERVAL = 1.0
PROBE_DEFENCE_INTERVAL = 0.250
#: RFC 6762 §6.7: TTL cap in legacy unicast responses.
LEGACY_TTL = 10
#: How long a packet we multicast is recognised when it comes back to us.
OWN_PACKET_MEMORY = 5.0
OWN_PACKET_LIMIT = 512
#: Prune the per-interface "last multicast" table of departed records past this size.
LAST_MULTICAST_LIMIT = 256
#: A send error within this many seconds makes the interface's health WARN.
SEND_ERROR_WINDOW = 60.0

_EPS = 1e-6


class ClaimState(enum.Enum):
    """Where a name is in RFC 6762's probe/announce cycle."""

    PROBING = "probing"
    ANNOUNCING = "announcing"
    CLAIMED = "claimed"


@attrs.define(eq=False)
class Claim:
    """
    One name we want: the host name (``kind="host"``) or a service instance
    name (``kind="service"``, with its :class:`ServiceSpec`).

    @ivar requested: the label asked for; ``label`` is the current one.
    @ivar due: when the next probe or announcement is due (clock seconds).
    """

    kind: str
    key: str
    requested: str
    label: str
    spec: ServiceSpec | None = None
    state: ClaimState = ClaimState.PROBING
    probes_sent: int = 0
    announcements_sent: int = 0
    due: float | None = None
    published_label: str | None = None
    #: the host label the last announced SRV pointed at (services only)
    srv_host: str | None = None

    @property
    def active(self) -> bool:
        """Whether its records are answered (it finished probing)."""
        return self.state is not ClaimState.PROBING

    def fqdn(self) -> bytes:
        if self.spec is None:
            return host_fqdn(self.label)
        return instance_fqdn(self.label, self.spec.service_type)

    def requested_fqdn(self) -> bytes:
        if self.spec is None:
            return host_fqdn(self.requested)
        return instance_fqdn(self.requested, self.spec.service_type)


@attrs.define(eq=False)
class _Pending:
    """A record waiting in an interface's aggregation queue."""

    record: Record
    min_interval: float
    queriers: set[Address] = attrs.field(factory=set)
    unconditional: bool = False


def _tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _display(name: bytes) -> str:
    return name.decode("utf-8", errors="replace")


@attrs.define(eq=False, repr=False)
class Responder:
    """
    The names and records of this host, shared by every interface.

    @ivar clock: drives probing, announcing and aggregation.
    @ivar hostname: the requested host label (``piccolo``).
    @ivar ipv6_addresses: AAAA records advertised on every interface (the
        transport is IPv4; see docs/mdns.md).
    @ivar rand: uniform ``[0, 1)`` source for the RFC's random delays.
    @ivar on_name: called when a name is claimed, renamed or withdrawn.
    @ivar on_change: called when any claim changes state (for health).
    @ivar announcements: unsolicited announcements per claim (RFC: 2 to 8).
    """

    log: ClassVar[Logger] = Logger()

    clock: IReactorTime = attrs.field(validator=provides(IReactorTime))
    hostname: str
    ipv6_addresses: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    rand: Callable[[], float] = attrs.field(factory=lambda: random.Random().random)
    on_name: NameCallback | None = None
    on_change: Callable[[], None] | None = None
    announcements: int = 3

    running: bool = attrs.field(init=False, default=False)
    conflicts: int = attrs.field(init=False, default=0)
    _interfaces: list[MdnsProtocol] = attrs.field(init=False, factory=list)
    _claims: dict[str, Claim] = attrs.field(init=False, factory=dict)
    _timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _own: dict[bytes, float] = attrs.field(init=False, factory=dict)
    _conflict_times: deque[float] = attrs.field(init=False, factory=deque)
    _zones: dict[str, Zone] = attrs.field(init=False, factory=dict)
    _by_name: dict[bytes, Claim] | None = attrs.field(init=False, default=None)

    def __repr__(self) -> str:
        return f"<Responder {self.hostname!r} running={self.running}>"

    def __attrs_post_init__(self) -> None:
        if not 2 <= self.announcements <= 8:
            raise ValueError("announcements must be between 2 and 8 (RFC 6762 §8.3)")
        self._claims["host"] = Claim("host", "host", self.hostname, self.hostname)

    # ------------------------------------------------------------------
    # Lifecycle and registry

    def start(self) -> None:
        """Begin probing every name (one random delay for all: one packet)."""
        if self.running:
            return
        self.running = True
        delay = self.rand() * PROBE_JITTER
        for claim in self._claims.values():
            self._start_probe(claim, delay)
        self._reschedule()

    def stop(self) -> None:
        """
        Send goodbyes (TTL 0) for every active record on every interface,
        cancel all timers and forget claimed state (a later ``start`` probes
        again).  Idempotent.
        """
        if not self.running:
            return
        for proto in self._interfaces:
            records = self.zone(proto).records
            if records:
                self._goodbye(proto, records)
            proto.cancel_pending()
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for claim in self._claims.values():
            claim.state = ClaimState.PROBING
            claim.due = None
        self._changed()

    def add_interface(self, proto: MdnsProtocol) -> None:
        """
        Attach an interface.  Names already claimed are announced on it at
        once (names still probing are probed there from their next probe).
        """
        if proto in self._interfaces:
            return
        self._interfaces.append(proto)
        self._zones.pop(proto.address, None)
        if self.running:
            claims = [c for c in self._claims.values() if c.active]
            if claims:
                self._announce(proto, claims)

    def remove_interface(self, proto: MdnsProtocol) -> None:
        """Detach an interface (no goodbyes: its socket is gone)."""
        if proto in self._interfaces:
            self._interfaces.remove(proto)
            proto.cancel_pending()
        self._zones.pop(proto.address, None)

    @property
    def interfaces(self) -> Sequence[MdnsProtocol]:
        return tuple(self._interfaces)

    def publish(self, spec: ServiceSpec) -> None:
        """
        Advertise a service (or update it).  A new instance name is probed
        first; a changed port or TXT of a claimed one is just re-announced
        (RFC 6762 §8.4).  Raises ``ValueError`` for the reserved key ``host``.
        """
        if spec.key == "host":
            raise ValueError("the service key 'host' is reserved for the host name")
        existing = self._claims.get(spec.key)
        if existing is not None and existing.spec is not None:
            if existing.spec == spec:
                return
            same_name = (
                existing.spec.service_type == spec.service_type
                and existing.requested == spec.instance
            )
            if same_name:
                existing.spec = spec
                if existing.active and self.running:
                    self._start_announcing(existing)
                self._changed()
                self._reschedule()
                return
            self.withdraw(spec.key)
        claim = Claim("service", spec.key, spec.instance, spec.instance, spec)
        self._claims[spec.key] = claim
        if self.running:
            self._start_probe(claim, self.rand() * PROBE_JITTER)
        self._changed()
        self._reschedule()

    def withdraw(self, key: str) -> None:
        """Stop advertising a service; goodbyes for the records that go away."""
        claim = self._claims.get(key)
        if claim is None or claim.spec is None:
            return
        was_active = claim.active and self.running
        before = {proto.address: self.zone(proto) for proto in self._interfaces}
        del self._claims[key]
        self._changed()
        if was_active:
            for proto in self._interfaces:
                after = self.zone(proto)
                gone = [r for r in before[proto.address].records if r.ident not in after.idents]
                if gone:
                    self._goodbye(proto, gone)
        if claim.published_label is not None:
            self._emit("service", _display(claim.requested_fqdn()), "", "withdrawn")
        self._reschedule()

    def claims(self) -> Sequence[Claim]:
        """Every claim, host first."""
        return tuple(self._claims.values())

    @property
    def host(self) -> Claim:
        return self._claims["host"]

    def host_name(self) -> str:
        """The claimed host name (``piccolo.local``), ``""`` while not claimed."""
        host = self.host
        return _display(host.fqdn()) if (host.active and self.running) else ""

    # ------------------------------------------------------------------
    # Records

    def claim_records(self, claim: Claim, proto: MdnsProtocol) -> list[Record]:
        """The records of ``claim`` as sent on ``proto``'s interface."""
        if claim.spec is None:
            return host_records(claim.label, proto.ipv4, self.ipv6_addresses)
        return service_records(claim.label, claim.spec, self.host.label)

    def zone(self, proto: MdnsProtocol) -> Zone:
        """The active records on ``proto``'s interface (cached until a change)."""
        zone = self._zones.get(proto.address)
        if zone is None:
            records: list[Record] = []
            if self.running:
                for claim in self._claims.values():
                    if claim.active:
                        records.extend(self.claim_records(claim, proto))
            zone = Zone(records)
            self._zones[proto.address] = zone
        return zone

    def _claim_for(self, name: bytes) -> Claim | None:
        if self._by_name is None:
            self._by_name = {c.fqdn().lower(): c for c in self._claims.values()}
        return self._by_name.get(name)

    def _changed(self) -> None:
        self._zones.clear()
        self._by_name = None
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                self.log.failure("mDNS on_change callback failed")

    # ------------------------------------------------------------------
    # Own packets

    def remember_own(self, packet: bytes) -> None:
        """Remember a packet we multicast, to drop it when it loops back."""
        now = self.clock.seconds()
        self._own[packet] = now + OWN_PACKET_MEMORY
        if len(self._own) > OWN_PACKET_LIMIT:
            for old in [p for p, expiry in self._own.items() if expiry <= now]:
                del self._own[old]
            while len(self._own) > OWN_PACKET_LIMIT:
                del self._own[next(iter(self._own))]

    def is_own(self, packet: bytes) -> bool:
        """True for a packet we multicast in the last few seconds."""
        expiry = self._own.get(packet)
        if expiry is None:
            return False
        if expiry < self.clock.seconds():
            del self._own[packet]
            return False
        return True

    # ------------------------------------------------------------------
    # Probing and announcing

    def _start_probe(self, claim: Claim, delay: float) -> None:
        now = self.clock.seconds()
        while self._conflict_times and self._conflict_times[0] < now - CONFLICT_WINDOW:
            self._conflict_times.popleft()
        if len(self._conflict_times) >= CONFLICT_LIMIT:
            delay = max(delay, CONFLICT_BACKOFF)
        claim.state = ClaimState.PROBING
        claim.probes_sent = 0
        claim.announcements_sent = 0
        claim.due = now + delay
        self._changed()

    def _start_announcing(self, claim: Claim) -> None:
        claim.state = ClaimState.ANNOUNCING
        claim.announcements_sent = 0
        claim.due = self.clock.seconds()

    def _reschedule(self) -> None:
        dues = [c.due for c in self._claims.values() if c.due is not None]
        if not dues or not self.running:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        when = min(dues)
        if self._timer is not None and self._timer.active():
            if abs(self._timer.getTime() - when) < _EPS:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self.running:
            return
        now = self.clock.seconds()
        to_probe: list[Claim] = []
        for claim in list(self._claims.values()):
            if claim.state is not ClaimState.PROBING or claim.due is None:
                continue
            if claim.due > now + _EPS:
                continue
            if claim.probes_sent < PROBE_COUNT:
                claim.probes_sent += 1
                claim.due = now + PROBE_INTERVAL
                to_probe.append(claim)
            else:
                self._won(claim)
        if to_probe:
            for proto in self._interfaces:
                self._probe(proto, to_probe)
        to_announce: list[Claim] = []
        for claim in self._claims.values():
            if claim.state is not ClaimState.ANNOUNCING or claim.due is None:
                continue
            if claim.due > now + _EPS:
                continue
            claim.announcements_sent += 1
            if claim.spec is not None:
                claim.srv_host = self.host.label
            if claim.announcements_sent >= self.announcements:
                claim.state = ClaimState.CLAIMED
                claim.due = None
            else:
                claim.due = now + float(2 ** (claim.announcements_sent - 1))
            to_announce.append(claim)
        if to_announce:
            self._changed()
            for proto in self._interfaces:
                self._announce(proto, to_announce)
        self._reschedule()

    def _won(self, claim: Claim) -> None:
        """Probing ended without conflict: the name is ours."""
        self._start_announcing(claim)
        self._changed()
        if claim.published_label != claim.label:
            reason = "claimed" if claim.label == claim.requested else "conflict"
            self._emit(claim.kind, _display(claim.requested_fqdn()), _display(claim.fqdn()), reason)
            claim.published_label = claim.label
            self.log.info(
                "mDNS: claimed {name} (requested {requested})",
                name=_display(claim.fqdn()),
                requested=_display(claim.requested_fqdn()),
            )
        if claim.spec is None:
            # Every SRV names the host: re-announce services whose SRV
            # went out with an older host name.
            for other in self._claims.values():
                if other.active and other.srv_host not in (None, claim.label):
                    self._start_announcing(other)

    def _emit(self, kind: str, requested: str, claimed: str, reason: str) -> None:
        if self.on_name is None:
            return
        try:
            self.on_name(kind, requested, claimed, reason)
        except Exception:
            self.log.failure("mDNS on_name callback failed")

    def _probe(self, proto: MdnsProtocol, claims: Sequence[Claim]) -> None:
        """One probe packet per budget: ANY questions plus proposed records."""
        queries: list[dns.Query] = []
        authority: list[dns.RRHeader] = []
        for claim in claims:
            # QU on the first probe only: answers to later probes are then
            # multicast, which reaches us even where another mDNS stack on
            # this host receives the unicast traffic to port 5353.
            qclass = CLASS_IN | (QU_BIT if claim.probes_sent == 1 else 0)
            queries.append(dns.Query(claim.fqdn(), dns.ALL_RECORDS, qclass))
            authority.extend(
                r.rr(flush=False) for r in self.claim_records(claim, proto) if r.unique
            )
        proto.multicast(encode_query(queries, authority))
        proto.stats["probes_sent"] += 1

    def _announce(self, proto: MdnsProtocol, claims: Iterable[Claim]) -> None:
        records: list[Record] = []
        seen: set[Ident] = set()
        for claim in claims:
            for record in self.claim_records(claim, proto):
                if record.ident not in seen:
                    seen.add(record.ident)
                    records.append(record)
        if not records:
            return
        zone = self.zone(proto)
        extra = [r for r in zone.additionals(records, seen) if r.rtype in (dns.A, dns.AAAA)]
        proto.send_multicast_records(records, extra)
        proto.stats["announcements_sent"] += 1

    def _goodbye(self, proto: MdnsProtocol, records: Sequence[Record]) -> None:
        for packet in encode_responses([r.rr(ttl=0) for r in records]):
            proto.multicast(packet)
        proto.forget_multicast(records)
        proto.stats["goodbyes_sent"] += 1

    # ------------------------------------------------------------------
    # Conflicts

    def _note_conflict(self) -> None:
        self.conflicts += 1
        self._conflict_times.append(self.clock.seconds())

    def _rename(self, claim: Claim, proto: MdnsProtocol, reason: str) -> None:
        old = claim.fqdn()
        if claim.spec is None:
            claim.label = next_host_label(claim.label, claim.requested)
        else:
            claim.label = next_instance_label(claim.label, claim.requested)
        self._note_conflict()
        proto.stats["conflicts"] += 1
        self.log.warn(
            "mDNS: {name} is taken on {interface} ({reason}); trying {new}",
            name=_display(old),
            interface=proto.address,
            reason=reason,
            new=_display(claim.fqdn()),
        )
        self._start_probe(claim, self.rand() * PROBE_JITTER)

    def _reprobe(self, claim: Claim, proto: MdnsProtocol) -> None:
        self._note_conflict()
        proto.stats["conflicts"] += 1
        self.log.warn(
            "mDNS: conflicting record for claimed {name} on {interface}; probing again",
            name=_display(claim.fqdn()),
            interface=proto.address,
        )
        self._start_probe(claim, self.rand() * PROBE_JITTER)

    def _tiebreak(self, proto: MdnsProtocol, message: dns.Message) -> None:
        """RFC 6762 §8.2: simultaneous probes; the lexicographically later set wins."""
        theirs: dict[bytes, list[tuple[int, int, bytes]]] = {}
        for rr in message.authority:
            name = rr.name.name.lower()
            theirs.setdefault(name, []).append(
                (rr.cls & 0x7FFF, rr.type, canonical_rdata(rr.type, rr.payload))
            )
        restarted = False
        for name, records in theirs.items():
            claim = self._claim_for(name)
            if claim is None or claim.state is not ClaimState.PROBING:
                continue
            ours = sorted(
                (CLASS_IN, r.rtype, r.rdata) for r in self.claim_records(claim, proto) if r.unique
            )
            if ours < sorted(records):
                proto.stats["tiebreaks_lost"] += 1
                self.log.info(
                    "mDNS: lost a simultaneous probe for {name} on {interface}; retrying",
                    name=_display(claim.fqdn()),
                    interface=proto.address,
                )
                self._start_probe(claim, TIEBREAK_DELAY)
                restarted = True
        if restarted:
            self._reschedule()

    # ------------------------------------------------------------------
    # Incoming packets

    def handle(self, proto: MdnsProtocol, message: dns.Message, addr: Address) -> None:
        """A decoded packet from ``addr`` arrived on ``proto``'s interface."""
        if not self.running:
            return
        if message.opCode != dns.OP_QUERY or message.rCode != 0:
            proto.stats["ignored"] += 1
            return
        if message.answer:
            self._handle_response(proto, message, addr)
        else:
            self._handle_query(proto, message, addr)

    def _handle_response(self, proto: MdnsProtocol, message: dns.Message, addr: Address) -> None:
        if addr[1] != MDNS_PORT:
            # RFC 6762 §6: responses from another port are not mDNS.
            proto.stats["ignored"] += 1
            return
        proto.stats["responses_received"] += 1
        handled: set[int] = set()
        for rr in [*message.answers, *message.additional]:
            ident = rr_ident(rr)
            proto.suppress_duplicate(ident, rr.ttl)
            if rr.ttl == 0:
                continue
            claim = self._claim_for(ident[0])
            if claim is None or id(claim) in handled:
                continue
            ours = self.claim_records(claim, proto)
            if any(r.ident == ident for r in ours):
                continue
            if claim.state is ClaimState.PROBING:
                handled.add(id(claim))
                self._rename(claim, proto, "answer to our probe")
            elif any(r.unique and r.key == (ident[0], rr.type) for r in ours):
                handled.add(id(claim))
                self._reprobe(claim, proto)
        if handled:
            self._reschedule()

    def _handle_query(self, proto: MdnsProtocol, message: dns.Message, addr: Address) -> None:
        proto.stats["queries_received"] += 1
        legacy = addr[1] != MDNS_PORT
        known: dict[Ident, int] = {}
        for rr in message.answers:
            ident = rr_ident(rr)
            known[ident] = max(known.get(ident, 0), rr.ttl)
        if known:
            proto.apply_known_answers(known, addr)
        is_probe = bool(message.authority)
        if is_probe and not legacy:
            self._tiebreak(proto, message)
        zone = self.zone(proto)
        now = self.clock.seconds()
        unicast: list[Record] = []
        multicast_now: list[Record] = []
        multicast_later: list[Record] = []
        chosen: set[Ident] = set()
        for question in message.queries:
            if question.cls & 0x7FFF not in (CLASS_IN, ANY_CLASS):
                continue
            qu = bool(question.cls & QU_BIT)
            fresh: list[Record] = []
            name = question.name.name
            # RFC 6762 §6.1: a type our unique name lacks is answered with its NSEC.
            matched = zone.lookup(name, question.type) or zone.negative(name, question.type)
            for record in matched:
                if record.ident in chosen:
                    continue
                known_ttl = known.get(record.ident)
                if known_ttl is not None and known_ttl >= record.ttl / 2:
                    proto.stats["known_answers_suppressed"] += 1
                    continue
                chosen.add(record.ident)
                fresh.append(record)
            if not fresh:
                continue
            if legacy:
                unicast.extend(fresh)
                continue
            shared = any(not r.unique for r in fresh)
            for record in fresh:
                last = proto.last_multicast(record.ident)
                if qu and last is not None and now - last < record.ttl / 4:
                    unicast.append(record)
                elif (is_probe or not shared) and not message.trunc:
                    multicast_now.append(record)
                else:
                    multicast_later.append(record)
        if unicast:
            self._unicast(
                proto=proto,
                message=message,
                addr=addr,
                records=unicast,
                known=set(known),
                legacy=legacy,
            )
        if multicast_now:
            interval = PROBE_DEFENCE_INTERVAL if is_probe else MIN_MULTICAST_INTERVAL
            proto.enqueue(multicast_now, None, 0.0, interval)
        if multicast_later:
            low, high = TRUNCATED_DELAY if message.trunc else AGGREGATE_DELAY
            delay = low + (high - low) * self.rand()
            proto.enqueue(multicast_later, addr, delay, MIN_MULTICAST_INTERVAL)

    def _unicast(
        self,
        *,
        proto: MdnsProtocol,
        message: dns.Message,
        addr: Address,
        records: list[Record],
        known: set[Ident],
        legacy: bool,
    ) -> None:
        zone = self.zone(proto)
        exclude = known | {r.ident for r in records}
        extra = zone.additionals(records, exclude)
        if legacy:
            # RFC 6762 §6.7: echo id and question, TTL <= 10 s, no cache-flush bit.
            answers = [r.rr(ttl=min(r.ttl, LEGACY_TTL), flush=False) for r in records]
            additional = [r.rr(ttl=min(r.ttl, LEGACY_TTL), flush=False) for r in extra]
            packets = encode_responses(
                answers, additional, message_id=message.id, queries=message.queries
            )
            proto.stats["legacy_responses"] += 1
        else:
            packets = encode_responses([r.rr() for r in records], [r.rr() for r in extra])
            proto.stats["unicast_responses"] += 1
        for packet in packets:
            proto.send(packet, addr)


@attrs.define(eq=False, repr=False)
class MdnsProtocol(DatagramProtocol):
    """
    The mDNS endpoint of one interface (one IPv4 address).

    Incoming packets are checked in order of cost: size (12 to
    ``max_packet`` bytes), our own looped-back multicast, the source's
    on-link prefix (when ``network`` is given), the per-source rate limit,
    strict decoding.  Every drop is counted in ``stats``; nothing received
    ever raises out of :meth:`datagramReceived`.

    @ivar address: this interface's IPv4 address (advertised as A).
    @ivar network: optional on-link prefix; packets from other sources are
        dropped (RFC 6762 §11).
    """

    log: ClassVar[Logger] = Logger()
    #: DatagramProtocol's "Starting protocol" lines: the service logs instead.
    noisy = False

    responder: Responder
    address: str
    clock: IReactorTime = attrs.field(validator=provides(IReactorTime))
    rate: float = 20.0
    burst: float = 40.0
    max_packet: int = MAX_PACKET
    network: Any = None  # ipaddress.IPv4Network | None
    stats: Counter[str] = attrs.field(init=False, factory=Counter)
    last_error: str | None = attrs.field(init=False, default=None)
    last_error_at: float | None = attrs.field(init=False, default=None)
    _limiter: RateLimiter = attrs.field(init=False)
    _last_multicast: dict[Ident, float] = attrs.field(init=False, factory=dict)
    _pending: dict[Ident, _Pending] = attrs.field(init=False, factory=dict)
    _pending_timer: IDelayedCall | None = attrs.field(init=False, default=None)

    def __repr__(self) -> str:
        return f"<MdnsProtocol {self.address}>"

    @_limiter.default
    def _make_limiter(self) -> RateLimiter:
        return RateLimiter(self.clock, self.rate, self.burst)

    @property
    def ipv4(self) -> str | None:
        return self.address if ":" not in self.address else None

    # ------------------------------------------------------------------
    # Receiving

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            self._receive(datagram, addr)
        except Exception:
            self.stats["internal_errors"] += 1
            self.log.failure(
                "mDNS: internal error on a packet from {source} on {interface}",
                source=addr,
                interface=self.address,
            )

    def _receive(self, datagram: bytes, addr: Any) -> None:
        self.stats["received"] += 1
        if not isinstance(datagram, bytes) or not (MIN_PACKET <= len(datagram) <= self.max_packet):
            self.stats["dropped_size"] += 1
            return
        if self.responder.is_own(datagram):
            self.stats["own_packets"] += 1
            return
        source = addr[0]
        if self.network is not None and not self._on_link(source):
            self.stats["dropped_offlink"] += 1
            return
        if not self._limiter.allow(source):
            self.stats["dropped_rate"] += 1
            return
        try:
            message = decode(datagram)
        except MalformedPacket:
            self.stats["dropped_malformed"] += 1
            return
        self.responder.handle(self, message, (str(source), int(addr[1])))

    def _on_link(self, source: str) -> bool:
        try:
            return ipaddress.IPv4Address(source) in self.network
        except ValueError:
            return False

    # ------------------------------------------------------------------
    # Sending

    def send(self, packet: bytes, dest: Address) -> bool:
        """Write one packet; a socket error is counted and logged, never raised."""
        if self.transport is None:
            self.stats["send_skipped"] += 1
            return False
        try:
            self.transport.write(packet, dest)
        except Exception as e:
            self.stats["send_errors"] += 1
            self.last_error = f"{type(e).__name__}: {e}"
            self.last_error_at = self.clock.seconds()
            self.log.warn(
                "mDNS: sending to {dest} on {interface} failed: {error}",
                dest=dest,
                interface=self.address,
                error=self.last_error,
            )
            return False
        self.stats["packets_sent"] += 1
        return True

    def multicast(self, packet: bytes) -> bool:
        self.responder.remember_own(packet)
        return self.send(packet, (MDNS_GROUP, MDNS_PORT))

    def send_multicast_records(
        self, records: Sequence[Record], extra: Sequence[Record] = ()
    ) -> None:
        """Multicast ``records`` (with ``extra`` as additionals) and note when."""
        for packet in encode_responses([r.rr() for r in records], [r.rr() for r in extra]):
            self.multicast(packet)
        now = self.clock.seconds()
        for record in (*records, *extra):
            self._last_multicast[record.ident] = now
            self._pending.pop(record.ident, None)
        if len(self._last_multicast) > LAST_MULTICAST_LIMIT:
            # Records of names since renamed or withdrawn: keep the table bounded.
            current = self.responder.zone(self).idents
            for ident in [i for i in self._last_multicast if i not in current]:
                del self._last_multicast[ident]

    def last_multicast(self, ident: Ident) -> float | None:
        return self._last_multicast.get(ident)

    def forget_multicast(self, records: Iterable[Record]) -> None:
        for record in records:
            self._last_multicast.pop(record.ident, None)
            self._pending.pop(record.ident, None)

    # ------------------------------------------------------------------
    # Aggregation queue (RFC 6762 §6, §7.2, §7.4)

    def enqueue(
        self,
        records: Sequence[Record],
        querier: Address | None,
        delay: float,
        min_interval: float,
    ) -> None:
        """
        Multicast ``records`` after ``delay`` seconds, together with whatever
        else is queued, but no record within ``min_interval`` of its last
        multicast.  ``querier`` is whose question asked (its later
        known-answer packets may cancel the answer); ``None`` when the
        answer is owed regardless.
        """
        for record in records:
            entry = self._pending.get(record.ident)
            if entry is None:
                entry = self._pending[record.ident] = _Pending(record, min_interval)
            entry.min_interval = min(entry.min_interval, min_interval)
            if querier is None:
                entry.unconditional = True
            else:
                entry.queriers.add(querier)
        if delay <= 0:
            self._flush()
        else:
            self._schedule_flush(self.clock.seconds() + delay)

    def _schedule_flush(self, when: float) -> None:
        timer = self._pending_timer
        if timer is not None and timer.active():
            if timer.getTime() <= when + _EPS:
                return
            timer.cancel()
        self._pending_timer = self.clock.callLater(
            max(0.0, when - self.clock.seconds()), self._flush
        )

    def _flush(self) -> None:
        if self._pending_timer is not None and self._pending_timer.active():
            self._pending_timer.cancel()
        self._pending_timer = None
        if not self._pending:
            return
        now = self.clock.seconds()
        zone = self.responder.zone(self)
        ready: list[Record] = []
        wait_until: float | None = None
        for ident, entry in list(self._pending.items()):
            if ident not in zone.idents:
                del self._pending[ident]
                continue
            last = self._last_multicast.get(ident)
            if last is not None and now - last < entry.min_interval - _EPS:
                when = last + entry.min_interval
                wait_until = when if wait_until is None else min(wait_until, when)
                continue
            del self._pending[ident]
            ready.append(entry.record)
        if ready:
            chosen = {r.ident for r in ready}
            extra = zone.additionals(ready, chosen)
            self.send_multicast_records(ready, extra)
            self.stats["multicast_responses"] += 1
        if wait_until is not None:
            self._schedule_flush(wait_until)

    def apply_known_answers(self, known: Mapping[Ident, int], querier: Address) -> None:
        """A querier's known answers cancel the queued answers it asked for."""
        for ident, ttl in known.items():
            entry = self._pending.get(ident)
            if entry is None or ttl < entry.record.ttl / 2:
                continue
            entry.queriers.discard(querier)
            if not entry.queriers and not entry.unconditional:
                del self._pending[ident]
                self.stats["known_answers_suppressed"] += 1

    def suppress_duplicate(self, ident: Ident, ttl: int) -> None:
        """Another responder multicast a record we had queued (RFC 6762 §7.4)."""
        entry = self._pending.get(ident)
        if entry is not None and ttl >= entry.record.ttl / 2:
            del self._pending[ident]
            self.stats["duplicates_suppressed"] += 1

    def cancel_pending(self) -> None:
        self._pending.clear()
        if self._pending_timer is not None and self._pending_timer.active():
            self._pending_timer.cancel()
        self._pending_timer = None

    def stopProtocol(self) -> None:
        self.cancel_pending()

    # ------------------------------------------------------------------
    # Health

    def health(self) -> tuple[HealthLevel, str, dict[str, float]]:
        """This interface's level, message and figures."""
        figures = {k: float(v) for k, v in sorted(self.stats.items())}
        if self.transport is None:
            return HealthLevel.ERROR, "not listening", figures
        now = self.clock.seconds()
        if self.last_error_at is not None and now - self.last_error_at < SEND_ERROR_WINDOW:
            return HealthLevel.WARN, f"send failed: {self.last_error}", figures
        host = self.responder.host
        name = _display(host.fqdn())
        if not self.responder.running:
            return HealthLevel.WARN, "responder stopped", figures
        if host.state is ClaimState.PROBING:
            return HealthLevel.OK, f"probing {name}", figures
        return HealthLevel.OK, f"answering as {name}", figures
