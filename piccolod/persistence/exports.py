"""
Export bundles and their import: ciphertext only, with a manifest.

A bundle is an uncompressed tar file (ciphertext does not compress) whose
first member is ``manifest.json``::

    {"format": "piccolod-export", "version": 1, "kind": "control" | "full",
     "created_at": 1.7e9, "keyset_id": "<32 hex>",
     "files": [{"path": "persistence/keyset.json", "type": "file", "size": 1234,
                "sha256": "<hex>", "mode": 384},
               {"path": "volumes/ciphertext/bootstrap/data", "type": "dir", "mode": 448},
               ...]}

followed by exactly the files and directories it lists (empty directories
matter to volume adapters), at those paths relative to the state dir.  What goes in:

- ``control``: ``persistence/keyset.json``, ``volume-keys.json``, the
  store marker, and the control store: the ``control`` volume's
  ciphertext tree and journal when volumes are in use, else
  ``persistence/control/``;
- ``full``: the same plus every volume's ciphertext tree and journal.

Everything in it is ciphertext or wrapped keys: SQLCipher pages, gocryptfs
ciphertext, AES-GCM wraps (the ``directory`` development adapter stores
volumes in plaintext, and so do its exports).  The files are collected
while storage is locked (the service quiesces first), so nothing changes
underneath.  Symlinks and special files are refused.

**Import** restores a bundle into a state dir that has no keyset and no
volumes.  Every check happens before anything is put in place: the tar
members must be regular files at safe relative paths, exactly the files
the manifest lists, each with its size and sha256; a bundle that fails is
:class:`BundleInvalid` and nothing is written outside a temp dir, which is
removed.  Then each top-level piece is renamed into place.

The manifest's checksums detect damage, not forgery: the authenticity of
the content rests on AES-GCM (keyset) and SQLCipher's page HMACs (store),
checked when the imported keyset is unlocked.

**On the box** bundles live in ``<state_dir>/exports/<kind>/`` under names
``piccolod-<kind>-<UTC stamp>-<6 hex>.tar``: :func:`list_bundles` lists
them, :func:`bundle_file` resolves one by kind and name (nothing else: a
name that does not have that exact form is ``NotFound``, so no path ever
comes from the caller), :func:`delete_bundle` removes one and
:func:`prune_bundles` keeps the newest few of a kind.

Blocking; the service runs these in a thread.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import attrs

from piccolod.commands import EXPORT_KINDS, EXPORT_NAME
from piccolod.errors import Conflict, InvalidCommand, NotFound
from piccolod.persistence.errors import StoreError
from piccolod.persistence.keyset import fsync_directory

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "KINDS",
    "BundleFile",
    "BundleInvalid",
    "ExportInfo",
    "ImportInfo",
    "bundle_file",
    "collect",
    "delete_bundle",
    "list_bundles",
    "prune_bundles",
    "restore_bundle",
    "verify_bundle",
    "write_bundle",
]

BUNDLE_FORMAT = "piccolod-export"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
#: The largest manifest accepted on import.
MAX_MANIFEST = 16 * 1024 * 1024
_CHUNK = 1024 * 1024

Progress = Callable[[float, str], None]

KINDS = EXPORT_KINDS
#: What a bundle written by :func:`write_bundle` is called; nothing else is served.
BUNDLE_NAME = re.compile(EXPORT_NAME)


class BundleInvalid(InvalidCommand):
    """
    A bundle cannot be imported: unreadable tar, corrupt or missing
    manifest, unknown format, unsafe or unlisted member, or a file whose
    size or sha256 differs from the manifest (tampered or damaged).
    """

    type = "bundle-invalid"
    title = "Invalid export bundle"


@attrs.frozen
class ExportInfo:
    """A written bundle: where, its sha256, size and file count."""

    kind: str
    path: str
    sha256: str
    size: int
    files: int
    created_at: float


@attrs.frozen
class ImportInfo:
    """A restored bundle."""

    kind: str
    path: str
    files: int
    keyset_id: str


@attrs.frozen
class BundleFile:
    """A bundle on the box: its kind and name, size and modification time."""

    kind: str
    name: str
    size: int
    created_at: float
    path: Path = attrs.field(eq=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "size": self.size,
            "created_at": self.created_at,
        }


def list_bundles(state_dir: Path, kind: str | None = None) -> list[BundleFile]:
    """The bundles of ``kind`` (or of every kind), newest first."""
    out: list[BundleFile] = []
    for k in KINDS if kind is None else (kind,):
        directory = state_dir / "exports" / k
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            match = BUNDLE_NAME.fullmatch(entry.name)
            if match is None or match.group(1) != k or not entry.is_file(follow_symlinks=False):
                continue
            info = entry.stat(follow_symlinks=False)
            out.append(BundleFile(k, entry.name, info.st_size, info.st_mtime, Path(entry.path)))
    # Newest first: by the name's UTC stamp, then by modification time.
    out.sort(key=lambda b: (b.name.split("-")[2], b.created_at, b.name), reverse=True)
    return out


def bundle_file(state_dir: Path, kind: str, name: str) -> BundleFile:
    """The bundle ``kind``/``name``; ``NotFound`` unless it is one of :func:`list_bundles`."""
    match = BUNDLE_NAME.fullmatch(name)
    if kind not in KINDS or match is None or match.group(1) != kind:
        raise NotFound(f"no {kind} export named {name!r}")
    for bundle in list_bundles(state_dir, kind):
        if bundle.name == name:
            return bundle
    raise NotFound(f"no {kind} export named {name!r}")


def delete_bundle(state_dir: Path, kind: str, name: str) -> BundleFile:
    """Remove one bundle (``NotFound`` when there is none of that kind and name)."""
    bundle = bundle_file(state_dir, kind, name)
    bundle.path.unlink()
    fsync_directory(bundle.path.parent)
    return bundle


def prune_bundles(state_dir: Path, kind: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` bundles of ``kind`` (0: keep all); their names."""
    if keep <= 0:
        return []
    removed = []
    for bundle in list_bundles(state_dir, kind)[keep:]:
        bundle.path.unlink(missing_ok=True)
        removed.append(bundle.name)
    if removed:
        fsync_directory(state_dir / "exports" / kind)
    return removed


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _walk(root: Path, base: Path) -> Iterator[tuple[str, Path]]:
    """Files and directories under ``root`` (directories too: empty ones matter)."""
    if root.is_symlink():
        raise StoreError(f"export: {root} is a symlink; refusing to export it")
    if not root.exists():
        return
    if root.is_file():
        yield root.relative_to(base).as_posix(), root
        return
    yield root.relative_to(base).as_posix(), root
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*sorted(dirnames), *sorted(filenames)]:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise StoreError(f"export: {path} is a symlink; refusing to export it")
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                yield path.relative_to(base).as_posix(), path
            else:
                raise StoreError(f"export: {path} is not a regular file")


