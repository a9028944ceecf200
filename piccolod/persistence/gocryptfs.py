"""
The ``gocryptfs`` volume adapter: each volume is a gocryptfs ciphertext
directory, mounted by a supervised ``gocryptfs -fg`` child process.

- **create** runs ``gocryptfs -init -q -scryptn N -- <cipher>`` with the
  passphrase on stdin (never in argv, the environment or a file).  On an
  existing volume it checks the passphrase against ``gocryptfs.conf``
  instead (scrypt → HKDF → AES-GCM, the documented format of gocryptfs 2;
  a config it cannot read is accepted and left to the mount to judge).
- **mount** spawns ``gocryptfs -fg -nosyslog -q [-ro] -- <cipher> <mount>``
  through the injected ``IReactorProcess``; the protocol writes the
  passphrase to stdin and closes it.  The mount must appear in
  ``/proc/self/mountinfo`` within ``mount_timeout`` seconds (polled on the
  reactor's clock), else the process gets SIGTERM, then SIGKILL after
  ``kill_grace``, and the mount fails with ``MountTimeout``.  Exit code 12
  is ``WrongPassphrase``.
- **supervision**: a mount process that exits while mounted (killed, a
  crash) is noticed at once (``processEnded``): the dead FUSE mount is
  cleaned up with ``fusermount -u`` and every ``watch_lost`` observer is
  told, so the manager marks the volume ``failed`` and publishes it.
- **unmount** runs ``fusermount3 -u -- <mount>`` and waits for the mount
  process to exit; "busy" is retried ``busy_retries`` times ``busy_delay``
  apart (a mount is briefly busy right after it appears), then it is
  ``VolumeBusy`` (the volume stays mounted).
  A stale or foreign mount found at the mountpoint (a mount process that
  died, or survived a previous daemon) is unmounted before a new mount.
- **stop** unmounts everything; a busy volume's process gets SIGTERM
  (gocryptfs then unmounts lazily), then SIGKILL, so shutdown is bounded.

``scrypt_logn`` defaults to 10 (gocryptfs' minimum): volume passphrases are
random keys handed out by the keyset (already behind Argon2id), so a slow
KDF per volume would only lengthen every unlock.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from piccolod.errors import ConfigError
from piccolod.interfaces import IVolumeAdapter
from piccolod.kernel.plugins import SubsystemContext
from piccolod.persistence.volumes import (
    MountTimeout,
    VolumeBusy,
    VolumeCorrupt,
    VolumeError,
    VolumeLayout,
    VolumeNotFound,
    WrongPassphrase,
    check_passphrase,
    check_volume_id,
    run_blocking,
)

__all__ = ["CONF", "GocryptfsVolumes", "read_mountinfo", "verify_conf"]

#: The config file gocryptfs writes into a ciphertext directory.
CONF = "gocryptfs.conf"
#: gocryptfs' exit code for a wrong password.
EXIT_PASSWORD = 12
_EXIT_MEANING = {
    6: "invalid ciphertext directory",
    9: "could not read the passphrase",
    10: "invalid mountpoint",
    12: "wrong passphrase",
    15: "terminated",
}
#: The environment of every spawned tool (nothing inherited).
DEFAULT_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
}
_OUTPUT_LIMIT = 4096
_HKDF_INFO_GCM = b"AES-GCM file content encryption"


# --------------------------------------------------------------------------
# Helpers


def read_mountinfo(path: str = "/proc/self/mountinfo") -> set[str]:
    """
    Every mountpoint listed in ``path`` (octal escapes decoded).  Dead FUSE
    mounts are listed too, unlike ``os.path.ismount``, which fails on them.
    """
    points: set[str] = set()
    with open(path, "rb") as f:
        for line in f:
            fields = line.split(b" ", 5)
            if len(fields) > 4:
                points.add(_unescape(fields[4]))
    return points


def _unescape(field: bytes) -> str:
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def verify_conf(conf: bytes, passphrase: bytes) -> bool | None:
    """
    Whether ``passphrase`` opens a gocryptfs 2 config (``gocryptfs.conf``
    contents): ``True``, ``False``, or ``None`` when the config uses a
    scheme this check does not know (the mount decides then).  The master
    key it decrypts is dropped at once.
    """
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError:  # pragma: no cover - cryptography comes with twisted[tls]
        return None
    import hashlib

    try:
        body = json.loads(conf)
        flags = set(body["FeatureFlags"])
        scrypt = body["ScryptObject"]
        salt = base64.b64decode(scrypt["Salt"])
        n, r, p, key_len = (int(scrypt[k]) for k in ("N", "R", "P", "KeyLen"))
        blob = base64.b64decode(body["EncryptedKey"])
        version = body["Version"]
    except (ValueError, KeyError, TypeError):
        return None
    if (
        version != 2
        or not {"HKDF", "GCMIV128"} <= flags
        or flags & {"AESSIV", "XChaCha20Poly1305"}
        or key_len != 32
        or n > 2**20
        or r > 64
        or p > 16
        or len(blob) < 32
    ):
        return None
    try:
        scrypt_hash = hashlib.scrypt(
            passphrase, salt=salt, n=n, r=r, p=p, dklen=key_len, maxmem=256 * r * n * p + 2**20
        )
    except ValueError:
        return None
    key = HKDF(hashes.SHA256(), 32, None, _HKDF_INFO_GCM).derive(scrypt_hash)
    try:
        master = AESGCM(key).decrypt(blob[:16], blob[16:], (0).to_bytes(8, "big"))
    except InvalidTag:
        return False
    del master
    return True


@attrs.frozen
class _Exit:
    code: int | None
    signal: int | None

    @classmethod
    def of(cls, reason: Failure) -> _Exit:
        value = reason.value
        if isinstance(value, (ProcessDone, ProcessTerminated)):
            return cls(value.exitCode, value.signal)
        return cls(None, None)

    @property
    def ok(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        meaning = _EXIT_MEANING.get(self.code or 0, "")
        return f"exit code {self.code}" + (f" ({meaning})" if meaning else "")


class _Tool(ProcessProtocol):
    """
    One spawned tool: writes ``stdin`` (the passphrase) once connected and
    closes it, keeps the tail of stdout+stderr, and fires ``ended`` with
    the :class:`_Exit`.
    """

    def __init__(self, stdin: bytes | None) -> None:
        self._stdin = stdin
        self._output = bytearray()
        self.ended: Deferred[_Exit] = Deferred()
        self.exit: _Exit | None = None
        self._waiters: list[Deferred[None]] = []

    def when_ended(self) -> Deferred[None]:
        """A new Deferred firing once the process has exited (cancellable)."""
        if self.exit is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._forget)
        self._waiters.append(waiter)
        return waiter

    def _forget(self, waiter: Deferred[None]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self._stdin is not None:
            self.transport.write(self._stdin)
            self._stdin = None
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._keep(data)

    def errReceived(self, data: bytes) -> None:
        self._keep(data)

    def _keep(self, data: bytes) -> None:
        self._output += data
        if len(self._output) > _OUTPUT_LIMIT:
            del self._output[: len(self._output) - _OUTPUT_LIMIT]

    def output(self) -> str:
        return " ".join(self._output.decode("utf-8", "replace").split())

    def processEnded(self, reason: Failure) -> None:
        self._stdin = None
        self.exit = _Exit.of(reason)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self.ended.callback(self.exit)


@attrs.define(eq=False)
class _Mount:
    volume_id: str
    path: Path
    read_only: bool
    tool: _Tool
    transport: IProcessTransport
    #: "mounting" | "mounted" | "unmounting" | "abandoned"
    state: str = "mounting"


# --------------------------------------------------------------------------
# The adapter


def _process_reactor(value: Any) -> None:
    if not (IReactorProcess.providedBy(value) and IReactorTime.providedBy(value)):
        raise TypeError(f"reactor must provide IReactorProcess and IReactorTime, got {value!r}")


@implementer(IVolumeAdapter)
@attrs.define(eq=False)
class GocryptfsVolumes(Service):
    """
    ``IVolumeAdapter`` on gocryptfs (see the module docstring).

    @ivar reactor: spawns the tools and polls the mount table.
    @ivar gocryptfs: the gocryptfs executable (an absolute path).
    @ivar fusermount: the fusermount3 (or fusermount) executable.
    @ivar mount_table: the mountpoints currently listed by the kernel
        (default: :func:`read_mountinfo`).
    """

    log: ClassVar[Logger] = Logger()
    kind: ClassVar[str] = "gocryptfs"
    encrypted: ClassVar[bool] = True

    reactor: Any = attrs.field(validator=lambda _i, _a, v: _process_reactor(v))
    state_dir: Path = attrs.field(converter=Path)
    gocryptfs: str = attrs.field(default="/usr/bin/gocryptfs", kw_only=True)
    fusermount: str = attrs.field(default="/usr/bin/fusermount3", kw_only=True)
    scrypt_logn: int = attrs.field(default=10, kw_only=True)
    mount_timeout: float = attrs.field(default=5.0, kw_only=True)
    unmount_timeout: float = attrs.field(default=10.0, kw_only=True)
    kill_grace: float = attrs.field(default=2.0, kw_only=True)
    poll_interval: float = attrs.field(default=0.02, kw_only=True)
    busy_retries: int = attrs.field(default=3, kw_only=True)
    busy_delay: float = attrs.field(default=0.1, kw_only=True)
    env: Mapping[str, str] = attrs.field(factory=lambda: dict(DEFAULT_ENV), kw_only=True)
    mount_table: Callable[[], Collection[str]] = attrs.field(default=read_mountinfo, kw_only=True)
    threadpool: ThreadPool | None = attrs.field(default=None, kw_only=True)
    _layout: VolumeLayout = attrs.field(init=False)
    _mounts: dict[str, _Mount] = attrs.field(init=False, factory=dict)
    _locks: dict[str, DeferredLock] = attrs.field(init=False, factory=dict)
    _observers: list[Callable[[str, str], None]] = attrs.field(init=False, factory=list)
    _cleanups: set[Deferred[Any]] = attrs.field(init=False, factory=set)

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)
        errors = []
        if not 10 <= self.scrypt_logn <= 28:
            errors.append(f"scrypt_logn must be 10..28, not {self.scrypt_logn}")
        if self.busy_retries < 0:
            errors.append(f"busy_retries must be >= 0, not {self.busy_retries}")
        for name in (
            "mount_timeout",
            "unmount_timeout",
            "kill_grace",
            "poll_interval",
            "busy_delay",
        ):
            if not getattr(self, name) > 0:
                errors.append(f"{name} must be > 0")
        if errors:
            raise ConfigError([f"volumes: {e}" for e in errors])
        self._layout = VolumeLayout(self.state_dir)

    @classmethod
    def from_context(cls, ctx: SubsystemContext) -> GocryptfsVolumes:
        """
        Build for the ``volumes`` slot.  Fails with ``ConfigError`` when
        gocryptfs, fusermount or ``/dev/fuse`` is missing (a clear startup
        error rather than failed unlocks later).
        """
        config = ctx.config
        errors = []
        found: dict[str, str] = {}
        for key, choices in (
            ("gocryptfs", [str(config["gocryptfs"])]),
            (
                "fusermount",
                [str(config["fusermount"])]
                if config["fusermount"]
                else ["fusermount3", "fusermount"],
            ),
        ):
            for choice in choices:
                path = shutil.which(choice, path=DEFAULT_ENV["PATH"]) or shutil.which(choice)
                if path:
                    found[key] = path
                    break
            else:
                errors.append(
                    f"[subsystems.{ctx.slot}] {key}: none of {', '.join(choices)} is installed"
                )
        fuse = str(config["fuse_device"])
        if not os.path.exists(fuse):
            errors.append(f"[subsystems.{ctx.slot}] {fuse} is missing: FUSE is not available")
        if errors:
            raise ConfigError(errors)
        pool = None
        get_pool = getattr(ctx.reactor, "getThreadPool", None)
        if get_pool is not None:
            pool = get_pool()
        return cls(
            ctx.reactor,
            ctx.kernel.state_dir,
            gocryptfs=found["gocryptfs"],
            fusermount=found["fusermount"],
            scrypt_logn=int(config["scrypt_logn"]),
            mount_timeout=float(config["mount_timeout"]),
            unmount_timeout=float(config["unmount_timeout"]),
            kill_grace=float(config["kill_grace"]),
            threadpool=pool,
        )

    # -- IService -----------------------------------------------------------

    def startService(self) -> None:
        self.running = True
        self._layout.mounts_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log.info(
            "gocryptfs volumes under {root} ({gocryptfs})",
            root=str(self._layout.root),
            gocryptfs=self.gocryptfs,
        )

    def stopService(self) -> Deferred[None]:
        self.running = False
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for volume_id in sorted(self._mounts):
            mount = self._mounts.get(volume_id)
            if mount is None:
                continue
            try:
                await self._serial(volume_id, self._unmount)
            except Exception as e:
                self.log.warn(
                    "volume {volume_id}: {error}; terminating its gocryptfs process",
                    volume_id=volume_id,
                    error=str(e),
                )
                mount.state = "unmounting"
                await self._terminate(mount.tool, mount.transport)
                self._mounts.pop(volume_id, None)
        for d in list(self._cleanups):
            await d

    # -- IVolumeAdapter -----------------------------------------------------

    def create(self, volume_id: str, passphrase: bytes) -> Deferred[None]:
        try:
            check_volume_id(volume_id)
            check_passphrase(passphrase)
        except Exception as e:
            return fail(e)
        return Deferred.fromCoroutine(
            self._serial(volume_id, lambda vid: self._create(vid, passphrase))
        )

    def mount(self, volume_id: str, passphrase: bytes, read_only: bool) -> Deferred[str]:
        try:
            check_volume_id(volume_id)
            check_passphrase(passphrase)
        except Exception as e:
            return fail(e)
        return Deferred.fromCoroutine(
            self._serial(volume_id, lambda vid: self._mount(vid, passphrase, bool(read_only)))
        )

    def unmount(self, volume_id: str) -> Deferred[None]:
        try:
            check_volume_id(volume_id)
        except Exception as e:
            return fail(e)
        return Deferred.fromCoroutine(self._serial(volume_id, self._unmount))

    def is_mounted(self, volume_id: str) -> bool:
        mount = self._mounts.get(check_volume_id(volume_id))
        return mount is not None and mount.state == "mounted"

    def mounted(self) -> Sequence[str]:
        return sorted(vid for vid, m in self._mounts.items() if m.state == "mounted")

    def read_only(self, volume_id: str) -> bool | None:
        """The mode of a mounted volume (``None``: not mounted)."""
        mount = self._mounts.get(check_volume_id(volume_id))
        return mount.read_only if mount is not None and mount.state == "mounted" else None

    def pid(self, volume_id: str) -> int | None:
        """The pid of the volume's gocryptfs process (``None``: not mounted)."""
        mount = self._mounts.get(check_volume_id(volume_id))
        return None if mount is None else mount.transport.pid

    def watch_lost(self, observer: Callable[[str, str], None]) -> Callable[[], None]:
        self._observers.append(observer)

        def stop() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return stop

    # -- operations ---------------------------------------------------------

    async def _serial(self, volume_id: str, fn: Callable[[str], Any]) -> Any:
        lock = self._locks.get(volume_id)
        if lock is None:
            lock = self._locks[volume_id] = DeferredLock()
        await lock.acquire()
        try:
            return await fn(volume_id)
        finally:
            lock.release()

    async def _create(self, volume_id: str, passphrase: bytes) -> None:
        cipher = self._layout.ciphertext(volume_id)
        conf = cipher / CONF

        def existing() -> tuple[bytes | None, bool]:
            try:
                return conf.read_bytes(), True
            except FileNotFoundError:
                return None, cipher.exists() and any(cipher.iterdir())

        raw, occupied = await run_blocking(self.reactor, self.threadpool, existing)
        if raw is not None:
            verdict = await run_blocking(
                self.reactor, self.threadpool, lambda: verify_conf(raw, passphrase)
            )
            if verdict is False:
                raise WrongPassphrase(
                    f"the passphrase does not open volume {volume_id!r}", volume_id=volume_id
                )
            if verdict is None:
                self.log.info(
                    "volume {volume_id}: config not checkable here; the mount will check "
                    "the passphrase",
                    volume_id=volume_id,
                )
            return
        if occupied:
            raise VolumeCorrupt(
                f"volume {volume_id!r}: {cipher} is not empty and holds no {CONF}",
                volume_id=volume_id,
            )
        made = not cipher.exists()
        cipher.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = [self.gocryptfs, "-init", "-q", "-scryptn", str(self.scrypt_logn), "--", str(cipher)]
        try:
            exit, output = await self._run(argv, passphrase, self.unmount_timeout)
        except BaseException:
            self._undo_init(cipher, made)
            raise
        if not exit.ok:
            self._undo_init(cipher, made)
            raise VolumeError(
                f"gocryptfs -init of volume {volume_id!r} failed ({exit.describe()}): {output}",
                volume_id=volume_id,
            )
        self.log.info("volume {volume_id} created (gocryptfs)", volume_id=volume_id)

    def _undo_init(self, cipher: Path, made: bool) -> None:
        if made:
            shutil.rmtree(cipher, ignore_errors=True)
            return
        for name in (CONF, "gocryptfs.diriv"):
            with contextlib.suppress(FileNotFoundError):
                (cipher / name).unlink()

    async def _mount(self, volume_id: str, passphrase: bytes, read_only: bool) -> str:
        cipher = self._layout.ciphertext(volume_id)
        point = self._layout.mountpoint(volume_id)
        current = self._mounts.get(volume_id)
        if current is not None and current.state == "mounted":
            if current.read_only == read_only:
                return str(point)
            await self._unmount(volume_id)

        def prepare() -> None:
            if not (cipher / CONF).exists():
                if cipher.exists() and any(cipher.iterdir()):
                    raise VolumeCorrupt(
                        f"volume {volume_id!r}: {cipher} holds no {CONF}", volume_id=volume_id
                    )
                raise VolumeNotFound(f"no volume {volume_id!r}", volume_id=volume_id)
            point.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

        await run_blocking(self.reactor, self.threadpool, prepare)
        key = self._key(volume_id)
        if key in self.mount_table():
            self.log.warn(
                "volume {volume_id}: a stale mount is at {path}; unmounting it first",
                volume_id=volume_id,
                path=key,
            )
            await self._fusermount(volume_id, point)

        def mountpoint() -> None:
            if point.is_symlink():  # left by the directory adapter
                point.unlink()
            point.mkdir(mode=0o700, exist_ok=True)
            if any(point.iterdir()):
                raise VolumeError(
                    f"volume {volume_id!r}: mountpoint {point} is not empty (was something "
                    "written there while the volume was not mounted?)",
                    volume_id=volume_id,
                )

        await run_blocking(self.reactor, self.threadpool, mountpoint)
        argv = [self.gocryptfs, "-fg", "-nosyslog", "-q"]
        if read_only:
            argv.append("-ro")
        argv += ["--", str(cipher), str(point)]
        tool = _Tool(passphrase)
        try:
            transport = self.reactor.spawnProcess(tool, argv[0], argv, env=dict(self.env))
        except OSError as e:
            raise VolumeError(f"cannot run {argv[0]}: {e}", volume_id=volume_id) from None
        mount = _Mount(volume_id, point, read_only, tool, transport)
        self._mounts[volume_id] = mount
        tool.ended.addCallback(self._ended, mount)
        deadline = self.reactor.seconds() + self.mount_timeout
        while True:
            if tool.exit is not None:
                self._mounts.pop(volume_id, None)
                if tool.exit.code == EXIT_PASSWORD:
                    raise WrongPassphrase(
                        f"the passphrase does not open volume {volume_id!r}",
                        volume_id=volume_id,
                    )
                raise VolumeError(
                    f"gocryptfs could not mount volume {volume_id!r} "
                    f"({tool.exit.describe()}): {tool.output()}",
                    volume_id=volume_id,
                )
            if key in self.mount_table():
                mount.state = "mounted"
                self.log.info(
                    "volume {volume_id} mounted at {path} ({mode}, pid {pid})",
                    volume_id=volume_id,
                    path=str(point),
                    mode="ro" if read_only else "rw",
                    pid=transport.pid,
                )
                return str(point)
            if self.reactor.seconds() >= deadline:
                break
            await deferLater(self.reactor, self.poll_interval, lambda: None)
        mount.state = "abandoned"
        self.log.error(
            "volume {volume_id}: no mount after {timeout}s; terminating gocryptfs",
            volume_id=volume_id,
            timeout=self.mount_timeout,
        )
        await self._terminate(tool, transport)
        self._mounts.pop(volume_id, None)
        if key in self.mount_table():
            await self._fusermount(volume_id, point, lazy=True, quiet=True)
        raise MountTimeout(
            f"volume {volume_id!r} did not mount within {self.mount_timeout}s",
            volume_id=volume_id,
        )

    async def _unmount(self, volume_id: str) -> None:
        point = self._layout.mountpoint(volume_id)
        mount = self._mounts.get(volume_id)
        if mount is None:
            if self._key(volume_id) in self.mount_table():
                await self._fusermount(volume_id, point)
            return
        mount.state = "unmounting"
        try:
            await self._fusermount(volume_id, point)
        except Exception:
            if mount.tool.exit is None:
                mount.state = "mounted"
            else:
                self._mounts.pop(volume_id, None)
            raise
        if not await self._wait_exit(mount.tool, self.unmount_timeout):
            self.log.warn(
                "volume {volume_id}: gocryptfs did not exit after unmount; terminating it",
                volume_id=volume_id,
            )
            await self._terminate(mount.tool, mount.transport)
        self._mounts.pop(volume_id, None)
        self.log.info("volume {volume_id} unmounted", volume_id=volume_id)

    # -- processes ----------------------------------------------------------

    def _key(self, volume_id: str) -> str:
        """The mountpoint as the kernel lists it (symlinks resolved)."""
        return os.path.join(os.path.realpath(self._layout.mounts_dir), volume_id)

    async def _run(self, argv: list[str], stdin: bytes | None, timeout: float) -> tuple[_Exit, str]:
        """Run a tool to completion (killed after ``timeout``)."""
        tool = _Tool(stdin)
        try:
            transport = self.reactor.spawnProcess(tool, argv[0], argv, env=dict(self.env))
        except OSError as e:
            raise VolumeError(f"cannot run {argv[0]}: {e}") from None
        if not await self._wait_exit(tool, timeout):
            await self._terminate(tool, transport)
            raise MountTimeout(f"{os.path.basename(argv[0])} did not finish within {timeout}s")
        assert tool.exit is not None
        return tool.exit, tool.output()

    async def _fusermount(
        self, volume_id: str, point: Path, lazy: bool = False, quiet: bool = False
    ) -> None:
        argv = [self.fusermount, "-u", *(["-z"] if lazy else []), "--", str(point)]
        for attempt in range(self.busy_retries + 1):
            exit, output = await self._run(argv, None, self.unmount_timeout)
            if exit.ok:
                return
            if "busy" not in output.lower() or attempt == self.busy_retries:
                break
            # A mount is briefly busy right after it appears (FUSE INIT in
            # flight); an open file stays busy through the retries.
            await deferLater(self.reactor, self.busy_delay, lambda: None)
        if quiet:
            self.log.warn(
                "volume {volume_id}: fusermount failed: {output}",
                volume_id=volume_id,
                output=output,
            )
            return
        if "busy" in output.lower():
            raise VolumeBusy(
                f"volume {volume_id!r} is busy (files are open in it): {output}",
                volume_id=volume_id,
            )
        if self._key(volume_id) not in self.mount_table():
            return  # it went away meanwhile: unmounted is what was asked
        raise VolumeError(
            f"cannot unmount volume {volume_id!r} ({exit.describe()}): {output}",
            volume_id=volume_id,
        )

    async def _wait_exit(self, tool: _Tool, timeout: float) -> bool:
        """Wait until the process exits; False after ``timeout`` seconds."""
        waiter = tool.when_ended()
        waiter.addTimeout(timeout, self.reactor)
        try:
            await waiter
        except DeferTimeoutError:
            return False
        return True

    async def _terminate(self, tool: _Tool, transport: IProcessTransport) -> None:
        """SIGTERM, then SIGKILL after ``kill_grace``; waits for the exit."""
        for sig in ("TERM", "KILL"):
            if tool.exit is not None:
                return
            try:
                transport.signalProcess(sig)
            except ProcessExitedAlready:
                return
            if await self._wait_exit(tool, self.kill_grace):
                return
        self.log.error("process {pid} did not exit after SIGKILL", pid=transport.pid)

    def _ended(self, exit: _Exit, mount: _Mount) -> _Exit:
        """A mount process exited: unexpected unless we were unmounting it."""
        if mount.state != "mounted":
            return exit
        mount.state = "lost"
        if self._mounts.get(mount.volume_id) is mount:
            del self._mounts[mount.volume_id]
        reason = f"gocryptfs exited unexpectedly ({exit.describe()})"
        output = mount.tool.output()
        if output:
            reason += f": {output}"
        self.log.error(
            "volume {volume_id} lost: {reason}", volume_id=mount.volume_id, reason=reason
        )

        # Clear the dead FUSE mount so that the volume can be mounted again.
        async def clear(vid: str) -> None:
            if self._key(vid) in self.mount_table() and vid not in self._mounts:
                await self._fusermount(vid, mount.path, quiet=True)

        cleanup = Deferred.fromCoroutine(self._serial(mount.volume_id, clear))
        self._cleanups.add(cleanup)
        cleanup.addErrback(
            lambda f: self.log.failure(
                "while clearing the dead mount of {volume_id}", f, volume_id=mount.volume_id
            )
        )
        cleanup.addBoth(lambda _: self._cleanups.discard(cleanup))
        for observer in list(self._observers):
            try:
                observer(mount.volume_id, reason)
            except Exception:
                self.log.failure(
                    "lost-mount observer failed for {volume_id}", volume_id=mount.volume_id
                )
        return exit
