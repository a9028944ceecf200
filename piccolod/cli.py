"""
``piccolodctl``: a small command-line client of the piccolod API (treq).

It finds the daemon from ``--url``, ``$PICCOLOD_URL``, or the ``api.json``
the daemon writes into its state directory (``--state-dir``, default
``./state``), and falls back to ``http://127.0.0.1:8080``.

Errors from the API arrive as problem+json and are printed as one line
(``error 423 locked: Storage is locked``); the exit status is 0 on success,
1 on an API error, 2 on a usage error and 3 when the daemon is unreachable.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from twisted.python import usage

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class ApiError(Exception):
    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(problem.get("detail") or problem.get("title") or str(status))
        self.status = status
        self.problem = problem

    def __str__(self) -> str:
        kind = str(self.problem.get("type", "")).rsplit("/", 1)[-1] or "error"
        return f"error {self.status} {kind}: {self.problem.get('detail') or self.problem.get('title')}"


def discover_url(url: str | None, state_dir: str | None, environ: dict[str, str]) -> str:
    """The API base URL to talk to (see the module docstring)."""
    if url:
        return url.rstrip("/")
    if environ.get("PICCOLOD_URL"):
        return environ["PICCOLOD_URL"].rstrip("/")
    path = Path(state_dir or environ.get("PICCOLOD_STATE_DIR") or "./state") / "api.json"
    try:
        found = json.loads(path.read_text()).get("url")
    except (OSError, ValueError):
        found = None
    return (found or "http://127.0.0.1:8080").rstrip("/")


def progress_bar(progress: float, width: int = 30) -> str:
    """``[#########.....]  30%``"""
    progress = min(1.0, max(0.0, progress))
    filled = int(round(progress * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {progress * 100:3.0f}%"


def format_jobs(body: dict[str, Any]) -> str:
    lines = []
    for job in body.get("jobs", []):
        line = f"{job['id']:<16} {job['job_class']:<12} {job['state']:<10}"
        if job["state"] == "running":
            line += " " + progress_bar(job.get("progress", 0.0))
            if job.get("message"):
                line += f" {job['message']}"
        elif job.get("error"):
            line += f" {job['error']}"
        lines.append(line.rstrip())
    return "\n".join(lines) or "no jobs"


def format_health(body: dict[str, Any]) -> str:
    lines = [f"overall {body['overall']}, {'ready' if body['ready'] else 'NOT READY'}"]
    for c in body.get("components", []):
        mark = "*" if c["required"] else " "
        lines.append(f" {mark} {c['component']:<28} {c['level']:<6} {c['message']}")
    return "\n".join(lines)


def format_supervisor(body: dict[str, Any]) -> str:
    lines = []
    for c in body.get("children", []):
        line = f"{c['name']:<24} {c['state']:<9} restarts={c['restarts']}"
        if c.get("last_error"):
            line += f"  last error: {c['last_error']}"
        lines.append(line)
    return "\n".join(lines)


def format_leadership(body: dict[str, Any]) -> str:
    lines = [f"node {body['node_id']}"]
    for r in body.get("resources", []):
        leader = r.get("leader_id") or "?"
        lines.append(f"{r['resource']:<24} {r['role']:<9} term={r['term']} leader={leader}")
    return "\n".join(lines)


class JobsOptions(usage.Options):
    optFlags = [["watch", "w", "Redraw every half second until no job is running or queued."]]
    optParameters = [["state", "s", None, "Only jobs in this state."]]


class IdOptions(usage.Options):
    def parseArgs(self, job_id: str) -> None:
        self["id"] = job_id


class Options(usage.Options):
    synopsis = "piccolodctl [--url URL | --state-dir DIR] COMMAND"
    optParameters = [
        ["url", "u", None, "API base URL (default: from $PICCOLOD_URL or <state-dir>/api.json)."],
        ["state-dir", "d", None, "The daemon's state directory (default ./state)."],
    ]
    optFlags = [["json", "j", "Print the raw JSON answer."]]
    subCommands = [
        ["health", None, usage.Options, "Health of every component and readiness."],
        ["supervisor", None, usage.Options, "Supervised children: states, restarts, errors."],
        ["leadership", None, usage.Options, "This node's role per resource."],
        ["jobs", None, JobsOptions, "Jobs, with progress bars for running ones."],
        ["job", None, IdOptions, "One job."],
        ["cancel", None, IdOptions, "Cancel a queued or running job."],
        ["metrics", None, usage.Options, "The Prometheus metrics text."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required")


async def _request(treq: Any, method: str, url: str) -> tuple[int, Any]:
    response = await treq.request(method, url, headers={b"accept": [b"application/json"]})
    raw = await response.content()
    ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    if b"json" in ctype:
        body = json.loads(raw) if raw else None
    else:
        body = raw.decode("utf-8", "replace")
    if response.code >= 400:
        raise ApiError(response.code, body if isinstance(body, dict) else {"detail": str(body)})
    return response.code, body


async def run(reactor: Any, options: Options, out: IO[str], treq: Any = None) -> int:
    """Run one command against the API; returns the exit status."""
    if treq is None:
        import treq as treq_module

        treq = treq_module
    from twisted.internet.error import ConnectError

    from piccolod.kernel.aio import to_deferred

    base = discover_url(options["url"], options["state-dir"], dict(os.environ))
    command, sub = options.subCommand, options.subOptions
    try:
        if command == "health":
            _, body = await _request(treq, "GET", f"{base}/api/v1/health/detail")
            text = format_health(body)
        elif command == "supervisor":
            _, body = await _request(treq, "GET", f"{base}/api/v1/supervisor")
            text = format_supervisor(body)
        elif command == "leadership":
            _, body = await _request(treq, "GET", f"{base}/api/v1/leadership")
            text = format_leadership(body)
        elif command == "job":
            _, body = await _request(treq, "GET", f"{base}/api/v1/jobs/{sub['id']}")
            text = format_jobs({"jobs": [body]})
        elif command == "cancel":
            _, body = await _request(treq, "POST", f"{base}/api/v1/jobs/{sub['id']}/cancel")
            text = f"{body['id']} {body['state']}"
        elif command == "metrics":
            _, body = await _request(treq, "GET", f"{base}/metrics")
            text = body
        else:  # jobs
            query = f"?state={sub['state']}" if sub["state"] else ""
            while True:
                _, body = await _request(treq, "GET", f"{base}/api/v1/jobs{query}")
                text = format_jobs(body)
                active = body["stats"]["running"] + body["stats"]["queued"]
                if not sub["watch"] or not active:
                    break
                if out.isatty():
                    out.write("\x1b[2J\x1b[H")
                out.write(text + "\n\n")
                out.flush()
                from twisted.internet.task import deferLater

                await to_deferred(deferLater(reactor, 0.5, lambda: None))
    except ApiError as e:
        out.write(f"{e}\n")
        return EXIT_API
    except ConnectError as e:
        out.write(f"piccolodctl: cannot reach piccolod at {base}: {e}\n")
        return EXIT_UNREACHABLE
    if options["json"] and not isinstance(body, str):
        out.write(json.dumps(body, indent=2) + "\n")
    else:
        out.write(f"{text}\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        sys.stderr.write(f"piccolodctl: {e}\n{options}\n")
        raise SystemExit(EXIT_USAGE) from None
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    async def _main(reactor: Any) -> None:
        status = await run(reactor, options, sys.stdout)
        if status != EXIT_OK:
            raise SystemExit(status)  # react() exits with this code

    react(lambda reactor: Deferred.fromCoroutine(_main(reactor)))
