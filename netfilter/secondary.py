"""The secondary's side of the COLO network layer (QEMU's filter-redirector + filter-rewriter):

    packet channel ──► receiver thread ──► Rewriter.to_guest ──► QueueBackend.deliver ──► SVM
                         (client frames the PVM read, tagged with the PVM's epoch)
    SVM ──► RedirectingBackend ──► sender thread ──► Rewriter.from_guest ──► packet channel
              (tagged with the epoch it follows)

The SVM never touches its tap while in COLO.  At a checkpoint (the SVM stopped)
client frames it has not read are dropped, the epoch becomes the checkpoint's
number and the rewriter's offsets reset; what the SVM sent before carries the
older epoch and is dropped unrewritten by the sender thread.  At failover the tap comes
back behind a RewritingBackend, so connections whose sequence numbers were
offset keep working for as long as they live.

That is the Python twin.  With the native build make_secondary_filters gives
NativeSecondaryFilters: the redirector and the rewriter run by the SVM's NIC thread in C
(native/colo_path.c), no thread of their own (on a TLS channel, through the channel's
TlsRelay: only Python's ssl encrypts); SVM frames the channel cannot take yet wait in the
guest's TX ring.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable

import native
from appliance.vmm.devices import QueueBackend

from .channel import PacketChannel, guarded
from .packet import PacketError, fix_checksums, parse
from .rewriter import Rewriter

log = logging.getLogger(__name__)
TX_QUEUE = 4096             # SVM frames waiting for the sender thread
BURST = 64                  # frames in one write to the packet channel
OUT_LIMIT = 4 << 20         # bytes of SVM frames the native path buffers for the channel
SCAN_EVERY = 10.0           # seconds between the rewriter's sweeps of closed and idle connections
# A test hook: the SVM's Nth TCP segment with data leaves with its last byte changed, as if
# the SVM had diverged, so tests can show the comparer catching it (0: never).
DIVERGE_AT = int(os.environ.get("COLO_APPLIANCE_TEST_DIVERGE_SVM", "0"))


class RewritingBackend:
    """The tap after failover, with the live connections' sequence numbers still rewritten."""

    def __init__(self, tap, rewriter: Rewriter):
        self.tap = tap
        self.rewriter = rewriter
        self._lock = threading.Lock()
        self._next_scan = time.monotonic() + SCAN_EVERY

    def wait_fds(self) -> list[int]:
        return self.tap.wait_fds()

    def receive(self) -> bytes | None:
        frame = self.tap.receive()
        if frame is None:
            return None
        with self._lock:
            return self.rewriter.to_guest(frame)

    def transmit(self, frame: bytes) -> bool:
        with self._lock:
            frame = self.rewriter.from_guest(frame)
            if time.monotonic() >= self._next_scan:           # closed and idle connections go
                self.rewriter.scan_expired()
                self._next_scan = time.monotonic() + SCAN_EVERY
        return self.tap.transmit(frame)

    def close(self) -> None:
        """The tap stays with the NIC."""


class RedirectingBackend:
    """The SVM's NIC backend in COLO: client frames from the primary, output to the sender
    thread through a C-level queue (the cheapest hand-off for the vCPU thread)."""

    def __init__(self, inbound: QueueBackend, outbox: queue.SimpleQueue, epoch: Callable[[], int]):
        self.inbound = inbound
        self.outbox = outbox
        self.epoch = epoch
        self.queued = 0                 # roughly what outbox holds (two threads count it, without a lock)
        self.dropped = 0

    def wait_fds(self) -> list[int]:
        return self.inbound.wait_fds()

    def receive(self) -> bytes | None:
        return self.inbound.receive()

    def transmit(self, frame: bytes) -> bool:
        if self.queued >= TX_QUEUE:
            self.dropped += 1
            return False
        self.queued += 1
        self.outbox.put((self.epoch(), frame))
        return True

    def close(self) -> None:
        self.inbound.close()
        self.outbox.put(None)


