"""Tests for piccolod.kernel.supervisor.Supervisor, driven by a Clock."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.errors import (
    ConfigError,
    Conflict,
    DuplicateRegistration,
    NotFound,
    NotReady,
    SubsystemFailed,
)
from piccolod.events import ChildState, ChildStateChanged, HealthLevel
from piccolod.interfaces import Backoff, ChildSpec, ChildStatus, ISupervisor, RestartPolicy
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.sdnotify import SystemdNotifier
from piccolod.kernel.supervisor import Supervisor, describe, topological_order
from piccolod.testing.services import FakeServiceError, FakeServiceFactory
from tests.unit.test_health import make_bus

S = ChildState
#: A backoff whose delays are exactly 1, 2, 4, 8, 8... with rand() == 0.5.
BACKOFF = Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.5)


@attrs.define(eq=False)
class RecordingNotifier(SystemdNotifier):
    """A SystemdNotifier that records datagrams instead of sending them."""

    lines: list[str] = attrs.field(factory=list)

    def notify(self, *lines: str) -> bool:
        self.lines.append("\n".join(lines))
        return True


class SupervisorTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.bus = make_bus(self.clock)
        self.health = HealthTracker(self.clock)
        self.journal: list[str] = []
        self.sup = Supervisor(self.clock, self.bus, self.health, rand=lambda: 0.5)
        self.addCleanup(self.stop_and_check)

    def stop_and_check(self) -> None:
        d = self.sup.stopService()
        for _ in range(100):
            if d.called:
                break
            self.clock.advance(10)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        for child in self.sup.children():
            self.assertIn(child.state, (S.STOPPED, S.FAILED))

    def add(
        self,
        name: str,
        requires: tuple[str, ...] = (),
        start: Any = "ready",
        stop: Any = "now",
        **kw: Any,
    ) -> FakeServiceFactory:
        f = FakeServiceFactory(name, self.clock, start=start, stop=stop, journal=self.journal)
        kw.setdefault("backoff", BACKOFF)
        self.sup.add_child(ChildSpec(name, f, requires=requires, **kw))
        return f

    def state(self, name: str) -> ChildState:
        return self.sup.child(name).state

    def states(self) -> dict[str, ChildState]:
        return {c.name: c.state for c in self.sup.children()}

    def transitions(self, name: str) -> list[tuple[str, str]]:
        return [
            (e.previous.value, e.state.value)
            for e in self.bus.events("supervisor.child_state")
            if e.child == name
        ]


class InterfaceTests(SupervisorTestCase):
    def test_provides_interfaces(self) -> None:
        """Supervisor provides ISupervisor and IService."""
        self.assertTrue(verifyObject(ISupervisor, self.sup))
        self.assertTrue(verifyObject(IService, self.sup))
        self.assertEqual(self.sup.name, "piccolod")

    def test_rejects_non_clock(self) -> None:
        """The clock must provide IReactorTime."""
        self.assertRaises(TypeError, Supervisor, object())


class ConfigurationTests(SupervisorTestCase):
    def test_duplicate_name(self) -> None:
        """A second child with a taken name raises DuplicateRegistration."""
        self.add("a")
        self.assertRaises(DuplicateRegistration, self.add, "a")

    def test_unknown_requirement(self) -> None:
        """A requirement naming no child raises ConfigError and adds nothing."""
        e = self.assertRaises(ConfigError, self.add, "a", requires=("ghost",))
        self.assertIn("ghost", str(e))
        self.assertEqual(self.sup.children(), [])

    def test_self_requirement_is_a_cycle(self) -> None:
        """A child requiring itself raises ConfigError."""
        self.assertRaises(ConfigError, self.add, "a", requires=("a",))

    def test_cycle_detected_by_topological_order(self) -> None:
        """topological_order refuses a cycle and names its members."""
        f = FakeServiceFactory()
        specs = [
            ChildSpec("a", f, requires=("b",)),
            ChildSpec("b", f, requires=("a",)),
            ChildSpec("c", f),
        ]
        e = self.assertRaises(ConfigError, topological_order, specs)
        self.assertIn("a, b", str(e))

    def test_topological_order_ties_by_insertion(self) -> None:
        """Children follow their requirements; otherwise insertion order is kept."""
        f = FakeServiceFactory()
        specs = [
            ChildSpec("api", f, requires=("store", "bus")),
            ChildSpec("store", f, requires=("bus",)),
            ChildSpec("mdns", f),
            ChildSpec("bus", f),
        ]
        self.assertEqual(
            [s.name for s in topological_order(specs)], ["mdns", "bus", "store", "api"]
        )

    def test_bad_values(self) -> None:
        """Non-positive timeouts, negative intensity and zero max_misses raise ConfigError."""
        for bad in (
            {"start_timeout": 0},
            {"stop_timeout": -1},
            {"intensity": -1},
            {"period": 0},
            {"max_misses": 0},
            {"health_interval": 0},
            {"backoff": Backoff(factor=0.5)},
            {"backoff": Backoff(jitter=2)},
        ):
            self.assertRaises(ConfigError, self.add, "a", **bad)
        self.assertRaises(ConfigError, self.sup.add_child, "not a spec")
        self.assertRaises(ConfigError, self.add, "")
        self.assertEqual(self.sup.children(), [])

    def test_unknown_child_queries(self) -> None:
        """child(), service() and child_failed() of an unknown name raise NotFound."""
        self.assertRaises(NotFound, self.sup.child, "x")
        self.assertRaises(NotFound, self.sup.service, "x")
        self.assertRaises(NotFound, self.sup.child_failed, "x", "boom")
        self.failureResultOf(self.sup.restart_child("x"), NotFound)

    def test_status_to_json(self) -> None:
        """children() lists statuses in start order, serialisable for the API."""
        self.add("b")
        self.add("a", requires=("b",), restart=RestartPolicy.TRANSIENT)
        self.assertEqual(
            [c.to_json() for c in self.sup.children()],
            [
                {
                    "name": "b",
                    "state": "stopped",
                    "restarts": 0,
                    "last_error": None,
                    "since": 1000.0,
                    "requires": [],
                    "restart": "permanent",
                },
                {
                    "name": "a",
                    "state": "stopped",
                    "restarts": 0,
                    "last_error": None,
                    "since": 1000.0,
                    "requires": ["b"],
                    "restart": "transient",
                },
            ],
        )


class StartTests(SupervisorTestCase):
    def test_starts_in_order_waiting_for_readiness(self) -> None:
        """A child whose when_ready is pending holds back the next, even an independent one."""
        a = self.add("a", start="pending")
        self.add("b")
        self.add("c", requires=("a",))
        started = self.sup.startService()
        ready = self.sup.when_ready()
        self.assertEqual(self.journal, ["start a"])
        self.assertEqual(self.states(), {"a": S.STARTING, "b": S.STOPPED, "c": S.STOPPED})
        self.assertNoResult(started)
        self.assertNoResult(ready)
        self.assertIsNone(self.sup.service("a"))
        a.latest.make_ready()
        self.assertEqual(self.journal, ["start a", "start b", "start c"])
        self.assertEqual(self.states(), {"a": S.RUNNING, "b": S.RUNNING, "c": S.RUNNING})
        self.assertIsNone(self.successResultOf(started))
        self.assertIsNone(self.successResultOf(ready))
        self.assertIs(self.sup.service("a"), a.latest)

    def test_start_order_follows_requirements(self) -> None:
        """Children start in topological order of requires."""
        self.add("bus")
        self.add("store", requires=("bus",))
        self.add("mdns")
        self.add("api", requires=("store", "mdns"))
        self.sup.startService()
        self.assertEqual(self.journal, ["start bus", "start store", "start mdns", "start api"])

    def test_start_deferred_holds_next(self) -> None:
        """A startService Deferred that has not fired holds back the next child."""
        a = self.add("a", start="deferred")
        self.add("b")
        self.sup.startService()
        self.assertEqual(self.journal, ["start a"])
        a.latest.finish_start()
        self.assertEqual(self.journal, ["start a", "start b"])

    def test_plain_service_child(self) -> None:
        """A child without ISupervisedService is ready once startService returns."""
        self.sup.add_child(ChildSpec("plain", Service))
        self.successResultOf(self.sup.startService())
        self.assertEqual(self.state("plain"), S.RUNNING)
        svc = self.sup.service("plain")
        assert svc is not None
        self.assertTrue(svc.running)

    def test_start_does_not_block(self) -> None:
        """startService returns at once with a Deferred even if nothing gets ready."""
        self.add("a", start="pending")
        started = self.sup.startService()
        self.assertIsInstance(started, Deferred)
        self.assertNoResult(started)

    def test_start_timeout_is_failed_start(self) -> None:
        """A child not ready within start_timeout is stopped and backs off; the next starts."""
        a = self.add("a", start="pending", start_timeout=5)
        self.add("b")
        self.sup.startService()
        self.clock.advance(4.9)
        self.assertEqual(self.state("a"), S.STARTING)
        self.clock.advance(0.1)
        self.assertEqual(self.state("a"), S.BACKOFF)
        self.assertTrue(a.instances[0].stopped)
        self.assertEqual(self.state("b"), S.RUNNING)
        self.assertEqual(self.sup.child("a").last_error, "not ready within 5s")
        self.assertEqual(self.sup.child("a").restarts, 1)

    def test_failed_start_follows_policy_and_dependents_wait(self) -> None:
        """A failed start backs off and retries; a dependent waits stopped meanwhile."""
        a = self.add("a")
        a.plan(start="fail")
        self.add("b", requires=("a",))
        started = self.sup.startService()
        self.assertEqual(self.states(), {"a": S.BACKOFF, "b": S.STOPPED})
        self.assertIn("cannot start", self.sup.child("a").last_error or "")
        self.assertNoResult(started)
        self.clock.advance(1)
        self.assertEqual(self.states(), {"a": S.RUNNING, "b": S.RUNNING})
        self.assertEqual(len(a.instances), 2)
        self.assertTrue(a.instances[0].stopped)
        self.successResultOf(started)

    def test_when_ready_failure_is_failed_start(self) -> None:
        """A failing when_ready is a failed start."""
        a = self.add("a")
        a.plan(start="fail-ready")
        self.sup.startService()
        self.assertEqual(self.state("a"), S.BACKOFF)
        self.assertIn("is not ready", self.sup.child("a").last_error or "")

    def test_factory_error_is_failed_start(self) -> None:
        """A factory that raises or returns a non-service is a failed start."""
        a = self.add("a")
        a.build_error = RuntimeError("no config")
        self.sup.add_child(ChildSpec("b", lambda: object(), backoff=BACKOFF))  # type: ignore[arg-type,return-value]
        self.sup.startService()
        self.assertEqual(self.state("a"), S.BACKOFF)
        self.assertEqual(self.sup.child("a").last_error, "cannot build: RuntimeError: no config")
        self.assertEqual(self.state("b"), S.BACKOFF)
        self.assertIn("does not provide IService", self.sup.child("b").last_error or "")
        a.build_error = None
        self.clock.advance(1)
        self.assertEqual(self.state("a"), S.RUNNING)

    def test_crash_while_starting(self) -> None:
        """An instance that crashes during startService is restarted after backoff."""
        a = self.add("a")
        a.plan(start="crash")
        self.sup.startService()
        self.assertEqual(self.state("a"), S.BACKOFF)
        self.clock.advance(1)
        self.assertEqual(self.state("a"), S.RUNNING)
        self.assertEqual(a.max_live, 1)

    def test_add_child_after_start(self) -> None:
        """A child added while running is started, after its requirements."""
        a = self.add("a", start="pending")
        self.sup.startService()
        self.add("b", requires=("a",))
        self.assertEqual(self.state("b"), S.STOPPED)
        a.latest.make_ready()
        self.assertEqual(self.state("b"), S.RUNNING)
        self.add("c")
        self.assertEqual(self.state("c"), S.RUNNING)

    def test_start_twice_is_harmless(self) -> None:
        """A second startService does not start children again."""
        a = self.add("a")
        self.sup.startService()
        self.successResultOf(self.sup.startService())
        self.assertEqual(len(a.instances), 1)

    def test_restart_supervisor_after_stop(self) -> None:
        """After stop, start builds fresh instances and resets failed children."""
        a = self.add("a", intensity=0)
        self.sup.startService()
        a.latest.crash()
        self.assertEqual(self.state("a"), S.FAILED)
        self.successResultOf(self.sup.stopService())
        self.successResultOf(self.sup.startService())
        self.assertEqual(self.state("a"), S.RUNNING)
        self.assertEqual(len(a.instances), 2)

    def test_start_while_stopping_waits(self) -> None:
        """startService during a stop in progress starts once the stop is over."""
        a = self.add("a", stop="hang")
        self.sup.startService()
        stopping = self.sup.stopService()
        started = self.sup.startService()
        self.assertNoResult(started)
        a.latest.finish_stop()
        self.successResultOf(stopping)
        self.successResultOf(started)
        self.assertEqual(self.state("a"), S.RUNNING)
        self.assertEqual(a.max_live, 1)


class ReadinessTests(SupervisorTestCase):
    def test_optional_child_does_not_hold_readiness(self) -> None:
        """when_ready needs required children only; an optional one in backoff does not count."""
        self.add("core")
        opt = self.add("optional", required=False)
        opt.plan(start="fail")
        ready = self.sup.when_ready()
        self.sup.startService()
        self.assertEqual(self.state("optional"), S.BACKOFF)
        self.successResultOf(ready)
        self.assertTrue(self.health.ready())

    def test_ready_waits_for_required_backoff(self) -> None:
        """A required child in backoff holds readiness until it runs."""
        a = self.add("a")
        a.plan(start="fail")
        ready = self.sup.when_ready()
        self.sup.startService()
        self.assertNoResult(ready)
        self.assertFalse(self.health.ready())
        self.clock.advance(1)
        self.successResultOf(ready)
        self.assertTrue(self.health.ready())

    def test_stop_before_ready_fails_waiters(self) -> None:
        """when_ready fails with NotReady if stopped first; startService's Deferred fires None."""
        self.add("a", start="pending")
        started = self.sup.startService()
        ready = self.sup.when_ready()
        self.sup.stopService()
        self.failureResultOf(ready, NotReady)
        self.assertIsNone(self.successResultOf(started))

    def test_when_ready_cancellable(self) -> None:
        """Cancelling a when_ready Deferred forgets it."""
        self.add("a", start="pending")
        self.sup.startService()
        ready = self.sup.when_ready()
        ready.cancel()
        self.failureResultOf(ready)

    def test_completed_transient_satisfies(self) -> None:
        """A transient one-shot that exits normally satisfies readiness and its dependents."""
        job = self.add("migrate", restart=RestartPolicy.TRANSIENT, start="pending")
        self.add("store", requires=("migrate",))
        ready = self.sup.when_ready()
        self.sup.startService()
        job.latest.make_ready()
        self.assertEqual(self.state("store"), S.RUNNING)
        job.latest.exit()
        self.assertEqual(self.states(), {"migrate": S.STOPPED, "store": S.RUNNING})
        self.successResultOf(ready)
        self.assertEqual(self.health.component("child:migrate").level, HealthLevel.OK)

    def test_notifier_ready_and_stopping(self) -> None:
        """The notifier gets READY=1 when ready, STOPPING=1 at stop, and watchdog pings between."""
        notifier = RecordingNotifier(self.clock, "/run/notify", 2_000_000)
        sup = Supervisor(self.clock, notifier=notifier, rand=lambda: 0.5)
        f = FakeServiceFactory("a", self.clock, start="pending")
        sup.add_child(ChildSpec("a", f))
        sup.startService()
        self.assertEqual(notifier.lines, ["WATCHDOG=1"])
        self.clock.advance(1)
        f.latest.make_ready()
        self.assertEqual(
            notifier.lines, ["WATCHDOG=1", "WATCHDOG=1", "READY=1\nSTATUS=1/1 children running"]
        )
        del notifier.lines[:]
        self.successResultOf(sup.stopService())
        self.assertEqual(notifier.lines, ["STOPPING=1\nSTATUS=stopping"])
        self.clock.advance(10)
        self.assertEqual(len(notifier.lines), 1)
        self.assertFalse(notifier.watchdog_running)


