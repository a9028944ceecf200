"""
Unit tests for the mDNS responder: ``MdnsProtocol`` driven through
``datagramReceived`` with ``FakeDatagramTransport`` and a ``Clock``.

Timeline with ``rand() == 0.5`` (used throughout): probes at 0.125, 0.375
and 0.625 s; the name is won at 0.875 s with the first announcement; further
announcements at 1.875 and 3.875 s.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import zeroconf
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from piccolod.events import HealthLevel
from piccolod.mdns.protocol import LAST_MULTICAST_LIMIT, ClaimState, MdnsProtocol, Responder
from piccolod.mdns.records import (
    CACHE_FLUSH,
    NSEC,
    QU_BIT,
    Record_NSEC,
    ServiceSpec,
    host_records,
)
from piccolod.mdns.testing import query, response, rr_a, rr_ptr, rr_srv, written

HOST = b"piccolo.local"
HOST2 = b"piccolo-2.local"
PORTAL = b"piccolo._http._tcp.local"
HTTP = b"_http._tcp.local"
ENUM = b"_services._dns-sd._udp.local"
ADDR = "192.0.2.1"
PEER = ("192.0.2.50", 5353)
PEER2 = ("192.0.2.51", 5353)
LEGACY = ("192.0.2.60", 40000)
GROUP = ("224.0.0.251", 5353)


class Harness:
    """A responder with one ``MdnsProtocol`` per address on fake transports."""

    def __init__(
        self,
        addresses: Sequence[str] = (ADDR,),
        portal: bool = True,
        rate: float = 0.0,
        burst: float = 0.0,
        rand: float = 0.5,
        network: Any = None,
    ) -> None:
        self.clock = Clock()
        self.names: list[tuple[str, str, str, str]] = []
        self.responder = Responder(
            clock=self.clock,
            hostname="piccolo",
            rand=lambda: rand,
            on_name=lambda *a: self.names.append(a),
        )
        self.protos: list[MdnsProtocol] = []
        self.transports: list[FakeDatagramTransport] = []
        for address in addresses:
            proto = MdnsProtocol(
                responder=self.responder,
                address=address,
                clock=self.clock,
                rate=rate,
                burst=burst,
                network=network,
            )
            transport = FakeDatagramTransport()
            proto.makeConnection(transport)
            self.responder.add_interface(proto)
            self.protos.append(proto)
            self.transports.append(transport)
        if portal:
            self.responder.publish(ServiceSpec.portal("piccolo", 8080))

    @property
    def proto(self) -> MdnsProtocol:
        return self.protos[0]

    def claim(self) -> None:
        """Start and run until the first announcement (t = 0.875); clear output."""
        self.responder.start()
        self.clock.advance(0.125)
        for _ in range(3):
            self.clock.advance(0.25)
        self.sent()

    def settle(self) -> None:
        """Claim and let every announcement go out (t = 10); clear output."""
        self.claim()
        for step in (1.0, 2.0, 6.125):  # exactly onto 1.875 and 3.875, then to 10
            self.clock.advance(step)
        self.sent()

    def run(self, seconds: float) -> None:
        """
        Advance in 1/64 s steps (exact in binary): ``Clock.advance`` runs a
        call late at the *final* time, so one big step would bunch events.
        """
        run(self.clock, seconds)

    def receive(self, packet: bytes, source: tuple[str, int] = PEER, index: int = 0) -> None:
        self.protos[index].datagramReceived(packet, source)

    def sent(self, index: int = 0) -> list[tuple[dns.Message, Any]]:
        return written(self.transports[index])


def run(clock: Clock, seconds: float) -> None:
    for _ in range(round(seconds * 64)):
        clock.advance(1 / 64)


def names_of(records: Sequence[dns.RRHeader]) -> set[tuple[bytes, int]]:
    return {(rr.name.name, rr.type) for rr in records}


def answers(messages: Sequence[tuple[dns.Message, Any]]) -> list[dns.RRHeader]:
    return [rr for m, _ in messages for rr in m.answers]


class ProbingTests(SynchronousTestCase):
    def test_three_probes_250ms_apart_after_random_delay(self) -> None:
        """Probes go out at the random delay and then every 250 ms, three in all."""
        h = Harness()
        h.responder.start()
        h.clock.advance(0.124)
        self.assertEqual(h.sent(), [])
        times = []
        for step in (0.001, 0.25, 0.25):
            h.clock.advance(step)
            out = h.sent()
            self.assertEqual(len(out), 1)
            times.append(h.clock.seconds())
            message, dest = out[0]
            self.assertEqual(dest, GROUP)
            self.assertFalse(message.answer)
            self.assertEqual(
                {(q.name.name, q.type) for q in message.queries},
                {(HOST, dns.ALL_RECORDS), (PORTAL, dns.ALL_RECORDS)},
            )
        self.assertEqual(times, [0.125, 0.375, 0.625])

    def test_first_probe_asks_unicast_and_carries_proposed_records(self) -> None:
        """The first probe sets QU; every probe lists our proposed unique records in authority."""
        h = Harness()
        h.responder.start()
        h.clock.advance(0.125)
        ((first, _),) = h.sent()
        self.assertTrue(all(q.cls & QU_BIT for q in first.queries))
        authority = {(rr.name.name, rr.type) for rr in first.authority}
        self.assertEqual(authority, {(HOST, dns.A), (PORTAL, dns.SRV), (PORTAL, dns.TXT)})
        self.assertTrue(all(rr.cls == dns.IN for rr in first.authority))
        a = next(rr for rr in first.authority if rr.type == dns.A)
        self.assertEqual(a.payload.dottedQuad(), ADDR)
        h.clock.advance(0.25)
        ((second, _),) = h.sent()
        self.assertFalse(any(q.cls & QU_BIT for q in second.queries))

    def test_names_being_probed_are_not_answered(self) -> None:
        """A query for a name still being probed gets no answer."""
        h = Harness()
        h.responder.start()
        h.clock.advance(0.2)
        h.sent()
        h.receive(query((HOST, dns.A)), LEGACY)
        h.receive(query((HOST, dns.A)))
        h.clock.advance(0.1)
        self.assertEqual([m for m, _ in h.sent() if m.answer], [])

    def test_identical_answer_during_probing_is_no_conflict(self) -> None:
        """A response carrying exactly our proposed record does not rename us."""
        h = Harness()
        h.responder.start()
        h.clock.advance(0.2)
        h.receive(response(rr_a(HOST, ADDR)))
        h.run(1)
        self.assertEqual(h.responder.host.label, "piccolo")
        self.assertEqual(h.names[0], ("host", "piccolo.local", "piccolo.local", "claimed"))


class AnnouncingTests(SynchronousTestCase):
    def test_announcements_after_probing(self) -> None:
        """After three quiet probes the records are announced at 0, +1 s and +3 s."""
        h = Harness()
        h.responder.start()
        h.run(0.625)
        h.sent()
        times = []
        for _ in range(40):
            h.clock.advance(0.125)
            for message, dest in h.sent():
                self.assertTrue(message.answer and message.auth)
                self.assertEqual(dest, GROUP)
                self.assertEqual(message.queries, [])
                times.append(h.clock.seconds())
                records = {(rr.name.name, rr.type): rr for rr in message.answers}
                self.assertEqual(
                    set(records),
                    {
                        (HOST, dns.A),
                        (PORTAL, dns.SRV),
                        (PORTAL, dns.TXT),
                        (HTTP, dns.PTR),
                        (ENUM, dns.PTR),
                    },
                )
                self.assertEqual(records[(HOST, dns.A)].ttl, 120)
                self.assertEqual(records[(HOST, dns.A)].cls, dns.IN | CACHE_FLUSH)
                self.assertEqual(records[(PORTAL, dns.SRV)].ttl, 120)
                self.assertEqual(records[(PORTAL, dns.SRV)].payload.port, 8080)
                self.assertEqual(records[(PORTAL, dns.TXT)].ttl, 4500)
                self.assertEqual(records[(PORTAL, dns.TXT)].payload.data, [b"path=/"])
                self.assertEqual(records[(HTTP, dns.PTR)].ttl, 4500)
                self.assertEqual(records[(HTTP, dns.PTR)].cls, dns.IN)
                self.assertEqual(records[(HTTP, dns.PTR)].payload.name.name, PORTAL)
        self.assertEqual(times, [0.875, 1.875, 3.875])
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.responder.host.state, ClaimState.CLAIMED)

    def test_claim_publishes_name_events(self) -> None:
        """Winning the host and portal names reports both as claimed."""
        h = Harness()
        h.claim()
        self.assertEqual(
            sorted(h.names),
            [
                ("host", "piccolo.local", "piccolo.local", "claimed"),
                ("service", "piccolo._http._tcp.local", "piccolo._http._tcp.local", "claimed"),
            ],
        )
        self.assertEqual(h.responder.host_name(), "piccolo.local")

    def test_port_change_is_announced_without_probing(self) -> None:
        """A claimed service whose port changes is re-announced at once, not probed again."""
        h = Harness()
        h.settle()
        h.responder.publish(ServiceSpec.portal("piccolo", 9090))
        h.clock.advance(0)
        out = h.sent()
        self.assertEqual(len(out), 1)
        srv = next(rr for rr in answers(out) if rr.type == dns.SRV)
        self.assertEqual(srv.payload.port, 9090)
        self.assertEqual([q for m, _ in out for q in m.queries], [])


class GoodbyeTests(SynchronousTestCase):
    def test_stop_sends_goodbyes_and_cancels_timers(self) -> None:
        """Stopping multicasts every active record with TTL 0 and leaves no timer."""
        h = Harness()
        h.claim()
        h.responder.stop()
        out = h.sent()
        records = answers(out)
        self.assertEqual(
            names_of(records),
            {(HOST, dns.A), (PORTAL, dns.SRV), (PORTAL, dns.TXT), (HTTP, dns.PTR), (ENUM, dns.PTR)},
        )
        self.assertTrue(all(rr.ttl == 0 for rr in records))
        self.assertTrue(all(dest == GROUP for _, dest in out))
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.responder.stop()
        self.assertEqual(h.sent(), [])

    def test_withdrawn_service_says_goodbye_to_its_records_only(self) -> None:
        """Withdrawing an app sends TTL 0 for its records but not for shared ones still in use."""
        h = Harness()
        h.responder.publish(ServiceSpec("app/web", "app-web", "_http._tcp", 9000))
        h.responder.publish(ServiceSpec("app/ssh", "app-ssh", "_ssh._tcp", 2222))
        h.settle()
        h.responder.withdraw("app/web")
        records = answers(h.sent())
        web = b"app-web._http._tcp.local"
        self.assertEqual(names_of(records), {(web, dns.SRV), (web, dns.TXT), (HTTP, dns.PTR)})
        self.assertTrue(all(rr.ttl == 0 for rr in records))
        h.responder.withdraw("app/ssh")
        records = answers(h.sent())
        self.assertIn((ENUM, dns.PTR), names_of(records))
        enum_ptr = next(rr for rr in records if rr.name.name == ENUM)
        self.assertEqual(enum_ptr.payload.name.name, b"_ssh._tcp.local")
        self.assertIn(("service", "app-ssh._ssh._tcp.local", "", "withdrawn"), h.names)

    def test_host_key_is_reserved(self) -> None:
        """A service cannot take the key of the host name's claim."""
        h = Harness()
        with self.assertRaises(ValueError):
            h.responder.publish(ServiceSpec("host", "x", "_http._tcp", 1))
        self.assertEqual(h.responder.host.spec, None)

    def test_withdrawn_service_is_no_longer_answered(self) -> None:
        """After withdrawal a query for the service type lists only what remains."""
        h = Harness()
        h.responder.publish(ServiceSpec("app/web", "app-web", "_http._tcp", 9000))
        h.settle()
        h.responder.withdraw("app/web")
        h.sent()
        h.receive(query((HTTP, dns.PTR)), LEGACY)
        targets = {rr.payload.name.name for rr in answers(h.sent()) if rr.type == dns.PTR}
        self.assertEqual(targets, {PORTAL})


