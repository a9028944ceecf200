"""
The kernel's shared parts, handed to every subsystem through its context.

Only the composition root (:mod:`piccolod.tap`) builds a :class:`Kernel`;
subsystems receive it and use its parts through their interfaces.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from piccolod.interfaces import (
    ICommandDispatcher,
    IEventBus,
    IHealth,
    ILeadershipRegistry,
    ISupervisor,
)


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
