"""
The contract every ``IEventBus`` must honour.

:class:`EventBusContract` is a mixin: bind it to an implementation by
subclassing it together with ``SynchronousTestCase`` and defining
``make_bus(clock)``.  Everything here is observable through the interface
alone (what is delivered, when, in which order); behaviour only the real
bus must show (exact counters, drop logging, stop) lives in
``tests/unit/test_bus.py``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from piccolod.errors import InvalidCommand
from piccolod.events import Envelope, Event
from piccolod.interfaces import IEventBus, ISubscription, Overflow

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    _Base = SynchronousTestCase
else:
    _Base = object


@attrs.frozen
class Ping(Event):
    """A plain (not retained) test event with a key."""

    topic: ClassVar[str] = "test.ping"
    n: int = 0
    k: str = ""

    def key(self) -> str:
        return self.k


@attrs.frozen
class State(Event):
    """A retained test event, keyed by ``k``."""

    topic: ClassVar[str] = "test.state"
    retained: ClassVar[bool] = True
    value: str = ""
    k: str = ""

    def key(self) -> str:
        return self.k


class Boom(Exception):
    """What failing test handlers raise."""


BAD_TOPICS: list[Any] = [
    "",
    ".",
    "a.",
    ".a",
    "a..b",
    "a.*",
    "a.#",
    "#",
    "a b",
    "a/b",
    "caf\u00e9",
    "x" * 256,
    5,
]

BAD_PATTERNS: list[Any] = [
    "",
    ".",
    "a..b",
    "#.a",
    "a.#.b",
    "a*",
    "a.b#",
    "**",
    "a.**",
    "a b",
    "x" * 256,
    None,
    5,
]


def ns(envelopes: list[Envelope[Any]]) -> list[int]:
    """The ``n`` of each ``Ping`` envelope."""
    return [env.event.n for env in envelopes]


class EventBusContract(_Base):
    """Behaviour any ``IEventBus`` must show; mix into a ``SynchronousTestCase``."""

    clock: Clock
    bus: IEventBus

    def make_bus(self, clock: Clock) -> IEventBus:
        """Build the bus under test on ``clock``."""
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = self.make_bus(self.clock)
        self.addCleanup(self._stop_bus)

    def _stop_bus(self) -> None:
        stop = getattr(self.bus, "stop", None)
        if stop is not None:
            stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def collect(self, pattern: str, **kwargs: Any) -> list[Envelope[Any]]:
        """Subscribe a recording handler to ``pattern``; return its list."""
        got: list[Envelope[Any]] = []
        self.bus.subscribe(pattern, got.append, **kwargs)
        return got

    def deliver(self) -> None:
        """Run every delivery that is due (several rounds)."""
        for _ in range(100):
            if not self.clock.getDelayedCalls():
                return
            self.clock.advance(0)

    # -- the interface

    def test_provides_interface(self) -> None:
        """The bus and its subscriptions provide their interfaces."""
        self.assertTrue(verifyObject(IEventBus, self.bus))
        sub = self.bus.subscribe("test.ping", lambda env: None)
        self.assertTrue(verifyObject(ISubscription, sub))

    # -- publishing

    def test_publish_returns_envelope_with_context(self) -> None:
        """publish() returns the envelope: topic, event, clock time, source, correlation id."""
        self.clock.advance(42.5)
        event = Ping(1)
        env = self.bus.publish(event, source="api", correlation_id="cmd-7")
        self.assertEqual(env.topic, "test.ping")
        self.assertIs(env.event, event)
        self.assertEqual(env.context.time, 42.5)
        self.assertEqual(env.context.source, "api")
        self.assertEqual(env.context.correlation_id, "cmd-7")
        self.assertIsInstance(env.context.event_id, str)
        self.assertTrue(env.context.event_id)

    def test_context_defaults(self) -> None:
        """Without source or correlation id the context carries "" and None."""
        env = self.bus.publish(Ping())
        self.assertEqual((env.context.source, env.context.correlation_id), ("", None))

    def test_event_ids_are_unique(self) -> None:
        """Every publication gets its own event id."""
        ids = {self.bus.publish(Ping(i)).context.event_id for i in range(500)}
        self.assertEqual(len(ids), 500)

    def test_subscriber_receives_the_published_envelope(self) -> None:
        """A subscriber receives the very envelope publish() returned."""
        got = self.collect("test.ping")
        env = self.bus.publish(Ping(3), source="s")
        self.deliver()
        self.assertEqual(len(got), 1)
        self.assertIs(got[0], env)

    def test_publish_topic_override(self) -> None:
        """publish(topic=...) publishes on that topic instead of the class's."""
        on_class = self.collect("test.ping")
        on_other = self.collect("test.other")
        env = self.bus.publish(Ping(1), topic="test.other")
        self.deliver()
        self.assertEqual(env.topic, "test.other")
        self.assertEqual(on_class, [])
        self.assertEqual(ns(on_other), [1])

    def test_publish_rejects_malformed_topics(self) -> None:
        """A malformed topic raises InvalidCommand and delivers nothing."""
        got = self.collect("#")
        for topic in BAD_TOPICS:
            with self.subTest(topic=topic):
                self.assertRaises(InvalidCommand, self.bus.publish, Ping(), topic=topic)
        self.deliver()
        self.assertEqual(got, [])

    def test_publish_rejects_event_without_topic(self) -> None:
        """An event class without a topic cannot be published without one."""
        self.assertRaises(InvalidCommand, self.bus.publish, Event())

    def test_publish_rejects_non_events(self) -> None:
        """Only Event instances can be published."""
        bad: Any = "hello"
        self.assertRaises(InvalidCommand, self.bus.publish, bad)
        self.assertRaises(InvalidCommand, self.bus.publish, object(), topic="test.x")

    def test_publish_without_subscribers(self) -> None:
        """Publishing with nobody subscribed is fine and schedules nothing."""
        self.bus.publish(Ping())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # -- subscribing

    def test_subscribe_rejects_malformed_patterns(self) -> None:
        """A malformed pattern raises InvalidCommand."""
        for pattern in BAD_PATTERNS:
            with self.subTest(pattern=pattern):
                self.assertRaises(InvalidCommand, self.bus.subscribe, pattern, lambda env: None)

    def test_subscribe_rejects_bad_arguments(self) -> None:
        """A bad queue size, overflow policy, handler, filter or name raises InvalidCommand."""
        cases: list[dict[str, Any]] = [
            {"max_queue": 0},
            {"max_queue": -1},
            {"max_queue": 1.5},
            {"max_queue": True},
            {"max_queue": "10"},
            {"overflow": "drop-oldest"},
            {"handler": "not callable"},
            {"filter": 42},
            {"name": 42},
        ]
        for case in cases:
            with self.subTest(**case):
                kwargs: dict[str, Any] = {"handler": lambda env: None, **case}
                self.assertRaises(InvalidCommand, self.bus.subscribe, "test.ping", **kwargs)

    def test_subscription_attributes(self) -> None:
        """A subscription exposes its pattern, its name (default: the handler's) and state."""

        def on_ping(env: Envelope[Any]) -> None:
            pass

        sub = self.bus.subscribe("test.*", on_ping)
        self.assertEqual(sub.pattern, "test.*")
        self.assertIn("on_ping", sub.name)
        self.assertTrue(sub.active)
        named = self.bus.subscribe("test.*", on_ping, name="pinger")
        self.assertEqual(named.name, "pinger")
        stats = named.stats()
        self.assertEqual((stats.name, stats.pattern), ("pinger", "test.*"))

    # -- patterns

    def received(self, pattern: str, topics: list[str]) -> list[str]:
        """Publish one Ping on each topic; return the topics ``pattern`` received."""
        got = self.collect(pattern)
        for topic in topics:
            self.bus.publish(Ping(), topic=topic)
        self.deliver()
        return [env.topic for env in got]

    def test_exact_pattern(self) -> None:
        """An exact pattern matches only its own topic."""
        topics = ["test.ping", "test.ping.x", "test", "test.pingx", "xtest.ping"]
        self.assertEqual(self.received("test.ping", topics), ["test.ping"])

    def test_star_matches_exactly_one_segment(self) -> None:
        """``*`` matches exactly one segment, never zero or two."""
        topics = ["test.a", "test.ping", "test", "test.a.b", "other.a", "tests.a"]
        self.assertEqual(self.received("test.*", topics), ["test.a", "test.ping"])

    def test_star_in_the_middle(self) -> None:
        """``a.*.c`` matches one segment between ``a`` and ``c``."""
        topics = ["a.b.c", "a.c", "a.b.b.c", "a.x.c", "a.b.cd"]
        self.assertEqual(self.received("a.*.c", topics), ["a.b.c", "a.x.c"])

    def test_leading_star(self) -> None:
        """``*.c`` matches any first segment followed by ``c``."""
        self.assertEqual(self.received("*.c", ["a.c", "c", "a.b.c", "b.c"]), ["a.c", "b.c"])

    def test_hash_matches_zero_or_more_segments(self) -> None:
        """A trailing ``#`` matches zero or more segments."""
        topics = ["test", "test.a", "test.a.b", "tests", "other.test", "tes"]
        self.assertEqual(self.received("test.#", topics), ["test", "test.a", "test.a.b"])

    def test_hash_alone_matches_everything(self) -> None:
        """``#`` alone matches every topic."""
        topics = ["a", "a.b", "x.y.z", "device"]
        self.assertEqual(self.received("#", topics), topics)

    def test_star_then_hash(self) -> None:
        """``a.*.#`` needs at least one segment after ``a``."""
        topics = ["a", "a.b", "a.b.c", "b.c"]
        self.assertEqual(self.received("a.*.#", topics), ["a.b", "a.b.c"])

    def test_subscriptions_made_after_publishing_see_later_events(self) -> None:
        """A subscription made after a topic was used receives its later events."""
        self.bus.publish(Ping(0))
        self.deliver()
        exact = self.collect("test.ping")
        wild = self.collect("test.*")
        self.bus.publish(Ping(1))
        self.deliver()
        self.assertEqual((ns(exact), ns(wild)), ([1], [1]))

    # -- delivery

    def test_delivery_is_asynchronous(self) -> None:
        """Nothing is delivered during publish(); delivery waits for the clock."""
        got = self.collect("test.ping")
        self.bus.publish(Ping())
        self.assertEqual(got, [])
        self.clock.advance(0)
        self.assertEqual(len(got), 1)

    def test_delivery_is_never_reentrant(self) -> None:
        """A handler that publishes is not re-entered by that publication."""
        trace: list[str] = []

        def first(env: Envelope[Any]) -> None:
            trace.append(f"first-start-{env.event.n}")
            if env.event.n == 0:
                self.bus.publish(Ping(1))
                self.bus.publish(Ping(0), topic="test.other")
            trace.append(f"first-end-{env.event.n}")

        self.bus.subscribe("test.ping", first)
        self.bus.subscribe("test.other", lambda env: trace.append("other"))
        self.bus.publish(Ping(0))
        self.deliver()
        self.assertEqual(trace[:2], ["first-start-0", "first-end-0"])
        self.assertEqual(
            sorted(trace),
            sorted(["first-start-0", "first-end-0", "first-start-1", "first-end-1", "other"]),
        )

    def test_fifo_per_subscriber(self) -> None:
        """Each subscriber receives events in publication order."""
        exact = self.collect("test.ping")
        wild = self.collect("#")
        for i in range(300):
            self.bus.publish(Ping(i))
        self.deliver()
        self.assertEqual(ns(exact), list(range(300)))
        self.assertEqual(ns(wild), list(range(300)))

    @staticmethod
    def _note(order: list[str], name: str, env: Envelope[Any]) -> None:
        order.append(name)

    def test_fan_out_follows_subscription_order(self) -> None:
        """Subscribers of one event are served in the order they subscribed."""
        order: list[str] = []
        self.bus.publish(Ping())  # the topic is known before the subscriptions
        for name, pattern in [
            ("w1", "#"),
            ("e1", "test.ping"),
            ("w2", "test.*"),
            ("e2", "test.ping"),
        ]:
            self.bus.subscribe(pattern, functools.partial(self._note, order, name))
        self.bus.publish(Ping())
        self.deliver()
        self.assertEqual(order, ["w1", "e1", "w2", "e2"])

    def test_fifo_across_topics_for_wildcards(self) -> None:
        """A wildcard subscriber receives events of several topics in publication order."""
        got = self.collect("#")
        for i in range(20):
            self.bus.publish(Ping(i), topic=f"test.t{i % 3}")
        self.deliver()
        self.assertEqual(ns(got), list(range(20)))

    def test_one_deferred_in_flight(self) -> None:
        """A handler's unfired Deferred holds back that subscriber's next event."""
        calls: list[int] = []
        pending: list[Deferred[None]] = []

        def handler(env: Envelope[Any]) -> Deferred[None]:
            calls.append(env.event.n)
            d: Deferred[None] = Deferred()
            pending.append(d)
            return d

        self.bus.subscribe("test.ping", handler)
        for i in range(3):
            self.bus.publish(Ping(i))
        self.deliver()
        self.assertEqual(calls, [0])
        self.clock.advance(100)
        self.assertEqual(calls, [0])
        pending[0].callback(None)
        self.assertEqual(calls, [0], "the next event must not be delivered re-entrantly")
        self.deliver()
        self.assertEqual(calls, [0, 1])
        pending[1].callback(None)
        self.deliver()
        self.assertEqual(calls, [0, 1, 2])
        pending[2].callback(None)
        self.successResultOf(self.bus.drain())

    def test_one_coroutine_in_flight(self) -> None:
        """An ``async def`` handler holds back the next event until it returns."""
        calls: list[str] = []
        gates: list[Deferred[None]] = []

        async def handler(env: Envelope[Any]) -> None:
            calls.append(f"start-{env.event.n}")
            gate: Deferred[None] = Deferred()
            gates.append(gate)
            await gate
            calls.append(f"end-{env.event.n}")

        self.bus.subscribe("test.ping", handler)
        self.bus.publish(Ping(0))
        self.bus.publish(Ping(1))
        self.deliver()
        self.assertEqual(calls, ["start-0"])
        gates[0].callback(None)
        self.deliver()
        self.assertEqual(calls, ["start-0", "end-0", "start-1"])
        gates[1].callback(None)
        self.assertEqual(calls[-1], "end-1")
        self.successResultOf(self.bus.drain())

    def test_already_fired_results_do_not_stall(self) -> None:
        """Handlers returning fired Deferreds or finished coroutines get every event."""
        got: list[int] = []

        def with_deferred(env: Envelope[Any]) -> Deferred[None]:
            got.append(env.event.n)
            return succeed(None)

        async def with_coroutine(env: Envelope[Any]) -> None:
            got.append(-env.event.n)

        self.bus.subscribe("test.ping", with_deferred)
        self.bus.subscribe("test.ping", with_coroutine)
        for i in range(1, 4):
            self.bus.publish(Ping(i))
        self.deliver()
        self.assertEqual(sorted(got), [-3, -2, -1, 1, 2, 3])

    def test_handler_returning_a_plain_value(self) -> None:
        """A handler's plain (non-awaitable) return value is ignored."""
        got: list[int] = []

        def handler(env: Envelope[Any]) -> int:
            got.append(env.event.n)
            return 42

        self.bus.subscribe("test.ping", handler)
        self.bus.publish(Ping(1))
        self.bus.publish(Ping(2))
        self.deliver()
        self.assertEqual(got, [1, 2])

    def test_slow_subscriber_does_not_delay_others(self) -> None:
        """A subscriber blocked on a Deferred does not hold back another."""
        self.bus.subscribe("test.ping", lambda env: Deferred())
        fast = self.collect("test.ping")
        for i in range(5):
            self.bus.publish(Ping(i))
        self.deliver()
        self.assertEqual(ns(fast), [0, 1, 2, 3, 4])

    def test_raising_handler_is_isolated(self) -> None:
        """A raising handler is logged; it and the others still get later events."""
        seen: list[int] = []

        def flaky(env: Envelope[Any]) -> None:
            seen.append(env.event.n)
            if env.event.n == 1:
                raise Boom("subscriber bug")

        self.bus.subscribe("test.ping", flaky)
        other = self.collect("test.ping")
        for i in range(4):
            self.bus.publish(Ping(i))
        self.deliver()
        self.assertEqual(seen, [0, 1, 2, 3])
        self.assertEqual(ns(other), [0, 1, 2, 3])
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)

    def test_failing_deferred_is_isolated(self) -> None:
        """A handler whose Deferred fails is logged and gets the next events."""
        seen: list[int] = []
        pending: list[Deferred[None]] = []

        def handler(env: Envelope[Any]) -> Deferred[None]:
            seen.append(env.event.n)
            if env.event.n == 0:
                return fail(Boom("at once"))
            d: Deferred[None] = Deferred()
            pending.append(d)
            return d

        self.bus.subscribe("test.ping", handler)
        for i in range(3):
            self.bus.publish(Ping(i))
        self.deliver()
        self.assertEqual(seen, [0, 1])
        pending[0].errback(Boom("later"))
        self.deliver()
        self.assertEqual(seen, [0, 1, 2])
        pending[1].callback(None)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 2)
        self.successResultOf(self.bus.drain())

    def test_failing_coroutine_is_isolated(self) -> None:
        """An ``async def`` handler that raises is logged and gets the next events."""
        seen: list[int] = []

        async def handler(env: Envelope[Any]) -> None:
            seen.append(env.event.n)
            raise Boom("coroutine")

        self.bus.subscribe("test.ping", handler)
        self.bus.publish(Ping(0))
        self.bus.publish(Ping(1))
        self.deliver()
        self.assertEqual(seen, [0, 1])
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 2)

    # -- filters

    def test_filter_runs_at_publish_time(self) -> None:
        """The filter sees each envelope during publish(); rejected ones are not delivered."""
        seen: list[int] = []

        def even(env: Envelope[Any]) -> bool:
            n: int = env.event.n
            seen.append(n)
            return n % 2 == 0

        got = self.collect("test.ping", filter=even)
        for i in range(5):
            self.bus.publish(Ping(i))
        self.assertEqual(seen, [0, 1, 2, 3, 4])
        self.assertEqual(got, [])
        self.deliver()
        self.assertEqual(ns(got), [0, 2, 4])

    def test_filtered_events_take_no_queue_room(self) -> None:
        """Rejected events are never queued, so they cannot push accepted ones out."""
        got = self.collect(
            "test.ping",
            filter=lambda env: env.event.n % 2 == 0,
            max_queue=2,
            overflow=Overflow.DROP_NEWEST,
        )
        for i in range(6):
            self.bus.publish(Ping(i))
        self.deliver()
        self.assertEqual(ns(got), [0, 2])

    def test_raising_filter_is_isolated(self) -> None:
        """A raising filter is logged; publish() does not raise and others still receive."""

        def bad(env: Envelope[Any]) -> bool:
            raise Boom("filter bug")

        rejected = self.collect("test.ping", filter=bad)
        other = self.collect("test.ping")
        self.bus.publish(Ping(1))
        self.deliver()
        self.assertEqual(rejected, [])
        self.assertEqual(ns(other), [1])
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)

    # -- bounded queues

    def test_drop_oldest(self) -> None:
        """DROP_OLDEST keeps the newest ``max_queue`` events."""
        got = self.collect("test.ping", max_queue=3, overflow=Overflow.DROP_OLDEST)
        for i in range(10):
            self.bus.publish(Ping(i))
        self.deliver()
        self.assertEqual(ns(got), [7, 8, 9])

    def test_drop_newest(self) -> None:
        """DROP_NEWEST keeps the oldest ``max_queue`` events."""
        got = self.collect("test.ping", max_queue=3, overflow=Overflow.DROP_NEWEST)
        for i in range(10):
            self.bus.publish(Ping(i))
        self.deliver()
        self.assertEqual(ns(got), [0, 1, 2])

    def test_default_queue_is_bounded(self) -> None:
        """The default queue holds 1000 events and drops the oldest."""
        got = self.collect("test.ping")
        for i in range(1500):
            self.bus.publish(Ping(i))
        self.deliver()
        self.assertEqual(ns(got), list(range(500, 1500)))

    def test_coalesce_keeps_latest_per_key_at_the_tail(self) -> None:
        """COALESCE keeps the latest event per key, moved to the tail (publication order)."""
        got = self.collect("test.ping", overflow=Overflow.COALESCE)
        for n, k in enumerate("abacb"):
            self.bus.publish(Ping(n, k))
        self.deliver()
        self.assertEqual([(e.event.n, e.event.k) for e in got], [(2, "a"), (3, "c"), (4, "b")])

    def test_coalesce_keys_are_per_topic(self) -> None:
        """COALESCE only merges events of the same topic and key."""
        got = self.collect("test.*", overflow=Overflow.COALESCE)
        self.bus.publish(Ping(0, "a"), topic="test.one")
        self.bus.publish(Ping(1, "a"), topic="test.two")
        self.bus.publish(Ping(2, "a"), topic="test.one")
        self.deliver()
        self.assertEqual([(e.topic, e.event.n) for e in got], [("test.two", 1), ("test.one", 2)])

    def test_coalesce_full_of_distinct_keys_drops_oldest(self) -> None:
        """When a COALESCE queue is full of distinct keys, the oldest event is dropped."""
        got = self.collect("test.ping", max_queue=2, overflow=Overflow.COALESCE)
        for n, k in enumerate("abc"):
            self.bus.publish(Ping(n, k))
        self.deliver()
        self.assertEqual([e.event.k for e in got], ["b", "c"])

    def test_in_flight_event_is_not_queued(self) -> None:
        """The event being handled does not count against the queue bound."""
        calls: list[int] = []
        pending: list[Deferred[None]] = []

        def handler(env: Envelope[Any]) -> Deferred[None]:
            calls.append(env.event.n)
            d: Deferred[None] = Deferred()
            pending.append(d)
            return d

        self.bus.subscribe("test.ping", handler, max_queue=2, overflow=Overflow.DROP_NEWEST)
        self.bus.publish(Ping(0))
        self.deliver()
        for i in range(1, 5):
            self.bus.publish(Ping(i))
        for _ in range(3):
            pending[-1].callback(None)
            self.deliver()
        self.assertEqual(calls, [0, 1, 2])

    # -- retained topics

    def test_retained_keeps_last_per_topic_and_key(self) -> None:
        """A retained event class keeps its last envelope per (topic, key)."""
        self.bus.publish(State("x", "a"))
        b = self.bus.publish(State("x", "b"))
        a = self.bus.publish(State("y", "a"))
        self.assertIs(self.bus.last("test.state", "a"), a)
        self.assertIs(self.bus.last("test.state", "b"), b)
        self.assertIsNone(self.bus.last("test.state", "c"))
        self.assertEqual(list(self.bus.retained("test.state")), [b, a])

    def test_retained_without_subscribers(self) -> None:
        """Retained values are kept even when nobody subscribes."""
        env = self.bus.publish(State("on"))
        self.assertIs(self.bus.last("test.state"), env)

    def test_non_retained_events_are_not_kept(self) -> None:
        """Events of non-retained classes are never retained."""
        self.bus.publish(Ping(1))
        self.assertIsNone(self.bus.last("test.ping"))
        self.assertEqual(list(self.bus.retained("#")), [])

    def test_retained_under_topic_override(self) -> None:
        """A retained event published on another topic is retained under that topic."""
        env = self.bus.publish(State("v"), topic="test.elsewhere")
        self.assertIsNone(self.bus.last("test.state"))
        self.assertIs(self.bus.last("test.elsewhere"), env)

    def test_retained_by_pattern(self) -> None:
        """retained(pattern) returns only the matching topics."""
        s = self.bus.publish(State("v"))
        o = self.bus.publish(State("w"), topic="other.state")
        self.assertEqual(list(self.bus.retained("test.*")), [s])
        self.assertEqual(list(self.bus.retained("other.#")), [o])
        self.assertEqual(list(self.bus.retained("#")), [s, o])
        self.assertEqual(list(self.bus.retained("nothing")), [])

    def test_retained_and_last_reject_bad_input(self) -> None:
        """retained() and last() raise InvalidCommand for malformed patterns and topics."""
        self.assertRaises(InvalidCommand, self.bus.retained, "a..b")
        self.assertRaises(InvalidCommand, self.bus.last, "a.*")

    def test_replay_retained_first(self) -> None:
        """With replay_retained, matching retained envelopes come first, oldest first."""
        self.bus.publish(State("1", "a"))
        self.bus.publish(State("1", "b"))
        self.bus.publish(State("2", "a"))
        self.bus.publish(Ping(9))
        got = self.collect("test.*", replay_retained=True)
        self.bus.publish(State("3", "b"))
        self.deliver()
        self.assertEqual(
            [(e.event.k, e.event.value) for e in got], [("b", "1"), ("a", "2"), ("b", "3")]
        )

    def test_no_replay_by_default(self) -> None:
        """Without replay_retained a subscriber only sees later events."""
        self.bus.publish(State("1"))
        got = self.collect("test.state")
        self.deliver()
        self.assertEqual(got, [])

    def test_replay_is_asynchronous(self) -> None:
        """Replayed events are delivered by the clock, not inside subscribe()."""
        self.bus.publish(State("1"))
        got = self.collect("test.state", replay_retained=True)
        self.assertEqual(got, [])
        self.deliver()
        self.assertEqual(len(got), 1)

    def test_replay_respects_filter_and_pattern(self) -> None:
        """Replay only queues retained envelopes that match the pattern and pass the filter."""
        self.bus.publish(State("1", "a"))
        self.bus.publish(State("1", "b"))
        self.bus.publish(State("1", "a"), topic="other.state")
        got = self.collect(
            "test.state", replay_retained=True, filter=lambda env: env.event.k == "b"
        )
        self.deliver()
        self.assertEqual([(e.topic, e.event.k) for e in got], [("test.state", "b")])

    # -- cancel

    def test_cancel_discards_queued_events(self) -> None:
        """A cancelled subscription receives nothing more, not even what was queued."""
        got: list[Envelope[Any]] = []
        sub = self.bus.subscribe("test.ping", got.append)
        self.bus.publish(Ping(1))
        self.successResultOf(sub.cancel())
        self.assertFalse(sub.active)
        self.bus.publish(Ping(2))
        self.deliver()
        self.assertEqual(got, [])

    def test_cancel_is_idempotent(self) -> None:
        """Cancelling twice is harmless and fires at once when nothing is in flight."""
        sub = self.bus.subscribe("test.ping", lambda env: None)
        self.assertIsNone(self.successResultOf(sub.cancel()))
        self.assertIsNone(self.successResultOf(sub.cancel()))

    def test_cancel_waits_for_in_flight_delivery(self) -> None:
        """cancel() fires only once the in-flight handler Deferred has fired."""
        pending: list[Deferred[None]] = []

        def handler(env: Envelope[Any]) -> Deferred[None]:
            d: Deferred[None] = Deferred()
            pending.append(d)
            return d

        sub = self.bus.subscribe("test.ping", handler)
        self.bus.publish(Ping(0))
        self.bus.publish(Ping(1))
        self.deliver()
        first = sub.cancel()
        second = sub.cancel()
        self.assertNoResult(first)
        self.assertNoResult(second)
        pending[0].callback(None)
        self.successResultOf(first)
        self.successResultOf(second)
        self.deliver()
        self.assertEqual(len(pending), 1)

    def test_cancel_from_inside_the_handler(self) -> None:
        """A handler that cancels its own subscription receives nothing after that."""
        got: list[int] = []
        subs: list[Any] = []

        def handler(env: Envelope[Any]) -> None:
            got.append(env.event.n)
            if env.event.n == 2:
                subs[0].cancel()

        subs.append(self.bus.subscribe("test.ping", handler))
        other = self.collect("test.ping")
        for i in range(6):
            self.bus.publish(Ping(i))
        self.deliver()
        self.assertEqual(got, [0, 1, 2])
        self.assertEqual(ns(other), list(range(6)))
        self.assertFalse(subs[0].active)
        self.successResultOf(self.bus.drain())

    def test_cancel_keeps_other_subscriptions(self) -> None:
        """Cancelling one subscription leaves the others on the same topic alone."""
        sub = self.bus.subscribe("test.ping", lambda env: None)
        exact = self.collect("test.ping")
        wild = self.collect("test.#")
        wild_sub = self.bus.subscribe("test.#", lambda env: None)
        sub.cancel()
        wild_sub.cancel()
        self.bus.publish(Ping(1))
        self.deliver()
        self.assertEqual((ns(exact), ns(wild)), ([1], [1]))

    # -- drain

    def test_drain_when_idle(self) -> None:
        """drain() fires at once when nothing is queued or in flight."""
        self.successResultOf(self.bus.drain())

    def test_drain_waits_for_queues(self) -> None:
        """drain() fires once every queue has been delivered."""
        got = self.collect("test.ping")
        for i in range(3):
            self.bus.publish(Ping(i))
        drained = self.bus.drain()
        self.assertNoResult(drained)
        self.deliver()
        self.successResultOf(drained)
        self.assertEqual(len(got), 3)

    def test_drain_waits_for_in_flight(self) -> None:
        """drain() waits for a handler's Deferred."""
        pending: Deferred[None] = Deferred()
        self.bus.subscribe("test.ping", lambda env: pending)
        self.bus.publish(Ping())
        drained = self.bus.drain()
        self.deliver()
        self.assertNoResult(drained)
        pending.callback(None)
        self.successResultOf(drained)

    def test_drain_waits_for_every_busy_subscriber(self) -> None:
        """drain() waits for a blocked subscriber even after others finished many events."""
        pending: Deferred[None] = Deferred()
        self.bus.subscribe("test.ping", lambda env: pending if env.event.n == 0 else None)
        self.bus.subscribe("test.ping", lambda env: succeed(None))
        self.bus.subscribe("test.#", lambda env: None)
        for i in range(5):
            self.bus.publish(Ping(i))
        drained = self.bus.drain()
        self.deliver()
        self.assertNoResult(drained)
        self.assertNoResult(self.bus.drain())
        pending.callback(None)
        self.assertNoResult(drained)
        self.deliver()
        self.successResultOf(drained)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # -- stats

    def test_stats_shape(self) -> None:
        """stats() reports topics, subscriptions and the totals."""
        self.bus.subscribe("test.ping", lambda env: None, name="n")
        self.bus.publish(Ping())
        self.deliver()
        stats = self.bus.stats()
        self.assertEqual(
            set(stats),
            {"topics", "subscriptions", "published", "delivered", "dropped", "failed"},
        )
        self.assertEqual(stats["published"], 1)
        self.assertEqual([t.topic for t in stats["topics"]], ["test.ping"])
        self.assertEqual([s.name for s in stats["subscriptions"]], ["n"])
