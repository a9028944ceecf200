"""piccolodctl's app and remote commands go out with the invocation's credentials."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from piccolod.cli import Client, Options, _AuthenticatedTreq


class RecordingTreq:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> None:
        self.calls.append((method, url, kwargs))


class WiringTests(SynchronousTestCase):
    def test_app_and_remote_parse(self) -> None:
        """`app list` and `remote status` are commands of piccolodctl."""
        for argv, command in ((["app", "list"], "app"), (["remote", "status"], "remote")):
            options = Options()
            options.parseOptions(["--url", "http://x", *argv])
            self.assertEqual(options.subCommand, command)

    def test_session_cookie_and_csrf_are_added(self) -> None:
        """The session cookie always, its CSRF token on writes; the caller's headers stay."""
        treq = RecordingTreq()
        client = Client(treq, "http://x", None, {"cookie": "c00k", "csrf_token": "t0k"})
        authed = _AuthenticatedTreq(client)
        authed.request("GET", "http://x/api/v1/apps")
        authed.request(
            "POST",
            "http://x/api/v1/apps",
            data=b"name: web",
            headers={b"content-type": [b"application/yaml"]},
        )
        (_, _, get), (_, _, post) = treq.calls
        self.assertEqual(get["headers"][b"cookie"], [b"piccolod_session=c00k"])
        self.assertNotIn(b"x-csrf-token", get["headers"])
        self.assertEqual(post["headers"][b"x-csrf-token"], [b"t0k"])
        self.assertEqual(post["headers"][b"content-type"], [b"application/yaml"])
        self.assertEqual(post["data"], b"name: web")

    def test_token_is_a_bearer_header(self) -> None:
        """With a token, requests carry it as a bearer token and no cookie."""
        treq = RecordingTreq()
        _AuthenticatedTreq(Client(treq, "http://x", "tok", None)).request("GET", "http://x/y")
        headers = treq.calls[0][2]["headers"]
        self.assertEqual(headers[b"authorization"], [b"Bearer tok"])
        self.assertNotIn(b"cookie", headers)
