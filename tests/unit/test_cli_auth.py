"""
piccolodctl's authenticated commands against the real API service (StubTreq)
and the real persistence service on a temp dir: setup, login (the session
file), unlock, lock, status, tokens, call, events, and the exit statuses.
"""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from piccolod.cli import (
    EXIT_API,
    EXIT_AUTH,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_RATE_LIMITED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Options,
    load_session,
    parse_frames,
    run,
    session_path,
)
from piccolod.events import JobProgress

from .api_support import PASSWORD, APIHarness


class CliAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = APIHarness(self, login_free_attempts=1, login_lockout_initial=30.0)
        self.stub: Any = None
        self.home = Path(self.mktemp())
        self.env = {"PICCOLOD_SESSION": str(self.home / "session.json")}
        self.prompts: list[str] = []
        self.answers: list[str] = []

    def prompt(self, text: str) -> str:
        self.prompts.append(text)
        return self.answers.pop(0)

    def ctl(self, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        """One piccolodctl run: a fresh HTTP client each time, as a fresh process has."""
        stub = self.stub or StubTreq(self.h.router)
        options = Options()
        options.parseOptions(["--url", "http://piccolod", *argv])
        out = io.StringIO()
        d = Deferred.fromCoroutine(
            run(
                self.h.clock,
                options,
                out,
                treq=stub,
                environ={**self.env, **(env or {})},
                prompt=self.prompt,
            )
        )
        for _ in range(50):
            stub.flush()
            if d.called:
                break
            self.h.clock.advance(0.1)
        return self.successResultOf(d), out.getvalue()

    def setup_box(self) -> str:
        self.answers = [PASSWORD, PASSWORD]
        code, out = self.ctl("setup")
        self.assertEqual(code, EXIT_OK, out)
        return out

    def test_setup_prompts_twice_and_saves_a_private_session(self) -> None:
        """setup asks for the password twice, shows the recovery key, saves a 0600 session."""
        out = self.setup_box()
        self.assertEqual(len(self.prompts), 2)
        words = out.strip().splitlines()[-1].split()
        self.assertEqual(len(words), 24)
        path = session_path(self.env)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(path.parent.stat().st_mode), 0o700)
        self.assertIsNotNone(load_session(path, "http://piccolod"))
        self.assertIsNone(load_session(path, "http://elsewhere"))
        self.assertEqual(self.ctl("leadership")[0], EXIT_OK)

    def test_setup_with_differing_passwords_is_a_usage_error(self) -> None:
        """Two different answers to the setup prompt set nothing up."""
        self.answers = [PASSWORD, "something else"]
        code, out = self.ctl("setup")
        self.assertEqual(code, EXIT_USAGE)
        self.assertIn("differ", out)
        self.assertEqual(self.h.persistence.state.value, "uninitialized")

    def test_without_credentials_exit_4_with_a_hint(self) -> None:
        """An authenticated command without a session or token exits 4 and says how to log in."""
        self.setup_box()
        session_path(self.env).unlink()
        code, out = self.ctl("leadership")
        self.assertEqual(code, EXIT_AUTH)
        self.assertIn("piccolodctl login", out)

    def test_lock_unlock_and_locked_exit_status(self) -> None:
        """lock, then a command needing unlocked storage exits 5, then unlock with the password."""
        self.setup_box()
        self.assertEqual(self.ctl("lock"), (EXIT_OK, "storage locked\n"))
        code, out = self.ctl("call", "persistence.rotate_recovery_key")
        self.assertEqual(code, EXIT_LOCKED, out)
        self.answers = [PASSWORD]
        self.assertEqual(self.ctl("unlock"), (EXIT_OK, "storage unlocked\n"))

    def test_unlock_without_a_session_logs_in(self) -> None:
        """
        After a restart there is no session: unlock logs in, which unlocks, and saves the
        session.
        """
        self.setup_box()
        self.successResultOf(self.h.persistence.lock())
        session_path(self.env).unlink()
        self.answers = [PASSWORD]
        code, out = self.ctl("unlock")
        self.assertEqual((code, out), (EXIT_OK, "storage unlocked (logged in)\n"))
        self.assertEqual(self.ctl("leadership")[0], EXIT_OK)

    def test_password_sources(self) -> None:
        """--password-file and $PICCOLOD_PASSWORD are used before any prompt."""
        self.setup_box()
        secret = self.home / "pw"
        secret.write_text(PASSWORD + "\n")
        self.prompts.clear()
        self.assertEqual(self.ctl("login", "--password-file", str(secret))[0], EXIT_OK)
        self.assertEqual(self.ctl("login", env={"PICCOLOD_PASSWORD": PASSWORD})[0], EXIT_OK)
        self.assertEqual(self.prompts, [])

    def test_wrong_password_then_lockout_exit_statuses(self) -> None:
        """A wrong password exits 4; the lockout that follows exits 6."""
        self.setup_box()
        self.answers = ["wrong wrong", "wrong again", PASSWORD]
        code, out = self.ctl("login")
        self.assertEqual(code, EXIT_AUTH)
        self.assertIn("wrong-password", out)
        self.assertNotIn("piccolodctl login", out)  # no hint to log in: that was the attempt
        self.h.advance(1)
        self.assertEqual(self.ctl("login")[0], EXIT_AUTH)
        code, out = self.ctl("login")
        self.assertEqual(code, EXIT_RATE_LIMITED, out)
        self.assertIn("429", out)

    def test_export_downloads_a_checked_bundle_and_never_overwrites(self) -> None:
        """export --output writes the bundle here (0600, sha256 and manifest checked)."""
        self.setup_box()
        backups = self.home / "backups"
        backups.mkdir(parents=True)
        code, out = self.ctl("export", "--output", str(backups))
        self.assertEqual(code, EXIT_OK, out)
        (saved,) = backups.iterdir()
        self.assertRegex(saved.name, r"^piccolod-control-.*\.tar$")
        self.assertEqual(saved.stat().st_mode & 0o777, 0o600)
        self.assertIn(f"downloaded to {saved}", out)
        self.assertIn("sha256 and", out)
        on_box = self.h.state_dir / "exports" / "control" / saved.name
        self.assertEqual(saved.read_bytes(), on_box.read_bytes())
        # The same name again: refused, nothing half-written is left behind.
        code, out = self.ctl("exports", "download", "control", saved.name, "-o", str(backups))
        self.assertEqual(code, EXIT_USAGE, out)
        self.assertIn("not overwriting", out)
        self.assertEqual([p.name for p in backups.iterdir()], [saved.name])

    def test_exports_list_download_and_delete(self) -> None:
        """exports lists, downloads (checked) and deletes the bundles on the box."""
        self.setup_box()
        self.assertEqual(self.ctl("export", "--full")[0], EXIT_OK)
        code, out = self.ctl("--json", "exports")
        self.assertEqual(code, EXIT_OK, out)
        (entry,) = json.loads(out)["exports"]
        code, out = self.ctl("exports")
        self.assertIn(entry["name"], out)
        self.assertIn("keeping the newest 5", out)
        target = self.home / "copy.tar"
        code, out = self.ctl("exports", "download", "full", entry["name"], "-o", str(target))
        self.assertEqual(code, EXIT_OK, out)
        self.assertEqual(target.stat().st_size, entry["size"])
        self.assertEqual(self.ctl("exports", "delete", "full", entry["name"])[0], EXIT_OK)
        code, out = self.ctl("exports", "download", "full", entry["name"], "-o", str(self.home))
        self.assertEqual(code, EXIT_API, out)
        self.assertIn("404", out)
        self.assertEqual(self.ctl("exports", "list")[1].count("piccolod-"), 0)

    def test_a_damaged_download_is_refused_and_removed(self) -> None:
        """A bundle damaged on the box fails its manifest check; nothing is kept here."""
        self.setup_box()
        code, out = self.ctl("--json", "export")
        name = json.loads(out)["name"]
        on_box = self.h.state_dir / "exports" / "control" / name
        data = bytearray(on_box.read_bytes())
        data[-20000] ^= 0xFF  # inside the store's ciphertext
        on_box.write_bytes(bytes(data))
        code, out = self.ctl("exports", "download", "control", name, "-o", str(self.home))
        self.assertEqual(code, EXIT_USAGE, out)
        self.assertIn("damaged", out)
        self.assertEqual(list(self.home.glob("*.tar*")) + list(self.home.glob(".*.part")), [])

    def test_password_change_and_recovery_key_rotation(self) -> None:
        """password asks the current one and the new one twice; recovery-key shows a new key."""
        self.setup_box()
        new = "an even better passphrase"
        self.answers = ["not the password", new, new]
        code, out = self.ctl("password")
        self.assertEqual(code, EXIT_AUTH, out)
        self.h.advance(2)  # the storage's delay after a wrong password
        self.answers = [PASSWORD, new, "typo"]
        code, out = self.ctl("password")
        self.assertEqual(code, EXIT_USAGE, out)
        self.assertIn("differ", out)
        self.answers = [PASSWORD, new, new]
        code, out = self.ctl("password")
        self.assertEqual(code, EXIT_OK, out)
        self.assertIn("password changed", out)
        self.assertEqual(self.ctl("leadership")[0], EXIT_OK)  # this session goes on
        code, out = self.ctl("logout")
        self.answers = [PASSWORD]
        self.assertEqual(self.ctl("login")[0], EXIT_AUTH)
        self.h.advance(4)
        code, out = self.ctl("login", env={"PICCOLOD_PASSWORD": new})
        self.assertEqual(code, EXIT_OK, out)
        code, out = self.ctl("recovery-key")
        self.assertEqual(code, EXIT_OK, out)
        words = out.strip().splitlines()[-1].split()
        self.assertEqual(len(words), 24)

    def test_status_works_logged_out(self) -> None:
        """status uses only public routes: state, readiness and who you are."""
        code, out = self.ctl("status")
        self.assertEqual(code, EXIT_OK)
        self.assertIn("storage uninitialized (not set up", out)
        self.setup_box()
        code, out = self.ctl("--json", "status")
        body = json.loads(out)
        self.assertEqual((body["state"], body["subject"]), ("unlocked", "admin"))

    def test_tokens(self) -> None:
        """token create prints the token once; list and revoke by id; the token then fails."""
        self.setup_box()
        code, out = self.ctl("--json", "token", "create", "ci", "--role", "viewer")
        self.assertEqual(code, EXIT_OK)
        created = json.loads(out)
        code, out = self.ctl("--token", created["token"], "leadership")
        self.assertEqual(code, EXIT_OK)
        code, out = self.ctl("token", "list")
        self.assertIn(created["id"], out)
        self.assertNotIn(created["token"], out)
        self.assertEqual(self.ctl("token", "revoke", created["id"])[0], EXIT_OK)
        self.assertEqual(
            self.ctl("leadership", env={"PICCOLOD_TOKEN": created["token"]})[0], EXIT_AUTH
        )
        viewer = self.ctl("--json", "token", "create", "v", "--role", "viewer")[1]
        code, out = self.ctl("--token", json.loads(viewer)["token"], "lock")
        self.assertEqual(code, EXIT_AUTH)
        self.assertIn("403", out)

    def test_call(self) -> None:
        """call builds any command from --json; bad JSON is a usage error; unknown is exit 1."""
        self.setup_box()
        code, out = self.ctl("call", "persistence.status")
        self.assertEqual(code, EXIT_OK)
        self.assertEqual(json.loads(out)["state"], "unlocked")
        self.assertEqual(self.ctl("call", "no.such")[0], EXIT_API)
        from twisted.python.usage import UsageError

        with self.assertRaises(UsageError):
            self.ctl("call", "persistence.status", "--json", "[")

    def test_events(self) -> None:
        """events prints the ring's events matching the pattern (--json: the raw envelopes)."""
        self.setup_box()
        self.ctl("events")  # the replay ring records from the first request on
        self.h.bus.publish(JobProgress("j1", "export", "running", 0.5), "t")
        code, out = self.ctl("events", "jobs.*")
        self.assertEqual(code, EXIT_OK)
        self.assertEqual(len(out.splitlines()), 1, out)
        self.assertIn("jobs.progress [j1]", out)
        code, out = self.ctl("--json", "events", "jobs.*")
        self.assertEqual(json.loads(out)["event"]["job_id"], "j1")

    def test_unreachable(self) -> None:
        """A daemon that cannot be reached exits 3."""
        from twisted.internet.error import ConnectionRefusedError

        class Refusing:
            def request(self, *a: Any, **kw: Any) -> Any:
                from twisted.internet.defer import fail

                return fail(ConnectionRefusedError())

            def flush(self) -> None:
                pass

        self.stub = Refusing()  # type: ignore[assignment]
        self.assertEqual(self.ctl("status")[0], EXIT_UNREACHABLE)


class FrameParserTests(SynchronousTestCase):
    def test_frames_split_across_chunks(self) -> None:
        """Frames are parsed as they complete; comments are skipped; the rest is kept."""
        frames, rest = parse_frames(b": ping\n\nid: 1\nevent: a\ndata: {}\n\nid: 2\nda")
        self.assertEqual(frames, [{"id": "1", "event": "a", "data": "{}"}])
        self.assertEqual(rest, b"id: 2\nda")
        frames, rest = parse_frames(rest + b"ta: x\n\n")
        self.assertEqual(frames, [{"id": "2", "data": "x"}])
        self.assertEqual(rest, b"")
