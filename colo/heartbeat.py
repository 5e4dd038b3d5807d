"""The pair's heartbeat: UDP datagrams both ways, on a channel of its own.

QEMU's COLO has none (the operator says x-colo-lost-heartbeat).  Each node
binds a UDP port on the address its COLO connection uses (0 = any free port,
or the configured one), tells the peer that port in COLO_HELLO, and from
then on sends a datagram every ``interval`` and expects one within
``timeout``.  A frozen peer (SIGSTOP, a hung host) stops sending; a dead
peer also closes the COLO connection, which the checkpoint code notices.

    datagram   "COLOHB\\0\\1" (8)  vm uuid (16)  sequence u64 (big-endian)

Datagrams for another VM, or from another address, are ignored.
"""
from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
import uuid as uuidlib
from typing import Callable

log = logging.getLogger(__name__)

MAGIC = b"COLOHB\0\1"
DATAGRAM = struct.Struct(">8s16sQ")


class Heartbeat:
    def __init__(self, local_address: str, port: int, vm_uuid: str, interval_ms: int, timeout_ms: int,
                 on_lost: Callable[[str], None]):
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

    def start(self, peer_address: str, peer_port: int) -> None:
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
            self.sock.sendto(DATAGRAM.pack(MAGIC, self.uuid, self.sent), self.peer)
            self.sent += 1
        except OSError:
            pass                            # the network may come back before the timeout

    def _receive(self) -> None:
        try:
            data, source = self.sock.recvfrom(64)
        except OSError:
            return
        if source[0] != self.peer[0] or len(data) != DATAGRAM.size:
            return
        magic, vm_uuid, _ = DATAGRAM.unpack(data)
        if magic == MAGIC and vm_uuid == self.uuid:
            self.last_heard = time.monotonic()
            self.received += 1
