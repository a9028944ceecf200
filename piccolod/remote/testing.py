"""
Test doubles of the remote subsystem, shipped so that plugin authors and
other subsystems' tests can use them too.

- :class:`MemoryRemoteStore` answers the ``store.remote.*`` commands from
  memory with the remote repository's semantics (``NotFound`` when empty,
  ``Locked`` while its ``locked`` flag is set, a whole-record replace per
  save); it can be told to fail the next saves.
- :class:`InlinePool` runs "thread pool" work inline and
  :class:`ThreadlessReactor` is a ``MemoryReactorClock`` whose
  ``callFromThread`` runs at once, so ``deferToThreadPool`` works in a
  ``SynchronousTestCase``.
- :class:`FakeAcmeBackend` issues real certificates from a throwaway CA,
  checks (like an ACME server fetching the token) that each HTTP-01 key
  authorization is published, and can be scripted to fail attempts.
- :class:`FakeSSHServer` stands in for the Conch transport of the ``ssh``
  tunnel adapter at its seam: it presents a host key, starts a session,
  answers forward requests and keepalives, and drops connections on
  command.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.commands import (
    Command,
    CommandContext,
    StoreClearRemote,
    StoreDone,
    StoredRemote,
    StoreLoadRemote,
    StoreSaveRemote,
)
from piccolod.errors import Locked, NotFound, PiccolodError
from piccolod.interfaces import ICommandDispatcher
from piccolod.remote.acme import AcmeFailure, Challenge, IssueRequest

__all__ = [
    "FakeAcmeBackend",
    "FakeSSHServer",
    "InlinePool",
    "MemoryRemoteStore",
    "ThreadlessReactor",
]


@attrs.define(eq=False)
class MemoryRemoteStore:
    """The ``store.remote.*`` commands on memory (see the module docstring)."""

    dispatcher: ICommandDispatcher
    locked: bool = False
    record: dict[str, Any] | None = None
    updated_at: float = 0.0
    saves: int = 0
    #: What the next saves do, in order: fail with the error (nothing is
    #: stored), or succeed for ``None``.
    fail_saves: list[PiccolodError | None] = attrs.field(factory=list)
    _registration: Any = attrs.field(init=False, default=None)

    def register(self) -> MemoryRemoteStore:
        from piccolod.kernel.dispatcher import register_all

        self._registration = register_all(
            self.dispatcher,
            [
                (StoreLoadRemote, self._load),
                (StoreSaveRemote, self._save),
                (StoreClearRemote, self._clear),
            ],
        )
        return self

    def unregister(self) -> None:
        if self._registration is not None:
            self._registration.cancel()

    def _check(self) -> None:
        if self.locked:
            raise Locked("the control store is locked")

    def _load(self, command: StoreLoadRemote, context: CommandContext) -> StoredRemote:
        self._check()
        if self.record is None:
            raise NotFound("no remote configuration is stored")
        return StoredRemote(record=_copy(self.record), updated_at=self.updated_at)

    def _save(self, command: StoreSaveRemote, context: CommandContext) -> StoredRemote:
        self._check()
        if self.fail_saves:
            error = self.fail_saves.pop(0)
            if error is not None:
                raise error
        self.record = _copy(command.record)
        self.saves += 1
        return StoredRemote(record=_copy(self.record), updated_at=self.updated_at)

    def _clear(self, command: StoreClearRemote, context: CommandContext) -> StoreDone:
        self._check()
        self.record = None
        return StoreDone()


def _copy(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


class InlinePool:
    """A thread pool that runs each call at once, on the calling thread."""

    def __init__(self) -> None:
        self.started = False
        self.calls = 0

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], func: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        self.calls += 1
        try:
            result = func(*a, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ThreadlessReactor(MemoryReactorClock):
    """``MemoryReactorClock`` with an inline ``callFromThread``."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


