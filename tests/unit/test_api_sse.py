"""
Tests for the event stream (``GET /api/v1/events``) through StubTreq: live
delivery, topic patterns, resumption with Last-Event-ID from the replay
ring (exactly once), gaps, drops, heartbeats, policy on topics and limits.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from piccolod.api.sse import EventStream
from piccolod.events import DeviceEvent, JobProgress

from .api_support import PASSWORD, APIHarness


def parse(data: bytes) -> list[dict[str, Any]]:
    """SSE frames: ``{"id", "event", "data"}`` (data decoded) or ``{"comment"}``."""
    out: list[dict[str, Any]] = []
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        frame: dict[str, Any] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                frame["comment"] = line[1:].strip()
                continue
            name, _, value = line.partition(": ")
            frame[name] = json.loads(value) if name == "data" else value
        out.append(frame)
    return out


class Stream:
    """One open SSE response and what arrived on it."""

    def __init__(
        self,
        test: SSETests,
        path: str,
        headers: dict[str, str] | None = None,
        bearer: bool = True,
    ) -> None:
        self.test = test
        self.received = bytearray()
        sent = {b"authorization": [f"Bearer {test.token}".encode()]} if bearer else {}
        for k, v in (headers or {}).items():
            sent[k.lower().encode()] = [v.encode()]
        before = set(test.stub._agent._pumps)  # type: ignore[attr-defined]
        d = test.stub.get("http://piccolod" + path, headers=sent)
        (self.pump,) = set(test.stub._agent._pumps) - before  # type: ignore[attr-defined]
        test.stub.flush()
        self.response = test.successResultOf(d)
        self.done: Deferred[None] = treq.collect(self.response, self.received.extend)
        test.stub.flush()

    def frames(self) -> list[dict[str, Any]]:
        self.test.h.clock.advance(0)
        self.test.h.clock.advance(0)
        self.test.stub.flush()
        return parse(bytes(self.received))

    def events(self) -> list[dict[str, Any]]:
        return [f for f in self.frames() if "id" in f]

    def close(self) -> None:
        self.done.addErrback(lambda _f: None)  # the client cut the stream: expected
        self.pump.clientIO.loseConnection()
        self.pump.flush()
        self.test.stub.flush()


class SSETests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(self, sse_replay=8, sse_max_clients=3)
        admin, _ = self.h.set_up()
        self.token, _ = self.h.token(admin, "admin")
        from treq.testing import StubTreq

        self.stub = StubTreq(self.h.router)

    def start_ring(self) -> None:
        """A request that replays and closes: the ring records from now on."""
        Stream(self, "/api/v1/events?follow=false")

    def publish(self, *numbers: int) -> list[str]:
        ids = []
        for n in numbers:
            envelope = self.h.bus.publish(JobProgress(f"job-{n}", "test", "running", n / 100), "t")
            ids.append(envelope.context.event_id)
        return ids

    def job_events(self, stream: Stream) -> list[str]:
        return [
            f["data"]["event"]["job_id"] for f in stream.events() if f["event"] == "jobs.progress"
        ]

    def test_live_events(self) -> None:
        """
        A stream gets each event as a frame: id, the topic as event name, the envelope as
        data.
        """
        stream = Stream(self, "/api/v1/events?topics=jobs.*")
        self.assertEqual(
            stream.response.headers.getRawHeaders("content-type"),
            ["text/event-stream; charset=utf-8"],
        )
        ids = self.publish(1, 2)
        self.h.bus.publish(DeviceEvent("sda", "added"), "t")
        events = stream.events()
        self.assertEqual([f["id"] for f in events], ids)
        self.assertEqual(events[0]["event"], "jobs.progress")
        self.assertEqual(events[0]["data"]["type"], "JobProgress")
        self.assertEqual(events[0]["data"]["event"]["job_id"], "job-1")
        self.assertEqual(events[0]["data"]["id"], ids[0])
        stream.close()

    def test_several_patterns(self) -> None:
        """Comma-separated patterns are each honoured, in publication order."""
        stream = Stream(self, "/api/v1/events?topics=device,jobs.%23")
        self.publish(1)
        self.h.bus.publish(DeviceEvent("sda", "added"), "t")
        self.h.bus.publish(DeviceEvent("sdb", "removed"), "t", topic="device.other")
        self.assertEqual([f["event"] for f in stream.events()], ["jobs.progress", "device"])
        stream.close()

    def test_resume_delivers_the_missed_events_exactly_once(self) -> None:
        """After a disconnect, Last-Event-ID replays every event in between once, then live ones."""
        first = Stream(self, "/api/v1/events?topics=jobs.progress")
        self.publish(1, 2)
        seen = first.events()
        first.close()
        self.publish(3, 4, 5)
        second = Stream(
            self, "/api/v1/events?topics=jobs.progress", {"Last-Event-ID": seen[-1]["id"]}
        )
        self.publish(6)
        self.assertEqual(self.job_events(second), ["job-3", "job-4", "job-5", "job-6"])
        self.assertNotIn("gap", [f.get("event") for f in second.frames()])
        second.close()

    def test_resume_in_the_same_turn_as_publishing(self) -> None:
        """
        Events published just before and just after the reconnect are neither lost nor
        doubled.
        """
        self.start_ring()
        ids = self.publish(1)
        ids += self.publish(2)  # not yet delivered to anyone when the client reconnects
        stream = Stream(self, "/api/v1/events?topics=jobs.progress", {"Last-Event-ID": ids[0]})
        self.publish(3)
        self.assertEqual(self.job_events(stream), ["job-2", "job-3"])
        stream.close()

    def test_query_parameter_resume(self) -> None:
        """?last_event_id= works like the header (EventSource cannot set headers at first)."""
        self.start_ring()
        ids = self.publish(1, 2, 3)
        stream = Stream(self, f"/api/v1/events?topics=jobs.progress&last_event_id={ids[0]}")
        self.assertEqual(self.job_events(stream), ["job-2", "job-3"])
        stream.close()

    def test_unknown_or_evicted_id_is_an_explicit_gap(self) -> None:
        """An id the ring no longer holds gives a ``gap`` event, then whatever the ring holds."""
        self.start_ring()
        ids = self.publish(*range(20))  # the ring holds 8
        stream = Stream(self, "/api/v1/events?topics=jobs.progress", {"Last-Event-ID": ids[0]})
        frames = stream.frames()
        gaps = [f for f in frames if f.get("event") == "gap"]
        self.assertEqual(len(gaps), 1)
        self.assertEqual(gaps[0]["data"]["last_event_id"], ids[0])
        # What the ring still holds: the newest jobs (audit records take some slots).
        replayed = self.job_events(stream)
        self.assertGreaterEqual(len(replayed), 6)
        self.assertEqual(replayed, [f"job-{n}" for n in range(20 - len(replayed), 20)])
        stream.close()

    def test_follow_false_replays_and_closes(self) -> None:
        """follow=false answers the ring's matching events and ends the response."""
        self.start_ring()
        self.publish(1, 2)
        stream = Stream(self, "/api/v1/events?topics=jobs.progress&follow=false")
        self.successResultOf(stream.done)
        self.assertEqual(self.job_events(stream), ["job-1", "job-2"])

    def test_viewer_never_sees_audit_events(self) -> None:
        """The policy filters topics per client: a viewer's stream has no audit record."""
        admin = self.h.client()
        admin.token = self.token
        viewer_token, _ = self.h.token(admin, "viewer")
        self.token = viewer_token
        viewer = Stream(self, "/api/v1/events")
        admin.get("/api/v1/leadership")  # an audited decision
        self.publish(1)
        topics = {f["event"] for f in viewer.events()}
        self.assertIn("jobs.progress", topics)
        self.assertNotIn("audit", topics)
        viewer.close()

    def test_drops_are_reported(self) -> None:
        """A client that cannot keep up loses the oldest queued events and is told how many."""
        h = APIHarness(self, sse_queue=4)
        admin, _ = h.set_up()
        self.h, self.token = h, h.token(admin, "admin")[0]
        from treq.testing import StubTreq

        self.stub = StubTreq(h.router)
        stream = Stream(self, "/api/v1/events?topics=jobs.progress")
        (client,) = list(h.api.hub._streams)
        assert isinstance(client, EventStream)
        client.pauseProducing()
        self.publish(1)  # delivered, then held back while paused
        h.clock.advance(0)
        self.publish(*range(2, 12))  # 10 more into a queue of 4
        client.resumeProducing()
        frames = stream.frames()
        dropped = [f for f in frames if f.get("event") == "dropped"]
        self.assertEqual(sum(f["data"]["dropped"] for f in dropped), 6)
        self.assertEqual(len(self.job_events(stream)), 5)
        stream.close()

    def test_heartbeat_comments(self) -> None:
        """Idle streams get a comment line every heartbeat interval."""
        h = self.h
        h.api.hub.stop()
        h.api.hub.heartbeat = 5.0
        h.api.hub.start()
        stream = Stream(self, "/api/v1/events")
        h.clock.advance(5)
        h.clock.advance(5)
        comments = [f for f in stream.frames() if "comment" in f]
        self.assertEqual(len(comments), 2)
        stream.close()

    def assert_ended(self, stream: Stream, jobs: list[str]) -> None:
        """The stream got exactly ``jobs``, then one ``closed`` event, and is over."""
        frames = stream.frames()
        closed = [f for f in frames if f.get("event") == "closed"]
        self.assertEqual(len(closed), 1, frames)
        self.assertIn("has ended", closed[0]["data"]["reason"])
        self.assertEqual(self.job_events(stream), jobs)
        self.successResultOf(stream.done)
        self.assertEqual(self.h.api.hub.streams, 0)

    def test_a_revoked_token_ends_its_stream(self) -> None:
        """Revoking a token ends its open event streams at once; nothing more reaches them."""
        admin = self.h.client()
        admin.token = self.token
        viewer_token, viewer_id = self.h.token(admin, "viewer")
        self.token = viewer_token
        stream = Stream(self, "/api/v1/events?topics=jobs.*")
        self.publish(1)
        self.assertEqual(self.job_events(stream), ["job-1"])
        self.assertEqual(admin.delete(f"/api/v1/auth/tokens/{viewer_id}").code, 200)
        self.publish(2)
        self.assert_ended(stream, ["job-1"])

    def test_logout_ends_the_sessions_streams(self) -> None:
        """A session's event streams end when it logs out; a token's stream goes on."""
        session = self.h.client()
        self.assertEqual(session.post("/api/v1/auth/login", {"password": PASSWORD}).code, 200)
        cookie = {"cookie": f"piccolod_session={session.cookie}"}
        by_session = Stream(self, "/api/v1/events?topics=jobs.*", cookie, bearer=False)
        by_token = Stream(self, "/api/v1/events?topics=jobs.*")
        self.publish(1)
        self.assertEqual(self.job_events(by_session), ["job-1"])
        self.assertEqual(session.post("/api/v1/auth/logout").code, 200)
        self.publish(2)
        frames = by_session.frames()
        self.assertEqual(
            [f["data"]["reason"] for f in frames if f.get("event") == "closed"],
            ["the session or token that opened this stream has ended"],
        )
        self.assertEqual(self.job_events(by_session), ["job-1"])
        self.successResultOf(by_session.done)
        self.assertEqual(self.job_events(by_token), ["job-1", "job-2"])
        self.assertEqual(self.h.api.hub.streams, 1)
        by_token.close()

    def test_an_expired_token_ends_its_stream_at_a_heartbeat(self) -> None:
        """A token that expires while streaming is noticed at the next heartbeat."""
        self.h.api.hub.stop()
        self.h.api.hub.heartbeat = 15.0
        self.h.api.hub.start()
        admin = self.h.client()
        admin.token = self.token
        created = admin.post(
            "/api/v1/auth/tokens", {"name": "short", "role": "viewer", "expires_in": 60}
        )
        self.token = created.body["token"]
        stream = Stream(self, "/api/v1/events?topics=jobs.*")
        self.publish(1)
        self.assertEqual(self.job_events(stream), ["job-1"])
        self.h.clock.advance(45)  # heartbeats at 15, 30 and 45 s: still valid
        self.assertEqual(self.h.api.hub.streams, 1)
        self.h.clock.advance(15)  # the heartbeat at 60 s finds it expired
        self.assert_ended(stream, ["job-1"])

    def test_client_limit_and_cleanup(self) -> None:
        """Past sse_max_clients a stream is 429; a closed stream frees its slot and subscription."""
        before = len(self.h.bus.stats()["subscriptions"])
        streams = [Stream(self, "/api/v1/events") for _ in range(3)]
        # one subscription per stream, and the replay ring's
        self.assertEqual(len(self.h.bus.stats()["subscriptions"]), before + 4)
        refused = Stream(self, "/api/v1/events")
        self.assertEqual(refused.response.code, 429)
        for stream in streams:
            stream.close()
        self.h.clock.advance(0)
        self.assertEqual(len(self.h.bus.stats()["subscriptions"]), before + 1)
        self.assertEqual(self.h.api.hub.streams, 0)
        again = Stream(self, "/api/v1/events")
        self.assertEqual(again.response.code, 200)
        again.close()

    def test_the_ring_stops_after_the_resume_window(self) -> None:
        """With no stream for resume_window the ring stops and forgets; a resume is then a gap."""
        hub = self.h.api.hub
        stream = Stream(self, "/api/v1/events?topics=jobs.progress")
        ids = self.publish(1)
        stream.events()
        stream.close()
        self.assertTrue(hub.stats()["recording"])
        self.h.advance(hub.resume_window - 1)
        self.assertTrue(hub.stats()["recording"])
        self.h.advance(1)
        self.assertFalse(hub.stats()["recording"])
        self.assertEqual(len(hub), 0)
        self.publish(2)
        again = Stream(self, "/api/v1/events?topics=jobs.progress", {"Last-Event-ID": ids[0]})
        self.assertEqual([f["event"] for f in again.frames() if "event" in f], ["gap"])
        again.close()

    def test_no_audit_record_is_built_while_nobody_listens(self) -> None:
        """An idle API (no stream, no ring) leaves the audit topic without subscribers."""
        h = APIHarness(self)
        h.bus.stats()  # the harness's own audit collector is the only listener
        collectors = [s for s in h.bus.stats()["subscriptions"] if s.pattern in ("#", "audit")]
        self.assertEqual(len(collectors), 1)

    def test_bad_patterns(self) -> None:
        """A malformed topic pattern is a 400 before anything subscribes."""
        for query in ("topics=a..b", "topics=%23.a", "follow=maybe"):
            response = Stream(self, f"/api/v1/events?{query}")
            self.assertEqual(response.response.code, 400, query)
