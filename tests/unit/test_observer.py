"""Tests for piccolod.kernel.observer.LeadershipObserver (over the real MemoryEventBus)."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.events import LeadershipRoleChanged, LockState, LockStateChanged, Role
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.kernel.observer import LeadershipObserver, ObservedTransition

NODE = "node-a"


class ObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryEventBus(self.clock)
        self.registry = LeadershipRegistry(self.bus, NODE)

    def start(self, keep: int = 100) -> LeadershipObserver:
        observer = LeadershipObserver(self.bus, keep=keep)
        observer.startService()
        self.addCleanup(self.stop, observer)
        return observer

    def stop(self, observer: LeadershipObserver) -> None:
        self.successResultOf(observer.stopService())
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_provides_iservice(self) -> None:
        """The observer verifiably provides IService and refuses a non-bus."""
        self.assertTrue(verifyObject(IService, LeadershipObserver(self.bus)))
        self.assertRaises(TypeError, LeadershipObserver, object())
        self.assertRaises(ValueError, LeadershipObserver, self.bus, keep=0)

    def test_replays_leadership_decided_before_start(self) -> None:
        """Roles decided before the observer started are reported first (retained replay)."""
        self.clock.advance(3)
        self.registry.update("control-plane", Role.LEADER, 1, leader_address="http://a")
        observer = self.start()
        self.clock.advance(0)
        self.assertEqual(
            observer.transitions(),
            (
                ObservedTransition(
                    time=3.0,
                    resource="control-plane",
                    role="leader",
                    previous="unknown",
                    term=1,
                    leader_id=NODE,
                    leader_address="http://a",
                    event_id=observer.transitions()[0].event_id,
                ),
            ),
        )

    def test_records_transitions_in_order(self) -> None:
        """Every later transition is recorded in publication order."""
        observer = self.start()
        self.registry.update("app:x", Role.LEADER, 1)
        self.registry.update("app:x", Role.UNKNOWN, 1)
        self.registry.update("app:x", Role.FOLLOWER, 2, "node-b", "http://b")
        self.clock.advance(0)
        self.assertEqual(
            [(t.previous, t.role, t.term, t.leader_id) for t in observer.transitions()],
            [
                ("unknown", "leader", 1, NODE),
                ("leader", "unknown", 1, None),
                ("unknown", "follower", 2, "node-b"),
            ],
        )
        self.assertEqual(observer.transitions()[-1].to_json()["leader_address"], "http://b")

    def test_logs_named_fields(self) -> None:
        """Each transition is logged with resource, role, previous, term and leader_id fields."""
        observer = self.start()
        self.registry.update("app:x", Role.LEADER, 4)
        with capturedLogs() as events:
            self.clock.advance(0)
        [event] = [e for e in events if e.get("log_source") is observer]
        self.assertEqual(
            {k: event[k] for k in ("resource", "role", "previous", "term", "leader_id")},
            {
                "resource": "app:x",
                "role": "leader",
                "previous": "unknown",
                "term": 4,
                "leader_id": NODE,
            },
        )

    def test_bounded(self) -> None:
        """Only the last `keep` transitions are kept."""
        observer = self.start(keep=2)
        for term in range(1, 5):
            self.registry.update("r", Role.FOLLOWER, term, "node-b")
        self.clock.advance(0)
        self.assertEqual([t.term for t in observer.transitions()], [3, 4])

    def test_stop_unsubscribes(self) -> None:
        """After stop nothing more is recorded, and stopping twice is harmless."""
        observer = LeadershipObserver(self.bus)
        observer.startService()
        self.registry.update("r", Role.LEADER, 1)
        self.clock.advance(0)
        self.successResultOf(observer.stopService())
        self.successResultOf(observer.stopService())
        self.registry.update("r", Role.UNKNOWN, 1)
        self.clock.advance(0)
        self.assertEqual(len(observer.transitions()), 1)
        self.assertFalse(observer.running)

    def test_foreign_event_on_topic_is_ignored(self) -> None:
        """An event of another type published on cluster.leadership is ignored with a warning."""
        observer = self.start()
        self.bus.publish(LockStateChanged(LockState.LOCKED), topic=LeadershipRoleChanged.topic)
        with capturedLogs() as events:
            self.clock.advance(0)
        self.assertEqual(observer.transitions(), ())
        self.assertTrue(any(e.get("type") == "LockStateChanged" for e in events))
