"""The console ring (docs/guest-abi.md): guest output through guest RAM and an ioeventfd
doorbell, with no exit per write; wrap-around, save/restore, migration, malformed rings."""

import re
import struct
import time

import blake3
import pytest

from appliance.vmm import GUEST_PANICKED, SHUTDOWN, abi
from appliance.vmm.devices import Console, ConsoleRing, ConsoleState
from appliance.vmm.errors import GuestError
from appliance.vmm.memory import dirty_pages
from vmm_helpers import migrate_in_process, wait_for

U32 = 0xFFFFFFFF


def stream_numbers(text):
    return [int(n) for n in re.findall(r"^stream (\d+)$", text, re.M)]


@pytest.mark.kvm
def test_output_reaches_the_console_and_its_log_without_console_exits(guest_images, vms, tmp_path):
    log = tmp_path / "console.log"
    vm = vms.new("probe", "mode=exit status=7", console_log=str(log))
    vm.start()
    wait_for(lambda: vm.state == SHUTDOWN, what="the guest to halt")
    assert vm.read_console() == "exiting with 7\n"
    assert log.read_text() == "exiting with 7\n"
    assert vm.hypercall_exits[abi.HC_CONSOLE_WRITE] == 0
    assert vm.hypercall_exits[abi.HC_CONSOLE_SETUP] == 1
    assert vm.console.state.bytes_written == len("exiting with 7\n")


@pytest.mark.kvm
def test_a_long_burst_wraps_the_ring_with_nothing_lost_or_repeated(guest_images, vms, tmp_path):
    """5000 lines of 100 bytes go through a 16 KiB ring (about 30 times round), faster than
    the host drains it: the guest waits for room, and every line comes out once, in order."""
    log = tmp_path / "console.log"
    n = 5000
    vm = vms.new("probe", f"mode=burst n={n}", console_log=str(log))
    vm.start()
    wait_for(lambda: vm.state == SHUTDOWN, timeout=30, what="the burst to end")
    text = vm.read_console()
    numbers = [int(m) for m in re.findall(r"^burst (\d+) \.+$", text, re.M)]
    assert numbers == list(range(n))
    assert text.count("\n") == n and log.read_text() == text
    assert vm.console.state.cons == len(text) > 20 * vm.console.state.size
    assert vm.hypercall_exits[abi.HC_CONSOLE_WRITE] == 0


def test_all_output_is_readable_once_the_state_says_the_guest_halted(guest_images, vms):
    """A guest that prints and halts: whoever sees the state turn to shutdown (here, a reader
    spinning on it) reads every line, not what the console thread has drained so far."""
    for attempt in range(10):
        vm = vms.new("probe", "mode=burst n=40")
        vm.start()
        deadline = time.monotonic() + 10
        while vm.state != SHUTDOWN:
            assert time.monotonic() < deadline, "the burst did not end"
        assert vm.read_console().count("\n") == 40, (attempt, vm.read_console()[-300:])
        vm.close()


class _Ram:
    """GuestMemory's bounds-checked access on a plain buffer, for the ring alone."""

    def __init__(self, size):
        self.size = size
        self.mmap = bytearray(size)
        self.dirty = []

    def check(self, gpa, length, what="buffer"):
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestError(f"{what} [{gpa:#x}, +{length:#x}) is outside guest RAM (size {self.size:#x})")

    def read(self, gpa, length, what="buffer"):
        self.check(gpa, length, what)
        return bytes(self.mmap[gpa:gpa + length])

    def write(self, gpa, data, what="buffer"):
        self.check(gpa, len(data), what)
        self.mmap[gpa:gpa + len(data)] = data
        self.dirty.append((gpa, len(data)))


def test_indexes_wrap_past_2_to_the_32():
    """Free-running u32 indexes cross 2**32 (and the ring's end) and each byte comes out once;
    the host's index lands in guest RAM and is reported as a VMM write (dirty)."""
    ctrl, data, size = 0x1000, 0x2000, 64
    ram, console = _Ram(0x4000), Console()
    start = U32 - 40
    struct.pack_into("<I", ram.mmap, ctrl, start)
    ring = ConsoleRing(console, ram, on_fault=None)
    try:
        ring.setup(ctrl, data, size)
        prod, sent = start, b""
        for i in range(20):
            chunk = b"line %02d\n" % i
            for byte in chunk:
                ram.mmap[data + prod % size] = byte
                prod = (prod + 1) & U32
            struct.pack_into("<I", ram.mmap, ctrl, prod)
            sent += chunk
            assert ring.drain() == len(chunk)
        assert console.text().encode() == sent
        assert struct.unpack_from("<I", ram.mmap, ctrl + 64)[0] == prod == console.state.cons
        assert prod < start and (ctrl + 64, 4) in ram.dirty
    finally:
        ring.close()


def test_setup_refuses_rings_outside_ram_and_odd_sizes():
    ram, console = _Ram(0x4000), Console()
    ring = ConsoleRing(console, ram, on_fault=None)
    try:
        with pytest.raises(GuestError, match=r"console ring data \[0x3800, \+0x1000\) is outside guest RAM"):
            ring.setup(0x1000, 0x3800, 4096)
        with pytest.raises(GuestError, match="not a power of two"):
            ring.setup(0x1000, 0x2000, 1000)
        with pytest.raises(GuestError, match="64-byte aligned"):
            ring.setup(0x1010, 0x2000, 1024)
        ring.setup(0x1000, 0x2000, 1024)
        with pytest.raises(GuestError, match="already set up"):
            ring.setup(0x1000, 0x2000, 1024)
    finally:
        ring.close()


