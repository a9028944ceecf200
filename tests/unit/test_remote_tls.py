# mypy: disable-error-code="no-untyped-call"
"""
The SNI TLS terminator in memory (``iosim``): the client's SNI name picks
the certificate and the route; the cleartext is spliced to the target both
ways; unknown names and unrouted names get nothing.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from piccolod.remote.acme import IssueRequest
from piccolod.remote.keys import generate_domain_key, read_chain
from piccolod.remote.model import Certificate as StoredCertificate
from piccolod.remote.testing import FakeAcmeBackend, ThreadlessReactor
from piccolod.remote.tls import TLSTerminator, context_for


def issue(ca: FakeAcmeBackend, hostname: str) -> StoredCertificate:
    key = generate_domain_key()
    request = IssueRequest("https://x/dir", (hostname,), "ACCOUNT", key)
    handle, _, _ = ca.begin(request)
    ca.answer(handle)
    assert ca.poll(handle)
    chain = ca.finalize(handle, 0.0)
    info = read_chain(chain, key, hostname)
    return StoredCertificate(
        hostname, key, chain, info.not_before, info.not_after, info.serial, info.issuer, 0.0
    )


class Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None
        self.handshake: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.lost = reason


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects to an in-memory peer whose transport records what was written."""

    def __init__(self, targets: list[tuple[str, int, Any]], host: str, port: int) -> None:
        self.targets = targets
        self.host, self.port = host, port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        protocol = protocolFactory.buildProtocol(None)  # type: ignore[arg-type]
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.targets.append((self.host, self.port, (protocol, transport)))
        return succeed(protocol)


class TerminatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Valid for decades: OpenSSL checks validity against the real time.
        self.ca = FakeAcmeBackend(now=lambda: 1_700_000_000.0, lifetime=40 * 365 * 86400.0)
        self.targets: list[tuple[str, int, Any]] = []
        self.clock = ThreadlessReactor()
        self.terminator = TLSTerminator(
            self.clock,
            lambda host, port: MemoryEndpoint(self.targets, host, port),
        )
        self.portal = issue(self.ca, "portal.example.net")
        self.blog = issue(self.ca, "blog.example.net")
        self.terminator.update(
            {"portal.example.net": self.portal, "blog.example.net": self.blog},
            {"portal.example.net": ("127.0.0.1", 8080), "blog.example.net": ("10.0.0.2", 35001)},
        )

    def connect(self, hostname: str) -> tuple[Client, iosim.IOPump]:
        root = Certificate.loadPEM(self.ca.root_pem())
        client = Client()
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS(hostname, trustRoot=root),
            True,
            Factory.forProtocol(lambda: client),
            clock=self.clock,
        )
        server = self.terminator.factory().buildProtocol(None)  # type: ignore[arg-type]
        wrapped = client_factory.buildProtocol(None)  # type: ignore[arg-type]
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            wrapped,
            iosim.makeFakeClient(wrapped),
            clock=self.clock,
        )
        pump.flush()
        return client, pump

    def test_sni_picks_certificate_and_route(self) -> None:
        """Each SNI name gets its own certificate (verified by the client) and its own target."""
        client, pump = self.connect("blog.example.net")
        self.assertIsNone(client.lost)
        ((host, port, (target, transport)),) = self.targets
        self.assertEqual((host, port), ("10.0.0.2", 35001))
        self.assertEqual(transport.value(), b"hello")  # decrypted, spliced
        target.dataReceived(b"world")
        pump.flush()
        self.assertEqual(client.received, b"world")
        self.assertEqual(self.terminator.connections, {"blog.example.net": 1})
        client2, _ = self.connect("portal.example.net")
        self.assertEqual(self.targets[-1][:2], ("127.0.0.1", 8080))
        self.assertIsNone(client2.lost)

    def test_unknown_name_gets_no_certificate(self) -> None:
        """A name without certificate fails the handshake; nothing is connected."""
        client, _ = self.connect("other.example.net")
        self.assertIsNotNone(client.lost)
        self.assertEqual(self.targets, [])

    def test_name_without_route_is_closed(self) -> None:
        """A certificate whose route went away: the handshake works, then the connection closes."""
        self.terminator.update({"portal.example.net": self.portal}, {})
        client, _ = self.connect("portal.example.net")
        self.assertIsNotNone(client.lost)
        self.assertEqual(self.targets, [])

    def test_target_closing_closes_the_client(self) -> None:
        """When the target closes, the TLS connection closes too."""
        client, pump = self.connect("portal.example.net")
        ((_, _, (target, _transport)),) = self.targets
        target.connectionLost(Failure(ConnectionError("gone")))
        pump.flush()
        self.assertIsNotNone(client.lost)

    def test_contexts_are_reused_until_the_serial_changes(self) -> None:
        """Updating with the same certificate keeps its context; a renewed one replaces it."""
        before = self.terminator.contexts["portal.example.net"]
        self.terminator.update(
            {"portal.example.net": self.portal}, {"portal.example.net": ("127.0.0.1", 8080)}
        )
        self.assertIs(self.terminator.contexts["portal.example.net"], before)
        renewed = issue(self.ca, "portal.example.net")
        self.terminator.update(
            {"portal.example.net": renewed}, {"portal.example.net": ("127.0.0.1", 8080)}
        )
        self.assertIsNot(self.terminator.contexts["portal.example.net"], before)
        self.assertNotIn("blog.example.net", self.terminator.contexts)

    def test_unusable_certificate_is_skipped(self) -> None:
        """A certificate whose key does not match is logged and not served."""
        broken = StoredCertificate(
            "bad.example.net", generate_domain_key(), self.blog.chain_pem, 0, 1, "x", "y", 0
        )
        self.terminator.update({"bad.example.net": broken}, {})
        self.assertEqual(self.terminator.contexts, {})
        self.flushLoggedErrors()
        with self.assertRaises(SSL.Error):
            context_for(broken)

    def test_listens_and_stops(self) -> None:
        """start listens on the configured endpoint; stop closes it (idempotent)."""
        self.terminator.listen = "tcp:8443:interface=127.0.0.1"
        port = self.successResultOf(Deferred.fromCoroutine(self.terminator.start()))
        self.assertEqual(port, 8443)
        self.assertEqual(self.terminator.reactor.tcpServers[0][0], 8443)
        self.successResultOf(Deferred.fromCoroutine(self.terminator.stop()))
        self.successResultOf(Deferred.fromCoroutine(self.terminator.stop()))
        self.assertIsNone(self.terminator.port)
