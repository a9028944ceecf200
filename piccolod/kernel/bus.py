"""
The kernel's in-memory event bus: :class:`MemoryEventBus`.

Guarantees (see :class:`piccolod.interfaces.IEventBus`):

- **Topics and patterns.**  A topic is one or more dot-separated segments of
  ``[A-Za-z0-9_-]``.  A pattern is a topic whose segments may also be ``*``
  (exactly one segment) and whose *last* segment may be ``#`` (zero or more
  segments; ``#`` alone matches every topic).  Anything else raises
  ``InvalidCommand``.
- **Filters run before queueing.**  A rejected event is counted as
  ``filtered`` and never queued; a filter that raises is logged and counted
  as ``failed``.
- **Bounded queues.**  Each subscription has its own queue of at most
  ``max_queue`` envelopes and an overflow policy:

  - ``DROP_OLDEST`` evicts the oldest queued envelope for the new one;
  - ``DROP_NEWEST`` refuses the new envelope;
  - ``COALESCE`` never holds two envelopes of one ``(topic, event.key())``:
    a new envelope *replaces* the queued one of its key, which is removed
    from its place and the new one appended at the tail, so the queue stays
    in publication order and FIFO holds for what is delivered (counted as
    ``coalesced``).  When the queue is full of distinct keys, the oldest
    envelope is dropped.

  Every drop is counted (per subscription and per topic) and logged at
  ``warn`` level, at most one line per subscription per
  ``drop_log_interval`` seconds of clock time (the line says how many were
  dropped since the last one; a timer makes sure the last drops are logged
  too).
- **Delivery** is scheduled with ``clock.callLater(0, ...)``: never
  re-entrant into ``publish``, FIFO per subscription, and at most one
  delivery in flight per subscription: a handler returning a Deferred, a
  coroutine or another awaitable holds back the next event until it
  completes.  Synchronous handlers are called in a tight loop of at most
  ``batch`` events per reactor turn (then the rest is rescheduled, so one
  busy subscription cannot starve the reactor).
- **Isolation.**  A handler that raises or fails is logged with
  ``log.failure`` and counted as ``failed``; other subscriptions and the next
  events are unaffected.
- **Retained topics.**  For event classes with ``retained = True`` the bus
  keeps the last envelope per ``(topic, event.key())``; ``replay_retained``
  queues the matching ones first, oldest publication first.
- **Stop.**  :meth:`MemoryEventBus.stop` cancels every subscription (queued
  events are dropped and counted) and waits for in-flight handler Deferreds
  (buildbot's ``DeferWaiter`` idea).  Afterwards ``publish`` still records
  retained values and counts, but delivers nothing.

Speed: ``publish`` resolves a topic's subscriptions once and caches the
result (invalidated by ``subscribe`` and ``cancel``); it appends to each
subscription's ``deque`` and schedules one ``callLater`` per subscription
only when that subscription goes from idle to busy.  See
``benchmarks/bus.py``.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import re
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.errors import InvalidCommand
from piccolod.events import Envelope, Event, EventContext
from piccolod.interfaces import (
    EventFilter,
    Handler,
    IEventBus,
    ISubscription,
    Overflow,
    SubscriptionStats,
    TopicStats,
)
from piccolod.kernel.aio import to_deferred

__all__ = [
    "MAX_TOPIC_LENGTH",
    "MemoryEventBus",
    "Subscription",
    "TopicPattern",
    "check_topic",
    "parse_pattern",
]

#: The longest topic or pattern accepted.
MAX_TOPIC_LENGTH = 255

_SEGMENT = r"[A-Za-z0-9_\-]+"
_TOPIC_RE = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_SEGMENT_RE = re.compile(_SEGMENT)


def check_topic(topic: object) -> str:
    """Return ``topic`` if it is a well-formed topic; raise ``InvalidCommand``."""
    if (
        not isinstance(topic, str)
        or len(topic) > MAX_TOPIC_LENGTH
        or _TOPIC_RE.fullmatch(topic) is None
    ):
        raise InvalidCommand(
            f"malformed topic {topic!r}: expected dot-separated segments of [A-Za-z0-9_-]"
        )
    return topic


@attrs.frozen
class TopicPattern:
    """
    A parsed subscription pattern.

    @ivar exact: the pattern has no wildcard (it is a topic).
    """

    pattern: str
    exact: bool
    _regex: re.Pattern[str] | None = attrs.field(repr=False)

    def matches(self, topic: str) -> bool:
        """Whether ``topic`` matches this pattern."""
        if self._regex is None:
            return topic == self.pattern
        return self._regex.fullmatch(topic) is not None


def parse_pattern(pattern: object) -> TopicPattern:
    """Parse a subscription pattern; raise ``InvalidCommand`` when malformed."""
    if not isinstance(pattern, str):
        raise InvalidCommand(f"malformed topic pattern {pattern!r}: not a string")
    return _parse_pattern(pattern)


@functools.lru_cache(maxsize=1024)
def _parse_pattern(pattern: str) -> TopicPattern:
    segments = pattern.split(".")
    if not pattern or len(pattern) > MAX_TOPIC_LENGTH:
        raise InvalidCommand(f"malformed topic pattern {pattern!r}")
    parts: list[str] = []
    tail = False
    for index, segment in enumerate(segments):
        if segment == "#":
            if index != len(segments) - 1:
                raise InvalidCommand(
                    f"malformed topic pattern {pattern!r}: '#' must be the last segment"
                )
            tail = True
        elif segment == "*":
            parts.append(r"[^.]+")
        elif _SEGMENT_RE.fullmatch(segment) is not None:
            parts.append(re.escape(segment))
        else:
            raise InvalidCommand(
                f"malformed topic pattern {pattern!r}: bad segment {segment!r} "
                "(expected [A-Za-z0-9_-]+, '*' or a final '#')"
            )
    if not tail and "*" not in segments:
        return TopicPattern(pattern, True, None)
    body = r"\.".join(parts)
    if tail:
        body = body + r"(?:\..+)?" if parts else r".+"
    return TopicPattern(pattern, False, re.compile(body))


class _Queue(Protocol):
    """What the delivery loop needs of a subscription's queue."""

    def append(self, envelope: Envelope[Any], /) -> None: ...
    def popleft(self) -> Envelope[Any]: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Envelope[Any]]: ...


