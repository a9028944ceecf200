"""
Tests for piccolod.api.cluster (``GET /api/v1/cluster``) through StubTreq:
answered by the etcd variant, by the single-node variant, and from the
registry alone when no variant answers ``cluster.status``; the route's
guard sees the ``cluster.read`` action.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from piccolod.api.auth import LoginLimiter
from piccolod.api.cluster import cluster_routes
from piccolod.api.http import Route, Router
from piccolod.cli import EXIT_OK, Options, run
from piccolod.commands import GetClusterStatus, GetStorageStatus, JoinCluster, StorageStatus
from piccolod.consensus.single_node import SingleNodeConsensus
from piccolod.errors import PolicyDenied
from piccolod.events import Role
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.kernel.runtime import Kernel
from piccolod.persistence.errors import WrongPassword
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


def _settled_node(test: SynchronousTestCase) -> tuple[World, Any, Any]:
    """Three nodes on the fake etcd after their first election; node 1 and its kernel."""
    world = World(3)
    world.start()
    world.advance(1.5)
    test.addCleanup(world.stop_all)
    node = world.nodes[1]
    return world, node, _kernel(node.registry, node.dispatcher, node.clock, node.bus)


class ClusterRouteTests(SynchronousTestCase):
    def test_etcd_variant_answers(self) -> None:
        """With consensus=etcd the route shows every member and the resources' terms."""
        world, node, kernel = _settled_node(self)
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


class _FakeAPI:
    """What the join route uses of APIContext: the login limiter, sessions and audit."""

    def __init__(self, clock: Clock) -> None:
        self.limiter = LoginLimiter(clock, free_attempts=1, initial=5.0, maximum=60.0)
        self.sessions: list[str] = []
        self.audited: list[tuple[str, str, str]] = []

    def new_session(self, request: Request, subject: str = "admin") -> tuple[str, dict[str, Any]]:
        self.sessions.append(subject)
        return "piccolod_session=s3cret; Path=/", {"csrf_token": "csrf", "subject": subject}

    def audit(
        self, request: Request, action: str, subject: str, outcome: str, detail: str = ""
    ) -> str:
        self.audited.append((action, outcome, detail))
        return "id"


