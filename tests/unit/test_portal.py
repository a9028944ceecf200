# mypy: disallow-untyped-calls=False
# (twisted.trial and treq.testing are untyped)
"""Tests for piccolod.api.portal: the static operator portal and its headers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from piccolod.api.http import Router
from piccolod.api.openapi import build_document
from piccolod.api.portal import (
    CONTENT_SECURITY_POLICY,
    IMMUTABLE,
    REVALIDATE,
    STATIC_DIR,
    StaticPortal,
    portal_resource,
    portal_routes,
)
from piccolod.errors import NotFound
from piccolod.events import TOPICS

Response = tuple[int, dict[str, str], bytes]


class PortalTestCase(SynchronousTestCase):
    """Requests through StubTreq against the portal's routes."""

    def setUp(self) -> None:
        self.treq: Any = StubTreq(portal_resource())

    def get(self, path: str, method: str = "GET", **kw: Any) -> Response:
        response = self.successResultOf(
            self.treq.request(method, "http://portal.test" + path, **kw)
        )
        body = self.successResultOf(response.content())
        headers = {
            k.decode().lower(): b", ".join(v).decode()
            for k, v in response.headers.getAllRawHeaders()
        }
        return response.code, headers, body


class ServingTests(PortalTestCase):
    def test_page_at_root(self) -> None:
        """``GET /`` answers the shipped index.html as UTF-8 HTML."""
        code, headers, body = self.get("/")
        self.assertEqual(code, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        self.assertIn(b"<title>piccolod</title>", body)

    def test_page_aliases(self) -> None:
        """``/portal``, ``/portal/`` and ``/portal/index.html`` answer the same page as ``/``."""
        _, _, root = self.get("/")
        for path in ("/portal", "/portal/", "/portal/index.html"):
            code, headers, body = self.get(path)
            self.assertEqual((code, body), (200, root), path)
            self.assertEqual(headers["content-type"], "text/html; charset=utf-8")

    def test_content_types(self) -> None:
        """Each asset is served with its own content type and exactly its shipped bytes."""
        expected = {
            "app.js": "text/javascript; charset=utf-8",
            "app.css": "text/css; charset=utf-8",
            "favicon.svg": "image/svg+xml",
        }
        for name, content_type in expected.items():
            code, headers, body = self.get(f"/portal/{name}")
            self.assertEqual(code, 200, name)
            self.assertEqual(headers["content-type"], content_type, name)
            self.assertEqual(body, (STATIC_DIR / name).read_bytes(), name)

    def test_head(self) -> None:
        """HEAD answers the headers of GET without a body."""
        code, headers, body = self.get("/portal/app.js", method="HEAD")
        self.assertEqual(code, 200)
        self.assertEqual(headers["content-type"], "text/javascript; charset=utf-8")
        self.assertEqual(body, b"")

    def test_other_methods_refused(self) -> None:
        """POST to a portal file is 405 with ``Allow: GET``, as problem+json."""
        code, headers, body = self.get("/portal/app.js", method="POST")
        self.assertEqual(code, 405)
        self.assertEqual(headers["allow"], "GET")
        self.assertEqual(json.loads(body)["status"], 405)


class SecurityHeaderTests(PortalTestCase):
    def test_csp_on_every_file(self) -> None:
        """Every portal response carries the strict CSP, nosniff and no-framing headers."""
        for path in ("/", "/portal/app.js", "/portal/app.css", "/portal/favicon.svg"):
            code, headers, _ = self.get(path)
            self.assertEqual(code, 200, path)
            self.assertEqual(headers["content-security-policy"], CONTENT_SECURITY_POLICY, path)
            self.assertEqual(headers["x-content-type-options"], "nosniff", path)
            self.assertEqual(headers["x-frame-options"], "DENY", path)
            self.assertEqual(headers["referrer-policy"], "no-referrer", path)
            self.assertEqual(headers["cross-origin-opener-policy"], "same-origin", path)

    def test_csp_is_strict(self) -> None:
        """The policy allows only this origin, no inline code, no framing, no plugins."""
        directives = dict([*d.split(" ", 1), ""][:2] for d in CONTENT_SECURITY_POLICY.split("; "))
        self.assertEqual(directives["default-src"], "'self'")
        self.assertEqual(directives["script-src"], "'self'")
        self.assertEqual(directives["style-src"], "'self'")
        self.assertEqual(directives["connect-src"], "'self'")
        self.assertEqual(directives["frame-ancestors"], "'none'")
        self.assertEqual(directives["object-src"], "'none'")
        self.assertEqual(directives["base-uri"], "'none'")
        self.assertNotIn("unsafe", CONTENT_SECURITY_POLICY)
        self.assertNotIn("data:", CONTENT_SECURITY_POLICY)
        self.assertNotIn("*", CONTENT_SECURITY_POLICY)

    def test_shipped_page_has_no_inline_code(self) -> None:
        """index.html has no inline script, style, handler or external URL (CSP blocks them)."""
        page = (STATIC_DIR / "index.html").read_text()
        self.assertIsNone(re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page))
        self.assertNotIn("<style", page)
        self.assertIsNone(re.search(r"\sstyle=", page))
        self.assertIsNone(re.search(r"\son[a-z]+=", page))
        self.assertIsNone(re.search(r"(src|href)=\"(https?:)?//", page))
        for name in ("app.js", "app.css"):
            text = (STATIC_DIR / name).read_text()
            self.assertNotIn("http://cdn", text)
            self.assertNotIn("https://", text, name)
        self.assertNotIn("innerHTML", (STATIC_DIR / "app.js").read_text())
        self.assertNotIn("eval(", (STATIC_DIR / "app.js").read_text())

    def test_api_security_headers_kept_on_404(self) -> None:
        """An unknown portal file is the API's 404 problem, with its security headers."""
        code, headers, body = self.get("/portal/missing.js")
        self.assertEqual(code, 404)
        self.assertEqual(headers["content-type"], "application/problem+json")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(json.loads(body)["type"], "https://piccolod.dev/problems/not-found")


