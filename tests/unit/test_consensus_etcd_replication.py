"""
Tests for the replicated control store's commit log on etcd
(piccolod.consensus.etcd_log and EtcdConsensus.replicate_commit /
read_commits): appends fenced by the term and chained on the head,
snapshots that restart and trim the log, reads with limits and snapshots,
malformed entries, the follower feed (``CommitLogAdvanced`` on every node,
across broken streams and compaction) and the lag figures of
``cluster.status``.  Simulated nodes on one FakeEtcd, as in
test_consensus_etcd.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import (
    CommitLog,
    CommitReplicated,
    GetClusterStatus,
    ReadCommits,
    ReplicateCommit,
    SealedCommit,
)
from piccolod.consensus.etcd import CONTROL_PLANE
from piccolod.consensus.etcd_client import EtcdClient
from piccolod.consensus.etcd_log import (
    HEAD,
    SNAPSHOT,
    CorruptCommitLog,
    commit_key,
    decode_entry,
    encode_entry,
)
from piccolod.consensus.single_node import SingleNodeConsensus
from piccolod.errors import CommitConflict, InvalidCommand, NotLeader, Unavailable
from piccolod.events import CommitLogAdvanced, ControlStoreCommit, LockState, LockStateChanged, Role
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.leadership import LeadershipRegistry
from tests.unit.test_consensus_etcd import E1, STEP, Node, World, settled_world

PREFIX = b"/piccolod/data/"


def entry(revision: int, kind: str = "commit", checksum: str | None = None) -> SealedCommit:
    """A sealed entry (opaque to the consensus) of ``revision``."""
    return SealedCommit(
        kind=kind,
        revision=revision,
        previous="" if kind == "snapshot" else f"c{revision - 1}",
        checksum=checksum or f"c{revision}",
        sealed=base64.b64encode(secrets.token_bytes(24)).decode(),
    )


class Log:
    """Helpers over a settled world: append through a node and look at etcd."""

    def __init__(self, test: SynchronousTestCase, world: World) -> None:
        self.test = test
        self.world = world

    def replicate(self, node: Node, e: SealedCommit) -> Deferred[CommitReplicated]:
        d = node.consensus.replicate_commit(e)
        self.world.etcd.pump()
        return d

    def append(self, node: Node, e: SealedCommit) -> CommitReplicated:
        return self.test.successResultOf(self.replicate(node, e))

    def refused(self, node: Node, e: SealedCommit, kind: type[Exception]) -> Any:
        return self.test.failureResultOf(self.replicate(node, e), kind).value

    def read(self, node: Node, after: int, limit: int = 1000) -> CommitLog:
        d = node.consensus.read_commits(after, limit)
        self.world.etcd.pump()
        return self.test.successResultOf(d)

    def head(self) -> bytes | None:
        kv = self.world.etcd.get(PREFIX + HEAD.encode())
        return kv.value if kv is not None else None

    def stored(self) -> list[int]:
        """The revisions of the commit keys in etcd."""
        commits = PREFIX + b"control/commits/"
        return [int(k[len(commits) :]) for k in self.world.etcd.keys(commits)]

    def put_raw(self, key: str, value: bytes) -> None:
        self.world.etcd._serve(
            E1, "kv/put", {"key": _b64(PREFIX + key.encode()), "value": _b64(value)}
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def started_log(test: SynchronousTestCase, nodes: int = 3, snapshot_at: int = 3) -> Any:
    """A settled world whose log starts with a snapshot at ``snapshot_at``."""
    world = settled_world(test, nodes=nodes)
    log = Log(test, world)
    leader = world.leader()
    log.append(leader, entry(snapshot_at, "snapshot"))
    world.advance(1.1)  # the leader's own head is announced (no store commits it here)
    return world, log, leader


class AppendTests(SynchronousTestCase):
    def test_appends_in_order_under_the_term(self) -> None:
        """A snapshot starts the log; commits follow the head one by one, each under the term."""
        world, log, leader = started_log(self)
        term = leader.state().term
        results = [log.append(leader, entry(r)) for r in (4, 5, 6)]
        self.assertEqual([r.revision for r in results], [4, 5, 6])
        self.assertTrue(all(r.term == term for r in results))
        self.assertEqual(log.stored(), [4, 5, 6])
        self.assertEqual(log.head(), b"6")
        for r in results:
            kv = world.etcd.get(PREFIX + commit_key(r.revision).encode())
            self.assertEqual(kv.mod_revision, r.log_revision)
            stored = json.loads(kv.value)
            self.assertEqual((stored["revision"], stored["term"]), (r.revision, term))
        self.assertEqual(
            [r.log_revision for r in results], sorted({r.log_revision for r in results})
        )

    def test_a_commit_cannot_start_an_empty_log(self) -> None:
        """On an empty log a commit is a CommitConflict without a head; nothing is written."""
        world = settled_world(self)
        log = Log(self, world)
        error = log.refused(world.leader(), entry(1), CommitConflict)
        self.assertIsNone(error.head)
        self.assertIn("snapshot first", error.detail)
        self.assertEqual((log.stored(), log.head()), ([], None))

    def test_wrong_head_is_a_conflict_naming_the_head(self) -> None:
        """A commit that skips or repeats a revision is refused with the log's head."""
        world, log, leader = started_log(self)
        log.append(leader, entry(4))
        for bad in (entry(6), entry(4), entry(3)):
            error = log.refused(leader, bad, CommitConflict)
            self.assertEqual(error.head, 4)
        self.assertEqual((log.stored(), log.head()), ([4], b"4"))
        self.assertIs(leader.role(), Role.LEADER)

    def test_a_retried_append_that_landed_succeeds(self) -> None:
        """Appending the very same entry again (a retried request) answers where it landed."""
        world, log, leader = started_log(self)
        e = entry(4)
        first = log.append(leader, e)
        again = log.append(leader, e)
        self.assertEqual(again, first)
        self.assertEqual(log.stored(), [4])

    def test_a_follower_cannot_append(self) -> None:
        """A follower's append is NotLeader with the leader's address, before reaching etcd."""
        world, log, leader = started_log(self)
        follower = next(n for n in world.nodes if n is not leader)
        txns = world.etcd.count("kv/txn")
        error = log.refused(follower, entry(4), NotLeader)
        self.assertEqual(error.leader_hint, f"http://{leader.name}:8080")
        self.assertEqual(world.etcd.count("kv/txn"), txns)
        # Through the dispatcher the leader gate answers the same.
        d = follower.dispatch(ReplicateCommit(entry(4)))
        self.assertEqual(self.failureResultOf(d, NotLeader).value.leader_id, leader.name)

    def test_a_deposed_leader_is_refused_by_etcd(self) -> None:
        """When the leader key was replaced unseen, etcd refuses the append and it steps down."""
        world, log, leader = started_log(self)
        key = world.settings.leader_key(CONTROL_PLANE)
        leader.http.paused = True  # the watch event waits
        world.etcd._serve(E1, "kv/deleterange", {"key": _b64(key)})
        leader.http.paused = False
        term = leader.state().term
        d = leader.consensus.replicate_commit(entry(4))
        world.etcd.pump()
        self.failureResultOf(d, NotLeader)
        self.assertEqual((log.stored(), log.head()), ([], b"3"))
        world.advance(0.3)
        self.assertIn(Role.UNKNOWN, [c.role for c in leader.changes])
        # Whoever leads now does so under a new incarnation of the key.
        self.assertEqual(len(world.leaders()), 1)
        self.assertGreater(world.leader().state().term, term)

    def test_a_late_write_after_a_takeover_is_refused(self) -> None:
        """SIGSTOP past the TTL, another leads and appends; the old one's append never lands."""
        world, log, old = started_log(self)
        old_term = old.state().term
        log.append(old, entry(4))
        world.pause(old)
        world.advance(3.0)
        new = world.leader()
        self.assertIsNot(new, old)
        log.append(new, entry(5))
        # Resumed with I/O first (timers not yet run): refused without a txn.
        old.http.paused = False
        old.clock.rightNow = world.clock.seconds()
        sent = list(old.http.sent)
        self.failureResultOf(old.consensus.replicate_commit(entry(5)), NotLeader)
        self.assertEqual(old.http.sent, sent)
        world.etcd.pump()
        txns = world.etcd.count("kv/txn")
        # Even if it still believed it led under its old term with a fresh
        # lease (a clock that lies), etcd's fence refuses the append.
        election = old.consensus.election(CONTROL_PLANE)
        assert election is not None and election.lease is not None
        election.lease.confirmed_at = old.clock.seconds()
        election.role, election.term = Role.LEADER, old_term
        log.refused(old, entry(6), NotLeader)
        self.assertGreater(world.etcd.count("kv/txn"), txns)
        self.assertEqual((log.stored(), log.head()), ([4, 5], b"5"))
        # The log holds each term's writes in one run: the old term's, then the new one's.
        stored = [
            json.loads(world.etcd.get(PREFIX + commit_key(r).encode()).value)["term"]
            for r in (4, 5)
        ]
        self.assertEqual(stored, [old_term, new.state().term])
        self.assertLess(stored[0], stored[1])
        old.clock.advance(0)

    def test_unreachable_etcd_is_unavailable(self) -> None:
        """With no endpoint answering, an append fails with a retryable Unavailable."""
        world, log, leader = started_log(self)
        leader.http.refuse = True
        error = log.refused(leader, entry(4), Unavailable)
        self.assertTrue(error.retryable)
        leader.http.refuse = False
        self.assertEqual(log.stored(), [])


