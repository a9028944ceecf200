"""
The event stream of a real ``twistd -n piccolod`` over loopback HTTP: a
client that disconnects and resumes with Last-Event-ID gets every event in
between exactly once; 100 concurrent clients each get every event of a
10,000-event burst, in order.  Events come from a drop-in test subsystem
(``tests/integration/burst.py``).
"""

from __future__ import annotations

import re
import selectors
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import burst
from tests.integration.apiclient import APIClient, SSEConnection, write_config
from tests.integration.support import Daemon

pytestmark = pytest.mark.integration

CONFIG = """
[subsystems.api]
token_rate = 0.0
sse_max_clients = 200
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, APIClient]]:
    env = burst.install(tmp_path / "drop")
    config = write_config(tmp_path, CONFIG)
    d = Daemon(tmp_path / "state", ["--config", str(config), "--use", "burst=test"], env=env)
    d.start()
    try:
        d.wait_ready()
        admin = APIClient(d.url)
        admin.setup()
        token, _ = admin.create_token("admin", "sse")
        yield d, APIClient(d.url, token=token)
        assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log(), d.log()
    finally:
        d.kill()


def _burst(client: APIClient, count: int, tag: str) -> None:
    reply = client.post("/api/v1/commands/test.burst", {"count": count, "tag": tag})
    assert reply.status == 200, reply


def test_resume_with_last_event_id_gets_every_missed_event_once(daemon) -> None:  # type: ignore[no-untyped-def]
    """
    Disconnect, miss events, resume with Last-Event-ID: exactly the missed ones, then live ones.
    """
    d, client = daemon
    token = client.token or ""
    first = SSEConnection(d.url, token, "topics=test.burst")
    assert first.status == 200
    _burst(client, 5, "before")
    seen = first.wait_for(5, "test.burst")
    first.close()
    last_id = seen[-1]["id"]

    _burst(client, 7, "missed")
    second = SSEConnection(d.url, token, "topics=test.burst", last_event_id=last_id)
    _burst(client, 3, "live")
    events = second.wait_for(10, "test.burst")
    got = [(e["data"]["event"]["tag"], e["data"]["event"]["n"]) for e in events]
    assert got == [("missed", n) for n in range(7)] + [("live", n) for n in range(3)]
    assert len({e["id"] for e in events}) == 10
    assert not any(f.get("event") == "gap" for f in second.frames())
    second.close()


def test_an_expired_id_is_reported_as_a_gap(daemon) -> None:  # type: ignore[no-untyped-def]
    """An id from before the ring (or a restart) is answered with an explicit gap event."""
    d, client = daemon
    stream = SSEConnection(
        d.url,
        client.token or "",
        "topics=test.burst&follow=false",
        last_event_id="not-an-id-we-know",
    )
    while stream.receive():
        pass
    gaps = [f for f in stream.frames() if f.get("event") == "gap"]
    assert len(gaps) == 1 and gaps[0]["data"]["last_event_id"] == "not-an-id-we-know"


def test_hundred_clients_receive_every_event_of_a_10000_burst(daemon) -> None:  # type: ignore[no-untyped-def]
    """100 concurrent streams each receive all 10,000 events of one burst, in order, once."""
    d, client = daemon
    clients = [SSEConnection(d.url, client.token or "", "topics=test.burst") for _ in range(100)]
    assert all(c.status == 200 for c in clients)
    started = time.monotonic()
    _burst(client, 10_000, "big")
    selector = selectors.DefaultSelector()
    for c in clients:
        c.sock.setblocking(False)
        selector.register(c, selectors.EVENT_READ)
    marker = b"event: test.burst\n"
    done: set[SSEConnection] = set()
    deadline = time.monotonic() + 120
    last_check = 0.0
    while len(done) < len(clients):
        assert time.monotonic() < deadline, f"{len(done)} of 100 clients complete"
        for key, _ in selector.select(timeout=0.5):
            stream = key.fileobj
            assert isinstance(stream, SSEConnection)
            try:
                if not stream.receive():
                    raise AssertionError("a stream ended early")
            except BlockingIOError:
                continue
        if time.monotonic() - last_check > 0.5:
            last_check = time.monotonic()
            for c in clients:
                if c not in done and c.data.count(marker) >= 10_000:
                    done.add(c)
                    selector.unregister(c)
    elapsed = time.monotonic() - started
    pattern = re.compile(rb'"event":\{"n":(\d+),"tag":"big"\}')
    for c in clients:
        numbers = [int(n) for n in pattern.findall(bytes(c.data))]
        assert numbers == list(range(10_000))
        assert b"event: dropped" not in c.data
        c.close()
    print(
        f"100 clients x 10,000 events delivered in {elapsed:.1f}s "
        f"({1_000_000 / elapsed:,.0f} events/s)"
    )
