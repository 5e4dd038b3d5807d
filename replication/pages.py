"""Guest RAM onto the stream: pages as records, for the migration's passes and COLO's checkpoints.

A PageWriter turns ranges of pages into records (docs/stream-format.md): zero
runs for zero pages, PAGES for the rest, or XBZRLE deltas against the copy last
sent when the cache has one.  Page data goes one of three ways::

    plain      PAGES on the main channel, from the writer's thread
    compress   a pool of compress-threads zlib threads; COMPRESSED records written in
               submission order; when every thread is busy, wait for one
               (compress-wait-thread) or send the pages uncompressed, as QEMU
    multifd    one sender thread per extra channel, batches dealt round robin;
               PASS_END on every channel, so a receiver never applies pass N+1
               before all of pass N

Every byte it puts on the wire is counted into a MigrationStats as it goes
(``write``), in slices of at most 10 ms of max-bandwidth (1 MiB unlimited), so
that ``account`` keeps max-bandwidth smoothly and the live figures see the
bytes when they leave; a multifd sender counts what it writes, after
compression.  Every page it deals with counts down ``remaining``.  Every range
it reads from RAM is marked stale in the RamDigest, so that the END it makes
carries the digest of what it sent.  Before each batch and each blocking wait
it calls ``check``, its owner's cancel and failure test, which raises to stop
it.
"""
from __future__ import annotations

import collections
import queue
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

import zstandard

import native

from . import stream
from .ram import RamDigest, full_ram_digest
from .transport import Channel
from .xbzrle import XbzrleCache

if TYPE_CHECKING:
    from .stats import MigrationStats

PAGE_SIZE = 4096
MULTIFD_QUEUE = 8                 # batches waiting for each multifd sender
MAX_SLICE = 1 << 20               # bytes sent and counted at a time, at most
SLICES_PER_SECOND = 100           # under max-bandwidth: a slice is 10 ms of it


