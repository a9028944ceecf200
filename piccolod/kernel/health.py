"""
The health tracker: every component's level, the worst of them, and
readiness.

Components (``child:consensus``, ``persistence.store``, ``bus``) report a
:class:`~piccolod.events.HealthLevel` with a message and optional figures.
``overall()`` is the worst reported level (``OK`` when nothing reported).
Readiness is stricter: every *required* component must be ``OK``, and a
component declared required with :meth:`HealthTracker.require` that has
never reported counts as not ready (so a subsystem that has not come up yet
cannot make the daemon look ready).

A retained :class:`~piccolod.events.HealthChanged` is published when a
component's level, message or required flag changes; a report that repeats
the current level and message only refreshes the stored figures, so that a
component may report its figures every second without flooding the bus.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from piccolod.errors import InvalidCommand, NotFound
from piccolod.events import HealthChanged, HealthLevel
from piccolod.interfaces import ComponentHealth, IEventBus, IHealth
from piccolod.kernel.aio import provides

__all__ = ["HealthTracker"]

#: The message of a required component that has not reported yet.
NOT_REPORTED = "not reported yet"


def _figures(figures: Mapping[str, float] | None) -> tuple[tuple[str, float], ...]:
    if not figures:
        return ()
    out: list[tuple[str, float]] = []
    for name, value in figures.items():
        if not isinstance(name, str) or isinstance(value, bool):
            raise InvalidCommand(f"health figure {name!r}={value!r}: need str -> number")
        try:
            out.append((name, float(value)))
        except (TypeError, ValueError):
            raise InvalidCommand(f"health figure {name!r}={value!r}: need str -> number") from None
    return tuple(sorted(out))


def _level(level: object) -> HealthLevel:
    if isinstance(level, HealthLevel):
        return level
    if isinstance(level, str):
        for candidate in HealthLevel:
            if candidate.label == level:
                return candidate
    raise InvalidCommand(f"unknown health level {level!r} (ok, warn or error)")


def _name(component: object) -> str:
    if not isinstance(component, str) or not component.strip():
        raise InvalidCommand(f"health component name must be a non-empty string: {component!r}")
    return component


@implementer(IHealth)
@attrs.define(eq=False)
class HealthTracker:
    """
    In-memory ``IHealth`` publishing ``HealthChanged`` on an optional bus.

    @ivar clock: where ``since`` timestamps come from.
    @ivar bus: where ``HealthChanged`` events go (``None``: nowhere).
    """

    log = Logger()

    clock: IReactorTime = attrs.field(validator=provides(IReactorTime))
    bus: IEventBus | None = attrs.field(
        default=None, validator=attrs.validators.optional(provides(IEventBus))
    )
    _reported: dict[str, ComponentHealth] = attrs.field(init=False, factory=dict)
    #: Required flags declared with ``require`` (whether reported or not).
    _required: dict[str, bool] = attrs.field(init=False, factory=dict)
    #: When a required-but-unreported component was declared.
    _declared_at: dict[str, float] = attrs.field(init=False, factory=dict)

    # -- writing --------------------------------------------------------------

    def report(
        self,
        component: str,
        level: HealthLevel,
        message: str = "",
        figures: Mapping[str, float] | None = None,
    ) -> None:
        """
        Record ``component``'s level and message; publish ``HealthChanged``
        when either differs from what was stored.  Raises ``InvalidCommand``
        for an empty name, an unknown level or a non-numeric figure.
        """
        name = _name(component)
        new_level = _level(level)
        text = str(message)
        numbers = _figures(figures)
        old = self._reported.get(name)
        required = self._required.get(name, False)
        if old is not None and old.level is new_level and old.message == text:
            if old.figures != numbers:
                self._reported[name] = attrs.evolve(old, figures=numbers)
            return
        since = old.since if old is not None and old.level is new_level else self.clock.seconds()
        current = ComponentHealth(
            component=name,
            level=new_level,
            message=text,
            required=required,
            since=since,
            figures=numbers,
        )
        self._reported[name] = current
        self._declared_at.pop(name, None)
        if old is None or old.level is not new_level:
            self.log.info(
                "health {component}: {health_level} {detail}",
                component=name,
                health_level=new_level.label,
                previous=None if old is None else old.level.label,
                detail=text,
            )
        self._publish(current)

    def require(self, component: str, required: bool = True) -> None:
        """
        Declare whether readiness needs ``component``; publishes when a
        reported component's flag changes.
        """
        name = _name(component)
        flag = bool(required)
        self._required[name] = flag
        old = self._reported.get(name)
        if old is None:
            if flag:
                self._declared_at.setdefault(name, self.clock.seconds())
            else:
                self._declared_at.pop(name, None)
            return
        if old.required is not flag:
            current = attrs.evolve(old, required=flag)
            self._reported[name] = current
            self._publish(current)

    def remove(self, component: str) -> None:
        """Forget ``component`` and its required flag; idempotent."""
        self._reported.pop(component, None)
        self._required.pop(component, None)
        self._declared_at.pop(component, None)

    # -- reading --------------------------------------------------------------

    def component(self, name: str) -> ComponentHealth:
        """The reported health of ``name``; raises ``NotFound``."""
        try:
            return self._reported[name]
        except KeyError:
            raise NotFound(f"no health reported for component {name!r}") from None

    def components(self) -> Sequence[ComponentHealth]:
        """Every reported component, sorted by name."""
        return [self._reported[name] for name in sorted(self._reported)]

    def overall(self) -> HealthLevel:
        """The worst reported level (``OK`` when none reported)."""
        return max((c.level for c in self._reported.values()), default=HealthLevel.OK)

    def ready(self) -> bool:
        """True when every required component has reported ``OK``."""
        return not self.not_ready()

    def not_ready(self) -> Sequence[ComponentHealth]:
        """
        The required components that are not ``OK``, sorted by name; one
        that never reported appears at ``WARN`` with message
        ``"not reported yet"``.
        """
        out: list[ComponentHealth] = []
        for name in sorted(self._required):
            if not self._required[name]:
                continue
            found = self._reported.get(name)
            if found is None:
                out.append(
                    ComponentHealth(
                        component=name,
                        level=HealthLevel.WARN,
                        message=NOT_REPORTED,
                        required=True,
                        since=self._declared_at.get(name, 0.0),
                    )
                )
            elif found.level is not HealthLevel.OK:
                out.append(found)
        return out

    # -- internals ------------------------------------------------------------

    def _publish(self, current: ComponentHealth) -> None:
        if self.bus is None:
            return
        event = HealthChanged(
            component=current.component,
            level=current.level,
            message=current.message,
            required=current.required,
            figures=current.figures,
        )
        try:
            self.bus.publish(event, source="health")
        except Exception:
            self.log.failure("publishing health of {component}", component=current.component)
