"""
systemd's notify protocol: ``READY=1``, ``STATUS=``, ``STOPPING=1`` and
the ``WATCHDOG=1`` keep-alive, sent as datagrams to ``$NOTIFY_SOCKET``.

The watchdog pings are driven by a ``LoopingCall`` on the injected clock, at
half of ``$WATCHDOG_USEC`` (as ``sd_watchdog_enabled(3)`` advises).  That is
the point of the watchdog: a reactor blocked for longer than the interval
stops pinging, and systemd restarts the daemon.

Sending never blocks (the socket is non-blocking) and never raises: a
failure is logged once, and again only after a send has succeeded since.
Without a socket every method is a no-op, so the daemon runs the same under
systemd and outside it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, MutableMapping

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from piccolod.kernel.aio import provides

__all__ = ["SystemdNotifier"]

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(path: str) -> str:
    """The ``AF_UNIX`` address of ``path``; ``@name`` is an abstract socket."""
    if path.startswith("@"):
        return "\0" + path[1:]
    return path


def _single_line(text: str) -> str:
    return " ".join(text.splitlines()).strip()


@attrs.define(eq=False)
class SystemdNotifier:
    """
    Sends sd_notify messages to ``socket_path`` (``None``: does nothing).

    @ivar reactor: the clock the watchdog ``LoopingCall`` runs on.
    @ivar socket_path: a filesystem path, or ``@name`` for an abstract
        socket; ``None`` disables every message.
    @ivar watchdog_usec: systemd's watchdog interval in microseconds;
        ``None`` or ``0`` disables the pings.
    """

    log = Logger()

    reactor: IReactorTime = attrs.field(validator=provides(IReactorTime))
    socket_path: str | None = attrs.field(default=None)
    watchdog_usec: int | None = attrs.field(default=None)
    #: datagrams sent successfully, and sends that failed
    sent: int = attrs.field(init=False, default=0)
    errors: int = attrs.field(init=False, default=0)
    _socket: socket.socket | None = attrs.field(init=False, default=None)
    _watchdog: LoopingCall | None = attrs.field(init=False, default=None)
    _failing: bool = attrs.field(init=False, default=False)

    @classmethod
    def from_environ(
        cls,
        reactor: IReactorTime,
        environ: MutableMapping[str, str],
        *,
        getpid: Callable[[], int] = os.getpid,
        unset_environment: bool = False,
    ) -> SystemdNotifier:
        """
        Build from ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC``.  The watchdog
        is enabled only when ``$WATCHDOG_PID`` is unset or names this
        process.  An unusable value is logged and disables that part.  With
        ``unset_environment`` the variables are removed from ``environ`` (pass
        ``os.environ``) so that child processes, such as podman's conmon,
        cannot talk to systemd in the daemon's name.
        """
        path: str | None = environ.get("NOTIFY_SOCKET") or None
        if path is not None and not path.startswith(("/", "@")):
            cls.log.warn(
                "NOTIFY_SOCKET {socket!r} is not a unix socket path; not notifying systemd",
                socket=path,
            )
            path = None
        usec: int | None = None
        raw = environ.get("WATCHDOG_USEC")
        if raw:
            try:
                usec = int(raw)
            except ValueError:
                usec = None
            if usec is None or usec <= 0:
                cls.log.warn("ignoring WATCHDOG_USEC={value!r}", value=raw)
                usec = None
        pid = environ.get("WATCHDOG_PID")
        if usec is not None and pid:
            try:
                mine = int(pid) == getpid()
            except ValueError:
                mine = False
            if not mine:
                cls.log.info("WATCHDOG_PID={pid} is not this process; no watchdog pings", pid=pid)
                usec = None
        if unset_environment:
            for key in _ENV_KEYS:
                environ.pop(key, None)
        return cls(reactor, path, usec)

    # -- queries ----------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify."""
        return self.socket_path is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half systemd's interval), or ``None``."""
        if not self.enabled or not self.watchdog_usec or self.watchdog_usec <= 0:
            return None
        return self.watchdog_usec / 2_000_000

    @property
    def watchdog_running(self) -> bool:
        return self._watchdog is not None and self._watchdog.running

    # -- messages ---------------------------------------------------------------

    def ready(self, status: str = "ready") -> None:
        """Tell systemd that start-up is complete (``READY=1``)."""
        self.notify("READY=1", f"STATUS={_single_line(status)}")

    def stopping(self, status: str = "stopping") -> None:
        """Tell systemd that the daemon is shutting down (``STOPPING=1``)."""
        self.notify("STOPPING=1", f"STATUS={_single_line(status)}")

    def status(self, text: str) -> None:
        """Set the free-form status line ``systemctl status`` shows."""
        self.notify(f"STATUS={_single_line(text)}")

    def watchdog(self) -> None:
        """Send one ``WATCHDOG=1`` keep-alive."""
        self.notify("WATCHDOG=1")

    def notify(self, *lines: str) -> bool:
        """
        Send ``lines`` as one datagram.  Returns whether it was sent; never
        raises (a failure is logged and counted).
        """
        if self.socket_path is None:
            return False
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(payload, _address(self.socket_path))
        except OSError as e:
            self.errors += 1
            if not self._failing:
                self._failing = True
                self.log.warn(
                    "cannot notify systemd at {socket}: {error}",
                    socket=self.socket_path,
                    error=str(e),
                    line=lines[0] if lines else "",
                )
            return False
        self.sent += 1
        if self._failing:
            self._failing = False
            self.log.info("notifying systemd at {socket} works again", socket=self.socket_path)
        return True

    # -- watchdog ---------------------------------------------------------------

    def start(self) -> None:
        """Start the watchdog pings (if enabled); idempotent."""
        interval = self.watchdog_interval
        if interval is None or self.watchdog_running:
            return
        loop = LoopingCall(self.watchdog)
        loop.clock = self.reactor
        self._watchdog = loop
        done = loop.start(interval, now=True)
        done.addErrback(lambda f: self.log.failure("systemd watchdog loop failed", failure=f))
        self.log.info("systemd watchdog: pinging every {interval}s", interval=interval)

    def stop(self) -> None:
        """Stop the watchdog pings and close the socket; idempotent."""
        loop, self._watchdog = self._watchdog, None
        if loop is not None and loop.running:
            loop.stop()
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
