"""
Commands built from JSON: the name → class catalogue behind
``POST /api/v1/commands/{name}``.

The catalogue is every subclass of :class:`~piccolod.commands.Command` (found
recursively through ``__subclasses__``, so a plugin's own command types are
included once imported) that has a ``name``.  A JSON object becomes a
command only after it has been checked against the class's attrs fields:
no unknown members, every required one present, and each value of the
field's annotated type (``str``, ``int``, ``float``, ``bool``, ``None``,
unions of those, ``tuple[T, ...]`` from a JSON array, ``dict[str, ...]``, and
nested attrs values from JSON objects).  Only then is the class called, and
its own validators have the last word (``InvalidCommand``).  Anything the
constructor raises is a 400, never a 500.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, Union

import attrs
from twisted.logger import Logger

from piccolod.commands import Command
from piccolod.errors import InvalidCommand

__all__ = ["CommandCatalog", "build_command", "command_schema"]

log = Logger()

NAME_PATTERN = "^[a-z][a-z0-9_]*(\\.[a-z][a-z0-9_]*)+$"

_NONE = type(None)


def _all_subclasses(root: type[Command]) -> list[type[Command]]:
    seen: list[type[Command]] = []
    stack = list(root.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen


def _is_attrs(cls: type) -> bool:
    return attrs.has(cls)


class CommandCatalog:
    """Command classes by name, refreshed when new subclasses appear."""

    def __init__(self) -> None:
        self._count = -1
        self._by_name: dict[str, type[Command]] = {}

    def _refresh(self) -> None:
        classes = _all_subclasses(Command)
        if len(classes) == self._count:
            return
        self._count = len(classes)
        table: dict[str, type[Command]] = {}
        for cls in classes:
            name = getattr(cls, "name", "")
            if not name or not _is_attrs(cls):
                continue
            if name in table and table[name] is not cls and issubclass(table[name], cls):
                continue  # keep the more derived class (a subclass refining a command)
            table[name] = cls
        self._by_name = table

    def get(self, name: str) -> type[Command] | None:
        self._refresh()
        return self._by_name.get(name)

    def names(self) -> list[str]:
        self._refresh()
        return sorted(self._by_name)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: check nothing
        return {}


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(tp)
    if origin is Union or isinstance(tp, types.UnionType):
        return typing.get_args(tp)
    return None


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` as ``tp`` (JSON arrays to tuples, objects to attrs values); raises."""
    if tp is Any or tp is object:
        return value
    options = _union_args(tp)
    if options is not None:
        if value is None and _NONE in options:
            return None
        errors = []
        for option in options:
            if option is _NONE:
                continue
            try:
                return _convert(option, value, where)
            except InvalidCommand as e:
                errors.append(e.detail)
        raise InvalidCommand(errors[0] if len(errors) == 1 else f"{where} has the wrong type")
    if tp is _NONE:
        if value is not None:
            raise InvalidCommand(f"{where} must be null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise InvalidCommand(f"{where} must be a boolean")
        return value
    if tp is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise InvalidCommand(f"{where} must be an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidCommand(f"{where} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise InvalidCommand(f"{where} must be a string")
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple or tp is tuple:
        if not isinstance(value, list):
            raise InvalidCommand(f"{where} must be an array")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and args != ((),):
            if len(args) != len(value):
                raise InvalidCommand(f"{where} must have {len(args)} items")
            return tuple(
                _convert(a, v, f"{where}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        return tuple(value)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise InvalidCommand(f"{where} must be an array")
        item = args[0] if args else Any
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise InvalidCommand(f"{where} must be an object")
        item = args[1] if len(args) == 2 else Any
        return {k: _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and attrs.has(tp):
        if not isinstance(value, dict):
            raise InvalidCommand(f"{where} must be an object")
        return _construct(tp, value, where)
    return value  # unknown annotation: the class's validators decide


def _construct(cls: type, body: Mapping[str, Any], where: str) -> Any:
    fields = {f.name: f for f in attrs.fields(cls) if f.init}
    hints = _hints(cls)
    unknown = sorted(set(body) - set(fields))
    errors = [f"{where}.{name} is not allowed" for name in unknown]
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        alias = field.alias or name
        if name not in body:
            if field.default is attrs.NOTHING:
                errors.append(f"{where}.{name} is required")
            continue
        try:
            kwargs[alias] = _convert(hints.get(name, Any), body[name], f"{where}.{name}")
        except InvalidCommand as e:
            errors.append(e.detail)
    if errors:
        raise InvalidCommand(errors[0], errors=errors)
    try:
        return cls(**kwargs)
    except InvalidCommand:
        raise
    except (TypeError, ValueError) as e:
        raise InvalidCommand(f"{where}: {e}") from None
    except Exception as e:  # a validator that raised something untyped
        log.info("building {command} from JSON raised {error!r}", command=cls.__name__, error=e)
        raise InvalidCommand(f"{where} is not valid") from None


def build_command(cls: type[Command], body: Any) -> Command:
    """The command ``cls`` from a JSON body; raises ``InvalidCommand``."""
    if not isinstance(body, dict):
        raise InvalidCommand("the command arguments must be a JSON object")
    command = _construct(cls, body, "body")
    assert isinstance(command, Command)
    return command


def _type_schema(tp: Any) -> dict[str, Any]:
    options = _union_args(tp)
    if options is not None:
        return {"anyOf": [_type_schema(o) for o in options]}
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", _NONE: "null"}
    if tp in simple:
        return {"type": simple[tp]}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (tuple, list) or tp in (tuple, list):
        item = args[0] if args and args[0] is not Ellipsis and args != ((),) else Any
        return {"type": "array", "items": _type_schema(item)}
    if origin in (dict, Mapping) or tp is dict:
        return {"type": "object"}
    if isinstance(tp, type) and attrs.has(tp):
        return command_schema(tp)
    return {}


def command_schema(cls: type) -> dict[str, Any]:
    """A JSON schema of ``cls``'s constructor arguments (documentation)."""
    hints = _hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field in attrs.fields(cls):
        if not field.init:
            continue
        schema = _type_schema(hints.get(field.name, Any))
        if not field.repr:
            schema["writeOnly"] = True
        properties[field.name] = schema
        if field.default is attrs.NOTHING:
            required.append(field.name)
    out: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        out["required"] = required
    return out
