"""
The volume manager: journal (desired, observed, generation, needs_repair,
last error) written atomically, ``VolumeStateChanged`` events, per-volume
serialisation, the lock path (``detach_all``) and the sweep.

It runs on the real ``directory`` adapter (real files in a temp dir),
wrapped by :class:`FaultyAdapter` where a fault has to be injected.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from piccolod.errors import InvalidCommand, Locked
from piccolod.events import VolumeStateChanged
from piccolod.interfaces import IVolumeAdapter
from piccolod.persistence import volumes as volumes_module
from piccolod.persistence.directory import DirectoryVolumes
from piccolod.persistence.volumes import (
    ATTACHED_RO,
    ATTACHED_RW,
    DETACHED,
    FAILED,
    NEEDS_REPAIR,
    PENDING,
    InvalidVolumeId,
    MountTimeout,
    VolumeBusy,
    VolumeError,
    VolumeManager,
    VolumeNeedsRepair,
    VolumeNotFound,
    VolumeStatus,
    write_atomically,
)
from piccolod.testing.bus import FakeEventBus
from tests.contracts.volumes import (
    BAD_IDS,
    OTHER_PASSPHRASE,
    PASSPHRASE,
    assert_parameter_names,
)


@implementer(IVolumeAdapter)
class FaultyAdapter:
    """
    The directory adapter with injectable faults: a failing or held mount,
    busy volumes, and lost mounts on demand.  Records every call.
    """

    kind = "faulty-directory"
    encrypted = False

    def __init__(self, inner: DirectoryVolumes) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []
        self.mount_error: Exception | None = None
        self.create_error: Exception | None = None
        self.held: dict[str, Deferred[None]] = {}
        self.hold_mounts = False
        self.busy: set[str] = set()
        self.observers: list[Callable[[str, str], None]] = []

    def create(self, volume_id: str, passphrase: bytes) -> Deferred[None]:
        self.calls.append(("create", volume_id))
        if self.create_error is not None:
            return fail(self.create_error)
        return self.inner.create(volume_id, passphrase)

    def mount(self, volume_id: str, passphrase: bytes, read_only: bool) -> Deferred[str]:
        self.calls.append(("mount", volume_id))
        if self.mount_error is not None:
            return fail(self.mount_error)
        if self.hold_mounts:
            gate: Deferred[None] = Deferred()
            self.held[volume_id] = gate
            return gate.addCallback(lambda _: self.inner.mount(volume_id, passphrase, read_only))
        return self.inner.mount(volume_id, passphrase, read_only)

    def unmount(self, volume_id: str) -> Deferred[None]:
        self.calls.append(("unmount", volume_id))
        if volume_id in self.busy and self.inner.is_mounted(volume_id):
            return fail(VolumeBusy(f"{volume_id} is busy"))
        return self.inner.unmount(volume_id)

    def is_mounted(self, volume_id: str) -> bool:
        return self.inner.is_mounted(volume_id)

    def mounted(self) -> Sequence[str]:
        return self.inner.mounted()

    def watch_lost(self, observer: Callable[[str, str], None]) -> Callable[[], None]:
        self.observers.append(observer)
        return lambda: self.observers.remove(observer) if observer in self.observers else None

    def lose(self, volume_id: str, reason: str = "gocryptfs exited unexpectedly") -> None:
        """Drop the mount behind the manager's back and tell the observers."""
        self.inner._mounts.pop(volume_id, None)
        for observer in list(self.observers):
            observer(volume_id, reason)


class ManagerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="piccolod-manager-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.state_dir = root / "state"
        self.clock = Clock()
        self.clock.advance(1000)
        self.bus = FakeEventBus(self.clock)
        self.locked = False
        self.secrets: dict[str, bytes] = {}
        self.adapter = FaultyAdapter(DirectoryVolumes(self.clock, self.state_dir))
        self.manager = self.make_manager()

    def make_manager(self, secret_for: Callable[[str], Any] | None = None) -> VolumeManager:
        manager = VolumeManager(
            self.clock, self.state_dir, self.adapter, self.bus, secret_for or self.secret_for
        )
        self.addCleanup(manager.close)
        return manager

    def secret_for(self, volume_id: str) -> bytes:
        if self.locked:
            raise Locked("storage is locked")
        return self.secrets.get(volume_id, PASSPHRASE)

    def journal_path(self, volume_id: str) -> Path:
        return self.state_dir / "volumes" / "journal" / f"{volume_id}.json"

    def journal(self, volume_id: str) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.journal_path(volume_id).read_bytes())
        return body

    def events(self, volume_id: str | None = None) -> list[tuple[str, str, int]]:
        return [
            (e.volume_id, e.state, e.generation)
            for e in self.bus.events("persistence.volume_state")
            if isinstance(e, VolumeStateChanged) and volume_id in (None, e.volume_id)
        ]

    def attach(self, volume_id: str = "v1", read_only: bool = False) -> Path:
        return Path(self.successResultOf(self.manager.attach(volume_id, read_only)))

    def status(self, volume_id: str = "v1") -> VolumeStatus:
        return self.successResultOf(self.manager.status(volume_id))


class EnsureTests(ManagerTestCase):
    def test_ensure_creates_and_journals_a_detached_volume(self) -> None:
        """ensure() creates the ciphertext, journals it detached and publishes it."""
        status = self.successResultOf(self.manager.ensure("v1"))
        self.assertEqual(
            (status.state, status.desired, status.created), (DETACHED, "detached", True)
        )
        self.assertFalse(status.mounted)
        self.assertTrue((self.state_dir / "volumes" / "ciphertext" / "v1").is_dir())
        body = self.journal("v1")
        self.assertEqual(
            {k: body[k] for k in ("format", "volume_id", "observed", "generation", "needs_repair")},
            {
                "format": 1,
                "volume_id": "v1",
                "observed": DETACHED,
                "generation": 0,
                "needs_repair": False,
            },
        )
        self.assertEqual(body["updated_at"], 1000.0)
        self.assertEqual(self.events(), [("v1", DETACHED, 0)])

    def test_ensure_twice_changes_nothing(self) -> None:
        """A second ensure() checks the volume, writes nothing and publishes nothing."""
        self.successResultOf(self.manager.ensure("v1"))
        before = self.journal_path("v1").read_bytes()
        self.clock.advance(5)
        self.successResultOf(self.manager.ensure("v1"))
        self.assertEqual(self.journal_path("v1").read_bytes(), before)
        self.assertEqual(len(self.events()), 1)
        self.assertEqual(
            [c for c in self.adapter.calls if c[0] == "create"], [("create", "v1")] * 2
        )

    def test_ensure_while_locked_is_pending_until_unlocked(self) -> None:
        """While locked, ensure() journals the volume pending; unlocked, it creates it."""
        self.locked = True
        status = self.successResultOf(self.manager.ensure("v1"))
        self.assertEqual((status.state, status.created), (PENDING, False))
        self.assertFalse((self.state_dir / "volumes" / "ciphertext" / "v1").exists())
        self.locked = False
        status = self.successResultOf(self.manager.ensure("v1"))
        self.assertEqual((status.state, status.created), (DETACHED, True))
        self.assertEqual(self.events(), [("v1", PENDING, 0), ("v1", DETACHED, 0)])

    def test_ensure_with_a_passphrase_that_does_not_open_it(self) -> None:
        """A key that does not open an existing volume marks it needs-repair."""
        self.successResultOf(self.manager.ensure("v1"))
        self.secrets["v1"] = OTHER_PASSPHRASE
        self.failureResultOf(self.manager.ensure("v1"), VolumeNeedsRepair)
        self.assertEqual(self.status().state, NEEDS_REPAIR)
        self.assertTrue(self.journal("v1")["needs_repair"])
        self.assertIn("WrongPassphrase", self.journal("v1")["last_error"])

    def test_secret_may_be_a_deferred(self) -> None:
        """secret_for may return a Deferred."""
        manager = self.make_manager(lambda vid: succeed(PASSPHRASE))
        self.assertEqual(self.successResultOf(manager.ensure("v1")).state, DETACHED)

    def test_a_malformed_secret_is_refused(self) -> None:
        """A secret that is not usable bytes fails with InvalidCommand; nothing is created."""
        manager = self.make_manager(lambda vid: "text, not bytes")
        self.failureResultOf(manager.ensure("v1"), InvalidCommand)
        self.assertFalse((self.state_dir / "volumes" / "ciphertext" / "v1").exists())


