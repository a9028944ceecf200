"""
Tests for :mod:`piccolod.kernel.dispatcher` (the command dispatcher and its
middleware chain) and :mod:`piccolod.testing.dispatcher` (its fake).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from piccolod.commands import Command, CommandContext, Result
from piccolod.errors import (
    CommandTimeout,
    Conflict,
    DuplicateRegistration,
    InvalidCommand,
    Locked,
    NotFound,
    NotLeader,
    PolicyDenied,
    TransientError,
    Unavailable,
    UnknownCommand,
)
from piccolod.events import AuditRecord, LockState, LockStateChanged, Role
from piccolod.interfaces import Backoff, ICommandDispatcher, LeadershipState
from piccolod.kernel.dispatcher import (
    SLOTS,
    CommandDispatcher,
    InvalidHandlerResult,
    LockGate,
    Next,
)
from piccolod.kernel.leadership import LeadershipRegistry
from piccolod.testing.bus import FakeEventBus
from piccolod.testing.dispatcher import FakeCommandDispatcher

# --------------------------------------------------------------------------
# Vocabulary of the tests


@attrs.frozen
class Echo(Command):
    name: ClassVar[str] = "test.echo"
    text: str = ""

    def resource(self) -> str:
        return f"echo:{self.text}"


@attrs.frozen
class Echoed(Result):
    text: str


@attrs.frozen
class Quiet(Command):
    name: ClassVar[str] = "test.quiet"
    audit: ClassVar[bool] = False


@attrs.frozen
class Guarded(Command):
    name: ClassVar[str] = "test.guarded"
    requires_unlocked: ClassVar[bool] = True


@attrs.frozen
class Led(Command):
    name: ClassVar[str] = "test.led"
    resource_name: str = "control-plane"

    def leader_resource(self) -> str | None:
        return self.resource_name


@attrs.frozen
class Flaky(Command):
    name: ClassVar[str] = "test.flaky"
    retries: ClassVar[int] = 3


@attrs.frozen
class Slow(Command):
    name: ClassVar[str] = "test.slow"
    timeout: ClassVar[float | None] = 5.0


@attrs.frozen
class Done(Result):
    pass


class Recorder:
    """A handler that records its calls and answers from a script."""

    def __init__(self, *answers: Any) -> None:
        self.calls: list[tuple[Command, CommandContext]] = []
        self.answers = list(answers)

    def __call__(self, command: Command, context: CommandContext) -> Any:
        self.calls.append((command, context))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            return answer(command)
        return answer


def echo(command: Echo, context: CommandContext) -> Echoed:
    return Echoed(command.text)


class Pending:
    """A handler returning Deferreds it keeps, with a canceller that records."""

    def __init__(self) -> None:
        self.deferreds: list[Deferred[Any]] = []
        self.cancelled = 0

    def _cancel(self, _d: Deferred[Any]) -> None:
        self.cancelled += 1

    def __call__(self, command: Command, context: CommandContext) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(self._cancel)
        self.deferreds.append(d)
        return d


class DispatcherTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def make(self, bus: FakeEventBus | None = None, **kwargs: Any) -> CommandDispatcher:
        kwargs.setdefault("rand", lambda: 0.5)
        dispatcher = CommandDispatcher(self.clock, bus, **kwargs)
        self.addCleanup(self._stopped, dispatcher)
        return dispatcher

    def _stopped(self, dispatcher: CommandDispatcher) -> None:
        dispatcher.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def with_bus(self, **kwargs: Any) -> tuple[CommandDispatcher, FakeEventBus]:
        bus = FakeEventBus(self.clock)
        return self.make(bus, **kwargs), bus


# --------------------------------------------------------------------------
# The contract every ICommandDispatcher keeps (the real one and the fake)


class DispatcherContract:
    """
    What callers may rely on from any ``ICommandDispatcher``; bound below to
    ``CommandDispatcher`` and ``FakeCommandDispatcher``.
    """

    def make_dispatcher(self) -> ICommandDispatcher:
        raise NotImplementedError

    def test_provides_interface(self: Any) -> None:
        """It provides ICommandDispatcher with the interface's parameter names."""
        dispatcher = self.make_dispatcher()
        self.assertTrue(verifyObject(ICommandDispatcher, dispatcher))
        assert_parameter_names(self, ICommandDispatcher, dispatcher)

    def test_register_refuses_duplicate(self: Any) -> None:
        """A second handler for one command name is refused and the first stays."""
        dispatcher = self.make_dispatcher()
        dispatcher.register(Echo, echo)
        with self.assertRaises(DuplicateRegistration):
            dispatcher.register(Echo, Recorder(Echoed("other")))
        result = self.successResultOf(dispatcher.dispatch(Echo("hi")))
        self.assertEqual(result, Echoed("hi"))

    def test_register_refuses_non_command_types(self: Any) -> None:
        """Registering something that is not a named Command type, or no callable, fails."""
        dispatcher = self.make_dispatcher()

        class Nameless(Command):
            pass

        for bad in (str, Nameless, Echo("x"), "test.echo"):
            with self.assertRaises(InvalidCommand):
                dispatcher.register(bad, echo)
        with self.assertRaises(InvalidCommand):
            dispatcher.register(Echo, "not callable")
        self.assertEqual(list(dispatcher.names()), [])

    def test_names_and_unregister(self: Any) -> None:
        """names() is sorted; unregister removes a handler and is idempotent."""
        dispatcher = self.make_dispatcher()
        dispatcher.register(Guarded, Recorder(Done()))
        dispatcher.register(Echo, echo)
        self.assertEqual(list(dispatcher.names()), ["test.echo", "test.guarded"])
        dispatcher.unregister(Echo)
        dispatcher.unregister(Echo)
        self.assertEqual(list(dispatcher.names()), ["test.guarded"])
        self.failureResultOf(dispatcher.dispatch(Echo("x")), UnknownCommand)

    def test_unknown_command(self: Any) -> None:
        """Dispatching a name with no handler fails with UnknownCommand."""
        dispatcher = self.make_dispatcher()
        failure = self.failureResultOf(dispatcher.dispatch(Echo("x")), UnknownCommand)
        self.assertIn("test.echo", str(failure.value))

    def test_invalid_command_or_context(self: Any) -> None:
        """A non-Command or a non-CommandContext fails with InvalidCommand, never raising."""
        dispatcher = self.make_dispatcher()
        dispatcher.register(Echo, echo)
        self.failureResultOf(dispatcher.dispatch("test.echo"), InvalidCommand)
        self.failureResultOf(dispatcher.dispatch(None), InvalidCommand)
        self.failureResultOf(dispatcher.dispatch(Echo("x"), {"command_id": "1"}), InvalidCommand)

    def test_sync_handler(self: Any) -> None:
        """A plain function's Result is the dispatch result, and the handler gets the context."""
        dispatcher = self.make_dispatcher()
        handler = Recorder(Echoed("a"))
        dispatcher.register(Echo, handler)
        context = CommandContext(subject="admin", source="api")
        self.assertEqual(self.successResultOf(dispatcher.dispatch(Echo(), context)), Echoed("a"))
        self.assertEqual(handler.calls, [(Echo(), context)])

    def test_default_context(self: Any) -> None:
        """Without a context the handler gets a default internal one."""
        dispatcher = self.make_dispatcher()
        handler = Recorder(Done())
        dispatcher.register(Echo, handler)
        self.successResultOf(dispatcher.dispatch(Echo()))
        self.assertEqual(handler.calls[0][1], CommandContext())

    def test_deferred_handler(self: Any) -> None:
        """A handler's Deferred is awaited: no result until it fires."""
        dispatcher = self.make_dispatcher()
        gate: Deferred[Result] = Deferred()
        dispatcher.register(Echo, Recorder(gate))
        d = dispatcher.dispatch(Echo("x"))
        self.assertNoResult(d)
        gate.callback(Echoed("late"))
        self.assertEqual(self.successResultOf(d), Echoed("late"))

    def test_async_def_handler(self: Any) -> None:
        """An ``async def`` handler's result is awaited, including its own awaits."""
        dispatcher = self.make_dispatcher()
        gate: Deferred[str] = Deferred()

        async def handler(command: Echo, context: CommandContext) -> Echoed:
            text = await gate
            return Echoed(command.text + text)

        dispatcher.register(Echo, handler)
        d = dispatcher.dispatch(Echo("a"))
        self.assertNoResult(d)
        gate.callback("b")
        self.assertEqual(self.successResultOf(d), Echoed("ab"))

    def test_non_result_is_a_typed_internal_error(self: Any) -> None:
        """A non-Result answer (sync, Deferred or async) fails with InvalidHandlerResult."""
        dispatcher = self.make_dispatcher()

        async def coroutine_none(command: Command, context: CommandContext) -> None:
            return None

        cases: list[Callable[..., Any]] = [
            lambda c, x: {"text": "x"},
            lambda c, x: succeed("nope"),
            coroutine_none,
        ]
        for handler in cases:
            dispatcher.unregister(Echo)
            dispatcher.register(Echo, handler)
            failure = self.failureResultOf(dispatcher.dispatch(Echo()), InvalidHandlerResult)
            self.assertEqual(failure.value.status, 500)
            self.assertIn("not a Result", str(failure.value))

    def test_typed_handler_error_reaches_caller(self: Any) -> None:
        """A typed error raised by the handler is the dispatch's failure."""
        dispatcher = self.make_dispatcher()
        dispatcher.register(Echo, Recorder(NotFound("no such thing")))
        failure = self.failureResultOf(dispatcher.dispatch(Echo()), NotFound)
        self.assertEqual(str(failure.value), "no such thing")

    def test_empty_slots_take_middleware_once(self: Any) -> None:
        """metrics and policy slots take one middleware each, run outermost first."""
        dispatcher = self.make_dispatcher()
        log: list[str] = []
        dispatcher.add_middleware("policy", recording("policy", log))
        dispatcher.add_middleware("metrics", recording("metrics", log))
        with self.assertRaises(DuplicateRegistration):
            dispatcher.add_middleware("policy", recording("again", log))
        with self.assertRaises(InvalidCommand):
            dispatcher.add_middleware("nonsense", recording("x", log))
        dispatcher.register(Echo, echo)
        self.successResultOf(dispatcher.dispatch(Echo()))
        self.assertEqual(log, ["metrics", "policy"])

    def test_policy_middleware_can_refuse(self: Any) -> None:
        """A policy middleware raising PolicyDenied fails the dispatch; the handler never runs."""
        dispatcher = self.make_dispatcher()

        def deny(command: Command, context: CommandContext, next: Next) -> Deferred[Any]:
            raise PolicyDenied(f"{context.subject} may not {command.name}")

        dispatcher.add_middleware("policy", deny)
        handler = Recorder(Done())
        dispatcher.register(Echo, handler)
        self.failureResultOf(dispatcher.dispatch(Echo()), PolicyDenied)
        self.assertEqual(handler.calls, [])


