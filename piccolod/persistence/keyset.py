"""
The keyset: a random 256-bit data key, wrapped twice.

The data key (32 bytes from :func:`secrets.token_bytes`) encrypts nothing by
itself: every use derives a purpose-specific sub-key from it with
HKDF-SHA256 (:meth:`DataKey.derive`), e.g. the SQLCipher key of the control
store and the key that wraps the volumes' passphrases.  It is stored only
wrapped, with AES-256-GCM, under

- a **password key**: Argon2id(password, 16-byte random salt), parameters
  stored beside the wrap (defaults sized for a Raspberry Pi: t=3, 64 MiB,
  p=1, about half a second there; see ``docs/persistence.md``);
- a **recovery key**: HKDF-SHA256 over the 256 bits of entropy behind a
  24-word BIP39 phrase.  The phrase already carries 256 random bits, so a
  slow KDF adds nothing; its last word holds an 8-bit checksum, so a typo
  is reported as such before any attempt is made.

Each wrap's associated data binds it to its purpose, the format version, the
keyset id and its KDF parameters, so a wrap cannot be moved to another
keyset or purpose and its parameters cannot be altered unnoticed.  A wrong
password fails AES-GCM's tag check: the comparison is constant-time by
construction and no password hash is stored anywhere.

File format (``keyset.json``, mode 0600)::

    {"format": "piccolod-keyset", "version": 1, "keyset_id": "<32 hex>",
     "generation": 3, "created_at": 1.7e9, "updated_at": 1.7e9,
     "password": {"kdf": {"name": "argon2id", "version": 19, "time_cost": 3,
                          "memory_kib": 65536, "parallelism": 1, "salt": "<b64>"},
                  "cipher": "aes-256-gcm", "nonce": "<b64>", "ciphertext": "<b64>"},
     "recovery": {"kdf": {"name": "hkdf-sha256", "salt": "<b64>"},
                  "cipher": "aes-256-gcm", "nonce": "<b64>", "ciphertext": "<b64>"}}

Writes are atomic (:func:`write_atomically`: temp file, fsync, rename, fsync
of the directory): after a crash at any point the file holds the old or the
new keyset, never neither.  The first keyset is created with ``link(2)`` so
that setup can never overwrite an existing one.

Everything here is blocking (Argon2 by design, file I/O): the service runs
it in a thread pool, never on the reactor thread.

The BIP39 English word list (``bip39_english.txt``) is copied from the
``mnemonic`` package (python-mnemonic, MIT licence, (c) 2013-2016 Pavol
Rusnak); its sha256 is checked when it is loaded.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
import re
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from piccolod.errors import Conflict, InvalidCommand
from piccolod.persistence.errors import KeysetCorrupt, WrongPassword, WrongRecoveryKey

__all__ = [
    "KEYSET_FORMAT",
    "KEYSET_VERSION",
    "DataKey",
    "KdfParams",
    "Keyset",
    "KeysetFile",
    "Wrap",
    "create_keyset",
    "decode_recovery_key",
    "encode_recovery_key",
    "fsync_directory",
    "generate_recovery_key",
    "open_with_password",
    "open_with_recovery_key",
    "rewrap_password",
    "rotate_recovery_key",
    "wordlist",
    "write_atomically",
]

KEYSET_FORMAT = "piccolod-keyset"
KEYSET_VERSION = 1
DATA_KEY_BYTES = 32
SALT_BYTES = 16
NONCE_BYTES = 12
RECOVERY_WORDS = 24
#: Upper bound on a password's UTF-8 length (Argon2 takes any length; this
#: only bounds the work an attacker can make us do per attempt).
MAX_PASSWORD_BYTES = 1024

_WORDLIST_SHA256 = "2f5eed53a4727b4bf8880d8f3f199efc90e58503646d9ff8eff3a2ed3b24dbda"
_ARGON2_VERSION = 19
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


# --------------------------------------------------------------------------
# Files


def fsync_directory(path: Path) -> None:
    """fsync a directory, so that a rename or link inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def write_atomically(path: Path, data: bytes, mode: int = 0o600, exclusive: bool = False) -> None:
    """
    Replace ``path`` with ``data`` atomically: write a temp file in the
    same directory, fsync it, rename it over ``path``, fsync the directory.
    With ``exclusive`` the file must not exist yet (``link(2)`` instead of
    rename, so nothing is ever overwritten); raises ``FileExistsError``.
    """
    tmp = _write_temp(path, data, mode)
    try:
        if exclusive:
            os.link(tmp, path)
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


