"""
The persistence service on the real reactor with real thread pools: Argon2
and the store never run on the reactor thread, concurrent calls are
serialised on the store's one thread, and commits are published in order.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.threadpool import ThreadPool

from piccolod.errors import Locked
from piccolod.events import ControlStoreCommit, LockState
from piccolod.kernel.bus import MemoryEventBus
from piccolod.persistence.errors import WrongPassword
from piccolod.persistence.keyset import KdfParams
from piccolod.persistence.service import PersistenceConfig, PersistenceService

pytestmark = pytest.mark.integration

PASSWORD = "threaded password"


def _service(reactor: Any, directory: Path) -> PersistenceService:
    return PersistenceService(
        reactor,
        directory,
        MemoryEventBus(reactor),
        PersistenceConfig(kdf=KdfParams(time_cost=1, memory_kib=1024, parallelism=1)),
        kdf_pool=ThreadPool(minthreads=0, maxthreads=2, name="test-kdf"),
        store_pool=ThreadPool(minthreads=1, maxthreads=1, name="test-store"),
        owns_pools=True,
    )


@pytest_twisted.ensureDeferred
async def test_store_and_kdf_run_off_the_reactor_thread(tmp_path: Path) -> None:
    """Unlock, 60 concurrent writes and 30 reads: all off the reactor, revisions in order."""
    from twisted.internet import reactor

    service = _service(reactor, tmp_path)
    commits: list[int] = []
    service.bus.subscribe(ControlStoreCommit.topic, lambda env: commits.append(env.event.revision))
    service.startService()
    try:
        reactor_thread = threading.get_ident()
        await service.setup(PASSWORD)
        try:
            await service.unlock(password="not the password")
        except WrongPassword:
            pass
        else:
            raise AssertionError("a wrong password unlocked")
        service.limiter.succeeded()  # skip the rate-limit delay in this test
        await service.unlock(password=PASSWORD)
        assert service.state is LockState.UNLOCKED

        threads: set[int] = set()

        def record(tx: Any) -> int:
            threads.add(threading.get_ident())
            return len(tx.settings.items())

        writes = [service.settings.set(f"k{i}", i) for i in range(60)]
        reads = [service.store.read(record) for _ in range(30)]
        await gatherResults([*writes, *reads], consumeErrors=True)
        assert reactor_thread not in threads
        assert len(threads) == 1, "the store ran on more than one thread"
        info = service.info()
        assert info.revision == 61
        assert len(await service.settings.items()) == 60

        await service.bus.drain()  # type: ignore[attr-defined]
        assert commits == list(range(1, 62))

        check = await service.run_quick_check()
        assert check is not None and check.ok, check
        await service.lock()
        try:
            await service.settings.items()
        except Locked:
            pass
        else:
            raise AssertionError("a locked store answered")
    finally:
        await service.stopService()
    assert not service.kdf_pool.started  # type: ignore[union-attr]
    assert not service.store_pool.started  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_lock_waits_for_queued_writes(tmp_path: Path) -> None:
    """Writes submitted before a lock all commit; the lock then closes the store."""
    from twisted.internet import reactor

    service = _service(reactor, tmp_path)
    service.startService()
    try:
        await service.setup(PASSWORD)
        await service.unlock(password=PASSWORD)
        writes: list[Deferred[None]] = [service.settings.set(f"k{i}", i) for i in range(20)]
        locking = service.lock()
        await gatherResults(writes)
        await locking
        assert service.state is LockState.LOCKED
        await service.unlock(password=PASSWORD)
        assert len(await service.settings.items()) == 20
    finally:
        await service.stopService()
