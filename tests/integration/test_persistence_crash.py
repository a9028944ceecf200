"""
Crash safety with real processes and SIGKILL:

- durability: a child commits a numbered stream of writes through the
  control store (real reactor, real store thread, SQLCipher, WAL,
  ``synchronous=FULL``) and prints each acknowledgement; it is killed at
  random points; after each kill every acknowledged write is present, the
  revisions are contiguous and chain, and ``quick_check`` is ok;
- keyset: a child changes the password back and forth through the
  persistence service and is killed at random points; the keyset on disk
  always opens with the last acknowledged password or the one in flight,
  never neither, and the recovery key keeps working.

The children are this module run as a script (``python -m ... child``).
Kill points are random (the seed is printed on failure); each round waits
for the child's output with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KEY_HEX = "5a" * 32
PASSWORDS = ("first password 0", "second password 1")
ROUNDS = 20


# --------------------------------------------------------------------------
# Children: each imports everything, says "loaded", then waits for its
# arguments on stdin, so that the parent can start the next round's child
# while the current round runs (imports take about a second here).


def _wait_for_go() -> list[str]:
    print("loaded", flush=True)
    line = sys.stdin.readline().split()
    if not line or line[0] != "go":
        os._exit(0)
    return line[1:]


def _durability_child() -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.python.threadpool import ThreadPool

    from piccolod.persistence.store import ControlStore

    path, start_text = _wait_for_go()
    start = int(start_text)

    pool = ThreadPool(minthreads=1, maxthreads=1, name="store")
    pool.start()
    store = ControlStore(reactor, pool)

    async def run() -> None:
        db = Path(path)
        await store.open(db, bytes.fromhex(KEY_HEX), marker=db.parent / "marker.json")
        print(f"ready {store.info().revision}", flush=True)
        i = start
        while True:
            await store.settings.set(f"k{i}", i)
            print(f"ack {i} {store.info().revision}", flush=True)
            i += 1

    def crashed(failure: Any) -> None:
        print(f"error {failure.getErrorMessage()}", flush=True)
        os._exit(3)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()).addErrback(crashed))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def _keyset_child() -> None:
    from twisted.internet.task import Clock

    from piccolod.persistence.keyset import KdfParams, Keyset, open_with_password
    from piccolod.persistence.service import PersistenceConfig, PersistenceService
    from piccolod.testing.bus import FakeEventBus

    (state_dir,) = _wait_for_go()

    directory = Path(state_dir) / "persistence"
    keyset = Keyset(directory).load()
    current = 0
    try:
        open_with_password(keyset, PASSWORDS[0])
    except Exception:
        current = 1
    clock = Clock()
    service = PersistenceService(
        clock,
        directory,
        FakeEventBus(clock),
        PersistenceConfig(kdf=KdfParams(1, 8, 1), min_password_length=4),
    )
    service.startService()
    print(f"ready {current}", flush=True)
    n = 0
    while True:
        new = 1 - current
        outcome: list[Any] = []
        service.change_password(PASSWORDS[current], None, PASSWORDS[new]).addBoth(outcome.append)
        if not outcome or not hasattr(outcome[0], "state"):
            print(f"error {outcome!r}", flush=True)
            os._exit(3)
        current = new
        n += 1
        print(f"changed {n} {current}", flush=True)


# --------------------------------------------------------------------------
# Parent helpers


def _spawn(kind: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_persistence_crash", kind],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


class _Children:
    """Pre-started children of one kind: the next one loads while a round runs."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pending = _spawn(kind)

    def go(self, *args: str) -> subprocess.Popen[bytes]:
        child, self.pending = self.pending, _spawn(self.kind)
        _read_until(child, 1, time.monotonic() + 60, b"loaded")
        assert child.stdin is not None
        child.stdin.write(("go " + " ".join(args) + "\n").encode())
        child.stdin.flush()
        return child

    def close(self) -> None:
        self.pending.kill()
        self.pending.communicate(timeout=10)


def _read_until(
    child: subprocess.Popen[bytes], want: int, deadline: float, prefix: bytes
) -> list[list[str]]:
    """Read lines until ``want`` lines start with ``prefix`` (or the deadline); all lines."""
    assert child.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    buffer = b""
    lines: list[list[str]] = []
    seen = 0
    fd = child.stdout.fileno()
    try:
        while seen < want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; got {lines[-3:]}")
            if not selector.select(timeout=left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                err = child.stderr.read().decode() if child.stderr else ""
                raise AssertionError(f"child exited early: {lines[-3:]} {err[-2000:]}")
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.startswith(b"error"):
                    raise AssertionError(line.decode())
                lines.append(line.decode().split())
                if line.startswith(prefix):
                    seen += 1
    finally:
        selector.close()
    return lines


def _kill(child: subprocess.Popen[bytes]) -> list[list[str]]:
    """SIGKILL the child; return the lines it printed that were not read yet."""
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=10)
    return [line.split() for line in out.decode().splitlines() if line]


