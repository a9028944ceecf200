"""
The command dispatcher: typed commands routed to one handler each through a
chain of named middleware slots.

Slots, outermost first (:data:`SLOTS`)::

    audit → metrics → policy → idempotency → lock → leader → timeout → retry → handler

``audit``, ``idempotency``, ``lock``, ``leader``, ``timeout`` and ``retry``
are filled with the built-in middleware below; ``metrics`` and ``policy`` start
empty (the policy engine installs itself with ``add_middleware("policy", mw)``).
A middleware is ``(command, context, next) -> Deferred``; ``next`` takes
``(command, context)``.

Speed.  The chain is composed once, when a slot changes, never per command.
Built-in middleware (:class:`ChainedMiddleware`) is bound to its successor
with :meth:`ChainedMiddleware.bind`, which returns a closure, so each built-in
layer costs one Python call.  A handler that answers synchronously yields a
Deferred that has already fired; every built-in layer looks at such a result
directly (``d.called and not d.paused``) instead of adding callbacks: the
timeout layer arms no timer for it and the retry layer allocates nothing for
it.  The common case is therefore one Deferred per command.  Figures:
``benchmarks/dispatch.py``.

Tests: ``tests/unit/test_dispatcher.py``.
"""

from __future__ import annotations

import itertools
import random
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.commands import Command, CommandContext, Result
from piccolod.errors import (
    CommandTimeout,
    Conflict,
    DuplicateRegistration,
    InvalidCommand,
    InvalidHandlerResult,
    Locked,
    NotLeader,
    PiccolodError,
    PolicyDenied,
    RateLimited,
    Unauthorized,
    Unavailable,
    UnknownCommand,
)
from piccolod.events import AuditRecord, LockState, LockStateChanged
from piccolod.interfaces import (
    Backoff,
    ICommandDispatcher,
    ICommandHandler,
    IEventBus,
    ILeadershipRegistry,
    Middleware,
)
from piccolod.kernel.aio import provides, to_deferred
from piccolod.logging import correlation_id as _correlation_id

#: ``(command, context) -> Deferred``: the rest of the chain.
Next = Callable[[Command, CommandContext], "Deferred[Any]"]

#: The middleware slots, outermost first.  ``metrics`` sits right inside
#: ``audit`` so that it sees every outcome, policy refusals included, and times
#: the whole chain below it.
SLOTS: tuple[str, ...] = (
    "audit",
    "metrics",
    "policy",
    "idempotency",
    "lock",
    "leader",
    "timeout",
    "retry",
)

_DEFAULT_CONTEXT = CommandContext()

#: The retry backoff unless one is given: 50 ms doubling up to 2 s, ±20 %.
DEFAULT_BACKOFF = Backoff(initial=0.05, maximum=2.0)


@attrs.define(eq=False)
class Registration:
    """
    Command handlers registered together by one service, removed together.

    ``register_all(dispatcher, [(Cmd, handler), ...])`` registers every
    handler or none: when one name is taken, those already registered are
    removed again and ``DuplicateRegistration`` is raised.  Services call
    :meth:`cancel` when they stop; it is idempotent.
    """

    dispatcher: ICommandDispatcher
    command_types: list[type[Command]] = attrs.field(factory=list)

    def cancel(self) -> None:
        while self.command_types:
            self.dispatcher.unregister(self.command_types.pop())


def register_all(
    dispatcher: ICommandDispatcher,
    handlers: Iterable[tuple[type[Command], Callable[..., Any]]],
) -> Registration:
    """Register every handler or none; see :class:`Registration`."""
    registration = Registration(dispatcher)
    try:
        for command_type, handler in handlers:
            dispatcher.register(command_type, handler)
            registration.command_types.append(command_type)
    except BaseException:
        registration.cancel()
        raise
    return registration


def _failure(exception: BaseException | None = None) -> Failure:
    """A ``Failure`` of ``exception``, or of the exception being handled."""
    return Failure(exception)  # type: ignore[no-untyped-call]


def is_retryable(failure: Failure) -> bool:
    """Whether the retry middleware may retry after ``failure``."""
    value = failure.value
    return isinstance(value, PiccolodError) and type(value).retryable is True


def outcome_of(failure: Failure) -> str:
    """The audit outcome of a failed command: ``error:<type>``."""
    value = failure.value
    if isinstance(value, PiccolodError):
        return "error:" + value.type
    if isinstance(value, CancelledError):
        return "error:cancelled"
    return "error:internal"


# ==========================================================================
# Built-in middleware


class ChainedMiddleware:
    """
    Base of the built-in middleware.  An instance is a plain middleware
    (``mw(command, context, next)``) and can also be :meth:`bind`-ed to its
    successor once, which is what the dispatcher does.
    """

    def bind(self, next: Next) -> Next:  # pragma: no cover - abstract
        """A ``(command, context) -> Deferred`` step calling ``next``."""
        raise NotImplementedError

    def __call__(self, command: Command, context: CommandContext, next: Next) -> Deferred[Any]:
        return self.bind(next)(command, context)

    def stop(self) -> None:
        """Fail whatever is pending and cancel its delayed calls."""


