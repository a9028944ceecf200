"""
Tests for :mod:`piccolod.kernel.bus` and :mod:`piccolod.testing.bus`.

The shared contract (tests/contracts/bus.py) runs against both buses;
:class:`RealEventBusContract` adds what the real bus must show besides:
exact counters, overflow details, drop logging, batching and ``stop()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from piccolod.errors import InvalidCommand
from piccolod.events import Envelope
from piccolod.interfaces import IEventBus, Overflow, SubscriptionStats, TopicStats
from piccolod.kernel.bus import MemoryEventBus, check_topic, parse_pattern
from piccolod.testing.bus import FakeEventBus
from tests.contracts.bus import Boom, EventBusContract, Ping, State, ns


def sub_stats(bus: Any, name: str) -> SubscriptionStats:
    """The stats of the active subscription called ``name``."""
    (found,) = [s for s in bus.stats()["subscriptions"] if s.name == name]
    assert isinstance(found, SubscriptionStats)
    return found


def topic_stats(bus: Any, topic: str) -> TopicStats:
    """The stats of ``topic``."""
    (found,) = [t for t in bus.stats()["topics"] if t.topic == topic]
    assert isinstance(found, TopicStats)
    return found


def warnings_in(events: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The warn-level log events of a capture."""
    return [e for e in events if e.get("log_level") == LogLevel.warn]


