"""The primary's checkpoint loop (QEMU's colo_process_checkpoint), on the migration
thread once the guest is copied.  protocol.py draws the transaction.

Between checkpoints the PVM runs and the loop waits for a trigger: the
x-checkpoint-delay timer (read live, so migrate-set-parameters takes effect at
once), or a request (``request_checkpoint``: the netfilter comparer on a
mismatch, xen-colo-do-checkpoint).  Each checkpoint first sends what the PVM
dirtied while it still runs (again, while a round is large), so the pause
carries only what it dirtied during the last round.
"""
from __future__ import annotations

import logging
import threading
import time

from netfilter.channel import ChannelError, PacketChannel
from netfilter.primary import NativePrimaryFilters, PrimaryFilters, make_primary_filters
from replication import stream
from replication.source import bitmap_runs, describe
from replication.transport import TransportError

from . import protocol

from .failover import FailoverStatus
from .protocol import ColoMessage as M, ExitReason, PeerExited
from .session import ColoSession

log = logging.getLogger(__name__)
TRIGGER_POLL = 0.02          # seconds between looks at the delay, requests and the peer
MAX_LIVE_ROUNDS = 4          # precopy rounds before a checkpoint's pause...
SMALL_ROUND_PAGES = 1024     # ...stopping early once a round carried less than 4 MiB


