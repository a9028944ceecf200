"""
The operator portal: the static page at ``/`` and its assets under
``/portal/<name>``, served by the API's router.

Only files shipped in ``piccolod/api/static`` are served, and only those
found there at start: the directory is read once into memory (a few tens of
kilobytes), each file with its content type and a strong ``ETag`` (SHA-256).
A request names a file by its bare name; anything else (another name,
``..``, an encoded slash, a sub-directory, a symlink, a file of an unknown
type) answers 404.  There is no path arithmetic to get wrong.

Every portal response carries a strict Content-Security-Policy (only this
origin's scripts, styles and connections; no inline script or style, no
framing, no plugins, no ``<base>``), ``X-Content-Type-Options: nosniff`` and
the API's other security headers.

Caching: ``index.html`` refers to its assets with a ``?v=<hash>`` suffix
written in at load; an asset asked for with its current hash is immutable
for a year, anything else (the page itself, an old or missing hash) must be
revalidated each time (``no-cache``) and answers ``304`` when the client's
``If-None-Match`` matches.  An upgrade of piccolod is thus seen at the
next page load, and a reload costs one 304 for the page.

Mounting, in the API service (``piccolod/api/service.py``)::

    from .portal import portal_routes
    portal_routes(router, kernel)

or, standalone (tests, a bare ``Site``): ``Site(portal_resource())``.

Tests: ``tests/unit/test_portal.py``, ``tests/integration/test_portal_browser.py``.
"""

from __future__ import annotations

import hashlib
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from piccolod.errors import NotFound
from piccolod.events import TOPICS

from .http import RawResponse, Router

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "CONTENT_TYPES",
    "STATIC_DIR",
    "StaticFile",
    "StaticPortal",
    "portal_resource",
    "portal_routes",
]

log = Logger()

#: The directory shipped with the package (package data ``static/*``).
STATIC_DIR = Path(__file__).with_name("static")

#: No inline script or style anywhere: everything comes from this origin.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "font-src 'self'",
        "manifest-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

#: Headers of every portal response, besides the router's security headers.
PORTAL_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

#: The file types the portal serves, by suffix; other files are never served.
CONTENT_TYPES: Mapping[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
}

#: A servable file name: no separator, no leading dot, no ``..``.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)+")

#: The page served at ``/``.
INDEX = "index.html"

REVALIDATE = "no-cache"
IMMUTABLE = "public, max-age=31536000, immutable"


@attrs.frozen
class StaticFile:
    """One servable file: its bytes, content type and strong entity tag."""

    name: str
    body: bytes = attrs.field(repr=False)
    content_type: str
    etag: str

    @property
    def version(self) -> str:
        """The short hash used in ``?v=`` references."""
        return self.etag.strip('"')[:16]

    @classmethod
    def of(cls, name: str, body: bytes) -> StaticFile:
        suffix = "." + name.rsplit(".", 1)[-1]
        digest = hashlib.sha256(body).hexdigest()
        return cls(name, body, CONTENT_TYPES[suffix], f'"{digest[:32]}"')


def _servable(name: str) -> bool:
    return (
        _NAME.fullmatch(name) is not None
        and ".." not in name
        and "." + name.rsplit(".", 1)[-1] in CONTENT_TYPES
    )


