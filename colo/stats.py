"""What COLO measured: checkpoints by reason, the PVM's pause of each, bytes sent."""
from __future__ import annotations

import collections
import threading

REASONS = ("periodic", "request", "mismatch")
PAUSE_WINDOW = 1024          # pauses kept for the quantiles


class ColoStats:
    def __init__(self):
        self.checkpoints = dict.fromkeys(REASONS, 0)
        self.failed_checkpoints = 0
        self.loaded = 0                      # checkpoints loaded into the SVM (secondary)
        self.pauses: collections.deque[float] = collections.deque(maxlen=PAUSE_WINDOW)   # seconds
        self.pause_sum = 0.0
        self.pause_count = 0
        self.bytes_total = 0
        self.last_bytes = 0
        self.failovers = 0
        self.digests: collections.deque[tuple[int, str]] = collections.deque(maxlen=4096)
        self._lock = threading.Lock()

    def record(self, reason: str, pause: float | None, nbytes: int) -> None:
        with self._lock:
            self.checkpoints[reason] += 1
            self.bytes_total += nbytes
            self.last_bytes = nbytes
            if pause is not None:
                self.pauses.append(pause)
                self.pause_sum += pause
                self.pause_count += 1

    def quantile(self, q: float) -> float:
        """Of the last PAUSE_WINDOW pauses (nearest rank), in seconds; 0 before any."""
        with self._lock:
            ordered = sorted(self.pauses)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]

    @property
    def total(self) -> int:
        return sum(self.checkpoints.values())

    def as_dict(self) -> dict:
        return {
            "checkpoints": dict(self.checkpoints), "checkpoints-total": self.total,
            "failed-checkpoints": self.failed_checkpoints, "checkpoints-loaded": self.loaded,
            "pause-ms": {"p50": round(self.quantile(0.5) * 1000, 3), "p99": round(self.quantile(0.99) * 1000, 3),
                         "last": round(self.pauses[-1] * 1000, 3) if self.pauses else 0.0,
                         "sum": round(self.pause_sum * 1000, 3), "count": self.pause_count},
            "bytes-total": self.bytes_total, "last-bytes": self.last_bytes, "failovers": self.failovers,
        }
