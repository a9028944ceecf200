"""Tests for piccolod.persistence.service: the lock machine, its commands and failure handling."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.commands import (
    AttachVolume,
    ChangePassword,
    CommandContext,
    DetachVolume,
    EnsureVolume,
    GetStorageStatus,
    LockStorage,
    RecordLockState,
    RotateRecoveryKey,
    SetupStorage,
    UnlockStorage,
)
from piccolod.errors import (
    ConfigError,
    Conflict,
    IllegalTransition,
    InvalidCommand,
    Locked,
    NotReady,
    RateLimited,
    TransientError,
)
from piccolod.events import (
    AuditRecord,
    ControlStoreHealth,
    HealthLevel,
    LockState,
    LockStateChanged,
    Role,
)
from piccolod.interfaces import AppRecord, IControlStore, IPersistence
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.fsm import LOCK_MACHINE
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.jobs import JobRunner
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.persistence.directory import DirectoryVolumes
from piccolod.persistence.errors import KeysetCorrupt, StoreUnreadable, WrongPassword
from piccolod.persistence.keyset import KdfParams
from piccolod.persistence.service import (
    PREUNLOCK_STEPS,
    PersistenceConfig,
    PersistenceService,
)
from piccolod.persistence.store import CheckpointResult, CheckResult, ControlStore
from piccolod.persistence.volumes import VolumeBusy, VolumeError, VolumeManager
from piccolod.testing.bus import FakeEventBus

PASSWORD = "correct horse battery"
FAST = KdfParams(time_cost=1, memory_kib=8, parallelism=1)


class Boom(TransientError):
    """An injected failure."""


class FlakyAdapter(DirectoryVolumes):
    """The directory adapter with injectable mount failures (per volume id)."""

    fail_mount: set[str]
    busy: set[str]

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fail_mount = set()
        self.busy = set()

    def unmount(self, volume_id: str) -> Deferred[None]:
        if volume_id in self.busy and self.is_mounted(volume_id):
            return fail(VolumeBusy(f"{volume_id} is busy"))
        return super().unmount(volume_id)

    def mount(self, volume_id: str, passphrase: bytes, read_only: bool) -> Deferred[str]:
        if volume_id in self.fail_mount:
            return fail(VolumeError(f"injected mount failure of {volume_id}"))
        return super().mount(volume_id, passphrase, read_only)


class Harness(SynchronousTestCase):
    """A service on a temp state dir with the real kernel parts on a Clock, all inline."""

    volumes = True

    def setUp(self) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix="persistence-"))
        self.addCleanup(shutil.rmtree, self.state_dir, True)
        self.clock = Clock()
        self.clock.advance(10_000)
        self.bus = FakeEventBus(self.clock)
        self.registry = LeadershipRegistry(self.bus, "node-a")
        self.registry.update(
            "control-plane", Role.LEADER, 1, leader_id="node-a", leader_address="http://a"
        )
        self.dispatcher = CommandDispatcher(self.clock, self.bus, registry=self.registry)
        self.health = HealthTracker(self.clock, self.bus)
        self.adapter = FlakyAdapter(self.clock, self.state_dir)
        self.hook_calls: list[str] = []
        self.fail_at: str | None = None
        self.hold_at: str | None = None
        self.held: Deferred[None] | None = None
        self.service = self.make()
        self.service.startService()
        self.addCleanup(self.stop)

    def make(self, **kwargs: Any) -> PersistenceService:
        config = kwargs.pop("config", PersistenceConfig(kdf=FAST))
        factory: Callable[..., Any] | None = None
        if self.volumes:

            def factory(secret_for: Any) -> VolumeManager:
                return VolumeManager(self.clock, self.state_dir, self.adapter, self.bus, secret_for)

        kwargs.setdefault("volume_manager_factory", factory)
        return PersistenceService(
            self.clock,
            self.state_dir / "persistence",
            self.bus,
            config,
            dispatcher=self.dispatcher,
            registry=self.registry,
            health=self.health,
            preunlock_hook=self.hook,
            **kwargs,
        )

    def stop(self) -> None:
        if self.service.running:
            self.successResultOf(self.service.stopService())
        self.bus.flush()

    def hook(self, step: str) -> Any:
        self.hook_calls.append(step)
        if step == self.fail_at:
            raise Boom(f"injected failure at {step}")
        if step == self.hold_at:
            self.held = Deferred()
            return self.held
        return None

    # -- helpers

    def dispatch(self, command: Any, context: CommandContext | None = None) -> Deferred[Any]:
        return self.dispatcher.dispatch(command, context)

    def setup_storage(self) -> str:
        result = self.successResultOf(self.service.setup(PASSWORD))
        return str(result.recovery_key)

    def unlock(self) -> None:
        self.successResultOf(self.service.unlock(password=PASSWORD))
        self.assertIs(self.service.state, LockState.UNLOCKED)

    def lock_events(self) -> list[tuple[LockState | None, LockState]]:
        self.bus.flush()
        out = []
        for event in self.bus.events(LockStateChanged.topic):
            assert isinstance(event, LockStateChanged)
            out.append((event.previous, event.state))
        return out

    def assert_nothing_open(self) -> None:
        self.assertFalse(self.service.store.is_open)
        self.assertEqual(list(self.adapter.mounted()), [])
        self.assertIsNone(self.service.data_key)
        self.assertEqual(self.service._secrets, {})
        self.assertFalse(any(p.is_symlink() for p in (self.state_dir / "volumes").rglob("*")))


U, L, P, UL = LockState.UNINITIALIZED, LockState.LOCKED, LockState.PREUNLOCK, LockState.UNLOCKED


class LockMachineTests(Harness):
    def test_provides_interfaces(self) -> None:
        """The service verifiably provides IPersistence and IControlStore."""
        self.assertTrue(verifyObject(IPersistence, self.service))
        self.assertTrue(verifyObject(IControlStore, self.service))

    def test_start_publishes_retained_state(self) -> None:
        """Start publishes a retained LockStateChanged a late subscriber can read."""
        self.assertIs(self.service.state, U)
        envelope = self.bus.last(LockStateChanged.topic)
        assert envelope is not None
        self.assertEqual(envelope.event, LockStateChanged(U, None, "start"))

    def test_legal_path_publishes_every_transition(self) -> None:
        """setup, unlock, lock walk U→L→P→UL→L with one event per transition."""
        self.setup_storage()
        self.unlock()
        self.successResultOf(self.service.lock())
        self.assertEqual(self.lock_events(), [(None, U), (U, L), (L, P), (P, UL), (UL, L)])
        self.assertEqual(self.hook_calls, list(PREUNLOCK_STEPS))
        last = self.bus.last(LockStateChanged.topic)
        assert last is not None
        self.assertEqual(last.event.state, L)

    def test_failed_preunlock_transition(self) -> None:
        """A failing preunlock walks L→P→L and says why."""
        self.setup_storage()
        self.fail_at = "store"
        self.failureResultOf(self.service.unlock(password=PASSWORD), Boom)
        self.assertEqual(self.lock_events()[-2:], [(L, P), (P, L)])
        last = self.bus.last(LockStateChanged.topic)
        assert last is not None
        self.assertIn("injected failure at store", last.event.reason)

    def test_machine_refuses_every_transition_not_in_the_table(self) -> None:
        """In each state, every trigger outside LOCK_MACHINE raises and changes nothing."""
        triggers = sorted({t for (_, t) in LOCK_MACHINE})
        seen: set[LockState] = set()

        def check_here() -> None:
            state = self.service.state
            seen.add(state)
            for trigger in triggers:
                legal = (state, trigger) in LOCK_MACHINE
                self.assertEqual(self.service.machine.can(trigger), legal, (state, trigger))
                if not legal:
                    with self.assertRaises(IllegalTransition):
                        self.service.machine.fire(trigger)
                    self.assertIs(self.service.state, state)

        check_here()
        self.setup_storage()
        check_here()
        self.hold_at = "ready"
        d = self.service.unlock(password=PASSWORD)
        self.assertIs(self.service.state, P)
        check_here()
        assert self.held is not None
        self.held.callback(None)
        self.successResultOf(d)
        check_here()
        self.assertEqual(seen, {U, L, P, UL})

    def test_operations_refused_by_state(self) -> None:
        """Operations from the wrong state fail with typed errors and change nothing."""
        self.failureResultOf(self.service.unlock(password=PASSWORD), IllegalTransition)
        self.failureResultOf(self.service.lock(), IllegalTransition)
        self.failureResultOf(self.service.rotate_recovery_key(), Locked)
        self.failureResultOf(
            self.service.change_password(PASSWORD, None, "another one"), IllegalTransition
        )
        self.setup_storage()
        self.failureResultOf(self.service.setup(PASSWORD), IllegalTransition)
        self.assertEqual(self.successResultOf(self.service.lock()).state, "locked")
        self.unlock()
        self.failureResultOf(self.service.unlock(password=PASSWORD), IllegalTransition)
        self.failureResultOf(self.service.setup(PASSWORD), IllegalTransition)
        self.assertIs(self.service.state, UL)
        self.assertEqual(self.lock_events(), [(None, U), (U, L), (L, P), (P, UL)])

    def test_operations_queue_behind_preunlock(self) -> None:
        """A lock asked for during preunlock waits for it, then locks."""
        self.setup_storage()
        self.hold_at = "volumes"
        unlocking = self.service.unlock(password=PASSWORD)
        locking = self.service.lock()
        self.assertNoResult(locking)
        assert self.held is not None
        self.held.callback(None)
        self.successResultOf(unlocking)
        self.assertEqual(self.successResultOf(locking).state, "locked")
        self.assert_nothing_open()

    def test_setup_waits_for_the_boot_checks(self) -> None:
        """
        The boot checks (which sweep stale keyset temp files) and a setup
        that arrives meanwhile never run at once: the setup's temp file
        cannot be swept away from under it.
        """
        self.stop()
        pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

        class Threaded(PersistenceService):
            def _blocking(self, fn: Callable[[], Any]) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                pending.append((fn, d))
                return d

        def run_next() -> None:
            fn, d = pending.pop(0)
            d.callback(fn())

        (self.state_dir / "persistence").mkdir(exist_ok=True)
        service = Threaded(
            self.clock, self.state_dir / "persistence", self.bus, PersistenceConfig(kdf=FAST)
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(pending), 1)  # the boot checks, in a thread
        setting_up = service.setup(PASSWORD)
        self.assertEqual(len(pending), 1, "setup started while the boot checks ran")
        run_next()
        while pending:
            run_next()
        self.assertEqual(self.successResultOf(setting_up).state, "locked")
        self.assertTrue((self.state_dir / "persistence" / "keyset.json").exists())

    def test_short_password_refused_at_setup(self) -> None:
        """Setup with a password under the minimum length is InvalidCommand; still U."""
        self.failureResultOf(self.service.setup("short"), InvalidCommand)
        self.assertIs(self.service.state, U)
        self.assertFalse((self.state_dir / "persistence" / "keyset.json").exists())

    def test_when_unlocked(self) -> None:
        """when_unlocked waits for the unlock, fires at once after, and is cancellable."""
        waiting = self.service.when_unlocked()
        cancelled = self.service.when_unlocked()
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.setup_storage()
        self.assertNoResult(waiting)
        self.unlock()
        self.successResultOf(waiting)
        self.successResultOf(self.service.when_unlocked())


class RateLimitTests(Harness):
    def setUp(self) -> None:
        super().setUp()
        self.setup_storage()

    def test_wrong_password_never_changes_state(self) -> None:
        """A wrong password is WrongPassword, publishes nothing and leaves LOCKED."""
        before = self.lock_events()
        self.failureResultOf(self.service.unlock(password="wrong password"), WrongPassword)
        self.assertIs(self.service.state, L)
        self.assertEqual(self.lock_events(), before)
        self.assertEqual(self.hook_calls, [])

    def test_growing_delay_refuses_even_the_right_password(self) -> None:
        """After failures the delay doubles; within it even the right password is RateLimited."""
        self.failureResultOf(self.service.unlock(password="wrong 1"), WrongPassword)
        refused = self.failureResultOf(self.service.unlock(password=PASSWORD), RateLimited)
        self.assertEqual(refused.value.retry_after, 1.0)
        self.assertIs(self.service.state, L)
        self.clock.advance(1.0)
        self.failureResultOf(self.service.unlock(password="wrong 2"), WrongPassword)
        self.clock.advance(1.5)
        refused = self.failureResultOf(self.service.unlock(password=PASSWORD), RateLimited)
        self.assertEqual(refused.value.retry_after, 0.5)
        self.assertEqual(self.service.status().failed_attempts, 2)
        self.clock.advance(0.5)
        self.unlock()
        self.assertEqual(self.service.status().failed_attempts, 0)

    def test_delay_is_capped(self) -> None:
        """The delay never exceeds unlock_backoff_max."""
        for i in range(12):
            self.failureResultOf(self.service.unlock(password=f"wrong {i}"), WrongPassword)
            wait = self.service.status().retry_after
            self.assertLessEqual(wait, 60.0)
            self.clock.advance(wait)
        self.assertEqual(wait, 60.0)

    def test_password_change_attempts_share_the_limit(self) -> None:
        """A wrong old password in change_password counts and delays unlocks too."""
        self.failureResultOf(
            self.service.change_password("wrong old", None, "new password"), WrongPassword
        )
        self.failureResultOf(self.service.unlock(password=PASSWORD), RateLimited)

    def restarted(self) -> PersistenceService:
        """The service stopped and a new one started on the same state dir."""
        self.stop()
        self.service = self.make()
        self.service.startService()
        return self.service

    def attempts_file(self) -> Any:
        return json.loads((self.state_dir / "persistence" / "unlock-attempts.json").read_text())

    def test_the_counter_survives_a_restart(self) -> None:
        """Wrong attempts are saved before they are answered; a restart keeps delay and count."""
        self.failureResultOf(self.service.unlock(password="wrong 1"), WrongPassword)
        self.clock.advance(1.0)
        self.failureResultOf(self.service.unlock(password="wrong 2"), WrongPassword)
        self.assertEqual(self.attempts_file()["failures"], 2)
        self.clock.advance(0.5)
        service = self.restarted()
        status = service.status()
        self.assertEqual((status.failed_attempts, status.retry_after), (2, 1.5))
        refused = self.failureResultOf(service.unlock(password=PASSWORD), RateLimited)
        self.assertEqual(refused.value.retry_after, 1.5)
        self.clock.advance(1.5)
        self.failureResultOf(service.unlock(password="wrong 3"), WrongPassword)
        self.assertEqual(service.status().retry_after, 4.0)  # it keeps doubling
        self.clock.advance(4.0)
        self.unlock()
        self.assertEqual(self.attempts_file(), {"failures": 0, "not_before": 0.0})
        self.assertEqual(self.restarted().status().failed_attempts, 0)

    def test_a_clock_set_back_does_not_lock_the_owner_out(self) -> None:
        """A saved deadline far beyond the maximum delay (the clock went back) is capped."""
        self.failureResultOf(self.service.unlock(password="wrong"), WrongPassword)
        path = self.state_dir / "persistence" / "unlock-attempts.json"
        path.write_text(json.dumps({"failures": 30, "not_before": self.clock.seconds() + 1e9}))
        service = self.restarted()
        self.assertEqual(service.status().retry_after, 60.0)
        self.clock.advance(60.0)
        self.unlock()

    def test_an_unreadable_counter_is_ignored_loudly(self) -> None:
        """A malformed counter file is reported in the log and changes nothing."""
        path = self.state_dir / "persistence" / "unlock-attempts.json"
        for bad in ("not json", '{"failures": -1, "not_before": 0}', '{"failures": 1}'):
            path.write_text(bad)
            with capturedLogs() as logs:
                service = self.restarted()
            self.assertTrue(any("unlock-attempts.json" in str(e) for e in logs), bad)
            self.assertEqual(service.status().failed_attempts, 0)
        self.unlock()

    def test_malformed_recovery_key_is_not_an_attempt(self) -> None:
        """A recovery key with a bad word count is InvalidCommand and not counted."""
        self.failureResultOf(self.service.unlock(recovery_key="one two"), InvalidCommand)
        self.assertEqual(self.service.status().failed_attempts, 0)
        self.unlock()

    def test_wrong_but_valid_recovery_key_counts(self) -> None:
        """A well-formed wrong recovery key counts as a failed attempt."""
        from piccolod.persistence.errors import WrongRecoveryKey
        from piccolod.persistence.keyset import generate_recovery_key

        _, words = generate_recovery_key()
        self.failureResultOf(self.service.unlock(recovery_key=" ".join(words)), WrongRecoveryKey)
        self.assertEqual(self.service.status().failed_attempts, 1)


class PreunlockFailureTests(Harness):
    def setUp(self) -> None:
        super().setUp()
        self.setup_storage()
        # Create the store and volumes once, so failures hit a populated box.
        self.unlock()
        self.successResultOf(self.service.apps.put(AppRecord("web", {"image": "x"})))
        self.successResultOf(self.service.lock())
        self.hook_calls.clear()

    def check_recovers(self) -> None:
        self.assert_nothing_open()
        self.fail_at = None
        self.adapter.fail_mount.clear()
        self.unlock()
        self.assertEqual(self.successResultOf(self.service.apps.get("web")).spec, {"image": "x"})
        self.successResultOf(self.service.lock())

    def test_failure_at_each_step_leaves_nothing_open(self) -> None:
        """For every preunlock step, a failure there leaves LOCKED with no mount and no DB."""
        for step in PREUNLOCK_STEPS:
            self.fail_at = step
            failure = self.failureResultOf(self.service.unlock(password=PASSWORD), Boom)
            self.assertIn(step, failure.value.detail)
            self.assertIs(self.service.state, L, step)
            self.check_recovers()
        self.flushLoggedErrors()

    def test_mount_failure_of_each_volume(self) -> None:
        """A volume that fails to mount (first or second) leaves nothing attached."""
        for volume_id in ("control", "bootstrap"):
            self.adapter.fail_mount = {volume_id}
            self.failureResultOf(self.service.unlock(password=PASSWORD), VolumeError)
            self.assertIs(self.service.state, L)
            self.check_recovers()
        self.flushLoggedErrors()

    def test_unreadable_store_fails_unlock_and_keeps_the_file(self) -> None:
        """A damaged store fails the unlock typed, leaves LOCKED, and is not overwritten."""
        db = self.state_dir / "volumes" / "ciphertext" / "control" / "data" / "control.db"
        data = bytearray(db.read_bytes())
        data[:64] = bytes(64)
        db.write_bytes(bytes(data))
        self.failureResultOf(self.service.unlock(password=PASSWORD), StoreUnreadable)
        self.assert_nothing_open()
        self.assertEqual(db.read_bytes(), bytes(data))
        self.flushLoggedErrors()

    def test_cancelled_unlock_is_undone(self) -> None:
        """Cancelling an unlock during preunlock (a command timeout) locks again, all undone."""
        self.hold_at = "store"
        unlocking = self.service.unlock(password=PASSWORD)
        self.assertIs(self.service.state, P)
        self.assertEqual(list(self.adapter.mounted()), ["bootstrap", "control"])
        unlocking.cancel()
        self.failureResultOf(unlocking, CancelledError)
        self.assertIs(self.service.state, L)
        self.assert_nothing_open()


class LockTests(Harness):
    def setUp(self) -> None:
        super().setUp()
        self.words = self.setup_storage()
        self.unlock()

    def test_unlock_attaches_volumes_and_opens_the_store_on_control(self) -> None:
        """Unlocked: both volumes mounted, the store open inside the control volume."""
        self.assertEqual(list(self.adapter.mounted()), ["bootstrap", "control"])
        info = self.service.info()
        self.assertTrue(info.open)
        self.assertIn("volumes/mounts/control", info.path)

    def test_unlock_sweeps_wanted_volumes_back(self) -> None:
        """A volume attached before a lock is detached by it and attached again at unlock."""
        self.successResultOf(self.dispatch(AttachVolume("app-web")))
        self.successResultOf(self.service.lock())
        self.assertEqual(list(self.adapter.mounted()), [])
        self.unlock()
        self.assertEqual(list(self.adapter.mounted()), ["app-web", "bootstrap", "control"])

    def test_lock_closes_detaches_and_wipes(self) -> None:
        """Locking closes the store, detaches volumes and zeroes the data key in place."""
        key = self.service.data_key
        assert key is not None
        buffer = key._material()
        secret = self.service._secrets["control"]
        self.successResultOf(self.service.lock())
        self.assert_nothing_open()
        self.assertEqual(bytes(buffer), bytes(32))
        self.assertEqual(bytes(secret), bytes(len(secret)))
        self.failureResultOf(self.service.apps.list_all(), Locked)
        self.failureResultOf(self.service.secret_for("control"), Locked)

    def persistence_health(self) -> tuple[HealthLevel, str]:
        (component,) = [c for c in self.health.components() if c.component == "persistence"]
        return component.level, component.message

    def test_a_busy_volume_is_detached_once_its_users_let_go(self) -> None:
        """
        A lock that finds a volume busy still locks (so apps stop), warns, and detaches
        the volume as soon as it is free.
        """
        self.successResultOf(self.dispatch(AttachVolume("app-web")))
        self.adapter.busy.add("app-web")
        self.successResultOf(self.service.lock())
        self.assertIs(self.service.state, L)
        self.assertIn((UL, L), self.lock_events())
        self.assertEqual(list(self.adapter.mounted()), ["app-web"])
        self.assertIsNone(self.service.data_key)
        level, message = self.persistence_health()
        self.assertIs(level, HealthLevel.WARN)
        self.assertIn("app-web is busy", message)
        self.clock.advance(0.5)
        self.assertEqual(list(self.adapter.mounted()), ["app-web"])  # still in use
        self.adapter.busy.clear()  # the app stopped
        self.clock.advance(0.5)
        self.assertEqual(list(self.adapter.mounted()), [])
        self.assertEqual(self.persistence_health(), (HealthLevel.OK, "locked"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.unlock()
        self.assertEqual(list(self.adapter.mounted()), ["app-web", "bootstrap", "control"])

    def test_a_volume_busy_for_too_long_is_an_error_and_still_retried(self) -> None:
        """Past busy_retry_for the health is an error; the retries go on until it is free."""
        self.successResultOf(self.dispatch(AttachVolume("app-web")))
        self.adapter.busy.add("app-web")
        self.successResultOf(self.service.lock())
        self.clock.pump([0.5] * 121)  # 60.5 s
        level, message = self.persistence_health()
        self.assertIs(level, HealthLevel.ERROR)
        self.assertIn("still attached", message)
        self.adapter.busy.clear()
        self.clock.advance(0.5)
        self.assertEqual(list(self.adapter.mounted()), [])
        self.assertEqual(self.persistence_health(), (HealthLevel.OK, "locked"))

    def test_unlocking_ends_the_detach_retries(self) -> None:
        """An unlock while a volume is still busy takes the volumes over: no retry detaches it."""
        self.successResultOf(self.dispatch(AttachVolume("app-web")))
        self.adapter.busy.add("app-web")
        self.successResultOf(self.service.lock())
        self.unlock()
        self.adapter.busy.clear()
        self.clock.advance(5)
        self.assertEqual(list(self.adapter.mounted()), ["app-web", "bootstrap", "control"])
        self.assertEqual(self.persistence_health(), (HealthLevel.OK, "unlocked"))

    def test_secret_for(self) -> None:
        """secret_for gives a stable passphrase per volume and creates new ones."""
        control = self.successResultOf(self.service.secret_for("control"))
        self.assertEqual(self.successResultOf(self.service.secret_for("control")), control)
        other = self.successResultOf(self.service.secret_for("app-web"))
        self.assertNotEqual(other, control)
        self.successResultOf(self.service.lock())
        self.unlock()
        self.assertEqual(self.successResultOf(self.service.secret_for("app-web")), other)
        self.failureResultOf(self.service.secret_for("../etc"), InvalidCommand)

    def test_recovery_key_unlocks(self) -> None:
        """The 24 words from setup unlock like the password."""
        self.successResultOf(self.service.lock())
        self.successResultOf(self.service.unlock(recovery_key=self.words))
        self.assertIs(self.service.state, UL)

    def test_change_password_keeps_state_and_data(self) -> None:
        """Changing the password (unlocked) keeps UNLOCKED; the new one unlocks the same data."""
        self.successResultOf(self.service.settings.set("k", "v"))
        self.successResultOf(self.service.change_password(PASSWORD, None, "brand new password"))
        self.assertIs(self.service.state, UL)
        self.successResultOf(self.service.lock())
        self.failureResultOf(self.service.unlock(password=PASSWORD), WrongPassword)
        self.clock.advance(1)
        self.successResultOf(self.service.unlock(password="brand new password"))
        self.assertEqual(self.successResultOf(self.service.settings.get("k")), "v")

    def test_change_password_with_recovery_key_while_locked(self) -> None:
        """The recovery key can set a new password while locked; state stays LOCKED."""
        self.successResultOf(self.service.lock())
        self.successResultOf(self.service.change_password(None, self.words, "reset password"))
        self.assertIs(self.service.state, L)
        self.successResultOf(self.service.unlock(password="reset password"))
        self.failureResultOf(self.service.change_password(PASSWORD, None, "short"), InvalidCommand)

    def test_rotate_recovery_key(self) -> None:
        """Rotation returns new words that unlock; the old words stop working."""
        from piccolod.persistence.errors import WrongRecoveryKey

        rotated = self.successResultOf(self.service.rotate_recovery_key())
        self.assertNotEqual(rotated.recovery_key, self.words)
        self.successResultOf(self.service.lock())
        self.failureResultOf(self.service.unlock(recovery_key=self.words), WrongRecoveryKey)
        self.clock.advance(1)
        self.successResultOf(self.service.unlock(recovery_key=rotated.recovery_key))

    def test_follower_mounts_control_read_only(self) -> None:
        """Unlocking as a control-plane follower mounts control read-only and reads only."""
        self.successResultOf(self.service.settings.set("k", 1))
        self.successResultOf(self.service.lock())
        self.registry.update("control-plane", Role.FOLLOWER, 2, leader_id="node-b")
        self.unlock()
        self.assertTrue(self.adapter.read_only("control"))
        self.assertFalse(self.adapter.read_only("bootstrap"))
        self.assertTrue(self.service.info().read_only)
        self.assertEqual(self.successResultOf(self.service.settings.get("k")), 1)
        self.failureResultOf(self.service.settings.set("k", 2))
        self.flushLoggedErrors()

    def test_stop_locks(self) -> None:
        """Stopping the service locks (published) and leaves no timer behind."""
        self.successResultOf(self.service.stopService())
        self.assertIs(self.service.state, L)
        self.assert_nothing_open()
        self.assertEqual(self.lock_events()[-1], (UL, L))
        self.assertEqual(self.dispatcher.names(), [])
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [], "timers left")


class MaintenanceTests(Harness):
    volumes = False

    def setUp(self) -> None:
        super().setUp()
        self.setup_storage()
        self.unlock()
        self.bus.flush()
        self.bus.clear_published()

    def health_events(self) -> list[ControlStoreHealth]:
        self.bus.flush()
        return [e for e in self.bus.events(ControlStoreHealth.topic)]  # type: ignore[misc]

    def test_without_volumes_the_store_lives_in_the_persistence_dir(self) -> None:
        """Without a volume manager the store is under <state>/persistence/control."""
        self.assertEqual(
            self.service.info().path, str(self.state_dir / "persistence" / "control" / "control.db")
        )

    def test_periodic_checkpoint_and_quick_check(self) -> None:
        """Checkpoints every minute and quick_check every hour publish ControlStoreHealth."""
        self.successResultOf(self.service.settings.set("a", 1))
        self.clock.advance(60)
        events = self.health_events()
        self.assertEqual(len(events), 1)
        self.assertTrue(events[0].ok)
        self.assertIn("checkpoint", events[0].detail)
        self.clock.advance(3600 - 60)
        events = self.health_events()
        self.assertEqual(sum("quick_check: ok" in e.detail for e in events), 1)
        self.assertIs(self.health.component("persistence.store").level, HealthLevel.OK)

    def swap_store(self, store: ControlStore) -> None:
        self.successResultOf(self.service.lock())
        self.service.store = store
        self.unlock()
        self.bus.flush()
        self.bus.clear_published()

    def test_failed_check_marks_health_error(self) -> None:
        """A failing quick_check publishes ok=False and marks health error."""

        class Damaged(ControlStore):
            def quick_check(self) -> Deferred[CheckResult]:
                return succeed(CheckResult(False, "quick_check: page 7 is never used", 3))

        self.swap_store(Damaged(self.clock, None, self.bus, self.registry))
        result = self.successResultOf(self.service.run_quick_check())
        assert result is not None
        self.assertFalse(result.ok)
        self.assertFalse(self.health_events()[-1].ok)
        component = self.health.component("persistence.store")
        self.assertIs(component.level, HealthLevel.ERROR)
        self.assertIn("page 7", component.message)
        self.flushLoggedErrors()

    def test_check_error_is_reported_not_raised(self) -> None:
        """An exception during a check becomes an error report; the loop keeps running."""

        class Failing(ControlStore):
            def checkpoint(self, mode: str = "PASSIVE") -> Deferred[CheckpointResult]:
                return fail(OSError("disk gone"))

        self.swap_store(Failing(self.clock, None, self.bus, self.registry))
        self.clock.advance(60)
        self.assertFalse(self.health_events()[-1].ok)
        self.clock.advance(60)
        self.assertEqual(len(self.health_events()), 2)
        self.flushLoggedErrors()

    def test_lock_stops_the_checks(self) -> None:
        """After lock no check timer is left and nothing more is published."""
        self.successResultOf(self.service.lock())
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])
        self.clock.advance(7200)
        self.assertEqual(self.health_events(), [])
        self.assertIsNone(self.successResultOf(self.service.run_quick_check()))

    def test_checks_run_as_jobs_when_a_runner_is_given(self) -> None:
        """With a JobRunner the periodic checks are submitted as 'persistence' jobs."""
        self.successResultOf(self.service.stopService())
        runner = JobRunner(self.clock, self.bus)
        runner.startService()
        self.addCleanup(runner.stopService)
        self.service = self.make(jobs=runner)
        self.service.startService()
        self.unlock()
        self.clock.advance(60)
        self.clock.advance(0)
        jobs = runner.jobs()
        self.assertEqual([j.job_class for j in jobs], ["persistence"])
        self.assertIn("checkpoint", jobs[0].name)
        self.assertTrue(self.health_events()[-1].ok)
        self.successResultOf(self.service.lock())
        self.clock.advance(3600)
        self.assertEqual(len(runner.jobs()), 1)


class CommandTests(Harness):
    def test_commands_through_the_dispatcher(self) -> None:
        """Setup, unlock, status, rotate, lock work as commands and answer JSON."""
        setup = self.successResultOf(self.dispatch(SetupStorage(password=PASSWORD)))
        self.assertEqual(len(setup.recovery_key.split()), 24)
        self.assertNotIn(setup.recovery_key.split()[0] + " ", repr(setup))
        self.failureResultOf(self.dispatch(RotateRecoveryKey()), Locked)
        status = self.successResultOf(self.dispatch(UnlockStorage(password=PASSWORD)))
        self.assertEqual(status.state, "unlocked")
        self.assertEqual(status.store["revision"], 1)
        json.dumps(status.to_json())
        rotated = self.successResultOf(self.dispatch(RotateRecoveryKey()))
        self.assertEqual(len(rotated.to_json()["recovery_key"].split()), 24)
        got = self.successResultOf(self.dispatch(GetStorageStatus()))
        self.assertEqual(got.to_json()["state"], "unlocked")
        locked = self.successResultOf(self.dispatch(LockStorage()))
        self.assertEqual((locked.state, locked.store), ("locked", None))
        json.dumps(self.successResultOf(self.dispatch(LockStorage())).to_json())

    def test_record_lock_state(self) -> None:
        """record_lock_state(true) locks; (false) is Locked unless already unlocked."""
        self.setup_storage()
        self.failureResultOf(self.dispatch(RecordLockState(locked=False)), Locked)
        self.unlock()
        self.assertEqual(
            self.successResultOf(self.dispatch(RecordLockState(locked=False))).state, "unlocked"
        )
        self.assertEqual(
            self.successResultOf(self.dispatch(RecordLockState(locked=True))).state, "locked"
        )
        self.assert_nothing_open()
        with self.assertRaises(InvalidCommand):
            RecordLockState(locked="yes")  # type: ignore[arg-type]

    def test_change_password_command(self) -> None:
        """persistence.change_password rewraps; the new password unlocks."""
        self.setup_storage()
        self.successResultOf(self.dispatch(ChangePassword(old=PASSWORD, new="another password")))
        self.successResultOf(self.dispatch(UnlockStorage(password="another password")))

    def test_volume_commands(self) -> None:
        """ensure/attach/detach volume commands drive the volume manager."""
        self.setup_storage()
        self.unlock()
        ensured = self.successResultOf(self.dispatch(EnsureVolume("app-web")))
        self.assertEqual(ensured.volume_id, "app-web")
        attached = self.successResultOf(self.dispatch(AttachVolume("app-web")))
        self.assertEqual(attached.state, "attached-rw")
        self.assertTrue(attached.path)
        json.dumps(attached.to_json())
        detached = self.successResultOf(self.dispatch(DetachVolume("app-web")))
        self.assertEqual(detached.state, "detached")

    def test_secrets_never_reach_logs_or_audit(self) -> None:
        """Neither the password nor the recovery words appear in logs or audit records."""
        with capturedLogs() as events:
            setup = self.successResultOf(self.dispatch(SetupStorage(password=PASSWORD)))
            self.failureResultOf(self.dispatch(UnlockStorage(password="wrong password")))
            self.clock.advance(5)
            self.successResultOf(self.dispatch(UnlockStorage(recovery_key=setup.recovery_key)))
            self.successResultOf(
                self.dispatch(ChangePassword(old=PASSWORD, new="another password"))
            )
        self.bus.flush()
        texts = [repr(e) for e in events] + [repr(e) for e in self.bus.events(AuditRecord.topic)]
        texts += [repr(e) for e in self.bus.published()]
        words = setup.recovery_key.split()
        for text in texts:
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn("wrong password", text)
            self.assertNotIn("another password", text)
            self.assertNotIn(" ".join(words[:3]), text)
        self.assertTrue(self.bus.events(AuditRecord.topic))

    def test_unregistered_on_stop(self) -> None:
        """The persistence.* handlers are registered while running only."""
        self.assertIn("persistence.unlock", self.dispatcher.names())
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.dispatcher.names(), [])


class NoVolumeCommandTests(Harness):
    volumes = False

    def test_volume_commands_without_adapter_are_not_ready(self) -> None:
        """Without a volume adapter the volume commands fail with NotReady."""
        self.failureResultOf(self.dispatch(EnsureVolume("app-web")), NotReady)


class KeysetFaultTests(Harness):
    def test_corrupt_keyset_at_boot(self) -> None:
        """A damaged keyset: LOCKED, health error, setup refused, unlock typed; file untouched."""
        self.successResultOf(self.service.stopService())
        path = self.state_dir / "persistence" / "keyset.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b'{"format": "piccolod-keyset", "version": 1}')
        self.service = self.make()
        self.service.startService()
        self.assertIs(self.service.state, L)
        self.assertIs(self.health.component("persistence").level, HealthLevel.ERROR)
        self.assertIn("keyset", self.service.status().error or "")
        self.failureResultOf(self.service.setup(PASSWORD), IllegalTransition)
        self.failureResultOf(self.service.unlock(password=PASSWORD), KeysetCorrupt)
        self.assertEqual(path.read_bytes(), b'{"format": "piccolod-keyset", "version": 1}')
        self.assertEqual(self.service.status().failed_attempts, 0)
        self.flushLoggedErrors()

    def test_keyset_vanishing_while_running(self) -> None:
        """A keyset deleted while running makes unlock fail with KeysetCorrupt."""
        self.setup_storage()
        (self.state_dir / "persistence" / "keyset.json").unlink()
        failure = self.failureResultOf(self.service.unlock(password=PASSWORD), KeysetCorrupt)
        self.assertIn("disappeared", failure.value.detail)
        self.flushLoggedErrors()

    def test_setup_refuses_a_keyset_that_appeared(self) -> None:
        """Setup never overwrites a keyset file that appeared after start."""
        path = self.state_dir / "persistence" / "keyset.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"someone else's")
        self.failureResultOf(self.service.setup(PASSWORD), Conflict)
        self.assertEqual(path.read_bytes(), b"someone else's")


class ConfigTests(SynchronousTestCase):
    def test_from_section_collects_every_problem(self) -> None:
        """Bad values are reported together in one ConfigError."""
        with self.assertRaises(ConfigError) as raised:
            PersistenceConfig.from_section(
                {
                    "argon2_time_cost": 0,
                    "unlock_backoff_initial": -1.0,
                    "check_interval": 0,
                    "volumes": ["control", "Bad_Id"],
                    "min_password_length": 0,
                }
            )
        text = "\n".join(raised.exception.errors)
        for expected in (
            "time_cost",
            "unlock_backoff_initial",
            "check_interval",
            "Bad_Id",
            "min_password_length",
        ):
            self.assertIn(expected, text)
        with self.assertRaises(ConfigError):
            PersistenceConfig.from_section({"volumes": "control"})
        with self.assertRaises(ConfigError):
            PersistenceConfig.from_section({"volumes": ["bootstrap"], "store_volume": "control"})

    def test_defaults_are_valid(self) -> None:
        """The default section builds the default config (Raspberry Pi-sized Argon2)."""
        from twisted.plugins.piccolod_persistence import CONFIG_KEYS

        config = PersistenceConfig.from_section(CONFIG_KEYS)
        self.assertEqual(config, PersistenceConfig())
        self.assertEqual(config.kdf, KdfParams(3, 65536, 1))

    def test_plugin_builds_a_verified_service(self) -> None:
        """The drop-in builds through from_context and passes the kernel's verification."""
        from piccolod.interfaces import IVolumeAdapter
        from piccolod.kernel.plugins import SubsystemContext, verify
        from piccolod.kernel.runtime import Kernel
        from twisted.plugins.piccolod_persistence import CONFIG_KEYS, persistenceSqlcipher

        state_dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, state_dir, True)
        clock = Clock()
        bus = FakeEventBus(clock)
        registry = LeadershipRegistry(bus, "n")
        kernel = Kernel(
            reactor=clock,
            bus=bus,
            registry=registry,
            dispatcher=CommandDispatcher(clock, bus, registry=registry),
            health=HealthTracker(clock, bus),
            supervisor=None,  # type: ignore[arg-type]
            node_id="n",
            api_address="",
            state_dir=state_dir,
        )
        adapter = DirectoryVolumes(clock, state_dir)
        ctx = SubsystemContext(
            slot="persistence",
            variant="sqlcipher",
            kernel=kernel,
            config=dict(CONFIG_KEYS),
            deps={IVolumeAdapter: adapter},
        )
        service = persistenceSqlcipher.build(ctx)
        verify(persistenceSqlcipher, service)
        assert isinstance(service, PersistenceService)
        self.assertIsNotNone(service.volumes)
        self.assertEqual(service.directory, state_dir / "persistence")
        self.assertTrue(service.owns_pools)
