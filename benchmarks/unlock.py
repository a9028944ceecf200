"""
Unlock latency, split into key derivation, volume secrets, volume attach and
store opening.

Runs the real :class:`PersistenceService` on the real reactor with its real
thread pools, on a fresh state dir in ``--dir`` (default: a temp dir under
the current directory).  The keyset is created once; then each run unlocks
and locks again.  The split comes from the service's preunlock hook, which
is called at each step boundary:

- ``kdf``: from the unlock call to the first step: keyset read, Argon2id,
  AES-GCM unwrap (this is what the Argon2 parameters cost);
- ``volume_keys``: per-volume passphrases loaded (and created on the first
  run);
- ``volumes``: volumes ensured and attached (``--volumes directory``: the
  development adapter; ``none``: no volumes);
- ``store``: SQLCipher open, ``quick_check`` (``--no-check`` skips it),
  migrations;
- ``total``: the whole unlock as the caller sees it.

The store is filled with ``--rows`` settings first, so that ``quick_check``
has something to read.  Also reported: Argon2id alone for each
``--params T,M_KIB,P`` given (default: the shipped 3,65536,1).

    .venv/bin/python benchmarks/unlock.py --json
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
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool

from piccolod.events import Role
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.persistence.keyset import KdfParams, _argon2
from piccolod.persistence.service import PersistenceConfig, PersistenceService

PASSWORD = "benchmark password"


def _argon2_alone(params: KdfParams, runs: int) -> list[float]:
    salt = os.urandom(16)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        _argon2(PASSWORD, salt, params)
        times.append(time.perf_counter() - start)
    return times


def _service(
    reactor: Any, state_dir: Path, params: KdfParams, volumes: str, check: bool
) -> tuple[PersistenceService, dict[str, float]]:
    marks: dict[str, float] = {}

    def hook(step: str) -> None:
        marks[step] = time.perf_counter()

    bus = MemoryEventBus(reactor)
    registry = LeadershipRegistry(bus, "bench")
    registry.update("control-plane", Role.LEADER, 1, leader_id="bench")
    factory = None
    if volumes == "directory":
        from piccolod.persistence.directory import DirectoryVolumes
        from piccolod.persistence.volumes import VolumeManager

        adapter = DirectoryVolumes(reactor, state_dir)

        def factory(secret_for: Any) -> Any:
            return VolumeManager(reactor, state_dir, adapter, bus, secret_for)

    service = PersistenceService(
        reactor,
        state_dir / "persistence",
        bus,
        PersistenceConfig(kdf=params, check_on_unlock=check),
        registry=registry,
        kdf_pool=ThreadPool(minthreads=0, maxthreads=2, name="bench-kdf"),
        store_pool=ThreadPool(minthreads=1, maxthreads=1, name="bench-store"),
        volume_manager_factory=factory,
        preunlock_hook=hook,
        owns_pools=True,
    )
    return service, marks


async def _main(reactor: Any, options: argparse.Namespace) -> None:
    emit: Callable[[dict[str, Any]], None]
    if options.json:

        def emit(row: dict[str, Any]) -> None:
            print(json.dumps(row), flush=True)
    else:

        def emit(row: dict[str, Any]) -> None:
            parts = ", ".join(
                f"{k} {row[k] * 1000:.1f} ms (median {row['median_' + k] * 1000:.1f})"
                for k in ("kdf", "volume_keys", "volumes", "store", "total", "argon2")
                if k in row
            )
            print(f"{row['scenario']:>8} {row['params']}: {parts}", flush=True)

    for spec in options.params:
        t, m, p = (int(x) for x in spec.split(","))
        params = KdfParams(t, m, p)
        times = _argon2_alone(params, options.runs)
        emit(
            {
                "scenario": "argon2",
                "params": spec,
                "argon2": round(min(times), 4),
                "median_argon2": round(statistics.median(times), 4),
                "runs": options.runs,
            }
        )

    t, m, p = (int(x) for x in options.params[0].split(","))
    owned = options.dir is None
    directory = Path(options.dir or tempfile.mkdtemp(prefix=".bench-unlock-", dir="."))
    state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=directory))
    service, marks = _service(
        reactor, state_dir, KdfParams(t, m, p), options.volumes, options.check
    )
    service.startService()
    splits: dict[str, list[float]] = {
        k: [] for k in ("kdf", "volume_keys", "volumes", "store", "total")
    }
    try:
        await service.setup(PASSWORD)
        await service.unlock(password=PASSWORD)
        await service.transaction(
            lambda tx: [
                tx.settings.set(f"row-{i}", {"i": i, "pad": "x" * 200}) for i in range(options.rows)
            ]
        )
        await service.lock()
        for _ in range(options.runs):
            marks.clear()
            start = time.perf_counter()
            await service.unlock(password=PASSWORD)
            end = time.perf_counter()
            splits["kdf"].append(marks["keys"] - start)
            splits["volume_keys"].append(marks["volumes"] - marks["keys"])
            splits["volumes"].append(marks["store"] - marks["volumes"])
            splits["store"].append(marks["ready"] - marks["store"])
            splits["total"].append(end - start)
            await service.lock()
    finally:
        await service.stopService()
        if owned:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
    row: dict[str, Any] = {
        "scenario": "unlock",
        "params": options.params[0],
        "volume_adapter": options.volumes,
        "quick_check": options.check,
        "rows": options.rows,
        "runs": options.runs,
        "python": sys.version.split()[0],
    }
    for key, values in splits.items():
        row[key] = round(min(values), 4)
        row[f"median_{key}"] = round(statistics.median(values), 4)
    emit(row)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--dir", default=None)
    parser.add_argument(
        "--params",
        action="append",
        help="Argon2id time_cost,memory_kib,parallelism (repeatable; the first is used to unlock)",
    )
    parser.add_argument("--volumes", choices=["none", "directory"], default="directory")
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    options = parser.parse_args(argv)
    if not options.params:
        options.params = ["3,65536,1"]
    task.react(lambda reactor: Deferred.fromCoroutine(_main(reactor, options)))


if __name__ == "__main__":
    main()