# --------------------------------------------------------------------------
# The data key in memory


class DataKey:
    """
    The unwrapped data key, held in a ``bytearray`` so that :meth:`wipe`
    can overwrite it in place.

    Limits (documented in ``docs/persistence.md``): Python copies bytes
    where it must (``bytes(...)`` for the crypto calls, the hex string
    handed to SQLCipher), those copies are immutable and die with the
    garbage collector, not at :meth:`wipe`; and nothing stops a debugger or
    a core dump.  Wiping narrows the window; it does not close it.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) != DATA_KEY_BYTES:
            raise ValueError(f"a data key has {DATA_KEY_BYTES} bytes")
        self._key: bytearray | None = bytearray(key)

    @classmethod
    def generate(cls) -> DataKey:
        return cls(secrets.token_bytes(DATA_KEY_BYTES))

    @property
    def wiped(self) -> bool:
        return self._key is None

    def _material(self) -> bytearray:
        if self._key is None:
            raise ValueError("the data key was wiped")
        return self._key

    def derive(self, label: str, length: int = 32) -> bytes:
        """A sub-key for one purpose: HKDF-SHA256(data key, info=label)."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label.encode())
        return hkdf.derive(bytes(self._material()))

    def copy(self) -> DataKey:
        return DataKey(self._material())

    def wipe(self) -> None:
        """Overwrite the key with zeros in place and forget it; idempotent."""
        key, self._key = self._key, None
        if key is not None:
            key[:] = bytes(len(key))

    def same_as(self, other: DataKey) -> bool:
        """Constant-time comparison with another key."""
        return secrets.compare_digest(bytes(self._material()), bytes(other._material()))

    def __repr__(self) -> str:
        return "<DataKey wiped>" if self._key is None else "<DataKey>"


# --------------------------------------------------------------------------
# Argon2id parameters