def collect(state_dir: Path, kind: str, volumes: bool) -> list[tuple[str, Path]]:
    """
    The files of a ``kind`` bundle under ``state_dir`` as (relative path,
    path), sorted.  ``volumes``: whether the store lives on the ``control``
    volume.  Raises ``StoreError`` for a symlink or special file.
    """
    if kind not in ("control", "full"):
        raise InvalidCommand(f"unknown export kind {kind!r}")
    persistence = state_dir / "persistence"
    roots = [
        persistence / "keyset.json",
        persistence / "volume-keys.json",
        persistence / "control-store.json",
    ]
    if not volumes:
        roots.append(persistence / "control")
    elif kind == "control":
        roots += [
            state_dir / "volumes" / "ciphertext" / "control",
            state_dir / "volumes" / "journal" / "control.json",
        ]
    else:
        roots += [state_dir / "volumes" / "ciphertext", state_dir / "volumes" / "journal"]
    found: dict[str, Path] = {}
    for root in roots:
        for rel, path in _walk(root, state_dir):
            if rel.endswith("-shm") or rel.endswith(".tmp"):
                continue  # SQLite's shared-memory index, temp files: derived
            found[rel] = path
    if "persistence/keyset.json" not in found:
        raise Conflict("nothing to export: storage is not set up")
    return sorted(found.items())


