"""
Every declared interface of piccolod, the value types they speak, and the
typed errors they document (re-exported from :mod:`piccolod.errors`).

Interface methods have no ``self`` and are fully annotated (mypy-zope reads
them as base classes).  Each docstring says what a returned Deferred fires
with and which typed errors it fails with.  Implementers are listed in
``tests/unit/test_interfaces.py``, which checks them with ``verifyObject``
and compares parameter names.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from piccolod.commands import Command, CommandContext, Result
from piccolod.errors import (
    CommandTimeout,
    ConfigError,
    Conflict,
    DuplicateRegistration,
    IllegalTransition,
    InvalidCommand,
    Locked,
    NotFound,
    NotLeader,
    NotReady,
    PiccolodError,
    PolicyDenied,
    QuotaExceeded,
    RateLimited,
    StaleTerm,
    SubsystemFailed,
    TooLarge,
    TransientError,
    Unauthorized,
    Unavailable,
    UnknownCommand,
)
from piccolod.events import ChildState, Envelope, Event, HealthLevel, Role

if TYPE_CHECKING:
    from twisted.application.service import IService

#: What a handler, subscriber or reconciler may return: a plain value, a
#: Deferred or a coroutine.  The kernel normalises all three.
MaybeAsync = Any | Deferred[Any] | Awaitable[Any]


# ==========================================================================
# Event bus


class Overflow(enum.Enum):
    """What a subscriber's full queue does with a new event."""

    DROP_OLDEST = "drop-oldest"  #: evict the oldest queued event
    DROP_NEWEST = "drop-newest"  #: refuse the new event
    COALESCE = "coalesce"  #: keep only the latest event per ``event.key()``


@attrs.frozen
class SubscriptionStats:
    """Counters of one subscription (all monotonic but ``queued``)."""

    name: str
    pattern: str
    queued: int
    max_queue: int
    overflow: Overflow
    delivered: int
    dropped: int
    filtered: int
    failed: int
    coalesced: int


@attrs.frozen
class TopicStats:
    """Counters of one topic."""

    topic: str
    published: int
    delivered: int
    dropped: int
    failed: int


class ISubscription(Interface):
    """A live subscription to a topic pattern."""

    pattern: str = Attribute("The topic pattern subscribed to.")
    name: str = Attribute("A name for stats and logs (defaults to the handler's).")
    active: bool = Attribute("False once cancelled.")

    def cancel() -> Deferred[None]:
        """
        Stop receiving events; idempotent.  Queued events are discarded
        (counted as dropped).  Fires with ``None`` once any in-flight
        delivery has finished.
        """

    def stats() -> SubscriptionStats:
        """This subscription's counters."""


Handler = Callable[[Envelope[Any]], MaybeAsync]
EventFilter = Callable[[Envelope[Any]], bool]


class IEventBus(Interface):
    """
    Topic-based publish/subscribe for facts that happened.

    Topic patterns: an exact dotted topic (``persistence.lock_state``),
    ``*`` for exactly one segment (``persistence.*``), and ``#`` as the last
    segment for zero or more segments (``jobs.#``; ``#`` alone is every topic).

    Delivery is asynchronous (never re-entrant into ``publish``), FIFO per
    subscriber, one in-flight delivery per subscriber (a handler returning a
    Deferred or coroutine holds the next event back until it fires), and
    isolated: a failing or slow subscriber never delays or breaks another.
    Every drop and failure is counted.
    """

    def publish(
        event: Event,
        source: str = "",
        correlation_id: str | None = None,
        topic: str | None = None,
    ) -> Envelope[Any]:
        """
        Publish ``event`` on ``topic`` (default ``type(event).topic``) and
        return its envelope.  Never blocks and never raises for subscriber
        faults.  Raises ``InvalidCommand`` for a malformed topic.
        """

    def subscribe(
        pattern: str,
        handler: Handler,
        filter: EventFilter | None = None,
        max_queue: int = 1000,
        overflow: Overflow = Overflow.DROP_OLDEST,
        replay_retained: bool = False,
        name: str | None = None,
    ) -> ISubscription:
        """
        Subscribe ``handler`` to ``pattern``.  ``filter`` runs before an
        event is queued (rejected events are only counted).  With
        ``replay_retained`` the last retained events matching the pattern are
        queued first, oldest first.  Raises ``InvalidCommand`` for a bad
        pattern or queue size.
        """

    def has_subscribers(topic: str) -> bool:
        """
        Whether an event published on ``topic`` now would reach a
        subscriber.  Publishers of costly, non-retained events (audit
        records) may skip building them when nobody listens.  Raises
        ``InvalidCommand`` for a malformed topic.
        """

    def retained(pattern: str) -> Sequence[Envelope[Any]]:
        """The retained envelopes whose topic matches ``pattern``."""

    def last(topic: str, key: str = "") -> Envelope[Any] | None:
        """The retained envelope of ``topic`` for ``key``, or ``None``."""

    def stats() -> Mapping[str, Any]:
        """
        ``{"topics": [TopicStats...], "subscriptions": [SubscriptionStats...],
        "published": int, "delivered": int, "dropped": int, "failed": int}``.
        """

    def drain() -> Deferred[None]:
        """Fires once every queue is empty and no delivery is in flight."""


# ==========================================================================
# Leadership


@attrs.frozen
class LeadershipState:
    """
    This node's view of one resource.

    @ivar term: the fencing token; only grows per resource.
    @ivar leader_address: the leader's API base URL, for leader hints.
    """

    resource: str
    role: Role = Role.UNKNOWN
    leader_id: str | None = None
    leader_address: str | None = None
    term: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "role": self.role.value,
            "leader_id": self.leader_id,
            "leader_address": self.leader_address,
            "term": self.term,
        }


