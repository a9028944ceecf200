"""
The apps service and its controller on the fake runtime, the in-memory
control store and the real services subsystem (proxies on a memory
reactor): commands, convergence, lock and leadership policy, adoption,
crash backoff, updates, removal, dependencies, health checks, faults.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import (
    AppLogs,
    GetApp,
    InstallApp,
    ListApps,
    RemoveApp,
    RevertApp,
    StartApp,
    StopApp,
    StoredApp,
    UpdateApp,
    ValidateApp,
)
from piccolod.errors import Conflict, InvalidCommand, Locked, NotFound, NotLeader, Unavailable
from piccolod.events import AppStateChanged, HealthLevel, LockState, Role, RoutePublished
from piccolod.interfaces import ContainerSpec, ContainerState
from tests.unit.test_apps_support import IMAGE, LEADER_ADDRESS, NODE, SPEC, Harness, spec


class AppsTestCase(SynchronousTestCase):
    harness_options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.h = Harness(**self.harness_options)
        self.h.start()
        self.addCleanup(self.h.stop)

    def install(self, text: str = SPEC) -> dict[str, Any]:
        detail: dict[str, Any] = self.h.run(InstallApp(spec=text)).app
        return detail

    def routes(self, app: str = "web") -> list[RoutePublished]:
        return [
            e
            for e in self.h.bus.events(RoutePublished.topic)
            if isinstance(e, RoutePublished) and e.app == app
        ]


class InstallTests(AppsTestCase):
    def test_install_runs_and_routes_the_app(self) -> None:
        """An installed app gets a running container, ports, a volume and a published route."""
        detail = self.install()
        self.assertEqual(detail["generation"], 1)
        [container] = self.h.containers("web")
        self.assertEqual(container.state, ContainerState.RUNNING)
        self.assertEqual(container.name, "piccolod-web")
        self.assertEqual(container.labels["piccolod.instance"], "test")
        status = self.h.apps.status("web")
        assert status is not None
        self.assertEqual(status.state, "running")
        self.assertEqual((status.status.generation, status.status.observed_generation), (1, 1))
        self.assertEqual(status.status.condition("Running").status, "True")  # type: ignore[union-attr]
        self.assertEqual(status.status.condition("Routed").status, "True")  # type: ignore[union-attr]
        ports = status.ports["http"]
        self.assertEqual(container.ports[0].host_port, ports["backend"])
        self.assertEqual(container.ports[0].container_port, 8080)
        [route] = self.routes()
        self.assertEqual(
            (route.port, route.protocol, route.service_type),
            (ports["public"], "http", "_http._tcp"),
        )
        self.assertIn(("mode", "local"), route.txt)
        self.assertEqual(self.h.store.volumes, {"app-web-data": "attached-rw"})
        self.assertIn("app:web", self.h.tracked)
        states = [e.state for e in self.h.bus.events(AppStateChanged.topic)]
        self.assertEqual(states[-1], "running")

    def test_invalid_spec_is_refused_with_every_error(self) -> None:
        """A bad spec fails with InvalidCommand listing all errors; nothing changes."""
        error = self.h.failure(
            InstallApp(spec="name: api\nimage: x\nbuild: {containerfile: y}\nlisteners: []\n")
        )
        assert isinstance(error, InvalidCommand)
        self.assertEqual(len(error.errors), 3)
        self.assertEqual(self.h.store.apps, {})
        self.assertEqual(self.h.containers(), [])

    def test_validate_does_not_store(self) -> None:
        """apps.validate answers the normalised spec and stores nothing."""
        result = self.h.run(ValidateApp(spec=SPEC))
        self.assertEqual(result.app, "web")
        self.assertEqual(result.spec["cluster"], {"mode": "stateful"})
        self.assertEqual(self.h.store.apps, {})

    def test_writes_need_unlocked_storage_and_leadership(self) -> None:
        """apps.install fails with Locked while locked and NotLeader on a control-plane follower."""
        self.h.set_lock(LockState.LOCKED)
        self.assertIsInstance(self.h.failure(InstallApp(spec=SPEC)), Locked)
        self.h.set_lock(LockState.UNLOCKED)
        self.h.registry.update("control-plane", Role.FOLLOWER, 2, "node-b", LEADER_ADDRESS)
        error = self.h.failure(InstallApp(spec=SPEC))
        assert isinstance(error, NotLeader)
        self.assertEqual(error.leader_hint, LEADER_ADDRESS)

    def test_reinstalling_the_same_spec_changes_nothing(self) -> None:
        """Installing an identical spec keeps the generation and the container."""
        self.install()
        [before] = self.h.containers()
        detail = self.install()
        self.assertEqual(detail["generation"], 1)
        self.assertEqual([c.id for c in self.h.containers()], [before.id])
        self.assertEqual(self.h.runtime.count("create"), 1)

    def test_list_get_and_logs(self) -> None:
        """apps.list and apps.get carry the status; apps.logs the container's output."""
        self.install()
        listed = self.h.run(ListApps()).apps
        self.assertEqual([a["name"] for a in listed], ["web"])
        self.assertEqual(listed[0]["status"]["state"], "running")
        self.assertEqual(self.h.run(GetApp(app="web")).app["spec"]["image"], IMAGE)
        self.assertIn("started", self.h.run(AppLogs(app="web", tail=5)).logs)
        self.assertIsInstance(self.h.failure(GetApp(app="nope")), NotFound)