@attrs.define(eq=False)
class _CommandStats:
    """Counters of one command name."""

    ok: int = 0
    errors: dict[str, int] = attrs.field(factory=dict)
    latency_total: float = 0.0
    latency_max: float = 0.0

    def to_json(self) -> dict[str, Any]:
        outcomes = {"ok": self.ok, **self.errors}
        return {
            "count": sum(outcomes.values()),
            "outcomes": outcomes,
            "latency_seconds_total": self.latency_total,
            "latency_seconds_max": self.latency_max,
        }


@attrs.define(eq=False)
class AuditMiddleware(ChainedMiddleware):
    """
    Logs every command's outcome, counts outcomes and latency per command
    name (:meth:`stats`), and publishes an ``AuditRecord`` for commands whose
    class says ``audit = True`` when a bus is given and something subscribes
    to the ``audit`` topic (records are not retained, so one that nobody
    receives is not built; the counters above are kept either way).

    Log events carry the fields ``command``, ``command_id``,
    ``correlation_id``, ``subject``, ``outcome`` and ``duration``.  Successes
    are logged at debug level (unless ``log_successes`` is false: emitting a
    log event costs a few microseconds, which a hot path may not want; it is
    read when the dispatcher composes its chain), typed failures at info and
    untyped ones at warn.
    """

    log: ClassVar[Logger] = Logger()

    clock: IReactorTime
    bus: IEventBus | None = None
    log_successes: bool = True
    source: str = "dispatcher"
    _stats: dict[str, _CommandStats] = attrs.field(init=False, factory=dict)
    _ids: Callable[[], int] = attrs.field(init=False, factory=lambda: itertools.count(1).__next__)
    #: Decision ids are this random prefix plus a counter: unique, and far
    #: cheaper than a uuid4 per command.
    _prefix: str = attrs.field(init=False, factory=lambda: secrets.token_hex(4) + "-")
    #: ``observe(command name, outcome, seconds)`` after every command: the
    #: ``/metrics`` latency histograms ride on the duration measured here
    #: instead of timing every command a second time in their own layer.
    observers: list[Callable[[str, str, float], None]] = attrs.field(factory=list)

    def stats(self) -> dict[str, dict[str, Any]]:
        """
        ``{command name: {"count", "outcomes": {"ok": n, "error:<type>": n},
        "latency_seconds_total", "latency_seconds_max"}}``.
        """
        return {name: s.to_json() for name, s in sorted(self._stats.items())}

    def bind(self, next: Next) -> Next:
        seconds = self.clock.seconds
        stats = self._stats
        counters = self._counters
        logged = self._logged
        publish = self._publish
        finished = self._finished
        bus = self.bus
        observers = self.observers
        log_successes = self.log_successes
        has_subscribers = None if bus is None else bus.has_subscribers

        def audit(command: Command, context: CommandContext) -> Deferred[Any]:
            start = seconds()
            d = next(command, context)
            if d.called and not d.paused and not isinstance(d.result, Failure):
                # Inlined success bookkeeping: this is the hot path.
                duration = seconds() - start
                name = command.name
                counts = stats.get(name) or counters(name)
                counts.ok += 1
                counts.latency_total += duration
                if duration > counts.latency_max:  # noqa: PLR1730 (hot path: no builtin call)
                    counts.latency_max = duration
                for observe in observers:
                    observe(name, "ok", duration)
                if log_successes:
                    logged(command, context, "ok", duration, None)
                if has_subscribers is not None and command.audit and has_subscribers("audit"):
                    publish(command, context, "ok", "")
                return d
            return d.addBoth(finished, command, context, start)

        return audit

    def _counters(self, name: str) -> _CommandStats:
        stats = self._stats.get(name)
        if stats is None:
            stats = self._stats[name] = _CommandStats()
        return stats

    def _logged(
        self,
        command: Command,
        context: CommandContext,
        outcome: str,
        duration: float,
        failure: Failure | None,
    ) -> None:
        fields = {
            "command": command.name,
            "command_id": context.command_id,
            "correlation_id": context.correlation_id,
            "subject": context.subject,
            "outcome": outcome,
            "duration": duration,
        }
        if failure is None:
            self.log.debug(
                "command {command} ({command_id}) by {subject}: {outcome} in {duration}s",
                **fields,
            )
            return
        expected = isinstance(failure.value, (PiccolodError, CancelledError))
        emit = self.log.info if expected else self.log.warn
        emit(
            "command {command} ({command_id}) by {subject}: {outcome} in {duration}s: {error}",
            error=str(failure.value),
            **fields,
        )

    def _finished(
        self, result: Any, command: Command, context: CommandContext, start: float
    ) -> Any:
        duration = self.clock.seconds() - start
        counts = self._counters(command.name)
        counts.latency_total += duration
        counts.latency_max = max(counts.latency_max, duration)
        if isinstance(result, Failure):
            outcome = outcome_of(result)
            counts.errors[outcome] = counts.errors.get(outcome, 0) + 1
            self._logged(command, context, outcome, duration, result)
            detail = str(result.value)[:200]
        else:
            outcome, detail = "ok", ""
            counts.ok += 1
            if self.log_successes:
                self._logged(command, context, outcome, duration, None)
        for observe in self.observers:
            observe(command.name, outcome, duration)
        if self.bus is not None and command.audit and self.bus.has_subscribers("audit"):
            self._publish(command, context, outcome, detail)
        return result

    def _publish(
        self, command: Command, context: CommandContext, outcome: str, detail: str
    ) -> None:
        assert self.bus is not None
        try:
            self.bus.publish(
                AuditRecord(
                    decision_id=f"{self._prefix}{self._ids()}",
                    action=command.name,
                    subject=context.subject,
                    outcome=outcome,
                    resource=command.resource(),
                    detail=detail,
                ),
                self.source,
                context.correlation_id or context.command_id,
            )
        except Exception:
            self.log.failure(
                "publishing the audit record of {command} ({command_id})",
                command=command.name,
                command_id=context.command_id,
            )


