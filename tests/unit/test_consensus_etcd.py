"""
Tests for piccolod.consensus.etcd.EtcdConsensus: several simulated nodes,
each with its own Clock, bus, registry and dispatcher, campaigning through
the real EtcdClient against one FakeEtcd (StubTreq; only the socket is
fake).  Time moves in small steps for etcd and every running node alike; a
paused node's clock and connections stand still, like a SIGSTOPped process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.commands import (
    ClusterStatus,
    ClusterValue,
    FencedPut,
    FencedPutDone,
    GetClusterStatus,
    LeadershipResult,
    ReadClusterKey,
    ReleaseResource,
    TrackResource,
)
from piccolod.consensus.etcd import (
    CONTROL_PLANE,
    EtcdConsensus,
    EtcdSettings,
)
from piccolod.consensus.etcd_client import EtcdClient, WatchCanceled
from piccolod.errors import (
    ConfigError,
    DuplicateRegistration,
    InvalidCommand,
    NotLeader,
    NotReady,
    Unavailable,
    UnknownCommand,
)
from piccolod.events import HealthLevel, LeadershipRoleChanged, LockState, LockStateChanged, Role
from piccolod.interfaces import IConsensus
from piccolod.kernel import plugins
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.kernel.plugins import Catalogue, SubsystemContext
from piccolod.kernel.runtime import Kernel
from piccolod.testing.etcd import FakeEtcd

MEMBERS = ["http://etcd-1:2379", "http://etcd-2:2379", "http://etcd-3:2379"]
E1, E2, E3 = MEMBERS
SETTINGS: dict[str, Any] = {
    "endpoints": MEMBERS,
    "ttl": 2,
    "renew_deadline": 1.4,
    "retry_period": 0.3,
    "request_timeout": 0.5,
}
STEP = 0.05


class Node:
    """One simulated piccolod: its own clock, bus, registry, dispatcher and consensus."""

    def __init__(self, world: World, name: str, settings: EtcdSettings) -> None:
        self.world = world
        self.name = name
        self.clock = Clock()
        self.clock.advance(world.clock.seconds())
        self.http = world.etcd.http()
        self.http.latency = world.latency
        self.bus = MemoryEventBus(self.clock)
        self.registry = LeadershipRegistry(self.bus, name)
        self.dispatcher = CommandDispatcher(self.clock, self.bus, registry=self.registry)
        self.health = HealthTracker(self.clock, self.bus)
        self.client = EtcdClient(
            settings.endpoints, self.http, self.clock, settings.request_timeout
        )
        self.consensus = EtcdConsensus(
            registry=self.registry,
            client=self.client,
            clock=self.clock,
            settings=settings,
            dispatcher=self.dispatcher,
            health=self.health,
            api_address=f"http://{name}:8080",
            rand=lambda: 0.5,
            health_interval=1.0,
            bus=self.bus,
        )
        self.changes: list[LeadershipRoleChanged] = []
        self.bus.subscribe(LeadershipRoleChanged.topic, lambda env: self.changes.append(env.event))
        self.crashed = False
        #: When set, the node is paused in the step that reaches this time.
        self.pause_at: float | None = None

    @property
    def paused(self) -> bool:
        return self.http.paused

    def state(self, resource: str = CONTROL_PLANE) -> Any:
        return self.registry.state(resource)

    def role(self, resource: str = CONTROL_PLANE) -> Role:
        return self.registry.role(resource)

    def start(self) -> None:
        self.consensus.startService()
        self.world.etcd.pump()

    def dispatch(self, command: Any) -> Deferred[Any]:
        d = self.dispatcher.dispatch(command)
        self.world.etcd.pump()
        return d


class World:
    """A FakeEtcd and nodes on it, advanced together in small steps."""

    def __init__(self, nodes: int = 3, latency: bool = False, **overrides: Any) -> None:
        self.latency = latency
        self.clock = Clock()
        self.clock.advance(10_000)
        self.etcd = FakeEtcd(self.clock, MEMBERS, min_ttl=1, quorum_timeout=7.0)
        self.settings = EtcdSettings.from_config({**SETTINGS, **overrides})
        self.nodes = [self.add(f"n{i}") for i in range(nodes)]

    def add(self, name: str) -> Node:
        return Node(self, name, self.settings)

    def start(self, *nodes: Node) -> None:
        for node in nodes or self.nodes:
            node.start()

    def advance(self, seconds: float, check: Any = None) -> None:
        """Move time for etcd and every running node; ``check()`` after each step."""
        steps = max(1, round(seconds / STEP))
        for _ in range(steps):
            self.clock.advance(seconds / steps)
            for node in self.nodes:
                if not node.paused and not node.crashed:
                    sent = len(node.http.sent)
                    node.clock.advance(seconds / steps)
                    if node.pause_at is not None and (
                        node.pause_at <= self.clock.seconds()
                        or (node.pause_at == float("inf") and len(node.http.sent) > sent)
                    ):
                        # Paused right after this step's requests went out
                        # (pause_at = inf: after the next request), before
                        # their answers arrive.
                        node.pause_at = None
                        self.pause(node)
            self.etcd.pump()
            if check is not None:
                check()

    def until(self, predicate: Any, timeout: float, what: str) -> float:
        """Advance until ``predicate()``; returns the time it took."""
        start = self.clock.seconds()
        while not predicate():
            if self.clock.seconds() - start > timeout:
                raise AssertionError(f"not within {timeout}s: {what}; roles {self.roles()}")
            self.advance(STEP)
        return self.clock.seconds() - start

    def pause(self, node: Node) -> None:
        node.http.paused = True

    def resume(self, node: Node) -> None:
        """SIGCONT: the clock jumps, buffered I/O is delivered first, then overdue timers run."""
        node.http.paused = False
        node.clock.rightNow = self.clock.seconds()
        node.http.flush()
        node.clock.advance(0)
        self.etcd.pump()

    def crash(self, node: Node) -> None:
        """kill -9: the node stops doing anything; its connections die; nothing is revoked."""
        node.crashed = True
        node.http.refuse = True
        node.http.paused = True

    def leaders(self, resource: str = CONTROL_PLANE) -> list[Node]:
        return [
            n
            for n in self.nodes
            if not n.crashed and not n.paused and n.registry.is_leader(resource)
        ]

    def leader(self, resource: str = CONTROL_PLANE) -> Node:
        found = self.leaders(resource)
        assert len(found) == 1, self.roles(resource)
        return found[0]

    def roles(self, resource: str = CONTROL_PLANE) -> dict[str, tuple[str, int, str | None]]:
        return {
            n.name: (n.role(resource).value, n.state(resource).term, n.state(resource).leader_id)
            for n in self.nodes
        }

    def key(self, resource: str = CONTROL_PLANE) -> Any:
        return self.etcd.get(self.settings.leader_key(resource))

    def stop_all(self) -> None:
        for node in self.nodes:
            node.pause_at = None
            node.http.refuse = node.http.blackhole = False
            if node.paused and not node.crashed:
                self.resume(node)
        for node in self.nodes:
            if node.consensus.running and not node.crashed:
                d = node.consensus.stopService()
                self.until(lambda d=d: d.called, 10.0, f"{node.name} stopped")


def settled_world(test: SynchronousTestCase, nodes: int = 3, **overrides: Any) -> World:
    world = World(nodes, **overrides)
    world.start()
    world.until(lambda: len(world.leaders()) == 1, 3.0, "a first leader")
    world.advance(0.5)
    test.addCleanup(world.stop_all)
    return world


class ElectionTests(SynchronousTestCase):
    def test_one_leader_and_followers_agree_on_it(self) -> None:
        """Three nodes elect one leader; the others follow it at the key's create revision."""
        world = settled_world(self)
        leader = world.leader()
        key = world.key()
        self.assertEqual(
            json.loads(key.value),
            {"api_address": f"http://{leader.name}:8080", "node_id": leader.name},
        )
        election = leader.consensus.election(CONTROL_PLANE)
        assert election is not None and election.lease is not None
        self.assertEqual(key.lease, election.lease.id)
        for node in world.nodes:
            state = node.state()
            self.assertEqual(state.term, key.create_revision)
            self.assertEqual(state.leader_id, leader.name)
            self.assertEqual(state.leader_address, f"http://{leader.name}:8080")
            expected = Role.LEADER if node is leader else Role.FOLLOWER
            self.assertIs(state.role, expected)

    def test_one_keepalive_per_retry_period_for_every_node(self) -> None:
        """Each node sends one keepalive per retry period, leader and followers alike."""
        world = settled_world(self)
        before = world.etcd.count("lease/keepalive")
        world.advance(3.0)
        sent = world.etcd.count("lease/keepalive") - before
        self.assertEqual(sent, 3 * 10)  # 3 nodes x 3.0 s / 0.3 s
        for node in world.nodes:
            election = node.consensus.election(CONTROL_PLANE)
            assert election is not None and election.lease is not None
            self.assertTrue(world.etcd.lease_alive(election.lease.id))

    def test_keepalives_never_overlap(self) -> None:
        """While a keepalive hangs, no second one is sent until it times out."""
        world = settled_world(self)
        node = world.nodes[0]
        node.http.blackhole = True
        sent_before = node.http.sent.count("/v3/lease/keepalive")
        world.advance(0.45)  # the retry period passes once; the request hangs
        sent = node.http.sent.count("/v3/lease/keepalive") - sent_before
        self.assertEqual(sent, 1)
        node.http.blackhole = False

    def test_leader_key_revoked_on_stop_lets_another_take_over_at_once(self) -> None:
        """A stopping leader steps down, revokes its lease, and a follower leads within a step."""
        world = settled_world(self)
        leader = world.leader()
        term = leader.state().term
        d = leader.consensus.stopService()
        self.assertIs(leader.role(), Role.UNKNOWN)
        world.etcd.pump()
        self.successResultOf(d)
        took = world.until(lambda: len(world.leaders()) == 1, 1.0, "a new leader")
        self.assertLess(took, 0.2)
        self.assertGreater(world.leader().state().term, term)
        leader.clock.advance(0)  # the bus delivers its last events
        self.assertEqual(leader.clock.getDelayedCalls(), [])
        self.assertNotIn(TrackResource.name, leader.dispatcher.names())

    def test_crashed_leader_is_replaced_after_the_ttl(self) -> None:
        """kill -9 of the leader: a follower leads after the lease expires, at a greater term."""
        world = settled_world(self)
        leader = world.leader()
        term = leader.state().term
        world.crash(leader)
        took = world.until(lambda: len(world.leaders()) == 1, 4.0, "a new leader")
        self.assertLessEqual(took, 2.0 + STEP)
        self.assertGreater(took, 2.0 - 0.3 - STEP)  # not before the lease could expire
        new = world.leader()
        self.assertIsNot(new, leader)
        self.assertGreater(new.state().term, term)
        world.advance(0.2)
        others = [n for n in world.nodes if n is not new and not n.crashed]
        self.assertTrue(all(n.state().leader_id == new.name for n in others))

    def test_partitioned_leader_steps_down_before_its_lease_expires(self) -> None:
        """A leader cut off from etcd is unknown before its lease expires; another leads after."""
        world = settled_world(self)
        leader = world.leader()
        election = leader.consensus.election(CONTROL_PLANE)
        assert election is not None and election.lease is not None
        lease_id = election.lease.id
        leader.http.refuse = True
        stepped_down_at: list[float] = []

        def check() -> None:
            if not stepped_down_at and leader.role() is not Role.LEADER:
                stepped_down_at.append(world.clock.seconds())
            expiry = world.etcd.lease_expiry(lease_id)
            if leader.role() is Role.LEADER:
                self.assertIsNotNone(expiry)
                self.assertLess(world.clock.seconds(), expiry)

        world.advance(3.0, check)
        self.assertEqual(len(stepped_down_at), 1)
        self.assertIs(leader.role(), Role.UNKNOWN)
        self.assertEqual(election.deadline_misses, 1)
        self.assertFalse(world.etcd.lease_alive(lease_id))
        new = world.leader()
        self.assertIsNot(new, leader)
        # Healed, it follows the new leader (and never led in between).
        leader.http.refuse = False
        world.advance(2.0)
        self.assertIs(leader.role(), Role.FOLLOWER)
        self.assertEqual(leader.state().leader_id, new.name)
        roles = [c.role for c in leader.changes]
        self.assertEqual(roles.count(Role.LEADER), 1)

    def test_blackholed_leader_steps_down_too(self) -> None:
        """Requests that hang (not refused) still make the leader step down at its deadline."""
        world = settled_world(self)
        leader = world.leader()
        leader.http.blackhole = True
        election = leader.consensus.election(CONTROL_PLANE)
        assert election is not None and election.lease is not None
        deadline = election.fresh_until()
        world.until(lambda: leader.role() is not Role.LEADER, 2.0, "step down")
        self.assertTrue(deadline <= leader.clock.seconds() <= deadline + STEP + 1e-6)
        self.assertLess(deadline, world.etcd.lease_expiry(election.lease.id))
        leader.http.blackhole = False

    def test_paused_leader_never_leads_after_it_resumes(self) -> None:
        """SIGSTOP past the TTL, another leads, SIGCONT: the old leader is never leader again."""
        world = settled_world(self)
        leader = world.leader()
        old_term = leader.state().term
        world.pause(leader)
        world.advance(3.0)
        new = world.leader()
        self.assertIsNot(new, leader)
        self.assertIs(leader.role(), Role.LEADER)  # its memory, frozen
        world.resume(leader)
        self.assertIsNot(leader.role(), Role.LEADER)

        def never_leader() -> None:
            self.assertIsNot(leader.role(), Role.LEADER)

        world.advance(2.0, never_leader)
        self.assertIs(leader.role(), Role.FOLLOWER)
        self.assertEqual(leader.state().leader_id, new.name)
        self.assertGreater(leader.state().term, old_term)
        # Its late fenced write is refused without even reaching etcd.
        self.failureResultOf(leader.consensus.fenced_put(CONTROL_PLANE, "x", b"late"), NotLeader)

    def test_paused_leader_resumed_by_io_first_refuses_writes(self) -> None:
        """If I/O is handled before overdue timers after a pause, writes are still refused."""
        world = settled_world(self)
        leader = world.leader()
        world.pause(leader)
        world.advance(3.0)
        leader.http.paused = False
        leader.clock.rightNow = world.clock.seconds()  # time jumped; timers not yet run
        self.assertIs(leader.role(), Role.LEADER)
        election = leader.consensus.election(CONTROL_PLANE)
        assert election is not None
        self.assertFalse(election.leading())
        txns = world.etcd.count("kv/txn")
        self.failureResultOf(leader.consensus.fenced_put(CONTROL_PLANE, "x", b"late"), NotLeader)
        self.assertEqual(world.etcd.count("kv/txn"), txns)
        leader.clock.advance(0)
        self.assertIsNot(leader.role(), Role.LEADER)

    def test_a_late_answer_counts_from_when_the_renewal_was_sent(self) -> None:
        """A keepalive answered after a stall extends leadership from its send time only."""
        world = World(1, latency=True)
        world.start()
        self.addCleanup(world.stop_all)
        world.advance(0.5)
        leader = world.leader()
        leader.pause_at = float("inf")
        while not leader.paused or leader.http.sent[-1] != "/v3/lease/keepalive":
            if leader.paused:
                world.resume(leader)
                leader.pause_at = float("inf")
            world.advance(STEP)
        sent_at = leader.clock.seconds()
        election = leader.consensus.election(CONTROL_PLANE)
        assert election is not None and election.lease is not None
        world.advance(0.9)  # stalled with the answer in flight
        leader.http.paused = False
        leader.clock.rightNow = world.clock.seconds()
        leader.http.flush()  # the answer (TTL 2) arrives 0.9 s late
        self.assertIs(leader.role(), Role.LEADER)
        self.assertLessEqual(election.fresh_until(), sent_at + 1.4)
        leader.http.refuse = True  # and no renewal succeeds after it
        leader.clock.advance(0)
        world.until(lambda: leader.role() is not Role.LEADER, 1.0, "step down")
        self.assertLessEqual(leader.clock.seconds(), sent_at + 1.4 + STEP)

    def test_leader_whose_lease_expired_at_etcd_steps_down(self) -> None:
        """A keepalive answered without TTL (lease gone) makes the leader step down at once."""
        world = settled_world(self)
        leader = world.leader()
        election = leader.consensus.election(CONTROL_PLANE)
        assert election is not None and election.lease is not None
        world.etcd._revoke(world.etcd._leases[election.lease.id])
        world.until(lambda: leader.role() is not Role.LEADER, 0.5, "step down")
        self.assertEqual(election.leases_lost, 1)
        world.until(lambda: len(world.leaders()) == 1, 1.0, "a leader again")

    def test_fenced_writes_follow_leadership(self) -> None:
        """The leader's fenced write lands; a follower's is refused with the leader hint."""
        world = settled_world(self)
        leader = world.leader()
        follower = next(n for n in world.nodes if n is not leader)
        d = leader.consensus.fenced_put(CONTROL_PLANE, "log/1", b"one")
        world.etcd.pump()
        revision = self.successResultOf(d)
        stored = world.etcd.get(b"/piccolod/data/log/1")
        self.assertEqual((stored.value, stored.mod_revision), (b"one", revision))
        error = self.failureResultOf(
            follower.consensus.fenced_put(CONTROL_PLANE, "log/2", b"two"), NotLeader
        ).value
        self.assertEqual(error.leader_hint, f"http://{leader.name}:8080")
        self.assertEqual(error.leader_id, leader.name)
        self.failureResultOf(leader.consensus.fenced_put("app:unknown", "k", b"v"), NotLeader)

    def test_fence_refused_by_etcd_deposes_the_leader(self) -> None:
        """When the leader key was replaced unseen, etcd refuses the write and it steps down."""
        world = settled_world(self)
        leader = world.leader()
        key = world.settings.leader_key(CONTROL_PLANE)
        # An operator deletes the key while the leader is not listening (its
        # watch event waits); the other nodes see it and campaign.
        leader.http.paused = True
        world.etcd._serve(E1, "kv/deleterange", {"key": _b64(key)})
        leader.http.paused = False
        term = leader.state().term
        d = leader.consensus.fenced_put(CONTROL_PLANE, "k", b"v")
        world.etcd.pump()
        self.failureResultOf(d, NotLeader)
        self.assertIsNone(world.etcd.get(b"/piccolod/data/k"))
        world.advance(0.2)
        self.assertEqual(len(world.leaders()), 1)
        self.assertIn(Role.UNKNOWN, [c.role for c in leader.changes])
        # Whoever leads now does so under a new incarnation of the key.
        self.assertGreater(world.leader().state().term, term)

    def test_quorum_loss_leaves_no_leader_and_restore_elects_one(self) -> None:
        """Without a quorum all are unknown within the deadline, writes fail; then one leads."""
        world = settled_world(self)
        leader = world.leader()
        world.etcd.lose_quorum()
        took = world.until(
            lambda: all(n.role() is Role.UNKNOWN for n in world.nodes), 3.0, "all unknown"
        )
        self.assertLessEqual(took, 1.4 + STEP)
        self.failureResultOf(leader.consensus.fenced_put(CONTROL_PLANE, "k", b"v"), NotLeader)
        world.advance(2.0)
        for node in world.nodes:
            health = node.health.component("consensus")
            self.assertIs(health.level, HealthLevel.ERROR, health.message)
            self.assertIn("no quorum", health.message)
        world.etcd.restore_quorum()
        world.until(lambda: len(world.leaders()) == 1, 5.0, "a leader again")
        world.advance(2.0)
        self.assertEqual(len(world.leaders()), 1)
        self.assertTrue(
            all(n.role() is Role.FOLLOWER for n in world.nodes if n is not world.leader())
        )
        self.assertIs(world.nodes[0].health.component("consensus").level, HealthLevel.OK)

    def test_one_member_down_changes_no_role(self) -> None:
        """Losing one etcd member only degrades health; no role or term changes."""
        world = settled_world(self)
        before = world.roles()
        changes = [len(n.changes) for n in world.nodes]
        world.etcd.stop_member(E1)
        world.advance(4.0)
        self.assertEqual(world.roles(), before)
        self.assertEqual([len(n.changes) for n in world.nodes], changes)
        for node in world.nodes:
            health = node.health.component("consensus")
            self.assertIs(health.level, HealthLevel.WARN)
            self.assertIn("2/3", health.message)
            self.assertIn(E1, health.message)

    def test_a_hung_member_changes_no_role(self) -> None:
        """A member that hangs (SIGSTOP) costs timeouts, not the leadership."""
        world = settled_world(self)
        before = world.roles()
        world.etcd.hang_member(E1)
        world.advance(4.0)
        self.assertEqual(world.roles(), before)

    def test_restarted_node_removes_its_own_stale_key(self) -> None:
        """A leader restarted faster than its TTL deletes its old key and leads again at once."""
        world = settled_world(self)
        leader = world.leader()
        old_term = leader.state().term
        world.crash(leader)
        reborn = world.add(leader.name)
        world.nodes.append(reborn)
        reborn.start()
        world.advance(0.2)
        self.assertIs(reborn.role(), Role.LEADER)
        self.assertGreater(reborn.state().term, old_term)
        self.assertEqual(len(world.leaders()), 1)

    def test_registry_refusing_etcd_leaves_the_role_unknown(self) -> None:
        """If etcd's revision is below the registry's term (etcd wiped), the node never leads."""
        world = World(1)
        node = world.nodes[0]
        node.registry.update(CONTROL_PLANE, Role.FOLLOWER, 10_000, leader_id="ghost")
        node.start()
        world.advance(1.0)
        self.addCleanup(world.stop_all)
        self.assertIsNot(node.role(), Role.LEADER)
        election = node.consensus.election(CONTROL_PLANE)
        assert election is not None
        self.assertIn("term", election.last_error or "")


