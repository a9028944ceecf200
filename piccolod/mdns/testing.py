"""
Test doubles and packet builders for the mDNS subsystem (shipped, so that
plugin authors and other subsystems' tests can use them too).

- :class:`FakeMulticastReactor`: a ``task.Clock`` that also provides
  ``IReactorMulticast``; ``listenMulticast`` returns a
  :class:`FakeMulticastPort` that records the socket options set on it and
  what is written, and can be told to fail.
- :func:`query`, :func:`response`, :func:`rr_a`, :func:`rr_ptr`,
  :func:`rr_srv`, :func:`rr_txt`: wire packets and records as another mDNS
  host would send them.
- :func:`written`: decode what a transport wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError, MulticastJoinError
from twisted.internet.interfaces import IMulticastTransport, IReactorMulticast
from twisted.internet.task import Clock
from twisted.names import dns
from zope.interface import implementer

from piccolod.mdns.codec import decode
from piccolod.mdns.records import (
    CACHE_FLUSH,
    CLASS_IN,
    QU_BIT,
    rdata_a,
    rdata_ptr,
    rdata_srv,
    rdata_txt,
)

__all__ = [
    "FakeMulticastPort",
    "FakeMulticastReactor",
    "answers_of",
    "multicast_join_error",
    "query",
    "response",
    "rr_a",
    "rr_ptr",
    "rr_srv",
    "rr_txt",
    "written",
]

Question = tuple[bytes, int] | tuple[bytes, int, bool]


def rr_a(name: bytes, address: str, ttl: int = 120, flush: bool = True) -> dns.RRHeader:
    """An A record as a foreign responder would send it."""
    cls = CLASS_IN | (CACHE_FLUSH if flush else 0)
    return dns.RRHeader(name, dns.A, cls, ttl, rdata_a(address))


def rr_ptr(name: bytes, target: bytes, ttl: int = 4500) -> dns.RRHeader:
    """A (shared) PTR record."""
    return dns.RRHeader(name, dns.PTR, CLASS_IN, ttl, rdata_ptr(target))


def rr_srv(
    name: bytes, port: int, target: bytes, ttl: int = 120, flush: bool = True
) -> dns.RRHeader:
    """An SRV record."""
    cls = CLASS_IN | (CACHE_FLUSH if flush else 0)
    return dns.RRHeader(name, dns.SRV, cls, ttl, rdata_srv(0, 0, port, target))


def rr_txt(name: bytes, *strings: bytes, ttl: int = 4500, flush: bool = True) -> dns.RRHeader:
    """A TXT record."""
    cls = CLASS_IN | (CACHE_FLUSH if flush else 0)
    return dns.RRHeader(name, dns.TXT, cls, ttl, rdata_txt(*(strings or (b"",))))


def query(
    *questions: Question,
    known: Sequence[dns.RRHeader] = (),
    authority: Sequence[dns.RRHeader] = (),
    message_id: int = 0,
    truncated: bool = False,
) -> bytes:
    """
    A query packet.  Each question is ``(name, type)`` or
    ``(name, type, qu)``; ``known`` is the known-answer list.
    """
    m = dns.Message(id=message_id, answer=False, maxSize=0)
    m.trunc = int(truncated)
    for q in questions:
        name, qtype = q[0], q[1]
        qu = len(q) > 2 and bool(q[2])
        m.queries.append(dns.Query(name, qtype, CLASS_IN | (QU_BIT if qu else 0)))
    m.answers = list(known)
    m.authority = list(authority)
    return m.toStr()


def response(*answers: dns.RRHeader, additional: Sequence[dns.RRHeader] = ()) -> bytes:
    """A response packet (id 0, authoritative, no questions)."""
    m = dns.Message(id=0, answer=True, auth=True, maxSize=0)
    m.answers = list(answers)
    m.additional = list(additional)
    return m.toStr()


def written(transport: Any, clear: bool = True) -> list[tuple[dns.Message, Any]]:
    """Decode every packet ``transport.written`` holds (and clear it)."""
    out = [(decode(packet), addr) for packet, addr in transport.written]
    if clear:
        del transport.written[:]
    return out


@implementer(IMulticastTransport)
@attrs.define(eq=False)
class FakeMulticastPort:
    """
    What ``FakeMulticastReactor.listenMulticast`` returns: records options,
    joined groups and written packets; ``stopListening`` disconnects the
    protocol.
    """

    reactor: FakeMulticastReactor
    port: int
    protocol: Any
    interface: str
    listen_multiple: bool
    max_packet_size: int
    ttl: int | None = None
    loopback: int | None = None
    outgoing: str | None = None
    groups: list[tuple[str, str]] = attrs.field(factory=list)
    written: list[tuple[bytes, Any]] = attrs.field(factory=list)
    listening: bool = True
    join_error: BaseException | None = None
    write_error: BaseException | None = None

    broadcast: bool = False

    def getOutgoingInterface(self) -> str | int:
        return self.outgoing or "0.0.0.0"

    def getLoopbackMode(self) -> bool:
        return bool(self.loopback)

    def getTTL(self) -> int:
        return 1 if self.ttl is None else self.ttl

    def setTTL(self, ttl: int) -> None:
        self.ttl = ttl

    def connect(self, host: str, port: int) -> None:
        raise RuntimeError("a multicast responder never connects its socket")

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast = enabled

    def getBroadcastAllowed(self) -> bool:
        return self.broadcast

    def setLoopbackMode(self, mode: int) -> None:
        self.loopback = mode

    def setOutgoingInterface(self, addr: str | int) -> Deferred[int]:
        self.outgoing = str(addr)
        return succeed(1)

    def joinGroup(self, addr: str, interface: str = "") -> Deferred[None]:
        if self.join_error is not None:
            return fail(self.join_error)
        self.groups.append((addr, interface))
        return succeed(None)

    def leaveGroup(self, addr: str, interface: str = "") -> Deferred[None]:
        self.groups.remove((addr, interface))
        return succeed(None)

    def write(self, packet: bytes, addr: Any = None) -> None:
        if not self.listening:
            raise RuntimeError("write on a closed port")
        if self.write_error is not None:
            raise self.write_error
        self.written.append((packet, addr))

    def stopListening(self) -> Deferred[None]:
        if self.listening:
            self.listening = False
            self.protocol.doStop()
            self.protocol.transport = None
        return succeed(None)


@implementer(IReactorMulticast)
class FakeMulticastReactor(Clock):
    """
    A ``Clock`` providing ``IReactorMulticast``.  Set ``fail_listen`` (an
    exception, or a count of failures to come) or ``join_error`` to make
    binding or joining fail.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakeMulticastPort] = []
        self.fail_listen: int = 0
        self.join_error: BaseException | None = None

    def listenMulticast(
        self,
        port: int,
        protocol: Any,
        interface: str = "",
        maxPacketSize: int = 8192,
        listenMultiple: bool = False,
    ) -> FakeMulticastPort:
        if self.fail_listen > 0:
            self.fail_listen -= 1
            raise CannotListenError(  # type: ignore[no-untyped-call]
                interface, port, OSError("address in use")
            )
        p = FakeMulticastPort(
            reactor=self,
            port=port,
            protocol=protocol,
            interface=interface,
            listen_multiple=listenMultiple,
            max_packet_size=maxPacketSize,
            join_error=self.join_error,
        )
        self.ports.append(p)
        protocol.makeConnection(p)
        return p

    def listening(self) -> list[FakeMulticastPort]:
        """The ports still open."""
        return [p for p in self.ports if p.listening]


def multicast_join_error(group: str = "224.0.0.251") -> MulticastJoinError:
    """The error ``joinGroup`` fails with when the interface is gone."""
    return MulticastJoinError(group, "0.0.0.0", 19, "No such device")


def answers_of(messages: Iterable[tuple[dns.Message, Any]]) -> list[dns.RRHeader]:
    """Every answer record of the decoded ``messages``."""
    return [rr for m, _ in messages for rr in m.answers]
