"""
The responder seen from another network namespace: Avahi (avahi-daemon and
avahi-browse, with a private dbus-daemon the test starts) finds the portal
and an app over a veth pair, resolves the host name, and sees the goodbyes.

Layout (everything is created by the test and deleted afterwards; the
addresses exist only inside these namespaces, so no packet can leave them):

    netns pcl-mdns-a-<pid>                netns pcl-mdns-b-<pid>
    veth pma<n> 10.200.<x>.1/24  <----->  veth pmb<n> 10.200.<x>.2/24
    piccolod's responder socket           avahi-daemon, avahi-browse

The responder runs inside the test process: its socket is created while the
reactor thread is switched into namespace A with ``setns(2)``, and a socket
stays in the namespace it was created in.  It is configured with
``interfaces = ["*"]``, so the interface enumeration runs there too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from piccolod.mdns.service import system_ipv4_interfaces
from tests.integration.support import require_tool
from tests.integration.test_mdns_zeroconf import REQUIRE, Responder, wait_for

pytestmark = pytest.mark.integration

CLONE_NEWNET = 0x40000000
PID = os.getpid()
NS_A = f"pcl-mdns-a-{PID}"
NS_B = f"pcl-mdns-b-{PID}"
VETH_A = f"pma{PID % 100000}"
VETH_B = f"pmb{PID % 100000}"
SUBNET = f"10.200.{PID % 250 + 1}"
ADDR_A = f"{SUBNET}.1"
ADDR_B = f"{SUBNET}.2"


def require_root() -> None:
    if os.geteuid() != 0:
        message = "network namespaces need root"
        if REQUIRE:
            pytest.fail(message + " (PICCOLOD_REQUIRE_INTEGRATION=1)")
        pytest.skip(message)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with this thread in network namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original namespace")
    finally:
        os.close(target)
        os.close(original)


@pytest.fixture
def namespaces() -> Iterator[None]:
    require_root()
    require_tool("ip")
    ip("netns", "add", NS_A)
    try:
        ip("netns", "add", NS_B)
        ip("link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B)
        ip("link", "set", VETH_A, "netns", NS_A)
        ip("link", "set", VETH_B, "netns", NS_B)
        for ns, dev, addr in ((NS_A, VETH_A, ADDR_A), (NS_B, VETH_B, ADDR_B)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for ns in (NS_A, NS_B):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


class Daemons:
    """A private system bus and an avahi-daemon in namespace B, stopped by PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bus_path = tmp / "system_bus_socket"
        self.env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={self.bus_path}"}
        self.procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.tmp / log, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
        )
        out.close()
        self.procs.append(proc)
        return proc

    def start_bus(self) -> None:
        config = self.tmp / "bus.conf"
        config.write_text(
            '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
            "<busconfig><type>system</type>"
            f"<listen>unix:path={self.bus_path}</listen><auth>EXTERNAL</auth>"
            '<policy context="default"><allow user="*"/><allow own="*"/>'
            '<allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>'
            "</policy></busconfig>\n"
        )
        self._spawn(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"], "dbus.log"
        )

    def start_avahi(self) -> None:
        config = self.tmp / "avahi.conf"
        config.write_text(
            "[server]\nhost-name=avahi-peer\nuse-ipv4=yes\nuse-ipv6=no\n"
            f"allow-interfaces={VETH_B}\nenable-dbus=yes\n"
            "[wide-area]\nenable-wide-area=no\n"
            "[publish]\ndisable-publishing=yes\n"
            "[reflector]\nenable-reflector=no\n"
        )
        self._spawn(
            [
                "ip",
                "netns",
                "exec",
                NS_B,
                "avahi-daemon",
                "-f",
                str(config),
                "--no-drop-root",
                "--no-chroot",
                "--no-rlimits",
            ],
            "avahi.log",
        )

    def log(self, name: str) -> str:
        try:
            return (self.tmp / name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)

    async def run_b(self, *args: str) -> tuple[int, str]:
        """Run a command in namespace B on the private bus; (exit code, stdout)."""
        out, _err, code = await getProcessOutputAndValue(
            shutil.which("ip") or "ip", ["netns", "exec", NS_B, *args], env=self.env
        )
        return code, out.decode(errors="replace")

    async def browse(self, service_type: str = "_http._tcp") -> dict[str, list[str]]:
        """avahi-browse -r -t -p: resolved entries by instance name (IPv4 on our veth)."""
        code, out = await self.run_b("avahi-browse", "-r", "-t", "-p", "-k", service_type)
        found: dict[str, list[str]] = {}
        if code != 0:
            return found
        for line in out.splitlines():
            fields = line.split(";")
            if fields[0] == "=" and len(fields) >= 10 and fields[1] == VETH_B:
                found[fields[3]] = fields
        return found


@pytest.fixture
def daemons(namespaces: None, tmp_path: Path) -> Iterator[Daemons]:
    require_tool("dbus-daemon", "avahi-daemon", "avahi-browse", "avahi-resolve")
    d = Daemons(tmp_path)
    try:
        d.start_bus()
        yield d
    finally:
        d.stop()


@pytest_twisted.ensureDeferred
async def test_avahi_in_another_namespace_sees_the_services(daemons: Daemons) -> None:
    """avahi-browse over a veth pair finds portal and app, resolves the host, sees goodbyes."""
    await wait_for(lambda: daemons.bus_path.exists(), timeout=10, what="dbus socket")
    daemons.start_avahi()

    async def avahi_up() -> bool:
        code, _ = await daemons.run_b("avahi-browse", "-a", "-t", "-p", "-k")
        return code == 0

    try:
        await poll_async(avahi_up, 20, "avahi-daemon to answer on the bus")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{daemons.log('avahi.log')}") from None

    responder = Responder(interfaces=["*"])
    with in_netns(NS_A):
        found = system_ipv4_interfaces()
        responder.start()
    try:
        assert [(s.address, str(s.network)) for s in found] == [(ADDR_A, f"{SUBNET}.0/24")]
        responder.publish("gitea", "web", 9001, txt=(("path", "/gitea"),))
        seen: dict[str, list[str]] = {}

        async def both() -> bool:
            seen.clear()
            seen.update(await daemons.browse())
            return "piccolo" in seen and "gitea-web" in seen

        await poll_async(both, 20, "avahi-browse to list portal and app")
        portal, app = seen["piccolo"], seen["gitea-web"]
        assert portal[6:9] == ["piccolo.local", ADDR_A, "8080"], portal
        assert '"path=/"' in portal[9]
        assert app[6:9] == ["piccolo.local", ADDR_A, "9001"], app
        assert '"path=/gitea"' in app[9]

        code, out = await daemons.run_b("avahi-resolve", "-4", "-n", "piccolo.local")
        assert code == 0 and out.split() == ["piccolo.local", ADDR_A], out

        responder.publish("gitea", "web", 9001, withdrawn=True)

        async def app_gone() -> bool:
            listing = await daemons.browse()
            return "piccolo" in listing and "gitea-web" not in listing

        await poll_async(app_gone, 20, "avahi to drop the withdrawn app")

        await responder.stop()

        async def portal_gone() -> bool:
            return "piccolo" not in await daemons.browse()

        await poll_async(portal_gone, 20, "avahi to drop the portal after stop")
    finally:
        await responder.stop()


async def poll_async(check: Any, timeout: float, what: str) -> None:
    """Await ``check()`` until it returns True or the deadline passes."""
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while not await check():
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
