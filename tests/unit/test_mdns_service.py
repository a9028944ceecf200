"""
Unit tests for the mDNS subsystem services and plugins: socket options,
health per interface, bind retries, routes from the bus, name events, stop
with goodbyes, configuration, the null variant and plugin selection.
"""

from __future__ import annotations

import ipaddress
import types
from typing import Any

from twisted.application.service import IService
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.errors import ConfigError
from piccolod.events import HealthLevel, MdnsNameChanged, RoutePublished
from piccolod.kernel import plugins
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.plugins import Catalogue, SubsystemContext
from piccolod.mdns.service import (
    IMdnsResponder,
    InterfaceSpec,
    MdnsConfig,
    MulticastResponderService,
    NullResponder,
    portal_port_from,
)
from piccolod.mdns.testing import FakeMulticastReactor, multicast_join_error, query, written
from piccolod.testing.bus import FakeEventBus

HOST = b"piccolo.local"
LEGACY = ("127.0.0.9", 40000)


def run(reactor: FakeMulticastReactor, seconds: float) -> None:
    for _ in range(round(seconds * 64)):
        reactor.advance(1 / 64)


class Setup:
    """A service on a fake multicast reactor with a recording bus and a health tracker."""

    def __init__(self, **config: Any) -> None:
        self.reactor = FakeMulticastReactor()
        self.bus = FakeEventBus(self.reactor)
        self.health = HealthTracker(self.reactor, self.bus)
        extra = {k: config.pop(k) for k in ("interfaces_source",) if k in config}
        if "interfaces_source" not in extra:
            config.setdefault("interfaces", ["127.0.0.1"])  # tests pin loopback
        self.service = MulticastResponderService(
            reactor=self.reactor,
            config=MdnsConfig.from_section(config),
            bus=self.bus,
            health=self.health,
            portal_port=8080,
            rand=lambda: 0.5,
            **extra,
        )

    def start(self) -> None:
        self.service.startService()
        self.bus.flush()

    def settle(self) -> None:
        self.start()
        run(self.reactor, 5)
        self.bus.flush()

    def port(self, index: int = 0) -> Any:
        return self.reactor.ports[index]

    def health_of(self, address: str) -> tuple[HealthLevel, str]:
        c = self.health.component(f"mdns:{address}")
        return c.level, c.message

    def names(self) -> list[MdnsNameChanged]:
        return [e for e in self.bus.events("mdns.name") if isinstance(e, MdnsNameChanged)]


