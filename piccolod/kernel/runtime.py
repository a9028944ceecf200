"""
The kernel's shared parts, handed to every subsystem through its context.

Only the composition root (:mod:`piccolod.tap`) builds a :class:`Kernel`;
subsystems receive it and use its parts through their interfaces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from piccolod.interfaces import (
    ICommandDispatcher,
    IEventBus,
    IHealth,
    ILeadershipRegistry,
    ISupervisor,
)
from piccolod.kernel.memory import trim_heap


@attrs.frozen
class Kernel:
    """
    @ivar reactor: the reactor, typed by use (``IReactorTime`` at least).
    @ivar node_id: this node's stable id.
    @ivar api_address: this node's API base URL, for leader hints.
    @ivar state_dir: where durable state lives.
    @ivar selected: the variant chosen for each slot.
    """

    reactor: Any
    bus: IEventBus
    registry: ILeadershipRegistry
    dispatcher: ICommandDispatcher
    health: IHealth
    supervisor: ISupervisor
    node_id: str
    api_address: str
    state_dir: Path
    #: The variant chosen for each slot (``{"consensus": "single-node"}``).
    selected: Mapping[str, str] = attrs.field(factory=dict)
    #: Clock time at which the kernel was built.
    started_at: float = 0.0
    #: The job runner (``IJobRunner``), when the kernel has one.
    jobs: Any = None
    #: The ``KernelMetrics`` that ``/metrics`` serves, when enabled.
    metrics: Any = None


class KernelService(Service):
    """
    The root of the tree ``twistd`` runs: the supervisor is its one child.

    Stopping it stops the supervised tree (children in reverse order, each
    bounded), then the dispatcher (pending retries and timeouts cancelled),
    then drains and stops the bus.  ``twistd`` waits for the returned
    Deferred before the reactor stops (it is a before-shutdown trigger).
    """

    log = Logger()

    def __init__(
        self, kernel: Kernel, log_observer: Any = None, services: Sequence[IService] = ()
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.log_observer = log_observer
        #: Kernel services (job runner, telemetry) started before the
        #: supervised tree and stopped after it.
        self.services = list(services)
        self.setName("piccolod")  # type: ignore[no-untyped-call]

    def setServiceParent(self, parent: Any) -> None:
        """
        Join ``parent``; when it is twistd's application, also give it the
        configured log observer (twistd starts logging to an application's
        ``ILogObserver`` component after building the tree).
        """
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.log.info(
            "piccolod {node_id} starting: {subsystems}",
            node_id=self.kernel.node_id,
            subsystems=dict(self.kernel.selected),
        )
        for service in self.services:
            service.startService()
        root: IService = self.kernel.supervisor  # type: ignore[assignment]
        root.startService()
        ready = self.kernel.supervisor.when_ready()
        ready.addCallbacks(self._ready, self._not_ready)

    def _ready(self, _: object) -> None:
        self.log.info("piccolod {node_id} ready", node_id=self.kernel.node_id)
        trim_heap()  # start-up's garbage back to the OS: idle memory is what stays

    def _not_ready(self, failure: Any) -> None:
        from piccolod.errors import NotReady

        if failure.check(NotReady):  # stopped before it was ready
            self.log.info("piccolod stopped before it was ready")
        else:
            self.log.failure("piccolod did not become ready", failure)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            root: IService = self.kernel.supervisor  # type: ignore[assignment]
            await maybeDeferred(root.stopService)
            for service in reversed(self.services):
                try:
                    await maybeDeferred(service.stopService)
                except Exception:
                    self.log.failure("while stopping {service}", service=service)
        finally:
            stop = getattr(self.kernel.dispatcher, "stop", None)
            if stop is not None:
                stop()
            await self.kernel.bus.stop()  # type: ignore[attr-defined]
        self.log.info("piccolod {node_id} stopped", node_id=self.kernel.node_id)
