"""The secondary's incoming loop (QEMU's colo_process_incoming_thread), on the incoming
migration thread once the SVM runs.  protocol.py draws the transaction.

Pages go to the colo cache (cache.py), which the destination writes into from
now on; the SVM's RAM changes only while a complete, digest-checked checkpoint
is loaded.  On failover the SVM runs on from its own state; a checkpoint that
arrived whole (vmstate-received sent) but was not loaded yet is loaded first.
"""
from __future__ import annotations

import logging
import os
import socket
import time

from appliance.vmm.devices import QueueBackend
from appliance.vmm.errors import StateFileError
from netfilter.channel import ChannelError, PacketChannel
from netfilter.secondary import NativeSecondaryFilters, SecondaryFilters, make_secondary_filters
from replication import stream
from replication.transport import TransportError

from . import protocol
from .cache import ColoCache
from .failover import FailoverStatus
from .protocol import ColoMessage as M, ExitReason, PeerExited
from .session import ColoSession

log = logging.getLogger(__name__)
PAGE_RECORDS = (stream.PAGES, stream.ZERO_RUN, stream.XBZRLE)


class ColoSecondary(ColoSession):
    mode = "secondary"

    def __init__(self, manager, destination, channel):
        super().__init__(manager, destination, channel)
        self.dest = destination
        _, self.ram_size, ram_fd, self.svm_ram = self.vm.ram_regions()[0]
        self.cache = ColoCache(ram_fd, self.svm_ram, self.ram_size)
        self.steps = protocol.Steps("secondary", channel)
        self.filters: SecondaryFilters | NativeSecondaryFilters | None = None
        self.received: list | None = None     # device sections of a whole checkpoint not yet loaded
        self.packet_listener: socket.socket | None = None
        self.planned_exit = False              # the primary left COLO, or we refused its checkpoint
        self.refused: str | None = None
        # A test hook: widen the load window so failover can be asked for inside it (relaunch).
        self.load_delay = float(os.environ.get("COLO_APPLIANCE_TEST_LOAD_DELAY_MS", "0")) / 1000

    def prepare(self) -> None:
        """Before the SVM runs: its dirty log starts (a page it writes from its first instruction
        on is flushed at the first checkpoint), and its NIC leaves its tap: the service network
        hears only the primary.  Until the packet channel is up, the SVM gets no input and its
        output is dropped."""
        self.vm.start_dirty_tracking()
        if self.vm.nic is not None:
            self.vm.nic.attach(QueueBackend())

    def peer_lost(self, why: str) -> None:
        super().peer_lost(why)
        self._close_listener()

    def stop_loop(self) -> None:
        super().stop_loop()
        self._close_listener()

    def run(self) -> None:
        try:
            self.dest.retarget(self.cache.map)
            self.dest.received_pages = 0
            self.packet_listener = self._packet_listener()
            heartbeat = self.new_heartbeat()
            self.channel.send(stream.pack_colo_hello(
                heartbeat.port, self.packet_listener.getsockname()[1] if self.packet_listener else 0, heartbeat.key))
            self.steps.send(M.CHECKPOINT_READY)
            peer_port, _, peer_key = protocol.read_hello(self.channel)
            self.start_heartbeat(peer_port, peer_key)
            if self.packet_listener is not None:
                try:
                    channel = PacketChannel.accept(self.packet_listener, self.peer_address, tls=self.channel.tls)
                except ChannelError as e:           # the primary is alive: it just cannot reach us
                    raise protocol.ColoProtocolError(str(e)) from e
                finally:
                    self._close_listener()
                self.filters = make_secondary_filters(self.vm.nic, channel, self.peer_lost)
                self.filters.start()
            while not self.stopping.is_set():
                kind = self.channel.read_exact(1)[0]
                if kind in PAGE_RECORDS:
                    self.dest.apply_record(self.channel, kind)       # live round: into the cache
                elif kind == stream.PASS_END:
                    stream.read_pass_end(self.channel)
                    self.dest.digest.refresh()                # off the pause
                else:
                    self.steps.checkpoint += 1
                    self.steps.expect(M.CHECKPOINT_REQUEST, first_byte=kind)
                    self._checkpoint()
        except PeerExited as e:
            self.planned_exit = True
            log.info("COLO secondary: %s", e)
        except TransportError as e:
            if not self.stopping.is_set():
                self.peer_lost(str(e))
        except Exception as e:
            # A checkpoint we cannot take, or a fault of this node: the SVM no longer follows
            # the primary, so it must not take over; the primary (alive) runs on.
            if not self.stopping.is_set():
                if not isinstance(e, (stream.StreamError, protocol.ColoProtocolError, StateFileError)):
                    log.exception("COLO secondary: this node failed")
                self._refuse(str(e))
        self._end()

    def _close_listener(self) -> None:
        if self.packet_listener is not None:
            self.packet_listener.close()

    def _packet_listener(self) -> socket.socket | None:
        """Where the primary connects the packet channel (a guest with a NIC only)."""
        if self.vm.nic is None:
            return None
        return socket.create_server((self.channel.sock.getsockname()[0], self.manager.netfilter.packet_port))

    def _checkpoint(self) -> None:
        channel, steps = self.channel, self.steps
        self.vm.pause_for_checkpoint()
        steps.send(M.CHECKPOINT_REPLY)
        steps.expect(M.VMSTATE_SEND)
        while True:
            kind = channel.read_exact(1)[0]
            if kind in PAGE_RECORDS:
                self.dest.apply_record(channel, kind)
            elif kind == stream.PASS_END:
                if stream.read_pass_end(channel) == stream.FINAL_PASS:
                    break
            else:
                raise protocol.ColoProtocolError(f"record type {kind} inside a checkpoint's RAM")
        size = steps.expect(M.VMSTATE_SIZE)
        if size > protocol.MAX_VMSTATE_SIZE:
            raise protocol.ColoProtocolError(f"a checkpoint's vmstate of {size} bytes")
        vmstate = stream.BytesReader(channel.read_exact(size))
        sections = []
        while (kind := vmstate.read_exact(1)[0]) == stream.DEVICE:
            sections.append(stream.read_device(vmstate))
        if kind != stream.END:
            raise protocol.ColoProtocolError(f"record type {kind} in a checkpoint's vmstate")
        self.dest.check_end(vmstate, sections)
        if vmstate.left:
            raise protocol.ColoProtocolError(f"{vmstate.left} stray bytes after a checkpoint's END")
        self.vm.check_sections(sections)      # refused now, before vmstate-received, not half-loaded
        self.received = sections
        steps.send(M.VMSTATE_RECEIVED)
        if self.filters is not None:
            self.filters.checkpoint(steps.checkpoint)
        self._load()
        steps.send(M.VMSTATE_LOADED)
        self.vm.end_checkpoint(run=not self.stopping.is_set())

    def _load(self) -> None:
        """colo_flush_ram_cache, then the devices: the SVM becomes the PVM as of the checkpoint."""
        self.loading = True
        try:
            if self.load_delay:
                time.sleep(self.load_delay)
            svm_dirty = self.vm.fetch_dirty_bitmap()
            changed = self.dest.received_pages | int.from_bytes(svm_dirty, "little")
            self.dest.received_pages = 0
            self.cache.flush(self.svm_ram, changed.to_bytes(len(svm_dirty), "little"))
            self.vm.load_devices(self.received)
            self.dest.verify_guest_ram()
            if self.dest.full_digest is not None:
                self.manager.stats.digests.append((self.steps.checkpoint, self.dest.full_digest.hex()))
            self.received = None
            self.manager.stats.loaded += 1
        finally:
            self.loading = False
        self.after_relaunch()

    def _refuse(self, why: str) -> None:
        """The primary is alive but sent a checkpoint we cannot take: tell it, and stop the SVM
        (it no longer follows the primary, so it must not take over)."""
        log.error("COLO secondary: refusing a checkpoint: %s", why)
        self.manager.stats.failed_checkpoints += 1
        self.planned_exit = True
        self.refused = why
        try:
            self.channel.send(stream.pack_abort(f"the secondary refused a checkpoint: {why}"), timeout=1.0)
            self.channel.linger(1.0)
        except Exception:
            pass

    def _end(self) -> None:
        self.channel.abort()
        self._close_listener()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.vm.end_checkpoint(run=False)      # a checkpoint cut short: still stopped for now
        no_takeover = self.planned_exit or self.manager.shutting_down
        if no_takeover and self.failover.status is FailoverStatus.NONE:
            self.vm.pause()                    # the primary runs the service, or this node goes away
            if self.filters is not None:
                self.filters.stop(takeover=False)
            self._close_cache()
            reason = ExitReason.REQUEST if self.planned_exit and not self.refused else ExitReason.ERROR
            self.manager.finish(self, reason, takeover=False)
            return
        self.wait_for_failover()
        if self.received is not None:          # arrived whole: load it before taking over
            try:
                self._load()
            except Exception:
                # Its sections were checked before vmstate-received: this is a fault of this
                # node, and a half-loaded SVM must not run.
                log.exception("COLO secondary: the last whole checkpoint could not be loaded; "
                              "the SVM stays stopped")
                self.vm.pause()
                self._close_cache()
                self.manager.finish(self, ExitReason.ERROR, takeover=False)
                return
        self._close_cache()
        self.manager.stats.failovers += 1
        if self.filters is not None:
            self.filters.stop(takeover=True)
        elif self.vm.nic is not None:
            self.vm.nic.attach(self.vm.nic.tap_backend).close()
        stopped = self.vm.state             # colo: mid-checkpoint; paused: manual failover held it
        self.manager.finish(self, self.exit_reason, takeover=True)
        if stopped == "colo":                  # QEMU: COLO_EXIT, then the SVM runs
            self.vm.end_checkpoint(run=True)
        elif stopped == "paused":
            self.vm.resume()

    def _close_cache(self) -> None:
        self.vm.stop_dirty_tracking()
        self.dest.retarget(self.svm_ram)
        self.cache.close()
