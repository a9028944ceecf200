"""
The control store: SQLite through SQLCipher, keyed by the data key.

**Threading.**  A SQLite connection belongs to one thread, and every call
may block (fsync), so the store owns a dedicated single-thread pool: each
operation (open, read, transaction, check, checkpoint, close) is one
function submitted to it with ``deferToThreadPool``.  The pool runs them
one at a time in submission order, so the connection is never shared and
a read submitted after a write sees it.  The reactor thread only keeps a
summary (:meth:`ControlStore.info`) that the callbacks update, in commit
order.  With ``pool=None`` (unit tests) operations run inline.

**Opening** (at unlock): the key is ``HKDF(data key,
"piccolod/control-store/v1")`` handed to SQLCipher as a raw key (``PRAGMA
key = "x'<64 hex>'"``, so no PBKDF2 runs), then:

1. a probe read of ``sqlite_master``: SQLCipher cannot decrypt page 1 →
   :class:`StoreUnreadable` (wrong key, truncated or foreign file);
2. ``PRAGMA quick_check`` on an existing file (``check=True``): damage →
   :class:`StoreCorrupt`.  Nothing has been written yet at this point;
3. WAL, ``synchronous=FULL``, ``temp_store=MEMORY`` (no plaintext temp
   files), foreign keys, ``query_only`` when read-only;
4. pending schema migrations, each in its own transaction and revision.

A store created once leaves a marker (``control-store.json``: its id) next
to the keyset; when the marker exists but the database file is gone or
empty, opening fails with :class:`StoreMissing` instead of silently
creating an empty store.

**Revisions and checksums.**  Every write transaction that changes
something commits, in the same SQLite transaction, a row of ``revisions``:
``revision`` (previous + 1), ``change_digest`` (sha256 of the canonical JSON
of the change records the repositories made), ``prev_checksum`` and
``checksum = sha256("<prev_checksum>:<revision>:<change_digest>")``.  The
chain starts at 64 zeros.  :meth:`ControlStore.verify_chain` recomputes it.
Old rows beyond ``revision_retention`` are pruned (the chain is verified
from the oldest row kept).  After the commit the store publishes
``ControlStoreCommit(revision, checksum, tables)``.

**Guards.**  Every call fails with ``Locked`` while the store is closed.
Writes fail with ``NotLeader`` (the registry's leader hint) unless this
node leads ``control-plane``; reads always work.

**Replication** (see :mod:`.replication`).  With a replication hook whose
``active()`` is true (the cluster has a commit log), a write takes two hops
on the store's thread and nothing else runs on the connection between
them (later calls wait in a queue on the reactor side): hop 1 begins the
transaction, runs the function with statement recording on, records the
revision row and seals the log entry; the hook appends it to the log
(``cluster.replicate_commit``); hop 2 commits, or rolls back when the
append failed (``NotLeader`` stays ``NotLeader``; ``CommitConflict`` makes
the hook catch up and the write fails with a retryable ``Unavailable``).
An append that failed otherwise (a timeout, a lost connection: its answer
may be lost although the log took it) is checked first, with the
transaction still open: when the log holds this very entry (same sealed
text) the write commits and is acknowledged; when it does not, or the
check fails too, it rolls back and fails as the append did.
The write is acknowledged only after both.  A crash between the append and
the local commit loses nothing: the entry is in the log and the next sync
applies it.  :meth:`ControlStore.apply` applies log entries (followers,
catch-up), bypassing the leader check but never the lock;
:meth:`ControlStore.snapshot_entry` seals the whole store for the log.
Without a hook, or with an inactive one, a write is one hop as before.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from piccolod.commands import CommitsApplied, SealedCommit
from piccolod.errors import (
    CommitConflict,
    Conflict,
    Locked,
    NotLeader,
    PiccolodError,
    TransientError,
    Unavailable,
)
from piccolod.events import ControlStoreCommit
from piccolod.interfaces import (
    ControlStoreInfo,
    IControlStore,
    IEventBus,
    ILeadershipRegistry,
)
from piccolod.persistence.errors import (
    StoreCorrupt,
    StoreError,
    StoreMissing,
    StoreUnreadable,
)
from piccolod.persistence.keyset import DataKey, write_atomically
from piccolod.persistence.replication import (
    Diverged,
    decode_params,
    encode_params,
    seal,
    unseal,
)
from piccolod.persistence.repositories import (
    AppsRepository,
    AuditRepository,
    AuthRepository,
    RemoteRepository,
    SettingsRepository,
    Tx,
)

__all__ = [
    "CONTROL_PLANE",
    "GENESIS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "CheckResult",
    "CheckpointResult",
    "Commit",
    "ControlStore",
    "Migration",
    "ReplicationHook",
    "chain_checksum",
    "change_digest",
    "store_key",
]

T = TypeVar("T")

#: Tables of every node's own (never replicated): the store's identity,
#: which the marker file binds to this node's keyset, and the chain rows
#: (a snapshot carries the head row itself).
LOCAL_TABLES = frozenset({"meta", "revisions"})

CONTROL_PLANE = "control-plane"
GENESIS = "0" * 64
_KEY_LABEL = "piccolod/control-store/v1"


def _sqlcipher() -> Any:
    """
    SQLCipher's DB-API module, imported on first use: a locked or
    uninitialised daemon never opens the store, and the library costs about
    5 MB of resident memory on a box that may have 1 GB.
    """
    from sqlcipher3 import dbapi2  # type: ignore[import-untyped]

    return dbapi2


def store_key(data_key: DataKey) -> bytes:
    """The SQLCipher key of the control store (a sub-key of the data key)."""
    return data_key.derive(_KEY_LABEL)


def change_digest(changes: Sequence[Any]) -> str:
    """sha256 of the canonical JSON of a transaction's change records."""
    text = json.dumps(
        list(changes), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chain_checksum(previous: str, revision: int, digest: str) -> str:
    """The checksum of ``revision``: sha256 over the previous one and the change."""
    return hashlib.sha256(f"{previous}:{revision}:{digest}".encode()).hexdigest()


# --------------------------------------------------------------------------
# Schema


@attrs.frozen
class Migration:
    """One schema step; ``version`` counts from 1 and is stored in ``user_version``."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema: meta, revisions, auth, apps, remote_config, audit, settings",
        (
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE revisions ("
            " revision INTEGER PRIMARY KEY,"
            " prev_checksum TEXT NOT NULL,"
            " checksum TEXT NOT NULL,"
            " change_digest TEXT NOT NULL,"
            " tables TEXT NOT NULL,"
            " committed_at REAL NOT NULL)",
            "CREATE TABLE auth ("
            " id INTEGER PRIMARY KEY CHECK (id = 1),"
            " initialized INTEGER NOT NULL,"
            " password_hash TEXT NOT NULL,"
            " sessions_epoch INTEGER NOT NULL,"
            " updated_at REAL NOT NULL)",
            "CREATE TABLE apps ("
            " name TEXT PRIMARY KEY,"
            " spec TEXT NOT NULL,"
            " enabled INTEGER NOT NULL,"
            " generation INTEGER NOT NULL,"
            " updated_at REAL NOT NULL)",
            "CREATE TABLE remote_config ("
            " id INTEGER PRIMARY KEY CHECK (id = 1),"
            " config TEXT NOT NULL,"
            " updated_at REAL NOT NULL)",
            "CREATE TABLE audit ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " time REAL NOT NULL,"
            " action TEXT NOT NULL,"
            " subject TEXT NOT NULL,"
            " outcome TEXT NOT NULL,"
            " resource TEXT NOT NULL,"
            " detail TEXT NOT NULL,"
            " decision_id TEXT NOT NULL)",
            "CREATE TABLE settings ("
            " key TEXT PRIMARY KEY,"
            " value TEXT NOT NULL,"
            " updated_at REAL NOT NULL)",
        ),
    ),
)

#: The schema version this code writes.
SCHEMA_VERSION = MIGRATIONS[-1].version


# --------------------------------------------------------------------------
# Values


@attrs.frozen
class Commit:
    """One committed revision."""

    revision: int
    checksum: str
    tables: tuple[str, ...]


@attrs.frozen
class CheckResult:
    """The outcome of an integrity check (``quick_check`` or the checksum chain)."""

    ok: bool
    detail: str
    revision: int

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class CheckpointResult:
    """``PRAGMA wal_checkpoint``'s answer: busy flag, WAL frames, frames checkpointed."""

    busy: int
    log_frames: int
    checkpointed: int

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _translate(error: BaseException) -> BaseException:
    """A typed error for a SQLite exception (others are returned as they are)."""
    sqlcipher = _sqlcipher()
    if isinstance(error, PiccolodError) or not isinstance(error, sqlcipher.Error):
        return error
    text = str(error)
    lowered = text.lower()
    if isinstance(error, sqlcipher.IntegrityError):
        return Conflict(f"control store constraint: {text}")
    if "locked" in lowered or "busy" in lowered:
        return TransientError(f"control store busy: {text}")
    if "not a database" in lowered:
        return StoreUnreadable(f"control store cannot be decrypted: {text}")
    if "malformed" in lowered or "corrupt" in lowered:
        return StoreCorrupt(f"control store is corrupt: {text}")
    return StoreError(f"control store: {type(error).__name__}: {text}")


# --------------------------------------------------------------------------
# The connection (store thread only)


class _Database:
    """The open connection and the head of the chain; used on the store thread only."""

    def __init__(
        self,
        connection: Any,
        path: Path,
        read_only: bool,
        retention: int,
    ) -> None:
        self.connection = connection
        self.path = path
        self.read_only = read_only
        self.retention = retention
        self.revision = 0
        self.checksum = GENESIS
        self.schema_version = 0
        self.store_id = ""

    # -- opening

    @classmethod
    def open(
        cls,
        *,
        path: Path,
        key: bytes,
        read_only: bool,
        marker: Path | None,
        check: bool,
        now: float,
        retention: int,
    ) -> tuple[_Database, list[Commit]]:
        existing = path.exists() and path.stat().st_size > 0
        marked = _read_marker(marker) if marker is not None else None
        if not existing:
            if marked is not None:
                raise StoreMissing(
                    f"the control store {path} was created before but is missing or empty; "
                    "restore it from an export (it is not re-created empty)"
                )
            if read_only:
                raise StoreMissing(f"no control store at {path} to open read-only")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        sqlcipher = _sqlcipher()
        connection = sqlcipher.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=10.0
        )
        try:
            db = cls(connection, path, read_only, retention)
            commits = db._setup(key, existing, check, now)
            if marker is not None and not read_only:
                if marked is None:
                    _write_marker(marker, db.store_id, now)
                elif marked != db.store_id:
                    raise StoreUnreadable(
                        f"the control store at {path} is not the one this keyset created"
                    )
        except BaseException as e:
            connection.close()
            raise _translate(e) from None
        return db, commits

    def _setup(self, key: bytes, existing: bool, check: bool, now: float) -> list[Commit]:
        execute = self.connection.execute
        execute(f"PRAGMA key = \"x'{key.hex()}'\"")
        try:
            execute("SELECT count(*) FROM sqlite_master").fetchone()
        except _sqlcipher().DatabaseError:
            raise StoreUnreadable(
                f"the control store at {self.path} cannot be decrypted with this keyset's key: "
                "it is damaged, truncated or belongs to another keyset"
            ) from None
        if existing and check:
            ok, detail = self.quick_check()
            if not ok:
                raise StoreCorrupt(f"the control store at {self.path} fails quick_check: {detail}")
        mode = execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"the control store could not switch to WAL (got {mode!r})")
        execute("PRAGMA synchronous = FULL")
        execute("PRAGMA temp_store = MEMORY")
        execute("PRAGMA foreign_keys = ON")
        self.schema_version = int(execute("PRAGMA user_version").fetchone()[0])
        if self.schema_version > SCHEMA_VERSION:
            raise StoreError(
                f"the control store has schema version {self.schema_version}, newer than "
                f"this piccolod's {SCHEMA_VERSION}; upgrade piccolod"
            )
        commits: list[Commit] = []
        if self.schema_version >= 1:
            self._load_head()
        if self.read_only:
            if self.schema_version < SCHEMA_VERSION:
                raise StoreError(
                    "the control store needs a schema migration, which a read-only "
                    "(follower) node cannot run"
                )
            execute("PRAGMA query_only = ON")
            return commits
        for migration in MIGRATIONS:
            if migration.version > self.schema_version:
                commits.append(self._migrate(migration, now))
        return commits

    def _load_head(self) -> None:
        execute = self.connection.execute
        row = execute(
            "SELECT revision, checksum FROM revisions ORDER BY revision DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            self.revision, self.checksum = int(row[0]), str(row[1])
        found = execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        self.store_id = "" if found is None else str(found[0])

    def _migrate(self, migration: Migration, now: float) -> Commit:
        execute = self.connection.execute
        execute("BEGIN IMMEDIATE")
        try:
            for statement in migration.statements:
                execute(statement)
            changes: list[list[Any]] = [["schema", "migrate", migration.version]]
            if migration.version == 1:
                self.store_id = secrets.token_hex(16)
                execute(
                    "INSERT INTO meta (key, value) VALUES ('store_id', ?), ('created_at', ?)",
                    (self.store_id, repr(now)),
                )
                changes.append(["meta", "create", self.store_id])
            execute(f"PRAGMA user_version = {int(migration.version)}")
            commit = self._record(changes, ("schema",), now)
            execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._advance(commit)
        self.schema_version = migration.version
        return commit

    # -- transactions

    def _rollback(self) -> None:
        if self.connection.in_transaction:
            self.connection.execute("ROLLBACK")

    def _record(self, changes: Sequence[Any], tables: Sequence[str], now: float) -> Commit:
        revision = self.revision + 1
        digest = change_digest(changes)
        checksum = chain_checksum(self.checksum, revision, digest)
        ordered = tuple(sorted(set(tables)))
        self.connection.execute(
            "INSERT INTO revisions "
            "(revision, prev_checksum, checksum, change_digest, tables, committed_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (revision, self.checksum, checksum, digest, ",".join(ordered), now),
        )
        every = min(256, self.retention)
        if self.retention and revision % every == 0 and revision > self.retention:
            self.connection.execute(
                "DELETE FROM revisions WHERE revision <= ?", (revision - self.retention,)
            )
        return Commit(revision, checksum, ordered)

    def _advance(self, commit: Commit) -> None:
        self.revision, self.checksum = commit.revision, commit.checksum

    def read(self, fn: Callable[[Tx], T], now: float) -> T:
        return fn(Tx(self.connection, now, writable=False))

    # -- replication (see the module docstring)

    def begin_replicated(
        self, fn: Callable[[Tx], T], now: float, key: bytes
    ) -> tuple[T, Commit | None, SealedCommit | None]:
        """
        Hop 1 of a replicated write: the transaction stays open (with its
        revision row recorded) unless ``fn`` changed nothing; the sealed
        entry is the log's copy of it.
        """
        execute = self.connection.execute
        execute("BEGIN IMMEDIATE")
        try:
            tx = Tx(self.connection, now, writable=True, record=True)
            result = fn(tx)
            if not tx.changes:
                execute("ROLLBACK")
                return result, None, None
            tables = sorted(tx.tables)
            commit = self._record(tx.changes, tables, now)
            statements = [[sql, encode_params(params)] for sql, params in tx.statements or ()]
            entry = seal(
                key,
                "commit",
                commit.revision,
                self.checksum,
                commit.checksum,
                {
                    "schema": self.schema_version,
                    "statements": statements,
                    "changes": tx.changes,
                    "tables": tables,
                    "now": now,
                },
            )
        except BaseException:
            self._rollback()
            raise
        return result, commit, entry

    def finish_replicated(self, commit: Commit, ok: bool) -> None:
        """Hop 2: commit (the log has the entry) or roll back."""
        if not ok:
            self._rollback()
            return
        try:
            self.connection.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._advance(commit)

    def replicated_tables(self) -> list[str]:
        rows = self.connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
        ).fetchall()
        return [str(row[0]) for row in rows if row[0] not in LOCAL_TABLES]

    def checksum_at(self, revision: int) -> str | None:
        """The chain checksum at ``revision`` (``None``: pruned or never stored)."""
        if revision == self.revision:
            return self.checksum
        if revision == 0:
            return GENESIS
        row = self.connection.execute(
            "SELECT checksum FROM revisions WHERE revision = ?", (revision,)
        ).fetchone()
        return None if row is None else str(row[0])

    def snapshot_entry(self, key: bytes) -> SealedCommit:
        """The whole replicated state at the head, sealed as a ``snapshot`` entry."""
        execute = self.connection.execute
        tables: dict[str, Any] = {}
        for name in self.replicated_tables():
            cursor = execute(f'SELECT * FROM "{name}" ORDER BY rowid')
            columns = [str(d[0]) for d in cursor.description]
            tables[name] = {
                "columns": columns,
                "rows": [encode_params(row) for row in cursor.fetchall()],
            }
        sequences = [
            [str(name), int(seq)]
            for name, seq in execute("SELECT name, seq FROM sqlite_sequence ORDER BY name")
        ]
        head = execute(
            "SELECT revision, prev_checksum, checksum, change_digest, tables, committed_at "
            "FROM revisions WHERE revision = ?",
            (self.revision,),
        ).fetchone()
        if head is None:
            raise StoreError(f"the control store has no row for its head revision {self.revision}")
        return seal(
            key,
            "snapshot",
            self.revision,
            "",
            self.checksum,
            {
                "schema": self.schema_version,
                "tables": tables,
                "sequences": sequences,
                "head": list(head),
            },
        )

    def apply_entry(self, entry: SealedCommit, key: bytes, force: bool) -> Commit | None:
        """
        Apply one log entry (see ``persistence.apply_commits``); ``None``
        when it was applied already.  ``force`` replaces the store with a
        snapshot even when it is not ahead (the store diverged).
        """
        if entry.revision <= self.revision and not (force and entry.kind == "snapshot"):
            local = self.checksum_at(entry.revision)
            if local is None or local == entry.checksum:
                return None
            raise Diverged(
                f"the store's checksum at revision {entry.revision} differs from the log's"
            )
        if entry.kind == "snapshot":
            if entry.revision == self.revision and entry.checksum == self.checksum:
                return None
            return self._restore(entry, unseal(key, entry))
        if entry.revision != self.revision + 1:
            raise CommitConflict(
                f"log entry {entry.revision} does not follow the store's revision {self.revision}",
                head=self.revision,
            )
        if entry.previous != self.checksum:
            raise Diverged(
                f"log entry {entry.revision} follows another history than the store's "
                f"revision {self.revision}"
            )
        contents = unseal(key, entry)
        self._check_schema(contents, entry)
        statements = contents.get("statements")
        changes = contents.get("changes")
        tables = contents.get("tables")
        now = contents.get("now")
        if (
            not isinstance(statements, list)
            or not isinstance(changes, list)
            or not isinstance(tables, list)
            or not isinstance(now, (int, float))
            or not all(
                isinstance(s, list)
                and len(s) == 2
                and isinstance(s[0], str)
                and isinstance(s[1], list)
                for s in statements
            )
        ):
            raise Conflict(f"log entry {entry.revision} has malformed contents")
        execute = self.connection.execute
        execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                execute(sql, decode_params(params))
            commit = self._record(changes, [str(t) for t in tables], float(now))
            if commit.checksum != entry.checksum:
                raise Diverged(
                    f"applying log entry {entry.revision} ends at another checksum "
                    "than the leader's; rolled back"
                )
            execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._advance(commit)
        return commit

    def _check_schema(self, contents: dict[str, Any], entry: SealedCommit) -> None:
        if contents.get("schema") != self.schema_version:
            raise Conflict(
                f"log entry {entry.revision} was written with schema version "
                f"{contents.get('schema')!r}, this store has {self.schema_version}: "
                "run the same piccolod version on every node"
            )

    def _restore(self, entry: SealedCommit, contents: dict[str, Any]) -> Commit:
        self._check_schema(contents, entry)
        tables, sequences, head = (
            contents.get("tables"),
            contents.get("sequences"),
            contents.get("head"),
        )
        if (
            not isinstance(tables, dict)
            or not isinstance(sequences, list)
            or not isinstance(head, list)
            or len(head) != 6
        ):
            raise Conflict(f"snapshot {entry.revision} has malformed contents")
        revision, prev_checksum, checksum, digest = head[0], head[1], head[2], head[3]
        if (
            revision != entry.revision
            or checksum != entry.checksum
            or not all(isinstance(v, str) for v in (prev_checksum, checksum, digest))
            or chain_checksum(prev_checksum, revision, digest) != checksum
        ):
            raise Conflict(f"snapshot {entry.revision}'s head row does not match the entry")
        local = self.replicated_tables()
        unknown = sorted(set(tables) - set(local))
        if unknown:
            raise Conflict(f"snapshot {entry.revision} has unknown tables: {', '.join(unknown)}")
        execute = self.connection.execute
        execute("BEGIN IMMEDIATE")
        try:
            for name in local:
                execute(f'DELETE FROM "{name}"')
            for name, body in tables.items():
                known = {str(r[1]) for r in execute(f'PRAGMA table_info("{name}")')}
                columns = body.get("columns") if isinstance(body, dict) else None
                rows = body.get("rows") if isinstance(body, dict) else None
                if (
                    not isinstance(columns, list)
                    or not isinstance(rows, list)
                    or not columns
                    or not set(columns) <= known
                ):
                    raise Conflict(f"snapshot {entry.revision}: table {name} is malformed")
                names = ", ".join(f'"{c}"' for c in columns)
                marks = ", ".join("?" for _ in columns)
                self.connection.executemany(
                    f'INSERT INTO "{name}" ({names}) VALUES ({marks})',
                    [decode_params(row) for row in rows],
                )
            execute("DELETE FROM sqlite_sequence")
            for pair in sequences:
                execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", tuple(pair))
            execute("DELETE FROM revisions")
            execute(
                "INSERT INTO revisions "
                "(revision, prev_checksum, checksum, change_digest, tables, committed_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                tuple(head),
            )
            execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        commit = Commit(entry.revision, entry.checksum, tuple(local))
        self._advance(commit)
        return commit

    def write(self, fn: Callable[[Tx], T], now: float) -> tuple[T, Commit | None]:
        execute = self.connection.execute
        execute("BEGIN IMMEDIATE")
        try:
            tx = Tx(self.connection, now, writable=True)
            result = fn(tx)
            if not tx.changes:
                execute("ROLLBACK")
                return result, None
            commit = self._record(tx.changes, sorted(tx.tables), now)
            execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._advance(commit)
        return result, commit

    # -- maintenance

    def quick_check(self) -> tuple[bool, str]:
        rows = self.connection.execute("PRAGMA quick_check").fetchall()
        messages = [str(row[0]) for row in rows]
        if messages == ["ok"]:
            return True, "ok"
        return False, "; ".join(messages[:5]) or "no answer"

    def checkpoint(self, mode: str) -> CheckpointResult:
        row = self.connection.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return CheckpointResult(int(row[0]), int(row[1]), int(row[2]))

    def verify_chain(self) -> CheckResult:
        rows = self.connection.execute(
            "SELECT revision, prev_checksum, checksum, change_digest FROM revisions "
            "ORDER BY revision"
        ).fetchall()
        previous: tuple[int, str] | None = None
        for revision, prev_checksum, checksum, digest in rows:
            if previous is not None:
                if revision != previous[0] + 1:
                    return CheckResult(False, f"revision {previous[0] + 1} is missing", revision)
                if prev_checksum != previous[1]:
                    return CheckResult(False, f"revision {revision} does not chain", revision)
            elif revision == 1 and prev_checksum != GENESIS:
                return CheckResult(False, "revision 1 does not start the chain", revision)
            if chain_checksum(prev_checksum, revision, digest) != checksum:
                return CheckResult(False, f"revision {revision} has a wrong checksum", revision)
            previous = (revision, checksum)
        head = 0 if previous is None else previous[0]
        if head != self.revision:
            return CheckResult(False, f"the head is {head}, expected {self.revision}", head)
        first = rows[0][0] if rows else 0
        return CheckResult(True, f"revisions {first}..{head} chain correctly", head)

    def close(self, checkpoint: bool) -> None:
        try:
            if checkpoint and not self.read_only:
                self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.connection.close()


