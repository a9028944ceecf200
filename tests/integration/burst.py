"""
A third-party test subsystem that publishes bursts of events on demand:
the command ``test.burst {"count": N, "tag": "..."}`` publishes N
``BurstEvent`` (topic ``test.burst``, ``n`` from 0) in one go.  Loaded into
a real daemon as a drop-in plugin (:func:`install`), like any third-party
variant, for the SSE integration tests and ``benchmarks/sse.py``.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import attrs
from twisted.application.service import Service

from piccolod.commands import Command, CommandContext, Result, non_empty
from piccolod.events import Event

ROOT = Path(__file__).resolve().parents[2]


@attrs.frozen
class BurstEvent(Event):
    topic: ClassVar[str] = "test.burst"
    n: int
    tag: str = ""


@attrs.frozen
class Burst(Command):
    """Publish ``count`` events on ``test.burst``."""

    name: ClassVar[str] = "test.burst"
    audit: ClassVar[bool] = False
    count: int = 1
    tag: str = attrs.field(default="burst", validator=non_empty)


@attrs.frozen
class Burst_(Result):
    published: int


class BurstService(Service):
    def __init__(self, dispatcher: Any, bus: Any) -> None:
        self.dispatcher = dispatcher
        self.bus = bus

    @classmethod
    def from_context(cls, ctx: Any) -> BurstService:
        return cls(ctx.kernel.dispatcher, ctx.kernel.bus)

    def startService(self) -> None:
        super().startService()
        self.dispatcher.register(Burst, self.burst)

    def stopService(self) -> None:
        self.dispatcher.unregister(Burst)
        return super().stopService()  # type: ignore[no-any-return]

    def burst(self, command: Burst, context: CommandContext) -> Burst_:
        publish = self.bus.publish
        for n in range(command.count):
            publish(BurstEvent(n, command.tag), "burst")
        return Burst_(command.count)


def install(directory: Path) -> dict[str, str]:
    """
    Write the drop-in plugin under ``directory``; returns the environment
    (``PYTHONPATH``) a daemon needs to find it.  Select it with
    ``--use burst=test``.
    """
    plugins = directory / "twisted" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "piccolod_testburst.py").write_text(
        textwrap.dedent(
            """
            from piccolod.kernel.plugins import SubsystemPlugin
            burst = SubsystemPlugin(
                slot="burst", variant="test", description="test event bursts",
                factory="tests.integration.burst.BurstService.from_context",
            )
            """
        )
    )
    path = os.pathsep.join([str(directory), str(ROOT)])
    return {"PYTHONPATH": path}