class PageWriter:
    def __init__(self, main: Channel, ram: memoryview, digest: RamDigest, stats: MigrationStats, params: dict, *,
                 xbzrle: XbzrleCache | None, compress: bool, check: Callable[[], None], memfd: int | None = None):
        """``params`` live, as the migration's; ``digest`` a RamDigest of ``ram`` with nothing
        marked yet (all zero, as the receiver's RAM starts); ``xbzrle`` the page cache, or None;
        ``memfd`` the file behind ``ram`` (None: a plain buffer, read whole by full_digest)."""
        self.main = main
        self.ram = ram
        self.memfd = memfd
        self.digest = digest
        self.stats = stats
        self.params = params
        self.xbzrle = xbzrle
        self.check = check
        self.sender_error: Exception | None = None      # the first failure of a multifd sender
        self._compress_threads = params["compress-threads"]      # the pool's size, fixed at its start
        self._compressor = ThreadPoolExecutor(self._compress_threads, "compress") if compress else None
        self._compressed: collections.deque = collections.deque()   # (pages, future) in the order they must be written
        self._senders: list[threading.Thread] = []
        self._sender_queues: list[queue.Queue] = []
        self._stop_senders = threading.Event()
        self._next_sender = 0

    # -- what to send ------------------------------------------------------------------

    def send_bulk(self, extents: list[tuple[int, int]]) -> None:
        """All of RAM once: the holes around ``extents`` (byte ranges) as zero runs without
        reading them (zero, as the digest's chunks start), the extents as whole pages (as in
        QEMU's bulk stage, the XBZRLE cache is left to pages sent again)."""
        pos = 0
        for start, end in extents + [(self.ram.nbytes, self.ram.nbytes)]:
            first, last = start // PAGE_SIZE, -(-end // PAGE_SIZE)
            if first > pos:
                self._send_zero_run(pos, first - pos)
            self._send_pages(first, last - first, use_xbzrle=False)
            pos = max(pos, last)

    def send_dirty_runs(self, runs) -> None:
        """The pages of ``runs`` [(first, count)] as they are now: deltas when the cache allows."""
        for first, count in runs:
            self._send_pages(first, count, use_xbzrle=self.xbzrle is not None)

    def end_pass(self, number: int) -> None:
        """PASS_END on every channel, after what is still being compressed."""
        self._drain_compressed()
        record = stream.pack_pass_end(number)
        for q in self._sender_queues:
            self._put(q, (record, None))
        self.write(self.main, record)

    def write(self, channel: Channel, data, multifd: bool = False, page_data: bool = False) -> None:
        """Send ``data`` on ``channel``, counted slice by slice (and so kept to max-bandwidth);
        ``page_data``: whole pages, each slice of them counted as sent as it goes."""
        view = memoryview(data).cast("B")
        limit = self.params["max-bandwidth"] if self.stats.limit_rate else 0
        size = min(max(limit // SLICES_PER_SECOND // PAGE_SIZE, 1) * PAGE_SIZE, MAX_SLICE) if limit else MAX_SLICE
        for pos in range(0, len(view), size):
            piece = view[pos:pos + size]
            channel.send(piece)
            self.stats.account(len(piece), multifd)
            if page_data:
                self.stats.pages_sent += len(piece) // PAGE_SIZE
                self.stats.pages_done(len(piece) // PAGE_SIZE)

    def full_digest(self) -> bytes:
        """A digest of ALL of RAM from scratch, trusting no dirty log (--verify-ram)."""
        return full_ram_digest(self.ram, self.ram.nbytes, self.memfd)

    def end_record(self, sections: list[tuple[str, int, bytes]], full: bytes | None) -> bytes:
        """END for the RAM as sent (the guest stopped), the device ``sections`` and the whole-RAM
        digest ``full`` when the stream carries one."""
        return stream.pack_end(self.digest.digest(), stream.devices_digest(sections), full)

    # -- pages as records --------------------------------------------------------------

    def _send_pages(self, first: int, count: int, use_xbzrle: bool) -> None:
        """Pages [first, first+count) in batches: zero runs, then normal or delta pages."""
        self.digest.mark_range(first * PAGE_SIZE, (first + count) * PAGE_SIZE)
        for batch in range(first, first + count, stream.MAX_BATCH_PAGES):
            self.check()
            n = min(stream.MAX_BATCH_PAGES, first + count - batch)
            zero = native.zero_pages(self.ram[batch * PAGE_SIZE:(batch + n) * PAGE_SIZE], PAGE_SIZE)
            i = 0
            while i < n:
                j = zero.find(b"\x00" if zero[i] else b"\x01", i)
                j = n if j < 0 else j
                if zero[i]:
                    self._send_zero_run(batch + i, j - i)
                else:
                    self._send_normal(batch + i, j - i, use_xbzrle)
                i = j

    def _send_zero_run(self, first: int, count: int) -> None:
        if self.xbzrle is not None:
            self.xbzrle.forget(first, count)    # the receiver's copy is zero now
        self.stats.duplicate += count
        self.stats.pages_sent += count
        self.stats.pages_done(count)
        record = stream.pack_zero_run(first, count)
        if self._senders:
            self._to_multifd(record)
        else:
            self.write(self.main, record)

    def _send_normal(self, first: int, count: int, use_xbzrle: bool) -> None:
        pages = list(range(first, first + count))
        if use_xbzrle:
            whole, contents = [], []
            for page in pages:
                data = bytes(self.ram[page * PAGE_SIZE:(page + 1) * PAGE_SIZE])
                delta = self.xbzrle.encode(page, data)
                if delta is None:
                    # Send exactly what the cache kept: the guest may write the page again meanwhile.
                    whole.append(page)
                    contents.append(data)
                else:
                    if delta:             # empty: the page did not change, nothing to send
                        self.write(self.main, stream.pack_xbzrle(page, delta))
                        self.stats.pages_sent += 1
                    self.stats.pages_done(1)
            pages = whole
            if not pages:
                return
            data = b"".join(contents)
        else:
            data = self.ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE]
        self.stats.normal += len(pages)
        self.stats.normal_bytes += len(pages) * PAGE_SIZE
        if self._senders or self._compressor is not None:
            self.stats.pages_sent += len(pages)      # queued for their sender or compressor
            self.stats.pages_done(len(pages))
            if self._senders:
                self._to_multifd(pages, data)
            else:
                self._compress(pages, data)
        else:
            self.write(self.main, stream.pack_page_index(stream.PAGES, pages))
            self.write(self.main, data, page_data=True)

    # -- compress: a pool of zlib threads, results written in order ------------------------

    def _compress(self, pages: list[int], data) -> None:
        pending = self._compressed
        while pending and pending[0][1].done():      # what is ready goes out at once
            self._write_compressed(pending.popleft())
        if len(pending) >= self._compress_threads:
            self.stats.compress_busy += 1
            if not self.params["compress-wait-thread"]:
                self.write(self.main, stream.pack_page_index(stream.PAGES, pages))
                self.write(self.main, data)
                return
            self._write_compressed(pending.popleft())
        self.stats.compress_submitted += 1
        future = self._compressor.submit(zlib.compress, bytes(data), self.params["compress-level"])
        pending.append((pages, future))

    def _write_compressed(self, item) -> None:
        pages, future = item
        packed = future.result()
        self.stats.compress_pages += len(pages)
        self.stats.compressed_size += len(packed)
        self.write(self.main, stream.pack_page_index(stream.COMPRESSED, pages, stream.CODEC_ZLIB)
                   + stream.pack_compressed_length(len(packed)))
        self.write(self.main, packed)

    def _drain_compressed(self) -> None:
        while self._compressed:
            self._write_compressed(self._compressed.popleft())

    # -- multifd: pages spread over several connections ------------------------------------

    def add_multifd_channel(self, channel: Channel) -> None:
        """Page data goes to the multifd channels from now on, each with its sender thread."""
        q: queue.Queue = queue.Queue(maxsize=MULTIFD_QUEUE)
        thread = threading.Thread(target=self._multifd_sender, args=(channel, q), daemon=True,
                                  name=f"multifd-send-{len(self._senders)}")
        self._sender_queues.append(q)
        self._senders.append(thread)
        thread.start()

    def _multifd_sender(self, channel: Channel, q: queue.Queue) -> None:
        method = self.params["multifd-compression"]
        zstd = zstandard.ZstdCompressor(level=self.params["multifd-zstd-level"]) if method == "zstd" else None
        try:
            while not self._stop_senders.is_set():
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    return
                pages, data = item
                if data is None:          # a whole record (zero run, pass end)
                    self.write(channel, pages, multifd=True)
                    continue
                if method == "none":
                    head = stream.pack_page_index(stream.PAGES, pages)
                else:
                    if zstd is not None:
                        data, codec = zstd.compress(data), stream.CODEC_ZSTD
                    else:
                        data, codec = zlib.compress(data, self.params["multifd-zlib-level"]), stream.CODEC_ZLIB
                    head = (stream.pack_page_index(stream.COMPRESSED, pages, codec)
                            + stream.pack_compressed_length(len(data)))
                self.write(channel, head, multifd=True)
                self.write(channel, data, multifd=True)
        except Exception as e:        # the writer's owner sees it at its next check and gives up
            self.sender_error = self.sender_error or e

    def _put(self, q: queue.Queue, item) -> None:
        """Queue for a multifd sender, giving up on cancel or a failed sender instead of blocking."""
        while True:
            self.check()
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _to_multifd(self, what, data=None) -> None:
        """A whole record (bytes), or page numbers and their data, to the next channel."""
        q = self._sender_queues[self._next_sender]
        self._next_sender = (self._next_sender + 1) % len(self._sender_queues)
        if data is not None:
            data = bytes(data)     # the queue outlives this pass: copy the page data now
        self._put(q, (what, data))

    # -- the end ---------------------------------------------------------------------------

    def finish(self) -> None:
        """The multifd senders write what they hold and end (before the device state)."""
        for q in self._sender_queues:
            self._put(q, None)
        for thread in self._senders:
            while thread.is_alive():
                self.check()
                thread.join(0.1)
        self.check()

    def stop(self) -> None:
        """Giving up: the multifd senders stop at their next batch (abort the channels to unblock
        a send, then ``join``)."""
        self._stop_senders.set()

    def join(self, timeout: float) -> None:
        for thread in self._senders:
            thread.join(timeout)

    def close(self) -> None:
        """Drop what is still being compressed."""
        if self._compressor is not None:
            self._compressor.shutdown(wait=False, cancel_futures=True)
