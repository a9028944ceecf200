"""
Back up one real daemon and restore another, with piccolodctl as a user
runs it: ``piccolodctl export --output`` downloads a checked bundle over
loopback HTTP, ``piccolodctl restore`` uploads it in small chunks to a
fresh box, and the first box's admin password logs in there and finds
its data.  Also: a second restore is refused once set up, and a daemon
killed with ``kill -9`` in the middle of an upload leaves nothing behind
after its restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.apiclient import PASSWORD, APIClient, write_config
from tests.integration.support import Daemon, poll

pytestmark = pytest.mark.integration

#: Small chunks, so that the upload takes many requests.
SMALL_BODIES = """
[subsystems.api]
max_body = 8192

[subsystems.containers]
variant = "fake"
"""


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def _start(daemons: list[Daemon], root: Path, name: str) -> Daemon:
    config = write_config(root / f"{name}-config", SMALL_BODIES)
    d = Daemon(root / name, ["--config", str(config)])
    daemons.append(d)
    d.start()
    d.wait_ready()
    return d


def _set_up(daemons: list[Daemon], root: Path, name: str) -> tuple[Daemon, APIClient]:
    """A daemon through first-run setup; its admin client."""
    d = _start(daemons, root, name)
    admin = APIClient(d.url)
    assert admin.post("/api/v1/auth/setup", {"password": PASSWORD}).status == 201
    return d, admin


def _ctl(d: Daemon, home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """piccolodctl in a subprocess, with its own session file and the password at hand."""
    env = {
        **os.environ,
        "PICCOLOD_SESSION": str(home / "session.json"),
        "PICCOLOD_PASSWORD": PASSWORD,
    }
    return subprocess.run(
        [sys.executable, "-c", "from piccolod.cli import main; main()", "--url", d.url, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_backup_with_piccolodctl_and_restore_a_fresh_box(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """export --output on box A, restore on fresh box B, log in on B: the data is there."""
    a, admin = _set_up(daemons, tmp_path, "a")
    written = admin.post(
        "/api/v1/commands/store.settings.set", {"key": "motto", "value": "made it across"}
    )
    assert written.status == 200, written

    home_a = tmp_path / "home-a"
    home_a.mkdir()
    assert _ctl(a, home_a, "login").returncode == 0
    backups = tmp_path / "backups"
    backups.mkdir()
    exported = _ctl(a, home_a, "--json", "export", "--output", str(backups))
    assert exported.returncode == 0, exported.stderr + exported.stdout
    answer = json.loads(exported.stdout)
    bundle = Path(answer["downloaded_to"])
    assert bundle.parent == backups and bundle.name == answer["name"]
    assert hashlib.sha256(bundle.read_bytes()).hexdigest() == answer["sha256"]
    assert bundle.stat().st_mode & 0o777 == 0o600
    assert bundle.stat().st_size > 8192 * 3  # many chunks at 8 KiB

    b = _start(daemons, tmp_path, "b")
    home_b = tmp_path / "home-b"
    home_b.mkdir()
    restored = _ctl(b, home_b, "restore", str(bundle))
    assert restored.returncode == 0, restored.stderr + restored.stdout
    assert "storage is locked" in restored.stdout
    assert list((b.state_dir / "restore").glob(".upload-*")) == []

    logged_in = _ctl(b, home_b, "login")
    assert logged_in.returncode == 0, logged_in.stdout
    got = _ctl(b, home_b, "--json", "call", "store.settings.get", "--json", '{"key": "motto"}')
    assert got.returncode == 0, got.stdout
    assert json.loads(got.stdout)["result"]["value"] == "made it across"

    again = _ctl(b, home_b, "restore", str(bundle))
    assert again.returncode == 1 and "a restore needs a fresh box" in again.stdout


def test_kill_9_during_an_upload_leaves_nothing_behind(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A half-sent upload dies with its daemon; the restart removes the file; a new one works."""
    _, admin = _set_up(daemons, tmp_path, "source")
    done = admin.post("/api/v1/exports/control")
    bundle = Path(done.body["path"]).read_bytes()

    fresh = _start(daemons, tmp_path, "fresh")
    client = APIClient(fresh.url)
    sha = hashlib.sha256(bundle).hexdigest()
    opened = client.post("/api/v1/storage/restore", {"size": len(bundle), "sha256": sha})
    assert opened.status == 201, opened
    upload, chunk = opened.body["upload"], opened.body["chunk_size"]
    sent = client.raw(
        "PUT",
        f"/api/v1/storage/restore/{upload}?offset=0",
        bundle[:chunk],
        "application/octet-stream",
    )
    assert sent.status == 200 and sent.body["received"] == chunk
    assert len(list((fresh.state_dir / "restore").glob(".upload-*"))) == 1

    assert fresh.proc is not None
    os.kill(fresh.proc.pid, signal.SIGKILL)
    fresh.proc.wait(timeout=10)
    fresh.start()
    fresh.wait_ready()
    poll(
        lambda: True if not list((fresh.state_dir / "restore").glob(".upload-*")) else None,
        timeout=10,
        what="the stale upload removed at start",
    )
    client = APIClient(fresh.url)
    assert client.get(f"/api/v1/storage/restore/{upload}").status == 404
    reopened = client.post("/api/v1/storage/restore", {"size": len(bundle), "sha256": sha})
    assert reopened.status == 201, reopened
