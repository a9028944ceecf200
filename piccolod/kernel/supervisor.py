"""
The supervisor: the root of piccolod's service tree.

It runs *children* described by :class:`~piccolod.interfaces.ChildSpec`s,
with the semantics of an Erlang/OTP ``one_for_one`` supervisor plus what
systemd adds (readiness, dependency ordering, backoff, watchdog):

Start
    Children start **one at a time** in dependency order (topological on
    ``requires``, ties broken by insertion order).  Each must be *ready*
    before the next starts: its ``startService`` Deferred (if any) has fired
    and, when it provides :class:`~piccolod.interfaces.ISupervisedService`,
    its ``when_ready()`` has fired, within ``start_timeout`` seconds.  A
    child starts only when each of its requirements is *satisfied* (running,
    or finished normally for a transient/temporary one-shot).  A failed
    start is an abnormal exit: the restart policy applies.  The same
    one-at-a-time queue serves every start from ``stopped``: dependents
    coming back, ``restart_child`` and children added after start.  A
    restart after backoff does not queue behind another child's slow start
    (its requirements must still be satisfied), so a crashed subsystem is
    not kept down by an unrelated one that takes long to come up.

Exit and restart
    An exit is ``when_exited()`` firing (normal) or failing (crash),
    :meth:`Supervisor.child_failed`, a failed start, or ``max_misses``
    consecutive health-check misses.  ``permanent`` children always restart,
    ``transient`` ones only after an abnormal exit, ``temporary`` ones
    never (they end ``stopped``, or ``failed`` after a crash).  A restart
    stops the old instance (bounded by ``stop_timeout``), waits in
    ``backoff`` for ``backoff.delay(n)`` and then builds a *new* instance
    from the factory.  ``n`` resets once a child has run ``stable_after``
    seconds without interruption.

Intensity
    More than ``intensity`` restarts within ``period`` seconds make the child
    ``failed``: it is not restarted, and every child that (transitively)
    requires it is stopped, in reverse order, with ``last_error`` naming the
    failed requirement.  :meth:`Supervisor.restart_child` resets a failed
    child (and its restart history) and starts it; its dependents follow.

Stop
    ``stopService`` stops every child in reverse start order, each bounded
    by its ``stop_timeout`` (a child that does not stop in time is
    abandoned and logged, and the stop goes on), cancels every timer and
    never restarts anything.  It is idempotent.

Invariant: a child never has two instances.  A new instance is built only
once the previous one has stopped or been abandoned after its stop timeout
(an abandoned instance is logged; Twisted cannot kill it).

Every state change is logged, published as a retained
:class:`~piccolod.events.ChildStateChanged` and reported into the health
tracker as component ``child:<name>`` (``running`` is ``ok``; ``starting``,
``backoff``, ``stopping`` and waiting are ``warn``; ``failed`` and blocked
by a failed requirement are ``error``), so readiness over required
children is the health tracker's ``ready()``.

:meth:`Supervisor.when_ready` fires once the first start pass is over and
every *required* child is satisfied; then the systemd notifier (if any) is
told ``READY=1``.  Non-required children do not hold readiness back, so an
optional subsystem in a crash loop cannot make systemd kill the daemon.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import attrs
from twisted.application.service import IService, Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    TimeoutError,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.errors import (
    ConfigError,
    Conflict,
    DuplicateRegistration,
    NotFound,
    NotReady,
    PiccolodError,
    SubsystemFailed,
)
from piccolod.events import ChildState, ChildStateChanged, HealthLevel
from piccolod.interfaces import (
    Backoff,
    ChildSpec,
    ChildStatus,
    IEventBus,
    IHealth,
    ISupervisedService,
    ISupervisor,
    RestartPolicy,
)
from piccolod.kernel.aio import call, provides
from piccolod.kernel.sdnotify import SystemdNotifier

__all__ = ["Supervisor", "describe", "topological_order"]

_KEEP: Any = object()


def describe(reason: Failure | BaseException | str) -> str:
    """A one-line description of why something failed."""
    if isinstance(reason, str):
        return reason
    value = reason.value if isinstance(reason, Failure) else reason
    if isinstance(value, FirstError):
        return describe(value.subFailure)
    if isinstance(value, PiccolodError):
        return f"{type(value).__name__}: {value.detail}"
    text = str(value)
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


def topological_order(specs: Sequence[ChildSpec]) -> list[ChildSpec]:
    """
    ``specs`` ordered so that every child follows its requirements, ties
    broken by position in ``specs``.  Raises ``ConfigError`` for an unknown
    requirement or a cycle.
    """
    index = {spec.name: i for i, spec in enumerate(specs)}
    errors = [
        f"child {spec.name!r} requires unknown child {req!r}"
        for spec in specs
        for req in spec.requires
        if req not in index
    ]
    if errors:
        raise ConfigError(errors)
    # Kahn's algorithm, taking the earliest-inserted ready child each time.
    missing = {spec.name: len(set(spec.requires)) for spec in specs}
    dependents: dict[str, list[str]] = {spec.name: [] for spec in specs}
    for spec in specs:
        for req in set(spec.requires):
            dependents[req].append(spec.name)
    ready = [index[name] for name, count in missing.items() if count == 0]
    heapq.heapify(ready)
    order: list[ChildSpec] = []
    while ready:
        spec = specs[heapq.heappop(ready)]
        order.append(spec)
        for name in dependents[spec.name]:
            missing[name] -= 1
            if missing[name] == 0:
                heapq.heappush(ready, index[name])
    if len(order) < len(specs):
        stuck = sorted(name for name, count in missing.items() if count > 0)
        raise ConfigError([f"dependency cycle among children: {', '.join(stuck)}"])
    return order


def _attempt_cap(backoff: Backoff) -> int:
    """The attempt number past which the backoff delay stops growing."""
    if backoff.initial <= 0 or backoff.factor <= 1 or backoff.maximum <= backoff.initial:
        return 0
    return math.ceil(math.log(backoff.maximum / backoff.initial, backoff.factor))


def _validate(spec: ChildSpec) -> list[str]:
    name = spec.name
    errors: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            errors.append(f"child {name!r}: {what}")

    need(isinstance(name, str) and bool(name.strip()), "name must be a non-empty string")
    need(callable(spec.factory), "factory must be callable")
    need(spec.health_check is None or callable(spec.health_check), "health_check must be callable")
    need(spec.start_timeout > 0, f"start_timeout must be > 0, got {spec.start_timeout}")
    need(spec.stop_timeout > 0, f"stop_timeout must be > 0, got {spec.stop_timeout}")
    need(spec.intensity >= 0, f"intensity must be >= 0, got {spec.intensity}")
    need(spec.period > 0, f"period must be > 0, got {spec.period}")
    need(spec.stable_after >= 0, f"stable_after must be >= 0, got {spec.stable_after}")
    need(spec.health_interval > 0, f"health_interval must be > 0, got {spec.health_interval}")
    need(spec.health_timeout > 0, f"health_timeout must be > 0, got {spec.health_timeout}")
    need(spec.max_misses >= 1, f"max_misses must be >= 1, got {spec.max_misses}")
    b = spec.backoff
    need(b.initial >= 0 and b.maximum >= 0, "backoff delays must be >= 0")
    need(b.factor >= 1, f"backoff factor must be >= 1, got {b.factor}")
    need(0 <= b.jitter <= 1, f"backoff jitter must be within [0, 1], got {b.jitter}")
    need(len(set(spec.requires)) == len(spec.requires), "requires names a child twice")
    need(name not in spec.requires, "requires itself (a dependency cycle)")
    return errors


def _observe(d: Deferred[None]) -> Deferred[None]:
    """A new Deferred firing (with ``None``) when ``d``, which never fails, does."""
    out: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out


def _cancel_call(call_: IDelayedCall | None) -> None:
    if call_ is not None and call_.active():
        call_.cancel()


@attrs.define(eq=False)
class _Child:
    """The supervisor's bookkeeping for one child."""

    spec: ChildSpec
    state: ChildState
    since: float
    instance: IService | None = None
    #: bumped whenever the instance's callbacks become stale (stop, restart)
    generation: int = 0
    restarts: int = 0
    #: the backoff attempt counter (reset after ``stable_after``)
    attempt: int = 0
    #: when recent restarts happened, for the intensity limit
    history: list[float] = attrs.field(factory=list)
    last_error: str | None = None
    #: whether the child should be running (False after a final exit)
    wanted: bool = True
    #: it exited normally and is not to be restarted (a finished one-shot)
    completed: bool = False
    #: decisions taken at exit, applied once the old instance has stopped
    fail_reason: str | None = None
    backoff_delay: float | None = None
    misses: int = 0
    #: instances built (every start attempt that got past the factory)
    starts: int = 0
    last_miss: str = ""
    abandoned: int = 0
    start_call: IDelayedCall | None = None
    stable_call: IDelayedCall | None = None
    backoff_call: IDelayedCall | None = None
    health_call: IDelayedCall | None = None
    health_d: Deferred[object] | None = None
    #: fires (never fails) once the in-flight stop has finished
    stop_done: Deferred[None] | None = None
    waiters: list[Deferred[ChildStatus]] = attrs.field(factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    def status(self) -> ChildStatus:
        return ChildStatus(
            name=self.spec.name,
            state=self.state,
            restarts=self.restarts,
            last_error=self.last_error,
            since=self.since,
            requires=self.spec.requires,
            restart=self.spec.restart,
        )


@implementer(ISupervisor)
@attrs.define(eq=False)
class Supervisor(Service):
    """
    An ``IService`` that supervises children; see the module docstring.

    @ivar clock: drives every timeout, backoff, stability and health timer.
    @ivar bus: where ``ChildStateChanged`` events go (``None``: nowhere).
    @ivar health: where each child is reported as ``child:<name>``.
    @ivar rand: the jitter source of the backoff (``random.random``).
    @ivar notifier: told ``READY=1`` when ready, ``STOPPING=1`` at stop,
        and runs the systemd watchdog while the supervisor runs.
    """

    log = Logger()

    clock: IReactorTime = attrs.field(validator=provides(IReactorTime))
    bus: IEventBus | None = attrs.field(
        default=None, validator=attrs.validators.optional(provides(IEventBus))
    )
    health: IHealth | None = attrs.field(
        default=None, validator=attrs.validators.optional(provides(IHealth))
    )
    rand: Callable[[], float] = attrs.field(default=random.random, kw_only=True)
    notifier: SystemdNotifier | None = attrs.field(default=None, kw_only=True)
    name: str = attrs.field(default="piccolod", kw_only=True)
    _children: dict[str, _Child] = attrs.field(init=False, factory=dict)
    _order: list[_Child] = attrs.field(init=False, factory=list)
    #: the child whose start is in flight (starts are one at a time)
    _starting: _Child | None = attrs.field(init=False, default=None)
    _stopping: bool = attrs.field(init=False, default=False)
    _stop_d: Deferred[None] | None = attrs.field(init=False, default=None)
    _start_after_stop: bool = attrs.field(init=False, default=False)
    _first_pass_done: bool = attrs.field(init=False, default=False)
    _ready_notified: bool = attrs.field(init=False, default=False)
    _ready_waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _pumping: bool = attrs.field(init=False, default=False)
    _dependents_cache: dict[str, list[_Child]] = attrs.field(init=False, factory=dict)
    _pump_again: bool = attrs.field(init=False, default=False)

    # -- ISupervisor: configuration and queries ---------------------------------

    def add_child(self, spec: ChildSpec) -> None:
        """
        Add a child (started at once, in order, when the supervisor runs).
        Raises ``DuplicateRegistration`` for a taken name and ``ConfigError``
        for an unknown requirement, a cycle or an invalid value.
        """
        if not isinstance(spec, ChildSpec):
            raise ConfigError([f"add_child needs a ChildSpec, got {spec!r}"])
        if spec.name in self._children:
            raise DuplicateRegistration(f"a child named {spec.name!r} already exists")
        errors = _validate(spec)
        if errors:
            raise ConfigError(errors)
        unknown = [req for req in spec.requires if req not in self._children]
        if unknown:
            raise ConfigError(
                [f"child {spec.name!r} requires unknown child {req!r}" for req in unknown]
            )
        # Requirements must exist already, so no cycle can form and the new
        # child comes last in the topological order (ties by insertion).
        child = _Child(spec=spec, state=ChildState.STOPPED, since=self.clock.seconds())
        self._children[spec.name] = child
        self._order.append(child)
        self._dependents_cache.clear()
        if self.health is not None:
            self.health.require(self._component(child), spec.required)
        self._report(child)
        self.log.info(
            "child {child} added (requires {requires}, restart {restart})",
            child=spec.name,
            requires=list(spec.requires),
            restart=spec.restart.value,
        )
        if self.running and not self._stopping:
            self._kick()

    def children(self) -> Sequence[ChildStatus]:
        """Every child's status, in start order."""
        return [child.status() for child in self._order]

    def child(self, name: str) -> ChildStatus:
        """One child's status; raises ``NotFound``."""
        return self._get(name).status()

    def service(self, name: str) -> IService | None:
        """The running instance of ``name``, else ``None``; raises ``NotFound``."""
        child = self._get(name)
        return child.instance if child.state is ChildState.RUNNING else None

    def stats(self) -> dict[str, Any]:
        """
        Counters for ``/metrics``: whether the supervisor runs and is ready,
        and per child its state, restarts, starts, abandoned stops and
        current consecutive health-check misses.
        """
        return {
            "running": bool(self.running),
            "ready": self._is_ready(),
            "children": [
                {
                    "name": c.name,
                    "state": c.state.value,
                    "restarts": c.restarts,
                    "starts": c.starts,
                    "abandoned": c.abandoned,
                    "health_misses": c.misses,
                    "required": c.spec.required,
                }
                for c in self._order
            ],
        }

    def when_ready(self) -> Deferred[None]:
        """
        Fires once the supervisor runs, its first start pass is over and
        every required child is satisfied (running, or finished normally).
        Fails with ``NotReady`` if the supervisor is stopped first.
        Cancellable.
        """
        if self._is_ready():
            return succeed(None)

        def forget(d: Deferred[None]) -> None:
            if d in self._ready_waiters:
                self._ready_waiters.remove(d)

        waiter: Deferred[None] = Deferred(forget)
        self._ready_waiters.append(waiter)
        return waiter

    # -- ISupervisor: operations --------------------------------------------------

    def restart_child(self, name: str) -> Deferred[ChildStatus]:
        """
        Stop ``name`` (if it has an instance) and start a new instance now,
        without backoff.  A ``failed`` child is reset first (restart count
        and history cleared) and its stopped dependents start after it.
        Fires with the status once the child runs; fails with ``NotFound``,
        ``NotReady`` (the supervisor is not running), ``Conflict`` (a
        requirement has failed) or ``SubsystemFailed`` (this start failed;
        the restart policy then applies as usual).
        """
        try:
            child = self._get(name)
        except NotFound as e:
            return _failed(e)
        if not self.running or self._stopping:
            return _failed(NotReady(f"the supervisor is not running; cannot restart {name!r}"))
        blocker = self._failed_requirement(child)
        if blocker is not None:
            return _failed(
                Conflict(f"cannot restart {name!r}: its requirement {blocker!r} has failed")
            )
        waiter: Deferred[ChildStatus] = Deferred()
        child.waiters.append(waiter)
        was_failed = child.state is ChildState.FAILED
        self.log.info(
            "restart of child {child} requested ({state})", child=name, state=child.state.value
        )
        child.wanted = True
        child.completed = False
        child.fail_reason = None
        child.backoff_delay = None
        _cancel_call(child.backoff_call)
        child.backoff_call = None
        if was_failed:
            child.history.clear()
            child.restarts = 0
            child.attempt = 0
        if child.instance is not None:
            if child.state in (ChildState.STARTING, ChildState.RUNNING):
                self._begin_stop(child)
                self._stop_one(child)
            # else: STOPPING already; it settles into a fresh start
        else:
            self._settle(child)
        if was_failed:
            for dependent in self._dependents(child):
                self._report(dependent)
        return waiter

    def child_failed(self, name: str, reason: str) -> None:
        """
        Report that child ``name`` has failed (e.g. seen by a health probe
        elsewhere); the restart policy applies as for a crash.  Ignored
        (logged) when the child is not starting or running.  Raises
        ``NotFound``.
        """
        child = self._get(name)
        if child.state not in (ChildState.STARTING, ChildState.RUNNING):
            self.log.info(
                "ignoring failure report for child {child} in state {state}: {reason}",
                child=name,
                state=child.state.value,
                reason=reason,
            )
            return
        self._on_exit(child, child.generation, f"reported failed: {reason or 'no reason given'}")

    # -- IService -----------------------------------------------------------------

    def startService(self) -> Deferred[None]:  # type: ignore[override]
        """
        Start the children (without blocking).  The returned Deferred, which
        ``twistd`` ignores, fires with ``None`` once the supervisor is ready
        or has been stopped; it never fails.  ``when_ready`` is the public
        readiness signal.
        """
        if self._stop_d is not None:
            # Start once the stop in progress is over, unless a later
            # stopService call cancels this start (the last call wins).
            self._start_after_stop = True
            pending = _observe(self._stop_d)
            pending.addCallback(self._start_after_stopping)
            return pending
        if self.running:
            return _quiet(self.when_ready())
        self.running = 1  # what Service.startService does
        self._stopping = False
        self._first_pass_done = False
        self._ready_notified = False
        for child in self._order:
            child.wanted = True
            child.completed = False
            child.history.clear()
            child.restarts = 0
            child.attempt = 0
            child.fail_reason = None
            child.backoff_delay = None
            if child.state is ChildState.FAILED:
                self._set_state(child, ChildState.STOPPED)
            else:
                self._report(child)
        self.log.info(
            "supervisor {name} starting {count} children", name=self.name, count=len(self._order)
        )
        if self.notifier is not None:
            self.notifier.start()
        started = _quiet(self.when_ready())
        self._kick()
        return started

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """
        Stop every child in reverse start order, each bounded by its
        ``stop_timeout``; cancel every timer; restart nothing.  Idempotent;
        fires with ``None`` once all children have stopped or been
        abandoned (never fails).
        """
        if self._stop_d is not None:
            self._start_after_stop = False
            return _observe(self._stop_d)
        if not self.running:
            return succeed(None)
        self.running = 0  # what Service.stopService does
        self._stopping = True
        self.log.info("supervisor {name} stopping", name=self.name)
        if self.notifier is not None:
            self.notifier.stopping()
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.errback(NotReady("the supervisor stopped before it was ready"))
        self._starting = None
        for child in self._order:
            self._fail_waiters(child, NotReady(f"the supervisor stopped; {child.name} stopping"))
            child.fail_reason = None
            child.backoff_delay = None
            if child.instance is not None:
                if child.state is not ChildState.STOPPING:
                    self._begin_stop(child)
            elif child.state is ChildState.BACKOFF:
                _cancel_call(child.backoff_call)
                child.backoff_call = None
                self._set_state(child, ChildState.STOPPED)
        done = Deferred.fromCoroutine(self._stop_in_order(list(reversed(self._order))))
        self._stop_d = done
        done.addBoth(self._stopped)
        return _observe(done)

    def _start_after_stopping(self, _: object) -> Deferred[None] | None:
        if not self._start_after_stop:
            return None
        self._start_after_stop = False
        return self.startService()

    def _stopped(self, result: object) -> None:
        if isinstance(result, Failure):
            self.log.failure("while stopping the children of {name}", result, name=self.name)
        self._stop_d = None
        self._stopping = False
        if self.notifier is not None:
            self.notifier.stop()
        self.log.info("supervisor {name} stopped", name=self.name)

    # -- the start queue ----------------------------------------------------------

    def _kick(self) -> None:
        """Start the next eligible child if no start is in flight."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                nxt = self._next_eligible()
                if nxt is not None:
                    self._start(nxt)
                    continue
                if not self._pump_again:
                    break
        finally:
            self._pumping = False
        if self.running and not self._stopping and self._starting is None:
            self._first_pass_done = True
        self._check_ready()

    def _next_eligible(self) -> _Child | None:
        """
        The first child (in start order) to start now: a stopped child that
        is wanted, when no other start from ``stopped`` is in flight; or a
        child whose backoff is over (restarts do not queue behind a slow
        start of another child).  Either way its requirements are satisfied.
        """
        if not self.running or self._stopping:
            return None
        slot_free = self._starting is None
        for child in self._order:
            if not child.wanted or child.instance is not None:
                continue
            if child.state is ChildState.BACKOFF:
                if child.backoff_call is not None:
                    continue
            elif child.state is not ChildState.STOPPED or not slot_free:
                continue
            if all(self._satisfied(self._children[r]) for r in child.spec.requires) and (
                self._failed_requirement(child) is None
            ):
                return child
        return None

    def _satisfied(self, child: _Child) -> bool:
        """Running, or finished normally (a one-shot requirement is met)."""
        if child.state is ChildState.RUNNING:
            return True
        return child.state is ChildState.STOPPED and child.completed

    def _is_ready(self) -> bool:
        if not self.running or self._stopping or not self._first_pass_done:
            return False
        return all(self._satisfied(c) for c in self._order if c.spec.required)

    def _check_ready(self) -> None:
        if not self._is_ready():
            return
        if self.notifier is not None:
            if not self._ready_notified:
                self.notifier.ready(self._summary())
            else:
                self.notifier.status(self._summary())
        if not self._ready_notified:
            self._ready_notified = True
            self.log.info(
                "supervisor {name} ready: {summary}", name=self.name, summary=self._summary()
            )
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _summary(self) -> str:
        running = sum(1 for c in self._order if c.state is ChildState.RUNNING)
        return f"{running}/{len(self._order)} children running"

    # -- one child's life -----------------------------------------------------------

    def _start(self, child: _Child) -> None:
        """Build a fresh instance and start it; readiness comes back later."""
        assert child.instance is None, f"{child.name} already has an instance"
        if child.state is ChildState.STOPPED:
            self._starting = child
        child.generation += 1
        gen = child.generation
        child.completed = False
        child.misses = 0
        child.backoff_delay = None
        _cancel_call(child.backoff_call)
        child.backoff_call = None
        self._set_state(child, ChildState.STARTING)
        try:
            instance = child.spec.factory()
            if not IService.providedBy(instance):
                raise TypeError(f"factory returned {instance!r}, which does not provide IService")
        except Exception as e:
            self._on_exit(child, gen, f"cannot build: {describe(e)}")
            return
        child.instance = instance
        child.starts += 1
        waits: list[Deferred[Any]] = [call(instance.startService)]
        exited: Deferred[Any] | None = None
        if ISupervisedService.providedBy(instance):
            waits.append(call(instance.when_ready))
            exited = call(instance.when_exited)
        readiness = _gather(waits)
        if exited is not None:
            exited.addCallbacks(
                lambda _: self._on_exit(child, gen, None),
                lambda f: self._on_exit(child, gen, f"crashed: {describe(f)}"),
            )
        if child.generation != gen:
            # It exited (or was stopped) while being started.
            readiness.addErrback(lambda _: None)
            return
        child.start_call = self.clock.callLater(
            child.spec.start_timeout, self._start_timed_out, child, gen
        )
        readiness.addCallbacks(
            lambda _: self._on_ready(child, gen),
            lambda f: self._on_exit(child, gen, f"start failed: {describe(f)}"),
        )

    def _start_timed_out(self, child: _Child, gen: int) -> None:
        child.start_call = None
        self._on_exit(child, gen, f"not ready within {child.spec.start_timeout:g}s")

    def _on_ready(self, child: _Child, gen: int) -> None:
        if child.generation != gen or child.state is not ChildState.STARTING:
            return
        _cancel_call(child.start_call)
        child.start_call = None
        if self._starting is child:
            self._starting = None
        child.stable_call = self.clock.callLater(
            child.spec.stable_after, self._became_stable, child, gen
        )
        self._schedule_health(child, gen)
        self._set_state(child, ChildState.RUNNING)
        self._resolve_waiters(child)
        self._kick()

    def _became_stable(self, child: _Child, gen: int) -> None:
        child.stable_call = None
        if child.generation != gen or child.state is not ChildState.RUNNING:
            return
        if child.attempt:
            self.log.info(
                "child {child} stable for {seconds}s; backoff reset",
                child=child.name,
                seconds=child.spec.stable_after,
                restarts=child.restarts,
            )
        child.attempt = 0

    def _on_exit(self, child: _Child, gen: int, reason: str | None) -> None:
        """
        The instance of generation ``gen`` exited (``reason`` ``None``:
        normally).  Decide what follows, then stop the old instance.
        """
        if child.generation != gen or self._stopping or not self.running:
            return
        if child.state not in (ChildState.STARTING, ChildState.RUNNING):
            return
        abnormal = reason is not None
        spec = child.spec
        if abnormal:
            self.log.warn(
                "child {child} exited abnormally: {error}",
                child=child.name,
                error=reason,
                state=child.state.value,
                restarts=child.restarts,
            )
            child.last_error = reason
        else:
            self.log.info(
                "child {child} exited normally", child=child.name, restarts=child.restarts
            )
        policy = spec.restart
        if policy is RestartPolicy.TEMPORARY or (
            policy is RestartPolicy.TRANSIENT and not abnormal
        ):
            child.wanted = False
            if abnormal:
                child.fail_reason = reason
            else:
                child.completed = True
        else:
            now = self.clock.seconds()
            recent = [t for t in child.history if now - t < spec.period]
            if len(recent) >= spec.intensity:
                child.fail_reason = (
                    f"restart intensity exceeded ({len(recent)} restarts within "
                    f"{spec.period:g}s, at most {spec.intensity}); last exit: "
                    f"{reason or 'normal'}"
                )
            else:
                recent.append(now)
                recent = recent[-spec.intensity :]
                child.restarts += 1
                attempt = min(child.attempt, _attempt_cap(spec.backoff))
                child.backoff_delay = spec.backoff.delay(attempt, self.rand)
                child.attempt += 1
            child.history = recent
        if child.state is ChildState.STARTING and (abnormal or child.fail_reason):
            self._fail_waiters(
                child, SubsystemFailed(f"child {child.name!r} did not start: {reason}")
            )
        if child.instance is None:
            # It never got an instance (the factory failed).
            self._invalidate(child)
            self._settle(child)
        else:
            self._begin_stop(child)
            self._stop_one(child)
        self._kick()

    def _begin_stop(self, child: _Child) -> None:
        """Invalidate the instance's callbacks and timers; state ``stopping``."""
        self._invalidate(child)
        self._set_state(child, ChildState.STOPPING)

    def _invalidate(self, child: _Child) -> None:
        """Make the current instance's callbacks stale and cancel its timers."""
        child.generation += 1
        _cancel_call(child.start_call)
        _cancel_call(child.stable_call)
        _cancel_call(child.health_call)
        child.start_call = child.stable_call = child.health_call = None
        check, child.health_d = child.health_d, None
        if check is not None:
            check.cancel()
        if self._starting is child:
            self._starting = None

    def _stop_one(self, child: _Child) -> Deferred[None]:
        """
        Stop ``child``'s instance (once), bounded by its stop timeout.  The
        result fires (never fails) once it has stopped or been abandoned.
        """
        if child.instance is None:
            return succeed(None)
        if child.stop_done is not None:
            return _observe(child.stop_done)
        instance = child.instance
        done: Deferred[None] = Deferred()
        child.stop_done = done
        timeout = child.spec.stop_timeout
        finished = False

        def finish(outcome: Literal["ok", "error", "timeout"], detail: str = "") -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            _cancel_call(timer)
            if outcome == "timeout":
                child.abandoned += 1
                self.log.error(
                    "child {child} did not stop within {timeout}s; abandoning the instance",
                    child=child.name,
                    timeout=timeout,
                    restarts=child.restarts,
                )
            elif outcome == "error":
                self.log.warn(
                    "child {child} failed while stopping: {error}", child=child.name, error=detail
                )
            child.instance = None
            child.stop_done = None
            self._settle(child)
            done.callback(None)

        def ok(_: object) -> None:
            finish("ok")

        def error(f: Failure) -> None:
            finish("error", describe(f))

        timer = self.clock.callLater(timeout, finish, "timeout")
        call(instance.stopService).addCallbacks(ok, error)
        return _observe(done)

    async def _stop_in_order(self, children: Iterable[_Child]) -> None:
        for child in children:
            await self._stop_one(child)

    def _settle(self, child: _Child) -> None:
        """Decide the state of a child that has no instance (any more)."""
        if child.instance is not None:
            return
        _cancel_call(child.backoff_call)
        child.backoff_call = None
        if not self.running or self._stopping:
            reason, child.fail_reason = child.fail_reason, None
            child.backoff_delay = None
            if reason is not None or child.state is ChildState.FAILED:
                self._set_state(child, ChildState.FAILED, reason or _KEEP)
            else:
                self._set_state(child, ChildState.STOPPED)
            return
        if child.fail_reason is not None:
            reason, child.fail_reason = child.fail_reason, None
            child.backoff_delay = None
            child.wanted = False
            self.log.error(
                "child {child} failed: {error}",
                child=child.name,
                error=reason,
                restarts=child.restarts,
            )
            self._set_state(child, ChildState.FAILED, reason)
            self._fail_waiters(child, SubsystemFailed(f"child {child.name!r} failed: {reason}"))
            self._stop_dependents(child)
            self._kick()
            return
        blocker = self._failed_requirement(child)
        if blocker is not None:
            child.backoff_delay = None
            self._set_state(child, ChildState.STOPPED, f"requirement {blocker!r} failed")
            self._fail_waiters(
                child, SubsystemFailed(f"child {child.name!r}: requirement {blocker!r} failed")
            )
            self._kick()
            return
        if not child.wanted:
            self._set_state(child, ChildState.STOPPED)
            self._resolve_waiters(child)
            self._kick()
            return
        if child.backoff_delay is not None:
            delay, child.backoff_delay = child.backoff_delay, None
            child.backoff_call = self.clock.callLater(delay, self._backoff_over, child)
            self.log.info(
                "child {child} restarting in {delay:.3f}s (restart {restarts})",
                child=child.name,
                delay=delay,
                restarts=child.restarts,
            )
            self._set_state(child, ChildState.BACKOFF)
            self._kick()
            return
        self._set_state(child, ChildState.STOPPED)
        self._kick()

    def _backoff_over(self, child: _Child) -> None:
        child.backoff_call = None
        self._kick()

    def _stop_dependents(self, failed: _Child) -> None:
        """Stop every child that (transitively) requires ``failed``, in reverse order."""
        dependents = self._dependents(failed)
        reason = f"requirement {failed.name!r} failed"
        to_stop: list[_Child] = []
        for child in reversed(dependents):
            if child.instance is not None:
                if child.state is not ChildState.STOPPING:
                    child.last_error = reason
                    self._begin_stop(child)
                to_stop.append(child)
            elif child.state is ChildState.BACKOFF or (
                child.state is ChildState.STOPPED and not child.completed
            ):
                _cancel_call(child.backoff_call)
                child.backoff_call = None
                child.backoff_delay = None
                self._set_state(child, ChildState.STOPPED, reason)
                self._fail_waiters(child, SubsystemFailed(f"child {child.name!r}: {reason}"))
        if to_stop:
            Deferred.fromCoroutine(self._stop_in_order(to_stop))

    def _dependents(self, required: _Child) -> list[_Child]:
        """The children that (transitively) require ``required``, in start order."""
        cached = self._dependents_cache.get(required.name)
        if cached is not None:
            return cached
        names = {required.name}
        out: list[_Child] = []
        for child in self._order:
            if names.intersection(child.spec.requires):
                names.add(child.name)
                out.append(child)
        self._dependents_cache[required.name] = out
        return out

    def _failed_requirement(self, child: _Child) -> str | None:
        """The name of a failed (transitive) requirement of ``child``, if any."""
        seen: set[str] = set()
        todo = list(child.spec.requires)
        while todo:
            name = todo.pop(0)
            if name in seen:
                continue
            seen.add(name)
            req = self._children[name]
            if req.state is ChildState.FAILED:
                return name
            todo.extend(req.spec.requires)
        return None

    # -- health checks ----------------------------------------------------------------

    def _schedule_health(self, child: _Child, gen: int) -> None:
        if child.spec.health_check is None:
            return
        child.health_call = self.clock.callLater(
            child.spec.health_interval, self._health_tick, child, gen
        )

    def _health_tick(self, child: _Child, gen: int) -> None:
        child.health_call = None
        check = child.spec.health_check
        if child.generation != gen or child.state is not ChildState.RUNNING or check is None:
            return
        timeout = child.spec.health_timeout
        d = call(check)
        child.health_d = d
        d.addTimeout(timeout, self.clock)

        def ok(result: object) -> None:
            self._health_result(child, gen, None if result else f"check returned {result!r}")

        def error(f: Failure) -> None:
            if isinstance(f.value, (TimeoutError, CancelledError)):
                self._health_result(child, gen, f"no answer within {timeout:g}s")
            else:
                self._health_result(child, gen, describe(f))

        d.addCallbacks(ok, error)

    def _health_result(self, child: _Child, gen: int, miss: str | None) -> None:
        if child.generation != gen or child.state is not ChildState.RUNNING:
            return
        child.health_d = None
        if miss is None:
            if child.misses:
                self.log.info("child {child} health check passes again", child=child.name)
                child.misses = 0
                self._report(child)
        else:
            child.misses += 1
            child.last_miss = miss
            limit = child.spec.max_misses
            self.log.warn(
                "child {child} missed health check {misses}/{limit}: {error}",
                child=child.name,
                misses=child.misses,
                limit=limit,
                error=miss,
            )
            if child.misses >= limit:
                self._on_exit(
                    child, gen, f"health check missed {child.misses} times in a row: {miss}"
                )
                return
            self._report(child)
        self._schedule_health(child, gen)

    # -- state, events, health ------------------------------------------------------

    def _set_state(self, child: _Child, state: ChildState, error: Any = _KEEP) -> None:
        if error is not _KEEP:
            child.last_error = error
        previous = child.state
        if previous is state:
            self._report(child)
            return
        child.state = state
        child.since = self.clock.seconds()
        self.log.info(
            "child {child}: {previous} -> {state} (restarts {restarts})",
            child=child.name,
            previous=previous.value,
            state=state.value,
            restarts=child.restarts,
            error=child.last_error,
        )
        if self.bus is not None:
            event = ChildStateChanged(
                child=child.name,
                state=state,
                previous=previous,
                restarts=child.restarts,
                error=child.last_error,
            )
            try:
                self.bus.publish(event, source="supervisor")
            except Exception:
                self.log.failure("publishing the state of child {child}", child=child.name)
        self._report(child)
        for dependent in self._dependents(child):
            if dependent.state is ChildState.STOPPED:
                self._report(dependent)

    def _component(self, child: _Child) -> str:
        return f"child:{child.name}"

    def _report(self, child: _Child) -> None:
        if self.health is None:
            return
        level, message = self._health_of(child)
        try:
            self.health.report(
                self._component(child),
                level,
                message,
                {"restarts": float(child.restarts), "health_misses": float(child.misses)},
            )
        except Exception:
            self.log.failure("reporting the health of child {child}", child=child.name)

    def _health_of(self, child: _Child) -> tuple[HealthLevel, str]:
        state = child.state
        if state is ChildState.RUNNING:
            if child.misses:
                return HealthLevel.OK, (
                    f"running; health check missed {child.misses}/{child.spec.max_misses}: "
                    f"{child.last_miss}"
                )
            return HealthLevel.OK, "running"
        if state is ChildState.STARTING:
            return HealthLevel.WARN, "starting"
        if state is ChildState.BACKOFF:
            return HealthLevel.WARN, f"restarting after: {child.last_error or 'normal exit'}"
        if state is ChildState.STOPPING:
            return HealthLevel.WARN, "stopping"
        if state is ChildState.FAILED:
            return HealthLevel.ERROR, f"failed: {child.last_error or 'unknown'}"
        if child.completed:
            return HealthLevel.OK, "finished"
        blocker = self._failed_requirement(child)
        if blocker is not None:
            return HealthLevel.ERROR, f"stopped: requirement {blocker!r} failed"
        if not self.running or self._stopping:
            return HealthLevel.WARN, "stopped"
        waiting = [r for r in child.spec.requires if not self._satisfied(self._children[r])]
        if waiting:
            return HealthLevel.WARN, f"waiting for {', '.join(waiting)}"
        return HealthLevel.WARN, "not started"

    # -- restart waiters ----------------------------------------------------------------

    def _resolve_waiters(self, child: _Child) -> None:
        waiters, child.waiters = child.waiters, []
        for waiter in waiters:
            waiter.callback(child.status())

    def _fail_waiters(self, child: _Child, error: Exception) -> None:
        waiters, child.waiters = child.waiters, []
        for waiter in waiters:
            waiter.errback(error)

    def _get(self, name: str) -> _Child:
        try:
            return self._children[name]
        except KeyError:
            raise NotFound(f"no child named {name!r}") from None


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


def _quiet(d: Deferred[None]) -> Deferred[None]:
    """``d`` with any failure turned into ``None``."""
    return d.addErrback(lambda _: None)


def _gather(waits: list[Deferred[Any]]) -> Deferred[Any]:
    """Fires once every Deferred has fired; fails with the first failure."""
    return gatherResults(waits, consumeErrors=True)
