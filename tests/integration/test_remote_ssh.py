# mypy: disable-error-code="no-untyped-call,untyped-decorator"
"""
The ``ssh`` tunnel against a real OpenSSH server on loopback.

The test starts ``/usr/sbin/sshd -D -e`` with its own host key, a user
whose account allows public keys only (``useradd`` + ``usermod -p '*'``),
``AllowTcpForwarding remote`` and ``PermitListen 127.0.0.1:*``.  The remote
manager is configured with it (its device key is then authorised, as an
admin would), and the portal and an app listener (small twisted.web sites)
must answer through the ports sshd listens on.  Then sshd is killed (the
listener and its session processes) and started again, and its host key is
changed.  Every process started here is stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site

from piccolod.commands import (
    ConfigureRemote,
    GetRemoteStatus,
    RemoteExposure,
    RemoteStatus,
    RemoteTunnelConfig,
)
from piccolod.events import HealthLevel
from piccolod.interfaces import Backoff
from piccolod.remote.model import RemoteState
from piccolod.remote.ssh import SSHTunnelService
from piccolod.remote.testing import RemoteHarness

from .support import REQUIRE

pytestmark = pytest.mark.integration

USER = "piccolotest"
SSHD = "/usr/sbin/sshd"


def _require() -> None:
    missing = [t for t in (SSHD, "ssh-keygen", "useradd", "usermod") if shutil.which(t) is None]
    try:
        import twisted.conch.ssh.keys  # noqa: F401  (needs twisted[conch]: bcrypt)
    except ImportError:
        missing.append("twisted[conch]")
    problem = f"missing tools: {', '.join(missing)}" if missing else ""
    if not problem and os.geteuid() != 0:
        problem = "needs root (useradd, /run/sshd)"
    if problem:
        if REQUIRE:
            pytest.fail(problem + " (PICCOLOD_REQUIRE_INTEGRATION=1)")
        pytest.skip(problem)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class Sshd:
    """One sshd listener on loopback (its config, keys and log under ``root``)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "sshd.log"
        self.authorized = root / "authorized_keys"
        self.authorized.write_text("")
        self.authorized.chmod(0o644)
        self.new_host_key()

    def new_host_key(self) -> str:
        key = self.root / "host_ed25519"
        for path in (key, key.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        out = subprocess.run(
            ["ssh-keygen", "-lf", str(key.with_suffix(".pub"))],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        self.fingerprint = out.split()[1]
        return self.fingerprint

    def write_config(self) -> Path:
        config = self.root / "sshd_config"
        config.write_text(
            f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.root / "host_ed25519"}
PidFile {self.root / "sshd.pid"}
AuthorizedKeysFile {self.authorized}
StrictModes no
UsePAM no
AllowUsers {USER}
PermitRootLogin no
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding remote
GatewayPorts no
PermitListen 127.0.0.1:*
PermitOpen none
X11Forwarding no
AllowAgentForwarding no
PermitTTY no
ForceCommand /bin/false
ClientAliveInterval 2
ClientAliveCountMax 2
LogLevel VERBOSE
"""
        )
        return config

    def start(self) -> None:
        config = self.write_config()
        subprocess.run([SSHD, "-t", "-f", str(config)], check=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"sshd did not start:\n{self.log()}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """Kill the listener and every session process below it (they keep forwarding)."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *_descendants(self.proc.pid)]
        for pid in reversed(pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def connections(self) -> int:
        return self.log().count("Connection from 127.0.0.1")


def _ensure_user() -> None:
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/usr/sbin/nologin", USER], check=True)
    subprocess.run(["usermod", "-p", "*", USER], check=True)  # else: "account is locked"
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


class Text(Resource):
    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__()
        self.text = text

    def render_GET(self, request: Any) -> bytes:
        return self.text


DIAGNOSE: list[Callable[[], str]] = []


async def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll ``check`` on the reactor until it returns something truthy."""
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            details = "\n".join(d() for d in DIAGNOSE)
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or check}\n{details}"
            )
        await deferLater(reactor, 0.05, lambda: None)


async def fetch(port: int) -> bytes:
    import treq

    response = await treq.get(f"http://127.0.0.1:{port}/", timeout=5)
    body: bytes = await response.content()
    return body


@pytest.fixture
def sshd() -> Any:
    _require()
    _ensure_user()
    # sshd reads authorized_keys as the user: pytest's tmp_path (0700) is not reachable.
    root = Path(tempfile.mkdtemp(prefix="piccolod-sshd-"))
    root.chmod(0o755)
    server = Sshd(root, free_port())
    try:
        server.start()
        DIAGNOSE.append(lambda: "sshd log:\n" + server.log())
        yield server
    finally:
        DIAGNOSE.clear()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def harness() -> AsyncIterator[Any]:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    portal = reactor.listenTCP(0, Site(Text(b"portal ok")), interface="127.0.0.1")
    app = reactor.listenTCP(0, Site(Text(b"app ok")), interface="127.0.0.1")
    built = RemoteHarness.build(
        reactor,
        tunnel=lambda health: SSHTunnelService(
            reactor,
            health,
            backoff=Backoff(initial=0.2, maximum=1.0, jitter=0.2),
            connect_timeout=5.0,
            error_after=2.0,
        ),
        api_address=f"http://127.0.0.1:{portal.getHost().port}",
    )
    built.start()
    built.lead("control-plane")
    built.lead("app:demo")
    built.publish_route("demo", "web", app.getHost().port)
    built.unlock()
    DIAGNOSE.append(lambda: f"tunnels: {built.tunnel.status()}")
    try:
        yield built
    finally:
        await built.stop()
        await maybeDeferred(portal.stopListening)
        await maybeDeferred(app.stopListening)


def _tunnel(status: RemoteStatus) -> dict[str, Any]:
    assert len(status.tunnels) == 1, status.tunnels
    return status.tunnels[0]


def _bound(status: RemoteStatus, name: str) -> int:
    for forward in _tunnel(status)["forwards"]:
        if forward["name"] == name and forward["state"] == "active":
            return int(forward["bound_port"])
    return 0


async def _configure(harness: Any, sshd: Sshd) -> RemoteStatus:
    command = ConfigureRemote(
        tunnels=(
            RemoteTunnelConfig(
                host="127.0.0.1",
                port=sshd.port,
                user=USER,
                keepalive_interval=1.0,
                keepalive_timeout=3.0,
            ),
        ),
        portal_port=0,
        expose=(RemoteExposure("demo", "web", 0),),
    )
    status: RemoteStatus = await harness.dispatch(command)
    # The admin authorises the device key shown by remote.status.
    assert status.device_public_key.startswith("ssh-ed25519 ")
    sshd.authorized.write_text(status.device_public_key + "\n")
    return status


def _status(harness: Any) -> RemoteStatus:
    status: RemoteStatus = harness.manager.status()
    return status


def _health(harness: Any) -> HealthLevel:
    level: HealthLevel = harness.health.component("remote.tunnel.default").level
    return level


@pytest_twisted.ensureDeferred
async def test_portal_and_app_answer_through_the_server_then_survive_a_restart(
    sshd: Sshd, harness: Any
) -> None:
    """
    Configure: the portal and an app answer on sshd's ports; sshd down: health
    degrades; sshd back: the tunnel comes back by itself.
    """
    await _configure(harness, sshd)
    status = await wait_for(
        lambda: (s := _status(harness)).state == "active" and s, what="an active tunnel"
    )
    portal_port, app_port = _bound(status, "portal"), _bound(status, "app:demo/web")
    assert portal_port and app_port and portal_port != app_port
    assert await fetch(portal_port) == b"portal ok"
    assert await fetch(app_port) == b"app ok"
    assert _health(harness) is HealthLevel.OK
    # The host key was pinned on this first connection, in OpenSSH's form, and stored.
    stored = RemoteState.from_record(harness.store.record)
    assert stored.settings.tunnels[0].host_key == sshd.fingerprint
    assert _tunnel(status)["host_key"] == sshd.fingerprint

    sshd.stop()
    await wait_for(lambda: _health(harness) is not HealthLevel.OK, what="degraded health")
    assert _tunnel(_status(harness))["state"] in ("backoff", "connecting")
    await wait_for(lambda: _health(harness) is HealthLevel.ERROR, timeout=10, what="error health")

    sshd.start()
    status = await wait_for(
        lambda: (s := _status(harness)).state == "active" and _bound(s, "portal") and s,
        timeout=30,
        what="the tunnel back by itself",
    )
    assert _health(harness) is HealthLevel.OK
    assert await fetch(_bound(status, "portal")) == b"portal ok"
    assert await fetch(_bound(status, "app:demo/web")) == b"app ok"


@pytest_twisted.ensureDeferred
async def test_a_changed_host_key_is_refused_and_not_retried(sshd: Sshd, harness: Any) -> None:
    """A changed server host key is refused (health error) and never retried."""
    await _configure(harness, sshd)
    await wait_for(lambda: _status(harness).state == "active", what="an active tunnel")
    pinned = sshd.fingerprint

    sshd.stop()
    new = sshd.new_host_key()
    assert new != pinned
    sshd.start()
    await wait_for(
        lambda: _tunnel(_status(harness))["state"] == "refused", timeout=30, what="refusal"
    )
    status = _status(harness)
    assert status.state == "error"
    assert new in _tunnel(status)["last_error"] and pinned in _tunnel(status)["last_error"]
    assert _health(harness) is HealthLevel.ERROR
    assert RemoteState.from_record(harness.store.record).settings.tunnels[0].host_key == pinned
    seen = sshd.connections()
    # Several backoff periods (max 1 s here) later: no new connection attempt.
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    await deferLater(reactor, 3.0, lambda: None)
    assert sshd.connections() == seen, sshd.log()
    assert _tunnel(_status(harness))["state"] == "refused"

    # Re-pinning the new key explicitly is the way back.
    command = ConfigureRemote(
        tunnels=(RemoteTunnelConfig(host="127.0.0.1", port=sshd.port, user=USER, host_key=new),),
        portal_port=0,
        expose=(RemoteExposure("demo", "web", 0),),
    )
    await harness.dispatch(command)
    status = await wait_for(
        lambda: (s := _status(harness)).state == "active" and s, what="re-pinned tunnel"
    )
    assert await fetch(_bound(status, "portal")) == b"portal ok"


@pytest_twisted.ensureDeferred
async def test_status_is_served_by_the_command(sshd: Sshd, harness: Any) -> None:
    """remote.status through the dispatcher shows the tunnel's forwards and the pinned key."""
    await _configure(harness, sshd)
    await wait_for(lambda: _status(harness).state == "active", what="an active tunnel")
    status: RemoteStatus = await harness.dispatch(GetRemoteStatus())
    assert status.config["tunnels"][0]["host_key"] == sshd.fingerprint
    assert {f["name"] for f in _tunnel(status)["forwards"]} == {"portal", "app:demo/web"}