@attrs.define(eq=False)
class FakeAcmeBackend:
    """
    ``AcmeBackend`` issuing from a throwaway CA (leaf + intermediate).

    @ivar validate: ``token -> key authorization or None``, called by
        :meth:`poll` like a server fetching the HTTP-01 resource; a missing
        or wrong answer fails the attempt.
    @ivar failures: errors for the next :meth:`poll` calls, in order.
    @ivar pending_polls: how many polls answer "still pending" first.
    @ivar now: seconds since the epoch for the issued validity.
    @ivar lifetime: seconds of validity of issued certificates.
    """

    now: Callable[[], float]
    validate: Callable[[str], str | None] | None = None
    failures: list[BaseException] = attrs.field(factory=list)
    lifetime: float = 90 * 86400.0
    pending_polls: int = 0
    answered: int = 0
    requests: list[IssueRequest] = attrs.field(factory=list)
    issued: list[str] = attrs.field(factory=list)
    validated: list[str] = attrs.field(factory=list)
    _tokens: Any = attrs.field(init=False, factory=lambda: itertools.count(1))
    _root_key: Any = attrs.field(init=False)
    _inter_key: Any = attrs.field(init=False)
    root: x509.Certificate = attrs.field(init=False)
    intermediate: x509.Certificate = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._root_key = ec.generate_private_key(ec.SECP256R1())
        self._inter_key = ec.generate_private_key(ec.SECP256R1())
        start = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
        end = datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)
        ca = x509.BasicConstraints(ca=True, path_length=None)
        self.root = (
            x509.CertificateBuilder()
            .subject_name(_name("fake root"))
            .issuer_name(_name("fake root"))
            .public_key(self._root_key.public_key())
            .serial_number(1)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(ca, critical=True)
            .sign(self._root_key, hashes.SHA256())
        )
        self.intermediate = (
            x509.CertificateBuilder()
            .subject_name(_name("fake intermediate"))
            .issuer_name(_name("fake root"))
            .public_key(self._inter_key.public_key())
            .serial_number(2)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(ca, critical=True)
            .sign(self._root_key, hashes.SHA256())
        )

    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def begin(self, request: IssueRequest) -> tuple[Any, list[Challenge], str]:
        self.requests.append(request)
        challenges = [
            Challenge(f"token-{next(self._tokens)}", f"keyauth-{h}") for h in request.hostnames
        ]
        return (request, challenges), challenges, "https://acme.test/acct/1"

    def answer(self, handle: Any) -> None:
        self.answered += 1

    def poll(self, handle: Any) -> bool:
        _request, challenges = handle
        if self.failures:
            raise self.failures.pop(0)
        if self.pending_polls:
            self.pending_polls -= 1
            return False
        for challenge in challenges:
            answer = self.validate(challenge.token) if self.validate is not None else None
            if self.validate is not None and answer != challenge.key_authorization:
                raise AcmeFailure(
                    f"the HTTP-01 challenge failed: /.well-known/acme-challenge/"
                    f"{challenge.token} answered {answer!r}"
                )
            self.validated.append(challenge.token)
        return True

    def finalize(self, handle: Any, deadline: float) -> str:
        request, _challenges = handle
        key: Any = serialization.load_pem_private_key(
            request.domain_key_pem.encode("ascii"), password=None
        )
        now = self.now()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(request.hostnames[0]))
            .issuer_name(_name("fake intermediate"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(now, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(now + self.lifetime, datetime.UTC))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(h) for h in request.hostnames]),
                critical=False,
            )
            .sign(self._inter_key, hashes.SHA256())
        )
        chain = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (leaf, self.intermediate)
        ).decode("ascii")
        self.issued.append(format(leaf.serial_number, "x"))
        return chain


class _FakeTCP(StringTransport):
    """A TCP transport whose close reaches the protocol (as a real one does)."""

    def __init__(self, connection: FakeSSHConnection) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.connection = connection

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.connection.lose("closed by the client")

    def abortConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.connection.lose("aborted by the client")


@implementer(IStreamClientEndpoint)
class _ScriptedEndpoint:
    def __init__(self, server: FakeSSHServer, host: str, port: int) -> None:
        self.server = server
        self.host = host
        self.port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        self.server.attempts.append((self.host, self.port))
        if not self.server.listening:
            from twisted.internet.error import ConnectionRefusedError

            return fail(ConnectionRefusedError(self.host, self.port))  # type: ignore[no-untyped-call]
        proxy = protocolFactory.buildProtocol(None)  # type: ignore[arg-type]
        assert proxy is not None
        connection = self.server.pending.pop(0)
        connection.proxy = proxy
        connection.transport = _FakeTCP(connection)
        proxy.makeConnection(connection.transport)
        self.server.clock.callLater(0, connection.handshake)
        return succeed(proxy)


