"""
Security of the API on a real ``twistd -n piccolod`` over loopback HTTP:
every route the OpenAPI document does not mark public refuses anonymous
requests; CSRF; brute force and the lockout that refuses the right
password too; viewer tokens; expired sessions; no token, password or
session in plaintext anywhere under the state dir or in the log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from piccolod.api.auth import split_token
from tests.integration.apiclient import PASSWORD, APIClient, write_config
from tests.integration.support import Daemon, poll
from tests.unit.test_api_openapi import PUBLIC as UNIT_PUBLIC

pytestmark = pytest.mark.integration

CONFIG = """
[subsystems.api]
login_free_attempts = 2
login_lockout_initial = 3.0
login_lockout_max = 3.0
"""

# The routes anyone may call: the same list the unit tests hold the router to.
PUBLIC = UNIT_PUBLIC


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, APIClient]]:
    config = write_config(tmp_path, CONFIG)
    d = Daemon(tmp_path / "state", ["--config", str(config)])
    d.start()
    try:
        d.wait_ready()
        admin = APIClient(d.url)
        admin.setup()
        yield d, admin
        assert d.stop() == 0, d.log()
    finally:
        d.kill()


def test_every_non_public_route_refuses_anonymous_requests(daemon) -> None:  # type: ignore[no-untyped-def]
    """
    Enumerated from the live openapi.json: only the public operations answer without
    credentials.
    """
    d, _ = daemon
    anonymous = APIClient(d.url)
    document = anonymous.get("/api/v1/openapi.json").body
    operations = {
        (method.upper(), path): op
        for path, item in document["paths"].items()
        for method, op in item.items()
    }
    public = {key for key, op in operations.items() if op["security"] == []}
    portal = {key for key in public if "portal" in operations[key].get("tags", [])}
    assert public - portal == PUBLIC
    assert all(method == "GET" for method, _ in portal)
    checked = 0
    for (method, path), _op in sorted(operations.items()):
        if (method, path) in public:
            continue
        concrete = re.sub(r"\{name\}", "persistence.lock", path)
        concrete = re.sub(r"\{[a-z_]+\}", "0123456789ab", concrete)
        reply = anonymous.request(method, concrete, body={} if method != "GET" else None)
        assert reply.status == 401, (method, path, reply)
        assert reply.headers["Content-Type"] == "application/problem+json"
        checked += 1
    assert checked >= 25
    # A garbage bearer token or cookie is no better than none.
    for headers in (
        {"Authorization": "Bearer pcd_0123456789ab_" + "x" * 43},
        {"Cookie": "piccolod_session=forged"},
    ):
        assert anonymous.get("/api/v1/leadership", headers=headers).status == 401
    # And nothing was done: storage is still unlocked.
    assert anonymous.get("/api/v1/auth/session").body["state"] == "unlocked"


def test_csrf_missing_or_wrong_is_403(daemon) -> None:  # type: ignore[no-untyped-def]
    """A session's state-changing request without its CSRF token, or with a wrong one, is 403."""
    _, admin = daemon
    missing = admin.post("/api/v1/storage/lock", csrf=False)
    assert (missing.status, missing.type) == (403, "csrf")
    wrong = admin.post("/api/v1/storage/lock", csrf=False, headers={"X-CSRF-Token": "nope"})
    assert (wrong.status, wrong.type) == (403, "csrf")
    assert admin.get("/api/v1/storage/status").body["state"] == "unlocked"
    assert admin.post("/api/v1/storage/lock").status == 200


