# mypy: disable-error-code="no-untyped-call"
# (trial's assertion methods are unannotated)
"""
Tests for :mod:`piccolod.kernel.jobs`: the JobRunner on a ``task.Clock``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import IService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.errors import (
    CommandTimeout,
    ConfigError,
    IllegalTransition,
    InvalidCommand,
    NotFound,
    NotReady,
)
from piccolod.events import Event, JobFinished, JobProgress
from piccolod.interfaces import Backoff, IJobControl, IJobHandle, IJobRunner, JobState
from piccolod.kernel.jobs import TRANSITIONS, JobRunner, JobSpec, PeriodicJob
from piccolod.testing.bus import FakeEventBus


@attrs.define(eq=False)
class Body:
    """
    A controllable job body: every call records its ``IJobControl`` (and its
    name in the shared ``started`` list) and returns a pending Deferred that
    the test fires; cancelling that Deferred is recorded.
    """

    name: str = "body"
    started: list[str] = attrs.field(factory=list)
    calls: list[IJobControl] = attrs.field(factory=list)
    deferreds: list[Deferred[Any]] = attrs.field(factory=list)
    cancelled: list[int] = attrs.field(factory=list)

    def __call__(self, control: IJobControl) -> Deferred[Any]:
        self.calls.append(control)
        self.started.append(self.name)
        d: Deferred[Any] = Deferred(lambda _d: self.cancelled.append(control.attempt))
        self.deferreds.append(d)
        return d

    @property
    def control(self) -> IJobControl:
        return self.calls[-1]

    def succeed(self, value: object = None) -> None:
        self.deferreds[-1].callback(value)

    def fail(self, error: BaseException) -> None:
        self.deferreds[-1].errback(error)


def ok(value: object = None) -> Callable[[IJobControl], object]:
    """A synchronous body returning ``value``."""
    return lambda control: value


class RunnerMixin:
    """Builds a started runner on a Clock with a recording bus."""

    clock: Clock
    bus: FakeEventBus

    def make_runner(self, start: bool = True, **kwargs: Any) -> JobRunner:
        case: SynchronousTestCase = self  # type: ignore[assignment]
        self.clock = Clock()
        self.bus = FakeEventBus(self.clock)
        runner = JobRunner(self.clock, self.bus, **kwargs)
        if start:
            runner.startService()

        def stop() -> None:
            d = runner.stopService()
            self.clock.advance(runner.cancel_grace)
            case.successResultOf(d)
            self.bus.flush()
            case.assertEqual(self.clock.getDelayedCalls(), [])

        case.addCleanup(stop)
        return runner


class SpecTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """A spec needs only a class and a body; the rest has safe defaults."""
        spec = JobSpec("export", ok())
        self.assertEqual(
            (spec.priority, spec.timeout, spec.retries, spec.backoff, dict(spec.metadata)),
            (0, None, 0, Backoff(), {}),
        )

    def test_metadata_is_frozen(self) -> None:
        """The spec copies its metadata into a read-only mapping."""
        labels = {"volume": "v1"}
        spec = JobSpec("export", ok(), metadata=labels)
        labels["volume"] = "v2"
        self.assertEqual(spec.metadata["volume"], "v1")
        with self.assertRaises(TypeError):
            spec.metadata["volume"] = "v3"  # type: ignore[index]

    def test_bad_specs(self) -> None:
        """Every malformed field is reported in one InvalidCommand."""
        bad: list[dict[str, Any]] = [
            {"job_class": ""},
            {"job_class": "Export Now"},
            {"job_class": 3},
            {"fn": "not callable"},
            {"priority": 1.5},
            {"priority": True},
            {"timeout": 0},
            {"timeout": -1.0},
            {"timeout": math.inf},
            {"timeout": math.nan},
            {"retries": -1},
            {"retries": 1.0},
            {"backoff": 2.0},
            {"metadata": {"a": 1}},
            {"metadata": [("a", "b")]},
            {"name": None},
        ]
        for override in bad:
            fields: dict[str, Any] = {"job_class": "export", "fn": ok(), **override}
            with self.subTest(override=override):
                err = self.assertRaises(InvalidCommand, JobSpec, **fields)
                self.assertEqual(len(err.errors), 1, err.errors)

    def test_all_errors_at_once(self) -> None:
        """Several bad fields are all listed, not only the first."""
        err = self.assertRaises(InvalidCommand, JobSpec, "", None, retries=-2)  # type: ignore[arg-type]
        self.assertEqual(len(err.errors), 3)


class ConfigTests(SynchronousTestCase):
    def test_bad_runner_config(self) -> None:
        """Bad limits, history, grace and batch size are all reported in one ConfigError."""
        err = self.assertRaises(
            ConfigError,
            JobRunner,
            Clock(),
            limits={"export": 0, "Bad Class": 1},
            default_limit=0,
            history=-1,
            cancel_grace=-1.0,
            max_batch=0,
        )
        self.assertEqual(len(err.errors), 6, err.errors)

    def test_clock_must_provide_ireactortime(self) -> None:
        """The clock is validated at construction."""
        self.assertRaises(TypeError, JobRunner, object())

    def test_interfaces(self) -> None:
        """The runner, handles, controls and periodic jobs provide their interfaces."""
        clock = Clock()
        runner = JobRunner(clock)
        runner.startService()
        body = Body()
        handle = runner.submit(JobSpec("export", body))
        clock.advance(0)
        periodic = runner.every(1.0, lambda: None)
        pairs: list[tuple[Any, Any]] = [
            (IJobRunner, runner),
            (IService, runner),
            (IJobHandle, handle),
            (IJobControl, body.control),
            (IService, periodic),
        ]
        for iface, obj in pairs:
            self.assertTrue(verifyObject(iface, obj))
            for name in iface.names():
                declared = iface[name]
                if not hasattr(declared, "getSignatureInfo"):
                    continue
                params = list(inspect.signature(getattr(obj, name)).parameters)
                with self.subTest(interface=iface.__name__, method=name):
                    self.assertEqual(params, list(declared.getSignatureInfo()["positional"]))
        periodic.stopService()
        runner.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_kernel_reexports_the_vocabulary(self) -> None:
        """piccolod.kernel.jobs re-exports the vocabulary's JobSpec and JobState."""
        from piccolod import interfaces
        from piccolod.kernel import jobs

        self.assertIs(jobs.JobSpec, interfaces.JobSpec)
        self.assertIs(jobs.JobState, interfaces.JobState)


