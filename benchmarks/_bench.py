"""Helpers shared by the benchmarks that drive a real daemon over HTTP."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def http_call(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Any:
    """One request with a JSON body; returns ``(headers, raw body)``; raises on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.headers, response.read()


def wait_for(check: Callable[[], T | None], timeout: float = 30.0, what: str = "the daemon") -> T:
    """Poll ``check`` every 50 ms until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value is not None:
                return value
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)
