"""Precopy live migration, source side: the pass driver.

One thread runs the whole migration, as QEMU's migration thread does::

    setup      connect [TLS], header, the destination's   MIGRATION setup, MIGRATION_PASS 1
               admission reply (sockets), dirty logging
    bulk       every page once (holes as zero runs)       MIGRATION active
    passes     sync the dirty log, resend what changed,   MIGRATION_PASS n
               until the expected downtime fits downtime-limit
    stop       pause the guest                            STOP
               [pre-switchover: wait for migrate-continue]
    device     final sync and pages, device sections,     MIGRATION_PASS n+1
               RAM digest; wait for the destination's verdict
    completed  the guest stays paused here (postmigrate)  MIGRATION completed
    colo       (x-colo) instead of completing: the guest  MIGRATION colo, RESUME
               runs on here and the thread hands the open
               connection to COLO (colo/primary.py), which
               ends in completed after a failover or exit

Any error or a cancel ends in ``failed`` / ``cancelled`` with the guest
running again as it was; the first error is the one reported.

Four parts, each with one job; each calls those drawn under it::

    MigrationSource          states, passes and when to stop, the guest, devices,
      |   (this module)      END, the verdict, cancel; opens the channels
      |-- PageWriter         pages -> records: zero runs, PAGES, XBZRLE (XbzrleCache),
      |     (pages.py)       plain / compress pool / multifd senders; marks the RamDigest;
      |       |              calls ``check`` (MigrationSource._check_cancel) as it goes
      |       '-- MigrationStats.account      counts what it sends, keeps to max-bandwidth
      |-- DirtyLog           the dirty log: read at each sync, and every 100 ms between
      |   (this module)      them by its own thread (the live dirty-pages-rate)
      '-- MigrationStats     the figures, measured live; the driver adds syncs and digest
            (stats.py)       refreshes; info() renders them as query-migrate

    x-colo: colo_handover(source, enter) -> ColoPrimary (colo/primary.py), which carries
            on with source.channel, source.writer and source.stats (and reads the
            live source.params for x-checkpoint-delay)
"""
from __future__ import annotations

import logging
import mmap
import threading
import time
from typing import Callable

import native

from . import stream
from .pages import PAGE_SIZE, PageWriter
from .ram import RamDigest, data_extents
from .state import MigrationRun
from .stats import MigrationStats
from .tls import ClientTls, TlsError
from .transport import STALL_TIMEOUT, Channel, TransportError, connect
from .xbzrle import XbzrleCache

log = logging.getLogger(__name__)

RUNSTATE_SECTION = "migration.runstate"
VERDICT_TIMEOUT = 60.0            # seconds for the destination to check the digest and load devices
DIRTY_SAMPLE = 0.1                # seconds between reads of the dirty log during the live passes


class MigrationCancelled(Exception):
    pass


class MigrationFailed(Exception):
    pass


class VerdictLost(MigrationFailed):
    """Everything was sent but the destination's answer never came: it may be running the guest."""


def bitmap_runs(bitmap: bytes) -> list[tuple[int, int]]:
    """Runs (first page, count) of set bits in a KVM dirty bitmap (bit i = page i)."""
    flat = native.bitmap_runs(bitmap)
    return list(zip(flat[::2], flat[1::2]))


def describe(e: Exception) -> str:
    """An exception as error-desc says it: our own errors by their message alone."""
    if isinstance(e, (TransportError, MigrationFailed)):
        return str(e)
    return f"{type(e).__name__}: {e}"