class SnapshotTests(SynchronousTestCase):
    def test_a_snapshot_past_the_head_restarts_and_trims_the_log(self) -> None:
        """A snapshot beyond the head replaces it and deletes every commit it covers."""
        world, log, leader = started_log(self)
        for r in (4, 5, 6):
            log.append(leader, entry(r))
        done = log.append(leader, entry(9, "snapshot"))
        self.assertEqual(done.revision, 9)
        self.assertEqual((log.stored(), log.head()), ([], b"9"))
        snap = world.etcd.get(PREFIX + SNAPSHOT.encode())
        self.assertEqual(json.loads(snap.value)["revision"], 9)
        log.append(leader, entry(10))
        self.assertEqual(log.stored(), [10])

    def test_a_snapshot_at_the_head_with_its_checksum_compacts(self) -> None:
        """A snapshot at the head's revision and checksum is taken: commits up to it go."""
        world, log, leader = started_log(self)
        for r in (4, 5, 6):
            log.append(leader, entry(r))
        log.append(leader, entry(6, "snapshot", checksum="c6"))
        self.assertEqual((log.stored(), log.head()), ([], b"6"))
        log.append(leader, entry(7))
        self.assertEqual(log.read(leader, 5).entries[0].kind, "snapshot")

    def test_a_snapshot_that_is_not_ahead_is_refused(self) -> None:
        """A snapshot behind the head, or at it with another checksum, is a CommitConflict."""
        world, log, leader = started_log(self)
        for r in (4, 5):
            log.append(leader, entry(r))
        for bad in (entry(4, "snapshot"), entry(5, "snapshot", checksum="other")):
            self.assertEqual(log.refused(leader, bad, CommitConflict).head, 5)
        self.assertEqual(log.refused(leader, entry(3, "snapshot", "c3"), CommitConflict).head, 5)
        self.assertEqual((log.stored(), log.head()), ([4, 5], b"5"))

    def test_a_head_that_moves_during_a_snapshot_is_a_conflict(self) -> None:
        """A head written between the snapshot's read and its txn fails the snapshot."""
        world, log, leader = started_log(self)
        txn = EtcdClient.txn

        def racing(client: EtcdClient, compare: Any, success: Any, failure: Any = ()) -> Any:
            if client is leader.client and any("request_delete_range" in op for op in success):
                log.put_raw(HEAD, b"7")  # another writer got in between
            return txn(client, compare, success, failure)

        self.patch(EtcdClient, "txn", racing)
        d = leader.consensus.replicate_commit(entry(6, "snapshot"))
        world.etcd.pump()
        self.assertEqual(self.failureResultOf(d, CommitConflict).value.head, 7)
        self.assertEqual(
            json.loads(world.etcd.get(PREFIX + SNAPSHOT.encode()).value)["revision"], 3
        )