class LockTests(AppsTestCase):
    def test_lock_stops_everything_and_unlock_restores(self) -> None:
        """Locked: containers stopped, proxies closed; unlocked: back on the same ports."""
        self.install()
        self.install(spec("other"))
        ports = self.h.public_ports()
        self.assertEqual(len(ports), 2)
        self.h.set_lock(LockState.LOCKED)
        self.assertEqual({c.state for c in self.h.containers()}, {ContainerState.EXITED})
        self.assertEqual(self.h.services.routes(), [])
        self.assertEqual({self.h.state("web"), self.h.state("other")}, {"locked"})
        withdrawn = [e for e in self.h.bus.events(RoutePublished.topic) if e.withdrawn]  # type: ignore[attr-defined]
        self.assertEqual(len(withdrawn), 2)
        self.h.set_lock(LockState.UNLOCKED)
        self.assertEqual({c.state for c in self.h.containers()}, {ContainerState.RUNNING})
        self.assertEqual(self.h.public_ports(), ports)
        self.assertEqual(self.h.runtime.count("create"), 2)

    def test_starting_locked_runs_nothing(self) -> None:
        """Before any unlock nothing is read from the store and nothing runs."""
        h = Harness()
        h.start(unlock=False)
        self.addCleanup(h.stop)
        self.assertEqual(h.runtime.count("create"), 0)
        self.assertEqual(h.health.component("apps").message, "locked: every app is stopped")


class LeadershipTests(AppsTestCase):
    def test_follower_stops_and_routes_to_the_leader(self) -> None:
        """A follower stops a stateful app and routes to the leader; leader restores."""
        self.install()
        public = self.h.public_ports()["web/http"]
        self.h.registry.update("app:web", Role.FOLLOWER, 5, "node-b", LEADER_ADDRESS)
        self.h.settle()
        [container] = self.h.containers()
        self.assertEqual(container.state, ContainerState.EXITED)
        self.assertEqual(self.h.state("web"), "standby")
        [route] = self.h.services.routes()
        self.assertEqual(
            (route.mode, route.target_host, route.public_port), ("leader", "192.0.2.9", public)
        )
        last = self.routes()[-1]
        self.assertIn(("leader", LEADER_ADDRESS), last.txt)
        self.h.registry.update("app:web", Role.LEADER, 6, NODE)
        self.h.settle()
        self.assertEqual(self.h.containers()[0].state, ContainerState.RUNNING)
        self.assertEqual([r.mode for r in self.h.services.routes()], ["local"])
        self.assertEqual(self.h.containers()[0].id, container.id)

    def test_unknown_role_is_never_leader(self) -> None:
        """With leadership unknown a stateful app stays stopped and unrouted."""
        self.install()
        self.h.registry.update("app:web", Role.UNKNOWN, 5)
        self.h.settle()
        self.assertEqual(self.h.containers()[0].state, ContainerState.EXITED)
        self.assertEqual(self.h.services.routes(), [])
        self.assertEqual(self.h.state("web"), "waiting")

    def test_stateless_apps_run_on_followers(self) -> None:
        """A stateless_read_only app runs whatever this node's role."""
        self.install(spec("reader", mode="stateless_read_only"))
        self.h.registry.update("app:reader", Role.FOLLOWER, 5, "node-b", LEADER_ADDRESS)
        self.h.settle()
        self.assertEqual(self.h.containers("reader")[0].state, ContainerState.RUNNING)
        self.assertNotIn("app:reader", self.h.tracked)