class TraversalTests(PortalTestCase):
    def test_traversal_refused(self) -> None:
        """Dot segments, encoded slashes and absolute paths never reach a file outside."""
        for path in (
            "/portal/../portal.py",
            "/portal/..%2fportal.py",
            "/portal/..%2Fportal.py",
            "/portal/%2e%2e/portal.py",
            "/portal/%2e%2e%2fportal.py",
            "/portal/..",
            "/portal/.",
            "/portal//etc/passwd",
            "/portal/..\\portal.py",
            "/portal/static/app.js",
            "/portal/app.js%00.html",
            "/portal/%2Fetc%2Fpasswd",
            "/../../etc/passwd",
            "/portal.py",
            "/static/app.js",
        ):
            code, _, body = self.get(path)
            self.assertEqual(code, 404, path)
            self.assertNotIn(b"import", body, path)
            self.assertNotIn(b"root:", body, path)

    def test_unknown_file_404(self) -> None:
        """A file that was not shipped is 404 problem+json, whatever its type."""
        for name in ("nope.js", "app.jsx", "index.htm", "APP.JS", "app.js.map"):
            code, headers, _ = self.get(f"/portal/{name}")
            self.assertEqual(code, 404, name)
            self.assertEqual(headers["content-type"], "application/problem+json", name)

    def test_only_shipped_regular_files(self) -> None:
        """Symlinks, hidden files, sub-directories and unknown types are not served."""
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "index.html").write_text("<!doctype html><title>t</title>")
        (directory / "ok.js").write_text("ok")
        (directory / ".hidden.js").write_text("hidden")
        (directory / "notes.py").write_text("secret")
        (directory / "sub").mkdir()
        (directory / "sub" / "inner.js").write_text("inner")
        outside = Path(self.mktemp())
        outside.write_text("outside")
        os.symlink(outside, directory / "link.js")
        portal = StaticPortal.from_directory(directory)
        self.assertEqual(sorted(portal.files), ["index.html", "ok.js"])
        treq: Any = StubTreq(portal_resource(directory=directory))
        for name, expected in (
            ("ok.js", 200),
            ("link.js", 404),
            (".hidden.js", 404),
            ("notes.py", 404),
            ("sub", 404),
            ("inner.js", 404),
        ):
            response = self.successResultOf(treq.get(f"http://portal.test/portal/{name}"))
            self.successResultOf(response.content())
            self.assertEqual(response.code, expected, name)

    def test_get_refuses_malformed_names(self) -> None:
        """``StaticPortal.get`` raises NotFound for names that could address another path."""
        portal = StaticPortal.from_directory()
        for name in ("../portal.py", "./app.js", "", ".", "..", "a/b.js", "app.js/"):
            self.assertRaises(NotFound, portal.get, name)
        self.assertEqual(portal.get("app.js").name, "app.js")

    def test_directory_without_index(self) -> None:
        """A static directory without index.html is refused at load, not at the first request."""
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "app.js").write_text("x")
        self.assertRaises(ValueError, StaticPortal.from_directory, directory)