class AttachDetachTests(ManagerTestCase):
    def test_attach_mounts_and_journals(self) -> None:
        """attach() creates, mounts and journals attached-rw at generation 1."""
        path = self.attach("v1")
        self.assertTrue(path.is_dir())
        status = self.status()
        self.assertEqual(
            (status.state, status.desired, status.generation, status.observed_generation),
            (ATTACHED_RW, "attached", 1, 1),
        )
        self.assertEqual((status.mounted, status.path), (True, str(path)))
        self.assertEqual(self.events(), [("v1", ATTACHED_RW, 1)])

    def test_attach_read_only_then_read_write_remounts(self) -> None:
        """A mode change bumps the generation and remounts in the new mode."""
        self.attach("v1", read_only=True)
        self.assertEqual(self.status().state, ATTACHED_RO)
        self.assertIs(self.adapter.inner.read_only("v1"), True)
        self.attach("v1", read_only=False)
        self.assertEqual(self.status().state, ATTACHED_RW)
        self.assertIs(self.adapter.inner.read_only("v1"), False)
        self.assertEqual(self.events(), [("v1", ATTACHED_RO, 1), ("v1", ATTACHED_RW, 2)])

    def test_attach_again_in_the_same_mode_is_quiet(self) -> None:
        """attach() of an attached volume in its mode fires with the path, no new event."""
        first = self.attach("v1")
        self.assertEqual(self.attach("v1"), first)
        self.assertEqual(len(self.events()), 1)
        self.assertEqual(self.status().generation, 1)

    def test_attach_while_locked_is_pending(self) -> None:
        """attach() while locked fails with Locked; the volume is pending, wanted attached."""
        self.locked = True
        self.failureResultOf(self.manager.attach("v1"), Locked)
        status = self.status()
        self.assertEqual(
            (status.state, status.desired, status.mounted), (PENDING, "attached", False)
        )
        self.assertEqual(self.events(), [("v1", PENDING, 1)])

    def test_detach_unmounts_and_journals(self) -> None:
        """detach() unmounts, wants detached (generation 2) and publishes detached."""
        path = self.attach("v1")
        status = self.successResultOf(self.manager.detach("v1"))
        self.assertEqual(
            (status.state, status.desired, status.generation), (DETACHED, "detached", 2)
        )
        self.assertFalse(path.exists())
        self.assertEqual(self.adapter.mounted(), [])
        self.assertEqual(self.events(), [("v1", ATTACHED_RW, 1), ("v1", DETACHED, 2)])

    def test_detach_of_an_unknown_volume_is_not_found(self) -> None:
        """detach() of a volume never ensured fails with VolumeNotFound."""
        self.failureResultOf(self.manager.detach("ghost"), VolumeNotFound)
        self.failureResultOf(self.manager.status("ghost"), VolumeNotFound)

    def test_busy_detach_keeps_the_volume_attached(self) -> None:
        """A busy unmount fails with VolumeBusy; the journal wants detached and says why."""
        self.attach("v1")
        self.adapter.busy.add("v1")
        self.failureResultOf(self.manager.detach("v1"), VolumeBusy)
        status = self.status()
        self.assertEqual(
            (status.state, status.desired, status.mounted), (ATTACHED_RW, "detached", True)
        )
        self.assertIn("VolumeBusy", status.last_error or "")
        self.adapter.busy.clear()
        self.assertEqual(self.successResultOf(self.manager.sweep())[0].state, DETACHED)

    def test_mount_failure_marks_the_volume_failed(self) -> None:
        """A failed mount is journaled failed with the error; a later attach recovers."""
        self.adapter.mount_error = MountTimeout("did not mount within 5.0s")
        self.failureResultOf(self.manager.attach("v1"), MountTimeout)
        status = self.status()
        self.assertEqual((status.state, status.desired), (FAILED, "attached"))
        self.assertEqual(status.last_error, "MountTimeout: did not mount within 5.0s")
        self.adapter.mount_error = None
        self.attach("v1")
        status = self.status()
        self.assertEqual((status.state, status.last_error), (ATTACHED_RW, None))
        self.assertEqual(self.events(), [("v1", FAILED, 1), ("v1", ATTACHED_RW, 1)])

    def test_wrong_passphrase_on_attach_needs_repair(self) -> None:
        """A key that no longer opens the volume marks it needs-repair; attach is then refused."""
        self.attach("v1")
        self.successResultOf(self.manager.detach("v1"))
        self.secrets["v1"] = OTHER_PASSPHRASE
        self.failureResultOf(self.manager.attach("v1"), VolumeNeedsRepair)
        self.assertEqual(self.status().state, NEEDS_REPAIR)
        self.secrets.clear()
        error = self.failureResultOf(self.manager.attach("v1"), VolumeNeedsRepair).value
        self.assertIn("WrongPassphrase", str(error))
        self.assertEqual(self.adapter.mounted(), [])

    def test_missing_ciphertext_of_a_created_volume_needs_repair(self) -> None:
        """A created volume whose ciphertext vanished is needs-repair, not silently re-created."""
        self.successResultOf(self.manager.ensure("v1"))
        shutil.rmtree(self.state_dir / "volumes" / "ciphertext" / "v1")
        error = self.failureResultOf(self.manager.attach("v1"), VolumeNeedsRepair).value
        self.assertIn("VolumeNotFound", str(error))
        self.assertTrue(self.journal("v1")["needs_repair"])
        self.assertFalse((self.state_dir / "volumes" / "ciphertext" / "v1").exists())

    def test_a_failing_create_leaves_no_journal(self) -> None:
        """ensure() whose create fails writes no journal and publishes nothing."""
        self.adapter.create_error = VolumeError("disk full")
        self.failureResultOf(self.manager.ensure("v1"), VolumeError)
        self.assertFalse(self.journal_path("v1").exists())
        self.assertEqual(self.events(), [])

    def test_lost_mount_marks_the_volume_failed(self) -> None:
        """A mount lost behind the manager's back is journaled failed and published."""
        self.attach("v1")
        self.adapter.lose("v1", "gocryptfs exited unexpectedly (killed by signal 9)")
        status = self.status()
        self.assertEqual((status.state, status.mounted), (FAILED, False))
        self.assertIn("signal 9", status.last_error or "")
        self.assertEqual(self.events()[-1], ("v1", FAILED, 1))
        statuses = self.successResultOf(self.manager.sweep())
        self.assertEqual(statuses[0].state, ATTACHED_RW)

    def test_close_stops_watching_lost_mounts(self) -> None:
        """After close() a lost mount is no longer recorded by the manager."""
        self.attach("v1")
        self.manager.close()
        self.manager.close()
        self.adapter.lose("v1")
        self.assertEqual(self.status().state, ATTACHED_RW)


