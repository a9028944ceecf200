"""Tests for piccolod.persistence.store and .repositories on a real SQLCipher file (inline)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.errors import Conflict, InvalidCommand, Locked, NotFound, NotLeader
from piccolod.events import ControlStoreCommit, Role
from piccolod.interfaces import (
    AppRecord,
    AuditEntry,
    AuthState,
    IAppsRepository,
    IAuditRepository,
    IAuthRepository,
    IControlStore,
    IControlTransaction,
    IRemoteRepository,
    ISettingsRepository,
)
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.persistence import store as storemod
from piccolod.persistence.errors import StoreCorrupt, StoreError, StoreMissing, StoreUnreadable
from piccolod.persistence.keyset import DataKey
from piccolod.persistence.repositories import Tx
from piccolod.persistence.store import GENESIS, ControlStore, chain_checksum, change_digest
from piccolod.testing.bus import FakeEventBus

KEY = DataKey(bytes(range(32))).derive("test")
OTHER_KEY = DataKey(bytes(32)).derive("test")


class StoreCase(SynchronousTestCase):
    """A store on a fresh temp dir, inline (no thread pool), on a Clock."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="store-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = self.dir / "control" / "control.db"
        self.marker = self.dir / "control-store.json"
        self.clock = Clock()
        self.clock.advance(1000)
        self.bus = FakeEventBus(self.clock)
        self.store = self.make_store()
        self.addCleanup(lambda: self.store.close())

    def make_store(self, **kwargs: Any) -> ControlStore:
        return ControlStore(self.clock, None, self.bus, **kwargs)

    def open(self, store: ControlStore | None = None, **kwargs: Any) -> Any:
        store = store or self.store
        kwargs.setdefault("marker", self.marker)
        return self.successResultOf(store.open(self.path, kwargs.pop("key", KEY), **kwargs))

    def fails(self, d: Any, *errors: type[BaseException]) -> Failure:
        failure: Failure = self.failureResultOf(d, *errors)
        return failure


