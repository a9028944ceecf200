"""
``GET /api/v1/events``: the bus as Server-Sent Events.

**The replay ring.**  An :class:`EventHub` records every published envelope,
in publication order, into a bounded ring (``capacity`` events).  It does so
*synchronously*, from a bus subscription whose filter records the envelope
and then refuses it (nothing is ever queued for it; its ``filtered`` counter
counts the events recorded).  The ring runs while streams are open and for
``resume_window`` seconds after the last one closed (long enough for a
client to come back after a network blip), then stops and forgets: an idle
daemon keeps no ring in memory and, with nobody listening to ``audit``,
builds no audit record at all (publishers ask ``has_subscribers``).  A
``Last-Event-ID`` from before the ring (re)started is answered with a gap.

**One bus subscription per client.**  Each stream subscribes with its own
topic pattern(s), a bounded queue (``max_queue``, drop-oldest) and a filter
that also applies the policy (``events.read`` on ``topic:<topic>``, decided
once per topic per client).  A client that resumes with ``Last-Event-ID``
(the header, or ``?last_event_id=``) gets, first, every ring entry after that
id that was published before its subscription started, then the live events
of its subscription: since the ring records and the subscription queues in
the same synchronous ``publish`` call, nothing is missed and nothing comes
twice.  An id the ring no longer holds (too old, or from before a restart)
is answered with an explicit ``gap`` event, followed by the whole ring.

**Back-pressure.**  Each stream is a push producer of its response: while
the socket's buffer is full, deliveries wait, the subscription's queue fills
and drops its oldest events; drops are reported to the client as a
``dropped`` event with the count (never silently).  Frames are encoded once
per event (a bounded memo shared by all clients) and written once per batch.

Frames::

    id: <event id>
    event: <topic>
    data: {"topic", "type", "key", "event": {...}, "id", "time", "source", "correlation_id"}

plus ``event: gap`` and ``event: dropped`` (no ``id``), and a comment line
(``: ping``) every ``heartbeat`` seconds.

Tests: ``tests/unit/test_api_sse.py``, ``tests/integration/test_api_sse.py``.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from piccolod.errors import InvalidCommand, QuotaExceeded
from piccolod.events import Envelope
from piccolod.interfaces import IEventBus, ISubscription, Overflow
from piccolod.kernel.bus import TopicPattern, parse_pattern

from .http import SECURITY_HEADERS

__all__ = ["EventHub", "EventStream", "parse_topics"]

#: Patterns one stream may ask for.
MAX_PATTERNS = 16


def parse_topics(text: str | None) -> list[TopicPattern]:
    """``a.*,b.#`` → patterns (``#``, every topic, when empty); raises ``InvalidCommand``."""
    if not text:
        return [parse_pattern("#")]
    items = [t.strip() for t in text.split(",")]
    if len(items) > MAX_PATTERNS:
        raise InvalidCommand(f"at most {MAX_PATTERNS} topic patterns")
    return [parse_pattern(t) for t in items]


def _no_delivery(_envelope: Envelope[Any]) -> None:
    """The ring's subscription never receives anything (its filter refuses all)."""