class RealEventBusContract(EventBusContract):
    """Behaviour the real bus must show besides the contract."""

    bus: MemoryEventBus

    def test_counters(self) -> None:
        """Per-topic and per-subscription counters add up for delivery, filtering, failure."""

        def flaky(env: Envelope[Any]) -> None:
            if env.event.n == 1:
                raise Boom("one")

        self.bus.subscribe("test.ping", lambda env: None, name="plain")
        self.bus.subscribe(
            "test.#", lambda env: None, name="wild", filter=lambda e: e.event.n % 2 == 0
        )
        self.bus.subscribe("test.ping", flaky, name="flaky")
        for i in range(4):
            self.bus.publish(Ping(i))
        self.assertEqual(sub_stats(self.bus, "plain").queued, 4)
        self.assertEqual(sub_stats(self.bus, "wild").queued, 2)
        self.deliver()
        self.flushLoggedErrors(Boom)
        self.assertEqual(
            sub_stats(self.bus, "plain"),
            SubscriptionStats("plain", "test.ping", 0, 1000, Overflow.DROP_OLDEST, 4, 0, 0, 0, 0),
        )
        wild = sub_stats(self.bus, "wild")
        self.assertEqual((wild.delivered, wild.filtered, wild.failed), (2, 2, 0))
        flaky_stats = sub_stats(self.bus, "flaky")
        self.assertEqual((flaky_stats.delivered, flaky_stats.failed), (3, 1))
        self.assertEqual(topic_stats(self.bus, "test.ping"), TopicStats("test.ping", 4, 9, 0, 1))
        stats = self.bus.stats()
        self.assertEqual(
            (stats["published"], stats["delivered"], stats["dropped"], stats["failed"]),
            (4, 9, 0, 1),
        )

    def test_wildcard_deliveries_counted_per_topic(self) -> None:
        """A wildcard subscription's deliveries are counted on each event's topic."""
        self.bus.subscribe("test.*", lambda env: None)
        self.bus.publish(Ping(), topic="test.a")
        self.bus.publish(Ping(), topic="test.b")
        self.bus.publish(Ping(), topic="test.b")
        self.deliver()
        self.assertEqual(topic_stats(self.bus, "test.a").delivered, 1)
        self.assertEqual(topic_stats(self.bus, "test.b").delivered, 2)

    def test_drop_counters(self) -> None:
        """Each overflow policy counts what it drops, per subscription and per topic."""
        self.bus.subscribe("test.ping", lambda env: None, max_queue=2, name="old")
        self.bus.subscribe(
            "test.ping", lambda env: None, max_queue=2, overflow=Overflow.DROP_NEWEST, name="new"
        )
        for i in range(5):
            self.bus.publish(Ping(i))
        self.assertEqual(
            (sub_stats(self.bus, "old").dropped, sub_stats(self.bus, "old").queued), (3, 2)
        )
        self.assertEqual(sub_stats(self.bus, "new").dropped, 3)
        self.assertEqual(topic_stats(self.bus, "test.ping").dropped, 6)
        self.deliver()
        self.assertEqual(topic_stats(self.bus, "test.ping").delivered, 4)
        self.flushLoggedErrors()

    def test_coalesce_counters(self) -> None:
        """COALESCE counts replaced events as coalesced and evictions as dropped."""
        self.bus.subscribe(
            "test.ping", lambda env: None, max_queue=2, overflow=Overflow.COALESCE, name="c"
        )
        for n, k in enumerate("aaabc"):
            self.bus.publish(Ping(n, k))
        stats = sub_stats(self.bus, "c")
        self.assertEqual((stats.coalesced, stats.dropped, stats.queued), (2, 1, 2))
        self.assertEqual(topic_stats(self.bus, "test.ping").dropped, 1)

    def test_drop_counted_on_the_dropped_events_topic(self) -> None:
        """A wildcard subscription's evicted event is counted on its own topic."""
        self.bus.subscribe("test.*", lambda env: None, max_queue=1)
        self.bus.publish(Ping(), topic="test.a")
        self.bus.publish(Ping(), topic="test.b")
        self.assertEqual(topic_stats(self.bus, "test.a").dropped, 1)
        self.assertEqual(topic_stats(self.bus, "test.b").dropped, 0)

    def test_asynchronous_deliveries_counted_when_they_finish(self) -> None:
        """A Deferred result counts as delivered when it fires, as failed when it fails."""
        pending: list[Deferred[None]] = []

        def handler(env: Envelope[Any]) -> Deferred[None]:
            d: Deferred[None] = Deferred()
            pending.append(d)
            return d

        self.bus.subscribe("test.ping", handler, name="slow")
        self.bus.publish(Ping(0))
        self.bus.publish(Ping(1))
        self.deliver()
        stats = sub_stats(self.bus, "slow")
        self.assertEqual((stats.delivered, stats.failed, stats.queued), (0, 0, 1))
        pending[0].callback(None)
        self.deliver()
        pending[1].errback(Boom("late"))
        self.flushLoggedErrors(Boom)
        stats = sub_stats(self.bus, "slow")
        self.assertEqual((stats.delivered, stats.failed, stats.queued), (1, 1, 0))
        self.assertEqual(topic_stats(self.bus, "test.ping"), TopicStats("test.ping", 2, 1, 0, 1))

    def test_failing_filter_counted_as_failed(self) -> None:
        """A raising filter counts as a failure, not as filtered."""

        def bad(env: Envelope[Any]) -> bool:
            raise Boom("filter")

        self.bus.subscribe("test.ping", lambda env: None, filter=bad, name="f")
        self.bus.publish(Ping())
        self.flushLoggedErrors(Boom)
        stats = sub_stats(self.bus, "f")
        self.assertEqual((stats.failed, stats.filtered, stats.queued), (1, 0, 0))
        self.assertEqual(topic_stats(self.bus, "test.ping").failed, 1)

    def test_handler_failure_is_logged_with_context(self) -> None:
        """A handler failure is logged as a failure naming subscription, topic and event id."""

        def bad(env: Envelope[Any]) -> None:
            raise Boom("handler")

        self.bus.subscribe("test.ping", bad, name="bad")
        with capturedLogs() as events:
            env = self.bus.publish(Ping())
            self.deliver()
        self.flushLoggedErrors(Boom)
        (failure,) = [e for e in events if "log_failure" in e]
        self.assertEqual(failure["name"], "bad")
        self.assertEqual(failure["topic"], "test.ping")
        self.assertEqual(failure["event_id"], env.context.event_id)
        self.assertIsInstance(failure["log_failure"].value, Boom)

    def test_drops_are_logged_rate_limited(self) -> None:
        """Drops are logged at once, then at most once per interval with the count since."""
        self.bus.subscribe("test.ping", lambda env: None, max_queue=1, name="tiny")
        with capturedLogs() as events:
            for i in range(5):
                self.bus.publish(Ping(i))
            first = warnings_in(events)
            self.assertEqual([e["count"] for e in first], [1])
            self.assertEqual(first[0]["name"], "tiny")
            self.clock.advance(9.9)
            self.assertEqual(len(warnings_in(events)), 1)
            self.clock.advance(0.1)
            self.assertEqual([e["count"] for e in warnings_in(events)], [1, 3])
            self.assertEqual(warnings_in(events)[-1]["dropped"], 4)
            self.clock.advance(100)
            self.assertEqual(len(warnings_in(events)), 2, "nothing new to log")
            self.bus.publish(Ping(5))  # queued: the queue was delivered meanwhile
            self.bus.publish(Ping(6))  # dropped, logged at once: the interval is over
            self.assertEqual([e["count"] for e in warnings_in(events)], [1, 3, 1])
        self.deliver()

    def test_cancel_counts_and_logs_discarded_events(self) -> None:
        """Events discarded by cancel() are counted as dropped and logged (at info)."""
        sub = self.bus.subscribe("test.ping", lambda env: None, name="gone")
        for i in range(3):
            self.bus.publish(Ping(i))
        with capturedLogs() as events:
            sub.cancel()
        self.assertEqual(sub.stats().dropped, 3)
        self.assertEqual(topic_stats(self.bus, "test.ping").dropped, 3)
        # Expected at every stop: noted at info, not warned about.
        self.assertEqual(warnings_in(events), [])
        (note,) = [e for e in events if e.get("reason") == "cancelled"]
        self.assertEqual((note["count"], note["log_level"]), (3, LogLevel.info))
        self.assertNotIn(sub.stats(), self.bus.stats()["subscriptions"])

    def test_cancel_flushes_pending_drop_log(self) -> None:
        """cancel() logs drops not yet logged and leaves no timer behind."""
        sub = self.bus.subscribe("test.ping", lambda env: None, max_queue=1)
        with capturedLogs() as events:
            for i in range(4):
                self.bus.publish(Ping(i))
            self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # delivery + drop log
            sub.cancel()
        self.assertEqual([e["count"] for e in warnings_in(events)], [1, 2])  # queue full
        cancelled = [e for e in events if e.get("reason") == "cancelled"]
        self.assertEqual([(e["count"], e["log_level"]) for e in cancelled], [(1, LogLevel.info)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_inside_handler_counts_the_rest_as_dropped(self) -> None:
        """A handler cancelling its subscription mid-batch: delivered and dropped add up."""
        subs: list[Any] = []

        def handler(env: Envelope[Any]) -> None:
            if env.event.n == 2:
                subs[0].cancel()

        subs.append(self.bus.subscribe("test.ping", handler))
        for i in range(6):
            self.bus.publish(Ping(i))
        self.deliver()
        stats = subs[0].stats()
        self.assertEqual((stats.delivered, stats.dropped, stats.queued), (3, 3, 0))

    def test_filter_cancelling_another_subscription(self) -> None:
        """A subscription cancelled by a filter during publish() receives nothing."""
        got: list[Envelope[Any]] = []
        later: list[Any] = []

        def cancelling(env: Envelope[Any]) -> bool:
            later[0].cancel()
            return True

        self.bus.subscribe("test.ping", lambda env: None, filter=cancelling)
        later.append(self.bus.subscribe("test.ping", got.append))
        self.bus.publish(Ping())
        self.deliver()
        self.assertEqual(got, [])
        self.assertEqual(later[0].stats().dropped, 1)
        self.successResultOf(self.bus.drain())

    def test_filter_cancelling_a_busy_subscription(self) -> None:
        """A busy subscription cancelled by a filter mid-publish gets nothing more."""
        got: list[int] = []
        pending: Deferred[None] = Deferred()
        later: list[Any] = []

        def handler(env: Envelope[Any]) -> Deferred[None]:
            got.append(env.event.n)
            return pending

        def cancelling(env: Envelope[Any]) -> bool:
            if env.event.n == 1:
                later[0].cancel()
            return True

        self.bus.subscribe("test.ping", lambda env: None, filter=cancelling)
        later.append(self.bus.subscribe("test.ping", handler))
        self.bus.publish(Ping(0))
        self.deliver()
        self.bus.publish(Ping(1))
        pending.callback(None)
        self.deliver()
        self.assertEqual(got, [0])
        self.assertEqual(later[0].stats().dropped, 1)
        self.successResultOf(self.bus.drain())

    def test_stop_discards_queues_and_waits_for_in_flight(self) -> None:
        """stop() drops what is queued (counted) and fires once in-flight handlers finish."""
        pending: Deferred[None] = Deferred()
        slow = self.bus.subscribe("test.ping", lambda env: pending, name="slow")
        queued = self.bus.subscribe("test.state", lambda env: None, name="queued")
        self.bus.publish(Ping(0))
        self.bus.publish(Ping(1))
        self.deliver()
        self.bus.publish(State("x"))
        stopped = self.bus.stop()
        again = self.bus.stop()
        self.assertNoResult(stopped)
        self.assertNoResult(again)
        self.assertFalse(slow.active or queued.active)
        self.assertEqual((slow.stats().dropped, queued.stats().dropped), (1, 1))
        pending.callback(None)
        self.successResultOf(stopped)
        self.successResultOf(again)
        self.assertEqual(slow.stats().delivered, 1)
        self.assertTrue(self.bus.stopped)

    def test_after_stop_publish_retains_but_delivers_nothing(self) -> None:
        """After stop(), publish() still retains and counts, but delivers nothing."""
        got = self.collect("#")
        self.successResultOf(self.bus.stop())
        env = self.bus.publish(State("late"))
        self.assertIs(self.bus.last("test.state"), env)
        late: list[Envelope[Any]] = []
        with capturedLogs() as events:
            sub = self.bus.subscribe("#", late.append, replay_retained=True)
        self.assertFalse(sub.active)
        self.assertEqual(len(warnings_in(events)), 1)
        self.bus.publish(Ping())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((got, late), ([], []))
        self.assertEqual(topic_stats(self.bus, "test.state").published, 1)
        self.successResultOf(self.bus.drain())
        self.successResultOf(self.bus.stop())

    def test_drain_is_cancellable(self) -> None:
        """Cancelling a drain() Deferred fails it and forgets it."""
        self.bus.subscribe("test.ping", lambda env: Deferred())
        self.bus.publish(Ping())
        drained = self.bus.drain()
        drained.cancel()
        self.failureResultOf(drained, CancelledError)
        self.deliver()

    def test_drain_fires_once_for_several_waiters(self) -> None:
        """Every pending drain() fires when the last subscription goes idle."""
        self.collect("test.ping")
        self.collect("test.#")
        self.bus.publish(Ping())
        first, second = self.bus.drain(), self.bus.drain()
        self.clock.advance(0)
        self.successResultOf(first)
        self.successResultOf(second)

    def test_stats_lists_topics_sorted(self) -> None:
        """stats() lists every topic used, sorted, including those without subscribers."""
        self.bus.publish(Ping(), topic="test.b")
        self.bus.publish(Ping(), topic="test.a")
        self.bus.subscribe("test.c", lambda env: None)
        self.assertEqual(
            [t.topic for t in self.bus.stats()["topics"]], ["test.a", "test.b", "test.c"]
        )

    def test_parameter_names_match_the_interface(self) -> None:
        """Every IEventBus method has the interface's parameter names (buildbot's check)."""
        for name in IEventBus.names():
            method: Any = IEventBus.get(name)
            expected = list(method.positional)
            actual = list(inspect.signature(getattr(self.bus, name)).parameters)
            self.assertEqual(actual, expected, name)


class MemoryEventBusTests(RealEventBusContract, SynchronousTestCase):
    """The contract and the real-bus behaviour, bound to MemoryEventBus."""

    def make_bus(self, clock: Clock) -> MemoryEventBus:
        return MemoryEventBus(clock)


class FakeEventBusContractTests(EventBusContract, SynchronousTestCase):
    """The contract, bound to FakeEventBus."""

    def make_bus(self, clock: Clock) -> FakeEventBus:
        return FakeEventBus(clock)


class MemoryEventBusOptionTests(SynchronousTestCase):
    """Construction options of MemoryEventBus."""

    def test_batches_yield_to_the_reactor(self) -> None:
        """At most ``batch`` events are delivered per delivery call; the rest is rescheduled."""
        clock = Clock()
        bus = MemoryEventBus(clock, batch=3)
        got: list[Envelope[Any]] = []
        bus.subscribe("test.ping", got.append)
        for i in range(7):
            bus.publish(Ping(i))
        seen_by_probe: list[int] = []
        clock.callLater(0, lambda: seen_by_probe.append(len(got)))
        clock.advance(0)
        self.assertEqual(seen_by_probe, [3])
        self.assertEqual(ns(got), list(range(7)))
        self.assertEqual(bus.stats()["delivered"], 7)

    def test_handler_publishing_to_itself_is_batched(self) -> None:
        """A handler that keeps publishing to itself cannot monopolise one delivery call."""
        clock = Clock()
        bus = MemoryEventBus(clock, batch=10)
        got: list[int] = []

        def echo(env: Envelope[Any]) -> None:
            got.append(env.event.n)
            if env.event.n < 100:
                bus.publish(Ping(env.event.n + 1))

        bus.subscribe("test.ping", echo)
        bus.publish(Ping(0))
        probe: list[int] = []
        clock.callLater(0, lambda: probe.append(len(got)))
        clock.advance(0)
        self.assertEqual(probe, [1])
        self.assertEqual(got, list(range(101)))

    def test_bad_batch(self) -> None:
        """A batch size below one is refused."""
        self.assertRaises(ValueError, MemoryEventBus, Clock(), batch=0)

    def test_id_factory(self) -> None:
        """The injected id factory names every event."""
        ids = iter(["a", "b"])
        bus = MemoryEventBus(Clock(), id_factory=lambda: next(ids))
        self.assertEqual([bus.publish(Ping()).context.event_id for _ in range(2)], ["a", "b"])

    def test_default_ids_differ_between_buses(self) -> None:
        """Default ids share a random per-bus prefix and never repeat across buses."""
        one, two = MemoryEventBus(Clock()), MemoryEventBus(Clock())
        a = [one.publish(Ping()).context.event_id for _ in range(3)]
        b = [two.publish(Ping()).context.event_id for _ in range(3)]
        self.assertEqual(len(set(a) | set(b)), 6)
        self.assertEqual(len({i.rsplit("-", 1)[0] for i in a}), 1)

    def test_drop_log_interval(self) -> None:
        """drop_log_interval sets the minimum clock time between drop warnings."""
        clock = Clock()
        bus = MemoryEventBus(clock, drop_log_interval=1.0)
        bus.subscribe("test.ping", lambda env: None, max_queue=1)
        with capturedLogs() as events:
            bus.publish(Ping(0))
            bus.publish(Ping(1))
            bus.publish(Ping(2))
            clock.advance(1.0)
        self.assertEqual([e["count"] for e in warnings_in(events)], [1, 1])
        self.successResultOf(bus.stop())
        self.assertEqual(clock.getDelayedCalls(), [])


class PatternTests(SynchronousTestCase):
    """Topic and pattern parsing."""

    def test_check_topic(self) -> None:
        """check_topic returns a good topic and refuses a bad one."""
        self.assertEqual(check_topic("persistence.lock_state"), "persistence.lock_state")
        self.assertEqual(check_topic("a-b.c_d.9"), "a-b.c_d.9")
        self.assertRaises(InvalidCommand, check_topic, "a.")

    def test_exact_patterns_are_flagged(self) -> None:
        """Patterns without wildcards are exact; others are not."""
        self.assertTrue(parse_pattern("a.b").exact)
        self.assertFalse(parse_pattern("a.*").exact)
        self.assertFalse(parse_pattern("#").exact)

    def test_error_names_the_pattern(self) -> None:
        """The InvalidCommand for a bad pattern names it and the rule broken."""
        error = self.assertRaises(InvalidCommand, parse_pattern, "a.#.b")
        self.assertIn("a.#.b", str(error))
        self.assertIn("last segment", str(error))


class FakeEventBusTests(SynchronousTestCase):
    """What FakeEventBus adds: recording, assertions, deterministic ids, flush()."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = FakeEventBus(self.clock)

    def test_records_every_envelope(self) -> None:
        """published() and events() return what was published, optionally per topic."""
        a = self.bus.publish(Ping(1))
        b = self.bus.publish(State("x"))
        self.assertEqual(self.bus.published(), [a, b])
        self.assertEqual(self.bus.published("test.state"), [b])
        self.assertEqual(self.bus.events("test.ping"), [Ping(1)])
        self.assertRaises(InvalidCommand, self.bus.published, "bad..topic")

    def test_refused_publications_are_not_recorded(self) -> None:
        """A publish() that raises records nothing."""
        self.assertRaises(InvalidCommand, self.bus.publish, Ping(), topic="a..b")
        self.assertEqual(self.bus.published(), [])

    def test_assert_published(self) -> None:
        """assert_published passes on the exact sequence and fails with both lists otherwise."""
        self.bus.publish(Ping(1))
        self.bus.publish(Ping(2))
        self.bus.assert_published([Ping(1), Ping(2)])
        self.bus.assert_published([Ping(1), Ping(2)], topic="test.ping")
        self.bus.assert_nothing_published("test.state")
        error = self.assertRaises(AssertionError, self.bus.assert_published, [Ping(2), Ping(1)])
        self.assertIn("expected", str(error))
        self.assertIn("Ping(n=2", str(error))
        self.assertRaises(AssertionError, self.bus.assert_nothing_published)

    def test_clear_published_keeps_retained(self) -> None:
        """clear_published() forgets the record but not retained values."""
        env = self.bus.publish(State("x"))
        self.bus.clear_published()
        self.bus.assert_nothing_published()
        self.assertIs(self.bus.last("test.state"), env)

    def test_deterministic_ids(self) -> None:
        """The fake numbers its events event-1, event-2, ..."""
        ids = [self.bus.publish(Ping()).context.event_id for _ in range(2)]
        self.assertEqual(ids, ["event-1", "event-2"])

    def test_flush_runs_chained_deliveries(self) -> None:
        """flush() delivers everything, including events published by handlers."""
        got: list[str] = []
        self.bus.subscribe(
            "test.ping", lambda env: self.bus.publish(State("from-handler")) and None
        )
        self.bus.subscribe("test.state", lambda env: got.append(env.event.value))
        self.bus.publish(Ping())
        self.bus.flush()
        self.assertEqual(got, ["from-handler"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush_leaves_in_flight_handlers_alone(self) -> None:
        """flush() returns while a handler's Deferred is still pending."""
        self.bus.subscribe("test.ping", lambda env: Deferred())
        self.bus.publish(Ping())
        self.bus.publish(Ping())
        self.bus.flush()
        self.assertNoResult(self.bus.drain())

    def test_flush_needs_a_task_clock(self) -> None:
        """flush() refuses a clock it cannot advance."""

        class WallClock:
            def seconds(self) -> float:
                return 0.0

            def callLater(self, *args: Any, **kwargs: Any) -> Any:
                raise AssertionError("not used")

        bus = FakeEventBus(WallClock())  # type: ignore[arg-type]
        self.assertRaises(TypeError, bus.flush)
