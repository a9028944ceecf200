"""
The configuration tree: a TOML file read with ``tomllib`` into frozen attrs
values, merged with command-line overrides, validated as a whole.

Unknown sections and keys are errors; every error is collected and reported
together (:class:`~piccolod.errors.ConfigError`).  Each subsystem owns its
``[subsystems.<slot>]`` section, whose keys its plugin declares (see
:func:`piccolod.kernel.plugins.select`).

Example::

    [daemon]
    node_id = "box-1"            # default: generated once, kept in <state_dir>/node-id
    state_dir = "/var/lib/piccolod"
    stop_timeout = 10.0
    advertise_address = ""       # API base URL for leader hints; default from the listen string

    [log]
    level = "info"               # debug | info | warn | error | critical
    format = "text"              # text | json (one JSON object per line)
    file = "-"                   # "-" is standard output (the journal under systemd)

    [subsystems.api]
    listen = "tcp:8080:interface=127.0.0.1"

    [subsystems.consensus]
    variant = "single-node"
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from piccolod.errors import ConfigError

#: The state directory used when neither the config nor the command line names one.
DEFAULT_STATE_DIR = "./state"


@attrs.frozen
class DaemonConfig:
    node_id: str = ""
    state_dir: str = DEFAULT_STATE_DIR
    stop_timeout: float = 10.0
    advertise_address: str = ""
    plugin_packages: tuple[str, ...] = ()


@attrs.frozen
class JobsConfig:
    """``[jobs]``: concurrency per job class and the history kept."""

    limits: Mapping[str, int] = attrs.field(factory=lambda: {"export": 1, "rebuild": 2})
    default_limit: int = 2
    history: int = 200


@attrs.frozen
class TelemetryConfig:
    """``[telemetry]``: sampling, reactor lag and health escalation."""

    interval: float = 15.0
    lag_probe: float = 0.5
    lag_warn: float = 0.25
    error_grace: float = 60.0


@attrs.frozen
class LogConfig:
    level: str = "info"
    format: str = "text"
    file: str = "-"


@attrs.frozen
class Config:
    """
    The whole configuration.

    @ivar subsystems: raw ``[subsystems.<slot>]`` sections; each is checked
        against the selected plugin's declared keys when plugins are chosen.
    @ivar source: the file it came from, if any.
    """

    daemon: DaemonConfig = DaemonConfig()
    log: LogConfig = LogConfig()
    jobs: JobsConfig = JobsConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    subsystems: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    source: str | None = None


_SECTIONS: dict[str, type[Any]] = {
    "daemon": DaemonConfig,
    "log": LogConfig,
    "jobs": JobsConfig,
    "telemetry": TelemetryConfig,
}


def _coerce(section: str, cls: type[Any], raw: Mapping[str, Any], errors: list[str]) -> Any:
    fields = {f.name: f for f in attrs.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            errors.append(f"[{section}] unknown key {key!r}; allowed: {', '.join(sorted(fields))}")
            continue
        default = fields[key].default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()  # type: ignore[call-arg]
        if isinstance(default, dict):
            if not isinstance(value, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()
            ):
                errors.append(f"[{section}] {key} must be a table of positive integers")
                continue
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                errors.append(f"[{section}] {key} must be a list of strings")
                continue
            value = tuple(value)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                errors.append(f"[{section}] {key} must be a number")
                continue
            value = float(value)
        elif not isinstance(value, type(default)):
            errors.append(
                f"[{section}] {key} must be {type(default).__name__}, got {type(value).__name__}"
            )
            continue
        values[key] = value
    return cls(**values)


def parse(data: Mapping[str, Any], source: str | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML; raise ``ConfigError`` with every problem."""
    config, errors = parse_partial(data, source)
    if errors:
        raise ConfigError(errors)
    return config


def parse_partial(data: Mapping[str, Any], source: str | None = None) -> tuple[Config, list[str]]:
    """
    Build what can be built of a :class:`Config` and list every problem, so
    that callers can go on checking (e.g. the subsystem sections) and report
    all problems at once.  Sections with errors keep their valid keys.
    """
    errors: list[str] = []
    built: dict[str, Any] = {}
    for section, value in data.items():
        if section == "subsystems":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                errors.append("[subsystems] must hold only [subsystems.<slot>] tables")
            continue
        if section not in _SECTIONS:
            allowed = ", ".join([*sorted(_SECTIONS), "subsystems"])
            errors.append(f"unknown section [{section}]; allowed: {allowed}")
            continue
        if not isinstance(value, dict):
            errors.append(f"[{section}] must be a table")
            continue
        built[section] = _coerce(section, _SECTIONS[section], value, errors)
    config = Config(
        daemon=built.get("daemon", DaemonConfig()),
        log=built.get("log", LogConfig()),
        jobs=built.get("jobs", JobsConfig()),
        telemetry=built.get("telemetry", TelemetryConfig()),
        subsystems={
            k: dict(v) for k, v in data.get("subsystems", {}).items() if isinstance(v, dict)
        }
        if isinstance(data.get("subsystems"), dict)
        else {},
        source=source,
    )
    errors.extend(validate(config))
    return config, errors


def validate(config: Config) -> list[str]:
    """Semantic checks of a config (types are already right)."""
    errors: list[str] = []
    if config.log.level not in ("debug", "info", "warn", "error", "critical"):
        errors.append("[log] level must be one of debug, info, warn, error, critical")
    if config.log.format not in ("text", "json"):
        errors.append("[log] format must be one of text, json")
    for name in ("interval", "lag_probe", "lag_warn", "error_grace"):
        if getattr(config.telemetry, name) <= 0:
            errors.append(f"[telemetry] {name} must be positive")
    if config.jobs.default_limit < 1 or config.jobs.history < 1:
        errors.append("[jobs] default_limit and history must be at least 1")
    if config.daemon.stop_timeout <= 0:
        errors.append("[daemon] stop_timeout must be positive")
    if not config.daemon.state_dir:
        errors.append("[daemon] state_dir must not be empty")
    node_id = config.daemon.node_id
    if node_id and (len(node_id) > 63 or not all(c.isalnum() or c in "-_." for c in node_id)):
        errors.append("[daemon] node_id must be at most 63 letters, digits, '-', '_' or '.'")
    return errors


def load(path: str | Path) -> Config:
    """Read and parse a TOML config file; raise ``ConfigError`` on any problem."""
    config, errors = load_partial(path)
    if errors:
        raise ConfigError(errors)
    return config


def load_partial(path: str | Path) -> tuple[Config, list[str]]:
    """Like :func:`load`, returning what could be read and every problem."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"config file {str(path)!r} does not exist"]) from None
    except OSError as e:
        raise ConfigError([f"config file {str(path)!r} cannot be read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"config file {str(path)!r} is not valid TOML: {e}"]) from None
    return parse_partial(data, source=str(path))


def with_overrides(
    config: Config,
    state_dir: str | None = None,
    listen: str | None = None,
) -> Config:
    """Apply the command line's ``--state-dir`` and ``--listen``."""
    daemon = config.daemon
    subsystems = {k: dict(v) for k, v in config.subsystems.items()}
    if state_dir is not None:
        daemon = attrs.evolve(daemon, state_dir=state_dir)
    if listen is not None:
        subsystems.setdefault("api", {})["listen"] = listen
    return attrs.evolve(config, daemon=daemon, subsystems=subsystems)