class SecondaryFilters:
    def __init__(self, nic, channel: PacketChannel, on_lost: Callable[[str], None]):
        self.nic = nic
        self.channel = channel
        self.on_lost = on_lost
        self.backend = RedirectingBackend(QueueBackend(), queue.SimpleQueue(), lambda: self.epoch)
        self.rewriter = Rewriter()
        self.epoch = 0
        self.checkpoint_dropped = 0
        self.data_segments = 0          # the SVM's TCP segments with data (for DIVERGE_AT)
        self._lock = threading.Lock()   # the rewriter, the epoch and taking the SVM's frames
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=guarded, args=(loop, self._lost), name=f"colo-{name}", daemon=True)
                         for name, loop in (("to-svm", self._to_svm_loop), ("from-svm", self._from_svm_loop))]

    def start(self) -> None:
        self.nic.attach(self.backend).close()
        for thread in self._threads:
            thread.start()

    def checkpoint(self, epoch: int) -> None:
        """The SVM is stopped and about to load checkpoint ``epoch``: what it sent and was not
        forwarded yet, and client frames the PVM read before the checkpoint, are stale now."""
        with self._lock:
            self.checkpoint_dropped += self.backend.inbound.drop_undelivered()
            self.epoch = epoch
            self.rewriter.checkpoint()

    def stop(self, takeover: bool) -> None:
        """COLO ended; with ``takeover`` the SVM is the service guest: back on its tap."""
        self._stopping.set()
        self.channel.shutdown()
        self.backend.close()
        for thread in self._threads:
            thread.join(5)
        self.channel.close()
        if takeover:
            self.rewriter.failover()
            self.nic.attach(RewritingBackend(self.nic.tap_backend, self.rewriter))
        else:
            self.nic.attach(QueueBackend())

    def counters(self) -> dict:
        return {**self.rewriter.counters, "channel": self.channel.endpoints, "datapath": "python",
                "from-primary": self.channel.frames_received,
                "to-primary": self.channel.frames_sent,
                "checkpoint-dropped": self.checkpoint_dropped, "svm-dropped": self.backend.dropped,
                "to-svm-dropped": self.backend.inbound.rx_dropped}

    def _to_svm_loop(self) -> None:
        while True:
            epoch, frame = self.channel.recv()
            with self._lock:
                if epoch < self.epoch:          # the PVM read it before the last checkpoint
                    self.checkpoint_dropped += 1
                    continue
                frame = self.rewriter.to_guest(frame)
            self.backend.inbound.deliver(frame)

    def _from_svm_loop(self) -> None:
        outbox = self.backend.outbox
        while (item := outbox.get()) is not None:
            items = [item]
            while len(items) < BURST:              # what queued meanwhile goes in the same write
                try:
                    items.append(outbox.get_nowait())
                except queue.Empty:
                    break
            self.backend.queued -= len(items)
            burst = []
            with self._lock:                        # the rewriter learns only from the current epoch
                for item in items:
                    if item is None:
                        break
                    epoch, frame = item
                    if epoch < self.epoch:
                        self.checkpoint_dropped += 1
                        continue
                    frame = self.rewriter.from_guest(frame)
                    burst.append((epoch, self._diverge(frame) if DIVERGE_AT else frame))
            if burst:
                self.channel.send_many(burst)
            if None in items:
                return

    def _diverge(self, frame: bytes) -> bytes:
        try:
            packet = parse(frame)
        except PacketError:
            return frame
        if packet.tcp is None or not len(packet.tcp.payload):
            return frame
        self.data_segments += 1
        if self.data_segments != DIVERGE_AT:
            return frame
        log.warning("test hook: the SVM's TCP segment %d diverges", DIVERGE_AT)
        last = packet.ip_offset + packet.total_length - 1          # the segment's last data byte
        return fix_checksums(frame[:last] + bytes([frame[last] ^ 0x20]) + frame[last + 1:])

    def _lost(self, why: str) -> None:
        if not self._stopping.is_set():
            self.on_lost(why)


def make_secondary_filters(nic, channel: PacketChannel, on_lost: Callable[[str], None]):
    """The datapath in C when it can run it (module docstring), else the Python threads.  If
    they cannot be made, the channel is closed (with it, a TLS channel's relay)."""
    try:
        if native.IMPLEMENTATION == "native":
            return NativeSecondaryFilters(nic, channel, on_lost)
        return SecondaryFilters(nic, channel, on_lost)
    except BaseException:
        channel.close()
        raise


class NativeRedirectingBackend:
    """The SVM's NIC backend with the datapath in C: serve_rings runs it on the NIC thread and
    passes on a broken channel.  The NicBackend calls are a Python pass's way in."""

    def __init__(self, path, on_lost: Callable[[str], None]):
        self.path = path
        self.on_lost = on_lost

    def serve_rings(self, *ring_args):
        result = self.path.serve(*ring_args)
        if (why := self.path.take_lost()) is not None:
            self.on_lost(why)
        return result

    def wait_fds(self) -> list[int]:
        return []

    def receive(self) -> bytes | None:
        return None                 # client frames reach the SVM in serve_rings only

    def transmit(self, frame: bytes) -> bool:
        return self.path.send(frame)

    def close(self) -> None:
        """The path goes with the filters."""


class NativeSecondaryFilters:
    """SecondaryFilters' job with the datapath in C (native.ColoSecondary)."""

    def __init__(self, nic, channel: PacketChannel, on_lost: Callable[[str], None]):
        self.nic = nic
        self.channel = channel
        self.on_lost = on_lost
        self.rewriter = Rewriter()
        self._stopping = threading.Event()
        out_fd, in_fd = channel.native_fds()
        self.path = native.ColoSecondary(in_fd, out_fd, self.rewriter,
                                         out_limit=OUT_LIMIT, diverge_at=DIVERGE_AT)

    def start(self) -> None:
        self.nic.attach(NativeRedirectingBackend(self.path, self._lost)).close()

    def checkpoint(self, epoch: int) -> None:
        """As SecondaryFilters.checkpoint: the SVM, and so the NIC thread, is stopped."""
        self.path.checkpoint(epoch)

    def stop(self, takeover: bool) -> None:
        """As SecondaryFilters.stop.  Once the first attach() returns the NIC thread is out of
        the path: the channel's sockets close under nobody, and the rewriter is this thread's."""
        self._stopping.set()
        detached = QueueBackend()
        self.nic.attach(detached)
        self.channel.close()
        if takeover:
            self.rewriter.failover()
            self.nic.attach(RewritingBackend(self.nic.tap_backend, self.rewriter))
            detached.close()

    def counters(self) -> dict:
        return {**self.rewriter.counters, "channel": self.channel.endpoints, "datapath": "c",
                **self.path.counters()}

    def _lost(self, why: str) -> None:
        if not self._stopping.is_set():
            self.on_lost(why)
