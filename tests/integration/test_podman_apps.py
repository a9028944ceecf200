"""
End to end on real podman, in-process on the real reactor: the apps
service and the services subsystem over ``PodmanRuntime``, the in-memory
control store (directories as persistence volumes), lock state driven by
publishing ``LockStateChanged`` on the bus, leadership by the registry.

install an app serving HTTP (busybox httpd) → reachable through its proxy
port → lock → unreachable, container stopped → unlock → reachable again
with its data intact on its persistent volume → kill the container from
outside → back within the backoff → restart the apps and services
services → container adopted (same id), same ports, no duplicate →
follower → stopped and routed to the leader → leader → restored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from piccolod.apps.podman import PodmanRuntime
from piccolod.apps.service import AppsService
from piccolod.apps.store import MemoryStore
from piccolod.commands import (
    CommandContext,
    InstallApp,
    LeadershipResult,
    RemoveApp,
    TrackResource,
)
from piccolod.events import LockState, LockStateChanged, Role
from piccolod.interfaces import Backoff
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.services.ports import PortAllocator, PortRange
from piccolod.services.service import ServiceManager
from tests.integration.test_podman_support import PodmanFixture, require_podman, wait
from tests.integration.test_podman_support import running_reactor as _reactor

pytestmark = pytest.mark.integration

T = TypeVar("T")
PODMAN: PodmanFixture | None = None
NODE = "node-e2e"

APP = """
name: blog
image: {image}
command:
  - /bin/sh
  - -c
  - test -f /data/stamp || date > /data/stamp; exec httpd -f -p 8080 -h /data
listeners:
  - name: web
    guest_port: 8080
    protocol: http
storage:
  persistent:
    data: {{container: /data}}
resources:
  limits: {{memory: 64MB, cpu: 0.5}}
