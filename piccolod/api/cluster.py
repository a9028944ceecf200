"""
``GET /api/v1/cluster``: this node's view of the cluster.

The answer is the consensus subsystem's ``cluster.status`` command
(:class:`~piccolod.commands.ClusterStatus`): the known members (node id,
API address), the role, leader and term of every tracked resource, and the
variant's backend (etcd endpoints and their health).  The API never imports
the consensus subsystem; it dispatches the command as ``system:api`` after
the boundary has checked the caller's ``cluster.read`` permission.

When no consensus variant answers ``cluster.status`` (an older or a
third-party variant), the route still answers from the leadership registry
alone, with ``members`` holding only this node.  With the ``etcd`` variant
``backend.replication`` holds the replication lag: the commit log's head,
this node's applied store revision, the lag in revisions and how long this
node has been behind.

``POST /api/v1/cluster/join`` (``{"password"}``) joins an uninitialised
node to the cluster's shared control store (``persistence.join``): public,
like first-run setup, and only while this node is not set up (409
afterwards); a wrong password counts towards the login lockout (429) and
towards the storage's own unlock delay.  It answers the storage status
and, when the API's session machinery is wired in (``api``), logs the
caller in like setup does.

Wire it with ``cluster_routes(router, kernel, api)`` next to ``kernel_routes``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.web.server import Request

from piccolod.commands import (
    ClusterStatus,
    Command,
    CommandContext,
    GetClusterStatus,
    GetStorageStatus,
    JoinCluster,
    Result,
)
from piccolod.errors import Conflict, Unauthorized, Unavailable, UnknownCommand
from piccolod.kernel.runtime import Kernel

from .auth import client_address
from .http import JSONResponse, Router
from .routes import STATUS

if TYPE_CHECKING:
    from .routes import APIContext

__all__ = ["CLUSTER_SCHEMA", "JOIN_SCHEMA", "cluster_routes"]

#: The subject the route dispatches ``cluster.status`` as.
SUBJECT = "system:api"

CLUSTER_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "required": ["node_id", "variant", "members", "resources"],
    "properties": {
        "node_id": {"type": "string"},
        "variant": {"type": "string"},
        "members": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["node_id", "self"],
                "properties": {
                    "node_id": {"type": "string"},
                    "api_address": {"type": ["string", "null"]},
                    "self": {"type": "boolean"},
                    "roles": {
                        "type": "object",
                        "description": "resource → leader or follower, as this node sees it",
                        "additionalProperties": {"enum": ["leader", "follower"]},
                    },
                    "terms": {
                        "type": "object",
                        "additionalProperties": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
        "resources": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["resource", "role", "term"],
                "properties": {
                    "resource": {"type": "string"},
                    "role": {"enum": ["unknown", "leader", "follower"]},
                    "leader_id": {"type": ["string", "null"]},
                    "leader_address": {"type": ["string", "null"]},
                    "term": {"type": "integer", "minimum": 0},
                },
            },
        },
        "backend": {
            "type": ["object", "null"],
            "properties": {
                "campaigns": {
                    "type": "object",
                    "description": "Whether this node campaigns for leadership, and why not",
                    "required": ["eligible", "reason"],
                    "properties": {
                        "eligible": {"type": "boolean"},
                        "reason": {"type": ["string", "null"]},
                    },
                },
                "replication": {
                    "type": "object",
                    "description": "The commit log's head and this node's lag behind it",
                    "properties": {
                        "log_head": {"type": ["integer", "null"]},
                        "log_revision": {"type": "integer"},
                        "applied": {"type": ["integer", "null"]},
                        "lag": {"type": ["integer", "null"], "minimum": 0},
                        "behind_for": {"type": "number", "minimum": 0},
                        "feed": {"type": "object"},
                    },
                },
            },
        },
    },
}

JOIN_BODY: Mapping[str, Any] = {
    "type": "object",
    "required": ["password"],
    "properties": {
        "password": {"type": "string", "minLength": 1, "maxLength": 1024, "writeOnly": True}
    },
    "additionalProperties": False,
}

#: The storage status (as ``/api/v1/storage/status``) and, when the join
#: logged the caller in, the new session's CSRF token and subject.
JOIN_SCHEMA: Mapping[str, Any] = {
    **STATUS,
    "properties": {
        **STATUS["properties"],
        "csrf_token": {"type": "string", "description": "The new session's (when logged in)"},
        "subject": {"type": "string"},
    },
}


def registry_view(kernel: Kernel) -> ClusterStatus:
    """What the leadership registry alone says (no consensus answer)."""
    return ClusterStatus(
        node_id=kernel.node_id,
        variant=str(kernel.selected.get("consensus", "")),
        members=(
            {"node_id": kernel.node_id, "api_address": kernel.api_address or None, "self": True},
        ),
        resources=tuple(s.to_json() for s in kernel.registry.states()),
        backend=None,
    )


def cluster_routes(router: Router, kernel: Kernel, api: APIContext | None = None) -> None:
    """
    Add ``GET /api/v1/cluster`` and ``POST /api/v1/cluster/join`` to
    ``router``; with ``api`` the join counts wrong passwords towards the
    login lockout and logs the caller in.
    """

    @router.route(
        "GET",
        "/api/v1/cluster",
        "cluster",
        action="cluster.read",
        responses={200: ("application/json", CLUSTER_SCHEMA)},
        errors=(503, 504),
        summary="Members, and the role, leader and term of every resource",
        tags=("cluster",),
    )
    async def cluster(request: Request) -> Any:
        context = CommandContext(correlation_id=_request_id(request), subject=SUBJECT, source="api")
        try:
            result = await kernel.dispatcher.dispatch(GetClusterStatus(), context)
        except UnknownCommand:
            result = registry_view(kernel)
        return result.to_json()

    def dispatch(request: Request, command: Command) -> Any:
        context = CommandContext(correlation_id=_request_id(request), subject=SUBJECT, source="api")
        d = kernel.dispatcher.dispatch(command, context)

        def missing(failure: Any) -> Any:
            failure.trap(UnknownCommand)
            raise Unavailable(f"nothing handles {command.name}: is its subsystem running?")

        return d.addErrback(missing)

    @router.route(
        "POST",
        "/api/v1/cluster/join",
        "cluster_join",
        public=True,
        body=JOIN_BODY,
        responses={200: ("application/json", JOIN_SCHEMA)},
        errors=(401, 404, 409, 429, 503, 504),
        summary="Join this new node to the cluster's shared control store with the admin password",
        tags=("cluster",),
    )
    async def join(request: Request, body: dict[str, Any]) -> Any:
        address = client_address(request)
        if api is not None:
            api.limiter.check(address)
        status: Result = await dispatch(request, GetStorageStatus())
        if status.to_json().get("initialized"):
            raise Conflict("this node is already set up; it cannot join a cluster")
        try:
            result: Result = await dispatch(request, JoinCluster(password=body["password"]))
        except Unauthorized as e:
            if api is not None:
                delay = api.limiter.failed(address)
                detail = e.type + (f"; locked out for {delay:g}s" if delay else "")
                api.audit(request, "cluster.join", "admin", "denied", detail)
            raise
        answer = result.to_json()
        if api is None:
            return answer
        api.limiter.succeeded(address)
        cookie, session = api.new_session(request)
        api.audit(request, "cluster.join", "admin", "ok")
        return JSONResponse({**answer, **session}, cookies=(cookie,))


def _request_id(request: Request) -> str | None:
    found = getattr(request, "_piccolod_request_id", None)
    return str(found) if found is not None else None
