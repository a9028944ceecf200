"""
Typed errors of the persistence subsystem.

PROPOSED FOR ``piccolod/errors.py``: these are defined here, clearly local,
until the lead moves them into the shared module (the exact code is in the
persistence report).  Each is a :class:`~piccolod.errors.PiccolodError` with
one HTTP status and a stable ``type`` slug, so the API maps them like every
other error.  No message ever contains a secret.
"""

from __future__ import annotations

from piccolod.errors import PiccolodError, Unauthorized

__all__ = [
    "KeysetCorrupt",
    "StoreCorrupt",
    "StoreError",
    "StoreMissing",
    "StoreUnreadable",
    "WrongPassword",
    "WrongRecoveryKey",
]


class WrongPassword(Unauthorized):
    """The password does not open the keyset (AES-GCM authentication failed)."""

    type = "wrong-password"
    title = "Wrong password"


class WrongRecoveryKey(Unauthorized):
    """The recovery key does not open the keyset (AES-GCM authentication failed)."""

    type = "wrong-recovery-key"
    title = "Wrong recovery key"


class KeysetCorrupt(PiccolodError):
    """
    The keyset file exists but cannot be read: bad JSON, unknown format or
    version, missing or malformed fields.  Nothing is overwritten.
    """

    type = "keyset-corrupt"
    title = "Keyset is unreadable"
    status = 500


class StoreError(PiccolodError):
    """Base of the control store's own failures."""

    type = "store-error"
    title = "Control store error"
    status = 500


class StoreUnreadable(StoreError):
    """
    SQLCipher cannot decrypt the control store with this keyset's key: the
    file is damaged, truncated, or belongs to another keyset.
    """

    type = "store-unreadable"
    title = "Control store cannot be decrypted"


class StoreCorrupt(StoreError):
    """The control store opens but fails its integrity check (``quick_check``)."""

    type = "store-corrupt"
    title = "Control store is corrupt"


class StoreMissing(StoreError):
    """
    The control store was created once (its marker exists) but the database
    file is gone or empty; it is not silently re-created.
    """

    type = "store-missing"
    title = "Control store is missing"