class RestartTests(AppsTestCase):
    def test_a_killed_container_comes_back_after_a_growing_backoff(self) -> None:
        """A container dying from outside is restarted after 1 s, then 2 s; stability resets it."""
        self.install()
        [container] = self.h.containers()
        self.h.runtime.kill(container.id)
        self.h.settle()
        self.assertEqual(self.h.state("web"), "waiting")
        self.h.advance(0.75)
        self.assertEqual(self.h.containers()[0].state, ContainerState.EXITED)
        self.h.advance(0.5)
        self.assertEqual(self.h.containers()[0].state, ContainerState.RUNNING)
        self.h.runtime.kill(container.id)
        self.h.settle()
        self.h.advance(1.5)
        self.assertEqual(self.h.containers()[0].state, ContainerState.EXITED)
        self.h.advance(0.75)
        self.assertEqual(self.h.containers()[0].state, ContainerState.RUNNING)
        status = self.h.apps.status("web")
        assert status is not None
        self.assertEqual(status.restarts, 2)
        self.h.advance(31)
        self.h.runtime.kill(container.id)
        self.h.settle()
        self.h.advance(1.25)
        self.assertEqual(self.h.containers()[0].state, ContainerState.RUNNING)
        self.assertEqual(self.h.runtime.count("create"), 1)

    def test_restart_adopts_containers_without_duplicates(self) -> None:
        """A new apps service adopts running containers: no create, same ids, same ports."""
        self.install()
        self.install(spec("other"))
        ids = sorted(c.id for c in self.h.containers())
        ports = self.h.public_ports()
        self.h.restart_apps()
        self.assertEqual(sorted(c.id for c in self.h.containers()), ids)
        self.assertEqual(self.h.runtime.count("create"), 2)
        self.assertEqual(self.h.public_ports(), ports)
        self.assertEqual(self.h.state("web"), "running")

    def test_duplicates_and_stale_containers_are_removed(self) -> None:
        """Extra containers of an app (stale fingerprint, duplicate) are removed."""
        self.install()
        [kept] = self.h.containers()
        labels = dict(kept.labels)
        stale = self.h.runtime.create(
            ContainerSpec("piccolod-web-old", IMAGE, {**labels, "piccolod.fingerprint": "old"})
        )
        self.successResultOf(stale)
        self.h.restart_apps()
        self.assertEqual([c.id for c in self.h.containers()], [kept.id])

    def test_other_instances_are_left_alone(self) -> None:
        """Containers of another piccolod instance are neither adopted nor removed."""
        foreign = {"piccolod.app": "web", "piccolod.instance": "someone-else"}
        self.successResultOf(self.h.runtime.create(ContainerSpec("theirs", IMAGE, foreign)))
        self.install()
        self.assertEqual(len(self.h.runtime.containers()), 2)


class ChangeTests(AppsTestCase):
    def test_update_recreates_and_revert_goes_back(self) -> None:
        """apps.update swaps the image (new container, generation 2); apps.revert restores it."""
        self.h.runtime.add_image("localhost/web:2")
        self.install()
        [old] = self.h.containers()
        detail = self.h.run(UpdateApp(app="web", image="localhost/web:2")).app
        self.assertEqual(detail["generation"], 2)
        self.h.settle()
        [new] = self.h.containers()
        self.assertNotEqual(new.id, old.id)
        self.assertEqual(new.image, "localhost/web:2")
        status = self.h.apps.status("web")
        assert status is not None
        self.assertEqual(status.status.observed_generation, 2)
        self.h.run(RevertApp(app="web"))
        self.h.settle()
        self.assertEqual(self.h.containers()[0].image, IMAGE)
        self.assertEqual(self.h.public_ports()["web/http"], status.ports["http"]["public"])

    def test_update_checks_its_input(self) -> None:
        """An update with a spec for another app, or a revert with no history, is refused."""
        self.install()
        self.assertIsInstance(
            self.h.failure(UpdateApp(app="web", spec=spec("other"))), InvalidCommand
        )
        self.assertIsInstance(self.h.failure(RevertApp(app="web")), Conflict)
        self.assertRaises(InvalidCommand, UpdateApp, app="web")

    def test_stop_and_start(self) -> None:
        """apps.stop stops and withdraws; apps.start brings it back."""
        self.install()
        self.h.run(StopApp(app="web"))
        self.h.settle()
        self.assertEqual(self.h.containers()[0].state, ContainerState.EXITED)
        self.assertEqual(self.h.state("web"), "stopped")
        self.assertEqual(self.h.services.routes(), [])
        self.h.run(StartApp(app="web"))
        self.h.settle()
        self.assertEqual(self.h.containers()[0].state, ContainerState.RUNNING)

    def test_remove_keeps_data_and_ports_unless_purged(self) -> None:
        """apps.remove drops containers and routes; with purge, the volume and ports go too."""
        self.install()
        ports = self.h.public_ports()
        self.h.run(RemoveApp(app="web"))
        self.h.settle()
        self.assertEqual(self.h.containers(), [])
        self.assertEqual(self.h.services.routes(), [])
        self.assertEqual(self.h.store.volumes, {"app-web-data": "detached"})
        self.assertIn("services.ports.web", self.h.store.settings)
        self.install()
        self.assertEqual(self.h.public_ports(), ports)
        self.h.run(RemoveApp(app="web", purge=True))
        self.h.settle()
        self.assertEqual(self.h.store.volumes, {})
        self.assertNotIn("services.ports.web", self.h.store.settings)
        self.assertIsNone(self.h.apps.status("web"))
        self.assertIsInstance(self.h.failure(RemoveApp(app="web")), NotFound)
        self.flushLoggedErrors()


