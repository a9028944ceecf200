"""Tests for exports and import: bundles, manifests, quiescing, restore into a fresh dir."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import (
    DeleteExport,
    ImportBundle,
    ListExports,
    OpenExport,
    RunControlExport,
    RunFullExport,
)
from piccolod.errors import Conflict, IllegalTransition, InvalidCommand, NotFound
from piccolod.events import ExportResult, JobProgress, LockState, LockStateChanged, Role
from piccolod.interfaces import AppRecord, AuditEntry, AuthState
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.jobs import JobRunner
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.persistence.directory import DirectoryVolumes
from piccolod.persistence.errors import StoreError
from piccolod.persistence.exports import BundleInvalid, bundle_file, verify_bundle
from piccolod.persistence.keyset import KdfParams
from piccolod.persistence.service import PersistenceConfig, PersistenceService
from piccolod.persistence.volumes import VolumeManager
from piccolod.testing.bus import FakeEventBus

PASSWORD = "export password 1"
CANARY = "EXPORT-CANARY-93c1"


class Box:
    """One state dir with its service (volumes on the directory adapter, or none)."""

    def __init__(
        self, case: SynchronousTestCase, volumes: bool = True, jobs: bool = False, **config: Any
    ) -> None:
        self.case = case
        self.state_dir = Path(tempfile.mkdtemp(prefix="box-"))
        case.addCleanup(shutil.rmtree, self.state_dir, True)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.bus = FakeEventBus(self.clock)
        self.registry = LeadershipRegistry(self.bus, "n")
        self.registry.update("control-plane", Role.LEADER, 1, leader_id="n")
        self.dispatcher = CommandDispatcher(self.clock, self.bus, registry=self.registry)
        self.adapter = DirectoryVolumes(self.clock, self.state_dir)
        self.jobs: JobRunner | None = None
        if jobs:
            self.jobs = JobRunner(self.clock, self.bus, limits={"export": 1})
            self.jobs.startService()
            case.addCleanup(self.jobs.stopService)
        factory = None
        if volumes:

            def factory(secret_for: Any) -> VolumeManager:
                return VolumeManager(self.clock, self.state_dir, self.adapter, self.bus, secret_for)

        self.service = PersistenceService(
            self.clock,
            self.state_dir / "persistence",
            self.bus,
            PersistenceConfig(kdf=KdfParams(1, 8, 1), **config),
            dispatcher=self.dispatcher,
            registry=self.registry,
            volume_manager_factory=factory,
            jobs=self.jobs,
        )
        self.service.startService()
        case.addCleanup(self.stop)

    def stop(self) -> None:
        if self.service.running:
            self.case.successResultOf(self.service.stopService())

    def result(self, d: Any) -> Any:
        return self.case.successResultOf(d)

    def populate(self) -> None:
        s = self.service
        self.result(s.setup(PASSWORD))
        self.result(s.unlock(password=PASSWORD))
        self.result(s.auth.save(AuthState(True, "$argon2id$hash")))
        self.result(s.apps.put(AppRecord("web", {"image": "busybox", "env": {"K": CANARY}})))
        self.result(s.apps.put(AppRecord("db", {"image": "postgres"}, enabled=False)))
        self.result(s.remote.save({"enabled": True, "secret": CANARY}))
        self.result(s.audit.append(AuditEntry("apps.install", "admin", "ok", detail=CANARY)))
        self.result(s.settings.set("theme", {"dark": True}))

    def snapshot(self) -> dict[str, Any]:
        s = self.service
        return {
            "auth": self.result(s.auth.get()),
            "apps": list(self.result(s.apps.list_all())),
            "remote": self.result(s.remote.get()),
            "audit": list(self.result(s.audit.recent(100))),
            "settings": dict(self.result(s.settings.items())),
            "revision": s.info().revision,
            "checksum": s.info().checksum,
        }


class ExportJobTests(SynchronousTestCase):
    def test_export_runs_as_an_export_job(self) -> None:
        """With the kernel's job runner an export is an ``export`` job with progress and an end."""
        box = Box(self, jobs=True)
        box.populate()
        d = box.dispatcher.dispatch(RunControlExport())
        box.clock.advance(0)
        done = box.result(d)
        assert box.jobs is not None
        (job,) = [j for j in box.jobs.jobs() if j.job_class == "export"]
        self.assertEqual(job.state.value, "succeeded")
        self.assertEqual(job.name, "control export")
        self.assertTrue(Path(done.path).exists())
        progress = [e for e in box.bus.events("jobs.progress") if e.job_id == job.id]
        self.assertGreater(len([e for e in progress if e.state == "running"]), 1)
        self.assertEqual(progress[-1].state, "succeeded")
        self.assertIs(box.service.state, LockState.UNLOCKED)

    def test_concurrent_exports_both_complete_as_jobs(self) -> None:
        """Two exports requested at once both complete, as two export jobs."""
        box = Box(self, jobs=True)
        box.populate()
        first = box.dispatcher.dispatch(RunControlExport())
        second = box.dispatcher.dispatch(RunControlExport())
        box.clock.advance(0)
        a, b = box.result(first), box.result(second)
        self.assertNotEqual(a.path, b.path)
        assert box.jobs is not None
        self.assertEqual(box.jobs.stats()["classes"]["export"]["succeeded"], 2)


