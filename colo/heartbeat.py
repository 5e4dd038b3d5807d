"""The pair's heartbeat: UDP datagrams both ways, on a channel of its own.

QEMU's COLO has none (the operator says x-colo-lost-heartbeat).  Each node
binds a UDP port on the address its COLO connection uses (0 = any free port,
or the configured one), tells the peer that port in COLO_HELLO, and from
then on sends a datagram every ``interval`` and expects one within
``timeout``.  A frozen peer (SIGSTOP, a hung host) stops sending; a dead
peer also closes the COLO connection, which the checkpoint code notices.

    datagram   "COLOHB\\0\\1" (8)  vm uuid (16)  sequence u64 (big-endian)
    keyed      "COLOHB\\0\\2" (8)  vm uuid (16)  sequence u64 (big-endian)  mac (32)

Datagrams for another VM, or from another address, are ignored.

Python's ssl has no DTLS, so on a TLS COLO connection the heartbeat stays UDP and each
datagram is authenticated instead: each side draws a random 32-byte key per session and
sends it to the peer inside TLS (COLO_HELLO); ``mac`` is blake3 keyed with the sender's key
over the 32 bytes before it.  The receiver takes only datagrams whose MAC is right and whose
sequence is above the last one taken (no replay); anything else is dropped and counted in
``rejected``, so a forged or replayed datagram never keeps a dead peer "alive".
"""
from __future__ import annotations

import hmac
import logging
import os
import select
import socket
import struct
import threading
import time
import uuid as uuidlib
from typing import Callable

import blake3

log = logging.getLogger(__name__)

MAGIC = b"COLOHB\0\1"
KEYED_MAGIC = b"COLOHB\0\2"
DATAGRAM = struct.Struct(">8s16sQ")
MAC_SIZE = 32


class Heartbeat:
    def __init__(self, local_address: str, port: int, vm_uuid: str, interval_ms: int, timeout_ms: int,
                 on_lost: Callable[[str], None], keyed: bool = False):
        """``keyed``: MAC every datagram (``key`` goes to the peer; its key comes in ``start``)."""
        self.key = os.urandom(MAC_SIZE) if keyed else b""
        self.peer_key: bytes | None = None
        self.last_sequence = -1
        self.rejected = 0
        self.interval = interval_ms / 1000
        self.timeout = timeout_ms / 1000
        self.on_lost = on_lost
        self.uuid = uuidlib.UUID(vm_uuid).bytes
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((local_address, port))
        self.port = self.sock.getsockname()[1]
        self.peer: tuple[str, int] | None = None
        self.last_heard = time.monotonic()
        self.sent = 0
        self.received = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, peer_address: str, peer_port: int, peer_key: bytes | None = None) -> None:
        if bool(self.key) != (peer_key is not None):
            raise ValueError("both sides of a heartbeat are keyed, or neither")
        self.peer_key = peer_key
        self.peer = (peer_address, peer_port)
        self.last_heard = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="colo-heartbeat", daemon=True)
        self._thread.start()

    def age(self) -> float:
        """Seconds since the peer was last heard."""
        return time.monotonic() - self.last_heard

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)
        self.sock.close()

    def _run(self) -> None:
        next_send = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_send:
                self._send()
                next_send = now + self.interval
            if now - self.last_heard > self.timeout:
                log.warning("COLO heartbeat: nothing from %s:%d for %.0f ms", *self.peer, (now - self.last_heard) * 1000)
                self.on_lost(f"no heartbeat from the peer for {self.timeout * 1000:.0f} ms")
                return
            wait = max(min(next_send, self.last_heard + self.timeout) - now, 0.001)
            try:
                readable, _, _ = select.select([self.sock], [], [], wait)
            except (OSError, ValueError):
                return                      # closed by stop()
            if readable:
                self._receive()

    def _send(self) -> None:
        try:
            if self.key:
                body = DATAGRAM.pack(KEYED_MAGIC, self.uuid, self.sent)
                datagram = body + blake3.blake3(body, key=self.key).digest()
            else:
                datagram = DATAGRAM.pack(MAGIC, self.uuid, self.sent)
            self.sock.sendto(datagram, self.peer)
            self.sent += 1
        except OSError:
            pass                            # the network may come back before the timeout

    def _receive(self) -> None:
        try:
            data, source = self.sock.recvfrom(64)
        except OSError:
            return
        if source[0] != self.peer[0]:
            return
        if self.peer_key is not None:
            self._receive_keyed(data)
            return
        if len(data) != DATAGRAM.size:
            return
        magic, vm_uuid, _ = DATAGRAM.unpack(data)
        if magic == MAGIC and vm_uuid == self.uuid:
            self.last_heard = time.monotonic()
            self.received += 1

    def _receive_keyed(self, data: bytes) -> None:
        """Only the peer's key makes a datagram count, and only once: a source address is easy
        to forge on UDP, a MAC is not."""
        body = data[:DATAGRAM.size]
        if len(data) != DATAGRAM.size + MAC_SIZE or \
                not hmac.compare_digest(blake3.blake3(body, key=self.peer_key).digest(), data[DATAGRAM.size:]):
            self.rejected += 1
            return
        magic, vm_uuid, sequence = DATAGRAM.unpack(body)
        if magic != KEYED_MAGIC or vm_uuid != self.uuid or sequence <= self.last_sequence:
            self.rejected += 1
            return
        self.last_sequence = sequence
        self.last_heard = time.monotonic()
        self.received += 1
