"""
Replication of the control store over a cluster commit log: sealing, the
two-hop leader write, applying on followers, the sync driver, snapshots and
joining with the shared keyset.

The cluster is :class:`FakeCluster`: an in-memory linear log with the
vocabulary's rules (a commit must follow the head, a snapshot restarts an
empty or older log, a deposed writer gets ``NotLeader``), a key-value store
for ``cluster.fenced_put``/``cluster.get``, and ``CommitLogAdvanced`` on
every node's bus after each append, like the etcd variant's watch.  Each
node is a real kernel (bus, registry, dispatcher) with a real persistence
service on its own state dir, inline, on one shared ``Clock``.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import (
    ApplyCommits,
    ClusterValue,
    Command,
    CommandContext,
    CommitLog,
    CommitReplicated,
    FencedPut,
    FencedPutDone,
    JoinCluster,
    ReadClusterKey,
    ReadCommits,
    ReplicateCommit,
    SealedCommit,
    StoreDone,
    StoreSetSetting,
)
from piccolod.errors import (
    CommitConflict,
    Conflict,
    IllegalTransition,
    Locked,
    NotFound,
    NotLeader,
    RateLimited,
    Unavailable,
)
from piccolod.events import CommitLogAdvanced, ControlStoreCommit, LockState, Role
from piccolod.interfaces import AppRecord, AuditEntry, AuthState
from piccolod.kernel.dispatcher import CommandDispatcher, is_retryable
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.persistence import store as storemod
from piccolod.persistence.errors import WrongPassword
from piccolod.persistence.keyset import KdfParams
from piccolod.persistence.replication import (
    Diverged,
    SyncDriver,
    decode_params,
    encode_params,
    log_key,
    seal,
    unseal,
)
from piccolod.persistence.service import PersistenceConfig, PersistenceService
from piccolod.testing.bus import FakeEventBus

PASSWORD = "cluster admin password"
FAST = KdfParams(time_cost=1, memory_kib=8, parallelism=1)
CANARY = "REPLICA-CANARY-5d1e"
TABLES = ("apps", "audit", "auth", "remote_config", "settings")


# --------------------------------------------------------------------------
# The fake cluster


class FakeCluster:
    """The two log commands and the key-value commands over one in-memory log."""

    def __init__(self) -> None:
        self.log: list[SealedCommit] = []
        self.kv: dict[str, str] = {}
        self.nodes: list[Node] = []
        self.deposed: set[str] = set()
        self.hold = False
        self.pending: list[tuple[SealedCommit, Deferred[CommitReplicated]]] = []
        self.read_failures = 0
        self.announce = True
        self.etcd_revision = 0
        self.reads: list[int] = []
        self.conflicts = 0
        self.refuse_snapshots = 0
        #: Appends that land but whose answer is lost (a timeout).
        self.lose_answers = 0
        #: Appends that fail before reaching the log.
        self.append_failures = 0

    def head(self) -> int | None:
        return self.log[-1].revision if self.log else None

    def attach(self, node: Node) -> None:
        self.nodes.append(node)
        name = node.name
        d = node.dispatcher
        d.register(ReplicateCommit, lambda c, ctx: self._replicate(name, c))
        d.register(ReadCommits, lambda c, ctx: self._read(c))
        d.register(FencedPut, lambda c, ctx: self._put(name, c))
        d.register(ReadClusterKey, lambda c, ctx: self._get(c))

    def _replicate(self, name: str, command: ReplicateCommit) -> Deferred[CommitReplicated]:
        if name in self.deposed:
            return fail(NotLeader("control-plane"))
        if self.hold:
            waiter: Deferred[CommitReplicated] = Deferred()
            self.pending.append((command.entry, waiter))
            return waiter
        if self.append_failures:
            self.append_failures -= 1
            return fail(Unavailable("the shared store cannot be reached"))
        try:
            appended = self._append(command.entry)
        except Exception as e:
            return fail(e)
        if self.lose_answers:
            self.lose_answers -= 1
            return fail(Unavailable("cluster.replicate_commit timed out"))
        return succeed(appended)

    def release(self) -> None:
        """Answer every held append, in order."""
        self.hold = False
        pending, self.pending = self.pending, []
        for entry, waiter in pending:
            try:
                waiter.callback(self._append(entry))
            except Exception as e:
                waiter.errback(e)

    def _append(self, entry: SealedCommit) -> CommitReplicated:
        head = self.head()
        if entry.kind == "commit":
            if head != entry.revision - 1:
                self.conflicts += 1
                raise CommitConflict(f"the log's head is {head}", head=head)
            self.log.append(entry)
        else:
            if self.refuse_snapshots:
                self.refuse_snapshots -= 1
                raise CommitConflict("a write landed first", head=head)
            # Like the etcd variant: a snapshot restarts an empty or older log,
            # or compacts one whose head it is (same revision, same checksum).
            if head is not None and (
                head > entry.revision
                or (head == entry.revision and self.log[-1].checksum != entry.checksum)
            ):
                raise CommitConflict(f"the log's head is {head}", head=head)
            self.log = [entry]
        self.etcd_revision += 1
        if self.announce:
            for node in self.nodes:
                node.bus.publish(CommitLogAdvanced(entry.revision, self.etcd_revision), "consensus")
        return CommitReplicated(entry.revision, self.etcd_revision, 1)

    def _read(self, command: ReadCommits) -> Deferred[CommitLog]:
        self.reads.append(command.after)
        if self.read_failures:
            self.read_failures -= 1
            return fail(Unavailable("the shared store cannot be reached"))
        entries: list[SealedCommit] = []
        after = command.after
        if self.log and self.log[0].kind == "snapshot" and after < self.log[0].revision:
            entries.append(self.log[0])
            after = self.log[0].revision
        entries.extend(e for e in self.log if e.kind == "commit" and e.revision > after)
        page = entries[: command.limit]
        return succeed(CommitLog(tuple(page), self.head(), len(entries) > len(page)))

    def _put(self, name: str, command: FencedPut) -> Deferred[FencedPutDone]:
        if name in self.deposed:
            return fail(NotLeader("control-plane"))
        self.kv[command.key] = command.value
        self.etcd_revision += 1
        return succeed(FencedPutDone(command.key, self.etcd_revision, 1))

    def _get(self, command: ReadClusterKey) -> ClusterValue:
        return ClusterValue(command.key, self.kv.get(command.key))


class Node:
    """One node: a kernel (bus, registry, dispatcher) and a persistence service."""

    def __init__(
        self,
        case: SynchronousTestCase,
        clock: Clock,
        name: str,
        cluster: FakeCluster | None,
        leader: bool,
    ) -> None:
        self.case = case
        self.clock = clock
        self.name = name
        self.state_dir = Path(tempfile.mkdtemp(prefix=f"replica-{name}-"))
        case.addCleanup(shutil.rmtree, self.state_dir, True)
        self.bus = FakeEventBus(clock)
        self.registry = LeadershipRegistry(self.bus, name)
        self.term = 1
        if leader:
            self.registry.update("control-plane", Role.LEADER, self.term)
        else:
            self.registry.update(
                "control-plane", Role.FOLLOWER, self.term, leader_id="a", leader_address="http://a"
            )
        self.dispatcher = CommandDispatcher(clock, self.bus, registry=self.registry)
        if cluster is not None:
            cluster.attach(self)
        self.service = PersistenceService(
            clock,
            self.state_dir / "persistence",
            self.bus,
            PersistenceConfig(kdf=FAST),
            dispatcher=self.dispatcher,
            registry=self.registry,
        )
        self.service.startService()
        case.addCleanup(self.stop)

    def stop(self) -> None:
        if self.service.running:
            self.case.successResultOf(self.service.stopService())

    def lead(self, leader: bool, leader_id: str = "a") -> None:
        self.term += 1
        if leader:
            self.registry.update("control-plane", Role.LEADER, self.term)
        else:
            self.registry.update("control-plane", Role.FOLLOWER, self.term, leader_id=leader_id)

    def result(self, d: Any) -> Any:
        self.clock.advance(0)
        return self.case.successResultOf(d)

    def settle(self) -> None:
        """Deliver pending events (and what they cause) on the shared clock."""
        for _ in range(5):
            self.clock.advance(0)

    def populate(self) -> None:
        s = self.service
        self.result(s.auth.save(AuthState(True, "$argon2id$hash")))
        self.result(s.apps.put(AppRecord("web", {"image": "busybox", "env": {"K": CANARY}})))
        self.result(s.apps.put(AppRecord("db", {"image": "postgres"}, enabled=False)))
        self.result(s.remote.save({"enabled": True, "secret": CANARY}))
        self.result(s.audit.append(AuditEntry("apps.install", "admin", "ok", detail=CANARY)))
        self.result(s.settings.set("theme", {"dark": True}))
        self.result(s.settings.set("blob", {"bytes": base64.b64encode(b"\x00\xff").decode()}))

    def dump(self) -> dict[str, Any]:
        def read(tx: Any) -> dict[str, Any]:
            rows = {t: tx.query(f'SELECT * FROM "{t}" ORDER BY rowid') for t in TABLES}
            rows["sqlite_sequence"] = tx.query("SELECT name, seq FROM sqlite_sequence")
            return rows

        info = self.service.info()
        return {
            "revision": info.revision,
            "checksum": info.checksum,
            "rows": self.result(self.service.store.read(read)),
        }


class ReplicationCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.cluster = FakeCluster()

    def node(self, name: str, leader: bool, cluster: bool = True) -> Node:
        return Node(self, self.clock, name, self.cluster if cluster else None, leader)

    def leader(self) -> Node:
        """Node ``a``: set up, unlocked and synced as the cluster's leader."""
        a = self.node("a", leader=True)
        a.result(a.service.setup(PASSWORD))
        a.result(a.service.unlock(password=PASSWORD))
        a.settle()
        self.assertTrue(a.service.sync is not None and a.service.sync.synced)
        return a

    def joined(self, name: str = "b") -> Node:
        b = self.node(name, leader=False)
        b.result(b.service.join(PASSWORD))
        b.settle()
        return b

    def assertSame(self, a: Node, b: Node) -> None:
        left, right = a.dump(), b.dump()
        self.assertEqual(left, right)
        self.assertGreater(left["revision"], 0)

    def quiet(self) -> None:
        """No more sync runs on any node (to watch apply_commits alone)."""
        self.patch(SyncDriver, "kick", lambda self, reason="": None)

    def tearDown(self) -> None:
        self.clock.advance(0)


