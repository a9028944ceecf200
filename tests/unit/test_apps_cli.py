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
from piccolod.cli_apps import AppOptions, run_app
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
