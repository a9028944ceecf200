# mypy: disable-error-code="no-untyped-call,untyped-decorator"
"""
Remote access over the real control store: while storage is locked every
remote call answers 423 through the API routes, and no secret of the
remote subsystem (device key, ACME account key, certificate key) can be
read from the state directory, locked or unlocked.

The control store is the real persistence service (SQLCipher, Argon2id
keyset, its own thread) on a temporary state directory.  The
``store.remote.*`` handlers are the persistence subsystem's when it
registers them, else the three-line shim below over its remote repository
(exactly what it is asked to register).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import maybeDeferred
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site

from piccolod.api.http import Router
from piccolod.api.remote import remote_routes
from piccolod.commands import (
    CommandContext,
    ConfigureRemote,
    RemoteAcmeConfig,
    RemoteTunnelConfig,
    StoreClearRemote,
    StoreDone,
    StoredRemote,
    StoreLoadRemote,
    StoreSaveRemote,
)
from piccolod.events import LockState
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher, register_all
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.jobs import JobRunner
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.persistence.keyset import KdfParams
from piccolod.persistence.service import PersistenceConfig, PersistenceService
from piccolod.remote.manager import RemoteManager
from piccolod.remote.stub import StubTunnel
from piccolod.remote.testing import FakeAcmeBackend, InlinePool

pytestmark = pytest.mark.integration

PASSWORD = "remote at rest password"
HOSTNAME = "portal.remote-at-rest.example"


def shim_store_remote(dispatcher: Any, persistence: PersistenceService) -> Any:
    """The handlers the persistence subsystem registers for ``store.remote.*``."""

    async def load(command: StoreLoadRemote, context: CommandContext) -> StoredRemote:
        record = await persistence.remote.get()
        return StoredRemote(record=dict(record.config), updated_at=record.updated_at)

    async def save(command: StoreSaveRemote, context: CommandContext) -> StoredRemote:
        record = await persistence.remote.save(command.record)
        return StoredRemote(record=dict(record.config), updated_at=record.updated_at)

    async def clear(command: StoreClearRemote, context: CommandContext) -> StoreDone:
        await persistence.remote.clear()
        return StoreDone()

    return register_all(
        dispatcher,
        [(StoreLoadRemote, load), (StoreSaveRemote, save), (StoreClearRemote, clear)],
    )


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> AsyncIterator[Any]:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    bus = MemoryEventBus(reactor)
    registry = LeadershipRegistry(bus, "node-a")
    dispatcher = CommandDispatcher(reactor, bus, registry=registry, log_successes=False)
    health = HealthTracker(reactor, bus)
    jobs = JobRunner(reactor, bus)
    persistence = PersistenceService(
        reactor,
        tmp_path / "persistence",
        bus,
        PersistenceConfig(kdf=KdfParams(time_cost=1, memory_kib=1024, parallelism=1)),
        dispatcher=dispatcher,
        registry=registry,
        health=health,
        kdf_pool=ThreadPool(minthreads=0, maxthreads=2, name="test-kdf"),
        store_pool=ThreadPool(minthreads=1, maxthreads=1, name="test-store"),
        owns_pools=True,
    )
    registry.update("control-plane", _leader(), 1, "node-a", "http://127.0.0.1:9")
    persistence.startService()
    shim = None
    if "store.remote.load" not in dispatcher.names():
        shim = shim_store_remote(dispatcher, persistence)
    tunnel = StubTunnel(reactor, health)
    manager = RemoteManager(
        reactor,
        bus,
        dispatcher,
        registry,
        tunnel,
        health=health,
        jobs=jobs,
        api_address="http://127.0.0.1:9",
        pool=InlinePool(),
    )
    acme = FakeAcmeBackend(now=reactor.seconds, validate=manager.challenge)
    manager.acme_backend = manager.issuer.backend = acme
    router = Router()
    remote_routes(router, manager)
    port = reactor.listenTCP(0, Site(router), interface="127.0.0.1")
    jobs.startService()
    tunnel.startService()
    manager.startService()
    try:
        yield {
            "persistence": persistence,
            "manager": manager,
            "tunnel": tunnel,
            "dispatcher": dispatcher,
            "bus": bus,
            "url": f"http://127.0.0.1:{port.getHost().port}",
            "state_dir": tmp_path,
        }
    finally:
        await maybeDeferred(port.stopListening)
        await manager.stopService()
        tunnel.stopService()
        await jobs.stopService()
        if shim is not None:
            shim.cancel()
        await persistence.stopService()


def _leader() -> Any:
    from piccolod.events import Role

    return Role.LEADER


async def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    response = await treq.request(method, url, json=body, timeout=10)
    return response.code, await response.json()


def _secret_needles(record: dict[str, Any]) -> dict[str, bytes]:
    """Distinctive byte strings of each secret: PEM base64 lines and raw key bytes."""
    secrets = record["secrets"]
    needles: dict[str, bytes] = {}
    for name, pem in (
        ("device key", secrets["device_key"]),
        ("account key", secrets["account_key"]),
        ("certificate key", record["certificates"][HOSTNAME]["key_pem"]),
    ):
        assert pem, name
        lines = [line for line in pem.splitlines() if line and not line.startswith("-----")]
        needles[f"{name} (PEM)"] = max(lines, key=len).encode()
        body = base64.b64decode("".join(lines))
        needles[f"{name} (DER)"] = body[len(body) // 2 : len(body) // 2 + 24]
    device = serialization.load_ssh_private_key(secrets["device_key"].encode(), password=None)
    raw = device.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    needles["device key (raw seed)"] = raw
    needles["hostname"] = HOSTNAME.encode()
    return needles


def _scan(root: Path, needles: dict[str, bytes]) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for name, needle in needles.items():
            if needle in data:
                found.append(f"{name} in {path.relative_to(root)}")
    return found


@pytest_twisted.ensureDeferred
async def test_locked_answers_423_and_no_secret_is_readable_from_disk(world: Any) -> None:
    """Secrets are stored encrypted; locked, every remote call is 423 and nothing is readable."""
    persistence: PersistenceService = world["persistence"]
    manager: RemoteManager = world["manager"]
    url = world["url"]

    # Before the storage is even set up, remote calls are refused as locked.
    assert (await call("GET", f"{url}/api/v1/remote"))[0] == 423

    await persistence.setup(PASSWORD)
    if persistence.state is not LockState.UNLOCKED:
        await persistence.unlock(password=PASSWORD)
    await world["bus"].drain()

    configure = ConfigureRemote(
        tunnels=(RemoteTunnelConfig(host="tunnel.example", user="piccolo"),),
        portal_hostname=HOSTNAME,
        https_port=443,
        acme=RemoteAcmeConfig(directory_url="https://acme.invalid/dir"),
    )
    code, body = await call("POST", f"{url}/api/v1/remote/configure", configure.to_json())
    assert code == 200, body
    assert body["device_public_key"].startswith("ssh-ed25519 ")
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    from twisted.internet.task import deferLater

    for _ in range(200):
        if manager.status().certificates[0]["state"] == "ok":
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert manager.status().certificates[0]["state"] == "ok"
    assert world["tunnel"].exposed()  # something is exposed while unlocked

    stored = await persistence.remote.get()
    record = dict(stored.config)
    needles = _secret_needles(record)
    state_dir: Path = world["state_dir"]
    # The scan finds secrets where they do rest in plaintext (so an empty scan means something).
    plain = state_dir.parent / "plaintext-check"
    plain.mkdir()
    (plain / "record.json").write_text(json.dumps(record))
    assert len(_scan(plain, needles)) == 4  # three PEM bodies and the hostname
    assert _scan(state_dir, needles) == []  # unlocked: the store is encrypted at rest

    await persistence.lock()
    await world["bus"].drain()
    for method, path, body in (
        ("GET", "/api/v1/remote", None),
        ("POST", "/api/v1/remote/configure", configure.to_json()),
        ("POST", "/api/v1/remote/disable", None),
        ("GET", "/api/v1/remote/aliases", None),
        ("POST", "/api/v1/remote/aliases", {"hostname": "alias.example", "target": "portal"}),
        ("DELETE", "/api/v1/remote/aliases/alias.example", None),
        ("GET", "/api/v1/remote/certificates", None),
        ("POST", "/api/v1/remote/certificates/renew", None),
        ("POST", "/api/v1/remote/device-key/rotate", None),
    ):
        code, problem = await call(method, url + path, body)
        assert code == 423, (method, path, code, problem)
        assert problem["type"].endswith("/locked")
    assert world["tunnel"].exposed() == {}  # locked: nothing exposed
    assert manager.routes() == []
    assert manager.challenge("anything") is None
    assert _scan(state_dir, needles) == []
    assert not re.search(rb"BEGIN (OPENSSH|EC|RSA)? ?PRIVATE KEY", _all_bytes(state_dir))

    # Unlocked again, the same secrets come back from the encrypted store.
    await persistence.unlock(password=PASSWORD)
    await world["bus"].drain()
    code, body = await call("GET", f"{url}/api/v1/remote")
    assert code == 200
    assert body["certificates"][0]["serial"] == record["certificates"][HOSTNAME]["serial"]


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())
