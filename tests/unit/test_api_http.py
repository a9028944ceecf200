"""Tests for piccolod.api.http: routing, JSON responses and the one problem+json shape."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from piccolod.api.http import JSONResponse, Router, read_json
from piccolod.errors import (
    CommandTimeout,
    Locked,
    NotLeader,
    PolicyDenied,
    RateLimited,
)


def make_router() -> Router:
    router = Router(max_body=64)

    @router.route("GET", "/api/v1/things/{name}")
    def thing(request: Request, name: str) -> Any:
        if name == "locked":
            raise Locked()
        if name == "follower":
            raise NotLeader("control-plane", leader_hint="http://10.0.0.2:8080", leader_id="b")
        if name == "busy":
            raise RateLimited("slow down", retry_after=2.5)
        if name == "boom":
            raise RuntimeError("secret internals")
        return {"name": name}

    @router.route("POST", "/api/v1/things")
    def create(request: Request) -> Any:
        body = read_json(request, max_body=64)
        return JSONResponse({"created": body}, status=201)

    @router.route("GET", "/api/v1/async")
    async def asynchronous(request: Request) -> Any:
        return {"async": True}

    @router.route("GET", "/api/v1/deferred")
    def deferred(request: Request) -> Deferred[Any]:
        return succeed({"deferred": True})

    @router.route("GET", "/api/v1/denied")
    def denied(request: Request) -> Any:
        raise PolicyDenied("viewer may not do that")

    @router.route("GET", "/api/v1/slow")
    def slow(request: Request) -> Any:
        raise CommandTimeout("took too long")

    return router


class RouterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.treq = StubTreq(make_router())

    def get(self, path: str, method: str = "GET", **kw: Any) -> tuple[int, dict[str, Any], Any]:
        response = self.successResultOf(self.treq.request(method, "http://x" + path, **kw))
        body = self.successResultOf(response.content())
        raw = response.headers.getAllRawHeaders()
        headers = {k.decode().lower(): v[0].decode() for k, v in raw}
        return response.code, headers, json.loads(body) if body else None

    def test_route_with_parameter(self) -> None:
        """A path parameter reaches the handler and the result is JSON with security headers."""
        code, headers, body = self.get("/api/v1/things/alpha")
        self.assertEqual(code, 200)
        self.assertEqual(body, {"name": "alpha"})
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["cache-control"], "no-store")

    def test_async_and_deferred_handlers(self) -> None:
        """Coroutine and Deferred handlers are awaited."""
        self.assertEqual(self.get("/api/v1/async")[2], {"async": True})
        self.assertEqual(self.get("/api/v1/deferred")[2], {"deferred": True})

    def test_unknown_path_is_problem_404(self) -> None:
        """An unknown path is a 404 problem+json with type and instance."""
        code, headers, body = self.get("/api/v1/nope")
        self.assertEqual(code, 404)
        self.assertEqual(headers["content-type"], "application/problem+json")
        self.assertEqual(body["type"], "https://piccolod.dev/problems/not-found")
        self.assertEqual(body["status"], 404)
        self.assertEqual(body["instance"], "/api/v1/nope")

    def test_wrong_method_is_405_with_allow(self) -> None:
        """A known path with another method is 405 naming the allowed methods."""
        code, headers, body = self.get("/api/v1/things/alpha", method="DELETE")
        self.assertEqual(code, 405)
        self.assertEqual(headers["allow"], "GET")
        self.assertEqual(body["allow"], ["GET"])

    def test_typed_errors_map_to_one_status_each(self) -> None:
        """Each typed error has its status and stable type."""
        cases = {
            "/api/v1/things/locked": (423, "locked"),
            "/api/v1/things/follower": (409, "not-leader"),
            "/api/v1/things/busy": (429, "rate-limited"),
            "/api/v1/denied": (403, "forbidden"),
            "/api/v1/slow": (504, "timeout"),
        }
        for path, (status, slug) in cases.items():
            code, _, body = self.get(path)
            self.assertEqual((code, body["type"].rsplit("/", 1)[1]), (status, slug), path)

    def test_not_leader_carries_the_leader_hint(self) -> None:
        """NotLeader's problem body names the leader's address."""
        _, _, body = self.get("/api/v1/things/follower")
        self.assertEqual(body["leader"], "http://10.0.0.2:8080")
        self.assertEqual(body["resource"], "control-plane")

    def test_rate_limited_sets_retry_after(self) -> None:
        """429 carries Retry-After rounded up to whole seconds."""
        _, headers, _ = self.get("/api/v1/things/busy")
        self.assertEqual(headers["retry-after"], "3")

    def test_unexpected_error_is_500_without_internals(self) -> None:
        """An untyped exception is a logged 500 whose body leaks nothing."""
        code, _, body = self.get("/api/v1/things/boom")
        self.assertEqual(code, 500)
        self.assertNotIn("secret", json.dumps(body))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_json_body(self) -> None:
        """A JSON body is parsed and the handler's status is used."""
        code, _, body = self.get(
            "/api/v1/things",
            method="POST",
            data=b'{"a": 1}',
            headers={b"content-type": [b"application/json"]},
        )
        self.assertEqual((code, body), (201, {"created": {"a": 1}}))

    def test_body_too_large(self) -> None:
        """A body over the limit is a 413 before the handler runs."""
        code, _, body = self.get(
            "/api/v1/things",
            method="POST",
            data=b'{"a": "' + b"x" * 100 + b'"}',
            headers={b"content-type": [b"application/json"]},
        )
        self.assertEqual(code, 413)
        self.assertEqual(body["type"].rsplit("/", 1)[1], "too-large")

    def test_malformed_json_and_wrong_type(self) -> None:
        """Malformed JSON and a non-JSON content type are 400 invalid."""
        code, _, body = self.get(
            "/api/v1/things",
            method="POST",
            data=b"{nope",
            headers={b"content-type": [b"application/json"]},
        )
        self.assertEqual((code, body["type"].rsplit("/", 1)[1]), (400, "invalid"))
        code, _, _ = self.get(
            "/api/v1/things", method="POST", data=b"{}", headers={b"content-type": [b"text/plain"]}
        )
        self.assertEqual(code, 400)

    def test_head_is_get_without_body(self) -> None:
        """HEAD on a GET route answers 200 with no body."""
        response = self.successResultOf(self.treq.head("http://x/api/v1/things/a"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), b"")


