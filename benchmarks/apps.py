"""
App controller convergence on the ``fake`` runtime.

The whole apps stack runs for real (commands through the real dispatcher
with every middleware, the in-memory control store, the services
subsystem allocating and persisting ports and opening one proxy per
listener, bus events, health), over the in-memory container runtime and a
memory reactor (proxies "listen" without sockets).  Time is wall clock.

Scenarios:

- ``empty``: N apps are in the control store, storage unlocks, and the
  controller converges from nothing (N containers created and started, N
  port allocations, N routes);
- ``change``: with N apps running, one app's image changes
  (``apps.update``) and that app converges again (stop, remove, create,
  start); the reconciles and runtime calls it took are reported to show
  that the cost does not grow with N.

Usage::

    .venv/bin/python benchmarks/apps.py [--apps N ...] [--repeat R] [--json]

``--json`` prints one JSON object per scenario, size and repeat.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from piccolod.apps.spec import parse_spec  # noqa: E402
from piccolod.commands import StoredApp, UpdateApp  # noqa: E402
from piccolod.events import LockState  # noqa: E402
from tests.unit.test_apps_support import IMAGE, Harness  # noqa: E402


def _fill(harness: Harness, count: int) -> None:
    for i in range(count):
        spec = parse_spec(
            f"name: app{i}\nimage: {IMAGE}\n"
            "listeners:\n  - {name: web, guest_port: 8080, protocol: http}\n"
            "cluster: {mode: stateless_read_only}\n"
        )
        harness.store.apps[spec.name] = StoredApp(
            name=spec.name, spec=dict(spec.document), generation=1
        )


def _converge(harness: Harness) -> None:
    for _ in range(100000):
        harness.clock.advance(0)
        idle = harness.apps.controller.when_idle()
        if idle.called and not harness.clock.getDelayedCalls():
            return
        if idle.called and all(
            c.getTime() > harness.clock.seconds() for c in harness.clock.getDelayedCalls()
        ):
            return
    raise RuntimeError("the controller did not converge")


def empty(count: int) -> dict[str, Any]:
    harness = Harness(volumes=False, track=False, concurrency=64)
    _fill(harness, count)
    harness.start(unlock=False)
    gc.collect()
    started = time.perf_counter()
    cpu = time.process_time()
    harness.set_lock(LockState.UNLOCKED)
    _converge(harness)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu
    running = harness.apps.reconciler.counts["running"]
    assert running == count, f"{running} of {count} running"
    assert len(harness.services.routes()) == count
    return {
        "scenario": "empty",
        "apps": count,
        "seconds": round(seconds, 4),
        "cpu_seconds": round(cpu_seconds, 4),
        "apps_per_s": round(count / seconds, 1),
        "reconciles": harness.apps.controller.stats().reconciles,
        "runtime_calls": len(harness.runtime.calls),
    }


def change(count: int) -> dict[str, Any]:
    harness = Harness(volumes=False, track=False, concurrency=64)
    harness.runtime.add_image("localhost/web:2")
    _fill(harness, count)
    harness.start()
    _converge(harness)
    target = f"app{count // 2}"
    before_reconciles = harness.apps.controller.stats().reconciles
    before_calls = len(harness.runtime.calls)
    before_store = harness.store.writes
    gc.collect()
    started = time.perf_counter()
    harness.run(UpdateApp(app=target, image="localhost/web:2"))
    _converge(harness)
    seconds = time.perf_counter() - started
    [container] = harness.containers(target)
    assert container.image == "localhost/web:2"
    return {
        "scenario": "change",
        "apps": count,
        "seconds": round(seconds, 6),
        "reconciles": harness.apps.controller.stats().reconciles - before_reconciles,
        "runtime_calls": len(harness.runtime.calls) - before_calls,
        "store_writes": harness.store.writes - before_store,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--scenario", choices=["empty", "change"], nargs="+", default=["empty", "change"]
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    for scenario in args.scenario:
        for count in args.apps:
            runs = [(empty if scenario == "empty" else change)(count) for _ in range(args.repeat)]
            if args.json:
                for run in runs:
                    print(json.dumps(run))
                continue
            times = sorted(r["seconds"] for r in runs)
            print(
                f"{scenario:6} apps={count:5}  best {times[0]:.4f}s  "
                f"median {statistics.median(times):.4f}s  "
                f"reconciles {runs[0]['reconciles']}  runtime calls {runs[0]['runtime_calls']}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