class ReadTests(SynchronousTestCase):
    def test_reads_commits_in_order_with_limit_and_more(self) -> None:
        """A read returns commits from after + 1, at most limit, with more when truncated."""
        world, log, leader = started_log(self)
        follower = next(n for n in world.nodes if n is not leader)
        for r in range(4, 10):
            log.append(leader, entry(r))
        page = log.read(follower, 3, limit=4)
        self.assertEqual([e.revision for e in page.entries], [4, 5, 6, 7])
        self.assertEqual((page.head, page.more), (9, True))
        rest = log.read(follower, 7, limit=4)
        self.assertEqual([e.revision for e in rest.entries], [8, 9])
        self.assertFalse(rest.more)
        self.assertEqual(log.read(follower, 9), CommitLog(entries=(), head=9, more=False))
        self.assertEqual(log.read(follower, 12).entries, ())

    def test_the_snapshot_comes_first_when_commits_are_gone(self) -> None:
        """A reader older than the oldest commit gets the snapshot, then what follows it."""
        world, log, leader = started_log(self)
        for r in (4, 5):
            log.append(leader, entry(r))
        full = log.read(leader, 0)
        self.assertEqual(
            [(e.kind, e.revision) for e in full.entries],
            [("snapshot", 3), ("commit", 4), ("commit", 5)],
        )
        # A store at the snapshot's revision reads from the entry at its head.
        at_head = log.read(leader, 2)
        self.assertEqual([e.revision for e in at_head.entries], [3, 4, 5])
        # The snapshot counts towards the limit.
        limited = log.read(leader, 0, limit=2)
        self.assertEqual([e.revision for e in limited.entries], [3, 4])
        self.assertTrue(limited.more)
        # No snapshot when the commits are there.
        self.assertEqual([e.revision for e in log.read(leader, 3).entries], [4, 5])

    def test_an_empty_log(self) -> None:
        """An empty log reads as no entries and no head."""
        world = settled_world(self, nodes=1)
        log = Log(self, world)
        self.assertEqual(log.read(world.nodes[0], 0), CommitLog(entries=(), head=None, more=False))

    def test_read_commits_command(self) -> None:
        """cluster.read_commits answers any node, follower included."""
        world, log, leader = started_log(self)
        follower = next(n for n in world.nodes if n is not leader)
        log.append(leader, entry(4))
        result = self.successResultOf(follower.dispatch(ReadCommits(after=3)))
        self.assertEqual([e.revision for e in result.entries], [4])
        self.assertRaises((ValueError, InvalidCommand), ReadCommits, after=-1)
        self.assertRaises((ValueError, InvalidCommand), ReadCommits, limit=0)
        self.failureResultOf(leader.consensus.read_commits(-1, 10), InvalidCommand)

    def test_malformed_entries_are_typed_errors(self) -> None:
        """Garbage, a wrong revision or kind at a commit key, or a bad head: CorruptCommitLog."""
        cases: list[tuple[str, bytes]] = [
            (commit_key(4), b"not json"),
            (commit_key(4), b"[1, 2]"),
            (commit_key(4), encode_entry(entry(5), 1)),
            (commit_key(4), encode_entry(entry(4, "snapshot"), 1)),
            (commit_key(4), json.dumps({"kind": "commit", "revision": "4"}).encode()),
            ("control/commits/4", encode_entry(entry(4), 1)),
            (HEAD, b"four"),
            (SNAPSHOT, encode_entry(entry(3), 1)),
        ]
        for key, value in cases:
            world, log, leader = started_log(self)
            log.append(leader, entry(4))
            log.put_raw(key, value)
            d = leader.consensus.read_commits(0, 100)
            world.etcd.pump()
            error = self.failureResultOf(d, CorruptCommitLog).value
            self.assertEqual(error.status, 502, (key, value))
            world.stop_all()

    def test_decode_entry_round_trip(self) -> None:
        """An encoded entry decodes to itself; its term is kept beside it."""
        e = entry(7)
        raw = encode_entry(e, 42)
        self.assertEqual(decode_entry(raw, "k", "commit", 7), e)
        self.assertEqual(json.loads(raw)["term"], 42)