class _Run:
    """A command id whose command is still running, and who waits for it."""

    __slots__ = ("command", "execution", "waiters")

    def __init__(self, command: Command) -> None:
        self.command = command
        self.execution: Deferred[Any] | None = None  # None while running synchronously
        self.waiters: list[Deferred[Any]] = []

    def join(self) -> Deferred[Any]:
        """A new Deferred for one more caller of this run."""
        waiter: Deferred[Any] = Deferred(self.leave)
        self.waiters.append(waiter)
        return waiter

    def leave(self, waiter: Deferred[Any]) -> None:
        """Canceller of a caller's Deferred: the run stops once nobody waits."""
        if waiter in self.waiters:
            self.waiters.remove(waiter)
            if not self.waiters and self.execution is not None:
                self.execution.cancel()

    def answer(self, result: Any) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


#: An idempotency key: ``(subject, command id)``.
_Key = tuple[str, str]

#: Failures the idempotency table does *not* remember: the command did not
#: (or may not have) run to a decision, so the same command id must be able
#: to run again.  Retryable errors (``retryable = True``), untyped errors
#: (bugs) and cancellation are forgotten too.
FORGOTTEN_ERRORS: tuple[type[BaseException], ...] = (
    Locked,
    NotLeader,
    PolicyDenied,
    Unauthorized,
    RateLimited,
    CancelledError,
)


def remembered(failure: Failure) -> bool:
    """Whether the idempotency table remembers ``failure`` (see above)."""
    value = failure.value
    return (
        isinstance(value, PiccolodError)
        and not type(value).retryable
        and not isinstance(value, FORGOTTEN_ERRORS)
    )


