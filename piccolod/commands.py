"""
The shared command vocabulary: typed requests between modules.

A command is a frozen attrs value with a stable dotted ``name``; it is
validated when constructed (attrs validators raise
:class:`~piccolod.errors.InvalidCommand` through :func:`check`).  Its class
declares how the dispatcher's middleware treats it:

- ``requires_unlocked``: the lock gate refuses it with ``Locked`` unless
  encrypted storage is unlocked;
- ``leader_resource()``: the leader gate refuses it with ``NotLeader`` (and
  the leader's address) unless this node leads that resource;
- ``timeout``: the default deadline, overridable per call in the context;
- ``retries``: how many times a *retryable* error may be retried.

Results are attrs values too (subclasses of :class:`Result`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import attrs

from piccolod.errors import InvalidCommand


class Command:
    """
    Base of every command type.

    @cvar name: the stable dotted name handlers register under.
    @cvar requires_unlocked: refused with ``Locked`` while storage is locked.
    @cvar timeout: default deadline in seconds (``None``: the dispatcher's).
    @cvar retries: attempts after the first for retryable errors.
    @cvar audit: whether the audit middleware records every outcome.
    """

    name: ClassVar[str] = ""
    requires_unlocked: ClassVar[bool] = False
    timeout: ClassVar[float | None] = None
    retries: ClassVar[int] = 0
    audit: ClassVar[bool] = True

    def leader_resource(self) -> str | None:
        """The resource this node must lead to run the command, if any."""
        return None

    def resource(self) -> str:
        """The resource the policy engine matches permissions against."""
        return ""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)  # type: ignore[arg-type]


class Result:
    """Base of every command result."""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)  # type: ignore[arg-type]


@attrs.frozen
class CommandContext:
    """
    Per-dispatch facts that are not part of the command itself.

    @ivar command_id: idempotency key; a command id seen within the TTL
        returns the first result, and concurrent duplicates share one run.
    @ivar correlation_id: carried onto every event the command causes.
    @ivar subject: who asks (``"admin"``, ``"token:<id>"``,
        ``"system:<slot>"``); the policy engine decides on it.
    @ivar timeout: overrides the command's default deadline.
    @ivar source: the entry point (``"api"``, ``"cli"``, ``"internal"``).
    """

    command_id: str | None = None
    correlation_id: str | None = None
    subject: str = "system:kernel"
    timeout: float | None = None
    source: str = "internal"


def check(condition: bool, message: str) -> None:
    """Raise :class:`InvalidCommand` with ``message`` unless ``condition``."""
    if not condition:
        raise InvalidCommand(message)


def non_empty(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidCommand(f"{attribute.name} must be a non-empty string")


def one_of(*choices: str) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """attrs validator: the value is one of ``choices``."""

    def _validate(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise InvalidCommand(f"{attribute.name} must be one of {', '.join(choices)}")

    return _validate


# --------------------------------------------------------------------------
# Kernel commands


@attrs.frozen
class Ping(Command):
    """A no-op round trip through the dispatcher (benchmarks, liveness)."""

    name: ClassVar[str] = "kernel.ping"
    audit: ClassVar[bool] = False
    payload: str = ""


@attrs.frozen
class Pong(Result):
    payload: str = ""


@attrs.frozen
class RestartChild(Command):
    """Ask the supervisor to restart one child (and reset a ``failed`` one)."""

    name: ClassVar[str] = "supervisor.restart_child"
    child: str = attrs.field(validator=non_empty)

    def resource(self) -> str:
        return f"child:{self.child}"


@attrs.frozen
class ChildRestarted(Result):
    child: str
    restarts: int


@attrs.frozen
class TrackResource(Command):
    """Ask the consensus subsystem to campaign for / observe a resource."""

    name: ClassVar[str] = "consensus.track"
    resource_name: str = attrs.field(validator=non_empty)

    def resource(self) -> str:
        return self.resource_name


@attrs.frozen
class ReleaseResource(Command):
    """Ask the consensus subsystem to step down from / stop tracking a resource."""

    name: ClassVar[str] = "consensus.release"
    resource_name: str = attrs.field(validator=non_empty)

    def resource(self) -> str:
        return self.resource_name


@attrs.frozen
class LeadershipResult(Result):
    resource: str
    role: str
    term: int
    leader_id: str | None = None