class ILeadershipRegistry(Interface):
    """
    Who leads each resource (``control-plane``, ``app:<name>``).  Only the
    consensus subsystem writes it; every change publishes a retained
    ``cluster.leadership`` event.  ``unknown`` is never treated as leader.
    """

    node_id: str = Attribute("This node's id.")

    def role(resource: str) -> Role:
        """This node's role for ``resource`` (``UNKNOWN`` if never set)."""

    def state(resource: str) -> LeadershipState:
        """The full state of ``resource``."""

    def states() -> Sequence[LeadershipState]:
        """Every known resource, sorted by name."""

    def is_leader(resource: str) -> bool:
        """True only when the role is ``LEADER``."""

    def update(
        resource: str,
        role: Role,
        term: int,
        leader_id: str | None = None,
        leader_address: str | None = None,
    ) -> LeadershipState:
        """
        Record a new role; publishes ``LeadershipRoleChanged`` when anything
        changed.  Raises ``StaleTerm`` when ``term`` is below the current
        term of the resource (a leader role needs a strictly greater term
        than any earlier leadership of another node).
        """

    def when_leader(resource: str) -> Deferred[LeadershipState]:
        """
        Fires with the state once this node leads ``resource`` (at once if
        it already does).  Cancellable: cancelling fails it with
        ``CancelledError`` and forgets the waiter.
        """

    def require_leader(resource: str) -> LeadershipState:
        """Return the state, or raise ``NotLeader`` with the leader hint."""


class IConsensus(Interface):
    """
    The consensus subsystem: the only writer of the leadership registry.
    """

    node_id: str = Attribute("This node's id.")

    def track(resource: str) -> Deferred[LeadershipState]:
        """
        Start campaigning for (and observing) ``resource``.  Fires with the
        state once the role is known (leader or follower).  Fails with
        ``Unavailable`` when the consensus backend cannot be reached.
        """

    def release(resource: str) -> Deferred[None]:
        """Step down from / stop tracking ``resource``; idempotent."""

    def tracked() -> Sequence[str]:
        """The resources being tracked."""


# ==========================================================================
# Commands


class ICommandHandler(Interface):
    """Something that executes one command type."""

    def __call__(command: Command, context: CommandContext) -> MaybeAsync:
        """
        Execute ``command``.  May return a ``Result``, a Deferred or a
        coroutine firing with one, or raise / fail with a typed error.
        """


Middleware = Callable[
    [Command, CommandContext, Callable[[Command, CommandContext], Deferred[Any]]],
    Deferred[Any],
]


class ICommandDispatcher(Interface):
    """
    Routes typed commands to their one registered handler through the
    middleware chain (outermost first): audit → policy → idempotency → lock
    gate → leader gate → timeout → retry.
    """

    def register(
        command_type: type[Command], handler: ICommandHandler | Callable[..., Any]
    ) -> None:
        """
        Register ``handler`` for ``command_type.name``.  Raises
        ``DuplicateRegistration`` if the name already has a handler.
        """

    def unregister(command_type: type[Command]) -> None:
        """Remove the handler for ``command_type.name``; idempotent."""

    def dispatch(command: Command, context: CommandContext | None = None) -> Deferred[Result]:
        """
        Run ``command``.  Fires with its ``Result``.  Fails with
        ``UnknownCommand``, ``InvalidCommand``, ``PolicyDenied``, ``Locked``,
        ``NotLeader``, ``CommandTimeout`` or the handler's typed error.
        """

    def names() -> Sequence[str]:
        """The registered command names, sorted."""

    def add_middleware(name: str, middleware: Middleware) -> None:
        """
        Install a middleware into its named slot of the chain (``audit``,
        ``policy``, ``idempotency``, ``lock``, ``leader``, ``timeout``,
        ``retry``, or ``metrics``).  Raises ``DuplicateRegistration`` if the
        slot is taken.
        """


# ==========================================================================
# Supervision and health


class RestartPolicy(enum.Enum):
    """When a child is restarted after it exits (Erlang/OTP semantics)."""

    PERMANENT = "permanent"  #: always
    TRANSIENT = "transient"  #: only after an abnormal exit (a failure)
    TEMPORARY = "temporary"  #: never


