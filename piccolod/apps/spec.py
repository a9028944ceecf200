"""
The app spec: YAML in, a validated :class:`AppSpec` out.

Parsing is safe (``yaml.SafeLoader``; no anchors or aliases, no duplicate
keys, bounded size and depth) and validation reports **every** error at
once, each with its path (``listeners[1].guest_port: ...``), as one
:class:`~piccolod.errors.InvalidCommand`.

Everything the spec accepts is enforced by the controller; fields that
piccolod cannot enforce (``build.git``, ``resources.limits.storage``,
``size_limit`` on persistent volumes, fine-grained network permissions)
are refused with an error that says so, never silently ignored.

The accepted document::

    name: blog                       # ^[a-z][a-z0-9-]*[a-z0-9]$, <= 50, not reserved
    type: user                       # user | system (system: podman restart=always)
    image: localhost/blog:1          # local images only (never pulled)
    # build:                         # instead of image (not both)
    #   containerfile: "FROM localhost/base:1\\nRUN ..."
    #   build_args: {K: V}
    #   target: stage
    command: [/bin/httpd, -f]        # optional
    listeners:                       # required, at least one
      - name: web                    # unique
        guest_port: 8080             # unique, 1-65535
        flow: tcp                    # tcp | tls (tls: passed through untouched)
        protocol: http               # raw | http | websocket
        remote_ports: [80, 443]
    storage:
      persistent:                    # one persistence volume each, bind-mounted
        data: {container: /data}
      temporary:                     # tmpfs, size enforced
        cache: {container: /cache, size_limit: 64MB}
    environment: {KEY: value}
    resources: {limits: {memory: 256MB, cpu: 0.5}}
    healthcheck: {http: {path: /health, listener: web, interval: 10, timeout: 5, retries: 3}}
    depends_on: [db]
    permissions: {network: {internet: allow}}   # only allow (deny is refused: not enforceable)
    cluster: {mode: stateful}        # stateful | stateless_read_only
    x-anything: ...                  # extension metadata, kept, never interpreted
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from piccolod.errors import InvalidCommand

__all__ = [
    "MAX_DEPTH",
    "MAX_SPEC_BYTES",
    "RESERVED_NAMES",
    "AppSpec",
    "BuildSpec",
    "HealthcheckSpec",
    "ListenerSpec",
    "PersistentVolume",
    "TemporaryVolume",
    "app_volume_id",
    "parse_spec",
    "spec_from_json",
    "valid_app_name",
]

#: The largest YAML document accepted (bytes).
MAX_SPEC_BYTES = 64 * 1024
#: How deeply collections may nest.
MAX_DEPTH = 16
#: Names that collide with the portal's own hosts and paths.
RESERVED_NAMES = frozenset({"api", "www", "admin", "root", "system", "piccolo"})
MAX_NAME_LENGTH = 50

_NAME = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")
_LISTENER = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_VOLUME_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?|[kmgt]i?b?)?\s*$")
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KIB": 1024,
    "KI": 1024,
    "M": 1000**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "MI": 1024**2,
    "G": 1000**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "GI": 1024**3,
    "T": 1000**4,
    "TB": 1000**4,
    "TIB": 1024**4,
    "TI": 1024**4,
}

TOP_LEVEL = (
    "name",
    "type",
    "image",
    "build",
    "command",
    "listeners",
    "storage",
    "environment",
    "resources",
    "healthcheck",
    "depends_on",
    "permissions",
    "cluster",
)
FLOWS = ("tcp", "tls")
PROTOCOLS = ("raw", "http", "websocket")
TYPES = ("user", "system")
CLUSTER_MODES = ("stateful", "stateless_read_only")
MIN_MEMORY = 6 * 1024 * 1024  # podman refuses less
DEFAULT_TMPFS = 64 * 1024 * 1024


# ==========================================================================
# The validated spec


@attrs.frozen
class ListenerSpec:
    """One port the app listens on inside its container."""

    name: str
    guest_port: int
    flow: str = "tcp"
    protocol: str = "raw"
    remote_ports: tuple[int, ...] = (80, 443)

    @property
    def http(self) -> bool:
        """Whether the listener goes through the HTTP reverse proxy."""
        return self.protocol in ("http", "websocket") and self.flow == "tcp"


@attrs.frozen
class PersistentVolume:
    """A persistence volume bind-mounted at ``container`` (abs path)."""

    name: str
    container: str


@attrs.frozen
class TemporaryVolume:
    """A tmpfs of ``size`` bytes at ``container``."""

    name: str
    container: str
    size: int = DEFAULT_TMPFS


@attrs.frozen
class BuildSpec:
    """An image built locally from an inline Containerfile (no context, no pull)."""

    containerfile: str
    build_args: tuple[tuple[str, str], ...] = ()
    target: str = ""


@attrs.frozen
class HealthcheckSpec:
    """An HTTP probe against one listener through its loopback port."""

    listener: str
    path: str = "/"
    interval: float = 10.0
    timeout: float = 5.0
    retries: int = 3


@attrs.frozen
class AppSpec:
    """
    A validated app spec.

    @ivar document: the normalised JSON form (what is stored and what
        :func:`spec_from_json` reads back).
    """

    name: str
    listeners: tuple[ListenerSpec, ...]
    document: Mapping[str, Any] = attrs.field(repr=False)
    type: str = "user"
    image: str | None = None
    build: BuildSpec | None = None
    command: tuple[str, ...] = ()
    persistent: tuple[PersistentVolume, ...] = ()
    temporary: tuple[TemporaryVolume, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    memory: int | None = None
    cpus: float | None = None
    healthcheck: HealthcheckSpec | None = None
    depends_on: tuple[str, ...] = ()
    internet: bool = True
    cluster_mode: str = "stateful"

    @property
    def stateful(self) -> bool:
        return self.cluster_mode == "stateful"

    @property
    def resource(self) -> str:
        """The leadership resource of this app (``app:<name>``)."""
        return f"app:{self.name}"

    def image_ref(self) -> str:
        """The image the container runs (a built one is tagged from the spec)."""
        if self.image is not None:
            return self.image
        assert self.build is not None
        digest = hashlib.sha256(
            json.dumps(self.document.get("build"), sort_keys=True).encode()
        ).hexdigest()[:16]
        return f"localhost/piccolod-{self.name}:{digest}"

    def listener(self, name: str) -> ListenerSpec | None:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        return None

    def fingerprint(self) -> str:
        """A digest of everything that shapes the container (drift detection)."""
        return hashlib.sha256(
            json.dumps(self.document, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()[:24]


def app_volume_id(app: str, volume: str) -> str:
    """
    The persistence volume id of an app's persistent volume:
    ``app-<name>-<volume>`` (at most 63 characters: names are at most 50,
    volume names at most 8).
    """
    return f"app-{app}-{volume}"


def valid_app_name(name: object) -> bool:
    """Whether ``name`` is a well-formed, unreserved app name."""
    return (
        isinstance(name, str)
        and len(name) <= MAX_NAME_LENGTH
        and _NAME.match(name) is not None
        and name not in RESERVED_NAMES
    )


# ==========================================================================
# Loading YAML safely


@functools.cache
def _yaml() -> tuple[Any, type[Any]]:
    """
    PyYAML and a ``SafeLoader`` that refuses duplicate keys, imported on
    first use (an idle daemon with no app to read does not load PyYAML).
    """
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys."""

    def construct_mapping(loader: Loader, node: yaml.MappingNode) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a scalar", key_node.start_mark
                ) from None
            if key in result:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            result[key] = loader.construct_object(value_node, deep=True)
        return result

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return yaml, Loader


