"""The packet channel between a COLO pair: guest frames over two TCP connections.

The secondary listens on its COLO address (any free port unless configured)
and tells the primary the port in COLO_HELLO; the primary connects twice, one
connection per direction, so each connection (and, with TLS, each SSL object)
is used by exactly one thread on each side: OpenSSL forbids two threads on one
SSL object, and CPython drops the GIL inside SSL_read/SSL_write.

    primary                                          secondary
    connect 1  ── hello(TO_SECONDARY) ──────────────►  accept, check, reply
               ◄───────────────── hello(TO_SECONDARY)
    connect 2  ── hello(TO_PRIMARY) ────────────────►  accept, check, reply
               ◄─────────────────── hello(TO_PRIMARY)
    mirror     ══ frames on connection 1 ═══════════►  to-svm
    comparer   ◄══════════ frames on connection 2 ═══  from-svm

    hello    "COLOPKT\\0" (8)  version u32 (2)  direction u32      each side, on each connection
    frame    epoch u32  length u32  frame (length bytes)          all integers big-endian

The direction is the one the frames flow in: TO_SECONDARY (1) carries client
frames mirrored from the primary's tap (epoch 0 until the first checkpoint);
TO_PRIMARY (2) the SVM's output, tagged with the checkpoint it follows, so the
primary's comparer can drop what an older SVM sent.  After the hellos a
connection carries frames one way only.

The secondary accepts only the primary's address on both connections (others are
closed unread) and hears the hello before it says its own.  A bad hello, a frame
over MAX_FRAME or either connection closing ends the channel: ``recv`` or
``send_many`` raises ChannelError, which COLO treats as a lost peer.

When the COLO connection runs TLS, so do both connections, with the same credentials:
the primary verifies the secondary's certificate, the secondary the primary's (and its
authz list) before the hello.  Both ends have TCP keepalive (replication/transport.py).
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from typing import Callable

from replication.tls import ClientTls, ServerTls, TlsError
from replication.transport import keepalive, shut_down

log = logging.getLogger(__name__)

MAGIC = b"COLOPKT\0"
VERSION = 2
HELLO = struct.Struct(">8sII")
FRAME_HEAD = struct.Struct(">II")
MAX_FRAME = 65536
TO_SECONDARY = 1
TO_PRIMARY = 2
DIRECTION_NAMES = {TO_SECONDARY: "primary to secondary", TO_PRIMARY: "secondary to primary"}


class ChannelError(Exception):
    """The packet channel failed or carried something that is not ours."""


def guarded(loop: Callable[[], None], lost: Callable[[str], None]) -> None:
    """A filter thread's loop: a broken channel, or any failure, is a lost peer for COLO,
    never a thread that ends in silence."""
    try:
        loop()
    except ChannelError as e:
        lost(str(e))
    except Exception as e:
        log.exception("netfilter: %s failed", loop.__name__)
        lost(f"netfilter failed: {e!r}")


def endpoints_of(sock: socket.socket) -> str:
    local, peer = sock.getsockname(), sock.getpeername()
    return f"{local[0]}:{local[1]} -> {peer[0]}:{peer[1]}"


def close_quietly(sock: socket.socket) -> None:
    """Shut down first: a thread blocked on the socket wakes at once, even on a frozen peer."""
    shut_down(sock)
    sock.close()


class PacketChannel:
    """Frames out on ``outbound`` (written by one thread), in on ``inbound`` (read by another)."""

    def __init__(self, outbound: socket.socket, inbound: socket.socket):
        self.outbound = outbound
        self.inbound = inbound
        for sock in (outbound, inbound):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # for the status page: where frames go out, and where they come in from
        self.endpoints = f"out {endpoints_of(outbound)}, in {endpoints_of(inbound)}" + (
            " (TLS)" if self.encrypted else "")
        self.frames_sent = 0
        self.frames_received = 0
        self._send_lock = threading.Lock()
        self._buffer = bytearray()
        self._pos = 0
        self._relay: TlsRelay | None = None

    @property
    def encrypted(self) -> bool:
        """TLS on the connections: Python's ssl drives them."""
        return isinstance(self.outbound, ssl.SSLSocket)

    def native_fds(self) -> tuple[int, int]:
        """(outbound, inbound): the descriptors the C datapath sends and receives the frames
        on.  The sockets' own in clear; under TLS the plaintext ends of a TlsRelay started
        here, since only Python's ssl can encrypt them."""
        if not self.encrypted:
            return self.outbound.fileno(), self.inbound.fileno()
        if self._relay is None:
            self._relay = TlsRelay(self.outbound, self.inbound)
        return self._relay.fds()

    @classmethod
    def connect(cls, address: str, port: int, timeout: float = 10.0, tls: ClientTls | None = None) -> "PacketChannel":
        """The primary's end: its frames go on the first connection, the secondary's come on the second."""
        deadline = time.monotonic() + timeout
        outbound = dial(address, port, TO_SECONDARY, deadline, tls)
        try:
            inbound = dial(address, port, TO_PRIMARY, deadline, tls)
        except ChannelError:
            close_quietly(outbound)
            raise
        return cls(outbound, inbound)

    @classmethod
    def accept(cls, listener: socket.socket, peer_address: str, timeout: float = 10.0,
               tls: ServerTls | None = None) -> "PacketChannel":
        """The secondary's end: both connections from ``peer_address`` (the primary, with a
        certificate ``tls`` admits); others are closed unread, so nobody else can take its place."""
        deadline = time.monotonic() + timeout
        inbound = admit(listener, peer_address, TO_SECONDARY, deadline, tls)
        try:
            outbound = admit(listener, peer_address, TO_PRIMARY, deadline, tls)
        except ChannelError:
            close_quietly(inbound)
            raise
        return cls(outbound, inbound)

    def send(self, epoch: int, frame: bytes) -> None:
        self.send_many([(epoch, frame)])

    def send_many(self, frames: list[tuple[int, bytes]]) -> None:
        """Several (epoch, frame) records in one write: one system call for a burst."""
        data = b"".join(FRAME_HEAD.pack(epoch, len(frame)) + frame for epoch, frame in frames)
        with self._send_lock:
            try:
                self.outbound.sendall(data)
            except OSError as e:
                raise ChannelError(f"packet channel: {e.strerror or e}") from e
            self.frames_sent += len(frames)

    def recv(self) -> tuple[int, bytes]:
        epoch, length = FRAME_HEAD.unpack(self._read(FRAME_HEAD.size))
        if length > MAX_FRAME:
            raise ChannelError(f"packet channel: a frame of {length} bytes")
        frame = self._read(length)
        self.frames_received += 1
        return epoch, frame

    def _read(self, n: int) -> bytes:
        """Exactly n bytes; the buffer is consumed by offset and compacted once per refill,
        so small frames cost no copying of what follows them."""
        while len(self._buffer) - self._pos < n:
            if self._pos:
                del self._buffer[:self._pos]
                self._pos = 0
            try:
                chunk = self.inbound.recv(max(n - len(self._buffer), 65536))
            except OSError as e:
                raise ChannelError(f"packet channel: {e.strerror or e}") from e
            if not chunk:
                raise ChannelError("packet channel: the peer closed it")
            self._buffer += chunk
        data = bytes(self._buffer[self._pos:self._pos + n])
        self._pos += n
        return data

    def shutdown(self) -> None:
        """Never waits on the peer: both threads, reading or writing, fail at once.  The
        descriptors stay open, so a thread about to use one cannot reach a socket opened
        meanwhile under the same number: close() once the threads are gone."""
        if self._relay is not None:
            self._relay.closing = True
        for sock in (self.outbound, self.inbound):
            shut_down(sock)

    def close(self) -> None:
        self.shutdown()
        if self._relay is not None:
            self._relay.close()
        self.outbound.close()
        self.inbound.close()


