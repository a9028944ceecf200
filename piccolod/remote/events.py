"""
Events of the remote subsystem that the shared vocabulary does not hold yet.

LOCAL DEFINITIONS, to move into :mod:`piccolod.events` (and its ``TOPICS``
table) as they are: ``RemoteConfigChanged`` (``remote.config``) is already
there; these two are published on ``remote.route`` and
``remote.certificate``.  They are ordinary :class:`~piccolod.events.Event`
subclasses, so the bus, the SSE stream and every subscriber already handle
them.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from piccolod.events import Event

__all__ = ["RemoteCertificateChanged", "RemoteRouteChanged"]


@attrs.frozen
class RemoteRouteChanged(Event):
    """
    A remote route changed: where a target (``portal`` or
    ``<app>/<listener>``) is served from (``mode``: ``local``, ``leader``
    or ``unavailable``), its hostnames and its port on the tunnel servers;
    ``withdrawn`` when it is no longer exposed (or storage was locked).
    """

    topic: ClassVar[str] = "remote.route"
    retained: ClassVar[bool] = True
    target: str
    mode: str
    host: str = ""
    port: int = 0
    hostnames: tuple[str, ...] = ()
    remote_ports: tuple[tuple[str, int], ...] = ()
    reason: str = ""
    withdrawn: bool = False

    def key(self) -> str:
        return self.target


@attrs.frozen
class RemoteCertificateChanged(Event):
    """
    A hostname's certificate was issued or renewed (``ok``), an issuance
    attempt failed (``error``, with the reason; retried with backoff) or
    started (``pending``).
    """

    topic: ClassVar[str] = "remote.certificate"
    retained: ClassVar[bool] = True
    hostname: str
    state: str
    not_after: float | None = None
    error: str = ""
    attempt: int = 0

    def key(self) -> str:
        return self.hostname
