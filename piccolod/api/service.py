"""
The API subsystem: ``twisted.web`` on a Twisted server endpoint string,
serving the kernel's views under ``/api/v1``.

Endpoints (see ``docs/api.md``):

- ``GET /api/v1/health/live``: 200 while the process serves HTTP.
- ``GET /api/v1/health/ready``: 200 when every required component is ok,
  else 503 problem+json listing the failing components.
- ``GET /api/v1/health/detail``: overall level, components, children,
  leadership, the chosen variants.
- ``GET /api/v1/leadership``: this node's role per resource.
- ``GET /api/v1/supervisor``: child states, restarts, last errors.

Once listening, the bound address is written atomically to
``<state_dir>/api.json`` so that ``piccolodctl`` and tests find a daemon
started on port 0.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Request, Site
from zope.interface import implementer

import piccolod
from piccolod.errors import InvalidCommand, NotFound, NotReady
from piccolod.interfaces import ISupervisedService
from piccolod.kernel.aio import async_to_deferred
from piccolod.kernel.plugins import SubsystemContext
from piccolod.kernel.runtime import Kernel

from .http import JSONResponse, RawResponse, Router, problem_response


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
    """Add the kernel's read-only views to ``router``."""

    @router.route("GET", "/api/v1/health/live")
    def live(request: Request) -> Any:
        return {"status": "ok", "version": piccolod.__version__, "node_id": kernel.node_id}

    @router.route("GET", "/api/v1/health/ready")
    def ready(request: Request) -> Any:
        if kernel.health.ready():
            return {"status": "ready"}
        failing = [c.to_json() for c in kernel.health.not_ready()]
        names = ", ".join(c["component"] for c in failing) or "startup"
        error = NotReady(f"not ready: {names}", components=failing)
        return problem_response(error, request.path.decode())

    @router.route("GET", "/api/v1/health/detail")
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

    @router.route("GET", "/api/v1/leadership")
    def leadership(request: Request) -> Any:
        return {
            "node_id": kernel.node_id,
            "resources": [s.to_json() for s in kernel.registry.states()],
        }

    @router.route("GET", "/api/v1/supervisor")
    def supervisor(request: Request) -> Any:
        return {"children": [c.to_json() for c in kernel.supervisor.children()]}

    @router.route("GET", "/metrics")
    def metrics(request: Request) -> Any:
        if kernel.metrics is None:
            raise NotFound("metrics are not enabled")
        from piccolod.kernel.metrics import CONTENT_TYPE

        return RawResponse(kernel.metrics.render(), CONTENT_TYPE.encode())

    def runner() -> Any:
        if kernel.jobs is None:
            raise NotFound("this daemon has no job runner")
        return kernel.jobs

    @router.route("GET", "/api/v1/jobs")
    def jobs(request: Request) -> Any:
        state = request.args.get(b"state", [b""])[0].decode() or None
        try:
            found = runner().jobs(state)
        except (ValueError, KeyError):
            raise InvalidCommand(
                "state must be one of queued, running, succeeded, failed, cancelled"
            ) from None
        return {"jobs": [j.to_json() for j in found], "stats": runner().stats()}

    @router.route("GET", "/api/v1/jobs/{job_id}")
    def job(request: Request, job_id: str) -> Any:
        return runner().get(job_id).to_json()

    @router.route("POST", "/api/v1/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: str) -> Any:
        handle = runner().get(job_id)
        state = await handle.cancel()
        return JSONResponse({"id": job_id, "state": getattr(state, "value", state)}, 202)

    @router.route("GET", "/api/v1")
    def index(request: Request) -> Any:
        return {
            "routes": [
                {"method": method, "path": path} for method, path in router.routes()
            ]
        }


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
    log = Logger()

    _port: IListeningPort | None = None
    _ready: Deferred[None] | None = None
    _exited: Deferred[None] = attrs.field(factory=Deferred)

    @classmethod
    def from_context(cls, ctx: SubsystemContext) -> APIService:
        metrics = ctx.kernel.metrics
        router = Router(
            max_body=int(ctx.config["max_body"]),
            observe=metrics.http.observe if metrics is not None else None,
            clock=ctx.kernel.reactor,
        )
        kernel_routes(router, ctx.kernel)
        return cls(kernel=ctx.kernel, listen=str(ctx.config["listen"]), router=router)

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)

    def startService(self) -> None:
        Service.startService(self)
        self._ready = Deferred.fromCoroutine(self._listen())

    async def _listen(self) -> None:
        endpoint = serverFromString(self.kernel.reactor, self.listen)
        site = Site(self.router)
        site.displayTracebacks = False
        port: IListeningPort = await endpoint.listen(site)
        self._port = port
        address = port.getHost()
        host = getattr(address, "host", "")
        url = f"http://{host}:{address.port}" if hasattr(address, "port") else ""
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
        if self._port is not None:
            port, self._port = self._port, None
            await port.stopListening()
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
