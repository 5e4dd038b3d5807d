"""Block device: 512-byte sectors on a raw image file."""

import os
import struct
import threading
from dataclasses import dataclass

from ..abi import SECTOR_SIZE
from ..errors import StateFileError


@dataclass
class BlockState:
    sectors: int = 0
    reads: int = 0
    writes: int = 0

    _LAYOUT = struct.Struct("<QQQ")

    def save(self) -> bytes:
        return self._LAYOUT.pack(self.sectors, self.reads, self.writes)

    @classmethod
    def restore(cls, data: bytes) -> "BlockState":
        if len(data) != cls._LAYOUT.size:
            raise StateFileError(f"block state: {len(data)} bytes, expected {cls._LAYOUT.size}")
        return cls(*cls._LAYOUT.unpack(data))


class BlockDevice:
    SECTION, VERSION = "dev.block", 1

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.state = BlockState(sectors=os.fstat(self.fd).st_size // SECTOR_SIZE)
        self._lock = threading.Lock()

    def _in_range(self, sector: int, count: int) -> bool:
        return 0 <= sector and 0 <= count and sector + count <= self.state.sectors

    def read(self, sector: int, count: int):
        """The sectors' bytes, or None when the range is past the end or the read fails."""
        if not self._in_range(sector, count):
            return None
        try:
            data = os.pread(self.fd, count * SECTOR_SIZE, sector * SECTOR_SIZE)
        except OSError:
            return None
        with self._lock:
            self.state.reads += 1
        return data if len(data) == count * SECTOR_SIZE else None

    def write(self, sector: int, data) -> bool:
        count = len(data) // SECTOR_SIZE
        if not self._in_range(sector, count):
            return False
        try:
            written = os.pwrite(self.fd, data, sector * SECTOR_SIZE)
        except OSError:
            return False
        with self._lock:
            self.state.writes += 1
        return written == len(data)

    def restore_state(self, state: BlockState):
        if state.sectors != self.state.sectors:
            raise StateFileError(
                f"disk {self.path} has {self.state.sectors} sectors, the saved VM had {state.sectors}")
        self.state = state

    def flush(self):
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)
