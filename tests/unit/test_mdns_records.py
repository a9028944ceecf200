"""Unit tests for piccolod.mdns.records and piccolod.mdns.codec: names, records, zone, wire."""

from __future__ import annotations

from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from piccolod.events import RoutePublished
from piccolod.mdns import records
from piccolod.mdns.codec import MalformedPacket, decode, encode_query, encode_responses
from piccolod.mdns.records import (
    InvalidService,
    Record,
    ServiceSpec,
    Zone,
    canonical_rdata,
    host_records,
    next_host_label,
    next_instance_label,
    rr_ident,
    sanitize_label,
    service_records,
)
from piccolod.mdns.testing import query, rr_ptr, rr_srv, rr_txt


class NameTests(SynchronousTestCase):
    def test_host_renames_count_up(self) -> None:
        """Host renames go piccolo -> piccolo-2 -> piccolo-3."""
        self.assertEqual(next_host_label("piccolo", "piccolo"), "piccolo-2")
        self.assertEqual(next_host_label("piccolo-2", "piccolo"), "piccolo-3")
        self.assertEqual(next_host_label("piccolo-9", "piccolo"), "piccolo-10")

    def test_host_rename_of_a_name_ending_in_digits(self) -> None:
        """A requested name that itself ends in -N is suffixed, not counted up."""
        self.assertEqual(next_host_label("box-1", "box-1"), "box-1-2")
        self.assertEqual(next_host_label("box-1-2", "box-1"), "box-1-3")

    def test_host_rename_stays_a_valid_label(self) -> None:
        """Renaming a 63-character label keeps it at most 63 characters."""
        long = "a" * 63
        renamed = next_host_label(long, long)
        self.assertEqual(len(renamed), 63)
        self.assertTrue(records.is_valid_host_label(renamed))
        self.assertTrue(renamed.endswith("-2"))

    def test_instance_renames_use_parenthesised_numbers(self) -> None:
        """Service instance renames go 'x' -> 'x (2)' -> 'x (3)'."""
        self.assertEqual(next_instance_label("piccolo", "piccolo"), "piccolo (2)")
        self.assertEqual(next_instance_label("piccolo (2)", "piccolo"), "piccolo (3)")
        long = "é" * 40
        renamed = next_instance_label(long, long)
        self.assertLessEqual(len(renamed.encode()), 63)
        self.assertTrue(renamed.endswith(" (2)"))

    def test_sanitize_label(self) -> None:
        """Labels lose dots and control characters and are cut to 63 bytes on a character."""
        self.assertEqual(sanitize_label("my.app"), "my-app")
        self.assertEqual(sanitize_label("a\x00b"), "a-b")
        self.assertEqual(sanitize_label("   "), "service")
        cut = sanitize_label("ü" * 40)
        self.assertEqual(cut, "ü" * 31)

    def test_host_label_validation(self) -> None:
        """Host labels are letters, digits and inner hyphens."""
        for good in ("piccolo", "a", "box-2", "A1"):
            self.assertTrue(records.is_valid_host_label(good), good)
        for bad in ("", "-a", "a-", "a.b", "a b", "a" * 64, "pïccolo"):
            self.assertFalse(records.is_valid_host_label(bad), bad)


class ServiceSpecTests(SynchronousTestCase):
    def test_from_route_names_the_instance_after_app_and_listener(self) -> None:
        """A route becomes instance '<app>-<listener>' with its type, port and TXT."""
        spec = ServiceSpec.from_route(
            RoutePublished(app="gitea", listener="web", port=9001, txt=(("path", "/git"),))
        )
        self.assertEqual(spec.key, "gitea/web")
        self.assertEqual(spec.instance, "gitea-web")
        self.assertEqual((spec.service_type, spec.port), ("_http._tcp", 9001))
        self.assertEqual(spec.txt_strings(), [b"path=/git"])
        same = ServiceSpec.from_route(RoutePublished(app="gitea", listener="gitea", port=1))
        self.assertEqual(same.instance, "gitea")

    def test_invalid_services_are_refused(self) -> None:
        """Bad service types, ports and TXT entries raise InvalidService."""
        for kwargs in (
            {"service_type": "http"},
            {"service_type": "_http._sctp"},
            {"service_type": "_averyveryverylongname._tcp"},
            {"port": 0},
            {"port": 70000},
            {"txt": (("", "x"),)},
            {"txt": (("k=v", "x"),)},
            {"txt": (("k", "x" * 300),)},
            {"instance": "a.b"},
            {"instance": ""},
        ):
            base = {"key": "k", "instance": "x", "service_type": "_http._tcp", "port": 80}
            base.update(kwargs)
            with self.assertRaises(InvalidService, msg=str(kwargs)):
                ServiceSpec(**base)  # type: ignore[arg-type]

    def test_empty_txt_is_one_empty_string(self) -> None:
        """A service without TXT data publishes a single empty string (RFC 6763 §6.1)."""
        spec = ServiceSpec("k", "x", "_ssh._tcp", 22)
        self.assertEqual(spec.txt_strings(), [b""])


