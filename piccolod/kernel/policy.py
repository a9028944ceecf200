"""
The policy engine: who may do what, and how much of it.

**Subjects** are the ``subject`` of a :class:`~piccolod.commands.CommandContext`
or of an HTTP request: ``admin`` (the one admin, through a session),
``token:<id>`` (an API token), ``system:<slot>`` (a subsystem acting on its
own), ``anonymous``.  Each subject has at most one **role**: from the
``subjects`` table (glob patterns, e.g. ``system:*`` → ``system``), else
from the ``resolve`` hook (the API resolves ``token:<id>`` to the token's
role).  A subject without a role is denied everything.

**Roles** hold ``allow`` and ``deny`` rules.  A rule is ``ACTION`` or
``ACTION@RESOURCE``, both glob patterns (``*`` matches anything, dots
included; ``?`` one character); the resource defaults to ``*``, which also
matches the empty resource.  Actions are command names
(``persistence.unlock``) and the API's own actions (``leadership.read``,
``tokens.create``, ``events.read`` on ``topic:<topic>``).  A request is
allowed when a rule of ``allow`` matches and no rule of ``deny`` does:
**deny by default**, and deny wins.

**Quotas**: :class:`RateQuota` (a token bucket per subject, charged by the
HTTP layer per request), :class:`ConcurrencyQuota` (commands of matching
actions in flight at once, e.g. exports) and :class:`CountQuota` (a hook
that counts, e.g. installed apps, checked before matching commands).  A
quota refusal is ``QuotaExceeded`` (HTTP 429 with ``Retry-After``).

**Audit**: every decision gets an id and is published as an
:class:`~piccolod.events.AuditRecord` on the ``audit`` topic (outcome
``allowed`` or ``denied``, ``detail`` the reason) when anyone subscribes
there.  Allowed decisions on commands whose class says ``audit = False``
(``kernel.ping``, status reads) are not published, denials always are.

**Enforcement** happens twice, through one engine: as the dispatcher's
``policy`` middleware (:meth:`PolicyEngine.bind`), for every command from
any source, and at the HTTP boundary (the API calls :meth:`check` for the
routes that are not commands).

Tests: ``tests/unit/test_policy.py``.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from piccolod.commands import Command, CommandContext
from piccolod.errors import ConfigError, PolicyDenied, QuotaExceeded
from piccolod.events import AuditRecord
from piccolod.interfaces import IEventBus
from piccolod.kernel.dispatcher import ChainedMiddleware, Next

__all__ = [
    "DEFAULT_ROLES",
    "DEFAULT_SUBJECTS",
    "ConcurrencyQuota",
    "CountQuota",
    "Decision",
    "PolicyEngine",
    "RateQuota",
    "RoleSpec",
    "Rule",
    "compile_glob",
]

#: The most characters a rule, role name or subject pattern may have.
MAX_PATTERN = 200


@attrs.frozen
class _Glob:
    """
    A compiled glob.  The common shapes skip the regex: an exact string,
    ``*``, ``prefix*`` and ``*suffix`` (decisions run on every request).
    """

    pattern: str
    regex: re.Pattern[str] = attrs.field(repr=False, eq=False)
    matches: Callable[[str], bool] = attrs.field(repr=False, eq=False)


def compile_glob(pattern: str) -> _Glob:
    """A case-sensitive glob (``*``, ``?``, ``[...]``) matching whole strings."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN:
        raise ValueError(f"a pattern must be a non-empty string of at most {MAX_PATTERN}")
    regex = re.compile(fnmatch.translate(pattern), re.DOTALL)
    inner = pattern.strip("*")
    special = any(c in inner for c in "*?[")
    matches: Callable[[str], bool]
    if pattern == "*" or (not inner and pattern):
        matches = _anything
    elif special:
        matches = lambda value: regex.fullmatch(value) is not None  # noqa: E731
    elif pattern == inner:
        matches = pattern.__eq__
    elif pattern == inner + "*":
        matches = lambda value: value.startswith(inner)  # noqa: E731
    elif pattern == "*" + inner:
        matches = lambda value: value.endswith(inner)  # noqa: E731
    else:  # *inner*
        matches = lambda value: inner in value  # noqa: E731
    return _Glob(pattern, regex, matches)


def _anything(value: str) -> bool:
    return True