# --------------------------------------------------------------------------
# Sealing


class SealingTests(SynchronousTestCase):
    KEY = bytes(range(32))

    def entry(self) -> SealedCommit:
        return seal(self.KEY, "commit", 7, "a" * 64, "b" * 64, {"statements": [], "x": CANARY})

    def test_round_trip(self) -> None:
        """A sealed entry opens to its contents under the same key."""
        self.assertEqual(unseal(self.KEY, self.entry())["x"], CANARY)

    def test_no_plaintext_in_the_sealed_text(self) -> None:
        """Neither the text nor its base64 decoding contains the contents in clear."""
        entry = self.entry()
        self.assertNotIn(CANARY, entry.sealed)
        self.assertNotIn(CANARY.encode(), base64.b64decode(entry.sealed))

    def test_fresh_nonce_per_entry(self) -> None:
        """Sealing the same contents twice gives different ciphertexts."""
        self.assertNotEqual(self.entry().sealed, self.entry().sealed)

    def test_tampering_is_refused(self) -> None:
        """A flipped byte, another bound field, another key or garbage fails with Conflict."""
        entry = self.entry()
        raw = bytearray(base64.b64decode(entry.sealed))
        raw[-1] ^= 1
        flipped = attrs.evolve(entry, sealed=base64.b64encode(bytes(raw)).decode())
        for bad in (
            flipped,
            attrs.evolve(entry, revision=8),
            attrs.evolve(entry, checksum="c" * 64),
            attrs.evolve(entry, previous="c" * 64),
            attrs.evolve(entry, kind="snapshot"),
            attrs.evolve(entry, sealed="not base64!"),
            attrs.evolve(entry, sealed=base64.b64encode(b"short").decode()),
        ):
            with self.assertRaises(Conflict):
                unseal(self.KEY, bad)
        with self.assertRaises(Conflict):
            unseal(bytes(32), entry)

    def test_params_encode_bytes(self) -> None:
        """SQL parameters survive JSON, bytes as {"b64": ...}; other types are refused."""
        params = ["x", 1, 2.5, None, b"\x00\xff"]
        encoded = encode_params(params)
        self.assertEqual(decode_params(json.loads(json.dumps(encoded))), tuple(params))
        with self.assertRaises(TypeError):
            encode_params([object()])
        with self.assertRaises(Conflict):
            decode_params([{"b64": 1}])