class LockedStorageTests(SynchronousTestCase):
    """A node whose storage is locked follows but never campaigns."""

    def lock(self, node: Node, state: LockState = LockState.LOCKED) -> None:
        node.bus.publish(LockStateChanged(state, LockState.UNLOCKED), "persistence")
        node.clock.advance(0)
        node.world.etcd.pump()

    def test_a_leader_whose_storage_locks_hands_leadership_on(self) -> None:
        """A leader locked for lock_grace seconds steps down and another node leads."""
        world = settled_world(self)
        leader = world.leader()
        leader.consensus.lock_grace = 1.0
        term = leader.state().term
        self.lock(leader)
        world.advance(0.9)
        self.assertIs(world.leader(), leader)  # still within its grace
        world.advance(0.1 + STEP)
        self.assertIsNot(leader.role(), Role.LEADER)
        world.until(
            lambda: len(world.leaders()) == 1 and world.leader() is not leader, 1.0, "another"
        )
        new = world.leader()
        self.assertGreater(new.state().term, term)
        world.until(lambda: leader.role() is Role.FOLLOWER, 1.0, "the locked node following")
        self.assertEqual(leader.state().leader_id, new.name)
        world.advance(3.0)  # it stays a follower: it does not campaign again
        self.assertIs(world.leader(), new)

    def test_a_leader_passing_through_locked_keeps_leading(self) -> None:
        """Setup and unlock pass through locked and preunlock: a quick pass keeps the term."""
        world = settled_world(self)
        leader = world.leader()
        term = leader.state().term
        self.lock(leader, LockState.LOCKED)
        world.advance(0.5)
        self.lock(leader, LockState.PREUNLOCK)
        world.advance(0.5)
        self.lock(leader, LockState.UNLOCKED)
        world.advance(40.0)  # past the grace: nothing was pending
        self.assertIs(world.leader(), leader)
        self.assertEqual(leader.state().term, term)

    def test_a_locked_node_does_not_take_over_when_the_leader_dies(self) -> None:
        """With the leader dead, a locked node stays without leadership until it unlocks."""
        world = settled_world(self, nodes=2)
        leader = world.leader()
        (other,) = [n for n in world.nodes if n is not leader]
        self.lock(other)
        world.crash(leader)
        world.advance(5.0)  # well past the dead leader's lease
        self.assertEqual(world.leaders(), [])
        self.assertIsNone(world.key())
        self.assertIs(other.role(), Role.UNKNOWN)
        self.lock(other, LockState.UNLOCKED)
        world.until(lambda: world.leaders() == [other], 1.0, "the unlocked node leading")

    def test_unlocking_is_not_locking(self) -> None:
        """Preunlock counts as locked; uninitialised and unlocked nodes campaign."""
        world = World(1)
        self.addCleanup(world.stop_all)
        (node,) = world.nodes
        self.lock(node, LockState.PREUNLOCK)
        world.start()
        world.advance(2.0)
        self.assertEqual(world.leaders(), [])
        self.lock(node, LockState.UNINITIALIZED)
        world.until(lambda: world.leaders() == [node], 1.0, "the node leading")


