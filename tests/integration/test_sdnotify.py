"""
systemd notification from a real ``twistd -n piccolod``: READY=1 after
readiness, WATCHDOG=1 every WATCHDOG_USEC/2 from the reactor, no pings while
the reactor is blocked, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import itertools
import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.support import Daemon

pytestmark = pytest.mark.integration


def receive(sock: socket.socket, until: float) -> list[tuple[float, str]]:
    got: list[tuple[float, str]] = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        got.append((time.monotonic(), data.decode()))
    return got


def test_ready_watchdog_and_blocked_reactor(tmp_path: Path) -> None:
    """READY=1 comes once ready; watchdog pings stop while the reactor blocks, then resume."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    drop = tmp_path / "drop" / "twisted" / "plugins"
    drop.mkdir(parents=True)
    (drop / "thirdparty_blocker.py").write_text(
        textwrap.dedent("""
        from piccolod.kernel.plugins import SubsystemPlugin
        blocker = SubsystemPlugin(
            slot="blocker", variant="sleep", description="blocks the reactor once",
            factory="tests.thirdparty.ReactorBlocker.from_context",
            config_keys={"delay": 1.5, "seconds": 2.0},
        )
    """)
    )
    root = Path(__file__).resolve().parents[2]
    env = {
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "200000",  # a ping every 0.1 s
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "drop"), str(root)]),
    }
    d = Daemon(tmp_path / "state", ["--use", "blocker=sleep"], env=env).start()
    try:
        messages = receive(sock, time.monotonic() + 6.0)
        texts = [m for _, m in messages]
        ready = [t for t, m in messages if "READY=1" in m]
        assert ready, texts
        pings = [t for t, m in messages if "WATCHDOG=1" in m]
        assert len(pings) >= 10, texts
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # The reactor slept 2 s once: exactly one long gap, the rest near 0.1 s.
        long_gaps = [g for g in gaps if g > 1.5]
        assert len(long_gaps) == 1, gaps
        assert sorted(gaps)[len(gaps) // 2] < 0.5, gaps
        assert d.stop() == 0
        after = receive(sock, time.monotonic() + 0.5)
        assert any("STOPPING=1" in m for _, m in messages + after), texts
    finally:
        d.kill()
        sock.close()
