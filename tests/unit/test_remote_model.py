# mypy: disable-error-code="no-untyped-call"
"""The remote record (stored form, validation), the remote command values, and key material."""

from __future__ import annotations

import datetime
import json
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import (
    REDACTED,
    ConfigureRemote,
    GetAcmeChallenge,
    RemoteAcmeConfig,
    RemoteExposure,
    RemoteTunnelConfig,
    StoredRemote,
    StoreSaveRemote,
    is_remote_hostname,
    remote_target_error,
)
from piccolod.errors import InvalidCommand
from piccolod.remote.keys import (
    device_public_key,
    generate_account_key,
    generate_device_key,
    generate_domain_key,
    public_key_fingerprint,
    read_chain,
)
from piccolod.remote.model import (
    Alias,
    Certificate,
    RemoteState,
    settings_from_json,
    settings_to_json,
)


def full_state() -> RemoteState:
    settings = ConfigureRemote(
        tunnels=(RemoteTunnelConfig("t.example", "piccolo", host_key="SHA256:" + "A" * 43),),
        portal_hostname="portal.example.net",
        https_port=443,
        expose=(RemoteExposure("blog", "web", 8081, "blog.example.net"),),
        acme=RemoteAcmeConfig("https://acme.example/dir", email="a@example.net"),
    )
    certificate = Certificate(
        "portal.example.net", "KEY PEM", "CHAIN PEM", 1.0, 2.0, "ab", "CN=x", 1.5
    )
    return RemoteState(
        enabled=True,
        configured=True,
        revision=7,
        settings=settings,
        aliases=(Alias("www.example.net", "blog/web"),),
        device_key="DEVICE",
        account_key="ACCOUNT",
        account_uri="https://acme.example/acct/1",
        certificates={"portal.example.net": certificate},
    )


class RecordTests(SynchronousTestCase):
    def test_roundtrip_through_json(self) -> None:
        """The stored form survives JSON and rebuilds an equal state."""
        state = full_state()
        record = json.loads(json.dumps(state.to_record()))
        self.assertEqual(RemoteState.from_record(record), state)
        self.assertEqual(record["version"], 1)

    def test_secrets_stay_out_of_repr(self) -> None:
        """repr of the state and of the store commands never shows a secret."""
        state = full_state()
        for value in (state, StoreSaveRemote(record=state.to_record()),
                      StoredRemote(record=state.to_record())):  # fmt: skip
            self.assertNotIn("DEVICE", repr(value))
            self.assertNotIn("ACCOUNT", repr(value))
            self.assertNotIn("KEY PEM", repr(value))
        self.assertEqual(StoreSaveRemote(record={"a": 1}).to_json(), {"record": REDACTED})
        self.assertEqual(StoredRemote(record={"a": 1}).to_json()["record"], REDACTED)

    def test_bad_records_are_refused(self) -> None:
        """Another version, missing parts or invalid values raise InvalidCommand."""
        good = full_state().to_record()
        bad: list[Any] = [
            None,
            {"version": 2},
            {**good, "settings": {"tunnels": [{"host": "h"}]}},  # no user
            {**good, "settings": {"unknown": 1}},
            {**good, "aliases": [{"hostname": "Bad Name", "target": "portal"}]},
            {**good, "aliases": [{"hostname": "ok.example.net", "target": "x"}]},
            {**good, "certificates": {"h": {"hostname": "h"}}},
            {**good, "revision": "seven"},
        ]
        for record in bad:
            with self.assertRaises(InvalidCommand, msg=record):
                RemoteState.from_record(record)

    def test_hostnames_and_pruning(self) -> None:
        """Hostnames come from the portal, exposures and aliases; others' certificates go."""
        state = full_state()
        self.assertEqual(
            state.hostnames(),
            {
                "blog.example.net": "blog/web",
                "portal.example.net": "portal",
                "www.example.net": "blog/web",
            },
        )
        fewer = attrs.evolve(state, settings=attrs.evolve(state.settings, portal_hostname=""))
        self.assertEqual(fewer.pruned().certificates, {})
        self.assertIs(state.pruned(), state)

    def test_settings_json_roundtrip(self) -> None:
        """The configuration converts to JSON and back, re-validated."""
        settings = full_state().settings
        self.assertEqual(settings_from_json(settings_to_json(settings)), settings)
        with self.assertRaises(InvalidCommand):
            settings_from_json([])
        with self.assertRaises(InvalidCommand):
            settings_from_json({"https_port": 70000})


