"""
Real etcd clusters and piccolod nodes on loopback, for the etcd
integration tests and ``benchmarks/failover.py``.

:class:`EtcdCluster` starts 1 or 3 members of Debian's ``etcd`` on free
loopback ports with temporary data dirs, waits for ``/health`` with a
deadline, and stops, kills (``SIGKILL``), pauses (``SIGSTOP``) and restarts
members by PID.  :class:`PiccolodNode` runs ``twistd -n piccolod`` with
``consensus=etcd`` on its own port and state dir, pre-provisioned with an
operator API token (so no storage setup is needed), and reads its
leadership and runs commands through the shipped API.

Only processes started here are ever signalled, and only by PID.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.integration.apiclient import APIClient, Reply
from tests.integration.support import REQUIRE, Daemon, poll

T = TypeVar("T")

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
#: Fast failover for tests: etcd grants at least 2 s with its default timings.
TTL = 2
RENEW_DEADLINE = 1.5
RETRY_PERIOD = 0.3
REQUEST_TIMEOUT = 0.6
PREFIX = "/piccolod-test"


def have_etcd() -> bool:
    return shutil.which("etcd") is not None


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def etcd_call(endpoint: str, path: str, body: Any, timeout: float = 3.0) -> Any:
    """One JSON gateway call (``/v3/<path>``) with urllib; returns the decoded answer."""
    request = urllib.request.Request(
        f"{endpoint}/v3/{path}", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class EtcdMember:
    def __init__(self, name: str, client_port: int, peer_port: int, data_dir: Path) -> None:
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1.0) as response:
                return bool(json.loads(response.read()).get("health") in ("true", True))
        except (OSError, ValueError):
            return False


class EtcdCluster:
    """``size`` etcd members on loopback under ``root``."""

    def __init__(self, root: Path, size: int = 3, token: str | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * size)
        self.root = root
        self.token = token or f"piccolod-{secrets.token_hex(4)}"
        self.members = [
            EtcdMember(f"m{i}", ports[2 * i], ports[2 * i + 1], root / f"m{i}") for i in range(size)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _command(self, member: EtcdMember) -> list[str]:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            ETCD,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.endpoint,
            "--advertise-client-urls", member.endpoint,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
        ]  # fmt: skip

    def start_member(self, index: int) -> None:
        member = self.members[index]
        assert not member.running, f"{member.name} is running"
        log = open(member.log_path, "ab")
        member.proc = subprocess.Popen(
            self._command(member),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        member.paused = False

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for i in range(len(self.members)):
            self.start_member(i)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every running member reports a healthy cluster."""

        def ready() -> bool | None:
            for member in self.members:
                if member.proc is not None and member.proc.poll() is not None:
                    raise AssertionError(
                        f"etcd {member.name} exited with {member.proc.returncode}:\n"
                        + member.log_path.read_text(errors="replace")[-2000:]
                    )
            live = [m for m in self.members if m.running and not m.paused]
            return True if live and all(m.healthy() for m in live) else None

        poll(ready, timeout=timeout, interval=0.05, what="etcd health")

    def kill_member(self, index: int) -> None:
        """SIGKILL one member (by PID) and reap it."""
        member = self.members[index]
        if member.proc is not None and member.proc.poll() is None:
            if member.paused:
                os.kill(member.proc.pid, signal.SIGCONT)
            member.proc.kill()
            member.proc.wait(10)
        member.paused = False

    def pause_member(self, index: int) -> None:
        member = self.members[index]
        assert member.proc is not None
        os.kill(member.proc.pid, signal.SIGSTOP)
        member.paused = True

    def resume_member(self, index: int) -> None:
        member = self.members[index]
        assert member.proc is not None
        os.kill(member.proc.pid, signal.SIGCONT)
        member.paused = False

    def leader_index(self) -> int | None:
        """The member etcd elected (by ``maintenance/status``), or None without one."""
        for member in self.members:
            if not member.running or member.paused:
                continue
            try:
                status = etcd_call(member.endpoint, "maintenance/status", {}, timeout=1.0)
            except (OSError, ValueError):
                continue
            leader = status.get("leader")
            if not leader:
                continue
            for j, other in enumerate(self.members):
                if not other.running or other.paused:
                    continue
                try:
                    theirs = etcd_call(other.endpoint, "maintenance/status", {}, timeout=1.0)
                except (OSError, ValueError):
                    continue
                if theirs["header"]["member_id"] == leader:
                    return j
        return None

    def call(self, path: str, body: Any, timeout: float = 3.0) -> Any:
        """A gateway call on the first running member."""
        errors = []
        for member in self.members:
            if member.running and not member.paused:
                try:
                    return etcd_call(member.endpoint, path, body, timeout)
                except (OSError, ValueError) as e:
                    errors.append(f"{member.name}: {e}")
        raise AssertionError(f"no etcd member answered {path}: {errors}")

    def get_prefix(self, prefix: str) -> list[dict[str, Any]]:
        """Every key under ``prefix``: ``[{key, value, create_revision, mod_revision}]``."""
        raw = prefix.encode()
        end = raw[:-1] + bytes([raw[-1] + 1])
        answer = self.call("kv/range", {"key": b64(raw), "range_end": b64(end)})
        return [
            {
                "key": base64.b64decode(kv["key"]).decode(),
                "value": base64.b64decode(kv.get("value", "")).decode(),
                "create_revision": int(kv.get("create_revision", 0)),
                "mod_revision": int(kv.get("mod_revision", 0)),
            }
            for kv in answer.get("kvs", [])
        ]

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.kill_member(i)


