"""
The contract every ``IVolumeAdapter`` must honour.

:class:`VolumeAdapterContract` is a mixin: bind it to an adapter by
subclassing it together with ``SynchronousTestCase`` and defining
``make_adapter(state_dir)``, ``wait(d)`` (the Deferred's result) and
``wait_failure(d, *types)`` (its exception).  Unit tests bind it with
``successResultOf`` on an adapter whose Deferreds fire on a ``Clock``;
integration tests bind the real gocryptfs adapter with
``pytest_twisted.blockon``.  Everything here is observable through the
interface and the file system.

:class:`EncryptedVolumeContract` adds what only a really encrypting
adapter can show (read-only mounts refusing writes, no plaintext at rest,
a killed mount process being noticed).
"""

from __future__ import annotations

import errno
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from zope.interface.interface import Method
from zope.interface.verify import verifyObject

from piccolod.errors import InvalidCommand
from piccolod.interfaces import IVolumeAdapter
from piccolod.persistence.volumes import (
    InvalidVolumeId,
    VolumeCorrupt,
    VolumeNotFound,
    WrongPassphrase,
)

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    _Base = SynchronousTestCase
else:
    _Base = object

T = TypeVar("T")

#: What the keyset hands out: 32 random bytes, hex-encoded.
PASSPHRASE = b"6f1c0e9a4b7d2c3e5f60718293a4b5c6d7e8f90112233445566778899aabbcc"
OTHER_PASSPHRASE = b"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

BAD_IDS: list[Any] = [
    "",
    "..",
    "../etc",
    "a/b",
    "/abs",
    "A",
    "-lead",
    "a_b",
    "a.b",
    "a" * 64,
    "vol\n",
    " vol",
    None,
    5,
    b"bytes",
]

BAD_PASSPHRASES: list[Any] = [b"", b"with\nnewline", b"cr\r", b"nul\0", "text", None, b"x" * 1025]


