"""
The composition root: ``twistd -n piccolod`` options and ``makeService``.

This is the only module (with ``piccolod.tac``) that names concrete kernel
classes and imports the global reactor, and it does the latter inside
:func:`makeService`, so that ``twistd --reactor=asyncio`` can choose first.

Every option and config problem is found in :meth:`Options.postOptions`,
before the reactor starts, and reported together.
"""

from __future__ import annotations

import functools
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
from twisted.application.service import IService
from twisted.python import usage
from twisted.python.reflect import namedModule

from piccolod import config as configmod
from piccolod.config import Config
from piccolod.errors import ConfigError
from piccolod.interfaces import ChildSpec, ISubsystemPlugin, RestartPolicy
from piccolod.kernel import plugins as pluginsmod
from piccolod.kernel.plugins import Catalogue, SubsystemContext

#: The default listen endpoint: loopback only (deny by default).
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"


@attrs.frozen
class Settings:
    """Everything ``makeService`` needs, validated."""

    config: Config
    catalogue: Catalogue
    chosen: Mapping[str, tuple[ISubsystemPlugin, dict[str, Any]]]
    order: tuple[str, ...]
    needs: Mapping[str, tuple[str, ...]]


def _load_packages(names: Iterable[str], errors: list[str]) -> list[ModuleType]:
    packages: list[ModuleType] = []
    for name in names:
        try:
            packages.append(namedModule(name))
        except ImportError as e:
            errors.append(f"[daemon] plugin_packages: cannot import {name!r}: {e}")
    return packages


def settle(
    config: Config,
    overrides: Mapping[str, str],
    plugins: Iterable[ISubsystemPlugin] | None = None,
) -> Settings:
    """
    Discover plugins, choose one variant per slot and order the slots.
    Raises one ``ConfigError`` with every problem.
    """
    errors: list[str] = []
    if plugins is None:
        extra = _load_packages(config.daemon.plugin_packages, errors)
        import twisted.plugins

        found = pluginsmod.discover([twisted.plugins, *extra])
    else:
        found = list(plugins)
    catalogue = Catalogue.build(found)
    try:
        chosen = pluginsmod.select(catalogue, config.subsystems, overrides)
    except ConfigError as e:
        raise ConfigError([*errors, *e.errors]) from None
    if errors:
        raise ConfigError(errors)
    order, needs = pluginsmod.order_slots(chosen)
    return Settings(
        config=config,
        catalogue=catalogue,
        chosen=chosen,
        order=tuple(order),
        needs={k: tuple(v) for k, v in needs.items()},
    )


