"""
TLS termination for the remote hostnames, with SNI.

:class:`TLSTerminator` listens on this node's loopback (the tunnels
forward their ``https`` port to it).  The client's SNI name picks the
certificate (a pyOpenSSL servername callback swaps in that hostname's
context) and, once the handshake is done, the route: the cleartext stream
is spliced to the hostname's target (the portal or an app listener, local
or on the leader).  A name without certificate, or without an available
route, gets no certificate (the handshake fails) or a closed connection.

Certificates and routes are swapped atomically by :meth:`TLSTerminator.update`;
connections already open keep what they started with.  Stopping closes
every connection: nothing is served while storage is locked.

Tests: ``tests/unit/test_remote_tls.py`` (memory transports) and the ACME
integration test (a real TLS client trusting the ACME root).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import connectProtocol, serverFromString
from twisted.internet.interfaces import (
    IHandshakeListener,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.remote.model import Certificate

__all__ = ["TLSTerminator", "context_for"]


def context_for(certificate: Certificate) -> SSL.Context:
    """A server context for one certificate (TLS 1.2 or later, chain included)."""
    chain = x509.load_pem_x509_certificates(certificate.chain_pem.encode("ascii"))
    key = serialization.load_pem_private_key(certificate.key_pem.encode("ascii"), password=None)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.use_certificate(chain[0])
    for intermediate in chain[1:]:
        ctx.add_extra_chain_cert(intermediate)
    ctx.use_privatekey(key)  # type: ignore[arg-type]
    ctx.check_privatekey()
    return ctx


class _Back(Protocol):
    """The connection to the target, feeding the TLS side."""

    def __init__(self, front: _TLSSplice) -> None:
        self.front = front

    def dataReceived(self, data: bytes) -> None:
        if self.front.transport is not None:
            self.front.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if self.front.transport is not None:
            self.front.transport.loseConnection()


@implementer(IHandshakeListener)
class _TLSSplice(Protocol):
    """The decrypted side of one TLS connection: routed by its SNI name."""

    log = Logger()

    def __init__(self, terminator: TLSTerminator) -> None:
        self.terminator = terminator
        self.back: _Back | None = None
        self.pending: list[bytes] = []
        self.closed = False
        self.hostname = ""

    def connectionMade(self) -> None:
        self.terminator._live.add(self)

    def handshakeCompleted(self) -> None:
        assert self.transport is not None
        name = self.transport.getHandle().get_servername()  # type: ignore[attr-defined]
        self.hostname = name.decode("ascii", "replace").lower() if name else ""
        route = self.terminator.routes.get(self.hostname)
        if route is None:
            self.log.info("TLS: no route for {hostname!r}", hostname=self.hostname)
            self.transport.loseConnection()
            return
        self.terminator.connections[self.hostname] = (
            self.terminator.connections.get(self.hostname, 0) + 1
        )
        d = connectProtocol(self.terminator.connect_target(*route), _Back(self))
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, back: _Back) -> None:
        if self.closed:
            assert back.transport is not None
            back.transport.loseConnection()
            return
        self.back = back
        assert back.transport is not None
        for data in self.pending:
            back.transport.write(data)
        self.pending = []

    def _failed(self, failure: Failure) -> None:
        self.log.info(
            "TLS {hostname}: the target cannot be reached: {error}",
            hostname=self.hostname,
            error=failure.getErrorMessage(),
        )
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.back is not None and self.back.transport is not None:
            self.back.transport.write(data)
        else:
            self.pending.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.closed = True
        self.terminator._live.discard(self)
        if self.back is not None and self.back.transport is not None:
            self.back.transport.loseConnection()


@implementer(IOpenSSLServerConnectionCreator)
class _SNICreator:
    """Every connection starts on a certificate-less context; SNI picks the real one."""

    def __init__(self, terminator: TLSTerminator) -> None:
        self.terminator = terminator
        self.default = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.default.set_min_proto_version(SSL.TLS1_2_VERSION)
        self.default.set_tlsext_servername_callback(self._servername)

    def _servername(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        hostname = name.decode("ascii", "replace").lower() if name else ""
        ctx = self.terminator.contexts.get(hostname)
        if ctx is not None:
            connection.set_context(ctx)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.default, None)


@attrs.define(eq=False)
class TLSTerminator:
    """
    The SNI terminator (see the module docstring).

    @ivar listen: a server endpoint description (this node's loopback).
    @ivar connect_target: ``(host, port) -> endpoint`` of the targets.
    """

    log = Logger()

    reactor: Any
    connect_target: Callable[[str, int], IStreamClientEndpoint]
    listen: str = "tcp:0:interface=127.0.0.1"
    contexts: dict[str, SSL.Context] = attrs.field(init=False, factory=dict)
    routes: dict[str, tuple[str, int]] = attrs.field(init=False, factory=dict)
    #: Connections routed per hostname since start.
    connections: dict[str, int] = attrs.field(init=False, factory=dict)
    _serials: dict[str, str] = attrs.field(init=False, factory=dict)
    _port: IListeningPort | None = attrs.field(init=False, default=None)
    _live: set[_TLSSplice] = attrs.field(init=False, factory=set)

    @property
    def port(self) -> int | None:
        """The bound TCP port while listening."""
        if self._port is None:
            return None
        return int(self._port.getHost().port)  # type: ignore[attr-defined]

    def update(
        self,
        certificates: Mapping[str, Certificate],
        routes: Mapping[str, tuple[str, int]],
    ) -> None:
        """Serve these certificates and routes from now on (contexts are cached by serial)."""
        contexts: dict[str, SSL.Context] = {}
        for hostname, certificate in certificates.items():
            current = self.contexts.get(hostname)
            if current is not None and self._serials.get(hostname) == certificate.serial:
                contexts[hostname] = current
                continue
            try:
                contexts[hostname] = context_for(certificate)
            except (SSL.Error, ValueError, TypeError, IndexError) as e:
                self.log.error(
                    "TLS: the certificate of {hostname} is unusable: {error}",
                    hostname=hostname,
                    error=str(e),
                )
                continue
            self._serials[hostname] = certificate.serial
        self.contexts = contexts
        self._serials = {h: s for h, s in self._serials.items() if h in contexts}
        self.routes = dict(routes)

    def factory(self) -> TLSMemoryBIOFactory:
        """The server factory: TLS with SNI, each connection spliced by its name."""
        return TLSMemoryBIOFactory(
            _SNICreator(self),
            False,
            Factory.forProtocol(lambda: _TLSSplice(self)),
            clock=self.reactor,  # small writes are coalesced on this clock
        )

    async def start(self) -> int:
        """Listen (idempotent); returns the port."""
        if self._port is None:
            endpoint = serverFromString(self.reactor, self.listen)
            self._port = await endpoint.listen(self.factory())
            self.log.info("TLS terminator listening on port {port}", port=self.port)
        port = self.port
        assert port is not None
        return port

    async def stop(self) -> None:
        """Stop listening and close every connection (idempotent)."""
        port, self._port = self._port, None
        for conn in list(self._live):
            if conn.transport is not None:
                conn.transport.abortConnection()  # type: ignore[attr-defined]
        if port is not None:
            await maybeDeferred(port.stopListening)