@attrs.frozen
class KdfParams:
    """Argon2id cost parameters for the password wrap."""

    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 1

    def problems(self) -> list[str]:
        """What is wrong with these parameters (empty when fine)."""
        found: list[str] = []
        for name in ("time_cost", "memory_kib", "parallelism"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                found.append(f"argon2 {name} must be an int >= 1, got {value!r}")
        if not found and self.memory_kib < 8 * self.parallelism:
            found.append("argon2 memory_kib must be at least 8 * parallelism")
        if not found and self.memory_kib > 4 * 1024 * 1024:
            found.append("argon2 memory_kib must be at most 4 GiB")
        return found


def _password_bytes(password: str) -> bytes:
    if not isinstance(password, str) or not password:
        raise InvalidCommand("the password must be a non-empty string")
    raw = unicodedata.normalize("NFC", password).encode("utf-8")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise InvalidCommand(f"the password must be at most {MAX_PASSWORD_BYTES} bytes")
    return raw


def _argon2(password: str, salt: bytes, params: KdfParams) -> bytes:
    return hash_secret_raw(
        secret=_password_bytes(password),
        salt=salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=32,
        type=Type.ID,
        version=_ARGON2_VERSION,
    )


def _hkdf(entropy: bytes, salt: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"piccolod/recovery-kek/v1")
    return hkdf.derive(entropy)


# --------------------------------------------------------------------------
# Recovery keys (BIP39 encoding of 256 random bits)


@functools.cache
def wordlist() -> tuple[str, ...]:
    """The 2048 BIP39 English words, checked against their known sha256."""
    data = resources.files("piccolod.persistence").joinpath("bip39_english.txt").read_bytes()
    if hashlib.sha256(data).hexdigest() != _WORDLIST_SHA256:
        raise RuntimeError("bip39_english.txt is not the BIP39 English word list")
    words = tuple(data.decode("ascii").split())
    assert len(words) == 2048
    return words


@functools.cache
def _word_index() -> dict[str, int]:
    index: dict[str, int] = {}
    for i, word in enumerate(wordlist()):
        index[word] = i
        # BIP39 words are unique in their first four letters: accept those.
        index.setdefault(word[:4], i)
    return index


def encode_recovery_key(entropy: bytes) -> list[str]:
    """The 24 BIP39 words of 32 bytes of entropy (the last 8 bits are a checksum)."""
    if len(entropy) != 32:
        raise ValueError("a recovery key encodes 32 bytes")
    checksum = hashlib.sha256(entropy).digest()[0]
    bits = (int.from_bytes(entropy, "big") << 8) | checksum
    words = wordlist()
    return [words[(bits >> (11 * (RECOVERY_WORDS - 1 - i))) & 0x7FF] for i in range(24)]


def generate_recovery_key() -> tuple[bytes, list[str]]:
    """
    Fresh entropy and its words.  ``secrets.token_bytes`` gives uniform
    bits and each word is an 11-bit slice of them, so every word is uniform
    over the 2048-word list: there is no modulo bias.
    """
    entropy = secrets.token_bytes(32)
    return entropy, encode_recovery_key(entropy)


def decode_recovery_key(phrase: str | Sequence[str]) -> bytes:
    """
    The 32 bytes of entropy behind a phrase.  Accepts any case, any
    whitespace, commas or hyphens between words, and four-letter prefixes.
    Raises ``InvalidCommand`` (never echoing a word) for a wrong word count,
    an unknown word or a checksum mismatch.
    """
    if isinstance(phrase, str):
        text = unicodedata.normalize("NFKD", phrase).lower()
        tokens = [t for t in re.split(r"[\s,\-]+", text) if t]
    else:
        tokens = [unicodedata.normalize("NFKD", str(t)).lower().strip() for t in phrase]
    if len(tokens) != RECOVERY_WORDS:
        raise InvalidCommand(
            f"a recovery key has {RECOVERY_WORDS} words, this one has {len(tokens)}"
        )
    index = _word_index()
    bits = 0
    for position, token in enumerate(tokens, start=1):
        value = index.get(token)
        if value is None:
            raise InvalidCommand(f"word {position} of the recovery key is not in the word list")
        bits = (bits << 11) | value
    entropy = (bits >> 8).to_bytes(32, "big")
    if hashlib.sha256(entropy).digest()[0] != bits & 0xFF:
        raise InvalidCommand(
            "the recovery key's checksum does not match: a word is mistyped or out of order"
        )
    return entropy


# --------------------------------------------------------------------------
# Wraps and the keyset file


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, length: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise KeysetCorrupt(f"keyset: {what} is not a base64 string")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KeysetCorrupt(f"keyset: {what} is not valid base64") from None
    if length is not None and len(data) != length:
        raise KeysetCorrupt(f"keyset: {what} has {len(data)} bytes, expected {length}")
    return data


@attrs.frozen
class Wrap:
    """
    The data key encrypted under one key-encryption key.

    @ivar kdf: how the KEK is derived (name, parameters, base64 salt).
    """

    purpose: str
    kdf: Mapping[str, Any]
    nonce: bytes = attrs.field(repr=False)
    ciphertext: bytes = attrs.field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "kdf": dict(self.kdf),
            "cipher": "aes-256-gcm",
            "nonce": _b64(self.nonce),
            "ciphertext": _b64(self.ciphertext),
        }

    @classmethod
    def from_json(cls, purpose: str, raw: object) -> Wrap:
        if not isinstance(raw, dict):
            raise KeysetCorrupt(f"keyset: the {purpose} wrap is not an object")
        if raw.get("cipher") != "aes-256-gcm":
            raise KeysetCorrupt(f"keyset: the {purpose} wrap has an unknown cipher")
        kdf = raw.get("kdf")
        if not isinstance(kdf, dict):
            raise KeysetCorrupt(f"keyset: the {purpose} wrap has no kdf object")
        expected = "argon2id" if purpose == "password" else "hkdf-sha256"
        if kdf.get("name") != expected:
            raise KeysetCorrupt(f"keyset: the {purpose} wrap must use {expected}")
        _unb64(kdf.get("salt"), f"{purpose} salt", SALT_BYTES)
        if purpose == "password":
            params = _params_of(kdf)
            if params.problems() or kdf.get("version") != _ARGON2_VERSION:
                raise KeysetCorrupt("keyset: the password wrap has bad argon2 parameters")
        return cls(
            purpose=purpose,
            kdf=dict(kdf),
            nonce=_unb64(raw.get("nonce"), f"{purpose} nonce", NONCE_BYTES),
            ciphertext=_unb64(raw.get("ciphertext"), f"{purpose} ciphertext", 48),
        )


def _params_of(kdf: Mapping[str, Any]) -> KdfParams:
    return KdfParams(
        time_cost=kdf.get("time_cost"),  # type: ignore[arg-type]
        memory_kib=kdf.get("memory_kib"),  # type: ignore[arg-type]
        parallelism=kdf.get("parallelism"),  # type: ignore[arg-type]
    )


