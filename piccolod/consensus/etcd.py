"""
etcd consensus: leadership per resource on a real etcd cluster, reached
over its JSON gateway (:mod:`piccolod.consensus.etcd_client`).

For each tracked resource (``control-plane``, ``app:<name>``) a
:class:`ResourceElection` holds one lease and campaigns with one
transaction: create ``<prefix>/leader/<resource>`` bound to the lease
unless it exists (compare its create revision with 0), else read it.  The
key's value is ``{"node_id", "api_address"}``; its **create revision is the
term** written to the leadership registry and the fencing token of every
leader write (:meth:`EtcdConsensus.fenced_put` compares it in the same
transaction as the write, so a deposed leader's late write is refused by
etcd itself).  Create revisions are etcd store revisions, which only grow,
so terms only grow.

The election then watches its key from the answer's revision on: any
change (the holder's lease expired or was revoked, the key was deleted)
makes it campaign again.  It also re-checks every ``ttl`` seconds, and
whenever the watch breaks (a member died), so a stalled watch cannot hide
a change for long.

**Keepalives** run from the grant on, whatever the role (a campaigner keeps
its lease alive while it waits: etcd#12334): one POST of
``/v3/lease/keepalive`` every ``retry_period``, never two at once.

**Safety: never leader past the lease's expiry.**  etcd expires a lease
``TTL`` seconds after it *received* the last renewal; it cannot have
received it before we *sent* it, so the lease lives at least until
``sent + TTL``.  The election records the send time of the last renewal
that etcd confirmed and steps down to ``unknown`` at ``sent +
renew_deadline`` unless a later one is confirmed first.  With
``renew_deadline < ttl`` (checked at configuration) this is before the
lease can expire, with ``ttl - renew_deadline`` seconds to spare for clock
rate differences and for the reactor's timer lag.  A paused process (a
SIGSTOP, a long GC) cannot act while paused; when it resumes, the overdue
deadline fires before anything else it does as leader: answers that arrive
late are judged by their send time, every promotion and every fenced write
checks the deadline first, and etcd refuses its fenced writes anyway once
another node holds the key.

**Failures.**  The client rotates endpoints on connection errors and
timeouts.  A campaign round that fails (no endpoint answered, no quorum)
makes a follower ``unknown`` (it no longer knows the leader) and is retried
with jittered backoff; a leader keeps its role only while its renewals
succeed (the deadline decides).  :meth:`EtcdConsensus.track` fails with
``Unavailable`` when the first round fails, and the election goes on
trying.  The ``consensus`` health component is ``ok`` when every endpoint
reports a healthy cluster, ``warn`` when some do not, and ``error`` when
none does (no quorum reachable).

**Step-down** on :meth:`~EtcdConsensus.release` and on stop: the role
becomes ``unknown`` at once, then the lease is revoked, which deletes the
key so that another node takes over without waiting for the TTL.

**Membership.**  While running, each node keeps ``<prefix>/members/<node
id>`` bound to its ``control-plane`` lease; ``cluster.status`` lists them.

**Replication hooks** (for the persistence subsystem, through commands):
:meth:`EtcdConsensus.fenced_put` and :meth:`EtcdConsensus.watch_prefix`
work on keys relative to ``<prefix>/data/``.

**The replicated control store's commit log** (layout and rules in
:mod:`piccolod.consensus.etcd_log`): :meth:`EtcdConsensus.replicate_commit`
appends one entry in one fenced transaction that also checks the log's
head (``cluster.replicate_commit``); :meth:`EtcdConsensus.read_commits`
reads a slice (``cluster.read_commits``); a :class:`~.etcd_log.CommitFeed`
announces every new head on the bus (``CommitLogAdvanced``), and
``cluster.status`` reports the replication lag.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from piccolod.commands import (
    ClusterStatus,
    ClusterValue,
    CommandContext,
    CommitLog,
    CommitReplicated,
    FencedPut,
    FencedPutDone,
    GetClusterStatus,
    GetStorageStatus,
    LeadershipResult,
    ReadClusterKey,
    ReadCommits,
    ReleaseResource,
    ReplicateCommit,
    SealedCommit,
    TrackResource,
)
from piccolod.consensus.etcd_client import (
    EtcdClient,
    EtcdError,
    KeyValue,
    LeaseNotFound,
    Outcome,
    Watch,
    WatchEvent,
    check_endpoints,
    compare,
    op_delete,
    op_put,
    op_range,
    prefix_end,
    txn_ranges,
)
from piccolod.consensus.etcd_log import (
    COMMITS,
    HEAD,
    SNAPSHOT,
    CommitFeed,
    ReplicationLag,
    commit_key,
    commit_log,
    decode_entry,
    encode_entry,
    parse_head,
)
from piccolod.errors import (
    CommitConflict,
    ConfigError,
    InvalidCommand,
    NotLeader,
    NotReady,
    PiccolodError,
    StaleTerm,
    Unavailable,
)
from piccolod.events import ControlStoreCommit, HealthLevel, LockState, LockStateChanged, Role
from piccolod.interfaces import (
    Backoff,
    ICommandDispatcher,
    IConsensus,
    IEventBus,
    IHealth,
    ILeadershipRegistry,
    ISubscription,
    LeadershipState,
)
from piccolod.kernel.aio import provides
from piccolod.kernel.dispatcher import Registration, register_all
from piccolod.kernel.plugins import SubsystemContext

__all__ = [
    "CONTROL_PLANE",
    "EtcdConsensus",
    "EtcdSettings",
    "PrefixWatch",
    "ResourceElection",
]

#: The resource every node's kernel campaigns for.
CONTROL_PLANE = "control-plane"
#: The health component this subsystem reports.
COMPONENT = "consensus"
#: Retry delays of a failed campaign round or a broken prefix watch.
DEFAULT_BACKOFF = Backoff(initial=0.25, maximum=5.0, factor=2.0, jitter=0.2)


# --------------------------------------------------------------------------
# Settings


@attrs.frozen
class EtcdSettings:
    """
    The ``[subsystems.consensus]`` section of the ``etcd`` variant.

    @ivar endpoints: client URLs of the etcd members.
    @ivar prefix: the cluster's key prefix (``/piccolod``).
    @ivar ttl: lease TTL, seconds (an integer: etcd's unit).
    @ivar renew_deadline: a leader without a confirmed renewal sent within
        this many seconds steps down; below ``ttl``.
    @ivar retry_period: seconds between keepalives.
    @ivar request_timeout: bound of one request to one endpoint.
    @ivar resources: resources tracked from the start besides ``control-plane``.
    """

    endpoints: tuple[str, ...]
    prefix: str = "/piccolod"
    ttl: int = 5
    renew_deadline: float = 3.0
    retry_period: float = 0.5
    request_timeout: float = 1.0
    resources: tuple[str, ...] = ()
    backoff: Backoff = DEFAULT_BACKOFF

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EtcdSettings:
        """Validate a config section; raises one ``ConfigError`` with every problem."""
        errors: list[str] = []
        where = "[subsystems.consensus]"
        endpoints = config.get("endpoints", ["http://127.0.0.1:2379"])
        if isinstance(endpoints, str) or not isinstance(endpoints, (list, tuple)) or not endpoints:
            errors.append(f"{where} endpoints must be a non-empty list of http(s)://host:port URLs")
            endpoints = []
        else:
            try:
                check_endpoints(endpoints)
            except InvalidCommand as e:
                errors.append(f"{where} endpoints: {e.detail}")
        prefix = config.get("prefix", "/piccolod")
        if (
            not isinstance(prefix, str)
            or not prefix.startswith("/")
            or prefix.endswith("/")
            or len(prefix) < 2
            or any(c.isspace() for c in prefix)
        ):
            errors.append(
                f"{where} prefix must look like /name (no trailing slash), got {prefix!r}"
            )

        def number(key: str, default: float) -> float:
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                errors.append(f"{where} {key} must be a positive number, got {value!r}")
                return default
            return float(value)

        raw_ttl = config.get("ttl", 5)
        ttl = 5
        if isinstance(raw_ttl, bool) or not isinstance(raw_ttl, int) or raw_ttl < 1:
            errors.append(f"{where} ttl must be a whole number of seconds >= 1, got {raw_ttl!r}")
        else:
            ttl = raw_ttl
        renew_deadline = number("renew_deadline", 3.0)
        retry_period = number("retry_period", 0.5)
        request_timeout = number("request_timeout", 1.0)
        if not renew_deadline < ttl:
            errors.append(
                f"{where} renew_deadline ({renew_deadline}) must be below ttl ({ttl}): "
                "a leader must step down before its lease can expire"
            )
        if not retry_period * 1.2 <= renew_deadline:
            errors.append(
                f"{where} retry_period ({retry_period}) must be at most renew_deadline/1.2 "
                f"({renew_deadline / 1.2:.3g}), or one slow keepalive costs the leadership"
            )
        if not request_timeout <= renew_deadline:
            errors.append(
                f"{where} request_timeout ({request_timeout}) must be at most "
                f"renew_deadline ({renew_deadline})"
            )
        resources = config.get("resources", [])
        if not isinstance(resources, (list, tuple)) or not all(
            isinstance(r, str) and r.strip() for r in resources
        ):
            errors.append(f"{where} resources must be a list of non-empty strings")
            resources = []
        if errors:
            raise ConfigError(errors)
        return cls(
            endpoints=tuple(endpoints),
            prefix=prefix,
            ttl=ttl,
            renew_deadline=renew_deadline,
            retry_period=retry_period,
            request_timeout=request_timeout,
            resources=tuple(resources),
        )

    @property
    def margin(self) -> float:
        """Seconds between the renew deadline and the earliest lease expiry."""
        return self.ttl - self.renew_deadline

    def leader_key(self, resource: str) -> bytes:
        return f"{self.prefix}/leader/{resource}".encode()

    def member_key(self, node_id: str) -> bytes:
        return f"{self.prefix}/members/{node_id}".encode()

    @property
    def members_prefix(self) -> bytes:
        return f"{self.prefix}/members/".encode()

    @property
    def data_prefix(self) -> bytes:
        return f"{self.prefix}/data/".encode()

    def data_key(self, key: str) -> bytes:
        return self.data_prefix + key.encode()


# --------------------------------------------------------------------------
# One resource


@attrs.define
class _Lease:
    """Our lease: its id, the TTL granted, and the send time of the last confirmed renewal."""

    id: int
    ttl: int
    confirmed_at: float


@attrs.define(eq=False)
class ResourceElection:
    """
    Campaign for, observe and keep (or lose) one resource.  Driven by
    :class:`EtcdConsensus`; see the module docstring for the protocol.

    @ivar term: the create revision of the leader key as last seen.
    @ivar holder: the leader key as last seen (``None``: none seen yet).
    """

    log = Logger()

    owner: EtcdConsensus
    resource: str
    key: bytes = attrs.field(init=False)
    role: Role = attrs.field(init=False, default=Role.UNKNOWN)
    term: int = attrs.field(init=False, default=0)
    holder: KeyValue | None = attrs.field(init=False, default=None)
    lease: _Lease | None = attrs.field(init=False, default=None)
    #: Send time of the last request etcd answered (a round or a renewal):
    #: a follower's view is at most ``renew_deadline`` older than this.
    contact_at: float = attrs.field(init=False, default=float("-inf"))
    last_error: str | None = attrs.field(init=False, default=None)
    #: Counters, for status and tests.
    rounds: int = attrs.field(init=False, default=0)
    renewals: int = attrs.field(init=False, default=0)
    renew_failures: int = attrs.field(init=False, default=0)
    deadline_misses: int = attrs.field(init=False, default=0)
    leases_lost: int = attrs.field(init=False, default=0)
    #: How often the registry refused etcd's view (terms going backwards).
    refusals: int = attrs.field(init=False, default=0)
    _keepalive: LoopingCall | None = attrs.field(init=False, default=None)
    _renewing: list[Deferred[None]] | None = attrs.field(init=False, default=None)
    _deadline: IDelayedCall | None = attrs.field(init=False, default=None)
    _loop: Deferred[None] | None = attrs.field(init=False, default=None)
    _wake: Deferred[str] | None = attrs.field(init=False, default=None)
    #: A poke that came while the loop was not waiting (it then does not wait).
    _poked: str | None = attrs.field(init=False, default=None)
    _wait_timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _sleep_timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _in_flight: Deferred[Any] | None = attrs.field(init=False, default=None)
    _watch: Watch | None = attrs.field(init=False, default=None)
    _waiters: list[Deferred[LeadershipState]] = attrs.field(init=False, factory=list)
    _attempt: int = attrs.field(init=False, default=0)
    _stopping: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self.key = self.owner.settings.leader_key(self.resource)

    # -- facts ------------------------------------------------------------------

    @property
    def clock(self) -> IReactorTime:
        return self.owner.clock

    @property
    def client(self) -> EtcdClient:
        return self.owner.client

    def window(self, lease: _Lease) -> float:
        """How long after a confirmed renewal was sent this node may lead."""
        settings = self.owner.settings
        return min(settings.renew_deadline, lease.ttl - settings.margin)

    def fresh_until(self) -> float:
        """Until when this node may act as leader (``-inf`` without a lease)."""
        lease = self.lease
        if lease is None:
            return float("-inf")
        return lease.confirmed_at + self.window(lease)

    def fresh(self) -> bool:
        """Whether a renewal was confirmed recently enough to lead now."""
        return self.clock.seconds() < self.fresh_until()

    def leading(self) -> bool:
        """Leader now: the role says so and the renew deadline has not passed."""
        return self.role is Role.LEADER and self.fresh()

    @property
    def known(self) -> bool:
        return self.role is not Role.UNKNOWN

    def to_json(self) -> dict[str, Any]:
        state = self.owner.registry.state(self.resource)
        out = state.to_json()
        out.update(
            key=self.key.decode("utf-8", "replace"),
            lease=self.lease.id if self.lease else None,
            fresh_for=(
                round(max(0.0, self.fresh_until() - self.clock.seconds()), 3)
                if self.role is Role.LEADER
                else None
            ),
            renewals=self.renewals,
            renew_failures=self.renew_failures,
            deadline_misses=self.deadline_misses,
            leases_lost=self.leases_lost,
            refusals=self.refusals,
            rounds=self.rounds,
            last_error=self.last_error,
        )
        return out

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        if self._loop is not None:
            return
        self._stopping = False
        loop = Deferred.fromCoroutine(self._run())
        self._loop = loop

        def ended(result: object) -> None:
            if self._loop is loop:
                self._loop = None
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure(
                    "the election of {resource} stopped", result, resource=self.resource
                )

        loop.addBoth(ended)

    def when_known(self) -> Deferred[LeadershipState]:
        """Fires once the role is leader or follower; fails with the first round's error."""
        if self.role is not Role.UNKNOWN:
            return succeed(self.owner.registry.state(self.resource))
        d: Deferred[LeadershipState] = Deferred(self._forget_waiter)
        self._waiters.append(d)
        return d

    def _forget_waiter(self, d: Deferred[LeadershipState]) -> None:
        if d in self._waiters:
            self._waiters.remove(d)

    async def stop(self, revoke: bool = True) -> None:
        """Step down at once, stop every timer and stream, then revoke the lease."""
        self._stopping = True
        self._set_unknown("stopping")
        self._cancel_deadline()
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        self._end_watch()
        for timer in (self._wait_timer, self._sleep_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._wait_timer = self._sleep_timer = None
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.cancel()
        if self._loop is not None:
            loop, self._loop = self._loop, None
            loop.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(NotReady(f"{self.resource} is no longer tracked"))
        lease, self.lease = self.lease, None
        if revoke and lease is not None:
            try:
                await self.client.revoke(lease.id)
            except PiccolodError as e:
                self.log.warn(
                    "could not revoke the lease of {resource}: {error}",
                    resource=self.resource,
                    error=e.detail,
                )

    # -- the campaign loop --------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._round()
            except CancelledError:
                if self._stopping:
                    return
                raise
            except PiccolodError as e:
                if self._stopping:
                    return
                self._round_failed(e)
                delay = self.owner.settings.backoff.delay(self._attempt, self.owner.rand)
                self._attempt += 1
                await self._sleep(delay)

    def _may_lead(self) -> bool:
        owner = self.owner
        return owner.may_campaign() or (self.role is Role.LEADER and owner.may_keep())

    def eligibility_changed(self) -> None:
        """The owner's storage locked, unlocked or ran out of grace: a new round now."""
        if self.role is Role.LEADER and not self._may_lead():
            self._step_down("this node's storage is locked")
        self._poke("eligibility changed")

    async def _observe(self, lease: _Lease) -> None:
        """A round that does not campaign: read the key, follow its holder, watch."""
        sent = self.clock.seconds()
        found = await self.client.range(self.key)
        if self._stopping or self.lease is not lease:
            return
        self.contact_at = max(self.contact_at, sent)
        self._attempt = 0
        self.last_error = None
        holder = found.kvs[0] if found.kvs else None
        self.holder = holder
        if holder is not None and (
            holder.lease == lease.id or _holder_node(holder) == self.owner.node_id
        ):
            # This node's own key (it led until its storage locked, or an
            # earlier incarnation's): hand the leadership on at once.
            self._step_down("this node's storage is locked")
            await self.client.delete_if_created_at(self.key, holder.create_revision)
            return
        if holder is None:
            self._set_unknown("no leader; this node's storage is locked, so it does not campaign")
        else:
            self._follow(holder)
        await self._watch_until_change(found.revision)

    async def _round(self) -> None:
        self.rounds += 1
        lease = await self._ensure_lease()
        if not self._may_lead():
            await self._observe(lease)
            return
        sent = self.clock.seconds()
        campaign = await self.client.create_if_absent(self.key, self.owner.value, lease.id)
        if self._stopping or self.lease is not lease:
            return  # the lease was lost meanwhile: start over
        self.contact_at = max(self.contact_at, sent)
        self._attempt = 0
        self.last_error = None
        holder = campaign.holder
        self.holder = holder
        if holder.lease == lease.id:
            if not self._may_lead():
                return  # its storage locked meanwhile: the next round hands the key on
            if not self.fresh():
                # The key is ours but no renewal is confirmed recently
                # enough (a pause, a slow etcd): confirm one first.
                self._step_down("renewal not confirmed")
                await self._renew()
                if self._stopping or self.lease is not lease or not self.fresh():
                    return
            self._lead(holder, won=campaign.won)
        elif _holder_node(holder) == self.owner.node_id:
            # Our own key from a previous lease (a restart faster than the
            # TTL): remove exactly that incarnation and campaign again.
            self.log.info(
                "{resource}: removing this node's stale leader key (term {term})",
                resource=self.resource,
                term=holder.create_revision,
            )
            self._step_down("stale key of this node")
            await self.client.delete_if_created_at(self.key, holder.create_revision)
            return
        else:
            self._follow(holder)
        await self._watch_until_change(campaign.revision)

    def _round_failed(self, error: PiccolodError) -> None:
        self.last_error = error.detail
        self.log.warn(
            "{resource}: campaign round failed ({error}); retrying",
            resource=self.resource,
            error=error.detail,
        )
        if isinstance(error, LeaseNotFound) and self.lease is not None:
            self._lease_lost("etcd does not know the lease")
        if self.role is Role.FOLLOWER:
            self._set_unknown(f"cannot reach etcd: {error.detail}")
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(
                error
                if isinstance(error, Unavailable)
                else Unavailable(f"{self.resource}: {error.detail}")
            )

    async def _ensure_lease(self) -> _Lease:
        if self.lease is not None:
            return self.lease
        sent = self.clock.seconds()
        granted = await self.client.grant(self.owner.settings.ttl)
        if self._stopping:
            self.client.revoke(granted.id).addErrback(lambda _: None)
            raise CancelledError()
        lease = _Lease(id=granted.id, ttl=granted.ttl, confirmed_at=sent)
        self.lease = lease
        self._keepalive = LoopingCall(self._send_keepalive)
        self._keepalive.clock = self.clock
        self._keepalive.start(self.owner.settings.retry_period, now=False).addErrback(
            lambda f: self.log.failure("keepalive loop of {resource}", f, resource=self.resource)
        )
        self.owner._new_lease(self, lease.id)
        return lease

    async def _watch_until_change(self, revision: int) -> None:
        """Wait until the key changes after ``revision``, the watch breaks, or a poke."""
        watch = self.client.watch(self.key, self._key_changed, start_revision=revision + 1)
        self._watch = watch
        watch.when_done().addBoth(self._watch_ended, watch)
        reason = await self._wait(self.owner.settings.ttl)
        self._end_watch()
        if reason == "watch failed":
            # Let the next round find out (on the next endpoint) whether
            # etcd is there at all; back off a little so a broken endpoint
            # cannot spin the loop.
            await self._sleep(self.owner.settings.backoff.delay(0, self.owner.rand))

    def _key_changed(self, events: Sequence[WatchEvent], revision: int) -> None:
        if any(e.type == "DELETE" for e in events) and self.role is Role.LEADER:
            self._step_down("the leader key was deleted")
        self._poke("key changed")

    def _watch_ended(self, result: object, watch: Watch) -> None:
        if self._watch is not watch:
            return
        if isinstance(result, Failure):
            if not result.check(PiccolodError):
                self.log.failure("watch of {resource}", result, resource=self.resource)
            self._poke("watch failed")
        else:
            self._poke("watch ended")

    def _end_watch(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.cancel()

    def _wait(self, timeout: float) -> Deferred[str]:
        """
        Fires with a reason on :meth:`_poke` (at once if one came since the
        last wait), or with ``"recheck"`` after ``timeout``.
        """
        if self._poked is not None:
            reason, self._poked = self._poked, None
            return succeed(reason)
        wake: Deferred[str] = Deferred()
        self._wake = wake
        self._wait_timer = self.clock.callLater(timeout, self._poke, "recheck")
        return wake

    def _sleep(self, delay: float) -> Deferred[None]:
        """A backoff pause that pokes do not shorten (stopping cancels it)."""
        wake: Deferred[None] = Deferred()

        def woke() -> None:
            self._sleep_timer = None
            wake.callback(None)

        self._sleep_timer = self.clock.callLater(delay, woke)
        self._poked = None
        return wake

    def _poke(self, reason: str) -> None:
        if self._wait_timer is not None and self._wait_timer.active():
            self._wait_timer.cancel()
        self._wait_timer = None
        wake, self._wake = self._wake, None
        if wake is not None and not wake.called:
            wake.callback(reason)
        elif wake is None and not self._stopping:
            self._poked = reason

    # -- keepalives ---------------------------------------------------------------

    def _send_keepalive(self) -> None:
        if self._renewing is None:
            self._renew().addErrback(lambda _: None)

    def _renew(self) -> Deferred[None]:
        """One keepalive (or the one in flight); fires once it is judged."""
        done: Deferred[None] = Deferred()
        if self._renewing is not None:
            self._renewing.append(done)
            return done
        lease = self.lease
        if lease is None:
            return fail(Unavailable(f"{self.resource}: no lease to renew"))
        self._renewing = [done]
        sent = self.clock.seconds()
        d = self.client.keepalive(lease.id)
        self._in_flight = d
        d.addCallbacks(
            self._renewed, self._renew_failed, callbackArgs=(lease, sent), errbackArgs=(lease,)
        )
        d.addBoth(self._renewal_done)
        return done

    def _renewal_done(self, result: object) -> None:
        self._in_flight = None
        waiters, self._renewing = self._renewing or [], None
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    def _renewed(self, ttl: int, lease: _Lease, sent: float) -> None:
        if lease is not self.lease:
            return
        if ttl <= 0:
            self._lease_lost("the lease expired")
            return
        lease.ttl = ttl
        lease.confirmed_at = max(lease.confirmed_at, sent)
        self.contact_at = max(self.contact_at, sent)
        self.renewals += 1
        if self.role is not Role.UNKNOWN:
            self._arm_deadline()

    def _renew_failed(self, failure: Failure, lease: _Lease) -> Failure | None:
        if failure.check(CancelledError) or lease is not self.lease:
            return None
        if failure.check(LeaseNotFound):
            self._lease_lost("etcd does not know the lease")
            return None
        self.renew_failures += 1
        error = failure.value
        detail = error.detail if isinstance(error, PiccolodError) else str(error)
        self.log.warn(
            "{resource}: keepalive failed ({error}); leading for {left:.2f}s more at most",
            resource=self.resource,
            error=detail,
            left=max(0.0, self.fresh_until() - self.clock.seconds())
            if self.role is Role.LEADER
            else 0.0,
        )
        if self.role is not Role.LEADER:
            self._poke("keepalive failed")  # a follower re-checks what it knows
        return failure

    def _lease_lost(self, reason: str) -> None:
        self.leases_lost += 1
        self.lease = None
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        self._step_down(reason)
        self.log.warn("{resource}: lease lost ({reason})", resource=self.resource, reason=reason)
        self._poke("lease lost")

    def _deadline_at(self) -> float:
        if self.role is Role.LEADER:
            return self.fresh_until()
        return self.contact_at + self.owner.settings.renew_deadline

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        delay = self._deadline_at() - self.clock.seconds()
        if delay <= 0:
            self._deadline_passed()
            return
        self._deadline = self.clock.callLater(delay, self._deadline_passed)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _deadline_passed(self, poke_later: bool = False) -> None:
        """
        No renewal confirmed in time: a leader steps down before its lease
        can expire; a follower no longer knows who leads (``unknown``).
        With ``poke_later`` the campaign loop is woken on the next turn
        (not from inside the I/O being delivered).
        """
        self._deadline = None
        if self.role is Role.UNKNOWN:
            return
        if self.clock.seconds() < self._deadline_at():
            self._arm_deadline()
            return
        self.deadline_misses += 1
        if self.role is Role.LEADER:
            self.log.warn(
                "{resource}: no renewal confirmed within {deadline}s: stepping down "
                "before the lease can expire",
                resource=self.resource,
                deadline=self.owner.settings.renew_deadline,
            )
            self._step_down("renew deadline passed")
        else:
            self.log.warn(
                "{resource}: no contact with etcd for {deadline}s: leader unknown",
                resource=self.resource,
                deadline=self.owner.settings.renew_deadline,
            )
            self._set_unknown("no contact with etcd")
        if poke_later:
            self.clock.callLater(0, self._poke, "renew deadline passed")
        else:
            self._poke("renew deadline passed")

    # -- roles --------------------------------------------------------------------

    def _lead(self, holder: KeyValue, won: bool) -> None:
        term = holder.create_revision
        registry = self.owner.registry
        try:
            registry.update(
                self.resource,
                Role.LEADER,
                term,
                leader_id=self.owner.node_id,
                leader_address=self.owner.api_address,
            )
        except (StaleTerm, InvalidCommand) as e:
            self._refused(e)
            return
        if self.role is not Role.LEADER or won:
            self.log.info(
                "{resource}: {node_id} leads at term {term}",
                resource=self.resource,
                node_id=self.owner.node_id,
                term=term,
            )
        self.role = Role.LEADER
        self.term = term
        self._arm_deadline()
        self._settle()

    def _follow(self, holder: KeyValue) -> None:
        leader_id, address = _holder_info(holder)
        term = holder.create_revision
        try:
            self.owner.registry.update(
                self.resource, Role.FOLLOWER, term, leader_id=leader_id, leader_address=address
            )
        except (StaleTerm, InvalidCommand) as e:
            self._refused(e)
            return
        self.role = Role.FOLLOWER
        self.term = term
        self._arm_deadline()
        self._settle()

    def _refused(self, error: PiccolodError) -> None:
        """The registry refused what etcd says (its revisions went backwards?)."""
        self.refusals += 1
        self.log.error(
            "{resource}: the leadership registry refused etcd's view: {error}",
            resource=self.resource,
            error=error.detail,
        )
        self._set_unknown("refused by the registry")
        raise Unavailable(f"{self.resource}: {error.detail}")

    def _settle(self) -> None:
        waiters, self._waiters = self._waiters, []
        state = self.owner.registry.state(self.resource)
        for waiter in waiters:
            waiter.callback(state)

    def _step_down(self, reason: str) -> None:
        """Leave the leader role at once (to ``unknown``); nothing for a follower."""
        if self.role is not Role.LEADER:
            return
        self.log.warn(
            "{resource}: {node_id} steps down from term {term}: {reason}",
            resource=self.resource,
            node_id=self.owner.node_id,
            term=self.term,
            reason=reason,
        )
        self._set_unknown(reason)

    def _set_unknown(self, reason: str) -> None:
        self._cancel_deadline()
        if self.role is Role.UNKNOWN:
            return
        self.role = Role.UNKNOWN
        registry = self.owner.registry
        current = registry.state(self.resource)
        registry.update(self.resource, Role.UNKNOWN, current.term)


def _holder_info(holder: KeyValue) -> tuple[str | None, str | None]:
    try:
        data = json.loads(holder.value)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    node_id = data.get("node_id")
    address = data.get("api_address")
    return (
        node_id if isinstance(node_id, str) and node_id else None,
        address if isinstance(address, str) and address else None,
    )


def _holder_node(holder: KeyValue) -> str | None:
    return _holder_info(holder)[0]


def _answer_revision(answer: Mapping[str, Any]) -> int:
    header = answer.get("header")
    try:
        return int(header.get("revision", 0)) if isinstance(header, Mapping) else 0
    except (TypeError, ValueError):
        return 0


# --------------------------------------------------------------------------
# Prefix watches (for replication)


@attrs.define(eq=False)
class PrefixWatch:
    """
    A watch of every key under a data prefix that survives broken streams:
    it resumes from the revision after the last one delivered, with
    backoff, on any endpoint.  ``callback(events)`` receives events whose
    keys are relative to the data prefix, in revision order, each revision
    once.  :meth:`when_stopped` fires with ``None`` after :meth:`cancel`,
    or fails with :class:`WatchCanceled` when the history needed was
    compacted away (the consumer must resynchronise from a read).
    """

    log = Logger()

    owner: EtcdConsensus
    prefix: bytes
    callback: Callable[[Sequence[WatchEvent]], Any]
    next_revision: int
    _watch: Watch | None = attrs.field(init=False, default=None)
    _timer: IDelayedCall | None = attrs.field(init=False, default=None)
    _stopped: Outcome = attrs.field(init=False, factory=Outcome)
    _attempt: int = attrs.field(init=False, default=0)
    _active: bool = attrs.field(init=False, default=True)

    @property
    def active(self) -> bool:
        return self._active

    def when_stopped(self) -> Deferred[None]:
        """A new Deferred firing when the watch ends (see the class)."""
        return self._stopped.observe()

    def start(self) -> None:
        if not self._active:
            return
        full = self.owner.settings.data_prefix + self.prefix
        watch = self.owner.client.watch(
            full,
            self._events,
            range_end=prefix_end(full),
            start_revision=self.next_revision,
        )
        self._watch = watch
        watch.when_created().addCallbacks(self._created, lambda _: None)
        watch.when_done().addBoth(self._ended, watch)

    def cancel(self) -> None:
        self._finish(None)

    def _created(self, revision: int) -> None:
        self._attempt = 0

    def _events(self, events: Sequence[WatchEvent], revision: int) -> None:
        strip = len(self.owner.settings.data_prefix)
        fresh = [e for e in events if e.kv.mod_revision >= self.next_revision]
        if not fresh:
            return
        self.next_revision = max(e.kv.mod_revision for e in fresh) + 1
        relative = [attrs.evolve(e, kv=attrs.evolve(e.kv, key=e.kv.key[strip:])) for e in fresh]
        try:
            self.callback(relative)
        except Exception:
            self.log.failure("prefix watch callback failed")

    def _ended(self, result: object, watch: Watch) -> None:
        if self._watch is not watch or not self._active:
            return
        self._watch = None
        if isinstance(result, Failure) and result.check(EtcdError):
            self._finish(result)  # compacted (WatchCanceled) or refused: resynchronise
            return
        delay = self.owner.settings.backoff.delay(self._attempt, self.owner.rand)
        self._attempt += 1
        self._timer = self.owner.clock.callLater(delay, self.start)

    def _finish(self, result: Failure | None) -> None:
        if not self._active:
            return
        self._active = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.cancel()
        self.owner._prefix_watches.discard(self)
        self._stopped.fire(error=None if result is None else result.value)


# --------------------------------------------------------------------------
# The service


@implementer(IConsensus)
@attrs.define(eq=False)
class EtcdConsensus(Service):
    """
    ``IConsensus`` + ``IService`` on etcd: one :class:`ResourceElection`
    per tracked resource, the ``consensus`` health component, membership,
    and the ``consensus.*``/``cluster.*`` command handlers.

    @ivar registry: the leadership registry this variant writes.
    @ivar client: the etcd client (closed when the service stops).
    @ivar clock: drives keepalives, deadlines, backoff and health probes.
    @ivar rand: jitter source for backoff.
    """

    log = Logger()

    registry: ILeadershipRegistry = attrs.field(validator=provides(ILeadershipRegistry))
    client: EtcdClient
    clock: IReactorTime
    settings: EtcdSettings
    dispatcher: ICommandDispatcher | None = attrs.field(
        default=None, validator=attrs.validators.optional(provides(ICommandDispatcher))
    )
    health: IHealth | None = attrs.field(
        default=None, validator=attrs.validators.optional(provides(IHealth))
    )
    api_address: str | None = None
    #: Where ``CommitLogAdvanced`` goes and ``persistence.control_commit``
    #: comes from (``None``: no feed, no lag figures).
    bus: IEventBus | None = attrs.field(
        default=None, validator=attrs.validators.optional(provides(IEventBus)), kw_only=True
    )
    rand: Callable[[], float] = random.random
    health_interval: float = 2.0
    name: str = attrs.field(default="consensus", kw_only=True)
    _elections: dict[str, ResourceElection] = attrs.field(init=False, factory=dict)
    _prefix_watches: set[PrefixWatch] = attrs.field(init=False, factory=set)
    _probe: LoopingCall | None = attrs.field(init=False, default=None)
    _probing: bool = attrs.field(init=False, default=False)
    _endpoint_health: dict[str, tuple[bool | None, str | None]] = attrs.field(
        init=False, factory=dict
    )
    _members: list[dict[str, Any]] = attrs.field(init=False, factory=list)
    _member_lease: int | None = attrs.field(init=False, default=None)
    _registration: Registration | None = attrs.field(init=False, default=None)
    #: The commit log's head as seen, and this node's store revision.
    lag: ReplicationLag = attrs.field(init=False, factory=ReplicationLag)
    feed: CommitFeed = attrs.field(init=False)
    _commits: ISubscription | None = attrs.field(init=False, default=None)
    _lock_state: ISubscription | None = attrs.field(init=False, default=None)
    #: How long a leader whose storage locked keeps its leadership before it
    #: hands it on (unlocking, and setting up, pass through ``locked``).
    lock_grace: float = attrs.field(default=30.0, kw_only=True)
    #: When this node's storage locked (``None``: it is not locked).
    locked_since: float | None = attrs.field(init=False, default=None)
    #: Whether this node's storage is not set up yet (``uninitialized``).
    storage_blank: bool = attrs.field(init=False, default=False)
    _grace_timer: Any = attrs.field(init=False, default=None)

    @feed.default
    def _feed(self) -> CommitFeed:
        return CommitFeed(self, self.lag)

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)
        self.client.on_receive = self._check_deadlines
        for resource in (CONTROL_PLANE, *self.settings.resources):
            _check_resource(resource)
            if resource not in self._elections:
                self._elections[resource] = ResourceElection(self, resource)

    @classmethod
    def from_context(cls, ctx: SubsystemContext) -> EtcdConsensus:
        """Build from the ``[subsystems.consensus]`` section (see :class:`EtcdSettings`)."""
        settings = EtcdSettings.from_config(ctx.config)
        kernel = ctx.kernel
        if kernel.registry.node_id != kernel.node_id:
            raise ConfigError(
                [
                    f"{ctx.slot}: the leadership registry's node id "
                    f"{kernel.registry.node_id!r} is not the kernel's {kernel.node_id!r}"
                ]
            )
        client = EtcdClient.connect(ctx.reactor, settings.endpoints, settings.request_timeout)
        return cls(
            registry=kernel.registry,
            client=client,
            clock=ctx.reactor,
            settings=settings,
            dispatcher=kernel.dispatcher,
            health=kernel.health,
            api_address=kernel.api_address or None,
            health_interval=max(1.0, min(5.0, settings.ttl / 2)),
            bus=kernel.bus,
        )

    # -- IConsensus ---------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.registry.node_id

    @property
    def value(self) -> bytes:
        """What this node writes into a leader key it creates."""
        return json.dumps(
            {"node_id": self.node_id, "api_address": self.api_address}, sort_keys=True
        ).encode()

    def track(self, resource: str) -> Deferred[LeadershipState]:
        """
        Campaign for and observe ``resource`` from now on.  Fires with the
        state once the role is leader or follower; fails with
        ``Unavailable`` when the first campaign round cannot reach etcd
        (the election goes on), ``InvalidCommand`` for a bad name and
        ``NotReady`` while the service is not running.
        """
        try:
            _check_resource(resource)
        except InvalidCommand as e:
            return fail(e)
        if not self.running:
            return fail(NotReady(f"consensus is not running; cannot track {resource!r}"))
        election = self._elections.get(resource)
        if election is not None:
            return election.when_known()
        election = self._elections[resource] = ResourceElection(self, resource)
        known = election.when_known()  # before the first round, which may fail at once
        election.start()
        return known

    def release(self, resource: str) -> Deferred[None]:
        """
        Step down from ``resource`` (role ``UNKNOWN`` at once), stop tracking
        it and revoke its lease; idempotent.  Fails with ``InvalidCommand``
        for a bad name.
        """
        try:
            _check_resource(resource)
        except InvalidCommand as e:
            return fail(e)
        election = self._elections.pop(resource, None)
        if election is None:
            return succeed(None)
        return Deferred.fromCoroutine(election.stop(revoke=True))

    def tracked(self) -> Sequence[str]:
        """The tracked resources, in the order they were first tracked."""
        return list(self._elections)

    def election(self, resource: str) -> ResourceElection | None:
        """The election of ``resource`` (for status and tests)."""
        return self._elections.get(resource)

    # -- fenced writes and watches --------------------------------------------------

    def fenced_put(self, resource: str, key: str, value: bytes) -> Deferred[int]:
        """
        Write ``value`` at the data key ``key`` only while this node leads
        ``resource``: the transaction compares the leader key's create
        revision with this node's term, so etcd refuses the write once
        another node holds the key.  Fires with the store revision of the
        write.  Fails with ``NotLeader`` (leader hint when known) when this
        node does not lead, its renew deadline passed, or the fence failed;
        ``Unavailable`` when etcd cannot be reached.
        """
        return Deferred.fromCoroutine(self._fenced_put(resource, key, value))

    async def _fenced_put(self, resource: str, key: str, value: bytes) -> int:
        election = self._elections.get(resource)
        if election is None or not self.running or not election.leading():
            raise self._not_leader(resource)
        term = election.term
        revision = await self.client.put_if_created_at(
            election.key, term, self.settings.data_key(key), value
        )
        if revision is None:
            self.log.warn(
                "{resource}: fenced write refused by etcd: term {term} no longer holds",
                resource=resource,
                term=term,
            )
            election._step_down("fenced write refused")
            election._poke("fence lost")
            raise self._not_leader(resource)
        return revision

    def _not_leader(self, resource: str) -> NotLeader:
        state = self.registry.state(resource)
        other = state.leader_id is not None and state.leader_id != self.node_id
        return NotLeader(
            resource,
            leader_hint=state.leader_address if other else None,
            leader_id=state.leader_id if other else None,
        )

    def get(self, key: str) -> Deferred[KeyValue | None]:
        """The data key ``key`` (linearizable read; the key comes back in full)."""
        return self.client.get(self.settings.data_key(key))

    def watch_prefix(
        self,
        prefix: str,
        from_revision: int,
        callback: Callable[[Sequence[WatchEvent]], Any],
    ) -> PrefixWatch:
        """
        Deliver every change under the data prefix ``prefix`` from
        ``from_revision`` on (see :class:`PrefixWatch`), resuming across
        broken streams; cancelled when the service stops.
        """
        if not self.running:
            raise NotReady("consensus is not running")
        watch = PrefixWatch(self, prefix.encode(), callback, max(1, from_revision))
        self._prefix_watches.add(watch)
        watch.start()
        return watch

    # -- the commit log -------------------------------------------------------------

    def replicate_commit(self, entry: SealedCommit) -> Deferred[CommitReplicated]:
        """
        Append ``entry`` to the commit log in one transaction fenced by this
        node's ``control-plane`` term (see :mod:`.etcd_log`).  Fires with
        ``CommitReplicated`` once etcd has it.  Fails with ``NotLeader``
        (leader hint when known) when this node does not lead, its renew
        deadline passed or the fence failed; ``CommitConflict`` (with the
        log's head) when the entry does not follow the head; ``Unavailable``
        when etcd cannot be reached; ``CorruptCommitLog`` for a malformed head.
        """
        return Deferred.fromCoroutine(self._replicate(entry))

    async def _replicate(self, entry: SealedCommit) -> CommitReplicated:
        election = self._elections.get(CONTROL_PLANE)
        if election is None or not self.running or not election.leading():
            raise self._not_leader(CONTROL_PLANE)
        term = election.term
        data_key = self.settings.data_key
        head_key = data_key(HEAD)
        value = encode_entry(entry, term)
        fence = compare(election.key, "CREATE", "EQUAL", term)
        revision = entry.revision
        if entry.kind == "commit":
            entry_key = data_key(commit_key(revision))
            compares = [fence, compare(head_key, "VALUE", "EQUAL", str(revision - 1).encode())]
            success = [op_put(entry_key, value), op_put(head_key, str(revision).encode())]
        else:
            entry_key = data_key(SNAPSHOT)
            compares = [fence, await self._snapshot_guard(entry)]
            success = [
                op_put(entry_key, value),
                op_put(head_key, str(revision).encode()),
                # Every commit the snapshot covers: the log stays bounded.
                op_delete(data_key(COMMITS), data_key(commit_key(revision + 1))),
            ]
            if not election.leading() or election.term != term:
                raise self._not_leader(CONTROL_PLANE)
        failure = [op_range(election.key), op_range(head_key), op_range(entry_key)]
        self.feed.appended(revision)
        answer = await self.client.txn(compares, success, failure)
        ranges = txn_ranges(answer)
        log_revision = _answer_revision(answer)
        if answer.get("succeeded"):
            return CommitReplicated(revision=revision, log_revision=log_revision, term=term)
        if len(ranges) != 3:
            raise EtcdError("a refused append answered without its reads")
        holder, head, mine = ranges
        if mine.kvs and mine.kvs[0].value == value:
            # This very entry is there (a retried request that had landed):
            # the nonce in ``sealed`` makes every entry's value unique.
            return CommitReplicated(
                revision=revision, log_revision=mine.kvs[0].mod_revision, term=term
            )
        if not holder.kvs or holder.kvs[0].create_revision != term:
            self.log.warn(
                "control-plane: commit {revision} refused by etcd: term {term} no longer holds",
                revision=revision,
                term=term,
            )
            if election is self._elections.get(CONTROL_PLANE):
                election._step_down("fenced append refused")
                election._poke("fence lost")
            raise self._not_leader(CONTROL_PLANE)
        found = parse_head(head.kvs[0] if head.kvs else None, HEAD)
        if entry.kind == "commit":
            detail = (
                f"commit {revision} does not follow the log's head {found}"
                if found is not None
                else f"commit {revision} cannot start an empty log: append a snapshot first"
            )
        else:
            detail = f"snapshot {revision} is not ahead of the log's head {found}"
        raise CommitConflict(detail, head=found)

    async def _snapshot_guard(self, entry: SealedCommit) -> dict[str, Any]:
        """
        The compare that admits a snapshot of revision ``R``: the head as
        read now is unchanged (compare its mod revision; 0 when absent),
        and it is absent, below ``R``, or at ``R`` with the checksum of
        ``R``'s entry (a compaction of the log at its head).  Raises
        ``CommitConflict`` otherwise.
        """
        data_key = self.settings.data_key
        head_key = data_key(HEAD)
        read = await self.client.txn(
            [], [op_range(head_key), op_range(data_key(commit_key(entry.revision)))]
        )
        head_range, at_range = txn_ranges(read)
        head_kv = head_range.kvs[0] if head_range.kvs else None
        head = parse_head(head_kv, HEAD)
        if head is not None and head >= entry.revision:
            same = False
            if head == entry.revision:
                if at_range.kvs:
                    at = decode_entry(
                        at_range.kvs[0].value,
                        commit_key(head),
                        "commit",
                        head,
                    )
                    same = at.checksum == entry.checksum
                else:
                    snapshot = await self.client.get(data_key(SNAPSHOT))
                    if snapshot is not None:
                        at = decode_entry(snapshot.value, SNAPSHOT, "snapshot")
                        same = at.revision == head and at.checksum == entry.checksum
            if not same:
                raise CommitConflict(
                    f"snapshot {entry.revision} is not ahead of the log's head {head}", head=head
                )
        return compare(head_key, "MOD", "EQUAL", head_kv.mod_revision if head_kv else 0)

    def read_commits(self, after: int, limit: int = 1000) -> Deferred[CommitLog]:
        """
        The commit log after store revision ``after`` (see ``CommitLog``),
        from one linearizable read: the commits from ``after + 1`` (at most
        ``limit``), preceded by the snapshot when the first commit needed
        was compacted away.  Fails with ``Unavailable`` when etcd cannot be
        reached and ``CorruptCommitLog`` for a malformed entry or head.
        """
        return Deferred.fromCoroutine(self._read_commits(after, limit))

    async def _read_commits(self, after: int, limit: int) -> CommitLog:
        if after < 0 or limit < 1:
            raise InvalidCommand("after must be >= 0 and limit >= 1")
        data_key = self.settings.data_key
        commits = data_key(COMMITS)
        answer = await self.client.txn(
            [],
            [
                op_range(data_key(commit_key(after + 1)), prefix_end(commits), limit),
                op_range(data_key(HEAD)),
                op_range(data_key(SNAPSHOT)),
            ],
        )
        ranges = txn_ranges(answer)
        if len(ranges) != 3:
            raise EtcdError("a read of the commit log answered without its ranges")
        found, head, snapshot = ranges
        log = commit_log(after, limit, found, head, snapshot, commits_prefix=commits)
        if log.head is not None:
            # A read is as good as the watch for the lag figures.
            self._log_seen(log.head, head.kvs[0].mod_revision)
        return log

    def _log_seen(self, head: int, log_revision: int) -> None:
        if self.lag.head is None or head > self.lag.head:
            self.lag.head, self.lag.log_revision = head, log_revision
            self.lag.update(self.clock.seconds())

    def _store_committed(self, envelope: Any) -> None:
        event = envelope.event
        if isinstance(event, ControlStoreCommit):
            self.lag.applied = event.revision
            self.lag.update(self.clock.seconds())
            self.feed.committed(event.revision)

    async def _store_revision(self) -> None:
        """Refresh ``lag.applied`` from ``persistence.status`` (when there is one)."""
        dispatcher = self.dispatcher
        if dispatcher is None or GetStorageStatus.name not in dispatcher.names():
            return
        try:
            status = await dispatcher.dispatch(
                GetStorageStatus(),
                CommandContext(subject="system:consensus", timeout=2.0),
            )
        except PiccolodError as e:
            self.log.debug("persistence.status for the lag: {error}", error=e.detail)
            return
        store = getattr(status, "store", None)
        revision = store.get("revision") if isinstance(store, Mapping) else None
        if isinstance(revision, int) and not isinstance(revision, bool):
            self.lag.applied = revision
        else:
            self.lag.applied = None  # locked: nothing applied here now
        self.lag.update(self.clock.seconds())

    # -- status -------------------------------------------------------------------

    def status(self) -> Deferred[ClusterStatus]:
        """This node's view of the cluster (see ``ClusterStatus``)."""
        return Deferred.fromCoroutine(self._status())

    async def _status(self) -> ClusterStatus:
        members_error: str | None = None
        try:
            found = await self.client.range(
                self.settings.members_prefix,
                prefix_end(self.settings.members_prefix),
                serializable=True,
            )
        except PiccolodError as e:
            members_error = e.detail
        else:
            members = []
            for kv in found.kvs:
                node_id, address = _holder_info(kv)
                if node_id is not None:
                    members.append({"node_id": node_id, "api_address": address})
            self._members = members
        members_out = [
            {**m, "self": m["node_id"] == self.node_id}
            for m in sorted(self._members, key=lambda m: m["node_id"])
        ]
        if not any(m["self"] for m in members_out):
            members_out.append(
                {"node_id": self.node_id, "api_address": self.api_address, "self": True}
            )
        resources = [self._elections[r].to_json() for r in sorted(self._elections)]
        for member in members_out:
            # Roles as this node sees them: every member campaigns for
            # control-plane; of other resources only their leaders are known.
            roles: dict[str, str] = {}
            terms: dict[str, int] = {}
            for state in resources:
                name = state["resource"]
                if state["leader_id"] == member["node_id"]:
                    roles[name], terms[name] = "leader", state["term"]
                elif name == CONTROL_PLANE and state["leader_id"] is not None:
                    roles[name], terms[name] = "follower", state["term"]
            member["roles"] = roles
            member["terms"] = terms
        await self._store_revision()
        backend: dict[str, Any] = {
            "prefix": self.settings.prefix,
            "ttl": self.settings.ttl,
            "renew_deadline": self.settings.renew_deadline,
            "retry_period": self.settings.retry_period,
            "current_endpoint": self.client.current,
            "endpoints": [
                {
                    **state.to_json(),
                    "reports_healthy": self._endpoint_health.get(state.url, (None, None))[0],
                }
                for state in self.client.endpoint_states()
            ],
        }
        if members_error is not None:
            backend["members_error"] = members_error
        blocker = self.campaign_blocker()
        backend["campaigns"] = {"eligible": blocker is None, "reason": blocker}
        backend["replication"] = {
            **self.lag.to_json(self.clock.seconds()),
            "feed": self.feed.to_json(),
        }
        return ClusterStatus(
            node_id=self.node_id,
            variant="etcd",
            members=tuple(members_out),
            resources=tuple(resources),
            backend=backend,
        )

    def _check_deadlines(self) -> None:
        """
        Apply overdue renew deadlines now.  Called before any answer from
        etcd is handled: after a pause (SIGSTOP, a long stall) the reactor
        may handle I/O before it runs the overdue deadline timers, and
        nothing may act on a leadership whose deadline has passed.
        """
        now = self.clock.seconds()
        for election in list(self._elections.values()):
            if election.role is not Role.UNKNOWN and now >= election._deadline_at():
                election._deadline_passed(poke_later=True)

    # -- membership ---------------------------------------------------------------

    def _new_lease(self, election: ResourceElection, lease_id: int) -> None:
        if election.resource != CONTROL_PLANE:
            return
        self._member_lease = lease_id
        member = json.dumps(
            {"node_id": self.node_id, "api_address": self.api_address}, sort_keys=True
        ).encode()
        d = self.client.put(self.settings.member_key(self.node_id), member, lease=lease_id)

        def failed(failure: Failure) -> None:
            failure.trap(PiccolodError)
            self.log.warn(
                "could not register {node_id} as a member: {error}",
                node_id=self.node_id,
                error=failure.getErrorMessage(),
            )

        d.addCallbacks(lambda _: None, failed)

    # -- health -------------------------------------------------------------------

    def _probe_endpoints(self) -> Deferred[None] | None:
        if self._probing:
            return None
        self._probing = True
        urls = list(self.client.endpoints)
        probes = [self.client.health(url) for url in urls]
        d = DeferredList(probes, consumeErrors=True)

        def judged(results: list[tuple[bool, Any]]) -> None:
            self._probing = False
            for url, (ok, value) in zip(urls, results, strict=True):
                if ok:
                    self._endpoint_health[url] = (
                        bool(value),
                        None if value else "member reports no healthy cluster",
                    )
                else:
                    error = value.value
                    detail = error.detail if isinstance(error, PiccolodError) else str(error)
                    self._endpoint_health[url] = (False, detail)
            self._report_health()

        return d.addCallback(judged)

    def _report_health(self) -> None:
        if self.health is None or not self.running:
            return
        urls = list(self.client.endpoints)
        healthy = [u for u in urls if self._endpoint_health.get(u, (None, None))[0]]
        problems = [
            f"{u}: {self._endpoint_health[u][1]}"
            for u in urls
            if u in self._endpoint_health and not self._endpoint_health[u][0]
        ]
        figures = {"endpoints": float(len(urls)), "healthy_endpoints": float(len(healthy))}
        if not healthy:
            level = HealthLevel.ERROR
            message = "no etcd endpoint reports a healthy cluster (no quorum reachable)"
            if problems:
                message += ": " + "; ".join(problems)
        elif problems:
            level = HealthLevel.WARN
            message = f"{len(healthy)}/{len(urls)} etcd endpoints healthy; " + "; ".join(problems)
        else:
            level = HealthLevel.OK
            message = f"{len(healthy)}/{len(urls)} etcd endpoints healthy"
        self.health.report(COMPONENT, level, message, figures)

    # -- IService -----------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        if self.dispatcher is not None:
            handlers: list[tuple[type[Any], Callable[..., Any]]] = [
                (TrackResource, self._handle_track),
                (ReleaseResource, self._handle_release),
                (GetClusterStatus, self._handle_status),
                (FencedPut, self._handle_fenced_put),
                (ReadClusterKey, self._handle_get),
                (ReplicateCommit, self._handle_replicate),
                (ReadCommits, self._handle_read_commits),
            ]
            self._registration = register_all(self.dispatcher, handlers)
        Service.startService(self)
        if self.bus is not None:
            self._commits = self.bus.subscribe(
                ControlStoreCommit.topic, self._store_committed, name="consensus.lag"
            )
            current = self.bus.last(LockStateChanged.topic)  # before the first round
            if current is not None:
                self._lock_state_changed(current)
            self._lock_state = self.bus.subscribe(
                LockStateChanged.topic, self._lock_state_changed, name="consensus.lock_state"
            )
        self.feed.start()
        if self.health is not None:
            self.health.report(COMPONENT, HealthLevel.WARN, "connecting to etcd")
        self._probe = LoopingCall(self._probe_endpoints)
        self._probe.clock = self.clock
        self._probe.start(self.health_interval, now=True).addErrback(
            lambda f: self.log.failure("etcd health probe", f)
        )
        for election in self._elections.values():
            election.start()
        self.log.info(
            "etcd consensus: {node_id} campaigns for {resources} on {endpoints}",
            node_id=self.node_id,
            resources=list(self._elections),
            endpoints=list(self.settings.endpoints),
        )

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._unregister()
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self._probe = None
        self.feed.stop()
        if self._commits is not None:
            commits, self._commits = self._commits, None
            commits.cancel()
        if self._lock_state is not None:
            lock_state, self._lock_state = self._lock_state, None
            lock_state.cancel()
        timer, self._grace_timer = self._grace_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        for watch in list(self._prefix_watches):
            watch.cancel()
        stops = [
            Deferred.fromCoroutine(election.stop(revoke=True))
            for election in self._elections.values()
        ]
        await DeferredList(stops, consumeErrors=True)
        # The elections stay tracked: the next start campaigns for them again.
        await self.client.close()
        if self.health is not None:
            self.health.remove(COMPONENT)
        self.log.info("etcd consensus: {node_id} stepped down", node_id=self.node_id)

    def campaign_blocker(self) -> str | None:
        """
        Why this node does not campaign for leadership now (``None``: it
        does).  Not while its storage is locked (or unlocking): a leader that
        cannot open its control store could take no write and run no
        stateful app, so a locked node follows and leaves leadership to an
        unlocked one.  An uninitialised node campaigns only once it has read
        the cluster's commit log and found it empty: a new cluster is set up
        on its first leader, but a blank node added to a cluster that is set
        up already must join it (``persistence.join``) before it may lead.
        """
        if self.locked_since is not None:
            return "this node's storage is locked"
        if self.storage_blank:
            if not self.feed.known:
                return "this node's storage is not set up; reading the cluster's commit log"
            if self.lag.head is not None:
                return "this node's storage is not set up and the cluster's is: join the cluster"
        return None

    def may_campaign(self) -> bool:
        """Whether this node campaigns for leadership (see :meth:`campaign_blocker`)."""
        return self.campaign_blocker() is None

    def log_known(self) -> None:
        """The commit feed learnt the log's head (or that it is empty)."""
        if self.storage_blank:
            self._eligibility_changed()

    def may_keep(self) -> bool:
        """
        Whether a leader keeps its leadership: while its storage is not
        locked, or has been locked for less than ``lock_grace`` seconds
        (setup and unlock pass through ``locked``; an operator's lock hands
        leadership on once the grace has passed).
        """
        since = self.locked_since
        return since is None or self.clock.seconds() - since < self.lock_grace

    def _lock_state_changed(self, envelope: Any) -> None:
        event = envelope.event
        if not isinstance(event, LockStateChanged):
            return
        blank = event.state is LockState.UNINITIALIZED
        if blank != self.storage_blank:
            self.storage_blank = blank
            self._eligibility_changed()
        locked = event.state in (LockState.LOCKED, LockState.PREUNLOCK)
        if locked == (self.locked_since is not None):
            return
        timer, self._grace_timer = self._grace_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if locked:
            self.locked_since = self.clock.seconds()
            self._grace_timer = self.clock.callLater(self.lock_grace, self._grace_over)
        else:
            self.locked_since = None
        self.log.info(
            "etcd consensus: storage {state}: this node {does} campaign",
            state=event.state.value,
            does="does not" if locked else "may",
        )
        self._eligibility_changed()

    def _grace_over(self) -> None:
        self._grace_timer = None
        self._eligibility_changed()

    def _eligibility_changed(self) -> None:
        for election in self._elections.values():
            election.eligibility_changed()

    def _unregister(self) -> None:
        if self._registration is not None:
            self._registration.cancel()
            self._registration = None

    # -- command handlers -----------------------------------------------------------

    def _handle_track(self, command: TrackResource, context: CommandContext) -> Deferred[Any]:
        return self.track(command.resource_name).addCallback(_result)

    def _handle_release(self, command: ReleaseResource, context: CommandContext) -> Deferred[Any]:
        resource = command.resource_name
        return self.release(resource).addCallback(lambda _: _result(self.registry.state(resource)))

    def _handle_status(self, command: GetClusterStatus, context: CommandContext) -> Deferred[Any]:
        return self.status()

    def _handle_fenced_put(self, command: FencedPut, context: CommandContext) -> Deferred[Any]:
        resource = command.resource_name
        d = self.fenced_put(resource, command.key, command.value.encode())

        def done(revision: int) -> FencedPutDone:
            election = self._elections.get(resource)
            return FencedPutDone(
                key=command.key, revision=revision, term=election.term if election else 0
            )

        return d.addCallback(done)

    def _handle_replicate(self, command: ReplicateCommit, context: CommandContext) -> Deferred[Any]:
        return self.replicate_commit(command.entry)

    def _handle_read_commits(self, command: ReadCommits, context: CommandContext) -> Deferred[Any]:
        return self.read_commits(command.after, command.limit)

    def _handle_get(self, command: ReadClusterKey, context: CommandContext) -> Deferred[Any]:
        d = self.client.range(self.settings.data_key(command.key))

        def found(result: Any) -> ClusterValue:
            if not result.kvs:
                return ClusterValue(key=command.key, revision=result.revision)
            kv = result.kvs[0]
            return ClusterValue(
                key=command.key,
                value=kv.value.decode("utf-8", "replace"),
                create_revision=kv.create_revision,
                mod_revision=kv.mod_revision,
                revision=result.revision,
            )

        return d.addCallback(found)


def _result(state: LeadershipState) -> LeadershipResult:
    return LeadershipResult(
        resource=state.resource,
        role=state.role.value,
        term=state.term,
        leader_id=state.leader_id,
    )


def _check_resource(resource: object) -> None:
    if not isinstance(resource, str) or not resource.strip():
        raise InvalidCommand(f"resource must be a non-empty string, got {resource!r}")
    if "/" in resource or any(c.isspace() for c in resource):
        raise InvalidCommand(f"resource must not contain '/' or whitespace, got {resource!r}")
