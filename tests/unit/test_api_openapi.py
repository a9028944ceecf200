"""
The OpenAPI document against the router, and the public/private split:
every route is documented exactly as routed, and every route the document
does not mark public refuses an anonymous request.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from .api_support import APIHarness

#: The routes anyone may call: exactly these.
PUBLIC = {
    ("GET", "/api/v1/health/live"),
    ("GET", "/api/v1/health/ready"),
    ("POST", "/api/v1/auth/setup"),
    ("POST", "/api/v1/auth/login"),
    ("GET", "/api/v1/auth/session"),
    ("POST", "/api/v1/auth/recovery-key/reset"),
    ("POST", "/api/v1/cluster/join"),  # a fresh node joining has no session yet
    # Restoring a fresh box from a bundle: no admin exists yet (409 once set up; the
    # upload id is a 256-bit capability).
    ("POST", "/api/v1/storage/restore"),
    ("GET", "/api/v1/storage/restore/{upload}"),
    ("PUT", "/api/v1/storage/restore/{upload}"),
    ("POST", "/api/v1/storage/restore/{upload}/finish"),
    ("DELETE", "/api/v1/storage/restore/{upload}"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/.well-known/acme-challenge/{token}"),  # ACME HTTP-01: public by RFC 8555
}


def _example_path(template: str) -> str:
    return re.sub(
        r"\{[a-z_]+\}", lambda m: {"{name}": "kernel.ping"}.get(m.group(0), "abc"), template
    )


class OpenAPITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(self)
        self.anonymous = self.h.client()
        self.document: dict[str, Any] = self.anonymous.get("/api/v1/openapi.json").body

    def operations(self) -> set[tuple[str, str]]:
        return {
            (method.upper(), path)
            for path, item in self.document["paths"].items()
            for method in item
        }

    def test_document_matches_the_router_both_ways(self) -> None:
        """Every routed (method, path) is documented and every documented one is routed."""
        routed = set(self.h.router.routes())
        self.assertEqual(self.operations(), routed)
        self.assertEqual(self.document["openapi"], "3.1.0")

    def test_operations_are_complete(self) -> None:
        """Each operation has a unique id, its path parameters, responses and a security list."""
        ids = []
        for path, item in self.document["paths"].items():
            for method, op in item.items():
                ids.append(op["operationId"])
                names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
                self.assertEqual(names, set(re.findall(r"\{([a-z_]+)\}", path)), path)
                self.assertIn("security", op)
                self.assertTrue(any(code.startswith("2") for code in op["responses"]), path)
                for code, answer in op["responses"].items():
                    if int(code) >= 400:
                        self.assertIn("application/problem+json", answer["content"])
                if method == "post" and op["security"]:
                    self.assertIn({"bearerAuth": []}, op["security"])
        self.assertEqual(len(ids), len(set(ids)))

    def test_public_routes_are_exactly_the_expected_ones(self) -> None:
        """
        Only the health checks, setup, login, session, recovery reset, cluster
        join, this document and the portal's static files (GET only) are public.
        """
        public = {
            (method.upper(), path)
            for path, item in self.document["paths"].items()
            for method, op in item.items()
            if op["security"] == []
        }
        portal = {(m, p) for m, p in public if "portal" in self.tags_of(m, p)}
        self.assertEqual(public - portal, PUBLIC)
        self.assertIn(("GET", "/"), portal)
        self.assertTrue(all(m == "GET" for m, _ in portal))

    def tags_of(self, method: str, path: str) -> list[str]:
        return list(self.document["paths"][path][method.lower()].get("tags", []))

    def test_every_non_public_route_refuses_anonymous_requests(self) -> None:
        """
        Each operation with a security requirement answers 401 problem+json without
        credentials.
        """
        self.h.set_up()  # a set-up box: nothing is open because nothing is configured yet
        checked = 0
        private = {
            (m, p) for m, p in self.operations() - PUBLIC if "portal" not in self.tags_of(m, p)
        }
        for method, path in sorted(private):
            response = self.anonymous.request(
                method, _example_path(path), body={} if method == "POST" else None
            )
            self.assertEqual(response.code, 401, (method, path, response))
            self.assertEqual(response.header("content-type"), "application/problem+json")
            checked += 1
        self.assertGreaterEqual(checked, 25)

    def test_documented_body_schemas_are_the_validated_ones(self) -> None:
        """The router validates with the very schema it documents."""
        routes = {(r.method, r.template): r for r in self.h.router.all_routes()}
        for path, item in self.document["paths"].items():
            for method, op in item.items():
                route = routes[(method.upper(), path)]
                if route.content:  # a body the handler reads itself (YAML): documented only
                    self.assertIsNone(route.body)
                    continue
                body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
                self.assertEqual(body.get("schema"), route.body, path)
