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
from collections.abc import Mapping
from typing import Any

from twisted.web.server import Request

from piccolod.api.http import JSONResponse, Router
from piccolod.api.schema import validate
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
        # The caller, as the guard resolved it: the dispatcher's policy
        # decides on this subject (never a blanket "admin").
        subject=getattr(getattr(request, "piccolod_principal", None), "subject", None)
        or "anonymous",
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


def _json_body(raw: bytes, schema: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON body checked against the schema the OpenAPI document gives for it."""
    try:
        decoded = json.loads(raw)
    except ValueError as e:
        raise InvalidCommand(f"the request body is not valid JSON: {e}") from None
    errors = validate(schema, decoded)
    if errors:
        raise InvalidCommand(errors[0], errors=errors)
    assert isinstance(decoded, dict)
    return decoded


def _spec_text(request: Request) -> str:
    """The YAML spec of a request body (YAML, or JSON ``{"spec": ...}``)."""
    kind = _content_type(request)
    raw = _body(request)
    if kind == b"application/json":
        return str(_json_body(raw, _SPEC_JSON)["spec"])
    if kind not in YAML_TYPES:
        raise InvalidCommand(
            'the app spec must be sent as application/yaml (or JSON {"spec": ...})'
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCommand("the app spec is not UTF-8") from None
    _check_mapping(text)
    return text


def _check_mapping(text: str) -> None:
    """
    The body must be a YAML mapping, as the OpenAPI document says, before
    anything else is looked at (the apps subsystem validates the rest).
    """
    import yaml  # lazily: only app routes read YAML

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidCommand(f"the app spec is not valid YAML: {e}") from None
    if not isinstance(value, dict):
        raise InvalidCommand("the app spec must be a YAML mapping")


#: An app name, as ``piccolod.commands._app_name`` checks it.
NAME: dict[str, Any] = {
    "type": "string",
    "minLength": 2,
    "maxLength": 50,
    "pattern": "^[a-z][a-z0-9-]*[a-z0-9]$",
}
_NAMED = {"params": {"name": NAME}}
_SPEC_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_APP_SPEC_BYTES}
_SPEC_JSON: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": _SPEC_SCHEMA},
    "additionalProperties": False,
}
_UPDATE_JSON: dict[str, Any] = {
    "type": "object",
    "properties": {"image": _SPEC_SCHEMA, "spec": _SPEC_SCHEMA},
    "minProperties": 1,
    "maxProperties": 1,
    "additionalProperties": False,
}
#: A YAML app spec, as YAML or as JSON ``{"spec": ...}`` (the handler reads it).
SPEC_BODY: dict[str, Any] = {
    "application/yaml": {"schema": {"type": "object", "description": "The app spec"}},
    "application/json": {"schema": _SPEC_JSON},
}
#: Errors of every app route: a bad spec or name (400), no such app or no
#: apps subsystem (404), a conflict or another node leading (409), locked
#: storage (423), a backend down (503), a timeout (504).
_ERRORS = (400, 404, 409, 423, 503, 504)
_TAGS = ("apps",)


def app_routes(router: Router, kernel: Any) -> None:
    """Add the apps and services routes to ``router`` (they dispatch commands only)."""
    dispatcher = kernel.dispatcher

    async def run(request: Request, command: Command) -> Any:
        result = await dispatcher.dispatch(command, _context(request))
        return result.to_json()

    @router.route(
        "GET",
        "/api/v1/apps",
        "apps_list",
        errors=_ERRORS,
        tags=_TAGS,
        summary="Every installed app with its status",
    )
    async def list_apps(request: Request) -> Any:
        return await run(request, ListApps())

    @router.route(
        "POST",
        "/api/v1/apps",
        "apps_install",
        errors=(*_ERRORS, 413),
        tags=_TAGS,
        content=SPEC_BODY,
        responses={201: ("application/json", {"type": "object"})},
        summary="Install or replace an app from its YAML spec",
    )
    async def install(request: Request) -> Any:
        body = await run(request, InstallApp(spec=_spec_text(request)))
        name = body["app"]["name"]
        return JSONResponse(body, 201, {"Location": f"/api/v1/apps/{name}"})

    @router.route(
        "POST",
        "/api/v1/apps/validate",
        "apps_validate",
        errors=(*_ERRORS, 413),
        tags=_TAGS,
        content=SPEC_BODY,
        summary="Validate a YAML spec without installing it",
    )
    async def validate(request: Request) -> Any:
        return await run(request, ValidateApp(spec=_spec_text(request)))

    @router.route(
        "GET",
        "/api/v1/apps/{name}",
        "apps_get",
        errors=_ERRORS,
        tags=_TAGS,
        **_NAMED,
        summary="One app with its spec and status",
    )
    async def get(request: Request, name: str) -> Any:
        return await run(request, GetApp(app=name))

    @router.route(
        "DELETE",
        "/api/v1/apps/{name}",
        "apps_remove",
        errors=_ERRORS,
        tags=_TAGS,
        **_NAMED,
        query={"purge": {"type": "boolean"}},
        summary="Uninstall an app (purge=true: its volumes and ports too)",
    )
    async def remove(request: Request, name: str, query: Mapping[str, Any]) -> Any:
        return await run(request, RemoveApp(app=name, purge=bool(query.get("purge", False))))

    @router.route(
        "POST",
        "/api/v1/apps/{name}/start",
        "apps_start",
        errors=_ERRORS,
        tags=_TAGS,
        **_NAMED,
        summary="Enable an app",
    )
    async def start(request: Request, name: str) -> Any:
        return await run(request, StartApp(app=name))

    @router.route(
        "POST",
        "/api/v1/apps/{name}/stop",
        "apps_stop",
        errors=_ERRORS,
        tags=_TAGS,
        **_NAMED,
        summary="Disable an app",
    )
    async def stop(request: Request, name: str) -> Any:
        return await run(request, StopApp(app=name))

    @router.route(
        "POST",
        "/api/v1/apps/{name}/update",
        "apps_update",
        errors=(*_ERRORS, 413),
        tags=_TAGS,
        **_NAMED,
        summary="Change an app's image or whole spec",
        content={**SPEC_BODY, "application/json": {"schema": _UPDATE_JSON}},
    )
    async def update(request: Request, name: str) -> Any:
        if _content_type(request) == b"application/json":
            decoded = _json_body(_body(request), _UPDATE_JSON)
            command = UpdateApp(app=name, image=decoded.get("image"), spec=decoded.get("spec"))
        else:
            command = UpdateApp(app=name, spec=_spec_text(request))
        return await run(request, command)

    @router.route(
        "POST",
        "/api/v1/apps/{name}/revert",
        "apps_revert",
        errors=_ERRORS,
        tags=_TAGS,
        **_NAMED,
        summary="Go back to the spec before the last update",
    )
    async def revert(request: Request, name: str) -> Any:
        return await run(request, RevertApp(app=name))

    @router.route(
        "GET",
        "/api/v1/apps/{name}/logs",
        "apps_logs",
        errors=_ERRORS,
        tags=_TAGS,
        **_NAMED,
        query={"tail": {"type": "integer", "minimum": 1, "maximum": 10000}},
        summary="The last lines of an app's output",
    )
    async def logs(request: Request, name: str, query: Mapping[str, Any]) -> Any:
        return await run(request, AppLogs(app=name, tail=int(query.get("tail", 100))))

    @router.route(
        "GET",
        "/api/v1/apps/{name}/services",
        "apps_services",
        errors=_ERRORS,
        tags=_TAGS,
        **_NAMED,
        summary="An app's routes and ports",
    )
    async def app_services(request: Request, name: str) -> Any:
        await run(request, GetApp(app=name))
        body = await run(request, ListServices())
        return {
            "routes": [r for r in body["routes"] if r["app"] == name],
            "ports": body["allocations"].get(name, {}),
        }

    @router.route(
        "GET",
        "/api/v1/services",
        "services_list",
        errors=_ERRORS,
        tags=_TAGS,
        summary="The route table and port allocations",
    )
    async def services(request: Request) -> Any:
        return await run(request, ListServices())
