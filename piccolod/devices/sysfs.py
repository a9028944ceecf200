"""
Block devices read from sysfs: :class:`Disk` values and :func:`scan_sysfs`.

For each entry of ``<root>/block`` (``/sys/block``) it reads, when the
kernel offers them: ``size`` (in 512-byte sectors, whatever the device's
block size), ``removable``, ``ro``, ``queue/rotational``, ``hidden``,
``device/model``, ``device/vendor``, the serial (``device/serial``,
``serial`` or the SCSI unit serial page ``device/vpd_pg80``), ``wwid``
(``device/wwid`` or ``wwid``), ``device/state`` (``running``, ``offline``...)
and the SCSI I/O error counter ``device/ioerr_cnt``; partitions are the
subdirectories holding a ``partition`` file.  A missing or unreadable
attribute is ``None``: sysfs differs between drivers, and a disk is listed
even when little is known about it.

Entries whose name matches an ``ignore`` pattern (``fnmatch``; by default
loop, ram and zram devices) and hidden devices (NVMe multipath paths) are
skipped.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from piccolod.errors import Unavailable

__all__ = ["DEFAULT_IGNORE", "SECTOR", "Disk", "Partition", "scan_sysfs"]

#: sysfs sizes are always in 512-byte units.
SECTOR = 512
#: Device names skipped unless configured otherwise.
DEFAULT_IGNORE = ("loop*", "ram*", "zram*")
#: ``device/state`` values of a working device.
_HEALTHY_STATES = (None, "running", "live")


@attrs.frozen
class Partition:
    """One partition of a disk."""

    name: str
    size_bytes: int


@attrs.frozen
class Disk:
    """
    One block device as sysfs shows it.

    @ivar state: the driver's device state (``running``, ``offline``, ...).
    @ivar io_errors: the SCSI I/O error counter (``None``: not offered).
    """

    name: str
    size_bytes: int = 0
    removable: bool = False
    rotational: bool | None = None
    read_only: bool = False
    model: str | None = None
    vendor: str | None = None
    serial: str | None = None
    wwid: str | None = None
    state: str | None = None
    io_errors: int | None = None
    partitions: tuple[Partition, ...] = ()

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"

    @property
    def health(self) -> str:
        """``error`` for a device not running, ``warn`` after I/O errors, else ``ok``."""
        if self.state not in _HEALTHY_STATES:
            return "error"
        if self.io_errors:
            return "warn"
        return "ok"

    @property
    def identity(self) -> str | None:
        """What tells two physical disks apart (serial, else WWID)."""
        return self.serial or self.wwid

    def to_json(self) -> dict[str, Any]:
        body = attrs.asdict(self)
        body["path"] = self.path
        body["health"] = self.health
        return body


def _read(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    text = text.strip().strip("\0").strip()
    return text or None


def _int(path: Path, base: int = 10) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def _flag(path: Path) -> bool | None:
    value = _int(path)
    return None if value is None else value != 0


def _vpd_serial(path: Path) -> str | None:
    """The serial of a SCSI unit serial number page (0x80): 4 header bytes, then ASCII."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) < 5 or raw[1] != 0x80:
        return None
    length = int.from_bytes(raw[2:4], "big")
    text = raw[4 : 4 + length].decode("ascii", "replace").strip().strip("\0").strip()
    return text or None


def _disk(entry: Path, name: str) -> Disk:
    device = entry / "device"
    sectors = _int(entry / "size") or 0
    io_errors = _int(device / "ioerr_cnt", 16)
    partitions = []
    try:
        children = sorted(os.listdir(entry))
    except OSError:
        children = []
    for child in children:
        if (entry / child / "partition").exists():
            partitions.append(
                Partition(name=child, size_bytes=(_int(entry / child / "size") or 0) * SECTOR)
            )
    return Disk(
        name=name,
        size_bytes=sectors * SECTOR,
        removable=bool(_flag(entry / "removable")),
        rotational=_flag(entry / "queue" / "rotational"),
        read_only=bool(_flag(entry / "ro")),
        model=_read(device / "model"),
        vendor=_read(device / "vendor"),
        serial=(
            _read(device / "serial") or _read(entry / "serial") or _vpd_serial(device / "vpd_pg80")
        ),
        wwid=_read(device / "wwid") or _read(entry / "wwid"),
        state=_read(device / "state"),
        io_errors=io_errors,
        partitions=tuple(partitions),
    )


def scan_sysfs(root: Path | str = "/sys", ignore: Sequence[str] = DEFAULT_IGNORE) -> list[Disk]:
    """
    Every block device under ``<root>/block`` not ignored, sorted by name.
    Raises ``Unavailable`` when ``<root>/block`` cannot be listed.
    """
    block = Path(root) / "block"
    try:
        names = os.listdir(block)
    except OSError as e:
        raise Unavailable(f"cannot list block devices in {block}: {e.strerror or e}") from None
    disks = []
    for name in sorted(names):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore):
            continue
        entry = block / name
        if _flag(entry / "hidden"):
            continue
        disks.append(_disk(entry, name))
    return disks
