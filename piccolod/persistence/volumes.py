"""
Volumes: the manager that keeps each volume's desired and observed state in
a journal, and what its adapters share (layout, id rules, typed errors).

Layout under the daemon's state dir (the upstream one, minus its flaws)::

    <state_dir>/volumes/ciphertext/<id>     what rests on disk (encrypted with gocryptfs)
    <state_dir>/volumes/mounts/<id>         where the plaintext view appears while attached
    <state_dir>/volumes/journal/<id>.json   desired vs observed state of the volume

A volume id matches ``^[a-z0-9][a-z0-9-]{0,62}$``; anything else (``..``,
``a/b``, upper case) is refused with :class:`InvalidVolumeId` before any
path is built, so no id can escape the layout.

**The journal** of a volume records::

    {"format": 1, "volume_id": "control", "created": true,
     "desired": "attached", "read_only": false,
     "observed": "attached-rw", "generation": 3, "observed_generation": 3,
     "needs_repair": false, "last_error": null, "updated_at": 1700000000.0}

``generation`` grows whenever the desired state (attached or detached, and
the mode) changes; ``observed_generation`` is the generation the observed
state last matched.  ``observed`` is one of :data:`STATES`.  Journals are
written atomically (temp file, fsync, rename, fsync of the directory): a
crash leaves the old or the new journal, never a torn one.  A journal that
cannot be parsed marks the volume ``needs-repair`` with
:class:`VolumeNeedsRepair`; it is never overwritten (only
:meth:`VolumeManager.repair` moves it aside, on request).

**States** (``VolumeStateChanged.state``, published on every journal change):

- ``detached``: not mounted, and not wanted mounted;
- ``attached-rw`` / ``attached-ro``: mounted read-write / read-only;
- ``pending``: wanted (or created) but waiting for the storage to be
  unlocked: ``secret_for`` raised ``Locked``;
- ``failed``: the last mount failed or the mount process died; the last
  error says why; a sweep or an attach tries again;
- ``needs-repair``: a human must look: the journal is corrupt, the
  ciphertext vanished, or the passphrase does not open the volume.
  Operations on it fail with :class:`VolumeNeedsRepair` until
  :meth:`VolumeManager.repair`.

Every operation on one volume is serialised by a per-volume
``DeferredLock``; operations on different volumes run concurrently.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from piccolod.errors import InvalidCommand, Locked, NotFound, PiccolodError
from piccolod.events import VolumeStateChanged
from piccolod.interfaces import IEventBus, IVolumeAdapter
from piccolod.kernel.aio import call, provides

__all__ = [
    "ATTACHED_RO",
    "ATTACHED_RW",
    "DETACHED",
    "FAILED",
    "NEEDS_REPAIR",
    "PENDING",
    "STATES",
    "InvalidVolumeId",
    "MountTimeout",
    "VolumeBusy",
    "VolumeCorrupt",
    "VolumeError",
    "VolumeLayout",
    "VolumeManager",
    "VolumeNeedsRepair",
    "VolumeNotFound",
    "VolumeStatus",
    "WrongPassphrase",
    "check_passphrase",
    "check_volume_id",
    "run_blocking",
    "write_atomically",
]

T = TypeVar("T")

# --------------------------------------------------------------------------
# States

DETACHED = "detached"
ATTACHED_RW = "attached-rw"
ATTACHED_RO = "attached-ro"
PENDING = "pending"
FAILED = "failed"
NEEDS_REPAIR = "needs-repair"
#: Every state a volume can be observed in.
STATES = (DETACHED, ATTACHED_RW, ATTACHED_RO, PENDING, FAILED, NEEDS_REPAIR)

_DESIRED = ("attached", "detached")
_JOURNAL_FORMAT = 1

# --------------------------------------------------------------------------
# Typed errors


class VolumeError(PiccolodError):
    """A volume operation failed (the detail says which and why)."""

    type = "volume"
    title = "Volume operation failed"
    status = 500


class InvalidVolumeId(InvalidCommand):
    """A volume id does not match ``^[a-z0-9][a-z0-9-]{0,62}$``."""

    type = "invalid-volume-id"
    title = "Invalid volume id"


class VolumeNotFound(NotFound):
    """The volume was never created (no ciphertext directory)."""

    type = "volume-not-found"
    title = "Volume not found"


class WrongPassphrase(VolumeError):
    """
    The passphrase does not open the volume.  Passphrases come from the
    keyset, not from a user, so this means the key and the volume do not
    belong together: the volume needs repair, retrying will not help.
    """

    type = "volume-wrong-passphrase"
    title = "The passphrase does not open the volume"
    status = 409


class VolumeCorrupt(VolumeError):
    """The ciphertext directory exists but is not a volume of this adapter."""

    type = "volume-corrupt"
    title = "Volume is corrupt"
    status = 409


class VolumeNeedsRepair(VolumeError):
    """The volume is marked ``needs-repair``; see ``last_error``."""

    type = "volume-needs-repair"
    title = "Volume needs repair"
    status = 409


class VolumeBusy(VolumeError):
    """The volume cannot be unmounted: something still uses it."""

    type = "volume-busy"
    title = "Volume is busy"
    status = 409
    retryable = True


class MountTimeout(VolumeError):
    """The mount did not appear (or the process did not exit) in time."""

    type = "volume-mount-timeout"
    title = "Mount timed out"
    status = 504
    retryable = True


# --------------------------------------------------------------------------
# Shared by the adapters

_VOLUME_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: The longest passphrase accepted (gocryptfs reads at most 2048 bytes).
MAX_PASSPHRASE = 1024


def check_volume_id(volume_id: object) -> str:
    """Return ``volume_id`` if valid; raise :class:`InvalidVolumeId`."""
    if not isinstance(volume_id, str) or _VOLUME_ID_RE.fullmatch(volume_id) is None:
        raise InvalidVolumeId(f"bad volume id {volume_id!r}: expected ^[a-z0-9][a-z0-9-]{{0,62}}$")
    return volume_id


def check_passphrase(passphrase: object) -> bytes:
    """
    Return ``passphrase`` if it is usable on a line of stdin: 1 to 1024
    bytes without newline, carriage return or NUL.  Raises
    ``InvalidCommand`` (never showing the passphrase).
    """
    if not isinstance(passphrase, bytes):
        raise InvalidCommand(f"a volume passphrase must be bytes, not {type(passphrase).__name__}")
    if not 0 < len(passphrase) <= MAX_PASSPHRASE:
        raise InvalidCommand(f"a volume passphrase must have 1 to {MAX_PASSPHRASE} bytes")
    if any(c in passphrase for c in (b"\n", b"\r", b"\0")):
        raise InvalidCommand("a volume passphrase must not contain newline, CR or NUL bytes")
    return passphrase


@attrs.frozen
class VolumeLayout:
    """Where each part of a volume lives under ``state_dir``."""

    state_dir: Path = attrs.field(converter=Path)

    @property
    def root(self) -> Path:
        return self.state_dir / "volumes"

    @property
    def ciphertext_dir(self) -> Path:
        return self.root / "ciphertext"

    @property
    def mounts_dir(self) -> Path:
        return self.root / "mounts"

    @property
    def journal_dir(self) -> Path:
        return self.root / "journal"

    def ciphertext(self, volume_id: str) -> Path:
        return self.ciphertext_dir / check_volume_id(volume_id)

    def mountpoint(self, volume_id: str) -> Path:
        return self.mounts_dir / check_volume_id(volume_id)

    def journal(self, volume_id: str) -> Path:
        return self.journal_dir / f"{check_volume_id(volume_id)}.json"

    def journaled(self) -> list[str]:
        """Volume ids with a journal file (temp files and strays ignored)."""
        try:
            names = os.listdir(self.journal_dir)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            stem, dot, ext = name.rpartition(".")
            if dot and ext == "json" and _VOLUME_ID_RE.fullmatch(stem):
                found.append(stem)
        return sorted(found)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename or creation in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """
    Replace ``path`` with ``data``: a temp file in the same directory,
    fsync, rename over ``path``, fsync of the directory.  A crash leaves the
    old or the new content; a failure removes the temp file.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def run_blocking(reactor: Any, pool: ThreadPool | None, fn: Callable[[], T]) -> Deferred[T]:
    """
    Run the blocking ``fn`` in ``pool`` (``deferToThreadPool``), or inline
    when ``pool`` is ``None`` (tests, and tiny calls).  Always a Deferred.
    """
    if pool is not None:
        return deferToThreadPool(reactor, pool, fn)
    try:
        return succeed(fn())
    except BaseException as e:
        return fail(e)


