"""Tests for piccolod.consensus.single_node.SingleNodeConsensus and its plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.commands import LeadershipResult, ReleaseResource, TrackResource
from piccolod.consensus import CONTROL_PLANE, SingleNodeConsensus
from piccolod.errors import (
    ConfigError,
    DuplicateRegistration,
    InvalidCommand,
    NotReady,
    UnknownCommand,
)
from piccolod.events import LeadershipRoleChanged, Role
from piccolod.interfaces import IConsensus
from piccolod.kernel import plugins
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.kernel.plugins import Catalogue, SubsystemContext
from piccolod.kernel.runtime import Kernel

NODE = "node-a"
ADDRESS = "http://192.0.2.1:8080"


class _NoSupervisor:
    """The supervisor is not used by this subsystem."""


def make_context(
    config: dict[str, Any] | None = None, registry_node: str = NODE
) -> SubsystemContext:
    clock = Clock()
    bus = MemoryEventBus(clock)
    registry = LeadershipRegistry(bus, registry_node)
    kernel = Kernel(
        reactor=clock,
        bus=bus,
        registry=registry,
        dispatcher=CommandDispatcher(clock, bus, registry=registry),
        health=HealthTracker(clock, bus),
        supervisor=_NoSupervisor(),  # type: ignore[arg-type]
        node_id=NODE,
        api_address=ADDRESS,
        state_dir=Path("/nonexistent"),
    )
    return SubsystemContext(
        slot="consensus",
        variant="single-node",
        kernel=kernel,
        config=config if config is not None else {"resources": []},
    )


class SingleNodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ctx = make_context({"resources": ["app:x"]})
        self.kernel = self.ctx.kernel
        self.registry = self.kernel.registry
        self.consensus = SingleNodeConsensus.from_context(self.ctx)
        self.addCleanup(self.assert_no_timers)
        self.events: list[LeadershipRoleChanged] = []
        self.kernel.bus.subscribe(
            LeadershipRoleChanged.topic, lambda env: self.events.append(env.event)
        )

    def assert_no_timers(self) -> None:
        self.settle()
        self.assertEqual(self.kernel.reactor.getDelayedCalls(), [])

    def start(self) -> None:
        self.consensus.startService()
        self.addCleanup(self.consensus.stopService)

    def settle(self) -> None:
        self.kernel.reactor.advance(0)

    def test_provides_interfaces(self) -> None:
        """The service verifiably provides IService and IConsensus, with the node's id."""
        self.assertTrue(verifyObject(IService, self.consensus))
        self.assertTrue(verifyObject(IConsensus, self.consensus))
        self.assertEqual(self.consensus.node_id, NODE)

    def test_start_claims_control_plane_and_configured(self) -> None:
        """Start makes this node leader of control-plane and configured resources at term 1."""
        self.assertFalse(self.registry.is_leader(CONTROL_PLANE))
        self.start()
        for resource in (CONTROL_PLANE, "app:x"):
            state = self.registry.state(resource)
            self.assertEqual(
                (state.role, state.term, state.leader_id, state.leader_address),
                (Role.LEADER, 1, NODE, ADDRESS),
            )
        self.assertEqual(self.consensus.tracked(), [CONTROL_PLANE, "app:x"])
        self.settle()
        self.assertEqual([e.resource for e in self.events], [CONTROL_PLANE, "app:x"])
        self.successResultOf(self.registry.when_leader(CONTROL_PLANE))

    def test_start_takes_next_term(self) -> None:
        """Start claims the term after the registry's current one."""
        self.registry.update(CONTROL_PLANE, Role.FOLLOWER, 6, "node-b")
        self.start()
        self.assertEqual(self.registry.state(CONTROL_PLANE).term, 7)
        self.assertTrue(self.registry.is_leader(CONTROL_PLANE))

    def test_track_makes_leader(self) -> None:
        """track leads a new resource at once and lists it; a second track changes nothing."""
        self.start()
        state = self.successResultOf(self.consensus.track("app:y"))
        self.assertEqual((state.resource, state.role, state.term), ("app:y", Role.LEADER, 1))
        self.assertIn("app:y", self.consensus.tracked())
        self.settle()
        published = len(self.events)
        again = self.successResultOf(self.consensus.track("app:y"))
        self.assertEqual(again, state)
        self.settle()
        self.assertEqual(len(self.events), published)

    def test_track_refused_when_stopped_or_bad(self) -> None:
        """track fails with NotReady before start and InvalidCommand for a bad name."""
        self.failureResultOf(self.consensus.track("app:y"), NotReady)
        self.assertNotIn("app:y", self.consensus.tracked())
        self.start()
        self.failureResultOf(self.consensus.track(""), InvalidCommand)
        self.failureResultOf(self.consensus.release(" "), InvalidCommand)

    def test_release_steps_down_to_unknown(self) -> None:
        """release makes the role UNKNOWN at the same term, untracks, and is idempotent."""
        self.start()
        self.successResultOf(self.consensus.release("app:x"))
        state = self.registry.state("app:x")
        self.assertEqual((state.role, state.term, state.leader_id), (Role.UNKNOWN, 1, None))
        self.assertNotIn("app:x", self.consensus.tracked())
        self.successResultOf(self.consensus.release("app:x"))
        self.successResultOf(self.consensus.release("never-tracked"))
        self.assertEqual(self.registry.role("never-tracked"), Role.UNKNOWN)

    def test_track_after_release_takes_new_term(self) -> None:
        """Tracking a released resource again claims a greater term."""
        self.start()
        self.successResultOf(self.consensus.release("app:x"))
        state = self.successResultOf(self.consensus.track("app:x"))
        self.assertEqual((state.role, state.term), (Role.LEADER, 2))

    def test_commands(self) -> None:
        """consensus.track and consensus.release are served through the dispatcher."""
        self.start()
        dispatcher = self.kernel.dispatcher
        self.assertEqual(
            self.successResultOf(dispatcher.dispatch(TrackResource("app:z"))),
            LeadershipResult(resource="app:z", role="leader", term=1, leader_id=NODE),
        )
        self.assertEqual(
            self.successResultOf(dispatcher.dispatch(ReleaseResource("app:z"))),
            LeadershipResult(resource="app:z", role="unknown", term=1, leader_id=None),
        )
        self.assertFalse(self.registry.is_leader("app:z"))

    def test_stop_steps_down_and_unregisters(self) -> None:
        """Stop makes every tracked role UNKNOWN and removes the command handlers."""
        self.consensus.startService()
        self.successResultOf(self.consensus.track("app:y"))
        self.successResultOf(self.consensus.stopService())
        for resource in (CONTROL_PLANE, "app:x", "app:y"):
            self.assertEqual(self.registry.role(resource), Role.UNKNOWN)
            self.assertEqual(self.registry.state(resource).term, 1)
        self.failureResultOf(
            self.kernel.dispatcher.dispatch(TrackResource("app:q")), UnknownCommand
        )
        self.successResultOf(self.consensus.stopService())

    def test_restart_reclaims_with_greater_terms(self) -> None:
        """A restart leads every tracked resource again, each at a greater term."""
        self.consensus.startService()
        self.successResultOf(self.consensus.track("app:y"))
        self.successResultOf(self.consensus.stopService())
        self.start()
        for resource in (CONTROL_PLANE, "app:x", "app:y"):
            state = self.registry.state(resource)
            self.assertEqual((state.role, state.term), (Role.LEADER, 2))

    def test_start_twice_is_harmless(self) -> None:
        """A second startService neither re-registers handlers nor bumps terms."""
        self.start()
        self.consensus.startService()
        self.assertEqual(self.registry.state(CONTROL_PLANE).term, 1)

    def test_start_fails_cleanly_on_taken_command(self) -> None:
        """If a consensus command is already registered, start raises and claims nothing."""
        self.kernel.dispatcher.register(ReleaseResource, lambda cmd, ctx: None)
        self.assertRaises(DuplicateRegistration, self.consensus.startService)
        self.assertFalse(self.consensus.running)
        self.assertFalse(self.registry.is_leader(CONTROL_PLANE))
        self.assertNotIn(TrackResource.name, self.kernel.dispatcher.names())

    def test_bad_config(self) -> None:
        """Bad `resources` values or a registry of another node are ConfigErrors."""
        for resources in ("app:x", [""], [3], None):
            self.assertRaises(
                ConfigError,
                SingleNodeConsensus.from_context,
                make_context({"resources": resources}),
            )
        self.assertRaises(
            ConfigError, SingleNodeConsensus.from_context, make_context(registry_node="other")
        )

    def test_direct_construction_validates(self) -> None:
        """Constructing without a registry, or with a bad resource, is refused."""
        self.assertRaises(TypeError, SingleNodeConsensus, object())
        self.assertRaises(InvalidCommand, SingleNodeConsensus, self.registry, resources=[""])


class PluginTests(SynchronousTestCase):
    def test_plugin_is_discovered_and_builds(self) -> None:
        """The consensus=single-node drop-in is the default and builds a verified service."""
        catalogue = Catalogue.build(plugins.discover())
        plugin = catalogue.get("consensus", "single-node")
        self.assertTrue(getattr(plugin, "default", False))
        self.assertEqual(dict(plugin.config_keys), {"resources": []})
        self.assertEqual(tuple(plugin.provides), (IConsensus,))
        chosen = plugins.select(catalogue, {"consensus": {"resources": ["app:x"]}}, {})
        selected, section = chosen["consensus"]
        self.assertIs(selected, plugin)
        service = plugin.build(make_context(section))
        plugins.verify(plugin, service)
        self.assertIsInstance(service, SingleNodeConsensus)
        self.assertEqual(list(IConsensus(service).tracked()), [CONTROL_PLANE, "app:x"])