class CommandDispatcherContractTests(DispatcherContract, SynchronousTestCase):
    def make_dispatcher(self) -> ICommandDispatcher:
        clock = Clock()
        dispatcher = CommandDispatcher(clock)

        def stopped() -> None:
            dispatcher.stop()
            self.assertEqual(clock.getDelayedCalls(), [])

        self.addCleanup(stopped)
        return dispatcher


class FakeDispatcherContractTests(DispatcherContract, SynchronousTestCase):
    def make_dispatcher(self) -> ICommandDispatcher:
        return FakeCommandDispatcher()


# --------------------------------------------------------------------------
# Handlers


class HandlerTests(DispatcherTestCase):
    def test_bad_constructor_arguments(self) -> None:
        """A clock that is no IReactorTime, a non-positive timeout or TTL are refused."""
        with self.assertRaises(TypeError):
            CommandDispatcher(object())  # type: ignore[arg-type]
        with self.assertRaises(ValueError):
            CommandDispatcher(Clock(), default_timeout=0)
        with self.assertRaises(ValueError):
            CommandDispatcher(Clock(), idempotency_ttl=-1)
        with self.assertRaises(ValueError):
            CommandDispatcher(Clock(), idempotency_max=0)

    def test_untyped_exception_passes_through_and_is_logged(self) -> None:
        """An untyped handler exception reaches the caller as is and is logged as a failure."""
        dispatcher = self.make()
        dispatcher.register(Echo, Recorder(ZeroDivisionError("boom")))
        with capturedLogs() as events:
            self.failureResultOf(dispatcher.dispatch(Echo()), ZeroDivisionError)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["command"], "test.echo")

    def test_untyped_async_failure_is_logged(self) -> None:
        """An untyped failure of a handler's Deferred is logged as a failure too."""
        dispatcher = self.make()
        pending = Pending()
        dispatcher.register(Echo, pending)
        d = dispatcher.dispatch(Echo())
        pending.deferreds[0].errback(KeyError("k"))
        self.failureResultOf(d, KeyError)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_typed_error_is_not_logged_as_failure(self) -> None:
        """A typed handler error reaches the caller and logs no failure."""
        dispatcher = self.make()
        dispatcher.register(Echo, Recorder(NotFound("no such thing")))
        with capturedLogs() as events:
            self.failureResultOf(dispatcher.dispatch(Echo()), NotFound)
        self.assertFalse([e for e in events if "log_failure" in e])

    def test_unregistered_while_retrying(self) -> None:
        """A handler unregistered between attempts makes the retry fail with UnknownCommand."""
        dispatcher = self.make()
        dispatcher.register(Flaky, Recorder(TransientError()))
        d = dispatcher.dispatch(Flaky())
        dispatcher.unregister(Flaky)
        self.clock.advance(0.05)
        self.failureResultOf(d, UnknownCommand)


# --------------------------------------------------------------------------
# Idempotency