@attrs.frozen
class Rule:
    """``ACTION[@RESOURCE]``: glob patterns on the action and the resource."""

    action: _Glob
    resource: _Glob

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Parse ``ACTION`` or ``ACTION@RESOURCE``; raises ``ValueError``."""
        if not isinstance(text, str):
            raise ValueError(f"a rule must be a string, not {text!r}")
        action, sep, resource = text.partition("@")
        if sep and not resource:
            raise ValueError(f"rule {text!r}: empty resource after '@'")
        return cls(compile_glob(action), compile_glob(resource if sep else "*"))

    def matches(self, action: str, resource: str) -> bool:
        return self.action.matches(action) and self.resource.matches(resource)

    def __str__(self) -> str:
        if self.resource.pattern == "*":
            return self.action.pattern
        return f"{self.action.pattern}@{self.resource.pattern}"


def _rules(texts: Iterable[str]) -> tuple[Rule, ...]:
    return tuple(Rule.parse(t) for t in texts)


@attrs.frozen
class RoleSpec:
    """A named role: what it may do (``allow``) minus what it may not (``deny``)."""

    name: str
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()

    @classmethod
    def build(cls, name: str, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> RoleSpec:
        return cls(name, _rules(allow), _rules(deny))

    def decide(self, action: str, resource: str) -> tuple[bool, str]:
        """``(allowed, reason)`` for ``action`` on ``resource``."""
        for rule in self.deny:
            if rule.matches(action, resource):
                return False, f"role {self.name} denies {rule}"
        for rule in self.allow:
            if rule.matches(action, resource):
                return True, f"role {self.name} allows {rule}"
        return False, f"role {self.name} grants nothing matching (deny by default)"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "allow": [str(r) for r in self.allow],
            "deny": [str(r) for r in self.deny],
        }


#: Actions that change credentials or the keyset: admin only.
_CREDENTIALS = (
    "tokens.*",
    "persistence.setup",
    "persistence.change_password",
    "persistence.verify_password",
    "persistence.rotate_recovery_key",
    "persistence.import",
    # A bundle holds the keyset's wraps: with it a password can be guessed offline.
    "persistence.open_export",
)

#: The replicated control store's own plumbing: only subsystems send these
#: (a forged or garbled log entry would stall every follower), never a person.
_SYSTEM_ONLY = (
    "cluster.replicate_commit",
    "persistence.apply_commits",
)

#: Read-only actions (command names and API actions).
_READS = (
    "*.read",
    "*.list",
    "*.get",
    "*.status",
    "*.logs",
    "*.validate",
    "kernel.ping",
)

DEFAULT_ROLES: Mapping[str, RoleSpec] = {
    "admin": RoleSpec.build("admin", allow=["*"], deny=list(_SYSTEM_ONLY)),
    "operator": RoleSpec.build(
        "operator",
        allow=["*"],
        deny=[*_CREDENTIALS, *_SYSTEM_ONLY, "events.read@topic:audit"],
    ),
    "viewer": RoleSpec.build(
        "viewer",
        allow=list(_READS),
        deny=["tokens.*", *_SYSTEM_ONLY, "events.read@topic:audit"],
    ),
    "system": RoleSpec.build("system", allow=["*"]),
}

DEFAULT_SUBJECTS: Mapping[str, str] = {"admin": "admin", "system:*": "system"}


class Decision(NamedTuple):
    """
    One policy decision; ``decision_id`` is what the audit record carries.
    (An immutable named tuple: one is built per decision, at a third of the
    cost of a frozen attrs class.)
    """

    decision_id: str
    allowed: bool
    subject: str
    role: str | None
    action: str
    resource: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return self._asdict()

    def error(self) -> PolicyDenied:
        return PolicyDenied(
            f"{self.subject} may not {self.action}"
            + (f" on {self.resource}" if self.resource else ""),
            decision_id=self.decision_id,
        )


# --------------------------------------------------------------------------
# Quotas


@attrs.define(eq=False)
class RateQuota:
    """
    A token bucket per subject matching ``subjects`` (a glob): ``rate``
    requests per second with bursts of ``burst``.  ``rate <= 0`` disables it.
    """

    clock: IReactorTime
    name: str = "requests"
    subjects: str = "token:*"
    rate: float = 50.0
    burst: float = 100.0
    max_subjects: int = 10_000
    _glob: _Glob = attrs.field(init=False)
    _buckets: dict[str, tuple[float, float]] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._glob = compile_glob(self.subjects)
        if self.rate > 0 and self.burst < 1:
            raise ValueError("burst must be >= 1")

    def applies(self, subject: str) -> bool:
        return self.rate > 0 and self._glob.matches(subject)

    def charge(self, subject: str, cost: float = 1.0) -> float:
        """
        Take ``cost`` from ``subject``'s bucket; returns 0.0 when admitted,
        else the seconds until it would be (nothing is taken then).
        """
        if not self.applies(subject):
            return 0.0
        now = self.clock.seconds()
        tokens, last = self._buckets.get(subject, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        if tokens >= cost:
            if subject not in self._buckets and len(self._buckets) >= self.max_subjects:
                self._forget_full(now)
            self._buckets[subject] = (tokens - cost, now)
            return 0.0
        self._buckets[subject] = (tokens, now)
        return (cost - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled (they hold no state worth keeping)."""
        full = [
            s
            for s, (t, last) in self._buckets.items()
            if t + (now - last) * self.rate >= self.burst
        ]
        for s in full:
            del self._buckets[s]
        if len(self._buckets) >= self.max_subjects:  # still full: forget the oldest
            for s in list(self._buckets)[: len(self._buckets) // 2]:
                del self._buckets[s]

    def forget(self, subject: str) -> None:
        self._buckets.pop(subject, None)


@attrs.define(eq=False)
class ConcurrencyQuota:
    """At most ``limit`` commands whose action matches one of ``actions`` at once."""

    name: str
    actions: tuple[str, ...]
    limit: int
    in_flight: int = 0
    _globs: tuple[_Glob, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._globs = tuple(compile_glob(a) for a in self.actions)

    def applies(self, action: str) -> bool:
        return any(g.matches(action) for g in self._globs)


@attrs.define(eq=False)
class CountQuota:
    """
    Commands whose action matches ``actions`` are refused while ``count()``
    (a hook, e.g. the installed apps) is at or above ``limit``.
    """

    name: str
    actions: tuple[str, ...]
    limit: int
    count: Callable[[], int]
    _globs: tuple[_Glob, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._globs = tuple(compile_glob(a) for a in self.actions)

    def applies(self, action: str) -> bool:
        return any(g.matches(action) for g in self._globs)


# --------------------------------------------------------------------------
# The engine


def _decision_ids() -> Callable[[], str]:
    prefix = "pd-" + secrets.token_hex(4) + "-"
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter)}"


@attrs.define(eq=False)
class PolicyEngine(ChainedMiddleware):
    """
    RBAC with quotas (see the module docstring).  Install it into a
    dispatcher with ``dispatcher.add_middleware("policy", engine)``.

    @ivar resolve: ``subject -> role name or None`` for subjects the
        ``subjects`` table does not name (API tokens).
    @ivar source: the ``source`` of published audit records.
    """

    log: ClassVar[Logger] = Logger()

    clock: IReactorTime
    bus: IEventBus | None = None
    roles: Mapping[str, RoleSpec] = attrs.field(factory=lambda: dict(DEFAULT_ROLES))
    subjects: Mapping[str, str] = attrs.field(factory=lambda: dict(DEFAULT_SUBJECTS))
    resolve: Callable[[str], str | None] | None = None
    rate: RateQuota | None = None
    quotas: list[ConcurrencyQuota | CountQuota] = attrs.field(factory=list)
    source: str = "policy"
    cache_size: int = 4096
    _subject_exact: dict[str, str] = attrs.field(init=False, factory=dict)
    _has_subscribers: Callable[[str], bool] | None = attrs.field(init=False, default=None)
    _subject_globs: tuple[tuple[_Glob, str], ...] = attrs.field(init=False)
    _cache: dict[tuple[str, str, str], tuple[bool, str]] = attrs.field(init=False, factory=dict)
    _ids: Callable[[], str] = attrs.field(init=False, factory=_decision_ids)

    def __attrs_post_init__(self) -> None:
        self._has_subscribers = getattr(self.bus, "has_subscribers", None)
        # Patterns without wildcards are looked up in a dict; a glob pattern
        # listed before an exact one still wins for what it matches.
        globs: list[tuple[_Glob, str]] = []
        for pattern, role in self.subjects.items():
            if globs or any(c in pattern for c in "*?["):
                globs.append((compile_glob(pattern), role))
            else:
                self._subject_exact.setdefault(pattern, role)
        self._subject_globs = tuple(globs)

    # -- configuration -------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        clock: IReactorTime,
        bus: IEventBus | None,
        roles: Mapping[str, Any] | None = None,
        subjects: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> PolicyEngine:
        """
        The default roles and subjects, with ``roles`` (``{name: {"allow":
        [rule...], "deny": [rule...]}}``, replacing a default role of the
        same name) and ``subjects`` (``{pattern: role}``, tried before the
        default patterns) laid over them.
        Raises ``ConfigError`` listing every problem.
        """
        errors: list[str] = []
        table: dict[str, RoleSpec] = dict(DEFAULT_ROLES)
        for name, spec in (roles or {}).items():
            if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", name):
                errors.append(f"roles: bad role name {name!r} (expected [a-z][a-z0-9_-]*)")
                continue
            if not isinstance(spec, Mapping) or set(spec) - {"allow", "deny"}:
                errors.append(f"roles.{name}: expected a table with 'allow' and 'deny' lists")
                continue
            lists: dict[str, list[str]] = {}
            for key in ("allow", "deny"):
                value = spec.get(key, [])
                if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, str) for v in value
                ):
                    errors.append(f"roles.{name}.{key}: expected a list of rule strings")
                    value = []
                lists[key] = list(value)
            try:
                table[name] = RoleSpec.build(name, lists["allow"], lists["deny"])
            except ValueError as e:
                errors.append(f"roles.{name}: {e}")
        # Configured patterns are tried first (in their order), then the defaults.
        mapping: dict[str, str] = {}
        for pattern, role in (subjects or {}).items():
            if not isinstance(role, str) or role not in table:
                errors.append(f"subjects.{pattern}: unknown role {role!r}")
                continue
            try:
                compile_glob(pattern)
            except ValueError as e:
                errors.append(f"subjects: {e}")
                continue
            mapping[pattern] = role
        for pattern, role in DEFAULT_SUBJECTS.items():
            mapping.setdefault(pattern, role)
        if errors:
            raise ConfigError(errors)
        return cls(clock, bus, roles=table, subjects=mapping, **kwargs)

    def role_names(self) -> Sequence[str]:
        return sorted(self.roles)

    def role_of(self, subject: str) -> str | None:
        """The role of ``subject`` (the ``subjects`` table first, then ``resolve``)."""
        exact = self._subject_exact.get(subject)
        if exact is not None:
            return exact
        for glob, role in self._subject_globs:
            if glob.matches(subject):
                return role
        if self.resolve is not None:
            return self.resolve(subject)
        return None

    # -- deciding ------------------------------------------------------------

    def decide(
        self,
        subject: str,
        action: str,
        resource: str = "",
        *,
        audit: bool = True,
        correlation_id: str | None = None,
        publish: bool = True,
    ) -> Decision:
        """
        Decide (and audit) whether ``subject`` may do ``action`` on
        ``resource``.  Never raises for a well-formed call.  With
        ``publish=False`` nothing is published and the caller must pass the
        decision to :meth:`audit` itself (a caller inside a bus filter, which
        must not publish re-entrantly).
        """
        role = self.role_of(subject)
        spec = self.roles.get(role) if role is not None else None
        if spec is None:
            allowed = False
            reason = (
                f"{subject} has no role (deny by default)"
                if role is None
                else f"role {role} is not defined"
            )
        else:
            key = (spec.name, action, resource)
            cached = self._cache.get(key)
            if cached is None:
                cached = spec.decide(action, resource)
                if len(self._cache) >= self.cache_size:
                    self._cache.clear()
                self._cache[key] = cached
            allowed, reason = cached
        decision = Decision(self._ids(), allowed, subject, role, action, resource, reason)
        if publish and (audit or not allowed):
            self._audit(decision, correlation_id)
        return decision

    def audit(self, decision: Decision, correlation_id: str | None = None) -> None:
        """Publish the audit record of ``decision`` (see ``decide(publish=False)``)."""
        self._audit(decision, correlation_id)

    def check(
        self,
        subject: str,
        action: str,
        resource: str = "",
        *,
        audit: bool = True,
        correlation_id: str | None = None,
    ) -> Decision:
        """:meth:`decide`, raising ``PolicyDenied`` (with the decision id) on a denial."""
        decision = self.decide(
            subject, action, resource, audit=audit, correlation_id=correlation_id
        )
        if not decision.allowed:
            raise decision.error()
        return decision

    def charge(self, subject: str) -> None:
        """
        Charge one request to ``subject``'s rate quota; raises
        ``QuotaExceeded`` (``retry_after`` set, audited as a denial) when
        its bucket is empty.
        """
        if self.rate is None:
            return
        wait = self.rate.charge(subject)
        if wait > 0:
            decision = Decision(
                self._ids(),
                False,
                subject,
                self.role_of(subject),
                "request",
                "",
                f"quota {self.rate.name}: over {self.rate.rate:g}/s",
            )
            self._audit(decision, None)
            raise QuotaExceeded(
                f"{subject} is over its request rate of {self.rate.rate:g}/s",
                retry_after=wait,
                quota=self.rate.name,
                decision_id=decision.decision_id,
            )

    def record(
        self,
        action: str,
        subject: str,
        outcome: str,
        resource: str = "",
        detail: str = "",
        correlation_id: str | None = None,
    ) -> str:
        """
        Publish an audit record of something other than a policy decision
        (a login, a token revoked) with a fresh id; returns the id.
        """
        decision_id = self._ids()
        self._publish(decision_id, action, subject, outcome, resource, detail, correlation_id)
        return decision_id

    def _audit(self, decision: Decision, correlation_id: str | None) -> None:
        self._publish(
            decision.decision_id,
            decision.action,
            decision.subject,
            "allowed" if decision.allowed else "denied",
            decision.resource,
            decision.reason,
            correlation_id,
        )

    def _publish(
        self,
        decision_id: str,
        action: str,
        subject: str,
        outcome: str,
        resource: str,
        detail: str,
        correlation_id: str | None,
    ) -> None:
        bus = self.bus
        if bus is None:
            return
        try:
            has = self._has_subscribers
            if has is not None and not has(AuditRecord.topic):
                return
            bus.publish(
                AuditRecord(
                    decision_id=decision_id,
                    action=action,
                    subject=subject,
                    outcome=outcome,
                    resource=resource,
                    detail=detail,
                ),
                self.source,
                correlation_id,
            )
        except Exception:
            self.log.failure("publishing audit record {decision_id}", decision_id=decision_id)

    # -- quotas on commands --------------------------------------------------

    def _quota_refusal(self, command: Command, context: CommandContext) -> QuotaExceeded | None:
        for quota in self.quotas:
            if not quota.applies(command.name):
                continue
            if isinstance(quota, ConcurrencyQuota):
                if quota.in_flight >= quota.limit:
                    detail = f"at most {quota.limit} {quota.name} at once"
                else:
                    continue
            else:
                try:
                    current = int(quota.count())
                except Exception:
                    self.log.failure("quota hook {quota} failed", quota=quota.name)
                    current = quota.limit  # a broken hook denies (deny by default)
                if current < quota.limit:
                    continue
                detail = f"{quota.name}: {current} of at most {quota.limit}"
            decision = Decision(
                self._ids(),
                False,
                context.subject,
                self.role_of(context.subject),
                command.name,
                command.resource(),
                f"quota {detail}",
            )
            self._audit(decision, context.correlation_id)
            return QuotaExceeded(
                f"quota exceeded: {detail}",
                retry_after=1.0,
                quota=quota.name,
                decision_id=decision.decision_id,
            )
        return None

    # -- middleware ----------------------------------------------------------

    def bind(self, next: Next) -> Next:
        decide = self.decide
        quotas = self.quotas

        def policy(command: Command, context: CommandContext) -> Deferred[Any]:
            decision = decide(
                context.subject,
                command.name,
                command.resource(),
                audit=command.audit,
                correlation_id=context.correlation_id,
            )
            if not decision.allowed:
                return fail(decision.error())
            if not quotas:
                return next(command, context)
            refusal = self._quota_refusal(command, context)
            if refusal is not None:
                return fail(refusal)
            held = [
                q for q in quotas if isinstance(q, ConcurrencyQuota) and q.applies(command.name)
            ]
            for q in held:
                q.in_flight += 1
            try:
                d = next(command, context)
            except BaseException:
                for q in held:
                    q.in_flight -= 1
                return fail(Failure())  # type: ignore[no-untyped-call]
            if held:

                def release(result: Any) -> Any:
                    for q in held:
                        q.in_flight -= 1
                    return result

                d.addBoth(release)
            return d

        return policy

    def stats(self) -> dict[str, Any]:
        return {
            "roles": [self.roles[name].to_json() for name in sorted(self.roles)],
            "subjects": dict(self.subjects),
            "quotas": [
                {
                    "name": q.name,
                    "actions": list(q.actions),
                    "limit": q.limit,
                    **({"in_flight": q.in_flight} if isinstance(q, ConcurrencyQuota) else {}),
                }
                for q in self.quotas
            ],
        }
