"""
Podman as the container runtime: its REST API over its unix socket, with
treq.

:class:`PodmanRuntime` speaks the libpod API (``/v4.0.0/libpod``): list by
label, create (port mappings, bind and tmpfs mounts, memory and CPU
limits, ``init``, restart policy), start, stop, remove, logs, image
existence and builds from an inline Containerfile (``pull=false``: images
are never pulled).  The event stream (``/events?stream=true``) feeds the
watchers; podman's events carry no labels, so the adapter remembers the
labels of the containers it has seen and inspects the others.  The stream
is reopened with a growing delay when it breaks.

:class:`PodmanContainers` is the ``containers=podman`` plugin service: at
start it pings the socket; if nobody answers and ``start_service`` is set
it spawns ``podman system service --time=<idle_timeout> unix://<socket>`` itself (with
``CONTAINERS_CONF`` when configured) and stops it by PID on stop.  When
podman is not usable and ``fallback = "fake"`` it says so LOUDLY (a
critical log line and the ``containers`` health component at ``warn``) and
runs apps on the in-memory fake instead.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import attrs
import treq
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from piccolod.apps.fake import FakeContainerRuntime
from piccolod.errors import (
    ConfigError,
    Conflict,
    InvalidCommand,
    NotFound,
    NotReady,
    Unavailable,
)
from piccolod.events import HealthLevel
from piccolod.interfaces import (
    ContainerEvent,
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    IContainerRuntime,
    IHealth,
    ISupervisedService,
    PortMapping,
)
from piccolod.kernel.aio import call

__all__ = ["CONFIG_KEYS", "PodmanContainers", "PodmanRuntime", "default_socket"]

API = "/v4.0.0/libpod"
BASE = "http://podman"
HEALTH = "containers"

#: ``[subsystems.containers]`` keys of the podman variant.
CONFIG_KEYS: dict[str, Any] = {
    "socket": "",
    "start_service": True,
    "podman": "podman",
    "containers_conf": "",
    "fallback": "fake",
    "ping_timeout": 10.0,
    "idle_timeout": 60,
}

_STATES = {
    "running": ContainerState.RUNNING,
    "paused": ContainerState.PAUSED,
    "exited": ContainerState.EXITED,
    "stopped": ContainerState.EXITED,
    "dead": ContainerState.EXITED,
    "created": ContainerState.CREATED,
    "configured": ContainerState.CREATED,
    "initialized": ContainerState.CREATED,
    "stopping": ContainerState.RUNNING,
}
_ACTIONS = {"died": "die"}


def default_socket() -> str:
    """Podman's socket: the root one, or the user's under ``XDG_RUNTIME_DIR``."""
    if os.geteuid() == 0:
        return "/run/podman/podman.sock"
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.geteuid()}")
    return f"{runtime_dir}/podman/podman.sock"


class _LineStream(Protocol):
    """
    A streamed response body, one callback per non-empty line.  ``done``
    fires when the body ends; cancelling it closes the connection (a
    cancelled ``treq.collect`` would leave it open, and ``podman system
    service`` waits for open streams before it exits on ``SIGTERM``).
    """

    def __init__(self, on_line: Callable[[bytes], None]) -> None:
        self.on_line = on_line
        self.buffer = b""
        self.done: Deferred[None] = Deferred(lambda _: self.stop())

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                self.on_line(line)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _UnixEndpoints:
    reactor: Any
    path: str

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self.reactor, self.path, timeout=10)


def _state(value: Any) -> ContainerState:
    return _STATES.get(str(value).lower(), ContainerState.UNKNOWN)


def _ports(raw: Any) -> tuple[PortMapping, ...]:
    found = []
    for p in raw or ():
        if not isinstance(p, Mapping):
            continue
        found.append(
            PortMapping(
                container_port=int(p.get("container_port", 0)),
                host_port=int(p.get("host_port", 0)),
                host_ip=str(p.get("host_ip", "") or "0.0.0.0"),
                protocol=str(p.get("protocol", "tcp")),
            )
        )
    return tuple(found)


def _describe(body: bytes) -> str:
    try:
        decoded = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:500]
    if isinstance(decoded, Mapping):
        return str(decoded.get("message") or decoded.get("cause") or decoded)[:500]
    return str(decoded)[:500]


@implementer(IContainerRuntime)
@attrs.define(eq=False)
class PodmanRuntime:
    """The libpod REST API over a unix socket (see the module docstring)."""

    log = Logger()

    reactor: Any
    socket_path: str
    kind: str = "podman"
    client: Any = None
    _labels: dict[str, dict[str, str]] = attrs.field(init=False, factory=dict)
    _names: dict[str, str] = attrs.field(init=False, factory=dict)
    _watchers: list[Callable[[ContainerEvent], None]] = attrs.field(init=False, factory=list)
    _stream: Deferred[Any] | None = attrs.field(init=False, default=None)
    _streaming: bool = attrs.field(init=False, default=False)
    _retry: Any = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if self.client is None:
            agent = Agent.usingEndpointFactory(
                self.reactor, _UnixEndpoints(self.reactor, self.socket_path)
            )
            self.client = treq.client.HTTPClient(agent)

    # -- plumbing -----------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        data: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 60.0,
    ) -> tuple[int, bytes]:
        url = BASE + path
        if params:
            url += "?" + urlencode(params)
        headers = {"Content-Type": [content_type]}
        payload = (
            data if data is not None else (None if body is None else json.dumps(body).encode())
        )
        try:
            response = await self.client.request(
                method, url, data=payload, headers=headers, timeout=timeout
            )
            content: bytes = await treq.content(response)
        except (ConnectError, ConnectionRefusedError, FileNotFoundError, OSError) as e:
            raise Unavailable(f"podman at {self.socket_path} is unreachable: {e}") from None
        return int(response.code), content

    def _check(
        self, code: int, body: bytes, what: str, ok: Sequence[int] = (200, 201, 204)
    ) -> None:
        if code in ok:
            return
        message = f"{what}: {_describe(body)}"
        if code == 404:
            raise NotFound(message)
        if code == 409:
            raise Conflict(message)
        if code in (400, 422):
            raise InvalidCommand(message)
        if code == 500 and ("address already in use" in message or "port is already" in message):
            raise Conflict(message)
        raise Unavailable(f"podman answered {code} to {message}")

    def _remember(self, info: ContainerInfo) -> ContainerInfo:
        self._labels[info.id] = dict(info.labels)
        self._names[info.id] = info.name
        return info

    def _info(self, raw: Mapping[str, Any]) -> ContainerInfo:
        names = raw.get("Names") or [raw.get("Name", "")]
        return self._remember(
            ContainerInfo(
                id=str(raw.get("Id", "")),
                name=str(names[0]).lstrip("/"),
                image=str(raw.get("Image", "")),
                state=_state(raw.get("State", "")),
                labels=dict(raw.get("Labels") or {}),
                ports=_ports(raw.get("Ports")),
                exit_code=int(raw["ExitCode"]) if raw.get("State") == "exited" else None,
            )
        )

    def _inspected(self, raw: Mapping[str, Any]) -> ContainerInfo:
        state = raw.get("State") or {}
        config = raw.get("Config") or {}
        bindings = ((raw.get("HostConfig") or {}).get("PortBindings")) or {}
        ports = []
        for key, binds in bindings.items():
            port, _, proto = str(key).partition("/")
            for b in binds or ():
                ports.append(
                    PortMapping(
                        container_port=int(port),
                        host_port=int(b.get("HostPort") or 0),
                        host_ip=str(b.get("HostIp") or "0.0.0.0"),
                        protocol=proto or "tcp",
                    )
                )
        status = str(state.get("Status", ""))
        return self._remember(
            ContainerInfo(
                id=str(raw.get("Id", "")),
                name=str(raw.get("Name", "")).lstrip("/"),
                image=str(raw.get("ImageName") or config.get("Image") or ""),
                state=_state(status),
                labels=dict(config.get("Labels") or {}),
                ports=tuple(ports),
                exit_code=int(state.get("ExitCode", 0)) if status == "exited" else None,
            )
        )

    # -- IContainerRuntime --------------------------------------------------------

    def ping(self) -> Deferred[None]:
        async def go() -> None:
            code, body = await self._request("GET", "/_ping", timeout=5.0)
            if code != 200:
                raise Unavailable(f"podman ping answered {code}")

        return Deferred.fromCoroutine(go())

    def version(self) -> Deferred[str]:
        async def go() -> str:
            code, body = await self._request("GET", f"{API}/version", timeout=5.0)
            self._check(code, body, "version")
            return str(json.loads(body).get("Version", "?"))

        return Deferred.fromCoroutine(go())

    def image_exists(self, image: str) -> Deferred[bool]:
        async def go() -> bool:
            code, body = await self._request("GET", f"{API}/images/{quote(image, safe='')}/exists")
            if code == 404:
                return False
            self._check(code, body, f"image {image}")
            return True

        return Deferred.fromCoroutine(go())

    def build_image(
        self, tag: str, containerfile: str, build_args: Mapping[str, str], target: str
    ) -> Deferred[None]:
        async def go() -> None:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                data = containerfile.encode()
                member = tarfile.TarInfo("Containerfile")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
            params: dict[str, str] = {
                "t": tag,
                "dockerfile": "Containerfile",
                "pull": "false",
                "rm": "true",
            }
            if build_args:
                params["buildargs"] = json.dumps(dict(build_args))
            if target:
                params["target"] = target
            code, body = await self._request(
                "POST",
                f"{API}/build",
                params,
                data=buffer.getvalue(),
                content_type="application/x-tar",
                timeout=600.0,
            )
            lines = [json.loads(x) for x in body.splitlines() if x.strip().startswith(b"{")]
            errors = [str(x["error"]) for x in lines if isinstance(x, dict) and "error" in x]
            if code != 200 or errors:
                output = "".join(str(x.get("stream", "")) for x in lines if isinstance(x, dict))
                raise InvalidCommand(
                    f"build of {tag} failed: {'; '.join(errors) or _describe(body)}",
                    output=output[-2000:],
                )

        return Deferred.fromCoroutine(go())

    def list_containers(self, labels: Mapping[str, str]) -> Deferred[Sequence[ContainerInfo]]:
        async def go() -> Sequence[ContainerInfo]:
            filters = {"label": [f"{k}={v}" for k, v in sorted(labels.items())]}
            code, body = await self._request(
                "GET", f"{API}/containers/json", {"all": "true", "filters": json.dumps(filters)}
            )
            self._check(code, body, "list containers")
            found = [self._info(raw) for raw in json.loads(body) or []]
            return sorted(found, key=lambda c: c.name)

        return Deferred.fromCoroutine(go())

    def inspect(self, container: str) -> Deferred[ContainerInfo]:
        async def go() -> ContainerInfo:
            code, body = await self._request(
                "GET", f"{API}/containers/{quote(container, safe='')}/json"
            )
            self._check(code, body, f"container {container}")
            return self._inspected(json.loads(body))

        return Deferred.fromCoroutine(go())

    def create(self, spec: ContainerSpec) -> Deferred[ContainerInfo]:
        async def go() -> ContainerInfo:
            if not await self.image_exists(spec.image):
                raise NotFound(f"image {spec.image} is not present locally (never pulled)")
            body: dict[str, Any] = {
                "name": spec.name,
                "image": spec.image,
                "labels": dict(spec.labels),
                "env": dict(spec.env),
                "portmappings": [
                    {
                        "host_ip": p.host_ip,
                        "host_port": p.host_port,
                        "container_port": p.container_port,
                        "protocol": p.protocol,
                    }
                    for p in spec.ports
                ],
                "mounts": [
                    {
                        "destination": m.target,
                        "source": m.source,
                        "type": "bind",
                        "options": ["rbind", "ro" if m.read_only else "rw"],
                    }
                    if m.kind == "bind"
                    else {
                        "destination": m.target,
                        "source": "tmpfs",
                        "type": "tmpfs",
                        "options": [f"size={m.size}"] if m.size else [],
                    }
                    for m in spec.mounts
                ],
                "init": spec.init,
                "restart_policy": spec.restart,
            }
            if spec.command:
                body["command"] = list(spec.command)
            limits: dict[str, Any] = {}
            if spec.memory is not None:
                limits["memory"] = {"limit": spec.memory}
            if spec.cpus is not None:
                limits["cpu"] = {"quota": int(spec.cpus * 100000), "period": 100000}
            if limits:
                body["resource_limits"] = limits
            if spec.network == "none":
                body["netns"] = {"nsmode": "none"}
            code, raw = await self._request("POST", f"{API}/containers/create", body=body)
            if code == 500 and b"already in use" in raw:
                raise Conflict(f"the container name {spec.name} is already in use")
            self._check(code, raw, f"create {spec.name}")
            return await self.inspect(str(json.loads(raw)["Id"]))

        return Deferred.fromCoroutine(go())

    def start(self, container: str) -> Deferred[None]:
        async def go() -> None:
            code, body = await self._request(
                "POST", f"{API}/containers/{quote(container, safe='')}/start"
            )
            self._check(code, body, f"start {container}", ok=(204, 304))

        return Deferred.fromCoroutine(go())

    def stop(self, container: str, timeout: float = 10.0) -> Deferred[None]:
        async def go() -> None:
            code, body = await self._request(
                "POST",
                f"{API}/containers/{quote(container, safe='')}/stop",
                {"timeout": str(int(timeout))},
                timeout=timeout + 30.0,
            )
            self._check(code, body, f"stop {container}", ok=(204, 304))

        return Deferred.fromCoroutine(go())

    def remove(self, container: str) -> Deferred[None]:
        async def go() -> None:
            code, body = await self._request(
                "DELETE",
                f"{API}/containers/{quote(container, safe='')}",
                {"force": "true", "t": "10"},
                timeout=60.0,
            )
            if code == 404:
                return
            self._check(code, body, f"remove {container}", ok=(200, 204))

        return Deferred.fromCoroutine(go())

    def logs(self, container: str, tail: int = 100) -> Deferred[str]:
        async def go() -> str:
            code, body = await self._request(
                "GET",
                f"{API}/containers/{quote(container, safe='')}/logs",
                {"stdout": "true", "stderr": "true", "tail": str(tail)},
            )
            self._check(code, body, f"logs of {container}")
            return _demultiplex(body)

        return Deferred.fromCoroutine(go())

    def watch(self, observer: Callable[[ContainerEvent], None]) -> Callable[[], None]:
        self._watchers.append(observer)
        self._open_stream()

        def cancel() -> None:
            if observer in self._watchers:
                self._watchers.remove(observer)
            if not self._watchers:
                self.close()

        return cancel

    # -- the event stream ---------------------------------------------------------

    def close(self) -> None:
        """Stop following events."""
        self._streaming = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    def _open_stream(self, delay: float = 0.0) -> None:
        if self._streaming:
            return
        self._streaming = True
        self._stream = Deferred.fromCoroutine(self._follow(delay))
        self._stream.addErrback(lambda f: f.trap(CancelledError))

    async def _follow(self, delay: float) -> None:
        attempt = 0
        while self._streaming:
            try:
                filters = json.dumps({"type": ["container"]})
                response = await self.client.get(
                    f"{BASE}{API}/events?stream=true&filters={quote(filters)}",
                    unbuffered=True,
                )
                attempt = 0
                stream = _LineStream(self._event_line)
                response.deliverBody(stream)
                await stream.done
            except CancelledError:
                raise
            except Exception as e:
                self.log.warn("podman: event stream broke: {error}", error=str(e))
            if not self._streaming:
                return
            attempt += 1
            await deferLater(self.reactor, min(30.0, 0.2 * 2**attempt), lambda: None)

    def _event_line(self, line: bytes) -> None:
        try:
            raw = json.loads(line)
        except ValueError:
            return
        if not isinstance(raw, Mapping) or raw.get("Type") != "container":
            return
        actor = raw.get("Actor") or {}
        cid = str(actor.get("ID") or raw.get("id") or "")
        action = str(raw.get("Action") or raw.get("status") or "")
        action = _ACTIONS.get(action, action)
        attributes = actor.get("Attributes") or {}
        name = str(attributes.get("name") or self._names.get(cid, ""))
        labels = self._labels.get(cid)
        if action == "remove":
            self._labels.pop(cid, None)
            self._names.pop(cid, None)
        if labels is not None or action == "remove":
            self._deliver(ContainerEvent(action, cid, name, dict(labels or {})))
            return

        def inspected(info: ContainerInfo) -> None:
            self._deliver(ContainerEvent(action, cid, name, dict(info.labels)))

        self.inspect(cid).addCallbacks(inspected, lambda f: None)

    def _deliver(self, event: ContainerEvent) -> None:
        for watcher in list(self._watchers):
            try:
                watcher(event)
            except Exception:
                self.log.failure("podman: an event watcher failed on {action}", action=event.action)


def _demultiplex(body: bytes) -> str:
    """Podman's log stream: 8-byte frame headers (stream, size) before each chunk."""
    out = bytearray()
    i = 0
    while i + 8 <= len(body) and body[i] in (0, 1, 2) and body[i + 1 : i + 4] == b"\0\0\0":
        size = int.from_bytes(body[i + 4 : i + 8], "big")
        out += body[i + 8 : i + 8 + size]
        i += 8 + size
    if i < len(body):
        out += body[i:]
    return out.decode("utf-8", "replace")


