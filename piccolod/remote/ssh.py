"""
The ``ssh`` tunnel adapter: reverse tunnels with twisted.conch to any
OpenSSH server.

One :class:`TunnelClient` per configured server keeps one SSH connection
up and asks the server (``tcpip-forward``) to listen on each forward's
``bind_host:bind_port``; each connection the server accepts there arrives
as a ``forwarded-tcpip`` channel and is spliced to the forward's local
target (the portal, an app listener, the TLS terminator).

- **Authentication**: the device key (ed25519), public key only.
- **Host key pinning**: the server's host key fingerprint (OpenSSH's
  ``SHA256:...`` form) must equal the pinned one; with none pinned, the
  first key seen is accepted and kept for the life of the client (the
  manager stores it).  Any other key is refused: the connection is dropped,
  the tunnel goes ``refused`` (health ``error``) and is **not retried**
  until it is reconfigured with another pin.
- **Reconnection**: a :class:`~twisted.application.internet.ClientService`
  on the injected clock, whose retry policy is the jittered
  :class:`~piccolod.interfaces.Backoff` over *this client's* count of
  failures (a TCP connection that then fails authentication or the
  handshake counts as a failure, so the delay keeps growing); the count
  resets once the session is up and its forwards were answered.
- **Forwards** are added, cancelled (``cancel-tcpip-forward``) or
  retargeted on the live connection when the spec changes; a refused
  forward (the server still holds the port for a stale session, or
  ``PermitListen`` forbids it) is asked for again after a backoff, without
  dropping the others.
- **Keepalive**: ``keepalive@openssh.com`` every ``keepalive_interval``;
  no answer within ``keepalive_timeout`` aborts the connection (then it is
  re-established).  Only one keepalive is outstanding at a time.
- **Health** per tunnel (``remote.tunnel.<name>``): ``ok`` when up with
  every forward active, ``warn`` while connecting, reconnecting or with a
  refused forward, ``error`` after ``error_after`` seconds down or on a
  host key mismatch.

Tests: ``tests/unit/test_remote_ssh.py`` (a fake SSH transport at the
seam of :mod:`piccolod.remote._conch`, on a ``Clock``),
``tests/integration/test_remote_ssh.py`` (OpenSSH).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.events import HealthLevel
from piccolod.interfaces import (
    Backoff,
    ForwardStatus,
    IHealth,
    ITunnel,
    TunnelForward,
    TunnelSpec,
    TunnelStatus,
)
from piccolod.kernel.aio import provides
from piccolod.kernel.plugins import SubsystemContext
from piccolod.remote.keys import openssh_fingerprint
from piccolod.remote.tunnel import Watchers, health_component, validate_specs

__all__ = [
    "CONFIG_KEYS",
    "HostKeyMismatch",
    "SSHTunnelService",
    "Session",
    "TunnelClient",
]

#: ``[subsystems.tunnel]`` keys of the ``ssh`` variant and their defaults.
CONFIG_KEYS: dict[str, Any] = {
    "backoff_initial": 0.5,
    "backoff_max": 30.0,
    "connect_timeout": 30.0,
    "error_after": 60.0,
}

#: Seconds a stopping client waits for an orderly disconnect before aborting.
STOP_GRACE = 5.0


class HostKeyMismatch(Exception):
    """The server presented a host key other than the pinned one."""

    def __init__(self, seen: str, pinned: str) -> None:
        super().__init__(f"host key mismatch: the server presented {seen}, pinned is {pinned}")
        self.seen = seen
        self.pinned = pinned


class Session(Protocol):
    """One live SSH connection as a tunnel client drives it."""

    def request_forward(self, host: str, port: int) -> Deferred[int]:
        """``tcpip-forward``; fires with the bound port (the server's pick for 0)."""

    def cancel_forward(self, host: str, port: int) -> Deferred[None]:
        """``cancel-tcpip-forward``."""

    def ping(self) -> Deferred[None]:
        """A keepalive request; fires when the server answered (either way)."""

    def close(self, abort: bool = False) -> None:
        """Disconnect (``abort``: drop the TCP connection at once)."""


def _describe(failure: Failure) -> str:
    message = failure.getErrorMessage()
    name = failure.type.__name__ if failure.type is not None else "error"
    return message if message and message != name else name


@attrs.define(eq=False)
class _Forward:
    """One forward's live state (keyed by name in its client)."""

    spec: TunnelForward
    state: str = "pending"
    bound_port: int = 0
    error: str = ""
    attempts: int = 0
    connections: int = 0
    retry: IDelayedCall | None = None
    generation: int = 0

    def cancel_retry(self) -> None:
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        self.retry = None

    def status(self) -> ForwardStatus:
        return ForwardStatus(
            self.spec.name,
            self.spec.bind_host,
            self.spec.bind_port,
            self.state,
            bound_port=self.bound_port,
            target_host=self.spec.target_host,
            target_port=self.spec.target_port,
            error=self.error,
            connections=self.connections,
        )


@implementer(IProtocolFactory)
class _ClientFactory(Factory):
    def __init__(self, client: TunnelClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> Any:
        return self.client.protocol_factory(self.client)


@implementer(IStreamClientEndpoint)
class _CountingEndpoint:
    """Counts a failed TCP connection attempt before ``ClientService`` asks for a delay."""

    def __init__(self, inner: IStreamClientEndpoint, client: TunnelClient) -> None:
        self.inner = inner
        self.client = client

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        d: Deferred[IProtocol] = self.inner.connect(protocolFactory)
        return d.addErrback(self.client._connect_failed)


@attrs.define(eq=False)
class TunnelClient:
    """
    One tunnel: a server, one SSH connection kept up, its forwards (see
    the module docstring).  Built and driven by :class:`SSHTunnelService`.
    """

    log = Logger()

    spec: TunnelSpec
    clock: IReactorTime
    endpoint: Callable[[str, int], IStreamClientEndpoint]
    protocol_factory: Callable[[TunnelClient], IProtocol]
    connect_target: Callable[[str, int], IStreamClientEndpoint]
    notify: Callable[[TunnelStatus], None]
    health: IHealth | None = None
    backoff: Backoff = attrs.field(factory=lambda: Backoff(initial=0.5, maximum=30.0))
    rand: Callable[[], float] = random.random
    connect_timeout: float = 30.0
    error_after: float = 60.0

    state: str = attrs.field(init=False, default="stopped")
    pinned: str = attrs.field(init=False, default="")
    host_key_seen: str = attrs.field(init=False, default="")
    attempts: int = attrs.field(init=False, default=0)
    last_error: str = attrs.field(init=False, default="")
    since: float = attrs.field(init=False, default=0.0)
    connected_at: float | None = attrs.field(init=False, default=None)
    down_since: float | None = attrs.field(init=False, default=None)
    refused: bool = attrs.field(init=False, default=False)
    _forwards: dict[str, _Forward] = attrs.field(init=False, factory=dict)
    _session: Session | None = attrs.field(init=False, default=None)
    _service: ClientService | None = attrs.field(init=False, default=None)
    _abort: Callable[[], None] | None = attrs.field(init=False, default=None)
    _handshake_timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _keepalive: LoopingCall | None = attrs.field(init=False, default=None)
    _ping_timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _reason: str = attrs.field(init=False, default="")
    _stopping: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self.pinned = self.spec.host_key
        self._forwards = {f.name: _Forward(f) for f in self.spec.forwards}

    # -- what the owner calls ------------------------------------------------

    @property
    def user(self) -> str:
        return self.spec.user

    @property
    def private_key(self) -> bytes:
        return self.spec.private_key

    def start(self) -> None:
        self._stopping = False
        self._set_state("connecting")
        endpoint = _CountingEndpoint(self.endpoint(self.spec.host, self.spec.port), self)
        self._service = ClientService(
            endpoint, _ClientFactory(self), retryPolicy=self._retry_delay, clock=self.clock
        )
        self._service.startService()

    def compatible(self, spec: TunnelSpec) -> bool:
        """Whether ``spec`` can be applied without a new connection."""
        return spec.connection_key() == self.spec.connection_key() and spec.host_key in (
            "",
            self.pinned,
        )

    def update(self, spec: TunnelSpec) -> None:
        """Apply a compatible spec: add, cancel and retarget forwards on the live connection."""
        self.spec = spec
        wanted = {f.name: f for f in spec.forwards}
        for name, forward in list(self._forwards.items()):
            if name not in wanted or wanted[name].binding != forward.spec.binding:
                self._remove(forward)
        for name, fspec in wanted.items():
            existing = self._forwards.get(name)
            if existing is not None:
                existing.spec = fspec  # a new target applies to new connections
                continue
            added = self._forwards[name] = _Forward(fspec)
            if self._session is not None:
                self._request(added)
        self._changed()

    def stop(self) -> Deferred[None]:
        """Stop for good: disconnect, cancel every timer, forget the health component."""
        self._stopping = True
        self._cancel_timers()
        for forward in self._forwards.values():
            forward.cancel_retry()
        session, self._session = self._session, None
        if session is not None:
            session.close()
        self._set_state("stopped", report=False)
        if self.health is not None:
            self.health.remove(health_component(self.spec.name))
        self.notify(self.status())
        service, self._service = self._service, None
        if service is None:
            return succeed(None)
        stopped: Deferred[None] = service.stopService()
        if stopped.called:
            return stopped
        abort = self._abort
        grace = self.clock.callLater(STOP_GRACE, lambda: abort() if abort else None)

        def done(result: object) -> object:
            if grace.active():
                grace.cancel()
            return result

        return stopped.addBoth(done)

    def status(self) -> TunnelStatus:
        return TunnelStatus(
            self.spec.name,
            self.state,
            host=self.spec.host,
            port=self.spec.port,
            host_key=self.host_key_seen,
            forwards=tuple(self._forwards[n].status() for n in sorted(self._forwards)),
            attempts=self.attempts,
            last_error=self.last_error,
            since=self.since,
            connected_at=self.connected_at,
        )

    # -- what the SSH side calls (piccolod.remote._conch.ClientHooks) -------------

    def transport_made(self, abort: Callable[[], None]) -> None:
        self._abort = abort
        self._reason = ""
        self._set_state("connecting", report=False)
        self._handshake_timer = self.clock.callLater(self.connect_timeout, self._handshake_expired)

    def verify_host_key(self, key_blob: bytes) -> Deferred[bool]:
        seen = openssh_fingerprint(key_blob)
        if self.pinned and seen != self.pinned:
            error = HostKeyMismatch(seen, self.pinned)
            self._refuse(error)
            return fail(error)
        self.host_key_seen = seen
        if not self.pinned:
            self.log.info(
                "tunnel {tunnel}: pinning the host key {fingerprint} of {host}:{port}",
                tunnel=self.spec.name,
                fingerprint=seen,
                host=self.spec.host,
                port=self.spec.port,
            )
            self.pinned = seen
        return succeed(True)

    def session_started(self, session: Session) -> None:
        if self._stopping or self.refused:
            session.close()
            return
        self._session = session
        requests = [self._request(f) for f in self._forwards.values()]
        DeferredList(requests).addCallback(lambda _: self._ready(session))

    def disconnect_reason(self, reason: str) -> None:
        self._reason = reason

    def transport_lost(self, reason: Failure) -> None:
        self._cancel_timers()
        self._abort = None
        self._session = None
        for forward in self._forwards.values():
            forward.cancel_retry()
            forward.generation += 1
            forward.state, forward.bound_port = "pending", 0
        if self._stopping or self.refused:
            return
        self.attempts += 1
        self.last_error = self._reason or f"connection lost: {_describe(reason)}"
        if self.down_since is None:
            self.down_since = self.clock.seconds()
        self.log.info(
            "tunnel {tunnel}: {error}; reconnecting (attempt {attempt})",
            tunnel=self.spec.name,
            error=self.last_error,
            attempt=self.attempts,
        )
        self._set_state("backoff")

    def forwarded_target(self, host: str, port: int) -> TunnelForward | None:
        for forward in self._forwards.values():
            if (
                forward.state == "active"
                and forward.spec.bind_host == host
                and port in (forward.bound_port, forward.spec.bind_port)
            ):
                forward.connections += 1
                return forward.spec
        return None

    def target_endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        return self.connect_target(host, port)

    # -- internals -----------------------------------------------------------------

    def _retry_delay(self, _attempt: int) -> float:
        return self.backoff.delay(max(0, self.attempts - 1), self.rand)

    def _connect_failed(self, failure: Failure) -> Failure:
        if not self._stopping and not failure.check(CancelledError):
            self.attempts += 1
            self.last_error = f"cannot connect to {self.spec.host}:{self.spec.port}: " + (
                _describe(failure)
            )
            if self.down_since is None:
                self.down_since = self.clock.seconds()
            self._set_state("backoff")
        return failure

    def _ready(self, session: Session) -> None:
        if session is not self._session:
            return
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        self.attempts = 0
        self.down_since = None
        self.connected_at = self.clock.seconds()
        if self.last_error:
            self.log.info("tunnel {tunnel}: connected again", tunnel=self.spec.name)
        self.last_error = ""
        self._keepalive = LoopingCall(self._ping)
        self._keepalive.clock = self.clock
        self._keepalive.start(self.spec.keepalive_interval, now=False)
        self._set_state("up")

    def _request(self, forward: _Forward) -> Deferred[None]:
        session = self._session
        if session is None:
            return succeed(None)
        forward.cancel_retry()
        forward.generation += 1
        generation = forward.generation
        forward.state = "pending"

        def current() -> bool:
            return (
                forward.generation == generation
                and self._session is session
                and self._forwards.get(forward.spec.name) is forward
            )

        def bound(port: int) -> None:
            if not current():
                if self._session is session and self._forwards.get(forward.spec.name) is None:
                    session.cancel_forward(forward.spec.bind_host, port).addErrback(lambda _: None)
                return
            forward.state, forward.bound_port, forward.error = "active", port, ""
            forward.attempts = 0
            self._changed()

        def refused(failure: Failure) -> None:
            if not current():
                return
            forward.state, forward.bound_port = "refused", 0
            forward.error = f"the server refused the forward: {_describe(failure)}"
            delay = self.backoff.delay(forward.attempts, self.rand)
            forward.attempts += 1
            self.log.info(
                "tunnel {tunnel}: forward {forward} on {host}:{port} refused ({error}); "
                "asking again in {delay:.1f}s",
                tunnel=self.spec.name,
                forward=forward.spec.name,
                host=forward.spec.bind_host,
                port=forward.spec.bind_port,
                error=forward.error,
                delay=delay,
            )
            forward.retry = self.clock.callLater(delay, self._retry_forward, forward)
            self._changed()

        return session.request_forward(forward.spec.bind_host, forward.spec.bind_port).addCallbacks(
            bound, refused
        )

    def _retry_forward(self, forward: _Forward) -> None:
        forward.retry = None
        if self._forwards.get(forward.spec.name) is forward and self._session is not None:
            self._request(forward)

    def _remove(self, forward: _Forward) -> None:
        del self._forwards[forward.spec.name]
        forward.cancel_retry()
        forward.generation += 1
        if self._session is not None and forward.state == "active":
            self._session.cancel_forward(forward.spec.bind_host, forward.bound_port).addErrback(
                lambda f: self.log.info(
                    "tunnel {tunnel}: cancelling {forward} failed: {error}",
                    tunnel=self.spec.name,
                    forward=forward.spec.name,
                    error=_describe(f),
                )
            )

    def _ping(self) -> None:
        session = self._session
        if session is None or self._ping_timer is not None:
            return  # never a second keepalive while one is unanswered
        self._ping_timer = self.clock.callLater(
            self.spec.keepalive_timeout, self._ping_expired, session
        )

        def answered(_: object) -> None:
            if self._ping_timer is not None and self._ping_timer.active():
                self._ping_timer.cancel()
            self._ping_timer = None

        session.ping().addBoth(answered)

    def _ping_expired(self, session: Session) -> None:
        self._ping_timer = None
        if session is self._session:
            self._reason = f"no answer to a keepalive within {self.spec.keepalive_timeout:g}s"
            session.close(abort=True)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        self._reason = f"no SSH session within {self.connect_timeout:g}s"
        if self._abort is not None:
            self._abort()

    def _refuse(self, error: HostKeyMismatch) -> None:
        self.refused = True
        self.host_key_seen = error.seen
        self.last_error = f"{error}; not retrying until the tunnel is reconfigured"
        self.log.error(
            "tunnel {tunnel} to {host}:{port}: {error}",
            tunnel=self.spec.name,
            host=self.spec.host,
            port=self.spec.port,
            error=self.last_error,
        )
        self._cancel_timers()
        self._set_state("refused")
        service, self._service = self._service, None
        if service is not None:
            service.stopService()  # no retry: the connection is dropped

    def _cancel_timers(self) -> None:
        for timer in (self._handshake_timer, self._ping_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._handshake_timer = self._ping_timer = None
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None

    def _set_state(self, state: str, report: bool = True) -> None:
        if state != self.state:
            self.state = state
            self.since = self.clock.seconds()
        if report:
            self._changed()

    def _changed(self) -> None:
        if self._stopping:
            return
        self._report()
        self.notify(self.status())

    def _report(self) -> None:
        if self.health is None:
            return
        where = f"{self.spec.host}:{self.spec.port}"
        level, message = HealthLevel.WARN, f"connecting to {where}"
        if self.state == "up":
            waiting = [f for f in self._forwards.values() if f.state != "active"]
            if not waiting:
                level = HealthLevel.OK
                message = f"connected to {where}, {len(self._forwards)} forward(s) active"
            else:
                message = f"connected to {where}; " + "; ".join(
                    f"{f.spec.name}: {f.error or f.state}" for f in waiting
                )
        elif self.state == "backoff":
            down = 0.0 if self.down_since is None else self.clock.seconds() - self.down_since
            if down >= self.error_after:
                level = HealthLevel.ERROR
            message = f"reconnecting to {where} (attempt {self.attempts}): {self.last_error}"
        elif self.state == "refused":
            level, message = HealthLevel.ERROR, self.last_error
        self.health.report(
            health_component(self.spec.name),
            level,
            message,
            {"forwards_active": sum(f.state == "active" for f in self._forwards.values())},
        )


def _default_endpoint(reactor: Any, timeout: float) -> Callable[[str, int], IStreamClientEndpoint]:
    def endpoint(host: str, port: int) -> IStreamClientEndpoint:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)

    return endpoint


def _conch_transport(client: TunnelClient) -> IProtocol:
    from piccolod.remote._conch import build_transport

    return build_transport(client)


@implementer(ITunnel)
@attrs.define(eq=False)
class SSHTunnelService(Service):
    """``ITunnel`` over SSH: one :class:`TunnelClient` per spec (see the module docstring)."""

    log = Logger()
    kind = "ssh"

    reactor: Any = attrs.field(validator=provides(IReactorTime))
    health: IHealth | None = None
    backoff: Backoff = attrs.field(factory=lambda: Backoff(initial=0.5, maximum=30.0))
    rand: Callable[[], float] = random.random
    connect_timeout: float = 30.0
    error_after: float = 60.0
    #: ``(host, port) -> endpoint`` of the servers (default: ``HostnameEndpoint``).
    endpoint: Callable[[str, int], IStreamClientEndpoint] | None = None
    #: ``(host, port) -> endpoint`` of the local targets.
    connect_target: Callable[[str, int], IStreamClientEndpoint] | None = None
    #: Builds the SSH protocol of a client (default: twisted.conch's).
    protocol_factory: Callable[[TunnelClient], IProtocol] = _conch_transport
    clients: dict[str, TunnelClient] = attrs.field(init=False, factory=dict)
    _watchers: Watchers = attrs.field(init=False, factory=Watchers)
    _stopping: list[Deferred[None]] = attrs.field(init=False, factory=list)

    @classmethod
    def from_context(cls, ctx: SubsystemContext) -> SSHTunnelService:
        from piccolod.errors import ConfigError

        config = {**CONFIG_KEYS, **dict(ctx.config)}
        errors = [
            f"[subsystems.tunnel] {key} must be a number > 0"
            for key in CONFIG_KEYS
            if isinstance(config[key], bool)
            or not isinstance(config[key], (int, float))
            or config[key] <= 0
        ]
        if errors:
            raise ConfigError(errors)
        return cls(
            ctx.reactor,
            ctx.kernel.health,
            backoff=Backoff(
                initial=float(config["backoff_initial"]), maximum=float(config["backoff_max"])
            ),
            connect_timeout=float(config["connect_timeout"]),
            error_after=float(config["error_after"]),
        )

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)
        if self.endpoint is None:
            self.endpoint = _default_endpoint(self.reactor, self.connect_timeout)
        if self.connect_target is None:
            self.connect_target = _default_endpoint(self.reactor, 10.0)

    # -- IService ------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        for client in self.clients.values():
            if client.state == "stopped":
                client.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        stops = [self._drop(name) for name in list(self.clients)]
        stops += self._stopping
        return DeferredList(stops).addCallback(lambda _: None)

    # -- ITunnel -------------------------------------------------------------

    def apply(self, specs: Sequence[TunnelSpec]) -> None:
        wanted = validate_specs(specs)
        for name in sorted(set(self.clients) - set(wanted)):
            self._drop(name)
        for name, spec in sorted(wanted.items()):
            client = self.clients.get(name)
            if client is not None and client.compatible(spec):
                if client.spec != spec:
                    client.update(spec)
                continue
            if client is not None:
                self.log.info("tunnel {tunnel}: new connection settings", tunnel=name)
                self._drop(name)
            assert self.endpoint is not None and self.connect_target is not None
            client = TunnelClient(
                spec,
                self.reactor,
                self.endpoint,
                self.protocol_factory,
                self.connect_target,
                self._watchers,
                health=self.health,
                backoff=self.backoff,
                rand=self.rand,
                connect_timeout=self.connect_timeout,
                error_after=self.error_after,
            )
            self.clients[name] = client
            if self.running:
                client.start()

    def status(self) -> Sequence[TunnelStatus]:
        return [self.clients[name].status() for name in sorted(self.clients)]

    def watch(self, observer: Callable[[TunnelStatus], None]) -> Callable[[], None]:
        return self._watchers.add(observer)

    def _drop(self, name: str) -> Deferred[None]:
        client = self.clients.pop(name)
        d = client.stop()
        if d.called:
            return d
        self._stopping.append(d)

        def forget(result: object) -> object:
            if d in self._stopping:
                self._stopping.remove(d)
            return result

        d.addBoth(forget)
        return d
