"""
A small JSON Schema (2020-12 subset) validator for request bodies and
parameters.

The same schema dicts are published in ``openapi.json``, so what the
document promises and what the server checks cannot drift apart.  Supported
keywords: ``type`` (one name or a list), ``enum``, ``const``, ``minLength``,
``maxLength``, ``pattern`` (matched as a whole string), ``minimum``,
``maximum``, ``properties``, ``required``, ``additionalProperties`` (a
boolean or a schema), ``minProperties``, ``maxProperties``, ``items``,
``minItems``, ``maxItems``, ``anyOf``.  Anything else in a schema is documentation only.

As JSON Schema says, a number with a zero fractional part (``1.0``) is an
``integer``, and ``true``/``false`` are never numbers.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["validate"]

#: At most this many errors are reported for one document.
MAX_ERRORS = 20


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    core = pattern
    if core.startswith("^"):
        core = core[1:]
    if core.endswith("$") and not core.endswith("\\$"):
        core = core[:-1]
    return re.compile(core)


def _is_type(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer()
        )
    if kind == "number":
        return isinstance(value, (int, float)) and (
            not isinstance(value, float) or math.isfinite(value)
        )
    return True


def validate(schema: Mapping[str, Any], value: Any, where: str = "body") -> list[str]:
    """Every way ``value`` violates ``schema`` (empty when it conforms)."""
    errors: list[str] = []
    _validate(schema, value, where, errors)
    return errors[:MAX_ERRORS]


def _validate(schema: Mapping[str, Any], value: Any, where: str, errors: list[str]) -> None:
    if len(errors) >= MAX_ERRORS:
        return
    kind = schema.get("type")
    if kind is not None:
        kinds = [kind] if isinstance(kind, str) else list(kind)
        if not any(_is_type(value, k) for k in kinds):
            errors.append(f"{where} must be {' or '.join(kinds)}")
            return
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where} must be {schema['const']!r}")
        return
    if "enum" in schema and not any(
        value == choice and type(value) is type(choice) for choice in schema["enum"]
    ):
        errors.append(f"{where} must be one of {', '.join(map(str, schema['enum']))}")
        return
    if "anyOf" in schema:
        options = schema["anyOf"]
        if not any(not validate(option, value, where) for option in options):
            errors.append(f"{where} matches none of the allowed forms")
            return
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where} must have at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where} must have at most {schema['maxLength']} characters")
        if "pattern" in schema and _regex(schema["pattern"]).fullmatch(value) is None:
            errors.append(f"{where} must match {schema['pattern']}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where} must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where} must be <= {schema['maximum']}")
    elif isinstance(value, dict):
        properties: Mapping[str, Any] = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                errors.append(f"{where}.{name} is required")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errors.append(f"{where} must have at most {schema['maxProperties']} members")
        if len(value) < schema.get("minProperties", 0):
            errors.append(f"{where} must have at least {schema['minProperties']} members")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                _validate(properties[name], item, f"{where}.{name}", errors)
            elif extra is False:
                errors.append(f"{where}.{name} is not allowed")
            elif isinstance(extra, Mapping):
                _validate(extra, item, f"{where}.{name}", errors)
    elif isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where} must have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where} must have at most {schema['maxItems']} items")
        items = schema.get("items")
        if isinstance(items, Mapping):
            for index, item in enumerate(value):
                _validate(items, item, f"{where}[{index}]", errors)
