"""ctypes bindings for the parts of linux/kvm.h the VMM uses.

Struct layouts and ioctl numbers follow /usr/include/linux/kvm.h (x86_64);
tests/test_vmm_kvm_abi.py compiles a C program against the real header and
checks every number and size here against it.
"""

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.pthread_kill.argtypes = [ctypes.c_ulong, ctypes.c_int]

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

KVMIO = 0xAE


def _IO(nr):
    return (KVMIO << 8) | nr


def _IOC(direction, nr, size):
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IOW(nr, struct):
    return _IOC(1, nr, ctypes.sizeof(struct))


def _IOR(nr, struct):
    return _IOC(2, nr, ctypes.sizeof(struct))


def _IOWR(nr, struct):
    return _IOC(3, nr, ctypes.sizeof(struct))


class kvm_regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class kvm_fpu(ctypes.Structure):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
                ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only; the entries array follows it (see msrs_buffer)."""
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(ctypes.Structure):
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_xsave(ctypes.Structure):
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class kvm_vcpu_events(ctypes.Structure):
    """Saved and restored as an opaque blob; only the size matters here."""
    _fields_ = [("raw", u8 * 64)]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * 1024)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", ctypes.c_int32),
                ("flags", u32), ("pad", u8 * 36)]


class _kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [("io", _kvm_run_io), ("mmio", _kvm_run_mmio), ("fail_entry", _kvm_run_fail_entry),
                ("internal", _kvm_run_internal), ("padding", ctypes.c_char * 256)]


class kvm_run(ctypes.Structure):
    """The head of the shared kvm_run page (the exit union included)."""
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", _kvm_run_exit)]


KVM_API_VERSION = 12

KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, kvm_cpuid2)
KVM_CREATE_VCPU = _IO(0x41)
KVM_GET_DIRTY_LOG = _IOW(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_IOEVENTFD = _IOW(0x79, kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(0x7b, kvm_clock_data)
KVM_GET_CLOCK = _IOR(0x7c, kvm_clock_data)
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, kvm_regs)
KVM_SET_REGS = _IOW(0x82, kvm_regs)
KVM_GET_SREGS = _IOR(0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(0x89, kvm_msrs)
KVM_GET_FPU = _IOR(0x8c, kvm_fpu)
KVM_SET_FPU = _IOW(0x8d, kvm_fpu)
KVM_GET_LAPIC = _IOR(0x8e, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(0x8f, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(0x90, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _IOR(0x9f, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(0xa0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(0xa1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(0xa2, kvm_debugregs)
KVM_GET_TSC_KHZ = _IO(0xa3)
KVM_GET_XSAVE = _IOR(0xa4, kvm_xsave)
KVM_SET_XSAVE = _IOW(0xa5, kvm_xsave)
KVM_GET_XCRS = _IOR(0xa6, kvm_xcrs)
KVM_SET_XCRS = _IOW(0xa7, kvm_xcrs)
KVM_ENABLE_CAP = _IOW(0xa3, kvm_enable_cap)

KVM_CAP_IRQCHIP = 0
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_USER_MEMORY = 3
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_XSAVE2 = 208

KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_IOEVENTFD_FLAG_PIO = 2

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_MP_STATE_RUNNABLE = 0

_REQUEST_NAMES = {value: name for name, value in dict(globals()).items()
                  if name.startswith("KVM_") and isinstance(value, int) and value > 0xff
                  and not name.startswith(("KVM_CAP", "KVM_EXIT", "KVM_MEM", "KVM_MP", "KVM_IOEVENTFD_FLAG"))}


def ioctl(fd, request, arg=0):
    """ioctl(2) through libc so KVM_RUN releases the GIL; raises OSError with errno.

    `arg` is an int (passed as unsigned long) or a ctypes object (passed by reference).
    """
    if isinstance(arg, int):
        arg = ctypes.c_ulong(arg)
    else:
        arg = ctypes.byref(arg)
    ret = _libc.ioctl(fd, ctypes.c_ulong(request), arg)
    if ret < 0:
        err = ctypes.get_errno()
        name = _REQUEST_NAMES.get(request, hex(request))
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def msrs_buffer(indices):
    """A struct kvm_msrs with `len(indices)` entries, as (header, entries)."""
    class _msrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * len(indices))]
    buf = _msrs()
    buf.nmsrs = len(indices)
    for entry, index in zip(buf.entries, indices):
        entry.index = index
    return buf


def cpuid_buffer(count):
    class _cpuid(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * count)]
    buf = _cpuid()
    buf.nent = count
    return buf


def msr_index_list(kvm_fd):
    """Every MSR index KVM offers to save/restore (KVM_GET_MSR_INDEX_LIST)."""
    class _list(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * 1024)]
    buf = _list()
    buf.nmsrs = 1024
    ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, buf)
    return list(buf.indices[:buf.nmsrs])


def pthread_kill(thread_ident, signum):
    err = _libc.pthread_kill(thread_ident, signum)
    if err:
        raise OSError(err, os.strerror(err))