class _CoalescingQueue:
    """
    An insertion-ordered queue holding at most one envelope per
    ``(topic, event.key())``.  ``append`` assumes the key is absent (the
    caller checks with :meth:`replace` first).
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: OrderedDict[tuple[str, str], Envelope[Any]] = OrderedDict()

    def append(self, envelope: Envelope[Any], /) -> None:
        self._items[(envelope.topic, envelope.event.key())] = envelope

    def replace(self, envelope: Envelope[Any]) -> bool:
        """Replace the queued envelope of the same key, moving it to the tail."""
        key = (envelope.topic, envelope.event.key())
        items = self._items
        if key not in items:
            return False
        items[key] = envelope
        items.move_to_end(key)
        return True

    def popleft(self) -> Envelope[Any]:
        try:
            return self._items.popitem(last=False)[1]
        except KeyError:
            raise IndexError("pop from an empty queue") from None

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Envelope[Any]]:
        return iter(list(self._items.values()))


#: One cached fan-out entry: (subscription, its queue, the length at which
#: the slow path runs, its filter).
_FanOut = tuple[tuple["Subscription", _Queue, int, EventFilter | None], ...]


@attrs.define(eq=False)
class _Route:
    """A topic's counters and its cached fan-out (``None`` once stale)."""

    topic: str
    fanout: _FanOut | None = None
    published: int = 0
    delivered: int = 0
    dropped: int = 0
    failed: int = 0


def _handler_name(handler: object) -> str:
    name = getattr(handler, "__qualname__", None) or getattr(handler, "__name__", None)
    return name if isinstance(name, str) else repr(handler)