class StopTests(SupervisorTestCase):
    def test_reverse_stop(self) -> None:
        """stopService stops children in reverse start order."""
        self.add("bus")
        self.add("store", requires=("bus",))
        self.add("api", requires=("store",))
        self.sup.startService()
        del self.journal[:]
        self.successResultOf(self.sup.stopService())
        self.assertEqual(self.journal, ["stop api", "stop store", "stop bus"])
        self.assertEqual(set(self.states().values()), {S.STOPPED})
        self.assertFalse(self.sup.running)

    def test_stop_waits_for_each_child(self) -> None:
        """The next child stops only after the previous one finished stopping."""
        self.add("a")
        b = self.add("b", stop="hang")
        self.sup.startService()
        del self.journal[:]
        d = self.sup.stopService()
        self.assertEqual(self.journal, ["stop b"])
        self.assertEqual(self.state("a"), S.STOPPING)
        b.latest.finish_stop()
        self.assertEqual(self.journal, ["stop b", "stop a"])
        self.successResultOf(d)

    def test_stop_timeout_abandons_and_continues(self) -> None:
        """A child that never stops is abandoned after stop_timeout and the stop completes."""
        self.add("a")
        self.add("b", stop="hang", stop_timeout=3)
        self.sup.startService()
        with capturedLogs() as events:
            d = self.sup.stopService()
            self.clock.advance(2.9)
            self.assertNoResult(d)
            self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(self.states(), {"a": S.STOPPED, "b": S.STOPPED})
        abandoned = [e for e in events if "abandoning" in e["log_format"]]
        self.assertEqual([e["child"] for e in abandoned], ["b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_error_is_logged_and_stop_continues(self) -> None:
        """A child whose stopService fails is logged; the others still stop."""
        self.add("a")
        self.add("b", stop="fail")
        self.sup.startService()
        self.successResultOf(self.sup.stopService())
        self.assertEqual(self.journal[-2:], ["stop b", "stop a"])

    def test_stop_idempotent_and_cancels_timers(self) -> None:
        """Stopping twice is fine and leaves no timer (backoff, health, stability) behind."""
        f = self.add("a", health_check=lambda: True, health_interval=1)
        g = self.add("b")
        g.plan(start="fail")
        self.sup.startService()
        self.assertEqual(self.state("b"), S.BACKOFF)
        self.assertTrue(self.clock.getDelayedCalls())
        d1 = self.sup.stopService()
        d2 = self.sup.stopService()
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.successResultOf(self.sup.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.states(), {"a": S.STOPPED, "b": S.STOPPED})
        self.assertEqual(f.max_live, 1)

    def test_no_restart_during_or_after_stop(self) -> None:
        """A crash during stop is not restarted, and nothing restarts afterwards."""
        a = self.add("a")
        self.add("b", stop="hang")
        self.sup.startService()
        d = self.sup.stopService()
        a.latest.crash()
        self.clock.advance(100)
        self.successResultOf(d)
        self.clock.advance(100)
        self.assertEqual(len(a.instances), 1)
        self.assertEqual(self.states(), {"a": S.STOPPED, "b": S.STOPPED})

    def test_stop_aborts_pending_start(self) -> None:
        """stopService during a pending start stops that instance and starts nothing else."""
        a = self.add("a", start="pending")
        self.add("b")
        self.sup.startService()
        self.successResultOf(self.sup.stopService())
        a.latest.make_ready()
        self.assertEqual(self.states(), {"a": S.STOPPED, "b": S.STOPPED})
        self.assertEqual(self.journal, ["start a", "stop a"])

    def test_failed_child_stays_failed_through_stop(self) -> None:
        """A failed child is reported failed after stop too."""
        a = self.add("a", intensity=0)
        self.sup.startService()
        a.latest.crash()
        self.successResultOf(self.sup.stopService())
        self.assertEqual(self.state("a"), S.FAILED)


class RestartPolicyTests(SupervisorTestCase):
    def test_permanent_restarts_after_crash_and_normal_exit(self) -> None:
        """A permanent child is restarted after a crash and after a normal exit."""
        a = self.add("a")
        self.sup.startService()
        a.latest.crash()
        self.assertEqual(self.state("a"), S.BACKOFF)
        self.clock.advance(1)
        self.assertEqual(self.state("a"), S.RUNNING)
        a.latest.exit()
        self.assertEqual(self.state("a"), S.BACKOFF)
        self.clock.advance(2)
        self.assertEqual(self.state("a"), S.RUNNING)
        self.assertEqual(len(a.instances), 3)
        self.assertEqual(self.sup.child("a").restarts, 2)
        self.assertEqual(a.max_live, 1)
        self.assertEqual(a.violations, [])

    def test_transient_restarts_only_after_crash(self) -> None:
        """A transient child is restarted after a crash but not after a normal exit."""
        a = self.add("a", restart=RestartPolicy.TRANSIENT)
        self.sup.startService()
        a.latest.crash(FakeServiceError("oops"))
        self.assertEqual(self.state("a"), S.BACKOFF)
        self.assertEqual(self.sup.child("a").last_error, "crashed: FakeServiceError: oops")
        self.clock.advance(1)
        self.assertEqual(self.state("a"), S.RUNNING)
        a.latest.exit()
        self.assertEqual(self.state("a"), S.STOPPED)
        self.clock.advance(100)
        self.assertEqual(len(a.instances), 2)
        self.assertEqual(self.health.component("child:a").message, "finished")

    def test_temporary_never_restarts(self) -> None:
        """A temporary child ends stopped after a normal exit and failed after a crash."""
        a = self.add("a", restart=RestartPolicy.TEMPORARY)
        b = self.add("b", restart=RestartPolicy.TEMPORARY)
        self.sup.startService()
        a.latest.exit()
        b.latest.crash()
        self.clock.advance(100)
        self.assertEqual(self.states(), {"a": S.STOPPED, "b": S.FAILED})
        self.assertEqual((len(a.instances), len(b.instances)), (1, 1))
        self.assertTrue(a.latest.stopped and b.latest.stopped)

    def test_temporary_failed_start_fails(self) -> None:
        """A temporary child whose start fails is failed, not retried."""
        a = self.add("a", restart=RestartPolicy.TEMPORARY)
        a.plan(start="fail")
        self.sup.startService()
        self.clock.advance(100)
        self.assertEqual(self.state("a"), S.FAILED)
        self.assertEqual(len(a.instances), 1)

    def test_old_instance_stopped_before_new_built(self) -> None:
        """A restart stops the old instance (bounded) before building the new one."""
        a = self.add("a", stop="hang", stop_timeout=5)
        self.sup.startService()
        first = a.latest
        first.crash()
        self.assertEqual(self.state("a"), S.STOPPING)
        self.clock.advance(60)
        self.assertEqual(len(a.instances), 1)
        first.finish_stop()
        self.assertEqual(self.state("a"), S.BACKOFF)
        self.clock.advance(1)
        self.assertEqual(len(a.instances), 2)
        self.assertEqual(a.max_live, 1)

    def test_stop_timeout_during_restart(self) -> None:
        """An old instance that does not stop in time is abandoned and the restart proceeds."""
        a = self.add("a", stop="hang", stop_timeout=5)
        self.sup.startService()
        a.latest.crash()
        self.clock.advance(5)
        self.assertEqual(self.state("a"), S.BACKOFF)
        self.clock.advance(1)
        self.assertEqual(self.state("a"), S.RUNNING)
        self.assertEqual(len(a.instances), 2)
        a.latest.finish_stop()  # let cleanup stop the new one

    def test_restart_not_held_by_other_pending_start(self) -> None:
        """A restart after backoff proceeds while another child's start is still pending."""
        a = self.add("a")
        slow = self.add("slow", start="pending", start_timeout=1000)
        self.sup.startService()
        self.assertEqual(self.states(), {"a": S.RUNNING, "slow": S.STARTING})
        a.latest.crash()
        self.clock.advance(1)
        self.assertEqual(self.states(), {"a": S.RUNNING, "slow": S.STARTING})
        slow.latest.make_ready()
        self.assertEqual(self.state("slow"), S.RUNNING)

    def test_dependents_keep_running_through_requirement_restart(self) -> None:
        """A dependent is not stopped when its requirement merely restarts."""
        a = self.add("a")
        b = self.add("b", requires=("a",))
        self.sup.startService()
        a.latest.crash()
        self.clock.advance(1)
        self.assertEqual(self.states(), {"a": S.RUNNING, "b": S.RUNNING})
        self.assertEqual(len(b.instances), 1)


class BackoffTests(SupervisorTestCase):
    def crash_and_measure(self, f: FakeServiceFactory) -> float:
        """Crash the child and return how long it stays in backoff."""
        f.latest.crash()
        self.assertEqual(self.state(f.name), S.BACKOFF)
        waited = 0.0
        while self.state(f.name) is S.BACKOFF:
            self.clock.advance(0.25)
            waited += 0.25
        self.assertEqual(self.state(f.name), S.RUNNING)
        return waited

    def test_exponential_delays(self) -> None:
        """Consecutive restarts wait initial * factor**n, capped at maximum."""
        a = self.add("a", intensity=100, stable_after=1000)
        self.sup.startService()
        delays = [self.crash_and_measure(a) for _ in range(5)]
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 8.0])

    def test_jitter_from_rand(self) -> None:
        """The delay uses the injected rand() for jitter."""
        sup = Supervisor(self.clock, rand=lambda: 0.0)
        f = FakeServiceFactory("a", self.clock)
        sup.add_child(ChildSpec("a", f, backoff=Backoff(initial=2, jitter=0.5)))
        sup.startService()
        f.latest.crash()
        self.clock.advance(0.99)
        self.assertEqual(sup.child("a").state, S.BACKOFF)
        self.clock.advance(0.01)
        self.assertEqual(sup.child("a").state, S.RUNNING)
        self.successResultOf(sup.stopService())

    def test_backoff_resets_after_stable_period(self) -> None:
        """After stable_after seconds of running, the next restart waits the initial delay again."""
        a = self.add("a", intensity=100, stable_after=30)
        self.sup.startService()
        self.assertEqual([self.crash_and_measure(a) for _ in range(3)], [1.0, 2.0, 4.0])
        self.clock.advance(29)
        self.assertEqual(self.crash_and_measure(a), 8.0)
        self.clock.advance(30)
        self.assertEqual(self.crash_and_measure(a), 1.0)

    def test_huge_attempt_counts_do_not_overflow(self) -> None:
        """Thousands of restarts without a stable period keep the capped delay."""
        a = self.add("a", intensity=10**6, period=1, stable_after=10**6)
        self.sup.startService()
        for _ in range(1100):
            a.latest.crash()
            self.clock.advance(8)
        self.assertEqual(self.state("a"), S.RUNNING)
        self.assertEqual(self.sup.child("a").restarts, 1100)
        self.assertEqual(a.max_live, 1)


