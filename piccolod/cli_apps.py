"""
``piccolodctl app …``: the apps and services commands of the CLI.

The CLI owner hooks it into :mod:`piccolod.cli` with two lines::

    subCommands += [["app", None, AppOptions, "Apps: list, install, start, stop, logs..."]]
    ...
    elif command == "app":
        body, text = await run_app(treq, base, sub)

Subcommands::

    piccolodctl app list
    piccolodctl app get NAME
    piccolodctl app install [--wait] FILE.yaml        (- reads standard input)
    piccolodctl app validate FILE.yaml
    piccolodctl app start|stop|revert [--wait] NAME
    piccolodctl app update [--wait] --image REF | --spec FILE.yaml NAME

``--wait`` (``--timeout`` seconds, default 60) polls the app until the
controller has acted on the change (``observed_generation`` reaches the
generation) and prints the outcome; it gives up with exit status 1.
    piccolodctl app remove [--purge] NAME
    piccolodctl app logs [--tail N] NAME
    piccolodctl app services [NAME]
"""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import quote

from twisted.python import usage

__all__ = ["AppOptions", "WaitTimedOut", "format_apps", "run_app"]


_WAIT_FLAGS = [["wait", "w", "Wait until the controller has acted on the change."]]
_WAIT_PARAMETERS = [
    ["timeout", None, 60.0, "With --wait: give up after this many seconds.", float],
]


class _Name(usage.Options):
    def parseArgs(self, name: str) -> None:  # type: ignore[override]
        self["name"] = name


class _Change(_Name):
    """start, stop, revert: NAME [--wait [--timeout S]]."""

    optFlags = _WAIT_FLAGS
    optParameters = _WAIT_PARAMETERS


class _File(usage.Options):
    def parseArgs(self, path: str) -> None:  # type: ignore[override]
        self["file"] = path


class _Install(_File):
    optFlags = _WAIT_FLAGS
    optParameters = _WAIT_PARAMETERS


class _Update(usage.Options):
    optFlags = _WAIT_FLAGS
    optParameters = [
        ["image", "i", None, "The new image reference."],
        ["spec", "s", None, "A YAML file with the new spec."],
        *_WAIT_PARAMETERS,
    ]

    def parseArgs(self, name: str) -> None:  # type: ignore[override]
        self["name"] = name

    def postOptions(self) -> None:
        if (self["image"] is None) == (self["spec"] is None):
            raise usage.UsageError("give exactly one of --image or --spec")


class _Remove(usage.Options):
    optFlags = [["purge", "p", "Also delete its persistent volumes and port allocations."]]

    def parseArgs(self, name: str) -> None:  # type: ignore[override]
        self["name"] = name


class _Logs(usage.Options):
    optParameters = [["tail", "n", "100", "How many lines.", int]]

    def parseArgs(self, name: str) -> None:  # type: ignore[override]
        self["name"] = name


class _Services(usage.Options):
    def parseArgs(self, name: str | None = None) -> None:  # type: ignore[override]
        self["name"] = name


