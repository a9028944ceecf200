"""Tests for piccolod.kernel.sdnotify.SystemdNotifier over real unix datagram sockets."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from piccolod.kernel.sdnotify import SystemdNotifier


class _Receiver:
    """A bound unix datagram socket standing in for systemd."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


class SystemdNotifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = tempfile.mkdtemp(prefix="sdn")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "notify")
        self.systemd = _Receiver(self.path)
        self.addCleanup(self.systemd.close)

    def notifier(self, watchdog_usec: int | None = None) -> SystemdNotifier:
        n = SystemdNotifier(self.clock, self.path, watchdog_usec)
        self.addCleanup(n.stop)
        return n

    def test_ready_sends_ready_and_status(self) -> None:
        """ready() sends READY=1 with a STATUS line in one datagram."""
        self.notifier().ready("3/3 children running")
        self.assertEqual(self.systemd.messages(), ["READY=1\nSTATUS=3/3 children running"])

    def test_stopping_and_status(self) -> None:
        """stopping() sends STOPPING=1; status() flattens newlines into one line."""
        n = self.notifier()
        n.status("a\nb")
        n.stopping()
        self.assertEqual(self.systemd.messages(), ["STATUS=a b", "STOPPING=1\nSTATUS=stopping"])
        self.assertEqual(n.sent, 2)

    def test_watchdog_pings_at_half_interval(self) -> None:
        """While started, WATCHDOG=1 is sent at once and then every WATCHDOG_USEC/2."""
        n = self.notifier(watchdog_usec=4_000_000)
        self.assertEqual(n.watchdog_interval, 2.0)
        n.start()
        n.start()  # idempotent: one loop only
        self.assertEqual(self.systemd.messages(), ["WATCHDOG=1"])
        self.clock.advance(1.9)
        self.assertEqual(self.systemd.messages(), [])
        self.clock.advance(0.1)
        self.assertEqual(self.systemd.messages(), ["WATCHDOG=1"])
        self.clock.advance(2)
        self.clock.advance(2)
        self.assertEqual(self.systemd.messages(), ["WATCHDOG=1", "WATCHDOG=1"])
        n.stop()
        self.clock.advance(10)
        self.assertEqual(self.systemd.messages(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_watchdog_without_usec(self) -> None:
        """Without WATCHDOG_USEC start() schedules nothing."""
        n = self.notifier()
        n.start()
        self.assertFalse(n.watchdog_running)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_from_environ(self) -> None:
        """from_environ reads NOTIFY_SOCKET and WATCHDOG_USEC."""
        n = SystemdNotifier.from_environ(
            self.clock, {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "30000000"}
        )
        self.assertEqual((n.socket_path, n.watchdog_interval), (self.path, 15.0))
        n.ready()
        self.assertEqual(self.systemd.messages(), ["READY=1\nSTATUS=ready"])
        n.stop()

    def test_watchdog_pid_must_match(self) -> None:
        """WATCHDOG_PID naming another process disables the pings, not the socket."""
        env = {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
        other = SystemdNotifier.from_environ(self.clock, env, getpid=lambda: 4242)
        self.assertIsNone(other.watchdog_interval)
        self.assertTrue(other.enabled)
        mine = SystemdNotifier.from_environ(self.clock, env, getpid=lambda: 1)
        self.assertEqual(mine.watchdog_interval, 1.0)

    def test_bad_environment_values(self) -> None:
        """A non-numeric or non-positive WATCHDOG_USEC and a non-unix socket are ignored."""
        for raw in ("soon", "0", "-5"):
            n = SystemdNotifier.from_environ(
                self.clock, {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": raw}
            )
            self.assertIsNone(n.watchdog_interval, raw)
        n = SystemdNotifier.from_environ(self.clock, {"NOTIFY_SOCKET": "vsock:2:1234"})
        self.assertFalse(n.enabled)

    def test_unset_environment(self) -> None:
        """With unset_environment the systemd variables are removed from the mapping."""
        env = {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "X": "y"}
        SystemdNotifier.from_environ(self.clock, env, unset_environment=True)
        self.assertEqual(env, {"X": "y"})

    def test_abstract_socket(self) -> None:
        """An '@name' NOTIFY_SOCKET addresses a Linux abstract socket."""
        name = f"piccolod-test-{uuid.uuid4().hex}"
        receiver = _Receiver("\0" + name)
        self.addCleanup(receiver.close)
        n = SystemdNotifier.from_environ(self.clock, {"NOTIFY_SOCKET": "@" + name})
        self.addCleanup(n.stop)
        n.ready()
        self.assertEqual(receiver.messages(), ["READY=1\nSTATUS=ready"])

    def test_no_socket_is_noop(self) -> None:
        """Without NOTIFY_SOCKET every method does nothing and schedules nothing."""
        n = SystemdNotifier.from_environ(self.clock, {"WATCHDOG_USEC": "1000000"})
        self.assertFalse(n.enabled)
        n.start()
        n.ready()
        n.status("x")
        n.stopping()
        self.assertFalse(n.notify("X=1"))
        n.stop()
        self.assertEqual((n.sent, n.errors), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.systemd.messages(), [])

    def test_unreachable_socket_logs_once(self) -> None:
        """Sending to a missing socket is logged once, counted, and never raises."""
        n = SystemdNotifier(self.clock, os.path.join(self.dir, "missing"), 2_000_000)
        self.addCleanup(n.stop)
        with capturedLogs() as events:
            n.start()
            self.clock.advance(1)
            self.clock.advance(1)
            n.ready()
        self.assertEqual(n.errors, 4)
        self.assertEqual(n.sent, 0)
        warnings = [e for e in events if "cannot notify systemd" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertTrue(n.watchdog_running)

    def test_recovers_after_failure(self) -> None:
        """After a failure a later successful send is logged as recovery."""
        path = os.path.join(self.dir, "late")
        n = SystemdNotifier(self.clock, path)
        self.addCleanup(n.stop)
        self.assertFalse(n.notify("STATUS=x"))
        late = _Receiver(path)
        self.addCleanup(late.close)
        with capturedLogs() as events:
            self.assertTrue(n.notify("STATUS=y"))
        self.assertEqual(late.messages(), ["STATUS=y"])
        self.assertTrue(any("works again" in e["log_format"] for e in events))

    def test_rejects_non_clock(self) -> None:
        """The reactor must provide IReactorTime."""
        self.assertRaises(TypeError, SystemdNotifier, object(), None, None)