class SocketTests(SynchronousTestCase):
    def test_one_socket_per_interface_with_mdns_options(self) -> None:
        """Each address gets a socket on the group, TTL 255, loopback on, joined on it."""
        s = Setup(interfaces=["127.0.0.1", "192.0.2.1/24"])
        s.start()
        self.assertEqual(len(s.reactor.ports), 2)
        for port, address in zip(s.reactor.ports, ["127.0.0.1", "192.0.2.1"], strict=True):
            self.assertEqual((port.port, port.interface), (5353, "224.0.0.251"))
            self.assertTrue(port.listen_multiple)
            self.assertEqual((port.ttl, port.loopback, port.outgoing), (255, 1, address))
            self.assertEqual(port.groups, [("224.0.0.251", address)])
            self.assertGreater(port.max_packet_size, 9000)
        self.assertEqual(s.port(1).protocol.network, ipaddress.IPv4Network("192.0.2.0/24"))
        self.addCleanup(s.service.stopService)

    def test_health_per_interface(self) -> None:
        """Each interface reports its own health: probing, then answering."""
        s = Setup(interfaces=["127.0.0.1", "192.0.2.1"])
        s.start()
        for address in ("127.0.0.1", "192.0.2.1"):
            self.assertEqual(s.health_of(address), (HealthLevel.OK, "probing piccolo.local"))
        run(s.reactor, 1)
        for address in ("127.0.0.1", "192.0.2.1"):
            self.assertEqual(s.health_of(address), (HealthLevel.OK, "answering as piccolo.local"))
        figures = dict(s.health.component("mdns:127.0.0.1").figures)
        self.assertGreaterEqual(figures["probes_sent"], 3)
        self.addCleanup(s.service.stopService)

    def test_bind_failure_is_reported_and_retried(self) -> None:
        """A socket that cannot be bound is ERROR in health and retried after a second."""
        s = Setup()
        s.reactor.fail_listen = 1
        s.start()
        level, message = s.health_of("127.0.0.1")
        self.assertEqual(level, HealthLevel.ERROR)
        self.assertIn("CannotListenError", message)
        run(s.reactor, 1)
        self.assertEqual(len(s.reactor.listening()), 1)
        run(s.reactor, 1)
        self.assertEqual(s.health_of("127.0.0.1")[0], HealthLevel.OK)
        self.addCleanup(s.service.stopService)

    def test_join_failure_closes_the_socket_and_retries(self) -> None:
        """A failed group join closes the half-open socket, reports ERROR and retries."""
        s = Setup()
        s.reactor.join_error = multicast_join_error()
        s.start()
        self.assertEqual(s.reactor.listening(), [])
        self.assertIn("MulticastJoinError", s.health_of("127.0.0.1")[1])
        s.reactor.join_error = None
        run(s.reactor, 2)
        self.assertEqual(len(s.reactor.listening()), 1)
        self.assertEqual(s.health_of("127.0.0.1")[0], HealthLevel.OK)
        self.addCleanup(s.service.stopService)

    def test_wildcard_uses_the_system_interface_list(self) -> None:
        """interfaces = ['*'] serves every interface the system lists, with its prefix."""
        net = ipaddress.IPv4Network("10.200.0.0/24")
        s = Setup(interfaces=["*"], interfaces_source=lambda: [InterfaceSpec("10.200.0.1", net)])
        s.start()
        (port,) = s.reactor.ports
        self.assertEqual(port.outgoing, "10.200.0.1")
        self.assertEqual(port.protocol.network, net)
        self.addCleanup(s.service.stopService)


class BusTests(SynchronousTestCase):
    def test_claims_publish_name_events(self) -> None:
        """Claiming the host and portal names publishes MdnsNameChanged for each."""
        s = Setup()
        s.settle()
        self.assertEqual(
            sorted((e.kind, e.claimed, e.reason) for e in s.names()),
            [
                ("host", "piccolo.local", "claimed"),
                ("service", "piccolo._http._tcp.local", "claimed"),
            ],
        )
        self.assertEqual(s.service.host_name(), "piccolo.local")
        self.addCleanup(s.service.stopService)

    def test_routes_are_advertised_and_withdrawn(self) -> None:
        """A RoutePublished is probed and announced; its withdrawal sends goodbyes."""
        s = Setup()
        s.settle()
        written(s.port())
        s.bus.publish(RoutePublished(app="gitea", listener="web", port=9001, txt=(("path", "/"),)))
        s.bus.flush()
        run(s.reactor, 2)
        records = [rr for m, _ in written(s.port()) for rr in m.answers]
        srv = [rr for rr in records if rr.type == dns.SRV]
        self.assertEqual(
            {(rr.name.name, rr.payload.port) for rr in srv}, {(b"gitea-web._http._tcp.local", 9001)}
        )
        advertised = {a.key: a for a in s.service.advertised()}
        self.assertEqual(advertised["gitea/web"].state, "announcing")
        s.bus.publish(RoutePublished(app="gitea", listener="web", port=9001, withdrawn=True))
        s.bus.flush()
        goodbye = [rr for m, _ in written(s.port()) for rr in m.answers]
        self.assertTrue(goodbye)
        self.assertTrue(all(rr.ttl == 0 for rr in goodbye))
        self.assertIn(
            (b"gitea-web._http._tcp.local", dns.SRV), {(rr.name.name, rr.type) for rr in goodbye}
        )
        self.assertIn(
            ("service", "gitea-web._http._tcp.local", ""),
            [(e.kind, e.requested, e.claimed) for e in s.names()],
        )
        self.addCleanup(s.service.stopService)

    def test_retained_routes_are_replayed_at_start(self) -> None:
        """Routes published before the responder started are advertised too."""
        s = Setup()
        s.bus.publish(RoutePublished(app="wiki", listener="wiki", port=9002))
        s.settle()
        s.port().protocol.datagramReceived(query((b"wiki._http._tcp.local", dns.SRV)), LEGACY)
        ((message, _),) = written(s.port())[-1:]
        self.assertEqual([rr.payload.port for rr in message.answers], [9002])
        self.addCleanup(s.service.stopService)

    def test_invalid_routes_are_counted_not_advertised(self) -> None:
        """A route with an unusable service type is logged, counted and skipped."""
        s = Setup()
        s.settle()
        s.bus.publish(RoutePublished(app="x", listener="y", port=1, service_type="bogus"))
        s.bus.flush()
        self.assertEqual(s.service.invalid_routes, 1)
        self.assertNotIn("x/y", {a.key for a in s.service.advertised()})
        self.addCleanup(s.service.stopService)


