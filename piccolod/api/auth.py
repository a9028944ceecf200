"""
Credentials at the HTTP boundary: sessions, API tokens, the login limiter
and the :class:`Authenticator` that the router runs before every handler.

**Sessions** (the admin in a browser or ``piccolodctl login``) live in memory
only: a restart logs everyone out.  The cookie ``piccolod_session`` holds 256
random bits; the store keeps only their SHA-256, with the session's CSRF
token, its creation and last use (clock time).  A session ends after
``idle_timeout`` without use or ``absolute_timeout`` after login, whichever
comes first, on logout, and for every session at once when the password
changes or is reset.  The cookie is ``HttpOnly; SameSite=Strict`` and
``Secure`` when the request arrived over TLS on this very socket
(``request.isSecure()``: a client's ``X-Forwarded-Proto`` is never trusted).

**CSRF**: a request authenticated by the session cookie with an unsafe method
(POST, PUT, PATCH, DELETE) must carry the session's token in ``X-CSRF-Token``;
it is compared with ``hmac.compare_digest``.  Token-authenticated requests
need none (a bearer token is not an ambient credential).

**API tokens** (automation) are ``pcd_<id>_<secret>``: a 48-bit public id and
256 random bits.  Only the SHA-256 of the whole token is stored, in
``<state_dir>/api/tokens.json`` (mode 0600, written atomically), with the
token's name, role, creation and expiry; the token itself is shown once, at
creation.  They are kept outside the encrypted control store on purpose: a
hash of 256 random bits discloses nothing, and tokens must work while
storage is locked (monitoring, and unlocking still needs the password).

**Login limiter**: wrong secrets (login, unlock, password change,
recovery-key reset) are counted per client address (the socket's peer, never
a forwarded header) and globally.  Past ``free_attempts`` failures each new
one locks the address out for a doubling delay (``initial`` up to
``maximum``); past ``global_free_attempts`` failures from anywhere every
address is locked out the same way.  During a lockout every attempt is
refused with 429 and ``Retry-After`` *before* the secret is looked at: the
right password is refused too.

Tests: ``tests/unit/test_api_auth.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from piccolod.errors import (
    Conflict,
    InvalidCommand,
    NotFound,
    PolicyDenied,
    RateLimited,
    Unauthorized,
)
from piccolod.kernel.aio import to_deferred
from piccolod.kernel.policy import PolicyEngine

from .http import SAFE_METHODS, Route

__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "Authenticator",
    "CSRFRejected",
    "LoginLimiter",
    "Principal",
    "Session",
    "SessionStore",
    "TokenRecord",
    "TokenStore",
]

T = TypeVar("T")

COOKIE = b"piccolod_session"
CSRF_HEADER = b"x-csrf-token"
TOKEN_PREFIX = "pcd_"
_TOKEN_RE = re.compile(r"pcd_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
TOKEN_ID_RE = re.compile(r"[0-9a-f]{12}")
TOKEN_FILE_VERSION = 1


def split_token(token: str) -> tuple[str, str] | None:
    """
    Split an API token into its public id and its secret, or return C{None} when C{token} is
    not shaped like one. (The secret is URL-safe base64 and may itself contain C{_}.)
    """
    m = _TOKEN_RE.fullmatch(token)
    return None if m is None else (m.group(1), m.group(2))


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class CSRFRejected(PolicyDenied):
    """A session-authenticated unsafe request without the right CSRF token."""

    type = "csrf"
    title = "CSRF token missing or wrong"


# --------------------------------------------------------------------------
# Principals


@attrs.frozen
class Principal:
    """
    Who a request is: ``subject`` is what the policy engine and the
    dispatcher see (``admin``, ``token:<id>``).

    @ivar kind: ``session`` or ``token``.
    """

    subject: str
    kind: str
    session: Session | None = None
    token: TokenRecord | None = None


# --------------------------------------------------------------------------
# Sessions


@attrs.define(eq=False)
class Session:
    """One login.  ``key`` is the SHA-256 of the cookie value."""

    key: str
    subject: str
    csrf_token: str = attrs.field(repr=False)
    created_at: float
    last_seen: float

    def to_json(self, idle: float, absolute: float) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "created_at": self.created_at,
            "idle_expires_at": self.last_seen + idle,
            "expires_at": self.created_at + absolute,
        }


@attrs.define(eq=False)
class SessionStore:
    """In-memory sessions with idle and absolute timeouts (see the module docstring)."""

    clock: IReactorTime
    idle_timeout: float = 1800.0
    absolute_timeout: float = 43200.0
    max_sessions: int = 64
    _sessions: dict[str, Session] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        if not (self.idle_timeout > 0 and self.absolute_timeout > 0 and self.max_sessions >= 1):
            raise ValueError("session timeouts must be > 0 and max_sessions >= 1")

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, subject: str = "admin") -> tuple[str, Session]:
        """A new session: ``(cookie value, session)``.  The oldest goes past ``max_sessions``."""
        self.sweep()
        while len(self._sessions) >= self.max_sessions:
            oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
            del self._sessions[oldest.key]
        value = secrets.token_urlsafe(32)
        now = self.clock.seconds()
        session = Session(sha256_hex(value), subject, secrets.token_urlsafe(32), now, now)
        self._sessions[session.key] = session
        return value, session

    def expired(self, session: Session, now: float) -> bool:
        return (
            now - session.last_seen >= self.idle_timeout
            or now - session.created_at >= self.absolute_timeout
        )

    def get(self, value: str, touch: bool = True) -> Session | None:
        """The live session of cookie ``value`` (its use recorded), else ``None``."""
        if not value or len(value) > 128:
            return None
        key = sha256_hex(value)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self.clock.seconds()
        if self.expired(session, now):
            del self._sessions[key]
            return None
        if touch:
            session.last_seen = now
        return session

    def is_live(self, session: Session) -> bool:
        """Whether ``session`` still authenticates (not ended, not expired); touches nothing."""
        return self._sessions.get(session.key) is session and not self.expired(
            session, self.clock.seconds()
        )

    def revoke(self, session: Session) -> None:
        self._sessions.pop(session.key, None)

    def revoke_all(self) -> int:
        count = len(self._sessions)
        self._sessions.clear()
        return count

    def sweep(self) -> None:
        now = self.clock.seconds()
        for key in [k for k, s in self._sessions.items() if self.expired(s, now)]:
            del self._sessions[key]

    def describe(self, session: Session) -> dict[str, Any]:
        return session.to_json(self.idle_timeout, self.absolute_timeout)

    def cookie(self, value: str, secure: bool) -> str:
        """The ``Set-Cookie`` value that carries ``value``."""
        parts = [
            f"{COOKIE.decode()}={value}",
            "Path=/",
            f"Max-Age={int(self.absolute_timeout)}",
            "HttpOnly",
            "SameSite=Strict",
        ]
        if secure:
            parts.append("Secure")
        return "; ".join(parts)

    @staticmethod
    def clearing_cookie(secure: bool) -> str:
        parts = [f"{COOKIE.decode()}=", "Path=/", "Max-Age=0", "HttpOnly", "SameSite=Strict"]
        if secure:
            parts.append("Secure")
        return "; ".join(parts)


# --------------------------------------------------------------------------
# API tokens


@attrs.frozen
class TokenRecord:
    """What is stored of one API token (never the token)."""

    id: str
    name: str
    role: str
    sha256: str = attrs.field(repr=False)
    created_at: float
    expires_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }

    def stored(self) -> dict[str, Any]:
        return {**self.to_json(), "sha256": self.sha256}


def _inline(fn: Callable[[], T]) -> Deferred[T]:
    try:
        return succeed(fn())
    except BaseException:
        from twisted.internet.defer import fail

        return fail()


@attrs.define(eq=False)
class TokenStore:
    """
    API tokens: hashes at rest in ``path`` (``None``: memory only).

    @ivar run_blocking: runs file writes (a thread pool in the daemon;
        inline by default).
    @ivar error: why the file could not be read; while set, the store holds
        no tokens and refuses changes (so that a damaged file is never
        overwritten).
    """

    log: ClassVar[Logger] = Logger()

    clock: IReactorTime
    path: Path | None = None
    run_blocking: Callable[[Callable[[], Any]], Deferred[Any]] = _inline
    max_tokens: int = 100
    error: str | None = None
    _tokens: dict[str, TokenRecord] = attrs.field(init=False, factory=dict)
    _last_used: dict[str, float] = attrs.field(init=False, factory=dict)
    #: Tokens verified since the last change, by value (memory only): a
    #: repeated token costs one dict lookup instead of a hash.  Emptied by
    #: every create, revoke and load, so a revocation takes effect at once.
    _verified: dict[str, TokenRecord] = attrs.field(init=False, factory=dict)
    _lock: DeferredLock = attrs.field(init=False, factory=DeferredLock)

    def load(self) -> None:
        """Read ``path`` (synchronously, at start); a missing file is no tokens."""
        if self.path is None:
            return
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            self._unusable(f"cannot read {self.path}: {e}")
            return
        try:
            data = json.loads(raw)
            if data.get("version") != TOKEN_FILE_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            tokens = {}
            for item in data["tokens"]:
                record = TokenRecord(
                    id=str(item["id"]),
                    name=str(item["name"]),
                    role=str(item["role"]),
                    sha256=str(item["sha256"]),
                    created_at=float(item["created_at"]),
                    expires_at=None if item["expires_at"] is None else float(item["expires_at"]),
                )
                if not TOKEN_ID_RE.fullmatch(record.id) or len(record.sha256) != 64:
                    raise ValueError(f"malformed token record {record.id!r}")
                tokens[record.id] = record
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._unusable(f"{self.path} is damaged: {e}")
            return
        self._tokens = tokens
        self._verified.clear()

    def _unusable(self, why: str) -> None:
        self.error = why
        self._tokens = {}
        self._verified.clear()
        self.log.error(
            "API tokens unusable: {why}; no token is accepted until the file is fixed or removed",
            why=why,
        )

    def records(self) -> list[TokenRecord]:
        return sorted(self._tokens.values(), key=lambda r: (r.created_at, r.id))

    def describe(self, record: TokenRecord) -> dict[str, Any]:
        return {**record.to_json(), "last_used": self._last_used.get(record.id)}

    def get(self, token_id: str) -> TokenRecord:
        record = self._tokens.get(token_id)
        if record is None:
            raise NotFound(f"no token {token_id!r}")
        return record

    def role_for_subject(self, subject: str) -> str | None:
        """The policy engine's ``resolve`` hook: ``token:<id>`` → the token's role."""
        if not subject.startswith("token:"):
            return None
        record = self._tokens.get(subject[6:])
        if record is None:
            return None
        if record.expires_at is not None and self.clock.seconds() >= record.expires_at:
            return None
        return record.role

    def is_live(self, record: TokenRecord) -> bool:
        """Whether ``record``'s token still authenticates (not revoked, not expired)."""
        if self._tokens.get(record.id) is not record:
            return False
        return record.expires_at is None or self.clock.seconds() < record.expires_at

    def verify(self, token: str) -> TokenRecord | None:
        """The live record of ``token`` (constant-time hash comparison), else ``None``."""
        now = self.clock.seconds()
        record = self._verified.get(token)
        if record is None:
            parts = split_token(token)
            if parts is None:
                return None
            record = self._tokens.get(parts[0])
            if record is None or not hmac.compare_digest(sha256_hex(token), record.sha256):
                return None
            if len(self._verified) < 2 * self.max_tokens:
                self._verified[token] = record
        if record.expires_at is not None and now >= record.expires_at:
            return None
        self._last_used[record.id] = now
        return record

    def create(
        self, name: str, role: str, expires_in: float | None = None
    ) -> Deferred[tuple[str, TokenRecord]]:
        """A new token: fires with ``(token, record)`` once the hash is on disk."""
        return Deferred.fromCoroutine(self._create(name, role, expires_in))

    async def _create(
        self, name: str, role: str, expires_in: float | None
    ) -> tuple[str, TokenRecord]:
        await self._lock.acquire()
        try:
            self._writable()
            if len(self._tokens) >= self.max_tokens:
                raise Conflict(f"at most {self.max_tokens} API tokens; revoke one first")
            token_id = secrets.token_hex(6)
            while token_id in self._tokens:
                token_id = secrets.token_hex(6)
            token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
            now = self.clock.seconds()
            record = TokenRecord(
                id=token_id,
                name=name,
                role=role,
                sha256=sha256_hex(token),
                created_at=now,
                expires_at=None if expires_in is None else now + expires_in,
            )
            updated = {**self._tokens, token_id: record}
            await self._save(updated)
            self._tokens = updated
            self._verified.clear()
            return token, record
        finally:
            self._lock.release()

    def revoke(self, token_id: str) -> Deferred[TokenRecord]:
        """Forget a token (it stops working at once); fails with ``NotFound``."""
        return Deferred.fromCoroutine(self._revoke(token_id))

    async def _revoke(self, token_id: str) -> TokenRecord:
        await self._lock.acquire()
        try:
            self._writable()
            record = self.get(token_id)
            updated = {k: v for k, v in self._tokens.items() if k != token_id}
            await self._save(updated)
            self._tokens = updated
            self._verified.clear()
            self._last_used.pop(token_id, None)
            return record
        finally:
            self._lock.release()

    def _writable(self) -> None:
        if self.error is not None:
            raise Conflict(f"API tokens are unusable: {self.error}")

    async def _save(self, tokens: Mapping[str, TokenRecord]) -> None:
        path = self.path
        if path is None:
            return
        data = json.dumps(
            {
                "version": TOKEN_FILE_VERSION,
                "tokens": [r.stored() for r in sorted(tokens.values(), key=lambda r: r.id)],
            },
            indent=1,
        ).encode()

        def write() -> None:
            from .service import write_atomically

            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path.parent, 0o700)
            write_atomically(path, data, mode=0o600)

        await to_deferred(self.run_blocking(write))


