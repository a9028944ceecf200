# mypy: disable-error-code="no-untyped-call"
"""
One contract for every tunnel adapter (``ITunnel``): the ``stub`` and the
``ssh`` adapter (over the fake SSH server at its transport seam) must
behave alike for everything the remote manager relies on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.errors import InvalidCommand
from piccolod.events import HealthLevel
from piccolod.interfaces import ITunnel, TunnelForward, TunnelSpec, TunnelStatus
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.health import HealthTracker
from piccolod.remote.ssh import SSHTunnelService
from piccolod.remote.stub import StubTunnel
from piccolod.remote.testing import FakeSSHServer, ThreadlessReactor


def spec(name: str = "t1", *forwards: TunnelForward) -> TunnelSpec:
    return TunnelSpec(
        name,
        "tunnel.example",
        22,
        "piccolo",
        b"KEY",
        forwards=forwards
        or (
            TunnelForward("portal", "127.0.0.1", 0, "127.0.0.1", 8080),
            TunnelForward("app:a/b", "127.0.0.1", 0, "127.0.0.1", 35001),
            TunnelForward("https", "127.0.0.1", 443, "127.0.0.1", 8443),
        ),
    )


class TunnelContract:
    """Mixed into a SynchronousTestCase; ``make_tunnel`` builds the adapter."""

    def make_tunnel(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = ThreadlessReactor()
        self.health = HealthTracker(self.clock, MemoryEventBus(self.clock))
        self.tunnel = self.make_tunnel()
        self.seen: list[TunnelStatus] = []
        self.unwatch = self.tunnel.watch(self.seen.append)
        self.tunnel.startService()
        self.addCleanup(self.stop)  # type: ignore[attr-defined]

    def stop(self) -> None:
        d = maybeDeferred(self.tunnel.stopService)
        self.clock.advance(10)
        self.successResultOf(d)  # type: ignore[attr-defined]
        self.assertEqual(self.clock.getDelayedCalls(), [])  # type: ignore[attr-defined]

    def apply(self, *specs: TunnelSpec) -> None:
        self.tunnel.apply(list(specs))
        self.clock.advance(0)
        self.clock.advance(0)

    def test_provides_the_interface(self) -> None:
        """The adapter provides ITunnel and names its kind."""
        self.assertTrue(verifyObject(ITunnel, self.tunnel))  # type: ignore[attr-defined]
        self.assertIn(self.tunnel.kind, ("stub", "ssh"))  # type: ignore[attr-defined]

    def test_applied_tunnels_come_up_with_bound_ports(self) -> None:
        """Each applied tunnel is up, every forward active on a distinct non-zero port."""
        self.apply(spec("t2"), spec("t1"))
        statuses = self.tunnel.status()
        self.assertEqual([s.name for s in statuses], ["t1", "t2"])  # type: ignore[attr-defined]
        for status in statuses:
            self.assertEqual(status.state, "up")  # type: ignore[attr-defined]
            ports = [f.bound_port for f in status.forwards if f.state == "active"]
            self.assertEqual(len(ports), 3)  # type: ignore[attr-defined]
            self.assertEqual(len(set(ports)), 3)  # type: ignore[attr-defined]
            self.assertNotIn(0, ports)  # type: ignore[attr-defined]
            https = next(f for f in status.forwards if f.name == "https")
            self.assertEqual(https.bound_port, 443)  # type: ignore[attr-defined]
            level = self.health.component(f"remote.tunnel.{status.name}").level
            self.assertEqual(level, HealthLevel.OK)  # type: ignore[attr-defined]
        self.assertTrue(any(s.state == "up" for s in self.seen))  # type: ignore[attr-defined]

    def test_removed_tunnels_stop(self) -> None:
        """A tunnel left out of the specs stops: status, health and watchers say so."""
        self.apply(spec("t1"), spec("t2"))
        self.apply(spec("t1"))
        self.assertEqual([s.name for s in self.tunnel.status()], ["t1"])  # type: ignore[attr-defined]
        self.assertEqual(self.seen[-1].name, "t2")  # type: ignore[attr-defined]
        self.assertEqual(self.seen[-1].state, "stopped")  # type: ignore[attr-defined]
        components = [c.component for c in self.health.components()]
        self.assertEqual(components, ["remote.tunnel.t1"])  # type: ignore[attr-defined]
        self.apply()
        self.assertEqual(self.tunnel.status(), [])  # type: ignore[attr-defined]

    def test_forward_changes_show_in_status(self) -> None:
        """Retargeted and removed forwards are reflected in the status."""
        self.apply(spec())
        changed = spec("t1", TunnelForward("portal", "127.0.0.1", 0, "10.0.0.9", 9090))
        self.apply(changed)
        (status,) = self.tunnel.status()
        self.assertEqual([f.name for f in status.forwards], ["portal"])  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            (status.forwards[0].target_host, status.forwards[0].target_port), ("10.0.0.9", 9090)
        )

    def test_invalid_specs_change_nothing(self) -> None:
        """Duplicate names or bindings are refused before anything changes."""
        self.apply(spec())
        before = self.tunnel.status()
        clash = TunnelForward("x", "127.0.0.1", 443, "127.0.0.1", 1)
        for specs in ([spec(), spec()], [spec("t1", clash, TunnelForward("y", "127.0.0.1", 443))]):
            with self.assertRaises(InvalidCommand):  # type: ignore[attr-defined]
                self.tunnel.apply(specs)
        self.assertEqual(self.tunnel.status(), before)  # type: ignore[attr-defined]

    def test_watch_can_be_cancelled(self) -> None:
        """After the cancel function (idempotent), the observer hears nothing more."""
        self.unwatch()
        self.unwatch()
        self.apply(spec())
        self.assertEqual(self.seen, [])  # type: ignore[attr-defined]


class StubTunnelTests(TunnelContract, SynchronousTestCase):
    def make_tunnel(self) -> StubTunnel:
        return StubTunnel(self.clock, self.health)

    def test_records_what_would_be_exposed(self) -> None:
        """The stub keeps every applied spec and shows what would be reachable."""
        self.apply(spec())
        self.assertEqual(len(self.tunnel.applied), 1)
        exposed = self.tunnel.exposed()["t1"]
        self.assertEqual([f["name"] for f in exposed], ["app:a/b", "https", "portal"])


class SSHTunnelContractTests(TunnelContract, SynchronousTestCase):
    def make_tunnel(self) -> SSHTunnelService:
        self.server = FakeSSHServer(self.clock)
        return SSHTunnelService(
            self.clock,
            self.health,
            endpoint=self.server.endpoint,
            protocol_factory=self.server.protocol,
            connect_target=self.server.endpoint,
        )
