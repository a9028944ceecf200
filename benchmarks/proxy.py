"""
Proxy throughput and added latency on loopback, against a direct
connection.

The proxies (``TCPProxyFactory`` and ``HTTPProxyFactory``, as the services
subsystem runs them) listen on 127.0.0.1 in this process on the real
reactor.  The backend (a minimal keep-alive HTTP/1.1 server) and the
client run in **separate processes**, so that only the proxy competes with
nothing in this one.  For each path (``direct``, ``tcp`` proxy, ``http``
proxy) the client measures:

- ``mb_per_s``: a ``--size`` MiB response body read over one connection;
- ``keepalive_us``: median and p99 round trip of small requests, one after
  another on one keep-alive connection;
- ``connect_us``: median round trip of a new connection per request.

Added latency is the difference to ``direct``.  Only loopback is used.

Usage::

    .venv/bin/python benchmarks/proxy.py [--size MiB] [--requests N] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.internet.threads import deferToThread

from piccolod.services.proxy import HTTPProxyFactory, TCPProxyFactory

BACKEND = textwrap.dedent(
    """
    import socket, sys, threading
    size = int(sys.argv[1])
    big = b"x" * size
    small = b"ok"
    def serve(conn):
        buf = b""
        with conn:
            while True:
                while b"\\r\\n\\r\\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\\r\\n\\r\\n")
                body = big if head.startswith(b"GET /big") else small
                conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body))
                conn.sendall(body)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    print(s.getsockname()[1], flush=True)
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    """
)

CLIENT = textwrap.dedent(
    """
    import json, socket, statistics, sys, time
    port, size, requests = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    def read_response(s, buf):
        while b"\\r\\n\\r\\n" not in buf:
            buf += s.recv(65536)
        head, _, buf = buf.partition(b"\\r\\n\\r\\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\\r\\n")[0])
        got = len(buf)
        chunk = bytearray(1 << 20)
        while got < length:
            n = s.recv_into(chunk)
            if not n:
                raise RuntimeError("closed")
            got += n
        return b""
    def connect():
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    s = connect()
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        s.sendall(b"GET /big HTTP/1.1\\r\\nHost: b\\r\\n\\r\\n")
        read_response(s, b"")
        rates.append(size / (time.perf_counter() - t) / (1 << 20))
    rtts = []
    for _ in range(requests):
        t = time.perf_counter()
        s.sendall(b"GET /small HTTP/1.1\\r\\nHost: b\\r\\n\\r\\n")
        read_response(s, b"")
        rtts.append((time.perf_counter() - t) * 1e6)
    s.close()
    connects = []
    for _ in range(max(50, requests // 10)):
        t = time.perf_counter()
        c = connect()
        c.sendall(b"GET /small HTTP/1.1\\r\\nHost: b\\r\\n\\r\\n")
        read_response(c, b"")
        c.close()
        connects.append((time.perf_counter() - t) * 1e6)
    rtts.sort()
    print(json.dumps({
        "mb_per_s": round(max(rates), 1),
        "keepalive_us": round(statistics.median(rtts), 1),
        "keepalive_p99_us": round(rtts[int(len(rtts) * 0.99) - 1], 1),
        "connect_us": round(statistics.median(connects), 1),
    }))
    """
)


def run_client(port: int, size: int, requests: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, str(port), str(size), str(requests)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


async def measure(reactor: Any, size: int, requests: int) -> list[dict[str, Any]]:
    backend = subprocess.Popen(
        [sys.executable, "-c", BACKEND, str(size)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert backend.stdout is not None
        backend_port = int(backend.stdout.readline())
        target = ("127.0.0.1", backend_port)
        ports = {}
        for name, factory_type in (("tcp", TCPProxyFactory), ("http", HTTPProxyFactory)):
            factory = factory_type(reactor, lambda: target)
            listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
            factory.public_port = listening.getHost().port
            ports[name] = listening.getHost().port
        results = []
        for name, port in (
            ("direct", backend_port),
            ("tcp", ports["tcp"]),
            ("http", ports["http"]),
        ):
            figures = await deferToThread(run_client, port, size, requests)
            results.append({"path": name, "size_mib": size >> 20, "requests": requests, **figures})
        direct = results[0]
        for result in results[1:]:
            result["added_keepalive_us"] = round(result["keepalive_us"] - direct["keepalive_us"], 1)
            result["added_connect_us"] = round(result["connect_us"] - direct["connect_us"], 1)
        return results
    finally:
        backend.kill()
        backend.wait()


def main(reactor: Any, argv: list[str]) -> Deferred[None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="MiB per throughput read")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)

    async def go() -> None:
        results = await measure(reactor, args.size << 20, args.requests)
        for result in results:
            if args.json:
                print(json.dumps(result))
            else:
                added = (
                    f"  added {result['added_keepalive_us']:+.0f} us keep-alive, "
                    f"{result['added_connect_us']:+.0f} us per new connection"
                    if "added_keepalive_us" in result
                    else ""
                )
                print(
                    f"{result['path']:6} {result['mb_per_s']:8.1f} MB/s  "
                    f"keep-alive {result['keepalive_us']:.0f} us "
                    f"(p99 {result['keepalive_p99_us']:.0f})  "
                    f"connect+request {result['connect_us']:.0f} us{added}"
                )

    return Deferred.fromCoroutine(go())


if __name__ == "__main__":
    react(main, (sys.argv[1:],))
