"""
The leadership observer: logs every leadership transition with named fields
and keeps the last ones in memory for the API.

It subscribes to ``cluster.leadership`` with ``replay_retained=True``, so it
also reports the current role of every resource that was decided before it
started (there is no start-up race with the consensus subsystem).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from piccolod.events import Envelope, LeadershipRoleChanged
from piccolod.interfaces import IEventBus, ISubscription
from piccolod.kernel.aio import provides

__all__ = ["LeadershipObserver", "ObservedTransition"]


@attrs.frozen
class ObservedTransition:
    """One leadership transition as the observer saw it."""

    time: float
    resource: str
    role: str
    previous: str
    term: int
    leader_id: str | None
    leader_address: str | None
    event_id: str

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _positive(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.define(eq=False)
class LeadershipObserver(Service):
    """
    An ``IService`` that logs leadership transitions.

    @ivar keep: how many transitions :meth:`transitions` remembers.
    """

    log = Logger()

    bus: IEventBus = attrs.field(validator=provides(IEventBus))
    keep: int = attrs.field(default=100, kw_only=True, validator=_positive)
    name: str = attrs.field(default="leadership-observer", kw_only=True)
    _seen: collections.deque[ObservedTransition] = attrs.field(init=False)
    _subscription: ISubscription | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._seen = collections.deque(maxlen=self.keep)

    def startService(self) -> None:
        self.running = True
        if self._subscription is None:
            self._subscription = self.bus.subscribe(
                LeadershipRoleChanged.topic,
                self._observe,
                replay_retained=True,
                name=self.name,
            )

    def stopService(self) -> Deferred[None]:
        self.running = False
        subscription, self._subscription = self._subscription, None
        if subscription is None:
            return succeed(None)
        return subscription.cancel()

    def transitions(self) -> Sequence[ObservedTransition]:
        """The last ``keep`` transitions, oldest first."""
        return tuple(self._seen)

    def _observe(self, envelope: Envelope[Any]) -> None:
        event = envelope.event
        if not isinstance(event, LeadershipRoleChanged):
            self.log.warn(
                "ignoring {type} on {topic}", type=type(event).__name__, topic=envelope.topic
            )
            return
        self._seen.append(
            ObservedTransition(
                time=envelope.context.time,
                resource=event.resource,
                role=event.role.value,
                previous=event.previous.value,
                term=event.term,
                leader_id=event.leader_id,
                leader_address=event.leader_address,
                event_id=envelope.context.event_id,
            )
        )
        self.log.info(
            "leadership of {resource}: {previous} -> {role} (term {term}, leader {leader_id})",
            resource=event.resource,
            role=event.role.value,
            previous=event.previous.value,
            term=event.term,
            leader_id=event.leader_id,
            leader_address=event.leader_address,
        )
