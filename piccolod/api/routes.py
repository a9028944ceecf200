"""
The API's routes beyond the kernel views: authentication, API tokens,
storage and exports, commands built from JSON, the event stream and the
OpenAPI document.

Routes that run a command dispatch it as the request's subject
(``admin`` or ``token:<id>``), so the dispatcher's policy middleware decides
on the command itself; the others are decided at the boundary by the
route's ``action``.  The API's own housekeeping queries (the lock state for
``/auth/session``, the unlock that a login performs) run as
``system:api``.

**Login** (``POST /api/v1/auth/login``, ``{"password"}``): refused during a
lockout (429) before the password is looked at; while storage is locked the
password unlocks it (``persistence.unlock``), otherwise it is checked with
``persistence.verify_password``.  A wrong password counts towards the
lockout.  Success sets the session cookie and answers the CSRF token.

**Setup** (``POST /api/v1/auth/setup``, public until it has happened):
``persistence.setup`` then ``persistence.unlock`` with the same password,
and an automatic login; the answer shows the recovery key once.

**Password change** (``POST /api/v1/auth/password``) is
``persistence.change_password``: the key is rewrapped atomically and the
password is the new one, or nothing changed.  Every session ends; the
caller's continues under a new cookie.  **Recovery-key reset**
(``POST /api/v1/auth/recovery-key/reset``) is public, because it is what
an admin who forgot the password has: it needs the 24-word key, is
rate-limited like a login, ends every session and logs nobody in.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.server import Request

import piccolod
from piccolod.commands import (
    EXPORT_KINDS,
    EXPORT_NAME,
    ChangePassword,
    Command,
    CommandContext,
    DeleteExport,
    ExportFile,
    GetStorageStatus,
    ListDevices,
    ListExports,
    LockStorage,
    OpenExport,
    Result,
    RotateRecoveryKey,
    RunControlExport,
    RunFullExport,
    SetupStorage,
    UnlockStorage,
    VerifyPassword,
)
from piccolod.errors import (
    Conflict,
    IllegalTransition,
    InvalidCommand,
    PiccolodError,
    PolicyDenied,
    Unauthorized,
    Unavailable,
    UnknownCommand,
)
from piccolod.kernel.policy import PolicyEngine
from piccolod.kernel.runtime import Kernel

from .auth import (
    LoginLimiter,
    Principal,
    SessionStore,
    TokenStore,
    check_token_id,
    client_address,
    principal_of,
    require_principal,
)
from .catalog import NAME_PATTERN, CommandCatalog, build_command, command_schema
from .http import STREAMING, JSONResponse, Router, send_file
from .openapi import build_document
from .sse import EventHub, EventStream, parse_topics

__all__ = ["APIContext", "api_routes"]

SYSTEM = "system:api"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")

# -- schemas -------------------------------------------------------------------

PASSWORD: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 1024, "writeOnly": True}
NEW_PASSWORD: dict[str, Any] = {
    "type": "string",
    "minLength": 8,
    "maxLength": 1024,
    "writeOnly": True,
}
RECOVERY_KEY: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 1024,
    "writeOnly": True,
    "description": "The 24-word recovery key",
}
LOCK_STATES = ["uninitialized", "locked", "preunlock", "unlocked"]
STATUS: dict[str, Any] = {
    "type": "object",
    "required": ["state", "initialized"],
    "properties": {
        "state": {"type": "string", "enum": LOCK_STATES},
        "initialized": {"type": "boolean"},
        "retry_after": {"type": "number"},
        "failed_attempts": {"type": "integer"},
        "recovery_key": {"type": "boolean"},
        "store": {"type": ["object", "null"]},
        "error": {"type": ["string", "null"]},
    },
}
SESSION: dict[str, Any] = {
    "type": "object",
    "required": ["csrf_token", "subject"],
    "properties": {
        "csrf_token": {"type": "string"},
        "subject": {"type": "string"},
        "created_at": {"type": "number"},
        "expires_at": {"type": "number"},
        "idle_expires_at": {"type": "number"},
        "state": {"type": "string"},
    },
}
TOKEN: dict[str, Any] = {
    "type": "object",
    "required": ["id", "name", "role", "created_at", "expires_at"],
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "role": {"type": "string"},
        "created_at": {"type": "number"},
        "expires_at": {"type": ["number", "null"]},
        "last_used": {"type": ["number", "null"]},
        "token": {"type": "string", "description": "Shown once, at creation"},
    },
}
EXPORT: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "path", "sha256", "size", "files", "created_at", "name"],
    "properties": {
        "kind": {"type": "string", "enum": list(EXPORT_KINDS)},
        "path": {"type": "string"},
        "sha256": {"type": "string"},
        "size": {"type": "integer"},
        "files": {"type": "integer"},
        "created_at": {"type": "number"},
        "name": {
            "type": "string",
            "description": "GET /api/v1/exports/{kind}/{name} downloads the bundle",
        },
        "pruned": {
            "type": "array",
            "items": {"type": "string"},
            "description": "older bundles of the kind removed to keep keep_exports",
        },
    },
}
EXPORT_ENTRY: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "name", "size", "created_at"],
    "properties": {
        "kind": {"type": "string", "enum": list(EXPORT_KINDS)},
        "name": {"type": "string", "pattern": EXPORT_NAME},
        "size": {"type": "integer", "minimum": 0},
        "created_at": {"type": "number"},
    },
}
EXPORT_LIST: dict[str, Any] = {
    "type": "object",
    "required": ["exports", "keep"],
    "properties": {
        "exports": {"type": "array", "items": EXPORT_ENTRY},
        "keep": {"type": "integer", "minimum": 0, "description": "bundles kept per kind (0: all)"},
    },
}
TOKEN_ID: dict[str, Any] = {"type": "string", "pattern": "^[0-9a-f]{12}$"}
#: Errors of routes that run persistence commands.
STORAGE_ERRORS = (409, 503, 504)


def _json(schema: Mapping[str, Any], status: int = 200) -> dict[int, tuple[str, Mapping[str, Any]]]:
    return {status: ("application/json", schema)}


def _obj(**properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(properties),
        "properties": properties,
    }


def _body(required: Mapping[str, Any], optional: Mapping[str, Any] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "additionalProperties": False,
    }
    if required:
        schema["required"] = list(required)
    return schema


# -- the context -----------------------------------------------------------------


@attrs.define(eq=False)
class APIContext:
    """What the routes share: the kernel and the API's own state."""

    kernel: Kernel
    sessions: SessionStore
    tokens: TokenStore
    limiter: LoginLimiter
    engine: PolicyEngine
    hub: EventHub
    catalog: CommandCatalog = attrs.field(factory=CommandCatalog)

    def dispatch(
        self,
        request: Request,
        command: Command,
        subject: str | None = None,
        command_id: str | None = None,
        fixed: bool = True,
    ) -> Deferred[Result]:
        """
        Run ``command`` as ``subject`` (default: the request's principal).
        For fixed routes a missing handler means the subsystem is not
        running: ``Unavailable`` (503), not ``UnknownCommand``.
        """
        if subject is None:
            subject = require_principal(request).subject
        context = CommandContext(
            command_id=command_id,
            correlation_id=request_id(request),
            subject=subject,
            source="api",
        )
        d = self.kernel.dispatcher.dispatch(command, context)
        if fixed:
            d.addErrback(_unavailable, command.name)
        return d

    async def status(self, request: Request) -> dict[str, Any]:
        """``persistence.status`` as the API itself."""
        result = await self.dispatch(request, GetStorageStatus(), subject=SYSTEM)
        return result.to_json()

    def secure(self, request: Request) -> bool:
        return bool(request.isSecure())

    def new_session(self, request: Request, subject: str = "admin") -> tuple[str, dict[str, Any]]:
        """A session for ``subject``: ``(Set-Cookie value, description with the CSRF token)``."""
        value, session = self.sessions.create(subject)
        body = {"csrf_token": session.csrf_token, **self.sessions.describe(session)}
        return self.sessions.cookie(value, self.secure(request)), body

    def audit(
        self, request: Request, action: str, subject: str, outcome: str, detail: str = ""
    ) -> str:
        return self.engine.record(
            action,
            subject,
            outcome,
            resource=f"address:{client_address(request)}",
            detail=detail,
            correlation_id=request_id(request),
        )


