"""
The ``apps`` subsystem service: the app commands, the controller and the
lock and leadership policy.

:class:`AppsService` registers the ``apps.*`` command handlers (every
write goes to the control store through the ``store.apps.*`` commands and
then enqueues the app), runs the app controller
(:class:`~piccolod.apps.controller.AppReconciler` on the kernel's
``Controller``), and feeds it:

- ``persistence.lock_state`` (retained): ``unlocked`` → desired state is
  re-read and every app converges; anything else → every app is stopped
  and its routes withdrawn;
- ``cluster.leadership`` for ``app:<name>`` (retained): the app is
  reconciled (a follower stops a stateful app and routes to the leader);
- ``services.route`` withdrawals: exposure is re-established if the
  services subsystem dropped it (e.g. after its restart);
- the runtime's container events (a container that died is restarted).

Stopping the service leaves containers running: after a restart of the
daemon they are adopted, not recreated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from piccolod.apps.controller import (
    APP_LABEL,
    INSTANCE_LABEL,
    RUNNING,
    AppReconciler,
    AppStatus,
    Prober,
)
from piccolod.apps.spec import app_volume_id, parse_spec, spec_from_json
from piccolod.apps.store import CONTEXT
from piccolod.commands import (
    AppDetail,
    AppList,
    AppLogLines,
    AppLogs,
    AppRemoved,
    AppValidated,
    Command,
    CommandContext,
    DeleteVolume,
    DetachVolume,
    GetApp,
    InstallApp,
    ListApps,
    ReleasePorts,
    ReleaseResource,
    RemoveApp,
    RevertApp,
    StartApp,
    StopApp,
    StoredApp,
    UpdateApp,
    ValidateApp,
)
from piccolod.errors import ConfigError, Conflict, InvalidCommand, NotFound
from piccolod.events import (
    Envelope,
    HealthLevel,
    LeadershipRoleChanged,
    LockState,
    LockStateChanged,
    RoutePublished,
)
from piccolod.interfaces import (
    Backoff,
    ContainerEvent,
    ICommandDispatcher,
    IContainerRuntime,
    IEventBus,
    IHealth,
    ILeadershipRegistry,
    ISubscription,
)
from piccolod.kernel.aio import provides
from piccolod.kernel.controllers import Controller
from piccolod.kernel.dispatcher import Registration, register_all

__all__ = ["CONFIG_KEYS", "PREVIOUS", "AppsService"]

#: ``[subsystems.apps]`` keys and defaults.
CONFIG_KEYS: dict[str, Any] = {
    "instance": "",
    "name_prefix": "piccolod-",
    "stop_timeout": 10.0,
    "resync_interval": 300.0,
    "concurrency": 4,
    "restart_backoff_initial": 0.5,
    "restart_backoff_max": 60.0,
    "stable_after": 60.0,
}
#: Settings prefix of the spec before the last update (for ``apps.revert``).
PREVIOUS = "apps.previous."
HEALTH = "apps"


def _number(config: Mapping[str, Any], key: str, errors: list[str], minimum: float) -> float:
    value = config.get(key, CONFIG_KEYS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        errors.append(f"[subsystems.apps] {key} must be a number >= {minimum}")
        return float(CONFIG_KEYS[key])
    return float(value)


@attrs.define(eq=False)
class AppsService(Service):
    """The apps subsystem (see the module docstring)."""

    log = Logger()

    clock: Any
    bus: IEventBus
    dispatcher: ICommandDispatcher
    registry: ILeadershipRegistry
    runtime: IContainerRuntime = attrs.field(validator=provides(IContainerRuntime))
    health: IHealth | None = None
    instance: str = "default"
    name_prefix: str = "piccolod-"
    stop_timeout: float = 10.0
    resync_interval: float | None = 300.0
    concurrency: int = 4
    restart_backoff: Backoff = attrs.field(
        factory=lambda: Backoff(initial=0.5, maximum=60.0, factor=2.0, jitter=0.1)
    )
    stable_after: float = 60.0
    prober: Prober | None = None
    reconciler: AppReconciler = attrs.field(init=False)
    controller: Controller = attrs.field(init=False)
    _subscriptions: list[ISubscription] = attrs.field(init=False, factory=list)
    _unwatch: Any = attrs.field(init=False, default=None)
    _registration: Registration | None = attrs.field(init=False, default=None)
    _report_call: Any = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.reconciler = AppReconciler(
            clock=self.clock,
            runtime=self.runtime,
            dispatcher=self.dispatcher,
            registry=self.registry,
            bus=self.bus,
            instance=self.instance,
            name_prefix=self.name_prefix,
            stop_timeout=self.stop_timeout,
            crash_backoff=self.restart_backoff,
            stable_after=self.stable_after,
            prober=self.prober,
        )
        self.controller = Controller(
            "apps",
            self.reconciler,
            self.clock,
            concurrency=self.concurrency,
            resync_interval=self.resync_interval,
            bus=self.bus,
            backoff=Backoff(initial=0.5, maximum=300.0, factor=2.0, jitter=0.1),
        )
        self.reconciler.enqueue = self.controller.enqueue
        self.reconciler.on_change = self._report_soon

    @classmethod
    def from_context(cls, ctx: Any) -> AppsService:
        from piccolod.interfaces import IContainerRuntime as Runtime

        config: Mapping[str, Any] = ctx.config
        errors: list[str] = []
        instance = config.get("instance", "") or ctx.kernel.node_id
        prefix = config.get("name_prefix", CONFIG_KEYS["name_prefix"])
        if not isinstance(instance, str) or not instance:
            errors.append("[subsystems.apps] instance must be a non-empty string")
        if not isinstance(prefix, str):
            errors.append("[subsystems.apps] name_prefix must be a string")
        stop_timeout = _number(config, "stop_timeout", errors, 0.0)
        resync = _number(config, "resync_interval", errors, 1.0)
        concurrency = config.get("concurrency", 4)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            errors.append("[subsystems.apps] concurrency must be an integer >= 1")
            concurrency = 4
        initial = _number(config, "restart_backoff_initial", errors, 0.01)
        maximum = _number(config, "restart_backoff_max", errors, 0.01)
        stable = _number(config, "stable_after", errors, 0.0)
        if errors:
            raise ConfigError(errors)
        kernel = ctx.kernel
        return cls(
            clock=kernel.reactor,
            bus=kernel.bus,
            dispatcher=kernel.dispatcher,
            registry=kernel.registry,
            runtime=ctx.dep(Runtime),
            health=kernel.health,
            instance=str(instance),
            name_prefix=str(prefix),
            stop_timeout=stop_timeout,
            resync_interval=resync,
            concurrency=int(concurrency),
            restart_backoff=Backoff(initial=initial, maximum=max(initial, maximum)),
            stable_after=stable,
            prober=http_prober(kernel.reactor),
        )

    # -- IService ------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        handlers: list[tuple[type[Command], Any]] = [
            (InstallApp, self._handle_install),
            (ValidateApp, self._handle_validate),
            (ListApps, self._handle_list),
            (GetApp, self._handle_get),
            (StartApp, self._handle_start),
            (StopApp, self._handle_stop),
            (UpdateApp, self._handle_update),
            (RevertApp, self._handle_revert),
            (RemoveApp, self._handle_remove),
            (AppLogs, self._handle_logs),
        ]
        self._registration = register_all(self.dispatcher, handlers)
        super().startService()  # type: ignore[no-untyped-call]
        self._unwatch = self.runtime.watch(self._on_container)
        self._subscriptions = [
            self.bus.subscribe(
                LockStateChanged.topic, self._on_lock, replay_retained=True, name="apps.lock"
            ),
            self.bus.subscribe(
                LeadershipRoleChanged.topic,
                self._on_leadership,
                filter=lambda env: str(getattr(env.event, "resource", "")).startswith("app:"),
                replay_retained=True,
                name="apps.leadership",
            ),
            self.bus.subscribe(
                RoutePublished.topic,
                self._on_route,
                filter=lambda env: bool(getattr(env.event, "withdrawn", False)),
                name="apps.routes",
            ),
        ]
        self.controller.startService()
        self._report()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._unregister()
        for subscription in self._subscriptions:
            subscription.cancel()
        self._subscriptions = []
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._report_call is not None and self._report_call.active():
            self._report_call.cancel()
        self._report_call = None
        stopped: Deferred[None] = self.controller.stopService()
        return stopped

    def _unregister(self) -> None:
        if self._registration is not None:
            self._registration.cancel()
            self._registration = None

    # -- queries ----------------------------------------------------------------

    def status(self, app: str) -> AppStatus | None:
        return self.reconciler.statuses.get(app)

    def when_idle(self) -> Deferred[None]:
        return self.controller.when_idle()

    # -- events --------------------------------------------------------------------

    def _on_lock(self, envelope: Envelope[Any]) -> Deferred[None] | None:
        event = envelope.event
        if not isinstance(event, LockStateChanged):
            return None
        unlocked = event.state is LockState.UNLOCKED
        if unlocked == self.reconciler.unlocked:
            return None
        self.log.info(
            "apps: storage {state}: {action}",
            state=event.state.value,
            action="restoring apps" if unlocked else "stopping every app",
        )
        self.reconciler.set_unlocked(unlocked)
        for app in list(self.reconciler.statuses):
            self.controller.enqueue(app)
        self._report()
        if not self.running:
            return None
        return self.controller.resync().addErrback(self._resync_failed)

    def _resync_failed(self, failure: Any) -> None:
        self.log.warn("apps: resync failed: {error}", error=failure.getErrorMessage())

    def _on_leadership(self, envelope: Envelope[Any]) -> None:
        event = envelope.event
        if isinstance(event, LeadershipRoleChanged) and event.resource.startswith("app:"):
            name = event.resource[len("app:") :]
            if name:
                self.controller.enqueue(name)

    def _on_route(self, envelope: Envelope[Any]) -> None:
        event = envelope.event
        if isinstance(event, RoutePublished) and event.withdrawn:
            self.reconciler.route_withdrawn(event.app)

    def _on_container(self, event: ContainerEvent) -> None:
        self.reconciler.container_event(event)
        if event.action == "die":
            self._report()

    def _report_soon(self) -> None:
        # At most one health report per reactor turn, however many apps changed.
        if self._report_call is None or not self._report_call.active():
            self._report_call = self.clock.callLater(0, self._report)

    def _report(self) -> None:
        self._report_call = None
        if self.health is None:
            return
        total = len(self.reconciler.statuses)
        errors = sorted(self.reconciler.errors)
        running = self.reconciler.counts[RUNNING]
        figures = {"apps": float(total), "running": float(running)}
        if errors:
            self.health.report(
                HEALTH, HealthLevel.WARN, f"apps in error: {', '.join(errors[:10])}", figures
            )
        elif not self.reconciler.unlocked:
            self.health.report(HEALTH, HealthLevel.OK, "locked: every app is stopped", figures)
        else:
            self.health.report(
                HEALTH,
                HealthLevel.OK,
                f"{running} of {total} apps running ({self.runtime.kind})",
                figures,
            )

    # -- command handlers ----------------------------------------------------------

    def _detail(self, record: StoredApp) -> AppDetail:
        status = self.reconciler.statuses.get(record.name)
        return AppDetail(
            app={
                "name": record.name,
                "spec": record.spec,
                "enabled": record.enabled,
                "generation": record.generation,
                "updated_at": record.updated_at,
                "status": status.to_json() if status is not None else None,
            }
        )

    async def _write(self, name: str, spec: Mapping[str, Any], enabled: bool) -> StoredApp:
        stored = await self.reconciler.store.put(name, spec, enabled)
        self.reconciler.remember(stored)
        self.controller.enqueue(name)
        return stored

    async def _current(self, name: str) -> StoredApp:
        return await self.reconciler.store.get(name)

    async def _keep_previous(self, current: StoredApp, new_spec: Mapping[str, Any]) -> None:
        if dict(current.spec) != dict(new_spec):
            await self.reconciler.store.set_setting(PREVIOUS + current.name, dict(current.spec))

    async def _handle_install(self, command: InstallApp, context: CommandContext) -> AppDetail:
        spec = parse_spec(command.spec)
        try:
            current: StoredApp | None = await self._current(spec.name)
        except NotFound:
            current = None
        if current is not None:
            await self._keep_previous(current, spec.document)
        stored = await self._write(
            spec.name, spec.document, current.enabled if current is not None else True
        )
        self.log.info(
            "apps: {app} {what} (generation {generation})",
            app=spec.name,
            what="installed" if current is None else "updated",
            generation=stored.generation,
        )
        return self._detail(stored)

    def _handle_validate(self, command: ValidateApp, context: CommandContext) -> AppValidated:
        spec = parse_spec(command.spec)
        return AppValidated(app=spec.name, spec=dict(spec.document))

    async def _handle_list(self, command: ListApps, context: CommandContext) -> AppList:
        records = await self.reconciler.store.list()
        return AppList(apps=tuple(self._detail(r).app for r in records))

    async def _handle_get(self, command: GetApp, context: CommandContext) -> AppDetail:
        return self._detail(await self._current(command.app))

    async def _handle_start(self, command: StartApp, context: CommandContext) -> AppDetail:
        current = await self._current(command.app)
        return self._detail(await self._write(command.app, current.spec, True))

    async def _handle_stop(self, command: StopApp, context: CommandContext) -> AppDetail:
        current = await self._current(command.app)
        return self._detail(await self._write(command.app, current.spec, False))

    async def _handle_update(self, command: UpdateApp, context: CommandContext) -> AppDetail:
        current = await self._current(command.app)
        if command.spec is not None:
            spec = parse_spec(command.spec)
            if spec.name != command.app:
                raise InvalidCommand(
                    "invalid app spec",
                    errors=[f"name: the spec is for {spec.name!r}, not {command.app!r}"],
                )
            document: Mapping[str, Any] = spec.document
        else:
            changed = dict(current.spec)
            changed.pop("build", None)
            changed["image"] = command.image
            document = spec_from_json(changed).document
        await self._keep_previous(current, document)
        return self._detail(await self._write(command.app, document, current.enabled))

    async def _handle_revert(self, command: RevertApp, context: CommandContext) -> AppDetail:
        current = await self._current(command.app)
        try:
            previous = await self.reconciler.store.setting(PREVIOUS + command.app)
        except NotFound:
            raise Conflict(f"{command.app} has no previous spec to revert to") from None
        document = spec_from_json(previous).document
        await self.reconciler.store.set_setting(PREVIOUS + command.app, dict(current.spec))
        return self._detail(await self._write(command.app, document, current.enabled))

    async def _handle_remove(self, command: RemoveApp, context: CommandContext) -> AppRemoved:
        current = await self._current(command.app)
        await self.reconciler.store.delete(command.app)
        self.reconciler.forget(command.app)
        containers = await self.runtime.list_containers(
            {APP_LABEL: command.app, INSTANCE_LABEL: self.instance}
        )
        for container in containers:
            await self.runtime.remove(container.id)
        spec = spec_from_json(current.spec)
        for volume in spec.persistent:
            volume_id = app_volume_id(command.app, volume.name)
            if command.purge:
                await self.dispatcher.dispatch(DeleteVolume(volume_id=volume_id), CONTEXT)
            else:
                await self.dispatcher.dispatch(DetachVolume(volume_id=volume_id), CONTEXT)
        if command.purge:
            await self.dispatcher.dispatch(ReleasePorts(app=command.app), CONTEXT)
            await self.reconciler.store.delete_setting(PREVIOUS + command.app)
        if spec.stateful:
            try:
                await self.dispatcher.dispatch(
                    ReleaseResource(resource_name=spec.resource), CONTEXT
                )
            except Exception as e:
                self.log.warn(
                    "apps: releasing {resource} failed: {error}",
                    resource=spec.resource,
                    error=str(e),
                )
        self.controller.enqueue(command.app)
        self.log.info(
            "apps: {app} removed (purge: {purged})",
            app=command.app,
            purged=command.purge,
        )
        return AppRemoved(app=command.app, purged=command.purge)

    async def _handle_logs(self, command: AppLogs, context: CommandContext) -> AppLogLines:
        await self._current(command.app)
        containers = await self.runtime.list_containers(
            {APP_LABEL: command.app, INSTANCE_LABEL: self.instance}
        )
        if not containers:
            raise NotFound(f"{command.app} has no container (yet)")
        logs = await self.runtime.logs(containers[0].id, command.tail)
        return AppLogLines(app=command.app, logs=logs)


def http_prober(reactor: Any) -> Prober:
    """A healthcheck probe over HTTP with treq (2xx and 3xx are healthy)."""

    def probe(host: str, port: int, path: str, timeout: float) -> Deferred[bool]:
        import treq
        from twisted.web.client import Agent

        client = treq.client.HTTPClient(Agent(reactor, connectTimeout=timeout))

        async def go() -> bool:
            response = await client.get(f"http://{host}:{port}{path}", timeout=timeout)
            await treq.content(response)
            return 200 <= int(response.code) < 400

        return Deferred.fromCoroutine(go())

    return probe
