"""Devices behind the hypercall ABI and the rings: console, NIC (tap or queue backend), raw block device.

Each device names its state section (SECTION, VERSION) and has a State
dataclass with save() -> bytes and State.restore(bytes).
"""

from .block import BlockDevice, BlockState
from .console import Console, ConsoleRing, ConsoleState
from .nic import Nic, NicBackend, NicState, QueueBackend, TapBackend, tap_mac
from .rings import NicRings

__all__ = ["BlockDevice", "BlockState", "Console", "ConsoleRing", "ConsoleState", "Nic", "NicBackend", "NicRings", "NicState",
           "QueueBackend", "TapBackend", "tap_mac"]