def _unavailable(failure: Failure, name: str) -> Failure:
    if failure.check(UnknownCommand):
        return Failure(Unavailable(f"nothing handles {name}: is its subsystem running?"))  # type: ignore[no-untyped-call]
    return failure


def request_id(request: Request) -> str:
    """The request's correlation id: a well-formed ``X-Request-Id``, else a new one."""
    found = getattr(request, "_piccolod_request_id", None)
    if found is not None:
        return str(found)
    given = request.getHeader(b"x-request-id")
    text = given.decode("ascii", "replace") if given else ""
    if not _REQUEST_ID.fullmatch(text):
        text = secrets.token_hex(8)
    request._piccolod_request_id = text  # type: ignore[attr-defined]
    return text


def _result(result: Result) -> dict[str, Any]:
    return result.to_json()


# -- routes --------------------------------------------------------------------


def api_routes(router: Router, api: APIContext) -> None:
    """Add the auth, token, storage, command, event and OpenAPI routes."""
    _auth_routes(router, api)
    _token_routes(router, api)
    _storage_routes(router, api)
    _command_routes(router, api)
    _meta_routes(router, api)


def _secret_attempt_failed(
    api: APIContext, request: Request, action: str, error: Exception
) -> None:
    """Count a wrong secret towards the lockout and audit it."""
    address = client_address(request)
    delay = api.limiter.failed(address)
    detail = getattr(error, "type", "wrong secret")
    if delay:
        detail += f"; locked out for {delay:g}s"
    api.audit(request, action, "admin", "denied", detail)