class FakeSession:
    """One connection's session as :class:`FakeSSHServer` plays it."""

    def __init__(self, server: FakeSSHServer, connection: FakeSSHConnection) -> None:
        self.server = server
        self.connection = connection
        self.pings: list[Deferred[None]] = []

    def request_forward(self, host: str, port: int) -> Deferred[int]:
        self.server.requests.append(("forward", host, port))
        if (host, port) in self.server.refuse or (host, "*") in self.server.refuse:
            return fail(Exception("global request failed"))
        if port == 0:
            port = next(self.server.ports)
        self.server.bound[(host, port)] = self
        return succeed(port)

    def cancel_forward(self, host: str, port: int) -> Deferred[None]:
        self.server.requests.append(("cancel", host, port))
        self.server.bound.pop((host, port), None)
        return succeed(None)

    def ping(self) -> Deferred[None]:
        self.server.requests.append(("ping", "", 0))
        if self.server.answer_pings:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.pings.append(d)
        return d

    def close(self, abort: bool = False) -> None:
        self.server.requests.append(("abort" if abort else "close", "", 0))
        self.connection.lose("closed by the client")


class FakeSSHConnection(Protocol):
    """
    One connection of the fake server.  Built by the client's protocol
    factory; once connected (on the clock's next turn, as after a real TCP
    connect) it drives the client through the real seam:
    ``verify_host_key``, then ``session_started`` (unless the server hangs
    or rejects the key).
    """

    def __init__(self, server: FakeSSHServer, client: Any) -> None:
        self.server = server
        self.client = client
        self.session: FakeSession | None = None
        self.lost = False
        self.proxy: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.client.transport_made(transport.abortConnection)

    def handshake(self) -> None:
        if self.lost or self.server.hang:
            return
        accepted: list[bool] = []
        self.client.verify_host_key(self.server.host_key).addCallbacks(
            accepted.append, lambda f: self.lose("bad host key")
        )
        if not accepted or self.lost:
            return
        if self.server.reject_auth:
            self.client.disconnect_reason("disconnected: no more authentication methods")
            self.lose("authentication failed")
            return
        self.session = FakeSession(self.server, self)
        self.client.session_started(self.session)

    def lose(self, why: str) -> None:
        """Drop the connection (the client and ClientService both hear of it)."""
        if self.lost:
            return
        self.lost = True
        for binding, session in list(self.server.bound.items()):
            if session is self.session:
                del self.server.bound[binding]
        from twisted.internet.error import ConnectionDone

        self.proxy.connectionLost(Failure(ConnectionDone(why)))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.lost = True
        self.client.transport_lost(reason)


@attrs.define(eq=False)
class FakeSSHServer:
    """
    The server side of the ``ssh`` adapter's seam: :meth:`endpoint` is its
    ``(host, port) -> endpoint`` and :meth:`protocol` its protocol factory.

    @ivar listening: refuse TCP connections when False.
    @ivar host_key: the key blob presented (its fingerprint is what pins).
    @ivar refuse: bindings (``(host, port)`` or ``(host, "*")``) whose
        forward requests are refused.
    @ivar answer_pings: False simulates a hung server.
    @ivar hang: accept TCP but never start the SSH handshake.
    """

    clock: Any
    host_key: bytes = b"fake host key 1"
    listening: bool = True
    reject_auth: bool = False
    hang: bool = False
    answer_pings: bool = True
    refuse: set[tuple[str, Any]] = attrs.field(factory=set)
    attempts: list[tuple[str, int]] = attrs.field(factory=list)
    requests: list[tuple[str, str, int]] = attrs.field(factory=list)
    bound: dict[tuple[str, int], FakeSession] = attrs.field(factory=dict)
    connections: list[FakeSSHConnection] = attrs.field(factory=list)
    pending: list[FakeSSHConnection] = attrs.field(factory=list)
    ports: Any = attrs.field(factory=lambda: itertools.count(40000))

    def endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        return _ScriptedEndpoint(self, host, port)

    def protocol(self, client: Any) -> IProtocol:
        connection = FakeSSHConnection(self, client)
        self.connections.append(connection)
        self.pending.append(connection)
        return connection

    def live(self) -> list[FakeSSHConnection]:
        return [c for c in self.connections if not c.lost and c.proxy is not None]

    def drop_all(self, why: str = "server went away") -> None:
        for connection in self.live():
            connection.lose(why)