@attrs.define(eq=False)
class IdempotencyMiddleware(ChainedMiddleware):
    """
    Deduplicates commands by ``context.command_id``, per
    ``context.subject``: command ids are the caller's, so two subjects never
    see each other's commands or results.

    - A command id whose outcome is known is answered from the table for
      ``ttl`` seconds (clock time) after that outcome became known: the same
      ``Result`` or the same typed failure, without running again.
    - A failure is remembered only when it is a decision of the command
      (:func:`remembered`): a non-retryable ``PiccolodError`` that is not one
      of :data:`FORGOTTEN_ERRORS` (gate and policy refusals).  Retryable
      errors, untyped errors (bugs) and cancellation are forgotten, so the
      same command id can run again.
    - Concurrent duplicates share one run: every caller of a command still
      running gets its own Deferred; the run is cancelled only when all of
      them have cancelled.
    - Reusing a command id for a different command (another name or other
      fields, compared with ``==``) fails with ``Conflict``.
    - Expired ids are swept from a deque ordered by completion time on each
      dispatch; at most ``max_entries`` finished ids are kept (the oldest
      are evicted first).  Running commands are never evicted.

    One dict, keyed by ``(subject, command id)``, holds each id's state:
    the ``Command`` itself while it runs synchronously, a ``_Run`` once it
    runs asynchronously (or was joined), and its outcome (a ``Result`` or a
    ``Failure``) once finished; finished ids also keep their command in a
    second dict, and a deque holds ``(expiry, key)`` pairs.  A new id costs
    one lookup; remembering an outcome allocates no object that the garbage
    collector has to keep visiting (tuples of strings and floats are
    untracked).

    Remembered commands and results stay in memory for the TTL, secrets
    they carry included (a password, a new recovery key): that is the price
    of answering a retried ``persistence.setup`` with the same recovery key.
    """

    clock: IReactorTime
    ttl: float = 300.0
    max_entries: int = 10_000
    _entries: dict[_Key, Any] = attrs.field(init=False, factory=dict)
    _commands: dict[_Key, Command] = attrs.field(init=False, factory=dict)
    _expiry: deque[tuple[float, _Key]] = attrs.field(init=False, factory=deque)

    def __attrs_post_init__(self) -> None:
        if not self.ttl >= 0:
            raise ValueError(f"idempotency ttl must be >= 0, got {self.ttl!r}")
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {self.max_entries!r}")

    def __len__(self) -> int:
        """How many command ids are remembered or running."""
        return len(self._entries)

    def bind(self, next: Next) -> Next:
        seconds = self.clock.seconds
        ttl = self.ttl
        max_entries = self.max_entries
        entries = self._entries
        commands = self._commands
        expiry = self._expiry
        sweep = self._sweep
        answer = self._answer
        join = self._join
        record = self._record
        settle = self._settle
        running_types = (Command, _Run)

        def idempotency(command: Command, context: CommandContext) -> Deferred[Any]:
            command_id = context.command_id
            if command_id is None:
                return next(command, context)
            key = (context.subject, command_id)
            now = seconds()
            if expiry and expiry[0][0] <= now:
                sweep()
            entry = entries.get(key)
            if entry is not None:
                if isinstance(entry, running_types):
                    return join(key, command)
                return answer(key, command)
            entries[key] = command
            d = next(command, context)
            if d.called and not d.paused:
                run = entries.get(key)
                result = d.result
                if isinstance(result, Failure):
                    if run is command or isinstance(run, _Run):
                        del entries[key]
                    record(key, command, result)
                else:  # _record, inlined for the hot path
                    entries[key] = result
                    commands[key] = command
                    expiry.append((now + ttl, key))
                    if len(expiry) > max_entries:
                        _, old = expiry.popleft()
                        del commands[old], entries[old]
                if isinstance(run, _Run):  # joined re-entrantly
                    run.answer(result)
                return d
            run = entries.get(key)
            if not isinstance(run, _Run):
                run = entries[key] = _Run(command)
            run.execution = d
            d.addBoth(settle, key, run)
            return run.join()

        return idempotency

    @staticmethod
    def _conflict(key: _Key) -> Deferred[Any]:
        command_id = key[1]
        return fail(
            Conflict(
                f"command id {command_id!r} was used for another command",
                command_id=command_id,
            )
        )

    def _answer(self, key: _Key, command: Command) -> Deferred[Any]:
        first = self._commands[key]
        if first is not command and first != command:
            return self._conflict(key)
        outcome = self._entries[key]
        if isinstance(outcome, Failure):
            return fail(outcome)
        return succeed(outcome)

    def _join(self, key: _Key, command: Command) -> Deferred[Any]:
        run = self._entries[key]
        first = run.command if isinstance(run, _Run) else run
        if first is not command and first != command:
            return self._conflict(key)
        if not isinstance(run, _Run):  # joining a run still inside its synchronous call
            run = self._entries[key] = _Run(first)
        return run.join()

    def _record(self, key: _Key, command: Command, outcome: Any) -> None:
        if isinstance(outcome, Failure) and not remembered(outcome):
            return
        self._commands[key] = command
        self._entries[key] = outcome
        expiry = self._expiry
        expiry.append((self.clock.seconds() + self.ttl, key))
        if len(expiry) > self.max_entries:
            _, old = expiry.popleft()
            del self._commands[old], self._entries[old]

    def _settle(self, result: Any, key: _Key, run: _Run) -> None:
        """The end of an asynchronous run: record it and answer its callers."""
        run.execution = None
        if self._entries.get(key) is run:
            del self._entries[key]
            self._record(key, run.command, result)
        run.answer(result)

    def _sweep(self) -> None:
        now = self.clock.seconds()
        expiry = self._expiry
        commands = self._commands
        entries = self._entries
        while expiry and expiry[0][0] <= now:
            _, old = expiry.popleft()
            del commands[old], entries[old]

    def stop(self) -> None:
        """Forget every finished id (running commands finish on their own)."""
        for key in self._commands:
            del self._entries[key]
        self._commands.clear()
        self._expiry.clear()


@attrs.frozen(eq=False)
class LockGate(ChainedMiddleware):
    """
    Refuses commands with ``requires_unlocked`` with ``Locked`` unless the
    bus's retained ``persistence.lock_state`` says ``UNLOCKED``.  No bus or
    no retained value means locked (deny by default).  The retained value is
    read on every gated command (``bus.last``), never cached, so a lock takes
    effect for the very next command.
    """

    bus: IEventBus | None = None

    def bind(self, next: Next) -> Next:
        return _gates(next, lock=self)


