"""
A fake etcd v3 cluster behind its JSON gateway, for tests.

:class:`FakeEtcd` keeps an MVCC key space (one revision per write, create
and mod revisions, versions), leases that expire on an injected clock
(attached keys deleted in one revision, as a revoke does), transactions
with compares, and streaming watches (one JSON line per batch, replay from
a start revision, cancellation after compaction).  It serves etcd's
gateway paths as a ``twisted.web`` resource, so the real
:class:`~piccolod.consensus.etcd_client.EtcdClient` runs on top of it
through ``treq.testing.StubTreq``: only the socket is fake.  The same
contract suite (``tests/contracts/etcd.py``) runs against it and against a
real etcd.

Faults are injected per member and per client:

- :meth:`FakeEtcd.stop_member` (connection refused), :meth:`~FakeEtcd.hang_member`
  (accepts, never answers), :meth:`~FakeEtcd.start_member`;
- :meth:`FakeEtcd.lose_quorum`: writes, linearizable reads and lease calls
  hang (and answer code 14 "request timed out" after ``quorum_timeout``),
  ``/health`` says false, leases do not expire; :meth:`~FakeEtcd.restore_quorum`
  renews every lease to its full TTL (as a new etcd leader does);
- :class:`FakeEtcdHTTP` ``refuse``/``blackhole``: one client cut off.

Answers written after a request returned (watch events, hung requests)
reach the client on :meth:`FakeEtcd.pump`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

__all__ = ["FakeEtcd", "FakeEtcdHTTP"]

UP = "up"
DOWN = "down"
HUNG = "hung"

CLUSTER_ID = "14841639068965178418"


class _Refusal(Exception):
    """An etcd error answer: gRPC ``code``, HTTP ``status`` and message."""

    def __init__(self, code: int, status: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message


def _bad(message: str) -> _Refusal:
    return _Refusal(3, 400, message)


LEASE_NOT_FOUND = (5, 404, "etcdserver: requested lease not found")


@attrs.define
class _KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": _b64(self.key),
            "create_revision": str(self.create_revision),
            "mod_revision": str(self.mod_revision),
            "version": str(self.version),
        }
        if self.value:
            out["value"] = _b64(self.value)
        if self.lease:
            out["lease"] = str(self.lease)
        return out


@attrs.define
class _Lease:
    id: int
    ttl: int
    expires_at: float
    keys: set[bytes] = attrs.field(factory=set)
    timer: IDelayedCall | None = None


@attrs.define
class _Event:
    revision: int
    type: str
    kv: _KV
    prev: _KV | None

    def to_json(self, prev_kv: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.type == "DELETE":
            out["type"] = "DELETE"
            out["kv"] = {"key": _b64(self.kv.key), "mod_revision": str(self.revision)}
        else:
            out["kv"] = self.kv.to_json()
        if prev_kv and self.prev is not None:
            out["prev_kv"] = self.prev.to_json()
        return out


@attrs.define(eq=False)
class _Watcher:
    request: Request
    member: str
    key: bytes
    range_end: bytes | None
    prev_kv: bool

    def matches(self, key: bytes) -> bool:
        return _in_range(key, self.key, self.range_end)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, what: str) -> bytes:
    if value is None or value == "":
        return b""
    if not isinstance(value, str):
        raise _bad(f"{what}: expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise _bad("illegal base64 data at input byte 0") from None


def _int(value: Any, what: str) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _bad(f"{what}: expected an integer")
    try:
        return int(value)
    except ValueError:
        raise _bad(f"{what}: expected an integer") from None


def _field(body: Mapping[str, Any], snake: str) -> Any:
    """The gateway accepts both snake_case and camelCase field names."""
    if snake in body:
        return body[snake]
    head, *rest = snake.split("_")
    return body.get(head + "".join(part.title() for part in rest))


def _in_range(key: bytes, start: bytes, end: bytes | None) -> bool:
    if end is None or end == b"":
        return key == start
    if end == b"\0":
        return key >= start
    return start <= key < end


def _host(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


class FakeEtcd:
    """
    An in-memory etcd cluster with the members ``member_urls`` (all sharing
    one key space), whose leases expire on ``clock``.

    @ivar calls: every request served, as ``(member url, path, body)``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        member_urls: Sequence[str] = ("http://etcd-1:2379",),
        min_ttl: int = 1,
        quorum_timeout: float = 7.0,
    ) -> None:
        self.clock = clock
        self.member_urls = tuple(member_urls)
        self.min_ttl = min_ttl
        self.quorum_timeout = quorum_timeout
        self.revision = 1
        self.compacted = 0
        self.quorum = True
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self._kvs: dict[bytes, _KV] = {}
        self._history: list[_Event] = []
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 7587870000000000000
        self._watchers: list[_Watcher] = []
        self._hung: list[Request] = []
        self._modes: dict[str, str] = {url: UP for url in self.member_urls}
        self._by_host = {_host(url): url for url in self.member_urls}
        self._member_ids = {url: str(1000 + i) for i, url in enumerate(self.member_urls)}
        self._gateway = _Gateway(self)
        self._clients: list[FakeEtcdHTTP] = []
        #: Bytes written to streams since start; :meth:`pump` runs until it settles.
        self._writes = 0

    # -- clients ----------------------------------------------------------------

    def resource(self) -> Resource:
        """The gateway as a ``twisted.web`` resource (the Host header names the member)."""
        return self._gateway

    def http(self) -> FakeEtcdHTTP:
        """
        A treq-like client for one :class:`EtcdClient`, on its own
        in-memory connections (faults and pauses are per client).
        """
        client = FakeEtcdHTTP(self, StubTreq(self._gateway))  # type: ignore[no-untyped-call]
        self._clients.append(client)
        return client

    def pump(self) -> None:
        """
        Deliver everything written since the requests returned (watch
        lines, late answers) to every client that is not paused.
        """
        for _ in range(100):
            before = self._writes
            for client in list(self._clients):
                if not client.paused:
                    client.flush()
            if self._writes == before:
                return
        raise AssertionError("FakeEtcd.pump: the fake does not settle")

    # -- faults -----------------------------------------------------------------

    def stop_member(self, url: str) -> None:
        """The member refuses connections; its open streams are cut."""
        self._set_mode(url, DOWN)
        for watcher in [w for w in self._watchers if w.member == url]:
            self._watchers.remove(watcher)
            _abort(watcher.request)
        for request in list(self._hung):
            if getattr(request, "_fake_member", None) == url:
                self._hung.remove(request)
                _abort(request)

    def hang_member(self, url: str) -> None:
        """The member accepts requests and never answers (a SIGSTOPped process)."""
        self._set_mode(url, HUNG)

    def start_member(self, url: str) -> None:
        self._set_mode(url, UP)

    def mode(self, url: str) -> str:
        return self._modes[url]

    def _set_mode(self, url: str, mode: str) -> None:
        if url not in self._modes:
            raise KeyError(f"no member {url!r}")
        self._modes[url] = mode

    def lose_quorum(self) -> None:
        """Writes, linearizable reads and lease calls hang; leases stop expiring."""
        self.quorum = False
        for lease in self._leases.values():
            if lease.timer is not None and lease.timer.active():
                lease.timer.cancel()
            lease.timer = None

    def restore_quorum(self) -> None:
        """A new leader: every lease gets its full TTL again."""
        self.quorum = True
        for lease in self._leases.values():
            self._renew(lease)

    # -- inspection -------------------------------------------------------------

    def get(self, key: bytes) -> _KV | None:
        return self._kvs.get(key)

    def keys(self, prefix: bytes = b"") -> list[bytes]:
        return sorted(k for k in self._kvs if k.startswith(prefix))

    def lease_alive(self, lease_id: int) -> bool:
        return lease_id in self._leases

    def lease_expiry(self, lease_id: int) -> float | None:
        """When the lease expires (``inf`` while the quorum is lost), ``None`` if gone."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return None
        return lease.expires_at if self.quorum else float("inf")

    def leases(self) -> list[int]:
        return sorted(self._leases)

    def watchers(self) -> int:
        return len(self._watchers)

    def count(self, path: str) -> int:
        """How many requests reached ``path`` (e.g. ``"lease/keepalive"``)."""
        return sum(1 for _, p, _ in self.calls if p == path)

    def compact(self, revision: int) -> None:
        """Forget history up to ``revision``: older watches are canceled."""
        self.compacted = max(self.compacted, revision)
        self._history = [e for e in self._history if e.revision >= revision]

    # -- the model ----------------------------------------------------------------

    def _header(self, member: str) -> dict[str, Any]:
        return {
            "cluster_id": CLUSTER_ID,
            "member_id": self._member_ids[member],
            "revision": str(self.revision),
            "raft_term": "2",
        }

    def _need_quorum(self) -> None:
        if not self.quorum:
            raise _NoQuorum()

    def _put(
        self, key: bytes, value: bytes, lease: int, revision: int, events: list[_Event]
    ) -> None:
        if not key:
            raise _bad("etcdserver: key is not provided")
        old = self._kvs.get(key)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        kv = _KV(
            key=key,
            value=value,
            create_revision=old.create_revision if old is not None else revision,
            mod_revision=revision,
            version=(old.version + 1) if old is not None else 1,
            lease=lease,
        )
        self._kvs[key] = kv
        if lease:
            self._leases[lease].keys.add(key)
        events.append(_Event(revision, "PUT", attrs.evolve(kv), old))

    def _delete(self, start: bytes, end: bytes | None, revision: int, events: list[_Event]) -> int:
        doomed = sorted(k for k in self._kvs if _in_range(k, start, end))
        for key in doomed:
            old = self._kvs.pop(key)
            if old.lease and old.lease in self._leases:
                self._leases[old.lease].keys.discard(key)
            events.append(_Event(revision, "DELETE", _KV(key, b"", 0, revision, 0, 0), old))
        return len(doomed)

    def _range(self, body: Mapping[str, Any]) -> dict[str, Any]:
        key = _unb64(_field(body, "key"), "key")
        end_raw = _field(body, "range_end")
        end = _unb64(end_raw, "range_end") if end_raw else None
        found = [self._kvs[k] for k in sorted(self._kvs) if _in_range(k, key, end)]
        limit = _int(_field(body, "limit"), "limit")
        out: dict[str, Any] = {}
        if _field(body, "count_only"):
            out["count"] = str(len(found))
            return out
        shown = found[:limit] if limit else found
        if shown:
            out["kvs"] = [
                {k: v for k, v in kv.to_json().items() if k == "key"}
                if _field(body, "keys_only")
                else kv.to_json()
                for kv in shown
            ]
        if found:
            out["count"] = str(len(found))
        if limit and len(found) > limit:
            out["more"] = True
        return out

    def _compare(self, compare: Mapping[str, Any]) -> bool:
        key = _unb64(_field(compare, "key"), "compare key")
        target = compare.get("target", "VERSION")
        result = compare.get("result", "EQUAL")
        kv = self._kvs.get(key)
        have: Any
        want: Any
        if target == "CREATE":
            have, want = (
                (kv.create_revision if kv else 0),
                _int(_field(compare, "create_revision"), "create_revision"),
            )
        elif target == "MOD":
            have, want = (
                (kv.mod_revision if kv else 0),
                _int(_field(compare, "mod_revision"), "mod_revision"),
            )
        elif target == "VERSION":
            have, want = (kv.version if kv else 0), _int(_field(compare, "version"), "version")
        elif target == "LEASE":
            have, want = (kv.lease if kv else 0), _int(_field(compare, "lease"), "lease")
        elif target == "VALUE":
            if kv is None:
                return False
            have, want = kv.value, _unb64(_field(compare, "value"), "value")
        else:
            raise _bad(f"unknown compare target {target!r}")
        if result == "EQUAL":
            return bool(have == want)
        if result == "NOT_EQUAL":
            return bool(have != want)
        if result == "GREATER":
            return bool(have > want)
        if result == "LESS":
            return bool(have < want)
        raise _bad(f"unknown compare result {result!r}")

    def _apply(
        self, ops: Sequence[Any], revision: int, events: list[_Event]
    ) -> list[dict[str, Any]]:
        responses: list[dict[str, Any]] = []
        for op in ops:
            if not isinstance(op, Mapping):
                raise _bad("a txn request must be an object")
            put = _field(op, "request_put")
            rng = _field(op, "request_range")
            delete = _field(op, "request_delete_range")
            if put is not None:
                lease = _int(_field(put, "lease"), "lease")
                if lease and lease not in self._leases:
                    raise _Refusal(*LEASE_NOT_FOUND)
                self._put(
                    _unb64(_field(put, "key"), "key"),
                    _unb64(_field(put, "value"), "value"),
                    lease,
                    revision,
                    events,
                )
                responses.append({"response_put": {"header": {"revision": str(revision)}}})
            elif rng is not None:
                answer = self._range(rng)
                answer["header"] = {"revision": str(self.revision)}
                responses.append({"response_range": answer})
            elif delete is not None:
                key = _unb64(_field(delete, "key"), "key")
                end_raw = _field(delete, "range_end")
                deleted = self._delete(
                    key, _unb64(end_raw, "range_end") if end_raw else None, revision, events
                )
                answer = {"header": {"revision": str(revision)}}
                if deleted:
                    answer["deleted"] = str(deleted)
                responses.append({"response_delete_range": answer})
            else:
                raise _bad("unknown txn request")
        return responses

    def _check_leases(self, ops: Sequence[Any]) -> None:
        for op in ops:
            put = _field(op, "request_put") if isinstance(op, Mapping) else None
            if put is not None:
                lease = _int(_field(put, "lease"), "lease")
                if lease and lease not in self._leases:
                    raise _Refusal(*LEASE_NOT_FOUND)

    def _commit(self, events: list[_Event]) -> None:
        """Record a write's events (one revision) and send them to the watchers."""
        if not events:
            return
        self._history.extend(events)
        for watcher in list(self._watchers):
            mine = [e for e in events if watcher.matches(e.kv.key)]
            if mine:
                self._send(watcher, mine)

    def _send(self, watcher: _Watcher, events: Sequence[_Event]) -> None:
        line = {
            "result": {
                "header": self._header(watcher.member),
                "events": [e.to_json(watcher.prev_kv) for e in events],
            }
        }
        self._write_line(watcher.request, line)

    def _write_line(self, request: Request, message: Mapping[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        self._writes += len(data)
        request.write(data)

    # leases

    def _grant(self, ttl: int) -> _Lease:
        self._next_lease += 1
        lease = _Lease(id=self._next_lease, ttl=max(ttl, self.min_ttl), expires_at=0.0)
        self._leases[lease.id] = lease
        self._renew(lease)
        return lease

    def _renew(self, lease: _Lease) -> None:
        if lease.timer is not None and lease.timer.active():
            lease.timer.cancel()
        lease.expires_at = self.clock.seconds() + lease.ttl
        lease.timer = self.clock.callLater(lease.ttl, self._expire, lease.id)

    def _expire(self, lease_id: int) -> None:
        lease = self._leases.get(lease_id)
        if lease is not None and self.quorum:
            self._revoke(lease)

    def _revoke(self, lease: _Lease) -> None:
        del self._leases[lease.id]
        if lease.timer is not None and lease.timer.active():
            lease.timer.cancel()
        lease.timer = None
        if lease.keys:
            self.revision += 1
            events: list[_Event] = []
            for key in sorted(lease.keys):
                self._delete(key, None, self.revision, events)
            self._commit(events)

    # -- serving ----------------------------------------------------------------

    def _serve(self, member: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One unary call; returns the answer or raises ``_Refusal``/``_NoQuorum``."""
        if path == "kv/range":
            if not _field(body, "serializable"):
                self._need_quorum()
            answer = self._range(body)
        elif path == "kv/put":
            self._need_quorum()
            lease = _int(_field(body, "lease"), "lease")
            if lease and lease not in self._leases:
                raise _Refusal(*LEASE_NOT_FOUND)
            events: list[_Event] = []
            self.revision += 1
            self._put(
                _unb64(_field(body, "key"), "key"),
                _unb64(_field(body, "value"), "value"),
                lease,
                self.revision,
                events,
            )
            self._commit(events)
            answer = {}
        elif path == "kv/deleterange":
            self._need_quorum()
            key = _unb64(_field(body, "key"), "key")
            end_raw = _field(body, "range_end")
            end = _unb64(end_raw, "range_end") if end_raw else None
            answer = {}
            if any(_in_range(k, key, end) for k in self._kvs):
                events = []
                self.revision += 1
                answer["deleted"] = str(self._delete(key, end, self.revision, events))
                self._commit(events)
        elif path == "kv/txn":
            self._need_quorum()
            compares = body.get("compare") or []
            if not isinstance(compares, list):
                raise _bad("compare must be a list")
            ok = all(self._compare(c) for c in compares)
            ops = body.get("success" if ok else "failure") or []
            if not isinstance(ops, list):
                raise _bad("txn requests must be a list")
            self._check_leases(ops)
            writes = any(
                isinstance(op, Mapping)
                and (_field(op, "request_put") is not None or _field(op, "request_delete_range"))
                for op in ops
            )
            revision = self.revision + 1 if writes else self.revision
            events = []
            responses = self._apply(ops, revision, events)
            if events:  # like etcd: a txn that changed nothing keeps the revision
                self.revision = revision
            self._commit(events)
            answer = {}
            if ok:
                answer["succeeded"] = True
            if responses:
                answer["responses"] = responses
        elif path == "kv/compaction":
            self._need_quorum()
            self.compact(_int(_field(body, "revision"), "revision"))
            answer = {}
        elif path == "lease/grant":
            self._need_quorum()
            ttl = _int(_field(body, "TTL"), "TTL")
            if ttl <= 0:
                raise _bad("etcdserver: lease TTL must be positive")
            granted = self._grant(ttl)
            answer = {"ID": str(granted.id), "TTL": str(granted.ttl)}
        elif path == "lease/keepalive":
            self._need_quorum()
            lease_id = _int(_field(body, "ID"), "ID")
            found = self._leases.get(lease_id)
            result: dict[str, Any] = {"header": self._header(member), "ID": str(lease_id)}
            if found is not None:
                self._renew(found)
                result["TTL"] = str(found.ttl)
            return {"result": result}
        elif path == "lease/revoke":
            self._need_quorum()
            found = self._leases.get(_int(_field(body, "ID"), "ID"))
            if found is None:
                raise _Refusal(*LEASE_NOT_FOUND)
            self._revoke(found)
            answer = {}
        elif path == "lease/timetolive":
            self._need_quorum()
            lease_id = _int(_field(body, "ID"), "ID")
            found = self._leases.get(lease_id)
            answer = {"ID": str(lease_id)}
            if found is not None:
                remaining = int(found.expires_at - self.clock.seconds() + 0.999)
                answer.update(TTL=str(max(0, remaining)), grantedTTL=str(found.ttl))
                if _field(body, "keys"):
                    answer["keys"] = [_b64(k) for k in sorted(found.keys)]
            else:
                answer["TTL"] = "-1"
        elif path == "maintenance/status":
            answer = {"version": "3.4.23-fake"}
            if self.quorum:
                answer["leader"] = self._member_ids[self.member_urls[0]]
        else:
            raise _Refusal(12, 404, f"unknown path /v3/{path}")
        answer["header"] = self._header(member)
        return answer

    def _watch(self, member: str, request: Request, body: dict[str, Any]) -> None:
        create = _field(body, "create_request")
        if not isinstance(create, Mapping):
            raise _Refusal(2, 400, "a watch needs create_request")
        key = _unb64(_field(create, "key"), "key")
        end_raw = _field(create, "range_end")
        watcher = _Watcher(
            request=request,
            member=member,
            key=key,
            range_end=_unb64(end_raw, "range_end") if end_raw else None,
            prev_kv=bool(_field(create, "prev_kv")),
        )
        start = _int(_field(create, "start_revision"), "start_revision")
        request.setHeader(b"content-type", b"application/json")
        self._write_line(request, {"result": {"header": self._header(member), "created": True}})
        if start and start < self.compacted:
            self._write_line(
                request,
                {
                    "result": {
                        "header": {"cluster_id": CLUSTER_ID, "raft_term": "2"},
                        "canceled": True,
                        "compact_revision": str(self.compacted),
                    }
                },
            )
            request.finish()
            return
        if start:
            backlog = [
                e for e in self._history if e.revision >= start and watcher.matches(e.kv.key)
            ]
            for batch in _by_revision(backlog):
                self._send(watcher, batch)
        self._watchers.append(watcher)

        def gone(_: object) -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        request.notifyFinish().addBoth(gone)

    def _hang(self, request: Request, answer_after: float | None) -> None:
        self._hung.append(request)

        def gone(_: object) -> None:
            if request in self._hung:
                self._hung.remove(request)

        request.notifyFinish().addBoth(gone)
        if answer_after is not None:

            def timed_out() -> None:
                if request in self._hung:
                    self._hung.remove(request)
                    _answer(request, 503, _error_body(14, "etcdserver: request timed out"))
                    self._writes += 1

            self.clock.callLater(answer_after, timed_out)


class _NoQuorum(Exception):
    """The request needs a quorum the fake does not have."""


def _by_revision(events: Sequence[_Event]) -> Iterator[list[_Event]]:
    batch: list[_Event] = []
    for event in events:
        if batch and batch[0].revision != event.revision:
            yield batch
            batch = []
        batch.append(event)
    if batch:
        yield batch


def _error_body(code: int, message: str) -> dict[str, Any]:
    return {"error": message, "message": message, "code": code}


def _answer(request: Request, status: int, body: Mapping[str, Any]) -> None:
    if request.finished or request._disconnected:  # type: ignore[attr-defined]
        return
    data = json.dumps(body, separators=(",", ":")).encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(data)).encode())
    request.write(data)
    request.finish()


def _abort(request: Request) -> None:
    transport = request.channel.transport if request.channel is not None else None
    if transport is not None:
        transport.abortConnection()  # type: ignore[attr-defined]


class _Gateway(Resource):
    """The gateway: dispatches on the path; the Host header names the member."""

    isLeaf = True

    def __init__(self, etcd: FakeEtcd) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.etcd = etcd

    def _member(self, request: Request) -> str:
        host = (request.getHeader(b"host") or b"").decode("ascii", "replace")
        member = self.etcd._by_host.get(host)
        if member is None:
            raise AssertionError(f"FakeEtcd: a request for an unknown member {host!r}")
        return member

    def render_GET(self, request: Request) -> bytes | int:
        etcd = self.etcd
        member = self._member(request)
        request._fake_member = member  # type: ignore[attr-defined]
        path = (request.path or b"").decode()
        etcd.calls.append((member, path, {}))
        if etcd.mode(member) == HUNG:
            etcd._hang(request, None)
            return NOT_DONE_YET
        if path != "/health":
            _answer(request, 404, _error_body(12, "Not Found"))
            return NOT_DONE_YET
        _answer(request, 200, {"health": "true" if etcd.quorum else "false"})
        return NOT_DONE_YET

    def render_POST(self, request: Request) -> bytes | int:
        etcd = self.etcd
        member = self._member(request)
        request._fake_member = member  # type: ignore[attr-defined]
        raw_path = (request.path or b"").decode()
        if not raw_path.startswith("/v3/"):
            _answer(request, 404, _error_body(12, "Not Found"))
            return NOT_DONE_YET
        path = raw_path[len("/v3/") :]
        assert request.content is not None
        raw = request.content.read()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            _answer(request, 400, _error_body(3, f"invalid JSON: {e}"))
            return NOT_DONE_YET
        if not isinstance(body, dict):
            _answer(request, 400, _error_body(3, "the body must be an object"))
            return NOT_DONE_YET
        etcd.calls.append((member, path, body))
        if etcd.mode(member) == HUNG:
            etcd._hang(request, None)
            return NOT_DONE_YET
        try:
            if path == "watch":
                etcd._watch(member, request, body)
                return NOT_DONE_YET
            answer = etcd._serve(member, path, body)
        except _Refusal as e:
            _answer(request, e.status, _error_body(e.code, e.message))
            return NOT_DONE_YET
        except _NoQuorum:
            etcd._hang(request, etcd.quorum_timeout)
            return NOT_DONE_YET
        data = json.dumps(answer, separators=(",", ":")).encode()
        if path == "lease/keepalive":
            data += b"\n"  # a streaming endpoint: one line per answer
        request.setHeader(b"content-type", b"application/json")
        return data


@attrs.define(eq=False)
class FakeEtcdHTTP:
    """
    What an ``EtcdClient`` gets as ``http``: a StubTreq of the fake's
    gateway, with connection refusals for stopped members and per-client
    faults.

    @ivar refuse: every connection of this client is refused.
    @ivar blackhole: every request of this client hangs until cancelled.
    @ivar paused: :meth:`FakeEtcd.pump` delivers nothing to this client
        (a stopped process); :meth:`flush` delivers what waited.
    @ivar latency: answers reach the client only on the next
        :meth:`flush` (etcd acted at once; the client learns later), so a
        pause can fall between the two.
    @ivar sent: the paths this client requested, in order.
    """

    etcd: FakeEtcd
    stub: Any
    refuse: bool = False
    blackhole: bool = False
    paused: bool = False
    latency: bool = False
    after_delivery: Callable[[], None] | None = None
    sent: list[str] = attrs.field(factory=list)
    _arrived: list[tuple[Deferred[Any], Any]] = attrs.field(factory=list)

    def flush(self) -> None:
        """
        Deliver what the fake wrote to this client: answers that waited
        (with ``latency``) first, then stream data; ``after_delivery`` is
        called after each answer.
        """
        arrived, self._arrived = self._arrived, []
        for d, result in arrived:
            if d.called:  # cancelled meanwhile
                continue
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
            if self.after_delivery is not None:
                self.after_delivery()
        self.stub.flush()

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self._request("POST", url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self._request("GET", url, **kwargs)

    def _request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"
        self.sent.append(parts.path)
        if self.refuse or self.etcd.mode(base) == DOWN:
            refused = ConnectionRefusedError(f"{base} refused the connection")  # type: ignore[no-untyped-call]
            d: Deferred[Any] = fail(refused)
        elif self.blackhole:
            d = Deferred()
        else:
            stub = self.stub
            d = stub.post(url, **kwargs) if method == "POST" else stub.get(url, **kwargs)
        if not self.latency:
            return d
        late: Deferred[Any] = Deferred(lambda _: d.cancel())

        def arrived(result: Any) -> None:
            self._arrived.append((late, result))
            self.etcd._writes += 1  # so that pump() goes round once more

        d.addBoth(arrived)
        return late
