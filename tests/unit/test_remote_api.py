# mypy: disable-error-code="no-untyped-call"
"""
The remote routes (``remote_routes``) through ``StubTreq`` against a real
manager, and ``piccolodctl remote`` (``piccolod.cli_remote``) over them.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from piccolod.api.http import Router
from piccolod.api.remote import ACME_SUBJECT, remote_routes
from piccolod.cli import ApiError
from piccolod.cli_remote import RemoteOptions, format_status, json_request, plan, run_remote
from piccolod.errors import PolicyDenied
from piccolod.remote.manager import ManagerConfig
from piccolod.remote.testing import FakeAcmeBackend, InlinePool, RemoteHarness, ThreadlessReactor

BASE = "http://piccolo.test"
CONFIGURE = {
    "tunnels": [{"host": "tunnel.example", "user": "piccolo"}],
    "portal_hostname": "portal.example.net",
    "https_port": 443,
    "expose": [{"app": "blog", "listener": "web", "remote_port": 8081}],
    "acme": {"directory_url": "https://acme.example/dir"},
}


class APICase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ThreadlessReactor()
        self.reactor.advance(1_700_000_000)
        acme = FakeAcmeBackend(now=self.reactor.seconds)
        self.h = RemoteHarness.build(
            self.reactor,
            pool=InlinePool(),
            acme_backend=acme,
            config=ManagerConfig(tls_listen="tcp:8443:interface=127.0.0.1"),
        )
        acme.validate = self.h.manager.challenge
        self.subjects: list[str] = []

        def policy(command: Any, context: Any, next_: Any) -> Any:
            self.subjects.append(context.subject)
            if context.subject == "anonymous":
                return fail(PolicyDenied("anonymous may not"))
            return next_(command, context)

        self.policy = policy
        self.h.start()
        self.h.lead("control-plane")
        self.h.lead("app:blog")
        self.h.publish_route("blog", "web", 35001)
        self.h.unlock()
        self.settle()
        router = Router()
        remote_routes(router, self.h)
        self.treq: Any = StubTreq(router)
        self.addCleanup(self.stop)

    def stop(self) -> None:
        d = Deferred.fromCoroutine(self.h.stop())
        self.settle()
        self.successResultOf(d)

    def settle(self) -> None:
        for _ in range(200):
            now = self.reactor.seconds()
            if not any(c.getTime() <= now for c in self.reactor.getDelayedCalls()):
                return
            self.reactor.advance(0)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any, bytes]:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            kwargs["headers"] = {b"content-type": [b"application/json"]}
        d = self.treq.request(method, BASE + path, **kwargs)
        self.settle()
        self.treq.flush()
        response = self.successResultOf(d)
        raw = self.successResultOf(response.content())
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        return response.code, (json.loads(raw) if b"json" in ctype else None), ctype


class RouteTests(APICase):
    def test_configure_status_and_certificates(self) -> None:
        """configure through the API stores the config; status and certificates read it back."""
        code, body, _ = self.request("POST", "/api/v1/remote/configure", CONFIGURE)
        self.assertEqual(code, 200, body)
        self.assertTrue(body["device_public_key"].startswith("ssh-ed25519 "))
        code, body, _ = self.request("GET", "/api/v1/remote")
        self.assertEqual((code, body["state"]), (200, "active"))
        self.assertEqual({r["target"] for r in body["routes"]}, {"portal", "blog/web"})
        code, body, _ = self.request("GET", "/api/v1/remote/certificates")
        self.assertEqual(body["certificates"][0]["state"], "ok")
        code, body, _ = self.request("POST", "/api/v1/remote/certificates/renew")
        self.assertEqual((code, len(body["job_ids"])), (200, 1))
        code, body, _ = self.request("POST", "/api/v1/remote/certificates/x.example.net/renew")
        self.assertEqual(code, 404)

    def test_bad_bodies_are_400(self) -> None:
        """Unknown members, wrong types and invalid values are refused before any write."""
        for body in (
            {**CONFIGURE, "surprise": 1},
            {**CONFIGURE, "https_port": "443"},
            {**CONFIGURE, "https_port": 70000},
            {**CONFIGURE, "tunnels": [{"host": "t.example"}]},
            {**CONFIGURE, "acme": {"directory_url": "http://insecure/dir"}},
        ):
            code, problem, ctype = self.request("POST", "/api/v1/remote/configure", body)
            self.assertEqual(code, 400, (body, problem))
            self.assertEqual(ctype, b"application/problem+json")
        self.assertIsNone(self.h.store.record)

    def test_aliases_and_rotation(self) -> None:
        """Aliases are added, listed and removed; the device key rotates."""
        first = self.request("POST", "/api/v1/remote/configure", CONFIGURE)[1]
        code, body, _ = self.request(
            "POST", "/api/v1/remote/aliases", {"hostname": "www.example.net", "target": "portal"}
        )
        self.assertEqual((code, body["aliases"][0]["hostname"]), (200, "www.example.net"))
        self.assertEqual(len(self.request("GET", "/api/v1/remote/aliases")[1]["aliases"]), 1)
        self.assertEqual(self.request("DELETE", "/api/v1/remote/aliases/www.example.net")[0], 200)
        self.assertEqual(self.request("DELETE", "/api/v1/remote/aliases/www.example.net")[0], 404)
        rotated = self.request("POST", "/api/v1/remote/device-key/rotate")[1]
        self.assertNotEqual(rotated["device_public_key"], first["device_public_key"])
        self.assertEqual(self.request("POST", "/api/v1/remote/disable")[1]["state"], "disabled")

    def test_locked_is_423(self) -> None:
        """While locked every remote route answers 423 problem+json."""
        self.h.lock()
        self.settle()
        for method, path, body in (
            ("GET", "/api/v1/remote", None),
            ("POST", "/api/v1/remote/configure", CONFIGURE),
            ("GET", "/api/v1/remote/aliases", None),
            ("GET", "/api/v1/remote/certificates", None),
            ("POST", "/api/v1/remote/device-key/rotate", None),
        ):
            code, problem, _ = self.request(method, path, body)
            self.assertEqual(code, 423, path)
            self.assertTrue(problem["type"].endswith("/locked"))

    def test_acme_challenge_is_public_text(self) -> None:
        """The HTTP-01 resource answers a pending token as text/plain, else 404; bad tokens 400."""
        self.h.dispatcher.add_middleware("policy", self.policy)
        self.h.manager._challenges["tok_en-1"] = "tok_en-1.thumbprint"
        d = self.treq.get(BASE + "/.well-known/acme-challenge/tok_en-1")
        self.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), b"tok_en-1.thumbprint")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertEqual(self.subjects[-1], ACME_SUBJECT)
        self.assertEqual(self.request("GET", "/.well-known/acme-challenge/missing")[0], 404)
        self.assertEqual(self.request("GET", "/.well-known/acme-challenge/a.b")[0], 400)
        # The other routes dispatch as the request's principal (anonymous here): denied.
        self.assertEqual(self.request("GET", "/api/v1/remote")[0], 403)


class CLITests(APICase):
    def options(self, *argv: str) -> RemoteOptions:
        options = RemoteOptions()
        options.parseOptions(list(argv))
        return options

    def test_plans(self) -> None:
        """Each sub-command maps to one route and body."""
        cases = {
            ("status",): ("GET", "/api/v1/remote", None),
            ("disable",): ("POST", "/api/v1/remote/disable", None),
            ("aliases",): ("GET", "/api/v1/remote/aliases", None),
            ("alias-add", "www.example.net"): (
                "POST",
                "/api/v1/remote/aliases",
                {"hostname": "www.example.net", "target": "portal"},
            ),
            ("alias-remove", "www.example.net"): (
                "DELETE",
                "/api/v1/remote/aliases/www.example.net",
                None,
            ),
            ("certificates",): ("GET", "/api/v1/remote/certificates", None),
            ("renew",): ("POST", "/api/v1/remote/certificates/renew", None),
            ("renew", "a.example.net"): (
                "POST",
                "/api/v1/remote/certificates/a.example.net/renew",
                None,
            ),
            ("rotate-key",): ("POST", "/api/v1/remote/device-key/rotate", None),
        }
        for argv, expected in cases.items():
            self.assertEqual(plan(self.options(*argv)), expected, argv)

    def test_configure_options_build_the_body(self) -> None:
        """configure's options become the ConfigureRemote body the API takes."""
        options = self.options(
            "configure",
            "--tunnel", "piccolo@tunnel.example:2222",
            "--host-key", "SHA256:" + "A" * 43,
            "--portal-hostname", "portal.example.net",
            "--https-port", "443",
            "--expose", "blog/web:8081=blog.example.net",
            "--expose", "shop/api",
            "--acme-directory", "https://acme.example/dir",
            "--renew-before-days", "20",
        )  # fmt: skip
        _, _, body = plan(options)
        self.assertEqual(
            body["tunnels"],
            [{"name": "default", "host": "tunnel.example", "user": "piccolo", "port": 2222,
              "host_key": "SHA256:" + "A" * 43}],
        )  # fmt: skip
        self.assertEqual(
            body["expose"],
            [
                {"app": "blog", "listener": "web", "remote_port": 8081,
                 "hostname": "blog.example.net"},
                {"app": "shop", "listener": "api"},
            ],
        )  # fmt: skip
        self.assertEqual(body["acme"]["renew_before_days"], 20.0)
        for bad in (
            ["configure", "--tunnel", "no-user-here"],
            ["configure", "--tunnel", "u@h:port"],
            ["configure", "--expose", "justapp"],
            ["configure", "--https-port", "x"],
            ["configure", "--host-key", "SHA256:x"],
        ):
            with self.assertRaises(usage.UsageError, msg=bad):
                plan(self.options(*bad))
        with self.assertRaises(usage.UsageError):
            self.options()

    def test_end_to_end_over_the_api(self) -> None:
        """piccolodctl remote configure and status run through the API; errors raise ApiError."""
        request = json_request(self.treq)

        def run(*argv: str) -> tuple[str, Any]:
            d = Deferred.fromCoroutine(run_remote(request, BASE, self.options(*argv)))
            self.settle()
            self.treq.flush()
            return self.successResultOf(d)

        text, body = run(
            "configure", "--tunnel", "piccolo@tunnel.example", "--expose", "blog/web:8081"
        )
        self.assertIn("remote access: active", text)
        self.assertIn("device key: ssh-ed25519", text)
        self.assertIn("route blog/web", text)
        text, _ = run("aliases")
        self.assertEqual(text, "no alias")
        self.h.lock()
        self.settle()
        d = Deferred.fromCoroutine(run_remote(request, BASE, self.options("status")))
        self.settle()
        self.treq.flush()
        error = self.failureResultOf(d, ApiError).value
        self.assertEqual(error.status, 423)
        self.assertIn("error 423 locked", str(error))

    def test_status_text(self) -> None:
        """The status text shows tunnels, forwards, routes and certificates."""
        text = format_status(
            {
                "state": "degraded",
                "revision": 3,
                "tunnels": [
                    {
                        "name": "default", "state": "backoff", "host": "t", "port": 22,
                        "host_key": "SHA256:abc", "last_error": "connection refused",
                        "forwards": [{"name": "portal", "state": "pending",
                                      "bind_host": "127.0.0.1", "bind_port": 0, "bound_port": 0,
                                      "target_host": "127.0.0.1", "target_port": 8080}],
                    }
                ],
                "routes": [{"target": "blog/web", "mode": "unavailable", "host": "", "port": 0,
                            "hostnames": [], "reason": "not published"}],
                "certificates": [{"hostname": "a.example.net", "state": "error",
                                  "last_error": "HTTP-01 failed"}],
            }
        )  # fmt: skip
        self.assertIn("tunnel default: backoff t:22 host key SHA256:abc", text)
        self.assertIn("(connection refused)", text)
        self.assertIn("(not published)", text)
        self.assertIn("last error: HTTP-01 failed", text)