class TrackReleaseTests(SynchronousTestCase):
    def test_track_a_resource(self) -> None:
        """Tracking app:x makes one node its leader and the others followers."""
        world = settled_world(self)
        ds = [n.consensus.track("app:x") for n in world.nodes]
        world.etcd.pump()
        world.advance(0.2)
        states = [self.successResultOf(d) for d in ds]
        self.assertEqual(sorted(s.role.value for s in states), ["follower", "follower", "leader"])
        self.assertEqual(len({s.term for s in states}), 1)
        self.assertEqual(list(world.nodes[0].consensus.tracked()), [CONTROL_PLANE, "app:x"])
        again = world.nodes[0].consensus.track("app:x")
        self.assertEqual(self.successResultOf(again).resource, "app:x")

    def test_track_fails_when_etcd_is_unreachable_and_recovers(self) -> None:
        """Without etcd, track() fails with Unavailable; the role stays unknown until it is back."""
        world = settled_world(self, nodes=1)
        node = world.nodes[0]
        node.http.refuse = True
        d = node.consensus.track("app:y")
        world.advance(0.1)
        self.failureResultOf(d, Unavailable)
        self.assertIs(node.role("app:y"), Role.UNKNOWN)
        self.assertIn("app:y", node.consensus.tracked())
        world.advance(2.0)
        self.assertIs(node.role("app:y"), Role.UNKNOWN)
        node.http.refuse = False
        world.advance(6.0)
        self.assertIs(node.role("app:y"), Role.LEADER)

    def test_release_steps_down_and_hands_over_at_once(self) -> None:
        """Releasing a led resource makes it unknown, revokes its lease; another node leads it."""
        world = settled_world(self)
        for n in world.nodes:
            n.consensus.track("app:x")
        world.advance(0.5)
        leader = world.leader("app:x")
        term = leader.state("app:x").term
        d = leader.consensus.release("app:x")
        self.assertIs(leader.role("app:x"), Role.UNKNOWN)
        world.etcd.pump()
        self.successResultOf(d)
        self.assertNotIn("app:x", leader.consensus.tracked())
        world.advance(0.2)
        new = world.leader("app:x")
        self.assertGreater(new.state("app:x").term, term)
        self.assertIs(leader.role("app:x"), Role.UNKNOWN)
        self.successResultOf(leader.consensus.release("app:x"))  # idempotent
        self.assertIs(world.leader(), world.leader())  # control-plane unaffected

    def test_bad_names_and_not_running(self) -> None:
        """Bad resource names are InvalidCommand; track before start is NotReady."""
        world = World(1)
        node = world.nodes[0]
        self.failureResultOf(node.consensus.track("app:x"), NotReady)
        for bad in ("", " ", "a/b", 3):
            self.failureResultOf(node.consensus.track(bad), InvalidCommand)  # type: ignore[arg-type]
            self.failureResultOf(node.consensus.release(bad), InvalidCommand)  # type: ignore[arg-type]

    def test_waiters_fail_when_released(self) -> None:
        """A track() still waiting when the resource is released fails with NotReady."""
        world = settled_world(self, nodes=1)
        node = world.nodes[0]
        node.http.blackhole = True
        d = node.consensus.track("app:z")
        self.assertNoResult(d)
        release = node.consensus.release("app:z")
        self.failureResultOf(d, NotReady)
        node.http.blackhole = False
        world.advance(1.0)
        self.successResultOf(release)

    def test_restart_campaigns_again_with_a_greater_term(self) -> None:
        """Stop then start: the node leads again at a term above its previous one."""
        world = settled_world(self, nodes=1)
        node = world.nodes[0]
        term = node.state().term
        d = node.consensus.stopService()
        world.advance(0.1)
        self.successResultOf(d)
        self.assertIs(node.role(), Role.UNKNOWN)
        self.assertEqual(world.etcd.leases(), [])
        node.consensus.startService()
        world.advance(0.5)
        self.assertIs(node.role(), Role.LEADER)
        self.assertGreater(node.state().term, term)


