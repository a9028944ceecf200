"""
The TCP and HTTP proxies, driven byte by byte: a ``StringTransport`` for
the client, the memory reactor's recorded connection for the backend.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from piccolod.services.proxy import MAX_HEAD, HTTPProxyFactory, TCPProxyFactory

CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)


class ProxyCase(SynchronousTestCase):
    factory_type: Any = HTTPProxyFactory

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = self.factory_type(self.reactor, lambda: ("127.0.0.1", 15000), 35000)
        self.front = self.factory.buildProtocol(CLIENT)
        self.client = StringTransport(peerAddress=CLIENT)
        self.front.makeConnection(self.client)
        self.backend: StringTransport | None = None

    def connect_backend(self) -> StringTransport:
        """Complete the pending backend connection; returns its transport."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 15000))
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        proto.makeConnection(transport)
        self.backend = transport
        self.backend_proto = proto
        return transport

    def refuse_backend(self) -> None:
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def sent(self) -> bytes:
        assert self.backend is not None
        return self.backend.value()


class HTTPProxyTests(ProxyCase):
    def request(self, data: bytes) -> bytes:
        self.front.dataReceived(data)
        if self.backend is None and self.reactor.tcpClients:
            self.connect_backend()
        return self.sent()

    def test_forwarding_headers_are_ours_never_the_clients(self) -> None:
        """Client X-Forwarded-*, Forwarded and X-Real-IP are replaced by what the proxy saw."""
        sent = self.request(
            b"GET /x?y=1 HTTP/1.1\r\nHost: blog.local\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-For: 1.2.3.4\r\nforwarded: for=1.2.3.4;proto=https\r\n"
            b"X-Real-IP: 1.2.3.4\r\nAccept: */*\r\n\r\n"
        )
        head = sent.split(b"\r\n")
        self.assertEqual(head[0], b"GET /x?y=1 HTTP/1.1")
        self.assertIn(b"Host: blog.local", head)
        self.assertIn(b"Accept: */*", head)
        self.assertNotIn(b"1.2.3.4", sent)
        self.assertNotIn(b"https", sent)
        for header in (
            b"X-Forwarded-For: 192.0.2.7",
            b"X-Real-IP: 192.0.2.7",
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Port: 35000",
            b"X-Forwarded-Host: blog.local",
            b'Forwarded: for=192.0.2.7;proto=http;host="blog.local"',
        ):
            self.assertIn(header, head)
        self.assertTrue(sent.endswith(b"\r\n\r\n"))

    def test_responses_are_spliced_back(self) -> None:
        """Whatever the backend answers reaches the client unchanged."""
        self.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.backend_proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.assertEqual(self.client.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")

    def test_keep_alive_bodies_and_heads(self) -> None:
        """Two requests on one connection: bodies pass intact, each head is rewritten."""
        body = b"X-Forwarded-For: fake\r\n\r\n"
        sent = self.request(
            b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
            + b"GET /b HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
        )
        self.assertIn(body, sent)
        self.assertEqual(sent.count(b"X-Forwarded-For: 192.0.2.7"), 2)
        self.assertNotIn(b"6.6.6.6", sent)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_chunked_bodies_are_followed(self) -> None:
        """A chunked body is forwarded as is and the next request after it is parsed."""
        sent = self.request(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n"
            b"GET /next HTTP/1.1\r\nX-Real-IP: 6.6.6.6\r\n\r\n"
        )
        self.assertIn(b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n", sent)
        self.assertIn(b"GET /next HTTP/1.1", sent)
        self.assertNotIn(b"6.6.6.6", sent)

    def test_split_input_is_reassembled(self) -> None:
        """A head arriving one byte at a time is handled like one arriving whole."""
        data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 9.9.9.9\r\n\r\n"
        for i in range(len(data)):
            self.front.dataReceived(data[i : i + 1])
        self.connect_backend()
        self.assertIn(b"X-Forwarded-For: 192.0.2.7", self.sent())
        self.assertNotIn(b"9.9.9.9", self.sent())

    def test_websocket_upgrade_becomes_a_splice(self) -> None:
        """After an Upgrade request's head the connection is spliced untouched both ways."""
        self.request(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Key: x\r\n\r\n"
        )
        assert self.backend is not None
        self.backend.clear()
        frame = b"GET /fake HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\n\r\n\x81\x05hello"
        self.front.dataReceived(frame)
        self.assertEqual(self.sent(), frame)
        self.backend_proto.dataReceived(b"\x81\x02ok")
        self.assertTrue(self.client.value().endswith(b"\x81\x02ok"))

    def test_smuggling_attempts_are_refused(self) -> None:
        """Ambiguous framing, folding, bad lines and unknown codings get 400/501 and a close."""
        cases = {
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n": 400,
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n": 400,
            b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n": 400,
            b"GET / HTTP/2.0\r\n\r\n": 400,
            b"GET /\r\n\r\n": 400,
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n": 400,
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n": 501,
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n": 400,
        }
        for data, status in cases.items():
            self.setUp()
            self.front.dataReceived(data)
            self.assertTrue(self.client.value().startswith(b"HTTP/1.1 %d" % status), data)
            self.assertTrue(self.client.disconnecting, data)
            self.assertEqual(self.reactor.tcpClients, [], data)

    def test_oversized_heads_are_refused(self) -> None:
        """A head over the limit gets 431 without contacting the backend."""
        self.front.dataReceived(b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10))
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 431"))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_unreachable_backend_is_a_502(self) -> None:
        """When the app cannot be reached the client gets 502 and the connection closes."""
        self.front.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.refuse_backend()
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 502"))
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.factory.stats.backend_failures, 1)

    def test_backpressure_links_both_transports(self) -> None:
        """Each side is the producer of the other (a slow reader pauses the writer)."""
        self.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert self.backend is not None
        self.assertIs(self.client.producer, self.backend)
        self.assertIs(self.backend.producer, self.client)

    def test_closing_either_side_closes_the_other(self) -> None:
        """A backend close closes the client, and a client close closes the backend."""
        self.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.backend_proto.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(self.client.disconnecting)
        self.setUp()
        self.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.front.connectionLost(Failure(ConnectionRefusedError()))
        assert self.backend is not None
        self.assertTrue(self.backend.disconnecting)
        self.assertEqual(self.factory.stats.active, 0)


class TCPProxyTests(ProxyCase):
    factory_type = TCPProxyFactory

    def test_bytes_are_spliced_both_ways(self) -> None:
        """The TCP proxy connects at once and copies bytes both ways untouched."""
        backend = self.connect_backend()
        self.front.dataReceived(b"\x16\x03\x01 hello X-Forwarded-For: x")
        self.assertEqual(backend.value(), b"\x16\x03\x01 hello X-Forwarded-For: x")
        self.backend_proto.dataReceived(b"reply")
        self.assertEqual(self.client.value(), b"reply")
        self.assertEqual((self.factory.stats.bytes_in, self.factory.stats.bytes_out), (28, 5))

    def test_data_before_the_backend_is_kept(self) -> None:
        """Bytes that arrive before the backend answers are sent once it does."""
        self.front.dataReceived(b"early")
        backend = self.connect_backend()
        self.assertEqual(backend.value(), b"early")

    def test_a_refused_backend_closes_the_client(self) -> None:
        """When the backend refuses, the client connection is closed."""
        self.refuse_backend()
        self.assertTrue(self.client.disconnecting)

    def test_close_all_aborts_connections(self) -> None:
        """close_all() drops every open client connection."""
        self.connect_backend()
        self.factory.close_all()
        self.assertTrue(self.client.disconnecting or self.client.disconnected)