class IntensityTests(SupervisorTestCase):
    def test_too_many_restarts_fail_the_child(self) -> None:
        """More than intensity restarts within period marks the child failed; no more restarts."""
        a = self.add("a", intensity=2, period=60, stable_after=1000)
        self.sup.startService()
        for delay in (1, 2):
            a.latest.crash()
            self.clock.advance(delay)
            self.assertEqual(self.state("a"), S.RUNNING)
        a.latest.crash()
        self.assertEqual(self.state("a"), S.FAILED)
        status = self.sup.child("a")
        self.assertEqual(status.restarts, 2)
        self.assertIn("restart intensity exceeded", status.last_error or "")
        self.clock.advance(1000)
        self.assertEqual(len(a.instances), 3)
        self.assertEqual(self.health.component("child:a").level, HealthLevel.ERROR)
        self.assertFalse(self.health.ready())

    def test_restarts_outside_period_do_not_count(self) -> None:
        """Restarts older than period fall out of the intensity window."""
        a = self.add("a", intensity=2, period=10, stable_after=1000)
        self.sup.startService()
        for _ in range(10):
            a.latest.crash()
            self.clock.advance(11)
            self.assertEqual(self.state("a"), S.RUNNING)

    def test_zero_intensity_fails_at_first_exit(self) -> None:
        """intensity=0 allows no restart at all."""
        a = self.add("a", intensity=0)
        self.sup.startService()
        a.latest.crash()
        self.assertEqual(self.state("a"), S.FAILED)

    def test_failed_child_stops_dependents_transitively(self) -> None:
        """Every child that (transitively) requires a failed child is stopped, in reverse order."""
        a = self.add("a", intensity=0)
        self.add("b", requires=("a",))
        self.add("c", requires=("b",))
        self.add("d")
        self.sup.startService()
        del self.journal[:]
        a.latest.crash()
        self.assertEqual(
            self.states(), {"a": S.FAILED, "b": S.STOPPED, "c": S.STOPPED, "d": S.RUNNING}
        )
        self.assertEqual(self.journal, ["stop a", "stop c", "stop b"])
        self.assertEqual(self.sup.child("b").last_error, "requirement 'a' failed")
        self.assertEqual(self.sup.child("c").last_error, "requirement 'a' failed")
        self.assertEqual(self.health.component("child:c").level, HealthLevel.ERROR)
        self.clock.advance(1000)
        self.assertEqual(self.state("c"), S.STOPPED)

    def test_dependent_in_backoff_is_stopped(self) -> None:
        """A dependent waiting in backoff when its requirement fails ends stopped."""
        a = self.add("a", intensity=0)
        b = self.add("b", requires=("a",))
        self.sup.startService()
        b.latest.crash()
        self.assertEqual(self.state("b"), S.BACKOFF)
        a.latest.crash()
        self.assertEqual(self.states(), {"a": S.FAILED, "b": S.STOPPED})
        self.clock.advance(100)
        self.assertEqual(self.state("b"), S.STOPPED)

    def test_dependents_stopped_while_requirement_stop_hangs(self) -> None:
        """Dependents are marked stopping at once and never run while a requirement is failed."""
        a = self.add("a", intensity=0)
        self.add("b", requires=("a",), stop="hang", stop_timeout=5)
        self.add("c", requires=("b",))
        self.sup.startService()
        a.latest.crash()
        self.assertEqual(self.states(), {"a": S.FAILED, "b": S.STOPPING, "c": S.STOPPED})
        self.clock.advance(5)
        self.assertEqual(self.states(), {"a": S.FAILED, "b": S.STOPPED, "c": S.STOPPED})