# --------------------------------------------------------------------------
# Login limiter


@attrs.define(eq=False)
class _Attempts:
    failures: int = 0
    not_before: float = 0.0
    last: float = 0.0


@attrs.define(eq=False)
class LoginLimiter:
    """Growing lockouts after wrong secrets, per address and globally (module docstring)."""

    clock: IReactorTime
    free_attempts: int = 5
    initial: float = 1.0
    maximum: float = 900.0
    global_free_attempts: int = 50
    global_maximum: float = 300.0
    max_addresses: int = 10_000
    #: An address idle this long is forgotten (its count starts over).
    forget_after: float = 86400.0
    _addresses: dict[str, _Attempts] = attrs.field(init=False, factory=dict)
    _global: _Attempts = attrs.field(init=False, factory=_Attempts)

    def __attrs_post_init__(self) -> None:
        if self.free_attempts < 0 or self.global_free_attempts < 0:
            raise ValueError("free attempts must be >= 0")
        if not (0 < self.initial <= self.maximum and self.global_maximum > 0):
            raise ValueError("lockouts must be > 0 and initial <= maximum")

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: now)."""
        now = self.clock.seconds()
        mine = self._addresses.get(address)
        wait = max(0.0, self._global.not_before - now)
        if mine is not None:
            wait = max(wait, mine.not_before - now)
        return wait

    def check(self, address: str) -> None:
        """Raise ``RateLimited`` while ``address`` (or everyone) is locked out."""
        wait = self.retry_after(address)
        if wait > 0:
            raise RateLimited(
                f"too many wrong attempts; try again in {wait:.0f} s", retry_after=wait
            )

    def failed(self, address: str) -> float:
        """Count a wrong secret from ``address``; returns the lockout now imposed."""
        now = self.clock.seconds()
        mine = self._addresses.get(address)
        if mine is None:
            if len(self._addresses) >= self.max_addresses:
                self._forget(now)
            mine = self._addresses[address] = _Attempts()
        delay = self._count(mine, now, self.free_attempts, self.maximum)
        delay = max(
            delay, self._count(self._global, now, self.global_free_attempts, self.global_maximum)
        )
        return delay

    def _count(self, attempts: _Attempts, now: float, free: int, maximum: float) -> float:
        attempts.failures += 1
        attempts.last = now
        over = attempts.failures - free
        if over <= 0:
            return 0.0
        delay = float(min(maximum, self.initial * 2.0 ** min(over - 1, 62)))
        attempts.not_before = now + delay
        return delay

    def succeeded(self, address: str) -> None:
        self._addresses.pop(address, None)
        self._global = _Attempts()

    def _forget(self, now: float) -> None:
        stale = [
            a
            for a, s in self._addresses.items()
            if s.not_before <= now and now - s.last >= self.forget_after
        ]
        for a in stale:
            del self._addresses[a]
        if len(self._addresses) >= self.max_addresses:
            for a in sorted(self._addresses, key=lambda a: self._addresses[a].last)[
                : len(self._addresses) // 2
            ]:
                del self._addresses[a]

    def stats(self) -> dict[str, Any]:
        return {
            "addresses": len(self._addresses),
            "global_failures": self._global.failures,
            "global_retry_after": max(0.0, self._global.not_before - self.clock.seconds()),
        }


def client_address(request: Request) -> str:
    """The socket peer's host (never a forwarded header); ``local`` for UNIX sockets."""
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return str(host) if host else "local"