class DispatchTests(RunnerMixin, SynchronousTestCase):
    def test_job_runs_on_a_later_turn(self) -> None:
        """submit() never runs the body; the next reactor turn does."""
        runner = self.make_runner()
        body = Body()
        handle = runner.submit(JobSpec("export", body))
        self.assertEqual((body.calls, handle.state), ([], JobState.QUEUED))
        self.clock.advance(0)
        self.assertEqual(handle.state, JobState.RUNNING)
        self.assertEqual(body.control.job_id, handle.id)
        self.assertEqual(body.control.attempt, 1)
        d = handle.result()
        self.assertNoResult(d)
        body.succeed("done")
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(
            (handle.state, handle.progress, handle.attempts), (JobState.SUCCEEDED, 1.0, 1)
        )

    def test_sync_and_async_bodies(self) -> None:
        """Plain, raising and async def bodies all end in the right state."""
        runner = self.make_runner(default_limit=4)

        async def coro(control: IJobControl) -> str:
            await deferLater(self.clock, 1.0, lambda: None)
            return "slept"

        def boom(control: IJobControl) -> None:
            raise ValueError("bad disk")

        plain = runner.submit(JobSpec("a", ok(42)))
        raising = runner.submit(JobSpec("b", boom))
        asynchronous = runner.submit(JobSpec("c", coro))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(plain.result()), 42)
        failure = self.failureResultOf(raising.result(), ValueError)
        self.assertEqual(str(failure.value), "bad disk")
        self.assertEqual(raising.state, JobState.FAILED)
        self.assertEqual(raising.error, "ValueError: bad disk")
        self.assertEqual(asynchronous.state, JobState.RUNNING)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(asynchronous.result()), "slept")

    def test_priority_order_under_contention(self) -> None:
        """With one slot taken, waiting jobs start highest priority first."""
        runner = self.make_runner()
        started: list[str] = []
        blocker = Body("blocker", started)
        runner.submit(JobSpec("export", blocker))
        self.clock.advance(0)
        bodies = {name: Body(name, started) for name in ("low", "mid", "high")}
        for name, priority in (("low", 0), ("mid", 5), ("high", 10)):
            runner.submit(JobSpec("export", bodies[name], priority=priority))
        self.clock.advance(0)
        self.assertEqual(started, ["blocker"])
        blocker.succeed()
        self.clock.advance(0)
        bodies["high"].succeed()
        self.clock.advance(0)
        bodies["mid"].succeed()
        self.clock.advance(0)
        self.assertEqual(started, ["blocker", "high", "mid", "low"])

    def test_same_turn_submissions_ordered_by_priority(self) -> None:
        """Jobs submitted in one turn with a free slot still start by priority."""
        runner = self.make_runner()
        started: list[str] = []
        low, high = Body("low", started), Body("high", started)
        runner.submit(JobSpec("export", low, priority=1))
        runner.submit(JobSpec("export", high, priority=2))
        self.clock.advance(0)
        self.assertEqual(started, ["high"])

    def test_fifo_within_priority(self) -> None:
        """Equal priorities start in submission order."""
        runner = self.make_runner()
        started: list[str] = []
        bodies = [Body(str(i), started) for i in range(4)]
        for body in bodies:
            runner.submit(JobSpec("export", body, priority=3))
        for body in bodies:
            self.clock.advance(0)
            body.succeed()
        self.assertEqual(started, ["0", "1", "2", "3"])

    def test_per_class_limits(self) -> None:
        """No class runs more than its limit; unlisted classes get the default."""
        runner = self.make_runner(limits={"export": 1, "rebuild": 2}, default_limit=1)
        bodies: dict[str, list[Body]] = {"export": [], "rebuild": [], "telemetry": []}
        for job_class, count in (("export", 3), ("rebuild", 4), ("telemetry", 2)):
            for i in range(count):
                body = Body(f"{job_class}{i}")
                bodies[job_class].append(body)
                runner.submit(JobSpec(job_class, body))
        self.clock.advance(0)

        def running() -> dict[str, int]:
            return {
                cls: sum(1 for b in bs if b.deferreds and not b.deferreds[-1].called)
                for cls, bs in bodies.items()
            }

        self.assertEqual(running(), {"export": 1, "rebuild": 2, "telemetry": 1})
        self.assertEqual(runner.stats()["classes"]["rebuild"]["queued"], 2)
        bodies["rebuild"][0].succeed()
        self.clock.advance(0)
        self.assertEqual(running(), {"export": 1, "rebuild": 2, "telemetry": 1})
        self.assertEqual([len(b.calls) for b in bodies["rebuild"]], [1, 1, 1, 0])
        self.assertEqual([len(b.calls) for b in bodies["export"]], [1, 0, 0])

    def test_full_class_does_not_block_others(self) -> None:
        """A queued high-priority job of a full class lets a lower one of another class run."""
        runner = self.make_runner(limits={"export": 1, "sweep": 1})
        started: list[str] = []
        runner.submit(JobSpec("export", Body("e1", started)))
        runner.submit(JobSpec("export", Body("e2", started), priority=100))
        runner.submit(JobSpec("sweep", Body("s1", started), priority=-5))
        self.clock.advance(0)
        self.assertEqual(sorted(started), ["e2", "s1"])

    def test_submit_before_start_waits(self) -> None:
        """Jobs submitted before startService run once it is called."""
        runner = self.make_runner(start=False)
        body = Body()
        handle = runner.submit(JobSpec("export", body))
        self.clock.advance(1)
        self.assertEqual(body.calls, [])
        runner.startService()
        self.clock.advance(0)
        self.assertEqual(handle.state, JobState.RUNNING)
        body.succeed()

    def test_batch_bound_yields_to_the_reactor(self) -> None:
        """At most max_batch jobs start per reactor turn; the rest follow on later turns."""
        runner = self.make_runner(default_limit=100, max_batch=2)
        handles = [runner.submit(JobSpec("a", ok(i))) for i in range(5)]
        seen: list[int] = []

        def other_work() -> None:
            # Scheduled after the dispatch call: runs between two batches.
            seen.append(sum(h.state is JobState.SUCCEEDED for h in handles))
            if len(seen) < 3:
                self.clock.callLater(0, other_work)

        self.clock.callLater(0, other_work)
        self.clock.advance(0)
        self.assertEqual(seen, [2, 4, 5])

    def test_submit_rejects_non_specs(self) -> None:
        """Anything but a JobSpec is refused with InvalidCommand."""
        runner = self.make_runner()
        self.assertRaises(InvalidCommand, runner.submit, {"job_class": "export"})

    def test_submit_from_a_body(self) -> None:
        """A body may submit another job; it runs on a later turn."""
        runner = self.make_runner(default_limit=2)
        child = Body("child")
        runner.submit(JobSpec("a", lambda control: runner.submit(JobSpec("a", child)).id))
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(len(child.calls), 1)
        child.succeed()

    def test_illegal_transitions_are_refused(self) -> None:
        """Final states have no way out: the job's machine raises IllegalTransition."""
        runner = self.make_runner()
        handle = runner.submit(JobSpec("a", ok()))
        self.clock.advance(0)
        for trigger in ("start", "retry", "cancel", "succeed", "fail"):
            self.assertRaises(IllegalTransition, runner._transition, handle, trigger)
        self.assertEqual(handle.state, JobState.SUCCEEDED)
        self.assertFalse(any(state.final for state, _ in TRANSITIONS))


