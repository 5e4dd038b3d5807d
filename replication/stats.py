"""What query-migrate reports of an outgoing migration, all measured.

The page writer counts every byte it puts on the wire (``account``, also from
the multifd senders, after compression) and every page it has dealt with.  The
live figures are measured as QEMU's ``migration_update_counters`` measures
them, updated every RATE_WINDOW (100 ms) whenever a byte is counted or
query-migrate asks, whatever the pass; measured over the last RATE_SPAN
(0.5 s: a few windows, since max-bandwidth lets a late sender catch up in
bursts)::

    mbps, pages-per-second   bytes and pages over the span, over its length
    bandwidth                the same in bytes/s, kept from the last span that sent
                             enough to tell (> 10000 bytes, as QEMU)
    ram rate                 bytes of RAM sent per second as data (zero pages left out:
                             they cost nothing to send); unlike the wire's bytes, what
                             compression and XBZRLE save counts as sent
    expected-downtime        remaining / ram rate (+ the measured digest hashing time),
                             of what remains when asked
    remaining                pages of this pass not dealt with yet (the bulk pass: all
                             of RAM at first), counted down as pages go
    dirty-pages-rate         pages the dirty log reported since the last sync / the time
                             since it: at each sync, and every 100 ms in between
                             (source.DirtyLog reads the log for it)

No figure is ever assumed: until something is measured it stays 0.  At
completion ``mbps`` is all bytes over the transfer time (total - setup), as in
QEMU's ``migration_calculate_complete``.  ``account`` also keeps the live
passes to max-bandwidth, slice by slice.  COLO's checkpoints go on counting
into the same object, so query-migrate stays current in state colo.
"""
from __future__ import annotations

import collections
import threading
import time

from .pages import PAGE_SIZE
from .xbzrle import XbzrleCache

RATE_WINDOW = 0.1                 # seconds between updates of the live figures (QEMU's BUFFER_DELAY)
RATE_SPAN = 0.5                   # seconds the rates are measured over, once the migration is that old
PACE_CREDIT = 0.1                 # seconds of unused max-bandwidth a late sender may catch up in a burst
ENOUGH_TO_TELL = 10000            # bytes a window must carry to measure the bandwidth (QEMU's threshold)


