"""
The contract every ``IContainerRuntime`` honours: the fake and podman pass
this one suite.

:class:`ContainerRuntimeContract` is a mixin: bind it with
``SynchronousTestCase`` and define ``make_runtime()``, ``wait(d)`` (the
Deferred's result), ``wait_failure(d, *types)`` (its exception),
``settle(predicate, what)`` (let events arrive until ``predicate()``),
``kill_from_outside(container_id)`` and the attributes ``image`` (present
locally; its default command keeps running) and ``prefix`` (unique per
run: every container and image it creates starts with it; the binding
removes them afterwards).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred
from zope.interface.interface import Method
from zope.interface.verify import verifyObject

from piccolod.errors import Conflict, InvalidCommand, NotFound
from piccolod.interfaces import (
    ContainerEvent,
    ContainerMount,
    ContainerSpec,
    ContainerState,
    IContainerRuntime,
    PortMapping,
)

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    _Base = SynchronousTestCase
else:
    _Base = object

T = TypeVar("T")


class ContainerRuntimeContract(_Base):
    image: str
    prefix: str
    #: A free loopback port for the port-mapping test.
    host_port: int = 0

    def make_runtime(self) -> Any:
        raise NotImplementedError

    def wait(self, d: Deferred[T]) -> T:
        raise NotImplementedError

    def wait_failure(self, d: Deferred[Any], *types: type[BaseException]) -> BaseException:
        raise NotImplementedError

    def settle(self, predicate: Callable[[], bool], what: str) -> None:
        raise NotImplementedError

    def kill_from_outside(self, container_id: str) -> None:
        raise NotImplementedError

    def setUp(self) -> None:
        super().setUp()
        self.runtime = self.make_runtime()
        self.label = {"piccolod.test": self.prefix}

    def spec(self, name: str, **changes: Any) -> ContainerSpec:
        values: dict[str, Any] = {
            "name": f"{self.prefix}-{name}",
            "image": self.image,
            "labels": {**self.label, "piccolod.app": name},
        }
        values.update(changes)
        return ContainerSpec(**values)

    def create(self, name: str, **changes: Any) -> Any:
        info = self.wait(self.runtime.create(self.spec(name, **changes)))
        self.addCleanup(lambda: self.wait(self.runtime.remove(info.id)))
        return info

    # -- the tests ------------------------------------------------------------

    def test_provides_the_interface(self) -> None:
        """The runtime provides IContainerRuntime with the interface's parameter names."""
        self.assertTrue(verifyObject(IContainerRuntime, self.runtime))
        for name in IContainerRuntime.names(all=True):
            description = IContainerRuntime[name]
            if not isinstance(description, Method):
                continue
            expected = list(description.positional)
            actual = [
                p.name
                for p in inspect.signature(getattr(self.runtime, name)).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            self.assertEqual(actual, expected, name)

    def test_ping(self) -> None:
        """A reachable engine answers a ping."""
        self.assertIsNone(self.wait(self.runtime.ping()))

    def test_image_exists_only_for_local_images(self) -> None:
        """A local image exists; an image never loaded does not (and is never pulled)."""
        self.assertTrue(self.wait(self.runtime.image_exists(self.image)))
        missing = f"localhost/{self.prefix}-missing:1"
        self.assertFalse(self.wait(self.runtime.image_exists(missing)))
        self.assertFalse(self.wait(self.runtime.image_exists(missing)))

    def test_create_with_a_missing_image_fails_and_leaves_nothing(self) -> None:
        """Creating from an image not present locally fails with NotFound; nothing is created."""
        spec = self.spec("noimage", image=f"localhost/{self.prefix}-missing:1")
        self.wait_failure(self.runtime.create(spec), NotFound)
        self.assertEqual(self.wait(self.runtime.list_containers(self.label)), [])

    def test_create_lists_and_inspects(self) -> None:
        """A new container is listed by its labels, not running, and inspectable by id and name."""
        info = self.create("one")
        self.assertEqual(info.name, f"{self.prefix}-one")
        self.assertEqual(info.state, ContainerState.CREATED)
        listed = self.wait(self.runtime.list_containers(self.label))
        self.assertEqual([c.id for c in listed], [info.id])
        self.assertEqual(listed[0].labels["piccolod.app"], "one")
        by_name = self.wait(self.runtime.inspect(info.name))
        by_id = self.wait(self.runtime.inspect(info.id))
        self.assertEqual(by_name.id, info.id)
        self.assertEqual(by_id.name, info.name)
        self.assertEqual(by_id.image, self.image)

    def test_a_taken_name_is_a_conflict(self) -> None:
        """Two containers cannot share a name."""
        self.create("dup")
        self.wait_failure(self.runtime.create(self.spec("dup")), Conflict)
        self.assertEqual(len(self.wait(self.runtime.list_containers(self.label))), 1)

    def test_lifecycle_is_idempotent(self) -> None:
        """start, stop and remove move the state as expected and may be repeated."""
        info = self.create("life")
        self.wait(self.runtime.start(info.id))
        self.assertEqual(self.wait(self.runtime.inspect(info.id)).state, ContainerState.RUNNING)
        self.wait(self.runtime.start(info.id))
        self.assertEqual(self.wait(self.runtime.inspect(info.id)).state, ContainerState.RUNNING)
        self.wait(self.runtime.stop(info.id, 2.0))
        self.assertEqual(self.wait(self.runtime.inspect(info.id)).state, ContainerState.EXITED)
        self.wait(self.runtime.stop(info.id, 2.0))
        self.wait(self.runtime.remove(info.id))
        self.wait(self.runtime.remove(info.id))
        self.assertEqual(self.wait(self.runtime.list_containers(self.label)), [])
        self.wait_failure(self.runtime.inspect(info.id), NotFound)

    def test_remove_stops_a_running_container(self) -> None:
        """Removing a running container stops and removes it."""
        info = self.create("busy")
        self.wait(self.runtime.start(info.id))
        self.wait(self.runtime.remove(info.id))
        self.assertEqual(self.wait(self.runtime.list_containers(self.label)), [])

    def test_missing_containers_are_not_found(self) -> None:
        """inspect, start, stop and logs of an unknown container fail with NotFound."""
        ghost = f"{self.prefix}-ghost"
        for d in (
            self.runtime.inspect(ghost),
            self.runtime.start(ghost),
            self.runtime.stop(ghost, 1.0),
            self.runtime.logs(ghost, 10),
        ):
            self.wait_failure(d, NotFound)

    def test_list_matches_every_label(self) -> None:
        """Listing returns only containers carrying every given label, sorted by name."""
        self.create("b")
        self.create("a")
        both = self.wait(self.runtime.list_containers(self.label))
        self.assertEqual([c.name for c in both], [f"{self.prefix}-a", f"{self.prefix}-b"])
        only = self.wait(self.runtime.list_containers({**self.label, "piccolod.app": "b"}))
        self.assertEqual([c.name for c in only], [f"{self.prefix}-b"])
        none = self.wait(self.runtime.list_containers({**self.label, "piccolod.app": "zzz"}))
        self.assertEqual(none, [])

    def test_port_mappings_and_mounts_are_kept(self) -> None:
        """A container publishes the requested loopback port."""
        ports = (PortMapping(container_port=8080, host_port=self.host_port),)
        info = self.create(
            "ports",
            ports=ports,
            mounts=(ContainerMount(target="/scratch", kind="tmpfs", size=1 << 20),),
        )
        inspected = self.wait(self.runtime.inspect(info.id))
        self.assertIn(
            (8080, self.host_port, "127.0.0.1"),
            [(p.container_port, p.host_port, p.host_ip) for p in inspected.ports],
        )

    def test_events_report_start_and_a_death_from_outside(self) -> None:
        """Watchers see start and die with the labels; a cancelled watcher sees no more."""
        seen: list[ContainerEvent] = []
        cancel = self.runtime.watch(seen.append)
        self.addCleanup(cancel)
        info = self.create("events")
        self.wait(self.runtime.start(info.id))
        self.settle(
            lambda: any(e.action == "start" and e.container_id == info.id for e in seen),
            "a start event",
        )
        started = next(e for e in seen if e.action == "start" and e.container_id == info.id)
        self.assertEqual(started.labels.get("piccolod.app"), "events")
        self.kill_from_outside(info.id)
        self.settle(
            lambda: any(e.action == "die" and e.container_id == info.id for e in seen),
            "a die event",
        )
        self.settle(
            lambda: self.wait(self.runtime.inspect(info.id)).state is ContainerState.EXITED,
            "the killed container to be exited",
        )
        cancel()
        count = len(seen)
        self.wait(self.runtime.start(info.id))
        self.wait(self.runtime.remove(info.id))
        self.assertEqual(len(seen), count)

    def test_logs_are_text(self) -> None:
        """Logs of a container come back as text."""
        info = self.create("logs")
        self.wait(self.runtime.start(info.id))
        self.assertIsInstance(self.wait(self.runtime.logs(info.id, 10)), str)

    def test_build_from_a_local_base(self) -> None:
        """An inline Containerfile builds from a local base image; a missing base fails."""
        tag = f"localhost/{self.prefix}-built:1"
        self.addCleanup(self.forget_image, tag)
        self.wait(
            self.runtime.build_image(
                tag, f"FROM {self.image}\nRUN true\n", {"GREETING": "hello"}, ""
            )
        )
        self.assertTrue(self.wait(self.runtime.image_exists(tag)))
        self.wait_failure(
            self.runtime.build_image(
                f"localhost/{self.prefix}-broken:1",
                f"FROM localhost/{self.prefix}-missing:1\n",
                {},
                "",
            ),
            InvalidCommand,
        )

    def forget_image(self, tag: str) -> None:
        """Remove an image the test built (bindings override)."""
