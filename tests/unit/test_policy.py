"""Tests for piccolod.kernel.policy: roles, subjects, deny by default, quotas, audit, middleware."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import (
    CommandContext,
    GetStorageStatus,
    LockStorage,
    Ping,
    Pong,
    RunControlExport,
    RunFullExport,
    StorageStatus,
)
from piccolod.errors import ConfigError, PolicyDenied, QuotaExceeded
from piccolod.events import AuditRecord
from piccolod.kernel.bus import MemoryEventBus
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.kernel.policy import (
    DEFAULT_ROLES,
    ConcurrencyQuota,
    CountQuota,
    PolicyEngine,
    RateQuota,
    RoleSpec,
    Rule,
)


class RuleTests(SynchronousTestCase):
    def test_action_and_resource_globs(self) -> None:
        """``ACTION@RESOURCE`` matches both globs; a bare action matches any resource, even none."""
        rule = Rule.parse("persistence.*@volume:app-*")
        self.assertTrue(rule.matches("persistence.attach_volume", "volume:app-web"))
        self.assertFalse(rule.matches("persistence.attach_volume", "volume:control"))
        self.assertFalse(rule.matches("apps.install", "volume:app-web"))
        bare = Rule.parse("kernel.ping")
        self.assertTrue(bare.matches("kernel.ping", ""))
        self.assertTrue(bare.matches("kernel.ping", "anything"))
        self.assertFalse(bare.matches("kernel.pingx", ""))

    def test_globs_match_like_fnmatch(self) -> None:
        """The fast paths (exact, prefix*, *suffix, *infix*) agree with fnmatch on every case."""
        import fnmatch
        import itertools

        from piccolod.kernel.policy import compile_glob

        patterns = ["*", "**", "a", "a.*", "*.read", "*ist*", "a?c", "a*c", "[ab].x", "token:*"]
        values = ["", "a", "a.b", "x.read", "list", "abc", "a.x", "b.x", "token:1", "read"]
        for pattern, value in itertools.product(patterns, values):
            self.assertEqual(
                compile_glob(pattern).matches(value),
                fnmatch.fnmatchcase(value, pattern),
                (pattern, value),
            )

    def test_bad_rules(self) -> None:
        """Empty actions, empty resources and non-strings are refused."""
        for text in ("", "x@", "@x", 3):
            with self.assertRaises(ValueError):
                Rule.parse(text)  # type: ignore[arg-type]

    def test_deny_wins_and_nothing_is_allowed_by_default(self) -> None:
        """A role allows what an allow rule matches unless a deny rule matches too."""
        role = RoleSpec.build("r", allow=["a.*"], deny=["a.secret"])
        self.assertTrue(role.decide("a.read", "")[0])
        self.assertFalse(role.decide("a.secret", "")[0])
        self.assertFalse(role.decide("b.read", "")[0])
        self.assertFalse(RoleSpec.build("empty").decide("a.read", "")[0])


class EngineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryEventBus(self.clock)
        self.records: list[AuditRecord] = []
        self.bus.subscribe("audit", lambda e: self.records.append(e.event))
        self.tokens = {"token:v": "viewer", "token:o": "operator"}
        self.engine = PolicyEngine(self.clock, self.bus, resolve=self.tokens.get)

    def decided(self, subject: str, action: str, resource: str = "") -> bool:
        return self.engine.decide(subject, action, resource).allowed

    def test_default_roles(self) -> None:
        """admin and system may do nearly anything; operator not credentials; viewer only reads."""
        self.assertTrue(self.decided("admin", "persistence.change_password"))
        self.assertTrue(self.decided("system:apps", "store.apps.put"))
        self.assertTrue(self.decided("token:o", "persistence.lock"))
        self.assertFalse(self.decided("token:o", "persistence.change_password"))
        self.assertFalse(self.decided("token:o", "tokens.create"))
        self.assertFalse(self.decided("token:o", "events.read", "topic:audit"))
        self.assertTrue(self.decided("token:v", "persistence.status"))
        self.assertTrue(self.decided("token:v", "leadership.read"))
        self.assertTrue(self.decided("token:v", "events.read", "topic:jobs.progress"))
        self.assertFalse(self.decided("token:v", "events.read", "topic:audit"))
        self.assertFalse(self.decided("token:v", "persistence.lock"))
        self.assertFalse(self.decided("token:v", "tokens.read"))

    def test_replication_plumbing_is_for_subsystems_only(self) -> None:
        """No person, admin included, may append to or apply the replicated commit log."""
        for action in ("cluster.replicate_commit", "persistence.apply_commits"):
            for subject in ("admin", "token:o", "token:v"):
                self.assertFalse(self.decided(subject, action), (subject, action))
            self.assertTrue(self.decided("system:persistence", action))
        self.assertTrue(self.decided("admin", "cluster.read_commits"))

    def test_unknown_subjects_are_denied(self) -> None:
        """A subject without a role, or with an undefined one, is denied everything."""
        self.tokens["token:ghost"] = "ghost"
        for subject in ("anonymous", "token:nope", "token:ghost", ""):
            decision = self.engine.decide(subject, "leadership.read")
            self.assertFalse(decision.allowed, subject)
            self.assertIn(
                "deny by default" if subject != "token:ghost" else "not defined", decision.reason
            )

    def test_decisions_are_audited_with_ids(self) -> None:
        """Each decision publishes an audit record carrying its own id."""
        allowed = self.engine.decide("admin", "x.y", "r")
        denied = self.engine.decide("token:v", "persistence.lock")
        self.clock.advance(0)
        self.assertEqual(
            [(r.decision_id, r.outcome, r.action, r.resource) for r in self.records],
            [
                (allowed.decision_id, "allowed", "x.y", "r"),
                (denied.decision_id, "denied", "persistence.lock", ""),
            ],
        )
        self.assertNotEqual(allowed.decision_id, denied.decision_id)

    def test_unaudited_allowances(self) -> None:
        """With audit=False an allowance is not published, but a denial still is."""
        self.engine.decide("admin", "kernel.ping", audit=False)
        self.engine.decide("token:v", "kernel.lock", audit=False)
        self.clock.advance(0)
        self.assertEqual([r.outcome for r in self.records], ["denied"])

    def test_check_raises_with_the_decision_id(self) -> None:
        """check() raises PolicyDenied whose problem carries the decision id."""
        with self.assertRaises(PolicyDenied) as raised:
            self.engine.check("token:v", "persistence.lock")
        self.assertTrue(raised.exception.problem()["decision_id"].startswith("pd-"))

    def test_decisions_follow_the_resolver(self) -> None:
        """A token's role is looked up on every decision: a revoked token loses it at once."""
        self.assertTrue(self.decided("token:o", "persistence.lock"))
        del self.tokens["token:o"]
        self.assertFalse(self.decided("token:o", "persistence.lock"))

    def test_from_config(self) -> None:
        """Configured roles replace or add to the defaults; subjects map patterns to roles."""
        engine = PolicyEngine.from_config(
            self.clock,
            None,
            roles={"viewer": {"allow": ["leadership.read"]}, "backup": {"allow": ["*export*"]}},
            subjects={"system:remote": "viewer"},
        )
        self.assertEqual(engine.role_of("system:remote"), "viewer")
        self.assertEqual(engine.role_of("system:apps"), "system")
        self.assertFalse(engine.decide("system:remote", "persistence.status").allowed)
        self.assertIn("backup", engine.role_names())

    def test_bad_config_lists_every_problem(self) -> None:
        """Bad role names, bad rules and unknown roles are all reported together."""
        with self.assertRaises(ConfigError) as raised:
            PolicyEngine.from_config(
                self.clock,
                None,
                roles={"Bad Name": {}, "x": {"allow": [""]}, "y": {"allow": "a"}, "z": []},
                subjects={"token:*": "nope"},
            )
        self.assertEqual(len(raised.exception.errors), 5, raised.exception.errors)

    def test_defaults_are_not_shared(self) -> None:
        """Configuring one engine leaves the default role table alone."""
        PolicyEngine.from_config(self.clock, None, roles={"viewer": {"allow": []}})
        self.assertTrue(DEFAULT_ROLES["viewer"].decide("leadership.read", "")[0])


class MiddlewareTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryEventBus(self.clock)
        self.records: list[AuditRecord] = []
        self.bus.subscribe("audit", lambda e: self.records.append(e.event))
        self.dispatcher = CommandDispatcher(self.clock, self.bus)
        self.exports: list[Deferred[Any]] = []
        self.apps = 0
        self.engine = PolicyEngine(
            self.clock,
            self.bus,
            resolve={"token:v": "viewer"}.get,
            quotas=[
                ConcurrencyQuota(
                    "exports",
                    ("persistence.run_control_export", "persistence.run_full_export"),
                    1,
                ),
                CountQuota("apps", ("kernel.ping",), 3, lambda: self.apps),
            ],
        )
        self.dispatcher.add_middleware("policy", self.engine)
        self.dispatcher.register(Ping, lambda c, ctx: Pong(c.payload))
        self.dispatcher.register(
            GetStorageStatus, lambda c, ctx: StorageStatus(state="locked", initialized=True)
        )
        self.dispatcher.register(LockStorage, lambda c, ctx: StorageStatus("locked", True))
        for kind in (RunControlExport, RunFullExport):
            self.dispatcher.register(kind, self.export)

    def export(self, command: Any, context: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.exports.append(d)
        return d

    def send(self, command: Any, subject: str) -> Any:
        return self.dispatcher.dispatch(command, CommandContext(subject=subject))

    def test_dispatcher_enforces_the_policy(self) -> None:
        """Through the dispatcher a viewer may read but not lock; the kernel may do both."""
        self.successResultOf(self.send(GetStorageStatus(), "token:v"))
        failure = self.failureResultOf(self.send(LockStorage(), "token:v"), PolicyDenied)
        self.assertIn("persistence.lock", failure.value.detail)
        self.successResultOf(self.send(LockStorage(), "system:kernel"))
        self.failureResultOf(self.send(LockStorage(), "stranger"), PolicyDenied)

    def test_concurrent_exports_quota(self) -> None:
        """One export at a time: a second is refused until the first finishes, even if it fails."""
        first = self.send(RunControlExport(), "admin")
        refused = self.failureResultOf(self.send(RunFullExport(), "admin"), QuotaExceeded)
        self.assertEqual(refused.value.problem()["quota"], "exports")
        self.exports[0].errback(RuntimeError("disk full"))
        self.failureResultOf(first, RuntimeError)
        self.flushLoggedErrors(RuntimeError)
        second = self.send(RunFullExport(), "admin")
        self.assertNoResult(second)
        self.exports[1].callback(Pong("ok"))
        self.successResultOf(second)
        self.assertEqual(self.engine.quotas[0].in_flight, 0)  # type: ignore[union-attr]

    def test_count_quota_hook(self) -> None:
        """A count quota refuses matching commands while its hook counts at or over the limit."""
        self.apps = 2
        self.successResultOf(self.send(Ping(), "admin"))
        self.apps = 3
        self.failureResultOf(self.send(Ping(), "admin"), QuotaExceeded)

    def test_a_broken_quota_hook_denies(self) -> None:
        """A hook that raises counts as full (deny by default) and is logged."""

        def broken() -> int:
            raise RuntimeError("no count")

        self.engine.quotas[1] = CountQuota("apps", ("kernel.ping",), 3, broken)
        self.failureResultOf(self.send(Ping(), "admin"), QuotaExceeded)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_quota_refusals_are_audited(self) -> None:
        """A quota refusal is a denied audit record naming the quota."""
        self.send(RunControlExport(), "admin")
        self.failureResultOf(self.send(RunControlExport(), "admin"), QuotaExceeded)
        self.clock.advance(0)
        denied = [r for r in self.records if r.outcome == "denied"]
        self.assertEqual(len(denied), 1)
        self.assertIn("quota", denied[0].detail)


class RateQuotaTests(SynchronousTestCase):
    def test_token_bucket(self) -> None:
        """``burst`` requests pass at once, then ``rate`` per second; the wait is given."""
        clock = Clock()
        quota = RateQuota(clock, rate=2.0, burst=2.0)
        self.assertEqual([quota.charge("token:a") for _ in range(2)], [0.0, 0.0])
        self.assertAlmostEqual(quota.charge("token:a"), 0.5)
        self.assertEqual(quota.charge("token:b"), 0.0)
        self.assertEqual(quota.charge("admin"), 0.0)  # only token:* subjects
        clock.advance(0.5)
        self.assertEqual(quota.charge("token:a"), 0.0)

    def test_disabled_and_bounded(self) -> None:
        """rate 0 disables the quota; the bucket table stays bounded."""
        clock = Clock()
        self.assertEqual(RateQuota(clock, rate=0).charge("token:a"), 0.0)
        quota = RateQuota(clock, rate=1.0, burst=5.0, max_subjects=10)
        for i in range(100):
            quota.charge(f"token:{i}")
        self.assertLessEqual(len(quota._buckets), 10)

    def test_engine_charge_raises_and_audits(self) -> None:
        """The engine's charge() raises QuotaExceeded with retry_after and audits the refusal."""
        clock = Clock()
        bus = MemoryEventBus(clock)
        records: list[AuditRecord] = []
        bus.subscribe("audit", lambda e: records.append(e.event))
        engine = PolicyEngine(clock, bus, rate=RateQuota(clock, rate=1.0, burst=1.0))
        engine.charge("token:a")
        with self.assertRaises(QuotaExceeded) as raised:
            engine.charge("token:a")
        self.assertAlmostEqual(raised.exception.retry_after, 1.0)
        clock.advance(0)
        self.assertEqual([(r.action, r.outcome) for r in records], [("request", "denied")])
