"""
Single-node consensus: this node leads everything it is asked about.

The ``consensus=single-node`` variant for a one-box install.  It is the only
writer of the leadership registry, like every consensus variant, and keeps
the registry's fencing rules: each claim takes the next term above the
resource's current one, so terms keep growing across restarts of the
service and every claim is a fresh, fenced leadership.

- **start** claims ``control-plane`` and the configured ``resources`` (and
  anything tracked before a restart), with ``leader_address`` set to the
  kernel's API address, and registers the ``consensus.track`` and
  ``consensus.release`` command handlers.
- **track(resource)** makes this node leader of ``resource`` at once.
- **release(resource)** steps down to ``UNKNOWN`` (not ``FOLLOWER``: on a
  single node there is no other leader to follow, and ``UNKNOWN`` is never
  treated as leader) and stops tracking it.
- **cluster.status** answers this node as the only member, with the
  registry's state of every resource.
- **stop** unregisters the handlers and steps down from everything it
  leads (roles become ``UNKNOWN``); the tracked set is kept, so the next
  start claims the same resources again with greater terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from piccolod.commands import (
    ClusterStatus,
    CommandContext,
    GetClusterStatus,
    LeadershipResult,
    ReleaseResource,
    TrackResource,
)
from piccolod.errors import ConfigError, InvalidCommand, NotReady
from piccolod.events import Role
from piccolod.interfaces import (
    ICommandDispatcher,
    IConsensus,
    ILeadershipRegistry,
    LeadershipState,
)
from piccolod.kernel.aio import provides
from piccolod.kernel.plugins import SubsystemContext

__all__ = ["CONTROL_PLANE", "SingleNodeConsensus"]

#: The resource every node's kernel campaigns for.
CONTROL_PLANE = "control-plane"


def _result(state: LeadershipState) -> LeadershipResult:
    return LeadershipResult(
        resource=state.resource,
        role=state.role.value,
        term=state.term,
        leader_id=state.leader_id,
    )


@implementer(IConsensus)
@attrs.define(eq=False)
class SingleNodeConsensus(Service):
    """
    ``IConsensus`` + ``IService`` for one node: leader of every tracked
    resource while running.

    @ivar registry: the leadership registry this variant writes.
    @ivar dispatcher: where the ``consensus.*`` handlers are registered
        while running (``None``: no command handlers).
    @ivar api_address: this node's API address, published as leader hint.
    @ivar resources: resources claimed at start besides ``control-plane``.
    """

    log = Logger()

    registry: ILeadershipRegistry = attrs.field(validator=provides(ILeadershipRegistry))
    dispatcher: ICommandDispatcher | None = attrs.field(
        default=None, validator=attrs.validators.optional(provides(ICommandDispatcher))
    )
    api_address: str | None = None
    resources: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    name: str = attrs.field(default="consensus", kw_only=True)
    #: Tracked resources in the order they were first asked for.
    _tracked: dict[str, None] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        for resource in (CONTROL_PLANE, *self.resources):
            _check_resource(resource)
            self._tracked[resource] = None

    @classmethod
    def from_context(cls, ctx: SubsystemContext) -> SingleNodeConsensus:
        """
        Build from the ``[subsystems.consensus]`` section: ``resources`` is
        a list of extra resource names to lead from the start.

        @raise ConfigError: ``resources`` is not a list of non-empty strings.
        """
        resources: Any = ctx.config.get("resources", [])
        if not isinstance(resources, (list, tuple)) or not all(
            isinstance(r, str) and r.strip() for r in resources
        ):
            raise ConfigError(
                [f"[subsystems.{ctx.slot}] resources must be a list of non-empty strings"]
            )
        kernel = ctx.kernel
        if kernel.registry.node_id != kernel.node_id:
            raise ConfigError(
                [
                    f"{ctx.slot}: the leadership registry's node id "
                    f"{kernel.registry.node_id!r} is not the kernel's {kernel.node_id!r}"
                ]
            )
        return cls(
            registry=kernel.registry,
            dispatcher=kernel.dispatcher,
            api_address=kernel.api_address,
            resources=tuple(resources),
        )

    # -- IConsensus -----------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.registry.node_id

    def track(self, resource: str) -> Deferred[LeadershipState]:
        """
        Lead ``resource`` from now on.  Fires with the (leader) state at
        once; idempotent (a resource already led keeps its term).  Fails
        with ``InvalidCommand`` for a bad name and ``NotReady`` while the
        service is not running.
        """
        try:
            _check_resource(resource)
        except InvalidCommand as e:
            return fail(e)
        if not self.running:
            return fail(NotReady(f"consensus is not running; cannot track {resource!r}"))
        self._tracked[resource] = None
        try:
            return succeed(self._claim(resource))
        except Exception as e:
            return fail(e)

    def release(self, resource: str) -> Deferred[None]:
        """
        Step down from ``resource`` (role ``UNKNOWN``) and stop tracking it;
        idempotent.  Fails with ``InvalidCommand`` for a bad name.
        """
        try:
            _check_resource(resource)
        except InvalidCommand as e:
            return fail(e)
        self._tracked.pop(resource, None)
        try:
            self._step_down(resource)
        except Exception as e:
            return fail(e)
        return succeed(None)

    def tracked(self) -> Sequence[str]:
        """The tracked resources, in the order they were first tracked."""
        return list(self._tracked)

    # -- IService -------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        if self.dispatcher is not None:
            self.dispatcher.register(TrackResource, self._handle_track)
            try:
                self.dispatcher.register(ReleaseResource, self._handle_release)
                try:
                    self.dispatcher.register(GetClusterStatus, self._handle_status)
                except Exception:
                    self.dispatcher.unregister(ReleaseResource)
                    raise
            except Exception:
                self.dispatcher.unregister(TrackResource)
                raise
        self.running = True
        for resource in self._tracked:
            self._claim(resource)
        self.log.info(
            "single-node consensus: {node_id} leads {resources}",
            node_id=self.node_id,
            resources=list(self._tracked),
        )

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        self.running = False
        if self.dispatcher is not None:
            self.dispatcher.unregister(TrackResource)
            self.dispatcher.unregister(ReleaseResource)
            self.dispatcher.unregister(GetClusterStatus)
        for resource in self._tracked:
            self._step_down(resource)
        self.log.info("single-node consensus: {node_id} stepped down", node_id=self.node_id)
        return succeed(None)

    # -- internals ------------------------------------------------------------

    def _claim(self, resource: str) -> LeadershipState:
        current = self.registry.state(resource)
        if (
            current.role is Role.LEADER
            and current.leader_id == self.node_id
            and current.leader_address == self.api_address
        ):
            return current
        return self.registry.update(
            resource,
            Role.LEADER,
            current.term + 1,
            leader_id=self.node_id,
            leader_address=self.api_address,
        )

    def _step_down(self, resource: str) -> None:
        current = self.registry.state(resource)
        if current.role is not Role.LEADER:
            return
        self.registry.update(resource, Role.UNKNOWN, current.term)

    def _handle_track(self, command: TrackResource, context: CommandContext) -> Deferred[Any]:
        return self.track(command.resource_name).addCallback(_result)

    def _handle_status(self, command: GetClusterStatus, context: CommandContext) -> ClusterStatus:
        return ClusterStatus(
            node_id=self.node_id,
            variant="single-node",
            members=({"node_id": self.node_id, "api_address": self.api_address, "self": True},),
            resources=tuple(s.to_json() for s in self.registry.states()),
        )

    def _handle_release(self, command: ReleaseResource, context: CommandContext) -> Deferred[Any]:
        resource = command.resource_name
        return self.release(resource).addCallback(lambda _: _result(self.registry.state(resource)))


def _check_resource(resource: object) -> None:
    if not isinstance(resource, str) or not resource.strip():
        raise InvalidCommand(f"resource must be a non-empty string, got {resource!r}")
