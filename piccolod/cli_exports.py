"""
``piccolodctl export`` and ``piccolodctl exports``: backups off the box.

::

    piccolodctl export [--full] [--output FILE|DIR]
    piccolodctl exports [list]
    piccolodctl exports download KIND NAME [--output FILE|DIR]
    piccolodctl exports delete KIND NAME
    piccolodctl restore FILE

``export`` writes a bundle on the box (``POST /api/v1/exports/{kind}``: the
storage is quiesced for it) and, with ``--output``, downloads it.  A
download (``GET /api/v1/exports/{kind}/{name}``, admin only) streams into
``.<name>.part`` next to the target, is checked (size, the sha256 the
export answered, and the bundle's own manifest: every file's size and
sha256), then renamed into place with mode 0600; a bundle that fails a
check is removed and the command fails.  An existing file is never
overwritten.

``restore`` puts a bundle onto a fresh box (storage not set up yet): it
checks the bundle here first (its manifest), then sends it in chunks
(``POST /api/v1/storage/restore``, ``PUT …/{upload}?offset=N``, ``POST
…/finish``), resuming from what the box says it has after a lost answer.
The box checks it again and imports it; storage is then locked, and the
bundle's admin password logs in (and unlocks).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.python import usage

__all__ = [
    "ExportOptions",
    "ExportsOptions",
    "RestoreOptions",
    "download",
    "run_export",
    "run_exports",
    "run_restore",
]


class ExportOptions(usage.Options):
    synopsis = "piccolodctl export [--full] [--output FILE|DIR]"
    optFlags = [["full", "f", "Every volume too (default: the keyset and control store)."]]
    optParameters = [
        ["output", "o", None, "Download the bundle to FILE (or into DIR), checked."],
    ]


class _Bundle(usage.Options):
    def parseArgs(self, kind: str, name: str) -> None:  # type: ignore[override]
        if kind not in ("control", "full"):
            raise usage.UsageError("KIND is control or full")
        self["kind"], self["name"] = kind, name


class _Download(_Bundle):
    optParameters = [["output", "o", ".", "FILE, or DIR to put it in (default: here)."]]

    def parseOptions(self, options: list[str] | None = None) -> None:
        # getopt stops at the first argument: let -o/--output follow KIND NAME too.
        if options is not None:
            front: list[str] = []
            rest: list[str] = []
            items = iter(options)
            for item in items:
                if item in ("-o", "--output"):
                    front += [item, next(items, "")]
                elif item.startswith("--output=") or (item.startswith("-o") and item != "-o"):
                    front.append(item)
                else:
                    rest.append(item)
            options = front + rest
        super().parseOptions(options)  # type: ignore[no-untyped-call]


class ExportsOptions(usage.Options):
    synopsis = "piccolodctl exports [list | download KIND NAME | delete KIND NAME]"
    subCommands = [
        ["list", None, usage.Options, "The bundles on the box, newest first."],
        ["download", None, _Download, "Download one bundle (checked)."],
        ["delete", None, _Bundle, "Delete one bundle from the box."],
    ]
    defaultSubCommand = "list"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_exports(body: dict[str, Any]) -> str:
    import time

    rows = [f"{'KIND':<8} {'SIZE':>10}  {'CREATED (UTC)':<20} NAME"]
    for e in body.get("exports", []):
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["created_at"]))
        rows.append(f"{e['kind']:<8} {_size(e['size']):>10}  {created:<20} {e['name']}")
    keep = body.get("keep", 0)
    rows.append(f"(keeping the newest {keep} of each kind)" if keep else "(keeping every bundle)")
    return "\n".join(rows)


def _target(output: str, name: str) -> Path:
    path = Path(output).expanduser()
    if path.is_dir():
        path = path / name
    if path.exists() or path.is_symlink():
        from piccolod.cli import UsageFailure

        raise UsageFailure(f"{path} exists; not overwriting it")
    return path


async def _answer(client: Any, response: Any) -> dict[str, Any]:
    """A raw request's JSON answer (or problem) as a dict; other text as its ``detail``."""
    raw = await client.treq.content(response)
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        return {"detail": raw.decode("utf-8", "replace")}
    return body if isinstance(body, dict) else {"detail": str(body)}