class AppOptions(usage.Options):
    synopsis = "piccolodctl app COMMAND"
    subCommands = [
        ["list", None, usage.Options, "Every app with its state."],
        ["get", None, _Name, "One app: spec and status."],
        ["install", None, _Install, "Install or replace an app from a YAML spec."],
        ["validate", None, _File, "Check a YAML spec (every error is listed)."],
        ["start", None, _Change, "Start an app."],
        ["stop", None, _Change, "Stop an app."],
        ["update", None, _Update, "Change an app's image or spec."],
        ["revert", None, _Change, "Go back to the spec before the last update."],
        ["remove", None, _Remove, "Uninstall an app."],
        ["logs", None, _Logs, "An app's container output."],
        ["services", None, _Services, "Routes and ports (of one app)."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("an app command is required")


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


async def _call(
    treq: Any, method: str, url: str, body: bytes | None = None, content_type: bytes = b""
) -> Any:
    from piccolod.cli import ApiError

    headers = {b"accept": [b"application/json"]}
    if content_type:
        headers[b"content-type"] = [content_type]
    response = await treq.request(method, url, data=body, headers=headers)
    raw = await response.content()
    decoded = json.loads(raw) if raw else None
    if response.code >= 400:
        raise ApiError(
            response.code, decoded if isinstance(decoded, dict) else {"detail": str(decoded)}
        )
    return decoded


def format_apps(body: dict[str, Any]) -> str:
    """A table of apps: name, state, generation, route, message."""
    rows = ["NAME                 STATE     GEN  ROUTE   MESSAGE"]
    for app in body.get("apps", []):
        status = app.get("status") or {}
        observed = status.get("observed_generation", 0)
        rows.append(
            f"{app['name']:<20} {status.get('state', 'pending'):<9} "
            f"{observed}/{app['generation']:<3} {status.get('route', 'none'):<7} "
            f"{status.get('message', '')}"
        )
    return "\n".join(rows)


def _format_app(body: dict[str, Any]) -> str:
    app = body["app"]
    status = app.get("status") or {}
    lines = [
        f"{app['name']}: {status.get('state', 'pending')} "
        f"(generation {app['generation']}, observed {status.get('observed_generation', 0)})",
        f"  image: {app['spec'].get('image', '(built)')}  enabled: {app['enabled']}",
    ]
    for listener, ports in (status.get("ports") or {}).items():
        lines.append(f"  {listener}: public {ports['public']} -> backend {ports['backend']}")
    for condition in status.get("conditions", []):
        lines.append(
            f"  {condition['type']}={condition['status']} {condition['reason']} "
            f"{condition['message']}".rstrip()
        )
    if status.get("message"):
        lines.append(f"  {status['message']}")
    return "\n".join(lines)


def _format_routes(body: dict[str, Any]) -> str:
    rows = ["APP/LISTENER             PUBLIC  BACKEND  PROTOCOL   MODE"]
    for r in body.get("routes", []):
        rows.append(
            f"{r['app'] + '/' + r['listener']:<24} {r['public_port']:<7} "
            f"{r['backend_port']:<8} {r['protocol']:<10} {r['mode']}"
        )
    return "\n".join(rows)


class WaitTimedOut(Exception):
    """``--wait`` gave up: the controller has not acted on the change in time."""


async def _converged(
    treq: Any, url: str, body: Any, timeout: float, clock: Any, interval: float = 0.25
) -> Any:
    """
    Poll the app until its ``observed_generation`` reaches its generation
    (the controller has acted on the change: running, stopped, or an error
    it reports); raises :class:`WaitTimedOut` after ``timeout`` seconds.
    """
    from twisted.internet.task import deferLater

    if clock is None:
        raise ValueError("--wait needs the reactor (run_app's clock)")
    deadline = clock.seconds() + timeout
    while True:
        app = body["app"]
        if (app.get("status") or {}).get("observed_generation", 0) >= app["generation"]:
            return body
        if clock.seconds() >= deadline:
            raise WaitTimedOut(
                f"{app['name']} did not converge within {timeout:g} s:\n{_format_app(body)}"
            )
        await deferLater(clock, interval, lambda: None)
        body = await _call(treq, "GET", url)


async def run_app(
    treq: Any, base: str, options: AppOptions, clock: Any = None
) -> tuple[Any, str]:
    """
    Run one ``app`` subcommand; returns (JSON body, text to print).  With
    ``--wait``, install, start, stop, update and revert poll the app on
    ``clock`` (the reactor ``piccolodctl`` runs on) until it has converged.
    """
    command, sub = options.subCommand, options.subOptions
    body, text = await _run(treq, base, command, sub)
    if sub is not None and sub.get("wait") and "app" in (body or {}):
        url = f"{base}/api/v1/apps/{quote(body['app']['name'], safe='')}"
        body = await _converged(treq, url, body, float(sub["timeout"]), clock)
        text = _format_app(body)
    return body, text


async def _run(treq: Any, base: str, command: str | None, sub: Any) -> tuple[Any, str]:
    apps = f"{base}/api/v1/apps"
    name = quote(sub.get("name") or "", safe="") if sub is not None else ""
    yaml = b"application/yaml"
    if command == "list":
        body = await _call(treq, "GET", apps)
        return body, format_apps(body)
    if command == "get":
        body = await _call(treq, "GET", f"{apps}/{name}")
        return body, _format_app(body)
    if command in ("install", "validate"):
        url = apps if command == "install" else f"{apps}/validate"
        body = await _call(treq, "POST", url, _read(sub["file"]), yaml)
        if command == "validate":
            return body, f"{body['app']}: valid"
        return body, _format_app(body)
    if command in ("start", "stop", "revert"):
        body = await _call(treq, "POST", f"{apps}/{name}/{command}")
        return body, _format_app(body)
    if command == "update":
        if sub["image"] is not None:
            payload = json.dumps({"image": sub["image"]}).encode()
            body = await _call(treq, "POST", f"{apps}/{name}/update", payload, b"application/json")
        else:
            body = await _call(treq, "POST", f"{apps}/{name}/update", _read(sub["spec"]), yaml)
        return body, _format_app(body)
    if command == "remove":
        query = "?purge=true" if sub["purge"] else ""
        body = await _call(treq, "DELETE", f"{apps}/{name}{query}")
        return body, f"{body['app']} removed" + (" and purged" if body["purged"] else "")
    if command == "logs":
        body = await _call(treq, "GET", f"{apps}/{name}/logs?tail={int(sub['tail'])}")
        return body, str(body["logs"]).rstrip("\n")
    # services
    if sub["name"]:
        body = await _call(treq, "GET", f"{apps}/{name}/services")
    else:
        body = await _call(treq, "GET", f"{base}/api/v1/services")
    return body, _format_routes(body)
