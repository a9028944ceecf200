"""
Tests for piccolod.api.cluster (``GET /api/v1/cluster``) through StubTreq:
answered by the etcd variant, by the single-node variant, and from the
registry alone when no variant answers ``cluster.status``; the route's
guard sees the ``cluster.read`` action.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from piccolod.api.cluster import cluster_routes
from piccolod.api.http import Route, Router
from piccolod.commands import GetClusterStatus
from piccolod.consensus.single_node import SingleNodeConsensus
from piccolod.errors import PolicyDenied
from piccolod.events import Role
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.kernel.runtime import Kernel
from tests.unit.test_consensus_etcd import World


def _kernel(registry: LeadershipRegistry, dispatcher: Any, clock: Any, bus: Any) -> Kernel:
    return Kernel(
        reactor=clock,
        bus=bus,
        registry=registry,
        dispatcher=dispatcher,
        health=HealthTracker(clock, bus),
        supervisor=object(),  # type: ignore[arg-type]
        node_id=registry.node_id,
        api_address=f"http://{registry.node_id}:8080",
        state_dir=Path("/nonexistent"),
        selected={"consensus": "test"},
    )


def _get(router: Router, flush: Any = None) -> tuple[int, Any]:
    stub = StubTreq(router)
    d = stub.get("http://node/api/v1/cluster")
    if flush is not None:
        flush()
    response = SynchronousTestCase().successResultOf(d)
    body = SynchronousTestCase().successResultOf(response.content())
    return response.code, json.loads(body)


class ClusterRouteTests(SynchronousTestCase):
    def test_etcd_variant_answers(self) -> None:
        """With consensus=etcd the route shows every member and the resources' terms."""
        world = World(3)
        world.start()
        world.advance(1.5)
        self.addCleanup(world.stop_all)
        node = world.nodes[1]
        kernel = _kernel(node.registry, node.dispatcher, node.clock, node.bus)
        router = Router(clock=node.clock)
        cluster_routes(router, kernel)
        code, body = _get(router, world.etcd.pump)
        self.assertEqual(code, 200)
        self.assertEqual(body["variant"], "etcd")
        self.assertEqual([m["node_id"] for m in body["members"]], ["n0", "n1", "n2"])
        self.assertEqual([m["self"] for m in body["members"]], [False, True, False])
        (resource,) = body["resources"]
        leader = world.leader()
        self.assertEqual(
            (resource["role"], resource["leader_id"], resource["term"]),
            ("follower" if leader is not node else "leader", leader.name, leader.state().term),
        )
        self.assertEqual(len(body["backend"]["endpoints"]), 3)

    def test_single_node_answers(self) -> None:
        """consensus=single-node answers cluster.status with itself as the only member."""
        clock = Clock()
        bus = MemoryEventBus(clock)
        registry = LeadershipRegistry(bus, "solo")
        dispatcher = CommandDispatcher(clock, bus, registry=registry)
        consensus = SingleNodeConsensus(registry, dispatcher, api_address="http://solo:8080")
        consensus.startService()
        kernel = _kernel(registry, dispatcher, clock, bus)
        router = Router(clock=clock)
        cluster_routes(router, kernel)
        code, body = _get(router)
        self.assertEqual(code, 200)
        self.assertEqual(body["variant"], "single-node")
        self.assertEqual(
            body["members"], [{"node_id": "solo", "api_address": "http://solo:8080", "self": True}]
        )
        self.assertEqual(body["resources"][0]["role"], "leader")
        self.assertIsNone(body["backend"])
        self.successResultOf(consensus.stopService())
        self.assertNotIn(GetClusterStatus.name, dispatcher.names())

    def test_registry_view_without_a_handler(self) -> None:
        """Without a cluster.status handler the route answers from the registry."""
        clock = Clock()
        bus = MemoryEventBus(clock)
        registry = LeadershipRegistry(bus, "n9")
        registry.update("control-plane", Role.FOLLOWER, 7, leader_id="n1", leader_address="x")
        dispatcher = CommandDispatcher(clock, bus, registry=registry)
        kernel = _kernel(registry, dispatcher, clock, bus)
        router = Router(clock=clock)
        cluster_routes(router, kernel)
        code, body = _get(router)
        self.assertEqual(code, 200)
        self.assertEqual(body["variant"], "test")
        self.assertEqual([m["node_id"] for m in body["members"]], ["n9"])
        self.assertEqual(body["resources"][0]["term"], 7)

    def test_guard_sees_the_cluster_read_action(self) -> None:
        """The boundary decides on cluster.read; a refusal is problem+json."""
        clock = Clock()
        bus = MemoryEventBus(clock)
        registry = LeadershipRegistry(bus, "n9")
        kernel = _kernel(registry, CommandDispatcher(clock, bus, registry=registry), clock, bus)
        seen: list[str | None] = []

        def guard(request: Request, route: Route, params: Any) -> None:
            seen.append(route.action)
            raise PolicyDenied("no")

        router = Router(clock=clock, guard=guard)
        cluster_routes(router, kernel)
        code, body = _get(router)
        self.assertEqual((code, seen), (403, ["cluster.read"]))
        self.assertEqual(body["status"], 403)
