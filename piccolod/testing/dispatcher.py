"""
:class:`FakeCommandDispatcher`: an ``ICommandDispatcher`` test double that
records every dispatched command and answers with canned results.

It keeps the promises of the interface that callers rely on:

- ``register`` refuses a duplicate name with ``DuplicateRegistration`` and
  a non-command type with ``InvalidCommand``;
- ``dispatch`` never raises: a non-command fails with ``InvalidCommand``, a
  name with neither a canned answer nor a handler with ``UnknownCommand``;
- a handler is called like the real dispatcher calls it (plain value,
  Deferred or coroutine) and must produce a ``Result``;
- middleware installed with ``add_middleware`` runs, in slot order, around
  the canned answer or the handler (so a policy engine can be tested on
  it); a taken slot raises ``DuplicateRegistration``.

It has none of the real dispatcher's built-in middleware (no lock or leader
gate, no idempotency, timeouts or retries): it answers at once.

Usage::

    dispatcher = FakeCommandDispatcher()
    dispatcher.set_result(EnsureVolume, VolumeEnsured("v1"))
    dispatcher.set_failure("persistence.attach_volume", Locked())
    thing = ThingUnderTest(dispatcher)
    thing.do()
    dispatcher.assert_dispatched(EnsureVolume("v1"), "persistence.attach_volume")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.commands import Command, CommandContext, Result
from piccolod.errors import (
    DuplicateRegistration,
    InvalidCommand,
    InvalidHandlerResult,
    UnknownCommand,
)
from piccolod.interfaces import ICommandDispatcher, ICommandHandler, Middleware
from piccolod.kernel.aio import call, to_deferred
from piccolod.kernel.dispatcher import SLOTS

__all__ = ["FakeCommandDispatcher"]

#: What ``assert_dispatched`` matches a command against: an equal command,
#: a command type (any instance) or a command name.
Expected = Command | type[Command] | str


def _name_of(command: type[Command] | str) -> str:
    if isinstance(command, str):
        if not command:
            raise InvalidCommand("a command name must be non-empty")
        return command
    if isinstance(command, type) and issubclass(command, Command) and command.name:
        return command.name
    raise InvalidCommand(f"not a named command type or name: {command!r}")


def _matches(expected: Expected, command: Command) -> bool:
    if isinstance(expected, str):
        return command.name == expected
    if isinstance(expected, type):
        return isinstance(command, expected)
    return bool(expected == command)


@implementer(ICommandDispatcher)
@attrs.define(eq=False)
class FakeCommandDispatcher:
    """
    A recording ``ICommandDispatcher`` (see the module docstring).

    @ivar dispatched: every ``(command, context)`` dispatched, oldest first
        (commands refused as invalid are not recorded).
    """

    dispatched: list[tuple[Command, CommandContext]] = attrs.field(init=False, factory=list)
    _handlers: dict[str, Callable[..., Any]] = attrs.field(init=False, factory=dict)
    _canned: dict[str, Result | BaseException] = attrs.field(init=False, factory=dict)
    _slots: dict[str, Middleware | None] = attrs.field(
        init=False, factory=lambda: dict.fromkeys(SLOTS)
    )

    # -- ICommandDispatcher

    def register(
        self, command_type: type[Command], handler: ICommandHandler | Callable[..., Any]
    ) -> None:
        if not isinstance(command_type, type):
            raise InvalidCommand(f"not a command type: {command_type!r}")
        name = _name_of(command_type)
        if not callable(handler):
            raise InvalidCommand(f"the handler of {name} is not callable: {handler!r}")
        if name in self._handlers:
            raise DuplicateRegistration(f"a handler for {name} is already registered")
        self._handlers[name] = handler

    def unregister(self, command_type: type[Command]) -> None:
        if not isinstance(command_type, type):
            raise InvalidCommand(f"not a command type: {command_type!r}")
        self._handlers.pop(_name_of(command_type), None)

    def names(self) -> Sequence[str]:
        return sorted(self._handlers)

    def add_middleware(self, name: str, middleware: Middleware) -> None:
        if name not in self._slots:
            raise InvalidCommand(f"unknown middleware slot {name!r}; slots: {', '.join(SLOTS)}")
        if not callable(middleware):
            raise InvalidCommand(f"middleware {name!r} is not callable: {middleware!r}")
        if self._slots[name] is not None:
            raise DuplicateRegistration(f"the middleware slot {name!r} is taken")
        self._slots[name] = middleware

    def dispatch(self, command: Command, context: CommandContext | None = None) -> Deferred[Result]:
        if not isinstance(command, Command):
            return fail(InvalidCommand(f"not a command: {command!r}"))
        if context is None:
            context = CommandContext()
        elif not isinstance(context, CommandContext):
            return fail(InvalidCommand(f"not a command context: {context!r}"))
        self.dispatched.append((command, context))
        chain: Callable[[Command, CommandContext], Deferred[Any]] = self._answer
        for name in reversed(SLOTS):
            middleware = self._slots[name]
            if middleware is not None:
                chain = self._link(middleware, chain)
        return chain(command, context)

    # -- canned answers

    def set_result(self, command: type[Command] | str, result: Result) -> None:
        """Answer every dispatch of ``command`` (a type or name) with ``result``."""
        if not isinstance(result, Result):
            raise TypeError(f"a canned result must be a Result, not {result!r}")
        self._canned[_name_of(command)] = result

    def set_failure(self, command: type[Command] | str, error: BaseException) -> None:
        """Fail every dispatch of ``command`` (a type or name) with ``error``."""
        if not isinstance(error, BaseException):
            raise TypeError(f"a canned failure must be an exception, not {error!r}")
        self._canned[_name_of(command)] = error

    def clear(self, command: type[Command] | str) -> None:
        """Forget the canned answer of ``command``; idempotent."""
        self._canned.pop(_name_of(command), None)

    # -- assertions

    def commands(self, name: str | None = None) -> list[Command]:
        """The commands dispatched (named ``name``), oldest first."""
        return [c for c, _ in self.dispatched if name is None or c.name == name]

    def assert_dispatched(self, *expected: Expected) -> None:
        """
        Assert that exactly the commands ``expected`` were dispatched, in
        this order; each is an equal command, a command type or a name.
        """
        actual = self.commands()
        if len(actual) != len(expected) or not all(
            _matches(want, got) for want, got in zip(expected, actual, strict=True)
        ):
            raise AssertionError(
                "dispatched:\n"
                + "".join(f"  {c!r}\n" for c in actual)
                + "expected:\n"
                + "".join(f"  {e!r}\n" for e in expected)
            )

    def assert_nothing_dispatched(self) -> None:
        """Assert that no command was dispatched."""
        self.assert_dispatched()

    def clear_dispatched(self) -> None:
        """Forget what was recorded (handlers and canned answers stay)."""
        del self.dispatched[:]

    # -- internals

    @staticmethod
    def _link(
        middleware: Middleware, next: Callable[[Command, CommandContext], Deferred[Any]]
    ) -> Callable[[Command, CommandContext], Deferred[Any]]:
        def step(command: Command, context: CommandContext) -> Deferred[Any]:
            try:
                d = middleware(command, context, next)
            except BaseException:
                return fail(Failure())  # type: ignore[no-untyped-call]
            return d if isinstance(d, Deferred) else to_deferred(d)

        return step

    def _answer(self, command: Command, context: CommandContext) -> Deferred[Any]:
        canned = self._canned.get(command.name)
        if isinstance(canned, Result):
            return succeed(canned)
        if canned is not None:
            return fail(canned)
        handler = self._handlers.get(command.name)
        if handler is None:
            return fail(UnknownCommand(f"no handler for {command.name!r}"))
        return call(handler, command, context).addCallback(self._check, command)

    @staticmethod
    def _check(result: Any, command: Command) -> Result:
        if not isinstance(result, Result):
            raise InvalidHandlerResult(
                f"the handler of {command.name} returned {type(result).__name__}, not a Result",
                command=command.name,
            )
        return result