class SerialisationTests(ManagerTestCase):
    def test_operations_on_one_volume_wait_for_each_other(self) -> None:
        """A detach asked during an attach of the same volume runs after it."""
        self.adapter.hold_mounts = True
        attaching = self.manager.attach("v1")
        detaching = self.manager.detach("v1")
        self.assertNoResult(attaching)
        self.assertNoResult(detaching)
        self.assertNotIn(("unmount", "v1"), self.adapter.calls)
        self.adapter.held["v1"].callback(None)
        self.successResultOf(attaching)
        self.assertEqual(self.successResultOf(detaching).state, DETACHED)
        self.assertEqual(self.adapter.calls[-1], ("unmount", "v1"))

    def test_other_volumes_are_not_held_up(self) -> None:
        """An attach held on one volume does not delay operations on another."""
        self.successResultOf(self.manager.ensure("v2"))
        self.adapter.hold_mounts = True
        attaching = self.manager.attach("v1")
        self.assertEqual(self.successResultOf(self.manager.status("v2")).state, DETACHED)
        self.assertEqual(self.successResultOf(self.manager.detach("v2")).state, DETACHED)
        self.assertNoResult(attaching)
        self.adapter.held["v1"].callback(None)
        self.successResultOf(attaching)


class BadInputTests(ManagerTestCase):
    def test_bad_volume_ids_are_refused_everywhere(self) -> None:
        """Every operation refuses a bad id with InvalidVolumeId before touching anything."""
        for bad in BAD_IDS:
            with self.subTest(volume_id=bad):
                for d in (
                    self.manager.ensure(bad),
                    self.manager.attach(bad),
                    self.manager.detach(bad),
                    self.manager.status(bad),
                    self.manager.repair(bad),
                ):
                    self.failureResultOf(d, InvalidVolumeId)
        self.assertFalse(self.state_dir.exists())
        self.assertEqual(self.adapter.calls, [])

    def test_a_missing_adapter_interface_is_refused(self) -> None:
        """The adapter must provide IVolumeAdapter."""
        self.assertRaises(
            TypeError, VolumeManager, self.clock, self.state_dir, object(), None, self.secret_for
        )

    def test_fake_adapter_is_honest(self) -> None:
        """The test double provides IVolumeAdapter like the real adapters."""
        verifyObject(IVolumeAdapter, self.adapter)
        assert_parameter_names(self, IVolumeAdapter, self.adapter)


