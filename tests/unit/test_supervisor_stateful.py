"""
A hypothesis state machine over the supervisor and a Clock: random crashes,
normal exits, failure reports, stops, starts, restart_child, hung stops,
pending starts and clock advances, with the supervisor's invariants checked
after every step.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.events import ChildState, ChildStateChanged
from piccolod.interfaces import Backoff, ChildSpec, IEventBus, RestartPolicy
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.supervisor import Supervisor
from piccolod.testing.services import FakeService, FakeServiceFactory

S = ChildState
#: name -> requirements (a chain a <- b <- c, and an independent d)
TOPOLOGY = {"a": (), "b": ("a",), "c": ("b",), "d": ()}
NAMES = sorted(TOPOLOGY)
INTENSITY = 2
PERIOD = 10.0
STOP_TIMEOUT = 3.0


@implementer(IEventBus)
class TimedBus:
    """Records (clock time, event) for every publication."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.log: list[tuple[float, Any]] = []

    def publish(self, event: Any, source: str = "", correlation_id: Any = None, topic: Any = None):
        self.log.append((self.clock.seconds(), event))

    def subscribe(self, *a: Any, **kw: Any) -> Any:
        raise NotImplementedError

    def retained(self, pattern: str) -> Any:
        return []

    def last(self, topic: str, key: str = "") -> Any:
        return None

    def stats(self) -> Any:
        return {}

    def drain(self) -> Any:
        raise NotImplementedError


class SupervisorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.bus = TimedBus(self.clock)
        self.health = HealthTracker(self.clock)
        self.sup = Supervisor(self.clock, self.bus, self.health, rand=lambda: 0.5)
        self.factories: dict[str, FakeServiceFactory] = {}
        self.violations: list[str] = []
        self.seen_events = 0
        #: per child: clock times of counted restarts since the last reset
        self.restart_times: dict[str, list[float]] = {n: [] for n in NAMES}
        self.last_restarts: dict[str, int] = {n: 0 for n in NAMES}

    # -- set-up

    @initialize(
        policies=st.lists(st.sampled_from(list(RestartPolicy)), min_size=4, max_size=4),
        checked=st.booleans(),
    )
    def build(self, policies: list[RestartPolicy], checked: bool) -> None:
        for name, policy in zip(NAMES, policies, strict=True):
            factory = FakeServiceFactory(name, self.clock)
            self.factories[name] = factory
            self.sup.add_child(
                ChildSpec(
                    name,
                    self._guarded(name, factory),
                    requires=TOPOLOGY[name],
                    restart=policy,
                    start_timeout=5,
                    stop_timeout=STOP_TIMEOUT,
                    backoff=Backoff(initial=1, maximum=4, factor=2, jitter=0.5),
                    intensity=INTENSITY,
                    period=PERIOD,
                    stable_after=6,
                    health_check=factory.check if checked and name == "c" else None,
                    health_interval=2,
                    health_timeout=1,
                    max_misses=2,
                    required=name != "d",
                )
            )

    def _guarded(self, name: str, factory: FakeServiceFactory) -> Any:
        """The factory, checking that requirements are satisfied at every build."""

        def build() -> FakeService:
            for req in TOPOLOGY[name]:
                status = self.sup.child(req)
                finished = (
                    status.state is S.STOPPED
                    and self.health.component(f"child:{req}").message == "finished"
                )
                if status.state is not S.RUNNING and not finished:
                    self.violations.append(f"{name} built while {req} is {status.state.value}")
            return factory()

        return build

    # -- rules

    @rule()
    def start(self) -> None:
        self.sup.startService()

    @rule()
    def stop(self) -> None:
        self.sup.stopService()

    @rule(name=st.sampled_from(NAMES), normal=st.booleans())
    def exit_or_crash(self, name: str, normal: bool) -> None:
        f = self.factories[name]
        if f.instances and f.latest.started and not f.latest.exited:
            if normal:
                f.latest.exit()
            else:
                f.latest.crash()

    @rule(name=st.sampled_from(NAMES))
    def report_failure(self, name: str) -> None:
        self.sup.child_failed(name, "probe")

    @rule(name=st.sampled_from(NAMES))
    def restart_child(self, name: str) -> None:
        d = self.sup.restart_child(name)
        d.addErrback(lambda f: None)

    @rule(name=st.sampled_from(NAMES))
    def make_ready(self, name: str) -> None:
        f = self.factories[name]
        if f.instances:
            f.latest.make_ready()

    @rule(name=st.sampled_from(NAMES))
    def finish_stops(self, name: str) -> None:
        for s in self.factories[name].instances:
            if s.stop_called:
                s.finish_stop()

    @rule(
        name=st.sampled_from(NAMES),
        start=st.sampled_from(["ready", "ready", "pending", "fail", "crash", "fail-ready"]),
        stop=st.sampled_from(["now", "now", "hang", "fail"]),
    )
    def behave(self, name: str, start: Any, stop: Any) -> None:
        self.factories[name].start = start
        self.factories[name].stop = stop

    @rule(healthy=st.sampled_from([True, False, "raise", "hang"]))
    def health_of_c(self, healthy: Any) -> None:
        self.factories["c"].healthy = healthy

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 6.0, 11.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # -- invariants

    def _collect_restarts(self) -> None:
        for when, event in self.bus.log[self.seen_events :]:
            if not isinstance(event, ChildStateChanged):
                continue
            name = event.child
            if event.restarts < self.last_restarts[name]:
                self.restart_times[name] = []
            elif event.restarts > self.last_restarts[name]:
                self.restart_times[name].extend(
                    [when] * (event.restarts - self.last_restarts[name])
                )
            self.last_restarts[name] = event.restarts
        self.seen_events = len(self.bus.log)

    @invariant()
    def never_two_live_instances(self) -> None:
        now = self.clock.seconds()
        for name, f in self.factories.items():
            unasked = [s for s in f.instances if s.started and not s.stop_called]
            assert len(unasked) <= 1, (name, unasked)
            live = [
                s
                for s in f.live
                if not (s.stop_called_at is not None and now - s.stop_called_at >= STOP_TIMEOUT)
            ]
            assert len(live) <= 1, (name, live)
            assert f.violations == [], f.violations

    @invariant()
    def restarts_within_intensity(self) -> None:
        self._collect_restarts()
        now = self.clock.seconds()
        for name, times in self.restart_times.items():
            recent = [t for t in times if now - t < PERIOD]
            assert len(recent) <= INTENSITY, (name, times, now)

    @invariant()
    def dependents_of_failed_are_not_running(self) -> None:
        states = {c.name: c.state for c in self.sup.children()}
        for name, state in states.items():
            if state is not S.FAILED:
                continue
            for other in TOPOLOGY:
                if self._requires(other, name):
                    assert states[other] not in (S.RUNNING, S.STARTING), (other, name, states)

    def _requires(self, child: str, required: str) -> bool:
        reqs = TOPOLOGY[child]
        return required in reqs or any(self._requires(r, required) for r in reqs)

    @invariant()
    def states_match_fakes(self) -> None:
        for status in self.sup.children():
            f = self.factories.get(status.name)
            if f is None:
                continue
            holding = [s for s in f.instances if s.started and not s.stop_called]
            if status.state is S.RUNNING:
                assert holding == [f.latest], (status, holding)
                assert f.latest.ready or f.latest.start_mode == "deferred"
                assert self.sup.service(status.name) is f.latest
            elif status.state is S.STARTING:
                assert holding == [f.latest], (status, holding)
            elif status.state in (S.STOPPED, S.FAILED, S.BACKOFF):
                assert holding == [], (status, holding)
                assert self.sup.service(status.name) is None
            if not self.sup.running:
                assert status.state not in (S.RUNNING, S.STARTING, S.BACKOFF), status

    @invariant()
    def requirements_held_at_build(self) -> None:
        assert self.violations == [], self.violations

    def teardown(self) -> None:
        d = self.sup.stopService()
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(20):
            if results:
                break
            self.clock.advance(STOP_TIMEOUT)
        assert results == [None], results
        assert not isinstance(results[0], Failure)
        assert self.clock.getDelayedCalls() == [], self.clock.getDelayedCalls()
        for status in self.sup.children():
            assert status.state in (S.STOPPED, S.FAILED), status


SupervisorMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSupervisorStateful = SupervisorMachine.TestCase
