"""
Where desired state comes from: the control store, through commands.

The apps and services subsystems never import persistence; they dispatch
the ``store.apps.*`` and ``store.settings.*`` commands (and the volume
commands) that the persistence subsystem answers from its repositories.

- :class:`StoreClient` is what the apps subsystem uses: typed calls that
  dispatch those commands.
- :class:`MemoryStore` answers the same commands from memory, with the
  repository's semantics (a generation bumped only by a real change,
  ``NotFound`` for a missing app or setting, deletes that are idempotent,
  answers the caller may change, ``Locked`` while its ``locked`` flag is
  set), and can stand in for the volume commands with plain directories.
  It passes the same contract suite as the real store
  (``tests/contracts/store_commands.py``).  Tests and benchmarks use it;
  it is never wired into the daemon.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from piccolod.commands import (
    AttachVolume,
    Command,
    CommandContext,
    DeleteVolume,
    DetachVolume,
    EnsureVolume,
    Result,
    StoredApp,
    StoredApps,
    StoreDeleteApp,
    StoreDeleteSetting,
    StoreDone,
    StoredSetting,
    StoredSettings,
    StoreGetApp,
    StoreGetSetting,
    StoreListApps,
    StoreListSettings,
    StorePutApp,
    StoreSetSetting,
    VolumeResult,
)
from piccolod.errors import InvalidCommand, Locked, NotFound
from piccolod.interfaces import ICommandDispatcher

__all__ = ["CONTEXT", "MemoryStore", "StoreClient", "dispatch"]

CONTEXT = CommandContext(subject="system:apps", source="internal")
R = TypeVar("R", bound=Result)


async def dispatch(dispatcher: ICommandDispatcher, command: Command, kind: type[R]) -> R:
    """Dispatch ``command`` (as the apps subsystem) and check the result's type."""
    result = await dispatcher.dispatch(command, CONTEXT)
    if not isinstance(result, kind):
        raise TypeError(f"{command.name} answered {type(result).__name__}, not {kind.__name__}")
    return result


@attrs.define(eq=False)
class StoreClient:
    """The apps subsystem's view of the control store (commands only)."""

    dispatcher: ICommandDispatcher

    async def get(self, name: str) -> StoredApp:
        return await dispatch(self.dispatcher, StoreGetApp(app=name), StoredApp)

    async def list(self) -> tuple[StoredApp, ...]:
        return (await dispatch(self.dispatcher, StoreListApps(), StoredApps)).apps

    async def put(self, name: str, spec: Mapping[str, Any], enabled: bool) -> StoredApp:
        command = StorePutApp(app=name, spec=dict(spec), enabled=enabled)
        return await dispatch(self.dispatcher, command, StoredApp)

    async def delete(self, name: str) -> None:
        await self.dispatcher.dispatch(StoreDeleteApp(app=name), CONTEXT)

    async def setting(self, key: str) -> Any:
        return (await dispatch(self.dispatcher, StoreGetSetting(key=key), StoredSetting)).value

    async def set_setting(self, key: str, value: Any) -> None:
        await self.dispatcher.dispatch(StoreSetSetting(key=key, value=value), CONTEXT)

    async def delete_setting(self, key: str) -> None:
        await self.dispatcher.dispatch(StoreDeleteSetting(key=key), CONTEXT)


