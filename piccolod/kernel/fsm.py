"""
One table-driven state machine helper for the whole code base.

A :class:`Machine` is a name, an initial state and a transition table
``{(state, trigger): next_state}``.  States are strings or members of one
``Enum`` (``LockState``, app and job states); triggers are strings.
:meth:`Machine.fire` either performs the transition the table names or
raises :class:`~piccolod.errors.IllegalTransition` (HTTP 409) and leaves the
state unchanged.  Each transition:

1. commits the new state and appends it to the bounded :attr:`~Machine.history`
   (with the injected clock's time);
2. calls the ``on_exit`` callbacks of the old state, then the ``on_enter``
   callbacks of the new state, then the machine's ``on_transition`` hook;
3. publishes :class:`~piccolod.events.StateTransition` on the bus.

Hooks observe a transition, they do not decide it: they run after the state
is committed, each receives the :class:`Transition`, and a hook that raises
is logged and isolated (the other hooks still run, the event is still
published, ``fire`` still returns the new state).

Re-entrancy: calling :meth:`~Machine.fire` from within a hook (or from a
subscriber called synchronously while a transition is in progress) is
**queued**, never nested.  Because the table is deterministic, the queued
trigger is checked at once against the state the machine will be in once
every queued trigger has run: an illegal trigger raises ``IllegalTransition``
immediately, a legal one returns the state it will lead to.  Its hooks and
event run after the current transition's hooks have finished, so hooks and
events are always seen in transition order.  While transitions are queued,
:attr:`~Machine.state` is the committed state, and :meth:`~Machine.can` /
:meth:`~Machine.allowed` answer for the state ``fire`` would start from.

Asynchronous work belongs *in* a state, not between two: the lock machine
enters ``preunlock`` before it derives keys and leaves it on ``opened`` or
``failed``.  The state is then the per-entity lock: a second ``unlock``
request meanwhile finds the machine in ``preunlock`` and is refused with
``IllegalTransition`` instead of racing the first (Home Assistant's
``SETUP_IN_PROGRESS`` lesson).

:data:`LOCK_MACHINE` is the persistence lock machine's table.
"""

from __future__ import annotations

import collections
import enum
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from piccolod.errors import IllegalTransition
from piccolod.events import LockState, StateTransition
from piccolod.interfaces import IEventBus
from piccolod.kernel.aio import provides

__all__ = [
    "LOCK_MACHINE",
    "Hook",
    "Machine",
    "Transition",
    "describe_table",
    "state_name",
]

S = TypeVar("S", bound="str | enum.Enum")


def state_name(state: str | enum.Enum) -> str:
    """The string form of a state: an Enum member's value, or the string."""
    if isinstance(state, enum.Enum):
        return str(state.value)
    return state


@attrs.frozen
class Transition(Generic[S]):
    """
    One transition that happened.

    @ivar time: the clock's time of the transition, or ``None`` without a clock.
    """

    machine: str
    previous: S
    trigger: str
    state: S
    time: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "previous": state_name(self.previous),
            "trigger": self.trigger,
            "state": state_name(self.state),
            "time": self.time,
        }


Hook = Callable[[Transition[Any]], object]


def describe_table(transitions: Mapping[tuple[Any, str], Any]) -> list[dict[str, str]]:
    """
    The rows ``{"from", "trigger", "to"}`` of a transition table, in table
    order, as plain strings (for docs and the API).
    """
    return [
        {"from": state_name(src), "trigger": trigger, "to": state_name(dst)}
        for (src, trigger), dst in transitions.items()
    ]