class PiccolodNode:
    """``twistd -n piccolod --use consensus=etcd`` on its own port and state dir."""

    def __init__(
        self,
        root: Path,
        name: str,
        endpoints: Sequence[str],
        ttl: int = TTL,
        renew_deadline: float = RENEW_DEADLINE,
        retry_period: float = RETRY_PERIOD,
        request_timeout: float = REQUEST_TIMEOUT,
        prefix: str = PREFIX,
        extra: str = "",
    ) -> None:
        self.name = name
        self.state_dir = root / name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.port,) = free_ports(1)
        self.address = f"http://127.0.0.1:{self.port}"
        self.config = root / f"{name}.toml"
        endpoint_list = ", ".join(json.dumps(e) for e in endpoints)
        self.config.write_text(
            f"""
[daemon]
node_id = "{name}"

[subsystems.containers]
variant = "fake"

[subsystems.consensus]
variant = "etcd"
endpoints = [{endpoint_list}]
prefix = "{prefix}"
ttl = {ttl}
renew_deadline = {renew_deadline}
retry_period = {retry_period}
request_timeout = {request_timeout}
{extra}
"""
        )
        self.token = self._provision_token()
        self.api = APIClient(self.address, token=self.token, timeout=5.0)
        self.daemon: Daemon | None = None
        self.paused = False

    def _provision_token(self) -> str:
        """An operator API token written where the API's TokenStore reads it."""
        token_id = secrets.token_hex(6)
        token = f"pcd_{token_id}_{secrets.token_urlsafe(32)}"
        path = self.state_dir / "api" / "tokens.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "id": token_id,
            "name": "etcd-tests",
            "role": "operator",
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
            "created_at": time.time(),
            "expires_at": None,
        }
        path.write_text(json.dumps({"version": 1, "tokens": [record]}))
        path.chmod(0o600)
        return token

    def start(self) -> PiccolodNode:
        daemon = Daemon(self.state_dir, ["--config", str(self.config)])
        daemon.cmd[daemon.cmd.index("tcp:0:interface=127.0.0.1")] = (
            f"tcp:{self.port}:interface=127.0.0.1"
        )
        daemon.log_path = self.state_dir.parent / f"{self.name}.log"
        self.daemon = daemon.start()
        self.paused = False
        return self

    @property
    def pid(self) -> int:
        assert self.daemon is not None and self.daemon.proc is not None
        return self.daemon.proc.pid

    @property
    def alive(self) -> bool:
        return (
            self.daemon is not None
            and self.daemon.proc is not None
            and self.daemon.proc.poll() is None
        )

    def wait_serving(self, timeout: float = 30.0) -> None:
        def serving() -> bool | None:
            if not self.alive:
                raise AssertionError(f"{self.name} exited:\n{self.log()[-3000:]}")
            try:
                return True if self.api.get("/api/v1/health/live").status == 200 else None
            except OSError:
                return None

        poll(serving, timeout=timeout, interval=0.05, what=f"{self.name} serving")

    def kill(self) -> None:
        """SIGKILL (by PID)."""
        if self.daemon is not None:
            if self.paused and self.alive:
                os.kill(self.pid, signal.SIGCONT)
            self.daemon.kill()
        self.paused = False

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def log(self) -> str:
        return self.daemon.log() if self.daemon is not None else ""

    def leadership(self, resource: str = "control-plane", timeout: float = 2.0) -> dict[str, Any]:
        """This node's view of ``resource`` from ``GET /api/v1/leadership``."""
        client = APIClient(self.address, token=self.token, timeout=timeout)
        reply = client.get("/api/v1/leadership")
        assert reply.status == 200, reply
        for state in reply.body["resources"]:
            if state["resource"] == resource:
                return dict(state)
        return {"resource": resource, "role": "unknown", "term": 0, "leader_id": None}

    def command(self, name: str, body: dict[str, Any], timeout: float = 15.0) -> Reply:
        client = APIClient(self.address, token=self.token, timeout=timeout)
        return client.post(f"/api/v1/commands/{name}", body)


