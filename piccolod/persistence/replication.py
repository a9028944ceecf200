"""
Replication of the control store over the cluster's commit log.

On a cluster (a consensus variant that registers ``cluster.replicate_commit``
and ``cluster.read_commits``) every commit of the ``control-plane`` leader's
store becomes one entry of a linear, shared log *before* it is acknowledged,
and every node applies the log, in order, to its own encrypted store.  This
module holds the two halves persistence owns:

**Sealing.**  An entry's contents are JSON: for a ``commit``, the SQL
statements the transaction ran with their parameters (bytes as
``{"b64": ...}``), its change records, tables, time and schema version; for a
``snapshot``, every row of every replicated table (all tables but the
per-node ``meta``, the chain ``revisions`` and SQLite's own; AUTOINCREMENT
counters included) plus the head row of ``revisions``, so a node restored
from it has the same revision *and* checksum and its chain still verifies.
The contents are sealed with AES-256-GCM under ``HKDF(data key,
"piccolod/control-log/v1")`` (:func:`log_key`): a 12-byte random nonce, then
the ciphertext, base64 in :attr:`SealedCommit.sealed`; the associated data
binds the kind, revision, previous and chain checksum, so an entry cannot
be altered, replayed at another revision or relabelled.  The shared store
(etcd) only ever holds ciphertext.  :func:`unseal` fails with
:class:`Diverged`'s parent ``Conflict`` for anything tampered.

**The sync driver** (:class:`SyncDriver`), level-triggered: a run reads the
log after the store's revision (``cluster.read_commits``), applies it, and
repeats while the log says ``more``; then, when this node leads
``control-plane`` and the log is empty or behind the store, it appends a snapshot of
the store so that joiners can start from it. One run at a time; a trigger
during a run queues one more run; failures back off on the injected clock.
A run starts at the entry at the store's head, so that the store's checksum
is checked against the log's. Triggers: the store opened, this node's
``control-plane`` role changed, ``cluster.commit_log``
(``CommitLogAdvanced``) announced a head beyond the store, a write met
``CommitConflict``. A store whose history does not match the log
(:class:`Diverged`, e.g. a freshly joined node whose first revision is its
own schema migration) is re-read from the beginning of the log and replaced
by the log's snapshot.

The driver is also the store's *replication hook*: it tells the store
whether writes must be replicated (the dispatcher has a handler for
``cluster.replicate_commit``, re-checked at most once a second and at every
trigger), refuses writes with a retryable ``Unavailable`` while a leader is
not yet in sync (a new leader must hold every acknowledged commit before it
writes), and dispatches the appends.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from piccolod.commands import (
    CommandContext,
    CommitLog,
    ReadCommits,
    ReplicateCommit,
    SealedCommit,
)
from piccolod.errors import CommitConflict, Conflict, PiccolodError, Unavailable
from piccolod.events import CommitLogAdvanced, ControlStoreCommit, LeadershipRoleChanged
from piccolod.interfaces import ICommandDispatcher, IEventBus, ILeadershipRegistry, ISubscription
from piccolod.persistence.keyset import DataKey

__all__ = [
    "CONTENTS_VERSION",
    "LOG_KEY_LABEL",
    "NONCE_BYTES",
    "Diverged",
    "SyncDriver",
    "SyncStatus",
    "decode_params",
    "encode_params",
    "log_key",
    "seal",
    "unseal",
]

LOG_KEY_LABEL = "piccolod/control-log/v1"
NONCE_BYTES = 12
CONTENTS_VERSION = 1
CONTROL_PLANE = "control-plane"
REPLICATE = ReplicateCommit.name
READ = ReadCommits.name
#: How the persistence subsystem appears to the dispatcher's policy.
CONTEXT = CommandContext(subject="system:persistence", source="internal")


class Diverged(Conflict):
    """
    This store's history differs from the cluster log's: an entry's
    ``previous`` is not the store's head checksum, an applied entry ends at
    another checksum, or the store's checksum at an entry's revision is not
    the entry's.  Nothing was applied; the node must be restored from the
    log's snapshot.
    """

    type = "control-store-diverged"
    title = "Control store diverged from the cluster log"


def log_key(data_key: DataKey) -> bytes:
    """The key that seals the cluster log's entries (a sub-key of the data key)."""
    return data_key.derive(LOG_KEY_LABEL)


