"""
The shared event vocabulary: frozen attrs values, one class per fact.

An event says something *happened*; it is a hint, never a request (requests
are commands, see :mod:`piccolod.commands`).  Each class names its dotted
``topic``; ``retained`` topics keep their last value per ``key()`` so that a
late subscriber can ask for it first (no start-up races).  ``key()`` is also
what the ``coalesce`` overflow policy keeps the latest of.

The bus wraps every published event in an :class:`Envelope` that carries an
:class:`EventContext` (event id, time from the injected clock, source,
correlation id of the command behind it).

Every part of piccolod may import this module; it imports nothing of piccolod
but the state enums.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import attrs


class Event:
    """
    Base of every event type.

    @cvar topic: the dotted topic the event is published on.
    @cvar retained: whether the bus keeps the last value per ``key()``.
    """

    topic: ClassVar[str] = ""
    retained: ClassVar[bool] = False

    def key(self) -> str:
        """
        The identity of what this event is about, within its topic
        (a resource, a volume id); ``""`` when the topic is about one thing.
        """
        return ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the event's fields (enums as their values)."""
        fields: dict[str, Any] = attrs.asdict(
            self,  # type: ignore[arg-type]
            value_serializer=_json_value,
            recurse=True,
        )
        return fields


def _json_value(_inst: Any, _field: Any, value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


E = TypeVar("E", bound=Event)


class EventContext(NamedTuple):
    """
    Where an event came from.  An immutable named tuple rather than an attrs
    class: one is built per publication, and a tuple costs half as much.

    @ivar event_id: unique id of this publication.
    @ivar time: seconds since the epoch, from the bus's injected clock.
    @ivar source: the publishing component (``"consensus"``, ``"api"``).
    @ivar correlation_id: id of the command or request that caused it.
    """

    event_id: str
    time: float
    source: str = ""
    correlation_id: str | None = None


class Envelope(NamedTuple, Generic[E]):
    """
    What a subscriber receives: the event, its topic and its context (an
    immutable named tuple, built once per publication).
    """

    topic: str
    event: E
    context: EventContext

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "type": type(self.event).__name__,
            "key": self.event.key(),
            "event": self.event.to_json(),
            "id": self.context.event_id,
            "time": self.context.time,
            "source": self.context.source,
            "correlation_id": self.context.correlation_id,
        }


# --------------------------------------------------------------------------
# Shared enums


class LockState(enum.Enum):
    """The persistence lock machine's states."""

    UNINITIALIZED = "uninitialized"
    LOCKED = "locked"
    PREUNLOCK = "preunlock"
    UNLOCKED = "unlocked"


class Role(enum.Enum):
    """This node's role for one resource.  ``UNKNOWN`` is never a leader."""

    UNKNOWN = "unknown"
    LEADER = "leader"
    FOLLOWER = "follower"


