"""
Shared set-up of the API unit tests: a kernel on a ``Clock``, the real
persistence service on a temp dir (inline pools, a fast KDF, no volumes),
the real API service, and a small client over ``StubTreq`` that keeps the
session cookie and CSRF token like a browser would.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.api.service import APIService
from piccolod.events import Role
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.jobs import JobRunner
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.kernel.runtime import Kernel
from piccolod.kernel.supervisor import Supervisor
from piccolod.persistence.keyset import KdfParams
from piccolod.persistence.service import PersistenceConfig, PersistenceService

PASSWORD = "correct horse battery"
FAST = KdfParams(time_cost=1, memory_kib=8, parallelism=1)


class Response:
    def __init__(self, code: int, headers: dict[str, list[str]], raw: bytes) -> None:
        self.code = code
        self.headers = headers
        self.raw = raw

    @property
    def body(self) -> Any:
        """The decoded JSON answer (``None`` when empty or not JSON, e.g. a download)."""
        if not self.raw or "json" not in (self.header("content-type") or ""):
            return None
        return json.loads(self.raw)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def type(self) -> str:
        return str(self.body["type"]).rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"<Response {self.code} {self.raw[:300]!r}>"


class Client:
    """A browser-like client: keeps the session cookie and the CSRF token."""

    def __init__(self, test: SynchronousTestCase, treq: StubTreq, scheme: str = "http") -> None:
        self.test = test
        self.treq = treq
        self.base = f"{scheme}://piccolod"
        self.cookie: str | None = None
        self.csrf: str | None = None
        self.token: str | None = None
        self.last_set_cookie: str | None = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        csrf: bool = True,
        raw: bytes | None = None,
    ) -> Response:
        sent: dict[bytes, list[bytes]] = {}
        for name, value in (headers or {}).items():
            sent[name.lower().encode()] = [value.encode()]
        if self.cookie is not None:
            sent.setdefault(b"cookie", [f"piccolod_session={self.cookie}".encode()])
        if self.token is not None:
            sent.setdefault(b"authorization", [f"Bearer {self.token}".encode()])
        if csrf and self.csrf is not None:
            sent.setdefault(b"x-csrf-token", [self.csrf.encode()])
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault(b"content-type", [b"application/json"])
        d = self.treq.request(method, self.base + path, headers=sent, data=data)
        self.treq.flush()
        response = self.test.successResultOf(d)
        content = self.treq.content(response)
        self.treq.flush()
        raw_body = self.test.successResultOf(content)
        headers_out = {
            k.decode().lower(): [v.decode() for v in vs]
            for k, vs in response.headers.getAllRawHeaders()
        }
        for cookie in headers_out.get("set-cookie", []):
            self.last_set_cookie = cookie
            value = cookie.split(";", 1)[0].split("=", 1)[1]
            self.cookie = value or None
        result = Response(response.code, headers_out, raw_body)
        if result.code < 300 and isinstance(result.body, dict) and "csrf_token" in result.body:
            self.csrf = result.body["csrf_token"]
        return result

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Response:
        return self.request("DELETE", path, **kw)


class APIHarness:
    """Kernel, persistence, API service and clients, for one test."""

    def __init__(self, test: SynchronousTestCase, **config: Any) -> None:
        self.test = test
        self.state_dir = Path(tempfile.mkdtemp(prefix="piccolod-api-"))
        test.addCleanup(shutil.rmtree, self.state_dir, True)
        self.clock = MemoryReactorClock()
        self.clock.advance(1_000_000)
        self.bus = MemoryEventBus(self.clock)
        health = HealthTracker(self.clock, self.bus)
        self.registry = LeadershipRegistry(self.bus, "n1")
        self.dispatcher = CommandDispatcher(self.clock, self.bus, registry=self.registry)
        self.jobs = JobRunner(self.clock, self.bus)
        self.kernel = Kernel(
            reactor=self.clock,
            bus=self.bus,
            registry=self.registry,
            dispatcher=self.dispatcher,
            health=health,
            supervisor=Supervisor(self.clock, self.bus, health),
            node_id="n1",
            api_address="http://127.0.0.1:8080",
            state_dir=self.state_dir,
            jobs=self.jobs,
        )
        self.registry.update("control-plane", Role.LEADER, 1, "n1")
        self.persistence = PersistenceService(
            self.clock,
            self.state_dir / "persistence",
            self.bus,
            PersistenceConfig(kdf=FAST, volumes=(), unlock_backoff_initial=0.5),
            dispatcher=self.dispatcher,
            registry=self.registry,
            health=health,
        )
        self.audit_records: list[Any] = []
        self.bus.subscribe("audit", lambda e: self.audit_records.append(e.event))
        self.persistence.startService()
        self.jobs.startService()
        self.service = APIService.build(self.kernel, config)
        self.service.api.hub.heartbeat = 0  # type: ignore[union-attr]
        self.service.startService()
        assert self.service.api is not None
        self.api = self.service.api
        self.router = self.service.router
        test.addCleanup(self.stop)

    def stop(self) -> None:
        self.service.api.hub.stop()  # type: ignore[union-attr]
        self.jobs.stopService()
        self.test.successResultOf(self.persistence.stopService())
        self.clock.advance(600)

    def client(self, scheme: str = "http") -> Client:
        return Client(self.test, StubTreq(self.router), scheme)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def set_up(self, client: Client | None = None) -> tuple[Client, str]:
        """First-run setup through the API; returns the logged-in client and the recovery key."""
        client = client or self.client()
        response = client.post("/api/v1/auth/setup", {"password": PASSWORD})
        assert response.code == 201, response
        return client, response.body["recovery_key"]

    def token(self, admin: Client, role: str, name: str = "t") -> tuple[str, str]:
        """A new API token of ``role``; returns (token, id)."""
        response = admin.post("/api/v1/auth/tokens", {"name": name, "role": role})
        assert response.code == 201, response
        return response.body["token"], response.body["id"]

    def token_client(self, token: str) -> Client:
        client = self.client()
        client.token = token
        return client

    def audit(self) -> list[Any]:
        """Every audit record published so far, oldest first."""
        self.clock.advance(0)
        return list(self.audit_records)
