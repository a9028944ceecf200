"""
The proxies in front of app listeners, one Twisted listening port each.

- :class:`TCPProxyFactory` splices bytes both ways (``raw`` listeners and
  ``tls`` flows, which are passed through untouched).
- :class:`HTTPProxyFactory` is an HTTP/1.x reverse proxy that parses only
  the *request* side: each request head is checked and rewritten, then the
  body is forwarded by its framing (``Content-Length`` or ``chunked``), and
  the backend's responses are spliced back unparsed.  One backend
  connection per client connection keeps keep-alive and pipelining
  correct without parsing responses.  A websocket (any ``Upgrade``)
  request switches the connection to a plain splice once its head is sent.

``X-Forwarded-For``, ``X-Forwarded-Proto``, ``X-Forwarded-Host``,
``X-Forwarded-Port``, ``X-Real-IP`` and ``Forwarded`` are **set by the
proxy from what it sees** and every client-supplied copy is removed first
(upstream weakness 10: a client's ``X-Forwarded-Proto`` was trusted as
proof of HTTPS).  Requests that could smuggle a second request past the
proxy (both ``Content-Length`` and ``Transfer-Encoding``, conflicting
lengths, obsolete line folding, an unknown transfer coding) are refused
with 400.

Both directions apply backpressure: each transport is registered as the
producer of the other, so a slow reader pauses the fast writer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "MAX_HEAD",
    "HTTPProxyFactory",
    "ProxyStats",
    "TCPProxyFactory",
]

#: The largest request head accepted (request line + headers).
MAX_HEAD = 64 * 1024
#: Headers the proxy owns: removed from requests, then set by the proxy.
FORWARDING_HEADERS = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-server",
        b"x-forwarded-prefix",
        b"x-real-ip",
        b"forwarded",
    }
)
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")
_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,16})(;.*)?$")
CONNECT_TIMEOUT = 5.0

log = Logger()


@attrs.define
class ProxyStats:
    """Figures of one proxy (one listening port)."""

    connections: int = 0
    active: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    requests: int = 0
    rejected: int = 0
    backend_failures: int = 0


def _no_delay(transport: Any) -> None:
    """Disable Nagle: a proxy must not hold small writes back (40 ms stalls otherwise)."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


def _endpoint(reactor: Any, host: str, port: int) -> Any:
    if ":" in host:
        return TCP6ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    return TCP4ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)


class _Backend(Protocol):
    """The proxy's connection to the backend: writes everything back to the front."""

    front: _Front | None = None

    def connectionMade(self) -> None:
        assert self.front is not None
        _no_delay(self.transport)
        self.front.backend_connected(self)

    def dataReceived(self, data: bytes) -> None:
        front = self.front
        if front is not None and front.transport is not None:
            front.stats.bytes_out += len(data)
            front.transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        front, self.front = self.front, None
        if front is not None:
            front.backend_lost()


class _BackendFactory(Factory):
    protocol = _Backend

    def __init__(self, front: _Front) -> None:
        self.front = front

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        proto = _Backend()
        proto.factory = self
        proto.front = self.front
        return proto