def _aad(keyset_id: str, purpose: str, kdf: Mapping[str, Any]) -> bytes:
    params = json.dumps(dict(kdf), sort_keys=True, separators=(",", ":"))
    return f"{KEYSET_FORMAT}\x00v{KEYSET_VERSION}\x00{purpose}\x00{keyset_id}\x00{params}".encode()


def _seal(kek: bytes, data_key: DataKey, keyset_id: str, purpose: str, kdf: dict[str, Any]) -> Wrap:
    nonce = secrets.token_bytes(NONCE_BYTES)
    material = bytes(data_key._material())
    ciphertext = AESGCM(kek).encrypt(nonce, material, _aad(keyset_id, purpose, kdf))
    return Wrap(purpose=purpose, kdf=kdf, nonce=nonce, ciphertext=ciphertext)


def _open(kek: bytes, wrap: Wrap, keyset_id: str) -> DataKey | None:
    try:
        plain = AESGCM(kek).decrypt(
            wrap.nonce, wrap.ciphertext, _aad(keyset_id, wrap.purpose, wrap.kdf)
        )
    except InvalidTag:
        return None
    return DataKey(plain)


@attrs.frozen
class KeysetFile:
    """The parsed ``keyset.json``."""

    keyset_id: str
    generation: int
    created_at: float
    updated_at: float
    password: Wrap
    recovery: Wrap | None

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {
            "format": KEYSET_FORMAT,
            "version": KEYSET_VERSION,
            "keyset_id": self.keyset_id,
            "generation": self.generation,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "password": self.password.to_json(),
        }
        if self.recovery is not None:
            body["recovery"] = self.recovery.to_json()
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeysetFile:
        """Parse a keyset file; raises ``KeysetCorrupt`` with what is wrong."""
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise KeysetCorrupt("keyset: the file is not valid JSON") from None
        if not isinstance(raw, dict):
            raise KeysetCorrupt("keyset: the file is not a JSON object")
        if raw.get("format") != KEYSET_FORMAT:
            raise KeysetCorrupt("keyset: not a piccolod keyset (format)")
        if raw.get("version") != KEYSET_VERSION:
            raise KeysetCorrupt(
                f"keyset: unsupported version {raw.get('version')!r}; "
                f"this piccolod reads version {KEYSET_VERSION}"
            )
        keyset_id = raw.get("keyset_id")
        if not isinstance(keyset_id, str) or not _HEX32.match(keyset_id):
            raise KeysetCorrupt("keyset: keyset_id is missing or malformed")
        generation = raw.get("generation")
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
            raise KeysetCorrupt("keyset: generation is missing or malformed")
        times = []
        for name in ("created_at", "updated_at"):
            value = raw.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise KeysetCorrupt(f"keyset: {name} is missing or malformed")
            times.append(float(value))
        recovery = raw.get("recovery")
        return cls(
            keyset_id=keyset_id,
            generation=generation,
            created_at=times[0],
            updated_at=times[1],
            password=Wrap.from_json("password", raw.get("password")),
            recovery=None if recovery is None else Wrap.from_json("recovery", recovery),
        )


def _password_wrap(password: str, data_key: DataKey, keyset_id: str, params: KdfParams) -> Wrap:
    problems = params.problems()
    if problems:
        raise InvalidCommand("; ".join(problems))
    salt = secrets.token_bytes(SALT_BYTES)
    kdf: dict[str, Any] = {
        "name": "argon2id",
        "version": _ARGON2_VERSION,
        "time_cost": params.time_cost,
        "memory_kib": params.memory_kib,
        "parallelism": params.parallelism,
        "salt": _b64(salt),
    }
    kek = _argon2(password, salt, params)
    return _seal(kek, data_key, keyset_id, "password", kdf)


def _recovery_wrap(entropy: bytes, data_key: DataKey, keyset_id: str) -> Wrap:
    salt = secrets.token_bytes(SALT_BYTES)
    kdf: dict[str, Any] = {"name": "hkdf-sha256", "salt": _b64(salt)}
    return _seal(_hkdf(entropy, salt), data_key, keyset_id, "recovery", kdf)


