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

import inspect
import io
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from piccolod.errors import InvalidCommand, NotFound, PiccolodError, TooLarge, Unauthorized
from piccolod.kernel.aio import to_deferred

from .schema import validate

log = Logger()

PROBLEM_JSON = b"application/problem+json"
JSON = b"application/json"

#: Security headers of every JSON (and problem+json) answer: never sniffed
#: as anything else, never cached.
API_HEADERS: Mapping[bytes, bytes] = {
    b"x-content-type-options": b"nosniff",
    b"cache-control": b"no-store",
}

#: Security headers of every other answer (documents a browser may render:
#: the portal, metrics text), which also must not be framed or leak a
#: referrer.  JSON answers go without these two: a browser never renders
#: them as documents (nosniff), and each header costs about 2 % of the
#: throughput of a small answer.
SECURITY_HEADERS: Mapping[bytes, bytes] = {
    **API_HEADERS,
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
}

_JSON_TYPES = frozenset({b"application/json", b"application/problem+json"})


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
    #: ``Set-Cookie`` header values.
    cookies: tuple[str, ...] = ()


@attrs.frozen
class RawResponse:
    """A non-JSON body (``/metrics`` text, static files)."""

    body: bytes
    content_type: bytes
    status: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)
    cookies: tuple[str, ...] = ()


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
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="piccolod"'
    return JSONResponse(body, error.status, headers, PROBLEM_JSON)


_PARAM = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


#: Methods that never change state: no CSRF token is asked for them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class _Streaming:
    """The type of :data:`STREAMING`."""

    def __repr__(self) -> str:
        return "STREAMING"


#: What a handler returns when it writes and finishes the response itself
#: (Server-Sent Events): the router then writes nothing.
STREAMING = _Streaming()


@attrs.frozen
class Route:
    """
    One ``(method, template)`` entry and what the boundary and the OpenAPI
    document need to know of it.

    @ivar public: served without credentials.
    @ivar action: the policy action the HTTP boundary checks (``None``:
        authentication only; routes that dispatch commands are decided by
        the dispatcher's policy middleware on the command itself).
    @ivar resource: the policy resource from the path parameters.
    @ivar csrf: a session-authenticated request needs the CSRF token
        (unsafe methods only).
    @ivar body: the JSON schema of the request body; the router reads and
        validates it and passes it to the handler as ``body=``.
    @ivar query: name → JSON schema of the query parameters; validated
        values are passed as ``query=``.
    @ivar params: name → JSON schema of the path parameters.
    @ivar content: media type → ``{"schema": ...}`` of a request body the
        handler reads itself (YAML specs): documentation only; ``body`` is
        the one the router validates.
    @ivar responses: status → (content type, JSON schema) of success answers.
    @ivar errors: the error statuses this route may answer (documented).
    """

    method: str
    template: str
    regex: re.Pattern[str]
    handler: Callable[..., Any]
    name: str
    public: bool = False
    action: str | None = None
    resource: Callable[[Mapping[str, str]], str] | None = None
    csrf: bool = True
    body: Mapping[str, Any] | None = None
    query: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    params: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    content: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    responses: Mapping[int, tuple[str, Mapping[str, Any]]] = attrs.field(factory=dict)
    errors: tuple[int, ...] = ()
    summary: str = ""
    tags: tuple[str, ...] = ()
    stream: bool = False

    @property
    def params_in_template(self) -> bool:
        return "{" in self.template


