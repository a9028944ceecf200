"""
Three real etcd members and three ``twistd -n piccolod --use
consensus=etcd`` processes on loopback, each with its own ports and state
dir (TTL 2 s, renew deadline 1.5 s): exactly one ``control-plane`` leader;
20 rounds of ``kill -9`` of the leader, each followed by a new leader
within TTL + 2 s and every acknowledged write readable through it; a
SIGSTOPped leader that is replaced and, resumed, never leads again and
has its writes refused; the loss of one etcd member changes nothing, the
loss of two leaves no leader and refuses writes, and restoring them elects
one leader again.

Writes are ``cluster.fenced_put`` over the shipped API
(``POST /api/v1/commands/cluster.fenced_put``) with an operator token
provisioned in each state dir.  Skipped when ``etcd`` is missing; with
``PICCOLOD_REQUIRE_INTEGRATION=1`` they fail instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.etcd_cluster import (
    PREFIX,
    RENEW_DEADLINE,
    TTL,
    EtcdCluster,
    PiccolodNode,
    failover_round,
    fenced_put,
    one_leader,
    roles,
    running_cluster,
    wait_for,
    wait_renewals,
)

pytestmark = pytest.mark.integration

ROUNDS = 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[EtcdCluster, list[PiccolodNode]]]:
    with running_cluster(tmp_path) as running:
        yield running


def _types(reply: Any) -> str:
    return str((reply.body or {}).get("type", "")).rsplit("/", 1)[-1]


def test_kill_9_of_the_leader_fails_over_within_ttl_plus_2s(
    cluster: tuple[EtcdCluster, list[PiccolodNode]],
) -> None:
    """20 kills of the leader: each time a new leader within TTL + 2 s, every acked write kept."""
    _, nodes = cluster
    name, term = one_leader(nodes)
    status = nodes[0].command("cluster.status", {}).body["result"]
    assert sorted(m["node_id"] for m in status["members"]) == [n.name for n in nodes]
    acked: dict[str, str] = {}
    figures = [failover_round(nodes, i, acked, deadline=TTL + 2.0) for i in range(ROUNDS)]
    seconds = [f["seconds"] for f in figures]
    print(
        f"failover over {ROUNDS} kills: min {min(seconds):.2f}s "
        f"median {statistics.median(seconds):.2f}s max {max(seconds):.2f}s"
    )
    assert max(seconds) <= TTL + 2.0, figures
    terms = [f["term"] for f in figures]
    assert terms == sorted(set(terms)), "every failover has a new, greater term"
    assert len(acked) == ROUNDS


def test_sigstopped_leader_is_replaced_and_never_leads_again(
    cluster: tuple[EtcdCluster, list[PiccolodNode]],
) -> None:
    """SIGSTOP past the TTL: another leads; SIGCONT: the old one demotes, its writes are refused."""
    etcd, nodes = cluster
    by_name = {n.name: n for n in nodes}
    old_name, old_term = one_leader(nodes)
    old = by_name[old_name]
    log: list[tuple[int, int, str]] = []  # (revision, term, writer) of acknowledged writes

    def write(node: PiccolodNode, n: int) -> Any:
        reply = fenced_put(node, f"log/{n:03d}", node.name)
        if reply.status == 200:
            result = reply.body["result"]
            log.append((result["revision"], result["term"], node.name))
        return reply

    assert write(old, 0).status == 200
    old.pause()
    others = [n for n in nodes if n is not old]

    def taken_over() -> tuple[str, int] | None:
        for name, state in roles(others).items():
            if state["role"] == "leader" and state["term"] > old_term:
                return name, int(state["term"])
        return None

    new_name, new_term = wait_for(taken_over, TTL + 5.0, "another leader")
    new = by_name[new_name]
    assert write(new, 1).status == 200
    wait_renewals(new, 2, 10.0)  # the old leader stays stopped well past its lease
    old.resume()
    # Its first write after SIGCONT is refused (409 not-leader: the deadline
    # has passed, and etcd's fence would refuse it anyway).
    refused = write(old, 2)
    assert refused.status in (409, 503), refused
    assert _types(refused) in ("not-leader", "etcd-unavailable", "unavailable"), refused
    # From the moment it answers, it never says it leads; it ends up following.
    deadline = time.monotonic() + 2 * TTL + 2.0
    views = []
    while time.monotonic() < deadline:
        state = old.leadership()
        views.append((state["role"], state["term"]))
        assert state["role"] != "leader", views
        if state["role"] == "follower" and state["leader_id"] == new_name:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"the resumed node never followed {new_name}: {views}")
    assert old.leadership()["term"] == new_term
    assert write(new, 3).status == 200
    # The fenced log in etcd: exactly the acknowledged writes, terms never interleaving.
    stored = {kv["key"].rsplit("/", 1)[-1]: kv for kv in etcd.get_prefix(f"{PREFIX}/data/log/")}
    assert sorted(stored) == ["000", "001", "003"], stored
    assert [kv["mod_revision"] for kv in sorted(stored.values(), key=lambda kv: kv["key"])] == [
        rev for rev, _, _ in sorted(log)
    ]
    terms = [term for _, term, _ in sorted(log)]
    assert terms == sorted(terms) and terms[0] == old_term and terms[-1] == new_term, log


def test_etcd_member_loss(cluster: tuple[EtcdCluster, list[PiccolodNode]]) -> None:
    """One etcd member down: no change; two: no leader, typed write errors; back: one leader."""
    etcd, nodes = cluster
    name, term = one_leader(nodes)
    by_name = {n.name: n for n in nodes}
    etcd_leader = wait_for(etcd.leader_index, 10.0, "etcd's leader")
    victims = [i for i in range(3) if i != etcd_leader]
    etcd.kill_member(victims[0])
    # For three TTLs every node keeps exactly the same view.
    until = time.monotonic() + 3 * TTL
    while time.monotonic() < until:
        views = roles(nodes)
        assert len(views) == 3, views
        for node_name, state in views.items():
            assert state["term"] == term and state["leader_id"] == name, (node_name, views)
            assert state["role"] == ("leader" if node_name == name else "follower"), views
        time.sleep(0.1)
    assert fenced_put(by_name[name], "one-down", "ok").status == 200
    health = by_name[name].api.get("/api/v1/health/detail").body
    consensus = next(c for c in health["components"] if c["component"] == "consensus")
    assert consensus["level"] == "warn", consensus

    # A second member: no quorum.  Within the renew deadline (plus request
    # timeouts and polling) nobody claims leadership, and it stays so.
    etcd.kill_member(victims[1])
    lost = time.monotonic()
    wait_for(
        lambda: True if not any(s["role"] == "leader" for s in roles(nodes).values()) else None,
        RENEW_DEADLINE + 3.0,
        "no leader",
    )
    assert time.monotonic() - lost <= RENEW_DEADLINE + 3.0
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        assert not any(s["role"] == "leader" for s in roles(nodes).values()), roles(nodes)
        time.sleep(0.1)
    for node in nodes:
        reply = fenced_put(node, "no-quorum", "refused")
        assert reply.status in (409, 503), reply
        assert _types(reply) in ("not-leader", "etcd-unavailable", "unavailable"), reply
    health = by_name[name].api.get("/api/v1/health/detail").body
    consensus = next(c for c in health["components"] if c["component"] == "consensus")
    assert consensus["level"] == "error", consensus

    # Restore both: one leader again, and the refused write never landed.
    etcd.start_member(victims[0])
    etcd.start_member(victims[1])
    etcd.wait_healthy(30.0)
    one_leader(nodes, timeout=30.0)
    assert [kv["key"] for kv in etcd.get_prefix(f"{PREFIX}/data/")] == [f"{PREFIX}/data/one-down"]
