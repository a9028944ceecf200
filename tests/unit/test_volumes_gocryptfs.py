"""
The ``gocryptfs`` volume adapter without FUSE: its processes are spawned on
a fake process reactor (a ``Clock`` that records every spawn, buildbot
style) where :class:`FakeTools` plays gocryptfs and fusermount: exit codes,
a mount table, stdin, signals.  The shared volume contract runs against
it; the real binary is exercised by ``tests/integration/test_gocryptfs.py``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import shutil
import types
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from piccolod.errors import ConfigError
from piccolod.kernel.plugins import SubsystemContext
from piccolod.persistence.gocryptfs import (
    DEFAULT_ENV,
    GocryptfsVolumes,
    read_mountinfo,
    verify_conf,
)
from piccolod.persistence.volumes import (
    MountTimeout,
    VolumeBusy,
    VolumeError,
    WrongPassphrase,
)
from tests.contracts.volumes import (
    OTHER_PASSPHRASE,
    PASSPHRASE,
    VolumeAdapterContract,
    VolumeAdapterFixture,
)

T = TypeVar("T")

GOCRYPTFS = "/usr/bin/gocryptfs"
FUSERMOUNT = "/usr/bin/fusermount3"


def make_conf(passphrase: bytes, n: int = 1024, version: int = 2, flags: Any = None) -> bytes:
    """A gocryptfs 2 config whose master key opens with ``passphrase``."""
    salt = os.urandom(32)
    scrypt_hash = hashlib.scrypt(passphrase, salt=salt, n=n, r=8, p=1, dklen=32)
    key = HKDF(hashes.SHA256(), 32, None, b"AES-GCM file content encryption").derive(scrypt_hash)
    nonce = os.urandom(16)
    blob = nonce + AESGCM(key).encrypt(nonce, os.urandom(32), (0).to_bytes(8, "big"))
    return json.dumps(
        {
            "Creator": "fake",
            "EncryptedKey": base64.b64encode(blob).decode(),
            "ScryptObject": {
                "Salt": base64.b64encode(salt).decode(),
                "N": n,
                "R": 8,
                "P": 1,
                "KeyLen": 32,
            },
            "Version": version,
            "FeatureFlags": flags
            if flags is not None
            else ["HKDF", "GCMIV128", "DirIV", "EMENames", "LongNames", "Raw64"],
        }
    ).encode()


# --------------------------------------------------------------------------
# A fake process reactor


@implementer(IProcessTransport)
class FakeProcess:
    """One spawned process: records stdin and signals; ``exit()`` ends it."""

    def __init__(
        self,
        reactor: FakeProcessReactor,
        proto: Any,
        args: list[str],
        env: dict[str, str],
        pid: int,
    ) -> None:
        self.reactor = reactor
        self.proto = proto
        self.args = args
        self.env = env
        self.pid = pid
        self.stdin = bytearray()
        self.stdin_closed = False
        self.signals: list[str] = []
        self.ended = False

    @property
    def tool(self) -> str:
        return os.path.basename(self.args[0])

    # IProcessTransport
    def write(self, data: bytes) -> None:
        assert not self.stdin_closed, "write after closeStdin"
        self.stdin += data

    def writeSequence(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, descriptor: int) -> None:
        pass

    def writeToChild(self, childFD: int, data: bytes) -> None:
        raise NotImplementedError

    def loseConnection(self) -> None:
        pass

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None

    def signalProcess(self, signalID: str | int) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(str(signalID))
        self.reactor.tools.signalled(self, str(signalID))

    # driving
    def emit(self, data: bytes) -> None:
        self.proto.childDataReceived(2, data)

    def exit(self, code: int | None = 0, signal: int | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if code == 0 and signal is None:
            reason: Exception = ProcessDone(0)
        else:
            reason = ProcessTerminated(code, signal)
        self.proto.processEnded(Failure(reason))


@implementer(IReactorProcess)
class FakeProcessReactor(Clock):
    """A Clock that spawns :class:`FakeProcess` es and hands them to ``tools``."""

    def __init__(self, tools: FakeTools) -> None:
        super().__init__()
        self.tools = tools
        tools.reactor = self
        self.processes: list[FakeProcess] = []
        self.spawn_error: OSError | None = None
        self._pids = itertools.count(4000)

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: Any,
        args: Any = (),
        env: Any = None,
        path: Any = None,
        uid: Any = None,
        gid: Any = None,
        usePTY: Any = False,
        childFDs: Any = None,
    ) -> Any:
        if self.spawn_error is not None:
            raise self.spawn_error
        assert executable == args[0]
        proc = FakeProcess(self, processProtocol, list(args), dict(env or {}), next(self._pids))
        self.processes.append(proc)
        processProtocol.makeConnection(proc)
        self.tools.started(proc)
        return proc

    def spawned(self, tool: str) -> list[FakeProcess]:
        return [p for p in self.processes if p.tool == tool]


class FakeTools:
    """
    gocryptfs and fusermount as the adapter sees them: a mount table,
    plaintext that appears at the mountpoint while mounted (kept aside while
    not), exit codes, and knobs for the faults.
    """

    def __init__(self) -> None:
        self.reactor: FakeProcessReactor
        self.table: set[str] = set()
        self.owner: dict[str, FakeProcess] = {}
        self.stored: dict[str, dict[str, bytes | None]] = {}
        self.mount_delay = 0.15
        self.hang = False
        self.ignore_term = False
        self.linger = False
        self.busy: set[str] = set()
        self.mount_exit: tuple[int, bytes] | None = None
        self.init_exit: tuple[int, bytes] | None = None

    @staticmethod
    def key(point: str) -> str:
        p = Path(point)
        return os.path.join(os.path.realpath(p.parent), p.name)

    def started(self, proc: FakeProcess) -> None:
        assert proc.stdin_closed, "stdin must be closed at once"
        assert "--" in proc.args, "paths must follow --"
        if proc.tool == "gocryptfs":
            (self._init if "-init" in proc.args else self._mount)(proc)
        elif proc.tool.startswith("fusermount"):
            assert not proc.stdin
            self._fusermount(proc)
        else:
            raise AssertionError(f"unexpected spawn {proc.args}")

    def later(self, delay: float, fn: Any, *args: Any) -> None:
        self.reactor.callLater(delay, fn, *args)

    def fail(self, proc: FakeProcess, code: int, message: bytes) -> None:
        proc.emit(message)
        self.later(0.01, proc.exit, code)

    def _init(self, proc: FakeProcess) -> None:
        cipher = Path(proc.args[-1])
        if self.init_exit is not None:
            self.fail(proc, *self.init_exit)
            return
        if not cipher.is_dir():
            self.fail(proc, 6, b"Invalid cipherdir: no such file or directory\n")
            return
        if any(cipher.iterdir()):
            self.fail(proc, 6, b"Invalid cipherdir: directory not empty\n")
            return
        n = 2 ** int(proc.args[proc.args.index("-scryptn") + 1])
        (cipher / "gocryptfs.conf").write_bytes(make_conf(bytes(proc.stdin), n=n))
        (cipher / "gocryptfs.diriv").write_bytes(os.urandom(16))
        self.later(0.01, proc.exit, 0)

    def _mount(self, proc: FakeProcess) -> None:
        cipher, point = proc.args[-2], proc.args[-1]
        assert {"-fg", "-nosyslog", "-q"} <= set(proc.args)
        conf = Path(cipher) / "gocryptfs.conf"
        if self.mount_exit is not None:
            self.fail(proc, *self.mount_exit)
            return
        if not conf.exists():
            self.fail(proc, 6, b"Invalid cipherdir\n")
            return
        if verify_conf(conf.read_bytes(), bytes(proc.stdin)) is False:
            self.fail(proc, 12, b"Password incorrect.\n")
            return
        if any(Path(point).iterdir()):
            self.fail(proc, 10, b"Invalid mountpoint: not empty\n")
            return
        if not self.hang:
            self.later(self.mount_delay, self._appear, proc, cipher, point)

    def _appear(self, proc: FakeProcess, cipher: str, point: str) -> None:
        if proc.ended:
            return
        for rel, data in sorted(self.stored.pop(cipher, {}).items()):
            target = Path(point) / rel
            if data is None:
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        key = self.key(point)
        self.table.add(key)
        self.owner[key] = proc

    def _detach(self, key: str, keep_entry: bool = False) -> None:
        proc = self.owner.pop(key, None)
        if proc is not None:
            cipher, point = proc.args[-2], proc.args[-1]
            files: dict[str, bytes | None] = {}
            for path in sorted(Path(point).rglob("*")):
                rel = str(path.relative_to(point))
                files[rel] = None if path.is_dir() else path.read_bytes()
            self.stored[cipher] = files
            for child in Path(point).iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        if not keep_entry:
            self.table.discard(key)

    def _fusermount(self, proc: FakeProcess) -> None:
        assert proc.args[1] == "-u"
        key = self.key(proc.args[-1])
        if key not in self.table:
            self.fail(proc, 1, b"fusermount3: failed to unmount: Invalid argument\n")
            return
        if key in self.busy:
            self.fail(proc, 1, b"fusermount3: failed to unmount: Device or resource busy\n")
            return
        owner = self.owner.get(key)
        self._detach(key)
        self.later(0.01, proc.exit, 0)
        if owner is not None and not self.linger:
            self.later(0.02, owner.exit, 0)

    def signalled(self, proc: FakeProcess, sig: str) -> None:
        if proc.tool != "gocryptfs":
            self.later(0.0, proc.exit, None, 9 if sig == "KILL" else 15)
            return
        key = self.key(proc.args[-1])
        if sig == "KILL":
            if self.owner.get(key) is proc:
                self._detach(key, keep_entry=True)  # a dead FUSE mount stays listed
            self.later(0.0, proc.exit, None, 9)
        elif sig == "TERM" and not self.ignore_term:
            if self.owner.get(key) is proc:
                self._detach(key)  # gocryptfs unmounts (lazily if busy) on SIGTERM
            self.later(0.01, proc.exit, 15)


# --------------------------------------------------------------------------
# Bindings


class GocryptfsBinding(VolumeAdapterFixture):
    """``GocryptfsVolumes`` on a fake process reactor; ``wait`` advances its clock."""

    reactor: FakeProcessReactor
    tools: FakeTools

    def make_adapter(self, state_dir: Path) -> Any:
        self.tools = FakeTools()
        self.reactor = FakeProcessReactor(self.tools)
        self.addCleanup(self.assert_no_delayed_calls)
        return GocryptfsVolumes(
            self.reactor,
            state_dir,
            gocryptfs=GOCRYPTFS,
            fusermount=FUSERMOUNT,
            mount_table=lambda: set(self.tools.table),
        )

    def assert_no_delayed_calls(self) -> None:
        self.pump(1.0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def pump(self, seconds: float, step: float = 0.01) -> None:
        for _ in range(round(seconds / step)):
            self.reactor.advance(step)

    def drive(self, d: Deferred[Any], limit: float = 60.0) -> None:
        steps = 0
        while not d.called and steps < limit / 0.01:
            self.reactor.advance(0.01)
            steps += 1

    def wait(self, d: Deferred[T]) -> T:
        self.drive(d)
        return self.successResultOf(d)

    def wait_failure(self, d: Deferred[Any], *types: type[BaseException]) -> BaseException:
        self.drive(d)
        return self.failureResultOf(d, *types).value


class GocryptfsContractTests(GocryptfsBinding, VolumeAdapterContract, SynchronousTestCase):
    """The volume contract, bound to ``GocryptfsVolumes`` on the fake tools."""


class GocryptfsAdapterTests(GocryptfsBinding, SynchronousTestCase):
    """What the gocryptfs adapter does with its processes."""

    def point(self, volume_id: str = "v1") -> Path:
        return self.state_dir / "volumes" / "mounts" / volume_id

    def cipher(self, volume_id: str = "v1") -> Path:
        return self.state_dir / "volumes" / "ciphertext" / volume_id

    def test_passphrase_only_ever_goes_to_stdin(self) -> None:
        """The passphrase is written to stdin (then closed) and is in no argv or environment."""
        self.created("v1")
        self.mounted("v1")
        self.wait(self.adapter.unmount("v1"))
        self.assertEqual(len(self.reactor.processes), 3)
        for proc in self.reactor.processes:
            self.assertTrue(proc.stdin_closed)
            for text in [*proc.args, *proc.env.values()]:
                self.assertNotIn(PASSPHRASE.decode(), text)
        for proc in self.reactor.spawned("gocryptfs"):
            self.assertEqual(bytes(proc.stdin), PASSPHRASE)
        for proc in self.reactor.spawned("fusermount3"):
            self.assertEqual(bytes(proc.stdin), b"")

    def test_command_lines(self) -> None:
        """init, rw mount, ro mount and unmount run the documented command lines."""
        self.created("v1")
        self.mounted("v1")
        self.mounted("v1", read_only=True)
        cipher, point = str(self.cipher()), str(self.point())
        self.assertEqual(
            [p.args for p in self.reactor.processes],
            [
                [GOCRYPTFS, "-init", "-q", "-scryptn", "10", "--", cipher],
                [GOCRYPTFS, "-fg", "-nosyslog", "-q", "--", cipher, point],
                [FUSERMOUNT, "-u", "--", point],
                [GOCRYPTFS, "-fg", "-nosyslog", "-q", "-ro", "--", cipher, point],
            ],
        )

    def test_tools_get_a_minimal_environment(self) -> None:
        """Spawned tools get PATH and LC_ALL only, nothing inherited."""
        self.created("v1")
        self.assertEqual(self.reactor.processes[0].env, dict(DEFAULT_ENV))

    def test_mount_timeout_terminates_the_process(self) -> None:
        """No mount within 5 s: SIGTERM, then MountTimeout, nothing left mounted."""
        self.created("v1")
        self.tools.hang = True
        d = self.adapter.mount("v1", PASSPHRASE, False)
        self.pump(4.9)
        self.assertNoResult(d)
        proc = self.reactor.spawned("gocryptfs")[-1]
        self.assertEqual(proc.signals, [])
        self.pump(0.2)
        self.assertEqual(proc.signals, ["TERM"])
        error = self.wait_failure(d, MountTimeout)
        self.assertIn("5.0s", str(error))
        self.assertTrue(error.retryable)  # type: ignore[attr-defined]
        self.assertFalse(self.adapter.is_mounted("v1"))
        self.assertEqual(list(self.adapter.mounted()), [])

    def test_mount_timeout_kills_a_process_that_ignores_sigterm(self) -> None:
        """A process ignoring SIGTERM gets SIGKILL after the grace period."""
        self.created("v1")
        self.tools.hang = True
        self.tools.ignore_term = True
        d = self.adapter.mount("v1", PASSPHRASE, False)
        self.pump(5.1)
        proc = self.reactor.spawned("gocryptfs")[-1]
        self.assertEqual(proc.signals, ["TERM"])
        self.pump(1.9)
        self.assertEqual(proc.signals, ["TERM"])
        self.pump(0.2)
        self.assertEqual(proc.signals, ["TERM", "KILL"])
        self.wait_failure(d, MountTimeout)
        self.assertTrue(proc.ended)

    def test_a_mount_that_appears_late_but_in_time_succeeds(self) -> None:
        """A mount appearing after 4.5 s is within the 5 s limit."""
        self.created("v1")
        self.tools.mount_delay = 4.5
        d = self.adapter.mount("v1", PASSPHRASE, False)
        self.pump(4.4)
        self.assertNoResult(d)
        self.assertEqual(self.wait(d), str(self.point()))
        self.assertEqual(self.reactor.spawned("gocryptfs")[-1].signals, [])

    def test_other_exit_codes_are_volume_errors_with_the_output(self) -> None:
        """An unexpected exit is a VolumeError naming the code and the tool's output."""
        self.created("v1")
        self.tools.mount_exit = (1, b"fuse: device not found, try 'modprobe fuse' first\n")
        error = self.wait_failure(self.adapter.mount("v1", PASSPHRASE, False), VolumeError)
        self.assertNotIsInstance(error, WrongPassphrase)
        self.assertIn("exit code 1", str(error))
        self.assertIn("modprobe fuse", str(error))
        self.assertFalse(self.adapter.is_mounted("v1"))

    def test_wrong_passphrase_is_exit_code_12(self) -> None:
        """Exit code 12 of the mount process is WrongPassphrase."""
        self.created("v1")
        self.wait_failure(self.adapter.mount("v1", OTHER_PASSPHRASE, False), WrongPassphrase)
        self.assertEqual(self.reactor.spawned("gocryptfs")[-1].args[-3:-2], ["--"])

    def test_a_killed_process_is_reported_and_its_dead_mount_cleared(self) -> None:
        """SIGKILL of the mount process: observers told, the dead mount unmounted, remount works."""
        seen: list[tuple[str, str]] = []
        self.adapter.watch_lost(lambda v, r: seen.append((v, r)))
        self.created("v1")
        (self.mounted("v1") / "f").write_bytes(b"kept")
        pid = self.adapter.pid("v1")
        proc = next(p for p in self.reactor.processes if p.pid == pid)
        proc.signalProcess("KILL")
        self.reactor.advance(0)
        self.assertEqual(len(seen), 1)
        self.assertEqual(seen[0][0], "v1")
        self.assertIn("killed by signal 9", seen[0][1])
        self.assertFalse(self.adapter.is_mounted("v1"))
        self.pump(0.5)
        self.assertNotIn(FakeTools.key(str(self.point())), self.tools.table)
        self.assertEqual(self.reactor.processes[-1].args[:2], [FUSERMOUNT, "-u"])
        self.assertEqual((self.mounted("v1") / "f").read_bytes(), b"kept")
        self.assertEqual(len(seen), 1)

    def test_a_process_exiting_on_its_own_is_reported(self) -> None:
        """A mount process that exits 0 without being asked is a lost mount too."""
        seen: list[tuple[str, str]] = []
        self.adapter.watch_lost(lambda v, r: seen.append((v, r)))
        self.created("v1")
        self.mounted("v1")
        self.reactor.spawned("gocryptfs")[-1].exit(0)
        self.assertEqual([v for v, _ in seen], ["v1"])
        self.assertIn("exit code 0", seen[0][1])

    def test_a_failing_observer_does_not_stop_the_others(self) -> None:
        """An observer that raises is logged; the next observer is still told."""
        seen: list[str] = []

        def broken(volume_id: str, reason: str) -> None:
            raise RuntimeError("observer bug")

        self.adapter.watch_lost(broken)
        self.adapter.watch_lost(lambda v, r: seen.append(v))
        self.created("v1")
        self.mounted("v1")
        self.reactor.spawned("gocryptfs")[-1].signalProcess("KILL")
        self.reactor.advance(0)
        self.assertEqual(seen, ["v1"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_busy_unmount_fails_and_keeps_the_mount(self) -> None:
        """fusermount reporting 'busy' is VolumeBusy; the volume stays mounted and usable."""
        self.created("v1")
        path = self.mounted("v1")
        self.tools.busy.add(FakeTools.key(str(path)))
        error = self.wait_failure(self.adapter.unmount("v1"), VolumeBusy)
        self.assertTrue(error.retryable)  # type: ignore[attr-defined]
        self.assertEqual(len(self.reactor.spawned("fusermount3")), 4, "tried 1 + 3 times")
        self.assertTrue(self.adapter.is_mounted("v1"))
        self.assertEqual(self.reactor.spawned("gocryptfs")[-1].signals, [])
        self.tools.busy.clear()
        self.wait(self.adapter.unmount("v1"))
        self.assertFalse(self.adapter.is_mounted("v1"))

    def test_a_briefly_busy_mount_is_retried(self) -> None:
        """A mount busy for a moment (just mounted) is unmounted on a retry."""
        self.created("v1")
        path = self.mounted("v1")
        self.tools.busy.add(FakeTools.key(str(path)))
        d = self.adapter.unmount("v1")
        self.pump(0.05)
        self.assertEqual(len(self.reactor.spawned("fusermount3")), 1)
        self.tools.busy.clear()
        self.wait(d)
        self.assertEqual(len(self.reactor.spawned("fusermount3")), 2)
        self.assertFalse(self.adapter.is_mounted("v1"))

    def test_a_stale_mount_is_unmounted_before_mounting(self) -> None:
        """A mount left at the mountpoint (dead or foreign) is unmounted first."""
        self.created("v1")
        self.point().mkdir(parents=True, exist_ok=True)
        self.tools.table.add(FakeTools.key(str(self.point())))
        self.mounted("v1")
        self.assertEqual(
            [p.tool for p in self.reactor.processes], ["gocryptfs", "fusermount3", "gocryptfs"]
        )
        self.assertTrue(self.adapter.is_mounted("v1"))

    def test_unmount_clears_a_stale_mount_it_does_not_own(self) -> None:
        """unmount() of a volume listed in the mount table but not ours runs fusermount."""
        self.point().mkdir(parents=True)
        self.tools.table.add(FakeTools.key(str(self.point())))
        self.wait(self.adapter.unmount("v1"))
        self.assertEqual([p.tool for p in self.reactor.processes], ["fusermount3"])
        self.assertEqual(self.tools.table, set())

    def test_a_lingering_process_is_terminated_after_unmount(self) -> None:
        """A mount process still alive 10 s after fusermount gets SIGTERM; unmount fires."""
        self.created("v1")
        self.mounted("v1")
        self.tools.linger = True
        d = self.adapter.unmount("v1")
        self.pump(9.9)
        self.assertNoResult(d)
        self.pump(0.2)
        self.assertEqual(self.reactor.spawned("gocryptfs")[-1].signals, ["TERM"])
        self.wait(d)
        self.assertFalse(self.adapter.is_mounted("v1"))

    def test_stop_terminates_a_busy_volume(self) -> None:
        """stopService() with a busy volume terminates its process, so shutdown is bounded."""
        self.created("v1")
        path = self.mounted("v1")
        self.tools.busy.add(FakeTools.key(str(path)))
        self.wait(self.adapter.stopService())
        self.assertEqual(self.reactor.spawned("gocryptfs")[-1].signals, ["TERM"])
        self.assertEqual(list(self.adapter.mounted()), [])
        self.tools.busy.clear()

    def test_failed_init_removes_the_directory_it_made(self) -> None:
        """gocryptfs -init failing leaves no half-made ciphertext directory."""
        self.tools.init_exit = (7, b"something broke\n")
        error = self.wait_failure(self.adapter.create("v1", PASSPHRASE), VolumeError)
        self.assertIn("something broke", str(error))
        self.assertFalse(self.cipher().exists())

    def test_create_accepts_a_config_it_cannot_check(self) -> None:
        """An existing config of an unknown scheme is accepted without spawning anything."""
        self.cipher().mkdir(parents=True)
        (self.cipher() / "gocryptfs.conf").write_bytes(make_conf(PASSPHRASE, version=3))
        self.wait(self.adapter.create("v1", OTHER_PASSPHRASE))
        self.assertEqual(self.reactor.processes, [])

    def test_spawn_failure_is_a_volume_error(self) -> None:
        """A tool that cannot be executed is a VolumeError, and nothing is recorded."""
        self.created("v1")
        self.reactor.spawn_error = OSError(2, "No such file or directory")
        error = self.wait_failure(self.adapter.mount("v1", PASSPHRASE, False), VolumeError)
        self.assertIn("cannot run", str(error))
        self.assertEqual(list(self.adapter.mounted()), [])
        self.reactor.spawn_error = None

    def test_files_at_an_unmounted_mountpoint_are_refused(self) -> None:
        """Files written at the mountpoint while unmounted stop the mount (no hiding them)."""
        self.created("v1")
        self.point().mkdir(parents=True)
        (self.point() / "leak").write_bytes(b"plaintext written while unmounted")
        error = self.wait_failure(self.adapter.mount("v1", PASSPHRASE, False), VolumeError)
        self.assertIn("not empty", str(error))
        self.assertEqual(self.reactor.spawned("gocryptfs")[1:], [])

    def test_a_symlink_left_by_the_directory_adapter_is_replaced(self) -> None:
        """A mountpoint symlink (directory adapter) becomes a real mountpoint directory."""
        self.created("v1")
        self.point().parent.mkdir(parents=True, exist_ok=True)
        os.symlink("../ciphertext/v1", self.point())
        path = self.mounted("v1")
        self.assertFalse(path.is_symlink())
        self.assertTrue(path.is_dir())

    def test_operations_on_one_volume_are_serialised(self) -> None:
        """An unmount asked while the mount is in progress runs after it."""
        self.created("v1")
        mounting = self.adapter.mount("v1", PASSPHRASE, False)
        unmounting = self.adapter.unmount("v1")
        self.reactor.advance(0.05)
        self.assertNoResult(mounting)
        self.assertNoResult(unmounting)
        self.wait(mounting)
        self.wait(unmounting)
        self.assertFalse(self.adapter.is_mounted("v1"))
        self.assertEqual(
            [p.tool for p in self.reactor.processes], ["gocryptfs", "gocryptfs", "fusermount3"]
        )

    def test_bad_settings_are_config_errors(self) -> None:
        """Bad timeouts and scrypt costs are one ConfigError listing each."""
        with self.assertRaises(ConfigError) as cm:
            GocryptfsVolumes(
                self.reactor,
                self.state_dir,
                scrypt_logn=5,
                mount_timeout=0,
                kill_grace=-1,
                busy_retries=-1,
            )
        self.assertEqual(len(cm.exception.errors), 4)

    def test_a_reactor_without_processes_is_refused(self) -> None:
        """The reactor must provide IReactorProcess as well as IReactorTime."""
        self.assertRaises(TypeError, GocryptfsVolumes, Clock(), self.state_dir)


class VerifyConfTests(SynchronousTestCase):
    """verify_conf on gocryptfs 2 configs."""

    def test_right_and_wrong_passphrases(self) -> None:
        """The right passphrase gives True, another False."""
        conf = make_conf(PASSPHRASE)
        self.assertIs(verify_conf(conf, PASSPHRASE), True)
        self.assertIs(verify_conf(conf, OTHER_PASSPHRASE), False)

    def test_unknown_schemes_are_not_judged(self) -> None:
        """Unknown versions, flags, costs or garbage give None (the mount decides)."""
        body = json.loads(make_conf(PASSPHRASE))
        huge = dict(body, ScryptObject=dict(body["ScryptObject"], N=2**22))
        cases = [
            b"",
            b"{",
            b"[]",
            json.dumps({"Version": 2}).encode(),
            make_conf(PASSPHRASE, version=1),
            make_conf(PASSPHRASE, flags=["HKDF", "GCMIV128", "AESSIV"]),
            make_conf(PASSPHRASE, flags=["GCMIV128"]),
            json.dumps(huge).encode(),
            json.dumps(dict(body, EncryptedKey="AAAA")).encode(),
        ]
        for conf in cases:
            with self.subTest(conf=conf[:40]):
                self.assertIsNone(verify_conf(conf, PASSPHRASE))


class MountinfoTests(SynchronousTestCase):
    """read_mountinfo."""

    def test_mountpoints_are_read_and_unescaped(self) -> None:
        """Field 5 of each line is a mountpoint; octal escapes (spaces) are decoded."""
        path = Path(self.mktemp())
        path.write_bytes(
            b"22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
            b"42 27 0:39 / /state/volumes/mounts/my\\040vol rw - fuse.gocryptfs /c rw\n"
            b"short line\n"
        )
        self.assertEqual(read_mountinfo(str(path)), {"/proc", "/state/volumes/mounts/my vol"})

    def test_the_real_table_lists_the_root(self) -> None:
        """This process's own mountinfo lists /."""
        self.assertIn("/", read_mountinfo())


class FromContextTests(SynchronousTestCase):
    """Building the adapter for the ``volumes`` slot."""

    def context(self, **config: Any) -> SubsystemContext:
        base = {
            "gocryptfs": "/bin/true",
            "fusermount": "/bin/true",
            "fuse_device": __file__,
            "scrypt_logn": 12,
            "mount_timeout": 3.0,
            "unmount_timeout": 4.0,
            "kill_grace": 1.0,
        }
        base.update(config)
        kernel = types.SimpleNamespace(
            reactor=FakeProcessReactor(FakeTools()), state_dir=Path(self.mktemp())
        )
        return SubsystemContext(
            slot="volumes",
            variant="gocryptfs",
            kernel=kernel,
            config=base,  # type: ignore[arg-type]
        )

    def test_builds_with_the_configured_settings(self) -> None:
        """Tools are resolved to paths and the settings applied."""
        adapter = GocryptfsVolumes.from_context(self.context())
        self.assertEqual(adapter.gocryptfs, "/bin/true")
        self.assertEqual((adapter.scrypt_logn, adapter.mount_timeout), (12, 3.0))

    def test_missing_tools_and_fuse_are_one_config_error(self) -> None:
        """A missing gocryptfs, fusermount and /dev/fuse are all reported together."""
        with self.assertRaises(ConfigError) as cm:
            GocryptfsVolumes.from_context(
                self.context(
                    gocryptfs="no-such-gocryptfs",
                    fusermount="no-such-fusermount",
                    fuse_device="/nonexistent/fuse",
                )
            )
        joined = "\n".join(cm.exception.errors)
        self.assertIn("no-such-gocryptfs", joined)
        self.assertIn("no-such-fusermount", joined)
        self.assertIn("/nonexistent/fuse", joined)
        self.assertEqual(len(cm.exception.errors), 3)
