"""The /api/v1/apps and /api/v1/services routes (commands only), through StubTreq."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from piccolod.api.apps import app_routes
from piccolod.api.http import Router
from tests.unit.test_apps_support import SPEC, Harness

YAML = {"Content-Type": "application/yaml"}


class AppsAPITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.start()
        self.addCleanup(self.h.stop)
        router = Router(max_body=1 << 20)
        app_routes(router, self.h)
        self.treq = StubTreq(router)

    def call(self, method: str, path: str, body: bytes | str = b"", **kw: Any) -> tuple[int, Any]:
        data = body.encode() if isinstance(body, str) else body
        d = self.treq.request(method, f"http://piccolo.local{path}", data=data or None, **kw)
        self.treq.flush()
        self.h.settle()
        self.treq.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        self.treq.flush()
        return response.code, json.loads(content) if content else None

    def test_install_get_list_and_services(self) -> None:
        """POST a YAML spec installs (201); the app, its status and its routes can be read."""
        code, body = self.call("POST", "/api/v1/apps", SPEC, headers=YAML)
        self.assertEqual(code, 201)
        self.assertEqual(body["app"]["name"], "web")
        code, body = self.call("GET", "/api/v1/apps/web")
        self.assertEqual((code, body["app"]["status"]["state"]), (200, "running"))
        code, body = self.call("GET", "/api/v1/apps")
        self.assertEqual([a["name"] for a in body["apps"]], ["web"])
        code, body = self.call("GET", "/api/v1/apps/web/services")
        self.assertEqual(body["routes"][0]["listener"], "http")
        self.assertEqual(set(body["ports"]["http"]), {"backend", "public"})
        code, body = self.call("GET", "/api/v1/services")
        self.assertEqual(len(body["routes"]), 1)

    def test_invalid_specs_are_400_with_every_error(self) -> None:
        """A bad spec answers problem+json 400 listing every error."""
        code, body = self.call(
            "POST",
            "/api/v1/apps",
            "name: root\nimage: a\nbuild: {containerfile: x}\n"
            "listeners: [{name: w, guest_port: 0}]\n",
            headers=YAML,
        )
        self.assertEqual(code, 400)
        self.assertEqual(body["type"], "https://piccolod.dev/problems/invalid")
        self.assertEqual(len(body["errors"]), 3)
        code, body = self.call("POST", "/api/v1/apps", "{", headers={"Content-Type": "text/html"})
        self.assertEqual(code, 400)
        code, body = self.call("POST", "/api/v1/apps", "x" * (70 * 1024), headers=YAML)
        self.assertEqual(code, 413)

    def test_json_bodies_validate_update_and_lifecycle(self) -> None:
        """JSON {"spec"} validates; update, stop, start, revert, logs and delete work."""
        spec = json.dumps({"spec": SPEC})
        json_type = {"Content-Type": "application/json"}
        code, body = self.call("POST", "/api/v1/apps/validate", spec, headers=json_type)
        self.assertEqual((code, body["app"]), (200, "web"))
        self.call("POST", "/api/v1/apps", spec, headers=json_type)
        self.h.runtime.add_image("localhost/web:2")
        image = json.dumps({"image": "localhost/web:2"})
        code, body = self.call("POST", "/api/v1/apps/web/update", image, headers=json_type)
        self.assertEqual((code, body["app"]["generation"]), (200, 2))
        self.assertEqual(self.call("POST", "/api/v1/apps/web/stop")[0], 200)
        self.assertEqual(self.h.state("web"), "stopped")
        self.assertEqual(self.call("POST", "/api/v1/apps/web/start")[0], 200)
        code, body = self.call("POST", "/api/v1/apps/web/revert")
        self.assertEqual(body["app"]["spec"]["image"], "localhost/web:1")
        code, body = self.call("GET", "/api/v1/apps/web/logs?tail=3")
        self.assertIn("started", body["logs"])
        self.assertEqual(self.call("GET", "/api/v1/apps/web/logs?tail=x")[0], 400)
        self.assertEqual(self.call("DELETE", "/api/v1/apps/web?purge=maybe")[0], 400)
        code, body = self.call("DELETE", "/api/v1/apps/web?purge=true")
        self.assertEqual((code, body), (200, {"app": "web", "purged": True}))
        self.assertEqual(self.call("GET", "/api/v1/apps/web")[0], 404)

    def test_bad_names_and_locked_storage(self) -> None:
        """A malformed app name is 400; while locked, reads and writes are 423."""
        self.assertEqual(self.call("GET", "/api/v1/apps/Bad_Name")[0], 400)
        from piccolod.events import LockState

        self.h.set_lock(LockState.LOCKED)
        self.assertEqual(self.call("GET", "/api/v1/apps")[0], 423)
        self.assertEqual(self.call("POST", "/api/v1/apps", SPEC, headers=YAML)[0], 423)