@attrs.frozen(eq=False)
class LeaderGate(ChainedMiddleware):
    """
    Refuses a command whose ``leader_resource()`` is not ``None`` with
    ``NotLeader`` unless ``registry.is_leader(resource)``.  ``UNKNOWN`` is
    never leader; without a registry every such command is refused.

    The refusal is the registry's own ``require_leader`` error, so that the
    leader hint follows the registry's rules (it never points at this
    node); a registry that contradicts itself gets a ``NotLeader`` built
    from ``state(resource)``.
    """

    registry: ILeadershipRegistry | None = None

    def refusal(self, resource: str) -> PiccolodError:
        """Why this node may not run a command for ``resource``."""
        if self.registry is None:
            return NotLeader(resource)
        try:
            self.registry.require_leader(resource)
        except PiccolodError as refused:  # NotLeader, or e.g. a bad resource name
            return refused
        state = self.registry.state(resource)
        return NotLeader(resource, leader_hint=state.leader_address, leader_id=state.leader_id)

    def bind(self, next: Next) -> Next:
        return _gates(next, leader=self)


class _Deadline:
    """The timer of one command that did not answer synchronously."""

    __slots__ = ("call", "command", "inner", "owner", "reason", "timeout")

    def __init__(
        self, owner: TimeoutMiddleware, command: Command, inner: Deferred[Any], timeout: float
    ) -> None:
        self.owner = owner
        self.command = command
        self.inner = inner
        self.timeout = timeout
        self.reason: PiccolodError | None = None
        self.call: IDelayedCall = owner.clock.callLater(timeout, self.expire)

    def expire(self) -> None:
        self.reason = CommandTimeout(
            f"{self.command.name} did not complete within {self.timeout:g}s",
            command=self.command.name,
            timeout=self.timeout,
        )
        self.inner.cancel()

    def abort(self, reason: PiccolodError) -> None:
        if self.call.active():
            self.call.cancel()
        self.reason = reason
        self.inner.cancel()

    def finish(self, result: Any) -> Any:
        self.owner._pending.discard(self)
        if self.call.active():
            self.call.cancel()
        if self.reason is not None and isinstance(result, Failure):
            return _failure(self.reason)
        return result


@attrs.define(eq=False)
class TimeoutMiddleware(ChainedMiddleware):
    """
    Gives each command a deadline: ``context.timeout``, else
    ``command.timeout``, else ``default``.  On expiry the inner Deferred is
    cancelled and the caller gets ``CommandTimeout``.  No timer is armed when
    the inner Deferred has already fired.  A non-positive or NaN deadline is
    an ``InvalidCommand``.
    """

    clock: IReactorTime
    default: float = 30.0
    _pending: set[_Deadline] = attrs.field(init=False, factory=set)

    def bind(self, next: Next) -> Next:
        return _gates(next, timeouts=self)

    def stop(self) -> None:
        """Cancel every running command; its caller gets ``Unavailable``."""
        for deadline in list(self._pending):
            deadline.abort(Unavailable("the command dispatcher stopped"))


class _RetryRun:
    """One command being retried: the caller's Deferred and the next attempt."""

    __slots__ = (
        "attempt",
        "call",
        "command",
        "context",
        "inner",
        "next",
        "outer",
        "owner",
        "reason",
    )

    def __init__(
        self, owner: RetryMiddleware, command: Command, context: CommandContext, next: Next
    ) -> None:
        self.owner = owner
        self.command = command
        self.context = context
        self.next = next
        self.attempt = 0
        self.call: IDelayedCall | None = None
        self.inner: Deferred[Any] | None = None
        self.reason: BaseException | None = None  # why the run was halted
        self.outer: Deferred[Any] = Deferred(self.cancel)

    def watch(self, d: Deferred[Any]) -> None:
        self.inner = d
        d.addBoth(self.settled)

    def settled(self, result: Any) -> None:
        self.inner = None
        if self.outer.called:
            return None
        if (
            self.reason is None
            and isinstance(result, Failure)
            and self.attempt < self.command.retries
            and is_retryable(result)
        ):
            owner = self.owner
            delay = owner.backoff.delay(self.attempt, owner.rand)
            self.attempt += 1
            owner.log.info(
                "retrying {command} ({command_id}), attempt {attempt} in {delay}s: {error}",
                command=self.command.name,
                command_id=self.context.command_id,
                correlation_id=self.context.correlation_id,
                attempt=self.attempt,
                delay=delay,
                error=str(result.value),
            )
            self.call = owner.clock.callLater(delay, self.again)
            return None
        self.owner._runs.discard(self)
        if isinstance(result, Failure):
            self.outer.errback(result if self.reason is None else _failure(self.reason))
        else:
            self.outer.callback(result)
        return None

    def again(self) -> None:
        self.call = None
        self.watch(self.next(self.command, self.context))

    def cancel(self, _outer: Deferred[Any] | None = None) -> None:
        """Canceller of the caller's Deferred: stop waiting or running."""
        if self.reason is None:
            self.reason = CancelledError()
        self.owner._runs.discard(self)
        if self.call is not None:
            self.call.cancel()
            self.call = None
        elif self.inner is not None:
            self.inner.cancel()

    def abort(self, reason: PiccolodError) -> None:
        self.reason = reason
        self.cancel()
        if not self.outer.called:
            self.outer.errback(_failure(reason))


