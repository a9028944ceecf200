"""
The ``services`` subsystem: port allocation, proxies and the route table.

:class:`ServiceManager` answers the ``services.*`` commands that the apps
controller dispatches:

- ``services.allocate`` → persisted backend and public ports per listener
  (:class:`~piccolod.services.ports.PortAllocator`);
- ``services.expose`` → one proxy per listener on its public port (TCP
  splice for ``raw``/``tls``, HTTP reverse proxy for ``http``/``websocket``),
  to this node's container (``local``) or to the leader's public port
  (``leader``: a follower's route points at the leader), and a retained
  ``RoutePublished`` per listener (mDNS and remote access consume them);
- ``services.withdraw`` → proxies closed, open connections dropped,
  ``RoutePublished(withdrawn=True)``;
- ``services.release`` → withdraw and forget the ports;
- ``services.list`` → the route table and allocations.

Policy: on any lock state other than ``unlocked`` every proxy is closed at
once (whatever the apps controller does), and cached allocations are
forgotten (they are re-read from the store after unlock).  Changing a
route's target (local ↔ leader) keeps its listening port: only new
connections go to the new target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from zope.interface import implementer

from piccolod.commands import (
    AllocatePorts,
    Command,
    CommandContext,
    ExposeApp,
    ExposedListener,
    ListServices,
    PortAllocation,
    ReleasePorts,
    ServiceList,
    ServicesChanged,
    WithdrawApp,
)
from piccolod.errors import ConfigError, Conflict, InvalidCommand, Locked
from piccolod.events import (
    Envelope,
    HealthLevel,
    LockState,
    LockStateChanged,
    RoutePublished,
)
from piccolod.interfaces import (
    ICommandDispatcher,
    IEventBus,
    IHealth,
    IServiceManager,
    ISubscription,
    RouteEntry,
)
from piccolod.kernel.dispatcher import Registration, register_all
from piccolod.services.ports import PortAllocator, PortRange, tcp_port_free
from piccolod.services.proxy import HTTPProxyFactory, TCPProxyFactory, _ProxyFactory

__all__ = ["CONFIG_KEYS", "ServiceManager", "service_type"]

#: ``[subsystems.services]`` keys and defaults.
CONFIG_KEYS: dict[str, Any] = {
    "bind": "0.0.0.0",
    "backend_ports": [15000, 25000],
    "public_ports": [35000, 45000],
    "probe_ports": True,
}
HEALTH = "services"


def service_type(protocol: str) -> str:
    """The DNS-SD type advertised for a listener's protocol."""
    return "_http._tcp" if protocol in ("http", "websocket") else "_piccolo-tcp._tcp"


def leader_host(address: str) -> str:
    """The host of a leader's API address (``http://10.0.0.2:8080`` → ``10.0.0.2``)."""
    host = urlsplit(address if "//" in address else f"//{address}").hostname
    if not host:
        raise InvalidCommand(f"cannot tell the leader's host from {address!r}")
    return host


@attrs.define(eq=False)
class _Route:
    entry: RouteEntry
    factory: _ProxyFactory
    port: IListeningPort | None = None

    def target(self) -> tuple[str, int]:
        if self.entry.mode == "leader":
            return self.entry.target_host, self.entry.public_port
        return "127.0.0.1", self.entry.backend_port


def _range(value: Any, name: str) -> PortRange:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError([f"[subsystems.services] {name} must be [low, high]"])
    try:
        return PortRange(int(value[0]), int(value[1]))
    except InvalidCommand as e:
        raise ConfigError([f"[subsystems.services] {name}: {e.detail}"]) from None