@attrs.frozen
class Backoff:
    """Exponential backoff with jitter: ``initial * factor**n``, capped."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2  #: fraction of the delay, applied ±

    def delay(self, attempt: int, rand: Callable[[], float]) -> float:
        """The delay before retry number ``attempt`` (0-based)."""
        try:
            grown = self.initial * (self.factor**attempt)
        except OverflowError:  # a child crashing for days reaches 2.0**1024
            grown = math.inf
        base = min(self.maximum, grown)
        spread = base * self.jitter
        return max(0.0, base - spread + 2 * spread * rand())


@attrs.frozen
class ChildSpec:
    """
    How the supervisor runs one child.

    @ivar factory: builds a fresh ``IService`` for each (re)start, so that
        two instances of a child never exist.
    @ivar requires: names of children that must be running first; when one
        of them fails, this child is stopped too.
    @ivar intensity: at most this many restarts within ``period`` seconds;
        one more marks the child ``failed``.
    @ivar stable_after: seconds of uninterrupted running after which the
        backoff resets.
    @ivar health_check: called every ``health_interval`` seconds; a falsy
        result, an exception or a timeout is a miss; ``max_misses``
        consecutive misses restart the child.
    """

    name: str
    factory: Callable[[], IService]
    requires: tuple[str, ...] = ()
    restart: RestartPolicy = RestartPolicy.PERMANENT
    start_timeout: float = 30.0
    stop_timeout: float = 10.0
    backoff: Backoff = Backoff()
    intensity: int = 5
    period: float = 60.0
    stable_after: float = 30.0
    health_check: Callable[[], MaybeAsync] | None = None
    health_interval: float = 10.0
    health_timeout: float = 5.0
    max_misses: int = 3
    required: bool = True  #: whether readiness needs this child running


@attrs.frozen
class ChildStatus:
    """What the supervisor knows of one child (served by the API)."""

    name: str
    state: ChildState
    restarts: int
    last_error: str | None
    since: float
    requires: tuple[str, ...]
    restart: RestartPolicy

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "since": self.since,
            "requires": list(self.requires),
            "restart": self.restart.value,
        }


class ISupervisedService(Interface):
    """
    Optional extras a supervised ``IService`` may provide.  Without them a
    child is ready as soon as ``startService`` returns (or its Deferred
    fires) and never exits on its own.
    """

    def when_ready() -> Deferred[None]:
        """Fires once the service can do its job; fails if it cannot start."""

    def when_exited() -> Deferred[None]:
        """
        Fires with ``None`` when the service ends normally on its own, fails
        with the reason when it crashes.  The supervisor applies the restart
        policy to either.
        """


class ISupervisor(Interface):
    """
    The root of the service tree: starts children in dependency order
    (waiting for readiness), stops them in reverse with per-child timeouts,
    and restarts them by policy with backoff and intensity limits.
    """

    def add_child(spec: ChildSpec) -> None:
        """
        Add a child before or after start.  Raises ``DuplicateRegistration``
        for a taken name and ``ConfigError`` for an unknown requirement or a
        cycle.
        """

    def children() -> Sequence[ChildStatus]:
        """Every child's status, in start order."""

    def child(name: str) -> ChildStatus:
        """One child's status; raises ``NotFound``."""

    def service(name: str) -> IService | None:
        """The running instance of a child, or ``None``."""

    def restart_child(name: str) -> Deferred[ChildStatus]:
        """
        Stop and start one child now (a ``failed`` one is reset and its
        dependents started again).  Fails with ``NotFound``.
        """

    def child_failed(name: str, reason: str) -> None:
        """Report that a running child has failed; the policy applies."""

    def when_ready() -> Deferred[None]:
        """
        Fires once every *required* child is running (or finished normally);
        fails with ``NotReady`` if the supervisor stops first.
        """


@attrs.frozen
class ComponentHealth:
    """One component's health."""

    component: str
    level: HealthLevel
    message: str
    required: bool
    since: float
    figures: tuple[tuple[str, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "level": self.level.label,
            "message": self.message,
            "required": self.required,
            "since": self.since,
            "figures": dict(self.figures),
        }


class IHealth(Interface):
    """
    Aggregates component health: overall is the worst level; readiness needs
    every required component at ``ok``.  Every change publishes a retained
    ``health.component`` event.
    """

    def report(
        component: str,
        level: HealthLevel,
        message: str = "",
        figures: Mapping[str, float] | None = None,
    ) -> None:
        """Record the component's current level and message."""

    def require(component: str, required: bool = True) -> None:
        """Declare whether readiness needs ``component``."""

    def remove(component: str) -> None:
        """Forget a component; idempotent."""

    def component(name: str) -> ComponentHealth:
        """One component's health; raises ``NotFound``."""

    def components() -> Sequence[ComponentHealth]:
        """Every component, sorted by name."""

    def overall() -> HealthLevel:
        """The worst level of any component (``OK`` when there are none)."""

    def ready() -> bool:
        """True when every required component is ``OK``."""

    def not_ready() -> Sequence[ComponentHealth]:
        """The required components that are not ``OK``."""


# ==========================================================================
# Controllers


class IReconciler(Interface):
    """The domain logic of a level-triggered controller."""

    def reconcile(key: str) -> MaybeAsync:
        """
        Bring ``key`` toward its desired state.  Return ``None`` when done,
        or a number of seconds to be called again after; raise to be retried
        with per-key backoff (a ``PiccolodError`` that is not retryable and
        is marked terminal is not retried).
        """

    def keys() -> MaybeAsync:
        """Every key that exists (desired or observed), for periodic resync."""


class IController(Interface):
    """A keyed, deduplicated work queue driving an ``IReconciler``."""

    name: str = Attribute("The controller's name.")

    def enqueue(key: str, after: float = 0.0) -> None:
        """
        Ask for ``key`` to be reconciled (after ``after`` seconds).  A key
        already queued is not queued twice; a key being reconciled is
        reconciled once more after the current run.
        """

    def resync() -> Deferred[None]:
        """Enqueue every key the reconciler lists."""

    def when_idle() -> Deferred[None]:
        """Fires once the queue is empty and nothing is running."""


# ==========================================================================
# Plugins


class ISubsystemPlugin(Interface):
    """
    One variant of one subsystem slot, discovered with
    ``twisted.plugin.getPlugins``.
    """

    slot: str = Attribute("The slot name, e.g. ``consensus``.")
    variant: str = Attribute("The variant name, e.g. ``single-node``.")
    description: str = Attribute("One line for ``--help`` and error messages.")
    provides: Sequence[type[Interface]] = Attribute(
        "Interfaces the built service provides besides IService."
    )
    requires: Sequence[type[Interface]] = Attribute(
        "Interfaces it needs from other slots (resolved into its context)."
    )
    config_keys: Mapping[str, Any] = Attribute(
        "The keys its ``[subsystems.<slot>]`` section accepts, with defaults."
    )

    def build(context: Any) -> IService:
        """
        Build the service from a ``SubsystemContext``.  Raises
        ``ConfigError`` for bad section values.
        """


# ==========================================================================
# Jobs

#: Characters of a job class name (``export``, ``quick-check``, ``wal.checkpoint``).
_JOB_CLASS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")


def _frozen_labels(value: Any) -> Any:
    from types import MappingProxyType

    if isinstance(value, Mapping):
        return MappingProxyType(dict(value))
    return value  # rejected with the other errors in JobSpec.__attrs_post_init__


def _positive_number(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value > 0
    )


class JobState(enum.Enum):
    """
    A job's lifecycle state.  ``queued`` covers both waiting for a slot and
    waiting for a retry (``retry_at`` set); the last three are final.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """Whether the job has ended (no transition leaves this state)."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class IJobControl(Interface):
    """What a job body receives, one per attempt."""

    job_id: str = Attribute("The job's id (the same for every attempt).")
    attempt: int = Attribute("This attempt's number, from 1.")
    metadata: Mapping[str, str] = Attribute("The spec's metadata.")
    cancelled: bool = Attribute(
        "True once this attempt was cancelled or timed out; a body doing "
        "synchronous chunks of work checks it between chunks."
    )

    def report(progress: float, message: str = "") -> None:
        """
        Record progress (clamped to 0..1; NaN keeps the previous value) and
        publish it on ``jobs.progress``.  Ignored once the attempt has ended
        or been cancelled.
        """

    def raise_if_cancelled() -> None:
        """Raise ``CancelledError`` if this attempt was cancelled."""


@attrs.frozen
class JobSpec:
    """
    What to run as a job, and how.

    @ivar job_class: the concurrency class (``export``, ``rebuild``,
        ``telemetry``): 1 to 64 of ``a-z0-9_.-``, starting with a letter or
        digit.
    @ivar fn: the body, called with an ``IJobControl`` once per attempt; a
        plain function, a Deferred-returning one or ``async def``.
    @ivar priority: higher starts first.
    @ivar timeout: seconds per attempt, or ``None`` for no limit.
    @ivar retries: how many times a failed attempt is retried.
    @ivar backoff: the delay before each retry (jittered).
    @ivar metadata: free-form string labels, kept across retries and shown
        by the API; ``correlation_id`` tags the job's events.
    @ivar name: a human-readable name (defaults to ``job_class``).

    Raises ``InvalidCommand`` listing every bad field.
    """

    job_class: str
    fn: Callable[[IJobControl], MaybeAsync]
    priority: int = 0
    timeout: float | None = None
    retries: int = 0
    backoff: Backoff = attrs.field(factory=Backoff)
    metadata: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_labels)
    name: str = ""

    def __attrs_post_init__(self) -> None:
        errors: list[str] = []
        job_class: object = self.job_class
        if (
            not isinstance(job_class, str)
            or not 1 <= len(job_class) <= 64
            or not _JOB_CLASS_CHARS.issuperset(job_class)
            or job_class[0] in "_.-"
        ):
            errors.append(f"job_class {job_class!r} must be 1-64 of a-z0-9_.- (not first: _.-)")
        if not callable(self.fn):
            errors.append(f"fn {self.fn!r} is not callable")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            errors.append(f"priority {self.priority!r} must be an int")
        if self.timeout is not None and not _positive_number(self.timeout):
            errors.append(f"timeout {self.timeout!r} must be a positive number or None")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            errors.append(f"retries {self.retries!r} must be an int >= 0")
        if not isinstance(self.backoff, Backoff):
            errors.append(f"backoff {self.backoff!r} must be a Backoff")
        if not isinstance(self.metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()
        ):
            errors.append(f"metadata {self.metadata!r} must map str to str")
        if not isinstance(self.name, str):
            errors.append(f"name {self.name!r} must be a str")
        if errors:
            raise InvalidCommand("invalid job spec", errors=errors)


