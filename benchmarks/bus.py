"""
Event bus throughput on the real (default) reactor.

Each scenario publishes ``--events`` events and times publish *plus* full
drain (``bus.drain()`` firing), on a fresh ``MemoryEventBus`` per run, with
bounded queues and all counters on.  Every run checks the counters (nothing
dropped, every delivery made) before it is reported.

Scenarios:

- ``fanout``: one topic, ``--subscribers`` trivial synchronous handlers,
  queues bounded at ``--events`` (so nothing is dropped).
- ``fanout-paced``: the same with the default queue bound (1000); the
  publisher yields to the reactor after every ``--burst`` events, as a real
  producer would.
- ``filtered``: one topic, ``--subscribers`` subscriptions whose filter
  rejects every event (reports ``events_per_s`` and ``filtered``).
- ``topics``: ``--topics`` subscribers on as many distinct topics, events
  published round-robin.

The events are built before the timer starts (their construction is the
publisher's cost, not the bus's).  ``--runs`` runs per scenario; the best
and the median are reported.

    .venv/bin/python benchmarks/bus.py --json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred

from piccolod.events import Envelope, Event
from piccolod.interfaces import Overflow
from piccolod.kernel.bus import MemoryEventBus


@attrs.frozen
class Tick(Event):
    """The benchmark's event."""

    topic: ClassVar[str] = "bench.tick"
    n: int


def _sleep0(reactor: Any) -> Deferred[None]:
    return task.deferLater(reactor, 0, lambda: None)


async def _run_one(
    reactor: Any, scenario: str, events: int, subscribers: int, topics: int, burst: int
) -> dict[str, Any]:
    bus = MemoryEventBus(reactor)
    seen = [0]

    def handler(_envelope: Envelope[Any]) -> None:
        seen[0] += 1

    def reject(_envelope: Envelope[Any]) -> bool:
        return False

    payload = [Tick(i) for i in range(events)]
    publish = bus.publish
    topic_names: list[str] = []
    if scenario == "fanout":
        for _ in range(subscribers):
            bus.subscribe("bench.tick", handler, max_queue=events)
    elif scenario == "fanout-paced":
        for _ in range(subscribers):
            bus.subscribe("bench.tick", handler, overflow=Overflow.DROP_NEWEST)
    elif scenario == "filtered":
        for _ in range(subscribers):
            bus.subscribe("bench.tick", handler, filter=reject, max_queue=events)
    elif scenario == "topics":
        topic_names = [f"bench.t{i}" for i in range(topics)]
        for name in topic_names:
            bus.subscribe(name, handler, max_queue=events)
    else:
        raise ValueError(scenario)

    gc.collect()
    start = time.perf_counter()
    if scenario == "topics":
        count = len(topic_names)
        for i, event in enumerate(payload):
            publish(event, topic=topic_names[i % count])
    elif scenario == "fanout-paced":
        for i in range(0, events, burst):
            for event in payload[i : i + burst]:
                publish(event)
            await _sleep0(reactor)
    else:
        for event in payload:
            publish(event)
    await bus.drain()
    seconds = time.perf_counter() - start

    stats = bus.stats()
    expected = {
        "fanout": events * subscribers,
        "fanout-paced": events * subscribers,
        "filtered": 0,
        "topics": events,
    }[scenario]
    if seen[0] != expected or stats["delivered"] != expected or stats["dropped"]:
        raise AssertionError(f"{scenario}: delivered {seen[0]}/{expected}, stats {stats!r}")
    filtered = sum(s.filtered for s in stats["subscriptions"])
    await bus.stop()
    return {
        "seconds": seconds,
        "deliveries": seen[0],
        "filtered": filtered,
        "subscribers": topics if scenario == "topics" else subscribers,
    }


async def _main(reactor: Any, options: argparse.Namespace) -> None:
    emit: Callable[[dict[str, Any]], None]
    if options.json:

        def emit(row: dict[str, Any]) -> None:
            print(json.dumps(row), flush=True)
    else:

        def emit(row: dict[str, Any]) -> None:
            rate = row.get("deliveries_per_s") or row["events_per_s"]
            print(
                f"{row['scenario']:>13}: {row['events']} events x {row['subscribers']} subs: "
                f"best {row['seconds']:.3f}s, median {row['median_seconds']:.3f}s, "
                f"{rate:,.0f}/s best ({'deliveries' if row['deliveries'] else 'events'})",
                flush=True,
            )

    for scenario in options.scenarios:
        runs = []
        for _ in range(options.runs):
            runs.append(
                await _run_one(
                    reactor,
                    scenario,
                    options.events,
                    options.subscribers,
                    options.topics,
                    options.burst,
                )
            )
            await _sleep0(reactor)
        times = sorted(run["seconds"] for run in runs)
        best, median = times[0], statistics.median(times)
        last = runs[-1]
        emit(
            {
                "scenario": scenario,
                "events": options.events,
                "subscribers": last["subscribers"],
                "deliveries": last["deliveries"],
                "filtered": last["filtered"],
                "runs": options.runs,
                "seconds": round(best, 6),
                "median_seconds": round(median, 6),
                "deliveries_per_s": round(last["deliveries"] / best),
                "median_deliveries_per_s": round(last["deliveries"] / median),
                "events_per_s": round(options.events / best),
                "median_events_per_s": round(options.events / median),
                "python": sys.version.split()[0],
                "reactor": type(reactor).__name__,
            }
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--topics", type=int, default=1000, help="for the 'topics' scenario")
    parser.add_argument("--burst", type=int, default=500, help="for 'fanout-paced'")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--scenario",
        dest="scenarios",
        action="append",
        choices=["fanout", "fanout-paced", "filtered", "topics"],
        help="repeatable; default: all",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    options = parser.parse_args(argv)
    if not options.scenarios:
        options.scenarios = ["fanout", "fanout-paced", "filtered", "topics"]
    task.react(lambda reactor: Deferred.fromCoroutine(_main(reactor, options)))


if __name__ == "__main__":
    main()
