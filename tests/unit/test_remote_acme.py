# mypy: disable-error-code="no-untyped-call"
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
        # key, order, answer, poll, finalisation: each in the pool, never on the reactor
        self.assertEqual(self.pool.calls, 5)

    def test_polls_on_the_reactor_until_valid(self) -> None:
        """While validation is pending the issuer waits on the clock, not in a thread."""
        self.backend.pending_polls = 2
        d = self.issue()
        self.assertNoResult(d)
        calls = self.pool.calls
        self.reactor.advance(1.0)
        self.assertNoResult(d)
        self.assertEqual(self.pool.calls, calls + 1)  # one short poll per interval
        self.assertIn("token-1", self.challenges)  # still published while pending
        self.reactor.advance(1.0)
        certificate, _ = self.successResultOf(d)
        self.assertEqual(certificate.hostname, "portal.example.net")
        self.assertEqual(self.challenges, {})

    def test_validation_that_never_ends_times_out(self) -> None:
        """Pending past the issuer's timeout is an AcmeFailure; tokens are withdrawn."""
        self.issuer.timeout = 10.0
        self.backend.pending_polls = 1000
        d = self.issue()
        self.reactor.pump([1.0] * 11)
        failure = self.failureResultOf(d, AcmeFailure)
        self.assertIn("within 10s", failure.value.detail)
        self.assertEqual(self.challenges, {})

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

            def answer(self, handle: Any) -> None:
                backend.answer(handle)

            def poll(self, handle: Any) -> bool:
                return backend.poll(handle)

            def finalize(self, handle: Any, deadline: float) -> str:
                return backend.finalize(handle, deadline)

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

    def test_step_failures_become_acme_failures(self) -> None:
        """Answering, polling or finalising failures are AcmeFailures naming the step."""

        class Broken:
            def answer_challenge(self, challb: Any, response: Any) -> None:
                raise ConnectionError("the ACME server went away")

            def poll(self, authzr: Any) -> Any:
                raise ConnectionError("the ACME server went away")

            def begin_finalization(self, order: Any) -> Any:
                raise ConnectionError("the ACME server went away")

        handle = type("H", (), {"client": Broken(), "answers": [(1, 2)], "order": None,
                                "pending": [object()]})()  # fmt: skip
        backend = LibAcmeBackend()
        for step, call in (
            ("answering", lambda: backend.answer(handle)),
            ("polling", lambda: backend.poll(handle)),
            ("finalising", lambda: backend.finalize(handle, 1_700_000_000.0)),
        ):
            with self.assertRaises(AcmeFailure) as caught:
                call()
            self.assertIn(step, caught.exception.detail)
            self.assertIn("went away", caught.exception.detail)

    def test_invalid_authorization_fails_with_its_reason(self) -> None:
        """An authorization that turned invalid is reported with the server's error."""
        from acme import messages

        def ns(**kw: Any) -> Any:
            return type("NS", (), kw)()

        invalid = ns(
            body=ns(
                status=messages.STATUS_INVALID,
                identifier=ns(value="a.example.net"),
                challenges=[ns(error=ns(detail="404 for the token"))],
            )
        )
        valid = ns(body=ns(status=messages.STATUS_VALID))
        pending = ns(body=ns(status=messages.STATUS_PENDING))

        class Client:
            def __init__(self, answers: list[Any]) -> None:
                self.answers = answers

            def poll(self, authzr: Any) -> Any:
                return self.answers.pop(0), None

        handle = type("H", (), {"client": Client([valid, pending]), "pending": [1, 2]})()
        self.assertFalse(LibAcmeBackend().poll(handle))
        self.assertEqual(handle.pending, [pending])
        handle.client = Client([invalid])
        with self.assertRaises(AcmeFailure) as caught:
            LibAcmeBackend().poll(handle)
        self.assertEqual(
            caught.exception.detail,
            "the HTTP-01 challenge failed: a.example.net: 404 for the token",
        )

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