def load_yaml(text: str | bytes) -> Any:
    """
    Parse one YAML document safely.  Raises ``InvalidCommand`` for
    oversized input, anchors/aliases (YAML bombs), excessive nesting,
    duplicate keys or malformed YAML.
    """
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if len(raw) > MAX_SPEC_BYTES:
        raise InvalidCommand(
            "invalid app spec",
            errors=[f"spec: the YAML is {len(raw)} bytes; the limit is {MAX_SPEC_BYTES}"],
        )
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidCommand("invalid app spec", errors=[f"spec: not UTF-8: {e}"]) from None
    yaml, loader = _yaml()
    try:
        depth = 0
        for event in yaml.parse(decoded, Loader=loader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                mark = event.start_mark
                line = mark.line + 1 if mark is not None else 0
                raise InvalidCommand(
                    "invalid app spec",
                    errors=[f"spec: line {line}: YAML anchors and aliases are not allowed"],
                )
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise InvalidCommand(
                        "invalid app spec",
                        errors=[f"spec: nested deeper than {MAX_DEPTH} levels"],
                    )
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        documents = list(yaml.load_all(decoded, Loader=loader))
    except yaml.YAMLError as e:
        raise InvalidCommand(
            "invalid app spec", errors=[f"spec: malformed YAML: {_yaml_message(e)}"]
        ) from None
    if len(documents) != 1:
        raise InvalidCommand(
            "invalid app spec",
            errors=[f"spec: expected exactly one YAML document, found {len(documents)}"],
        )
    return documents[0]


def _yaml_message(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(problem)


# ==========================================================================
# Validation


@attrs.define
class _Errors:
    items: list[str] = attrs.field(factory=list)

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


def parse_spec(text: str | bytes) -> AppSpec:
    """YAML text → :class:`AppSpec`; raises ``InvalidCommand`` with every error."""
    return validate(load_yaml(text))


def spec_from_json(document: Mapping[str, Any]) -> AppSpec:
    """A stored (normalised) document → :class:`AppSpec` (validated again)."""
    return validate(document)


def validate(document: Any) -> AppSpec:
    """Validate a decoded document; raises ``InvalidCommand`` listing every error."""
    errors = _Errors()
    if not isinstance(document, Mapping):
        raise InvalidCommand(
            "invalid app spec",
            errors=[f"spec: must be a mapping, got {_kind(document)}"],
        )
    for key in document:
        if not isinstance(key, str):
            errors.add("spec", f"keys must be strings, got {key!r}")
        elif key not in TOP_LEVEL and not key.startswith("x-"):
            errors.add(key, f"unknown field (allowed: {', '.join(TOP_LEVEL)}, x-*)")

    name = _name(document, errors)
    app_type = _choice(document, "type", TYPES, "user", errors)
    image, build = _image_and_build(document, errors)
    command = _command(document, errors)
    listeners = _listeners(document, errors)
    persistent, temporary = _storage(document, errors)
    environment = _environment(document, errors)
    memory, cpus = _resources(document, errors)
    healthcheck = _healthcheck(document, listeners, errors)
    depends_on = _depends_on(document, name, errors)
    internet = _permissions(document, errors)
    cluster_mode = _cluster(document, errors)

    if errors.items:
        raise InvalidCommand(f"invalid app spec ({len(errors.items)} errors)", errors=errors.items)
    assert name is not None
    normalised = _normalise(
        name=name,
        app_type=app_type,
        image=image,
        build=build,
        command=command,
        listeners=listeners,
        persistent=persistent,
        temporary=temporary,
        environment=environment,
        memory=memory,
        cpus=cpus,
        healthcheck=healthcheck,
        depends_on=depends_on,
        internet=internet,
        cluster_mode=cluster_mode,
        extensions={k: v for k, v in document.items() if isinstance(k, str) and k.startswith("x-")},
    )
    return AppSpec(
        name=name,
        listeners=tuple(listeners),
        document=normalised,
        type=app_type,
        image=image,
        build=build,
        command=command,
        persistent=tuple(persistent),
        temporary=tuple(temporary),
        environment=environment,
        memory=memory,
        cpus=cpus,
        healthcheck=healthcheck,
        depends_on=depends_on,
        internet=internet,
        cluster_mode=cluster_mode,
    )


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mapping(parent: Mapping[str, Any], key: str, path: str, errors: _Errors) -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors.add(path, f"must be a mapping, got {_kind(value)}")
        return {}
    return value


def _unknown(
    mapping: Mapping[str, Any], allowed: Sequence[str], path: str, errors: _Errors
) -> None:
    for key in mapping:
        if key not in allowed:
            errors.add(f"{path}.{key}", f"unknown field (allowed: {', '.join(allowed)})")


def _choice(
    parent: Mapping[str, Any],
    key: str,
    choices: Sequence[str],
    default: str,
    errors: _Errors,
    path: str | None = None,
) -> str:
    value = parent.get(key, default)
    if value not in choices:
        errors.add(path or key, f"must be one of {', '.join(choices)}, got {value!r}")
        return default
    return str(value)


def _name(document: Mapping[str, Any], errors: _Errors) -> str | None:
    name = document.get("name")
    if name is None:
        errors.add("name", "is required")
        return None
    if not isinstance(name, str):
        errors.add("name", f"must be a string, got {_kind(name)}")
        return None
    if len(name) > MAX_NAME_LENGTH:
        errors.add("name", f"must be at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    if not _NAME.match(name):
        errors.add(
            "name",
            f"{name!r} must start with a letter, end with a letter or digit and use only "
            "a-z, 0-9 and '-'",
        )
    if name in RESERVED_NAMES:
        errors.add("name", f"{name!r} is reserved ({', '.join(sorted(RESERVED_NAMES))})")
    return name


def _image_and_build(
    document: Mapping[str, Any], errors: _Errors
) -> tuple[str | None, BuildSpec | None]:
    image = document.get("image")
    raw_build = document.get("build")
    if image is not None and raw_build is not None:
        errors.add("image", "give image or build, not both")
    elif image is None and raw_build is None:
        errors.add("image", "one of image or build is required")
    checked_image: str | None = None
    if image is not None:
        if not isinstance(image, str) or not image:
            errors.add("image", f"must be a non-empty string, got {_kind(image)}")
        elif len(image) > 255 or not _IMAGE.match(image):
            errors.add("image", f"{image!r} is not a valid image reference")
        else:
            checked_image = image
    build: BuildSpec | None = None
    if raw_build is not None:
        build = _build(raw_build, errors)
    return checked_image, build


def _build(raw: Any, errors: _Errors) -> BuildSpec | None:
    if not isinstance(raw, Mapping):
        errors.add("build", f"must be a mapping, got {_kind(raw)}")
        return None
    ok = True
    allowed = ("containerfile", "build_args", "target", "git", "context", "branch")
    _unknown(raw, allowed, "build", errors)
    for remote in ("git", "branch"):
        if remote in raw:
            errors.add(
                f"build.{remote}",
                "git builds are not supported (they need network access); build or load "
                "the image locally and use image:",
            )
            ok = False
    if "context" in raw:
        errors.add(
            "build.context",
            "build contexts are not supported; use an inline containerfile without COPY/ADD",
        )
        ok = False
    containerfile = raw.get("containerfile")
    if not isinstance(containerfile, str) or not containerfile.strip():
        errors.add("build.containerfile", "is required: a non-empty Containerfile text")
        ok = False
    elif len(containerfile) > 16384:
        errors.add("build.containerfile", "must be at most 16384 characters")
        ok = False
    args: list[tuple[str, str]] = []
    raw_args = raw.get("build_args", {})
    if not isinstance(raw_args, Mapping):
        errors.add("build.build_args", f"must be a mapping, got {_kind(raw_args)}")
        ok = False
    else:
        for key, value in raw_args.items():
            if not isinstance(key, str) or not _ENV_KEY.match(key):
                errors.add(f"build.build_args.{key}", "is not a valid argument name")
                ok = False
            elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
                errors.add(f"build.build_args.{key}", "must be a string or a number")
                ok = False
            else:
                args.append((key, str(value)))
    target = raw.get("target", "")
    if not isinstance(target, str):
        errors.add("build.target", "must be a string")
        ok = False
    if not ok:
        return None
    assert isinstance(containerfile, str) and isinstance(target, str)
    return BuildSpec(containerfile=containerfile, build_args=tuple(sorted(args)), target=target)


def _command(document: Mapping[str, Any], errors: _Errors) -> tuple[str, ...]:
    command = document.get("command")
    if command is None:
        return ()
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(c, str) and "\0" not in c for c in command)
    ):
        errors.add("command", "must be a non-empty list of strings")
        return ()
    return tuple(command)


def _port(value: Any, path: str, errors: _Errors) -> int | None:
    if not _is_int(value) or not 1 <= value <= 65535:
        errors.add(path, f"must be an integer between 1 and 65535, got {value!r}")
        return None
    return int(value)


def _listeners(document: Mapping[str, Any], errors: _Errors) -> list[ListenerSpec]:
    raw = document.get("listeners")
    if raw is None:
        errors.add("listeners", "is required (at least one listener)")
        return []
    if not isinstance(raw, list) or not raw:
        errors.add("listeners", "must be a non-empty list")
        return []
    found: list[ListenerSpec] = []
    names: dict[str, int] = {}
    ports: dict[int, int] = {}
    allowed = ("name", "guest_port", "flow", "protocol", "remote_ports")
    for i, item in enumerate(raw):
        path = f"listeners[{i}]"
        if not isinstance(item, Mapping):
            errors.add(path, f"must be a mapping, got {_kind(item)}")
            continue
        _unknown(item, allowed, path, errors)
        ok = True
        name = item.get("name")
        if not isinstance(name, str) or not _LISTENER.match(name):
            errors.add(
                f"{path}.name",
                f"must match {_LISTENER.pattern} (lowercase letter first, at most 31), "
                f"got {name!r}",
            )
            ok = False
        elif name in names:
            errors.add(f"{path}.name", f"{name!r} is already used by listeners[{names[name]}]")
            ok = False
        else:
            names[name] = i
        port = _port(item.get("guest_port"), f"{path}.guest_port", errors)
        if port is None:
            ok = False
        elif port in ports:
            errors.add(f"{path}.guest_port", f"{port} is already used by listeners[{ports[port]}]")
            ok = False
        else:
            ports[port] = i
        flow = _choice(item, "flow", FLOWS, "tcp", errors, f"{path}.flow")
        protocol = _choice(item, "protocol", PROTOCOLS, "raw", errors, f"{path}.protocol")
        if flow == "tls" and protocol != "raw":
            errors.add(
                f"{path}.protocol",
                "a tls flow is passed through untouched, so its protocol must be raw",
            )
            ok = False
        remote: list[int] = []
        raw_remote = item.get("remote_ports", [80, 443])
        if not isinstance(raw_remote, list):
            errors.add(f"{path}.remote_ports", "must be a list of ports")
            ok = False
        else:
            for j, p in enumerate(raw_remote):
                checked = _port(p, f"{path}.remote_ports[{j}]", errors)
                if checked is None:
                    ok = False
                else:
                    remote.append(checked)
        if ok and isinstance(name, str) and port is not None:
            found.append(
                ListenerSpec(
                    name=name,
                    guest_port=port,
                    flow=flow,
                    protocol=protocol,
                    remote_ports=tuple(remote),
                )
            )
    return found


def _container_path(value: Any, path: str, errors: _Errors) -> str | None:
    if not isinstance(value, str) or not value:
        errors.add(path, f"is required: an absolute container path, got {value!r}")
        return None
    if not value.startswith("/"):
        errors.add(path, f"container path must be absolute, got {value!r}")
        return None
    if "\0" in value or any(part in ("..", ".") for part in value.split("/")):
        errors.add(path, f"container path must not contain '.' or '..' segments: {value!r}")
        return None
    normal = posixpath.normpath(value)
    if normal == "/":
        errors.add(path, "the container root cannot be a volume")
        return None
    return normal


def _size(value: Any, path: str, errors: _Errors) -> int | None:
    if _is_int(value) and value > 0:
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m is not None:
            unit = (m.group(2) or "").upper()
            factor = _UNITS.get(unit)
            if factor is not None:
                size = int(float(m.group(1)) * factor)
                if size > 0:
                    return size
    errors.add(path, f"must be a size such as 512MB or 1GiB, got {value!r}")
    return None


def _storage(
    document: Mapping[str, Any], errors: _Errors
) -> tuple[list[PersistentVolume], list[TemporaryVolume]]:
    storage = _mapping(document, "storage", "storage", errors)
    _unknown(storage, ("persistent", "temporary"), "storage", errors)
    persistent: list[PersistentVolume] = []
    temporary: list[TemporaryVolume] = []
    seen: dict[str, str] = {}

    def claim(container: str, path: str) -> bool:
        for other_container, other_path in seen.items():
            if (
                container == other_container
                or container.startswith(other_container + "/")
                or other_container.startswith(container + "/")
            ):
                errors.add(path, f"{container} conflicts with {other_path} ({other_container})")
                return False
        seen[container] = path
        return True

    for section in ("persistent", "temporary"):
        volumes = _mapping(storage, section, f"storage.{section}", errors)
        for vname, body in volumes.items():
            path = f"storage.{section}.{vname}"
            if not isinstance(vname, str) or not _VOLUME_NAME.match(vname):
                errors.add(path, "volume names must match ^[a-z][a-z0-9]{0,7}$")
                continue
            if not isinstance(body, Mapping):
                errors.add(path, f"must be a mapping, got {_kind(body)}")
                continue
            _unknown(body, ("container", "size_limit", "host"), path, errors)
            if "host" in body:
                errors.add(
                    f"{path}.host",
                    "must not specify host: volumes live on encrypted persistence volumes",
                )
            container = _container_path(body.get("container"), f"{path}.container", errors)
            if section == "persistent":
                if "size_limit" in body:
                    errors.add(
                        f"{path}.size_limit",
                        "cannot be enforced on persistence volumes; remove it",
                    )
                if container is not None and claim(container, f"{path}.container"):
                    persistent.append(PersistentVolume(name=vname, container=container))
            else:
                size = DEFAULT_TMPFS
                if "size_limit" in body:
                    checked = _size(body["size_limit"], f"{path}.size_limit", errors)
                    size = checked if checked is not None else size
                if container is not None and claim(container, f"{path}.container"):
                    temporary.append(TemporaryVolume(name=vname, container=container, size=size))
    return persistent, temporary


def _environment(document: Mapping[str, Any], errors: _Errors) -> tuple[tuple[str, str], ...]:
    env = _mapping(document, "environment", "environment", errors)
    found: list[tuple[str, str]] = []
    for key, value in env.items():
        path = f"environment.{key}"
        if not isinstance(key, str) or not _ENV_KEY.match(key):
            errors.add(path, "variable names must match ^[A-Za-z_][A-Za-z0-9_]*$")
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            text = str(value)
        else:
            errors.add(path, f"must be a string, number or boolean, got {_kind(value)}")
            continue
        if "\0" in text:
            errors.add(path, "must not contain NUL")
            continue
        found.append((key, text))
    return tuple(sorted(found))


def _resources(document: Mapping[str, Any], errors: _Errors) -> tuple[int | None, float | None]:
    resources = _mapping(document, "resources", "resources", errors)
    _unknown(resources, ("limits",), "resources", errors)
    limits = _mapping(resources, "limits", "resources.limits", errors)
    _unknown(limits, ("memory", "cpu", "storage"), "resources.limits", errors)
    if "storage" in limits:
        errors.add(
            "resources.limits.storage",
            "cannot be enforced by the container runtime here; remove it",
        )
    memory: int | None = None
    if "memory" in limits:
        memory = _size(limits["memory"], "resources.limits.memory", errors)
        if memory is not None and memory < MIN_MEMORY:
            errors.add("resources.limits.memory", f"must be at least {MIN_MEMORY} bytes (6MiB)")
            memory = None
    cpus: float | None = None
    if "cpu" in limits:
        cpu = limits["cpu"]
        if not _is_number(cpu) or not 0 < cpu <= 64:
            errors.add("resources.limits.cpu", f"must be a number in (0, 64], got {cpu!r}")
        else:
            cpus = float(cpu)
    return memory, cpus


def _healthcheck(
    document: Mapping[str, Any], listeners: Sequence[ListenerSpec], errors: _Errors
) -> HealthcheckSpec | None:
    check = _mapping(document, "healthcheck", "healthcheck", errors)
    if not check:
        return None
    _unknown(check, ("http",), "healthcheck", errors)
    http = check.get("http")
    if http is None:
        errors.add("healthcheck.http", "is required in a healthcheck")
        return None
    if isinstance(http, str):
        http = {"path": http}
    if not isinstance(http, Mapping):
        errors.add("healthcheck.http", f"must be a path or a mapping, got {_kind(http)}")
        return None
    allowed = ("path", "listener", "interval", "timeout", "retries")
    _unknown(http, allowed, "healthcheck.http", errors)
    ok = True
    path = http.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " \r\n"):
        errors.add("healthcheck.http.path", f"must be an absolute URL path, got {path!r}")
        ok = False
    http_listeners = [listener for listener in listeners if listener.http]
    listener_name = http.get("listener")
    if listener_name is None:
        if not http_listeners:
            errors.add("healthcheck.http.listener", "no http listener to probe")
            ok = False
        else:
            listener_name = http_listeners[0].name
    elif not any(listener.name == listener_name for listener in http_listeners):
        errors.add(
            "healthcheck.http.listener", f"{listener_name!r} is not an http listener of this app"
        )
        ok = False
    numbers: dict[str, float] = {}
    for key, default, low, high in (
        ("interval", 10.0, 1.0, 3600.0),
        ("timeout", 5.0, 0.1, 300.0),
    ):
        value = http.get(key, default)
        if not _is_number(value) or not low <= value <= high:
            errors.add(f"healthcheck.http.{key}", f"must be seconds in [{low}, {high}]")
            ok = False
        else:
            numbers[key] = float(value)
    retries = http.get("retries", 3)
    if not _is_int(retries) or not 1 <= retries <= 100:
        errors.add("healthcheck.http.retries", "must be an integer in [1, 100]")
        ok = False
    if not ok:
        return None
    return HealthcheckSpec(
        listener=str(listener_name),
        path=str(path),
        interval=numbers["interval"],
        timeout=numbers["timeout"],
        retries=int(retries),
    )


