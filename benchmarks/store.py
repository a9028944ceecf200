"""
Control-store throughput with ``synchronous=FULL``, beside the disk's fsync rate.

Runs on the real reactor with the store's real single-thread pool, on a
fresh store in ``--dir`` (default: a temp dir under the current directory,
so that it is on the same disk as a checkout's state dir; ``/tmp`` may be
a tmpfs).  Scenarios:

- ``fsync``: the physical limit: a loop of ``pwrite(4 KiB) + fdatasync``
  over a preallocated temp file in the same directory (what one commit to
  a reused WAL costs at least: SQLite syncs the WAL with ``fdatasync``);
- ``fsync-append``: ``write(4 KiB) + fsync`` on a growing file (each sync
  also commits the new size: a WAL that grows pays this);
- ``commits``: sequential commits (``settings.set``), each awaited before
  the next: commits/s and per-commit latency (p50, p99);
- ``commits-queued``: ``--inflight`` commits submitted at once and kept
  queued on the store thread (no reactor round trip between them);
- ``reads``: reads (``settings.get``) with nothing else running;
- ``reads-while-committing``: a sequential committer and ``--inflight``
  concurrent readers for ``--seconds``: reads/s and commits/s together
  (they share the store's one thread, so reads wait behind fsyncs).

Each scenario runs ``--runs`` times; the best and the median are reported.

    .venv/bin/python benchmarks/store.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.threadpool import ThreadPool

from piccolod.persistence.keyset import DataKey
from piccolod.persistence.store import ControlStore, store_key

SCENARIOS = [
    "fsync",
    "fsync-append",
    "commits",
    "commits-queued",
    "reads",
    "reads-while-committing",
]


def _fsync_rate(directory: Path, seconds: float, append: bool) -> dict[str, Any]:
    """
    ``write(4 KiB) + sync`` in a loop.  ``append``: the file grows and each
    ``fsync`` also commits its new size (metadata); otherwise 4 KiB blocks
    of a preallocated 4 MiB file are overwritten in turn and synced with
    ``fdatasync``, which is what SQLite does to a reused WAL.
    """
    path = directory / "fsync-probe"
    block = os.urandom(4096)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    slots = 1024
    count = 0
    try:
        if not append:
            os.write(fd, bytes(4096 * slots))
            os.fsync(fd)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            if append:
                os.write(fd, block)
                os.fsync(fd)
            else:
                os.pwrite(fd, block, 4096 * (count % slots))
                os.fdatasync(fd)
            count += 1
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    return {"ops": count, "seconds": elapsed, "rate": count / elapsed}


async def _open(reactor: Any, directory: Path) -> tuple[ControlStore, ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=1, name="bench-store")
    pool.start()
    store = ControlStore(reactor, pool)
    key = store_key(DataKey(os.urandom(32)))
    await store.open(directory / "control.db", key, marker=directory / "marker.json")
    return store, pool


async def _close(store: ControlStore, pool: ThreadPool) -> None:
    await store.close()
    pool.stop()


async def _commits(store: ControlStore, n: int) -> dict[str, Any]:
    latencies = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        await store.settings.set(f"k{i % 100}", {"i": i, "pad": "x" * 100})
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "ops": n,
        "seconds": elapsed,
        "rate": n / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


async def _commits_queued(store: ControlStore, n: int, inflight: int) -> dict[str, Any]:
    start = time.perf_counter()
    done = 0
    while done < n:
        batch = min(inflight, n - done)
        await gatherResults(
            [
                store.settings.set(f"q{(done + j) % 100}", {"i": done + j, "pad": "x" * 100})
                for j in range(batch)
            ]
        )
        done += batch
    elapsed = time.perf_counter() - start
    return {"ops": n, "seconds": elapsed, "rate": n / elapsed}


async def _reads(store: ControlStore, n: int, inflight: int) -> dict[str, Any]:
    for i in range(100):
        await store.settings.set(f"r{i}", {"i": i})
    start = time.perf_counter()
    done = 0
    while done < n:
        batch = min(inflight, n - done)
        await gatherResults([store.settings.get(f"r{(done + j) % 100}") for j in range(batch)])
        done += batch
    elapsed = time.perf_counter() - start
    return {"ops": n, "seconds": elapsed, "rate": n / elapsed}


async def _reads_while_committing(
    store: ControlStore, seconds: float, inflight: int
) -> dict[str, Any]:
    for i in range(100):
        await store.settings.set(f"r{i}", {"i": i})
    stop = time.perf_counter() + seconds
    counts = {"reads": 0, "commits": 0}

    async def committer() -> None:
        i = 0
        while time.perf_counter() < stop:
            await store.settings.set(f"w{i % 100}", {"i": i})
            counts["commits"] += 1
            i += 1

    async def reader(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop:
            await store.settings.get(f"r{i % 100}")
            counts["reads"] += 1
            i += 1

    start = time.perf_counter()
    await gatherResults(
        [
            Deferred.fromCoroutine(committer()),
            *(Deferred.fromCoroutine(reader(j)) for j in range(inflight)),
        ]
    )
    elapsed = time.perf_counter() - start
    return {
        "ops": counts["reads"],
        "seconds": elapsed,
        "rate": counts["reads"] / elapsed,
        "commits": counts["commits"],
        "commit_rate": counts["commits"] / elapsed,
    }


async def _run(reactor: Any, scenario: str, directory: Path, options: Any) -> dict[str, Any]:
    if scenario in ("fsync", "fsync-append"):
        return _fsync_rate(directory, options.seconds, append=scenario == "fsync-append")
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=directory))
    store, pool = await _open(reactor, run_dir)
    try:
        if scenario == "commits":
            return await _commits(store, options.commits)
        if scenario == "commits-queued":
            return await _commits_queued(store, options.commits, options.inflight)
        if scenario == "reads":
            return await _reads(store, options.reads, options.inflight)
        return await _reads_while_committing(store, options.seconds, options.inflight)
    finally:
        await _close(store, pool)
        shutil.rmtree(run_dir, ignore_errors=True)


async def _main(reactor: Any, options: argparse.Namespace) -> None:
    owned = options.dir is None
    directory = Path(options.dir or tempfile.mkdtemp(prefix=".bench-store-", dir="."))
    directory.mkdir(parents=True, exist_ok=True)
    emit: Callable[[dict[str, Any]], None]
    if options.json:

        def emit(row: dict[str, Any]) -> None:
            print(json.dumps(row), flush=True)
    else:

        def emit(row: dict[str, Any]) -> None:
            extra = ""
            if "commit_rate" in row:
                extra = f", commits best {row['commit_rate']:,.0f}/s"
            if "p50_ms" in row:
                extra = f", p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms"
            print(
                f"{row['scenario']:>22}: best {row['rate']:,.0f}/s, "
                f"median {row['median_rate']:,.0f}/s{extra}",
                flush=True,
            )

    try:
        for scenario in options.scenarios:
            runs = [await _run(reactor, scenario, directory, options) for _ in range(options.runs)]
            rates = sorted((r["rate"] for r in runs), reverse=True)
            best = max(runs, key=lambda r: r["rate"])
            row: dict[str, Any] = {
                "scenario": scenario,
                "unit": "syncs" if scenario.startswith("fsync") else "ops",
                "rate": round(rates[0], 1),
                "median_rate": round(statistics.median(rates), 1),
                "runs": options.runs,
                "ops": best["ops"],
                "seconds": round(best["seconds"], 4),
                "synchronous": "FULL",
                "python": sys.version.split()[0],
            }
            for key in ("p50_ms", "p99_ms"):
                if key in best:
                    row[key] = round(best[key], 3)
            if "commit_rate" in best:
                commit_rates = sorted((r["commit_rate"] for r in runs), reverse=True)
                row["commit_rate"] = round(commit_rates[0], 1)
                row["median_commit_rate"] = round(statistics.median(commit_rates), 1)
            emit(row)
    finally:
        if owned:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--dir", default=None, help="where the stores go (same disk as state)")
    parser.add_argument("--commits", type=int, default=500)
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--scenario", dest="scenarios", action="append", choices=SCENARIOS, help="repeatable"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    options = parser.parse_args(argv)
    if not options.scenarios:
        options.scenarios = SCENARIOS
    task.react(lambda reactor: Deferred.fromCoroutine(_main(reactor, options)))


if __name__ == "__main__":
    main()
