"""
The replicated control store's commit log in etcd (issue 8, item 2).

Keys, relative to the cluster's data prefix (``<prefix>/data/``), so the
rules of ``cluster.get`` and ``cluster.fenced_put`` apply to them too:

``control/commits/<revision, 20 digits>``
    one ``commit`` entry: the JSON of :class:`~piccolod.commands.SealedCommit`
    plus ``term``, the fencing term it was written under;
``control/snapshot``
    the latest ``snapshot`` entry (same JSON);
``control/head``
    the log's head store revision, a decimal string.

An append is one transaction (:meth:`EtcdConsensus.replicate_commit
<piccolod.consensus.etcd.EtcdConsensus.replicate_commit>`): the fence
(the ``control-plane`` leader key's create revision is this node's term)
and the head (a ``commit`` of revision ``r`` needs ``head == r - 1``; a
``snapshot`` of ``R`` needs the head unchanged since it was read and below
``R``, or at ``R`` with the same checksum) are compared, and the entry and
the new head are written together; a snapshot also deletes every commit up
to its revision, which keeps the log bounded.  The failure branch reads
the leader key, the head and the entry's own key, so one round trip tells
``NotLeader`` from ``CommitConflict`` (and a retried append that had
landed from either).

This module holds the layout, the codec (:func:`encode_entry`,
:func:`decode_entry`), the reading of a log slice (:func:`commit_log`),
the follower feed (:class:`CommitFeed`: a watch of the head that publishes
``CommitLogAdvanced``) and the replication-lag figures
(:class:`ReplicationLag`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from piccolod.commands import CommitLog, SealedCommit
from piccolod.consensus.etcd_client import KeyValue, RangeResult, WatchEvent
from piccolod.errors import PiccolodError
from piccolod.events import CommitLogAdvanced

if TYPE_CHECKING:
    from piccolod.consensus.etcd import EtcdConsensus, PrefixWatch

__all__ = [
    "COMMITS",
    "HEAD",
    "SNAPSHOT",
    "CommitFeed",
    "CorruptCommitLog",
    "ReplicationLag",
    "commit_key",
    "commit_log",
    "decode_entry",
    "encode_entry",
    "parse_head",
]

#: Relative keys of the log (under the data prefix).
COMMITS = "control/commits/"
SNAPSHOT = "control/snapshot"
HEAD = "control/head"
#: Digits of a commit key's revision (etcd revisions are int64: 19 digits).
DIGITS = 20


class CorruptCommitLog(PiccolodError):
    """The commit log in the shared store holds something that is not an entry or a head."""

    type = "commit-log-corrupt"
    title = "Cluster commit log is corrupt"
    status = 502


def commit_key(revision: int) -> str:
    """The relative key of the commit entry of ``revision``."""
    return f"{COMMITS}{revision:0{DIGITS}d}"


def encode_entry(entry: SealedCommit, term: int) -> bytes:
    """An entry as stored: its JSON plus the fencing term it is written under."""
    return json.dumps(
        {**entry.to_json(), "term": term}, sort_keys=True, separators=(",", ":")
    ).encode()


def decode_entry(raw: bytes, where: str, kind: str, revision: int | None = None) -> SealedCommit:
    """
    The entry stored at ``where``; it must be of ``kind`` (and, for a
    commit key, of the key's ``revision``).  Raises :class:`CorruptCommitLog`.
    """
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CorruptCommitLog(f"{where}: not JSON") from None
    if not isinstance(data, dict):
        raise CorruptCommitLog(f"{where}: not a JSON object")
    fields = ("previous", "checksum", "sealed")
    got_revision = data.get("revision")
    if (
        not isinstance(got_revision, int)
        or isinstance(got_revision, bool)
        or got_revision < 0
        or not all(isinstance(data.get(f), str) for f in fields)
    ):
        raise CorruptCommitLog(f"{where}: not a sealed commit")
    if data.get("kind") != kind:
        raise CorruptCommitLog(f"{where}: a {data.get('kind')!r} entry where a {kind} belongs")
    if revision is not None and got_revision != revision:
        raise CorruptCommitLog(f"{where}: holds revision {got_revision}")
    return SealedCommit(
        kind=kind,
        revision=got_revision,
        previous=data["previous"],
        checksum=data["checksum"],
        sealed=data["sealed"],
    )


def entry_term(raw: bytes) -> int | None:
    """The term an entry was written under (``None`` when unreadable)."""
    try:
        term = json.loads(raw).get("term")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return term if isinstance(term, int) and not isinstance(term, bool) else None


def parse_head(kv: KeyValue | None, where: str) -> int | None:
    """The head revision stored in ``kv`` (``None``: absent).  Raises :class:`CorruptCommitLog`."""
    if kv is None:
        return None
    text = kv.value.decode("ascii", "replace")
    if not text.isdigit() or len(text) > DIGITS:
        raise CorruptCommitLog(f"{where}: head {kv.value[:40]!r} is not a revision")
    return int(text)


def _revision_of(key: bytes, commits_prefix: bytes) -> int:
    suffix = key[len(commits_prefix) :]
    if len(suffix) != DIGITS or not suffix.isdigit():
        raise CorruptCommitLog(f"{key.decode('utf-8', 'replace')}: not a commit key")
    return int(suffix)


def commit_log(
    after: int,
    limit: int,
    commits: RangeResult,
    head: RangeResult,
    snapshot: RangeResult,
    commits_prefix: bytes,
) -> CommitLog:
    """
    The slice of the log a reader after ``after`` needs, from one
    consistent read: the commits from ``after + 1`` (at most ``limit``),
    preceded by the snapshot when the first commit needed is gone and the
    snapshot is past ``after``.  Raises :class:`CorruptCommitLog`.
    """
    entries = [
        decode_entry(
            kv.value,
            kv.key.decode("utf-8", "replace"),
            "commit",
            _revision_of(kv.key, commits_prefix),
        )
        for kv in commits.kvs
    ]
    more = commits.more
    head_revision = parse_head(head.kvs[0] if head.kvs else None, HEAD)
    snap: SealedCommit | None = None
    if snapshot.kvs:
        snap = decode_entry(snapshot.kvs[0].value, SNAPSHOT, "snapshot")
    if head_revision is None or after >= head_revision:
        entries, more = [], False
    elif (
        snap is not None
        and after < snap.revision
        and (not entries or entries[0].revision != after + 1)
    ):
        entries = [snap, *(e for e in entries if e.revision > snap.revision)]
        if len(entries) > limit:
            entries, more = entries[:limit], True
    return CommitLog(entries=tuple(entries), head=head_revision, more=more)


# --------------------------------------------------------------------------
# Replication lag


@attrs.define
class ReplicationLag:
    """
    What this node knows of the log's head and its own store.

    @ivar head: the log's head as last seen (``None``: empty or unknown).
    @ivar log_revision: etcd's revision of that head.
    @ivar applied: this node's store revision (from ``persistence.control_commit``
        events, or ``persistence.status``), ``None`` until known.
    @ivar behind_since: when a head beyond ``applied`` was first seen
        (``None``: caught up).
    """

    head: int | None = None
    log_revision: int = 0
    applied: int | None = None
    behind_since: float | None = None

    def update(self, now: float) -> None:
        behind = self.head is not None and (self.applied is None or self.applied < self.head)
        if not behind:
            self.behind_since = None
        elif self.behind_since is None:
            self.behind_since = now

    def to_json(self, now: float) -> dict[str, Any]:
        lag: int | None
        if self.head is None:
            lag = 0
        elif self.applied is None:
            lag = None
        else:
            lag = max(0, self.head - self.applied)
        return {
            "log_head": self.head,
            "log_revision": self.log_revision,
            "applied": self.applied,
            "lag": lag,
            "behind_for": (
                round(max(0.0, now - self.behind_since), 3)
                if self.behind_since is not None
                else 0.0
            ),
        }


# --------------------------------------------------------------------------
# The follower feed


@attrs.define(eq=False)
class CommitFeed:
    """
    Announces the log's head on the bus: reads it once (linearizable) and
    publishes ``CommitLogAdvanced`` when the log has one, then watches the
    head key from the read's revision on and publishes every new head
    (one event per watch batch: coalesced).  A broken stream resumes
    (:class:`~piccolod.consensus.etcd.PrefixWatch`); compaction or a
    refused watch starts over from a read; a failed read is retried with
    backoff.  Runs on every node, the leader included.

    On the node that appended a head itself the event waits until its own
    store has committed that revision (``persistence.control_commit``), at
    most ``own_delay`` seconds: announced earlier, it would tell the
    store's sync driver that the log is ahead of a commit still in its
    second hop, and the driver would stop writes to catch up with itself.
    """

    log = Logger()

    owner: EtcdConsensus
    lag: ReplicationLag
    own_delay: float = 1.0
    #: ``stopped``, ``reading``, ``watching`` or ``backoff``.
    state: str = attrs.field(init=False, default="stopped")
    published: int = attrs.field(init=False, default=0)
    resyncs: int = attrs.field(init=False, default=0)
    last_error: str | None = attrs.field(init=False, default=None)
    #: Whether the head has been read once (``lag.head is None`` then
    #: means the log is empty, not unknown).
    known: bool = attrs.field(init=False, default=False)
    _watch: PrefixWatch | None = attrs.field(init=False, default=None)
    _timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _reading: Deferred[Any] | None = attrs.field(init=False, default=None)
    _attempt: int = attrs.field(init=False, default=0)
    #: Revisions this node appended itself, not yet announced.
    _own: set[int] = attrs.field(init=False, factory=set)
    #: A head of this node's own, held until its store commits it.
    _held: KeyValue | None = attrs.field(init=False, default=None)
    _hold_timer: IDelayedCall | None = attrs.field(init=False, default=None)

    def appended(self, revision: int) -> None:
        """This node appended ``revision``: hold its announcement (see the class)."""
        self._own.add(revision)
        if len(self._own) > 1000:
            self._own = {r for r in self._own if r >= revision - 100}

    def committed(self, revision: int) -> None:
        """This node's store committed ``revision``: announce a head held for it."""
        held = self._held
        if held is not None and self.lag.head is not None and revision >= self.lag.head:
            self._release()

    def start(self) -> None:
        if self.state != "stopped":
            return
        self._read()

    def stop(self) -> None:
        self.state = "stopped"
        self.known = False
        self._cancel_hold()
        self._held = None
        self._own.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._reading is not None:
            reading, self._reading = self._reading, None
            reading.cancel()
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.cancel()

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "published": self.published,
            "resyncs": self.resyncs,
            "last_error": self.last_error,
            "known": self.known,
        }

    def _read(self) -> None:
        self.state = "reading"
        head_key = self.owner.settings.data_key(HEAD)
        d = self.owner.client.range(head_key)
        self._reading = d
        d.addCallbacks(self._read_done, self._read_failed)

    def _read_done(self, result: RangeResult) -> None:
        self._reading = None
        if self.state != "reading":
            return
        self._attempt = 0
        self.last_error = None
        if result.kvs:
            self._seen(result.kvs[0])
        self.state = "watching"
        self._watch = watch = self.owner.watch_prefix(HEAD, result.revision + 1, self._events)
        watch.when_stopped().addBoth(self._watch_stopped, watch)
        if not self.known:
            self.known = True
            self.owner.log_known()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = None
        if self.state != "reading":
            return None
        error = failure.value
        if not isinstance(error, PiccolodError):
            self.log.failure("reading the commit log's head", failure)
        self._retry(error)
        return None

    def _retry(self, error: BaseException | None) -> None:
        self.last_error = error.detail if isinstance(error, PiccolodError) else str(error)
        delay = self.owner.settings.backoff.delay(self._attempt, self.owner.rand)
        self._attempt += 1
        self.state = "backoff"
        self._timer = self.owner.clock.callLater(delay, self._retried)

    def _retried(self) -> None:
        self._timer = None
        if self.state == "backoff":
            self._read()

    def _events(self, events: Sequence[WatchEvent]) -> None:
        puts = [e for e in events if e.type == "PUT" and e.kv.key == HEAD.encode()]
        if puts:
            self._seen(puts[-1].kv)

    def _seen(self, kv: KeyValue) -> None:
        try:
            head = parse_head(kv, HEAD)
        except CorruptCommitLog as e:
            self.last_error = e.detail
            self.log.error("the cluster commit log: {error}", error=e.detail)
            return
        if head is None or head == self.lag.head:
            return
        first = self.lag.head is None
        self.lag.head = head
        self.lag.log_revision = kv.mod_revision
        self.lag.update(self.owner.clock.seconds())
        if first and self.known:
            self.owner.log_known()
        own = head in self._own
        self._own = {r for r in self._own if r > head}
        if own and (self.lag.applied is None or self.lag.applied < head):
            self._held = kv
            if self._hold_timer is None:
                self._hold_timer = self.owner.clock.callLater(self.own_delay, self._release)
            return
        self._held = kv
        self._release()

    def _cancel_hold(self) -> None:
        if self._hold_timer is not None and self._hold_timer.active():
            self._hold_timer.cancel()
        self._hold_timer = None

    def _release(self) -> None:
        """Announce the newest head seen (held or not)."""
        self._cancel_hold()
        kv, self._held = self._held, None
        if kv is None or self.lag.head is None:
            return
        bus = self.owner.bus
        if bus is not None:
            event = CommitLogAdvanced(head=self.lag.head, log_revision=self.lag.log_revision)
            bus.publish(event, source="consensus")
            self.published += 1

    def _watch_stopped(self, result: object, watch: PrefixWatch) -> None:
        if self._watch is not watch or self.state != "watching":
            return None
        self._watch = None
        if isinstance(result, Failure):
            # Compacted (WatchCanceled) or refused: whatever happened since is
            # read again, then watched from there.
            self.resyncs += 1
            error = result.value
            self.last_error = error.detail if isinstance(error, PiccolodError) else str(error)
            self.log.info(
                "the commit log's watch ended ({error}); reading the head again",
                error=self.last_error,
            )
            self._read()
        return None
