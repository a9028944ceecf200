"""
HTTP throughput of the API under ``wrk`` (64 connections), beside a bare
``twisted.web`` resource that returns the same bytes, in the same run.

Targets, each measured ``--rounds`` times, alternating so that the shared
machine's noise hits all of them alike:

- ``bare-ready``: a bare ``Resource`` answering ``{"status":"ready"}``
  (a twisted.web ``Site`` in its own process, access log off, like the API);
- ``ready``: ``GET /api/v1/health/ready`` of a real ``twistd -n piccolod``
  (public: routing, the guard, the security headers);
- ``bare-leadership``: the bare resource answering the exact bytes the
  daemon answers for ``GET /api/v1/leadership``, sent the same request
  (Authorization header included);
- ``leadership``: ``GET /api/v1/leadership`` with an admin API token
  (authentication, the token's rate quota, a policy decision; nobody
  listens to ``audit``, so, as everywhere in the kernel, no audit record is
  built: the idle appliance's case);
- ``leadership+audit``: the same while an SSE client streams the ``audit``
  topic, so that every decision is built, published, recorded in the
  replay ring and streamed (the case of an open dashboard).

The daemon runs with ``token_rate = 0`` (the quota would otherwise refuse
most of wrk's requests; its bookkeeping still runs).  Reported per target:
requests/s and p99 latency, best and median over the rounds, and each API
target's requests/s as a share of its bare twin (target: >= 70 %).

Usage::

    .venv/bin/python benchmarks/http_api.py [--rounds 3] [--duration 10] [--connections 64]
        [--threads 2] [--json]

Needs ``wrk`` (Debian package ``wrk``).
"""

from __future__ import annotations

import sys

from _bench import http_call, wait_for

# Run as a script, this directory comes first on sys.path and would shadow
# the standard library's ``http`` for our own imports too.
if __name__ == "__main__" and sys.path and sys.path[0] == __import__("os").path.dirname(__file__):
    sys.path.pop(0)

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TWISTD = str(Path(sys.executable).with_name("twistd"))

BARE_SERVER = textwrap.dedent(
    """
    import json, sys
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    bodies = json.loads(sys.argv[1])

    class Fixed(Resource):
        isLeaf = True

        def render_GET(self, request):
            body = bodies.get(request.path.decode(), b"{}")
            if isinstance(body, str):
                body = body.encode()
            request.setHeader(b"content-type", b"application/json")
            return body

    class Quiet(Site):
        def log(self, request):
            pass

    port = reactor.listenTCP(0, Quiet(Fixed()), interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()
    """
)

CONFIG = """
[subsystems.api]
token_rate = 0.0

[subsystems.persistence]
argon2_time_cost = 1
argon2_memory_kib = 1024
"""


def _http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    return http_call(method, url, body, headers, timeout=30.0)


def _wait(check: Any, timeout: float = 30.0) -> Any:
    return wait_for(check, timeout)


def start_daemon(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    (directory / "bench.toml").write_text(CONFIG)
    state = directory / "state"
    proc = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "piccolod",
            "--state-dir",
            str(state),
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--config",
            str(directory / "bench.toml"),
        ],
        stdout=open(directory / "daemon.log", "wb"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )

    def url() -> str | None:
        info = json.loads((state / "api.json").read_text())
        return str(info["url"]) if info.get("pid") == proc.pid else None

    base = _wait(url)
    _wait(lambda: True if _http("GET", base + "/api/v1/health/ready") else None)
    return proc, base


def admin_token(base: str) -> str:
    headers, _ = _http("POST", base + "/api/v1/auth/setup", {"password": "benchmark password"})
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    _, raw = _http("GET", base + "/api/v1/auth/csrf", headers={"Cookie": cookie})
    csrf = json.loads(raw)["csrf_token"]
    _, raw = _http(
        "POST",
        base + "/api/v1/auth/tokens",
        {"name": "bench", "role": "admin"},
        {"Cookie": cookie, "X-CSRF-Token": csrf},
    )
    return str(json.loads(raw)["token"])


