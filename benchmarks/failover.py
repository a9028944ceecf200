"""
Leadership failover time on loopback: 3 real etcd members and 3
``twistd -n piccolod --use consensus=etcd`` processes.

Each round writes through the ``control-plane`` leader
(``cluster.fenced_put``, acknowledged), kills it with ``SIGKILL`` and
measures the time until a survivor reports itself leader at a greater
term in ``GET /api/v1/leadership`` (polled every 20 ms); then checks that
every acknowledged write is readable through the new leader, restarts the
killed process and waits for it to follow.  Reports min / median / p90 /
max over ``--kills`` rounds, with the TTL and renew deadline used.

Expected: about TTL - (time since the last keepalive) + etcd's lease
expiry check (every 500 ms) + one campaign round.

    .venv/bin/python benchmarks/failover.py --kills 20 [--ttl 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run as a script, benchmarks/ is sys.path[0]: put the repository root there
# instead, so that the tests' etcd cluster helpers import.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from tests.integration.etcd_cluster import (  # noqa: E402
    EtcdCluster,
    PiccolodNode,
    failover_round,
    have_etcd,
    one_leader,
)


def run(kills: int, ttl: int, renew_deadline: float, retry_period: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="piccolod-bench-failover-"))
    etcd = EtcdCluster(root / "etcd", size=3).start()
    nodes = [
        PiccolodNode(
            root,
            f"node-{chr(ord('a') + i)}",
            etcd.endpoints,
            ttl=ttl,
            renew_deadline=renew_deadline,
            retry_period=retry_period,
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_serving()
        one_leader(nodes)
        acked: dict[str, str] = {}
        rounds = [failover_round(nodes, i, acked, deadline=ttl + 2.0) for i in range(kills)]
    finally:
        for node in nodes:
            node.kill()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)
    seconds = sorted(r["seconds"] for r in rounds)
    return {
        "kills": kills,
        "ttl": ttl,
        "renew_deadline": renew_deadline,
        "retry_period": retry_period,
        "min_s": round(seconds[0], 3),
        "median_s": round(statistics.median(seconds), 3),
        "p90_s": round(seconds[min(len(seconds) - 1, int(0.9 * len(seconds)))], 3),
        "max_s": round(seconds[-1], 3),
        "within_ttl_plus_2s": all(s <= ttl + 2.0 for s in seconds),
        "acknowledged_writes_kept": len(acked),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--ttl", type=int, default=2)
    parser.add_argument("--renew-deadline", type=float, default=None)
    parser.add_argument("--retry-period", type=float, default=0.3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not have_etcd():
        sys.exit("etcd is not installed (apt-get install etcd-server etcd-client)")
    renew_deadline = args.renew_deadline if args.renew_deadline is not None else args.ttl * 0.75
    result = run(args.kills, args.ttl, renew_deadline, args.retry_period)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        f"failover over {result['kills']} kills (ttl {result['ttl']} s, renew deadline "
        f"{result['renew_deadline']} s): min {result['min_s']:.2f} s, median "
        f"{result['median_s']:.2f} s, p90 {result['p90_s']:.2f} s, max {result['max_s']:.2f} s"
    )
    print(f"every acknowledged write kept: {result['acknowledged_writes_kept']} writes")


if __name__ == "__main__":
    main()
