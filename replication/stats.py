"""What query-migrate reports of an outgoing migration, all measured.

The page writer counts what it sends (``account``, the page counters); the pass
driver times each pass, dirty-log sync and digest refresh, from which come the
rates and the expected downtime.  ``account`` also keeps the live passes to
max-bandwidth, because it sees every byte as it goes.  COLO's checkpoints go on
counting into the same object, so query-migrate stays current in state colo.
"""
from __future__ import annotations

import threading
import time

from .pages import PAGE_SIZE
from .xbzrle import XbzrleCache

RATE_WINDOW = 0.1                 # seconds of unused bandwidth that may be caught up in a burst


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
        self.throttle_pct = 0
        # CompressionStats
        self.compress_pages = 0
        self.compress_busy = 0
        self.compress_submitted = 0
        self.compressed_size = 0
        # what the estimates are made of
        self.pages_sent = 0             # zero, normal and delta pages: pages-per-second
        self.bandwidth = 1e9            # bytes/s of the last pass that sent enough to tell
        self.hash_rate = 2e9            # bytes/s of the last digest refresh that hashed anything
        self.limit_rate = True          # max-bandwidth holds for the live passes, not for stop-and-copy
        self._pass_start = 0.0
        self._pass_transferred = 0
        self._pass_pages = 0
        self._rate_window_start = 0.0
        self._rate_window_bytes = 0
        self._lock = threading.Lock()   # multifd sender threads add multifd-bytes

    # -- counting (the page writer) ----------------------------------------------------

    def account(self, nbytes: int) -> None:
        """Count bytes and keep to max-bandwidth during the live passes: each byte sent
        pushes the earliest time of the next send by 1/max-bandwidth seconds."""
        self.transferred += nbytes
        limit = self.params["max-bandwidth"]
        if not self.limit_rate or not limit:
            return
        now = time.monotonic()
        if now > self._rate_window_start + self._rate_window_bytes / limit + RATE_WINDOW:
            self._rate_window_start, self._rate_window_bytes = now, 0      # idle: no saved-up credit
        self._rate_window_bytes += nbytes
        due = self._rate_window_start + self._rate_window_bytes / limit
        if due > now:
            time.sleep(due - now)

    def add_multifd_bytes(self, nbytes: int) -> None:
        """From a multifd sender thread: bytes it put on its channel."""
        with self._lock:
            self.multifd_bytes += nbytes

    # -- measuring (the pass driver) -----------------------------------------------------

    def pass_started(self) -> None:
        self._pass_start = time.monotonic()
        self._pass_transferred = self.transferred
        self._pass_pages = self.pages_sent

    def pass_ended(self) -> None:
        """mbps and pages-per-second of the pass; its bandwidth too, when it sent enough to tell."""
        elapsed = max(time.monotonic() - self._pass_start, 1e-6)
        sent = self.transferred - self._pass_transferred
        if sent > 65536:
            self.bandwidth = sent / elapsed
        self.mbps = round(sent * 8 / 1e6 / elapsed, 3)
        self.pages_per_second = int((self.pages_sent - self._pass_pages) / elapsed)

    def digest_refreshed(self, hashed: int, seconds: float) -> None:
        if hashed and seconds > 0:
            self.hash_rate = hashed / seconds

    def dirty_synced(self, dirty_pages: int, seconds: float) -> None:
        """A dirty-log sync found ``dirty_pages``, ``seconds`` after the last one: what remains,
        and the downtime it would cost now (send it, then hash it for the digest)."""
        self.dirty_pages_rate = int(dirty_pages / max(seconds, 1e-6))
        self.remaining = dirty_pages * PAGE_SIZE
        self.expected_downtime = int(1000 * (self.remaining / max(self.bandwidth, 1.0)
                                             + self.remaining / self.hash_rate))

    # -- query-migrate ---------------------------------------------------------------------

    def query_migrate(self, total_time: int, completed: bool) -> dict:
        """MigrationInfo's figures in QEMU's order (all but status and error-desc)."""
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
