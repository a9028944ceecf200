"""
Drop-in plugins of piccolod itself: the ``piccolod`` twistd service maker and
the ``api`` subsystem.  (No ``__init__.py`` in ``twisted/plugins``: it is a
namespace drop-in directory.)
"""

from typing import Any

from twisted.application.service import ServiceMaker

from piccolod.kernel.plugins import SubsystemPlugin

piccolod = ServiceMaker(
    "piccolod",
    "piccolod.tap",
    "The piccolod control-plane daemon of a home-server appliance.",
    "piccolod",
)

#: ``[subsystems.api]`` keys and their defaults (see docs/api.md "Configuration").
#: Kept here, not imported from piccolod.api, so that plugin discovery stays
#: cheap; tests/unit/test_api_service.py checks both lists agree.
API_CONFIG: dict[str, Any] = {
    "listen": "tcp:8080:interface=127.0.0.1",
    "max_body": 1048576,
    "session_idle_timeout": 1800.0,
    "session_absolute_timeout": 43200.0,
    "max_sessions": 64,
    "login_free_attempts": 5,
    "login_lockout_initial": 1.0,
    "login_lockout_max": 900.0,
    "login_global_free_attempts": 50,
    "login_global_lockout_max": 300.0,
    "token_rate": 50.0,
    "token_burst": 100.0,
    "max_tokens": 100,
    "max_concurrent_exports": 1,
    "max_apps": 50,
    "sse_replay": 4096,
    "sse_queue": 16384,
    "sse_max_clients": 256,
    "sse_heartbeat": 15.0,
    "sse_resume_window": 300.0,
    "connection_timeout": 300.0,
    "access_log": False,
    "portal": True,
    "roles": {},
    "subjects": {},
}

apiHttp = SubsystemPlugin(
    slot="api",
    variant="http",
    description="The HTTP API on twisted.web: auth, policy, storage, commands, SSE, OpenAPI",
    factory="piccolod.api.service.APIService.from_context",
    # ignore: mypy cannot solve the generic MappingProxyType converter of
    # SubsystemPlugin.config_keys (the same ignore as the other plugin files).
    config_keys=API_CONFIG,  # type: ignore[arg-type]
    default=True,
)
