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


# --------------------------------------------------------------------------
# Persistence commands
#
# Secrets (passwords, recovery keys) are ``attrs.field(repr=False)`` and
# shown as ``"<redacted>"`` by ``to_json()``, so they never reach a log line,
# an audit record or an echo of the command.  Results that carry a new
# recovery key keep it out of ``repr`` too; their ``to_json()`` includes it,
# because showing it once to the admin is their purpose.

REDACTED = "<redacted>"
MAX_SECRET_LENGTH = 1024
_VOLUME_ID_FIRST = "abcdefghijklmnopqrstuvwxyz0123456789"


def _secret(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: a non-empty string of bounded length (never echoed)."""
    if not isinstance(value, str) or not value:
        raise InvalidCommand(f"{attribute.name} must be a non-empty string")
    if len(value) > MAX_SECRET_LENGTH:
        raise InvalidCommand(f"{attribute.name} must be at most {MAX_SECRET_LENGTH} characters")


def _optional_secret(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _secret(inst, attribute, value)


def _volume_id(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: ``^[a-z0-9][a-z0-9-]{0,62}$``."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 63
        or value[0] not in _VOLUME_ID_FIRST
        or any(c not in _VOLUME_ID_FIRST and c != "-" for c in value)
    ):
        raise InvalidCommand(f"{attribute.name} must match ^[a-z0-9][a-z0-9-]{{0,62}}$")


def _boolean(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidCommand(f"{attribute.name} must be a boolean")


class _Redacted:
    """``to_json()`` with every ``repr=False`` field that is set shown as ``REDACTED``."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in attrs.fields(type(self)):  # type: ignore[arg-type,misc]
            value = getattr(self, field.name)
            out[field.name] = REDACTED if (not field.repr and value is not None) else value
        return out


@attrs.frozen(kw_only=True)
class SetupStorage(_Redacted, Command):
    """Create the keyset: a data key wrapped under ``password`` and a new recovery key."""

    name: ClassVar[str] = "persistence.setup"
    timeout: ClassVar[float | None] = 120.0
    password: str = attrs.field(repr=False, validator=_secret)


@attrs.frozen(kw_only=True)
class UnlockStorage(_Redacted, Command):
    """Unlock with exactly one of ``password`` or ``recovery_key`` (24 words)."""

    name: ClassVar[str] = "persistence.unlock"
    timeout: ClassVar[float | None] = 120.0
    password: str | None = attrs.field(default=None, repr=False, validator=_optional_secret)
    recovery_key: str | None = attrs.field(default=None, repr=False, validator=_optional_secret)

    def __attrs_post_init__(self) -> None:
        check(
            (self.password is None) != (self.recovery_key is None),
            "give exactly one of password or recovery_key",
        )


@attrs.frozen
class LockStorage(Command):
    """Lock: close the control store, detach volumes, drop the data key (idempotent)."""

    name: ClassVar[str] = "persistence.lock"
    timeout: ClassVar[float | None] = 60.0


@attrs.frozen
class RecordLockState(Command):
    """
    The seed's name for asking for a lock state.  ``locked=True`` is
    ``persistence.lock``.  ``locked=False`` succeeds only when storage is
    already unlocked (unlocking needs a secret: ``persistence.unlock``);
    otherwise it fails with ``Locked``.
    """

    name: ClassVar[str] = "persistence.record_lock_state"
    timeout: ClassVar[float | None] = 60.0
    locked: bool = attrs.field(validator=_boolean)


@attrs.frozen
class GetStorageStatus(Command):
    """The lock state, rate-limit state and control store summary."""

    name: ClassVar[str] = "persistence.status"
    audit: ClassVar[bool] = False


@attrs.frozen(kw_only=True)
class ChangePassword(_Redacted, Command):
    """
    Rewrap the data key under ``new``, proving knowledge of the ``old``
    password or of the ``recovery_key`` (exactly one).  Works locked or
    unlocked and leaves the lock state as it is.
    """

    name: ClassVar[str] = "persistence.change_password"
    timeout: ClassVar[float | None] = 120.0
    new: str = attrs.field(repr=False, validator=_secret)
    old: str | None = attrs.field(default=None, repr=False, validator=_optional_secret)
    recovery_key: str | None = attrs.field(default=None, repr=False, validator=_optional_secret)

    def __attrs_post_init__(self) -> None:
        check(
            (self.old is None) != (self.recovery_key is None),
            "give exactly one of old or recovery_key",
        )


@attrs.frozen
class RotateRecoveryKey(Command):
    """Replace the recovery key (the old one stops working); needs unlocked storage."""

    name: ClassVar[str] = "persistence.rotate_recovery_key"
    requires_unlocked: ClassVar[bool] = True
    timeout: ClassVar[float | None] = 60.0


@attrs.frozen
class EnsureVolume(Command):
    """Make sure a volume exists (created now, or ``pending`` while locked)."""

    name: ClassVar[str] = "persistence.ensure_volume"
    timeout: ClassVar[float | None] = 60.0
    volume_id: str = attrs.field(validator=_volume_id)

    def resource(self) -> str:
        return f"volume:{self.volume_id}"


@attrs.frozen
class AttachVolume(Command):
    """Attach (mount) a volume, read-only if asked; needs unlocked storage."""

    name: ClassVar[str] = "persistence.attach_volume"
    requires_unlocked: ClassVar[bool] = True
    timeout: ClassVar[float | None] = 60.0
    volume_id: str = attrs.field(validator=_volume_id)
    read_only: bool = attrs.field(default=False, validator=_boolean)

    def resource(self) -> str:
        return f"volume:{self.volume_id}"


@attrs.frozen
class DetachVolume(Command):
    """Detach (unmount) a volume and keep it detached."""

    name: ClassVar[str] = "persistence.detach_volume"
    timeout: ClassVar[float | None] = 60.0
    volume_id: str = attrs.field(validator=_volume_id)

    def resource(self) -> str:
        return f"volume:{self.volume_id}"


@attrs.frozen
class RunControlExport(Command):
    """Export the control store's ciphertext as a bundle with a manifest."""

    name: ClassVar[str] = "persistence.run_control_export"
    timeout: ClassVar[float | None] = 600.0


@attrs.frozen
class RunFullExport(Command):
    """Export the control store and every volume's ciphertext as a bundle."""

    name: ClassVar[str] = "persistence.run_full_export"
    timeout: ClassVar[float | None] = 1800.0


@attrs.frozen
class ImportBundle(Command):
    """Restore a bundle into an empty state dir (then unlock with its password)."""

    name: ClassVar[str] = "persistence.import"
    timeout: ClassVar[float | None] = 1800.0
    path: str = attrs.field(validator=non_empty)


@attrs.frozen
class StorageStatus(Result):
    """
    What ``persistence.status`` (and the lock commands) answer.

    @ivar state: the lock state (``uninitialized``, ``locked``,
        ``preunlock``, ``unlocked``).
    @ivar retry_after: seconds until the next unlock attempt is accepted
        (0 when one would be accepted now).
    @ivar recovery_key: whether the keyset has a recovery key.
    @ivar store: the control store's summary while unlocked, else ``None``.
    @ivar error: why the keyset or store is unusable, if it is.
    """

    state: str
    initialized: bool
    retry_after: float = 0.0
    failed_attempts: int = 0
    recovery_key: bool = False
    store: dict[str, Any] | None = None
    error: str | None = None


@attrs.frozen
class SetupResult(Result):
    """The keyset was created; ``recovery_key`` (24 words) is shown this once."""

    state: str
    recovery_key: str = attrs.field(repr=False)


@attrs.frozen
class RecoveryKeyRotated(Result):
    """The new recovery key (24 words), shown this once."""

    recovery_key: str = attrs.field(repr=False)


@attrs.frozen
class VolumeResult(Result):
    """One volume's state after a volume command (``detail``: the full status)."""

    volume_id: str
    state: str
    path: str | None = None
    detail: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ExportDone(Result):
    """A bundle was written."""

    kind: str
    path: str
    sha256: str
    size: int
    files: int
    created_at: float


@attrs.frozen
class ImportDone(Result):
    """A bundle was restored into the state dir."""

    kind: str
    path: str
    files: int


# --------------------------------------------------------------------------
# Device commands


@attrs.frozen
class ListDevices(Command):
    """The block devices the device manager saw at its last scan."""

    name: ClassVar[str] = "devices.list"
    audit: ClassVar[bool] = False

    def resource(self) -> str:
        return "devices"


@attrs.frozen
class DeviceList(Result):
    """
    @ivar disks: one JSON-ready dict per disk, sorted by name (see
        ``piccolod.devices.Disk.to_json``).
    @ivar scanned_at: clock time of the last successful scan (``None``: none yet).
    """

    disks: tuple[dict[str, Any], ...] = ()
    scanned_at: float | None = None
