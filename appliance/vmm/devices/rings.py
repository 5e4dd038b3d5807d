"""The host side of the guest's NIC rings: a NIC thread that moves frames between the
rings in guest RAM and the NIC (its backend, hook and injected frames), off the vCPU thread.

    guest (vCPU)              guest RAM                         NIC thread
    ------------              ---------                         ----------
    plat_net_write: fill slot, tx_prod++  --> TX ring -->  backend.serve_rings: tap write() / readv()
      outl doorbell if tx_notify (ioeventfd: no exit)        (C, no GIL) while the bare tap or the COLO
                                                             datapath (native/colo_path.c) is attached;
    plat_net_read: rx_cons++, rx_avail++  <-- RX ring <--  else ring_tx_pop + Nic.write_frame and
      outl doorbell if rx_notify                             Nic.read_frame + ring_rx_push
    plat_poll: nothing in the RX ring: HC_POLL (one exit) <-- rx_ready_fd after a publish

The thread (a DeviceThread) runs only while the vCPU thread is out of its park
(start()/stop() from the vCPU thread): so a paused, saving or checkpointing VM has no host
writes into its RAM, and stop() first sends every frame the guest queued, leaving no TX
frame in flight.  RX frames the host published and the guest has not read stay in the
ring, in guest RAM, and travel with it.  Every host write into guest RAM is marked in the
VMM's dirty bitmap under the bitmap's lock (GuestMemory.vmm_dirty), after the write.

A ring the guest got wrong (out-of-RAM buffers, absurd lengths, index overruns) makes
on_fault(reason) stop the VM as guest-panicked; the host never trusts an index it reads.
"""

import os
import select

import native

from ..errors import GuestError
from .nic import Nic
from .thread import DeviceThread, clear_eventfd

RING_MAX_SLOTS = 4096
_BATCH = 64  # frames per direction per pass, so neither direction starves the other
_SAFETY_WAIT = 0.05  # seconds: an idle thread re-checks the rings this often regardless
_SERVE_IDLE_MS = 50  # the native loop returns (to publish counters) after this long idle...
_SERVE_FRAMES = 4096  # ...or after this many frames