class FeedTests(SynchronousTestCase):
    def _events(self, node: Node) -> list[tuple[int, int]]:
        seen: list[tuple[int, int]] = []
        node.bus.subscribe(
            CommitLogAdvanced.topic,
            lambda env: seen.append((env.event.head, env.event.log_revision)),
            replay_retained=True,
        )
        node.clock.advance(0)
        return seen

    def test_every_node_hears_every_new_head(self) -> None:
        """Each append is announced on every node's bus, the leader's included."""
        world, log, leader = started_log(self)
        seen = {n.name: self._events(n) for n in world.nodes}
        results = [log.append(leader, entry(r)) for r in (4, 5)]
        world.advance(STEP)
        first = (3, self._log_revision(world)[3])
        expected = [first, *((r.revision, r.log_revision) for r in results)]
        for node in world.nodes:
            if node is not leader:
                self.assertEqual(seen[node.name], expected, node.name)
        # The leader's own heads wait for its store (here: at most own_delay).
        self.assertEqual(seen[leader.name], [first])
        world.advance(1.0)
        self.assertEqual(seen[leader.name], [first, expected[-1]])

    def test_the_leader_announces_its_own_head_once_its_store_has_it(self) -> None:
        """A head this node appended is announced when its store commits that revision."""
        world, log, leader = started_log(self)
        seen = self._events(leader)
        done = log.append(leader, entry(4))
        world.advance(STEP)
        self.assertEqual([h for h, _ in seen], [3])
        leader.bus.publish(ControlStoreCommit(revision=4, checksum="c4"))
        leader.clock.advance(0)
        leader.clock.advance(0)
        self.assertEqual(seen[-1], (4, done.log_revision))
        world.advance(1.5)
        self.assertEqual([h for h, _ in seen], [3, 4])  # once

    def _log_revision(self, world: World) -> dict[int, int]:
        snap = world.etcd.get(PREFIX + SNAPSHOT.encode())
        return {3: snap.mod_revision}

    def test_a_node_started_later_announces_the_head_once(self) -> None:
        """A node that starts after appends publishes the current head from its first read."""
        world, log, leader = started_log(self, nodes=2)
        log.append(leader, entry(4))
        late = world.add("late")
        world.nodes.append(late)
        late.start()
        world.advance(0.5)
        self.assertEqual([h for h, _ in self._events(late)], [4])
        self.assertEqual(late.consensus.feed.published, 1)

    def test_resumes_after_a_broken_stream(self) -> None:
        """When the member serving the watch dies, appends made meanwhile are still announced."""
        world, log, leader = started_log(self)
        follower = next(n for n in world.nodes if n is not leader)
        seen = self._events(follower)
        world.etcd.stop_member(follower.client.current)
        log.append(leader, entry(4))
        log.append(leader, entry(5))
        world.until(lambda: seen and seen[-1][0] == 5, 3.0, "head 5 announced")
        self.assertEqual([h for h, _ in seen][-1], 5)
        self.assertEqual(follower.consensus.feed.state, "watching")

    def test_resynchronises_after_compaction(self) -> None:
        """A watch that must resume from compacted history re-reads the head and goes on."""
        world, log, leader = started_log(self)
        follower = next(n for n in world.nodes if n is not leader)
        seen = self._events(follower)
        # The follower's stream breaks; while its watch waits to resume, the
        # log moves on and etcd compacts the history it would resume from.
        world.etcd.stop_member(follower.client.current)
        world.etcd.pump()
        self.assertEqual(follower.consensus.feed.state, "watching")
        log.append(leader, entry(4))
        log.append(leader, entry(5))
        world.etcd.compact(world.etcd.revision)
        world.until(lambda: follower.consensus.feed.resyncs == 1, 3.0, "a resync")
        world.until(lambda: seen and seen[-1][0] == 5, 3.0, "head 5 announced")
        log.append(leader, entry(6))
        world.advance(STEP)
        self.assertEqual(seen[-1][0], 6)
        self.assertEqual(follower.consensus.feed.state, "watching")

    def test_a_failed_first_read_is_retried(self) -> None:
        """When etcd cannot be reached at start, the feed backs off and reads again."""
        world, log, leader = started_log(self, nodes=2)
        late = world.add("late")
        world.nodes.append(late)
        late.http.refuse = True
        late.start()
        world.advance(0.2)
        self.assertEqual(late.consensus.feed.state, "backoff")
        late.http.refuse = False
        world.until(lambda: late.consensus.feed.state == "watching", 6.0, "watching")
        self.assertEqual(late.consensus.lag.head, 3)

    def test_stop_ends_the_feed(self) -> None:
        """Stopping the service stops the feed's watch and timers."""
        world = World(1)
        node = world.nodes[0]
        node.start()
        world.advance(0.5)
        self.assertEqual(node.consensus.feed.state, "watching")
        d = node.consensus.stopService()
        world.advance(0.2)
        self.successResultOf(d)
        self.assertEqual(node.consensus.feed.state, "stopped")
        self.assertEqual(world.etcd.watchers(), 0)
        self.assertEqual(node.clock.getDelayedCalls(), [])


