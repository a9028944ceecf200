"""
Per-volume passphrases, wrapped by the data key.

Each volume (``control``, ``bootstrap``, ``app-<name>``) gets its own random
passphrase: 32 bytes from :func:`secrets.token_bytes`, hex-encoded (64 ASCII
characters, safe to hand to ``gocryptfs`` on stdin).  They live in
``volume-keys.json`` beside the keyset, each encrypted with AES-256-GCM
under ``HKDF(data key, "piccolod/volume-keys/v1")`` with associated data
binding it to the keyset id and the volume id, so a wrap can be neither
moved to another volume nor replayed from another keyset.

They sit beside the keyset rather than in the control store because the
control store itself lives on the ``control`` volume: its passphrase must
be readable before the store can be opened.

A damaged file is an error, never silently replaced: replacing it would
lose the passphrases of existing volumes, and with them their data.
Blocking; the service calls it from a thread.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from piccolod.errors import InvalidCommand
from piccolod.persistence.errors import KeysetCorrupt
from piccolod.persistence.keyset import DataKey, _b64, _unb64, write_atomically

__all__ = ["VOLUME_ID", "VolumeKeys", "check_volume_id"]

FORMAT = "piccolod-volume-keys"
VERSION = 1
#: What a volume id may look like.
VOLUME_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_LABEL = "piccolod/volume-keys/v1"


def check_volume_id(volume_id: object) -> str:
    """Return ``volume_id`` if well-formed; raise ``InvalidCommand``."""
    if not isinstance(volume_id, str) or not VOLUME_ID.fullmatch(volume_id):
        raise InvalidCommand(f"volume id must match {VOLUME_ID.pattern}, got {volume_id!r}")
    return volume_id


def _aad(keyset_id: str, volume_id: str) -> bytes:
    return f"{FORMAT}\x00v{VERSION}\x00{keyset_id}\x00{volume_id}".encode()


@attrs.define(eq=False)
class VolumeKeys:
    """``volume-keys.json`` in ``directory``."""

    directory: Path
    filename: str = "volume-keys.json"

    @property
    def path(self) -> Path:
        return self.directory / self.filename

    def _read(self, keyset_id: str) -> dict[str, dict[str, str]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise KeysetCorrupt("volume keys: the file is not valid JSON") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise KeysetCorrupt("volume keys: not a piccolod volume-keys file")
        if raw.get("version") != VERSION:
            raise KeysetCorrupt(f"volume keys: unsupported version {raw.get('version')!r}")
        if raw.get("keyset_id") != keyset_id:
            raise KeysetCorrupt("volume keys: the file belongs to another keyset")
        volumes = raw.get("volumes")
        if not isinstance(volumes, dict):
            raise KeysetCorrupt("volume keys: 'volumes' is not an object")
        for volume_id, entry in volumes.items():
            if not isinstance(volume_id, str) or not VOLUME_ID.fullmatch(volume_id):
                raise KeysetCorrupt("volume keys: a volume id is malformed")
            if not isinstance(entry, dict):
                raise KeysetCorrupt(f"volume keys: the entry of {volume_id!r} is not an object")
        return volumes

    def load(self, data_key: DataKey, keyset_id: str) -> dict[str, bytes]:
        """Every stored passphrase, unwrapped; raises ``KeysetCorrupt``."""
        aead = AESGCM(data_key.derive(_LABEL))
        found: dict[str, bytes] = {}
        for volume_id, entry in self._read(keyset_id).items():
            nonce = _unb64(entry.get("nonce"), f"nonce of volume {volume_id!r}", 12)
            ciphertext = _unb64(entry.get("ciphertext"), f"ciphertext of volume {volume_id!r}")
            try:
                found[volume_id] = aead.decrypt(nonce, ciphertext, _aad(keyset_id, volume_id))
            except InvalidTag:
                raise KeysetCorrupt(
                    f"volume keys: the passphrase of {volume_id!r} fails authentication"
                ) from None
        return found

    def forget(self, keyset_id: str, volume_id: str) -> None:
        """Drop the passphrase of a deleted volume (atomic; idempotent)."""
        check_volume_id(volume_id)
        entries: dict[str, Any] = dict(self._read(keyset_id))
        if entries.pop(volume_id, None) is None:
            return
        body = {"format": FORMAT, "version": VERSION, "keyset_id": keyset_id, "volumes": entries}
        write_atomically(self.path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())

    def ensure(
        self, data_key: DataKey, keyset_id: str, volume_ids: Iterable[str]
    ) -> dict[str, bytes]:
        """
        Every stored passphrase, after creating those of ``volume_ids`` that
        are missing (one atomic write for all of them).
        """
        wanted = [check_volume_id(v) for v in volume_ids]
        entries: dict[str, Any] = dict(self._read(keyset_id))
        found = self.load(data_key, keyset_id)
        missing = [v for v in dict.fromkeys(wanted) if v not in found]
        if not missing:
            return found
        aead = AESGCM(data_key.derive(_LABEL))
        for volume_id in missing:
            passphrase = secrets.token_hex(32).encode("ascii")
            nonce = secrets.token_bytes(12)
            entries[volume_id] = {
                "nonce": _b64(nonce),
                "ciphertext": _b64(aead.encrypt(nonce, passphrase, _aad(keyset_id, volume_id))),
            }
            found[volume_id] = passphrase
        body = {"format": FORMAT, "version": VERSION, "keyset_id": keyset_id, "volumes": entries}
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(self.path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
        return found
