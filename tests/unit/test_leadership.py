"""Tests for piccolod.kernel.leadership.LeadershipRegistry."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.errors import InvalidCommand, NotLeader, StaleTerm
from piccolod.events import LeadershipRoleChanged, Role
from piccolod.interfaces import ILeadershipRegistry, LeadershipState
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.testing.bus import FakeEventBus

NODE = "node-a"


class RecordingBus(FakeEventBus):
    """The shipped fake bus on its own clock (delivery is not under test here)."""

    def __init__(self) -> None:
        super().__init__(Clock())

    def events(self) -> list[LeadershipRoleChanged]:
        return [e.event for e in self.published() if isinstance(e.event, LeadershipRoleChanged)]


class RegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bus = RecordingBus()
        self.registry = LeadershipRegistry(self.bus, NODE)

    def test_provides_interface(self) -> None:
        """The registry verifiably provides ILeadershipRegistry."""
        self.assertTrue(verifyObject(ILeadershipRegistry, self.registry))
        self.assertEqual(self.registry.node_id, NODE)

    def test_unknown_resource_defaults(self) -> None:
        """A resource never written is UNKNOWN at term 0, not a leader and not listed."""
        self.assertIs(self.registry.role("app:x"), Role.UNKNOWN)
        self.assertEqual(self.registry.state("app:x"), LeadershipState(resource="app:x"))
        self.assertFalse(self.registry.is_leader("app:x"))
        self.assertEqual(self.registry.states(), [])

    def test_leader_update_publishes_retained_event(self) -> None:
        """Becoming leader publishes one retained LeadershipRoleChanged with every field."""
        state = self.registry.update(
            "control-plane", Role.LEADER, 1, leader_address="http://a:8080"
        )
        self.assertEqual(
            state,
            LeadershipState("control-plane", Role.LEADER, NODE, "http://a:8080", 1),
        )
        self.assertTrue(self.registry.is_leader("control-plane"))
        [envelope] = self.bus.published()
        self.assertEqual(envelope.topic, "cluster.leadership")
        self.assertEqual(envelope.context.source, "leadership")
        self.assertEqual(
            envelope.event,
            LeadershipRoleChanged(
                resource="control-plane",
                role=Role.LEADER,
                previous=Role.UNKNOWN,
                leader_id=NODE,
                leader_address="http://a:8080",
                term=1,
            ),
        )
        self.assertTrue(type(envelope.event).retained)
        self.assertEqual(envelope.event.key(), "control-plane")

    def test_no_event_when_nothing_changed(self) -> None:
        """Repeating an update publishes nothing and returns the same state."""
        first = self.registry.update("r", Role.LEADER, 2)
        again = self.registry.update("r", Role.LEADER, 2, leader_id=NODE)
        self.assertEqual(first, again)
        self.assertEqual(len(self.bus.published()), 1)

    def test_default_state_write_is_recorded_silently(self) -> None:
        """Writing the implicit default state lists the resource but publishes nothing."""
        self.registry.update("r", Role.UNKNOWN, 0)
        self.assertEqual([s.resource for s in self.registry.states()], ["r"])
        self.assertEqual(self.bus.published(), [])

    def test_term_only_change_is_published(self) -> None:
        """A new term with the same role is a real change and is published."""
        self.registry.update("r", Role.FOLLOWER, 1, leader_id="b")
        self.registry.update("r", Role.FOLLOWER, 2, leader_id="c", leader_address="http://c")
        events = self.bus.events()
        self.assertEqual(
            [(e.role, e.previous, e.term, e.leader_id) for e in events],
            [
                (Role.FOLLOWER, Role.UNKNOWN, 1, "b"),
                (Role.FOLLOWER, Role.FOLLOWER, 2, "c"),
            ],
        )

    def test_lower_term_is_stale(self) -> None:
        """An update below the current term raises StaleTerm and changes nothing."""
        self.registry.update("r", Role.FOLLOWER, 5, leader_id="b")
        error = self.assertRaises(StaleTerm, self.registry.update, "r", Role.LEADER, 4)
        self.assertEqual(error.extra["current_term"], 5)
        self.assertEqual(self.registry.state("r").term, 5)
        self.assertIs(self.registry.role("r"), Role.FOLLOWER)
        self.assertEqual(len(self.bus.published()), 1)

    def test_leader_needs_term_above_other_leader(self) -> None:
        """Claiming leadership in a term another node led raises StaleTerm; the next term works."""
        self.registry.update("r", Role.FOLLOWER, 3, leader_id="b")
        self.assertRaises(StaleTerm, self.registry.update, "r", Role.LEADER, 3)
        self.assertIs(self.registry.role("r"), Role.FOLLOWER)
        state = self.registry.update("r", Role.LEADER, 4)
        self.assertEqual((state.role, state.term, state.leader_id), (Role.LEADER, 4, NODE))

    def test_other_leader_in_our_term_is_stale(self) -> None:
        """A follower update naming another leader for the term this node led is refused."""
        self.registry.update("r", Role.LEADER, 3)
        self.assertRaises(StaleTerm, self.registry.update, "r", Role.FOLLOWER, 3, "b")
        self.assertTrue(self.registry.is_leader("r"))
        self.registry.update("r", Role.FOLLOWER, 4, "b")
        self.assertIs(self.registry.role("r"), Role.FOLLOWER)

    def test_same_leader_may_reassert_term(self) -> None:
        """A leader that stepped down may claim the same term again (no other leader held it)."""
        self.registry.update("r", Role.LEADER, 3)
        self.registry.update("r", Role.UNKNOWN, 3)
        self.assertFalse(self.registry.is_leader("r"))
        self.registry.update("r", Role.LEADER, 3)
        self.assertTrue(self.registry.is_leader("r"))
        self.assertEqual(
            [e.role for e in self.bus.events()], [Role.LEADER, Role.UNKNOWN, Role.LEADER]
        )

    def test_follower_learns_leader_of_same_term(self) -> None:
        """A follower that did not know the leader may learn it within the same term."""
        self.registry.update("r", Role.FOLLOWER, 2)
        state = self.registry.update("r", Role.FOLLOWER, 2, "b", "http://b")
        self.assertEqual(state.leader_id, "b")
        self.assertRaises(StaleTerm, self.registry.update, "r", Role.FOLLOWER, 2, "c")

    def test_contradictions_are_invalid(self) -> None:
        """Malformed or contradictory updates raise InvalidCommand and change nothing."""
        bad: list[tuple[Any, ...]] = [
            ("r", Role.LEADER, 1, "other"),  # a leader naming another node
            ("r", Role.FOLLOWER, 1, NODE),  # a follower of itself
            ("r", Role.LEADER, 0),  # a leader without a term
            ("r", Role.FOLLOWER, -1),
            ("r", Role.FOLLOWER, True),
            ("r", Role.FOLLOWER, 1.5),
            ("r", "leader", 1),
            ("", Role.LEADER, 1),
            ("  ", Role.LEADER, 1),
            (None, Role.LEADER, 1),
        ]
        for args in bad:
            self.assertRaises(InvalidCommand, self.registry.update, *args)
        self.assertEqual(self.registry.states(), [])
        self.assertEqual(self.bus.published(), [])

    def test_unknown_is_never_leader(self) -> None:
        """UNKNOWN is not leader even when it names this node, and require_leader refuses."""
        self.registry.update("r", Role.UNKNOWN, 2, leader_id=NODE, leader_address="http://a")
        self.assertFalse(self.registry.is_leader("r"))
        error = self.assertRaises(NotLeader, self.registry.require_leader, "r")
        self.assertIsNone(error.leader_hint)

    def test_require_leader_returns_state(self) -> None:
        """require_leader returns the state when this node leads."""
        state = self.registry.update("r", Role.LEADER, 1, leader_address="http://a")
        self.assertEqual(self.registry.require_leader("r"), state)

    def test_require_leader_gives_hint(self) -> None:
        """require_leader on a follower raises NotLeader carrying the leader's address."""
        self.registry.update("r", Role.FOLLOWER, 7, "b", "http://b:8080")
        error = self.assertRaises(NotLeader, self.registry.require_leader, "r")
        self.assertEqual(error.leader_hint, "http://b:8080")
        self.assertEqual(error.leader_id, "b")
        self.assertEqual(error.problem()["leader"], "http://b:8080")
        self.assertEqual(error.resource, "r")

    def test_require_leader_without_leader(self) -> None:
        """require_leader on a never-led resource raises NotLeader without a hint."""
        error = self.assertRaises(NotLeader, self.registry.require_leader, "r")
        self.assertIsNone(error.leader_hint)

    def test_states_sorted(self) -> None:
        """states() lists every known resource sorted by name."""
        for name in ("b", "a", "c"):
            self.registry.update(name, Role.LEADER, 1)
        self.assertEqual([s.resource for s in self.registry.states()], ["a", "b", "c"])

    def test_without_bus(self) -> None:
        """A registry without a bus records changes all the same."""
        registry = LeadershipRegistry(None, NODE)
        registry.update("r", Role.LEADER, 1)
        self.assertTrue(registry.is_leader("r"))

    def test_constructor_validates(self) -> None:
        """An empty node id or a bus that is not an IEventBus is refused."""
        self.assertRaises(ValueError, LeadershipRegistry, None, "")
        self.assertRaises(TypeError, LeadershipRegistry, object(), NODE)

    def test_refusal_is_logged_with_named_fields(self) -> None:
        """A refused stale update is logged with resource, role, term and leader_id fields."""
        self.registry.update("app:x", Role.FOLLOWER, 3, "node-b")
        with capturedLogs() as events:
            self.assertRaises(StaleTerm, self.registry.update, "app:x", Role.LEADER, 3)
        [event] = [e for e in events if e.get("resource") == "app:x"]
        self.assertEqual(
            (event["role"], event["term"], event["leader_id"], event["current_term"]),
            ("leader", 3, NODE, 3),
        )
        self.assertIn("node-b", event["reason"])


class WhenLeaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bus = RecordingBus()
        self.registry = LeadershipRegistry(self.bus, NODE)

    def test_fires_at_once_when_leader(self) -> None:
        """when_leader fires at once with the state when this node already leads."""
        state = self.registry.update("r", Role.LEADER, 1)
        self.assertEqual(self.successResultOf(self.registry.when_leader("r")), state)

    def test_waits_then_fires_in_order(self) -> None:
        """Waiters are not fired by follower updates and fire in order once this node leads."""
        fired: list[int] = []
        for i in range(3):
            self.registry.when_leader("r").addCallback(lambda _, i=i: fired.append(i))
        self.registry.update("r", Role.FOLLOWER, 1, "b")
        self.registry.update("r", Role.UNKNOWN, 1)
        self.assertEqual(fired, [])
        self.assertEqual(self.registry.waiting("r"), 3)
        self.registry.update("r", Role.LEADER, 2)
        self.assertEqual(fired, [0, 1, 2])
        self.assertEqual(self.registry.waiting("r"), 0)

    def test_waiters_fire_with_leader_state(self) -> None:
        """A waiter fires with the new leader state of its own resource only."""
        d = self.registry.when_leader("r")
        other = self.registry.when_leader("s")
        self.registry.update("r", Role.LEADER, 4, leader_address="http://a")
        state = self.successResultOf(d)
        self.assertEqual((state.resource, state.role, state.term), ("r", Role.LEADER, 4))
        self.assertNoResult(other)

    def test_cancel_forgets_waiter(self) -> None:
        """Cancelling fails the waiter with CancelledError and a later leadership ignores it."""
        d = self.registry.when_leader("r")
        kept = self.registry.when_leader("r")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.registry.waiting("r"), 1)
        self.registry.update("r", Role.LEADER, 1)
        self.successResultOf(kept)

    def test_cancel_last_waiter_cleans_up(self) -> None:
        """Cancelling the only waiter leaves no waiter behind."""
        d = self.registry.when_leader("r")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.registry.waiting("r"), 0)
        self.registry.update("r", Role.LEADER, 1)

    def test_waiter_stepping_down_holds_the_rest(self) -> None:
        """If a waiter's callback steps down, the later waiters keep waiting."""
        first = self.registry.when_leader("r")
        second = self.registry.when_leader("r")
        first.addCallback(lambda s: self.registry.update("r", Role.UNKNOWN, s.term))
        self.registry.update("r", Role.LEADER, 1)
        self.successResultOf(first)
        self.assertNoResult(second)
        self.registry.update("r", Role.LEADER, 2)
        self.assertEqual(self.successResultOf(second).term, 2)

    def test_bad_resource(self) -> None:
        """when_leader refuses an empty resource name."""
        self.assertRaises(InvalidCommand, self.registry.when_leader, "")