def roles(nodes: Sequence[PiccolodNode]) -> dict[str, dict[str, Any]]:
    """Every answering node's view of control-plane (nodes that do not answer are left out)."""
    out = {}
    for node in nodes:
        if not node.alive or node.paused:
            continue
        try:
            out[node.name] = node.leadership(timeout=1.0)
        except (OSError, AssertionError):
            continue
    return out


def leaders(nodes: Sequence[PiccolodNode]) -> list[str]:
    return [name for name, state in roles(nodes).items() if state["role"] == "leader"]


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02) -> T:
    return poll(check, timeout=timeout, interval=interval, what=what)


def renewals(node: PiccolodNode, resource: str = "control-plane") -> int:
    """How many keepalives of its ``resource`` lease ``node`` has had confirmed."""
    reply = APIClient(node.address, token=node.token, timeout=2.0).get("/api/v1/cluster")
    assert reply.status == 200, reply
    for state in reply.body["resources"]:
        if state["resource"] == resource:
            return int(state["renewals"])
    return 0


def wait_renewals(node: PiccolodNode, more: int, timeout: float) -> None:
    """
    Wait until ``node`` has had ``more`` further keepalives confirmed: time measured
    by the cluster itself (``more`` retry periods at least), not by a sleep.  Used to
    keep a SIGSTOPped old leader stopped well past its lease.
    """
    start = renewals(node)
    wait_for(
        lambda: True if renewals(node) >= start + more else None,
        timeout,
        f"{more} more confirmed keepalives on {node.name}",
    )


@contextlib.contextmanager
def running_cluster(
    root: Path, extra: str = ""
) -> Iterator[tuple[EtcdCluster, list[PiccolodNode]]]:
    """
    3 etcd members and 3 daemons (config ``extra``) for one test: skipped without
    etcd (failed with PICCOLOD_REQUIRE_INTEGRATION=1); afterwards no daemon may have
    logged a traceback, and everything started is killed by PID.
    """
    import pytest

    if not have_etcd():
        message = "etcd is not installed (apt-get install etcd-server etcd-client)"
        if REQUIRE:
            pytest.fail(message + " (PICCOLOD_REQUIRE_INTEGRATION=1)")
        pytest.skip(message)
    etcd = EtcdCluster(root / "etcd", size=3).start()
    nodes: list[PiccolodNode] = []
    try:
        nodes = start_nodes(root, etcd.endpoints, extra=extra)
        yield etcd, nodes
        for node in nodes:
            assert "Traceback" not in node.log(), node.log()[-5000:]
    finally:
        for node in nodes:
            node.kill()
        etcd.stop()


def start_nodes(
    root: Path, endpoints: Sequence[str], count: int = 3, extra: str = ""
) -> list[PiccolodNode]:
    nodes = [
        PiccolodNode(root, f"node-{chr(ord('a') + i)}", endpoints, extra=extra)
        for i in range(count)
    ]
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_serving()
    return nodes


def one_leader(nodes: Sequence[PiccolodNode], timeout: float = 30.0) -> tuple[str, int]:
    """Wait until exactly one node leads and every other answering node follows it."""

    def settled() -> tuple[str, int] | None:
        views = roles(nodes)
        lead = [(n, s) for n, s in views.items() if s["role"] == "leader"]
        if len(lead) != 1:
            return None
        name, state = lead[0]
        for other, view in views.items():
            if other != name and (
                view["role"] != "follower"
                or view["leader_id"] != name
                or view["term"] != state["term"]
            ):
                return None
        return name, int(state["term"])

    return wait_for(settled, timeout, "one leader and its followers", interval=0.05)


def fenced_put(node: PiccolodNode, key: str, value: str) -> Reply:
    return node.command("cluster.fenced_put", {"key": key, "value": value})