# --------------------------------------------------------------------------
# The leader's write


class LeaderWriteTests(ReplicationCase):
    def test_commit_is_in_the_log_before_the_write_is_acknowledged(self) -> None:
        """The entry reaches the log first; the local commit and the answer come after."""
        a = self.leader()
        before = a.service.info().revision
        self.cluster.hold = True
        write = a.service.settings.set("k", CANARY)
        self.assertNoResult(write)
        self.assertEqual(len(self.cluster.pending), 1)
        self.assertEqual(self.cluster.pending[0][0].revision, before + 1)
        self.assertEqual(a.service.info().revision, before)
        # Nothing else runs on the connection meanwhile: a read waits.
        read = a.service.settings.get("k")
        self.assertNoResult(read)
        self.cluster.release()
        self.assertIsNone(a.result(write))
        self.assertEqual(a.result(read), CANARY)
        self.assertEqual(a.service.info().revision, before + 1)
        self.assertEqual(self.cluster.head(), before + 1)
        self.assertEqual(self.cluster.log[-1].checksum, a.service.info().checksum)
        commits = [e for e in a.bus.events(ControlStoreCommit.topic)]
        self.assertEqual(
            commits[-1], ControlStoreCommit(before + 1, a.service.info().checksum, ("settings",))
        )

    def test_queued_writes_run_in_order_after_the_held_one(self) -> None:
        """Writes submitted while one is between its hops follow it, each in the log first."""
        a = self.leader()
        base = a.service.info().revision
        self.cluster.hold = True
        first = a.service.settings.set("k", 1)
        second = a.service.settings.set("k", 2)
        self.assertNoResult(second)
        self.cluster.release()
        a.result(first)
        a.result(second)
        self.assertEqual([e.revision for e in self.cluster.log[-2:]], [base + 1, base + 2])
        self.assertEqual(a.result(a.service.settings.get("k")), 2)

    def test_no_change_is_not_replicated(self) -> None:
        """A write that changes nothing appends nothing and commits nothing."""
        a = self.leader()
        a.result(a.service.settings.set("k", 1))
        head = self.cluster.head()
        a.result(a.service.settings.set("k", 1))
        self.assertEqual(self.cluster.head(), head)

    def test_not_leader_rolls_back(self) -> None:
        """A deposed leader's append is refused: NotLeader, nothing local, nothing in the log."""
        a = self.leader()
        revision, head = a.service.info().revision, self.cluster.head()
        self.cluster.deposed.add("a")
        self.failureResultOf(a.service.settings.set("k", CANARY), NotLeader)
        self.assertEqual(a.service.info().revision, revision)
        self.assertEqual(self.cluster.head(), head)
        self.failureResultOf(a.service.settings.get("k"), NotFound)
        # The connection is free again: the next write works once the term holds.
        self.cluster.deposed.clear()
        a.result(a.service.settings.set("k", 1))
        self.assertEqual(a.service.info().revision, revision + 1)

    def test_commit_conflict_catches_up_and_the_retry_succeeds(self) -> None:
        """A log ahead of the leader: rollback, a sync applies it, a retried write follows it."""
        a = self.leader()
        b = self.joined()
        self.assertSame(a, b)
        # b leads for a while and writes; a does not hear of it yet.
        self.cluster.announce = False
        a.lead(False, leader_id="b")
        b.lead(True)
        b.settle()
        b.result(b.service.settings.set("from-b", CANARY))
        # a leads again, its role event still undelivered: it believes it is in sync.
        a.term = b.term
        a.lead(True)
        b.lead(False)
        failure = self.failureResultOf(a.service.settings.set("from-a", 1), Unavailable)
        self.assertTrue(is_retryable(failure))
        self.assertEqual(self.cluster.conflicts, 1)
        a.settle()
        self.assertEqual(a.result(a.service.settings.get("from-b")), CANARY)
        self.failureResultOf(a.service.settings.get("from-a"), NotFound)

        # Through the dispatcher's retry middleware, the next write just works.
        @attrs.frozen
        class SetWithRetries(Command):
            name: ClassVar[str] = "test.set_with_retries"
            retries: ClassVar[int] = 3
            key: str

        def handle(command: SetWithRetries, context: CommandContext) -> Deferred[StoreDone]:
            return a.service.settings.set(command.key, 2).addCallback(lambda _: StoreDone())

        a.dispatcher.register(SetWithRetries, handle)
        a.result(a.dispatcher.dispatch(SetWithRetries("from-a")))
        self.assertEqual(a.result(a.service.settings.get("from-a")), 2)
        self.assertEqual(self.cluster.head(), a.service.info().revision)
        self.assertEqual(self.cluster.log[-1].checksum, a.service.info().checksum)

    def handover_with_a_failed_catch_up(self, backoff: float | None = None) -> tuple[Node, Node]:
        """Leadership passes from a to the joined b, whose first catch-up read fails."""
        a = self.leader()
        b = self.joined()
        a.populate()
        b.settle()
        a.lead(False, leader_id="b")
        a.settle()
        assert b.service.sync is not None
        if backoff is not None:
            b.service.sync.backoff_initial = backoff
        self.cluster.read_failures = 1  # its first catch-up fails: writes are refused
        b.lead(True)
        b.settle()
        self.assertFalse(b.service.sync.synced)
        return a, b

    def test_unsynced_leader_refuses_writes_until_caught_up(self) -> None:
        """A new leader answers writes with a retryable Unavailable until it has every commit."""
        a, b = self.handover_with_a_failed_catch_up()
        failure = self.failureResultOf(b.service.settings.set("k", 1), Unavailable)
        self.assertTrue(is_retryable(failure))
        self.clock.advance(1)  # the backoff retry
        b.settle()
        self.assertTrue(b.service.sync.synced)  # type: ignore[union-attr]
        b.result(b.service.settings.set("k", 1))
        a.settle()
        self.assertSame(a, b)

    def test_store_writes_ride_out_a_catch_up(self) -> None:
        """
        store.settings.set sent to a new leader still catching up succeeds once it has
        caught up: the dispatcher retries the store's idempotent writes.
        """
        a, b = self.handover_with_a_failed_catch_up(backoff=0.01)
        assert b.service.sync is not None
        d = b.dispatcher.dispatch(StoreSetSetting("k", {"v": 1}))
        self.assertNoResult(d)  # refused (retryable), retried on the dispatcher's backoff
        for _ in range(10):
            self.clock.advance(0.01)
            b.settle()
        self.assertEqual(self.successResultOf(d), StoreDone())
        self.assertEqual(b.result(b.service.settings.get("k")), {"v": 1})
        a.settle()
        self.assertSame(a, b)

    def test_an_append_whose_answer_is_lost_commits_once(self) -> None:
        """
        The log took the entry but its answer was lost: the store finds its own entry
        in the log and commits; a non-idempotent write (an audit record) is there once.
        """
        a = self.leader()
        b = self.joined()
        revision = a.service.info().revision
        self.cluster.lose_answers = 1
        with capturedLogs() as logs:
            a.result(a.service.audit.append(AuditEntry("x", "admin", "ok", detail=CANARY)))
        self.assertTrue(any("the cluster log has it" in str(e.get("log_format")) for e in logs))
        self.assertEqual(a.service.info().revision, revision + 1)
        self.assertEqual(self.cluster.head(), revision + 1)
        self.assertEqual(a.service.info().checksum, self.cluster.log[-1].checksum)
        a.result(a.service.settings.set("next", 1))  # the next write follows at once
        b.settle()
        self.assertSame(a, b)
        audit = a.result(a.service.audit.recent(10))
        self.assertEqual([e.detail for e in audit], [CANARY])

    def test_an_append_that_never_landed_rolls_back(self) -> None:
        """The append failed before the log: the check finds nothing; it fails, nothing kept."""
        a = self.leader()
        revision, head = a.service.info().revision, self.cluster.head()
        self.cluster.append_failures = 1
        self.failureResultOf(a.service.settings.set("k", CANARY), Unavailable)
        self.assertEqual((a.service.info().revision, self.cluster.head()), (revision, head))
        self.failureResultOf(a.service.settings.get("k"), NotFound)
        a.result(a.service.settings.set("k", 1))
        self.assertEqual(a.service.info().revision, revision + 1)

    def test_a_lost_answer_and_a_failed_check_roll_back_then_sync(self) -> None:
        """
        Neither the append's answer nor the check gets through: the write fails (its
        outcome unknown to the caller) and the next sync applies the entry the log has.
        """
        a = self.leader()
        revision = a.service.info().revision
        self.cluster.lose_answers = 1
        self.cluster.read_failures = 1
        with capturedLogs() as logs:
            self.failureResultOf(a.service.settings.set("k", CANARY), Unavailable)
        self.assertTrue(any("could not check" in str(e.get("log_format")) for e in logs))
        self.assertEqual(self.cluster.head(), revision + 1)
        a.settle()
        assert a.service.sync is not None
        a.service.sync.kick("test")
        a.settle()
        self.assertEqual(a.service.info().revision, revision + 1)
        self.assertEqual(a.result(a.service.settings.get("k")), CANARY)

    def test_crash_between_append_and_local_commit(self) -> None:
        """The log has the entry but the local commit failed: after reopening it is applied once."""
        a = self.leader()
        revision = a.service.info().revision
        real = storemod._Database.finish_replicated

        def broken(db: Any, commit: Any, ok: bool) -> None:
            if ok:
                db._rollback()
                raise OSError("power loss")
            real(db, commit, ok)

        self.patch(storemod._Database, "finish_replicated", broken)
        self.failureResultOf(
            a.service.audit.append(AuditEntry("x", "admin", "ok", detail=CANARY)), OSError
        )
        self.flushLoggedErrors(OSError)
        self.patch(storemod._Database, "finish_replicated", real)
        self.assertEqual(self.cluster.head(), revision + 1)
        a.result(a.service.lock())
        a.result(a.service.unlock(password=PASSWORD))
        a.settle()
        self.assertEqual(a.service.info().revision, revision + 1)
        self.assertEqual(a.service.info().checksum, self.cluster.log[-1].checksum)
        audit = a.result(a.service.audit.recent(10))
        self.assertEqual([e.detail for e in audit], [CANARY])

    def test_failed_local_commit_is_caught_up_without_reopening(self) -> None:
        """A lost local commit makes the driver re-apply the entry; the next write follows it."""
        a = self.leader()
        revision = a.service.info().revision
        real = storemod._Database.finish_replicated
        calls = []

        def broken(db: Any, commit: Any, ok: bool) -> None:
            calls.append(ok)
            if ok and len(calls) == 1:
                db._rollback()
                raise OSError("disk full")
            real(db, commit, ok)

        self.patch(storemod._Database, "finish_replicated", broken)
        self.failureResultOf(a.service.settings.set("k", 1), OSError)
        self.flushLoggedErrors(OSError)
        a.settle()
        self.assertEqual(a.service.info().revision, revision + 1)
        a.result(a.service.settings.set("k", 2))
        self.assertEqual(a.service.info().revision, revision + 2)
        self.assertEqual(self.cluster.log[-1].checksum, a.service.info().checksum)