# ==========================================================================
# The plugin service


class _ServiceProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.output = bytearray()
        #: How it ended (``ProcessDone`` or ``ProcessTerminated``), once it has.
        self.reason: BaseException | None = None

    def errReceived(self, data: bytes) -> None:
        self.output += data
        del self.output[:-4000]

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason.value
        if not self.ended.called:
            self.ended.callback(None)


@implementer(IContainerRuntime, ISupervisedService)
@attrs.define(eq=False)
class PodmanContainers(Service):
    """
    The ``containers=podman`` service: podman when usable, else (with
    ``fallback="fake"``) the fake runtime, loudly (see the module docstring).
    """

    log = Logger()

    reactor: Any
    socket_path: str
    health: IHealth | None = None
    start_service: bool = True
    podman: str = "podman"
    containers_conf: str = ""
    fallback: str = "fake"
    ping_timeout: float = 10.0
    #: ``podman system service --time``: a service we spawned exits by itself
    #: this many seconds after its last connection closes (our event stream
    #: keeps it alive), so it never outlives a piccolod that was SIGKILLed.
    idle_timeout: int = 60
    delegate: Any = attrs.field(init=False, default=None)
    _outcome: Failure | bool | None = attrs.field(init=False, default=None)
    _waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _process: Any = attrs.field(init=False, default=None)
    _protocol: _ServiceProcess | None = attrs.field(init=False, default=None)
    _watchers: list[tuple[Callable[[ContainerEvent], None], Any]] = attrs.field(
        init=False, factory=list
    )

    @classmethod
    def from_context(cls, ctx: Any) -> PodmanContainers:
        config: Mapping[str, Any] = ctx.config
        errors = []
        fallback = config.get("fallback", "fake")
        if fallback not in ("fake", ""):
            errors.append('[subsystems.containers] fallback must be "fake" or ""')
        conf = str(config.get("containers_conf", "") or "")
        if conf and not Path(conf).is_file():
            errors.append(f"[subsystems.containers] containers_conf {conf!r} is not a file")
        if errors:
            raise ConfigError(errors)
        return cls(
            reactor=ctx.kernel.reactor,
            socket_path=str(config.get("socket") or default_socket()),
            health=ctx.kernel.health,
            start_service=bool(config.get("start_service", True)),
            podman=str(config.get("podman", "podman")),
            containers_conf=conf,
            fallback=str(fallback),
            ping_timeout=float(config.get("ping_timeout", 10.0)),
            idle_timeout=int(config.get("idle_timeout", 60)),
        )

    @property
    def kind(self) -> str:
        if self.delegate is None:
            return "podman (starting)"
        return (
            str(self.delegate.kind)
            if isinstance(self.delegate, PodmanRuntime)
            else "fake (fallback)"
        )

    # -- ISupervisedService ---------------------------------------------------

    def when_ready(self) -> Deferred[None]:
        """
        With a fallback, ready at once: connecting to (or starting) podman
        goes on in the background, so one slow ``podman system service``
        start does not hold back the daemon's readiness.  Until it answers,
        runtime calls fail with ``NotReady`` (the app controller retries
        with backoff) and the ``containers`` health component says so.
        Without a fallback (``fallback = ""``) readiness waits for podman
        and fails when it is not usable.  :meth:`when_connected` fires once
        a runtime (podman, or the loud fallback) is in use.
        """
        if self.fallback != "fake":
            return self.when_connected()
        return Deferred.fromCoroutine(_none())

    def when_connected(self) -> Deferred[None]:
        """Fires once podman (or the fallback) is in use; fails if neither."""
        if self._outcome is not None:
            if isinstance(self._outcome, Failure):
                return Deferred.fromCoroutine(_raise(self._outcome))
            return Deferred.fromCoroutine(_none())
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def when_exited(self) -> Deferred[None]:
        return Deferred()

    # -- IService ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._report(HealthLevel.WARN, f"connecting to podman at {self.socket_path}")
        Deferred.fromCoroutine(self._start()).addCallbacks(self._started, self._failed_start)

    def _started(self, _: object) -> None:
        self._outcome = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _failed_start(self, failure: Failure) -> None:
        self._outcome = failure
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    async def _start(self) -> None:
        runtime = PodmanRuntime(self.reactor, self.socket_path)
        reason = ""
        try:
            await runtime.ping()
        except Exception as e:
            reason = str(e)
            if self.start_service:
                try:
                    await self._spawn()
                    await self._wait_for(runtime)
                    reason = ""
                except Exception as spawn_error:
                    reason = f"{reason}; starting it failed: {spawn_error}"
        if not reason:
            version = await runtime.version()
            self._use(runtime)
            self.log.info(
                "containers: podman {version} at {socket}", version=version, socket=self.socket_path
            )
            self._report(HealthLevel.OK, f"podman {version} at {self.socket_path}")
            return
        if self.fallback != "fake":
            self._report(HealthLevel.ERROR, f"podman is not usable: {reason}")
            raise Unavailable(f"podman is not usable: {reason}")
        message = (
            f"PODMAN IS NOT USABLE ({reason}); FALLING BACK TO THE FAKE RUNTIME: "
            "apps do NOT really run"
        )
        self.log.critical("containers: {message}", message=message)
        self._report(HealthLevel.WARN, message)
        self._use(FakeContainerRuntime(self.reactor))

    async def _spawn(self) -> None:
        binary = shutil.which(self.podman) if "/" not in self.podman else self.podman
        if binary is None or not os.path.exists(binary):
            raise Unavailable(f"{self.podman} is not installed")
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        if self.containers_conf:
            env["CONTAINERS_CONF"] = self.containers_conf
        self._protocol = _ServiceProcess()
        self._process = self.reactor.spawnProcess(
            self._protocol,
            binary,
            [
                binary,
                "system",
                "service",
                f"--time={self.idle_timeout}",
                f"unix://{self.socket_path}",
            ],
            env=env,
        )
        self.log.info(
            "containers: started podman system service (pid {pid}) on {socket}",
            pid=self._process.pid,
            socket=self.socket_path,
        )

    async def _wait_for(self, runtime: PodmanRuntime) -> None:
        waited = 0.0
        while True:
            try:
                await runtime.ping()
                return
            except Unavailable:
                if self._protocol is not None and self._protocol.ended.called:
                    raise Unavailable(
                        "podman system service exited: "
                        + self._protocol.output.decode("utf-8", "replace")[-500:]
                    ) from None
                if waited >= self.ping_timeout:
                    raise
            await deferLater(self.reactor, 0.05, lambda: None)
            waited += 0.05

    def _use(self, runtime: Any) -> None:
        self.delegate = runtime
        watchers, self._watchers = self._watchers, []
        for observer, _ in watchers:
            self._watchers.append((observer, runtime.watch(observer)))

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        for _, cancel in self._watchers:
            if cancel is not None:
                cancel()
        if isinstance(self.delegate, PodmanRuntime):
            self.delegate.close()
        return Deferred.fromCoroutine(self._stop_process())

    async def _stop_process(self) -> None:
        process, protocol = self._process, self._protocol
        self._process = None
        if process is None or protocol is None or protocol.ended.called:
            return
        try:
            process.signalProcess("TERM")
        except Exception:
            return
        ended = protocol.ended
        timer = self.reactor.callLater(10.0, _kill, process)
        await ended
        if timer.active():
            timer.cancel()

    def _report(self, level: HealthLevel, message: str) -> None:
        if self.health is not None:
            self.health.report(HEALTH, level, message)

    # -- IContainerRuntime (delegated) ---------------------------------------------

    def _runtime(self) -> Any:
        if self.delegate is None:
            raise NotReady("the container runtime is still starting")
        return self.delegate

    def ping(self) -> Deferred[None]:
        return _call(lambda: self._runtime().ping())

    def image_exists(self, image: str) -> Deferred[bool]:
        return _call(lambda: self._runtime().image_exists(image))

    def build_image(
        self, tag: str, containerfile: str, build_args: Mapping[str, str], target: str
    ) -> Deferred[None]:
        return _call(lambda: self._runtime().build_image(tag, containerfile, build_args, target))

    def list_containers(self, labels: Mapping[str, str]) -> Deferred[Sequence[ContainerInfo]]:
        return _call(lambda: self._runtime().list_containers(labels))

    def inspect(self, container: str) -> Deferred[ContainerInfo]:
        return _call(lambda: self._runtime().inspect(container))

    def create(self, spec: ContainerSpec) -> Deferred[ContainerInfo]:
        return _call(lambda: self._runtime().create(spec))

    def start(self, container: str) -> Deferred[None]:
        return _call(lambda: self._runtime().start(container))

    def stop(self, container: str, timeout: float = 10.0) -> Deferred[None]:
        return _call(lambda: self._runtime().stop(container, timeout))

    def remove(self, container: str) -> Deferred[None]:
        return _call(lambda: self._runtime().remove(container))

    def logs(self, container: str, tail: int = 100) -> Deferred[str]:
        return _call(lambda: self._runtime().logs(container, tail))

    def watch(self, observer: Callable[[ContainerEvent], None]) -> Callable[[], None]:
        entry: list[Any] = [observer, None]
        if self.delegate is not None:
            entry[1] = self.delegate.watch(observer)
        self._watchers.append((observer, entry[1]))

        def cancel() -> None:
            for item in list(self._watchers):
                if item[0] is observer:
                    self._watchers.remove(item)
                    if item[1] is not None:
                        item[1]()

        return cancel


async def _raise(failure: Failure) -> None:
    failure.raiseException()


async def _none() -> None:
    return None


def _call(fn: Callable[[], Deferred[Any]]) -> Deferred[Any]:
    return call(fn)


def _kill(process: Any) -> None:
    try:
        process.signalProcess("KILL")
    except Exception:
        pass
