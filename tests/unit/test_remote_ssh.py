# mypy: disable-error-code="no-untyped-call"
"""
The ``ssh`` tunnel adapter on a Clock, with a fake SSH server at the
transport seam (:class:`piccolod.remote.testing.FakeSSHServer`): host key
pinning, reconnection with jittered backoff, keepalive, forwards changed
live, health per tunnel.  The Conch side itself runs against OpenSSH in
``tests/integration/test_remote_ssh.py``; its pure helpers are tested here.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.error import ConchError
from twisted.conch.ssh import common
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from piccolod.errors import InvalidCommand
from piccolod.events import HealthLevel
from piccolod.interfaces import Backoff, TunnelForward, TunnelSpec, TunnelStatus
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.health import HealthTracker
from piccolod.remote import _conch
from piccolod.remote.keys import openssh_fingerprint, public_key_fingerprint
from piccolod.remote.ssh import SSHTunnelService
from piccolod.remote.testing import FakeSSHServer, ThreadlessReactor

KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot parsed by the fake\n"
COMPONENT = "remote.tunnel.t1"


def spec(**changes: Any) -> TunnelSpec:
    values: dict[str, Any] = {
        "name": "t1",
        "host": "tunnel.example",
        "port": 22,
        "user": "piccolo",
        "private_key": KEY,
        "forwards": (
            TunnelForward("portal", "127.0.0.1", 0, "127.0.0.1", 8080),
            TunnelForward("app:blog/web", "127.0.0.1", 9001, "127.0.0.1", 35001),
        ),
        "keepalive_interval": 10.0,
        "keepalive_timeout": 30.0,
    }
    values.update(changes)
    return TunnelSpec(**values)


class TunnelCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = ThreadlessReactor()
        self.health = HealthTracker(self.clock, MemoryEventBus(self.clock))
        self.server = FakeSSHServer(self.clock)
        self.tunnel = SSHTunnelService(
            self.clock,
            self.health,
            backoff=Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.2),
            rand=lambda: 0.5,
            connect_timeout=5.0,
            error_after=20.0,
            endpoint=self.server.endpoint,
            protocol_factory=self.server.protocol,
            connect_target=self.server.endpoint,
        )
        self.statuses: list[TunnelStatus] = []
        self.tunnel.watch(self.statuses.append)
        self.tunnel.startService()
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        d = self.tunnel.stopService()
        self.clock.advance(10)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual([c.component for c in self.health.components()], [])

    def settle(self) -> None:
        self.clock.advance(0)
        self.clock.advance(0)

    def status(self) -> TunnelStatus:
        (status,) = self.tunnel.status()
        return status

    def forwards(self) -> dict[str, Any]:
        return {f.name: f for f in self.status().forwards}

    def level(self) -> HealthLevel:
        return self.health.component(COMPONENT).level

    def up(self, **changes: Any) -> None:
        self.tunnel.apply([spec(**changes)])
        self.settle()


class ConnectionTests(TunnelCase):
    def test_connects_and_forwards(self) -> None:
        """The tunnel connects, asks for every forward, and reports up with the bound ports."""
        self.up()
        status = self.status()
        self.assertEqual(status.state, "up")
        forwards = self.forwards()
        self.assertEqual(
            (forwards["portal"].state, forwards["portal"].bound_port), ("active", 40000)
        )
        self.assertEqual(forwards["app:blog/web"].bound_port, 9001)
        self.assertEqual(sorted(self.server.bound), [("127.0.0.1", 9001), ("127.0.0.1", 40000)])
        self.assertEqual(self.level(), HealthLevel.OK)
        self.assertEqual(status.host_key, openssh_fingerprint(self.server.host_key))
        self.assertEqual(self.statuses[-1], status)

    def test_forwarded_connections_find_their_target(self) -> None:
        """A connection the server accepted on a bound port is spliced to its forward's target."""
        self.up()
        client = self.tunnel.clients["t1"]
        found = client.forwarded_target("127.0.0.1", 40000)
        self.assertEqual((found.name, found.target_port), ("portal", 8080))  # type: ignore[union-attr]
        self.assertIsNone(client.forwarded_target("127.0.0.1", 1))
        self.assertIsNone(client.forwarded_target("0.0.0.0", 9001))
        self.assertEqual(self.forwards()["portal"].connections, 1)

    def test_duplicate_specs_are_refused(self) -> None:
        """Two tunnels of one name, or two forwards on one address, are invalid."""
        with self.assertRaises(InvalidCommand):
            self.tunnel.apply([spec(), spec()])
        twice = TunnelForward("a", "127.0.0.1", 9001, "127.0.0.1", 1)
        with self.assertRaises(InvalidCommand):
            self.tunnel.apply([spec(forwards=(twice, TunnelForward("b", "127.0.0.1", 9001)))])
        self.assertEqual(self.tunnel.status(), [])