class CommandTests(SynchronousTestCase):
    def test_track_and_release_commands(self) -> None:
        """consensus.track and consensus.release answer LeadershipResult."""
        world = settled_world(self, nodes=1)
        node = world.nodes[0]
        result = self.successResultOf(node.dispatch(TrackResource("app:c")))
        self.assertEqual(
            result, LeadershipResult("app:c", "leader", node.state("app:c").term, node.name)
        )
        result = self.successResultOf(node.dispatch(ReleaseResource("app:c")))
        self.assertEqual(result.role, "unknown")

    def test_cluster_status(self) -> None:
        """cluster.status lists every member, each tracked resource and the endpoints."""
        world = settled_world(self)
        world.etcd.stop_member(E3)
        world.advance(1.5)
        leader = world.leader()
        status = self.successResultOf(world.nodes[0].dispatch(GetClusterStatus()))
        self.assertIsInstance(status, ClusterStatus)
        self.assertEqual(status.variant, "etcd")
        self.assertEqual(
            [(m["node_id"], m["self"]) for m in status.members],
            [("n0", True), ("n1", False), ("n2", False)],
        )
        self.assertEqual(status.members[1]["api_address"], "http://n1:8080")
        (resource,) = status.resources
        self.assertEqual(
            (resource["resource"], resource["leader_id"], resource["term"]),
            (CONTROL_PLANE, leader.name, leader.state().term),
        )
        self.assertGreater(resource["renewals"], 0)
        assert status.backend is not None
        self.assertEqual(
            [e["reports_healthy"] for e in status.backend["endpoints"]], [True, True, False]
        )
        json.dumps(status.to_json())  # JSON-ready
        lead = self.successResultOf(leader.dispatch(GetClusterStatus())).resources[0]
        self.assertGreater(lead["fresh_for"], 0)

    def test_cluster_status_without_etcd(self) -> None:
        """cluster.status still answers from what the node knows when etcd is gone."""
        world = settled_world(self)
        node = world.nodes[1]
        self.successResultOf(node.dispatch(GetClusterStatus()))
        node.http.refuse = True
        status = self.successResultOf(node.dispatch(GetClusterStatus()))
        self.assertEqual(len(status.members), 3)
        assert status.backend is not None
        self.assertIn("members_error", status.backend)

    def test_fenced_put_and_get_commands(self) -> None:
        """cluster.fenced_put lands on the leader, a follower reads it back and is refused."""
        world = settled_world(self)
        leader = world.leader()
        follower = next(n for n in world.nodes if n is not leader)
        done = self.successResultOf(leader.dispatch(FencedPut(key="a/b", value="v1")))
        self.assertIsInstance(done, FencedPutDone)
        self.assertEqual(done.term, leader.state().term)
        value = self.successResultOf(follower.dispatch(ReadClusterKey("a/b")))
        self.assertEqual(
            value,
            ClusterValue(
                key="a/b",
                value="v1",
                create_revision=done.revision,
                mod_revision=done.revision,
                revision=done.revision,
            ),
        )
        error = self.failureResultOf(follower.dispatch(FencedPut(key="a/b", value="v2")), NotLeader)
        self.assertEqual(error.value.leader_hint, f"http://{leader.name}:8080")
        missing = self.successResultOf(follower.dispatch(ReadClusterKey("nope")))
        self.assertIsNone(missing.value)

    def test_command_validation(self) -> None:
        """Cluster keys must be relative, printable and bounded."""
        for bad in ("", "/abs", "a//b", "a/../b", "sp ace", "é", "x" * 513):
            self.assertRaises(InvalidCommand, FencedPut, key=bad, value="v")
            self.assertRaises(InvalidCommand, ReadClusterKey, bad)
        self.assertRaises(InvalidCommand, FencedPut, key="k", value=3)
        self.assertRaises(InvalidCommand, FencedPut, key="k", value="x" * (1 << 20 + 1))

    def test_handlers_registered_only_while_running(self) -> None:
        """The commands are registered at start and gone after stop; a taken name fails start."""
        world = World(1)
        node = world.nodes[0]
        node.dispatcher.register(GetClusterStatus, lambda c, ctx: None)
        self.assertRaises(DuplicateRegistration, node.consensus.startService)
        self.assertFalse(node.consensus.running)
        self.assertNotIn(TrackResource.name, node.dispatcher.names())
        node.dispatcher.unregister(GetClusterStatus)
        node.start()
        self.assertIn(FencedPut.name, node.dispatcher.names())
        d = node.consensus.stopService()
        world.advance(0.1)
        self.successResultOf(d)
        self.failureResultOf(node.dispatch(GetClusterStatus()), UnknownCommand)


