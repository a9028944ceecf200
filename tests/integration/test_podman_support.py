"""
Real podman for the integration tests (no tests here).

:class:`PodmanFixture` writes the containers.conf that works on these
machines (runc, cgroupfs, explicit ulimits, file events), starts
``podman system service --time=0 unix://<tmp>/podman.sock`` itself, builds
the test image from Debian's busybox-static with ``podman import`` (never
pulled), and on ``stop()`` removes what the tests created and stops the
service by its PID.  ``available()`` says why podman cannot run here; the
tests skip then, or fail with ``PICCOLOD_REQUIRE_INTEGRATION=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.integration.support import REQUIRE

T = TypeVar("T")


def running_reactor() -> Any:
    """The reactor pytest-twisted runs (imported late: it picks the reactor)."""
    from twisted.internet import reactor

    return reactor


def wait(d: Deferred[T], timeout: float = 60.0) -> T:
    """Block the test on ``d`` (pytest-twisted), failing after ``timeout`` seconds."""
    d.addTimeout(timeout, running_reactor())
    result: T = pytest_twisted.blockon(d)
    return result


CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

BUSYBOX = "/bin/busybox"
HTTPD = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]


def missing() -> list[str]:
    """What this machine lacks for the podman tests."""
    lacking = [t for t in ("podman", "runc") if shutil.which(t) is None]
    if not os.path.exists(BUSYBOX) or not _static(BUSYBOX):
        lacking.append("busybox-static")
    return lacking


def _static(path: str) -> bool:
    try:
        out = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return True
    return "not a dynamic executable" in (out.stdout + out.stderr)


def require_podman() -> None:
    lacking = missing()
    if lacking:
        message = f"podman integration needs {', '.join(lacking)}"
        if REQUIRE:
            pytest.fail(message + " (PICCOLOD_REQUIRE_INTEGRATION=1)")
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PodmanFixture:
    """One podman service and test image for a test module."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="piccolod-podman-"))
        self.conf = self.root / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        self.socket = str(self.root / "podman.sock")
        self.tag = uuid.uuid4().hex[:8]
        self.prefix = f"pt{self.tag}"
        self.image = f"localhost/piccolod-test-{self.tag}:1"
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self.env.pop("NOTIFY_SOCKET", None)
        self.process: subprocess.Popen[bytes] | None = None

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def start(self) -> None:
        self.build_image()
        log = open(self.root / "service.log", "wb")
        self.process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            if os.path.exists(self.socket):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.socket)
                        s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
                        if b"OK" in s.recv(1024):
                            return
                except OSError:
                    pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "podman system service did not answer: "
                    + (self.root / "service.log").read_text()[-2000:]
                )
            time.sleep(0.02)

    def build_image(self) -> None:
        rootfs = self.root / "rootfs"
        for sub in ("bin", "www", "etc", "data", "tmp"):
            (rootfs / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in ("sh", "echo", "httpd", "cat", "sleep", "true", "date"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        (rootfs / "www" / "index.html").write_text("<h1>hi</h1>\n")
        archive = self.root / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(rootfs, arcname=".")
        self.podman("import", "--change", f"CMD {json.dumps(HTTPD)}", str(archive), self.image)

    def containers(self, label: str) -> list[dict[str, object]]:
        out = self.podman("ps", "-a", "--format", "json", "--filter", f"label={label}").stdout
        return list(json.loads(out or "[]"))

    def kill(self, container: str) -> None:
        self.podman("kill", "--signal", "KILL", container)

    def stop(self) -> None:
        for label in (f"piccolod.test={self.prefix}", f"piccolod.instance={self.prefix}"):
            for c in self.containers(label):
                self.podman("rm", "-f", "-t", "0", str(c["Id"]), check=False)
        out = self.podman("images", "--format", "{{.Repository}}:{{.Tag}}", check=False).stdout
        for image in out.split():
            if self.prefix in image or self.tag in image:
                self.podman("rmi", "-f", image, check=False)
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