# --------------------------------------------------------------------------
# Followers


class FollowerTests(ReplicationCase):
    def test_follower_ends_identical(self) -> None:
        """A follower applying the leader's log has the same revision, checksum and rows."""
        a = self.leader()
        a.populate()
        b = self.joined()
        self.assertSame(a, b)
        a.result(a.service.apps.delete("db"))
        a.result(a.service.audit.append(AuditEntry("more", "admin", "ok")))
        a.result(a.service.audit.prune(1))
        a.result(a.service.audit.append(AuditEntry("after-prune", "admin", "ok")))
        b.settle()
        self.assertSame(a, b)
        status = b.service.status()
        assert status.store is not None
        replication = status.store["replication"]
        self.assertEqual(replication["state"], "synced")
        self.assertEqual(replication["lag"], 0)
        self.assertEqual(replication["log_head"], a.service.info().revision)

    def test_follower_writes_are_refused(self) -> None:
        """A follower's own writes stay NotLeader with the leader's hint; its reads work."""
        a = self.leader()
        a.populate()
        b = self.joined()
        failure = self.failureResultOf(b.service.settings.set("k", 1), NotLeader)
        self.assertEqual(failure.value.leader_id, "a")
        self.assertEqual(b.result(b.service.settings.get("theme")), {"dark": True})

    def test_idempotent_reapply(self) -> None:
        """Applying entries already applied changes nothing."""
        a = self.leader()
        a.populate()
        b = self.joined()
        before = b.dump()
        done = b.result(b.dispatcher.dispatch(ApplyCommits(tuple(self.cluster.log))))
        self.assertEqual((done.revision, done.applied), (before["revision"], 0))
        self.assertEqual(b.dump(), before)

    def test_gap_is_a_commit_conflict(self) -> None:
        """An entry that does not follow the store's head fails CommitConflict(head)."""
        a = self.leader()
        b = self.joined()
        revision = b.service.info().revision
        self.quiet()
        a.result(a.service.settings.set("k", 1))
        a.result(a.service.settings.set("k", 2))
        failure = self.failureResultOf(
            b.dispatcher.dispatch(ApplyCommits((self.cluster.log[-1],))), CommitConflict
        )
        self.assertEqual(failure.value.head, revision)
        self.assertEqual(b.service.info().revision, revision)

    def test_tampered_entry_applies_nothing(self) -> None:
        """A tampered sealed text fails with Conflict and the store does not move."""
        a = self.leader()
        b = self.joined()
        self.quiet()
        a.result(a.service.settings.set("k", CANARY))
        entry = self.cluster.log[-1]
        raw = bytearray(base64.b64decode(entry.sealed))
        raw[20] ^= 0x40
        bad = attrs.evolve(entry, sealed=base64.b64encode(bytes(raw)).decode())
        revision = b.service.info().revision
        failure = self.failureResultOf(b.dispatcher.dispatch(ApplyCommits((bad,))), Conflict)
        self.assertNotIsInstance(failure.value, (CommitConflict, Diverged))
        self.assertEqual(b.service.info().revision, revision)
        self.failureResultOf(b.service.settings.get("k"), NotFound)

    def test_divergent_checksum_rolls_back(self) -> None:
        """An entry whose statements end at another checksum is rolled back: Diverged."""
        a = self.leader()
        b = self.joined()
        self.quiet()
        a.result(a.service.settings.set("k", CANARY))
        entry = self.cluster.log[-1]
        key = log_key(a.service.data_key)  # type: ignore[arg-type]
        contents = unseal(key, entry)
        contents.pop("v")
        forged = seal(key, "commit", entry.revision, entry.previous, "f" * 64, contents)
        revision = b.service.info().revision
        self.failureResultOf(b.dispatcher.dispatch(ApplyCommits((forged,))), Diverged)
        self.assertEqual(b.service.info().revision, revision)
        self.failureResultOf(b.service.settings.get("k"), NotFound)
        # The genuine entry still applies afterwards.
        b.result(b.dispatcher.dispatch(ApplyCommits((entry,))))
        self.assertSame(a, b)

    def test_apply_while_locked(self) -> None:
        """apply_commits fails with Locked while the store is closed."""
        self.leader()
        b = self.joined()
        b.result(b.service.lock())
        self.failureResultOf(b.dispatcher.dispatch(ApplyCommits(tuple(self.cluster.log))), Locked)

    def test_locked_follower_catches_up_at_unlock(self) -> None:
        """Commits made while a follower was locked are applied when it unlocks."""
        a = self.leader()
        b = self.joined()
        b.result(b.service.lock())
        a.populate()
        b.settle()
        self.assertEqual(b.service.state, LockState.LOCKED)
        b.result(b.service.unlock(password=PASSWORD))
        b.settle()
        self.assertSame(a, b)

    def test_failed_reads_back_off_and_show_lag(self) -> None:
        """A failing log read is retried after a backoff; status shows the lag meanwhile."""
        a = self.leader()
        b = self.joined()
        self.cluster.read_failures = 2
        a.result(a.service.settings.set("k", 1))
        b.settle()
        status = b.service.status().store
        assert status is not None
        self.assertEqual(status["replication"]["state"], "backoff")
        self.assertEqual(status["replication"]["lag"], 1)
        self.assertIn("unavailable", status["replication"]["last_error"])
        self.clock.advance(0.5)
        b.settle()
        self.assertEqual(b.service.status().store["replication"]["lag"], 1)  # type: ignore[index]
        self.clock.advance(1.0)
        b.settle()
        self.assertSame(a, b)
        self.assertEqual(b.service.status().store["replication"]["state"], "synced")  # type: ignore[index]

    def test_stop_leaves_no_timers(self) -> None:
        """Stopping the service cancels a pending sync retry."""
        self.leader()
        b = self.joined()
        self.cluster.read_failures = 5
        b.service.sync.kick("test")  # type: ignore[union-attr]
        self.assertTrue(self.clock.getDelayedCalls())
        b.stop()
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if "_retried" in repr(c.func)], []
        )


