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
    ) -> Reply:
        sent = dict(headers or {})
        data = None
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
