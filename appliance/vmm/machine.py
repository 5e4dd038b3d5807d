"""The virtual machine: guest RAM, one CPL3 long-mode vCPU, devices, run states.

Threads: the caller's thread drives the public methods; one vCPU thread loops
on KVM_RUN and serves hypercalls (docs/guest-abi.md); with a NIC, a NIC thread
(devices/rings.py) moves frames between the guest's rings and the backend, and a
console thread (devices/console.py) drains the guest's console ring, both only while the
vCPU thread is out of its park; a throttle timer thread
exists while throttle() is above 0.  To stop the vCPU the VMM sets
kvm_run.immediate_exit, signals the eventfd a blocking poll() waits on, and
sends SIGUSR1 to the vCPU thread so KVM_RUN returns EINTR.  A pending port-I/O
exit is always completed (KVM_RUN re-entered with immediate_exit set) before
the thread parks, so state saved while paused is never mid-instruction.

Events (listener(name, data), called from any thread, QEMU names):
  RESUME {}                 resume()
  STOP {}                   pause(), or the VM stopping with internal-error
  SHUTDOWN {"guest": bool, "reason": "guest-shutdown" | "host-qmp-quit"}
  GUEST_PANICKED {"action": "pause", "reason": str}   triple fault, bad hypercall, bad NIC or console ring...

Counters: `exits` counts KVM_RUN returns to userspace (each ~40 us here), the figure
the ring ABI exists to keep low; ioeventfd doorbells are not exits.
"""

import errno
import logging
import os
import select
import signal
import struct
import threading
import time
import uuid as uuid_module
from dataclasses import dataclass

from . import abi, kvm
from .devices import BlockDevice, BlockState, Console, ConsoleRing, ConsoleState, Nic, NicRings, NicState, TapBackend, tap_mac
from .elf import load_elf
from .errors import GuestError, GuestImageError, KVMUnavailableError, StateFileError, VMError
from .memory import GuestMemory
from .statefile import read_state_file, write_state_file
from .vcpu import Vcpu, gdt_bytes, tss_bytes

_log = logging.getLogger(__name__)

PRELAUNCH = "prelaunch"
RUNNING = "running"
PAUSED = "paused"
SHUTDOWN = "shutdown"
GUEST_PANICKED = "guest-panicked"
INTERNAL_ERROR = "internal-error"
INMIGRATE = "inmigrate"
POSTMIGRATE = "postmigrate"  # paused after its state was migrated away
COLO = "colo"  # stopped for a COLO checkpoint (QEMU's RUN_STATE_COLO)
RUN_STATES = (PRELAUNCH, RUNNING, PAUSED, SHUTDOWN, GUEST_PANICKED, INTERNAL_ERROR, INMIGRATE, POSTMIGRATE, COLO)
_RESUMABLE = (PRELAUNCH, PAUSED, INMIGRATE, POSTMIGRATE, COLO)
_STOPPED_FOR_GOOD = (SHUTDOWN, GUEST_PANICKED, INTERNAL_ERROR)

_THROTTLE_TIMESLICE = 0.010  # seconds of guest run time between throttle sleeps
_MAX_POLL_WAIT = 60.0  # seconds; the guest re-polls if its deadline is further away
_CLOCK_SECTION = struct.Struct("<Q")  # vm.clock v1: guest monotonic ns at save


@dataclass
class VMConfig:
    image: str
    memory_mib: int = 64
    cmdline: str = ""
    mac: str = "52:54:00:12:34:56"
    tap: str | None = None
    bridge: str | None = None
    disk: str | None = None
    console_log: str | None = None
    start_paused: bool = False


class GuestClock:
    """Guest monotonic time: host CLOCK_MONOTONIC while running, frozen while stopped.

    Freezing while stopped (like QEMU's virtual clock) makes the time carried in
    saved state continue exactly where it was after a restore or migration.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._guest_ns = 0
        self._host_ns = None  # host time when the clock last started; None = frozen

    def now(self) -> int:
        with self._lock:
            if self._host_ns is None:
                return self._guest_ns
            return self._guest_ns + time.monotonic_ns() - self._host_ns

    def run(self):
        with self._lock:
            if self._host_ns is None:
                self._host_ns = time.monotonic_ns()

    def freeze(self):
        with self._lock:
            if self._host_ns is not None:
                self._guest_ns += time.monotonic_ns() - self._host_ns
                self._host_ns = None

    def set(self, guest_ns: int):
        with self._lock:
            self._guest_ns, self._host_ns = guest_ns, None


def _ignore_kick(_signum, _frame):
    """SIGUSR1 only exists to make the vCPU thread's KVM_RUN return EINTR."""