def _depends_on(document: Mapping[str, Any], name: str | None, errors: _Errors) -> tuple[str, ...]:
    raw = document.get("depends_on")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        errors.add("depends_on", "must be a list of app names")
        return ()
    found: list[str] = []
    for i, dep in enumerate(raw):
        path = f"depends_on[{i}]"
        if not valid_app_name(dep):
            errors.add(path, f"{dep!r} is not a valid app name")
        elif dep == name:
            errors.add(path, "an app cannot depend on itself")
        elif dep in found:
            errors.add(path, f"{dep!r} is listed twice")
        else:
            found.append(dep)
    return tuple(found)


def _permissions(document: Mapping[str, Any], errors: _Errors) -> bool:
    permissions = _mapping(document, "permissions", "permissions", errors)
    _unknown(permissions, ("network",), "permissions", errors)
    network = _mapping(permissions, "network", "permissions.network", errors)
    _unknown(network, ("internet",), "permissions.network", errors)
    value = network.get("internet", "allow")
    if value not in ("allow", "deny"):
        errors.add("permissions.network.internet", f"must be allow or deny, got {value!r}")
        return True
    if value == "deny":
        # Podman's internal networks do not forward published ports, so an
        # app without internet would also be unreachable through its
        # listeners: refused rather than silently not enforced.
        errors.add(
            "permissions.network.internet",
            "deny cannot be enforced here: the runtime does not forward published ports "
            "into networks without internet access; remove it",
        )
    return True


