"""systemd's service notification protocol (sd_notify), for ``Type=notify`` units.

systemd passes ``NOTIFY_SOCKET``: a UNIX datagram socket path, or an abstract
name written with a leading ``@``.  Each datagram is newline-separated
``KEY=VALUE`` assignments::

    READY=1\\nSTATUS=guest running; migration none; COLO none     QMP and HTTP listen
    STATUS=guest paused; migration active; COLO none              on every change
    WATCHDOG=1                                                     every WATCHDOG_USEC/2, from the event loop
    STOPPING=1\\nSTATUS=stopping                                    shutdown begins

The watchdog pings come from a task on the event loop, so a loop that hangs
(a blocking call, a deadlock) stops them and systemd restarts the unit.
Without ``NOTIFY_SOCKET`` nothing is sent.  Both variables are removed from
the environment, as sd_notify(unset_environment=1) does, so that children
(``exec:`` migrations) do not talk to systemd in the daemon's name.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Callable

log = logging.getLogger(__name__)

STATUS_POLL = 0.25     # seconds between checks of the status line (events also trigger one)


class Notifier:
    def __init__(self, environ=os.environ):
        address = environ.pop("NOTIFY_SOCKET", None)
        watchdog_usec = environ.pop("WATCHDOG_USEC", None)
        watchdog_pid = environ.pop("WATCHDOG_PID", None)
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_interval: float | None = None
        if watchdog_usec and watchdog_usec.isdigit() and int(watchdog_usec) > 0 and (
                not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_interval = int(watchdog_usec) / 2e6
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if self.address else None
        self._status: str | None = None
        self._stopping = False
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as e:          # systemd gone or the socket full: the service goes on
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), e)
                self._warned = True

    def ready(self, status: str) -> None:
        self._status = status
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """STATUS=, only when it changed (and not once stopping: that says it all)."""
        if status != self._status and not self._stopping:
            self._status = status
            self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self._stopping = True
        self.notify("STOPPING=1", "STATUS=stopping")

    async def run(self, describe: Callable[[], str], changed: asyncio.Event) -> None:
        """Until cancelled: watchdog pings and status updates (on ``changed``, or polled)."""
        loop = asyncio.get_running_loop()
        next_ping = loop.time()
        while True:
            if self.watchdog_interval is not None and loop.time() >= next_ping:
                self.notify("WATCHDOG=1")
                next_ping = loop.time() + self.watchdog_interval
            self.status(describe())
            wait = STATUS_POLL if self.watchdog_interval is None else min(STATUS_POLL, next_ping - loop.time())
            try:
                await asyncio.wait_for(changed.wait(), max(wait, 0.001))
            except asyncio.TimeoutError:
                pass
            changed.clear()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
