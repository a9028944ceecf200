"""
A hypothesis state machine over three simulated nodes and a FakeEtcd
cluster of three members, each node on its own Clock: time passes in
small steps while nodes are cut off (refused or black-holed), paused and
resumed (I/O first, then overdue timers, as after SIGCONT), crashed and
reborn under the same id, restarted; members stop or hang; the quorum is
lost and restored; leaders and followers attempt fenced writes; nodes
track and release a second resource (``app:x``).

Checked after every step of time (not only between rules):

- never leader past the lease's expiry: a running node that says it leads
  holds a live lease (etcd's expiry is still ahead) bound to the leader
  key, whose create revision is its term;
- at most one running leader per resource;
- each node's term only grows, and the registry never refused etcd's view;
- fenced writes acknowledged by etcd, in revision order, carry
  non-decreasing terms (no two leaders' writes interleave).

And liveness: once every fault is healed, exactly one leader emerges and
every other node follows it, within a bounded time.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from piccolod.consensus.etcd import CONTROL_PLANE
from piccolod.errors import NotLeader, NotReady, Unavailable
from piccolod.events import Role
from tests.unit.test_consensus_etcd import MEMBERS, World
from tests.unit.test_consensus_etcd import Node as SimNode

SLOTS = st.integers(min_value=0, max_value=2)
APP = "app:x"
RESOURCES = (CONTROL_PLANE, APP)


class ConsensusMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.world = World(3, latency=True)
        #: slot -> the node currently in that slot (a crashed one is replaced).
        self.slots: list[SimNode] = list(self.world.nodes)
        self.max_term: dict[tuple[int, str], int] = {}
        #: Acknowledged fenced writes: (revision, term, node name).
        self.acked: list[tuple[int, int, str]] = []
        self.quorum = True
        for node in self.world.nodes:
            node.http.after_delivery = self.check
        self.world.start()

    # -- helpers --------------------------------------------------------------------

    def live(self) -> list[SimNode]:
        return [n for n in self.slots if not n.paused and not n.crashed]

    def check(self) -> None:
        """The safety invariants, at this instant, for every resource."""
        for resource in RESOURCES:
            self.check_resource(resource)
        terms = [term for _, term, _ in sorted(self.acked)]
        assert terms == sorted(terms), f"fenced writes interleave: {sorted(self.acked)}"

    def check_resource(self, resource: str) -> None:
        etcd = self.world.etcd
        now = self.world.clock.seconds()
        leaders = []
        for node in self.live():
            if not node.registry.is_leader(resource):
                continue
            leaders.append(node)
            election = node.consensus.election(resource)
            assert election is not None, f"{node.name} leads {resource} it does not track"
            lease = election.lease
            assert lease is not None, f"{node.name} leads without a lease"
            expiry = etcd.lease_expiry(lease.id)
            assert expiry is not None, f"{node.name} leads on a lease etcd no longer has"
            assert now < expiry, f"{node.name} leads past its lease's expiry ({now} >= {expiry})"
            key = etcd.get(self.world.settings.leader_key(resource))
            assert key is not None, f"{node.name} leads but the leader key is gone"
            assert key.lease == lease.id, f"{node.name} leads but the key is bound to another lease"
            term = node.state(resource).term
            assert key.create_revision == term, "term is not the key's create revision"
        assert len(leaders) <= 1, f"two leaders of {resource}: {[n.name for n in leaders]}"
        for node in self.slots:
            if node.crashed:
                continue
            term = node.state(resource).term
            seen = (id(node), resource)
            assert term >= self.max_term.get(seen, 0), f"{node.name}'s term went backwards"
            self.max_term[seen] = term
            election = node.consensus.election(resource)
            assert election is None or election.refusals == 0, "the registry refused etcd"

    # -- time -----------------------------------------------------------------------

    @rule(seconds=st.floats(min_value=0.05, max_value=3.0))
    def advance(self, seconds: float) -> None:
        self.world.advance(seconds, self.check)

    # -- node faults ----------------------------------------------------------------

    @rule(slot=SLOTS, blackhole=st.booleans())
    def cut_off(self, slot: int, blackhole: bool) -> None:
        node = self.slots[slot]
        if blackhole:
            node.http.blackhole = True
        else:
            node.http.refuse = True

    @rule(slot=SLOTS)
    def reconnect(self, slot: int) -> None:
        node = self.slots[slot]
        if not node.crashed:
            node.http.refuse = node.http.blackhole = False

    @rule(
        slot=SLOTS,
        later=st.one_of(st.none(), st.just(float("inf")), st.floats(min_value=0.0, max_value=1.0)),
    )
    def pause(self, slot: int, later: float | None) -> None:
        """
        SIGSTOP now (``None``), in a later step (with answers in flight), or
        right after the node's next request (``inf``).
        """
        node = self.slots[slot]
        if node.crashed:
            return
        if later is None:
            self.world.pause(node)
        else:
            node.pause_at = self.world.clock.seconds() + later

    @rule(slot=SLOTS, timers_first=st.booleans())
    def resume(self, slot: int, timers_first: bool) -> None:
        node = self.slots[slot]
        if node.crashed or not node.paused:
            return
        if timers_first:
            node.http.paused = False
            node.clock.advance(self.world.clock.seconds() - node.clock.seconds())
            node.http.flush()
            self.world.etcd.pump()
        else:
            self.world.resume(node)
        self.check()

    @rule(
        slot=SLOTS,
        seconds=st.floats(min_value=0.1, max_value=4.0),
        timers_first=st.booleans(),
    )
    def stall(self, slot: int, seconds: float, timers_first: bool) -> None:
        """Pause right after the node's next request, let time pass, resume."""
        node = self.slots[slot]
        if node.crashed or node.paused:
            return
        node.pause_at = float("inf")
        self.world.advance(seconds, self.check)
        node.pause_at = None
        self.resume(slot, timers_first)

    @rule(slot=SLOTS)
    def crash_and_reboot(self, slot: int) -> None:
        """kill -9, then a new process with the same node id starts at once."""
        old = self.slots[slot]
        if old.crashed:
            return
        self.world.crash(old)
        new = self.world.add(old.name)
        new.http.after_delivery = self.check
        self.world.nodes.append(new)
        self.slots[slot] = new
        new.start()
        self.check()

    @rule(slot=SLOTS)
    def restart(self, slot: int) -> None:
        """A graceful stop (step down, revoke) and start."""
        node = self.slots[slot]
        if node.crashed or node.paused or not node.consensus.running:
            return
        node.pause_at = None
        d = node.consensus.stopService()
        self.world.until(lambda: d.called, 10.0, "stopped")
        node.start()
        self.check()

    # -- etcd faults ----------------------------------------------------------------

    @rule(member=st.sampled_from(MEMBERS), mode=st.sampled_from(["stop", "hang", "start"]))
    def member(self, member: str, mode: str) -> None:
        etcd = self.world.etcd
        if mode == "stop":
            etcd.stop_member(member)
        elif mode == "hang":
            etcd.hang_member(member)
        else:
            etcd.start_member(member)

    @precondition(lambda self: self.quorum)
    @rule()
    def lose_quorum(self) -> None:
        self.quorum = False
        self.world.etcd.lose_quorum()

    @precondition(lambda self: not self.quorum)
    @rule()
    def restore_quorum(self) -> None:
        self.quorum = True
        self.world.etcd.restore_quorum()
        self.check()

    # -- writes ---------------------------------------------------------------------

    @rule(slot=SLOTS)
    def fenced_write(self, slot: int) -> None:
        node = self.slots[slot]
        if node.crashed or node.paused:
            return
        election = node.consensus.election(CONTROL_PLANE)
        term = election.term if election is not None else 0
        d: Deferred[Any] = node.consensus.fenced_put(CONTROL_PLANE, f"log/{len(self.acked)}", b"w")

        def acked(revision: int) -> None:
            self.acked.append((revision, term, node.name))

        d.addCallbacks(acked, lambda f: f.trap(NotLeader, Unavailable))
        self.world.etcd.pump()

    # -- resources ------------------------------------------------------------------

    @rule(slot=SLOTS)
    def track_app(self, slot: int) -> None:
        node = self.slots[slot]
        if node.crashed or node.paused or not node.consensus.running:
            return
        node.consensus.track(APP).addErrback(lambda f: f.trap(Unavailable, NotReady))
        self.world.etcd.pump()
        self.check()

    @rule(slot=SLOTS)
    def release_app(self, slot: int) -> None:
        node = self.slots[slot]
        if node.crashed or node.paused:
            return
        node.consensus.release(APP)  # revokes in the background; never fails
        self.assertion_released(node)
        self.world.etcd.pump()
        self.check()

    def assertion_released(self, node: SimNode) -> None:
        assert node.role(APP) is Role.UNKNOWN, "release leaves the role unknown at once"
        assert APP not in node.consensus.tracked()

    # -- liveness -------------------------------------------------------------------

    @rule()
    def heal_and_settle(self) -> None:
        """With every fault healed, one leader and followers of it appear in bounded time."""
        etcd = self.world.etcd
        if not self.quorum:
            self.restore_quorum()
        for member in MEMBERS:
            etcd.start_member(member)
        for slot in range(3):
            self.slots[slot].pause_at = None
            self.reconnect(slot)
            self.resume(slot, timers_first=False)

        def settled_for(resource: str) -> bool:
            nodes = [n for n in self.live() if resource in n.consensus.tracked()]
            if not nodes:
                return True
            leaders = [n for n in nodes if n.role(resource) is Role.LEADER]
            if len(leaders) != 1:
                return False
            leader = leaders[0]
            return all(
                n.role(resource) is Role.FOLLOWER
                and n.state(resource).leader_id == leader.name
                and n.state(resource).term == leader.state(resource).term
                for n in nodes
                if n is not leader
            )

        def settled() -> bool:
            return all(settled_for(resource) for resource in RESOURCES)

        # Worst case: a backoff pause (5 s + 20%), a TTL for a dead holder,
        # a renew deadline, and a few rounds.
        self.world.until(settled, 15.0, "one leader and its followers")
        self.check()

    @invariant()
    def safe(self) -> None:
        self.check()

    def teardown(self) -> None:
        self.world.stop_all()


class ConsensusStateMachineTests(SynchronousTestCase):
    def test_state_machine(self) -> None:
        """Safety invariants hold in every step and a leader emerges once faults heal."""
        machine = ConsensusMachine.TestCase
        machine.settings = settings(
            max_examples=100,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        machine().runTest()
