"""
The mDNS subsystem: a multicast DNS responder (RFC 6762) with DNS-SD
(RFC 6763) on ``twisted.names``' message codec and ``listenMulticast``.

- :mod:`piccolod.mdns.records`: names, records, services, the per-interface zone.
- :mod:`piccolod.mdns.codec`: strict decoding, size-bounded encoding.
- :mod:`piccolod.mdns.protocol`: the clock-driven responder and the
  per-interface ``DatagramProtocol``.
- :mod:`piccolod.mdns.service`: the ``multicast`` and ``null`` subsystem
  services (sockets, bus, health).

See docs/mdns.md.
"""

from piccolod.mdns.codec import MalformedPacket, decode, encode_responses
from piccolod.mdns.protocol import Claim, ClaimState, MdnsProtocol, Responder
from piccolod.mdns.ratelimit import RateLimiter
from piccolod.mdns.records import MDNS_GROUP, MDNS_PORT, InvalidService, Record, ServiceSpec, Zone
from piccolod.mdns.service import (
    AdvertisedName,
    IMdnsResponder,
    InterfaceSpec,
    MdnsConfig,
    MulticastResponderService,
    NullResponder,
)

__all__ = [
    "MDNS_GROUP",
    "MDNS_PORT",
    "AdvertisedName",
    "Claim",
    "ClaimState",
    "IMdnsResponder",
    "InterfaceSpec",
    "InvalidService",
    "MalformedPacket",
    "MdnsConfig",
    "MdnsProtocol",
    "MulticastResponderService",
    "NullResponder",
    "RateLimiter",
    "Record",
    "Responder",
    "ServiceSpec",
    "Zone",
    "decode",
    "encode_responses",
]