class Router(Resource):
    """
    A leaf resource that dispatches on method and path template.

    ``/api/v1/jobs/{job_id}`` matches one path segment per parameter.
    Unknown paths answer 404 and known paths with another method 405 (with
    ``Allow``), both as problem+json.

    Per request, in order: match the route; refuse a body over
    ``max_body`` (413); run ``guard(request, route, params)`` (the API's
    authentication and policy; it raises a typed error to refuse);
    validate path and query parameters and the JSON body against the
    route's schemas (400, before any command is built); call the handler.
    Without a ``guard`` every route is open (tests, benchmarks).
    """

    isLeaf = True

    def __init__(
        self,
        max_body: int = 1 << 20,
        observe: Callable[[str, str, int, float], None] | None = None,
        clock: Any = None,
        guard: Callable[[Request, Route, Mapping[str, str]], None] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._routes: list[Route] = []
        #: ``(method, path)`` of parameterless routes: the fast path.
        self._static: dict[tuple[str, str], Route] = {}
        self._static_paths: set[str] = set()
        self.max_body = max_body
        #: ``observe(method, route template, status, seconds)`` after each response.
        self.observe = observe
        self.clock = clock
        self.guard = guard

    def route(
        self, method: str, template: str, name: str | None = None, **meta: Any
    ) -> Callable[..., Any]:
        """Decorator registering ``handler(request, **params)``; ``meta``: see :class:`Route`."""

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self.add(method, template, handler, name, **meta)
            return handler

        return register

    def add(
        self,
        method: str,
        template: str,
        handler: Callable[..., Any],
        name: str | None = None,
        **meta: Any,
    ) -> Route:
        method = method.upper()
        if any(r.method == method and r.template == template for r in self._routes):
            raise ValueError(f"route {method} {template} is already registered")
        escaped = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
        pattern = "^" + _PARAM.sub(r"(?P<\1>[^/]+)", escaped) + "/?$"
        route = Route(method, template, re.compile(pattern), handler, name or template, **meta)
        self._routes.append(route)
        if not _PARAM.search(template):
            self._static[(method, template)] = route
            self._static.setdefault((method, template + "/"), route)
            self._static_paths.update((template, template + "/"))
        return route

    def routes(self) -> list[tuple[str, str]]:
        return [(r.method, r.template) for r in self._routes]

    def all_routes(self) -> list[Route]:
        """Every route, in registration order (the OpenAPI builder reads them)."""
        return list(self._routes)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """
        The route for ``method`` on ``path``.  A path that a parameterless
        route names exactly is that route's alone (``/api/v1/apps/validate``
        is never ``/api/v1/apps/{name}`` with the name "validate"), so the
        methods in ``Allow`` are exactly the ones documented for it.
        """
        static = self._static.get((method, path))
        if static is None and method == "HEAD":
            static = self._static.get(("GET", path))
        if static is not None:
            return static, {}
        routes = self._routes
        if path in self._static_paths:
            routes = [r for r in routes if not r.params_in_template and r.regex.match(path)]
        allowed: list[str] = []
        for r in routes:
            m = r.regex.match(path)
            if m is None:
                continue
            if r.method == method or (method == "HEAD" and r.method == "GET"):
                # The path is matched raw (an encoded "/" stays inside its
                # segment); parameters are then percent-decoded.
                return r, {k: _path_param(v) for k, v in m.groupdict().items()}
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
            if getattr(request.content, "overflow", False):
                raise TooLarge(f"request bodies are limited to {self.max_body} bytes")
            length = request.getHeader(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                raise TooLarge(f"request bodies are limited to {self.max_body} bytes")
            if self.guard is not None:
                self.guard(request, route, params)
            kwargs: dict[str, Any] = dict(params)
            if route.params:
                _check_params(route, params)
            if route.query:
                kwargs["query"] = _parse_query(route, request)
            if route.body is not None:
                value = read_json(request, self.max_body)
                errors = validate(route.body, value, "body")
                if errors:
                    raise InvalidCommand(errors[0], errors=errors)
                kwargs["body"] = value
        except PiccolodError as e:
            self._write(request, problem_response(e, path))
            return NOT_DONE_YET
        try:
            result = route.handler(request, **kwargs)
        except BaseException:
            self._fail(request, Failure(), path)  # type: ignore[no-untyped-call]
            return NOT_DONE_YET
        if not (isinstance(result, Deferred) or inspect.isawaitable(result)):
            # Answered synchronously: the common case, with no Deferred at all.
            if result is not STREAMING:
                self._write(request, result)
            return NOT_DONE_YET
        d = to_deferred(result)
        finished = request.notifyFinish()
        finished.addErrback(lambda _f: d.cancel())
        d.addCallbacks(
            lambda result: None if result is STREAMING else self._write(request, result),
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

    def _write(self, request: Request, response: Any) -> None:
        """Send ``response``: a JSONResponse, a RawResponse, or a plain value (200 JSON)."""
        if request._disconnected or request.finished:  # type: ignore[attr-defined]
            return
        status = 200
        try:
            if isinstance(response, RawResponse):
                body = response.body
                content_type = response.content_type
            elif isinstance(response, JSONResponse):
                body = json.dumps(response.body, separators=(",", ":"), default=_default).encode()
                content_type = response.content_type
            else:  # a plain JSON-able value
                body = json.dumps(response, separators=(",", ":"), default=_default).encode()
                content_type = JSON
        except (TypeError, ValueError):
            log.failure("the answer to {path} is not JSON", path=request.path)
            response = problem_response(PiccolodError("the server could not encode its answer"))
            body = json.dumps(response.body, separators=(",", ":")).encode()
            content_type = response.content_type
        request.setHeader(b"content-type", content_type)
        extra = API_HEADERS if content_type in _JSON_TYPES else SECURITY_HEADERS
        for name, value in extra.items():
            request.setHeader(name, value)
        if isinstance(response, (JSONResponse, RawResponse)):
            status = response.status
            for header, text in response.headers.items():
                request.setHeader(header.encode("latin-1"), text.encode("latin-1"))
            for cookie in response.cookies:
                request.responseHeaders.addRawHeader(b"set-cookie", cookie.encode("latin-1"))
        request.setResponseCode(status)
        request.setHeader(b"content-length", b"%d" % len(body))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()
        if self.observe is not None:
            start = getattr(request, "_piccolod_start", None)
            duration = self.clock.seconds() - start if start is not None else 0.0
            self.observe(
                (request.method or b"").decode("ascii", "replace"),
                request._piccolod_route,  # type: ignore[attr-defined]
                status,
                duration,
            )


def _path_param(raw: str) -> str:
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise InvalidCommand("a path parameter is not valid UTF-8 once decoded") from None


def _check_params(route: Route, params: Mapping[str, str]) -> None:
    errors: list[str] = []
    for name, schema in route.params.items():
        if name in params:
            errors.extend(validate(schema, params[name], name))
    if errors:
        raise InvalidCommand(errors[0], errors=errors)


def _parse_query(route: Route, request: Request) -> dict[str, Any]:
    """The route's query parameters, converted to their schema's type and validated."""
    args: dict[bytes, list[bytes]] = request.args or {}
    out: dict[str, Any] = {}
    errors: list[str] = []
    for name, schema in route.query.items():
        raw = args.get(name.encode())
        if not raw:
            continue
        if len(raw) > 1 and schema.get("type") != "array":
            errors.append(f"query parameter {name} given more than once")
            continue
        try:
            text = raw[0].decode("utf-8")
        except UnicodeDecodeError:
            errors.append(f"query parameter {name} is not UTF-8")
            continue
        value: Any = text
        kind = schema.get("type")
        if kind == "integer":
            try:
                value = int(text)
            except ValueError:
                errors.append(f"query parameter {name} must be an integer")
                continue
        elif kind == "boolean":
            if text not in ("true", "false"):
                errors.append(f"query parameter {name} must be true or false")
                continue
            value = text == "true"
        found = validate(schema, value, f"query parameter {name}")
        if found:
            errors.extend(found)
            continue
        out[name] = value
    if errors:
        raise InvalidCommand(errors[0], errors=errors)
    return out


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


class LimitedBuffer(io.BytesIO):
    """
    A request body buffer that keeps at most ``limit`` bytes: beyond that it
    discards what arrives and sets ``overflow``, so that an oversized body
    never fills memory or a temp file (the router answers 413).
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.overflow = False

    def write(self, data: Any) -> int:
        if self.overflow:
            return len(data)
        if self.tell() + len(data) > self.limit:
            self.overflow = True
            self.seek(0)
            self.truncate()
            return len(data)
        return super().write(data)


class APISite(Site):
    """
    A ``Site`` whose request bodies go into :class:`LimitedBuffer` of
    ``max_body``, and that writes the common-log-format access line only
    with ``access_log`` (requests are counted in ``/metrics`` and security
    decisions are audit records; a log line per request costs more than
    the request).
    """

    def __init__(
        self, resource: Resource, max_body: int = 1 << 20, access_log: bool = False, **kw: Any
    ) -> None:
        super().__init__(resource, **kw)  # type: ignore[no-untyped-call]
        self.max_body = max_body
        self.access_log = access_log
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        if self.access_log:
            super().log(request)

    def getContentFile(self, length: int | None) -> LimitedBuffer:
        buffer = LimitedBuffer(self.max_body)
        if length is not None and length > self.max_body:
            buffer.overflow = True
        return buffer


@implementer(IPushProducer)
class _FileStreamer:
    """
    A push producer of one open file into a request: writes chunks until
    the transport pauses it (its buffer is full), carries on when resumed,
    finishes the request at the end; stopped (the client went away), it
    closes the file and finishes nothing.
    """

    CHUNK = 64 * 1024

    def __init__(self, request: Request, f: BinaryIO) -> None:
        self.request = request
        self.file = f
        self.paused = False
        self.done = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self._pump()

    def _pump(self) -> None:
        while not self.paused and not self.done:
            data = self.file.read(self.CHUNK)
            if not data:
                self._end()
                return
            self.request.write(data)  # may pause us, synchronously

    def _end(self) -> None:
        self.done = True
        self.file.close()
        self.request.unregisterProducer()
        if not self.request._disconnected and not self.request.finished:  # type: ignore[attr-defined]
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._pump()

    def stopProducing(self) -> None:
        self.done = True
        self.file.close()


def send_file(request: Request, path: Path, content_type: str, filename: str) -> None:
    """
    Stream the file at ``path`` as the answer (200, ``Content-Length``,
    ``Content-Disposition: attachment``) with a push producer, so a large
    file never sits in memory and a slow client slows the reads; a client
    that goes away stops it and the file is closed.  Raises ``NotFound``
    when the file cannot be opened (before anything is sent).
    """
    try:
        f = path.open("rb")
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise NotFound(f"{filename} is gone") from None
    size = os.fstat(f.fileno()).st_size
    request.setResponseCode(200)
    request.setHeader(b"content-type", content_type.encode("ascii"))
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"content-length", b"%d" % size)
    request.setHeader(
        b"content-disposition", f'attachment; filename="{filename}"'.encode("latin-1")
    )
    if request.method == b"HEAD":
        f.close()
        request.finish()
        return
    _FileStreamer(request, f).start()


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
    "API_HEADERS",
    "SAFE_METHODS",
    "SECURITY_HEADERS",
    "STREAMING",
    "APISite",
    "JSONResponse",
    "LimitedBuffer",
    "MethodNotAllowed",
    "RawResponse",
    "Route",
    "Router",
    "problem_response",
    "read_json",
    "send_file",
]
