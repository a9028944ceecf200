"""
The services subsystem: persisted port allocation and the service manager
(proxies per listener on a memory reactor, the route table on the bus,
lock policy, leader routes, listen failures, commands).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.apps.store import MemoryStore
from piccolod.commands import (
    AllocatePorts,
    CommandContext,
    ExposeApp,
    ExposedListener,
    ListServices,
    ReleasePorts,
    WithdrawApp,
)
from piccolod.errors import Conflict, InvalidCommand, Locked
from piccolod.events import HealthLevel, LockState, LockStateChanged, RoutePublished
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.health import HealthTracker
from piccolod.services.ports import PREFIX, PortAllocator, PortRange
from piccolod.services.proxy import HTTPProxyFactory, TCPProxyFactory
from piccolod.services.service import ServiceManager, leader_host, service_type
from piccolod.testing.bus import FakeEventBus

HTTP = ExposedListener(listener="web", protocol="http")
RAW = ExposedListener(listener="db", protocol="raw", remote_ports=())


class _Reactor(MemoryReactorClock):
    """A memory reactor whose ports in ``busy`` cannot be listened on."""

    def __init__(self) -> None:
        super().__init__()
        self.busy: set[int] = set()

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = _Reactor()
        self.bus = FakeEventBus(self.reactor)
        self.dispatcher = CommandDispatcher(self.reactor, self.bus, log_successes=False)
        self.store = MemoryStore(self.dispatcher).register()
        self.health = HealthTracker(self.reactor, self.bus)
        self.unlock()

    def unlock(self) -> None:
        self.bus.publish(LockStateChanged(state=LockState.UNLOCKED))
        self.bus.flush()

    def lock(self) -> None:
        self.bus.publish(LockStateChanged(state=LockState.LOCKED))
        self.bus.flush()

    def do(self, command: Any) -> Any:
        d = self.dispatcher.dispatch(command, CommandContext())
        self.reactor.advance(0)
        return self.successResultOf(d)

    def fails(self, command: Any, *types: type[BaseException]) -> BaseException:
        d = self.dispatcher.dispatch(command, CommandContext())
        self.reactor.advance(0)
        return self.failureResultOf(d, *types).value


class PortAllocatorTests(Base):
    def allocator(self, **kwargs: Any) -> PortAllocator:
        return PortAllocator(self.dispatcher, **kwargs)

    def allocate(self, allocator: PortAllocator, app: str, *listeners: str) -> Any:
        from twisted.internet.defer import Deferred

        return self.successResultOf(Deferred.fromCoroutine(allocator.allocate(app, listeners)))

    def test_allocations_are_persisted_and_stable(self) -> None:
        """Ports are stored, kept on re-allocation and read back by a new allocator."""
        first = self.allocator()
        ports = self.allocate(first, "blog", "web", "ssh")
        self.assertEqual(ports["web"], {"backend": 15000, "public": 35000})
        self.assertEqual(ports["ssh"], {"backend": 15001, "public": 35001})
        self.assertEqual(self.store.settings[PREFIX + "blog"], ports)
        writes = self.store.writes
        self.assertEqual(self.allocate(first, "blog", "web", "ssh"), ports)
        self.assertEqual(self.store.writes, writes)
        second = self.allocator()
        self.assertEqual(self.allocate(second, "blog", "web", "ssh"), ports)
        other = self.allocate(second, "wiki", "web")
        self.assertNotIn(other["web"]["backend"], {15000, 15001})
        self.assertNotIn(other["web"]["public"], {35000, 35001})

    def test_busy_ports_are_skipped_and_ranges_exhaust(self) -> None:
        """A port in use on the host is skipped; a full range is a Conflict."""
        allocator = self.allocator(
            backend=PortRange(20000, 20002),
            public=PortRange(30000, 30002),
            is_free_backend=lambda port: port != 20000,
        )
        self.assertEqual(self.allocate(allocator, "a", "x")["x"]["backend"], 20001)
        from twisted.internet.defer import Deferred

        d = Deferred.fromCoroutine(allocator.allocate("b", ["y"]))
        self.failureResultOf(d, Conflict)
        self.assertNotIn(PREFIX + "b", self.store.settings)

    def test_dropped_listeners_and_released_apps_free_their_ports(self) -> None:
        """Ports of a listener no longer named, and of a released app, are reused."""
        allocator = self.allocator(backend=PortRange(20000, 20002), public=PortRange(30000, 30002))
        self.allocate(allocator, "a", "x", "y")
        self.allocate(allocator, "a", "x")
        self.assertEqual(
            self.allocate(allocator, "b", "z")["z"], {"backend": 20001, "public": 30001}
        )
        from twisted.internet.defer import Deferred

        self.successResultOf(Deferred.fromCoroutine(allocator.release("a")))
        self.assertNotIn(PREFIX + "a", self.store.settings)
        self.assertEqual(
            self.allocate(allocator, "c", "w")["w"], {"backend": 20000, "public": 30000}
        )

    def test_a_locked_store_fails_allocation(self) -> None:
        """While the store is locked allocation fails with Locked and hands out nothing."""
        from twisted.internet.defer import Deferred

        allocator = self.allocator()
        self.store.locked = True
        self.failureResultOf(Deferred.fromCoroutine(allocator.allocate("a1", ["x"])), Locked)
        self.store.locked = False
        self.assertEqual(self.allocate(allocator, "a1", "x")["x"]["backend"], 15000)

    def test_bad_ranges(self) -> None:
        """A port range must be ascending within 1-65535."""
        self.assertRaises(InvalidCommand, PortRange, 10, 10)
        self.assertRaises(InvalidCommand, PortRange, 0, 10)


class ServiceManagerTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.manager = ServiceManager(
            reactor=self.reactor,
            bus=self.bus,
            dispatcher=self.dispatcher,
            health=self.health,
            bind="127.0.0.1",
        )
        self.manager.startService()
        self.bus.flush()
        self.addCleanup(self.manager.stopService)

    def listening(self) -> dict[int, Any]:
        return {port: factory for port, factory, _backlog, _interface in self.reactor.tcpServers}

    def open_ports(self) -> list[int]:
        return sorted(r.public_port for r in self.manager.routes())

    def test_expose_listens_and_publishes_routes(self) -> None:
        """Each listener gets a proxy of its kind on its public port and a retained route."""
        result = self.do(ExposeApp(app="blog", listeners=(HTTP, RAW)))
        self.assertEqual([r["listener"] for r in result.routes], ["web", "db"])
        servers = self.listening()
        self.assertIsInstance(servers[35000], HTTPProxyFactory)
        self.assertIsInstance(servers[35001], TCPProxyFactory)
        self.bus.flush()
        routes = {e.listener: e for e in self.bus.events(RoutePublished.topic)}  # type: ignore[attr-defined]
        self.assertEqual(routes["web"].service_type, "_http._tcp")
        self.assertEqual(routes["db"].service_type, "_piccolo-tcp._tcp")
        self.assertIn(("path", "/"), routes["web"].txt)
        self.assertIn(("remote_ports", ""), routes["db"].txt)
        self.assertEqual(servers[35000].target(), ("127.0.0.1", 15000))
        listed = self.do(ListServices())
        self.assertEqual(listed.allocations["blog"]["web"], {"backend": 15000, "public": 35000})

    def test_expose_is_idempotent_and_drops_unnamed_listeners(self) -> None:
        """Exposing again keeps the ports; listeners left out are withdrawn."""
        self.do(ExposeApp(app="blog", listeners=(HTTP, RAW)))
        published = len(self.bus.published())
        self.do(ExposeApp(app="blog", listeners=(HTTP, RAW)))
        self.assertEqual(len(self.bus.published()), published)
        self.do(ExposeApp(app="blog", listeners=(HTTP,)))
        self.assertEqual(self.open_ports(), [35000])
        last = self.bus.events(RoutePublished.topic)[-1]
        self.assertTrue(last.withdrawn)  # type: ignore[attr-defined]

    def test_leader_mode_keeps_the_port_and_changes_the_target(self) -> None:
        """A follower's route proxies to the leader's public port without re-listening."""
        self.do(ExposeApp(app="blog", listeners=(HTTP,)))
        factory = self.listening()[35000]
        listens = len(self.reactor.tcpServers)
        self.do(
            ExposeApp(
                app="blog",
                listeners=(HTTP,),
                mode="leader",
                leader_address="http://[2001:db8::1]:80",
            )
        )
        self.assertEqual(len(self.reactor.tcpServers), listens)
        self.assertEqual(factory.target(), ("2001:db8::1", 35000))
        route = self.bus.events(RoutePublished.topic)[-1]
        self.assertIn(("mode", "leader"), route.txt)  # type: ignore[attr-defined]
        self.assertRaises(InvalidCommand, ExposeApp, app="blog", mode="leader")

    def test_lock_closes_every_proxy(self) -> None:
        """On lock every route is withdrawn; exposing while locked fails with Locked."""
        self.do(ExposeApp(app="blog", listeners=(HTTP, RAW)))
        self.do(ExposeApp(app="wiki", listeners=(HTTP,)))
        self.lock()
        self.assertEqual(self.manager.routes(), [])
        withdrawn = [e for e in self.bus.events(RoutePublished.topic) if e.withdrawn]  # type: ignore[attr-defined]
        self.assertEqual(len(withdrawn), 3)
        self.assertIsInstance(self.fails(ExposeApp(app="blog", listeners=(HTTP,))), Locked)
        self.unlock()
        self.do(ExposeApp(app="blog", listeners=(HTTP,)))
        self.assertEqual(self.open_ports(), [35000])

    def test_allocate_needs_unlocked_storage(self) -> None:
        """services.allocate is refused with Locked while storage is locked."""
        self.lock()
        self.assertIsInstance(self.fails(AllocatePorts(app="a1", listeners=("x",))), Locked)

    def test_withdraw_and_release(self) -> None:
        """Withdraw closes an app's proxies and keeps its ports; release forgets them."""
        self.do(ExposeApp(app="blog", listeners=(HTTP,)))
        self.do(WithdrawApp(app="blog"))
        self.assertEqual(self.manager.routes(), [])
        self.assertIn(PREFIX + "blog", self.store.settings)
        self.do(WithdrawApp(app="blog"))
        self.do(ReleasePorts(app="blog"))
        self.assertNotIn(PREFIX + "blog", self.store.settings)

    def test_a_busy_public_port_is_reported(self) -> None:
        """A public port that cannot be listened on is a Conflict and a health warning."""
        self.reactor.busy.add(35000)
        error = self.fails(ExposeApp(app="blog", listeners=(HTTP,)), Conflict)
        self.assertIn("cannot listen on 35000", str(error))
        self.assertEqual(self.health.component("services").level, HealthLevel.WARN)
        self.reactor.busy.clear()
        self.do(ExposeApp(app="blog", listeners=(HTTP,)))
        self.assertEqual(self.health.component("services").level, HealthLevel.OK)

    def test_stop_withdraws_and_unregisters(self) -> None:
        """Stopping the manager closes every proxy and unregisters its commands."""
        self.do(ExposeApp(app="blog", listeners=(HTTP,)))
        self.manager.stopService()
        self.assertEqual(self.manager.routes(), [])
        self.assertNotIn("services.expose", self.dispatcher.names())

    def test_helpers(self) -> None:
        """Service types and leader hosts are derived as documented."""
        self.assertEqual(service_type("websocket"), "_http._tcp")
        self.assertEqual(leader_host("http://10.1.2.3:8080"), "10.1.2.3")
        self.assertEqual(leader_host("node-b:8080"), "node-b")
        self.assertRaises(InvalidCommand, leader_host, "http://")