# --------------------------------------------------------------------------
# Tests


def test_acknowledged_writes_survive_sigkill() -> None:
    """Every acknowledged commit survives SIGKILL; revisions stay contiguous; quick_check ok."""
    from twisted.internet.task import Clock

    from piccolod.persistence.store import ControlStore

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="durability-"))
    try:
        db = tmp / "control.db"
        acked: dict[int, int] = {}
        next_index = 0
        children = _Children("durability")
        for round_ in range(ROUNDS):
            child = children.go(str(db), str(next_index))
            want = rng.randint(1, 30)
            lines = _read_until(child, want, time.monotonic() + 30, b"ack")
            time.sleep(rng.random() * 0.01)  # jitter the kill point within a commit
            lines += _kill(child)
            for line in lines:
                if line[0] == "ack":
                    acked[int(line[1])] = int(line[2])
            # Reopen (inline, in this process) and check.
            store = ControlStore(Clock())
            d = store.open(db, bytes.fromhex(KEY_HEX), marker=tmp / "marker.json")
            info = _result(d)
            values = _result(store.settings.items())
            missing = [i for i in acked if values.get(f"k{i}") != i]
            assert missing == [], f"seed {seed} round {round_}: lost acknowledged writes {missing}"
            assert info.revision >= max(acked.values()), f"seed {seed}: head went backwards"
            check = _result(store.quick_check())
            assert check.ok, f"seed {seed}: {check.detail}"
            chain = _result(store.verify_chain())
            assert chain.ok, f"seed {seed}: {chain.detail}"
            revisions = _result(
                store.read(lambda tx: [r[0] for r in tx.query("SELECT revision FROM revisions")])
            )
            assert revisions == list(range(1, info.revision + 1)), f"seed {seed}: gaps"
            _result(store.close())
            next_index = max(acked) + 1
        children.close()
        assert len(acked) >= ROUNDS
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_password_change_survives_sigkill() -> None:
    """Killed while changing passwords, the keyset opens with the old or new one, never neither."""
    from twisted.internet.task import Clock

    from piccolod.persistence.errors import WrongPassword
    from piccolod.persistence.keyset import (
        KdfParams,
        Keyset,
        open_with_password,
        open_with_recovery_key,
    )
    from piccolod.persistence.service import PersistenceConfig, PersistenceService
    from piccolod.testing.bus import FakeEventBus

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="keyset-crash-"))
    try:
        clock = Clock()
        service = PersistenceService(
            clock,
            tmp / "persistence",
            FakeEventBus(clock),
            PersistenceConfig(kdf=KdfParams(1, 8, 1), min_password_length=4),
        )
        service.startService()
        words = _result(service.setup(PASSWORDS[0])).recovery_key
        _result(service.stopService())
        current = 0
        changes = 0
        children = _Children("keyset")
        for round_ in range(ROUNDS):
            child = children.go(str(tmp))
            want = rng.randint(0, 12)
            lines = _read_until(child, 1, time.monotonic() + 30, b"ready")
            if want:
                lines += _read_until(child, want, time.monotonic() + 30, b"changed")
            time.sleep(rng.random() * 0.005)
            lines += _kill(child)
            for line in lines:
                if line[0] == "ready":
                    assert int(line[1]) == current, f"seed {seed}: child found {line}"
                if line[0] == "changed":
                    current = int(line[2])
                    changes += 1
            keyset = Keyset(tmp / "persistence").load()
            opened = []
            for index, password in enumerate(PASSWORDS):
                try:
                    open_with_password(keyset, password)
                    opened.append(index)
                except WrongPassword:
                    pass
            # The acknowledged password, or the one whose change was in flight.
            assert len(opened) == 1, f"seed {seed} round {round_}: {opened}"
            current = opened[0]
            open_with_recovery_key(keyset, words)
        children.close()
        assert changes >= ROUNDS // 2, f"seed {seed}: only {changes} changes ran"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _result(d: Any) -> Any:
    """The result of an already-fired Deferred (inline store and service)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    value = out[0]
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


if __name__ == "__main__":
    if sys.argv[1] == "durability":
        _durability_child()
    elif sys.argv[1] == "keyset":
        _keyset_child()
