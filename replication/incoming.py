"""Admission of incoming migration connections: who may become the source, within what time.

On a socket listener a thread accepts connections for as long as the destination
waits for its source and its multifd channels.  Each new connection gets
``deadline`` seconds in all, in its own thread, to pass in order::

    TLS handshake, client certificate, authz    (when the destination has tls-creds)
    the stream header (45 bytes): magic, version (replication/stream.py)

A connection that fails a step, or runs out of time, is closed without a byte of
answer (the peer learns nothing: no UUID, no sizes), logged and counted by reason
in ``refused`` (``tls``, ``authz``, ``deadline``, ``garbage``, ``busy``); the
listener goes on, so a silent, slow or garbage peer delays a real source by at
most the deadline.  Connections that pass wait in ``next()`` for the destination,
which checks the header against its guest and answers (stream.pack_reply).
Once the destination has its source and channels (``close_door``), new ones are
closed at once (``busy``): a second source never disturbs the first.  So are those
beyond MAX_PENDING in admission at once, or MAX_PENDING_PER_PEER from one address:
one attacking host cannot fill admission and keep a real source out.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Callable

from . import stream
from .tls import ServerTls, TlsError
from .transport import Channel, Listener, TransportError

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0     # seconds for a new connection's TLS handshake and stream header
MAX_PENDING = 64            # connections in admission at once
MAX_PENDING_PER_PEER = 4    # of them from one address


class Admission:
    def __init__(self, listener: Listener, tls: Callable[[], ServerTls | None], deadline: float,
                 refused: collections.Counter):
        """``tls()`` is read for each connection (tls-creds may be set after -incoming, as in QEMU)."""
        self.listener = listener
        self.tls = tls
        self.deadline = deadline
        self.refused = refused
        self._admitted: queue.Queue = queue.Queue()
        self._door_open = True
        self._pending: collections.Counter = collections.Counter()     # by peer address
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="migration-admission", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def next(self, timeout: float | None = None) -> tuple[Channel, stream.Header]:
        """The next admitted connection and its header; TransportError after ``timeout`` s."""
        try:
            admitted = self._admitted.get(timeout=timeout)
        except queue.Empty:
            raise TransportError(f"{self.listener.uri}: no connection within {timeout:g} s") from None
        if admitted is None:
            self._admitted.put(None)
            raise TransportError(f"{self.listener.uri}: no longer listening")
        return admitted

    def close_door(self) -> None:
        """The destination has what it needs: refuse every new connection, and those waiting."""
        with self._lock:
            self._door_open = False
        while True:
            try:
                admitted = self._admitted.get_nowait()
            except queue.Empty:
                return
            if admitted is None:
                self._admitted.put(None)
                return
            self.refuse(admitted[0], "busy", "another source is migrating")

    def refuse(self, channel: Channel, reason: str, detail: str, peer: str | None = None) -> None:
        peer = peer or peer_of(channel)
        channel.abort()
        channel.close()
        with self._lock:
            self.refused[reason] += 1
        log.warning("incoming migration: refused a connection from %s (%s): %s", peer, reason, detail)

    def _accept_loop(self) -> None:
        try:
            self._accept_connections()
        finally:
            self._admitted.put(None)            # the listener was closed: the destination is done

    def _accept_connections(self) -> None:
        while True:
            try:
                channel = self.listener.accept()
            except TransportError:
                return
            address = peer_of(channel).rpartition(":")[0]
            with self._lock:
                admit = (self._door_open and self._pending.total() < MAX_PENDING
                         and self._pending[address] < MAX_PENDING_PER_PEER)
                if admit:
                    self._pending[address] += 1
            if not admit:
                self.refuse(channel, "busy", "another source is migrating, or too many connections in admission")
                continue
            threading.Thread(target=self._admit, args=(channel, address), name="migration-admit",
                             daemon=True).start()

    def _admit(self, channel: Channel, address: str) -> None:
        # One deadline for the whole admission: a peer that trickles bytes gains nothing.
        started = time.monotonic()
        watchdog = threading.Timer(self.deadline, channel.abort)
        watchdog.start()
        late = lambda: channel.aborted or time.monotonic() - started >= self.deadline     # noqa: E731
        try:
            server_tls = self.tls()
            if server_tls is not None:
                channel.sock, channel.peer_identity = server_tls.wrap(channel.sock, self.deadline + 1)
                channel.tls = server_tls
            channel.sock.settimeout(self.deadline + 1)        # the watchdog ends it first
            header = stream.Header.unpack(channel.read_exact(stream.HEADER.size))
        except TlsError as e:
            self.refuse(channel, "deadline" if late() else "authz" if "authz" in str(e) else "tls", str(e))
        except TransportError as e:
            self.refuse(channel, "deadline" if late() else "garbage", str(e))
        except stream.StreamError as e:
            self.refuse(channel, "garbage", str(e))
        else:
            watchdog.cancel()
            watchdog.join()
            with self._lock:
                door_open = self._door_open
            if channel.aborted:
                self.refuse(channel, "deadline", "the deadline passed as the header arrived")
            elif door_open:
                self._admitted.put((channel, header))
            else:
                self.refuse(channel, "busy", "another source is migrating")
        finally:
            watchdog.cancel()
            with self._lock:
                self._pending[address] -= 1


def peer_of(channel: Channel) -> str:
    try:
        peer = channel.sock.getpeername()
    except (OSError, AttributeError):
        return "?"
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else (peer or "a local socket")
