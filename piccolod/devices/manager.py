"""
The device manager: the machine's disks, rescanned periodically, with a
``device`` event for every disk that appears, disappears or changes.

- **Scanning** runs every ``interval`` seconds on a ``LoopingCall`` driven
  by the injected clock (the kernel hands subsystems no job runner yet; the
  scan is a few reads of sysfs, cheaper than a job's bookkeeping).  It is
  supervised in the small: a scan that fails is reported to health
  (``error``), logged, and retried at the next tick; the loop never dies,
  and a scan never overlaps the previous one.
- **Events**: :class:`~piccolod.events.DeviceEvent` with ``action``
  ``added``, ``removed`` or ``changed`` (``detail`` lists what changed,
  e.g. ``size 500107862016 -> 1000204886016; health ok -> error``).  A
  disk whose serial (or WWID) changed under the same name is another
  physical disk: ``removed`` then ``added``.  The first scan reports every
  disk as ``added``.
- **Health** (component ``devices``, not required for readiness): ``ok``
  with the disk count; ``warn`` naming disks whose health is not ``ok``
  (a device state other than running, I/O errors); ``error`` while scans
  fail.
- **Queries**: :meth:`DeviceManager.disks` (for ``GET
  /api/v1/storage/disks``) and the ``devices.list`` command.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.commands import CommandContext, DeviceList, ListDevices
from piccolod.devices.sysfs import DEFAULT_IGNORE, Disk, scan_sysfs
from piccolod.errors import ConfigError, PiccolodError, Unavailable
from piccolod.events import DeviceEvent, HealthLevel
from piccolod.interfaces import ICommandDispatcher, IDeviceManager, IEventBus, IHealth
from piccolod.kernel.aio import call, provides
from piccolod.kernel.plugins import SubsystemContext

__all__ = ["DeviceManager", "describe_change"]

#: Fields compared between scans (``changed`` events), in detail order.
_COMPARED = (
    "size_bytes",
    "health",
    "state",
    "io_errors",
    "read_only",
    "removable",
    "rotational",
    "model",
    "vendor",
    "partitions",
)


def _value(disk: Disk, field: str) -> Any:
    if field == "partitions":
        return ",".join(f"{p.name}:{p.size_bytes}" for p in disk.partitions) or "-"
    return getattr(disk, field)


def describe_change(old: Disk, new: Disk) -> str:
    """``"field old -> new; ..."`` for each compared field that differs (``""``: none)."""
    parts = []
    for field in _COMPARED:
        before, after = _value(old, field), _value(new, field)
        if before != after:
            parts.append(f"{field} {before} -> {after}")
    return "; ".join(parts)


def _describe_disk(disk: Disk) -> str:
    bits = [f"{disk.size_bytes} bytes"]
    for label, value in (("model", disk.model), ("serial", disk.serial)):
        if value:
            bits.append(f"{label} {value}")
    if disk.removable:
        bits.append("removable")
    if disk.health != "ok":
        bits.append(f"health {disk.health}")
    return ", ".join(bits)


def _interval(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError([f"devices: interval must be a positive number, not {value!r}"])
    return float(value)


@implementer(IDeviceManager)
@attrs.define(eq=False)
class DeviceManager(Service):
    """
    ``IDeviceManager`` + ``IService`` (see the module docstring).

    @ivar reactor: the clock the periodic scan runs on.
    @ivar scanner: returns the current disks (plain or Deferred/coroutine);
        raises ``Unavailable`` when they cannot be read.
    @ivar interval: seconds between scans.
    """

    log: ClassVar[Logger] = Logger()

    reactor: IReactorTime = attrs.field(validator=provides(IReactorTime))
    scanner: Callable[[], Any]
    bus: IEventBus | None = attrs.field(default=None, kw_only=True)
    health: IHealth | None = attrs.field(default=None, kw_only=True)
    dispatcher: ICommandDispatcher | None = attrs.field(default=None, kw_only=True)
    interval: float = attrs.field(default=30.0, kw_only=True, converter=_interval)
    component: str = attrs.field(default="devices", kw_only=True)
    source: str = attrs.field(default="devices", kw_only=True)
    _disks: dict[str, Disk] = attrs.field(init=False, factory=dict)
    _scanned_at: float | None = attrs.field(init=False, default=None)
    _loop: LoopingCall | None = attrs.field(init=False, default=None)
    _loop_done: Deferred[Any] | None = attrs.field(init=False, default=None)
    _inflight: Deferred[list[Disk]] | None = attrs.field(init=False, default=None)
    _waiters: list[Deferred[Sequence[Mapping[str, Any]]]] = attrs.field(init=False, factory=list)
    _scans: int = attrs.field(init=False, default=0)
    _failures: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)

    @classmethod
    def from_context(cls, ctx: SubsystemContext) -> DeviceManager:
        """
        Build for the ``devices`` slot from ``sysfs_root``, ``interval``
        and ``ignore`` (fnmatch patterns of device names to skip).
        """
        config = ctx.config
        errors = []
        root = config.get("sysfs_root", "/sys")
        if not isinstance(root, str) or not root:
            errors.append(f"[subsystems.{ctx.slot}] sysfs_root must be a non-empty path")
        ignore = config.get("ignore", list(DEFAULT_IGNORE))
        if not isinstance(ignore, (list, tuple)) or not all(
            isinstance(p, str) and p for p in ignore
        ):
            errors.append(f"[subsystems.{ctx.slot}] ignore must be a list of name patterns")
        try:
            interval = _interval(config.get("interval", 30.0))
        except ConfigError as e:
            errors.extend(
                f"[subsystems.{ctx.slot}] {m.removeprefix('devices: ')}" for m in e.errors
            )
            interval = 30.0
        if errors:
            raise ConfigError(errors)
        patterns = tuple(ignore)
        kernel = ctx.kernel
        return cls(
            kernel.reactor,
            lambda: scan_sysfs(root, patterns),
            bus=kernel.bus,
            health=kernel.health,
            dispatcher=kernel.dispatcher,
            interval=interval,
        )

    # -- IService -------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        if self.dispatcher is not None:
            self.dispatcher.register(ListDevices, self._handle_list)
        self.running = True
        if self.health is not None:
            self.health.require(self.component, False)
        loop = LoopingCall(self._tick)
        loop.clock = self.reactor
        self._loop = loop
        self._loop_done = loop.start(self.interval, now=True)
        self._loop_done.addErrback(lambda f: self.log.failure("the device scan loop stopped", f))

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        self.running = False
        if self.dispatcher is not None:
            self.dispatcher.unregister(ListDevices)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self.health is not None:
            self.health.remove(self.component)
        return succeed(None)

    # -- IDeviceManager -------------------------------------------------------

    def disks(self) -> list[dict[str, Any]]:
        """The disks of the last successful scan, as JSON-ready dicts, by name."""
        return [self._disks[name].to_json() for name in sorted(self._disks)]

    @property
    def scanned_at(self) -> float | None:
        """Clock time of the last successful scan."""
        return self._scanned_at

    def scan(self) -> Deferred[Sequence[Mapping[str, Any]]]:
        """
        Rescan now (joining a scan already running), publish the changes and
        fire with :meth:`disks`.  Fails with ``Unavailable`` when the
        devices cannot be read; the previous list is kept then.
        """
        waiter: Deferred[Sequence[Mapping[str, Any]]] = Deferred()
        self._waiters.append(waiter)
        if self._inflight is None:
            self._inflight = call(self.scanner)
            self._inflight.addBoth(self._scanned)
        return waiter

    def stats(self) -> dict[str, Any]:
        return {
            "disks": len(self._disks),
            "scans": self._scans,
            "failures": self._failures,
            "scanned_at": self._scanned_at,
        }

    # -- internals ------------------------------------------------------------

    def _tick(self) -> Deferred[None]:
        d = self.scan()

        def failed(failure: Failure) -> None:
            # Reported by _scanned already; the loop must go on.
            return None

        return d.addCallbacks(lambda _: None, failed)

    def _scanned(self, result: list[Disk] | Failure) -> None:
        self._inflight = None
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            self._failures += 1
            error = result.value
            if not isinstance(error, PiccolodError):
                error = Unavailable(f"device scan failed: {type(error).__name__}: {error}")
            self.log.warn("device scan failed: {error}", error=str(error))
            self._report(HealthLevel.ERROR, f"scan failed: {error}")
            for waiter in waiters:
                waiter.errback(error)
            return
        self._scans += 1
        try:
            self._apply(result)
        except Exception as e:  # a malformed scanner result
            self._failures += 1
            self.log.failure("device scan produced a bad result")
            self._report(HealthLevel.ERROR, f"scan failed: {e}")
            for waiter in waiters:
                waiter.errback(Unavailable(f"device scan produced a bad result: {e}"))
            return
        disks = self.disks()
        for waiter in waiters:
            waiter.callback(disks)

    def _apply(self, found: Sequence[Disk]) -> None:
        new = {}
        for disk in found:
            if not isinstance(disk, Disk):
                raise TypeError(f"scanner returned {disk!r}, not a Disk")
            new[disk.name] = disk
        old = self._disks
        events: list[DeviceEvent] = []
        for name in sorted(old.keys() - new.keys()):
            events.append(
                DeviceEvent(device=name, action="removed", detail=_describe_disk(old[name]))
            )
        for name in sorted(new):
            disk = new[name]
            before = old.get(name)
            if before is None:
                events.append(DeviceEvent(device=name, action="added", detail=_describe_disk(disk)))
            elif before.identity and disk.identity and before.identity != disk.identity:
                events.append(
                    DeviceEvent(
                        device=name,
                        action="removed",
                        detail=f"replaced: {_describe_disk(before)}",
                    )
                )
                events.append(DeviceEvent(device=name, action="added", detail=_describe_disk(disk)))
            else:
                change = describe_change(before, disk)
                if change:
                    events.append(DeviceEvent(device=name, action="changed", detail=change))
        self._disks = new
        self._scanned_at = self.reactor.seconds()
        for event in events:
            self.log.info(
                "disk {device} {action}: {detail}",
                device=event.device,
                action=event.action,
                detail=event.detail,
            )
            if self.bus is not None:
                self.bus.publish(event, source=self.source)
        unhealthy = [d for d in new.values() if d.health != "ok"]
        if unhealthy:
            self._report(
                HealthLevel.WARN,
                "; ".join(
                    f"{d.name}: {d.health} (state {d.state}, io errors {d.io_errors})"
                    for d in sorted(unhealthy, key=lambda d: d.name)
                ),
            )
        else:
            self._report(HealthLevel.OK, f"{len(new)} disk(s)")

    def _report(self, level: HealthLevel, message: str) -> None:
        if self.health is None or not self.running:
            return
        self.health.report(
            self.component,
            level,
            message,
            figures={"disks": len(self._disks), "scan_failures": self._failures},
        )

    def _handle_list(self, command: ListDevices, context: CommandContext) -> DeviceList:
        return DeviceList(disks=tuple(self.disks()), scanned_at=self._scanned_at)
