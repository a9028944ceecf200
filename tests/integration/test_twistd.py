"""
``twistd -n piccolod`` as a real subprocess on a loopback port: readiness,
every kernel endpoint, a clean exit 0 on SIGTERM, on the default reactor and
on the asyncio reactor; bad options fail before the reactor starts; a
third-party drop-in plugin is selected without editing piccolod.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.integration.apiclient import APIClient
from tests.integration.support import TWISTD, Daemon, poll

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[Daemon] = []

    def make(*args: str, reactor: str | None = None, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(tmp_path / f"state{len(started)}", args, reactor=reactor, env=env)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.kill()


@pytest.mark.parametrize("reactor", [None, "asyncio"])
def test_serves_every_kernel_endpoint_and_stops_cleanly(daemon_factory, reactor) -> None:  # type: ignore[no-untyped-def]
    """The daemon becomes ready, serves the kernel endpoints and exits 0 on SIGTERM."""
    d = daemon_factory(reactor=reactor)
    d.wait_ready()

    code, _, body = d.get("/api/v1/health/live")
    assert (code, body["status"]) == (200, "ok")

    # Everything but health/live and health/ready needs credentials: set up the admin.
    assert d.get("/api/v1/health/detail")[0] == 401
    admin = APIClient(d.url)
    admin.setup()

    # Ready comes first; components that connect in the background (podman)
    # may say "warn" for a moment after it, then every component is ok.
    def all_ok() -> dict[str, Any] | None:
        reply = admin.get("/api/v1/health/detail")
        assert reply.status == 200
        return reply.body if reply.body["overall"] == "ok" else None

    body = poll(all_ok, timeout=20, what="every component ok")
    assert body["ready"] is True
    subsystems = body["subsystems"]
    assert subsystems["api"] == "http" and subsystems["consensus"] == "single-node"
    children = {c["name"]: c["state"] for c in body["children"]}
    assert children == {name: "running" for name in [*subsystems, "leadership-observer"]}

    reply = admin.get("/api/v1/leadership")
    code, body = reply.status, reply.body
    assert code == 200
    roles = {r["resource"]: r for r in body["resources"]}
    assert roles["control-plane"]["role"] == "leader"
    assert roles["control-plane"]["leader_id"] == body["node_id"]
    assert roles["control-plane"]["term"] >= 1

    reply = admin.get("/api/v1/supervisor")
    code, body = reply.status, reply.body
    assert code == 200
    assert {c["name"] for c in body["children"]} == set(children)
    assert all(c["restarts"] == 0 and c["last_error"] is None for c in body["children"])

    code, headers, body = d.get("/api/v1/nope")
    assert code == 404 and headers["Content-Type"] == "application/problem+json"

    assert d.stop() == 0, d.log()
    log = d.log()
    assert "Traceback" not in log, log
    assert not (d.state_dir / "api.json").exists()


def test_bad_options_fail_before_the_reactor_starts(tmp_path: Path) -> None:
    """Every config and option error is listed and twistd exits non-zero without serving."""
    config = tmp_path / "bad.toml"
    config.write_text(
        '[daemon]\nstop_timeout = -1\ncolour = "red"\n[subsystems.consensus]\nvariant = "raft"\n'
    )
    result = subprocess.run(
        [
            *TWISTD,
            "-n",
            "--pidfile=",
            "piccolod",
            "--config",
            str(config),
            "--use",
            "mdns=nonsense",
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "stop_timeout must be positive" in out
    assert "unknown key 'colour'" in out
    assert "unknown variant 'raft'" in out and "single-node" in out
    assert not (tmp_path / "s").exists()


def test_drop_in_plugin_adds_a_variant_without_editing_piccolod(
    daemon_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A plugin file dropped in another twisted/plugins directory is selected with --use."""
    drop = tmp_path / "drop" / "twisted" / "plugins"
    drop.mkdir(parents=True)
    (drop / "thirdparty_echo.py").write_text(
        textwrap.dedent("""
        from piccolod.kernel.plugins import SubsystemPlugin
        echo = SubsystemPlugin(
            slot="echo", variant="loud", description="third-party echo",
            factory="tests.thirdparty.EchoService.from_context",
            config_keys={"greeting": "HELLO"},
        )
    """)
    )
    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "drop"), str(root)])}
    d = daemon_factory("--use", "echo=loud", env=env)
    d.wait_ready()
    admin = APIClient(d.url)
    admin.setup()
    body = admin.get("/api/v1/supervisor").body
    assert {c["name"]: c["state"] for c in body["children"]}["echo"] == "running"
    assert admin.get("/api/v1/health/detail").body["subsystems"]["echo"] == "loud"
    assert d.stop() == 0


def test_sigkill_leaves_a_restartable_state_dir(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """After kill -9 a new daemon on the same state dir starts, keeps its node id and serves."""
    first = daemon_factory()
    first.wait_ready()
    node_id = first.get("/api/v1/health/live")[2]["node_id"]
    first.kill()
    second = Daemon(first.state_dir, (), None).start()
    try:
        second.wait_ready()
        assert second.get("/api/v1/health/live")[2]["node_id"] == node_id
        assert second.stop() == 0
    finally:
        second.kill()


def test_unreachable_listen_endpoint_is_reported(tmp_path: Path) -> None:
    """A listen address that cannot be bound leaves the daemon unready and says why."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        d = Daemon(tmp_path / "s", (), None)
        d.cmd[d.cmd.index("tcp:0:interface=127.0.0.1")] = f"tcp:{port}:interface=127.0.0.1"
        d.start()
        try:
            from tests.integration.support import poll

            poll(
                lambda: (
                    True
                    if "Address already in use" in d.log() or "CannotListen" in d.log()
                    else None
                ),
                timeout=15,
                what="bind failure in the log",
            )
        finally:
            d.kill()
    finally:
        s.close()


def test_tac_builds_the_same_tree(tmp_path: Path) -> None:
    """twistd -ny piccolod.tac serves the same subsystems and stops cleanly."""
    root = Path(__file__).resolve().parents[2]
    state = tmp_path / "state"
    d = Daemon(
        state,
        (),
        None,
        env={
            "PICCOLOD_STATE_DIR": str(state),
            "PICCOLOD_LISTEN": "tcp:0:interface=127.0.0.1",
        },
    )
    d.cmd = [*TWISTD, "-n", "--pidfile=", "-y", str(root / "piccolod.tac")]
    d.start()
    try:
        d.wait_ready()
        plugin = Daemon(tmp_path / "plugin-state", (), None).start()
        try:
            plugin.wait_ready()
            admin = APIClient(plugin.url)
            admin.setup()
            expected = admin.get("/api/v1/health/detail").body["subsystems"]
            assert plugin.stop() == 0
        finally:
            plugin.kill()
        admin = APIClient(d.url)
        admin.setup()
        detail = admin.get("/api/v1/health/detail").body
        assert detail["subsystems"] == expected
        assert all(c["state"] == "running" for c in detail["children"])
        assert d.stop() == 0, d.log()
    finally:
        d.kill()