class LagTests(SynchronousTestCase):
    def _replication(self, node: Node) -> dict[str, Any]:
        status = self.successResultOf(node.dispatch(GetClusterStatus()))
        assert status.backend is not None
        return dict(status.backend["replication"])

    def test_lag_follows_the_head_and_the_store(self) -> None:
        """cluster.status shows the head, the applied revision, the lag and how long behind."""
        world, log, leader = started_log(self)
        follower = next(n for n in world.nodes if n is not leader)
        world.advance(STEP)
        before = self._replication(follower)
        self.assertEqual((before["log_head"], before["applied"], before["lag"]), (3, None, None))
        follower.bus.publish(ControlStoreCommit(revision=3, checksum="c3"))
        follower.clock.advance(0)
        self.assertEqual(self._replication(follower)["lag"], 0)
        for r in (4, 5):
            log.append(leader, entry(r))
        world.advance(1.0)
        behind = self._replication(follower)
        self.assertEqual((behind["log_head"], behind["applied"], behind["lag"]), (5, 3, 2))
        self.assertAlmostEqual(behind["behind_for"], 1.0, delta=0.1)
        follower.bus.publish(ControlStoreCommit(revision=5, checksum="c5"))
        follower.clock.advance(0)
        caught_up = self._replication(follower)
        self.assertEqual((caught_up["lag"], caught_up["behind_for"]), (0, 0.0))
        self.assertEqual(caught_up["feed"]["state"], "watching")

    def test_members_show_roles_and_terms(self) -> None:
        """Every member lists its control-plane role and the term it is under."""
        world = settled_world(self)
        leader = world.leader()
        status = self.successResultOf(world.nodes[0].dispatch(GetClusterStatus()))
        term = leader.state().term
        for member in status.members:
            role = "leader" if member["node_id"] == leader.name else "follower"
            self.assertEqual(member["roles"], {CONTROL_PLANE: role})
            self.assertEqual(member["terms"], {CONTROL_PLANE: term})


