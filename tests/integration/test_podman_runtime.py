"""
The container runtime contract on real podman (REST over its unix socket,
treq, the real reactor through pytest-twisted's ``blockon``), plus the
plugin service's start-up: spawning ``podman system service`` itself, and
the loud fallback to the fake when podman is not usable.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from piccolod.apps.podman import PodmanContainers, PodmanRuntime
from piccolod.errors import Unavailable
from piccolod.events import HealthLevel
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.health import HealthTracker
from tests.contracts.containers import ContainerRuntimeContract
from tests.integration.test_podman_support import PodmanFixture, free_port, require_podman, wait
from tests.integration.test_podman_support import running_reactor as _reactor

pytestmark = pytest.mark.integration

T = TypeVar("T")
PODMAN: PodmanFixture | None = None


@pytest.fixture(scope="module", autouse=True)
def podman_service() -> Iterator[None]:
    global PODMAN
    require_podman()
    PODMAN = PodmanFixture()
    try:
        PODMAN.start()
        yield
    finally:
        PODMAN.stop()
        PODMAN = None


def settle(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        pytest_twisted.blockon(deferLater(_reactor(), 0.05, lambda: None))


class PodmanContractTests(ContainerRuntimeContract, SynchronousTestCase):
    """The whole container runtime contract on real podman."""

    def make_runtime(self) -> Any:
        assert PODMAN is not None
        self.image = PODMAN.image
        self.prefix = PODMAN.prefix
        self.host_port = free_port()
        runtime = PodmanRuntime(_reactor(), PODMAN.socket)
        self.addCleanup(runtime.close)
        return runtime

    def wait(self, d: Deferred[T]) -> T:
        return wait(d)

    def wait_failure(self, d: Deferred[Any], *types: type[BaseException]) -> BaseException:
        try:
            wait(d)
        except types as e:
            return e
        except BaseException as e:
            self.fail(f"expected one of {types}, got {e!r}")
        self.fail(f"expected one of {types}, got a result")

    def settle(self, predicate: Callable[[], bool], what: str) -> None:
        settle(predicate, what)

    def kill_from_outside(self, container_id: str) -> None:
        assert PODMAN is not None
        PODMAN.kill(container_id)

    def forget_image(self, tag: str) -> None:
        assert PODMAN is not None
        PODMAN.podman("rmi", "-f", tag, check=False)


class PodmanPluginServiceTests(SynchronousTestCase):
    """The containers=podman service: start-up, spawning podman, the loud fallback."""

    def make(self, socket_path: str, **kwargs: Any) -> tuple[PodmanContainers, HealthTracker]:
        reactor = _reactor()
        health = HealthTracker(reactor, MemoryEventBus(reactor))
        service = PodmanContainers(
            reactor=reactor, socket_path=socket_path, health=health, **kwargs
        )
        return service, health

    def test_uses_a_running_podman(self) -> None:
        """With podman answering on the socket the service uses it and reports ok."""
        assert PODMAN is not None
        service, health = self.make(PODMAN.socket, start_service=False)
        service.startService()
        self.addCleanup(lambda: wait(service.stopService()))
        wait(service.when_ready())
        wait(service.when_connected())
        self.assertEqual(service.kind, "podman")
        self.assertEqual(health.component("containers").level, HealthLevel.OK)
        self.assertTrue(wait(service.image_exists(PODMAN.image)))

    def test_starts_podman_itself_and_stops_it_by_pid(self) -> None:
        """
        Without a socket the service spawns podman system service and stops it on stop:
        with the event stream open, podman exits on SIGTERM by itself (the stream's
        connection is closed first), never by the SIGKILL that follows 10 s later.
        """
        assert PODMAN is not None
        socket_path = str(PODMAN.root / "own" / "podman.sock")
        service, health = self.make(
            socket_path, containers_conf=str(PODMAN.conf), ping_timeout=20.0
        )
        service.startService()
        wait(service.when_ready())
        wait(service.when_connected())
        self.assertEqual(service.kind, "podman")
        pid = service._process.pid
        protocol = service._protocol
        assert protocol is not None
        events: list[Any] = []
        service.watch(events.append)  # the daemon's controller always follows events
        self.assertTrue(wait(service.image_exists(PODMAN.image)))
        wait(service.stopService())
        settle(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), "podman to exit")
        reason = protocol.reason
        self.assertIsNotNone(reason)
        self.assertNotEqual(getattr(reason, "signal", None), signal.SIGKILL, reason)
        self.assertEqual(getattr(reason, "exitCode", None), 0, reason)

    def test_falls_back_to_the_fake_loudly(self) -> None:
        """An unusable podman makes the service run the fake and warn in health."""
        assert PODMAN is not None
        service, health = self.make(
            str(PODMAN.root / "nothing" / "podman.sock"), podman="/nonexistent/podman"
        )
        service.startService()
        self.addCleanup(lambda: wait(service.stopService()))
        wait(service.when_ready())
        wait(service.when_connected())
        self.assertEqual(service.kind, "fake (fallback)")
        component = health.component("containers")
        self.assertEqual(component.level, HealthLevel.WARN)
        self.assertIn("FALLING BACK TO THE FAKE", component.message)
        self.flushLoggedErrors()

    def test_without_fallback_readiness_fails(self) -> None:
        """With fallback disabled an unusable podman fails readiness and reports an error."""
        assert PODMAN is not None
        service, health = self.make(
            str(PODMAN.root / "none" / "podman.sock"), podman="/nonexistent/podman", fallback=""
        )
        service.startService()
        self.addCleanup(lambda: wait(service.stopService()))
        with self.assertRaises(Unavailable):
            wait(service.when_ready())
        self.assertEqual(health.component("containers").level, HealthLevel.ERROR)


def _zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text().replace("(", " ").replace(")", " ")
    except OSError:
        return True