async def _checked_secret(
    api: APIContext, request: Request, action: str, d: Deferred[Result]
) -> Result:
    """Await a command that checks a secret; a wrong one counts towards the lockout."""
    try:
        return await d
    except Unauthorized as e:  # WrongPassword, WrongRecoveryKey
        _secret_attempt_failed(api, request, action, e)
        raise


def _auth_routes(router: Router, api: APIContext) -> None:
    tags = ("auth",)

    @router.route(
        "POST",
        "/api/v1/auth/setup",
        "auth_setup",
        public=True,
        body=_body({"password": NEW_PASSWORD}),
        responses=_json(
            {
                **SESSION,
                "required": ["csrf_token", "subject", "recovery_key", "state"],
                "properties": {
                    **SESSION["properties"],
                    "recovery_key": {"type": "string", "description": "Shown once"},
                },
            },
            201,
        ),
        errors=STORAGE_ERRORS,
        summary="First-run setup: set the admin password, initialise and unlock storage, log in",
        tags=tags,
    )
    async def setup(request: Request, body: dict[str, Any]) -> Any:
        status = await api.status(request)
        if status["initialized"]:
            raise Conflict("piccolod is already set up; log in instead")
        password = body["password"]
        result = await api.dispatch(request, SetupStorage(password=password), subject=SYSTEM)
        await api.dispatch(request, UnlockStorage(password=password), subject=SYSTEM)
        cookie, session = api.new_session(request)
        api.audit(request, "auth.setup", "admin", "ok")
        recovery_key = result.to_json()["recovery_key"]
        return JSONResponse(
            {**session, "recovery_key": recovery_key, "state": "unlocked"},
            201,
            cookies=(cookie,),
        )

    @router.route(
        "POST",
        "/api/v1/auth/login",
        "auth_login",
        public=True,
        body=_body({"password": PASSWORD}),
        responses=_json(SESSION),
        errors=(401, 409, 429, 503, 504),
        summary="Log in with the admin password (unlocks storage when locked)",
        tags=tags,
    )
    async def login(request: Request, body: dict[str, Any]) -> Any:
        address = client_address(request)
        api.limiter.check(address)
        password = body["password"]
        status = await api.status(request)
        if not status["initialized"]:
            raise Conflict("piccolod is not set up yet: POST /api/v1/auth/setup")
        if status["state"] == "locked":
            try:
                await _checked_secret(
                    api,
                    request,
                    "auth.login",
                    api.dispatch(request, UnlockStorage(password=password), subject=SYSTEM),
                )
            except IllegalTransition:  # unlocked meanwhile by someone else
                await _verify(api, request, password)
        else:
            await _verify(api, request, password)
        api.limiter.succeeded(address)
        cookie, session = api.new_session(request)
        api.audit(request, "auth.login", "admin", "ok")
        state = (await api.status(request))["state"]
        return JSONResponse({**session, "state": state}, cookies=(cookie,))

    @router.route(
        "POST",
        "/api/v1/auth/logout",
        "auth_logout",
        responses=_json(_obj(logged_out={"type": "boolean"})),
        summary="End this session",
        tags=tags,
    )
    def logout(request: Request) -> Any:
        principal = require_principal(request)
        if principal.session is None:
            return {"logged_out": False}
        api.sessions.revoke(principal.session)
        api.hub.revalidate()  # its event streams end with it
        api.audit(request, "auth.logout", principal.subject, "ok")
        return JSONResponse(
            {"logged_out": True}, cookies=(api.sessions.clearing_cookie(api.secure(request)),)
        )

    @router.route(
        "GET",
        "/api/v1/auth/session",
        "auth_session",
        public=True,
        responses=_json(
            {
                "type": "object",
                "required": ["authenticated", "initialized", "state"],
                "properties": {
                    "authenticated": {"type": "boolean"},
                    "initialized": {"type": "boolean"},
                    "state": {"type": "string", "enum": [*LOCK_STATES, "unknown"]},
                    "subject": {"type": "string"},
                    "kind": {"type": "string", "enum": ["session", "token"]},
                    "role": {"type": ["string", "null"]},
                    "created_at": {"type": "number"},
                    "expires_at": {"type": ["number", "null"]},
                    "idle_expires_at": {"type": "number"},
                },
            }
        ),
        summary="Whether this request is authenticated, and the lock state",
        tags=tags,
    )
    async def session(request: Request) -> Any:
        try:
            status = await api.status(request)
            state, initialized = status["state"], status["initialized"]
        except PiccolodError:
            state, initialized = "unknown", False
        body: dict[str, Any] = {
            "authenticated": False,
            "initialized": initialized,
            "state": state,
        }
        principal = principal_of(request)
        if principal is not None:
            body.update(_describe_principal(api, principal))
        return body

    @router.route(
        "GET",
        "/api/v1/auth/csrf",
        "auth_csrf",
        responses=_json(_obj(csrf_token={"type": ["string", "null"]})),
        summary="This session's CSRF token (null for API tokens, which need none)",
        tags=tags,
    )
    def csrf(request: Request) -> Any:
        principal = require_principal(request)
        token = principal.session.csrf_token if principal.session is not None else None
        return {"csrf_token": token}

    @router.route(
        "POST",
        "/api/v1/auth/password",
        "auth_password",
        body=_body({"old_password": PASSWORD, "new_password": NEW_PASSWORD}),
        responses=_json(
            {
                "type": "object",
                "required": ["state", "sessions_revoked"],
                "properties": {
                    "state": {"type": "string"},
                    "sessions_revoked": {"type": "integer"},
                    "csrf_token": {"type": "string"},
                },
            }
        ),
        errors=(401, *STORAGE_ERRORS),
        summary=(
            "Change the admin password (rewraps the storage key atomically); "
            "ends every other session"
        ),
        tags=tags,
    )
    async def password(request: Request, body: dict[str, Any]) -> Any:
        principal = require_principal(request)
        address = client_address(request)
        api.limiter.check(address)
        command = ChangePassword(old=body["old_password"], new=body["new_password"])
        result = await _checked_secret(
            api, request, "auth.password", api.dispatch(request, command)
        )
        api.limiter.succeeded(address)
        revoked = api.sessions.revoke_all()
        api.hub.revalidate()
        api.audit(request, "auth.password", principal.subject, "ok", f"{revoked} session(s) ended")
        answer: dict[str, Any] = {"state": result.to_json()["state"], "sessions_revoked": revoked}
        cookies: tuple[str, ...] = ()
        if principal.session is not None:
            cookie, session = api.new_session(request, principal.subject)
            answer["csrf_token"] = session["csrf_token"]
            cookies = (cookie,)
        return JSONResponse(answer, cookies=cookies)

    @router.route(
        "POST",
        "/api/v1/auth/recovery-key/reset",
        "auth_recovery_reset",
        public=True,
        body=_body({"recovery_key": RECOVERY_KEY, "new_password": NEW_PASSWORD}),
        responses=_json(_obj(state={"type": "string"}, sessions_revoked={"type": "integer"})),
        errors=(401, 429, *STORAGE_ERRORS),
        summary=(
            "Set a new password with the recovery key (for a forgotten password); "
            "ends every session"
        ),
        tags=tags,
    )
    async def recovery_reset(request: Request, body: dict[str, Any]) -> Any:
        address = client_address(request)
        api.limiter.check(address)
        command = ChangePassword(recovery_key=body["recovery_key"], new=body["new_password"])
        result = await _checked_secret(
            api,
            request,
            "auth.recovery_reset",
            api.dispatch(request, command, subject=SYSTEM),
        )
        api.limiter.succeeded(address)
        revoked = api.sessions.revoke_all()
        api.hub.revalidate()
        api.audit(request, "auth.recovery_reset", "admin", "ok", f"{revoked} session(s) ended")
        return {"state": result.to_json()["state"], "sessions_revoked": revoked}

    @router.route(
        "POST",
        "/api/v1/auth/recovery-key",
        "auth_recovery_rotate",
        responses=_json(_obj(recovery_key={"type": "string", "description": "Shown once"})),
        errors=(423, *STORAGE_ERRORS),
        summary="Replace the recovery key (needs unlocked storage); the old one stops working",
        tags=tags,
    )
    async def recovery_rotate(request: Request) -> Any:
        result = await api.dispatch(request, RotateRecoveryKey())
        return {"recovery_key": result.to_json()["recovery_key"]}


