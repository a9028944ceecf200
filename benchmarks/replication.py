"""
Replicated commit latency and leader write throughput on loopback: 3 real
etcd members and 3 ``twistd -n piccolod --use consensus=etcd`` processes.

Storage is set up on the ``control-plane`` leader and the two others join
(``POST /api/v1/cluster/join``).  Each follower is followed over SSE
(``GET /api/v1/events?topics=persistence.control_commit``).  Then:

- **latency**: ``--commits`` sequential writes through the leader's API
  (``store.settings.set``); per write, the time from the leader's
  acknowledgement (its HTTP answer) to the moment each follower's stream
  delivers the commit of that revision (the follower has applied it), and
  from the request's start to the same moment (end to end);
- **throughput**: ``--writers`` clients writing as fast as they can for
  ``--seconds``: acknowledged writes per second, and how long the
  followers take to report lag 0 afterwards.

A write is two hops on the leader (the store's transaction, held open
while the sealed entry is appended to the log in etcd in one fenced
transaction, then the local commit); a follower hears the new head from its
etcd watch, reads the entries (``cluster.read_commits``) and applies them.

    .venv/bin/python benchmarks/replication.py [--commits 200] [--writers 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Run as a script, benchmarks/ is sys.path[0]: put the repository root there
# instead, so that the tests' etcd cluster helpers import.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from tests.integration.apiclient import SSEConnection  # noqa: E402
from tests.integration.etcd_cluster import (  # noqa: E402
    FAST_STORAGE,
    EtcdCluster,
    PiccolodNode,
    form_cluster,
    have_etcd,
    replication,
    set_setting,
    start_nodes,
    wait_for,
)


def _revision(data: Any) -> int | None:
    """The ``revision`` of a ``persistence.control_commit`` SSE frame's data."""
    if isinstance(data, dict):
        if data.get("topic") in (None, "persistence.control_commit") and isinstance(
            data.get("revision"), int
        ):
            return int(data["revision"])
        for value in data.values():
            found = _revision(value)
            if found is not None:
                return found
    return None


class Follower:
    """
    A follower's commit stream, read by a thread of its own so that every
    arrival is timed when it happens: when each revision arrived
    (monotonic seconds).
    """

    def __init__(self, node: PiccolodNode) -> None:
        self.node = node
        self.sse = SSEConnection(
            node.address, node.token, query="topics=persistence.control_commit"
        )
        assert self.sse.status == 200, self.sse.status
        self.seen: dict[int, float] = {}
        self._count = 0
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sse], [], [], 0.2)
            if not ready:
                continue
            try:
                if not self.sse.receive():
                    return
            except OSError:
                return
            now = time.monotonic()
            events = self.sse.events("persistence.control_commit")
            with self._changed:
                for frame in events[self._count :]:
                    revision = _revision(frame.get("data"))
                    if revision is not None:
                        self.seen.setdefault(revision, now)
                self._count = len(events)
                self._changed.notify_all()

    def wait(self, revision: int, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        with self._changed:
            while revision not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.node.name} never applied revision {revision}")
                self._changed.wait(left)
            return self.seen[revision]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sse.close()


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    n = len(ordered)
    return {
        "min_ms": round(ordered[0] * 1000, 2),
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(n - 1, int(0.99 * n))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def _head(node: PiccolodNode) -> int:
    value = replication(node)["log_head"]
    return int(value) if value is not None else 0


def run(commits: int, writers: int, seconds: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="piccolod-bench-replication-"))
    etcd = EtcdCluster(root / "etcd", size=3).start()
    nodes: list[PiccolodNode] = []
    try:
        nodes = start_nodes(root, etcd.endpoints, extra=FAST_STORAGE)
        by_name = {n.name: n for n in nodes}
        leader = by_name[form_cluster(nodes)]
        followers = [Follower(n) for n in nodes if n is not leader]
        # Latency: one write at a time; each is the next revision of the log.
        ack_to_applied: list[float] = []
        end_to_end: list[float] = []
        ack: list[float] = []
        revision = _head(leader)
        for i in range(commits):
            start = time.monotonic()
            reply = set_setting(leader, f"lat{i:05d}", i)
            acked = time.monotonic()
            assert reply.status == 200, reply
            revision += 1
            ack.append(acked - start)
            for follower in followers:
                applied = follower.wait(revision)
                ack_to_applied.append(applied - acked)
                end_to_end.append(applied - start)
        # Throughput: several writers as fast as they can.
        done: list[int] = []
        refused: list[int] = []
        stop = time.monotonic() + seconds

        def writer(w: int) -> None:
            i = 0
            while time.monotonic() < stop:
                reply = set_setting(leader, f"tp{w}-{i:06d}", i)
                (done if reply.status == 200 else refused).append(reply.status)
                i += 1

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        began = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - began
        finished = time.monotonic()
        head = _head(leader)
        wait_for(
            lambda: (
                True
                if all(
                    replication(f.node)["applied"] is not None
                    and replication(f.node)["applied"] >= head
                    for f in followers
                )
                else None
            ),
            60.0,
            "followers caught up",
            interval=0.01,
        )
        catch_up = time.monotonic() - finished
        for follower in followers:
            follower.close()
    finally:
        for node in nodes:
            node.kill()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "commits": commits,
        "followers": len(followers),
        "leader_ack": _stats(ack),
        "ack_to_follower_applied": _stats(ack_to_applied),
        "write_to_follower_applied": _stats(end_to_end),
        "throughput": {
            "writers": writers,
            "seconds": round(elapsed, 2),
            "acknowledged": len(done),
            "refused": len(refused),
            "writes_per_s": round(len(done) / elapsed, 1),
            "followers_caught_up_after_s": round(catch_up, 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not have_etcd():
        sys.exit("etcd is not installed (apt-get install etcd-server etcd-client)")
    result = run(args.commits, args.writers, args.seconds)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for name in ("leader_ack", "ack_to_follower_applied", "write_to_follower_applied"):
        s = result[name]
        print(
            f"{name} over {result['commits']} commits x {result['followers']} followers: "
            f"min {s['min_ms']} ms, median {s['median_ms']} ms, p99 {s['p99_ms']} ms, "
            f"max {s['max_ms']} ms"
        )
    t = result["throughput"]
    print(
        f"leader throughput with replication, {t['writers']} writers for {t['seconds']} s: "
        f"{t['writes_per_s']} writes/s ({t['acknowledged']} acknowledged, {t['refused']} "
        f"refused); followers caught up {t['followers_caught_up_after_s']} s after the last"
    )


if __name__ == "__main__":
    main()
