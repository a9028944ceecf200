"""
The control store's domain repositories: typed methods instead of SQL.

Each repository exists twice:

- a synchronous **ops** class (``AuthOps``, ``AppsOps``, ...) that runs on
  the store's thread inside one transaction (:class:`Tx`); these hold all
  the SQL, validate their input, and record every change they make with
  :meth:`Tx.changed` (the store hashes those records into the revision's
  checksum);
- an asynchronous **repository** (``AuthRepository``, ...) providing the
  ``I*Repository`` interface: each call is one read, or one write
  transaction (one revision), on the store's thread, and returns a
  Deferred.

Several changes commit as one revision through
``store.transaction(lambda tx: (tx.apps.put(a), tx.settings.set(k, v)))``.

A write that changes nothing (an app put with identical content, a delete
of a missing setting that raises) records no change, and the store then
commits no revision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from zope.interface import implementer

from piccolod.errors import Conflict, InvalidCommand, NotFound
from piccolod.interfaces import (
    AppRecord,
    AuditEntry,
    AuthState,
    IAppsRepository,
    IAuditRepository,
    IAuthRepository,
    IControlTransaction,
    IRemoteRepository,
    ISettingsRepository,
    RemoteConfigRecord,
)

__all__ = [
    "AppsOps",
    "AppsRepository",
    "AuditOps",
    "AuditRepository",
    "AuthOps",
    "AuthRepository",
    "RemoteOps",
    "RemoteRepository",
    "SettingsOps",
    "SettingsRepository",
    "Tx",
]

T = TypeVar("T")

#: The largest JSON document one value may be (spec, setting, remote config).
MAX_VALUE_BYTES = 4 * 1024 * 1024
MAX_KEY_LENGTH = 255
MAX_AUDIT_TEXT = 4096


class _Connection(Protocol):
    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...


def _json_text(value: Any, what: str) -> str:
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidCommand(f"{what} is not JSON-serialisable: {e}") from None
    if len(text) > MAX_VALUE_BYTES:
        raise InvalidCommand(f"{what} is larger than {MAX_VALUE_BYTES} bytes as JSON")
    return text


def _json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidCommand(f"{what} must be a JSON object with string keys")
    return dict(value)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_KEY_LENGTH:
        raise InvalidCommand(f"{what} must be a non-empty string of at most {MAX_KEY_LENGTH}")
    return value


def _text(value: Any, what: str, limit: int = MAX_AUDIT_TEXT) -> str:
    if not isinstance(value, str):
        raise InvalidCommand(f"{what} must be a string")
    return value[:limit]


@implementer(IControlTransaction)
class Tx:
    """
    One transaction on the store's thread: the repositories' ops, the
    clock's time at submission (``now``) and the change records.

    Created by the store only; a read transaction refuses writes.  With
    ``record`` every statement :meth:`execute` runs is kept, with its
    parameters, in ``statements`` (reads are not): a replicated store ships
    them to the other nodes, which replay them in the same order.  Every
    statement must therefore be deterministic given the database's state
    and its parameters (no ``random()``, no ``datetime('now')``, no
    reliance on a row id SQLite picks: values such as ``now`` and new ids
    are computed here and passed as parameters).
    """

    def __init__(
        self, connection: _Connection, now: float, writable: bool, record: bool = False
    ) -> None:
        self._connection = connection
        self.now = now
        self.writable = writable
        self.statements: list[tuple[str, tuple[Any, ...]]] | None = [] if record else None
        self.changes: list[list[Any]] = []
        self.tables: set[str] = set()
        self.auth = AuthOps(self)
        self.apps = AppsOps(self)
        self.remote = RemoteOps(self)
        self.audit = AuditOps(self)
        self.settings = SettingsOps(self)

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        return list(self._connection.execute(sql, tuple(parameters)).fetchall())

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        if not self.writable:
            raise Conflict("a read transaction cannot write")
        values = tuple(parameters)
        if self.statements is not None:
            self.statements.append((sql, values))
        return self._connection.execute(sql, values)

    def changed(self, table: str, op: str, payload: Any) -> None:
        """Record one change (hashed into the revision's checksum)."""
        self.changes.append([table, op, payload])
        self.tables.add(table)


# --------------------------------------------------------------------------
# Synchronous ops (store thread)


class AuthOps:
    """The admin's credentials record (one row)."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def get(self) -> AuthState:
        rows = self._tx.query(
            "SELECT initialized, password_hash, sessions_epoch, updated_at FROM auth WHERE id = 1"
        )
        if not rows:
            return AuthState()
        initialized, password_hash, epoch, updated_at = rows[0]
        return AuthState(bool(initialized), password_hash, int(epoch), float(updated_at))

    def save(self, state: AuthState) -> AuthState:
        if not isinstance(state, AuthState):
            raise InvalidCommand("auth.save takes an AuthState")
        if not isinstance(state.password_hash, str) or not isinstance(state.sessions_epoch, int):
            raise InvalidCommand("auth state: password_hash must be str, sessions_epoch int")
        stored = AuthState(
            bool(state.initialized), state.password_hash, state.sessions_epoch, self._tx.now
        )
        current = self.get()
        if (current.initialized, current.password_hash, current.sessions_epoch) == (
            stored.initialized,
            stored.password_hash,
            stored.sessions_epoch,
        ):
            return current
        self._tx.execute(
            "INSERT INTO auth (id, initialized, password_hash, sessions_epoch, updated_at) "
            "VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "initialized = excluded.initialized, password_hash = excluded.password_hash, "
            "sessions_epoch = excluded.sessions_epoch, updated_at = excluded.updated_at",
            (
                int(stored.initialized),
                stored.password_hash,
                stored.sessions_epoch,
                stored.updated_at,
            ),
        )
        self._tx.changed(
            "auth",
            "save",
            [stored.initialized, stored.password_hash, stored.sessions_epoch],
        )
        return stored


class AppsOps:
    """Apps' desired state, one row per app."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    @staticmethod
    def _record(row: Sequence[Any]) -> AppRecord:
        name, spec, enabled, generation, updated_at = row
        return AppRecord(name, json.loads(spec), bool(enabled), int(generation), float(updated_at))

    def get(self, name: str) -> AppRecord:
        _name(name, "app name")
        rows = self._tx.query(
            "SELECT name, spec, enabled, generation, updated_at FROM apps WHERE name = ?", (name,)
        )
        if not rows:
            raise NotFound(f"no app named {name!r}")
        return self._record(rows[0])

    def list_all(self) -> list[AppRecord]:
        rows = self._tx.query(
            "SELECT name, spec, enabled, generation, updated_at FROM apps ORDER BY name"
        )
        return [self._record(row) for row in rows]

    def put(self, record: AppRecord) -> AppRecord:
        if not isinstance(record, AppRecord):
            raise InvalidCommand("apps.put takes an AppRecord")
        name = _name(record.name, "app name")
        spec = _json_object(record.spec, "app spec")
        text = _json_text(spec, "app spec")
        enabled = bool(record.enabled)
        try:
            current: AppRecord | None = self.get(name)
        except NotFound:
            current = None
        if (
            current is not None
            and _json_text(current.spec, "") == text
            and (current.enabled == enabled)
        ):
            return current
        generation = 1 if current is None else current.generation + 1
        self._tx.execute(
            "INSERT INTO apps (name, spec, enabled, generation, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, enabled = excluded.enabled, "
            "generation = excluded.generation, updated_at = excluded.updated_at",
            (name, text, int(enabled), generation, self._tx.now),
        )
        self._tx.changed("apps", "put", [name, spec, enabled, generation])
        return AppRecord(name, json.loads(text), enabled, generation, self._tx.now)

    def delete(self, name: str) -> None:
        _name(name, "app name")
        if self._tx.execute("DELETE FROM apps WHERE name = ?", (name,)).rowcount == 0:
            raise NotFound(f"no app named {name!r}")
        self._tx.changed("apps", "delete", [name])


class RemoteOps:
    """The remote-access configuration (one row)."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def get(self) -> RemoteConfigRecord:
        rows = self._tx.query("SELECT config, updated_at FROM remote_config WHERE id = 1")
        if not rows:
            raise NotFound("no remote configuration is stored")
        return RemoteConfigRecord(json.loads(rows[0][0]), float(rows[0][1]))

    def save(self, config: Mapping[str, Any]) -> RemoteConfigRecord:
        value = _json_object(config, "remote config")
        text = _json_text(value, "remote config")
        self._tx.execute(
            "INSERT INTO remote_config (id, config, updated_at) VALUES (1, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET config = excluded.config, "
            "updated_at = excluded.updated_at",
            (text, self._tx.now),
        )
        self._tx.changed("remote_config", "save", value)
        return RemoteConfigRecord(json.loads(text), self._tx.now)

    def clear(self) -> None:
        if self._tx.execute("DELETE FROM remote_config WHERE id = 1").rowcount:
            self._tx.changed("remote_config", "clear", None)


class AuditOps:
    """The durable audit trail (append-only but for pruning)."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def append(self, entry: AuditEntry) -> AuditEntry:
        if not isinstance(entry, AuditEntry):
            raise InvalidCommand("audit.append takes an AuditEntry")
        fields = {
            "action": _name(entry.action, "audit action"),
            "subject": _text(entry.subject, "audit subject"),
            "outcome": _text(entry.outcome, "audit outcome"),
            "resource": _text(entry.resource, "audit resource"),
            "detail": _text(entry.detail, "audit detail"),
            "decision_id": _text(entry.decision_id, "audit decision_id"),
        }
        time = entry.time if entry.time else self._tx.now
        if not isinstance(time, (int, float)) or not math.isfinite(time):
            raise InvalidCommand("audit time must be a finite number")
        # The id AUTOINCREMENT would pick, chosen here and passed explicitly,
        # so that a replica replaying this statement stores the same id.
        (next_id,) = self._tx.query(
            "SELECT max("
            "coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'audit'), 0), "
            "coalesce((SELECT max(id) FROM audit), 0)) + 1"
        )[0]
        self._tx.execute(
            "INSERT INTO audit "
            "(id, time, action, subject, outcome, resource, detail, decision_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (int(next_id), float(time), *fields.values()),
        )
        stored = AuditEntry(time=float(time), id=int(next_id), **fields)
        self._tx.changed("audit", "append", stored.to_json())
        return stored

    def recent(self, limit: int = 100) -> list[AuditEntry]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidCommand("limit must be an int from 1 to 10000")
        rows = self._tx.query(
            "SELECT action, subject, outcome, resource, detail, decision_id, time, id "
            "FROM audit ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [AuditEntry(*row) for row in rows]

    def prune(self, keep: int) -> int:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise InvalidCommand("keep must be an int >= 0")
        rows = self._tx.query("SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?", (keep,))
        if not rows:
            return 0
        removed = int(self._tx.execute("DELETE FROM audit WHERE id <= ?", (rows[0][0],)).rowcount)
        self._tx.changed("audit", "prune", [keep, removed])
        return removed


class SettingsOps:
    """Named JSON settings."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def get(self, key: str) -> Any:
        _name(key, "setting key")
        rows = self._tx.query("SELECT value FROM settings WHERE key = ?", (key,))
        if not rows:
            raise NotFound(f"no setting {key!r}")
        return json.loads(rows[0][0])

    def items(self) -> dict[str, Any]:
        rows = self._tx.query("SELECT key, value FROM settings ORDER BY key")
        return {key: json.loads(value) for key, value in rows}

    def set(self, key: str, value: Any) -> None:
        _name(key, "setting key")
        text = _json_text(value, f"setting {key!r}")
        rows = self._tx.query("SELECT value FROM settings WHERE key = ?", (key,))
        if rows and rows[0][0] == text:
            return
        self._tx.execute(
            "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at",
            (key, text, self._tx.now),
        )
        self._tx.changed("settings", "set", [key, json.loads(text)])

    def delete(self, key: str) -> None:
        _name(key, "setting key")
        if self._tx.execute("DELETE FROM settings WHERE key = ?", (key,)).rowcount == 0:
            raise NotFound(f"no setting {key!r}")
        self._tx.changed("settings", "delete", [key])


# --------------------------------------------------------------------------
# Asynchronous repositories (reactor thread)


class _Runs(Protocol):
    """What the repositories need of the store."""

    def read(self, fn: Callable[[Tx], T]) -> Deferred[T]: ...

    def transaction(self, fn: Callable[[Tx], T]) -> Deferred[T]: ...


@implementer(IAuthRepository)
class AuthRepository:
    def __init__(self, store: _Runs) -> None:
        self._store = store

    def get(self) -> Deferred[AuthState]:
        return self._store.read(lambda tx: tx.auth.get())

    def save(self, state: AuthState) -> Deferred[AuthState]:
        return self._store.transaction(lambda tx: tx.auth.save(state))


@implementer(IAppsRepository)
class AppsRepository:
    def __init__(self, store: _Runs) -> None:
        self._store = store

    def get(self, name: str) -> Deferred[AppRecord]:
        return self._store.read(lambda tx: tx.apps.get(name))

    def list_all(self) -> Deferred[Sequence[AppRecord]]:
        return self._store.read(lambda tx: tx.apps.list_all())

    def put(self, record: AppRecord) -> Deferred[AppRecord]:
        return self._store.transaction(lambda tx: tx.apps.put(record))

    def delete(self, name: str) -> Deferred[None]:
        return self._store.transaction(lambda tx: tx.apps.delete(name))


@implementer(IRemoteRepository)
class RemoteRepository:
    def __init__(self, store: _Runs) -> None:
        self._store = store

    def get(self) -> Deferred[RemoteConfigRecord]:
        return self._store.read(lambda tx: tx.remote.get())

    def save(self, config: Mapping[str, Any]) -> Deferred[RemoteConfigRecord]:
        return self._store.transaction(lambda tx: tx.remote.save(config))

    def clear(self) -> Deferred[None]:
        return self._store.transaction(lambda tx: tx.remote.clear())


@implementer(IAuditRepository)
class AuditRepository:
    def __init__(self, store: _Runs) -> None:
        self._store = store

    def append(self, entry: AuditEntry) -> Deferred[AuditEntry]:
        return self._store.transaction(lambda tx: tx.audit.append(entry))

    def recent(self, limit: int = 100) -> Deferred[Sequence[AuditEntry]]:
        return self._store.read(lambda tx: tx.audit.recent(limit))

    def prune(self, keep: int) -> Deferred[int]:
        return self._store.transaction(lambda tx: tx.audit.prune(keep))


@implementer(ISettingsRepository)
class SettingsRepository:
    def __init__(self, store: _Runs) -> None:
        self._store = store

    def get(self, key: str) -> Deferred[Any]:
        return self._store.read(lambda tx: tx.settings.get(key))

    def items(self) -> Deferred[Mapping[str, Any]]:
        return self._store.read(lambda tx: tx.settings.items())

    def set(self, key: str, value: Any) -> Deferred[None]:
        return self._store.transaction(lambda tx: tx.settings.set(key, value))

    def delete(self, key: str) -> Deferred[None]:
        return self._store.transaction(lambda tx: tx.settings.delete(key))
