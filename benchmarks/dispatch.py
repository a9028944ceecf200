"""
Commands per second through the command dispatcher, one command awaited
after another, on the real reactor.

Scenarios:

- ``full``: every slot active.  Audit with a ``MemoryEventBus`` attached
  (nothing subscribes to ``audit``, so no ``AuditRecord`` is built; the
  audit middleware still counts and times every command), a no-op policy
  middleware,
  idempotency with a fresh command id per command, the lock gate on a
  command requiring unlocked storage (``UNLOCKED`` retained on the bus), the
  leader gate on a resource this node leads, timeout and retry, down to a
  trivial synchronous handler.  Successes are not logged
  (``log_successes=False``; each log event costs ~3-6 us here).  The
  idempotency table runs at its default cap (10,000 ids), so the steady
  state evicts one id per command, as a long-running daemon would.
- ``full-metrics``: ``full`` plus the ``/metrics`` latency histogram
  (``CommandMetrics`` observing the audit middleware's timing), as the
  daemon runs it.
- ``full-audit-listener``: ``full-metrics`` with a subscriber on ``audit``:
  an ``AuditRecord`` is built, published and delivered per command.
- ``full-logged``: ``full`` with every success logged at debug level.
- ``full-unaudited``: ``full`` with a command class that says ``audit =
  False`` (no ``AuditRecord``; still counted and timed).
- ``bare``: the default chain with no gates in play: no bus, no registry,
  no command id, a command that needs neither unlock nor leadership.
- ``empty``: every slot emptied: the cost of dispatch itself.

Usage::

    .venv/bin/python benchmarks/dispatch.py [--commands N] [--scenario NAME] [--json]

``--json`` prints one JSON object per scenario and line with ``scenario``,
``commands``, ``seconds`` and ``commands_per_s`` (wall clock), plus
``cpu_seconds`` and ``commands_per_cpu_s`` (this process's CPU time, which a
busy shared machine disturbs less).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import react

from piccolod.commands import Command, CommandContext, Result
from piccolod.events import LockState, LockStateChanged, Role
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import SLOTS, ChainedMiddleware, CommandDispatcher, Next
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.kernel.metrics import CommandMetrics

RESOURCE = "control-plane"


@attrs.frozen
class Touch(Command):
    """A gated command: needs unlocked storage and leadership of a resource."""

    name: ClassVar[str] = "bench.touch"
    requires_unlocked: ClassVar[bool] = True
    retries: ClassVar[int] = 2
    n: int = 0

    def leader_resource(self) -> str | None:
        return RESOURCE

    def resource(self) -> str:
        return RESOURCE


@attrs.frozen
class QuietTouch(Touch):
    name: ClassVar[str] = "bench.quiet_touch"
    audit: ClassVar[bool] = False


@attrs.frozen
class Plain(Command):
    """An ungated command."""

    name: ClassVar[str] = "bench.plain"
    n: int = 0


@attrs.frozen
class Ok(Result):
    pass


OK = Ok()


def handler(command: Command, context: CommandContext) -> Ok:
    return OK


@attrs.define(eq=False)
class NoOpPolicy(ChainedMiddleware):
    """Fills the policy slot the way the real ``PolicyEngine`` does (a chained middleware)."""

    def bind(self, next: Next) -> Next:
        def policy(command: Command, context: CommandContext) -> Deferred[Any]:
            return next(command, context)

        return policy


def build(reactor: Any, scenario: str) -> tuple[CommandDispatcher, type[Command], bool]:
    """The dispatcher, the command type and whether to send command ids."""
    if scenario in ("bare", "empty"):
        dispatcher = CommandDispatcher(reactor, log_successes=False)
        dispatcher.register(Plain, handler)
        if scenario == "empty":
            for slot in SLOTS:
                dispatcher.remove_middleware(slot)
        return dispatcher, Plain, False
    bus = MemoryEventBus(reactor)
    bus.publish(LockStateChanged(LockState.UNLOCKED, LockState.PREUNLOCK))
    registry = LeadershipRegistry(bus, "node-bench")
    registry.update(RESOURCE, Role.LEADER, 1)
    dispatcher = CommandDispatcher(
        reactor,
        bus,
        registry=registry,
        log_successes=scenario == "full-logged",
    )
    dispatcher.add_middleware("policy", NoOpPolicy())
    if scenario in ("full-metrics", "full-audit-listener"):
        # As KernelMetrics.build wires it: an observer of the audit timing.
        dispatcher.audit.observers.append(CommandMetrics(reactor).observe)
    if scenario == "full-audit-listener":
        received: list[Any] = []
        bus.subscribe("audit", lambda envelope: received.append(None) or received.clear())
    command_type: type[Command] = QuietTouch if scenario == "full-unaudited" else Touch
    dispatcher.register(command_type, handler)
    return dispatcher, command_type, True


async def run(reactor: Any, scenario: str, commands: int) -> dict[str, Any]:
    dispatcher, command_type, with_ids = build(reactor, scenario)
    dispatch = dispatcher.dispatch
    command = command_type()
    context = CommandContext()
    # Warm up (and check that the chain answers).
    for i in range(min(1000, commands)):
        ctx = CommandContext(command_id=f"warm-{i}") if with_ids else context
        result = await dispatch(command, ctx)
        assert result is OK, result
    gc.collect()
    start, cpu_start = time.perf_counter(), time.process_time()
    if with_ids:
        for i in range(commands):
            await dispatch(command, CommandContext(command_id=f"c-{i}"))
    else:
        for _ in range(commands):
            await dispatch(command, context)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    stats = dispatcher.stats()["commands"].get(command_type.name)
    if stats is not None:  # the "empty" chain has no audit middleware
        assert stats["outcomes"] == {"ok": stats["count"]}, stats
    dispatcher.stop()
    return {
        "scenario": scenario,
        "commands": commands,
        "seconds": round(seconds, 4),
        "commands_per_s": round(commands / seconds),
        "cpu_seconds": round(cpu_seconds, 4),
        "commands_per_cpu_s": round(commands / cpu_seconds),
    }


SCENARIOS = (
    "full",
    "full-metrics",
    "full-audit-listener",
    "full-logged",
    "full-unaudited",
    "bare",
    "empty",
)


def main(reactor: Any, argv: list[str]) -> Deferred[None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=200_000)
    parser.add_argument("--scenario", choices=SCENARIOS, action="append")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)

    async def all_scenarios() -> None:
        for scenario in args.scenario or SCENARIOS:
            figures = await run(reactor, scenario, args.commands)
            if args.json:
                print(json.dumps(figures), flush=True)
            else:
                print(
                    f"{scenario:15s} {figures['commands']:>9d} commands "
                    f"{figures['seconds']:8.3f} s {figures['commands_per_s']:>9d} commands/s "
                    f"({figures['commands_per_cpu_s']:>9d} per CPU second)",
                    flush=True,
                )

    return Deferred.fromCoroutine(all_scenarios())


if __name__ == "__main__":
    react(main, (sys.argv[1:],))