class StopTests(SynchronousTestCase):
    def test_stop_sends_goodbyes_then_closes(self) -> None:
        """stopService multicasts TTL-0 goodbyes, closes sockets and leaves no timer."""
        s = Setup()
        s.settle()
        port = s.port()
        written(port)
        d = s.service.stopService()
        self.assertIsNone(self.successResultOf(d))
        goodbye = [rr for m, _ in written(port) for rr in m.answers]
        self.assertIn((HOST, dns.A), {(rr.name.name, rr.type) for rr in goodbye})
        self.assertTrue(all(rr.ttl == 0 for rr in goodbye))
        self.assertFalse(port.listening)
        self.assertEqual(s.reactor.getDelayedCalls(), [])
        self.assertEqual(
            [c.component for c in s.health.components() if c.component.startswith("mdns:")], []
        )
        self.assertIsNone(self.successResultOf(s.service.stopService()))

    def test_routes_after_stop_are_ignored(self) -> None:
        """Events arriving after stop advertise nothing."""
        s = Setup()
        s.settle()
        self.successResultOf(s.service.stopService())
        s.bus.publish(RoutePublished(app="late", listener="l", port=1))
        s.bus.flush()
        self.assertEqual(s.reactor.getDelayedCalls(), [])


class ConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """An empty section gives piccolo on every non-loopback interface, rate limited."""
        c = MdnsConfig.from_section({})
        self.assertEqual((c.hostname, c.interfaces, c.port), ("piccolo", ("*",), 5353))
        self.assertEqual((c.rate_limit_per_s, c.rate_limit_burst), (20.0, 40.0))

    def test_every_error_is_reported_at_once(self) -> None:
        """Bad values are collected into one ConfigError."""
        with self.assertRaises(ConfigError) as e:
            MdnsConfig.from_section(
                {
                    "hostname": "bad name",
                    "interfaces": ["300.1.1.1", "fe80::1"],
                    "ipv6_addresses": ["1.2.3.4"],
                    "portal_port": 70000,
                    "rate_limit_per_s": -1,
                    "publish_portal": "yes",
                }
            )
        self.assertEqual(len(e.exception.errors), 7)

    def test_portal_port_from_api_address(self) -> None:
        """The portal port comes from the kernel's API address."""
        self.assertEqual(portal_port_from("http://127.0.0.1:8080"), 8080)
        self.assertEqual(portal_port_from("http://[::1]:9999/api"), 9999)
        self.assertEqual(portal_port_from("https://box.example"), 443)
        self.assertEqual(portal_port_from("http://box"), 80)
        self.assertIsNone(portal_port_from(""))
        self.assertIsNone(portal_port_from("tcp:8080"))
        self.assertIsNone(portal_port_from("http://x:99999"))

    def test_interface_spec_parsing(self) -> None:
        """Interfaces are IPv4 addresses with an optional prefix."""
        spec = InterfaceSpec.parse("10.0.0.5/24")
        self.assertEqual((spec.address, str(spec.network)), ("10.0.0.5", "10.0.0.0/24"))
        self.assertIsNone(InterfaceSpec.parse("10.0.0.5").network)
        with self.assertRaises(ValueError):
            InterfaceSpec.parse("::1")


