"""Guest ABI v2 NIC rings: the ring functions (C and reference twin) on a RAM buffer, and
guests whose rings wrap, fill up, break the rules, or are saved with frames in flight."""

import os
import re
import struct
import time

import pytest

from native import _native, reference
from appliance.vmm import GUEST_PANICKED, SHUTDOWN
from appliance.vmm.devices import QueueBackend
from appliance.vmm.memory import dirty_pages
from vmm_helpers import migrate_in_process, wait_for

RAM = 1 << 20
CTRL, TX, RX, BUFS = 0x1000, 0x2000, 0x3000, 0x10000
IMPLS = pytest.mark.parametrize("impl", [_native, reference], ids=["native", "reference"])
U32 = 0xFFFFFFFF


def ring_ram(size, tx_prod=0, rx_avail=0, rx_cap=2048):
    """A RAM buffer with a control block and rings of `size` slots, each slot its own buffer."""
    ram, dirty = bytearray(RAM), bytearray(RAM // 4096 // 8)
    struct.pack_into("<I", ram, CTRL + reference.RING_TX_PROD, tx_prod)
    struct.pack_into("<I", ram, CTRL + reference.RING_RX_AVAIL, rx_avail)
    for slot in range(size):
        struct.pack_into("<QI", ram, RX + 16 * slot, BUFS + 2048 * slot, rx_cap)
    return ram, dirty


def queue_tx(ram, size, frames):
    """The guest's side of TX: fill the next slots and bump tx_prod."""
    prod = struct.unpack_from("<I", ram, CTRL)[0]
    for frame in frames:
        slot = prod & (size - 1)
        addr = BUFS + 0x40000 + 2048 * slot
        ram[addr:addr + len(frame)] = frame
        struct.pack_into("<QI", ram, TX + 16 * slot, addr, len(frame))
        prod = (prod + 1) & U32
    struct.pack_into("<I", ram, CTRL, prod)


def take_rx(ram, size, cons, used):
    """The guest's side of RX: frames published from `cons` to `used`, buffers posted back."""
    frames = []
    while cons != used:
        addr, length = struct.unpack_from("<QI", ram, RX + 16 * (cons & (size - 1)))
        frames.append(bytes(ram[addr:addr + length]))
        struct.pack_into("<I", ram, RX + 16 * (cons & (size - 1)) + 8, 2048)
        cons = (cons + 1) & U32
        avail = struct.unpack_from("<I", ram, CTRL + reference.RING_RX_AVAIL)[0]
        struct.pack_into("<I", ram, CTRL + reference.RING_RX_AVAIL, (avail + 1) & U32)
    return frames, cons


@IMPLS
def test_indexes_wrap_past_2_to_the_32(impl):
    """Free-running u32 indexes cross 2**32 and the slot count many times; every frame
    comes out once, in order, both ways."""
    size, start = 8, U32 - 20
    ram, dirty = ring_ram(size, tx_prod=start, rx_avail=(start + size) & U32)
    cons, used, rx_cons, out, back = start, start, start, [], []
    sent = [b"frame %03d" % i for i in range(100)]
    for chunk in range(0, 100, 5):
        queue_tx(ram, size, sent[chunk:chunk + 5])
        cons, frames = impl.ring_tx_pop(ram, dirty, CTRL, TX, size, cons, 3)
        cons, more = impl.ring_tx_pop(ram, dirty, CTRL, TX, size, cons, 64)
        out += frames + more
        used, taken, too_big = impl.ring_rx_push(ram, dirty, CTRL, RX, size, used, frames + more)
        assert (taken, too_big) == (5, 0)
        frames, rx_cons = take_rx(ram, size, rx_cons, used)
        back += frames
    assert out == sent and back == sent
    assert cons == used == (start + 100) & U32
    assert struct.unpack_from("<I", ram, CTRL + reference.RING_TX_CONS)[0] == cons
    assert struct.unpack_from("<I", ram, CTRL + reference.RING_RX_USED)[0] == used


@IMPLS
def test_full_rings_hold_frames_back_without_losing_or_repeating_any(impl):
    size = 4
    ram, dirty = ring_ram(size, rx_avail=size)
    pending, delivered, used, rx_cons = [b"f%d" % i for i in range(11)], [], 0, 0
    while pending:
        used, taken, too_big = impl.ring_rx_push(ram, dirty, CTRL, RX, size, used, pending)
        assert too_big == 0 and taken <= size
        pending = pending[taken:]
        assert impl.ring_rx_push(ram, dirty, CTRL, RX, size, used, pending)[1] == 0  # full: nothing taken
        frames, rx_cons = take_rx(ram, size, rx_cons, used)
        delivered += frames
    assert delivered == [b"f%d" % i for i in range(11)]
    # A full TX ring is legal; one more is an overrun.
    queue_tx(ram, size, [b"t"] * size)
    assert len(impl.ring_tx_pop(ram, dirty, CTRL, TX, size, 0, 64)[1]) == size


@IMPLS
@pytest.mark.parametrize("breakage, reason", [
    (lambda ram: struct.pack_into("<Q", ram, TX, RAM - 10), "TX descriptor 0: buffer [0xffff6, +0x40) is outside guest RAM"),
    (lambda ram: struct.pack_into("<Q", ram, TX, 2 ** 64 - 8), "is outside guest RAM"),
    (lambda ram: struct.pack_into("<I", ram, TX + 8, 1 << 30), "TX descriptor 0: absurd length 1073741824"),
    (lambda ram: struct.pack_into("<I", ram, TX + 8, 0), "TX descriptor 0: absurd length 0"),
    (lambda ram: struct.pack_into("<I", ram, CTRL, 9), "TX producer index overrun: 9 outstanding on a ring of 8"),
    (lambda ram: struct.pack_into("<I", ram, CTRL, U32), "TX producer index overrun"),
])
def test_malformed_tx_descriptors_are_refused_with_the_reason(impl, breakage, reason):
    ram, dirty = ring_ram(8)
    queue_tx(ram, 8, [b"x" * 64])
    breakage(ram)
    with pytest.raises(ValueError, match=re.escape(reason)):
        impl.ring_tx_pop(ram, dirty, CTRL, TX, 8, 0, 64)


@IMPLS
@pytest.mark.parametrize("breakage, reason", [
    (lambda ram: struct.pack_into("<Q", ram, RX, RAM), "RX descriptor 0: buffer"),
    (lambda ram: struct.pack_into("<I", ram, RX + 8, 70000), "RX descriptor 0: absurd length 70000"),
    (lambda ram: struct.pack_into("<I", ram, CTRL + reference.RING_RX_AVAIL, 100), "RX available index overrun"),
])
def test_malformed_rx_descriptors_are_refused_with_the_reason(impl, breakage, reason):
    ram, dirty = ring_ram(8, rx_avail=8)
    breakage(ram)
    before = bytes(ram)
    with pytest.raises(ValueError, match=reason):
        impl.ring_rx_push(ram, dirty, CTRL, RX, 8, 0, [b"frame"])
    assert bytes(ram) == before, "nothing is written for a descriptor that fails its checks"


@IMPLS
def test_rings_outside_ram_are_refused(impl):
    ram, dirty = ring_ram(8)
    with pytest.raises(ValueError, match="outside guest RAM"):
        impl.ring_tx_pop(ram, dirty, RAM - 64, TX, 8, 0, 1)
    with pytest.raises(ValueError, match="power of two"):
        impl.ring_rx_push(ram, dirty, CTRL, RX, 6, 0, [])


@IMPLS
def test_every_page_the_host_writes_is_in_the_dirty_bitmap(impl):
    """Frames across page boundaries, descriptors, indexes: the diff of RAM is the bitmap."""
    size = 8
    ram, dirty = ring_ram(size, rx_avail=size)
    for slot in range(size):  # buffers straddling page boundaries
        struct.pack_into("<QI", ram, RX + 16 * slot, BUFS + 4096 * 3 * slot + 4000, 2048)
    queue_tx(ram, size, [b"t" * 100] * 3)
    before = bytes(ram)
    impl.ring_tx_pop(ram, dirty, CTRL, TX, size, 0, 64)
    impl.ring_rx_push(ram, dirty, CTRL, RX, size, 0, [bytes([i + 1]) * (200 + 300 * i) for i in range(6)])
    impl.ring_arm(ram, dirty, CTRL, 1, 1)
    changed = {page for page in range(RAM // 4096)
               if ram[page * 4096:(page + 1) * 4096] != before[page * 4096:(page + 1) * 4096]}
    assert changed and changed <= set(dirty_pages(dirty))
    assert set(dirty_pages(dirty)) - changed <= {CTRL // 4096}  # notify flags rewritten with equal values at most


# --- guests on the rings ---------------------------------------------------------------------

def tap_name(tag):
    return f"rg{tag}{os.getpid() % 100000}"


def queue_vm(vms, tag, cmdline, **config):
    """A probe VM whose NIC is a QueueBackend with room for everything it sends."""
    vm = vms.new("probe", cmdline, tap=tap_name(tag), **config)
    backend = QueueBackend(tx_limit=1 << 20, rx_limit=1 << 20)
    vm.nic.attach(backend)
    return vm, backend


def numbered(i, mac=b"\xff" * 6):
    return mac + b"\x02\x00\x00\x00\x00\x01\x88\xb5" + struct.pack("<I", i) + bytes(46)


@pytest.mark.kvm
def test_full_rings_both_ways_lose_and_repeat_nothing(guest_images, vms):
    """The guest sends 3000 frames back to back through a 256-slot TX ring (it waits when
    it is full) and reads 3000 slowly through a 256-slot RX ring (the host holds the rest)."""
    n = 3000
    vm, backend = queue_vm(vms, "f", f"mode=flood n={n}")
    for i in range(n):
        assert backend.deliver(numbered(i))
    vm.start()
    wait_for(lambda: vm.state == SHUTDOWN, timeout=60, what="the flood guest")
    assert "flood: received 3000 bad 0" in vm.read_console() and vm.exit_status == 0, vm.read_console()
    sent = [backend.take(0) for _ in range(n)]
    assert [struct.unpack_from("<I", f, 14)[0] for f in sent] == list(range(n))
    assert backend.take(0) is None
    state = vm.nic.state
    assert (state.tx_frames, state.rx_frames, state.tx_dropped, state.rx_dropped) == (n, n, 0, 0)
    assert vm.exits < n / 2, f"{vm.exits} exits for {2 * n} frames"


@pytest.mark.kvm
@pytest.mark.parametrize("kind, reason", [
    ("txaddr", "bad NIC ring: TX descriptor 0: buffer [0x7f0000000000, +0x3c) is outside guest RAM"),
    ("txlen", "bad NIC ring: TX descriptor 0: absurd length 1073741824"),
    ("txoverrun", "bad NIC ring: TX producer index overrun: 1000 outstanding on a ring of 256"),
    ("rxoverrun", "bad NIC ring: RX available index overrun"),
    ("rxaddr", "bad NIC ring: RX descriptor 0: buffer [0xfffffffffffff000, +0x800) is outside guest RAM"),
])
def test_a_guest_breaking_its_rings_is_stopped_as_panicked(guest_images, vms, kind, reason):
    vm, backend = queue_vm(vms, "b", f"badring={kind}")
    events = []
    vm.add_listener(lambda name, data: events.append((name, data)))
    vm.start()
    wait_for(lambda: f"badring {kind}" in vm.read_console(), what="the guest to break its rings")
    backend.deliver(numbered(1))  # the RX checks need a frame to place
    wait_for(lambda: vm.state == GUEST_PANICKED, what="the VM to stop")
    assert vm.stop_reason.startswith(reason), vm.stop_reason
    assert ("GUEST_PANICKED", {"action": "pause", "reason": vm.stop_reason}) in events
    assert vm.nic.state.tx_frames == 0 and backend.take(0) is None
    vm.close()  # the VMM's threads all end; the test process (the daemon) carries on


def echo_count(backend, want, timeout=20):
    got = []
    wait_for(lambda: got.extend(iter(lambda: backend.take(0), None)) or len(got) >= want,
             timeout=timeout, what=f"{want} echoes")
    return got


@pytest.mark.kvm
def test_save_and_restore_with_frames_in_the_rx_ring(guest_images, vms, tmp_path):
    """Paused while published frames wait in its RX ring: restored in another VM, the guest
    echoes every frame once, in order, none lost in the state file and none repeated."""
    vm, backend = queue_vm(vms, "s", "mode=slowecho delay_us=3000")
    vm.start()
    wait_for(lambda: "echo ready" in vm.read_console(), what="the echo guest")
    n = 60
    for i in range(n):
        backend.deliver(numbered(i, mac=bytes.fromhex("525400123456")))
    wait_for(lambda: backend.take(0) is not None, what="a first echo")  # the guest is busy echoing
    vm.pause()
    ctrl = vm.nic.state.rings[0]
    rx_cons = struct.unpack_from("<I", vm.memory.mmap, ctrl + reference.RING_RX_CONS)[0]
    in_flight = (vm.nic.state.rx_used - rx_cons) & U32
    assert in_flight > 5, f"only {in_flight} frames waited in the RX ring"
    echoed_before = vm.nic.state.tx_frames
    path = tmp_path / "vm.state"
    vm.save_state(str(path))
    vm.close()

    restored, backend2 = queue_vm(vms, "r", "mode=slowecho delay_us=3000")
    restored.load_state(str(path))
    restored.resume()
    rest = echo_count(backend2, in_flight)
    time.sleep(0.1)
    rest += list(iter(lambda: backend2.take(0), None))
    # The ring's frames, and the one the guest was echoing when it stopped (it had taken it).
    seqs = [struct.unpack_from("<I", f, 14)[0] for f in rest]
    assert seqs == list(range(echoed_before, echoed_before + len(seqs)))
    assert in_flight <= len(seqs) <= in_flight + 1


@pytest.mark.kvm
def test_dirty_log_covers_every_page_the_nic_thread_writes(guest_images, vms):
    vm, backend = queue_vm(vms, "d", "mode=slowecho delay_us=0")
    vm.start()
    wait_for(lambda: "echo ready" in vm.read_console(), what="the echo guest")
    vm.pause()
    before = bytes(vm.memory.mmap)
    vm.start_dirty_tracking()
    vm.fetch_dirty_bitmap()
    vm.resume()
    for i in range(500):
        backend.deliver(numbered(i, mac=bytes.fromhex("525400123456")) + bytes(i))
    echo_count(backend, 500)
    vm.pause()
    dirty = set(dirty_pages(vm.fetch_dirty_bitmap()))
    after = vm.memory.mmap
    changed = {p for p in range(vm.memory.pages)
               if after[p * 4096:(p + 1) * 4096] != before[p * 4096:(p + 1) * 4096]}
    assert len(changed) > 10 and changed <= dirty, sorted(changed - dirty)[:10]


@IMPLS
def test_the_tap_loop_moves_frames_both_ways_and_returns_on_events(impl):
    """ring_serve_tap: frames both ways, doorbells asked for only while idle, back to the
    caller on an event, after the idle timeout, or after max_frames."""
    import socket
    host, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(5)]
    doorbell, control, event, rx_ready, tx_done = fds
    with host, tap:
        tap.setblocking(False)
        size = 8
        ram, dirty = ring_ram(size, rx_avail=size)
        queue_tx(ram, size, [b"out %d" % i for i in range(3)])
        for i in range(5):
            host.send(b"in %d" % i)
        result = impl.ring_serve_tap(ram, dirty, CTRL, TX, size, RX, size, 0, 0, tap.fileno(), doorbell,
                                     control, event, rx_ready, tx_done, 20, 1000)
        assert result == (3, 5, 3, 0, 5, 0, 15, 20, "timeout")
        assert [host.recv(100) for _ in range(3)] == [b"out 0", b"out 1", b"out 2"]
        assert take_rx(ram, size, 0, 5)[0] == [b"in %d" % i for i in range(5)]
        assert os.eventfd_read(rx_ready) and os.eventfd_read(tx_done)
        assert struct.unpack_from("<II", ram, CTRL + reference.RING_TX_CONS) == (3, 0), "notify cleared"
        assert {CTRL // 4096, BUFS // 4096} <= set(dirty_pages(dirty))
        # A full RX ring leaves the tap's frames in the tap; a frame too big for its buffer is dropped.
        host.send(b"z" * 3000)
        for i in range(12):
            host.send(b"more %d" % i)
        result = impl.ring_serve_tap(ram, dirty, CTRL, TX, size, RX, size, 3, 5, tap.fileno(), doorbell,
                                     control, event, rx_ready, tx_done, 20, 1000)
        used = result[1]
        assert used == 5 + size and result[5] == 1
        assert take_rx(ram, size, 5, used)[0] == [b"more %d" % i for i in range(size)]
        os.eventfd_write(event, 1)
        assert impl.ring_serve_tap(ram, dirty, CTRL, TX, size, RX, size, 3, used, tap.fileno(), doorbell,
                                   control, event, rx_ready, tx_done, 5000, 1000)[-1] == "event"
        queue_tx(ram, size, [b"x"] * 4)
        assert impl.ring_serve_tap(ram, dirty, CTRL, TX, size, RX, size, 3, used, tap.fileno(), doorbell,
                                   control, event, rx_ready, tx_done, 5000, 2)[-1] == "batch"
        struct.pack_into("<I", ram, CTRL, 100)
        with pytest.raises(ValueError, match="TX producer index overrun"):
            impl.ring_serve_tap(ram, dirty, CTRL, TX, size, RX, size, 3, used, tap.fileno(), doorbell,
                                control, event, rx_ready, tx_done, 20, 1000)
    for fd in fds:
        os.close(fd)


@IMPLS
def test_bitmap_mark_and_take(impl):
    bitmap = bytearray(4)
    impl.bitmap_mark(bitmap, 4095, 2)
    impl.bitmap_mark(bitmap, 31 * 4096, 1)
    with pytest.raises(ValueError):
        impl.bitmap_mark(bitmap, 32 * 4096, 1)
    assert impl.bitmap_take(bitmap) == bytes([0b11, 0, 0, 0x80]) and bitmap == bytearray(4)


@pytest.mark.kvm
def test_live_migration_with_frames_in_flight(guest_images, vms, tmp_path):
    """The source echoes a stream of frames while it migrates: the NIC thread keeps writing
    RX buffers during precopy, so equal RAM at the end proves the dirty log saw them; the
    destination then echoes the frames left in the ring, none lost, none twice."""
    import blake3
    src, src_backend = queue_vm(vms, "ms", "mode=slowecho delay_us=200")
    dst, dst_backend = queue_vm(vms, "md", "mode=slowecho delay_us=200", start_paused=True)
    assert dst.set_state("prelaunch", "inmigrate")
    src.start()
    wait_for(lambda: "echo ready" in src.read_console(), what="the echo guest")
    n, stop = 4000, []

    def feed():
        for i in range(n):
            if stop:
                return
            src_backend.deliver(numbered(i, mac=bytes.fromhex("525400123456")))
            if i % 50 == 49:
                time.sleep(0.002)

    import threading
    feeder = threading.Thread(target=feed)
    feeder.start()
    wait_for(lambda: src.nic.state.tx_frames > 200, what="echoes before the migration")
    try:
        migrate_in_process(src, dst, tmp_path)
    finally:
        stop.append(True)
        feeder.join()
    assert blake3.blake3(src.memory.mmap).digest() == blake3.blake3(dst.memory.mmap).digest()
    ctrl = src.nic.state.rings[0]
    rx_cons = struct.unpack_from("<I", src.memory.mmap, ctrl + reference.RING_RX_CONS)[0]
    in_flight = (src.nic.state.rx_used - rx_cons) & U32
    echoed = list(iter(lambda: src_backend.take(0), None))
    dst.resume()
    rest = echo_count(dst_backend, in_flight)
    time.sleep(0.1)
    rest += list(iter(lambda: dst_backend.take(0), None))
    seqs = [struct.unpack_from("<I", f, 14)[0] for f in echoed + rest]
    assert seqs == list(range(len(seqs))), "echoes out of order, lost or repeated"
    assert in_flight > 0 and len(rest) >= in_flight and len(echoed) > 200


@pytest.mark.kvm
def test_the_clock_page_time_follows_the_guest_clock_across_a_restore(guest_images, vms, tmp_path):
    """plat_now_ns (TSC and clock page, no exit) against the time hypercall, before and after
    a restore into another VM, whose TSC is another counter altogether."""
    def pairs(vm):
        return [(int(a), int(b)) for a, b in re.findall(r"clock page=(\d+) hypercall=(\d+)", vm.read_console())]

    vm = vms.new("probe", "mode=clock n=100000")
    vm.start()
    wait_for(lambda: len(pairs(vm)) >= 5, what="clock lines")
    vm.pause()
    stopped_at = vm.guest_monotonic_ns()
    vm.save_state(str(tmp_path / "clock.state"))
    restored = vms.new("probe", "mode=clock n=100000")
    restored.load_state(str(tmp_path / "clock.state"))
    restored.resume()
    wait_for(lambda: len(pairs(restored)) >= 5, what="clock lines after the restore")
    restored.pause()
    for seen in (pairs(vm), pairs(restored)):
        # The exit sits between the two reads: never negative, typically tens of µs.  A wrong
        # clock shifts every pair; a preempted vCPU only stretches one (so: the median, and a
        # wide bound for each).
        gaps = sorted(hypercall - page for page, hypercall in seen)
        assert gaps[0] >= 0 and gaps[-1] < 100_000_000 and gaps[len(gaps) // 2] < 1_000_000, seen
    assert min(page for page, _ in pairs(restored)) >= stopped_at
    assert pairs(restored)[-1][0] > stopped_at
