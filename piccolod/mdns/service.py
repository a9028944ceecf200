"""
The mDNS subsystem services: :class:`MulticastResponderService` (variant
``multicast``) binds one multicast socket per configured interface and runs
the :class:`~piccolod.mdns.protocol.Responder`; :class:`NullResponder`
(variant ``null``) advertises nothing.

Socket layout, per configured IPv4 address: a UDP socket bound to
``224.0.0.251:5353`` (``SO_REUSEADDR``/``SO_REUSEPORT``, so it shares the
port with Avahi or python-zeroconf), outgoing interface set to the address,
multicast TTL 255 (RFC 6762 §11), loopback on (other responders on this host
hear us), the group joined on that address only, and ``IP_MULTICAST_ALL``
off, so the socket receives only the group traffic of *its* interface.
Binding the group address (rather than ``0.0.0.0``) keeps unicast traffic to
port 5353 for the other stacks on the host; we only need multicast, and
reply by unicast from the same socket where the RFC says so.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import attrs
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorMulticast, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from piccolod.errors import ConfigError
from piccolod.events import Envelope, HealthLevel, MdnsNameChanged, RoutePublished
from piccolod.interfaces import AdvertisedName, IEventBus, IHealth, IMdnsResponder, ISubscription
from piccolod.kernel.aio import provides
from piccolod.mdns.codec import MAX_PACKET
from piccolod.mdns.protocol import MdnsProtocol, Responder
from piccolod.mdns.records import (
    MDNS_GROUP,
    InvalidService,
    ServiceSpec,
    is_valid_host_label,
)

__all__ = [
    "CONFIG_KEYS",
    "AdvertisedName",
    "IMdnsResponder",
    "InterfaceSpec",
    "MdnsConfig",
    "MulticastResponderService",
    "NullResponder",
    "portal_port_from",
    "system_ipv4_interfaces",
]

#: ``[subsystems.mdns]`` keys and defaults (the plugin's ``config_keys``).
CONFIG_KEYS: dict[str, Any] = {
    "hostname": "piccolo",
    "interfaces": ["*"],
    "ipv6_addresses": [],
    "portal_port": 0,
    "publish_portal": True,
    "rate_limit_per_s": 20,
    "rate_limit_burst": 40,
    "port": 5353,
    "health_interval": 5.0,
}

#: Linux ``IP_MULTICAST_ALL`` (not exported by the socket module).
IP_MULTICAST_ALL = 49
_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000

#: Bind retries back off from 1 s to this.
MAX_RETRY_DELAY = 60.0


# --------------------------------------------------------------------------
# The subsystem's interface (local until it moves to piccolod.interfaces)


# --------------------------------------------------------------------------
# Configuration


@attrs.frozen
class InterfaceSpec:
    """One interface to serve: its IPv4 address and, if known, its prefix."""

    address: str
    network: ipaddress.IPv4Network | None = None

    @classmethod
    def parse(cls, text: str) -> InterfaceSpec:
        """``"10.0.0.5"`` or ``"10.0.0.5/24"``; raises ``ValueError``."""
        if "/" in text:
            iface = ipaddress.IPv4Interface(text)
            return cls(str(iface.ip), iface.network)
        return cls(str(ipaddress.IPv4Address(text)))


@attrs.frozen
class MdnsConfig:
    """
    The validated ``[subsystems.mdns]`` section.

    @ivar interfaces: IPv4 addresses (optionally ``/prefix``, which also
        drops packets from off-link sources), or ``"*"`` for every up,
        multicast-capable, non-loopback IPv4 interface.
    @ivar ipv6_addresses: advertised as AAAA (the transport is IPv4).
    @ivar portal_port: ``0`` = the port of the kernel's API address.
    @ivar rate_limit_per_s: packets per second per source; ``0`` = no limit.
    """

    hostname: str = "piccolo"
    interfaces: tuple[str, ...] = ("*",)
    ipv6_addresses: tuple[str, ...] = ()
    portal_port: int = 0
    publish_portal: bool = True
    rate_limit_per_s: float = 20.0
    rate_limit_burst: float = 40.0
    port: int = 5353
    health_interval: float = 5.0

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> MdnsConfig:
        """Validate a section (defaults for absent keys); ``ConfigError`` lists every error."""
        values = {**CONFIG_KEYS, **section}
        errors: list[str] = []
        where = "[subsystems.mdns]"
        hostname = values["hostname"]
        if not isinstance(hostname, str) or not is_valid_host_label(hostname):
            errors.append(f"{where} hostname {hostname!r} is not a host label (a-z, 0-9, -)")
        interfaces = values["interfaces"]
        if not isinstance(interfaces, (list, tuple)) or not interfaces:
            errors.append(f"{where} interfaces must be a non-empty list of IPv4 addresses or '*'")
            interfaces = []
        for item in interfaces:
            if item == "*":
                continue
            try:
                InterfaceSpec.parse(str(item))
            except ValueError:
                errors.append(f"{where} interfaces: {item!r} is not an IPv4 address")
        ipv6 = values["ipv6_addresses"]
        if not isinstance(ipv6, (list, tuple)):
            errors.append(f"{where} ipv6_addresses must be a list")
            ipv6 = []
        for item in ipv6:
            try:
                ipaddress.IPv6Address(str(item))
            except ValueError:
                errors.append(f"{where} ipv6_addresses: {item!r} is not an IPv6 address")
        for key, low, high in (("portal_port", 0, 65535), ("port", 1, 65535)):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                errors.append(f"{where} {key} must be an integer in {low}..{high}")
        for key in ("rate_limit_per_s", "rate_limit_burst"):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                errors.append(f"{where} {key} must be a number >= 0")
        interval = values["health_interval"]
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            errors.append(f"{where} health_interval must be a number > 0")
        if not isinstance(values["publish_portal"], bool):
            errors.append(f"{where} publish_portal must be true or false")
        if errors:
            raise ConfigError(errors)
        return cls(
            hostname=hostname,
            interfaces=tuple(str(i) for i in interfaces),
            ipv6_addresses=tuple(str(ipaddress.IPv6Address(str(i))) for i in ipv6),
            portal_port=int(values["portal_port"]),
            publish_portal=bool(values["publish_portal"]),
            rate_limit_per_s=float(values["rate_limit_per_s"]),
            rate_limit_burst=float(values["rate_limit_burst"]),
            port=int(values["port"]),
            health_interval=float(interval),
        )


def portal_port_from(api_address: str) -> int | None:
    """The port of an API base URL (``http://127.0.0.1:8080`` -> 8080), or ``None``."""
    if not api_address:
        return None
    try:
        parts = urlsplit(api_address)
        port = parts.port
    except ValueError:
        return None
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme)
    return port or None