class BundlesOnTheBoxTests(SynchronousTestCase):
    def export(self, box: Box, command: Any) -> Any:
        done = box.result(box.dispatcher.dispatch(command))
        box.clock.advance(1.0)  # the next bundle's name has a later stamp
        return done

    def test_list_open_and_delete(self) -> None:
        """Bundles are listed newest first, opened by kind and name, deleted once."""
        box = Box(self)
        box.populate()
        first = self.export(box, RunControlExport())
        full = self.export(box, RunFullExport())
        second = self.export(box, RunControlExport())
        self.assertEqual(Path(second.path).name, second.name)
        listed = box.result(box.dispatcher.dispatch(ListExports()))
        self.assertEqual(
            [(e.kind, e.name) for e in listed.exports],
            [("control", second.name), ("full", full.name), ("control", first.name)],
        )
        self.assertEqual(listed.keep, 5)
        self.assertEqual(listed.exports[1].size, full.size)
        opened = box.result(box.dispatcher.dispatch(OpenExport("full", full.name)))
        self.assertEqual((opened.path, opened.size), (full.path, full.size))
        deleted = box.result(box.dispatcher.dispatch(DeleteExport("control", first.name)))
        self.assertEqual(deleted.name, first.name)
        self.assertFalse(Path(first.path).exists())
        for command in (DeleteExport("control", first.name), OpenExport("control", first.name)):
            self.failureResultOf(box.dispatcher.dispatch(command), NotFound)
        # A name of the other kind is not found under this kind.
        self.failureResultOf(box.dispatcher.dispatch(OpenExport("control", full.name)), NotFound)

    def test_keep_exports_prunes_the_oldest_of_the_kind(self) -> None:
        """With keep_exports = 2 the third control export removes the first; full ones stay."""
        box = Box(self, keep_exports=2)
        box.populate()
        names = [self.export(box, RunControlExport()) for _ in range(2)]
        full = self.export(box, RunFullExport())
        third = self.export(box, RunControlExport())
        self.assertEqual(third.pruned, (names[0].name,))
        self.assertFalse(Path(names[0].path).exists())
        listed = box.result(box.dispatcher.dispatch(ListExports()))
        self.assertEqual(
            sorted(e.name for e in listed.exports), sorted([names[1].name, third.name, full.name])
        )

    def test_only_bundles_are_ever_served(self) -> None:
        """Bad names are refused before any lookup; other files and symlinks are never listed."""
        box = Box(self)
        box.populate()
        done = self.export(box, RunControlExport())
        for name in ("../../persistence/keyset.json", "keyset.json", done.name + "/x", ""):
            self.assertRaises(InvalidCommand, OpenExport, "control", name)
        self.assertRaises(InvalidCommand, OpenExport, "keys", done.name)
        directory = Path(done.path).parent
        (directory / "notes.txt").write_text("x")
        fake = done.name.replace(done.name[-10:-4], "abcdef")
        (directory / fake).symlink_to(box.state_dir / "persistence" / "keyset.json")
        listed = box.result(box.dispatcher.dispatch(ListExports()))
        self.assertEqual([e.name for e in listed.exports], [done.name])
        self.failureResultOf(box.dispatcher.dispatch(OpenExport("control", fake)), NotFound)
        self.assertEqual(bundle_file(box.state_dir, "control", done.name).size, done.size)
        self.assertRaises(NotFound, bundle_file, box.state_dir, "control", "x")


