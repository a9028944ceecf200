# mypy: disable-error-code="no-untyped-call,untyped-decorator"
"""
Certificates from Debian's ``pebble`` ACME test server, validated for real
over HTTP-01 against piccolod's own HTTP stack, and served by the TLS
terminator with SNI.

Per test: a throwaway CA and server certificate for pebble's own TLS (the
Debian package ships none), ``pebble-challtestsrv`` as pebble's DNS (every
name resolves to 127.0.0.1), and pebble with ``httpPort`` set to the port
where the test serves the API router with ``remote_routes`` (so pebble's
validation GETs ``/.well-known/acme-challenge/<token>`` from piccolod's
router, which dispatches ``remote.acme_challenge``).  Every process is
stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import threads
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import deferLater
from twisted.web.server import Site

from piccolod.api.http import RawResponse, Router
from piccolod.api.remote import remote_routes
from piccolod.commands import ConfigureRemote, RemoteAcmeConfig, RemoteStatus
from piccolod.events import HealthLevel
from piccolod.remote.events import RemoteCertificateChanged
from piccolod.remote.manager import ManagerConfig
from piccolod.remote.model import RemoteState
from piccolod.remote.testing import RemoteHarness

from .support import REQUIRE

pytestmark = pytest.mark.integration

HOSTNAME = "test.example"


def _require() -> None:
    missing = [t for t in ("pebble", "pebble-challtestsrv", "openssl") if not shutil.which(t)]
    for module in ("acme", "josepy"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"python package {module}")
    if missing:
        message = f"missing tools: {', '.join(missing)}"
        if REQUIRE:
            pytest.fail(message + " (PICCOLOD_REQUIRE_INTEGRATION=1)")
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class Pebble:
    """pebble and its DNS (challtestsrv), on free loopback ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.listen, self.management = free_port(), free_port()
        self.http_port, self.tls_port = free_port(), free_port()
        self.dns, self.dns_management = free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ca = root / "ca.pem"

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.listen}/dir"

    def make_certificates(self) -> None:
        root = self.root
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-days", "30", "-subj", "/CN=test minica",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=root,
        )  # fmt: skip
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "cert.csr",
            "-subj", "/CN=localhost",
            cwd=root,
        )  # fmt: skip
        (root / "ext.cnf").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        )
        _openssl(
            "x509", "-req", "-in", "cert.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "cert.pem", "-days", "30", "-extfile", "ext.cnf",
            cwd=root,
        )  # fmt: skip

    def start(self) -> None:
        self.make_certificates()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.listen}",
                "managementListenAddress": f"127.0.0.1:{self.management}",
                "certificate": str(self.root / "cert.pem"),
                "privateKey": str(self.root / "key.pem"),
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (self.root / "pebble.json").write_text(json.dumps(config))
        log = open(self.root / "pebble.log", "ab")
        # challtestsrv: every A query answers 127.0.0.1; its own challenge servers off.
        self.procs.append(
            subprocess.Popen(
                [
                    "pebble-challtestsrv",
                    "-dns01",
                    f"127.0.0.1:{self.dns}",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-management",
                    f"127.0.0.1:{self.dns_management}",
                    "-defaultIPv6",
                    "",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        self.procs.append(
            subprocess.Popen(
                [
                    "pebble",
                    "-config",
                    str(self.root / "pebble.json"),
                    "-dnsserver",
                    f"127.0.0.1:{self.dns}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        )
        log.close()
        context = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(self.directory, context=context, timeout=1).read()
                return
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise AssertionError(f"pebble did not start:\n{self.log()}") from None
                time.sleep(0.05)

    def root_pem(self) -> bytes:
        """The ACME root pebble made at this start (regenerated on every start)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        url = f"https://127.0.0.1:{self.management}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            data: bytes = response.read()
        return data

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        self.procs = []

    def log(self) -> str:
        try:
            return (self.root / "pebble.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


@pytest.fixture
def pebble(tmp_path: Path) -> Any:
    _require()
    server = Pebble(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()  # also what a failed start left running


class Stack:
    """piccolod's HTTP stack on pebble's httpPort: the remote routes and a portal page."""

    def __init__(self, dispatcher: Any, port: int) -> None:
        self.port = port
        self.paths: list[str] = []
        router = Router()
        remote_routes(router, SimpleNamespace(dispatcher=dispatcher))
        router.add("GET", "/", lambda request: RawResponse(b"portal ok", b"text/plain"))
        paths = self.paths
        original = router.render

        def render(request: Any) -> Any:
            paths.append(request.path.decode())
            return original(request)

        router.render = render  # type: ignore[method-assign]
        self.site = Site(router)
        self.listening: Any = None

    def listen(self) -> None:
        from twisted.internet import reactor as _reactor

        reactor: Any = _reactor
        self.listening = reactor.listenTCP(self.port, self.site, interface="127.0.0.1")

    async def close(self) -> None:
        if self.listening is not None:
            await maybeDeferred(self.listening.stopListening)
            self.listening = None

    def challenges_served(self) -> int:
        return sum(p.startswith("/.well-known/acme-challenge/") for p in self.paths)


async def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await deferLater(reactor, 0.05, lambda: None)


def tls_get(port: int, root_pem: bytes, hostname: str) -> tuple[bytes, int]:
    """A TLS client trusting only ``root_pem``: (response, the leaf's serial)."""
    context = ssl.create_default_context(cadata=root_pem.decode("ascii"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=hostname) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(f"GET / HTTP/1.0\r\nHost: {hostname}\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data, x509.load_der_x509_certificate(der).serial_number


@pytest_twisted.async_yield_fixture
async def setup(pebble: Pebble) -> AsyncIterator[Any]:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    harness = RemoteHarness.build(
        reactor,
        api_address=f"http://127.0.0.1:{pebble.http_port}",
        config=ManagerConfig(
            renew_check_interval=0.5,
            acme_retry_initial=0.5,
            acme_retry_max=1.0,
            acme_timeout=30.0,
        ),
    )
    stack = Stack(harness.dispatcher, pebble.http_port)
    harness.start()
    harness.lead("control-plane")
    harness.unlock()
    try:
        yield harness, stack, pebble
    finally:
        await harness.stop()
        await stack.close()


def _configure(pebble: Pebble, renew_before_days: float = 30.0) -> ConfigureRemote:
    return ConfigureRemote(
        portal_hostname=HOSTNAME,
        acme=RemoteAcmeConfig(
            directory_url=pebble.directory,
            ca_bundle=str(pebble.ca),
            email="admin@test.example",
            renew_before_days=renew_before_days,
        ),
    )


def _certificate(harness: Any) -> dict[str, Any]:
    status: RemoteStatus = harness.manager.status()
    (entry,) = status.certificates
    return entry


@pytest_twisted.ensureDeferred
async def test_certificate_issued_over_http01_and_served_with_sni(setup: Any) -> None:
    """pebble validates HTTP-01 against piccolod's router; the TLS terminator serves the chain."""
    harness, stack, pebble = setup
    stack.listen()
    await harness.dispatch(_configure(pebble))
    entry = await wait_for(
        lambda: (e := _certificate(harness))["state"] == "ok" and e, what="issuance"
    )
    assert stack.challenges_served() >= 1  # pebble fetched the token from our router
    stored = RemoteState.from_record(harness.store.record)
    assert HOSTNAME in stored.certificates and stored.account_key
    status: RemoteStatus = harness.manager.status()
    assert status.tls_port
    root = pebble.root_pem()
    body, serial = await threads.deferToThread(tls_get, status.tls_port, root, HOSTNAME)
    assert body.startswith(b"HTTP/1.0 200") and body.endswith(b"portal ok"), body
    assert format(serial, "x") == entry["serial"]
    # No name, no certificate: another SNI name gets no handshake.
    with pytest.raises(ssl.SSLError):
        await threads.deferToThread(tls_get, status.tls_port, root, "other.example")


@pytest_twisted.ensureDeferred
async def test_renewal_before_expiry_replaces_the_served_certificate(setup: Any) -> None:
    """Within the renewal window the periodic check renews, and TLS serves the new certificate."""
    harness, stack, pebble = setup
    stack.listen()
    await harness.dispatch(_configure(pebble))
    first = await wait_for(
        lambda: (e := _certificate(harness))["state"] == "ok" and e, what="issuance"
    )
    # pebble's certificates last 5 years: a 10-year window makes it due now.
    await harness.dispatch(_configure(pebble, renew_before_days=3650.0))
    second = await wait_for(
        lambda: (
            (e := _certificate(harness))["state"] == "ok" and e["serial"] != first["serial"] and e
        ),
        what="renewal",
    )
    assert second["issued_at"] >= first["issued_at"]
    root = pebble.root_pem()
    port = harness.manager.status().tls_port
    _body, serial = await threads.deferToThread(tls_get, port, root, HOSTNAME)
    assert format(serial, "x") == second["serial"]


@pytest_twisted.ensureDeferred
async def test_failing_challenge_is_reported_retried_and_never_half_stored(setup: Any) -> None:
    """Nothing answers HTTP-01 at first: the failure is reported and retried; the retry succeeds."""
    harness, stack, pebble = setup
    events: list[tuple[float, RemoteCertificateChanged]] = []
    harness.bus.subscribe(
        RemoteCertificateChanged.topic,
        lambda e: events.append((harness.reactor.seconds(), e.event)),
    )
    await harness.dispatch(_configure(pebble))  # the HTTP stack is not listening yet
    failed = await wait_for(
        lambda: (e := _certificate(harness))["state"] == "error" and e, what="a failure"
    )
    assert "HTTP-01" in failed["last_error"] and HOSTNAME in failed["last_error"], failed
    assert harness.health.component("remote.acme").level is HealthLevel.WARN
    assert any(e.state == "error" and e.error for _, e in events)
    # Nothing half-written: no certificate, no key stored; nothing served over TLS.
    stored = RemoteState.from_record(harness.store.record)
    assert stored.certificates == {}
    assert "BEGIN CERTIFICATE" not in json.dumps(harness.store.record)
    assert harness.manager.status().tls_port is None

    stack.listen()  # the retry, after its backoff, can now be validated
    entry = await wait_for(
        lambda: (e := _certificate(harness))["state"] == "ok" and e, what="the retry"
    )
    assert entry["attempt"] >= 2 and entry["failures"] >= 1
    # Each retry came after its backoff (0.5 s ± 20 % first), not at once.
    failures = [t for t, e in events if e.state == "error"]
    starts = [t for t, e in events if e.state == "pending" and e.attempt >= 2]
    assert starts and starts[0] - failures[0] >= 0.4, events
    assert harness.health.component("remote.acme").level is HealthLevel.OK
    stored = RemoteState.from_record(harness.store.record)
    assert stored.certificates[HOSTNAME].serial == entry["serial"]