def context(variant: str, section: dict[str, Any], api: str = "http://127.0.0.1:8080") -> Any:
    reactor = FakeMulticastReactor()
    bus = FakeEventBus(reactor)
    kernel = types.SimpleNamespace(
        reactor=reactor, bus=bus, health=HealthTracker(reactor, bus), api_address=api
    )
    return SubsystemContext(slot="mdns", variant=variant, kernel=kernel, config=section)  # type: ignore[arg-type]


class PluginTests(SynchronousTestCase):
    def catalogue(self) -> Catalogue:
        return Catalogue.build(plugins.discover())

    def test_both_variants_are_found_and_opt_in(self) -> None:
        """The multicast and null variants are discovered and not selected by default."""
        catalogue = self.catalogue()
        self.assertEqual(catalogue.variants("mdns"), ["multicast", "null"])
        self.assertNotIn("mdns", plugins.select(catalogue, {}, {}))
        chosen = plugins.select(
            catalogue, {"mdns": {"variant": "multicast", "hostname": "box"}}, {}
        )
        self.assertEqual(chosen["mdns"][1]["hostname"], "box")
        self.assertEqual(plugins.select(catalogue, {}, {"mdns": "null"})["mdns"][0].variant, "null")

    def test_unknown_keys_are_refused_by_selection(self) -> None:
        """A key the multicast variant does not declare is a config error."""
        with self.assertRaises(ConfigError):
            plugins.select(self.catalogue(), {"mdns": {"variant": "multicast", "nope": 1}}, {})

    def test_multicast_plugin_builds_a_verified_service(self) -> None:
        """The multicast plugin builds an IService + IMdnsResponder with the API's port."""
        plugin = self.catalogue().get("mdns", "multicast")
        section = dict(plugin.config_keys)
        service = plugin.build(context("multicast", section, "http://127.0.0.1:8123"))
        plugins.verify(plugin, service)
        assert isinstance(service, MulticastResponderService)
        self.assertEqual(service.portal_port, 8123)
        self.assertEqual(service.host_name(), "")

    def test_explicit_portal_port_wins(self) -> None:
        """portal_port in the section overrides the API address's port."""
        plugin = self.catalogue().get("mdns", "multicast")
        section = {**plugin.config_keys, "portal_port": 80}
        service = plugin.build(context("multicast", section))
        assert isinstance(service, MulticastResponderService)
        self.assertEqual(service.portal_port, 80)

    def test_bad_section_fails_the_build(self) -> None:
        """A bad value in the section is a ConfigError at build time."""
        plugin = self.catalogue().get("mdns", "multicast")
        with self.assertRaises(ConfigError):
            plugin.build(context("multicast", {**plugin.config_keys, "hostname": "-x-"}))

    def test_null_variant(self) -> None:
        """The null variant is a service that advertises nothing."""
        plugin = self.catalogue().get("mdns", "null")
        service = plugin.build(context("null", {}))
        plugins.verify(plugin, service)
        assert isinstance(service, NullResponder)
        verifyObject(IService, service)
        verifyObject(IMdnsResponder, service)
        service.startService()
        self.assertEqual(
            (service.host_name(), list(service.advertised()), service.stats()), ("", [], {})
        )
        service.stopService()

    def test_multicast_service_provides_its_interfaces(self) -> None:
        """MulticastResponderService passes verifyObject and reports per-interface stats."""
        s = Setup()
        verifyObject(IService, s.service)
        verifyObject(IMdnsResponder, s.service)
        s.settle()
        stats = s.service.stats()
        self.assertEqual(list(stats), ["127.0.0.1"])
        self.assertGreaterEqual(stats["127.0.0.1"]["probes_sent"], 3)
        self.addCleanup(s.service.stopService)