@attrs.define(eq=False)
class MemoryStore:
    """
    In-memory answers to the store (and optionally volume) commands; see
    the module docstring.  ``volumes_root``: answer the volume commands
    with directories below it.
    """

    dispatcher: ICommandDispatcher
    volumes_root: Path | None = None
    locked: bool = False
    now: float = 0.0
    apps: dict[str, StoredApp] = attrs.field(factory=dict)
    settings: dict[str, Any] = attrs.field(factory=dict)
    volumes: dict[str, str] = attrs.field(factory=dict)  # id -> "attached" | "detached"
    writes: int = 0
    _registered: list[type[Command]] = attrs.field(init=False, factory=list)

    def register(self) -> MemoryStore:
        handlers: list[tuple[type[Command], Any]] = [
            (StoreGetApp, self._get),
            (StoreListApps, self._list),
            (StorePutApp, self._put),
            (StoreDeleteApp, self._delete),
            (StoreGetSetting, self._get_setting),
            (StoreSetSetting, self._set_setting),
            (StoreDeleteSetting, self._delete_setting),
            (StoreListSettings, self._list_settings),
        ]
        if self.volumes_root is not None:
            handlers += [
                (EnsureVolume, self._ensure),
                (AttachVolume, self._attach),
                (DetachVolume, self._detach),
                (DeleteVolume, self._delete_volume),
            ]
        for command_type, handler in handlers:
            self.dispatcher.register(command_type, handler)
            self._registered.append(command_type)
        return self

    def unregister(self) -> None:
        while self._registered:
            self.dispatcher.unregister(self._registered.pop())

    def _check(self) -> None:
        if self.locked:
            raise Locked("the control store is locked")

    # -- apps

    def _get(self, command: StoreGetApp, context: CommandContext) -> StoredApp:
        self._check()
        try:
            return _copy(self.apps[command.app])
        except KeyError:
            raise NotFound(f"no app named {command.app!r}") from None

    def _list(self, command: StoreListApps, context: CommandContext) -> StoredApps:
        self._check()
        return StoredApps(apps=tuple(_copy(self.apps[name]) for name in sorted(self.apps)))

    def _put(self, command: StorePutApp, context: CommandContext) -> StoredApp:
        self._check()
        text = json.dumps(command.spec, sort_keys=True)
        current = self.apps.get(command.app)
        if (
            current is not None
            and json.dumps(current.spec, sort_keys=True) == text
            and current.enabled == command.enabled
        ):
            return _copy(current)
        self.writes += 1
        stored = StoredApp(
            name=command.app,
            spec=json.loads(text),
            enabled=command.enabled,
            generation=1 if current is None else current.generation + 1,
            updated_at=self.now,
        )
        self.apps[command.app] = stored
        return _copy(stored)

    def _delete(self, command: StoreDeleteApp, context: CommandContext) -> StoreDone:
        self._check()
        if self.apps.pop(command.app, None) is not None:
            self.writes += 1
        return StoreDone()

    # -- settings

    def _get_setting(self, command: StoreGetSetting, context: CommandContext) -> StoredSetting:
        self._check()
        if command.key not in self.settings:
            raise NotFound(f"no setting {command.key!r}")
        return StoredSetting(
            key=command.key, value=json.loads(json.dumps(self.settings[command.key]))
        )

    def _set_setting(self, command: StoreSetSetting, context: CommandContext) -> StoreDone:
        self._check()
        try:
            self.settings[command.key] = json.loads(json.dumps(command.value))
        except (TypeError, ValueError) as e:
            raise InvalidCommand(f"setting {command.key!r} is not JSON: {e}") from None
        self.writes += 1
        return StoreDone()

    def _delete_setting(self, command: StoreDeleteSetting, context: CommandContext) -> StoreDone:
        self._check()
        if self.settings.pop(command.key, None) is not None:
            self.writes += 1
        return StoreDone()

    def _list_settings(self, command: StoreListSettings, context: CommandContext) -> StoredSettings:
        self._check()
        return StoredSettings(
            items={
                k: json.loads(json.dumps(v))
                for k, v in sorted(self.settings.items())
                if k.startswith(command.prefix)
            }
        )

    # -- volumes (directories)

    def _path(self, volume_id: str) -> Path:
        assert self.volumes_root is not None
        return self.volumes_root / volume_id

    def _ensure(self, command: EnsureVolume, context: CommandContext) -> VolumeResult:
        path = self._path(command.volume_id)
        path.mkdir(parents=True, exist_ok=True)
        self.volumes.setdefault(command.volume_id, "detached")
        return VolumeResult(volume_id=command.volume_id, state=self.volumes[command.volume_id])

    def _attach(self, command: AttachVolume, context: CommandContext) -> VolumeResult:
        self._check()
        path = self._path(command.volume_id)
        if command.volume_id not in self.volumes:
            raise NotFound(f"no volume {command.volume_id!r}")
        self.volumes[command.volume_id] = "attached-ro" if command.read_only else "attached-rw"
        return VolumeResult(
            volume_id=command.volume_id, state=self.volumes[command.volume_id], path=str(path)
        )

    def _detach(self, command: DetachVolume, context: CommandContext) -> VolumeResult:
        if command.volume_id in self.volumes:
            self.volumes[command.volume_id] = "detached"
        return VolumeResult(volume_id=command.volume_id, state="detached")

    def _delete_volume(self, command: DeleteVolume, context: CommandContext) -> VolumeResult:
        self._check()
        self.volumes.pop(command.volume_id, None)
        shutil.rmtree(self._path(command.volume_id), ignore_errors=True)
        return VolumeResult(volume_id=command.volume_id, state="deleted")


def _copy(app: StoredApp) -> StoredApp:
    """An answer the caller may change (the real store reads a fresh one each time)."""
    return attrs.evolve(app, spec=json.loads(json.dumps(app.spec)))
