"""
Volume operation latency on the real (default) reactor: the volume part of
unlock latency.

For each adapter setting, ``--runs`` rounds each time, through the
:class:`~piccolod.persistence.volumes.VolumeManager` (journal writes with
fsync included):

- ``ensure``: create a new volume (``gocryptfs -init``, journal);
- ``ensure-again``: ensure an existing one (passphrase checked against
  ``gocryptfs.conf``);
- ``attach``: mount it read-write, until the mount is listed;
- ``detach``: unmount it, until the gocryptfs process has exited.

Settings: ``gocryptfs`` with ``scrypt_logn`` 10 (our default: the
passphrases are random keys) and 16 (gocryptfs' own default), and the
``directory`` adapter for comparison.  Best and median are reported, in
milliseconds.

    .venv/bin/python benchmarks/volumes.py --runs 7
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from piccolod.persistence.directory import DirectoryVolumes
from piccolod.persistence.gocryptfs import GocryptfsVolumes
from piccolod.persistence.volumes import VolumeManager

PASSPHRASE = b"6f1c0e9a4b7d2c3e5f60718293a4b5c6d7e8f90112233445566778899aabbcc"
STEPS = ("ensure", "ensure-again", "attach", "detach")


async def timed(op: Callable[[], Deferred[Any]]) -> float:
    start = time.perf_counter()
    await op()
    return (time.perf_counter() - start) * 1000.0


async def run(reactor: Any, setting: str, runs: int) -> dict[str, dict[str, float]]:
    root = Path(tempfile.mkdtemp(prefix="piccolod-bench-volumes-"))
    adapter: Any
    if setting == "directory":
        adapter = DirectoryVolumes(reactor, root)
    else:
        logn = int(setting.rsplit("=", 1)[1])
        adapter = GocryptfsVolumes(
            reactor,
            root,
            gocryptfs=shutil.which("gocryptfs") or "gocryptfs",
            fusermount=shutil.which("fusermount3") or "fusermount3",
            scrypt_logn=logn,
        )
    adapter.startService()
    manager = VolumeManager(reactor, root, adapter, None, lambda vid: PASSPHRASE)
    samples: dict[str, list[float]] = {step: [] for step in STEPS}
    try:
        for i in range(runs):
            vid = f"bench-{i}"
            samples["ensure"].append(await timed(partial(manager.ensure, vid)))
            samples["ensure-again"].append(await timed(partial(manager.ensure, vid)))
            samples["attach"].append(await timed(partial(manager.attach, vid)))
            samples["detach"].append(await timed(partial(manager.detach, vid)))
    finally:
        await adapter.stopService()
        manager.close()
        shutil.rmtree(root, ignore_errors=True)
    return {
        step: {"best": min(values), "median": statistics.median(values)}
        for step, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = ["directory"]
    if shutil.which("gocryptfs") and Path("/dev/fuse").exists():
        settings += ["gocryptfs scrypt_logn=10", "gocryptfs scrypt_logn=16"]
    else:
        print("gocryptfs or /dev/fuse missing: directory only", file=sys.stderr)

    async def body(reactor: Any) -> None:
        results = {s: await run(reactor, s, args.runs) for s in settings}
        if args.json:
            print(json.dumps(results, indent=1))
            return
        print(f"{'setting':28} {'step':13} {'best ms':>9} {'median ms':>10}")
        for setting, steps in results.items():
            for step, figures in steps.items():
                print(f"{setting:28} {step:13} {figures['best']:9.1f} {figures['median']:10.1f}")

    task.react(lambda reactor: Deferred.fromCoroutine(body(reactor)))


if __name__ == "__main__":
    main()
