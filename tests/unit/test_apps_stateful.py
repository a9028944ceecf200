"""
The app controller under random sequences of installs, removals, stops,
kills, lock changes, leadership changes and daemon restarts (hypothesis
``RuleBasedStateMachine`` over a clock), with the policy as invariants.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import InstallApp, RemoveApp, StartApp, StopApp
from piccolod.events import LockState, Role
from piccolod.interfaces import ContainerState
from tests.unit.test_apps_support import NODE, Harness, spec

APPS = ("alpha", "beta", "gamma")


class AppsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(volumes=False)
        self.h.start()
        self.locked = False
        self.installed: dict[str, bool] = {}  # app -> enabled
        self.followers: set[str] = set()
        self.term = 10

    def converge(self) -> None:
        self.h.advance(20, step=2.0)

    @rule(app=st.sampled_from(APPS), stateless=st.booleans())
    def install(self, app: str, stateless: bool) -> None:
        if self.locked:
            return
        mode = "stateless_read_only" if stateless else "stateful"
        self.h.run(InstallApp(spec=spec(app, mode=mode)))
        self.installed.setdefault(app, True)

    @rule(app=st.sampled_from(APPS), purge=st.booleans())
    def remove(self, app: str, purge: bool) -> None:
        if self.locked or app not in self.installed:
            return
        self.h.run(RemoveApp(app=app, purge=purge))
        del self.installed[app]

    @rule(app=st.sampled_from(APPS), enabled=st.booleans())
    def toggle(self, app: str, enabled: bool) -> None:
        if self.locked or app not in self.installed:
            return
        self.h.run(StartApp(app=app) if enabled else StopApp(app=app))
        self.installed[app] = enabled

    @rule(app=st.sampled_from(APPS))
    def kill(self, app: str) -> None:
        for container in self.h.containers(app):
            if container.state is ContainerState.RUNNING:
                self.h.runtime.kill(container.id)

    @rule(locked=st.booleans())
    def lock(self, locked: bool) -> None:
        self.locked = locked
        self.h.set_lock(LockState.LOCKED if locked else LockState.UNLOCKED)

    @rule(app=st.sampled_from(APPS), follower=st.booleans())
    def leadership(self, app: str, follower: bool) -> None:
        self.term += 1
        if follower:
            self.h.registry.update(f"app:{app}", Role.FOLLOWER, self.term, "node-b", "http://b:1")
            self.followers.add(app)
        else:
            self.h.registry.update(f"app:{app}", Role.LEADER, self.term, NODE)
            self.followers.discard(app)
        self.h.settle()

    @rule()
    def restart(self) -> None:
        self.h.restart_apps()

    @invariant()
    def at_most_one_container_per_app(self) -> None:
        for app in APPS:
            assert len(self.h.containers(app)) <= 1, self.h.containers(app)

    @invariant()
    def locked_means_nothing_runs_or_is_routed(self) -> None:
        if self.locked:
            self.h.settle()
            running = [c for c in self.h.containers() if c.state is ContainerState.RUNNING]
            assert running == [], running
            assert self.h.services.routes() == []

    @precondition(lambda self: not self.locked)
    @rule()
    def converged_state_matches_policy(self) -> None:
        self.converge()
        for app in APPS:
            containers = self.h.containers(app)
            if app not in self.installed:
                assert containers == [], (app, containers)
                continue
            stateful = self.h.store.apps[app].spec["cluster"]["mode"] == "stateful"
            should_run = self.installed[app] and not (stateful and app in self.followers)
            running = [c for c in containers if c.state is ContainerState.RUNNING]
            assert bool(running) == should_run, (app, containers, self.h.apps.status(app))
            modes = [r.mode for r in self.h.services.routes() if r.app == app]
            if should_run:
                assert modes == ["local"], (app, modes)
            elif stateful and app in self.followers and self.installed[app]:
                assert modes == ["leader"], (app, modes)
            else:
                assert modes == [], (app, modes)

    def teardown(self) -> None:
        self.h.stop()


class AppsStateMachineTests(SynchronousTestCase):
    def test_state_machine(self) -> None:
        """Random operation sequences keep the lock, leadership and uniqueness rules."""
        AppsMachine.TestCase.settings = settings(
            max_examples=40,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        AppsMachine.TestCase("runTest").runTest()
