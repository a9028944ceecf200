"""
The device manager subsystem: the machine's block devices, rescanned
periodically, published as ``device`` events and listed for the API.

Scanners live in their own modules (``sysfs``); the service is
:class:`~piccolod.devices.manager.DeviceManager`.
"""

from piccolod.devices.manager import DeviceManager, describe_change
from piccolod.devices.sysfs import DEFAULT_IGNORE, Disk, Partition, scan_sysfs

__all__ = ["DEFAULT_IGNORE", "DeviceManager", "Disk", "Partition", "describe_change", "scan_sysfs"]