async def _verify(api: APIContext, request: Request, password: str) -> None:
    """
    Check the password against the keyset while storage is unlocked:
    ``persistence.verify_password``; until persistence handles it, a
    password change to the same password (which checks the old one).
    """
    try:
        await _checked_secret(
            api,
            request,
            "auth.login",
            api.dispatch(request, VerifyPassword(password=password), subject=SYSTEM, fixed=False),
        )
    except UnknownCommand:
        await _checked_secret(
            api,
            request,
            "auth.login",
            api.dispatch(request, ChangePassword(old=password, new=password), subject=SYSTEM),
        )


def _describe_principal(api: APIContext, principal: Principal) -> dict[str, Any]:
    out: dict[str, Any] = {
        "authenticated": True,
        "subject": principal.subject,
        "kind": principal.kind,
        "role": api.engine.role_of(principal.subject),
    }
    if principal.session is not None:
        out.update(api.sessions.describe(principal.session))
    if principal.token is not None:
        out["expires_at"] = principal.token.expires_at
    return out


def _token_routes(router: Router, api: APIContext) -> None:
    tags = ("tokens",)

    @router.route(
        "POST",
        "/api/v1/auth/tokens",
        "tokens_create",
        action="tokens.create",
        body=_body(
            {
                "name": {"type": "string", "minLength": 1, "maxLength": 64},
                "role": {
                    "type": "string",
                    "enum": [r for r in api.engine.role_names() if r != "system"],
                },
            },
            {
                "expires_in": {
                    "type": ["number", "null"],
                    "minimum": 60,
                    "maximum": 315360000,
                    "description": "Seconds until the token expires (null: never)",
                }
            },
        ),
        responses=_json({**TOKEN, "required": [*TOKEN["required"], "token"]}, 201),
        errors=(409,),
        summary="Create an API token for a role; the token is shown once",
        tags=tags,
    )
    async def create(request: Request, body: dict[str, Any]) -> Any:
        principal = require_principal(request)
        role = body["role"]
        if role not in api.engine.roles or role == "system":
            grantable = [r for r in api.engine.role_names() if r != "system"]
            raise InvalidCommand(f"unknown role {role!r}; roles: {', '.join(grantable)}")
        own = api.engine.role_of(principal.subject)
        if own not in ("admin", role):
            raise PolicyDenied(f"a {own} may only create {own} tokens")
        expires_in = body.get("expires_in")
        token, record = await api.tokens.create(
            body["name"], role, None if expires_in is None else float(expires_in)
        )
        api.audit(request, "tokens.create", principal.subject, "ok", f"token:{record.id} {role}")
        return JSONResponse({**api.tokens.describe(record), "token": token}, 201)

    @router.route(
        "GET",
        "/api/v1/auth/tokens",
        "tokens_list",
        action="tokens.read",
        responses=_json(_obj(tokens={"type": "array", "items": TOKEN})),
        summary="Every API token (never the tokens themselves)",
        tags=tags,
    )
    def list_tokens(request: Request) -> Any:
        return {"tokens": [api.tokens.describe(r) for r in api.tokens.records()]}

    @router.route(
        "DELETE",
        "/api/v1/auth/tokens/{token_id}",
        "tokens_revoke",
        action="tokens.revoke",
        resource=lambda params: f"token:{params.get('token_id', '')}",
        params={"token_id": TOKEN_ID},
        responses=_json(_obj(revoked=TOKEN)),
        errors=(404, 409),
        summary="Revoke an API token; it stops working at once",
        tags=tags,
    )
    async def revoke(request: Request, token_id: str) -> Any:
        principal = require_principal(request)
        record = await api.tokens.revoke(check_token_id(token_id))
        api.hub.revalidate()
        if api.engine.rate is not None:
            api.engine.rate.forget(f"token:{token_id}")
        api.audit(request, "tokens.revoke", principal.subject, "ok", f"token:{token_id}")
        return {"revoked": record.to_json()}


