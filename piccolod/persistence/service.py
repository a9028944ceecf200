"""
The persistence subsystem service: the lock state machine and its commands.

One :class:`PersistenceService` owns the keyset, the lock machine, the
control store and (when configured) the volume manager.  It is the single
source of truth for the lock state: every transition of the table
:data:`piccolod.kernel.fsm.LOCK_MACHINE` publishes a retained
``LockStateChanged``, which the dispatcher's lock gate reads.

=============  =======  ===========  ==========================================
from           trigger  to           when
=============  =======  ===========  ==========================================
uninitialized  setup    locked       ``persistence.setup`` wrote the keyset
locked         unlock   preunlock    a password or recovery key opened the keyset
preunlock      opened   unlocked     volumes attached and the store opened
preunlock      failed   locked       any preunlock step failed (all undone)
unlocked       lock     locked       ``persistence.lock`` (store closed, volumes
                                     detached, data key wiped)
=============  =======  ===========  ==========================================

**Preunlock steps**, each preceded by the ``preunlock_hook`` (a test seam
that may raise): ``keys`` (volume passphrases loaded, missing ones created),
``volumes`` (each configured volume ensured and attached; ``control``
read-only when this node follows ``control-plane``), ``store`` (the control
store opened, its migrations run), ``ready``.  Any failure, including a
cancellation, closes the store, detaches every volume, wipes the data key
and fires ``failed``: nothing is left half-open.

**Wrong secrets** never change the state.  They are rate-limited: after the
n-th consecutive failure no attempt is even tried for
``min(max, initial * 2**(n-1))`` seconds; an attempt in that window fails
with ``RateLimited`` (``retry_after`` set) even when the secret is right.
The password is checked by AES-GCM's tag, constant-time by construction.

**Threads.**  Argon2 and keyset file I/O run in ``kdf_pool``; the store runs
in its own single-thread ``store_pool`` (see :mod:`.store`); nothing blocks
the reactor.  With ``None`` pools everything runs inline (unit tests).

**Operations** (setup, unlock, lock, password change, recovery rotation,
join) are serialised by one ``DeferredLock``: they never interleave.

**Clusters** (a consensus variant with a shared store; see
:mod:`.replication` and ``docs/persistence.md``).  With ``cluster.read_commits``
registered, a :class:`~.replication.SyncDriver` keeps the store in step with
the cluster's commit log and replicates the leader's writes; followers then
open the store read-write (only the log writes to it) and
``persistence.apply_commits`` applies entries pushed by the consensus.  With
``cluster.fenced_put`` registered the keyset (wrapped keys only) is shared
at ``control/keyset``: the ``control-plane`` leader publishes it after
setup, a password change or a recovery-key rotation and whenever a sync
finds the cluster's copy older; ``persistence.join`` lets an uninitialised
node take it with the admin password; a node whose keyset is older than the
cluster's adopts the cluster's at unlock when the secret opens it.  Setup is
refused (``Conflict``) once the cluster has a keyset and (``NotLeader``)
anywhere but on the leader; password changes and recovery rotations too.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from piccolod.commands import (
    ApplyCommits,
    AttachVolume,
    ChangePassword,
    ClusterValue,
    Command,
    CommandContext,
    CommitsApplied,
    DeleteExport,
    DeleteVolume,
    DetachVolume,
    EnsureVolume,
    ExportDone,
    ExportEntry,
    ExportFile,
    ExportList,
    FencedPut,
    GetStorageStatus,
    ImportBundle,
    ImportDone,
    JoinCluster,
    ListExports,
    LockStorage,
    OpenExport,
    ReadClusterKey,
    RecordLockState,
    RecoveryKeyRotated,
    RotateRecoveryKey,
    RunControlExport,
    RunFullExport,
    SetupResult,
    SetupStorage,
    StorageStatus,
    StoreClearRemote,
    StoredApp,
    StoredApps,
    StoreDeleteApp,
    StoreDeleteSetting,
    StoreDone,
    StoredRemote,
    StoredSetting,
    StoredSettings,
    StoreGetApp,
    StoreGetSetting,
    StoreListApps,
    StoreListSettings,
    StoreLoadRemote,
    StorePutApp,
    StoreSaveRemote,
    StoreSetSetting,
    UnlockStorage,
    VerifyPassword,
    VolumeResult,
)
from piccolod.errors import (
    CommitConflict,
    ConfigError,
    Conflict,
    IllegalTransition,
    InvalidCommand,
    Locked,
    NotFound,
    NotLeader,
    NotReady,
    PiccolodError,
    RateLimited,
)
from piccolod.events import (
    ControlStoreHealth,
    ExportResult,
    HealthLevel,
    JobProgress,
    LockState,
    LockStateChanged,
    Role,
)
from piccolod.interfaces import (
    AppRecord,
    ControlStoreInfo,
    ICommandDispatcher,
    IControlStore,
    IControlTransaction,
    IEventBus,
    IHealth,
    IJobRunner,
    ILeadershipRegistry,
    IPersistence,
    IVolumeAdapter,
    MaybeAsync,
)
from piccolod.kernel.aio import call
from piccolod.kernel.dispatcher import Registration, register_all
from piccolod.kernel.fsm import LOCK_MACHINE, Machine, Transition
from piccolod.persistence import exports
from piccolod.persistence import keyset as keysets
from piccolod.persistence.errors import KeysetCorrupt, WrongPassword, WrongRecoveryKey
from piccolod.persistence.keyset import DataKey, KdfParams, Keyset, KeysetFile, write_atomically
from piccolod.persistence.replication import CONTEXT, Diverged, SyncDriver, log_key
from piccolod.persistence.store import CONTROL_PLANE, CheckResult, ControlStore, store_key
from piccolod.persistence.volume_keys import VolumeKeys, check_volume_id
from piccolod.persistence.volumes import VolumeBusy

__all__ = [
    "PREUNLOCK_STEPS",
    "AttemptLimiter",
    "PersistenceConfig",
    "PersistenceService",
    "VolumeManagerLike",
]

T = TypeVar("T")

#: The preunlock steps, in order (each preceded by ``preunlock_hook(step)``).
PREUNLOCK_STEPS = ("keys", "volumes", "store", "ready")
MACHINE_NAME = "persistence.lock"
HEALTH = "persistence"
STORE_HEALTH = "persistence.store"
#: Where the cluster's shared keyset lives in the consensus's store.
CLUSTER_KEYSET = "control/keyset"
#: The wrong-secret counter, kept across restarts (not a secret: a count
#: and a time).
ATTEMPTS_FILE = "unlock-attempts.json"
#: How long unlock waits for the cluster's keyset before using its own.
CLUSTER_KEYSET_TIMEOUT = 5.0


class VolumeManagerLike(Protocol):
    """What the service needs of :class:`piccolod.persistence.volumes.VolumeManager`."""

    def ensure(self, volume_id: str) -> Deferred[Any]: ...

    def attach(self, volume_id: str, read_only: bool = False) -> Deferred[str]: ...

    def detach(self, volume_id: str) -> Deferred[Any]: ...

    def detach_all(self, reason: str = "") -> Deferred[list[str]]: ...

    def sweep(self) -> Deferred[Any]: ...

    def status(self, volume_id: str) -> Deferred[Any]: ...

    def delete(self, volume_id: str) -> Deferred[None]: ...

    def close(self) -> None: ...


def _describe(error: BaseException) -> str:
    if isinstance(error, PiccolodError):
        return f"{error.type}: {error.detail}"
    if isinstance(error, CancelledError):
        return "cancelled"
    return f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------
# Configuration


@attrs.frozen
class PersistenceConfig:
    """
    The ``[subsystems.persistence]`` section, validated.

    @ivar volumes: volumes ensured and attached at every unlock.
    @ivar store_volume: the volume the control store lives on (when a
        volume manager is configured).
    @ivar check_on_unlock: run ``quick_check`` before using an existing store.
    @ivar keep_exports: bundles kept per kind after an export (0: all).
    """

    kdf: KdfParams = attrs.field(factory=KdfParams)
    unlock_backoff_initial: float = 1.0
    unlock_backoff_max: float = 60.0
    check_interval: float = 3600.0
    checkpoint_interval: float = 60.0
    volumes: tuple[str, ...] = ("control", "bootstrap")
    store_volume: str = "control"
    min_password_length: int = 8
    check_on_unlock: bool = True
    revision_retention: int = 10_000
    keep_exports: int = 5

    def problems(self) -> list[str]:
        found = list(self.kdf.problems())
        for name in (
            "unlock_backoff_initial",
            "unlock_backoff_max",
            "check_interval",
            "checkpoint_interval",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                found.append(f"{name} must be a positive number, got {value!r}")
        if not found and self.unlock_backoff_max < self.unlock_backoff_initial:
            found.append("unlock_backoff_max must be >= unlock_backoff_initial")
        for volume_id in self.volumes:
            try:
                check_volume_id(volume_id)
            except InvalidCommand as e:
                found.append(f"volumes: {e.detail}")
        if self.volumes and self.store_volume not in self.volumes:
            found.append(f"store_volume {self.store_volume!r} must be one of volumes")
        for name, low in (
            ("min_password_length", 1),
            ("revision_retention", 0),
            ("keep_exports", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                found.append(f"{name} must be an int >= {low}, got {value!r}")
        return found

    @classmethod
    def from_section(
        cls, section: Mapping[str, Any], slot: str = "persistence"
    ) -> PersistenceConfig:
        """Build from a config section; raises ``ConfigError`` listing every problem."""
        volumes = section.get("volumes", list(cls().volumes))
        if not isinstance(volumes, (list, tuple)) or not all(isinstance(v, str) for v in volumes):
            raise ConfigError([f"[subsystems.{slot}] volumes must be a list of volume ids"])
        config = cls(
            kdf=KdfParams(
                time_cost=section.get("argon2_time_cost", 3),
                memory_kib=section.get("argon2_memory_kib", 65536),
                parallelism=section.get("argon2_parallelism", 1),
            ),
            unlock_backoff_initial=section.get("unlock_backoff_initial", 1.0),
            unlock_backoff_max=section.get("unlock_backoff_max", 60.0),
            check_interval=section.get("check_interval", 3600.0),
            checkpoint_interval=section.get("checkpoint_interval", 60.0),
            volumes=tuple(volumes),
            store_volume=section.get("store_volume", "control"),
            min_password_length=section.get("min_password_length", 8),
            check_on_unlock=bool(section.get("check_on_unlock", True)),
            revision_retention=section.get("revision_retention", 10_000),
            keep_exports=section.get("keep_exports", 5),
        )
        problems = config.problems()
        if problems:
            raise ConfigError([f"[subsystems.{slot}] {p}" for p in problems])
        return config


# --------------------------------------------------------------------------
# Rate limiting


@attrs.define(eq=False)
class AttemptLimiter:
    """
    Growing delay after wrong secrets: after the n-th consecutive failure
    nothing is tried for ``min(maximum, initial * 2**(n-1))`` seconds.
    """

    clock: IReactorTime
    initial: float = 1.0
    maximum: float = 60.0
    failures: int = 0
    not_before: float = 0.0

    def retry_after(self) -> float:
        return max(0.0, self.not_before - self.clock.seconds())

    def check(self) -> None:
        """Raise ``RateLimited`` while the delay runs."""
        wait = self.retry_after()
        if wait > 0:
            raise RateLimited(
                f"too many wrong attempts; try again in {wait:.1f} s", retry_after=wait
            )

    def failed(self) -> float:
        """Count a failure; returns the delay now imposed."""
        self.failures += 1
        delay = float(min(self.maximum, self.initial * 2.0 ** min(self.failures - 1, 62)))
        self.not_before = self.clock.seconds() + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0

    # -- across restarts (``<directory>/unlock-attempts.json``)

    def to_bytes(self) -> bytes:
        body = {"failures": self.failures, "not_before": self.not_before}
        return (json.dumps(body, sort_keys=True) + "\n").encode()

    def restore(self, data: bytes) -> None:
        """
        Take the counter saved before a restart.  The delay still to run is
        capped at ``maximum`` (a clock set back, e.g. a board without RTC
        before NTP, must not lock the owner out for years).  Raises
        ``ValueError`` for a malformed file.
        """
        body = json.loads(data)
        failures, not_before = body["failures"], body["not_before"]
        if (
            not isinstance(failures, int)
            or isinstance(failures, bool)
            or failures < 0
            or not isinstance(not_before, (int, float))
            or isinstance(not_before, bool)
            or not math.isfinite(not_before)
        ):
            raise ValueError(f"implausible attempt counter: {body!r}")
        self.failures = failures
        self.not_before = min(float(not_before), self.clock.seconds() + self.maximum)


# --------------------------------------------------------------------------
# The service


@implementer(IPersistence, IControlStore)
@attrs.define(eq=False)
class PersistenceService(Service):
    """
    ``IPersistence`` + ``IControlStore`` + ``IService`` (see the module
    docstring).

    @ivar reactor: ``IReactorTime`` (+ ``IReactorFromThreads`` with pools).
    @ivar directory: where the keyset, the volume keys, the store marker and
        (without a volume manager) the store live: ``<state_dir>/persistence``.
    @ivar kdf_pool: runs Argon2 and keyset file I/O (``None``: inline).
    @ivar store_pool: the control store's single thread (``None``: inline).
    @ivar volume_manager_factory: builds the volume manager from
        :meth:`secret_for` (``None``: no volumes; the store lives in
        ``directory/control``).
    @ivar jobs: runs the periodic checks when given; otherwise they run on
        ``LoopingCall``s of ``reactor``.
    @ivar preunlock_hook: called with each step name of
        :data:`PREUNLOCK_STEPS` before it runs; raising fails the unlock.
    @ivar owns_pools: start and stop the pools with the service.
    """

    log = Logger()

    reactor: Any
    directory: Path = attrs.field(converter=Path)
    bus: IEventBus
    config: PersistenceConfig = attrs.field(factory=PersistenceConfig)
    dispatcher: ICommandDispatcher | None = None
    registry: ILeadershipRegistry | None = None
    health: IHealth | None = None
    kdf_pool: ThreadPool | None = None
    store_pool: ThreadPool | None = None
    volume_manager_factory: (
        Callable[[Callable[[str], Deferred[bytes]]], VolumeManagerLike] | None
    ) = None
    jobs: IJobRunner | None = None
    preunlock_hook: Callable[[str], MaybeAsync] | None = None
    owns_pools: bool = False
    name: str = attrs.field(default="persistence", kw_only=True)

    store: ControlStore = attrs.field(init=False)
    volumes: VolumeManagerLike | None = attrs.field(init=False, default=None)
    _keyset: Keyset = attrs.field(init=False)
    _volume_keys: VolumeKeys = attrs.field(init=False)
    _machine: Machine[LockState] = attrs.field(init=False)
    _limiter: AttemptLimiter = attrs.field(init=False)
    _ops: DeferredLock = attrs.field(init=False, factory=DeferredLock)
    _keys_lock: DeferredLock = attrs.field(init=False, factory=DeferredLock)
    _data_key: DataKey | None = attrs.field(init=False, default=None)
    _keyset_id: str = attrs.field(init=False, default="")
    _secrets: dict[str, bytearray] = attrs.field(init=False, factory=dict)
    _has_recovery: bool = attrs.field(init=False, default=False)
    _error: str | None = attrs.field(init=False, default=None)
    _reason: str = attrs.field(init=False, default="")
    _correlation: str | None = attrs.field(init=False, default=None)
    _waiters: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _maintenance: list[Any] = attrs.field(init=False, factory=list)
    _registration: Registration | None = attrs.field(init=False, default=None)
    sync: SyncDriver | None = attrs.field(init=False, default=None)
    #: A lock that found a volume busy (an app still holds files in it) keeps
    #: detaching it every ``busy_retry_interval`` seconds while locked: the
    #: ``locked`` event makes the apps stop and let go.  After
    #: ``busy_retry_for`` seconds the health turns from warn to error.
    busy_retry_interval: float = attrs.field(default=0.5, kw_only=True)
    busy_retry_for: float = attrs.field(default=60.0, kw_only=True)
    _busy_since: float | None = attrs.field(init=False, default=None)
    _busy_detail: str = attrs.field(init=False, default="")
    _busy_call: Any = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        problems = self.config.problems()
        if problems:
            raise ConfigError(problems)
        self._keyset = Keyset(self.directory)
        self._volume_keys = VolumeKeys(self.directory)
        self._limiter = AttemptLimiter(
            self.reactor, self.config.unlock_backoff_initial, self.config.unlock_backoff_max
        )
        self.store = ControlStore(
            self.reactor,
            self.store_pool,
            self.bus,
            self.registry,
            revision_retention=self.config.revision_retention,
        )
        if self.dispatcher is not None:
            self.sync = SyncDriver(
                self.reactor,
                self.store,
                self.dispatcher,
                self.bus,
                self.registry,
                after_leader_sync=lambda: Deferred.fromCoroutine(self._publish_keyset()),
            )
            self.store.replication = self.sync
        initial = LockState.LOCKED if self._keyset.exists() else LockState.UNINITIALIZED
        self._machine = Machine(
            MACHINE_NAME,
            initial,
            LOCK_MACHINE,
            bus=self.bus,
            clock=self.reactor,
            on_transition=self._transitioned,
        )
        if self.volume_manager_factory is not None:
            self.volumes = self.volume_manager_factory(self.secret_for)

    # -- construction from the plugin context --------------------------------

    @classmethod
    def from_context(cls, ctx: Any) -> PersistenceService:
        """
        Build from a ``SubsystemContext``: the ``[subsystems.persistence]``
        section (see ``twisted/plugins/piccolod_persistence.py``), the
        kernel's bus, dispatcher, registry and health, and
        ``<state_dir>/persistence``.  The volume adapter is the
        ``IVolumeAdapter`` dependency when the context resolved one;
        without it there are no volumes and the store lives in
        ``<state_dir>/persistence/control``.  Raises ``ConfigError``.
        """
        config = PersistenceConfig.from_section(ctx.config, ctx.slot)
        kernel = ctx.kernel
        state_dir = Path(kernel.state_dir)
        reactor = kernel.reactor
        kdf_pool = ThreadPool(minthreads=0, maxthreads=2, name="piccolod-persistence")
        store_pool = ThreadPool(minthreads=1, maxthreads=1, name="piccolod-control-store")
        adapter = ctx.deps.get(IVolumeAdapter)
        factory = _volume_manager_factory(adapter, reactor, state_dir, kernel.bus)
        return cls(
            reactor,
            state_dir / "persistence",
            kernel.bus,
            config,
            dispatcher=kernel.dispatcher,
            registry=kernel.registry,
            health=kernel.health,
            kdf_pool=kdf_pool,
            store_pool=store_pool,
            volume_manager_factory=factory,
            jobs=getattr(kernel, "jobs", None),
            owns_pools=True,
        )

    # -- reading ----------------------------------------------------------------

    @property
    def state(self) -> LockState:
        return self._machine.state

    @property
    def machine(self) -> Machine[LockState]:
        return self._machine

    @property
    def limiter(self) -> AttemptLimiter:
        return self._limiter

    @property
    def data_key(self) -> DataKey | None:
        """The data key while unlocked (for tests and the export path)."""
        return self._data_key

    def status(self) -> StorageStatus:
        info = self.store.info()
        store: dict[str, Any] | None = None
        if info.open:
            store = info.to_json()
            if self.sync is not None and self.sync.can_sync():
                store["replication"] = self.sync.status().to_json()
        return StorageStatus(
            state=self.state.value,
            initialized=self.state is not LockState.UNINITIALIZED,
            retry_after=self._limiter.retry_after(),
            failed_attempts=self._limiter.failures,
            recovery_key=self._has_recovery,
            store=store,
            error=self._error,
        )

    def when_unlocked(self) -> Deferred[None]:
        if self.state is LockState.UNLOCKED:
            return succeed(None)

        def forget(d: Deferred[None]) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        waiter: Deferred[None] = Deferred(forget)
        self._waiters.append(waiter)
        return waiter

    # -- IControlStore, delegated ------------------------------------------------

    @property
    def auth(self) -> Any:
        return self.store.auth

    @property
    def apps(self) -> Any:
        return self.store.apps

    @property
    def remote(self) -> Any:
        return self.store.remote

    @property
    def audit(self) -> Any:
        return self.store.audit

    @property
    def settings(self) -> Any:
        return self.store.settings

    def info(self) -> ControlStoreInfo:
        return self.store.info()

    def transaction(self, fn: Callable[[IControlTransaction], Any]) -> Deferred[Any]:
        return self.store.transaction(fn)

    # -- volume secrets ----------------------------------------------------------

    def secret_for(self, volume_id: str) -> Deferred[bytes]:
        """
        The passphrase of ``volume_id``: from memory when known, else
        created (one atomic write of ``volume-keys.json``, in ``kdf_pool``).
        Fails with ``Locked`` while locked.
        """
        try:
            check_volume_id(volume_id)
        except InvalidCommand as e:
            return fail(e)
        if self._data_key is None:
            return fail(Locked(f"the passphrase of volume {volume_id!r} needs unlocked storage"))
        known = self._secrets.get(volume_id)
        if known is not None:
            return succeed(bytes(known))
        return Deferred.fromCoroutine(self._create_secret(volume_id))

    async def _create_secret(self, volume_id: str) -> bytes:
        found = await self._load_secrets([volume_id])
        return bytes(found[volume_id])

    async def _load_secrets(self, volume_ids: Sequence[str]) -> dict[str, bytearray]:
        """
        Load the passphrases, creating missing ones.  Serialised by
        ``_keys_lock``: ``volume-keys.json`` is read, extended and
        replaced as a whole, so two writers at once would lose one's keys.
        """
        await self._keys_lock.acquire()
        try:
            if all(v in self._secrets for v in volume_ids):
                return self._secrets
            return await self._load_secrets_locked(volume_ids)
        finally:
            self._keys_lock.release()

    async def _load_secrets_locked(self, volume_ids: Sequence[str]) -> dict[str, bytearray]:
        data_key, keyset_id = self._data_key, self._keyset_id
        if data_key is None:
            raise Locked("storage was locked meanwhile")

        def ensure() -> dict[str, bytes]:
            try:
                return self._volume_keys.ensure(data_key, keyset_id, volume_ids)
            except ValueError:  # the data key was wiped by a lock meanwhile
                raise Locked("storage was locked meanwhile") from None

        found = await self._blocking(ensure)
        if self._data_key is not data_key:
            raise Locked("storage was locked meanwhile")
        for vid, passphrase in found.items():
            if vid not in self._secrets:
                self._secrets[vid] = bytearray(passphrase)
        return self._secrets

    # -- IService ------------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        if self.owns_pools:
            for pool in (self.kdf_pool, self.store_pool):
                if pool is not None and not pool.started:
                    pool.start()
        self._register()
        if self.sync is not None:
            self.sync.start()
        self.running = 1
        self._reason = "start"
        self._announce(None)
        self._report_health()
        # Serialised with the operations: a setup that arrives while the boot
        # checks run must not have its keyset temp file swept away mid-write.
        self._serial(self._boot).addErrback(
            lambda f: self.log.failure("persistence boot checks failed", f)
        )

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        self.running = 0
        return Deferred.fromCoroutine(self._stop())

    async def _boot(self) -> None:
        attempts: list[bytes] = []

        def read() -> KeysetFile | None:
            if not self._keyset.directory.exists():
                return None
            self._keyset.remove_stale_temps()
            try:
                attempts.append((self.directory / ATTEMPTS_FILE).read_bytes())
            except FileNotFoundError:
                pass
            return self._keyset.load() if self._keyset.exists() else None

        try:
            keyset = await self._blocking(read)
        except KeysetCorrupt as e:
            self._keyset_unusable(e)
        else:
            if keyset is not None:
                self._has_recovery = keyset.recovery is not None
        for data in attempts:
            try:
                self._limiter.restore(data)
            except (ValueError, KeyError, TypeError) as e:
                self.log.warn(
                    "persistence: ignoring the unreadable {name}: {error}",
                    name=ATTEMPTS_FILE,
                    error=str(e),
                )
            else:
                if self._limiter.failures:
                    self.log.info(
                        "persistence: {failures} wrong attempt(s) before the restart; "
                        "next attempt in {delay:.1f} s",
                        failures=self._limiter.failures,
                        delay=self._limiter.retry_after(),
                    )
        if self.volumes is not None:
            try:
                await self.volumes.sweep()
            except Exception:
                self.log.failure("volume sweep at boot failed")

    async def _stop(self) -> None:
        self._unregister()
        self._cancel_detach()
        if self.sync is not None:
            self.sync.stop()
        try:
            await self._ops.run(self._lock_for_stop)
        finally:
            for waiter in list(self._waiters):
                waiter.cancel()
            if self.volumes is not None:
                self.volumes.close()
            if self.owns_pools:
                for pool in (self.kdf_pool, self.store_pool):
                    if pool is not None and pool.started:
                        pool.stop()

    async def _lock_for_stop(self) -> None:
        if self.state is LockState.UNLOCKED:
            await self._teardown("service stopping")
            self._fire("lock", "lock: service stopping", None)

    # -- commands ------------------------------------------------------------------

    def _register(self) -> None:
        if self.dispatcher is None:
            return
        handlers: list[tuple[type[Command], Callable[..., Any]]] = [
            (SetupStorage, self._handle_setup),
            (UnlockStorage, self._handle_unlock),
            (LockStorage, self._handle_lock),
            (RecordLockState, self._handle_record_lock_state),
            (GetStorageStatus, self._handle_status),
            (ChangePassword, self._handle_change_password),
            (RotateRecoveryKey, self._handle_rotate_recovery_key),
            (EnsureVolume, self._handle_ensure_volume),
            (AttachVolume, self._handle_attach_volume),
            (DetachVolume, self._handle_detach_volume),
            (RunControlExport, self._handle_control_export),
            (RunFullExport, self._handle_full_export),
            (ListExports, self._handle_list_exports),
            (OpenExport, self._handle_open_export),
            (DeleteExport, self._handle_delete_export),
            (ImportBundle, self._handle_import),
            (VerifyPassword, self._handle_verify_password),
            (ApplyCommits, self._handle_apply_commits),
            (JoinCluster, self._handle_join),
            (DeleteVolume, self._handle_delete_volume),
            (StoreGetApp, self._handle_store_get_app),
            (StoreListApps, self._handle_store_list_apps),
            (StorePutApp, self._handle_store_put_app),
            (StoreDeleteApp, self._handle_store_delete_app),
            (StoreGetSetting, self._handle_store_get_setting),
            (StoreSetSetting, self._handle_store_set_setting),
            (StoreDeleteSetting, self._handle_store_delete_setting),
            (StoreListSettings, self._handle_store_list_settings),
            (StoreLoadRemote, self._handle_store_load_remote),
            (StoreSaveRemote, self._handle_store_save_remote),
            (StoreClearRemote, self._handle_store_clear_remote),
        ]
        self._registration = register_all(self.dispatcher, handlers)

    def _unregister(self) -> None:
        if self._registration is not None:
            self._registration.cancel()
            self._registration = None

    def _serial(self, fn: Callable[..., Awaitable[T]], *args: Any) -> Deferred[T]:
        return self._ops.run(lambda: Deferred.fromCoroutine(_await(fn(*args))))

    def _handle_setup(
        self, command: SetupStorage, context: CommandContext
    ) -> Deferred[SetupResult]:
        return self.setup(command.password, _correlation(context))

    def _handle_unlock(
        self, command: UnlockStorage, context: CommandContext
    ) -> Deferred[StorageStatus]:
        return self.unlock(command.password, command.recovery_key, _correlation(context))

    def _handle_lock(
        self, command: LockStorage, context: CommandContext
    ) -> Deferred[StorageStatus]:
        return self.lock("lock: requested", _correlation(context))

    def _handle_record_lock_state(
        self, command: RecordLockState, context: CommandContext
    ) -> Deferred[StorageStatus]:
        if command.locked:
            return self.lock("lock: record_lock_state", _correlation(context))
        if self.state is LockState.UNLOCKED:
            return succeed(self.status())
        return fail(
            Locked("storage is not unlocked; unlocking needs a secret: use persistence.unlock")
        )

    def _handle_status(self, command: GetStorageStatus, context: CommandContext) -> StorageStatus:
        return self.status()

    def _handle_change_password(
        self, command: ChangePassword, context: CommandContext
    ) -> Deferred[StorageStatus]:
        return self.change_password(command.old, command.recovery_key, command.new)

    def _handle_rotate_recovery_key(
        self, command: RotateRecoveryKey, context: CommandContext
    ) -> Deferred[RecoveryKeyRotated]:
        return self.rotate_recovery_key()

    def _handle_control_export(
        self, command: RunControlExport, context: CommandContext
    ) -> Deferred[ExportDone]:
        return self.run_export("control", _correlation(context))

    def _handle_full_export(
        self, command: RunFullExport, context: CommandContext
    ) -> Deferred[ExportDone]:
        return self.run_export("full", _correlation(context))

    def _handle_import(
        self, command: ImportBundle, context: CommandContext
    ) -> Deferred[ImportDone]:
        return self.import_bundle(command.path, _correlation(context))

    # -- auth and control-store commands (for the API and the apps subsystem) ------

    def _handle_verify_password(
        self, command: VerifyPassword, context: CommandContext
    ) -> Deferred[StorageStatus]:
        return self.verify_password(command.password)

    async def _handle_apply_commits(
        self, command: ApplyCommits, context: CommandContext
    ) -> CommitsApplied:
        try:
            return await self.store.apply(command.entries)
        except (CommitConflict, Diverged):
            # A gap or another history: the driver reads what is missing
            # (or restores from the snapshot) on its own.
            if self.sync is not None:
                self.sync.kick("apply_commits refused an entry")
            raise

    def _handle_join(
        self, command: JoinCluster, context: CommandContext
    ) -> Deferred[StorageStatus]:
        return self.join(command.password, _correlation(context))

    def verify_password(self, password: str) -> Deferred[StorageStatus]:
        """
        Check ``password`` against the keyset and change nothing (the API's
        login while storage is unlocked).  Fails with ``IllegalTransition``
        before setup, ``RateLimited`` during the delay after a wrong secret
        and ``WrongPassword`` (which counts toward that delay).
        """
        return self._serial(self._verify_password, password)

    async def _verify_password(self, password: str) -> StorageStatus:
        if self.state is LockState.UNINITIALIZED:
            raise IllegalTransition(MACHINE_NAME, self.state.value, "verify_password")
        self._limiter.check()
        keyset = await self._load_keyset()
        data_key = await self._open_keyset(keyset, password, None)
        data_key.wipe()
        return self.status()

    async def _handle_delete_volume(
        self, command: DeleteVolume, context: CommandContext
    ) -> StoreDone:
        await self._require_volumes().delete(command.volume_id)
        keyset = await self._load_keyset()
        await self._blocking(lambda: self._volume_keys.forget(keyset.keyset_id, command.volume_id))
        return StoreDone()

    @staticmethod
    def _stored(record: AppRecord) -> StoredApp:
        return StoredApp(
            name=record.name,
            spec=dict(record.spec),
            enabled=record.enabled,
            generation=record.generation,
            updated_at=record.updated_at,
        )

    async def _handle_store_get_app(
        self, command: StoreGetApp, context: CommandContext
    ) -> StoredApp:
        return self._stored(await self.apps.get(command.app))

    async def _handle_store_list_apps(
        self, command: StoreListApps, context: CommandContext
    ) -> StoredApps:
        return StoredApps(tuple(self._stored(r) for r in await self.apps.list_all()))

    async def _handle_store_put_app(
        self, command: StorePutApp, context: CommandContext
    ) -> StoredApp:
        record = await self.apps.put(AppRecord(command.app, command.spec, command.enabled))
        return self._stored(record)

    async def _handle_store_delete_app(
        self, command: StoreDeleteApp, context: CommandContext
    ) -> StoreDone:
        try:
            await self.apps.delete(command.app)
        except NotFound:  # deleting is idempotent for callers (and safe to retry)
            pass
        return StoreDone()

    async def _handle_store_get_setting(
        self, command: StoreGetSetting, context: CommandContext
    ) -> StoredSetting:
        return StoredSetting(command.key, await self.settings.get(command.key))

    async def _handle_store_set_setting(
        self, command: StoreSetSetting, context: CommandContext
    ) -> StoreDone:
        await self.settings.set(command.key, command.value)
        return StoreDone()

    async def _handle_store_delete_setting(
        self, command: StoreDeleteSetting, context: CommandContext
    ) -> StoreDone:
        try:
            await self.settings.delete(command.key)
        except NotFound:  # deleting is idempotent for callers
            pass
        return StoreDone()

    async def _handle_store_list_settings(
        self, command: StoreListSettings, context: CommandContext
    ) -> StoredSettings:
        items = await self.settings.items()
        return StoredSettings({k: v for k, v in items.items() if k.startswith(command.prefix)})

    async def _handle_store_load_remote(
        self, command: StoreLoadRemote, context: CommandContext
    ) -> StoredRemote:
        record = await self.remote.get()  # NotFound when none is stored
        return StoredRemote(record=dict(record.config), updated_at=record.updated_at)

    async def _handle_store_save_remote(
        self, command: StoreSaveRemote, context: CommandContext
    ) -> StoredRemote:
        record = await self.remote.save(command.record)
        return StoredRemote(record=dict(record.config), updated_at=record.updated_at)

    async def _handle_store_clear_remote(
        self, command: StoreClearRemote, context: CommandContext
    ) -> StoreDone:
        await self.remote.clear()
        return StoreDone()

    def _require_volumes(self) -> VolumeManagerLike:
        if self.volumes is None:
            raise NotReady(
                "no volume adapter is configured ([subsystems.persistence] volume_adapter)"
            )
        return self.volumes

    async def _handle_ensure_volume(
        self, command: EnsureVolume, context: CommandContext
    ) -> VolumeResult:
        status = await self._require_volumes().ensure(command.volume_id)
        return _volume_result(status)

    async def _handle_attach_volume(
        self, command: AttachVolume, context: CommandContext
    ) -> VolumeResult:
        volumes = self._require_volumes()
        path = await volumes.attach(command.volume_id, command.read_only)
        status = await volumes.status(command.volume_id)
        result = _volume_result(status)
        return attrs.evolve(result, path=path)

    async def _handle_detach_volume(
        self, command: DetachVolume, context: CommandContext
    ) -> VolumeResult:
        status = await self._require_volumes().detach(command.volume_id)
        return _volume_result(status)

    # -- operations (public: Deferreds, serialised by ``_ops``) ---------------------

    def setup(self, password: str, correlation: str | None = None) -> Deferred[SetupResult]:
        """
        Create the keyset (``uninitialized → locked``); fires with the
        recovery key.  Fails with ``IllegalTransition`` once initialised,
        ``InvalidCommand`` for a too short password, ``Conflict`` if a
        keyset file appeared meanwhile.
        """
        return self._serial(self._setup, password, correlation)

    def unlock(
        self,
        password: str | None = None,
        recovery_key: str | None = None,
        correlation: str | None = None,
    ) -> Deferred[StorageStatus]:
        """
        Unlock with exactly one secret (``locked → preunlock → unlocked``).
        Fails with ``IllegalTransition`` unless locked, ``RateLimited``
        during the delay after a wrong secret, ``WrongPassword`` /
        ``WrongRecoveryKey`` (state unchanged), ``InvalidCommand`` for a
        malformed recovery key, ``KeysetCorrupt``, or the error of the
        preunlock step that failed (then back to ``locked``).
        """
        return self._serial(self._unlock, password, recovery_key, correlation)

    def join(self, password: str, correlation: str | None = None) -> Deferred[StorageStatus]:
        """
        Join the cluster's shared control store (``uninitialized → locked →
        preunlock → unlocked``): take the cluster's keyset, prove
        ``password`` opens it, keep it as this node's keyset and unlock; the
        store then follows the cluster log.  Fails with
        ``IllegalTransition`` once initialised, ``NotFound`` when the
        cluster has no keyset (or no shared store), ``RateLimited`` /
        ``WrongPassword`` like unlock, ``KeysetCorrupt``.
        """
        return self._serial(self._join, password, correlation)

    def lock(
        self, reason: str = "lock: requested", correlation: str | None = None
    ) -> Deferred[StorageStatus]:
        """
        Lock (``unlocked → locked``): stop the periodic checks, close the
        store, detach the volumes, wipe the data key.  Idempotent when
        locked; ``IllegalTransition`` when uninitialised.
        """
        return self._serial(self._lock, reason, correlation)

    def change_password(
        self, old: str | None, recovery_key: str | None, new: str
    ) -> Deferred[StorageStatus]:
        """
        Rewrap the data key under ``new`` after proving ``old`` (or the
        recovery key); atomic on disk; the lock state does not change.
        Wrong secrets are rate-limited like unlock attempts.
        """
        return self._serial(self._change_password, old, recovery_key, new)

    def rotate_recovery_key(self) -> Deferred[RecoveryKeyRotated]:
        """A fresh recovery key (needs unlocked storage); the old one stops working."""
        return self._serial(self._rotate_recovery_key)

    def run_export(self, kind: str, correlation: str | None = None) -> Deferred[ExportDone]:
        """
        Write a ``control`` or ``full`` bundle (see :mod:`.exports`) into
        ``<state_dir>/exports/<kind>/``.  Storage is quiesced first: when
        unlocked it is locked (store closed, volumes detached), the files
        are collected, and it is unlocked again with the same data key.
        Publishes ``JobProgress`` (class ``export``) and ``ExportResult``.
        Fails with ``IllegalTransition`` before setup.

        With the kernel's job runner the export runs as an ``export`` job
        (its class limit applies, it shows in ``/api/v1/jobs`` with its
        progress, and it can be cancelled); without one it runs directly.
        """
        if self.jobs is None:
            return self._serial(self._export, kind, correlation)
        from piccolod.kernel.jobs import JobSpec

        handle = self.jobs.submit(
            JobSpec(
                job_class="export",
                fn=lambda control: self._serial(self._export, kind, correlation, control),
                name=f"{kind} export",
                metadata={"kind": kind, **({"correlation_id": correlation} if correlation else {})},
            )
        )
        return handle.result()

    def import_bundle(self, path: str, correlation: str | None = None) -> Deferred[ImportDone]:
        """
        Restore a bundle into this (empty) state dir; the state goes from
        ``uninitialized`` to ``locked`` and the bundle's password unlocks
        it.  Fails with ``IllegalTransition`` once set up, ``Conflict``
        when storage files exist, ``BundleInvalid`` for a damaged or
        tampered bundle (nothing is put in place).
        """
        return self._serial(self._import, path, correlation)

    # -- operations (bodies, run under ``_ops``) ---------------------------------------

    def _require(self, trigger: str) -> None:
        if not self._machine.can(trigger):
            raise IllegalTransition(MACHINE_NAME, self.state.value, trigger)

    def _check_new_password(self, password: str) -> None:
        if len(password) < self.config.min_password_length:
            raise InvalidCommand(
                f"the password must have at least {self.config.min_password_length} characters"
            )

    async def _setup(self, password: str, correlation: str | None = None) -> SetupResult:
        """
        Create the keyset (``uninitialized → locked``).  Fails with
        ``IllegalTransition`` once initialised, ``InvalidCommand`` for a
        too short password, ``Conflict`` if a keyset file appeared.
        """
        self._require("setup")
        self._check_new_password(password)
        if self._has_handler(FencedPut.name):
            self._require_cluster_leader("setup")
            if await self._cluster_keyset() is not None:
                raise Conflict(
                    "this cluster has a keyset already: join it (persistence.join) "
                    "with the cluster's admin password instead of setting up"
                )
        params, now = self.config.kdf, self.reactor.seconds()

        def create() -> list[str]:
            keyset, data_key, words = keysets.create_keyset(password, params, now)
            data_key.wipe()
            self._keyset.create(keyset)
            return words

        words = await self._blocking(create)
        self._has_recovery = True
        self._error = None
        self._fire("setup", "setup", correlation)
        await self._publish_keyset_quietly()
        return SetupResult(state=self.state.value, recovery_key=" ".join(words))

    async def _unlock(
        self,
        password: str | None = None,
        recovery_key: str | None = None,
        correlation: str | None = None,
    ) -> StorageStatus:
        """
        Unlock with exactly one secret (``locked → preunlock → unlocked``).
        Fails with ``IllegalTransition`` unless locked, ``RateLimited``
        during the delay after a wrong secret, ``WrongPassword`` /
        ``WrongRecoveryKey`` (state unchanged), ``InvalidCommand`` for a
        malformed recovery key, ``KeysetCorrupt``, or the error of the
        preunlock step that failed (then back to ``locked``).
        """
        if (password is None) == (recovery_key is None):
            raise InvalidCommand("give exactly one of password or recovery_key")
        self._require("unlock")
        self._clear_busy()  # the unlock's sweep owns the volumes from here
        self._limiter.check()
        keyset = await self._load_keyset()
        adopted = await self._adopt_cluster_keyset(keyset, password, recovery_key)
        if adopted is not None:
            keyset, data_key = adopted
        else:
            data_key = await self._open_keyset(keyset, password, recovery_key)
        how = "password" if password is not None else "recovery key"
        await self._preunlock(data_key, keyset, f"unlock: {how}", correlation)
        return self.status()

    async def _lock(
        self, reason: str = "lock: requested", correlation: str | None = None
    ) -> StorageStatus:
        """
        Lock (``unlocked → locked``): stop the periodic checks, close the
        store, detach the volumes, wipe the data key.  Idempotent when
        locked; ``IllegalTransition`` when uninitialised.
        """
        if self.state is LockState.LOCKED:
            return self.status()
        self._require("lock")
        await self._teardown(reason)
        self._fire("lock", reason, correlation)
        return self.status()

    async def _change_password(
        self, old: str | None, recovery_key: str | None, new: str
    ) -> StorageStatus:
        """
        Rewrap the data key under ``new`` after proving ``old`` (or the
        recovery key); atomic on disk; the lock state does not change.
        Wrong secrets are rate-limited like unlock attempts.
        """
        if (old is None) == (recovery_key is None):
            raise InvalidCommand("give exactly one of old or recovery_key")
        if self.state is LockState.UNINITIALIZED:
            raise IllegalTransition(MACHINE_NAME, self.state.value, "change_password")
        self._check_new_password(new)
        if self._has_handler(FencedPut.name):
            self._require_cluster_leader("change the password")
        self._limiter.check()
        keyset = await self._load_keyset()
        data_key = await self._open_keyset(keyset, old, recovery_key)
        params, now = self.config.kdf, self.reactor.seconds()

        def rewrap() -> None:
            try:
                self._keyset.replace(
                    keyset, keysets.rewrap_password(keyset, data_key, new, params, now)
                )
            finally:
                data_key.wipe()

        await self._blocking(rewrap)
        self.log.info("persistence: the password was changed")
        await self._publish_keyset_quietly()
        return self.status()

    async def _rotate_recovery_key(self) -> RecoveryKeyRotated:
        """A fresh recovery key (needs unlocked storage); the old one stops working."""
        data_key = self._data_key
        if self.state is not LockState.UNLOCKED or data_key is None:
            raise Locked("rotating the recovery key needs unlocked storage")
        if self._has_handler(FencedPut.name):
            self._require_cluster_leader("rotate the recovery key")
        keyset = await self._load_keyset()
        now = self.reactor.seconds()

        def rotate() -> list[str]:
            updated, words = keysets.rotate_recovery_key(keyset, data_key, now)
            self._keyset.replace(keyset, updated)
            return words

        words = await self._blocking(rotate)
        self._has_recovery = True
        self.log.info("persistence: the recovery key was rotated")
        await self._publish_keyset_quietly()
        return RecoveryKeyRotated(recovery_key=" ".join(words))

    async def _export(self, kind: str, correlation: str | None, control: Any = None) -> ExportDone:
        if kind not in ("control", "full"):
            raise InvalidCommand(f"unknown export kind {kind!r}")
        if self.state is LockState.UNINITIALIZED:
            raise IllegalTransition(MACHINE_NAME, self.state.value, f"{kind}_export")
        job_id = control.job_id if control is not None else f"export-{secrets.token_hex(4)}"
        # Under the job runner, progress goes through the job (which publishes
        # it with the job's id); the runner publishes the final state itself.
        progress = (
            control.report if control is not None else self._progress_reporter(job_id, correlation)
        )
        publish_final = control is None
        progress(0.0, f"{kind} export: quiescing storage")
        keyset = await self._load_keyset()
        key_copy: DataKey | None = None
        if self.state is LockState.UNLOCKED and self._data_key is not None:
            key_copy = self._data_key.copy()
            await self._teardown(f"{kind} export")
            self._fire("lock", f"lock: {kind} export", correlation)
        state_dir, volumes = self.directory.parent, self.volumes is not None
        now = self.reactor.seconds()
        threaded = self._threadsafe(progress)
        try:
            keep = self.config.keep_exports

            def write() -> tuple[exports.ExportInfo, list[str]]:
                info = exports.write_bundle(
                    state_dir,
                    exports.collect(state_dir, kind, volumes),
                    kind=kind,
                    created_at=now,
                    keyset_id=keyset.keyset_id,
                    progress=threaded,
                )
                return info, exports.prune_bundles(state_dir, kind, keep)

            info, pruned = await self._blocking(write)
        except BaseException as e:
            self.bus.publish(
                ExportResult(kind=kind, ok=False, detail=_describe(e)),
                source="persistence",
                correlation_id=correlation,
            )
            if publish_final:
                self._publish_progress(job_id, "failed", 1.0, _describe(e), correlation)
            raise
        finally:
            if key_copy is not None:
                try:
                    await self._preunlock(
                        key_copy, keyset, f"unlock: after {kind} export", correlation
                    )
                except Exception:
                    self.log.failure("persistence: unlocking again after the export failed")
        self.bus.publish(
            ExportResult(kind=kind, ok=True, path=info.path, sha256=info.sha256),
            source="persistence",
            correlation_id=correlation,
        )
        if publish_final:
            self._publish_progress(job_id, "succeeded", 1.0, f"wrote {info.path}", correlation)
        self.log.info(
            "persistence: {kind} export written to {path} ({size} bytes)",
            kind=kind,
            path=info.path,
            size=info.size,
        )
        if pruned:
            self.log.info(
                "persistence: removed {count} older {kind} export(s) (keep_exports = {keep})",
                count=len(pruned),
                kind=kind,
                keep=self.config.keep_exports,
            )
        return ExportDone(
            kind=kind,
            path=info.path,
            sha256=info.sha256,
            size=info.size,
            files=info.files,
            created_at=info.created_at,
            name=Path(info.path).name,
            pruned=tuple(pruned),
        )

    # -- bundles on the box --------------------------------------------------------

    def _handle_list_exports(self, command: ListExports, context: CommandContext) -> Any:
        state_dir = self.directory.parent

        def found(bundles: list[exports.BundleFile]) -> ExportList:
            entries = tuple(
                ExportEntry(kind=b.kind, name=b.name, size=b.size, created_at=b.created_at)
                for b in bundles
            )
            return ExportList(exports=entries, keep=self.config.keep_exports)

        return self._blocking(lambda: exports.list_bundles(state_dir)).addCallback(found)

    def _handle_open_export(self, command: OpenExport, context: CommandContext) -> Any:
        state_dir = self.directory.parent
        d = self._blocking(lambda: exports.bundle_file(state_dir, command.kind, command.bundle))
        return d.addCallback(
            lambda b: ExportFile(kind=b.kind, name=b.name, path=str(b.path), size=b.size)
        )

    def _handle_delete_export(self, command: DeleteExport, context: CommandContext) -> Any:
        state_dir = self.directory.parent
        d = self._blocking(lambda: exports.delete_bundle(state_dir, command.kind, command.bundle))
        return d.addCallback(
            lambda b: ExportEntry(kind=b.kind, name=b.name, size=b.size, created_at=b.created_at)
        )

    async def _import(self, path: str, correlation: str | None) -> ImportDone:
        if not isinstance(path, str) or not Path(path).is_absolute():
            raise InvalidCommand("the bundle path must be absolute")
        self._require("setup")
        state_dir = self.directory.parent
        info = await self._blocking(lambda: exports.restore_bundle(Path(path), state_dir))
        await self._load_keyset()
        self._error = None
        self._fire("setup", f"import: {info.kind} bundle", correlation)
        if self.volumes is not None:
            try:
                await self.volumes.sweep()
            except Exception:
                self.log.failure("persistence: volume sweep after import failed")
        return ImportDone(kind=info.kind, path=info.path, files=info.files)

    def _progress_reporter(
        self, job_id: str, correlation: str | None
    ) -> Callable[[float, str], None]:
        def report(progress: float, message: str) -> None:
            self._publish_progress(job_id, "running", progress, message, correlation)

        return report

    def _publish_progress(
        self, job_id: str, state: str, progress: float, message: str, correlation: str | None
    ) -> None:
        self.bus.publish(
            JobProgress(
                job_id=job_id,
                job_class="export",
                state=state,
                progress=progress,
                message=message,
            ),
            source="persistence",
            correlation_id=correlation,
        )

    def _threadsafe(self, fn: Callable[[float, str], None]) -> Callable[[float, str], None]:
        """``fn`` callable from the blocking pool (hops to the reactor thread)."""
        if self.kdf_pool is None:
            return fn

        def hop(progress: float, message: str) -> None:
            self.reactor.callFromThread(fn, progress, message)

        return hop

    # -- unlock internals ------------------------------------------------------------

    async def _load_keyset(self) -> KeysetFile:
        def load() -> KeysetFile:
            try:
                return self._keyset.load()
            except FileNotFoundError:
                raise KeysetCorrupt(
                    f"the keyset file {self._keyset.path} has disappeared"
                ) from None

        try:
            keyset = await self._blocking(load)
        except KeysetCorrupt as e:
            self._keyset_unusable(e)
            raise
        self._has_recovery = keyset.recovery is not None
        return keyset

    async def _open_keyset(
        self, keyset: KeysetFile, password: str | None, recovery_key: str | None
    ) -> DataKey:
        if recovery_key is not None:
            # A malformed phrase fails here (InvalidCommand), without counting
            # as an attempt: its checksum is public, checking it reveals nothing.
            keysets.decode_recovery_key(recovery_key)

            def open_key() -> DataKey:
                return keysets.open_with_recovery_key(keyset, recovery_key)
        else:
            assert password is not None

            def open_key() -> DataKey:
                return keysets.open_with_password(keyset, password)

        try:
            data_key = await self._blocking(open_key)
        except (WrongPassword, WrongRecoveryKey):
            delay = self._limiter.failed()
            self.log.warn(
                "persistence: wrong secret (failure {failures}); next attempt in {delay} s",
                failures=self._limiter.failures,
                delay=delay,
            )
            await self._save_attempts()  # before answering: a restart does not reset it
            raise
        await self._attempts_succeeded()
        return data_key

    async def _save_attempts(self) -> None:
        data = self._limiter.to_bytes()
        path = self.directory / ATTEMPTS_FILE

        def write() -> None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(path, data)

        try:
            await self._blocking(write)
        except Exception as e:
            self.log.error(
                "persistence: could not save the unlock attempt counter: {error}",
                error=_describe(e),
            )

    async def _attempts_succeeded(self) -> None:
        if self._limiter.failures or self._limiter.not_before:
            self._limiter.succeeded()
            await self._save_attempts()

    async def _step(self, step: str) -> None:
        if self.preunlock_hook is not None:
            await call(self.preunlock_hook, step)

    def _follower(self) -> bool:
        return self.registry is not None and self.registry.role(CONTROL_PLANE) is Role.FOLLOWER

    async def _preunlock(
        self, data_key: DataKey, keyset: KeysetFile, reason: str, correlation: str | None
    ) -> None:
        self._data_key = data_key
        self._keyset_id = keyset.keyset_id
        self._fire("unlock", reason, correlation)
        try:
            await self._step("keys")
            await self._load_secrets(self.config.volumes)
            await self._step("volumes")
            store_dir = self.directory / "control"
            read_only = False
            if self.volumes is not None:
                # With a cluster log a follower's store takes the log's
                # entries, so it is opened read-write (the leader gate
                # still refuses its own writes).
                replicated = self.sync is not None and self.sync.can_sync()
                follower = self._follower() and not replicated
                for volume_id in self.config.volumes:
                    await self.volumes.ensure(volume_id)
                    ro = follower and volume_id == self.config.store_volume
                    path = await self.volumes.attach(volume_id, ro)
                    if volume_id == self.config.store_volume:
                        store_dir, read_only = Path(path), ro
            await self._step("store")
            await self.store.open(
                store_dir / "control.db",
                store_key(data_key),
                read_only=read_only,
                marker=self.directory / "control-store.json",
                check=self.config.check_on_unlock,
                log_key=log_key(data_key),
            )
            if self.volumes is not None:
                # Bring back what the lock detached (app volumes wanted
                # attached); one volume's problem is recorded, not raised.
                try:
                    await self.volumes.sweep()
                except Exception:
                    self.log.failure("persistence: volume sweep at unlock failed")
            await self._step("ready")
        except BaseException as e:
            self.log.warn(
                "persistence: preunlock failed, locking again: {error}", error=_describe(e)
            )
            await self._teardown(f"preunlock failed: {_describe(e)}")
            self._fire("failed", f"preunlock failed: {_describe(e)}", correlation)
            raise
        self._fire("opened", "opened", correlation)
        self._start_maintenance()
        if self.sync is not None:
            self.sync.opened()
        for waiter in list(self._waiters):
            self._waiters.remove(waiter)
            waiter.callback(None)

    async def _teardown(self, reason: str) -> None:
        """Undo everything unlock opened; never raises (errors are logged)."""
        self._stop_maintenance()
        if self.sync is not None:
            self.sync.closed()
        await self.store.close()
        if self.sync is not None:
            self.sync.closed()
        if self.volumes is not None:
            try:
                await self.volumes.detach_all(reason)
            except VolumeBusy as e:
                # Apps still hold files there: they stop once ``locked`` is
                # published (right after this), and a retry detaches then.
                self.log.warn(
                    "persistence: {error}; detaching again while their users stop",
                    error=str(e),
                )
                self._busy_since = self.reactor.seconds()
                self._busy_detail = str(e)
                self._schedule_detach()
            except Exception as e:
                self.log.failure("persistence: detaching volumes while locking")
                self._busy_since = self.reactor.seconds()
                self._busy_detail = f"volumes left attached: {e}"
                self._schedule_detach()
        self._wipe()

    # -- volumes still attached after a lock ---------------------------------------------

    def _schedule_detach(self) -> None:
        self._cancel_detach()
        self._busy_call = self.reactor.callLater(self.busy_retry_interval, self._detach_again)

    def _cancel_detach(self) -> None:
        call, self._busy_call = self._busy_call, None
        if call is not None and call.active():
            call.cancel()

    def _clear_busy(self) -> None:
        self._cancel_detach()
        self._busy_since = None
        self._busy_detail = ""

    def _detach_again(self) -> None:
        self._busy_call = None
        self._serial(self._detach_still_attached).addErrback(
            lambda f: self.log.failure("persistence: detaching volumes after the lock", f)
        )

    async def _detach_still_attached(self) -> None:
        if self._busy_since is None or self.state is not LockState.LOCKED or not self.running:
            return  # unlocked (or stopping) meanwhile: that path owns the volumes now
        assert self.volumes is not None
        try:
            detached = await self.volumes.detach_all("lock: detaching a busy volume again")
        except Exception as e:
            self._busy_detail = str(e)
            overdue = self.reactor.seconds() - self._busy_since >= self.busy_retry_for
            if overdue and self.health is not None:
                self.health.report(
                    HEALTH, HealthLevel.ERROR, f"locked, but still attached: {self._busy_detail}"
                )
            self._schedule_detach()
            return
        self.log.info("persistence: detached {volumes} after the lock", volumes=", ".join(detached))
        self._clear_busy()
        self._report_health()

    def _wipe(self) -> None:
        key, self._data_key = self._data_key, None
        if key is not None:
            key.wipe()
        for passphrase in self._secrets.values():
            passphrase[:] = bytes(len(passphrase))
        self._secrets.clear()

    # -- the cluster's keyset ----------------------------------------------------------

    def _has_handler(self, name: str) -> bool:
        return self.dispatcher is not None and name in self.dispatcher.names()

    def _require_cluster_leader(self, what: str) -> None:
        """``NotLeader`` (with the leader's hint) unless this node leads ``control-plane``."""
        if self.registry is not None and not self.registry.is_leader(CONTROL_PLANE):
            self.registry.require_leader(CONTROL_PLANE)
            raise NotLeader(CONTROL_PLANE)

    async def _cluster_keyset(self, timeout: float | None = None) -> KeysetFile | None:
        """The cluster's keyset (``None``: it has none); ``KeysetCorrupt`` if malformed."""
        if self.dispatcher is None or not self._has_handler(ReadClusterKey.name):
            return None
        context = CONTEXT._replace(timeout=timeout) if timeout is not None else CONTEXT
        found = await self.dispatcher.dispatch(ReadClusterKey(CLUSTER_KEYSET), context)
        if not isinstance(found, ClusterValue) or found.value is None:
            return None
        return KeysetFile.from_bytes(found.value.encode("utf-8"))

    async def _publish_keyset(self) -> bool:
        """
        Put this node's keyset at ``control/keyset`` when this node leads
        ``control-plane`` and the cluster has none or an older generation of
        the same keyset; returns whether it wrote.  Never overwrites another
        keyset or a newer generation.
        """
        if self.dispatcher is None or not self._has_handler(FencedPut.name):
            return False
        if self.registry is not None and not self.registry.is_leader(CONTROL_PLANE):
            return False
        if self.state is LockState.UNINITIALIZED:
            return False
        local = await self._load_keyset()
        shared = await self._cluster_keyset()
        if shared is not None:
            if shared.keyset_id != local.keyset_id:
                self.log.error(
                    "persistence: the cluster's keyset {shared} is not this node's {local}; "
                    "not replacing it",
                    shared=shared.keyset_id,
                    local=local.keyset_id,
                )
                return False
            if shared.generation >= local.generation:
                return False
        await self.dispatcher.dispatch(
            FencedPut(CLUSTER_KEYSET, local.to_bytes().decode("utf-8"), CONTROL_PLANE), CONTEXT
        )
        self.log.info(
            "persistence: published keyset generation {generation} to the cluster",
            generation=local.generation,
        )
        return True

    async def _publish_keyset_quietly(self) -> None:
        """:meth:`_publish_keyset`, logging failures (the next leader sync retries)."""
        try:
            await self._publish_keyset()
        except Exception as e:
            self.log.warn(
                "persistence: publishing the keyset to the cluster failed: {error}",
                error=_describe(e),
            )

    async def _adopt_cluster_keyset(
        self, keyset: KeysetFile, password: str | None, recovery_key: str | None
    ) -> tuple[KeysetFile, DataKey] | None:
        """
        At unlock: when the cluster holds a newer generation of this
        node's keyset (the password or recovery key changed on the leader)
        and the given secret opens it, keep it (atomically) and return it
        with the data key.  ``None``: use the local keyset.
        """
        try:
            shared = await self._cluster_keyset(CLUSTER_KEYSET_TIMEOUT)
        except Exception as e:
            self.log.warn(
                "persistence: could not read the cluster's keyset at unlock: {error}",
                error=_describe(e),
            )
            return None
        if (
            shared is None
            or shared.keyset_id != keyset.keyset_id
            or shared.generation <= keyset.generation
        ):
            return None

        def open_shared() -> DataKey | None:
            try:
                if recovery_key is not None:
                    return keysets.open_with_recovery_key(shared, recovery_key)
                assert password is not None
                return keysets.open_with_password(shared, password)
            except (WrongPassword, WrongRecoveryKey):
                return None

        data_key = await self._blocking(open_shared)
        if data_key is None:
            return None
        try:
            await self._blocking(lambda: self._keyset.replace(keyset, shared))
        except BaseException:
            data_key.wipe()
            raise
        await self._attempts_succeeded()
        self._has_recovery = shared.recovery is not None
        self.log.info(
            "persistence: adopted the cluster's keyset generation {generation}",
            generation=shared.generation,
        )
        return shared, data_key

    async def _join(self, password: str, correlation: str | None) -> StorageStatus:
        self._require("setup")
        if not self._has_handler(ReadClusterKey.name):
            raise NotFound("this node's consensus has no shared store to join")
        self._limiter.check()
        shared = await self._cluster_keyset()
        if shared is None:
            raise NotFound("the cluster has no keyset yet: set up its leader first")
        data_key = await self._open_keyset(shared, password, None)
        try:
            await self._blocking(lambda: self._keyset.create(shared))
        except BaseException:
            data_key.wipe()
            raise
        self._has_recovery = shared.recovery is not None
        self._error = None
        self._fire("setup", "join: took the cluster's keyset", correlation)
        await self._preunlock(data_key, shared, "unlock: join", correlation)
        return self.status()

    # -- the machine -----------------------------------------------------------------

    def _fire(self, trigger: str, reason: str, correlation: str | None) -> None:
        self._reason, self._correlation = reason, correlation
        self._machine.fire(trigger)

    def _transitioned(self, transition: Transition[LockState]) -> None:
        self._announce(transition.previous)
        self._report_health()

    def _announce(self, previous: LockState | None) -> None:
        self.log.info(
            "persistence: {state} ({reason})", state=self.state.value, reason=self._reason
        )
        self.bus.publish(
            LockStateChanged(state=self.state, previous=previous, reason=self._reason),
            source="persistence",
            correlation_id=self._correlation,
        )

    def _report_health(self) -> None:
        if self.health is None or self._error is not None:
            return
        if self._busy_since is not None and self.state is LockState.LOCKED:
            self.health.report(
                HEALTH, HealthLevel.WARN, f"locked, detaching again: {self._busy_detail}"
            )
            return
        self.health.report(HEALTH, HealthLevel.OK, self.state.value)

    def _keyset_unusable(self, error: KeysetCorrupt) -> None:
        self._error = error.detail
        self.log.error("persistence: the keyset is unusable: {error}", error=error.detail)
        if self.health is not None:
            self.health.report(HEALTH, HealthLevel.ERROR, error.detail)

    # -- periodic maintenance -------------------------------------------------------

    def _start_maintenance(self) -> None:
        self._stop_maintenance()
        schedule = (
            (self.config.checkpoint_interval, self.run_checkpoint, "checkpoint"),
            (self.config.check_interval, self.run_quick_check, "quick-check"),
        )
        for interval, fn, label in schedule:
            if self.jobs is not None:
                from piccolod.kernel.jobs import JobSpec

                def spec(
                    fn: Callable[[], Deferred[Any]] = fn,
                    label: str = label,
                    interval: float = interval,
                ) -> JobSpec:
                    return JobSpec(
                        job_class="persistence",
                        fn=lambda _control: fn(),
                        name=f"control store {label}",
                        timeout=max(60.0, interval),
                    )

                self._maintenance.append(self.jobs.every(interval, spec))
            else:
                loop = LoopingCall(fn)
                loop.clock = self.reactor
                loop.start(interval, now=False)
                self._maintenance.append(loop)

    def _stop_maintenance(self) -> None:
        while self._maintenance:
            task = self._maintenance.pop()
            if isinstance(task, LoopingCall):
                if task.running:
                    task.stop()
            else:
                task.stopService()

    def run_quick_check(self) -> Deferred[CheckResult | None]:
        """
        ``quick_check`` then the checksum chain; publishes
        ``ControlStoreHealth`` and reports health.  Never fails; fires with
        ``None`` while the store is closed.
        """
        return Deferred.fromCoroutine(self._quick_check())

    async def _quick_check(self) -> CheckResult | None:
        if not self.store.is_open:
            return None
        revision = self.store.info().revision
        try:
            result = await self.store.quick_check()
            if result.ok:
                chain = await self.store.verify_chain()
                result = CheckResult(chain.ok, f"{result.detail}; {chain.detail}", result.revision)
        except Locked:
            return None
        except Exception as e:
            result = CheckResult(False, _describe(e), revision)
        self._store_health(result.ok, result.detail, result.revision)
        return result

    def run_checkpoint(self) -> Deferred[bool | None]:
        """A passive WAL checkpoint; publishes ``ControlStoreHealth``; never fails."""
        return Deferred.fromCoroutine(self._checkpoint())

    async def _checkpoint(self) -> bool | None:
        if not self.store.is_open or self.store.info().read_only:
            return None
        revision = self.store.info().revision
        try:
            result = await self.store.checkpoint("PASSIVE")
        except Locked:
            return None
        except Exception as e:
            self._store_health(False, f"checkpoint: {_describe(e)}", revision)
            return False
        detail = f"checkpoint: {result.checkpointed}/{result.log_frames} WAL frames" + (
            " (busy)" if result.busy else ""
        )
        self._store_health(True, detail, revision)
        return True

    def _store_health(self, ok: bool, detail: str, revision: int) -> None:
        if not ok:
            self.log.error("persistence: control store check failed: {detail}", detail=detail)
        self.bus.publish(
            ControlStoreHealth(ok=ok, detail=detail, revision=revision), source="persistence"
        )
        if self.health is not None:
            level = HealthLevel.OK if ok else HealthLevel.ERROR
            self.health.report(STORE_HEALTH, level, detail, {"revision": float(revision)})

    # -- threads ------------------------------------------------------------------------

    def _blocking(self, fn: Callable[[], T]) -> Deferred[T]:
        if self.kdf_pool is None:
            try:
                return succeed(fn())
            except BaseException as e:
                return fail(e)
        return deferToThreadPool(self.reactor, self.kdf_pool, fn)


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _correlation(context: CommandContext) -> str | None:
    return context.correlation_id or context.command_id


def _volume_result(status: Any) -> VolumeResult:
    detail = status.to_json() if hasattr(status, "to_json") else {}
    return VolumeResult(
        volume_id=str(status.volume_id),
        state=str(status.state),
        path=getattr(status, "path", None),
        detail=dict(detail),
    )


def _volume_manager_factory(
    adapter: Any, reactor: Any, state_dir: Path, bus: IEventBus
) -> Callable[[Callable[[str], Deferred[bytes]]], VolumeManagerLike] | None:
    """Build the volume manager over ``adapter`` (``None``: no volumes)."""
    if adapter is None:
        return None
    from piccolod.persistence.volumes import VolumeManager

    def build(secret_for: Callable[[str], Deferred[bytes]]) -> VolumeManagerLike:
        return VolumeManager(reactor, state_dir, adapter, bus, secret_for)

    return build
