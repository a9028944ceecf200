"""
``piccolodctl``: a small command-line client of the piccolod API (treq).

**Finding the daemon**: ``--url``, ``$PICCOLOD_URL``, or the ``api.json`` the
daemon writes into its state directory (``--state-dir``, default
``./state``), falling back to ``http://127.0.0.1:8080``.

**Credentials**: an API token from ``--token`` or ``$PICCOLOD_TOKEN`` (sent
as ``Authorization: Bearer``), else the session saved by ``login`` or
``setup`` in ``$PICCOLOD_SESSION`` (default
``~/.config/piccolod/session.json``, mode 0600: the cookie and its CSRF
token, for one daemon URL).  Passwords come from ``--password-file``,
``$PICCOLOD_PASSWORD``, a prompt on a terminal, or the first line of
standard input; a new password (``password``) from
``--new-password-file``, ``$PICCOLOD_NEW_PASSWORD`` or a prompt, twice.

**Commands**: ``status``, ``setup``, ``login``, ``logout``, ``unlock``
(logs in when there is no session: a login unlocks), ``lock``,
``password``, ``recovery-key``, ``token create|list|revoke``, ``cluster
[status|join]``, ``events [--follow] [PATTERN]``, ``call COMMAND [--json
ARGS]``, ``export``, ``exports``, ``restore``, ``app …``, ``remote …``,
and the kernel views ``health``, ``supervisor``, ``leadership``, ``jobs``,
``job``, ``cancel``, ``metrics``.  Output is for
humans; ``--json`` prints the API's JSON answer instead.

**Exit status** (stable, for scripts):

====  =============================================================
0     success
1     the API answered another error (problem+json, printed as one line)
2     usage error
3     the daemon cannot be reached
4     authentication needed or refused (401), or denied by policy (403)
5     storage is locked (423)
6     rate-limited or locked out (429); wait ``Retry-After`` seconds
====  =============================================================
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from twisted.python import usage

from piccolod.cli_apps import WaitTimedOut

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_AUTH, EXIT_LOCKED, EXIT_RATE_LIMITED = 4, 5, 6

_EXIT_BY_STATUS = {401: EXIT_AUTH, 403: EXIT_AUTH, 423: EXIT_LOCKED, 429: EXIT_RATE_LIMITED}


class ApiError(Exception):
    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(problem.get("detail") or problem.get("title") or str(status))
        self.status = status
        self.problem = problem

    @property
    def kind(self) -> str:
        """The last part of the problem's ``type`` (``unauthorized``, ``wrong-password``…)."""
        return str(self.problem.get("type", "")).rsplit("/", 1)[-1] or "error"

    def __str__(self) -> str:
        detail = self.problem.get("detail") or self.problem.get("title")
        return f"error {self.status} {self.kind}: {detail}"

    @property
    def exit_status(self) -> int:
        return _EXIT_BY_STATUS.get(self.status, EXIT_API)


class UsageFailure(Exception):
    """A problem with what the user asked for, found while running (exit 2)."""


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


def session_path(environ: dict[str, str]) -> Path:
    """Where ``login`` keeps the session: ``$PICCOLOD_SESSION`` or ``~/.config/piccolod``."""
    if environ.get("PICCOLOD_SESSION"):
        return Path(environ["PICCOLOD_SESSION"])
    home = Path(environ.get("HOME") or Path.home())
    config = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    return config / "piccolod" / "session.json"


def save_session(path: Path, url: str, cookie: str, csrf_token: str) -> None:
    """Write the session file atomically with mode 0600 (its directory 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = json.dumps({"url": url, "cookie": cookie, "csrf_token": csrf_token}).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_session(path: Path, url: str) -> dict[str, str] | None:
    """The saved session for ``url``, if there is one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("url") != url or not data.get("cookie"):
        return None
    return {"cookie": str(data["cookie"]), "csrf_token": str(data.get("csrf_token") or "")}


