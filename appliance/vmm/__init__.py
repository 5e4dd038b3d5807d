"""The appliance VMM: KVM unikernel guests with save/restore and dirty tracking."""

from .devices import BlockState, ConsoleState, NicState
from .errors import GuestError, GuestImageError, KVMUnavailableError, StateFileError, VMError
from .machine import (GUEST_PANICKED, INMIGRATE, INTERNAL_ERROR, PAUSED, PRELAUNCH, RUN_STATES, RUNNING,
                      SHUTDOWN, VirtualMachine, VMConfig)
from .memory import dirty_pages

__all__ = [
    "VirtualMachine", "VMConfig", "dirty_pages",
    "VMError", "KVMUnavailableError", "GuestImageError", "StateFileError", "GuestError",
    "BlockState", "ConsoleState", "NicState",
    "RUN_STATES", "PRELAUNCH", "RUNNING", "PAUSED", "SHUTDOWN", "GUEST_PANICKED", "INTERNAL_ERROR",
    "INMIGRATE",
]
