# mypy: disable-error-code="no-untyped-call"
"""
The twisted.conch side of the ``ssh`` tunnel: an SSH client transport that
pins the server's host key, public-key authentication with the device key,
``tcpip-forward`` global requests, and channels that splice each forwarded
connection to its local target.

Everything here only *talks*: every decision (is this host key acceptable,
which target does a forwarded connection go to, when to retry) is made by
:class:`piccolod.remote.ssh.TunnelClient`, which this module calls through
the small :class:`ClientHooks` protocol.  Unit tests replace this module's
transport with a fake at that seam; the integration tests run it against
OpenSSH.

Imported lazily (by :func:`build_transport`): ``twisted.conch.ssh.userauth``
imports the global reactor when it is imported, which must not happen
before ``twistd`` has installed the reactor it was asked for.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from twisted.conch.error import ConchError
from twisted.conch.ssh import channel, common, connection, keys, transport, userauth
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from piccolod.interfaces import TunnelForward

__all__ = ["ClientHooks", "ConchSession", "build_transport", "pack_address", "unpack_forwarded"]


class ClientHooks(Protocol):
    """What the Conch side calls on its ``TunnelClient``."""

    @property
    def user(self) -> str: ...

    @property
    def private_key(self) -> bytes: ...

    def transport_made(self, abort: Callable[[], None]) -> None: ...

    def verify_host_key(self, key_blob: bytes) -> Deferred[bool]: ...

    def session_started(self, session: Any) -> None: ...

    def disconnect_reason(self, reason: str) -> None: ...

    def transport_lost(self, reason: Failure) -> None: ...

    def forwarded_target(self, host: str, port: int) -> TunnelForward | None: ...

    def target_endpoint(self, host: str, port: int) -> IStreamClientEndpoint: ...


def pack_address(host: str, port: int) -> bytes:
    """The ``tcpip-forward`` / ``cancel-tcpip-forward`` request data."""
    return common.NS(host.encode("utf-8")) + struct.pack(">L", port)


def unpack_forwarded(data: bytes) -> tuple[tuple[str, int], tuple[str, int]]:
    """The ``forwarded-tcpip`` open data: ((connected host, port), (origin host, port))."""
    connected, rest = common.getNS(data)
    connected_port = int(struct.unpack(">L", rest[:4])[0])
    origin, rest = common.getNS(rest[4:])
    origin_port = int(struct.unpack(">L", rest[:4])[0])
    return (
        (connected.decode("utf-8", "replace"), connected_port),
        (origin.decode("utf-8", "replace"), origin_port),
    )


class ConchSession:
    """The ``ISession`` a ``TunnelClient`` drives: global requests on one connection."""

    def __init__(self, conn: TunnelConnection) -> None:
        self._conn = conn

    def request_forward(self, host: str, port: int) -> Deferred[int]:
        d: Deferred[bytes] = self._conn.sendGlobalRequest(
            b"tcpip-forward", pack_address(host, port), wantReply=1
        )

        def bound(data: bytes) -> int:
            if port == 0:
                if len(data) < 4:
                    raise ConchError("the server did not say which port it bound")
                return int(struct.unpack(">L", data[:4])[0])
            return port

        return d.addCallback(bound)

    def cancel_forward(self, host: str, port: int) -> Deferred[None]:
        d: Deferred[bytes] = self._conn.sendGlobalRequest(
            b"cancel-tcpip-forward", pack_address(host, port), wantReply=1
        )
        return d.addCallback(lambda _: None)

    def ping(self) -> Deferred[None]:
        """``keepalive@openssh.com``: OpenSSH answers with a failure, which is an answer."""
        d: Deferred[bytes] = self._conn.sendGlobalRequest(
            b"keepalive@openssh.com", b"", wantReply=1
        )
        return d.addCallbacks(lambda _: None, lambda f: f.trap(ConchError) and None)

    def close(self, abort: bool = False) -> None:
        ssh = self._conn.transport
        if ssh is None:
            return
        if abort:
            tcp: Any = ssh.transport
            tcp.abortConnection()
        else:
            ssh.loseConnection()  # sends SSH_MSG_DISCONNECT, then closes


class _Splice(TwistedProtocol):
    """The local end of one forwarded connection."""

    def __init__(self, chan: SpliceChannel) -> None:
        self.chan = chan

    def dataReceived(self, data: bytes) -> None:
        self.chan.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.chan.target_closed()


class SpliceChannel(channel.SSHChannel):
    """
    A ``forwarded-tcpip`` channel spliced to a local target: data from the
    server goes to the target, and back; the target's reading is paused
    while the channel's remote window is full.
    """

    name = b"forwarded-tcpip"
    log = Logger()

    def __init__(self, target: IStreamClientEndpoint, label: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.target = target
        self.label = label
        self.peer: _Splice | None = None
        self.pending: list[bytes] = []
        self.finished = False

    def channelOpen(self, specificData: bytes) -> None:
        d = connectProtocol(self.target, _Splice(self))
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, peer: _Splice) -> None:
        if self.finished:
            assert peer.transport is not None
            peer.transport.loseConnection()
            return
        self.peer = peer
        assert peer.transport is not None
        for data in self.pending:
            peer.transport.write(data)
        self.pending = []

    def _failed(self, failure: Failure) -> None:
        self.log.info(
            "forwarded connection to {target} failed: {error}",
            target=self.label,
            error=failure.getErrorMessage(),
        )
        self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def eofReceived(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()

    def stopWriting(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pauseProducing()  # type: ignore[attr-defined]

    def startWriting(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resumeProducing()  # type: ignore[attr-defined]

    def target_closed(self) -> None:
        if not self.finished:
            self.loseConnection()

    def closed(self) -> None:
        self.finished = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()
        self.peer = None


class TunnelConnection(connection.SSHConnection):
    """The ``ssh-connection`` service: hands a session to the client, opens splices."""

    def __init__(self, client: ClientHooks) -> None:
        super().__init__()
        self.client = client

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.client.session_started(ConchSession(self))

    def channel_forwarded_tcpip(
        self, windowSize: int, maxPacket: int, data: bytes
    ) -> SpliceChannel:
        (host, port), _origin = unpack_forwarded(data)
        forward = self.client.forwarded_target(host, port)
        if forward is None:
            raise ConchError(connection.OPEN_CONNECT_FAILED, f"nothing forwarded on {host}:{port}")
        return SpliceChannel(
            self.client.target_endpoint(forward.target_host, forward.target_port),
            f"{forward.name} ({forward.target_host}:{forward.target_port})",
            remoteWindow=windowSize,
            remoteMaxPacket=maxPacket,
            conn=self,
        )


class DeviceKeyAuth(userauth.SSHUserAuthClient):
    """Public-key authentication with the device key, offered once."""

    preferredOrder = [b"publickey"]

    def __init__(self, user: bytes, instance: TunnelConnection, key: keys.Key) -> None:
        super().__init__(user, instance)
        self.key = key

    def getPublicKey(self) -> keys.Key | None:
        if self.lastPublicKey is not None:
            return None  # offered already: no other key to try
        public: keys.Key = self.key.public()
        return public

    def getPrivateKey(self) -> Deferred[keys.Key]:
        return succeed(self.key)


class PinnedClientTransport(transport.SSHClientTransport):
    """An SSH client transport whose host key check is the tunnel client's."""

    def __init__(self, client: ClientHooks) -> None:
        self.client = client
        self.key = keys.Key.fromString(client.private_key)

    def connectionMade(self) -> None:
        super().connectionMade()
        tcp = self.transport
        assert tcp is not None
        self.client.transport_made(tcp.abortConnection)  # type: ignore[attr-defined]

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        # ``fingerprint`` is the legacy MD5 form: the client uses SHA256.
        return self.client.verify_host_key(hostKey)

    def connectionSecure(self) -> None:
        self.requestService(
            DeviceKeyAuth(self.client.user.encode("utf-8"), TunnelConnection(self.client), self.key)
        )

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        text = description.decode("utf-8", "replace")
        self.client.disconnect_reason(f"the server disconnected: {text} (code {reasonCode})")

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        text = desc.decode("utf-8", "replace") if isinstance(desc, bytes) else str(desc)
        if reason != transport.DISCONNECT_CONNECTION_LOST:
            self.client.disconnect_reason(f"disconnected: {text} (code {reason})")
        super().sendDisconnect(reason, desc)

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        self.client.transport_lost(reason if reason is not None else Failure(ConnectionError()))


def build_transport(client: ClientHooks) -> PinnedClientTransport:
    """The protocol a ``TunnelClient`` connects with."""
    return PinnedClientTransport(client)
