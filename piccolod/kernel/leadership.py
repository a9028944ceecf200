"""
The leadership registry: this node's view of who leads each resource.

Resources are named strings (``control-plane``, ``app:<name>``).  Only the
consensus subsystem writes the registry (:meth:`LeadershipRegistry.update`);
everything else reads it, waits on it (:meth:`~LeadershipRegistry.when_leader`)
or gates on it (:meth:`~LeadershipRegistry.require_leader`), and every real
change is published as a retained ``cluster.leadership`` event
(:class:`~piccolod.events.LeadershipRoleChanged`), so a late subscriber
learns the current role of every resource first.

Fencing rules, per resource:

- The term (fencing token) never decreases: an update whose term is below
  the current term raises :class:`~piccolod.errors.StaleTerm`.
- A term has at most one leader.  Any update that names a leader (role
  ``LEADER``, whose leader is this node; or ``FOLLOWER``/``UNKNOWN`` with a
  ``leader_id``) must carry a term strictly greater than the term of any
  earlier leadership by a *different* leader; re-asserting the same term by
  the same leader is allowed.  A violation raises ``StaleTerm``.
- A ``LEADER`` role must have a term of at least 1 (term 0 means "never
  led") and cannot name another node as leader; a ``FOLLOWER`` cannot name
  this node.  Those contradictions raise
  :class:`~piccolod.errors.InvalidCommand`.

An update replaces the whole state of the resource (role, leader id,
leader address, term); nothing is published when the new state equals the
old one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from piccolod.errors import InvalidCommand, NotLeader, StaleTerm
from piccolod.events import LeadershipRoleChanged, Role
from piccolod.interfaces import IEventBus, ILeadershipRegistry, LeadershipState
from piccolod.kernel.aio import provides

__all__ = ["LeadershipRegistry"]

#: ``Role.LEADER`` once: an enum member lookup costs ~0.15 us, the leader gate runs per command.
_LEADER = Role.LEADER


def _node_id(_inst: object, _attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("node_id must be a non-empty string")


@implementer(ILeadershipRegistry)
@attrs.define(eq=False)
class LeadershipRegistry:
    """
    In-memory ``ILeadershipRegistry`` publishing on an optional bus.

    @ivar bus: where ``LeadershipRoleChanged`` events go (``None``: nowhere).
    @ivar node_id: this node's id; the leader id of every ``LEADER`` role.
    """

    log = Logger()

    bus: IEventBus | None = attrs.field(validator=attrs.validators.optional(provides(IEventBus)))
    node_id: str = attrs.field(validator=_node_id)
    _states: dict[str, LeadershipState] = attrs.field(init=False, factory=dict)
    #: The latest (term, leader id) that led each resource, for fencing.
    _leaderships: dict[str, tuple[int, str]] = attrs.field(init=False, factory=dict)
    _waiters: dict[str, list[Deferred[LeadershipState]]] = attrs.field(init=False, factory=dict)

    # -- queries ------------------------------------------------------------

    def role(self, resource: str) -> Role:
        return self.state(resource).role

    def state(self, resource: str) -> LeadershipState:
        found = self._states.get(resource)
        return found if found is not None else LeadershipState(resource=resource)

    def states(self) -> Sequence[LeadershipState]:
        return [self._states[name] for name in sorted(self._states)]

    def is_leader(self, resource: str) -> bool:
        found = self._states.get(resource)  # the dispatcher's leader gate: keep it direct
        return found is not None and found.role is _LEADER

    def require_leader(self, resource: str) -> LeadershipState:
        """
        Return the state when this node leads ``resource``; otherwise raise
        ``NotLeader`` whose hint is the known leader's address (never this
        node's own address).
        """
        current = self.state(resource)
        if current.role is Role.LEADER:
            return current
        other = current.leader_id is not None and current.leader_id != self.node_id
        raise NotLeader(
            resource,
            leader_hint=current.leader_address if other else None,
            leader_id=current.leader_id if other else None,
        )

    # -- waiting ------------------------------------------------------------

    def when_leader(self, resource: str) -> Deferred[LeadershipState]:
        """
        Fire with the state once this node leads ``resource``: at once if it
        already does, otherwise when an update makes it leader (waiters fire
        in the order they asked).  Cancelling fails the Deferred with
        ``CancelledError`` and forgets the waiter.
        """
        _check_resource(resource)
        if self.is_leader(resource):
            done: Deferred[LeadershipState] = Deferred()
            done.callback(self.state(resource))
            return done
        waiters = self._waiters.setdefault(resource, [])

        def forget(d: Deferred[LeadershipState]) -> None:
            pending = self._waiters.get(resource)
            if pending is not None and d in pending:
                pending.remove(d)
                if not pending:
                    del self._waiters[resource]

        waiter: Deferred[LeadershipState] = Deferred(forget)
        waiters.append(waiter)
        return waiter

    def waiting(self, resource: str) -> int:
        """How many ``when_leader`` waiters ``resource`` has (for stats)."""
        return len(self._waiters.get(resource, ()))

    # -- writing ------------------------------------------------------------

    def update(
        self,
        resource: str,
        role: Role,
        term: int,
        leader_id: str | None = None,
        leader_address: str | None = None,
    ) -> LeadershipState:
        """
        Replace the state of ``resource``.  A ``LEADER`` role's leader id
        defaults to (and must be) :attr:`node_id`.  Publishes one retained
        ``LeadershipRoleChanged`` when the state changed, nothing otherwise,
        and then fires ``when_leader`` waiters if this node now leads.

        @raise StaleTerm: ``term`` is below the current term, or another
            leader already held this term.
        @raise InvalidCommand: malformed arguments or a contradiction (a
            ``LEADER`` naming another node, a ``FOLLOWER`` naming this one,
            a ``LEADER`` at term 0).
        """
        _check_resource(resource)
        if not isinstance(role, Role):
            raise InvalidCommand(f"role must be a Role, got {role!r}")
        if isinstance(term, bool) or not isinstance(term, int) or term < 0:
            raise InvalidCommand(f"term must be a non-negative integer, got {term!r}")
        if role is Role.LEADER:
            if leader_id is None:
                leader_id = self.node_id
            elif leader_id != self.node_id:
                raise InvalidCommand(
                    f"{resource}: role leader names another node ({leader_id!r}) as leader"
                )
            if term < 1:
                raise InvalidCommand(f"{resource}: a leader needs a term of at least 1")
        elif role is Role.FOLLOWER and leader_id == self.node_id:
            raise InvalidCommand(f"{resource}: a follower cannot name itself as leader")

        previous = self.state(resource)
        if term < previous.term:
            self._refuse(
                resource,
                role,
                term,
                leader_id=leader_id,
                current_term=previous.term,
                reason="term below current",
            )
        last = self._leaderships.get(resource)
        if leader_id is not None and last is not None and last[0] == term and last[1] != leader_id:
            self._refuse(
                resource,
                role,
                term,
                leader_id=leader_id,
                current_term=previous.term,
                reason=f"term led by {last[1]}",
            )

        new = LeadershipState(
            resource=resource,
            role=role,
            leader_id=leader_id,
            leader_address=leader_address,
            term=term,
        )
        if leader_id is not None:
            self._leaderships[resource] = (term, leader_id)
        self._states[resource] = new
        if new == previous:
            # Nothing changed (a first write may equal the implicit default:
            # the resource is now listed, but nothing is published).
            return previous
        # Accepted changes are logged by the LeadershipObserver (from the
        # event); only refusals are logged here.
        if self.bus is not None:
            self.bus.publish(
                LeadershipRoleChanged(
                    resource=resource,
                    role=role,
                    previous=previous.role,
                    leader_id=leader_id,
                    leader_address=leader_address,
                    term=term,
                ),
                source="leadership",
            )
        if role is Role.LEADER:
            self._wake(resource)
        return new

    def _refuse(
        self,
        resource: str,
        role: Role,
        term: int,
        *,
        leader_id: str | None,
        current_term: int,
        reason: str,
    ) -> NoReturn:
        self.log.warn(
            "refused stale leadership update of {resource}: {role} at term {term} "
            "(leader {leader_id}, current term {current_term}): {reason}",
            resource=resource,
            role=role.value,
            term=term,
            leader_id=leader_id,
            current_term=current_term,
            reason=reason,
        )
        raise StaleTerm(
            f"{resource}: {reason} (term {term}, current term {current_term}, "
            f"leader {leader_id!r})",
            resource=resource,
            term=term,
            current_term=current_term,
        )

    def _wake(self, resource: str) -> None:
        # One waiter at a time: a waiter's callback may step down again, in
        # which case the rest keep waiting.
        waiters = self._waiters.get(resource)
        while waiters and self.is_leader(resource):
            waiter = waiters.pop(0)
            if not waiters:
                self._waiters.pop(resource, None)
            waiter.callback(self.state(resource))
            waiters = self._waiters.get(resource)


def _check_resource(resource: object) -> None:
    if not isinstance(resource, str) or not resource.strip():
        raise InvalidCommand(f"resource must be a non-empty string, got {resource!r}")
