"""
A small blocking HTTP client for integration tests of the API: keeps the
session cookie and CSRF token like a browser, or sends a bearer token.
Standard library only (urllib), loopback only.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from pathlib import Path
from typing import Any

#: A Raspberry-Pi-sized Argon2 is far too slow for tests that set up often.
FAST_PERSISTENCE = """
[subsystems.persistence]
argon2_time_cost = 1
argon2_memory_kib = 1024
unlock_backoff_initial = 0.2
unlock_backoff_max = 2.0
"""

PASSWORD = "correct horse battery"


def write_config(directory: Path, extra: str = "", name: str = "piccolod.toml") -> Path:
    """A config file with a fast KDF plus ``extra`` TOML; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(FAST_PERSISTENCE + "\n" + extra)
    return path


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = raw

    @property
    def body(self) -> Any:
        if not self.raw:
            return None
        try:
            return json.loads(self.raw)
        except ValueError:
            return self.raw.decode("utf-8", "replace")

    @property
    def type(self) -> str:
        return str(self.body.get("type", "")).rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.raw[:300]!r}>"


class APIClient:
    """One client of a daemon at ``url`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80
        self.token = token
        self.timeout = timeout
        self.cookie: str | None = None
        self.csrf: str | None = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        csrf: bool = True,
        data: bytes | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        if self.token:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        if self.cookie:
            sent.setdefault("Cookie", f"piccolod_session={self.cookie}")
        if csrf and self.csrf:
            sent.setdefault("X-CSRF-Token", self.csrf)
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request(method, path, body=data, headers=sent)
            response = connection.getresponse()
            raw = response.read()
            reply = Reply(response.status, response.headers, raw)
        finally:
            connection.close()
        for cookie in reply.headers.get_all("Set-Cookie") or []:
            value = cookie.split(";", 1)[0].split("=", 1)[1]
            self.cookie = value or None
        if reply.status < 300 and isinstance(reply.body, dict) and reply.body.get("csrf_token"):
            self.csrf = reply.body["csrf_token"]
        return reply

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def raw(self, method: str, path: str, data: bytes, content_type: str) -> Reply:
        """A request whose body is ``data`` as it is (uploads)."""
        return self.request(method, path, headers={"Content-Type": content_type}, data=data)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Reply:
        return self.request("DELETE", path, **kw)

    # -- flows

    def setup(self, password: str = PASSWORD) -> str:
        """First-run setup; logs this client in; returns the recovery key."""
        reply = self.post("/api/v1/auth/setup", {"password": password})
        assert reply.status == 201, reply
        return str(reply.body["recovery_key"])

    def login(self, password: str = PASSWORD) -> Reply:
        return self.post("/api/v1/auth/login", {"password": password})

    def create_token(self, role: str, name: str = "test") -> tuple[str, str]:
        reply = self.post("/api/v1/auth/tokens", {"name": name, "role": role})
        assert reply.status == 201, reply
        return str(reply.body["token"]), str(reply.body["id"])


class SSEConnection:
    """
    A raw Server-Sent Events stream over HTTP/1.0 (so the body is not
    chunked): the bytes as they come, and the frames parsed from them.
    """

    def __init__(
        self,
        url: str,
        token: str,
        query: str = "",
        last_event_id: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        import socket

        parsed = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parsed.hostname, parsed.port), timeout=timeout)
        lines = [
            f"GET /api/v1/events{'?' + query if query else ''} HTTP/1.0",
            f"Host: {parsed.hostname}",
            f"Authorization: Bearer {token}",
            "Accept: text/event-stream",
        ]
        if last_event_id:
            lines.append(f"Last-Event-ID: {last_event_id}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"the stream closed before its headers: {head!r}")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.data = bytearray(rest)
        self._parsed = 0
        self._frames: list[dict[str, Any]] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> bool:
        """Read what is there (blocking once); False when the stream has ended."""
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self.data.extend(chunk)
        return True

    def frames(self) -> list[dict[str, Any]]:
        """Every complete frame so far (``data`` decoded from JSON where it is JSON)."""
        end = self.data.rfind(b"\n\n")
        if end >= self._parsed:
            for block in bytes(self.data[self._parsed : end]).split(b"\n\n"):
                frame: dict[str, Any] = {}
                for line in block.decode().split("\n"):
                    if not line or line.startswith(":"):
                        continue
                    name, _, value = line.partition(": ")
                    frame[name] = value
                if "data" in frame:
                    try:
                        frame["data"] = json.loads(frame["data"])
                    except ValueError:
                        pass
                if frame:
                    self._frames.append(frame)
            self._parsed = end + 2
        return list(self._frames)

    def events(self, topic: str | None = None) -> list[dict[str, Any]]:
        return [
            f for f in self.frames() if "id" in f and (topic is None or f.get("event") == topic)
        ]

    def wait_for(self, count: int, topic: str | None = None, timeout: float = 30.0) -> list[Any]:
        """Read until ``count`` events (of ``topic``) arrived; fail at the deadline."""
        import time

        deadline = time.monotonic() + timeout
        while len(self.events(topic)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.events(topic))} of {count} events arrived")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not self.receive():
                break
        return self.events(topic)

    def close(self) -> None:
        self.sock.close()