# --------------------------------------------------------------------------
# Stateful property test

RESOURCES = ("control-plane", "app:x")
LEADERS = (None, NODE, "node-b", "node-c")


class LeadershipMachine(RuleBasedStateMachine):
    """Random updates from several simulated leaders keep the fencing invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.bus = RecordingBus()
        self.registry = LeadershipRegistry(self.bus, NODE)
        self.expected_events = 0
        self.max_term: dict[str, int] = {}
        self.leader_of_term: dict[tuple[str, int], str] = {}
        self.waiters: list[tuple[str, Deferred[LeadershipState]]] = []
        self.fired: list[tuple[str, LeadershipState]] = []

    @rule(
        resource=st.sampled_from(RESOURCES),
        role=st.sampled_from(Role),
        term=st.integers(min_value=-1, max_value=8),
        leader=st.sampled_from(LEADERS),
        address=st.sampled_from((None, "http://x")),
    )
    def update(
        self, resource: str, role: Role, term: int, leader: str | None, address: str | None
    ) -> None:
        before = self.registry.state(resource)
        effective = NODE if role is Role.LEADER and leader is None else leader
        invalid = (
            term < 0
            or (role is Role.LEADER and (effective != NODE or term < 1))
            or (role is Role.FOLLOWER and effective == NODE)
        )
        previous_leader = self.leader_of_term.get((resource, term))
        stale = term < before.term or (
            effective is not None and previous_leader is not None and previous_leader != effective
        )
        published = len(self.bus.published())
        try:
            after = self.registry.update(resource, role, term, leader, address)
        except InvalidCommand:
            assert invalid
            assert self.registry.state(resource) == before
            assert len(self.bus.published()) == published
            return
        except StaleTerm:
            assert not invalid and stale
            assert self.registry.state(resource) == before
            assert len(self.bus.published()) == published
            return
        assert not invalid and not stale, (resource, role, term, leader)
        assert after == LeadershipState(resource, role, effective, address, term)
        if effective is not None:
            self.leader_of_term[(resource, term)] = effective
        if after != before:
            self.expected_events += 1
            event = self.bus.published()[-1].event
            assert isinstance(event, LeadershipRoleChanged)
            assert (event.resource, event.role, event.previous, event.term) == (
                resource,
                role,
                before.role,
                term,
            )
        assert len(self.bus.published()) == self.expected_events

    @rule(resource=st.sampled_from(RESOURCES))
    def wait(self, resource: str) -> None:
        d = self.registry.when_leader(resource)
        d.addCallback(lambda s: self.fired.append((resource, s)) or s)
        self.waiters.append((resource, d))

    @rule()
    def cancel_oldest(self) -> None:
        if self.waiters:
            _resource, d = self.waiters.pop(0)
            d.addErrback(lambda f: f.trap(CancelledError))
            d.cancel()

    @invariant()
    def terms_never_decrease(self) -> None:
        for resource in RESOURCES:
            term = self.registry.state(resource).term
            assert term >= self.max_term.get(resource, 0)
            self.max_term[resource] = term

    @invariant()
    def one_event_per_transition(self) -> None:
        assert len(self.bus.published()) == self.expected_events

    @invariant()
    def at_most_one_leader(self) -> None:
        for state in self.registry.states():
            if self.registry.is_leader(state.resource):
                assert state.leader_id == NODE
                assert state.term >= 1
            if state.leader_id is not None:
                # One leader per (resource, term): the one the model saw first.
                assert self.leader_of_term[(state.resource, state.term)] == state.leader_id

    @invariant()
    def leaders_have_no_waiters(self) -> None:
        for resource in RESOURCES:
            if self.registry.is_leader(resource):
                assert self.registry.waiting(resource) == 0
        for resource, state in self.fired:
            assert state.resource == resource and state.role is Role.LEADER


LeadershipMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLeadershipMachine = LeadershipMachine.TestCase