def create_keyset(
    password: str, params: KdfParams, now: float
) -> tuple[KeysetFile, DataKey, list[str]]:
    """
    A new keyset: a fresh data key wrapped under ``password`` and under a
    fresh recovery key.  Returns the keyset, the data key (the caller wipes
    it) and the 24 recovery words (shown to the admin once).
    """
    _password_bytes(password)
    data_key = DataKey.generate()
    keyset_id = secrets.token_hex(16)
    entropy, words = generate_recovery_key()
    keyset = KeysetFile(
        keyset_id=keyset_id,
        generation=1,
        created_at=now,
        updated_at=now,
        password=_password_wrap(password, data_key, keyset_id, params),
        recovery=_recovery_wrap(entropy, data_key, keyset_id),
    )
    return keyset, data_key, words


def open_with_password(keyset: KeysetFile, password: str) -> DataKey:
    """The data key; raises ``WrongPassword`` (or ``InvalidCommand``)."""
    kdf = keyset.password.kdf
    salt = _unb64(kdf.get("salt"), "password salt", SALT_BYTES)
    kek = _argon2(password, salt, _params_of(kdf))
    data_key = _open(kek, keyset.password, keyset.keyset_id)
    if data_key is None:
        raise WrongPassword("the password does not unlock this keyset")
    return data_key


def open_with_recovery_key(keyset: KeysetFile, phrase: str | Sequence[str]) -> DataKey:
    """
    The data key; raises ``InvalidCommand`` for a malformed phrase,
    ``WrongRecoveryKey`` for a well-formed wrong one, ``Conflict`` when the
    keyset has no recovery wrap.
    """
    entropy = decode_recovery_key(phrase)
    if keyset.recovery is None:
        raise Conflict("this keyset has no recovery key")
    salt = _unb64(keyset.recovery.kdf.get("salt"), "recovery salt", SALT_BYTES)
    data_key = _open(_hkdf(entropy, salt), keyset.recovery, keyset.keyset_id)
    if data_key is None:
        raise WrongRecoveryKey("the recovery key does not unlock this keyset")
    return data_key


def rewrap_password(
    keyset: KeysetFile, data_key: DataKey, new_password: str, params: KdfParams, now: float
) -> KeysetFile:
    """The keyset with the data key wrapped under ``new_password`` (fresh salt)."""
    return attrs.evolve(
        keyset,
        generation=keyset.generation + 1,
        updated_at=now,
        password=_password_wrap(new_password, data_key, keyset.keyset_id, params),
    )


def rotate_recovery_key(
    keyset: KeysetFile, data_key: DataKey, now: float
) -> tuple[KeysetFile, list[str]]:
    """The keyset with a fresh recovery key (the old one stops working)."""
    entropy, words = generate_recovery_key()
    updated = attrs.evolve(
        keyset,
        generation=keyset.generation + 1,
        updated_at=now,
        recovery=_recovery_wrap(entropy, data_key, keyset.keyset_id),
    )
    return updated, words


# --------------------------------------------------------------------------
# The keyset on disk


@attrs.define(eq=False)
class Keyset:
    """
    ``keyset.json`` in a directory: load, create (never overwriting), and
    replace atomically.  Blocking; call it from a thread.
    """

    directory: Path
    filename: str = "keyset.json"

    @property
    def path(self) -> Path:
        return self.directory / self.filename

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> KeysetFile:
        """The keyset; raises ``FileNotFoundError`` or ``KeysetCorrupt``."""
        try:
            data = self.path.read_bytes()
        except IsADirectoryError:
            raise KeysetCorrupt("keyset: the keyset path is a directory") from None
        if len(data) > 64 * 1024:
            raise KeysetCorrupt("keyset: the file is implausibly large")
        return KeysetFile.from_bytes(data)

    def create(self, keyset: KeysetFile) -> None:
        """Write the first keyset; raises ``Conflict`` if one exists already."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            write_atomically(self.path, keyset.to_bytes(), exclusive=True)
        except FileExistsError:
            raise Conflict("a keyset exists already; refusing to overwrite it") from None

    def replace(self, old: KeysetFile, new: KeysetFile) -> None:
        """
        Atomically replace ``old`` with ``new``.  Raises ``Conflict`` when
        the file on disk is no longer ``old`` (someone else rewrapped).
        """
        current = self.load()
        if current.keyset_id != old.keyset_id or current.generation != old.generation:
            raise Conflict("the keyset changed underneath this operation; try again")
        write_atomically(self.path, new.to_bytes())

    def remove_stale_temps(self) -> int:
        """Delete temp files a crash left behind; returns how many."""
        removed = 0
        for tmp in self.directory.glob(f".{self.filename}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed
