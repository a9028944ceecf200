"""
The remote subsystem's access to its record in the control store: the
``store.remote.*`` commands (answered by the persistence subsystem from its
remote repository), never an import of persistence.
"""

from __future__ import annotations

import attrs

from piccolod.commands import (
    CommandContext,
    StoredRemote,
    StoreLoadRemote,
    StoreSaveRemote,
)
from piccolod.errors import NotFound
from piccolod.interfaces import ICommandDispatcher
from piccolod.remote.model import RemoteState

__all__ = ["CONTEXT", "RemoteStoreClient"]

#: How the remote subsystem dispatches its own commands.
CONTEXT = CommandContext(subject="system:remote", source="internal")


@attrs.define(eq=False)
class RemoteStoreClient:
    dispatcher: ICommandDispatcher

    async def load(self) -> RemoteState:
        """The stored state (an empty one when nothing is stored)."""
        try:
            result = await self.dispatcher.dispatch(StoreLoadRemote(), CONTEXT)
        except NotFound:
            return RemoteState()
        if not isinstance(result, StoredRemote):
            raise TypeError(f"store.remote.load answered {type(result).__name__}")
        return RemoteState.from_record(result.record)

    async def save(self, state: RemoteState) -> None:
        """Store ``state`` as a whole (one transaction)."""
        await self.dispatcher.dispatch(StoreSaveRemote(record=state.to_record()), CONTEXT)