def start_bare(bodies: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVER, json.dumps(bodies)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


_LATENCY_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def run_wrk(
    url: str, duration: int, connections: int, threads: int, header: str | None = None
) -> dict[str, float]:
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
    ]
    if header:
        command += ["-H", header]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s|m)\b", output)
    assert p99 is not None, output
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    return {
        "rps": rps,
        "p99_ms": float(p99.group(1)) * _LATENCY_UNITS[p99.group(2)] * 1000,
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": 1.0 if errors else 0.0,
    }


class AuditListener:
    """An SSE client of the ``audit`` topic that reads and discards, in a thread."""

    def __init__(self, base: str, token: str) -> None:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.sendall(
            (
                f"GET /api/v1/events?topics=audit HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        self.received = 0
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            self.received += data.count(b"\nevent: audit\n")

    def close(self) -> None:
        self.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")

    directory = Path(tempfile.mkdtemp(prefix="piccolod-bench-http-"))
    daemon, base = start_daemon(directory)
    bare: subprocess.Popen[str] | None = None
    try:
        token = admin_token(base)
        auth = f"Authorization: Bearer {token}"
        _, ready_body = _http("GET", base + "/api/v1/health/ready")
        _, leadership_body = _http(
            "GET", base + "/api/v1/leadership", headers={"Authorization": f"Bearer {token}"}
        )
        bare, bare_base = start_bare(
            {
                "/api/v1/health/ready": ready_body.decode(),
                "/api/v1/leadership": leadership_body.decode(),
            }
        )
        targets = {
            "bare-ready": (bare_base + "/api/v1/health/ready", None),
            "ready": (base + "/api/v1/health/ready", None),
            # The same request bytes as the API's: the bare twin gets the
            # Authorization header too (and ignores it).
            "bare-leadership": (bare_base + "/api/v1/leadership", auth),
            "leadership": (base + "/api/v1/leadership", auth),
        }
        targets["leadership+audit"] = targets["leadership"]
        results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        streamed = 0
        for _ in range(args.rounds):
            for name, (url, header) in targets.items():
                listener = AuditListener(base, token) if name.endswith("+audit") else None
                try:
                    results[name].append(
                        run_wrk(url, args.duration, args.connections, args.threads, header)
                    )
                finally:
                    if listener is not None:
                        time.sleep(0.5)  # let the stream catch up before counting
                        streamed += listener.received
                        listener.close()
        rss_kb = _rss_kb(daemon.pid)
    finally:
        for proc in (bare, daemon):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        shutil.rmtree(directory, ignore_errors=True)

    summary: dict[str, Any] = {}
    for name, runs in results.items():
        rps = [r["rps"] for r in runs]
        p99 = [r["p99_ms"] for r in runs]
        summary[name] = {
            "rps_best": max(rps),
            "rps_median": statistics.median(rps),
            "p99_ms_best": min(p99),
            "p99_ms_median": statistics.median(p99),
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "socket_errors": sum(r["socket_errors"] for r in runs),
            "rounds": rps,
        }
    for api, twin in (
        ("ready", "bare-ready"),
        ("leadership", "bare-leadership"),
        ("leadership+audit", "bare-leadership"),
    ):
        summary[api]["share_of_bare_best"] = summary[api]["rps_best"] / summary[twin]["rps_best"]
        summary[api]["share_of_bare_median"] = (
            summary[api]["rps_median"] / summary[twin]["rps_median"]
        )
    meta = {
        "connections": args.connections,
        "threads": args.threads,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "daemon_rss_after_kb": rss_kb,
        "audit_records_streamed": streamed,
    }
    if args.json:
        print(json.dumps({"targets": summary, **meta}))
        return
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, {args.rounds} rounds "
        f"(best / median)"
    )
    for name, s in summary.items():
        share = ""
        if "share_of_bare_best" in s:
            share = (
                f"   {s['share_of_bare_best'] * 100:.0f}% / "
                f"{s['share_of_bare_median'] * 100:.0f}% of bare"
            )
        print(
            f"{name:<16} {s['rps_best']:>8.0f} / {s['rps_median']:>8.0f} req/s   "
            f"p99 {s['p99_ms_best']:.1f} / {s['p99_ms_median']:.1f} ms{share}"
        )
    print(f"audit records streamed to the listener: {streamed}")
    print(f"daemon RSS after the run: {rss_kb / 1024:.1f} MiB")


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