def system_ipv4_interfaces() -> list[InterfaceSpec]:
    """
    Every up, multicast-capable, non-loopback interface's primary IPv4
    address and prefix, in this thread's network namespace (Linux ioctls).
    """
    import fcntl

    found: list[InterfaceSpec] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            ifreq = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, ifreq), 16)[
                    0
                ]
                if not flags & _IFF_UP or flags & _IFF_LOOPBACK or not flags & _IFF_MULTICAST:
                    continue
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, ifreq)[20:24])
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFNETMASK, ifreq)[20:24])
            except OSError:
                continue  # no IPv4 address, or gone meanwhile
            found.append(InterfaceSpec(addr, ipaddress.IPv4Network(f"{addr}/{mask}", strict=False)))
    return found


# --------------------------------------------------------------------------
# The multicast variant


@attrs.define(eq=False)
class _Endpoint:
    spec: InterfaceSpec
    proto: MdnsProtocol | None = None
    port: Any = None  # IListeningPort + IMulticastTransport
    joined: bool = False
    error: str | None = None
    attempts: int = 0
    retry: IDelayedCall | None = None

    @property
    def component(self) -> str:
        return f"mdns:{self.spec.address}"


def _valid_reactor(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    for interface in (IReactorTime, IReactorMulticast):
        if not interface.providedBy(value):
            raise TypeError(f"{attribute.name!r} must provide {interface.__name__}, got {value!r}")


@implementer(IService, IMdnsResponder)
@attrs.define(eq=False, repr=False)
class MulticastResponderService(Service):
    """
    The ``mdns=multicast`` subsystem: sockets, bus and health around a
    :class:`Responder`.

    Advertises ``<hostname>.local`` and the portal (``_http._tcp``, TXT
    ``path=/``) and follows ``services.route`` (``RoutePublished``) to
    advertise and withdraw app listeners.  Publishes ``MdnsNameChanged`` on
    each claim, rename and withdrawal; reports health as
    ``mdns:<address>`` per interface.
    """

    log: ClassVar[Logger] = Logger()

    reactor: Any = attrs.field(validator=_valid_reactor)
    config: MdnsConfig = attrs.field(factory=MdnsConfig)
    bus: IEventBus | None = attrs.field(
        default=None, validator=attrs.validators.optional(provides(IEventBus))
    )
    health: IHealth | None = attrs.field(
        default=None, validator=attrs.validators.optional(provides(IHealth))
    )
    portal_port: int | None = None
    interfaces_source: Callable[[], list[InterfaceSpec]] = system_ipv4_interfaces
    rand: Callable[[], float] | None = None

    responder: Responder | None = attrs.field(init=False, default=None)
    invalid_routes: int = attrs.field(init=False, default=0)
    _endpoints: dict[str, _Endpoint] = attrs.field(init=False, factory=dict)
    _subscription: ISubscription | None = attrs.field(init=False, default=None)
    _health_loop: LoopingCall | None = attrs.field(init=False, default=None)

    def __repr__(self) -> str:
        return f"<MulticastResponderService {self.config.hostname!r} on {self.config.interfaces}>"

    @classmethod
    def from_context(cls, ctx: Any) -> MulticastResponderService:
        """Build from a ``SubsystemContext``; raises ``ConfigError``."""
        config = MdnsConfig.from_section(ctx.config)
        portal = config.portal_port or portal_port_from(getattr(ctx.kernel, "api_address", ""))
        return cls(
            reactor=ctx.kernel.reactor,
            config=config,
            bus=ctx.kernel.bus,
            health=ctx.kernel.health,
            portal_port=portal,
        )

    # ------------------------------------------------------------------
    # IService

    def startService(self) -> None:
        if self.running:
            return
        super().startService()  # type: ignore[no-untyped-call]
        kwargs: dict[str, Any] = {}
        if self.rand is not None:
            kwargs["rand"] = self.rand
        self.responder = Responder(
            clock=self.reactor,
            hostname=self.config.hostname,
            ipv6_addresses=self.config.ipv6_addresses,
            on_name=self._name_changed,
            on_change=self._report_health,
            **kwargs,
        )
        if self.config.publish_portal:
            if self.portal_port:
                self.responder.publish(ServiceSpec.portal(self.config.hostname, self.portal_port))
            else:
                self.log.warn("mDNS: no portal port (api_address has none); portal not advertised")
        for spec in self._interface_specs():
            endpoint = self._endpoints.setdefault(spec.address, _Endpoint(spec))
            self._bind(endpoint)
        self.responder.start()
        if self.bus is not None:
            self._subscription = self.bus.subscribe(
                RoutePublished.topic, self._on_route, replay_retained=True, name="mdns"
            )
        loop = LoopingCall(self._report_health)
        loop.clock = self.reactor
        loop.start(self.config.health_interval, now=True)
        self._health_loop = loop

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        super().stopService()  # type: ignore[no-untyped-call]
        waits: list[Deferred[Any]] = []
        if self._health_loop is not None and self._health_loop.running:
            self._health_loop.stop()
        self._health_loop = None
        if self._subscription is not None:
            waits.append(self._subscription.cancel())
            self._subscription = None
        if self.responder is not None:
            self.responder.stop()  # goodbyes go out before the sockets close
        for endpoint in self._endpoints.values():
            if endpoint.retry is not None and endpoint.retry.active():
                endpoint.retry.cancel()
            endpoint.retry = None
            if endpoint.proto is not None and self.responder is not None:
                self.responder.remove_interface(endpoint.proto)
            if endpoint.port is not None:
                result = endpoint.port.stopListening()
                if isinstance(result, Deferred):
                    waits.append(result)
            endpoint.port = None
            endpoint.proto = None
            endpoint.joined = False
            if self.health is not None:
                self.health.remove(endpoint.component)
        self._endpoints.clear()
        done: Deferred[Any] = gatherResults(waits, consumeErrors=True)
        return done.addCallback(lambda _: None)

    # ------------------------------------------------------------------
    # IMdnsResponder

    def host_name(self) -> str:
        return self.responder.host_name() if self.responder is not None else ""

    def advertised(self) -> Sequence[AdvertisedName]:
        if self.responder is None:
            return ()
        out: list[AdvertisedName] = []
        for claim in self.responder.claims():
            state = claim.state.value if self.responder.running else "stopped"
            out.append(
                AdvertisedName(
                    kind=claim.kind,
                    key=claim.key,
                    requested=claim.requested_fqdn().decode("utf-8", "replace"),
                    name=claim.fqdn().decode("utf-8", "replace"),
                    state=state,
                    service_type=claim.spec.service_type if claim.spec else "",
                    port=claim.spec.port if claim.spec else 0,
                )
            )
        return out

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        return {
            address: {k: float(v) for k, v in sorted(ep.proto.stats.items())}
            for address, ep in self._endpoints.items()
            if ep.proto is not None
        }

    # ------------------------------------------------------------------
    # Sockets

    def _interface_specs(self) -> list[InterfaceSpec]:
        specs: dict[str, InterfaceSpec] = {}
        for item in self.config.interfaces:
            if item == "*":
                try:
                    found = self.interfaces_source()
                except Exception:
                    self.log.failure("mDNS: listing the system's interfaces failed")
                    found = []
                if not found:
                    self.log.warn("mDNS: interfaces = ['*'] matched no interface")
                for spec in found:
                    specs.setdefault(spec.address, spec)
            else:
                spec = InterfaceSpec.parse(item)
                specs.setdefault(spec.address, spec)
        return list(specs.values())

    def _bind(self, endpoint: _Endpoint) -> None:
        endpoint.retry = None
        endpoint.attempts += 1
        assert self.responder is not None
        proto = MdnsProtocol(
            responder=self.responder,
            address=endpoint.spec.address,
            clock=self.reactor,
            rate=self.config.rate_limit_per_s,
            burst=self.config.rate_limit_burst,
            network=endpoint.spec.network,
        )
        endpoint.proto = proto
        d = Deferred.fromCoroutine(self._open(endpoint, proto))
        d.addErrback(self._bind_failed, endpoint)

    async def _open(self, endpoint: _Endpoint, proto: MdnsProtocol) -> None:
        address = endpoint.spec.address
        endpoint.port = self.reactor.listenMulticast(
            self.config.port,
            proto,
            interface=MDNS_GROUP,
            listenMultiple=True,
            maxPacketSize=MAX_PACKET + 1,  # so that an oversized packet is seen as such
        )
        port = endpoint.port
        port.setTTL(255)
        port.setLoopbackMode(1)
        await port.setOutgoingInterface(address)
        await port.joinGroup(MDNS_GROUP, address)
        sock = getattr(port, "socket", None)
        if sock is not None and hasattr(socket, "IPPROTO_IP"):
            # Not Linux: group filtering is then the kernel's default.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        if not self.running or self.responder is None:
            return
        endpoint.joined = True
        endpoint.error = None
        endpoint.attempts = 0
        self.responder.add_interface(proto)
        self.log.info(
            "mDNS: listening on {interface} (group {group}, port {port})",
            interface=address,
            group=MDNS_GROUP,
            port=self.config.port,
        )
        self._report_health()

    def _bind_failed(self, failure: Any, endpoint: _Endpoint) -> None:
        endpoint.error = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        endpoint.joined = False
        if endpoint.port is not None:
            try:
                endpoint.port.stopListening()
            except Exception:
                self.log.failure("mDNS: closing a half-open socket failed")
            endpoint.port = None
        if endpoint.proto is not None and self.responder is not None:
            self.responder.remove_interface(endpoint.proto)
        endpoint.proto = None
        delay = min(MAX_RETRY_DELAY, float(2 ** min(endpoint.attempts - 1, 10)))
        self.log.warn(
            "mDNS: cannot listen on {interface}: {error}; retrying in {delay}s",
            interface=endpoint.spec.address,
            error=endpoint.error,
            delay=delay,
        )
        if self.running:
            endpoint.retry = self.reactor.callLater(delay, self._bind, endpoint)
        self._report_health()

    # ------------------------------------------------------------------
    # Bus and health

    def _on_route(self, envelope: Envelope[Any]) -> None:
        event = envelope.event
        if not isinstance(event, RoutePublished) or self.responder is None or not self.running:
            return
        if event.withdrawn:
            self.responder.withdraw(event.key())
            return
        try:
            spec = ServiceSpec.from_route(event)
        except InvalidService as e:
            self.invalid_routes += 1
            self.log.warn(
                "mDNS: not advertising route {route}: {error}", route=event.key(), error=str(e)
            )
            return
        self.responder.publish(spec)

    def _name_changed(self, kind: str, requested: str, claimed: str, reason: str) -> None:
        if self.bus is not None:
            self.bus.publish(
                MdnsNameChanged(kind=kind, requested=requested, claimed=claimed, reason=reason),
                source="mdns",
            )

    def _report_health(self) -> None:
        if self.health is None or not self.running:
            return
        for endpoint in self._endpoints.values():
            if endpoint.proto is not None and endpoint.joined:
                level, message, figures = endpoint.proto.health()
            else:
                level = HealthLevel.ERROR
                message = f"not listening: {endpoint.error or 'binding'}"
                figures = {"bind_attempts": float(endpoint.attempts)}
            self.health.report(endpoint.component, level, message, figures)


# --------------------------------------------------------------------------
# The null variant


@implementer(IService, IMdnsResponder)
@attrs.define(eq=False)
class NullResponder(Service):
    """The ``mdns=null`` subsystem: advertises nothing, answers nothing."""

    @classmethod
    def from_context(cls, ctx: Any) -> NullResponder:
        return cls()

    def host_name(self) -> str:
        return ""

    def advertised(self) -> Sequence[AdvertisedName]:
        return ()

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        return {}
