"""query-migrate's figures against the test's own measurements, and settings by their effect on the wire.

A WireTap relays the stream between source and destination and counts, with a
timestamp, every byte the source puts on the wire: that is the test's measure
of bytes, rates and pages arrived.  memdirty's counters in the source's RAM are
its measure of pages dirtied (they advance by one page per page written).
"""
import bisect
import socket
import threading
import time

import blake3
import pytest

from replication.destination import MigrationDestination
from replication.source import MigrationSource
from replication.stats import RATE_SPAN
from replication.transport import Listener
from appliance.control.migration_settings import DEFAULT_PARAMETERS
from vmm_helpers import PAGE, memdirty_layout, page_counters, wait_for

pytestmark = pytest.mark.kvm

CAPS = {"xbzrle": False, "compress": False, "multifd": False, "auto-converge": False, "events": True,
        "pause-before-switchover": False, "validate-uuid": False, "return-path": False, "release-ram": False}
WIRE_PAGE = PAGE + 8          # a normal page on the wire: its data and its page number (PAGES records)


def ram_digest(vm):
    return blake3.blake3(vm.ram_regions()[0][3]).hexdigest()


class WireTap:
    """A UNIX-socket relay from ``listen_path`` to ``target_path`` (every connection, multifd's
    too) that counts each byte the source sends, with the time it arrived."""

    def __init__(self, listen_path: str, target_path: str):
        self.target_path = target_path
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(listen_path)
        self.server.listen(8)
        self.times: list[float] = []
        self.totals: list[int] = []
        self.total = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            out = socket.socket(socket.AF_UNIX)
            out.connect(self.target_path)
            for args in ((conn, out, True), (out, conn, False)):
                thread = threading.Thread(target=self._relay, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _relay(self, src, dst, count):
        try:
            while chunk := src.recv(1 << 16):
                if count:
                    with self._lock:
                        self.total += len(chunk)
                        self.times.append(time.monotonic())
                        self.totals.append(self.total)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def bytes_at(self, t: float) -> int:
        with self._lock:
            i = bisect.bisect_right(self.times, t)
            return self.totals[i - 1] if i else 0

    def rate(self, t0: float, t1: float) -> float:
        """Bytes/s that crossed between t0 and t1."""
        return (self.bytes_at(t1) - self.bytes_at(t0)) / (t1 - t0)

    def close(self):
        self.server.close()


def memdirty_position(vm, base, pages):
    """Pages written by memdirty since it started, modulo 256 passes: c*pages + k, where pages
    [0,k) hold c+1 and [k,pages) hold c."""
    counters = page_counters(vm.ram_regions()[0][3], base, pages)
    c = counters[-1]
    return c * pages + counters.find(bytes([c]))


def within(reported, measured, tolerance=0.2):
    return abs(reported - measured) <= tolerance * abs(measured)


@pytest.fixture
def wire(tmp_path):
    tap = WireTap(str(tmp_path / "tap.sock"), str(tmp_path / "dst.sock"))
    yield tap
    tap.close()


def start_pair(vms, tmp_path, cmdline, memory, caps, params, on_event=lambda n, d: None, dst_params=None):
    src = vms.new("memdirty", cmdline, memory_mib=memory)
    dst = vms.new("memdirty", cmdline, memory_mib=memory, start_paused=True)
    assert dst.set_state("prelaunch", "inmigrate")
    src.start()
    layout = memdirty_layout(src)
    wait_for(lambda: "pass 1\n" in src.read_console(), timeout=10, what="memdirty's first pass")
    caps = dict(CAPS, **caps)
    destination = MigrationDestination(dst, Listener(f"unix:{tmp_path}/dst.sock"), caps, False,
                                       lambda n, d: None, parameters=dst_params or dict(DEFAULT_PARAMETERS))
    source = MigrationSource(src, f"unix:{tmp_path}/tap.sock", caps, params, {}, on_event)
    return src, dst, layout, source, destination


def test_live_figures_match_the_wire_and_the_guest(vms, guest_images, tmp_path, wire):
    """memdirty writes 6 MiB/s of an 8 MiB working set while the stream is held to 8 MiB/s
    and never allowed to converge: every pass lasts long enough (0.3 to 1 s) to poll
    query-migrate many times.  Each live figure is compared with what the test measured."""
    params = {**DEFAULT_PARAMETERS, "max-bandwidth": 8 << 20, "downtime-limit": 0}
    syncs = {}                  # pass -> (time, memdirty position) at the dirty-log sync
    holder = {}

    def on_event(name, data):
        if name == "MIGRATION_PASS":
            syncs[data["pass"]] = (time.monotonic(), memdirty_position(holder["src"], *holder["layout"]))

    src, dst, layout, source, destination = start_pair(vms, tmp_path, "mib=8 rate=6", 32, {}, params, on_event)
    holder.update(src=src, layout=layout)
    destination.start()
    source.start()
    polls = []
    try:
        while len(syncs) < 6 and source.running:
            t = time.monotonic()
            polls.append((t, source.info(), source.stats.hash_rate, memdirty_position(src, *layout)))
            time.sleep(0.03)
    finally:
        params["downtime-limit"] = 10_000      # now let it converge
        source.join(30)
        destination.join(30)
    assert source.status == "completed", source.error
    assert destination.status == "completed", destination.error
    assert ram_digest(src) == ram_digest(dst)
    pages = layout[1]

    checked = {"mbps": 0, "pages-per-second": 0, "remaining": 0, "expected-downtime": 0, "dirty-pages-rate": 0,
               "live dirty-pages-rate": 0}
    begun = next(t for t, info, _, _ in polls if info["status"] == "active")
    for t, info, hash_rate, position in polls:
        if info["status"] != "active":
            continue
        ram = info["ram"]
        sync = ram["dirty-sync-count"]
        if wire.bytes_at(t) > 1 << 20:     # past the first slices in flight
            assert within(ram["transferred"], wire.bytes_at(t)), (ram["transferred"], wire.bytes_at(t))
        if sync < 2 or t - begun < RATE_SPAN + 0.1:
            continue             # the bulk pass (zero pages too), or before the figures span RATE_SPAN
        rate = wire.rate(t - RATE_SPAN - 0.1, t)
        assert within(ram["mbps"], rate * 8 / 1e6), (t, ram["mbps"], rate * 8 / 1e6)
        checked["mbps"] += 1
        if t - syncs[2][0] > RATE_SPAN + 0.1:      # past the bulk pass's zero pages: all pages are normal
            assert within(ram["pages-per-second"], rate / WIRE_PAGE), (ram["pages-per-second"], rate / WIRE_PAGE)
            checked["pages-per-second"] += 1
        # Pages left: what memdirty dirtied before the sync, less what crossed the wire since.
        (t0, p0), (t1, p1) = syncs[sync - 1], syncs[sync]
        dirtied = min(p1 - p0, pages)
        arrived = (wire.bytes_at(t) - wire.bytes_at(t1)) / WIRE_PAGE
        left = dirtied - arrived
        if left >= dirtied / 4:
            assert within(ram["remaining"] / PAGE, left), ("remaining", ram["remaining"] / PAGE, left, dirtied)
            # Sending what is left at the wire's rate, then hashing it for the digest at the rate the
            # source measured at its last digest refresh (CPU time the wire cannot show).
            expected_ms = 1000 * left * WIRE_PAGE / rate + 1000 * ram["remaining"] / hash_rate
            assert within(info["expected-downtime"], expected_ms), ("expected", info["expected-downtime"], expected_ms)
            checked["remaining"] += 1
            checked["expected-downtime"] += 1
        # The dirty rate: at the sync, what memdirty dirtied over the interval before it; later in
        # the pass, what it dirtied since, as read from the dirty log up to 150 ms before the poll.
        if t - t1 < 0.09:
            assert within(ram["dirty-pages-rate"], dirtied / (t1 - t0)), (ram["dirty-pages-rate"], dirtied / (t1 - t0))
            checked["dirty-pages-rate"] += 1
        elif t - t1 >= 0.3:
            earlier = max(p for when, *_, p in polls if when <= t - 0.15)
            low, high = (earlier - p1) / (t - t1), (position - p1) / (t - 0.15 - t1)
            assert 0.8 * low <= ram["dirty-pages-rate"] <= 1.2 * high, (ram["dirty-pages-rate"], low, high)
            checked["live dirty-pages-rate"] += 1
    assert min(checked.values()) >= 5, checked
    # The figures change within a pass, not only when it ends: every 100 ms (polled every 30 ms,
    # each pass shows a new rate at least every 200 ms).
    for sync in range(2, 6):
        in_pass = [(t, info) for t, info, *_ in polls if info.get("ram", {}).get("dirty-sync-count") == sync]
        length = in_pass[-1][0] - in_pass[0][0]
        for figure in ("mbps", "remaining", "dirty-pages-rate"):    # pages-per-second may hold steady
            values = {info["ram"][figure] for _, info in in_pass}
            assert len(values) >= length / 0.2, (sync, figure, length, values)
        assert len({info["expected-downtime"] for _, info in in_pass}) >= length / 0.2

    final = source.info()
    assert final["ram"]["transferred"] == wire.total
    transfer_time = wire.times[-1] - wire.times[0]
    assert within(final["ram"]["mbps"], wire.total * 8 / 1e6 / transfer_time)
    assert final["ram"]["remaining"] == 0


def migrate(source, destination, watch=lambda: None, timeout=60):
    """Run both sides to their end, calling ``watch`` every 10 ms meanwhile."""
    destination.start()
    source.start()
    deadline = time.monotonic() + timeout
    while (source.running or destination.running) and time.monotonic() < deadline:
        watch()
        time.sleep(0.01)
    source.join(10)
    destination.join(10)
    assert source.status == "completed", source.error
    assert destination.status == "completed", destination.error


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_multifd_compression_shrinks_the_wire(vms, guest_images, tmp_path, wire, method):
    """memdirty's pages hold one counter byte each: compressed they take a small fraction of
    their size on the wire, which transferred counts; the destination decodes them exactly."""
    params = {**DEFAULT_PARAMETERS, "max-bandwidth": 0, "multifd-compression": method, "multifd-channels": 2}
    src, dst, _, source, destination = start_pair(vms, tmp_path, "mib=8 rate=0", 32, {"multifd": True}, params)
    migrate(source, destination)
    assert ram_digest(src) == ram_digest(dst)
    ram = source.info()["ram"]
    assert ram["transferred"] == wire.total
    assert 0 < ram["multifd-bytes"] < ram["transferred"] and ram["normal"] >= 8 * 256
    if method == "none":
        assert wire.total > ram["normal-bytes"]
    else:
        assert wire.total < ram["normal-bytes"] / 10


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "no-wait"])
def test_compress_wait_thread(vms, guest_images, tmp_path, wire, wait):
    """One slow (level 9) compress thread: with compress-wait-thread the writer waits for it and
    every page goes compressed; without, pages that find it busy go as they are, as in QEMU."""
    params = {**DEFAULT_PARAMETERS, "max-bandwidth": 0, "compress-threads": 1, "compress-level": 9,
              "compress-wait-thread": wait}
    src, dst, _, source, destination = start_pair(vms, tmp_path, "mib=8 rate=0", 32, {"compress": True}, params)
    src.pause()             # one slow thread cannot keep up with memdirty flat out: a single pass is enough
    migrate(source, destination)
    assert ram_digest(src) == ram_digest(dst)
    info = source.info()
    ram, compression = info["ram"], info["compression"]
    assert ram["transferred"] == wire.total
    raw_pages = ram["normal"] - compression["pages"]
    if wait:
        assert raw_pages == 0 and wire.total < ram["normal-bytes"] / 10
    else:
        assert compression["busy"] > 0 and raw_pages > 0
        assert wire.total > raw_pages * PAGE > 0       # the uncompressed pages are on the wire as they are


@pytest.mark.parametrize("threads", [1, 3])
def test_decompress_threads(vms, guest_images, tmp_path, wire, threads):
    """The destination inflates a compress stream with exactly decompress-threads threads."""
    params = {**DEFAULT_PARAMETERS, "max-bandwidth": 0, "compress-threads": 2}
    dst_params = {**DEFAULT_PARAMETERS, "decompress-threads": threads}
    src, dst, _, source, destination = start_pair(vms, tmp_path, "mib=8 rate=0", 32, {"compress": True}, params,
                                                  dst_params=dst_params)
    seen = set()

    def watch():
        seen.update(t.name for t in threading.enumerate() if t.name.startswith("decompress-"))

    migrate(source, destination, watch)
    assert ram_digest(src) == ram_digest(dst)
    assert seen == {f"decompress-{n}" for n in range(threads)}
    assert not [t for t in threading.enumerate() if t.name.startswith("decompress-")]
