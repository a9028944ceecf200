"""
Drop-in plugins of the ``volumes`` slot: the adapter the persistence
subsystem mounts its volumes with.  (No ``__init__.py`` in
``twisted/plugins``: it is a namespace drop-in directory.)

``directory`` is the default so that a development checkout runs without
FUSE; it keeps volumes in PLAINTEXT and says so at every start.  A real box
configures::

    [subsystems.volumes]
    variant = "gocryptfs"
"""

from typing import Any

from piccolod.interfaces import IVolumeAdapter
from piccolod.kernel.plugins import SubsystemPlugin

#: The ``[subsystems.<slot>]`` keys and their defaults.
GOCRYPTFS_CONFIG: dict[str, Any] = {
    "gocryptfs": "gocryptfs",
    "fusermount": "",
    "fuse_device": "/dev/fuse",
    "scrypt_logn": 10,
    "mount_timeout": 5.0,
    "unmount_timeout": 10.0,
    "kill_grace": 2.0,
}

directoryVolumes = SubsystemPlugin(
    slot="volumes",
    variant="directory",
    description="Plain directories, NOT encrypted (development only)",
    factory="piccolod.persistence.directory.DirectoryVolumes.from_context",
    provides=(IVolumeAdapter,),
    requires=(),
    default=True,
)

gocryptfsVolumes = SubsystemPlugin(
    slot="volumes",
    variant="gocryptfs",
    description="gocryptfs-encrypted volumes mounted by supervised gocryptfs -fg processes",
    factory="piccolod.persistence.gocryptfs.GocryptfsVolumes.from_context",
    provides=(IVolumeAdapter,),
    requires=(),
    config_keys=GOCRYPTFS_CONFIG,
)