class IJobHandle(Interface):
    """One submitted job, as seen by whoever submitted or looked it up."""

    id: str = Attribute("The job's unique id (kept across retries).")
    name: str = Attribute("A human-readable name (defaults to the job class).")
    job_class: str = Attribute("The concurrency class (``export``, ``rebuild``...).")
    priority: int = Attribute("Higher runs first; kept across retries.")
    metadata: Mapping[str, str] = Attribute("Free-form labels; kept across retries.")
    state: JobState = Attribute("The current ``JobState``.")
    progress: float = Attribute("Progress of the current attempt, 0.0 to 1.0.")
    message: str = Attribute("The last progress message.")
    attempts: int = Attribute("How many attempts have started.")
    retry_at: float | None = Attribute("When a queued retry becomes ready, else None.")

    def result() -> Deferred[Any]:
        """
        A new Deferred per call, firing with the job's return value once it
        succeeds; fails with ``CancelledError`` when the job is cancelled,
        ``CommandTimeout`` when its last attempt timed out, or the body's
        own error.  Cancelling the returned Deferred only stops waiting; it
        does not cancel the job.
        """

    def cancel() -> Deferred[JobState]:
        """
        Cancel the job: a queued one ends ``cancelled`` at once, a running
        one has its Deferred cancelled and ends ``cancelled`` when its body
        stops.  Fires with the job's final state (which is not
        ``cancelled`` if it had already ended); never fails.
        """

    def to_json() -> dict[str, Any]:
        """A JSON-ready summary for the API."""


class IJobRunner(Interface):
    """
    Runs jobs by priority within per-class concurrency limits, with
    timeouts, retries with jittered backoff, cancellation, progress events
    (``jobs.progress``, ``jobs.finished``) and a bounded history.
    """

    def submit(spec: JobSpec) -> IJobHandle:
        """
        Queue a job; it starts on a later reactor turn (jobs submitted
        before ``startService`` wait for it).  Raises ``NotReady`` once the
        runner has been stopped, until it is started again.
        """

    def every(
        interval: float,
        spec_factory: Callable[[], JobSpec | None],
        now: bool = False,
    ) -> IService:
        """
        Submit ``spec_factory()`` every ``interval`` seconds while the
        runner runs (first at once with ``now``), skipping a tick while the
        previous job is still queued or running, or when the factory
        returns ``None``.  ``stopService()`` on the returned service stops
        it.  Raises ``InvalidCommand`` for a non-positive interval.
        """

    def get(job_id: str) -> IJobHandle:
        """A queued, running or remembered job; raises ``NotFound``."""

    def jobs(state: JobState | str | None = None) -> Sequence[IJobHandle]:
        """Running, then queued (in dispatch order), then finished (newest first)."""

    def cancel(job_id: str) -> Deferred[JobState]:
        """``get(job_id).cancel()``; raises ``NotFound``."""

    def stats() -> Mapping[str, Any]:
        """Queue depths, and per class: counts by final state and durations."""


