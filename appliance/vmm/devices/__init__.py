"""Devices behind the hypercall ABI: console, NIC (tap or queue backend), raw block device.

Each device names its state section (SECTION, VERSION) and has a State
dataclass with save() -> bytes and State.restore(bytes).
"""

from .block import BlockDevice, BlockState
from .console import Console, ConsoleState
from .nic import Nic, NicBackend, NicState, QueueBackend, TapBackend, tap_mac
from .rings import NicRings

__all__ = ["BlockDevice", "BlockState", "Console", "ConsoleState", "Nic", "NicBackend", "NicRings", "NicState",
           "QueueBackend", "TapBackend", "tap_mac"]
