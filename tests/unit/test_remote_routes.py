# mypy: disable-error-code="no-untyped-call"
"""The remote route table (pure functions): local, via the leader, unavailable; tunnel specs."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from piccolod.commands import ConfigureRemote, RemoteExposure, RemoteTunnelConfig
from piccolod.events import Role
from piccolod.interfaces import LeadershipState, TunnelForward
from piccolod.remote.model import Alias, RemoteState
from piccolod.remote.routes import compute_routes, split_address, tunnel_specs


@attrs.define
class Leadership:
    """A table of LeadershipState by resource (unknown when absent)."""

    states: dict[str, LeadershipState] = attrs.field(factory=dict)

    def set(self, resource: str, role: Role, address: str | None = None) -> None:
        self.states[resource] = LeadershipState(resource, role, "n", address, 1)

    def is_leader(self, resource: str) -> bool:
        return self.state(resource).role is Role.LEADER

    def state(self, resource: str) -> LeadershipState:
        return self.states.get(resource, LeadershipState(resource))


def state(**settings: Any) -> RemoteState:
    values: dict[str, Any] = {
        "tunnels": (RemoteTunnelConfig("t.example", "u"),),
        "portal_hostname": "portal.example.net",
        "expose": (
            RemoteExposure("blog", "web", 8081, "blog.example.net"),
            RemoteExposure("shop", "api", 0),
        ),
    }
    values.update(settings)
    return RemoteState(
        enabled=True,
        configured=True,
        settings=ConfigureRemote(**values),
        aliases=(Alias("www.example.net", "portal"),),
        device_key="KEY",
    )


class RouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.leadership = Leadership()
        self.leadership.set("control-plane", Role.LEADER, "http://192.0.2.1:8080")
        self.leadership.set("app:blog", Role.LEADER)
        self.leadership.set("app:shop", Role.FOLLOWER, "http://192.0.2.7:8080")
        self.published = {"blog/web": 35001, "shop/api": 35002}

    def routes(self, remote: RemoteState | None = None) -> dict[str, Any]:
        found = compute_routes(
            remote or state(), self.published, self.leadership, "http://0.0.0.0:8080"
        )
        return {r.target: r for r in found}

    def test_local_and_leader_routes(self) -> None:
        """Led here: loopback at the local port; led elsewhere: the leader's host, same port."""
        routes = self.routes()
        self.assertEqual(list(routes), ["blog/web", "portal", "shop/api"])
        portal, blog, shop = routes["portal"], routes["blog/web"], routes["shop/api"]
        self.assertEqual((portal.mode, portal.host, portal.port), ("local", "127.0.0.1", 8080))
        self.assertEqual(portal.hostnames, ("portal.example.net", "www.example.net"))
        self.assertEqual((blog.mode, blog.host, blog.port, blog.remote_port),
                         ("local", "127.0.0.1", 35001, 8081))  # fmt: skip
        self.assertEqual(blog.hostnames, ("blog.example.net",))
        self.assertEqual((shop.mode, shop.host, shop.port), ("leader", "192.0.2.7", 35002))
        self.assertEqual(shop.forward_name, "app:shop/api")

    def test_portal_of_a_follower_is_the_leaders_api(self) -> None:
        """Following control-plane, the portal route is the leader's API address."""
        self.leadership.set("control-plane", Role.FOLLOWER, "https://192.0.2.9:9443")
        portal = self.routes()["portal"]
        self.assertEqual((portal.mode, portal.host, portal.port), ("leader", "192.0.2.9", 9443))

    def test_unavailable_routes_say_why(self) -> None:
        """Unknown role, unknown leader address, or nothing published: unavailable."""
        self.leadership.states.pop("app:blog")
        self.leadership.set("app:shop", Role.FOLLOWER, None)
        self.published.pop("blog/web")
        routes = self.routes()
        self.assertEqual(routes["blog/web"].mode, "unavailable")
        self.assertIn("not published", routes["blog/web"].reason)
        self.assertEqual(routes["shop/api"].mode, "unavailable")
        self.assertIn("no known address", routes["shop/api"].reason)
        self.published["blog/web"] = 35001
        self.assertIn("no leader known", self.routes()["blog/web"].reason)

    def test_unknown_is_never_leader(self) -> None:
        """A resource whose role is unknown is not routed locally."""
        self.leadership.set("control-plane", Role.UNKNOWN, "http://192.0.2.1:8080")
        self.assertEqual(self.routes()["portal"].mode, "unavailable")

    def test_portal_can_be_left_out(self) -> None:
        """expose_portal=False: no portal route."""
        self.assertNotIn("portal", self.routes(state(expose_portal=False)))

    def test_split_address(self) -> None:
        """API addresses become (host, port); unspecified hosts mean loopback; junk is None."""
        cases = {
            "http://10.0.0.2:8080": ("10.0.0.2", 8080),
            "https://leader.example": ("leader.example", 443),
            "http://[::1]:80": ("::1", 80),
            "http://[::]:8080": ("127.0.0.1", 8080),
            "10.0.0.3:9000": ("10.0.0.3", 9000),
            "": None,
            None: None,
            "http://host:notaport": None,
            "ftp://host": None,
        }
        for address, expected in cases.items():
            self.assertEqual(split_address(address), expected, address)


class SpecTests(SynchronousTestCase):
    def test_specs_forward_available_routes_and_https(self) -> None:
        """Each tunnel forwards each available route, and https when TLS listens."""
        remote = state(
            https_port=443,
            tunnels=(RemoteTunnelConfig("a.example", "u"),
                     RemoteTunnelConfig("b.example", "u", name="b", bind_host="127.0.0.2")),
        )  # fmt: skip
        leadership = Leadership()
        leadership.set("control-plane", Role.LEADER)
        leadership.set("app:blog", Role.LEADER)
        routes = compute_routes(remote, {"blog/web": 35001}, leadership, "http://127.0.0.1:8080")
        specs = tunnel_specs(remote, routes, tls_port=8443)
        self.assertEqual([s.name for s in specs], ["default", "b"])
        self.assertEqual(specs[0].private_key, b"KEY")
        self.assertEqual(
            specs[1].forwards,
            (
                TunnelForward("app:blog/web", "127.0.0.2", 8081, "127.0.0.1", 35001),
                TunnelForward("portal", "127.0.0.2", 0, "127.0.0.1", 8080),
                TunnelForward("https", "127.0.0.2", 443, "127.0.0.1", 8443),
            ),
        )  # shop/api is not published: not forwarded
        self.assertEqual([f.name for f in tunnel_specs(remote, routes, None)[0].forwards],
                         ["app:blog/web", "portal"])  # fmt: skip

    def test_nothing_while_disabled_or_keyless(self) -> None:
        """A disabled state, or one without device key, asks for no tunnel."""
        remote = state()
        self.assertEqual(tunnel_specs(attrs.evolve(remote, enabled=False), (), None), ())
        self.assertEqual(tunnel_specs(attrs.evolve(remote, device_key=""), (), None), ())
