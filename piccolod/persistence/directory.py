"""
The ``directory`` volume adapter: plain directories, for development.

**Nothing is encrypted.**  Every start logs a warning saying so; a real box
configures ``[subsystems.volumes] variant = "gocryptfs"``.

Layout (the same as gocryptfs', so that the manager and the tests cannot
tell them apart)::

    volumes/ciphertext/<id>/volume.json   passphrase verifier (salted scrypt)
    volumes/ciphertext/<id>/data/         the volume's files, in plaintext
    volumes/mounts/<id> -> ../ciphertext/<id>/data   a symlink while mounted

"Mounting" checks the passphrase against the verifier and creates the
symlink (atomically); "unmounting" removes it, so a stale path stops
working just as an unmounted FUSE mount would.  The passphrase is checked
like a real adapter would (``WrongPassphrase``), so code above cannot rely
on a mistake that only the real adapter would catch.  ``read_only`` is
recorded but **not enforced** (the daemon runs as root, which permission
bits do not stop); only the gocryptfs adapter refuses writes on a
read-only mount.  Mounts never die on their own, so lost-mount observers
are never called.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from piccolod.errors import ConfigError
from piccolod.interfaces import IVolumeAdapter
from piccolod.kernel.plugins import SubsystemContext
from piccolod.persistence.volumes import (
    VolumeCorrupt,
    VolumeError,
    VolumeLayout,
    VolumeNotFound,
    WrongPassphrase,
    check_passphrase,
    check_volume_id,
    run_blocking,
    write_atomically,
)

__all__ = ["DirectoryVolumes"]

#: The verifier file inside a volume's ciphertext directory.
VERIFIER = "volume.json"
#: The plaintext data directory inside it.
DATA = "data"

#: The warning logged at every start.
NOT_ENCRYPTED = (
    "VOLUMES ARE NOT ENCRYPTED: the 'directory' volume adapter keeps every volume "
    "in plaintext under {root} (development only). A real box configures "
    '[subsystems.volumes] variant = "gocryptfs".'
)


@implementer(IVolumeAdapter)
@attrs.define(eq=False)
class DirectoryVolumes(Service):
    """
    ``IVolumeAdapter`` on plain directories (see the module docstring).

    @ivar reactor: used only with ``threadpool``.
    @ivar state_dir: the daemon's state dir.
    @ivar threadpool: where file I/O and the KDF run; ``None``: inline.
    @ivar scrypt_n: the verifier's scrypt cost (passphrases are random keys
        from the keyset, so the KDF is defence in depth, kept cheap).
    """

    log: ClassVar[Logger] = Logger()
    kind: ClassVar[str] = "directory"
    encrypted: ClassVar[bool] = False

    reactor: Any
    state_dir: Path = attrs.field(converter=Path)
    threadpool: ThreadPool | None = attrs.field(default=None, kw_only=True)
    scrypt_n: int = attrs.field(default=2**10, kw_only=True)
    _layout: VolumeLayout = attrs.field(init=False)
    _mounts: dict[str, bool] = attrs.field(init=False, factory=dict)
    _observers: list[Callable[[str, str], None]] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)
        if self.scrypt_n < 2 or self.scrypt_n & (self.scrypt_n - 1):
            raise ConfigError(
                [f"volumes: scrypt_n must be a power of two >= 2, not {self.scrypt_n}"]
            )
        self._layout = VolumeLayout(self.state_dir)

    @classmethod
    def from_context(cls, ctx: SubsystemContext) -> DirectoryVolumes:
        """Build for the ``volumes`` slot; volumes live under the kernel's state dir."""
        return cls(ctx.reactor, ctx.kernel.state_dir)

    # -- IService -----------------------------------------------------------

    def startService(self) -> None:
        self.running = True
        self.log.warn(NOT_ENCRYPTED, root=str(self._layout.root))

    def stopService(self) -> Deferred[None]:
        self.running = False
        for volume_id in list(self._mounts):
            self._unmount(volume_id)
        return succeed(None)

    # -- IVolumeAdapter -----------------------------------------------------

    def create(self, volume_id: str, passphrase: bytes) -> Deferred[None]:
        try:
            check_volume_id(volume_id)
            check_passphrase(passphrase)
        except Exception as e:
            return fail(e)
        return self._blocking(lambda: self._create(volume_id, passphrase))

    def mount(self, volume_id: str, passphrase: bytes, read_only: bool) -> Deferred[str]:
        try:
            check_volume_id(volume_id)
            check_passphrase(passphrase)
        except Exception as e:
            return fail(e)
        return self._blocking(lambda: self._mount(volume_id, passphrase, bool(read_only)))

    def unmount(self, volume_id: str) -> Deferred[None]:
        try:
            check_volume_id(volume_id)
        except Exception as e:
            return fail(e)
        return self._blocking(lambda: self._unmount(volume_id))

    def is_mounted(self, volume_id: str) -> bool:
        check_volume_id(volume_id)
        return volume_id in self._mounts

    def mounted(self) -> Sequence[str]:
        return sorted(self._mounts)

    def read_only(self, volume_id: str) -> bool | None:
        """The recorded mode of a mounted volume (``None``: not mounted)."""
        return self._mounts.get(check_volume_id(volume_id))

    def watch_lost(self, observer: Callable[[str, str], None]) -> Callable[[], None]:
        self._observers.append(observer)

        def stop() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return stop

    # -- blocking parts -----------------------------------------------------

    def _blocking(self, fn: Callable[[], Any]) -> Deferred[Any]:
        return run_blocking(self.reactor, self.threadpool, fn)

    def _verifier(self, passphrase: bytes, salt: bytes, n: int) -> bytes:
        return hashlib.scrypt(passphrase, salt=salt, n=n, r=8, p=1, dklen=32, maxmem=2**27)

    def _check(self, volume_id: str, passphrase: bytes) -> None:
        """Check ``passphrase`` against the volume's verifier."""
        cipher = self._layout.ciphertext(volume_id)
        try:
            raw = (cipher / VERIFIER).read_bytes()
        except FileNotFoundError:
            if cipher.exists() and any(cipher.iterdir()):
                raise VolumeCorrupt(
                    f"volume {volume_id!r}: {cipher} is not a directory volume (no {VERIFIER})",
                    volume_id=volume_id,
                ) from None
            raise VolumeNotFound(f"no volume {volume_id!r}", volume_id=volume_id) from None
        try:
            body = json.loads(raw)
            salt = base64.b64decode(body["salt"], validate=True)
            expected = base64.b64decode(body["verifier"], validate=True)
            n = int(body["n"])
            if body.get("kind") != self.kind or n < 2 or n & (n - 1):
                raise ValueError("unexpected kind or cost")
        except (ValueError, KeyError, TypeError) as e:
            raise VolumeCorrupt(
                f"volume {volume_id!r}: unreadable {VERIFIER}: {e}", volume_id=volume_id
            ) from None
        if not hmac.compare_digest(self._verifier(passphrase, salt, n), expected):
            raise WrongPassphrase(
                f"the passphrase does not open volume {volume_id!r}", volume_id=volume_id
            )
        if not (cipher / DATA).is_dir():
            raise VolumeCorrupt(
                f"volume {volume_id!r}: data directory missing", volume_id=volume_id
            )

    def _create(self, volume_id: str, passphrase: bytes) -> None:
        cipher = self._layout.ciphertext(volume_id)
        if (cipher / VERIFIER).exists():
            self._check(volume_id, passphrase)
            return
        if cipher.exists() and any(cipher.iterdir()):
            raise VolumeCorrupt(
                f"volume {volume_id!r}: {cipher} is not empty and holds no {VERIFIER}",
                volume_id=volume_id,
            )
        cipher.mkdir(mode=0o700, parents=True, exist_ok=True)
        (cipher / DATA).mkdir(mode=0o700, exist_ok=True)
        salt = secrets.token_bytes(16)
        body = {
            "format": 1,
            "kind": self.kind,
            "n": self.scrypt_n,
            "salt": base64.b64encode(salt).decode(),
            "verifier": base64.b64encode(self._verifier(passphrase, salt, self.scrypt_n)).decode(),
        }
        write_atomically(cipher / VERIFIER, json.dumps(body).encode())
        self.log.info("volume {volume_id} created (directory, NOT encrypted)", volume_id=volume_id)

    def _mount(self, volume_id: str, passphrase: bytes, read_only: bool) -> str:
        self._check(volume_id, passphrase)
        target = self._layout.ciphertext(volume_id) / DATA
        link = self._layout.mountpoint(volume_id)
        link.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        relative = os.path.relpath(target, link.parent)
        if link.is_symlink() and os.readlink(link) == relative and volume_id in self._mounts:
            self._mounts[volume_id] = read_only
            return str(link)
        if link.is_symlink():
            link.unlink()
        elif link.is_dir():
            # An empty mountpoint left by the gocryptfs adapter.
            try:
                link.rmdir()
            except OSError:
                raise VolumeError(
                    f"volume {volume_id!r}: mountpoint {link} is a non-empty directory",
                    volume_id=volume_id,
                ) from None
        elif link.exists():
            raise VolumeError(
                f"volume {volume_id!r}: mountpoint {link} is in the way", volume_id=volume_id
            )
        tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
        os.symlink(relative, tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            os.unlink(tmp)
            raise
        self._mounts[volume_id] = read_only
        self.log.info(
            "volume {volume_id} mounted at {path} ({mode}, NOT encrypted)",
            volume_id=volume_id,
            path=str(link),
            mode="ro" if read_only else "rw",
        )
        return str(link)

    def _unmount(self, volume_id: str) -> None:
        link = self._layout.mountpoint(volume_id)
        if link.is_symlink():
            link.unlink()
        if self._mounts.pop(volume_id, None) is not None:
            self.log.info("volume {volume_id} unmounted", volume_id=volume_id)