# --------------------------------------------------------------------------
# Snapshots


class SnapshotTests(ReplicationCase):
    def test_existing_leader_bootstraps_the_log_with_a_snapshot(self) -> None:
        """A leader with data and an empty log appends a snapshot; a joiner starts from it."""
        solo = self.node("a", leader=True, cluster=False)
        solo.result(solo.service.setup(PASSWORD))
        solo.result(solo.service.unlock(password=PASSWORD))
        solo.populate()
        self.assertIsNone(solo.service.status().store.get("replication"))  # type: ignore[union-attr]
        # The consensus variant with a log arrives (e.g. etcd configured).
        self.cluster.attach(solo)
        solo.lead(True)
        solo.settle()
        self.assertEqual([e.kind for e in self.cluster.log], ["snapshot"])
        self.assertEqual(self.cluster.log[0].revision, solo.service.info().revision)
        self.assertEqual(self.cluster.log[0].checksum, solo.service.info().checksum)
        self.assertIn(CLUSTER_KEY, self.cluster.kv)
        b = self.joined()
        self.assertSame(solo, b)
        chain = b.result(b.service.store.verify_chain())
        self.assertTrue(chain.ok, chain.detail)
        solo.result(solo.service.settings.set("after", 1))
        b.settle()
        self.assertSame(solo, b)
        for entry in self.cluster.log:
            self.assertNotIn(CANARY, entry.sealed)
            self.assertNotIn(CANARY.encode(), base64.b64decode(entry.sealed))

    def test_diverged_follower_is_restored_from_the_snapshot(self) -> None:
        """A store whose history differs from the log's is replaced by the log's snapshot."""
        a = self.leader()
        a.populate()
        b = self.joined()
        # b's own revision 1 (its schema migration) never matched a's; it was
        # restored from the snapshot, which a wrote at its first sync.
        self.assertEqual(self.cluster.log[0].kind, "snapshot")
        self.assertIn(0, self.cluster.reads)  # the re-read from the start
        self.assertSame(a, b)

    def test_snapshot_not_behind_is_refused_by_the_log(self) -> None:
        """A leader whose store equals the log's head appends no new snapshot."""
        a = self.leader()
        a.populate()
        kinds = [e.kind for e in self.cluster.log]
        a.lead(True)
        a.settle()
        self.assertEqual([e.kind for e in self.cluster.log], kinds)

    def test_the_leader_compacts_the_log_every_n_revisions(self) -> None:
        """
        Every snapshot_every revisions the leader appends a snapshot of its head, the log
        drops the commits it covers, and a joiner starts from it with the same data.
        """
        a = self.leader()
        assert a.service.sync is not None
        a.service.sync.snapshot_every = 5
        while a.service.info().revision < 12:
            a.result(a.service.settings.set("counter", a.service.info().revision))
            a.settle()
        log = self.cluster.log
        self.assertEqual(log[0].kind, "snapshot")
        self.assertEqual(log[0].revision, 10)
        self.assertEqual([e.revision for e in log[1:]], [11, 12])
        self.assertTrue(all(e.kind == "commit" for e in log[1:]))
        self.assertEqual(a.service.sync.status().compactions, 2)  # at 5 and at 10
        b = self.joined()
        self.assertSame(a, b)
        self.assertNotIn(1, self.cluster.reads[1:])  # nobody replays the compacted history

    def test_a_refused_compaction_waits_for_the_next_multiple(self) -> None:
        """
        A snapshot the log refuses (a write landed first, a lost term) fails nothing: the
        writes go on, and the next multiple of snapshot_every compacts.
        """
        a = self.leader()
        assert a.service.sync is not None
        a.service.sync.snapshot_every = 5
        self.cluster.refuse_snapshots = 1
        while a.service.info().revision < 11:
            a.result(a.service.settings.set("n", a.service.info().revision))
            a.settle()
        self.assertEqual(self.cluster.refuse_snapshots, 0)  # the one at 5 was refused
        self.assertEqual(self.cluster.log[0].kind, "snapshot")
        self.assertEqual(self.cluster.log[0].revision, 10)
        status = a.service.sync.status()
        self.assertEqual((status.compactions, status.synced, status.last_error), (1, True, None))
        b = self.joined()
        self.assertSame(a, b)