class ExportTests(SynchronousTestCase):
    def test_control_export_restores_identically_into_a_fresh_dir(self) -> None:
        """Export → import into an empty dir → unlock with the password → identical data."""
        source = Box(self)
        source.populate()
        before = source.snapshot()
        done = source.result(source.dispatcher.dispatch(RunControlExport()))
        self.assertIs(source.service.state, LockState.UNLOCKED)
        self.assertEqual(source.snapshot(), before)
        self.assertTrue(done.path.startswith(str(source.state_dir / "exports" / "control")))
        json.dumps(done.to_json())
        manifest = verify_bundle(Path(done.path))
        paths = [f["path"] for f in manifest["files"]]
        files = [f["path"] for f in manifest["files"] if f["type"] == "file"]
        self.assertEqual(done.files, len(files))
        self.assertIn("persistence/keyset.json", paths)
        self.assertIn("volumes/journal/control.json", paths)
        self.assertTrue(any(p.startswith("volumes/ciphertext/control/") for p in paths))
        self.assertFalse(any("bootstrap" in p for p in paths))
        self.assertNotIn(CANARY.encode(), Path(done.path).read_bytes())

        target = Box(self)
        imported = target.result(target.dispatcher.dispatch(ImportBundle(done.path)))
        self.assertEqual((imported.kind, imported.files), ("control", len(files)))
        self.assertIs(target.service.state, LockState.LOCKED)
        target.result(target.service.unlock(password=PASSWORD))
        self.assertEqual(target.snapshot(), before)
        self.assertTrue(target.result(target.service.store.verify_chain()).ok)

    def test_export_quiesces_and_restores_the_lock_state(self) -> None:
        """An unlocked export locks, writes, unlocks again; events and progress are published."""
        box = Box(self)
        box.populate()
        box.bus.flush()
        box.bus.clear_published()
        done = box.result(box.service.run_export("full", correlation="c-1"))
        box.bus.flush()
        states = [
            (e.previous, e.state)
            for e in box.bus.events(LockStateChanged.topic)
            if isinstance(e, LockStateChanged)
        ]
        U, L, P = LockState.UNLOCKED, LockState.LOCKED, LockState.PREUNLOCK
        self.assertEqual(states, [(U, L), (L, P), (P, U)])
        results = box.bus.events(ExportResult.topic)
        self.assertEqual(results, [ExportResult("full", True, done.path, done.sha256)])
        progress = [e for e in box.bus.events(JobProgress.topic) if isinstance(e, JobProgress)]
        self.assertEqual(progress[0].progress, 0.0)
        self.assertEqual((progress[-1].state, progress[-1].progress), ("succeeded", 1.0))
        mine = [
            env
            for env in box.bus.published()
            if env.topic in (LockStateChanged.topic, ExportResult.topic, JobProgress.topic)
        ]
        self.assertGreater(len(mine), 5)
        self.assertTrue(all(env.context.correlation_id == "c-1" for env in mine))

    def test_locked_export_stays_locked(self) -> None:
        """Exporting while locked does not unlock."""
        box = Box(self)
        box.populate()
        box.result(box.service.lock())
        box.result(box.dispatcher.dispatch(RunFullExport()))
        self.assertIs(box.service.state, LockState.LOCKED)

    def test_full_export_carries_every_volume(self) -> None:
        """A full export holds every volume's tree and journal; it restores and unlocks."""
        source = Box(self)
        source.populate()
        path = Path(source.result(source.service.volumes.attach("app-web")))  # type: ignore[union-attr]
        (path / "data.bin").write_bytes(b"app data")
        before = source.snapshot()
        done = source.result(source.service.run_export("full"))
        paths = [f["path"] for f in verify_bundle(Path(done.path))["files"]]
        for volume in ("control", "bootstrap", "app-web"):
            self.assertIn(f"volumes/journal/{volume}.json", paths)
        target = Box(self)
        target.result(target.service.import_bundle(done.path))
        target.result(target.service.unlock(password=PASSWORD))
        self.assertEqual(target.snapshot(), before)
        mounted = list(target.adapter.mounted())
        self.assertEqual(mounted, ["app-web", "bootstrap", "control"])
        restored = target.state_dir / "volumes" / "mounts" / "app-web" / "data.bin"
        self.assertEqual(restored.read_bytes(), b"app data")

    def test_export_without_volumes(self) -> None:
        """Without a volume adapter the store directory itself is exported and restored."""
        source = Box(self, volumes=False)
        source.populate()
        before = source.snapshot()
        done = source.result(source.service.run_export("control"))
        paths = [f["path"] for f in verify_bundle(Path(done.path))["files"]]
        self.assertIn("persistence/control/control.db", paths)
        target = Box(self, volumes=False)
        target.result(target.service.import_bundle(done.path))
        target.result(target.service.unlock(password=PASSWORD))
        self.assertEqual(target.snapshot(), before)

    def test_export_before_setup_is_refused(self) -> None:
        """Nothing to export before setup: IllegalTransition."""
        box = Box(self)
        self.failureResultOf(box.service.run_export("control"), IllegalTransition)
        self.failureResultOf(box.service.run_export("weird"), InvalidCommand)

    def test_symlinks_are_refused(self) -> None:
        """A symlink inside a volume tree makes the export fail; the state is restored."""
        box = Box(self)
        box.populate()
        mount = Path(box.result(box.service.volumes.attach("app-x")))  # type: ignore[union-attr]
        os.symlink("/etc/passwd", mount / "link")
        failure = self.failureResultOf(box.service.run_export("full"), StoreError)
        self.assertIn("symlink", failure.value.detail)
        self.assertIs(box.service.state, LockState.UNLOCKED)
        box.bus.flush()
        (result,) = box.bus.events(ExportResult.topic)
        assert isinstance(result, ExportResult)
        self.assertFalse(result.ok)
        self.flushLoggedErrors()