def write_bundle(
    state_dir: Path,
    files: list[tuple[str, Path]],
    *,
    kind: str,
    created_at: float,
    keyset_id: str,
    progress: Progress | None = None,
) -> ExportInfo:
    """
    Write the bundle atomically into ``<state_dir>/exports/<kind>/``;
    returns its path, sha256 and size.
    """
    entries: list[dict[str, Any]] = []
    total = sum(path.stat().st_size for _, path in files if path.is_file()) or 1
    for rel, path in files:
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            entries.append({"path": rel, "type": "dir", "mode": mode})
            continue
        digest, size = _sha256_file(path)
        entries.append({"path": rel, "type": "file", "size": size, "sha256": digest, "mode": mode})
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "kind": kind,
        "created_at": created_at,
        "keyset_id": keyset_id,
        "files": entries,
    }
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created_at))
    target_dir = state_dir / "exports" / kind
    target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = target_dir / f"piccolod-{kind}-{stamp}-{secrets.token_hex(3)}.tar"
    tmp = target.with_name(f".{target.name}.tmp")
    done = 0
    try:
        with tmp.open("xb") as raw:
            os.fchmod(raw.fileno(), 0o600)
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mode, info.mtime = len(body), 0o600, int(created_at)
                tar.addfile(info, io.BytesIO(body))
                for entry, (rel, path) in zip(entries, files, strict=True):
                    info = tarfile.TarInfo(rel)
                    info.mode, info.mtime = entry["mode"], int(created_at)
                    if entry["type"] == "dir":
                        info.type = tarfile.DIRTYPE
                        tar.addfile(info)
                        continue
                    info.size = entry["size"]
                    with path.open("rb") as f:
                        tar.addfile(info, f)
                    done += int(entry["size"])
                    if progress is not None:
                        progress(min(0.99, done / total), f"added {rel}")
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, target)
        fsync_directory(target_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest, size = _sha256_file(target)
    count = sum(1 for entry in entries if entry["type"] == "file")
    return ExportInfo(kind, str(target), digest, size, count, created_at)


def _safe(name: str) -> str:
    path = PurePosixPath(name)
    if (
        not name
        or path.is_absolute()
        or ".." in path.parts
        or name != path.as_posix()
        or path.parts[0] not in ("persistence", "volumes")
    ):
        raise BundleInvalid(f"bundle member {name!r} is not a safe relative path")
    return name


def verify_bundle(bundle: Path) -> dict[str, Any]:
    """
    Read and check a bundle without extracting it; returns its manifest.
    Raises ``BundleInvalid`` (see the module docstring).
    """
    manifest, _ = _check(bundle, None)
    return manifest


def _check(bundle: Path, extract_to: Path | None) -> tuple[dict[str, Any], int]:
    try:
        tar = tarfile.open(bundle, mode="r:")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as e:
        raise BundleInvalid(f"the bundle is not a readable tar file: {e}") from None
    with tar:
        try:
            first = tar.next()
        except tarfile.TarError as e:
            raise BundleInvalid(f"the bundle is not a readable tar file: {e}") from None
        if first is None or first.name != MANIFEST or not first.isfile():
            raise BundleInvalid("the bundle does not start with manifest.json")
        if first.size > MAX_MANIFEST:
            raise BundleInvalid("the manifest is implausibly large")
        handle = tar.extractfile(first)
        assert handle is not None
        try:
            manifest = json.loads(handle.read())
        except ValueError:
            raise BundleInvalid("the manifest is not valid JSON") from None
        listed = _manifest_files(manifest)
        seen: set[str] = set()
        try:
            for member in tar:
                if member is first:
                    continue
                name = _safe(member.name)
                expected = listed.get(name)
                if expected is None:
                    raise BundleInvalid(f"bundle member {name!r} is not in the manifest")
                if name in seen:
                    raise BundleInvalid(f"bundle member {name!r} appears twice")
                seen.add(name)
                if expected["type"] == "dir":
                    if not member.isdir():
                        raise BundleInvalid(f"bundle member {name!r} should be a directory")
                    if extract_to is not None:
                        (extract_to / name).mkdir(mode=0o700, parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise BundleInvalid(f"bundle member {name!r} is not a regular file")
                _check_member(tar, member, expected, extract_to)
        except tarfile.TarError as e:
            raise BundleInvalid(f"the bundle is damaged: {e}") from None
    missing = sorted(set(listed) - seen)
    if missing:
        raise BundleInvalid(f"the bundle lacks {len(missing)} listed file(s), e.g. {missing[0]!r}")
    return manifest, sum(1 for name in seen if listed[name]["type"] == "file")


def _manifest_files(manifest: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleInvalid("the manifest is not a piccolod export manifest")
    if manifest.get("version") != BUNDLE_VERSION:
        raise BundleInvalid(f"unsupported bundle version {manifest.get('version')!r}")
    if manifest.get("kind") not in ("control", "full"):
        raise BundleInvalid("the manifest has an unknown kind")
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise BundleInvalid("the manifest lists no files")
    listed: dict[str, dict[str, Any]] = {}
    for entry in files:
        if not isinstance(entry, dict):
            raise BundleInvalid("a manifest entry is not an object")
        name = entry.get("path")
        if entry.get("type") == "dir" and isinstance(name, str):
            listed[_safe(name)] = entry
            continue
        if entry.get("type") != "file":
            raise BundleInvalid("a manifest entry has an unknown type")
        size = entry.get("size")
        digest = entry.get("sha256")
        if (
            not isinstance(name, str)
            or isinstance(size, bool)
            or not isinstance(size, int)
            or size < 0
            or not isinstance(digest, str)
            or len(digest) != 64
        ):
            raise BundleInvalid("a manifest entry lacks a path, size or sha256")
        listed[_safe(name)] = entry
    if "persistence/keyset.json" not in listed:
        raise BundleInvalid("the bundle has no keyset")
    return listed


def _check_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    expected: dict[str, Any],
    extract_to: Path | None,
) -> None:
    if member.size != expected["size"]:
        raise BundleInvalid(f"size mismatch for {member.name!r}: the bundle is damaged")
    source = tar.extractfile(member)
    assert source is not None
    digest = hashlib.sha256()
    out = None
    if extract_to is not None:
        target = extract_to / member.name
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            if out is not None:
                os.write(out, chunk)
        if out is not None:
            os.fsync(out)
    finally:
        if out is not None:
            os.close(out)
    if digest.hexdigest() != expected["sha256"]:
        raise BundleInvalid(
            f"checksum mismatch for {member.name!r}: the bundle is tampered or damaged"
        )
    if extract_to is not None:
        mode = expected.get("mode")
        if isinstance(mode, int) and not isinstance(mode, bool):
            os.chmod(extract_to / member.name, mode & 0o700 or 0o600)


def _is_empty(state_dir: Path) -> bool:
    persistence = state_dir / "persistence"
    if (persistence / "keyset.json").exists() or (persistence / "control").exists():
        return False
    ciphertext = state_dir / "volumes" / "ciphertext"
    return not (ciphertext.exists() and any(ciphertext.iterdir()))


def restore_bundle(bundle: Path, state_dir: Path) -> ImportInfo:
    """
    Check the bundle fully, then put its files in place under
    ``state_dir``.  Raises ``Conflict`` unless the state dir is empty of
    storage (no keyset, no volumes), ``BundleInvalid`` for a bad bundle;
    in both cases nothing outside a temp dir was written.
    """
    if not _is_empty(state_dir):
        raise Conflict("import needs an empty state dir (no keyset, no volumes)")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = state_dir / f".import-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        manifest, count = _check(bundle, staging)
        if not _is_empty(state_dir):
            raise Conflict("the state dir changed during the import")
        for dirpath, dirnames, _filenames in os.walk(staging):
            for name in dirnames:
                target_dir = state_dir / (Path(dirpath) / name).relative_to(staging)
                target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pairs = [
            (Path(dirpath) / name, state_dir / (Path(dirpath) / name).relative_to(staging))
            for dirpath, _dirnames, filenames in os.walk(staging)
            for name in filenames
        ]
        clash = [str(target) for _, target in pairs if target.exists()]
        if clash:
            raise Conflict(f"import: {clash[0]} exists already; refusing to overwrite it")
        for source, target in pairs:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.link(source, target)
        for parent in sorted({target.parent for _, target in pairs}):
            fsync_directory(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ImportInfo(
        kind=str(manifest["kind"]),
        path=str(bundle),
        files=count,
        keyset_id=str(manifest.get("keyset_id", "")),
    )
