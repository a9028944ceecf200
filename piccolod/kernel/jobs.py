"""
The job runner: background work with priorities, per-class concurrency
limits, timeouts, retries, cancellation, progress events and a history.

Exports, control-store ``quick_check`` and WAL checkpoints, volume sweeps and
telemetry sampling run as jobs.  A job is a :class:`JobSpec` (its class,
body, priority, timeout, retries, backoff, metadata); :meth:`JobRunner.submit`
returns a :class:`JobHandle`.  ``JobSpec`` and ``JobState`` are part of the
shared vocabulary (:mod:`piccolod.interfaces`) and re-exported here.

Semantics (the tests in ``tests/unit/test_jobs.py`` pin each one):

- **Dispatch.**  Jobs never start inside ``submit``: dispatch runs on a
  later reactor turn (``callLater(0)``), so jobs submitted together are
  ordered by priority, not by submission.  At each dispatch the job with
  the highest ``priority`` whose class has a free slot starts first; equal
  priorities start in submission order.  At most ``max_batch`` jobs start
  per reactor turn, so a deep queue of synchronous bodies cannot starve the
  reactor.
- **Limits.**  A class runs at most ``limits[job_class]`` jobs at once
  (``default_limit`` for classes not listed).  A full class never holds
  back jobs of another class.
- **Bodies.**  ``spec.fn(control)`` may be a plain function, return a
  Deferred, or be ``async def``; it receives a :class:`JobControl` for
  ``report(progress, message)`` and ``cancelled``.
- **Cancellation.**  A queued job (also one waiting for a retry) is
  cancelled at once.  A running job has its Deferred cancelled (an
  ``async def`` body sees ``CancelledError`` at its ``await``) and
  ``control.cancelled`` becomes True; the job ends ``cancelled`` when its
  Deferred fires, whatever it fires with: the request wins the race.
- **Timeouts.**  When ``spec.timeout`` expires the running Deferred is
  cancelled the same way, and the attempt fails with ``CommandTimeout``.
  Timeouts are retryable (``CommandTimeout.retryable`` is True).
- **Retries.**  A failed attempt is retried while ``attempts <= retries``,
  unless the error is a ``PiccolodError`` whose ``retryable`` is False (an
  ``InvalidCommand`` or ``NotFound`` will not get better by waiting).  The
  job waits ``spec.backoff.delay(n, rand)`` in state ``queued`` with
  ``retry_at`` set, holding no slot, then rejoins the queue with the same
  id, priority, metadata *and its original place in line*.
- **Abandonment.**  A running body that does not stop within
  ``cancel_grace`` seconds of being cancelled (by ``cancel()``, a timeout
  or ``stopService``) is abandoned: its slot is freed, the job ends
  (``cancelled``, or ``failed`` with ``CommandTimeout`` and no retry, since
  a retry would run beside the old body) and whatever the body returns
  later is ignored.  This bounds ``stopService``.
- **Events.**  Every state change and every ``report()`` publishes
  :class:`~piccolod.events.JobProgress` (``jobs.progress``; keyed by job id,
  so a ``coalesce`` subscriber keeps the latest per job); reaching a final
  state also publishes :class:`~piccolod.events.JobFinished`
  (``jobs.finished``).  A ``correlation_id`` metadata entry becomes the
  events' correlation id.
- **History.**  The last ``history`` finished jobs are kept (oldest
  evicted) for :meth:`JobRunner.get` and :meth:`JobRunner.jobs`.
- **Lifecycle.**  Jobs submitted before ``startService`` wait for it.
  ``stopService`` stops periodic jobs, cancels queued and running jobs,
  and fires once every running body has stopped or been abandoned; it
  leaves no delayed call behind.  ``submit`` raises ``NotReady`` after
  ``stopService`` until the next ``startService``.

Each job's state is a :class:`piccolod.kernel.fsm.Machine` over the table
:data:`TRANSITIONS`; an impossible transition raises ``IllegalTransition``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs
from twisted.application.service import IService, Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.errors import (
    CommandTimeout,
    ConfigError,
    InvalidCommand,
    NotFound,
    NotReady,
    PiccolodError,
)
from piccolod.events import Event, JobFinished, JobProgress
from piccolod.interfaces import (
    IEventBus,
    IJobControl,
    IJobHandle,
    IJobRunner,
    JobSpec,
    JobState,
)
from piccolod.kernel.aio import call, provides
from piccolod.kernel.fsm import Machine

#: The job state machine: (state, trigger) -> next state.
TRANSITIONS: Mapping[tuple[JobState, str], JobState] = MappingProxyType(
    {
        (JobState.QUEUED, "start"): JobState.RUNNING,
        (JobState.QUEUED, "cancel"): JobState.CANCELLED,
        (JobState.RUNNING, "succeed"): JobState.SUCCEEDED,
        (JobState.RUNNING, "fail"): JobState.FAILED,
        (JobState.RUNNING, "cancel"): JobState.CANCELLED,
        (JobState.RUNNING, "retry"): JobState.QUEUED,
    }
)

# Why a running attempt was asked to stop.
_CANCEL = "cancel"
_STOP = "stop"
_TIMEOUT = "timeout"


def _freeze_limits(value: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(value))


def _no_body(control: IJobControl) -> None:
    return None


@implementer(IJobControl)
@attrs.define(eq=False)
class JobControl:
    """
    What a job body receives, one per attempt (see ``IJobControl``).

    @ivar cancelled: True once this attempt was cancelled or timed out; a
        body doing synchronous chunks of work checks it between chunks.
    """

    _job: JobHandle = attrs.field(repr=False)
    attempt: int
    cancelled: bool = False
    _active: bool = attrs.field(default=True, repr=False)

    @property
    def job_id(self) -> str:
        return self._job.id

    @property
    def metadata(self) -> Mapping[str, str]:
        return self._job.metadata

    def report(self, progress: float, message: str = "") -> None:
        """
        Record progress (clamped to 0..1; NaN keeps the previous value) and
        publish it.  Ignored once this attempt has ended or been cancelled.
        """
        if not self._active or self.cancelled:
            return
        self._job._reported(progress, message)

    def raise_if_cancelled(self) -> None:
        """Raise ``CancelledError`` if this attempt was cancelled."""
        if self.cancelled:
            raise CancelledError(f"job {self.job_id} attempt {self.attempt} cancelled")


@attrs.define(eq=False)
class _Attempt:
    control: JobControl
    deferred: Deferred[Any] | None = None
    timeout_call: IDelayedCall | None = None
    grace_call: IDelayedCall | None = None
    reason: str | None = None  # _CANCEL, _STOP or _TIMEOUT once asked to stop
    done: bool = False


@implementer(IJobHandle)
@attrs.define(eq=False)
class JobHandle:
    """
    One submitted job.  Its fields change only through its runner; read
    them, or wait with :meth:`result`.
    """

    id: str
    spec: JobSpec = attrs.field(repr=False)
    _runner: JobRunner = attrs.field(repr=False)
    _seq: int = attrs.field(repr=False)
    submitted_at: float
    _machine: Machine[JobState] = attrs.field(repr=False)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    _progress: float = 0.0
    _message: str = ""
    _attempts: int = 0
    _retry_at: float | None = None
    _retry_call: IDelayedCall | None = attrs.field(default=None, repr=False)
    _attempt: _Attempt | None = attrs.field(default=None, repr=False)
    _in_ready: bool = attrs.field(default=False, repr=False)
    _outcome: tuple[bool, Any] | None = attrs.field(default=None, repr=False)
    _waiters: list[Deferred[Any]] = attrs.field(factory=list, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name or self.spec.job_class

    @property
    def job_class(self) -> str:
        return self.spec.job_class

    @property
    def priority(self) -> int:
        return self.spec.priority

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.spec.metadata

    @property
    def state(self) -> JobState:
        return self._machine.state

    @property
    def progress(self) -> float:
        return self._progress

    @property
    def message(self) -> str:
        return self._message

    @property
    def attempts(self) -> int:
        return self._attempts

    @property
    def retry_at(self) -> float | None:
        return self._retry_at

    @property
    def duration(self) -> float | None:
        """Seconds from the first start to the end (or now), if it started."""
        if self.started_at is None:
            return None
        end = self.finished_at
        if end is None:
            end = self._runner.clock.seconds()
        return end - self.started_at

    def result(self) -> Deferred[Any]:
        """
        A new Deferred firing with the job's value, or failing with
        ``CancelledError``, ``CommandTimeout`` or the body's error.
        Cancelling it only stops this wait.
        """
        if self._outcome is not None:
            ok, value = self._outcome
            return succeed(value) if ok else fail(value)
        d: Deferred[Any] = Deferred(self._forget)
        self._waiters.append(d)
        return d

    def _forget(self, d: Deferred[Any]) -> None:
        if d in self._waiters:
            self._waiters.remove(d)

    def cancel(self) -> Deferred[JobState]:
        """Cancel the job; fires with its final state once it has ended."""
        d = self.result()
        self._runner._cancel(self, _CANCEL)
        return d.addBoth(lambda _: self._machine.state)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "job_class": self.job_class,
            "state": self._machine.state.value,
            "priority": self.priority,
            "progress": self._progress,
            "message": self._message,
            "attempts": self._attempts,
            "retries": self.spec.retries,
            "timeout": self.spec.timeout,
            "metadata": dict(self.metadata),
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "retry_at": self._retry_at,
            "duration": self.duration,
            "error": self.error,
        }

    def _reported(self, progress: float, message: str) -> None:
        if not math.isnan(progress):
            self._progress = min(1.0, max(0.0, float(progress)))
        self._message = str(message)
        self._runner._publish_progress(self)


@attrs.define
class _ClassStats:
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    retries: int = 0
    timeouts: int = 0
    abandoned: int = 0
    duration_sum: float = 0.0
    duration_count: int = 0


def _failure(error: BaseException) -> Failure:
    return Failure(error)  # type: ignore[no-untyped-call]


def _clean(failure: Failure) -> None:
    """Drop the frames a remembered failure would keep alive."""
    failure.cleanFailure()  # type: ignore[no-untyped-call]


def _describe(failure: Failure) -> str:
    kind = failure.type.__name__ if isinstance(failure.type, type) else "Error"
    return f"{kind}: {failure.getErrorMessage()}"


def _retryable(failure: Failure) -> bool:
    err = failure.value
    if isinstance(err, PiccolodError):
        return type(err).retryable
    return True


@implementer(IJobRunner, IService)
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)  # validated once, at construction
class JobRunner(Service):
    """
    Runs :class:`JobSpec` jobs (see the module docstring for semantics).

    @ivar limits: concurrent jobs per class; classes not listed get
        ``default_limit``.
    @ivar history: how many finished jobs are remembered.
    @ivar rand: the jitter source for retry backoff (``random.random``).
    @ivar cancel_grace: seconds a cancelled running body gets to stop
        before it is abandoned.
    @ivar max_batch: jobs started per reactor turn at most.
    """

    log = Logger()

    clock: IReactorTime = attrs.field(validator=provides(IReactorTime))
    bus: IEventBus | None = attrs.field(
        default=None, validator=attrs.validators.optional(provides(IEventBus))
    )
    limits: Mapping[str, int] = attrs.field(kw_only=True, factory=dict, converter=_freeze_limits)
    default_limit: int = attrs.field(kw_only=True, default=1)
    history: int = attrs.field(kw_only=True, default=200)
    rand: Callable[[], float] = attrs.field(kw_only=True, default=random.random)
    cancel_grace: float = attrs.field(kw_only=True, default=10.0)
    max_batch: int = attrs.field(kw_only=True, default=256)

    _jobs: dict[str, JobHandle] = attrs.field(init=False, factory=dict)
    _running: dict[str, JobHandle] = attrs.field(init=False, factory=dict)
    _running_by_class: dict[str, int] = attrs.field(init=False, factory=dict)
    _ready: dict[str, list[tuple[int, int, JobHandle]]] = attrs.field(init=False, factory=dict)
    _ready_count: dict[str, int] = attrs.field(init=False, factory=dict)
    _finished: OrderedDict[str, JobHandle] = attrs.field(init=False, factory=OrderedDict)
    _class_stats: dict[str, _ClassStats] = attrs.field(init=False, factory=dict)
    _periodics: list[PeriodicJob] = attrs.field(init=False, factory=list)
    _idle_waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _seq: Callable[[], int] = attrs.field(init=False, factory=lambda: itertools.count().__next__)
    _dispatch_call: IDelayedCall | None = attrs.field(init=False, default=None)
    _dispatching: bool = attrs.field(init=False, default=False)
    _stopped: bool = attrs.field(init=False, default=False)
    _submitted: int = attrs.field(init=False, default=0)
    _ready_total: int = attrs.field(init=False, default=0)
    #: Job ids are ``<random prefix>-<counter>``: unique within this runner,
    #: and unlike an earlier process's ids.
    _id_prefix: str = attrs.field(init=False, factory=lambda: os.urandom(4).hex())

    def __attrs_post_init__(self) -> None:
        errors: list[str] = []

        def positive_int(label: str, value: object, minimum: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                errors.append(f"{label} must be an int >= {minimum}, got {value!r}")

        positive_int("default_limit", self.default_limit, 1)
        positive_int("history", self.history, 0)
        positive_int("max_batch", self.max_batch, 1)
        for job_class, limit in self.limits.items():
            try:
                JobSpec(job_class, _no_body)  # the one rule for class names
            except InvalidCommand:
                errors.append(f"limits: bad job class {job_class!r}")
            positive_int(f"limits[{job_class!r}]", limit, 1)
        if (
            isinstance(self.cancel_grace, bool)
            or not isinstance(self.cancel_grace, (int, float))
            or not math.isfinite(self.cancel_grace)
            or self.cancel_grace < 0
        ):
            errors.append(f"cancel_grace must be a number >= 0, got {self.cancel_grace!r}")
        if not callable(self.rand):
            errors.append("rand must be callable")
        if errors:
            raise ConfigError(errors)

    # ------------------------------------------------------------------
    # IService

    def startService(self) -> None:
        if self.running:
            return
        self.running = 1
        self._stopped = False
        for periodic in list(self._periodics):
            periodic._resume()
        self._kick()

    def stopService(self) -> Deferred[None]:
        """
        Stop periodic jobs, cancel queued and running jobs; fires once every
        running body has stopped or been abandoned (after ``cancel_grace``).
        """
        self.running = 0
        self._stopped = True
        for periodic in list(self._periodics):
            periodic._pause()
        if self._dispatch_call is not None:
            self._dispatch_call.cancel()
            self._dispatch_call = None
        for job in [j for j in self._jobs.values() if j.state is JobState.QUEUED]:
            self._cancel(job, _STOP)
        for job in list(self._running.values()):
            self._cancel(job, _STOP)
        if not self._running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    # ------------------------------------------------------------------
    # IJobRunner

    def submit(self, spec: JobSpec) -> JobHandle:
        """Queue a job; raises ``NotReady`` after ``stopService``."""
        if not isinstance(spec, JobSpec):
            raise InvalidCommand(f"not a JobSpec: {spec!r}")
        if self._stopped:
            raise NotReady("the job runner is stopped")
        seq = self._seq()
        job_id = f"{self._id_prefix}-{seq:x}"
        job = JobHandle(
            id=job_id,
            spec=spec,
            runner=self,
            seq=seq,
            submitted_at=self.clock.seconds(),
            # No bus: JobProgress (published on every transition) is the
            # jobs' transition event; a StateTransition per job would double
            # the traffic of fsm.transition with short-lived machines.
            machine=Machine(
                f"job:{job_id}",
                JobState.QUEUED,
                TRANSITIONS,  # type: ignore[arg-type]  # attrs' converter typing
                history_size=0,
            ),
        )
        self._jobs[job_id] = job
        self._submitted += 1
        self._stats_for(spec.job_class).submitted += 1
        self._push(job)
        self._publish_progress(job)
        self._kick()
        return job

    def every(
        self,
        interval: float,
        spec_factory: Callable[[], JobSpec | None],
        now: bool = False,
    ) -> PeriodicJob:
        """
        Submit ``spec_factory()`` every ``interval`` seconds while the runner
        runs, skipping a tick while the previous job has not ended.
        """
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not math.isfinite(interval)
            or interval <= 0
        ):
            raise InvalidCommand(f"interval must be a positive number, got {interval!r}")
        if not callable(spec_factory):
            raise InvalidCommand(f"spec_factory {spec_factory!r} is not callable")
        periodic = PeriodicJob(
            runner=self, interval=float(interval), spec_factory=spec_factory, now=now
        )
        periodic.startService()
        return periodic

    def get(self, job_id: str) -> JobHandle:
        """A queued, running or remembered job; raises ``NotFound``."""
        job = self._jobs.get(job_id) or self._finished.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", job_id=job_id)
        return job

    def jobs(self, state: JobState | str | None = None) -> Sequence[JobHandle]:
        """Running (by start), queued (dispatch order), finished (newest first)."""
        if state is not None and not isinstance(state, JobState):
            try:
                state = JobState(state)
            except ValueError:
                raise InvalidCommand(
                    f"unknown job state {state!r}",
                    errors=[f"state must be one of {[s.value for s in JobState]}"],
                ) from None
        running = list(self._running.values())
        queued = sorted(
            (j for j in self._jobs.values() if j.state is JobState.QUEUED),
            key=lambda j: (-j.priority, j._seq),
        )
        finished = list(reversed(self._finished.values()))
        every = running + queued + finished
        if state is None:
            return every
        return [j for j in every if j.state is state]

    def cancel(self, job_id: str) -> Deferred[JobState]:
        """Cancel a job by id; raises ``NotFound``."""
        return self.get(job_id).cancel()

    def stats(self) -> Mapping[str, Any]:
        """Queue depths, and per class: limit, counts and durations."""
        classes: dict[str, dict[str, Any]] = {}
        names = set(self._class_stats) | set(self.limits)
        ready = waiting = 0
        per_class_queued: dict[str, tuple[int, int]] = {}
        for job in self._jobs.values():
            if job.state is JobState.QUEUED:
                r, w = per_class_queued.get(job.job_class, (0, 0))
                if job._retry_call is not None:
                    w += 1
                    waiting += 1
                else:
                    r += 1
                    ready += 1
                per_class_queued[job.job_class] = (r, w)
        for name in sorted(names):
            cs = self._class_stats.get(name, _ClassStats())
            r, w = per_class_queued.get(name, (0, 0))
            classes[name] = {
                "limit": self.limit(name),
                "running": self._running_by_class.get(name, 0),
                "queued": r + w,
                "waiting_retry": w,
                **attrs.asdict(cs),
            }
        return {
            "running": len(self._running),
            "queued": ready + waiting,
            "waiting_retry": waiting,
            "submitted": self._submitted,
            "history": len(self._finished),
            "classes": classes,
        }

    def limit(self, job_class: str) -> int:
        """The concurrency limit of ``job_class``."""
        return self.limits.get(job_class, self.default_limit)

    # ------------------------------------------------------------------
    # Queue and dispatch

    def _push(self, job: JobHandle) -> None:
        cls = job.job_class
        heap = self._ready.setdefault(cls, [])
        heapq.heappush(heap, (-job.priority, job._seq, job))
        job._in_ready = True
        count = self._ready_count.get(cls, 0) + 1
        self._ready_count[cls] = count
        self._ready_total += 1
        if len(heap) > 64 and len(heap) > 2 * count:
            # Cancelled entries are skipped lazily; compact when they pile up.
            heap[:] = [entry for entry in heap if entry[2]._in_ready]
            heapq.heapify(heap)

    def _unready(self, job: JobHandle) -> None:
        if job._in_ready:
            job._in_ready = False
            self._ready_count[job.job_class] -= 1
            self._ready_total -= 1

    def _kick(self) -> None:
        if (
            self._ready_total
            and self.running
            and not self._dispatching
            and self._dispatch_call is None
        ):
            self._dispatch_call = self.clock.callLater(0, self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_call = None
        self._dispatching = True
        started = 0
        try:
            while self.running and started < self.max_batch:
                job = self._next_ready()
                if job is None:
                    break
                self._start(job)
                started += 1
        finally:
            self._dispatching = False
        if started >= self.max_batch:
            self._kick()

    def _next_ready(self) -> JobHandle | None:
        best: tuple[int, int] | None = None
        best_class = ""
        for cls, heap in self._ready.items():
            if not self._ready_count.get(cls):
                continue
            if self._running_by_class.get(cls, 0) >= self.limit(cls):
                continue
            while heap and not heap[0][2]._in_ready:
                heapq.heappop(heap)
            if not heap:  # pragma: no cover - the count says otherwise
                continue
            key = (heap[0][0], heap[0][1])
            if best is None or key < best:
                best, best_class = key, cls
        if best is None:
            return None
        job = heapq.heappop(self._ready[best_class])[2]
        self._unready(job)
        return job

    # ------------------------------------------------------------------
    # Running

    def _start(self, job: JobHandle) -> None:
        job._attempts += 1
        attempt = _Attempt(control=JobControl(job=job, attempt=job._attempts))
        job._attempt = attempt
        job._progress = 0.0
        job._message = ""
        now = self.clock.seconds()
        if job.started_at is None:
            job.started_at = now
        self._transition(job, "start")
        self._running[job.id] = job
        cls = job.job_class
        self._running_by_class[cls] = self._running_by_class.get(cls, 0) + 1
        self._publish_progress(job)
        if job.spec.timeout is not None:
            attempt.timeout_call = self.clock.callLater(
                job.spec.timeout, self._expire, job, attempt
            )
        d = call(job.spec.fn, attempt.control)
        attempt.deferred = d
        if attempt.reason is not None:
            d.cancel()  # the body asked for its own cancellation before returning
        d.addBoth(self._attempt_done, job, attempt)

    def _attempt_done(self, result: object, job: JobHandle, attempt: _Attempt) -> None:
        if attempt.done:
            # Abandoned earlier; whatever it says now is too late.
            self.log.info(
                "abandoned job {job_id} ({job_class}) finally stopped",
                job_id=job.id,
                job_class=job.job_class,
            )
            return None
        self._end_attempt(job, attempt)
        if attempt.reason in (_CANCEL, _STOP):
            self._finish(job, JobState.CANCELLED, _failure(self._cancelled_error(job, attempt)))
        elif attempt.reason == _TIMEOUT:
            self._failed(job, _failure(self._timeout_error(job)), timed_out=True)
        elif isinstance(result, Failure):
            self._failed(job, result)
        else:
            self._finish(job, JobState.SUCCEEDED, result)
        self._after_release()
        return None

    def _end_attempt(self, job: JobHandle, attempt: _Attempt) -> None:
        attempt.done = True
        attempt.control._active = False
        for delayed in (attempt.timeout_call, attempt.grace_call):
            if delayed is not None and delayed.active():
                delayed.cancel()
        attempt.timeout_call = attempt.grace_call = None
        del self._running[job.id]
        self._running_by_class[job.job_class] -= 1

    def _after_release(self) -> None:
        self._kick()
        if not self._running and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def _expire(self, job: JobHandle, attempt: _Attempt) -> None:
        attempt.timeout_call = None
        if attempt.done or attempt.reason is not None:
            return
        self.log.info(
            "job {job_id} ({job_class}) attempt {attempt} timed out after {timeout}s",
            job_id=job.id,
            job_class=job.job_class,
            attempt=attempt.control.attempt,
            timeout=job.spec.timeout,
        )
        self._stop_attempt(job, attempt, _TIMEOUT)

    def _stop_attempt(self, job: JobHandle, attempt: _Attempt, reason: str) -> None:
        if attempt.done:
            return
        if attempt.reason is None or reason != _TIMEOUT:
            # An explicit cancel (or stop) overrides a timeout: no retry.
            attempt.reason = reason
        attempt.control.cancelled = True
        if attempt.timeout_call is not None and attempt.timeout_call.active():
            attempt.timeout_call.cancel()
        attempt.timeout_call = None
        if attempt.grace_call is None:
            attempt.grace_call = self.clock.callLater(
                self.cancel_grace, self._abandon, job, attempt
            )
        if attempt.deferred is not None:
            attempt.deferred.cancel()

    def _abandon(self, job: JobHandle, attempt: _Attempt) -> None:
        attempt.grace_call = None
        if attempt.done:
            return
        self.log.warn(
            "job {job_id} ({job_class}) did not stop within {grace}s of being "
            "cancelled; abandoning it",
            job_id=job.id,
            job_class=job.job_class,
            grace=self.cancel_grace,
        )
        self._end_attempt(job, attempt)
        self._stats_for(job.job_class).abandoned += 1
        if attempt.reason == _TIMEOUT:
            self._stats_for(job.job_class).timeouts += 1
            self._finish(job, JobState.FAILED, _failure(self._timeout_error(job)))
        else:
            self._finish(job, JobState.CANCELLED, _failure(self._cancelled_error(job, attempt)))
        self._after_release()

    def _failed(self, job: JobHandle, failure: Failure, timed_out: bool = False) -> None:
        stats = self._stats_for(job.job_class)
        if timed_out:
            stats.timeouts += 1
        if not (job._attempts <= job.spec.retries and self.running and _retryable(failure)):
            self._finish(job, JobState.FAILED, failure)
            return
        delay = job.spec.backoff.delay(job._attempts - 1, self.rand)
        error = _describe(failure)
        self._transition(job, "retry")
        stats.retries += 1
        job.error = error
        job._retry_at = self.clock.seconds() + delay
        job._retry_call = self.clock.callLater(delay, self._requeue, job)
        job._message = f"attempt {job._attempts} failed ({error}); retrying in {delay:.3g}s"
        self.log.info(
            "job {job_id} ({job_class}) attempt {attempt} failed: {error}; "
            "retrying in {delay:.3f}s",
            job_id=job.id,
            job_class=job.job_class,
            attempt=job._attempts,
            error=error,
            delay=delay,
        )
        self._publish_progress(job)

    def _requeue(self, job: JobHandle) -> None:
        job._retry_call = None
        job._retry_at = None
        self._push(job)
        self._kick()

    def _cancel(self, job: JobHandle, reason: str) -> None:
        if job.state is JobState.QUEUED:
            if job._retry_call is not None:
                if job._retry_call.active():
                    job._retry_call.cancel()
                job._retry_call = None
                job._retry_at = None
            self._unready(job)
            self._finish(
                job, JobState.CANCELLED, _failure(self._cancelled_error(job, None, reason))
            )
        elif job.state is JobState.RUNNING and job._attempt is not None:
            self._stop_attempt(job, job._attempt, reason)

    def _finish(self, job: JobHandle, state: JobState, outcome: object) -> None:
        trigger = {
            JobState.SUCCEEDED: "succeed",
            JobState.FAILED: "fail",
            JobState.CANCELLED: "cancel",
        }[state]
        self._transition(job, trigger)
        now = self.clock.seconds()
        job.finished_at = now
        if isinstance(outcome, Failure):
            _clean(outcome)
            job.error = _describe(outcome)
            job._outcome = (False, outcome)
        else:
            job.error = None
            job._outcome = (True, outcome)
            job._progress = 1.0
        job._attempt = None
        del self._jobs[job.id]
        if self.history:
            self._finished[job.id] = job
            while len(self._finished) > self.history:
                self._finished.popitem(last=False)
        stats = self._stats_for(job.job_class)
        setattr(stats, state.value, getattr(stats, state.value) + 1)
        duration = 0.0
        if job.started_at is not None:
            duration = now - job.started_at
            stats.duration_sum += duration
            stats.duration_count += 1
        # Success is not logged (JobFinished and the stats say it): periodic
        # jobs would flood the log, and an emit costs as much as a small job.
        if state is not JobState.SUCCEEDED:
            emit = self.log.warn if state is JobState.FAILED else self.log.info
            emit(
                "job {job_id} ({job_class}) {state} after {attempts} attempt(s): {error}",
                job_id=job.id,
                job_class=job.job_class,
                state=state.value,
                attempts=job._attempts,
                error=job.error,
            )
        self._publish_progress(job)
        if self.bus is not None:
            self._publish(
                job,
                JobFinished(
                    job_id=job.id,
                    job_class=job.job_class,
                    state=state.value,
                    attempts=job._attempts,
                    error=job.error,
                    duration=duration,
                ),
            )
        waiters, job._waiters = job._waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    # ------------------------------------------------------------------
    # Helpers

    def _transition(self, job: JobHandle, trigger: str) -> None:
        job._machine.fire(trigger)

    def _stats_for(self, job_class: str) -> _ClassStats:
        stats = self._class_stats.get(job_class)
        if stats is None:
            stats = self._class_stats[job_class] = _ClassStats()
        return stats

    def _cancelled_error(
        self, job: JobHandle, attempt: _Attempt | None, reason: str | None = None
    ) -> CancelledError:
        reason = reason or (attempt.reason if attempt is not None else None) or _CANCEL
        why = "the job runner stopped" if reason == _STOP else "cancelled"
        return CancelledError(f"job {job.id} ({job.job_class}): {why}")

    def _timeout_error(self, job: JobHandle) -> CommandTimeout:
        return CommandTimeout(
            f"job {job.id} ({job.job_class}) attempt {job._attempts} exceeded its "
            f"{job.spec.timeout}s timeout",
            job_id=job.id,
            job_class=job.job_class,
        )

    def _publish_progress(self, job: JobHandle) -> None:
        if self.bus is None:
            return
        self._publish(
            job,
            JobProgress(
                job_id=job.id,
                job_class=job.job_class,
                state=job._machine.state.value,
                progress=job._progress,
                message=job._message,
            ),
        )

    def _publish(self, job: JobHandle, event: Event) -> None:
        if self.bus is None:
            return
        try:
            self.bus.publish(
                event, source="jobs", correlation_id=job.metadata.get("correlation_id")
            )
        except Exception:
            self.log.failure(
                "publishing {topic} for job {job_id}", topic=event.topic, job_id=job.id
            )


@implementer(IService)
@attrs.define(eq=False)
class PeriodicJob(Service):
    """
    Submits ``spec_factory()`` to ``runner`` every ``interval`` seconds
    while both it and the runner run; made by :meth:`JobRunner.every`.
    A tick is skipped while the previous job is queued or running (or the
    factory returns ``None``).  ``stopService`` ends it; ``startService``
    resumes it.

    @ivar last: the most recently submitted job.
    """

    log = Logger()

    runner: JobRunner
    interval: float
    spec_factory: Callable[[], JobSpec | None]
    now: bool = False
    last: JobHandle | None = attrs.field(init=False, default=None)
    submitted: int = attrs.field(init=False, default=0)
    skipped: int = attrs.field(init=False, default=0)
    errors: int = attrs.field(init=False, default=0)
    _loop: LoopingCall | None = attrs.field(init=False, default=None)

    def startService(self) -> None:
        if self.running:
            return
        self.running = 1
        self.runner._periodics.append(self)
        if self.runner.running:
            self._resume()

    def stopService(self) -> None:
        if not self.running:
            return
        self.running = 0
        self._pause()
        self.runner._periodics.remove(self)

    def _resume(self) -> None:
        if self._loop is not None or not self.running:
            return
        loop = LoopingCall(self._tick)
        loop.clock = self.runner.clock
        self._loop = loop
        loop.start(self.interval, now=self.now)

    def _pause(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def _tick(self) -> None:
        if self.last is not None and not self.last.state.final:
            self.skipped += 1
            self.log.debug(
                "skipping periodic {job_class} job: {job_id} has not finished",
                job_class=self.last.job_class,
                job_id=self.last.id,
            )
            return
        try:
            spec = self.spec_factory()
            if spec is None:
                return
            self.last = self.runner.submit(spec)
        except NotReady:
            return
        except Exception:
            self.errors += 1
            self.log.failure("periodic job factory {factory!r} failed", factory=self.spec_factory)
            return
        self.submitted += 1


__all__ = [
    "TRANSITIONS",
    "JobControl",
    "JobHandle",
    "JobRunner",
    "JobSpec",
    "JobState",
    "PeriodicJob",
]