class TlsRelay:
    """The C datapath on a TLS channel: it sends and receives the frames in clear on local
    socket pairs, and one thread per direction carries the bytes to or from the connection's
    SSL object in bulk (whatever has gathered, up to RELAY_CHUNK a call), so Python's work
    is per burst, not per frame, and each SSL object still has one thread.

        C datapath ──► pair ══ relay-out thread ══ SSL (outbound) ──► peer
        C datapath ◄── pair ══ relay-in thread  ══ SSL (inbound)  ◄── peer

    A failure on either side shuts the other: a broken or closed TLS connection reaches the
    datapath as a closed socket, a lost peer; the datapath's end closing ends its thread.
    """

    RELAY_CHUNK = 256 * 1024

    def __init__(self, outbound: ssl.SSLSocket, inbound: ssl.SSLSocket):
        self._out_near, self._out_far = socket.socketpair()  # near: the datapath's; far: the thread's
        self._in_near, self._in_far = socket.socketpair()
        self.closing = False  # set by the channel's shutdown: errors from then on are expected
        self._threads = [threading.Thread(target=self._carry, args=(self._out_far, outbound, "out"),
                                          name="tls-relay-out", daemon=True),
                         threading.Thread(target=self._carry, args=(inbound, self._in_far, "in"),
                                          name="tls-relay-in", daemon=True)]
        for thread in self._threads:
            thread.start()

    def fds(self) -> tuple[int, int]:
        return self._out_near.fileno(), self._in_near.fileno()

    def _carry(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while data := source.recv(self.RELAY_CHUNK):
                sink.sendall(data)
        except OSError as e:
            if not self.closing:
                log.warning("packet channel relay (%s): %s", direction, e)
        finally:
            for sock in (source, sink):     # the other side sees the end at once
                shut_down(sock)

    def close(self) -> None:
        """After PacketChannel.shutdown(): the SSL sockets are shut, so are the pairs here;
        both threads end without waiting on the peer."""
        for sock in (self._out_near, self._in_near, self._out_far, self._in_far):
            shut_down(sock)
        for thread in self._threads:
            thread.join()
        for sock in (self._out_near, self._in_near, self._out_far, self._in_far):
            sock.close()


def remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def dial(address: str, port: int, direction: int, deadline: float, tls: ClientTls | None) -> socket.socket:
    """One connection to the secondary, its certificate verified if ``tls``, carrying ``direction``."""
    try:
        sock = socket.create_connection((address, port), timeout=remaining(deadline))
    except OSError as e:
        raise ChannelError(f"packet channel to {address}:{port}: {e.strerror or e}") from e
    try:
        keepalive(sock)
        if tls is not None:
            sock = tls.wrap(sock, remaining(deadline))
    except (OSError, TlsError) as e:
        sock.close()
        raise ChannelError(f"packet channel to {address}:{port}: {getattr(e, 'strerror', None) or e}") from e
    try:
        say_hello(sock, direction, deadline)
        hear_hello(sock, direction, deadline)
    except ChannelError:
        close_quietly(sock)
        raise
    return sock


def admit(listener: socket.socket, peer_address: str, direction: int, deadline: float,
          tls: ServerTls | None) -> socket.socket:
    """The next connection from the primary, TLS-admitted if ``tls``, carrying ``direction``."""
    while True:
        listener.settimeout(remaining(deadline))
        try:
            sock, (address, *_) = listener.accept()
        except OSError as e:
            raise ChannelError(f"packet channel: no connection {DIRECTION_NAMES[direction]} "
                               f"from the primary ({e})") from e
        if address != peer_address:
            log.warning("packet channel: refused a connection from %s (the primary is %s)", address, peer_address)
            sock.close()
            continue
        keepalive(sock)
        if tls is not None:
            try:
                sock = tls.wrap(sock, max(deadline - time.monotonic(), 1.0))[0]
            except TlsError as e:
                log.warning("packet channel: refused a connection from %s: %s", address, e)
                sock.close()
                continue
        try:
            hear_hello(sock, direction, max(deadline, time.monotonic() + 1.0))
            say_hello(sock, direction, deadline)
        except ChannelError:
            close_quietly(sock)
            raise
        return sock


def say_hello(sock: socket.socket, direction: int, deadline: float) -> None:
    sock.settimeout(remaining(deadline))
    try:
        sock.sendall(HELLO.pack(MAGIC, VERSION, direction))
    except OSError as e:
        raise ChannelError(f"packet channel hello failed: {e}") from e
    sock.settimeout(None)


def hear_hello(sock: socket.socket, direction: int, deadline: float) -> None:
    """Exactly the hello's bytes (the frames after it are the reader's)."""
    sock.settimeout(remaining(deadline))
    hello = b""
    try:
        while len(hello) < HELLO.size:
            chunk = sock.recv(HELLO.size - len(hello))
            if not chunk:
                break
            hello += chunk
    except OSError as e:
        raise ChannelError(f"packet channel hello failed: {e}") from e
    if len(hello) < HELLO.size or HELLO.unpack(hello)[:2] != (MAGIC, VERSION):
        raise ChannelError(f"the peer is not a colo-appliance packet channel v{VERSION}")
    heard = HELLO.unpack(hello)[2]
    if heard != direction:
        raise ChannelError(f"packet channel: the peer's hello is for direction {heard}, "
                           f"expected {direction} ({DIRECTION_NAMES[direction]})")
    sock.settimeout(None)
