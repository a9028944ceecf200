"""
Interoperability of the mDNS responder with an independent implementation,
python-zeroconf, over real multicast on loopback (127.0.0.1 only).

The responder runs inside the test process on pytest-twisted's reactor;
python-zeroconf runs its own thread, and its blocking calls go through
``deferToThread``.  Waits poll with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from piccolod.events import Envelope, MdnsNameChanged, RoutePublished
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.health import HealthTracker
from piccolod.mdns.service import MdnsConfig, MulticastResponderService

pytestmark = pytest.mark.integration

T = TypeVar("T")
REQUIRE = os.environ.get("PICCOLOD_REQUIRE_INTEGRATION") == "1"
HTTP = "_http._tcp.local."


def require_zeroconf() -> None:
    """Skip (or fail with PICCOLOD_REQUIRE_INTEGRATION=1) without python-zeroconf."""
    if importlib.util.find_spec("zeroconf") is None:
        message = "python-zeroconf is not installed (.venv/bin/pip install zeroconf)"
        if REQUIRE:
            pytest.fail(message + " (PICCOLOD_REQUIRE_INTEGRATION=1)")
        pytest.skip(message)


async def wait_for(check: Callable[[], T | None], timeout: float = 15.0, what: str = "") -> T:
    """Poll ``check`` on the reactor until it returns a truthy value or the deadline passes."""
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while True:
        result = check()
        if result:
            return result
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await deferLater(reactor, 0.02, lambda: None)  # type: ignore[arg-type]


class Responder:
    """A ``MulticastResponderService`` with a real bus and health tracker."""

    def __init__(self, portal_port: int = 8080, **config: Any) -> None:
        self.bus = MemoryEventBus(reactor)
        self.health = HealthTracker(reactor, self.bus)
        self.names: list[MdnsNameChanged] = []
        self.bus.subscribe("mdns.name", self._name, replay_retained=True)
        self.service = MulticastResponderService(
            reactor=reactor,
            config=MdnsConfig.from_section({"interfaces": ["127.0.0.1"], **config}),
            bus=self.bus,
            health=self.health,
            portal_port=portal_port,
        )

    def _name(self, envelope: Envelope[Any]) -> None:
        self.names.append(envelope.event)

    def start(self) -> Responder:
        self.service.startService()
        return self

    async def stop(self) -> None:
        if self.service.running:
            await self.service.stopService()

    def claimed(self, kind: str, name: str) -> MdnsNameChanged | None:
        for event in self.names:
            if event.kind == kind and event.claimed == name:
                return event
        return None

    def publish(self, app: str, listener: str, port: int, **kw: Any) -> None:
        self.bus.publish(RoutePublished(app=app, listener=listener, port=port, **kw))


class Browser:
    """A python-zeroconf instance on 127.0.0.1 recording what a ServiceBrowser sees."""

    def __init__(self) -> None:
        from zeroconf import IPVersion, Zeroconf

        self.zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str]] = []
        self.browser: Any = None

    def browse(self, service_type: str = HTTP) -> None:
        from zeroconf import ServiceBrowser

        self.browser = ServiceBrowser(self.zc, service_type, handlers=[self._changed])

    def _changed(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        with self.lock:
            self.seen.append((state_change.name, name))

    def added(self, name: str) -> bool:
        with self.lock:
            return ("Added", name) in self.seen

    def removed(self, name: str) -> bool:
        with self.lock:
            return ("Removed", name) in self.seen

    def info(self, name: str, service_type: str = HTTP) -> Any:
        return self.zc.get_service_info(service_type, name, timeout=5000)

    def resolve(self, host: str) -> list[str]:
        from zeroconf import AddressResolverIPv4

        resolver = AddressResolverIPv4(host)
        if not resolver.request(self.zc, 5000):
            return []
        return list(resolver.parsed_addresses())

    def close(self) -> None:
        if self.browser is not None:
            self.browser.cancel()
        self.zc.close()


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    result: T = await threads.deferToThread(fn, *args)
    return result


@pytest_twisted.ensureDeferred
async def test_zeroconf_finds_portal_and_app_and_sees_them_go() -> None:
    """zeroconf finds portal and app (address, port, TXT), resolves the host, sees goodbyes."""
    require_zeroconf()
    responder = Responder().start()
    browser = await in_thread(Browser)
    try:
        responder.publish("gitea", "web", 9001, txt=(("path", "/gitea"),))
        await in_thread(browser.browse)
        portal = "piccolo._http._tcp.local."
        app = "gitea-web._http._tcp.local."
        await wait_for(lambda: browser.added(portal) and browser.added(app), what="both services")

        info = await in_thread(browser.info, portal)
        assert info is not None
        assert info.parsed_addresses() == ["127.0.0.1"]
        assert (info.port, info.server) == (8080, "piccolo.local.")
        assert info.properties == {b"path": b"/"}

        info = await in_thread(browser.info, app)
        assert info is not None
        assert (info.parsed_addresses(), info.port) == (["127.0.0.1"], 9001)
        assert info.properties == {b"path": b"/gitea"}

        assert await in_thread(browser.resolve, "piccolo.local.") == ["127.0.0.1"]

        responder.publish("gitea", "web", 9001, withdrawn=True)
        await wait_for(lambda: browser.removed(app), what="app goodbye")
        assert not browser.removed(portal)

        await responder.stop()
        await wait_for(lambda: browser.removed(portal), what="portal goodbye on stop")
        health = responder.health.components()
        assert [c.component for c in health if c.component.startswith("mdns:")] == []
    finally:
        await responder.stop()
        await in_thread(browser.close)


@pytest_twisted.ensureDeferred
async def test_renames_when_zeroconf_holds_the_names_first() -> None:
    """When zeroconf already holds piccolo.local and the portal's name, piccolod renames both."""
    require_zeroconf()
    from zeroconf import ServiceInfo

    browser = await in_thread(Browser)
    squatter = ServiceInfo(
        HTTP,
        "piccolo." + HTTP,
        addresses=[socket.inet_aton("127.0.0.2")],
        port=1234,
        properties={"who": "zeroconf"},
        server="piccolo.local.",
    )
    await in_thread(browser.zc.register_service, squatter)
    responder = Responder()
    try:
        responder.start()
        host = await wait_for(
            lambda: responder.claimed("host", "piccolo-2.local"), what="host renamed"
        )
        assert (host.requested, host.reason) == ("piccolo.local", "conflict")
        service = await wait_for(
            lambda: responder.claimed("service", "piccolo (2)._http._tcp.local"),
            what="portal renamed",
        )
        assert service.reason == "conflict"
        assert responder.service.host_name() == "piccolo-2.local"

        info = await in_thread(browser.info, "piccolo (2)." + HTTP)
        assert info is not None
        assert (info.port, info.server) == (8080, "piccolo-2.local.")
        assert info.parsed_addresses() == ["127.0.0.1"]
        assert await in_thread(browser.resolve, "piccolo-2.local.") == ["127.0.0.1"]
        squatted = await in_thread(browser.info, "piccolo." + HTTP)
        assert squatted is not None and squatted.port == 1234
    finally:
        await responder.stop()
        await in_thread(browser.close)