class RecordTests(SynchronousTestCase):
    def test_host_records(self) -> None:
        """A host has one A per IPv4 and one AAAA per IPv6 address, unique, TTL 120."""
        rs = host_records("piccolo", "192.0.2.1", ["fd00::1"])
        self.assertEqual(
            [(r.name, r.rtype, r.ttl, r.unique) for r in rs],
            [
                (b"piccolo.local", dns.A, 120, True),
                (b"piccolo.local", dns.AAAA, 120, True),
            ],
        )

    def test_service_records_and_ttls(self) -> None:
        """A service has unique SRV (120 s) and TXT (4500 s) and shared PTRs (4500 s)."""
        spec = ServiceSpec("portal", "piccolo", "_http._tcp", 8080, (("path", "/"),))
        rs = {(r.name, r.rtype): r for r in service_records("piccolo", spec, "piccolo-2")}
        srv = rs[(b"piccolo._http._tcp.local", dns.SRV)]
        self.assertEqual((srv.ttl, srv.unique, srv.payload.port), (120, True, 8080))
        self.assertEqual(srv.payload.target.name, b"piccolo-2.local")
        txt = rs[(b"piccolo._http._tcp.local", dns.TXT)]
        self.assertEqual((txt.ttl, txt.unique), (4500, True))
        ptr = rs[(b"_http._tcp.local", dns.PTR)]
        self.assertEqual((ptr.ttl, ptr.unique), (4500, False))
        enum = rs[(b"_services._dns-sd._udp.local", dns.PTR)]
        self.assertEqual(enum.payload.name.name, b"_http._tcp.local")

    def test_cache_flush_bit_only_on_unique_records(self) -> None:
        """rr() sets the cache-flush bit on unique records unless asked not to."""
        a = host_records("piccolo", "192.0.2.1")[0]
        self.assertEqual(a.rr().cls, 0x8001)
        self.assertEqual(a.rr(flush=False).cls, 1)
        self.assertEqual(a.rr(ttl=0).ttl, 0)
        ptr = Record.make(b"_http._tcp.local", dns.PTR, 4500, records.rdata_ptr(b"x.local"), False)
        self.assertEqual(ptr.rr().cls, 1)

    def test_identity_ignores_letter_case(self) -> None:
        """Received records that differ only in case have our record's identity."""
        ours = Record.make(
            b"_http._tcp.local",
            dns.PTR,
            4500,
            records.rdata_ptr(b"piccolo._http._tcp.local"),
            False,
        )
        theirs = rr_ptr(b"_HTTP._tcp.LOCAL", b"Piccolo._HTTP._tcp.local")
        self.assertEqual(rr_ident(theirs), ours.ident)
        srv = rr_srv(b"X.local", 80, b"HOST.local")
        self.assertEqual(
            rr_ident(srv)[2], canonical_rdata(dns.SRV, rr_srv(b"x", 80, b"host.local").payload)
        )

    def test_unencodable_rdata_is_a_placeholder(self) -> None:
        """canonical_rdata never raises."""
        self.assertEqual(canonical_rdata(dns.PTR, object()), b"?")


def sample_zone() -> Zone:
    """A dual-stack host with the portal and an ssh app."""
    spec = ServiceSpec("portal", "piccolo", "_http._tcp", 8080)
    ssh = ServiceSpec("app/ssh", "app-ssh", "_ssh._tcp", 22)
    return Zone(
        [
            *host_records("piccolo", "192.0.2.1", ["fd00::1"]),
            *service_records("piccolo", spec, "piccolo"),
            *service_records("app-ssh", ssh, "piccolo"),
        ]
    )