class OpenTests(StoreCase):
    def test_provides_interfaces(self) -> None:
        """The store and its repositories verifiably provide their interfaces."""
        self.assertTrue(verifyObject(IControlStore, self.store))
        self.assertTrue(verifyObject(IAuthRepository, self.store.auth))
        self.assertTrue(verifyObject(IAppsRepository, self.store.apps))
        self.assertTrue(verifyObject(IRemoteRepository, self.store.remote))
        self.assertTrue(verifyObject(IAuditRepository, self.store.audit))
        self.assertTrue(verifyObject(ISettingsRepository, self.store.settings))

    def test_create_runs_migrations_as_revision_one(self) -> None:
        """A new store is created in WAL mode at the latest schema, as revision 1."""
        info = self.open()
        self.assertTrue(info.open)
        self.assertEqual((info.revision, info.schema_version), (1, storemod.SCHEMA_VERSION))
        self.assertEqual(info.checksum, chain_checksum(GENESIS, 1, _digest1(self)))
        self.bus.flush()
        self.assertEqual(len(self.bus.events(ControlStoreCommit.topic)), 1)
        self.assertTrue(self.marker.exists())
        modes = self.successResultOf(
            self.store.read(
                lambda tx: [
                    tx.query("PRAGMA journal_mode")[0][0],
                    tx.query("PRAGMA synchronous")[0][0],
                    tx.query("PRAGMA temp_store")[0][0],
                ]
            )
        )
        self.assertEqual(modes, ["wal", 2, 2])  # wal, FULL, MEMORY

    def test_header_is_encrypted(self) -> None:
        """The file does not start with SQLite's plaintext header."""
        self.open()
        self.successResultOf(self.store.close())
        self.assertFalse(self.path.read_bytes().startswith(b"SQLite format 3"))

    def test_reopen_keeps_revision_and_data(self) -> None:
        """Closing and opening again finds the data and the same head."""
        self.open()
        self.successResultOf(self.store.settings.set("k", {"v": 1}))
        head = self.store.info()
        self.successResultOf(self.store.close())
        self.assertFalse(self.store.is_open)
        info = self.open()
        self.assertEqual((info.revision, info.checksum), (head.revision, head.checksum))
        self.assertEqual(self.successResultOf(self.store.settings.get("k")), {"v": 1})

    def test_wrong_key_is_typed_and_leaves_file(self) -> None:
        """Another key fails with StoreUnreadable; the file is unchanged and the store closed."""
        self.open()
        self.successResultOf(self.store.close())
        before = self.path.read_bytes()
        failure = self.fails(
            self.store.open(self.path, OTHER_KEY, marker=self.marker), StoreUnreadable
        )
        self.assertIn("cannot be decrypted", failure.value.detail)
        self.assertNotIn(OTHER_KEY.hex(), str(failure.value))
        self.assertFalse(self.store.is_open)
        self.assertEqual(self.path.read_bytes(), before)
        self.fails(self.store.settings.items(), Locked)
        self.flushLoggedErrors()

    def test_truncated_file_is_typed_and_not_overwritten(self) -> None:
        """A store cut short fails to open with a typed error and is not rewritten."""
        self.open()
        self.successResultOf(
            self.store.transaction(
                lambda tx: [tx.settings.set(f"k{i}", "x" * 200) for i in range(200)]
            )
        )
        self.successResultOf(self.store.close())
        size = self.path.stat().st_size
        self.assertGreater(size, 8192)
        for cut in (100, 4096, size // 2):
            data = self.path.read_bytes()[:cut]
            self.path.write_bytes(data)
            for extra in ("-wal", "-shm"):
                Path(str(self.path) + extra).unlink(missing_ok=True)
            failure = self.fails(
                self.store.open(self.path, KEY, marker=self.marker),
                StoreUnreadable,
                StoreCorrupt,
            )
            self.assertIsInstance(failure.value, StoreError)
            self.assertEqual(self.path.read_bytes(), data, f"cut at {cut}")
            self.assertFalse(self.store.is_open)

    def test_missing_store_is_not_recreated(self) -> None:
        """Once created, a vanished or emptied database is StoreMissing, never re-created."""
        self.open()
        self.successResultOf(self.store.close())
        self.path.unlink()
        self.fails(self.store.open(self.path, KEY, marker=self.marker), StoreMissing)
        self.assertFalse(self.path.exists())
        self.path.write_bytes(b"")
        self.fails(self.store.open(self.path, KEY, marker=self.marker), StoreMissing)
        self.assertEqual(self.path.read_bytes(), b"")

    def test_foreign_store_behind_marker_is_refused(self) -> None:
        """A store whose id differs from the marker's is refused."""
        self.open()
        self.successResultOf(self.store.close())
        self.marker.write_text(json.dumps({"format": 1, "store_id": "0" * 32}))
        self.fails(self.store.open(self.path, KEY, marker=self.marker), StoreUnreadable)

    def test_read_only_open_refuses_writes(self) -> None:
        """A read-only store reads and refuses writes with Conflict."""
        self.open()
        self.successResultOf(self.store.settings.set("k", 1))
        self.successResultOf(self.store.close())
        info = self.open(read_only=True)
        self.assertTrue(info.read_only)
        self.assertEqual(self.successResultOf(self.store.settings.get("k")), 1)
        self.fails(self.store.settings.set("k", 2), Conflict)

    def test_read_only_without_store_is_missing(self) -> None:
        """A follower cannot create a store: read-only open of nothing is StoreMissing."""
        self.fails(self.store.open(self.path, KEY, read_only=True), StoreMissing)

    def test_newer_schema_is_refused(self) -> None:
        """A store from a newer piccolod fails with StoreError and stays closed."""
        self.open()
        self.successResultOf(self.store.read(lambda tx: None))
        self.successResultOf(
            self.store.transaction(
                lambda tx: (tx.execute("PRAGMA user_version = 99"), tx.changed("t", "v", 99))
            )
        )
        self.successResultOf(self.store.close())
        failure = self.fails(self.store.open(self.path, KEY, marker=self.marker), StoreError)
        self.assertIn("newer", failure.value.detail)

    def test_open_twice_is_conflict(self) -> None:
        """Opening an open store fails with Conflict."""
        self.open()
        self.fails(self.store.open(self.path, KEY), Conflict)

    def test_close_is_idempotent(self) -> None:
        """Closing a closed store succeeds."""
        self.successResultOf(self.store.close())
        self.open()
        self.successResultOf(self.store.close())
        self.successResultOf(self.store.close())
        self.assertEqual(self.store.info().open, False)


def _digest1(case: StoreCase) -> str:
    rows = case.successResultOf(
        case.store.read(lambda tx: tx.query("SELECT change_digest FROM revisions WHERE revision=1"))
    )
    return str(rows[0][0])


class RevisionTests(StoreCase):
    def setUp(self) -> None:
        super().setUp()
        self.open()
        self.bus.flush()
        self.bus.clear_published()

    def test_each_write_is_one_revision_with_a_chained_checksum(self) -> None:
        """Writes bump the revision by one; checksums chain; each commit is published."""
        before = self.store.info()
        self.successResultOf(self.store.settings.set("a", 1))
        self.successResultOf(self.store.apps.put(AppRecord("web", {"image": "x"})))
        info = self.store.info()
        self.assertEqual(info.revision, before.revision + 2)
        rows = self.successResultOf(
            self.store.read(
                lambda tx: tx.query(
                    "SELECT revision, prev_checksum, checksum, change_digest, tables "
                    "FROM revisions ORDER BY revision"
                )
            )
        )
        self.assertEqual(rows[-2][1], before.checksum)
        for revision, prev, checksum, digest, _ in rows:
            self.assertEqual(chain_checksum(prev, revision, digest), checksum)
        self.assertEqual(
            rows[-1][3], change_digest([["apps", "put", ["web", {"image": "x"}, True, 1]]])
        )
        self.bus.flush()
        self.bus.assert_published(
            [
                ControlStoreCommit(before.revision + 1, rows[-2][2], ("settings",)),
                ControlStoreCommit(before.revision + 2, rows[-1][2], ("apps",)),
            ]
        )
        self.assertTrue(self.successResultOf(self.store.verify_chain()).ok)

    def test_transaction_is_one_revision(self) -> None:
        """Several repository writes in one transaction commit as one revision."""
        before = self.store.info().revision

        def both(tx: Tx) -> str:
            tx.apps.put(AppRecord("a", {}))
            tx.settings.set("s", True)
            tx.audit.append(AuditEntry("apps.install", "admin", "ok"))
            return "done"

        self.assertEqual(self.successResultOf(self.store.transaction(both)), "done")
        self.assertEqual(self.store.info().revision, before + 1)
        self.bus.flush()
        (commit,) = self.bus.events(ControlStoreCommit.topic)
        assert isinstance(commit, ControlStoreCommit)
        self.assertEqual(commit.tables, ("apps", "audit", "settings"))

    def test_failed_transaction_changes_nothing(self) -> None:
        """A transaction that raises rolls back every change and commits no revision."""
        before = self.store.info()

        def half(tx: Tx) -> None:
            tx.settings.set("x", 1)
            raise ValueError("boom")

        self.fails(self.store.transaction(half), ValueError)
        self.assertEqual(self.store.info(), before)
        self.fails(self.store.settings.get("x"), NotFound)
        self.bus.flush()
        self.bus.assert_nothing_published()

    def test_no_op_writes_commit_nothing(self) -> None:
        """Writing identical content is no change: no revision, no event."""
        self.successResultOf(self.store.settings.set("a", [1, 2]))
        self.successResultOf(self.store.apps.put(AppRecord("web", {"x": 1})))
        self.successResultOf(self.store.auth.save(AuthState(True, "h")))
        before = self.store.info().revision
        self.successResultOf(self.store.settings.set("a", [1, 2]))
        self.successResultOf(self.store.apps.put(AppRecord("web", {"x": 1})))
        self.successResultOf(self.store.auth.save(AuthState(True, "h")))
        self.assertEqual(self.store.info().revision, before)

    def test_verify_chain_detects_tampering(self) -> None:
        """Editing a revision row or deleting one breaks verify_chain."""
        for i in range(3):
            self.successResultOf(self.store.settings.set("k", i))
        self.successResultOf(
            self.store.transaction(
                lambda tx: (
                    tx.execute("UPDATE revisions SET change_digest = 'x' WHERE revision = 2")
                    and tx.changed("test", "tamper", None)
                )
            )
        )
        result = self.successResultOf(self.store.verify_chain())
        self.assertFalse(result.ok)
        self.assertIn("revision 2", result.detail)

    def test_missing_revision_detected(self) -> None:
        """A gap in the revisions is reported."""
        for i in range(3):
            self.successResultOf(self.store.settings.set("k", i))
        self.successResultOf(
            self.store.transaction(
                lambda tx: (
                    tx.execute("DELETE FROM revisions WHERE revision = 3")
                    and tx.changed("test", "tamper", None)
                )
            )
        )
        result = self.successResultOf(self.store.verify_chain())
        self.assertFalse(result.ok)
        self.assertIn("missing", result.detail)

    def test_retention_prunes_old_revisions_and_chain_still_verifies(self) -> None:
        """Beyond the retention old rows go; the kept ones still chain correctly."""
        self.successResultOf(self.store.close())
        self.store = self.make_store(revision_retention=10)
        self.open()
        for i in range(45):
            self.successResultOf(self.store.settings.set("k", i))
        count, first, last = self.successResultOf(
            self.store.read(
                lambda tx: tx.query("SELECT count(*), min(revision), max(revision) FROM revisions")[
                    0
                ]
            )
        )
        self.assertEqual(last, 46)
        self.assertLessEqual(count, 20)
        self.assertGreater(first, 1)
        result = self.successResultOf(self.store.verify_chain())
        self.assertTrue(result.ok, result.detail)

    def test_quick_check_and_checkpoint(self) -> None:
        """quick_check answers ok; a passive checkpoint reports WAL frames."""
        self.successResultOf(self.store.settings.set("a", 1))
        check = self.successResultOf(self.store.quick_check())
        self.assertTrue(check.ok)
        self.assertEqual(check.revision, self.store.info().revision)
        point = self.successResultOf(self.store.checkpoint())
        self.assertEqual(point.busy, 0)
        self.assertGreaterEqual(point.log_frames, 1)
        self.fails(self.store.checkpoint("BOGUS"), ValueError)

    def test_read_transaction_cannot_write(self) -> None:
        """A function run by read() that tries to write fails with Conflict."""
        self.fails(self.store.read(lambda tx: tx.settings.set("x", 1)), Conflict)

    def test_transaction_object_provides_interface(self) -> None:
        """The object handed to transaction functions provides IControlTransaction."""
        tx = self.successResultOf(self.store.read(lambda tx: tx))
        self.assertTrue(verifyObject(IControlTransaction, tx))
        self.assertEqual(tx.now, self.clock.seconds())


class GuardTests(StoreCase):
    def test_closed_store_is_locked(self) -> None:
        """Every call on a closed store fails with Locked."""
        for d in (
            self.store.settings.items(),
            self.store.settings.set("a", 1),
            self.store.apps.list_all(),
            self.store.quick_check(),
            self.store.checkpoint(),
            self.store.verify_chain(),
        ):
            self.fails(d, Locked)

    def test_follower_reads_but_cannot_write(self) -> None:
        """Not leading control-plane: writes fail with NotLeader carrying the hint; reads work."""
        registry = LeadershipRegistry(self.bus, "node-a")
        registry.update(
            "control-plane", Role.FOLLOWER, 3, leader_id="node-b", leader_address="http://b:8080"
        )
        self.store = self.make_store(registry=registry)
        self.open()
        failure = self.fails(self.store.settings.set("a", 1), NotLeader)
        self.assertEqual(failure.value.leader_hint, "http://b:8080")
        self.assertEqual(self.successResultOf(self.store.settings.items()), {})
        registry.update("control-plane", Role.LEADER, 4, leader_id="node-a")
        self.successResultOf(self.store.settings.set("a", 1))
        registry.update("control-plane", Role.UNKNOWN, 4)
        self.fails(self.store.settings.set("a", 2), NotLeader)


class RepositoryTests(StoreCase):
    def setUp(self) -> None:
        super().setUp()
        self.open()

    def test_auth(self) -> None:
        """Auth starts empty, saves and reads back, and never shows the hash in repr or JSON."""
        self.assertEqual(self.successResultOf(self.store.auth.get()), AuthState())
        self.clock.advance(5)
        saved = self.successResultOf(self.store.auth.save(AuthState(True, "$argon2id$x", 2)))
        self.assertEqual(saved.updated_at, self.clock.seconds())
        self.assertEqual(self.successResultOf(self.store.auth.get()), saved)
        self.assertNotIn("argon2", repr(saved))
        self.assertNotIn("password_hash", saved.to_json())
        self.fails(self.store.auth.save("nope"), InvalidCommand)  # type: ignore[arg-type]

    def test_apps(self) -> None:
        """Apps put/get/list/delete; generations grow only on change; bad input is refused."""
        first = self.successResultOf(self.store.apps.put(AppRecord("web", {"image": "a"})))
        self.assertEqual(first.generation, 1)
        second = self.successResultOf(
            self.store.apps.put(AppRecord("web", {"image": "b"}, enabled=False))
        )
        self.assertEqual((second.generation, second.enabled), (2, False))
        self.successResultOf(self.store.apps.put(AppRecord("db", {"image": "p"})))
        names = [a.name for a in self.successResultOf(self.store.apps.list_all())]
        self.assertEqual(names, ["db", "web"])
        self.assertEqual(self.successResultOf(self.store.apps.get("web")), second)
        self.successResultOf(self.store.apps.delete("web"))
        self.fails(self.store.apps.get("web"), NotFound)
        self.fails(self.store.apps.delete("web"), NotFound)
        self.fails(self.store.apps.put(AppRecord("", {})), InvalidCommand)
        self.fails(self.store.apps.put(AppRecord("x", [1])), InvalidCommand)  # type: ignore[arg-type]
        self.fails(self.store.apps.put(AppRecord("x", {"f": object()})), InvalidCommand)
        self.fails(self.store.apps.put(AppRecord("x", {"f": float("nan")})), InvalidCommand)

    def test_remote(self) -> None:
        """Remote config is NotFound when empty, saved, replaced and cleared."""
        self.fails(self.store.remote.get(), NotFound)
        self.successResultOf(self.store.remote.save({"enabled": True, "tld": "example"}))
        record = self.successResultOf(self.store.remote.get())
        self.assertEqual(record.config, {"enabled": True, "tld": "example"})
        self.successResultOf(self.store.remote.clear())
        self.fails(self.store.remote.get(), NotFound)
        revision = self.store.info().revision
        self.successResultOf(self.store.remote.clear())
        self.assertEqual(self.store.info().revision, revision)
        self.fails(self.store.remote.save("x"), InvalidCommand)  # type: ignore[arg-type]

    def test_audit(self) -> None:
        """Audit entries get ids and times, come back newest first, and prune."""
        for i in range(5):
            self.clock.advance(1)
            self.successResultOf(
                self.store.audit.append(AuditEntry(f"a{i}", "admin", "ok", detail="d"))
            )
        recent = self.successResultOf(self.store.audit.recent(3))
        self.assertEqual([e.action for e in recent], ["a4", "a3", "a2"])
        self.assertEqual(recent[0].time, self.clock.seconds())
        self.assertEqual(self.successResultOf(self.store.audit.prune(2)), 3)
        self.assertEqual(len(self.successResultOf(self.store.audit.recent(100))), 2)
        self.assertEqual(self.successResultOf(self.store.audit.prune(10)), 0)
        self.fails(self.store.audit.recent(0), InvalidCommand)
        self.fails(self.store.audit.prune(-1), InvalidCommand)

    def test_settings(self) -> None:
        """Settings set/get/items/delete with JSON values; bad keys and values refused."""
        self.successResultOf(self.store.settings.set("b", {"x": [1, "two", None]}))
        self.successResultOf(self.store.settings.set("a", 3.5))
        self.assertEqual(
            self.successResultOf(self.store.settings.items()),
            {"a": 3.5, "b": {"x": [1, "two", None]}},
        )
        self.successResultOf(self.store.settings.delete("a"))
        self.fails(self.store.settings.get("a"), NotFound)
        self.fails(self.store.settings.delete("a"), NotFound)
        self.fails(self.store.settings.set("", 1), InvalidCommand)
        self.fails(self.store.settings.set("k" * 300, 1), InvalidCommand)
        self.fails(self.store.settings.set("k", {1, 2}), InvalidCommand)


class ThreadingTests(StoreCase):
    def test_pool_is_used_for_every_call(self) -> None:
        """With a pool, no store call runs on the calling thread (inline pool records calls)."""
        calls: list[str] = []

        class RecordingPool:
            started = True

            def callInThreadWithCallback(self, on_result: Any, fn: Any, *a: Any, **kw: Any) -> None:
                calls.append(getattr(fn, "__name__", "?"))
                try:
                    on_result(True, fn(*a, **kw))
                except BaseException:
                    on_result(False, Failure())

        class ThreadedClock(Clock):
            def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
                f(*a, **kw)

        clock = ThreadedClock()
        store = ControlStore(clock, RecordingPool(), self.bus)  # type: ignore[arg-type]
        self.successResultOf(store.open(self.path, KEY))
        self.successResultOf(store.settings.set("a", 1))
        self.assertEqual(self.successResultOf(store.settings.get("a")), 1)
        self.successResultOf(store.close())
        self.assertEqual(len(calls), 4)
        self.assertFalse(os.path.exists(str(self.path) + "-wal"))