# ==========================================================================
# Volumes and devices


class IVolumeAdapter(Interface):
    """
    One kind of volume storage (``directory`` for development,
    ``gocryptfs`` for real), laid out under the daemon's state dir:
    ``volumes/ciphertext/<id>`` rests on disk, ``volumes/mounts/<id>`` is
    the plaintext view while mounted.  Volume ids match
    ``^[a-z0-9][a-z0-9-]{0,62}$``; any other fails with ``InvalidCommand``
    (``InvalidVolumeId``).  Passphrases are 1 to 1024 bytes without
    newline, CR or NUL (``InvalidCommand`` otherwise); they are never
    logged, written to a file or put on a command line.  Typed errors are
    those of ``piccolod.persistence.volumes``.  Implementations are
    ``IService``s: stopping one unmounts what it mounted.
    """

    kind: str = Attribute("The adapter's name (``directory``, ``gocryptfs``).")
    encrypted: bool = Attribute("Whether what rests on disk is encrypted.")

    def create(volume_id: str, passphrase: bytes) -> Deferred[None]:
        """
        Initialise the volume's ciphertext directory.  Idempotent: a volume
        that exists is left as is once ``passphrase`` is checked against it.
        Fails with ``WrongPassphrase`` when it does not open the existing
        volume, ``VolumeCorrupt`` when the directory holds something else.
        """

    def mount(volume_id: str, passphrase: bytes, read_only: bool) -> Deferred[str]:
        """
        Mount the volume (read-only if asked) and fire with its mount path.
        Idempotent in the same mode; a volume mounted in the other mode is
        remounted.  Fails with ``VolumeNotFound`` (never created),
        ``WrongPassphrase``, ``MountTimeout`` or ``VolumeError``.
        """

    def unmount(volume_id: str) -> Deferred[None]:
        """
        Unmount the volume; idempotent (a volume not mounted is fine).
        Fails with ``VolumeBusy`` when it is in use (it stays mounted).
        """

    def is_mounted(volume_id: str) -> bool:
        """Whether this adapter has the volume mounted and healthy now."""

    def mounted() -> Sequence[str]:
        """The ids of the volumes this adapter has mounted, sorted."""

    def watch_lost(observer: Callable[[str, str], None]) -> Callable[[], None]:
        """
        Call ``observer(volume_id, reason)`` whenever a mount is lost
        without ``unmount()`` (the mount process died).  Returns a function
        that stops the watching (idempotent).
        """


class IDeviceManager(Interface):
    """
    The block devices of this machine, rescanned periodically; appearing,
    disappearing and changing disks are published as ``device`` events.
    """

    def disks() -> Sequence[Mapping[str, Any]]:
        """The disks of the last scan (JSON-ready dicts), sorted by name."""

    def scan() -> Deferred[Sequence[Mapping[str, Any]]]:
        """
        Rescan now, publish what changed and fire with :meth:`disks`.
        Fails with ``Unavailable`` when the device list cannot be read.
        """


# ==========================================================================
# Persistence: the lock state, the control store and its repositories


@attrs.frozen
class AuthState:
    """
    The admin's credentials record.

    @ivar sessions_epoch: bumped to invalidate every session at once.
    """

    initialized: bool = False
    password_hash: str = attrs.field(default="", repr=False)
    sessions_epoch: int = 0
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Without the password hash."""
        return {
            "initialized": self.initialized,
            "sessions_epoch": self.sessions_epoch,
            "updated_at": self.updated_at,
        }


@attrs.frozen
class AppRecord:
    """
    An app's desired state as stored.

    @ivar spec: the app spec as a JSON object.
    @ivar generation: bumped by the store whenever ``spec`` or ``enabled``
        changes (a put of identical content is not a change).
    """

    name: str
    spec: Mapping[str, Any] = attrs.field(factory=dict)
    enabled: bool = True
    generation: int = 0
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": dict(self.spec),
            "enabled": self.enabled,
            "generation": self.generation,
            "updated_at": self.updated_at,
        }


@attrs.frozen
class RemoteConfigRecord:
    """The remote-access configuration (a JSON object) as stored."""

    config: Mapping[str, Any] = attrs.field(factory=dict)
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"config": dict(self.config), "updated_at": self.updated_at}


@attrs.frozen
class AuditEntry:
    """One audit trail row; ``id`` and ``time`` are set by the store."""

    action: str
    subject: str
    outcome: str
    resource: str = ""
    detail: str = ""
    decision_id: str = ""
    time: float = 0.0
    id: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class ControlStoreInfo:
    """
    What the control store is (served by ``persistence.status``).

    @ivar revision: the last committed revision (0: none yet).
    @ivar checksum: sha256 chain value of that revision.
    """

    open: bool
    read_only: bool = False
    revision: int = 0
    checksum: str = ""
    schema_version: int = 0
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class IAuthRepository(Interface):
    """The admin's credentials record.  All calls fail with ``Locked`` while locked."""

    def get() -> Deferred[AuthState]:
        """Fires with the record (``AuthState()`` before the first save)."""

    def save(state: AuthState) -> Deferred[AuthState]:
        """
        Store the record in one transaction (one revision); fires with it as
        stored (``updated_at`` set).  Fails with ``NotLeader`` on a follower.
        """


