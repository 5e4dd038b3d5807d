"""The page writer without KVM: a bytearray as guest RAM, socketpairs as channels, and what
arrives read back with replication/stream.py's readers."""
import socket
import threading
import time
import zlib

import pytest
import zstandard

import native
from appliance.control.migration_settings import DEFAULT_PARAMETERS
from replication import stream
from replication.pages import PAGE_SIZE, PageWriter
from replication.ram import CHUNK_SIZE, RamDigest
from replication.stats import MigrationStats
from replication.stream import BytesReader
from replication.transport import Channel
from replication.xbzrle import XbzrleCache

RAM_SIZE = 2 * CHUNK_SIZE          # two digest chunks of 512 pages
PARAMS = {**DEFAULT_PARAMETERS, "max-bandwidth": 0}


class Wire:
    """A Channel for the writer; what reaches the other end is collected by a thread."""

    def __init__(self):
        ours, theirs = socket.socketpair()
        self.channel = Channel(sock=ours, description="test")
        self.data = bytearray()
        self._peer = theirs
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self):
        while chunk := self._peer.recv(1 << 20):
            self.data += chunk

    def records(self) -> list[tuple]:
        """Close the writer's end; everything it sent, record by record."""
        self.close()
        return read_records(bytes(self.data))

    def close(self) -> None:
        self.channel.close()
        self._reader.join(10)
        self._peer.close()


def read_records(data: bytes) -> list[tuple]:
    """(name, ...) per record; compressed page data comes back decompressed."""
    reader, records = BytesReader(data), []
    while reader.left:
        kind = reader.read_exact(1)[0]
        if kind == stream.ZERO_RUN:
            records.append(("ZERO_RUN", *stream.read_zero_run(reader)))
        elif kind == stream.PAGES:
            pages = stream.read_page_index(reader)
            records.append(("PAGES", pages, reader.read_exact(len(pages) * PAGE_SIZE)))
        elif kind == stream.XBZRLE:
            records.append(("XBZRLE", *stream.read_xbzrle(reader, PAGE_SIZE)))
        elif kind == stream.COMPRESSED:
            codec = reader.read_exact(1)[0]
            pages = stream.read_page_index(reader)
            packed = reader.read_exact(stream.read_compressed_length(reader, len(pages), PAGE_SIZE))
            data = zlib.decompress(packed) if codec == stream.CODEC_ZLIB else zstandard.decompress(packed)
            records.append(("COMPRESSED", pages, data))
        elif kind == stream.PASS_END:
            records.append(("PASS_END", stream.read_pass_end(reader)))
        else:
            raise AssertionError(f"record type {kind} from the page writer")
    return records


def writer_over(ram: bytearray, wire: Wire, *, params=PARAMS, xbzrle=None, compress=False, check=lambda: None):
    view = memoryview(ram)
    stats = MigrationStats(len(ram), params, xbzrle, auto_converge=False, compress=compress)
    return PageWriter(wire.channel, view, RamDigest(view, len(ram), []), stats, params,
                      xbzrle=xbzrle, compress=compress, check=check)


def fill(ram: bytearray, page: int, seed: int) -> None:
    ram[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = bytes((seed + i) % 251 + 1 for i in range(PAGE_SIZE))


def page(ram: bytearray, first: int, count: int = 1) -> bytes:
    return bytes(ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE])


def test_zero_pages_go_as_zero_runs_and_the_rest_as_pages():
    ram = bytearray(RAM_SIZE)
    for number in (3, 4, 10):
        fill(ram, number, number)
    wire = Wire()
    writer = writer_over(ram, wire)
    writer.send_dirty_runs([(0, 16)])
    writer.end_pass(2)
    assert wire.records() == [("ZERO_RUN", 0, 3), ("PAGES", [3, 4], page(ram, 3, 2)), ("ZERO_RUN", 5, 5),
                              ("PAGES", [10], page(ram, 10)), ("ZERO_RUN", 11, 5), ("PASS_END", 2)]
    stats = writer.stats
    assert (stats.duplicate, stats.normal, stats.normal_bytes, stats.pages_sent) == (13, 3, 3 * PAGE_SIZE, 16)
    assert stats.transferred == len(wire.data)          # every byte on the wire, as QEMU counts
    assert stats.remaining == RAM_SIZE - 16 * PAGE_SIZE


