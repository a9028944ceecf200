"""Tests for piccolod.kernel.fsm: the table-driven state machine helper."""

from __future__ import annotations

import enum
import operator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.errors import Conflict, IllegalTransition
from piccolod.events import LockState, StateTransition
from piccolod.kernel.fsm import LOCK_MACHINE, Machine, Transition, describe_table, state_name
from piccolod.testing.bus import FakeEventBus


class RecordingBus(FakeEventBus):
    """The shipped fake bus on its own clock (delivery is not under test here)."""

    def __init__(self) -> None:
        super().__init__(Clock())

    def transitions(self) -> list[tuple[str, str, str]]:
        out = []
        for envelope in self.published():
            event = envelope.event
            assert isinstance(event, StateTransition)
            out.append((event.previous, event.trigger, event.state))
        return out


JOB_TABLE: dict[tuple[str, str], str] = {
    ("queued", "start"): "running",
    ("queued", "cancel"): "cancelled",
    ("running", "succeed"): "succeeded",
    ("running", "fail"): "failed",
    ("running", "cancel"): "cancelled",
    ("failed", "retry"): "queued",
}


def lock_machine(**kwargs: Any) -> Machine[LockState]:
    return Machine("lock", LockState.UNINITIALIZED, LOCK_MACHINE, **kwargs)


class MachineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = RecordingBus()
        self.machine: Machine[str] = Machine(
            "job:1", "queued", JOB_TABLE, bus=self.bus, clock=self.clock
        )

    def test_fire_moves_and_returns_state(self) -> None:
        """fire performs the table's transition and returns the new state."""
        self.assertEqual(self.machine.state, "queued")
        self.assertEqual(self.machine.fire("start"), "running")
        self.assertEqual(self.machine.state, "running")

    def test_illegal_transition_is_typed_and_changes_nothing(self) -> None:
        """A trigger the table lacks raises IllegalTransition (409) and leaves the state."""
        error = self.assertRaises(IllegalTransition, self.machine.fire, "succeed")
        self.assertIsInstance(error, Conflict)
        self.assertEqual((error.machine, error.state, error.event), ("job:1", "queued", "succeed"))
        self.assertEqual(error.problem()["status"], 409)
        self.assertEqual(self.machine.state, "queued")
        self.assertEqual(self.bus.published(), [])
        self.assertEqual(self.machine.history, ())

    def test_unknown_trigger_is_illegal(self) -> None:
        """A trigger that appears nowhere in the table is illegal too."""
        self.assertRaises(IllegalTransition, self.machine.fire, "explode")

    def test_can_and_allowed(self) -> None:
        """can and allowed answer from the table for the current state."""
        self.assertTrue(self.machine.can("start"))
        self.assertFalse(self.machine.can("succeed"))
        self.assertEqual(self.machine.allowed(), ["start", "cancel"])
        self.machine.fire("start")
        self.assertEqual(self.machine.allowed(), ["succeed", "fail", "cancel"])
        self.assertFalse(self.machine.is_final())
        self.machine.fire("cancel")
        self.assertEqual(self.machine.allowed(), [])
        self.assertTrue(self.machine.is_final())

    def test_each_transition_publishes(self) -> None:
        """Every transition publishes one StateTransition with the machine's name."""
        self.machine.fire("start")
        self.machine.fire("fail")
        self.machine.fire("retry")
        self.assertEqual(
            self.bus.transitions(),
            [
                ("queued", "start", "running"),
                ("running", "fail", "failed"),
                ("failed", "retry", "queued"),
            ],
        )
        envelope = self.bus.published()[0]
        self.assertEqual(envelope.topic, "fsm.transition")
        self.assertEqual(envelope.event.machine, "job:1")
        self.assertEqual(envelope.event.key(), "job:1")
        self.assertEqual(envelope.context.source, "job:1")

    def test_history_has_clock_times(self) -> None:
        """History records each transition with the injected clock's time."""
        self.clock.advance(5)
        self.machine.fire("start")
        self.clock.advance(2.5)
        self.machine.fire("succeed")
        self.assertEqual(
            [(t.previous, t.trigger, t.state, t.time) for t in self.machine.history],
            [("queued", "start", "running", 5.0), ("running", "succeed", "succeeded", 7.5)],
        )

    def test_history_is_bounded(self) -> None:
        """History keeps only the last history_size transitions."""
        machine = Machine("m", "queued", JOB_TABLE, history_size=2)
        for trigger in ("start", "fail", "retry", "start"):
            machine.fire(trigger)
        self.assertEqual([t.trigger for t in machine.history], ["retry", "start"])
        self.assertIsNone(machine.history[0].time)

    def test_hooks_run_in_order_with_transition(self) -> None:
        """on_exit of the old state, on_enter of the new, then on_transition, after commit."""
        calls: list[tuple[str, str, str]] = []
        machine: Machine[str] = Machine(
            "m",
            "queued",
            JOB_TABLE,
            on_transition=lambda t: calls.append(("transition", t.trigger, machine.state)),
        )
        machine.on_exit("queued", lambda t: calls.append(("exit", t.previous, machine.state)))
        machine.on_enter("running", lambda t: calls.append(("enter", t.state, machine.state)))
        machine.on_enter("succeeded", lambda t: calls.append(("enter", t.state, machine.state)))
        machine.fire("start")
        self.assertEqual(
            calls,
            [
                ("exit", "queued", "running"),
                ("enter", "running", "running"),
                ("transition", "start", "running"),
            ],
        )

    def test_failing_hook_is_isolated(self) -> None:
        """A raising hook is logged; the transition, other hooks and the event still happen."""
        seen: list[str] = []

        def boom(_t: Transition[str]) -> None:
            raise RuntimeError("hook bug")

        self.machine.on_enter("running", boom)
        self.machine.on_enter("running", lambda t: seen.append(t.state))
        self.assertEqual(self.machine.fire("start"), "running")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(seen, ["running"])
        self.assertEqual(self.machine.state, "running")
        self.assertEqual(self.bus.transitions(), [("queued", "start", "running")])

    def test_fire_from_hook_is_queued(self) -> None:
        """A fire inside a hook returns its target at once and runs after the current hooks."""
        log: list[str] = []

        def on_running(t: Transition[str]) -> None:
            log.append(f"enter running (state={self.machine.state})")
            result = self.machine.fire("succeed")
            log.append(f"queued -> {result} (state={self.machine.state})")

        self.machine.on_enter("running", on_running)
        self.machine.on_enter("succeeded", lambda t: log.append("enter succeeded"))
        self.machine.on_transition = lambda t: log.append(f"transition {t.trigger}")
        self.assertEqual(self.machine.fire("start"), "running")
        self.assertEqual(self.machine.state, "succeeded")
        self.assertEqual(
            log,
            [
                "enter running (state=running)",
                "queued -> succeeded (state=running)",
                "transition start",
                "enter succeeded",
                "transition succeed",
            ],
        )
        self.assertEqual(
            self.bus.transitions(),
            [("queued", "start", "running"), ("running", "succeed", "succeeded")],
        )

    def test_queued_fires_are_checked_against_projected_state(self) -> None:
        """Nested fires chain from the state earlier queued triggers lead to; illegal ones raise."""
        results: list[object] = []

        def on_running(_t: Transition[str]) -> None:
            if self.machine.history[-1].trigger != "start":
                return
            results.append(self.machine.fire("fail"))
            results.append(self.machine.can("retry"))
            results.append(self.machine.allowed())
            try:
                self.machine.fire("succeed")
            except IllegalTransition as e:
                results.append(("illegal", e.state))
            results.append(self.machine.fire("retry"))

        self.machine.on_enter("running", on_running)
        self.machine.fire("start")
        self.assertEqual(results, ["failed", True, ["retry"], ("illegal", "failed"), "queued"])
        self.assertEqual(self.machine.state, "queued")
        self.assertEqual([t.trigger for t in self.machine.history], ["start", "fail", "retry"])

    def test_describe_rows(self) -> None:
        """describe returns the table as plain from/trigger/to rows in table order."""
        rows = self.machine.describe()
        self.assertEqual(rows[0], {"from": "queued", "trigger": "start", "to": "running"})
        self.assertEqual(len(rows), len(JOB_TABLE))
        self.assertEqual(
            self.machine.states(),
            ["queued", "running", "cancelled", "succeeded", "failed"],
        )

    def test_to_json(self) -> None:
        """to_json serialises name, state, allowed triggers and history."""
        self.machine.fire("start")
        body = self.machine.to_json()
        self.assertEqual(body["state"], "running")
        self.assertEqual(body["allowed"], ["succeed", "fail", "cancel"])
        self.assertEqual(body["history"][0]["trigger"], "start")

    def test_table_is_read_only_copy(self) -> None:
        """Changing the caller's dict after construction does not change the machine."""
        table = dict(JOB_TABLE)
        machine = Machine("m", "queued", table)
        table[("queued", "teleport")] = "succeeded"
        self.assertFalse(machine.can("teleport"))
        self.assertRaises(TypeError, operator.setitem, machine.transitions, ("a", "b"), "c")

    def test_bad_tables_are_refused(self) -> None:
        """Empty tables, mixed state types, bad keys and bad names are refused at construction."""

        class Colour(enum.Enum):
            RED = "red"

        bad: list[tuple[Any, Any, Any]] = [
            ("m", "a", {}),
            ("", "a", {("a", "go"): "b"}),
            ("m", "a", {("a", "go"): Colour.RED}),
            ("m", Colour.RED, {(Colour.RED, "go"): "red"}),
            ("m", "a", {("a", ""): "b"}),
            ("m", "a", {("a", 1): "b"}),
            ("m", "a", {"a": "b"}),
            ("m", 3, {(3, "go"): 4}),
        ]
        for name, initial, table in bad:
            self.assertRaises((TypeError, ValueError), Machine, name, initial, table)
        self.assertRaises(ValueError, Machine, "m", "a", {("a", "go"): "b"}, history_size=-1)
        self.assertRaises(TypeError, Machine, "m", "a", {("a", "go"): "b"}, bus=object())
        self.assertRaises(TypeError, Machine, "m", "a", {("a", "go"): "b"}, clock=object())

    def test_hook_on_unknown_state_is_refused(self) -> None:
        """Registering a hook for a state the table never mentions raises ValueError."""
        self.assertRaises(ValueError, self.machine.on_enter, "flying", lambda t: None)
        self.assertRaises(ValueError, self.machine.on_exit, "flying", lambda t: None)


class LockMachineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bus = RecordingBus()
        self.machine = lock_machine(bus=self.bus, clock=Clock())

    def test_setup_and_unlock_path(self) -> None:
        """uninitialized -setup-> locked -unlock-> preunlock -opened-> unlocked -lock-> locked."""
        for trigger, expected in [
            ("setup", LockState.LOCKED),
            ("unlock", LockState.PREUNLOCK),
            ("opened", LockState.UNLOCKED),
            ("lock", LockState.LOCKED),
        ]:
            self.assertIs(self.machine.fire(trigger), expected)
        self.assertEqual(
            self.bus.transitions(),
            [
                ("uninitialized", "setup", "locked"),
                ("locked", "unlock", "preunlock"),
                ("preunlock", "opened", "unlocked"),
                ("unlocked", "lock", "locked"),
            ],
        )

    def test_failed_unlock_returns_to_locked(self) -> None:
        """A failure during preunlock goes back to locked: nothing half-open."""
        self.machine.fire("setup")
        self.machine.fire("unlock")
        self.assertIs(self.machine.fire("failed"), LockState.LOCKED)
        self.assertEqual(self.machine.allowed(), ["unlock"])

    def test_illegal_lock_transitions(self) -> None:
        """Every trigger outside the lock table is refused with the state's value in the error."""
        legal = {(src, trig) for (src, trig) in LOCK_MACHINE}
        triggers = {trig for (_src, trig) in LOCK_MACHINE}
        for state in LockState:
            for trigger in sorted(triggers):
                if (state, trigger) in legal:
                    continue
                machine = Machine("lock", state, LOCK_MACHINE)
                error = self.assertRaises(IllegalTransition, machine.fire, trigger)
                self.assertEqual(error.state, state.value)
                self.assertIs(machine.state, state)

    def test_lock_table_rows(self) -> None:
        """The lock table describes exactly the five documented transitions."""
        self.assertEqual(
            describe_table(LOCK_MACHINE),
            [
                {"from": "uninitialized", "trigger": "setup", "to": "locked"},
                {"from": "locked", "trigger": "unlock", "to": "preunlock"},
                {"from": "preunlock", "trigger": "opened", "to": "unlocked"},
                {"from": "preunlock", "trigger": "failed", "to": "locked"},
                {"from": "unlocked", "trigger": "lock", "to": "locked"},
            ],
        )
        self.assertEqual(set(self.machine.states()), set(LockState))
        self.assertEqual(state_name(LockState.PREUNLOCK), "preunlock")

    def test_lock_table_is_immutable(self) -> None:
        """The shared LOCK_MACHINE constant cannot be modified."""
        self.assertRaises(
            TypeError, operator.setitem, LOCK_MACHINE, (LockState.LOCKED, "x"), LockState.UNLOCKED
        )

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from(["setup", "unlock", "opened", "failed", "lock", "x"])))
    def test_random_triggers_follow_table(self, triggers: list[str]) -> None:
        """Any trigger sequence moves exactly as the table says and publishes once per move."""
        bus = RecordingBus()
        machine = lock_machine(bus=bus)
        model = LockState.UNINITIALIZED
        moves = 0
        for trigger in triggers:
            target = LOCK_MACHINE.get((model, trigger))
            if target is None:
                self.assertRaises(IllegalTransition, machine.fire, trigger)
            else:
                self.assertIs(machine.fire(trigger), target)
                model = target
                moves += 1
            self.assertIs(machine.state, model)
        self.assertEqual(len(bus.published()), moves)
        self.assertEqual(len(machine.history), min(moves, 100))
