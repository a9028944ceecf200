"""
The ACME issuer on the reactor side, with a fake ACME server at the
backend seam (the real ``acme`` library runs against pebble in
``tests/integration/test_remote_acme.py``): blocking calls go to the pool,
HTTP-01 tokens are published exactly while the server validates, and a
chain that is not for the new key or the hostname is never handed back.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import RemoteAcmeConfig
from piccolod.errors import TransientError
from piccolod.remote.acme import AcmeFailure, AcmeIssuer, IssueRequest, LibAcmeBackend
from piccolod.remote.acme import _validation_detail as validation_detail
from piccolod.remote.keys import generate_account_key
from piccolod.remote.testing import FakeAcmeBackend, InlinePool, ThreadlessReactor

ACME = RemoteAcmeConfig("https://acme.example/dir", email="admin@example.net", ca_bundle="/ca")


class IssuerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ThreadlessReactor()
        self.reactor.advance(1_700_000_000)
        self.pool = InlinePool()
        self.challenges: dict[str, str] = {}
        self.backend = FakeAcmeBackend(now=self.reactor.seconds, validate=self.challenges.get)
        self.issuer = AcmeIssuer(self.reactor, self.pool, self.challenges, self.backend)

    def issue(self, hostname: str = "portal.example.net") -> Deferred[Any]:
        return Deferred.fromCoroutine(self.issuer.issue(ACME, hostname, "ACCOUNT KEY"))

    def test_issues_a_checked_certificate(self) -> None:
        """The certificate is for a fresh key and the hostname; tokens are withdrawn after."""
        certificate, account = self.successResultOf(self.issue())
        self.assertEqual(account, "https://acme.test/acct/1")
        self.assertEqual(certificate.hostname, "portal.example.net")
        self.assertEqual(certificate.not_after - certificate.not_before, 90 * 86400)
        self.assertEqual(certificate.issued_at, 1_700_000_000)
        self.assertEqual(certificate.chain_pem.count("BEGIN CERTIFICATE"), 2)
        self.assertEqual(self.backend.validated, ["token-1"])  # published while validating
        self.assertEqual(self.challenges, {})  # and withdrawn
        (request,) = self.backend.requests
        self.assertEqual(
            (request.directory_url, request.hostnames, request.email, request.ca_bundle),
            ("https://acme.example/dir", ("portal.example.net",), "admin@example.net", "/ca"),
        )
        self.assertEqual(request.domain_key_pem, certificate.key_pem)
        self.assertNotIn("ACCOUNT KEY", repr(request))
        self.assertEqual(self.pool.calls, 3)  # key, order, validation: never on the reactor

    def test_keys_differ_per_issuance(self) -> None:
        """Every issuance makes a new certificate key."""
        first, _ = self.successResultOf(self.issue())
        second, _ = self.successResultOf(self.issue())
        self.assertNotEqual(first.key_pem, second.key_pem)
        self.assertNotEqual(first.serial, second.serial)

    def test_failed_validation_withdraws_tokens(self) -> None:
        """A failing attempt fails with a retryable AcmeFailure and leaves no token behind."""
        self.backend.failures.append(AcmeFailure("the HTTP-01 challenge failed: 404"))
        failure = self.failureResultOf(self.issue(), AcmeFailure)
        self.assertTrue(isinstance(failure.value, TransientError) and failure.value.retryable)
        self.assertEqual(self.challenges, {})
        self.assertEqual(self.backend.issued, [])

    def test_unpublished_token_fails_validation(self) -> None:
        """If the token is not served, the (fake) server's validation fails."""
        self.backend.validate = lambda token: None
        failure = self.failureResultOf(self.issue(), AcmeFailure)
        self.assertIn("HTTP-01", failure.value.detail)

    def test_chain_for_another_key_is_refused(self) -> None:
        """A chain that is not for the new key is an AcmeFailure, never a certificate."""
        backend, make_key = self.backend, self.issuer.make_key

        class OtherKey:
            def begin(self, request: IssueRequest) -> Any:
                return backend.begin(attrs.evolve(request, domain_key_pem=make_key()))

            def finish(self, handle: Any, deadline: float) -> str:
                return backend.finish(handle, deadline)

        self.issuer.backend = OtherKey()
        failure = self.failureResultOf(self.issue(), AcmeFailure)
        self.assertIn("unusable", failure.value.detail)


class LibraryBackendTests(SynchronousTestCase):
    def test_failures_become_acme_failures(self) -> None:
        """Anything the library raises while opening an order is a retryable AcmeFailure."""
        request = IssueRequest("https://acme.example/dir", ("a.example.net",), "not a key", "x")
        with self.assertRaises(AcmeFailure) as caught:
            LibAcmeBackend().begin(request)
        self.assertIn("opening the order failed", caught.exception.detail)

    def test_finish_failures_become_acme_failures(self) -> None:
        """A handle that cannot answer its challenges fails as an AcmeFailure too."""

        class Broken:
            def answer_challenge(self, challb: Any, response: Any) -> None:
                raise ConnectionError("the ACME server went away")

        handle = type("H", (), {"client": Broken(), "answers": [(1, 2)], "order": None})()
        with self.assertRaises(AcmeFailure) as caught:
            LibAcmeBackend().finish(handle, 1_700_000_000.0)
        self.assertIn("went away", caught.exception.detail)

    def test_validation_detail_names_the_failed_identifiers(self) -> None:
        """A validation error lists each identifier's challenge error."""

        def ns(**kw: Any) -> Any:
            return type("NS", (), kw)()

        challenge = ns(error=ns(detail="connection refused"))
        authzr = ns(body=ns(identifier=ns(value="a.example.net"), challenges=[challenge]))
        error = ns(failed_authzrs=[authzr])
        self.assertEqual(validation_detail(error), "a.example.net: connection refused")
        self.assertEqual(validation_detail(ValueError("plain")), "plain")

    def test_account_key_is_usable_by_the_library(self) -> None:
        """The generated account key loads as a JOSE RSA key (what the library signs with)."""
        import josepy
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(generate_account_key().encode(), None)
        jwk = josepy.JWKRSA(key=key)  # type: ignore[attr-defined]
        self.assertTrue(jwk.thumbprint())
