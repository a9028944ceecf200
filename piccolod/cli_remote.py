"""
``piccolodctl remote …``: remote access from the command line, over the
``/api/v1/remote`` routes.

The CLI hooks it in with one sub-command and one branch::

    subCommands += [["remote", None, RemoteOptions, "Remote access: tunnels, certificates."]]
    ...
    elif command == "remote":
        text, body = await run_remote(json_request(treq, headers), base, sub)

Sub-commands::

    remote status
    remote configure --tunnel piccolo@tunnel.example.net:22 [--host-key SHA256:…]
                     [--portal-hostname portal.example.net] [--portal-port N]
                     [--https-port N] [--no-portal]
                     [--expose APP/LISTENER[:REMOTE_PORT][=HOSTNAME] ...]
                     [--acme-directory URL [--acme-email E] [--acme-ca-bundle F]
                      [--renew-before-days D]]
                     | --file config.json
    remote disable
    remote aliases | alias-add HOSTNAME [TARGET] | alias-remove HOSTNAME
    remote certificates | renew [HOSTNAME]
    remote rotate-key
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from twisted.python import usage

__all__ = [
    "RemoteOptions",
    "format_certificates",
    "format_status",
    "json_request",
    "plan",
    "run_remote",
]

Request = Callable[[str, str, Any], Awaitable[tuple[int, Any]]]


def _tunnel(value: str, index: int) -> dict[str, Any]:
    """``user@host[:port]`` → a tunnel configuration."""
    user, at, rest = value.partition("@")
    if not at or not user or not rest:
        raise usage.UsageError(f"--tunnel takes USER@HOST[:PORT], got {value!r}")
    host, port = rest, 22
    if rest.count(":") == 1:
        host, _, text = rest.partition(":")
        if not text.isdigit():
            raise usage.UsageError(f"--tunnel: bad port in {value!r}")
        port = int(text)
    return {"name": "default" if index == 0 else f"tunnel{index}", "host": host, "user": user,
            "port": port}  # fmt: skip


def _exposure(value: str) -> dict[str, Any]:
    """``APP/LISTENER[:REMOTE_PORT][=HOSTNAME]`` → an exposure."""
    target, _, hostname = value.partition("=")
    target, colon, port = target.partition(":")
    app, slash, listener = target.partition("/")
    if not slash or not app or not listener or (colon and not port.isdigit()):
        raise usage.UsageError(
            f"--expose takes APP/LISTENER[:REMOTE_PORT][=HOSTNAME], got {value!r}"
        )
    out: dict[str, Any] = {"app": app, "listener": listener}
    if colon:
        out["remote_port"] = int(port)
    if hostname:
        out["hostname"] = hostname
    return out


class ConfigureOptions(usage.Options):
    optFlags = [["no-portal", None, "Do not expose the portal."]]
    optParameters = [
        ["host-key", None, None, "Pinned SHA256 host key fingerprint of the (first) tunnel."],
        ["portal-hostname", None, None, "TLS hostname of the portal."],
        ["portal-port", None, None, "Server-side port of the portal (default: any)."],
        ["https-port", None, None, "Server-side port forwarded to the TLS terminator."],
        ["acme-directory", None, None, "ACME directory URL (enables certificates)."],
        ["acme-email", None, None, "ACME account contact."],
        ["acme-ca-bundle", None, None, "CA bundle trusting the ACME server's TLS."],
        ["renew-before-days", None, None, "Renew certificates expiring sooner (default 30)."],
        ["file", "f", None, "A JSON file with the whole configuration instead."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["tunnels"] = []
        self["expose"] = []

    def opt_tunnel(self, value: str) -> None:
        """A tunnel server, USER@HOST[:PORT] (repeatable)."""
        self["tunnels"].append(_tunnel(value, len(self["tunnels"])))

    def opt_expose(self, value: str) -> None:
        """An app listener, APP/LISTENER[:REMOTE_PORT][=HOSTNAME] (repeatable)."""
        self["expose"].append(_exposure(value))

    def body(self) -> dict[str, Any]:
        if self["file"]:
            with open(self["file"]) as f:
                loaded = json.load(f)
            if not isinstance(loaded, dict):
                raise usage.UsageError("--file must hold a JSON object")
            return loaded
        body: dict[str, Any] = {"tunnels": self["tunnels"], "expose": self["expose"]}
        if self["host-key"]:
            if not self["tunnels"]:
                raise usage.UsageError("--host-key needs a --tunnel")
            self["tunnels"][0]["host_key"] = self["host-key"]
        if self["no-portal"]:
            body["expose_portal"] = False
        if self["portal-hostname"]:
            body["portal_hostname"] = self["portal-hostname"]
        for option, key in (("portal-port", "portal_port"), ("https-port", "https_port")):
            if self[option] is not None:
                if not str(self[option]).isdigit():
                    raise usage.UsageError(f"--{option} must be a port number")
                body[key] = int(self[option])
        if self["acme-directory"]:
            acme: dict[str, Any] = {"directory_url": self["acme-directory"]}
            if self["acme-email"]:
                acme["email"] = self["acme-email"]
            if self["acme-ca-bundle"]:
                acme["ca_bundle"] = self["acme-ca-bundle"]
            if self["renew-before-days"]:
                try:
                    acme["renew_before_days"] = float(self["renew-before-days"])
                except ValueError:
                    raise usage.UsageError("--renew-before-days must be a number") from None
            body["acme"] = acme
        return body


class HostnameOptions(usage.Options):
    def parseArgs(self, hostname: str) -> None:  # type: ignore[override]
        self["hostname"] = hostname


class AliasAddOptions(usage.Options):
    def parseArgs(self, hostname: str, target: str = "portal") -> None:  # type: ignore[override]
        self["hostname"] = hostname
        self["target"] = target


class RenewOptions(usage.Options):
    def parseArgs(self, hostname: str | None = None) -> None:
        self["hostname"] = hostname


class RemoteOptions(usage.Options):
    synopsis = "piccolodctl remote COMMAND"
    subCommands = [
        ["status", None, usage.Options, "Configuration, routes, tunnels and certificates."],
        ["configure", None, ConfigureOptions, "Enable remote access with this configuration."],
        ["disable", None, usage.Options, "Stop the tunnels (the configuration is kept)."],
        ["aliases", None, usage.Options, "Extra hostnames and their targets."],
        ["alias-add", None, AliasAddOptions, "HOSTNAME [portal|APP/LISTENER]: add an alias."],
        ["alias-remove", None, HostnameOptions, "HOSTNAME: remove an alias."],
        ["certificates", None, usage.Options, "Certificates: expiry, issuer, last error."],
        ["renew", None, RenewOptions, "[HOSTNAME]: issue or renew certificates now."],
        ["rotate-key", None, usage.Options, "Replace the tunnels' device key."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a remote command is required")


def plan(options: RemoteOptions) -> tuple[str, str, Any]:
    """The ``(method, path, body)`` of a parsed ``remote`` command."""
    command, sub = options.subCommand, options.subOptions
    if command == "status":
        return "GET", "/api/v1/remote", None
    if command == "configure":
        return "POST", "/api/v1/remote/configure", sub.body()
    if command == "disable":
        return "POST", "/api/v1/remote/disable", None
    if command == "aliases":
        return "GET", "/api/v1/remote/aliases", None
    if command == "alias-add":
        return (
            "POST",
            "/api/v1/remote/aliases",
            {"hostname": sub["hostname"], "target": sub["target"]},
        )
    if command == "alias-remove":
        return "DELETE", f"/api/v1/remote/aliases/{sub['hostname']}", None
    if command == "certificates":
        return "GET", "/api/v1/remote/certificates", None
    if command == "renew":
        if sub["hostname"]:
            return "POST", f"/api/v1/remote/certificates/{sub['hostname']}/renew", None
        return "POST", "/api/v1/remote/certificates/renew", None
    if command == "rotate-key":
        return "POST", "/api/v1/remote/device-key/rotate", None
    raise usage.UsageError(f"unknown remote command {command!r}")


def _when(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


def format_certificates(certificates: Any) -> str:
    lines = []
    for c in certificates or []:
        line = f"{c['hostname']:<32} {c['state']:<8} expires {_when(c.get('not_after'))}"
        if c.get("last_error"):
            line += f"  last error: {c['last_error']}"
        lines.append(line)
    return "\n".join(lines) or "no certificate"


def format_status(body: Mapping[str, Any]) -> str:
    lines = [f"remote access: {body['state']} (revision {body.get('revision', 0)})"]
    if body.get("device_public_key"):
        lines.append(f"device key: {body['device_public_key']}")
    for tunnel in body.get("tunnels", []):
        line = f"tunnel {tunnel['name']}: {tunnel['state']} {tunnel['host']}:{tunnel['port']}"
        if tunnel.get("host_key"):
            line += f" host key {tunnel['host_key']}"
        if tunnel.get("last_error"):
            line += f"  ({tunnel['last_error']})"
        lines.append(line)
        for forward in tunnel.get("forwards", []):
            lines.append(
                f"  {forward['name']:<28} {forward['state']:<8} "
                f"{forward['bind_host']}:{forward['bound_port'] or forward['bind_port']} -> "
                f"{forward['target_host']}:{forward['target_port']}"
            )
    for route in body.get("routes", []):
        where = f"{route['host']}:{route['port']}" if route["mode"] != "unavailable" else "-"
        line = f"route {route['target']:<24} {route['mode']:<11} {where}"
        if route.get("hostnames"):
            line += " " + ",".join(route["hostnames"])
        if route.get("reason"):
            line += f"  ({route['reason']})"
        lines.append(line)
    if body.get("certificates"):
        lines.append(format_certificates(body["certificates"]))
    return "\n".join(lines)


def _format(command: str | None, body: Any) -> str:
    if command in ("status", "configure", "disable", "rotate-key"):
        return format_status(body)
    if command in ("aliases", "alias-add", "alias-remove"):
        aliases = body.get("aliases", [])
        return "\n".join(f"{a['hostname']:<32} -> {a['target']}" for a in aliases) or "no alias"
    if command == "certificates":
        return format_certificates(body.get("certificates"))
    if command == "renew":
        jobs = body.get("job_ids", [])
        return ("started jobs: " + ", ".join(jobs)) if jobs else "nothing to renew"
    return json.dumps(body, indent=2)


async def run_remote(request: Request, base: str, options: RemoteOptions) -> tuple[str, Any]:
    """Run one ``remote`` command; returns ``(text, JSON body)``.  API errors propagate."""
    method, path, body = plan(options)
    _, answer = await request(method, base + path, body)
    return _format(options.subCommand, answer), answer


def json_request(treq: Any, headers: Mapping[bytes, list[bytes]] | None = None) -> Request:
    """A ``Request`` over ``treq`` sending JSON bodies; errors raise ``piccolod.cli.ApiError``."""

    async def request(method: str, url: str, body: Any) -> tuple[int, Any]:
        from piccolod.cli import ApiError

        sent = dict(headers or {})
        sent[b"accept"] = [b"application/json"]
        data = None
        if body is not None:
            sent[b"content-type"] = [b"application/json"]
            data = json.dumps(body).encode()
        response = await treq.request(method, url, headers=sent, data=data)
        raw = await response.content()
        answer = json.loads(raw) if raw else None
        if response.code >= 400:
            raise ApiError(response.code, answer if isinstance(answer, dict) else {})
        return response.code, answer

    return request
