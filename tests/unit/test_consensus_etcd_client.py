"""
Tests for piccolod.consensus.etcd_client.EtcdClient on the fake gateway
(piccolod.testing.etcd.FakeEtcd through StubTreq): the shared contract,
endpoint rotation, timeouts, malformed answers and watch failures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from piccolod.consensus.etcd_client import (
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    WatchEvent,
    check_endpoints,
    prefix_end,
)
from piccolod.errors import InvalidCommand, Unavailable
from piccolod.testing.etcd import FakeEtcd
from tests.contracts.etcd import EtcdClientContract

T = TypeVar("T")

E1, E2, E3 = "http://etcd-1:2379", "http://etcd-2:2379", "http://etcd-3:2379"
MEMBERS = [E1, E2, E3]


class FakeBinding:
    """The contract's hooks on a FakeEtcd and a Clock."""

    def make_client(self) -> EtcdClient:
        self.clock = Clock()
        self.clock.advance(1_000)
        self.etcd = FakeEtcd(self.clock, MEMBERS, min_ttl=2)
        self.http = self.etcd.http()
        return EtcdClient(MEMBERS, self.http, self.clock, request_timeout=1.0)

    def wait(self, d: Deferred[T]) -> T:
        self.etcd.pump()
        result: T = self.successResultOf(d)  # type: ignore[attr-defined]
        return result

    def wait_failure(self, d: Deferred[Any], *types: type[BaseException]) -> BaseException:
        self.etcd.pump()
        return self.failureResultOf(d, *types).value  # type: ignore[attr-defined,no-any-return]

    def elapse(self, seconds: float) -> None:
        steps = max(1, int(seconds / 0.05))
        for _ in range(steps):
            self.clock.advance(seconds / steps)
            self.etcd.pump()

    def settle(self, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        waited = 0.0
        self.etcd.pump()
        while not predicate():
            if waited > timeout:
                raise AssertionError(f"not settled after {timeout}s of fake time: {what}")
            self.elapse(0.1)
            waited += 0.1


class FakeGatewayContractTests(FakeBinding, EtcdClientContract, SynchronousTestCase):
    """The whole etcd contract on the fake gateway."""


class ClientTests(FakeBinding, SynchronousTestCase):
    def setUp(self) -> None:
        self.client = self.make_client()

    def test_rotates_past_a_refusing_endpoint(self) -> None:
        """A refused connection moves to the next endpoint within the same call."""
        self.etcd.stop_member(E1)
        revision = self.wait(self.client.put(b"/k", b"v"))
        self.assertGreater(revision, 1)
        self.assertEqual(self.client.current, E2)
        states = {s.url: s for s in self.client.endpoint_states()}
        self.assertIs(states[E1].healthy, False)
        self.assertIn("refused", states[E1].last_error or "")
        self.assertIs(states[E2].healthy, True)
        self.assertIsNone(states[E3].healthy)
        # It sticks to the endpoint that works.
        self.wait(self.client.get(b"/k"))
        self.assertEqual([m for m, p, _ in self.etcd.calls], [E2, E2])

    def test_all_endpoints_down_is_unavailable(self) -> None:
        """When every endpoint refuses, the call fails with EtcdUnavailable naming each."""
        for url in MEMBERS:
            self.etcd.stop_member(url)
        error = self.wait_failure(self.client.get(b"/k"), EtcdUnavailable)
        self.assertIsInstance(error, Unavailable)
        for url in MEMBERS:
            self.assertIn(url, str(error))
        self.assertTrue(all(s.healthy is False for s in self.client.endpoint_states()))

    def test_a_hung_endpoint_times_out_and_rotates(self) -> None:
        """A member that never answers costs one request_timeout, then the next one answers."""
        self.etcd.hang_member(E1)
        d = self.client.put(b"/k", b"v")
        self.etcd.pump()
        self.assertNoResult(d)
        self.clock.advance(0.99)
        self.etcd.pump()
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.assertGreater(self.wait(d), 1)
        self.assertEqual(self.client.current, E2)
        self.assertEqual(self.client.endpoint_states()[0].last_error, "timed out")

    def test_no_quorum_is_unavailable_after_one_timeout_per_endpoint(self) -> None:
        """Without a quorum every member hangs a write; the call fails after 3 timeouts."""
        self.etcd.lose_quorum()
        d = self.client.put(b"/k", b"v")
        for _ in range(2):
            self.clock.advance(1.0)
            self.etcd.pump()
            self.assertNoResult(d)
        self.clock.advance(1.0)
        self.wait_failure(d, EtcdUnavailable)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 1_000 + 7.0)
        # Serializable reads still work without a quorum.
        self.assertEqual(self.wait(self.client.range(b"/k", serializable=True)).kvs, ())

    def test_unavailable_answer_rotates(self) -> None:
        """An etcd code 14 answer (no leader, timed out) moves on to the next endpoint."""
        self.etcd.lose_quorum()
        self.etcd.quorum_timeout = 0.5
        d = self.client.put(b"/k", b"v")
        self.clock.advance(0.5)  # the member answers "request timed out"
        self.etcd.pump()
        self.etcd.restore_quorum()
        self.clock.advance(0.5)  # ... so the call moved on; etcd-2 answers now
        self.etcd.pump()
        self.assertGreater(self.wait(d), 1)
        self.assertIn("code 14", self.client.endpoint_states()[0].last_error or "")

    def test_refused_requests_do_not_rotate(self) -> None:
        """A request etcd refuses as invalid fails at once on the same endpoint."""
        error = self.wait_failure(self.client.call("kv/range", {"key": "!!"}), EtcdError)
        assert isinstance(error, EtcdError)
        self.assertEqual((error.code, error.http_status), (3, 400))
        self.assertEqual(self.client.current, E1)
        self.assertEqual(len(self.etcd.calls), 1)

    def test_watch_of_a_member_that_dies_fails(self) -> None:
        """A watch whose member is stopped ends with EtcdUnavailable and rotates the client."""
        seen: list[Sequence[WatchEvent]] = []
        watch = self.client.watch(b"/w", lambda events, _r: seen.append(events))
        self.wait(watch.when_created())
        self.assertEqual(self.etcd.watchers(), 1)
        self.etcd.stop_member(E1)
        error = self.wait_failure(watch.when_done(), EtcdUnavailable)
        self.assertIn(E1, str(error))
        self.assertFalse(watch.active)
        self.assertEqual(self.client.current, E2)
        self.assertEqual(self.etcd.watchers(), 0)

    def test_watch_not_confirmed_in_time(self) -> None:
        """A watch on a hung member fails after request_timeout instead of waiting forever."""
        self.etcd.hang_member(E1)
        watch = self.client.watch(b"/w", lambda events, _r: None)
        self.etcd.pump()
        done = watch.when_done()
        self.assertNoResult(done)
        self.clock.advance(1.0)
        self.wait_failure(watch.when_created(), EtcdUnavailable)
        self.wait_failure(done, EtcdUnavailable)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelled_watch_is_forgotten_by_etcd(self) -> None:
        """Cancelling a watch closes its stream (the server drops the watcher)."""
        watch = self.client.watch(b"/w", lambda events, _r: None)
        self.wait(watch.when_created())
        watch.cancel()
        watch.cancel()
        self.assertIsNone(self.wait(watch.when_done()))
        self.assertEqual(self.etcd.watchers(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_cancels_watches(self) -> None:
        """close() ends every live watch (they fire done with None)."""
        watches = [self.client.watch(b"/w", lambda e, r: None) for _ in range(2)]
        self.wait(self.client.close())
        for watch in watches:
            self.assertIsNone(self.wait(watch.when_done()))
        self.assertEqual(self.etcd.watchers(), 0)

    def test_batch_events_are_delivered_once_in_order(self) -> None:
        """A lease revoke deleting two keys is one batch at one revision."""
        events: list[tuple[list[str], int]] = []
        watch = self.client.watch(
            b"/l/",
            lambda batch, rev: events.append(([e.type for e in batch], rev)),
            range_end=prefix_end(b"/l/"),
        )
        self.wait(watch.when_created())
        lease = self.wait(self.client.grant(10))
        self.wait(self.client.put(b"/l/a", b"1", lease=lease.id))
        self.wait(self.client.put(b"/l/b", b"1", lease=lease.id))
        self.wait(self.client.revoke(lease.id))
        self.etcd.pump()
        self.assertEqual([types for types, _ in events], [["PUT"], ["PUT"], ["DELETE", "DELETE"]])
        revisions = [rev for _, rev in events]
        self.assertEqual(revisions, sorted(set(revisions)))

    def test_a_failing_watch_callback_does_not_end_the_watch(self) -> None:
        """An exception in on_events is logged; later events still arrive."""
        calls: list[int] = []

        def on_events(batch: Sequence[WatchEvent], revision: int) -> None:
            calls.append(revision)
            if len(calls) == 1:
                raise RuntimeError("boom")

        watch = self.client.watch(b"/w", on_events)
        self.wait(watch.when_created())
        self.wait(self.client.put(b"/w", b"1"))
        self.wait(self.client.put(b"/w", b"2"))
        self.etcd.pump()
        self.assertEqual(len(calls), 2)
        self.assertTrue(watch.active)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        watch.cancel()

    def test_prefix_end(self) -> None:
        """prefix_end increments the last byte, dropping trailing 0xff; empty means every key."""
        self.assertEqual(prefix_end(b"/a/"), b"/a0")
        self.assertEqual(prefix_end(b"a\xff\xff"), b"b")
        self.assertEqual(prefix_end(b"\xff"), b"\0")
        self.assertEqual(prefix_end(b""), b"\0")

    def test_endpoint_validation(self) -> None:
        """Endpoints must be distinct http(s)://host:port URLs without a path."""
        self.assertEqual(check_endpoints(["http://a:1/"]), ("http://a:1",))
        for bad in (
            [],
            "http://a:1",
            ["ftp://a:1"],
            ["http://a:1/v3"],
            ["http://a:x"],
            [1],
            ["http://a:1", "http://a:1"],
            ["http://:1"],
        ):
            self.assertRaises(InvalidCommand, check_endpoints, bad)
        self.assertRaises(InvalidCommand, EtcdClient, [], None, self.clock)
        self.assertRaises(InvalidCommand, EtcdClient, [E1], None, self.clock, request_timeout=0)

    def test_health_of_unknown_endpoint(self) -> None:
        """health() only probes configured endpoints."""
        self.assertRaises(InvalidCommand, self.client.health, "http://elsewhere:1")


class _Garbage(Resource):
    """A gateway that answers whatever the test sets."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.body = b"not json"
        self.requests = 0

    def render_POST(self, request: Request) -> bytes | int:
        self.requests += 1
        request.setResponseCode(self.status)
        if self.body == b"<hang>":
            return NOT_DONE_YET
        return self.body

    render_GET = render_POST


class MalformedAnswerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = _Garbage()
        self.stub = StubTreq(self.resource)
        self.client = EtcdClient([E1, E2], self.stub, self.clock, request_timeout=1.0)

    def test_non_json_answer_is_an_endpoint_failure(self) -> None:
        """An answer that is not JSON marks the endpoint failed and tries the next."""
        d = self.client.put(b"/k", b"v")
        error = self.failureResultOf(d, EtcdUnavailable).value
        self.assertIn("bad answer", str(error))
        self.assertEqual(self.resource.requests, 2)

    def test_unexpected_shapes_are_etcd_errors(self) -> None:
        """Well-formed JSON of the wrong shape is an EtcdError, never a crash."""
        cases: list[tuple[Callable[[], Deferred[Any]], bytes]] = [
            (lambda: self.client.grant(5), b'{"ID":"0"}'),
            (lambda: self.client.get(b"/k"), b'{"kvs":"nope"}'),
            (lambda: self.client.get(b"/k"), b'{"kvs":[{"key":"!!"}]}'),
            (lambda: self.client.put(b"/k", b"v"), b'{"header":{"revision":"x"}}'),
            (lambda: self.client.keepalive(1), b'{"result":[]}'),
            (lambda: self.client.create_if_absent(b"/k", b"v", 1), b'{"header":{}}'),
        ]
        for call, body in cases:
            self.resource.body = body
            self.failureResultOf(call(), EtcdError)

    def test_error_answers(self) -> None:
        """An HTTP error with a non-JSON body is an EtcdError with the status."""
        self.resource.status = 502
        self.resource.body = b"<html>bad gateway</html>"
        error = self.failureResultOf(self.client.put(b"/k", b"v"), EtcdError).value
        assert isinstance(error, EtcdError)
        self.assertEqual(error.http_status, 502)

    def test_bad_watch_lines_end_the_watch(self) -> None:
        """A watch stream carrying a non-JSON line ends as an endpoint failure."""
        self.resource.body = b'{"result":{"header":{"revision":"3"},"created":true}}\nnope\n'
        watch = self.client.watch(b"/w", lambda e, r: None)
        self.assertEqual(self.successResultOf(watch.when_created()), 3)
        self.stub.flush()
        self.failureResultOf(watch.when_done(), EtcdUnavailable)

    def test_watch_error_line(self) -> None:
        """A streamed error object ends the watch with its typed error."""
        self.resource.body = b'{"error":{"grpc_code":3,"message":"bad key"},"code":3}\n'
        watch = self.client.watch(b"/w", lambda e, r: None)
        self.stub.flush()
        error = self.failureResultOf(watch.when_done(), EtcdError).value
        self.assertIn("bad key", str(error))
        self.failureResultOf(watch.when_created(), EtcdError)


class ValueTests(SynchronousTestCase):
    def test_key_value_from_json_defaults(self) -> None:
        """Omitted fields (etcd omits zeroes) decode to zero and empty bytes."""
        kv = KeyValue.from_json({"key": "YQ=="})
        self.assertEqual(kv, KeyValue(key=b"a"))

    def test_watch_event_from_json(self) -> None:
        """A PUT event has no type; DELETE is named; unknown types are refused."""
        self.assertEqual(WatchEvent.from_json({"kv": {"key": "YQ=="}}).type, "PUT")
        self.assertEqual(
            WatchEvent.from_json({"type": "DELETE", "kv": {"key": "YQ=="}}).type, "DELETE"
        )
        from piccolod.consensus.etcd_client import _BadResponse

        self.assertRaises(_BadResponse, WatchEvent.from_json, {"type": "X", "kv": {}})
        self.assertRaises(_BadResponse, WatchEvent.from_json, [])


class CancelledTransmissionTests(SynchronousTestCase):
    def test_cancel_during_transmission_is_a_cancellation(self) -> None:
        """A request cancelled while twisted.web writes it fails as a plain cancellation."""
        from twisted.internet.defer import CancelledError, Deferred
        from twisted.internet.task import Clock
        from twisted.python.failure import Failure
        from twisted.web._newclient import RequestGenerationFailed

        from piccolod.consensus.etcd_client import EtcdClient

        pending: list[Deferred[object]] = []

        class Http:
            def post(self, *args: object, **kwargs: object) -> Deferred[object]:
                def cancel(d: Deferred[object]) -> None:
                    d.errback(RequestGenerationFailed([Failure(CancelledError())]))

                d: Deferred[object] = Deferred(cancel)
                pending.append(d)
                return d

        client = EtcdClient(("http://127.0.0.1:2379",), Http(), Clock())
        d = client.call("kv/range", {"key": "eA=="})
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(pending), 1)