@attrs.define(eq=False)
class EventHub:
    """
    The replay ring, the frame memo, the heartbeat and the set of streams.

    @ivar capacity: events kept for ``Last-Event-ID`` resumption.
    @ivar max_queue: each stream's bus queue.
    @ivar max_clients: concurrent streams (more are refused with 429).
    @ivar frame_cache: encoded frames memoised (only while streams exist).
    """

    log: ClassVar[Logger] = Logger()

    bus: IEventBus
    clock: IReactorTime
    capacity: int = 4096
    max_queue: int = 16384
    max_clients: int = 256
    heartbeat: float = 15.0
    frame_cache: int = 16384
    resume_window: float = 300.0
    _ring: deque[tuple[int, Envelope[Any]]] = attrs.field(init=False, factory=deque)
    _seq_of: dict[str, int] = attrs.field(init=False, factory=dict)
    _next: int = attrs.field(init=False, default=0)
    _tap: ISubscription | None = attrs.field(init=False, default=None)
    _streams: set[EventStream] = attrs.field(init=False, factory=set)
    _frames: dict[str, bytes] = attrs.field(init=False, factory=dict)
    _frame_order: deque[str] = attrs.field(init=False, factory=deque)
    _beat: LoopingCall | None = attrs.field(init=False, default=None)
    _idle_call: Any = attrs.field(init=False, default=None)
    _running: bool = attrs.field(init=False, default=False)

    def start(self) -> None:
        """Accept streams (the ring starts with the first one)."""
        self._running = True

    def stop(self) -> None:
        self._running = False
        for stream in list(self._streams):
            stream.close("the API is stopping")
        self._stop_beat()
        self._forget()

    def touch(self) -> None:
        """Start the ring if it is not running; it runs on for ``resume_window``."""
        if self._tap is None and self._running:
            self._tap = self.bus.subscribe(
                "#", _no_delivery, filter=self._record, max_queue=1, name="api.sse-replay-ring"
            )
        if not self._streams:
            self._forget_later()

    def _forget_later(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = self.clock.callLater(self.resume_window, self._forget)

    def _forget(self) -> None:
        """Stop the ring and drop what it holds (nobody has streamed for a while)."""
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._tap is not None:
            self._tap.cancel()
            self._tap = None
        self._ring.clear()
        self._seq_of.clear()
        self._frames.clear()
        self._frame_order.clear()

    def _stop_beat(self) -> None:
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        self._beat = None

    # -- the ring --------------------------------------------------------------

    def _record(self, envelope: Envelope[Any]) -> bool:
        seq = self._next
        self._next = seq + 1
        ring = self._ring
        if len(ring) >= self.capacity:
            _, old = ring.popleft()
            self._seq_of.pop(old.context.event_id, None)
        ring.append((seq, envelope))
        self._seq_of[envelope.context.event_id] = seq
        return False

    @property
    def next_seq(self) -> int:
        return self._next

    def seq_of(self, event_id: str) -> int | None:
        return self._seq_of.get(event_id)

    def between(self, after: int | None, before: int) -> list[Envelope[Any]]:
        """Ring entries with ``after < seq < before`` (from the oldest if ``after`` is None)."""
        out = []
        for seq, envelope in self._ring:
            if seq >= before:
                break
            if after is None or seq > after:
                out.append(envelope)
        return out

    def __len__(self) -> int:
        return len(self._ring)

    # -- frames ----------------------------------------------------------------

    def frame(self, envelope: Envelope[Any]) -> bytes:
        """``envelope`` as an SSE frame, encoded once while streams exist."""
        event_id = envelope.context.event_id
        cached = self._frames.get(event_id)
        if cached is not None:
            return cached
        data = json.dumps(envelope.to_json(), separators=(",", ":"), default=_json_default)
        frame = f"id: {event_id}\nevent: {envelope.topic}\ndata: {data}\n\n".encode()
        if self._streams:
            frames = self._frames
            order = self._frame_order
            if len(order) >= self.frame_cache:
                frames.pop(order.popleft(), None)
            frames[event_id] = frame
            order.append(event_id)
        return frame

    # -- streams ---------------------------------------------------------------

    def admit(self) -> None:
        if len(self._streams) >= self.max_clients:
            raise QuotaExceeded(
                f"at most {self.max_clients} event streams at once", retry_after=5.0
            )

    def add(self, stream: EventStream) -> None:
        self._streams.add(stream)
        self.touch()
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._beat is None and self.heartbeat > 0:
            self._beat = LoopingCall(self._heartbeat)
            self._beat.clock = self.clock
            self._beat.start(self.heartbeat, now=False)

    def remove(self, stream: EventStream) -> None:
        if stream not in self._streams:
            return
        self._streams.discard(stream)
        if not self._streams:
            self._frames.clear()
            self._frame_order.clear()
            self._stop_beat()
            if self._running:
                self._forget_later()

    @property
    def streams(self) -> int:
        return len(self._streams)

    def revalidate(self) -> int:
        """
        End every stream whose session or token no longer authenticates
        (logged out, revoked, expired), with a last ``closed`` event; answer
        how many.  The API calls it after logout, password changes and token
        revocation; every heartbeat calls it too, which catches expiry.
        """
        ended = 0
        for stream in list(self._streams):
            if not stream.still_valid():
                stream.end("the session or token that opened this stream has ended")
                ended += 1
        return ended

    def _heartbeat(self) -> None:
        self.revalidate()
        for stream in list(self._streams):
            stream.write(b": ping\n\n")

    def stats(self) -> dict[str, Any]:
        return {
            "streams": len(self._streams),
            "recording": self._tap is not None,
            "ring": len(self._ring),
            "capacity": self.capacity,
            "next_seq": self._next,
            "frames_cached": len(self._frames),
        }


def _json_default(value: Any) -> Any:
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json()
    if attrs.has(type(value)):
        return attrs.asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


@implementer(IPushProducer)
@attrs.define(eq=False)
class EventStream:
    """
    One client's stream: its bus subscription, its write buffer and its
    place in the ring.

    @ivar allowed: ``topic -> bool``: whether this client may see a topic
        (the policy engine, decided once per topic).
    @ivar still_valid: whether the credential that opened the stream (a
        session, a token) still authenticates: logout, password change,
        token revocation and expiry end the stream.
    """

    hub: EventHub
    request: Request
    patterns: Sequence[TopicPattern]
    allowed: Callable[[str], bool]
    #: Whether the session or token that opened the stream still holds;
    #: the hub ends the stream once it does not (:meth:`EventHub.revalidate`).
    still_valid: Callable[[], bool] = lambda: True
    _subscription: ISubscription | None = attrs.field(init=False, default=None)
    _buffer: list[bytes] = attrs.field(init=False, factory=list)
    _flush_call: Any = attrs.field(init=False, default=None)
    _paused: Deferred[None] | None = attrs.field(init=False, default=None)
    _is_paused: bool = attrs.field(init=False, default=False)
    _verdicts: dict[str, bool] = attrs.field(init=False, factory=dict)
    _dropped_seen: int = attrs.field(init=False, default=0)
    _last_id: str | None = attrs.field(init=False, default=None)
    closed: bool = attrs.field(init=False, default=False)
    sent: int = attrs.field(init=False, default=0)

    def wants(self, topic: str) -> bool:
        verdict = self._verdicts.get(topic)
        if verdict is None:
            self._verdicts[topic] = False  # while deciding: never re-entrant
            verdict = any(p.matches(topic) for p in self.patterns) and self.allowed(topic)
            self._verdicts[topic] = verdict
        return verdict

    def _filter(self, envelope: Envelope[Any]) -> bool:
        return self.wants(envelope.topic)

    def open(self, last_event_id: str | None, follow: bool) -> None:
        """
        Send the headers and the replay, and with ``follow`` subscribe.
        The replay is what the ring holds after ``last_event_id``; without
        an id, nothing when following, else the whole ring.
        """
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"x-accel-buffering", b"no")
        channel = getattr(request, "channel", None)
        if follow and channel is not None and hasattr(channel, "setTimeout"):
            channel.setTimeout(None)  # a stream is long-lived by design
        if follow:
            pattern = self.patterns[0].pattern if len(self.patterns) == 1 else "#"
            self._subscription = self.hub.bus.subscribe(
                pattern,
                self.deliver,
                filter=self._filter,
                max_queue=self.hub.max_queue,
                overflow=Overflow.DROP_OLDEST,
                name="api.sse",
            )
            self.hub.add(self)
            request.registerProducer(self, True)
            request.notifyFinish().addBoth(self._finished)
        else:
            self.hub.touch()
        end = self.hub.next_seq  # everything from here on arrives through the subscription
        chunks = [b"retry: 2000\n\n"]
        after: int | None = None
        if last_event_id:
            after = self.hub.seq_of(last_event_id)
            if after is None:
                chunks.append(
                    _control(
                        "gap",
                        {
                            "last_event_id": last_event_id,
                            "reason": "the id is not in the replay ring (too old, or from "
                            "before a restart); what the ring holds follows",
                        },
                    )
                )
        if last_event_id or not follow:
            for envelope in self.hub.between(after, end):
                if self.wants(envelope.topic):
                    chunks.append(self.hub.frame(envelope))
                    self._last_id = envelope.context.event_id
                    self.sent += 1
        request.write(b"".join(chunks))
        if not follow:
            request.finish()

    def deliver(self, envelope: Envelope[Any]) -> Deferred[None] | None:
        if self.closed:
            return None
        self._buffer.append(self.hub.frame(envelope))
        self._last_id = envelope.context.event_id
        self.sent += 1
        if self._flush_call is None:
            self._flush_call = self.hub.clock.callLater(0, self.flush)
        if self._is_paused:
            if self._paused is None:
                self._paused = Deferred()
            return self._paused
        return None

    def flush(self) -> None:
        self._flush_call = None
        if self.closed:
            return
        chunks = self._buffer
        self._buffer = []
        subscription = self._subscription
        if subscription is not None:
            dropped = subscription.stats().dropped
            if dropped > self._dropped_seen:
                chunks.append(
                    _control(
                        "dropped",
                        {
                            "dropped": dropped - self._dropped_seen,
                            "total": dropped,
                            "last_event_id": self._last_id,
                        },
                    )
                )
                self._dropped_seen = dropped
        if chunks:
            self.request.write(b"".join(chunks))

    def write(self, data: bytes) -> None:
        if not self.closed and not self._is_paused:
            self.request.write(data)

    # -- IPushProducer -----------------------------------------------------------

    def pauseProducing(self) -> None:
        self._is_paused = True

    def resumeProducing(self) -> None:
        self._is_paused = False
        waiting, self._paused = self._paused, None
        if waiting is not None:
            waiting.callback(None)
        if self._buffer and self._flush_call is None:
            self._flush_call = self.hub.clock.callLater(0, self.flush)

    def stopProducing(self) -> None:
        self.close("the connection was closed")

    # -- ending ------------------------------------------------------------------

    def _finished(self, result: Failure | None) -> None:
        self.close("the client went away")

    def end(self, reason: str) -> None:
        """Tell the client why (a ``closed`` event), then close the stream."""
        if self.closed:
            return
        self._buffer = []  # nothing more for a client whose credential has ended
        request = self.request
        if not request.finished and not request._disconnected:  # type: ignore[attr-defined]
            request.write(_control("closed", {"reason": reason}))
        self.close(reason)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.hub.remove(self)
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None
        waiting, self._paused = self._paused, None
        if waiting is not None:
            waiting.callback(None)
        request = self.request
        if not request.finished and not request._disconnected:  # type: ignore[attr-defined]
            try:
                request.unregisterProducer()
                request.finish()
            except Exception:
                pass


def _control(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