class IAppsRepository(Interface):
    """Apps' desired state.  All calls fail with ``Locked`` while locked."""

    def get(name: str) -> Deferred[AppRecord]:
        """Fires with the app; fails with ``NotFound``."""

    def list_all() -> Deferred[Sequence[AppRecord]]:
        """Fires with every app, sorted by name."""

    def put(record: AppRecord) -> Deferred[AppRecord]:
        """
        Create or replace an app; fires with the stored record (generation
        bumped when the spec or ``enabled`` changed).  Fails with
        ``InvalidCommand`` for a bad name or a spec that is not a JSON
        object, ``NotLeader`` on a follower.
        """

    def delete(name: str) -> Deferred[None]:
        """Remove an app; fails with ``NotFound`` or ``NotLeader``."""


class IRemoteRepository(Interface):
    """The remote-access configuration.  All calls fail with ``Locked`` while locked."""

    def get() -> Deferred[RemoteConfigRecord]:
        """Fires with the configuration; fails with ``NotFound`` when none is stored."""

    def save(config: Mapping[str, Any]) -> Deferred[RemoteConfigRecord]:
        """Store the configuration (a JSON object); fails with ``NotLeader``."""

    def clear() -> Deferred[None]:
        """Remove the configuration; idempotent; fails with ``NotLeader``."""


class IAuditRepository(Interface):
    """The durable audit trail.  All calls fail with ``Locked`` while locked."""

    def append(entry: AuditEntry) -> Deferred[AuditEntry]:
        """Fires with the entry as stored (``id`` and ``time`` set)."""

    def recent(limit: int = 100) -> Deferred[Sequence[AuditEntry]]:
        """Fires with at most ``limit`` entries, newest first."""

    def prune(keep: int) -> Deferred[int]:
        """Keep the newest ``keep`` entries; fires with how many were removed."""


class ISettingsRepository(Interface):
    """Named JSON settings.  All calls fail with ``Locked`` while locked."""

    def get(key: str) -> Deferred[Any]:
        """Fires with the value; fails with ``NotFound``."""

    def items() -> Deferred[Mapping[str, Any]]:
        """Fires with every setting."""

    def set(key: str, value: Any) -> Deferred[None]:
        """Store a JSON value; fails with ``InvalidCommand`` or ``NotLeader``."""

    def delete(key: str) -> Deferred[None]:
        """Remove a setting; fails with ``NotFound`` or ``NotLeader``."""


class IControlTransaction(Interface):
    """
    What :meth:`IControlStore.transaction`'s function receives: the
    synchronous twins of the repositories (same method names, plain return
    values, typed errors raised), all inside one SQLite transaction.
    """

    auth: Any = Attribute("Synchronous IAuthRepository methods.")
    apps: Any = Attribute("Synchronous IAppsRepository methods.")
    remote: Any = Attribute("Synchronous IRemoteRepository methods.")
    audit: Any = Attribute("Synchronous IAuditRepository methods.")
    settings: Any = Attribute("Synchronous ISettingsRepository methods.")
    now: float = Attribute("The clock's time when the transaction was submitted.")


class IControlStore(Interface):
    """
    The encrypted control-plane store: SQLite through SQLCipher, keyed by
    the data key.  Every call runs on the store's own thread, never on the
    reactor.  Every write transaction that changes something commits one
    new revision with a sha256 chain checksum and publishes
    ``ControlStoreCommit``.  While storage is locked every call fails with
    ``Locked``; while this node is not the ``control-plane`` leader writes
    fail with ``NotLeader`` (with the leader hint) and reads work.
    """

    auth: IAuthRepository = Attribute("The admin's credentials.")
    apps: IAppsRepository = Attribute("Apps' desired state.")
    remote: IRemoteRepository = Attribute("Remote-access configuration.")
    audit: IAuditRepository = Attribute("The audit trail.")
    settings: ISettingsRepository = Attribute("Named JSON settings.")

    def info() -> ControlStoreInfo:
        """The store's current revision, checksum and mode."""

    def transaction(fn: Callable[[IControlTransaction], Any]) -> Deferred[Any]:
        """
        Run ``fn`` on the store's thread inside one write transaction: all
        its changes commit together as one revision, or none do if it
        raises.  Fires with ``fn``'s return value.  Fails with ``Locked``,
        ``NotLeader`` or ``fn``'s error.
        """


class IPersistence(Interface):
    """
    The persistence subsystem: the one lock state machine
    (``uninitialized → locked → preunlock → unlocked``, ``unlocked →
    locked``; every transition published as a retained ``LockStateChanged``)
    and the per-volume secrets it hands to the volume manager.
    """

    state: Any = Attribute("The current ``LockState``.")

    def secret_for(volume_id: str) -> Deferred[bytes]:
        """
        Fires with the passphrase of ``volume_id`` (created on first use).
        Fails with ``Locked`` while locked and ``InvalidCommand`` for a bad id.
        """

    def when_unlocked() -> Deferred[None]:
        """Fires once storage is unlocked (at once if it is); cancellable."""



# ==========================================================================
# mDNS


@attrs.frozen
class AdvertisedName:
    """A name the responder holds or is trying to (host or service)."""

    kind: str  # "host" | "service"
    key: str  # "host", "portal" or "<app>/<listener>"
    requested: str
    name: str
    state: str  # "probing" | "announcing" | "claimed"
    service_type: str = ""
    port: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class IMdnsResponder(Interface):
    """
    The mDNS subsystem as seen by the API: which names it holds.
    """

    running: int = Attribute("Whether the service runs (IService's flag).")

    def host_name() -> str:
        """The claimed host name (``piccolo.local``), ``""`` while none is."""

    def advertised() -> Sequence[AdvertisedName]:
        """The host name and every service name, host first."""

    def stats() -> Mapping[str, Mapping[str, float]]:
        """Counters per interface address (received, dropped_*, sent, ...)."""


# ==========================================================================
# Containers, apps and services (the apps and services subsystems)


class ContainerState(enum.Enum):
    """A container's state, normalised across runtimes."""

    CREATED = "created"  #: exists, never started or being set up
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"  #: stopped, killed or crashed
    UNKNOWN = "unknown"


