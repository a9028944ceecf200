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

import re
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

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


class CommandContext(NamedTuple):
    """
    Per-dispatch facts that are not part of the command itself (an
    immutable named tuple: one is built per dispatch, at half the cost of a
    frozen attrs class).

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


@attrs.frozen(kw_only=True)
class JoinCluster(_Redacted, Command):
    """
    Join this uninitialised node to the cluster's shared control store: read
    the cluster's keyset (wrapped keys only, at ``control/keyset`` in the
    shared store), check that ``password`` (the cluster admin's) unwraps it,
    keep it as this node's keyset and unlock with it; the store then follows
    the cluster's commit log.  ``IllegalTransition`` when this node already
    has a keyset, ``NotFound`` when the cluster has none, ``WrongPassword``.
    """

    name: ClassVar[str] = "persistence.join"
    timeout: ClassVar[float | None] = 120.0
    password: str = attrs.field(repr=False, validator=_secret)


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


#: The export kinds (``persistence.run_<kind>_export``).
EXPORT_KINDS = ("control", "full")
#: What a bundle on the box is called (see ``persistence.exports``).
EXPORT_NAME = r"^piccolod-(control|full)-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}\.tar$"


_export_kind = one_of(*EXPORT_KINDS)


def _export_name(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or re.fullmatch(EXPORT_NAME, value) is None:
        raise InvalidCommand(f"{attribute.name} is not the name of an export bundle")


@attrs.frozen
class ListExports(Command):
    """The export bundles on the box, newest first (``ExportList``)."""

    name: ClassVar[str] = "persistence.list_exports"
    audit: ClassVar[bool] = False


@attrs.frozen
class OpenExport(Command):
    """
    Where one bundle is, for the API to send it (``ExportFile``); admin
    only: a bundle holds the keyset (wrapped keys) and every ciphertext.
    """

    name: ClassVar[str] = "persistence.open_export"
    kind: str = attrs.field(validator=_export_kind)
    bundle: str = attrs.field(validator=_export_name)


@attrs.frozen
class DeleteExport(Command):
    """Remove one bundle from the box (``ExportEntry`` of what was removed)."""

    name: ClassVar[str] = "persistence.delete_export"
    kind: str = attrs.field(validator=_export_kind)
    bundle: str = attrs.field(validator=_export_name)


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
    """
    A bundle was written.  ``name`` is what ``GET
    /api/v1/exports/{kind}/{name}`` downloads; ``pruned`` the older bundles
    of the kind removed to keep ``keep_exports``.
    """

    kind: str
    path: str
    sha256: str
    size: int
    files: int
    created_at: float
    name: str = ""
    pruned: tuple[str, ...] = ()


@attrs.frozen
class ExportEntry(Result):
    """One bundle on the box."""

    kind: str
    name: str
    size: int
    created_at: float


@attrs.frozen
class ExportList(Result):
    """The bundles on the box, newest first, and how many of each kind are kept."""

    exports: tuple[ExportEntry, ...] = ()
    keep: int = 0


@attrs.frozen
class ExportFile(Result):
    """Where a bundle is on this node's disk (the API streams it)."""

    kind: str
    name: str
    path: str
    size: int


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


# --------------------------------------------------------------------------
# App commands
#
# Handled by the apps subsystem.  Writes need unlocked storage and, on a
# cluster, the control-plane leadership (the leader gate answers
# ``NotLeader`` with the leader's address).  App names follow the app spec
# (``^[a-z][a-z0-9-]*[a-z0-9]$``, at most 50); the YAML body is validated
# by the handler, which reports every error at once (``InvalidCommand``).

MAX_APP_SPEC_BYTES = 64 * 1024
CONTROL_PLANE_RESOURCE = "control-plane"


def _app_name(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (
        not isinstance(value, str)
        or not 2 <= len(value) <= 50
        or not value[0].isascii()
        or not value[0].islower()
        or not value[-1].isascii()
        or not (value[-1].islower() or value[-1].isdigit())
        or any(not (c.isascii() and (c.islower() or c.isdigit() or c == "-")) for c in value)
    ):
        raise InvalidCommand(
            f"{attribute.name} must match ^[a-z][a-z0-9-]*[a-z0-9]$ (at most 50 characters)"
        )


def _spec_text(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidCommand(f"{attribute.name} must be a non-empty YAML document")


class _AppWrite(Command):
    requires_unlocked: ClassVar[bool] = True
    timeout: ClassVar[float | None] = 120.0

    def leader_resource(self) -> str | None:
        return CONTROL_PLANE_RESOURCE


@attrs.frozen
class InstallApp(_AppWrite):
    """Install or replace an app from its YAML spec (an upsert)."""

    name: ClassVar[str] = "apps.install"
    spec: str = attrs.field(validator=_spec_text)

    def resource(self) -> str:
        return "apps"


@attrs.frozen
class ValidateApp(Command):
    """Validate a YAML spec without installing it."""

    name: ClassVar[str] = "apps.validate"
    audit: ClassVar[bool] = False
    spec: str = attrs.field(validator=_spec_text)

    def resource(self) -> str:
        return "apps"


@attrs.frozen
class ListApps(Command):
    """Every installed app with its status."""

    name: ClassVar[str] = "apps.list"
    audit: ClassVar[bool] = False
    requires_unlocked: ClassVar[bool] = True

    def resource(self) -> str:
        return "apps"


@attrs.frozen
class GetApp(Command):
    """One app with its spec and status."""

    name: ClassVar[str] = "apps.get"
    audit: ClassVar[bool] = False
    requires_unlocked: ClassVar[bool] = True
    app: str = attrs.field(validator=_app_name)

    def resource(self) -> str:
        return f"app:{self.app}"


@attrs.frozen
class StartApp(_AppWrite):
    """Enable an app (the controller starts it)."""

    name: ClassVar[str] = "apps.start"
    app: str = attrs.field(validator=_app_name)

    def resource(self) -> str:
        return f"app:{self.app}"


@attrs.frozen
class StopApp(_AppWrite):
    """Disable an app (the controller stops it and withdraws its routes)."""

    name: ClassVar[str] = "apps.stop"
    app: str = attrs.field(validator=_app_name)

    def resource(self) -> str:
        return f"app:{self.app}"


@attrs.frozen
class UpdateApp(_AppWrite):
    """
    Change an app's image (``image``) or its whole spec (``spec``; exactly
    one of the two).  The previous spec is kept for ``apps.revert``.
    """

    name: ClassVar[str] = "apps.update"
    app: str = attrs.field(validator=_app_name)
    image: str | None = None
    spec: str | None = None

    def __attrs_post_init__(self) -> None:
        check(
            (self.image is None) != (self.spec is None),
            "give exactly one of image or spec",
        )
        check(
            self.image is None or (isinstance(self.image, str) and bool(self.image.strip())),
            "image must be a non-empty string",
        )
        check(
            self.spec is None or (isinstance(self.spec, str) and bool(self.spec.strip())),
            "spec must be a non-empty YAML document",
        )

    def resource(self) -> str:
        return f"app:{self.app}"


@attrs.frozen
class RevertApp(_AppWrite):
    """Go back to the spec before the last ``apps.update``."""

    name: ClassVar[str] = "apps.revert"
    app: str = attrs.field(validator=_app_name)

    def resource(self) -> str:
        return f"app:{self.app}"


@attrs.frozen
class RemoveApp(_AppWrite):
    """
    Uninstall an app (its containers and routes go); with ``purge`` its
    persistent volumes and port allocations go too.
    """

    name: ClassVar[str] = "apps.remove"
    app: str = attrs.field(validator=_app_name)
    purge: bool = attrs.field(default=False, validator=_boolean)

    def resource(self) -> str:
        return f"app:{self.app}"


@attrs.frozen
class AppLogs(Command):
    """The last ``tail`` lines of an app's container output."""

    name: ClassVar[str] = "apps.logs"
    audit: ClassVar[bool] = False
    requires_unlocked: ClassVar[bool] = True
    app: str = attrs.field(validator=_app_name)
    tail: int = 100

    def __attrs_post_init__(self) -> None:
        check(
            isinstance(self.tail, int)
            and not isinstance(self.tail, bool)
            and 1 <= self.tail <= 10000,
            "tail must be an integer in [1, 10000]",
        )

    def resource(self) -> str:
        return f"app:{self.app}"


@attrs.frozen
class AppDetail(Result):
    """One app: ``{"name", "spec", "enabled", "generation", "status"}``."""

    app: dict[str, Any]


@attrs.frozen
class AppList(Result):
    apps: tuple[dict[str, Any], ...] = ()


@attrs.frozen
class AppValidated(Result):
    """The spec is valid; ``spec`` is its normalised form."""

    app: str
    spec: dict[str, Any]


@attrs.frozen
class AppRemoved(Result):
    app: str
    purged: bool


@attrs.frozen
class AppLogLines(Result):
    app: str
    logs: str


# --------------------------------------------------------------------------
# Service commands
#
# Handled by the services subsystem; the apps controller drives them.


@attrs.frozen
class ExposedListener:
    """One listener to expose (what the proxy needs to know of it)."""

    listener: str = attrs.field(validator=non_empty)
    protocol: str = attrs.field(default="raw", validator=one_of("raw", "http", "websocket"))
    flow: str = attrs.field(default="tcp", validator=one_of("tcp", "tls"))
    remote_ports: tuple[int, ...] = (80, 443)


@attrs.frozen
class ListServices(Command):
    """The route table and port allocations."""

    name: ClassVar[str] = "services.list"
    audit: ClassVar[bool] = False

    def resource(self) -> str:
        return "services"


@attrs.frozen
class AllocatePorts(Command):
    """
    Give each listener of ``app`` a backend port (the container's loopback
    host port) and a public port (the proxy's), persisted: the same
    listener keeps its ports across restarts.  Ports of listeners not named
    are released.
    """

    name: ClassVar[str] = "services.allocate"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False
    app: str = attrs.field(validator=_app_name)
    listeners: tuple[str, ...] = ()

    def resource(self) -> str:
        return f"app:{self.app}"


@attrs.frozen
class ExposeApp(Command):
    """
    Serve ``app``'s listeners on their public ports: proxied to this
    node's container (``mode="local"``) or to the leader's public ports at
    ``leader_address``'s host (``mode="leader"``); publishes
    ``RoutePublished`` for each.  Listeners of the app not named are
    withdrawn.
    """

    name: ClassVar[str] = "services.expose"
    audit: ClassVar[bool] = False
    app: str = attrs.field(validator=_app_name)
    listeners: tuple[ExposedListener, ...] = ()
    mode: str = attrs.field(default="local", validator=one_of("local", "leader"))
    leader_address: str | None = None

    def __attrs_post_init__(self) -> None:
        check(
            self.mode == "local" or bool(self.leader_address),
            "mode leader needs a leader_address",
        )

    def resource(self) -> str:
        return f"app:{self.app}"


@attrs.frozen
class WithdrawApp(Command):
    """Close every proxy of ``app`` and withdraw its routes (idempotent)."""

    name: ClassVar[str] = "services.withdraw"
    audit: ClassVar[bool] = False
    app: str = attrs.field(validator=_app_name)

    def resource(self) -> str:
        return f"app:{self.app}"


@attrs.frozen
class ReleasePorts(Command):
    """Withdraw ``app`` and forget its port allocations (idempotent)."""

    name: ClassVar[str] = "services.release"
    requires_unlocked: ClassVar[bool] = True
    app: str = attrs.field(validator=_app_name)

    def resource(self) -> str:
        return f"app:{self.app}"


@attrs.frozen
class PortAllocation(Result):
    """``ports``: listener → ``{"backend": int, "public": int}``."""

    app: str
    ports: dict[str, dict[str, int]]


@attrs.frozen
class ServiceList(Result):
    """``routes``: ``RouteEntry.to_json()`` dicts; ``allocations``: app → ports."""

    routes: tuple[dict[str, Any], ...] = ()
    allocations: dict[str, dict[str, dict[str, int]]] = attrs.field(factory=dict)


@attrs.frozen
class ServicesChanged(Result):
    app: str
    routes: tuple[dict[str, Any], ...] = ()


# --------------------------------------------------------------------------
# Control store commands used by the apps and services subsystems
#
# Handled by the persistence subsystem (its apps and settings
# repositories); every one needs unlocked storage, writes fail with
# ``NotLeader`` on a follower.  ``DeleteVolume`` removes a volume and its
# data for ``apps.remove --purge``.


@attrs.frozen
class StoreGetApp(Command):
    name: ClassVar[str] = "store.apps.get"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False
    app: str = attrs.field(validator=non_empty)


@attrs.frozen
class StoreListApps(Command):
    name: ClassVar[str] = "store.apps.list"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False


#: The store's idempotent writes (a put, set, save, clear or delete of the
#: same thing twice leaves what once does) may be retried by the dispatcher:
#: their retryable errors are a cluster leader still catching up with the
#: commit log (nothing was written) and an unreachable log (the write may have
#: landed; writing it again is harmless).
STORE_WRITE_RETRIES = 3


@attrs.frozen
class StorePutApp(Command):
    """Create or replace; the generation is bumped when spec or enabled change."""

    name: ClassVar[str] = "store.apps.put"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False
    retries: ClassVar[int] = STORE_WRITE_RETRIES
    app: str = attrs.field(validator=non_empty)
    spec: dict[str, Any] = attrs.field(factory=dict)
    enabled: bool = attrs.field(default=True, validator=_boolean)


@attrs.frozen
class StoreDeleteApp(Command):
    """Remove an app's record; idempotent (a missing app is fine)."""

    name: ClassVar[str] = "store.apps.delete"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False
    retries: ClassVar[int] = STORE_WRITE_RETRIES
    app: str = attrs.field(validator=non_empty)


@attrs.frozen
class StoreGetSetting(Command):
    name: ClassVar[str] = "store.settings.get"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False
    key: str = attrs.field(validator=non_empty)


@attrs.frozen
class StoreSetSetting(Command):
    name: ClassVar[str] = "store.settings.set"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False
    retries: ClassVar[int] = STORE_WRITE_RETRIES
    key: str = attrs.field(validator=non_empty)
    value: Any = None


@attrs.frozen
class StoreDeleteSetting(Command):
    """Remove a setting; idempotent (a missing key is fine)."""

    name: ClassVar[str] = "store.settings.delete"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False
    retries: ClassVar[int] = STORE_WRITE_RETRIES
    key: str = attrs.field(validator=non_empty)


@attrs.frozen
class StoreListSettings(Command):
    """Every setting whose key starts with ``prefix``."""

    name: ClassVar[str] = "store.settings.list"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False
    prefix: str = ""


@attrs.frozen
class DeleteVolume(Command):
    """Detach a volume and delete it with its data (idempotent)."""

    name: ClassVar[str] = "persistence.delete_volume"
    requires_unlocked: ClassVar[bool] = True
    timeout: ClassVar[float | None] = 120.0
    volume_id: str = attrs.field(validator=_volume_id)

    def resource(self) -> str:
        return f"volume:{self.volume_id}"


@attrs.frozen
class StoredApp(Result):
    """An ``AppRecord`` as a result (``AppRecord.to_json()`` fields)."""

    name: str
    spec: dict[str, Any]
    enabled: bool = True
    generation: int = 0
    updated_at: float = 0.0


@attrs.frozen
class StoredApps(Result):
    apps: tuple[StoredApp, ...] = ()


@attrs.frozen
class StoredSetting(Result):
    key: str
    value: Any = None


@attrs.frozen
class StoredSettings(Result):
    items: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class StoreDone(Result):
    """A store write or delete finished."""

    ok: bool = True


# --------------------------------------------------------------------------
# Cluster commands
#
# Answered by the consensus subsystem (every variant answers
# ``cluster.status``; ``cluster.fenced_put`` and ``cluster.get`` need a
# variant with a shared store, such as ``etcd``).  Keys are relative to the
# cluster's data prefix.

MAX_CLUSTER_KEY = 512
MAX_CLUSTER_VALUE = 1 << 20


def _cluster_key(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: a relative key of printable ASCII, no empty or dot segments."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CLUSTER_KEY:
        raise InvalidCommand(f"{attribute.name} must be 1 to {MAX_CLUSTER_KEY} characters")
    if any(not (0x21 <= ord(c) <= 0x7E) for c in value):
        raise InvalidCommand(f"{attribute.name} must be printable ASCII without spaces")
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise InvalidCommand(f"{attribute.name} must not have empty, '.' or '..' segments")


def _cluster_value(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or len(value.encode()) > MAX_CLUSTER_VALUE:
        raise InvalidCommand(
            f"{attribute.name} must be a string of at most {MAX_CLUSTER_VALUE} bytes"
        )


@attrs.frozen
class GetClusterStatus(Command):
    """This node's view of the cluster: members, roles and terms per resource."""

    name: ClassVar[str] = "cluster.status"
    audit: ClassVar[bool] = False
    timeout: ClassVar[float | None] = 10.0

    def resource(self) -> str:
        return "cluster"


@attrs.frozen
class ClusterStatus(Result):
    """
    @ivar variant: the consensus variant (``single-node``, ``etcd``).
    @ivar members: one dict per known node (``node_id``, ``api_address``,
        ``self``), sorted by node id.
    @ivar resources: one dict per tracked resource (``LeadershipState``
        fields and the variant's details), sorted by name.
    @ivar backend: the variant's own view (etcd endpoints and their
        health), ``None`` for single-node.
    """

    node_id: str
    variant: str
    members: tuple[dict[str, Any], ...] = ()
    resources: tuple[dict[str, Any], ...] = ()
    backend: dict[str, Any] | None = None


@attrs.frozen
class FencedPut(Command):
    """
    Write ``value`` at ``key`` in the cluster's shared store, fenced by this
    node's leadership of ``resource_name``: refused with ``NotLeader``
    unless this node leads it and its fencing token still holds in the
    store at the moment of the write.
    """

    name: ClassVar[str] = "cluster.fenced_put"
    timeout: ClassVar[float | None] = 10.0
    key: str = attrs.field(validator=_cluster_key)
    value: str = attrs.field(validator=_cluster_value)
    resource_name: str = attrs.field(default="control-plane", validator=non_empty)

    def leader_resource(self) -> str | None:
        return self.resource_name

    def resource(self) -> str:
        return f"cluster:{self.key}"


@attrs.frozen
class FencedPutDone(Result):
    """The write was acknowledged by the store at ``revision`` under fencing ``term``."""

    key: str
    revision: int
    term: int


@attrs.frozen
class ReadClusterKey(Command):
    """Read ``key`` from the cluster's shared store (linearizable)."""

    name: ClassVar[str] = "cluster.get"
    audit: ClassVar[bool] = False
    timeout: ClassVar[float | None] = 10.0
    key: str = attrs.field(validator=_cluster_key)

    def resource(self) -> str:
        return f"cluster:{self.key}"


@attrs.frozen
class ClusterValue(Result):
    """A key of the shared store; ``value`` is ``None`` when it does not exist."""

    key: str
    value: str | None = None
    create_revision: int = 0
    mod_revision: int = 0
    revision: int = 0


# --------------------------------------------------------------------------
# Replicated control store
#
# On a cluster, every control-store commit of the ``control-plane`` leader is
# sealed (AES-GCM under a sub-key of the data key: the shared log holds
# ciphertext only) and appended to the cluster's commit log with
# ``cluster.replicate_commit`` *before* the store acknowledges it.  The log
# is linear: an append names the revision it follows, and the consensus
# refuses it (``CommitConflict``) unless that is the log's head, and
# (``NotLeader``) unless this node's fencing term still holds.  Followers
# read the log (``cluster.read_commits``, or the consensus's watch) and hand
# it to ``persistence.apply_commits`` in revision order.  A variant without a
# shared log (``single-node``) registers none of the ``cluster.*`` commands
# here, and the store then commits locally as before.

COMMIT_KINDS = ("commit", "snapshot")


def _int_between(
    minimum: int, maximum: int | None = None
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """attrs validator: an int (not a bool) from ``minimum`` to ``maximum``."""

    def _validate(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            upper = "" if maximum is None else f" and at most {maximum}"
            raise InvalidCommand(
                f"{attribute.name} must be an integer of at least {minimum}{upper}"
            )

    return _validate


def _text(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: a string."""
    if not isinstance(value, str):
        raise InvalidCommand(f"{attribute.name} must be a string")


@attrs.frozen
class SealedCommit:
    """
    One entry of the cluster's commit log.

    @ivar kind: ``"commit"`` (one transaction: revision ``revision`` follows
        ``revision - 1``, whose checksum is ``previous``) or ``"snapshot"``
        (the whole store as of ``revision``; ``previous`` is ``""``).
    @ivar checksum: the store's chain checksum at ``revision``.
    @ivar sealed: base64 of the AES-GCM ciphertext (nonce first) of the
        entry's contents; only nodes holding the data key can open it.
    """

    kind: str = attrs.field(validator=one_of(*COMMIT_KINDS))
    revision: int = attrs.field(validator=_int_between(0))
    previous: str = attrs.field(validator=_text)
    checksum: str = attrs.field(validator=_text)
    sealed: str = attrs.field(validator=_text)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class ReplicateCommit(Command):
    """
    Append ``entry`` to the cluster's commit log, fenced by this node's
    ``control-plane`` term, and answer ``CommitReplicated`` once the shared
    store has it.  A ``commit`` entry is refused with ``CommitConflict``
    unless the log's head is ``entry.revision - 1``; a ``snapshot`` entry
    only when the log is empty or behind ``entry.revision`` (it restarts the
    log there).  ``NotLeader`` once another node holds the term,
    ``Unavailable`` (retryable) when the shared store cannot be reached.
    """

    name: ClassVar[str] = "cluster.replicate_commit"
    audit: ClassVar[bool] = False
    timeout: ClassVar[float | None] = 10.0
    entry: SealedCommit

    def leader_resource(self) -> str | None:
        return "control-plane"

    def resource(self) -> str:
        return "cluster:control/commits"


@attrs.frozen
class CommitReplicated(Result):
    """``revision`` is in the log; ``log_revision`` is the shared store's revision of the write."""

    revision: int
    log_revision: int
    term: int


@attrs.frozen
class ReadCommits(Command):
    """
    Read the commit log after store revision ``after``: the entries
    ``after + 1 ..`` in order (at most ``limit``), preceded by the log's
    snapshot when ``after`` is older than the oldest retained commit.
    Any node may read it (linearizable).
    """

    name: ClassVar[str] = "cluster.read_commits"
    audit: ClassVar[bool] = False
    timeout: ClassVar[float | None] = 30.0
    after: int = attrs.field(default=0, validator=_int_between(0))
    limit: int = attrs.field(default=1000, validator=_int_between(1, 10_000))

    def resource(self) -> str:
        return "cluster:control/commits"


@attrs.frozen
class CommitLog(Result):
    """
    @ivar entries: in revision order (a snapshot, when present, first).
    @ivar head: the log's head revision (``None``: the log is empty).
    @ivar more: whether entries after the last one returned exist.
    """

    entries: tuple[SealedCommit, ...] = ()
    head: int | None = None
    more: bool = False


@attrs.frozen
class ApplyCommits(Command):
    """
    Apply log entries to this node's control store, in order: a ``commit``
    whose revision is already applied (same checksum) is skipped; one that
    does not follow the store's head fails with ``CommitConflict`` (head =
    the store's revision); a checksum that differs after applying fails with
    ``Conflict`` and rolls the entry back.  ``Locked`` while the store is
    closed.  Answers the store's revision afterwards.
    """

    name: ClassVar[str] = "persistence.apply_commits"
    audit: ClassVar[bool] = False
    timeout: ClassVar[float | None] = 60.0
    entries: tuple[SealedCommit, ...]

    def resource(self) -> str:
        return "persistence:control"


@attrs.frozen
class CommitsApplied(Result):
    """The store's revision and checksum after applying."""

    revision: int
    checksum: str
    applied: int = 0


# --------------------------------------------------------------------------
# Auth commands
#
# Asked of the persistence subsystem by the API: the admin password is the
# storage password, so checking it at login (while storage is unlocked) is
# a keyset operation.


@attrs.frozen(kw_only=True)
class VerifyPassword(_Redacted, Command):
    """
    Check ``password`` against the keyset and change nothing: answers the
    ``StorageStatus``, or fails with ``WrongPassword`` (rate-limited like
    unlock attempts, ``RateLimited`` during the delay) or
    ``IllegalTransition`` before setup.
    """

    name: ClassVar[str] = "persistence.verify_password"
    timeout: ClassVar[float | None] = 120.0
    password: str = attrs.field(repr=False, validator=_secret)


# --------------------------------------------------------------------------
# Remote commands
#
# ``remote.*`` are handled by the remote subsystem.  Every one but
# ``remote.acme_challenge`` needs unlocked storage (the remote configuration
# and its secrets live in the control store), so the lock gate answers them
# with ``Locked`` (HTTP 423) while locked; writes need the control-plane
# leadership.  ``store.remote.*`` are the remote subsystem's access to its
# record in the control store (the persistence subsystem answers them from
# its remote repository: ``get``/``save``/``clear``); the record holds the
# device key, the ACME account key and the certificates, so those commands
# and their results keep it out of ``repr`` and ``to_json()``.

REMOTE_RESOURCE = "remote"
MAX_REMOTE_HOSTNAME = 253
_HOST_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def is_remote_hostname(value: Any) -> bool:
    """A lowercase DNS name of at least two labels (``portal.example.net``)."""
    if not isinstance(value, str) or not 3 <= len(value) <= MAX_REMOTE_HOSTNAME:
        return False
    labels = value.split(".")
    return len(labels) >= 2 and all(
        1 <= len(label) <= 63
        and _HOST_LABEL_CHARS.issuperset(label)
        and label[0] != "-"
        and label[-1] != "-"
        for label in labels
    )


def _remote_hostname(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not is_remote_hostname(value):
        raise InvalidCommand(
            f"{attribute.name} must be a lowercase DNS name with at least two labels"
        )


def _optional_remote_hostname(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value != "":
        _remote_hostname(inst, attribute, value)


def _port(minimum: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def _validate(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= 65535:
            raise InvalidCommand(f"{attribute.name} must be an integer in [{minimum}, 65535]")

    return _validate


def _optional_port(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _port(0)(inst, attribute, value)


def _positive_seconds(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value <= 86400 * 366  # also refuses NaN
    ):
        raise InvalidCommand(f"{attribute.name} must be a number of seconds > 0")


def _remote_name(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: a tunnel name, ``^[a-z0-9][a-z0-9-]{0,31}$``."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 32
        or value[0] not in _VOLUME_ID_FIRST
        or not _HOST_LABEL_CHARS.issuperset(value)
    ):
        raise InvalidCommand(f"{attribute.name} must match ^[a-z0-9][a-z0-9-]{{0,31}}$")


def _listener_name(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 63
        or any(c in "/ \t\r\n" for c in value)
    ):
        raise InvalidCommand(f"{attribute.name} must be 1-63 characters without '/' or spaces")


def remote_target_error(value: Any) -> str | None:
    """Why ``value`` is not a route target (``portal`` or ``<app>/<listener>``), else None."""
    if value == "portal":
        return None
    if not isinstance(value, str) or value.count("/") != 1:
        return "target must be 'portal' or '<app>/<listener>'"
    app, listener = value.split("/")
    try:
        _app_name(None, _TARGET_APP, app)
        _listener_name(None, _TARGET_LISTENER, listener)
    except InvalidCommand as e:
        return f"target {value!r}: {e.detail}"
    return None


def _remote_target(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    error = remote_target_error(value)
    if error is not None:
        raise InvalidCommand(f"{attribute.name}: {error}")


def _host_key(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: ``""`` or an OpenSSH SHA256 fingerprint (``SHA256:`` + 43 base64)."""
    if value == "":
        return
    body = value[7:] if isinstance(value, str) and value.startswith("SHA256:") else ""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    if len(body) != 43 or any(c not in alphabet for c in body):
        raise InvalidCommand(
            f"{attribute.name} must be an OpenSSH fingerprint 'SHA256:<43 base64 characters>'"
        )


def _ssh_host(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_REMOTE_HOSTNAME
        or any(c.isspace() or c in "/@[]" for c in value)
    ):
        raise InvalidCommand(f"{attribute.name} must be a host name or IP address")


def _ssh_user(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 64
        or any(c.isspace() or c in "@:/" for c in value)
    ):
        raise InvalidCommand(f"{attribute.name} must be a user name (1-64, no spaces, '@', ':')")


def _https_url(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.startswith("https://") or len(value) > 2048:
        raise InvalidCommand(f"{attribute.name} must be an https:// URL")


def _bounded_text(limit: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def _validate(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, str) or len(value) > limit or "\n" in value:
            raise InvalidCommand(f"{attribute.name} must be one line of at most {limit}")

    return _validate


class _Named:
    """Stands in for an ``attrs.Attribute`` when a validator checks a part of a value."""

    def __init__(self, name: str) -> None:
        self.name = name


_TARGET_APP: Any = _Named("app")
_TARGET_LISTENER: Any = _Named("listener")


@attrs.frozen
class RemoteTunnelConfig:
    """
    One SSH server carrying the reverse tunnel.

    @ivar name: names the tunnel in status and health (``remote.tunnel.<name>``).
    @ivar host_key: the server's pinned host key fingerprint (OpenSSH
        ``SHA256:...`` without padding); ``""`` pins the key seen on the
        first connection.  A connection presenting another key is refused
        and not retried.
    @ivar bind_host: the server-side address every forward listens on.
    @ivar keepalive_interval: seconds between keepalive requests;
        ``keepalive_timeout``: seconds without an answer before the
        connection is dropped and re-established.
    """

    host: str = attrs.field(validator=_ssh_host)
    user: str = attrs.field(validator=_ssh_user)
    port: int = attrs.field(default=22, validator=_port(1))
    name: str = attrs.field(default="default", validator=_remote_name)
    host_key: str = attrs.field(default="", validator=_host_key)
    bind_host: str = attrs.field(default="127.0.0.1", validator=_ssh_host)
    keepalive_interval: float = attrs.field(default=15.0, validator=_positive_seconds)
    keepalive_timeout: float = attrs.field(default=45.0, validator=_positive_seconds)


@attrs.frozen
class RemoteExposure:
    """
    An app listener made reachable from the tunnel servers.

    @ivar remote_port: the server-side port (``0``: the server picks one;
        ``remote.status`` shows it).
    @ivar hostname: a TLS name for the listener (certificate and SNI
        route), ``""`` for none.
    """

    app: str = attrs.field(validator=_app_name)
    listener: str = attrs.field(validator=_listener_name)
    remote_port: int = attrs.field(default=0, validator=_port(0))
    hostname: str = attrs.field(default="", validator=_optional_remote_hostname)

    @property
    def target(self) -> str:
        return f"{self.app}/{self.listener}"


@attrs.frozen
class RemoteAcmeConfig:
    """
    Where certificates come from (ACME, HTTP-01).

    @ivar ca_bundle: a CA bundle file trusting the directory's own TLS
        certificate (a private or test ACME server); ``""``: the system's.
    @ivar renew_before_days: renew when a certificate expires sooner.
    """

    directory_url: str = attrs.field(validator=_https_url)
    email: str = attrs.field(default="", validator=_bounded_text(254))
    ca_bundle: str = attrs.field(default="", validator=_bounded_text(4096))
    renew_before_days: float = attrs.field(default=30.0, validator=_positive_seconds)


def _unique(values: list[Any], what: str) -> None:
    seen: set[Any] = set()
    for value in values:
        check(value not in seen, f"{what} {value!r} is given twice")
        seen.add(value)


@attrs.frozen(kw_only=True)
class ConfigureRemote(Command):
    """
    Enable remote access with this configuration (it replaces the previous
    one; aliases, pinned host keys of unchanged servers, the device key and
    certificates are kept).  Only what changed is restarted.

    @ivar portal_port: the server-side port of the portal (0: server picks).
    @ivar https_port: the server-side port forwarded to the TLS terminator
        (SNI routes to the portal and listeners by hostname); ``None``: no
        TLS forward.
    """

    name: ClassVar[str] = "remote.configure"
    requires_unlocked: ClassVar[bool] = True
    timeout: ClassVar[float | None] = 60.0
    tunnels: tuple[RemoteTunnelConfig, ...] = ()
    portal_hostname: str = attrs.field(default="", validator=_optional_remote_hostname)
    expose_portal: bool = attrs.field(default=True, validator=_boolean)
    portal_port: int = attrs.field(default=0, validator=_port(0))
    https_port: int | None = attrs.field(default=None, validator=_optional_port)
    expose: tuple[RemoteExposure, ...] = ()
    acme: RemoteAcmeConfig | None = None

    def __attrs_post_init__(self) -> None:
        check(
            isinstance(self.tunnels, tuple)
            and all(isinstance(t, RemoteTunnelConfig) for t in self.tunnels),
            "tunnels must be a list of tunnel configurations",
        )
        check(
            isinstance(self.expose, tuple)
            and all(isinstance(e, RemoteExposure) for e in self.expose),
            "expose must be a list of exposures",
        )
        check(
            self.acme is None or isinstance(self.acme, RemoteAcmeConfig),
            "acme must be an ACME configuration or null",
        )
        check(len(self.tunnels) <= 8, "at most 8 tunnels")
        check(len(self.expose) <= 256, "at most 256 exposures")
        _unique([t.name for t in self.tunnels], "tunnel name")
        _unique([e.target for e in self.expose], "exposure")
        ports = [p for p in (self.portal_port, self.https_port) if p]
        ports += [e.remote_port for e in self.expose if e.remote_port]
        _unique(ports, "remote port")
        hostnames = [self.portal_hostname] if self.portal_hostname else []
        hostnames += [e.hostname for e in self.expose if e.hostname]
        _unique(hostnames, "hostname")

    def leader_resource(self) -> str | None:
        return CONTROL_PLANE_RESOURCE

    def resource(self) -> str:
        return REMOTE_RESOURCE


@attrs.frozen
class DisableRemote(Command):
    """Stop every tunnel and the TLS terminator; the configuration is kept."""

    name: ClassVar[str] = "remote.disable"
    requires_unlocked: ClassVar[bool] = True
    timeout: ClassVar[float | None] = 60.0

    def leader_resource(self) -> str | None:
        return CONTROL_PLANE_RESOURCE

    def resource(self) -> str:
        return REMOTE_RESOURCE


@attrs.frozen
class GetRemoteStatus(Command):
    """The configuration (no secret), routes, tunnels and certificates."""

    name: ClassVar[str] = "remote.status"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False

    def resource(self) -> str:
        return REMOTE_RESOURCE


@attrs.frozen
class AddRemoteAlias(Command):
    """Route ``hostname`` (TLS, with its own certificate) to ``target``."""

    name: ClassVar[str] = "remote.aliases.add"
    requires_unlocked: ClassVar[bool] = True
    timeout: ClassVar[float | None] = 60.0
    hostname: str = attrs.field(validator=_remote_hostname)
    target: str = attrs.field(default="portal", validator=_remote_target)

    def leader_resource(self) -> str | None:
        return CONTROL_PLANE_RESOURCE

    def resource(self) -> str:
        return f"{REMOTE_RESOURCE}:{self.hostname}"


@attrs.frozen
class RemoveRemoteAlias(Command):
    """Forget an alias (and its certificate); fails with ``NotFound``."""

    name: ClassVar[str] = "remote.aliases.remove"
    requires_unlocked: ClassVar[bool] = True
    timeout: ClassVar[float | None] = 60.0
    hostname: str = attrs.field(validator=_remote_hostname)

    def leader_resource(self) -> str | None:
        return CONTROL_PLANE_RESOURCE

    def resource(self) -> str:
        return f"{REMOTE_RESOURCE}:{self.hostname}"


@attrs.frozen
class ListRemoteAliases(Command):
    name: ClassVar[str] = "remote.aliases.list"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False

    def resource(self) -> str:
        return REMOTE_RESOURCE


@attrs.frozen
class ListRemoteCertificates(Command):
    name: ClassVar[str] = "remote.certificates.list"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False

    def resource(self) -> str:
        return REMOTE_RESOURCE


@attrs.frozen
class RenewRemoteCertificate(Command):
    """
    Issue or renew now the certificate of ``hostname`` (``""``: every
    configured hostname), whatever its expiry; runs as ``acme`` jobs.
    """

    name: ClassVar[str] = "remote.certificates.renew"
    requires_unlocked: ClassVar[bool] = True
    hostname: str = attrs.field(default="", validator=_optional_remote_hostname)

    def leader_resource(self) -> str | None:
        return CONTROL_PLANE_RESOURCE

    def resource(self) -> str:
        return f"{REMOTE_RESOURCE}:{self.hostname}" if self.hostname else REMOTE_RESOURCE


@attrs.frozen
class RotateRemoteDeviceKey(Command):
    """
    Replace the device key the tunnels authenticate with; the tunnels
    reconnect with the new one (add its public key on the servers first).
    """

    name: ClassVar[str] = "remote.rotate_device_key"
    requires_unlocked: ClassVar[bool] = True
    timeout: ClassVar[float | None] = 60.0

    def leader_resource(self) -> str | None:
        return CONTROL_PLANE_RESOURCE

    def resource(self) -> str:
        return REMOTE_RESOURCE


@attrs.frozen
class GetAcmeChallenge(Command):
    """
    The key authorization of a pending HTTP-01 challenge, for
    ``/.well-known/acme-challenge/{token}`` (public by the protocol);
    fails with ``NotFound``.
    """

    name: ClassVar[str] = "remote.acme_challenge"
    audit: ClassVar[bool] = False
    token: str = attrs.field(validator=_bounded_text(256))

    def __attrs_post_init__(self) -> None:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        check(
            bool(self.token) and all(c in alphabet for c in self.token),
            "token must be base64url characters",
        )

    def resource(self) -> str:
        return REMOTE_RESOURCE


@attrs.frozen
class RemoteStatus(Result):
    """
    What ``remote.status`` and the remote writes answer.

    @ivar state: ``unconfigured``, ``disabled``, ``active`` (every tunnel
        up, every route served), ``degraded`` or ``error``.
    @ivar device_public_key: the OpenSSH public key the servers must
        authorise (``""`` before the first configuration).
    @ivar config: the configuration without secrets (``ConfigureRemote``
        fields; ``host_key`` shows the pinned fingerprints).
    @ivar routes: per exposed target: mode (``local``, ``leader``,
        ``unavailable``), where it goes, its hostnames and server ports.
    """

    state: str
    enabled: bool = False
    revision: int = 0
    device_public_key: str = ""
    config: dict[str, Any] = attrs.field(factory=dict)
    aliases: tuple[dict[str, Any], ...] = ()
    routes: tuple[dict[str, Any], ...] = ()
    tunnels: tuple[dict[str, Any], ...] = ()
    certificates: tuple[dict[str, Any], ...] = ()
    tls_port: int | None = None


@attrs.frozen
class RemoteAliases(Result):
    aliases: tuple[dict[str, Any], ...] = ()


@attrs.frozen
class RemoteCertificates(Result):
    """One dict per hostname: state, expiry, issuer, last error, job id."""

    certificates: tuple[dict[str, Any], ...] = ()


@attrs.frozen
class RemoteJobsStarted(Result):
    """The ids of the ``acme`` jobs that were submitted."""

    job_ids: tuple[str, ...] = ()


@attrs.frozen
class AcmeChallengeAnswer(Result):
    token: str
    key_authorization: str


@attrs.frozen
class StoreLoadRemote(Command):
    """
    The remote subsystem's record (configuration and secrets) from the
    control store's remote repository; fails with ``NotFound`` when none
    is stored.  (Not named ``*.get``: read-only roles must not reach it.)
    """

    name: ClassVar[str] = "store.remote.load"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False


@attrs.frozen
class StoreSaveRemote(Command):
    """Replace the remote record in one transaction (one revision)."""

    name: ClassVar[str] = "store.remote.save"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False
    retries: ClassVar[int] = STORE_WRITE_RETRIES
    record: dict[str, Any] = attrs.field(factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"record": REDACTED}


@attrs.frozen
class StoreClearRemote(Command):
    """Remove the remote record (idempotent)."""

    name: ClassVar[str] = "store.remote.clear"
    requires_unlocked: ClassVar[bool] = True
    audit: ClassVar[bool] = False
    retries: ClassVar[int] = STORE_WRITE_RETRIES


@attrs.frozen
class StoredRemote(Result):
    """The remote record as stored (secrets inside: never shown)."""

    record: dict[str, Any] = attrs.field(factory=dict, repr=False)
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"record": REDACTED, "updated_at": self.updated_at}
