"""
Subsystem plugins: discovery, selection and verified construction.

Each adapter of each slot is an :class:`SubsystemPlugin` instance living in
a ``twisted/plugins/piccolod_*.py`` drop-in file (or in any plugin package a
caller passes to :func:`discover`).  The kernel takes one variant per slot
from the config file or ``--use SLOT=VARIANT``, builds it from a
:class:`SubsystemContext`, and verifies the result with ``verifyObject``
for ``IService`` and everything the plugin declares it provides.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import IService
from twisted.plugin import IPlugin, getPlugins
from twisted.python.reflect import namedAny
from zope.interface import Interface, implementer
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from piccolod.errors import ConfigError
from piccolod.interfaces import ISubsystemPlugin

if TYPE_CHECKING:
    from piccolod.kernel.runtime import Kernel


@attrs.frozen
class SubsystemContext:
    """
    What a plugin's factory receives.

    @ivar kernel: the shared kernel (clock/reactor, bus, registry, dispatcher,
        health, supervisor, node id, state dir).
    @ivar config: this slot's ``[subsystems.<slot>]`` section, defaults
        filled in, ``variant`` removed.
    @ivar deps: what ``requires`` named, resolved from other slots' services.
    """

    slot: str
    variant: str
    kernel: Kernel
    config: Mapping[str, Any]
    deps: Mapping[type[Interface], Any] = attrs.field(factory=dict)

    @property
    def reactor(self) -> Any:
        return self.kernel.reactor

    def dep(self, interface: type[Interface]) -> Any:
        """The service providing ``interface``; raises ``ConfigError``."""
        try:
            return self.deps[interface]
        except KeyError:
            raise ConfigError(
                [f"{self.slot}: requires {interface.__name__}, which no selected slot provides"]
            ) from None


def _frozen_keys(keys: Mapping[str, Any] | str) -> Mapping[str, Any] | str:
    if isinstance(keys, str):
        return keys
    return types.MappingProxyType(dict(keys))


@implementer(IPlugin, ISubsystemPlugin)
@attrs.frozen
class SubsystemPlugin:
    """
    One (slot, variant).  ``factory`` is a dotted name imported lazily, like
    ``ServiceMaker``, and called with the :class:`SubsystemContext`.
    """

    slot: str
    variant: str
    description: str
    factory: str
    provides: tuple[type[Interface], ...] = ()
    requires: tuple[type[Interface], ...] = ()
    #: The section's keys with their defaults, or the dotted name of such a
    #: mapping, imported only when the plugin is chosen (so that a plugin
    #: file never imports its implementation: discovery stays cheap).
    _config_keys: Mapping[str, Any] | str = attrs.field(
        factory=dict, converter=_frozen_keys, alias="config_keys"
    )
    #: Slots always started, even if no config section names them.
    default: bool = False

    @property
    def config_keys(self) -> Mapping[str, Any]:
        keys = self._config_keys
        if isinstance(keys, str):
            return types.MappingProxyType(dict(namedAny(keys)))
        return keys

    def build(self, context: Any) -> IService:
        factory = namedAny(self.factory)
        return factory(context)  # type: ignore[no-any-return]


def discover(packages: Iterable[types.ModuleType] | None = None) -> list[ISubsystemPlugin]:
    """
    Every ``ISubsystemPlugin`` in ``packages`` (default: ``twisted.plugins``).
    Tests pass their own plugin package instead of patching ``__path__``.
    """
    if packages is None:
        return list(getPlugins(ISubsystemPlugin))
    found: list[ISubsystemPlugin] = []
    for package in packages:
        found.extend(getPlugins(ISubsystemPlugin, package))
    return found


@attrs.frozen
class Catalogue:
    """The discovered plugins, indexed by slot and variant."""

    plugins: Mapping[str, Mapping[str, ISubsystemPlugin]]

    @classmethod
    def build(cls, plugins: Iterable[ISubsystemPlugin]) -> Catalogue:
        errors: list[str] = []
        table: dict[str, dict[str, ISubsystemPlugin]] = {}
        for plugin in plugins:
            slot = table.setdefault(plugin.slot, {})
            if plugin.variant in slot:
                errors.append(f"slot {plugin.slot!r}: two plugins for variant {plugin.variant!r}")
                continue
            slot[plugin.variant] = plugin
        if errors:
            raise ConfigError(errors)
        return cls(plugins=table)

    def slots(self) -> list[str]:
        return sorted(self.plugins)

    def variants(self, slot: str) -> list[str]:
        return sorted(self.plugins.get(slot, {}))

    def get(self, slot: str, variant: str) -> ISubsystemPlugin:
        if slot not in self.plugins:
            raise ConfigError(
                [f"unknown slot {slot!r}; choices: {', '.join(self.slots()) or '(none)'}"]
            )
        try:
            return self.plugins[slot][variant]
        except KeyError:
            raise ConfigError(
                [
                    f"slot {slot!r}: unknown variant {variant!r}; "
                    f"choices: {', '.join(self.variants(slot))}"
                ]
            ) from None

    def describe(self) -> str:
        """A listing for ``--help`` and error messages."""
        lines = []
        for slot in self.slots():
            for variant in self.variants(slot):
                plugin = self.plugins[slot][variant]
                lines.append(f"  {slot}={variant}: {plugin.description}")
        return "\n".join(lines)


def select(
    catalogue: Catalogue,
    sections: Mapping[str, Mapping[str, Any]],
    overrides: Mapping[str, str],
) -> dict[str, tuple[ISubsystemPlugin, dict[str, Any]]]:
    """
    Choose one variant per slot and validate each slot's section against the
    chosen plugin's ``config_keys``.  Every problem is collected and raised
    together as one ``ConfigError``.

    A slot is selected when its section exists, when ``--use`` names it, or
    when one of its plugins is marked ``default`` (that plugin being the
    variant unless another is named).
    """
    errors: list[str] = []
    chosen: dict[str, tuple[ISubsystemPlugin, dict[str, Any]]] = {}
    wanted: dict[str, str | None] = {}
    for slot in catalogue.slots():
        for plugin in catalogue.plugins[slot].values():
            if getattr(plugin, "default", False):
                wanted[slot] = plugin.variant
    for slot, section in sections.items():
        variant = section.get("variant")
        if variant is not None and not isinstance(variant, str):
            errors.append(f"[subsystems.{slot}] variant must be a string")
            continue
        wanted[slot] = variant if variant is not None else wanted.get(slot)
    for slot, variant in overrides.items():
        wanted[slot] = variant
    for slot, variant in sorted(wanted.items()):
        if variant is None:
            errors.append(
                f"[subsystems.{slot}] names no variant; choices: "
                f"{', '.join(catalogue.variants(slot)) or '(unknown slot)'}"
            )
            continue
        try:
            plugin = catalogue.get(slot, variant)
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        section = {k: v for k, v in sections.get(slot, {}).items() if k != "variant"}
        config = dict(plugin.config_keys)
        for key, value in section.items():
            if key not in plugin.config_keys:
                allowed = ", ".join(sorted(plugin.config_keys)) or "(none)"
                errors.append(
                    f"[subsystems.{slot}] unknown key {key!r} for variant {variant!r}; "
                    f"allowed: {allowed}"
                )
                continue
            default = plugin.config_keys[key]
            if default is not None and not _same_kind(default, value):
                errors.append(
                    f"[subsystems.{slot}] {key} must be {type(default).__name__}, "
                    f"got {type(value).__name__}"
                )
                continue
            config[key] = value
        chosen[slot] = (plugin, config)
    if errors:
        raise ConfigError(errors)
    return chosen


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def verify(plugin: ISubsystemPlugin, service: object) -> None:
    """
    Check that a built service provides ``IService`` and every interface the
    plugin declares; raise ``ConfigError`` naming the plugin if not.
    """
    problems: list[str] = []
    for interface in (IService, *plugin.provides):
        try:
            verifyObject(interface, service)
        except Invalid as e:
            problems.append(
                f"{plugin.slot}={plugin.variant}: built object does not provide "
                f"{getattr(interface, '__name__', interface)}: {e}"
            )
    if problems:
        raise ConfigError(problems)


def order_slots(
    chosen: Mapping[str, tuple[ISubsystemPlugin, Any]],
) -> tuple[list[str], dict[str, list[str]]]:
    """
    Start order of the chosen slots, from what each ``requires`` and the
    others ``provide``; returns ``(order, requirements by slot)``.  A
    missing provider or a cycle is a ``ConfigError``.
    """
    providers: dict[type[Interface], str] = {}
    for slot, (plugin, _) in chosen.items():
        for interface in plugin.provides:
            providers[interface] = slot
    needs: dict[str, list[str]] = {}
    errors: list[str] = []
    for slot, (plugin, _) in chosen.items():
        needs[slot] = []
        for interface in plugin.requires:
            if interface not in providers:
                errors.append(
                    f"{slot}={plugin.variant} requires {interface.__name__}, "
                    "which no selected slot provides"
                )
            elif providers[interface] != slot:
                needs[slot].append(providers[interface])
    if errors:
        raise ConfigError(errors)
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(slot: str, path: Sequence[str]) -> None:
        if state.get(slot) == 2:
            return
        if state.get(slot) == 1:
            raise ConfigError([f"dependency cycle: {' -> '.join([*path, slot])}"])
        state[slot] = 1
        for dep in sorted(needs[slot]):
            visit(dep, [*path, slot])
        state[slot] = 2
        order.append(slot)

    for slot in sorted(chosen):
        visit(slot, [])
    return order, needs
