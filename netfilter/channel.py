"""The packet channel between a COLO pair: guest frames over one TCP connection.

The secondary listens on its COLO address (any free port unless configured)
and tells the primary the port in COLO_HELLO; the primary connects.  Both
directions carry the same records::

    hello    "COLOPKT\\0" (8)  version u32                      each side, first
    frame    epoch u32  length u32  frame (length bytes)        all integers big-endian

primary -> secondary: client frames mirrored from the primary's tap (epoch 0).
secondary -> primary: the SVM's output, tagged with the checkpoint it follows,
so the primary's comparer can drop what an older SVM sent.

A bad hello, a frame over MAX_FRAME or a closed connection ends the channel:
``recv`` raises ChannelError, which COLO treats as a lost peer.

When the COLO connection runs TLS, so does this channel, with the same credentials:
the primary verifies the secondary's certificate, the secondary the primary's (and its
authz list) before the hello.  Both ends have TCP keepalive (replication/transport.py).
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Callable

from replication.tls import ClientTls, ServerTls, TlsError
from replication.transport import keepalive

log = logging.getLogger(__name__)

MAGIC = b"COLOPKT\0"
VERSION = 1
HELLO = struct.Struct(">8sI")
FRAME_HEAD = struct.Struct(">II")
MAX_FRAME = 65536


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


class PacketChannel:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local, peer = sock.getsockname(), sock.getpeername()
        self.endpoints = f"{local[0]}:{local[1]} <-> {peer[0]}:{peer[1]}"     # for the status page
        self.frames_sent = 0
        self.frames_received = 0
        self._send_lock = threading.Lock()
        self._buffer = bytearray()
        self._pos = 0

    @classmethod
    def connect(cls, address: str, port: int, timeout: float = 10.0, tls: ClientTls | None = None) -> "PacketChannel":
        try:
            sock = socket.create_connection((address, port), timeout=timeout)
            keepalive(sock)
            if tls is not None:
                sock = tls.wrap(sock, timeout)
        except (OSError, TlsError) as e:
            raise ChannelError(f"packet channel to {address}:{port}: {getattr(e, 'strerror', None) or e}") from e
        return cls._greet(sock, timeout)

    @classmethod
    def accept(cls, listener: socket.socket, peer_address: str, timeout: float = 10.0,
               tls: ServerTls | None = None) -> "PacketChannel":
        """The connection from ``peer_address`` (the primary, with a certificate ``tls`` admits);
        others are closed unread, so nobody else can take its place."""
        deadline = time.monotonic() + timeout
        while True:
            listener.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sock, (address, *_) = listener.accept()
            except OSError as e:
                raise ChannelError(f"packet channel: no connection from the primary ({e})") from e
            if address == peer_address and tls is not None:
                keepalive(sock)
                try:
                    sock = tls.wrap(sock, max(deadline - time.monotonic(), 1.0))[0]
                except TlsError as e:
                    log.warning("packet channel: refused a connection from %s: %s", address, e)
                    sock.close()
                    continue
            if address == peer_address:
                keepalive(sock)
                return cls._greet(sock, max(deadline - time.monotonic(), 1.0))
            log.warning("packet channel: refused a connection from %s (the primary is %s)", address, peer_address)
            sock.close()

    @classmethod
    def _greet(cls, sock: socket.socket, timeout: float) -> "PacketChannel":
        channel = cls(sock)
        sock.settimeout(timeout)
        try:
            sock.sendall(HELLO.pack(MAGIC, VERSION))
            magic, version = HELLO.unpack(channel._read(HELLO.size))
        except OSError as e:
            sock.close()
            raise ChannelError(f"packet channel hello failed: {e}") from e
        if (magic, version) != (MAGIC, VERSION):
            sock.close()
            raise ChannelError(f"the peer is not a colo-appliance packet channel v{VERSION}")
        sock.settimeout(None)
        return channel

    def send(self, epoch: int, frame: bytes) -> None:
        self.send_many([(epoch, frame)])

    def send_many(self, frames: list[tuple[int, bytes]]) -> None:
        """Several (epoch, frame) records in one write: one system call for a burst."""
        data = b"".join(FRAME_HEAD.pack(epoch, len(frame)) + frame for epoch, frame in frames)
        with self._send_lock:
            try:
                self.sock.sendall(data)
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
                chunk = self.sock.recv(max(n - len(self._buffer), 65536))
            except OSError as e:
                raise ChannelError(f"packet channel: {e.strerror or e}") from e
            if not chunk:
                raise ChannelError("packet channel: the peer closed it")
            self._buffer += chunk
        data = bytes(self._buffer[self._pos:self._pos + n])
        self._pos += n
        return data

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
