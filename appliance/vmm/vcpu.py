"""One KVM vCPU: its fd, the shared kvm_run page, CPL3 long-mode boot state,
and save/restore of its architectural state as named sections."""

import ctypes
import logging
import mmap
import os
import struct

from . import abi, kvm
from .abi import GDT_GPA, PML4_GPA, TSS_GPA
from .errors import StateFileError

# Selectors: GDT slot 1-2 = 64-bit TSS, 3 = user data, 4 = user code (RPL 3).
TSS_SELECTOR = 0x08
USER_DATA_SELECTOR = 0x18 | 3
USER_CODE_SELECTOR = 0x20 | 3
GDT_LIMIT = 5 * 8 - 1
# 64-bit TSS (104 bytes) followed by an I/O permission bitmap up to port 0x5ff
# and its terminating byte.
_TSS_SIZE = 0x68
_IO_BITMAP_PORTS = 0x600
TSS_LIMIT = _TSS_SIZE + _IO_BITMAP_PORTS // 8

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 0x10000, 0x80000000
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 0x20, 0x200, 0x400, 0x40000
EFER_LME, EFER_LMA = 0x100, 0x400
RFLAGS_RESERVED, RFLAGS_IOPL3 = 0x2, 0x3000
XCR0_X87_SSE = 0x3
CPUID_1_ECX_XSAVE = 1 << 26

_MSR_ENTRY = struct.Struct("<IQ")
_log = logging.getLogger(__name__)


def gdt_bytes() -> bytes:
    """The boot GDT: null, 64-bit TSS (two slots), DPL3 data, DPL3 64-bit code."""
    tss_low = (TSS_LIMIT | (TSS_GPA & 0xFFFFFF) << 16 | 0x89 << 40  # present, available 64-bit TSS
               | ((TSS_GPA >> 24) & 0xFF) << 56)
    tss_high = TSS_GPA >> 32
    user_data = 0x00CF_F300_0000_FFFF  # present, DPL3, writable, 4 GiB, G
    user_code = 0x00AF_FB00_0000_FFFF  # present, DPL3, code, L=1, G
    return struct.pack("<5Q", 0, tss_low, tss_high, user_data, user_code)


