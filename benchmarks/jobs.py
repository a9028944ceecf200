"""
JobRunner throughput on the real (default) reactor: trivial jobs scheduled
and completed per second.

Each run submits ``--jobs`` jobs of one class to a fresh, started
``JobRunner`` and times submit *plus* completion of every job (each one
reaches ``succeeded``; the run checks the runner's counters before it is
reported).

Scenarios:

- ``sync-limit1``: plain-function bodies, class limit 1.
- ``sync-limit8``: plain-function bodies, class limit 8.
- ``async-limit8``: ``async def`` bodies that return at once, limit 8.
- ``async-yield-limit8``: ``async def`` bodies that wait one reactor turn
  (``deferLater(reactor, 0)``), so every completion frees its slot on a
  later turn, as real I/O would; limit 8.
- ``sync-limit8-bus``: as ``sync-limit8`` with a ``MemoryEventBus`` and one
  ``jobs.#`` subscriber coalescing per job (the cost of progress and
  completion events).

``--runs`` runs per scenario; the best and the median are reported.

    .venv/bin/python benchmarks/jobs.py --json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from piccolod.events import Envelope
from piccolod.interfaces import IJobControl, JobState, Overflow
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.jobs import JobRunner, JobSpec

SCENARIOS = ["sync-limit1", "sync-limit8", "async-limit8", "async-yield-limit8", "sync-limit8-bus"]


def _sleep0(reactor: Any) -> Deferred[None]:
    return task.deferLater(reactor, 0, lambda: None)


async def _run_one(reactor: Any, scenario: str, jobs: int) -> dict[str, Any]:
    limit = 1 if scenario == "sync-limit1" else 8
    bus = MemoryEventBus(reactor) if scenario.endswith("-bus") else None
    delivered = [0]
    if bus is not None:

        def handler(_envelope: Envelope[Any]) -> None:
            delivered[0] += 1

        bus.subscribe("jobs.#", handler, max_queue=10_000, overflow=Overflow.COALESCE)
    runner = JobRunner(reactor, bus, limits={"bench": limit})
    runner.startService()

    def sync_body(control: IJobControl) -> int:
        return control.attempt

    async def async_body(control: IJobControl) -> int:
        return control.attempt

    async def yielding_body(control: IJobControl) -> int:
        await _sleep0(reactor)
        return control.attempt

    body: Callable[[IJobControl], Any] = {
        "async-limit8": async_body,
        "async-yield-limit8": yielding_body,
    }.get(scenario, sync_body)
    specs = [JobSpec("bench", body) for _ in range(jobs)]

    gc.collect()
    start = time.perf_counter()
    submit = runner.submit
    handles = [submit(spec) for spec in specs]
    await handles[-1].result()
    while runner.stats()["classes"]["bench"]["succeeded"] < jobs:
        await _sleep0(reactor)
    seconds = time.perf_counter() - start

    stats = runner.stats()["classes"]["bench"]
    if stats["succeeded"] != jobs or stats["failed"] or stats["cancelled"]:
        raise AssertionError(f"{scenario}: {stats!r}")
    if any(h.state is not JobState.SUCCEEDED for h in handles):
        raise AssertionError(f"{scenario}: not every job succeeded")
    await runner.stopService()
    if bus is not None:
        await bus.drain()
        await bus.stop()
    return {"seconds": seconds, "events_delivered": delivered[0]}


async def _main(reactor: Any, options: argparse.Namespace) -> None:
    for scenario in options.scenarios:
        runs = []
        for _ in range(options.runs):
            runs.append(await _run_one(reactor, scenario, options.jobs))
            await _sleep0(reactor)
        times = sorted(run["seconds"] for run in runs)
        best, median = times[0], statistics.median(times)
        row = {
            "scenario": scenario,
            "jobs": options.jobs,
            "runs": options.runs,
            "seconds": round(best, 6),
            "median_seconds": round(median, 6),
            "jobs_per_s": round(options.jobs / best),
            "median_jobs_per_s": round(options.jobs / median),
            "python": sys.version.split()[0],
            "reactor": type(reactor).__name__,
        }
        if options.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"{scenario:>19}: {options.jobs} jobs: best {best:.3f}s "
                f"({row['jobs_per_s']:,}/s), median {median:.3f}s "
                f"({row['median_jobs_per_s']:,}/s)",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--scenario",
        dest="scenarios",
        action="append",
        choices=SCENARIOS,
        help="repeatable; default: all",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    options = parser.parse_args(argv)
    if not options.scenarios:
        options.scenarios = list(SCENARIOS)
    task.react(lambda reactor: Deferred.fromCoroutine(_main(reactor, options)))


if __name__ == "__main__":
    main()
