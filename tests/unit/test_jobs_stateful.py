# mypy: disable-error-code="no-untyped-call"
# (trial and hypothesis.stateful are unannotated)
"""
A hypothesis state machine over :class:`piccolod.kernel.jobs.JobRunner` on a
``task.Clock``: random submits (plain, raising, Deferred, ``async def`` and
cancellation-ignoring bodies; priorities, retries, timeouts), completions,
failures, cancels, clock advances and stop/start cycles.

Invariants: never more running jobs of a class than its limit (as the runner
reports it and as counted from the bodies actually in flight); every job
ends in exactly one final state and stays there; each result Deferred and
each ``JobFinished`` event fires exactly once, when the job ends; every
job's published states follow the transition table.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater

from piccolod.events import JobFinished, JobProgress
from piccolod.interfaces import Backoff, IJobControl, JobState
from piccolod.kernel.jobs import TRANSITIONS, JobHandle, JobRunner, JobSpec
from piccolod.testing.bus import FakeEventBus

LIMITS = {"a": 1, "b": 2}
DEFAULT_LIMIT = 1
CLASSES = ["a", "b", "c"]
GRACE = 2.0
STUBBORN_EXTRA = 5.0  # a stubborn body keeps going this long after a cancel
KINDS = ["deferred", "async", "sync-ok", "sync-fail", "stubborn"]


def limit(job_class: str) -> int:
    return LIMITS.get(job_class, DEFAULT_LIMIT)


class JobRunnerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.bus = FakeEventBus(self.clock)
        self.runner = JobRunner(
            self.clock,
            self.bus,
            limits=LIMITS,
            default_limit=DEFAULT_LIMIT,
            history=100_000,
            cancel_grace=GRACE,
            rand=lambda: 0.5,
        )
        self.runner.startService()
        self.handles: list[JobHandle] = []
        self.outcomes: dict[str, list[object]] = {}
        self.final: dict[str, JobState] = {}
        # Pending Deferreds of bodies the test completes, by job id.
        self.pending: dict[str, Deferred[Any]] = {}
        # Cooperative bodies in flight (called, their Deferred not yet fired).
        self.in_flight: Counter[str] = Counter()

    # -- bodies

    def _track(self, control: IJobControl, job_class: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.in_flight[job_class] += 1

        def done(result: object) -> object:
            self.in_flight[job_class] -= 1
            if self.pending.get(control.job_id) is d:
                del self.pending[control.job_id]
            return result

        d.addBoth(done)
        self.pending[control.job_id] = d
        return d

    def _body(self, kind: str, job_class: str) -> Any:
        if kind == "sync-ok":
            return lambda control: control.attempt
        if kind == "sync-fail":

            def fail(control: IJobControl) -> None:
                raise RuntimeError("sync failure")

            return fail
        if kind == "deferred":
            return lambda control: self._track(control, job_class)
        if kind == "async":

            async def coro(control: IJobControl) -> object:
                control.report(0.5, "halfway")
                return await self._track(control, job_class)

            return coro

        async def stubborn(control: IJobControl) -> str:
            try:
                await deferLater(self.clock, 1000.0, lambda: None)
            except CancelledError:
                await deferLater(self.clock, STUBBORN_EXTRA, lambda: None)
            return "stubborn"

        return stubborn

    # -- rules

    @rule(
        job_class=st.sampled_from(CLASSES),
        kind=st.sampled_from(KINDS),
        priority=st.integers(-2, 2),
        retries=st.integers(0, 2),
        timeout=st.one_of(st.none(), st.sampled_from([0.5, 1.0, 4.0])),
    )
    def submit(
        self, job_class: str, kind: str, priority: int, retries: int, timeout: float | None
    ) -> None:
        if not self.runner.running:
            return
        spec = JobSpec(
            job_class,
            self._body(kind, job_class),
            priority=priority,
            retries=retries,
            timeout=timeout,
            backoff=Backoff(initial=0.5, maximum=2.0),
            metadata={"kind": kind},
        )
        handle = self.runner.submit(spec)
        self.handles.append(handle)
        outcomes: list[object] = []
        self.outcomes[handle.id] = outcomes
        handle.result().addBoth(outcomes.append)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), succeed=st.booleans())
    def finish(self, data: st.DataObject, succeed: bool) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.pending)))
        d = self.pending[job_id]
        if succeed:
            d.callback("value")
        else:
            d.errback(RuntimeError("body failed"))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(self.handles))
        states: list[object] = []
        handle.cancel().addBoth(states.append)

    @rule(seconds=st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 3.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def stop_and_start(self) -> None:
        d = self.runner.stopService()
        self.clock.advance(GRACE)
        assert d.called
        for handle in self.handles:
            assert handle.state.final, handle
        self.runner.startService()

    # -- invariants

    @invariant()
    def never_over_limit(self) -> None:
        running = Counter(h.job_class for h in self.handles if h.state is JobState.RUNNING)
        stats = self.runner.stats()["classes"]
        for job_class in CLASSES:
            assert running[job_class] <= limit(job_class), (job_class, running)
            assert self.in_flight[job_class] <= limit(job_class), (job_class, self.in_flight)
            if job_class in stats:
                assert stats[job_class]["running"] == running[job_class]

    @invariant()
    def one_final_state_one_outcome(self) -> None:
        finished = Counter(
            e.job_id for e in self.bus.events("jobs.finished") if isinstance(e, JobFinished)
        )
        for handle in self.handles:
            outcomes = self.outcomes[handle.id]
            assert len(outcomes) <= 1, (handle, outcomes)
            if handle.state.final:
                assert len(outcomes) == 1, handle
                assert finished[handle.id] == 1, handle
                previous = self.final.setdefault(handle.id, handle.state)
                assert previous is handle.state, (handle, previous)
            else:
                assert outcomes == [], handle
                assert finished[handle.id] == 0, handle
                assert handle.id not in self.final, handle

    def teardown(self) -> None:
        d = self.runner.stopService()
        self.clock.advance(GRACE)
        assert d.called
        self.clock.advance(STUBBORN_EXTRA)
        assert self.clock.getDelayedCalls() == [], self.clock.getDelayedCalls()
        self.one_final_state_one_outcome()
        states: dict[str, list[JobState]] = {}
        for event in self.bus.events("jobs.progress"):
            assert isinstance(event, JobProgress)
            states.setdefault(event.job_id, []).append(JobState(event.state))
        allowed = {(src, dst) for (src, _), dst in TRANSITIONS.items()}
        for handle in self.handles:
            assert handle.state.final, handle
            path = states[handle.id]
            assert path[0] is JobState.QUEUED and path[-1] is handle.state, path
            for src, dst in pairwise(path):
                assert src is dst or (src, dst) in allowed, path


JobRunnerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestJobRunnerStateful = JobRunnerMachine.TestCase
