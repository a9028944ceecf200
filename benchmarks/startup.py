"""
Start-up time and idle memory of ``twistd -n piccolod`` on its embedded
defaults (a fresh state directory, the API on a free loopback port).

- ``ready_s``: from spawning the process to the first 200 on
  ``/api/v1/health/ready`` (polled every 5 ms; target < 1 s);
- ``idle_rss_mb``: resident memory after ``--idle`` seconds of idling
  (target < 60 MB);
- ``baseline_rss_mb``: for scale, the resident memory of a bare
  ``twistd -n web`` serving a directory in the same interpreter (Twisted,
  its TLS stack and twisted.web, nothing of piccolod).

The daemon's modules are byte-compiled first (``compileall``), as an
installed package is: a process that compiles every module from source at
each start (``PYTHONDONTWRITEBYTECODE=1`` with no ``__pycache__``) starts
slower and keeps more memory.  ``--source`` measures that case instead.

Usage::

    .venv/bin/python benchmarks/startup.py [--runs 5] [--idle 3] [--reactor asyncio]
        [--source] [--json]
"""

from __future__ import annotations

import argparse
import compileall
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TWISTD = str(Path(sys.executable).with_name("twistd"))
ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def once(idle: float, reactor: str | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        cmd = [TWISTD]
        if reactor:
            cmd.append(f"--reactor={reactor}")
        cmd += ["-n", "--pidfile=", "piccolod", "--state-dir", str(state),
                "--listen", "tcp:0:interface=127.0.0.1"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = start + 30
            url = None
            while time.perf_counter() < deadline:
                if url is None:
                    try:
                        url = json.loads((state / "api.json").read_text())["url"]
                    except (OSError, ValueError, KeyError):
                        time.sleep(0.005)
                        continue
                try:
                    with urllib.request.urlopen(url + "/api/v1/health/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError):
                    pass
                time.sleep(0.005)
            else:
                raise RuntimeError("piccolod did not become ready within 30 s")
            ready = time.perf_counter() - start
            time.sleep(idle)
            memory = rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
        if code != 0:
            raise RuntimeError(f"piccolod exited {code}")
        return {"ready_s": ready, "idle_rss_mb": memory}


def baseline(idle: float) -> float:
    """Idle RSS of a bare ``twistd -n web`` on a free loopback port."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [TWISTD, "-n", "--pidfile=", "web", "--listen", "tcp:0:interface=127.0.0.1",
               "--path", tmp]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # "Starting factory" once it listens
                line = proc.stdout.readline()
                if not line or b"Starting factory" in line or b"Site starting" in line:
                    break
            time.sleep(idle)
            return rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--reactor", default=None)
    parser.add_argument("--source", action="store_true", help="do not byte-compile first")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.source:
        for tree in ("piccolod", "twisted/plugins"):
            compileall.compile_dir(str(ROOT / tree), quiet=1)
    runs = [once(args.idle, args.reactor) for _ in range(args.runs)]
    ready = [r["ready_s"] for r in runs]
    rss = [r["idle_rss_mb"] for r in runs]
    result: dict[str, Any] = {
        "scenario": "startup",
        "reactor": args.reactor or "default",
        "runs": args.runs,
        "ready_s_best": round(min(ready), 3),
        "ready_s_median": round(statistics.median(ready), 3),
        "ready_s_max": round(max(ready), 3),
        "idle_rss_mb_median": round(statistics.median(rss), 1),
        "idle_rss_mb_max": round(max(rss), 1),
        "byte_compiled": not args.source,
        "baseline_rss_mb": round(baseline(args.idle), 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:22s} {value}")


if __name__ == "__main__":
    main()
