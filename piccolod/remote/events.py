"""
Events of the remote subsystem, re-exported from the shared vocabulary
(:mod:`piccolod.events`), where they live.
"""

from piccolod.events import RemoteCertificateChanged, RemoteRouteChanged

__all__ = ["RemoteCertificateChanged", "RemoteRouteChanged"]
