"""
The ``remote`` subsystem service: remote access configuration, the route
table by leadership, the tunnels, certificates (ACME) and TLS termination.

:class:`RemoteManager` answers the ``remote.*`` commands.  Its record
(configuration, aliases, pinned host keys, the device key, the ACME
account key, certificates) lives in the control store and is read and
written only through the ``store.remote.*`` commands, so it rests
encrypted; nothing of it is written to a file.

- **Lock** (retained ``persistence.lock_state``): on ``unlocked`` the record
  is loaded and everything converges; on anything else the tunnels and the
  TLS terminator stop, every route is withdrawn, pending challenges and
  every secret are dropped from memory.  While locked the ``remote.*``
  commands fail with ``Locked`` (the dispatcher's lock gate; HTTP 423).
- **Writes** are serialised (one at a time, whole-record writes, one
  revision each); a write that changes nothing stores nothing and
  publishes nothing.  Every stored change publishes ``RemoteConfigChanged``
  (``remote.config``) with what changed; tunnels whose connection settings
  did not change are *not* restarted (their forwards are updated live).
- **Routes** (:mod:`piccolod.remote.routes`) are recomputed on every
  ``services.route`` and ``cluster.leadership`` event and every change;
  each changed route is published as ``RemoteRouteChanged``
  (``remote.route``).
- **Host keys** of servers configured without one are pinned on the first
  connection (stored like any change).
- **Certificates**: for each configured hostname, issuance runs as an
  ``acme`` job on the kernel's job runner (retried with backoff on
  failure, each failure reported on ``remote.certificate``, in the
  status and in health), when it is missing, and for renewal: an
  ``acme.check`` job every ``renew_check_interval`` submits those that
  expire within ``renew_before_days``.  A certificate is stored (key and
  chain in one write) only once issued and checked.

Tests: ``tests/unit/test_remote_manager.py`` (Clock, in-memory store
commands on a real dispatcher, the stub tunnel, a fake ACME backend),
``tests/integration/test_remote_*.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import IService, Service
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from piccolod.commands import (
    AcmeChallengeAnswer,
    AddRemoteAlias,
    CommandContext,
    ConfigureRemote,
    DisableRemote,
    GetAcmeChallenge,
    GetRemoteStatus,
    ListRemoteAliases,
    ListRemoteCertificates,
    RemoteAliases,
    RemoteCertificates,
    RemoteJobsStarted,
    RemoteStatus,
    RemoveRemoteAlias,
    RenewRemoteCertificate,
    RotateRemoteDeviceKey,
)
from piccolod.errors import (
    ConfigError,
    Conflict,
    InvalidCommand,
    Locked,
    NotFound,
    NotReady,
    PiccolodError,
    TransientError,
    Unavailable,
    UnknownCommand,
)
from piccolod.events import (
    Envelope,
    HealthLevel,
    LeadershipRoleChanged,
    LockState,
    LockStateChanged,
    RemoteConfigChanged,
    RoutePublished,
)
from piccolod.interfaces import (
    Backoff,
    ICommandDispatcher,
    IEventBus,
    IHealth,
    IJobControl,
    IJobHandle,
    ILeadershipRegistry,
    IRemoteManager,
    ISubscription,
    ITunnel,
    JobSpec,
    TunnelStatus,
)
from piccolod.kernel.aio import provides
from piccolod.kernel.dispatcher import Registration, register_all
from piccolod.kernel.plugins import SubsystemContext
from piccolod.remote.acme import AcmeBackend, AcmeIssuer, LibAcmeBackend
from piccolod.remote.events import RemoteCertificateChanged, RemoteRouteChanged
from piccolod.remote.keys import device_public_key, generate_account_key, generate_device_key
from piccolod.remote.model import (
    CONFIG_KEYS,
    Alias,
    RemoteState,
    settings_to_json,
)
from piccolod.remote.routes import RemoteRoute, compute_routes, resources_of, tunnel_specs
from piccolod.remote.store import RemoteStoreClient
from piccolod.remote.tls import TLSTerminator

__all__ = ["ACME_HEALTH", "HEALTH", "ManagerConfig", "RemoteManager"]

HEALTH = "remote"
ACME_HEALTH = "remote.acme"
SOURCE = "remote"
DAY = 86400.0


@attrs.frozen
class ManagerConfig:
    """The validated ``[subsystems.remote]`` section (see ``CONFIG_KEYS``)."""

    tls_listen: str = CONFIG_KEYS["tls_listen"]
    renew_check_interval: float = CONFIG_KEYS["renew_check_interval"]
    acme_retries: int = CONFIG_KEYS["acme_retries"]
    acme_retry_initial: float = CONFIG_KEYS["acme_retry_initial"]
    acme_retry_max: float = CONFIG_KEYS["acme_retry_max"]
    acme_timeout: float = CONFIG_KEYS["acme_timeout"]
    acme_threads: int = CONFIG_KEYS["acme_threads"]

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> ManagerConfig:
        values = {**CONFIG_KEYS, **dict(section)}
        errors: list[str] = []
        unknown = sorted(set(values) - set(CONFIG_KEYS))
        errors += [f"[subsystems.remote] unknown key {k!r}" for k in unknown]
        if not isinstance(values["tls_listen"], str) or not values["tls_listen"]:
            errors.append("[subsystems.remote] tls_listen must be an endpoint description")
        for key in ("renew_check_interval", "acme_retry_initial", "acme_retry_max", "acme_timeout"):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                errors.append(f"[subsystems.remote] {key} must be a number > 0")
        for key, minimum in (("acme_retries", 0), ("acme_threads", 1)):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                errors.append(f"[subsystems.remote] {key} must be an integer >= {minimum}")
        if errors:
            raise ConfigError(errors)
        return cls(**{k: values[k] for k in CONFIG_KEYS})


@attrs.define
class _CertStatus:
    """What is known of a hostname's issuance beyond the stored certificate."""

    state: str = "missing"  # missing | pending | ok | error
    last_error: str = ""
    attempt: int = 0
    job_id: str = ""
    failures: int = 0