def assert_parameter_names(case: Any, interface: Any, obj: Any) -> None:
    """Each method of ``interface`` has the same parameter names on ``obj`` (buildbot's check)."""
    for name in interface.names(all=True):
        description = interface[name]
        if not isinstance(description, Method):
            continue
        declared = list(description.getSignatureInfo()["positional"])
        actual = [
            p.name
            for p in inspect.signature(getattr(obj, name)).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        case.assertEqual(actual, declared, f"{type(obj).__name__}.{name}")


class VolumeAdapterFixture(_Base):
    """A started adapter on a temp state dir, and helpers (no tests)."""

    adapter: Any
    state_dir: Path

    # -- binding ----------------------------------------------------------------

    def make_adapter(self, state_dir: Path) -> Any:
        """A fresh adapter (an ``IService`` providing ``IVolumeAdapter``)."""
        raise NotImplementedError

    def wait(self, d: Deferred[T]) -> T:
        """The result of ``d`` (driving time as the binding needs)."""
        raise NotImplementedError

    def wait_failure(self, d: Deferred[Any], *types: type[BaseException]) -> BaseException:
        """The exception ``d`` fails with; it must be one of ``types``."""
        raise NotImplementedError

    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="piccolod-volumes-"))
        self.addCleanup(self.remove_tree, root)
        self.state_dir = root / "state"
        self.state_dir.mkdir()
        self.adapter = self.make_adapter(self.state_dir)
        self.adapter.startService()
        self.addCleanup(self.stop_adapter, self.adapter)

    def stop_adapter(self, adapter: Any) -> None:
        if adapter.running:
            self.wait(adapter.stopService())

    def remove_tree(self, root: Path) -> None:
        shutil.rmtree(root, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------

    def created(self, volume_id: str = "v1", passphrase: bytes = PASSPHRASE) -> str:
        self.wait(self.adapter.create(volume_id, passphrase))
        return volume_id

    def mounted(
        self, volume_id: str = "v1", passphrase: bytes = PASSPHRASE, read_only: bool = False
    ) -> Path:
        return Path(self.wait(self.adapter.mount(volume_id, passphrase, read_only)))


class VolumeAdapterContract(VolumeAdapterFixture):
    """Behaviour shared by every volume adapter (see the module docstring)."""

    def test_provides_its_interfaces(self) -> None:
        """The adapter provides IVolumeAdapter and IService, with kind and encrypted set."""
        verifyObject(IVolumeAdapter, self.adapter)
        verifyObject(IService, self.adapter)
        assert_parameter_names(self, IVolumeAdapter, self.adapter)
        self.assertIsInstance(self.adapter.kind, str)
        self.assertIsInstance(self.adapter.encrypted, bool)

    def test_create_makes_the_ciphertext_directory(self) -> None:
        """create() makes volumes/ciphertext/<id> and mounts nothing."""
        self.created("v1")
        self.assertTrue((self.state_dir / "volumes" / "ciphertext" / "v1").is_dir())
        self.assertFalse(self.adapter.is_mounted("v1"))
        self.assertEqual(list(self.adapter.mounted()), [])

    def test_mount_fires_with_the_mount_path(self) -> None:
        """mount() fires with volumes/mounts/<id>, a usable directory, and lists the volume."""
        self.created("v1")
        path = self.mounted("v1")
        self.assertEqual(path, self.state_dir / "volumes" / "mounts" / "v1")
        self.assertTrue(path.is_dir())
        self.assertTrue(self.adapter.is_mounted("v1"))
        self.assertEqual(list(self.adapter.mounted()), ["v1"])

    def test_data_survives_unmount_and_remount(self) -> None:
        """What is written survives unmount and a remount, including subdirectories."""
        self.created("v1")
        path = self.mounted("v1")
        (path / "sub").mkdir()
        (path / "sub" / "file.txt").write_bytes(b"hello volume")
        self.wait(self.adapter.unmount("v1"))
        self.assertFalse(self.adapter.is_mounted("v1"))
        self.assertEqual(list(self.adapter.mounted()), [])
        again = self.mounted("v1")
        self.assertEqual((again / "sub" / "file.txt").read_bytes(), b"hello volume")

    def test_unmounted_path_shows_no_data(self) -> None:
        """After unmount the mount path no longer shows the volume's files."""
        self.created("v1")
        path = self.mounted("v1")
        (path / "secret.txt").write_bytes(b"inside")
        self.wait(self.adapter.unmount("v1"))
        self.assertFalse((path / "secret.txt").exists())

    def test_create_is_idempotent_with_the_same_passphrase(self) -> None:
        """create() on an existing volume with its passphrase keeps the volume and its data."""
        self.created("v1")
        path = self.mounted("v1")
        (path / "keep").write_bytes(b"kept")
        self.wait(self.adapter.unmount("v1"))
        self.created("v1")
        self.assertEqual((self.mounted("v1") / "keep").read_bytes(), b"kept")

    def test_create_with_another_passphrase_fails(self) -> None:
        """create() on an existing volume with another passphrase fails with WrongPassphrase."""
        self.created("v1")
        path = self.mounted("v1")
        (path / "keep").write_bytes(b"kept")
        self.wait(self.adapter.unmount("v1"))
        self.wait_failure(self.adapter.create("v1", OTHER_PASSPHRASE), WrongPassphrase)
        self.assertEqual((self.mounted("v1") / "keep").read_bytes(), b"kept")

    def test_mount_with_a_wrong_passphrase_fails(self) -> None:
        """mount() with a wrong passphrase fails with WrongPassphrase and mounts nothing."""
        self.created("v1")
        error = self.wait_failure(
            self.adapter.mount("v1", OTHER_PASSPHRASE, False), WrongPassphrase
        )
        self.assertNotIn(OTHER_PASSPHRASE.decode(), str(error))
        self.assertFalse(self.adapter.is_mounted("v1"))
        self.assertEqual(list(self.adapter.mounted()), [])
        self.assertTrue(self.mounted("v1").is_dir())

    def test_mount_of_an_unknown_volume_fails(self) -> None:
        """mount() of a volume never created fails with VolumeNotFound."""
        self.wait_failure(self.adapter.mount("ghost", PASSPHRASE, False), VolumeNotFound)
        self.assertFalse(self.adapter.is_mounted("ghost"))

    def test_create_refuses_a_foreign_directory(self) -> None:
        """A non-empty ciphertext dir that is no volume is VolumeCorrupt, and left untouched."""
        cipher = self.state_dir / "volumes" / "ciphertext" / "v1"
        cipher.mkdir(parents=True)
        (cipher / "stranger").write_bytes(b"not mine")
        self.wait_failure(self.adapter.create("v1", PASSPHRASE), VolumeCorrupt)
        self.wait_failure(self.adapter.mount("v1", PASSPHRASE, False), VolumeCorrupt)
        self.assertEqual(sorted(os.listdir(cipher)), ["stranger"])

    def test_unmount_is_idempotent(self) -> None:
        """unmount() of a volume not mounted (or unknown) succeeds and changes nothing."""
        self.wait(self.adapter.unmount("never"))
        self.created("v1")
        self.mounted("v1")
        self.wait(self.adapter.unmount("v1"))
        self.wait(self.adapter.unmount("v1"))
        self.assertFalse(self.adapter.is_mounted("v1"))

    def test_mount_is_idempotent_in_the_same_mode(self) -> None:
        """A second mount() in the same mode fires with the same path and keeps one mount."""
        self.created("v1")
        first = self.mounted("v1")
        (first / "f").write_bytes(b"1")
        second = self.mounted("v1")
        self.assertEqual(first, second)
        self.assertEqual(list(self.adapter.mounted()), ["v1"])
        self.assertEqual((second / "f").read_bytes(), b"1")

    def test_mount_in_the_other_mode_remounts(self) -> None:
        """mount() read-only of a read-write mounted volume remounts it, data intact."""
        self.created("v1")
        path = self.mounted("v1")
        (path / "f").write_bytes(b"data")
        again = self.mounted("v1", read_only=True)
        self.assertEqual(again, path)
        self.assertTrue(self.adapter.is_mounted("v1"))
        self.assertEqual((again / "f").read_bytes(), b"data")
        self.assertEqual(list(self.adapter.mounted()), ["v1"])

    def test_volumes_are_independent(self) -> None:
        """Two volumes mount side by side, are listed sorted, and unmount separately."""
        self.created("zeta")
        self.created("alpha", OTHER_PASSPHRASE)
        z = self.mounted("zeta")
        a = self.mounted("alpha", OTHER_PASSPHRASE)
        (z / "f").write_bytes(b"zeta")
        (a / "f").write_bytes(b"alpha")
        self.assertEqual(list(self.adapter.mounted()), ["alpha", "zeta"])
        self.wait(self.adapter.unmount("zeta"))
        self.assertEqual(list(self.adapter.mounted()), ["alpha"])
        self.assertEqual((a / "f").read_bytes(), b"alpha")
        self.assertEqual((self.mounted("zeta") / "f").read_bytes(), b"zeta")

    def test_bad_volume_ids_are_refused(self) -> None:
        """Every operation refuses ids outside ^[a-z0-9][a-z0-9-]{0,62}$ and writes nothing."""
        for bad in BAD_IDS:
            with self.subTest(volume_id=bad):
                self.wait_failure(self.adapter.create(bad, PASSPHRASE), InvalidVolumeId)
                self.wait_failure(self.adapter.mount(bad, PASSPHRASE, False), InvalidVolumeId)
                self.wait_failure(self.adapter.unmount(bad), InvalidVolumeId)
                self.assertRaises(InvalidVolumeId, self.adapter.is_mounted, bad)
        self.assertEqual(sorted(p.name for p in self.state_dir.rglob("*") if p.is_file()), [])
        self.assertFalse((self.state_dir.parent / "etc").exists())

    def test_the_longest_id_is_accepted(self) -> None:
        """A 63-character id with digits and dashes is a valid volume."""
        volume_id = "0" + "a-" * 31
        self.assertEqual(len(volume_id), 63)
        self.created(volume_id)
        self.assertTrue(self.mounted(volume_id).is_dir())

    def test_bad_passphrases_are_refused(self) -> None:
        """Empty, multi-line, NUL-carrying, non-bytes or huge passphrases are InvalidCommand."""
        for bad in BAD_PASSPHRASES:
            with self.subTest(passphrase=repr(bad)[:20]):
                self.wait_failure(self.adapter.create("v1", bad), InvalidCommand)
        self.assertFalse((self.state_dir / "volumes" / "ciphertext" / "v1").exists())
        self.created("v1")
        for bad in BAD_PASSPHRASES:
            with self.subTest(passphrase=repr(bad)[:20]):
                self.wait_failure(self.adapter.mount("v1", bad, False), InvalidCommand)
        self.assertFalse(self.adapter.is_mounted("v1"))

    def test_stop_unmounts_everything(self) -> None:
        """stopService() unmounts every mounted volume; their data stays."""
        self.created("v1")
        self.created("v2")
        (self.mounted("v1") / "f").write_bytes(b"one")
        self.mounted("v2", read_only=True)
        self.wait(self.adapter.stopService())
        self.assertEqual(list(self.adapter.mounted()), [])
        self.assertFalse(self.adapter.is_mounted("v1"))
        self.adapter.startService()
        self.assertEqual((self.mounted("v1") / "f").read_bytes(), b"one")

    def test_watch_lost_returns_an_idempotent_canceller(self) -> None:
        """watch_lost() returns a callable that stops the watching and may be called twice."""
        seen: list[tuple[str, str]] = []
        stop: Callable[[], None] = self.adapter.watch_lost(lambda v, r: seen.append((v, r)))
        self.created("v1")
        self.mounted("v1")
        self.wait(self.adapter.unmount("v1"))
        stop()
        stop()
        self.assertEqual(seen, [], "an unmount asked for is no lost mount")


class EncryptedVolumeContract(VolumeAdapterContract):
    """What only an adapter that really encrypts (and really mounts) shows."""

    def kill_mount_process(self, volume_id: str) -> None:
        """Kill the volume's mount process with SIGKILL (how is up to the binding)."""
        raise NotImplementedError

    def settle(self, predicate: Callable[[], bool], what: str) -> None:
        """Let time pass until ``predicate()`` holds (fail after a deadline)."""
        raise NotImplementedError

    def test_read_only_mount_refuses_writes(self) -> None:
        """A read-only mount can be read but refuses writes with EROFS."""
        self.created("v1")
        (self.mounted("v1") / "f").write_bytes(b"before")
        path = self.mounted("v1", read_only=True)
        self.assertEqual((path / "f").read_bytes(), b"before")
        with self.assertRaises(OSError) as cm:
            (path / "new").write_bytes(b"x")
        self.assertEqual(cm.exception.errno, errno.EROFS)
        with self.assertRaises(OSError):
            (path / "f").write_bytes(b"overwritten")
        self.assertEqual((path / "f").read_bytes(), b"before")

    def test_no_plaintext_at_rest(self) -> None:
        """A canary written into a volume appears in no file under the state dir."""
        canary = b"CANARY-piccolod-7d1f2c-plaintext-must-not-rest"
        name = "canary-name-7d1f2c.txt"
        self.created("v1")
        path = self.mounted("v1")
        (path / name).write_bytes(canary * 100)
        (path / "dir-7d1f2c").mkdir()
        (path / "dir-7d1f2c" / "small").write_bytes(canary)
        self.wait(self.adapter.unmount("v1"))
        scanned = 0
        for file in sorted(self.state_dir.rglob("*")):
            self.assertNotIn(b"7d1f2c", file.name.encode(), f"plaintext name {file}")
            if file.is_file():
                scanned += 1
                data = file.read_bytes()
                self.assertNotIn(canary, data, f"canary found in {file}")
                self.assertNotIn(canary[:16], data, f"canary prefix found in {file}")
        self.assertGreater(scanned, 2)
        self.assertEqual((self.mounted("v1") / name).read_bytes(), canary * 100)

    def test_killed_mount_process_is_noticed(self) -> None:
        """A mount process killed with SIGKILL is reported to watchers; the volume remounts."""
        seen: list[tuple[str, str]] = []
        self.adapter.watch_lost(lambda v, r: seen.append((v, r)))
        self.created("v1")
        (self.mounted("v1") / "f").write_bytes(b"kept")
        self.kill_mount_process("v1")
        self.settle(lambda: bool(seen), "the lost mount to be reported")
        self.assertEqual(seen[0][0], "v1")
        self.assertIn("signal 9", seen[0][1])
        self.assertFalse(self.adapter.is_mounted("v1"))
        self.assertEqual(list(self.adapter.mounted()), [])
        self.assertEqual((self.mounted("v1") / "f").read_bytes(), b"kept")
