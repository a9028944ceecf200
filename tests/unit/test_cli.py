"""Tests for piccolod.cli (piccolodctl) against the real API resources through StubTreq."""

from __future__ import annotations

import io
from pathlib import Path

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.api.http import Router
from piccolod.api.service import kernel_routes
from piccolod.cli import EXIT_API, EXIT_OK, Options, discover_url, progress_bar, run
from piccolod.events import Role
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.jobs import JobControl, JobRunner, JobSpec
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.kernel.runtime import Kernel
from piccolod.kernel.supervisor import Supervisor


class CliTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        bus = MemoryEventBus(self.clock)
        health = HealthTracker(self.clock, bus)
        registry = LeadershipRegistry(bus, "n1")
        self.jobs = JobRunner(self.clock, bus)
        self.jobs.startService()
        self.kernel = Kernel(
            reactor=self.clock,
            bus=bus,
            registry=registry,
            dispatcher=CommandDispatcher(self.clock, bus, registry=registry),
            health=health,
            supervisor=Supervisor(self.clock, bus, health),
            node_id="n1",
            api_address="http://127.0.0.1:8080",
            state_dir=Path(self.mktemp()),
            jobs=self.jobs,
        )
        registry.update("control-plane", Role.LEADER, 3)
        router = Router()
        kernel_routes(router, self.kernel)
        self.treq = StubTreq(router)

    def tearDown(self) -> None:
        self.jobs.stopService()
        self.clock.advance(60)

    def ctl(self, *argv: str) -> tuple[int, str]:
        options = Options()
        options.parseOptions(["--url", "http://piccolod", *argv])
        out = io.StringIO()
        d = Deferred.fromCoroutine(run(self.clock, options, out, treq=self.treq))
        for _ in range(20):
            if d.called:
                break
            self.clock.advance(0.5)
        return self.successResultOf(d), out.getvalue()

    def test_leadership(self) -> None:
        """leadership prints the role, term and leader per resource."""
        code, out = self.ctl("leadership")
        self.assertEqual(code, EXIT_OK)
        self.assertIn("control-plane", out)
        self.assertIn("leader    term=3 leader=n1", out)

    def test_jobs_show_progress_bars(self) -> None:
        """A running job is shown with its progress bar and message."""
        d: Deferred[None] = Deferred()

        def body(control: JobControl) -> Deferred[None]:
            control.report(0.5, "halfway")
            return d

        self.jobs.submit(JobSpec(job_class="export", fn=body))
        self.clock.advance(0)
        code, out = self.ctl("jobs")
        self.assertEqual(code, EXIT_OK)
        self.assertIn("running", out)
        self.assertIn(progress_bar(0.5), out)
        self.assertIn("halfway", out)
        d.callback(None)

    def test_routine_successes_are_left_out_unless_all(self) -> None:
        """Succeeded telemetry samples are counted, not listed (--all lists them); failures are."""
        for _ in range(3):
            self.jobs.submit(JobSpec(job_class="telemetry", name="telemetry", fn=lambda c: None))
        self.jobs.submit(JobSpec(job_class="export", name="control export", fn=lambda c: None))

        def broken(control: JobControl) -> None:
            raise RuntimeError("sampling broke")

        self.jobs.submit(JobSpec(job_class="telemetry", name="telemetry", fn=broken))
        self.clock.advance(0)
        code, out = self.ctl("jobs")
        self.assertEqual(code, EXIT_OK)
        lines = out.strip().splitlines()
        self.assertEqual(len(lines), 3, out)
        self.assertIn("control export", out)
        self.assertIn("sampling broke", out)
        self.assertIn("(3 routine job(s) that succeeded not shown: --all shows them)", out)
        code, out = self.ctl("jobs", "--all")
        self.assertEqual(len(out.strip().splitlines()), 5, out)

    def test_watch_ends_when_jobs_finish(self) -> None:
        """jobs --watch redraws until nothing is running, then prints the final table."""
        d: Deferred[None] = Deferred()
        self.jobs.submit(JobSpec(job_class="export", fn=lambda control: d))
        self.clock.advance(0)
        options = Options()
        options.parseOptions(["--url", "http://piccolod", "jobs", "--watch"])
        out = io.StringIO()
        result = Deferred.fromCoroutine(run(self.clock, options, out, treq=self.treq))
        self.clock.advance(0.5)
        self.assertNoResult(result)
        d.callback(None)
        self.clock.advance(0.5)
        self.assertEqual(self.successResultOf(result), EXIT_OK)
        self.assertIn(" succeeded ", out.getvalue().rstrip().splitlines()[-1] + " ")

    def test_api_errors_are_one_line_and_exit_1(self) -> None:
        """A problem+json answer is printed as one line with exit status 1."""
        code, out = self.ctl("job", "missing")
        self.assertEqual(code, EXIT_API)
        self.assertEqual(out, "error 404 not-found: no job 'missing'\n")

    def test_json_flag(self) -> None:
        """--json prints the raw answer."""
        code, out = self.ctl("--json", "leadership")
        self.assertEqual(code, EXIT_OK)
        self.assertIn('"node_id": "n1"', out)


class HelperTests(SynchronousTestCase):
    def test_discover_url_order(self) -> None:
        """--url beats $PICCOLOD_URL beats api.json beats the default."""
        state = Path(self.mktemp())
        state.mkdir()
        (state / "api.json").write_text('{"url": "http://127.0.0.1:4321"}')
        self.assertEqual(
            discover_url("http://a/", str(state), {"PICCOLOD_URL": "http://b"}), "http://a"
        )
        self.assertEqual(discover_url(None, str(state), {"PICCOLOD_URL": "http://b"}), "http://b")
        self.assertEqual(discover_url(None, str(state), {}), "http://127.0.0.1:4321")
        self.assertEqual(discover_url(None, str(state / "none"), {}), "http://127.0.0.1:8080")

    def test_progress_bar_clamps(self) -> None:
        """Progress bars clamp to 0..100 %."""
        self.assertEqual(progress_bar(2.0, width=4), "[####] 100%")
        self.assertEqual(progress_bar(-1.0, width=4), "[....]   0%")