class RobustnessTests(SynchronousTestCase):
    def test_an_answer_that_is_not_json_is_a_logged_500(self) -> None:
        """A handler answering something JSON cannot encode gets a problem+json 500, not a hang."""
        router = Router()

        @router.route("GET", "/api/v1/odd")
        def odd(request: Request) -> Any:
            return {"value": object()}

        response = self.successResultOf(StubTreq(router).get("http://x/api/v1/odd"))
        self.assertEqual(response.code, 500)
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(body["type"], "https://piccolod.dev/problems/internal")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_synchronous_and_failing_handlers(self) -> None:
        """A handler raising synchronously answers at once with its problem."""
        router = Router()

        @router.route("POST", "/api/v1/fail")
        def fail(request: Request) -> Any:
            raise Locked()

        response = self.successResultOf(StubTreq(router).post("http://x/api/v1/fail"))
        self.assertEqual(response.code, 423)

    def test_path_parameters_are_percent_decoded(self) -> None:
        """Path parameters reach handlers decoded; invalid UTF-8 is a 400, not a 500."""
        router = Router()

        @router.route("GET", "/api/v1/things/{name}")
        def thing(request: Request, name: str) -> Any:
            return {"name": name}

        stub = StubTreq(router)
        response = self.successResultOf(stub.get("http://x/api/v1/things/a%2Fb%20%C3%A9"))
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(body, {"name": "a/b é"})
        response = self.successResultOf(stub.get("http://x/api/v1/things/%FF"))
        self.assertEqual(response.code, 400)

    def test_exact_paths_shadow_templates(self) -> None:
        """A path a parameterless route names is that route's alone: 405 Allow lists its methods."""
        router = Router()

        @router.route("GET", "/api/v1/apps/{name}")
        def get(request: Request, name: str) -> Any:
            return {"name": name}

        @router.route("POST", "/api/v1/apps/validate")
        def validate(request: Request) -> Any:
            return {"valid": True}

        stub = StubTreq(router)
        response = self.successResultOf(stub.get("http://x/api/v1/apps/validate"))
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["POST"])
        response = self.successResultOf(stub.get("http://x/api/v1/apps/web"))
        self.assertEqual(response.code, 200)


class _Consumer:
    """What _FileStreamer sees of a request: writes, a producer, finish."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.written = bytearray()
        self.producer: Any = None
        self.finished = False
        self._disconnected = False
        self.pause_after = pause_after

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written += data
        if self.pause_after is not None and len(self.written) >= self.pause_after:
            self.producer.pauseProducing()  # the transport's buffer is full

    def finish(self) -> None:
        self.finished = True


class FileStreamerTests(SynchronousTestCase):
    def setUp(self) -> None:
        from pathlib import Path

        self.path = Path(self.mktemp())
        self.data = bytes(range(256)) * 1024  # 256 KiB: four chunks
        self.path.write_bytes(self.data)

    def test_pauses_resumes_and_finishes(self) -> None:
        """Writing stops while paused, carries on when resumed, and finishes at the end."""
        from piccolod.api.http import _FileStreamer

        request = _Consumer(pause_after=_FileStreamer.CHUNK)
        f = self.path.open("rb")
        streamer = _FileStreamer(request, f)  # type: ignore[arg-type]
        streamer.start()
        self.assertEqual(len(request.written), _FileStreamer.CHUNK)
        self.assertFalse(request.finished)
        request.pause_after = None
        streamer.resumeProducing()
        self.assertEqual(bytes(request.written), self.data)
        self.assertTrue(request.finished and f.closed)
        self.assertIsNone(request.producer)

    def test_stopped_by_a_client_that_went_away(self) -> None:
        """stopProducing closes the file and never finishes the request."""
        from piccolod.api.http import _FileStreamer

        request = _Consumer(pause_after=1)
        f = self.path.open("rb")
        streamer = _FileStreamer(request, f)  # type: ignore[arg-type]
        streamer.start()
        streamer.stopProducing()
        streamer.resumeProducing()  # nothing more happens
        self.assertEqual(len(request.written), _FileStreamer.CHUNK)
        self.assertTrue(f.closed)
        self.assertFalse(request.finished)