def _install_kick_handler():
    if signal.getsignal(signal.SIGUSR1) is _ignore_kick:
        return
    if threading.current_thread() is not threading.main_thread():
        raise VMError("the first VirtualMachine must be created in the main thread "
                      "(it installs the SIGUSR1 handler that interrupts KVM_RUN)")
    signal.signal(signal.SIGUSR1, _ignore_kick)
    signal.siginterrupt(signal.SIGUSR1, True)


def _open_kvm() -> int:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise KVMUnavailableError(f"cannot open /dev/kvm: {exc}") from exc
    version = kvm.ioctl(fd, kvm.KVM_GET_API_VERSION)
    if version != kvm.KVM_API_VERSION:
        os.close(fd)
        raise KVMUnavailableError(f"KVM API version {version}, expected {kvm.KVM_API_VERSION}")
    if kvm.ioctl(fd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_IMMEDIATE_EXIT) <= 0:
        os.close(fd)
        raise KVMUnavailableError("KVM lacks KVM_CAP_IMMEDIATE_EXIT")
    return fd


class VirtualMachine:
    """A unikernel VM.  Construct, start(), and close() when done (or use `with`)."""

    def __init__(self, config: VMConfig):
        self.config = config
        self.uuid = str(uuid_module.uuid4())
        self.exit_status = None  # the guest's halt status, once it halted
        self.stop_reason = None  # why the VM stopped on its own, in words
        ram_size = config.memory_mib << 20
        if ram_size % abi.HUGE_PAGE_SIZE or not 4 << 20 <= ram_size <= abi.MAX_RAM:
            raise VMError(f"memory_mib={config.memory_mib}: must be a multiple of 2 "
                          f"between 4 and {abi.MAX_RAM >> 20}")
        try:
            with open(config.image, "rb") as f:
                image = f.read()
        except OSError as exc:
            raise GuestImageError(f"cannot read guest image {config.image}: {exc}") from exc
        _install_kick_handler()

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._state = PRELAUNCH
        self._listeners = []
        self._run_requested = False
        self._parked = False
        self._checkpointing = False  # a COLO checkpoint holds the vCPU (pause_for_checkpoint)...
        self._checkpoint_lock = threading.Lock()  # ...and this, which user pause/resume wait for
        self._quit = False
        self._closed = False
        self._throttle_pct = 0
        self._throttle_pending = False
        self._throttle_thread = None
        self._clock = GuestClock()
        self.exits = 0  # KVM_RUN returns to userspace
        self.rings = None
        self._tsc_khz = 0
        self._closers = []
        try:
            self._kvm_fd = _open_kvm()
            self._closers.append(lambda: os.close(self._kvm_fd))
            self._vm_fd = kvm.ioctl(self._kvm_fd, kvm.KVM_CREATE_VM, 0)
            self._closers.append(lambda: os.close(self._vm_fd))
            if kvm.ioctl(self._kvm_fd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_SET_TSS_ADDR) > 0:
                kvm.ioctl(self._vm_fd, kvm.KVM_SET_TSS_ADDR, 0xFFFBD000)  # Intel VMX needs it
            self.memory = GuestMemory(self._vm_fd, ram_size, f"guest-ram-{self.uuid}")
            self._closers.append(self.memory.close)
            self.vcpu = Vcpu(self._kvm_fd, self._vm_fd)
            self._closers.append(self.vcpu.close)
            self.console = Console(config.console_log)
            self._closers.append(self.console.close)
            self.nic = Nic(config.mac, TapBackend(config.tap, config.bridge, tap_mac(config.mac))) if config.tap else None
            if self.nic:
                self._closers.append(self.nic.close)
            self.disk = BlockDevice(config.disk) if config.disk else None
            if self.disk:
                self._closers.append(self.disk.close)
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._closers.append(lambda: os.close(self._wake_fd))
            self.console_ring = ConsoleRing(self.console, self.memory, self._device_fault)
            self._closers.append(self.console_ring.close)
            kvm.ioctl(self._vm_fd, kvm.KVM_IOEVENTFD, kvm.kvm_ioeventfd(
                addr=abi.HC_CONSOLE_DOORBELL, len=4, fd=self.console_ring.doorbell_fd,
                flags=kvm.KVM_IOEVENTFD_FLAG_PIO))
            if self.nic:
                self.rings = NicRings(self.nic, self.memory, self._device_fault)
                self._closers.append(self.rings.close)
                kvm.ioctl(self._vm_fd, kvm.KVM_IOEVENTFD, kvm.kvm_ioeventfd(
                    addr=abi.HC_NET_DOORBELL, len=4, fd=self.rings.doorbell_fd, flags=kvm.KVM_IOEVENTFD_FLAG_PIO))
            self._boot(image)
        except BaseException:
            self._release()
            raise
        self._hypercalls = {
            abi.HC_CONSOLE_WRITE: self._hc_console_write, abi.HC_TIME: self._hc_time,
            abi.HC_POLL: self._hc_poll, abi.HC_NET_WRITE_V1: self._hc_net_v1,
            abi.HC_NET_READ_V1: self._hc_net_v1, abi.HC_BLOCK_READ: self._hc_block_read,
            abi.HC_BLOCK_WRITE: self._hc_block_write, abi.HC_HALT: self._hc_halt,
            abi.HC_NET_SETUP: self._hc_net_setup, abi.HC_NET_WAIT_TX: self._hc_net_wait_tx,
            abi.HC_CONSOLE_SETUP: self._hc_console_setup,
        }
        self.hypercall_exits = dict.fromkeys(self._hypercalls, 0)   # port -> exits to this VMM (metrics)
        self._thread = threading.Thread(target=self._vcpu_main, name=f"vcpu-{self.uuid[:8]}", daemon=True)
        self._thread.start()
        with self._cond:  # parked, so load_state() may follow at once
            while not self._parked:
                self._cond.wait()

    # --- boot -----------------------------------------------------------------

    def _boot(self, image: bytes):
        ram, size = self.memory.mmap, self.memory.size
        entry, image_end = load_elf(image, ram, size)
        heap_start = -(-image_end // abi.PAGE_SIZE) * abi.PAGE_SIZE
        if heap_start >= size:
            raise GuestImageError("the image leaves no room for a heap")
        gdt, tss = gdt_bytes(), tss_bytes()
        ram[abi.GDT_GPA:abi.GDT_GPA + len(gdt)] = gdt
        ram[abi.TSS_GPA:abi.TSS_GPA + len(tss)] = tss
        self._write_page_tables(size)
        cmdline = self.config.cmdline.encode()
        if len(cmdline) >= abi.CMDLINE_MAX:
            raise VMError(f"command line longer than {abi.CMDLINE_MAX - 1} bytes")
        try:
            tsc_khz = self._tsc_khz = kvm.ioctl(self.vcpu.fd, kvm.KVM_GET_TSC_KHZ)
        except OSError:
            tsc_khz = 0
        mac = self.nic.state.mac if self.nic else bytes(6)
        abi.BOOT_INFO.pack_into(
            ram, abi.BOOT_INFO_GPA, abi.BOOT_MAGIC, abi.ABI_VERSION, size, heap_start, size,
            abi.STACK_TOP, tsc_khz, self.disk.state.sectors if self.disk else 0, mac,
            1 if self.nic else 0, 0, cmdline)
        self.vcpu.boot(entry, abi.STACK_TOP, abi.BOOT_INFO_GPA)

    @staticmethod
    def _page_table_entries(size: int):
        """(gpa, u64) for the identity map of RAM: 2 MiB pages, 4 KiB in the first
        2 MiB so page 0 stays unmapped; user+writable at every level."""
        present_rw_user, huge = 0x7, 0x80
        yield abi.PML4_GPA, abi.PDPT_GPA | present_rw_user
        for i in range(4):
            yield abi.PDPT_GPA + 8 * i, (abi.PD_GPA + i * abi.PAGE_SIZE) | present_rw_user
        yield abi.PD_GPA, abi.PT0_GPA | present_rw_user
        for page in range(1, 512):
            yield abi.PT0_GPA + 8 * page, page * abi.PAGE_SIZE | present_rw_user
        for big in range(1, size // abi.HUGE_PAGE_SIZE):
            yield abi.PD_GPA + 8 * big, big * abi.HUGE_PAGE_SIZE | present_rw_user | huge

    def _write_page_tables(self, size: int):
        ram = self.memory.mmap
        for gpa, entry in self._page_table_entries(size):
            struct.pack_into("<Q", ram, gpa, entry)

    @property
    def vcpu_thread_id(self) -> int:
        """The vCPU thread's kernel id: its CPU time is the guest's (and its hypercalls')."""
        return self._thread.native_id

    # --- run states and events ------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    def set_state(self, old: str, new: str) -> bool:
        """Compare-and-set of the run state label (e.g. prelaunch -> inmigrate).

        Running is entered and left only through resume()/pause(), which also
        move the vCPU; this refuses transitions into or out of it.
        """
        if new not in RUN_STATES:
            raise ValueError(f"unknown run state {new!r}")
        if RUNNING in (old, new):
            raise ValueError("use resume()/pause() to enter or leave 'running'")
        with self._lock:
            if self._state != old:
                return False
            self._state = new
            return True

    def add_listener(self, listener):
        """listener(event_name, data) is called for every event, from any thread."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener):
        with self._lock:
            self._listeners.remove(listener)

    def _emit(self, name: str, data: dict):
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(name, data)
            except Exception:
                _log.exception("VM event listener failed on %s", name)

    def start(self):
        """Run the guest, unless config.start_paused keeps it in prelaunch."""
        if self._state == PRELAUNCH and not self.config.start_paused:
            self.resume()

    def resume(self, announce: bool = True):
        """Run the vCPU; ``announce=False`` skips RESUME.  Waits for a COLO checkpoint's pause
        to end first (a checkpoint captures a stopped guest)."""
        with self._checkpoint_lock:
            self._resume(announce)

    def _resume(self, announce: bool):
        with self._cond:
            if self._state not in _RESUMABLE:
                raise VMError(f"cannot resume a VM in state {self._state}")
            self._state = RUNNING
        # Emitted before the vCPU runs, so listeners never see the guest's own
        # SHUTDOWN or GUEST_PANICKED ahead of RESUME.
        if announce:
            self._emit("RESUME", {})
        with self._cond:
            if self._state == RUNNING:  # unless pause() or shutdown() got in between
                self._clock.run()
                self._run_requested = True
                self._cond.notify_all()

    def pause(self):
        """Stop the vCPU; returns once it is parked outside KVM_RUN with no I/O pending.  During
        a COLO checkpoint it waits for the pause to end, so the checkpoint's end cannot undo it."""
        with self._checkpoint_lock:
            stopped = self._park(PAUSED)
        if stopped:
            self._emit("STOP", {})

    def pause_for_checkpoint(self) -> bool:
        """Stop the vCPU in state ``colo`` without announcing STOP, as QEMU's
        vm_stop_force_state(RUN_STATE_COLO): a checkpoint is not a stop the user asked for.
        Until end_checkpoint() a `stop` or `cont` waits.  False if the guest was not running."""
        self._checkpoint_lock.acquire()
        with self._cond:
            self._checkpointing = True
        return self._park(COLO)

    def end_checkpoint(self, run: bool) -> bool:
        """The checkpoint's capture or load is over (idempotent): with ``run``, a guest stopped
        by it runs again without RESUME.  True if it runs."""
        with self._cond:
            held, self._checkpointing = self._checkpointing, False
            running = run and self._state == COLO
            if running:
                self._state = RUNNING
                self._clock.run()
                self._run_requested = True
                self._cond.notify_all()
        if held:
            self._checkpoint_lock.release()
        return running

    def _park(self, state: str) -> bool:
        with self._cond:
            if self._state == COLO and state == PAUSED:
                self._state = PAUSED       # held at a checkpoint: already parked, now a real stop
                return True
            if self._state != RUNNING:
                return False
            self._state = state
            self._park_vcpu()
        return True

    def shutdown(self):
        """Power the guest off from the host side (idempotent)."""
        with self._cond:
            if self._state in _STOPPED_FOR_GOOD or self._quit:
                return
            self._state = SHUTDOWN
            self.stop_reason = "host requested shutdown"
            self._park_vcpu()
        self._emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})

    def _park_vcpu(self):
        """With the lock held: make the vCPU thread leave KVM_RUN and wait until it has."""
        self._run_requested = False
        self._kick(wake_poll=True)
        if threading.get_ident() != self._thread.ident:
            while not self._parked:
                self._cond.wait()
        self._clock.freeze()

    def _kick(self, wake_poll: bool):
        """With the lock held: get the vCPU thread out of KVM_RUN (and poll) soon."""
        self.vcpu.run.immediate_exit = 1
        if wake_poll:
            os.eventfd_write(self._wake_fd, 1)
        if not self._parked and threading.get_ident() != self._thread.ident:
            kvm.pthread_kill(self._thread.ident, signal.SIGUSR1)

    def throttle(self, pct: int):
        """Make the vCPU sleep `pct` percent of the time (0 turns throttling off)."""
        if not 0 <= pct <= 99:
            raise ValueError("throttle percentage must be within 0..99")
        with self._lock:
            self._throttle_pct = pct
            if pct and self._throttle_thread is None and not self._quit:
                self._throttle_thread = threading.Thread(
                    target=self._throttle_timer, name=f"throttle-{self.uuid[:8]}", daemon=True)
                self._throttle_thread.start()

    def _throttle_timer(self):
        """Every timeslice, ask the vCPU thread to take its throttle sleep; exits at 0%."""
        while True:
            time.sleep(_THROTTLE_TIMESLICE)
            with self._lock:
                if self._quit or not self._throttle_pct:
                    self._throttle_thread = None
                    return
                if self._run_requested and not self._parked:
                    self._throttle_pending = True
                    self._kick(wake_poll=False)

    # --- the vCPU thread ---------------------------------------------------------

    def _vcpu_main(self):
        while True:
            if self.rings:
                self.rings.stop()  # no host writes into guest RAM while the vCPU is parked
            self.console_ring.stop()  # and no console output left in the ring
            with self._cond:
                self._parked = True
                self._cond.notify_all()
                while not (self._quit or self._run_requested):
                    self._cond.wait()
                if self._quit:
                    return
                self._parked = False
                self.vcpu.run.immediate_exit = 0
            try:
                os.eventfd_read(self._wake_fd)  # drop wake-ups meant for the last run
            except BlockingIOError:
                pass
            try:
                self._write_clock_page()
                self.console_ring.start()
                if self.rings:
                    self.rings.start()
                self._run_vcpu()
            except Exception as exc:  # a VMM bug must not leave a wedged thread
                _log.exception("vCPU thread failed")
                self._stop(INTERNAL_ERROR, f"VMM error in the vCPU thread: {exc!r}")

    def _run_vcpu(self):
        """KVM_RUN until the VM is asked to stop or stops on its own."""
        run = self.vcpu.run
        while True:
            try:
                kvm.ioctl(self.vcpu.fd, kvm.KVM_RUN)
            except OSError as exc:
                self.exits += 1
                if exc.errno not in (errno.EINTR, errno.EAGAIN):
                    self._stop(INTERNAL_ERROR, f"KVM_RUN failed: {exc}")
                    return
                if not self._continue_after_kick():
                    return
                continue
            self.exits += 1
            reason = run.exit_reason
            if reason == kvm.KVM_EXIT_IO:
                try:
                    self._hypercall()
                except GuestError as exc:
                    self._stop(GUEST_PANICKED, f"bad hypercall: {exc}")
                # Loop: re-entering completes the port I/O; after a stop, immediate_exit
                # is set, so KVM_RUN returns EINTR right after and the thread parks.
            elif reason == kvm.KVM_EXIT_INTR:
                continue
            elif reason == kvm.KVM_EXIT_SHUTDOWN:
                self._stop(GUEST_PANICKED, "triple fault: the guest took an exception it cannot handle "
                           f"(rip {self.vcpu.registers().rip:#x})")
                return
            elif reason == kvm.KVM_EXIT_HLT:
                self._stop(GUEST_PANICKED, "the guest executed hlt")
                return
            elif reason == kvm.KVM_EXIT_MMIO:
                self._stop(GUEST_PANICKED, f"access to unbacked guest-physical address "
                           f"{run.exit.mmio.phys_addr:#x}")
                return
            elif reason == kvm.KVM_EXIT_INTERNAL_ERROR:
                internal = run.exit.internal
                what = "instruction emulation failed" if internal.suberror == 1 else "internal error"
                data = ", ".join(f"{d:#x}" for d in internal.data[:min(internal.ndata, 16)])
                self._stop(INTERNAL_ERROR, f"KVM {what} (suberror {internal.suberror}, data [{data}]) "
                           f"at rip {self.vcpu.registers().rip:#x}")
                return
            elif reason == kvm.KVM_EXIT_FAIL_ENTRY:
                self._stop(INTERNAL_ERROR, "VM entry failed, hardware reason "
                           f"{run.exit.fail_entry.hardware_entry_failure_reason:#x}")
                return
            else:
                self._stop(INTERNAL_ERROR, f"unexpected KVM exit reason {reason}")
                return

    def _continue_after_kick(self) -> bool:
        """After KVM_RUN returned EINTR: False if the thread should park."""
        with self._lock:
            if self._quit or not self._run_requested:
                return False
            throttle, self._throttle_pending = self._throttle_pending, False
            pct = self._throttle_pct
            self.vcpu.run.immediate_exit = 0
        if throttle and pct:
            select.select([self._wake_fd], [], [], _THROTTLE_TIMESLICE * pct / (100 - pct))
        return True

    def _write_clock_page(self):
        """A new generation of the clock page (docs/guest-abi.md) for the run about to start:
        the guest clock stood still while the vCPU was parked and the TSC did not, so the
        guest takes a new base (one time hypercall) before it reads the TSC again.  The
        generation goes on from what RAM holds, so it changes after a restore as well."""
        if not self._tsc_khz:
            return
        generation = abi.CLOCK_PAGE.unpack_from(self.memory.mmap, abi.CLOCK_GPA)[0]
        page = abi.CLOCK_PAGE.pack((generation + 1) & 0xFFFFFFFFFFFFFFFF or 1, (1_000_000 << 32) // self._tsc_khz)
        self.memory.write(abi.CLOCK_GPA, page, "clock page")

    def _device_fault(self, reason: str):
        """From a device thread: the guest broke its device's contract; stop it as
        guest-panicked (the vCPU thread parks on its own)."""
        with self._cond:
            if self._state != RUNNING:
                return
            self._state = GUEST_PANICKED
            self.stop_reason = reason
            self._run_requested = False
            self._kick(wake_poll=True)
        self._clock.freeze()
        _log.info("VM %s stopped: %s (%s)", self.uuid, GUEST_PANICKED, reason)
        self._emit("GUEST_PANICKED", {"action": "pause", "reason": reason})
        self._emit("STOP", {})

    def _stop(self, state: str, reason: str, event=None):
        """From the vCPU thread: the VM stops on its own in `state`.  The console is drained
        first, so whoever sees the new state can read everything the guest printed."""
        self.console_ring.stop()
        with self._cond:
            self._state = state
            self.stop_reason = reason
            self._run_requested = False
            self.vcpu.run.immediate_exit = 1
        self._clock.freeze()
        if event:
            self._emit(*event)          # its log line says what happened
            return
        _log.error("VM %s stopped: %s (%s)", self.uuid, state, reason)    # STOP carries no reason: say it here
        if state == GUEST_PANICKED:
            self._emit("GUEST_PANICKED", {"action": "pause", "reason": reason})
            self._emit("STOP", {})
        else:
            self._emit("STOP", {})

    # --- hypercalls (docs/guest-abi.md) -------------------------------------------

    def _hypercall(self):
        io = self.vcpu.run.exit.io
        if io.direction != kvm.KVM_EXIT_IO_OUT or io.size != 4 or io.count != 1:
            kind = "out" if io.direction == kvm.KVM_EXIT_IO_OUT else "in"
            raise GuestError(f"port {io.port:#x}: {kind} of {io.size} byte(s) x{io.count} is not a hypercall")
        handler = self._hypercalls.get(io.port)
        if handler is None:
            raise GuestError(f"unknown hypercall port {io.port:#x}")
        self.hypercall_exits[io.port] += 1
        (gpa,) = struct.unpack("<I", self.vcpu.io_data(io.data_offset, 4))
        handler(gpa)

    def _hc_console_write(self, gpa):
        data, length = self.memory.unpack(abi.HC_CONSOLE_WRITE_ARGS, gpa, "console arguments")
        self.console.write(self.memory.read(data, length, "console text"))

    def _hc_console_setup(self, gpa):
        ctrl, data, size, _ = self.memory.unpack(abi.HC_CONSOLE_SETUP_ARGS, gpa, "console setup arguments")
        self.console_ring.setup(ctrl, data, size)
        self.memory.pack(abi.HC_CONSOLE_SETUP_ARGS, gpa, ctrl, data, size, 0)

    def _hc_time(self, gpa):
        self.memory.pack(abi.HC_TIME_ARGS, gpa, self._clock.now(), time.time_ns())

    def _hc_poll(self, gpa):
        deadline, _ = self.memory.unpack(abi.HC_POLL_ARGS, gpa, "poll arguments")
        ready = False
        if self._run_requested:
            wait = min(max(deadline - self._clock.now(), 0) / 1e9, _MAX_POLL_WAIT)
            if self.rings and self.nic.state.rings:
                ready = self._wait_for(self.rings.rx_ready_fd, self.rings.rx_pending, wait)
            else:
                select.select([self._wake_fd], [], [], wait)
        self.memory.pack(abi.HC_POLL_ARGS, gpa, deadline, int(ready))

    def _wait_for(self, event_fd: int, condition, timeout: float) -> bool:
        """Block until condition() holds (re-checked whenever event_fd is signalled), the
        VMM wants the vCPU (wake_fd) or `timeout` passes; returns condition()."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.eventfd_read(event_fd)  # what it announced is seen by the check below
            except BlockingIOError:
                pass
            if condition():
                return True
            left = deadline - time.monotonic()
            if left <= 0 or not self._run_requested:
                return False
            readable, _, _ = select.select([self._wake_fd, event_fd], [], [], left)
            if self._wake_fd in readable:
                return condition()

    def _hc_net_v1(self, _gpa):
        raise GuestError("net read/write hypercalls are guest ABI v1; this VMM speaks guest ABI v2 "
                         "(NIC rings, docs/guest-abi.md): rebuild the guest with appliance/guest/lib")

    def _hc_net_setup(self, gpa):
        ctrl, tx_ring, tx_size, rx_ring, rx_size, _ = self.memory.unpack(
            abi.HC_NET_SETUP_ARGS, gpa, "net setup arguments")
        ok = self.rings is not None
        if ok:
            self.rings.setup(ctrl, tx_ring, tx_size, rx_ring, rx_size)
            os.eventfd_write(self.rings.doorbell_fd, 1)  # the NIC thread starts serving them
        self.memory.pack(abi.HC_NET_SETUP_ARGS, gpa, ctrl, tx_ring, tx_size, rx_ring, rx_size, 0 if ok else -1)

    def _hc_net_wait_tx(self, _gpa):
        """The guest's TX ring is full: wait until the NIC thread frees a slot."""
        if self.rings and self.nic.state.rings:
            self._wait_for(self.rings.tx_done_fd, lambda: not self.rings.tx_full(), _MAX_POLL_WAIT)

    def _hc_block_read(self, gpa):
        sector, data, count, _ = self.memory.unpack(abi.HC_BLOCK_ARGS, gpa, "block read arguments")
        self.memory.check(data, count * abi.SECTOR_SIZE, "block buffer")
        content = self.disk.read(sector, count) if self.disk else None
        if content is not None:
            self.memory.write(data, content)
        self.memory.pack(abi.HC_BLOCK_ARGS, gpa, sector, data, count, 0 if content is not None else -1)

    def _hc_block_write(self, gpa):
        sector, data, count, _ = self.memory.unpack(abi.HC_BLOCK_ARGS, gpa, "block write arguments")
        content = self.memory.read(data, count * abi.SECTOR_SIZE, "block buffer")
        ok = self.disk is not None and self.disk.write(sector, content)
        self.memory.pack(abi.HC_BLOCK_ARGS, gpa, sector, data, count, 0 if ok else -1)

    def _hc_halt(self, gpa):
        (status,) = self.memory.unpack(abi.HC_HALT_ARGS, gpa, "halt arguments")
        self.exit_status = struct.unpack("<i", struct.pack("<I", status & 0xFFFFFFFF))[0]
        self._stop(SHUTDOWN, f"guest halted with status {self.exit_status}",
                   event=("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}))

    # --- memory and dirty tracking ------------------------------------------------

    def ram_regions(self):
        """[(gpa, size, memfd, mmap)] of guest RAM, for zero-copy access."""
        return [(0, self.memory.size, self.memory.fd, self.memory.mmap)]

    def start_dirty_tracking(self):
        self.memory.start_dirty_tracking()

    def stop_dirty_tracking(self):
        self.memory.stop_dirty_tracking()

    def fetch_dirty_bitmap(self) -> bytes:
        """Pages written by the guest or the VMM since the last fetch (bit i = page i)."""
        return self.memory.fetch_dirty_bitmap()

    # --- state ---------------------------------------------------------------------

    def _devices(self):
        return [device for device in (self.console, self.nic, self.disk) if device]

    def save_devices(self):
        """The complete non-RAM state as [(name, version, payload)]; the VM must not be running."""
        with self._lock:
            if self._state == RUNNING or not self._parked:
                raise VMError("pause the VM before saving its state")
            sections = self.vcpu.save()
            sections.append(("vm.clock", 1, _CLOCK_SECTION.pack(self._clock.now())))
            sections += [(d.SECTION, d.VERSION, d.state.save()) for d in self._devices()]
        return sections

    def _expected_sections(self):
        return ({name: 1 for name in self.vcpu.section_names()} | {"vm.clock": 1}
                | {d.SECTION: d.VERSION for d in self._devices()})

    def check_sections(self, sections):
        expected = self._expected_sections()
        names = [name for name, _, _ in sections]
        if len(set(names)) != len(names):
            raise StateFileError("duplicate state sections")
        missing, unknown = set(expected) - set(names), set(names) - set(expected)
        if missing or unknown:
            raise StateFileError(f"state sections do not match this VM: missing {sorted(missing)}, "
                                 f"unexpected {sorted(unknown)}")
        for name, version, _ in sections:
            if version != expected[name]:
                raise StateFileError(f"section {name} version {version}, this VMM reads {expected[name]}")

    def load_devices(self, sections):
        """Restore what save_devices() produced; the VM must not be running."""
        with self._lock:
            if self._state == RUNNING or not self._parked:
                raise VMError("cannot load state into a running VM")
            self.check_sections(sections)
            payloads = {name: payload for name, _, payload in sections}
            device_states = {
                Console.SECTION: ConsoleState, Nic.SECTION: NicState, BlockDevice.SECTION: BlockState}
            restored = [(d, device_states[d.SECTION].restore(payloads[d.SECTION])) for d in self._devices()]
            if len(payloads["vm.clock"]) != _CLOCK_SECTION.size:
                raise StateFileError("section vm.clock has the wrong size")
            self.vcpu.load(payloads)
            self._clock.set(_CLOCK_SECTION.unpack(payloads["vm.clock"])[0])
            for device, state in restored:
                device.restore_state(state)

    def save_state(self, path):
        """Write RAM and all sections to `path` (format: appliance.vmm.statefile)."""
        sections = self.save_devices()
        write_state_file(path, self.memory.mmap, sections)

    def load_state(self, path):
        """Restore a state file into this (not yet run) VM; it is left paused."""
        with self._lock:
            if self._state not in _RESUMABLE or not self._parked:
                raise VMError(f"cannot load state into a VM in state {self._state}")
            sections = read_state_file(path, self.memory.mmap, self.check_sections)
            self.load_devices(sections)
            self._state = PAUSED

    # --- guest-visible bits for callers -----------------------------------------------

    def read_console(self) -> str:
        return self.console.text()

    def guest_monotonic_ns(self) -> int:
        return self._clock.now()

    # --- teardown ---------------------------------------------------------------------

    def close(self):
        """Shut down (if needed), stop all threads and release every fd. Idempotent."""
        if self._closed:
            return
        if threading.get_ident() == self._thread.ident:
            raise VMError("close() cannot run on the vCPU thread (from an event listener)")
        self.shutdown()
        with self._cond:
            self._quit = True
            self._cond.notify_all()
            throttle_thread = self._throttle_thread
        self._thread.join()
        if throttle_thread:
            throttle_thread.join()
        self._closed = True
        self._release()

    def _release(self):
        for close in reversed(self._closers):
            try:
                close()
            except Exception:
                _log.exception("error while releasing VM resources")
        self._closers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