class ZoneTests(SynchronousTestCase):
    def zone(self) -> Zone:
        return sample_zone()

    def test_lookup_by_name_and_type_case_insensitively(self) -> None:
        """Lookups ignore case; ANY returns every record of the name."""
        z = self.zone()
        self.assertEqual(len(z.lookup(b"PICCOLO.local", dns.A)), 1)
        self.assertEqual(len(z.lookup(b"piccolo.local", dns.ALL_RECORDS)), 2)
        self.assertEqual(z.lookup(b"piccolo.local", dns.MX), [])
        enum = z.lookup(b"_services._dns-sd._udp.local", dns.PTR)
        self.assertEqual(
            sorted(r.payload.name.name for r in enum), [b"_http._tcp.local", b"_ssh._tcp.local"]
        )

    def test_duplicate_records_are_kept_once(self) -> None:
        """Two services of one type share one enumeration PTR."""
        a = ServiceSpec("a", "a", "_http._tcp", 1)
        b = ServiceSpec("b", "b", "_http._tcp", 2)
        z = Zone([*service_records("a", a, "h"), *service_records("b", b, "h")])
        self.assertEqual(len(z.lookup(b"_services._dns-sd._udp.local", dns.PTR)), 1)
        self.assertEqual(len(z.lookup(b"_http._tcp.local", dns.PTR)), 2)

    def test_additionals(self) -> None:
        """PTR brings SRV, TXT and addresses; SRV brings addresses; A brings AAAA."""
        z = self.zone()
        ptr = z.lookup(b"_http._tcp.local", dns.PTR)
        extra = {(r.name, r.rtype) for r in z.additionals(ptr, set())}
        self.assertEqual(
            extra,
            {
                (b"piccolo._http._tcp.local", dns.SRV),
                (b"piccolo._http._tcp.local", dns.TXT),
                (b"piccolo.local", dns.A),
                (b"piccolo.local", dns.AAAA),
            },
        )
        a = z.lookup(b"piccolo.local", dns.A)
        self.assertEqual([r.rtype for r in z.additionals(a, set())], [dns.AAAA])
        excluded = {r.ident for r in z.lookup(b"piccolo.local", dns.ALL_RECORDS)}
        srv = z.lookup(b"piccolo._http._tcp.local", dns.SRV)
        self.assertEqual(z.additionals(srv, excluded), [])


class NsecTests(SynchronousTestCase):
    def test_encoding_is_the_restricted_mdns_form(self) -> None:
        """Next name uncompressed, one window: A(1) TXT(16) AAAA(28) SRV(33) in 5 bytes."""
        from io import BytesIO

        out = BytesIO()
        records.Record_NSEC(b"piccolo.local", {1, 16, 28, 33}).encode(out, {})
        name = b"\x07piccolo\x05local\x00"
        self.assertEqual(out.getvalue(), name + bytes([0, 5, 0x40, 0x00, 0x80, 0x08, 0x40]))

    def test_round_trip_through_the_strict_codec(self) -> None:
        """An NSEC in a response decodes back to the same next name and types."""
        nsec = records.nsec_record(b"piccolo.local", {dns.A})
        (packet,) = encode_responses([nsec.rr()], [])
        (rr,) = decode(packet).answers
        self.assertEqual((rr.type, rr.payload), (records.NSEC, nsec.payload))
        self.assertEqual(records.rr_ident(rr), nsec.ident)

    def test_malformed_bitmaps_are_refused(self) -> None:
        """A bitmap longer than its data, of size 0 or 33, or trailing bytes: MalformedPacket."""
        name = b"\x01x\x05local\x00"
        for bitmap in (bytes([0, 4, 0x40]), bytes([0, 0]), bytes([0, 33]) + bytes(33), b"\x00"):
            rdata = name + bitmap
            header = bytes([0] * 2 + [0x84, 0] + [0, 0, 0, 1, 0, 0, 0, 0])
            rr = name + bytes([0, 47, 0, 1, 0, 0, 0, 120]) + len(rdata).to_bytes(2, "big") + rdata
            self.assertRaises(MalformedPacket, decode, header + rr)

    def test_types_outside_the_first_window_are_refused(self) -> None:
        """The mDNS form holds types 1-255 only."""
        self.assertRaises(ValueError, records.Record_NSEC, b"x.local", {256})

    def test_zone_nsec_per_unique_name(self) -> None:
        """Unique names get an NSEC of their types; shared names none; negative() as RFC 6762."""
        z = sample_zone()
        host = z.lookup(b"piccolo.local", records.NSEC)
        self.assertEqual([r.payload.types for r in host], [{dns.A, dns.AAAA}])
        self.assertEqual(z.negative(b"piccolo.local", dns.MX), host)
        self.assertEqual(z.negative(b"piccolo.local", dns.A), [])
        self.assertEqual(z.negative(b"piccolo.local", dns.ALL_RECORDS), [])
        self.assertEqual(z.negative(b"_http._tcp.local", dns.SRV), [])
        self.assertEqual(z.negative(b"elsewhere.local", dns.A), [])
        instance = z.negative(b"PICCOLO._http._tcp.local", dns.A)
        self.assertEqual([r.payload.types for r in instance], [{dns.SRV, dns.TXT}])
        self.assertTrue(all(r.ident in z.idents for r in (*host, *instance)))


class CodecTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """A query with questions, known answers and authority decodes to what was sent."""
        packet = query(
            (b"piccolo.local", dns.A, True),
            known=[rr_ptr(b"_http._tcp.local", b"x._http._tcp.local")],
            authority=[rr_txt(b"x.local", b"a=b")],
            message_id=7,
        )
        m = decode(packet)
        self.assertEqual(m.id, 7)
        self.assertEqual(m.queries[0].cls, 0x8001)
        self.assertEqual(m.answers[0].payload.name.name, b"x._http._tcp.local")
        self.assertEqual(m.authority[0].payload.data, [b"a=b"])

    def test_truncated_packets_are_refused(self) -> None:
        """Every proper prefix of a valid packet is refused."""
        packet = query((b"piccolo.local", dns.A), known=[rr_srv(b"a.local", 80, b"b.local")])
        decode(packet)
        for n in range(len(packet)):
            with self.assertRaises(MalformedPacket, msg=str(n)):
                decode(packet[:n])

    def test_trailing_bytes_are_refused(self) -> None:
        """Bytes after the last record make the packet malformed."""
        with self.assertRaises(MalformedPacket):
            decode(query((b"piccolo.local", dns.A)) + b"\x00")

    def test_counts_larger_than_content_are_refused(self) -> None:
        """A header claiming more records than present is refused."""
        packet = bytearray(query((b"piccolo.local", dns.A)))
        for offset in (4, 6, 8, 10):
            bad = bytearray(packet)
            bad[offset : offset + 2] = b"\xff\xff"
            with self.assertRaises(MalformedPacket):
                decode(bytes(bad))

    def test_rdlength_mismatch_is_refused(self) -> None:
        """An A record whose rdlength is not 4 is refused."""
        m = dns.Message(answer=1, maxSize=0)
        m.answers = [dns.RRHeader(b"a.local", dns.A, dns.IN, 120, records.rdata_a("192.0.2.1"))]
        packet = bytearray(m.toStr())
        packet[-6:-4] = b"\x00\x05"
        packet += b"\x00"
        with self.assertRaises(MalformedPacket):
            decode(bytes(packet))

    def test_compression_loops_are_refused(self) -> None:
        """A name whose compression pointer points at itself is refused."""
        header = b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        with self.assertRaises(MalformedPacket):
            decode(header + b"\xc0\x0c\x00\x01\x00\x01")
        with self.assertRaises(MalformedPacket):
            decode(header + b"\x01a\xc0\x0c\x00\x01\x00\x01")

    def test_short_input_is_refused(self) -> None:
        """Less than a header is refused."""
        for n in range(12):
            with self.assertRaises(MalformedPacket):
                decode(b"\x00" * n)

    def test_responses_are_split_to_the_budget(self) -> None:
        """Many answers are split over packets within the budget; additionals go last."""
        rrs = [rr_txt(f"s{i}._http._tcp.local".encode(), b"x" * 100) for i in range(40)]
        extra = [rr_ptr(b"_http._tcp.local", b"s0._http._tcp.local")]
        packets = encode_responses(rrs, extra)
        self.assertGreater(len(packets), 1)
        self.assertTrue(all(len(p) <= 1472 for p in packets))
        decoded = [decode(p) for p in packets]
        self.assertEqual(sum(len(m.answers) for m in decoded), 40)
        self.assertTrue(all(m.answer and m.auth and m.id == 0 for m in decoded))
        self.assertEqual([len(m.additional) for m in decoded][-1], 1)
        self.assertEqual(sum(len(m.additional) for m in decoded), 1)
        self.assertEqual(encode_responses([]), [])

    def test_oversized_single_answer_gets_its_own_packet(self) -> None:
        """An answer larger than the budget is still sent, alone."""
        big = rr_txt(b"big.local", *([b"y" * 250] * 8))
        small = rr_txt(b"small.local", b"z")
        packets = encode_responses([small, big, small])
        self.assertEqual([len(decode(p).answers) for p in packets], [1, 1, 1])

    def test_probe_packets_are_queries(self) -> None:
        """encode_query builds a query with questions and authority records."""
        m = decode(
            encode_query(
                [dns.Query(b"a.local", dns.ALL_RECORDS)], [rr_srv(b"a.local", 1, b"h.local")]
            )
        )
        self.assertFalse(m.answer)
        self.assertEqual(len(m.queries), 1)
        self.assertEqual(len(m.authority), 1)
