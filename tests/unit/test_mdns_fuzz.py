"""
Fuzzing the mDNS responder with hypothesis: generated and mutated packets
(random bytes, truncations, oversized counts, compression-pointer loops,
byte flips, structurally valid but hostile messages) never raise out of
``datagramReceived``, garbage is never answered, and the responder's names
stay valid.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from piccolod.mdns.codec import decode
from piccolod.mdns.protocol import ClaimState
from piccolod.mdns.records import is_valid_host_label
from piccolod.mdns.testing import query
from tests.unit.test_mdns_protocol import HOST, HTTP, PORTAL, Harness

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=False,
)

SOURCES = st.sampled_from([("192.0.2.50", 5353), ("192.0.2.60", 40000)])

VALID_QUERIES = [
    query((HOST, dns.A)),
    query((HTTP, dns.PTR), (PORTAL, dns.ALL_RECORDS)),
    query((PORTAL, dns.SRV, True), known=[]),
]

OUR_NAMES = [HOST, PORTAL, HTTP, b"_services._dns-sd._udp.local", b"PICCOLO.local"]


def hostile_names() -> st.SearchStrategy[bytes]:
    label = st.binary(min_size=1, max_size=63).filter(lambda b: b"." not in b)
    random_name = st.lists(label, min_size=1, max_size=4).map(b".".join)
    return st.one_of(st.sampled_from(OUR_NAMES), random_name)


def hostile_records() -> st.SearchStrategy[dns.RRHeader]:
    def build(name: bytes, kind: int, ttl: int, data: bytes, flush: bool) -> dns.RRHeader:
        cls = dns.IN | (0x8000 if flush else 0)
        payload: object
        if kind == dns.A:
            payload = dns.Record_A(".".join(str(b) for b in (data + b"\x00" * 4)[:4]))
        elif kind == dns.PTR:
            payload = dns.Record_PTR(
                HOST if not data else data[:20].replace(b".", b"-") + b".local"
            )
        elif kind == dns.SRV:
            payload = dns.Record_SRV(0, 0, len(data), b"x.local")
        elif kind == dns.TXT:
            payload = dns.Record_TXT(data[:255])
        else:
            payload = dns.UnknownRecord(data)
        rr = dns.RRHeader(
            name, kind if kind in (dns.A, dns.PTR, dns.SRV, dns.TXT) else 99, cls, ttl
        )
        rr.payload = payload  # type: ignore[assignment]
        return rr

    return st.builds(
        build,
        hostile_names(),
        st.sampled_from([dns.A, dns.PTR, dns.SRV, dns.TXT, 99]),
        st.integers(min_value=0, max_value=2**32 - 1),
        st.binary(max_size=40),
        st.booleans(),
    )


def check_invariants(test: SynchronousTestCase, h: Harness) -> None:
    """No internal error, names still valid host labels, responder running."""
    test.assertEqual(h.proto.stats["internal_errors"], 0)
    test.assertTrue(h.responder.running)
    test.assertTrue(is_valid_host_label(h.responder.host.label))
    for claim in h.responder.claims():
        test.assertTrue(claim.label)
        test.assertLessEqual(len(claim.label.encode()), 63)


class FuzzTests(SynchronousTestCase):
    @FUZZ
    @given(data=st.binary(max_size=700), source=SOURCES)
    def test_random_bytes_are_never_answered(self, data: bytes, source: tuple[str, int]) -> None:
        """Arbitrary bytes never raise and never get an answer."""
        h = Harness()
        h.settle()
        h.receive(data, source)
        h.clock.advance(2)
        self.assertEqual(h.sent(), [])
        check_invariants(self, h)
        self.assertEqual(h.responder.host.state, ClaimState.CLAIMED)

    @FUZZ
    @given(packet=st.sampled_from(VALID_QUERIES), data=st.data(), source=SOURCES)
    def test_truncated_queries_are_never_answered(
        self, packet: bytes, data: st.DataObject, source: tuple[str, int]
    ) -> None:
        """Every truncation of a valid query for our names is dropped unanswered."""
        cut = data.draw(st.integers(min_value=0, max_value=len(packet) - 1))
        h = Harness()
        h.settle()
        h.receive(packet[:cut], source)
        h.clock.advance(2)
        self.assertEqual(h.sent(), [])
        dropped = h.proto.stats["dropped_malformed"] + h.proto.stats["dropped_size"]
        self.assertEqual(dropped, 1)
        check_invariants(self, h)

    @FUZZ
    @given(
        packet=st.sampled_from(VALID_QUERIES),
        section=st.integers(min_value=0, max_value=3),
        extra=st.integers(min_value=1, max_value=65535),
        source=SOURCES,
    )
    def test_oversized_counts_are_never_answered(
        self, packet: bytes, section: int, extra: int, source: tuple[str, int]
    ) -> None:
        """A header claiming more entries than the packet holds is dropped unanswered."""
        offset = 4 + 2 * section
        count = struct.unpack_from("!H", packet, offset)[0]
        bad = bytearray(packet)
        struct.pack_into("!H", bad, offset, min(65535, count + extra))
        h = Harness()
        h.settle()
        h.receive(bytes(bad), source)
        h.clock.advance(2)
        self.assertEqual(h.sent(), [])
        self.assertEqual(h.proto.stats["dropped_malformed"], 1)

    @FUZZ
    @given(
        labels=st.lists(
            st.binary(min_size=1, max_size=10).filter(lambda b: b"." not in b), max_size=5
        ),
        back=st.integers(min_value=0, max_value=60),
        pointers=st.integers(min_value=1, max_value=3),
        source=SOURCES,
    )
    def test_compression_pointer_loops_are_never_answered(
        self, labels: list[bytes], back: int, pointers: int, source: tuple[str, int]
    ) -> None:
        """Names whose compression pointers loop (or point forward) are dropped unanswered."""
        header = struct.pack("!6H", 0, 0, 1, 0, 0, 0)
        name = b"".join(bytes([len(label)]) + label for label in labels)
        start = len(header)
        # Point back into this same name (a loop) or past its end.
        target = start + min(back, len(name))
        chain = b"".join(struct.pack("!H", 0xC000 | target) for _ in range(pointers))
        packet = header + name + chain + struct.pack("!HH", dns.A, dns.IN)
        h = Harness()
        h.settle()
        h.receive(packet, source)
        h.clock.advance(2)
        self.assertEqual(h.sent(), [])
        check_invariants(self, h)

    @FUZZ
    @given(
        packet=st.sampled_from(VALID_QUERIES),
        flips=st.lists(
            st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(0, 255)),
            min_size=1,
            max_size=6,
        ),
        source=SOURCES,
    )
    def test_mutated_queries_never_raise(
        self, packet: bytes, flips: list[tuple[int, int]], source: tuple[str, int]
    ) -> None:
        """Byte-flipped queries never raise; whatever is sent is a well-formed response."""
        bad = bytearray(packet)
        for position, value in flips:
            bad[position % len(bad)] = value
        h = Harness()
        h.settle()
        h.receive(bytes(bad), source)
        h.clock.advance(2)
        for packet_out, _ in h.transports[0].written:
            message = decode(packet_out)
            self.assertTrue(message.answer)
        check_invariants(self, h)

    @FUZZ
    @given(
        records=st.lists(hostile_records(), max_size=6),
        questions=st.lists(
            st.tuples(hostile_names(), st.sampled_from([dns.A, dns.PTR, dns.SRV, 255, 1234])),
            max_size=4,
        ),
        is_response=st.booleans(),
        source=SOURCES,
        probing=st.booleans(),
    )
    def test_hostile_messages_keep_names_valid(
        self,
        records: list[dns.RRHeader],
        questions: list[tuple[bytes, int]],
        is_response: bool,
        source: tuple[str, int],
        probing: bool,
    ) -> None:
        """Well-formed but hostile queries and responses never raise or corrupt our names."""
        m = dns.Message(answer=is_response, maxSize=0)
        m.queries = [dns.Query(name, qtype) for name, qtype in questions]
        m.answers = records[:3]
        m.authority = records[3:]
        try:
            packet = m.toStr()
        except Exception:
            return  # not encodable by Twisted: not a packet anyone can send
        h = Harness()
        if probing:
            h.responder.start()
            h.clock.advance(0.125)
        else:
            h.settle()
        h.receive(packet, source)
        for _ in range(12):
            h.clock.advance(0.25)
        for packet_out, _ in h.transports[0].written:
            self.assertIsNotNone(decode(packet_out))
        check_invariants(self, h)