@attrs.frozen
class PortMapping:
    """A container port published on the host (loopback by default)."""

    container_port: int
    host_port: int
    host_ip: str = "127.0.0.1"
    protocol: str = "tcp"


@attrs.frozen
class ContainerMount:
    """
    A bind mount of host path ``source`` (``kind="bind"``) or a tmpfs of
    ``size`` bytes (``kind="tmpfs"``) at ``target`` in the container.
    """

    target: str
    source: str = ""
    kind: str = "bind"
    read_only: bool = False
    size: int = 0


@attrs.frozen
class ContainerSpec:
    """
    What to create.  ``network`` is ``bridge`` (default), ``internal`` (no
    route out, ports still published) or ``none``; ``restart`` is podman's
    restart policy (``no`` or ``always``); ``init`` runs a tiny init as PID 1
    so that SIGTERM stops the container promptly.
    """

    name: str
    image: str
    labels: Mapping[str, str] = attrs.field(factory=dict)
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict)
    ports: tuple[PortMapping, ...] = ()
    mounts: tuple[ContainerMount, ...] = ()
    memory: int | None = None
    cpus: float | None = None
    network: str = "bridge"
    restart: str = "no"
    init: bool = True


@attrs.frozen
class ContainerInfo:
    """What a runtime observes of one container."""

    id: str
    name: str
    image: str
    state: ContainerState
    labels: Mapping[str, str] = attrs.field(factory=dict)
    ports: tuple[PortMapping, ...] = ()
    exit_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "image": self.image,
            "state": self.state.value,
            "labels": dict(self.labels),
            "ports": [attrs.asdict(p) for p in self.ports],
            "exit_code": self.exit_code,
        }


@attrs.frozen
class ContainerEvent:
    """
    Something happened to a container (``create``, ``start``, ``die``,
    ``stop``, ``remove``, ...); the app controller only uses it as a hint
    to reconcile the app named by its labels.
    """

    action: str
    container_id: str
    name: str = ""
    labels: Mapping[str, str] = attrs.field(factory=dict)


class IContainerRuntime(Interface):
    """
    A container engine (``fake`` in memory, ``podman`` over its REST
    socket).  Images are never pulled: only images built or loaded locally
    are used.  Containers are identified by id or name.  Every call fails
    with ``Unavailable`` when the engine cannot be reached.
    """

    kind: str = Attribute("The runtime's name (``fake``, ``podman``).")

    def ping() -> Deferred[None]:
        """Fires once the engine answers; fails with ``Unavailable``."""

    def image_exists(image: str) -> Deferred[bool]:
        """Whether ``image`` is present locally."""

    def build_image(
        tag: str, containerfile: str, build_args: Mapping[str, str], target: str
    ) -> Deferred[None]:
        """
        Build ``tag`` from an inline Containerfile without pulling (its
        ``FROM`` images must be local).  Fails with ``InvalidCommand`` when
        the build fails (the message carries the build output's tail).
        """

    def list_containers(labels: Mapping[str, str]) -> Deferred[Sequence[ContainerInfo]]:
        """The containers carrying every one of ``labels``, sorted by name."""

    def inspect(container: str) -> Deferred[ContainerInfo]:
        """One container by id or name; fails with ``NotFound``."""

    def create(spec: ContainerSpec) -> Deferred[ContainerInfo]:
        """
        Create (not start) a container.  Fails with ``NotFound`` when the
        image is not present locally and ``Conflict`` when the name is taken.
        """

    def start(container: str) -> Deferred[None]:
        """Start it; idempotent for a running one.  Fails with ``NotFound``."""

    def stop(container: str, timeout: float = 10.0) -> Deferred[None]:
        """
        Stop it (SIGTERM, then SIGKILL after ``timeout`` seconds);
        idempotent.  Fails with ``NotFound``.
        """

    def remove(container: str) -> Deferred[None]:
        """Remove it, stopping it first if needed; idempotent (a missing one is fine)."""

    def logs(container: str, tail: int = 100) -> Deferred[str]:
        """The last ``tail`` lines of its output; fails with ``NotFound``."""

    def watch(observer: Callable[[ContainerEvent], None]) -> Callable[[], None]:
        """
        Call ``observer`` for every container event from now on; returns a
        function that stops the watching (idempotent).
        """


@attrs.frozen
class RouteEntry:
    """
    One published app listener as the service manager serves it.

    @ivar public_port: where clients connect (the proxy's port).
    @ivar backend_port: the container's loopback host port.
    @ivar mode: ``local`` (proxied to this node's container) or ``leader``
        (proxied to the leader's public port at ``target_host``).
    """

    app: str
    listener: str
    public_port: int
    backend_port: int
    protocol: str
    flow: str
    mode: str = "local"
    target_host: str = "127.0.0.1"
    leader_address: str | None = None
    connections: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class IServiceManager(Interface):
    """
    The services subsystem: persisted port allocations, one proxy per
    exposed listener (TCP splice or HTTP reverse proxy), and the route
    table published on the bus (``RoutePublished``).  Driven by the
    ``services.*`` commands.
    """

    def routes() -> Sequence[RouteEntry]:
        """The routes being served, sorted by app and listener."""