def _changes(old: RemoteState, new: RemoteState) -> tuple[str, ...]:
    """What differs, as short names (``enabled``, ``tunnels``, ``certificate:<host>``...)."""
    changed: list[str] = []
    if old.enabled != new.enabled:
        changed.append("enabled")
    for field in attrs.fields(ConfigureRemote):
        if getattr(old.settings, field.name) != getattr(new.settings, field.name):
            changed.append(field.name)
    if old.aliases != new.aliases:
        changed.append("aliases")
    if old.device_key != new.device_key:
        changed.append("device_key")
    if old.account_key != new.account_key or old.account_uri != new.account_uri:
        changed.append("acme_account")
    for hostname in sorted(set(old.certificates) | set(new.certificates)):
        if old.certificates.get(hostname) != new.certificates.get(hostname):
            changed.append(f"certificate:{hostname}")
    return tuple(changed)


def _default_connect(reactor: Any) -> Callable[[str, int], IStreamClientEndpoint]:
    def connect(host: str, port: int) -> IStreamClientEndpoint:
        return HostnameEndpoint(reactor, host, port, timeout=10)

    return connect


@implementer(IRemoteManager)
@attrs.define(eq=False)
class RemoteManager(Service):
    """The remote subsystem (see the module docstring)."""

    log = Logger()

    reactor: Any = attrs.field(validator=provides(IReactorTime))
    bus: IEventBus = attrs.field(validator=provides(IEventBus))
    dispatcher: ICommandDispatcher = attrs.field(validator=provides(ICommandDispatcher))
    registry: ILeadershipRegistry = attrs.field(validator=provides(ILeadershipRegistry))
    tunnel: ITunnel = attrs.field(validator=provides(ITunnel))
    health: IHealth | None = None
    jobs: Any = None
    api_address: str = ""
    config: ManagerConfig = attrs.field(factory=ManagerConfig)
    #: Thread pool of the blocking ACME client (``None``: one of our own).
    pool: Any = None
    acme_backend: AcmeBackend = attrs.field(factory=LibAcmeBackend)
    connect_target: Callable[[str, int], IStreamClientEndpoint] | None = None
    tls: TLSTerminator | None = None

    store: RemoteStoreClient = attrs.field(init=False)
    issuer: AcmeIssuer = attrs.field(init=False)
    _owns_pool: bool = attrs.field(init=False, default=False)
    _state: RemoteState | None = attrs.field(init=False, default=None)
    _load_error: PiccolodError | None = attrs.field(init=False, default=None)
    _epoch: int = attrs.field(init=False, default=0)
    _mutex: DeferredLock = attrs.field(init=False, factory=DeferredLock)
    _published: dict[str, int] = attrs.field(init=False, factory=dict)
    _routes: tuple[RemoteRoute, ...] = attrs.field(init=False, default=())
    _route_events: dict[str, RemoteRouteChanged] = attrs.field(init=False, factory=dict)
    _challenges: dict[str, str] = attrs.field(init=False, factory=dict)
    _cert_status: dict[str, _CertStatus] = attrs.field(init=False, factory=dict)
    _acme_jobs: dict[str, IJobHandle] = attrs.field(init=False, factory=dict)
    _renewal: IService | None = attrs.field(init=False, default=None)
    _tls_busy: bool = attrs.field(init=False, default=False)
    _reconciling: bool = attrs.field(init=False, default=False)
    _tls_error: str = attrs.field(init=False, default="")
    _pinning: set[str] = attrs.field(init=False, factory=set)
    _subscriptions: list[ISubscription] = attrs.field(init=False, factory=list)
    _unwatch: Callable[[], None] | None = attrs.field(init=False, default=None)
    _registration: Registration | None = attrs.field(init=False, default=None)
    _background: set[Deferred[Any]] = attrs.field(init=False, factory=set)

    @classmethod
    def from_context(cls, ctx: SubsystemContext) -> RemoteManager:
        kernel = ctx.kernel
        return cls(
            ctx.reactor,
            kernel.bus,
            kernel.dispatcher,
            kernel.registry,
            ctx.dep(ITunnel),
            health=kernel.health,
            jobs=kernel.jobs,
            api_address=kernel.api_address,
            config=ManagerConfig.from_section(ctx.config),
        )

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)
        if self.connect_target is None:
            self.connect_target = _default_connect(self.reactor)
        if self.pool is None:
            self.pool = ThreadPool(minthreads=0, maxthreads=self.config.acme_threads, name="acme")
            self._owns_pool = True
        if self.tls is None:
            self.tls = TLSTerminator(self.reactor, self.connect_target, self.config.tls_listen)
        self.store = RemoteStoreClient(self.dispatcher)
        self.issuer = AcmeIssuer(
            self.reactor,
            self.pool,
            self._challenges,
            self.acme_backend,
            timeout=self.config.acme_timeout,
        )

    # ------------------------------------------------------------------
    # IService

    def startService(self) -> None:
        if self.running:
            return
        Service.startService(self)
        if self._owns_pool and not self.pool.started:
            self.pool.start()
        self._register()
        self._unwatch = self.tunnel.watch(self._on_tunnel_status)
        subscribe = self.bus.subscribe
        self._subscriptions = [
            subscribe(
                LockStateChanged.topic, self._on_lock, replay_retained=True, name="remote.lock"
            ),
            subscribe(
                RoutePublished.topic, self._on_route, replay_retained=True, name="remote.routes"
            ),
            subscribe(
                LeadershipRoleChanged.topic,
                self._on_leadership,
                replay_retained=True,
                name="remote.leadership",
            ),
        ]
        self._report_health()

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._unregister()
        for sub in self._subscriptions:
            await sub.cancel()
        self._subscriptions = []
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        await self._shut("service stopping")
        for d in list(self._background):
            d.cancel()
        if self._owns_pool and self.pool.started:
            self.pool.stop()
        if self.health is not None:
            self.health.remove(ACME_HEALTH)

    # ------------------------------------------------------------------
    # IRemoteManager

    def routes(self) -> Sequence[Mapping[str, Any]]:
        bound = self._bound_ports()
        return [self._route_json(r, bound) for r in self._routes]

    def challenge(self, token: str) -> str | None:
        return self._challenges.get(token)

    # ------------------------------------------------------------------
    # Events

    def _lock_state(self) -> LockState | None:
        envelope = self.bus.last(LockStateChanged.topic)
        return None if envelope is None else envelope.event.state

    def _on_lock(self, envelope: Envelope[Any]) -> Deferred[None] | None:
        event = envelope.event
        if not isinstance(event, LockStateChanged) or not self.running:
            return None
        if event.state is LockState.UNLOCKED:
            if self._state is None:
                return Deferred.fromCoroutine(self._load())
            return None
        if self._state is not None or self._load_error is not None:
            return Deferred.fromCoroutine(self._shut(f"storage {event.state.value}"))
        return None

    def _on_route(self, envelope: Envelope[Any]) -> None:
        event = envelope.event
        if not isinstance(event, RoutePublished):
            return
        key = f"{event.app}/{event.listener}"
        if event.withdrawn:
            if self._published.pop(key, None) is None:
                return
        elif self._published.get(key) == event.port:
            return
        else:
            self._published[key] = event.port
        self._reconcile()

    def _on_leadership(self, envelope: Envelope[Any]) -> None:
        event = envelope.event
        state = self._state
        if (
            isinstance(event, LeadershipRoleChanged)
            and state is not None
            and event.resource in resources_of(state)
        ):
            self._reconcile()

    def _on_tunnel_status(self, status: TunnelStatus) -> None:
        state = self._state
        if state is None or not self.running:
            return
        for tunnel in state.settings.tunnels:
            if (
                tunnel.name == status.name
                and not tunnel.host_key
                and status.host_key
                and status.state in ("connecting", "up")
                and (status.host, status.port) == (tunnel.host, tunnel.port)
                and tunnel.name not in self._pinning
            ):
                self._pinning.add(tunnel.name)
                self._background_run(self._pin(tunnel.name, status.host_key))
        if not self._reconciling:  # _reconcile publishes once the tunnels are applied
            self._publish_routes(self._routes)

    # ------------------------------------------------------------------
    # Loading and shutting down

    async def _load(self) -> None:
        await self._mutex.acquire()
        try:
            await self._load_locked()
        finally:
            self._mutex.release()

    async def _load_locked(self) -> None:
        if self._state is not None:
            return
        if self._lock_state() is not LockState.UNLOCKED:
            return
        epoch = self._epoch
        try:
            state = await self.store.load()
        except Locked:
            return
        except UnknownCommand:
            # No control store serves the remote record (the persistence
            # subsystem registers store.remote.*): remote access is off.
            self._load_error = Unavailable(
                "remote access is unavailable: the control store does not answer store.remote.load"
            )
            self.log.warn("{error}", error=self._load_error.detail)
            self._report_health()
            return
        except PiccolodError as e:
            self._load_error = NotReady(f"the stored remote record is unusable: {e.detail}")
            self.log.error("{error}", error=self._load_error.detail)
            self._report_health()
            return
        if epoch != self._epoch or self._lock_state() is not LockState.UNLOCKED:
            return
        self._load_error = None
        self._state = state
        self._cert_status = {}
        self.log.info(
            "remote access loaded (revision {revision}, {enabled})",
            revision=state.revision,
            enabled="enabled" if state.enabled else "disabled",
        )
        self._reconcile()
        self.bus.publish(
            RemoteConfigChanged(
                enabled=state.enabled, revision=state.revision, changed=("loaded",)
            ),
            source=SOURCE,
        )
        self._schedule_due()

    async def _shut(self, reason: str) -> None:
        """Stop serving: tunnels, TLS, routes, challenges, secrets in memory."""
        self._epoch += 1
        self._state = None
        self._load_error = None
        self._pinning.clear()
        self._challenges.clear()
        self._cert_status.clear()
        self._stop_renewal()
        for handle in list(self._acme_jobs.values()):
            handle.cancel()
        self._acme_jobs.clear()
        self.tunnel.apply(())
        self._publish_routes(())
        self._routes = ()
        assert self.tls is not None
        self.tls.update({}, {})
        await self.tls.stop()
        self.log.info("remote access stopped: {reason}", reason=reason)
        self._report_health()

    async def _require_state(self) -> RemoteState:
        """The loaded state (loading it now if needed); the caller holds the mutex."""
        if self._state is None:
            if self._lock_state() is not LockState.UNLOCKED:
                raise Locked("remote access configuration needs unlocked storage")
            await self._load_locked()
        if self._load_error is not None:
            raise self._load_error
        if self._state is None:
            raise Locked("remote access configuration needs unlocked storage")
        return self._state

    # ------------------------------------------------------------------
    # Writes

    async def _mutate(self, change: Callable[[RemoteState], RemoteState], what: str) -> RemoteState:
        """
        Apply ``change`` to the state and store the result (one write, one
        revision); converge and publish ``RemoteConfigChanged``.  A change
        that changes nothing stores nothing.
        """
        await self._mutex.acquire()
        try:
            state = await self._require_state()
            epoch = self._epoch
            new = change(state)
            if new == state:
                return state
            if new.revision == state.revision:
                new = attrs.evolve(new, revision=state.revision + 1)
            await self.store.save(new)
            if epoch != self._epoch or self._state is not state:
                raise Locked("storage was locked while remote access was being changed")
            self._state = new
            changed = _changes(state, new)
            self.log.info(
                "remote access {what}: revision {revision}, changed {changed}",
                what=what,
                revision=new.revision,
                changed=list(changed),
            )
            self._reconcile()
            self.bus.publish(
                RemoteConfigChanged(enabled=new.enabled, revision=new.revision, changed=changed),
                source=SOURCE,
            )
            return new
        finally:
            self._mutex.release()

    async def _pin(self, name: str, fingerprint: str) -> None:
        def pin(state: RemoteState) -> RemoteState:
            tunnels = tuple(
                attrs.evolve(t, host_key=fingerprint) if t.name == name and not t.host_key else t
                for t in state.settings.tunnels
            )
            return state.bump(settings=attrs.evolve(state.settings, tunnels=tunnels))

        try:
            await self._mutate(pin, f"pinned the host key {fingerprint} of tunnel {name}")
        except PiccolodError as e:
            self.log.warn(
                "could not store the host key of tunnel {tunnel}: {error}",
                tunnel=name,
                error=e.detail,
            )
        finally:
            self._pinning.discard(name)

    # ------------------------------------------------------------------
    # Convergence

    def _reconcile(self) -> None:
        """Routes, TLS, tunnels and renewal from the current facts (no store access)."""
        if not self.running:
            return
        state = self._state
        active = state is not None and state.enabled and state.configured
        if state is None or not active:
            routes: tuple[RemoteRoute, ...] = ()
        else:
            routes = compute_routes(state, self._published, self.registry, self.api_address)
        self._routes = routes
        assert self.tls is not None
        certificates = dict(state.certificates) if active and state is not None else {}
        by_name = {
            hostname: (r.host, r.port) for r in routes if r.available for hostname in r.hostnames
        }
        self.tls.update({h: c for h, c in certificates.items() if h in by_name}, by_name)
        wants_tls = bool(certificates) and state is not None and active
        if wants_tls and self.tls.port is None and not self._tls_busy:
            self._background_run(self._start_tls())
        elif not wants_tls and self.tls.port is not None and not self._tls_busy:
            self._background_run(self._stop_tls())
        specs = tunnel_specs(state, routes, self.tls.port) if state is not None else ()
        self._reconciling = True
        try:
            self.tunnel.apply(specs)
        finally:
            self._reconciling = False
        self._publish_routes(routes)  # after apply: with the ports the tunnels hold now
        if active and state is not None and state.settings.acme is not None:
            self._start_renewal()
        else:
            self._stop_renewal()
        self._report_health()

    async def _start_tls(self) -> None:
        assert self.tls is not None
        self._tls_busy = True
        try:
            await self.tls.start()
        except Exception as e:
            # Tried again at the next change; health says why meanwhile.
            self._tls_error = f"the TLS terminator cannot listen on {self.config.tls_listen}: {e}"
            self.log.error("{error}", error=self._tls_error)
            self._report_health()
            return
        finally:
            self._tls_busy = False
        self._tls_error = ""
        self._reconcile()

    async def _stop_tls(self) -> None:
        assert self.tls is not None
        self._tls_busy = True
        try:
            await self.tls.stop()
        finally:
            self._tls_busy = False
        self._reconcile()

    def _background_run(self, coroutine: Any) -> None:
        d = Deferred.fromCoroutine(coroutine)
        if d.called:
            d.addErrback(self._background_failed)
            return
        self._background.add(d)

        def done(result: object) -> object:
            self._background.discard(d)
            return result

        d.addBoth(done).addErrback(self._background_failed)

    def _background_failed(self, failure: Any) -> None:
        if failure.check(CancelledError):
            return
        self.log.failure("remote background task failed", failure)

    def _bound_ports(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Forward name → ``(tunnel, bound port)`` of every active forward (one pass)."""
        ports: dict[str, list[tuple[str, int]]] = {}
        for status in self.tunnel.status():
            for forward in status.forwards:
                if forward.state == "active":
                    ports.setdefault(forward.name, []).append((status.name, forward.bound_port))
        return {name: tuple(sorted(found)) for name, found in ports.items()}

    def _publish_routes(self, routes: Sequence[RemoteRoute]) -> None:
        bound = self._bound_ports()
        current: dict[str, RemoteRouteChanged] = {}
        for route in routes:
            current[route.target] = RemoteRouteChanged(
                target=route.target,
                mode=route.mode,
                host=route.host,
                port=route.port,
                hostnames=route.hostnames,
                remote_ports=bound.get(route.forward_name, ()),
                reason=route.reason,
            )
        previous = self._route_events
        for target, event in current.items():
            if previous.get(target) != event:
                self.bus.publish(event, source=SOURCE)
        for target, old in previous.items():
            if target not in current:
                self.bus.publish(
                    attrs.evolve(old, withdrawn=True, remote_ports=(), reason="not exposed"),
                    source=SOURCE,
                )
        self._route_events = current

    def _route_json(
        self, route: RemoteRoute, bound: Mapping[str, tuple[tuple[str, int], ...]] | None = None
    ) -> dict[str, Any]:
        out = route.to_json()
        found = (bound if bound is not None else self._bound_ports()).get(route.forward_name, ())
        out["remote_ports"] = dict(found)
        return out

    # ------------------------------------------------------------------
    # Certificates

    def _due(self, state: RemoteState, hostname: str) -> bool:
        acme = state.settings.acme
        certificate = state.certificates.get(hostname)
        if acme is None:
            return False
        if certificate is None:
            return True
        now: float = self.reactor.seconds()
        return now >= certificate.not_after - acme.renew_before_days * DAY

    def _schedule_due(self) -> list[str]:
        state = self._state
        if state is None or not state.enabled or state.settings.acme is None:
            return []
        submitted = []
        for hostname in state.hostnames():
            if self._due(state, hostname):
                handle = self._schedule(hostname)
                if handle is not None:
                    submitted.append(handle.id)
        return submitted

    def _schedule(self, hostname: str) -> IJobHandle | None:
        existing = self._acme_jobs.get(hostname)
        if existing is not None and not existing.state.final:
            return existing
        if self.jobs is None:
            raise NotReady("there is no job runner to issue certificates with")
        config = self.config
        spec = JobSpec(
            job_class="acme",
            fn=functools.partial(self._issue_job, hostname),
            timeout=config.acme_timeout + 60.0,
            retries=config.acme_retries,
            backoff=Backoff(
                initial=config.acme_retry_initial,
                maximum=config.acme_retry_max,
                factor=2.0,
                jitter=0.2,
            ),
            metadata={"hostname": hostname},
            name=f"certificate for {hostname}",
        )
        handle: IJobHandle = self.jobs.submit(spec)
        self._acme_jobs[hostname] = handle
        status = self._cert_status.setdefault(hostname, _CertStatus())
        status.state, status.job_id = "pending", handle.id
        return handle

    async def _issue_job(self, hostname: str, control: IJobControl) -> str:
        epoch = self._epoch
        status = self._cert_status.setdefault(hostname, _CertStatus())
        status.state, status.attempt, status.job_id = "pending", control.attempt, control.job_id
        self.bus.publish(
            RemoteCertificateChanged(hostname, "pending", attempt=control.attempt), source=SOURCE
        )
        try:
            state = self._state
            if state is None:
                raise Locked("storage was locked")
            acme = state.settings.acme
            if acme is None or hostname not in state.hostnames() or not state.enabled:
                status.state = "ok" if hostname in state.certificates else "missing"
                return "not wanted any more"
            control.report(0.1, "account")
            account_key = await self._account_key()
            control.report(0.3, "order and HTTP-01 validation")
            certificate, account_uri = await self.issuer.issue(acme, hostname, account_key)
            if epoch != self._epoch:
                raise Locked("storage was locked during the issuance")
            control.report(0.9, "storing")

            def store(s: RemoteState) -> RemoteState:
                if hostname not in s.hostnames():
                    return s
                new = s.with_certificate(certificate)
                if account_uri and account_uri != s.account_uri:
                    new = attrs.evolve(new, account_uri=account_uri)
                return new

            await self._mutate(store, f"stored the certificate of {hostname}")
        except Exception as e:
            self._issue_failed(hostname, status, control, e)
            if isinstance(e, CancelledError) or (
                isinstance(e, PiccolodError) and not isinstance(e, InvalidCommand)
            ):
                raise
            raise TransientError(f"issuing the certificate of {hostname}: {e}") from None
        status.state, status.last_error = "ok", ""
        self.bus.publish(
            RemoteCertificateChanged(
                hostname, "ok", not_after=certificate.not_after, attempt=control.attempt
            ),
            source=SOURCE,
        )
        self.log.info(
            "certificate of {hostname} issued by {issuer}, valid until {not_after}",
            hostname=hostname,
            issuer=certificate.issuer,
            not_after=certificate.not_after,
        )
        self._report_health()
        return certificate.serial

    def _issue_failed(
        self, hostname: str, status: _CertStatus, control: IJobControl, error: BaseException
    ) -> None:
        if isinstance(error, CancelledError):
            status.state = "missing"
            return
        detail = error.detail if isinstance(error, PiccolodError) else f"{error!r}"
        status.state, status.last_error = "error", detail
        status.failures += 1
        self.log.warn(
            "certificate of {hostname}: attempt {attempt} failed: {error}",
            hostname=hostname,
            attempt=control.attempt,
            error=detail,
        )
        self.bus.publish(
            RemoteCertificateChanged(hostname, "error", error=detail, attempt=control.attempt),
            source=SOURCE,
        )
        self._report_health()

    async def _account_key(self) -> str:
        state = self._state
        if state is not None and state.account_key:
            return state.account_key
        key = await self.issuer._blocking(generate_account_key)

        def keep(s: RemoteState) -> RemoteState:
            return s if s.account_key else s.bump(account_key=key)

        return (await self._mutate(keep, "created the ACME account key")).account_key

    def _start_renewal(self) -> None:
        if self._renewal is not None or self.jobs is None:
            return
        self._renewal = self.jobs.every(self.config.renew_check_interval, self._renewal_spec)

    def _stop_renewal(self) -> None:
        renewal, self._renewal = self._renewal, None
        if renewal is not None:
            renewal.stopService()

    def _renewal_spec(self) -> JobSpec:
        def check(control: IJobControl) -> int:
            return len(self._schedule_due())

        return JobSpec(job_class="acme.check", fn=check, name="certificate renewal check")

    # ------------------------------------------------------------------
    # Status and health

    def _tunnel_by_name(self) -> dict[str, TunnelStatus]:
        return {s.name: s for s in self.tunnel.status()}

    def _overall(self, state: RemoteState) -> str:
        if not state.configured:
            return "unconfigured"
        if not state.enabled:
            return "disabled"
        tunnels = self._tunnel_by_name()
        wanted = [t.name for t in state.settings.tunnels]
        if any(tunnels.get(n) is not None and tunnels[n].state == "refused" for n in wanted):
            return "error"
        healthy = all(
            n in tunnels
            and tunnels[n].state == "up"
            and all(f.state == "active" for f in tunnels[n].forwards)
            for n in wanted
        )
        if healthy and all(r.available for r in self._routes):
            return "active"
        return "degraded"

    def _certificates(self, state: RemoteState) -> tuple[dict[str, Any], ...]:
        out = []
        for hostname, target in state.hostnames().items():
            certificate = state.certificates.get(hostname)
            status = self._cert_status.get(hostname, _CertStatus())
            entry: dict[str, Any] = {
                "hostname": hostname,
                "target": target,
                "state": status.state if status.state != "missing" or not certificate else "ok",
                "last_error": status.last_error,
                "attempt": status.attempt,
                "failures": status.failures,
                "job_id": status.job_id,
            }
            if certificate is not None:
                entry.update(certificate.to_json())
                if status.state == "missing":
                    entry["state"] = "ok"
            out.append(entry)
        return tuple(out)

    def status(self) -> RemoteStatus:
        state = self._state
        if state is None:
            raise Locked("remote access configuration needs unlocked storage")
        assert self.tls is not None
        bound = self._bound_ports()
        return RemoteStatus(
            state=self._overall(state),
            enabled=state.enabled,
            revision=state.revision,
            device_public_key=device_public_key(state.device_key) if state.device_key else "",
            config=settings_to_json(state.settings) if state.configured else {},
            aliases=tuple(a.to_json() for a in state.aliases),
            routes=tuple(self._route_json(r, bound) for r in self._routes),
            tunnels=tuple(s.to_json() for s in self.tunnel.status()),
            certificates=self._certificates(state),
            tls_port=self.tls.port,
        )

    def _report_health(self) -> None:
        if self.health is None:
            return
        state = self._state
        if isinstance(self._load_error, Unavailable):
            # Nothing is exposed and nothing an operator can fix here: not a fault.
            self.health.report(HEALTH, HealthLevel.OK, self._load_error.detail)
        elif self._load_error is not None:
            # Not ERROR: the health escalator would restart the slot, which
            # cannot repair a record; nothing is exposed meanwhile.
            self.health.report(HEALTH, HealthLevel.WARN, self._load_error.detail)
        elif state is None:
            self.health.report(HEALTH, HealthLevel.OK, "locked: remote access is stopped")
        else:
            overall = self._overall(state)
            unavailable = [r for r in self._routes if not r.available]
            level = (
                HealthLevel.OK
                if overall in ("active", "disabled", "unconfigured")
                else (HealthLevel.WARN)
            )
            message = overall
            if self._tls_error:
                level, message = HealthLevel.WARN, f"{overall}; {self._tls_error}"
            if unavailable:
                message += "; unavailable: " + ", ".join(
                    f"{r.target} ({r.reason})" for r in unavailable
                )
            self.health.report(HEALTH, level, message, {"routes": float(len(self._routes))})
        errors = {h: s for h, s in self._cert_status.items() if s.state == "error"}
        if errors:
            self.health.report(
                ACME_HEALTH,
                HealthLevel.WARN,
                "; ".join(f"{h}: {s.last_error}" for h, s in sorted(errors.items())),
            )
        elif self._cert_status:
            count = len(self._cert_status)
            self.health.report(
                ACME_HEALTH, HealthLevel.OK, f"{count} certificate(s), none failing"
            )
        else:
            self.health.report(ACME_HEALTH, HealthLevel.OK, "no certificates configured")

    # ------------------------------------------------------------------
    # Commands

    def _register(self) -> None:
        self._registration = register_all(
            self.dispatcher,
            [
                (ConfigureRemote, self._handle_configure),
                (DisableRemote, self._handle_disable),
                (GetRemoteStatus, self._handle_status),
                (AddRemoteAlias, self._handle_add_alias),
                (RemoveRemoteAlias, self._handle_remove_alias),
                (ListRemoteAliases, self._handle_list_aliases),
                (ListRemoteCertificates, self._handle_list_certificates),
                (RenewRemoteCertificate, self._handle_renew),
                (RotateRemoteDeviceKey, self._handle_rotate),
                (GetAcmeChallenge, self._handle_challenge),
            ],
        )

    def _unregister(self) -> None:
        registration, self._registration = self._registration, None
        if registration is not None:
            registration.cancel()

    async def _read(self) -> RemoteState:
        await self._mutex.acquire()
        try:
            return await self._require_state()
        finally:
            self._mutex.release()

    async def _handle_configure(
        self, command: ConfigureRemote, context: CommandContext
    ) -> RemoteStatus:
        def configure(state: RemoteState) -> RemoteState:
            previous = {t.name: t for t in state.settings.tunnels}
            tunnels = []
            for tunnel in command.tunnels:
                old = previous.get(tunnel.name)
                if (
                    not tunnel.host_key
                    and old is not None
                    and (old.host, old.port) == (tunnel.host, tunnel.port)
                ):
                    tunnel = attrs.evolve(tunnel, host_key=old.host_key)  # keep the pin
                tunnels.append(tunnel)
            settings = attrs.evolve(command, tunnels=tuple(tunnels))
            taken = {a.hostname for a in state.aliases} & {
                h for h in [settings.portal_hostname, *(e.hostname for e in settings.expose)] if h
            }
            if taken:
                raise Conflict(f"hostname(s) already used by an alias: {', '.join(sorted(taken))}")
            new = attrs.evolve(
                state,
                settings=settings,
                enabled=True,
                configured=True,
                device_key=state.device_key or generate_device_key(),
            ).pruned()
            return new

        await self._mutate(configure, "configured")
        self._schedule_due()
        return self.status()

    async def _handle_disable(
        self, command: DisableRemote, context: CommandContext
    ) -> RemoteStatus:
        await self._mutate(lambda s: attrs.evolve(s, enabled=False), "disabled")
        for handle in list(self._acme_jobs.values()):
            handle.cancel()
        return self.status()

    async def _handle_status(
        self, command: GetRemoteStatus, context: CommandContext
    ) -> RemoteStatus:
        await self._read()
        return self.status()

    async def _handle_add_alias(
        self, command: AddRemoteAlias, context: CommandContext
    ) -> RemoteAliases:
        def add(state: RemoteState) -> RemoteState:
            used = state.hostnames()
            if used.get(command.hostname) == command.target and any(
                a.hostname == command.hostname for a in state.aliases
            ):
                return state
            if command.hostname in used:
                raise Conflict(
                    f"{command.hostname} is already routed to {used[command.hostname]}",
                    hostname=command.hostname,
                )
            if len(state.aliases) >= 256:
                raise InvalidCommand("at most 256 aliases")
            aliases = tuple(
                sorted(
                    (*state.aliases, Alias(command.hostname, command.target)),
                    key=lambda a: a.hostname,
                )
            )
            return attrs.evolve(state, aliases=aliases)

        state = await self._mutate(add, f"added the alias {command.hostname}")
        self._schedule_due()
        return RemoteAliases(tuple(a.to_json() for a in state.aliases))

    async def _handle_remove_alias(
        self, command: RemoveRemoteAlias, context: CommandContext
    ) -> RemoteAliases:
        def remove(state: RemoteState) -> RemoteState:
            if not any(a.hostname == command.hostname for a in state.aliases):
                raise NotFound(f"no alias {command.hostname}", hostname=command.hostname)
            aliases = tuple(a for a in state.aliases if a.hostname != command.hostname)
            return attrs.evolve(state, aliases=aliases).pruned()

        state = await self._mutate(remove, f"removed the alias {command.hostname}")
        return RemoteAliases(tuple(a.to_json() for a in state.aliases))

    async def _handle_list_aliases(
        self, command: ListRemoteAliases, context: CommandContext
    ) -> RemoteAliases:
        state = await self._read()
        return RemoteAliases(tuple(a.to_json() for a in state.aliases))

    async def _handle_list_certificates(
        self, command: ListRemoteCertificates, context: CommandContext
    ) -> RemoteCertificates:
        state = await self._read()
        return RemoteCertificates(self._certificates(state))

    async def _handle_renew(
        self, command: RenewRemoteCertificate, context: CommandContext
    ) -> RemoteJobsStarted:
        state = await self._read()
        if state.settings.acme is None:
            raise Conflict("no ACME server is configured (remote.configure acme=...)")
        if not state.enabled:
            raise Conflict("remote access is disabled")
        hostnames = list(state.hostnames())
        if command.hostname:
            if command.hostname not in hostnames:
                raise NotFound(f"{command.hostname} is not a configured hostname")
            hostnames = [command.hostname]
        started = []
        for hostname in hostnames:
            handle = self._schedule(hostname)
            if handle is not None:
                started.append(handle.id)
        return RemoteJobsStarted(tuple(started))

    async def _handle_rotate(
        self, command: RotateRemoteDeviceKey, context: CommandContext
    ) -> RemoteStatus:
        key = generate_device_key()
        await self._mutate(lambda s: attrs.evolve(s, device_key=key), "rotated the device key")
        return self.status()

    def _handle_challenge(
        self, command: GetAcmeChallenge, context: CommandContext
    ) -> AcmeChallengeAnswer:
        answer = self._challenges.get(command.token)
        if answer is None:
            raise NotFound("no such ACME challenge")
        return AcmeChallengeAnswer(command.token, answer)