def _storage_routes(router: Router, api: APIContext) -> None:
    tags = ("storage",)

    @router.route(
        "GET",
        "/api/v1/storage/status",
        "storage_status",
        responses=_json(STATUS),
        errors=(503, 504),
        summary="The lock state, unlock rate limit and control store summary",
        tags=tags,
    )
    async def status(request: Request) -> Any:
        return _result(await api.dispatch(request, GetStorageStatus()))

    @router.route(
        "POST",
        "/api/v1/storage/setup",
        "storage_setup",
        body=_body({"password": NEW_PASSWORD}),
        responses=_json(_obj(state={"type": "string"}, recovery_key={"type": "string"}), 201),
        errors=STORAGE_ERRORS,
        summary="Create the keyset (first-run setup is POST /api/v1/auth/setup)",
        tags=tags,
    )
    async def setup(request: Request, body: dict[str, Any]) -> Any:
        result = await api.dispatch(request, SetupStorage(password=body["password"]))
        return JSONResponse(result.to_json(), 201)

    @router.route(
        "POST",
        "/api/v1/storage/unlock",
        "storage_unlock",
        body={
            **_body({}, {"password": PASSWORD, "recovery_key": RECOVERY_KEY}),
            "anyOf": [{"required": ["password"]}, {"required": ["recovery_key"]}],
            "maxProperties": 1,
        },
        responses=_json(STATUS),
        errors=(401, *STORAGE_ERRORS),
        summary="Unlock storage with the password or the recovery key",
        tags=tags,
    )
    async def unlock(request: Request, body: dict[str, Any]) -> Any:
        address = client_address(request)
        api.limiter.check(address)
        command = UnlockStorage(
            password=body.get("password"), recovery_key=body.get("recovery_key")
        )
        result = await _checked_secret(
            api, request, "storage.unlock", api.dispatch(request, command)
        )
        api.limiter.succeeded(address)
        return _result(result)

    @router.route(
        "POST",
        "/api/v1/storage/lock",
        "storage_lock",
        responses=_json(STATUS),
        errors=STORAGE_ERRORS,
        summary="Lock storage: the control store closes, volumes detach, the key is dropped",
        tags=tags,
    )
    async def lock(request: Request) -> Any:
        return _result(await api.dispatch(request, LockStorage()))

    @router.route(
        "GET",
        "/api/v1/volumes",
        "volumes_list",
        action="volumes.list",
        responses=_json(_obj(volumes={"type": "array", "items": {"type": "object"}})),
        summary="Every volume's last known state",
        tags=tags,
    )
    def volumes(request: Request) -> Any:
        found = api.kernel.bus.retained("persistence.volume_state")
        items = [{**e.event.to_json(), "since": e.context.time} for e in found]
        return {"volumes": sorted(items, key=lambda v: str(v.get("volume_id")))}

    @router.route(
        "GET",
        "/api/v1/storage/disks",
        "storage_disks",
        responses=_json(
            {
                "type": "object",
                "required": ["disks"],
                "properties": {
                    "disks": {"type": "array", "items": {"type": "object"}},
                    "scanned_at": {"type": ["number", "null"]},
                },
            }
        ),
        errors=(503, 504),
        summary="The block devices of the last scan",
        tags=tags,
    )
    async def disks(request: Request) -> Any:
        return _result(await api.dispatch(request, ListDevices()))

    for kind, command_type in (("control", RunControlExport), ("full", RunFullExport)):
        _export_route(router, api, kind, command_type)
    _bundle_routes(router, api)


