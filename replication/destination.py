"""Precopy live migration, destination side.

A thread accepts the main channel (and the multifd channels its header
announces), applies records to guest RAM as they come, and at END checks
the RAM digest before it loads the device sections and resumes the guest::

    setup       waiting for / reading the header        MIGRATION setup
    active      applying pages                          MIGRATION active
    completed   digest matched, devices loaded, guest   MIGRATION completed, RESUME
                resumed (if it ran on the source)
    failed      anything wrong: the guest stays stopped, the source is told why
    colo        (a COLO stream) instead of completed: the   MIGRATION colo, RESUME
                guest runs and the thread hands the open
                connection to COLO (colo/secondary.py), which
                from then on writes pages into the colo cache
                it gives here (``retarget``)

On a socket, connections are admitted first (replication/incoming.py: TLS and
authz when tls-creds is set, the header within a deadline; failures are closed
unanswered and counted).  The destination then checks the header against its
guest and answers on the connection (stream.pack_reply)::

    source                                   destination
    [TLS handshake, client certificate] ---> admission: authz, deadline
    header -------------------------------->  magic, version; then UUID, RAM size, flags
           <--------------------------------  reply: ok (admitted), or refused + why
    records ... END ----------------------->
           <--------------------------------  reply: the verdict

A refused header leaves the destination waiting for another source (state
setup); the refusal names what the stream lacks, never this node's UUID or RAM
size.  A one-way channel (exec:, file:, a pipe fd) carries one stream: a bad
header fails it.  After admission, a malformed stream is refused with a clear
reason and never harms the daemon; the guest's RAM is cleared so that another
migration can follow.  Admitted channels have an idle timeout (no byte for
``idle_timeout`` s fails the stream) besides TCP keepalive; a COLO connection
drops it (the heartbeat watches the pair).

The COMPRESSED records of a compress stream (not multifd: each multifd
channel's thread inflates its own) are inflated by decompress-threads threads,
as QEMU's: the receiving thread reads each record and queues it; every
PASS_END and the END wait until all queued pages are in RAM.
"""
from __future__ import annotations

import collections
import logging
import mmap
import queue
import threading
import time
import zlib
from typing import Callable

import zstandard

import native

from . import stream
from .ram import RamDigest, full_ram_digest
from .source import RUNSTATE_SECTION
from .state import MigrationRun
from .incoming import HANDSHAKE_TIMEOUT, Admission, peer_of
from .tls import ServerTls
from .transport import Channel, Listener, TransportError

log = logging.getLogger(__name__)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
MULTIFD_ACCEPT_TIMEOUT = 30.0    # seconds for the multifd channels to connect, and to finish at END
IDLE_TIMEOUT = 120.0             # seconds without a byte from an admitted source before it is given up