class ColoPrimary(ColoSession):
    mode = "primary"

    def __init__(self, manager, source):
        super().__init__(manager, source, source.channel)
        self.source = source
        self.writer = source.writer             # pages onto the connection, the digest of what was sent
        self.migration_stats = source.stats     # query-migrate's figures go on counting in state colo
        self.steps = protocol.Steps("primary", self.channel)
        self.filters: PrimaryFilters | NativePrimaryFilters | None = None
        self.tell_secondary: str | None = None   # the ABORT message for a secondary that is alive
        self.local_error: str | None = None      # this node failed: its guest must stay stopped
        self._requested: str | None = None
        self._request_lock = threading.Lock()
        self._last_checkpoint = time.monotonic()

    def request_mismatch(self, reason: str) -> None:
        """From the comparer: the guests' output differs (or waited too long)."""
        self.request_checkpoint("mismatch")

    def request_checkpoint(self, reason: str) -> None:
        """From any thread: a checkpoint as soon as possible (requests coalesce)."""
        with self._request_lock:
            self._requested = self._requested or reason

    def stop_loop(self) -> None:
        """A checkpoint under way finishes, then the loop tells the secondary (a planned exit);
        a secondary that hangs meanwhile is found by the heartbeat, which cuts the connection."""
        self.stopping.set()

    def run(self) -> None:
        try:
            self.new_heartbeat()
            peer_port, packet_port, peer_key = protocol.read_hello(self.channel)
            self.steps.expect(M.CHECKPOINT_READY)
            self.channel.send(stream.pack_colo_hello(self.heartbeat.port, heartbeat_key=self.heartbeat.key))
            self.start_heartbeat(peer_port, peer_key)
            if self.vm.nic is not None and packet_port:
                packets = PacketChannel.connect(self.peer_address, packet_port, tls=self.channel.tls)
                self.filters = make_primary_filters(self.vm.nic, packets, self.manager.netfilter,
                                                    self.request_mismatch, self.peer_lost)
                self.filters.start()
                # What the PVM read before the mirror was up never reached the SVM: the first
                # checkpoint comes at once, so the pair is in step before the first failover can be.
                self._last_checkpoint = 0.0
            log.info("COLO primary: secondary ready, heartbeat to port %d, packet channel %s", peer_port,
                     packet_port or "none")
            while not self.stopping.is_set():
                reason = self._wait_for_trigger()
                if reason is not None:
                    self._checkpoint(reason)
        except PeerExited as e:
            self.lost = f"the secondary left COLO: {e}"
            log.warning("COLO primary: %s", self.lost)
            self.request_failover(ExitReason.ERROR)      # it is alive and gave up: nothing to wait for
        except protocol.ColoProtocolError as e:
            # The secondary is alive but broke the transaction: tell it to stop, and run on.
            self.tell_secondary = f"the primary refused the secondary's message: {e}"
            log.error("COLO primary: %s", e)
            self.request_failover(ExitReason.ERROR)
        except (TransportError, ChannelError) as e:
            if not self.stopping.is_set() or self.lost:
                self.peer_lost(self.lost or describe(e))
        except Exception as e:
            # A fault of this node: its guest must not run on beside a secondary that takes over.
            self.local_error = describe(e)
            log.exception("COLO primary: this node failed; its guest stays stopped, the secondary takes over")
            self.peer_lost(f"this node failed: {self.local_error}")
        self._end()

    def _wait_for_trigger(self) -> str | None:
        while not self.stopping.is_set():
            with self._request_lock:
                reason, self._requested = self._requested, None
            if reason:
                return reason
            delay = self.source.params["x-checkpoint-delay"] / 1000
            if time.monotonic() - self._last_checkpoint >= delay:
                return "periodic"
            if self.channel.peer_spoke():       # a secondary speaks unasked only to leave, or by dying
                protocol.read_message(self.channel)
                raise protocol.ColoProtocolError("the secondary spoke out of turn")
            self.stopping.wait(min(TRIGGER_POLL, delay))
        return None

    def _checkpoint(self, reason: str) -> None:
        writer, migration_stats, vm, steps = self.writer, self.migration_stats, self.vm, self.steps
        sent_before = migration_stats.transferred
        steps.checkpoint += 1
        migration_stats.dirty_sync_count += 1  # as QEMU's query-migrate counts a checkpoint's bitmap sync
        # Live rounds: what the PVM dirtied so far, while it runs, until a round is small.
        for _ in range(MAX_LIVE_ROUNDS):
            runs = bitmap_runs(vm.fetch_dirty_bitmap())
            writer.send_dirty_runs(runs)
            writer.end_pass(steps.checkpoint)
            writer.digest.refresh()
            if sum(count for _, count in runs) < SMALL_ROUND_PAGES:
                break
        steps.send(M.CHECKPOINT_REQUEST)
        steps.expect(M.CHECKPOINT_REPLY)
        pause_start = time.monotonic()
        was_running = vm.pause_for_checkpoint()
        try:
            steps.send(M.VMSTATE_SEND)
            writer.send_dirty_runs(bitmap_runs(vm.fetch_dirty_bitmap()))
            writer.end_pass(stream.FINAL_PASS)
            sections = vm.save_devices()
            full = writer.full_digest() if self.settings.verify_ram else None
            vmstate = b"".join(stream.pack_device(*s) for s in sections) + writer.end_record(sections, full)
            steps.send(M.VMSTATE_SIZE, len(vmstate))
            steps.send_vmstate(vmstate)
            migration_stats.transferred += len(vmstate)
            steps.expect(M.VMSTATE_RECEIVED)
            if self.filters is not None:
                self.filters.checkpoint(steps.checkpoint)
            steps.expect(M.VMSTATE_LOADED)
        except BaseException:
            self.manager.stats.failed_checkpoints += 1
            raise                         # the guest stays stopped until failover decides
        vm.end_checkpoint(run=True)
        pause = time.monotonic() - pause_start if was_running else None
        self._last_checkpoint = time.monotonic()
        self.manager.stats.record(reason, pause, migration_stats.transferred - sent_before)
        if full is not None:
            self.manager.stats.digests.append((steps.checkpoint, full.hex()))

    def _end(self) -> None:
        """Failover on the primary (QEMU's primary_vm_do_failover): the PVM runs on, unprotected,
        unless this node failed or is going away: then it stays stopped, and the secondary, which
        sees the connection close, takes over.  Exactly one copy runs either way."""
        self.vm.end_checkpoint(run=False)           # a checkpoint cut short: still stopped for now
        if self.failover.status is not FailoverStatus.NONE and not self.lost and not self.tell_secondary:
            self.tell_secondary = "planned exit: the primary left COLO"
        if self.tell_secondary:
            try:        # between checkpoints: the secondary stops its SVM instead of taking over
                self.channel.send(stream.pack_abort(self.tell_secondary), timeout=1.0)
                self.channel.linger(1.0)
            except TransportError:
                pass
        self.channel.abort()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.wait_for_failover()                    # manual: the guest is held first
        step_down = self.local_error is not None or self.manager.shutting_down
        if self.filters is not None:
            self.filters.stop(release=not step_down)    # what the SVM may never have said stays unsaid
        if step_down:
            self.vm.pause()
        elif self.vm.state == "colo":
            self.vm.end_checkpoint(run=True)
        elif self.held:
            self.vm.resume()
        self.manager.finish(self, self.exit_reason)