class IdempotencyTests(DispatcherTestCase):
    def test_seen_command_id_returns_first_result(self) -> None:
        """A command id seen before answers with the first result without running again."""
        dispatcher = self.make()
        handler = Recorder(Echoed("first"), Echoed("second"))
        dispatcher.register(Echo, handler)
        context = CommandContext(command_id="c1")
        first = self.successResultOf(dispatcher.dispatch(Echo("x"), context))
        again = self.successResultOf(dispatcher.dispatch(Echo("x"), context))
        self.assertEqual((first, again), (Echoed("first"), Echoed("first")))
        self.assertEqual(len(handler.calls), 1)

    def test_without_command_id_every_dispatch_runs(self) -> None:
        """Commands without a command id are never deduplicated."""
        dispatcher = self.make()
        handler = Recorder(Done())
        dispatcher.register(Echo, handler)
        for _ in range(3):
            self.successResultOf(dispatcher.dispatch(Echo("x")))
        self.assertEqual(len(handler.calls), 3)
        self.assertEqual(len(dispatcher.idempotency), 0)

    def test_concurrent_duplicates_share_one_run(self) -> None:
        """Concurrent duplicates of an id run the handler once, each with its own Deferred."""
        dispatcher = self.make()
        pending = Pending()
        dispatcher.register(Echo, pending)
        context = CommandContext(command_id="c1")
        d1 = dispatcher.dispatch(Echo("x"), context)
        d2 = dispatcher.dispatch(Echo("x"), context)
        self.assertIsNot(d1, d2)
        self.assertEqual(len(pending.deferreds), 1)
        self.assertNoResult(d1)
        self.assertNoResult(d2)
        pending.deferreds[0].callback(Echoed("once"))
        self.assertEqual(self.successResultOf(d1), Echoed("once"))
        self.assertEqual(self.successResultOf(d2), Echoed("once"))
        self.assertEqual(
            self.successResultOf(dispatcher.dispatch(Echo("x"), context)), Echoed("once")
        )
        self.assertEqual(len(pending.deferreds), 1)

    def test_concurrent_duplicates_share_a_failure(self) -> None:
        """A shared run that fails fails every caller, and a remembered error answers later ones."""
        dispatcher = self.make()
        pending = Pending()
        dispatcher.register(Echo, pending)
        context = CommandContext(command_id="c1")
        d1 = dispatcher.dispatch(Echo("x"), context)
        d2 = dispatcher.dispatch(Echo("x"), context)
        pending.deferreds[0].errback(NotFound("gone"))
        self.failureResultOf(d1, NotFound)
        self.failureResultOf(d2, NotFound)
        self.failureResultOf(dispatcher.dispatch(Echo("x"), context), NotFound)
        self.assertEqual(len(pending.deferreds), 1)

    def test_cancelling_one_caller_keeps_the_shared_run(self) -> None:
        """One caller cancelling keeps the run the other waits for; the last one cancels it."""
        dispatcher = self.make()
        pending = Pending()
        dispatcher.register(Echo, pending)
        context = CommandContext(command_id="c1")
        d1 = dispatcher.dispatch(Echo("x"), context)
        d2 = dispatcher.dispatch(Echo("x"), context)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.assertEqual(pending.cancelled, 0)
        d2.cancel()
        self.failureResultOf(d2, CancelledError)
        self.assertEqual(pending.cancelled, 1)
        # A cancelled run is forgotten: the same id runs again.
        d3 = dispatcher.dispatch(Echo("x"), context)
        self.assertEqual(len(pending.deferreds), 2)
        pending.deferreds[1].callback(Echoed("again"))
        self.assertEqual(self.successResultOf(d3), Echoed("again"))

    def test_ttl_expiry(self) -> None:
        """A command id is remembered for the TTL after its outcome, then runs again."""
        dispatcher = self.make(idempotency_ttl=60.0)
        handler = Recorder(Echoed("first"), Echoed("second"))
        dispatcher.register(Echo, handler)
        context = CommandContext(command_id="c1")
        self.successResultOf(dispatcher.dispatch(Echo("x"), context))
        self.clock.advance(59.9)
        self.assertEqual(
            self.successResultOf(dispatcher.dispatch(Echo("x"), context)), Echoed("first")
        )
        self.clock.advance(0.1)
        self.assertEqual(
            self.successResultOf(dispatcher.dispatch(Echo("x"), context)), Echoed("second")
        )
        self.assertEqual(len(handler.calls), 2)

    def test_expired_entries_are_purged(self) -> None:
        """Expired entries are swept when later commands are dispatched, so the table shrinks."""
        dispatcher = self.make(idempotency_ttl=10.0)
        dispatcher.register(Echo, echo)
        for i in range(5):
            self.successResultOf(dispatcher.dispatch(Echo(), CommandContext(command_id=f"c{i}")))
        self.assertEqual(len(dispatcher.idempotency), 5)
        self.clock.advance(10)
        self.successResultOf(dispatcher.dispatch(Echo(), CommandContext(command_id="new")))
        self.assertEqual(len(dispatcher.idempotency), 1)

    def test_table_is_capped(self) -> None:
        """The table keeps at most idempotency_max finished ids, evicting the oldest."""
        dispatcher = self.make(idempotency_max=3)
        handler = Recorder(Done())
        dispatcher.register(Echo, handler)
        for i in range(5):
            self.successResultOf(dispatcher.dispatch(Echo(), CommandContext(command_id=f"c{i}")))
        self.assertEqual(len(dispatcher.idempotency), 3)
        self.successResultOf(dispatcher.dispatch(Echo(), CommandContext(command_id="c4")))
        self.assertEqual(len(handler.calls), 5)
        self.successResultOf(dispatcher.dispatch(Echo(), CommandContext(command_id="c0")))
        self.assertEqual(len(handler.calls), 6)

    def test_reused_id_with_other_command_conflicts(self) -> None:
        """Reusing a command id for other fields or another command fails with Conflict."""
        dispatcher = self.make()
        handler = Recorder(Done())
        dispatcher.register(Echo, handler)
        dispatcher.register(Quiet, handler)
        context = CommandContext(command_id="c1")
        self.successResultOf(dispatcher.dispatch(Echo("x"), context))
        self.failureResultOf(dispatcher.dispatch(Echo("y"), context), Conflict)
        self.failureResultOf(dispatcher.dispatch(Quiet(), context), Conflict)
        self.assertEqual(len(handler.calls), 1)

    def test_reentrant_duplicate_joins_the_run(self) -> None:
        """A handler dispatching its own command id again joins its own run."""
        dispatcher = self.make()
        inner: list[Deferred[Result]] = []

        def handler(command: Echo, context: CommandContext) -> Echoed:
            inner.append(dispatcher.dispatch(command, context))
            self.assertNoResult(inner[0])
            return Echoed("outer")

        dispatcher.register(Echo, handler)
        context = CommandContext(command_id="c1")
        self.assertEqual(
            self.successResultOf(dispatcher.dispatch(Echo(), context)), Echoed("outer")
        )
        self.assertEqual(self.successResultOf(inner[0]), Echoed("outer"))

    def test_shared_retryable_failure_is_forgotten(self) -> None:
        """A shared run failing with a retryable error fails every caller and is forgotten."""
        dispatcher = self.make()
        pending = Pending()
        dispatcher.register(Echo, pending)
        context = CommandContext(command_id="c1")
        d1 = dispatcher.dispatch(Echo(), context)
        d2 = dispatcher.dispatch(Echo(), context)
        pending.deferreds[0].errback(TransientError())
        self.failureResultOf(d1, TransientError)
        self.failureResultOf(d2, TransientError)
        self.assertEqual(len(dispatcher.idempotency), 0)
        d3 = dispatcher.dispatch(Echo(), context)
        self.assertEqual(len(pending.deferreds), 2)
        pending.deferreds[1].callback(Done())
        self.successResultOf(d3)

    def test_command_ids_are_per_subject(self) -> None:
        """One command id from two subjects runs twice, never answering one with the other's."""
        dispatcher = self.make()
        handler = Recorder(Echoed("1"), Echoed("2"), Echoed("3"))
        dispatcher.register(Echo, handler)
        admin = CommandContext(command_id="c1", subject="admin")
        token = CommandContext(command_id="c1", subject="token:t1")
        self.assertEqual(self.successResultOf(dispatcher.dispatch(Echo(), admin)), Echoed("1"))
        self.assertEqual(self.successResultOf(dispatcher.dispatch(Echo(), token)), Echoed("2"))
        third = CommandContext(command_id="c1")  # system:kernel, with another command
        self.successResultOf(dispatcher.dispatch(Echo("other"), third))
        self.assertEqual(self.successResultOf(dispatcher.dispatch(Echo(), admin)), Echoed("1"))
        self.assertEqual(len(handler.calls), 3)

    def test_reused_id_conflicts_while_running(self) -> None:
        """A concurrent dispatch of another command under a running id fails with Conflict."""
        dispatcher = self.make()
        pending = Pending()
        dispatcher.register(Echo, pending)
        context = CommandContext(command_id="c1")
        d1 = dispatcher.dispatch(Echo("x"), context)
        self.failureResultOf(dispatcher.dispatch(Echo("y"), context), Conflict)
        pending.deferreds[0].callback(Done())
        self.successResultOf(d1)

    def test_retryable_failure_is_forgotten(self) -> None:
        """A retryable failure is not remembered: the same id runs again."""
        dispatcher = self.make()
        handler = Recorder(TransientError("blip"), Echoed("ok"))
        dispatcher.register(Echo, handler)
        context = CommandContext(command_id="c1")
        self.failureResultOf(dispatcher.dispatch(Echo(), context), TransientError)
        self.assertEqual(self.successResultOf(dispatcher.dispatch(Echo(), context)), Echoed("ok"))

    def test_untyped_failure_is_forgotten(self) -> None:
        """An untyped failure (a bug) is not remembered: the same id runs again."""
        dispatcher = self.make()
        handler = Recorder(RuntimeError("bug"), Echoed("ok"))
        dispatcher.register(Echo, handler)
        context = CommandContext(command_id="c1")
        self.failureResultOf(dispatcher.dispatch(Echo(), context), RuntimeError)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.successResultOf(dispatcher.dispatch(Echo(), context)), Echoed("ok"))

    def test_gate_refusal_is_forgotten(self) -> None:
        """A Locked refusal is not remembered: after unlocking the same id runs."""
        dispatcher, bus = self.with_bus()
        handler = Recorder(Done())
        dispatcher.register(Guarded, handler)
        context = CommandContext(command_id="c1")
        self.failureResultOf(dispatcher.dispatch(Guarded(), context), Locked)
        bus.publish(LockStateChanged(LockState.UNLOCKED))
        self.successResultOf(dispatcher.dispatch(Guarded(), context))
        self.assertEqual(len(handler.calls), 1)