"""


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


def poll(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
        except Exception as e:
            last, result = e, None
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {last!r}")
        pytest_twisted.blockon(deferLater(_reactor(), 0.05, lambda: None))


def get(port: int, path: str) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        response = await treq.get(f"http://127.0.0.1:{port}{path}", timeout=3, persistent=False)
        return int(response.code), await treq.content(response)

    return wait(Deferred.fromCoroutine(go()), 10.0)


class Node:
    """One node's kernel parts, apps and services over real podman."""

    def __init__(self, root: Path) -> None:
        assert PODMAN is not None
        reactor = _reactor()
        self.reactor = reactor
        self.bus = MemoryEventBus(reactor)
        self.registry = LeadershipRegistry(self.bus, NODE)
        self.dispatcher = CommandDispatcher(reactor, self.bus, registry=self.registry)
        self.health = HealthTracker(reactor, self.bus)
        self.store = MemoryStore(self.dispatcher, volumes_root=root / "volumes").register()
        self.runtime = PodmanRuntime(reactor, PODMAN.socket)
        self.dispatcher.register(TrackResource, self._track)
        self.registry.update("control-plane", Role.LEADER, 1, NODE, "http://127.0.0.1:1")
        self.apps: AppsService | None = None
        self.services: ServiceManager | None = None

    def _track(self, command: TrackResource, context: CommandContext) -> LeadershipResult:
        state = self.registry.state(command.resource_name)
        if state.role is Role.UNKNOWN:
            state = self.registry.update(command.resource_name, Role.LEADER, state.term + 1, NODE)
        return LeadershipResult(
            resource=command.resource_name, role=state.role.value, term=state.term
        )

    def start(self) -> None:
        assert PODMAN is not None
        self.services = ServiceManager(
            reactor=self.reactor,
            bus=self.bus,
            dispatcher=self.dispatcher,
            health=self.health,
            allocator=PortAllocator(
                self.dispatcher,
                backend=PortRange(26000, 27000),
                public=PortRange(46000, 47000),
                is_free_backend=_free,
                is_free_public=_free,
            ),
            bind="127.0.0.1",
        )
        self.apps = AppsService(
            clock=self.reactor,
            bus=self.bus,
            dispatcher=self.dispatcher,
            registry=self.registry,
            runtime=self.runtime,
            health=self.health,
            instance=PODMAN.prefix,
            name_prefix=f"{PODMAN.prefix}-",
            stop_timeout=2.0,
            resync_interval=None,
            restart_backoff=Backoff(initial=0.5, maximum=4.0, factor=2.0, jitter=0.0),
            stable_after=30.0,
        )
        self.services.startService()
        self.apps.startService()

    def stop(self) -> None:
        if self.apps is not None:
            wait(self.apps.stopService())
        if self.services is not None:
            wait(self.services.stopService())

    def lock(self, state: LockState) -> None:
        self.bus.publish(LockStateChanged(state=state), source="persistence")

    def run(self, command: Any) -> Any:
        return wait(self.dispatcher.dispatch(command, CommandContext(subject="admin")), 120.0)

    def public_port(self) -> int | None:
        assert self.services is not None
        for route in self.services.routes():
            if route.app == "blog" and route.mode == "local":
                return route.public_port
        return None


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PodmanEndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        assert PODMAN is not None
        self.podman = PODMAN
        self.node = Node(PODMAN.root / "node")
        self.node.lock(LockState.UNLOCKED)
        self.node.start()
        self.addCleanup(self.node.runtime.close)
        self.addCleanup(self.node.stop)

    def containers(self) -> list[dict[str, Any]]:
        return self.podman.containers(f"piccolod.instance={self.podman.prefix}")

    def state(self) -> str | None:
        assert self.node.apps is not None
        status = self.node.apps.status("blog")
        return None if status is None else status.state

    def test_app_lifecycle_on_podman(self) -> None:
        """Install, lock, unlock, kill, restart, follow and lead, on real podman and proxies."""
        node = self.node
        node.run(InstallApp(spec=APP.format(image=self.podman.image)))
        port = poll(node.public_port, "the app's route")
        code, first = poll(lambda: _ok(get(port, "/stamp")), "the app through its proxy")
        self.assertEqual(code, 200)
        self.assertTrue(first.strip())
        volume = node.store.volumes_root / "app-blog-data" / "stamp"  # type: ignore[operator]
        self.assertEqual(volume.read_bytes(), first)

        # lock: every app stopped, every proxy closed
        node.lock(LockState.LOCKED)
        poll(lambda: self.state() == "locked", "the app to be locked")
        self.assertIsNone(node.public_port())
        self.assertRaises(ConnectionRefusedError, get, port, "/stamp")
        self.assertEqual([c["State"] for c in self.containers()], ["exited"])

        # unlock: reachable again on the same port, data intact
        node.lock(LockState.UNLOCKED)
        poll(lambda: node.public_port() == port, "the route on the same port")
        code, again = poll(lambda: _ok(get(port, "/stamp")), "the app after unlock")
        self.assertEqual(again, first)
        before = self.containers()
        self.assertEqual(len(before), 1)

        # killed from outside: back within the backoff
        killed_at = time.monotonic()
        self.podman.kill(str(before[0]["Id"]))
        poll(lambda: self.state() != "running", "the app to notice the kill", 10.0)
        poll(lambda: _ok(get(port, "/stamp")), "the app after the kill", 15.0)
        self.assertLess(time.monotonic() - killed_at, 10.0)
        assert node.apps is not None
        self.assertEqual(node.apps.status("blog").restarts, 1)  # type: ignore[union-attr]

        # restart of the apps and services services: adopted, same port, no duplicate
        node.stop()
        node.start()
        poll(lambda: self.state() == "running", "the app after a restart")
        poll(lambda: node.public_port() == port, "the same public port after a restart")
        after = self.containers()
        self.assertEqual([c["Id"] for c in after], [before[0]["Id"]])
        self.assertEqual(get(port, "/stamp"), (200, first))

        # follower: stopped, routed to the leader; leader: restored
        node.registry.update("app:blog", Role.FOLLOWER, 10, "node-b", "http://127.0.0.2:8080")
        poll(lambda: self.state() == "standby", "standby as a follower")
        assert node.services is not None
        modes = [(r.mode, r.target_host) for r in node.services.routes()]
        self.assertEqual(modes, [("leader", "127.0.0.2")])
        poll(lambda: [c["State"] for c in self.containers()] == ["exited"], "container stopped")
        node.registry.update("app:blog", Role.LEADER, 11, NODE, "http://127.0.0.1:1")
        poll(lambda: _ok(get(port, "/stamp")), "the app as leader again")

        node.run(RemoveApp(app="blog", purge=True))
        poll(lambda: self.containers() == [], "the container to be removed")
        self.assertFalse(volume.exists())


def _ok(result: tuple[int, bytes]) -> tuple[int, bytes] | None:
    return result if result[0] == 200 else None