def _export_route(router: Router, api: APIContext, kind: str, command_type: type[Command]) -> None:
    @router.route(
        "POST",
        f"/api/v1/exports/{kind}",
        f"exports_{kind}",
        responses=_json(EXPORT),
        errors=STORAGE_ERRORS,
        summary=f"Write a {kind} export bundle (ciphertext and a manifest)",
        tags=("storage",),
    )
    async def export(request: Request) -> Any:
        return _result(await api.dispatch(request, command_type()))


def _bundle_routes(router: Router, api: APIContext) -> None:
    """The export bundles on the box: list, download (admin), delete."""
    tags = ("storage",)
    params = {
        "kind": {"type": "string", "enum": list(EXPORT_KINDS)},
        "name": {"type": "string", "pattern": EXPORT_NAME},
    }

    @router.route(
        "GET",
        "/api/v1/exports",
        "exports_list",
        responses=_json(EXPORT_LIST),
        errors=(503, 504),
        summary="The export bundles on the box, newest first",
        tags=tags,
    )
    async def listing(request: Request) -> Any:
        return _result(await api.dispatch(request, ListExports()))

    @router.route(
        "GET",
        "/api/v1/exports/{kind}/{name}",
        "exports_download",
        params=params,
        responses={200: ("application/x-tar", {"type": "string", "format": "binary"})},
        errors=(404, 503, 504),
        summary="Download one bundle (admin only: it holds the keyset's wraps)",
        tags=tags,
        stream=True,
    )
    async def download(request: Request, kind: str, name: str) -> Any:
        found = await api.dispatch(request, OpenExport(kind=kind, bundle=name))
        assert isinstance(found, ExportFile)
        send_file(request, Path(found.path), "application/x-tar", found.name)
        return STREAMING

    @router.route(
        "DELETE",
        "/api/v1/exports/{kind}/{name}",
        "exports_delete",
        params=params,
        responses=_json(_obj(deleted=EXPORT_ENTRY)),
        errors=(404, 503, 504),
        summary="Delete one bundle from the box",
        tags=tags,
    )
    async def delete(request: Request, kind: str, name: str) -> Any:
        removed = await api.dispatch(request, DeleteExport(kind=kind, bundle=name))
        return {"deleted": removed.to_json()}


