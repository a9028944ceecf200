"""Tests for piccolod.logging: level filter, JSON lines, correlation ids."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from piccolod.errors import ConfigError
from piccolod.logging import correlation_id, observer_for


class ObserverTests(SynchronousTestCase):
    def emit(self, level: str, fmt: str) -> list[str]:
        stream = io.StringIO()
        publisher = LogPublisher(observer_for(level=level, format=fmt, stream=stream))
        log = Logger(namespace="piccolod.test", observer=publisher)
        log.debug("debug {n}", n=1)
        log.info("info {n}", n=2)
        log.error("error {n}", n=3)
        return [line for line in stream.getvalue().splitlines() if line.strip()]

    def test_level_filter(self) -> None:
        """Events below the configured level are not written."""
        lines = self.emit("info", "text")
        self.assertEqual(len(lines), 2)
        self.assertIn("info 2", lines[0])
        self.assertIn("error 3", lines[1])
        self.assertEqual(len(self.emit("error", "text")), 1)
        self.assertEqual(len(self.emit("debug", "text")), 3)

    def test_http_client_connection_chatter_is_quiet_at_info(self) -> None:
        """Twisted's per-connection factory lines show only at debug; its warnings always."""
        namespace = "twisted.web.client._HTTP11ClientFactory"
        for level, shown in (("info", ["problem"]), ("debug", ["Starting factory", "problem"])):
            stream = io.StringIO()
            publisher = LogPublisher(observer_for(level=level, stream=stream))
            chatty = Logger(namespace=namespace, observer=publisher)
            chatty.info("Starting factory")
            chatty.warn("problem")
            Logger(namespace="piccolod.test", observer=publisher).info("ours")
            lines = stream.getvalue()
            self.assertIn("ours", lines)
            for text in ("Starting factory", "problem"):
                self.assertEqual(text in lines, text in shown, (level, text, lines))

    def test_json_lines_have_stable_fields(self) -> None:
        """JSON format writes one parseable object per event with its named fields."""
        lines = self.emit("info", "json")
        events = [json.loads(line.lstrip("\x1e")) for line in lines]
        self.assertEqual([e["n"] for e in events], [2, 3])
        self.assertEqual(events[0]["log_namespace"], "piccolod.test")
        self.assertEqual(events[0]["log_level"]["name"], "info")

    def test_correlation_id_is_stamped(self) -> None:
        """A line logged while a command runs carries that command's correlation id."""
        stream = io.StringIO()
        log = Logger(observer=LogPublisher(observer_for(format="json", stream=stream)))
        token = correlation_id.set("req-42")
        try:
            log.info("inside")
        finally:
            correlation_id.reset(token)
        log.info("outside")
        events = [json.loads(x.lstrip("\x1e")) for x in stream.getvalue().splitlines() if x.strip()]
        self.assertEqual(events[0]["correlation_id"], "req-42")
        self.assertNotIn("correlation_id", events[1])

    def test_bad_level_and_format(self) -> None:
        """An unknown level or format is a ConfigError listing both problems."""
        with self.assertRaises(ConfigError) as cm:
            observer_for(level="loud", format="xml", stream=io.StringIO())
        self.assertEqual(len(cm.exception.errors), 2)

    def test_file_is_created_private(self) -> None:
        """A log file is created with mode 0600 and appended to."""
        import os

        path = self.mktemp()
        log = Logger(observer=LogPublisher(observer_for(format="json", path=path)))
        log.info("one")
        log.info("two")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path) as f:
            self.assertEqual(len([x for x in f.read().splitlines() if x.strip()]), 2)


class DispatcherCorrelationTests(SynchronousTestCase):
    def test_handler_lines_carry_the_command_correlation_id(self) -> None:
        """Lines logged by a handler, sync or async, carry its command's correlation id."""
        import attrs
        from twisted.internet.defer import Deferred
        from twisted.internet.task import Clock

        from piccolod.commands import Command, CommandContext, Ping, Pong
        from piccolod.kernel.dispatcher import CommandDispatcher

        stream = io.StringIO()
        log = Logger(observer=LogPublisher(observer_for(format="json", stream=stream)))
        gate: Deferred[None] = Deferred()

        @attrs.frozen
        class Slow(Command):
            name = "test.slow"

        def ping(command: Ping, context: CommandContext) -> Pong:
            log.info("sync handler")
            return Pong()

        async def slow(command: Slow, context: CommandContext) -> Pong:
            await gate
            log.info("async handler after await")
            return Pong()

        clock = Clock()
        dispatcher = CommandDispatcher(clock)
        dispatcher.register(Ping, ping)
        dispatcher.register(Slow, slow)
        self.successResultOf(dispatcher.dispatch(Ping(), CommandContext(correlation_id="c-1")))
        d = dispatcher.dispatch(Slow(), CommandContext(command_id="id-2"))
        log.info("outside any command")
        gate.callback(None)
        self.successResultOf(d)
        events = [json.loads(x.lstrip("\x1e")) for x in stream.getvalue().splitlines() if x.strip()]
        by_text = {e["log_format"]: e.get("correlation_id") for e in events}
        self.assertEqual(by_text["sync handler"], "c-1")
        self.assertEqual(by_text["async handler after await"], "id-2")
        self.assertIsNone(by_text["outside any command"])
        dispatcher.stop()