class CachingTests(PortalTestCase):
    def test_page_revalidates(self) -> None:
        """The page is never cached without revalidation and carries a strong ETag."""
        _, headers, _ = self.get("/")
        self.assertEqual(headers["cache-control"], REVALIDATE)
        self.assertRegex(headers["etag"], r'^"[0-9a-f]{32}"$')

    def test_page_references_versioned_assets(self) -> None:
        """index.html names each asset with ``?v=`` its current hash, which makes it immutable."""
        _, _, page = self.get("/")
        found = dict(re.findall(rb'"/portal/([a-z.]+)\?v=([0-9a-f]{16})"', page))
        self.assertEqual(set(found), {b"app.js", b"app.css", b"favicon.svg"})
        for name, version in found.items():
            code, headers, body = self.get(f"/portal/{name.decode()}?v={version.decode()}")
            self.assertEqual(code, 200)
            self.assertEqual(headers["cache-control"], IMMUTABLE)
            self.assertEqual(body, (STATIC_DIR / name.decode()).read_bytes())

    def test_stale_version_revalidates(self) -> None:
        """An asset asked for without its current hash must be revalidated."""
        for query in ("", "?v=0000000000000000", "?v="):
            _, headers, _ = self.get(f"/portal/app.js{query}")
            self.assertEqual(headers["cache-control"], REVALIDATE, query)

    def test_overlong_version_refused(self) -> None:
        """A ``v`` query longer than any hash is a 400, as the OpenAPI document says."""
        code, _, _ = self.get("/portal/app.js?v=" + "a" * 65)
        self.assertEqual(code, 400)

    def test_conditional_get(self) -> None:
        """``If-None-Match`` with the current tag answers 304 without a body; another tag, 200."""
        _, headers, _ = self.get("/portal/app.css")
        etag = headers["etag"]
        for value in (etag, f"W/{etag}", f'"x", {etag}', "*"):
            code, headers2, body = self.get("/portal/app.css", headers={"If-None-Match": value})
            self.assertEqual((code, body), (304, b""), value)
            self.assertEqual(headers2["etag"], etag)
            self.assertEqual(headers2["content-security-policy"], CONTENT_SECURITY_POLICY)
        code, _, body = self.get("/portal/app.css", headers={"If-None-Match": '"other"'})
        self.assertEqual(code, 200)
        self.assertTrue(body)


class IndexTests(PortalTestCase):
    def test_topics_written_into_page(self) -> None:
        """The page lists every event topic of the vocabulary for the log's filter."""
        _, _, page = self.get("/")
        m = re.search(rb'<meta name="piccolod-topics" content="([^"]*)">', page)
        assert m is not None
        self.assertEqual(m.group(1).decode().split(","), sorted(TOPICS))

    def test_malformed_topics_skipped(self) -> None:
        """A topic that could break out of the attribute is left out of the page."""
        portal = StaticPortal.from_directory(STATIC_DIR, ["a.b", '"><script>', "c"])
        page = portal.files["index.html"].body
        self.assertIn(b'<meta name="piccolod-topics" content="a.b,c">', page)
        self.assertNotIn(b"<script>", page)

    def test_etag_changes_with_content(self) -> None:
        """A different topic list gives the page a different tag (no stale page)."""
        one = StaticPortal.from_directory(STATIC_DIR, ["a"]).files["index.html"]
        two = StaticPortal.from_directory(STATIC_DIR, ["b"]).files["index.html"]
        self.assertNotEqual(one.etag, two.etag)


class MountingTests(SynchronousTestCase):
    def test_mounts_beside_api_routes(self) -> None:
        """portal_routes adds public routes to an API router without disturbing its routes."""
        router = Router()

        @router.route("GET", "/api/v1/health/live")
        def live(request: Any) -> Any:
            return {"status": "ok"}

        portal_routes(router, kernel=None)
        treq: Any = StubTreq(router)
        response = self.successResultOf(treq.get("http://x/api/v1/health/live"))
        self.assertEqual(self.successResultOf(response.json()), {"status": "ok"})
        response = self.successResultOf(treq.get("http://x/"))
        self.assertEqual(response.code, 200)
        self.successResultOf(response.content())
        public = {r.template for r in router.all_routes() if r.public}
        self.assertEqual(
            public,
            {
                "/",
                "/portal",
                "/portal/index.html",
                "/portal/app.js",
                "/portal/app.css",
                "/portal/favicon.svg",
            },
        )

    def test_mounting_twice_refused(self) -> None:
        """Mounting the portal twice on one router is an error, not a silent shadowing."""
        router = Router()
        portal_routes(router)
        self.assertRaises(ValueError, portal_routes, router)

    def test_openapi_documents_each_file(self) -> None:
        """The OpenAPI document lists each portal file, public, with its content type."""
        router = Router()
        portal_routes(router)
        paths = build_document(router, "0")["paths"]
        self.assertEqual(
            list(paths["/portal/app.css"]["get"]["responses"]["200"]["content"]),
            ["text/css"],
        )
        self.assertEqual(list(paths["/"]["get"]["responses"]["200"]["content"]), ["text/html"])
        self.assertEqual(paths["/portal/app.js"]["get"]["security"], [])
