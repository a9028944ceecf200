"""Restoring a fresh box over the API, in chunks (piccolod.api.restore)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from piccolod.events import LockState

from .api_support import PASSWORD, APIHarness, Response

OCTETS = {"content-type": "application/octet-stream"}


class RestoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        # The box that is backed up: set up, a setting written, a control export taken.
        self.source = APIHarness(self)
        admin, _ = self.source.set_up()
        set_ = admin.post("/api/v1/commands/store.settings.set", {"key": "motto", "value": "kept"})
        self.assertEqual(set_.code, 200, set_)
        done = admin.post("/api/v1/exports/control")
        self.assertEqual(done.code, 200, done)
        self.bundle = Path(done.body["path"]).read_bytes()
        self.sha256 = hashlib.sha256(self.bundle).hexdigest()
        # The fresh box it is restored onto, with small chunks.
        self.box = APIHarness(self, max_body=4096)
        self.anon = self.box.client()

    def open(self, size: int | None = None, sha256: str | None = None) -> Response:
        body = {"size": len(self.bundle) if size is None else size, "sha256": sha256 or self.sha256}
        return self.anon.post("/api/v1/storage/restore", body)

    def put(self, upload: str, offset: int, data: bytes) -> Response:
        return self.anon.request(
            "PUT", f"/api/v1/storage/restore/{upload}?offset={offset}", raw=data, headers=OCTETS
        )

    def send_all(self, upload: str, chunk: int, start: int = 0) -> None:
        for offset in range(start, len(self.bundle), chunk):
            sent = self.put(upload, offset, self.bundle[offset : offset + chunk])
            self.assertEqual(sent.code, 200, sent)
            self.assertEqual(sent.body["received"], min(len(self.bundle), offset + chunk))

    def uploads_on_disk(self) -> list[Path]:
        return list((self.box.state_dir / "restore").glob(".upload-*"))

    def test_a_fresh_box_is_restored_and_the_bundle_password_logs_in(self) -> None:
        """Open, send in order (a resent chunk is told where to go on), finish, log in."""
        opened = self.open()
        self.assertEqual(opened.code, 201, opened)
        upload, chunk = opened.body["upload"], opened.body["chunk_size"]
        self.assertEqual(chunk, 4096)
        first = self.put(upload, 0, self.bundle[:chunk])
        self.assertEqual(first.body["received"], chunk)
        again = self.put(upload, 0, self.bundle[:chunk])  # its answer was lost: resent
        self.assertEqual((again.code, again.body["received"]), (409, chunk))
        self.send_all(upload, chunk, start=again.body["received"])
        progress = self.anon.get(f"/api/v1/storage/restore/{upload}")
        self.assertEqual(progress.body["received"], len(self.bundle))
        done = self.anon.post(f"/api/v1/storage/restore/{upload}/finish")
        self.assertEqual(done.code, 200, done)
        self.assertEqual((done.body["kind"], done.body["state"]), ("control", "locked"))
        self.assertEqual(self.uploads_on_disk(), [])
        self.assertIs(self.box.persistence.state, LockState.LOCKED)
        login = self.anon.post("/api/v1/auth/login", {"password": PASSWORD})
        self.assertEqual((login.code, login.body["state"]), (200, "unlocked"))
        got = self.anon.post("/api/v1/commands/store.settings.get", {"key": "motto"})
        self.assertEqual(got.body["result"]["value"], "kept")
        # Set up now: no second restore.
        self.assertEqual(self.open().code, 409)
        self.assertEqual(self.anon.get(f"/api/v1/storage/restore/{upload}").code, 404)

    def test_only_a_fresh_box_and_one_upload_at_a_time(self) -> None:
        """A set-up box refuses; a second upload waits for the first; a bad id is 404."""
        set_up = self.source.client().post(
            "/api/v1/storage/restore", {"size": 10, "sha256": self.sha256}
        )
        self.assertEqual((set_up.code, set_up.type), (409, "conflict"))
        upload = self.open().body["upload"]
        self.assertEqual(self.open().code, 409)
        other = "A" * 43
        self.assertEqual(self.put(other, 0, b"x").code, 404)
        self.assertEqual(self.anon.post(f"/api/v1/storage/restore/{other}/finish").code, 404)
        self.assertEqual(self.anon.delete(f"/api/v1/storage/restore/{upload}").code, 200)
        self.assertEqual(self.uploads_on_disk(), [])
        self.assertEqual(self.open().code, 201)

    def test_bad_input_is_refused_and_nothing_is_kept(self) -> None:
        """Too big for the disk, too many bytes, early finish, wrong sha256, bad ids."""
        self.assertEqual(self.open(size=1 << 49).code, 413)
        self.assertEqual(self.open(sha256="not a digest").code, 400)
        self.assertEqual(self.anon.get("/api/v1/storage/restore/..%2F..%2Fetc").code, 400)
        upload = self.open(size=10).body["upload"]
        self.assertEqual(self.put(upload, 0, b"x" * 11).code, 400)
        self.assertEqual(self.put(upload, 0, b"x" * 4).code, 200)
        early = self.anon.post(f"/api/v1/storage/restore/{upload}/finish")
        self.assertEqual((early.code, early.body["received"]), (409, 4))
        self.assertEqual(self.put(upload, 4, b"y" * 6).code, 200)
        wrong = self.anon.post(f"/api/v1/storage/restore/{upload}/finish")
        self.assertEqual((wrong.code, wrong.type), (400, "invalid"))
        self.assertIn("sha256", wrong.body["detail"])
        self.assertEqual(self.anon.get(f"/api/v1/storage/restore/{upload}").code, 404)
        self.assertEqual(self.uploads_on_disk(), [])
        self.assertIs(self.box.persistence.state, LockState.UNINITIALIZED)

    def test_without_a_sha256_the_manifest_still_guards(self) -> None:
        """A browser without Web Crypto announces no sha256: a damaged bundle is still refused."""
        damaged = bytearray(self.bundle)
        damaged[-20000] ^= 0xFF
        opened = self.anon.post("/api/v1/storage/restore", {"size": len(damaged)}).body
        self.bundle = bytes(damaged)
        self.send_all(opened["upload"], opened["chunk_size"])
        done = self.anon.post(f"/api/v1/storage/restore/{opened['upload']}/finish")
        self.assertEqual((done.code, done.type), (400, "bundle-invalid"), done)
        self.bundle = (
            bytes(damaged[:-20000]) + bytes([damaged[-20000] ^ 0xFF]) + bytes(damaged[-19999:])
        )
        opened = self.anon.post("/api/v1/storage/restore", {"size": len(self.bundle)}).body
        self.send_all(opened["upload"], opened["chunk_size"])
        done = self.anon.post(f"/api/v1/storage/restore/{opened['upload']}/finish")
        self.assertEqual((done.code, done.body["state"]), (200, "locked"), done)

    def test_a_tampered_bundle_is_refused_by_the_import(self) -> None:
        """Right size and sha256 of a damaged bundle: the manifest check refuses it, 400."""
        damaged = bytearray(self.bundle)
        damaged[-20000] ^= 0xFF
        self.bundle = bytes(damaged)
        self.sha256 = hashlib.sha256(self.bundle).hexdigest()
        opened = self.open().body
        self.send_all(opened["upload"], opened["chunk_size"])
        done = self.anon.post(f"/api/v1/storage/restore/{opened['upload']}/finish")
        self.assertEqual((done.code, done.type), (400, "bundle-invalid"), done)
        self.assertEqual(self.uploads_on_disk(), [])
        self.assertIs(self.box.persistence.state, LockState.UNINITIALIZED)
        self.assertFalse((self.box.state_dir / "persistence" / "keyset.json").exists())

    def test_an_idle_upload_expires_and_stale_files_are_swept(self) -> None:
        """An upload left alone for idle_timeout is gone; a killed daemon's file goes at start."""
        upload = self.open().body["upload"]
        self.put(upload, 0, self.bundle[:100])
        self.box.advance(599)
        self.assertEqual(self.put(upload, 100, self.bundle[100:200]).code, 200)  # kept alive
        self.box.advance(600)
        self.assertEqual(self.put(upload, 200, b"x").code, 404)
        self.assertEqual(self.uploads_on_disk(), [])
        stale = self.box.state_dir / "restore" / ".upload-0123456789abcdef.tar"
        stale.write_bytes(b"left by kill -9")
        uploads: Any = self.box.service.uploads
        self.assertEqual(uploads.sweep(), 1)
        self.assertFalse(stale.exists())