class DirtyLog:
    """The guest's dirty log for the pass driver.  Reading it clears it, so besides the syncs
    (``sync``, one per pass) a thread of its own reads it every DIRTY_SAMPLE seconds while the
    live passes run, keeping what it finds for the next sync: dirty-pages-rate is then measured
    live, pages found since the last sync over the time since it."""

    def __init__(self, vm, stats: MigrationStats):
        self.vm = vm
        self.stats = stats
        self._found = 0                   # pages read from the log since the last sync (bit i = page i)
        self._size = 0                    # bytes of a bitmap
        self._last_sync = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_sampling(self, since: float) -> None:
        """Dirty tracking is on; ``since`` counts as the last sync."""
        self._last_sync = since
        self._thread = threading.Thread(target=self._sample, name="dirty-log", daemon=True)
        self._thread.start()

    def stop_sampling(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(DIRTY_SAMPLE):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._read()
                except Exception as e:      # the next sync reads the log and fails on its own
                    log.warning("dirty log sampling stopped: %s", e)
                    return
                found, seconds = self._found.bit_count(), time.monotonic() - self._last_sync
            self.stats.dirty_sampled(found, seconds)

    def _read(self) -> None:
        bitmap = self.vm.fetch_dirty_bitmap()
        self._size = len(bitmap)
        self._found |= int.from_bytes(bitmap, "little")

    def sync(self) -> tuple[bytes, float]:
        """Every page dirtied since the last sync, as a bitmap, and the seconds since it."""
        with self._lock:
            self._read()
            found, self._found = self._found, 0
            now = time.monotonic()
            seconds, self._last_sync = now - self._last_sync, now
        return found.to_bytes(self._size, "little"), seconds


class MigrationSource(MigrationRun):
    role = "migration"

    def __init__(self, vm, uri: str, capabilities: dict[str, bool], parameters: dict,
                 named_fds: dict[str, int], on_event: Callable[[str, dict], None], *,
                 verify_ram: bool = False, colo_handover: Callable[["MigrationSource", Callable], None] | None = None,
                 tls: ClientTls | None = None, file_overwrite: bool = False):
        """``colo_handover(source, enter)`` runs COLO on the open connection once the guest is
        copied (x-colo), calling ``enter()`` first (state colo, guest resumed); ``verify_ram``
        sends a from-scratch digest of all RAM with every END; ``tls`` wraps every channel;
        ``file_overwrite`` lets a file: URI replace an existing file."""
        super().__init__(on_event)
        self.tls = tls
        self.file_overwrite = file_overwrite
        self.verify_ram = verify_ram
        self.colo_handover = colo_handover
        self.vm = vm
        self.uri = uri
        self.caps = dict(capabilities)
        self.params = parameters      # live: downtime-limit and max-bandwidth may change mid-way, as in QEMU
        self.named_fds = named_fds
        self.ram_released = False
        self._committed = False       # END is on its way: only the destination's verdict decides now
        self._cancel = threading.Event()
        self._continue = threading.Event()
        self._channels: list[Channel] = []
        _, self.ram_size, self.memfd, ram = vm.ram_regions()[0]
        self.ram = memoryview(ram)
        self.digest = RamDigest(self.ram, self.ram_size, [])      # of what was sent: the writer keeps it
        self.xbzrle = XbzrleCache(self.params["xbzrle-cache-size"], PAGE_SIZE) if self.caps["xbzrle"] else None
        self.stats = MigrationStats(self.ram_size, self.params, self.xbzrle,
                                    auto_converge=self.caps["auto-converge"], compress=self.caps["compress"])
        self.writer: PageWriter | None = None     # once the main channel is open
        self.dirty_log = DirtyLog(vm, self.stats)
        self._dirty_bitmap = b""                  # of the last live sync: the final pass sends it too
        self._dirty_runs: list[tuple[int, int]] = []
        self._high_dirty = 0                      # syncs in a row above auto-converge's threshold

    # -- control (called from the event loop) ----------------------------------------

    def cancel(self) -> bool:
        """Cancel, unless the whole state has been sent (then the destination decides)."""
        with self._lock:
            if self._committed:
                return False
            cancellable = self.status in ("setup", "active", "pre-switchover", "device")
        if cancellable and self.set_state(("setup", "active", "pre-switchover", "device"), "cancelling"):
            self._cancel.set()
            for channel in list(self._channels):
                channel.abort()
            return True
        return False

    def continue_from(self, state: str) -> bool:
        if self.status != state:
            return False
        self._continue.set()
        return True

    @property
    def running(self) -> bool:
        return self.status in ("setup", "active", "pre-switchover", "device", "cancelling", "colo")

    @property
    def channel(self) -> Channel:
        """The main channel (COLO's channel once the guest is copied)."""
        return self._channels[0]

    # -- the migration thread ---------------------------------------------------------

    def _run(self) -> None:
        paused_here = False
        try:
            self._setup()
            self.dirty_log.start_sampling(since=self.start_time)   # the first rate counts from the start
            self._sync_event()                 # QEMU's first dirty sync, in setup: pass 1
            self.stats.setup_time = int((time.monotonic() - self.start_time) * 1000)
            self.set_state("setup", "active")
            self.stats.begin()
            self._bulk_pass()
            while not self._converged():
                self._dirty_pass(final=False)
            self.dirty_log.stop_sampling()
            pause_start = time.monotonic()
            was_running = self.vm.state == "running"      # the user may have stopped it meanwhile
            if was_running:
                self.vm.pause()
                paused_here = self.vm.state == "paused"
            if self.caps["pause-before-switchover"]:
                self.set_state("active", "pre-switchover")
                while not self._continue.wait(0.05):
                    self._check_cancel()
                self._expect_state("pre-switchover", "device")
            else:
                self._expect_state("active", "device")
            self.stats.limit_rate = False
            self._dirty_pass(final=True)
            self.writer.finish()
            sections = self._send_devices(was_running)
            self._send_end(sections)
            self._await_verdict()
            now = time.monotonic()
            self.stats.downtime = int((now - pause_start) * 1000)
            self.stats.completed(now - self.start_time - self.stats.setup_time / 1000)
            if self.colo_handover is not None:
                self._enter_colo(paused_here)
                return
            self.end_time = time.monotonic()
            if paused_here:
                self.vm.set_state("paused", "postmigrate")
            if self.caps["release-ram"]:
                self._release_ram()
            self._expect_state("device", "completed")
        except Exception as e:  # any failure: first error wins, the guest runs on
            self.end_time = time.monotonic()
            cancelled = self._cancel.is_set()
            if not cancelled:
                self.error = self.error or self._verdict_after(e) or describe(e)
            self._abort_all(str(self.error or "migration cancelled"))
            # After END, a lost verdict leaves the guest paused here: it may run on the destination,
            # and two running copies are worse than a stopped one.
            if paused_here and self.vm.state == "paused" and not isinstance(e, VerdictLost):
                self.vm.resume()
            if cancelled:
                self.set_state("cancelling", "cancelled")
            else:
                self.set_state(("setup", "active", "pre-switchover", "device", "cancelling"), "failed")
        finally:
            self.dirty_log.stop_sampling()
            if self.stats.throttle_pct:
                self.vm.throttle(0)
            self.vm.stop_dirty_tracking()
            if self.writer is not None:
                self.writer.close()
            for channel in self._channels:
                channel.close()
            self._release_views()

    def _enter_colo(self, paused_here: bool) -> None:
        """The secondary runs its copy now: COLO takes the connection, and calls ``enter`` to
        run ours too.  COLO handles its own failures from here on (the guest keeps running)."""
        def enter() -> None:
            self._expect_state("device", "colo")
            if self.stats.throttle_pct:            # auto-converge's job ended with the copy
                self.vm.throttle(0)
            if paused_here:
                self.vm.resume()
        self.colo_handover(self, enter)
        self.end_time = time.monotonic()

    def _release_ram(self) -> None:
        """release-ram: the guest lives on at the destination, so give its memory back to the
        host now (the memfd becomes holes), as QEMU releases pages once they are sent."""
        mmap_object = self.vm.ram_regions()[0][3]
        mmap_object.madvise(mmap.MADV_REMOVE)
        self.ram_released = True

    def _verdict_after(self, e: Exception) -> str | None:
        """When the destination hung up on us, it may have said why first."""
        if (not isinstance(e, TransportError) or self._committed or not self._channels
                or not self._channels[0].two_way):
            return None
        reply = self._read_reply(2.0)
        if reply is None or reply[0]:
            return None
        return f"the destination refused the migration: {reply[1]}"

    def _read_reply(self, seconds: float, channel: Channel | None = None) -> tuple[bool, str] | None:
        """An answer of the destination (ok?, message) on ``channel`` (the main one), or None
        when it does not come in time."""
        main = channel or self._channels[0]
        if main.sock is None:
            return None
        try:
            main.sock.settimeout(seconds)
            return stream.read_reply(main)
        except (TransportError, OSError):
            return None

    def _expect_state(self, old: str, new: str) -> None:
        if not self.set_state(old, new):
            self._check_cancel()
            raise MigrationFailed(f"migration left state {old} unexpectedly ({self.status})")

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled()
        if self.writer is not None and self.writer.sender_error is not None:
            raise MigrationFailed(describe(self.writer.sender_error))
        if self._channels and self._channels[0].peer_spoke():
            # Mid-stream, a destination only speaks to refuse: stop now, not at the end.
            raise TransportError(f"{self.uri}: the destination ended the migration")

    def _setup(self) -> None:
        channels = self.params["multifd-channels"] if self.caps["multifd"] else 0
        flags = ((stream.FLAG_XBZRLE if self.xbzrle else 0) | (stream.FLAG_COMPRESS if self.caps["compress"] else 0)
                 | (stream.FLAG_MULTIFD if channels else 0) | (stream.FLAG_COLO if self.colo_handover else 0)
                 | (stream.FLAG_VERIFY_RAM if self.verify_ram else 0)
                 | (stream.FLAG_VALIDATE_UUID if self.caps["validate-uuid"] else 0))
        main = self._open_channel(stream.Header(flags, self.vm.uuid, PAGE_SIZE, self.ram_size, channels))
        self.stats.account(stream.HEADER.size)
        self.writer = PageWriter(main, self.ram, self.digest, self.stats, self.params, xbzrle=self.xbzrle,
                                 compress=self.caps["compress"], check=self._check_cancel, memfd=self.memfd)
        for number in range(channels):
            channel = self._open_channel(stream.Header(flags, self.vm.uuid, PAGE_SIZE, self.ram_size, number))
            self.stats.account(stream.HEADER.size, multifd=True)
            self.writer.add_multifd_channel(channel)
        self.vm.start_dirty_tracking()

    def _open_channel(self, header: stream.Header) -> Channel:
        """Connect, [TLS], the header, and on a socket wait until the destination admits it."""
        channel = connect(self.uri, self.named_fds, file_overwrite=self.file_overwrite, cancelled=self._cancel.is_set)
        self._channels.append(channel)
        self._check_cancel()
        if self.tls is not None:
            try:
                channel.sock = self.tls.wrap(channel.sock, STALL_TIMEOUT)
            except TlsError as e:
                raise MigrationFailed(f"{self.uri}: {e}") from e
            channel.tls = self.tls
        channel.send(header.pack())
        if channel.two_way:
            reply = self._read_reply(STALL_TIMEOUT, channel)
            if reply is None:
                raise MigrationFailed(f"{self.uri}: the destination closed the connection without admitting it "
                                      "(TLS or authz refused, busy with another source, or no header in time; "
                                      "its log says which)")
            if not reply[0]:
                raise MigrationFailed(f"the destination refused the migration: {reply[1]}")
            channel.sock.settimeout(STALL_TIMEOUT)
        return channel

    # -- passes ---------------------------------------------------------------------------

    def _bulk_pass(self) -> None:
        """Every page once: holes in the memfd are zero without being read."""
        extents = data_extents(self.memfd, self.ram_size)
        self.writer.send_bulk(extents)
        self.writer.end_pass(1)
        self._refresh_digest()

    def _sync_event(self) -> None:
        self.stats.dirty_sync_count += 1
        self.on_event("MIGRATION_PASS", {"pass": self.stats.dirty_sync_count})

    def _converged(self) -> bool:
        """Sync the dirty log and decide whether the rest fits in downtime-limit."""
        self._check_cancel()
        self._dirty_bitmap, seconds = self.dirty_log.sync()
        self._dirty_runs = bitmap_runs(self._dirty_bitmap)
        self._sync_event()
        dirty = sum(count for _, count in self._dirty_runs)
        self.stats.dirty_synced(dirty, seconds)
        self._auto_converge(dirty)
        if self.stats.expected_downtime > self.params["downtime-limit"]:
            return False
        self.stats.expected_at_switch = self.stats.expected_downtime
        return True

    def _dirty_pass(self, final: bool) -> None:
        if final:
            # What the last live sync found (not sent: that sync decided to stop) and what
            # was dirtied since, together.
            pending = int.from_bytes(self._dirty_bitmap, "little")
            final_bitmap, _ = self.dirty_log.sync()
            merged = pending | int.from_bytes(final_bitmap, "little")
            self._dirty_runs = bitmap_runs(merged.to_bytes(len(final_bitmap), "little"))
            self._sync_event()
            self.stats.remaining = sum(count for _, count in self._dirty_runs) * PAGE_SIZE
        self.writer.send_dirty_runs(self._dirty_runs)
        self.writer.end_pass(stream.FINAL_PASS if final else self.stats.dirty_sync_count)
        if not final:
            self._refresh_digest()

    def _refresh_digest(self) -> None:
        """Rehash what changed (off the downtime), timed: the expected downtime includes hashing."""
        started = time.monotonic()
        hashed = self.digest.refresh()
        self.stats.digest_refreshed(hashed, time.monotonic() - started)

    def _auto_converge(self, dirty_pages: int) -> None:
        """QEMU's migration_trigger_throttle: throttle when the guest dirties more than
        throttle-trigger-threshold percent of what a pass could send, twice in a row."""
        stats = self.stats
        if not self.caps["auto-converge"] or stats.dirty_sync_count < 3:
            return
        dirty_bytes = dirty_pages * PAGE_SIZE
        sendable = (stats.bandwidth or 0) * (time.monotonic() - self.start_time) / max(stats.dirty_sync_count, 1)
        if dirty_bytes * 100 <= sendable * self.params["throttle-trigger-threshold"]:
            self._high_dirty = 0
            return
        self._high_dirty += 1
        if self._high_dirty < 2:
            return
        self._high_dirty = 0
        if stats.throttle_pct == 0:
            pct = self.params["cpu-throttle-initial"]
        elif self.params["cpu-throttle-tailslow"]:
            needed = 100 - 100 * sendable / max(dirty_bytes, 1)
            pct = stats.throttle_pct + max(min(int(needed), self.params["cpu-throttle-increment"]), 1)
        else:
            pct = stats.throttle_pct + self.params["cpu-throttle-increment"]
        stats.throttle_pct = min(pct, self.params["max-cpu-throttle"])
        log.info("auto-converge: throttling the guest to %d%%", stats.throttle_pct)
        self.vm.throttle(stats.throttle_pct)

    # -- completion ------------------------------------------------------------------------

    def _send_devices(self, was_running: bool) -> list[tuple[str, int, bytes]]:
        sections = self.vm.save_devices() + [(RUNSTATE_SECTION, 1, b"running" if was_running else b"paused")]
        for name, version, payload in sections:
            self.writer.write(self.channel, stream.pack_device(name, version, payload))
        return sections

    def _send_end(self, sections: list[tuple[str, int, bytes]]) -> None:
        full = self.writer.full_digest() if self.verify_ram else None
        record = self.writer.end_record(sections, full)
        with self._lock:
            if self._cancel.is_set():
                raise MigrationCancelled()
            self._committed = True
        self.writer.write(self.channel, record)

    def _await_verdict(self) -> None:
        main = self._channels[0]
        if not main.two_way:
            main.finish()
            return
        reply = self._read_reply(VERDICT_TIMEOUT)
        if reply is None:
            raise VerdictLost("the destination's answer was lost after the whole state was sent; the guest "
                              "stays paused here because it may be running on the destination: check there, "
                              "and 'cont' here only if it is not")
        ok, message = reply
        if not ok:
            raise MigrationFailed(f"the destination refused the migration: {message}")

    def _abort_all(self, message: str) -> None:
        if self.writer is not None:
            self.writer.stop()
        if self._channels and not self._cancel.is_set() and not self._committed:
            try:
                if self._channels[0].two_way:
                    self._channels[0].send(stream.pack_abort(message), timeout=1.0)
            except TransportError:
                pass
        for channel in self._channels:
            channel.abort()
        if self.writer is not None:
            self.writer.join(5)

    # -- query-migrate -------------------------------------------------------------------

    def info(self) -> dict:
        info: dict = {"status": self.status}
        if self.status in ("setup",):
            return info
        now = self.end_time or time.monotonic()
        info.update(self.stats.query_migrate(int((now - self.start_time) * 1000), self.status == "completed",
                                             live=self.running))
        if self.status == "failed" and self.error:
            info["error-desc"] = self.error
        return info
