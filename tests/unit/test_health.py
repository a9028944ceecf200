"""Tests for piccolod.kernel.health.HealthTracker."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from piccolod.errors import InvalidCommand, NotFound
from piccolod.events import HealthChanged, HealthLevel
from piccolod.interfaces import IEventBus, IHealth
from piccolod.kernel.health import HealthTracker

try:
    from piccolod.testing.bus import FakeEventBus as _Bus
except ImportError:  # pragma: no cover - the bus is written in parallel
    _Bus = None  # type: ignore[assignment,misc]


@implementer(IEventBus)
class _RecordingBus:
    """A minimal recording bus (used only when FakeEventBus is absent)."""

    def __init__(self, clock: Clock) -> None:
        self._events: list[Any] = []

    def publish(self, event: Any, source: str = "", correlation_id: Any = None, topic: Any = None):
        self._events.append(event)

    def events(self, topic: str | None = None) -> list[Any]:
        return [e for e in self._events if topic is None or e.topic == topic]

    def subscribe(self, *a: Any, **kw: Any) -> Any:
        raise NotImplementedError

    def retained(self, pattern: str) -> Any:
        return []

    def last(self, topic: str, key: str = "") -> Any:
        return None

    def stats(self) -> Any:
        return {}

    def drain(self) -> Any:
        raise NotImplementedError


def make_bus(clock: Clock) -> Any:
    return _Bus(clock) if _Bus is not None else _RecordingBus(clock)


class HealthTrackerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.bus = make_bus(self.clock)
        self.health = HealthTracker(self.clock, self.bus)

    def changes(self) -> list[HealthChanged]:
        return self.bus.events("health.component")

    def test_provides_interface(self) -> None:
        """HealthTracker provides IHealth."""
        self.assertTrue(verifyObject(IHealth, self.health))

    def test_empty_is_ok_and_ready(self) -> None:
        """With no components the overall level is OK and the tracker is ready."""
        self.assertEqual(self.health.overall(), HealthLevel.OK)
        self.assertTrue(self.health.ready())
        self.assertEqual(self.health.components(), [])
        self.assertEqual(self.health.not_ready(), [])

    def test_overall_is_worst(self) -> None:
        """The overall level is the worst level any component reported."""
        self.health.report("a", HealthLevel.OK)
        self.health.report("b", HealthLevel.WARN, "slow")
        self.assertEqual(self.health.overall(), HealthLevel.WARN)
        self.health.report("c", HealthLevel.ERROR, "down")
        self.assertEqual(self.health.overall(), HealthLevel.ERROR)
        self.health.report("c", HealthLevel.OK)
        self.assertEqual(self.health.overall(), HealthLevel.WARN)

    def test_component_and_components_sorted(self) -> None:
        """component() returns the stored value; components() is sorted by name."""
        self.health.report("zeta", HealthLevel.OK, "fine", {"rss": 12})
        self.health.report("alpha", HealthLevel.WARN, "meh")
        got = self.health.component("zeta")
        self.assertEqual(
            (got.component, got.level, got.message, got.since, got.figures),
            ("zeta", HealthLevel.OK, "fine", 100.0, (("rss", 12.0),)),
        )
        self.assertEqual([c.component for c in self.health.components()], ["alpha", "zeta"])
        self.assertEqual(got.to_json()["level"], "ok")

    def test_unknown_component_not_found(self) -> None:
        """component() of an unknown name raises NotFound."""
        self.assertRaises(NotFound, self.health.component, "nope")

    def test_ready_needs_required_ok(self) -> None:
        """Readiness needs every required component at OK; optional ones do not count."""
        self.health.require("db")
        self.health.report("db", HealthLevel.OK)
        self.health.report("mdns", HealthLevel.ERROR, "no multicast")
        self.assertTrue(self.health.ready())
        self.health.report("db", HealthLevel.WARN, "checkpointing")
        self.assertFalse(self.health.ready())
        self.assertEqual([c.component for c in self.health.not_ready()], ["db"])

    def test_required_never_reported_is_not_ready(self) -> None:
        """A required component that never reported counts as not ready."""
        self.health.require("store")
        self.assertFalse(self.health.ready())
        [pending] = self.health.not_ready()
        self.assertEqual(
            (pending.component, pending.level, pending.required, pending.since),
            ("store", HealthLevel.WARN, True, 100.0),
        )
        self.health.report("store", HealthLevel.OK)
        self.assertTrue(self.health.ready())

    def test_require_false_releases(self) -> None:
        """Declaring a component not required removes it from readiness."""
        self.health.require("store")
        self.health.require("store", False)
        self.assertTrue(self.health.ready())

    def test_publishes_on_change_only(self) -> None:
        """HealthChanged is published when level or message change, not on repeats."""
        self.health.report("a", HealthLevel.OK, "fine")
        self.health.report("a", HealthLevel.OK, "fine")
        self.health.report("a", HealthLevel.OK, "fine", {"x": 1})
        self.health.report("a", HealthLevel.WARN, "fine")
        self.health.report("a", HealthLevel.WARN, "worse")
        self.assertEqual(
            [(e.component, e.level, e.message) for e in self.changes()],
            [
                ("a", HealthLevel.OK, "fine"),
                ("a", HealthLevel.WARN, "fine"),
                ("a", HealthLevel.WARN, "worse"),
            ],
        )

    def test_figures_only_update_without_publishing(self) -> None:
        """A figures-only change updates the stored figures but publishes nothing."""
        self.health.report("a", HealthLevel.OK, "", {"q": 1})
        self.health.report("a", HealthLevel.OK, "", {"q": 2})
        self.assertEqual(len(self.changes()), 1)
        self.assertEqual(self.health.component("a").figures, (("q", 2.0),))

    def test_required_change_publishes(self) -> None:
        """Changing the required flag of a reported component publishes once."""
        self.health.report("a", HealthLevel.OK)
        self.health.require("a")
        self.health.require("a")
        events = self.changes()
        self.assertEqual([e.required for e in events], [False, True])
        self.assertTrue(self.health.component("a").required)

    def test_since_tracks_level_changes(self) -> None:
        """since changes with the level, not with the message."""
        self.health.report("a", HealthLevel.OK, "one")
        self.clock.advance(5)
        self.health.report("a", HealthLevel.OK, "two")
        self.assertEqual(self.health.component("a").since, 100.0)
        self.clock.advance(5)
        self.health.report("a", HealthLevel.ERROR, "three")
        self.assertEqual(self.health.component("a").since, 110.0)

    def test_remove_is_idempotent(self) -> None:
        """remove() forgets a component and its required flag, twice without error."""
        self.health.require("a")
        self.health.report("a", HealthLevel.ERROR)
        self.health.remove("a")
        self.health.remove("a")
        self.assertTrue(self.health.ready())
        self.assertEqual(self.health.overall(), HealthLevel.OK)
        self.assertRaises(NotFound, self.health.component, "a")

    def test_bad_inputs(self) -> None:
        """Empty names, unknown levels and non-numeric figures are refused."""
        self.assertRaises(InvalidCommand, self.health.report, "", HealthLevel.OK)
        self.assertRaises(InvalidCommand, self.health.report, "a", "bogus")
        self.assertRaises(InvalidCommand, self.health.report, "a", 3)
        self.assertRaises(InvalidCommand, self.health.report, "a", HealthLevel.OK, "", {"x": "y"})
        self.assertRaises(InvalidCommand, self.health.report, "a", HealthLevel.OK, "", {"x": True})
        self.assertRaises(InvalidCommand, self.health.require, "")
        self.assertEqual(self.health.components(), [])

    def test_level_labels_accepted(self) -> None:
        """A level may be given as its label."""
        self.health.report("a", "warn")  # type: ignore[arg-type]
        self.assertIs(self.health.component("a").level, HealthLevel.WARN)

    def test_without_bus(self) -> None:
        """Without a bus the tracker works and publishes nowhere."""
        health = HealthTracker(self.clock)
        health.report("a", HealthLevel.ERROR, "x")
        self.assertEqual(health.overall(), HealthLevel.ERROR)

    def test_bus_failure_is_logged_not_raised(self) -> None:
        """A bus that raises on publish does not break report()."""

        @implementer(IEventBus)
        class Broken(_RecordingBus):
            def publish(self, *a: Any, **kw: Any) -> Any:
                raise RuntimeError("bus down")

        health = HealthTracker(self.clock, Broken(self.clock))
        health.report("a", HealthLevel.WARN)
        self.assertEqual(health.component("a").level, HealthLevel.WARN)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_rejects_non_clock(self) -> None:
        """The clock must provide IReactorTime."""
        self.assertRaises(TypeError, HealthTracker, object())