# --------------------------------------------------------------------------
# The boundary


@attrs.define(eq=False)
class Authenticator:
    """
    The router's ``guard``: resolves the request's credentials, enforces
    CSRF, charges the token's request quota and asks the policy engine
    about the route's action.  Sets ``request.piccolod_principal``.
    """

    sessions: SessionStore
    tokens: TokenStore
    engine: PolicyEngine
    _principals: dict[str, Principal] = attrs.field(init=False, factory=dict)

    def authenticate(self, request: Request, touch: bool = True) -> Principal | None:
        """
        The request's principal: a bearer token (``Authorization``) first,
        else the session cookie; ``None`` without credentials.  Raises
        ``Unauthorized`` for a bad, revoked or expired bearer token, and for
        an unknown or expired session cookie.  ``touch``: count this as
        use of the session (public routes do not: polling ``/auth/session``
        does not keep a session alive).
        """
        header = request.getHeader(b"authorization")
        if header is not None:
            scheme, _, value = header.partition(b" ")
            if scheme.lower() != b"bearer":
                raise Unauthorized("use Authorization: Bearer <token>")
            record = self.tokens.verify(value.strip().decode("ascii", "replace"))
            if record is None:
                raise Unauthorized("the API token is invalid, revoked or expired")
            principal = self._principals.get(record.id)
            if principal is None or principal.token is not record:
                if len(self._principals) >= 4 * self.tokens.max_tokens:
                    self._principals.clear()
                principal = self._principals[record.id] = Principal(
                    f"token:{record.id}", "token", token=record
                )
            return principal
        cookie = request.getCookie(COOKIE)
        if cookie:
            session = self.sessions.get(cookie.decode("ascii", "replace"), touch=touch)
            if session is None:
                raise Unauthorized("the session has expired or ended; log in again")
            return Principal(session.subject, "session", session=session)
        return None

    def __call__(self, request: Request, route: Route, params: Mapping[str, str]) -> None:
        if route.public:
            try:
                principal = self.authenticate(request, touch=False)
            except Unauthorized:
                principal = None
            request.piccolod_principal = principal  # type: ignore[attr-defined]
            return
        principal = self.authenticate(request)
        if principal is None:
            raise Unauthorized("log in or present an API token")
        request.piccolod_principal = principal  # type: ignore[attr-defined]
        if principal.session is not None and route.csrf:
            method = (request.method or b"GET").decode("ascii", "replace").upper()
            if method not in SAFE_METHODS:
                given = request.getHeader(CSRF_HEADER) or b""
                expected = principal.session.csrf_token.encode()
                if not hmac.compare_digest(given, expected):
                    raise CSRFRejected(
                        "send the session's CSRF token (GET /api/v1/auth/csrf) in X-CSRF-Token"
                    )
        if principal.token is not None:
            self.engine.charge(principal.subject)
        if route.action is not None:
            resource = route.resource(params) if route.resource is not None else ""
            self.engine.check(principal.subject, route.action, resource)


def principal_of(request: Request) -> Principal | None:
    """What the guard resolved for ``request``."""
    return getattr(request, "piccolod_principal", None)


def require_principal(request: Request) -> Principal:
    principal = principal_of(request)
    if principal is None:
        raise Unauthorized("log in or present an API token")
    return principal


def check_token_id(token_id: str) -> str:
    if not TOKEN_ID_RE.fullmatch(token_id):
        raise InvalidCommand("a token id is 12 lowercase hex digits")
    return token_id