class PinningTests(TunnelCase):
    def test_first_key_is_pinned_and_another_refused_without_retry(self) -> None:
        """Unpinned, the first key is kept; a different key later is refused for good."""
        self.up()
        first = openssh_fingerprint(self.server.host_key)
        self.assertEqual(self.tunnel.clients["t1"].pinned, first)
        self.server.host_key = b"an impostor"
        self.server.drop_all()
        self.clock.advance(1.0)
        self.settle()
        status = self.status()
        self.assertEqual(status.state, "refused")
        self.assertIn(openssh_fingerprint(b"an impostor"), status.last_error)
        self.assertIn(first, status.last_error)
        self.assertEqual(self.level(), HealthLevel.ERROR)
        attempts = len(self.server.attempts)
        self.clock.advance(3600)
        self.assertEqual(len(self.server.attempts), attempts)
        self.assertEqual(self.server.live(), [])

    def test_pinned_key_mismatch_on_the_first_connection(self) -> None:
        """A configured pin that does not match is refused at once, and stays refused."""
        pin = openssh_fingerprint(b"the real server")
        self.up(host_key=pin)
        self.assertEqual(self.status().state, "refused")
        self.tunnel.apply([spec(host_key=pin)])  # reapplying the same spec is no retry
        self.clock.advance(600)
        self.assertEqual(len(self.server.attempts), 1)

    def test_a_new_pin_reconnects(self) -> None:
        """Reconfigured with the key the server has, a refused tunnel connects again."""
        self.up(host_key=openssh_fingerprint(b"old key"))
        self.up(host_key=openssh_fingerprint(self.server.host_key))
        self.assertEqual(self.status().state, "up")
        self.assertEqual(len(self.server.attempts), 2)

    def test_storing_the_learned_pin_does_not_reconnect(self) -> None:
        """Applying the spec with the pin the connection already verified keeps the connection."""
        self.up()
        self.up(host_key=openssh_fingerprint(self.server.host_key))
        self.assertEqual(len(self.server.attempts), 1)
        self.assertEqual(self.status().state, "up")


class BackoffTests(TunnelCase):
    def setUp(self) -> None:
        super().setUp()
        # rand 0.0 → -20 %, 1.0 → +20 %, 0.5 → exact.
        self.rands = [0.0, 1.0, 0.5, 0.0, 1.0]
        self.tunnel.rand = lambda: self.rands.pop(0) if self.rands else 0.5
        self.times: list[float] = []
        endpoint = self.server.endpoint

        def timed(host: str, port: int) -> Any:
            inner = endpoint(host, port)

            class Timed:
                def connect(_self, factory: Any) -> Any:
                    self.times.append(self.clock.seconds())
                    return inner.connect(factory)

            return Timed()

        self.tunnel.endpoint = timed

    def run_until(self, deadline: float) -> None:
        """Advance from one delayed call to the next, up to ``deadline``."""
        while True:
            pending = [c.getTime() for c in self.clock.getDelayedCalls()]
            upcoming = min(pending, default=deadline + 1)
            if upcoming > deadline:
                self.clock.advance(deadline - self.clock.seconds())
                return
            self.clock.advance(max(0.0, upcoming - self.clock.seconds()))

    def gaps(self) -> list[float]:
        return [round(b - a, 6) for a, b in zip(self.times, self.times[1:], strict=False)]

    def test_backoff_grows_with_jitter_and_caps(self) -> None:
        """Refused connections are retried after 1, 2, 4, 8, 8 s, each jittered by ±20 %."""
        self.server.listening = False
        self.tunnel.apply([spec()])
        self.run_until(40.0)
        self.assertEqual(self.gaps()[:6], [0.8, 2.4, 4.0, 6.4, 9.6, 8.0])
        self.assertEqual(self.status().state, "backoff")
        self.assertEqual(self.status().attempts, len(self.times))  # every attempt counted

    def test_success_resets_the_backoff(self) -> None:
        """After a connection is up, the next loss is retried after the initial delay again."""
        self.server.listening = False
        self.tunnel.apply([spec()])
        self.run_until(4.0)
        self.server.listening = True
        self.run_until(12.0)
        self.assertEqual(self.status().state, "up")
        self.assertEqual(self.status().attempts, 0)
        before, lost = len(self.times), self.clock.seconds()
        self.rands.clear()  # no jitter from here on
        self.server.drop_all()
        self.run_until(lost + 2.0)
        self.assertEqual(len(self.times), before + 1)
        self.assertEqual(self.times[-1] - lost, 1.0)  # the initial delay again

    def test_authentication_failures_back_off_too(self) -> None:
        """A TCP connection whose key is not accepted counts as a failure: the delay grows."""
        self.server.reject_auth = True
        self.tunnel.apply([spec()])
        self.run_until(10.0)
        self.assertEqual(self.gaps()[:3], [0.8, 2.4, 4.0])
        self.assertIn("authentication", self.status().last_error)