class ConflictTests(SynchronousTestCase):
    def test_conflict_while_probing_renames_host(self) -> None:
        """A foreign answer for our host name while probing makes us probe piccolo-2."""
        h = Harness()
        h.responder.start()
        h.clock.advance(0.2)
        h.sent()
        h.receive(response(rr_a(HOST, "192.0.2.99")))
        self.assertEqual(h.responder.host.label, "piccolo-2")
        h.clock.advance(0.125)
        ((probe, _),) = h.sent()
        self.assertIn(HOST2, {q.name.name for q in probe.queries})
        h.run(1)
        self.assertIn(("host", "piccolo.local", "piccolo-2.local", "conflict"), h.names)
        a = [rr for rr in answers(h.sent()) if rr.type == dns.A]
        self.assertEqual({rr.name.name for rr in a}, {HOST2})
        self.assertEqual(h.proto.stats["conflicts"], 1)

    def test_conflict_while_probing_renames_service_instance(self) -> None:
        """A foreign SRV for our instance name renames it to 'piccolo (2)'."""
        h = Harness()
        h.responder.start()
        h.clock.advance(0.2)
        h.receive(response(rr_srv(PORTAL, 80, b"other.local")))
        portal = h.responder.claims()[1]
        self.assertEqual(portal.label, "piccolo (2)")
        h.run(2)
        self.assertIn(
            ("service", "piccolo._http._tcp.local", "piccolo (2)._http._tcp.local", "conflict"),
            h.names,
        )
        self.assertEqual(h.responder.host.label, "piccolo")

    def test_services_are_reannounced_with_renamed_host(self) -> None:
        """When the host is renamed after services went out, their SRV is re-announced."""
        h = Harness()
        h.settle()
        h.receive(response(rr_a(HOST, "192.0.2.99")))  # claimed: probe again
        h.clock.advance(0.2)
        h.receive(response(rr_a(HOST, "192.0.2.99")))  # still taken: rename
        self.assertEqual(h.responder.host.label, "piccolo-2")
        h.sent()
        h.run(2)
        srv = [rr for rr in answers(h.sent()) if rr.type == dns.SRV]
        self.assertTrue(srv)
        self.assertEqual({rr.payload.target.name for rr in srv}, {HOST2})

    def test_conflict_after_claim_probes_again_then_renames(self) -> None:
        """A foreign, different record for a claimed name restarts probing; a second renames."""
        h = Harness()
        h.settle()
        h.receive(response(rr_a(HOST, "192.0.2.99")))
        self.assertEqual(h.responder.host.state, ClaimState.PROBING)
        self.assertEqual(h.responder.host.label, "piccolo")
        h.receive(query((HOST, dns.A)), LEGACY)
        self.assertEqual(h.sent(), [])
        h.clock.advance(0.125)
        ((probe, _),) = h.sent()
        self.assertIn(HOST, {q.name.name for q in probe.queries})
        h.receive(response(rr_a(HOST, "192.0.2.99")))
        self.assertEqual(h.responder.host.label, "piccolo-2")

    def test_conflict_after_claim_that_goes_away_keeps_the_name(self) -> None:
        """After a post-claim conflict with no answer to our probes, the name is kept silently."""
        h = Harness()
        h.settle()
        events = len(h.names)
        h.receive(response(rr_a(HOST, "192.0.2.99")))
        h.run(1)
        self.assertEqual(h.responder.host.label, "piccolo")
        self.assertEqual(h.responder.host.state, ClaimState.ANNOUNCING)
        self.assertEqual(len(h.names), events)

    def test_goodbye_from_others_is_no_conflict(self) -> None:
        """A TTL-0 record for our name (someone's goodbye) is not a conflict."""
        h = Harness()
        h.settle()
        h.receive(response(rr_a(HOST, "192.0.2.99", ttl=0)))
        self.assertEqual(h.responder.host.state, ClaimState.CLAIMED)

    def test_other_types_for_our_claimed_name_are_no_conflict(self) -> None:
        """After claiming, only a same-type record with different data is a conflict."""
        h = Harness()
        h.settle()
        h.receive(response(rr_ptr(HOST, b"something.local")))
        self.assertEqual(h.responder.host.state, ClaimState.CLAIMED)

    def test_responses_from_other_ports_are_ignored(self) -> None:
        """A response not from port 5353 is not mDNS and cannot cause a conflict."""
        h = Harness()
        h.settle()
        h.receive(response(rr_a(HOST, "192.0.2.99")), ("192.0.2.50", 5354))
        self.assertEqual(h.responder.host.state, ClaimState.CLAIMED)
        self.assertEqual(h.proto.stats["ignored"], 1)

    def test_many_conflicts_slow_probing_down(self) -> None:
        """After 15 conflicts within 10 s the next probe waits 5 s (RFC 6762 §8.1)."""
        h = Harness(portal=False)
        h.responder.start()
        h.clock.advance(0.2)
        for _ in range(15):
            name = h.responder.host.fqdn()
            h.receive(response(rr_a(name, "192.0.2.99")))
            h.clock.advance(0.01)
        host = h.responder.host
        self.assertEqual(host.label, "piccolo-16")
        assert host.due is not None
        self.assertGreaterEqual(host.due - h.clock.seconds(), 4.9)

    def test_simultaneous_probe_with_later_data_wins(self) -> None:
        """A simultaneous probe with lexicographically later rdata makes us wait 1 s."""
        h = Harness(portal=False)
        h.responder.start()
        h.clock.advance(0.2)
        h.sent()
        h.receive(query((HOST, dns.ALL_RECORDS, True), authority=[rr_a(HOST, "192.0.2.200")]))
        h.clock.advance(0.5)
        self.assertEqual(h.sent(), [])
        h.clock.advance(0.5)
        ((probe, _),) = h.sent()
        self.assertEqual(probe.queries[0].name.name, HOST)
        self.assertEqual(h.proto.stats["tiebreaks_lost"], 1)
        self.assertEqual(h.responder.host.label, "piccolo")

    def test_simultaneous_probe_with_earlier_data_loses(self) -> None:
        """A simultaneous probe with lexicographically earlier rdata does not delay us."""
        h = Harness(portal=False)
        h.responder.start()
        h.clock.advance(0.125)
        h.sent()
        h.receive(query((HOST, dns.ALL_RECORDS, True), authority=[rr_a(HOST, "192.0.2.0")]))
        h.clock.advance(0.25)
        self.assertEqual(len(h.sent()), 1)
        self.assertEqual(h.proto.stats["tiebreaks_lost"], 0)

    def test_own_packets_looped_back_are_ignored(self) -> None:
        """Our own multicast coming back (loopback mode) is dropped, not seen as a probe."""
        h = Harness()
        h.responder.start()
        h.clock.advance(0.125)
        ((packet, _),) = h.transports[0].written
        h.receive(packet, (ADDR, 5353))
        self.assertEqual(h.proto.stats["own_packets"], 1)
        self.assertEqual(h.proto.stats["tiebreaks_lost"], 0)