class NicRings:
    """The NIC thread and the ring registers' checks; the registers live in nic.state."""

    def __init__(self, nic: Nic, memory, on_fault):
        self.nic = nic
        self.memory = memory
        self.doorbell_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # KVM_IOEVENTFD target
        self.rx_ready_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # frames published
        self.tx_done_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # TX slots freed
        self.passes = 0  # NIC thread passes that moved frames (for the benchmark)
        self._thread = DeviceThread("nic-rings", "NIC", self._main, on_fault)

    # --- from the vCPU thread ------------------------------------------------------------

    def setup(self, ctrl: int, tx_ring: int, tx_size: int, rx_ring: int, rx_size: int):
        """HC_NET_SETUP: check and record where the guest put its rings."""
        if self.nic.state.rings is not None:
            raise GuestError("NIC rings are already set up")
        for name, size in (("TX", tx_size), ("RX", rx_size)):
            if not 1 <= size <= RING_MAX_SLOTS or size & (size - 1):
                raise GuestError(f"{name} ring size {size} is not a power of two up to {RING_MAX_SLOTS}")
        if ctrl % 64 or tx_ring % 16 or rx_ring % 16:
            raise GuestError("NIC rings: control block must be 64-byte and rings 16-byte aligned")
        self.memory.check(ctrl, native.reference.RING_CTRL_SIZE, "NIC control block")
        self.memory.check(tx_ring, tx_size * native.reference.RING_DESC_SIZE, "TX ring")
        self.memory.check(rx_ring, rx_size * native.reference.RING_DESC_SIZE, "RX ring")
        tx_prod = int.from_bytes(self.memory.read(ctrl, 4), "little")
        if tx_prod:
            raise GuestError(f"NIC rings set up with {tx_prod} TX frames already queued")
        self.memory.write(ctrl + native.reference.RING_TX_CONS, bytes(8))  # tx_cons, tx_notify
        self.memory.write(ctrl + native.reference.RING_RX_USED, bytes(8))  # rx_used, rx_notify
        state = self.nic.state
        state.rings, state.tx_cons, state.rx_used = (ctrl, tx_ring, tx_size, rx_ring, rx_size), 0, 0

    def _ctrl_u32(self, field: int) -> int:
        at = self.nic.state.rings[0] + field
        return int.from_bytes(self.memory.mmap[at:at + 4], "little")

    def rx_pending(self) -> bool:
        """Frames the host published (rx_used, as in the control block: the NIC thread's
        own copy lags while it runs natively) that the guest has not taken (rx_cons)."""
        return self._ctrl_u32(native.reference.RING_RX_USED) != self._ctrl_u32(native.reference.RING_RX_CONS)

    def tx_full(self) -> bool:
        tx_size = self.nic.state.rings[2]
        in_flight = self._ctrl_u32(native.reference.RING_TX_PROD) - self._ctrl_u32(native.reference.RING_TX_CONS)
        return in_flight & 0xFFFFFFFF >= tx_size

    def start(self):
        """Let the NIC thread run (the vCPU is about to enter the guest)."""
        self._thread.start()

    def stop(self):
        """Send what the guest queued, then park the NIC thread; returns once it is parked."""
        self._thread.stop()

    def close(self):
        self._thread.close()
        for fd in (self.doorbell_fd, self.rx_ready_fd, self.tx_done_fd):
            os.close(fd)

    # --- the NIC thread ------------------------------------------------------------------

    def _main(self):
        """The NIC thread's serve(): returns once stopping(), every queued TX frame sent."""
        if self.nic.state.rings is not None:
            self._serve()
        else:
            self._idle()

    def _idle(self):
        """No rings yet: wait for the guest's HC_NET_SETUP (its doorbell follows) or stop()."""
        while not self._thread.stopping():
            select.select([self._thread.control_fd, self.doorbell_fd], [], [])
            clear_eventfd(self.doorbell_fd)
            if self.nic.state.rings is not None:
                return self._serve()

    def _serve(self):
        while True:
            if self._thread.stopping():
                while self._tx_pass(limit=1 << 16):
                    pass
                return
            self.nic.clear_event()
            if self._native_loop():
                continue
            moved = self._tx_pass(_BATCH) + self._rx_pass(_BATCH)
            if moved:
                self.passes += 1
                continue
            self._sleep()

    def _native_loop(self) -> bool:
        """While the backend moves frames itself (the bare tap, the COLO datapath) and nothing
        else looks at them: its native loop, which returns on stop(), on a NIC event (attach,
        inject, hook), when idle for a while, every few thousand frames to publish the
        counters, or when the backend has news for Python.  False if this path is closed."""
        state = self.nic.state
        ctrl, tx_ring, tx_size, rx_ring, rx_size = state.rings
        with self.nic.io_pass():
            backend = self.nic.native_backend()
            if backend is None:
                return False
            with self.memory.vmm_dirty_unlocked() as dirty:
                cons, used, sent, dropped, received, too_big, tx_bytes, rx_bytes, _why = backend.serve_rings(
                    self.memory.mmap, dirty, ctrl, tx_ring, tx_size, rx_ring, rx_size, state.tx_cons,
                    state.rx_used, self.doorbell_fd, self._thread.control_fd, self.nic.event_fd,
                    self.rx_ready_fd, self.tx_done_fd, _SERVE_IDLE_MS, _SERVE_FRAMES)
            if cons != state.tx_cons:
                self._learn_address(tx_ring, tx_size, cons)
            state.tx_cons, state.rx_used = cons, used
            self.nic.count_tx(sent, dropped, tx_bytes)
            self.nic.count_rx(received, too_big, rx_bytes)
            self.passes += 1
        return True

    def _sleep(self):
        """Ask the guest for doorbells, re-check, and wait for one (or the backend, or stop)."""
        state = self.nic.state
        ctrl, _, tx_size, _, rx_size = state.rings
        rx_free = self._rx_free(ctrl, rx_size)
        with self.memory.vmm_dirty() as dirty:
            tx_prod, rx_avail = native.ring_arm(self.memory.mmap, dirty, ctrl, 1, int(rx_free == 0))
        tx_pending = self._outstanding(tx_prod, state.tx_cons, tx_size, "TX producer")
        rx_free_now = self._outstanding(rx_avail, state.rx_used, rx_size, "RX available")
        if not tx_pending and (rx_free_now == 0) == (rx_free == 0):
            self.nic.wait([self.doorbell_fd, self._thread.control_fd], _SAFETY_WAIT, rx=rx_free_now > 0)
        clear_eventfd(self.doorbell_fd)
        with self.memory.vmm_dirty() as dirty:
            native.ring_arm(self.memory.mmap, dirty, ctrl, 0, 0)

    @staticmethod
    def _outstanding(ahead: int, behind: int, size: int, what: str) -> int:
        count = (ahead - behind) & 0xFFFFFFFF
        if count > size:
            raise ValueError(f"{what} index overrun: {count} outstanding on a ring of {size}")
        return count

    def _rx_free(self, ctrl: int, rx_size: int) -> int:
        off = ctrl + native.reference.RING_RX_AVAIL
        rx_avail = int.from_bytes(self.memory.mmap[off:off + 4], "little")
        return self._outstanding(rx_avail, self.nic.state.rx_used, rx_size, "RX available")

    def _tx_pass(self, limit: int) -> int:
        """Frames the guest queued, out through the NIC (hook, backend)."""
        state = self.nic.state
        ctrl, tx_ring, tx_size, _, _ = state.rings
        with self.nic.io_pass():
            with self.memory.vmm_dirty() as dirty:
                cons, frames = native.ring_tx_pop(self.memory.mmap, dirty, ctrl, tx_ring, tx_size, state.tx_cons, limit)
            for frame in frames:
                self.nic.write_frame(frame)
            state.tx_cons = cons
        if frames:
            os.eventfd_write(self.tx_done_fd, 1)
        return len(frames)

    def _learn_address(self, tx_ring: int, tx_size: int, cons: int):
        """The guest's IPv4 address from the last frame sent, as write_frame learns it."""
        ram = self.memory.mmap
        at = tx_ring + ((cons - 1) & (tx_size - 1)) * native.reference.RING_DESC_SIZE
        addr = int.from_bytes(ram[at:at + 8], "little")
        if addr + 32 <= self.memory.size:
            self.nic.learn_address(ram[addr:addr + 32])

    def _rx_pass(self, limit: int) -> int:
        """Frames for the guest (injected, then the backend's after the hook) into its posted buffers."""
        state = self.nic.state
        ctrl, _, _, rx_ring, rx_size = state.rings
        free = self._rx_free(ctrl, rx_size)
        if not free:
            return 0
        with self.nic.io_pass():
            frames = []
            while len(frames) < min(free, limit):
                frame = self.nic.read_frame()
                if frame is None:
                    break
                frames.append(frame)
            with self.memory.vmm_dirty() as dirty:
                used, taken, too_big = native.ring_rx_push(self.memory.mmap, dirty, ctrl, rx_ring, rx_size,
                                                           state.rx_used, frames)
            self.nic.count_rx(0, too_big)  # read_frame() counted the frames it gave
            state.rx_used = used
        if taken > too_big:
            os.eventfd_write(self.rx_ready_fd, 1)
        return taken
