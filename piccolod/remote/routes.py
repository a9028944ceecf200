"""
The remote route table, computed from facts (no I/O, no clock).

A *target* is the portal or one exposed app listener (``<app>/<listener>``).
Each gets a :class:`RemoteRoute`:

- ``local`` when this node leads the target's resource (``control-plane``
  for the portal, ``app:<name>`` for a listener): the portal at the
  kernel's API address, a listener at its published port on loopback;
- ``leader`` when another node leads it and the registry knows that
  leader's address: the portal at the leader's API address, a listener at
  the leader's host on the listener's published port;
- ``unavailable`` otherwise (role unknown, no leader address, listener not
  published), with the reason.  ``unknown`` is never treated as leader.

:func:`tunnel_specs` turns the table into what each tunnel forwards: one
reverse forward per available target, plus ``https`` to the TLS terminator.

Tests: ``tests/unit/test_remote_routes.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs

from piccolod.commands import CONTROL_PLANE_RESOURCE
from piccolod.events import Role
from piccolod.interfaces import LeadershipState, TunnelForward, TunnelSpec
from piccolod.remote.model import RemoteState

__all__ = [
    "HTTPS_FORWARD",
    "PORTAL",
    "LeadershipView",
    "RemoteRoute",
    "compute_routes",
    "resources_of",
    "split_address",
    "tunnel_specs",
]

PORTAL = "portal"
HTTPS_FORWARD = "https"
_UNSPECIFIED = {"", "0.0.0.0", "::", "[::]"}


class LeadershipView(Protocol):
    """The part of ``ILeadershipRegistry`` the route table reads."""

    def is_leader(self, resource: str) -> bool: ...

    def state(self, resource: str) -> LeadershipState: ...


@attrs.frozen
class RemoteRoute:
    """
    Where one target is served from.

    @ivar resource: the leadership resource deciding it.
    @ivar host: where connections go (``mode`` ``local`` or ``leader``).
    @ivar remote_port: the configured port on the tunnel servers (0: any).
    """

    target: str
    resource: str
    mode: str
    host: str = ""
    port: int = 0
    remote_port: int = 0
    hostnames: tuple[str, ...] = ()
    reason: str = ""

    @property
    def forward_name(self) -> str:
        return PORTAL if self.target == PORTAL else f"app:{self.target}"

    @property
    def available(self) -> bool:
        return self.mode != "unavailable"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = attrs.asdict(self)
        out["hostnames"] = list(self.hostnames)
        return out


def split_address(address: str | None) -> tuple[str, int] | None:
    """
    ``http://10.0.0.2:8080`` → ``("10.0.0.2", 8080)``; an unspecified host
    (``0.0.0.0``, ``::``) means this node's loopback; ``None`` when there
    is no usable address.
    """
    if not address:
        return None
    try:
        parts = urlsplit(address if "//" in address else f"//{address}")
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname or ""
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme)
    if port is None or not 0 < port < 65536:
        return None
    if host in _UNSPECIFIED:
        host = "127.0.0.1"
    return host, port


def _route(
    target: str,
    resource: str,
    leadership: LeadershipView,
    local: tuple[str, int] | None,
    via_leader: Any,
    remote_port: int,
    hostnames: tuple[str, ...],
) -> RemoteRoute:
    # Plain constructor calls, not attrs.evolve: this runs per target per event.
    if leadership.is_leader(resource):
        if local is None:
            return RemoteRoute(
                target, resource, "unavailable", "", 0, remote_port, hostnames,
                "this node leads it but does not serve it",
            )  # fmt: skip
        return RemoteRoute(target, resource, "local", local[0], local[1], remote_port, hostnames)
    state = leadership.state(resource)
    if state.role is not Role.FOLLOWER:
        return RemoteRoute(
            target, resource, "unavailable", "", 0, remote_port, hostnames,
            f"no leader known for {resource}",
        )  # fmt: skip
    leader = via_leader(state)
    if leader is None:
        return RemoteRoute(
            target, resource, "unavailable", "", 0, remote_port, hostnames,
            f"the leader of {resource} ({state.leader_id}) has no known address",
        )  # fmt: skip
    return RemoteRoute(target, resource, "leader", leader[0], leader[1], remote_port, hostnames)


def resources_of(state: RemoteState) -> set[str]:
    """The leadership resources the route table depends on."""
    found = {f"app:{e.app}" for e in state.settings.expose}
    if state.settings.expose_portal:
        found.add(CONTROL_PLANE_RESOURCE)
    return found


def compute_routes(
    state: RemoteState,
    published: Mapping[str, int],
    leadership: LeadershipView,
    portal_address: str,
) -> tuple[RemoteRoute, ...]:
    """
    The route of every exposed target, sorted by target.

    @param published: ``<app>/<listener>`` → the port this node's services
        subsystem serves it on (from ``RoutePublished``).
    @param portal_address: this node's API base URL.
    """
    settings = state.settings
    names: dict[str, list[str]] = {}
    for hostname, target in state.hostnames().items():
        names.setdefault(target, []).append(hostname)
    routes: list[RemoteRoute] = []
    if settings.expose_portal:
        routes.append(
            _route(
                PORTAL,
                CONTROL_PLANE_RESOURCE,
                leadership,
                split_address(portal_address),
                lambda s: split_address(s.leader_address),
                settings.portal_port,
                tuple(names.get(PORTAL, ())),
            )
        )
    for exposure in settings.expose:
        target = exposure.target
        port = published.get(target)
        hostnames = tuple(names.get(target, ()))
        if port is None:
            routes.append(
                RemoteRoute(
                    target,
                    f"app:{exposure.app}",
                    "unavailable",
                    remote_port=exposure.remote_port,
                    hostnames=hostnames,
                    reason="the listener is not published on this node",
                )
            )
            continue
        leader_port = port

        def via_leader(s: LeadershipState, leader_port: int = leader_port) -> Any:
            found = split_address(s.leader_address)
            return None if found is None else (found[0], leader_port)

        routes.append(
            _route(
                target,
                f"app:{exposure.app}",
                leadership,
                ("127.0.0.1", port),
                via_leader,
                exposure.remote_port,
                hostnames,
            )
        )
    return tuple(sorted(routes, key=lambda r: r.target))


def tunnel_specs(
    state: RemoteState, routes: tuple[RemoteRoute, ...], tls_port: int | None
) -> tuple[TunnelSpec, ...]:
    """
    One spec per configured tunnel server: a forward for each available
    route and, when the TLS terminator listens and ``https_port`` is set,
    ``https`` to it.  Nothing while remote access is disabled or there is
    no device key.
    """
    settings = state.settings
    if not state.enabled or not state.device_key:
        return ()
    specs: list[TunnelSpec] = []
    for tunnel in settings.tunnels:
        forwards = [
            TunnelForward(r.forward_name, tunnel.bind_host, r.remote_port, r.host, r.port)
            for r in routes
            if r.available
        ]
        if settings.https_port is not None and tls_port is not None:
            forwards.append(
                TunnelForward(
                    HTTPS_FORWARD, tunnel.bind_host, settings.https_port, "127.0.0.1", tls_port
                )
            )
        specs.append(
            TunnelSpec(
                name=tunnel.name,
                host=tunnel.host,
                port=tunnel.port,
                user=tunnel.user,
                private_key=state.device_key.encode("ascii"),
                host_key=tunnel.host_key,
                forwards=tuple(forwards),
                keepalive_interval=tunnel.keepalive_interval,
                keepalive_timeout=tunnel.keepalive_timeout,
            )
        )
    return tuple(specs)