class ImportFaultTests(SynchronousTestCase):
    def setUp(self) -> None:
        source = Box(self, volumes=False)
        source.populate()
        self.bundle = Path(source.result(source.service.run_export("control")).path)
        self.target = Box(self, volumes=False)

    def rewrite(self, members: list[tuple[str, bytes | None]]) -> Path:
        """A bundle of ``members`` (``None`` data: a directory)."""
        path = self.bundle.with_name("edited.tar")
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                if data is None:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return path

    def members(self) -> list[tuple[str, bytes | None]]:
        out: list[tuple[str, bytes | None]] = []
        with tarfile.open(self.bundle) as tar:
            for member in tar:
                handle = tar.extractfile(member) if member.isfile() else None
                out.append((member.name, None if handle is None else handle.read()))
        return out

    def assert_refused(self, bundle: Path, error: type[Exception], text: str) -> None:
        before = sorted(str(p) for p in self.target.state_dir.rglob("*"))
        failure = self.failureResultOf(self.target.service.import_bundle(str(bundle)), error)
        self.assertIn(text, str(failure.value))
        self.assertEqual(sorted(str(p) for p in self.target.state_dir.rglob("*")), before)
        self.assertIs(self.target.service.state, LockState.UNINITIALIZED)

    def test_tampered_file_is_a_checksum_mismatch(self) -> None:
        """A changed byte in a file fails the import; nothing is put in place."""
        members = self.members()
        index = next(i for i, (n, d) in enumerate(members) if d and n.endswith("control.db"))
        name, data = members[index]
        assert data is not None
        members[index] = (name, data[:100] + bytes([data[100] ^ 1]) + data[101:])
        self.assert_refused(self.rewrite(members), BundleInvalid, "checksum mismatch")

    def test_corrupt_manifest(self) -> None:
        """A manifest that is not JSON, or not ours, fails the import."""
        members = self.members()
        self.assert_refused(
            self.rewrite([("manifest.json", b"{oops"), *members[1:]]), BundleInvalid, "JSON"
        )
        manifest = json.loads(members[0][1])
        manifest["version"] = 7
        self.assert_refused(
            self.rewrite([("manifest.json", json.dumps(manifest).encode()), *members[1:]]),
            BundleInvalid,
            "version",
        )

    def test_unlisted_missing_and_unsafe_members(self) -> None:
        """Extra, missing and path-escaping members all fail the import."""
        members = self.members()
        self.assert_refused(
            self.rewrite([*members, ("persistence/extra", b"x")]), BundleInvalid, "not in the"
        )
        self.assert_refused(self.rewrite(members[:-1]), BundleInvalid, "lacks")
        self.assert_refused(
            self.rewrite([*members, ("../evil", b"x")]), BundleInvalid, "safe relative path"
        )
        self.assertFalse((self.target.state_dir.parent / "evil").exists())

    def test_truncated_and_garbage_bundles(self) -> None:
        """A cut-off or non-tar file fails the import with BundleInvalid."""
        data = self.bundle.read_bytes()
        cut = self.bundle.with_name("cut.tar")
        cut.write_bytes(data[: len(data) // 2])
        self.assert_refused(cut, BundleInvalid, "")
        junk = self.bundle.with_name("junk.tar")
        junk.write_bytes(b"not a tar at all" * 100)
        self.assert_refused(junk, BundleInvalid, "")

    def test_non_empty_target_is_refused(self) -> None:
        """Importing over an initialised box is refused and changes nothing."""
        self.target.result(self.target.service.setup("another password"))
        keyset = (self.target.state_dir / "persistence" / "keyset.json").read_bytes()
        self.failureResultOf(self.target.service.import_bundle(str(self.bundle)), IllegalTransition)
        self.assertEqual(
            (self.target.state_dir / "persistence" / "keyset.json").read_bytes(), keyset
        )

    def test_leftover_store_files_are_refused(self) -> None:
        """Storage files without a keyset still make the dir non-empty: Conflict."""
        (self.target.state_dir / "persistence" / "control").mkdir(parents=True)
        self.failureResultOf(self.target.service.import_bundle(str(self.bundle)), Conflict)

    def test_relative_path_is_invalid(self) -> None:
        """The bundle path must be absolute."""
        self.failureResultOf(self.target.service.import_bundle("bundle.tar"), InvalidCommand)