class SingleNodeTests(SynchronousTestCase):
    def test_single_node_keeps_no_log(self) -> None:
        """The single-node variant registers neither cluster.replicate_commit nor read_commits."""
        from twisted.internet.task import Clock

        clock = Clock()
        bus = MemoryEventBus(clock)
        registry = LeadershipRegistry(bus, "solo")
        dispatcher = CommandDispatcher(clock, bus, registry=registry)
        consensus = SingleNodeConsensus(registry=registry, dispatcher=dispatcher)
        consensus.startService()
        self.addCleanup(consensus.stopService)
        names = set(dispatcher.names())
        self.assertIn(GetClusterStatus.name, names)
        self.assertNotIn(ReplicateCommit.name, names)
        self.assertNotIn(ReadCommits.name, names)

    def test_the_etcd_variant_registers_both_while_running(self) -> None:
        """The etcd variant registers both log commands at start and removes them at stop."""
        world = World(1)
        node = world.nodes[0]
        node.start()
        self.assertIn(ReplicateCommit.name, node.dispatcher.names())
        self.assertIn(ReadCommits.name, node.dispatcher.names())
        d = node.consensus.stopService()
        world.advance(0.2)
        self.successResultOf(d)
        self.assertNotIn(ReplicateCommit.name, node.dispatcher.names())


