# mypy: disable-error-code="no-untyped-call"
"""
The remote manager on a Clock: the real bus, registry, dispatcher (lock
and leader gates) and job runner, the ``store.remote.*`` commands answered
from memory, the stub or the ssh tunnel (over a fake SSH server at the
transport seam), and a fake ACME server issuing real certificates.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import (
    STORE_WRITE_RETRIES,
    AddRemoteAlias,
    Command,
    ConfigureRemote,
    DisableRemote,
    GetAcmeChallenge,
    GetRemoteStatus,
    ListRemoteAliases,
    ListRemoteCertificates,
    RemoteAcmeConfig,
    RemoteExposure,
    RemoteStatus,
    RemoteTunnelConfig,
    RemoveRemoteAlias,
    RenewRemoteCertificate,
    RotateRemoteDeviceKey,
)
from piccolod.errors import (
    Conflict,
    InvalidCommand,
    Locked,
    NotFound,
    NotLeader,
    NotReady,
    TransientError,
    Unavailable,
)
from piccolod.events import HealthLevel, RemoteConfigChanged, Role
from piccolod.interfaces import Backoff, JobState
from piccolod.remote.acme import AcmeFailure
from piccolod.remote.events import RemoteCertificateChanged, RemoteRouteChanged
from piccolod.remote.keys import openssh_fingerprint
from piccolod.remote.manager import ManagerConfig
from piccolod.remote.model import RemoteState
from piccolod.remote.ssh import SSHTunnelService
from piccolod.remote.stub import StubTunnel
from piccolod.remote.testing import (
    FakeAcmeBackend,
    FakeSSHServer,
    InlinePool,
    RemoteHarness,
    ThreadlessReactor,
)

START = 1_700_000_000.0
DAY = 86400.0
PORTAL = "portal.example.net"
BLOG = "blog.example.net"


def configuration(**changes: Any) -> ConfigureRemote:
    values: dict[str, Any] = {
        "tunnels": (RemoteTunnelConfig(host="tunnel.example", user="piccolo"),),
        "portal_hostname": PORTAL,
        "https_port": 443,
        "expose": (RemoteExposure("blog", "web", 8081, BLOG),),
        "acme": RemoteAcmeConfig("https://acme.example/dir"),
    }
    values.update(changes)
    return ConfigureRemote(**values)


class ManagerCase(SynchronousTestCase):
    """A started manager, unlocked, leading everything, the blog listener published."""

    ssh = False
    config = ManagerConfig(
        tls_listen="tcp:8443:interface=127.0.0.1",
        acme_retry_initial=10.0,
        acme_retry_max=60.0,
        acme_retries=3,
        renew_check_interval=3600.0,
    )

    def setUp(self) -> None:
        self.reactor = ThreadlessReactor()
        self.reactor.advance(START)
        self.acme = FakeAcmeBackend(now=self.reactor.seconds)
        self.server = FakeSSHServer(self.reactor)
        tunnel = self._ssh if self.ssh else (lambda health: StubTunnel(self.reactor, health))
        self.h = RemoteHarness.build(
            self.reactor,
            tunnel=tunnel,
            pool=InlinePool(),
            acme_backend=self.acme,
            config=self.config,
            rand=lambda: 0.5,
        )
        self.acme.validate = self.h.manager.challenge
        self.events: list[Any] = []
        self.h.bus.subscribe("remote.#", lambda envelope: self.events.append(envelope.event))
        self.h.start()
        self.addCleanup(self._stop)
        self.h.lead("control-plane")
        self.h.lead("app:blog")
        self.h.publish_route("blog", "web", 35001)
        self.h.unlock()
        self.settle()

    def _ssh(self, health: Any) -> SSHTunnelService:
        return SSHTunnelService(
            self.reactor,
            health,
            backoff=Backoff(initial=1.0, maximum=8.0, jitter=0.0),
            endpoint=self.server.endpoint,
            protocol_factory=self.server.protocol,
            connect_target=self.server.endpoint,
        )

    def _stop(self) -> None:
        d = Deferred.fromCoroutine(self.h.stop())
        self.settle()
        self.successResultOf(d)
        self.reactor.advance(10)  # a stopping tunnel's grace timer, if any
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def settle(self) -> None:
        for _ in range(1000):
            now = self.reactor.seconds()
            if not any(c.getTime() <= now for c in self.reactor.getDelayedCalls()):
                return
            self.reactor.advance(0)
        raise AssertionError("the reactor never settled")

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.settle()

    def run_command(self, command: Command) -> Any:
        d = self.h.dispatch(command)
        self.settle()
        return self.successResultOf(d)

    def fail_command(self, command: Command, *errors: type[BaseException]) -> Any:
        d = self.h.dispatch(command)
        self.settle()
        return self.failureResultOf(d, *errors).value

    def stored(self) -> RemoteState:
        assert self.h.store.record is not None
        return RemoteState.from_record(self.h.store.record)

    def status(self) -> RemoteStatus:
        result: RemoteStatus = self.run_command(GetRemoteStatus())
        return result

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def certificate(self, hostname: str) -> dict[str, Any]:
        return next(c for c in self.status().certificates if c["hostname"] == hostname)


class LockTests(ManagerCase):
    def setUp(self) -> None:
        super().setUp()

    def test_every_command_is_locked_before_unlock(self) -> None:
        """Before storage is unlocked, remote reads and writes fail with Locked (423)."""
        self.h.lock()
        self.settle()
        for command in (
            GetRemoteStatus(),
            configuration(),
            DisableRemote(),
            AddRemoteAlias(hostname="x.example.net"),
            RemoveRemoteAlias(hostname="x.example.net"),
            ListRemoteAliases(),
            ListRemoteCertificates(),
            RenewRemoteCertificate(),
            RotateRemoteDeviceKey(),
        ):
            error = self.fail_command(command, Locked)
            self.assertEqual(error.status, 423, command)

    def test_unconfigured_after_unlock(self) -> None:
        """Unlocked with nothing stored, the status says unconfigured and nothing is exposed."""
        status = self.status()
        self.assertEqual(
            (status.state, status.enabled, status.revision), ("unconfigured", False, 0)
        )
        self.assertEqual(self.h.tunnel.exposed(), {})
        self.assertEqual(status.device_public_key, "")
        acme = self.h.health.component("remote.acme")
        self.assertEqual((acme.level, acme.message), (HealthLevel.OK, "no certificates configured"))

    def test_lock_stops_tunnels_routes_and_forgets_secrets(self) -> None:
        """Locking withdraws every route, stops tunnels and TLS, and drops secrets from memory."""
        self.run_command(configuration())
        self.assertEqual(self.certificate(PORTAL)["state"], "ok")
        self.assertNotEqual(self.h.tunnel.exposed(), {})
        self.assertIsNotNone(self.h.manager.status().tls_port)
        self.events.clear()

        self.h.lock()
        self.settle()
        self.assertEqual(self.h.tunnel.exposed(), {})
        withdrawn = {e.target for e in self.of(RemoteRouteChanged) if e.withdrawn}
        self.assertEqual(withdrawn, {"portal", "blog/web"})
        self.assertEqual(self.h.manager.routes(), [])
        self.assertIsNone(self.h.manager.tls.port)
        self.assertEqual(self.h.manager.tls.contexts, {})
        self.assertIsNone(self.h.manager._state)  # no device key, no account key in memory
        self.fail_command(GetRemoteStatus(), Locked)

    def test_unlock_again_reloads_the_stored_record(self) -> None:
        """After lock and unlock, the same configuration and keys come back from the store."""
        before = self.run_command(configuration())
        self.h.lock()
        self.settle()
        self.h.unlock()
        self.settle()
        after = self.status()
        self.assertEqual(after.device_public_key, before.device_public_key)
        self.assertEqual(after.revision, self.stored().revision)
        self.assertEqual(after.state, "active")
        self.assertNotEqual(self.h.tunnel.exposed(), {})

    def test_store_locked_during_a_write_leaves_nothing_changed(self) -> None:
        """A write the store refuses (locked meanwhile) changes nothing in memory."""
        self.h.store.fail_saves.append(Locked("locked meanwhile"))
        self.fail_command(configuration(), Locked)
        self.assertIsNone(self.h.store.record)
        self.assertEqual(self.status().state, "unconfigured")
        self.assertEqual(self.of(RemoteConfigChanged)[-1].changed, ("loaded",))


class ConfigureTests(ManagerCase):
    def test_configure_stores_and_publishes(self) -> None:
        """configure stores one revision with a new device key and publishes remote.config."""
        status = self.run_command(configuration())
        self.assertTrue(status.enabled)
        self.assertTrue(status.device_public_key.startswith("ssh-ed25519 "))
        stored = self.stored()
        self.assertTrue(stored.device_key.startswith("-----BEGIN OPENSSH PRIVATE KEY-----"))
        self.assertEqual(stored.settings.portal_hostname, PORTAL)
        first = next(e for e in self.of(RemoteConfigChanged) if e.changed != ("loaded",))
        self.assertTrue(first.enabled)
        self.assertEqual(first.revision, 1)
        self.assertIn("tunnels", first.changed)
        self.assertIn("device_key", first.changed)
        self.assertNotIn("PRIVATE", repr(status))  # no secret in the answer

    def test_same_configuration_twice_stores_and_publishes_nothing(self) -> None:
        """Configuring what is already configured is not a change: no write, no event."""
        self.run_command(configuration())
        saves, published = self.h.store.saves, len(self.of(RemoteConfigChanged))
        self.run_command(configuration())
        self.assertEqual(self.h.store.saves, saves)
        self.assertEqual(len(self.of(RemoteConfigChanged)), published)

    def test_routes_and_forwards(self) -> None:
        """The portal and the listener are forwarded on every tunnel, and https to the TLS port."""
        status = self.run_command(configuration())
        routes = {r["target"]: r for r in status.routes}
        self.assertEqual(routes["portal"]["mode"], "local")
        self.assertEqual((routes["portal"]["host"], routes["portal"]["port"]), ("127.0.0.1", 8080))
        self.assertEqual(routes["blog/web"]["port"], 35001)
        self.assertEqual(routes["blog/web"]["hostnames"], [BLOG])
        forwards = {f["name"]: f for f in self.h.tunnel.exposed()["default"]}
        self.assertEqual(set(forwards), {"portal", "app:blog/web", "https"})
        self.assertEqual(forwards["https"]["target_port"], 8443)
        self.assertEqual(forwards["app:blog/web"]["bind_port"], 8081)
        self.assertEqual(status.state, "active")
        self.assertEqual(self.h.health.component("remote").level, HealthLevel.OK)

    def test_invalid_configurations_are_refused(self) -> None:
        """Duplicate ports, names or hostnames and bad fingerprints never become commands."""
        bad: list[dict[str, Any]] = [
            {"portal_port": 8081},  # the blog's remote port
            {"https_port": 8081},
            {"portal_hostname": BLOG},
            {"tunnels": (RemoteTunnelConfig("a", "u"), RemoteTunnelConfig("b", "u"))},
        ]
        for changes in bad:
            with self.assertRaises(InvalidCommand, msg=changes):
                configuration(**changes)
        for fingerprint in ("MD5:aa", "SHA256:short", "SHA256:" + "=" * 43):
            with self.assertRaises(InvalidCommand):
                RemoteTunnelConfig("h", "u", host_key=fingerprint)
        with self.assertRaises(InvalidCommand):
            RemoteExposure("Blog", "web")
        with self.assertRaises(InvalidCommand):
            RemoteAcmeConfig("http://insecure.example/dir")

    def test_writes_need_the_control_plane_leadership(self) -> None:
        """On a follower, writes are refused with NotLeader and the leader's address."""
        self.h.follow("control-plane", "http://10.0.0.2:8080")
        self.settle()
        error = self.fail_command(configuration(), NotLeader)
        self.assertEqual(error.leader_hint, "http://10.0.0.2:8080")
        self.assertEqual(self.status().state, "unconfigured")  # reads still work

    def test_disable_keeps_the_configuration(self) -> None:
        """disable stops every tunnel but keeps config and keys; configure enables again."""
        self.run_command(configuration())
        status = self.run_command(DisableRemote())
        self.assertEqual((status.state, status.enabled), ("disabled", False))
        self.assertEqual(self.h.tunnel.exposed(), {})
        self.assertEqual(status.routes, ())
        self.assertFalse(self.stored().enabled)
        self.assertEqual(self.stored().settings.portal_hostname, PORTAL)
        self.assertEqual(self.run_command(configuration()).state, "active")

    def test_store_without_remote_handlers(self) -> None:
        """Without store.remote.* handlers, remote access is unavailable (503), health says why."""
        self.h.store.unregister()
        self.h.lock()
        self.settle()
        self.h.unlock()
        self.settle()
        error = self.fail_command(GetRemoteStatus(), Unavailable)
        self.assertEqual(error.status, 503)
        component = self.h.health.component("remote")
        self.assertIn("store.remote.load", component.message)
        self.h.store.register()  # so that the cleanup can unregister them

    def test_tls_listen_failure_is_reported_and_retried(self) -> None:
        """A TLS port that cannot be bound shows in health; the next change tries again."""
        from twisted.internet.error import CannotListenError

        listen = self.reactor.listenTCP

        def refuse(port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
            raise CannotListenError(interface, port, OSError("address in use"))

        self.reactor.listenTCP = refuse  # type: ignore[method-assign]
        self.run_command(configuration())
        component = self.h.health.component("remote")
        self.assertEqual(component.level, HealthLevel.WARN)
        self.assertIn("cannot listen", component.message)
        self.assertIsNone(self.status().tls_port)
        self.assertNotIn("https", {f["name"] for f in self.h.tunnel.exposed()["default"]})
        self.flushLoggedErrors()
        self.reactor.listenTCP = listen  # type: ignore[method-assign]
        self.run_command(AddRemoteAlias(hostname="www.example.net"))
        self.assertEqual(self.status().tls_port, 8443)
        self.assertEqual(self.h.health.component("remote").level, HealthLevel.OK)
        self.assertIn("https", {f["name"] for f in self.h.tunnel.exposed()["default"]})

    def test_corrupt_record(self) -> None:
        """A stored record of another layout is reported, never overwritten."""
        self.h.store.record = {"version": 99}
        self.h.lock()
        self.settle()
        self.h.unlock()
        self.settle()
        self.fail_command(GetRemoteStatus(), NotReady)
        self.fail_command(configuration(), NotReady)
        self.assertEqual(self.h.store.record, {"version": 99})
        component = self.h.health.component("remote")
        self.assertEqual(component.level, HealthLevel.WARN)  # a restart would not help
        self.assertIn("unusable", component.message)


class RouteTests(ManagerCase):
    def setUp(self) -> None:
        super().setUp()
        self.run_command(configuration(https_port=None, acme=None, portal_hostname=""))
        self.events.clear()

    def forwards(self) -> dict[str, dict[str, Any]]:
        return {f["name"]: f for f in self.h.tunnel.exposed().get("default", [])}

    def test_follower_routes_via_the_leader(self) -> None:
        """When another node leads the app, its route goes to the leader's host."""
        self.h.follow("app:blog", "http://10.0.0.2:8080")
        self.settle()
        (event,) = [e for e in self.of(RemoteRouteChanged) if e.target == "blog/web"]
        self.assertEqual((event.mode, event.host, event.port), ("leader", "10.0.0.2", 35001))
        forward = self.forwards()["app:blog/web"]
        self.assertEqual((forward["target_host"], forward["target_port"]), ("10.0.0.2", 35001))
        self.assertEqual(forward["bind_port"], 8081)

    def test_portal_via_the_control_plane_leader(self) -> None:
        """A follower of control-plane forwards the portal to the leader's API address."""
        self.h.follow("control-plane", "http://10.0.0.3:9090")
        self.settle()
        forward = self.forwards()["portal"]
        self.assertEqual((forward["target_host"], forward["target_port"]), ("10.0.0.3", 9090))

    def test_unknown_leader_makes_the_route_unavailable(self) -> None:
        """Unknown role or leader address: unavailable with a reason, and not forwarded."""
        self.h.registry.update("app:blog", Role.UNKNOWN, 5)
        self.settle()
        route = next(r for r in self.status().routes if r["target"] == "blog/web")
        self.assertEqual(route["mode"], "unavailable")
        self.assertIn("no leader", route["reason"])
        self.assertNotIn("app:blog/web", self.forwards())
        self.assertEqual(self.status().state, "degraded")
        self.assertEqual(self.h.health.component("remote").level, HealthLevel.WARN)
        self.h.follow("app:blog", None, term=6)
        self.settle()
        route = next(r for r in self.status().routes if r["target"] == "blog/web")
        self.assertIn("no known address", route["reason"])

    def test_listener_follows_route_publication(self) -> None:
        """A withdrawn listener is unexposed; published again on a new port, it comes back."""
        self.h.publish_route("blog", "web", 35001, withdrawn=True)
        self.settle()
        self.assertNotIn("app:blog/web", self.forwards())
        self.h.publish_route("blog", "web", 35009)
        self.settle()
        self.assertEqual(self.forwards()["app:blog/web"]["target_port"], 35009)
        ports = [e.port for e in self.of(RemoteRouteChanged) if e.target == "blog/web"]
        self.assertEqual(ports, [0, 35009])

    def test_unrelated_events_publish_nothing(self) -> None:
        """Leadership of other resources and repeated publications change no route."""
        before = self.h.tunnel.applied[-1]
        saves = self.h.store.saves
        self.h.lead("app:other")
        self.h.publish_route("blog", "web", 35001)
        self.settle()
        self.assertEqual(self.of(RemoteRouteChanged), [])
        self.assertEqual(self.h.tunnel.applied[-1], before)
        self.assertEqual(self.h.store.saves, saves)


class SSHManagerTests(ManagerCase):
    ssh = True

    def connections(self) -> int:
        return len(self.server.attempts)

    def test_host_key_pinned_on_first_connection(self) -> None:
        """With no pin configured, the first key seen is stored, without reconnecting."""
        self.run_command(configuration(acme=None))
        fingerprint = openssh_fingerprint(self.server.host_key)
        self.assertEqual(self.stored().settings.tunnels[0].host_key, fingerprint)
        self.assertEqual(self.status().config["tunnels"][0]["host_key"], fingerprint)
        self.assertEqual(self.connections(), 1)
        self.assertEqual(self.status().state, "active")
        pinned = [e for e in self.of(RemoteConfigChanged) if e.changed == ("tunnels",)]
        self.assertEqual(len(pinned), 1)

    def test_unchanged_tunnels_are_not_restarted(self) -> None:
        """Exposures and aliases change forwards live; only connection settings reconnect."""
        self.run_command(configuration(acme=None))
        self.assertEqual(self.connections(), 1)
        self.h.publish_route("shop", "web", 35002)
        self.h.lead("app:shop")
        exposures = (RemoteExposure("blog", "web", 8081), RemoteExposure("shop", "web", 8082))
        self.run_command(configuration(acme=None, expose=exposures))
        self.run_command(AddRemoteAlias(hostname="www.example.net", target="portal"))
        self.assertEqual(self.connections(), 1)
        self.assertIn(("forward", "127.0.0.1", 8082), self.server.requests)
        changes = [e.changed for e in self.of(RemoteConfigChanged)]
        self.assertIn(("expose",), changes)
        self.assertIn(("aliases",), changes)
        # A new keepalive setting is a connection setting: that tunnel reconnects.
        tunnel = attrs.evolve(self.stored().settings.tunnels[0], keepalive_interval=5.0)
        self.run_command(configuration(acme=None, expose=exposures, tunnels=(tunnel,)))
        self.assertEqual(self.connections(), 2)

    def test_reconfigure_keeps_the_pin_of_the_same_server(self) -> None:
        """Without host_key, an unchanged server keeps its pin; a new server is pinned anew."""
        self.run_command(configuration(acme=None))
        pinned = self.stored().settings.tunnels[0].host_key
        self.run_command(configuration(acme=None, https_port=None))
        self.assertEqual(self.stored().settings.tunnels[0].host_key, pinned)
        self.server.host_key = b"another server"
        other = RemoteTunnelConfig(host="elsewhere.example", user="piccolo")
        self.run_command(configuration(acme=None, tunnels=(other,)))
        self.assertEqual(
            self.stored().settings.tunnels[0].host_key, openssh_fingerprint(b"another server")
        )

    def test_changed_host_key_is_refused_until_repinned(self) -> None:
        """A server presenting another key is refused and not retried; a new pin reconnects."""
        self.run_command(configuration(acme=None))
        self.server.host_key = b"an impostor"
        self.server.drop_all()
        self.advance(1.0)  # the reconnect, after its backoff
        status = self.status()
        self.assertEqual(status.state, "error")
        self.assertEqual(status.tunnels[0]["state"], "refused")
        attempts = self.connections()
        self.advance(600)
        self.assertEqual(self.connections(), attempts)
        self.assertEqual(self.h.health.component("remote.tunnel.default").level, HealthLevel.ERROR)
        new = openssh_fingerprint(b"an impostor")
        tunnel = RemoteTunnelConfig(host="tunnel.example", user="piccolo", host_key=new)
        self.run_command(configuration(acme=None, tunnels=(tunnel,)))
        self.assertEqual(self.connections(), attempts + 1)
        self.assertEqual(self.status().state, "active")

    def test_rotating_the_device_key_reconnects(self) -> None:
        """A new device key is stored, shown, and used by a new connection."""
        before = self.run_command(configuration(acme=None))
        after = self.run_command(RotateRemoteDeviceKey())
        self.assertNotEqual(after.device_public_key, before.device_public_key)
        self.assertEqual(self.connections(), 2)
        self.assertEqual(len(self.server.live()), 1)


class CertificateTests(ManagerCase):
    def test_issued_as_jobs_and_served(self) -> None:
        """Each hostname gets a certificate from an acme job; TLS serves it with SNI."""
        self.run_command(configuration())
        for hostname in (PORTAL, BLOG):
            entry = self.certificate(hostname)
            self.assertEqual(entry["state"], "ok")
            job = self.h.jobs.get(entry["job_id"])
            self.assertEqual((job.job_class, job.state), ("acme", JobState.SUCCEEDED))
        stored = self.stored()
        self.assertEqual(set(stored.certificates), {PORTAL, BLOG})
        self.assertTrue(stored.account_key)
        self.assertEqual(stored.account_uri, "https://acme.test/acct/1")
        tls = self.h.manager.tls
        self.assertEqual(set(tls.contexts), {PORTAL, BLOG})
        self.assertEqual(tls.routes[BLOG], ("127.0.0.1", 35001))
        self.assertEqual(tls.routes[PORTAL], ("127.0.0.1", 8080))
        self.assertEqual(len(self.acme.validated), 2)  # each token was published when asked
        self.assertEqual(self.h.manager._challenges, {})  # and withdrawn after
        acme = self.h.health.component("remote.acme")
        self.assertEqual(
            (acme.level, acme.message), (HealthLevel.OK, "2 certificate(s), none failing")
        )

    def test_challenge_served_only_while_pending(self) -> None:
        """remote.acme_challenge answers a pending token's key authorization, else NotFound."""
        seen: list[str | None] = []

        def validate(token: str) -> str | None:
            seen.append(self.h.manager.challenge(token))
            return seen[-1]

        self.acme.validate = validate
        self.run_command(configuration(expose=()))
        self.assertEqual(seen, [f"keyauth-{PORTAL}"])
        self.fail_command(GetAcmeChallenge(token="token-1"), NotFound)
        with self.assertRaises(InvalidCommand):
            GetAcmeChallenge(token="../../etc/passwd")

    def test_failing_challenge_reported_retried_with_backoff(self) -> None:
        """A failed attempt is reported, retried after the backoff, and stores nothing meanwhile."""
        self.acme.failures = [AcmeFailure("the HTTP-01 challenge failed: 404")] * 2
        self.run_command(configuration(expose=()))
        entry = self.certificate(PORTAL)
        self.assertEqual(entry["state"], "error")
        self.assertIn("HTTP-01", entry["last_error"])
        self.assertEqual(self.h.health.component("remote.acme").level, HealthLevel.WARN)
        self.assertEqual(self.stored().certificates, {})
        self.assertEqual(self.h.manager.tls.contexts, {})
        job = self.h.jobs.get(entry["job_id"])
        self.assertEqual(job.state, JobState.QUEUED)
        self.assertEqual(job.retry_at, START + 10.0)  # acme_retry_initial, no jitter here
        errors = [e for e in self.of(RemoteCertificateChanged) if e.state == "error"]
        self.assertEqual([(e.hostname, e.attempt) for e in errors], [(PORTAL, 1)])

        self.advance(9.9)
        self.assertEqual(self.certificate(PORTAL)["attempt"], 1)
        self.advance(0.1)
        self.assertEqual(self.certificate(PORTAL)["attempt"], 2)  # failed again
        self.advance(20.0)  # second backoff: 20 s
        entry = self.certificate(PORTAL)
        self.assertEqual((entry["state"], entry["attempt"], entry["failures"]), ("ok", 3, 2))
        self.assertEqual(set(self.stored().certificates), {PORTAL})
        self.assertEqual(self.h.health.component("remote.acme").level, HealthLevel.OK)

    def test_a_failed_store_write_leaves_no_half_certificate(self) -> None:
        """If storing the issued certificate fails, neither key nor chain is kept anywhere."""
        d = self.h.dispatch(configuration(expose=()))  # stored now; the job runs next turn
        self.successResultOf(d)
        # The account key's write succeeds; the certificate's fails, retries included.
        failures = [TransientError("disk hiccup")] * (1 + STORE_WRITE_RETRIES)
        self.h.store.fail_saves += [None, *failures]
        for _ in range(10):  # the dispatcher's retries: 0.05 + 0.1 + 0.2 s
            self.advance(0.1)
        self.assertEqual(self.h.store.fail_saves, [])
        entry = self.certificate(PORTAL)
        self.assertEqual(entry["state"], "error")
        state = self.stored()
        self.assertEqual(state.certificates, {})
        self.assertNotIn(PORTAL, self.h.manager.tls.contexts)
        self.advance(10.0)
        self.assertEqual(self.certificate(PORTAL)["state"], "ok")
        self.assertIn(PORTAL, self.stored().certificates)

    def test_a_transient_store_failure_is_retried(self) -> None:
        """One failed write of the issued certificate is retried by the dispatcher: it is kept."""
        self.successResultOf(self.h.dispatch(configuration(expose=())))
        self.h.store.fail_saves += [None, TransientError("disk hiccup")]
        for _ in range(10):
            self.advance(0.1)
        self.assertEqual(self.h.store.fail_saves, [])
        self.assertEqual(self.certificate(PORTAL)["state"], "ok")
        self.assertIn(PORTAL, self.stored().certificates)

    def test_renewal_within_the_window(self) -> None:
        """The periodic check renews a certificate only once it expires within renew_before_days."""
        self.run_command(configuration(expose=()))
        first = self.certificate(PORTAL)["serial"]
        self.advance(59 * DAY)  # 31 days left: not due yet
        self.assertEqual(self.certificate(PORTAL)["serial"], first)
        self.advance(2 * DAY)  # 29 days left: due at the next check
        renewed = self.certificate(PORTAL)
        self.assertNotEqual(renewed["serial"], first)
        self.assertEqual(renewed["state"], "ok")
        self.assertEqual(self.stored().certificates[PORTAL].serial, renewed["serial"])
        self.assertEqual(len(self.acme.issued), 2)

    def test_renew_command_forces_issuance(self) -> None:
        """remote.certificates.renew issues now, for one hostname or all."""
        self.run_command(configuration())
        started = self.run_command(RenewRemoteCertificate(hostname=BLOG))
        self.assertEqual(len(started.job_ids), 1)
        self.settle()
        self.assertEqual(len(self.acme.issued), 3)
        self.fail_command(RenewRemoteCertificate(hostname="nope.example.net"), NotFound)
        self.run_command(configuration(acme=None))
        self.fail_command(RenewRemoteCertificate(), Conflict)

    def test_lock_during_issuance_stores_nothing(self) -> None:
        """A lock while an issuance waits for its retry cancels it; nothing is stored."""
        self.acme.failures = [AcmeFailure("try later")]
        self.run_command(configuration(expose=()))
        job_id = self.certificate(PORTAL)["job_id"]
        self.h.lock()
        self.settle()
        self.assertEqual(self.h.jobs.get(job_id).state, JobState.CANCELLED)
        self.advance(3600)
        self.assertEqual(self.stored().certificates, {})


class AliasTests(ManagerCase):
    def test_add_list_remove(self) -> None:
        """Aliases are stored, get a certificate and a TLS route, and go with theirs."""
        self.run_command(configuration())
        result = self.run_command(AddRemoteAlias(hostname="www.example.net", target="blog/web"))
        self.assertEqual(result.aliases, ({"hostname": "www.example.net", "target": "blog/web"},))
        self.assertEqual(self.certificate("www.example.net")["state"], "ok")
        self.assertEqual(self.h.manager.tls.routes["www.example.net"], ("127.0.0.1", 35001))
        listed = self.run_command(ListRemoteAliases())
        self.assertEqual(len(listed.aliases), 1)
        self.run_command(RemoveRemoteAlias(hostname="www.example.net"))
        self.assertNotIn("www.example.net", self.stored().certificates)
        self.assertNotIn("www.example.net", self.h.manager.tls.contexts)
        self.fail_command(RemoveRemoteAlias(hostname="www.example.net"), NotFound)

    def test_hostname_conflicts(self) -> None:
        """An alias cannot take a hostname in use, nor a configuration an alias's."""
        self.run_command(configuration())
        self.fail_command(AddRemoteAlias(hostname=BLOG), Conflict)
        self.run_command(AddRemoteAlias(hostname="www.example.net"))
        self.fail_command(configuration(portal_hostname="www.example.net"), Conflict)
        with self.assertRaises(InvalidCommand):
            AddRemoteAlias(hostname="www.example.net", target="no-slash")
        with self.assertRaises(InvalidCommand):
            AddRemoteAlias(hostname="UPPER.example.net")

    def test_certificates_listed(self) -> None:
        """remote.certificates.list shows every hostname with its state and expiry."""
        self.run_command(configuration())
        listed = self.run_command(ListRemoteCertificates())
        self.assertEqual({c["hostname"] for c in listed.certificates}, {PORTAL, BLOG})
        self.assertTrue(all(c["not_after"] == START + 90 * DAY for c in listed.certificates))
