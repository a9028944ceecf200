"""
Drop-in plugin of the ``persistence`` slot.  (No ``__init__.py`` in
``twisted/plugins``: it is a namespace drop-in directory.)

``[subsystems.persistence]`` keys (defaults in :data:`CONFIG_KEYS`):

- ``argon2_time_cost``, ``argon2_memory_kib``, ``argon2_parallelism``:
  Argon2id cost of new password wraps (existing wraps keep theirs until
  the next password change); the defaults cost about 64 MiB and half a
  second on a Raspberry Pi-class CPU (see docs/persistence.md);
- ``unlock_backoff_initial``, ``unlock_backoff_max``: seconds of the
  growing delay after wrong passwords;
- ``check_interval``, ``checkpoint_interval``: seconds between
  ``quick_check`` runs and passive WAL checkpoints while unlocked;
- ``volumes``: volumes ensured and attached at every unlock, through the
  ``volumes`` slot's adapter; ``store_volume``: the one the control store
  lives on;
- ``min_password_length``; ``check_on_unlock``: run ``quick_check`` before
  using an existing store; ``revision_retention``: revision rows kept;
- ``keep_exports``: export bundles kept on the box per kind (the oldest
  are deleted after each export; 0 keeps every one).
"""

from typing import Any

from piccolod.interfaces import IControlStore, IPersistence, IVolumeAdapter
from piccolod.kernel.plugins import SubsystemPlugin

#: The section's keys and their defaults.
CONFIG_KEYS: dict[str, Any] = {
    "argon2_time_cost": 3,
    "argon2_memory_kib": 65536,
    "argon2_parallelism": 1,
    "unlock_backoff_initial": 1.0,
    "unlock_backoff_max": 60.0,
    "check_interval": 3600.0,
    "checkpoint_interval": 60.0,
    "volumes": ["control", "bootstrap"],
    "store_volume": "control",
    "min_password_length": 8,
    "check_on_unlock": True,
    "revision_retention": 10000,
}

persistenceSqlcipher = SubsystemPlugin(
    slot="persistence",
    variant="sqlcipher",
    description="Keyset (Argon2id + AES-GCM), lock state machine, SQLCipher control store",
    factory="piccolod.persistence.service.PersistenceService.from_context",
    provides=(IPersistence, IControlStore),
    # The volumes slot has a default variant (directory), so this always resolves.
    requires=(IVolumeAdapter,),
    config_keys=CONFIG_KEYS,
    default=True,
)