class JournalTests(ManagerTestCase):
    def test_journal_is_private_and_complete(self) -> None:
        """The journal is mode 0600 JSON holding every field of the volume's state."""
        self.attach("v1")
        mode = stat.S_IMODE(os.stat(self.journal_path("v1")).st_mode)
        self.assertEqual(mode, 0o600)
        self.assertEqual(
            set(self.journal("v1")),
            {
                "format",
                "volume_id",
                "created",
                "desired",
                "read_only",
                "observed",
                "generation",
                "observed_generation",
                "needs_repair",
                "last_error",
                "updated_at",
            },
        )

    def test_a_failed_write_leaves_the_old_journal(self) -> None:
        """A write that fails before the rename keeps the old journal and no temp file."""
        self.attach("v1")
        before = self.journal_path("v1").read_bytes()

        def broken_replace(src: Any, dst: Any) -> None:
            raise OSError(28, "No space left on device")

        self.patch(volumes_module.os, "replace", broken_replace)
        error = self.failureResultOf(self.manager.detach("v1"), VolumeError).value
        self.assertIn("No space left", str(error))
        self.assertEqual(self.journal_path("v1").read_bytes(), before)
        self.assertEqual(os.listdir(self.journal_path("v1").parent), ["v1.json"])

    def test_write_atomically_fsyncs_file_and_directory(self) -> None:
        """The file and its directory are fsynced, and the rename comes between."""
        calls: list[str] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            calls.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
            real_fsync(fd)

        def replace(src: Any, dst: Any) -> None:
            calls.append("rename")
            real_replace(src, dst)

        self.patch(volumes_module.os, "fsync", fsync)
        self.patch(volumes_module.os, "replace", replace)
        write_atomically(self.state_dir / "x.json", b"{}")
        self.assertEqual(calls, ["fsync-file", "rename", "fsync-dir"])

    def test_temp_files_left_by_a_crash_are_ignored(self) -> None:
        """A temp file left by a crash between write and rename is no volume."""
        self.attach("v1")
        stray = self.journal_path("v1").parent / ".v1.json.abc123.tmp"
        stray.write_bytes(b"{half")
        (stray.parent / "README").write_bytes(b"not a journal")
        ids = [s.volume_id for s in self.successResultOf(self.manager.volumes())]
        self.assertEqual(ids, ["v1"])
        self.assertEqual([s.volume_id for s in self.successResultOf(self.manager.sweep())], ["v1"])

    def corrupt(self, content: bytes, volume_id: str = "v1") -> bytes:
        path = self.journal_path(volume_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return content

    def test_corrupt_journals_need_repair_and_stay_untouched(self) -> None:
        """Every kind of damaged journal is needs-repair, published, and never overwritten."""
        good = {
            "format": 1,
            "volume_id": "v1",
            "created": True,
            "desired": "attached",
            "read_only": False,
            "observed": "attached-rw",
            "generation": 1,
            "observed_generation": 1,
            "needs_repair": False,
            "last_error": None,
            "updated_at": 1.0,
        }
        damages = [
            b"",
            b"{not json",
            b"\xff\xfe",
            b"[]",
            json.dumps(dict(good, format=2)).encode(),
            json.dumps(dict(good, volume_id="other")).encode(),
            json.dumps(dict(good, desired="sideways")).encode(),
            json.dumps(dict(good, observed="melted")).encode(),
            json.dumps(dict(good, generation="1")).encode(),
            json.dumps(dict(good, generation=True)).encode(),
            json.dumps(dict(good, observed_generation=5)).encode(),
            json.dumps({k: v for k, v in good.items() if k != "created"}).encode(),
        ]
        for damage in damages:
            with self.subTest(damage=damage[:50]):
                self.bus.clear_published()
                manager = self.make_manager()
                content = self.corrupt(damage)
                self.failureResultOf(manager.ensure("v1"), VolumeNeedsRepair)
                self.failureResultOf(manager.attach("v1"), VolumeNeedsRepair)
                status = self.successResultOf(manager.status("v1"))
                self.assertEqual((status.state, status.needs_repair), (NEEDS_REPAIR, True))
                self.assertEqual(self.journal_path("v1").read_bytes(), content)
                self.assertEqual(self.events(), [("v1", NEEDS_REPAIR, 0)])
                self.assertEqual(self.adapter.mounted(), [])
        self.assertEqual(json.loads(json.dumps(good))["observed"], ATTACHED_RW)

    def test_repair_moves_a_corrupt_journal_aside(self) -> None:
        """repair() keeps the corrupt journal beside, and restarts the volume detached."""
        self.successResultOf(self.manager.ensure("v1"))
        manager = self.make_manager()
        content = self.corrupt(b"{garbage")
        self.failureResultOf(manager.ensure("v1"), VolumeNeedsRepair)
        status = self.successResultOf(manager.repair("v1"))
        self.assertEqual(
            (status.state, status.needs_repair, status.created), (DETACHED, False, True)
        )
        aside = [p for p in self.journal_path("v1").parent.iterdir() if "corrupt" in p.name]
        self.assertEqual(len(aside), 1)
        self.assertEqual(aside[0].read_bytes(), content)
        self.assertTrue(str(self.successResultOf(manager.attach("v1"))).endswith("v1"))

    def test_repair_clears_needs_repair(self) -> None:
        """repair() of a needs-repair volume (bad key) lets it be attached once the key is right."""
        self.attach("v1")
        self.successResultOf(self.manager.detach("v1"))
        self.secrets["v1"] = OTHER_PASSPHRASE
        self.failureResultOf(self.manager.attach("v1"), VolumeNeedsRepair)
        self.secrets.clear()
        status = self.successResultOf(self.manager.repair("v1"))
        self.assertEqual(
            (status.state, status.needs_repair, status.last_error), (DETACHED, False, None)
        )
        self.attach("v1")
        self.failureResultOf(self.manager.repair("ghost"), VolumeNotFound)


class LockPathTests(ManagerTestCase):
    def test_detach_all_unmounts_everything_keeping_what_is_wanted(self) -> None:
        """detach_all() unmounts every volume; attached ones become pending, wanted attached."""
        self.attach("a")
        self.attach("b", read_only=True)
        self.successResultOf(self.manager.ensure("c"))
        self.assertEqual(self.successResultOf(self.manager.detach_all("locked")), ["a", "b"])
        self.assertEqual(self.adapter.mounted(), [])
        for vid in ("a", "b"):
            status = self.status(vid)
            self.assertEqual(
                (status.state, status.desired, status.mounted), (PENDING, "attached", False)
            )
        self.assertEqual(self.status("c").state, DETACHED)
        self.assertEqual(
            [e for e in self.bus.events("persistence.volume_state") if e.state == PENDING],  # type: ignore[attr-defined]
            [
                VolumeStateChanged("a", PENDING, 1, "locked"),
                VolumeStateChanged("b", PENDING, 1, "locked"),
            ],
        )

    def test_detach_all_tries_every_volume_and_names_the_busy_ones(self) -> None:
        """A busy volume does not stop detach_all(); it fails naming it, the rest unmounted."""
        self.attach("a")
        self.attach("b")
        self.attach("c")
        self.adapter.busy.add("b")
        error = self.failureResultOf(self.manager.detach_all(), VolumeBusy).value
        self.assertEqual(error.extra["volumes"], ["b"])  # type: ignore[attr-defined]
        self.assertEqual(self.adapter.mounted(), ["b"])

    def test_detach_all_unmounts_even_unjournaled_or_corrupt_volumes(self) -> None:
        """Nothing is left mounted, whatever the journals say."""
        self.attach("a")
        self.corrupt_journal("a")
        self.successResultOf(self.adapter.inner.create("raw", PASSPHRASE))
        self.successResultOf(self.adapter.inner.mount("raw", PASSPHRASE, False))
        manager = self.make_manager()
        self.assertEqual(self.successResultOf(manager.detach_all()), ["a", "raw"])
        self.assertEqual(self.adapter.mounted(), [])

    def corrupt_journal(self, volume_id: str) -> None:
        self.journal_path(volume_id).write_bytes(b"{")


class SweepTests(ManagerTestCase):
    def test_boot_sweep_while_locked_marks_wanted_volumes_pending(self) -> None:
        """After a restart, a volume journaled attached is pending until unlock, then attached."""
        self.attach("control")
        (self.attach("control") / "db").write_bytes(b"data")
        self.successResultOf(self.manager.ensure("spare"))
        # A restart: a fresh adapter (nothing mounted) and manager.
        self.adapter = FaultyAdapter(DirectoryVolumes(self.clock, self.state_dir))
        self.manager = self.make_manager()
        self.locked = True
        statuses = self.successResultOf(self.manager.sweep())
        self.assertEqual(
            [(s.volume_id, s.state) for s in statuses], [("control", PENDING), ("spare", DETACHED)]
        )
        self.locked = False
        statuses = self.successResultOf(self.manager.sweep())
        self.assertEqual(
            [(s.volume_id, s.state) for s in statuses],
            [("control", ATTACHED_RW), ("spare", DETACHED)],
        )
        self.assertEqual((Path(statuses[0].path or "") / "db").read_bytes(), b"data")

    def test_sweep_detaches_what_is_not_wanted(self) -> None:
        """A mounted volume whose journal wants it detached is unmounted by the sweep."""
        self.successResultOf(self.manager.ensure("v1"))
        self.successResultOf(self.adapter.inner.mount("v1", PASSPHRASE, False))
        statuses = self.successResultOf(self.manager.sweep())
        self.assertEqual(statuses[0].state, DETACHED)
        self.assertEqual(self.adapter.mounted(), [])

    def test_sweep_records_observed_state_after_a_crash(self) -> None:
        """A journal saying attached-rw but wanting detached (crash mid-detach) ends detached."""
        self.attach("v1")
        body = self.journal("v1")
        body.update(desired="detached", generation=2)
        write_atomically(self.journal_path("v1"), json.dumps(body).encode())
        self.adapter = FaultyAdapter(DirectoryVolumes(self.clock, self.state_dir))
        self.manager = self.make_manager()
        statuses = self.successResultOf(self.manager.sweep())
        self.assertEqual((statuses[0].state, statuses[0].observed_generation), (DETACHED, 2))

    def test_sweep_goes_on_past_broken_volumes(self) -> None:
        """Corrupt, needs-repair and failing volumes are reported; the others are swept."""
        self.attach("bad-key")
        self.attach("broken-journal")
        self.attach("good")
        self.successResultOf(self.manager.detach_all())
        self.journal_path("broken-journal").write_bytes(b"{")
        self.secrets["bad-key"] = OTHER_PASSPHRASE
        manager = self.make_manager()
        statuses = self.successResultOf(manager.sweep())
        self.assertEqual(
            [(s.volume_id, s.state) for s in statuses],
            [("bad-key", NEEDS_REPAIR), ("broken-journal", NEEDS_REPAIR), ("good", ATTACHED_RW)],
        )
        self.assertEqual(self.adapter.mounted(), ["good"])

    def test_sweep_retries_failed_mounts(self) -> None:
        """A volume whose mount failed is attached by the next sweep."""
        self.adapter.mount_error = VolumeError("transient")
        self.failureResultOf(self.manager.attach("v1"), VolumeError)
        statuses = self.successResultOf(self.manager.sweep())
        self.assertEqual(statuses[0].state, FAILED)
        self.adapter.mount_error = None
        statuses = self.successResultOf(self.manager.sweep())
        self.assertEqual(statuses[0].state, ATTACHED_RW)

    def test_sweep_unmounts_volumes_without_a_journal(self) -> None:
        """A mounted volume nobody journaled is unmounted (its desired state is unknown)."""
        self.successResultOf(self.adapter.inner.create("stray", PASSPHRASE))
        self.successResultOf(self.adapter.inner.mount("stray", PASSPHRASE, False))
        self.assertEqual(self.successResultOf(self.manager.sweep()), [])
        self.assertEqual(self.adapter.mounted(), [])

    def test_volumes_lists_every_journaled_volume(self) -> None:
        """volumes() lists each volume by id, corrupt ones as needs-repair."""
        self.successResultOf(self.manager.ensure("b"))
        self.attach("a")
        self.journal_path("c").write_bytes(b"nope")
        listed = self.successResultOf(self.make_manager().volumes())
        self.assertEqual(
            [(s.volume_id, s.state) for s in listed],
            [("a", ATTACHED_RW), ("b", DETACHED), ("c", NEEDS_REPAIR)],
        )
        self.assertEqual(listed[0].to_json()["volume_id"], "a")
        self.assertFalse(listed[0].encrypted)

    def test_sweep_publishes_every_volume_state(self) -> None:
        """After a sweep the bus holds a retained state for each volume, changed or not."""
        self.attach("a")
        self.successResultOf(self.manager.ensure("b"))
        self.bus.clear_published()
        self.successResultOf(self.manager.sweep())
        self.assertEqual(self.events(), [("a", ATTACHED_RW, 1), ("b", DETACHED, 0)])
        retained = self.bus.last("persistence.volume_state", "b")
        assert retained is not None
        self.assertEqual(retained.event.state, DETACHED)  # type: ignore[attr-defined]

    def test_sweep_rereads_a_journal_fixed_by_hand(self) -> None:
        """A corrupt journal restored from a backup is used by the next sweep."""
        self.successResultOf(self.manager.ensure("v1"))
        backup = self.journal_path("v1").read_bytes()
        self.journal_path("v1").write_bytes(b"{")
        manager = self.make_manager()
        self.assertEqual(self.successResultOf(manager.sweep())[0].state, NEEDS_REPAIR)
        self.journal_path("v1").write_bytes(backup)
        self.assertEqual(self.successResultOf(manager.sweep())[0].state, DETACHED)
        self.assertEqual(self.successResultOf(manager.attach("v1")).rsplit("/", 1)[1], "v1")