class CancelTests(RunnerMixin, SynchronousTestCase):
    def test_cancel_queued(self) -> None:
        """A queued job is removed at once: cancelled, never run, result fails."""
        runner = self.make_runner()
        blocker = Body("blocker")
        runner.submit(JobSpec("export", blocker))
        body = Body()
        handle = runner.submit(JobSpec("export", body))
        self.clock.advance(0)
        result = handle.result()
        cancelled = handle.cancel()
        self.assertEqual(self.successResultOf(cancelled), JobState.CANCELLED)
        self.failureResultOf(result, CancelledError)
        self.assertEqual(runner.stats()["queued"], 0)
        self.assertEqual(runner.jobs(JobState.QUEUED), [])
        blocker.succeed()
        self.clock.advance(0)
        self.assertEqual(body.calls, [])
        finished = [
            e
            for e in self.bus.events("jobs.finished")
            if isinstance(e, JobFinished) and e.job_id == handle.id
        ]
        self.assertEqual(
            finished,
            [
                JobFinished(
                    job_id=handle.id,
                    job_class="export",
                    state="cancelled",
                    attempts=0,
                    error=f"CancelledError: job {handle.id} (export): cancelled",
                    duration=0.0,
                )
            ],
        )

    def test_cancel_running_deferred_body(self) -> None:
        """A running body's Deferred is cancelled, its control says so, and the slot frees."""
        runner = self.make_runner()
        body, nxt = Body("first"), Body("next")
        handle = runner.submit(JobSpec("export", body))
        runner.submit(JobSpec("export", nxt))
        self.clock.advance(0)
        control = body.control
        cancelled = handle.cancel()
        self.assertEqual(body.cancelled, [1])
        self.assertTrue(control.cancelled)
        self.assertEqual(self.successResultOf(cancelled), JobState.CANCELLED)
        self.failureResultOf(handle.result(), CancelledError)
        self.clock.advance(0)
        self.assertEqual(len(nxt.calls), 1)
        nxt.succeed()

    def test_cancel_running_async_body(self) -> None:
        """An async def body sees CancelledError at its await and the job ends cancelled."""
        runner = self.make_runner()
        seen: list[str] = []

        async def body(control: IJobControl) -> None:
            try:
                await deferLater(self.clock, 100.0, lambda: None)
            except CancelledError:
                seen.append("cancelled")
                raise

        handle = runner.submit(JobSpec("export", body))
        self.clock.advance(0)
        handle.cancel()
        self.assertEqual(seen, ["cancelled"])
        self.assertEqual(handle.state, JobState.CANCELLED)
        self.failureResultOf(handle.result(), CancelledError)

    def test_cancel_wins_over_a_late_value(self) -> None:
        """A body whose canceller fires a value still ends cancelled."""
        runner = self.make_runner()
        handle = runner.submit(
            JobSpec("export", lambda control: Deferred(lambda d: d.callback("value")))
        )
        self.clock.advance(0)
        handle.cancel()
        self.assertEqual(handle.state, JobState.CANCELLED)

    def test_body_cancelling_itself(self) -> None:
        """A sync body that cancels its own job before returning ends cancelled."""
        runner = self.make_runner()
        handles: list[Any] = []

        def body(control: IJobControl) -> str:
            handles[0].cancel()
            return "ignored"

        handles.append(runner.submit(JobSpec("export", body)))
        self.clock.advance(0)
        self.assertEqual(handles[0].state, JobState.CANCELLED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_raise_if_cancelled(self) -> None:
        """IJobControl.raise_if_cancelled raises only after cancellation."""
        runner = self.make_runner()
        body = Body()
        handle = runner.submit(JobSpec("export", body))
        self.clock.advance(0)
        body.control.raise_if_cancelled()
        handle.cancel()
        self.assertRaises(CancelledError, body.control.raise_if_cancelled)

    def test_cancel_finished_job(self) -> None:
        """Cancelling a finished job changes nothing and reports its final state."""
        runner = self.make_runner()
        handle = runner.submit(JobSpec("export", ok("v")))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(handle.cancel()), JobState.SUCCEEDED)
        self.assertEqual(self.successResultOf(handle.result()), "v")

    def test_cancel_by_id(self) -> None:
        """runner.cancel(id) cancels; an unknown id raises NotFound."""
        runner = self.make_runner()
        handle = runner.submit(JobSpec("export", Body()))
        self.assertEqual(self.successResultOf(runner.cancel(handle.id)), JobState.CANCELLED)
        self.assertRaises(NotFound, runner.cancel, "nope")

    def test_body_ignoring_cancel_is_abandoned(self) -> None:
        """A body that does not stop within the grace period is abandoned and its slot freed."""
        runner = self.make_runner(cancel_grace=5.0)
        late: list[str] = []

        async def stubborn(control: IJobControl) -> str:
            try:
                await deferLater(self.clock, 100.0, lambda: None)
            except CancelledError:
                await deferLater(self.clock, 20.0, lambda: None)
            late.append("finished")
            return "too late"

        handle = runner.submit(JobSpec("export", stubborn))
        nxt = Body("next")
        runner.submit(JobSpec("export", nxt))
        self.clock.advance(0)
        d = handle.cancel()
        self.assertNoResult(d)
        self.assertEqual(handle.state, JobState.RUNNING)
        self.clock.advance(5.0)
        self.assertEqual(self.successResultOf(d), JobState.CANCELLED)
        self.assertEqual(runner.stats()["classes"]["export"]["abandoned"], 1)
        self.clock.advance(0)
        self.assertEqual(len(nxt.calls), 1)
        self.clock.advance(15.0)
        self.assertEqual(late, ["finished"])
        self.assertEqual(handle.state, JobState.CANCELLED)
        nxt.succeed()

    def test_result_waiter_cancel_does_not_cancel_job(self) -> None:
        """Each result() is a new Deferred; cancelling one only stops that wait."""
        runner = self.make_runner()
        body = Body()
        handle = runner.submit(JobSpec("export", body))
        self.clock.advance(0)
        first, second = handle.result(), handle.result()
        self.assertIsNot(first, second)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(handle.state, JobState.RUNNING)
        self.assertEqual(body.cancelled, [])
        body.succeed(7)
        self.assertEqual(self.successResultOf(second), 7)
        self.assertEqual(self.successResultOf(handle.result()), 7)