class RestartChildTests(SupervisorTestCase):
    def test_restart_failed_child_resets_and_restarts_dependents(self) -> None:
        """restart_child resets a failed child, starts it, then its stopped dependents."""
        a = self.add("a", intensity=1, period=60)
        b = self.add("b", requires=("a",))
        self.sup.startService()
        a.latest.crash()
        self.clock.advance(1)
        a.latest.crash()
        self.assertEqual(self.states(), {"a": S.FAILED, "b": S.STOPPED})
        self.assertEqual(self.sup.child("a").restarts, 1)
        status = self.successResultOf(self.sup.restart_child("a"))
        self.assertIsInstance(status, ChildStatus)
        self.assertEqual((status.state, status.restarts), (S.RUNNING, 0))
        self.assertEqual(self.states(), {"a": S.RUNNING, "b": S.RUNNING})
        self.assertEqual((len(a.instances), len(b.instances)), (3, 2))
        # The history was cleared: one crash is allowed again.
        a.latest.crash()
        self.clock.advance(1)
        self.assertEqual(self.state("a"), S.RUNNING)

    def test_restart_running_child(self) -> None:
        """restart_child stops the running instance, then starts a new one at once."""
        a = self.add("a")
        self.sup.startService()
        first = a.latest
        d = self.sup.restart_child("a")
        self.assertTrue(first.stopped)
        self.assertEqual(self.successResultOf(d).state, S.RUNNING)
        self.assertIsNot(a.latest, first)
        self.assertEqual(a.max_live, 1)
        self.assertEqual(self.sup.child("a").restarts, 0)

    def test_restart_child_in_backoff_skips_delay(self) -> None:
        """restart_child of a child in backoff starts it now."""
        a = self.add("a")
        self.sup.startService()
        a.latest.crash()
        self.assertEqual(self.state("a"), S.BACKOFF)
        self.successResultOf(self.sup.restart_child("a"))
        self.assertEqual(self.state("a"), S.RUNNING)

    def test_restart_child_start_failure(self) -> None:
        """restart_child fails with SubsystemFailed when the new start fails."""
        a = self.add("a")
        self.sup.startService()
        a.plan(start="fail")
        self.failureResultOf(self.sup.restart_child("a"), SubsystemFailed)
        self.assertEqual(self.state("a"), S.BACKOFF)

    def test_restart_child_pending_until_ready(self) -> None:
        """restart_child fires only when the new instance is ready."""
        a = self.add("a")
        self.sup.startService()
        a.plan(start="pending")
        d = self.sup.restart_child("a")
        self.assertNoResult(d)
        a.latest.make_ready()
        self.successResultOf(d)

    def test_restart_child_refusals(self) -> None:
        """restart_child fails NotReady when not running and Conflict when a requirement failed."""
        a = self.add("a", intensity=0)
        self.add("b", requires=("a",))
        self.failureResultOf(self.sup.restart_child("a"), NotReady)
        self.sup.startService()
        a.latest.crash()
        self.failureResultOf(self.sup.restart_child("b"), Conflict)

    def test_stop_fails_pending_restart(self) -> None:
        """A restart_child still pending when the supervisor stops fails with NotReady."""
        a = self.add("a")
        self.sup.startService()
        a.plan(start="pending")
        d = self.sup.restart_child("a")
        self.sup.stopService()
        self.failureResultOf(d, NotReady)