@implementer(IServiceManager)
@attrs.define(eq=False)
class ServiceManager(Service):
    """The services subsystem (see the module docstring)."""

    log = Logger()

    reactor: Any
    bus: IEventBus
    dispatcher: ICommandDispatcher
    health: IHealth | None = None
    allocator: PortAllocator | None = None
    bind: str = "0.0.0.0"
    _routes: dict[tuple[str, str], _Route] = attrs.field(init=False, factory=dict)
    _by_app: dict[str, set[tuple[str, str]]] = attrs.field(init=False, factory=dict)
    _subscription: ISubscription | None = attrs.field(init=False, default=None)
    _registration: Registration | None = attrs.field(init=False, default=None)
    _unlocked: bool = attrs.field(init=False, default=False)
    _failures: dict[str, str] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.allocator is None:
            self.allocator = PortAllocator(self.dispatcher)

    @classmethod
    def from_context(cls, ctx: Any) -> ServiceManager:
        config: Mapping[str, Any] = ctx.config
        bind = config.get("bind", CONFIG_KEYS["bind"])
        if not isinstance(bind, str) or not bind:
            raise ConfigError(["[subsystems.services] bind must be an address"])
        backend = _range(config.get("backend_ports", CONFIG_KEYS["backend_ports"]), "backend_ports")
        public = _range(config.get("public_ports", CONFIG_KEYS["public_ports"]), "public_ports")
        kernel = ctx.kernel
        probe = bool(config.get("probe_ports", True))
        allocator = PortAllocator(
            kernel.dispatcher,
            backend=backend,
            public=public,
            is_free_backend=tcp_port_free("127.0.0.1") if probe else (lambda port: True),
            is_free_public=tcp_port_free(bind) if probe else (lambda port: True),
        )
        return cls(
            reactor=kernel.reactor,
            bus=kernel.bus,
            dispatcher=kernel.dispatcher,
            health=kernel.health,
            allocator=allocator,
            bind=bind,
        )

    # -- IServiceManager ------------------------------------------------------

    def routes(self) -> Sequence[RouteEntry]:
        return [
            attrs.evolve(r.entry, connections=r.factory.stats.active)
            for _, r in sorted(self._routes.items())
        ]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per ``app/listener``: the proxy's counters."""
        return {
            f"{app}/{listener}": attrs.asdict(route.factory.stats)
            for (app, listener), route in sorted(self._routes.items())
        }

    # -- IService ------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        handlers: list[tuple[type[Command], Any]] = [
            (ListServices, self._handle_list),
            (AllocatePorts, self._handle_allocate),
            (ExposeApp, self._handle_expose),
            (WithdrawApp, self._handle_withdraw),
            (ReleasePorts, self._handle_release),
        ]
        self._registration = register_all(self.dispatcher, handlers)
        super().startService()  # type: ignore[no-untyped-call]
        self._subscription = self.bus.subscribe(
            LockStateChanged.topic,
            self._on_lock,
            replay_retained=True,
            name="services.lock",
        )
        self._report()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._unregister()
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None
        return self.withdraw_all("piccolod stopping")

    def _unregister(self) -> None:
        if self._registration is not None:
            self._registration.cancel()
            self._registration = None

    # -- operations -------------------------------------------------------------

    async def expose(
        self,
        app: str,
        listeners: Sequence[ExposedListener],
        mode: str = "local",
        leader_address: str | None = None,
    ) -> list[RouteEntry]:
        """Serve ``app``'s ``listeners`` (see ``services.expose``); fires with the routes."""
        # The retained lock state, not our own copy of it: a subscriber that
        # reacts to the same unlock event may ask before ours was delivered.
        last = self.bus.last(LockStateChanged.topic)
        if last is None or getattr(last.event, "state", None) is not LockState.UNLOCKED:
            raise Locked("storage is locked: no app is exposed while locked")
        assert self.allocator is not None
        target_host = "127.0.0.1"
        if mode == "leader":
            if not leader_address:
                raise InvalidCommand("mode leader needs a leader_address")
            target_host = leader_host(leader_address)
        names = [listener.listener for listener in listeners]
        ports = await self.allocator.allocate(app, names)
        wanted = set(names)
        for key in [k for k in self._app_keys(app) if k[1] not in wanted]:
            await self._close(key)
        result: list[RouteEntry] = []
        errors: list[str] = []
        for listener in listeners:
            pair = ports[listener.listener]
            entry = RouteEntry(
                app=app,
                listener=listener.listener,
                public_port=pair["public"],
                backend_port=pair["backend"],
                protocol=listener.protocol,
                flow=listener.flow,
                mode=mode,
                target_host=target_host,
                leader_address=leader_address if mode == "leader" else None,
            )
            key = (app, listener.listener)
            route = self._routes.get(key)
            if route is not None and (
                route.entry.public_port != entry.public_port
                or route.entry.protocol != entry.protocol
                or route.entry.flow != entry.flow
            ):
                await self._close(key)
                route = None
            if route is None:
                factory_type = HTTPProxyFactory if _http(listener) else TCPProxyFactory
                route = _Route(entry, factory_type(self.reactor, lambda: ("", 0)))
                route.factory.target = route.target
                route.factory.public_port = entry.public_port
                try:
                    route.port = await self._listen(entry.public_port, route.factory)
                except CannotListenError as e:
                    message = f"{app}/{listener.listener}: cannot listen on {entry.public_port}"
                    self._failures[f"{app}/{listener.listener}"] = str(e.socketError)
                    errors.append(f"{message}: {e.socketError}")
                    continue
                self._failures.pop(f"{app}/{listener.listener}", None)
                self._routes[key] = route
                self._by_app.setdefault(app, set()).add(key)
                self._publish(entry, listener)
                self.log.info(
                    "services: {app}/{listener} on port {port} ({protocol}, {mode})",
                    app=app,
                    listener=listener.listener,
                    port=entry.public_port,
                    protocol=entry.protocol,
                    mode=mode,
                )
            elif route.entry != entry:
                route.entry = entry
                self._publish(entry, listener)
            result.append(route.entry)
        self._report()
        if errors:
            raise Conflict("; ".join(errors))
        return result

    async def withdraw(self, app: str) -> None:
        for key in sorted(self._app_keys(app)):
            await self._close(key)
        if self._failures:
            for failed in [k for k in self._failures if k.startswith(app + "/")]:
                del self._failures[failed]
        self._report()

    def withdraw_all(self, reason: str) -> Deferred[None]:
        keys = list(self._routes)
        if keys:
            self.log.info(
                "services: closing {count} proxies ({reason})", count=len(keys), reason=reason
            )
        closing = [Deferred.fromCoroutine(self._close(key)) for key in keys]
        self._failures.clear()
        self._report()
        if not closing:
            return succeed(None)
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)

    def _app_keys(self, app: str) -> set[tuple[str, str]]:
        return set(self._by_app.get(app, ()))

    async def _listen(self, port: int, factory: _ProxyFactory) -> IListeningPort:
        endpoint_type = TCP6ServerEndpoint if ":" in self.bind else TCP4ServerEndpoint
        endpoint = endpoint_type(self.reactor, port, interface=self.bind)
        listening: IListeningPort = await endpoint.listen(factory)  # type: ignore[no-untyped-call]
        return listening

    async def _close(self, key: tuple[str, str]) -> None:
        route = self._routes.pop(key, None)
        if route is None:
            return
        keys = self._by_app.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_app[key[0]]
        route.factory.close_all()
        if route.port is not None:
            stopped = route.port.stopListening()
            if stopped is not None:
                await stopped
        self.bus.publish(
            RoutePublished(
                app=route.entry.app,
                listener=route.entry.listener,
                port=route.entry.public_port,
                protocol=route.entry.protocol,
                service_type=service_type(route.entry.protocol),
                withdrawn=True,
            ),
            source="services",
        )

    def _publish(self, entry: RouteEntry, listener: ExposedListener) -> None:
        txt: list[tuple[str, str]] = [
            ("app", entry.app),
            ("listener", entry.listener),
            ("flow", entry.flow),
            ("mode", entry.mode),
            ("remote_ports", ",".join(str(p) for p in listener.remote_ports)),
        ]
        if entry.protocol in ("http", "websocket"):
            txt.insert(0, ("path", "/"))
        if entry.mode == "leader" and entry.leader_address:
            txt.append(("leader", entry.leader_address))
        self.bus.publish(
            RoutePublished(
                app=entry.app,
                listener=entry.listener,
                port=entry.public_port,
                protocol=entry.protocol,
                service_type=service_type(entry.protocol),
                txt=tuple(txt),
            ),
            source="services",
        )

    def _on_lock(self, envelope: Envelope[Any]) -> Deferred[None] | None:
        event = envelope.event
        if not isinstance(event, LockStateChanged):
            return None
        unlocked = event.state is LockState.UNLOCKED
        if unlocked == self._unlocked:
            return None
        self._unlocked = unlocked
        assert self.allocator is not None
        self.allocator.forget()
        if unlocked:
            self._report()
            return None
        return self.withdraw_all(f"storage {event.state.value}")

    def _report(self) -> None:
        if self.health is None:
            return
        figures = {"routes": float(len(self._routes))}
        if self._failures:
            failing = ", ".join(f"{k}: {v}" for k, v in sorted(self._failures.items()))
            self.health.report(HEALTH, HealthLevel.WARN, f"cannot listen: {failing}", figures)
        elif not self._unlocked:
            self.health.report(HEALTH, HealthLevel.OK, "locked: no route is served", figures)
        else:
            self.health.report(
                HEALTH, HealthLevel.OK, f"{len(self._routes)} routes served", figures
            )

    # -- command handlers ----------------------------------------------------------

    def _handle_list(self, command: ListServices, context: CommandContext) -> ServiceList:
        assert self.allocator is not None
        return ServiceList(
            routes=tuple(r.to_json() for r in self.routes()),
            allocations=self.allocator.cached(),
        )

    async def _handle_allocate(
        self, command: AllocatePorts, context: CommandContext
    ) -> PortAllocation:
        assert self.allocator is not None
        ports = await self.allocator.allocate(command.app, command.listeners)
        return PortAllocation(app=command.app, ports=ports)

    async def _handle_expose(self, command: ExposeApp, context: CommandContext) -> ServicesChanged:
        routes = await self.expose(
            command.app, command.listeners, command.mode, command.leader_address
        )
        return ServicesChanged(app=command.app, routes=tuple(r.to_json() for r in routes))

    async def _handle_withdraw(
        self, command: WithdrawApp, context: CommandContext
    ) -> ServicesChanged:
        await self.withdraw(command.app)
        return ServicesChanged(app=command.app)

    async def _handle_release(
        self, command: ReleasePorts, context: CommandContext
    ) -> ServicesChanged:
        await self.withdraw(command.app)
        assert self.allocator is not None
        await self.allocator.release(command.app)
        return ServicesChanged(app=command.app)


def _http(listener: ExposedListener) -> bool:
    return listener.protocol in ("http", "websocket") and listener.flow == "tcp"
