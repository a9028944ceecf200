# mypy: disable-error-code="no-untyped-call"
"""
Remote access figures.

Scenarios:

- ``reconcile``: the remote manager's cost per event.  A manager with the
  stub tunnel and N exposed listeners (``--exposures``, default 50 and
  200) sees leadership flips of one app (follower ↔ leader): each one
  recomputes the route table, re-applies the tunnel specs (only the
  changed forward is retargeted) and publishes the changed route.  Runs on
  a ``Clock``; reports microseconds per event, wall and CPU.
- ``ssh`` (needs root, ``/usr/sbin/sshd`` and ``ssh-keygen``): a real
  OpenSSH server on loopback, as in ``tests/integration/test_remote_ssh.py``.
  Reports the time from ``remote.configure`` (key already authorised) to
  every forward active, the latency of small HTTP requests through the
  tunnel and directly (median, p95 over ``--requests``), and the
  throughput of a 5 MB body through the tunnel.

Usage::

    .venv/bin/python benchmarks/tunnel.py [--scenario reconcile|ssh|all] [--json]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory is sys.path[0]; import from the repository
# root instead (the tests' helpers live there).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from twisted.internet.defer import Deferred  # noqa: E402

from piccolod.commands import (  # noqa: E402
    ConfigureRemote,
    RemoteExposure,
    RemoteTunnelConfig,
)
from piccolod.events import Role  # noqa: E402
from piccolod.remote.testing import InlinePool, RemoteHarness, ThreadlessReactor  # noqa: E402


def settle(reactor: Any) -> None:
    for _ in range(10_000):
        now = reactor.seconds()
        if not any(c.getTime() <= now for c in reactor.getDelayedCalls()):
            return
        reactor.advance(0)


def reconcile(exposures: int, events: int) -> dict[str, Any]:
    reactor = ThreadlessReactor()
    h = RemoteHarness.build(reactor, pool=InlinePool())
    h.start()
    h.lead("control-plane")
    for i in range(exposures):
        h.lead(f"app:app{i}")
        h.publish_route(f"app{i}", "web", 30000 + i)
    h.unlock()
    settle(reactor)
    command = ConfigureRemote(
        tunnels=(RemoteTunnelConfig("tunnel.example", "piccolo"),),
        expose=tuple(RemoteExposure(f"app{i}", "web", 10000 + i) for i in range(exposures)),
    )
    d = h.dispatch(command)
    settle(reactor)
    assert d.called
    wall, cpu = time.perf_counter(), time.process_time()
    for n in range(events):
        if n % 2:
            h.lead("app:app0", term=n + 2)
        else:
            h.registry.update("app:app0", Role.FOLLOWER, n + 2, "node-b", "http://10.0.0.2:8080")
        settle(reactor)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    routes = {r["target"]: r for r in h.manager.routes()}
    assert len(routes) == exposures + 1
    stop = Deferred.fromCoroutine(h.stop())
    settle(reactor)
    assert stop.called
    return {
        "scenario": "reconcile",
        "exposures": exposures,
        "events": events,
        "us_per_event": round(wall / events * 1e6, 1),
        "cpu_us_per_event": round(cpu / events * 1e6, 1),
    }


def ssh(requests: int) -> dict[str, Any]:
    import os
    import shutil
    import tempfile

    if os.geteuid() != 0 or not shutil.which("/usr/sbin/sshd"):
        return {"scenario": "ssh", "skipped": "needs root and /usr/sbin/sshd"}
    from tests.integration.test_remote_ssh import Sshd, _ensure_user, free_port

    _ensure_user()
    root = Path(tempfile.mkdtemp(prefix="piccolod-bench-"))
    root.chmod(0o755)
    server = Sshd(root, free_port())
    server.start()
    try:
        from twisted.internet.task import react

        result: dict[str, Any] = {}

        def main(reactor: Any) -> Deferred[None]:
            return Deferred.fromCoroutine(_ssh(reactor, server, requests, result))

        try:
            react(main)
        except SystemExit as e:
            if e.code:
                raise
        return result
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _ssh(reactor: Any, server: Any, requests: int, result: dict[str, Any]) -> None:
    import treq
    from twisted.internet.task import deferLater
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from piccolod.interfaces import Backoff
    from piccolod.remote.keys import device_public_key, generate_device_key
    from piccolod.remote.model import RemoteState
    from piccolod.remote.ssh import SSHTunnelService

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            if request.path == b"/big":
                return b"x" * (5 << 20)
            return b"ok"

    site = reactor.listenTCP(0, Site(Page()), interface="127.0.0.1")
    h = RemoteHarness.build(
        reactor,
        tunnel=lambda health: SSHTunnelService(
            reactor, health, backoff=Backoff(initial=0.1, maximum=0.5)
        ),
        api_address=f"http://127.0.0.1:{site.getHost().port}",
    )
    # The device key is authorised before configure: we time the tunnel, not the admin.
    key = generate_device_key()
    server.authorized.write_text(device_public_key(key) + "\n")
    h.store.record = RemoteState(device_key=key).to_record()
    h.start()
    h.lead("control-plane")
    h.unlock()
    await deferLater(reactor, 0.1, lambda: None)
    started = time.perf_counter()
    await h.dispatch(
        ConfigureRemote(
            tunnels=(RemoteTunnelConfig("127.0.0.1", "piccolotest", port=server.port),),
        )
    )
    port = 0
    while not port:
        for status in h.tunnel.status():
            for forward in status.forwards:
                if forward.state == "active":
                    port = forward.bound_port
        if not port:
            await deferLater(reactor, 0.005, lambda: None)
    result["scenario"] = "ssh"
    result["configure_to_forward_s"] = round(time.perf_counter() - started, 3)

    from twisted.web.client import HTTPConnectionPool

    fresh = HTTPConnectionPool(reactor, persistent=False)

    async def timed(url: str, pool: Any = None) -> float:
        t = time.perf_counter()
        response = await treq.get(url, pool=pool) if pool else await treq.get(url)
        await response.content()
        return time.perf_counter() - t

    # Kept-alive connections (one channel) and a new connection per request
    # (a new forwarded-tcpip channel each time).
    for name, base, pool in (
        ("direct", site.getHost().port, None),
        ("tunnel", port, None),
        ("direct_fresh", site.getHost().port, fresh),
        ("tunnel_fresh", port, fresh),
    ):
        samples = [await timed(f"http://127.0.0.1:{base}/", pool) for _ in range(requests)]
        samples.sort()
        result[f"{name}_ms_median"] = round(statistics.median(samples) * 1e3, 2)
        result[f"{name}_ms_p95"] = round(samples[int(len(samples) * 0.95) - 1] * 1e3, 2)
    t = time.perf_counter()
    response = await treq.get(f"http://127.0.0.1:{port}/big")
    body = await response.content()
    assert len(body) == 5 << 20
    result["tunnel_MB_per_s"] = round(5 / (time.perf_counter() - t), 1)
    await h.stop()
    await site.stopListening()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="all", choices=["reconcile", "ssh", "all"])
    parser.add_argument("--exposures", type=int, nargs="*", default=[50, 200])
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    if args.scenario in ("reconcile", "all"):
        results += [reconcile(n, args.events) for n in args.exposures]
    if args.scenario in ("ssh", "all"):
        results.append(ssh(args.requests))
    for result in results:
        if args.json:
            print(json.dumps(result))
        else:
            print("  ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