class AnsweringTests(SynchronousTestCase):
    def test_unique_answer_is_multicast_immediately(self) -> None:
        """A QM question for our A record is answered at once by multicast."""
        h = Harness()
        h.settle()
        h.receive(query((HOST, dns.A)))
        out = h.sent()
        self.assertEqual(len(out), 1)
        message, dest = out[0]
        self.assertEqual(dest, GROUP)
        self.assertEqual(message.id, 0)
        self.assertEqual(
            [(rr.name.name, rr.payload.dottedQuad()) for rr in message.answers], [(HOST, ADDR)]
        )

    def test_record_is_multicast_at_most_once_a_second(self) -> None:
        """A question right after a multicast of the record waits until a second has passed."""
        h = Harness()
        h.settle()
        h.receive(query((HOST, dns.A)))
        h.sent()
        h.clock.advance(0.3)
        h.receive(query((HOST, dns.A)))
        self.assertEqual(h.sent(), [])
        h.clock.advance(0.69)
        self.assertEqual(h.sent(), [])
        h.clock.advance(0.02)
        self.assertEqual(names_of(answers(h.sent())), {(HOST, dns.A)})

    def test_any_question_gets_every_record_of_the_name(self) -> None:
        """An ANY question for the instance name gets its SRV and TXT."""
        h = Harness()
        h.settle()
        h.receive(query((PORTAL, dns.ALL_RECORDS)), LEGACY)
        self.assertEqual(names_of(answers(h.sent())), {(PORTAL, dns.SRV), (PORTAL, dns.TXT)})

    def test_ptr_answer_carries_srv_txt_and_address(self) -> None:
        """A PTR answer comes with the instance's SRV and TXT and the host's A as additionals."""
        h = Harness()
        h.settle()
        h.receive(query((HTTP, dns.PTR)), LEGACY)
        ((message, _),) = h.sent()
        self.assertEqual(names_of(message.answers), {(HTTP, dns.PTR)})
        self.assertEqual(
            names_of(message.additional),
            {(PORTAL, dns.SRV), (PORTAL, dns.TXT), (HOST, dns.A), (HOST, NSEC)},
        )

    def test_missing_type_of_our_name_is_answered_with_nsec(self) -> None:
        """
        RFC 6762 §6.1: an AAAA question for our IPv4-only host name gets an NSEC (next
        name = the name, types = {A}) at once, which python-zeroconf decodes independently.
        """
        h = Harness()
        h.settle()
        h.receive(query((HOST, dns.AAAA)))
        ((raw, dest),) = h.transports[0].written
        ((message, _),) = h.sent()
        self.assertEqual(dest, GROUP)
        ((rr,),) = [message.answers]
        self.assertEqual((rr.name.name, rr.type, rr.ttl), (HOST, NSEC, 120))
        self.assertTrue(rr.cls & CACHE_FLUSH)
        self.assertEqual((rr.payload.next.name, rr.payload.types), (HOST, {dns.A}))
        (nsec,) = zeroconf.DNSIncoming(raw).answers()
        assert isinstance(nsec, zeroconf.DNSNsec)
        self.assertEqual(
            (nsec.name, nsec.next_name, nsec.rdtypes, nsec.unique),
            ("piccolo.local.", "piccolo.local.", [dns.A], True),
        )

    def test_instance_name_nsec_lists_srv_and_txt(self) -> None:
        """A question for an address type of a service instance name gets NSEC {TXT, SRV}."""
        h = Harness()
        h.settle()
        h.receive(query((PORTAL, dns.A)), LEGACY)
        ((message, dest),) = h.sent()
        self.assertEqual(dest, LEGACY)
        ((rr,),) = [message.answers]
        self.assertEqual((rr.name.name, rr.type), (PORTAL, NSEC))
        self.assertLessEqual(rr.ttl, 10)  # legacy unicast
        self.assertEqual(rr.payload.types, {dns.SRV, dns.TXT})

    def test_no_nsec_for_names_that_are_not_ours_or_shared(self) -> None:
        """Other names, shared (PTR) names and ANY questions never get an NSEC."""
        h = Harness()
        h.settle()
        h.receive(query((b"other.local", dns.AAAA), (HTTP, dns.SRV), (ENUM, dns.TXT)), LEGACY)
        self.assertEqual(h.sent(), [])
        h.receive(query((HOST, dns.ALL_RECORDS)), LEGACY)
        self.assertEqual(names_of(answers(h.sent())), {(HOST, dns.A)})

    def test_known_nsec_suppresses_the_negative_answer(self) -> None:
        """A querier that already holds our NSEC (TTL above half) gets no answer."""
        h = Harness()
        h.settle()
        known = dns.RRHeader(HOST, NSEC, 1 | CACHE_FLUSH, 120, Record_NSEC(HOST, {dns.A}))
        h.receive(query((HOST, dns.AAAA), known=[known]))
        self.assertEqual(h.sent(), [])
        stale = dns.RRHeader(HOST, NSEC, 1 | CACHE_FLUSH, 30, Record_NSEC(HOST, {dns.A}))
        h.receive(query((HOST, dns.AAAA), known=[stale]))
        self.assertEqual(names_of(answers(h.sent())), {(HOST, NSEC)})

    def test_a_answer_asserts_there_is_no_aaaa(self) -> None:
        """An A answer of an IPv4-only host carries its NSEC as an additional record."""
        h = Harness()
        h.settle()
        h.receive(query((HOST, dns.A)), LEGACY)
        ((message, _),) = h.sent()
        self.assertEqual(names_of(message.additional), {(HOST, NSEC)})

    def test_shared_answers_are_delayed_and_aggregated(self) -> None:
        """PTR answers wait 20-120 ms and answers to several queries go out in one packet."""
        h = Harness()
        h.settle()
        h.receive(query((HTTP, dns.PTR)), PEER)
        h.clock.advance(0.03)
        h.receive(query((ENUM, dns.PTR)), PEER2)
        self.assertEqual(h.sent(), [])
        h.clock.advance(0.039)
        self.assertEqual(h.sent(), [])
        h.clock.advance(0.002)
        out = h.sent()
        self.assertEqual(len(out), 1)
        message, dest = out[0]
        self.assertEqual(dest, GROUP)
        self.assertEqual(names_of(message.answers), {(HTTP, dns.PTR), (ENUM, dns.PTR)})
        self.assertIn((PORTAL, dns.SRV), names_of(message.additional))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_known_answer_suppresses(self) -> None:
        """A known answer with at least half our TTL suppresses it; a staler one does not."""
        h = Harness()
        h.settle()
        h.receive(query((HTTP, dns.PTR), known=[rr_ptr(HTTP, PORTAL, ttl=4500)]))
        h.clock.advance(1)
        self.assertEqual(h.sent(), [])
        self.assertEqual(h.proto.stats["known_answers_suppressed"], 1)
        h.receive(query((HTTP, dns.PTR), known=[rr_ptr(HTTP, PORTAL, ttl=2000)]))
        h.clock.advance(1)
        self.assertEqual(names_of(answers(h.sent())), {(HTTP, dns.PTR)})

    def test_known_answer_is_case_insensitive(self) -> None:
        """A known answer spelled in other letter case still suppresses."""
        h = Harness()
        h.settle()
        h.receive(query((HTTP, dns.PTR), known=[rr_ptr(HTTP.upper(), PORTAL.upper())]))
        h.clock.advance(1)
        self.assertEqual(h.sent(), [])

    def test_truncated_query_waits_for_more_known_answers(self) -> None:
        """With TC set the answer waits 400-500 ms and a follow-up known answer cancels it."""
        h = Harness()
        h.settle()
        h.receive(query((HTTP, dns.PTR), truncated=True), PEER)
        h.clock.advance(0.3)
        self.assertEqual(h.sent(), [])
        h.receive(query(known=[rr_ptr(HTTP, PORTAL)]), PEER)
        h.clock.advance(1)
        self.assertEqual(h.sent(), [])

    def test_truncated_query_is_answered_after_the_wait(self) -> None:
        """With TC set and no follow-up, the answer goes out 450 ms later (rand 0.5)."""
        h = Harness()
        h.settle()
        h.receive(query((HTTP, dns.PTR), truncated=True), PEER)
        h.clock.advance(0.449)
        self.assertEqual(h.sent(), [])
        h.clock.advance(0.002)
        self.assertEqual(names_of(answers(h.sent())), {(HTTP, dns.PTR)})

    def test_duplicate_answer_from_another_responder_suppresses(self) -> None:
        """If another responder multicasts our queued answer first, ours is not sent."""
        h = Harness()
        h.settle()
        h.receive(query((HTTP, dns.PTR)), PEER)
        h.receive(response(rr_ptr(HTTP, PORTAL)), PEER2)
        h.clock.advance(1)
        self.assertEqual(h.sent(), [])
        self.assertEqual(h.proto.stats["duplicates_suppressed"], 1)

    def test_qu_question_recently_multicast_is_answered_by_unicast(self) -> None:
        """A QU question for a record multicast within a quarter TTL is answered by unicast."""
        h = Harness()
        h.settle()
        h.receive(query((HOST, dns.A, True)), PEER)
        out = h.sent()
        self.assertEqual(len(out), 1)
        message, dest = out[0]
        self.assertEqual(dest, PEER)
        self.assertEqual(message.id, 0)
        self.assertEqual(message.queries, [])
        (a,) = message.answers
        self.assertEqual((a.name.name, a.cls, a.ttl), (HOST, dns.IN | CACHE_FLUSH, 120))

    def test_qu_question_not_recently_multicast_is_multicast(self) -> None:
        """A QU question for a record not multicast for a quarter TTL is answered by multicast."""
        h = Harness()
        h.settle()
        h.clock.advance(31)
        h.receive(query((HOST, dns.A, True)), PEER)
        out = h.sent()
        self.assertEqual([dest for _, dest in out], [GROUP])

    def test_legacy_unicast_query(self) -> None:
        """A query from a non-5353 port gets a unicast reply echoing id and question, TTL 10."""
        h = Harness()
        h.settle()
        h.receive(query((HOST, dns.A), message_id=0x1234), LEGACY)
        out = h.sent()
        self.assertEqual(len(out), 1)
        message, dest = out[0]
        self.assertEqual(dest, LEGACY)
        self.assertEqual(message.id, 0x1234)
        self.assertEqual([(q.name.name, q.type) for q in message.queries], [(HOST, dns.A)])
        (a,) = message.answers
        self.assertEqual((a.ttl, a.cls), (10, dns.IN))

    def test_probe_for_our_claimed_name_is_defended_at_once(self) -> None:
        """A foreign probe for our claimed name is answered immediately by multicast."""
        h = Harness()
        h.settle()
        h.receive(query((HOST, dns.ALL_RECORDS), authority=[rr_a(HOST, "192.0.2.99")]))
        out = h.sent()
        self.assertEqual([dest for _, dest in out], [GROUP])
        self.assertEqual(names_of(answers(out)), {(HOST, dns.A)})

    def test_unknown_names_and_classes_get_no_answer(self) -> None:
        """Questions for other names, or in a class other than IN/ANY, are not answered."""
        h = Harness()
        h.settle()
        h.receive(query((b"other.local", dns.A), (b"piccolo.lan", dns.A)), LEGACY)
        m = dns.Message(id=1, maxSize=0)
        m.queries = [dns.Query(HOST, dns.A, dns.CH)]
        h.receive(m.toStr(), LEGACY)
        self.assertEqual(h.sent(), [])

    def test_non_query_opcodes_and_errors_are_ignored(self) -> None:
        """Messages with a non-zero opcode or rcode are ignored (RFC 6762 §18)."""
        h = Harness()
        h.settle()
        m = dns.Message(id=1, opCode=dns.OP_STATUS, maxSize=0)
        m.queries = [dns.Query(HOST, dns.A)]
        h.receive(m.toStr(), LEGACY)
        m = dns.Message(id=1, rCode=dns.ESERVER, maxSize=0)
        m.queries = [dns.Query(HOST, dns.A)]
        h.receive(m.toStr(), LEGACY)
        self.assertEqual(h.sent(), [])
        self.assertEqual(h.proto.stats["ignored"], 2)

    def test_each_interface_answers_with_its_own_address(self) -> None:
        """With two interfaces, each advertises and answers only its own address."""
        h = Harness(addresses=(ADDR, "198.51.100.1"))
        h.responder.start()
        h.clock.advance(0.125)
        for index, address in ((0, ADDR), (1, "198.51.100.1")):
            ((probe, dest),) = h.sent(index)
            self.assertEqual(dest, GROUP)
            a = next(rr for rr in probe.authority if rr.type == dns.A)
            self.assertEqual(a.payload.dottedQuad(), address)
        h.run(10)
        h.sent(0)
        h.sent(1)
        h.receive(query((HOST, dns.A)), LEGACY, index=1)
        self.assertEqual(h.sent(0), [])
        ((message, _),) = h.sent(1)
        self.assertEqual([rr.payload.dottedQuad() for rr in message.answers], ["198.51.100.1"])

    def test_ipv6_addresses_are_answered_as_aaaa(self) -> None:
        """Configured IPv6 addresses are AAAA records, offered as additionals with A."""
        clock = Clock()
        responder = Responder(
            clock=clock, hostname="piccolo", ipv6_addresses=["fd00::1"], rand=lambda: 0.5
        )
        proto = MdnsProtocol(responder=responder, address=ADDR, clock=clock)
        transport = FakeDatagramTransport()
        proto.makeConnection(transport)
        responder.add_interface(proto)
        responder.start()
        run(clock, 10)
        written(transport)
        proto.datagramReceived(query((HOST, dns.A)), LEGACY)
        ((message, _),) = written(transport)
        self.assertEqual([rr.type for rr in message.answers], [dns.A])
        self.assertEqual(
            [rr.payload.address for rr in message.additional],
            [ipaddress.IPv6Address("fd00::1").packed],
        )

    def test_interface_added_later_gets_announcements(self) -> None:
        """An interface attached after the names are claimed is announced on at once."""
        h = Harness()
        h.settle()
        late = MdnsProtocol(responder=h.responder, address="198.51.100.7", clock=h.clock)
        transport = FakeDatagramTransport()
        late.makeConnection(transport)
        h.responder.add_interface(late)
        a = [rr for rr in answers(written(transport)) if rr.type == dns.A]
        self.assertEqual([rr.payload.dottedQuad() for rr in a], ["198.51.100.7"])