class PrefixWatchTests(SynchronousTestCase):
    def test_delivers_relative_keys_in_order(self) -> None:
        """watch_prefix delivers each change under the data prefix once, with relative keys."""
        world = settled_world(self)
        leader = world.leader()
        follower = next(n for n in world.nodes if n is not leader)
        seen: list[tuple[str, bytes, int]] = []

        def got(events: Any) -> None:
            seen.extend((e.type, e.kv.key, e.kv.mod_revision) for e in events)

        watch = follower.consensus.watch_prefix("log/", 1, got)
        revisions = []
        for i in range(3):
            d = leader.consensus.fenced_put(CONTROL_PLANE, f"log/{i}", b"x")
            world.etcd.pump()
            revisions.append(self.successResultOf(d))
        d = leader.consensus.fenced_put(CONTROL_PLANE, "other/1", b"x")
        world.etcd.pump()
        self.assertEqual(seen, [("PUT", f"log/{i}".encode(), r) for i, r in enumerate(revisions)])
        watch.cancel()
        self.assertIsNone(self.successResultOf(watch.when_stopped()))

    def test_resumes_after_a_broken_stream_without_gaps_or_repeats(self) -> None:
        """When the member serving the watch dies, it resumes elsewhere from the next revision."""
        world = settled_world(self)
        leader = world.leader()
        follower = next(n for n in world.nodes if n is not leader)
        seen: list[bytes] = []
        watch = follower.consensus.watch_prefix(
            "log/", 1, lambda events: seen.extend(e.kv.key for e in events)
        )

        def put(i: int) -> None:
            d = leader.consensus.fenced_put(CONTROL_PLANE, f"log/{i}", b"x")
            world.etcd.pump()
            self.successResultOf(d)

        put(0)
        world.etcd.stop_member(follower.client.current)
        put(1)
        put(2)
        world.advance(1.0)
        put(3)
        self.assertEqual(seen, [f"log/{i}".encode() for i in range(4)])
        self.assertTrue(watch.active)

    def test_compacted_history_stops_the_watch(self) -> None:
        """A start revision lost to compaction ends the watch with WatchCanceled."""
        world = settled_world(self, nodes=1)
        node = world.nodes[0]
        world.etcd.compact(world.etcd.revision)
        watch = node.consensus.watch_prefix("log/", 1, lambda events: None)
        world.etcd.pump()
        self.failureResultOf(watch.when_stopped(), WatchCanceled)
        self.assertFalse(watch.active)

    def test_stop_cancels_prefix_watches(self) -> None:
        """Stopping the service ends its prefix watches."""
        world = World(1)
        node = world.nodes[0]
        self.assertRaises(NotReady, node.consensus.watch_prefix, "x/", 1, lambda e: None)
        node.start()
        watch = node.consensus.watch_prefix("x/", 1, lambda e: None)
        d = node.consensus.stopService()
        world.advance(0.2)
        self.successResultOf(d)
        self.assertFalse(watch.active)
        self.assertEqual(world.etcd.watchers(), 0)
        self.assertEqual(node.clock.getDelayedCalls(), [])


class SettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """The defaults keep the renew deadline below the TTL."""
        settings = EtcdSettings.from_config({})
        self.assertEqual(settings.endpoints, ("http://127.0.0.1:2379",))
        self.assertLess(settings.renew_deadline, settings.ttl)
        self.assertEqual(settings.leader_key("app:x"), b"/piccolod/leader/app:x")
        self.assertEqual(settings.data_key("a/b"), b"/piccolod/data/a/b")

    def test_every_problem_is_reported(self) -> None:
        """Each bad value is named, all together in one ConfigError."""
        error = self.assertRaises(
            ConfigError,
            EtcdSettings.from_config,
            {
                "endpoints": ["ftp://x"],
                "prefix": "nope/",
                "ttl": 2.5,
                "renew_deadline": 0,
                "retry_period": -1,
                "request_timeout": "1",
                "resources": [""],
            },
        )
        text = str(error)
        for word in (
            "endpoints",
            "prefix",
            "ttl",
            "renew_deadline",
            "retry_period",
            "request_timeout",
            "resources",
        ):
            self.assertIn(word, text)

    def test_safety_relations(self) -> None:
        """renew_deadline must be below ttl, retry_period well below renew_deadline."""
        for bad in (
            {"ttl": 3, "renew_deadline": 3.0},
            {"ttl": 3, "renew_deadline": 2.0, "retry_period": 1.9},
            {"ttl": 5, "renew_deadline": 1.0, "request_timeout": 2.0},
            {"endpoints": []},
            {"endpoints": "http://a:1"},
        ):
            self.assertRaises(ConfigError, EtcdSettings.from_config, bad)