@attrs.define(eq=False)
class RetryMiddleware(ChainedMiddleware):
    """
    Retries a command after a *retryable* error (a ``PiccolodError`` whose
    class says ``retryable = True``), at most ``command.retries`` times,
    waiting ``backoff.delay(attempt, rand)`` on the clock before each retry.
    Other errors fail at once.
    """

    log: ClassVar[Logger] = Logger()

    clock: IReactorTime
    backoff: Backoff = DEFAULT_BACKOFF
    rand: Callable[[], float] = random.random
    _runs: set[_RetryRun] = attrs.field(init=False, factory=set)

    def bind(self, next: Next) -> Next:
        return _gates(next, retries=self)

    def stop(self) -> None:
        """Fail every command waiting to be retried with ``Unavailable``."""
        for run in list(self._runs):
            run.abort(Unavailable("the command dispatcher stopped"))


def _gates(
    next: Next,
    lock: LockGate | None = None,
    leader: LeaderGate | None = None,
    timeouts: TimeoutMiddleware | None = None,
    retries: RetryMiddleware | None = None,
) -> Next:
    """
    One step for the built-in lock gate, leader gate, timeout and retry
    middleware given, in that order (outermost first) around ``next``.

    Each built-in's ``bind`` is this with itself alone; the dispatcher
    passes every built-in of a contiguous run of those slots at once, so
    the common chain costs one Python call instead of four.  Whatever does
    not answer at once gets the same objects either way (``_RetryRun``
    inside, ``_Deadline`` outside).
    """
    last = None if lock is None or lock.bus is None else lock.bus.last
    lock_topic = LockStateChanged.topic
    unlocked_state = LockState.UNLOCKED
    if leader is not None:
        is_leader = None if leader.registry is None else leader.registry.is_leader
        refusal = leader.refusal
    default = 0.0 if timeouts is None else timeouts.default

    def gates(command: Command, context: CommandContext) -> Deferred[Any]:
        if lock is not None and command.requires_unlocked:
            envelope = None if last is None else last(lock_topic)
            if (
                envelope is None
                or not isinstance(envelope.event, LockStateChanged)
                or envelope.event.state is not unlocked_state
            ):
                return fail(Locked(f"{command.name} needs unlocked storage"))
        if leader is not None:
            resource = command.leader_resource()
            if resource is not None and (is_leader is None or not is_leader(resource)):
                return fail(refusal(resource))
        limit = default
        if timeouts is not None:
            wanted = context.timeout
            if wanted is None:
                wanted = command.timeout
            if wanted is not None:
                if not wanted > 0:
                    return fail(InvalidCommand(f"timeout must be > 0, got {wanted!r}"))
                limit = wanted
            elif not limit > 0:
                return fail(InvalidCommand(f"timeout must be > 0, got {limit!r}"))
        d = next(command, context)
        if d.called and not d.paused:
            if retries is None or command.retries <= 0 or not isinstance(d.result, Failure):
                return d
        elif retries is None or command.retries <= 0:
            if timeouts is None:
                return d
            deadline = _Deadline(timeouts, command, d, limit)
            timeouts._pending.add(deadline)
            return d.addBoth(deadline.finish)
        run = _RetryRun(retries, command, context, next)
        retries._runs.add(run)
        run.watch(d)
        d = run.outer
        if timeouts is None or (d.called and not d.paused):
            return d
        deadline = _Deadline(timeouts, command, d, limit)
        timeouts._pending.add(deadline)
        return d.addBoth(deadline.finish)

    return gates


#: The slots :func:`_gates` composes, outermost first, with their built-in types and the
#: keyword each is passed as.
_GATES: dict[str, tuple[type, str]] = {
    "lock": (LockGate, "lock"),
    "leader": (LeaderGate, "leader"),
    "timeout": (TimeoutMiddleware, "timeouts"),
    "retry": (RetryMiddleware, "retries"),
}


# ==========================================================================
# The dispatcher


def _link(middleware: Middleware, next: Next) -> Next:
    """Adapt a foreign middleware: never raise, always return a Deferred."""

    def step(command: Command, context: CommandContext) -> Deferred[Any]:
        try:
            d = middleware(command, context, next)
        except BaseException:
            return fail(_failure())
        if isinstance(d, Deferred):
            return d
        return to_deferred(d)

    return step


