"""
A thin client of etcd v3's JSON gateway (``/v3/...``) on treq.

Every call is one ``POST`` with a JSON body; keys and values travel
base64-encoded and int64s (revisions, lease ids) as decimal strings.
Responses are snake_case and omit false/zero fields (a PUT watch event has
no ``type``; a failed txn has no ``succeeded``; an expired lease's
keepalive has no ``TTL``).

**Endpoints.**  The client sticks to one endpoint (like etcd's own client
pins one) and rotates to the next on a connection error, a timeout or an
``Unavailable`` answer (gRPC code 14: no leader, request timed out), trying
each endpoint at most once per call; when none answers the call fails with
:class:`EtcdUnavailable` (a typed, retryable ``Unavailable``).  Every
attempt is bounded by ``request_timeout`` on the injected clock.  What the
client saw of each endpoint is kept in :meth:`EtcdClient.endpoint_states`.

**Watches** stream one JSON object per line (``{"result": {...}}``) over a
long-lived response read unbuffered; :meth:`EtcdClient.watch` returns a
:class:`Watch` whose ``created`` fires with the revision at creation and
whose ``done`` fires on :meth:`Watch.cancel` or fails when the stream ends
(connection lost: ``EtcdUnavailable``; compaction: :class:`WatchCanceled`).

Retrying a non-idempotent call on another endpoint after a timeout may
apply it twice; the calls used by consensus are safe under that: a
create-if-absent txn that already won finds its own lease on the key, a
fenced put writes the same value under the same fence, keepalive and
revoke are idempotent, and a second grant only leaks a lease until its TTL.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionLost,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestGenerationFailed
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss

from piccolod.errors import InvalidCommand, PiccolodError, Unavailable

__all__ = [
    "Campaign",
    "EndpointState",
    "EtcdClient",
    "EtcdError",
    "EtcdUnavailable",
    "KeyValue",
    "Lease",
    "LeaseNotFound",
    "Outcome",
    "RangeResult",
    "Watch",
    "WatchCanceled",
    "WatchEvent",
    "check_endpoints",
    "compare",
    "op_delete",
    "op_put",
    "op_range",
    "prefix_end",
    "txn_ranges",
]

#: gRPC status codes etcd answers with (in the JSON body's ``code``).
CODE_NOT_FOUND = 5
CODE_DEADLINE_EXCEEDED = 4
CODE_UNAVAILABLE = 14
#: Codes after which another endpoint may do better.
_ENDPOINT_CODES = frozenset({CODE_DEADLINE_EXCEEDED, CODE_UNAVAILABLE})
#: The longest watch line accepted (etcd's default request limit is 1.5 MiB).
MAX_LINE = 8 << 20


# --------------------------------------------------------------------------
# Errors


class EtcdError(PiccolodError):
    """
    etcd answered with an error.

    @ivar code: the gRPC status code from the body (0 if none).
    @ivar http_status: the HTTP status of the answer.
    """

    type = "etcd-error"
    title = "etcd refused the request"
    status = 502

    def __init__(self, message: str, code: int = 0, http_status: int = 0) -> None:
        super().__init__(message, code=code)
        self.code = code
        self.http_status = http_status


class LeaseNotFound(EtcdError):
    """The lease is unknown to etcd (expired or revoked)."""

    type = "etcd-lease-not-found"
    title = "etcd lease not found"


class WatchCanceled(EtcdError):
    """
    etcd canceled a watch; with ``compact_revision`` set, the start
    revision was compacted away and the watcher must resynchronise.
    """

    type = "etcd-watch-canceled"
    title = "etcd watch canceled"

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class EtcdUnavailable(Unavailable):
    """No etcd endpoint answered in time (or none has a quorum)."""

    type = "etcd-unavailable"
    title = "etcd unavailable"


#: Failures of one attempt that say "this endpoint, now" rather than "this request".
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectError,
    DNSLookupError,
    ConnectionLost,
    ConnectionDone,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    RequestGenerationFailed,
    DeferredTimeout,
    ConnectTimeout,
    EtcdUnavailable,
)


class _BadResponse(Exception):
    """An endpoint answered something that is not etcd's JSON."""


_PROBE_ERRORS: tuple[type[BaseException], ...] = (*_CONNECTION_ERRORS, _BadResponse)


# --------------------------------------------------------------------------
# Values


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(data: Any) -> bytes:
    if not data:
        return b""
    if not isinstance(data, str):
        raise _BadResponse(f"expected base64 text, got {data!r}")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as e:
        raise _BadResponse(f"bad base64 {data!r}: {e}") from None