__all__ = [
    "AdvertisedName",
    "AppRecord",
    "AuditEntry",
    "AuthState",
    "Backoff",
    "ChildSpec",
    "ChildStatus",
    "CommandTimeout",
    "ComponentHealth",
    "ConfigError",
    "Conflict",
    "ContainerEvent",
    "ContainerInfo",
    "ContainerMount",
    "ContainerSpec",
    "ContainerState",
    "ControlStoreInfo",
    "DuplicateRegistration",
    "EventFilter",
    "Handler",
    "IAppsRepository",
    "IAuditRepository",
    "IAuthRepository",
    "ICommandDispatcher",
    "ICommandHandler",
    "IConsensus",
    "IContainerRuntime",
    "IControlStore",
    "IControlTransaction",
    "IController",
    "IDeviceManager",
    "IEventBus",
    "IHealth",
    "IJobControl",
    "IJobHandle",
    "IJobRunner",
    "ILeadershipRegistry",
    "IMdnsResponder",
    "IPersistence",
    "IReconciler",
    "IRemoteRepository",
    "IServiceManager",
    "ISettingsRepository",
    "ISubscription",
    "ISubsystemPlugin",
    "ISupervisedService",
    "ISupervisor",
    "IVolumeAdapter",
    "IllegalTransition",
    "InvalidCommand",
    "JobSpec",
    "JobState",
    "LeadershipState",
    "Locked",
    "MaybeAsync",
    "Middleware",
    "NotFound",
    "NotLeader",
    "NotReady",
    "Overflow",
    "PiccolodError",
    "PolicyDenied",
    "PortMapping",
    "QuotaExceeded",
    "RateLimited",
    "RemoteConfigRecord",
    "RestartPolicy",
    "RouteEntry",
    "StaleTerm",
    "SubscriptionStats",
    "SubsystemFailed",
    "TooLarge",
    "TopicStats",
    "TransientError",
    "Unauthorized",
    "Unavailable",
    "UnknownCommand",
]


# ==========================================================================
# Remote access (the remote subsystem): tunnels and the remote manager


@attrs.frozen
class TunnelForward:
    """
    One reverse forward: the tunnel server listens on ``bind_host:bind_port``
    (``0``: it picks a port) and every connection to it is spliced to
    ``target_host:target_port`` from this node.

    @ivar name: what is forwarded (``portal``, ``https``, ``app:<a>/<l>``).
    """

    name: str
    bind_host: str = "127.0.0.1"
    bind_port: int = 0
    target_host: str = "127.0.0.1"
    target_port: int = 0

    @property
    def binding(self) -> tuple[str, int]:
        """What identifies the forward on the server (a new target keeps it)."""
        return (self.bind_host, self.bind_port)


@attrs.frozen
class TunnelSpec:
    """
    One tunnel as wanted: a server, how to authenticate, what to forward.

    @ivar private_key: the device key (OpenSSH private key format).
    @ivar host_key: the pinned SHA256 fingerprint of the server's host key
        (OpenSSH form, no padding); ``""`` accepts the first key seen and
        keeps it for the life of the tunnel (reported in its status).
    """

    name: str
    host: str
    port: int
    user: str
    private_key: bytes = attrs.field(repr=False)
    host_key: str = ""
    forwards: tuple[TunnelForward, ...] = ()
    keepalive_interval: float = 15.0
    keepalive_timeout: float = 45.0

    def connection_key(self) -> tuple[Any, ...]:
        """The settings whose change needs a new connection (not the forwards)."""
        return (
            self.host,
            self.port,
            self.user,
            self.private_key,
            self.keepalive_interval,
            self.keepalive_timeout,
        )


@attrs.frozen
class ForwardStatus:
    """
    One forward's state: ``pending`` (asked for or waiting for the
    connection), ``active`` (the server listens on ``bound_port``) or
    ``refused`` (the server said no; asked again after a backoff).
    """

    name: str
    bind_host: str
    bind_port: int
    state: str
    bound_port: int = 0
    target_host: str = ""
    target_port: int = 0
    error: str = ""
    connections: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class TunnelStatus:
    """
    One tunnel's state: ``connecting``, ``up``, ``backoff`` (waiting to
    reconnect), ``refused`` (host key mismatch: not retried until the
    tunnel is reconfigured) or ``stopped``.

    @ivar host_key: the fingerprint of the host key accepted on the
        current or last connection (``""`` before the first).
    @ivar attempts: connection attempts that failed since the last success.
    @ivar since: clock time of the last state change.
    """

    name: str
    state: str
    host: str = ""
    port: int = 0
    host_key: str = ""
    forwards: tuple[ForwardStatus, ...] = ()
    attempts: int = 0
    last_error: str = ""
    since: float = 0.0
    connected_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=False)
        out["forwards"] = [f.to_json() for f in self.forwards]
        return out


class ITunnel(Interface):
    """
    A tunnel adapter of the remote subsystem (``stub``, ``ssh``): makes
    this node's routes reachable from tunnel servers.  Each tunnel reports
    its health as component ``remote.tunnel.<name>``.
    """

    kind: str = Attribute("The adapter's name (``stub``, ``ssh``).")

    def apply(specs: Sequence[TunnelSpec]) -> None:
        """
        Converge to exactly ``specs`` (by name), in the background: start
        new tunnels, stop removed ones, reconnect only those whose
        ``connection_key()`` or pinned host key changed, and add, cancel or
        retarget forwards of the others on their live connection.  Raises
        ``InvalidCommand`` for duplicate names or forwards.
        """

    def status() -> Sequence[TunnelStatus]:
        """Every tunnel's status, sorted by name."""

    def watch(observer: Callable[[TunnelStatus], None]) -> Callable[[], None]:
        """
        Call ``observer`` with a tunnel's status whenever it changes (state,
        host key, a forward's state or port); returns a function that stops
        the watching (idempotent).
        """


class IRemoteManager(Interface):
    """
    The remote subsystem's manager: remote access configuration (in the
    control store), the route table by leadership, tunnels, certificates
    (ACME) and TLS termination.  Driven by the ``remote.*`` commands.
    """

    def routes() -> Sequence[Mapping[str, Any]]:
        """The current route table (JSON-ready), sorted by target; empty while locked."""

    def challenge(token: str) -> str | None:
        """The key authorization of a pending HTTP-01 challenge, or ``None``."""


__all__ += [
    "ForwardStatus",
    "IRemoteManager",
    "ITunnel",
    "TunnelForward",
    "TunnelSpec",
    "TunnelStatus",
]