def _cluster(document: Mapping[str, Any], errors: _Errors) -> str:
    cluster = _mapping(document, "cluster", "cluster", errors)
    _unknown(cluster, ("mode",), "cluster", errors)
    return _choice(cluster, "mode", CLUSTER_MODES, "stateful", errors, "cluster.mode")


def _normalise(
    *,
    name: str,
    app_type: str,
    image: str | None,
    build: BuildSpec | None,
    command: tuple[str, ...],
    listeners: Sequence[ListenerSpec],
    persistent: Sequence[PersistentVolume],
    temporary: Sequence[TemporaryVolume],
    environment: tuple[tuple[str, str], ...],
    memory: int | None,
    cpus: float | None,
    healthcheck: HealthcheckSpec | None,
    depends_on: tuple[str, ...],
    internet: bool,
    cluster_mode: str,
    extensions: Mapping[str, Any],
) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": name, "type": app_type}
    if image is not None:
        doc["image"] = image
    if build is not None:
        body: dict[str, Any] = {"containerfile": build.containerfile}
        if build.build_args:
            body["build_args"] = dict(build.build_args)
        if build.target:
            body["target"] = build.target
        doc["build"] = body
    if command:
        doc["command"] = list(command)
    doc["listeners"] = [
        {
            "name": listener.name,
            "guest_port": listener.guest_port,
            "flow": listener.flow,
            "protocol": listener.protocol,
            "remote_ports": list(listener.remote_ports),
        }
        for listener in listeners
    ]
    storage: dict[str, Any] = {}
    if persistent:
        storage["persistent"] = {v.name: {"container": v.container} for v in persistent}
    if temporary:
        storage["temporary"] = {
            v.name: {"container": v.container, "size_limit": v.size} for v in temporary
        }
    if storage:
        doc["storage"] = storage
    if environment:
        doc["environment"] = dict(environment)
    limits: dict[str, Any] = {}
    if memory is not None:
        limits["memory"] = memory
    if cpus is not None:
        limits["cpu"] = cpus
    if limits:
        doc["resources"] = {"limits": limits}
    if healthcheck is not None:
        doc["healthcheck"] = {
            "http": {
                "path": healthcheck.path,
                "listener": healthcheck.listener,
                "interval": healthcheck.interval,
                "timeout": healthcheck.timeout,
                "retries": healthcheck.retries,
            }
        }
    if depends_on:
        doc["depends_on"] = list(depends_on)
    doc["permissions"] = {"network": {"internet": "allow" if internet else "deny"}}
    doc["cluster"] = {"mode": cluster_mode}
    for key, value in sorted(extensions.items()):
        doc[key] = _jsonable(value)
    return doc


def _jsonable(value: Any) -> Any:
    """Extension values as JSON (dates and other YAML scalars become strings)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