class HealthLevel(enum.IntEnum):
    """Health levels, ordered so that ``max()`` is the worst."""

    OK = 0
    WARN = 1
    ERROR = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class ChildState(enum.Enum):
    """A supervised child's lifecycle state."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"


# --------------------------------------------------------------------------
# Persistence


@attrs.frozen
class LockStateChanged(Event):
    """The persistence lock machine moved from ``previous`` to ``state``."""

    topic: ClassVar[str] = "persistence.lock_state"
    retained: ClassVar[bool] = True
    state: LockState
    previous: LockState | None = None
    reason: str = ""


@attrs.frozen
class VolumeStateChanged(Event):
    """A volume was created, attached, detached or needs repair."""

    topic: ClassVar[str] = "persistence.volume_state"
    retained: ClassVar[bool] = True
    volume_id: str
    state: str  # "detached" | "attached-rw" | "attached-ro" | "pending" | "needs-repair"
    generation: int = 0
    detail: str = ""

    def key(self) -> str:
        return self.volume_id


@attrs.frozen
class ControlStoreCommit(Event):
    """A write transaction committed to the control store."""

    topic: ClassVar[str] = "persistence.control_commit"
    revision: int
    checksum: str
    tables: tuple[str, ...] = ()


@attrs.frozen
class CommitLogAdvanced(Event):
    """
    The cluster's replicated commit log has a new head (published by the
    consensus variant that keeps the log, from its watch of the shared
    store; retained).  Followers catch up to ``head`` with
    ``cluster.read_commits`` and ``persistence.apply_commits``.

    @ivar head: the store revision of the log's newest entry.
    @ivar log_revision: the shared store's revision of that entry.
    """

    topic: ClassVar[str] = "cluster.commit_log"
    retained: ClassVar[bool] = True
    head: int
    log_revision: int = 0


@attrs.frozen
class ControlStoreHealth(Event):
    """Result of a control store integrity check (``quick_check``)."""

    topic: ClassVar[str] = "persistence.control_health"
    retained: ClassVar[bool] = True
    ok: bool
    detail: str = ""
    revision: int | None = None


@attrs.frozen
class ExportResult(Event):
    """An export finished (successfully or not)."""

    topic: ClassVar[str] = "persistence.export_result"
    kind: str  # "control" | "full"
    ok: bool
    path: str = ""
    sha256: str = ""
    detail: str = ""


@attrs.frozen
class DeviceEvent(Event):
    """A storage or network device appeared, disappeared or changed."""

    topic: ClassVar[str] = "device"
    device: str
    action: str  # "added" | "removed" | "changed"
    detail: str = ""

    def key(self) -> str:
        return self.device


# --------------------------------------------------------------------------
# Cluster


@attrs.frozen
class LeadershipRoleChanged(Event):
    """
    This node's role for ``resource`` changed (or its leader or term did).

    @ivar term: the fencing token; it only grows per resource.
    """

    topic: ClassVar[str] = "cluster.leadership"
    retained: ClassVar[bool] = True
    resource: str
    role: Role
    previous: Role
    leader_id: str | None = None
    leader_address: str | None = None
    term: int = 0

    def key(self) -> str:
        return self.resource


# --------------------------------------------------------------------------
# Remote, audit


@attrs.frozen
class RemoteConfigChanged(Event):
    """The remote access configuration changed."""

    topic: ClassVar[str] = "remote.config"
    retained: ClassVar[bool] = True
    enabled: bool
    revision: int = 0
    changed: tuple[str, ...] = ()


@attrs.frozen
class AuditRecord(Event):
    """
    A security-relevant decision or action (policy decision, command
    outcome, login); every one has an id.
    """

    topic: ClassVar[str] = "audit"
    decision_id: str
    action: str
    subject: str
    outcome: str  # "allowed" | "denied" | "ok" | "error:<type>"
    resource: str = ""
    detail: str = ""


# --------------------------------------------------------------------------
# Kernel: supervisor, health, state machines, controllers, jobs


@attrs.frozen
class ChildStateChanged(Event):
    """A supervised child changed state."""

    topic: ClassVar[str] = "supervisor.child_state"
    retained: ClassVar[bool] = True
    child: str
    state: ChildState
    previous: ChildState
    restarts: int = 0
    error: str | None = None

    def key(self) -> str:
        return self.child


@attrs.frozen
class HealthChanged(Event):
    """A component's health level or message changed."""

    topic: ClassVar[str] = "health.component"
    retained: ClassVar[bool] = True
    component: str
    level: HealthLevel
    message: str = ""
    required: bool = False
    figures: tuple[tuple[str, float], ...] = ()

    def key(self) -> str:
        return self.component


@attrs.frozen
class StateTransition(Event):
    """A state machine of the code base made a transition."""

    topic: ClassVar[str] = "fsm.transition"
    machine: str
    previous: str
    state: str
    trigger: str

    def key(self) -> str:
        return self.machine


@attrs.frozen
class ReconcileResult(Event):
    """A controller reconciled a key (``ok`` or with an error)."""

    topic: ClassVar[str] = "controller.reconciled"
    controller: str
    reconcile_key: str
    ok: bool
    error: str | None = None
    requeue_after: float | None = None

    def key(self) -> str:
        return f"{self.controller}/{self.reconcile_key}"


@attrs.frozen
class JobProgress(Event):
    """A job changed state or reported progress (0.0 to 1.0)."""

    topic: ClassVar[str] = "jobs.progress"
    job_id: str
    job_class: str
    state: str
    progress: float = 0.0
    message: str = ""

    def key(self) -> str:
        return self.job_id


