"""
The API subsystem: ``twisted.web`` on a Twisted server endpoint string,
serving the kernel's views, authentication, storage, commands and the event
stream under ``/api/v1`` (see ``docs/api.md``).

:class:`APIService` builds, from its ``[subsystems.api]`` section: the
:class:`~piccolod.kernel.policy.PolicyEngine` (roles, subjects, quotas), the
session store, the API token store (``<state_dir>/api/tokens.json``), the
login limiter, the SSE hub, and the router with the
:class:`~piccolod.api.auth.Authenticator` as its guard.  At start it
installs the policy engine into the dispatcher's ``policy`` slot (replacing
the engine of a previous instance after a restart; it stays installed
after a stop, so commands stay governed while the API restarts), starts the
SSE hub and listens.

Once listening, the bound address is written atomically to
``<state_dir>/api.json`` so that ``piccolodctl`` and tests find a daemon
started on port 0.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

import piccolod
from piccolod.errors import ConfigError, InvalidCommand, NotFound, NotReady
from piccolod.interfaces import ISupervisedService
from piccolod.kernel.aio import async_to_deferred
from piccolod.kernel.plugins import SubsystemContext
from piccolod.kernel.policy import ConcurrencyQuota, CountQuota, PolicyEngine, RateQuota
from piccolod.kernel.runtime import Kernel

from .auth import Authenticator, LoginLimiter, SessionStore, TokenStore
from .http import APISite, JSONResponse, RawResponse, Router, problem_response
from .routes import APIContext, api_routes
from .sse import EventHub

#: ``[subsystems.api]`` keys and their defaults (the plugin's ``config_keys``).
CONFIG_DEFAULTS: Mapping[str, Any] = {
    "listen": "tcp:8080:interface=127.0.0.1",
    "max_body": 1048576,
    "session_idle_timeout": 1800.0,
    "session_absolute_timeout": 43200.0,
    "max_sessions": 64,
    "login_free_attempts": 5,
    "login_lockout_initial": 1.0,
    "login_lockout_max": 900.0,
    "login_global_free_attempts": 50,
    "login_global_lockout_max": 300.0,
    "token_rate": 50.0,
    "token_burst": 100.0,
    "max_tokens": 100,
    "max_concurrent_exports": 1,
    "max_apps": 50,
    "sse_replay": 4096,
    "sse_queue": 16384,
    "sse_max_clients": 256,
    "sse_heartbeat": 15.0,
    "sse_resume_window": 300.0,
    "connection_timeout": 300.0,
    "access_log": False,
    "portal": True,
    "roles": {},
    "subjects": {},
}

#: App states that do not count towards the ``max_apps`` quota.
_GONE = frozenset({"removed", "deleted", "absent", "purged"})


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def kernel_routes(router: Router, kernel: Kernel) -> None:
    """Add the kernel's views: health, leadership, supervisor, jobs, metrics, the index."""
    obj: dict[str, Any] = {"type": "object"}
    memo: list[Any] = []

    def answer(schema: Mapping[str, Any]) -> dict[int, tuple[str, Mapping[str, Any]]]:
        return {200: ("application/json", schema)}

    @router.route(
        "GET",
        "/api/v1/health/live",
        "health_live",
        public=True,
        responses=answer(
            {
                "type": "object",
                "required": ["status", "version", "node_id"],
                "properties": {
                    "status": {"const": "ok"},
                    "version": {"type": "string"},
                    "node_id": {"type": "string"},
                },
            }
        ),
        summary="200 while the process serves HTTP",
        tags=("health",),
    )
    def live(request: Request) -> Any:
        return {"status": "ok", "version": piccolod.__version__, "node_id": kernel.node_id}

    @router.route(
        "GET",
        "/api/v1/health/ready",
        "health_ready",
        public=True,
        responses=answer(
            {
                "type": "object",
                "required": ["status"],
                "properties": {"status": {"const": "ready"}},
            }
        ),
        errors=(503,),
        summary="200 once every required component is ok, else 503 listing the failing ones",
        tags=("health",),
    )
    def ready(request: Request) -> Any:
        if kernel.health.ready():
            return _READY
        failing = [c.to_json() for c in kernel.health.not_ready()]
        names = ", ".join(c["component"] for c in failing) or "startup"
        error = NotReady(f"not ready: {names}", components=failing)
        return problem_response(error, request.path.decode())

    @router.route(
        "GET",
        "/api/v1/health/detail",
        "health_detail",
        action="health.read",
        responses=answer(
            {
                "type": "object",
                "required": ["overall", "ready", "components", "children", "leadership"],
            }
        ),
        summary="Every component, supervised child and leadership role",
        tags=("health",),
    )
    def detail(request: Request) -> Any:
        now = kernel.reactor.seconds()
        return {
            "overall": kernel.health.overall().label,
            "ready": kernel.health.ready(),
            "version": piccolod.__version__,
            "node_id": kernel.node_id,
            "uptime": max(0.0, now - kernel.started_at),
            "subsystems": dict(kernel.selected),
            "components": [c.to_json() for c in kernel.health.components()],
            "children": [c.to_json() for c in kernel.supervisor.children()],
            "leadership": [s.to_json() for s in kernel.registry.states()],
        }

    @router.route(
        "GET",
        "/api/v1/leadership",
        "leadership",
        action="leadership.read",
        responses=answer(
            {
                "type": "object",
                "required": ["node_id", "resources"],
                "properties": {
                    "node_id": {"type": "string"},
                    "resources": {"type": "array", "items": obj},
                },
            }
        ),
        summary="This node's role per resource",
        tags=("cluster",),
    )
    def leadership(request: Request) -> Any:
        # Monitoring polls this: the answer is encoded again only when a
        # role, leader or term changed (states are frozen values).
        states = tuple(kernel.registry.states())
        if memo and memo[0] == states:
            return memo[1]
        answer = RawResponse(
            json.dumps(
                {"node_id": kernel.node_id, "resources": [s.to_json() for s in states]},
                separators=(",", ":"),
            ).encode(),
            b"application/json",
        )
        memo[:] = [states, answer]
        return answer

    @router.route(
        "GET",
        "/api/v1/supervisor",
        "supervisor",
        action="supervisor.read",
        responses=answer(
            {
                "type": "object",
                "required": ["children"],
                "properties": {"children": {"type": "array", "items": obj}},
            }
        ),
        summary="Supervised children: states, restarts, last errors",
        tags=("health",),
    )
    def supervisor(request: Request) -> Any:
        return {"children": [c.to_json() for c in kernel.supervisor.children()]}

    @router.route(
        "GET",
        "/metrics",
        "metrics",
        action="metrics.read",
        responses={200: ("text/plain", {"type": "string"})},
        errors=(404,),
        summary="Prometheus metrics (text exposition format)",
        tags=("health",),
    )
    def metrics(request: Request) -> Any:
        if kernel.metrics is None:
            raise NotFound("metrics are not enabled")
        from piccolod.kernel.metrics import CONTENT_TYPE

        return RawResponse(kernel.metrics.render(), CONTENT_TYPE.encode())

    def runner() -> Any:
        if kernel.jobs is None:
            raise NotFound("this daemon has no job runner")
        return kernel.jobs

    job_id = {"type": "string", "minLength": 1, "maxLength": 128}

    @router.route(
        "GET",
        "/api/v1/jobs",
        "jobs_list",
        action="jobs.read",
        query={
            "state": {
                "type": "string",
                "enum": ["queued", "running", "succeeded", "failed", "cancelled"],
            }
        },
        responses=answer(
            {
                "type": "object",
                "required": ["jobs", "stats"],
                "properties": {"jobs": {"type": "array", "items": obj}, "stats": obj},
            }
        ),
        errors=(404,),
        summary="Jobs (optionally in one state) and the runner's counters",
        tags=("jobs",),
    )
    def jobs(request: Request, query: Mapping[str, Any]) -> Any:
        state = query.get("state")
        try:
            found = runner().jobs(state)
        except (ValueError, KeyError):
            raise InvalidCommand(
                "state must be one of queued, running, succeeded, failed, cancelled"
            ) from None
        return {"jobs": [j.to_json() for j in found], "stats": runner().stats()}

    @router.route(
        "GET",
        "/api/v1/jobs/{job_id}",
        "jobs_get",
        action="jobs.read",
        resource=lambda params: f"job:{params.get('job_id', '')}",
        params={"job_id": job_id},
        responses=answer({"type": "object", "required": ["id", "state"]}),
        errors=(404,),
        summary="One job",
        tags=("jobs",),
    )
    def job(request: Request, job_id: str) -> Any:
        return runner().get(job_id).to_json()

    @router.route(
        "POST",
        "/api/v1/jobs/{job_id}/cancel",
        "jobs_cancel",
        action="jobs.cancel",
        resource=lambda params: f"job:{params.get('job_id', '')}",
        params={"job_id": job_id},
        responses={
            202: (
                "application/json",
                {
                    "type": "object",
                    "required": ["id", "state"],
                    "properties": {"id": {"type": "string"}, "state": {"type": "string"}},
                },
            )
        },
        errors=(404,),
        summary="Cancel a queued or running job",
        tags=("jobs",),
    )
    async def cancel(request: Request, job_id: str) -> Any:
        handle = runner().get(job_id)
        state = await handle.cancel()
        return JSONResponse({"id": job_id, "state": getattr(state, "value", state)}, 202)

    @router.route(
        "GET",
        "/api/v1",
        "index",
        action="api.read",
        responses=answer(
            {
                "type": "object",
                "required": ["routes"],
                "properties": {"routes": {"type": "array", "items": obj}},
            }
        ),
        summary="The route table",
        tags=("meta",),
    )
    def index(request: Request) -> Any:
        return {
            "routes": [
                {"method": r.method, "path": r.template, "public": r.public}
                for r in router.all_routes()
            ]
        }


