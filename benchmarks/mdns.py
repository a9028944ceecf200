"""
mDNS responder figures, on the real (default) reactor and loopback only.

Scenarios:

- ``protocol``: queries answered per second by ``MdnsProtocol`` alone
  (``datagramReceived`` -> decode -> lookup -> encode -> ``transport.write``
  on a fake transport): the CPU cost of one answer, no sockets.
- ``loopback``: queries answered per second over real sockets.  The
  responder runs in this process on 127.0.0.1 (rate limit off); a client
  subprocess multicasts legacy queries (from an ephemeral port, so every
  answer is an immediate unicast reply) with ``--window`` queries in flight
  for ``--seconds`` and counts the answers.
- ``publish``: time from publishing a ``RoutePublished`` on the bus to a
  python-zeroconf ``ServiceBrowser`` (another implementation, in its own
  thread) reporting the new service; ``--apps`` services, one after the
  other.  Dominated by RFC 6762 probing: a random 0-250 ms wait and three
  probes 250 ms apart come before the first announcement.

``--runs`` runs of ``protocol`` and ``loopback``; the best and the median
are reported.

    .venv/bin/python benchmarks/mdns.py --json
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import task, threads
from twisted.internet.defer import Deferred
from twisted.internet.testing import FakeDatagramTransport
from twisted.names import dns

from piccolod.events import RoutePublished
from piccolod.kernel.bus import MemoryEventBus
from piccolod.mdns.protocol import MdnsProtocol, Responder
from piccolod.mdns.records import ServiceSpec
from piccolod.mdns.service import MdnsConfig, MulticastResponderService
from piccolod.mdns.testing import query

HOST = b"piccolo.local"
HTTP = b"_http._tcp.local"
LEGACY = ("127.0.0.9", 40000)


def _queries(n: int) -> list[bytes]:
    """Alternating A and PTR legacy queries with varying ids."""
    return [
        query((HOST, dns.A), message_id=i % 65536)
        if i % 2 == 0
        else query((HTTP, dns.PTR), message_id=i % 65536)
        for i in range(n)
    ]


def _protocol_run(count: int) -> float:
    clock = task.Clock()
    responder = Responder(clock=clock, hostname="piccolo", rand=lambda: 0.5)
    proto = MdnsProtocol(responder=responder, address="127.0.0.1", clock=clock, rate=0)
    transport = FakeDatagramTransport()
    proto.makeConnection(transport)
    responder.add_interface(proto)
    responder.publish(ServiceSpec.portal("piccolo", 8080))
    responder.publish(ServiceSpec("app/web", "app-web", "_http._tcp", 9000))
    responder.start()
    for _ in range(40):
        clock.advance(0.25)
    transport.written.clear()
    packets = _queries(count)
    receive = proto.datagramReceived
    start = time.perf_counter()
    for packet in packets:
        receive(packet, LEGACY)
    seconds = time.perf_counter() - start
    if len(transport.written) != count:
        raise AssertionError(f"answered {len(transport.written)} of {count}")
    return seconds


def client(seconds: float, window: int) -> None:
    """The loopback client (run as a subprocess): prints one JSON object."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    s.bind(("127.0.0.1", 0))
    s.settimeout(0.2)
    packets = _queries(1024)
    group = ("224.0.0.251", 5353)
    sent = answered = timeouts = 0

    def send() -> None:
        nonlocal sent
        s.sendto(packets[sent % len(packets)], group)
        sent += 1

    start = time.perf_counter()
    deadline = start + seconds
    for _ in range(window):
        send()
    while time.perf_counter() < deadline:
        try:
            s.recv(9000)
        except TimeoutError:
            timeouts += 1
            for _ in range(window):
                send()
            continue
        answered += 1
        send()
    elapsed = time.perf_counter() - start
    print(
        json.dumps({"answered": answered, "sent": sent, "timeouts": timeouts, "seconds": elapsed})
    )


async def _wait(reactor: Any, check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.perf_counter() + timeout
    while not check():
        if time.perf_counter() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.005, lambda: None)


def _service(reactor: Any, bus: MemoryEventBus | None = None) -> MulticastResponderService:
    return MulticastResponderService(
        reactor=reactor,
        config=MdnsConfig.from_section({"interfaces": ["127.0.0.1"], "rate_limit_per_s": 0}),
        bus=bus,
        portal_port=8080,
    )