class ChildFailedTests(SupervisorTestCase):
    def test_child_failed_restarts(self) -> None:
        """child_failed applies the restart policy as for a crash."""
        a = self.add("a")
        self.sup.startService()
        self.sup.child_failed("a", "probe says dead")
        self.assertEqual(self.state("a"), S.BACKOFF)
        self.assertEqual(self.sup.child("a").last_error, "reported failed: probe says dead")
        self.assertTrue(a.instances[0].stopped)
        self.clock.advance(1)
        self.assertEqual(self.state("a"), S.RUNNING)

    def test_child_failed_ignored_when_not_running(self) -> None:
        """child_failed for a child that is not starting or running changes nothing."""
        self.add("a")
        self.sup.child_failed("a", "late report")
        self.assertEqual(self.state("a"), S.STOPPED)
        self.assertEqual(self.transitions("a"), [])


class HealthCheckTests(SupervisorTestCase):
    def test_restart_after_k_misses(self) -> None:
        """max_misses consecutive failed checks restart the child."""
        a = self.add("a", health_check=None)
        f = FakeServiceFactory("h", self.clock)
        self.sup.add_child(
            ChildSpec(
                "h", f, health_check=f.check, health_interval=5, max_misses=3, backoff=BACKOFF
            )
        )
        self.sup.startService()
        self.clock.advance(5)
        self.assertEqual(f.checks, 1)
        f.healthy = False
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.state("h"), S.RUNNING)
        self.assertIn("missed 2/3", self.health.component("child:h").message)
        self.clock.advance(5)
        self.assertEqual(self.state("h"), S.BACKOFF)
        self.assertIn("health check missed 3 times", self.sup.child("h").last_error or "")
        f.healthy = True
        self.clock.advance(1)
        self.assertEqual(self.state("h"), S.RUNNING)
        self.assertEqual(len(f.instances), 2)
        self.assertEqual(len(a.instances), 1)

    def test_success_resets_misses(self) -> None:
        """A passing check resets the miss count."""
        f = FakeServiceFactory("h", self.clock)
        self.sup.add_child(ChildSpec("h", f, health_check=f.check, health_interval=1, max_misses=2))
        self.sup.startService()
        for healthy in (False, True, False, True, False, True):
            f.healthy = healthy
            self.clock.advance(1)
        self.assertEqual(self.state("h"), S.RUNNING)
        self.assertEqual(len(f.instances), 1)

    def test_timeout_and_exception_are_misses(self) -> None:
        """A check that hangs past health_timeout or raises counts as a miss."""
        f = FakeServiceFactory("h", self.clock)
        self.sup.add_child(
            ChildSpec(
                "h",
                f,
                health_check=f.check,
                health_interval=1,
                health_timeout=2,
                max_misses=2,
                backoff=BACKOFF,
            )
        )
        self.sup.startService()
        f.healthy = "hang"
        self.clock.advance(1)
        self.clock.advance(2)
        self.assertIn("no answer within 2s", self.health.component("child:h").message)
        f.healthy = "raise"
        self.clock.advance(1)
        self.assertEqual(self.state("h"), S.BACKOFF)
        self.assertIn("health check raised", self.sup.child("h").last_error or "")

    def test_coroutine_check(self) -> None:
        """A coroutine health check is awaited."""
        f = FakeServiceFactory("h", self.clock)
        answers = [False]

        async def check() -> bool:
            return answers[0]

        self.sup.add_child(
            ChildSpec("h", f, health_check=check, health_interval=1, max_misses=1, backoff=BACKOFF)
        )
        self.sup.startService()
        self.clock.advance(1)
        self.assertEqual(self.state("h"), S.BACKOFF)

    def test_no_checks_while_not_running(self) -> None:
        """Health checks run only while the child is running."""
        f = FakeServiceFactory("h", self.clock, start="pending")
        self.sup.add_child(ChildSpec("h", f, health_check=f.check, health_interval=1))
        self.sup.startService()
        self.clock.advance(10)
        self.assertEqual(f.checks, 0)


