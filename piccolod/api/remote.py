"""
The remote access routes: ``/api/v1/remote/*`` and the ACME HTTP-01
resource ``/.well-known/acme-challenge/{token}``.

Every route only builds a ``remote.*`` command and dispatches it (the API
never imports the remote subsystem); errors map to their one status
(``Locked`` → 423 while storage is locked, ``NotLeader`` → 409 with the
leader, ``NotFound`` → 404, ``InvalidCommand`` → 400).

The challenge route is public, as RFC 8555 requires (the ACME server
fetches it without credentials, and what it returns is public by design):
it dispatches ``remote.acme_challenge`` as the subject
``system:acme-http01`` and answers the key authorization as
``text/plain``, or 404.

Wire it with ``remote_routes(router, kernel)``.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from piccolod.commands import (
    AddRemoteAlias,
    Command,
    CommandContext,
    ConfigureRemote,
    DisableRemote,
    GetAcmeChallenge,
    GetRemoteStatus,
    ListRemoteAliases,
    ListRemoteCertificates,
    RemoveRemoteAlias,
    RenewRemoteCertificate,
    Result,
    RotateRemoteDeviceKey,
)

from .catalog import build_command, command_schema
from .http import RawResponse, Router

__all__ = ["ACME_SUBJECT", "remote_routes"]

#: The subject the public challenge route dispatches as.
ACME_SUBJECT = "system:acme-http01"

_TAGS = ("remote",)
#: A lowercase DNS name of at least two labels (``commands.is_remote_hostname``).
_HOSTNAME = {
    "type": "string",
    "minLength": 3,
    "maxLength": 253,
    "pattern": r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$",
}
_TOKEN = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[A-Za-z0-9_-]+$"}


def _context(request: Request) -> CommandContext:
    principal = getattr(request, "piccolod_principal", None)
    subject = getattr(principal, "subject", None) or "anonymous"
    header = request.getHeader(b"idempotency-key")
    return CommandContext(
        command_id=header.decode("ascii", "replace") if header else None,
        subject=subject,
        source="api",
    )


def remote_routes(router: Router, kernel: Any) -> None:
    """Add the remote access routes to ``router`` (``kernel.dispatcher`` runs them)."""

    async def run(request: Request, command: Command) -> Any:
        result: Result = await kernel.dispatcher.dispatch(command, _context(request))
        return result.to_json()

    @router.route(
        "GET",
        "/api/v1/remote",
        summary="Remote access status: configuration, routes, tunnels, certificates",
        tags=_TAGS,
        errors=(401, 403, 423),
    )
    async def status(request: Request) -> Any:
        return await run(request, GetRemoteStatus())

    @router.route(
        "POST",
        "/api/v1/remote/configure",
        summary="Enable remote access with this configuration",
        tags=_TAGS,
        body=command_schema(ConfigureRemote),
        errors=(400, 401, 403, 409, 423),
    )
    async def configure(request: Request, body: Any) -> Any:
        return await run(request, build_command(ConfigureRemote, body))

    @router.route(
        "POST",
        "/api/v1/remote/disable",
        summary="Stop the tunnels and TLS termination (the configuration is kept)",
        tags=_TAGS,
        errors=(401, 403, 409, 423),
    )
    async def disable(request: Request) -> Any:
        return await run(request, DisableRemote())

    @router.route(
        "GET",
        "/api/v1/remote/aliases",
        summary="Extra hostnames and their targets",
        tags=_TAGS,
        errors=(401, 403, 423),
    )
    async def aliases(request: Request) -> Any:
        return await run(request, ListRemoteAliases())

    @router.route(
        "POST",
        "/api/v1/remote/aliases",
        summary="Route a hostname (TLS) to the portal or an app listener",
        tags=_TAGS,
        body=command_schema(AddRemoteAlias),
        errors=(400, 401, 403, 409, 423),
    )
    async def add_alias(request: Request, body: Any) -> Any:
        return await run(request, build_command(AddRemoteAlias, body))

    @router.route(
        "DELETE",
        "/api/v1/remote/aliases/{hostname}",
        summary="Forget an alias and its certificate",
        tags=_TAGS,
        params={"hostname": _HOSTNAME},
        errors=(400, 401, 403, 404, 409, 423),
    )
    async def remove_alias(request: Request, hostname: str) -> Any:
        return await run(request, RemoveRemoteAlias(hostname=hostname))

    @router.route(
        "GET",
        "/api/v1/remote/certificates",
        summary="Certificates per hostname: expiry, issuer, last error",
        tags=_TAGS,
        errors=(401, 403, 423),
    )
    async def certificates(request: Request) -> Any:
        return await run(request, ListRemoteCertificates())

    @router.route(
        "POST",
        "/api/v1/remote/certificates/renew",
        summary="Issue or renew every configured hostname's certificate now",
        tags=_TAGS,
        errors=(401, 403, 409, 423),
    )
    async def renew_all(request: Request) -> Any:
        return await run(request, RenewRemoteCertificate())

    @router.route(
        "POST",
        "/api/v1/remote/certificates/{hostname}/renew",
        summary="Issue or renew one hostname's certificate now",
        tags=_TAGS,
        params={"hostname": _HOSTNAME},
        errors=(400, 401, 403, 404, 409, 423),
    )
    async def renew(request: Request, hostname: str) -> Any:
        return await run(request, RenewRemoteCertificate(hostname=hostname))

    @router.route(
        "POST",
        "/api/v1/remote/device-key/rotate",
        summary="Replace the tunnels' device key",
        tags=_TAGS,
        errors=(401, 403, 409, 423),
    )
    async def rotate(request: Request) -> Any:
        return await run(request, RotateRemoteDeviceKey())

    @router.route(
        "GET",
        "/.well-known/acme-challenge/{token}",
        summary="ACME HTTP-01 key authorization (public, RFC 8555)",
        tags=_TAGS,
        public=True,
        csrf=False,
        params={"token": _TOKEN},
        errors=(400, 404),
    )
    async def acme_challenge(request: Request, token: str) -> Any:
        context = CommandContext(subject=ACME_SUBJECT, source="api")
        answer = await kernel.dispatcher.dispatch(GetAcmeChallenge(token=token), context)
        return RawResponse(answer.key_authorization.encode("ascii"), b"text/plain")
