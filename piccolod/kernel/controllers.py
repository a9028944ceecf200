"""
Level-triggered controllers: a keyed work queue driving a reconciler.

Semantics follow client-go's workqueue and controller-runtime:

- **Deduplicated.** A key queued twice is reconciled once.
- **Never concurrent per key.** A key is never reconciled twice at once; a
  key enqueued while it is being reconciled is reconciled once more after
  the current run ends (however many times it was enqueued meanwhile).
- **Delayed adds.** ``enqueue(key, after)`` makes the key ready after
  ``after`` seconds; of several pending delays for one key the earliest
  wins.
- **Bounded concurrency.** At most ``concurrency`` keys run at once, taken
  in FIFO order of readiness.
- **Per-key exponential backoff** on error (``Backoff.delay`` with jitter),
  reset when the key next succeeds (client-go's ``Forget``).
- **Results.** ``reconcile(key)`` returns ``None`` (done) or a number of
  seconds after which to reconcile it again (a requeue, not an error; the
  backoff is reset).  Any other value counts as an error.
- **Terminal errors** (any exception with a true ``terminal`` attribute,
  e.g. :class:`TerminalError`) are reported but not retried; the next event
  for the key runs it again.
- **Periodic resync.** While running, every ``resync_interval`` seconds
  (and once at start) every key of ``reconciler.keys()`` is enqueued; with
  ``resync_interval=None`` only the start-up resync happens.
- **Lifecycle.** Keys may be enqueued before start; they run once started.
  ``stopService`` cancels every timer (pending delays are remembered and
  rescheduled on the next start), starts nothing new, and fires once the
  in-flight reconciles have finished.

Each reconcile publishes a :class:`~piccolod.events.ReconcileResult`.

Objects reconciled by controllers carry ``generation``,
``observed_generation`` and :class:`Condition` values (see
:func:`set_condition` and :class:`ObjectStatus`), as in Kubernetes'
``metav1.Condition``.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.errors import PiccolodError
from piccolod.events import ReconcileResult
from piccolod.interfaces import Backoff, IController, IEventBus, IReconciler
from piccolod.kernel.aio import call, provides

__all__ = [
    "CONDITION_STATUSES",
    "Condition",
    "Controller",
    "ControllerStats",
    "ObjectStatus",
    "TerminalError",
    "find_condition",
    "is_terminal",
    "set_condition",
]


class TerminalError(PiccolodError):
    """
    A reconcile error that retrying cannot fix (bad spec, missing
    dependency that only a user can supply).  The controller reports it and
    does not retry the key until it is enqueued again.
    """

    type = "terminal"
    title = "Terminal reconcile error"
    status = 409
    terminal = True


def is_terminal(error: BaseException) -> bool:
    """Whether ``error`` says it must not be retried (``terminal = True``)."""
    return bool(getattr(error, "terminal", False))


# ==========================================================================
# Conditions and status

CONDITION_STATUSES = ("True", "False", "Unknown")


@attrs.frozen
class Condition:
    """
    One observation about an object (``Ready``, ``Degraded``, ...).

    @ivar status: ``"True"``, ``"False"`` or ``"Unknown"``.
    @ivar observed_generation: the object's generation this was computed from.
    @ivar last_transition_time: when ``status`` last changed (clock seconds).
    @ivar reason: a CamelCase machine-readable reason.
    @ivar message: a human-readable detail.
    """

    type: str = attrs.field(validator=attrs.validators.min_len(1))
    status: str = attrs.field(validator=attrs.validators.in_(CONDITION_STATUSES))
    observed_generation: int = 0
    last_transition_time: float = 0.0
    reason: str = ""
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def find_condition(conditions: Iterable[Condition], type: str) -> Condition | None:
    """The condition of ``type``, or ``None``."""
    for condition in conditions:
        if condition.type == type:
            return condition
    return None


def set_condition(
    conditions: tuple[Condition, ...], new: Condition, now: float
) -> tuple[Condition, ...]:
    """
    Return ``conditions`` with ``new`` in place of the condition of its
    type (appended if absent).  ``last_transition_time`` is ``now`` when the
    status changed (or the type is new) and is kept otherwise; the other
    fields are taken from ``new``.
    """
    old = find_condition(conditions, new.type)
    if old is None:
        return (*conditions, attrs.evolve(new, last_transition_time=now))
    since = old.last_transition_time if old.status == new.status else now
    updated = attrs.evolve(new, last_transition_time=since)
    return tuple(updated if c.type == new.type else c for c in conditions)


@attrs.frozen
class ObjectStatus:
    """
    The status block of a reconciled object.

    @ivar generation: bumped on every change of the desired state.
    @ivar observed_generation: the generation the controller last acted on.
    """

    generation: int = 0
    observed_generation: int = 0
    conditions: tuple[Condition, ...] = ()

    def is_stale(self) -> bool:
        """True while the controller has not acted on the latest generation."""
        return self.observed_generation < self.generation

    def condition(self, type: str) -> Condition | None:
        return find_condition(self.conditions, type)

    def with_condition(self, new: Condition, now: float) -> ObjectStatus:
        """A copy with ``new`` set (see :func:`set_condition`)."""
        return attrs.evolve(self, conditions=set_condition(self.conditions, new, now))

    def observed(self, generation: int | None = None) -> ObjectStatus:
        """A copy that has observed ``generation`` (default: the current one)."""
        seen = self.generation if generation is None else generation
        return attrs.evolve(self, observed_generation=seen)

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "observed_generation": self.observed_generation,
            "conditions": [c.to_json() for c in self.conditions],
        }


# ==========================================================================
# The controller


@attrs.frozen
class ControllerStats:
    """
    A controller's figures.

    @ivar queued: keys ready to run.
    @ivar waiting: keys waiting for a delay (requeue or backoff).
    @ivar in_flight: keys being reconciled.
    @ivar backing_off: keys with a non-zero failure count.
    @ivar errors_by_key: error counts of the most recently failing keys
        (bounded; a key's count survives its recovery).
    """

    name: str
    queued: int
    waiting: int
    in_flight: int
    reconciles: int
    succeeded: int
    failed: int
    retries: int
    requeues: int
    terminal: int
    backing_off: int
    errors_by_key: tuple[tuple[str, int], ...]

    def to_json(self) -> dict[str, Any]:
        body = attrs.asdict(self)
        body["errors_by_key"] = dict(self.errors_by_key)
        return body


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


def _interval(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{attribute.name} must be None or > 0, got {value!r}")


@implementer(IController)
@attrs.define(eq=False)
class Controller(Service):
    """
    A keyed, deduplicated, rate-limited work queue feeding ``reconciler``;
    an ``IService`` (see the module docstring for the semantics).

    @ivar rand: the jitter source (``random.random``; tests pin it).
    @ivar max_error_keys: how many keys ``errors_by_key`` remembers.
    @ivar turn_budget: at most this many reconciles start in one reactor
        turn; the rest continue on the next turn (``callLater(0)``), so a
        long queue of synchronous reconciles cannot block the reactor.
    """

    log = Logger()

    name: str = attrs.field(validator=attrs.validators.min_len(1))
    reconciler: IReconciler = attrs.field(validator=provides(IReconciler))
    clock: IReactorTime = attrs.field(validator=provides(IReactorTime))
    concurrency: int = attrs.field(default=1, kw_only=True, validator=_positive)
    backoff: Backoff = attrs.field(
        default=Backoff(initial=0.005, maximum=300.0, factor=2.0, jitter=0.1), kw_only=True
    )
    resync_interval: float | None = attrs.field(default=300.0, kw_only=True, validator=_interval)
    bus: IEventBus | None = attrs.field(
        default=None, kw_only=True, validator=attrs.validators.optional(provides(IEventBus))
    )
    rand: Callable[[], float] = attrs.field(default=random.random, kw_only=True)
    max_error_keys: int = attrs.field(default=256, kw_only=True, validator=_positive)
    turn_budget: int = attrs.field(default=100, kw_only=True, validator=_positive)

    # The queue (client-go's queue / dirty / processing).
    _queue: collections.deque[str] = attrs.field(init=False, factory=collections.deque)
    _dirty: set[str] = attrs.field(init=False, factory=set)
    _processing: set[str] = attrs.field(init=False, factory=set)
    # Delayed adds: key -> (due time, timer while running).
    _waiting: dict[str, tuple[float, IDelayedCall | None]] = attrs.field(init=False, factory=dict)
    _failures: dict[str, int] = attrs.field(init=False, factory=dict)
    _errors: collections.OrderedDict[str, int] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _idle_waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _drain_waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _resync_loop: LoopingCall | None = attrs.field(init=False, default=None)
    _pumping: bool = attrs.field(init=False, default=False)
    _kick: IDelayedCall | None = attrs.field(init=False, default=None)
    #: A resync retried after a failure, and how many failed in a row.
    _resync_retry: IDelayedCall | None = attrs.field(init=False, default=None)
    _resync_failures: int = attrs.field(init=False, default=0)
    _counts: collections.Counter[str] = attrs.field(init=False, factory=collections.Counter)

    # -- IController --------------------------------------------------------

    def enqueue(self, key: str, after: float = 0.0) -> None:
        """
        Ask for ``key`` to be reconciled, now or after ``after`` seconds.

        @raise ValueError: ``key`` is not a non-empty string or ``after`` is
            negative or not finite.
        """
        if not isinstance(key, str) or not key:
            raise ValueError(f"{self.name}: key must be a non-empty string, got {key!r}")
        if (
            isinstance(after, bool)
            or not isinstance(after, (int, float))
            or not math.isfinite(after)
            or after < 0
        ):
            raise ValueError(f"{self.name}: after must be a finite number >= 0, got {after!r}")
        if after > 0:
            self._add_after(key, after)
        else:
            self._add(key)
            self._pump()

    def resync(self) -> Deferred[None]:
        """
        Enqueue every key ``reconciler.keys()`` lists.  Fails with the
        reconciler's error (or ``TypeError`` if it lists something that is
        not an iterable of strings).
        """
        listed = call(self.reconciler.keys)

        def enqueue_all(keys: Iterable[str]) -> None:
            if isinstance(keys, str) or not isinstance(keys, Iterable):
                raise TypeError(f"{self.name}: keys() must return an iterable of str")
            for key in list(keys):
                if isinstance(key, str) and key:
                    self._add(key)
                else:
                    self._bad_key(key)
            self._pump()

        return listed.addCallback(enqueue_all)

    def when_idle(self) -> Deferred[None]:
        """
        Fire once no key is queued or running (keys waiting for a delay do
        not count).  Keys queued before start keep it pending until they
        have run.  Cancellable.
        """
        if self._idle():
            return succeed(None)

        def forget(d: Deferred[None]) -> None:
            if d in self._idle_waiters:
                self._idle_waiters.remove(d)

        waiter: Deferred[None] = Deferred(forget)
        self._idle_waiters.append(waiter)
        return waiter

    # -- figures --------------------------------------------------------------

    def stats(self) -> ControllerStats:
        c = self._counts
        return ControllerStats(
            name=self.name,
            queued=len(self._queue),
            waiting=len(self._waiting),
            in_flight=len(self._processing),
            reconciles=c["reconciles"],
            succeeded=c["succeeded"],
            failed=c["failed"],
            retries=c["retries"],
            requeues=c["requeues"],
            terminal=c["terminal"],
            backing_off=len(self._failures),
            errors_by_key=tuple(self._errors.items()),
        )

    def failures(self, key: str) -> int:
        """How many consecutive times ``key`` has failed (0 after a success)."""
        return self._failures.get(key, 0)

    def in_flight(self) -> Sequence[str]:
        """The keys being reconciled, sorted."""
        return sorted(self._processing)

    # -- IService -------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        self.running = True
        for key, (due, _) in list(self._waiting.items()):
            self._schedule(key, due)
        loop = LoopingCall(self._periodic_resync)
        loop.clock = self.clock
        self._resync_loop = loop
        if self.resync_interval is None:
            self._periodic_resync()
        else:
            loop.start(self.resync_interval, now=True)
        self._pump()

    def stopService(self) -> Deferred[None]:
        self.running = False
        if self._resync_loop is not None:
            if self._resync_loop.running:
                self._resync_loop.stop()
            self._resync_loop = None
        if self._kick is not None:
            if self._kick.active():
                self._kick.cancel()
            self._kick = None
        if self._resync_retry is not None:
            if self._resync_retry.active():
                self._resync_retry.cancel()
            self._resync_retry = None
        for key, (due, timer) in list(self._waiting.items()):
            if timer is not None and timer.active():
                timer.cancel()
            self._waiting[key] = (due, None)
        if not self._processing:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drain_waiters.append(drained)
        return drained

    # -- the queue --------------------------------------------------------------

    def _add(self, key: str) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)

    def _add_after(self, key: str, after: float) -> None:
        due = self.clock.seconds() + after
        pending = self._waiting.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            if pending[1] is not None and pending[1].active():
                pending[1].cancel()
        self._waiting[key] = (due, None)
        if self.running:
            self._schedule(key, due)

    def _schedule(self, key: str, due: float) -> None:
        delay = max(0.0, due - self.clock.seconds())
        timer = self.clock.callLater(delay, self._delay_over, key)
        self._waiting[key] = (due, timer)

    def _delay_over(self, key: str) -> None:
        self._waiting.pop(key, None)
        self._add(key)
        self._pump()

    def _bad_key(self, key: object) -> None:
        self.log.warn(
            "{controller}: keys() listed a bad key {key!r}", controller=self.name, key=key
        )

    def _idle(self) -> bool:
        return not self._queue and not self._processing

    def _pump(self) -> None:
        # A loop rather than recursion: a reconcile that finishes
        # synchronously re-enters here through _finished.
        # While a continuation is scheduled, the rest waits for it: the
        # budget is per reactor turn, not per call.
        if self._pumping or self._kick is not None:
            return
        self._pumping = True
        started = 0
        try:
            while self.running and self._queue and len(self._processing) < self.concurrency:
                if started >= self.turn_budget:
                    self._continue_next_turn()
                    break
                started += 1
                key = self._queue.popleft()
                self._processing.add(key)
                self._dirty.discard(key)
                self._counts["reconciles"] += 1
                call(self.reconciler.reconcile, key).addBoth(self._finished, key)
        finally:
            self._pumping = False
        self._notify()

    def _continue_next_turn(self) -> None:
        if self._kick is None:
            self._kick = self.clock.callLater(0, self._kicked)

    def _kicked(self) -> None:
        self._kick = None
        self._pump()

    def _finished(self, outcome: object, key: str) -> None:
        self._processing.discard(key)
        if isinstance(outcome, Failure):
            self._failed(key, outcome.value or Exception(repr(outcome)), outcome)
        else:
            self._succeeded(key, outcome)
        if key in self._dirty:
            self._queue.append(key)
        self._pump()

    def _succeeded(self, key: str, outcome: object) -> None:
        if outcome is not None and (
            isinstance(outcome, bool)
            or not isinstance(outcome, (int, float))
            or not math.isfinite(outcome)
            or outcome < 0
        ):
            error = TypeError(
                f"reconcile({key!r}) returned {outcome!r}; expected None or seconds >= 0"
            )
            self._failed(key, error, None)
            return
        self._failures.pop(key, None)
        self._counts["succeeded"] += 1
        requeue: float | None = None
        if outcome is not None:
            requeue = float(outcome)
            self._counts["requeues"] += 1
            # Through the clock even for 0 s, so that a reconciler that
            # always asks to run again cannot starve the reactor.
            self._add_after(key, requeue)
        self._publish(key, ok=True, error=None, requeue_after=requeue)

    def _failed(self, key: str, error: BaseException, failure: Failure | None) -> None:
        self._counts["failed"] += 1
        self._errors[key] = self._errors.pop(key, 0) + 1
        while len(self._errors) > self.max_error_keys:
            self._errors.popitem(last=False)
        text = f"{type(error).__name__}: {error}"
        if is_terminal(error):
            self._counts["terminal"] += 1
            self._failures.pop(key, None)
            self.log.warn(
                "{controller}: {key} failed terminally, not retrying: {error}",
                controller=self.name,
                key=key,
                error=text,
            )
            self._publish(key, ok=False, error=text, requeue_after=None)
            return
        attempt = self._failures.get(key, 0)
        self._failures[key] = attempt + 1
        delay = self.backoff.delay(attempt, self.rand)
        self._counts["retries"] += 1
        if isinstance(error, PiccolodError) or failure is None:
            self.log.warn(
                "{controller}: {key} failed (attempt {attempt}), retrying in {delay:.3f}s: {error}",
                controller=self.name,
                key=key,
                attempt=attempt + 1,
                delay=delay,
                error=text,
            )
        else:
            self.log.failure(
                "{controller}: {key} failed (attempt {attempt}), retrying in {delay:.3f}s",
                failure=failure,
                controller=self.name,
                key=key,
                attempt=attempt + 1,
                delay=delay,
            )
        self._add_after(key, delay)
        self._publish(key, ok=False, error=text, requeue_after=delay)

    def _publish(self, key: str, ok: bool, error: str | None, requeue_after: float | None) -> None:
        if self.bus is None:
            return
        self.bus.publish(
            ReconcileResult(
                controller=self.name,
                reconcile_key=key,
                ok=ok,
                error=error,
                requeue_after=requeue_after,
            ),
            source=f"controller:{self.name}",
        )

    def _notify(self) -> None:
        if not self._processing:
            drained, self._drain_waiters = self._drain_waiters, []
            for d in drained:
                d.callback(None)
        if self._idle():
            idle, self._idle_waiters = self._idle_waiters, []
            for d in idle:
                d.callback(None)

    def _periodic_resync(self) -> Deferred[None]:
        """
        Resync; a failed one (the store still locked, the runtime still
        starting) is retried with the controller's backoff instead of
        waiting a whole ``resync_interval``.
        """
        if self._resync_retry is not None and self._resync_retry.active():
            self._resync_retry.cancel()
        self._resync_retry = None

        def succeeded(_: object) -> None:
            self._resync_failures = 0

        def failed(failure: Failure) -> None:
            delay = self.backoff.delay(self._resync_failures, self.rand)
            self._resync_failures += 1
            if isinstance(failure.value, PiccolodError):
                self.log.info(
                    "{controller}: resync failed ({error}); again in {delay:.2f} s",
                    controller=self.name,
                    error=failure.value.detail,
                    delay=delay,
                )
            else:
                self.log.failure(
                    "{controller}: resync failed", failure=failure, controller=self.name
                )
            if self.running:
                self._resync_retry = self.clock.callLater(delay, self._periodic_resync)

        return self.resync().addCallbacks(succeeded, failed)
