"""
The persistence commands other subsystems use: the control-store commands
of the apps and services subsystems, password verification for the API's
login, and volume deletion.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import (
    AttachVolume,
    DeleteVolume,
    EnsureVolume,
    StoreDeleteApp,
    StoreDeleteSetting,
    StoreGetApp,
    StoreGetSetting,
    StoreListApps,
    StoreListSettings,
    StorePutApp,
    StoreSetSetting,
    VerifyPassword,
)
from piccolod.errors import IllegalTransition, Locked, NotFound, RateLimited
from piccolod.events import LockState, VolumeStateChanged
from piccolod.persistence.errors import WrongPassword
from tests.unit.test_persistence_exports import PASSWORD, Box


class StoreCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.box = Box(self)
        self.box.result(self.box.service.setup(PASSWORD))
        self.box.result(self.box.service.unlock(password=PASSWORD))
        self.dispatch = self.box.dispatcher.dispatch

    def test_apps_round_trip_with_generations(self) -> None:
        """Apps are put, read, listed and deleted; a changed spec bumps the generation."""
        first = self.box.result(self.dispatch(StorePutApp("web", {"image": "busybox"})))
        self.assertEqual((first.name, first.generation), ("web", 1))
        same = self.box.result(self.dispatch(StorePutApp("web", {"image": "busybox"})))
        self.assertEqual(same.generation, 1)
        changed = self.box.result(self.dispatch(StorePutApp("web", {"image": "nginx"})))
        self.assertEqual(changed.generation, 2)
        got = self.box.result(self.dispatch(StoreGetApp("web")))
        self.assertEqual(got.spec, {"image": "nginx"})
        self.box.result(self.dispatch(StorePutApp("db", {"image": "pg"}, enabled=False)))
        listed = self.box.result(self.dispatch(StoreListApps()))
        self.assertEqual(
            sorted((a.name, a.enabled) for a in listed.apps), [("db", False), ("web", True)]
        )
        json.dumps(listed.to_json())
        self.box.result(self.dispatch(StoreDeleteApp("web")))
        self.box.case.failureResultOf(self.dispatch(StoreGetApp("web")), NotFound)
        revision = self.box.service.info().revision
        self.box.result(self.dispatch(StoreDeleteApp("web")))  # idempotent: safe to retry
        self.assertEqual(self.box.service.info().revision, revision)

    def test_settings(self) -> None:
        """Settings are set, read, listed by prefix and deleted idempotently."""
        self.box.result(self.dispatch(StoreSetSetting("ports/web/http", {"host": 15000})))
        self.box.result(self.dispatch(StoreSetSetting("ports/db/pg", {"host": 15001})))
        self.box.result(self.dispatch(StoreSetSetting("theme", "dark")))
        got = self.box.result(self.dispatch(StoreGetSetting("ports/web/http")))
        self.assertEqual(got.value, {"host": 15000})
        listed = self.box.result(self.dispatch(StoreListSettings("ports/")))
        self.assertEqual(sorted(listed.items), ["ports/db/pg", "ports/web/http"])
        self.box.result(self.dispatch(StoreDeleteSetting("theme")))
        self.box.result(self.dispatch(StoreDeleteSetting("theme")))
        self.box.case.failureResultOf(self.dispatch(StoreGetSetting("theme")), NotFound)

    def test_locked_storage_refuses_store_commands(self) -> None:
        """Every store command answers Locked while storage is locked; nothing is written."""
        self.box.result(self.dispatch(StorePutApp("web", {"image": "busybox"})))
        self.box.result(self.box.service.lock())
        for command in (StoreListApps(), StorePutApp("x", {}), StoreSetSetting("k", 1)):
            self.box.case.failureResultOf(self.dispatch(command), Locked)
        self.box.result(self.box.service.unlock(password=PASSWORD))
        listed = self.box.result(self.dispatch(StoreListApps()))
        self.assertEqual([a.name for a in listed.apps], ["web"])


class VerifyPasswordTests(SynchronousTestCase):
    def test_right_and_wrong_passwords(self) -> None:
        """The right password verifies, changing nothing; a wrong one is refused and delays."""
        box = Box(self)
        self.failureResultOf(
            box.dispatcher.dispatch(VerifyPassword(password=PASSWORD)), IllegalTransition
        )
        box.result(box.service.setup(PASSWORD))
        box.result(box.service.unlock(password=PASSWORD))
        status = box.result(box.dispatcher.dispatch(VerifyPassword(password=PASSWORD)))
        self.assertEqual(status.state, "unlocked")
        self.failureResultOf(
            box.dispatcher.dispatch(VerifyPassword(password="not the password")), WrongPassword
        )
        # During the delay even the right password is refused.
        self.failureResultOf(
            box.dispatcher.dispatch(VerifyPassword(password=PASSWORD)), RateLimited
        )
        box.clock.advance(61)
        box.result(box.dispatcher.dispatch(VerifyPassword(password=PASSWORD)))
        self.assertIs(box.service.state, LockState.UNLOCKED)


class DeleteVolumeTests(SynchronousTestCase):
    def test_delete_removes_data_journal_and_key(self) -> None:
        """A deleted volume leaves no ciphertext, journal or passphrase; deleting again is fine."""
        box = Box(self)
        box.result(box.service.setup(PASSWORD))
        box.result(box.service.unlock(password=PASSWORD))
        box.result(box.dispatcher.dispatch(EnsureVolume("app-web")))
        attached = box.result(box.dispatcher.dispatch(AttachVolume("app-web")))
        assert attached.path is not None
        with open(f"{attached.path}/data.txt", "w") as f:
            f.write("hello")
        layout_root = box.state_dir / "volumes"
        self.assertTrue((layout_root / "ciphertext" / "app-web").exists())
        box.result(box.dispatcher.dispatch(DeleteVolume("app-web")))
        self.assertFalse((layout_root / "ciphertext" / "app-web").exists())
        self.assertFalse((layout_root / "journal" / "app-web.json").exists())
        keys = (box.state_dir / "persistence" / "volume-keys.json").read_text()
        self.assertNotIn("app-web", keys)
        box.result(box.dispatcher.dispatch(DeleteVolume("app-web")))
        deleted = [
            e
            for e in box.bus.events("persistence.volume_state")
            if isinstance(e, VolumeStateChanged) and e.state == "deleted"
        ]
        self.assertEqual(len(deleted), 2)


class RemoteRecordTests(SynchronousTestCase):
    def test_remote_record_round_trip(self) -> None:
        """The remote record is saved, loaded and cleared; loading none is NotFound."""
        from piccolod.commands import StoreClearRemote, StoreLoadRemote, StoreSaveRemote

        box = Box(self)
        box.result(box.service.setup(PASSWORD))
        box.result(box.service.unlock(password=PASSWORD))
        self.failureResultOf(box.dispatcher.dispatch(StoreLoadRemote()), NotFound)
        saved = box.result(box.dispatcher.dispatch(StoreSaveRemote({"enabled": True, "k": "s"})))
        self.assertEqual(saved.record, {"enabled": True, "k": "s"})
        loaded = box.result(box.dispatcher.dispatch(StoreLoadRemote()))
        self.assertEqual(loaded.record, {"enabled": True, "k": "s"})
        self.assertNotIn("s", json.dumps(loaded.to_json()).replace("updated_at", ""))
        box.result(box.dispatcher.dispatch(StoreClearRemote()))
        box.result(box.dispatcher.dispatch(StoreClearRemote()))
        self.failureResultOf(box.dispatcher.dispatch(StoreLoadRemote()), NotFound)
        box.result(box.service.lock())
        self.failureResultOf(box.dispatcher.dispatch(StoreLoadRemote()), Locked)