@attrs.define(eq=False)
class RemoteHarness:
    """
    A remote manager on real kernel parts (bus, registry, dispatcher with
    its lock and leader gates, health, job runner) and the in-memory
    store commands, for tests and benchmarks on any reactor.
    """

    reactor: Any
    bus: Any
    registry: Any
    dispatcher: Any
    health: Any
    jobs: Any
    store: MemoryRemoteStore
    tunnel: Any
    manager: Any
    node_id: str = "node-a"
    api_address: str = "http://127.0.0.1:8080"

    @classmethod
    def build(
        cls,
        reactor: Any,
        tunnel: Callable[[Any], Any] | None = None,
        api_address: str = "http://127.0.0.1:8080",
        pool: Any = None,
        acme_backend: Any = None,
        config: Any = None,
        rand: Callable[[], float] | None = None,
    ) -> RemoteHarness:
        """``tunnel(health) -> ITunnel`` (default: the stub)."""
        from piccolod.kernel.bus import MemoryEventBus
        from piccolod.kernel.dispatcher import CommandDispatcher
        from piccolod.kernel.health import HealthTracker
        from piccolod.kernel.jobs import JobRunner
        from piccolod.kernel.leadership import LeadershipRegistry
        from piccolod.remote.manager import ManagerConfig, RemoteManager
        from piccolod.remote.stub import StubTunnel

        bus = MemoryEventBus(reactor)
        registry = LeadershipRegistry(bus, "node-a")
        dispatcher = CommandDispatcher(reactor, bus, registry=registry, log_successes=False)
        health = HealthTracker(reactor, bus)
        jobs = JobRunner(reactor, bus) if rand is None else JobRunner(reactor, bus, rand=rand)
        store = MemoryRemoteStore(dispatcher).register()
        made = tunnel(health) if tunnel is not None else StubTunnel(reactor, health)
        extra: dict[str, Any] = {}
        if acme_backend is not None:
            extra["acme_backend"] = acme_backend
        manager = RemoteManager(
            reactor,
            bus,
            dispatcher,
            registry,
            made,
            health=health,
            jobs=jobs,
            api_address=api_address,
            config=config if config is not None else ManagerConfig(),
            pool=pool,
            **extra,
        )
        return cls(
            reactor,
            bus,
            registry,
            dispatcher,
            health,
            jobs,
            store,
            made,
            manager,
            api_address=api_address,
        )

    def start(self) -> None:
        self.jobs.startService()
        self.tunnel.startService()
        self.manager.startService()

    async def stop(self) -> None:
        from twisted.internet.defer import maybeDeferred

        await maybeDeferred(self.manager.stopService)
        await maybeDeferred(self.tunnel.stopService)
        await maybeDeferred(self.jobs.stopService)
        self.store.unregister()

    def unlock(self) -> None:
        from piccolod.events import LockState, LockStateChanged

        self.store.locked = False
        self.bus.publish(LockStateChanged(LockState.UNLOCKED, LockState.PREUNLOCK))

    def lock(self) -> None:
        from piccolod.events import LockState, LockStateChanged

        self.store.locked = True
        self.bus.publish(LockStateChanged(LockState.LOCKED, LockState.UNLOCKED))

    def lead(self, resource: str, term: int = 1) -> None:
        from piccolod.events import Role

        self.registry.update(resource, Role.LEADER, term, self.node_id, self.api_address)

    def follow(self, resource: str, leader_address: str | None, term: int = 2) -> None:
        from piccolod.events import Role

        self.registry.update(resource, Role.FOLLOWER, term, "node-b", leader_address)

    def publish_route(self, app: str, listener: str, port: int, withdrawn: bool = False) -> None:
        from piccolod.events import RoutePublished

        self.bus.publish(RoutePublished(app, listener, port, withdrawn=withdrawn))

    def dispatch(self, command: Command) -> Deferred[Any]:
        from piccolod.commands import CommandContext

        d: Deferred[Any] = self.dispatcher.dispatch(
            command, CommandContext(subject="admin", source="test")
        )
        return d
