"""
:class:`FakeEventBus`: an ``IEventBus`` test double that records every
published envelope.

It is the real :class:`~piccolod.kernel.bus.MemoryEventBus` with recording
on top (buildbot's lesson: the most honest fake is the real code on a cheap
backend), so it keeps every promise of the contract: asynchronous delivery
through the given clock, FIFO per subscriber, filters, bounded queues,
retained values, counters.  What it adds:

- :meth:`FakeEventBus.published` / :meth:`FakeEventBus.events`: what was
  published, optionally on one topic;
- :meth:`FakeEventBus.assert_published`: the exact sequence of events;
- :meth:`FakeEventBus.flush`: run every pending delivery on a
  ``twisted.internet.task.Clock``;
- deterministic event ids (``event-1``, ``event-2``, ...).

Usage::

    clock = Clock()
    bus = FakeEventBus(clock)
    thing = ThingUnderTest(bus)
    thing.do()
    bus.assert_published([LockStateChanged(LockState.LOCKED)])
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from piccolod.events import Envelope, Event
from piccolod.kernel.bus import MemoryEventBus, check_topic

__all__ = ["FakeEventBus"]


@attrs.define(eq=False)
class FakeEventBus(MemoryEventBus):
    """
    A recording ``IEventBus`` (see the module docstring).

    @ivar clock: drives delivery; use a ``task.Clock`` to call :meth:`flush`.
    """

    _published: list[Envelope[Any]] = attrs.field(init=False, factory=list)

    def _make_ids(self) -> Callable[[], str]:
        counter = itertools.count(1)
        return lambda: f"event-{next(counter)}"

    def publish(
        self,
        event: Event,
        source: str = "",
        correlation_id: str | None = None,
        topic: str | None = None,
    ) -> Envelope[Any]:
        envelope = super().publish(event, source, correlation_id, topic)
        self._published.append(envelope)
        return envelope

    def has_subscribers(self, topic: str) -> bool:
        """
        Always true once the topic is valid: the fake records every
        publication, so it is itself a listener of every topic.
        """
        super().has_subscribers(topic)
        return True

    # -- recording

    def published(self, topic: str | None = None) -> list[Envelope[Any]]:
        """Every envelope published (on ``topic``), oldest first."""
        if topic is None:
            return list(self._published)
        check_topic(topic)
        return [env for env in self._published if env.topic == topic]

    def events(self, topic: str | None = None) -> list[Event]:
        """The events of :meth:`published`."""
        return [env.event for env in self.published(topic)]

    def clear_published(self) -> None:
        """Forget what was recorded (retained values and counters stay)."""
        del self._published[:]

    def assert_published(self, expected: Sequence[Event], topic: str | None = None) -> None:
        """
        Assert that exactly ``expected`` was published (on ``topic``), in
        this order; raise ``AssertionError`` showing both lists otherwise.
        """
        actual = self.events(topic)
        if actual != list(expected):
            where = "" if topic is None else f" on {topic!r}"
            raise AssertionError(
                f"published{where}:\n"
                + "".join(f"  {event!r}\n" for event in actual)
                + "expected:\n"
                + "".join(f"  {event!r}\n" for event in expected)
            )

    def assert_nothing_published(self, topic: str | None = None) -> None:
        """Assert that nothing was published (on ``topic``)."""
        self.assert_published([], topic)

    # -- driving a Clock

    def flush(self) -> None:
        """
        Run every pending delivery on a ``task.Clock`` (``advance(0)``, which
        also runs the deliveries that handlers' publications schedule).
        Handlers waiting on their own Deferreds stay in flight.  A handler
        that publishes to itself forever never lets this return, as it would
        never let a real reactor go idle.
        """
        advance = getattr(self.clock, "advance", None)
        if advance is None:
            raise TypeError(f"flush() needs a task.Clock, not {self.clock!r}")
        advance(0)
