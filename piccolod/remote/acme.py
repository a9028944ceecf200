"""
Certificates from an ACME server (RFC 8555), HTTP-01.

:class:`AcmeIssuer` runs on the reactor: it makes a fresh certificate key,
has the blocking :class:`AcmeBackend` (the ``acme`` library, which uses
``requests``) open an order in a thread of the injected pool, publishes the
HTTP-01 key authorizations in the challenge table that piccolod's own HTTP
stack answers from (``GET /.well-known/acme-challenge/{token}`` →
``remote.acme_challenge``), has the backend answer the challenges, polls
the authorizations in short pool steps with the waiting between polls on
the reactor (no thread sleeps through a validation; a stopping daemon
never waits for one), withdraws the tokens whatever happened, finalises,
and checks the chain (it must be for the new key and name the hostname)
before handing back a :class:`~piccolod.remote.model.Certificate`.  Nothing
is stored here: the manager stores key and chain together, in one write,
only once they passed these checks.

Every failure is a retryable ``TransientError`` (:class:`AcmeFailure`)
saying what failed (``the HTTP-01 challenge failed: ...``), so the job
runner retries the issuance with its backoff.

Tests: ``tests/unit/test_remote_acme.py`` (a fake backend issuing from a
local CA), ``tests/integration/test_remote_acme.py`` (pebble).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from piccolod.commands import RemoteAcmeConfig
from piccolod.errors import PiccolodError, TransientError
from piccolod.remote.keys import generate_domain_key, read_chain
from piccolod.remote.model import Certificate

__all__ = [
    "AcmeBackend",
    "AcmeFailure",
    "AcmeIssuer",
    "Challenge",
    "IssueRequest",
    "LibAcmeBackend",
]

T = TypeVar("T")


class AcmeFailure(TransientError):
    """An issuance attempt failed (retryable)."""

    type = "acme-failed"
    title = "Certificate issuance failed"


@attrs.frozen
class Challenge:
    """One HTTP-01 challenge to answer: ``token`` → ``key_authorization``."""

    token: str
    key_authorization: str


@attrs.frozen
class IssueRequest:
    """What one issuance needs."""

    directory_url: str
    hostnames: tuple[str, ...]
    account_key_pem: str = attrs.field(repr=False)
    domain_key_pem: str = attrs.field(repr=False)
    email: str = ""
    ca_bundle: str = ""


class AcmeBackend(Protocol):
    """
    The blocking ACME conversation, in short steps (each called in a pool
    thread, never on the reactor; the waiting between polls happens on the
    reactor, so no thread sleeps through a long validation and stopping
    the daemon never waits for one).  Every step raises ``AcmeFailure``.
    """

    def begin(self, request: IssueRequest) -> tuple[Any, list[Challenge], str]:
        """
        Register (or find) the account and open an order; returns the
        order's handle, the challenges to publish (none for authorizations
        already valid) and the account URL.
        """

    def answer(self, handle: Any) -> None:
        """Tell the server the challenges can be validated now."""

    def poll(self, handle: Any) -> bool:
        """
        Fetch the pending authorizations once: ``True`` when every one is
        valid, ``False`` while some are pending; raises ``AcmeFailure`` with
        the server's reason when one is invalid (the challenge failed).
        """

    def finalize(self, handle: Any, deadline: float) -> str:
        """
        Send the CSR and fetch the certificate; returns the PEM chain
        (leaf first).  Blocks at most until ``deadline`` (seconds since
        the epoch).
        """


@attrs.define
class _Order:
    client: Any
    order: Any
    answers: list[tuple[Any, Any]]
    pending: list[Any]


def _validation_detail(error: Any) -> str:
    parts: list[str] = []
    for authzr in getattr(error, "failed_authzrs", None) or ():
        name = getattr(authzr.body.identifier, "value", "?")
        for challb in authzr.body.challenges:
            if challb.error is not None:
                detail = getattr(challb.error, "detail", None) or str(challb.error)
                parts.append(f"{name}: {detail}")
    return "; ".join(parts) or str(error)


class LibAcmeBackend:
    """:class:`AcmeBackend` on the ``acme`` library (imported on first use)."""

    user_agent = "piccolod"
    #: Seconds one HTTP request to the ACME server may take.
    timeout = 15

    def begin(self, request: IssueRequest) -> tuple[Any, list[Challenge], str]:
        try:
            return self._begin(request)
        except AcmeFailure:
            raise
        except Exception as e:
            raise AcmeFailure(f"opening the order failed: {_describe(e)}") from None

    def _begin(self, request: IssueRequest) -> tuple[Any, list[Challenge], str]:
        import josepy as jose
        from acme import challenges, client, crypto_util, errors, messages
        from cryptography.hazmat.primitives import serialization

        key = jose.JWKRSA(  # type: ignore[attr-defined]
            key=serialization.load_pem_private_key(
                request.account_key_pem.encode("ascii"), password=None
            )
        )
        verify: Any = request.ca_bundle or True  # a CA bundle path goes to requests' verify=
        net = client.ClientNetwork(
            key, user_agent=self.user_agent, verify_ssl=verify, timeout=self.timeout
        )
        directory = client.ClientV2.get_directory(request.directory_url, net)
        acme = client.ClientV2(directory, net=net)
        registration = messages.NewRegistration.from_data(
            email=request.email or None, terms_of_service_agreed=True
        )
        try:
            account = acme.new_account(registration)
        except errors.ConflictError as e:  # the key already has an account
            account = acme.query_registration(
                messages.RegistrationResource(uri=e.location, body=messages.Registration())
            )
        csr = crypto_util.make_csr(request.domain_key_pem.encode("ascii"), list(request.hostnames))
        order = acme.new_order(csr)
        found: list[Challenge] = []
        answers: list[tuple[Any, Any]] = []
        pending: list[Any] = []
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # reused authorization: nothing to prove
            pending.append(authzr)
            challb = next(
                (c for c in authzr.body.challenges if isinstance(c.chall, challenges.HTTP01)),
                None,
            )
            if challb is None:
                raise AcmeFailure(
                    f"the server offers no HTTP-01 challenge for {authzr.body.identifier.value}"
                )
            response, validation = challb.response_and_validation(key)
            found.append(Challenge(challb.chall.encode("token"), validation))
            answers.append((challb, response))
        return _Order(acme, order, answers, pending), found, str(account.uri)

    def answer(self, handle: Any) -> None:
        try:
            for challb, response in handle.answers:
                handle.client.answer_challenge(challb, response)
        except Exception as e:
            raise AcmeFailure(f"answering the challenges failed: {_describe(e)}") from None

    def poll(self, handle: Any) -> bool:
        from acme import messages

        try:
            still: list[Any] = []
            failed: list[Any] = []
            for authzr in handle.pending:
                updated, _response = handle.client.poll(authzr)
                status = updated.body.status
                if status == messages.STATUS_VALID:
                    continue
                if status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                    still.append(updated)
                else:
                    failed.append(updated)
        except Exception as e:
            raise AcmeFailure(f"polling the authorizations failed: {_describe(e)}") from None
        if failed:
            holder = type("Failed", (), {"failed_authzrs": failed})()
            raise AcmeFailure(f"the HTTP-01 challenge failed: {_validation_detail(holder)}")
        handle.pending = still
        return not still

    def finalize(self, handle: Any, deadline: float) -> str:
        try:
            order = handle.client.begin_finalization(handle.order)
            order = handle.client.poll_finalization(
                order, deadline=datetime.datetime.fromtimestamp(deadline)
            )
        except Exception as e:
            raise AcmeFailure(f"finalising the order failed: {_describe(e)}") from None
        if not order.fullchain_pem:
            raise AcmeFailure("the server returned no certificate")
        return str(order.fullchain_pem)


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    name = type(error).__name__
    return f"{name}: {text}" if text else name


@attrs.define(eq=False)
class AcmeIssuer:
    """
    Issues one certificate at a time per call (see the module docstring).

    @ivar reactor: provides ``seconds()`` and ``callFromThread``.
    @ivar pool: the thread pool blocking calls run in (injected).
    @ivar challenges: token → key authorization, read by the HTTP stack.
    @ivar timeout: seconds the validation and finalisation may take.
    """

    log = Logger()

    reactor: Any
    pool: Any
    challenges: MutableMapping[str, str]
    backend: AcmeBackend = attrs.field(factory=LibAcmeBackend)
    timeout: float = 300.0
    #: Seconds between two polls of the authorizations (on the reactor).
    poll_interval: float = 1.0
    #: Seconds the finalisation step may block a pool thread.
    finalize_timeout: float = 60.0
    make_key: Callable[[], str] = generate_domain_key

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = await deferToThreadPool(self.reactor, self.pool, fn, *args)
        return result

    async def issue(
        self, acme: RemoteAcmeConfig, hostname: str, account_key: str
    ) -> tuple[Certificate, str]:
        """
        Fires with ``(certificate, account URL)``; fails with ``AcmeFailure``
        (retryable) when any step fails.
        """
        domain_key = await self._blocking(self.make_key)
        request = IssueRequest(
            directory_url=acme.directory_url,
            hostnames=(hostname,),
            account_key_pem=account_key,
            domain_key_pem=domain_key,
            email=acme.email,
            ca_bundle=acme.ca_bundle,
        )
        handle, challenges, account_uri = await self._blocking(self.backend.begin, request)
        for challenge in challenges:
            self.challenges[challenge.token] = challenge.key_authorization
        deadline = self.reactor.seconds() + self.timeout
        try:
            await self._blocking(self.backend.answer, handle)
            while not await self._blocking(self.backend.poll, handle):
                if self.reactor.seconds() >= deadline:
                    raise AcmeFailure(
                        f"the server did not validate the challenges within {self.timeout:g}s"
                    )
                await deferLater(self.reactor, self.poll_interval, lambda: None)
        finally:
            for challenge in challenges:
                self.challenges.pop(challenge.token, None)
        finalize_by = min(deadline, self.reactor.seconds() + self.finalize_timeout)
        chain = await self._blocking(self.backend.finalize, handle, finalize_by)
        try:
            info = read_chain(chain, domain_key, hostname)
        except PiccolodError as e:
            raise AcmeFailure(f"the issued certificate is unusable: {e.detail}") from None
        certificate = Certificate(
            hostname=hostname,
            key_pem=domain_key,
            chain_pem=chain,
            not_before=info.not_before,
            not_after=info.not_after,
            serial=info.serial,
            issuer=info.issuer,
            issued_at=self.reactor.seconds(),
        )
        return certificate, account_uri