class DefenceTests(SynchronousTestCase):
    def test_packet_size_bounds(self) -> None:
        """Packets under 12 or over 9000 bytes are dropped and counted."""
        h = Harness()
        h.settle()
        h.receive(b"\x00" * 11, LEGACY)
        big = query((HOST, dns.A)) + b"\x00" * 9000
        h.receive(big, LEGACY)
        self.assertEqual(h.proto.stats["dropped_size"], 2)
        self.assertEqual(h.sent(), [])

    def test_malformed_packets_are_counted_not_raised(self) -> None:
        """A packet that does not decode is counted and never answered."""
        h = Harness()
        h.settle()
        good = query((HOST, dns.A))
        h.receive(good[:-1], LEGACY)
        h.receive(good + b"\x00", LEGACY)
        h.receive(b"\x00\x00\x00\x00\xff\xff" + b"\x00" * 6, LEGACY)
        self.assertEqual(h.proto.stats["dropped_malformed"], 3)
        self.assertEqual(h.sent(), [])

    def test_rate_limit_per_source(self) -> None:
        """A source past its burst is dropped until tokens refill; other sources are unaffected."""
        h = Harness(rate=1.0, burst=3.0)
        h.settle()
        for _ in range(5):
            h.receive(query((HOST, dns.A)), LEGACY)
        self.assertEqual(len(h.sent()), 3)
        self.assertEqual(h.proto.stats["dropped_rate"], 2)
        h.receive(query((HOST, dns.A)), ("192.0.2.61", 40000))
        self.assertEqual(len(h.sent()), 1)
        h.clock.advance(1)
        h.receive(query((HOST, dns.A)), LEGACY)
        h.receive(query((HOST, dns.A)), LEGACY)
        self.assertEqual(len(h.sent()), 1)

    def test_off_link_sources_are_dropped(self) -> None:
        """With a configured prefix, packets from outside it are dropped."""
        h = Harness(network=ipaddress.IPv4Network("192.0.2.0/25"))
        h.settle()
        h.receive(query((HOST, dns.A)), ("192.0.2.200", 40000))
        self.assertEqual(h.sent(), [])
        self.assertEqual(h.proto.stats["dropped_offlink"], 1)
        h.receive(query((HOST, dns.A)), LEGACY)
        self.assertEqual(len(h.sent()), 1)

    def test_send_errors_are_counted_and_reported(self) -> None:
        """A failing socket write is counted and turns the interface's health to WARN."""
        h = Harness()
        h.settle()

        def fail(packet: bytes, addr: object = None) -> None:
            raise OSError(101, "Network is unreachable")

        h.transports[0].write = fail  # type: ignore[method-assign]
        h.receive(query((HOST, dns.A)), LEGACY)
        self.assertEqual(h.proto.stats["send_errors"], 1)
        level, message, figures = h.proto.health()
        self.assertEqual(level, HealthLevel.WARN)
        self.assertIn("Network is unreachable", message)
        self.assertEqual(figures["send_errors"], 1.0)
        h.clock.advance(61)
        self.assertEqual(h.proto.health()[0], HealthLevel.OK)

    def test_internal_errors_never_escape(self) -> None:
        """An unexpected error while handling a packet is logged and counted, not raised."""
        clock = Clock()

        class Buggy(Responder):
            def handle(self, *args: object) -> None:
                raise RuntimeError("bug")

        responder = Buggy(clock=clock, hostname="piccolo")
        proto = MdnsProtocol(responder=responder, address=ADDR, clock=clock)
        proto.makeConnection(FakeDatagramTransport())
        proto.datagramReceived(query((HOST, dns.A)), LEGACY)
        self.assertEqual(proto.stats["internal_errors"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_nothing_is_answered_before_start_or_after_stop(self) -> None:
        """A stopped responder answers nothing."""
        h = Harness()
        h.receive(query((HOST, dns.A)), LEGACY)
        h.claim()
        h.responder.stop()
        h.sent()
        h.receive(query((HOST, dns.A)), LEGACY)
        self.assertEqual(h.sent(), [])

    def test_multicast_history_stays_bounded(self) -> None:
        """Records that left the zone are pruned from the multicast history; current ones stay."""
        h = Harness()
        h.settle()
        for i in range(LAST_MULTICAST_LIMIT + 50):
            h.proto.send_multicast_records(host_records(f"gone{i}", ADDR))
        self.assertLessEqual(len(h.proto._last_multicast), LAST_MULTICAST_LIMIT + 1)
        for record in h.responder.zone(h.proto).records:
            self.assertIsNotNone(h.proto.last_multicast(record.ident))


class HealthTests(SynchronousTestCase):
    def test_health_follows_claim_state(self) -> None:
        """Health is ERROR without a transport, OK while probing and answering."""
        h = Harness()
        self.assertEqual(h.proto.health()[:2], (HealthLevel.WARN, "responder stopped"))
        h.responder.start()
        self.assertEqual(h.proto.health()[:2], (HealthLevel.OK, "probing piccolo.local"))
        h.run(1)
        self.assertEqual(h.proto.health()[:2], (HealthLevel.OK, "answering as piccolo.local"))
        detached = MdnsProtocol(responder=h.responder, address="198.51.100.2", clock=h.clock)
        self.assertEqual(detached.health()[0], HealthLevel.ERROR)