CLUSTER_KEY = "control/keyset"


# --------------------------------------------------------------------------
# The keyset in the cluster and joining


class KeysetTests(ReplicationCase):
    def test_setup_publishes_only_wrapped_keys(self) -> None:
        """Setup on the leader puts the keyset at control/keyset: no password, no data key."""
        a = self.leader()
        shared = self.cluster.kv[CLUSTER_KEY]
        local = (a.state_dir / "persistence" / "keyset.json").read_text()
        self.assertEqual(json.loads(shared), json.loads(local))
        self.assertNotIn(PASSWORD, shared)
        key = bytes(a.service.data_key._material())  # type: ignore[union-attr]
        for form in (key.hex(), base64.b64encode(key).decode()):
            self.assertNotIn(form, shared)

    def test_setup_refused_when_the_cluster_has_a_keyset(self) -> None:
        """A second setup in a cluster with a keyset is a Conflict that says to join."""
        self.leader()
        c = self.node("c", leader=True)
        failure = self.failureResultOf(c.service.setup(PASSWORD), Conflict)
        self.assertIn("join", failure.value.detail)
        self.assertEqual(c.service.state, LockState.UNINITIALIZED)

    def test_setup_on_a_follower_is_not_leader(self) -> None:
        """Setup on a cluster follower fails with NotLeader."""
        b = self.node("b", leader=False)
        self.failureResultOf(b.service.setup(PASSWORD), NotLeader)
        self.assertEqual(b.service.state, LockState.UNINITIALIZED)

    def test_join_failures(self) -> None:
        """Join: NotFound without a keyset, WrongPassword (rate-limited), then IllegalTransition."""
        b = self.node("b", leader=False)
        self.failureResultOf(b.dispatcher.dispatch(JoinCluster(password=PASSWORD)), NotFound)
        self.leader()
        self.failureResultOf(b.service.join("not the password"), WrongPassword)
        self.failureResultOf(b.service.join(PASSWORD), RateLimited)
        self.assertEqual(b.service.state, LockState.UNINITIALIZED)
        self.assertFalse((b.state_dir / "persistence" / "keyset.json").exists())
        self.clock.advance(2)
        b.result(b.service.join(PASSWORD))
        self.assertEqual(b.service.state, LockState.UNLOCKED)
        self.failureResultOf(b.service.join(PASSWORD), IllegalTransition)

    def test_join_without_a_shared_store(self) -> None:
        """A node whose consensus has no shared store cannot join: NotFound."""
        solo = self.node("s", leader=True, cluster=False)
        self.failureResultOf(solo.service.join(PASSWORD), NotFound)

    def test_join_then_identical_data(self) -> None:
        """A joined node unlocks with the cluster password and holds the leader's data."""
        a = self.leader()
        a.populate()
        b = self.node("b", leader=False)
        status = b.result(b.dispatcher.dispatch(JoinCluster(password=PASSWORD)))
        b.settle()
        self.assertEqual(status.state, "unlocked")
        self.assertSame(a, b)
        b.result(b.service.lock())
        b.result(b.service.unlock(password=PASSWORD))
        b.settle()
        self.assertSame(a, b)

    def test_password_change_reaches_a_follower_at_unlock(self) -> None:
        """The leader's new password is published; a follower adopts it when it unlocks with it."""
        a = self.leader()
        b = self.joined()
        b.result(b.service.lock())
        a.result(a.service.change_password(PASSWORD, None, "the new password"))
        shared = json.loads(self.cluster.kv[CLUSTER_KEY])
        self.assertEqual(shared["generation"], 2)
        b.result(b.service.unlock(password="the new password"))
        local = json.loads((b.state_dir / "persistence" / "keyset.json").read_text())
        self.assertEqual(local, shared)

    def test_follower_cannot_change_the_password(self) -> None:
        """Password changes are the leader's: a follower gets NotLeader."""
        self.leader()
        b = self.joined()
        self.failureResultOf(b.service.change_password(PASSWORD, None, "another one!"), NotLeader)

    def test_older_cluster_keyset_is_republished_by_the_leader(self) -> None:
        """A sync as leader replaces an older generation of the keyset, never a newer one."""
        a = self.leader()
        first = self.cluster.kv[CLUSTER_KEY]
        a.result(a.service.change_password(PASSWORD, None, "the new password"))
        self.assertNotEqual(self.cluster.kv[CLUSTER_KEY], first)
        second = self.cluster.kv[CLUSTER_KEY]
        self.cluster.kv[CLUSTER_KEY] = first
        a.lead(True)
        a.settle()
        self.assertEqual(self.cluster.kv[CLUSTER_KEY], second)


# --------------------------------------------------------------------------
# Single node


class SingleNodeTests(SynchronousTestCase):
    def test_without_cluster_commands_writes_are_one_hop(self) -> None:
        """With no cluster.* handler the store commits locally, never through the two-hop path."""
        clock = Clock()
        node = Node(self, clock, "solo", None, leader=True)

        def never(*args: Any) -> Any:
            raise AssertionError("the replicated path ran on a single node")

        self.patch(storemod._Database, "begin_replicated", never)
        node.result(node.service.setup(PASSWORD))
        node.result(node.service.unlock(password=PASSWORD))
        node.populate()
        self.assertFalse(node.service.sync.active())  # type: ignore[union-attr]
        status = node.service.status()
        assert status.store is not None
        self.assertNotIn("replication", status.store)
        self.assertEqual([c for c in clock.getDelayedCalls() if "_retried" in repr(c.func)], [])
