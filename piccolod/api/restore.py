"""
Restore a fresh box from an export bundle over the API, in chunks.

A box that has just been installed has no admin and no API token, so the
restore routes are **public**, like first-run setup, and like it they work
only while storage is ``uninitialized`` (409 afterwards):

1. ``POST /api/v1/storage/restore`` ``{"size", "sha256"?}`` opens an upload
   (201 ``{"upload", "chunk_size", "expires_in"}``).  ``upload`` is a
   random 256-bit capability: every later call names it, and it is compared
   in constant time.  One upload at a time (409 while another is alive);
   ``size`` must fit on the disk with room to spare (413).
2. ``PUT /api/v1/storage/restore/{upload}?offset=N`` with
   ``application/octet-stream`` bodies of at most ``chunk_size`` bytes
   (the API's ``max_body``), in order: ``offset`` must be what has been
   received so far (409 with ``received`` otherwise, so a client resumes
   after a lost answer); ``GET`` answers ``{"received", "size"}``.
3. ``POST /api/v1/storage/restore/{upload}/finish`` checks the size and
   the sha256 (when one was announced: a browser on plain HTTP off
   localhost has no Web Crypto to compute it), then runs
   ``persistence.import`` on the file (which checks every file against the
   bundle's manifest and writes nothing unless all is well) and removes it.
   Storage is then ``locked``: log in with the bundle's admin password.

``DELETE /api/v1/storage/restore/{upload}`` abandons an upload; one left
idle for ``idle_timeout`` seconds is abandoned by itself.  The file
lives in ``<state_dir>/restore/`` (on the state dir's own disk: a Pi's
``/tmp`` may be RAM) and is removed in every outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall
from twisted.web.server import Request

from piccolod.commands import ImportBundle
from piccolod.errors import Conflict, InvalidCommand, NotFound, TooLarge

from .http import JSONResponse, Router
from .routes import SYSTEM, APIContext

__all__ = ["RestoreUploads", "restore_routes"]

#: Room left on the disk besides the upload (the import needs as much again).
SPARE_BYTES = 64 * 1024 * 1024
SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
UPLOAD_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$"}


@attrs.define(eq=False)
class _Upload:
    id: str
    path: Path
    size: int
    sha256: str | None
    digest: Any = attrs.field(factory=hashlib.sha256)
    received: int = 0
    timer: IDelayedCall | None = None


@attrs.define(eq=False)
class RestoreUploads:
    """The one restore upload in progress (see the module docstring)."""

    directory: Path
    clock: Any
    idle_timeout: float = 600.0
    _current: _Upload | None = attrs.field(init=False, default=None)

    def open(self, size: int, sha256: str | None) -> _Upload:
        if self._current is not None:
            raise Conflict("another restore upload is in progress; finish or delete it first")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        if size * 2 + SPARE_BYTES > free:
            raise TooLarge(
                f"the bundle ({size} bytes) and its import need more than the "
                f"{free} bytes free on the state directory's disk"
            )
        path = self.directory / f".upload-{secrets.token_hex(8)}.tar"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        upload = _Upload(secrets.token_urlsafe(32), path, size, sha256)
        self._current = upload
        self._touch(upload)
        return upload

    def get(self, upload_id: str) -> _Upload:
        current = self._current
        if current is None or not hmac.compare_digest(current.id, upload_id):
            raise NotFound("no such restore upload (finished, deleted or expired?)")
        return current

    def append(self, upload_id: str, offset: int, data: bytes) -> _Upload:
        upload = self.get(upload_id)
        if offset != upload.received:
            raise Conflict(
                f"the upload has {upload.received} bytes; send from offset {upload.received}",
                received=upload.received,
            )
        if upload.received + len(data) > upload.size:
            raise InvalidCommand(f"more than the {upload.size} bytes announced")
        with upload.path.open("ab") as f:
            f.write(data)
        upload.digest.update(data)
        upload.received += len(data)
        self._touch(upload)
        return upload

    def complete(self, upload_id: str) -> _Upload:
        """The upload, checked whole (size and sha256), detached from this registry."""
        upload = self.get(upload_id)
        if upload.received != upload.size:
            raise Conflict(
                f"the upload has {upload.received} of {upload.size} bytes",
                received=upload.received,
            )
        if upload.sha256 is not None and upload.digest.hexdigest() != upload.sha256:
            self.discard(upload_id)
            raise InvalidCommand("the upload's sha256 is not the one announced; it was discarded")
        with upload.path.open("rb+") as f:
            os.fsync(f.fileno())
        self._forget(upload)
        return upload

    def discard(self, upload_id: str) -> None:
        upload = self.get(upload_id)
        self._forget(upload)
        upload.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._current is not None:
            self.discard(self._current.id)

    def sweep(self) -> int:
        """Remove uploads a killed daemon left behind; returns how many."""
        removed = 0
        for stale in self.directory.glob(".upload-*.tar"):
            if self._current is None or stale != self._current.path:
                stale.unlink(missing_ok=True)
                removed += 1
        return removed

    def _forget(self, upload: _Upload) -> None:
        if upload.timer is not None and upload.timer.active():
            upload.timer.cancel()
        upload.timer = None
        if self._current is upload:
            self._current = None

    def _touch(self, upload: _Upload) -> None:
        if upload.timer is not None and upload.timer.active():
            upload.timer.cancel()
        upload.timer = self.clock.callLater(self.idle_timeout, self._expire, upload)

    def _expire(self, upload: _Upload) -> None:
        upload.timer = None
        if self._current is upload:
            self._current = None
            upload.path.unlink(missing_ok=True)


def restore_routes(
    router: Router, api: APIContext, uploads: RestoreUploads, chunk_size: int
) -> None:
    """Add the restore routes (see the module docstring) to ``router``."""
    tags = ("storage",)

    async def fresh(request: Request) -> None:
        if (await api.status(request)).get("initialized"):
            raise Conflict("storage is set up already: a restore needs a fresh box")

    progress = {
        "type": "object",
        "required": ["upload", "received", "size"],
        "properties": {
            "upload": UPLOAD_ID,
            "received": {"type": "integer", "minimum": 0},
            "size": {"type": "integer", "minimum": 1},
        },
    }

    @router.route(
        "POST",
        "/api/v1/storage/restore",
        "restore_open",
        public=True,
        body={
            "type": "object",
            "required": ["size"],
            "properties": {
                "size": {"type": "integer", "minimum": 1, "maximum": 1 << 50},
                "sha256": SHA256,
            },
            "additionalProperties": False,
        },
        responses={
            201: (
                "application/json",
                {
                    "type": "object",
                    "required": ["upload", "chunk_size", "expires_in"],
                    "properties": {
                        "upload": UPLOAD_ID,
                        "chunk_size": {"type": "integer", "minimum": 1},
                        "expires_in": {"type": "number"},
                    },
                },
            )
        },
        errors=(409, 413, 503, 504),
        summary="Start restoring a fresh box from an export bundle (public while uninitialized)",
        tags=tags,
    )
    async def open_upload(request: Request, body: dict[str, Any]) -> Any:
        await fresh(request)
        upload = uploads.open(body["size"], body.get("sha256"))
        return JSONResponse(
            {
                "upload": upload.id,
                "chunk_size": chunk_size,
                "expires_in": uploads.idle_timeout,
            },
            status=201,
        )

    @router.route(
        "GET",
        "/api/v1/storage/restore/{upload}",
        "restore_progress",
        public=True,
        params={"upload": UPLOAD_ID},
        responses={200: ("application/json", progress)},
        errors=(404,),
        summary="How much of a restore upload has arrived",
        tags=tags,
    )
    def show(request: Request, upload: str) -> Any:
        found = uploads.get(upload)
        return {"upload": found.id, "received": found.received, "size": found.size}

    @router.route(
        "PUT",
        "/api/v1/storage/restore/{upload}",
        "restore_chunk",
        public=True,
        params={"upload": UPLOAD_ID},
        query={"offset": {"type": "integer", "minimum": 0}},
        content={"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        responses={200: ("application/json", progress)},
        errors=(400, 404, 409, 413),
        summary="Send the next chunk of a restore upload (at most chunk_size bytes)",
        tags=tags,
    )
    def chunk(request: Request, upload: str, query: dict[str, Any]) -> Any:
        data = request.content.read() if request.content is not None else b""
        found = uploads.append(upload, int(query.get("offset", 0)), data)
        return {"upload": found.id, "received": found.received, "size": found.size}

    @router.route(
        "POST",
        "/api/v1/storage/restore/{upload}/finish",
        "restore_finish",
        public=True,
        params={"upload": UPLOAD_ID},
        responses={
            200: (
                "application/json",
                {
                    "type": "object",
                    "required": ["kind", "files", "state"],
                    "properties": {
                        "kind": {"type": "string"},
                        "files": {"type": "integer"},
                        "state": {"type": "string"},
                    },
                },
            )
        },
        errors=(400, 404, 409, 503, 504),
        summary="Check the upload and restore it; storage is then locked",
        tags=tags,
    )
    async def finish(request: Request, upload: str) -> Any:
        await fresh(request)
        done = uploads.complete(upload)
        try:
            imported = await api.dispatch(
                request, ImportBundle(path=str(done.path)), subject=SYSTEM
            )
        finally:
            done.path.unlink(missing_ok=True)
        answer = imported.to_json()
        return {
            "kind": answer.get("kind"),
            "files": answer.get("files"),
            "state": (await api.status(request)).get("state"),
        }

    @router.route(
        "DELETE",
        "/api/v1/storage/restore/{upload}",
        "restore_abandon",
        public=True,
        params={"upload": UPLOAD_ID},
        responses={200: ("application/json", {"type": "object"})},
        errors=(404,),
        summary="Abandon a restore upload",
        tags=tags,
    )
    def abandon(request: Request, upload: str) -> Any:
        uploads.discard(upload)
        return {"abandoned": True}