# --------------------------------------------------------------------------
# Gates


class LockGateTests(DispatcherTestCase):
    def test_no_bus_means_locked(self) -> None:
        """Without a bus a command requiring unlocked storage is refused with Locked."""
        dispatcher = self.make()
        handler = Recorder(Done())
        dispatcher.register(Guarded, handler)
        failure = self.failureResultOf(dispatcher.dispatch(Guarded()), Locked)
        self.assertEqual(failure.value.status, 423)
        self.assertEqual(handler.calls, [])

    def test_no_retained_state_means_locked(self) -> None:
        """A bus with no retained lock state refuses with Locked."""
        dispatcher, _bus = self.with_bus()
        dispatcher.register(Guarded, Recorder(Done()))
        self.failureResultOf(dispatcher.dispatch(Guarded()), Locked)

    def test_retained_state_decides(self) -> None:
        """Only a retained UNLOCKED state lets the command through; LOCKED again refuses."""
        dispatcher, bus = self.with_bus()
        handler = Recorder(Done())
        dispatcher.register(Guarded, handler)
        for state in (LockState.UNINITIALIZED, LockState.LOCKED, LockState.PREUNLOCK):
            bus.publish(LockStateChanged(state))
            self.failureResultOf(dispatcher.dispatch(Guarded()), Locked)
        bus.publish(LockStateChanged(LockState.UNLOCKED))
        self.successResultOf(dispatcher.dispatch(Guarded()))
        bus.publish(LockStateChanged(LockState.LOCKED, LockState.UNLOCKED))
        self.failureResultOf(dispatcher.dispatch(Guarded()), Locked)
        self.assertEqual(len(handler.calls), 1)

    def test_commands_not_requiring_unlock_pass(self) -> None:
        """A command that does not require unlocked storage runs while locked."""
        dispatcher = self.make()
        dispatcher.register(Echo, echo)
        self.successResultOf(dispatcher.dispatch(Echo()))


@attrs.define
class StubRegistry:
    """Just enough of a leadership registry for the gate, never leader."""

    refusal: Exception | None = None
    current: LeadershipState | None = None
    asked: list[str] = attrs.field(factory=list)

    def state(self, resource: str) -> LeadershipState:
        assert self.current is not None
        return self.current

    def is_leader(self, resource: str) -> bool:
        self.asked.append(resource)
        return False

    def require_leader(self, resource: str) -> LeadershipState:
        self.asked.append(resource)
        if self.refusal is not None:
            raise self.refusal
        return self.state(resource)


class LeaderGateTests(DispatcherTestCase):
    def make_registry(self) -> LeadershipRegistry:
        return LeadershipRegistry(None, "node-a")

    def test_no_registry_means_not_leader(self) -> None:
        """Without a registry a leader-gated command is refused with NotLeader."""
        dispatcher = self.make()
        handler = Recorder(Done())
        dispatcher.register(Led, handler)
        failure = self.failureResultOf(dispatcher.dispatch(Led()), NotLeader)
        self.assertEqual(failure.value.resource, "control-plane")
        self.assertEqual(handler.calls, [])

    def test_unknown_role_is_never_leader(self) -> None:
        """A resource in UNKNOWN role is refused with no leader hint."""
        dispatcher = self.make(registry=self.make_registry())
        dispatcher.register(Led, Recorder(Done()))
        failure = self.failureResultOf(dispatcher.dispatch(Led()), NotLeader)
        self.assertIsNone(failure.value.leader_hint)

    def test_follower_gets_leader_hint(self) -> None:
        """A follower refuses with the leader's address and id."""
        registry = self.make_registry()
        registry.update("control-plane", Role.FOLLOWER, 3, "node-b", "http://b.local:8080")
        dispatcher = self.make(registry=registry)
        dispatcher.register(Led, Recorder(Done()))
        failure = self.failureResultOf(dispatcher.dispatch(Led()), NotLeader)
        self.assertEqual(failure.value.leader_hint, "http://b.local:8080")
        self.assertEqual(failure.value.leader_id, "node-b")

    def test_leader_runs(self) -> None:
        """The leader of the resource runs the command; other resources stay gated."""
        registry = self.make_registry()
        registry.update("control-plane", Role.LEADER, 1)
        dispatcher = self.make(registry=registry)
        handler = Recorder(Done())
        dispatcher.register(Led, handler)
        self.successResultOf(dispatcher.dispatch(Led()))
        self.failureResultOf(dispatcher.dispatch(Led("app:other")), NotLeader)
        self.assertEqual(len(handler.calls), 1)

    def test_registry_error_is_a_typed_failure(self) -> None:
        """A registry failing its query yields that typed error instead of raising."""
        registry = StubRegistry(refusal=Unavailable("consensus backend down"))
        dispatcher = self.make(registry=registry)
        dispatcher.register(Led, Recorder(Done()))
        self.failureResultOf(dispatcher.dispatch(Led()), Unavailable)

    def test_contradicting_registry_still_refuses(self) -> None:
        """A registry saying 'not leader' but not refusing yields NotLeader from its state."""
        registry = StubRegistry(
            current=LeadershipState("control-plane", Role.FOLLOWER, "node-c", "http://c:1", 4)
        )
        dispatcher = self.make(registry=registry)
        dispatcher.register(Led, Recorder(Done()))
        failure = self.failureResultOf(dispatcher.dispatch(Led()), NotLeader)
        self.assertEqual(
            (failure.value.leader_hint, failure.value.leader_id), ("http://c:1", "node-c")
        )
        self.assertEqual(registry.asked, ["control-plane", "control-plane"])

    def test_ungated_command_needs_no_registry(self) -> None:
        """A command without a leader resource runs without a registry."""
        dispatcher = self.make()
        dispatcher.register(Echo, echo)
        self.successResultOf(dispatcher.dispatch(Echo()))


