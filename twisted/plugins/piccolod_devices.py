"""
Drop-in plugins of the ``devices`` slot.  (No ``__init__.py`` in
``twisted/plugins``: it is a namespace drop-in directory.)
"""

from typing import Any

from piccolod.interfaces import IDeviceManager
from piccolod.kernel.plugins import SubsystemPlugin

#: The ``[subsystems.<slot>]`` keys and their defaults.
DEVICES_CONFIG: dict[str, Any] = {
    "sysfs_root": "/sys",
    "interval": 30.0,
    "ignore": ["loop*", "ram*", "zram*"],
}

sysfsDevices = SubsystemPlugin(
    slot="devices",
    variant="sysfs",
    description="Block devices read from /sys/block, rescanned periodically",
    factory="piccolod.devices.manager.DeviceManager.from_context",
    provides=(IDeviceManager,),
    requires=(),
    config_keys=DEVICES_CONFIG,
    default=True,
)
