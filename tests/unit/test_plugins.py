"""Tests for piccolod.kernel.plugins: discovery, selection, verification, ordering."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface

import tests.plugins
from piccolod.errors import ConfigError
from piccolod.interfaces import IConsensus
from piccolod.kernel import plugins
from piccolod.kernel.plugins import Catalogue, SubsystemPlugin
from tests.thirdparty import EchoService, IEcho


class IThing(Interface):
    """A test interface."""


def plugin(slot: str, variant: str, **kw: Any) -> SubsystemPlugin:
    return SubsystemPlugin(
        slot=slot,
        variant=variant,
        description=f"{slot} {variant}",
        factory=kw.pop("factory", "tests.thirdparty.EchoService.from_context"),
        **kw,
    )


class DiscoveryTests(SynchronousTestCase):
    def test_discovers_plugins_of_a_foreign_package(self) -> None:
        """getPlugins finds the variant in a plugin package piccolod never names."""
        found = plugins.discover([tests.plugins])
        self.assertEqual([(p.slot, p.variant) for p in found], [("echo", "loud")])

    def test_shipped_drop_ins_are_found(self) -> None:
        """The default discovery sees piccolod's own drop-ins (api and consensus)."""
        found = {(p.slot, p.variant) for p in plugins.discover()}
        self.assertIn(("api", "http"), found)
        self.assertIn(("consensus", "single-node"), found)

    def test_foreign_variant_is_selected_and_built(self) -> None:
        """A variant from a foreign package is selected with --use and builds a verified service."""
        catalogue = Catalogue.build(plugins.discover([tests.plugins]))
        chosen = plugins.select(catalogue, {}, {"echo": "loud"})
        p, section = chosen["echo"]
        self.assertEqual(section, {"greeting": "HELLO"})
        service = p.build(_Ctx(section))
        plugins.verify(p, service)
        self.assertIsInstance(service, EchoService)
        self.assertEqual(IEcho(service).echo("you"), "HELLO, you")


class _Ctx:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config


class SelectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.catalogue = Catalogue.build(
            [
                plugin("consensus", "single-node", default=True, config_keys={"resources": []}),
                plugin("consensus", "etcd", config_keys={"endpoints": ["x"], "ttl": 10}),
                plugin("mdns", "null"),
            ]
        )

    def test_default_variant_is_chosen(self) -> None:
        """A slot whose plugin is marked default is selected without config."""
        chosen = plugins.select(self.catalogue, {}, {})
        self.assertEqual(
            {k: p.variant for k, (p, _) in chosen.items()}, {"consensus": "single-node"}
        )

    def test_config_section_chooses_variant_and_keys(self) -> None:
        """A section's variant and keys are applied over the declared defaults."""
        chosen = plugins.select(self.catalogue, {"consensus": {"variant": "etcd", "ttl": 5}}, {})
        p, section = chosen["consensus"]
        self.assertEqual(p.variant, "etcd")
        self.assertEqual(section, {"endpoints": ["x"], "ttl": 5})

    def test_use_overrides_config(self) -> None:
        """--use SLOT=VARIANT beats the config file."""
        chosen = plugins.select(
            self.catalogue, {"consensus": {"variant": "etcd"}}, {"consensus": "single-node"}
        )
        self.assertEqual(chosen["consensus"][0].variant, "single-node")

    def test_all_errors_listed_with_choices(self) -> None:
        """Unknown slot, unknown variant, unknown key and wrong type are reported together."""
        with self.assertRaises(ConfigError) as cm:
            plugins.select(
                self.catalogue,
                {"consensus": {"variant": "etcd", "ttl": "ten", "colour": 1}, "mdns": {}},
                {"tunnel": "ssh"},
            )
        errors = cm.exception.errors
        joined = "\n".join(errors)
        self.assertIn("unknown slot 'tunnel'; choices: consensus, mdns", joined)
        self.assertIn("unknown key 'colour'", joined)
        self.assertIn("ttl must be int", joined)
        self.assertIn("[subsystems.mdns] names no variant; choices: null", joined)
        self.assertEqual(len(errors), 4, errors)

    def test_unknown_variant_lists_choices(self) -> None:
        """An unknown variant names the slot's variants."""
        with self.assertRaises(ConfigError) as cm:
            plugins.select(self.catalogue, {}, {"consensus": "raft"})
        self.assertIn("choices: etcd, single-node", cm.exception.errors[0])

    def test_duplicate_plugins_refused(self) -> None:
        """Two plugins for one (slot, variant) are a ConfigError naming the slot."""
        with self.assertRaises(ConfigError) as cm:
            Catalogue.build([plugin("a", "b"), plugin("a", "b")])
        self.assertIn("slot 'a'", cm.exception.errors[0])


class VerifyTests(SynchronousTestCase):
    def test_service_missing_its_interface_is_refused(self) -> None:
        """verify() refuses a built object lacking IService or a declared interface."""
        p = plugin(
            "x",
            "broken",
            factory="tests.thirdparty.NotAService.from_context",
            provides=(IConsensus,),
        )
        service = p.build(_Ctx({}))
        with self.assertRaises(ConfigError) as cm:
            plugins.verify(p, service)
        joined = "\n".join(cm.exception.errors)
        self.assertIn("IService", joined)
        self.assertIn("IConsensus", joined)


class OrderTests(SynchronousTestCase):
    def test_requirements_order_slots(self) -> None:
        """A slot requiring another's interface starts after it."""
        chosen: dict[str, Any] = {
            "apps": (plugin("apps", "x", requires=(IThing,)), {}),
            "containers": (plugin("containers", "fake", provides=(IThing,)), {}),
        }
        order, needs = plugins.order_slots(chosen)
        self.assertEqual(order, ["containers", "apps"])
        self.assertEqual(needs["apps"], ["containers"])

    def test_missing_provider(self) -> None:
        """Requiring an interface no selected slot provides is a ConfigError."""
        chosen: dict[str, Any] = {"apps": (plugin("apps", "x", requires=(IThing,)), {})}
        with self.assertRaises(ConfigError) as cm:
            plugins.order_slots(chosen)
        self.assertIn("requires IThing", cm.exception.errors[0])

    def test_cycle(self) -> None:
        """A requirement cycle is a ConfigError showing the cycle."""

        class IOther(Interface):
            """Another."""

        chosen: dict[str, Any] = {
            "a": (plugin("a", "x", provides=(IThing,), requires=(IOther,)), {}),
            "b": (plugin("b", "x", provides=(IOther,), requires=(IThing,)), {}),
        }
        with self.assertRaises(ConfigError) as cm:
            plugins.order_slots(chosen)
        self.assertIn("dependency cycle", cm.exception.errors[0])
