"""The ``store.*`` command contract, bound to the real store and to the in-memory fake."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from piccolod.apps.store import MemoryStore
from piccolod.events import LockState, LockStateChanged
from piccolod.kernel.dispatcher import CommandDispatcher
from piccolod.testing.bus import FakeEventBus
from tests.contracts.store_commands import StoreCommandsContract
from tests.unit.test_persistence_exports import PASSWORD, Box


class PersistenceStoreCommandsTests(StoreCommandsContract, SynchronousTestCase):
    """The persistence service: the SQLCipher control store behind the commands."""

    def make(self) -> None:
        self.box = Box(self)
        self.box.result(self.box.service.setup(PASSWORD))
        self.unlock()
        self.dispatcher = self.box.dispatcher

    def lock(self) -> None:
        self.box.result(self.box.service.lock())

    def unlock(self) -> None:
        self.box.result(self.box.service.unlock(password=PASSWORD))


class MemoryStoreCommandsTests(StoreCommandsContract, SynchronousTestCase):
    """The in-memory fake the apps subsystem's unit tests stand on."""

    def make(self) -> None:
        clock = Clock()
        self.bus = FakeEventBus(clock)
        self.dispatcher = CommandDispatcher(clock, self.bus)
        self.store = MemoryStore(self.dispatcher).register()
        self.unlock()

    def _announce(self, state: LockState) -> None:
        self.store.locked = state is not LockState.UNLOCKED
        self.bus.publish(LockStateChanged(state=state), source="persistence")
        self.bus.flush()

    def lock(self) -> None:
        self._announce(LockState.LOCKED)

    def unlock(self) -> None:
        self._announce(LockState.UNLOCKED)
