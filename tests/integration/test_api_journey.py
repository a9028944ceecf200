"""
The admin's whole journey against a real ``twistd -n piccolod`` over
loopback HTTP: setup → logout → (restart: storage locked) → login, which
unlocks → lock → 423 → unlock → change password → the old one refused →
recovery-key reset → the new one works.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.apiclient import PASSWORD, APIClient, write_config
from tests.integration.support import Daemon, poll

pytestmark = pytest.mark.integration

CONFIG = """
[subsystems.api]
login_lockout_initial = 0.5
login_lockout_max = 2.0
"""


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    for d in daemons:
        d.kill()


def _start(started: list[Daemon], state: Path, config: Path) -> Daemon:
    d = Daemon(state, ["--config", str(config)])
    started.append(d)
    d.start()
    d.wait_ready()
    return d


def _login_when_allowed(client: APIClient, password: str) -> int:
    """Log in, waiting out persistence's short delay after a wrong password (polled)."""

    def attempt() -> int | None:
        status = client.login(password).status
        return None if status == 429 else status

    return poll(attempt, timeout=10, interval=0.1, what="the end of the unlock delay")


def test_full_journey(tmp_path: Path, started: list[Daemon]) -> None:
    """Setup, logout, restart, login unlocks, lock, 423, unlock, password change, recovery reset."""
    config = write_config(tmp_path, CONFIG)
    state = tmp_path / "state"
    d = _start(started, state, config)

    # Setup: the admin password initialises and unlocks storage, and logs in.
    admin = APIClient(d.url)
    words = admin.setup()
    assert len(words.split()) == 24
    assert admin.get("/api/v1/storage/status").body["state"] == "unlocked"
    assert admin.post("/api/v1/auth/setup", {"password": "another password"}).status == 409

    # Logout: the session is gone.
    assert admin.post("/api/v1/auth/logout").status == 200
    assert admin.get("/api/v1/leadership").status == 401

    # Restart: the data key lived in memory only, so storage is locked again.
    assert d.stop() == 0, d.log()
    d = _start(started, state, config)
    anonymous = APIClient(d.url)
    assert anonymous.get("/api/v1/auth/session").body == {
        "authenticated": False,
        "initialized": True,
        "state": "locked",
    }

    # Login while locked unlocks.
    admin = APIClient(d.url)
    reply = admin.login()
    assert (reply.status, reply.body["state"]) == (200, "unlocked"), reply
    assert admin.get("/api/v1/storage/status").body["state"] == "unlocked"

    # Lock: what needs unlocked storage answers 423; the session survives.
    assert admin.post("/api/v1/storage/lock").body["state"] == "locked"
    locked = admin.post("/api/v1/auth/recovery-key")
    assert (locked.status, locked.type) == (423, "locked")
    assert admin.post("/api/v1/commands/persistence.rotate_recovery_key", {}).status == 423

    # Unlock with the password.
    reply = admin.post("/api/v1/storage/unlock", {"password": PASSWORD})
    assert (reply.status, reply.body["state"]) == (200, "unlocked"), reply

    # Change the password: the old one is refused from then on.
    new = "a brand new password"
    reply = admin.post("/api/v1/auth/password", {"old_password": PASSWORD, "new_password": new})
    assert reply.status == 200, reply
    assert admin.get("/api/v1/leadership").status == 200  # the caller's session continues
    other = APIClient(d.url)
    refused = other.login(PASSWORD)
    assert (refused.status, refused.type) == (401, "wrong-password")
    assert _login_when_allowed(other, new) == 200

    # Forgot the password: reset it with the recovery key (no session needed).
    newest = "recovered via the key"
    stranger = APIClient(d.url)
    reply = stranger.post(
        "/api/v1/auth/recovery-key/reset", {"recovery_key": words, "new_password": newest}
    )
    assert reply.status == 200, reply
    assert reply.body["sessions_revoked"] >= 2
    assert admin.get("/api/v1/leadership").status == 401  # every session ended
    assert _login_when_allowed(stranger, new) == 401
    assert _login_when_allowed(stranger, newest) == 200

    # And after another restart (locked), the newest password unlocks.
    assert d.stop() == 0, d.log()
    d = _start(started, state, config)
    final = APIClient(d.url)
    reply = final.login(newest)
    assert (reply.status, reply.body["state"]) == (200, "unlocked"), reply
    assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log(), d.log()
