"""Console: guest output appended to a log file and kept in memory for read_console()."""

import os
import struct
import threading
from dataclasses import dataclass

from ..errors import StateFileError

_KEEP_BYTES = 4 << 20  # in-memory tail for read_console()


@dataclass
class ConsoleState:
    bytes_written: int = 0

    _LAYOUT = struct.Struct("<Q")

    def save(self) -> bytes:
        return self._LAYOUT.pack(self.bytes_written)

    @classmethod
    def restore(cls, data: bytes) -> "ConsoleState":
        if len(data) != cls._LAYOUT.size:
            raise StateFileError(f"console state: {len(data)} bytes, expected {cls._LAYOUT.size}")
        return cls(*cls._LAYOUT.unpack(data))


def _open_0640(path: str, flags: int) -> int:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        os.fchmod(fd, 0o640)      # an older, wider log file too
    except PermissionError:       # not ours (an operator's choice): leave its mode alone
        pass
    return fd


class Console:
    SECTION, VERSION = "dev.console", 1

    def __init__(self, log_path=None):
        # 0640, whatever the umask: the guest's output may hold secrets; the service's group may read it.
        self._log = open(log_path, "ab", buffering=0, opener=_open_0640) if log_path else None
        self._tail = bytearray()
        self._lock = threading.Lock()
        self.state = ConsoleState()

    def write(self, data: bytes):
        with self._lock:
            if self._log:
                self._log.write(data)
            self._tail += data
            if len(self._tail) > _KEEP_BYTES:
                del self._tail[:len(self._tail) - _KEEP_BYTES]
            self.state.bytes_written += len(data)

    def text(self) -> str:
        """Output since this process opened the console (the last 4 MiB of it)."""
        with self._lock:
            return self._tail.decode("utf-8", "replace")

    def restore_state(self, state: ConsoleState):
        self.state = state

    def close(self):
        if self._log:
            self._log.close()
