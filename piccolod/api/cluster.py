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
alone, with ``members`` holding only this node.

Wire it with ``cluster_routes(router, kernel)`` next to ``kernel_routes``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.web.server import Request

from piccolod.commands import ClusterStatus, CommandContext, GetClusterStatus
from piccolod.errors import UnknownCommand
from piccolod.kernel.runtime import Kernel

from .http import Router

__all__ = ["CLUSTER_SCHEMA", "cluster_routes"]

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
        "backend": {"type": ["object", "null"]},
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


def cluster_routes(router: Router, kernel: Kernel) -> None:
    """Add ``GET /api/v1/cluster`` to ``router``."""

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


def _request_id(request: Request) -> str | None:
    found = getattr(request, "_piccolod_request_id", None)
    return str(found) if found is not None else None
