"""Guest RAM: one memfd-backed KVM memory slot at guest-physical 0, plus dirty tracking.

The dirty bitmap handed out has KVM's layout: bit i (byte i // 8, bit i % 8)
stands for the 4 KiB page at guest-physical i * 4096.
"""

import contextlib
import ctypes
import mmap
import os
import threading

import native

from . import kvm
from .abi import PAGE_SIZE
from .errors import GuestError

_SLOT = 0


class GuestMemory:
    def __init__(self, vm_fd: int, size: int, name: str = "guest-ram"):
        self.size = size
        self.pages = size // PAGE_SIZE
        self._vm_fd = vm_fd
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # Holding this ctypes view keeps the mapping's address valid for KVM.
        self._anchor = ctypes.c_char.from_buffer(self.mmap)
        self._bitmap_bytes = (self.pages + 63) // 64 * 8
        self._kvm_bitmap = (ctypes.c_char * self._bitmap_bytes)()
        self._vmm_dirty = bytearray(self._bitmap_bytes)
        self._dirty_lock = threading.Lock()
        self.tracking = False
        self._set_slot(0)

    def _set_slot(self, flags: int):
        region = kvm.kvm_userspace_memory_region(
            slot=_SLOT, flags=flags, guest_phys_addr=0, memory_size=self.size,
            userspace_addr=ctypes.addressof(self._anchor))
        kvm.ioctl(self._vm_fd, kvm.KVM_SET_USER_MEMORY_REGION, region)

    # --- bounds-checked access for hypercalls -------------------------------

    def check(self, gpa: int, length: int, what: str = "buffer"):
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestError(f"{what} [{gpa:#x}, +{length:#x}) is outside guest RAM (size {self.size:#x})")

    def read(self, gpa: int, length: int, what: str = "buffer") -> bytes:
        self.check(gpa, length, what)
        return self.mmap[gpa:gpa + length]

    def write(self, gpa: int, data, what: str = "buffer"):
        """Write guest RAM on the VMM's behalf; the pages count as dirty."""
        self.check(gpa, len(data), what)
        self.mmap[gpa:gpa + len(data)] = data
        self.mark_dirty(gpa, len(data))

    def unpack(self, layout, gpa: int, what: str):
        self.check(gpa, layout.size, what)
        return layout.unpack_from(self.mmap, gpa)

    def pack(self, layout, gpa: int, *values):
        self.check(gpa, layout.size, "hypercall arguments")
        layout.pack_into(self.mmap, gpa, *values)
        self.mark_dirty(gpa, layout.size)

    # --- dirty tracking -----------------------------------------------------

    def mark_dirty(self, gpa: int, length: int):
        """Record pages the VMM wrote (KVM only sees the guest's own writes)."""
        if not self.tracking or length == 0:
            return
        with self._dirty_lock:
            native.bitmap_mark(self._vmm_dirty, gpa, length)

    @contextlib.contextmanager
    def vmm_dirty(self):
        """The VMM's own dirty bitmap, under its lock, for code that writes guest RAM in bulk
        (the NIC rings): it sets the bits of the pages it wrote, after writing them."""
        with self._dirty_lock:
            yield self._vmm_dirty

    @contextlib.contextmanager
    def vmm_dirty_unlocked(self):
        """The same bitmap for native code that sets its bits atomically without the GIL (and
        without the lock, so it may run long); the reference twin still needs the lock."""
        if native.IMPLEMENTATION == "native":
            yield self._vmm_dirty
        else:
            with self._dirty_lock:
                yield self._vmm_dirty

    def start_dirty_tracking(self):
        """Log writes from now on; the first fetch reports pages written since this call."""
        with self._dirty_lock:
            self._vmm_dirty[:] = bytes(self._bitmap_bytes)
            self.tracking = True
        self._set_slot(kvm.KVM_MEM_LOG_DIRTY_PAGES)

    def stop_dirty_tracking(self):
        self._set_slot(0)
        with self._dirty_lock:
            self.tracking = False

    def fetch_dirty_bitmap(self) -> bytes:
        """Pages written by the guest or the VMM since the last fetch; clears both logs."""
        if not self.tracking:
            raise RuntimeError("dirty tracking is not started")
        log = kvm.kvm_dirty_log(slot=_SLOT, dirty_bitmap=ctypes.addressof(self._kvm_bitmap))
        kvm.ioctl(self._vm_fd, kvm.KVM_GET_DIRTY_LOG, log)
        with self._dirty_lock:
            vmm = native.bitmap_take(self._vmm_dirty)
        merged = int.from_bytes(self._kvm_bitmap.raw, "little") | int.from_bytes(vmm, "little")
        return merged.to_bytes(self._bitmap_bytes, "little")

    def close(self):
        if self.mmap.closed:
            return
        del self._anchor
        self.mmap.close()
        os.close(self.fd)


def dirty_pages(bitmap: bytes):
    """Page numbers set in a dirty bitmap, in ascending order."""
    for index, byte in enumerate(bitmap):
        if byte:
            for bit in range(8):
                if byte >> bit & 1:
                    yield index * 8 + bit
