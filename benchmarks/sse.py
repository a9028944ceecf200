"""
SSE fan-out: events per second delivered by a real ``twistd -n piccolod`` to
100 concurrent ``GET /api/v1/events`` clients.

The daemon runs the drop-in test subsystem of ``tests/integration/burst.py``
(command ``test.burst``: publish N events in one go).  Each round opens the
clients, publishes one burst of ``--events`` events, and times from just
before the command is sent until every client has received every event (the
clients are raw HTTP/1.0 sockets read by one ``selectors`` loop in this
process, which competes for the same two cores, so the figure is a lower
bound).  Reported: events delivered per
second in total (events x clients / seconds) and per client, best and
median over the rounds, and the daemon's RSS after the last round.

Usage::

    .venv/bin/python benchmarks/sse.py [--clients 100] [--events 10000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench import http_call, wait_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration import burst  # noqa: E402

TWISTD = str(Path(sys.executable).with_name("twistd"))
MARKER = b"event: test.burst\n"

CONFIG = """
[subsystems.api]
token_rate = 0.0
sse_max_clients = 1000
sse_queue = 100000

[subsystems.persistence]
argon2_time_cost = 1
argon2_memory_kib = 1024
"""


def _http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    return http_call(method, url, body, headers, timeout=120)


def _wait(check: Any, timeout: float = 30.0) -> Any:
    return wait_for(check, timeout)


class Client:
    """A raw SSE stream over HTTP/1.0 that counts burst events as they come."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.sendall(
            (
                "GET /api/v1/events?topics=test.burst HTTP/1.0\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        self.sock.setblocking(False)
        self.count = 0
        self.tail = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bool:
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        if not data:
            return False
        chunk = self.tail + data
        self.count += chunk.count(MARKER)
        # Keep what could be the start of a marker cut by the chunk boundary.
        self.tail = chunk[-(len(MARKER) - 1) :] if not chunk.endswith(MARKER) else b""
        return True


def one_round(base: str, token: str, clients: int, events: int, tag: str) -> float:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    streams = [Client(host, int(port), token) for _ in range(clients)]
    selector = selectors.DefaultSelector()
    for s in streams:
        selector.register(s, selectors.EVENT_READ)
    time.sleep(0.5)  # every stream subscribed before the burst
    for s in streams:
        s.read()
    started = time.monotonic()
    _http(
        "POST",
        base + "/api/v1/commands/test.burst",
        {"count": events, "tag": tag},
        {"Authorization": f"Bearer {token}"},
    )
    done = 0
    deadline = started + 300
    while done < clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {clients} clients complete")
        for key, _ in selector.select(timeout=1.0):
            stream = key.fileobj
            assert isinstance(stream, Client)
            if not stream.read():
                raise RuntimeError("a stream ended early")
            if stream.count >= events:
                selector.unregister(stream)
                done += 1
    elapsed = time.monotonic() - started
    for s in streams:
        s.sock.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="piccolod-bench-sse-"))
    env = {**os.environ, **burst.install(directory / "drop")}
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
            "--use",
            "burst=test",
        ],
        stdout=open(directory / "daemon.log", "wb"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    try:

        def url() -> str | None:
            info = json.loads((state / "api.json").read_text())
            return str(info["url"]) if info.get("pid") == proc.pid else None

        base = _wait(url)
        _wait(lambda: True if _http("GET", base + "/api/v1/health/ready") else None)
        headers, _ = _http("POST", base + "/api/v1/auth/setup", {"password": "benchmark pw"})
        cookie = headers["Set-Cookie"].split(";", 1)[0]
        _, raw = _http("GET", base + "/api/v1/auth/csrf", headers={"Cookie": cookie})
        _, raw = _http(
            "POST",
            base + "/api/v1/auth/tokens",
            {"name": "bench", "role": "admin"},
            {"Cookie": cookie, "X-CSRF-Token": json.loads(raw)["csrf_token"]},
        )
        token = json.loads(raw)["token"]
        seconds = [
            one_round(base, token, args.clients, args.events, f"r{n}") for n in range(args.rounds)
        ]
        rss_kb = 0
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        shutil.rmtree(directory, ignore_errors=True)

    total = [args.events * args.clients / s for s in seconds]
    result = {
        "clients": args.clients,
        "events": args.events,
        "rounds": args.rounds,
        "seconds": seconds,
        "delivered_per_s_best": max(total),
        "delivered_per_s_median": statistics.median(total),
        "per_client_per_s_median": statistics.median(total) / args.clients,
        "daemon_rss_after_kb": rss_kb,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.clients} clients x {args.events} events, {args.rounds} rounds: "
        f"{max(total):,.0f} / {statistics.median(total):,.0f} events/s delivered (best / median), "
        f"{statistics.median(total) / args.clients:,.0f} per client; "
        f"bursts took {', '.join(f'{s:.2f}' for s in seconds)} s; "
        f"daemon RSS {rss_kb / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
