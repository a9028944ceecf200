"""Tests for piccolod.kernel.metrics: /metrics text parsed by prometheus-client's parser."""

from __future__ import annotations

from typing import Any

import attrs
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import Command, CommandContext, Ping, Pong
from piccolod.errors import Conflict
from piccolod.events import AuditRecord
from piccolod.interfaces import ChildSpec
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.jobs import JobRunner, JobSpec
from piccolod.kernel.metrics import Histogram, KernelMetrics
from piccolod.kernel.supervisor import Supervisor
from piccolod.testing.services import FakeServiceFactory


@attrs.frozen
class Refused(Command):
    name = "test.refused"


def samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryEventBus(self.clock)
        self.health = HealthTracker(self.clock, self.bus)
        self.dispatcher = CommandDispatcher(self.clock, self.bus)
        self.jobs = JobRunner(self.clock, self.bus)
        self.supervisor = Supervisor(self.clock, self.bus, self.health)
        self.metrics = KernelMetrics.build(
            self.clock,
            bus=self.bus,
            dispatcher=self.dispatcher,
            jobs=self.jobs,
            supervisor=self.supervisor,
            health=self.health,
            lag=lambda: 0.125,
        )

    def scrape(self) -> dict[str, float]:
        return samples(self.metrics.render().decode())

    def test_bus_counters_move(self) -> None:
        """Published and delivered counters per topic follow the bus."""
        seen: list[Any] = []
        self.bus.subscribe("audit", seen.append)
        for _ in range(3):
            self.bus.publish(AuditRecord("d", "x", "admin", "ok"))
        self.clock.advance(0)
        m = self.scrape()
        self.assertEqual(m["piccolod_bus_published_total{topic=audit}"], 3)
        self.assertEqual(m["piccolod_bus_delivered_total{topic=audit}"], 3)
        self.assertEqual(len(seen), 3)

    def test_command_counts_and_histogram(self) -> None:
        """Command counts per outcome and latency histograms follow the dispatcher."""
        self.dispatcher.register(Ping, lambda c, ctx: Pong(c.payload))

        def refuse(c: Command, ctx: CommandContext) -> Any:
            raise Conflict("no")

        self.dispatcher.register(Refused, refuse)
        for _ in range(4):
            self.successResultOf(self.dispatcher.dispatch(Ping("x")))
        self.failureResultOf(self.dispatcher.dispatch(Refused()), Conflict)
        m = self.scrape()
        self.assertEqual(m["piccolod_commands_total{command=kernel.ping,outcome=ok}"], 4)
        self.assertEqual(
            m["piccolod_commands_total{command=test.refused,outcome=error:conflict}"], 1
        )
        self.assertEqual(
            m["piccolod_command_duration_seconds_count{command=kernel.ping,outcome=ok}"], 4
        )
        self.assertEqual(
            m["piccolod_command_duration_seconds_bucket{command=kernel.ping,le=+Inf,outcome=ok}"], 4
        )

    def test_job_and_supervisor_metrics(self) -> None:
        """Jobs ended per class and supervisor child states are exported."""
        self.jobs.startService()
        handle = self.jobs.submit(JobSpec(job_class="export", fn=lambda control: 1))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(handle.result()), 1)
        self.supervisor.add_child(ChildSpec(name="a", factory=FakeServiceFactory(name="a")))
        self.supervisor.startService()
        self.clock.advance(0)
        m = self.scrape()
        self.assertEqual(m["piccolod_jobs_total{job_class=export,state=succeeded}"], 1)
        self.assertEqual(m["piccolod_supervisor_child_state{child=a,state=running}"], 1)
        self.assertEqual(m["piccolod_supervisor_child_state{child=a,state=failed}"], 0)
        self.assertEqual(m["piccolod_supervisor_restarts_total{child=a}"], 0)
        self.assertEqual(m["piccolod_reactor_lag_seconds{}"], 0.125)
        self.assertEqual(m["piccolod_ready{}"], 1)
        self.supervisor.stopService()
        self.jobs.stopService()
        self.clock.advance(60)

    def test_http_requests(self) -> None:
        """HTTP observations appear per method, route and status."""
        self.metrics.http.observe("GET", "/api/v1/health/ready", 503, 0.002)
        self.metrics.http.observe("GET", "/api/v1/health/ready", 200, 0.001)
        m = self.scrape()
        self.assertEqual(
            m["piccolod_http_requests_total{method=GET,route=/api/v1/health/ready,status=503}"], 1
        )
        self.assertEqual(
            m["piccolod_http_request_duration_seconds_count{route=/api/v1/health/ready}"], 2
        )

    def test_process_metrics_present(self) -> None:
        """Process RSS and CPU come from prometheus-client's process collector."""
        m = self.scrape()
        self.assertGreater(m["piccolod_process_resident_memory_bytes{}"], 0)


class HistogramTests(SynchronousTestCase):
    def test_buckets_are_cumulative(self) -> None:
        """Buckets accumulate upward and +Inf counts everything."""
        h = Histogram(bounds=(1.0, 2.0))
        for v in (0.5, 1.0, 1.5, 3.0):
            h.observe(v)
        self.assertEqual(h.buckets(), [("1.0", 2.0), ("2.0", 3.0), ("+Inf", 4.0)])
        self.assertEqual(h.total, 6.0)
