"""
The mDNS record set: names, records and the services they advertise.

Pure values and functions, no I/O and no clock.  :class:`ServiceSpec` is what
is asked for (the portal, or an app listener from a ``RoutePublished``
event); :func:`host_records` and :func:`service_records` turn a claimed host
label and service instance label into resource records; :class:`Zone` indexes
the active records of one interface for answering questions.

TTLs follow RFC 6762 §10: 120 s for records whose name or rdata holds a host
name (A, AAAA, SRV), 4500 s (75 min) for the rest (PTR, TXT).

Negative answers (RFC 6762 §6.1): every unique name of the zone (the host
name, each service instance) has an NSEC record in the restricted mDNS
form (next domain name = the name itself, one bitmap window for types
below 256) listing the types it has; :meth:`Zone.negative` answers a
question for a type it lacks with it, and :meth:`Zone.additionals` adds
the host's NSEC when the host has only one address family.
twisted.names has no NSEC type: :class:`Record_NSEC` encodes it.

Names are ``bytes`` in dotted form without the trailing dot, as
``twisted.names.dns.Name`` holds them; comparisons are ASCII
case-insensitive (``name.lower()``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from io import BytesIO
from typing import Any

import attrs
from twisted.names import dns

from piccolod.events import RoutePublished

__all__ = [
    "ANY_CLASS",
    "CACHE_FLUSH",
    "CLASS_IN",
    "HOST_TTL",
    "MDNS_GROUP",
    "MDNS_PORT",
    "NSEC",
    "OTHER_TTL",
    "QU_BIT",
    "SERVICES_ENUM",
    "InvalidService",
    "Record",
    "Record_NSEC",
    "ServiceSpec",
    "Zone",
    "canonical_rdata",
    "host_fqdn",
    "host_records",
    "instance_fqdn",
    "is_valid_host_label",
    "next_host_label",
    "next_instance_label",
    "nsec_record",
    "rdata_a",
    "rdata_aaaa",
    "rdata_ptr",
    "rdata_srv",
    "rdata_txt",
    "rr_ident",
    "sanitize_label",
    "service_records",
]

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353

CLASS_IN = dns.IN
ANY_CLASS = dns.ANY
#: The top bit of a question's class: "unicast response requested" (QU).
QU_BIT = 0x8000
#: The top bit of a record's class: "cache flush" (the record is unique).
CACHE_FLUSH = 0x8000

HOST_TTL = 120
OTHER_TTL = 4500

SERVICES_ENUM = b"_services._dns-sd._udp.local"
LOCAL = b"local"

_HOST_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_SERVICE_TYPE = re.compile(r"^_[A-Za-z0-9](?:[A-Za-z0-9-]{0,14})\._(?:tcp|udp)$")
_HOST_SUFFIX = re.compile(r"^(.*)-([0-9]+)$")
_INSTANCE_SUFFIX = re.compile(r"^(.*) \(([0-9]+)\)$")


class InvalidService(ValueError):
    """A route cannot be advertised (bad service type, port or name)."""


# --------------------------------------------------------------------------
# Names


def is_valid_host_label(label: str) -> bool:
    """True for an RFC 1123 host label (letters, digits, inner hyphens)."""
    return bool(_HOST_LABEL.match(label))


def sanitize_label(text: str, limit: int = 63) -> str:
    """
    A DNS-SD instance label from free text: dots (which
    ``twisted.names.dns.Name`` cannot escape) and control characters become
    ``-``, and the UTF-8 form is cut to ``limit`` bytes on a character
    boundary.  Never empty.
    """
    cleaned = "".join("-" if (ch == "." or ord(ch) < 0x20 or ch == "\x7f") else ch for ch in text)
    cleaned = cleaned.strip() or "service"
    encoded = cleaned.encode("utf-8")
    if len(encoded) <= limit:
        return cleaned
    return encoded[:limit].decode("utf-8", errors="ignore").rstrip() or "service"


def host_fqdn(label: str) -> bytes:
    """``piccolo`` -> ``b"piccolo.local"``."""
    return label.encode("ascii") + b"." + LOCAL


def instance_fqdn(label: str, service_type: str) -> bytes:
    """``("piccolo", "_http._tcp")`` -> ``b"piccolo._http._tcp.local"``."""
    return label.encode("utf-8") + b"." + type_fqdn(service_type)


def type_fqdn(service_type: str) -> bytes:
    """``"_http._tcp"`` -> ``b"_http._tcp.local"``."""
    return service_type.encode("ascii") + b"." + LOCAL


def next_host_label(label: str, requested: str) -> str:
    """
    The next host label after a conflict: ``piccolo`` -> ``piccolo-2`` ->
    ``piccolo-3`` (RFC 6762 §9 leaves the scheme open; this is the one macOS
    and Avahi use for host names).
    """
    n = 2
    if label != requested:
        m = _HOST_SUFFIX.match(label)
        if m:
            n = int(m.group(2)) + 1
    suffix = f"-{n}"
    return requested[: 63 - len(suffix)].rstrip("-") + suffix


def next_instance_label(label: str, requested: str) -> str:
    """
    The next service instance label after a conflict: ``piccolo`` ->
    ``piccolo (2)`` -> ``piccolo (3)``: the "(2)" form that RFC 6762 §9's
    example and Bonjour use for human-readable instance names.
    """
    n = 2
    if label != requested:
        m = _INSTANCE_SUFFIX.match(label)
        if m:
            n = int(m.group(2)) + 1
    suffix = f" ({n})"
    room = 63 - len(suffix.encode("utf-8"))
    base = requested.encode("utf-8")[:room].decode("utf-8", errors="ignore").rstrip()
    return base + suffix


# --------------------------------------------------------------------------
# Records

# twisted.names.dns's record constructors are unannotated; these typed
# wrappers keep the ``no-untyped-call`` exemptions in one place.


def rdata_a(address: str) -> Any:
    return dns.Record_A(address)  # type: ignore[no-untyped-call]


def rdata_aaaa(address: str) -> Any:
    return dns.Record_AAAA(address)  # type: ignore[no-untyped-call]


def rdata_ptr(name: bytes) -> Any:
    return dns.Record_PTR(name)  # type: ignore[no-untyped-call]


def rdata_srv(priority: int, weight: int, port: int, target: bytes) -> Any:
    return dns.Record_SRV(priority, weight, port, target)  # type: ignore[no-untyped-call]


def rdata_txt(*strings: bytes) -> Any:
    return dns.Record_TXT(*strings)  # type: ignore[no-untyped-call]


#: The NSEC record type (RFC 4034), absent from twisted.names.
NSEC = 47


class Record_NSEC:  # noqa: N801 - named like twisted.names' record classes
    """
    The rdata of an NSEC record in the restricted form mDNS uses (RFC 6762
    §6.1): the next domain name (the record's own name) and a type bitmap
    with one window (block 0: types 1-255).  Implements
    ``twisted.names.dns.IEncodable`` so a ``dns.RRHeader`` can carry it.
    """

    TYPE = NSEC
    fancybasename = "NSEC"

    def __init__(self, next_name: bytes = b"", types: Iterable[int] = (), ttl: int = 0) -> None:
        self.next = dns.Name(next_name)
        self.types = frozenset(types)
        if any(not 0 < t < 256 for t in self.types):
            raise ValueError("the mDNS NSEC form holds types 1-255 only")
        self.ttl = ttl

    def encode(self, strio: Any, compDict: Any = None) -> None:
        # RFC 6762 §18.14: the next domain name is not compressed in NSEC.
        self.next.encode(strio, None)  # type: ignore[no-untyped-call]
        if not self.types:
            return
        bitmap = bytearray(max(self.types) // 8 + 1)
        for t in self.types:
            bitmap[t // 8] |= 0x80 >> (t % 8)
        strio.write(bytes((0, len(bitmap))) + bytes(bitmap))

    def decode(self, strio: Any, length: int | None = None) -> None:
        start = strio.tell()
        self.next = dns.Name()
        self.next.decode(strio)  # type: ignore[no-untyped-call]
        rest = b"" if length is None else strio.read(length - (strio.tell() - start))
        types: set[int] = set()
        while len(rest) >= 2:
            window, size = rest[0], rest[1]
            bitmap, rest = rest[2 : 2 + size], rest[2 + size :]
            if len(bitmap) != size or not 0 < size <= 32:
                raise ValueError("malformed NSEC type bitmap")
            for index, byte in enumerate(bitmap):
                for bit in range(8):
                    if byte & (0x80 >> bit):
                        types.add(window * 256 + index * 8 + bit)
        if rest:
            raise ValueError("malformed NSEC type bitmap")
        self.types = frozenset(types)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record_NSEC):
            return NotImplemented
        return (self.next, self.types) == (other.next, other.types)

    def __hash__(self) -> int:
        return hash((self.next, self.types))

    def __repr__(self) -> str:
        return f"<NSEC next={self.next.name!r} types={sorted(self.types)}>"


def nsec_record(name: bytes, types: Iterable[int]) -> Record:
    """The NSEC of a unique name we own: ``name`` has exactly ``types``."""
    return Record.make(name, NSEC, HOST_TTL, Record_NSEC(name, types), True)


def _payload_bytes(payload: Any) -> bytes:
    out = BytesIO()
    payload.encode(out, None)
    return out.getvalue()


def canonical_rdata(rtype: int, payload: Any) -> bytes:
    """
    The uncompressed rdata of a record, with the names it contains lowercased
    (so that records differing only in letter case compare equal).  Never
    raises: an rdata that cannot be encoded gives ``b"?"``.
    """
    try:
        if rtype == dns.PTR:
            return _payload_bytes(rdata_ptr(payload.name.name.lower()))
        if rtype == dns.SRV:
            return _payload_bytes(
                rdata_srv(
                    payload.priority, payload.weight, payload.port, payload.target.name.lower()
                )
            )
        return _payload_bytes(payload)
    except Exception:
        return b"?"


Ident = tuple[bytes, int, bytes]


def rr_ident(rr: dns.RRHeader) -> Ident:
    """(lowercased name, type, canonical rdata) of a received record."""
    return (rr.name.name.lower(), rr.type, canonical_rdata(rr.type, rr.payload))


@attrs.frozen
class Record:
    """
    One resource record we publish.

    @ivar unique: whether the name/type is ours alone (sent with the
        cache-flush bit, probed before use) or shared (PTR).
    @ivar rdata: canonical rdata, for comparisons (see :func:`canonical_rdata`).
    """

    name: bytes
    rtype: int
    ttl: int
    payload: Any = attrs.field(eq=False)
    unique: bool
    rdata: bytes
    #: ``(lowercased name, type)``: what a question matches.
    key: tuple[bytes, int] = attrs.field(init=False, eq=False)
    #: ``(lowercased name, type, rdata)``: what makes two records the same.
    ident: Ident = attrs.field(init=False, eq=False)

    @key.default
    def _key(self) -> tuple[bytes, int]:
        return (self.name.lower(), self.rtype)

    @ident.default
    def _ident(self) -> Ident:
        return (self.name.lower(), self.rtype, self.rdata)

    @classmethod
    def make(cls, name: bytes, rtype: int, ttl: int, payload: Any, unique: bool) -> Record:
        return cls(name, rtype, ttl, payload, unique, canonical_rdata(rtype, payload))

    def rr(self, ttl: int | None = None, flush: bool = True) -> dns.RRHeader:
        """
        This record as a ``dns.RRHeader``; the cache-flush bit is set on
        unique records unless ``flush`` is false (legacy unicast, probes).
        """
        cls = CLASS_IN | (CACHE_FLUSH if (self.unique and flush) else 0)
        return dns.RRHeader(
            name=self.name,
            type=self.rtype,
            cls=cls,
            ttl=self.ttl if ttl is None else ttl,
            payload=self.payload,
        )


def host_records(label: str, ipv4: str | None, ipv6: Sequence[str] = ()) -> list[Record]:
    """A (for ``ipv4``) and AAAA (for each of ``ipv6``) for ``<label>.local``."""
    name = host_fqdn(label)
    out: list[Record] = []
    if ipv4 is not None:
        out.append(Record.make(name, dns.A, HOST_TTL, rdata_a(ipv4), True))
    for address in ipv6:
        out.append(Record.make(name, dns.AAAA, HOST_TTL, rdata_aaaa(address), True))
    return out


def service_records(label: str, spec: ServiceSpec, host_label: str) -> list[Record]:
    """
    DNS-SD records of one service instance: SRV and TXT (unique), the PTR
    from its type to the instance and the ``_services._dns-sd._udp`` PTR to
    its type (shared).
    """
    instance = instance_fqdn(label, spec.service_type)
    stype = type_fqdn(spec.service_type)
    txt = spec.txt_strings()
    return [
        Record.make(
            instance, dns.SRV, HOST_TTL, rdata_srv(0, 0, spec.port, host_fqdn(host_label)), True
        ),
        Record.make(instance, dns.TXT, OTHER_TTL, rdata_txt(*txt), True),
        Record.make(stype, dns.PTR, OTHER_TTL, rdata_ptr(instance), False),
        Record.make(SERVICES_ENUM, dns.PTR, OTHER_TTL, rdata_ptr(stype), False),
    ]


# --------------------------------------------------------------------------
# Services


def _txt_pairs(value: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in value)


@attrs.frozen
class ServiceSpec:
    """
    A service to advertise.

    @ivar key: what identifies it across updates (``portal`` or
        ``<app>/<listener>``, the route's key).
    @ivar instance: the requested instance label (before any rename).
    """

    key: str
    instance: str
    service_type: str
    port: int
    txt: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_txt_pairs)

    def __attrs_post_init__(self) -> None:
        if not _SERVICE_TYPE.match(self.service_type):
            raise InvalidService(
                f"service type {self.service_type!r} is not _name._tcp or _name._udp"
            )
        if not 0 < self.port < 65536:
            raise InvalidService(f"port {self.port!r} out of range")
        if not self.instance or len(self.instance.encode("utf-8")) > 63 or "." in self.instance:
            raise InvalidService(f"instance label {self.instance!r} is not a DNS label")
        total = 1
        for k, v in self.txt:
            entry = len(f"{k}={v}".encode())
            if not k or "=" in k or entry > 255:
                raise InvalidService(f"TXT entry {k!r} is not key=value of at most 255 bytes")
            total += entry + 1
        if total > 1300:
            raise InvalidService("TXT record larger than 1300 bytes")

    def txt_strings(self) -> list[bytes]:
        """The TXT strings (``key=value``); one empty string when none (RFC 6763 §6.1)."""
        if not self.txt:
            return [b""]
        return [f"{k}={v}".encode() for k, v in self.txt]

    @classmethod
    def portal(cls, instance: str, port: int) -> ServiceSpec:
        """The portal: ``_http._tcp`` with ``path=/``."""
        return cls("portal", sanitize_label(instance), "_http._tcp", port, (("path", "/"),))

    @classmethod
    def from_route(cls, event: RoutePublished) -> ServiceSpec:
        """
        An app listener's service: instance ``<app>-<listener>`` (or
        ``<app>`` when the listener has no name or is named like the app).
        Raises :class:`InvalidService`.
        """
        if event.listener and event.listener != event.app:
            label = f"{event.app}-{event.listener}"
        else:
            label = event.app
        return cls(
            key=event.key(),
            instance=sanitize_label(label),
            service_type=event.service_type,
            port=event.port,
            txt=event.txt,
        )


# --------------------------------------------------------------------------
# Zone


@attrs.define(eq=False)
class Zone:
    """The active records of one interface, indexed for answering."""

    records: list[Record]
    _by_key: dict[tuple[bytes, int], list[Record]] = attrs.field(init=False, factory=dict)
    _by_name: dict[bytes, list[Record]] = attrs.field(init=False, factory=dict)
    _nsec: dict[bytes, Record] = attrs.field(init=False, factory=dict)
    #: Every record the zone may send: its records and their names' NSECs.
    idents: frozenset[Ident] = attrs.field(init=False, default=frozenset())

    def __attrs_post_init__(self) -> None:
        seen: set[Ident] = set()
        unique: list[Record] = []
        for record in self.records:
            if record.ident in seen:
                continue
            seen.add(record.ident)
            unique.append(record)
            self._by_key.setdefault(record.key, []).append(record)
            self._by_name.setdefault(record.key[0], []).append(record)
        self.records = unique
        for name, records in self._by_name.items():
            if any(r.unique for r in records):
                nsec = nsec_record(records[0].name, {r.rtype for r in records})
                self._nsec[name] = nsec
                seen.add(nsec.ident)
        self.idents = frozenset(seen)

    def lookup(self, name: bytes, qtype: int) -> list[Record]:
        """
        Records answering a question (``qtype`` 255 is ANY; the NSEC
        records answer only a question for NSEC itself).
        """
        if qtype == dns.ALL_RECORDS:
            return self._by_name.get(name.lower(), [])
        if qtype == NSEC:
            nsec = self._nsec.get(name.lower())
            return [] if nsec is None else [nsec]
        return self._by_key.get((name.lower(), qtype), [])

    def negative(self, name: bytes, qtype: int) -> list[Record]:
        """
        RFC 6762 §6.1: the NSEC of a unique name of ours that has no record
        of ``qtype`` (nothing for names that are not ours, shared names, ANY).
        """
        key = name.lower()
        nsec = self._nsec.get(key)
        if nsec is None or qtype in (dns.ALL_RECORDS, NSEC) or (key, qtype) in self._by_key:
            return []
        return [nsec]

    def has_name(self, name: bytes) -> bool:
        return name.lower() in self._by_name

    def additionals(self, answers: Sequence[Record], exclude: set[Ident]) -> list[Record]:
        """
        Additional records for ``answers`` (RFC 6763 §12, RFC 6762 §6.2): SRV
        and TXT of a PTR's instance, the addresses of an SRV's target, the
        other address family of an address record, and the host's NSEC
        when it lacks one family (RFC 6762 §6.1: the querier need not ask
        for it).  Nothing in ``exclude``.
        """
        out: list[Record] = []
        chosen = set(exclude)

        def add(records: Iterable[Record]) -> None:
            for record in records:
                if record.ident not in chosen:
                    chosen.add(record.ident)
                    out.append(record)

        def addresses(host: bytes) -> None:
            a, aaaa = self.lookup(host, dns.A), self.lookup(host, dns.AAAA)
            add(a)
            add(aaaa)
            if (a or aaaa) and not (a and aaaa):
                add(self.lookup(host, NSEC))

        for record in answers:
            if record.rtype == dns.PTR and record.name.lower() != SERVICES_ENUM:
                target = record.payload.name.name
                srv = self.lookup(target, dns.SRV)
                add(srv)
                add(self.lookup(target, dns.TXT))
                for s in srv:
                    addresses(s.payload.target.name)
            elif record.rtype == dns.SRV:
                addresses(record.payload.target.name)
            elif record.rtype in (dns.A, dns.AAAA):
                other = self.lookup(record.name, dns.AAAA if record.rtype == dns.A else dns.A)
                add(other)
                if not other:
                    add(self.lookup(record.name, NSEC))
        return out


def parse_ipv4(text: str) -> str:
    """The normalised IPv4 literal; raises ``ValueError``."""
    return str(ipaddress.IPv4Address(text))


def parse_ipv6(text: str) -> str:
    """The normalised IPv6 literal; raises ``ValueError``."""
    return str(ipaddress.IPv6Address(text))
