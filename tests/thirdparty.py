"""
A third-party subsystem, as someone outside piccolod would write it: a
service for a new slot, loaded from a plugin package or drop-in file that
piccolod never names.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from zope.interface import Attribute, Interface, implementer


class IEcho(Interface):
    """A toy interface a third-party plugin provides."""

    greeting: str = Attribute("What it says.")

    def echo(text: str) -> str:
        """Return ``text`` with the greeting."""


@implementer(IEcho)
class EchoService(Service):
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    @classmethod
    def from_context(cls, ctx: Any) -> EchoService:
        return cls(str(ctx.config["greeting"]))

    def echo(self, text: str) -> str:
        return f"{self.greeting}, {text}"


class NotAService:
    """Built by a broken plugin: provides nothing it claims."""

    @classmethod
    def from_context(cls, ctx: Any) -> NotAService:
        return cls()


class ReactorBlocker(Service):
    """
    Blocks the reactor thread once: ``delay`` seconds after start it runs a
    blocking ``time.sleep(seconds)`` on the reactor, as a buggy subsystem
    would.  Used to show that the systemd watchdog pings stop then.
    """

    def __init__(self, reactor: Any, delay: float, seconds: float) -> None:
        self.reactor = reactor
        self.delay = delay
        self.seconds = seconds

    @classmethod
    def from_context(cls, ctx: Any) -> ReactorBlocker:
        return cls(ctx.reactor, float(ctx.config["delay"]), float(ctx.config["seconds"]))

    def startService(self) -> None:
        super().startService()
        import time

        self.reactor.callLater(self.delay, time.sleep, self.seconds)
