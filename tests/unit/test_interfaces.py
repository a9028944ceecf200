"""
Every implementer of a piccolod interface — real, stub or fake — is checked:
``verifyClass`` on every class that declares ``@implementer`` anywhere in
``piccolod/`` (found by walking the package, so none is forgotten), a
comparison of parameter *names* with the interface (zope only checks arity;
buildbot's ``assertInterfacesImplemented`` idea), and ``verifyObject`` on a
live instance of each kernel part.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from zope.interface import implementedBy
from zope.interface.interface import InterfaceClass, Method
from zope.interface.verify import verifyClass, verifyObject

import piccolod
from piccolod import interfaces as I


def _modules() -> list[Any]:
    found = []
    for info in pkgutil.walk_packages(piccolod.__path__, "piccolod."):
        found.append(importlib.import_module(info.name))
    return found


def _implementers() -> list[tuple[type, InterfaceClass]]:
    pairs: dict[tuple[type, InterfaceClass], None] = {}
    for module in _modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            for iface in implementedBy(cls).declared:
                if iface.__module__.startswith("piccolod"):
                    pairs[(cls, iface)] = None
    return sorted(pairs, key=lambda p: (p[0].__module__, p[0].__name__, p[1].__name__))


IMPLEMENTERS = _implementers()


def test_every_piccolod_interface_has_an_implementer() -> None:
    """Each interface of piccolod.interfaces is implemented somewhere (no dead interfaces)."""
    declared = {iface for _, iface in IMPLEMENTERS}
    interfaces = {
        v for v in vars(I).values() if isinstance(v, InterfaceClass) and v.__module__ == I.__name__
    }
    # Handler protocols are implemented by plain callables, not classes.
    missing = sorted(i.__name__ for i in interfaces - declared - {I.ICommandHandler, I.IReconciler})
    assert missing == []


@pytest.mark.parametrize(
    ("cls", "iface"), IMPLEMENTERS, ids=[f"{c.__name__}-{i.__name__}" for c, i in IMPLEMENTERS]
)
def test_class_implements_interface(cls: type, iface: InterfaceClass) -> None:
    """The class has every method of the interface, with the interface's parameter names."""
    verifyClass(iface, cls)
    for name, description in iface.namesAndDescriptions(all=True):
        if not isinstance(description, Method):
            continue
        implementation = getattr(cls, name)
        if not callable(implementation):
            continue
        try:
            signature = inspect.signature(implementation)
        except (TypeError, ValueError):
            continue
        actual = [
            p.name
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
        ]
        expected = list(description.positional)
        assert actual[: len(expected)] == expected, (
            f"{cls.__name__}.{name}{tuple(actual)} differs from "
            f"{iface.__name__}.{name}{tuple(expected)}"
        )


def _kernel_parts(tmp: Path) -> list[tuple[InterfaceClass, Any]]:
    from piccolod.kernel.bus import MemoryEventBus
    from piccolod.kernel.dispatcher import CommandDispatcher
    from piccolod.kernel.health import HealthTracker
    from piccolod.kernel.jobs import JobRunner
    from piccolod.kernel.leadership import LeadershipRegistry
    from piccolod.kernel.supervisor import Supervisor
    from piccolod.testing.bus import FakeEventBus
    from piccolod.testing.dispatcher import FakeCommandDispatcher

    clock = Clock()
    bus = MemoryEventBus(clock)
    health = HealthTracker(clock, bus)
    return [
        (I.IEventBus, bus),
        (I.ISubscription, bus.subscribe("a.b", lambda e: None)),
        (I.IEventBus, FakeEventBus(clock)),
        (I.IHealth, health),
        (I.ILeadershipRegistry, LeadershipRegistry(bus, "n1")),
        (I.ICommandDispatcher, CommandDispatcher(clock, bus)),
        (I.ICommandDispatcher, FakeCommandDispatcher()),
        (I.ISupervisor, Supervisor(clock, bus, health)),
        (I.IJobRunner, JobRunner(clock, bus)),
    ]


def test_kernel_instances_provide_their_interfaces(tmp_path: Path) -> None:
    """Live kernel parts and their fakes pass verifyObject, attributes included."""
    for iface, obj in _kernel_parts(tmp_path):
        assert verifyObject(iface, obj)


def test_checker_catches_renamed_parameters() -> None:
    """A method whose parameter names differ from the interface's is reported."""
    from zope.interface import Interface, implementer

    class IThing(Interface):
        def do(resource: str) -> None:
            """Do it."""

    @implementer(IThing)
    class Wrong:
        def do(self, thing: str) -> None:
            pass

    with pytest.raises(AssertionError, match="differs"):
        test_class_implements_interface(Wrong, IThing)
