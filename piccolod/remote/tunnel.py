"""
What the tunnel adapters (``stub``, ``ssh``) share: spec validation, the
health component name, and fan-out of status changes to watchers.

The adapters themselves: :mod:`piccolod.remote.stub` (records what would
be exposed) and :mod:`piccolod.remote.ssh` (a reverse tunnel with
twisted.conch to any OpenSSH server).

Tests: ``tests/unit/test_remote_tunnel.py`` (one contract suite for both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.logger import Logger

from piccolod.errors import InvalidCommand
from piccolod.interfaces import TunnelSpec, TunnelStatus

__all__ = ["Watchers", "health_component", "validate_specs"]


def health_component(name: str) -> str:
    """The health component of tunnel ``name``."""
    return f"remote.tunnel.{name}"


def validate_specs(specs: Sequence[TunnelSpec]) -> dict[str, TunnelSpec]:
    """Specs by name; raises ``InvalidCommand`` for a duplicate name or binding."""
    by_name: dict[str, TunnelSpec] = {}
    errors: list[str] = []
    for spec in specs:
        if not isinstance(spec, TunnelSpec):
            raise InvalidCommand(f"not a TunnelSpec: {spec!r}")
        if spec.name in by_name:
            errors.append(f"tunnel {spec.name!r} is given twice")
        by_name[spec.name] = spec
        bindings = [f.binding for f in spec.forwards]
        fixed = [b for b in bindings if b[1] != 0]
        if len(set(fixed)) != len(fixed):
            errors.append(f"tunnel {spec.name!r}: two forwards bind the same address")
        names = [f.name for f in spec.forwards]
        if len(set(names)) != len(names):
            errors.append(f"tunnel {spec.name!r}: two forwards share a name")
    if errors:
        raise InvalidCommand("invalid tunnel specs", errors=errors)
    return by_name


class Watchers:
    """Observers of tunnel status changes; a failing observer is logged and kept."""

    log = Logger()

    def __init__(self) -> None:
        self._observers: list[Callable[[TunnelStatus], None]] = []

    def add(self, observer: Callable[[TunnelStatus], None]) -> Callable[[], None]:
        self._observers.append(observer)

        def cancel() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return cancel

    def __call__(self, status: TunnelStatus) -> None:
        for observer in list(self._observers):
            try:
                observer(status)
            except Exception:
                self.log.failure("tunnel status observer {observer!r} failed", observer=observer)