class BlankNodeTests(SynchronousTestCase):
    """A node whose storage is not set up leads only a cluster that is not set up either."""

    def storage(self, node: Node, state: LockState) -> None:
        node.bus.publish(LockStateChanged(state), "persistence")
        node.clock.advance(0)
        node.world.etcd.pump()

    def campaigns(self, node: Node) -> dict[str, Any]:
        d = node.consensus.status()
        node.world.etcd.pump()
        status = self.successResultOf(d)
        return status.backend["campaigns"]  # type: ignore[no-any-return]

    def test_a_blank_node_does_not_take_over_a_set_up_cluster(self) -> None:
        """The leader dead, a blank node does not lead a cluster with a log; joined, it does."""
        world, log, leader = started_log(self, nodes=2)
        (blank,) = [n for n in world.nodes if n is not leader]
        self.storage(blank, LockState.UNINITIALIZED)
        self.assertFalse(blank.consensus.may_campaign())
        campaigns = self.campaigns(blank)
        self.assertFalse(campaigns["eligible"])
        self.assertIn("join the cluster", campaigns["reason"])
        world.crash(leader)
        world.advance(5.0)  # well past the dead leader's lease
        self.assertEqual(world.leaders(), [])
        self.assertIs(blank.role(), Role.UNKNOWN)
        # It joins: setup (locked), preunlock, unlocked; then it may lead.
        for state in (LockState.LOCKED, LockState.PREUNLOCK, LockState.UNLOCKED):
            self.storage(blank, state)
        world.until(lambda: world.leaders() == [blank], 1.0, "the joined node leading")
        self.assertEqual(self.campaigns(blank), {"eligible": True, "reason": None})

    def test_a_blank_follower_stops_campaigning_when_the_cluster_is_set_up(self) -> None:
        """Two blank nodes of a new cluster: the first append (setup) is seen by watch."""
        world = settled_world(self, nodes=2)
        for node in world.nodes:
            self.storage(node, LockState.UNINITIALIZED)
        leader = world.leader()
        (other,) = [n for n in world.nodes if n is not leader]
        self.assertTrue(other.consensus.may_campaign())  # the log is empty: a new cluster
        Log(self, world).append(leader, entry(1, "snapshot"))
        world.advance(0.2)
        self.assertFalse(other.consensus.may_campaign())
        world.crash(leader)
        world.advance(5.0)
        self.assertEqual(world.leaders(), [])

    def test_a_blank_node_waits_for_the_log_before_campaigning(self) -> None:
        """A blank node campaigns only once it has read the log's head: empty, it leads."""
        world = World(1)
        self.addCleanup(world.stop_all)
        (node,) = world.nodes
        self.storage(node, LockState.UNINITIALIZED)
        node.http.blackhole = True  # its requests hang: the log's head is not read yet
        node.start()
        world.advance(0.5)
        self.assertFalse(node.consensus.feed.known)
        self.assertIn("reading", node.consensus.campaign_blocker() or "")
        self.assertEqual(world.leaders(), [])
        node.http.blackhole = False  # the hung requests time out and are retried
        world.until(lambda: world.leaders() == [node], 10.0, "the blank node of a new cluster")
        self.assertTrue(node.consensus.feed.known)
