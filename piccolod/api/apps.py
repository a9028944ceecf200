"""
HTTP routes of the apps and services subsystems.

Every route only builds a command and dispatches it (the api package never
imports ``piccolod.apps``); errors map to problem+json through the router,
so an invalid spec is a 400 whose ``errors`` lists every problem.

==========  ===================================  ===========================
method      path                                 command
==========  ===================================  ===========================
GET         /api/v1/apps                         apps.list
POST        /api/v1/apps                         apps.install (YAML body) 201
POST        /api/v1/apps/validate                apps.validate (YAML body)
GET         /api/v1/apps/{name}                  apps.get
DELETE      /api/v1/apps/{name}[?purge=true]     apps.remove
POST        /api/v1/apps/{name}/start            apps.start
POST        /api/v1/apps/{name}/stop             apps.stop
POST        /api/v1/apps/{name}/update           apps.update (JSON ``{"image"}`` or YAML)
POST        /api/v1/apps/{name}/revert           apps.revert
GET         /api/v1/apps/{name}/logs[?tail=N]    apps.logs
GET         /api/v1/apps/{name}/services         services.list (this app's routes)
GET         /api/v1/services                     services.list
==========  ===================================  ===========================

YAML bodies are accepted as ``application/yaml``, ``application/x-yaml``,
``text/yaml`` or ``text/plain``, or as JSON ``{"spec": "<yaml>"}``.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request

from piccolod.api.http import JSONResponse, Router
from piccolod.commands import (
    MAX_APP_SPEC_BYTES,
    AppLogs,
    Command,
    CommandContext,
    GetApp,
    InstallApp,
    ListApps,
    ListServices,
    RemoveApp,
    RevertApp,
    StartApp,
    StopApp,
    UpdateApp,
    ValidateApp,
)
from piccolod.errors import InvalidCommand, TooLarge

__all__ = ["YAML_TYPES", "app_routes"]

YAML_TYPES = frozenset(
    {b"application/yaml", b"application/x-yaml", b"text/yaml", b"text/x-yaml", b"text/plain"}
)


def _context(request: Request) -> CommandContext:
    request_id = request.getHeader(b"x-request-id")
    return CommandContext(
        correlation_id=request_id.decode("ascii", "replace")[:128] if request_id else None,
        subject="admin",
        source="api",
    )


def _body(request: Request) -> bytes:
    assert request.content is not None
    raw = request.content.read(MAX_APP_SPEC_BYTES + 1)
    if len(raw) > MAX_APP_SPEC_BYTES:
        raise TooLarge(f"app specs are limited to {MAX_APP_SPEC_BYTES} bytes")
    return bytes(raw)


def _content_type(request: Request) -> bytes:
    return (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()


def _spec_text(request: Request) -> str:
    """The YAML spec of a request body (YAML, or JSON ``{"spec": ...}``)."""
    kind = _content_type(request)
    raw = _body(request)
    if kind == b"application/json":
        try:
            decoded = json.loads(raw)
        except ValueError as e:
            raise InvalidCommand(f"the request body is not valid JSON: {e}") from None
        if not isinstance(decoded, dict) or not isinstance(decoded.get("spec"), str):
            raise InvalidCommand('a JSON body must be {"spec": "<YAML text>"}')
        return str(decoded["spec"])
    if kind not in YAML_TYPES:
        raise InvalidCommand(
            'the app spec must be sent as application/yaml (or JSON {"spec": ...})'
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCommand("the app spec is not UTF-8") from None


def _flag(request: Request, name: bytes) -> bool:
    value = request.args.get(name, [b""])[0].lower()
    if value in (b"", b"0", b"false", b"no"):
        return False
    if value in (b"1", b"true", b"yes"):
        return True
    raise InvalidCommand(f"{name.decode()} must be true or false")


def app_routes(router: Router, kernel: Any) -> None:
    """Add the apps and services routes to ``router`` (they dispatch commands only)."""
    dispatcher = kernel.dispatcher

    async def run(request: Request, command: Command) -> Any:
        result = await dispatcher.dispatch(command, _context(request))
        return result.to_json()

    @router.route("GET", "/api/v1/apps")
    async def list_apps(request: Request) -> Any:
        return await run(request, ListApps())

    @router.route("POST", "/api/v1/apps")
    async def install(request: Request) -> Any:
        body = await run(request, InstallApp(spec=_spec_text(request)))
        name = body["app"]["name"]
        return JSONResponse(body, 201, {"Location": f"/api/v1/apps/{name}"})

    @router.route("POST", "/api/v1/apps/validate")
    async def validate(request: Request) -> Any:
        return await run(request, ValidateApp(spec=_spec_text(request)))

    @router.route("GET", "/api/v1/apps/{name}")
    async def get(request: Request, name: str) -> Any:
        return await run(request, GetApp(app=name))

    @router.route("DELETE", "/api/v1/apps/{name}")
    async def remove(request: Request, name: str) -> Any:
        return await run(request, RemoveApp(app=name, purge=_flag(request, b"purge")))

    @router.route("POST", "/api/v1/apps/{name}/start")
    async def start(request: Request, name: str) -> Any:
        return await run(request, StartApp(app=name))

    @router.route("POST", "/api/v1/apps/{name}/stop")
    async def stop(request: Request, name: str) -> Any:
        return await run(request, StopApp(app=name))

    @router.route("POST", "/api/v1/apps/{name}/update")
    async def update(request: Request, name: str) -> Any:
        if _content_type(request) == b"application/json":
            try:
                decoded = json.loads(_body(request))
            except ValueError as e:
                raise InvalidCommand(f"the request body is not valid JSON: {e}") from None
            if not isinstance(decoded, dict):
                raise InvalidCommand('the body must be {"image": "..."} or {"spec": "..."}')
            command = UpdateApp(app=name, image=decoded.get("image"), spec=decoded.get("spec"))
        else:
            command = UpdateApp(app=name, spec=_spec_text(request))
        return await run(request, command)

    @router.route("POST", "/api/v1/apps/{name}/revert")
    async def revert(request: Request, name: str) -> Any:
        return await run(request, RevertApp(app=name))

    @router.route("GET", "/api/v1/apps/{name}/logs")
    async def logs(request: Request, name: str) -> Any:
        raw = request.args.get(b"tail", [b"100"])[0]
        if not raw.isdigit():
            raise InvalidCommand("tail must be a positive integer")
        return await run(request, AppLogs(app=name, tail=int(raw)))

    @router.route("GET", "/api/v1/apps/{name}/services")
    async def app_services(request: Request, name: str) -> Any:
        await run(request, GetApp(app=name))
        body = await run(request, ListServices())
        return {
            "routes": [r for r in body["routes"] if r["app"] == name],
            "ports": body["allocations"].get(name, {}),
        }

    @router.route("GET", "/api/v1/services")
    async def services(request: Request) -> Any:
        return await run(request, ListServices())
