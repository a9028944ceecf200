"""
The ``gocryptfs`` volume adapter on the real binary and real FUSE: the
shared volume contract plus what only real encryption shows (read-only
mounts refuse writes, no plaintext at rest, a SIGKILLed mount process is
noticed), and the volume manager on top of it (lock path, sweep, the
``failed`` event after a kill).

Skipped when gocryptfs, fusermount3 or /dev/fuse is missing; with
``PICCOLOD_REQUIRE_INTEGRATION=1`` they fail instead.  Runs on the real
reactor through pytest-twisted's ``blockon``, polling with deadlines.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from piccolod.errors import Locked
from piccolod.events import VolumeStateChanged
from piccolod.persistence.gocryptfs import GocryptfsVolumes, read_mountinfo
from piccolod.persistence.volumes import (
    ATTACHED_RW,
    FAILED,
    PENDING,
    VolumeManager,
    WrongPassphrase,
)
from piccolod.testing.bus import FakeEventBus
from tests.contracts.volumes import (
    OTHER_PASSPHRASE,
    PASSPHRASE,
    EncryptedVolumeContract,
    VolumeAdapterFixture,
)
from tests.integration.support import REQUIRE

pytestmark = pytest.mark.integration

T = TypeVar("T")


def _missing() -> list[str]:
    missing = [tool for tool in ("gocryptfs", "fusermount3") if shutil.which(tool) is None]
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    return missing


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class RealBinding(VolumeAdapterFixture):
    """The real adapter on the real reactor, driven with ``blockon``."""

    def setUp(self) -> None:
        missing = _missing()
        if missing:
            message = f"gocryptfs integration needs {', '.join(missing)}"
            if REQUIRE:
                self.fail(message + " (PICCOLOD_REQUIRE_INTEGRATION=1)")
            raise self.skipTest(message)
        super().setUp()

    def make_adapter(self, state_dir: Path) -> Any:
        return GocryptfsVolumes(
            _reactor(),
            state_dir,
            gocryptfs=shutil.which("gocryptfs") or "gocryptfs",
            fusermount=shutil.which("fusermount3") or "fusermount3",
        )

    def wait(self, d: Deferred[T]) -> T:
        result: T = pytest_twisted.blockon(d)
        return result

    def wait_failure(self, d: Deferred[Any], *types: type[BaseException]) -> BaseException:
        try:
            pytest_twisted.blockon(d)
        except types as e:
            return e
        except BaseException as e:
            self.fail(f"expected one of {types}, got {e!r}")
        self.fail(f"expected one of {types}, got a result")

    def remove_tree(self, root: Path) -> None:
        prefix = os.path.realpath(root) + os.sep
        for point in sorted(read_mountinfo(), reverse=True):
            if point.startswith(prefix):
                subprocess.run(["fusermount3", "-u", "-z", "--", point], check=False)
        shutil.rmtree(root, ignore_errors=True)

    def settle(self, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout}s waiting for {what}")
            pytest_twisted.blockon(deferLater(_reactor(), 0.02, lambda: None))

    def kill_mount_process(self, volume_id: str) -> None:
        pid = self.adapter.pid(volume_id)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)


class GocryptfsRealContractTests(RealBinding, EncryptedVolumeContract, SynchronousTestCase):
    """The whole volume contract on real gocryptfs and FUSE."""


class GocryptfsRealTests(RealBinding, SynchronousTestCase):
    """What the real binary shows beyond the contract."""

    def test_ciphertext_is_a_gocryptfs_volume(self) -> None:
        """create() leaves a gocryptfs.conf whose scrypt cost is the configured 2**10."""
        self.created("v1")
        cipher = self.state_dir / "volumes" / "ciphertext" / "v1"
        self.assertEqual(sorted(os.listdir(cipher)), ["gocryptfs.conf", "gocryptfs.diriv"])
        self.assertIn(b'"N": 1024', (cipher / "gocryptfs.conf").read_bytes())

    def test_mount_process_is_a_supervised_child(self) -> None:
        """The mount runs as our child, gocryptfs -fg, with no passphrase on its command line."""
        self.created("v1")
        self.mounted("v1")
        pid = self.adapter.pid("v1")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        self.assertIn(b"-fg", cmdline)
        self.assertNotIn(PASSPHRASE, b" ".join(cmdline))
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        self.assertNotIn(PASSPHRASE, environ)
        status = Path(f"/proc/{pid}/status").read_text()
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid")))
        self.assertEqual(ppid, os.getpid())

    def test_unmount_waits_for_the_process_to_exit(self) -> None:
        """After unmount() the gocryptfs process is gone and the mount is not listed."""
        self.created("v1")
        path = self.mounted("v1")
        pid = self.adapter.pid("v1")
        self.wait(self.adapter.unmount("v1"))
        self.assertFalse(Path(f"/proc/{pid}").exists() and _alive(pid))
        self.assertNotIn(os.path.realpath(path), read_mountinfo())

    def test_busy_volume_is_not_unmounted(self) -> None:
        """An open file keeps the volume mounted (VolumeBusy); closing it lets it go."""
        from piccolod.persistence.volumes import VolumeBusy

        self.created("v1")
        path = self.mounted("v1")
        with open(path / "open", "wb") as held:
            held.write(b"x")
            self.wait_failure(self.adapter.unmount("v1"), VolumeBusy)
            self.assertTrue(self.adapter.is_mounted("v1"))
        self.wait(self.adapter.unmount("v1"))
        self.assertFalse(self.adapter.is_mounted("v1"))

    def test_wrong_passphrase_on_real_config(self) -> None:
        """The Python check of gocryptfs.conf agrees with gocryptfs about the passphrase."""
        self.created("v1")
        self.wait_failure(self.adapter.create("v1", OTHER_PASSPHRASE), WrongPassphrase)
        self.wait(self.adapter.create("v1", PASSPHRASE))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


class ManagerOnGocryptfsTests(RealBinding, SynchronousTestCase):
    """The volume manager over real gocryptfs: lock path, sweep, a killed mount."""

    def setUp(self) -> None:
        super().setUp()
        self.locked = False
        self.bus = FakeEventBus(_reactor())

        def secret_for(volume_id: str) -> bytes:
            if self.locked:
                raise Locked("storage is locked")
            return PASSPHRASE

        self.manager = VolumeManager(_reactor(), self.state_dir, self.adapter, self.bus, secret_for)
        self.addCleanup(self.manager.close)

    def states(self, volume_id: str) -> list[str]:
        return [
            e.state
            for e in self.bus.events("persistence.volume_state")
            if isinstance(e, VolumeStateChanged) and e.volume_id == volume_id
        ]

    def test_lock_detaches_and_unlock_sweep_reattaches(self) -> None:
        """attach, lock (detach_all), sweep while locked, unlock sweep: data back, no plaintext."""
        path = Path(self.wait(self.manager.attach("control")))
        (path / "db").write_bytes(b"CANARY-control-plane-data")
        self.assertEqual(self.wait(self.manager.detach_all("locked")), ["control"])
        self.locked = True
        self.assertEqual(list(self.adapter.mounted()), [])
        for file in self.state_dir.rglob("*"):
            if file.is_file():
                self.assertNotIn(b"CANARY-control", file.read_bytes())
        statuses = self.wait(self.manager.sweep())
        self.assertEqual([s.state for s in statuses], [PENDING])
        self.locked = False
        statuses = self.wait(self.manager.sweep())
        self.assertEqual([s.state for s in statuses], [ATTACHED_RW])
        self.assertEqual((path / "db").read_bytes(), b"CANARY-control-plane-data")
        self.wait(self.manager.detach_all())

    def test_a_killed_mount_process_publishes_failed(self) -> None:
        """kill -9 of gocryptfs: the volume is failed (event, last error); a sweep remounts."""
        path = Path(self.wait(self.manager.attach("data")))
        (path / "f").write_bytes(b"kept")
        self.kill_mount_process("data")
        self.settle(lambda: FAILED in self.states("data"), "a failed volume event")
        status = self.wait(self.manager.status("data"))
        self.assertEqual(status.state, FAILED)
        self.assertIn("signal 9", status.last_error or "")
        self.assertFalse(status.mounted)
        self.wait(self.manager.sweep())
        self.assertEqual(self.wait(self.manager.status("data")).state, ATTACHED_RW)
        self.assertEqual((path / "f").read_bytes(), b"kept")
        self.wait(self.manager.detach_all())