@pytest.mark.kvm
@pytest.mark.parametrize("kind, reason", [
    ("overrun", "bad console ring: producer index overrun: 1000"),
    ("outside", "bad hypercall: console ring data [0x7f0000000000, +0x1000) is outside guest RAM"),
])
def test_a_guest_breaking_its_console_ring_is_stopped_as_panicked(guest_images, vms, kind, reason):
    vm = vms.new("probe", f"badconsole={kind}")
    events = []
    vm.add_listener(lambda name, data: events.append((name, data)))
    vm.start()
    wait_for(lambda: vm.state == GUEST_PANICKED, what="the VM to stop")
    assert vm.stop_reason.startswith(reason), vm.stop_reason
    assert ("GUEST_PANICKED", {"action": "pause", "reason": vm.stop_reason}) in events
    vm.close()  # the VMM's threads all end; the test process (the daemon) carries on


@pytest.mark.kvm
def test_output_continues_across_save_and_restore(guest_images, vms, tmp_path):
    """A guest printing numbered lines is saved mid-stream and restored in another VM: the
    source's output and the restored VM's, end to end, hold every line once, in order.
    Bytes left in the ring at save time (here put there the way the guest writes, after the
    VMM drained it at the pause) come out of the restored VM, not the source."""
    vm = vms.new("probe", "mode=stream delay_us=300")
    vm.start()
    wait_for(lambda: len(stream_numbers(vm.read_console())) > 200, what="lines before the save")
    vm.pause()
    while not vm.read_console().endswith("\n"):  # stopped between two parts of a wrapped line
        vm.resume()
        vm.pause()
    state = vm.console.state
    prod = struct.unpack_from("<I", vm.memory.mmap, state.ctrl)[0]
    assert prod == state.cons  # drained at the pause: nothing held back on a stopped VM
    pending = b"in the ring at save time\n"
    for i, byte in enumerate(pending):
        vm.memory.mmap[state.data + (prod + i) % state.size] = byte
    struct.pack_into("<I", vm.memory.mmap, state.ctrl, (prod + len(pending)) & U32)
    path = tmp_path / "vm.state"
    vm.save_state(str(path))
    before = vm.read_console()
    vm.close()

    restored = vms.new("probe", "mode=stream delay_us=300")
    restored.load_state(str(path))
    restored.resume()
    wait_for(lambda: len(stream_numbers(restored.read_console())) > 200, what="lines after the restore")
    restored.pause()
    after = restored.read_console()
    assert after.startswith("in the ring at save time\n") and pending.decode() not in before
    numbers = stream_numbers(before + after)
    assert numbers == list(range(len(numbers)))


@pytest.mark.kvm
def test_output_continues_across_live_migration_and_the_dirty_log_sees_the_console(guest_images, vms, tmp_path):
    """Precopy while the guest prints: equal RAM at the end (the host-written consumer
    index included) and no line lost or printed twice between source and destination."""
    src = vms.new("probe", "mode=stream delay_us=100")
    dst = vms.new("probe", "mode=stream delay_us=100", start_paused=True)
    assert dst.set_state("prelaunch", "inmigrate")
    src.start()
    wait_for(lambda: len(stream_numbers(src.read_console())) > 100, what="lines before the migration")
    migrate_in_process(src, dst, tmp_path)
    assert blake3.blake3(src.memory.mmap).digest() == blake3.blake3(dst.memory.mmap).digest()
    assert dst.console.state.cons == struct.unpack_from("<I", dst.memory.mmap, dst.console.state.ctrl + 64)[0]
    dst.resume()
    wait_for(lambda: len(stream_numbers(dst.read_console())) > 100, what="lines after the migration")
    dst.pause()
    numbers = stream_numbers(src.read_console() + dst.read_console())
    assert numbers == list(range(len(numbers)))


@pytest.mark.kvm
def test_dirty_log_covers_the_console_pages(guest_images, vms):
    vm = vms.new("probe", "mode=stream delay_us=100")
    vm.start()
    wait_for(lambda: "stream 10\n" in vm.read_console(), what="the stream")
    vm.pause()
    before = bytes(vm.memory.mmap)
    vm.start_dirty_tracking()
    vm.fetch_dirty_bitmap()
    vm.resume()
    wait_for(lambda: len(stream_numbers(vm.read_console())) > 500, what="more lines")
    vm.pause()
    dirty = set(dirty_pages(vm.fetch_dirty_bitmap()))
    after = vm.memory.mmap
    changed = {p for p in range(vm.memory.pages)
               if after[p * 4096:(p + 1) * 4096] != before[p * 4096:(p + 1) * 4096]}
    assert vm.console.state.ctrl // 4096 in changed and changed <= dirty, sorted(changed - dirty)[:10]


def test_state_round_trip_with_a_ring():
    state = ConsoleState(bytes_written=99, ctrl=0x10000, data=0x10080, size=16384, cons=U32)
    assert ConsoleState.restore(state.save()) == state
    from appliance.vmm.errors import StateFileError
    with pytest.raises(StateFileError, match="power of two"):
        ConsoleState.restore(ConsoleState(ctrl=0x10000, data=0x10080, size=1000).save())