# --------------------------------------------------------------------------
# Status and journal values


@attrs.frozen
class VolumeStatus:
    """
    What the manager knows of one volume.

    @ivar state: one of :data:`STATES`.
    @ivar desired: ``"attached"`` or ``"detached"``.
    @ivar mounted: whether the adapter has it mounted right now.
    @ivar path: the mount path while mounted, else ``None``.
    @ivar encrypted: whether the adapter encrypts what rests on disk.
    """

    volume_id: str
    state: str
    desired: str = "detached"
    read_only: bool = False
    generation: int = 0
    observed_generation: int = 0
    needs_repair: bool = False
    last_error: str | None = None
    created: bool = False
    mounted: bool = False
    path: str | None = None
    encrypted: bool = False
    updated_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class _CorruptJournal(Exception):
    """A journal file that does not parse (internal; becomes needs-repair)."""


@attrs.frozen
class _Journal:
    volume_id: str
    created: bool = False
    desired: str = "detached"
    read_only: bool = False
    observed: str = DETACHED
    generation: int = 0
    observed_generation: int = 0
    needs_repair: bool = False
    last_error: str | None = None
    updated_at: float = 0.0

    def to_bytes(self) -> bytes:
        body = {"format": _JOURNAL_FORMAT, **attrs.asdict(self)}
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, volume_id: str, raw: bytes) -> _Journal:
        """Parse and validate strictly; raise ``_CorruptJournal`` saying why."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _CorruptJournal(f"journal is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise _CorruptJournal("journal is not a JSON object")
        if body.get("format") != _JOURNAL_FORMAT:
            raise _CorruptJournal(f"unknown journal format {body.get('format')!r}")
        if body.get("volume_id") != volume_id:
            raise _CorruptJournal(
                f"journal names volume {body.get('volume_id')!r}, not {volume_id!r}"
            )
        kinds: dict[str, tuple[type, ...]] = {
            "created": (bool,),
            "desired": (str,),
            "read_only": (bool,),
            "observed": (str,),
            "generation": (int,),
            "observed_generation": (int,),
            "needs_repair": (bool,),
            "last_error": (str, type(None)),
            "updated_at": (int, float),
        }
        for key, types in kinds.items():
            value = body.get(key)
            bad_bool = isinstance(value, bool) and bool not in types
            if key not in body or not isinstance(value, types) or bad_bool:
                raise _CorruptJournal(f"journal field {key!r} is missing or has a bad type")
        if body["desired"] not in _DESIRED:
            raise _CorruptJournal(f"journal desired state {body['desired']!r} is unknown")
        if body["observed"] not in STATES:
            raise _CorruptJournal(f"journal observed state {body['observed']!r} is unknown")
        if body["generation"] < 0 or not 0 <= body["observed_generation"] <= body["generation"]:
            raise _CorruptJournal("journal generations are inconsistent")
        return cls(
            volume_id=volume_id,
            created=body["created"],
            desired=body["desired"],
            read_only=body["read_only"],
            observed=body["observed"],
            generation=body["generation"],
            observed_generation=body["observed_generation"],
            needs_repair=body["needs_repair"],
            last_error=body["last_error"],
            updated_at=float(body["updated_at"]),
        )


def _attached_state(read_only: bool) -> str:
    return ATTACHED_RO if read_only else ATTACHED_RW


def _describe(error: BaseException) -> str:
    if isinstance(error, PiccolodError):
        return f"{type(error).__name__}: {error.detail}"
    return f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------
# The manager


@attrs.define(eq=False)
class VolumeManager:
    """
    Brings volumes to their desired state through an ``IVolumeAdapter``
    and keeps a journal of each (see the module docstring).

    @ivar reactor: the clock for journal timestamps (and the thread pool's
        reactor when ``threadpool`` is given).
    @ivar state_dir: the daemon's state dir; volumes live in ``volumes/``.
    @ivar adapter: mounts and unmounts (``directory`` or ``gocryptfs``).
    @ivar bus: where ``VolumeStateChanged`` goes (``None``: nowhere).
    @ivar secret_for: the volume's passphrase, derived from the data key
        (plain or Deferred/coroutine); raises or fails with ``Locked``
        while storage is locked.
    @ivar threadpool: where journal I/O runs; ``None``: inline (tests).
    @ivar source: the event source name.
    """

    log: ClassVar[Logger] = Logger()

    reactor: IReactorTime = attrs.field(validator=provides(IReactorTime))
    state_dir: Path = attrs.field(converter=Path)
    adapter: IVolumeAdapter = attrs.field(validator=provides(IVolumeAdapter))
    bus: IEventBus | None
    secret_for: Callable[[str], bytes | Awaitable[bytes]]
    threadpool: ThreadPool | None = attrs.field(default=None, kw_only=True)
    source: str = attrs.field(default="persistence.volumes", kw_only=True)
    _layout: VolumeLayout = attrs.field(init=False)
    _locks: dict[str, DeferredLock] = attrs.field(init=False, factory=dict)
    _journals: dict[str, _Journal] = attrs.field(init=False, factory=dict)
    _corrupt: dict[str, str] = attrs.field(init=False, factory=dict)
    _paths: dict[str, str] = attrs.field(init=False, factory=dict)
    _unwatch: Callable[[], None] | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._layout = VolumeLayout(self.state_dir)
        self._unwatch = self.adapter.watch_lost(self._lost)

    @property
    def layout(self) -> VolumeLayout:
        return self._layout

    def close(self) -> None:
        """Stop watching the adapter for lost mounts; idempotent."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    # -- public API ---------------------------------------------------------

    def ensure(self, volume_id: str) -> Deferred[VolumeStatus]:
        """
        Make sure the volume exists: create its ciphertext (idempotent, and
        checking the passphrase when it exists) and its journal.  While
        locked, a volume not created yet is journaled ``pending`` and
        created by a later ensure or attach.  Fails with
        ``InvalidVolumeId``, ``VolumeNeedsRepair`` (also on a passphrase
        that does not open it) or the adapter's ``VolumeError``.
        """
        return self._op(volume_id, self._ensure)

    def attach(self, volume_id: str, read_only: bool = False) -> Deferred[str]:
        """
        Want the volume attached in this mode (journaled first), create it
        if needed and mount it; fires with the mount path.  An attached
        volume in another mode is remounted.  Fails with ``Locked`` (the
        volume is then ``pending`` and the next sweep attaches it),
        ``VolumeNeedsRepair``, ``MountTimeout`` or another ``VolumeError``
        (the volume is then ``failed``).
        """
        return self._op(volume_id, lambda vid: self._attach(vid, bool(read_only)))

    def detach(self, volume_id: str) -> Deferred[VolumeStatus]:
        """
        Want the volume detached (journaled) and unmount it.  Fails with
        ``VolumeNotFound`` for a volume never ensured, ``VolumeBusy`` when
        it cannot be unmounted (it stays attached), and
        ``VolumeNeedsRepair`` for a corrupt journal (after unmounting).
        """
        return self._op(volume_id, self._detach)

    def detach_all(self, reason: str = "") -> Deferred[list[str]]:
        """
        Unmount every mounted volume, keeping each one's desired state (so
        that the sweep after the next unlock attaches them again: they are
        ``pending`` meanwhile).  This is the lock path: it tries every
        volume even when one fails, then fires with the ids unmounted, or
        fails with ``VolumeBusy`` naming every volume left mounted.
        """
        return Deferred.fromCoroutine(self._detach_all(reason))

    def sweep(self) -> Deferred[list[VolumeStatus]]:
        """
        Bring every journaled volume's observed state to its desired state
        (called at boot and at unlock); journals are re-read from disk.
        Never fails for one volume's problem: each is recorded in that
        volume's status (``pending``, ``failed``, ``needs-repair``).
        Mounted volumes without a journal are unmounted.  Fires with the
        status of every volume.
        """
        return Deferred.fromCoroutine(self._sweep())

    def delete(self, volume_id: str) -> Deferred[None]:
        """
        Detach the volume and delete it with its data: ciphertext, mount
        point and journal (idempotent: a volume that does not exist is
        fine).  Publishes ``VolumeStateChanged`` with state ``deleted``.
        Fails with ``VolumeBusy`` when it cannot be unmounted (then nothing
        is deleted).
        """
        return self._op(volume_id, self._delete)

    def repair(self, volume_id: str) -> Deferred[VolumeStatus]:
        """
        Clear ``needs-repair`` after a human looked: a corrupt journal is
        moved aside (``<id>.json.corrupt-<time>``), and the volume starts
        over as ``detached`` (desired detached).  Nothing in the ciphertext
        is touched.  Fails with ``VolumeNotFound`` for an unknown volume.
        """
        return self._op(volume_id, self._repair)

    def status(self, volume_id: str) -> Deferred[VolumeStatus]:
        """The volume's status; fails with ``VolumeNotFound`` or ``InvalidVolumeId``."""
        try:
            check_volume_id(volume_id)
        except InvalidVolumeId as e:
            return fail(e)
        return Deferred.fromCoroutine(self._status(volume_id))

    def volumes(self) -> Deferred[list[VolumeStatus]]:
        """The status of every journaled volume (corrupt ones included), by id."""
        return Deferred.fromCoroutine(self._volumes())

    # -- operations ---------------------------------------------------------

    def _op(self, volume_id: str, fn: Callable[[str], Coroutine[Any, Any, T]]) -> Deferred[T]:
        try:
            check_volume_id(volume_id)
        except InvalidVolumeId as e:
            return fail(e)
        return Deferred.fromCoroutine(self._serial(volume_id, fn))

    async def _serial(self, volume_id: str, fn: Callable[[str], Awaitable[T]]) -> T:
        lock = self._locks.get(volume_id)
        if lock is None:
            lock = self._locks[volume_id] = DeferredLock()
        await lock.acquire()
        try:
            return await fn(volume_id)
        finally:
            lock.release()

    async def _ensure(self, volume_id: str) -> VolumeStatus:
        journal = await self._journal(volume_id, required=False)
        if journal is None:
            journal = _Journal(volume_id=volume_id)
            fresh = True
        else:
            fresh = False
        self._refuse_repair(journal)
        try:
            secret = await self._secret(volume_id)
        except Locked:
            if not journal.created:
                journal = await self._save(journal, observed=PENDING, force=fresh)
            return self._status_of(journal)
        try:
            journal = await self._create(journal, secret)
        except (WrongPassphrase, VolumeCorrupt) as e:
            await self._save(
                journal, observed=NEEDS_REPAIR, needs_repair=True, error=e, force=fresh
            )
            raise VolumeNeedsRepair(
                f"volume {volume_id!r} needs repair: {_describe(e)}", volume_id=volume_id
            ) from None
        finally:
            del secret
        if fresh or (journal.observed == PENDING and journal.desired == "detached"):
            observed = DETACHED if journal.observed == PENDING else journal.observed
            journal = await self._save(journal, observed=observed, force=True)
        return self._status_of(journal)

    async def _attach(self, volume_id: str, read_only: bool) -> str:
        journal = await self._journal(volume_id, required=False)
        if journal is None:
            journal = _Journal(volume_id=volume_id)
        self._refuse_repair(journal)
        if journal.desired != "attached" or journal.read_only != read_only:
            journal = attrs.evolve(
                journal,
                desired="attached",
                read_only=read_only,
                generation=journal.generation + 1,
            )
        return await self._bring_up(journal, raise_locked=True)

    async def _bring_up(self, journal: _Journal, raise_locked: bool) -> str:
        """Mount ``journal``'s volume in its desired mode and journal the outcome."""
        volume_id = journal.volume_id
        try:
            secret = await self._secret(volume_id)
        except Locked:
            await self._save(journal, observed=PENDING, force=True)
            if raise_locked:
                raise
            return ""
        try:
            if not journal.created:
                journal = await self._create(journal, secret)
            # A created volume is not checked again: the mount checks the
            # passphrase itself (and a vanished ciphertext is VolumeNotFound).
            path = await self.adapter.mount(volume_id, secret, journal.read_only)
        except (WrongPassphrase, VolumeNotFound, VolumeCorrupt) as e:
            if isinstance(e, VolumeNotFound) and not journal.created:
                raise
            await self._save(journal, observed=NEEDS_REPAIR, needs_repair=True, error=e)
            raise VolumeNeedsRepair(
                f"volume {volume_id!r} needs repair: {_describe(e)}", volume_id=volume_id
            ) from None
        except Exception as e:
            await self._save(journal, observed=FAILED, error=e)
            raise
        finally:
            del secret
        self._paths[volume_id] = path
        await self._save(
            journal,
            observed=_attached_state(journal.read_only),
            observed_generation=journal.generation,
            error=None,
        )
        return path

    async def _detach(self, volume_id: str) -> VolumeStatus:
        try:
            journal = await self._journal(volume_id, required=False)
        except VolumeNeedsRepair:
            await self.adapter.unmount(volume_id)
            self._paths.pop(volume_id, None)
            raise
        if journal is None:
            if self.adapter.is_mounted(volume_id):
                await self.adapter.unmount(volume_id)
                self._paths.pop(volume_id, None)
                return self._status_of(_Journal(volume_id=volume_id))
            raise VolumeNotFound(f"no volume {volume_id!r}", volume_id=volume_id)
        if journal.desired != "detached":
            journal = attrs.evolve(journal, desired="detached", generation=journal.generation + 1)
        try:
            await self.adapter.unmount(volume_id)
        except Exception as e:
            # Still mounted: record that it should not be, and why it is.
            await self._save(journal, error=e)
            raise
        self._paths.pop(volume_id, None)
        if journal.needs_repair:
            journal = await self._save(journal)
            return self._status_of(journal)
        journal = await self._save(
            journal, observed=DETACHED, observed_generation=journal.generation, error=None
        )
        return self._status_of(journal)

    async def _delete(self, volume_id: str) -> None:
        if self.adapter.is_mounted(volume_id):
            await self.adapter.unmount(volume_id)
        self._paths.pop(volume_id, None)
        layout = self._layout

        def remove() -> None:
            for tree in (layout.ciphertext(volume_id), layout.mountpoint(volume_id)):
                if tree.is_symlink():
                    tree.unlink()
                elif tree.exists():
                    shutil.rmtree(tree)
            layout.journal(volume_id).unlink(missing_ok=True)

        await run_blocking(self.reactor, self.threadpool, remove)
        existed = self._journals.pop(volume_id, None) is not None
        self._corrupt.pop(volume_id, None)
        if existed:
            self.log.info("volume {volume_id} deleted with its data", volume_id=volume_id)
        self._publish_state(volume_id, "deleted", 0, "deleted with its data")

    async def _detach_all(self, reason: str) -> list[str]:
        wanted = set(self.adapter.mounted()) | {
            vid for vid, j in self._journals.items() if j.observed in (ATTACHED_RO, ATTACHED_RW)
        }
        done: list[str] = []
        busy: dict[str, str] = {}
        for volume_id in sorted(wanted):
            try:
                if await self._serial(volume_id, lambda vid: self._unmount_keep(vid, reason)):
                    done.append(volume_id)
            except Exception as e:
                busy[volume_id] = _describe(e)
                self.log.warn(
                    "could not detach volume {volume_id}: {error}",
                    volume_id=volume_id,
                    error=busy[volume_id],
                )
        if busy:
            raise VolumeBusy(
                "volumes still mounted: "
                + "; ".join(f"{vid} ({why})" for vid, why in sorted(busy.items())),
                volumes=sorted(busy),
            )
        return done

    async def _unmount_keep(self, volume_id: str, reason: str) -> bool:
        """Unmount keeping the desired state; True if it was mounted."""
        was_mounted = self.adapter.is_mounted(volume_id)
        if was_mounted:
            await self.adapter.unmount(volume_id)
        self._paths.pop(volume_id, None)
        journal = self._journals.get(volume_id)
        if journal is not None and journal.observed in (ATTACHED_RO, ATTACHED_RW):
            observed = PENDING if journal.desired == "attached" else DETACHED
            await self._save(journal, observed=observed, detail=reason)
        return was_mounted

    async def _sweep(self) -> list[VolumeStatus]:
        ids = await run_blocking(self.reactor, self.threadpool, self._layout.journaled)
        statuses: dict[str, VolumeStatus] = {}
        for volume_id in ids:
            statuses[volume_id] = await self._serial(volume_id, self._sweep_one)
        for volume_id in sorted(set(self.adapter.mounted()) - set(ids)):
            self.log.warn(
                "volume {volume_id} is mounted but has no journal: unmounting it",
                volume_id=volume_id,
            )
            try:
                await self._serial(volume_id, self.adapter.unmount)
                self._paths.pop(volume_id, None)
            except Exception:
                self.log.failure(
                    "while unmounting unjournaled volume {volume_id}", volume_id=volume_id
                )
        return [statuses[vid] for vid in sorted(statuses)]

    async def _sweep_one(self, volume_id: str) -> VolumeStatus:
        # Re-read from disk: a journal repaired (or damaged) by hand counts.
        self._journals.pop(volume_id, None)
        self._corrupt.pop(volume_id, None)
        try:
            journal = await self._journal(volume_id, required=True)
        except VolumeNeedsRepair:
            return self._corrupt_status(volume_id)
        assert journal is not None
        if journal.needs_repair:
            self._publish(journal)
            return self._status_of(journal)
        mounted = self.adapter.is_mounted(volume_id)
        try:
            if journal.desired == "attached":
                await self._bring_up(journal, raise_locked=False)
            elif mounted:
                await self.adapter.unmount(volume_id)
                self._paths.pop(volume_id, None)
                await self._save(
                    journal,
                    observed=DETACHED,
                    observed_generation=journal.generation,
                    error=None,
                )
            elif journal.observed != DETACHED and journal.created:
                await self._save(
                    journal,
                    observed=DETACHED,
                    observed_generation=journal.generation,
                )
        except Exception as e:
            self.log.warn(
                "sweep: volume {volume_id} not brought to {desired}: {error}",
                volume_id=volume_id,
                desired=journal.desired,
                error=_describe(e),
            )
        current = self._journals.get(volume_id, journal)
        if current is journal:
            # Nothing changed: publish the state anyway, so that after a
            # sweep the bus's retained value of every volume is current.
            self._publish(current)
        return self._status_of(current)

    async def _repair(self, volume_id: str) -> VolumeStatus:
        path = self._layout.journal(volume_id)
        if volume_id in self._corrupt:
            aside = path.with_name(f"{path.name}.corrupt-{int(self.reactor.seconds())}")
            await run_blocking(self.reactor, self.threadpool, lambda: os.replace(path, aside))
            self.log.warn(
                "volume {volume_id}: corrupt journal moved aside to {path}",
                volume_id=volume_id,
                path=str(aside),
            )
            del self._corrupt[volume_id]
            created = await run_blocking(
                self.reactor, self.threadpool, self._layout.ciphertext(volume_id).exists
            )
            journal = _Journal(volume_id=volume_id, created=created)
        else:
            found = await self._journal(volume_id, required=False)
            if found is None:
                raise VolumeNotFound(f"no volume {volume_id!r}", volume_id=volume_id)
            journal = attrs.evolve(found, desired="detached", generation=found.generation + 1)
        if self.adapter.is_mounted(volume_id):
            await self.adapter.unmount(volume_id)
            self._paths.pop(volume_id, None)
        journal = await self._save(
            journal,
            observed=DETACHED,
            observed_generation=journal.generation,
            needs_repair=False,
            error=None,
            force=True,
        )
        return self._status_of(journal)

    async def _status(self, volume_id: str) -> VolumeStatus:
        try:
            journal = await self._journal(volume_id, required=False)
        except VolumeNeedsRepair:
            return self._corrupt_status(volume_id)
        if journal is None:
            raise VolumeNotFound(f"no volume {volume_id!r}", volume_id=volume_id)
        return self._status_of(journal)

    async def _volumes(self) -> list[VolumeStatus]:
        ids = await run_blocking(self.reactor, self.threadpool, self._layout.journaled)
        out = []
        for volume_id in ids:
            try:
                out.append(await self._status(volume_id))
            except VolumeNotFound:  # removed meanwhile
                continue
        return out

    # -- helpers ------------------------------------------------------------

    async def _secret(self, volume_id: str) -> bytes:
        secret = await call(self.secret_for, volume_id)
        return check_passphrase(secret)

    async def _create(self, journal: _Journal, secret: bytes) -> _Journal:
        """Create (or check) the volume's ciphertext; returns the journal marked created."""
        await self.adapter.create(journal.volume_id, secret)
        if journal.created:
            return journal
        return attrs.evolve(journal, created=True)

    def _refuse_repair(self, journal: _Journal) -> None:
        if journal.needs_repair:
            raise VolumeNeedsRepair(
                f"volume {journal.volume_id!r} needs repair: {journal.last_error}",
                volume_id=journal.volume_id,
            )

    async def _journal(self, volume_id: str, required: bool) -> _Journal | None:
        """The cached journal, else the one on disk; raises on a corrupt one."""
        if volume_id in self._corrupt:
            raise VolumeNeedsRepair(
                f"volume {volume_id!r} needs repair: {self._corrupt[volume_id]}",
                volume_id=volume_id,
            )
        cached = self._journals.get(volume_id)
        if cached is not None:
            return cached
        path = self._layout.journal(volume_id)

        def read() -> bytes | None:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

        raw = await run_blocking(self.reactor, self.threadpool, read)
        if raw is None:
            if required:
                raise VolumeNotFound(f"no volume {volume_id!r}", volume_id=volume_id)
            return None
        try:
            journal = _Journal.parse(volume_id, raw)
        except _CorruptJournal as e:
            self._corrupt[volume_id] = str(e)
            self.log.error(
                "volume {volume_id}: corrupt journal {path} ({reason}); "
                "volume marked needs-repair, journal left as is",
                volume_id=volume_id,
                path=str(path),
                reason=str(e),
            )
            self._publish_state(volume_id, NEEDS_REPAIR, 0, str(e))
            raise VolumeNeedsRepair(
                f"volume {volume_id!r} needs repair: {e}", volume_id=volume_id
            ) from None
        self._journals[volume_id] = journal
        return journal

    _KEEP: ClassVar[object] = object()

    async def _save(
        self,
        journal: _Journal,
        *,
        observed: str | None = None,
        observed_generation: int | None = None,
        needs_repair: bool | None = None,
        error: BaseException | object | None = _KEEP,
        detail: str = "",
        force: bool = False,
    ) -> _Journal:
        """
        Write ``journal`` with the given changes if anything changed (or
        ``force``), cache it, and publish its state.  Returns what is cached.
        """
        changes: dict[str, Any] = {}
        if observed is not None:
            changes["observed"] = observed
        if observed_generation is not None:
            changes["observed_generation"] = observed_generation
        if needs_repair is not None:
            changes["needs_repair"] = needs_repair
        if error is not self._KEEP:
            changes["last_error"] = (
                None if error is None else _describe(error)  # type: ignore[arg-type]
            )
        new = attrs.evolve(journal, **changes)
        cached = self._journals.get(journal.volume_id)
        if (
            not force
            and cached is not None
            and attrs.evolve(new, updated_at=0.0) == attrs.evolve(cached, updated_at=0.0)
        ):
            return cached
        new = attrs.evolve(new, updated_at=self.reactor.seconds())
        path = self._layout.journal(journal.volume_id)
        data = new.to_bytes()
        try:
            await run_blocking(self.reactor, self.threadpool, lambda: write_atomically(path, data))
        except OSError as e:
            raise VolumeError(
                f"cannot write the journal of volume {journal.volume_id!r}: {e.strerror or e}",
                volume_id=journal.volume_id,
            ) from None
        self._journals[journal.volume_id] = new
        self._publish(new, detail)
        return new

    def _publish(self, journal: _Journal, detail: str = "") -> None:
        self._publish_state(
            journal.volume_id,
            journal.observed,
            journal.generation,
            detail or journal.last_error or "",
        )

    def _publish_state(self, volume_id: str, state: str, generation: int, detail: str) -> None:
        if self.bus is None:
            return
        self.bus.publish(
            VolumeStateChanged(
                volume_id=volume_id, state=state, generation=generation, detail=detail
            ),
            source=self.source,
        )

    def _status_of(self, journal: _Journal) -> VolumeStatus:
        mounted = self.adapter.is_mounted(journal.volume_id)
        path = None
        if mounted:
            path = self._paths.get(journal.volume_id) or str(
                self._layout.mountpoint(journal.volume_id)
            )
        return VolumeStatus(
            volume_id=journal.volume_id,
            state=journal.observed,
            desired=journal.desired,
            read_only=journal.read_only,
            generation=journal.generation,
            observed_generation=journal.observed_generation,
            needs_repair=journal.needs_repair,
            last_error=journal.last_error,
            created=journal.created,
            mounted=mounted,
            path=path,
            encrypted=bool(self.adapter.encrypted),
            updated_at=journal.updated_at,
        )

    def _corrupt_status(self, volume_id: str) -> VolumeStatus:
        return VolumeStatus(
            volume_id=volume_id,
            state=NEEDS_REPAIR,
            needs_repair=True,
            last_error=self._corrupt.get(volume_id),
            mounted=self.adapter.is_mounted(volume_id),
            encrypted=bool(self.adapter.encrypted),
        )

    def _lost(self, volume_id: str, reason: str) -> None:
        """The adapter lost a mount it did not unmount (the process died)."""
        self.log.error(
            "volume {volume_id} lost its mount: {reason}", volume_id=volume_id, reason=reason
        )
        self._paths.pop(volume_id, None)

        async def mark(vid: str) -> None:
            journal = self._journals.get(vid)
            if journal is None:
                try:
                    journal = await self._journal(vid, required=True)
                except VolumeError:
                    return
                assert journal is not None
            if journal.needs_repair or self.adapter.is_mounted(vid):
                return
            await self._save(journal, observed=FAILED, error=VolumeError(reason))

        d = Deferred.fromCoroutine(self._serial(volume_id, mark))
        d.addErrback(
            lambda f: self.log.failure(
                "while recording the lost mount of {volume_id}", f, volume_id=volume_id
            )
        )