def make_context(config: dict[str, Any]) -> SubsystemContext:
    reactor = MemoryReactorClock()
    bus = MemoryEventBus(reactor)
    registry = LeadershipRegistry(bus, "node-a")
    kernel = Kernel(
        reactor=reactor,
        bus=bus,
        registry=registry,
        dispatcher=CommandDispatcher(reactor, bus, registry=registry),
        health=HealthTracker(reactor, bus),
        supervisor=object(),  # type: ignore[arg-type]
        node_id="node-a",
        api_address="http://192.0.2.1:8080",
        state_dir=Path("/nonexistent"),
    )
    return SubsystemContext(slot="consensus", variant="etcd", kernel=kernel, config=config)


class PluginTests(SynchronousTestCase):
    def test_plugin_is_discovered_and_builds(self) -> None:
        """The consensus=etcd drop-in selects with its keys and builds a verified IConsensus."""
        catalogue = Catalogue.build(plugins.discover())
        plugin = catalogue.get("consensus", "etcd")
        self.assertFalse(getattr(plugin, "default", False))
        self.assertEqual(catalogue.get("consensus", "single-node").variant, "single-node")
        chosen = plugins.select(
            catalogue,
            {"consensus": {"variant": "etcd", "endpoints": ["http://127.0.0.1:1"], "ttl": 4}},
            {},
        )
        selected, section = chosen["consensus"]
        self.assertIs(selected, plugin)
        service = plugin.build(make_context(section))
        plugins.verify(plugin, service)
        self.assertIsInstance(service, EtcdConsensus)
        assert isinstance(service, EtcdConsensus)
        self.assertEqual(service.settings.ttl, 4)
        self.assertEqual(service.api_address, "http://192.0.2.1:8080")
        self.assertTrue(verifyObject(IConsensus, service))
        self.assertEqual(list(service.tracked()), [CONTROL_PLANE])

    def test_unknown_keys_and_bad_values_fail_selection_or_build(self) -> None:
        """An unknown key fails selection; a bad value fails the build with ConfigError."""
        catalogue = Catalogue.build(plugins.discover())
        self.assertRaises(
            ConfigError,
            plugins.select,
            catalogue,
            {"consensus": {"variant": "etcd", "endpoint": "x"}},
            {},
        )
        plugin = catalogue.get("consensus", "etcd")
        self.assertRaises(
            ConfigError, plugin.build, make_context({"ttl": 1, "renew_deadline": 2.0})
        )


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