@implementer(ISubscription)
@attrs.define(eq=False, repr=False)
class Subscription:
    """
    One subscription of a :class:`MemoryEventBus`; built by
    :meth:`MemoryEventBus.subscribe`.

    States: *idle* (empty queue, nothing scheduled), *busy* (a delivery call
    is scheduled, running, or a handler's Deferred is in flight).  A
    non-empty queue always implies busy, so ``publish`` only has to look at
    the state when the queue was empty.
    """

    log: ClassVar[Logger] = Logger()

    _bus: MemoryEventBus
    pattern: str
    handler: Handler
    filter: EventFilter | None
    max_queue: int
    overflow: Overflow
    name: str
    _seq: int
    _matcher: TopicPattern
    active: bool = True
    delivered: int = 0
    dropped: int = 0
    filtered: int = 0
    failed: int = 0
    coalesced: int = 0
    _queue: _Queue = attrs.field(init=False)
    #: the route of an exact pattern (counted in bulk), None for wildcards
    _route: _Route | None = attrs.field(init=False, default=None)
    _deliver: Handler = attrs.field(init=False)
    _busy: bool = attrs.field(init=False, default=False)
    _running: bool = attrs.field(init=False, default=False)
    _call: IDelayedCall | None = attrs.field(init=False, default=None)
    _inflight: Deferred[Any] | None = attrs.field(init=False, default=None)
    _cancel_waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _unlogged_drops: int = attrs.field(init=False, default=0)
    _drop_log_after: float = attrs.field(init=False, default=float("-inf"))
    _drop_log_call: IDelayedCall | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._queue = _CoalescingQueue() if self.overflow is Overflow.COALESCE else deque()
        self._deliver = self.handler if self._matcher.exact else self._topic_counting()

    def _topic_counting(self) -> Handler:
        """
        Wrap the handler of a wildcard subscription so that synchronous
        deliveries are counted per topic (an exact subscription's topic is
        counted in bulk after each batch).
        """
        handler = self.handler
        routes = self._bus._routes

        def deliver(envelope: Envelope[Any]) -> Any:
            result = handler(envelope)
            if result is not None and (isinstance(result, Deferred) or inspect.isawaitable(result)):
                return result
            routes[envelope.topic].delivered += 1
            return None

        return deliver

    def __repr__(self) -> str:
        return (
            f"<Subscription {self.name!r} on {self.pattern!r} "
            f"queued={len(self._queue)} active={self.active}>"
        )

    # -- ISubscription

    def cancel(self) -> Deferred[None]:
        if self.active:
            self.active = False
            bus = self._bus
            bus._forget(self)
            if self._call is not None:
                self._call.cancel()
                self._call = None
            if self._drop_log_call is not None:
                self._drop_log_call.cancel()
                self._drop_log_call = None
            self._log_drops("queue full")
            self._discard("cancelled")
            if self._busy and not self._running and self._inflight is None:
                self._set_idle()
        if not self._busy:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._cancel_waiters.append(waiter)
        return waiter

    def stats(self) -> SubscriptionStats:
        return SubscriptionStats(
            name=self.name,
            pattern=self.pattern,
            queued=len(self._queue),
            max_queue=self.max_queue,
            overflow=self.overflow,
            delivered=self.delivered,
            dropped=self.dropped,
            filtered=self.filtered,
            failed=self.failed,
            coalesced=self.coalesced,
        )

    # -- queueing (the slow path; MemoryEventBus.publish inlines the fast one)

    def _fanout_entry(self) -> tuple[Subscription, _Queue, int, EventFilter | None]:
        # COALESCE must look at every enqueue into a non-empty queue, so its
        # threshold is -1: the slow path (_overflow) always runs.
        limit = -1 if self.overflow is Overflow.COALESCE else self.max_queue
        return (self, self._queue, limit, self.filter)

    def _offer(self, envelope: Envelope[Any]) -> None:
        """Filter and queue one envelope (replay and slow paths)."""
        flt = self.filter
        if flt is not None:
            try:
                if not flt(envelope):
                    self.filtered += 1
                    return
            except Exception:
                self._filter_failed(envelope)
                return
        queue = self._queue
        if not queue:
            queue.append(envelope)
            if not self._busy:
                self._wake()
        elif self.overflow is Overflow.COALESCE or len(queue) >= self.max_queue:
            self._overflow(envelope)
        else:
            queue.append(envelope)

    def _overflow(self, envelope: Envelope[Any]) -> None:
        """Queue ``envelope`` into a non-empty queue that is full or coalescing."""
        queue = self._queue
        policy = self.overflow
        if policy is Overflow.COALESCE:
            assert isinstance(queue, _CoalescingQueue)
            if queue.replace(envelope):
                self.coalesced += 1
                return
            if len(queue) < self.max_queue:
                queue.append(envelope)
                return
            victim = queue.popleft()
            queue.append(envelope)
        elif policy is Overflow.DROP_OLDEST:
            victim = queue.popleft()
            queue.append(envelope)
        else:
            victim = envelope
        self.dropped += 1
        self._bus._routes[victim.topic].dropped += 1
        self._unlogged_drops += 1
        if self._drop_log_call is None:
            now = self._bus._seconds()
            if now >= self._drop_log_after:
                self._log_drops("queue full")
            else:
                self._drop_log_call = self._bus._call_later(
                    self._drop_log_after - now, self._log_drops, "queue full"
                )

    def _filter_failed(self, envelope: Envelope[Any]) -> None:
        self.failed += 1
        self._bus._routes[envelope.topic].failed += 1
        self.log.failure(
            "filter of subscription {name} failed on {topic} event {event_id}",
            level=LogLevel.error,
            name=self.name,
            topic=envelope.topic,
            event_id=envelope.context.event_id,
        )

    def _log_drops(self, reason: str) -> None:
        """Log (and reset) the drops not yet logged; rate-limited by the caller."""
        self._drop_log_call = None
        count = self._unlogged_drops
        if not count:
            return
        self._unlogged_drops = 0
        self._drop_log_after = self._bus._seconds() + self._bus.drop_log_interval
        # Events still queued when their subscriber cancels (at every stop)
        # are expected losses: noted, not warned about.
        self.log.emit(
            LogLevel.info if reason == "cancelled" else LogLevel.warn,
            "subscription {name} on {pattern} dropped {count} event(s) ({reason}, "
            "policy {policy}); {dropped} dropped in total",
            name=self.name,
            pattern=self.pattern,
            count=count,
            reason=reason,
            policy=self.overflow.value,
            dropped=self.dropped,
        )

    def _discard(self, reason: str) -> None:
        """Drop everything queued (counted and logged at once)."""
        queue = self._queue
        if not queue:
            return
        routes = self._bus._routes
        for envelope in queue:
            routes[envelope.topic].dropped += 1
        count = len(queue)
        queue.clear()
        self.dropped += count
        self._unlogged_drops += count
        self._log_drops(reason)

    # -- delivery

    def _wake(self) -> None:
        """Idle -> busy: schedule one delivery call."""
        if not self.active:
            self._discard("cancelled")
            return
        self._busy = True
        self._bus._busy_count += 1
        self._call = self._bus._call_later(0, self._run)

    def _set_idle(self) -> None:
        """Busy -> idle; fire whoever waits for that."""
        self._busy = False
        bus = self._bus
        bus._busy_count -= 1
        if self._cancel_waiters:
            waiters, self._cancel_waiters = self._cancel_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        if not bus._busy_count and bus._drain_waiters:
            bus._drained()

    def _run(self) -> None:
        """Deliver up to one batch: the scheduled delivery call."""
        self._call = None
        queue = self._queue
        count = min(len(queue), self._bus.batch)
        popleft = queue.popleft
        deliver = self._deliver
        index = 0
        processed = count
        skipped = 0  # popped but not delivered here: failed, or asynchronous
        self._running = True
        try:
            # The hot loop: no per-event counting or state checks.  Events a
            # handler publishes to its own subscription wait for the next
            # batch; the queue only shrinks when cancel() empties it.
            for index in range(count):
                envelope = popleft()
                try:
                    result = deliver(envelope)
                except Exception:
                    skipped += 1
                    self._handler_failed(envelope, None)  # the current exception
                    continue
                if result is not None and (
                    isinstance(result, Deferred) or inspect.isawaitable(result)
                ):
                    skipped += 1
                    if self._await(result, envelope):
                        processed = index + 1
                        break
        except IndexError:
            # cancel() (called by a handler) emptied the queue under us.
            processed = index
        finally:
            self._running = False
            delivered = processed - skipped
            self.delivered += delivered
            if self._route is not None:
                self._route.delivered += delivered
        if self._inflight is None:
            self._resume()

    def _await(self, result: object, envelope: Envelope[Any]) -> bool:
        """Track an asynchronous result; True while it is still pending."""
        deferred = to_deferred(result)
        self._inflight = deferred
        deferred.addCallbacks(
            self._async_done,
            self._async_failed,
            callbackArgs=(envelope,),
            errbackArgs=(envelope,),
        )
        return self._inflight is not None

    def _async_done(self, _result: object, envelope: Envelope[Any]) -> None:
        self._inflight = None
        self.delivered += 1
        self._bus._routes[envelope.topic].delivered += 1
        if not self._running:
            self._resume()

    def _async_failed(self, failure: Failure, envelope: Envelope[Any]) -> None:
        self._inflight = None
        self._handler_failed(envelope, failure)
        if not self._running:
            self._resume()

    def _resume(self) -> None:
        """After a batch or an asynchronous delivery: go on or go idle."""
        if self._queue:
            if self.active:
                self._call = self._bus._call_later(0, self._run)
                return
            self._discard("cancelled")
        self._set_idle()

    def _handler_failed(self, envelope: Envelope[Any], failure: Failure | None) -> None:
        self.failed += 1
        self._bus._routes[envelope.topic].failed += 1
        self.log.failure(
            "subscriber {name} failed on {topic} event {event_id}",
            failure,
            level=LogLevel.error,
            name=self.name,
            topic=envelope.topic,
            event_id=envelope.context.event_id,
        )


