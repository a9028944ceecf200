"""Tests for piccolod.kernel.telemetry: reactor lag, sampling jobs, health escalation."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.events import ChildState, HealthLevel, Telemetry
from piccolod.interfaces import ChildSpec, Overflow
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.jobs import JobRunner
from piccolod.kernel.supervisor import Supervisor
from piccolod.kernel.telemetry import (
    HealthEscalator,
    ReactorLagMonitor,
    TelemetrySampler,
    process_figures,
)
from piccolod.testing.services import FakeServiceFactory


class LagTests(SynchronousTestCase):
    def test_lag_is_how_late_the_probe_ran(self) -> None:
        """A probe that runs 0.3 s late reports 0.3 s of lag; the worst is kept."""
        clock = Clock()
        lag = ReactorLagMonitor(clock, interval=0.5)
        lag.startService()
        clock.advance(0.5)
        self.assertEqual(lag.last, 0.0)
        clock.advance(0.8)  # the reactor was blocked: the probe runs late
        self.assertAlmostEqual(lag.last, 0.3)
        clock.advance(0.5)
        self.assertEqual(lag.last, 0.0)
        self.assertAlmostEqual(lag.worst, 0.3)
        lag.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class SamplerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryEventBus(self.clock)
        self.health = HealthTracker(self.clock, self.bus)
        self.jobs = JobRunner(self.clock, self.bus)
        self.lag = ReactorLagMonitor(self.clock, interval=0.5)
        self.sampler = TelemetrySampler(
            self.jobs,
            self.bus,
            self.health,
            self.lag,
            interval=10.0,
            sample=lambda: {"rss_bytes": 1000.0},
        )
        self.jobs.startService()
        self.lag.startService()
        self.sampler.startService()

    def tearDown(self) -> None:
        self.sampler.stopService()
        self.lag.stopService()
        self.jobs.stopService()
        self.clock.advance(30)

    def test_samples_run_as_periodic_jobs(self) -> None:
        """A telemetry job runs at start and every interval, publishing a retained sample."""
        self.clock.advance(0)
        self.assertEqual(self.sampler.samples, 1)
        self.clock.pump([0.5] * 20)
        self.assertEqual(self.sampler.samples, 2)
        last = self.bus.last(Telemetry.topic, "kernel")
        assert last is not None
        figures = dict(last.event.figures)
        self.assertEqual(figures["rss_bytes"], 1000.0)
        self.assertIn("bus_published", figures)
        ended = [j for j in self.jobs.jobs() if j.job_class == "telemetry"]
        self.assertGreaterEqual(len(ended), 2)
        self.assertEqual(self.health.component("kernel").level, HealthLevel.OK)

    def test_drops_and_lag_warn(self) -> None:
        """New bus drops or reactor lag above the threshold make the kernel warn."""
        self.bus.subscribe("x.#", lambda e: None, max_queue=1, overflow=Overflow.DROP_NEWEST)
        for _ in range(5):
            self.bus.publish(Telemetry(component="c"), topic="x.y")
        self.clock.advance(0)
        self.assertEqual(self.health.component("kernel").level, HealthLevel.WARN)
        self.assertIn("dropped", self.health.component("kernel").message)
        self.clock.pump([0.5] * 20)  # no new drops, no lag
        self.assertEqual(self.health.component("kernel").level, HealthLevel.OK)
        self.lag.last = 0.4
        self.sampler.take()
        self.assertIn("reactor lag 400 ms", self.health.component("kernel").message)

    def test_process_figures_are_real(self) -> None:
        """The process sampler reads this process's RSS, CPU time and open files."""
        figures = process_figures()
        self.assertGreater(figures["rss_bytes"], 1e6)
        self.assertGreater(figures["open_files"], 0)
        self.assertGreater(figures["cpu_seconds"], 0)


class EscalatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryEventBus(self.clock)
        self.health = HealthTracker(self.clock, self.bus)
        self.supervisor = Supervisor(self.clock, self.bus, self.health, rand=lambda: 0.5)
        self.factory = FakeServiceFactory(name="mdns")
        self.supervisor.add_child(ChildSpec(name="mdns", factory=self.factory))
        self.supervisor.startService()
        self.escalator = HealthEscalator(self.clock, self.bus, self.supervisor, grace=30.0)
        self.escalator.startService()
        self.clock.advance(0)

    def tearDown(self) -> None:
        self.escalator.stopService()
        self.supervisor.stopService()
        self.clock.advance(60)

    def restarts(self) -> int:
        return self.supervisor.child("mdns").restarts

    def test_error_past_grace_restarts_the_owner(self) -> None:
        """A component in error longer than the grace period restarts the child it belongs to."""
        self.health.report("mdns:127.0.0.1", HealthLevel.ERROR, "socket closed")
        self.clock.advance(0)
        self.clock.advance(29)
        self.assertEqual(self.restarts(), 0)
        self.clock.advance(1)
        self.clock.pump([1.0] * 5)
        self.assertEqual(self.restarts(), 1)
        self.assertEqual(self.escalator.escalations, 1)
        self.assertEqual(len(self.factory.instances), 2)
        self.assertEqual(self.supervisor.child("mdns").state, ChildState.RUNNING)

    def test_recovery_within_grace_cancels(self) -> None:
        """A component that recovers within the grace period is left alone."""
        self.health.report("mdns:127.0.0.1", HealthLevel.ERROR, "socket closed")
        self.clock.advance(10)
        self.health.report("mdns:127.0.0.1", HealthLevel.OK, "ok")
        self.clock.advance(60)
        self.assertEqual(self.restarts(), 0)

    def test_repeated_errors_keep_the_first_deadline(self) -> None:
        """New error messages do not push the deadline back."""
        self.health.report("mdns", HealthLevel.ERROR, "a")
        self.clock.advance(0)
        self.clock.advance(20)
        self.health.report("mdns", HealthLevel.ERROR, "b")
        self.clock.advance(0)
        self.clock.advance(10)
        self.clock.pump([1.0] * 5)
        self.assertEqual(self.restarts(), 1)

    def test_supervisor_components_and_unknown_owners_ignored(self) -> None:
        """child:* components and components without a child never escalate."""
        self.health.report("child:mdns", HealthLevel.ERROR, "x")
        self.health.report("nobody", HealthLevel.ERROR, "x")
        self.clock.advance(100)
        self.assertEqual(self.restarts(), 0)
        self.assertEqual(self.escalator.escalations, 0)

    def test_owner(self) -> None:
        """Component names map to their child."""
        self.assertEqual(HealthEscalator.owner("mdns:127.0.0.1"), "mdns")
        self.assertEqual(HealthEscalator.owner("persistence"), "persistence")
        self.assertIsNone(HealthEscalator.owner("child:api"))
        self.assertIsNone(HealthEscalator.owner("kernel"))
