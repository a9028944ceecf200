"""
Tests for piccolod.api.schema (request validation) and piccolod.api.catalog (commands from JSON).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
from twisted.trial.unittest import SynchronousTestCase

from piccolod.api.catalog import CommandCatalog, build_command, command_schema
from piccolod.api.schema import validate
from piccolod.commands import (
    AttachVolume,
    Command,
    ExposedListener,
    Ping,
    UnlockStorage,
    non_empty,
)
from piccolod.errors import InvalidCommand


class SchemaTests(SynchronousTestCase):
    BODY: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 5, "pattern": "^[a-z]+$"},
            "count": {"type": "integer", "minimum": 0, "maximum": 10},
            "mode": {"type": "string", "enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            "ttl": {"type": ["number", "null"]},
        },
        "additionalProperties": False,
    }

    def test_valid(self) -> None:
        """A conforming document has no errors; 3.0 is an integer, null where allowed."""
        self.assertEqual(validate(self.BODY, {"name": "ab", "count": 3.0, "ttl": None}), [])

    def test_every_violation_is_named(self) -> None:
        """Each violated keyword gives a message naming the member."""
        cases = {
            "body must be object": [],
            "body.name is required": {},
            "body.extra is not allowed": {"name": "a", "extra": 1},
            "body.name must match": {"name": "A"},
            "body.name must have at most 5": {"name": "abcdef"},
            "body.count must be integer": {"name": "a", "count": True},
            "body.count must be <= 10": {"name": "a", "count": 11},
            "body.mode must be one of": {"name": "a", "mode": "c"},
            "body.tags must have at most 2": {"name": "a", "tags": ["x", "y", "z"]},
            "body.tags[0] must be string": {"name": "a", "tags": [1]},
            "body.ttl must be number or null": {"name": "a", "ttl": "1"},
        }
        for message, value in cases.items():
            errors = validate(self.BODY, value)
            self.assertTrue(any(e.startswith(message) for e in errors), (message, errors))

    def test_pattern_anchors_do_not_admit_a_trailing_newline(self) -> None:
        """``$`` means the end of the string, as in JSON Schema (not Python's before-newline)."""
        self.assertNotEqual(validate(self.BODY, {"name": "ab\n"}), [])

    def test_any_of_and_non_finite_numbers(self) -> None:
        """anyOf needs one option to hold; NaN and infinity are not numbers."""
        self.assertNotEqual(validate({"type": "object", "minProperties": 1}, {}), [])
        schema = {"type": "object", "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}
        self.assertEqual(validate(schema, {"b": 1}), [])
        self.assertNotEqual(validate(schema, {"c": 1}), [])
        self.assertNotEqual(validate({"type": "number"}, float("nan")), [])
        self.assertNotEqual(validate({"type": "integer"}, float("inf")), [])


@attrs.frozen
class Nested(Command):
    """A test command with every supported field type."""

    name: ClassVar[str] = "test.nested"
    title: str = attrs.field(validator=non_empty)
    count: int = 1
    ratio: float = 0.5
    flags: tuple[str, ...] = ()
    extra: dict[str, Any] = attrs.field(factory=dict)
    listener: ExposedListener | None = None


@attrs.frozen
class Exploding(Command):
    """A command whose own validation is buggy (raises an untyped error)."""

    name: ClassVar[str] = "test.exploding"
    x: int = 0

    def __attrs_post_init__(self) -> None:
        raise KeyError("bug")


class CatalogTests(SynchronousTestCase):
    def test_catalogue_finds_subclasses_by_name(self) -> None:
        """Every named attrs command class, including ones defined later, is found."""
        catalog = CommandCatalog()
        self.assertIs(catalog.get("kernel.ping"), Ping)
        self.assertIs(catalog.get("test.nested"), Nested)
        self.assertIsNone(catalog.get("nope"))

        @attrs.frozen
        class Late(Command):
            name: ClassVar[str] = "test.late"

        self.assertIs(catalog.get("test.late"), Late)

    def test_build_converts_json_types(self) -> None:
        """Arrays become tuples, objects become nested values, 2.0 an int."""
        command = build_command(
            Nested,
            {
                "title": "t",
                "count": 2.0,
                "ratio": 1,
                "flags": ["a", "b"],
                "extra": {"k": [1]},
                "listener": {"listener": "web", "protocol": "http"},
            },
        )
        assert isinstance(command, Nested)
        self.assertEqual(command.count, 2)
        self.assertIsInstance(command.count, int)
        self.assertEqual(command.ratio, 1.0)
        self.assertEqual(command.flags, ("a", "b"))
        self.assertEqual(command.listener, ExposedListener("web", "http"))

    def test_build_refuses_bad_input(self) -> None:
        """
        Missing, unknown and mistyped members, and the class's own validators, are
        InvalidCommand.
        """
        for body in (
            {},
            {"title": "t", "nope": 1},
            {"title": 1},
            {"title": "t", "count": 1.5},
            {"title": "t", "flags": "ab"},
            {"title": "t", "listener": {"listener": "w", "protocol": "gopher"}},
            {"title": " "},
            "not an object",
        ):
            with self.assertRaises(InvalidCommand, msg=repr(body)):
                build_command(Nested, body)
        with self.assertRaises(InvalidCommand):
            build_command(UnlockStorage, {"password": "a", "recovery_key": "b"})
        with self.assertRaises(InvalidCommand):
            build_command(AttachVolume, {"volume_id": "Bad Name"})

    def test_untyped_errors_of_a_command_class_are_400(self) -> None:
        """A command class whose validation raises something untyped still gives InvalidCommand."""
        with self.assertRaises(InvalidCommand):
            build_command(Exploding, {"x": 1})

    def test_schema(self) -> None:
        """The JSON schema names required members, types and write-only secrets."""
        schema = command_schema(Nested)
        self.assertEqual(schema["required"], ["title"])
        self.assertEqual(
            schema["properties"]["flags"], {"type": "array", "items": {"type": "string"}}
        )
        self.assertFalse(schema["additionalProperties"])
        secret = command_schema(UnlockStorage)["properties"]["password"]
        self.assertTrue(secret["writeOnly"])