def test_bulk_sends_holes_unread_and_marks_only_what_it_read():
    ram = bytearray(RAM_SIZE)
    fill(ram, 0, 1)
    fill(ram, 1, 2)
    fill(ram, 700, 3)           # in the second chunk, but inside a hole as far as the extents say
    wire = Wire()
    writer = writer_over(ram, wire)
    writer.send_bulk([(0, 2 * PAGE_SIZE)])
    assert writer.digest.stale == {0}
    writer.end_pass(1)
    # The digest is of what was sent: the page the extents hid is not in it, until it is sent.
    assert writer.digest.digest() != writer.full_digest()
    writer.send_dirty_runs([(700, 1)])
    assert writer.digest.stale == {1}
    assert writer.digest.digest() == writer.full_digest()
    assert wire.records() == [("PAGES", [0, 1], page(ram, 0, 2)), ("ZERO_RUN", 2, RAM_SIZE // PAGE_SIZE - 2),
                              ("PASS_END", 1), ("PAGES", [700], page(ram, 700))]


def test_end_record_carries_both_digests():
    ram = bytearray(RAM_SIZE)
    fill(ram, 5, 5)
    wire = Wire()
    writer = writer_over(ram, wire)
    writer.send_bulk([(5 * PAGE_SIZE, 6 * PAGE_SIZE)])
    wire.close()
    sections = [("cpu.regs", 1, b"\x01" * 40)]
    record = writer.end_record(sections, writer.full_digest())
    assert record[0] == stream.END
    ram_digest, devices_digest, full = stream.read_end(BytesReader(record[1:]), True)
    assert ram_digest == full == writer.full_digest()
    assert devices_digest == stream.devices_digest(sections)
    assert len(writer.end_record(sections, None)) == 1 + 2 * stream.DIGEST_SIZE


def test_xbzrle_sends_a_delta_on_the_second_send_of_a_changed_page():
    ram = bytearray(RAM_SIZE)
    cache = XbzrleCache(1 << 20, PAGE_SIZE)
    fill(ram, 5, 9)
    wire = Wire()
    writer = writer_over(ram, wire, xbzrle=cache)
    writer.send_bulk([(5 * PAGE_SIZE, 6 * PAGE_SIZE)])
    assert cache.misses == 0                     # the bulk pass leaves the cache alone
    writer.send_dirty_runs([(5, 1)])             # first copy in the cache: the whole page
    first = page(ram, 5)
    ram[5 * PAGE_SIZE + 100:5 * PAGE_SIZE + 104] = b"abcd"
    writer.send_dirty_runs([(5, 1)])             # changed: a delta against the copy sent
    writer.send_dirty_runs([(5, 1)])             # unchanged: nothing at all
    ram[5 * PAGE_SIZE:6 * PAGE_SIZE] = bytes(PAGE_SIZE)
    writer.send_dirty_runs([(5, 1)])             # zero: a zero run, and the cached copy is dropped
    fill(ram, 5, 77)
    writer.send_dirty_runs([(5, 1)])             # so the next copy goes whole again
    bulk, *records = wire.records()[2:]
    assert bulk[0] == "ZERO_RUN" and [r[0] for r in records] == ["PAGES", "XBZRLE", "ZERO_RUN", "PAGES"]
    assert records[0] == ("PAGES", [5], first)
    _, delta_page, delta = records[1]
    assert delta_page == 5 and len(delta) < 16
    changed = bytearray(first)
    changed[100:104] = b"abcd"
    assert native.xbzrle_decode(delta, first) == bytes(changed)
    assert records[2] == ("ZERO_RUN", 5, 1)
    assert records[3] == ("PAGES", [5], page(ram, 5))
    assert (cache.hits, cache.misses, cache.stats()["pages"]) == (2, 2, 1) and writer.stats.normal == 3


def test_compress_writes_results_in_submission_order():
    ram = bytearray(RAM_SIZE)
    runs = [(first, 10) for first in range(0, 400, 40)]
    for first, count in runs:
        for number in range(first, first + count):
            fill(ram, number, number)
    wire = Wire()
    writer = writer_over(ram, wire, params={**PARAMS, "compress-threads": 2}, compress=True)
    writer.send_dirty_runs(runs)
    writer.end_pass(3)
    writer.close()
    records = wire.records()
    compressed = [r for r in records if r[0] == "COMPRESSED"]
    assert [pages for _, pages, _ in compressed] == [list(range(f, f + c)) for f, c in runs]
    assert all(data == page(ram, pages[0], len(pages)) for _, pages, data in compressed)
    assert records[-1] == ("PASS_END", 3)        # everything pending is written before it
    stats = writer.stats
    assert stats.compress_pages == 100 and stats.compress_submitted == len(runs)
    assert stats.compressed_size < 100 * PAGE_SIZE


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_multifd_spreads_pages_and_ends_each_pass_on_every_channel(method):
    ram = bytearray(RAM_SIZE)
    runs = [(first, 8) for first in range(0, 160, 16)]
    for first, count in runs:
        for number in range(first, first + count):
            fill(ram, number, number)
    main, lanes = Wire(), [Wire(), Wire()]
    writer = writer_over(ram, main, params={**PARAMS, "multifd-compression": method})
    for lane in lanes:
        writer.add_multifd_channel(lane.channel)
    writer.send_dirty_runs(runs + [(300, 4)])          # dealt round robin: data, data, ..., a zero run
    writer.end_pass(1)
    writer.send_dirty_runs([(0, 8)])
    writer.end_pass(2)
    writer.finish()
    assert main.records() == [("PASS_END", 1), ("PASS_END", 2)]
    sent_pages, multifd_bytes = {}, 0
    for lane in lanes:
        records = lane.records()
        passes = [r[1] for r in records if r[0] == "PASS_END"]
        assert passes == [1, 2] and records[-1] == ("PASS_END", 2)
        data_records = [r for r in records if r[0] in ("PAGES", "COMPRESSED")]
        assert data_records, "each channel carries page data"
        assert {r[0] for r in data_records} == {"PAGES" if method == "none" else "COMPRESSED"}
        for _, pages, data in data_records:
            assert data == page(ram, pages[0], len(pages))
            sent_pages.update(dict.fromkeys(pages))
        multifd_bytes += len(lane.data)          # all of it, after compression
    assert sorted(sent_pages) == [n for first, count in runs for n in range(first, first + count)]
    assert writer.stats.multifd_bytes == multifd_bytes
    assert writer.stats.transferred == multifd_bytes + len(main.data)
    assert writer.sender_error is None


def test_a_failed_multifd_sender_leaves_its_error_for_the_owners_check():
    ram = bytearray(RAM_SIZE)
    fill(ram, 0, 1)
    main, lane = Wire(), Wire()
    writer = writer_over(ram, main)
    writer.add_multifd_channel(lane.channel)
    lane.channel.abort()
    writer.send_dirty_runs([(0, 1)])
    deadline = time.monotonic() + 10
    while writer.sender_error is None:
        assert time.monotonic() < deadline, "the sender never failed"
        time.sleep(0.01)
    assert "channel closed" in str(writer.sender_error)
    writer.stop()
    writer.join(5)
    main.close()
    lane.close()


def test_the_check_stops_the_writer_between_batches():
    ram = bytearray(2 * stream.MAX_BATCH_PAGES * PAGE_SIZE)
    ram[:] = b"\x01" * len(ram)
    checks = []

    def check():
        checks.append(len(checks))
        if len(checks) > 1:
            raise RuntimeError("cancelled")

    wire = Wire()
    writer = writer_over(ram, wire, check=check)
    with pytest.raises(RuntimeError, match="cancelled"):
        writer.send_dirty_runs([(0, 2 * stream.MAX_BATCH_PAGES)])
    assert wire.records() == [("PAGES", list(range(stream.MAX_BATCH_PAGES)), page(ram, 0, stream.MAX_BATCH_PAGES))]


def test_max_bandwidth_paces_live_passes_only(monkeypatch):
    sleeps = []
    monkeypatch.setattr("replication.stats.time.sleep", sleeps.append)
    ram = bytearray(RAM_SIZE)
    for number in range(64):
        fill(ram, number, number)
    params = {**PARAMS, "max-bandwidth": 1 << 20}
    wire = Wire()
    writer = writer_over(ram, wire, params=params)
    started = time.monotonic()
    writer.send_dirty_runs([(0, 64)])                        # one PAGES record, sent 10 ms of it at a time
    elapsed = time.monotonic() - started
    record = len(stream.pack_page_index(stream.PAGES, range(64))) + 64 * PAGE_SIZE
    # The sleeps are recorded, not done: the last slice waits for all the bytes at 1 MiB/s, less
    # the time the sends themselves took.
    assert len(sleeps) > 10
    assert record / (1 << 20) - elapsed <= sleeps[-1] <= record / (1 << 20)
    paced = len(sleeps)
    writer.stats.limit_rate = False                          # the stop-and-copy pass: flat out
    writer.send_dirty_runs([(0, 64)])
    writer.stats.limit_rate = True
    params["max-bandwidth"] = 0                              # live, as migrate-set-parameters
    writer.send_dirty_runs([(0, 64)])
    assert len(sleeps) == paced
    assert writer.stats.transferred == 3 * record
    wire.records()