class TimeoutRetryTests(RunnerMixin, SynchronousTestCase):
    def test_timeout(self) -> None:
        """On expiry the running Deferred is cancelled and the job fails with CommandTimeout."""
        runner = self.make_runner()
        body = Body()
        handle = runner.submit(JobSpec("export", body, timeout=5.0))
        self.clock.advance(0)
        self.clock.advance(4.9)
        self.assertEqual(handle.state, JobState.RUNNING)
        self.clock.advance(0.1)
        self.assertEqual(body.cancelled, [1])
        self.assertTrue(body.control.cancelled)
        self.failureResultOf(handle.result(), CommandTimeout)
        self.assertEqual(handle.state, JobState.FAILED)
        self.assertEqual(runner.stats()["classes"]["export"]["timeouts"], 1)

    def test_finishing_in_time_cancels_the_timer(self) -> None:
        """A job that finishes before its timeout leaves no timer behind."""
        runner = self.make_runner()
        body = Body()
        handle = runner.submit(JobSpec("export", body, timeout=5.0))
        self.clock.advance(0)
        body.succeed()
        self.assertEqual(handle.state, JobState.SUCCEEDED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_is_retried(self) -> None:
        """A timed-out attempt is retried when retries remain."""
        runner = self.make_runner(rand=lambda: 0.5)
        body = Body()
        handle = runner.submit(
            JobSpec("export", body, timeout=5.0, retries=1, backoff=Backoff(initial=1.0))
        )
        self.clock.advance(0)
        self.clock.advance(5.0)
        self.assertEqual((handle.state, handle.retry_at), (JobState.QUEUED, 6.0))
        self.clock.advance(1.0)
        self.clock.advance(0)
        self.assertEqual(body.control.attempt, 2)
        body.succeed("second time")
        self.assertEqual(self.successResultOf(handle.result()), "second time")

    def test_cancel_after_timeout_is_not_retried(self) -> None:
        """A cancel during a timed-out attempt's grace period ends the job cancelled, no retry."""
        runner = self.make_runner(cancel_grace=10.0)

        async def stubborn(control: IJobControl) -> None:
            try:
                await deferLater(self.clock, 100.0, lambda: None)
            except CancelledError:
                await deferLater(self.clock, 3.0, lambda: None)

        handle = runner.submit(JobSpec("export", stubborn, timeout=1.0, retries=5))
        self.clock.advance(0)
        self.clock.advance(1.0)
        self.assertEqual(handle.state, JobState.RUNNING)
        handle.cancel()
        self.clock.advance(3.0)
        self.assertEqual((handle.state, handle.attempts), (JobState.CANCELLED, 1))

    def test_abandoned_timeout_fails_without_retry(self) -> None:
        """A timed-out body that ignores cancellation fails with CommandTimeout, unretried."""
        runner = self.make_runner(cancel_grace=2.0)

        def deaf(control: IJobControl) -> Deferred[None]:
            inner: Deferred[None] = Deferred()
            outer: Deferred[None] = Deferred()
            outer.callback(None)
            outer.addCallback(lambda _: inner)  # cancelling outer reaches inner...
            inner.pause()  # ...which is paused and so cannot fire
            return outer

        handle = runner.submit(JobSpec("export", deaf, timeout=1.0, retries=3))
        self.clock.advance(0)
        self.clock.advance(1.0)
        self.assertEqual(handle.state, JobState.RUNNING)
        self.clock.advance(2.0)
        self.failureResultOf(handle.result(), CommandTimeout)
        self.assertEqual(handle.attempts, 1)

    def test_retry_keeps_id_metadata_and_backs_off(self) -> None:
        """Retries reuse the id and metadata, wait Backoff.delay(n, rand), and start again."""
        runner = self.make_runner(rand=lambda: 0.5)
        body = Body()
        backoff = Backoff(initial=1.0, factor=2.0, jitter=0.2)
        handle = runner.submit(
            JobSpec("export", body, retries=2, backoff=backoff, metadata={"volume": "v1"})
        )
        self.clock.advance(0)
        body.fail(OSError("disk hiccup"))
        self.assertEqual((handle.state, handle.retry_at), (JobState.QUEUED, 1.0))
        self.assertEqual(runner.stats()["waiting_retry"], 1)
        self.assertEqual(runner.stats()["running"], 0)
        self.clock.advance(0.999)
        self.assertEqual(len(body.calls), 1)
        self.clock.advance(0.001)
        self.clock.advance(0)
        body.fail(OSError("again"))
        self.assertEqual(handle.retry_at, 1.0 + 2.0)
        self.clock.advance(2.0)
        self.clock.advance(0)
        body.succeed("third")
        self.assertEqual(self.successResultOf(handle.result()), "third")
        self.assertEqual([c.attempt for c in body.calls], [1, 2, 3])
        self.assertEqual({c.job_id for c in body.calls}, {handle.id})
        self.assertEqual([dict(c.metadata) for c in body.calls], [{"volume": "v1"}] * 3)
        self.assertEqual((handle.attempts, handle.error), (3, None))
        self.assertEqual(runner.stats()["classes"]["export"]["retries"], 2)

    def test_retry_delay_is_jittered(self) -> None:
        """The retry delay spans base*(1-jitter)..base*(1+jitter) with the injected rand."""
        for rand, expected in ((0.0, 0.8), (1.0, 1.2)):
            runner = self.make_runner(rand=lambda r=rand: r)
            body = Body()
            handle = runner.submit(
                JobSpec("x", body, retries=1, backoff=Backoff(initial=1.0, jitter=0.2))
            )
            self.clock.advance(0)
            body.fail(OSError())
            assert handle.retry_at is not None
            self.assertAlmostEqual(handle.retry_at, expected)
            handle.cancel()

    def test_retry_keeps_priority(self) -> None:
        """A retried high-priority job jumps ahead of lower ones queued meanwhile."""
        runner = self.make_runner(rand=lambda: 0.5)
        started: list[str] = []
        urgent = Body("urgent", started)
        runner.submit(
            JobSpec("export", urgent, priority=5, retries=1, backoff=Backoff(initial=1.0))
        )
        self.clock.advance(0)
        b, c = Body("b", started), Body("c", started)
        runner.submit(JobSpec("export", b))
        runner.submit(JobSpec("export", c))
        urgent.fail(OSError("flaky"))
        self.clock.advance(0)
        self.assertEqual(started, ["urgent", "b"])
        self.clock.advance(1.0)
        b.succeed()
        self.clock.advance(0)
        self.assertEqual(started, ["urgent", "b", "urgent"])
        urgent.succeed()
        self.clock.advance(0)
        self.assertEqual(started, ["urgent", "b", "urgent", "c"])
        c.succeed()

    def test_non_retryable_errors_are_not_retried(self) -> None:
        """A PiccolodError marked not retryable fails the job at once."""
        runner = self.make_runner()
        body = Body()
        handle = runner.submit(JobSpec("export", body, retries=3))
        self.clock.advance(0)
        body.fail(InvalidCommand("bad volume"))
        self.failureResultOf(handle.result(), InvalidCommand)
        self.assertEqual(handle.attempts, 1)

    def test_cancel_while_waiting_for_retry(self) -> None:
        """A job waiting for its retry is cancelled at once and its timer removed."""
        runner = self.make_runner()
        body = Body()
        handle = runner.submit(JobSpec("export", body, retries=1))
        self.clock.advance(0)
        body.fail(OSError())
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.successResultOf(handle.cancel()), JobState.CANCELLED)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class EventTests(RunnerMixin, SynchronousTestCase):
    def test_progress_events(self) -> None:
        """Changes and reports publish clamped JobProgress; the end publishes JobFinished."""
        runner = self.make_runner()
        body = Body()
        handle = runner.submit(JobSpec("export", body))
        self.clock.advance(0)
        control = body.control
        control.report(0.25, "copying")
        control.report(7.0, "overshoot")
        control.report(-1.0, "undershoot")
        control.report(math.nan, "nan keeps the value")
        self.assertEqual((handle.progress, handle.message), (0.0, "nan keeps the value"))
        self.clock.advance(3.0)
        body.succeed()
        control.report(0.5, "stale")

        def progress(state: str, value: float, message: str = "") -> Event:
            return JobProgress(
                job_id=handle.id, job_class="export", state=state, progress=value, message=message
            )

        self.bus.assert_published(
            [
                progress("queued", 0.0),
                progress("running", 0.0),
                progress("running", 0.25, "copying"),
                progress("running", 1.0, "overshoot"),
                progress("running", 0.0, "undershoot"),
                progress("running", 0.0, "nan keeps the value"),
                progress("succeeded", 1.0, "nan keeps the value"),
                JobFinished(job_id=handle.id, job_class="export", state="succeeded", duration=3.0),
            ]
        )

    def test_cancelled_attempt_reports_are_ignored(self) -> None:
        """After cancellation a body's reports change nothing and publish nothing."""
        runner = self.make_runner(cancel_grace=1.0)
        controls: list[IJobControl] = []

        def deaf(control: IJobControl) -> Deferred[None]:
            controls.append(control)
            inner: Deferred[None] = Deferred()
            inner.pause()
            outer: Deferred[None] = Deferred()
            outer.callback(None)
            return outer.addCallback(lambda _: inner)

        handle = runner.submit(JobSpec("export", deaf))
        self.clock.advance(0)
        handle.cancel()
        self.bus.clear_published()
        controls[0].report(0.9, "still going")
        self.assertEqual(handle.progress, 0.0)
        self.bus.assert_nothing_published("jobs.progress")
        self.clock.advance(1.0)

    def test_correlation_id_metadata(self) -> None:
        """A correlation_id metadata entry tags the job's events."""
        runner = self.make_runner()
        runner.submit(JobSpec("export", ok(), metadata={"correlation_id": "cmd-7"}))
        self.clock.advance(0)
        envelopes = self.bus.published()
        self.assertTrue(envelopes)
        self.assertEqual({e.context.correlation_id for e in envelopes}, {"cmd-7"})
        self.assertEqual({e.context.source for e in envelopes}, {"jobs"})

    def test_subscribers_receive_events(self) -> None:
        """A jobs.# subscriber receives progress and completion through the bus."""
        runner = self.make_runner()
        seen: list[str] = []
        self.bus.subscribe("jobs.#", lambda env: seen.append(env.topic))
        runner.submit(JobSpec("export", ok()))
        self.clock.advance(0)
        self.bus.flush()
        self.assertEqual(seen, ["jobs.progress", "jobs.progress", "jobs.progress", "jobs.finished"])

    def test_bus_failure_is_isolated(self) -> None:
        """A bus that raises on publish is logged; the job still runs and finishes."""

        @attrs.define(eq=False)
        class BrokenBus(FakeEventBus):
            def publish(self, *args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("bus down")

        clock = Clock()
        runner = JobRunner(clock, BrokenBus(clock))
        runner.startService()
        handle = runner.submit(JobSpec("export", ok(1)))
        clock.advance(0)
        self.assertEqual(self.successResultOf(handle.result()), 1)
        self.assertTrue(self.flushLoggedErrors(RuntimeError))
        self.successResultOf(runner.stopService())

    def test_runner_without_bus(self) -> None:
        """A runner without a bus runs jobs all the same."""
        clock = Clock()
        runner = JobRunner(clock)
        runner.startService()
        handle = runner.submit(JobSpec("export", ok(3)))
        clock.advance(0)
        self.assertEqual(self.successResultOf(handle.result()), 3)
        self.successResultOf(runner.stopService())


class HistoryTests(RunnerMixin, SynchronousTestCase):
    def test_history_bound(self) -> None:
        """Only the last `history` finished jobs are kept, newest first; older ones are gone."""
        runner = self.make_runner(history=3)
        handles = [runner.submit(JobSpec("export", ok(i))) for i in range(5)]
        for _ in handles:
            self.clock.advance(0)
        self.assertEqual(runner.jobs(), handles[:1:-1])
        for old in handles[:2]:
            self.assertRaises(NotFound, runner.get, old.id)
        self.assertIs(runner.get(handles[4].id), handles[4])
        self.assertEqual(runner.stats()["history"], 3)

    def test_no_history(self) -> None:
        """history=0 forgets finished jobs at once (their handles still work)."""
        runner = self.make_runner(history=0)
        handle = runner.submit(JobSpec("export", ok("v")))
        self.clock.advance(0)
        self.assertRaises(NotFound, runner.get, handle.id)
        self.assertEqual(self.successResultOf(handle.result()), "v")

    def test_listing_order_and_filter(self) -> None:
        """jobs() lists running, then queued in dispatch order, then finished; state filters."""
        runner = self.make_runner()
        done = runner.submit(JobSpec("export", ok()))
        self.clock.advance(0)
        body = Body()
        running = runner.submit(JobSpec("export", body))
        self.clock.advance(0)
        low = runner.submit(JobSpec("export", Body(), priority=0))
        high = runner.submit(JobSpec("export", Body(), priority=9))
        self.assertEqual(runner.jobs(), [running, high, low, done])
        self.assertEqual(runner.jobs("queued"), [high, low])
        self.assertEqual(runner.jobs(JobState.SUCCEEDED), [done])
        self.assertRaises(InvalidCommand, runner.jobs, "paused")
        self.assertRaises(NotFound, runner.get, "missing")
        low.cancel()
        high.cancel()
        body.succeed()

    def test_to_json_and_stats(self) -> None:
        """to_json() and stats() report state, timing, counts and durations."""
        runner = self.make_runner(limits={"export": 2})
        body = Body()
        handle = runner.submit(
            JobSpec("export", body, name="nightly", priority=2, metadata={"kind": "full"})
        )
        self.clock.advance(0)
        self.clock.advance(10.0)
        body.control.report(0.5, "half")
        self.clock.advance(4.0)
        body.fail(ValueError("boom"))
        self.assertEqual(
            handle.to_json(),
            {
                "id": handle.id,
                "name": "nightly",
                "job_class": "export",
                "state": "failed",
                "priority": 2,
                "progress": 0.5,
                "message": "half",
                "attempts": 1,
                "retries": 0,
                "timeout": None,
                "metadata": {"kind": "full"},
                "submitted_at": 0.0,
                "started_at": 0.0,
                "finished_at": 14.0,
                "retry_at": None,
                "duration": 14.0,
                "error": "ValueError: boom",
            },
        )
        runner.submit(JobSpec("export", ok()))
        runner.submit(JobSpec("rebuild", ok())).cancel()
        self.clock.advance(0)
        stats = runner.stats()
        self.assertEqual(
            {k: stats[k] for k in ("running", "queued", "submitted", "history")},
            {"running": 0, "queued": 0, "submitted": 3, "history": 3},
        )
        export = stats["classes"]["export"]
        self.assertEqual(
            {k: export[k] for k in ("limit", "succeeded", "failed", "cancelled")},
            {"limit": 2, "succeeded": 1, "failed": 1, "cancelled": 0},
        )
        self.assertEqual((export["duration_sum"], export["duration_count"]), (14.0, 2))
        rebuild = stats["classes"]["rebuild"]
        self.assertEqual((rebuild["cancelled"], rebuild["duration_count"]), (1, 0))


class PeriodicTests(RunnerMixin, SynchronousTestCase):
    def test_submits_every_interval(self) -> None:
        """every() submits a fresh job each interval."""
        runner = self.make_runner()
        calls: list[float] = []
        periodic = runner.every(
            10.0, lambda: JobSpec("telemetry", lambda c: calls.append(self.clock.seconds()))
        )
        self.clock.advance(0)
        self.assertEqual(calls, [])
        for _ in range(3):
            self.clock.advance(10.0)
            self.clock.advance(0)
        self.assertEqual(calls, [10.0, 20.0, 30.0])
        self.assertEqual(periodic.submitted, 3)

    def test_now_submits_at_once(self) -> None:
        """With now=True the first job is submitted immediately."""
        runner = self.make_runner()
        periodic = runner.every(10.0, lambda: JobSpec("telemetry", ok()), now=True)
        self.assertEqual(periodic.submitted, 1)

    def test_skips_while_busy(self) -> None:
        """A tick is skipped while the previous job is still queued or running."""
        runner = self.make_runner()
        bodies: list[Body] = []

        def factory() -> JobSpec:
            body = Body()
            bodies.append(body)
            return JobSpec("quick-check", body)

        periodic = runner.every(10.0, factory)
        self.clock.advance(10.0)
        self.clock.advance(0)
        self.clock.advance(10.0)
        self.clock.advance(10.0)
        self.assertEqual((len(bodies), periodic.skipped), (1, 2))
        bodies[0].succeed()
        self.clock.advance(10.0)
        self.assertEqual((len(bodies), periodic.skipped), (2, 2))
        assert periodic.last is not None
        periodic.last.cancel()

    def test_factory_none_and_errors(self) -> None:
        """A factory returning None skips the tick; one raising is logged and counted."""
        runner = self.make_runner()
        answers: list[Any] = [None, ZeroDivisionError("oops"), JobSpec("telemetry", ok())]

        def factory() -> JobSpec | None:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer  # type: ignore[no-any-return]

        periodic = runner.every(1.0, factory)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertEqual((periodic.submitted, periodic.errors), (1, 1))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_stop_and_restart(self) -> None:
        """stopService ends a periodic job; startService resumes it."""
        runner = self.make_runner()
        periodic = runner.every(1.0, lambda: JobSpec("telemetry", ok()))
        periodic.stopService()
        self.clock.advance(5.0)
        self.assertEqual(periodic.submitted, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        periodic.startService()
        self.clock.advance(1.0)
        self.assertEqual(periodic.submitted, 1)
        periodic.stopService()
        periodic.stopService()

    def test_paused_while_runner_stopped(self) -> None:
        """Periodic jobs tick only while the runner runs."""
        runner = self.make_runner(start=False)
        periodic = runner.every(1.0, lambda: JobSpec("telemetry", ok()))
        self.clock.advance(5.0)
        self.assertEqual(periodic.submitted, 0)
        runner.startService()
        self.clock.advance(1.0)
        self.assertEqual(periodic.submitted, 1)
        self.successResultOf(runner.stopService())
        self.clock.advance(5.0)
        self.assertEqual(periodic.submitted, 1)
        runner.startService()
        self.clock.advance(1.0)
        self.assertEqual(periodic.submitted, 2)

    def test_bad_interval(self) -> None:
        """A non-positive or non-finite interval, or a non-callable factory, is refused."""
        runner = self.make_runner()
        for interval in (0, -1.0, math.inf, math.nan, True):
            with self.subTest(interval=interval):
                self.assertRaises(InvalidCommand, runner.every, interval, lambda: None)
        self.assertRaises(InvalidCommand, runner.every, 1.0, "factory")
        self.assertIsInstance(runner.every(1.0, lambda: None), PeriodicJob)


class StopTests(RunnerMixin, SynchronousTestCase):
    def test_stop_cancels_everything(self) -> None:
        """stopService cancels queued, retry-waiting and running jobs and leaves no timers."""
        runner = self.make_runner(limits={"export": 1, "sweep": 1})
        running_body = Body()
        running = runner.submit(JobSpec("export", running_body, timeout=60.0))
        queued = runner.submit(JobSpec("export", Body()))
        flaky = Body()
        waiting = runner.submit(JobSpec("sweep", flaky, retries=3))
        runner.every(5.0, lambda: JobSpec("telemetry", ok()))
        self.clock.advance(0)
        flaky.fail(OSError())
        self.assertEqual(waiting.state, JobState.QUEUED)
        d = runner.stopService()
        self.successResultOf(d)
        self.assertEqual([running.state, queued.state, waiting.state], [JobState.CANCELLED] * 3)
        failure = self.failureResultOf(running.result(), CancelledError)
        self.assertIn("the job runner stopped", str(failure.value))
        self.assertEqual(running_body.cancelled, [1])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertRaises(NotReady, runner.submit, JobSpec("export", ok()))

    def test_stop_waits_for_bodies_bounded_by_grace(self) -> None:
        """stopService waits for a slow-stopping body, but no longer than the grace period."""
        runner = self.make_runner(cancel_grace=3.0)

        async def slow_to_stop(control: IJobControl) -> None:
            try:
                await deferLater(self.clock, 100.0, lambda: None)
            except CancelledError:
                await deferLater(self.clock, 50.0, lambda: None)

        handle = runner.submit(JobSpec("export", slow_to_stop))
        self.clock.advance(0)
        d = runner.stopService()
        self.assertNoResult(d)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(handle.state, JobState.CANCELLED)
        self.clock.advance(50.0)  # the abandoned body finishes; nothing changes
        self.assertEqual(handle.state, JobState.CANCELLED)

    def test_failure_during_stop_is_not_retried(self) -> None:
        """A job failing while the runner stops ends failed instead of scheduling a retry."""
        runner = self.make_runner()

        def raising_on_cancel(control: IJobControl) -> Deferred[None]:
            return Deferred(lambda d: d.errback(OSError("interrupted")))

        handle = runner.submit(JobSpec("export", raising_on_cancel, retries=5))
        self.clock.advance(0)
        self.successResultOf(runner.stopService())
        self.assertEqual(handle.state, JobState.CANCELLED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restart_after_stop(self) -> None:
        """After stop and start the runner accepts and runs jobs again."""
        runner = self.make_runner()
        self.successResultOf(runner.stopService())
        runner.startService()
        runner.startService()
        handle = runner.submit(JobSpec("export", ok("again")))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(handle.result()), "again")