class VocabularyTests(SynchronousTestCase):
    def test_hostnames(self) -> None:
        """Remote hostnames are lowercase DNS names of two labels or more."""
        for good in ("a.b", "portal.example.net", "x-1.example.net", "a" * 63 + ".net"):
            self.assertTrue(is_remote_hostname(good), good)
        for bad in ("localhost", "Portal.example.net", "-a.example", "a-.example", "a..b",
                    "a b.example", "a" * 64 + ".net", "", 7, "x.y/", "é.example"):  # fmt: skip
            self.assertFalse(is_remote_hostname(bad), bad)

    def test_targets(self) -> None:
        """A target is the portal or app/listener."""
        self.assertIsNone(remote_target_error("portal"))
        self.assertIsNone(remote_target_error("blog/web"))
        for bad in ("", "blog", "blog/web/x", "Blog/web", "blog/", "/web", "blog/w b", None):
            self.assertIsNotNone(remote_target_error(bad), bad)

    def test_command_values(self) -> None:
        """Ports, names, seconds, URLs and tokens are checked when commands are built."""
        cases = [
            lambda: RemoteTunnelConfig("h", "u", port=0),
            lambda: RemoteTunnelConfig("h", "u", name="Bad"),
            lambda: RemoteTunnelConfig("h", "u", keepalive_interval=0),
            lambda: RemoteTunnelConfig("h", "u", keepalive_timeout=float("nan")),
            lambda: RemoteTunnelConfig("h@x", "u"),
            lambda: RemoteTunnelConfig("h", "u@x"),
            lambda: RemoteExposure("blog", "web", remote_port=65536),
            lambda: RemoteExposure("blog", "w/b"),
            lambda: RemoteAcmeConfig("https://a/dir", renew_before_days=-1),
            lambda: RemoteAcmeConfig("https://a/dir", email="x\ny"),
            lambda: GetAcmeChallenge(token=""),
            lambda: ConfigureRemote(https_port=True),  # type: ignore[arg-type]
            lambda: ConfigureRemote(expose=[RemoteExposure("blog", "web")]),  # type: ignore[arg-type]
        ]
        for case in cases:
            with self.assertRaises(InvalidCommand):
                case()


def _self_signed(key_pem: str, names: list[str]) -> str:
    key: Any = serialization.load_pem_private_key(key_pem.encode(), password=None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "x")])
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(0xABC)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=90))
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


class KeyTests(SynchronousTestCase):
    def test_device_key(self) -> None:
        """The device key is OpenSSH ed25519; its public line has a matching fingerprint."""
        key = generate_device_key()
        self.assertTrue(key.startswith("-----BEGIN OPENSSH PRIVATE KEY-----"))
        line = device_public_key(key)
        self.assertTrue(line.startswith("ssh-ed25519 ") and line.endswith(" piccolod"))
        self.assertTrue(public_key_fingerprint(line).startswith("SHA256:"))
        self.assertEqual(len(public_key_fingerprint(line)), 7 + 43)
        self.assertNotEqual(generate_device_key(), key)
        with self.assertRaises(InvalidCommand):
            device_public_key("not a key")
        with self.assertRaises(InvalidCommand):
            public_key_fingerprint("ssh-ed25519 !!!")

    def test_account_and_domain_keys(self) -> None:
        """Account keys are RSA-2048 and certificate keys ECDSA P-256, in PEM."""
        account: Any = serialization.load_pem_private_key(
            generate_account_key().encode(), password=None
        )
        self.assertEqual(account.key_size, 2048)
        domain: Any = serialization.load_pem_private_key(
            generate_domain_key().encode(), password=None
        )
        self.assertEqual(domain.curve.name, "secp256r1")

    def test_read_chain_checks_key_and_name(self) -> None:
        """A chain is accepted only for its key and hostname."""
        key = generate_domain_key()
        chain = _self_signed(key, ["portal.example.net"])
        info = read_chain(chain, key, "portal.example.net")
        self.assertEqual((info.serial, info.names), ("abc", ["portal.example.net"]))
        self.assertEqual(info.not_after - info.not_before, 90 * 86400)
        with self.assertRaises(InvalidCommand):
            read_chain(chain, generate_domain_key(), "portal.example.net")  # another key
        with self.assertRaises(InvalidCommand):
            read_chain(chain, key, "other.example.net")
        with self.assertRaises(InvalidCommand):
            read_chain(_self_signed(key, []), key, "portal.example.net")  # no SAN
        with self.assertRaises(InvalidCommand):
            read_chain("garbage", key, "portal.example.net")
        with self.assertRaises(InvalidCommand):
            read_chain("", key, "portal.example.net")
        other = _self_signed(ec_key_pem(), ["x.example.net"])
        with self.assertRaises(InvalidCommand):
            read_chain(chain + other, key, "portal.example.net")  # out of order


def ec_key_pem() -> str:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