class HealthTests(TunnelCase):
    def test_degrades_then_errors_then_recovers(self) -> None:
        """Lost: warn; still down after error_after: error; back: ok, by itself."""
        self.up()
        self.server.listening = False
        self.server.drop_all()
        self.assertEqual(self.level(), HealthLevel.WARN)
        self.assertEqual(self.status().state, "backoff")
        for _ in range(25):
            self.clock.advance(1.0)
        self.assertEqual(self.level(), HealthLevel.ERROR)
        self.server.listening = True
        for _ in range(10):
            self.clock.advance(1.0)
        self.assertEqual(self.status().state, "up")
        self.assertEqual(self.level(), HealthLevel.OK)

    def test_connecting_is_a_warning(self) -> None:
        """A tunnel that has not connected yet is a warning, not ok."""
        self.server.hang = True
        self.tunnel.apply([spec()])
        self.settle()
        self.assertEqual(self.level(), HealthLevel.WARN)
        self.assertEqual(self.status().state, "connecting")

    def test_handshake_timeout_reconnects(self) -> None:
        """A server that accepts TCP but never speaks is dropped after connect_timeout."""
        self.server.hang = True
        self.tunnel.apply([spec()])
        self.clock.advance(5.0)
        self.assertIn("no SSH session within 5s", self.status().last_error)
        self.server.hang = False
        self.clock.advance(2.0)
        self.settle()
        self.assertEqual(self.status().state, "up")


class KeepaliveTests(TunnelCase):
    def test_unanswered_keepalive_drops_and_reconnects(self) -> None:
        """With no answer within keepalive_timeout the connection is aborted and remade."""
        self.up()
        self.server.answer_pings = False
        self.clock.advance(10.0)  # first keepalive
        self.clock.advance(10.0)  # the next tick: no second keepalive while one is unanswered
        self.clock.advance(10.0)
        pings = [r for r in self.server.requests if r[0] == "ping"]
        self.assertEqual(len(pings), 1)
        self.clock.advance(10.0)  # 30 s after the keepalive
        self.assertIn(("abort", "", 0), self.server.requests)
        self.assertIn("keepalive", self.status().last_error)
        self.server.answer_pings = True
        self.clock.advance(1.0)
        self.settle()
        self.assertEqual(self.status().state, "up")
        self.assertEqual(len(self.server.attempts), 2)

    def test_answered_keepalives_keep_the_connection(self) -> None:
        """Answered keepalives go out every interval and nothing reconnects."""
        self.up()
        self.clock.pump([10.0] * 6)
        pings = [r for r in self.server.requests if r[0] == "ping"]
        self.assertEqual(len(pings), 6)
        self.assertEqual(len(self.server.attempts), 1)


