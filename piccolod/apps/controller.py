"""
The app controller: desired apps (control store) against observed
containers (the runtime), level-triggered on the kernel's
:class:`~piccolod.kernel.controllers.Controller`.

One key per app.  ``reconcile(app)`` reads the desired record (cached,
refreshed from the store on unlock and resync), lists the app's containers
by label, applies the policy, and acts:

============================  ==================================================
situation                     action
============================  ==================================================
storage not unlocked          stop every container, withdraw the routes
app removed from the store    remove its containers, withdraw its routes
disabled (``apps.stop``)      stop the container, withdraw the routes
stateful, this node follows   stop the container, route to the leader
stateful, role unknown        stop the container, withdraw (``unknown`` never leads)
dependency not running        wait (requeue) with ``DependenciesReady=False``
otherwise                     image present (or built), ports allocated, volumes
                              attached, one container matching the spec's
                              fingerprint (stale ones and duplicates removed),
                              running, exposed locally, health-checked
============================  ==================================================

Containers carry the labels ``piccolod.app``, ``piccolod.instance``,
``piccolod.generation`` and ``piccolod.fingerprint`` and a deterministic
name, so after a restart they are **adopted** (same fingerprint → kept as
they are) and never duplicated.  A container that exits while it should run
(killed from outside, crashed) is restarted after a per-app exponential
backoff that resets once it has run ``stable_after`` seconds.  Errors go to
the controller's per-key backoff; a spec that no longer validates is a
terminal error.

Every app has an :class:`AppStatus` (state, ``generation``,
``observed_generation``, conditions ``Running``, ``Routed``, ``Degraded``,
``DependenciesReady`` and, with a healthcheck, ``Healthy``) published as a
retained ``AppStateChanged`` whenever it changes.

Cost: a reconcile of one app touches only that app (one indexed container
listing; ports, volumes and exposure are cached per generation and re-sent
only when they change), so one change among 1000 apps costs the same as
among 1.
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from piccolod.apps.spec import AppSpec, app_volume_id, spec_from_json
from piccolod.apps.store import CONTEXT, StoreClient, dispatch
from piccolod.commands import (
    AllocatePorts,
    AttachVolume,
    EnsureVolume,
    ExposeApp,
    ExposedListener,
    PortAllocation,
    StoredApp,
    TrackResource,
    VolumeResult,
    WithdrawApp,
)
from piccolod.errors import InvalidCommand, PiccolodError
from piccolod.events import AppStateChanged, Role
from piccolod.interfaces import (
    Backoff,
    ContainerEvent,
    ContainerInfo,
    ContainerMount,
    ContainerSpec,
    ContainerState,
    ICommandDispatcher,
    IContainerRuntime,
    IEventBus,
    ILeadershipRegistry,
    IReconciler,
    PortMapping,
)
from piccolod.kernel.controllers import Condition, ObjectStatus, TerminalError

__all__ = [
    "APP_LABEL",
    "FINGERPRINT_LABEL",
    "GENERATION_LABEL",
    "INSTANCE_LABEL",
    "AppReconciler",
    "AppStatus",
    "ImageMissing",
    "Prober",
]

APP_LABEL = "piccolod.app"
INSTANCE_LABEL = "piccolod.instance"
GENERATION_LABEL = "piccolod.generation"
FINGERPRINT_LABEL = "piccolod.fingerprint"

#: ``probe(host, port, path, timeout)`` fires with True when healthy.
Prober = Callable[[str, int, str, float], Deferred[bool]]

# App states (``AppStatus.state``).
PENDING = "pending"
RUNNING = "running"
STOPPED = "stopped"
LOCKED = "locked"
STANDBY = "standby"  # a follower: the leader runs it
WAITING = "waiting"  # for leadership, dependencies or a restart backoff
ERROR = "error"


class ImageMissing(PiccolodError):
    """The app's image is not present locally (images are never pulled)."""

    type = "image-missing"
    title = "Image not present locally"
    status = 409


class InvalidStoredSpec(TerminalError):
    """The stored spec no longer validates; only a new spec fixes it."""

    type = "invalid-spec"
    title = "Invalid stored app spec"