def _int(value: Any) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise _BadResponse(f"expected an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _BadResponse(f"expected an integer, got {value!r}") from None


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` covering every key that starts with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


@attrs.frozen
class KeyValue:
    """One key as etcd stores it (``create_revision`` is 0 for a deletion event)."""

    key: bytes
    value: bytes = b""
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0

    @classmethod
    def from_json(cls, data: Any) -> KeyValue:
        if not isinstance(data, Mapping):
            raise _BadResponse(f"expected a key-value object, got {data!r}")
        return cls(
            key=_unb64(data.get("key")),
            value=_unb64(data.get("value")),
            create_revision=_int(data.get("create_revision")),
            mod_revision=_int(data.get("mod_revision")),
            version=_int(data.get("version")),
            lease=_int(data.get("lease")),
        )


@attrs.frozen
class Lease:
    """A granted lease: its id and the TTL etcd granted (seconds)."""

    id: int
    ttl: int


@attrs.frozen
class RangeResult:
    """The keys found and the store's revision when they were read."""

    kvs: tuple[KeyValue, ...]
    revision: int
    count: int = 0
    more: bool = False


# Transaction parts (etcd's ``Compare`` and ``RequestOp`` as gateway JSON)

#: The field a compare of each target reads.
_COMPARE_FIELDS = {
    "VALUE": "value",
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "LEASE": "lease",
}


def compare(key: bytes, target: str, result: str, value: bytes | int) -> dict[str, Any]:
    """
    One compare of a transaction: ``target`` (``VALUE``, ``VERSION``,
    ``CREATE``, ``MOD``, ``LEASE``) of ``key`` ``result`` (``EQUAL``,
    ``NOT_EQUAL``, ``GREATER``, ``LESS``) ``value``.  etcd compares values
    as bytes, and a ``VALUE`` compare of a missing key is always false; the
    other targets of a missing key read 0.
    """
    field = _COMPARE_FIELDS.get(target)
    if field is None:
        raise InvalidCommand(f"unknown compare target {target!r}")
    if result not in ("EQUAL", "NOT_EQUAL", "GREATER", "LESS"):
        raise InvalidCommand(f"unknown compare result {result!r}")
    if target == "VALUE":
        if not isinstance(value, bytes):
            raise InvalidCommand("a VALUE compare needs bytes")
        operand = _b64(value)
    else:
        if isinstance(value, (bytes, bool)):
            raise InvalidCommand(f"a {target} compare needs an integer")
        operand = str(value)
    return {"key": _b64(key), "target": target, "result": result, field: operand}


def op_put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    """A put request of a transaction."""
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def op_range(key: bytes, range_end: bytes | None = None, limit: int = 0) -> dict[str, Any]:
    """A range request of a transaction (``limit`` 0: no limit)."""
    body: dict[str, Any] = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    if limit:
        body["limit"] = str(limit)
    return {"request_range": body}


def op_delete(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    """A delete request of a transaction (a key, or ``[key, range_end)``)."""
    body: dict[str, Any] = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    return {"request_delete_range": body}


def txn_ranges(answer: Mapping[str, Any]) -> list[RangeResult]:
    """
    The range results of a transaction's answer, in request order (the
    answer's header revision stands for each).  Raises :class:`EtcdError`
    for a malformed answer.
    """
    try:
        revision = _header_revision(answer)
        responses = answer.get("responses") or []
        if not isinstance(responses, list):
            raise _BadResponse(f"bad txn responses {responses!r}")
        out: list[RangeResult] = []
        for response in responses:
            if isinstance(response, Mapping) and "response_range" in response:
                found = response["response_range"]
                if not isinstance(found, Mapping):
                    raise _BadResponse(f"bad range response {found!r}")
                result = _range_result({**found, "header": {"revision": str(revision)}})
                out.append(result)
        return out
    except _BadResponse as e:
        raise EtcdError(f"unexpected answer from etcd: {e}") from None


@attrs.frozen
class Campaign:
    """
    The outcome of a create-if-absent: ``won`` when this call created the
    key; ``holder`` is the key as it now stands (this call's or another's);
    ``revision`` the store revision of the answer.
    """

    won: bool
    holder: KeyValue
    revision: int


@attrs.frozen
class WatchEvent:
    """One change seen by a watch: ``PUT`` or ``DELETE`` of ``kv.key``."""

    type: str
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @classmethod
    def from_json(cls, data: Any) -> WatchEvent:
        if not isinstance(data, Mapping):
            raise _BadResponse(f"expected a watch event, got {data!r}")
        kind = data.get("type") or "PUT"
        if kind not in ("PUT", "DELETE"):
            raise _BadResponse(f"unknown watch event type {kind!r}")
        prev = data.get("prev_kv")
        return cls(
            type=kind,
            kv=KeyValue.from_json(data.get("kv")),
            prev_kv=KeyValue.from_json(prev) if prev is not None else None,
        )


@attrs.define
class EndpointState:
    """
    What the client last saw of one endpoint.

    @ivar healthy: ``True`` after a successful answer, ``False`` after a
        failure, ``None`` before either.
    """

    url: str
    healthy: bool | None = None
    last_error: str | None = None
    since: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "last_error": self.last_error,
            "since": self.since,
        }


def _check_endpoint(url: object) -> str:
    if not isinstance(url, str):
        raise InvalidCommand(f"an etcd endpoint must be a URL string, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidCommand(f"an etcd endpoint must be http(s)://host:port, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidCommand(f"an etcd endpoint has no path or query, got {url!r}")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise InvalidCommand(f"an etcd endpoint has a bad port: {url!r}") from None
    return url.rstrip("/")


def check_endpoints(value: Sequence[str]) -> tuple[str, ...]:
    """Validate etcd client URLs; raises ``InvalidCommand``."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidCommand(f"endpoints must be a list of URLs, got {value!r}")
    urls = tuple(_check_endpoint(v) for v in value)
    if not urls:
        raise InvalidCommand("at least one etcd endpoint is needed")
    if len(set(urls)) != len(urls):
        raise InvalidCommand(f"duplicate etcd endpoints in {list(urls)!r}")
    return urls


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidCommand(f"{attribute.name} must be a positive number, got {value!r}")


# --------------------------------------------------------------------------
# The client


@attrs.define(eq=False)
class EtcdClient:
    """
    etcd v3 over its JSON gateway.

    @ivar endpoints: client URLs of the cluster's members.
    @ivar http: a treq ``HTTPClient`` (or ``StubTreq``) making the requests.
    @ivar clock: bounds every attempt (``request_timeout`` seconds).
    @ivar on_close: called by :meth:`close` (closes the connection pool).
    """

    log = Logger()

    endpoints: tuple[str, ...] = attrs.field(converter=check_endpoints)
    http: Any
    clock: IReactorTime
    request_timeout: float = attrs.field(default=2.0, validator=_positive)
    on_close: Callable[[], Any] | None = None
    #: Called whenever an answer or stream data from etcd arrives, before
    #: it is handled (consensus checks its renew deadlines there: after a
    #: pause the reactor may deliver I/O before it runs overdue timers).
    on_receive: Callable[[], None] | None = None
    _current: int = attrs.field(init=False, default=0)
    _states: dict[str, EndpointState] = attrs.field(init=False, factory=dict)
    #: Live watches, cancelled by :meth:`close`.
    _watches: set[Watch] = attrs.field(init=False, factory=set)

    def __attrs_post_init__(self) -> None:
        now = self.clock.seconds()
        for url in self.endpoints:
            self._states[url] = EndpointState(url, since=now)

    @classmethod
    def connect(
        cls, reactor: Any, endpoints: Sequence[str], request_timeout: float = 2.0
    ) -> EtcdClient:
        """A client on ``reactor`` with its own persistent connection pool."""
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        pool.maxPersistentPerHost = 4
        pool.cachedConnectionTimeout = 30
        agent = Agent(reactor, pool=pool, connectTimeout=request_timeout)  # type: ignore[no-untyped-call]
        http = HTTPClient(agent)
        return cls(
            endpoints=endpoints,
            http=http,
            clock=reactor,
            request_timeout=request_timeout,
            on_close=pool.closeCachedConnections,
        )

    # -- endpoints ------------------------------------------------------------

    @property
    def current(self) -> str:
        """The endpoint the next call tries first."""
        return self.endpoints[self._current]

    def endpoint_states(self) -> list[EndpointState]:
        """What the client last saw of each endpoint, in configured order."""
        return [self._states[url] for url in self.endpoints]

    def _mark(self, url: str, healthy: bool, error: str | None = None) -> None:
        state = self._states[url]
        if state.healthy is not healthy:
            state.since = self.clock.seconds()
            if healthy:
                self.log.info("etcd endpoint {endpoint} answers again", endpoint=url)
            else:
                self.log.warn("etcd endpoint {endpoint} failed: {error}", endpoint=url, error=error)
        state.healthy = healthy
        state.last_error = error

    def _received(self) -> None:
        if self.on_receive is not None:
            try:
                self.on_receive()
            except Exception:
                self.log.failure("on_receive hook")

    def _rotate(self, url: str) -> None:
        if self.current == url:
            self._current = (self._current + 1) % len(self.endpoints)

    def close(self) -> Deferred[None]:
        """Cancel every watch and close idle connections; idempotent."""
        for watch in list(self._watches):
            watch.cancel()
        if self.on_close is not None:
            closing, self.on_close = self.on_close, None
            result = closing()
            if isinstance(result, Deferred):
                return result.addCallback(lambda _: None)
        return succeed(None)

    # -- one request ----------------------------------------------------------

    def call(self, path: str, body: Mapping[str, Any]) -> Deferred[dict[str, Any]]:
        """
        POST ``body`` to ``/v3/<path>`` on the current endpoint, rotating on
        endpoint failures; fires with the decoded answer.  Fails with
        :class:`EtcdUnavailable` when no endpoint answered, or
        :class:`EtcdError` (:class:`LeaseNotFound` for code 5 about a lease)
        when etcd refused the request.
        """
        return Deferred.fromCoroutine(self._call(path, body))

    async def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        data = json.dumps(body, separators=(",", ":")).encode()
        errors: list[str] = []
        for _ in range(len(self.endpoints)):
            url = self.current
            try:
                answer = await self._attempt(url, path, data)
            except _CONNECTION_ERRORS as e:
                reason = _describe(e)
            except _BadResponse as e:
                reason = f"bad answer: {e}"
            except EtcdError as e:
                if e.code not in _ENDPOINT_CODES:
                    self._mark(url, True)
                    raise
                reason = f"etcd code {e.code}: {e.detail}"
            else:
                self._mark(url, True)
                return answer
            errors.append(f"{url}: {reason}")
            self._mark(url, False, reason)
            self._rotate(url)
        raise EtcdUnavailable(f"no etcd endpoint answered {path}: {'; '.join(errors)}")

    async def _attempt(self, url: str, path: str, data: bytes) -> dict[str, Any]:
        d = Deferred.fromCoroutine(self._request(url, path, data))
        d.addTimeout(self.request_timeout, self.clock)
        try:
            return await d
        finally:
            self._received()  # before anything handles the outcome

    async def _request(self, url: str, path: str, data: bytes) -> dict[str, Any]:
        try:
            response = await self.http.post(
                f"{url}/v3/{path}",
                data=data,
                headers={b"Content-Type": [b"application/json"]},
            )
            raw = await response.content()
        except (RequestGenerationFailed, RequestTransmissionFailed, ResponseFailed) as e:
            # Cancelled (a stop, or the request timeout) while twisted.web was
            # writing or reading it: the failure wraps CancelledError.  Keep it
            # a cancellation, so the timeout still reads as a timeout.
            reasons = getattr(e, "reasons", None) or []
            if reasons and all(r.check(CancelledError) for r in reasons):
                raise CancelledError() from e
            raise
        return _decode(raw, response.code)

    # -- KV -------------------------------------------------------------------

    def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        serializable: bool = False,
        limit: int = 0,
    ) -> Deferred[RangeResult]:
        """Read ``key`` (or ``[key, range_end)``); linearizable unless ``serializable``."""
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if serializable:
            body["serializable"] = True
        if limit:
            body["limit"] = str(limit)

        def parsed(answer: dict[str, Any]) -> RangeResult:
            return _range_result(answer)

        return self.call("kv/range", body).addCallback(_parsing(parsed))

    def get(self, key: bytes) -> Deferred[KeyValue | None]:
        """The key, or ``None`` when it does not exist (linearizable)."""

        def first(result: RangeResult) -> KeyValue | None:
            return result.kvs[0] if result.kvs else None

        return self.range(key).addCallback(first)

    def get_prefix(self, prefix: bytes) -> Deferred[RangeResult]:
        """Every key under ``prefix`` (linearizable)."""
        return self.range(prefix, prefix_end(prefix))

    def put(self, key: bytes, value: bytes, lease: int = 0) -> Deferred[int]:
        """Write ``key``; fires with the new store revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return self.call("kv/put", body).addCallback(_parsing(_revision))

    def delete(self, key: bytes, range_end: bytes | None = None) -> Deferred[int]:
        """Delete ``key`` (or a range); fires with how many keys were deleted."""
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)

        def deleted(answer: dict[str, Any]) -> int:
            return _int(answer.get("deleted"))

        return self.call("kv/deleterange", body).addCallback(_parsing(deleted))

    def txn(
        self,
        compare: Sequence[Mapping[str, Any]],
        success: Sequence[Mapping[str, Any]],
        failure: Sequence[Mapping[str, Any]] = (),
    ) -> Deferred[dict[str, Any]]:
        """A raw transaction; fires with etcd's answer (``succeeded`` absent when false)."""
        return self.call(
            "kv/txn",
            {"compare": list(compare), "success": list(success), "failure": list(failure)},
        )

    def create_if_absent(self, key: bytes, value: bytes, lease: int) -> Deferred[Campaign]:
        """
        Create ``key`` bound to ``lease`` unless it exists (compare its
        create revision with 0); otherwise read it.  Fires with a
        :class:`Campaign`.  Fails with :class:`LeaseNotFound` when the lease
        is gone.
        """
        k = _b64(key)
        put = {"request_put": {"key": k, "value": _b64(value), "lease": str(lease)}}
        d = self.txn(
            [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            [put],
            [{"request_range": {"key": k}}],
        )

        def decided(answer: dict[str, Any]) -> Campaign:
            revision = _header_revision(answer)
            if answer.get("succeeded"):
                holder = KeyValue(
                    key=key,
                    value=value,
                    create_revision=revision,
                    mod_revision=revision,
                    version=1,
                    lease=lease,
                )
                return Campaign(won=True, holder=holder, revision=revision)
            kvs = _txn_range(answer)
            if not kvs:
                raise _BadResponse("a failed create-if-absent returned no holder")
            return Campaign(won=False, holder=kvs[0], revision=revision)

        return d.addCallback(_parsing(decided))

    def put_if_created_at(
        self, fence_key: bytes, create_revision: int, key: bytes, value: bytes
    ) -> Deferred[int | None]:
        """
        Write ``key`` only while ``fence_key`` still has ``create_revision``
        (the fencing token).  Fires with the new revision, or ``None`` when
        the fence no longer holds (nothing was written).
        """
        d = self.txn(
            [
                {
                    "key": _b64(fence_key),
                    "target": "CREATE",
                    "result": "EQUAL",
                    "create_revision": str(create_revision),
                }
            ],
            [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
        )

        def decided(answer: dict[str, Any]) -> int | None:
            return _header_revision(answer) if answer.get("succeeded") else None

        return d.addCallback(_parsing(decided))

    def delete_if_created_at(self, key: bytes, create_revision: int) -> Deferred[bool]:
        """Delete ``key`` only while it has ``create_revision``; fires with whether it did."""
        k = _b64(key)
        d = self.txn(
            [
                {
                    "key": k,
                    "target": "CREATE",
                    "result": "EQUAL",
                    "create_revision": str(create_revision),
                }
            ],
            [{"request_delete_range": {"key": k}}],
        )

        def decided(answer: dict[str, Any]) -> bool:
            return bool(answer.get("succeeded"))

        return d.addCallback(_parsing(decided))

    # -- leases ---------------------------------------------------------------

    def grant(self, ttl: int) -> Deferred[Lease]:
        """A new lease of ``ttl`` seconds (etcd may grant a longer minimum)."""

        def granted(answer: dict[str, Any]) -> Lease:
            lease = Lease(id=_int(answer.get("ID")), ttl=_int(answer.get("TTL")))
            if lease.id == 0 or lease.ttl <= 0:
                raise _BadResponse(f"bad lease grant {answer!r}")
            return lease

        return self.call("lease/grant", {"TTL": ttl}).addCallback(_parsing(granted))

    def keepalive(self, lease_id: int) -> Deferred[int]:
        """
        Renew the lease once (one POST); fires with its TTL from now, or 0
        when the lease has expired or never existed.
        """

        def renewed(answer: dict[str, Any]) -> int:
            result = answer.get("result", answer)
            if not isinstance(result, Mapping):
                raise _BadResponse(f"bad keepalive answer {answer!r}")
            return max(0, _int(result.get("TTL")))

        return self.call("lease/keepalive", {"ID": str(lease_id)}).addCallback(_parsing(renewed))

    def revoke(self, lease_id: int) -> Deferred[bool]:
        """
        Revoke the lease (its keys are deleted); fires with ``False`` when
        etcd did not know it any more.
        """
        d = self.call("lease/revoke", {"ID": str(lease_id)})

        def gone(failure: Failure) -> bool:
            failure.trap(LeaseNotFound)
            return False

        return d.addCallbacks(lambda _: True, gone)

    def time_to_live(self, lease_id: int) -> Deferred[int]:
        """The lease's remaining TTL, -1 when etcd does not know it."""

        def remaining(answer: dict[str, Any]) -> int:
            return _int(answer.get("TTL")) if "TTL" in answer else -1

        return self.call("lease/timetolive", {"ID": str(lease_id)}).addCallback(_parsing(remaining))

    # -- cluster --------------------------------------------------------------

    def health(self, url: str) -> Deferred[bool]:
        """
        ``GET /health`` of one endpoint (no rotation): fires with whether
        the member reports a healthy cluster; fails with
        :class:`EtcdUnavailable` when it does not answer in time.
        """
        if url not in self._states:
            raise InvalidCommand(f"not a configured endpoint: {url!r}")
        return Deferred.fromCoroutine(self._health(url))

    async def _health(self, url: str) -> bool:
        async def probe() -> bool:
            response = await self.http.get(f"{url}/health")
            raw = await response.content()
            try:
                data = json.loads(raw)
            except ValueError:
                raise _BadResponse(f"/health answered {raw[:200]!r}") from None
            return isinstance(data, Mapping) and data.get("health") in ("true", True)

        d = Deferred.fromCoroutine(probe())
        d.addTimeout(self.request_timeout, self.clock)
        try:
            result = await d
        except _PROBE_ERRORS as e:
            self._received()
            raise EtcdUnavailable(f"{url}: {_describe(e)}") from None
        self._received()
        return result

    def status(self) -> Deferred[dict[str, Any]]:
        """``maintenance/status`` of the current endpoint (version, leader, db size)."""
        return self.call("maintenance/status", {})

    # -- watches --------------------------------------------------------------

    def watch(
        self,
        key: bytes,
        on_events: Callable[[Sequence[WatchEvent], int], None],
        range_end: bytes | None = None,
        start_revision: int = 0,
        prev_kv: bool = False,
    ) -> Watch:
        """
        Watch ``key`` (or ``[key, range_end)``) from ``start_revision`` (0:
        from now) on the current endpoint.  ``on_events(events, revision)``
        is called for each batch, in revision order.  The stream must be
        confirmed within ``request_timeout``.
        """
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if start_revision:
            body["start_revision"] = str(start_revision)
        if prev_kv:
            body["prev_kv"] = True
        watch = Watch(client=self, url=self.current, on_events=on_events)
        self._watches.add(watch)
        watch._start({"create_request": body})
        return watch

    def _forget_watch(self, watch: Watch) -> None:
        self._watches.discard(watch)


class Outcome:
    """A result set once, which any number of observers may wait for."""

    def __init__(self) -> None:
        self.called = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._waiters: list[Deferred[Any]] = []

    def observe(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if not self.called:
            self._waiters.append(d)
        elif self._error is not None:
            d.errback(self._error)
        else:
            d.callback(self._value)
        return d

    def fire(self, value: Any = None, error: BaseException | None = None) -> None:
        if self.called:
            return
        self.called = True
        self._value = value
        self._error = error
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if error is not None:
                d.errback(error)
            else:
                d.callback(value)


@attrs.define(eq=False)
class Watch:
    """
    One watch stream on one endpoint.

    :meth:`when_created` fires with the store revision when etcd confirms
    the watch.  :meth:`when_done` fires with ``None`` after :meth:`cancel`
    and fails with :class:`EtcdUnavailable` when the stream breaks or ends,
    with :class:`WatchCanceled` when etcd cancels it (compaction), or with
    :class:`EtcdError` when etcd refuses it (``when_created`` then fails
    the same way).
    """

    log = Logger()

    client: EtcdClient
    url: str
    on_events: Callable[[Sequence[WatchEvent], int], None]
    #: The revision of the last batch delivered (or of creation).
    revision: int = attrs.field(init=False, default=0)
    _created: Outcome = attrs.field(init=False, factory=Outcome)
    _done: Outcome = attrs.field(init=False, factory=Outcome)
    _request: Deferred[Any] | None = attrs.field(init=False, default=None)
    _protocol: _LineProtocol | None = attrs.field(init=False, default=None)
    _timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _ended: bool = attrs.field(init=False, default=False)

    @property
    def active(self) -> bool:
        """False once the stream has ended or been cancelled."""
        return not self._ended

    @property
    def created(self) -> bool:
        """Whether etcd confirmed the watch."""
        return self._created.called and self._created._error is None

    def when_created(self) -> Deferred[int]:
        """A new Deferred firing with the revision at creation (see the class)."""
        return self._created.observe()

    def when_done(self) -> Deferred[None]:
        """A new Deferred firing when the watch ends (see the class)."""
        return self._done.observe()

    def cancel(self) -> None:
        """Stop watching; idempotent.  ``when_done`` fires with ``None``."""
        self._end(None)

    def _start(self, body: dict[str, Any]) -> None:
        clock = self.client.clock
        self._timer = clock.callLater(self.client.request_timeout, self._created_too_late)
        request = Deferred.fromCoroutine(self._open(body))
        if not request.called:
            self._request = request
        request.addErrback(self._open_failed)

    async def _open(self, body: dict[str, Any]) -> None:
        response = await self.client.http.post(
            f"{self.url}/v3/watch",
            data=json.dumps(body, separators=(",", ":")).encode(),
            headers={b"Content-Type": [b"application/json"]},
            unbuffered=True,
        )
        self.client._received()
        self._request = None
        if self._ended:
            response.deliverBody(_Discard())
            return
        if response.code != 200:
            raw = await _read_all(response)
            _decode(raw, response.code)  # raises the typed error
            raise _BadResponse(f"watch answered HTTP {response.code}")
        self._protocol = _LineProtocol(self)
        response.deliverBody(self._protocol)

    def _open_failed(self, failure: Failure) -> None:
        self.client._received()
        self._request = None
        if self._ended:
            return
        error = failure.value
        if isinstance(error, EtcdError) and error.code not in _ENDPOINT_CODES:
            self.client._mark(self.url, True)
            self._end(error)
            return
        if not isinstance(error, (*_CONNECTION_ERRORS, _BadResponse, EtcdError)):
            self.log.failure("while opening a watch on {endpoint}", failure, endpoint=self.url)
        self._endpoint_failed(_describe(error))

    def _created_too_late(self) -> None:
        self._timer = None
        if not self._created.called and not self._ended:
            self._endpoint_failed(f"watch not confirmed within {self.client.request_timeout}s")

    def _endpoint_failed(self, reason: str) -> None:
        self.client._mark(self.url, False, reason)
        self.client._rotate(self.url)
        self._end(EtcdUnavailable(f"watch on {self.url}: {reason}"))

    def _line(self, line: bytes) -> None:
        if self._ended:
            return
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, Mapping):
            self._endpoint_failed(f"bad watch line {line[:200]!r}")
            return
        if "error" in message:
            error = _error_from(message, 200)
            if error.code in _ENDPOINT_CODES:
                self._endpoint_failed(error.detail)
            else:
                self._end(error)
            return
        result = message.get("result")
        if not isinstance(result, Mapping):
            self._endpoint_failed(f"bad watch line {line[:200]!r}")
            return
        try:
            revision = _header_revision(result)
            if result.get("created") and not self._created.called:
                self.revision = revision
                self.client._mark(self.url, True)
                if self._timer is not None and self._timer.active():
                    self._timer.cancel()
                self._timer = None
                self._created.fire(revision)
            if result.get("canceled"):
                compacted = _int(result.get("compact_revision"))
                reason = str(result.get("cancel_reason") or "")
                self._end(
                    WatchCanceled(
                        "watch canceled by etcd"
                        + (f": {reason}" if reason else "")
                        + (f" (compacted at {compacted})" if compacted else ""),
                        compact_revision=compacted,
                    )
                )
                return
            raw_events = result.get("events") or []
            if not isinstance(raw_events, list):
                raise _BadResponse(f"bad watch events {raw_events!r}")
            events = [WatchEvent.from_json(e) for e in raw_events]
        except _BadResponse as e:
            self._endpoint_failed(str(e))
            return
        if events:
            self.revision = max(self.revision, revision, *(e.kv.mod_revision for e in events))
            try:
                self.on_events(events, self.revision)
            except Exception:
                self.log.failure("watch callback failed on {endpoint}", endpoint=self.url)

    def _lost(self, reason: Failure) -> None:
        self._protocol = None
        if self._ended:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._endpoint_failed("etcd ended the watch stream")
        else:
            self._endpoint_failed(_describe(reason.value))

    def _end(self, error: PiccolodError | None) -> None:
        if self._ended:
            return
        self._ended = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._request is not None:
            request, self._request = self._request, None
            request.cancel()
        if self._protocol is not None:
            protocol, self._protocol = self._protocol, None
            protocol.stop()
        self._created.fire(error=error if error is not None else CancelledError())
        self._done.fire(error=error)
        self.client._forget_watch(self)


class _LineProtocol(Protocol):
    """Splits a streamed response into lines for a :class:`Watch`."""

    def __init__(self, watch: Watch) -> None:
        self.watch: Watch | None = watch
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if self.watch is not None:
            self.watch.client._received()
        self.buffer += data
        while self.watch is not None:
            line, sep, rest = self.buffer.partition(b"\n")
            if not sep:
                break
            self.buffer = rest
            if line.strip():
                self.watch._line(line)
        if self.watch is not None and len(self.buffer) > MAX_LINE:
            watch, self.watch = self.watch, None
            watch._endpoint_failed(f"watch line longer than {MAX_LINE} bytes")
            self.stop()

    def stop(self) -> None:
        self.watch = None
        transport = self.transport
        if transport is not None:
            transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self.watch is not None:
            watch, self.watch = self.watch, None
            watch.client._received()
            watch._lost(reason)


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


class _Collect(Protocol):
    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if sum(len(c) for c in self.chunks) > MAX_LINE:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.done.callback(b"".join(self.chunks))


def _read_all(response: Any) -> Deferred[bytes]:
    done: Deferred[bytes] = Deferred()
    response.deliverBody(_Collect(done))
    return done


# --------------------------------------------------------------------------
# Decoding


def _parsing(fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """Turn a parse error of an answer into ``EtcdError`` (never a bare exception)."""

    def parse(answer: dict[str, Any]) -> Any:
        try:
            return fn(answer)
        except (_BadResponse, KeyError, TypeError, ValueError) as e:
            raise EtcdError(f"unexpected answer from etcd: {e}") from None

    return parse


def _decode(raw: bytes, status: int) -> dict[str, Any]:
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        if status != 200:
            raise EtcdError(
                f"etcd answered HTTP {status}: {raw[:200]!r}", http_status=status
            ) from None
        raise _BadResponse(f"not JSON: {raw[:200]!r}") from None
    if not isinstance(data, dict):
        raise _BadResponse(f"not a JSON object: {raw[:200]!r}")
    if status != 200 or "error" in data:
        raise _error_from(data, status)
    return data


def _error_from(data: Mapping[str, Any], status: int) -> EtcdError:
    error = data.get("error")
    message = str(data.get("message") or error or f"HTTP {status}")
    if isinstance(error, Mapping):  # a streamed error: {"error": {"grpc_code", "message"}}
        message = str(error.get("message") or message)
        code_value = error.get("grpc_code", error.get("code", 0))
    else:
        code_value = data.get("code", 0)
    try:
        code = int(code_value)
    except (TypeError, ValueError):
        code = 0
    if code == CODE_NOT_FOUND and "lease" in message:
        return LeaseNotFound(message, code=code, http_status=status)
    return EtcdError(message, code=code, http_status=status)


def _header_revision(answer: Mapping[str, Any]) -> int:
    header = answer.get("header") or {}
    if not isinstance(header, Mapping):
        raise _BadResponse(f"bad header {header!r}")
    return _int(header.get("revision"))


def _revision(answer: dict[str, Any]) -> int:
    return _header_revision(answer)


def _range_result(answer: Mapping[str, Any]) -> RangeResult:
    kvs = answer.get("kvs") or []
    if not isinstance(kvs, list):
        raise _BadResponse(f"bad kvs {kvs!r}")
    return RangeResult(
        kvs=tuple(KeyValue.from_json(kv) for kv in kvs),
        revision=_header_revision(answer),
        count=_int(answer.get("count")),
        more=bool(answer.get("more")),
    )


def _txn_range(answer: Mapping[str, Any]) -> tuple[KeyValue, ...]:
    responses = answer.get("responses") or []
    if not isinstance(responses, list):
        raise _BadResponse(f"bad txn responses {responses!r}")
    for response in responses:
        if isinstance(response, Mapping) and "response_range" in response:
            return _range_result(response["response_range"]).kvs
    return ()


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, (DeferredTimeout, CancelledError)):
        return "timed out"
    if isinstance(error, ResponseFailed) and error.reasons:
        return "; ".join(_describe(r.value) for r in error.reasons)
    if isinstance(error, PiccolodError):
        return error.detail
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
