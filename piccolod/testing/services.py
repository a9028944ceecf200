"""
Scriptable supervised services, for testing the supervisor and anything
that supervises.

:class:`FakeServiceFactory` is a ``ChildSpec.factory``: each call builds a
new :class:`FakeService` whose behaviour comes from the factory's defaults
or from the next planned behaviour (:meth:`FakeServiceFactory.plan`).  The
factory keeps every instance it built and counts the *live* ones (started
and not yet finished stopping), so a test can assert that a child never had
two live instances.  Each :class:`FakeService` records precondition
violations (started twice, stopped before started, stopped twice) instead
of raising, so the supervisor's error handling cannot hide them; assert
``factory.violations == []``.

Start behaviours: ``"ready"`` (ready at once), ``"pending"`` (ready when
the test calls :meth:`FakeService.make_ready`), ``"deferred"``
(``startService`` returns a Deferred the test fires with
:meth:`FakeService.finish_start`), ``"fail"`` (``startService`` raises),
``"fail-ready"`` (``when_ready`` fails), ``"crash"`` (crashes while
starting).  Stop behaviours: ``"now"`` (``stopService`` returns ``None``),
``"hang"`` (its Deferred fires only on :meth:`FakeService.finish_stop`),
``"fail"`` (it fails at once).  The factory itself can be told to raise
(``build_error``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from piccolod.interfaces import ISupervisedService

__all__ = ["FakeService", "FakeServiceError", "FakeServiceFactory", "StartMode", "StopMode"]

StartMode = Literal["ready", "pending", "deferred", "fail", "fail-ready", "crash"]
StopMode = Literal["now", "hang", "fail"]


class FakeServiceError(Exception):
    """What a scripted fake fails with."""


@implementer(ISupervisedService)
class FakeService(Service):
    """One instance built by a :class:`FakeServiceFactory`."""

    def __init__(
        self, factory: FakeServiceFactory, number: int, start: StartMode, stop: StopMode
    ) -> None:
        self.factory = factory
        self.number = number
        self.start_mode: StartMode = start
        self.stop_mode: StopMode = stop
        self.started = False
        self.stop_called = False
        self.stop_called_at: float | None = None
        self.stopped = False
        self.ready = False
        self.ready_error: BaseException | None = None
        self.exited = False
        self.exit_error: BaseException | None = None
        self._ready_waiters: list[Deferred[None]] = []
        self._exit_waiters: list[Deferred[None]] = []
        self._start_d: Deferred[None] | None = None
        self._stop_d: Deferred[None] | None = None

    def __repr__(self) -> str:
        return f"<FakeService {self.factory.name}#{self.number}>"

    # -- IService

    def startService(self) -> Deferred[None] | None:  # type: ignore[override]
        if self.started:
            self.factory.violations.append(f"{self!r}: startService called twice")
        self.started = True
        self.running = 1
        self.factory.note("start")
        self.factory._count(+1)
        mode = self.start_mode
        if mode == "fail":
            raise FakeServiceError(f"{self!r} cannot start")
        if mode == "ready":
            self.make_ready()
        elif mode == "fail-ready":
            self.fail_ready(FakeServiceError(f"{self!r} is not ready"))
        elif mode == "crash":
            self.crash(FakeServiceError(f"{self!r} crashed while starting"))
        elif mode == "deferred":
            self._start_d = Deferred()
            return self._start_d
        return None

    def stopService(self) -> Deferred[None] | None:  # type: ignore[override]
        if not self.started:
            self.factory.violations.append(f"{self!r}: stopService before startService")
        if self.stop_called:
            self.factory.violations.append(f"{self!r}: stopService called twice")
        self.stop_called = True
        self.stop_called_at = self.factory.now()
        self.factory.note("stop")
        self.running = 0
        mode = self.stop_mode
        if mode == "hang":
            self._stop_d = Deferred()
            return self._stop_d
        self.stopped = True
        self.factory._count(-1)
        if mode == "fail":
            return fail(FakeServiceError(f"{self!r} failed to stop"))
        return None

    # -- ISupervisedService

    def when_ready(self) -> Deferred[None]:
        if self.ready:
            return succeed(None)
        if self.ready_error is not None:
            return fail(self.ready_error)
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        return d

    def when_exited(self) -> Deferred[None]:
        if self.exited:
            return fail(self.exit_error) if self.exit_error is not None else succeed(None)
        d: Deferred[None] = Deferred()
        self._exit_waiters.append(d)
        return d

    # -- scripting

    @property
    def live(self) -> bool:
        """Started and not finished stopping (a crash does not end it)."""
        return self.started and not self.stopped

    def make_ready(self) -> None:
        """Fire ``when_ready``."""
        self.ready = True
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)

    def fail_ready(self, error: BaseException | None = None) -> None:
        """Fail ``when_ready``."""
        self.ready_error = error or FakeServiceError(f"{self!r} is not ready")
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(self.ready_error)

    def finish_start(self) -> None:
        """Fire the Deferred a ``"deferred"`` start returned (and become ready)."""
        self.ready = True
        d, self._start_d = self._start_d, None
        if d is not None:
            d.callback(None)
        self.make_ready()

    def crash(self, error: BaseException | None = None) -> None:
        """Fail ``when_exited`` (an abnormal exit)."""
        self.exited = True
        self.exit_error = error or FakeServiceError(f"{self!r} crashed")
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.errback(self.exit_error)

    def exit(self) -> None:
        """Fire ``when_exited`` with ``None`` (a normal exit)."""
        self.exited = True
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(None)

    def finish_stop(self) -> None:
        """Fire the Deferred a ``"hang"`` stop returned."""
        if self.stopped:
            return
        self.stopped = True
        self.factory._count(-1)
        d, self._stop_d = self._stop_d, None
        if d is not None:
            d.callback(None)


@attrs.define(eq=False)
class FakeServiceFactory:
    """
    A ``ChildSpec.factory`` building :class:`FakeService` instances.

    @ivar name: for reprs and messages.
    @ivar clock: stamps ``stop_called_at`` (optional).
    @ivar start: default start behaviour of new instances.
    @ivar stop: default stop behaviour of new instances.
    @ivar build_error: when set, the next builds raise it.
    @ivar healthy: what :meth:`check` (a ``ChildSpec.health_check``)
        answers: ``True``/``False``, ``"raise"`` or ``"hang"``.
    @ivar journal: a list shared by several factories, to which
        ``"start <name>"`` and ``"stop <name>"`` are appended as
        ``startService``/``stopService`` are called (for order checks).
    """

    name: str = "fake"
    clock: IReactorTime | None = None
    start: StartMode = "ready"
    stop: StopMode = "now"
    build_error: BaseException | None = None
    healthy: bool | Literal["raise", "hang"] = True
    instances: list[FakeService] = attrs.field(factory=list)
    violations: list[str] = attrs.field(factory=list)
    #: how many instances are live now, and the most ever live at once
    live_count: int = 0
    max_live: int = 0
    checks: int = 0
    journal: list[str] | None = None
    _plan: list[tuple[StartMode | None, StopMode | None]] = attrs.field(factory=list)

    def __call__(self) -> FakeService:
        if self.build_error is not None:
            raise self.build_error
        start, stop = self._plan.pop(0) if self._plan else (None, None)
        service = FakeService(self, len(self.instances), start or self.start, stop or self.stop)
        self.instances.append(service)
        return service

    def plan(self, start: StartMode | None = None, stop: StopMode | None = None) -> None:
        """Script the behaviour of the next instance built (queued, FIFO)."""
        self._plan.append((start, stop))

    def check(self) -> bool | Deferred[bool]:
        """A health check answering from :attr:`healthy`."""
        self.checks += 1
        if self.healthy == "raise":
            raise FakeServiceError(f"{self.name} health check raised")
        if self.healthy == "hang":
            return Deferred()
        return bool(self.healthy)

    @property
    def latest(self) -> FakeService:
        """The most recently built instance."""
        return self.instances[-1]

    @property
    def live(self) -> Sequence[FakeService]:
        """The instances started and not finished stopping."""
        return [s for s in self.instances if s.live]

    def note(self, what: str) -> None:
        if self.journal is not None:
            self.journal.append(f"{what} {self.name}")

    def now(self) -> float | None:
        return None if self.clock is None else self.clock.seconds()

    def _count(self, delta: int) -> None:
        self.live_count += delta
        self.max_live = max(self.max_live, self.live_count)