def _settle(outcome: object, waiter: Deferred[Any]) -> None:
    if waiter.called:  # cancelled while it waited
        return
    if isinstance(outcome, Failure):
        waiter.errback(outcome)
    else:
        waiter.callback(outcome)


def _read_marker(marker: Path) -> str | None:
    try:
        raw = json.loads(marker.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise StoreError(f"the control store marker {marker} is unreadable") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("store_id"), str):
        raise StoreError(f"the control store marker {marker} is malformed")
    return str(raw["store_id"])


def _write_marker(marker: Path, store_id: str, now: float) -> None:
    body = {"format": 1, "store_id": store_id, "created_at": now}
    marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(marker, (json.dumps(body, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------
# The store (reactor thread)

_CLOSED, _OPENING, _OPEN, _CLOSING = "closed", "opening", "open", "closing"


class ReplicationHook(Protocol):
    """What the store needs to replicate its writes (:class:`.replication.SyncDriver`)."""

    def active(self) -> bool:
        """Whether writes must be appended to the cluster log before they commit."""

    def write_refusal(self) -> PiccolodError | None:
        """Why a replicated write may not start now (``None``: it may)."""

    def replicate(self, entry: SealedCommit) -> Deferred[Any]:
        """Append ``entry`` to the cluster log."""

    def conflicted(self, error: BaseException | None) -> None:
        """A replicated write failed because the store is behind the log."""

    def landed(self, entry: SealedCommit) -> Deferred[bool]:
        """Whether the cluster log holds ``entry`` (after an append that failed)."""


_Held = list[tuple[Callable[[], "Deferred[Any]"], "Deferred[Any]"]]


@implementer(IControlStore)
@attrs.define(eq=False)
class ControlStore:
    """
    ``IControlStore`` over one SQLCipher database (see the module docstring).

    @ivar reactor: provides ``IReactorTime`` (and ``IReactorFromThreads``
        when ``pool`` is given).
    @ivar pool: the store's own single-thread pool (``None``: inline).
    @ivar bus: where ``ControlStoreCommit`` goes.
    @ivar registry: gates writes on leading ``resource`` (``None``: always).
    @ivar revision_retention: how many revision rows are kept (0: all).
    @ivar replication: replicates writes while ``active()`` (``None``:
        never; set by the persistence service).
    """

    log = Logger()

    reactor: Any
    pool: ThreadPool | None = None
    bus: IEventBus | None = None
    registry: ILeadershipRegistry | None = None
    resource: str = CONTROL_PLANE
    revision_retention: int = 10_000
    source: str = "persistence"
    replication: ReplicationHook | None = None
    _db: _Database | None = attrs.field(init=False, default=None)
    _log_key: bytes | None = attrs.field(init=False, default=None, repr=False)
    _held: _Held | None = attrs.field(init=False, default=None)
    _status: str = attrs.field(init=False, default=_CLOSED)
    _info: ControlStoreInfo = attrs.field(init=False, factory=lambda: ControlStoreInfo(False))
    auth: AuthRepository = attrs.field(init=False)
    apps: AppsRepository = attrs.field(init=False)
    remote: RemoteRepository = attrs.field(init=False)
    audit: AuditRepository = attrs.field(init=False)
    settings: SettingsRepository = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.auth = AuthRepository(self)
        self.apps = AppsRepository(self)
        self.remote = RemoteRepository(self)
        self.audit = AuditRepository(self)
        self.settings = SettingsRepository(self)

    # -- plumbing

    def _run(self, fn: Callable[[], T]) -> Deferred[T]:
        if self._held is not None:  # a replicated write holds the connection
            return self._enqueue(lambda: self._run(fn))
        return self._submit(fn)

    def _enqueue(self, start: Callable[[], Deferred[T]]) -> Deferred[T]:
        waiter: Deferred[T] = Deferred()
        assert self._held is not None
        self._held.append((start, waiter))
        return waiter

    def _release(self) -> None:
        """Start what waited for the connection, in order, until one holds it again."""
        held, self._held = self._held or [], None
        while held:
            start, waiter = held.pop(0)
            try:
                started = start()
            except BaseException:
                started = fail()
            started.addBoth(_settle, waiter)
            if self._held is not None:
                self._held.extend(held)
                return

    def _submit(self, fn: Callable[[], T]) -> Deferred[T]:
        def guarded() -> T:
            try:
                return fn()
            except BaseException as e:
                raise _translate(e) from None

        if self.pool is None:
            try:
                return succeed(guarded())
            except BaseException as e:
                return fail(e)
        return deferToThreadPool(self.reactor, self.pool, guarded)

    def _require_db(self) -> _Database:
        db = self._db
        if db is None:
            raise Locked("the control store is locked")
        return db

    def _locked(self) -> Deferred[Any] | None:
        if self._status != _OPEN:
            return fail(Locked("the control store is locked"))
        return None

    def _publish(self, commit: Commit) -> None:
        self._info = attrs.evolve(self._info, revision=commit.revision, checksum=commit.checksum)
        if self.bus is None:
            return
        try:
            self.bus.publish(
                ControlStoreCommit(commit.revision, commit.checksum, commit.tables),
                source=self.source,
            )
        except Exception:
            self.log.failure(
                "publishing the commit of revision {revision}", revision=commit.revision
            )

    def _write_refusal(self) -> PiccolodError | None:
        if self.registry is not None and not self.registry.is_leader(self.resource):
            try:
                self.registry.require_leader(self.resource)
            except PiccolodError as e:
                return e
            return NotLeader(self.resource)
        if self._info.read_only:
            return Conflict(
                "the control store was opened read-only (this node followed at unlock); "
                "lock and unlock again to write"
            )
        return None

    # -- lifecycle

    @property
    def is_open(self) -> bool:
        return self._status == _OPEN

    @property
    def revision(self) -> int:
        """The last committed revision (0 while closed)."""
        return self._info.revision

    def info(self) -> ControlStoreInfo:
        return self._info

    def open(
        self,
        path: Path,
        key: bytes,
        *,
        read_only: bool = False,
        marker: Path | None = None,
        check: bool = True,
        log_key: bytes | None = None,
    ) -> Deferred[ControlStoreInfo]:
        """
        Open (or create) the database at ``path`` with ``key`` and run any
        pending migrations.  Fires with :meth:`info`.  ``log_key`` seals
        and opens the cluster log's entries (needed to replicate).  Fails with
        ``Conflict`` when not closed, :class:`StoreUnreadable`,
        :class:`StoreCorrupt`, :class:`StoreMissing` or :class:`StoreError`
        (the store stays closed and nothing was overwritten).
        """
        if self._status != _CLOSED:
            return fail(Conflict(f"the control store is {self._status}"))
        self._status = _OPENING
        now = self.reactor.seconds()

        def opening() -> tuple[_Database, list[Commit]]:
            db, commits = _Database.open(
                path=path,
                key=key,
                read_only=read_only,
                marker=marker,
                check=check,
                now=now,
                retention=self.revision_retention,
            )
            self._db = db
            return db, commits

        def opened(outcome: tuple[_Database, list[Commit]]) -> ControlStoreInfo:
            db, commits = outcome
            if self._status == _OPENING:
                self._status = _OPEN
                self._log_key = log_key
            self._info = ControlStoreInfo(
                open=True,
                read_only=db.read_only,
                revision=db.revision,
                checksum=db.checksum,
                schema_version=db.schema_version,
                path=str(db.path),
            )
            for commit in commits:
                self._publish(commit)
            return self._info

        def failed(failure: Failure) -> Failure:
            self._status = _CLOSED
            return failure

        return self._run(opening).addCallbacks(opened, failed)

    def close(self, checkpoint: bool = True) -> Deferred[None]:
        """
        Close the database (after a truncating WAL checkpoint); idempotent.
        Calls queued before it still run; calls made after it fail with
        ``Locked``.  Never fails: a close error is logged.
        """
        if self._status in (_CLOSED, _CLOSING):
            return succeed(None)
        self._status = _CLOSING

        def closing() -> None:
            db, self._db = self._db, None
            if db is not None:
                db.close(checkpoint)

        def closed(result: object) -> None:
            self._status = _CLOSED
            self._log_key = None
            self._info = ControlStoreInfo(False)
            if isinstance(result, Failure):
                self.log.failure("closing the control store", result)

        return self._run(closing).addBoth(closed)

    # -- IControlStore

    def read(self, fn: Callable[[Tx], T]) -> Deferred[T]:
        """Run ``fn`` with a read-only :class:`Tx` on the store's thread."""
        refused = self._locked()
        if refused is not None:
            return refused
        now = self.reactor.seconds()
        return self._run(lambda: self._require_db().read(fn, now))

    def transaction(self, fn: Callable[[Tx], T]) -> Deferred[T]:
        """
        Run ``fn`` with a writable :class:`Tx` in one SQLite transaction on
        the store's thread; commit one revision if it changed anything.
        """
        refused = self._locked()
        if refused is not None:
            return refused
        refusal = self._write_refusal()
        if refusal is not None:
            return fail(refusal)
        hook = self.replication
        if hook is not None and hook.active():
            if self._held is not None:
                return self._enqueue(lambda: self._replicated(fn, hook))
            return self._replicated(fn, hook)
        now = self.reactor.seconds()

        def done(outcome: tuple[T, Commit | None]) -> T:
            result, commit = outcome
            if commit is not None:
                self._publish(commit)
            return result

        return self._run(lambda: self._require_db().write(fn, now)).addCallback(done)

    # -- replication

    def _replicated(self, fn: Callable[[Tx], T], hook: ReplicationHook) -> Deferred[T]:
        """A write in two hops around the log append (see the module docstring)."""
        refused = self._locked()
        if refused is not None:
            return refused
        refusal = self._write_refusal() or hook.write_refusal()
        if refusal is not None:
            return fail(refusal)
        key = self._log_key
        if key is None:
            return fail(Conflict("the control store was opened without the cluster log's key"))
        now = self.reactor.seconds()
        self._held = []

        def begin() -> tuple[T, Commit | None, SealedCommit | None]:
            return self._require_db().begin_replicated(fn, now, key)

        def began(outcome: tuple[T, Commit | None, SealedCommit | None]) -> Deferred[T] | T:
            result, commit, entry = outcome
            if commit is None or entry is None:
                return result
            try:
                appended = hook.replicate(entry)
            except BaseException:
                appended = fail()
            return appended.addCallbacks(
                lambda _: self._commit_replicated(commit, result, hook),
                lambda failure: self._append_failed(commit, entry, result, failure, hook),
            )

        def release(outcome: Any) -> Any:
            self._release()
            return outcome

        return self._submit(begin).addCallback(began).addBoth(release)

    def _commit_replicated(self, commit: Commit, result: T, hook: ReplicationHook) -> Deferred[T]:
        def committed(_: None) -> T:
            self._publish(commit)
            return result

        def lost(failure: Failure) -> Failure:
            # The log has the entry; the next sync applies it here.
            self.log.failure(
                "committing replicated revision {revision} locally",
                failure,
                revision=commit.revision,
            )
            hook.conflicted(failure.value)
            return failure

        finish = self._submit(lambda: self._require_db().finish_replicated(commit, True))
        return finish.addCallbacks(committed, lost)

    def _append_failed(
        self,
        commit: Commit,
        entry: SealedCommit,
        result: T,
        failure: Failure,
        hook: ReplicationHook,
    ) -> Deferred[T]:
        """
        The append failed.  Refused outright (a conflict, a deposed leader,
        a bad entry): roll back.  Otherwise its answer may have been lost
        after the log took it: ask the log, and commit if it has the entry.
        """
        if failure.check(CommitConflict, NotLeader, Conflict, Locked):
            return self._abort_replicated(commit, failure, hook)
        try:
            checking = hook.landed(entry)
        except BaseException:
            checking = fail()

        def checked(landed: object) -> Deferred[T]:
            if landed is True:
                self.log.warn(
                    "the append of revision {revision} failed ({error}) but the cluster "
                    "log has it: committing",
                    revision=commit.revision,
                    error=failure.getErrorMessage(),
                )
                return self._commit_replicated(commit, result, hook)
            if isinstance(landed, Failure):
                self.log.warn(
                    "could not check whether revision {revision} reached the cluster log: "
                    "{error}",
                    revision=commit.revision,
                    error=landed.getErrorMessage(),
                )
            return self._abort_replicated(commit, failure, hook)

        return checking.addBoth(checked)

    def _abort_replicated(
        self, commit: Commit, failure: Failure, hook: ReplicationHook
    ) -> Deferred[T]:
        def rolled_back(outcome: object) -> Failure:
            if isinstance(outcome, Failure):
                self.log.failure(
                    "rolling back revision {revision}", outcome, revision=commit.revision
                )
            if failure.check(CommitConflict):
                hook.conflicted(failure.value)
                return Failure(
                    Unavailable(
                        "control store catching up with the cluster log; retry shortly",
                        retry_after=0.5,
                    )
                )
            return failure

        finish = self._submit(lambda: self._require_db().finish_replicated(commit, False))
        return finish.addBoth(rolled_back)

    def apply(
        self, entries: Sequence[SealedCommit], *, force_snapshot: bool = False
    ) -> Deferred[CommitsApplied]:
        """
        Apply cluster-log entries in order (one transaction each; see
        ``persistence.apply_commits``): fires with the revision, checksum
        and count applied; fails with ``Locked`` while closed,
        ``CommitConflict`` (head = this revision) for a gap, :class:`Diverged`
        when the store's history differs from the log's, ``Conflict`` for a
        tampered entry.  Entries before the failing one stay applied.  Not
        gated on leadership: the log is the authority.
        """
        refused = self._locked()
        if refused is not None:
            return refused
        return Deferred.fromCoroutine(self._apply(tuple(entries), force_snapshot))

    async def _apply(self, entries: tuple[SealedCommit, ...], force: bool) -> CommitsApplied:
        applied = 0
        for entry in entries:
            if not isinstance(entry, SealedCommit):
                raise Conflict("apply_commits takes SealedCommit entries")
            if self._status != _OPEN:
                raise Locked("the control store is locked")
            key = self._log_key
            if key is None:
                raise Conflict("the control store was opened without the cluster log's key")

            def step(entry: SealedCommit = entry, key: bytes = key) -> Commit | None:
                return self._require_db().apply_entry(entry, key, force)

            commit = await self._run(step)
            if commit is not None:
                applied += 1
                self._publish(commit)
        return CommitsApplied(
            revision=self._info.revision, checksum=self._info.checksum, applied=applied
        )

    def snapshot_entry(self) -> Deferred[SealedCommit]:
        """The whole store at its head, sealed as a ``snapshot`` log entry."""
        refused = self._locked()
        if refused is not None:
            return refused
        key = self._log_key
        if key is None:
            return fail(Conflict("the control store was opened without the cluster log's key"))
        return self._run(lambda: self._require_db().snapshot_entry(key))

    # -- maintenance

    def quick_check(self) -> Deferred[CheckResult]:
        """``PRAGMA quick_check``; fires with the result (``Locked`` while closed)."""
        refused = self._locked()
        if refused is not None:
            return refused

        def check() -> CheckResult:
            db = self._require_db()
            ok, detail = db.quick_check()
            return CheckResult(ok, f"quick_check: {detail}", db.revision)

        return self._run(check)

    def verify_chain(self) -> Deferred[CheckResult]:
        """Recompute the checksum chain of the kept revisions."""
        refused = self._locked()
        if refused is not None:
            return refused
        return self._run(lambda: self._require_db().verify_chain())

    def checkpoint(self, mode: str = "PASSIVE") -> Deferred[CheckpointResult]:
        """A WAL checkpoint (``PASSIVE`` never blocks writers)."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            return fail(ValueError(f"unknown checkpoint mode {mode!r}"))
        refused = self._locked()
        if refused is not None:
            return refused
        return self._run(lambda: self._require_db().checkpoint(mode))

    def when_idle(self) -> Deferred[None]:
        """Fires once every call submitted before it has run."""
        if self._status == _CLOSED:
            return succeed(None)
        return self._run(lambda: None)
