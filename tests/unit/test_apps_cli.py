"""``piccolodctl app …`` (piccolod.cli_apps) against the real routes through StubTreq."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from piccolod.api.apps import app_routes
from piccolod.api.http import Router
from piccolod.cli import ApiError
from piccolod.cli_apps import AppOptions, WaitTimedOut, run_app
from piccolod.errors import TransientError
from tests.unit.test_apps_support import SPEC, Harness

BASE = "http://piccolo.local"


class AppCLITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.start()
        self.addCleanup(self.h.stop)
        router = Router(max_body=1 << 20)
        app_routes(router, self.h)
        self.treq = StubTreq(router)
        self.spec = Path(self.mktemp())
        self.spec.write_text(SPEC)

    def app(self, *argv: str) -> tuple[Any, str]:
        options = AppOptions()
        options.parseOptions(list(argv))
        d = Deferred.fromCoroutine(run_app(self.treq, BASE, options))
        for _ in range(20):
            self.treq.flush()
            self.h.settle()
        result: tuple[Any, str] = self.successResultOf(d)
        return result

    def test_install_list_get_logs_services_remove(self) -> None:
        """The app commands drive the API and print readable summaries."""
        _, text = self.app("validate", str(self.spec))
        self.assertEqual(text, "web: valid")
        body, text = self.app("install", str(self.spec))
        self.assertEqual(body["app"]["name"], "web")
        self.assertIn("web: running (generation 1, observed 1)", text)
        self.assertIn("http: public 35000 -> backend 15000", text)
        _, text = self.app("list")
        self.assertIn("web", text.splitlines()[1])
        self.assertIn("running", text.splitlines()[1])
        _, text = self.app("logs", "--tail", "2", "web")
        self.assertIn("started", text)
        _, text = self.app("services")
        self.assertIn("web/http", text)
        _, text = self.app("stop", "web")
        self.assertIn("stopped", text)
        _, text = self.app("remove", "--purge", "web")
        self.assertEqual(text, "web removed and purged")

    def waiting(self, *argv: str) -> Deferred[tuple[Any, str]]:
        """Run an app command with the harness clock, advancing it until it finishes."""
        options = AppOptions()
        options.parseOptions(list(argv))
        d = Deferred.fromCoroutine(run_app(self.treq, BASE, options, self.h.clock))
        for _ in range(400):
            if d.called:
                break
            self.treq.flush()
            self.h.advance(0.05, step=0.05)
        return d

    def test_wait_polls_until_the_controller_has_acted(self) -> None:
        """install --wait returns only once observed_generation reaches the generation."""
        self.h.runtime.fail_next("start", TransientError("runtime hiccup"))
        body, text = self.successResultOf(self.waiting("install", "--wait", str(self.spec)))
        status = body["app"]["status"]
        self.assertEqual(status["observed_generation"], body["app"]["generation"])
        self.assertEqual(status["state"], "running")
        self.assertIn("web: running (generation 1, observed 1)", text)
        body, text = self.successResultOf(self.waiting("stop", "--wait", "web"))
        self.assertEqual(body["app"]["status"]["observed_generation"], 2)
        self.assertIn("web: stopped (generation 2, observed 2)", text)

    def test_wait_gives_up_after_its_timeout(self) -> None:
        """With the controller stopped, --wait --timeout 2 fails with the app's last status."""
        self.app("install", str(self.spec))
        self.h.apps.controller.stopService()
        self.h.settle()
        d = self.waiting("stop", "--wait", "--timeout", "2", "web")
        error = self.failureResultOf(d, WaitTimedOut).value
        self.assertIn("web did not converge within 2 s", str(error))
        self.assertIn("generation 2, observed 1", str(error))
        self.h.apps.controller.startService()  # it acts on the change once it runs again
        body, _ = self.successResultOf(self.waiting("get", "web"))
        self.assertEqual(body["app"]["status"]["observed_generation"], 2)

    def test_update_by_image(self) -> None:
        """app update --image changes the image and bumps the generation."""
        self.h.runtime.add_image("localhost/web:2")
        self.app("install", str(self.spec))
        body, _ = self.app("update", "--image", "localhost/web:2", "web")
        self.assertEqual(body["app"]["generation"], 2)

    def test_errors_and_usage(self) -> None:
        """API errors surface as ApiError; bad usage is refused before any request."""
        bad = Path(self.mktemp())
        bad.write_text("name: root\n")
        options = AppOptions()
        options.parseOptions(["install", str(bad)])
        d = Deferred.fromCoroutine(run_app(self.treq, BASE, options))
        self.treq.flush()
        error = self.failureResultOf(d, ApiError).value
        self.assertEqual(error.status, 400)
        self.assertRaises(usage.UsageError, AppOptions().parseOptions, ["update", "web"])
        self.assertRaises(usage.UsageError, AppOptions().parseOptions, [])
