"""
The etcd client contract (``tests/contracts/etcd.py``) against a real etcd
(Debian's ``etcd-server``) on loopback, and the etcd consensus in-process on
the real reactor: the same suite the fake gateway passes in unit tests.

Skipped when ``etcd`` is missing; with ``PICCOLOD_REQUIRE_INTEGRATION=1``
they fail instead.  Runs through pytest-twisted's ``blockon``, polling
with deadlines.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from piccolod.consensus.etcd import CONTROL_PLANE, EtcdConsensus, EtcdSettings
from piccolod.consensus.etcd_client import EtcdClient
from piccolod.errors import NotLeader
from piccolod.events import Role
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.leadership import LeadershipRegistry
from tests.contracts.etcd import EtcdClientContract
from tests.integration.etcd_cluster import EtcdCluster, have_etcd
from tests.integration.support import REQUIRE

pytestmark = pytest.mark.integration

T = TypeVar("T")

_cluster: EtcdCluster | None = None


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture(autouse=True, scope="module")
def etcd() -> Iterator[None]:
    """One real etcd member for the whole module (tests use their own key prefixes)."""
    global _cluster
    if not have_etcd():
        yield
        return
    root = Path(tempfile.mkdtemp(prefix="piccolod-etcd-"))
    _cluster = EtcdCluster(root, size=1).start()
    try:
        yield
    finally:
        _cluster.stop()
        _cluster = None


def _need_etcd(case: SynchronousTestCase) -> EtcdCluster:
    if _cluster is None:
        message = "etcd is not installed (apt-get install etcd-server etcd-client)"
        if REQUIRE:
            case.fail(message + " (PICCOLOD_REQUIRE_INTEGRATION=1)")
        raise case.skipTest(message)
    return _cluster


class RealBinding:
    """The contract's hooks on the real reactor and a real etcd."""

    def make_client(self) -> EtcdClient:
        cluster = _need_etcd(self)  # type: ignore[arg-type]
        return EtcdClient.connect(_reactor(), cluster.endpoints, request_timeout=5.0)

    def wait(self, d: Deferred[T]) -> T:
        result: T = pytest_twisted.blockon(d)
        return result

    def wait_failure(self, d: Deferred[Any], *types: type[BaseException]) -> BaseException:
        try:
            pytest_twisted.blockon(d)
        except types as e:
            return e
        except BaseException as e:
            raise AssertionError(f"expected one of {types}, got {e!r}") from e
        raise AssertionError(f"expected one of {types}, got a result")

    def elapse(self, seconds: float) -> None:
        pytest_twisted.blockon(deferLater(_reactor(), seconds, lambda: None))

    def settle(self, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self.elapse(0.02)


class RealEtcdContractTests(RealBinding, EtcdClientContract, SynchronousTestCase):
    """The whole etcd client contract on a real etcd."""


class RealConsensusTests(RealBinding, SynchronousTestCase):
    """Two EtcdConsensus services in this process, on the real reactor."""

    def make_node(self, name: str, prefix: str) -> tuple[EtcdConsensus, LeadershipRegistry]:
        cluster = _need_etcd(self)
        reactor = _reactor()
        bus = MemoryEventBus(reactor)
        registry = LeadershipRegistry(bus, name)
        settings = EtcdSettings.from_config(
            {
                "endpoints": cluster.endpoints,
                "prefix": prefix,
                "ttl": 2,
                "renew_deadline": 1.5,
                "retry_period": 0.3,
                "request_timeout": 1.0,
            }
        )
        service = EtcdConsensus(
            registry=registry,
            client=EtcdClient.connect(reactor, settings.endpoints, settings.request_timeout),
            clock=reactor,
            settings=settings,
            dispatcher=CommandDispatcher(reactor, bus, registry=registry),
            health=HealthTracker(reactor, bus),
            api_address=f"http://{name}.invalid:8080",
        )
        return service, registry

    def test_two_nodes_elect_one_and_hand_over_on_stop(self) -> None:
        """One leads and one follows; stopping the leader hands over at once (revoke)."""
        prefix = f"/it-{time.monotonic_ns()}"
        a, reg_a = self.make_node("a", prefix)
        b, reg_b = self.make_node("b", prefix)
        a.startService()
        self.settle(lambda: reg_a.is_leader(CONTROL_PLANE), "a leads", timeout=10)
        b.startService()
        self.addCleanup(lambda: self.wait(b.stopService()))
        self.settle(lambda: reg_b.role(CONTROL_PLANE) is Role.FOLLOWER, "b follows", timeout=10)
        self.assertEqual(reg_b.state(CONTROL_PLANE).leader_id, "a")
        self.assertEqual(reg_b.state(CONTROL_PLANE).term, reg_a.state(CONTROL_PLANE).term)
        revision = self.wait(a.fenced_put(CONTROL_PLANE, "k", b"v"))
        self.assertGreater(revision, reg_a.state(CONTROL_PLANE).term)
        self.wait_failure(b.fenced_put(CONTROL_PLANE, "k", b"late"), NotLeader)
        started = time.monotonic()
        self.wait(a.stopService())
        self.settle(lambda: reg_b.is_leader(CONTROL_PLANE), "b leads", timeout=5)
        self.assertLess(time.monotonic() - started, 1.5)  # no TTL wait: the lease was revoked
        kv = self.wait(b.get("k"))
        assert kv is not None
        self.assertEqual(kv.value, b"v")

    def test_keepalives_keep_a_follower_lease(self) -> None:
        """Over several TTLs the roles stay put: keepalives run for leader and follower."""
        prefix = f"/it-{time.monotonic_ns()}"
        a, reg_a = self.make_node("a", prefix)
        b, reg_b = self.make_node("b", prefix)
        for service in (a, b):
            service.startService()
            self.addCleanup(lambda s=service: self.wait(s.stopService()))
        self.settle(
            lambda: (
                {reg_a.role(CONTROL_PLANE), reg_b.role(CONTROL_PLANE)}
                == {Role.LEADER, Role.FOLLOWER}
            ),
            "a leader and a follower",
        )
        terms = (reg_a.state(CONTROL_PLANE).term, reg_b.state(CONTROL_PLANE).term)
        self.elapse(5.0)
        self.assertEqual((reg_a.state(CONTROL_PLANE).term, reg_b.state(CONTROL_PLANE).term), terms)
        for service in (a, b):
            election = service.election(CONTROL_PLANE)
            assert election is not None
            self.assertGreaterEqual(election.renewals, 10)
            self.assertEqual(election.deadline_misses, 0)