class JoinRouteTests(SynchronousTestCase):
    """POST /api/v1/cluster/join against a dispatcher with stand-in persistence handlers."""

    def setUp(self) -> None:
        self.clock = Clock()
        bus = MemoryEventBus(self.clock)
        registry = LeadershipRegistry(bus, "n2")
        self.dispatcher = CommandDispatcher(self.clock, bus, registry=registry)
        self.kernel = _kernel(registry, self.dispatcher, self.clock, bus)
        self.initialized = False
        self.joins: list[tuple[str, str]] = []
        self.password = "correct horse"

        def status(command: Any, context: Any) -> StorageStatus:
            return StorageStatus(
                state="unlocked" if self.initialized else "uninitialized",
                initialized=self.initialized,
            )

        def join(command: JoinCluster, context: Any) -> StorageStatus:
            self.joins.append((command.password, context.subject))
            if command.password != self.password:
                raise WrongPassword("wrong password")
            self.initialized = True
            return StorageStatus(state="unlocked", initialized=True, store={"revision": 4})

        self.dispatcher.register(GetStorageStatus, status)
        self.dispatcher.register(JoinCluster, join)

    def post(self, router: Router, body: Any) -> tuple[int, Any, Any]:
        stub = StubTreq(router)
        d = stub.post(
            "http://node/api/v1/cluster/join",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        self.clock.advance(0)
        response = self.successResultOf(d)
        raw = self.successResultOf(response.content())
        return response.code, json.loads(raw), response

    def router(self, api: Any = None, guard: Any = None) -> Router:
        router = Router(clock=self.clock, guard=guard)
        cluster_routes(router, self.kernel, api)
        return router

    def test_join_takes_the_password_and_answers_the_status(self) -> None:
        """A fresh node joins with the admin password, dispatched as system:api."""
        code, body, _ = self.post(self.router(), {"password": self.password})
        self.assertEqual(code, 200)
        self.assertEqual((body["state"], body["initialized"]), ("unlocked", True))
        self.assertEqual(self.joins, [(self.password, "system:api")])

    def test_join_logs_in_and_counts_wrong_passwords_with_the_api(self) -> None:
        """With the API context a wrong password counts towards the lockout; success logs in."""
        api = _FakeAPI(self.clock)
        router = self.router(api)
        code, body, _ = self.post(router, {"password": "wrong"})
        self.assertEqual((code, body["type"].rsplit("/", 1)[-1]), (401, "wrong-password"))
        code, body, _ = self.post(router, {"password": "wrong again"})
        self.assertEqual(code, 401)
        # Locked out now: refused before the password is even tried.
        code, body, _ = self.post(router, {"password": self.password})
        self.assertEqual(code, 429)
        self.assertEqual(len(self.joins), 2)
        self.clock.advance(60)
        code, body, response = self.post(router, {"password": self.password})
        self.assertEqual(code, 200)
        self.assertEqual((body["csrf_token"], body["state"]), ("csrf", "unlocked"))
        self.assertIn(b"piccolod_session", response.headers.getRawHeaders(b"set-cookie")[0])
        self.assertEqual([a[1] for a in api.audited], ["denied", "denied", "ok"])

    def test_join_is_refused_once_set_up(self) -> None:
        """A node that is already set up answers 409 and does not try to join."""
        self.initialized = True
        code, body, _ = self.post(self.router(), {"password": self.password})
        self.assertEqual(code, 409)
        self.assertEqual(self.joins, [])

    def test_bad_bodies_are_400(self) -> None:
        """A body without a password, or with extra members, is refused before any command."""
        for bad in ({}, {"password": ""}, {"password": "x", "extra": 1}, {"password": 3}):
            code, _, _ = self.post(self.router(), bad)
            self.assertEqual(code, 400, bad)
        self.assertEqual(self.joins, [])

    def test_without_persistence_it_is_unavailable(self) -> None:
        """With no persistence subsystem the route answers 503."""
        self.dispatcher.unregister(GetStorageStatus)
        code, body, _ = self.post(self.router(), {"password": self.password})
        self.assertEqual(code, 503)

    def test_the_route_is_public(self) -> None:
        """The guard sees a public route (a fresh node has no session to offer)."""
        seen: list[bool] = []

        def guard(request: Request, route: Route, params: Any) -> None:
            seen.append(route.public)

        code, _, _ = self.post(self.router(guard=guard), {"password": self.password})
        self.assertEqual((code, seen), (200, [True]))


class ClusterCliTests(SynchronousTestCase):
    def test_cluster_status_and_join(self) -> None:
        """piccolodctl cluster shows members, roles and lag; cluster join posts the password."""
        world, node, kernel = _settled_node(self)
        joined: list[str] = []

        def join(command: JoinCluster, context: Any) -> StorageStatus:
            joined.append(command.password)
            return StorageStatus(state="unlocked", initialized=True)

        node.dispatcher.register(
            GetStorageStatus, lambda c, ctx: StorageStatus(state="uninitialized", initialized=False)
        )
        node.dispatcher.register(JoinCluster, join)
        router = Router(clock=node.clock)
        cluster_routes(router, kernel)
        treq = StubTreq(router)
        secret = Path(self.mktemp())
        secret.write_text("the admin password\n")

        def ctl(*argv: str) -> tuple[int, str]:
            options = Options()
            options.parseOptions(["--url", "http://piccolod", *argv])
            out = io.StringIO()
            env = {"PICCOLOD_SESSION": self.mktemp()}
            d = Deferred.fromCoroutine(run(node.clock, options, out, treq=treq, environ=env))
            for _ in range(20):
                if d.called:
                    break
                world.advance(0.05)
            return self.successResultOf(d), out.getvalue()

        code, out = ctl("cluster")
        self.assertEqual(code, EXIT_OK)
        leader = world.leader()
        self.assertIn(
            f"member {leader.name} at http://{leader.name}:8080: control-plane leader", out
        )
        self.assertIn("member n1 (this node)", out)
        self.assertIn("lag", out)
        code, out = ctl("cluster", "join", "--password-file", str(secret))
        self.assertEqual((code, out), (EXIT_OK, "joined the cluster; storage unlocked\n"))
        self.assertEqual(joined, ["the admin password"])
