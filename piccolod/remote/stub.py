"""
The ``stub`` tunnel adapter: records what would be exposed, connects to
nothing.

Every applied spec is kept (:attr:`StubTunnel.applied`) and reported as
``up`` with each forward ``active``; a forward asking for port 0 gets a
stable made-up port, as a server would pick one.  A pinned host key is
reported as the key seen; an unpinned one stays ``""`` (no server, nothing
to pin).  It is the default of the ``tunnel`` slot: remote access can be
configured and its routes inspected without any server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from piccolod.events import HealthLevel
from piccolod.interfaces import (
    ForwardStatus,
    IHealth,
    ITunnel,
    TunnelSpec,
    TunnelStatus,
)
from piccolod.kernel.aio import provides
from piccolod.kernel.plugins import SubsystemContext
from piccolod.remote.tunnel import Watchers, health_component, validate_specs

__all__ = ["FIRST_FAKE_PORT", "StubTunnel"]

#: Where the made-up ports for ``bind_port = 0`` start.
FIRST_FAKE_PORT = 49152


@implementer(ITunnel)
@attrs.define(eq=False)
class StubTunnel(Service):
    """``ITunnel`` that only records (see the module docstring)."""

    log = Logger()
    kind = "stub"

    clock: IReactorTime = attrs.field(validator=provides(IReactorTime))
    health: IHealth | None = None
    #: Every ``apply`` call's specs, oldest first.
    applied: list[tuple[TunnelSpec, ...]] = attrs.field(init=False, factory=list)
    _specs: dict[str, TunnelSpec] = attrs.field(init=False, factory=dict)
    _statuses: dict[str, TunnelStatus] = attrs.field(init=False, factory=dict)
    _fake_ports: dict[tuple[str, str, str], int] = attrs.field(init=False, factory=dict)
    _watchers: Watchers = attrs.field(init=False, factory=Watchers)

    @classmethod
    def from_context(cls, ctx: SubsystemContext) -> StubTunnel:
        return cls(ctx.reactor, ctx.kernel.health)

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)

    def stopService(self) -> None:
        Service.stopService(self)
        self.apply(())

    # -- ITunnel --------------------------------------------------------------

    def apply(self, specs: Sequence[TunnelSpec]) -> None:
        wanted = validate_specs(specs)
        self.applied.append(tuple(specs))
        for name in sorted(set(self._specs) - set(wanted)):
            del self._specs[name]
            self._statuses.pop(name, None)
            if self.health is not None:
                self.health.remove(health_component(name))
            self._watchers(TunnelStatus(name, "stopped", since=self.clock.seconds()))
        for name, spec in sorted(wanted.items()):
            if self._specs.get(name) == spec:
                continue
            self._specs[name] = spec
            status = self._status_of(spec)
            self._statuses[name] = status
            if self.health is not None:
                self.health.report(
                    health_component(name),
                    HealthLevel.OK,
                    f"stub: {len(spec.forwards)} forward(s) recorded, nothing connected",
                )
            self._watchers(status)

    def status(self) -> Sequence[TunnelStatus]:
        return [self._statuses[name] for name in sorted(self._statuses)]

    def watch(self, observer: Callable[[TunnelStatus], None]) -> Callable[[], None]:
        return self._watchers.add(observer)

    # -- internals ------------------------------------------------------------

    def _status_of(self, spec: TunnelSpec) -> TunnelStatus:
        forwards = []
        for forward in sorted(spec.forwards, key=lambda f: f.name):
            bound = forward.bind_port or self._fake_port(spec.name, forward.bind_host, forward.name)
            forwards.append(
                ForwardStatus(
                    forward.name,
                    forward.bind_host,
                    forward.bind_port,
                    "active",
                    bound_port=bound,
                    target_host=forward.target_host,
                    target_port=forward.target_port,
                )
            )
        now = self.clock.seconds()
        return TunnelStatus(
            spec.name,
            "up",
            host=spec.host,
            port=spec.port,
            host_key=spec.host_key,
            forwards=tuple(forwards),
            since=now,
            connected_at=now,
        )

    def _fake_port(self, tunnel: str, host: str, name: str) -> int:
        key = (tunnel, host, name)
        if key not in self._fake_ports:
            self._fake_ports[key] = FIRST_FAKE_PORT + len(self._fake_ports)
        return self._fake_ports[key]

    def exposed(self) -> dict[str, list[dict[str, Any]]]:
        """What would be reachable now: per tunnel, its forwards (JSON-ready)."""
        return {
            name: [f.to_json() for f in status.forwards]
            for name, status in sorted(self._statuses.items())
        }
