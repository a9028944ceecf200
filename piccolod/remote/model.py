"""
The remote subsystem's record: configuration, aliases, secrets and
certificates, in memory (:class:`RemoteState`) and as stored (one JSON
object in the control store's remote repository, written through the
``store.remote.*`` commands, so it rests encrypted like every control-plane
record).

The record is replaced as a whole in one transaction: a configuration
change, a pinned host key or a new certificate (its key and chain together)
is either stored completely or not at all.

Tests: ``tests/unit/test_remote_model.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs

from piccolod.commands import (
    ConfigureRemote,
    RemoteAcmeConfig,
    RemoteExposure,
    RemoteTunnelConfig,
    is_remote_hostname,
    remote_target_error,
)
from piccolod.errors import InvalidCommand

__all__ = [
    "CONFIG_KEYS",
    "RECORD_VERSION",
    "Alias",
    "Certificate",
    "RemoteState",
    "settings_from_json",
    "settings_to_json",
]

#: The layout version of the stored record.
RECORD_VERSION = 1

#: ``[subsystems.remote]`` keys (variant ``manager``) and their defaults.
CONFIG_KEYS: dict[str, Any] = {
    #: Where the TLS terminator listens (this node's loopback).
    "tls_listen": "tcp:0:interface=127.0.0.1",
    #: Seconds between certificate renewal checks.
    "renew_check_interval": 43200.0,
    #: Attempts after the first for one issuance (a job's retries).
    "acme_retries": 5,
    #: Backoff between issuance attempts (seconds, jittered).
    "acme_retry_initial": 30.0,
    "acme_retry_max": 3600.0,
    #: Seconds one ACME attempt may take (order, validation, finalisation).
    "acme_timeout": 300.0,
    #: Threads for the blocking ACME client.
    "acme_threads": 2,
}


def _frozen(mapping: Mapping[str, Certificate]) -> Mapping[str, Certificate]:
    return MappingProxyType(dict(mapping))


@attrs.frozen
class Alias:
    """An extra hostname (TLS, SNI) routed to ``portal`` or ``<app>/<listener>``."""

    hostname: str
    target: str

    def to_json(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "target": self.target}


@attrs.frozen
class Certificate:
    """
    A certificate as issued: its private key and chain (leaf first) and
    what was read from the leaf.  Times are seconds since the epoch.
    """

    hostname: str
    key_pem: str = attrs.field(repr=False)
    chain_pem: str
    not_before: float
    not_after: float
    serial: str
    issuer: str
    issued_at: float

    def to_record(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def to_json(self) -> dict[str, Any]:
        """What may be shown (no key)."""
        return {
            "hostname": self.hostname,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "serial": self.serial,
            "issuer": self.issuer,
            "issued_at": self.issued_at,
        }


def settings_to_json(settings: ConfigureRemote) -> dict[str, Any]:
    """The configuration as a JSON object (``ConfigureRemote`` fields)."""
    out: dict[str, Any] = attrs.asdict(settings)
    out["tunnels"] = [attrs.asdict(t) for t in settings.tunnels]
    out["expose"] = [attrs.asdict(e) for e in settings.expose]
    return out


def settings_from_json(data: Any) -> ConfigureRemote:
    """Rebuild (and re-validate) a configuration; raises ``InvalidCommand``."""
    if not isinstance(data, Mapping):
        raise InvalidCommand("the remote configuration must be a JSON object")
    try:
        values = dict(data)
        values["tunnels"] = tuple(RemoteTunnelConfig(**t) for t in values.get("tunnels", ()))
        values["expose"] = tuple(RemoteExposure(**e) for e in values.get("expose", ()))
        acme = values.get("acme")
        values["acme"] = RemoteAcmeConfig(**acme) if acme is not None else None
        return ConfigureRemote(**values)
    except (TypeError, AttributeError) as e:
        raise InvalidCommand(f"the remote configuration is malformed: {e}") from None


@attrs.frozen
class RemoteState:
    """
    Everything the remote subsystem keeps in the control store.

    @ivar configured: a configuration was ever given (``settings`` is it).
    @ivar revision: bumped by every stored change.
    @ivar device_key: the tunnels' ed25519 key (OpenSSH private key text).
    @ivar account_key: the ACME account key (PEM); ``account_uri`` its URL.
    @ivar certificates: by hostname.
    """

    enabled: bool = False
    configured: bool = False
    revision: int = 0
    settings: ConfigureRemote = attrs.field(factory=ConfigureRemote)
    aliases: tuple[Alias, ...] = ()
    device_key: str = attrs.field(default="", repr=False)
    account_key: str = attrs.field(default="", repr=False)
    account_uri: str = ""
    certificates: Mapping[str, Certificate] = attrs.field(
        factory=dict, converter=_frozen, repr=lambda c: repr(sorted(c))
    )

    # -- what the configuration implies ------------------------------------

    def hostnames(self) -> dict[str, str]:
        """Every TLS hostname and its target (``portal`` or ``<app>/<listener>``)."""
        names: dict[str, str] = {}
        if self.settings.portal_hostname:
            names[self.settings.portal_hostname] = "portal"
        for exposure in self.settings.expose:
            if exposure.hostname:
                names[exposure.hostname] = exposure.target
        for alias in self.aliases:
            names.setdefault(alias.hostname, alias.target)
        return dict(sorted(names.items()))

    def bump(self, **changes: Any) -> RemoteState:
        """A copy with ``changes`` and the next revision."""
        return attrs.evolve(self, revision=self.revision + 1, **changes)

    def with_certificate(self, certificate: Certificate) -> RemoteState:
        certificates = dict(self.certificates)
        certificates[certificate.hostname] = certificate
        return self.bump(certificates=certificates)

    def pruned(self) -> RemoteState:
        """Without certificates of hostnames no longer configured (no new revision)."""
        wanted = self.hostnames()
        kept = {h: c for h, c in self.certificates.items() if h in wanted}
        if len(kept) == len(self.certificates):
            return self
        return attrs.evolve(self, certificates=kept)

    # -- the stored form ----------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "enabled": self.enabled,
            "configured": self.configured,
            "revision": self.revision,
            "settings": settings_to_json(self.settings),
            "aliases": [a.to_json() for a in self.aliases],
            "secrets": {
                "device_key": self.device_key,
                "account_key": self.account_key,
                "account_uri": self.account_uri,
            },
            "certificates": {h: c.to_record() for h, c in sorted(self.certificates.items())},
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RemoteState:
        """Rebuild from the stored form; raises ``InvalidCommand`` if it is not one."""
        if not isinstance(record, Mapping) or record.get("version") != RECORD_VERSION:
            raise InvalidCommand(
                f"the stored remote record is not version {RECORD_VERSION} "
                f"(got {record.get('version') if isinstance(record, Mapping) else record!r})"
            )
        try:
            secrets = record.get("secrets", {})
            aliases = tuple(Alias(a["hostname"], a["target"]) for a in record.get("aliases", ()))
            for alias in aliases:
                if not is_remote_hostname(alias.hostname) or remote_target_error(alias.target):
                    raise InvalidCommand(f"stored alias {alias!r} is invalid")
            certificates = {
                hostname: Certificate(**value)
                for hostname, value in record.get("certificates", {}).items()
            }
            state = cls(
                enabled=bool(record.get("enabled", False)),
                configured=bool(record.get("configured", False)),
                revision=int(record.get("revision", 0)),
                settings=settings_from_json(record.get("settings", {})),
                aliases=aliases,
                device_key=str(secrets.get("device_key", "")),
                account_key=str(secrets.get("account_key", "")),
                account_uri=str(secrets.get("account_uri", "")),
                certificates=certificates,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidCommand(f"the stored remote record is malformed: {e!r}") from None
        return state
