"""
The HTTP plumbing of the API: a small method+path router on
``twisted.web.resource.Resource``, JSON responses, and the one error shape
(RFC 9457 ``application/problem+json``) for every failure.

Why not klein: importing klein (and werkzeug) costs about 17 MB of resident
memory, a third of the daemon's idle budget on a Raspberry Pi; the routing
piccolod needs is a table of ``(method, "/path/{param}")`` entries.

Handlers are ``handler(request, **params)`` returning (or firing with, for
Deferreds and coroutines) a :class:`JSONResponse`, a plain JSON-able value
(status 200), or raising a :class:`~piccolod.errors.PiccolodError`, which
maps to its one status and problem body.  Anything else is a logged 500
whose body says nothing internal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from piccolod.errors import InvalidCommand, NotFound, PiccolodError, TooLarge
from piccolod.kernel.aio import call

log = Logger()

PROBLEM_JSON = b"application/problem+json"
JSON = b"application/json"

#: Security headers sent with every API response.
SECURITY_HEADERS: Mapping[bytes, bytes] = {
    b"x-content-type-options": b"nosniff",
    b"cache-control": b"no-store",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
}


class MethodNotAllowed(PiccolodError):
    type = "method-not-allowed"
    title = "Method not allowed"
    status = 405

    def __init__(self, method: str, allowed: Sequence[str]) -> None:
        super().__init__(f"{method} is not allowed here", allow=list(allowed))
        self.allowed = list(allowed)


@attrs.frozen
class JSONResponse:
    """A JSON body with a status and extra headers."""

    body: Any
    status: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)
    content_type: bytes = JSON


@attrs.frozen
class RawResponse:
    """A non-JSON body (``/metrics`` text, static files)."""

    body: bytes
    content_type: bytes
    status: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)


def problem_response(error: PiccolodError, instance: str = "") -> JSONResponse:
    """The problem+json response of a typed error."""
    body = error.problem()
    if instance:
        body["instance"] = instance
    headers: dict[str, str] = {}
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = ", ".join(error.allowed)
    return JSONResponse(body, error.status, headers, PROBLEM_JSON)


_PARAM = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


@attrs.frozen
class Route:
    method: str
    template: str
    regex: re.Pattern[str]
    handler: Callable[..., Any]
    name: str


class Router(Resource):
    """
    A leaf resource that dispatches on method and path template.

    ``/api/v1/jobs/{job_id}`` matches one path segment per parameter.
    Unknown paths answer 404 and known paths with another method 405 (with
    ``Allow``), both as problem+json.
    """

    isLeaf = True

    def __init__(
        self,
        max_body: int = 1 << 20,
        observe: Callable[[str, str, int, float], None] | None = None,
        clock: Any = None,
    ) -> None:
        super().__init__()
        self._routes: list[Route] = []
        self.max_body = max_body
        #: ``observe(method, route template, status, seconds)`` after each response.
        self.observe = observe
        self.clock = clock

    def route(self, method: str, template: str, name: str | None = None) -> Callable[..., Any]:
        """Decorator registering ``handler(request, **params)``."""

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self.add(method, template, handler, name)
            return handler

        return register

    def add(
        self, method: str, template: str, handler: Callable[..., Any], name: str | None = None
    ) -> None:
        pattern = "^" + _PARAM.sub(r"(?P<\1>[^/]+)", re.escape(template).replace(r"\{", "{").replace(r"\}", "}")) + "/?$"
        self._routes.append(
            Route(method.upper(), template, re.compile(pattern), handler, name or template)
        )

    def routes(self) -> list[tuple[str, str]]:
        return [(r.method, r.template) for r in self._routes]

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for r in self._routes:
            m = r.regex.match(path)
            if m is None:
                continue
            if r.method == method or (method == "HEAD" and r.method == "GET"):
                return r, m.groupdict()
            allowed.append(r.method)
        if allowed:
            raise MethodNotAllowed(method, sorted(set(allowed)))
        raise NotFound(f"no resource at {path}")

    def render(self, request: Request) -> int | bytes:  # type: ignore[override]
        method = (request.method or b"GET").decode("ascii", "replace").upper()
        path = (request.path or b"/").decode("utf-8", "replace")
        request._piccolod_route = "unmatched"  # type: ignore[attr-defined]
        if self.clock is not None:
            request._piccolod_start = self.clock.seconds()  # type: ignore[attr-defined]
        try:
            route, params = self.match(method, path)
            request._piccolod_route = route.template  # type: ignore[attr-defined]
            length = request.getHeader(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                raise TooLarge(f"request bodies are limited to {self.max_body} bytes")
        except PiccolodError as e:
            self._write(request, problem_response(e, path))
            return NOT_DONE_YET
        d = call(route.handler, request, **params)
        finished = request.notifyFinish()
        finished.addErrback(lambda _f: d.cancel())
        d.addCallbacks(
            lambda result: self._write(request, _as_response(result)),
            lambda f: self._fail(request, f, path),
        )
        return NOT_DONE_YET

    def _fail(self, request: Request, failure: Failure, path: str) -> None:
        if failure.check(CancelledError) and request._disconnected:  # type: ignore[attr-defined]
            return None
        error = failure.value
        if not isinstance(error, PiccolodError):
            log.failure("unhandled error serving {path}", failure, path=path)
            error = PiccolodError("the server could not complete the request")
        self._write(request, problem_response(error, path))
        return None

    def _write(self, request: Request, response: JSONResponse | RawResponse) -> None:
        if request._disconnected or request.finished:  # type: ignore[attr-defined]
            return
        if isinstance(response, RawResponse):
            body = response.body
        else:
            body = json.dumps(response.body, separators=(",", ":"), default=_default).encode()
        request.setResponseCode(response.status)
        request.setHeader(b"content-type", response.content_type)
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        for name, value in response.headers.items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        request.setHeader(b"content-length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()
        if self.observe is not None:
            start = getattr(request, "_piccolod_start", None)
            duration = self.clock.seconds() - start if start is not None else 0.0
            self.observe(
                (request.method or b"").decode("ascii", "replace"),
                request._piccolod_route,  # type: ignore[attr-defined]
                response.status,
                duration,
            )


def _as_response(result: Any) -> JSONResponse | RawResponse:
    if isinstance(result, (JSONResponse, RawResponse)):
        return result
    return JSONResponse(result)


def _default(value: Any) -> Any:
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json()
    if attrs.has(type(value)):
        return attrs.asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(request: Request, max_body: int = 1 << 20) -> Any:
    """
    The request's JSON body; raises ``TooLarge`` past ``max_body`` and
    ``InvalidCommand`` for anything that is not a JSON document.
    """
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type != JSON:
        raise InvalidCommand("the request body must be application/json")
    assert request.content is not None
    raw = request.content.read(max_body + 1)
    if len(raw) > max_body:
        raise TooLarge(f"request bodies are limited to {max_body} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidCommand(f"the request body is not valid JSON: {e}") from None


__all__ = [
    "JSONResponse",
    "MethodNotAllowed",
    "RawResponse",
    "Router",
    "problem_response",
    "read_json",
]
