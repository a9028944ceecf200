"""
Helpers for integration tests: run ``twistd -n piccolod`` as a subprocess on
a loopback port it picks itself, find it through ``<state_dir>/api.json``,
poll with deadlines (never fixed sleeps), and stop only what was started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

#: twistd of this Python environment.
TWISTD = [str(Path(sys.executable).with_name("twistd"))]

REQUIRE = os.environ.get("PICCOLOD_REQUIRE_INTEGRATION") == "1"


def require_tool(*names: str) -> None:
    """Skip (or, with PICCOLOD_REQUIRE_INTEGRATION=1, fail) when a tool is missing."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        message = f"missing tools: {', '.join(missing)}"
        if REQUIRE:
            pytest.fail(message + " (PICCOLOD_REQUIRE_INTEGRATION=1)")
        pytest.skip(message)


def poll(
    check: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Call ``check`` until it returns something other than None, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
        except Exception as e:  # the thing polled is not there yet
            last_error = e
            result = None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or check}: {last_error!r}"
            )
        time.sleep(interval)


def http(
    method: str, url: str, body: Any = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request; returns (status, headers, decoded JSON or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, dict(response.headers), json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, dict(e.headers), json.loads(raw) if raw else None


class Daemon:
    """A ``twistd -n piccolod`` subprocess and its state directory."""

    def __init__(
        self,
        state_dir: Path,
        args: Sequence[str] = (),
        reactor: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.log_path = state_dir.parent / f"{state_dir.name}.log"
        cmd = list(TWISTD)
        if reactor:
            cmd.append(f"--reactor={reactor}")
        cmd += [
            "-n",
            "--pidfile=",
            "piccolod",
            "--state-dir",
            str(state_dir),
            "--listen",
            "tcp:0:interface=127.0.0.1",
            *args,
        ]
        self.cmd = cmd
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Daemon:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        return self

    @property
    def url(self) -> str:
        return poll(self._read_url, timeout=15, what="api.json")

    def _read_url(self) -> str | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"piccolod exited with {self.proc.returncode}:\n{self.log()}")
        info = json.loads((self.state_dir / "api.json").read_text())
        return info["url"] if info.get("pid") == self.proc.pid else None

    def get(self, path: str) -> tuple[int, dict[str, str], Any]:
        return http("GET", self.url + path)

    def wait_ready(self, timeout: float = 15.0) -> float:
        """Poll /health/ready until 200; returns seconds since start."""
        poll(
            lambda: True if self.get("/api/v1/health/ready")[0] == 200 else None,
            timeout=timeout,
            what="readiness",
        )
        return time.monotonic() - self.started_at

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if hasattr(self, "_log"):
            self._log.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