class EventsAndHealthTests(SupervisorTestCase):
    def test_child_state_events(self) -> None:
        """Every state change publishes ChildStateChanged with restarts and error."""
        a = self.add("a")
        self.sup.startService()
        a.latest.crash(FakeServiceError("x"))
        self.clock.advance(1)
        events = [e for e in self.bus.events("supervisor.child_state") if e.child == "a"]
        self.assertEqual(
            events,
            [
                ChildStateChanged("a", S.STARTING, S.STOPPED, 0, None),
                ChildStateChanged("a", S.RUNNING, S.STARTING, 0, None),
                ChildStateChanged("a", S.STOPPING, S.RUNNING, 1, "crashed: FakeServiceError: x"),
                ChildStateChanged("a", S.BACKOFF, S.STOPPING, 1, "crashed: FakeServiceError: x"),
                ChildStateChanged("a", S.STARTING, S.BACKOFF, 1, "crashed: FakeServiceError: x"),
                ChildStateChanged("a", S.RUNNING, S.STARTING, 1, "crashed: FakeServiceError: x"),
            ],
        )
        self.assertTrue(all(type(e).retained for e in events))

    def test_health_components_per_state(self) -> None:
        """A child is reported as child:<name>: running ok, backoff warn, failed error."""
        a = self.add("a", start="pending", intensity=1)
        self.add("opt", required=False, start="pending")

        def level(name: str) -> HealthLevel:
            return self.health.component(f"child:{name}").level

        self.assertEqual(level("a"), HealthLevel.WARN)
        self.sup.startService()
        self.assertEqual(level("a"), HealthLevel.WARN)
        self.assertEqual(self.health.component("child:a").message, "starting")
        a.latest.make_ready()
        self.assertEqual(level("a"), HealthLevel.OK)
        self.assertTrue(self.health.component("child:a").required)
        self.assertFalse(self.health.component("child:opt").required)
        self.assertEqual([c.component for c in self.health.not_ready()], [])
        a.latest.crash()
        self.assertEqual(level("a"), HealthLevel.WARN)
        self.assertIn("restarting after", self.health.component("child:a").message)
        self.clock.advance(1)
        a.latest.make_ready()
        a.latest.crash()
        self.assertEqual(level("a"), HealthLevel.ERROR)
        self.assertEqual([c.component for c in self.health.not_ready()], ["child:a"])

    def test_waiting_message_names_requirements(self) -> None:
        """A child waiting for requirements says which."""
        self.add("a", start="pending")
        self.add("b", requires=("a",))
        self.sup.startService()
        self.assertEqual(self.health.component("child:b").message, "waiting for a")

    def test_transitions_logged_with_fields(self) -> None:
        """Each transition is logged with child, state and restarts fields."""
        with capturedLogs() as events:
            self.add("a")
            self.sup.startService()
        moves = [
            (e["child"], e["state"], e["restarts"])
            for e in events
            if "previous" in e and "state" in e
        ]
        self.assertEqual(moves, [("a", "starting", 0), ("a", "running", 0)])

    def test_stats(self) -> None:
        """stats() counts starts, restarts and abandoned stops per child."""
        a = self.add("a", stop="hang", stop_timeout=2)
        self.add("b", required=False)
        self.sup.startService()
        a.latest.crash()
        self.clock.advance(2)
        self.clock.advance(1)
        stats = self.sup.stats()
        self.assertEqual((stats["running"], stats["ready"]), (True, True))
        self.assertEqual(
            stats["children"][0],
            {
                "name": "a",
                "state": "running",
                "restarts": 1,
                "starts": 2,
                "abandoned": 1,
                "health_misses": 0,
                "required": True,
            },
        )
        a.latest.finish_stop()

    def test_works_without_bus_and_health(self) -> None:
        """A bare supervisor (no bus, no health) runs and restarts children."""
        sup = Supervisor(self.clock, rand=lambda: 0.5)
        f = FakeServiceFactory("a", self.clock)
        sup.add_child(ChildSpec("a", f, backoff=BACKOFF))
        sup.startService()
        f.latest.crash()
        self.clock.advance(1)
        self.assertEqual(sup.child("a").state, S.RUNNING)
        self.successResultOf(sup.stopService())


