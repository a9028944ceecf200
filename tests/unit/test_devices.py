"""
The device manager on a fake sysfs tree: discovery of block devices, the
``device`` events for disks that appear, disappear or change, the periodic
scan on a Clock, health, the ``devices.list`` command and the plugin.
"""

from __future__ import annotations

import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.commands import DeviceList, ListDevices
from piccolod.devices import DeviceManager, Disk, Partition, describe_change, scan_sysfs
from piccolod.errors import ConfigError, Unavailable
from piccolod.events import DeviceEvent, HealthLevel
from piccolod.interfaces import IDeviceManager
from piccolod.kernel.health import HealthTracker
from piccolod.kernel.plugins import SubsystemContext, discover
from piccolod.testing.bus import FakeEventBus
from piccolod.testing.dispatcher import FakeCommandDispatcher
from tests.contracts.volumes import assert_parameter_names


class FakeSysfs:
    """A ``/sys`` tree in a temp dir, shaped like the kernel's."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "block").mkdir(parents=True)

    def disk(
        self,
        name: str,
        sectors: int = 1953525168,
        removable: int = 0,
        rotational: int | None = 1,
        ro: int = 0,
        model: str | None = "WDC WD10EZEX-08W",
        vendor: str | None = "ATA     ",
        serial: str | None = None,
        vpd_serial: str | None = None,
        wwid: str | None = None,
        state: str | None = "running",
        ioerr: str | None = "0x0",
        partitions: dict[str, int] | None = None,
        hidden: int | None = None,
    ) -> Path:
        # /sys/block/<name> is a symlink into /sys/devices, as on a real kernel.
        real = self.root / "devices" / "pci0000:00" / "block" / name
        self.remove(name)
        real.mkdir(parents=True)
        (self.root / "block" / name).symlink_to(real)
        files: dict[str, Any] = {
            "size": f"{sectors}\n",
            "removable": f"{removable}\n",
            "ro": f"{ro}\n",
            "queue/rotational": None if rotational is None else f"{rotational}\n",
            "hidden": None if hidden is None else f"{hidden}\n",
            "device/model": model and f"{model}\n",
            "device/vendor": vendor and f"{vendor}\n",
            "device/serial": serial and f"{serial}\n",
            "device/wwid": wwid and f"{wwid}\n",
            "device/state": state and f"{state}\n",
            "device/ioerr_cnt": ioerr and f"{ioerr}\n",
        }
        for rel, content in files.items():
            if content is not None:
                path = real / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
        if vpd_serial is not None:
            raw = vpd_serial.encode()
            (real / "device").mkdir(exist_ok=True)
            (real / "device" / "vpd_pg80").write_bytes(
                bytes([0, 0x80]) + len(raw).to_bytes(2, "big") + raw
            )
        for part, size in (partitions or {}).items():
            (real / part).mkdir()
            (real / part / "partition").write_text("1\n")
            (real / part / "size").write_text(f"{size}\n")
        return real

    def set(self, name: str, rel: str, content: str) -> None:
        (self.root / "block" / name / rel).write_text(content)

    def remove(self, name: str) -> None:
        link = self.root / "block" / name
        if link.is_symlink():
            shutil.rmtree(link.resolve())
            link.unlink()


class DevicesTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="piccolod-sysfs-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.sysfs = FakeSysfs(root / "sys")
        self.clock = Clock()
        self.bus = FakeEventBus(self.clock)
        self.health = HealthTracker(self.clock, self.bus)
        self.dispatcher = FakeCommandDispatcher()
        self.ignore: tuple[str, ...] = ("loop*", "ram*", "zram*")

    def manager(self, **kw: Any) -> DeviceManager:
        manager = DeviceManager(
            self.clock,
            kw.pop("scanner", lambda: scan_sysfs(self.sysfs.root, self.ignore)),
            bus=self.bus,
            health=self.health,
            dispatcher=self.dispatcher,
            interval=kw.pop("interval", 30.0),
            **kw,
        )
        self.addCleanup(self.stop, manager)
        return manager

    def stop(self, manager: DeviceManager) -> None:
        self.successResultOf(manager.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def device_events(self) -> list[tuple[str, str]]:
        return [
            (e.device, e.action) for e in self.bus.events("device") if isinstance(e, DeviceEvent)
        ]


class ScanTests(DevicesTestCase):
    def test_reads_every_attribute(self) -> None:
        """A disk's size, flags, model, vendor, serial, state, errors and partitions are read."""
        self.sysfs.disk(
            "sda",
            sectors=1000,
            rotational=0,
            serial="WD-123",
            wwid="naa.5000",
            partitions={"sda1": 600, "sda2": 400},
        )
        (disk,) = scan_sysfs(self.sysfs.root)
        self.assertEqual(
            disk,
            Disk(
                name="sda",
                size_bytes=512000,
                removable=False,
                rotational=False,
                read_only=False,
                model="WDC WD10EZEX-08W",
                vendor="ATA",
                serial="WD-123",
                wwid="naa.5000",
                state="running",
                io_errors=0,
                partitions=(Partition("sda1", 307200), Partition("sda2", 204800)),
            ),
        )
        body = disk.to_json()
        self.assertEqual((body["path"], body["health"]), ("/dev/sda", "ok"))
        self.assertEqual(body["partitions"][0], {"name": "sda1", "size_bytes": 307200})

    def test_missing_attributes_are_none(self) -> None:
        """A device offering almost nothing (an SD card reader) is still listed."""
        self.sysfs.disk("mmcblk0", rotational=None, model=None, vendor=None, state=None, ioerr=None)
        (disk,) = scan_sysfs(self.sysfs.root)
        self.assertEqual(
            (disk.model, disk.vendor, disk.serial, disk.state, disk.io_errors, disk.rotational),
            (None, None, None, None, None, None),
        )
        self.assertEqual(disk.health, "ok")

    def test_serial_from_the_scsi_vpd_page(self) -> None:
        """Without a serial file, the serial comes from VPD page 0x80."""
        self.sysfs.disk("sdb", vpd_serial="  ZA1B2C3D  ")
        self.assertEqual(scan_sysfs(self.sysfs.root)[0].serial, "ZA1B2C3D")

    def test_loop_ram_and_hidden_devices_are_skipped(self) -> None:
        """loop*, ram*, zram* and hidden devices are skipped unless the patterns say otherwise."""
        for name in ("loop0", "loop7", "ram0", "zram0", "sda", "nvme0n1"):
            self.sysfs.disk(name)
        self.sysfs.disk("nvme0c0n1", hidden=1)
        self.assertEqual([d.name for d in scan_sysfs(self.sysfs.root)], ["nvme0n1", "sda"])
        everything = [d.name for d in scan_sysfs(self.sysfs.root, ignore=())]
        self.assertEqual(everything, ["loop0", "loop7", "nvme0n1", "ram0", "sda", "zram0"])

    def test_health_of_a_disk(self) -> None:
        """Not running is an error, I/O errors a warning."""
        self.assertEqual(Disk("a", state="offline").health, "error")
        self.assertEqual(Disk("a", state="running", io_errors=3).health, "warn")
        self.assertEqual(Disk("a", state="live", io_errors=0).health, "ok")

    def test_garbage_values_are_tolerated(self) -> None:
        """Unparsable numbers become unknown instead of failing the scan."""
        self.sysfs.disk("sda", ioerr="zz")
        self.sysfs.set("sda", "size", "lots\n")
        (disk,) = scan_sysfs(self.sysfs.root)
        self.assertEqual((disk.size_bytes, disk.io_errors), (0, None))

    def test_a_missing_sysfs_is_unavailable(self) -> None:
        """No <root>/block is Unavailable."""
        self.assertRaises(Unavailable, scan_sysfs, self.sysfs.root / "nowhere")

    def test_describe_change(self) -> None:
        """describe_change lists each changed field as 'field old -> new'."""
        old = Disk("sda", size_bytes=10, state="running")
        new = Disk("sda", size_bytes=20, state="offline")
        self.assertEqual(
            describe_change(old, new),
            "size_bytes 10 -> 20; health ok -> error; state running -> offline",
        )
        self.assertEqual(describe_change(old, old), "")


