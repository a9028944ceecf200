"""
API tokens, policy at the HTTP boundary and in the dispatcher, storage and
export routes, and commands built from JSON (StubTreq against the real API
service and the real persistence service on a temp dir).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from piccolod.api.auth import split_token
from piccolod.api.service import APIService
from piccolod.commands import Command, CommandContext, Pong, Result, RunControlExport
from piccolod.events import VolumeStateChanged

from .api_support import PASSWORD, APIHarness


@attrs.frozen
class Count(Command):
    """A test command that counts its runs."""

    name: ClassVar[str] = "test.count"
    step: int = 1
    label: str | None = None


@attrs.frozen
class Counted(Result):
    total: int


class TokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(self)
        self.admin, _ = self.h.set_up()

    def test_token_is_shown_once_and_works(self) -> None:
        """Creating a token answers it once; it authenticates; listing never shows it."""
        token, token_id = self.h.token(self.admin, "viewer", "monitoring")
        self.assertRegex(token, r"^pcd_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")
        self.assertEqual(self.h.token_client(token).get("/api/v1/leadership").code, 200)
        listed = self.admin.get("/api/v1/auth/tokens").body["tokens"]
        self.assertEqual(
            [(t["id"], t["name"], t["role"]) for t in listed], [(token_id, "monitoring", "viewer")]
        )
        self.assertNotIn(token.split("_")[2], repr(listed))
        self.assertIsNotNone(listed[0]["last_used"])

    def test_tokens_are_hashed_at_rest(self) -> None:
        """No file under the state dir holds a token or its secret; the token file is 0600."""
        tokens = [self.h.token(self.admin, role)[0] for role in ("viewer", "operator", "admin")]
        path = self.h.state_dir / "api" / "tokens.json"
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(path.parent.stat().st_mode), 0o700)
        for root, _dirs, files in os.walk(self.h.state_dir):
            for name in files:
                data = open(os.path.join(root, name), "rb").read()
                for token in tokens:
                    parts = split_token(token)
                    assert parts is not None
                    secret = parts[1].encode()
                    self.assertNotIn(secret, data, os.path.join(root, name))

    def test_revoked_token_stops_at_once(self) -> None:
        """A revoked token is refused on its very next request; revoking again is 404."""
        token, token_id = self.h.token(self.admin, "operator")
        client = self.h.token_client(token)
        self.assertEqual(client.get("/api/v1/leadership").code, 200)
        response = self.admin.delete(f"/api/v1/auth/tokens/{token_id}")
        self.assertEqual((response.code, response.body["revoked"]["id"]), (200, token_id))
        self.assertEqual(client.get("/api/v1/leadership").code, 401)
        self.assertEqual(self.admin.delete(f"/api/v1/auth/tokens/{token_id}").code, 404)
        self.assertEqual(self.admin.delete("/api/v1/auth/tokens/NOT-AN-ID").code, 400)

    def test_token_expiry(self) -> None:
        """A token created with expires_in stops working when it expires."""
        created = self.admin.post(
            "/api/v1/auth/tokens", {"name": "short", "role": "viewer", "expires_in": 60}
        )
        client = self.h.token_client(created.body["token"])
        self.assertEqual(client.get("/api/v1/leadership").code, 200)
        self.h.advance(61)
        self.admin.get("/api/v1/leadership")  # keep the admin session alive
        self.assertEqual(client.get("/api/v1/leadership").code, 401)

    def test_tokens_survive_an_api_restart(self) -> None:
        """
        A new API service on the same state dir accepts the tokens (only their hashes were
        kept).
        """
        token, _ = self.h.token(self.admin, "viewer")
        self.h.service.api.hub.stop()  # type: ignore[union-attr]
        self.h.kernel.dispatcher.remove_middleware("policy")  # type: ignore[attr-defined]
        second = APIService.build(self.h.kernel, {})
        second.startService()
        self.addCleanup(second.api.hub.stop)  # type: ignore[union-attr]
        from treq.testing import StubTreq

        from .api_support import Client

        client = Client(self, StubTreq(second.router))
        client.token = token
        self.assertEqual(client.get("/api/v1/leadership").code, 200)

    def test_damaged_token_file_accepts_no_token_and_is_not_overwritten(self) -> None:
        """
        A damaged tokens.json: no token works, creating one is 409, the file is left alone,
        login works.
        """
        token, _ = self.h.token(self.admin, "viewer")
        path = self.h.state_dir / "api" / "tokens.json"
        path.write_text("{not json")
        store = self.h.api.tokens
        store.load()
        self.assertIsNotNone(store.error)
        self.assertEqual(self.h.token_client(token).get("/api/v1/leadership").code, 401)
        self.assertEqual(
            self.admin.post("/api/v1/auth/tokens", {"name": "x", "role": "viewer"}).code, 409
        )
        self.assertEqual(path.read_text(), "{not json")
        self.assertEqual(self.admin.get("/api/v1/leadership").code, 200)
        self.flushLoggedErrors()

    def test_bad_token_requests(self) -> None:
        """Unknown role, bad expiry, a malformed bearer header: 400 or 401."""
        for body in (
            {"name": "x", "role": "system"},
            {"name": "x", "role": "root"},
            {"name": "", "role": "viewer"},
            {"name": "x", "role": "viewer", "expires_in": 1},
        ):
            self.assertEqual(self.admin.post("/api/v1/auth/tokens", body).code, 400, body)
        basic = self.h.client()
        response = basic.get("/api/v1/leadership", headers={"Authorization": "Basic YTpi"})
        self.assertEqual(response.code, 401)
        self.assertEqual(response.header("www-authenticate"), 'Bearer realm="piccolod"')
        self.assertEqual(
            self.h.token_client("pcd_0123456789ab_" + "A" * 43).get("/api/v1/leadership").code, 401
        )

    def test_token_rate_quota(self) -> None:
        """A token over its request rate gets 429 with Retry-After until its bucket refills."""
        h = APIHarness(self, token_rate=2.0, token_burst=3.0)
        admin, _ = h.set_up()
        client = h.token_client(h.token(admin, "viewer")[0])
        codes = [client.get("/api/v1/leadership").code for _ in range(4)]
        self.assertEqual(codes, [200, 200, 200, 429])
        limited = client.get("/api/v1/leadership")
        self.assertEqual((limited.type, limited.header("retry-after")), ("quota-exceeded", "1"))
        h.advance(0.5)
        self.assertEqual(client.get("/api/v1/leadership").code, 200)
        # Sessions are not charged.
        self.assertTrue(all(admin.get("/api/v1/leadership").code == 200 for _ in range(10)))


class PolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(self)
        self.admin, _ = self.h.set_up()
        self.viewer = self.h.token_client(self.h.token(self.admin, "viewer")[0])
        self.operator = self.h.token_client(self.h.token(self.admin, "operator")[0])

    def test_viewer_cannot_dispatch_mutating_commands(self) -> None:
        """A viewer token reads, but every mutating route and command is 403 with a decision id."""
        self.assertEqual(self.viewer.get("/api/v1/storage/status").code, 200)
        self.assertEqual(self.viewer.post("/api/v1/commands/persistence.status", {}).code, 200)
        for path, body in (
            ("/api/v1/storage/lock", None),
            ("/api/v1/commands/persistence.lock", {}),
            ("/api/v1/commands/persistence.rotate_recovery_key", {}),
            ("/api/v1/exports/control", None),
            ("/api/v1/auth/recovery-key", None),
            ("/api/v1/auth/tokens", {"name": "x", "role": "viewer"}),
        ):
            response = self.viewer.post(path, body)
            self.assertEqual((response.code, response.type), (403, "forbidden"), path)
            self.assertTrue(response.body["decision_id"].startswith("pd-"))
        self.assertEqual(self.h.persistence.state.value, "unlocked")

    def test_only_the_admin_downloads_bundles(self) -> None:
        """Operators export, list and delete bundles but never download one (the keyset's wraps)."""
        done = self.operator.post("/api/v1/exports/control")
        self.assertEqual(done.code, 200, done)
        path = f"/api/v1/exports/control/{done.body['name']}"
        self.assertEqual(self.operator.get("/api/v1/exports").code, 200)
        self.assertEqual(self.operator.get(path).code, 403)
        self.assertEqual(self.viewer.get(path).code, 403)
        self.assertEqual(self.viewer.get("/api/v1/exports").code, 403)
        self.assertEqual(self.admin.get(path).code, 200)
        self.assertEqual(self.viewer.delete(path).code, 403)
        self.assertEqual(self.operator.delete(path).code, 200)

    def test_operator_runs_storage_but_not_credentials(self) -> None:
        """An operator may lock and unlock, but not change credentials or manage tokens."""
        self.assertEqual(self.operator.post("/api/v1/storage/lock").code, 200)
        self.assertEqual(
            self.operator.post("/api/v1/storage/unlock", {"password": PASSWORD}).code, 200
        )
        password = self.operator.post(
            "/api/v1/auth/password", {"old_password": PASSWORD, "new_password": "x" * 10}
        )
        self.assertEqual(password.code, 403)
        self.assertEqual(self.operator.get("/api/v1/auth/tokens").code, 403)

    def test_denials_are_audited_with_the_decision_id(self) -> None:
        """The 403's decision id is the id of a published ``denied`` audit record."""
        response = self.viewer.post("/api/v1/storage/lock")
        self.h.clock.advance(0)
        records = {r.decision_id: r for r in self.h.audit()}
        record = records[response.body["decision_id"]]
        self.assertEqual(
            (record.action, record.outcome, record.subject[:6]),
            ("persistence.lock", "denied", "token:"),
        )

    def test_boundary_actions(self) -> None:
        """Routes that are not commands are decided at the boundary by their action."""
        self.assertEqual(self.viewer.get("/metrics").code, 404)  # allowed; no metrics here
        self.assertEqual(self.viewer.get("/api/v1/policy").body["you"]["role"], "viewer")
        self.assertEqual(self.viewer.post("/api/v1/jobs/x/cancel").code, 403)
        self.assertEqual(self.operator.post("/api/v1/jobs/x/cancel").code, 404)

    def test_configured_roles(self) -> None:
        """A role from the config can be granted to tokens and is enforced."""
        h = APIHarness(self, roles={"auditor": {"allow": ["leadership.read"], "deny": []}})
        admin, _ = h.set_up()
        auditor = h.token_client(h.token(admin, "auditor")[0])
        self.assertEqual(auditor.get("/api/v1/leadership").code, 200)
        self.assertEqual(auditor.get("/api/v1/supervisor").code, 403)


class CommandRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(self, max_body=4096)
        self.admin, _ = self.h.set_up()
        self.runs: list[Count] = []
        self.h.dispatcher.register(Count, self.count)

    def count(self, command: Count, context: CommandContext) -> Counted:
        self.runs.append(command)
        return Counted(total=sum(c.step for c in self.runs))

    def test_command_from_json(self) -> None:
        """A registered command is built from its JSON arguments and run as the caller."""
        response = self.admin.post("/api/v1/commands/test.count", {"step": 2, "label": "a"})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, {"command": "test.count", "result": {"total": 2}})
        self.assertEqual(self.runs, [Count(step=2, label="a")])
        self.assertTrue(response.header("x-request-id"))

    def test_invalid_arguments_never_reach_the_handler(self) -> None:
        """Unknown members, wrong types and non-objects are 400 before any command is built."""
        for body in ({"step": "2"}, {"steps": 1}, {"step": True}, [1], {"label": 3}):
            response = self.admin.post("/api/v1/commands/test.count", body)
            self.assertEqual((response.code, response.type), (400, "invalid"), body)
        self.assertEqual(self.runs, [])
        self.assertEqual(self.admin.post("/api/v1/commands/test.count", {"step": 2.0}).code, 200)

    def test_unknown_and_malformed_names(self) -> None:
        """An unregistered command is 404 unknown-command; a malformed name is 400."""
        response = self.admin.post("/api/v1/commands/no.such", {})
        self.assertEqual((response.code, response.type), (404, "unknown-command"))
        self.assertEqual(self.admin.post("/api/v1/commands/NOPE", {}).code, 400)

    def test_idempotency_key(self) -> None:
        """The same Idempotency-Key answers the first result without running again."""
        headers = {"Idempotency-Key": "abc-123"}
        first = self.admin.post("/api/v1/commands/test.count", {"step": 5}, headers=headers)
        second = self.admin.post("/api/v1/commands/test.count", {"step": 5}, headers=headers)
        self.assertEqual(first.body, second.body)
        self.assertEqual(len(self.runs), 1)
        other = self.admin.post("/api/v1/commands/test.count", {"step": 6}, headers=headers)
        self.assertEqual(other.code, 409)
        bad = self.admin.post("/api/v1/commands/test.count", {}, headers={"Idempotency-Key": " "})
        self.assertEqual(bad.code, 400)

    def test_body_too_large(self) -> None:
        """A body over max_body is 413 and nothing runs."""
        response = self.admin.post("/api/v1/commands/test.count", {"label": "x" * 5000})
        self.assertEqual((response.code, response.type), (413, "too-large"))
        self.assertEqual(self.runs, [])

    def test_locked_commands_answer_423(self) -> None:
        """A command needing unlocked storage is 423 while locked."""
        self.admin.post("/api/v1/storage/lock")
        response = self.admin.post("/api/v1/commands/persistence.rotate_recovery_key", {})
        self.assertEqual((response.code, response.type), (423, "locked"))

    def test_command_list(self) -> None:
        """GET /commands lists the registered commands with their argument schemas."""
        listed = {c["name"]: c for c in self.admin.get("/api/v1/commands").body["commands"]}
        self.assertIn("persistence.unlock", listed)
        schema = listed["test.count"]["schema"]
        self.assertEqual(schema["properties"]["step"], {"type": "integer"})
        unlock = listed["persistence.unlock"]["schema"]["properties"]["password"]
        self.assertTrue(unlock["writeOnly"])


class StorageRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(self)
        self.admin, self.words = self.h.set_up()

    def test_lock_unlock_cycle(self) -> None:
        """
        Lock, 423 for what needs unlocked storage, unlock with the password or the recovery
        key.
        """
        self.assertEqual(self.admin.post("/api/v1/storage/lock").body["state"], "locked")
        self.assertEqual(self.admin.get("/api/v1/storage/status").body["state"], "locked")
        self.assertEqual(self.admin.post("/api/v1/auth/recovery-key").code, 423)
        unlocked = self.admin.post("/api/v1/storage/unlock", {"recovery_key": self.words})
        self.assertEqual((unlocked.code, unlocked.body["state"]), (200, "unlocked"))
        self.admin.post("/api/v1/storage/lock")
        self.assertEqual(
            self.admin.post("/api/v1/storage/unlock", {"password": PASSWORD}).body["state"],
            "unlocked",
        )

    def test_unlock_body_needs_exactly_one_secret(self) -> None:
        """Both secrets, neither, or an extra member are 400."""
        self.admin.post("/api/v1/storage/lock")
        for body in ({}, {"password": PASSWORD, "recovery_key": self.words}, {"pw": "x"}):
            self.assertEqual(self.admin.post("/api/v1/storage/unlock", body).code, 400, body)

    def test_storage_setup_after_setup_is_409(self) -> None:
        """POST /storage/setup once initialised is an illegal transition."""
        response = self.admin.post("/api/v1/storage/setup", {"password": "another one"})
        self.assertEqual((response.code, response.type), (409, "illegal-transition"))

    def test_volumes_from_retained_events(self) -> None:
        """GET /volumes lists each volume's last retained state."""
        self.h.bus.publish(VolumeStateChanged("data", "attached-rw", 2), "test")
        self.h.bus.publish(VolumeStateChanged("apps", "detached", 1), "test")
        volumes = self.admin.get("/api/v1/volumes").body["volumes"]
        self.assertEqual(
            [(v["volume_id"], v["state"]) for v in volumes],
            [("apps", "detached"), ("data", "attached-rw")],
        )

    def test_bundles_are_listed_downloaded_and_deleted(self) -> None:
        """An export's bundle is listed, downloads byte for byte with its sha256, and deletes."""
        done = self.admin.post("/api/v1/exports/control")
        self.assertEqual(done.code, 200, done)
        kind, name = done.body["kind"], done.body["name"]
        listed = self.admin.get("/api/v1/exports")
        self.assertEqual([(e["kind"], e["name"]) for e in listed.body["exports"]], [(kind, name)])
        got = self.admin.get(f"/api/v1/exports/{kind}/{name}")
        self.assertEqual(got.code, 200)
        self.assertEqual(got.header("content-type"), "application/x-tar")
        self.assertEqual(got.header("content-disposition"), f'attachment; filename="{name}"')
        self.assertEqual(len(got.raw), done.body["size"])
        self.assertEqual(hashlib.sha256(got.raw).hexdigest(), done.body["sha256"])
        self.assertEqual(got.raw, Path(done.body["path"]).read_bytes())
        gone = self.admin.delete(f"/api/v1/exports/{kind}/{name}")
        self.assertEqual((gone.code, gone.body["deleted"]["name"]), (200, name))
        self.assertEqual(self.admin.get(f"/api/v1/exports/{kind}/{name}").code, 404)
        self.assertEqual(self.admin.delete(f"/api/v1/exports/{kind}/{name}").code, 404)
        self.assertEqual(self.admin.get("/api/v1/exports").body["exports"], [])

    def test_bundle_paths_are_never_taken_from_the_caller(self) -> None:
        """Names that are not bundle names are 400 before any lookup; unknown kinds too."""
        for path in (
            "/api/v1/exports/control/..%2F..%2Fpersistence%2Fkeyset.json",
            "/api/v1/exports/control/keyset.json",
            "/api/v1/exports/keys/piccolod-control-20260101T000000Z-abcdef.tar",
        ):
            self.assertEqual(self.admin.get(path).code, 400, path)
        missing = "/api/v1/exports/full/piccolod-full-20260101T000000Z-abcdef.tar"
        self.assertEqual(self.admin.get(missing).type, "not-found")

    def test_disks_without_a_device_manager_is_503(self) -> None:
        """Without the devices subsystem, the disks route says it is unavailable."""
        response = self.admin.get("/api/v1/storage/disks")
        self.assertEqual((response.code, response.type), (503, "unavailable"))

    def test_export_runs_and_concurrent_exports_hit_the_quota(self) -> None:
        """An export answers its bundle; a second one while the first runs is 429 quota-exceeded."""
        done = self.admin.post("/api/v1/exports/control")
        self.assertEqual((done.code, done.body["kind"]), (200, "control"))
        self.assertTrue(os.path.exists(done.body["path"]))
        pending: Deferred[Any] = Deferred()
        self.h.dispatcher.unregister(RunControlExport)
        self.h.dispatcher.register(RunControlExport, lambda c, ctx: pending)
        d = self.h.client()
        d.cookie, d.csrf = self.admin.cookie, self.admin.csrf
        from treq.testing import StubTreq

        stub = StubTreq(self.h.router)
        first = stub.post(
            "http://piccolod/api/v1/exports/control",
            headers={
                "cookie": f"piccolod_session={self.admin.cookie}",
                "x-csrf-token": self.admin.csrf or "",
            },
        )
        stub.flush()
        self.assertNoResult(first)
        second = self.admin.post("/api/v1/exports/full")
        self.assertEqual((second.code, second.type), (429, "quota-exceeded"))
        pending.callback(Pong("late"))
        stub.flush()
        self.successResultOf(first)
        self.assertNotEqual(self.admin.post("/api/v1/exports/full").code, 429)