@attrs.frozen
class AppStatus:
    """What the controller observed and did for one app."""

    name: str
    state: str = PENDING
    status: ObjectStatus = attrs.field(factory=ObjectStatus)
    container_id: str | None = None
    image: str | None = None
    ports: Mapping[str, Mapping[str, int]] = attrs.field(factory=dict)
    restarts: int = 0
    route: str = "none"  # "local" | "leader" | "none"
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "generation": self.status.generation,
            "observed_generation": self.status.observed_generation,
            "conditions": [c.to_json() for c in self.status.conditions],
            "container_id": self.container_id,
            "image": self.image,
            "ports": {k: dict(v) for k, v in self.ports.items()},
            "restarts": self.restarts,
            "route": self.route,
            "message": self.message,
        }


@attrs.define
class _Crash:
    count: int = 0
    exited_at: float | None = None
    started_at: float | None = None
    restarts: int = 0


@attrs.define
class _Health:
    failures: int = 0
    next_probe: float = 0.0
    healthy: bool | None = None


@attrs.define
class _Cache:
    """Per-app facts that only change with the generation or the lock."""

    generation: int
    spec: AppSpec
    ports: dict[str, dict[str, int]] | None = None
    mounts: tuple[ContainerMount, ...] | None = None
    tracked: bool = False