async def _loopback_run(reactor: Any, seconds: float, window: int) -> dict[str, Any]:
    service = _service(reactor)
    service.startService()
    try:
        await _wait(reactor, service.host_name, 10, "the host name to be claimed")
        result = await threads.deferToThread(
            subprocess.run,
            [sys.executable, __file__, "--client", str(seconds), str(window)],
            capture_output=True,
            check=True,
        )
        row: dict[str, Any] = json.loads(result.stdout)
        return row
    finally:
        await service.stopService()


class _Browser:
    def __init__(self) -> None:
        from zeroconf import IPVersion, ServiceBrowser, Zeroconf

        self.zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        self.added: dict[str, float] = {}
        self.lock = threading.Lock()
        self.browser = ServiceBrowser(self.zc, "_http._tcp.local.", handlers=[self._changed])

    def _changed(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change.name == "Added":
            with self.lock:
                self.added.setdefault(name, time.perf_counter())

    def seen(self, name: str) -> float | None:
        with self.lock:
            return self.added.get(name)

    def close(self) -> None:
        self.browser.cancel()
        self.zc.close()


async def _publish_run(reactor: Any, apps: int) -> list[float]:
    bus = MemoryEventBus(reactor)
    service = _service(reactor, bus)
    service.startService()
    browser: _Browser = await threads.deferToThread(_Browser)
    latencies: list[float] = []
    try:
        await _wait(reactor, lambda: browser.seen("piccolo._http._tcp.local."), 15, "the portal")
        for i in range(apps):
            name = f"bench{i}-web._http._tcp.local."
            start = time.perf_counter()
            bus.publish(RoutePublished(app=f"bench{i}", listener="web", port=10000 + i))
            await _wait(reactor, lambda n=name: browser.seen(n), 15, name)  # type: ignore[misc]
            seen = browser.seen(name)
            assert seen is not None
            latencies.append(seen - start)
    finally:
        await service.stopService()
        await threads.deferToThread(browser.close)
    return latencies


async def _main(reactor: Any, options: argparse.Namespace) -> None:
    emit: Callable[[dict[str, Any]], None]
    if options.json:

        def emit(row: dict[str, Any]) -> None:
            print(json.dumps(row), flush=True)
    else:

        def emit(row: dict[str, Any]) -> None:
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    common = {"python": sys.version.split()[0], "reactor": type(reactor).__name__}
    if "protocol" in options.scenarios:
        rates = sorted(
            (options.queries / _protocol_run(options.queries) for _ in range(options.runs)),
            reverse=True,
        )
        emit(
            {
                "scenario": "protocol",
                "queries": options.queries,
                "runs": options.runs,
                "queries_per_s": round(rates[0]),
                "median_queries_per_s": round(statistics.median(rates)),
                "us_per_query": round(1e6 / rates[0], 1),
                **common,
            }
        )
    if "loopback" in options.scenarios:
        rows = []
        for _ in range(options.runs):
            rows.append(await _loopback_run(reactor, options.seconds, options.window))
        rates = sorted((r["answered"] / r["seconds"] for r in rows), reverse=True)
        emit(
            {
                "scenario": "loopback",
                "seconds": options.seconds,
                "window": options.window,
                "runs": options.runs,
                "queries_per_s": round(rates[0]),
                "median_queries_per_s": round(statistics.median(rates)),
                "timeouts": sum(r["timeouts"] for r in rows),
                **common,
            }
        )
    if "publish" in options.scenarios:
        latencies = sorted(await _publish_run(reactor, options.apps))
        emit(
            {
                "scenario": "publish",
                "apps": options.apps,
                "best_s": round(latencies[0], 3),
                "median_s": round(statistics.median(latencies), 3),
                "max_s": round(latencies[-1], 3),
                **common,
            }
        )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        client(float(argv[1]), int(argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--queries", type=int, default=20_000, help="for 'protocol'")
    parser.add_argument("--seconds", type=float, default=3.0, help="for 'loopback'")
    parser.add_argument("--window", type=int, default=16, help="queries in flight ('loopback')")
    parser.add_argument("--apps", type=int, default=5, help="for 'publish'")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--scenario",
        dest="scenarios",
        action="append",
        choices=["protocol", "loopback", "publish"],
        help="repeatable; default: all",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    options = parser.parse_args(argv)
    if not options.scenarios:
        options.scenarios = ["protocol", "loopback", "publish"]
    task.react(lambda reactor: Deferred.fromCoroutine(_main(reactor, options)))


if __name__ == "__main__":
    main()
