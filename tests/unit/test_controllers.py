"""Tests for piccolod.kernel.controllers: the level-triggered controller framework."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from piccolod.errors import NotFound, TransientError
from piccolod.events import ReconcileResult
from piccolod.interfaces import Backoff, IController, IReconciler
from piccolod.kernel.controllers import (
    Condition,
    Controller,
    ObjectStatus,
    TerminalError,
    find_condition,
    is_terminal,
    set_condition,
)
from piccolod.testing.bus import FakeEventBus


class RecordingBus(FakeEventBus):
    """The shipped fake bus on its own clock (delivery is not under test here)."""

    def __init__(self) -> None:
        super().__init__(Clock())

    def results(self) -> list[ReconcileResult]:
        return [e.event for e in self.published() if isinstance(e.event, ReconcileResult)]


@implementer(IReconciler)
class FakeReconciler:
    """
    Records every reconcile.  With ``behaviour`` unset each call returns a
    Deferred the test fires with :meth:`finish` / :meth:`fail`; otherwise
    ``behaviour(key)`` is the (synchronous) result.
    """

    def __init__(
        self,
        behaviour: Callable[[str], object] | None = None,
        keys: Iterable[str] = (),
    ) -> None:
        self.behaviour = behaviour
        self.key_list: Any = list(keys)
        self.calls: list[str] = []
        self.running: dict[str, Deferred[object]] = {}
        self.max_parallel = 0
        self.overlaps: list[str] = []
        self.keys_calls = 0

    def reconcile(self, key: str) -> object:
        self.calls.append(key)
        if self.behaviour is not None:
            return self.behaviour(key)
        if key in self.running:
            self.overlaps.append(key)
        d: Deferred[object] = Deferred()
        self.running[key] = d
        self.max_parallel = max(self.max_parallel, len(self.running))
        return d

    def keys(self) -> object:
        self.keys_calls += 1
        if isinstance(self.key_list, BaseException):
            raise self.key_list
        return self.key_list

    def finish(self, key: str, result: object = None) -> None:
        self.running.pop(key).callback(result)

    def fail(self, key: str, error: BaseException) -> None:
        self.running.pop(key).errback(error)


NO_JITTER = Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.1)


class ControllerTests(SynchronousTestCase):
    def make(
        self,
        reconciler: FakeReconciler | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> Controller:
        self.clock = Clock()
        self.bus = RecordingBus()
        self.reconciler = reconciler if reconciler is not None else FakeReconciler()
        kwargs.setdefault("resync_interval", None)
        kwargs.setdefault("backoff", NO_JITTER)
        kwargs.setdefault("rand", lambda: 0.5)  # jitter term = 0
        controller = Controller("test", self.reconciler, self.clock, bus=self.bus, **kwargs)
        if start:
            controller.startService()
        self.addCleanup(self.stop, controller)
        return controller

    def stop(self, controller: Controller) -> None:
        if controller.running:
            stopped = controller.stopService()
            for key in list(self.reconciler.running):
                self.reconciler.finish(key)
            self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # -- the queue ------------------------------------------------------------

    def test_provides_interfaces(self) -> None:
        """A controller verifiably provides IController and IService."""
        from twisted.application.service import IService

        controller = self.make(start=False)
        self.assertTrue(verifyObject(IController, controller))
        self.assertTrue(verifyObject(IService, controller))

    def test_duplicate_keys_run_once(self) -> None:
        """A key queued several times before it runs is reconciled once."""
        controller = self.make(FakeReconciler(lambda key: None), start=False)
        for key in ("a", "b", "a", "a", "b"):
            controller.enqueue(key)
        self.assertEqual(controller.stats().queued, 2)
        controller.startService()
        self.assertEqual(self.reconciler.calls, ["a", "b"])

    def test_key_never_runs_twice_at_once(self) -> None:
        """A key re-added while running is not started again until its run ends."""
        controller = self.make(concurrency=4)
        controller.enqueue("a")
        controller.enqueue("a")
        controller.enqueue("a")
        self.assertEqual(self.reconciler.calls, ["a"])
        self.assertEqual(controller.in_flight(), ["a"])

    def test_readded_while_running_runs_once_more(self) -> None:
        """Adds during a run cause exactly one more run after it ends."""
        controller = self.make(concurrency=4)
        controller.enqueue("a")
        for _ in range(3):
            controller.enqueue("a")
        self.reconciler.finish("a")
        self.assertEqual(self.reconciler.calls, ["a", "a"])
        self.reconciler.finish("a")
        self.assertEqual(self.reconciler.calls, ["a", "a"])
        self.assertEqual(self.reconciler.overlaps, [])
        self.successResultOf(controller.when_idle())

    def test_concurrency_bound_and_fifo(self) -> None:
        """At most `concurrency` keys run at once; waiting keys start in FIFO order."""
        controller = self.make(concurrency=2)
        for key in "abcd":
            controller.enqueue(key)
        self.assertEqual(self.reconciler.calls, ["a", "b"])
        self.assertEqual(controller.stats().in_flight, 2)
        self.assertEqual(controller.stats().queued, 2)
        self.reconciler.finish("b")
        self.assertEqual(self.reconciler.calls, ["a", "b", "c"])
        self.reconciler.finish("a")
        self.reconciler.finish("c")
        self.reconciler.finish("d")
        self.assertEqual(self.reconciler.calls, ["a", "b", "c", "d"])
        self.assertEqual(self.reconciler.max_parallel, 2)

    def test_enqueue_after_delays(self) -> None:
        """enqueue(key, after) runs the key only once `after` seconds have passed."""
        controller = self.make(FakeReconciler(lambda key: None))
        controller.enqueue("a", 10)
        self.assertEqual(controller.stats().waiting, 1)
        self.clock.advance(9.9)
        self.assertEqual(self.reconciler.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.reconciler.calls, ["a"])
        self.assertEqual(controller.stats().waiting, 0)

    def test_earliest_delay_wins(self) -> None:
        """Of several delayed adds of one key the earliest wins and the key runs once."""
        controller = self.make(FakeReconciler(lambda key: None))
        controller.enqueue("a", 10)
        controller.enqueue("a", 5)
        controller.enqueue("a", 20)
        self.clock.advance(5)
        self.assertEqual(self.reconciler.calls, ["a"])
        self.clock.advance(100)
        self.assertEqual(self.reconciler.calls, ["a"])

    def test_bad_enqueue_arguments(self) -> None:
        """Empty or non-string keys and negative, infinite or boolean delays raise ValueError."""
        controller = self.make()
        for key, after in [
            ("", 0.0),
            (None, 0.0),
            (3, 0.0),
            ("a", -1.0),
            ("a", math.inf),
            ("a", math.nan),
            ("a", True),
            ("a", "1"),
        ]:
            self.assertRaises(ValueError, controller.enqueue, key, after)
        self.assertEqual(controller.stats().queued, 0)

    def test_constructor_validates(self) -> None:
        """Bad collaborators, concurrency and resync intervals are refused."""
        clock = Clock()
        reconciler = FakeReconciler()
        self.assertRaises(TypeError, Controller, "c", object(), clock)
        self.assertRaises(TypeError, Controller, "c", reconciler, object())
        self.assertRaises(ValueError, Controller, "", reconciler, clock)
        self.assertRaises(ValueError, Controller, "c", reconciler, clock, concurrency=0)
        self.assertRaises(ValueError, Controller, "c", reconciler, clock, resync_interval=0)
        self.assertRaises(ValueError, Controller, "c", reconciler, clock, resync_interval=-5)
        self.assertRaises(TypeError, Controller, "c", reconciler, clock, bus=object())

    def test_async_def_reconciler(self) -> None:
        """A coroutine reconcile is awaited like a Deferred one."""
        done: list[str] = []

        async def reconcile(key: str) -> None:
            done.append(key)

        controller = self.make(FakeReconciler(reconcile))
        controller.enqueue("a")
        self.assertEqual(done, ["a"])
        self.assertEqual(controller.stats().succeeded, 1)

    # -- errors and backoff -----------------------------------------------------

    def test_backoff_grows_and_caps(self) -> None:
        """Consecutive failures are retried after 1, 2, 4, 8, 8 seconds (capped)."""

        def fail(key: str) -> None:
            raise TransientError("flaky")

        controller = self.make(FakeReconciler(fail))
        controller.enqueue("a")
        self.assertEqual(len(self.reconciler.calls), 1)
        for delay in (1.0, 2.0, 4.0, 8.0, 8.0):
            self.clock.advance(delay - 0.001)
            before = len(self.reconciler.calls)
            self.clock.advance(0.001)
            self.assertEqual(len(self.reconciler.calls), before + 1, delay)
        self.assertEqual(controller.failures("a"), 6)
        self.assertEqual(controller.stats().retries, 6)
        self.assertEqual([r.requeue_after for r in self.bus.results()][:3], [1.0, 2.0, 4.0])

    def test_backoff_jitter(self) -> None:
        """The retry delay is spread by the jitter fraction around the base delay."""
        for rand, expected in ((0.0, 0.9), (1.0, 1.1)):

            def fail(key: str) -> None:
                raise TransientError("flaky")

            controller = self.make(FakeReconciler(fail), rand=lambda r=rand: r)
            controller.enqueue("a")
            [result] = self.bus.results()
            self.assertAlmostEqual(result.requeue_after or 0, expected)
            self.stop(controller)

    def test_success_resets_backoff(self) -> None:
        """A success forgets the key's failures, so the next failure waits the initial delay."""
        outcomes = iter([TransientError("1"), TransientError("2"), None, TransientError("3")])

        def flaky(key: str) -> None:
            outcome = next(outcomes)
            if outcome is not None:
                raise outcome

        controller = self.make(FakeReconciler(flaky))
        controller.enqueue("a")
        self.clock.advance(1)  # retry 1 fails -> wait 2
        self.assertEqual(controller.failures("a"), 2)
        self.clock.advance(2)  # succeeds
        self.assertEqual(controller.failures("a"), 0)
        controller.enqueue("a")  # fails -> wait 1 again
        self.assertEqual(controller.failures("a"), 1)
        self.assertEqual(self.bus.results()[-1].requeue_after, 1.0)

    def test_untyped_error_is_logged_and_retried(self) -> None:
        """A bug (untyped exception) is logged with its traceback and retried with backoff."""
        calls = iter([RuntimeError("bug"), None])

        def buggy(key: str) -> None:
            error = next(calls)
            if error is not None:
                raise error

        controller = self.make(FakeReconciler(buggy))
        controller.enqueue("a")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(1)
        self.assertEqual(self.reconciler.calls, ["a", "a"])
        self.assertEqual(controller.stats().succeeded, 1)

    def test_terminal_error_not_retried(self) -> None:
        """A terminal error is reported but not retried until the key is enqueued again."""

        def broken(key: str) -> None:
            raise TerminalError("bad spec")

        controller = self.make(FakeReconciler(broken))
        controller.enqueue("a")
        self.clock.advance(1000)
        self.assertEqual(self.reconciler.calls, ["a"])
        stats = controller.stats()
        self.assertEqual((stats.terminal, stats.retries, stats.waiting), (1, 0, 0))
        self.assertEqual(controller.failures("a"), 0)
        [result] = self.bus.results()
        self.assertFalse(result.ok)
        self.assertIsNone(result.requeue_after)
        self.assertIn("TerminalError: bad spec", result.error or "")
        controller.enqueue("a")
        self.assertEqual(self.reconciler.calls, ["a", "a"])

    def test_terminal_attribute_on_any_error(self) -> None:
        """Any exception with terminal = True is terminal; retryable typed errors are not."""

        class Gone(NotFound):
            terminal = True

        self.assertTrue(is_terminal(Gone("x")))
        self.assertTrue(is_terminal(TerminalError()))
        self.assertFalse(is_terminal(NotFound("x")))
        self.assertFalse(is_terminal(TransientError()))

        def gone(key: str) -> None:
            raise Gone("no such app")

        controller = self.make(FakeReconciler(gone))
        controller.enqueue("a")
        self.clock.advance(1000)
        self.assertEqual(self.reconciler.calls, ["a"])

    def test_bad_return_value_is_an_error(self) -> None:
        """A reconcile returning something other than None or seconds counts as an error."""
        results = iter(["yes", -1, None])
        controller = self.make(FakeReconciler(lambda key: next(results)))
        controller.enqueue("a")
        self.assertEqual(controller.failures("a"), 1)
        self.assertIn("returned 'yes'", self.bus.results()[0].error or "")
        self.clock.advance(1)
        self.assertEqual(controller.failures("a"), 2)
        self.clock.advance(2)
        self.assertEqual(controller.failures("a"), 0)
        self.assertEqual(len(self.reconciler.calls), 3)

    def test_errors_by_key_is_bounded(self) -> None:
        """The per-key error counts keep only the most recently failing keys."""

        def fail(key: str) -> None:
            raise TerminalError("no")

        controller = self.make(FakeReconciler(fail), max_error_keys=3)
        for key in "abcde":
            controller.enqueue(key)
        controller.enqueue("c")
        self.assertEqual(controller.stats().errors_by_key, (("d", 1), ("e", 1), ("c", 2)))
        self.assertEqual(controller.stats().to_json()["errors_by_key"], {"d": 1, "e": 1, "c": 2})

    # -- requeue -----------------------------------------------------------------

    def test_requeue_after(self) -> None:
        """A numeric result reconciles the key again after that many seconds, without backoff."""
        controller = self.make()
        controller.enqueue("a")
        self.reconciler.finish("a", 30)
        self.clock.advance(29)
        self.assertEqual(self.reconciler.calls, ["a"])
        self.clock.advance(1)
        self.assertEqual(self.reconciler.calls, ["a", "a"])
        self.assertEqual(controller.failures("a"), 0)
        [result] = self.bus.results()
        self.assertEqual((result.ok, result.requeue_after, result.error), (True, 30.0, None))
        self.assertEqual(controller.stats().requeues, 1)

    def test_requeue_zero_yields_to_reactor(self) -> None:
        """A requeue after 0 s goes through the clock instead of running again synchronously."""
        outcomes = iter([0, 0, None])
        controller = self.make(FakeReconciler(lambda key: next(outcomes)))
        controller.enqueue("a")
        self.assertEqual(len(self.reconciler.calls), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        self.assertEqual(len(self.reconciler.calls), 3)
        self.successResultOf(controller.when_idle())
        self.assertEqual(controller.stats().requeues, 2)

    def test_turn_budget(self) -> None:
        """At most turn_budget synchronous reconciles start per turn; the rest on the next."""
        controller = self.make(FakeReconciler(lambda key: None), start=False, turn_budget=100)
        for i in range(250):
            controller.enqueue(f"k{i}")
        controller.startService()
        self.assertEqual(len(self.reconciler.calls), 100)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertNoResult(controller.when_idle())
        self.clock.advance(0)
        self.assertEqual(len(self.reconciler.calls), 250)
        self.assertEqual(self.reconciler.calls, [f"k{i}" for i in range(250)])
        self.successResultOf(controller.when_idle())

    # -- resync --------------------------------------------------------------------

    def test_periodic_resync(self) -> None:
        """Start lists every key at once and again every resync_interval seconds."""
        controller = self.make(
            FakeReconciler(lambda key: None, keys=["a", "b"]), resync_interval=60.0
        )
        self.assertEqual(self.reconciler.calls, ["a", "b"])
        self.clock.advance(59)
        self.assertEqual(self.reconciler.calls, ["a", "b"])
        self.clock.advance(1)
        self.assertEqual(self.reconciler.calls, ["a", "b", "a", "b"])
        self.assertEqual(controller.stats().reconciles, 4)

    def test_no_periodic_resync(self) -> None:
        """With resync_interval=None only the start-up resync happens."""
        self.make(FakeReconciler(lambda key: None, keys=["a"]), resync_interval=None)
        self.clock.advance(10_000)
        self.assertEqual(self.reconciler.calls, ["a"])
        self.assertEqual(self.reconciler.keys_calls, 1)

    def test_failing_resync_keeps_going(self) -> None:
        """A keys() failure is logged, retried with backoff, and periodic resyncs go on."""
        reconciler = FakeReconciler(lambda key: None)
        reconciler.key_list = RuntimeError("store down")
        self.make(reconciler, resync_interval=60.0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        reconciler.key_list = ["a"]
        self.clock.advance(1)  # the retry, well before the next period
        self.assertEqual(reconciler.calls, ["a"])
        self.clock.advance(60)
        self.assertEqual(reconciler.calls, ["a", "a"])

    def test_resync_fails_for_bad_listing(self) -> None:
        """resync() fails with TypeError when keys() returns no iterable; bad keys are skipped."""
        controller = self.make(FakeReconciler(lambda key: None))
        self.reconciler.key_list = 42
        self.failureResultOf(controller.resync(), TypeError)
        self.reconciler.key_list = "ab"
        self.failureResultOf(controller.resync(), TypeError)
        self.reconciler.key_list = ["a", "", None, "b"]
        self.successResultOf(controller.resync())
        self.assertEqual(self.reconciler.calls, ["a", "b"])

    # -- idle, stop ----------------------------------------------------------------

    def test_when_idle(self) -> None:
        """when_idle fires at once when idle, else once the queue drains and nothing runs."""
        controller = self.make(concurrency=1)
        self.successResultOf(controller.when_idle())
        controller.enqueue("a")
        controller.enqueue("b")
        idle = controller.when_idle()
        self.reconciler.finish("a")
        self.assertNoResult(idle)
        self.reconciler.finish("b")
        self.successResultOf(idle)

    def test_when_idle_ignores_delayed_keys(self) -> None:
        """Keys waiting for a delay do not keep the controller from being idle."""
        controller = self.make()
        controller.enqueue("a", 100)
        self.successResultOf(controller.when_idle())

    def test_when_idle_cancel(self) -> None:
        """Cancelling a when_idle waiter fails it with CancelledError and forgets it."""
        controller = self.make()
        controller.enqueue("a")
        idle = controller.when_idle()
        idle.cancel()
        self.failureResultOf(idle, CancelledError)
        self.reconciler.finish("a")

    def test_stop_waits_for_in_flight(self) -> None:
        """stopService fires only after in-flight reconciles end, and starts nothing new."""
        controller = self.make(concurrency=1)
        controller.enqueue("a")
        controller.enqueue("b")
        stopped = controller.stopService()
        self.assertNoResult(stopped)
        self.reconciler.finish("a")
        self.successResultOf(stopped)
        self.assertEqual(self.reconciler.calls, ["a"])
        self.assertEqual(controller.stats().queued, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_timers_and_restart_keeps_delays(self) -> None:
        """Stop cancels backoff and resync timers; a restart reschedules the remaining delay."""
        controller = self.make(resync_interval=60.0)
        controller.enqueue("a")
        self.reconciler.fail("a", TransientError("x"))  # retry in 1 s
        self.clock.advance(0.25)
        self.successResultOf(controller.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(controller.stats().waiting, 1)
        self.clock.advance(10)
        controller.startService()
        self.assertEqual(self.reconciler.calls, ["a"])
        self.clock.advance(0.75)
        self.assertEqual(self.reconciler.calls, ["a", "a"])

    def test_failure_after_stop_schedules_no_timer(self) -> None:
        """An in-flight reconcile that fails after stop leaves no timer behind."""
        controller = self.make()
        controller.enqueue("a")
        stopped = controller.stopService()
        self.reconciler.fail("a", TransientError("late"))
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(controller.stats().waiting, 1)

    def test_start_twice_is_harmless(self) -> None:
        """A second startService neither resyncs again nor adds a second resync loop."""
        controller = self.make(FakeReconciler(lambda key: None, keys=["a"]), resync_interval=60.0)
        controller.startService()
        self.assertEqual(self.reconciler.keys_calls, 1)
        self.clock.advance(60)
        self.assertEqual(self.reconciler.keys_calls, 2)

    def test_stop_when_idle_is_immediate(self) -> None:
        """Stopping an idle controller fires at once."""
        controller = self.make()
        self.successResultOf(controller.stopService())

    def test_reconcile_results_published(self) -> None:
        """Each reconcile publishes a ReconcileResult keyed by controller and key."""
        controller = self.make()
        controller.enqueue("a")
        self.reconciler.finish("a")
        controller.enqueue("b")
        self.reconciler.fail("b", TransientError("nope"))
        ok, failed = self.bus.results()
        self.assertEqual(
            (ok.controller, ok.reconcile_key, ok.ok, ok.error), ("test", "a", True, None)
        )
        self.assertEqual(ok.key(), "test/a")
        self.assertFalse(failed.ok)
        self.assertEqual(failed.error, "TransientError: nope")
        self.assertEqual(self.bus.published()[0].context.source, "controller:test")


# --------------------------------------------------------------------------
# Conditions


class ConditionTests(SynchronousTestCase):
    def test_new_condition_gets_now(self) -> None:
        """A condition of a new type is appended with last_transition_time = now."""
        out = set_condition((), Condition("Ready", "False", reason="Starting"), now=10.0)
        self.assertEqual(out, (Condition("Ready", "False", 0, 10.0, "Starting"),))

    def test_same_status_keeps_transition_time(self) -> None:
        """Same status keeps last_transition_time; the other fields are updated."""
        first = set_condition((), Condition("Ready", "False", reason="A"), now=10.0)
        second = set_condition(
            first, Condition("Ready", "False", 3, reason="B", message="m"), now=20.0
        )
        self.assertEqual(second, (Condition("Ready", "False", 3, 10.0, "B", "m"),))

    def test_status_change_sets_transition_time(self) -> None:
        """Changing the status sets last_transition_time to now and keeps other conditions."""
        conditions = set_condition((), Condition("Degraded", "False"), now=1.0)
        conditions = set_condition(conditions, Condition("Ready", "False"), now=2.0)
        conditions = set_condition(conditions, Condition("Ready", "True"), now=5.0)
        self.assertEqual(
            [(c.type, c.status, c.last_transition_time) for c in conditions],
            [("Degraded", "False", 1.0), ("Ready", "True", 5.0)],
        )
        found = find_condition(conditions, "Ready")
        self.assertEqual(found.status if found else None, "True")
        self.assertIsNone(find_condition(conditions, "Missing"))

    def test_condition_validates(self) -> None:
        """A status other than True/False/Unknown or an empty type is refused."""
        self.assertRaises(ValueError, Condition, "Ready", "true")
        self.assertRaises(ValueError, Condition, "", "True")
        self.assertEqual(Condition("Ready", "Unknown").to_json()["status"], "Unknown")

    def test_object_status(self) -> None:
        """ObjectStatus is stale until the latest generation is observed, and carries conditions."""
        status = ObjectStatus(generation=3, observed_generation=2)
        self.assertTrue(status.is_stale())
        status = status.observed().with_condition(Condition("Ready", "True", 3), now=7.0)
        self.assertFalse(status.is_stale())
        self.assertEqual(status.condition("Ready"), Condition("Ready", "True", 3, 7.0))
        self.assertEqual(
            status.to_json(),
            {
                "generation": 3,
                "observed_generation": 3,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "observed_generation": 3,
                        "last_transition_time": 7.0,
                        "reason": "",
                        "message": "",
                    }
                ],
            },
        )
        self.assertTrue(status.observed(1).is_stale())


# --------------------------------------------------------------------------
# Stateful property test

KEYS = ("a", "b", "c")


class ControllerMachine(RuleBasedStateMachine):
    """Random adds, delays, completions and time keep the queue's promises."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.reconciler = FakeReconciler()
        self.controller = Controller(
            "prop",
            self.reconciler,
            self.clock,
            concurrency=2,
            backoff=Backoff(initial=0.5, maximum=4.0, factor=2.0, jitter=0.2),
            resync_interval=None,
            rand=lambda: 0.5,
        )
        self.controller.startService()
        #: key -> index into reconciler.calls at its latest enqueue: a run of
        #: the key must start at or after that index (level-triggered liveness).
        self.owed: dict[str, int] = {}

    @rule(key=st.sampled_from(KEYS))
    def enqueue(self, key: str) -> None:
        self.owed[key] = len(self.reconciler.calls)
        self.controller.enqueue(key)

    @rule(key=st.sampled_from(KEYS), after=st.floats(min_value=0.01, max_value=5))
    def enqueue_later(self, key: str, after: float) -> None:
        self.owed[key] = len(self.reconciler.calls)
        self.controller.enqueue(key, after)

    @precondition(lambda self: bool(self.reconciler.running))
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "error", "requeue"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        key = data.draw(st.sampled_from(sorted(self.reconciler.running)))
        if outcome == "ok":
            self.reconciler.finish(key)
        elif outcome == "requeue":
            self.reconciler.finish(key, 1.5)
        else:
            self.reconciler.fail(key, TransientError("x"))

    @rule(dt=st.floats(min_value=0, max_value=3))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)

    @invariant()
    def never_concurrent_per_key(self) -> None:
        assert self.reconciler.overlaps == []

    @invariant()
    def concurrency_bounded(self) -> None:
        assert len(self.reconciler.running) <= 2
        assert self.controller.stats().in_flight == len(self.reconciler.running)

    @invariant()
    def work_conserving(self) -> None:
        # A free worker never sits idle while a key is ready.
        stats = self.controller.stats()
        if stats.queued:
            assert stats.in_flight == 2

    def teardown(self) -> None:
        # Let everything succeed: every enqueue must be followed by a run.
        for _ in range(100):
            for key in list(self.reconciler.running):
                self.reconciler.finish(key)
            stats = self.controller.stats()
            if not (self.reconciler.running or stats.queued or stats.waiting):
                break
            self.clock.advance(5)
        calls = self.reconciler.calls
        for key, index in self.owed.items():
            assert key in calls[index:], (key, index, calls)
        stopped = self.controller.stopService()
        assert stopped.called
        assert self.clock.getDelayedCalls() == []


ControllerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
TestControllerMachine = ControllerMachine.TestCase


class ResyncRetryTests(SynchronousTestCase):
    def test_a_failed_resync_is_retried_with_backoff(self) -> None:
        """A resync that fails (runtime still starting) is retried soon, not a period later."""
        from piccolod.errors import NotReady
        from piccolod.interfaces import Backoff

        clock = Clock()
        reconciled: list[str] = []
        state = {"ready": False}

        from zope.interface import implementer

        from piccolod.interfaces import IReconciler

        @implementer(IReconciler)
        class Source:
            def keys(self) -> list[str]:
                if not state["ready"]:
                    raise NotReady("the container runtime is still starting")
                return ["a", "b"]

            def reconcile(self, key: str) -> None:
                reconciled.append(key)

        controller = Controller(
            "retry", Source(), clock, backoff=Backoff(1.0, 8.0, 2.0, 0.0), resync_interval=300.0
        )
        controller.startService()
        clock.advance(0)
        self.assertEqual(reconciled, [])
        clock.advance(1.0)  # first retry: still failing
        state["ready"] = True
        clock.advance(2.0)  # second retry after 2 s: succeeds
        clock.advance(0)
        self.assertEqual(sorted(reconciled), ["a", "b"])
        self.successResultOf(controller.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])