@implementer(ICommandDispatcher)
@attrs.define(eq=False)
class CommandDispatcher:
    """
    Routes each command to its one registered handler through the
    middleware slots :data:`SLOTS`.

    ``dispatch`` never raises: it returns a Deferred that fires with the
    handler's ``Result`` or fails with a typed error (``InvalidCommand``,
    ``UnknownCommand``, ``PolicyDenied``, ``Locked``, ``NotLeader``,
    ``Conflict``, ``CommandTimeout``, ``Unavailable`` after :meth:`stop`,
    ``InvalidHandlerResult``, or the handler's own error).  Untyped handler
    exceptions pass through as they are and are logged with ``log.failure``.

    The built-in middleware is reachable as attributes (``audit``,
    ``idempotency``, ``lock_gate``, ``leader_gate``, ``timeouts``,
    ``retries``) for stats and tests.

    @ivar log_successes: whether the audit middleware logs successful
        commands (at debug level); failures are always logged.
    @ivar idempotency_max: the most finished command ids remembered.
    """

    log: ClassVar[Logger] = Logger()

    clock: IReactorTime = attrs.field(validator=provides(IReactorTime))
    bus: IEventBus | None = None
    registry: ILeadershipRegistry | None = attrs.field(default=None, kw_only=True)
    default_timeout: float = attrs.field(default=30.0, kw_only=True)
    idempotency_ttl: float = attrs.field(default=300.0, kw_only=True)
    rand: Callable[[], float] = attrs.field(default=random.random, kw_only=True)
    backoff: Backoff = attrs.field(default=DEFAULT_BACKOFF, kw_only=True)
    idempotency_max: int = attrs.field(default=10_000, kw_only=True)
    log_successes: bool = attrs.field(default=True, kw_only=True)

    audit: AuditMiddleware = attrs.field(init=False)
    idempotency: IdempotencyMiddleware = attrs.field(init=False)
    lock_gate: LockGate = attrs.field(init=False)
    leader_gate: LeaderGate = attrs.field(init=False)
    timeouts: TimeoutMiddleware = attrs.field(init=False)
    retries: RetryMiddleware = attrs.field(init=False)
    _handlers: dict[str, Callable[..., Any]] = attrs.field(init=False, factory=dict)
    _slots: dict[str, Middleware | None] = attrs.field(init=False)
    _chain: Next = attrs.field(init=False)
    _stopped: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        if not self.default_timeout > 0:
            raise ValueError(f"default_timeout must be > 0, got {self.default_timeout!r}")
        self.audit = AuditMiddleware(self.clock, self.bus, log_successes=self.log_successes)
        self.idempotency = IdempotencyMiddleware(
            self.clock, self.idempotency_ttl, self.idempotency_max
        )
        self.lock_gate = LockGate(self.bus)
        self.leader_gate = LeaderGate(self.registry)
        self.timeouts = TimeoutMiddleware(self.clock, self.default_timeout)
        self.retries = RetryMiddleware(self.clock, self.backoff, self.rand)
        self._slots = dict.fromkeys(SLOTS)
        self._slots.update(
            audit=self.audit,
            idempotency=self.idempotency,
            lock=self.lock_gate,
            leader=self.leader_gate,
            timeout=self.timeouts,
            retry=self.retries,
        )
        self._compose()

    # -- registration ------------------------------------------------------

    def register(
        self, command_type: type[Command], handler: ICommandHandler | Callable[..., Any]
    ) -> None:
        name = _command_name(command_type)
        if not callable(handler):
            raise InvalidCommand(f"the handler of {name} is not callable: {handler!r}")
        if name in self._handlers:
            raise DuplicateRegistration(f"a handler for {name} is already registered")
        self._handlers[name] = handler

    def unregister(self, command_type: type[Command]) -> None:
        self._handlers.pop(_command_name(command_type), None)

    def names(self) -> Sequence[str]:
        return sorted(self._handlers)

    # -- middleware --------------------------------------------------------

    def add_middleware(self, name: str, middleware: Middleware) -> None:
        if name not in self._slots:
            raise InvalidCommand(f"unknown middleware slot {name!r}; slots: {', '.join(SLOTS)}")
        if not callable(middleware):
            raise InvalidCommand(f"middleware {name!r} is not callable: {middleware!r}")
        if self._slots[name] is not None:
            raise DuplicateRegistration(f"the middleware slot {name!r} is taken")
        self._slots[name] = middleware
        self._compose()

    def remove_middleware(self, name: str) -> Middleware | None:
        """
        Empty the slot ``name`` and return what it held (``None`` if empty),
        e.g. to replace a built-in middleware.  Raises ``InvalidCommand`` for
        an unknown slot.
        """
        if name not in self._slots:
            raise InvalidCommand(f"unknown middleware slot {name!r}; slots: {', '.join(SLOTS)}")
        middleware, self._slots[name] = self._slots[name], None
        self._compose()
        return middleware

    def middleware(self) -> Sequence[str]:
        """The names of the filled slots, outermost first."""
        return [name for name in SLOTS if self._slots[name] is not None]

    def _compose(self) -> None:
        chain: Next = self._invoke
        # A run of adjacent slots holding exactly the built-in gates becomes one step.
        run: dict[str, Any] = {}
        for name in reversed(SLOTS):
            middleware = self._slots[name]
            if middleware is None:
                continue
            gate = _GATES.get(name)
            if gate is not None and type(middleware) is gate[0]:
                run[gate[1]] = middleware
                continue
            if run:
                chain, run = _gates(chain, **run), {}
            if isinstance(middleware, ChainedMiddleware):
                chain = middleware.bind(chain)
            else:
                chain = _link(middleware, chain)
        if run:
            chain = _gates(chain, **run)
        self._chain = chain

    # -- dispatch ----------------------------------------------------------

    def dispatch(self, command: Command, context: CommandContext | None = None) -> Deferred[Result]:
        try:
            if not isinstance(command, Command):
                return fail(InvalidCommand(f"not a command: {command!r}"))
            if context is None:
                context = _DEFAULT_CONTEXT
            elif not isinstance(context, CommandContext):
                return fail(InvalidCommand(f"not a command context: {context!r}"))
            if command.name not in self._handlers:
                self.log.info(
                    "unknown command {command} ({command_id})",
                    command=command.name,
                    command_id=context.command_id,
                )
                return fail(UnknownCommand(f"no handler for {command.name!r}"))
            if self._stopped:
                return fail(Unavailable("the command dispatcher is stopped"))
            return self._chain(command, context)
        except BaseException:  # a foreign middleware broke its contract
            return fail(_failure())

    def _invoke(self, command: Command, context: CommandContext) -> Deferred[Any]:
        """
        The innermost step: call the handler and check what it returns.

        The handler runs with :data:`piccolod.logging.correlation_id` set to
        the command's correlation id (or command id), so every line logged
        under it, in coroutines it starts too, carries that id.
        """
        handler = self._handlers.get(command.name)
        if handler is None:  # unregistered while the command was in flight
            return fail(UnknownCommand(f"no handler for {command.name!r}"))
        cid = context.correlation_id or context.command_id
        token = None if cid is None else _correlation_id.set(cid)
        try:
            result = handler(command, context)
            if isinstance(result, Result):
                return succeed(result)
            if isinstance(result, Deferred) or hasattr(result, "__await__"):
                # Wrapped while the id is set: a coroutine copies the context now.
                d = to_deferred(result)
                return d.addCallbacks(
                    self._check_result,
                    self._handler_failed,
                    callbackArgs=(command,),
                    errbackArgs=(command, context),
                )
        except BaseException:
            failure = _failure()
            self._handler_failed(failure, command, context)
            return fail(failure)
        finally:
            if token is not None:
                _correlation_id.reset(token)
        return fail(self._bad_result(command, result))

    def _check_result(self, result: Any, command: Command) -> Any:
        if isinstance(result, Result):
            return result
        return _failure(self._bad_result(command, result))

    @staticmethod
    def _bad_result(command: Command, result: Any) -> InvalidHandlerResult:
        return InvalidHandlerResult(
            f"the handler of {command.name} returned {type(result).__name__}, not a Result",
            command=command.name,
        )

    def _handler_failed(
        self, failure: Failure, command: Command, context: CommandContext
    ) -> Failure:
        if not isinstance(failure.value, (PiccolodError, CancelledError)):
            self.log.failure(
                "handler of {command} ({command_id}) raised an untyped error",
                failure,
                command=command.name,
                command_id=context.command_id,
                correlation_id=context.correlation_id,
            )
        return failure

    # -- lifecycle and stats -----------------------------------------------

    def stats(self) -> Mapping[str, Any]:
        """
        Counters for ``/metrics``: ``{"commands": {name: {"count", "outcomes",
        "latency_seconds_total", "latency_seconds_max"}}, "idempotency_entries":
        int, "running": int, "retrying": int}``.
        """
        return {
            "commands": self.audit.stats(),
            "idempotency_entries": len(self.idempotency),
            "running": len(self.timeouts._pending),
            "retrying": len(self.retries._runs),
        }

    def stop(self) -> None:
        """
        Refuse new commands with ``Unavailable``, fail commands waiting for a
        retry and cancel running ones (their callers get ``Unavailable``),
        cancelling every delayed call this dispatcher armed.  Idempotent.
        """
        self._stopped = True
        seen: list[ChainedMiddleware] = []
        installed = [self._slots[name] for name in reversed(SLOTS)]
        builtins = [self.retries, self.timeouts, self.idempotency]
        for middleware in [*installed, *builtins]:
            if isinstance(middleware, ChainedMiddleware) and middleware not in seen:
                seen.append(middleware)
                middleware.stop()


def _command_name(command_type: type[Command]) -> str:
    if not (isinstance(command_type, type) and issubclass(command_type, Command)):
        raise InvalidCommand(f"not a command type: {command_type!r}")
    if not command_type.name:
        raise InvalidCommand(f"{command_type.__name__} has no command name")
    return command_type.name


__all__ = [
    "SLOTS",
    "AuditMiddleware",
    "ChainedMiddleware",
    "CommandDispatcher",
    "IdempotencyMiddleware",
    "InvalidHandlerResult",
    "LeaderGate",
    "LockGate",
    "Registration",
    "RetryMiddleware",
    "TimeoutMiddleware",
    "is_retryable",
    "outcome_of",
    "register_all",
]