# --------------------------------------------------------------------------
# Sealing


def encode_params(params: Sequence[Any]) -> list[Any]:
    """SQL parameters as JSON values (bytes become ``{"b64": ...}``)."""
    out: list[Any] = []
    for value in params:
        if isinstance(value, (bytes, bytearray, memoryview)):
            out.append({"b64": base64.b64encode(bytes(value)).decode("ascii")})
        elif value is None or isinstance(value, (str, int, float)):
            out.append(value)
        else:
            raise TypeError(f"a replicated SQL parameter cannot be {type(value).__name__}")
    return out


def decode_params(params: Sequence[Any]) -> tuple[Any, ...]:
    """The inverse of :func:`encode_params`."""
    out: list[Any] = []
    for value in params:
        if isinstance(value, dict):
            raw = value.get("b64")
            if not isinstance(raw, str) or len(value) != 1:
                raise Conflict("a replicated SQL parameter is malformed")
            out.append(base64.b64decode(raw, validate=True))
        else:
            out.append(value)
    return tuple(out)


def _aad(kind: str, revision: int, previous: str, checksum: str) -> bytes:
    return f"{LOG_KEY_LABEL}|{kind}|{revision}|{previous}|{checksum}".encode()


def seal(
    key: bytes,
    kind: str,
    revision: int,
    previous: str,
    checksum: str,
    contents: Mapping[str, Any],
) -> SealedCommit:
    """An entry of the log: ``contents`` as JSON, sealed under ``key``."""
    body = json.dumps(
        {"v": CONTENTS_VERSION, **contents},
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, body, _aad(kind, revision, previous, checksum))
    return SealedCommit(
        kind=kind,
        revision=revision,
        previous=previous,
        checksum=checksum,
        sealed=base64.b64encode(nonce + ciphertext).decode("ascii"),
    )


def unseal(key: bytes, entry: SealedCommit) -> dict[str, Any]:
    """
    The contents of ``entry``.  Raises ``Conflict`` when it was altered
    (ciphertext, nonce or any bound field), sealed under another key, or is
    not a version this node reads.
    """
    try:
        raw = base64.b64decode(entry.sealed, validate=True)
    except (binascii.Error, ValueError):
        raise Conflict(f"log entry {entry.revision} is not base64") from None
    if len(raw) < NONCE_BYTES + 16:
        raise Conflict(f"log entry {entry.revision} is truncated")
    aad = _aad(entry.kind, entry.revision, entry.previous, entry.checksum)
    try:
        body = AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad)
    except InvalidTag:
        raise Conflict(
            f"log entry {entry.revision} cannot be opened: it was altered or sealed "
            "under another cluster's key"
        ) from None
    try:
        contents = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Conflict(f"log entry {entry.revision} holds malformed contents") from None
    if not isinstance(contents, dict) or contents.get("v") != CONTENTS_VERSION:
        raise Conflict(
            f"log entry {entry.revision} has contents version "
            f"{contents.get('v') if isinstance(contents, dict) else None!r}; "
            f"this piccolod reads {CONTENTS_VERSION}"
        )
    return contents


# --------------------------------------------------------------------------
# The sync driver


class _Store(Protocol):
    """What the driver needs of :class:`piccolod.persistence.store.ControlStore`."""

    @property
    def is_open(self) -> bool: ...

    @property
    def revision(self) -> int: ...

    def apply(
        self, entries: Sequence[SealedCommit], *, force_snapshot: bool = False
    ) -> Deferred[Any]: ...

    def snapshot_entry(self) -> Deferred[SealedCommit]: ...


