"""
Port allocation, persisted in the control store.

Each app listener gets two ports:

- a **backend** port on 127.0.0.1 (default range 15000-24999), where the
  container publishes its guest port;
- a **public** port (default range 35000-44999), where the proxy listens.

Allocations live in the control store (setting ``services.ports.<app>`` =
``{listener: {"backend": n, "public": m}}``, written through the
``store.settings.*`` commands), so a listener keeps its ports across
restarts and LAN URLs stay stable (upstream weakness 6).  A port is never
handed out twice, and a candidate that is busy on this host (``is_free``)
is skipped.  Finding a port costs O(1) amortised: a cursor walks each
range and wraps around.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import DeferredLock

from piccolod.commands import (
    CommandContext,
    StoreDeleteSetting,
    StoreListSettings,
    StoreSetSetting,
)
from piccolod.errors import Conflict, InvalidCommand
from piccolod.interfaces import ICommandDispatcher

__all__ = ["PREFIX", "PortAllocator", "PortRange", "tcp_port_free"]

#: The control-store settings prefix of port allocations.
PREFIX = "services.ports."
CONTEXT = CommandContext(subject="system:services", source="internal")


@attrs.frozen
class PortRange:
    """``[low, high)``."""

    low: int
    high: int

    def __attrs_post_init__(self) -> None:
        if not (1 <= self.low < self.high <= 65536):
            raise InvalidCommand(f"bad port range [{self.low}, {self.high})")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port < self.high

    @property
    def size(self) -> int:
        return self.high - self.low


def tcp_port_free(host: str) -> Callable[[int], bool]:
    """A probe: whether a TCP port can be bound on ``host`` right now."""
    import socket

    def probe(port: int) -> bool:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
        return True

    return probe


def _decode(value: Any) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    if not isinstance(value, Mapping):
        return out
    for listener, ports in value.items():
        if (
            isinstance(listener, str)
            and isinstance(ports, Mapping)
            and isinstance(ports.get("backend"), int)
            and isinstance(ports.get("public"), int)
        ):
            out[listener] = {"backend": int(ports["backend"]), "public": int(ports["public"])}
    return out


@attrs.define(eq=False)
class PortAllocator:
    """
    Persisted allocations (see the module docstring).  Every operation is
    serialised; the allocations are loaded from the store on first use and
    again after :meth:`forget` (the store is unreadable while locked).
    """

    dispatcher: ICommandDispatcher
    backend: PortRange = PortRange(15000, 25000)
    public: PortRange = PortRange(35000, 45000)
    is_free_backend: Callable[[int], bool] = attrs.field(default=lambda port: True)
    is_free_public: Callable[[int], bool] = attrs.field(default=lambda port: True)
    _allocations: dict[str, dict[str, dict[str, int]]] | None = attrs.field(
        init=False, default=None
    )
    _used: set[int] = attrs.field(init=False, factory=set)
    _cursor: dict[str, int] = attrs.field(init=False, factory=dict)
    _lock: DeferredLock = attrs.field(init=False, factory=DeferredLock)

    def forget(self) -> None:
        """Drop the cached allocations (reloaded from the store on next use)."""
        self._allocations = None
        self._used = set()

    def cached(self) -> dict[str, dict[str, dict[str, int]]]:
        """The allocations as last loaded (empty before)."""
        return {app: dict(ports) for app, ports in (self._allocations or {}).items()}

    async def allocations(self) -> dict[str, dict[str, dict[str, int]]]:
        await self._load()
        return self.cached()

    async def allocate(self, app: str, listeners: Iterable[str]) -> dict[str, dict[str, int]]:
        """
        Ports for each of ``listeners`` (kept when already allocated; the
        ports of listeners no longer named are freed).  Fails with
        ``Conflict`` when a range is exhausted, or with the store's error.
        """
        wanted = list(dict.fromkeys(listeners))
        await self._lock.acquire()
        try:
            allocations = await self._load()
            current = dict(allocations.get(app, {}))
            updated = {name: current[name] for name in wanted if name in current}
            taken: list[int] = []
            try:
                for name in wanted:
                    if name in updated:
                        continue
                    backend = self._pick("backend", self.backend, self.is_free_backend)
                    taken.append(backend)
                    public = self._pick("public", self.public, self.is_free_public)
                    taken.append(public)
                    updated[name] = {"backend": backend, "public": public}
                if updated != current:
                    await self.dispatcher.dispatch(
                        StoreSetSetting(key=PREFIX + app, value=updated), CONTEXT
                    )
            except BaseException:
                self._used.difference_update(taken)
                raise
            for name, ports in current.items():
                if name not in updated:
                    self._used.discard(ports["backend"])
                    self._used.discard(ports["public"])
            allocations[app] = updated
            return dict(updated)
        finally:
            self._lock.release()

    async def release(self, app: str) -> None:
        """Forget ``app``'s ports (idempotent)."""
        await self._lock.acquire()
        try:
            allocations = await self._load()
            ports = allocations.pop(app, None)
            await self.dispatcher.dispatch(StoreDeleteSetting(key=PREFIX + app), CONTEXT)
            for pair in (ports or {}).values():
                self._used.discard(pair["backend"])
                self._used.discard(pair["public"])
        finally:
            self._lock.release()

    async def _load(self) -> dict[str, dict[str, dict[str, int]]]:
        if self._allocations is not None:
            return self._allocations
        result = await self.dispatcher.dispatch(StoreListSettings(prefix=PREFIX), CONTEXT)
        items: Mapping[str, Any] = getattr(result, "items", {}) or {}
        loaded: dict[str, dict[str, dict[str, int]]] = {}
        used: set[int] = set()
        for key, value in items.items():
            if not key.startswith(PREFIX):
                continue
            ports = _decode(value)
            loaded[key[len(PREFIX) :]] = ports
            for pair in ports.values():
                used.add(pair["backend"])
                used.add(pair["public"])
        self._allocations = loaded
        self._used = used
        return loaded

    def _pick(self, which: str, ports: PortRange, is_free: Callable[[int], bool]) -> int:
        start = self._cursor.get(which, ports.low)
        if start not in ports:
            start = ports.low
        candidate = start
        for _ in range(ports.size):
            if candidate not in self._used and is_free(candidate):
                self._used.add(candidate)
                following = candidate + 1
                self._cursor[which] = following if following in ports else ports.low
                return candidate
            candidate += 1
            if candidate >= ports.high:
                candidate = ports.low
        raise Conflict(f"no free {which} port left in [{ports.low}, {ports.high})")
