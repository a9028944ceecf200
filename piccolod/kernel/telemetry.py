"""
The telemetry/health bus: reactor lag, periodic process sampling, and the
link from component health to supervision.

- :class:`ReactorLagMonitor` schedules a probe every ``interval`` and
  measures how late it runs: blocking work on the reactor thread shows up
  here before anywhere else.
- :class:`TelemetrySampler` submits a ``telemetry`` job every ``interval``
  that records process RSS, CPU time, open files, reactor lag, bus queue
  depths and drops; it publishes a retained ``telemetry.sample`` event and
  reports the figures as the ``kernel`` health component (``warn`` when the
  lag or drops cross their thresholds).
- :class:`HealthEscalator` watches ``health.component`` events: a component
  in ``error`` for longer than its grace period makes the supervisor restart
  the child it belongs to (``<slot>`` or ``<slot>:<detail>`` belongs to the
  child ``<slot>``).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from piccolod.events import Envelope, HealthChanged, HealthLevel, Telemetry
from piccolod.interfaces import IEventBus, IHealth, ISubscription, ISupervisor


@attrs.define(eq=False)
class ReactorLagMonitor(Service):
    """Measures reactor lag: how late a probe scheduled ``interval`` ahead runs."""

    clock: IReactorTime
    interval: float = 0.5
    last: float = 0.0
    worst: float = 0.0
    _call: IDelayedCall | None = None
    _expected: float = 0.0

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)

    def startService(self) -> None:
        Service.startService(self)
        self._schedule()

    def _schedule(self) -> None:
        self._expected = self.clock.seconds() + self.interval
        self._call = self.clock.callLater(self.interval, self._probe)

    def _probe(self) -> None:
        self.last = max(0.0, self.clock.seconds() - self._expected)
        self.worst = max(self.worst, self.last)
        self._schedule()

    def stopService(self) -> None:
        Service.stopService(self)
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def process_figures() -> dict[str, float]:
    """RSS (bytes), CPU seconds and open file descriptors of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures = {"cpu_seconds": usage.ru_utime + usage.ru_stime}
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        figures["rss_bytes"] = float(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        figures["rss_bytes"] = float(usage.ru_maxrss * 1024)
    try:
        figures["open_files"] = float(len(os.listdir("/proc/self/fd")))
    except OSError:
        pass
    return figures


@attrs.define(eq=False)
class TelemetrySampler(Service):
    """
    Submits a ``telemetry`` job every ``interval`` seconds on the job runner.

    @ivar lag_warn: reactor lag (seconds) above which the kernel reports warn.
    """

    jobs: Any
    bus: IEventBus
    health: IHealth
    lag: ReactorLagMonitor
    interval: float = 15.0
    lag_warn: float = 0.25
    sample: Callable[[], dict[str, float]] = process_figures
    log = Logger()
    _periodic: Any = None
    _last_dropped: int = 0
    samples: int = 0

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)

    def startService(self) -> None:
        Service.startService(self)
        from piccolod.kernel.jobs import JobSpec

        self._periodic = self.jobs.every(
            self.interval,
            lambda: JobSpec(
                job_class="telemetry", fn=lambda control: self.take(), name="telemetry"
            ),
            now=True,
        )

    def stopService(self) -> Any:
        Service.stopService(self)
        if self._periodic is not None:
            periodic, self._periodic = self._periodic, None
            return periodic.stopService()
        return None

    def take(self) -> dict[str, float]:
        """Take one sample now: publish it and report kernel health."""
        figures = self.sample()
        stats = self.bus.stats()
        dropped = int(stats["dropped"])
        figures.update(
            reactor_lag_seconds=self.lag.last,
            reactor_lag_worst_seconds=self.lag.worst,
            bus_published=float(stats["published"]),
            bus_dropped=float(dropped),
            bus_failed=float(stats["failed"]),
            bus_queue_depth=float(sum(s.queued for s in stats["subscriptions"])),
        )
        new_drops = dropped - self._last_dropped
        self._last_dropped = dropped
        self.samples += 1
        problems = []
        if self.lag.last > self.lag_warn:
            problems.append(f"reactor lag {self.lag.last * 1000:.0f} ms")
        if new_drops > 0:
            problems.append(f"{new_drops} bus event(s) dropped since the last sample")
        self.health.report(
            "kernel",
            HealthLevel.WARN if problems else HealthLevel.OK,
            "; ".join(problems) or "ok",
            figures,
        )
        self.bus.publish(
            Telemetry(component="kernel", figures=tuple(sorted(figures.items()))),
            source="telemetry",
        )
        return figures


@attrs.define(eq=False)
class HealthEscalator(Service):
    """
    Restarts the child owning a component that stays in ``error`` longer
    than ``grace`` seconds (per-component overrides in ``graces``).
    """

    clock: IReactorTime
    bus: IEventBus
    supervisor: ISupervisor
    grace: float = 60.0
    graces: dict[str, float] = attrs.field(factory=dict)
    log = Logger()
    _timers: dict[str, IDelayedCall] = attrs.field(factory=dict)
    _subscription: ISubscription | None = None
    escalations: int = 0

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)

    def startService(self) -> None:
        Service.startService(self)
        self._subscription = self.bus.subscribe(
            HealthChanged.topic, self._changed, replay_retained=True, name="health-escalator"
        )

    def stopService(self) -> Any:
        Service.stopService(self)
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._subscription is not None:
            sub, self._subscription = self._subscription, None
            return sub.cancel()
        return None

    @staticmethod
    def owner(component: str) -> str | None:
        """The child a component belongs to (``None`` for the supervisor's own)."""
        if component.startswith("child:") or component == "kernel":
            return None
        return component.split(":", 1)[0]

    def _changed(self, envelope: Envelope[HealthChanged]) -> None:
        event = envelope.event
        child = self.owner(event.component)
        if child is None:
            return
        timer = self._timers.pop(event.component, None)
        if event.level is not HealthLevel.ERROR:
            if timer is not None and timer.active():
                timer.cancel()
            return
        if timer is not None and timer.active():
            self._timers[event.component] = timer  # still counting from the first error
            return
        grace = self.graces.get(event.component, self.grace)
        self._timers[event.component] = self.clock.callLater(
            grace, self._escalate, event.component, child, event.message
        )

    def _escalate(self, component: str, child: str, message: str) -> None:
        self._timers.pop(component, None)
        names = {c.name for c in self.supervisor.children()}
        if child not in names:
            self.log.warn(
                "component {component} in error but no child {child} to restart",
                component=component,
                child=child,
            )
            return
        self.escalations += 1
        self.log.warn(
            "component {component} in error past its grace period: restarting {child}",
            component=component,
            child=child,
        )
        self.supervisor.child_failed(child, f"health: {component}: {message}")
