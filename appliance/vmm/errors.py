"""Exceptions the VMM raises to its callers."""


class VMError(Exception):
    """A request the VM cannot honour in its current state, or a host-side failure."""


class KVMUnavailableError(VMError):
    """/dev/kvm is missing or unusable."""


class GuestImageError(VMError):
    """The guest image is not a loadable ELF64 x86-64 executable for this VM."""


class StateFileError(VMError):
    """A saved state file or a section list is corrupt, truncated or incompatible."""


class GuestError(Exception):
    """The guest broke the ABI (bad pointer, unknown hypercall); the VM stops."""