@attrs.frozen
class StaticPortal:
    """The portal's files, read once; :meth:`respond` answers one request."""

    files: Mapping[str, StaticFile]

    @classmethod
    def from_directory(
        cls, directory: Path = STATIC_DIR, topics: Iterable[str] = ()
    ) -> StaticPortal:
        """
        Every servable regular file directly in ``directory`` (symlinks,
        sub-directories, hidden files and unknown types are skipped), with
        ``index.html``'s asset references versioned and ``topics`` (the
        event topics the log's filter offers) written into its
        ``<meta name="piccolod-topics">``.  Raises ``OSError`` when the
        directory cannot be read and ``ValueError`` without an
        ``index.html``.
        """
        files: dict[str, StaticFile] = {}
        for path in sorted(directory.iterdir()):
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode) or not _servable(path.name):
                log.debug("portal: not serving {name}", name=path.name)
                continue
            files[path.name] = StaticFile.of(path.name, path.read_bytes())
        if INDEX not in files:
            raise ValueError(f"no {INDEX} in {directory}")
        page = _with_topics(files[INDEX].body, topics)
        files[INDEX] = StaticFile.of(INDEX, _versioned(page, files))
        return cls(files)

    def get(self, name: str) -> StaticFile:
        """The file ``name``; raises ``NotFound`` for anything not shipped."""
        found = self.files.get(name) if _servable(name) else None
        if found is None:
            raise NotFound("no such portal file")
        return found

    def respond(
        self, name: str, if_none_match: bytes | None = None, version: str | None = None
    ) -> RawResponse:
        """
        The response for file ``name``: 200 with its body, or 304 when
        ``if_none_match`` names its current tag; ``version`` is the
        request's ``v`` query (immutable caching when it is current).
        Raises ``NotFound``.
        """
        found = self.get(name)
        immutable = version is not None and version == found.version and name != INDEX
        headers = {
            **PORTAL_HEADERS,
            "Cache-Control": IMMUTABLE if immutable else REVALIDATE,
            "ETag": found.etag,
        }
        content_type = found.content_type.encode()
        if if_none_match is not None and _matches(if_none_match, found.etag):
            return RawResponse(b"", content_type, 304, headers)
        return RawResponse(found.body, content_type, 200, headers)


def _matches(header: bytes, etag: str) -> bool:
    """Whether an ``If-None-Match`` value names ``etag`` (weak comparison, RFC 9110)."""
    wanted = header.decode("latin-1").strip()
    if wanted == "*":
        return True
    tags = (t.strip().removeprefix("W/") for t in wanted.split(","))
    return etag in tags


_TOPICS_META = b'<meta name="piccolod-topics" content="">'
_TOPIC = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _with_topics(page: bytes, topics: Iterable[str]) -> bytes:
    """``page`` with the well-formed ``topics`` in its topics meta element."""
    listed = ",".join(sorted({t for t in topics if _TOPIC.fullmatch(t)}))
    return page.replace(
        _TOPICS_META, _TOPICS_META.replace(b'content=""', f'content="{listed}"'.encode())
    )


def _versioned(page: bytes, files: Mapping[str, StaticFile]) -> bytes:
    """``page`` with each ``"/portal/<asset>"`` reference given its ``?v=<hash>``."""
    for name, found in files.items():
        if name == INDEX:
            continue
        page = page.replace(
            f'"/portal/{name}"'.encode(), f'"/portal/{name}?v={found.version}"'.encode()
        )
    return page


def portal_routes(router: Router, kernel: Any = None, directory: Path = STATIC_DIR) -> StaticPortal:
    """
    Serve the portal from ``router``: ``GET /`` (and ``/portal``) the page,
    ``GET /portal/<name>`` each shipped file, one route per file (so the
    OpenAPI document names every file with its content type, and any other
    path is the router's 404).  All are public: the page asks for a login
    itself.  ``kernel`` is accepted so that every route group mounts the
    same way; the portal needs nothing of it.  Returns the loaded files.
    """
    del kernel
    portal = StaticPortal.from_directory(directory, TOPICS)
    meta: dict[str, Any] = {"public": True, "csrf": False, "tags": ("portal",)}

    def page(request: Request) -> RawResponse:
        return portal.respond(INDEX, request.getHeader(b"if-none-match"))

    for template, name in (("/", "portal.page"), ("/portal", "portal.index")):
        router.add(
            "GET",
            template,
            page,
            name,
            summary="The operator portal",
            responses={200: ("text/html", {"type": "string"})},
            **meta,
        )
    for found in portal.files.values():
        router.add(
            "GET",
            f"/portal/{found.name}",
            _asset_handler(portal, found.name),
            f"portal.file.{found.name}",
            summary=f"The portal's {found.name}",
            query={"v": {"type": "string", "maxLength": 64}},
            responses={200: (found.content_type.split(";")[0], {"type": "string"})},
            **meta,
        )
    return portal


def _asset_handler(portal: StaticPortal, name: str) -> Any:
    def asset(request: Request, query: Mapping[str, Any] | None = None) -> RawResponse:
        return portal.respond(name, request.getHeader(b"if-none-match"), (query or {}).get("v"))

    return asset


def portal_resource(kernel: Any = None, directory: Path = STATIC_DIR) -> Resource:
    """A resource serving only the portal (the API's router with no other route)."""
    router = Router()
    portal_routes(router, kernel, directory)
    return router