class MigrationStats:
    def __init__(self, ram_size: int, params: dict, xbzrle: XbzrleCache | None, *,
                 auto_converge: bool, compress: bool):
        """``params`` live, as the migration's (max-bandwidth may change mid-way); ``xbzrle``
        the page cache, which counts its own statistics."""
        self.ram_size = ram_size
        self.params = params
        self.xbzrle = xbzrle
        self.auto_converge = auto_converge
        self.compress = compress
        # MigrationStats
        self.transferred = 0
        self.remaining = ram_size
        self.duplicate = 0
        self.normal = 0
        self.normal_bytes = 0
        self.multifd_bytes = 0
        self.dirty_sync_count = 0
        self.dirty_pages_rate = 0
        self.mbps = 0.0
        self.pages_per_second = 0
        # the rest of MigrationInfo
        self.setup_time = 0
        self.downtime: int | None = None
        self.expected_downtime = 0
        self.expected_at_switch: int | None = None     # the estimate that let the guest stop (benchmarks)
        self.throttle_pct = 0
        # CompressionStats
        self.compress_pages = 0
        self.compress_busy = 0
        self.compress_submitted = 0
        self.compressed_size = 0
        # what the estimates are made of
        self.pages_sent = 0             # zero, normal and delta pages: pages-per-second
        self.bandwidth: float | None = None   # bytes/s of the last span that sent enough to tell
        self.ram_rate: float | None = None    # bytes of RAM sent per second, the same span
        self.hash_rate: float | None = None   # bytes/s of the last digest refresh that hashed anything
        self.limit_rate = True          # max-bandwidth holds for the live passes, not for stop-and-copy
        self.started_at = 0.0           # when pages began to go (after setup)
        self._samples: collections.deque = collections.deque()   # (time, transferred, pages_sent) per window
        self._pace_start = 0.0          # max-bandwidth: bytes counted since _pace_start
        self._pace_bytes = 0
        self._lock = threading.Lock()   # the multifd senders count too

    # -- counting (the page writer) ----------------------------------------------------

    def begin(self) -> None:
        """Pages start to go: the first measuring window opens."""
        with self._lock:
            self.started_at = time.monotonic()
            self._samples.append((self.started_at, self.transferred, self.pages_sent, self.duplicate))

    def account(self, nbytes: int, multifd: bool = False) -> None:
        """Count bytes put on the wire and keep to max-bandwidth during the live passes: each
        byte sent pushes the earliest time of the next send by 1/max-bandwidth seconds (so the
        writer sends in slices of 10 ms of it, see PageWriter.write)."""
        limit = self.params["max-bandwidth"] if self.limit_rate else 0
        with self._lock:
            self.transferred += nbytes
            if multifd:
                self.multifd_bytes += nbytes
            now = time.monotonic()
            self._measure(now)
            if not limit:
                return
            if now > self._pace_start + self._pace_bytes / limit + PACE_CREDIT:
                self._pace_start, self._pace_bytes = now, 0      # idle: no saved-up credit
            self._pace_bytes += nbytes
            due = self._pace_start + self._pace_bytes / limit
        if due > now:
            time.sleep(due - now)

    def pages_done(self, count: int) -> None:
        """``count`` pages of this pass dealt with (sent, or sent as zero, or unchanged)."""
        self.remaining = max(self.remaining - count * PAGE_SIZE, 0)

    # -- measuring -----------------------------------------------------------------------

    def _measure(self, now: float) -> None:
        """Close the window when it is long enough, and measure over the span (the lock held)."""
        samples = self._samples
        if not samples or now - samples[-1][0] < RATE_WINDOW:
            return
        samples.append((now, self.transferred, self.pages_sent, self.duplicate))
        while len(samples) > 2 and now - samples[1][0] >= RATE_SPAN:
            samples.popleft()
        since, transferred, pages, zero = samples[0]
        elapsed, sent = now - since, self.transferred - transferred
        self.mbps = round(sent * 8 / 1e6 / elapsed, 3)
        self.pages_per_second = int((self.pages_sent - pages) / elapsed)
        if sent > ENOUGH_TO_TELL:
            self.bandwidth = sent / elapsed
            data_pages = (self.pages_sent - pages) - (self.duplicate - zero)
            self.ram_rate = data_pages * PAGE_SIZE / elapsed or self.ram_rate
            self.expected_downtime = self._downtime_for(self.remaining)

    def refresh(self) -> None:
        """Bring the live figures up to date (query-migrate): the rates of the last span, the
        expected downtime of what remains now."""
        with self._lock:
            self._measure(time.monotonic())
            if self.ram_rate:
                self.expected_downtime = self._downtime_for(self.remaining)

    def _downtime_for(self, remaining: int) -> int:
        """Milliseconds to deal with ``remaining`` bytes of RAM at the measured ram rate, then
        hash them for the digest at the measured hash rate (0 while nothing is measured yet)."""
        seconds = remaining / self.ram_rate if self.ram_rate else 0.0
        if self.hash_rate:
            seconds += remaining / self.hash_rate
        return int(1000 * seconds)

    def digest_refreshed(self, hashed: int, seconds: float) -> None:
        if hashed and seconds > 0:
            self.hash_rate = hashed / seconds

    def dirty_synced(self, dirty_pages: int, seconds: float) -> None:
        """A dirty-log sync found ``dirty_pages``, ``seconds`` after the last one: the rate, what
        remains, and the downtime it would cost now.  Before any window measured the rates (a
        very short bulk pass), all bytes and pages so far over the time so far measure them."""
        with self._lock:
            if self.started_at:
                elapsed = max(time.monotonic() - self.started_at, 1e-6)
                if self.bandwidth is None and self.transferred:
                    self.bandwidth = self.transferred / elapsed
                if self.ram_rate is None and self.pages_sent > self.duplicate:
                    self.ram_rate = (self.pages_sent - self.duplicate) * PAGE_SIZE / elapsed
            self.dirty_pages_rate = int(dirty_pages / max(seconds, 1e-6))
            self.remaining = dirty_pages * PAGE_SIZE
            self.expected_downtime = self._downtime_for(self.remaining)

    def dirty_sampled(self, dirty_pages: int, seconds: float) -> None:
        """Between syncs, the dirty log reported ``dirty_pages`` over ``seconds`` since the last
        sync; a span shorter than a window keeps the last figure."""
        if seconds >= RATE_WINDOW:
            self.dirty_pages_rate = int(dirty_pages / seconds)

    def completed(self, transfer_seconds: float) -> None:
        """QEMU's migration_calculate_complete: the final mbps is all bytes over the transfer time."""
        self.remaining = 0
        if transfer_seconds > 0:
            self.mbps = round(self.transferred * 8 / 1e6 / transfer_seconds, 3)

    # -- query-migrate ---------------------------------------------------------------------

    def query_migrate(self, total_time: int, completed: bool, live: bool) -> dict:
        """MigrationInfo's figures in QEMU's order (all but status and error-desc); ``live``
        while pages may still go (the windows go on)."""
        if live:
            self.refresh()
        info: dict = {"ram": {
            "transferred": self.transferred, "remaining": self.remaining, "total": self.ram_size,
            "duplicate": self.duplicate, "skipped": 0, "normal": self.normal, "normal-bytes": self.normal_bytes,
            "dirty-pages-rate": self.dirty_pages_rate, "mbps": self.mbps, "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": 0, "page-size": PAGE_SIZE, "multifd-bytes": self.multifd_bytes,
            "pages-per-second": self.pages_per_second,
        }}
        info["total-time"] = total_time
        info["setup-time"] = self.setup_time
        if completed:
            info["downtime"] = self.downtime
        else:
            info["expected-downtime"] = self.expected_downtime
        if self.auto_converge:
            info["cpu-throttle-percentage"] = self.throttle_pct
        if self.xbzrle is not None:
            info["xbzrle-cache"] = self.xbzrle.stats()
        if self.compress:
            info["compression"] = {
                "pages": self.compress_pages, "busy": self.compress_busy,
                "busy-rate": self.compress_busy / self.compress_submitted if self.compress_submitted else 0.0,
                "compressed-size": self.compressed_size,
                "compression-rate": (self.compress_pages * PAGE_SIZE / self.compressed_size
                                     if self.compressed_size else 0.0),
            }
        return info
