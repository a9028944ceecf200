"""
Drop-in subsystem plugins for the ``mdns`` slot (opt-in: select with
``[subsystems.mdns] variant = "multicast"`` or ``--use mdns=multicast``).

- ``multicast``: the RFC 6762/6763 responder on the configured interfaces.
- ``null``: advertises nothing.
"""

from __future__ import annotations

from piccolod.interfaces import IMdnsResponder
from piccolod.kernel.plugins import SubsystemPlugin

mdnsMulticast = SubsystemPlugin(
    slot="mdns",
    variant="multicast",
    description=(
        "mDNS responder: <hostname>.local and DNS-SD for the portal and app listeners "
        "(RFC 6762/6763) on the configured interfaces"
    ),
    factory="piccolod.mdns.service.MulticastResponderService.from_context",
    provides=(IMdnsResponder,),
    config_keys="piccolod.mdns.service.CONFIG_KEYS",
)

mdnsNull = SubsystemPlugin(
    slot="mdns",
    variant="null",
    description="no mDNS: nothing is advertised",
    factory="piccolod.mdns.service.NullResponder.from_context",
    provides=(IMdnsResponder,),
    config_keys={},
)