@implementer(IReconciler)
@attrs.define(eq=False)
class AppReconciler:
    """The reconciler of the app controller (see the module docstring)."""

    log = Logger()

    clock: IReactorTime
    runtime: IContainerRuntime
    dispatcher: ICommandDispatcher
    registry: ILeadershipRegistry
    bus: IEventBus | None = None
    instance: str = "default"
    name_prefix: str = "piccolod-"
    stop_timeout: float = 10.0
    crash_backoff: Backoff = attrs.field(
        factory=lambda: Backoff(initial=0.5, maximum=60.0, factor=2.0, jitter=0.1)
    )
    stable_after: float = 60.0
    prober: Prober | None = None
    rand: Callable[[], float] = random.random
    #: Called with an app name whenever it should be reconciled again
    #: (set by the service to ``controller.enqueue``).
    enqueue: Callable[[str], None] = attrs.field(default=lambda app: None)
    #: Called after any app's status changed state (set by the service).
    on_change: Callable[[], None] = attrs.field(default=lambda: None)

    store: StoreClient = attrs.field(init=False)
    desired: dict[str, StoredApp] | None = attrs.field(init=False, default=None)
    unlocked: bool = attrs.field(init=False, default=False)
    statuses: dict[str, AppStatus] = attrs.field(init=False, factory=dict)
    #: How many apps are in each state, and which are in error.
    counts: collections.Counter[str] = attrs.field(init=False, factory=collections.Counter)
    errors: set[str] = attrs.field(init=False, factory=set)
    _cache: dict[str, _Cache] = attrs.field(init=False, factory=dict)
    _crash: dict[str, _Crash] = attrs.field(init=False, factory=dict)
    _health: dict[str, _Health] = attrs.field(init=False, factory=dict)
    _exposed: dict[str, tuple[Any, ...]] = attrs.field(init=False, factory=dict)
    _expected: set[tuple[str, str]] = attrs.field(init=False, factory=set)
    _dependents: dict[str, set[str]] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self.store = StoreClient(self.dispatcher)

    # -- inputs -----------------------------------------------------------------

    def set_unlocked(self, unlocked: bool) -> None:
        """Storage was unlocked (desired state readable) or locked."""
        if unlocked == self.unlocked:
            return
        self.unlocked = unlocked
        for cache in self._cache.values():
            cache.ports = None
            cache.mounts = None
        self._exposed.clear()
        if not unlocked:
            self.desired = None

    def remember(self, record: StoredApp) -> None:
        """A record was written by this node (keeps the cache current)."""
        if self.desired is None:
            return
        self.desired[record.name] = record

    def forget(self, name: str) -> None:
        if self.desired is not None:
            self.desired.pop(name, None)

    def route_withdrawn(self, app: str) -> None:
        """The services subsystem withdrew a route of ``app`` (by itself or on request)."""
        if self._exposed.pop(app, None) is not None:
            self.enqueue(app)

    def container_event(self, event: ContainerEvent) -> None:
        """A runtime event: a hint to reconcile the app it belongs to."""
        app = event.labels.get(APP_LABEL)
        if app is None or event.labels.get(INSTANCE_LABEL) != self.instance:
            return
        token = (event.container_id, event.action)
        if token in self._expected:
            self._expected.discard(token)
            return
        self.enqueue(app)

    async def load(self) -> dict[str, StoredApp]:
        """The desired apps (from the cache, or the store when unknown)."""
        if self.desired is None:
            records = await self.store.list()
            self.desired = {r.name: r for r in records}
            self._dependents = {}
            for record in records:
                self._note_dependencies(record)
        return self.desired

    # -- IReconciler ---------------------------------------------------------

    async def keys(self) -> list[str]:
        names: set[str] = set(self.statuses)
        containers = await self.runtime.list_containers({INSTANCE_LABEL: self.instance})
        names.update(c.labels[APP_LABEL] for c in containers if APP_LABEL in c.labels)
        if self.unlocked:
            self.desired = None  # a resync re-reads the store
            names.update(await self.load())
        return sorted(names)

    def reconcile(self, key: str) -> Deferred[float | None]:
        return Deferred.fromCoroutine(self._reconcile(key))

    async def _reconcile(self, app: str) -> float | None:
        try:
            return await self._converge(app)
        except Exception as e:
            self._failed(app, e)
            raise

    async def _converge(self, app: str) -> float | None:
        containers = list(
            await self.runtime.list_containers({APP_LABEL: app, INSTANCE_LABEL: self.instance})
        )
        if not self.unlocked:
            await self._halt(app, containers, LOCKED, "storage is locked")
            return None
        desired = await self.load()
        record = desired.get(app)
        if record is None:
            for container in containers:
                await self._remove(container)
            await self._withdraw(app)
            self._cache.pop(app, None)
            self._crash.pop(app, None)
            self._health.pop(app, None)
            gone = self.statuses.pop(app, None)
            if gone is not None:
                self.counts[gone.state] -= 1
                self.errors.discard(app)
                self.on_change()
                self._publish(AppStatus(name=app, state="removed"))
            return None
        cache = self._cache_for(record)
        spec = cache.spec
        if spec.stateful and not cache.tracked:
            await self._track(spec, cache)
        # Disabled wins over leadership: ``enabled`` is cluster-wide (the
        # leader stops it too), so a follower must not route to the leader.
        if not record.enabled:
            await self._halt(app, containers, STOPPED, "stopped by the admin", record)
            return None
        if spec.stateful:
            leadership = self.registry.state(spec.resource)
            if leadership.role is not Role.LEADER:
                await self._standby(app, record, cache, containers, leadership)
                return None
        waiting = self._dependencies(spec)
        if waiting:
            await self._halt(
                app,
                containers,
                WAITING,
                f"waiting for {', '.join(waiting)}",
                record,
                dependencies=False,
            )
            return None
        return await self._run(app, record, cache, containers)

    # -- the running path --------------------------------------------------------

    async def _run(
        self, app: str, record: StoredApp, cache: _Cache, containers: list[ContainerInfo]
    ) -> float | None:
        spec = cache.spec
        image = spec.image_ref()
        if not await self.runtime.image_exists(image):
            if spec.build is None:
                raise ImageMissing(
                    f"image {image} is not present locally; build or load it (never pulled)",
                    image=image,
                )
            self.log.info("apps: building {image} for {app}", image=image, app=app)
            await self.runtime.build_image(
                image, spec.build.containerfile, dict(spec.build.build_args), spec.build.target
            )
        ports = await self._ports(spec, cache)
        mounts = await self._mounts(spec, cache)
        wanted = self._container_spec(record, spec, image, ports, mounts)
        fingerprint = wanted.labels[FINGERPRINT_LABEL]
        keep: ContainerInfo | None = None
        for container in sorted(
            containers, key=lambda c: (c.state is not ContainerState.RUNNING, c.name)
        ):
            if keep is None and container.labels.get(FINGERPRINT_LABEL) == fingerprint:
                keep = container
            else:
                await self._remove(container)
        crash = self._crash.setdefault(app, _Crash())
        now = self.clock.seconds()
        if keep is None:
            keep = await self.runtime.create(wanted)
            self._expected.add((keep.id, "create"))
            crash.exited_at = None
        if keep.state is not ContainerState.RUNNING:
            # An exit is a crash only when it ran under our watch: containers
            # we stopped (lock, stop, standby) or found stopped after a
            # restart start at once.
            if keep.state is ContainerState.EXITED and crash.started_at is not None:
                if crash.exited_at is None:
                    crash.exited_at = now
                    self.log.warn(
                        "apps: {app} exited (code {code}); restarting after backoff",
                        app=app,
                        code=keep.exit_code,
                    )
                due = crash.exited_at + self.crash_backoff.delay(crash.count, self.rand)
                if now < due:
                    self._set(
                        app,
                        record,
                        WAITING,
                        keep,
                        ports,
                        message=f"exited with {keep.exit_code}; restarting in {due - now:.1f}s",
                        running=False,
                    )
                    return due - now
                crash.count += 1
                crash.restarts += 1
            self._expected.add((keep.id, "start"))
            await self.runtime.start(keep.id)
            crash.exited_at = None
            crash.started_at = now
        elif crash.started_at is None:
            crash.started_at = now  # adopted running
        await self._expose(app, spec, "local", None)
        requeue: float | None = None
        healthy: bool | None = None
        if spec.healthcheck is not None and self.prober is not None:
            healthy, requeue = await self._probe(app, spec, ports, keep)
        if crash.count and crash.started_at is not None:
            stable_in = crash.started_at + self.stable_after - now
            if stable_in <= 0:
                crash.count = 0
            else:
                requeue = stable_in if requeue is None else min(requeue, stable_in)
        self._set(app, record, RUNNING, keep, ports, healthy=healthy, running=True, route="local")
        return requeue

    async def _probe(
        self,
        app: str,
        spec: AppSpec,
        ports: Mapping[str, Mapping[str, int]],
        container: ContainerInfo,
    ) -> tuple[bool | None, float]:
        check = spec.healthcheck
        assert check is not None and self.prober is not None
        state = self._health.setdefault(app, _Health())
        now = self.clock.seconds()
        if now < state.next_probe:
            return state.healthy, state.next_probe - now
        port = ports[check.listener]["backend"]
        try:
            ok = bool(await self.prober("127.0.0.1", port, check.path, check.timeout))
        except Exception:
            ok = False
        state.next_probe = now + check.interval
        if ok:
            state.failures = 0
            state.healthy = True
        else:
            state.failures += 1
            if state.failures >= check.retries:
                state.healthy = False
                state.failures = 0
                self.log.warn(
                    "apps: {app} failed {retries} health checks; restarting it",
                    app=app,
                    retries=check.retries,
                )
                self._expected.add((container.id, "stop"))
                self._expected.add((container.id, "die"))
                await self.runtime.stop(container.id, self.stop_timeout)
                crash = self._crash.setdefault(app, _Crash())
                crash.exited_at = self.clock.seconds()
                crash.started_at = None
                return False, 0.0
        return state.healthy, check.interval

    async def _ports(self, spec: AppSpec, cache: _Cache) -> dict[str, dict[str, int]]:
        if cache.ports is None:
            names = tuple(x.name for x in spec.listeners)
            result = await dispatch(
                self.dispatcher, AllocatePorts(app=spec.name, listeners=names), PortAllocation
            )
            cache.ports = {k: dict(v) for k, v in result.ports.items()}
        return cache.ports

    async def _mounts(self, spec: AppSpec, cache: _Cache) -> tuple[ContainerMount, ...]:
        if cache.mounts is None:
            mounts: list[ContainerMount] = []
            for volume in spec.persistent:
                volume_id = app_volume_id(spec.name, volume.name)
                await self.dispatcher.dispatch(EnsureVolume(volume_id=volume_id), CONTEXT)
                attached = await dispatch(
                    self.dispatcher, AttachVolume(volume_id=volume_id), VolumeResult
                )
                if not attached.path:
                    raise InvalidCommand(f"volume {volume_id} was attached without a path")
                mounts.append(ContainerMount(target=volume.container, source=attached.path))
            for tmp in spec.temporary:
                mounts.append(ContainerMount(target=tmp.container, kind="tmpfs", size=tmp.size))
            cache.mounts = tuple(mounts)
        return cache.mounts

    def _container_spec(
        self,
        record: StoredApp,
        spec: AppSpec,
        image: str,
        ports: Mapping[str, Mapping[str, int]],
        mounts: Sequence[ContainerMount],
    ) -> ContainerSpec:
        mappings = tuple(
            PortMapping(container_port=x.guest_port, host_port=ports[x.name]["backend"])
            for x in spec.listeners
        )
        body = {
            "spec": spec.fingerprint(),
            "image": image,
            "ports": [attrs.asdict(p) for p in mappings],
            "mounts": [attrs.asdict(m) for m in mounts],
            "name": self.container_name(spec.name),
        }
        fingerprint = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()[:24]
        return ContainerSpec(
            name=self.container_name(spec.name),
            image=image,
            labels={
                APP_LABEL: spec.name,
                INSTANCE_LABEL: self.instance,
                GENERATION_LABEL: str(record.generation),
                FINGERPRINT_LABEL: fingerprint,
            },
            command=spec.command,
            env=dict(spec.environment),
            ports=mappings,
            mounts=tuple(mounts),
            memory=spec.memory,
            cpus=spec.cpus,
            network="bridge" if spec.internet else "internal",
            restart="always" if spec.type == "system" else "no",
            init=True,
        )

    def container_name(self, app: str) -> str:
        return f"{self.name_prefix}{app}"

    # -- the stopping paths ------------------------------------------------------

    async def _halt(
        self,
        app: str,
        containers: Iterable[ContainerInfo],
        state: str,
        message: str,
        record: StoredApp | None = None,
        dependencies: bool = True,
    ) -> None:
        for container in containers:
            await self._stop(container)
        await self._withdraw(app)
        crash = self._crash.get(app)
        if crash is not None:
            crash.exited_at = None
            crash.started_at = None
        self._set(
            app,
            record,
            state,
            None,
            None,
            message=message,
            running=False,
            dependencies=dependencies,
        )

    async def _standby(
        self,
        app: str,
        record: StoredApp,
        cache: _Cache,
        containers: Iterable[ContainerInfo],
        leadership: Any,
    ) -> None:
        for container in containers:
            await self._stop(container)
        crash = self._crash.get(app)
        if crash is not None:
            crash.exited_at = None
            crash.started_at = None
        if leadership.role is Role.FOLLOWER and leadership.leader_address:
            await self._ports(cache.spec, cache)
            await self._expose(app, cache.spec, "leader", leadership.leader_address)
            self._set(
                app,
                record,
                STANDBY,
                None,
                cache.ports,
                message=f"follower: {leadership.leader_id or 'the leader'} runs it",
                running=False,
                route="leader",
            )
        else:
            await self._withdraw(app)
            self._set(
                app,
                record,
                WAITING,
                None,
                None,
                message=f"leadership of {cache.spec.resource} is {leadership.role.value}",
                running=False,
            )

    async def _stop(self, container: ContainerInfo) -> None:
        if container.state in (ContainerState.RUNNING, ContainerState.PAUSED):
            self._expected.add((container.id, "stop"))
            self._expected.add((container.id, "die"))
            await self.runtime.stop(container.id, self.stop_timeout)

    async def _remove(self, container: ContainerInfo) -> None:
        self._expected.add((container.id, "remove"))
        if container.state is ContainerState.RUNNING:
            self._expected.add((container.id, "die"))
            self._expected.add((container.id, "stop"))
        await self.runtime.remove(container.id)

    async def _expose(self, app: str, spec: AppSpec, mode: str, leader: str | None) -> None:
        listeners = tuple(
            ExposedListener(
                listener=x.name, protocol=x.protocol, flow=x.flow, remote_ports=x.remote_ports
            )
            for x in spec.listeners
        )
        token = (mode, leader, listeners)
        if self._exposed.get(app) == token:
            return
        await self.dispatcher.dispatch(
            ExposeApp(app=app, listeners=listeners, mode=mode, leader_address=leader), CONTEXT
        )
        self._exposed[app] = token

    async def _withdraw(self, app: str) -> None:
        status = self.statuses.get(app)
        if app not in self._exposed and (status is None or status.route == "none"):
            return
        await self.dispatcher.dispatch(WithdrawApp(app=app), CONTEXT)
        self._exposed.pop(app, None)

    async def _track(self, spec: AppSpec, cache: _Cache) -> None:
        try:
            await self.dispatcher.dispatch(TrackResource(resource_name=spec.resource), CONTEXT)
        except Exception as e:
            self.log.warn(
                "apps: cannot ask consensus for {resource}: {error}",
                resource=spec.resource,
                error=str(e),
            )
            return
        cache.tracked = True

    # -- bookkeeping ---------------------------------------------------------------

    def _cache_for(self, record: StoredApp) -> _Cache:
        cache = self._cache.get(record.name)
        if cache is not None and cache.generation == record.generation:
            return cache
        try:
            spec = spec_from_json(record.spec)
        except InvalidCommand as e:
            raise InvalidStoredSpec(
                f"the stored spec of {record.name} is invalid: {'; '.join(e.errors)}"
            ) from None
        tracked = cache.tracked if cache is not None else False
        fresh = _Cache(generation=record.generation, spec=spec, tracked=tracked)
        self._cache[record.name] = fresh
        self._note_dependencies(record)
        return fresh

    def _note_dependencies(self, record: StoredApp) -> None:
        for dep in record.spec.get("depends_on", []) or []:
            if isinstance(dep, str):
                self._dependents.setdefault(dep, set()).add(record.name)

    def _dependencies(self, spec: AppSpec) -> list[str]:
        return [
            dep
            for dep in spec.depends_on
            if self.statuses.get(dep, AppStatus(dep)).state != RUNNING
        ]

    def _set(
        self,
        app: str,
        record: StoredApp | None,
        state: str,
        container: ContainerInfo | None,
        ports: Mapping[str, Mapping[str, int]] | None,
        *,
        message: str = "",
        running: bool,
        healthy: bool | None = None,
        route: str = "none",
        dependencies: bool = True,
    ) -> None:
        now = self.clock.seconds()
        old = self.statuses.get(app)
        status = old.status if old is not None else ObjectStatus()
        generation = record.generation if record is not None else status.generation
        status = attrs.evolve(status, generation=generation).observed(generation)
        conditions: list[Condition] = [
            Condition(
                "Running",
                "True" if running else "False",
                generation,
                reason="ContainerRunning" if running else _reason(state),
                message=message,
            ),
            Condition(
                "Routed",
                "True" if route != "none" else "False",
                generation,
                reason={"local": "Local", "leader": "ToLeader"}.get(route, "Withdrawn"),
            ),
            Condition("Degraded", "False", generation, reason="AsExpected"),
            Condition(
                "DependenciesReady",
                "True" if dependencies else "False",
                generation,
                reason="Ready" if dependencies else "Waiting",
                message="" if dependencies else message,
            ),
        ]
        if healthy is not None:
            conditions.append(
                Condition(
                    "Healthy",
                    "True" if healthy else "False",
                    generation,
                    reason="ProbeSucceeded" if healthy else "ProbeFailed",
                )
            )
        for condition in conditions:
            status = status.with_condition(condition, now)
        crash = self._crash.get(app)
        new = AppStatus(
            name=app,
            state=state,
            status=status,
            container_id=container.id if container is not None else None,
            image=container.image if container is not None else None,
            ports={k: dict(v) for k, v in (ports or {}).items()}
            if ports is not None
            else (old.ports if old is not None else {}),
            restarts=crash.restarts if crash is not None else 0,
            route=route,
            message=message,
        )
        self._store_status(old, new)

    def _failed(self, app: str, error: BaseException) -> None:
        now = self.clock.seconds()
        old = self.statuses.get(app)
        if old is None:
            record = (self.desired or {}).get(app)
            old = AppStatus(
                name=app,
                status=ObjectStatus(generation=record.generation if record is not None else 0),
            )
        message = f"{type(error).__name__}: {getattr(error, 'detail', None) or error}"
        status = old.status.with_condition(
            Condition(
                "Degraded",
                "True",
                old.status.generation,
                reason=type(error).__name__,
                message=message,
            ),
            now,
        )
        self._store_status(old, attrs.evolve(old, state=ERROR, status=status, message=message))

    def _store_status(self, old: AppStatus | None, new: AppStatus) -> None:
        self.statuses[new.name] = new
        if old is None or old.state != new.state:
            if old is not None:
                self.counts[old.state] -= 1
            self.counts[new.state] += 1
            if new.state == ERROR:
                self.errors.add(new.name)
            else:
                self.errors.discard(new.name)
            self.on_change()
        changed = (
            old is None
            or old.state != new.state
            or old.status.observed_generation != new.status.observed_generation
            or old.message != new.message
        )
        if changed:
            self._publish(new)
        if (old is None or old.state != new.state) and (
            new.state == RUNNING or (old is not None and old.state == RUNNING)
        ):
            for dependent in sorted(self._dependents.get(new.name, ())):
                self.enqueue(dependent)

    def _publish(self, status: AppStatus) -> None:
        if self.bus is None:
            return
        self.bus.publish(
            AppStateChanged(
                app=status.name,
                state=status.state,
                generation=status.status.generation,
                observed_generation=status.status.observed_generation,
                detail=status.message,
            ),
            source="apps",
        )


def _reason(state: str) -> str:
    return {
        LOCKED: "StorageLocked",
        STOPPED: "StoppedByAdmin",
        STANDBY: "Follower",
        WAITING: "Waiting",
        PENDING: "Pending",
    }.get(state, "NotRunning")
