"""Devices behind the hypercall ABI: console, tap-backed NIC, raw block device.

Each device names its state section (SECTION, VERSION) and has a State
dataclass with save() -> bytes and State.restore(bytes).
"""

from .block import BlockDevice, BlockState
from .console import Console, ConsoleState
from .nic import TapNic, NicState

__all__ = ["BlockDevice", "BlockState", "Console", "ConsoleState", "TapNic", "NicState"]
