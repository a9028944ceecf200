"""
The OpenAPI 3.1 document of the API, built from the router's own table.

Every :class:`~piccolod.api.http.Route` carries what the document needs
(summary, public or not, parameter and body schemas, success answers, the
error statuses it may give), so the document is generated rather than
written, and cannot list a route that does not exist or miss one that does
(``tests/unit/test_api_openapi.py`` checks both directions anyway).  The
body and parameter schemas are the very dicts the router validates with.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .http import SAFE_METHODS, Route, Router

__all__ = ["PROBLEM_SCHEMA", "build_document"]

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details; extra members depend on the type.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "https://piccolod.dev/problems/<slug>"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "string"}},
        "retry_after": {"type": "number"},
        "decision_id": {"type": "string"},
    },
    "additionalProperties": True,
}

_DESCRIPTIONS = {
    400: "Invalid request (body, parameters, or the command's own validation)",
    401: "No valid session or token (a wrong password or recovery key is a 401 too)",
    403: "Denied by policy, or the CSRF token is missing or wrong",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict with the current state (e.g. an illegal state transition)",
    413: "Request body too large",
    423: "Storage is locked",
    429: "Rate-limited, locked out or over a quota (see Retry-After)",
    503: "Not ready, or a backend is unavailable",
    504: "The command timed out",
}


def _operation_id(route: Route) -> str:
    base = route.name if route.name != route.template else f"{route.method} {route.template}"
    return re.sub(r"[^A-Za-z0-9_]+", "_", base).strip("_")


def _security(route: Route) -> list[dict[str, list[str]]]:
    if route.public:
        return []
    if route.method in SAFE_METHODS or not route.csrf:
        return [{"bearerAuth": []}, {"sessionCookie": []}]
    return [{"bearerAuth": []}, {"sessionCookie": [], "csrfToken": []}]


def error_statuses(route: Route) -> list[int]:
    """The error statuses ``route`` may answer."""
    found = set(route.errors)
    if route.body is not None or route.content:
        found |= {400, 413}
    if route.query or route.params:
        found.add(400)
    if not route.public:
        found |= {401, 403, 429}
    return sorted(found)


def _problem(status: int) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": _DESCRIPTIONS.get(status, "Error"),
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }
    if status == 429:
        answer["headers"] = {
            "Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait"}
        }
    return answer


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": _operation_id(route),
        "summary": route.summary or f"{route.method} {route.template}",
        "security": _security(route),
    }
    if route.tags:
        op["tags"] = list(route.tags)
    params: list[dict[str, Any]] = []
    for name in re.findall(r"\{([a-z_][a-z0-9_]*)\}", route.template):
        params.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": dict(route.params.get(name, {"type": "string"})),
            }
        )
    for name, schema in route.query.items():
        params.append({"name": name, "in": "query", "required": False, "schema": dict(schema)})
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": dict(route.body)}},
        }
    elif route.content:
        op["requestBody"] = {
            "required": True,
            "content": {media: dict(spec) for media, spec in route.content.items()},
        }
    responses: dict[str, Any] = {}
    answers: Mapping[int, tuple[str, Mapping[str, Any]]] = route.responses or {
        200: ("application/json", {"type": "object"})
    }
    for status, (content_type, schema) in sorted(answers.items()):
        responses[str(status)] = {
            "description": "Success",
            "content": {content_type: {"schema": dict(schema)}},
        }
    for status in error_statuses(route):
        responses.setdefault(str(status), _problem(status))
    op["responses"] = responses
    return op


def build_document(router: Router, version: str, title: str = "piccolod") -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of ``router``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in router.all_routes():
        paths.setdefault(route.template, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": (
                "The piccolod control-plane API. Errors are RFC 9457 problem+json "
                "documents; every typed error has one status."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {"Problem": PROBLEM_SCHEMA},
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token: pcd_<id>_<secret>",
                },
                "sessionCookie": {"type": "apiKey", "in": "cookie", "name": "piccolod_session"},
                "csrfToken": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token"},
            },
        },
    }