def test_brute_force_locks_out_even_the_right_password(daemon) -> None:  # type: ignore[no-untyped-def]
    """
    After the free attempts, wrong passwords lock the client out: 429 with Retry-After, even for
    the right one, until it ends.
    """
    d, _ = daemon
    attacker = APIClient(d.url)
    statuses = []
    for guess in ("guess one!", "guess two!", "guess three!"):
        # persistence adds its own short delay after each wrong password: wait it out
        reply = poll(
            lambda guess=guess: r if (r := attacker.login(guess)).status != 429 else None,
            timeout=10,
            interval=0.1,
        )
        statuses.append(reply.status)
    assert statuses == [401, 401, 401]
    refused = attacker.login(PASSWORD)
    assert (refused.status, refused.type) == (429, "rate-limited")
    assert int(refused.headers["Retry-After"]) >= 1
    assert attacker.cookie is None
    allowed = poll(
        lambda: r if (r := attacker.login(PASSWORD)).status == 200 else None,
        timeout=15,
        interval=0.25,
        what="the end of the lockout",
    )
    assert allowed.body["subject"] == "admin"


def test_viewer_token_cannot_dispatch_mutating_commands(daemon) -> None:  # type: ignore[no-untyped-def]
    """A viewer token reads, but every mutating route and command is 403."""
    d, admin = daemon
    token, _ = admin.create_token("viewer", "monitoring")
    viewer = APIClient(d.url, token=token)
    assert viewer.get("/api/v1/storage/status").status == 200
    assert viewer.get("/api/v1/leadership").status == 200
    assert viewer.post("/api/v1/commands/persistence.status", {}).status == 200
    for path, body in (
        ("/api/v1/storage/lock", None),
        ("/api/v1/commands/persistence.lock", {}),
        ("/api/v1/commands/persistence.record_lock_state", {"locked": True}),
        ("/api/v1/commands/persistence.rotate_recovery_key", {}),
        ("/api/v1/commands/persistence.ensure_volume", {"volume_id": "x"}),
        ("/api/v1/exports/full", None),
        ("/api/v1/auth/tokens", {"name": "more", "role": "admin"}),
        ("/api/v1/auth/password", {"old_password": PASSWORD, "new_password": "x" * 10}),
    ):
        reply = viewer.post(path, body)
        assert (reply.status, reply.type) == (403, "forbidden"), (path, reply)
    assert viewer.get("/api/v1/auth/tokens").status == 403
    assert admin.get("/api/v1/storage/status").body["state"] == "unlocked"


def test_expired_session_is_refused(tmp_path: Path) -> None:
    """A session left idle past its timeout is refused with 401."""
    config = write_config(tmp_path, "[subsystems.api]\nsession_idle_timeout = 1.5\n", "idle.toml")
    d = Daemon(tmp_path / "idle-state", ["--config", str(config)]).start()
    try:
        d.wait_ready()
        client = APIClient(d.url)
        client.setup()
        assert client.get("/api/v1/leadership").status == 200
        # GET /auth/session is public and does not count as use of the session.
        poll(
            lambda: True if not client.get("/api/v1/auth/session").body["authenticated"] else None,
            timeout=10,
            interval=0.2,
            what="the session to expire",
        )
        reply = client.get("/api/v1/leadership")
        assert (reply.status, reply.type) == (401, "unauthorized")
        assert "expired" in reply.body["detail"]
        assert d.stop() == 0, d.log()
    finally:
        d.kill()


def test_no_secret_rests_in_plaintext(daemon) -> None:  # type: ignore[no-untyped-def]
    """
    No API token, token secret, session cookie or password is in any file of the state dir or
    the log.
    """
    d, admin = daemon
    tokens = [admin.create_token(role, f"t-{role}")[0] for role in ("viewer", "operator", "admin")]
    for token in tokens:
        assert APIClient(d.url, token=token).get("/api/v1/leadership").status == 200
    secrets = [PASSWORD.encode(), (admin.cookie or "").encode(), (admin.csrf or "").encode()]
    for token in tokens:
        parts = split_token(token)
        assert parts is not None
        secrets += [token.encode(), parts[1].encode()]
    assert all(secrets)
    assert d.stop() == 0, d.log()
    files = [d.log_path]
    for root, _dirs, names in os.walk(d.state_dir):
        files += [Path(root) / name for name in names]
    assert any(f.name == "tokens.json" for f in files)
    for path in files:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"a secret is in {path}"