class ForwardTests(TunnelCase):
    def test_refused_forward_is_asked_again_on_the_live_connection(self) -> None:
        """A refused forward is retried after a backoff without dropping the connection."""
        self.server.refuse.add(("127.0.0.1", 9001))
        self.up()
        forward = self.forwards()["app:blog/web"]
        self.assertEqual(forward.state, "refused")
        self.assertEqual(self.status().state, "up")
        self.assertEqual(self.level(), HealthLevel.WARN)
        self.assertEqual(self.forwards()["portal"].state, "active")
        self.server.refuse.clear()
        self.clock.advance(1.0)
        self.assertEqual(self.forwards()["app:blog/web"].state, "active")
        self.assertEqual(self.level(), HealthLevel.OK)
        self.assertEqual(len(self.server.attempts), 1)

    def test_changes_apply_live(self) -> None:
        """Added forwards are asked for, removed ones cancelled, retargeted ones kept, live."""
        self.up()
        self.server.requests.clear()
        forwards = (
            TunnelForward("portal", "127.0.0.1", 0, "10.0.0.2", 8080),  # retargeted
            TunnelForward("https", "127.0.0.1", 9443, "127.0.0.1", 8443),  # added
        )  # app:blog/web removed
        self.tunnel.apply([spec(forwards=forwards)])
        self.settle()
        self.assertEqual(
            self.server.requests,
            [("cancel", "127.0.0.1", 9001), ("forward", "127.0.0.1", 9443)],
        )
        found = self.tunnel.clients["t1"].forwarded_target("127.0.0.1", 40000)
        self.assertEqual(found.target_host, "10.0.0.2")  # type: ignore[union-attr]
        self.assertEqual(len(self.server.attempts), 1)
        self.assertEqual(set(self.forwards()), {"portal", "https"})

    def test_a_moved_binding_is_cancelled_then_asked_for(self) -> None:
        """A forward whose server port changes is cancelled and asked for anew."""
        self.up()
        self.server.requests.clear()
        moved = (
            TunnelForward("portal", "127.0.0.1", 0, "127.0.0.1", 8080),
            TunnelForward("app:blog/web", "127.0.0.1", 9002, "127.0.0.1", 35001),
        )
        self.tunnel.apply([spec(forwards=moved)])
        self.settle()
        self.assertEqual(
            self.server.requests,
            [("cancel", "127.0.0.1", 9001), ("forward", "127.0.0.1", 9002)],
        )
        self.assertEqual(self.forwards()["app:blog/web"].bound_port, 9002)

    def test_connection_settings_reconnect_only_that_tunnel(self) -> None:
        """A new user (or key, host, keepalive) is a new connection; other tunnels stay."""
        self.tunnel.apply([spec(), spec(name="t2", host="other.example")])
        self.settle()
        self.tunnel.apply([spec(user="someone-else"), spec(name="t2", host="other.example")])
        self.settle()
        self.assertEqual(len(self.server.attempts), 3)
        self.assertEqual(len(self.server.live()), 2)
        self.tunnel.apply([spec(user="someone-else")])
        self.settle()
        self.assertEqual(len(self.server.live()), 1)
        self.assertEqual([s.name for s in self.tunnel.status()], ["t1"])
        self.assertEqual(self.statuses[-1].state, "stopped")
        self.health.component(COMPONENT)
        self.assertEqual(
            [c.component for c in self.health.components()], [COMPONENT]
        )  # t2's component went with it


class ConchHelperTests(SynchronousTestCase):
    def test_fingerprint_matches_openssh(self) -> None:
        """The SHA256 fingerprint is OpenSSH's (base64 without padding), as ssh-keygen -l prints."""
        line = (
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMiWfRlzmHCVuNBwaCziyYbpyUF59+3Jk+PV+KdqjR1D test"
        )
        self.assertEqual(
            public_key_fingerprint(line), "SHA256:xKrSEgV+148zjUDsbdSz/AaD5LyUqFvRNFpLjEZeOxA"
        )

    def test_forwarded_open_data_roundtrip(self) -> None:
        """forwarded-tcpip open data is unpacked into the connected and origin addresses."""
        data = _conch.pack_address("127.0.0.1", 40000) + _conch.pack_address("10.1.2.3", 51000)
        self.assertEqual(_conch.unpack_forwarded(data), (("127.0.0.1", 40000), ("10.1.2.3", 51000)))
        self.assertEqual(_conch.pack_address("h", 1), common.NS(b"h") + struct.pack(">L", 1))

    def test_session_reads_the_bound_port(self) -> None:
        """For port 0 the bound port comes from the reply; a refusal fails the request."""
        conn = _FakeConnection([succeed(struct.pack(">L", 33197)), fail(ConchError("no"))])
        session = _conch.ConchSession(conn)  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(session.request_forward("127.0.0.1", 0)), 33197)
        self.failureResultOf(session.request_forward("127.0.0.1", 9001), ConchError)
        self.assertEqual(conn.sent[0][0], b"tcpip-forward")

    def test_keepalive_failure_reply_counts_as_an_answer(self) -> None:
        """OpenSSH answers keepalive@openssh.com with a failure: still an answer."""
        conn = _FakeConnection([fail(ConchError("request failed"))])
        session = _conch.ConchSession(conn)  # type: ignore[arg-type]
        self.assertIsNone(self.successResultOf(session.ping()))

    def test_unknown_forward_channel_is_refused(self) -> None:
        """A forwarded-tcpip channel for no active forward is refused (connect failed)."""

        class Hooks:
            def forwarded_target(self, host: str, port: int) -> None:
                return None

        conn = _conch.TunnelConnection(Hooks())  # type: ignore[arg-type]
        data = _conch.pack_address("127.0.0.1", 1) + _conch.pack_address("1.2.3.4", 5)
        with self.assertRaises(ConchError):
            conn.channel_forwarded_tcpip(1000, 1000, data)


class _FakeConnection:
    def __init__(self, replies: list[Deferred[bytes]]) -> None:
        self.replies = replies
        self.sent: list[tuple[bytes, bytes]] = []

    def sendGlobalRequest(self, request: bytes, data: bytes, wantReply: int = 0) -> Deferred[bytes]:
        self.sent.append((request, data))
        return self.replies.pop(0)
