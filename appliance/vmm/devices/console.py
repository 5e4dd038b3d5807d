"""Console: guest output, from a ring in guest RAM or a hypercall, appended to a log
file and kept in memory for read_console().

    guest (vCPU)                 guest RAM                          console thread
    ------------                 ---------                          --------------
    plat_console_write:          ctrl (128 bytes, 64-aligned)       ConsoleRing.drain():
      copy bytes at prod % size    +0  u32 prod   guest               prod - cons bytes from data
      prod += n                    +64 u32 cons   host                -> Console.write (log, tail)
      outl 0x50c if a line ended   data: size bytes (power of two)    cons = prod, page marked dirty
      or the ring is half full,  ---- KVM_IOEVENTFD, no exit ---->  wakes it
      or before it blocks in poll

The thread sleeps until a doorbell: no periodic wake-up, which would cost the daemon's other
Python threads (the migration's compression, say) a GIL hand-over each time.  The thread (a
DeviceThread) drains only while the vCPU runs; stop() (from the vCPU thread, before it
parks) drains whatever is left, so output before a halt, a fault or a pause is never lost and a
stopped VM sees no host write into its RAM.  Bytes still in the ring when the state is saved
(RAM and the host's `cons` in dev.console) come out after the restore.  A ring the guest got
wrong (index overrun) makes on_fault(reason) stop the VM as guest-panicked.
"""

import logging
import os
import select
import struct
import threading
from dataclasses import dataclass

from .. import abi
from ..errors import GuestError, StateFileError
from .thread import DeviceThread, clear_eventfd

_log = logging.getLogger(__name__)

_KEEP_BYTES = 4 << 20  # in-memory tail for read_console()


@dataclass
class ConsoleState:
    """dev.console v2, little-endian:

        +0  u64 bytes_written   console output so far
        +8  u64 ctrl            the ring's control block (0: no ring, the hypercall only)
        +16 u64 data            the ring's bytes
        +24 u64 size            their count, a power of two
        +32 u32 cons            the host's consumer index (also in guest RAM at ctrl+64)
    """
    bytes_written: int = 0
    ctrl: int = 0
    data: int = 0
    size: int = 0
    cons: int = 0

    _LAYOUT = struct.Struct("<QQQQI")

    def save(self) -> bytes:
        return self._LAYOUT.pack(self.bytes_written, self.ctrl, self.data, self.size, self.cons)

    @classmethod
    def restore(cls, data: bytes) -> "ConsoleState":
        if len(data) != cls._LAYOUT.size:
            raise StateFileError(f"console state: {len(data)} bytes, expected {cls._LAYOUT.size}")
        state = cls(*cls._LAYOUT.unpack(data))
        if state.ctrl and not (abi.CONSOLE_RING_MIN <= state.size <= abi.CONSOLE_RING_MAX
                               and not state.size & (state.size - 1)):
            raise StateFileError(f"console state: ring size {state.size} is not a power of two "
                                 f"between {abi.CONSOLE_RING_MIN} and {abi.CONSOLE_RING_MAX}")
        return state


def _open_0640(path: str, flags: int) -> int:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        os.fchmod(fd, 0o640)      # an older, wider log file too
    except PermissionError:       # not ours (an operator's choice): leave its mode alone
        pass
    return fd


class Console:
    SECTION, VERSION = "dev.console", 2

    def __init__(self, log_path=None):
        # 0640, whatever the umask: the guest's output may hold secrets; the service's group may read it.
        self._log = open(log_path, "ab", buffering=0, opener=_open_0640) if log_path else None
        self._tail = bytearray()
        self._lock = threading.Lock()
        self.state = ConsoleState()

    def write(self, data: bytes):
        with self._lock:
            if self._log:
                self._log.write(data)
            self._tail += data
            if len(self._tail) > _KEEP_BYTES:
                del self._tail[:len(self._tail) - _KEEP_BYTES]
            self.state.bytes_written += len(data)

    def text(self) -> str:
        """Output since this process opened the console (the last 4 MiB of it)."""
        with self._lock:
            return self._tail.decode("utf-8", "replace")

    def restore_state(self, state: ConsoleState):
        self.state = state

    def close(self):
        if self._log:
            self._log.close()


class ConsoleRing:
    """The console thread and the ring's checks; the ring registers live in console.state."""

    def __init__(self, console: Console, memory, on_fault):
        self.console = console
        self.memory = memory
        self.doorbell_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # KVM_IOEVENTFD target
        self._drain_lock = threading.Lock()
        self._thread = DeviceThread("console-ring", "console", self._serve, on_fault)

    def setup(self, ctrl: int, data: int, size: int):
        """HC_CONSOLE_SETUP: check and record where the guest put its ring."""
        if not abi.CONSOLE_RING_MIN <= size <= abi.CONSOLE_RING_MAX or size & (size - 1):
            raise GuestError(f"console ring size {size} is not a power of two between "
                             f"{abi.CONSOLE_RING_MIN} and {abi.CONSOLE_RING_MAX}")
        if ctrl % 64:
            raise GuestError(f"console ring control block {ctrl:#x} is not 64-byte aligned")
        self.memory.check(ctrl, abi.CONSOLE_CTRL_SIZE, "console ring control block")
        self.memory.check(data, size, "console ring data")
        state = self.console.state
        if state.ctrl:
            raise GuestError("the console ring is already set up")
        with self._drain_lock:
            prod = int.from_bytes(self.memory.read(ctrl + abi.CONSOLE_PROD, 4), "little")
            self.memory.write(ctrl + abi.CONSOLE_CONS, prod.to_bytes(4, "little"), "console consumer index")
            state.ctrl, state.data, state.size, state.cons = ctrl, data, size, prod

    def drain(self) -> int:
        """Move the bytes the guest published to the console; returns how many.
        Raises ValueError when the guest's producer index is not within a ring of its own."""
        with self._drain_lock:
            state = self.console.state
            if not state.ctrl:
                return 0
            try:  # checked at setup; a restored state is checked here
                self.memory.check(state.ctrl, abi.CONSOLE_CTRL_SIZE, "console ring control block")
                self.memory.check(state.data, state.size, "console ring data")
            except GuestError as exc:
                raise ValueError(str(exc)) from None
            ram = self.memory.mmap
            prod = int.from_bytes(ram[state.ctrl + abi.CONSOLE_PROD:state.ctrl + abi.CONSOLE_PROD + 4], "little")
            pending = (prod - state.cons) & 0xFFFFFFFF
            if pending > state.size:
                raise ValueError(f"producer index overrun: {pending} bytes outstanding on a ring of {state.size}")
            if not pending:
                return 0
            start = state.cons % state.size
            first = min(pending, state.size - start)
            text = ram[state.data + start:state.data + start + first] + ram[state.data:state.data + pending - first]
            state.cons = prod
            self.memory.write(state.ctrl + abi.CONSOLE_CONS, prod.to_bytes(4, "little"), "console consumer index")
            self.console.write(text)
            return pending

    # --- from the vCPU thread ------------------------------------------------------------

    def start(self):
        """Let the console thread run (the vCPU is about to enter the guest)."""
        self._thread.start()

    def stop(self):
        """Park the console thread, then drain what the guest left in the ring."""
        self._thread.stop()
        try:
            self.drain()
        except ValueError as exc:  # the VM is stopping already: say why its output ends here
            _log.warning("console output lost: bad console ring: %s", exc)

    def close(self):
        self._thread.close()
        os.close(self.doorbell_fd)

    # --- the console thread --------------------------------------------------------------

    def _serve(self):
        while True:
            self.drain()
            select.select([self.doorbell_fd, self._thread.control_fd], [], [])
            clear_eventfd(self.doorbell_fd)
            if self._thread.stopping():
                return
