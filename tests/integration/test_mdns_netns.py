"""
The responder seen from other network namespaces: Avahi (avahi-daemon and
avahi-browse, with a private dbus-daemon the test starts) finds the portal
and an app over a veth pair, resolves the host name, and sees the goodbyes;
and a query arriving on an interface that is not configured is not answered.

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
import socket
import subprocess
import sys
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


@contextlib.contextmanager
def topology(links: list[tuple[str, str, str, str, str, str]]) -> Iterator[None]:
    """
    Namespaces joined by veth pairs: each link is ``(ns1, dev1, addr1, ns2,
    dev2, addr2)`` on a /24.  Everything is deleted afterwards.
    """
    require_root()
    require_tool("ip")
    made: list[str] = []
    try:
        for ns1, dev1, addr1, ns2, dev2, addr2 in links:
            for ns in (ns1, ns2):
                if ns not in made:
                    ip("netns", "add", ns)
                    made.append(ns)
                    ip("-n", ns, "link", "set", "lo", "up")
            ip("link", "add", dev1, "type", "veth", "peer", "name", dev2)
            for ns, dev, addr in ((ns1, dev1, addr1), (ns2, dev2, addr2)):
                ip("link", "set", dev, "netns", ns)
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
        yield
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[None]:
    with topology([(NS_A, VETH_A, ADDR_A, NS_B, VETH_B, ADDR_B)]):
        yield


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


NS_C = f"pcl-mdns-c-{PID}"
VETH_A2 = f"pmx{PID % 100000}"
VETH_C = f"pmc{PID % 100000}"
SUBNET2 = f"10.201.{PID % 250 + 1}"
ADDR_A2 = f"{SUBNET2}.1"
ADDR_C = f"{SUBNET2}.2"

#: A legacy-unicast querier: multicasts "piccolo.local A?" from ``argv[1]``
#: until an answer comes (prints the answering address, exit 0) or
#: ``argv[2]`` seconds pass (exit 1).
QUERIER = r"""
import socket, struct, sys, time
source, timeout = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(source))
s.bind((source, 0))
s.settimeout(0.25)
header = struct.pack("!6H", 0x4242, 0, 1, 0, 0, 0)
q = header + b"\x07piccolo\x05local\x00" + struct.pack("!HH", 1, 1)
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    s.sendto(q, ("224.0.0.251", 5353))
    try:
        data, addr = s.recvfrom(9000)
    except socket.timeout:
        continue
    if data[:2] == b"\x42\x42":
        print(addr[0])
        sys.exit(0)
sys.exit(1)
"""


async def run_in(ns: str, *args: str) -> tuple[int, str]:
    out, _err, code = await getProcessOutputAndValue(
        shutil.which("ip") or "ip", ["netns", "exec", ns, *args], env=dict(os.environ)
    )
    return code, out.decode(errors="replace")


@pytest.fixture
def two_links() -> Iterator[None]:
    with topology(
        [
            (NS_A, VETH_A, ADDR_A, NS_B, VETH_B, ADDR_B),
            (NS_A, VETH_A2, ADDR_A2, NS_C, VETH_C, ADDR_C),
        ]
    ):
        yield


@pytest_twisted.ensureDeferred
async def test_answers_only_on_configured_interfaces(two_links: None) -> None:
    """A query on an unconfigured interface is not answered, even where the group is joined."""
    # No /prefix: the on-link source check would drop C's packets on its own;
    # this test is about the socket receiving only its own interface's traffic.
    responder = Responder(interfaces=[ADDR_A])
    with in_netns(NS_A):
        responder.start()
        # Someone else joins the group on the other interface, so the kernel
        # accepts the group there: only IP_MULTICAST_ALL=0 keeps it from us.
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.bind(("0.0.0.0", 0))
        other.setsockopt(
            socket.IPPROTO_IP,
            socket.IP_ADD_MEMBERSHIP,
            socket.inet_aton("224.0.0.251") + socket.inet_aton(ADDR_A2),
        )
    try:
        await wait_for(responder.service.host_name, what="the host name to be claimed")
        code, out = await run_in(NS_B, sys.executable, "-c", QUERIER, ADDR_B, "10")
        assert (code, out.split()) == (0, [ADDR_A]), out
        before = responder.service.stats()[ADDR_A]["queries_received"]
        code, out = await run_in(NS_C, sys.executable, "-c", QUERIER, ADDR_C, "3")
        assert code == 1, f"answered on an unconfigured interface: {out}"
        assert responder.service.stats()[ADDR_A]["queries_received"] == before
    finally:
        other.close()
        await responder.stop()