#: Encoded once: readiness probes are the most frequent request.
_READY = RawResponse(b'{"status":"ready"}', b"application/json")


def _positive(config: Mapping[str, Any], errors: list[str], *names: str) -> None:
    for name in names:
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            errors.append(f"[subsystems.api] {name} must be a positive number, got {value!r}")


def _at_least(config: Mapping[str, Any], errors: list[str], low: int, *names: str) -> None:
    for name in names:
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            errors.append(f"[subsystems.api] {name} must be an integer >= {low}, got {value!r}")


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` listing every problem of an ``[subsystems.api]`` section."""
    errors: list[str] = []
    _positive(
        config,
        errors,
        "session_idle_timeout",
        "session_absolute_timeout",
        "login_lockout_initial",
        "login_lockout_max",
        "login_global_lockout_max",
        "token_burst",
        "connection_timeout",
        "sse_resume_window",
    )
    _at_least(config, errors, 1, "max_body", "max_sessions", "max_tokens", "sse_replay")
    _at_least(config, errors, 1, "sse_queue", "sse_max_clients")
    _at_least(config, errors, 0, "login_free_attempts", "login_global_free_attempts")
    _at_least(config, errors, 0, "max_concurrent_exports", "max_apps")
    for name in ("token_rate", "sse_heartbeat"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            errors.append(f"[subsystems.api] {name} must be a number >= 0, got {value!r}")
    if not errors and config["login_lockout_initial"] > config["login_lockout_max"]:
        errors.append("[subsystems.api] login_lockout_initial must be <= login_lockout_max")
    if errors:
        raise ConfigError(errors)


def _apps_installed(kernel: Kernel) -> Callable[[], int]:
    """The ``max_apps`` hook: apps whose retained ``apps.state`` is not a removal."""

    def count() -> int:
        return sum(1 for e in kernel.bus.retained("apps.state") if e.event.state not in _GONE)

    return count


def _blocking_runner(reactor: Any) -> Callable[[Callable[[], Any]], Deferred[Any]]:
    """Run a blocking call in the reactor's thread pool (inline without one)."""
    get_pool = getattr(reactor, "getThreadPool", None)
    if get_pool is None:
        from .auth import _inline

        return _inline
    from twisted.internet.threads import deferToThreadPool

    def run(fn: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(reactor, get_pool(), fn)

    return run


@implementer(IService, ISupervisedService)
@attrs.define(eq=False)
class APIService(Service):  # type: ignore[misc]
    """
    Listens on ``listen`` (a Twisted server endpoint string) and serves the
    router.  Ready once the port is bound; a bind failure fails readiness.
    """

    kernel: Kernel
    listen: str
    router: Router
    api: APIContext | None = None
    connection_timeout: float = 300.0
    access_log: bool = False
    #: Restore uploads in progress (abandoned at stop).
    uploads: Any = None
    log = Logger()

    _port: IListeningPort | None = None
    _ready: Deferred[None] | None = None
    _exited: Deferred[None] = attrs.field(factory=Deferred)

    @classmethod
    def build(
        cls,
        kernel: Kernel,
        config: Mapping[str, Any],
        run_blocking: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
    ) -> APIService:
        """Everything from a ``[subsystems.api]`` section; raises ``ConfigError``."""
        config = {**CONFIG_DEFAULTS, **config}
        check_config(config)
        clock = kernel.reactor
        tokens = TokenStore(
            clock,
            kernel.state_dir / "api" / "tokens.json",
            run_blocking=run_blocking or _blocking_runner(clock),
            max_tokens=int(config["max_tokens"]),
        )
        quotas: list[ConcurrencyQuota | CountQuota] = [
            ConcurrencyQuota(
                "exports",
                ("persistence.run_control_export", "persistence.run_full_export"),
                int(config["max_concurrent_exports"]),
            ),
            CountQuota("apps", ("apps.install",), int(config["max_apps"]), _apps_installed(kernel)),
        ]
        engine = PolicyEngine.from_config(
            clock,
            kernel.bus,
            roles=config["roles"],
            subjects=config["subjects"],
            resolve=tokens.role_for_subject,
            rate=RateQuota(
                clock, rate=float(config["token_rate"]), burst=float(config["token_burst"])
            ),
            quotas=quotas,
            source="api",
        )
        sessions = SessionStore(
            clock,
            idle_timeout=float(config["session_idle_timeout"]),
            absolute_timeout=float(config["session_absolute_timeout"]),
            max_sessions=int(config["max_sessions"]),
        )
        limiter = LoginLimiter(
            clock,
            free_attempts=int(config["login_free_attempts"]),
            initial=float(config["login_lockout_initial"]),
            maximum=float(config["login_lockout_max"]),
            global_free_attempts=int(config["login_global_free_attempts"]),
            global_maximum=float(config["login_global_lockout_max"]),
        )
        hub = EventHub(
            kernel.bus,
            clock,
            capacity=int(config["sse_replay"]),
            max_queue=int(config["sse_queue"]),
            max_clients=int(config["sse_max_clients"]),
            heartbeat=float(config["sse_heartbeat"]),
            resume_window=float(config["sse_resume_window"]),
        )
        metrics = kernel.metrics
        router = Router(
            max_body=int(config["max_body"]),
            observe=metrics.http.observe if metrics is not None else None,
            clock=clock,
            guard=Authenticator(sessions, tokens, engine),
        )
        api = APIContext(kernel, sessions, tokens, limiter, engine, hub)
        kernel_routes(router, kernel)
        api_routes(router, api)
        from .apps import app_routes
        from .cluster import cluster_routes
        from .remote import remote_routes
        from .restore import RestoreUploads, restore_routes

        app_routes(router, kernel)
        cluster_routes(router, kernel, api)
        remote_routes(router, kernel)
        uploads = RestoreUploads(kernel.state_dir / "restore", clock)
        restore_routes(router, api, uploads, chunk_size=int(config["max_body"]))
        if config["portal"]:
            from .portal import portal_routes

            portal_routes(router, kernel)
        return cls(
            kernel=kernel,
            listen=str(config["listen"]),
            router=router,
            api=api,
            connection_timeout=float(config["connection_timeout"]),
            access_log=bool(config["access_log"]),
            uploads=uploads,
        )

    @classmethod
    def from_context(cls, ctx: SubsystemContext) -> APIService:
        return cls.build(ctx.kernel, ctx.config)

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)

    def startService(self) -> None:
        Service.startService(self)
        if self.api is not None:
            self.api.tokens.load()
            self._install_policy(self.api.engine)
            self.api.hub.start()
        if self.uploads is not None:
            self.uploads.sweep()
        self._ready = Deferred.fromCoroutine(self._listen())

    def _install_policy(self, engine: PolicyEngine) -> None:
        dispatcher: Any = self.kernel.dispatcher
        remove = getattr(dispatcher, "remove_middleware", None)
        installed = getattr(dispatcher, "_slots", {}).get("policy")
        if isinstance(installed, PolicyEngine) and remove is not None:
            remove("policy")
        dispatcher.add_middleware("policy", engine)

    async def _listen(self) -> None:
        endpoint = serverFromString(self.kernel.reactor, self.listen)
        max_body = self.router.max_body
        site = APISite(
            self.router,
            max_body=max_body,
            access_log=self.access_log,
            timeout=self.connection_timeout,
        )
        port: IListeningPort = await endpoint.listen(site)
        self._port = port
        address = port.getHost()
        host = getattr(address, "host", "")
        scheme = "https" if self.listen.startswith(("ssl:", "tls:")) else "http"
        if ":" in host:
            host = f"[{host}]"
        url = f"{scheme}://{host}:{address.port}" if hasattr(address, "port") else ""
        self.log.info("API listening on {address}", address=url or str(address))
        write_atomically(
            self.kernel.state_dir / "api.json",
            json.dumps({"url": url, "pid": os.getpid(), "node_id": self.kernel.node_id}).encode(),
        )

    def when_ready(self) -> Deferred[None]:
        assert self._ready is not None, "when_ready() before startService()"
        d: Deferred[None] = Deferred()
        self._ready.addBoth(_chain, d)
        return d

    def when_exited(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._exited.addBoth(_chain, d)
        return d

    @async_to_deferred
    async def stopService(self) -> None:
        Service.stopService(self)
        if self.api is not None:
            self.api.hub.stop()
        if self.uploads is not None:
            self.uploads.close()
        if self._port is not None:
            port, self._port = self._port, None
            await maybeDeferred(port.stopListening)
        try:
            (self.kernel.state_dir / "api.json").unlink()
        except FileNotFoundError:
            pass


def _chain(result: Any, d: Deferred[Any]) -> Any:
    if isinstance(result, Exception) or hasattr(result, "raiseException"):
        d.errback(result)
        return None
    d.callback(result)
    return result
