"""The primary's side of the COLO network layer (QEMU's filter-mirror + colo-compare):

    tap ──► MirroringBackend.receive ──► PVM                (the guest reads client frames)
                 └─► mirror queue ──► sender thread ──► packet channel ──► secondary
    PVM ──► MirroringBackend.transmit ──► compare inbox      (the guest's output is held)
    packet channel ──► receiver thread ──► compare inbox     (the SVM's output, with its epoch)
    compare inbox ──► comparer thread: Comparer ──► release ──► tap
                                          └─► mismatch/timeout ──► COLO checkpoint request

That is the Python twin.  With the native build and the NIC on its bare tap,
make_primary_filters gives NativePrimaryFilters: the same layer run by the PVM's NIC thread
in C (native/colo_path.c), no thread of its own (on a TLS channel, through the channel's
TlsRelay: only Python's ssl encrypts).

Only the comparer thread touches the Comparer; everything reaches it through its
inbox, in order.  A checkpoint puts a marker there: held PVM frames are released,
SVM frames dropped, and SVM frames from before the checkpoint (an older epoch)
are dropped when they arrive.  A broken channel is a lost peer for COLO.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import native
from appliance.vmm.devices import TapBackend

from .channel import PacketChannel, guarded
from .compare import FLOW_CLASSES, Comparer
from .settings import NetfilterSettings

log = logging.getLogger(__name__)
MIRROR_QUEUE = 4096          # client frames waiting to be mirrored; beyond, dropped and counted
BURST = 64                   # frames in one write to the packet channel
MIRROR_LIMIT = 4 << 20       # bytes of client frames the native mirror buffers; beyond, dropped and counted


class MirroringBackend:
    """The PVM's NIC backend in COLO: the tap, with client frames mirrored and guest frames held."""

    def __init__(self, tap, on_client_frame: Callable[[bytes], None], on_guest_frame: Callable[[bytes], None]):
        self.tap = tap
        self.on_client_frame = on_client_frame
        self.on_guest_frame = on_guest_frame

    def wait_fds(self) -> list[int]:
        return self.tap.wait_fds()

    def receive(self) -> bytes | None:
        frame = self.tap.receive()
        if frame is not None:
            self.on_client_frame(frame)
        return frame

    def transmit(self, frame: bytes) -> bool:
        self.on_guest_frame(frame)
        return True

    def close(self) -> None:
        """The tap stays with the NIC."""


class PrimaryFilters:
    def __init__(self, nic, channel: PacketChannel, settings: NetfilterSettings,
                 request_checkpoint: Callable[[str], None], on_lost: Callable[[str], None]):
        self.nic = nic
        self.tap = nic.backend          # the tap, or a survivor's rewriter in front of it: kept as it is
        self.channel = channel
        self.settings = settings
        self.on_lost = on_lost
        self.comparer = Comparer(self.tap.transmit, request_checkpoint,
                                 compare_timeout_ms=settings.compare_timeout_ms,
                                 max_queue_size=settings.max_queue_size,
                                 passthrough=[tuple(p) for p in settings.passthrough])
        self.mirror_dropped = 0
        self.mirror_epoch = 0           # the checkpoint the PVM's input follows (set while it is stopped)
        self.stale_dropped = 0          # SVM frames from before the last checkpoint
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._mirror: queue.SimpleQueue = queue.SimpleQueue()     # C-level: the cheapest put for the vCPU thread
        self._mirror_queued = 0         # roughly what _mirror holds (two threads count it, without a lock)
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=guarded, args=(loop, self._lost), name=f"colo-{name}", daemon=True)
                         for name, loop in (("mirror", self._mirror_loop), ("from-svm", self._receive_loop),
                                            ("compare", self._compare_loop))]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self.nic.attach(MirroringBackend(self.tap, self._mirror_frame, self._inbox.put))

    def checkpoint(self, epoch: int) -> None:
        """Both guests are equal as of checkpoint ``epoch`` (the PVM is stopped): release, drop,
        compare afresh; client frames the PVM reads from now on follow this checkpoint."""
        self.mirror_epoch = epoch
        self._inbox.put(("checkpoint", epoch))

    def stop(self, release: bool = True) -> None:
        """COLO ended: the PVM talks to its backend directly again; what is held is released,
        or with ``release=False`` (this node steps down) dropped.  Never waits on the peer."""
        self.nic.attach(self.tap)
        self._stopping.set()
        self.channel.shutdown()             # a sender stuck on a frozen peer fails at once
        self._inbox.put(("failover",) if release else ("drop",))
        self._mirror.put(None)
        for thread in self._threads:
            thread.join(5)
        self.channel.close()

    def counters(self) -> dict:
        return {**self.comparer.counters, "channel": self.channel.endpoints, "datapath": "python",
                "mirrored": self.channel.frames_sent, "mirror-dropped": self.mirror_dropped,
                "svm-frames": self.channel.frames_received, "stale-dropped": self.stale_dropped}

    # -- threads ---------------------------------------------------------------------------

    def _mirror_frame(self, frame: bytes) -> None:
        """On the vCPU thread: never wait."""
        if self._mirror_queued >= MIRROR_QUEUE:
            self.mirror_dropped += 1
            return
        self._mirror_queued += 1
        self._mirror.put((self.mirror_epoch, frame))

    def _mirror_loop(self) -> None:
        while (item := self._mirror.get()) is not None:
            burst = [item]
            while len(burst) < BURST:          # what queued meanwhile goes in the same write
                try:
                    item = self._mirror.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.channel.send_many(burst)
                    return
                burst.append(item)
            self._mirror_queued -= len(burst)
            self.channel.send_many(burst)

    def _receive_loop(self) -> None:
        while True:
            epoch, frame = self.channel.recv()
            self._inbox.put(("svm", epoch, frame))

    def _lost(self, why: str) -> None:
        if not self._stopping.is_set():
            self.on_lost(why)

    def _compare_loop(self) -> None:
        epoch, scan_every = 0, self.settings.expired_scan_cycle_ms / 1000
        next_scan = time.monotonic() + scan_every
        while True:
            try:
                item = self._inbox.get(timeout=max(next_scan - time.monotonic(), 0))
            except queue.Empty:
                item = None
            if time.monotonic() >= next_scan:
                self.comparer.scan_expired()
                next_scan = time.monotonic() + scan_every
            if item is None:
                continue
            if isinstance(item, bytes):
                self.comparer.primary(item)
            elif item[0] == "svm":
                if item[1] >= epoch:
                    self.comparer.secondary(item[2])
                else:
                    self.stale_dropped += 1
            elif item[0] == "checkpoint":
                epoch = item[1]
                self.comparer.checkpoint()
            else:
                if item[0] == "failover":
                    self.comparer.failover()
                return