class DescribeTests(SynchronousTestCase):
    def test_describe(self) -> None:
        """describe() renders strings, exceptions and typed errors on one line."""
        self.assertEqual(describe("x"), "x")
        self.assertEqual(describe(ValueError("bad")), "ValueError: bad")
        self.assertEqual(describe(ValueError()), "ValueError")
        self.assertEqual(describe(NotReady("later")), "NotReady: later")


class StopStartRaceTests(SupervisorTestCase):
    def test_stop_after_pending_start_wins(self) -> None:
        """start then stop, both during a stop in progress: the supervisor ends stopped."""
        a = self.add("a", stop="hang", stop_timeout=3)
        self.sup.startService()
        first = self.sup.stopService()
        started = self.sup.startService()
        second = self.sup.stopService()
        self.clock.advance(3)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertIsNone(self.successResultOf(started))
        self.assertFalse(self.sup.running)
        self.assertEqual(len(a.instances), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failed_transitive_requirement_behind_finished_one_shot(self) -> None:
        """A child stays stopped when a requirement of its finished one-shot requirement fails."""
        a = self.add("a", restart=RestartPolicy.TEMPORARY)
        b = self.add("b", requires=("a",), restart=RestartPolicy.TRANSIENT)
        self.add("c", requires=("b",))
        self.sup.startService()
        b.latest.exit()
        self.assertEqual(self.states(), {"a": S.RUNNING, "b": S.STOPPED, "c": S.RUNNING})
        self.sup.child_failed("a", "probe")
        self.clock.advance(100)
        self.assertEqual(self.states(), {"a": S.FAILED, "b": S.STOPPED, "c": S.STOPPED})
        self.assertEqual(self.sup.child("c").last_error, "requirement 'a' failed")
        self.assertEqual(len(a.instances), 1)