class FaultTests(AppsTestCase):
    def test_a_missing_image_is_reported_and_retried(self) -> None:
        """Without its image the app is in error (Degraded) and starts once the image appears."""
        self.install(spec("late", image="localhost/late:1"))
        status = self.h.apps.status("late")
        assert status is not None
        self.assertEqual(status.state, "error")
        self.assertIn("not present locally", status.message)
        self.assertEqual(status.status.condition("Degraded").status, "True")  # type: ignore[union-attr]
        self.assertEqual(self.h.health.component("apps").level, HealthLevel.WARN)
        self.h.runtime.add_image("localhost/late:1")
        self.h.advance(2)
        self.assertEqual(self.h.state("late"), "running")
        self.assertEqual(self.h.runtime.count("create"), 1)

    def test_an_unavailable_runtime_is_retried(self) -> None:
        """While the runtime is unreachable the app is in error; it converges once it is back."""
        self.h.runtime.available = False
        self.install()
        self.assertEqual(self.h.state("web"), "error")
        self.h.runtime.available = True
        self.h.advance(2)
        self.assertEqual(self.h.state("web"), "running")

    def test_an_invalid_stored_spec_is_terminal(self) -> None:
        """A stored spec that no longer validates is reported and not retried."""
        self.h.store.apps["bad"] = StoredApp(name="bad", spec={"name": "bad"}, generation=1)
        self.h.apps.reconciler.desired = None
        self.h.apps.controller.enqueue("bad")
        self.h.settle()
        status = self.h.apps.status("bad")
        assert status is not None
        self.assertEqual(status.state, "error")
        before = self.h.apps.controller.stats().reconciles
        self.h.advance(10)
        self.assertEqual(self.h.apps.controller.stats().reconciles, before)

    def test_build_specs_are_built_locally(self) -> None:
        """An app with an inline build gets its image built from a local base, then runs."""
        self.install(
            "name: built\nbuild:\n  containerfile: 'FROM localhost/web:1'\n"
            "listeners: [{name: h, guest_port: 80}]\n"
        )
        self.assertEqual(self.h.state("built"), "running")
        self.assertEqual(self.h.runtime.count("build_image"), 1)


class DependencyTests(AppsTestCase):
    def test_an_app_waits_for_its_dependencies(self) -> None:
        """An app starts only once every app it depends on runs."""
        self.install(spec("front", extra="depends_on: [db]\n"))
        self.assertEqual(self.h.state("front"), "waiting")
        self.assertEqual(self.h.containers("front"), [])
        self.install(spec("db"))
        self.h.settle()
        self.assertEqual(self.h.state("front"), "running")


class HealthcheckTests(SynchronousTestCase):
    def test_failing_healthchecks_restart_the_container(self) -> None:
        """After `retries` failed probes the container is restarted (with the crash backoff)."""
        answers: list[bool] = []
        h = Harness()
        h.apps.reconciler.prober = lambda host, port, path, timeout: (
            succeed(answers.pop(0)) if answers else fail(Unavailable("down"))
        )
        h.start()
        self.addCleanup(h.stop)
        answers.extend([True])
        h.run(
            InstallApp(
                spec=spec(
                    "probed", extra="healthcheck: {http: {path: /h, interval: 5, retries: 2}}\n"
                )
            )
        )
        status = h.apps.status("probed")
        assert status is not None
        self.assertEqual(status.status.condition("Healthy").status, "True")  # type: ignore[union-attr]
        h.advance(5)
        self.assertEqual(h.containers("probed")[0].state, ContainerState.RUNNING)
        h.advance(5)
        stops = h.runtime.count("stop")
        self.assertEqual(stops, 1)
        h.advance(2)
        self.assertEqual(h.containers("probed")[0].state, ContainerState.RUNNING)