def make_primary_filters(nic, channel: PacketChannel, settings: NetfilterSettings,
                         request_checkpoint: Callable[[str], None], on_lost: Callable[[str], None]):
    """The datapath in C when it can run it (module docstring), else the Python threads.  If
    they cannot be made, the channel is closed (with it, a TLS channel's relay)."""
    try:
        if native.IMPLEMENTATION == "native" and type(nic.backend) is TapBackend:
            return NativePrimaryFilters(nic, channel, settings, request_checkpoint, on_lost)
        return PrimaryFilters(nic, channel, settings, request_checkpoint, on_lost)
    except BaseException:
        channel.close()
        raise


class NativeMirroringBackend:
    """The PVM's NIC backend with the datapath in C: serve_rings runs it on the NIC thread and
    passes on what the comparer asked for and a broken channel.  The NicBackend calls are a
    Python pass's way in (injected frames or a hook on the NIC), through the same path."""

    def __init__(self, tap: TapBackend, path, request_checkpoint: Callable[[str], None],
                 on_lost: Callable[[str], None]):
        self.tap = tap
        self.path = path
        self.request_checkpoint = request_checkpoint
        self.on_lost = on_lost

    def serve_rings(self, *ring_args):
        result = self.path.serve(*ring_args)
        if (reason := self.path.take_request()) is not None:
            self.request_checkpoint(reason)
        if (why := self.path.take_lost()) is not None:
            self.on_lost(why)
        return result

    def wait_fds(self) -> list[int]:
        return self.tap.wait_fds()

    def receive(self) -> bytes | None:
        frame = self.tap.receive()
        if frame is not None:
            self.path.mirror(frame)
        return frame

    def transmit(self, frame: bytes) -> bool:
        self.path.compare(frame)
        return True

    def close(self) -> None:
        """The tap stays with the NIC."""


class NativePrimaryFilters:
    """PrimaryFilters' job with the datapath in C (native.ColoPrimary)."""

    def __init__(self, nic, channel: PacketChannel, settings: NetfilterSettings,
                 request_checkpoint: Callable[[str], None], on_lost: Callable[[str], None]):
        self.nic = nic
        self.tap = nic.backend
        self.channel = channel
        self.on_lost = on_lost
        self._stopping = threading.Event()
        self.path = native.ColoPrimary(
            self.tap.fd, *channel.native_fds(),
            compare_timeout_ms=settings.compare_timeout_ms, max_queue_size=settings.max_queue_size,
            passthrough=settings.passthrough,
            expired_scan_cycle_ms=settings.expired_scan_cycle_ms, mirror_limit=MIRROR_LIMIT)
        self._backend = NativeMirroringBackend(self.tap, self.path, request_checkpoint, self._lost)

    def start(self) -> None:
        self.nic.attach(self._backend)

    def checkpoint(self, epoch: int) -> None:
        """As PrimaryFilters.checkpoint: the PVM, and so the NIC thread, is stopped."""
        self.path.checkpoint(epoch)

    def stop(self, release: bool = True) -> None:
        """As PrimaryFilters.stop.  Once attach() returns the NIC thread is out of the path, so
        the channel's sockets can close under nobody."""
        self.nic.attach(self.tap)
        self._stopping.set()
        self.channel.close()
        if release:
            self.path.failover()

    def counters(self) -> dict:
        counters = self.path.counters()
        return {**{flow: counters.pop(flow) for flow in FLOW_CLASSES}, "channel": self.channel.endpoints,
                "datapath": "c", **counters}

    def _lost(self, why: str) -> None:
        if not self._stopping.is_set():
            self.on_lost(why)