def tss_bytes() -> bytes:
    """A 64-bit TSS whose I/O bitmap opens the hypercall ports 0x500-0x5ff.

    RFLAGS.IOPL=3 already allows port I/O at CPL3 on hardware; kvm_pvm runs the
    guest with the real IOPL at 0 and honours only this bitmap.
    """
    tss = bytearray(TSS_LIMIT + 1)
    struct.pack_into("<H", tss, 0x66, _TSS_SIZE)
    bitmap = bytearray(b"\xff" * (_IO_BITMAP_PORTS // 8 + 1))  # set bit = port denied
    bitmap[abi.HYPERCALL_PORT_BASE // 8:_IO_BITMAP_PORTS // 8] = bytes(
        (_IO_BITMAP_PORTS - abi.HYPERCALL_PORT_BASE) // 8)
    tss[_TSS_SIZE:] = bitmap
    return bytes(tss)


class Vcpu:
    def __init__(self, kvm_fd: int, vm_fd: int):
        self.fd = kvm.ioctl(vm_fd, kvm.KVM_CREATE_VCPU, 0)
        size = kvm.ioctl(kvm_fd, kvm.KVM_GET_VCPU_MMAP_SIZE)
        self._run_mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = kvm.kvm_run.from_buffer(self._run_mmap)
        self._has = {cap: kvm.ioctl(kvm_fd, kvm.KVM_CHECK_EXTENSION, cap) > 0 for cap in (
            kvm.KVM_CAP_XSAVE, kvm.KVM_CAP_XCRS, kvm.KVM_CAP_VCPU_EVENTS, kvm.KVM_CAP_DEBUGREGS)}
        self.has_xsave = self._has[kvm.KVM_CAP_XSAVE] and self._has[kvm.KVM_CAP_XCRS]
        self._setup_cpuid(kvm_fd)
        self.msr_indices = self._saveable_msrs(kvm.msr_index_list(kvm_fd))

    def io_data(self, offset: int, size: int) -> bytes:
        return self._run_mmap[offset:offset + size]

    def _setup_cpuid(self, kvm_fd: int):
        """Expose what KVM supports, so compiled guest code finds SSE (and XSAVE)."""
        cpuid = kvm.cpuid_buffer(256)
        kvm.ioctl(kvm_fd, kvm.KVM_GET_SUPPORTED_CPUID, cpuid)
        for entry in cpuid.entries[:cpuid.nent]:
            if entry.function == 1 and not entry.ecx & CPUID_1_ECX_XSAVE:
                self.has_xsave = False
        kvm.ioctl(self.fd, kvm.KVM_SET_CPUID2, cpuid)

    def _saveable_msrs(self, candidates):
        """The MSRs KVM both reads and writes back here, so save/restore is lossless.

        KVM_GET_MSRS and KVM_SET_MSRS stop at the first MSR they refuse: drop
        that one and go on with the rest.
        """
        readable, pending = [], list(candidates)
        while pending:
            buf = kvm.msrs_buffer(pending)
            count = kvm.ioctl(self.fd, kvm.KVM_GET_MSRS, buf)
            readable += [(e.index, e.data) for e in buf.entries[:count]]
            pending = pending[count + 1:]
        return [index for index, _ in self._set_msrs(readable)]

    def _set_msrs(self, entries):
        """KVM_SET_MSRS for [(index, value)]; returns the entries KVM accepted."""
        accepted = []
        while entries:
            buf = kvm.msrs_buffer([index for index, _ in entries])
            for entry, (_, data) in zip(buf.entries, entries):
                entry.data = data
            count = kvm.ioctl(self.fd, kvm.KVM_SET_MSRS, buf)
            accepted += entries[:count]
            entries = entries[count + 1:]
        return accepted

    def boot(self, entry: int, stack_top: int, boot_info: int):
        """Enter the guest in 64-bit mode at CPL3, paging on with the VMM's identity map."""
        sregs = kvm.kvm_sregs()
        kvm.ioctl(self.fd, kvm.KVM_GET_SREGS, sregs)
        code = dict(base=0, limit=0xFFFFFFFF, selector=USER_CODE_SELECTOR, type=0xB, present=1,
                    dpl=3, db=0, s=1, l=1, g=1)
        data = dict(base=0, limit=0xFFFFFFFF, selector=USER_DATA_SELECTOR, type=0x3, present=1,
                    dpl=3, db=1, s=1, l=0, g=1)
        sregs.cs = kvm.kvm_segment(**code)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, kvm.kvm_segment(**data))
        sregs.tr = kvm.kvm_segment(base=TSS_GPA, limit=TSS_LIMIT, selector=TSS_SELECTOR, type=0xB,
                                   present=1, dpl=0, s=0)
        sregs.ldt = kvm.kvm_segment(type=0x2, present=1, unusable=1)
        sregs.gdt = kvm.kvm_dtable(base=GDT_GPA, limit=GDT_LIMIT)
        sregs.idt = kvm.kvm_dtable(base=0, limit=0)  # any exception becomes a triple fault
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.cr3 = PML4_GPA
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_OSXSAVE if self.has_xsave else 0)
        sregs.efer = EFER_LME | EFER_LMA
        kvm.ioctl(self.fd, kvm.KVM_SET_SREGS, sregs)

        if self.has_xsave:
            xcrs = kvm.kvm_xcrs(nr_xcrs=1)
            xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, XCR0_X87_SSE
            kvm.ioctl(self.fd, kvm.KVM_SET_XCRS, xcrs)
        fpu = kvm.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
        kvm.ioctl(self.fd, kvm.KVM_SET_FPU, fpu)

        regs = kvm.kvm_regs(rip=entry, rsp=stack_top, rdi=boot_info,
                            rflags=RFLAGS_RESERVED | RFLAGS_IOPL3)
        kvm.ioctl(self.fd, kvm.KVM_SET_REGS, regs)

    def registers(self) -> kvm.kvm_regs:
        regs = kvm.kvm_regs()
        kvm.ioctl(self.fd, kvm.KVM_GET_REGS, regs)
        return regs

    # --- state sections ---------------------------------------------------------
    # Each entry: section name, the struct, get ioctl, set ioctl, whether KVM has it.
    def _blob_sections(self):
        has = self._has
        return [
            ("cpu.sregs", kvm.kvm_sregs, kvm.KVM_GET_SREGS, kvm.KVM_SET_SREGS, True),
            ("cpu.regs", kvm.kvm_regs, kvm.KVM_GET_REGS, kvm.KVM_SET_REGS, True),
            ("cpu.xcrs", kvm.kvm_xcrs, kvm.KVM_GET_XCRS, kvm.KVM_SET_XCRS, has[kvm.KVM_CAP_XCRS]),
            ("cpu.xsave", kvm.kvm_xsave, kvm.KVM_GET_XSAVE, kvm.KVM_SET_XSAVE, has[kvm.KVM_CAP_XSAVE]),
            ("cpu.fpu", kvm.kvm_fpu, kvm.KVM_GET_FPU, kvm.KVM_SET_FPU, not has[kvm.KVM_CAP_XSAVE]),
            ("cpu.mp_state", kvm.kvm_mp_state, kvm.KVM_GET_MP_STATE, kvm.KVM_SET_MP_STATE, True),
            ("cpu.events", kvm.kvm_vcpu_events, kvm.KVM_GET_VCPU_EVENTS, kvm.KVM_SET_VCPU_EVENTS,
             has[kvm.KVM_CAP_VCPU_EVENTS]),
            ("cpu.debugregs", kvm.kvm_debugregs, kvm.KVM_GET_DEBUGREGS, kvm.KVM_SET_DEBUGREGS,
             has[kvm.KVM_CAP_DEBUGREGS]),
        ]

    def save(self):
        """The vCPU's state as [(name, version, payload)]; the vCPU must be outside KVM_RUN."""
        sections = []
        for name, struct_type, get, _set, available in self._blob_sections():
            if available:
                value = struct_type()
                kvm.ioctl(self.fd, get, value)
                sections.append((name, 1, bytes(value)))
        buf = kvm.msrs_buffer(self.msr_indices)
        count = kvm.ioctl(self.fd, kvm.KVM_GET_MSRS, buf)
        payload = b"".join(_MSR_ENTRY.pack(e.index, e.data) for e in buf.entries[:count])
        sections.append(("cpu.msrs", 1, payload))
        return sections

    def section_names(self):
        return {name for name, *_rest, available in self._blob_sections() if available} | {"cpu.msrs"}

    def load(self, sections: dict):
        """Restore from {name: payload}; sregs first so modes are right for the rest."""
        for name, struct_type, _get, set_, available in self._blob_sections():
            if not available:
                continue
            payload = sections[name]
            if len(payload) != ctypes.sizeof(struct_type):
                raise StateFileError(f"section {name}: {len(payload)} bytes, expected {ctypes.sizeof(struct_type)}")
            kvm.ioctl(self.fd, set_, struct_type.from_buffer_copy(payload))
            if name == "cpu.regs":
                self._load_msrs(sections["cpu.msrs"])

    def _load_msrs(self, payload: bytes):
        if len(payload) % _MSR_ENTRY.size:
            raise StateFileError("section cpu.msrs: truncated entry")
        entries = [_MSR_ENTRY.unpack_from(payload, off) for off in range(0, len(payload), _MSR_ENTRY.size)]
        refused = set(entries) - set(self._set_msrs(entries))
        for index, value in sorted(refused):
            _log.warning("MSR %#x = %#x could not be restored", index, value)

    def close(self):
        if self._run_mmap.closed:
            return
        del self.run
        self._run_mmap.close()
        os.close(self.fd)