def failover_round(
    nodes: Sequence[PiccolodNode], number: int, acked: dict[str, str], deadline: float
) -> dict[str, Any]:
    """
    One kill -9 of the leader: write through it (acknowledged), kill it,
    time until a survivor leads at a greater term, check every write
    acknowledged so far is readable through the new leader, restart the
    killed node and wait until it follows.  Returns the figures.
    """
    by_name = {n.name: n for n in nodes}
    old, term = one_leader(nodes)
    key, value = f"acked/{number:03d}", f"round {number} by {old}"
    reply = fenced_put(by_name[old], key, value)
    assert reply.status == 200, reply
    acked[key] = value
    survivors = [n for n in nodes if n.name != old]
    start = time.monotonic()
    by_name[old].kill()

    def new_leader() -> tuple[str, int] | None:
        for node in survivors:
            try:
                state = node.leadership(timeout=1.0)
            except (OSError, AssertionError):
                continue
            if state["role"] == "leader" and state["term"] > term:
                return node.name, int(state["term"])
        return None

    new, new_term = wait_for(new_leader, deadline + 5.0, "a new leader", interval=0.02)
    took = time.monotonic() - start
    leader = by_name[new]
    for k, v in acked.items():
        got = leader.command("cluster.get", {"key": k})
        assert got.status == 200, got
        assert got.body["result"]["value"] == v, (k, got.body)
    by_name[old].start()
    by_name[old].wait_serving()
    one_leader(nodes)
    return {"round": number, "old": old, "new": new, "term": new_term, "seconds": took}


# --------------------------------------------------------------------------
# The replicated control store (setup on the leader, join, writes, reads)

#: A fast KDF for tests and benchmarks (the packaged Argon2 is Pi-sized),
#: and no per-token request quota (polling and benchmarks exceed 50/s).
FAST_STORAGE = """
[subsystems.persistence]
argon2_time_cost = 1
argon2_memory_kib = 1024
unlock_backoff_initial = 0.2
unlock_backoff_max = 2.0

[subsystems.api]
token_rate = 100000
token_burst = 100000
"""
ADMIN_PASSWORD = "correct horse battery"
COMMITS_PREFIX = f"{PREFIX}/data/control/commits/"


def cluster_view(node: PiccolodNode, timeout: float = 2.0) -> dict[str, Any]:
    """``GET /api/v1/cluster`` of ``node``."""
    client = APIClient(node.address, token=node.token, timeout=timeout)
    reply = client.get("/api/v1/cluster")
    assert reply.status == 200, reply
    return dict(reply.body)


def replication(node: PiccolodNode, timeout: float = 2.0) -> dict[str, Any]:
    """The ``backend.replication`` figures of ``node``'s cluster view."""
    return dict(cluster_view(node, timeout)["backend"]["replication"])


def set_setting(node: PiccolodNode, key: str, value: Any, timeout: float = 15.0) -> Reply:
    return node.command("store.settings.set", {"key": key, "value": value}, timeout=timeout)


def get_setting(node: PiccolodNode, key: str, timeout: float = 5.0) -> Any:
    """The setting's value through ``node`` (``KeyError`` when it has none)."""
    reply = node.command("store.settings.get", {"key": key}, timeout=timeout)
    if reply.status == 404:
        raise KeyError(key)
    assert reply.status == 200, reply
    return reply.body["result"]["value"]


def write_until_accepted(node: PiccolodNode, key: str, value: Any, timeout: float) -> Reply:
    """A write, retried while the leader is still catching up (503) or settling."""

    def accepted() -> Reply | None:
        reply = set_setting(node, key, value)
        if reply.status == 200:
            return reply
        assert reply.status in (409, 503), reply
        return None

    return wait_for(accepted, timeout, f"{node.name} accepts writes", interval=0.1)


def form_cluster(nodes: Sequence[PiccolodNode], password: str = ADMIN_PASSWORD) -> str:
    """
    Set up storage on the ``control-plane`` leader, then join every other
    node with ``POST /api/v1/cluster/join``; returns the leader's name once
    every node is unlocked and synced with the commit log.
    """
    by_name = {n.name: n for n in nodes}
    name, _ = one_leader(nodes)
    leader = by_name[name]
    reply = leader.api.post("/api/v1/auth/setup", {"password": password})
    assert reply.status == 201, reply
    for node in nodes:
        if node is leader:
            continue

        def joined(node: PiccolodNode = node) -> Reply | None:
            reply = APIClient(node.address, timeout=30.0).post(
                "/api/v1/cluster/join", {"password": password}
            )
            if reply.status == 404:  # the leader has not published the keyset yet
                return None
            assert reply.status == 200, reply
            return reply

        reply = wait_for(joined, 30.0, f"{node.name} joins", interval=0.2)
        assert reply.body["state"] == "unlocked", reply
    wait_for(
        lambda: True if all(replication(n)["lag"] == 0 for n in nodes) else None,
        30.0,
        "every node synced",
        interval=0.1,
    )
    return name


def commit_log(etcd: EtcdCluster) -> list[dict[str, Any]]:
    """The commit entries in etcd, in key order: ``{revision, term, kind}``."""
    out = []
    for kv in etcd.get_prefix(COMMITS_PREFIX):
        entry = json.loads(kv["value"])
        out.append(
            {
                "revision": entry["revision"],
                "term": entry["term"],
                "kind": entry["kind"],
                "mod_revision": kv["mod_revision"],
            }
        )
    return out
