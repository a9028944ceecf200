"""
Authentication through the HTTP API (StubTreq, the real persistence service
on a temp dir): setup, login, logout, sessions and their timeouts, cookies,
CSRF, the login limiter, password change and recovery-key reset.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import StorageStatus, VerifyPassword
from piccolod.errors import Unauthorized

from .api_support import PASSWORD, APIHarness


class SetupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(self)

    def test_setup_initialises_unlocks_and_logs_in(self) -> None:
        """Setup answers 201 with a 24-word recovery key, unlocks storage and sets a session."""
        client, words = self.h.set_up()
        self.assertEqual(len(words.split()), 24)
        self.assertEqual(self.h.persistence.state.value, "unlocked")
        self.assertEqual(client.get("/api/v1/leadership").code, 200)
        session = client.get("/api/v1/auth/session").body
        self.assertEqual(
            (session["authenticated"], session["subject"], session["role"]),
            (True, "admin", "admin"),
        )

    def test_session_cookie_attributes(self) -> None:
        """The cookie is HttpOnly and SameSite=Strict, and not Secure over plain HTTP."""
        client, _ = self.h.set_up()
        cookie = client.last_set_cookie or ""
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=Strict", cookie)
        self.assertIn("Path=/", cookie)
        self.assertNotIn("Secure", cookie)

    def test_cookie_is_secure_over_tls_only(self) -> None:
        """Over TLS the cookie is Secure; a client's X-Forwarded-Proto never makes it so."""
        tls, _ = self.h.set_up(self.h.client("https"))
        self.assertIn("Secure", tls.last_set_cookie or "")
        plain = self.h.client()
        response = plain.post(
            "/api/v1/auth/login",
            {"password": PASSWORD},
            headers={"X-Forwarded-Proto": "https", "Forwarded": "proto=https"},
        )
        self.assertEqual(response.code, 200)
        self.assertNotIn("Secure", plain.last_set_cookie or "")

    def test_setup_only_once(self) -> None:
        """A second setup is a 409 and changes nothing."""
        self.h.set_up()
        response = self.h.client().post("/api/v1/auth/setup", {"password": "another password"})
        self.assertEqual((response.code, response.type), (409, "conflict"))
        self.assertEqual(
            self.h.client().post("/api/v1/auth/login", {"password": PASSWORD}).code, 200
        )

    def test_setup_validates_before_anything_runs(self) -> None:
        """
        A short password, a missing or extra member, or a non-JSON body are 400 and set
        nothing up.
        """
        client = self.h.client()
        for body in ({"password": "short"}, {}, {"password": PASSWORD, "admin": True}, ["x"]):
            response = client.post("/api/v1/auth/setup", body)
            self.assertEqual((response.code, response.type), (400, "invalid"), body)
        response = client.post(
            "/api/v1/auth/setup",
            raw=b"password=x",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual(response.code, 400)
        self.assertEqual(self.h.persistence.state.value, "uninitialized")

    def test_login_before_setup_is_a_conflict(self) -> None:
        """Logging in before setup says to set up first."""
        response = self.h.client().post("/api/v1/auth/login", {"password": PASSWORD})
        self.assertEqual(response.code, 409)
        self.assertIn("setup", response.body["detail"])


class LoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(
            self,
            login_free_attempts=2,
            login_lockout_initial=10.0,
            login_lockout_max=40.0,
            login_global_free_attempts=100,
        )
        self.admin, self.words = self.h.set_up()

    def lock(self) -> None:
        self.successResultOf(self.h.persistence.lock())

    def test_login_while_locked_unlocks(self) -> None:
        """With storage locked, the right password logs in and unlocks."""
        self.lock()
        client = self.h.client()
        response = client.post("/api/v1/auth/login", {"password": PASSWORD})
        self.assertEqual((response.code, response.body["state"]), (200, "unlocked"))
        self.assertEqual(self.h.persistence.state.value, "unlocked")
        self.assertEqual(client.get("/api/v1/leadership").code, 200)

    def test_login_while_unlocked_checks_the_password(self) -> None:
        """With storage unlocked a wrong password is refused (401) and the right one accepted."""
        client = self.h.client()
        wrong = client.post("/api/v1/auth/login", {"password": "not the password"})
        self.assertEqual((wrong.code, wrong.type), (401, "wrong-password"))
        self.assertIsNone(client.cookie)
        self.h.advance(1)  # past persistence's own delay after a wrong password
        right = client.post("/api/v1/auth/login", {"password": PASSWORD})
        self.assertEqual(right.code, 200)
        self.assertIsNotNone(client.cookie)

    def test_login_while_unlocked_rewrites_nothing(self) -> None:
        """
        Checking the password at login (persistence.verify_password) leaves the keyset
        untouched.
        """
        keyset = (self.h.state_dir / "persistence" / "keyset.json").read_bytes()
        self.assertEqual(
            self.h.client().post("/api/v1/auth/login", {"password": PASSWORD}).code, 200
        )
        self.assertEqual((self.h.state_dir / "persistence" / "keyset.json").read_bytes(), keyset)

    def test_login_falls_back_without_verify_password(self) -> None:
        """Without persistence.verify_password, the password is checked by a change to itself."""
        self.h.dispatcher.unregister(VerifyPassword)
        client = self.h.client()
        self.assertEqual(client.post("/api/v1/auth/login", {"password": "nope nope"}).code, 401)
        self.h.advance(1)
        self.assertEqual(client.post("/api/v1/auth/login", {"password": PASSWORD}).code, 200)

    def test_login_uses_verify_password_as_the_api(self) -> None:
        """The password check runs as system:api through persistence.verify_password."""
        seen: list[str] = []

        def verify(command: VerifyPassword, context: Any) -> StorageStatus:
            seen.append(context.subject)
            if command.password != PASSWORD:
                raise Unauthorized("wrong")
            return StorageStatus(state="unlocked", initialized=True)

        self.h.dispatcher.unregister(VerifyPassword)
        self.h.dispatcher.register(VerifyPassword, verify)
        self.assertEqual(
            self.h.client().post("/api/v1/auth/login", {"password": PASSWORD}).code, 200
        )
        self.assertEqual(seen, ["system:api"])

    def test_brute_force_locks_out_and_refuses_the_right_password(self) -> None:
        """
        Past the free attempts each failure locks the address out (429 + Retry-After), even
        for the right password, with growing delays.
        """
        client = self.h.client()
        for _ in range(2):
            self.assertEqual(
                client.post("/api/v1/auth/login", {"password": "guess guess"}).code, 401
            )
            self.h.advance(2)
        third = client.post("/api/v1/auth/login", {"password": "guess guess"})
        self.assertEqual(third.code, 401)
        refused = client.post("/api/v1/auth/login", {"password": PASSWORD})
        self.assertEqual((refused.code, refused.type), (429, "rate-limited"))
        self.assertEqual(refused.header("retry-after"), "10")
        self.assertIsNone(client.cookie)
        self.h.advance(9)
        self.assertEqual(client.post("/api/v1/auth/login", {"password": PASSWORD}).code, 429)
        self.h.advance(1.5)
        # A fourth failure doubles the lockout.
        self.assertEqual(client.post("/api/v1/auth/login", {"password": "guess guess"}).code, 401)
        again = client.post("/api/v1/auth/login", {"password": PASSWORD})
        self.assertEqual((again.code, again.header("retry-after")), (429, "20"))
        self.h.advance(20.5)
        self.assertEqual(client.post("/api/v1/auth/login", {"password": PASSWORD}).code, 200)
        # Success resets the count: the next wrong password is free again.
        self.h.advance(1)
        self.assertEqual(client.post("/api/v1/auth/login", {"password": "guess guess"}).code, 401)
        self.h.advance(1)
        self.assertEqual(client.post("/api/v1/auth/login", {"password": PASSWORD}).code, 200)

    def test_lockout_covers_unlock_and_recovery_reset(self) -> None:
        """Wrong secrets at unlock and recovery-key reset count towards the same lockout."""
        self.lock()
        client = self.h.client()
        self.assertEqual(client.post("/api/v1/storage/unlock", {"password": "x" * 9}).code, 401)
        self.h.advance(2)
        reset = client.post(
            "/api/v1/auth/recovery-key/reset",
            {"recovery_key": " ".join(["abandon"] * 23 + ["art"]), "new_password": "new password!"},
        )
        self.assertEqual(reset.code, 401)
        self.h.advance(2)
        self.assertEqual(client.post("/api/v1/auth/login", {"password": "nope nope"}).code, 401)
        locked_out = client.post("/api/v1/auth/login", {"password": PASSWORD})
        self.assertEqual(locked_out.code, 429)

    def test_failures_and_successes_are_audited(self) -> None:
        """Logins, failed ones included, are audit records with ids and the client address."""
        client = self.h.client()
        client.post("/api/v1/auth/login", {"password": "wrong wrong"})
        self.h.advance(1)
        client.post("/api/v1/auth/login", {"password": PASSWORD})
        self.h.clock.advance(0)
        logins = [r for r in self.h.audit() if r.action == "auth.login"]
        self.assertEqual([r.outcome for r in logins], ["denied", "ok"])
        self.assertTrue(all(r.decision_id for r in logins))
        self.assertEqual(logins[0].resource, "address:127.0.0.1")


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(self, session_idle_timeout=60.0, session_absolute_timeout=300.0)
        self.admin, _ = self.h.set_up()

    def test_idle_timeout(self) -> None:
        """A session unused for the idle timeout is refused (401); use keeps it alive."""
        for _ in range(3):
            self.h.advance(50)
            self.assertEqual(self.admin.get("/api/v1/leadership").code, 200)
        self.h.advance(60)
        response = self.admin.get("/api/v1/leadership")
        self.assertEqual((response.code, response.type), (401, "unauthorized"))
        self.assertIn("expired", response.body["detail"])

    def test_absolute_timeout(self) -> None:
        """A session ends at the absolute timeout however busy it is."""
        for _ in range(5):
            self.h.advance(59)
            self.assertEqual(self.admin.get("/api/v1/leadership").code, 200)
        self.h.advance(6)
        self.assertEqual(self.admin.get("/api/v1/leadership").code, 401)

    def test_logout_ends_the_session_and_clears_the_cookie(self) -> None:
        """After logout the old cookie is refused and the answer clears it."""
        cookie = self.admin.cookie
        response = self.admin.post("/api/v1/auth/logout")
        self.assertEqual((response.code, response.body), (200, {"logged_out": True}))
        self.assertIn("Max-Age=0", self.admin.last_set_cookie or "")
        stale = self.h.client()
        stale.cookie = cookie
        self.assertEqual(stale.get("/api/v1/leadership").code, 401)

    def test_forged_cookie_is_refused(self) -> None:
        """A cookie that is no session's is a 401."""
        forged = self.h.client()
        forged.cookie = "A" * 43
        self.assertEqual(forged.get("/api/v1/leadership").code, 401)

    def test_session_route_reports_anonymous_and_expiry(self) -> None:
        """GET /auth/session is public: anonymous says so; a session reports its expiry."""
        anonymous = self.h.client().get("/api/v1/auth/session").body
        self.assertEqual(
            anonymous, {"authenticated": False, "initialized": True, "state": "unlocked"}
        )
        mine = self.admin.get("/api/v1/auth/session").body
        self.assertEqual(mine["expires_at"] - mine["created_at"], 300.0)

    def test_polling_the_session_route_does_not_keep_a_session_alive(self) -> None:
        """GET /auth/session reports the session without counting as its use."""
        for _ in range(2):
            self.h.advance(25)
            self.assertTrue(self.admin.get("/api/v1/auth/session").body["authenticated"])
        self.h.advance(15)  # 65 s since the last real use
        self.assertFalse(self.admin.get("/api/v1/auth/session").body["authenticated"])
        self.assertEqual(self.admin.get("/api/v1/leadership").code, 401)


class CSRFTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(self)
        self.admin, _ = self.h.set_up()

    def test_missing_or_wrong_csrf_is_403(self) -> None:
        """
        A session's unsafe request without the CSRF token, or with a wrong one, is 403 and
        does nothing.
        """
        missing = self.admin.post("/api/v1/storage/lock", csrf=False)
        self.assertEqual((missing.code, missing.type), (403, "csrf"))
        wrong = self.admin.post(
            "/api/v1/storage/lock", csrf=False, headers={"X-CSRF-Token": "x" * 43}
        )
        self.assertEqual((wrong.code, wrong.type), (403, "csrf"))
        self.assertEqual(self.h.persistence.state.value, "unlocked")
        self.assertEqual(self.admin.post("/api/v1/storage/lock").code, 200)
        self.assertEqual(self.h.persistence.state.value, "locked")

    def test_csrf_token_of_another_session_is_refused(self) -> None:
        """CSRF tokens are per session."""
        other = self.h.client()
        self.assertEqual(other.post("/api/v1/auth/login", {"password": PASSWORD}).code, 200)
        response = self.admin.post(
            "/api/v1/storage/lock", csrf=False, headers={"X-CSRF-Token": other.csrf or ""}
        )
        self.assertEqual(response.code, 403)

    def test_safe_methods_and_tokens_need_no_csrf(self) -> None:
        """GETs need no CSRF token, nor do bearer-token requests."""
        self.assertEqual(self.admin.get("/api/v1/leadership", csrf=False).code, 200)
        token, _ = self.h.token(self.admin, "admin")
        automation = self.h.token_client(token)
        self.assertEqual(automation.post("/api/v1/storage/lock", csrf=False).code, 200)

    def test_csrf_route_answers_the_token(self) -> None:
        """GET /auth/csrf answers the session's token (null for an API token)."""
        self.assertEqual(self.admin.get("/api/v1/auth/csrf").body["csrf_token"], self.admin.csrf)
        token, _ = self.h.token(self.admin, "viewer")
        self.assertIsNone(self.h.token_client(token).get("/api/v1/auth/csrf").body["csrf_token"])


class PasswordTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(self)
        self.admin, self.words = self.h.set_up()

    def test_change_password_rotates_sessions(self) -> None:
        """A password change ends every other session; the caller's continues under a new cookie."""
        other = self.h.client()
        other.post("/api/v1/auth/login", {"password": PASSWORD})
        old_cookie = self.admin.cookie
        response = self.admin.post(
            "/api/v1/auth/password",
            {"old_password": PASSWORD, "new_password": "a new password"},
        )
        self.assertEqual(response.code, 200, response)
        self.assertEqual(response.body["sessions_revoked"], 2)
        self.assertNotEqual(self.admin.cookie, old_cookie)
        self.assertEqual(self.admin.get("/api/v1/leadership").code, 200)
        self.assertEqual(other.get("/api/v1/leadership").code, 401)
        fresh = self.h.client()
        self.assertEqual(fresh.post("/api/v1/auth/login", {"password": PASSWORD}).code, 401)
        self.h.advance(1)
        self.assertEqual(fresh.post("/api/v1/auth/login", {"password": "a new password"}).code, 200)

    def test_wrong_old_password_changes_nothing(self) -> None:
        """A wrong old password is 401; the password and the sessions stay."""
        response = self.admin.post(
            "/api/v1/auth/password", {"old_password": "wrong wrong", "new_password": "new one!!"}
        )
        self.assertEqual((response.code, response.type), (401, "wrong-password"))
        self.assertEqual(self.admin.get("/api/v1/leadership").code, 200)
        self.h.advance(1)
        self.assertEqual(
            self.h.client().post("/api/v1/auth/login", {"password": PASSWORD}).code, 200
        )

    def test_recovery_reset_is_public_and_ends_sessions(self) -> None:
        """
        With the recovery key anyone may set a new password; every session ends, nobody is
        logged in.
        """
        stranger = self.h.client()
        response = stranger.post(
            "/api/v1/auth/recovery-key/reset",
            {"recovery_key": self.words, "new_password": "recovered password"},
        )
        self.assertEqual(response.code, 200, response)
        self.assertEqual(response.body["sessions_revoked"], 1)
        self.assertIsNone(stranger.cookie)
        self.assertEqual(self.admin.get("/api/v1/leadership").code, 401)
        self.assertEqual(stranger.post("/api/v1/auth/login", {"password": PASSWORD}).code, 401)
        self.h.advance(1)
        self.assertEqual(
            stranger.post("/api/v1/auth/login", {"password": "recovered password"}).code, 200
        )

    def test_recovery_key_rotation_needs_unlocked_storage(self) -> None:
        """Rotating the recovery key answers a new key; while locked it is 423."""
        rotated = self.admin.post("/api/v1/auth/recovery-key")
        self.assertEqual(rotated.code, 200)
        self.assertNotEqual(rotated.body["recovery_key"], self.words)
        self.admin.post("/api/v1/storage/lock")
        locked = self.admin.post("/api/v1/auth/recovery-key")
        self.assertEqual((locked.code, locked.type), (423, "locked"))