class MigrationDestination(MigrationRun):
    role = "incoming migration"

    def __init__(self, vm, listener: Listener, capabilities: dict[str, bool], autostart: bool,
                 on_event: Callable[[str, dict], None], *, verify_ram: bool = False,
                 colo_handover: Callable[["MigrationDestination", Channel, Callable], None] | None = None,
                 tls: Callable[[], ServerTls | None] = lambda: None, refused: collections.Counter | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 parameters: dict | None = None):
        """``colo_handover(destination, channel, enter)`` runs COLO once a COLO stream's guest is
        loaded, calling ``enter()`` first (state colo, guest resumed);
        ``verify_ram`` refuses streams that do not carry a digest of all RAM; ``tls()`` gives the
        TLS a connection must pass (read per connection); ``refused`` counts refused connections
        by reason (the node's, across incoming migrations); ``parameters`` the node's migration
        parameters, live (decompress-threads; None: inflate in the receiving thread)."""
        super().__init__(on_event)
        self.vm = vm
        self.verify_ram = verify_ram
        self.colo_handover = colo_handover
        self.header: stream.Header | None = None
        self.received_pages: int | None = None   # COLO sets 0: then a bitmap (bit i = page i) of pages written
        self.full_digest: bytes | None = None  # the last END's whole-RAM digest (FLAG_VERIFY_RAM)
        self.listener = listener
        self.refused = refused if refused is not None else collections.Counter()
        self.idle_timeout = idle_timeout
        self.admission = Admission(listener, tls, handshake_timeout, self.refused) if listener.sock else None
        self.caps = capabilities        # live: set before the stream arrives, as with QEMU's -incoming
        self.autostart = autostart
        _, self.ram_size, self.memfd, ram = vm.ram_regions()[0]
        self.ram_map = ram
        self.ram = memoryview(ram)
        self.pages_received = 0
        self._channels: list[Channel] = []
        self._workers: list[threading.Thread] = []
        self.parameters = parameters
        self._decompressors: list[threading.Thread] = []
        self._inflate_queue: queue.Queue = queue.Queue()
        self._can_populate = True
        self.aborted = False            # the daemon is exiting: an expected end, not a failure to report

    @property
    def bytes_received(self) -> int:
        """Bytes read from the source on every channel (main and multifd, COLO checkpoints too)."""
        return sum(channel.received for channel in list(self._channels))

    def abort(self) -> None:
        """Stop listening and drop the channels (the daemon is exiting)."""
        self.aborted = True
        self.listener.close()
        for channel in list(self._channels):
            channel.abort()

    @property
    def running(self) -> bool:
        return self.status in ("setup", "active", "colo")

    @property
    def colo_stream(self) -> bool:
        return self.header is not None and bool(self.header.flags & stream.FLAG_COLO)

    def info(self) -> dict:
        info: dict = {"status": self.status}
        if self.status == "setup" and self.listener.socket_addresses():
            info["socket-address"] = self.listener.socket_addresses()
        if self.status == "failed" and self.error:
            info["error-desc"] = self.error
        if self.status != "setup":
            now = self.end_time or time.monotonic()
            info["total-time"] = int((now - self.start_time) * 1000)
        return info

    # -- the receiving thread ------------------------------------------------------------

    def _run(self) -> None:
        main = None
        try:
            main, header = self._accept_source()
            self._clear_ram()        # whatever the guest image put there, the source's RAM replaces it
            self.set_state("setup", "active")
            self._page_size = header.page_size
            self._written = bytearray(self.ram_size // header.page_size)   # pages that may be non-zero
            self.digest = RamDigest(self.ram, self.ram_size, [])
            self._zstd = zstandard.ZstdDecompressor()
            self._start_multifd(header)
            self._start_decompressors(header)
            sections = self._read_main(main, header, self._workers)
            self._finish(main, sections)
            if header.flags & stream.FLAG_COLO:
                main.sock.settimeout(None)      # from here the heartbeat watches the pair
                self.colo_handover(self, main, self._enter_colo)     # COLO handles its own failures
        except Exception as e:
            if self.aborted:
                self.error = self.error or "the node is shutting down"
            self.error = self.error or (str(e) if isinstance(e, (stream.StreamError, TransportError))
                                        else f"{type(e).__name__}: {e}")
            if main is not None and main.two_way:
                try:
                    main.send(stream.pack_reply(False, self.error))
                    main.linger(2.0)
                except TransportError:
                    pass
            for channel in self._channels:
                channel.abort()
            for worker in self._workers:
                worker.join(10)       # no receiver may write into RAM after it is cleared
            self._stop_decompressors()
            self._clear_ram()
            self.end_time = time.monotonic()
            if self.aborted:        # the daemon is exiting: a clean end, not a failure
                self.set_state(("setup", "active"), "cancelling")
                self.set_state("cancelling", "cancelled")
            else:
                self.set_state(("setup", "active"), "failed")
        finally:
            self._stop_decompressors()
            for channel in self._channels:
                channel.close()
            self.listener.close()
            if self.admission is not None:
                self.admission.close_door()
            self._release_views()

    def _accept_source(self) -> tuple[Channel, stream.Header]:
        """The source's main channel and its header, checked against this guest.  On a socket,
        a refused header is answered and the next admitted connection is awaited."""
        if self.admission is None:        # one-way: one stream, whatever it holds
            channel = self.listener.accept()
            self._channels.append(channel)
            header = stream.Header.unpack(channel.read_exact(stream.HEADER.size))
            self._check_header(header)
            return channel, header
        self.admission.start()
        while True:
            channel, header = self.admission.next()
            try:
                self._check_header(header)
            except stream.StreamError as e:
                self._refuse(channel, "header", str(e))
                continue
            self._channels.append(channel)
            channel.sock.settimeout(self.idle_timeout)
            channel.send(stream.pack_reply(True))
            if not header.flags & stream.FLAG_MULTIFD:
                self.admission.close_door()
            return channel, header

    def _refuse(self, channel: Channel, reason: str, why: str) -> None:
        """Tell an admitted peer why its stream is refused (nothing about this node), and close."""
        peer = peer_of(channel)
        try:
            channel.send(stream.pack_reply(False, why), timeout=1.0)
            channel.linger(1.0)
        except TransportError:
            pass
        self.admission.refuse(channel, reason, why, peer)

    def _check_header(self, header: stream.Header) -> None:
        """Refusals name what the stream lacks; this node's UUID and RAM size go to the log only."""
        if header.flags & ~stream.KNOWN_FLAGS:
            raise stream.StreamError(f"unknown stream flags {header.flags:#x}")
        if header.ram_size != self.ram_size:
            log.warning("incoming stream of %d MiB of RAM; this guest has %d MiB",
                        header.ram_size >> 20, self.ram_size >> 20)
            raise stream.StreamError(f"the stream's guest has {header.ram_size >> 20} MiB of RAM, "
                                     "not the size of this node's guest")
        # validate-uuid on either side: QEMU's source sends its UUID for the destination to check.
        wants_uuid = self.caps["validate-uuid"] or header.flags & stream.FLAG_VALIDATE_UUID
        if wants_uuid and header.vm_uuid != self.vm.uuid:
            log.warning("incoming stream for VM %s; this is VM %s", header.vm_uuid, self.vm.uuid)
            raise stream.StreamError(f"UUID mismatch: this node does not run VM {header.vm_uuid}")
        if header.flags & stream.FLAG_COLO and (not self.caps["x-colo"] or self.colo_handover is None):
            raise stream.StreamError("the source wants COLO, but x-colo is not enabled on this node "
                                     "(migrate-set-capabilities x-colo on both nodes)")
        if self.verify_ram and not header.flags & stream.FLAG_VERIFY_RAM:
            raise stream.StreamError("this node verifies all guest RAM (--verify-ram); start the source "
                                     "with --verify-ram too")
        self.header = header

    def _start_multifd(self, header: stream.Header) -> None:
        if not header.flags & stream.FLAG_MULTIFD:
            return
        if not 1 <= header.channels <= 255:
            raise stream.StreamError(f"a multifd stream with {header.channels} channels")
        self._barrier = threading.Barrier(header.channels)
        seen: set[int] = set()
        # The source opens them right after the main channel: wait a while, not forever.
        deadline = time.monotonic() + MULTIFD_ACCEPT_TIMEOUT
        while len(seen) < header.channels:
            channel, sub = self.admission.next(timeout=max(deadline - time.monotonic(), 0.001))
            if (sub.vm_uuid, sub.flags, sub.ram_size) != (header.vm_uuid, header.flags, header.ram_size) \
                    or sub.channels in seen or sub.channels >= header.channels:
                self._refuse(channel, "busy", "another source is migrating")
                continue
            self._channels.append(channel)
            channel.sock.settimeout(self.idle_timeout)
            channel.send(stream.pack_reply(True))
            seen.add(sub.channels)
            worker = threading.Thread(target=self._multifd_worker, args=(channel,), daemon=True,
                                      name=f"multifd-recv-{sub.channels}")
            worker.start()
            self._workers.append(worker)
        self.admission.close_door()

    def _start_decompressors(self, header: stream.Header) -> None:
        if not header.flags & stream.FLAG_COMPRESS or self.parameters is None:
            return
        count = self.parameters["decompress-threads"]
        self._inflate_queue = queue.Queue(maxsize=2 * count)     # records read ahead of the inflaters
        for number in range(count):
            thread = threading.Thread(target=self._decompressor, daemon=True, name=f"decompress-{number}")
            thread.start()
            self._decompressors.append(thread)

    def _decompressor(self) -> None:
        """Inflate queued records into RAM until None; after a failure, only drain the queue."""
        while True:
            item = self._inflate_queue.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    codec, pages, packed = item
                    self._scatter(pages, self._decompress(codec, packed, len(pages) * self._page_size))
            except Exception as e:
                self.error = self.error or str(e)
            finally:
                self._inflate_queue.task_done()

    def _queue_compressed(self, channel: Channel) -> None:
        """A COMPRESSED record's body, read here and inflated by a decompress thread."""
        codec = channel.read_exact(1)[0]
        pages = stream.read_page_index(channel)
        for p in pages:
            self._check_pages(p, 1)
        length = stream.read_compressed_length(channel, len(pages), self._page_size)
        packed = channel.read_exact(length)
        for p in pages:
            self._mark(p, 1)
        self.pages_received += len(pages)
        self._inflate_queue.put((codec, pages, packed))

    def _inflated(self) -> None:
        """Every queued record is in RAM (or the first failure is raised)."""
        if self._decompressors:
            self._inflate_queue.join()
        if self.error:
            raise stream.StreamError(self.error)

    def _stop_decompressors(self) -> None:
        for _ in self._decompressors:
            self._inflate_queue.put(None)
        for thread in self._decompressors:
            thread.join(10)
        self._decompressors = []

    def _multifd_worker(self, channel: Channel) -> None:
        try:
            while True:
                kind = channel.read_exact(1)[0]
                if kind == stream.PASS_END:
                    number = stream.read_pass_end(channel)
                    # Nobody starts the next pass before everyone has finished this one.
                    self._barrier.wait(timeout=600)
                    if number == stream.FINAL_PASS:
                        return
                elif kind in (stream.PAGES, stream.ZERO_RUN, stream.COMPRESSED):
                    self.apply_record(channel, kind)
                else:
                    raise stream.StreamError(f"record type {kind} on a multifd channel")
        except Exception as e:
            self.error = self.error or str(e)
            self._barrier.abort()
            for other in self._channels:
                other.abort()

    def _read_main(self, main: Channel, header: stream.Header, workers) -> list:
        sections = []
        while True:
            kind = main.read_exact(1)[0]
            if kind in (stream.PAGES, stream.ZERO_RUN, stream.COMPRESSED, stream.XBZRLE):
                if workers:
                    raise stream.StreamError("page records on the main channel of a multifd stream")
                if kind == stream.XBZRLE and not header.flags & stream.FLAG_XBZRLE:
                    raise stream.StreamError("an XBZRLE record in a stream that did not announce XBZRLE")
                if kind == stream.COMPRESSED and self._decompressors:
                    self._queue_compressed(main)
                else:
                    self.apply_record(main, kind)
            elif kind == stream.PASS_END:
                stream.read_pass_end(main)
                self._inflated()
                self.digest.refresh()          # while the source still runs: off the downtime
            elif kind == stream.DEVICE:
                sections.append(stream.read_device(main))
            elif kind == stream.END:
                self._inflated()
                for worker in workers:
                    worker.join(MULTIFD_ACCEPT_TIMEOUT)
                    if worker.is_alive():
                        raise stream.StreamError("a multifd channel did not finish its last pass")
                if self.error:
                    raise stream.StreamError(self.error)
                self.check_end(main, sections)
                return sections
            elif kind == stream.ABORT:
                message = stream.read_abort(main)
                raise stream.StreamError(f"the source aborted the migration: {message}")
            else:
                raise stream.StreamError(f"unknown record type {kind}")

    def check_end(self, channel, sections: list) -> None:
        """An END record's body: both digests must equal ours (the whole-RAM one is kept in
        ``full_digest``, to be checked against the guest's RAM once it is loaded)."""
        ram_digest, devices_digest, self.full_digest = stream.read_end(
            channel, bool(self.header.flags & stream.FLAG_VERIFY_RAM))
        if self.digest.digest() != ram_digest:
            raise stream.StreamError("RAM digest mismatch: the guest's memory did not arrive intact")
        if stream.devices_digest(sections) != devices_digest:
            raise stream.StreamError("device state digest mismatch: the device sections did not "
                                     "arrive intact")

    def verify_guest_ram(self) -> None:
        """--verify-ram: ALL of the guest's RAM, hashed from scratch, equals the sender's."""
        _, _, fd, guest_ram = self.vm.ram_regions()[0]
        if self.full_digest is not None and full_ram_digest(guest_ram, self.ram_size, fd) \
                != self.full_digest:
            raise stream.StreamError("whole-RAM verification failed: the guest's memory differs from the "
                                     "sender's (a page was missed)")

    def retarget(self, ram_map) -> None:
        """Write pages into ``ram_map`` (the colo cache, same size as guest RAM) from now on.
        Its content equals guest RAM's, so the digest and the written-pages map stay valid."""
        self.ram.release()
        self.digest.ram.release()
        self.ram_map = ram_map
        self.ram = memoryview(ram_map)
        self.digest.ram = memoryview(ram_map)

    def _check_pages(self, first: int, count: int) -> None:
        if count < 1 or first + count > len(self._written):
            raise stream.StreamError(f"pages {first}..{first + count - 1} lie outside the guest's RAM")

    def apply_record(self, channel: Channel, kind: int) -> None:
        """A page record's body (its type byte read): into RAM, or the buffer given to ``retarget``."""
        size = self._page_size
        if kind == stream.ZERO_RUN:
            first, count = stream.read_zero_run(channel)
            self._check_pages(first, count)
            # Fresh RAM is zero: only pages written before need clearing (punched back to holes).
            written = self._written
            pos = written.find(1, first, first + count)
            while pos >= 0:
                end = written.find(0, pos, first + count)
                end = first + count if end < 0 else end
                self.ram_map.madvise(mmap.MADV_REMOVE, pos * size, (end - pos) * size)
                written[pos:end] = bytes(end - pos)
                if self.received_pages is not None:
                    self.received_pages |= ((1 << (end - pos)) - 1) << pos
                self.digest.mark_range(pos * size, end * size)
                pos = written.find(1, end, first + count)
            return
        if kind == stream.XBZRLE:
            page, delta = stream.read_xbzrle(channel, size)
            self._check_pages(page, 1)
            old = bytes(self.ram[page * size:(page + 1) * size])
            try:
                self.ram[page * size:(page + 1) * size] = native.xbzrle_decode(delta, old)
            except ValueError as e:
                raise stream.StreamError(f"corrupt XBZRLE page {page}: {e}") from e
            self._mark(page, 1)
            return
        codec = channel.read_exact(1)[0] if kind == stream.COMPRESSED else 0
        pages = stream.read_page_index(channel)
        count = len(pages)
        for p in pages:
            self._check_pages(p, 1)
        contiguous = pages == list(range(pages[0], pages[0] + count))
        if kind == stream.PAGES:
            if contiguous:       # straight into guest RAM
                self._populate(pages[0] * size, count * size)
                channel.read_into(self.ram[pages[0] * size:(pages[-1] + 1) * size])
            else:
                data = bytearray(count * size)
                channel.read_into(data)
                self._scatter(pages, data)
        else:
            length = stream.read_compressed_length(channel, count, size)
            data = self._decompress(codec, channel.read_exact(length), count * size)
            self._scatter(pages, data)
        for p in pages:
            self._mark(p, 1)
        self.pages_received += count

    def _populate(self, offset: int, length: int) -> None:
        """Allocate guest pages in one call before a receive fills them: a page fault per 4 KiB
        page halves the receive rate (MADV_POPULATE_WRITE, Linux 5.14; without it, the faults)."""
        if self._can_populate:
            try:
                self.ram_map.madvise(MADV_POPULATE_WRITE, offset, length)
            except OSError:
                self._can_populate = False

    def _decompress(self, codec: int, packed: bytes, expected: int) -> bytes:
        """Inflate at most ``expected`` bytes: a record may not make the destination allocate more."""
        try:
            if codec == stream.CODEC_ZLIB:
                inflater = zlib.decompressobj()
                data = inflater.decompress(packed, expected)
                complete = inflater.eof and not inflater.unconsumed_tail and not inflater.unused_data
            elif codec == stream.CODEC_ZSTD:
                declared = zstandard.frame_content_size(packed)
                if declared not in (expected, zstandard.CONTENTSIZE_UNKNOWN):
                    raise stream.StreamError(f"compressed pages declare {declared} bytes, not {expected}")
                with zstandard.ZstdDecompressor().stream_reader(packed) as reader:
                    data = reader.read(expected)
                    complete = reader.read(1) == b""
            else:
                raise stream.StreamError(f"unknown compression codec {codec}")
        except (zlib.error, zstandard.ZstdError) as e:
            raise stream.StreamError(f"corrupt compressed pages: {e}") from e
        if len(data) != expected or not complete:
            raise stream.StreamError(f"compressed pages do not inflate to exactly {expected} bytes")
        return data

    def _scatter(self, pages: list[int], data) -> None:
        native.scatter_pages(self.ram, pages, self._page_size, data)

    def _mark(self, first: int, count: int) -> None:
        self._written[first:first + count] = b"\x01" * count
        if self.received_pages is not None:
            self.received_pages |= ((1 << count) - 1) << first
        self.digest.mark_range(first * self._page_size, (first + count) * self._page_size)

    # -- completion --------------------------------------------------------------------------

    def _finish(self, main: Channel, sections: list) -> None:
        runstate = dict((name, payload) for name, _, payload in sections).get(RUNSTATE_SECTION, b"running")
        self.verify_guest_ram()
        self.vm.load_devices([s for s in sections if s[0] != RUNSTATE_SECTION])
        if main.two_way:
            main.send(stream.pack_reply(True))
        self.end_time = time.monotonic()
        if self.header.flags & stream.FLAG_COLO:
            return                  # COLO calls _enter_colo once it is ready
        if self.autostart and runstate == b"running":
            self.vm.resume()
        else:
            self.vm.set_state("inmigrate", "paused")
        self.set_state("active", "completed")

    def _enter_colo(self) -> None:
        """QEMU's order: MIGRATION colo, then RESUME; the SVM runs whatever the PVM did."""
        self.set_state("active", "colo")
        self.vm.resume()

    def _clear_ram(self) -> None:
        """Punch the guest's RAM back to holes (zero), as fresh as a new memfd."""
        self.ram_map.madvise(mmap.MADV_REMOVE)
        if hasattr(self, "_written"):
            self._written[:] = bytes(len(self._written))
