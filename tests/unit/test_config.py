"""Tests for piccolod.config: the TOML config tree and its collected errors."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from piccolod import config
from piccolod.errors import ConfigError


class ParseTests(SynchronousTestCase):
    def test_empty_document_gives_defaults(self) -> None:
        """An empty config is the embedded defaults."""
        c = config.parse({})
        self.assertEqual(c.daemon.state_dir, config.DEFAULT_STATE_DIR)
        self.assertEqual(c.daemon.stop_timeout, 10.0)
        self.assertEqual(dict(c.subsystems), {})

    def test_values_are_read(self) -> None:
        """Known keys are read and numbers coerced to floats."""
        c = config.parse(
            {
                "daemon": {"node_id": "box-1", "stop_timeout": 3, "plugin_packages": ["x.y"]},
                "subsystems": {"consensus": {"variant": "single-node"}},
            }
        )
        self.assertEqual(c.daemon.node_id, "box-1")
        self.assertEqual(c.daemon.stop_timeout, 3.0)
        self.assertEqual(c.daemon.plugin_packages, ("x.y",))
        self.assertEqual(c.subsystems["consensus"]["variant"], "single-node")

    def test_every_error_is_reported_together(self) -> None:
        """Unknown sections, unknown keys, wrong types and bad values are all listed at once."""
        with self.assertRaises(ConfigError) as cm:
            config.parse(
                {
                    "deamon": {},
                    "daemon": {"colour": "red", "stop_timeout": "soon", "node_id": "a b"},
                    "subsystems": {"x": 1},
                }
            )
        errors = cm.exception.errors
        self.assertEqual(len(errors), 5, errors)
        joined = "\n".join(errors)
        for needle in (
            "[deamon]",
            "'colour'",
            "stop_timeout must be a number",
            "node_id",
            "[subsystems]",
        ):
            self.assertIn(needle, joined)

    def test_non_positive_stop_timeout_is_refused(self) -> None:
        """A stop timeout of zero is a config error."""
        with self.assertRaises(ConfigError) as cm:
            config.parse({"daemon": {"stop_timeout": 0}})
        self.assertIn("stop_timeout must be positive", cm.exception.errors[0])

    def test_bool_is_not_a_number(self) -> None:
        """TOML booleans are not accepted where a number is expected."""
        with self.assertRaises(ConfigError):
            config.parse({"daemon": {"stop_timeout": True}})


class LoadTests(SynchronousTestCase):
    def test_load_reads_a_file(self) -> None:
        """A TOML file on disk is loaded and remembers its source."""
        path = Path(self.mktemp())
        path.write_text('[daemon]\nnode_id = "n1"\n[subsystems.api]\nlisten = "tcp:0"\n')
        c = config.load(path)
        self.assertEqual(c.daemon.node_id, "n1")
        self.assertEqual(c.source, str(path))

    def test_missing_file(self) -> None:
        """A missing file is a ConfigError naming it."""
        with self.assertRaises(ConfigError) as cm:
            config.load("/nonexistent/piccolod.toml")
        self.assertIn("does not exist", cm.exception.errors[0])

    def test_invalid_toml(self) -> None:
        """Malformed TOML is a ConfigError, not a traceback."""
        path = Path(self.mktemp())
        path.write_text("[daemon\n")
        with self.assertRaises(ConfigError) as cm:
            config.load(path)
        self.assertIn("not valid TOML", cm.exception.errors[0])

    def test_overrides(self) -> None:
        """--state-dir and --listen override the file."""
        c = config.with_overrides(config.parse({}), state_dir="/tmp/s", listen="tcp:9")
        self.assertEqual(c.daemon.state_dir, "/tmp/s")
        self.assertEqual(c.subsystems["api"]["listen"], "tcp:9")


class ShippedConfigTests(SynchronousTestCase):
    def test_packaged_config_loads_and_selects_plugins(self) -> None:
        """packaging/piccolod.toml is valid and names only real slots, variants and keys."""
        from piccolod.tap import settle

        root = Path(__file__).resolve().parents[2]
        c = config.load(root / "packaging" / "piccolod.toml")
        self.assertEqual(c.daemon.state_dir, "/var/lib/piccolod")
        settings = settle(c, {})
        self.assertEqual(settings.chosen["api"][0].variant, "http")
        self.assertEqual(settings.chosen["consensus"][0].variant, "single-node")
        # A real box never keeps volumes in plaintext, and is found on the LAN.
        self.assertEqual(settings.chosen["volumes"][0].variant, "gocryptfs")
        self.assertEqual(settings.chosen["containers"][0].variant, "podman")
        self.assertEqual(settings.chosen["mdns"][0].variant, "multicast")
        self.assertEqual(c.subsystems["mdns"]["hostname"], "piccolo")
