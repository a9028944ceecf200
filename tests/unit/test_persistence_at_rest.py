"""No plaintext at rest: canaries through every repository never reach a file in the clear."""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.events import Role
from piccolod.interfaces import AppRecord, AuditEntry, AuthState
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.persistence.directory import DirectoryVolumes
from piccolod.persistence.keyset import KdfParams
from piccolod.persistence.service import PersistenceConfig, PersistenceService
from piccolod.persistence.volumes import VolumeManager
from piccolod.testing.bus import FakeEventBus

CANARY = "CANARY-7f3a9c-plaintext-must-not-rest"
PASSWORD = "canary password 1234"


def _forms(secret: str) -> list[bytes]:
    raw = secret.encode("utf-8")
    return [
        raw,
        secret.encode("utf-16-le"),
        raw.hex().encode(),
        base64.b64encode(raw),
    ]


def _scan(root: Path, needles: dict[str, list[bytes]]) -> list[str]:
    """Every (file, secret name) where a form of a secret occurs."""
    found: list[str] = []
    files = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            files += 1
            data = path.read_bytes()
            for label, forms in needles.items():
                if any(form in data for form in forms):
                    found.append(f"{path.relative_to(root)}: {label}")
    assert files > 3, f"only {files} files scanned under {root}"
    return found


class AtRestTests(SynchronousTestCase):
    def test_canary_nowhere_on_disk(self) -> None:
        """A canary in every repository, the password and the recovery words appear in no file."""
        state_dir = Path(tempfile.mkdtemp(prefix="at-rest-"))
        self.addCleanup(shutil.rmtree, state_dir, True)
        clock = Clock()
        bus = FakeEventBus(clock)
        registry = LeadershipRegistry(bus, "n")
        registry.update("control-plane", Role.LEADER, 1, leader_id="n")
        adapter = DirectoryVolumes(clock, state_dir)
        service = PersistenceService(
            clock,
            state_dir / "persistence",
            bus,
            PersistenceConfig(kdf=KdfParams(1, 8, 1)),
            registry=registry,
            volume_manager_factory=lambda secret_for: VolumeManager(
                clock, state_dir, adapter, bus, secret_for
            ),
        )
        service.startService()
        words = self.successResultOf(service.setup(PASSWORD)).recovery_key
        self.successResultOf(service.unlock(recovery_key=words))
        store = service.store
        self.successResultOf(store.auth.save(AuthState(True, f"$argon2id${CANARY}")))
        self.successResultOf(
            store.apps.put(AppRecord(f"app-{CANARY}", {"env": {"SECRET": CANARY}}))
        )
        self.successResultOf(store.remote.save({"device_secret": CANARY}))
        self.successResultOf(store.audit.append(AuditEntry("login", "admin", "ok", detail=CANARY)))
        self.successResultOf(store.settings.set(f"key-{CANARY}", {"value": CANARY * 50}))
        # Enough writes that pages spill into the WAL and the main file.
        self.successResultOf(
            store.transaction(
                lambda tx: [tx.settings.set(f"bulk-{i}", f"{CANARY}-{i}" * 20) for i in range(300)]
            )
        )
        passphrase = self.successResultOf(service.secret_for("control")).decode()
        needles = {
            "canary": _forms(CANARY),
            "password": _forms(PASSWORD),
            "recovery words": _forms(" ".join(words.split()[:4])),
            "volume passphrase": _forms(passphrase),
        }
        self.assertEqual(_scan(state_dir, needles), [], "while unlocked (WAL live)")
        self.successResultOf(service.lock())
        self.assertEqual(_scan(state_dir, needles), [], "after lock")
        # The store really is on disk and readable again with the password.
        self.successResultOf(service.unlock(password=PASSWORD))
        self.assertEqual(self.successResultOf(store.remote.get()).config, {"device_secret": CANARY})
        # The scanner does find plaintext: the directory adapter stores files
        # in the clear (that is why only gocryptfs is for real boxes).
        mount = Path(self.successResultOf(service.volumes.attach("control")))  # type: ignore[union-attr]
        (mount / "note.txt").write_text(CANARY)
        self.assertEqual(
            _scan(state_dir, needles), ["volumes/ciphertext/control/data/note.txt: canary"]
        )
        self.successResultOf(service.stopService())
