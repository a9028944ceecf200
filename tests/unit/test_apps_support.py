"""
A kernel-in-a-box for the apps and services tests: the real bus,
registry, dispatcher, health tracker, the in-memory control store, the
fake container runtime, the real ``ServiceManager`` on a
``MemoryReactorClock`` (its proxies "listen" on the memory reactor) and
the ``AppsService`` under test.  Also used by ``benchmarks/apps.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from piccolod.apps.fake import FakeContainerRuntime
from piccolod.apps.service import AppsService
from piccolod.apps.store import MemoryStore
from piccolod.commands import Command, CommandContext, LeadershipResult, TrackResource
from piccolod.events import LockState, LockStateChanged, Role
from piccolod.interfaces import Backoff
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.services.ports import PortAllocator
from piccolod.services.service import ServiceManager
from piccolod.testing.bus import FakeEventBus

IMAGE = "localhost/web:1"
NODE = "node-a"
LEADER_ADDRESS = "http://192.0.2.9:8080"

SPEC = """
name: web
image: localhost/web:1
listeners:
  - name: http
    guest_port: 8080
    protocol: http
storage:
  persistent:
    data: {container: /data}
"""


def spec(name: str = "web", image: str = IMAGE, extra: str = "", mode: str = "stateful") -> str:
    return (
        f"name: {name}\nimage: {image}\n"
        "listeners:\n  - {name: http, guest_port: 8080, protocol: http}\n"
        f"cluster: {{mode: {mode}}}\n" + extra
    )


class Harness:
    """Everything an ``AppsService`` talks to, driven by one clock."""

    def __init__(
        self, volumes: bool = True, track: bool = True, rand: float = 0.5, **apps: Any
    ) -> None:
        self.clock = MemoryReactorClock()
        self.bus = FakeEventBus(self.clock)
        self.registry = LeadershipRegistry(self.bus, NODE)
        self.dispatcher = CommandDispatcher(
            self.clock, self.bus, registry=self.registry, log_successes=False
        )
        self.health = HealthTracker(self.clock, self.bus)
        root = Path(tempfile.mkdtemp(prefix="piccolod-apps-")) if volumes else None
        self.volumes_root = root
        self.store = MemoryStore(self.dispatcher, volumes_root=root).register()
        self.runtime = FakeContainerRuntime(self.clock, images={IMAGE})
        self.services = ServiceManager(
            reactor=self.clock,
            bus=self.bus,
            dispatcher=self.dispatcher,
            health=self.health,
            allocator=PortAllocator(self.dispatcher),
            bind="127.0.0.1",
        )
        self.tracked: list[str] = []
        if track:
            self.dispatcher.register(TrackResource, self._track)
        defaults: dict[str, Any] = {
            "instance": "test",
            "resync_interval": None,
            "restart_backoff": Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.0),
            "stable_after": 30.0,
        }
        defaults.update(apps)
        self.apps = AppsService(
            clock=self.clock,
            bus=self.bus,
            dispatcher=self.dispatcher,
            registry=self.registry,
            runtime=self.runtime,
            health=self.health,
            **defaults,
        )
        self.apps.reconciler.rand = lambda: rand
        self.apps.controller.rand = lambda: rand
        self.registry.update("control-plane", Role.LEADER, 1, NODE, "http://127.0.0.1:8080")

    def _track(self, command: TrackResource, context: CommandContext) -> LeadershipResult:
        resource = command.resource_name
        self.tracked.append(resource)
        state = self.registry.state(resource)
        if state.role is Role.UNKNOWN:
            state = self.registry.update(resource, Role.LEADER, state.term + 1, NODE)
        return LeadershipResult(resource=resource, role=state.role.value, term=state.term)

    # -- driving

    def start(self, unlock: bool = True) -> None:
        self.services.startService()
        self.apps.startService()
        if unlock:
            self.set_lock(LockState.UNLOCKED)
        self.settle()

    def stop(self) -> None:
        self.apps.stopService()
        self.services.stopService()
        self.settle()

    def restart_apps(self) -> None:
        """A new AppsService over the same runtime and store (a daemon restart)."""
        self.apps.stopService()
        self.settle()
        old = self.apps
        self.apps = AppsService(
            clock=self.clock,
            bus=self.bus,
            dispatcher=self.dispatcher,
            registry=self.registry,
            runtime=self.runtime,
            health=self.health,
            instance=old.instance,
            resync_interval=None,
            restart_backoff=old.restart_backoff,
            stable_after=old.stable_after,
        )
        self.apps.startService()
        self.settle()

    def set_lock(self, state: LockState) -> None:
        self.bus.publish(LockStateChanged(state=state), source="persistence")
        self.settle()

    def settle(self, rounds: int = 50) -> None:
        """Run deliveries and zero-delay calls until nothing more happens now."""
        for _ in range(rounds):
            before = (len(self.bus.published()), len(self.runtime.calls))
            self.clock.advance(0)
            if (len(self.bus.published()), len(self.runtime.calls)) == before and not [
                c for c in self.clock.getDelayedCalls() if c.getTime() <= self.clock.seconds()
            ]:
                return

    def advance(self, seconds: float, step: float = 0.25) -> None:
        remaining = seconds
        while remaining > 1e-9:
            delta = min(step, remaining)
            self.clock.advance(delta)
            self.settle()
            remaining -= delta

    def run(self, command: Command) -> Any:
        """Dispatch and return the result (fails the calling test on an error)."""
        d: Deferred[Any] = self.dispatcher.dispatch(command, CommandContext(subject="admin"))
        self.settle()
        results: list[Any] = []
        d.addBoth(results.append)
        self.settle()
        assert results, f"{command.name} did not finish"
        outcome = results[0]
        if hasattr(outcome, "raiseException"):
            outcome.raiseException()
        return outcome

    def failure(self, command: Command) -> BaseException:
        try:
            self.run(command)
        except BaseException as e:
            return e
        raise AssertionError(f"{command.name} succeeded")

    def containers(self, app: str | None = None) -> list[Any]:
        return [
            c
            for c in self.runtime.containers()
            if app is None or c.labels.get("piccolod.app") == app
        ]

    def state(self, app: str) -> str | None:
        status = self.apps.status(app)
        return None if status is None else status.state

    def public_ports(self) -> dict[str, int]:
        """``app/listener`` → public port of every served route."""
        return {f"{r.app}/{r.listener}": r.public_port for r in self.services.routes()}