@attrs.frozen
class SyncStatus:
    """
    The driver's state, served in ``persistence.status`` (``store.replication``).

    @ivar state: ``inactive`` (no cluster log), ``closed`` (store locked),
        ``syncing``, ``backoff`` (the last run failed; a retry is timed),
        ``synced``, or ``behind`` (a trigger is waiting to run).
    @ivar log_head: the last head the log announced or answered (``None``:
        unknown or empty).
    @ivar lag: ``log_head - revision`` (0 when unknown or ahead).
    @ivar compactions: snapshots this node appended to compact the log.
    """

    state: str
    synced: bool
    revision: int
    log_head: int | None
    lag: int
    runs: int
    last_error: str | None
    compactions: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _describe(error: BaseException | None) -> str:
    if isinstance(error, PiccolodError):
        return f"{error.type}: {error.detail}"
    return f"{type(error).__name__}: {error}"


@attrs.define(eq=False)
class SyncDriver:
    """
    Keeps the store in step with the cluster log (see the module docstring)
    and is the store's replication hook.

    @ivar after_leader_sync: called after every successful run while this
        node leads ``control-plane`` (the service publishes the keyset);
        its failures are logged, not retried.
    @ivar snapshot_every: while leading, append a snapshot of the store
        after every commit whose revision is a multiple of this (0: never),
        so that the log (which drops the commits a snapshot covers) stays
        bounded and a joiner replays at most this many commits.
    """

    log = Logger()

    clock: IReactorTime
    store: _Store
    dispatcher: ICommandDispatcher
    bus: IEventBus | None = None
    registry: ILeadershipRegistry | None = None
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    recheck_interval: float = 1.0
    after_leader_sync: Callable[[], Deferred[Any]] | None = None
    snapshot_every: int = 1000
    _compacting: Deferred[None] | None = attrs.field(init=False, default=None)
    _compactions: int = attrs.field(init=False, default=0)
    _names_checked: float | None = attrs.field(init=False, default=None)
    _replicating: bool = attrs.field(init=False, default=False)
    _reading: bool = attrs.field(init=False, default=False)
    _synced: bool = attrs.field(init=False, default=False)
    _running: Deferred[None] | None = attrs.field(init=False, default=None)
    _again: bool = attrs.field(init=False, default=False)
    _retry: IDelayedCall | None = attrs.field(init=False, default=None)
    _failures: int = attrs.field(init=False, default=0)
    _runs: int = attrs.field(init=False, default=0)
    _log_head: int | None = attrs.field(init=False, default=None)
    _last_error: str | None = attrs.field(init=False, default=None)
    _subscriptions: list[ISubscription] = attrs.field(init=False, factory=list)
    _idle: list[Deferred[None]] = attrs.field(init=False, factory=list)

    # -- the handlers the dispatcher has

    def refresh(self) -> None:
        """Look again at which ``cluster.*`` handlers the dispatcher has."""
        names = set(self.dispatcher.names())
        self._replicating = REPLICATE in names
        self._reading = READ in names
        self._names_checked = self.clock.seconds()

    def _check_names(self) -> None:
        checked = self._names_checked
        if checked is None or self.clock.seconds() - checked >= self.recheck_interval:
            self.refresh()

    def active(self) -> bool:
        """Whether the store must replicate its writes (a log takes appends)."""
        self._check_names()
        return self._replicating

    def can_sync(self) -> bool:
        """Whether there is a log to read."""
        self._check_names()
        return self._reading

    def _leads(self) -> bool:
        return self.registry is None or self.registry.is_leader(CONTROL_PLANE)

    # -- the store's hook

    def write_refusal(self) -> PiccolodError | None:
        """Why a replicated write may not start now (``None``: it may)."""
        if self._synced:
            return None
        self.kick("write while behind")
        return Unavailable(
            "control store catching up with the cluster log; retry shortly", retry_after=0.5
        )

    def replicate(self, entry: SealedCommit) -> Deferred[Any]:
        """Append ``entry`` to the log (fenced by this node's term)."""
        return self.dispatcher.dispatch(ReplicateCommit(entry), CONTEXT)

    def landed(self, entry: SealedCommit) -> Deferred[bool]:
        """
        Whether the log holds ``entry`` itself (the same sealed text: its
        nonce makes it unique), read after an append whose answer was lost.
        """
        return Deferred.fromCoroutine(self._landed(entry))

    async def _landed(self, entry: SealedCommit) -> bool:
        log = await self.dispatcher.dispatch(
            ReadCommits(after=entry.revision - 1, limit=1), CONTEXT
        )
        if not isinstance(log, CommitLog):
            raise Unavailable(f"cluster.read_commits answered {type(log).__name__}")
        return any(
            e.revision == entry.revision and e.kind == entry.kind and e.sealed == entry.sealed
            for e in log.entries
        )

    def conflicted(self, error: BaseException | None) -> None:
        """A write found the log ahead (or its commit could not land): catch up."""
        self._synced = False
        self.kick(f"write conflict: {_describe(error)}")

    # -- lifecycle

    def start(self) -> None:
        """Follow ``cluster.leadership`` and ``cluster.commit_log``."""
        if self.bus is None or self._subscriptions:
            return
        self._subscriptions.append(
            self.bus.subscribe(
                LeadershipRoleChanged.topic,
                self._role_changed,
                filter=lambda envelope: getattr(envelope.event, "resource", None) == CONTROL_PLANE,
                name="persistence.sync.leadership",
            )
        )
        self._subscriptions.append(
            self.bus.subscribe(
                CommitLogAdvanced.topic,
                self._log_advanced,
                replay_retained=True,
                name="persistence.sync.commit_log",
            )
        )
        self._subscriptions.append(
            self.bus.subscribe(
                ControlStoreCommit.topic,
                self._committed,
                filter=self._compaction_due,
                name="persistence.sync.compaction",
            )
        )

    def stop(self) -> None:
        """Stop following events and cancel a timed retry (a run in flight ends by itself)."""
        for subscription in self._subscriptions:
            subscription.cancel()
        self._subscriptions.clear()
        self.closed()

    def opened(self) -> None:
        """The store opened: not in sync until a run says so."""
        self.refresh()
        self._synced = False
        self._failures = 0
        self.kick("store opened")

    def closed(self) -> None:
        """The store closed: forget the sync state and any timed retry."""
        self._synced = False
        self._again = False
        self._cancel_retry()

    def _cancel_retry(self) -> None:
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            retry.cancel()

    # -- events

    def _role_changed(self, envelope: Any) -> None:
        self.refresh()
        self._synced = False
        self.kick(f"control-plane role: {envelope.event.role.value}")

    def _log_advanced(self, envelope: Any) -> None:
        event = envelope.event
        if not isinstance(event, CommitLogAdvanced):
            return
        self._log_head = event.head
        if self.store.is_open and event.head > self.store.revision:
            self._synced = False
            self.kick(f"log head {event.head}")

    def _compaction_due(self, envelope: Any) -> bool:
        every = self.snapshot_every
        revision = getattr(envelope.event, "revision", 0)
        return every > 0 and revision > 0 and revision % every == 0

    def _committed(self, envelope: Any) -> None:
        """Every ``snapshot_every`` revisions the leader compacts the log."""
        if (
            self._compacting is None
            and self._synced
            and self.store.is_open
            and self._leads()
            and self.active()
        ):
            self._compacting = Deferred.fromCoroutine(self._compact(envelope.event.revision))
            self._compacting.addBoth(self._compacted)

    async def _compact(self, revision: int) -> None:
        entry = await self.store.snapshot_entry()
        await self.replicate(entry)
        self._compactions += 1
        self.log.info(
            "persistence: compacted the cluster log into a snapshot of revision {revision}",
            revision=entry.revision,
        )

    def _compacted(self, result: object) -> None:
        self._compacting = None
        if isinstance(result, Failure):
            # A write that landed in between (CommitConflict), a lost term or an
            # unreachable log: the next multiple of snapshot_every tries again.
            self.log.info(
                "persistence: the cluster log was not compacted this time: {error}",
                error=_describe(result.value),
            )

    # -- status

    def status(self) -> SyncStatus:
        revision = self.store.revision if self.store.is_open else 0
        if not self.can_sync():
            state = "inactive"
        elif not self.store.is_open:
            state = "closed"
        elif self._running is not None:
            state = "syncing"
        elif self._retry is not None:
            state = "backoff"
        elif self._synced:
            state = "synced"
        else:
            state = "behind"
        head = self._log_head
        lag = max(0, head - revision) if head is not None else 0
        return SyncStatus(
            state=state,
            synced=self._synced,
            revision=revision,
            log_head=head,
            lag=lag,
            runs=self._runs,
            last_error=self._last_error,
            compactions=self._compactions,
        )

    @property
    def synced(self) -> bool:
        return self._synced

    def when_idle(self) -> Deferred[None]:
        """Fires once no run is in flight or queued (for tests and status)."""
        if self._running is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter

    # -- running

    def kick(self, reason: str = "") -> None:
        """Run a sync now (or once more after the one in flight)."""
        if not self.can_sync() or not self.store.is_open:
            return
        if self._running is not None:
            self._again = True
            return
        self._cancel_retry()
        self.log.debug("persistence: syncing with the cluster log ({reason})", reason=reason)
        self._running = Deferred.fromCoroutine(self._run())
        self._running.addBoth(self._finished)

    def _finished(self, result: object) -> None:
        self._running = None
        if isinstance(result, Failure):
            error = result.value
            self._synced = False
            if isinstance(error, CancelledError) or not self.store.is_open:
                self._last_error = _describe(error) if self.store.is_open else None
            else:
                self._failures += 1
                delay = min(
                    self.backoff_max, self.backoff_initial * 2.0 ** min(self._failures - 1, 30)
                )
                self._last_error = _describe(error)
                self.log.warn(
                    "persistence: sync with the cluster log failed ({error}); "
                    "retrying in {delay} s",
                    error=self._last_error,
                    delay=delay,
                )
                if not self._again:
                    self._retry = self.clock.callLater(delay, self._retried)
        else:
            self._failures = 0
            self._last_error = None
        if self._again:
            self._again = False
            self.kick("queued trigger")
        if self._running is None:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    def _retried(self) -> None:
        self._retry = None
        self.kick("retry")

    async def _read(self, after: int) -> CommitLog:
        log = await self.dispatcher.dispatch(ReadCommits(after=after), CONTEXT)
        if not isinstance(log, CommitLog):
            raise Unavailable(f"cluster.read_commits answered {type(log).__name__}")
        if log.head is not None:
            self._log_head = log.head
        return log

    async def _run(self) -> None:
        self._runs += 1
        force = False
        # From the entry *at* the store's head, not after it: applying it
        # checks the store's checksum against the log's (a skip when they
        # match, Diverged when not), so a store with another history at the
        # same revision, such as a joiner's own first revision beside the
        # log's snapshot, is caught even when nothing follows it.
        after = max(0, self.store.revision - 1)
        while True:
            log = await self._read(after)
            if log.entries:
                try:
                    await self.store.apply(log.entries, force_snapshot=force)
                except Diverged:
                    if force:
                        raise
                    self.log.warn(
                        "persistence: the control store diverged from the cluster log; "
                        "restoring it from the log's snapshot"
                    )
                    force, after = True, 0
                    continue
            if not self.store.is_open:
                raise Unavailable("the control store closed during the sync")
            after = self.store.revision
            if not log.more:
                break
        if self._leads() and (log.head is None or log.head < after):
            if not self.active():
                raise Unavailable("the cluster log takes no appends")
            entry = await self.store.snapshot_entry()
            await self.replicate(entry)
            self._log_head = entry.revision
            self.log.info(
                "persistence: appended a snapshot of revision {revision} to the cluster log",
                revision=entry.revision,
            )
        elif log.head is not None and log.head > after:
            raise CommitConflict(
                f"the log's head is {log.head} but its entries stopped at {after}", head=log.head
            )
        self._synced = True
        if self._leads() and self.after_leader_sync is not None:
            try:
                await self.after_leader_sync()
            except Exception as e:
                self.log.warn("persistence: after syncing as leader: {error}", error=_describe(e))
