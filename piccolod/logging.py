"""
Log observers chosen at the root: structured JSON lines for a real box,
text for development, both filtered by level, and every event stamped with
the correlation id of the command being handled.

The dispatcher sets :data:`correlation_id` (a ``ContextVar``) around each
handler call; coroutines and callbacks started from there inherit it, so a
line logged anywhere below a command carries that command's id in the
stable field ``correlation_id``.
"""

from __future__ import annotations

import contextvars
import io
import sys
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer

from piccolod.errors import ConfigError

#: The correlation id of the command (or request) whose code is running.
correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "piccolod_correlation_id", default=None
)

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
FORMATS = ("text", "json")


@implementer(ILogObserver)
class CorrelationStamper:
    """Adds ``correlation_id`` from the running context to each event, then forwards."""

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        if "correlation_id" not in event:
            cid = correlation_id.get()
            if cid is not None:
                event = dict(event, correlation_id=cid)
        self.observer(event)


#: Twisted namespaces whose info lines say nothing to an operator: every
#: new HTTP client connection (to podman, etcd, ACME) logs "Starting
#: factory" and "Stopping factory".  Shown from ``warn`` at level ``info``,
#: and in full at ``debug``.
CHATTY_NAMESPACES = ("twisted.web.client._HTTP11ClientFactory",)


def observer_for(
    level: str = "info",
    format: str = "text",
    stream: IO[Any] | None = None,
    path: str | None = None,
) -> ILogObserver:
    """
    A filtered, correlation-stamped observer writing ``format`` lines to
    ``stream`` or to ``path`` (appended, created ``0600``).
    """
    errors = []
    if level not in LEVELS:
        errors.append(f"[log] level must be one of {', '.join(LEVELS)}")
    if format not in FORMATS:
        errors.append(f"[log] format must be one of {', '.join(FORMATS)}")
    if errors:
        raise ConfigError(errors)
    if stream is None:
        if path is None or path == "-":
            stream = sys.stdout
        else:
            import os

            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            stream = io.open(fd, "a", encoding="utf-8", buffering=1)  # noqa: UP020
    make: Callable[[IO[Any]], ILogObserver] = (
        jsonFileLogObserver if format == "json" else textFileLogObserver
    )
    inner = make(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    if level == "info":
        for namespace in CHATTY_NAMESPACES:
            predicate.setLogLevelForNamespace(namespace, LogLevel.warn)
    return CorrelationStamper(FilteringLogObserver(inner, [predicate]))