class Options(usage.Options):
    """``twistd piccolod`` options."""

    synopsis = "[--config FILE] [--state-dir DIR] [--listen ENDPOINT] [--use SLOT=VARIANT ...]"
    longdesc = (
        "Run the piccolod control-plane daemon.  Without --config it runs on its "
        "embedded defaults: state under ./state, the API on 127.0.0.1:8080, "
        "single-node consensus."
    )
    optParameters = [
        ["config", "c", None, "TOML config file."],
        ["state-dir", "d", None, "Directory for durable state (overrides the config)."],
        [
            "listen",
            "l",
            None,
            "Twisted server endpoint for the API, e.g. tcp:8080:interface=127.0.0.1 "
            "(overrides [subsystems.api] listen).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["use"] = {}
        self.settings: Settings | None = None
        self.log_observer: Any = None

    def opt_use(self, value: str) -> None:
        """Choose a subsystem variant, SLOT=VARIANT (repeatable)."""
        slot, sep, variant = value.partition("=")
        if not sep or not slot or not variant:
            raise usage.UsageError(f"--use takes SLOT=VARIANT, got {value!r}")
        self["use"][slot.strip()] = variant.strip()

    def postOptions(self) -> None:
        try:
            self.settings = self.load()
        except ConfigError as e:
            raise usage.UsageError(
                f"piccolod cannot start, the configuration has {len(e.errors)} problem(s):\n{e}"
            ) from None
        self.log_observer = self._log_observer(self.settings.config)

    def _log_observer(self, config: Config) -> Any:
        """
        The ``[log]`` observer (level filter, text or JSON, correlation ids),
        unless ``twistd --logger`` or ``--logfile`` already chose one.  The
        root service hands it to twistd's application as its
        ``ILogObserver`` component, which twistd starts logging to.
        """
        parent = getattr(self, "parent", None)
        if parent is not None and (
            parent.get("logger") or parent.get("logfile") not in (None, "", "-")
        ):
            return None
        from piccolod.logging import observer_for

        log = config.log
        return observer_for(level=log.level, format=log.format, path=log.file)

    def load(self, plugins: Iterable[ISubsystemPlugin] | None = None) -> Settings:
        errors: list[str] = []
        config = Config()
        if self["config"] is not None:
            try:
                config, errors = configmod.load_partial(self["config"])
            except ConfigError as e:  # unreadable: nothing more to check
                raise ConfigError(e.errors) from None
        config = configmod.with_overrides(config, self["state-dir"], self["listen"])
        settings: Settings | None = None
        try:
            settings = settle(config, self["use"], plugins)
        except ConfigError as e:
            errors.extend(e.errors)
        if errors or settings is None:
            raise ConfigError(errors)
        return settings


def advertised_address(listen: str) -> str:
    """The API base URL a TCP endpoint string implies (``""`` if unknown)."""
    m = re.match(r"^tcp6?:(?:port=)?(\d+)(.*)$", listen)
    if not m:
        return ""
    port = m.group(1)
    iface = re.search(r"interface=([^:]+(?:\\:[^:]*)*)", m.group(2))
    host = iface.group(1).replace("\\:", ":") if iface else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def node_id_for(state_dir: Path, configured: str) -> str:
    """The configured node id, else the one kept in ``<state_dir>/node-id``."""
    if configured:
        return configured
    path = state_dir / "node-id"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    from piccolod.api.service import write_atomically

    new = f"node-{uuid.uuid4().hex[:12]}"
    write_atomically(path, new.encode() + b"\n", mode=0o644)
    return new


def build(reactor: Any, settings: Settings, log_observer: Any = None) -> IService:
    """Build the whole service tree on ``reactor``; returns its root."""
    from piccolod.kernel.bus import MemoryEventBus
    from piccolod.kernel.dispatcher import CommandDispatcher
    from piccolod.kernel.health import HealthTracker
    from piccolod.kernel.jobs import JobRunner
    from piccolod.kernel.leadership import LeadershipRegistry
    from piccolod.kernel.metrics import KernelMetrics
    from piccolod.kernel.observer import LeadershipObserver
    from piccolod.kernel.runtime import Kernel, KernelService
    from piccolod.kernel.sdnotify import SystemdNotifier
    from piccolod.kernel.supervisor import Supervisor
    from piccolod.kernel.telemetry import HealthEscalator, ReactorLagMonitor, TelemetrySampler

    config = settings.config
    state_dir = Path(config.daemon.state_dir).absolute()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    node_id = node_id_for(state_dir, config.daemon.node_id)
    api = settings.chosen.get("api")
    listen = str(api[1].get("listen", DEFAULT_LISTEN)) if api else ""
    address = config.daemon.advertise_address or advertised_address(listen)

    bus = MemoryEventBus(reactor)
    health = HealthTracker(reactor, bus)
    registry = LeadershipRegistry(bus, node_id)
    # Successful commands are counted, timed (/metrics) and audited, not
    # logged one by one: a log event per command costs more than the command.
    dispatcher = CommandDispatcher(reactor, bus, registry=registry, log_successes=False)
    supervisor = Supervisor(
        reactor,
        bus,
        health,
        notifier=SystemdNotifier.from_environ(reactor, os.environ, unset_environment=True),
    )
    jobs = JobRunner(
        reactor,
        bus,
        limits=dict(config.jobs.limits),
        default_limit=config.jobs.default_limit,
        history=config.jobs.history,
    )
    telemetry = config.telemetry
    lag = ReactorLagMonitor(reactor, interval=telemetry.lag_probe)
    metrics = KernelMetrics.build(
        reactor,
        bus=bus,
        dispatcher=dispatcher,
        jobs=jobs,
        supervisor=supervisor,
        health=health,
        lag=lambda: lag.last,
    )
    kernel = Kernel(
        reactor=reactor,
        bus=bus,
        registry=registry,
        dispatcher=dispatcher,
        health=health,
        supervisor=supervisor,
        node_id=node_id,
        api_address=address,
        state_dir=state_dir,
        selected={slot: plugin.variant for slot, (plugin, _) in settings.chosen.items()},
        started_at=reactor.seconds(),
        jobs=jobs,
        metrics=metrics,
    )
    kernel_services = [
        jobs,
        lag,
        TelemetrySampler(
            jobs, bus, health, lag, interval=telemetry.interval, lag_warn=telemetry.lag_warn
        ),
        HealthEscalator(reactor, bus, supervisor, grace=telemetry.error_grace),
    ]
    stop_timeout = config.daemon.stop_timeout
    supervisor.add_child(
        ChildSpec(
            name="leadership-observer",
            factory=functools.partial(LeadershipObserver, bus),
            restart=RestartPolicy.PERMANENT,
            stop_timeout=stop_timeout,
            required=False,
        )
    )
    for slot in settings.order:
        plugin, section = settings.chosen[slot]
        supervisor.add_child(
            ChildSpec(
                name=slot,
                factory=functools.partial(_build_slot, kernel, settings, slot),
                requires=settings.needs[slot],
                restart=RestartPolicy.PERMANENT,
                stop_timeout=stop_timeout,
            )
        )
    return KernelService(kernel, log_observer=log_observer, services=kernel_services)


def _build_slot(kernel: Any, settings: Settings, slot: str) -> IService:
    """Build and verify a fresh instance of ``slot`` (called on every (re)start)."""
    plugin, section = settings.chosen[slot]
    deps: dict[Any, Any] = {}
    for interface in plugin.requires:
        for other in settings.needs[slot]:
            other_plugin, _ = settings.chosen[other]
            if interface in other_plugin.provides:
                deps[interface] = kernel.supervisor.service(other)
    ctx = SubsystemContext(
        slot=slot, variant=plugin.variant, kernel=kernel, config=dict(section), deps=deps
    )
    service = plugin.build(ctx)
    pluginsmod.verify(plugin, service)
    service.setName(slot)
    return service


def makeService(options: Options) -> IService:
    """Build the tree for ``twistd``; the only place that imports the global reactor."""
    from twisted.internet import reactor

    settings = options.settings
    if settings is None:
        settings = options.load()
    reactor.callWhenRunning(exit_zero_on_sigterm, reactor)
    return build(reactor, settings, options.log_observer)


def exit_zero_on_sigterm(reactor: Any) -> None:
    """
    Make SIGTERM and SIGINT a clean shutdown that exits 0.

    twistd's own handlers remember the signal and re-raise it on the process
    after the reactor stops, so the exit status would say "killed by
    SIGTERM".  A requested stop is a success: the tree is stopped in reverse
    order (the before-shutdown trigger), then the process exits 0.  A second
    signal during the stop is ignored rather than raising.
    """
    import signal

    def handler(signum: int, frame: object) -> None:
        if reactor.running:
            reactor.callFromThread(_stop_once, reactor)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _stop_once(reactor: Any) -> None:
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass
