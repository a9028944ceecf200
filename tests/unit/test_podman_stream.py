"""The podman adapter's event stream body: lines across chunks, and closing it."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from piccolod.apps.podman import _LineStream


class LineStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lines: list[bytes] = []
        self.stream = _LineStream(self.lines.append)
        self.transport = StringTransport()
        self.stream.makeConnection(self.transport)

    def test_lines_split_across_chunks(self) -> None:
        """Each non-empty line is delivered once, whole, however the chunks fall."""
        for chunk in (b'{"a":', b"1}\n\n", b'{"b":2}\n{"c"', b":3}\n"):
            self.stream.dataReceived(chunk)
        self.assertEqual(self.lines, [b'{"a":1}', b'{"b":2}', b'{"c":3}'])

    def test_end_of_body(self) -> None:
        """The body's end fires done; a broken connection fails it."""
        self.stream.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(self.successResultOf(self.stream.done))
        broken = _LineStream(self.lines.append)
        broken.makeConnection(StringTransport())
        broken.connectionLost(Failure(ConnectionError("reset")))
        self.failureResultOf(broken.done, ConnectionError)

    def test_cancel_closes_the_connection(self) -> None:
        """Cancelling done closes the connection (podman waits for open streams at exit)."""
        self.stream.done.cancel()
        self.assertTrue(self.transport.disconnecting)
        self.failureResultOf(self.stream.done, CancelledError)
        self.stream.connectionLost(Failure(ConnectionError("closed")))  # no second result
