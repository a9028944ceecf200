"""Tests for piccolod.api.service: configuration, policy installation, the site, the plugin."""

from __future__ import annotations

import json

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.api.http import APISite, LimitedBuffer, Router
from piccolod.api.service import CONFIG_DEFAULTS, APIService, check_config
from piccolod.commands import CommandContext, LockStorage
from piccolod.errors import ConfigError, PolicyDenied
from piccolod.kernel.policy import PolicyEngine

from .api_support import APIHarness


class ConfigTests(SynchronousTestCase):
    def test_plugin_declares_every_key(self) -> None:
        """The api plugin's config_keys are exactly the service's defaults."""
        from twisted.plugins.piccolod_kernel import apiHttp

        self.assertEqual(dict(apiHttp.config_keys), dict(CONFIG_DEFAULTS))

    def test_every_problem_is_reported(self) -> None:
        """Bad values are reported together, each naming its key."""
        bad = {
            **CONFIG_DEFAULTS,
            "session_idle_timeout": 0,
            "max_body": -1,
            "token_rate": -1.0,
            "login_free_attempts": True,
            "login_lockout_initial": 100.0,
            "login_lockout_max": 10.0,
        }
        with self.assertRaises(ConfigError) as raised:
            check_config(bad)
        text = "\n".join(raised.exception.errors)
        for key in ("session_idle_timeout", "max_body", "token_rate", "login_free_attempts"):
            self.assertIn(key, text)
        check_config(CONFIG_DEFAULTS)

    def test_bad_roles_fail_the_build(self) -> None:
        """A role table with a bad rule is a ConfigError at build time."""
        h = APIHarness(self)
        with self.assertRaises(ConfigError):
            APIService.build(h.kernel, {"roles": {"x": {"allow": ["a@"]}}})


class LifecycleTests(SynchronousTestCase):
    def test_policy_is_installed_and_replaced_on_restart(self) -> None:
        """
        Starting installs the engine in the policy slot; a new instance replaces it; a stop
        keeps it.
        """
        h = APIHarness(self)
        first = h.kernel.dispatcher._slots["policy"]  # type: ignore[attr-defined]
        self.assertIsInstance(first, PolicyEngine)
        self.successResultOf(h.service.stopService())
        self.assertIs(h.kernel.dispatcher._slots["policy"], first)  # type: ignore[attr-defined]
        failure = self.failureResultOf(
            h.dispatcher.dispatch(LockStorage(), CommandContext(subject="token:none")),
            PolicyDenied,
        )
        self.assertIn("token:none", failure.value.detail)
        second = APIService.build(h.kernel, {})
        second.startService()
        self.addCleanup(second.api.hub.stop)  # type: ignore[union-attr]
        installed = h.kernel.dispatcher._slots["policy"]  # type: ignore[attr-defined]
        self.assertIs(installed, second.api.engine)  # type: ignore[union-attr]
        self.assertIsNot(installed, first)

    def test_listening_writes_api_json(self) -> None:
        """Once bound, <state_dir>/api.json names the URL; a stop removes it."""
        h = APIHarness(self)
        assert isinstance(h.clock, MemoryReactorClock)
        info = json.loads((h.state_dir / "api.json").read_text())
        self.assertTrue(info["url"].startswith("http://"))
        self.assertEqual(info["node_id"], "n1")
        (_port, factory, _backlog, _iface) = h.clock.tcpServers[0]
        self.assertIsInstance(factory, APISite)
        self.assertFalse(factory.access_log)
        self.successResultOf(h.service.stopService())
        self.assertFalse((h.state_dir / "api.json").exists())


class SiteTests(SynchronousTestCase):
    def test_oversized_bodies_are_never_buffered(self) -> None:
        """The site's body buffer keeps nothing past max_body and flags the overflow."""
        site = APISite(Router(), max_body=10)
        declared = site.getContentFile(11)
        self.assertTrue(declared.overflow)
        streamed = site.getContentFile(None)
        assert isinstance(streamed, LimitedBuffer)
        streamed.write(b"x" * 8)
        streamed.write(b"y" * 8)
        self.assertTrue(streamed.overflow)
        self.assertEqual(streamed.getvalue(), b"")
        small = site.getContentFile(None)
        small.write(b"12345")
        self.assertEqual((small.overflow, small.getvalue()), (False, b"12345"))


class KernelViewTests(SynchronousTestCase):
    def test_leadership_answer_follows_the_registry(self) -> None:
        """The memoised leadership answer changes as soon as a role or term does."""
        from piccolod.events import Role

        h = APIHarness(self)
        admin, _ = h.set_up()
        first = admin.get("/api/v1/leadership").body
        self.assertEqual(first["resources"][0]["term"], 1)
        self.assertEqual(admin.get("/api/v1/leadership").body, first)
        h.registry.update("control-plane", Role.FOLLOWER, 2, "n2", "http://10.0.0.2:8080")
        second = admin.get("/api/v1/leadership").body["resources"][0]
        self.assertEqual(
            (second["role"], second["term"], second["leader_id"]), ("follower", 2, "n2")
        )