@pytest_twisted.ensureDeferred
async def test_renames_after_a_late_conflicting_announcement() -> None:
    """A foreign announcement for our claimed instance name makes us probe again and rename."""
    require_zeroconf()
    from zeroconf import ServiceInfo

    responder = Responder().start()
    browser = await in_thread(Browser)
    try:
        await wait_for(
            lambda: responder.claimed("service", "piccolo._http._tcp.local"), what="portal"
        )
        late = ServiceInfo(
            HTTP,
            "piccolo." + HTTP,
            addresses=[socket.inet_aton("127.0.0.3")],
            port=4321,
            server="elsewhere.local.",
        )
        # cooperating_responders: announce without probing, as a misbehaving
        # (or partitioned-then-merged) host would.
        await in_thread(lambda: browser.zc.register_service(late, cooperating_responders=True))
        await wait_for(
            lambda: responder.claimed("service", "piccolo (2)._http._tcp.local"),
            what="rename after a post-claim conflict",
        )
        assert responder.service.host_name() == "piccolo.local"
    finally:
        await responder.stop()
        await in_thread(browser.close)


@pytest_twisted.ensureDeferred
async def test_zeroconf_cannot_take_our_claimed_name() -> None:
    """zeroconf probing for a name we hold sees our answer and picks another name."""
    require_zeroconf()
    from zeroconf import ServiceInfo

    responder = Responder().start()
    try:
        await wait_for(
            lambda: responder.claimed("service", "piccolo._http._tcp.local"), what="portal"
        )
        browser = await in_thread(Browser)
        try:
            info = ServiceInfo(
                HTTP,
                "piccolo." + HTTP,
                addresses=[socket.inet_aton("127.0.0.4")],
                port=5555,
                server="other.local.",
            )
            await in_thread(lambda: browser.zc.register_service(info, allow_name_change=True))
            assert info.name != "piccolo." + HTTP
        finally:
            await in_thread(browser.close)
        assert responder.service.host_name() == "piccolo.local"
        assert responder.claimed("service", "piccolo (2)._http._tcp.local") is None
    finally:
        await responder.stop()