@attrs.frozen
class JobFinished(Event):
    """A job reached a final state (succeeded, failed, cancelled)."""

    topic: ClassVar[str] = "jobs.finished"
    job_id: str
    job_class: str
    state: str
    attempts: int = 1
    error: str | None = None
    duration: float = 0.0


@attrs.frozen
class Telemetry(Event):
    """A component's key figures (gauges) at one sampling."""

    topic: ClassVar[str] = "telemetry.sample"
    retained: ClassVar[bool] = True
    component: str
    figures: tuple[tuple[str, float], ...] = ()

    def key(self) -> str:
        return self.component


@attrs.frozen
class AppStateChanged(Event):
    """An app's observed state changed."""

    topic: ClassVar[str] = "apps.state"
    retained: ClassVar[bool] = True
    app: str
    state: str
    generation: int = 0
    observed_generation: int = 0
    detail: str = ""

    def key(self) -> str:
        return self.app


# --------------------------------------------------------------------------
# Services, mDNS


@attrs.frozen
class RoutePublished(Event):
    """
    An app listener (or the portal) is published on a local port, or
    withdrawn (``withdrawn=True``).  The mDNS responder advertises these as
    DNS-SD services; the remote manager routes to them.
    """

    topic: ClassVar[str] = "services.route"
    retained: ClassVar[bool] = True
    app: str
    listener: str
    port: int
    protocol: str = "http"  # "http" | "websocket" | "raw"
    service_type: str = "_http._tcp"
    txt: tuple[tuple[str, str], ...] = ()
    withdrawn: bool = False

    def key(self) -> str:
        return f"{self.app}/{self.listener}"


@attrs.frozen
class MdnsNameChanged(Event):
    """The mDNS responder claimed a (possibly renamed) host or service name."""

    topic: ClassVar[str] = "mdns.name"
    retained: ClassVar[bool] = True
    kind: str  # "host" | "service"
    requested: str
    claimed: str
    reason: str = ""

    def key(self) -> str:
        return f"{self.kind}:{self.requested}"


# --------------------------------------------------------------------------
# Remote access


@attrs.frozen
class RemoteRouteChanged(Event):
    """
    A remote route changed: where a target (``portal`` or
    ``<app>/<listener>``) is served from (``mode``: ``local``, ``leader``
    or ``unavailable``), its hostnames and its port on the tunnel servers;
    ``withdrawn`` when it is no longer exposed (or storage was locked).
    """

    topic: ClassVar[str] = "remote.route"
    retained: ClassVar[bool] = True
    target: str
    mode: str
    host: str = ""
    port: int = 0
    hostnames: tuple[str, ...] = ()
    remote_ports: tuple[tuple[str, int], ...] = ()
    reason: str = ""
    withdrawn: bool = False

    def key(self) -> str:
        return self.target


@attrs.frozen
class RemoteCertificateChanged(Event):
    """
    A hostname's certificate was issued or renewed (``ok``), an issuance
    attempt failed (``error``, with the reason; retried with backoff) or
    started (``pending``).
    """

    topic: ClassVar[str] = "remote.certificate"
    retained: ClassVar[bool] = True
    hostname: str
    state: str
    not_after: float | None = None
    error: str = ""
    attempt: int = 0

    def key(self) -> str:
        return self.hostname


#: Every event type by topic, for the API's topic listing and for decoding.
TOPICS: dict[str, type[Event]] = {
    cls.topic: cls
    for cls in (
        LockStateChanged,
        VolumeStateChanged,
        ControlStoreCommit,
        CommitLogAdvanced,
        ControlStoreHealth,
        ExportResult,
        DeviceEvent,
        LeadershipRoleChanged,
        RemoteConfigChanged,
        AuditRecord,
        ChildStateChanged,
        HealthChanged,
        StateTransition,
        ReconcileResult,
        JobProgress,
        JobFinished,
        Telemetry,
        AppStateChanged,
        RoutePublished,
        MdnsNameChanged,
        RemoteRouteChanged,
        RemoteCertificateChanged,
    )
}
