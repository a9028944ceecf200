"""
:class:`FakeContainerRuntime`: an in-memory, deterministic
``IContainerRuntime`` for tests, benchmarks and machines without a
container engine (the ``containers=fake`` plugin).

It keeps the real engine's rules, so that the contract suite
(``tests/contracts/containers.py``) holds for it as for podman:

- images are never pulled: ``create`` fails with ``NotFound`` for an image
  not added with :meth:`add_image` (or built with ``build_image``);
- names are unique (``Conflict``); a host port is published by at most one
  running container (``Conflict`` at ``start``, like a failed bind);
- events (``create``, ``start``, ``die``, ``stop``, ``remove``) reach the
  watchers on a later reactor turn, never re-entrantly;
- ``stop`` and ``remove`` are idempotent; ``start`` of a running one is a
  no-op.

Test helpers: :meth:`kill` (a container dying from outside),
:meth:`fail_next` (inject an error into the next call of an operation),
``available`` (``False``: every call fails with ``Unavailable``) and
``calls`` (every operation, in order).  Listing by the ``piccolod.app``
label is indexed, so a lookup costs the same among 1000 apps as among 1.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from piccolod.errors import Conflict, InvalidCommand, NotFound, Unavailable
from piccolod.events import HealthLevel
from piccolod.interfaces import (
    ContainerEvent,
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    IContainerRuntime,
)
from piccolod.kernel.aio import provides

__all__ = ["APP_LABEL", "FakeContainerRuntime"]

#: The label the fake indexes (the app controller's).
APP_LABEL = "piccolod.app"


@attrs.define(eq=False)
class _Container:
    id: str
    spec: ContainerSpec
    state: ContainerState = ContainerState.CREATED
    exit_code: int | None = None
    logs: list[str] = attrs.field(factory=list)

    def info(self) -> ContainerInfo:
        return ContainerInfo(
            id=self.id,
            name=self.spec.name,
            image=self.spec.image,
            state=self.state,
            labels=dict(self.spec.labels),
            ports=self.spec.ports,
            exit_code=self.exit_code,
        )


@implementer(IContainerRuntime)
@attrs.define(eq=False)
class FakeContainerRuntime(Service):
    """An in-memory container engine (see the module docstring)."""

    log = Logger()

    clock: IReactorTime = attrs.field(validator=provides(IReactorTime))
    images: set[str] = attrs.field(factory=set, converter=set)
    kind: str = "fake"
    available: bool = True
    #: ``(operation, argument)`` of every call, oldest first.
    calls: list[tuple[str, str]] = attrs.field(init=False, factory=list)
    _containers: dict[str, _Container] = attrs.field(init=False, factory=dict)
    _by_name: dict[str, str] = attrs.field(init=False, factory=dict)
    #: (host ip, host port) -> id of the running container publishing it.
    _bound: dict[tuple[str, int], str] = attrs.field(init=False, factory=dict)
    _by_app: dict[str, set[str]] = attrs.field(
        init=False, factory=lambda: collections.defaultdict(set)
    )
    _ids: Any = attrs.field(init=False, factory=lambda: itertools.count(1))
    _watchers: list[Callable[[ContainerEvent], None]] = attrs.field(init=False, factory=list)
    _faults: dict[str, list[BaseException]] = attrs.field(
        init=False, factory=lambda: collections.defaultdict(list)
    )

    @classmethod
    def from_context(cls, ctx: Any) -> FakeContainerRuntime:
        """The ``containers=fake`` plugin: ``images`` lists the images present."""
        images = ctx.config.get("images", [])
        runtime = cls(ctx.kernel.reactor, images=set(images))
        ctx.kernel.health.report(
            "containers",
            HealthLevel.WARN,
            "containers=fake: apps run in an in-memory stand-in, not in real containers",
        )
        return runtime

    # -- test helpers ---------------------------------------------------------

    def add_image(self, image: str) -> None:
        """Make ``image`` present locally."""
        self.images.add(image)

    def fail_next(self, operation: str, error: BaseException) -> None:
        """Fail the next call of ``operation`` (``create``, ``start``...) with ``error``."""
        self._faults[operation].append(error)

    def kill(self, container: str, exit_code: int = 137) -> None:
        """A running container dies from outside (OOM, ``kill -9``, a crash)."""
        c = self._find(container)
        if c.state is not ContainerState.RUNNING:
            raise Conflict(f"container {container} is not running")
        self._exited(c, exit_code)
        c.logs.append(f"killed ({exit_code})")
        self._emit("die", c)

    def append_log(self, container: str, line: str) -> None:
        self._find(container).logs.append(line)

    def containers(self) -> list[ContainerInfo]:
        """Every container, sorted by name (no call recorded)."""
        return sorted((c.info() for c in self._containers.values()), key=lambda i: i.name)

    def count(self, operation: str) -> int:
        """How many calls of ``operation`` were made."""
        return sum(1 for op, _ in self.calls if op == operation)

    # -- IContainerRuntime ----------------------------------------------------

    def ping(self) -> Deferred[None]:
        return self._call("ping", "", lambda: None)

    def image_exists(self, image: str) -> Deferred[bool]:
        return self._call("image_exists", image, lambda: image in self.images)

    def build_image(
        self, tag: str, containerfile: str, build_args: Mapping[str, str], target: str
    ) -> Deferred[None]:
        def build() -> None:
            bases = [
                line.split()[1]
                for line in containerfile.splitlines()
                if line.strip().upper().startswith("FROM ") and len(line.split()) > 1
            ]
            if not bases:
                raise InvalidCommand("build failed: the Containerfile has no FROM line")
            for base in bases:
                if base not in self.images and base.lower() != "scratch":
                    raise InvalidCommand(f"build failed: base image {base} is not present locally")
            self.images.add(tag)

        return self._call("build_image", tag, build)

    def list_containers(self, labels: Mapping[str, str]) -> Deferred[Sequence[ContainerInfo]]:
        def listing() -> Sequence[ContainerInfo]:
            app = labels.get(APP_LABEL)
            if app is not None:
                candidates = [self._containers[i] for i in self._by_app.get(app, ())]
            else:
                candidates = list(self._containers.values())
            found = [
                c.info()
                for c in candidates
                if all(c.spec.labels.get(k) == v for k, v in labels.items())
            ]
            return sorted(found, key=lambda i: i.name)

        return self._call("list", ",".join(f"{k}={v}" for k, v in sorted(labels.items())), listing)

    def inspect(self, container: str) -> Deferred[ContainerInfo]:
        return self._call("inspect", container, lambda: self._find(container).info())

    def create(self, spec: ContainerSpec) -> Deferred[ContainerInfo]:
        def create() -> ContainerInfo:
            if not isinstance(spec, ContainerSpec):
                raise InvalidCommand("create takes a ContainerSpec")
            if spec.image not in self.images:
                raise NotFound(f"image {spec.image} is not present locally (never pulled)")
            if spec.name in self._by_name:
                raise Conflict(f"the container name {spec.name} is already in use")
            container = _Container(id=f"fake{next(self._ids):06d}", spec=spec)
            self._containers[container.id] = container
            self._by_name[spec.name] = container.id
            app = spec.labels.get(APP_LABEL)
            if app is not None:
                self._by_app[app].add(container.id)
            self._emit("create", container)
            return container.info()

        return self._call("create", spec.name, create)

    def start(self, container: str) -> Deferred[None]:
        def start() -> None:
            c = self._find(container)
            if c.state is ContainerState.RUNNING:
                return
            for port in c.spec.ports:
                holder = self._bound.get((port.host_ip, port.host_port))
                if holder is not None and holder != c.id:
                    other = self._containers[holder].spec.name
                    raise Conflict(
                        f"cannot publish {port.host_ip}:{port.host_port}: "
                        f"address already in use by {other}"
                    )
            for port in c.spec.ports:
                self._bound[(port.host_ip, port.host_port)] = c.id
            c.state = ContainerState.RUNNING
            c.exit_code = None
            c.logs.append("started")
            self._emit("start", c)

        return self._call("start", container, start)

    def stop(self, container: str, timeout: float = 10.0) -> Deferred[None]:
        def stop() -> None:
            c = self._find(container)
            if c.state is not ContainerState.RUNNING:
                return
            self._exited(c, 0)
            c.logs.append("stopped")
            self._emit("die", c)
            self._emit("stop", c)

        return self._call("stop", container, stop)

    def remove(self, container: str) -> Deferred[None]:
        def remove() -> None:
            try:
                c = self._find(container)
            except NotFound:
                return
            if c.state is ContainerState.RUNNING:
                self._exited(c, 137)
            del self._containers[c.id]
            del self._by_name[c.spec.name]
            app = c.spec.labels.get(APP_LABEL)
            if app is not None:
                ids = self._by_app.get(app)
                if ids is not None:
                    ids.discard(c.id)
                    if not ids:
                        del self._by_app[app]
            self._emit("remove", c)

        return self._call("remove", container, remove)

    def logs(self, container: str, tail: int = 100) -> Deferred[str]:
        def logs() -> str:
            lines = self._find(container).logs[-tail:] if tail > 0 else []
            return "".join(line + "\n" for line in lines)

        return self._call("logs", container, logs)

    def watch(self, observer: Callable[[ContainerEvent], None]) -> Callable[[], None]:
        self._watchers.append(observer)

        def cancel() -> None:
            if observer in self._watchers:
                self._watchers.remove(observer)

        return cancel

    # -- internals -------------------------------------------------------------

    def _call(self, operation: str, argument: str, fn: Callable[[], Any]) -> Deferred[Any]:
        self.calls.append((operation, argument))
        if not self.available:
            return fail(Unavailable("the fake container runtime is unavailable"))
        faults = self._faults.get(operation)
        if faults:
            return fail(faults.pop(0))
        try:
            return succeed(fn())
        except Exception as e:
            return fail(e)

    def _exited(self, c: _Container, exit_code: int) -> None:
        c.state = ContainerState.EXITED
        c.exit_code = exit_code
        for port in c.spec.ports:
            if self._bound.get((port.host_ip, port.host_port)) == c.id:
                del self._bound[(port.host_ip, port.host_port)]

    def _find(self, container: str) -> _Container:
        found = self._containers.get(container)
        if found is None:
            cid = self._by_name.get(container)
            if cid is not None:
                found = self._containers[cid]
        if found is None:
            raise NotFound(f"no container {container}")
        return found

    def _emit(self, action: str, container: _Container) -> None:
        if not self._watchers:
            return
        event = ContainerEvent(
            action=action,
            container_id=container.id,
            name=container.spec.name,
            labels=dict(container.spec.labels),
        )
        self.clock.callLater(0, self._deliver, event)

    def _deliver(self, event: ContainerEvent) -> None:
        for watcher in list(self._watchers):
            try:
                watcher(event)
            except Exception:
                self.log.failure(
                    "a container event watcher failed on {action}", action=event.action
                )
