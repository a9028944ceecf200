"""
Under the asyncio reactor, the kernel runs handlers and subscribers of every
flavour, and ``async def`` handlers can await both Deferreds and asyncio
awaitables (through ``from_asyncio``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from twisted.internet import asyncioreactor
    asyncioreactor.install(asyncio.new_event_loop())
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, succeed
    from twisted.internet.task import deferLater, react
    import attrs
    from piccolod.commands import Command, CommandContext, Ping, Pong
    from piccolod.events import AuditRecord
    from piccolod.kernel.aio import from_asyncio
    from piccolod.kernel.bus import MemoryEventBus
    from piccolod.kernel.dispatcher import CommandDispatcher

    @attrs.frozen
    class Mixed(Command):
        name = "test.mixed"

    async def mixed(command, context):
        a = await deferLater(reactor, 0.01, lambda: "deferred")
        b = await from_asyncio(asyncio.sleep(0.01, result="asyncio"))
        return Pong(a + "+" + b)

    async def main(reactor):
        bus = MemoryEventBus(reactor)
        seen = []
        async def async_subscriber(envelope):
            await from_asyncio(asyncio.sleep(0))
            seen.append(("async", envelope.event.action))
        bus.subscribe("audit", lambda e: seen.append(("plain", e.event.action)))
        bus.subscribe("audit", async_subscriber)
        bus.subscribe("audit", lambda e: succeed(seen.append(("deferred", e.event.action))))
        dispatcher = CommandDispatcher(reactor, bus)
        dispatcher.register(Ping, lambda c, ctx: Pong(c.payload))
        dispatcher.register(Mixed, mixed)
        plain = await dispatcher.dispatch(Ping("sync"))
        both = await dispatcher.dispatch(Mixed())
        await bus.drain()
        print(type(reactor).__name__, plain.payload, both.payload, sorted(seen))

    react(lambda r: Deferred.fromCoroutine(main(r)))
    """
)


def test_handlers_of_every_flavour_under_asyncio() -> None:
    """Sync, Deferred and async def code (awaiting asyncio too) all run on the asyncio reactor."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 3)[:3] == ["AsyncioSelectorReactor", "sync", "deferred+asyncio"]
    assert "('async', 'kernel.ping')" not in result.stdout  # Ping is not audited
    for flavour in ("plain", "async", "deferred"):
        assert f"('{flavour}', 'test.mixed')" in result.stdout, result.stdout
