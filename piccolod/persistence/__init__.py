"""
The persistence subsystem: the keyset, the lock state machine, the
encrypted control store and its repositories, and (through
:mod:`piccolod.persistence.volumes`) the volumes.

See ``docs/persistence.md`` for the design as built.  Modules:

- :mod:`.keyset`: the data key, its password and recovery-key wraps, the
  keyset file (atomic writes), BIP39 recovery keys;
- :mod:`.volume_keys`: per-volume passphrases wrapped by the data key;
- :mod:`.store`: the SQLCipher control store (its own thread, revisions,
  checksum chain, migrations, checks);
- :mod:`.repositories`: typed repositories over the store;
- :mod:`.service`: :class:`PersistenceService`, the lock machine and the
  ``persistence.*`` commands;
- :mod:`.exports`: export bundles (tar + manifest) and their import;
- :mod:`.errors`: the subsystem's typed errors.
"""

from piccolod.persistence.errors import (
    KeysetCorrupt,
    StoreCorrupt,
    StoreError,
    StoreMissing,
    StoreUnreadable,
    WrongPassword,
    WrongRecoveryKey,
)
from piccolod.persistence.keyset import DataKey, KdfParams, Keyset, KeysetFile
from piccolod.persistence.service import PersistenceConfig, PersistenceService
from piccolod.persistence.store import ControlStore

__all__ = [
    "ControlStore",
    "DataKey",
    "KdfParams",
    "Keyset",
    "KeysetCorrupt",
    "KeysetFile",
    "PersistenceConfig",
    "PersistenceService",
    "StoreCorrupt",
    "StoreError",
    "StoreMissing",
    "StoreUnreadable",
    "WrongPassword",
    "WrongRecoveryKey",
]