def _default_id_factory() -> Callable[[], str]:
    """Fast unique ids: one random uuid4 prefix, then a counter."""
    prefix = uuid.uuid4().hex[:16] + "-"
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter)}"


@implementer(IEventBus)
@attrs.define(eq=False)
class MemoryEventBus:
    """
    In-process ``IEventBus``.

    @ivar clock: schedules deliveries (``callLater(0, ...)``) and stamps
        event times (``seconds()``).
    @ivar id_factory: makes event ids; default: a random prefix plus a
        counter.
    @ivar batch: at most this many events are delivered to one subscription
        per reactor turn.
    @ivar drop_log_interval: at most one drop warning per subscription per
        this many seconds of clock time.
    """

    log: ClassVar[Logger] = Logger()

    clock: IReactorTime
    id_factory: Callable[[], str] | None = attrs.field(default=None, kw_only=True)
    batch: int = attrs.field(default=1000, kw_only=True)
    drop_log_interval: float = attrs.field(default=10.0, kw_only=True)
    _next_id: Callable[[], str] = attrs.field(init=False)
    _seconds: Callable[[], float] = attrs.field(init=False)
    _call_later: Callable[..., IDelayedCall] = attrs.field(init=False)
    _routes: dict[str, _Route] = attrs.field(init=False, factory=dict)
    _subscriptions: dict[Subscription, None] = attrs.field(init=False, factory=dict)
    _exact: dict[str, list[Subscription]] = attrs.field(init=False, factory=dict)
    _wildcard: list[Subscription] = attrs.field(init=False, factory=list)
    _retained: dict[tuple[str, str], Envelope[Any]] = attrs.field(init=False, factory=dict)
    _seq: Iterator[int] = attrs.field(init=False, factory=itertools.count)
    _busy_count: int = attrs.field(init=False, default=0)
    _drain_waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _stopped: bool = attrs.field(init=False, default=False)
    _stopped_subscriptions: list[Subscription] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, not {self.batch!r}")
        self._next_id = self.id_factory if self.id_factory is not None else self._make_ids()
        self._seconds = self.clock.seconds
        self._call_later = self.clock.callLater

    def _make_ids(self) -> Callable[[], str]:
        """The default id factory (overridden by test doubles)."""
        return _default_id_factory()

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopped

    # -- IEventBus

    def publish(
        self,
        event: Event,
        source: str = "",
        correlation_id: str | None = None,
        topic: str | None = None,
    ) -> Envelope[Any]:
        if not isinstance(event, Event):
            raise InvalidCommand(f"only Event instances can be published, not {event!r}")
        if topic is None:
            topic = event.topic
        route = self._routes.get(topic)
        if route is None or route.fanout is None:
            route = self._resolve(topic)
        fanout: _FanOut = route.fanout  # type: ignore[assignment]
        envelope: Envelope[Any] = Envelope(
            topic,
            event,
            EventContext(self._next_id(), self._seconds(), source, correlation_id),
        )
        if event.retained:
            key = (topic, event.key())
            retained = self._retained
            retained.pop(key, None)
            retained[key] = envelope
        route.published += 1
        # The fast path of Subscription._offer, inlined: publishing is the
        # hot loop of the bus.
        for sub, queue, limit, flt in fanout:
            if flt is not None:
                try:
                    if not flt(envelope):
                        sub.filtered += 1
                        continue
                except Exception:
                    sub._filter_failed(envelope)
                    continue
            if queue:
                if len(queue) < limit:
                    queue.append(envelope)
                else:
                    sub._overflow(envelope)
            else:
                queue.append(envelope)
                if not sub._busy:
                    sub._wake()
        return envelope

    def has_subscribers(self, topic: str) -> bool:
        route = self._routes.get(topic)
        if route is None or route.fanout is None:
            route = self._resolve(topic)
        return bool(route.fanout)

    def subscribe(  # noqa: PLR0917 (the interface's signature)
        self,
        pattern: str,
        handler: Handler,
        filter: EventFilter | None = None,
        max_queue: int = 1000,
        overflow: Overflow = Overflow.DROP_OLDEST,
        replay_retained: bool = False,
        name: str | None = None,
    ) -> ISubscription:
        matcher = parse_pattern(pattern)
        errors = []
        if not callable(handler):
            errors.append(f"handler {handler!r} is not callable")
        if filter is not None and not callable(filter):
            errors.append(f"filter {filter!r} is not callable")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            errors.append(f"max_queue must be an int >= 1, not {max_queue!r}")
        if not isinstance(overflow, Overflow):
            errors.append(f"overflow must be an Overflow, not {overflow!r}")
        if name is not None and not isinstance(name, str):
            errors.append(f"name must be a string, not {name!r}")
        if errors:
            raise InvalidCommand("; ".join(errors), errors=errors)
        sub = Subscription(
            self,
            pattern,
            handler,
            filter,
            max_queue,
            overflow,
            name if name is not None else _handler_name(handler),
            next(self._seq),
            matcher,
        )
        if self._stopped:
            sub.active = False
            self.log.warn(
                "subscription {name} on {pattern} refused: the bus is stopped",
                name=sub.name,
                pattern=pattern,
            )
            return sub
        self._subscriptions[sub] = None
        if matcher.exact:
            self._exact.setdefault(pattern, []).append(sub)
            route = self._routes.get(pattern)
            if route is None:
                route = self._routes[pattern] = _Route(pattern)
            route.fanout = None
            sub._route = route
        else:
            self._wildcard.append(sub)
            for route in self._routes.values():
                route.fanout = None
        if replay_retained:
            for (topic, _key), envelope in list(self._retained.items()):
                if matcher.matches(topic):
                    sub._offer(envelope)
        return sub

    def retained(self, pattern: str) -> Sequence[Envelope[Any]]:
        matcher = parse_pattern(pattern)
        return [env for (topic, _key), env in self._retained.items() if matcher.matches(topic)]

    def last(self, topic: str, key: str = "") -> Envelope[Any] | None:
        found = self._retained.get((topic, key))
        if found is None:  # only a valid topic can be retained: check misses only
            check_topic(topic)
        return found

    def stats(self) -> Mapping[str, Any]:
        topics = [
            TopicStats(r.topic, r.published, r.delivered, r.dropped, r.failed)
            for r in sorted(self._routes.values(), key=lambda r: r.topic)
        ]
        return {
            "topics": topics,
            "subscriptions": [sub.stats() for sub in self._subscriptions],
            "published": sum(t.published for t in topics),
            "delivered": sum(t.delivered for t in topics),
            "dropped": sum(t.dropped for t in topics),
            "failed": sum(t.failed for t in topics),
        }

    def drain(self) -> Deferred[None]:
        if not self._busy_count:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._forget_drain_waiter)
        self._drain_waiters.append(waiter)
        return waiter

    # -- lifecycle

    def stop(self) -> Deferred[None]:
        """
        Cancel every subscription (queued events are dropped and counted) and
        fire once every in-flight handler Deferred has finished.  Afterwards
        ``publish`` records retained values but delivers nothing, and
        ``subscribe`` returns inactive subscriptions.  Idempotent.
        """
        self._stopped = True
        self._stopped_subscriptions.extend(self._subscriptions)
        # cancel() is idempotent and, on a cancelled subscription, still
        # waits for its in-flight delivery: a second stop() waits too.
        waits = [sub.cancel() for sub in self._stopped_subscriptions]
        for route in self._routes.values():
            route.fanout = None

        async def wait() -> None:
            for waiter in waits:
                await waiter

        return Deferred.fromCoroutine(wait())

    # -- internals

    def _resolve(self, topic: str) -> _Route:
        """Create or refresh the route of ``topic`` (validating it)."""
        route = self._routes.get(topic)
        if route is None:
            route = _Route(check_topic(topic))
            self._routes[topic] = route
        subs = list(self._exact.get(topic, ()))
        subs.extend(sub for sub in self._wildcard if sub._matcher.matches(topic))
        subs.sort(key=lambda sub: sub._seq)
        route.fanout = tuple(sub._fanout_entry() for sub in subs)
        return route

    def _forget(self, sub: Subscription) -> None:
        """Unregister a cancelled subscription and invalidate its routes."""
        self._subscriptions.pop(sub, None)
        if sub._matcher.exact:
            subs = self._exact.get(sub.pattern, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._exact.pop(sub.pattern, None)
            route = self._routes.get(sub.pattern)
            if route is not None:
                route.fanout = None
        else:
            if sub in self._wildcard:
                self._wildcard.remove(sub)
            for route in self._routes.values():
                route.fanout = None

    def _drained(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _forget_drain_waiter(self, waiter: Deferred[None]) -> None:
        if waiter in self._drain_waiters:
            self._drain_waiters.remove(waiter)