# --------------------------------------------------------------------------
# Timeouts and retries


class TimeoutTests(DispatcherTestCase):
    def test_timeout_cancels_handler(self) -> None:
        """At the deadline handler's Deferred is cancelled and the caller gets CommandTimeout."""
        dispatcher = self.make(default_timeout=10.0)
        pending = Pending()
        dispatcher.register(Echo, pending)
        d = dispatcher.dispatch(Echo())
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, CommandTimeout)
        self.assertEqual(failure.value.status, 504)
        self.assertEqual(pending.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline_precedence(self) -> None:
        """The context's timeout beats the command's, which beats the default."""
        dispatcher = self.make(default_timeout=30.0)
        pending = Pending()
        dispatcher.register(Echo, pending)
        dispatcher.register(Slow, pending)
        cases = [
            (Echo(), CommandContext(), 30.0),
            (Slow(), CommandContext(), 5.0),
            (Slow(), CommandContext(timeout=2.0), 2.0),
        ]
        for command, context, deadline in cases:
            d = dispatcher.dispatch(command, context)
            self.clock.advance(deadline - 0.01)
            self.assertNoResult(d)
            self.clock.advance(0.01)
            self.failureResultOf(d, CommandTimeout)

    def test_no_timer_for_synchronous_results(self) -> None:
        """A handler answering synchronously never makes the dispatcher arm a timer."""
        scheduled: list[float] = []

        class CountingClock(Clock):
            def callLater(
                self, delay: float, callable: Callable[..., object], *args: object, **kw: object
            ) -> IDelayedCall:
                scheduled.append(delay)
                return super().callLater(delay, callable, *args, **kw)

        self.clock = CountingClock()
        dispatcher = self.make()
        dispatcher.register(Echo, echo)
        dispatcher.register(Flaky, Recorder(NotFound()))
        self.successResultOf(dispatcher.dispatch(Echo(), CommandContext(command_id="c1")))
        self.failureResultOf(dispatcher.dispatch(Flaky()), NotFound)
        self.assertEqual(scheduled, [])
        dispatcher.register(Slow, Pending())
        d = dispatcher.dispatch(Slow())
        self.assertEqual(scheduled, [5.0])
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_timely_answer_cancels_timer(self) -> None:
        """An answer before the deadline cancels the timer and is returned."""
        dispatcher = self.make()
        pending = Pending()
        dispatcher.register(Echo, pending)
        d = dispatcher.dispatch(Echo())
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        pending.deferreds[0].callback(Echoed("in time"))
        self.assertEqual(self.successResultOf(d), Echoed("in time"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_handler_error_after_cancel_is_still_a_timeout(self) -> None:
        """A handler turning cancellation into its own error still yields CommandTimeout."""
        dispatcher = self.make(default_timeout=1.0)

        def handler(command: Command, context: CommandContext) -> Deferred[Any]:
            return Deferred(lambda d: d.errback(NotFound("cleanup")))

        dispatcher.register(Echo, handler)
        d = dispatcher.dispatch(Echo())
        self.clock.advance(1.0)
        self.failureResultOf(d, CommandTimeout)

    def test_non_positive_timeout_is_invalid(self) -> None:
        """A zero or negative context timeout fails with InvalidCommand without running."""
        dispatcher = self.make()
        handler = Recorder(Done())
        dispatcher.register(Echo, handler)
        for timeout in (0.0, -1.0, float("nan")):
            self.failureResultOf(
                dispatcher.dispatch(Echo(), CommandContext(timeout=timeout)), InvalidCommand
            )
        self.assertEqual(handler.calls, [])


class RetryTests(DispatcherTestCase):
    def test_retryable_errors_are_retried_with_backoff(self) -> None:
        """Retryable errors are retried after 50, 100 and 200 ms (no jitter at rand 0.5)."""
        dispatcher = self.make()
        handler = Recorder(TransientError(), TransientError(), TransientError(), Done())
        dispatcher.register(Flaky, handler)
        d = dispatcher.dispatch(Flaky())
        for delay, calls in ((0.05, 2), (0.1, 3), (0.2, 4)):
            self.assertEqual(len(handler.calls), calls - 1)
            self.clock.advance(delay - 0.001)
            self.assertEqual(len(handler.calls), calls - 1)
            self.clock.advance(0.001)
            self.assertEqual(len(handler.calls), calls)
        self.assertEqual(self.successResultOf(d), Done())

    def test_jitter_comes_from_rand(self) -> None:
        """The backoff delay uses the injected rand: rand 0 waits 80 % of the base delay."""
        dispatcher = self.make(rand=lambda: 0.0, backoff=Backoff(initial=1.0, maximum=10.0))
        handler = Recorder(TransientError(), Done())
        dispatcher.register(Flaky, handler)
        d = dispatcher.dispatch(Flaky())
        self.clock.advance(0.79)
        self.assertEqual(len(handler.calls), 1)
        self.clock.advance(0.01)
        self.assertEqual(self.successResultOf(d), Done())

    def test_retries_are_bounded(self) -> None:
        """After command.retries retries the last retryable error is returned."""
        dispatcher = self.make()
        handler = Recorder(TransientError("still down"))
        dispatcher.register(Flaky, handler)
        d = dispatcher.dispatch(Flaky())
        self.clock.pump([1.0] * 10)
        failure = self.failureResultOf(d, TransientError)
        self.assertEqual(str(failure.value), "still down")
        self.assertEqual(len(handler.calls), 1 + Flaky.retries)

    def test_non_retryable_errors_fail_at_once(self) -> None:
        """A non-retryable typed error or an untyped one is not retried."""
        dispatcher = self.make()
        handler = Recorder(NotFound("gone"))
        dispatcher.register(Flaky, handler)
        self.failureResultOf(dispatcher.dispatch(Flaky()), NotFound)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        handler.answers = [ValueError("bug")]
        self.failureResultOf(dispatcher.dispatch(Flaky()), ValueError)
        self.flushLoggedErrors(ValueError)
        self.assertEqual(len(handler.calls), 2)

    def test_no_retries_declared(self) -> None:
        """A command declaring no retries fails on its first retryable error."""
        dispatcher = self.make()
        handler = Recorder(TransientError())
        dispatcher.register(Echo, handler)
        self.failureResultOf(dispatcher.dispatch(Echo()), TransientError)
        self.assertEqual(len(handler.calls), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_async_retryable_failure_is_retried(self) -> None:
        """A retryable failure of a handler's Deferred is retried too."""
        dispatcher = self.make()
        pending = Pending()
        dispatcher.register(Flaky, pending)
        d = dispatcher.dispatch(Flaky())
        pending.deferreds[0].errback(TransientError())
        self.clock.advance(0.05)
        pending.deferreds[1].callback(Done())
        self.assertEqual(self.successResultOf(d), Done())

    def test_deadline_covers_retries(self) -> None:
        """The deadline spans every attempt: a timeout during backoff fails with CommandTimeout."""
        dispatcher = self.make(backoff=Backoff(initial=5.0, maximum=5.0))
        handler = Recorder(TransientError())
        dispatcher.register(Flaky, handler)
        d = dispatcher.dispatch(Flaky(), CommandContext(timeout=7.0))
        self.clock.advance(7.0)
        self.failureResultOf(d, CommandTimeout)
        self.assertEqual(len(handler.calls), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_during_backoff(self) -> None:
        """Cancelling a command waiting for its retry cancels the delayed retry."""
        dispatcher = self.make()
        handler = Recorder(TransientError())
        dispatcher.register(Flaky, handler)
        d = dispatcher.dispatch(Flaky())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(handler.calls), 1)

    def test_cancel_during_attempt_does_not_retry(self) -> None:
        """Cancelling while an attempt runs cancels it and never retries, whatever it fails with."""
        dispatcher = self.make()

        def handler(command: Command, context: CommandContext) -> Deferred[Any]:
            return Deferred(lambda d: d.errback(TransientError("cancelled mid-way")))

        dispatcher.register(Flaky, handler)
        d = dispatcher.dispatch(Flaky())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# --------------------------------------------------------------------------
# Audit


class AuditTests(DispatcherTestCase):
    def test_audit_records_published(self) -> None:
        """Each audited command's outcome is published as an AuditRecord with the correlation id."""
        dispatcher, bus = self.with_bus()
        dispatcher.register(Echo, Recorder(Echoed("x"), NotFound("no")))
        context = CommandContext(subject="admin", correlation_id="req-1")
        self.successResultOf(dispatcher.dispatch(Echo("a"), context))
        self.failureResultOf(dispatcher.dispatch(Echo("b"), context), NotFound)
        envelopes = bus.published("audit")
        records = [env.event for env in envelopes]
        self.assertEqual(
            [(r.action, r.subject, r.outcome, r.resource) for r in records],
            [
                ("test.echo", "admin", "ok", "echo:a"),
                ("test.echo", "admin", "error:not-found", "echo:b"),
            ],
        )
        self.assertTrue(all(isinstance(r, AuditRecord) for r in records))
        self.assertNotEqual(records[0].decision_id, records[1].decision_id)
        self.assertEqual([env.context.correlation_id for env in envelopes], ["req-1", "req-1"])

    def test_correlation_falls_back_to_command_id(self) -> None:
        """Without a correlation id the audit record is correlated by the command id."""
        dispatcher, bus = self.with_bus()
        dispatcher.register(Echo, echo)
        self.successResultOf(dispatcher.dispatch(Echo(), CommandContext(command_id="c9")))
        self.assertEqual(bus.published("audit")[0].context.correlation_id, "c9")

    def test_unaudited_commands_publish_nothing(self) -> None:
        """A command class with audit = False publishes no record but is still counted."""
        dispatcher, bus = self.with_bus()
        dispatcher.register(Quiet, Recorder(Done()))
        self.successResultOf(dispatcher.dispatch(Quiet()))
        bus.assert_nothing_published("audit")
        self.assertEqual(dispatcher.stats()["commands"]["test.quiet"]["count"], 1)

    def test_gate_refusals_are_audited(self) -> None:
        """Refusals by the gates are audited with their error type."""
        dispatcher, bus = self.with_bus()
        dispatcher.register(Guarded, Recorder(Done()))
        self.failureResultOf(dispatcher.dispatch(Guarded()), Locked)
        self.assertEqual([e.outcome for e in bus.events("audit")], ["error:locked"])  # type: ignore[attr-defined]

    def test_outcomes_are_logged_with_stable_fields(self) -> None:
        """Every outcome is logged with command, command_id, correlation_id and outcome fields."""
        dispatcher = self.make()
        dispatcher.register(Echo, Recorder(Done(), NotFound()))
        context = CommandContext(command_id="c1", correlation_id="r1")
        with capturedLogs() as events:
            self.successResultOf(dispatcher.dispatch(Echo("a"), context))
            self.failureResultOf(
                dispatcher.dispatch(Echo("b"), CommandContext(command_id="c2")), NotFound
            )
        logged = [e for e in events if "outcome" in e]
        self.assertEqual(
            [(e["command"], e["command_id"], e["correlation_id"], e["outcome"]) for e in logged],
            [("test.echo", "c1", "r1", "ok"), ("test.echo", "c2", None, "error:not-found")],
        )
        self.assertEqual([e["log_level"] for e in logged], [LogLevel.debug, LogLevel.info])

    def test_successes_can_go_unlogged(self) -> None:
        """With log_successes off only failures are logged."""
        dispatcher = self.make(log_successes=False)
        dispatcher.register(Echo, Recorder(Done(), NotFound()))
        with capturedLogs() as events:
            self.successResultOf(dispatcher.dispatch(Echo("a")))
            self.failureResultOf(dispatcher.dispatch(Echo("b")), NotFound)
        self.assertEqual([e["outcome"] for e in events if "outcome" in e], ["error:not-found"])

    def test_stats_count_outcomes_and_latency(self) -> None:
        """stats() counts outcomes per command and sums clock-measured latency."""
        dispatcher = self.make()
        pending = Pending()
        dispatcher.register(Echo, pending)
        dispatcher.register(Guarded, Recorder(Done()))
        d = dispatcher.dispatch(Echo())
        self.clock.advance(2.0)
        pending.deferreds[0].callback(Done())
        self.successResultOf(d)
        self.failureResultOf(dispatcher.dispatch(Guarded()), Locked)
        self.failureResultOf(dispatcher.dispatch(Guarded()), Locked)
        stats = dispatcher.stats()["commands"]
        self.assertEqual(
            stats["test.echo"],
            {
                "count": 1,
                "outcomes": {"ok": 1},
                "latency_seconds_total": 2.0,
                "latency_seconds_max": 2.0,
            },
        )
        self.assertEqual(stats["test.guarded"]["outcomes"], {"ok": 0, "error:locked": 2})
        self.assertEqual(stats["test.guarded"]["count"], 2)

    def test_failing_bus_does_not_break_dispatch(self) -> None:
        """A bus that raises on publish is logged and the command's result still arrives."""

        @attrs.define(eq=False)
        class BrokenBus(FakeEventBus):
            def publish(self, *args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("bus down")

        dispatcher = self.make(BrokenBus(self.clock))
        dispatcher.register(Echo, echo)
        self.assertEqual(self.successResultOf(dispatcher.dispatch(Echo("x"))), Echoed("x"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


# --------------------------------------------------------------------------
# Middleware slots and order


def recording(
    name: str, log: list[str]
) -> Callable[[Command, CommandContext, Next], Deferred[Any]]:
    def middleware(command: Command, context: CommandContext, next: Next) -> Deferred[Any]:
        log.append(name)
        return next(command, context)

    return middleware


class MiddlewareTests(DispatcherTestCase):
    def test_default_slots(self) -> None:
        """A new dispatcher fills every slot but metrics and policy, in chain order."""
        dispatcher = self.make()
        self.assertEqual(
            list(dispatcher.middleware()),
            ["audit", "idempotency", "lock", "leader", "timeout", "retry"],
        )

    def test_empty_slot_takes_middleware_once(self) -> None:
        """add_middleware fills an empty slot; a taken or unknown slot is refused."""
        dispatcher = self.make()
        log: list[str] = []
        dispatcher.add_middleware("policy", recording("policy", log))
        with self.assertRaises(DuplicateRegistration):
            dispatcher.add_middleware("policy", recording("again", log))
        with self.assertRaises(DuplicateRegistration):
            dispatcher.add_middleware("lock", recording("lock", log))
        with self.assertRaises(InvalidCommand):
            dispatcher.add_middleware("nonsense", recording("x", log))
        with self.assertRaises(InvalidCommand):
            dispatcher.add_middleware("metrics", "not callable")  # type: ignore[arg-type]
        dispatcher.register(Echo, echo)
        self.successResultOf(dispatcher.dispatch(Echo()))
        self.assertEqual(log, ["policy"])

    def test_slots_run_in_chain_order(self) -> None:
        """Middlewares run outermost first in slot order, whatever order they were added in."""
        dispatcher = self.make()
        for name in SLOTS:
            dispatcher.remove_middleware(name)
        log: list[str] = []
        for name in (
            "retry",
            "policy",
            "audit",
            "timeout",
            "lock",
            "metrics",
            "leader",
            "idempotency",
        ):
            dispatcher.add_middleware(name, recording(name, log))

        def handler(command: Command) -> Done:
            log.append("handler")
            return Done()

        dispatcher.register(Echo, Recorder(handler))
        self.successResultOf(dispatcher.dispatch(Echo()))
        self.assertEqual(log, [*SLOTS, "handler"])

    def test_policy_sits_between_audit_and_idempotency(self) -> None:
        """A policy denial is audited, and is not remembered under the command id."""
        dispatcher, bus = self.with_bus()
        denied: list[bool] = [True]

        def policy(command: Command, context: CommandContext, next: Next) -> Deferred[Any]:
            if denied[0]:
                raise PolicyDenied(f"{context.subject} may not {command.name}")
            return next(command, context)

        dispatcher.add_middleware("policy", policy)
        handler = Recorder(Done())
        dispatcher.register(Echo, handler)
        context = CommandContext(command_id="c1", subject="guest")
        self.failureResultOf(dispatcher.dispatch(Echo(), context), PolicyDenied)
        self.assertEqual([e.outcome for e in bus.events("audit")], ["error:forbidden"])  # type: ignore[attr-defined]
        denied[0] = False
        self.successResultOf(dispatcher.dispatch(Echo(), context))
        self.assertEqual(len(handler.calls), 1)

    def test_lock_gate_before_leader_gate(self) -> None:
        """A command both locked out and not led is refused by the lock gate first."""

        @attrs.frozen
        class Both(Command):
            name: ClassVar[str] = "test.both"
            requires_unlocked: ClassVar[bool] = True

            def leader_resource(self) -> str | None:
                return "control-plane"

        dispatcher = self.make()
        dispatcher.register(Both, Recorder(Done()))
        self.failureResultOf(dispatcher.dispatch(Both()), Locked)

    def test_idempotency_outside_gates(self) -> None:
        """A remembered result answers a duplicate even after the storage was locked again."""
        dispatcher, bus = self.with_bus()
        bus.publish(LockStateChanged(LockState.UNLOCKED))
        handler = Recorder(Done())
        dispatcher.register(Guarded, handler)
        context = CommandContext(command_id="c1")
        self.successResultOf(dispatcher.dispatch(Guarded(), context))
        bus.publish(LockStateChanged(LockState.LOCKED))
        self.successResultOf(dispatcher.dispatch(Guarded(), context))
        self.failureResultOf(dispatcher.dispatch(Guarded()), Locked)

    def test_foreign_middleware_may_return_coroutine(self) -> None:
        """An ``async def`` middleware works: its coroutine is awaited."""
        dispatcher = self.make()

        async def middleware(command: Command, context: CommandContext, next: Next) -> Any:
            return await next(command, context)

        dispatcher.add_middleware("metrics", middleware)  # type: ignore[arg-type]
        dispatcher.register(Echo, echo)
        self.assertEqual(self.successResultOf(dispatcher.dispatch(Echo("m"))), Echoed("m"))

    def test_removed_builtin_can_be_replaced(self) -> None:
        """remove_middleware empties a slot (returning its occupant) so it can be refilled."""
        dispatcher = self.make()
        old = dispatcher.remove_middleware("lock")
        self.assertIs(old, dispatcher.lock_gate)
        self.assertIsNone(dispatcher.remove_middleware("metrics"))
        dispatcher.register(Guarded, Recorder(Done()))
        self.successResultOf(dispatcher.dispatch(Guarded()))
        dispatcher.add_middleware("lock", dispatcher.lock_gate)
        self.failureResultOf(dispatcher.dispatch(Guarded()), Locked)
        with self.assertRaises(InvalidCommand):
            dispatcher.remove_middleware("nonsense")

    def test_builtin_middleware_works_standalone(self) -> None:
        """A built-in middleware can be called as a plain (command, context, next) middleware."""
        dispatcher = self.make()
        handler = Recorder(Done())
        result = dispatcher.lock_gate(
            Guarded(), CommandContext(), lambda c, x: succeed(handler(c, x))
        )
        self.failureResultOf(result, Locked)
        self.assertEqual(handler.calls, [])


# --------------------------------------------------------------------------
# Stopping


class StopTests(DispatcherTestCase):
    def test_stop_fails_pending_work(self) -> None:
        """stop() fails running, retrying commands with Unavailable, leaving no delayed calls."""
        dispatcher = self.make()
        pending = Pending()
        dispatcher.register(Echo, pending)
        dispatcher.register(Flaky, Recorder(TransientError()))
        running = dispatcher.dispatch(Echo())
        retrying = dispatcher.dispatch(Flaky())
        self.assertEqual(dispatcher.stats()["running"], 2)
        self.assertEqual(dispatcher.stats()["retrying"], 1)
        dispatcher.stop()
        self.failureResultOf(running, Unavailable)
        self.failureResultOf(retrying, Unavailable)
        self.assertEqual(pending.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(dispatcher.dispatch(Echo()), Unavailable)
        dispatcher.stop()

    def test_stop_without_timeout_slot(self) -> None:
        """stop() fails retries even when the timeout slot was emptied."""
        dispatcher = self.make()
        dispatcher.remove_middleware("timeout")
        dispatcher.register(Flaky, Recorder(TransientError()))
        d = dispatcher.dispatch(Flaky())
        dispatcher.stop()
        self.failureResultOf(d, Unavailable)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# --------------------------------------------------------------------------
# The fake


class FakeDispatcherTests(SynchronousTestCase):
    def test_records_and_answers_canned(self) -> None:
        """Dispatches are recorded; canned results and failures answer by name."""
        fake = FakeCommandDispatcher()
        fake.set_result(Echo, Echoed("canned"))
        fake.set_failure("test.guarded", Locked())
        context = CommandContext(command_id="c1")
        self.assertEqual(self.successResultOf(fake.dispatch(Echo("a"), context)), Echoed("canned"))
        self.failureResultOf(fake.dispatch(Guarded()), Locked)
        self.assertEqual(fake.dispatched[0], (Echo("a"), context))
        fake.assert_dispatched(Echo("a"), "test.guarded")
        fake.assert_dispatched(Echo, Guarded)

    def test_assert_dispatched_fails_on_mismatch(self) -> None:
        """assert_dispatched raises AssertionError for other commands, order or count."""
        fake = FakeCommandDispatcher()
        fake.set_result(Echo, Done())
        self.successResultOf(fake.dispatch(Echo("a")))
        self.successResultOf(fake.dispatch(Echo("b")))
        for expected in (
            [Echo("b"), Echo("a")],
            [Echo("a")],
            [Echo, Echo, Echo],
            ["test.guarded", Echo],
        ):
            with self.assertRaises(AssertionError):
                fake.assert_dispatched(*expected)
        with self.assertRaises(AssertionError):
            fake.assert_nothing_dispatched()
        fake.clear_dispatched()
        fake.assert_nothing_dispatched()

    def test_unknown_unless_canned_or_registered(self) -> None:
        """A name with neither a canned answer nor a handler fails with UnknownCommand."""
        fake = FakeCommandDispatcher()
        self.failureResultOf(fake.dispatch(Echo()), UnknownCommand)
        fake.set_result(Echo, Done())
        self.successResultOf(fake.dispatch(Echo()))
        fake.clear(Echo)
        self.failureResultOf(fake.dispatch(Echo()), UnknownCommand)

    def test_canned_answer_beats_handler(self) -> None:
        """A canned answer is returned instead of calling the registered handler."""
        fake = FakeCommandDispatcher()
        handler = Recorder(Done())
        fake.register(Echo, handler)
        fake.set_failure(Echo, TransientError())
        self.failureResultOf(fake.dispatch(Echo()), TransientError)
        self.assertEqual(handler.calls, [])

    def test_canned_values_are_checked(self) -> None:
        """A canned result must be a Result and a canned failure an exception."""
        fake = FakeCommandDispatcher()
        with self.assertRaises(TypeError):
            fake.set_result(Echo, "not a result")  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            fake.set_failure(Echo, "not an exception")  # type: ignore[arg-type]
        with self.assertRaises(InvalidCommand):
            fake.set_result("", Done())
        self.failureResultOf(fake.dispatch(Echo()), UnknownCommand)

    def test_invalid_dispatch(self) -> None:
        """A non-command fails with InvalidCommand and is not recorded."""
        fake = FakeCommandDispatcher()
        self.failureResultOf(fake.dispatch("x"), InvalidCommand)  # type: ignore[arg-type]
        self.failureResultOf(fake.dispatch(Echo(), "ctx"), InvalidCommand)  # type: ignore[arg-type]
        fake.assert_nothing_dispatched()

    def test_middleware_runs_in_slot_order(self) -> None:
        """Installed middleware runs around canned answers in slot order; taken slots refuse."""
        fake = FakeCommandDispatcher()
        log: list[str] = []
        fake.add_middleware("policy", recording("policy", log))
        fake.add_middleware("audit", recording("audit", log))
        with self.assertRaises(DuplicateRegistration):
            fake.add_middleware("audit", recording("audit", log))
        with self.assertRaises(InvalidCommand):
            fake.add_middleware("nonsense", recording("x", log))
        fake.set_result(Echo, Done())
        self.successResultOf(fake.dispatch(Echo()))
        self.assertEqual(log, ["audit", "policy"])


# --------------------------------------------------------------------------
# Helpers


def assert_parameter_names(case: SynchronousTestCase, interface: Any, obj: object) -> None:
    """Each interface method's parameter names equal the implementation's."""
    for name in interface.names():
        declared = interface[name]
        if not hasattr(declared, "getSignatureInfo"):
            continue
        expected = list(declared.getSignatureInfo()["positional"])
        actual = [
            p.name
            for p in inspect.signature(getattr(obj, name)).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        case.assertEqual(actual, expected, f"{type(obj).__name__}.{name}")


class RegisterAllTests(SynchronousTestCase):
    def test_registers_all_and_cancels_all(self) -> None:
        """register_all registers every handler; cancel removes them, twice is harmless."""
        from piccolod.commands import Ping, Pong, RestartChild
        from piccolod.kernel.dispatcher import register_all

        dispatcher = CommandDispatcher(Clock())
        registration = register_all(
            dispatcher,
            [(Ping, lambda c, ctx: Pong()), (RestartChild, lambda c, ctx: Pong())],
        )
        self.assertEqual(dispatcher.names(), ["kernel.ping", "supervisor.restart_child"])
        registration.cancel()
        registration.cancel()
        self.assertEqual(dispatcher.names(), [])

    def test_a_taken_name_registers_nothing(self) -> None:
        """When one name is taken, none of the batch stays registered."""
        from piccolod.commands import Ping, Pong, RestartChild
        from piccolod.errors import DuplicateRegistration
        from piccolod.kernel.dispatcher import register_all

        dispatcher = CommandDispatcher(Clock())
        dispatcher.register(RestartChild, lambda c, ctx: Pong())
        with self.assertRaises(DuplicateRegistration):
            register_all(
                dispatcher,
                [(Ping, lambda c, ctx: Pong()), (RestartChild, lambda c, ctx: Pong())],
            )
        self.assertEqual(dispatcher.names(), ["supervisor.restart_child"])


# --------------------------------------------------------------------------
# The same gate, timeout, retry and idempotency tests on the generic chain
#
# Adjacent slots holding the built-in lock, leader, timeout and retry
# middleware are composed into one step; a middleware of another type in one
# of those slots (here a LockGate subclass) splits the run, and the gates then
# compose as separate steps.  Both must behave alike.


@attrs.frozen(eq=False)
class PlainLockGate(LockGate):
    """A ``LockGate`` the dispatcher does not recognise as built-in: it composes on its own."""


class Unfused:
    """Mixin: the dispatcher under test composes its gates generically."""

    def make(self, bus: FakeEventBus | None = None, **kwargs: Any) -> CommandDispatcher:
        dispatcher = super().make(bus, **kwargs)  # type: ignore[misc]
        assert isinstance(dispatcher, CommandDispatcher)
        gate = dispatcher.remove_middleware("lock")
        assert type(gate) is LockGate
        dispatcher.add_middleware("lock", PlainLockGate(dispatcher.bus))
        return dispatcher


class UnfusedIdempotencyTests(Unfused, IdempotencyTests):
    pass


class UnfusedLockGateTests(Unfused, LockGateTests):
    pass


class UnfusedLeaderGateTests(Unfused, LeaderGateTests):
    pass


class UnfusedTimeoutTests(Unfused, TimeoutTests):
    pass


class UnfusedRetryTests(Unfused, RetryTests):
    pass
