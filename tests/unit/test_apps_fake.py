"""The fake container runtime: the shared contract, plus its test helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.apps.fake import FakeContainerRuntime
from piccolod.errors import Conflict, Unavailable
from piccolod.interfaces import ContainerSpec, PortMapping
from tests.contracts.containers import ContainerRuntimeContract

T = TypeVar("T")
IMAGE = "localhost/contract:1"


class FakeContractTests(ContainerRuntimeContract, SynchronousTestCase):
    """The whole container runtime contract on the fake."""

    image = IMAGE
    prefix = "ct"
    host_port = 18080

    def make_runtime(self) -> Any:
        self.clock = Clock()
        return FakeContainerRuntime(self.clock, images={IMAGE})

    def wait(self, d: Deferred[T]) -> T:
        return self.successResultOf(d)

    def wait_failure(self, d: Deferred[Any], *types: type[BaseException]) -> BaseException:
        return self.failureResultOf(d, *types).value

    def settle(self, predicate: Callable[[], bool], what: str) -> None:
        self.clock.advance(0)
        self.assertTrue(predicate(), what)

    def kill_from_outside(self, container_id: str) -> None:
        self.runtime.kill(container_id)


class FakeHelperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runtime = FakeContainerRuntime(self.clock, images={IMAGE})

    def test_unavailable_fails_every_call(self) -> None:
        """With available=False every call fails with Unavailable (and is recorded)."""
        self.runtime.available = False
        self.failureResultOf(self.runtime.ping(), Unavailable)
        self.failureResultOf(self.runtime.list_containers({}), Unavailable)
        self.assertEqual([op for op, _ in self.runtime.calls], ["ping", "list"])

    def test_fail_next_injects_one_error(self) -> None:
        """fail_next fails exactly the next call of that operation."""
        self.runtime.fail_next("create", Conflict("boom"))
        spec = ContainerSpec(name="x", image=IMAGE)
        self.failureResultOf(self.runtime.create(spec), Conflict)
        self.successResultOf(self.runtime.create(spec))

    def test_a_published_port_cannot_be_bound_twice(self) -> None:
        """Starting a second container on a host port in use fails like a failed bind."""
        port = (PortMapping(container_port=80, host_port=15000),)
        a = self.successResultOf(self.runtime.create(ContainerSpec("a", IMAGE, ports=port)))
        b = self.successResultOf(self.runtime.create(ContainerSpec("b", IMAGE, ports=port)))
        self.successResultOf(self.runtime.start(a.id))
        self.failureResultOf(self.runtime.start(b.id), Conflict)
        self.successResultOf(self.runtime.stop(a.id))
        self.successResultOf(self.runtime.start(b.id))

    def test_events_are_never_reentrant(self) -> None:
        """Watchers are called on a later turn, not inside the call that caused the event."""
        seen: list[str] = []
        self.runtime.watch(lambda e: seen.append(e.action))
        self.successResultOf(self.runtime.create(ContainerSpec("a", IMAGE)))
        self.assertEqual(seen, [])
        self.clock.advance(0)
        self.assertEqual(seen, ["create"])

    def test_kill_of_a_stopped_container_is_refused(self) -> None:
        """kill() only kills running containers."""
        info = self.successResultOf(self.runtime.create(ContainerSpec("a", IMAGE)))
        self.assertRaises(Conflict, self.runtime.kill, info.id)
