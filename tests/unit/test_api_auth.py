"""Tests for piccolod.api.auth: the session store, the token store and the login limiter."""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.api.auth import LoginLimiter, SessionStore, TokenStore, sha256_hex, split_token
from piccolod.errors import Conflict, NotFound, RateLimited


class SessionStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = SessionStore(self.clock, idle_timeout=10, absolute_timeout=100, max_sessions=3)

    def test_only_the_hash_is_kept(self) -> None:
        """The store keys sessions by the SHA-256 of the cookie value, never the value."""
        value, session = self.store.create()
        self.assertEqual(session.key, sha256_hex(value))
        self.assertNotIn(value, repr(self.store._sessions))
        self.assertIs(self.store.get(value), session)

    def test_idle_and_absolute_timeouts(self) -> None:
        """Use postpones the idle timeout but never the absolute one."""
        value, _ = self.store.create()
        for _ in range(9):
            self.clock.advance(9.9)
            self.assertIsNotNone(self.store.get(value))
        self.clock.advance(9.9)
        self.assertIsNotNone(self.store.get(value))
        self.clock.advance(1.0)  # 100.0 since creation
        self.assertIsNone(self.store.get(value))
        other, _ = self.store.create()
        self.clock.advance(10)
        self.assertIsNone(self.store.get(other))

    def test_bounded(self) -> None:
        """Past max_sessions the least recently used session goes."""
        values = [self.store.create()[0] for _ in range(3)]
        self.clock.advance(1)
        self.store.get(values[0])
        self.store.create()
        self.assertIsNotNone(self.store.get(values[0]))
        self.assertIsNone(self.store.get(values[1]))
        self.assertEqual(len(self.store), 3)

    def test_revoke_all_and_bad_values(self) -> None:
        """revoke_all ends every session; empty or oversized values are no session."""
        value, _ = self.store.create()
        self.assertEqual(self.store.revoke_all(), 1)
        self.assertIsNone(self.store.get(value))
        self.assertIsNone(self.store.get(""))
        self.assertIsNone(self.store.get("x" * 1000))

    def test_cookie(self) -> None:
        """The cookie is HttpOnly, SameSite=Strict, Path=/, and Secure only when asked."""
        self.assertEqual(
            self.store.cookie("v", secure=False),
            "piccolod_session=v; Path=/; Max-Age=100; HttpOnly; SameSite=Strict",
        )
        self.assertTrue(self.store.cookie("v", secure=True).endswith("; Secure"))


class TokenStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.path = Path(self.mktemp()) / "api" / "tokens.json"
        self.store = TokenStore(self.clock, self.path)

    def test_create_verify_revoke(self) -> None:
        """A created token verifies; a tampered or revoked one does not."""
        token, record = self.successResultOf(self.store.create("ci", "viewer"))
        self.assertEqual(self.store.verify(token), record)
        self.assertIsNone(self.store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")))
        self.assertIsNone(self.store.verify("nonsense"))
        self.successResultOf(self.store.revoke(record.id))
        self.assertIsNone(self.store.verify(token))
        self.failureResultOf(self.store.revoke(record.id), NotFound)

    def test_file_holds_hashes_only_and_reloads(self) -> None:
        """The file has the SHA-256 of each token, never the token; a new store reloads it."""
        token, record = self.successResultOf(self.store.create("ci", "admin", 3600))
        text = self.path.read_text()
        self.assertNotIn(token, text)
        parts = split_token(token)
        assert parts is not None
        self.assertNotIn(parts[1], text)
        self.assertEqual(json.loads(text)["tokens"][0]["sha256"], sha256_hex(token))
        again = TokenStore(self.clock, self.path)
        again.load()
        self.assertEqual(again.verify(token), record)
        self.assertEqual(again.role_for_subject(f"token:{record.id}"), "admin")
        self.clock.advance(3600)
        self.assertIsNone(again.verify(token))
        self.assertIsNone(again.role_for_subject(f"token:{record.id}"))

    def test_a_failed_write_changes_nothing(self) -> None:
        """When the file cannot be written the token does not exist (memory follows disk)."""

        def broken(fn: object) -> Deferred[None]:
            return fail(OSError("disk full"))

        store = TokenStore(self.clock, self.path, run_blocking=broken)
        self.failureResultOf(store.create("ci", "viewer"), OSError)
        self.assertEqual(store.records(), [])
        self.assertFalse(self.path.exists())

    def test_limit(self) -> None:
        """At most max_tokens tokens exist."""
        store = TokenStore(self.clock, None, max_tokens=2)
        for _ in range(2):
            self.successResultOf(store.create("x", "viewer"))
        self.failureResultOf(store.create("x", "viewer"), Conflict)

    def test_damaged_files(self) -> None:
        """Bad JSON, a wrong version or a malformed record make the store refuse every token."""
        for content in ("{", '{"version": 9, "tokens": []}', '{"version": 1, "tokens": [{}]}'):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(content)
            store = TokenStore(self.clock, self.path)
            store.load()
            self.assertIsNotNone(store.error, content)
            self.failureResultOf(store.create("x", "viewer"), Conflict)
            self.assertEqual(self.path.read_text(), content)
        self.flushLoggedErrors()


class LoginLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = LoginLimiter(
            self.clock,
            free_attempts=2,
            initial=1.0,
            maximum=8.0,
            global_free_attempts=5,
            global_maximum=30.0,
        )

    def test_growing_lockout_per_address(self) -> None:
        """Past the free attempts each failure doubles the lockout up to the maximum."""
        delays = [self.limiter.failed("a") for _ in range(7)]
        self.assertEqual(delays, [0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 8.0])
        with self.assertRaises(RateLimited):
            self.limiter.check("a")
        self.clock.advance(7.9)
        with self.assertRaises(RateLimited):
            self.limiter.check("a")
        self.clock.advance(0.1)
        self.limiter.check("a")

    def test_per_address_and_global(self) -> None:
        """Another address is unaffected until the global budget is spent; then everyone waits."""
        for _ in range(3):
            self.limiter.failed("a")
        self.limiter.check("b")
        for _ in range(3):
            self.limiter.failed("c")  # the 6th failure overall: global lockout
        with self.assertRaises(RateLimited) as raised:
            self.limiter.check("b")
        self.assertGreater(raised.exception.retry_after, 0)
        self.clock.advance(raised.exception.retry_after)
        self.limiter.check("b")

    def test_success_resets(self) -> None:
        """A success clears the address and the global count."""
        for _ in range(4):
            self.limiter.failed("a")
        self.clock.advance(100)
        self.limiter.succeeded("a")
        self.assertEqual(self.limiter.failed("a"), 0.0)

    def test_lockout_expires_and_table_is_bounded(self) -> None:
        """A lockout ends after its delay; the address table stays bounded."""
        for _ in range(3):
            self.limiter.failed("a")
        self.clock.advance(1.0)
        self.limiter.check("a")
        limiter = LoginLimiter(self.clock, max_addresses=10, global_free_attempts=10**6)
        for i in range(100):
            limiter.failed(f"10.0.0.{i}")
        self.assertLessEqual(limiter.stats()["addresses"], 10)

    def test_bad_parameters(self) -> None:
        """Non-positive lockouts are refused."""
        with self.assertRaises(ValueError):
            LoginLimiter(self.clock, initial=0)
        with self.assertRaises(ValueError):
            LoginLimiter(self.clock, initial=10, maximum=1)