def _command_routes(router: Router, api: APIContext) -> None:
    tags = ("commands",)

    @router.route(
        "GET",
        "/api/v1/commands",
        "commands_list",
        action="commands.list",
        responses=_json(_obj(commands={"type": "array", "items": {"type": "object"}})),
        summary="The registered commands and their argument schemas",
        tags=tags,
    )
    def commands(request: Request) -> Any:
        out = []
        for name in api.kernel.dispatcher.names():
            cls = api.catalog.get(name)
            out.append(
                {
                    "name": name,
                    "description": ((cls.__doc__ or "").strip().split("\n\n")[0] if cls else ""),
                    "schema": command_schema(cls) if cls is not None else None,
                }
            )
        return {"commands": out}

    @router.route(
        "POST",
        "/api/v1/commands/{name}",
        "commands_dispatch",
        params={"name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 100}},
        body={"type": "object", "maxProperties": 64},
        responses=_json(
            {
                "type": "object",
                "required": ["command", "result"],
                "properties": {"command": {"type": "string"}, "result": {"type": "object"}},
            }
        ),
        errors=(404, 409, 423, 503, 504),
        summary="Run any registered command from its JSON arguments (Idempotency-Key honoured)",
        tags=tags,
    )
    async def dispatch(request: Request, name: str, body: dict[str, Any]) -> Any:
        cls = api.catalog.get(name)
        if cls is None or name not in api.kernel.dispatcher.names():
            raise UnknownCommand(f"no command {name!r} is registered")
        key = request.getHeader(b"idempotency-key")
        command_id = None
        if key is not None:
            text = key.decode("ascii", "replace")
            if not _IDEMPOTENCY_KEY.fullmatch(text):
                raise InvalidCommand("Idempotency-Key must be 1 to 255 visible ASCII characters")
            command_id = text
        command = build_command(cls, body)
        result = await api.dispatch(request, command, command_id=command_id, fixed=False)
        return JSONResponse(
            {"command": name, "result": result.to_json()},
            headers={"X-Request-Id": request_id(request)},
        )


def _meta_routes(router: Router, api: APIContext) -> None:
    @router.route(
        "GET",
        "/api/v1/events",
        "events",
        action="events.read",
        query={
            "topics": {
                "type": "string",
                "maxLength": 1000,
                "description": "Comma-separated topic patterns (default: every topic you may read)",
            },
            "last_event_id": {
                "type": "string",
                "maxLength": 200,
                "description": "Resume after this event (the Last-Event-ID header wins)",
            },
            "follow": {
                "type": "boolean",
                "description": (
                    "Stay connected for live events (default true); false: replay and close"
                ),
            },
        },
        responses={
            200: ("text/event-stream", {"type": "string"}),
        },
        summary="Server-Sent Events: the bus, with resume from a replay ring",
        tags=("events",),
        stream=True,
    )
    def events(request: Request, query: dict[str, Any]) -> Any:
        principal = require_principal(request)
        patterns = parse_topics(query.get("topics"))
        header = request.getHeader(b"last-event-id")
        last_id = (
            header.decode("utf-8", "replace").strip() if header else query.get("last_event_id")
        )
        follow = query.get("follow", True)
        if follow:
            api.hub.admit()
        subject = principal.subject

        def allowed(topic: str) -> bool:
            # Called from the subscription's filter, inside a publish: the
            # decision is audited on the next turn, never re-entrantly.
            decision = api.engine.decide(subject, "events.read", f"topic:{topic}", publish=False)
            api.kernel.reactor.callLater(0, api.engine.audit, decision)
            return decision.allowed

        if principal.session is not None:
            session = principal.session
            still_valid: Callable[[], bool] = lambda: api.sessions.is_live(session)  # noqa: E731
        elif principal.token is not None:
            record = principal.token
            still_valid = lambda: api.tokens.is_live(record)  # noqa: E731
        else:  # pragma: no cover - require_principal answers a session or a token
            still_valid = lambda: False  # noqa: E731
        stream = EventStream(api.hub, request, patterns, allowed, still_valid)
        stream.open(last_id or None, follow)
        return STREAMING

    @router.route(
        "GET",
        "/api/v1/openapi.json",
        "openapi",
        public=True,
        responses=_json({"type": "object", "required": ["openapi", "paths"]}),
        summary="This document",
        tags=("meta",),
    )
    def openapi(request: Request) -> Any:
        return build_document(router, piccolod.__version__)

    @router.route(
        "GET",
        "/api/v1/policy",
        "policy",
        action="policy.read",
        responses=_json(
            {
                "type": "object",
                "required": ["roles", "subjects", "quotas", "you"],
                "properties": {
                    "roles": {"type": "array"},
                    "subjects": {"type": "object"},
                    "quotas": {"type": "array"},
                    "you": {"type": "object"},
                    "limiter": {"type": "object"},
                    "events": {"type": "object"},
                },
            }
        ),
        summary="The roles, subject mapping and quotas in force, and your own role",
        tags=("meta",),
    )
    def policy(request: Request) -> Any:
        principal = require_principal(request)
        return {
            **api.engine.stats(),
            "you": _describe_principal(api, principal),
            "limiter": api.limiter.stats(),
            "events": api.hub.stats(),
        }
