"""
Typed errors of piccolod.

Every error that crosses a module boundary (a command, a bus call, a
registry query, a config load) is one of these.  Each carries a stable
``type`` slug, which the HTTP layer turns into an RFC 9457 problem type and
maps to exactly one status code, and a ``retryable`` flag, which the
dispatcher's retry middleware reads.  They are re-exported by
:mod:`piccolod.interfaces`, whose docstrings name them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar


class PiccolodError(Exception):
    """
    Base of every typed piccolod error.

    @cvar type: stable machine-readable slug (``"not-leader"``); the HTTP
        layer publishes it as ``https://piccolod.dev/problems/<type>``.
    @cvar status: the one HTTP status this error maps to.
    @cvar retryable: whether the dispatcher may retry the command.
    """

    type: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra: dict[str, Any] = extra

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 members of this error (without ``instance``)."""
        body: dict[str, Any] = {
            "type": f"https://piccolod.dev/problems/{self.type}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        body.update(self.extra)
        return body


class InvalidCommand(PiccolodError):
    """A command, request body or argument failed validation."""

    type = "invalid"
    title = "Invalid request"
    status = 400

    def __init__(self, detail: str = "", errors: Sequence[str] = (), **extra: Any) -> None:
        if errors:
            extra["errors"] = list(errors)
        super().__init__(detail, **extra)
        self.errors = list(errors)


class Unauthorized(PiccolodError):
    """No valid credentials were presented."""

    type = "unauthorized"
    title = "Authentication required"
    status = 401


class PolicyDenied(PiccolodError):
    """The policy engine denied this subject the action."""

    type = "forbidden"
    title = "Denied by policy"
    status = 403


class UnknownCommand(PiccolodError):
    """No handler is registered for the command's name."""

    type = "unknown-command"
    title = "Unknown command"
    status = 404


class NotFound(PiccolodError):
    """The named object does not exist."""

    type = "not-found"
    title = "Not found"
    status = 404


class Conflict(PiccolodError):
    """The request conflicts with the current state."""

    type = "conflict"
    title = "Conflict"
    status = 409


class IllegalTransition(Conflict):
    """A state machine was asked for a transition its table does not allow."""

    type = "illegal-transition"
    title = "Illegal state transition"

    def __init__(self, machine: str, state: str, event: str) -> None:
        super().__init__(
            f"{machine}: no transition on {event!r} from state {state!r}",
            machine=machine,
            state=state,
            event=event,
        )
        self.machine = machine
        self.state = state
        self.event = event


class NotLeader(PiccolodError):
    """
    This node does not lead the resource; ``leader_hint`` says who does.

    @ivar leader_hint: the leader's API address, or ``None`` when unknown.
    """

    type = "not-leader"
    title = "Not the leader"
    status = 409

    def __init__(
        self, resource: str, leader_hint: str | None = None, leader_id: str | None = None
    ) -> None:
        super().__init__(
            f"this node does not lead {resource!r}",
            resource=resource,
            leader=leader_hint,
            leader_id=leader_id,
        )
        self.resource = resource
        self.leader_hint = leader_hint
        self.leader_id = leader_id


class StaleTerm(Conflict):
    """A leadership update carried a fencing token lower than the current one."""

    type = "stale-term"
    title = "Stale fencing token"


class CommitConflict(Conflict):
    """
    A replicated control-store commit does not follow the cluster log's head
    (another node committed first, or this store is behind): the writer must
    catch up from the log before it writes again.

    @ivar head: the log's head revision, or ``None`` when the log is empty.
    """

    type = "commit-conflict"
    title = "Replicated commit conflict"

    def __init__(self, detail: str = "", head: int | None = None, **extra: Any) -> None:
        super().__init__(detail, head=head, **extra)
        self.head = head


class DuplicateRegistration(PiccolodError):
    """A handler, plugin or child was registered twice under one name."""

    type = "duplicate"
    title = "Duplicate registration"
    status = 409


class TooLarge(PiccolodError):
    """A request body or input exceeded its size limit."""

    type = "too-large"
    title = "Payload too large"
    status = 413


class Locked(PiccolodError):
    """Encrypted storage is locked; unlock first."""

    type = "locked"
    title = "Storage is locked"
    status = 423


class RateLimited(PiccolodError):
    """Too many requests; ``retry_after`` says when to try again (seconds)."""

    type = "rate-limited"
    title = "Too many requests"
    status = 429

    def __init__(self, detail: str = "", retry_after: float = 1.0, **extra: Any) -> None:
        super().__init__(detail, retry_after=retry_after, **extra)
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    """A quota of the policy engine was exhausted."""

    type = "quota-exceeded"
    title = "Quota exceeded"


class NotReady(PiccolodError):
    """The component is not ready to serve this yet."""

    type = "not-ready"
    title = "Not ready"
    status = 503
    retryable = True


class Unavailable(NotReady):
    """A backend (etcd, podman, a tunnel server) cannot be reached right now."""

    type = "unavailable"
    title = "Backend unavailable"


class CommandTimeout(PiccolodError):
    """A command did not complete within its deadline."""

    type = "timeout"
    title = "Timed out"
    status = 504
    retryable = True


class TransientError(PiccolodError):
    """A failure that may succeed when retried (I/O hiccup, lost connection)."""

    type = "transient"
    title = "Transient failure"
    status = 503
    retryable = True


class InvalidHandlerResult(PiccolodError):
    """
    A command handler broke its contract: it returned (or its Deferred fired
    with) something that is not a :class:`~piccolod.commands.Result`.  An
    internal error, never retried.
    """

    type = "internal"
    title = "Handler returned an invalid result"
    status = 500


class ConfigError(PiccolodError):
    """
    The configuration is invalid.  Carries every problem found, not only the
    first, so an operator fixes them in one go.
    """

    type = "config"
    title = "Invalid configuration"
    status = 400

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(self.errors) or "invalid configuration", errors=self.errors)

    def __str__(self) -> str:
        return "\n".join(f"  - {e}" for e in self.errors)


class SubsystemFailed(PiccolodError):
    """A supervised child failed to start or exhausted its restart intensity."""

    type = "subsystem-failed"
    title = "Subsystem failed"
    status = 503


__all__ = [
    "CommandTimeout",
    "ConfigError",
    "Conflict",
    "DuplicateRegistration",
    "IllegalTransition",
    "InvalidCommand",
    "InvalidHandlerResult",
    "Locked",
    "NotFound",
    "NotLeader",
    "NotReady",
    "PiccolodError",
    "PolicyDenied",
    "QuotaExceeded",
    "RateLimited",
    "StaleTerm",
    "SubsystemFailed",
    "TooLarge",
    "TransientError",
    "Unauthorized",
    "Unavailable",
    "UnknownCommand",
]