def _check_table(name: str, initial: Any, transitions: Mapping[tuple[Any, str], Any]) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError("a machine needs a non-empty name")
    kind: type[Any] = type(initial) if isinstance(initial, enum.Enum) else str
    if not isinstance(initial, kind):
        raise TypeError(f"{name}: states must be str or Enum members, got {initial!r}")
    if not transitions:
        raise ValueError(f"{name}: the transition table is empty")
    for key, target in transitions.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"{name}: table keys must be (state, trigger) pairs, got {key!r}")
        source, trigger = key
        if not isinstance(trigger, str) or not trigger:
            raise TypeError(f"{name}: trigger must be a non-empty string, got {trigger!r}")
        for state in (source, target):
            if not isinstance(state, kind):
                raise TypeError(
                    f"{name}: state {state!r} is not a {kind.__name__} like {initial!r}"
                )


def _read_only_copy(table: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return types.MappingProxyType(dict(table))


@attrs.define(eq=False)
class Machine(Generic[S]):
    """
    A named state machine driven by a transition table.

    @ivar name: names the machine in events, logs and errors.
    @ivar transitions: ``{(state, trigger): next_state}``, copied read-only.
    @ivar bus: where ``StateTransition`` events go (``None``: nowhere).
    @ivar clock: stamps the history (``None``: times are ``None``).
    @ivar on_transition: called with every :class:`Transition`, after the
        state's ``on_exit``/``on_enter`` callbacks.
    @ivar history_size: how many transitions :attr:`history` keeps.
    """

    log = Logger()

    name: str
    initial: S
    transitions: Mapping[tuple[S, str], S] = attrs.field(converter=_read_only_copy)
    bus: IEventBus | None = attrs.field(
        default=None, kw_only=True, validator=attrs.validators.optional(provides(IEventBus))
    )
    clock: IReactorTime | None = attrs.field(
        default=None, kw_only=True, validator=attrs.validators.optional(provides(IReactorTime))
    )
    on_transition: Callable[[Transition[S]], object] | None = attrs.field(
        default=None, kw_only=True
    )
    history_size: int = attrs.field(default=100, kw_only=True)
    _state: S = attrs.field(init=False)
    _history: collections.deque[Transition[S]] = attrs.field(init=False)
    _on_enter: dict[S, list[Callable[[Transition[S]], object]]] = attrs.field(
        init=False, factory=dict
    )
    _on_exit: dict[S, list[Callable[[Transition[S]], object]]] = attrs.field(
        init=False, factory=dict
    )
    #: Triggers fired from within a hook, run once the current one is done.
    _pending: collections.deque[str] = attrs.field(init=False, factory=collections.deque)
    _busy: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        _check_table(self.name, self.initial, self.transitions)
        if self.history_size < 0:
            raise ValueError(f"{self.name}: history_size must be >= 0")
        self._state = self.initial
        self._history = collections.deque(maxlen=self.history_size)

    # -- reading ------------------------------------------------------------

    @property
    def state(self) -> S:
        """The committed current state."""
        return self._state

    @property
    def history(self) -> tuple[Transition[S], ...]:
        """The last ``history_size`` transitions, oldest first."""
        return tuple(self._history)

    def states(self) -> list[S]:
        """Every state the table mentions (and the initial one), first seen first."""
        seen: dict[S, None] = {self.initial: None}
        for (source, _), target in self.transitions.items():
            seen.setdefault(source, None)
            seen.setdefault(target, None)
        return list(seen)

    def can(self, trigger: str) -> bool:
        """Whether :meth:`fire` would accept ``trigger`` now."""
        return (self._projected(), trigger) in self.transitions

    def allowed(self) -> list[str]:
        """The triggers :meth:`fire` would accept now, in table order."""
        current = self._projected()
        return [trigger for (source, trigger) in self.transitions if source == current]

    def is_final(self) -> bool:
        """True when no trigger leads out of the state ``fire`` would start from."""
        return not self.allowed()

    def describe(self) -> list[dict[str, str]]:
        """The table as ``{"from", "trigger", "to"}`` rows (see :func:`describe_table`)."""
        return describe_table(self.transitions)

    def to_json(self) -> dict[str, Any]:
        """The machine's name, state, allowed triggers and recent history."""
        return {
            "machine": self.name,
            "state": state_name(self._state),
            "allowed": self.allowed(),
            "history": [t.to_json() for t in self._history],
        }

    # -- hooks ----------------------------------------------------------------

    def on_enter(self, state: S, callback: Callable[[Transition[S]], object]) -> None:
        """Call ``callback(transition)`` whenever the machine enters ``state``."""
        self._check_state(state)
        self._on_enter.setdefault(state, []).append(callback)

    def on_exit(self, state: S, callback: Callable[[Transition[S]], object]) -> None:
        """Call ``callback(transition)`` whenever the machine leaves ``state``."""
        self._check_state(state)
        self._on_exit.setdefault(state, []).append(callback)

    def _check_state(self, state: S) -> None:
        if state not in self.states():
            raise ValueError(f"{self.name}: unknown state {state!r}")

    # -- firing ---------------------------------------------------------------

    def fire(self, trigger: str) -> S:
        """
        Perform the transition the table names for ``trigger`` from the
        current state and return the new state.  From within a hook the
        trigger is queued (see the module docstring) and the state it will
        lead to is returned.

        @raise IllegalTransition: the table has no such transition; the
            state is unchanged.
        """
        source = self._projected()
        target = self.transitions.get((source, trigger))
        if target is None:
            raise IllegalTransition(self.name, state_name(source), str(trigger))
        if self._busy:
            self._pending.append(trigger)
            return target
        self._busy = True
        try:
            self._apply(trigger)
            while self._pending:
                self._apply(self._pending.popleft())
        finally:
            self._busy = False
            self._pending.clear()
        return target

    def _projected(self) -> S:
        state = self._state
        for trigger in self._pending:
            state = self.transitions[(state, trigger)]
        return state

    def _apply(self, trigger: str) -> None:
        previous = self._state
        target = self.transitions[(previous, trigger)]
        transition = Transition(
            machine=self.name,
            previous=previous,
            trigger=trigger,
            state=target,
            time=self.clock.seconds() if self.clock is not None else None,
        )
        self._state = target
        self._history.append(transition)
        # No log line here: the StateTransition event and the history are
        # the record (logging every transition costs more than the rest).
        hooks: list[Callable[[Transition[S]], object]] = [
            *self._on_exit.get(previous, ()),
            *self._on_enter.get(target, ()),
        ]
        if self.on_transition is not None:
            hooks.append(self.on_transition)
        for hook in hooks:
            try:
                hook(transition)
            except Exception:
                self.log.failure(
                    "{machine}: hook {hook!r} failed on {previous} -> {state}",
                    machine=self.name,
                    hook=hook,
                    previous=state_name(previous),
                    state=state_name(target),
                )
        if self.bus is not None:
            self.bus.publish(
                StateTransition(
                    machine=self.name,
                    previous=state_name(previous),
                    state=state_name(target),
                    trigger=trigger,
                ),
                source=self.name,
            )


def _freeze(
    rows: Iterable[tuple[LockState, str, LockState]],
) -> Mapping[tuple[LockState, str], LockState]:
    return types.MappingProxyType({(src, trigger): dst for src, trigger, dst in rows})


#: The persistence lock machine: ``uninitialized → locked`` on ``setup``,
#: ``locked → preunlock`` on ``unlock``, ``preunlock → unlocked`` on
#: ``opened``, ``preunlock → locked`` on ``failed`` (nothing half-open), and
#: ``unlocked → locked`` on ``lock``.
LOCK_MACHINE: Mapping[tuple[LockState, str], LockState] = _freeze(
    [
        (LockState.UNINITIALIZED, "setup", LockState.LOCKED),
        (LockState.LOCKED, "unlock", LockState.PREUNLOCK),
        (LockState.PREUNLOCK, "opened", LockState.UNLOCKED),
        (LockState.PREUNLOCK, "failed", LockState.LOCKED),
        (LockState.UNLOCKED, "lock", LockState.LOCKED),
    ]
)