class ManagerTests(DevicesTestCase):
    def test_provides_its_interface(self) -> None:
        """DeviceManager provides IDeviceManager."""
        manager = self.manager()
        verifyObject(IDeviceManager, manager)
        assert_parameter_names(self, IDeviceManager, manager)

    def test_first_scan_adds_every_disk(self) -> None:
        """Starting scans at once and publishes 'added' for each disk, by name."""
        self.sysfs.disk("sdb", serial="B")
        self.sysfs.disk("sda", serial="A")
        self.sysfs.disk("loop0")
        manager = self.manager()
        manager.startService()
        self.assertEqual(self.device_events(), [("sda", "added"), ("sdb", "added")])
        self.assertEqual([d["name"] for d in manager.disks()], ["sda", "sdb"])
        self.assertIn("serial A", self.bus.events("device")[0].detail)  # type: ignore[attr-defined]
        self.assertEqual(manager.scanned_at, 0.0)

    def test_periodic_scan_reports_added_removed_and_changed(self) -> None:
        """Each interval rescans: a new disk is added, a gone one removed, a grown one changed."""
        self.sysfs.disk("sda", serial="A", sectors=100)
        self.sysfs.disk("sdb", serial="B")
        manager = self.manager(interval=10.0)
        manager.startService()
        self.bus.clear_published()
        self.sysfs.remove("sdb")
        self.sysfs.disk("sdc", serial="C", removable=1)
        self.sysfs.set("sda", "size", "200\n")
        self.clock.advance(9.9)
        self.assertEqual(self.device_events(), [])
        self.clock.advance(0.1)
        self.assertEqual(
            self.device_events(), [("sdb", "removed"), ("sda", "changed"), ("sdc", "added")]
        )
        changed = self.bus.events("device")[1]
        self.assertEqual(changed.detail, "size_bytes 51200 -> 102400")  # type: ignore[attr-defined]
        self.assertIn("removable", self.bus.events("device")[2].detail)  # type: ignore[attr-defined]
        self.bus.clear_published()
        self.clock.advance(10)
        self.assertEqual(self.device_events(), [], "no change, no event")

    def test_a_replaced_disk_is_removed_then_added(self) -> None:
        """Another serial under the same name is another disk: removed, then added."""
        self.sysfs.disk("sda", serial="OLD")
        manager = self.manager()
        manager.startService()
        self.bus.clear_published()
        self.sysfs.disk("sda", serial="NEW")
        self.successResultOf(manager.scan())
        self.assertEqual(self.device_events(), [("sda", "removed"), ("sda", "added")])
        self.assertIn("replaced", self.bus.events("device")[0].detail)  # type: ignore[attr-defined]

    def test_failing_health_is_a_change_and_a_warning(self) -> None:
        """A disk going offline is 'changed' (health ok -> error) and health turns warn."""
        self.sysfs.disk("sda", serial="A")
        manager = self.manager()
        manager.startService()
        self.assertEqual(self.health.component("devices").level, HealthLevel.OK)
        self.assertEqual(self.health.component("devices").message, "1 disk(s)")
        self.sysfs.set("sda", "device/state", "offline\n")
        self.successResultOf(manager.scan())
        event = self.bus.events("device")[-1]
        self.assertEqual(
            (event.action, event.detail),  # type: ignore[attr-defined]
            ("changed", "health ok -> error; state running -> offline"),
        )
        component = self.health.component("devices")
        self.assertEqual(component.level, HealthLevel.WARN)
        self.assertIn("sda: error", component.message)
        self.assertFalse(component.required)

    def test_a_failing_scan_keeps_the_loop_and_the_last_list(self) -> None:
        """A scan that fails reports health error, keeps the last list, and the loop goes on."""
        self.sysfs.disk("sda", serial="A")
        broken = {"on": False}

        def scanner() -> list[Disk]:
            if broken["on"]:
                raise OSError("sysfs went away")
            return scan_sysfs(self.sysfs.root, self.ignore)

        manager = self.manager(scanner=scanner, interval=5.0)
        manager.startService()
        broken["on"] = True
        self.bus.clear_published()
        self.clock.advance(5)
        component = self.health.component("devices")
        self.assertEqual(component.level, HealthLevel.ERROR)
        self.assertIn("sysfs went away", component.message)
        self.assertEqual([d["name"] for d in manager.disks()], ["sda"])
        self.assertEqual(self.device_events(), [])
        self.failureResultOf(manager.scan(), Unavailable)
        broken["on"] = False
        self.clock.advance(5)
        self.assertEqual(self.health.component("devices").level, HealthLevel.OK)
        self.assertEqual(manager.stats()["failures"], 2)

    def test_a_scanner_returning_garbage_is_a_failed_scan(self) -> None:
        """A scanner result that is not a list of Disks fails the scan, not the loop."""
        manager = self.manager(scanner=lambda: ["sda"])
        manager.startService()
        self.assertEqual(self.health.component("devices").level, HealthLevel.ERROR)
        self.assertEqual(manager.disks(), [])
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_concurrent_scans_share_one_run(self) -> None:
        """scan() during a scan joins it: the scanner runs once, both callers get the list."""
        from twisted.internet.defer import Deferred

        pending: list[Deferred[list[Disk]]] = []

        def scanner() -> Deferred[list[Disk]]:
            d: Deferred[list[Disk]] = Deferred()
            pending.append(d)
            return d

        manager = self.manager(scanner=scanner)
        first, second = manager.scan(), manager.scan()
        self.assertEqual(len(pending), 1)
        pending[0].callback([Disk("sda", size_bytes=1)])
        one, two = self.successResultOf(first), self.successResultOf(second)
        self.assertEqual(one, two)
        self.assertEqual([d["name"] for d in one], ["sda"])

    def test_the_list_command(self) -> None:
        """devices.list is registered while running and answers with the disks."""
        self.sysfs.disk("sda", serial="A")
        manager = self.manager()
        manager.startService()
        result = self.successResultOf(self.dispatcher.dispatch(ListDevices()))
        self.assertIsInstance(result, DeviceList)
        self.assertEqual([d["name"] for d in result.disks], ["sda"])
        self.assertEqual(result.scanned_at, 0.0)
        self.assertEqual(result.to_json()["disks"][0]["serial"], "A")
        self.successResultOf(manager.stopService())
        self.assertNotIn("devices.list", self.dispatcher.names())

    def test_stop_cancels_the_loop_and_health(self) -> None:
        """After stop no scan is scheduled and the health component is gone."""
        manager = self.manager()
        manager.startService()
        self.successResultOf(manager.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual([c.component for c in self.health.components()], [])
        self.successResultOf(manager.stopService())

    def test_bad_interval_is_refused(self) -> None:
        """A non-positive or non-numeric interval is a ConfigError."""
        for bad in (0, -1, "10", True):
            with self.subTest(interval=bad):
                self.assertRaises(ConfigError, DeviceManager, self.clock, list, interval=bad)


class PluginTests(DevicesTestCase):
    def context(self, **config: Any) -> SubsystemContext:
        kernel = types.SimpleNamespace(
            reactor=self.clock, bus=self.bus, health=self.health, dispatcher=self.dispatcher
        )
        section = {"sysfs_root": str(self.sysfs.root), "interval": 30.0, "ignore": ["loop*"]}
        section.update(config)
        return SubsystemContext(
            slot="devices",
            variant="sysfs",
            kernel=kernel,
            config=section,  # type: ignore[arg-type]
        )

    def test_the_shipped_plugin_builds_a_verified_service(self) -> None:
        """The devices=sysfs drop-in is the default and builds an IDeviceManager on sysfs_root."""
        (plugin,) = [p for p in discover() if p.slot == "devices"]
        self.assertEqual((plugin.variant, plugin.default), ("sysfs", True))  # type: ignore[attr-defined]
        self.sysfs.disk("sda")
        self.sysfs.disk("ram0")
        service = plugin.build(self.context())
        verifyObject(IDeviceManager, service)
        service.startService()
        self.addCleanup(self.stop, service)
        self.assertEqual([d["name"] for d in service.disks()], ["ram0", "sda"])

    def test_bad_sections_are_one_config_error(self) -> None:
        """Bad sysfs_root, ignore and interval are reported together."""
        with self.assertRaises(ConfigError) as cm:
            DeviceManager.from_context(self.context(sysfs_root="", ignore="loop*", interval=0))
        self.assertEqual(len(cm.exception.errors), 3)