async def download(
    client: Any, kind: str, name: str, output: str, sha256: str | None = None
) -> tuple[Path, str, int, int]:
    """
    Download bundle ``kind``/``name`` to ``output`` (a file, or a directory
    to put it in) and check it; returns (path, sha256, size, files).
    """
    from piccolod.cli import ApiError, UsageFailure
    from piccolod.persistence.exports import BundleInvalid, verify_bundle

    target = _target(output, name)
    url = f"{client.base}/api/v1/exports/{quote(kind, safe='')}/{quote(name, safe='')}"
    headers = client.headers("GET", {"accept": "application/x-tar"})
    response = await client.treq.request("GET", url, headers=headers, unbuffered=True)
    if response.code >= 400:
        raise ApiError(response.code, await _answer(client, response))
    part = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:

            def write(chunk: bytes) -> None:
                nonlocal size
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)

            await client.treq.collect(response, write)
            f.flush()
            os.fsync(f.fileno())
        got = digest.hexdigest()
        if sha256 is not None and got != sha256:
            raise UsageFailure(f"the download's sha256 {got} is not the export's {sha256}")
        try:
            manifest = verify_bundle(part)
        except BundleInvalid as e:
            raise UsageFailure(f"the downloaded bundle is damaged: {e.detail}") from None
        os.link(part, target)  # never over an existing file
    finally:
        part.unlink(missing_ok=True)
    files = sum(1 for entry in manifest["files"] if entry["type"] == "file")
    return target, got, size, files


async def run_export(client: Any, sub: Any) -> tuple[str, Any]:
    kind = "full" if sub["full"] else "control"
    if sub["output"] is not None:
        _target(sub["output"], f"piccolod-{kind}.tar")  # refuse early, before the export
    _, body, _ = await client.request("POST", f"/api/v1/exports/{kind}")
    text = (
        f"wrote {kind} export {body['name']} on the box "
        f"({_size(body['size'])}, {body['files']} files, sha256 {body['sha256']})"
    )
    if body.get("pruned"):
        text += f"\nremoved {len(body['pruned'])} older {kind} export(s) from the box"
    if sub["output"] is not None:
        path, _, size, files = await download(
            client, kind, body["name"], sub["output"], body["sha256"]
        )
        text += f"\ndownloaded to {path} ({_size(size)}; sha256 and {files} files checked)"
        body = {**body, "downloaded_to": str(path)}
    return text, body


async def run_exports(client: Any, sub: Any) -> tuple[str, Any]:
    action, args = sub.subCommand, sub.subOptions
    if action == "download":
        path, sha256, size, files = await download(
            client, args["kind"], args["name"], args["output"]
        )
        body = {"path": str(path), "sha256": sha256, "size": size, "files": files}
        return f"downloaded to {path} ({_size(size)}; {files} files checked)", body
    if action == "delete":
        kind, name = quote(args["kind"], safe=""), quote(args["name"], safe="")
        _, body, _ = await client.request("DELETE", f"/api/v1/exports/{kind}/{name}")
        return f"deleted {body['deleted']['kind']} export {body['deleted']['name']}", body
    _, body, _ = await client.request("GET", "/api/v1/exports")
    return format_exports(body), body


class RestoreOptions(usage.Options):
    synopsis = "piccolodctl restore FILE"

    def parseArgs(self, path: str) -> None:  # type: ignore[override]
        self["file"] = path


async def run_restore(client: Any, sub: Any) -> tuple[str, Any]:
    """Upload and restore a bundle onto a fresh box (see the module docstring)."""
    from piccolod.cli import ApiError, UsageFailure
    from piccolod.persistence.exports import BundleInvalid, verify_bundle

    path = Path(sub["file"]).expanduser()
    try:
        manifest = verify_bundle(path)
    except FileNotFoundError:
        raise UsageFailure(f"{path}: no such file") from None
    except BundleInvalid as e:
        raise UsageFailure(f"{path} is not a bundle that can be restored: {e.detail}") from None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    size = path.stat().st_size
    _, opened, _ = await client.request(
        "POST", "/api/v1/storage/restore", {"size": size, "sha256": digest.hexdigest()}
    )
    upload, chunk_size = opened["upload"], int(opened["chunk_size"])
    base = f"{client.base}/api/v1/storage/restore/{upload}"
    offset = 0
    with path.open("rb") as f:
        while offset < size:
            f.seek(offset)
            data = f.read(chunk_size)
            headers = client.headers("PUT", {"content-type": "application/octet-stream"})
            response = await client.treq.request(
                "PUT", f"{base}?offset={offset}", headers=headers, data=data
            )
            body = await _answer(client, response)
            if response.code == 409 and isinstance(body.get("received"), int):
                offset = body["received"]  # resume from what the box has
                continue
            if response.code >= 400:
                raise ApiError(response.code, body)
            offset = int(body["received"])
    _, done, _ = await client.request("POST", f"/api/v1/storage/restore/{upload}/finish")
    files = sum(1 for entry in manifest["files"] if entry["type"] == "file")
    text = (
        f"restored a {done['kind']} bundle ({done['files']} of {files} files); storage is "
        f"{done['state']}: log in with the bundle's admin password (piccolodctl login)"
    )
    return text, done