class _Front(Protocol):
    """The client's connection; subclasses decide what to send to the backend."""

    def __init__(self, factory: _ProxyFactory) -> None:
        self.proxy = factory
        self.stats = factory.stats
        self.backend: _Backend | None = None
        self.pending: list[bytes] = []
        self.connecting: Deferred[Any] | None = None
        self.closed = False

    def connectionMade(self) -> None:
        self.stats.connections += 1
        self.stats.active += 1
        _no_delay(self.transport)

    def connect_backend(self) -> None:
        if self.backend is not None or self.connecting is not None:
            return
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        host, port = self.proxy.target()
        endpoint = _endpoint(self.proxy.reactor, host, port)
        self.connecting = endpoint.connect(_BackendFactory(self))
        self.connecting.addErrback(self.backend_failed)

    def backend_connected(self, backend: _Backend) -> None:
        self.connecting = None
        if self.closed:
            assert backend.transport is not None
            backend.transport.loseConnection()
            return
        self.backend = backend
        assert self.transport is not None and backend.transport is not None
        self.transport.registerProducer(backend.transport, True)  # type: ignore[attr-defined]
        backend.transport.registerProducer(self.transport, True)  # type: ignore[attr-defined]
        pending, self.pending = self.pending, []
        for chunk in pending:
            backend.transport.write(chunk)
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def backend_failed(self, failure: Failure) -> None:
        self.connecting = None
        self.stats.backend_failures += 1
        log.debug(
            "proxy {port}: backend {target} unreachable: {error}",
            port=self.proxy.public_port,
            target=self.proxy.target(),
            error=failure.getErrorMessage(),
        )
        self.unavailable()

    def unavailable(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def backend_lost(self) -> None:
        self.backend = None
        if self.transport is not None:
            self.transport.loseConnection()

    def send(self, data: bytes) -> None:
        if not data:
            return
        self.stats.bytes_in += len(data)
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.write(data)
        else:
            self.pending.append(data)
            self.connect_backend()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.stats.active -= 1
        self.proxy.forget(self)
        if self.connecting is not None:
            self.connecting.cancel()
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.front = None
            if backend.transport is not None:
                backend.transport.loseConnection()


class _TCPFront(_Front):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.connect_backend()

    def dataReceived(self, data: bytes) -> None:
        self.send(data)


class _HTTPFront(_Front):
    """Request-side HTTP/1.x parsing (see the module docstring)."""

    HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILERS, RAW, DEAD = range(8)

    def __init__(self, factory: _ProxyFactory) -> None:
        super().__init__(factory)
        self.state = self.HEAD
        self.buffer = b""
        self.remaining = 0

    def dataReceived(self, data: bytes) -> None:
        if self.state == self.RAW:
            self.send(data)
            return
        if self.state == self.DEAD:
            return
        self.buffer += data
        self._advance()

    def _advance(self) -> None:
        while self.buffer and self.state not in (self.DEAD,):
            if self.state == self.RAW:
                data, self.buffer = self.buffer, b""
                self.send(data)
                return
            if self.state == self.HEAD:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEAD:
                        self.reject(431, "Request Header Fields Too Large")
                    return
                if end > MAX_HEAD:
                    self.reject(431, "Request Header Fields Too Large")
                    return
                head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
                self.request(head)
            elif self.state == self.BODY:
                take = self.buffer[: self.remaining]
                self.buffer = self.buffer[len(take) :]
                self.remaining -= len(take)
                self.send(take)
                if self.remaining == 0:
                    self.state = self.HEAD
            elif self.state in (self.CHUNK_SIZE, self.TRAILERS):
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    if len(self.buffer) > 4096:
                        self.reject(400, "Bad Request")
                    return
                line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
                self.send(line + b"\r\n")
                if self.state == self.TRAILERS:
                    if not line:
                        self.state = self.HEAD
                    continue
                m = _CHUNK_SIZE.match(line.strip())
                if m is None:
                    self.reject(400, "Bad Request")
                    return
                size = int(m.group(1), 16)
                if size == 0:
                    self.state = self.TRAILERS
                else:
                    self.remaining = size
                    self.state = self.CHUNK_DATA
            elif self.state == self.CHUNK_DATA:
                take = self.buffer[: self.remaining]
                self.buffer = self.buffer[len(take) :]
                self.remaining -= len(take)
                self.send(take)
                if self.remaining == 0:
                    self.state = self.CHUNK_CRLF
            elif self.state == self.CHUNK_CRLF:
                if len(self.buffer) < 2:
                    return
                if self.buffer[:2] != b"\r\n":
                    self.reject(400, "Bad Request")
                    return
                self.buffer = self.buffer[2:]
                self.send(b"\r\n")
                self.state = self.CHUNK_SIZE

    def request(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if (
            len(parts) != 3
            or not _TOKEN.match(parts[0])
            or not parts[1]
            or not _VERSION.match(parts[2])
        ):
            self.reject(400, "Bad Request")
            return
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            if not line or line[:1] in (b" ", b"\t") or b":" not in line:
                self.reject(400, "Bad Request")
                return
            name, _, value = line.partition(b":")
            if not _TOKEN.match(name):
                self.reject(400, "Bad Request")
                return
            headers.append((name, value.strip()))
        lowered = [(n.lower(), v) for n, v in headers]
        lengths = {v for n, v in lowered if n == b"content-length"}
        codings = [v for n, v in lowered if n == b"transfer-encoding"]
        chunked = False
        length = 0
        if codings:
            if lengths:
                self.reject(400, "Bad Request")
                return
            coding = b",".join(codings).lower().replace(b" ", b"").split(b",")
            if coding != [b"chunked"]:
                self.reject(501, "Not Implemented")
                return
            chunked = True
        elif lengths:
            if len(lengths) != 1:
                self.reject(400, "Bad Request")
                return
            text = lengths.pop()
            if not text.isdigit() or len(text) > 18:
                self.reject(400, "Bad Request")
                return
            length = int(text)
        connection = b",".join(v for n, v in lowered if n == b"connection").lower()
        upgrade = any(n == b"upgrade" for n, _ in lowered) and b"upgrade" in connection
        host = next((v for n, v in lowered if n == b"host"), b"")
        out = [lines[0]]
        out.extend(n + b": " + v for n, v in headers if n.lower() not in FORWARDING_HEADERS)
        out.extend(self.forwarding(host))
        self.stats.requests += 1
        self.send(b"\r\n".join(out) + b"\r\n\r\n")
        if upgrade:
            self.state = self.RAW
        elif chunked:
            self.state = self.CHUNK_SIZE
        elif length:
            self.remaining = length
            self.state = self.BODY
        else:
            self.state = self.HEAD

    def forwarding(self, host: bytes) -> list[bytes]:
        assert self.transport is not None
        peer = self.transport.getPeer()
        client = str(getattr(peer, "host", "")).encode()
        port = str(self.proxy.public_port).encode()
        headers = [
            b"X-Forwarded-For: " + client,
            b"X-Real-IP: " + client,
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Port: " + port,
        ]
        quoted_for = b'"[' + client + b']"' if b":" in client else client
        forwarded = b"for=" + quoted_for + b";proto=http"
        if host and all(32 < c < 127 and c not in b'";,' for c in host):
            headers.append(b"X-Forwarded-Host: " + host)
            forwarded += b';host="' + host + b'"'
        headers.append(b"Forwarded: " + forwarded)
        return headers

    def reject(self, status: int, reason: str) -> None:
        self.stats.rejected += 1
        self.state = self.DEAD
        self.buffer = b""
        if self.backend is None and self.transport is not None:
            body = f"{status} {reason}\n".encode()
            self.transport.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
        if self.transport is not None:
            self.transport.loseConnection()

    def unavailable(self) -> None:
        if self.transport is not None and not self.closed:
            body = b"502 Bad Gateway: the app is not reachable\n"
            self.transport.write(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            self.transport.loseConnection()


class _ProxyFactory(Factory):
    """Shared by both proxies: where to connect and the figures."""

    front: type[_Front] = _TCPFront

    def __init__(
        self,
        reactor: Any,
        target: Callable[[], tuple[str, int]],
        public_port: int = 0,
    ) -> None:
        self.reactor = reactor
        self.target = target
        self.public_port = public_port
        self.stats = ProxyStats()
        self.fronts: set[_Front] = set()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        proto = self.front(self)
        proto.factory = self
        self.fronts.add(proto)
        return proto

    def forget(self, front: _Front) -> None:
        self.fronts.discard(front)

    def close_all(self) -> None:
        """Drop every open connection (the listening port is closed separately)."""
        for front in list(self.fronts):
            if front.transport is not None:
                front.transport.abortConnection()  # type: ignore[attr-defined]


class TCPProxyFactory(_ProxyFactory):
    """Splices each connection to ``target()`` (host, port)."""

    front = _TCPFront


class HTTPProxyFactory(_ProxyFactory):
    """HTTP/1.x reverse proxy to ``target()`` (host, port)."""

    front = _HTTPFront
