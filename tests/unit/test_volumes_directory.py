"""
The ``directory`` volume adapter: the shared volume contract, plus what is
its own (the loud not-encrypted warning, the symlink mount, the verifier).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from piccolod.errors import ConfigError
from piccolod.persistence.directory import DirectoryVolumes
from piccolod.persistence.volumes import VolumeCorrupt, VolumeError, WrongPassphrase
from tests.contracts.volumes import PASSPHRASE, VolumeAdapterContract, VolumeAdapterFixture

T = TypeVar("T")


class DirectoryBinding(VolumeAdapterFixture):
    """``DirectoryVolumes`` on a Clock: its Deferreds fire at once."""

    def make_adapter(self, state_dir: Path) -> Any:
        return DirectoryVolumes(Clock(), state_dir)

    def wait(self, d: Deferred[T]) -> T:
        return self.successResultOf(d)

    def wait_failure(self, d: Deferred[Any], *types: type[BaseException]) -> BaseException:
        return self.failureResultOf(d, *types).value


class DirectoryContractTests(DirectoryBinding, VolumeAdapterContract, SynchronousTestCase):
    """The volume contract, bound to ``DirectoryVolumes``."""


class DirectoryAdapterTests(DirectoryBinding, SynchronousTestCase):
    """Behaviour of the directory adapter beyond the contract."""

    def test_start_warns_loudly_that_nothing_is_encrypted(self) -> None:
        """Every start logs a warning that volumes are NOT encrypted and how to fix it."""
        adapter = DirectoryVolumes(Clock(), self.state_dir)
        for _ in range(2):
            with capturedLogs() as events:
                adapter.startService()
            warnings = [e for e in events if e["log_level"] == LogLevel.warn]
            self.assertEqual(len(warnings), 1)
            text = warnings[0]["log_format"].format(**warnings[0])
            self.assertIn("NOT ENCRYPTED", text)
            self.assertIn('variant = "gocryptfs"', text)
            self.successResultOf(adapter.stopService())
        self.assertFalse(adapter.encrypted)

    def test_mount_is_a_symlink_into_the_data_directory(self) -> None:
        """The mount path is a relative symlink to ciphertext/<id>/data, removed on unmount."""
        self.created("v1")
        path = self.mounted("v1")
        self.assertTrue(path.is_symlink())
        self.assertEqual(os.readlink(path), "../ciphertext/v1/data")
        (path / "f").write_bytes(b"plain")
        self.assertEqual(
            (self.state_dir / "volumes" / "ciphertext" / "v1" / "data" / "f").read_bytes(),
            b"plain",
        )
        self.wait(self.adapter.unmount("v1"))
        self.assertFalse(path.is_symlink())
        self.assertFalse(path.exists())

    def test_the_verifier_holds_no_passphrase(self) -> None:
        """volume.json keeps a salted scrypt verifier, never the passphrase."""
        self.created("v1")
        raw = (self.state_dir / "volumes" / "ciphertext" / "v1" / "volume.json").read_bytes()
        body = json.loads(raw)
        self.assertEqual(set(body), {"format", "kind", "n", "salt", "verifier"})
        self.assertNotIn(PASSPHRASE, raw)
        self.assertNotIn(PASSPHRASE[:16], raw)

    def test_read_only_is_recorded(self) -> None:
        """The mode of a mount is recorded (and not enforced: documented)."""
        self.created("v1")
        self.mounted("v1", read_only=True)
        self.assertIs(self.adapter.read_only("v1"), True)
        self.mounted("v1", read_only=False)
        self.assertIs(self.adapter.read_only("v1"), False)
        self.wait(self.adapter.unmount("v1"))
        self.assertIsNone(self.adapter.read_only("v1"))

    def test_a_stale_symlink_from_a_previous_run_is_replaced(self) -> None:
        """A symlink left by a previous process is not 'mounted' and is replaced on mount."""
        self.created("v1")
        self.mounted("v1")
        fresh = DirectoryVolumes(Clock(), self.state_dir)
        self.assertFalse(fresh.is_mounted("v1"))
        path = Path(self.successResultOf(fresh.mount("v1", PASSPHRASE, False)))
        self.assertTrue(fresh.is_mounted("v1"))
        self.assertEqual(os.readlink(path), "../ciphertext/v1/data")

    def test_an_empty_mountpoint_directory_is_replaced(self) -> None:
        """An empty directory at the mount path (left by gocryptfs) gives way to the symlink."""
        self.created("v1")
        point = self.state_dir / "volumes" / "mounts" / "v1"
        point.mkdir(parents=True)
        self.assertTrue(self.mounted("v1").is_symlink())

    def test_a_non_empty_mountpoint_directory_is_refused(self) -> None:
        """A non-empty directory at the mount path is a VolumeError; its files stay."""
        self.created("v1")
        point = self.state_dir / "volumes" / "mounts" / "v1"
        point.mkdir(parents=True)
        (point / "orphan").write_bytes(b"x")
        self.wait_failure(self.adapter.mount("v1", PASSPHRASE, False), VolumeError)
        self.assertEqual((point / "orphan").read_bytes(), b"x")

    def test_a_damaged_verifier_is_corrupt(self) -> None:
        """An unreadable volume.json is VolumeCorrupt, not a wrong passphrase."""
        self.created("v1")
        verifier = self.state_dir / "volumes" / "ciphertext" / "v1" / "volume.json"
        for damage in (
            b"{",
            b'{"kind": "directory"}',
            b'{"kind":"x","n":4,"salt":"","verifier":""}',
        ):
            with self.subTest(damage=damage):
                verifier.write_bytes(damage)
                self.wait_failure(self.adapter.mount("v1", PASSPHRASE, False), VolumeCorrupt)
                self.wait_failure(self.adapter.create("v1", PASSPHRASE), VolumeCorrupt)
        self.assertFalse(self.adapter.is_mounted("v1"))

    def test_a_missing_data_directory_is_corrupt(self) -> None:
        """A volume whose data directory vanished is VolumeCorrupt, not silently empty."""
        self.created("v1")
        os.rmdir(self.state_dir / "volumes" / "ciphertext" / "v1" / "data")
        self.wait_failure(self.adapter.mount("v1", PASSPHRASE, False), VolumeCorrupt)

    def test_wrong_passphrase_names_no_secret(self) -> None:
        """WrongPassphrase's message names the volume and no passphrase."""
        self.created("v1")
        error = self.wait_failure(self.adapter.mount("v1", b"guess", False), WrongPassphrase)
        self.assertIn("'v1'", str(error))
        self.assertNotIn("guess", str(error))

    def test_scrypt_cost_must_be_a_power_of_two(self) -> None:
        """A KDF cost that is not a power of two is a ConfigError."""
        for bad in (0, 1, 1000):
            with self.subTest(n=bad):
                self.assertRaises(
                    ConfigError, DirectoryVolumes, Clock(), self.state_dir, scrypt_n=bad
                )