def progress_bar(progress: float, width: int = 30) -> str:
    """``[#########.....]  30%``"""
    progress = min(1.0, max(0.0, progress))
    filled = round(progress * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {progress * 100:3.0f}%"


#: Classes of the daemon's own periodic jobs (telemetry samples, store checks and
#: checkpoints): ``jobs`` leaves their successes out unless asked for ``--all``.
ROUTINE_CLASSES = frozenset({"telemetry", "persistence"})


def routine(job: dict[str, Any]) -> bool:
    """A periodic job that succeeded: noise in a listing of what happened."""
    return job.get("job_class") in ROUTINE_CLASSES and job.get("state") == "succeeded"


def format_jobs(body: dict[str, Any], show_all: bool = True) -> str:
    lines = []
    jobs = body.get("jobs", [])
    shown = jobs if show_all else [j for j in jobs if not routine(j)]
    for job in shown:
        name = job.get("name") or job["job_class"]
        line = f"{job['id']:<16} {job['job_class']:<12} {job['state']:<10} {name:<16}"
        if job["state"] == "running":
            line += " " + progress_bar(job.get("progress", 0.0))
            if job.get("message"):
                line += f" {job['message']}"
        elif job.get("error"):
            line += f" {job['error']}"
        lines.append(line.rstrip())
    hidden = len(jobs) - len(shown)
    if hidden:
        lines.append(f"({hidden} routine job(s) that succeeded not shown: --all shows them)")
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


def format_status(body: dict[str, Any]) -> str:
    who = (
        f"logged in as {body['subject']} ({body.get('role')})"
        if body.get("authenticated")
        else "not logged in"
    )
    ready = "ready" if body.get("ready") else "NOT READY"
    setup = "" if body.get("initialized") else " (not set up: run piccolodctl setup)"
    return f"storage {body['state']}{setup}; {ready}; {who}"


def format_tokens(body: dict[str, Any]) -> str:
    lines = []
    for t in body.get("tokens", []):
        expires = "never" if t.get("expires_at") is None else f"{t['expires_at']:.0f}"
        lines.append(f"{t['id']}  {t['role']:<9} {t['name']:<24} expires={expires}")
    return "\n".join(lines) or "no tokens"


def format_event(body: dict[str, Any]) -> str:
    event = json.dumps(body.get("event", {}), separators=(",", ":"), sort_keys=True)
    key = f"[{body['key']}] " if body.get("key") else ""
    return f"{body.get('time', 0):.3f} {body.get('topic')} {key}{event}"


class Interspersed(usage.Options):
    """Options that may come after the positional arguments (``call NAME --json {}``)."""

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        takes = {f"--{name[:-1]}" for name in self.longOpt if name.endswith("=")}
        short = self.shortOpt
        takes |= {f"-{c}" for i, c in enumerate(short) if c != ":" and short[i + 1 : i + 2] == ":"}
        flags: list[str] = []
        positional: list[str] = []
        tokens = iter(argv)
        for token in tokens:
            if token == "--":
                positional.extend(tokens)
                break
            if token.startswith("-") and token != "-":
                flags.append(token)
                if token in takes:
                    flags.append(next(tokens, ""))
            else:
                positional.append(token)
        super().parseOptions([*flags, "--", *positional])  # type: ignore[no-untyped-call]


class JobsOptions(usage.Options):
    optFlags = [
        ["watch", "w", "Redraw every half second until no job is running or queued."],
        ["all", "a", "Also the periodic jobs that succeeded (telemetry samples, store checks)."],
    ]
    optParameters = [["state", "s", None, "Only jobs in this state."]]


class IdOptions(usage.Options):
    def parseArgs(self, job_id: str) -> None:  # type: ignore[override]
        self["id"] = job_id


class PasswordOptions(usage.Options):
    optParameters = [
        ["password-file", "p", None, "Read the password from this file (first line)."],
    ]


class PasswordChangeOptions(usage.Options):
    optParameters = [
        ["password-file", "p", None, "Read the current password from this file (first line)."],
        ["new-password-file", "n", None, "Read the new password from this file (first line)."],
    ]


class ClusterOptions(usage.Options):
    subCommands = [
        ["status", None, usage.Options, "Members, roles, terms and replication lag."],
        [
            "join",
            None,
            PasswordOptions,
            "Join this new node to the cluster's shared store with the admin password.",
        ],
    ]
    defaultSubCommand = "status"


class UnlockOptions(PasswordOptions):
    optFlags = [["recovery-key", "r", "Unlock with the 24-word recovery key instead."]]


class TokenCreateOptions(Interspersed):
    optParameters = [
        ["role", "r", "viewer", "The token's role (admin, operator, viewer, ...)."],
        ["expires-in", "e", None, "Seconds until the token expires (default: never).", float],
    ]

    def parseArgs(self, name: str) -> None:  # type: ignore[override]
        self["name"] = name


class TokenRevokeOptions(usage.Options):
    def parseArgs(self, token_id: str) -> None:  # type: ignore[override]
        self["id"] = token_id


class TokenOptions(usage.Options):
    subCommands = [
        ["create", None, TokenCreateOptions, "Create a token (shown once)."],
        ["list", None, usage.Options, "List tokens (never the tokens themselves)."],
        ["revoke", None, TokenRevokeOptions, "Revoke a token by id."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("token needs create, list or revoke")


class EventsOptions(Interspersed):
    optFlags = [["follow", "f", "Keep streaming live events (reconnecting with Last-Event-ID)."]]
    optParameters = [["after", "a", None, "Start after this event id."]]

    def parseArgs(self, pattern: str | None = None) -> None:
        self["pattern"] = pattern


class CallOptions(Interspersed):
    optParameters = [
        ["json", "j", "{}", "The command's arguments as a JSON object."],
        ["idempotency-key", "k", None, "Idempotency-Key: a retry with it runs the command once."],
    ]

    def parseArgs(self, command: str) -> None:  # type: ignore[override]
        self["command"] = command

    def postOptions(self) -> None:
        try:
            self["args"] = json.loads(self["json"])
        except ValueError as e:
            raise usage.UsageError(f"--json is not valid JSON: {e}") from None
        if not isinstance(self["args"], dict):
            raise usage.UsageError("--json must be a JSON object")


def _app_options() -> usage.Options:
    from piccolod.cli_apps import AppOptions

    return AppOptions()  # type: ignore[no-untyped-call]


def _export_options() -> usage.Options:
    from piccolod.cli_exports import ExportOptions

    return ExportOptions()  # type: ignore[no-untyped-call]


def _exports_options() -> usage.Options:
    from piccolod.cli_exports import ExportsOptions

    return ExportsOptions()  # type: ignore[no-untyped-call]


def _restore_options() -> usage.Options:
    from piccolod.cli_exports import RestoreOptions

    return RestoreOptions()  # type: ignore[no-untyped-call]


def _remote_options() -> usage.Options:
    from piccolod.cli_remote import RemoteOptions

    return RemoteOptions()  # type: ignore[no-untyped-call]


class Options(usage.Options):
    synopsis = "piccolodctl [--url URL | --state-dir DIR] [--token TOKEN] [--json] COMMAND"
    optParameters = [
        ["url", "u", None, "API base URL (default: from $PICCOLOD_URL or <state-dir>/api.json)."],
        ["state-dir", "d", None, "The daemon's state directory (default ./state)."],
        ["token", "t", None, "An API token (default: $PICCOLOD_TOKEN, else the saved session)."],
    ]
    optFlags = [["json", "j", "Print the raw JSON answer."]]
    subCommands = [
        ["status", None, usage.Options, "Lock state, readiness and who you are."],
        ["setup", None, PasswordOptions, "First-run setup: set the admin password, log in."],
        ["login", None, PasswordOptions, "Log in (unlocks storage when locked)."],
        ["logout", None, usage.Options, "End the saved session."],
        ["unlock", None, UnlockOptions, "Unlock storage (logs in first when needed)."],
        ["lock", None, usage.Options, "Lock storage."],
        ["password", None, PasswordChangeOptions, "Change the admin password."],
        ["recovery-key", None, usage.Options, "Replace the recovery key (shown once)."],
        ["token", None, TokenOptions, "API tokens: create, list, revoke."],
        ["cluster", None, ClusterOptions, "The cluster: status, or join this node to it."],
        ["events", None, EventsOptions, "Recent events, or --follow the stream (PATTERN: a.*)."],
        ["call", None, CallOptions, "Run any registered command: call NAME --json '{...}'."],
        ["health", None, usage.Options, "Health of every component and readiness."],
        ["supervisor", None, usage.Options, "Supervised children: states, restarts, errors."],
        ["leadership", None, usage.Options, "This node's role per resource."],
        ["jobs", None, JobsOptions, "Jobs, with progress bars for running ones."],
        ["job", None, IdOptions, "One job."],
        ["cancel", None, IdOptions, "Cancel a queued or running job."],
        ["metrics", None, usage.Options, "The Prometheus metrics text."],
        ["export", None, _export_options, "Back up: write a bundle on the box, --output it here."],
        ["exports", None, _exports_options, "Bundles on the box: list, download, delete."],
        ["restore", None, _restore_options, "Restore a fresh box from a bundle (upload)."],
        ["app", None, _app_options, "Apps: install, list, get, start, stop, update, revert…"],
        ["remote", None, _remote_options, "Remote access: tunnels, certificates."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required")


class _AuthenticatedTreq:
    """
    treq's ``request`` with the client's credentials added: what the app and
    remote command modules call, so they need not know about sessions.
    """

    def __init__(self, client: Client) -> None:
        self.client = client

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", None) or {})
        sent = self.client.headers(method)
        sent.update({k.lower() if isinstance(k, bytes) else k: v for k, v in headers.items()})
        return self.client.treq.request(method, url, headers=sent, **kwargs)


class Client:
    """The API at ``base`` with this invocation's credentials."""

    def __init__(
        self,
        treq: Any,
        base: str,
        token: str | None,
        session: dict[str, str] | None,
    ) -> None:
        self.treq = treq
        self.base = base
        self.token = token
        self.session = session

    def headers(self, method: str, extra: dict[str, str] | None = None) -> dict[bytes, list[bytes]]:
        headers: dict[bytes, list[bytes]] = {b"accept": [b"application/json"]}
        if self.token:
            headers[b"authorization"] = [f"Bearer {self.token}".encode()]
        elif self.session:
            headers[b"cookie"] = [f"piccolod_session={self.session['cookie']}".encode()]
            if method not in ("GET", "HEAD") and self.session.get("csrf_token"):
                headers[b"x-csrf-token"] = [self.session["csrf_token"].encode()]
        for name, value in (extra or {}).items():
            headers[name.lower().encode()] = [value.encode()]
        return headers

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, Any]:
        """``(status, decoded body, response)``; raises :class:`ApiError` for 4xx/5xx."""
        sent = self.headers(method, headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent[b"content-type"] = [b"application/json"]
        response = await self.treq.request(method, self.base + path, headers=sent, data=data)
        raw = await response.content()
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        decoded: Any
        if b"json" in ctype:
            decoded = json.loads(raw) if raw else None
        else:
            decoded = raw.decode("utf-8", "replace")
        if response.code >= 400:
            problem = decoded if isinstance(decoded, dict) else {"detail": str(decoded)}
            raise ApiError(response.code, problem)
        return response.code, decoded, response


def _cookie_of(response: Any) -> str | None:
    for header in response.headers.getRawHeaders(b"set-cookie") or []:
        text = header.decode("latin-1")
        name, _, rest = text.partition("=")
        if name.strip() == "piccolod_session":
            return rest.split(";", 1)[0] or None
    return None


def read_password(
    options: Any,
    environ: dict[str, str],
    prompt: Callable[[str], str],
    what: str = "password",
    confirm: bool = False,
) -> str:
    """The secret from ``--password-file``, ``$PICCOLOD_PASSWORD``, or ``prompt``."""
    path = options.get("password-file") if hasattr(options, "get") else None
    if path:
        try:
            return Path(path).read_text().splitlines()[0]
        except (OSError, IndexError) as e:
            raise UsageFailure(f"cannot read a password from {path}: {e}") from None
    if what in ("password", "current password") and environ.get("PICCOLOD_PASSWORD"):
        return environ["PICCOLOD_PASSWORD"]
    if what == "new password" and environ.get("PICCOLOD_NEW_PASSWORD"):
        return environ["PICCOLOD_NEW_PASSWORD"]
    secret = prompt(f"{what.capitalize()}: ")
    if confirm and prompt(f"Repeat the {what}: ") != secret:
        raise UsageFailure(f"the two {what}s differ")
    if not secret:
        raise UsageFailure(f"an empty {what}")
    return secret


def _default_prompt(text: str) -> str:
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(text)
    return sys.stdin.readline().rstrip("\n")


async def run(
    reactor: Any,
    options: Options,
    out: IO[str],
    treq: Any = None,
    environ: dict[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
) -> int:
    """Run one command against the API; returns the exit status."""
    if treq is None:
        import treq as treq_module

        treq = treq_module
    from twisted.internet.error import ConnectError

    env = dict(os.environ) if environ is None else environ
    base = discover_url(options["url"], options["state-dir"], env)
    token = options["token"] or env.get("PICCOLOD_TOKEN") or None
    path = session_path(env)
    client = Client(treq, base, token, None if token else load_session(path, base))
    try:
        text, body = await _command(
            reactor, options, client, out, env, prompt or _default_prompt, path
        )
    except ApiError as e:
        out.write(f"{e}\n")
        if e.status == 401 and not client.token and e.kind == "unauthorized":
            out.write("(log in with: piccolodctl login, or pass --token)\n")
        return e.exit_status
    except UsageFailure as e:
        out.write(f"piccolodctl: {e}\n")
        return EXIT_USAGE
    except WaitTimedOut as e:
        out.write(f"piccolodctl: {e}\n")
        return EXIT_API
    except ConnectError as e:
        out.write(f"piccolodctl: cannot reach piccolod at {base}: {e}\n")
        return EXIT_UNREACHABLE
    if text is None:  # streamed already
        return EXIT_OK
    if options["json"] and not isinstance(body, str):
        out.write(json.dumps(body, indent=2) + "\n")
    else:
        out.write(f"{text}\n")
    return EXIT_OK


async def _command(
    reactor: Any,
    options: Options,
    client: Client,
    out: IO[str],
    env: dict[str, str],
    prompt: Callable[[str], str],
    path: Path,
) -> tuple[str | None, Any]:
    command, sub = options.subCommand, options.subOptions
    if command == "status":
        _, body, _ = await client.request("GET", "/api/v1/auth/session")
        try:
            await client.request("GET", "/api/v1/health/ready")
            body["ready"] = True
        except ApiError:
            body["ready"] = False
        return format_status(body), body
    if command in ("setup", "login"):
        secret = read_password(sub, env, prompt, confirm=command == "setup")
        route = "/api/v1/auth/setup" if command == "setup" else "/api/v1/auth/login"
        body = await _password_post(client, path, route, secret)
        if command == "setup":
            text = (
                "Set up and logged in. Write down the recovery key; it is shown once:\n\n  "
                + body.get("recovery_key", "")
            )
        else:
            text = f"logged in as {body.get('subject')}; storage {body.get('state')}"
        return text, body
    if command == "logout":
        _, body, _ = await client.request("POST", "/api/v1/auth/logout")
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return "logged out", body
    if command == "unlock":
        if sub["recovery-key"]:
            words = read_password(sub, env, prompt, what="recovery key")
            _, body, _ = await client.request(
                "POST", "/api/v1/storage/unlock", {"recovery_key": words}
            )
            return f"storage {body['state']}", body
        secret = read_password(sub, env, prompt)
        if client.token is None and client.session is None:
            # No credentials: a login unlocks (and leaves a session behind).
            body = await _password_post(client, path, "/api/v1/auth/login", secret)
            return f"storage {body.get('state')} (logged in)", body
        _, body, _ = await client.request("POST", "/api/v1/storage/unlock", {"password": secret})
        return f"storage {body['state']}", body
    if command == "password":
        old = read_password(sub, env, prompt, what="current password")
        new_file = sub["new-password-file"]
        new = read_password(
            {"password-file": new_file} if new_file else {}, env, prompt, "new password", True
        )
        _, body, response = await client.request(
            "POST", "/api/v1/auth/password", {"old_password": old, "new_password": new}
        )
        if client.session is not None:
            cookie = _cookie_of(response) or client.session["cookie"]
            csrf_token = body.get("csrf_token") or client.session.get("csrf_token", "")
            save_session(path, client.base, cookie, csrf_token)
        ended = body.get("sessions_revoked", 0)
        return f"password changed; {ended} other session(s) ended", body
    if command == "recovery-key":
        _, body, _ = await client.request("POST", "/api/v1/auth/recovery-key")
        text = (
            "The new recovery key; write it down, it is shown once (the old one no longer "
            "works):\n\n  " + body["recovery_key"]
        )
        return text, body
    if command == "lock":
        _, body, _ = await client.request("POST", "/api/v1/storage/lock")
        return f"storage {body['state']}", body
    if command == "token":
        return await _token(client, sub)
    if command == "cluster":
        return await _cluster(client, sub, env, prompt, path)
    if command == "events":
        return await _events(reactor, options, client, out, sub)
    if command == "app":
        from piccolod.cli_apps import run_app

        answer, text = await run_app(_AuthenticatedTreq(client), client.base, sub, reactor)
        return text, answer
    if command == "export":
        from piccolod.cli_exports import run_export

        return await run_export(client, sub)
    if command == "exports":
        from piccolod.cli_exports import run_exports

        return await run_exports(client, sub)
    if command == "restore":
        from piccolod.cli_exports import run_restore

        return await run_restore(client, sub)
    if command == "remote":
        from piccolod.cli_remote import json_request, run_remote

        return await run_remote(json_request(_AuthenticatedTreq(client)), client.base, sub)
    if command == "call":
        headers = {}
        if sub["idempotency-key"]:
            headers["Idempotency-Key"] = sub["idempotency-key"]
        _, body, _ = await client.request(
            "POST", f"/api/v1/commands/{sub['command']}", sub["args"], headers
        )
        return json.dumps(body.get("result"), indent=2, sort_keys=True), body
    return await _kernel_view(reactor, command, sub, client, out)


async def _password_post(client: Client, path: Path, route: str, secret: str) -> Any:
    """POST ``{"password": secret}`` to ``route``; keep the session it starts, if any."""
    _, body, response = await client.request("POST", route, {"password": secret})
    cookie = _cookie_of(response)
    if cookie:
        save_session(path, client.base, cookie, body.get("csrf_token", ""))
    return body


async def _cluster(
    client: Client, sub: Any, env: dict[str, str], prompt: Callable[[str], str], path: Path
) -> tuple[str, Any]:
    if sub.subCommand == "join":
        secret = read_password(sub.subOptions, env, prompt)
        body = await _password_post(client, path, "/api/v1/cluster/join", secret)
        return f"joined the cluster; storage {body.get('state')}", body
    _, body, _ = await client.request("GET", "/api/v1/cluster")
    return format_cluster(body), body


def format_cluster(body: Mapping[str, Any]) -> str:
    """``GET /api/v1/cluster`` for humans: one line per member and resource, then the lag."""
    lines = [f"node {body.get('node_id')} ({body.get('variant')})"]
    for member in body.get("members") or []:
        roles = ", ".join(
            f"{resource} {role}" for resource, role in sorted((member.get("roles") or {}).items())
        )
        mark = " (this node)" if member.get("self") else ""
        lines.append(
            f"  member {member.get('node_id')}{mark} at {member.get('api_address')}"
            + (f": {roles}" if roles else "")
        )
    for state in body.get("resources") or []:
        lines.append(
            f"  {state.get('resource')}: {state.get('role')}, term {state.get('term')}, "
            f"leader {state.get('leader_id')}"
        )
    replication = (body.get("backend") or {}).get("replication")
    if replication:
        lines.append(
            f"  commit log head {replication.get('log_head')}, applied "
            f"{replication.get('applied')}, lag {replication.get('lag')}"
            + (
                f" (behind for {replication.get('behind_for')}s)"
                if replication.get("behind_for")
                else ""
            )
        )
    return "\n".join(lines)


async def _token(client: Client, sub: Any) -> tuple[str, Any]:
    action, args = sub.subCommand, sub.subOptions
    if action == "create":
        request: dict[str, Any] = {"name": args["name"], "role": args["role"]}
        if args["expires-in"] is not None:
            request["expires_in"] = args["expires-in"]
        _, body, _ = await client.request("POST", "/api/v1/auth/tokens", request)
        return (
            f"{body['token']}\n(id {body['id']}, role {body['role']}; shown once: store it now)",
            body,
        )
    if action == "revoke":
        _, body, _ = await client.request("DELETE", f"/api/v1/auth/tokens/{args['id']}")
        return f"revoked {body['revoked']['id']}", body
    _, body, _ = await client.request("GET", "/api/v1/auth/tokens")
    return format_tokens(body), body


def parse_frames(buffer: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """Complete SSE frames in ``buffer`` and what is left of it."""
    frames: list[dict[str, Any]] = []
    while b"\n\n" in buffer:
        block, buffer = buffer.split(b"\n\n", 1)
        frame: dict[str, Any] = {}
        for line in block.decode("utf-8", "replace").split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            frame[name] = value[1:] if value.startswith(" ") else value
        if frame:
            frames.append(frame)
    return frames, buffer


async def _events(
    reactor: Any, options: Options, client: Client, out: IO[str], sub: Any
) -> tuple[None, None]:
    from urllib.parse import urlencode

    from piccolod.kernel.aio import to_deferred

    query: dict[str, str] = {"follow": "true" if sub["follow"] else "false"}
    if sub["pattern"]:
        query["topics"] = sub["pattern"]
    last_id: str | None = sub["after"]
    as_json = bool(options["json"])

    def show(frame: dict[str, Any]) -> None:
        nonlocal last_id
        if "data" not in frame:  # retry: and other control lines
            return
        name = frame.get("event", "message")
        if "id" in frame:
            last_id = frame["id"]
        data = frame.get("data", "")
        if as_json:
            out.write(data + "\n")
        elif name in ("gap", "dropped"):
            out.write(f"-- {name}: {data}\n")
        else:
            try:
                out.write(format_event(json.loads(data)) + "\n")
            except ValueError:
                out.write(f"{name} {data}\n")
        out.flush()

    while True:
        headers = client.headers("GET", {"accept": "text/event-stream"})
        if last_id:
            headers[b"last-event-id"] = [last_id.encode()]
        url = f"{client.base}/api/v1/events?{urlencode(query)}"
        response = await client.treq.request("GET", url, headers=headers, unbuffered=True)
        if response.code >= 400:
            raw = await response.content()
            try:
                problem = json.loads(raw)
            except ValueError:
                problem = {"detail": raw.decode("utf-8", "replace")}
            raise ApiError(response.code, problem)
        buffer = b""

        def chunk(data: bytes) -> None:
            nonlocal buffer
            frames, buffer = parse_frames(buffer + data)
            for frame in frames:
                show(frame)

        try:
            await client.treq.collect(response, chunk)
        except Exception:
            if not sub["follow"]:
                raise
        if not sub["follow"]:
            return None, None
        # The stream ended (daemon restart, network): resume after the last event.
        from twisted.internet.task import deferLater

        await to_deferred(deferLater(reactor, 1.0, lambda: None))


async def _kernel_view(
    reactor: Any, command: str | None, sub: Any, client: Client, out: IO[str]
) -> tuple[str, Any]:
    from piccolod.kernel.aio import to_deferred

    if command == "health":
        _, body, _ = await client.request("GET", "/api/v1/health/detail")
        return format_health(body), body
    if command == "supervisor":
        _, body, _ = await client.request("GET", "/api/v1/supervisor")
        return format_supervisor(body), body
    if command == "leadership":
        _, body, _ = await client.request("GET", "/api/v1/leadership")
        return format_leadership(body), body
    if command == "job":
        _, body, _ = await client.request("GET", f"/api/v1/jobs/{sub['id']}")
        return format_jobs({"jobs": [body]}), body
    if command == "cancel":
        _, body, _ = await client.request("POST", f"/api/v1/jobs/{sub['id']}/cancel")
        return f"{body['id']} {body['state']}", body
    if command == "metrics":
        _, body, _ = await client.request("GET", "/metrics")
        return str(body), body
    # jobs
    query = f"?state={sub['state']}" if sub["state"] else ""
    while True:
        _, body, _ = await client.request("GET", f"/api/v1/jobs{query}")
        text = format_jobs(body, show_all=bool(sub["all"]))
        active = body["stats"]["running"] + body["stats"]["queued"]
        if not sub["watch"] or not active:
            return text, body
        if out.isatty():
            out.write("\x1b[2J\x1b[H")
        out.write(text + "\n\n")
        out.flush()
        from twisted.internet.task import deferLater

        await to_deferred(deferLater(reactor, 0.5, lambda: None))


def main(argv: Sequence[str] | None = None) -> None:
    options = Options()  # type: ignore[no-untyped-call]
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))  # type: ignore[no-untyped-call]
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
