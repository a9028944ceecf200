"""
The whole daemon on real podman: ``twistd -n piccolod`` with
``containers=podman`` on a test-started podman socket, driven through the
HTTP API (``/api/v1/commands/<name>``) with the real persistence
subsystem (setup unlocks; lock and unlock by command).

install → reachable through its proxy port with its data on a persistence
volume → lock → unreachable, container stopped → unlock → reachable again,
data intact → restart piccolod → container adopted (same id), same port,
no duplicate.  And the loud fallback: with podman unusable the daemon
runs the fake and says so in ``/api/v1/health/detail``.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.integration.apiclient import PASSWORD, APIClient, write_config
from tests.integration.support import Daemon
from tests.integration.test_podman_support import PodmanFixture, require_podman

pytestmark = pytest.mark.integration

T = TypeVar("T")

APP = """
name: blog
image: {image}
command:
  - /bin/sh
  - -c
  - test -f /data/stamp || date > /data/stamp; exec httpd -f -p 8080 -h /data
listeners:
  - name: web
    guest_port: 8080
    protocol: http
storage:
  persistent:
    data: {{container: /data}}
"""


@pytest.fixture(scope="module")
def podman() -> Iterator[PodmanFixture]:
    require_podman()
    fixture = PodmanFixture()
    try:
        fixture.start()
        yield fixture
    finally:
        fixture.stop()


def poll(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
        except Exception as e:
            last, result = e, None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {last!r}")
        time.sleep(0.05)


def fetch(port: int, path: str) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            body: bytes = r.read()
            return body if r.status == 200 else None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def command(admin: APIClient, name: str, body: dict[str, Any] | None = None) -> Any:
    reply = admin.post(f"/api/v1/commands/{name}", body or {})
    assert reply.status == 200, reply
    return reply.body["result"]


def config(podman: PodmanFixture, root: Path) -> Path:
    return write_config(
        root,
        f"""
[subsystems.containers]
variant = "podman"
socket = "{podman.socket}"
start_service = false
[subsystems.apps]
instance = "{podman.prefix}"
name_prefix = "{podman.prefix}-"
stop_timeout = 2.0
[subsystems.services]
bind = "127.0.0.1"
backend_ports = [28000, 29000]
public_ports = [48000, 49000]
""",
    )


def test_daemon_runs_locks_restores_and_adopts(podman: PodmanFixture, tmp_path: Path) -> None:
    """Through twistd and the API: install, lock, unlock, restart with adoption, on podman."""
    conf = config(podman, tmp_path / "conf")
    daemon = Daemon(tmp_path / "state", ("--config", str(conf))).start()
    try:
        daemon.wait_ready(30)
        admin = APIClient(daemon.url)
        admin.setup()
        command(admin, "apps.install", {"spec": APP.format(image=podman.image)})

        def public_port() -> int | None:
            routes = command(admin, "services.list")["routes"]
            ports = [
                r["public_port"] for r in routes if r["app"] == "blog" and r["mode"] == "local"
            ]
            return ports[0] if ports else None

        port = poll(public_port, "the route")
        stamp = poll(lambda: fetch(port, "/stamp"), "the app through its proxy")
        containers = podman.containers(f"piccolod.instance={podman.prefix}")
        assert len(containers) == 1 and containers[0]["State"] == "running"
        first_id = containers[0]["Id"]

        command(admin, "persistence.lock")
        poll(
            lambda: (
                True
                if [c["State"] for c in podman.containers(f"piccolod.instance={podman.prefix}")]
                == ["exited"]
                else None
            ),
            "the container to stop on lock",
        )
        assert fetch(port, "/stamp") is None

        admin.login()  # logging in while locked unlocks, as upstream
        if command(admin, "persistence.status")["state"] != "unlocked":
            command(admin, "persistence.unlock", {"password": PASSWORD})
        assert poll(lambda: fetch(port, "/stamp"), "the app after unlock") == stamp

        assert daemon.stop() == 0
        assert [c["State"] for c in podman.containers(f"piccolod.instance={podman.prefix}")] == [
            "running"
        ]
        again = Daemon(daemon.state_dir, ("--config", str(conf))).start()
        try:
            again.wait_ready(30)
            admin = APIClient(again.url)
            assert admin.login().status == 200
            status = command(admin, "persistence.status")
            if status["state"] != "unlocked":
                command(admin, "persistence.unlock", {"password": PASSWORD})
            assert poll(public_port, "the route after a restart") == port
            assert poll(lambda: fetch(port, "/stamp"), "the app after a restart") == stamp
            after = podman.containers(f"piccolod.instance={podman.prefix}")
            assert [c["Id"] for c in after] == [first_id]
            command(admin, "apps.remove", {"app": "blog", "purge": True})
            poll(
                lambda: (
                    True if not podman.containers(f"piccolod.instance={podman.prefix}") else None
                ),
                "the container to be removed",
            )
        finally:
            again.kill()
    finally:
        daemon.kill()


def test_unusable_podman_falls_back_loudly(tmp_path: Path) -> None:
    """With podman unusable the daemon runs the fake runtime and warns in health/detail."""
    conf = write_config(
        tmp_path / "conf",
        f"""
[subsystems.containers]
variant = "podman"
socket = "{tmp_path}/none/podman.sock"
podman = "/nonexistent/podman"
""",
    )
    daemon = Daemon(tmp_path / "state", ("--config", str(conf))).start()
    try:
        daemon.wait_ready(30)
        admin = APIClient(daemon.url)
        admin.setup()
        body = admin.get("/api/v1/health/detail").body
        components = {c["component"]: c for c in body["components"]}
        assert components["containers"]["level"] == "warn"
        assert "FALLING BACK TO THE FAKE RUNTIME" in components["containers"]["message"]
        assert "FALLING BACK TO THE FAKE RUNTIME" in daemon.log()
    finally:
        daemon.kill()
